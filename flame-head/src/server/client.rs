//! A client connection: its streams, the requests on them, and their authorization.

use super::*;

pub(super) async fn client_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    caller: Caller,
    slot: UserSlot,
) -> Result<(), ConnError> {
    let slot = Arc::new(slot);
    let open = Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let (send, recv) = conn.accept_bi().await?;
        let held = open.fetch_add(1, Ordering::Relaxed);
        let stream_slot = StreamSlot(open.clone());
        let shared = shared.clone();
        let conn = conn.clone();
        let caller = caller.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let _stream_slot = stream_slot;
            let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
            if let Err(e) = crate::quotas::check(
                shared.quotas.of(&slot.user),
                Quota::StreamsPerConnection,
                &slot.user,
                held,
                1,
            ) {
                // Answered without reading the request: the client reads a response first.
                let _ = tokio::time::timeout(
                    limits::REQUEST_TIMEOUT,
                    writer.write(&ClientResponse::Error(e.into())),
                )
                .await;
                let _ = writer.get_mut().finish();
                return;
            }
            let reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
            if let Err(e) = client_stream(&conn, shared, &caller, &slot, writer, reader).await {
                if let ConnError::Frame(FrameError::Malformed(_) | FrameError::TooLarge { .. }) = &e
                {
                    // A malformed frame closes the connection, with the reason, and only it.
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "closing connection");
                    close_with(&conn, CLOSE_PROTOCOL_ERROR, &e.to_string());
                } else {
                    tracing::debug!(error = %e, "client stream ended");
                }
            }
        });
    }
}

/// Asks the core and waits for its answer, of the kind `request` gets.
pub(super) async fn ask<T: TryFrom<Reply, Error = Reply>>(
    shared: &Shared,
    request: Request,
) -> Result<T, ConnError> {
    let (tx, rx) = oneshot::channel();
    shared
        .events
        .send(Inbound::Ask { request, reply: tx })
        .await
        .map_err(|_| ConnError::CoreGone)?;
    answer(rx).await
}

/// The core's answer on `rx`, within [`limits::REQUEST_TIMEOUT`].
pub(super) async fn answer<T: TryFrom<Reply, Error = Reply>>(
    rx: oneshot::Receiver<Reply>,
) -> Result<T, ConnError> {
    let reply = tokio::time::timeout(limits::REQUEST_TIMEOUT, rx)
        .await
        .map_err(|_| ConnError::Timeout("the head's core"))?
        .map_err(|_| ConnError::CoreGone)?;
    T::try_from(reply).map_err(|_| ConnError::UnexpectedAnswer(std::any::type_name::<T>()))
}

