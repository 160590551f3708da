//! The connection to the head and its request/response calls.
//!
//! Module arrows go one way: `session` builds on `client` (a [`Session`] holds a [`Client`]
//! and opens its streams through it), never the reverse. The calls that hand out a
//! [`Session`] ([`Client::create_session`], [`Client::session`]) are therefore defined in
//! `session.rs`, in an `impl Client` block of their own; both modules share `error`.
//!
//! [`Session`]: crate::Session

use crate::config::ClientConfig;
use crate::error::{io_error, ClientError};
use flame_protocol::auth::{ParsedToken, Principal, Secret, TokenInfo, TokenKind};
use flame_protocol::endpoint;
use flame_protocol::frame::{FrameError, FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{ClientRequest, ClientResponse, ExecEvent, LogEvent, Role};
use flame_protocol::model::{
    ApplicationInfo, ApplicationSpec, NodeInfo, QueueReport, SessionInfo, TaskInfo, TaskState,
};
use flame_protocol::{ExecutorId, SessionId, TaskId};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long [`Client::close`] waits for the close to reach the head.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Without `follow`, the longest a [`LogStream`] waits for the head's next frame. The head
/// gives up on a silent node after [`limits::REQUEST_TIMEOUT`] and says so; this is longer.
pub const LOG_SILENCE_MAX: Duration = Duration::from_secs(60);

/// The two halves of one request stream, framed.
pub(crate) type FramedStream = (
    FrameWriter<quinn::SendStream>,
    FrameReader<quinn::RecvStream>,
);

/// A connection to the head. Cheap to clone; clones share the connection, and every call
/// opens its own QUIC stream, so calls may run concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // Kept so that the endpoint's socket lives as long as any clone of the client.
    endpoint: quinn::Endpoint,
    /// The live connection; replaced by [`Client::reconnect`] when the head was lost.
    connection: std::sync::Mutex<quinn::Connection>,
    /// Held while reconnecting, so concurrent callers make one new connection, not many.
    reconnecting: tokio::sync::Mutex<()>,
    /// Kept for reconnecting; its `Debug` hides the token.
    config: ClientConfig,
    addr: String,
    head_version: String,
    /// What [`Client::create_session`] puts in a spec that names no owner.
    owner: String,
    /// The object transfer client, made on first use (`objects`).
    objects: std::sync::Mutex<Option<Arc<flame_protocol::object_transfer::ObjectClient>>>,
}

