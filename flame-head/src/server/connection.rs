//! A connection's life before its role takes over: the QUIC handshake, the hello, the
//! admission against tokens, certificates and quotas, and a node's join.

use super::*;

pub(super) async fn handle_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    pending: Pending,
) -> Result<(), ConnError> {
    let Some(Greeted {
        conn,
        mut writer,
        reader,
        hello,
    }) = greet(incoming).await?
    else {
        return Ok(());
    };
    let peer_der = flame_protocol::endpoint::peer_certificate(&conn);
    let peer = peer_der.as_ref().map(|der| identity_of(der));
    let admitted = admit(&shared, &hello, peer);
    let admitted = match admitted {
        Ok(a) => a,
        Err(reason) => {
            tracing::warn!(remote = %conn.remote_address(), role = ?hello.role, %reason, "connection refused");
            refuse(&conn, &mut writer, &reason).await;
            return Ok(());
        }
    };
    // A connection admitted on its certificate: that certificate must not be revoked (or,
    // for a node, replaced). Recorded before the welcome and checked once recorded, as
    // tokens are below; the guard forgets it when this connection's handling ends.
    let by_cert = matches!(
        &admitted,
        Admitted::Node { .. }
            | Admitted::Client {
                token: None,
                caller: Caller::User(_)
            }
    );
    let _cert_conn = match peer_der.filter(|_| by_cert) {
        None => None,
        Some(der) => match track_cert_conn(&shared, &conn, &der) {
            Ok(guard) => Some(guard),
            Err(reason) => {
                tracing::warn!(remote = %conn.remote_address(), role = ?hello.role, %reason, "connection refused");
                refuse(&conn, &mut writer, &reason).await;
                return Ok(());
            }
        },
    };
    // Recorded before the welcome, and checked again once recorded: a revocation that
    // lands in between still closes this connection.
    if let Admitted::Client {
        token: Some(token), ..
    } = &admitted
    {
        shared
            .token_conns()
            .entry(token.clone())
            .or_default()
            .push(conn.clone());
        let still = shared.tokens().check_id(token, now_ms());
        if let Err(e) = still {
            forget_token_conn(&shared, token, &conn);
            refuse(&conn, &mut writer, &e.to_string()).await;
            return Ok(());
        }
    }
    // A user's connections count against its quota (a job's credential counts as its own
    // user, `job N`).
    let slot = match &admitted {
        Admitted::Client { caller, .. } => match take_user_slot(&shared, caller) {
            Ok(slot) => Some(slot),
            Err(e) => {
                if let Admitted::Client {
                    token: Some(token), ..
                } = &admitted
                {
                    forget_token_conn(&shared, token, &conn);
                }
                tracing::warn!(remote = %conn.remote_address(), reason = %e, "connection refused");
                refuse(&conn, &mut writer, &e.to_string()).await;
                return Ok(());
            }
        },
        _ => None,
    };
    drop(pending);
    match &slot {
        Some(slot) => {
            let streams = shared.quotas.of(&slot.user).streams_per_connection;
            let streams = u32::try_from(streams)
                .unwrap_or(u32::MAX)
                .saturating_add(STREAMS_REFUSED_AT_ONCE_MAX)
                .min(limits::STREAMS_PER_CONNECTION_MAX);
            conn.set_receive_window(quinn::VarInt::from_u32(CLIENT_RECEIVE_WINDOW));
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(streams));
        }
        None => {
            conn.set_receive_window(quinn::VarInt::from_u32(AUTHENTICATED_RECEIVE_WINDOW));
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
                limits::STREAMS_PER_CONNECTION_MAX,
            ));
        }
    }
    writer
        .write(&HelloReply::Welcome {
            head_version: shared.version.clone(),
        })
        .await?;
    match admitted {
        Admitted::Client { caller, token } => {
            let _ = writer.get_mut().finish();
            let Some(slot) = slot else {
                return Err(ConnError::Handshake("a client without a user slot".into()));
            };
            let result = client_connection(conn.clone(), shared.clone(), caller, slot).await;
            if let Some(token) = token {
                forget_token_conn(&shared, &token, &conn);
            }
            result
        }
        Admitted::Node { name } => {
            let reader = FrameReader::new(reader.into_inner(), limits::FRAME_BYTES_MAX);
            node_connection(conn, shared, writer, reader, name).await
        }
        Admitted::Join { token } => {
            let reader = FrameReader::new(reader.into_inner(), JOIN_FRAME_BYTES_MAX);
            join_node(conn, shared, writer, reader, token).await
        }
    }
}

