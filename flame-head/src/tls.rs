//! The head's TLS identity and the cluster CA.
//!
//! Layout under `<data-dir>/tls/` (the data directory is mode 0700):
//!
//! ```text
//! ca.crt      the cluster CA certificate: what clients and nodes trust
//! ca.key      its key (0600); signs the head's, the nodes' and users' certificates
//! head.crt    the head's certificate, then the CA's: the chain the head presents
//! head.key    the head's key (0600)
//! reset.key   the key of QUIC stateless resets (0600)
//! ```
//!
//! [`init`] makes the CA and the head's first certificate; `ca.crt` existing is what
//! "initialised" means, and it is written last. [`HeadIdentity::load`] reads it all at
//! every start and issues a new head certificate when the configured names changed, the
//! old one nears its end, or it is not the CA's. Nothing here replaces the CA: that is a
//! deliberate, manual step (docs/security.md, "Rotation"), since every node certificate and
//! token depends on it.

use flame_protocol::auth::{Secret, CSR_PEM_BYTES_MAX, FINGERPRINT_BYTES, NODE_CERT_VALIDITY_DAYS};
use flame_protocol::endpoint::RESET_KEY_BYTES;
use flame_protocol::pki;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Validity of the cluster CA.
pub const CA_VALIDITY_DAYS: i64 = 10 * 365;
/// Validity of a head certificate; it never outlives the CA. The head also issues a new
/// one at start when the old one has less than [`HEAD_CERT_RENEW_DAYS`] left, but it
/// should not depend on being restarted, so this is long.
pub const HEAD_CERT_VALIDITY_DAYS: i64 = 10 * 365;
/// A head certificate with less than this left is replaced at start.
pub const HEAD_CERT_RENEW_DAYS: i64 = 30;
/// Default validity of a user or admin certificate from [`HeadIdentity::sign_user`]
/// (`flame-head user-cert --ttl`): 30 days. A certificate that leaks is good until it
/// expires unless an admin revokes it (`flame-head cert revoke`); a month bounds that
/// window for a revocation that is forgotten, and renewing monthly is a small chore for a
/// person (services should use tokens, which are revoked by id).
pub const USER_CERT_VALIDITY_DAYS: u32 = 30;
/// The longest `--ttl` a user certificate may be given: one year.
pub const USER_CERT_VALIDITY_DAYS_MAX: u32 = 365;
/// Certificates start this long before they are made, so that a peer whose clock is a
/// little behind the head's accepts them.
pub const CLOCK_SKEW_ALLOWANCE_SECS: i64 = 3600;
/// Random bytes of a certificate serial number (RFC 5280 allows up to 20).
const SERIAL_BYTES: usize = 16;
/// Random bytes that tell one cluster's CA name from another's.
const CA_ID_BYTES: usize = 4;

/// What went wrong with the head's TLS files or with signing.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the {what}: {cause}")]
    Generate {
        what: &'static str,
        cause: rcgen::Error,
    },
    #[error("cannot write {path}: {cause}; hint: check that the data directory is writable by the head's user")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot read {path}: {reason}; hint: restore it from a backup of the data directory (a new CA would cut off every node and token, see docs/security.md, \"Rotation\")")]
    Read { path: PathBuf, reason: String },
    #[error(
        "the cluster is already initialised: {path} exists, and a new CA would cut off every node and \
         token; hint: to replace the CA, see docs/security.md, \"Rotation\""
    )]
    AlreadyInitialized { path: PathBuf },
    #[error("the cluster is not initialised: {path} does not exist; hint: initialise it first (`flame-head init`), or point --data-dir at the head's data directory")]
    NotInitialized { path: PathBuf },
    #[error("the CA key {key} does not belong to the CA certificate {cert}; hint: restore both from the same backup of the data directory")]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate signing request is {bytes} bytes; at most {CSR_PEM_BYTES_MAX} are accepted")]
    CsrTooLarge { bytes: usize },
    #[error("the certificate signing request is not valid: {reason}; hint: `flame-node join` makes a valid one")]
    Csr { reason: String },
    #[error(transparent)]
    Name(#[from] pki::PkiError),
    #[error(transparent)]
    Load(#[from] flame_protocol::endpoint::EndpointError),
}

fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// Path of the cluster CA certificate: what clients and nodes trust (`--ca-file`).
pub fn ca_cert_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("ca.crt")
}