/// How long the client keeps trying to reach a lost head (a restart, a network blip)
/// before it reports the loss.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// First pause between reconnection attempts; doubles up to [`RECONNECT_BACKOFF_MAX`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Client {
    /// Connects to the head named by `config`, verifies its certificate (against
    /// `config.ca_file`, or the CA fingerprint in `config.token`; see
    /// [`ClientConfig::trust`]), and exchanges the hello with the configured credentials,
    /// all within `config.connect_timeout`.
    ///
    /// A head that refuses the credentials (unknown, revoked or expired token, none at all)
    /// gives [`EndpointError::Refused`](flame_protocol::endpoint::EndpointError::Refused)
    /// with its reason.
    pub async fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        let trust = config.trust()?;
        if let Some(token) = &config.token {
            // Checked here too for a configuration built by hand: a malformed token is
            // reported without a round trip, and never sent.
            ParsedToken::parse(token.expose()).map_err(ClientError::Token)?;
        }
        let identity = match &config.identity {
            Some(files) => Some(endpoint::load_identity(&files.cert, &files.key)?),
            None => None,
        };
        let endpoint = endpoint::client(&trust, identity)?;
        let greeted = endpoint::connect(
            &endpoint,
            &config.head,
            Role::Client,
            &agent(),
            config.token.as_ref(),
            config.connect_timeout,
        )
        .await?;
        // Clients do not use the hello stream after the welcome: finish our side and drop
        // theirs. A failure here only means the head already closed it, which is harmless.
        if let Err(e) = greeted.send.into_inner().finish() {
            tracing::debug!("hello stream already closed: {e}");
        }
        drop(greeted.recv);
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                connection: std::sync::Mutex::new(greeted.connection),
                reconnecting: tokio::sync::Mutex::new(()),
                config: config.clone(),
                addr: config.head.clone(),
                head_version: greeted.head_version,
                owner: config.owner.clone().unwrap_or_default(),
                objects: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The current connection.
    pub(crate) fn connection(&self) -> quinn::Connection {
        match self.inner.connection.lock() {
            Ok(c) => c.clone(),
            // A panic while holding this lock cannot leave the connection half-written.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether `conn` is gone (closed, reset or timed out): worth reconnecting.
    pub(crate) fn is_lost(conn: &quinn::Connection) -> bool {
        conn.close_reason().is_some()
    }

    /// Replaces `lost` with a new connection, retrying with backoff for up to
    /// [`RECONNECT_TIMEOUT`]. Returns at once if another caller already replaced it.
    pub(crate) async fn reconnect(&self, lost: &quinn::Connection) -> Result<(), ClientError> {
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        if self.connection().stable_id() != lost.stable_id() {
            return Ok(());
        }
        let config = &self.inner.config;
        let agent = agent();
        let deadline = tokio::time::Instant::now() + RECONNECT_TIMEOUT;
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            match endpoint::connect(
                &self.inner.endpoint,
                &config.head,
                Role::Client,
                &agent,
                config.token.as_ref(),
                config.connect_timeout,
            )
            .await
            {
                Ok(greeted) => {
                    let _ = greeted.send.into_inner().finish();
                    tracing::info!(head = %config.head, "reconnected to the head");
                    match self.inner.connection.lock() {
                        Ok(mut c) => *c = greeted.connection,
                        Err(poisoned) => *poisoned.into_inner() = greeted.connection,
                    }
                    return Ok(());
                }
                // A head that refuses us (a revoked or expired token) will not change its
                // mind.
                Err(e @ endpoint::EndpointError::Refused { .. }) => return Err(e.into()),
                Err(e) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(e.into());
                    }
                    tracing::debug!(head = %config.head, error = %e, "reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    /// The configuration this client connected with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The shared object transfer client, made by `make` the first time.
    pub(crate) fn object_client_with(
        &self,
        make: impl FnOnce() -> Result<Arc<flame_protocol::object_transfer::ObjectClient>, ClientError>,
    ) -> Result<Arc<flame_protocol::object_transfer::ObjectClient>, ClientError> {
        let mut slot = match self.inner.objects.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = slot.as_ref() {
            return Ok(existing.clone());
        }
        let made = make()?;
        *slot = Some(made.clone());
        Ok(made)
    }

    /// The head's address as configured.
    pub fn head_addr(&self) -> &str {
        &self.inner.addr
    }

    /// The version the head reported in its welcome.
    pub fn head_version(&self) -> &str {
        &self.inner.head_version
    }

    /// Registers an application; [`ErrorKind::AlreadyExists`](flame_protocol::model::ErrorKind)
    /// when one with its name is registered.
    pub async fn register_application(
        &self,
        spec: ApplicationSpec,
    ) -> Result<ApplicationInfo, ClientError> {
        let name = spec.name.clone();
        match self
            .request(ClientRequest::RegisterApplication(spec))
            .await?
        {
            ClientResponse::Application(info) => Ok(info),
            // A head that only acknowledges is asked for the stored record.
            ClientResponse::Ok => self.get_application(&name).await,
            other => Err(self.unexpected("request RegisterApplication", &other)),
        }
    }

    /// Replaces a registered application's spec; [`ErrorKind::NotFound`](flame_protocol::model::ErrorKind)
    /// when none has its name. New executors use the new spec.
    pub async fn update_application(
        &self,
        spec: ApplicationSpec,
    ) -> Result<ApplicationInfo, ClientError> {
        let name = spec.name.clone();
        match self.request(ClientRequest::UpdateApplication(spec)).await? {
            ClientResponse::Application(info) => Ok(info),
            ClientResponse::Ok => self.get_application(&name).await,
            other => Err(self.unexpected("request UpdateApplication", &other)),
        }
    }

    /// Every registered application.
    pub async fn list_applications(&self) -> Result<Vec<ApplicationInfo>, ClientError> {
        match self.request(ClientRequest::ListApplications).await? {
            ClientResponse::Applications(apps) => Ok(apps),
            other => Err(self.unexpected("request ListApplications", &other)),
        }
    }

    /// One application by name; [`ErrorKind::NotFound`](flame_protocol::model::ErrorKind)
    /// when there is none.
    pub async fn get_application(&self, name: &str) -> Result<ApplicationInfo, ClientError> {
        let request = ClientRequest::GetApplication {
            name: name.to_string(),
        };
        match self.request(request).await? {
            ClientResponse::Application(info) => Ok(info),
            other => Err(self.unexpected("request GetApplication", &other)),
        }
    }

    /// Removes an application; refused while one of its sessions is unfinished.
    pub async fn remove_application(&self, name: &str) -> Result<(), ClientError> {
        let request = ClientRequest::RemoveApplication {
            name: name.to_string(),
        };
        match self.request(request).await? {
            ClientResponse::Ok | ClientResponse::Application(_) => Ok(()),
            other => Err(self.unexpected("request RemoveApplication", &other)),
        }
    }

    /// The owner [`Client::create_session`] gives a spec that names none:
    /// [`ClientConfig::owner`], or empty when it is not set. An empty owner lets the head
    /// decide: the sessions belong to the authenticated user ([`Client::whoami`]).
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The current state of a session.
    pub async fn get_session(&self, id: SessionId) -> Result<SessionInfo, ClientError> {
        match self.request(ClientRequest::GetSession { id }).await? {
            ClientResponse::Session(info) => Ok(info),
            other => Err(self.unexpected("request GetSession", &other)),
        }
    }

    /// Every session the head knows.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        match self.request(ClientRequest::ListSessions).await? {
            ClientResponse::Sessions(sessions) => Ok(sessions),
            other => Err(self.unexpected("request ListSessions", &other)),
        }
    }

    /// Closes a session: it takes no more tasks and finishes when its tasks do.
    pub async fn close_session(&self, id: SessionId) -> Result<(), ClientError> {
        match self.request(ClientRequest::CloseSession { id }).await? {
            ClientResponse::Ok | ClientResponse::Session(_) => Ok(()),
            other => Err(self.unexpected("request CloseSession", &other)),
        }
    }

    /// Cancels a session: it is closed, and its unfinished tasks end as Cancelled; the
    /// executors running them are stopped.
    pub async fn cancel_session(&self, id: SessionId) -> Result<(), ClientError> {
        match self.request(ClientRequest::CancelSession { id }).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(self.unexpected("request CancelSession", &other)),
        }
    }

    /// Tasks of a session in id order after `after` (use `TaskId(0)` to start), at most
    /// `limit` (the head caps it), only those in `states` unless it is empty. Page through
    /// a session by passing the last id returned as the next `after`.
    pub async fn list_tasks(
        &self,
        session: SessionId,
        states: Vec<TaskState>,
        after: TaskId,
        limit: u32,
    ) -> Result<Vec<TaskInfo>, ClientError> {
        let request = ClientRequest::ListTasks {
            session,
            states,
            after,
            limit,
        };
        match self.request(request).await? {
            ClientResponse::Tasks(tasks) => Ok(tasks),
            other => Err(self.unexpected("request ListTasks", &other)),
        }
    }

    /// The logs of the executors that served `session` (only `executor`'s, when given),
    /// read on their nodes: each executor's from its oldest retained byte. Without
    /// `follow` the stream ends at what the logs hold now; with it, once every executor's
    /// log has closed (the executors ended). [`ErrorKind::NotFound`](flame_protocol::model::ErrorKind)
    /// for an unknown session, or an executor that did not serve it.
    pub async fn logs(
        &self,
        session: SessionId,
        executor: Option<ExecutorId>,
        follow: bool,
    ) -> Result<LogStream, ClientError> {
        let (_conn, (send, recv)) = self
            .open_stream(ClientRequest::Logs {
                session,
                executor,
                follow,
            })
            .await?;
        Ok(LogStream {
            client: self.clone(),
            what: format!("reading the logs of session {session}"),
            _send: send.into_inner(),
            recv,
            follow,
            ended: false,
            failed: false,
        })
    }

    /// Runs `argv` on `node` inside running batch job `job`'s allocation there (the cgroup
    /// and user of one of its ranks), as Open MPI's launcher does for its daemons. The
    /// process is killed when the stream is dropped or the job ends.
    pub async fn job_exec(
        &self,
        job: SessionId,
        node: &str,
        argv: Vec<String>,
    ) -> Result<ExecStream, ClientError> {
        let (_conn, (send, recv)) = self
            .open_stream(ClientRequest::JobExec {
                job,
                node: node.to_string(),
                argv,
            })
            .await?;
        Ok(ExecStream {
            client: self.clone(),
            what: format!("running a command in job {job} on node {node}"),
            _send: send.into_inner(),
            recv,
            done: false,
        })
    }

    /// Every node the head knows.
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        match self.request(ClientRequest::ListNodes).await? {
            ClientResponse::Nodes(nodes) => Ok(nodes),
            other => Err(self.unexpected("request ListNodes", &other)),
        }
    }

    /// Stops placing anything new on node `name`: no launches, no binds; its idle
    /// executors are released and its bound ones finish their sessions' work.
    /// [`ErrorKind::NotFound`](flame_protocol::model::ErrorKind) for a node the head does
    /// not know. Draining a draining node changes nothing.
    pub async fn drain_node(&self, name: &str) -> Result<(), ClientError> {
        let request = ClientRequest::DrainNode {
            name: name.to_string(),
        };
        match self.request(request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(self.unexpected("request DrainNode", &other)),
        }
    }

    /// Ends the drain of node `name`: it takes new executors again.
    /// [`ErrorKind::NotFound`](flame_protocol::model::ErrorKind) for a node the head does
    /// not know.
    pub async fn undrain_node(&self, name: &str) -> Result<(), ClientError> {
        let request = ClientRequest::UndrainNode {
            name: name.to_string(),
        };
        match self.request(request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(self.unexpected("request UndrainNode", &other)),
        }
    }

    /// Who the head takes this connection to be: the token's or certificate's user, and
    /// whether an admin.
    pub async fn whoami(&self) -> Result<Principal, ClientError> {
        match self.request(ClientRequest::WhoAmI).await? {
            ClientResponse::Principal(principal) => Ok(principal),
            other => Err(self.unexpected("request WhoAmI", &other)),
        }
    }

    /// Admin only: makes a token of `kind`, valid for `ttl_ms` (`None`: no expiry). The
    /// answer holds its text, which the head shows this once and keeps only a hash of.
    pub async fn create_token(
        &self,
        kind: TokenKind,
        ttl_ms: Option<u64>,
    ) -> Result<(Secret, TokenInfo), ClientError> {
        // Node join tokens are single-use unless told otherwise, as on the command line.
        let uses_max = (kind == TokenKind::Node).then_some(1);
        match self
            .request(ClientRequest::CreateToken {
                kind,
                ttl_ms,
                uses_max,
                replace: None,
            })
            .await?
        {
            ClientResponse::TokenCreated { token, info } => Ok((token, info)),
            other => Err(self.unexpected("request CreateToken", &other)),
        }
    }

    /// Admin only: every token the head knows, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        match self.request(ClientRequest::ListTokens).await? {
            ClientResponse::Tokens(tokens) => Ok(tokens),
            other => Err(self.unexpected("request ListTokens", &other)),
        }
    }

    /// Admin only: revokes the token `id`; the head closes the connections it opened.
    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        let request = ClientRequest::RevokeToken { id: id.to_string() };
        match self.request(request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(self.unexpected("request RevokeToken", &other)),
        }
    }

    /// How the head shares executors now: per owner, its weight and fair share, and per
    /// session, what it deserves, holds and waits for.
    pub async fn queue(&self) -> Result<QueueReport, ClientError> {
        match self.request(ClientRequest::Queue).await? {
            ClientResponse::Queue(report) => Ok(report),
            other => Err(self.unexpected("request Queue", &other)),
        }
    }

    /// Closes the connection for every clone and waits, at most [`CLOSE_TIMEOUT`], for the
    /// head to learn of it, so that it frees the connection's state at once rather than
    /// after its idle timeout.
    pub async fn close(&self) {
        self.connection().close(0u32.into(), b"client done");
        if tokio::time::timeout(CLOSE_TIMEOUT, self.inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("the close did not drain within {CLOSE_TIMEOUT:?}");
        }
    }

    /// One request on its own stream, answered by one response; bounded by
    /// [`limits::REQUEST_TIMEOUT`]. A [`ClientResponse::Error`] becomes [`ClientError::Api`].
    pub(crate) async fn request(
        &self,
        request: ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        // Requests that change nothing, or change it the same way twice, are sent again
        // on a new connection when the head was lost; the others report the loss, since
        // the first copy may have taken effect.
        let repeatable = !matches!(
            request,
            ClientRequest::RegisterApplication(_)
                | ClientRequest::RemoveApplication { .. }
                | ClientRequest::CreateSession(_)
                | ClientRequest::CreateToken { .. }
        );
        let conn = self.connection();
        match self.request_on(&conn, request.clone()).await {
            Err(e) if repeatable && Self::is_lost(&conn) => {
                tracing::debug!(error = %e, "the head was lost; reconnecting to repeat the request");
                self.reconnect(&conn).await?;
                self.request_on(&self.connection(), request).await
            }
            other => other,
        }
    }

    async fn request_on(
        &self,
        conn: &quinn::Connection,
        request: ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        let what = format!("request {}", request_name(&request));
        self.bounded(&what, async {
            let (send, recv) = self.open_bi(conn).await?;
            let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
            writer
                .write(&request)
                .await
                .map_err(|e| self.stream_error(&what, e))?;
            // One request per stream: telling the head that nothing follows lets it free
            // the stream as soon as it has answered.
            writer
                .into_inner()
                .finish()
                .map_err(|e| self.stream_error(&what, io_error(e)))?;
            let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
            let response = reader
                .read_required::<ClientResponse>()
                .await
                .map_err(|e| self.stream_error(&what, e))?;
            match response {
                ClientResponse::Error(e) => Err(ClientError::Api(e)),
                other => Ok(other),
            }
        })
        .await
    }

    /// Opens one of the streaming requests: sends `request`, waits (bounded by
    /// [`limits::REQUEST_TIMEOUT`]) for the head's [`ClientResponse::Ok`], and hands back
    /// both halves with the send side still open.
    pub(crate) async fn open_stream(
        &self,
        request: ClientRequest,
    ) -> Result<(quinn::Connection, FramedStream), ClientError> {
        let conn = self.connection();
        match self.open_stream_on(&conn, request.clone()).await {
            Err(e) if Self::is_lost(&conn) => {
                tracing::debug!(error = %e, "the head was lost; reconnecting to open the stream");
                self.reconnect(&conn).await?;
                let conn = self.connection();
                let stream = self.open_stream_on(&conn, request).await?;
                Ok((conn, stream))
            }
            Err(e) => Err(e),
            Ok(stream) => Ok((conn, stream)),
        }
    }

    async fn open_stream_on(
        &self,
        conn: &quinn::Connection,
        request: ClientRequest,
    ) -> Result<FramedStream, ClientError> {
        let what = format!("request {}", request_name(&request));
        self.bounded(&what, async {
            let (send, recv) = self.open_bi(conn).await?;
            let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
            writer
                .write(&request)
                .await
                .map_err(|e| self.stream_error(&what, e))?;
            let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
            match reader
                .read_required::<ClientResponse>()
                .await
                .map_err(|e| self.stream_error(&what, e))?
            {
                ClientResponse::Ok => Ok((writer, reader)),
                ClientResponse::Error(e) => Err(ClientError::Api(e)),
                other => Err(self.unexpected(&what, &other)),
            }
        })
        .await
    }

    /// Runs `fut`, turning the expiry of [`limits::REQUEST_TIMEOUT`] into
    /// [`ClientError::Timeout`].
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(limits::REQUEST_TIMEOUT, fut).await {
            Ok(result) => result,
            Err(_) => Err(self.timeout_error(what, limits::REQUEST_TIMEOUT)),
        }
    }

    async fn open_bi(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        conn.open_bi()
            .await
            .map_err(|source| ClientError::Connection {
                addr: self.inner.addr.clone(),
                source,
            })
    }

    pub(crate) fn stream_error(&self, what: &str, source: FrameError) -> ClientError {
        ClientError::Stream {
            addr: self.inner.addr.clone(),
            what: what.to_string(),
            source,
        }
    }

    pub(crate) fn timeout_error(&self, what: &str, timeout: Duration) -> ClientError {
        ClientError::Timeout {
            addr: self.inner.addr.clone(),
            what: what.to_string(),
            timeout,
        }
    }

    pub(crate) fn protocol_error(&self, what: &str, detail: String) -> ClientError {
        ClientError::Protocol {
            addr: self.inner.addr.clone(),
            what: what.to_string(),
            detail,
        }
    }

    pub(crate) fn unexpected(&self, what: &str, response: &ClientResponse) -> ClientError {
        self.protocol_error(
            what,
            format!("unexpected answer {}", response_name(response)),
        )
    }
}