/// A connection whose handshake and hello went through.
pub(super) struct Greeted {
    conn: quinn::Connection,
    writer: Writer,
    reader: FrameReader<quinn::RecvStream>,
    hello: Hello,
}

/// The TLS handshake, the hello stream and the hello, checked: `None` when the peer was
/// refused (and told why).
async fn greet(incoming: quinn::Incoming) -> Result<Option<Greeted>, ConnError> {
    // The handshake, the hello stream and the hello within one bound: a slow peer is cut
    // off, whatever it trickles.
    let deadline = tokio::time::Instant::now() + limits::CONNECT_TIMEOUT;
    let conn = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| ConnError::Timeout("the TLS handshake"))?
        .map_err(|e| ConnError::Handshake(e.to_string()))?;
    let greeting = async {
        let (send, recv) = conn.accept_bi().await?;
        let writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let mut reader = FrameReader::new(recv, HELLO_BYTES_MAX);
        let bytes = reader.read_bytes_required().await?;
        Ok::<_, ConnError>((writer, reader, bytes))
    };
    let (mut writer, reader, bytes) = match tokio::time::timeout_at(deadline, greeting).await {
        Err(_) => {
            close_with(&conn, CLOSE_PROTOCOL_ERROR, "no hello in time");
            return Err(ConnError::Timeout("the hello"));
        }
        Ok(Err(e)) => {
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &format!("bad hello: {e}"));
            return Err(e);
        }
        Ok(Ok(greeted)) => greeted,
    };
    // The version first: a peer of another release gets told so, not a decoding error.
    let refusal = match postcard::take_from_bytes::<HelloVersion>(&bytes) {
        Ok((v, _)) => check_version(v.protocol_version).err(),
        Err(_) => None,
    };
    if let Some(reason) = refusal {
        refuse(&conn, &mut writer, &reason).await;
        return Ok(None);
    }
    let hello: Hello = match postcard::from_bytes(&bytes) {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("bad hello: {e}");
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &reason);
            return Err(ConnError::Handshake(reason));
        }
    };
    if let Err(reason) = check_hello(&hello, &[Role::Client, Role::Node, Role::Join]) {
        refuse(&conn, &mut writer, &reason).await;
        return Ok(None);
    }
    Ok(Some(Greeted {
        conn,
        writer,
        reader,
        hello,
    }))
}

/// Forgets a connection made with a certificate when its handling ends.
pub(super) struct CertConn {
    shared: Arc<Shared>,
    id: usize,
}

impl Drop for CertConn {
    fn drop(&mut self) {
        self.shared.cert_conns().remove(&self.id);
    }
}

/// Checks the certificate a connection was made with against the revocations, and
/// records the connection so that a later revocation closes it. The error is the reason
/// to refuse it.
pub(super) fn track_cert_conn(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    der: &[u8],
) -> Result<CertConn, String> {
    let cert =
        Presented::of(der).map_err(|e| format!("the certificate presented is not usable: {e}"))?;
    shared.certs().check(&cert).map_err(|e| e.to_string())?;
    let id = conn.stable_id();
    shared.cert_conns().insert(id, (conn.clone(), cert.clone()));
    let guard = CertConn {
        shared: shared.clone(),
        id,
    };
    // A revocation between the check and the record would have missed this connection.
    shared.certs().check(&cert).map_err(|e| e.to_string())?;
    Ok(guard)
}

pub(super) fn forget_token_conn(shared: &Shared, token: &str, conn: &quinn::Connection) {
    let mut conns = shared.token_conns();
    if let Some(list) = conns.get_mut(token) {
        list.retain(|c| c.stable_id() != conn.stable_id());
        if list.is_empty() {
            conns.remove(token);
        }
    }
}