fn ca_key_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("ca.key")
}

/// Path of the chain the head presents: its certificate, then the CA's.
pub fn head_cert_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("head.crt")
}

fn head_key_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("head.key")
}

/// Whether the data directory holds a cluster CA.
pub fn is_initialized(data_dir: &Path) -> bool {
    ca_cert_path(data_dir).exists()
}

/// What [`init`] made.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// SHA-256 of the CA certificate's DER: what tokens carry.
    pub ca_fingerprint: [u8; FINGERPRINT_BYTES],
}

/// Makes the cluster CA (ECDSA P-256, [`CA_VALIDITY_DAYS`]) and the head's first
/// certificate for `sans`, in `<data_dir>/tls/`. Refuses when a CA is already there.
pub fn init(data_dir: &Path, sans: &[String]) -> Result<Initialized, TlsError> {
    let ca_cert = ca_cert_path(data_dir);
    if ca_cert.exists() {
        return Err(TlsError::AlreadyInitialized { path: ca_cert });
    }
    let dir = tls_dir(data_dir);
    create_private_dir(&dir)?;
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(pki::KEY_ALGORITHM).map_err(generate("CA key"))?;
    let mut params = CertificateParams::default();
    let mut id = [0u8; CA_ID_BYTES];
    fill_random(&mut id)?;
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CommonName,
        format!("Flame cluster CA {}", flame_protocol::auth::hex(&id)),
    );
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - time::Duration::seconds(CLOCK_SKEW_ALLOWANCE_SECS);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(random_serial()?);
    let ca = params
        .self_signed(&ca_key)
        .map_err(generate("CA certificate"))?;
    let ca_not_after = params.not_after;
    let issuer = Issuer::new(params, ca_key);

    let head_key = KeyPair::generate_for(pki::KEY_ALGORITHM).map_err(generate("head key"))?;
    let head_pem = issue_head_cert(&issuer, ca_not_after, &head_key, sans)?;
    write_file(
        &ca_key_path(data_dir),
        issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &head_key_path(data_dir),
        head_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &head_cert_path(data_dir),
        format!("{head_pem}{}", ca.pem()).as_bytes(),
        0o644,
    )?;
    // Last: its presence is what "initialised" means.
    write_file(&ca_cert, ca.pem().as_bytes(), 0o644)?;
    let ca_fingerprint = pki::fingerprint(ca.der());
    tracing::info!(
        ca = %ca_cert.display(),
        fingerprint = %flame_protocol::auth::hex(&ca_fingerprint),
        "created the cluster CA and the head's certificate"
    );
    Ok(Initialized { ca_fingerprint })
}

