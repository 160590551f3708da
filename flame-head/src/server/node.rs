//! A node's control connection: its registration, its messages to the core, and the
//! core's frames to it.

use super::*;

pub(super) async fn node_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut writer: Writer,
    mut reader: Reader,
    certified_name: String,
) -> Result<(), ConnError> {
    let registration = match tokio::time::timeout(
        limits::CONNECT_TIMEOUT,
        reader.read_required::<NodeToHead>(),
    )
    .await
    {
        Err(_) => return Err(ConnError::Timeout("the node registration")),
        Ok(Err(e)) => {
            close_with(
                &conn,
                CLOSE_PROTOCOL_ERROR,
                &format!("bad registration: {e}"),
            );
            return Err(e.into());
        }
        Ok(Ok(NodeToHead::Register(r))) => r,
        Ok(Ok(other)) => {
            let reason = format!("expected a registration, got {other:?}");
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &reason);
            return Err(ConnError::Handshake(reason));
        }
    };
    let invalid = match flame_protocol::model::validate_node_name(&registration.name) {
        Err(e) => Some(format!("invalid node name: {e}")),
        Ok(()) if registration.name != certified_name => Some(format!(
            "this node's certificate names node `{certified_name}`, but it registers as `{}`: \
             a node can only act as the node its certificate names",
            registration.name
        )),
        Ok(()) => None,
    };
    if let Some(reason) = invalid {
        tracing::warn!(remote = %conn.remote_address(), %reason, "node refused");
        let _ = writer
            .write(&flame_protocol::messages::HeadToNode::Refused {
                reason: reason.clone(),
            })
            .await;
        let _ = writer.get_mut().finish();
        // Give the node the chance to read the refusal before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        close_with(&conn, CLOSE_REFUSED, &reason);
        return Err(ConnError::Handshake(reason));
    }
    let conn_id: ConnId = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Bounded: a node that falls this far behind loses its connection (see `router`).
    let (link_tx, mut link_rx) = mpsc::channel(limits::HEAD_NODE_LINK_FRAMES_MAX);
    let name = registration.name.clone();
    let overflow_conn = conn.clone();
    shared
        .events
        .send(Inbound::NodeConnected {
            conn: conn_id,
            address: conn.remote_address().ip().to_canonical().to_string(),
            registration,
            link: NodeLink {
                frames: link_tx,
                on_overflow: Box::new(move || {
                    close_with(
                        &overflow_conn,
                        CLOSE_NODE_LOST,
                        "the node did not keep up with the head's frames",
                    )
                }),
            },
        })
        .await
        .map_err(|_| ConnError::CoreGone)?;
    shared.nodes().insert(name.clone(), (conn_id, conn.clone()));
    // Frames to the node, in order. When the core drops the link (the node was declared
    // lost), the connection is closed so the node reconnects and registers afresh.
    let writer_conn = conn.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = link_rx.recv().await {
            if writer.write(&msg).await.is_err() {
                return;
            }
        }
        close_with(
            &writer_conn,
            CLOSE_NODE_LOST,
            "the head declared this node lost",
        );
    });
    let reason = loop {
        // A silent node is the core's to declare lost (heartbeat timeout); one stalled in
        // the middle of a frame is cut off here.
        match read_bounded::<NodeToHead>(&mut reader, None).await {
            Ok(Some(message)) => {
                if shared
                    .events
                    .send(Inbound::Event(Event::NodeMessage {
                        conn: conn_id,
                        message,
                    }))
                    .await
                    .is_err()
                {
                    break "the head is shutting down".to_string();
                }
            }
            Ok(None) => break "the node closed its control stream".to_string(),
            Err(e) => {
                if matches!(
                    e,
                    ConnError::Frame(FrameError::Malformed(_) | FrameError::TooLarge { .. })
                ) {
                    close_with(&conn, CLOSE_PROTOCOL_ERROR, &e.to_string());
                } else if let ConnError::Timeout(_) = e {
                    close_with(&conn, CLOSE_NODE_LOST, &e.to_string());
                }
                break e.to_string();
            }
        }
    };
    {
        let mut nodes = shared.nodes();
        if nodes.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            nodes.remove(&name);
        }
    }
    let _ = shared
        .events
        .send(Inbound::Event(Event::NodeDisconnected {
            conn: conn_id,
            reason,
        }))
        .await;
    writer_task.abort();
    Ok(())
}
