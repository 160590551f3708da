//! The head's TLS identity. Until cluster CAs and join tokens land, the head makes a
//! self-signed certificate in its data directory on first start; clients and nodes trust
//! it through a CA file path (`<data-dir>/tls/head.crt`).

use flame_protocol::endpoint::RESET_KEY_BYTES;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] flame_protocol::endpoint::EndpointError),
}

/// Path of the certificate that clients and nodes trust.
pub fn cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("head.crt")
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("head.key")
}

/// Loads the head's certificate and key, creating them on first start with `sans` as the
/// names the certificate is valid for.
pub fn ensure_identity(
    data_dir: &Path,
    sans: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert = cert_path(data_dir);
    let key = key_path(data_dir);
    if !cert.exists() || !key.exists() {
        let dir = data_dir.join("tls");
        let write_err = |path: &Path, cause| TlsError::Write {
            path: path.to_path_buf(),
            cause,
        };
        std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
        let certified = rcgen::generate_simple_self_signed(sans.to_vec())?;
        write_private(&key, certified.signing_key.serialize_pem().as_bytes())
            .map_err(|e| write_err(&key, e))?;
        std::fs::write(&cert, certified.cert.pem()).map_err(|e| write_err(&cert, e))?;
        tracing::info!(cert = %cert.display(), "created a self-signed head certificate");
    }
    let certs = flame_protocol::endpoint::load_certs(&cert)?;
    let key = flame_protocol::endpoint::load_key(&key)?;
    Ok((certs, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The key stateless resets derive from, created once in `<data-dir>/tls/reset.key` and
/// kept, so that a restarted head can reset the connections of its previous life.
pub fn ensure_reset_key(data_dir: &Path) -> Result<[u8; RESET_KEY_BYTES], TlsError> {
    let path = data_dir.join("tls").join("reset.key");
    let write_err = |cause| TlsError::Write {
        path: path.clone(),
        cause,
    };
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|b: Vec<u8>| TlsError::Write {
            path: path.clone(),
            cause: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "holds {} bytes, not {RESET_KEY_BYTES}; remove it to make a new one",
                    b.len()
                ),
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; RESET_KEY_BYTES];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| write_err(std::io::Error::other("the system random source failed")))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(write_err)?;
            }
            write_private(&path, &key).map_err(write_err)?;
            Ok(key)
        }
        Err(e) => Err(write_err(e)),
    }
}

/// Names the certificate covers by default: loopback and this host's name.
pub fn default_sans() -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str() {
            if !h.is_empty() && !sans.iter().any(|s| s == h) {
                sans.push(h.to_string());
            }
        }
    }
    sans
}
