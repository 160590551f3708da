//! QUIC endpoints with TLS 1.3 and ALPN `flame/1`. There is no plaintext mode.
//!
//! The head presents its certificate and the cluster CA's ([`server`]). Clients verify it
//! against a CA file, or, before they have one (`flame-node join`), against the CA their
//! token pins by fingerprint ([`Trust`]). Nodes, and users who have one, present a client
//! certificate signed by the cluster CA ([`ClientIdentity`]); the head reads who it names
//! with [`peer_certificate`] and [`crate::pki::identity_of`].
//!
//! Built with the crate's `net` feature only: this is where quinn and rustls come in (see
//! the crate doc).

use crate::auth::{Secret, FINGERPRINT_BYTES};
use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::limits;
use crate::messages::{Hello, HelloReply, LogEvent, Role};
use crate::{ALPN, PROTOCOL_VERSION};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot set up certificate verification: {0}")]
    Verifier(String),
    #[error("the key {key} does not fit the certificate {cert}: {reason}; hint: the two files must come from the same `flame-node join` (or the same issue by the head): join again, or point both flags at a matching pair")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot bind {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot resolve head address `{addr}`: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("could not reach the head at {addr} within {timeout:?}: {reason}")]
    Unreachable {
        addr: String,
        timeout: Duration,
        reason: String,
    },
    #[error("the head at {addr} refused the connection: {reason}")]
    Refused { addr: String, reason: String },
    #[error("handshake with the head at {addr} failed: {cause}")]
    Handshake { addr: String, cause: FrameError },
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The idle timeout is a constant well inside the VarInt range, so this cannot fail.
    if let Ok(idle) = quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(limits::KEEP_ALIVE_INTERVAL));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(limits::STREAMS_PER_CONNECTION_MAX));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Large windows let batches of tasks stream without waiting for flow-control updates.
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

/// The server's transport: as [`transport`], except that a new connection may open one
/// stream (the hello's) and have [`limits::UNAUTHENTICATED_RECEIVE_WINDOW`] bytes in flight
/// until the head has authenticated it and raised both
/// (`Connection::set_max_concurrent_bi_streams`, `Connection::set_receive_window`).
fn server_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(limits::KEEP_ALIVE_INTERVAL));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(
        limits::UNAUTHENTICATED_RECEIVE_WINDOW,
    ));
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, EndpointError> {
    let pem_err = |reason: String| EndpointError::Pem {
        what: "certificates",
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, EndpointError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| EndpointError::Pem {
        what: "private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Bytes of the key stateless resets are derived from.
pub const RESET_KEY_BYTES: usize = 32;

/// A QUIC server endpoint presenting `certs`/`key`.
///
/// `certs` is the chain the server presents: its own certificate first, then the cluster
/// CA's, so that a client pinning the CA by fingerprint ([`Trust::Pinned`]) finds it.
///
/// Client certificates are optional: a client that presents one must chain to
/// `client_ca` (else the handshake fails), and [`peer_certificate`] then gives it; a client
/// that presents none (one with a token) still connects, and the server decides what it
/// may do.
///
/// `reset_key` should persist across restarts of the same server (the head keeps it in its
/// data directory): a restarted head then answers packets of connections it lost with a
/// valid stateless reset, so nodes and clients learn of the restart at their next packet
/// instead of after the idle timeout, and reconnect at once.
pub fn server(
    addr: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    reset_key: &[u8; RESET_KEY_BYTES],
    client_ca: CertificateDer<'static>,
) -> Result<quinn::Endpoint, EndpointError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca)?;
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| EndpointError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(server_transport());
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    // Connection ids must validate across restarts too, or the new process drops the old
    // connections' packets as garbage instead of answering them with a reset.
    let tag = ring::hmac::sign(&reset, b"flame connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|cause| EndpointError::Bind { addr, cause })?;
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|cause| EndpointError::Bind { addr, cause })
}

/// How a client decides that the server is the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The server's chain must lead to one of the certificates in this PEM file (the
    /// cluster CA's, `<head data dir>/tls/ca.crt`).
    CaFile(PathBuf),
    /// The server must present, in its chain, the CA certificate with this SHA-256
    /// fingerprint (from a join token), and its own certificate must be valid under it.
    /// For a node that has no CA file yet.
    Pinned([u8; FINGERPRINT_BYTES]),
}