/// The frames of a [`Client::logs`] request: [`LogEvent::Chunk`]s of each executor's log in
/// order (several executors' interleaved) and [`LogEvent::Unavailable`] for a node whose
/// logs cannot be read; [`LogStream::next`] returns `None` after the head's
/// [`LogEvent::End`].
///
/// [`LogStream::next`] is cancel-safe. Dropping the stream stops the reading on the head
/// and the nodes. It does not reconnect: after a lost head, ask again.
#[derive(Debug)]
pub struct LogStream {
    client: Client,
    what: String,
    // Held open, not finished, for the life of the stream, like a watch's.
    _send: quinn::SendStream,
    recv: FrameReader<quinn::RecvStream>,
    follow: bool,
    ended: bool,
    failed: bool,
}

impl LogStream {
    /// The next chunk or warning; `None` after [`LogEvent::End`] (see
    /// [`LogStream::is_ended`]) or after an error. Without `follow` each wait is bounded by
    /// [`LOG_SILENCE_MAX`]; with it there is no bound (an executor may be quiet for hours),
    /// and a lost head is detected by the connection's idle timeout.
    pub async fn next(&mut self) -> Option<Result<LogEvent, ClientError>> {
        if self.ended || self.failed {
            return None;
        }
        let frame = if self.follow {
            self.recv.read::<LogEvent>().await
        } else {
            match tokio::time::timeout(LOG_SILENCE_MAX, self.recv.read::<LogEvent>()).await {
                Ok(frame) => frame,
                Err(_) => {
                    self.failed = true;
                    return Some(Err(self.client.timeout_error(&self.what, LOG_SILENCE_MAX)));
                }
            }
        };
        match frame {
            Ok(Some(LogEvent::End)) => {
                self.ended = true;
                None
            }
            Ok(Some(event)) => Some(Ok(event)),
            Ok(None) => {
                self.failed = true;
                Some(Err(self.client.protocol_error(
                    &self.what,
                    "the stream ended before its End frame".to_string(),
                )))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(self.client.stream_error(&self.what, e)))
            }
        }
    }

    /// Whether the head said that nothing more will come.
    pub fn is_ended(&self) -> bool {
        self.ended
    }
}