/// Closes the connections of tokens revoked or expired since they connected.
pub(super) fn close_lapsed(shared: &Shared) {
    // Certificates too: a revocation whose write failed is held in memory only, and the
    // sweep keeps its connections closed.
    shared.close_revoked_certs();
    let now = now_ms();
    let ids: Vec<String> = shared.token_conns().keys().cloned().collect();
    let lapsed: Vec<(String, String)> = {
        let book = shared.tokens();
        ids.into_iter()
            .filter_map(|id| book.check_id(&id, now).err().map(|e| (id, e.to_string())))
            .collect()
    };
    for (id, reason) in lapsed {
        let conns = shared.token_conns().remove(&id).unwrap_or_default();
        for conn in conns {
            close_with(&conn, CLOSE_REVOKED, &reason);
        }
    }
}

/// What an accepted hello may do.
#[derive(Debug)]
pub(super) enum Admitted {
    Client {
        caller: Caller,
        /// The user token it came with, if any.
        token: Option<String>,
    },
    /// A node, as its certificate names it.
    Node { name: String },
    /// A node joining with the join token of this id.
    Join { token: String },
}

/// Authenticates a hello: the reason to refuse it otherwise. The reasons name tokens by id
/// at most.
pub(super) fn admit(
    shared: &Shared,
    hello: &Hello,
    peer: Option<Result<PeerIdentity, flame_protocol::pki::PkiError>>,
) -> Result<Admitted, String> {
    let authenticate = |token: &Secret| {
        shared
            .tokens()
            .authenticate(token, now_ms())
            .map_err(|e| e.to_string())
    };
    match hello.role {
        Role::Client => {
            if let Some(token) = &hello.token {
                return match authenticate(token)? {
                    Authenticated::User { principal, token } => Ok(Admitted::Client {
                        caller: Caller::User(principal),
                        token: Some(token),
                    }),
                    Authenticated::Job(job) => Ok(Admitted::Client {
                        caller: Caller::Job(job),
                        token: None,
                    }),
                    Authenticated::NodeJoin { token } => Err(format!(
                        "token {token} is a node join token: it can only join nodes \
                         (flame-node join); clients need a user token"
                    )),
                };
            }
            match peer {
                Some(Ok(PeerIdentity::User { name, admin })) => Ok(Admitted::Client {
                    caller: Caller::User(Principal { name, admin }),
                    token: None,
                }),
                Some(Ok(PeerIdentity::Node(name))) => Err(format!(
                    "the certificate presented names node `{name}`, not a user; clients need \
                     a user token or a user certificate"
                )),
                Some(Err(e)) => Err(format!("the client certificate is not usable: {e}")),
                None => Err("no credentials: this head accepts no anonymous clients; give a \
                     user token (--token-file, FLAME_TOKEN_FILE, FLAME_TOKEN, or `token_file` in the client \
                     configuration), made by an admin with `flame-head token create --user NAME`"
                    .to_string()),
            }
        }
        Role::Node => match peer {
            Some(Ok(PeerIdentity::Node(name))) => Ok(Admitted::Node { name }),
            Some(Ok(PeerIdentity::User { name, .. })) => Err(format!(
                "the certificate presented names user `{name}`, not a node"
            )),
            Some(Err(e)) => Err(format!("the node certificate is not usable: {e}")),
            None => Err(
                "nodes must present a certificate signed by the cluster CA: \
                 run `flame-node join --token TOKEN --head ADDR` on the node first"
                    .to_string(),
            ),
        },
        Role::Join => match &hello.token {
            None => Err("joining needs a node join token (flame-head token create --node)".into()),
            Some(token) => match authenticate(token)? {
                Authenticated::NodeJoin { token } => Ok(Admitted::Join { token }),
                _ => Err("this token is not a node join token; make one with \
                     `flame-head token create --node`"
                    .to_string()),
            },
        },
    }
}

/// Sends a refusal as the hello's answer, gives the peer a moment to read it, and closes.
pub(super) async fn refuse(conn: &quinn::Connection, writer: &mut Writer, reason: &str) {
    let _ = writer
        .write(&HelloReply::Refused {
            reason: reason.to_string(),
        })
        .await;
    let _ = writer.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    close_with(conn, CLOSE_REFUSED, reason);
}

