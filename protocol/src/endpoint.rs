//! QUIC endpoints with TLS 1.3 and ALPN `flame/1`. There is no plaintext mode.

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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
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
/// `reset_key` should persist across restarts of the same server (the head keeps it in its
/// data directory): a restarted head then answers packets of connections it lost with a
/// valid stateless reset, so nodes and clients learn of the restart at their next packet
/// instead of after the idle timeout, and reconnect at once.
pub fn server(
    addr: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    reset_key: &[u8; RESET_KEY_BYTES],
) -> Result<quinn::Endpoint, EndpointError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
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

/// A QUIC client endpoint that trusts exactly the certificates in `ca_file`.
pub fn client(ca_file: &Path) -> Result<quinn::Endpoint, EndpointError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
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

/// Connects to the head at `addr`, verifies it against the endpoint's CA, and exchanges the
/// hello. Everything, name resolution included, is bounded by `timeout`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: &str,
    role: Role,
    agent: &str,
    timeout: Duration,
) -> Result<Greeted, EndpointError> {
    match tokio::time::timeout(timeout, connect_inner(endpoint, addr, role, agent, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(EndpointError::Unreachable {
            addr: addr.to_string(),
            timeout,
            reason: "timed out".into(),
        }),
    }
}

async fn connect_inner(
    endpoint: &quinn::Endpoint,
    addr: &str,
    role: Role,
    agent: &str,
    timeout: Duration,
) -> Result<Greeted, EndpointError> {
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
        .map_err(|e| unreachable(e.to_string()))?;
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
        HelloReply::Refused { reason } => Err(EndpointError::Refused {
            addr: addr.to_string(),
            reason,
        }),
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

/// Checks a peer's hello; the error is the reason to send back in a refusal.
pub fn check_hello(hello: &Hello, expected: &[Role]) -> Result<(), String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported; this head speaks version {} (peer: {})",
            hello.protocol_version, PROTOCOL_VERSION, hello.agent
        ));
    }
    if !expected.contains(&hello.role) {
        return Err(format!("role {:?} is not accepted here", hello.role));
    }
    Ok(())
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
    fn hello_version_mismatch_is_refused_with_reason() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            role: Role::Client,
            agent: "test".into(),
        };
        let reason = check_hello(&hello, &[Role::Client]).unwrap_err();
        assert!(reason.contains("protocol version"), "{reason}");
    }
}