/// The output and end of a [`Client::job_exec`] command. [`ExecStream::next`] is
/// cancel-safe; dropping the stream kills the process.
#[derive(Debug)]
pub struct ExecStream {
    client: Client,
    what: String,
    // Held open for the life of the stream: finishing it would stop the process.
    _send: quinn::SendStream,
    recv: FrameReader<quinn::RecvStream>,
    done: bool,
}

impl ExecStream {
    /// The next piece of output, or the end ([`ExecEvent::Exited`] or
    /// [`ExecEvent::Failed`], after which `None`). No time bound: a daemon runs as long as
    /// its job; a lost head is detected by the connection's idle timeout.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        if self.done {
            return None;
        }
        let frame = self.recv.read::<ExecEvent>().await;
        match frame {
            Ok(Some(event)) => {
                self.done = matches!(event, ExecEvent::Exited { .. } | ExecEvent::Failed { .. });
                Some(Ok(event))
            }
            Ok(None) => {
                self.done = true;
                Some(Err(self.client.protocol_error(
                    &self.what,
                    "the stream ended before the process did".to_string(),
                )))
            }
            Err(e) => {
                self.done = true;
                Some(Err(self.client.stream_error(&self.what, e)))
            }
        }
    }
}

/// How this client names itself in its hello, for the head's logs.
fn agent() -> String {
    format!("flame-cli {}", env!("CARGO_PKG_VERSION"))
}