/// The head's TLS identity: its certificate chain and key, and the CA that signs for the
/// cluster. `Debug` shows no key.
pub struct HeadIdentity {
    /// The head's certificate, then the CA's.
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    fingerprint: [u8; FINGERPRINT_BYTES],
    ca_not_after: time::OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for HeadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadIdentity")
            .field("certs", &self.certs.len())
            .field("fingerprint", &flame_protocol::auth::hex(&self.fingerprint))
            .field("ca_not_after", &self.ca_not_after)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl HeadIdentity {
    /// Loads the CA and the head's certificate and key from `<data_dir>/tls/`. When the
    /// head's certificate lacks one of `sans`, ends within [`HEAD_CERT_RENEW_DAYS`], is
    /// not the CA's, or does not fit `head.key` (or either file is missing), a new one is
    /// issued and written (with a new key when the key is missing).
    pub fn load(data_dir: &Path, sans: &[String]) -> Result<HeadIdentity, TlsError> {
        let ca_path = ca_cert_path(data_dir);
        if !ca_path.exists() {
            return Err(TlsError::NotInitialized { path: ca_path });
        }
        let ca_key_path = ca_key_path(data_dir);
        let ca_pem = read_text(&ca_path)?;
        let ca_der = flame_protocol::endpoint::load_certs(&ca_path)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::Read {
                path: ca_path.clone(),
                reason: "no certificate in it".into(),
            })?;
        let ca_key = KeyPair::from_pem(&read_text(&ca_key_path)?).map_err(|e| TlsError::Read {
            path: ca_key_path.clone(),
            reason: format!("not a private key: {e}"),
        })?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| TlsError::Read {
            path: ca_path.clone(),
            reason: format!("not a certificate: {e}"),
        })?;
        if ca.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&ca_key) {
            return Err(TlsError::CaKeyMismatch {
                cert: ca_path,
                key: ca_key_path,
            });
        }
        let ca_not_after =
            time::OffsetDateTime::from_unix_timestamp(ca.validity().not_after.timestamp())
                .map_err(|e| TlsError::Read {
                    path: ca_path.clone(),
                    reason: format!("its end of validity is out of range: {e}"),
                })?;
        if ca_not_after
            < time::OffsetDateTime::now_utc() + time::Duration::days(HEAD_CERT_RENEW_DAYS)
        {
            tracing::warn!(
                ca = %ca_path.display(),
                not_after = %ca_not_after,
                "the cluster CA ends within {HEAD_CERT_RENEW_DAYS} days; replace it (docs/security.md, \"Rotation\")"
            );
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| TlsError::Read {
            path: ca_path.clone(),
            reason: format!("cannot sign with it: {e}"),
        })?;

        let head_key_path = head_key_path(data_dir);
        let head_cert_path = head_cert_path(data_dir);
        let head_key = match std::fs::read_to_string(&head_key_path) {
            Ok(text) => KeyPair::from_pem(&text).map_err(|e| TlsError::Read {
                path: head_key_path.clone(),
                reason: format!("not a private key: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key =
                    KeyPair::generate_for(pki::KEY_ALGORITHM).map_err(generate("head key"))?;
                write_file(&head_key_path, key.serialize_pem().as_bytes(), 0o600)?;
                tracing::info!(key = %head_key_path.display(), "created a new head key");
                key
            }
            Err(e) => {
                return Err(TlsError::Read {
                    path: head_key_path,
                    reason: e.to_string(),
                })
            }
        };
        let current = match std::fs::read(&head_cert_path) {
            Ok(_) => flame_protocol::endpoint::load_certs(&head_cert_path)?
                .into_iter()
                .next(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(TlsError::Read {
                    path: head_cert_path,
                    reason: e.to_string(),
                })
            }
        };
        let renew = match &current {
            None => Some("there is none".to_string()),
            Some(der) => head_cert_problem(der, &ca, &head_key, sans),
        };
        let head_der = match (renew, current) {
            (None, Some(der)) => der,
            (reason, _) => {
                let reason = reason.unwrap_or_default();
                let head_pem = issue_head_cert(&issuer, ca_not_after, &head_key, sans)?;
                write_file(
                    &head_cert_path,
                    format!("{head_pem}{ca_pem}").as_bytes(),
                    0o644,
                )?;
                tracing::info!(
                    cert = %head_cert_path.display(),
                    %reason,
                    names = ?sans,
                    "issued a new head certificate"
                );
                flame_protocol::endpoint::load_certs(&head_cert_path)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| TlsError::Read {
                        path: head_cert_path.clone(),
                        reason: "no certificate in it".into(),
                    })?
            }
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(head_key.serialize_der()));
        let fingerprint = pki::fingerprint(&ca_der);
        Ok(HeadIdentity {
            certs: vec![head_der, ca_der.clone()],
            key,
            ca_der,
            ca_pem,
            fingerprint,
            ca_not_after,
            issuer,
        })
    }

    /// The chain the server presents: the head's certificate, then the CA's.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.certs.clone()
    }

    /// The head's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The CA certificate (DER): what client certificates must chain to.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// The CA certificate (PEM), as `ca.crt` holds it: what a joining node is sent.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// SHA-256 of the CA certificate's DER: what tokens carry.
    pub fn fingerprint(&self) -> [u8; FINGERPRINT_BYTES] {
        self.fingerprint
    }

    /// Signs a joining node's certificate signing request (PEM): a certificate for the
    /// request's public key, valid [`NODE_CERT_VALIDITY_DAYS`] days for client
    /// authentication, whose subject common name and identity URI
    /// (`urn:flame:node:<name>`) name the node `name`. Whatever names or extensions the
    /// request asked for are ignored; its signature must verify (proof that the node holds
    /// the key). Returns the certificate as PEM, and its fingerprint.
    pub fn sign_node(
        &self,
        name: &str,
        csr_pem: &str,
    ) -> Result<(String, [u8; FINGERPRINT_BYTES]), TlsError> {
        if csr_pem.len() > CSR_PEM_BYTES_MAX {
            return Err(TlsError::CsrTooLarge {
                bytes: csr_pem.len(),
            });
        }
        let uri = pki::node_uri(name)?;
        // Parsing verifies the request's self-signature.
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::Csr {
                reason: e.to_string(),
            })?;
        let params = self.client_params(name, uri, i64::from(NODE_CERT_VALIDITY_DAYS))?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(generate("node certificate"))?;
        Ok((cert.pem(), pki::fingerprint(cert.der())))
    }

    /// A new key and a client certificate for the user `name` (an admin when `admin`),
    /// valid `days` days (at most [`USER_CERT_VALIDITY_DAYS_MAX`]). Returns
    /// `(cert_pem, key_pem)`.
    pub fn sign_user(
        &self,
        name: &str,
        admin: bool,
        days: u32,
    ) -> Result<(String, Secret), TlsError> {
        let uri = pki::user_uri(name, admin)?;
        let key = KeyPair::generate_for(pki::KEY_ALGORITHM).map_err(generate("user key"))?;
        let days = days.clamp(1, USER_CERT_VALIDITY_DAYS_MAX);
        let params = self.client_params(name, uri, i64::from(days))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("user certificate"))?;
        Ok((cert.pem(), Secret::new(key.serialize_pem())))
    }

    /// Parameters of a client certificate naming `uri`, never outliving the CA.
    fn client_params(
        &self,
        common_name: &str,
        uri: String,
        days: i64,
    ) -> Result<CertificateParams, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name);
        params.distinguished_name = subject;
        let uri = rcgen::string::Ia5String::try_from(uri).map_err(generate("identity URI"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - time::Duration::seconds(CLOCK_SKEW_ALLOWANCE_SECS);
        params.not_after = (now + time::Duration::days(days)).min(self.ca_not_after);
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }
}

