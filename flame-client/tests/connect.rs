//! Connecting without a head: every failure is bounded and names what was tried.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use flame_client::{Client, ClientConfig, ClientError};
use flame_protocol::endpoint::EndpointError;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture_ca() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.crt")
}

#[tokio::test]
async fn unreachable_head_fails_within_the_connect_timeout_naming_the_address() {
    // A bound UDP socket that never answers: QUIC's handshake gets no reply at all, and no
    // other process can take the port while the test runs.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let timeout = Duration::from_secs(1);
    let config = ClientConfig {
        connect_timeout: timeout,
        ..ClientConfig::new(addr.clone(), fixture_ca())
    };
    let started = Instant::now();
    let err = Client::connect(&config).await.unwrap_err();
    let elapsed = started.elapsed();
    let text = err.to_string();
    assert!(
        matches!(err, ClientError::Connect(EndpointError::Unreachable { .. })),
        "{err:?}"
    );
    assert!(text.contains(&addr), "{text}");
    // Bounded by the timeout (with room for a loaded machine), not by QUIC's idle timeout.
    assert!(elapsed < timeout + Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn missing_ca_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("absent.crt");
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(1),
        ..ClientConfig::new("127.0.0.1:9", ca_file.clone())
    };
    let err = Client::connect(&config).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect(EndpointError::Pem { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&ca_file.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_file_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("empty.crt");
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(1),
        ..ClientConfig::new("127.0.0.1:9", ca_file)
    };
    let err = Client::connect(&config).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect(EndpointError::Pem { .. })),
        "{err:?}"
    );
}