pub(super) async fn client_stream(
    conn: &quinn::Connection,
    shared: Arc<Shared>,
    caller: &Caller,
    slot: &UserSlot,
    mut writer: Writer,
    mut reader: Reader,
) -> Result<(), ConnError> {
    let request = tokio::time::timeout(
        limits::REQUEST_TIMEOUT,
        reader.read_required::<ClientRequest>(),
    )
    .await
    .map_err(|_| ConnError::Timeout("a request"))??;
    let request = match authorize(&shared, caller, request).await? {
        Ok(request) => request,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    match request {
        ClientRequest::OpenSubmitStream { session } => {
            writer.write(&ClientResponse::Ok).await?;
            submit_stream(conn, shared, session, slot, writer, reader).await
        }
        ClientRequest::GetSession { id } => {
            let response = ask(&shared, Request::Client(ClientRequest::GetSession { id })).await?;
            let response = match response {
                ClientResponse::Error(e) if e.kind == ErrorKind::NotFound => {
                    match read_store(&shared, move |store| store.finished_session(id)).await? {
                        Ok(Some(info)) => ClientResponse::Session(info),
                        Ok(None) => ClientResponse::Error(e),
                        Err(e) => ClientResponse::Error(e),
                    }
                }
                other => other,
            };
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        ClientRequest::ListSessions => {
            let response = ask(&shared, Request::Client(ClientRequest::ListSessions)).await?;
            // Users see their own sessions; admins see everyone's.
            let only = match caller {
                Caller::User(p) if p.admin => None,
                Caller::User(p) => Some(p.name.clone()),
                Caller::Job(job) => Some(format!("job {job}")),
            };
            let response = match response {
                ClientResponse::Sessions(mut live) => {
                    if let Some(name) = &only {
                        live.retain(|s| crate::core::owner_name(&s.owner) == name);
                    }
                    let owner = only.clone();
                    let done = read_store(&shared, move |store| {
                        store.finished_sessions(owner.as_deref(), FINISHED_LISTED_MAX)
                    })
                    .await?;
                    match done {
                        Ok(mut done) => {
                            done.reverse();
                            // Finished ones first (by id), then the live ones.
                            done.retain(|d| !live.iter().any(|l| l.id == d.id));
                            done.extend(live);
                            done.sort_by_key(|s| s.id);
                            ClientResponse::Sessions(done)
                        }
                        Err(e) => ClientResponse::Error(e),
                    }
                }
                other => other,
            };
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        ClientRequest::WatchResults { session } => watch_stream(shared, session, writer).await,
        ClientRequest::Logs {
            session,
            executor,
            follow,
        } => {
            let user = stream_user(&shared, caller).await?;
            logs_stream(shared, &user, session, executor, follow, writer).await
        }
        ClientRequest::JobExec { job, node, argv } => {
            let user = stream_user(&shared, caller).await?;
            exec_stream(shared, &user, job, node, argv, writer).await
        }
        ClientRequest::ListTasks {
            session,
            states,
            after,
            limit,
        } => {
            let response = list_tasks(&shared, session, states, after, limit).await?;
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        request @ (ClientRequest::CreateToken { .. }
        | ClientRequest::ListTokens
        | ClientRequest::RevokeToken { .. }
        | ClientRequest::RevokeCert { .. }
        | ClientRequest::ListCerts
        | ClientRequest::WhoAmI) => {
            let response = token_request(&shared, caller, request).await;
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        request => {
            let mut response = ask(&shared, Request::Client(request)).await?;
            // Users see their own sessions; admins see everyone's. Every user sees how the
            // cluster is shared between owners (`flame queue`), not others' sessions.
            if let Caller::User(p) = caller {
                if !p.admin {
                    match &mut response {
                        ClientResponse::Sessions(sessions) => {
                            sessions.retain(|s| crate::core::owner_name(&s.owner) == p.name)
                        }
                        ClientResponse::Queue(report) => {
                            for owner in &mut report.owners {
                                if owner.owner != p.name {
                                    owner.sessions.clear();
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
    }
}

pub(super) fn denied(message: String) -> ApiError {
    ApiError::new(ErrorKind::PermissionDenied, message)
}

/// Checks that `caller` may make `request` (who may make which: [`crate::auth::access`]),
/// and fills in what the caller decides (a new session's owner). The inner error is the
/// answer to send back.
pub(super) async fn authorize(
    shared: &Shared,
    caller: &Caller,
    request: ClientRequest,
) -> Result<Result<ClientRequest, ApiError>, ConnError> {
    let principal = match caller {
        Caller::Job(job) => {
            return Ok(match &request {
                ClientRequest::JobExec { job: j, .. } if j == job => Ok(request),
                _ => Err(denied(format!(
                    "the credential of job {job} may only start processes of that job"
                ))),
            })
        }
        Caller::User(p) => p,
    };
    use crate::auth::{access, Access};
    let session = match access(&request) {
        Access::Admin { why } => {
            if !principal.admin {
                return Ok(Err(denied(format!(
                    "{why}; user `{}` is not an admin",
                    principal.name
                ))));
            }
            return Ok(Ok(request));
        }
        Access::SessionOwner(session) => Some(session),
        Access::NamedOwner => None,
        Access::ObjectOwner => return Ok(object_owner(principal, request)),
        Access::Anyone => return Ok(Ok(request)),
    };
    if let Some(session) = session {
        let mut owner: Option<String> = ask(shared, Request::SessionOwner { session }).await?;
        if owner.is_none() {
            // A finished session that left memory is in the store's finished table.
            owner = match read_store(shared, move |store| store.finished_session(session)).await? {
                Ok(info) => info.map(|i| crate::core::owner_name(&i.owner).to_string()),
                Err(e) => return Ok(Err(e)),
            };
        }
        if principal.admin && owner.is_some() {
            return Ok(Ok(request));
        }
        return Ok(match owner {
            // Answered here, for every request: a submit stream opened on a session that
            // does not exist yet must not be accepted once another user creates it.
            None => Err(ApiError::new(
                ErrorKind::NotFound,
                crate::core::unknown_session(session),
            )),
            Some(owner) if owner == principal.name => Ok(request),
            Some(_) => Err(denied(format!(
                "session {session} belongs to another user; only its owner or an admin may \
                 see its tasks and logs, or close or cancel it"
            ))),
        });
    }
    if let ClientRequest::CreateSession(mut spec) = request {
        if !spec.owner.is_empty() && spec.owner != principal.name && !principal.admin {
            return Ok(Err(denied(format!(
                "user `{}` cannot create sessions for owner `{}`; only admins act for others",
                principal.name, spec.owner
            ))));
        }
        if spec.owner.is_empty() {
            spec.owner = principal.name.clone();
        }
        return Ok(Ok(ClientRequest::CreateSession(spec)));
    }
    // `access` names an owner to check for session creations only: anything else that
    // gets here is refused, not let through.
    Ok(Err(denied(
        "this request names no owner to check".to_string(),
    )))
}

/// An object request for the owner it names: users their own (an empty owner is the
/// caller, filled in here), admins anyone's. The refusal depends on the name alone.
pub(super) fn object_owner(
    principal: &Principal,
    mut request: ClientRequest,
) -> Result<ClientRequest, ApiError> {
    let owner = match &mut request {
        ClientRequest::PutObjects { owner, .. }
        | ClientRequest::LocateObjects { owner, .. }
        | ClientRequest::ListObjects { owner, .. }
        | ClientRequest::RemoveObjects { owner, .. } => owner,
        _ => return Err(denied("this request names no object owner".to_string())),
    };
    if owner.is_empty() {
        *owner = principal.name.clone();
    } else if *owner != principal.name && !principal.admin {
        return Err(denied(format!(
            "user `{}` cannot use objects of owner `{owner}`; only admins act for others",
            principal.name
        )));
    }
    Ok(request)
}

/// Token management and `WhoAmI`, answered here: tokens live in the server's book, not the
/// core. The caller is an admin (checked by [`authorize`]) except for `WhoAmI`.
pub(super) async fn token_request(
    shared: &Arc<Shared>,
    caller: &Caller,
    request: ClientRequest,
) -> ClientResponse {
    let unavailable = |e: String| ClientResponse::Error(ApiError::new(ErrorKind::Unavailable, e));
    match request {
        ClientRequest::WhoAmI => match caller {
            Caller::User(p) => ClientResponse::Principal(p.clone()),
            Caller::Job(job) => ClientResponse::Principal(Principal {
                name: format!("job {job}"),
                admin: false,
            }),
        },
        ClientRequest::ListTokens => ClientResponse::Tokens(shared.tokens().list()),
        ClientRequest::CreateToken {
            kind,
            ttl_ms,
            uses_max,
            replace,
        } => {
            let limits = TokenLimits {
                ttl_ms,
                uses_max,
                replace,
            };
            let made = shared.tokens().create(kind, limits, now_ms());
            let (text, info, stored) = match made {
                Ok(made) => made,
                Err(e) => {
                    return ClientResponse::Error(ApiError::new(
                        ErrorKind::InvalidArgument,
                        e.to_string(),
                    ))
                }
            };
            let store = shared.store.clone();
            let id = info.id.clone();
            let written = tokio::task::spawn_blocking(move || store.put_token(&id, &stored)).await;
            match written {
                Ok(Ok(())) => {
                    tracing::info!(token = %info.id, kind = ?info.kind, "token created");
                    ClientResponse::TokenCreated { token: text, info }
                }
                Ok(Err(e)) => {
                    // Not durable: not usable either.
                    shared.tokens().revoke(&info.id);
                    unavailable(format!("cannot store the token: {e}"))
                }
                Err(_) => unavailable("the head is shutting down".into()),
            }
        }
        ClientRequest::RevokeToken { id } => {
            let Some(stored) = shared.tokens().revoke(&id) else {
                return ClientResponse::Error(ApiError::new(
                    ErrorKind::NotFound,
                    format!("no token with id `{id}`; `flame-head token list` shows them"),
                ));
            };
            let store = shared.store.clone();
            let key = id.clone();
            let written = tokio::task::spawn_blocking(move || store.put_token(&key, &stored)).await;
            match written {
                Ok(Ok(())) => {
                    let conns = shared.token_conns().remove(&id).unwrap_or_default();
                    for conn in conns {
                        close_with(
                            &conn,
                            CLOSE_REVOKED,
                            &format!("token {id} has been revoked"),
                        );
                    }
                    tracing::info!(token = %id, "token revoked");
                    ClientResponse::Ok
                }
                Ok(Err(e)) => unavailable(format!(
                    "the token is revoked until the head restarts, but storing that failed: {e}"
                )),
                Err(_) => unavailable("the head is shutting down".into()),
            }
        }
        ClientRequest::ListCerts => ClientResponse::Certs(shared.certs().list()),
        ClientRequest::RevokeCert { target } => revoke_cert(shared, target).await,
        other => ClientResponse::Error(ApiError::new(
            ErrorKind::Internal,
            format!("not a token request: {other:?}"),
        )),
    }
}

/// `flame-head cert revoke`: records the revocation durably, then closes the connections
/// made with what it revokes.
pub(super) async fn revoke_cert(shared: &Arc<Shared>, target: CertTarget) -> ClientResponse {
    let unavailable = |e: String| ClientResponse::Error(ApiError::new(ErrorKind::Unavailable, e));
    let known_node = match &target {
        CertTarget::Node(name) if !shared.certs().has_node(name) => {
            let store = shared.store.clone();
            let key = name.clone();
            let registered = tokio::task::spawn_blocking(move || store.node_registered(&key)).await;
            match registered {
                Ok(Ok(registered)) => registered || shared.node_connection(name).is_some(),
                Ok(Err(e)) => return unavailable(format!("cannot read the node records: {e}")),
                Err(_) => return unavailable("the head is shutting down".into()),
            }
        }
        _ => false,
    };
    let what = format!("{target:?}");
    let previous = match &target {
        CertTarget::Node(name) => shared.certs().node(name),
        _ => None,
    };
    let node = match &target {
        CertTarget::Node(name) => Some(name.clone()),
        _ => None,
    };
    let revoked = shared.certs().revoke(target, known_node, now_ms());
    let (key, record) = match revoked {
        Ok(r) => r,
        Err(e @ crate::certs::CertError::UnknownNode(_)) => {
            return ClientResponse::Error(ApiError::new(ErrorKind::NotFound, e.to_string()))
        }
        Err(e) => {
            return ClientResponse::Error(ApiError::new(ErrorKind::InvalidArgument, e.to_string()))
        }
    };
    let store = shared.store.clone();
    let written = tokio::task::spawn_blocking(move || store.put_cert_record(&key, &record)).await;
    match written {
        Ok(Ok(())) => {
            shared.close_revoked_certs();
            tracing::warn!(revoked = %what, "certificate revoked");
            ClientResponse::Ok
        }
        Ok(Err(e)) => {
            // Not durable: a node record goes back as it was, so that the head's memory
            // and the store agree; a revoked serial stays refused until the restart.
            if let Some(name) = node {
                shared.certs().restore_node(&name, previous);
            }
            // What is still refused in memory is refused on the open connections too.
            shared.close_revoked_certs();
            unavailable(format!("storing the revocation failed: {e}"))
        }
        Err(_) => unavailable("the head is shutting down".into()),
    }
}

/// Lists tasks from the core's memory, or from the store once the session has finished.
pub(super) async fn list_tasks(
    shared: &Arc<Shared>,
    session: flame_protocol::SessionId,
    states: Vec<flame_protocol::model::TaskState>,
    after: TaskId,
    limit: u32,
) -> Result<ClientResponse, ConnError> {
    let answer = ask(
        shared,
        Request::ListTasks {
            session,
            states: states.clone(),
            after,
            limit,
        },
    )
    .await?;
    Ok(match answer {
        Err(e) => ClientResponse::Error(e),
        Ok(Some(tasks)) => ClientResponse::Tasks(tasks),
        Ok(None) => {
            let store = shared.store.clone();
            let limit = (limit as usize).min(limits::MESSAGE_BATCH_MAX);
            let read = tokio::task::spawn_blocking(move || {
                store.list_tasks(session, &states, after, limit)
            })
            .await
            .map_err(|_| ConnError::CoreGone)?;
            match read {
                Ok(tasks) => ClientResponse::Tasks(tasks),
                Err(e) => ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the tasks of session {session}: {e}"),
                )),
            }
        }
    })
}

/// Runs a read of the store on a blocking thread; a store error becomes the answer
/// `Unavailable`.
pub(super) async fn read_store<T: Send + 'static>(
    shared: &Shared,
    read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<Result<T, ApiError>, ConnError> {
    let store = shared.store.clone();
    let out = tokio::task::spawn_blocking(move || read(&store))
        .await
        .map_err(|_| ConnError::CoreGone)?;
    Ok(out.map_err(|e| {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("cannot read the head's store: {e}"),
        )
    }))
}

/// Reads the next frame of a stream. Between frames the peer may stay silent for `idle`
/// (`None`: as long as it likes; the connection's keep-alives tell a dead peer); once a
/// frame has begun, a peer that sends nothing more of it for [`FRAME_STALL_TIMEOUT`] is
/// cut off, so a stalled peer cannot hold a half-read frame. Cancel-safe.
pub(super) async fn read_bounded<T: serde::de::DeserializeOwned>(
    reader: &mut Reader,
    idle: Option<Duration>,
) -> Result<Option<T>, ConnError> {
    read_within(reader, idle, FRAME_STALL_TIMEOUT).await
}

/// [`read_bounded`] over any byte stream, with the stall bound given.
pub(super) async fn read_within<T: serde::de::DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    idle: Option<Duration>,
    stall: Duration,
) -> Result<Option<T>, ConnError> {
    let mut progress = reader.progress();
    let mut idle_left = idle;
    loop {
        let wait = match (progress, idle_left) {
            (0, Some(left)) => left.min(stall),
            _ => stall,
        };
        match tokio::time::timeout(wait, reader.read::<T>()).await {
            Ok(frame) => return Ok(frame?),
            Err(_) => {
                let now = reader.progress();
                if now == 0 {
                    if let Some(left) = idle_left.as_mut() {
                        *left = left.saturating_sub(wait);
                        if left.is_zero() {
                            return Err(ConnError::Timeout("the next frame"));
                        }
                    }
                } else if now == progress {
                    return Err(ConnError::Timeout(
                        "the rest of a frame (the peer stalled in the middle of one)",
                    ));
                }
                progress = now;
            }
        }
    }
}

/// The length of the next frame, like [`read_bounded`] but without its body.
pub(super) async fn next_len_bounded(reader: &mut Reader) -> Result<Option<usize>, ConnError> {
    loop {
        match tokio::time::timeout(FRAME_STALL_TIMEOUT, reader.next_len()).await {
            Ok(len) => return Ok(len?),
            // Silence between frames is allowed; a stall inside the length prefix is not.
            Err(_) if reader.progress() == 0 => continue,
            Err(_) => return Err(ConnError::Timeout("the rest of a frame's length")),
        }
    }
}

/// [`Store::settle_refused`] on a blocking thread.
pub(super) async fn settle_refused(
    store: &Store,
    session: SessionId,
    reply: SubmitReply,
) -> SubmitReply {
    if !matches!(&reply, SubmitReply::Rejected { error, .. } if error.kind == ErrorKind::FailedPrecondition)
    {
        return reply;
    }
    let store = store.clone();
    let fallback = reply.clone();
    tokio::task::spawn_blocking(move || store.settle_refused(session, reply))
        .await
        .unwrap_or(fallback)
}