/// A client's certificate chain and private key, presented to the head (mutual TLS).
/// `Debug` shows the certificates only.
pub struct ClientIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// The certificate chain, the holder's own first.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Reads a client identity: the certificate chain in `cert` (PEM, own certificate first)
/// and the private key in `key` (PEM), and checks that the key is the certificate's.
pub fn load_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, EndpointError> {
    let certs = load_certs(cert)?;
    let private = load_key(key)?;
    // Checked here so that a mismatched pair is reported with both paths, not as a bare
    // TLS configuration error.
    rustls::sign::CertifiedKey::from_der(certs.clone(), private.clone_key(), &provider()).map_err(
        |e| EndpointError::Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        },
    )?;
    Ok(ClientIdentity {
        certs,
        key: private,
    })
}

/// A QUIC client endpoint that verifies the server by `trust`, and presents `identity`
/// when given (nodes, users with certificates); without one, the client authenticates by
/// the token in its hello, if any.
pub fn client(
    trust: &Trust,
    identity: Option<ClientIdentity>,
) -> Result<quinn::Endpoint, EndpointError> {
    let config = client_config(trust, identity)?;
    let bind: SocketAddr = ([0, 0, 0, 0, 0, 0, 0, 0], 0).into();
    let mut endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        // Hosts without IPv6 fall back to an IPv4 socket.
        Err(_) => {
            let bind4: SocketAddr = ([0, 0, 0, 0], 0).into();
            quinn::Endpoint::client(bind4)
                .map_err(|cause| EndpointError::Bind { addr: bind4, cause })?
        }
    };
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The QUIC client configuration of [`client`]: TLS 1.3 verifying the server by `trust`,
/// presenting `identity` when given, Flame's ALPN and transport settings.
pub fn client_config(
    trust: &Trust,
    identity: Option<ClientIdentity>,
) -> Result<quinn::ClientConfig, EndpointError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        Trust::CaFile(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca_file)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Pinned(fingerprint) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                    fingerprint: *fingerprint,
                    provider: provider(),
                }))
        }
    };
    let mut tls = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.certs, identity.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The certificate the peer presented, which TLS verified against the CA the endpoint
/// trusts (for the head: the cluster CA); `None` when it presented none.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// Verifies a server by a CA pinned by fingerprint: the CA certificate is taken from the
/// chain the server presents, and then the server's certificate is verified under it as
/// under any root (name, validity, signatures, key usage).
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; FINGERPRINT_BYTES],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The server's chain lacks the pinned CA.
struct PinMismatch {
    fingerprint: [u8; FINGERPRINT_BYTES],
}

/// The same as `Display`: rustls shows a [`rustls::CertificateError::Other`] by its `Debug`,
/// and that text is what reaches the user.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the head's certificate chain does not hold the CA with fingerprint {}... given by the token; \
             this may be the wrong head (check the address), or a token of another cluster",
            crate::pki::short_fingerprint(&self.fingerprint)
        )
    }
}

impl std::error::Error for PinMismatch {}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let pinned = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|cert| crate::pki::fingerprint(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(PinMismatch {
                        fingerprint: self.fingerprint,
                    })),
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pinned.clone().into_owned())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("cannot trust the pinned CA: {e}")))?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|cert| *cert != pinned)
            .cloned()
            .collect();
        webpki.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `host:port` (or `[v6]:port`, or a bare host) into host and port.
