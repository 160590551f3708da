//! A flood of half-open QUIC handshakes from one address, as a peer with no credentials can
//! send: each connection answers the head's Retry (so the head counts it as a connection
//! being set up, and spends a TLS handshake on it), then never answers again. The head
//! holds it until its handshake deadline.
//!
//! Each connection is a sans-IO `quinn_proto` client on a UDP socket of its own: its first
//! Initial goes out, the head's Retry comes back and is handed to it, its second Initial
//! (with the Retry token) goes out, and then one datagram more is read, to tell whether
//! the head went on with the handshake (held) or refused the connection (`CONNECTION_REFUSED`).
//! Nothing more is ever sent: the socket is dropped.
//!
//! The flood runs on a thread of its own that enters a network namespace first, so its
//! packets come from that namespace's address.

use bytes::BytesMut;
use quinn_proto::{ConnectionError, DatagramEvent, Event, TransportErrorCode};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one step waits for the head's answer (its Retry, then its next flight).
pub const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest UDP datagram read.
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// What a flood did.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloodReport {
    /// Connections started.
    pub started: u64,
    /// Connections whose Retry came back and was answered.
    pub validated: u64,
    /// Validated connections the head went on with (now half-open on the head).
    pub held: u64,
    /// Validated connections the head refused (`CONNECTION_REFUSED`).
    pub refused: u64,
    /// Connections that got no answer in time at some step.
    pub unanswered: u64,
}

/// Starts `per_second` half-open connections a second to `head` until `stop` is set or
/// `duration` has passed, from the network namespace `netns` (the thread's own namespace
/// when `None`). Publishes its report on `progress` after each connection; returns the
/// last one, or why it could not run.
pub fn spawn(
    netns: Option<OwnedFd>,
    head: SocketAddr,
    config: quinn_proto::ClientConfig,
    per_second: u32,
    duration: Duration,
    stop: Arc<AtomicBool>,
    progress: tokio::sync::watch::Sender<FloodReport>,
) -> std::thread::JoinHandle<Result<FloodReport, String>> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            crate::netns::enter_thread(ns)
                .map_err(|e| format!("cannot enter the namespace: {e}"))?;
        }
        let interval = Duration::from_secs(1) / per_second.max(1);
        let end = Instant::now() + duration;
        let mut next = Instant::now();
        let mut report = FloodReport::default();
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            report.started += 1;
            match half_open(head, config.clone())? {
                Outcome::Held => {
                    report.validated += 1;
                    report.held += 1;
                }
                Outcome::Refused => {
                    report.validated += 1;
                    report.refused += 1;
                }
                Outcome::Unanswered => report.unanswered += 1,
            }
            progress.send_replace(report);
            // Paced: the next start is one interval after the last planned one.
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(report)
    })
}

/// How one half-open connection went.
enum Outcome {
    Held,
    Refused,
    Unanswered,
}

/// One connection: Initial, Retry, Initial with its token, one datagram read; then silence.
fn half_open(head: SocketAddr, config: quinn_proto::ClientConfig) -> Result<Outcome, String> {
    let bind: SocketAddr = match head {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => ([0u16; 8], 0).into(),
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
    socket
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| format!("cannot set a read timeout: {e}"))?;
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let (handle, mut conn) = endpoint
        .connect(Instant::now(), config, head, "localhost")
        .map_err(|e| format!("cannot start a connection: {e}"))?;
    let mut buf = Vec::new();
    send_all(&socket, &mut conn, &mut buf)?;
    // The Retry.
    if !receive(&socket, &mut endpoint, handle, &mut conn)? {
        return Ok(Outcome::Unanswered);
    }
    send_all(&socket, &mut conn, &mut buf)?;
    // The head's next flight: its handshake, or a refusal.
    if !receive(&socket, &mut endpoint, handle, &mut conn)? {
        return Ok(Outcome::Unanswered);
    }
    while let Some(event) = conn.poll() {
        if let Event::ConnectionLost {
            reason: ConnectionError::ConnectionClosed(close),
        } = event
        {
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED {
                return Ok(Outcome::Refused);
            }
        }
    }
    // Whatever the connection would answer now is never sent.
    Ok(Outcome::Held)
}

/// Sends every datagram the connection has to send now.
fn send_all(
    socket: &UdpSocket,
    conn: &mut quinn_proto::Connection,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    loop {
        buf.clear();
        let Some(transmit) = conn.poll_transmit(Instant::now(), 1, buf) else {
            return Ok(());
        };
        socket
            .send_to(&buf[..transmit.size], transmit.destination)
            .map_err(|e| format!("cannot send to {}: {e}", transmit.destination))?;
    }
}

/// Reads one datagram (at most [`ANSWER_TIMEOUT`]) and hands it to the connection; `false`
/// when none came in time.
fn receive(
    socket: &UdpSocket,
    endpoint: &mut quinn_proto::Endpoint,
    handle: quinn_proto::ConnectionHandle,
    conn: &mut quinn_proto::Connection,
) -> Result<bool, String> {
    let mut data = vec![0u8; DATAGRAM_BYTES_MAX];
    let (len, from) = match socket.recv_from(&mut data) {
        Ok(got) => got,
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            return Ok(false)
        }
        Err(e) => return Err(format!("cannot receive: {e}")),
    };
    data.truncate(len);
    let mut response = Vec::new();
    match endpoint.handle(
        Instant::now(),
        from,
        None,
        None,
        BytesMut::from(&data[..]),
        &mut response,
    ) {
        Some(DatagramEvent::ConnectionEvent(h, event)) if h == handle => {
            conn.handle_event(event);
            Ok(true)
        }
        _ => Ok(false),
    }
}