fn request_name(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::RegisterApplication(_) => "RegisterApplication",
        ClientRequest::UpdateApplication(_) => "UpdateApplication",
        ClientRequest::Logs { .. } => "Logs",
        ClientRequest::JobExec { .. } => "JobExec",
        ClientRequest::ListApplications => "ListApplications",
        ClientRequest::GetApplication { .. } => "GetApplication",
        ClientRequest::RemoveApplication { .. } => "RemoveApplication",
        ClientRequest::CreateSession(_) => "CreateSession",
        ClientRequest::ListSessions => "ListSessions",
        ClientRequest::GetSession { .. } => "GetSession",
        ClientRequest::CloseSession { .. } => "CloseSession",
        ClientRequest::CancelSession { .. } => "CancelSession",
        ClientRequest::ListTasks { .. } => "ListTasks",
        ClientRequest::ListNodes => "ListNodes",
        ClientRequest::DrainNode { .. } => "DrainNode",
        ClientRequest::UndrainNode { .. } => "UndrainNode",
        ClientRequest::Queue => "Queue",
        ClientRequest::OpenSubmitStream { .. } => "OpenSubmitStream",
        ClientRequest::WatchResults { .. } => "WatchResults",
        ClientRequest::CreateToken { .. } => "CreateToken",
        ClientRequest::ListTokens => "ListTokens",
        ClientRequest::RevokeToken { .. } => "RevokeToken",
        ClientRequest::RevokeCert { .. } => "RevokeCert",
        ClientRequest::ListCerts => "ListCerts",
        ClientRequest::WhoAmI => "WhoAmI",
        ClientRequest::PutObjects { .. } => "PutObjects",
        ClientRequest::LocateObjects { .. } => "LocateObjects",
        ClientRequest::ListObjects { .. } => "ListObjects",
        ClientRequest::RemoveObjects { .. } => "RemoveObjects",
    }
}

fn response_name(response: &ClientResponse) -> &'static str {
    match response {
        ClientResponse::Ok => "Ok",
        ClientResponse::Error(_) => "Error",
        ClientResponse::Application(_) => "Application",
        ClientResponse::Applications(_) => "Applications",
        ClientResponse::Session(_) => "Session",
        ClientResponse::Queue(_) => "Queue",
        ClientResponse::Sessions(_) => "Sessions",
        ClientResponse::Nodes(_) => "Nodes",
        ClientResponse::Tasks(_) => "Tasks",
        ClientResponse::TokenCreated { .. } => "TokenCreated",
        ClientResponse::Tokens(_) => "Tokens",
        ClientResponse::Certs(_) => "Certs",
        ClientResponse::Principal(_) => "Principal",
        ClientResponse::ObjectTargets(_) => "ObjectTargets",
        ClientResponse::ObjectLocations(_) => "ObjectLocations",
        ClientResponse::Objects(_) => "Objects",
    }
}