pub fn split_host_port(addr: &str) -> Result<(String, u16), EndpointError> {
    let bad = |reason: &str| EndpointError::Resolve {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse().map_err(|_| bad("the port is not a number"))?;
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            Ok((host.to_string(), port))
        }
        _ if addr.is_empty() => Err(bad("the address is empty")),
        _ => Ok((
            addr.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            crate::DEFAULT_HEAD_PORT,
        )),
    }
}

/// An established, greeted connection to the head.
#[derive(Debug)]
pub struct Greeted {
    pub connection: quinn::Connection,
    /// The hello stream. Clients drop it; nodes keep it as their control stream.
    pub send: FrameWriter<quinn::SendStream>,
    pub recv: FrameReader<quinn::RecvStream>,
    pub head_version: String,
}

/// First pause before connecting again after the head refused a connection for lack of
/// room (QUIC `CONNECTION_REFUSED`: too many connections being set up, from everyone or
/// from one address); the pause doubles up to [`CONNECT_REFUSED_PAUSE_MAX`].
pub const CONNECT_REFUSED_PAUSE_MIN: Duration = Duration::from_millis(50);
/// Longest pause between two attempts after refusals.
pub const CONNECT_REFUSED_PAUSE_MAX: Duration = Duration::from_millis(800);

/// Connects to the head at `addr`, verifies it against the endpoint's CA, and exchanges the
/// hello. Everything, name resolution included, is bounded by `timeout`.
///
/// A head at its limit of connections being set up refuses new ones before any TLS work
/// (QUIC `CONNECTION_REFUSED`): such a refusal is tried again, after pauses from
/// [`CONNECT_REFUSED_PAUSE_MIN`] doubling to [`CONNECT_REFUSED_PAUSE_MAX`], until
/// `timeout` has passed; the error then says how many attempts were refused. Every other
/// failure is final at once. A refusal of the hello ([`EndpointError::Refused`]: the
/// credentials) is not retried either.
///
/// `token` goes in the hello: a user token for [`Role::Client`], a join token for
/// [`Role::Join`], none for a node (its certificate speaks for it).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: &str,
    role: Role,
    agent: &str,
    token: Option<&Secret>,
    timeout: Duration,
) -> Result<Greeted, EndpointError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = CONNECT_REFUSED_PAUSE_MIN;
    let mut refused = 0u32;
    let shown = shown_addr(addr);
    let unreachable = |reason: String| EndpointError::Unreachable {
        addr: shown.clone(),
        timeout,
        reason,
    };
    let busy = |refused: u32| {
        unreachable(format!(
            "the head refused all {refused} attempts: it is busy setting up other \
             connections (at its limit in all, or for this address)"
        ))
    };
    loop {
        let attempt = tokio::time::timeout_at(
            deadline,
            connect_inner(endpoint, addr, role, agent, token, timeout),
        )
        .await;
        match attempt {
            Ok(Ok(greeted)) => return Ok(greeted),
            Ok(Err(Attempt::Failed(EndpointError::Unreachable { reason, .. }))) => {
                return Err(unreachable(reason))
            }
            Ok(Err(Attempt::Failed(e))) => return Err(e),
            Ok(Err(Attempt::Refused)) => {
                refused += 1;
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(busy(refused));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(CONNECT_REFUSED_PAUSE_MAX);
            }
            Err(_) if refused > 0 => return Err(busy(refused)),
            Err(_) => return Err(unreachable("timed out".into())),
        }
    }
}

/// `addr` for messages, with the port named when the text left it to the default
/// (`10.0.0.1 (port 7470, the default)`), so that a user who forgot the port sees which one
/// was tried.
fn shown_addr(addr: &str) -> String {
    match split_host_port(addr) {
        Ok((_, port)) if !addr.ends_with(&format!(":{port}")) => {
            format!("{addr} (port {port}, the default)")
        }
        _ => addr.to_string(),
    }
}

/// How one connection attempt failed.
enum Attempt {
    /// The head refused the connection before its handshake (no room): worth another try.
    Refused,
    Failed(EndpointError),
}