/// Why the head certificate `der` must be replaced, or `None` when it is fine.
fn head_cert_problem(
    der: &CertificateDer<'_>,
    ca: &x509_parser::certificate::X509Certificate<'_>,
    key: &KeyPair,
    sans: &[String],
) -> Option<String> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert,
        Err(e) => return Some(format!("the old one cannot be parsed: {e}")),
    };
    if cert.issuer().as_raw() != ca.subject().as_raw()
        || cert.verify_signature(Some(ca.public_key())).is_err()
    {
        return Some("the old one is not the cluster CA's".into());
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key) {
        return Some("the old one is not for the head's key".into());
    }
    let renew_by = time::OffsetDateTime::now_utc() + time::Duration::days(HEAD_CERT_RENEW_DAYS);
    if cert.validity().not_after.timestamp() < renew_by.unix_timestamp() {
        return Some(format!(
            "the old one ends within {HEAD_CERT_RENEW_DAYS} days"
        ));
    }
    let mut dns: Vec<String> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_lowercase()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    let missing: Vec<&str> = sans
        .iter()
        .filter(|san| match san.parse::<IpAddr>() {
            Ok(ip) => !ips.contains(&ip),
            Err(_) => !dns.contains(&san.to_lowercase()),
        })
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!("the old one lacks {}", missing.join(", ")));
    }
    None
}

/// A server certificate for the head's key, for `sans` (IP addresses and DNS names),
/// signed by the CA; PEM.
fn issue_head_cert(
    issuer: &Issuer<'_, KeyPair>,
    ca_not_after: time::OffsetDateTime,
    head_key: &KeyPair,
    sans: &[String],
) -> Result<String, TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(sans.to_vec()).map_err(generate("head names"))?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, "flame-head");
    params.distinguished_name = subject;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::seconds(CLOCK_SKEW_ALLOWANCE_SECS);
    params.not_after = (now + time::Duration::days(HEAD_CERT_VALIDITY_DAYS)).min(ca_not_after);
    params.serial_number = Some(random_serial()?);
    let cert = params
        .signed_by(head_key, issuer)
        .map_err(generate("head certificate"))?;
    Ok(cert.pem())
}