/// `Role::Join`: reads the node's CSR, signs a certificate naming the node, answers, and
/// ends the connection.
pub(super) async fn join_node(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut writer: Writer,
    mut reader: Reader,
    token: String,
) -> Result<(), ConnError> {
    let request = tokio::time::timeout(
        limits::CONNECT_TIMEOUT,
        reader.read_required::<JoinRequest>(),
    )
    .await
    .map_err(|_| ConnError::Timeout("the join request"))??;
    let reply = match sign_joining_node(&shared, &request, &token).await {
        Ok(cert_pem) => {
            tracing::info!(node = %request.name, remote = %conn.remote_address(), %token, "signed a node certificate");
            JoinReply::Signed {
                cert_pem,
                ca_pem: shared.identity.ca_pem().to_string(),
            }
        }
        Err(reason) => {
            tracing::warn!(node = %request.name, remote = %conn.remote_address(), %token, %reason, "join refused");
            JoinReply::Refused { reason }
        }
    };
    writer.write(&reply).await?;
    let _ = writer.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// The checks and records of a join: the name is valid and free (or the token may replace
/// it), the token has a use left (spent here, durably), and the certificate issued becomes
/// the only one that node connects with; a node it replaces is disconnected. The error is
/// the reason to refuse the join.
pub(super) async fn sign_joining_node(
    shared: &Arc<Shared>,
    request: &JoinRequest,
    token: &str,
) -> Result<String, String> {
    let name = request.name.clone();
    flame_protocol::model::validate_node_name(&name)
        .map_err(|e| format!("invalid node name: {e}"))?;
    // Joins are rare: one at a time.
    let _one_join = tokio::time::timeout(limits::REQUEST_TIMEOUT, shared.joins.lock())
        .await
        .map_err(|_| {
            format!(
                "another join held the head for {:?}; try again",
                limits::REQUEST_TIMEOUT
            )
        })?;
    let replacing = shared.tokens().replaces(token).as_deref() == Some(name.as_str());
    if !replacing {
        let store = shared.store.clone();
        let key = name.clone();
        let registered = tokio::task::spawn_blocking(move || store.node_registered(&key))
            .await
            .map_err(|_| "the head is shutting down".to_string())?
            .map_err(|e| format!("cannot read the node records: {e}"))?;
        if registered || shared.certs().has_node(&name) || shared.node_connection(&name).is_some() {
            return Err(format!(
                "a node named `{name}` exists already: a join cannot take an existing node's \
                 name. Choose another name, or, to replace that node (its certificate stops \
                 working), join with a token made by `flame-head token create --node \
                 --replace {name}`"
            ));
        }
    }
    let spent = shared
        .tokens()
        .spend(token, now_ms())
        .map_err(|e| e.to_string())?;
    let give_back = |shared: &Arc<Shared>, reason: String| {
        if let Some(stored) = shared.tokens().unspend(token) {
            let store = shared.store.clone();
            let id = token.to_string();
            // Best effort: the use stays spent in the store if this fails too.
            tokio::task::spawn_blocking(move || store.put_token(&id, &stored));
        }
        reason
    };
    let store = shared.store.clone();
    let id = token.to_string();
    let written = tokio::task::spawn_blocking(move || store.put_token(&id, &spent)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(give_back(shared, format!("cannot record the join: {e}"))),
        Err(_) => return Err(give_back(shared, "the head is shutting down".into())),
    }
    let (cert_pem, fingerprint) = shared
        .identity
        .sign_node(&name, &request.csr_pem)
        .map_err(|e| give_back(shared, format!("cannot sign the node's certificate: {e}")))?;
    let previous = shared.certs().node(&name);
    let recorded =
        shared
            .certs()
            .issue_node(&name, flame_protocol::auth::hex(&fingerprint), now_ms());
    let (key, record) = recorded.map_err(|e| give_back(shared, e.to_string()))?;
    let store = shared.store.clone();
    let written = tokio::task::spawn_blocking(move || store.put_cert_record(&key, &record)).await;
    if !matches!(written, Ok(Ok(()))) {
        shared.certs().restore_node(&name, previous);
        let why = match written {
            Ok(Err(e)) => format!("cannot record the node's certificate: {e}"),
            _ => "the head is shutting down".to_string(),
        };
        return Err(give_back(shared, why));
    }
    if replacing {
        tracing::warn!(node = %name, "a join replaced the node; its old certificate no longer connects");
        shared.close_revoked_certs();
    }
    Ok(cert_pem)
}

pub(super) fn close_with(conn: &quinn::Connection, code: u32, reason: &str) {
    let reason: String = reason.chars().take(200).collect();
    conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
}

/// One stream of a connection, counted while it lives.
pub(super) struct StreamSlot(pub(super) Arc<std::sync::atomic::AtomicU64>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