impl From<EndpointError> for Attempt {
    fn from(e: EndpointError) -> Self {
        Attempt::Failed(e)
    }
}

/// Whether the head refused a connection for lack of room (its accept loop's `refuse`).
fn is_refusal(e: &quinn::ConnectionError) -> bool {
    matches!(
        e,
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    )
}

async fn connect_inner(
    endpoint: &quinn::Endpoint,
    addr: &str,
    role: Role,
    agent: &str,
    token: Option<&Secret>,
    timeout: Duration,
) -> Result<Greeted, Attempt> {
    let (host, port) = split_host_port(addr)?;
    let unreachable = |reason: String| EndpointError::Unreachable {
        addr: addr.to_string(),
        timeout,
        reason,
    };
    let sockaddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| EndpointError::Resolve {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| EndpointError::Resolve {
            addr: addr.to_string(),
            reason: "no address found".into(),
        })?;
    // The certificate is checked against the name the user typed (an IP or a DNS name).
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| unreachable(format!("invalid server name `{host}`: {e}")))?;
    let server_name = match server_name {
        ServerName::IpAddress(ip) => std::net::IpAddr::from(ip).to_string(),
        ServerName::DnsName(d) => d.as_ref().to_string(),
        _ => host.clone(),
    };
    // An IPv4 head is reached through the dual-stack socket as a mapped address.
    let target = match (sockaddr, endpoint.local_addr()) {
        (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
            SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (other, _) => other,
    };
    let connection = endpoint
        .connect(target, &server_name)
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| {
            if is_refusal(&e) {
                Attempt::Refused
            } else {
                Attempt::Failed(unreachable(e.to_string()))
            }
        })?;
    let handshake = |cause: FrameError| EndpointError::Handshake {
        addr: addr.to_string(),
        cause,
    };
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut send = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let mut recv = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    send.write(&Hello {
        protocol_version: PROTOCOL_VERSION,
        role,
        agent: agent.to_string(),
        token: token.cloned(),
    })
    .await
    .map_err(handshake)?;
    match recv
        .read_required::<HelloReply>()
        .await
        .map_err(handshake)?
    {
        HelloReply::Welcome { head_version } => Ok(Greeted {
            connection,
            send,
            recv,
            head_version,
        }),
        HelloReply::Refused { reason } => Err(Attempt::Failed(EndpointError::Refused {
            addr: addr.to_string(),
            reason,
        })),
    }
}

/// Writes the log events arriving on `events` to `writer` until every sender is gone, then
/// [`LogEvent::End`], and finishes the stream. Returns early, without error, when the peer
/// stops reading (it went away); the caller then drops whatever feeds `events`.
pub async fn relay_log_events(
    writer: &mut FrameWriter<quinn::SendStream>,
    events: &mut tokio::sync::mpsc::Receiver<LogEvent>,
) -> Result<(), FrameError> {
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => break,
            },
            _ = writer.get_mut().stopped() => return Ok(()),
        };
        writer.write(&event).await?;
    }
    writer.write(&LogEvent::End).await?;
    // A peer that already reset the stream no longer cares.
    let _ = writer.get_mut().finish();
    Ok(())
}

/// Checks the protocol version a peer's hello starts with; the error is the reason to send
/// back in a refusal.
pub fn check_version(version: u32) -> Result<(), String> {
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} is not supported; this head speaks version {PROTOCOL_VERSION}: \
             use flame binaries of the head's release"
        ));
    }
    Ok(())
}

/// Checks a peer's hello; the error is the reason to send back in a refusal.
pub fn check_hello(hello: &Hello, expected: &[Role]) -> Result<(), String> {
    check_version(hello.protocol_version)?;
    if !expected.contains(&hello.role) {
        return Err(format!("role {:?} is not accepted here", hello.role));
    }
    Ok(())
}