fn generate(what: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |cause| TlsError::Generate { what, cause }
}

fn fill_random(bytes: &mut [u8]) -> Result<(), TlsError> {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes).map_err(|_| {
        TlsError::Generate {
            what: "random bytes",
            cause: rcgen::Error::RingUnspecified,
        }
    })
}

/// A random positive serial number.
fn random_serial() -> Result<rcgen::SerialNumber, TlsError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    fill_random(&mut bytes)?;
    // Positive, and not shortened by a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let write_err = |cause| TlsError::Write {
        path: dir.to_path_buf(),
        cause,
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(write_err)
}

/// Writes `bytes` to `path` with `mode`, through a temporary file renamed into place, so
/// that a crash leaves the old file or the new one, never half of one.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |cause| TlsError::Write {
        path: path.to_path_buf(),
        cause,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_private(&tmp, bytes, mode).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

fn write_private(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
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
            write_private(&path, &key, 0o600).map_err(write_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use flame_protocol::pki::PeerIdentity;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use std::sync::Arc;

    fn sans() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(identity: &HeadIdentity) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.ca_der()).unwrap();
        Arc::new(roots)
    }

    /// Verifies `chain` as a client certificate under the identity's CA.
    fn verify_client(identity: &HeadIdentity, pem: &str) -> Result<(), rustls::Error> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(identity),
            provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn verify_server(identity: &HeadIdentity, name: &str) -> Result<(), rustls::Error> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(identity),
            provider(),
        )
        .build()
        .unwrap();
        let certs = identity.certs();
        verifier
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    fn is_send_sync<T: Send + Sync>() {}

    #[test]
    fn init_makes_a_ca_and_refuses_to_run_twice() {
        is_send_sync::<HeadIdentity>();
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_initialized(dir.path()));
        assert!(matches!(
            HeadIdentity::load(dir.path(), &sans()),
            Err(TlsError::NotInitialized { .. })
        ));
        let made = init(dir.path(), &sans()).unwrap();
        assert!(is_initialized(dir.path()));
        let err = init(dir.path(), &sans()).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyInitialized { .. }), "{err}");
        assert!(err.to_string().contains("Rotation"), "{err}");

        let identity = HeadIdentity::load(dir.path(), &sans()).unwrap();
        assert_eq!(identity.fingerprint(), made.ca_fingerprint);
        assert_eq!(
            identity.ca_der(),
            flame_protocol::endpoint::load_certs(&ca_cert_path(dir.path())).unwrap()[0]
        );
        assert!(!format!("{identity:?}").contains("PRIVATE"));
        for name in ["localhost", "127.0.0.1", "::1"] {
            verify_server(&identity, name).unwrap();
        }
        assert!(verify_server(&identity, "elsewhere.example").is_err());
        // head.crt holds the chain the server presents.
        let chain = flame_protocol::endpoint::load_certs(&head_cert_path(dir.path())).unwrap();
        assert_eq!(chain, identity.certs());
        use std::os::unix::fs::PermissionsExt;
        for key in [ca_key_path(dir.path()), head_key_path(dir.path())] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // The CA is a CA, limited to signing end entities.
        let ca_der = identity.ca_der();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let constraints = ca.basic_constraints().unwrap().unwrap().value;
        assert_eq!(constraints.path_len_constraint, Some(0));
    }

    #[test]
    fn load_keeps_a_good_head_certificate_and_reissues_for_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        let first = HeadIdentity::load(dir.path(), &sans()).unwrap();
        let again = HeadIdentity::load(dir.path(), &sans()).unwrap();
        assert_eq!(first.certs(), again.certs(), "a good certificate is kept");

        let mut more = sans();
        more.push("head.example.org".into());
        more.push("10.1.2.3".into());
        let renewed = HeadIdentity::load(dir.path(), &more).unwrap();
        assert_ne!(renewed.certs()[0], first.certs()[0]);
        assert_eq!(renewed.fingerprint(), first.fingerprint(), "same CA");
        verify_server(&renewed, "head.example.org").unwrap();
        verify_server(&renewed, "10.1.2.3").unwrap();
        verify_server(&renewed, "localhost").unwrap();
        // And it was written: the next load keeps it.
        let kept = HeadIdentity::load(dir.path(), &more).unwrap();
        assert_eq!(kept.certs(), renewed.certs());
    }

    #[test]
    fn load_replaces_a_head_certificate_of_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        // The pre-CA layout: a self-signed head certificate.
        let key = KeyPair::from_pem(&read_text(&head_key_path(dir.path())).unwrap()).unwrap();
        let stray = CertificateParams::new(sans())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(head_cert_path(dir.path()), stray.pem()).unwrap();
        let identity = HeadIdentity::load(dir.path(), &sans()).unwrap();
        assert_ne!(identity.certs()[0], *stray.der());
        verify_server(&identity, "localhost").unwrap();
        // A missing head key gets a new key and certificate.
        std::fs::remove_file(head_key_path(dir.path())).unwrap();
        let rekeyed = HeadIdentity::load(dir.path(), &sans()).unwrap();
        assert_ne!(rekeyed.certs()[0], identity.certs()[0]);
        verify_server(&rekeyed, "localhost").unwrap();
    }

    #[test]
    fn a_ca_key_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        init(other.path(), &sans()).unwrap();
        std::fs::copy(ca_key_path(other.path()), ca_key_path(dir.path())).unwrap();
        let err = HeadIdentity::load(dir.path(), &sans()).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_node_is_signed_for_the_name_given_whatever_the_request_says() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        let identity = HeadIdentity::load(dir.path(), &sans()).unwrap();
        let (csr, _key) = pki::node_csr("impostor").unwrap();
        let (cert_pem, fingerprint) = identity.sign_node("gpu-07", &csr).unwrap();
        verify_client(&identity, &cert_pem).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(
            pki::identity_of(&der).unwrap(),
            PeerIdentity::Node("gpu-07".into())
        );
        assert_eq!(fingerprint, pki::fingerprint(&der));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(cn, vec!["gpu-07".to_string()]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, i64::from(NODE_CERT_VALIDITY_DAYS));
        // A node certificate is no server certificate.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(&identity),
            provider(),
        )
        .build()
        .unwrap();
        assert!(verifier
            .verify_server_cert(
                &der,
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_err());
    }

    #[test]
    fn bad_requests_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        let identity = HeadIdentity::load(dir.path(), &sans()).unwrap();
        let (csr, _) = pki::node_csr("n1").unwrap();
        assert!(matches!(
            identity.sign_node("Not A Name", &csr),
            Err(TlsError::Name(_))
        ));
        assert!(matches!(
            identity.sign_node("n1", "garbage"),
            Err(TlsError::Csr { .. })
        ));
        let big = "x".repeat(CSR_PEM_BYTES_MAX + 1);
        assert!(matches!(
            identity.sign_node("n1", &big),
            Err(TlsError::CsrTooLarge { .. })
        ));
        // A request whose signature does not verify: flip a byte of the signature.
        use rustls::pki_types::pem::PemObject;
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        // The encoder is sound: the request as it was still signs.
        identity
            .sign_node("n1", &pem_encode("CERTIFICATE REQUEST", &der))
            .unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            identity.sign_node("n1", &tampered),
            Err(TlsError::Csr { .. })
        ));
    }

    #[test]
    fn users_get_certificates_naming_them_and_their_role() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &sans()).unwrap();
        let identity = HeadIdentity::load(dir.path(), &sans()).unwrap();
        for admin in [false, true] {
            let (cert_pem, key) = identity.sign_user("alice", admin, 30).unwrap();
            assert!(key.expose().contains("PRIVATE KEY"));
            verify_client(&identity, &cert_pem).unwrap();
            use rustls::pki_types::pem::PemObject;
            let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
            let (not_before, not_after) = pki::validity_unix(&der).unwrap();
            let days = (not_after - not_before - CLOCK_SKEW_ALLOWANCE_SECS) / 86_400;
            assert_eq!(days, 30, "a user certificate lasts its --ttl");
            assert_eq!(
                pki::identity_of(&der).unwrap(),
                PeerIdentity::User {
                    name: "alice".into(),
                    admin
                }
            );
        }
    }

    /// PEM of `der` under `label`, for tests that build damaged objects.
    fn pem_encode(label: &str, der: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let mut pem = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {label}-----\n"));
        pem
    }
}