/// The parts of a [`ClientIdentity`], for a TLS configuration other than [`client`]'s
/// (a node's object client presents its certificate to other nodes).
impl ClientIdentity {
    /// The certificate chain and a copy of the private key.
    pub fn to_parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.certs.clone(), self.key.clone_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:9").unwrap(),
            ("127.0.0.1".into(), 9)
        );
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(split_host_port("head:80").unwrap(), ("head".into(), 80));
        assert_eq!(
            split_host_port("head").unwrap(),
            ("head".into(), crate::DEFAULT_HEAD_PORT)
        );
        assert!(split_host_port("head:x").is_err());
        assert!(split_host_port("").is_err());
    }

    #[test]
    fn a_defaulted_port_is_named_in_messages() {
        let port = crate::DEFAULT_HEAD_PORT;
        assert_eq!(
            shown_addr("127.0.0.1"),
            format!("127.0.0.1 (port {port}, the default)")
        );
        assert_eq!(shown_addr("head:80"), "head:80");
        assert_eq!(shown_addr("[::1]:9"), "[::1]:9");
    }

    /// A CA, a server certificate for `localhost` and a client certificate, all issued by it.
    struct TestPki {
        ca: CertificateDer<'static>,
        ca_pem: String,
        server_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
        client_pem: String,
        client_key_pem: String,
    }

    fn test_pki() -> TestPki {
        let alg = crate::pki::KEY_ALGORITHM;
        let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut server_params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        let client_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut client_params = rcgen::CertificateParams::default();
        client_params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("urn:flame:node:n1").unwrap(),
        )];
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
        TestPki {
            ca: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
            server_key: PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            client_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// Connects a client with `trust`/`identity` to a fresh server; returns the client's
    /// result and, on success, the client certificate the server saw.
    async fn handshake(
        pki: &TestPki,
        trust: &Trust,
        identity: Option<ClientIdentity>,
    ) -> Result<Option<CertificateDer<'static>>, String> {
        let server = server(
            ([127, 0, 0, 1], 0).into(),
            pki.server_chain.clone(),
            pki.server_key.clone_key(),
            &[7; RESET_KEY_BYTES],
            pki.ca.clone(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await?;
            // Resolves once the server has verified the client's certificate, if any.
            let conn = incoming.await.ok()?;
            Some((peer_certificate(&conn), conn, server))
        });
        let client = client(trust, identity).unwrap();
        let target: SocketAddr = match client.local_addr().unwrap() {
            SocketAddr::V6(_) => {
                (std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), addr.port()).into()
            }
            SocketAddr::V4(_) => addr,
        };
        let result = client.connect(target, "localhost").unwrap().await;
        match result {
            Ok(conn) => {
                let served = tokio::time::timeout(Duration::from_secs(5), accept)
                    .await
                    .map_err(|_| "the server saw no connection".to_string())?
                    .map_err(|e| e.to_string())?;
                conn.close(quinn::VarInt::from_u32(0), b"done");
                let (seen, _conn, _server) = served
                    .ok_or_else(|| "the server's side of the handshake failed".to_string())?;
                Ok(seen)
            }
            Err(e) => {
                accept.abort();
                Err(e.to_string())
            }
        }
    }

    #[tokio::test]
    async fn a_pinned_ca_in_the_chain_is_trusted_and_another_is_not() {
        let pki = test_pki();
        let pinned = Trust::Pinned(crate::pki::fingerprint(&pki.ca));
        assert_eq!(handshake(&pki, &pinned, None).await, Ok(None));
        let wrong = [0x42; FINGERPRINT_BYTES];
        let err = handshake(&pki, &Trust::Pinned(wrong), None)
            .await
            .unwrap_err();
        assert!(
            err.contains("does not hold the CA with fingerprint 4242424242424242"),
            "{err}"
        );
        assert!(err.contains("wrong head"), "{err}");
    }

    #[tokio::test]
    async fn client_certificates_are_optional_and_seen_by_the_server() {
        let pki = test_pki();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let trust = Trust::CaFile(ca_file);
        assert_eq!(handshake(&pki, &trust, None).await, Ok(None));

        let cert = dir.path().join("node.crt");
        let key = dir.path().join("node.key");
        std::fs::write(&cert, &pki.client_pem).unwrap();
        std::fs::write(&key, &pki.client_key_pem).unwrap();
        let identity = load_identity(&cert, &key).unwrap();
        assert!(!format!("{identity:?}").contains("PRIVATE"));
        let seen = handshake(&pki, &trust, Some(identity)).await.unwrap();
        let seen = seen.expect("the server saw the client certificate");
        assert_eq!(
            crate::pki::identity_of(&seen).unwrap(),
            crate::pki::PeerIdentity::Node("n1".into())
        );

        // A certificate of another CA is refused, not ignored.
        let other = test_pki();
        std::fs::write(&cert, &other.client_pem).unwrap();
        std::fs::write(&key, &other.client_key_pem).unwrap();
        let stranger = load_identity(&cert, &key).unwrap();
        assert!(handshake(&pki, &trust, Some(stranger)).await.is_err());
    }

    /// A server that refuses its first `refusals` connections (as the head does when it
    /// is at its limit of connections being set up), then welcomes the next hello.
    fn refusing_server(
        pki: &TestPki,
        refusals: usize,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let server = server(
            ([127, 0, 0, 1], 0).into(),
            pki.server_chain.clone(),
            pki.server_key.clone_key(),
            &[7; RESET_KEY_BYTES],
            pki.ca.clone(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut refused = 0;
            while let Some(incoming) = server.accept().await {
                if refused < refusals {
                    refused += 1;
                    incoming.refuse();
                    continue;
                }
                let Ok(conn) = incoming.await else { continue };
                let Ok((send, recv)) = conn.accept_bi().await else {
                    continue;
                };
                let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
                let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
                if reader.read_required::<Hello>().await.is_ok() {
                    let welcome = HelloReply::Welcome {
                        head_version: "test".into(),
                    };
                    let _ = writer.write(&welcome).await;
                }
                // Keeps the connection until the client is done with it.
                conn.closed().await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_refused_connection_is_tried_again_within_the_timeout() {
        let pki = test_pki();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let trust = Trust::CaFile(ca_file);
        let endpoint = client(&trust, None).unwrap();

        // Refused three times, then welcomed: the fourth attempt gets through.
        let (addr, server) = refusing_server(&pki, 3);
        let head = format!("localhost:{}", addr.port());
        let greeted = connect(
            &endpoint,
            &head,
            Role::Client,
            "test",
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(greeted.head_version, "test");
        greeted
            .connection
            .close(quinn::VarInt::from_u32(0), b"done");
        server.abort();

        // Refused every time: the error comes at the timeout and says what happened.
        let (addr, server) = refusing_server(&pki, usize::MAX);
        let head = format!("localhost:{}", addr.port());
        let timeout = Duration::from_secs(1);
        let err = connect(&endpoint, &head, Role::Client, "test", None, timeout)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, EndpointError::Unreachable { .. }) && text.contains("busy"),
            "{text}"
        );
        // More than the first attempt was made.
        let attempts: u32 = text
            .split("the head refused all ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of attempts: {text}"));
        assert!(attempts >= 2, "{text}");
        server.abort();
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_with_both_paths() {
        let pki = test_pki();
        let other = test_pki();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("node.crt");
        let key = dir.path().join("other.key");
        std::fs::write(&cert, &pki.client_pem).unwrap();
        std::fs::write(&key, &other.client_key_pem).unwrap();
        let err = load_identity(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("node.crt") && err.contains("other.key"),
            "{err}"
        );
    }

    #[test]
    fn hello_version_mismatch_is_refused_with_reason() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            role: Role::Client,
            agent: "test".into(),
            token: None,
        };
        let reason = check_hello(&hello, &[Role::Client]).unwrap_err();
        assert!(reason.contains("protocol version"), "{reason}");
    }
}
