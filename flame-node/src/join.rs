//! `flame-node join`: gets this node a certificate signed by the cluster CA, with a join
//! token.
//!
//! The node makes a key pair (the key never leaves it) and a signing request for its
//! name, connects to the head with TLS pinned to the CA fingerprint the token carries (it
//! has no CA file yet), sends the request, and stores what the head signs:
//!
//! ```text
//! <tls-dir>/node.crt   the node's certificate (urn:flame:node:<name>)
//! <tls-dir>/node.key   its key (0600)
//! <tls-dir>/ca.crt     the cluster CA, trusted for the head from then on
//! ```
//!
//! Joining again overwrites the three files; that is how a node renews its certificate.
//! The token is never printed or logged.

use flame_protocol::auth::{JoinReply, JoinRequest, ParsedToken, Secret, TOKEN_TEXT_BYTES_MAX};
use flame_protocol::endpoint::{self, Trust};
use flame_protocol::limits;
use flame_protocol::messages::Role;
use flame_protocol::pki::{self, PeerIdentity};
use std::path::{Path, PathBuf};

/// Where `join` writes, and the agent reads, the node's certificate, key and CA, unless
/// told otherwise (`--tls-dir`, `tls_dir` in the config file).
pub const DEFAULT_TLS_DIR: &str = "/var/lib/flame/node-tls";
/// File name of the node's certificate in the TLS folder.
pub const CERT_FILE: &str = "node.crt";
/// File name of the node's key in the TLS folder.
pub const KEY_FILE: &str = "node.key";
/// File name of the cluster CA certificate in the TLS folder.
pub const CA_FILE: &str = "ca.crt";
/// The environment variable a join token may come in.
pub const TOKEN_ENV: &str = "FLAME_JOIN_TOKEN";
/// Longest token file read: a token and some white space.
const TOKEN_FILE_BYTES_MAX: u64 = 4 * TOKEN_TEXT_BYTES_MAX as u64;

/// `flame-node join`'s flags.
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// TOML file of the agent (`head`, `name` and `tls_dir` are read from it; flags win)
    #[arg(long, env = "FLAME_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the head, `host:port`
    #[arg(long, env = "FLAME_HEAD")]
    head: Option<String>,
    /// The join token, from `flame-head token create --node`. It shows in the process
    /// list: prefer --token-file, or the FLAME_JOIN_TOKEN environment variable
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the join token
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Name of this node, which its certificate will carry (default: the host name,
    /// lower-cased)
    #[arg(long, env = "FLAME_NODE_NAME")]
    name: Option<String>,
    /// Folder to write node.crt, node.key (0600) and ca.crt to [default: /var/lib/flame/node-tls]
    #[arg(long)]
    tls_dir: Option<PathBuf>,
}

/// Paths of a node's TLS files in `dir`.
pub fn cert_path(dir: &Path) -> PathBuf {
    dir.join(CERT_FILE)
}

/// See [`cert_path`].
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// See [`cert_path`].
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join(CA_FILE)
}

/// Runs `flame-node join`; the error is the message for stderr.
pub fn run(args: JoinArgs) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => crate::config::FileConfig::default(),
    };
    let head = args
        .head
        .or(file.head)
        .ok_or("the head's address is needed: --head HOST:PORT (or `head` in --config)")?;
    let name = args
        .name
        .or(file.name)
        .unwrap_or_else(|| crate::resources::hostname().to_lowercase());
    flame_protocol::model::validate_node_name(&name)
        .map_err(|e| format!("--name: {e}\nhint: give this node a name with --name NAME"))?;
    let tls_dir = args
        .tls_dir
        .or(file.tls_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_DIR));
    let token = read_token(args.token, args.token_file.as_deref())?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let signed = runtime.block_on(request_certificate(&head, &name, &token))?;
    store(&tls_dir, &signed)?;
    println!(
        "joined as {name}; certificate in {}",
        cert_path(&tls_dir).display()
    );
    Ok(())
}

/// The token from `--token`, `--token-file` or the environment, parsed. Errors never
/// quote it.
fn read_token(flag: Option<String>, file: Option<&Path>) -> Result<ParsedToken, String> {
    let hint = "hint: make one on the head with `flame-head token create --node`";
    let (text, from) = match (flag, file) {
        (Some(text), _) => (text, "--token".to_string()),
        (None, Some(path)) => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
            if meta.len() > TOKEN_FILE_BYTES_MAX {
                return Err(format!(
                    "the token file {} is {} bytes; a token file holds one token\n{hint}",
                    path.display(),
                    meta.len()
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
            (text, format!("the token file {}", path.display()))
        }
        (None, None) => match std::env::var(TOKEN_ENV) {
            Ok(text) if !text.trim().is_empty() => (text, TOKEN_ENV.to_string()),
            _ => {
                return Err(format!(
                "a join token is needed: --token-file FILE, {TOKEN_ENV}, or --token TOKEN\n{hint}"
            ))
            }
        },
    };
    ParsedToken::parse(&text).map_err(|e| format!("{from}: {e}\n{hint}"))
}

/// What the head signed.
#[derive(Debug)]
struct Signed {
    cert_pem: String,
    key_pem: Secret,
    ca_pem: String,
}

/// Makes a key and a signing request for `name`, and has the head at `head` sign it.
async fn request_certificate(
    head: &str,
    name: &str,
    token: &ParsedToken,
) -> Result<Signed, String> {
    let (csr_pem, key_pem) = pki::node_csr(name).map_err(|e| e.to_string())?;
    let endpoint =
        endpoint::client(&Trust::Pinned(token.ca_fingerprint), None).map_err(|e| e.to_string())?;
    let agent = format!("flame-node {}", env!("CARGO_PKG_VERSION"));
    let secret = token.to_secret();
    let mut greeted = endpoint::connect(
        &endpoint,
        head,
        Role::Join,
        &agent,
        Some(&secret),
        limits::CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let lost = |e: flame_protocol::frame::FrameError| {
        format!("the head at {head} did not answer the join request: {e}")
    };
    greeted
        .send
        .write(&JoinRequest {
            name: name.to_string(),
            csr_pem,
        })
        .await
        .map_err(lost)?;
    let reply = tokio::time::timeout(
        limits::REQUEST_TIMEOUT,
        greeted.recv.read_required::<JoinReply>(),
    )
    .await
    .map_err(|_| {
        format!(
            "the head at {head} did not answer the join request within {:?}",
            limits::REQUEST_TIMEOUT
        )
    })?
    .map_err(lost)?;
    greeted
        .connection
        .close(quinn::VarInt::from_u32(0), b"joined");
    // Lets the close reach the head; it forgets the connection either way.
    let _ = tokio::time::timeout(limits::CONNECT_TIMEOUT, endpoint.wait_idle()).await;
    match reply {
        JoinReply::Refused { reason } => {
            Err(format!("the head refused to join this node: {reason}"))
        }
        JoinReply::Signed { cert_pem, ca_pem } => {
            check_signed(name, token, &cert_pem, &ca_pem)?;
            Ok(Signed {
                cert_pem,
                key_pem,
                ca_pem,
            })
        }
    }
}

/// Checks that the head sent the token's CA and a certificate naming this node.
fn check_signed(
    name: &str,
    token: &ParsedToken,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| format!("the head sent a CA certificate that cannot be read: {e}"))?;
    if pki::fingerprint(&ca) != token.ca_fingerprint {
        return Err(format!(
            "the head sent a CA certificate with fingerprint {}..., not the token's {}...; \
             nothing was written\nhint: this may be the wrong head, or a token of another cluster",
            pki::short_fingerprint(&pki::fingerprint(&ca)),
            pki::short_fingerprint(&token.ca_fingerprint)
        ));
    }
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("the head sent a certificate that cannot be read: {e}"))?;
    match pki::identity_of(&cert) {
        Ok(PeerIdentity::Node(signed)) if signed == name => Ok(()),
        Ok(other) => Err(format!(
            "the head signed a certificate for {other}, not node {name}; nothing was written"
        )),
        Err(e) => Err(format!(
            "the head sent a certificate that is not usable: {e}"
        )),
    }
}

/// Writes the key, the certificate and the CA into `dir` (made 0700 if new), each through
/// a temporary file, then checks that they load as a pair.
fn store(dir: &Path, signed: &Signed) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the TLS folder {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            format!(
                "cannot make the TLS folder {} private (mode 0700): {e}",
                dir.display()
            )
        })?;
    }
    let files = [
        (key_path(dir), signed.key_pem.expose().as_bytes(), 0o600),
        (cert_path(dir), signed.cert_pem.as_bytes(), 0o644),
        (ca_path(dir), signed.ca_pem.as_bytes(), 0o644),
    ];
    // All written aside first, so that a failure leaves the old files (if any) whole.
    let mut staged = Vec::with_capacity(files.len());
    for (path, bytes, mode) in &files {
        let tmp = tmp_path(path);
        write_file(&tmp, bytes, *mode)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        staged.push((tmp, path));
    }
    endpoint::load_identity(&staged[1].0, &staged[0].0)
        .map_err(|e| format!("the signed certificate is not usable: {e}"))?;
    for (tmp, path) in staged {
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), path.display()))?;
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A stale file from an interrupted join may have a wider mode; `mode` applies only
    // to new files.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The node's identity for the agent: `cert`/`key` (from `join`), and the name its
/// certificate carries. Fails, saying how to join, when the certificate is missing.
pub fn load_node_identity(
    tls_dir: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(endpoint::ClientIdentity, String), String> {
    let join_hint = |missing: &Path| {
        let dir_flag = if tls_dir == Path::new(DEFAULT_TLS_DIR) {
            String::new()
        } else {
            format!(" --tls-dir {}", tls_dir.display())
        };
        format!(
            "this node has no certificate ({}): run `flame-node join --token TOKEN --head ADDR{dir_flag}` first",
            missing.display()
        )
    };
    for path in [cert, key] {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(join_hint(path)),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    let identity = endpoint::load_identity(cert, key).map_err(|e| e.to_string())?;
    if let Some(der) = identity.certs().first() {
        check_validity(cert, der, tls_dir, now_unix())?;
    }
    let name = match identity.certs().first().map(|c| pki::identity_of(c)) {
        Some(Ok(PeerIdentity::Node(name))) => name,
        Some(Ok(other)) => {
            return Err(format!(
                "the certificate {} is for {other}, not a node\nhint: use the certificate `flame-node join` wrote",
                cert.display()
            ))
        }
        Some(Err(e)) => return Err(format!("{}: {e}", cert.display())),
        None => return Err(format!("{}: no certificate in it", cert.display())),
    };
    Ok((identity, name))
}

/// A node certificate with less than this left draws a warning at start.
pub const CERT_RENEW_WARNING_DAYS: i64 = 30;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Refuses an expired certificate (the head would refuse it, with a less helpful TLS
/// error) and warns about one that ends soon.
fn check_validity(path: &Path, der: &[u8], tls_dir: &Path, now: i64) -> Result<(), String> {
    let (_, not_after) = pki::validity_unix(der).map_err(|e| format!("{}: {e}", path.display()))?;
    let join = format!(
        "flame-node join --token TOKEN --head ADDR --tls-dir {}",
        tls_dir.display()
    );
    if not_after <= now {
        return Err(format!(
            "this node's certificate {} has expired\nhint: get a new one with `{join}`",
            path.display()
        ));
    }
    let days_left = (not_after - now) / 86_400;
    if days_left < CERT_RENEW_WARNING_DAYS {
        tracing::warn!(
            cert = %path.display(),
            days_left,
            "this node's certificate ends soon; renew it with `{join}`, then restart the node"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> ParsedToken {
        ParsedToken {
            id: flame_protocol::auth::hex(&[1; 8]),
            secret: [0xab; 32],
            ca_fingerprint: [0x5c; 32],
        }
    }

    #[test]
    fn tokens_come_from_the_flag_or_a_file_and_are_never_quoted() {
        let text = token().to_secret().expose().to_string();
        assert_eq!(read_token(Some(text.clone()), None).unwrap(), token());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("join.token");
        std::fs::write(&file, format!("{text}\n")).unwrap();
        assert_eq!(read_token(None, Some(&file)).unwrap(), token());

        let damaged = text.replacen("flame1.", "flame1.zz", 1);
        std::fs::write(&file, &damaged).unwrap();
        let err = read_token(None, Some(&file)).unwrap_err();
        assert!(err.contains("join.token"), "{err}");
        assert!(!err.contains("abab"), "{err}");
        let err = read_token(Some(damaged), None).unwrap_err();
        assert!(!err.contains("abab"), "{err}");

        std::fs::write(&file, "x".repeat(10_000)).unwrap();
        assert!(read_token(None, Some(&file)).is_err());
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(node_cert_pem("n1").as_bytes())
                .unwrap()
        };
        let (_, not_after) = pki::validity_unix(&der).unwrap();
        let path = Path::new("/t/node.crt");
        check_validity(path, &der, Path::new("/t"), not_after - 1).unwrap();
        let err = check_validity(path, &der, Path::new("/t"), not_after).unwrap_err();
        assert!(err.contains("/t/node.crt has expired"), "{err}");
        assert!(err.contains("flame-node join"), "{err}");
    }

    #[test]
    fn a_missing_certificate_says_how_to_join() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_node_identity(dir.path(), &cert_path(dir.path()), &key_path(dir.path()))
            .unwrap_err();
        assert!(err.contains("this node has no certificate"), "{err}");
        assert!(err.contains("node.crt"), "{err}");
        assert!(
            err.contains("flame-node join --token TOKEN --head ADDR"),
            "{err}"
        );
        assert!(err.contains("--tls-dir"), "{err}");
    }

    /// A self-signed certificate naming the node `name`: enough for the fingerprint and
    /// naming checks `check_signed` makes (signatures are TLS's business).
    fn node_cert_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate_for(pki::KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!("urn:flame:node:{name}")).unwrap(),
        )];
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_head_must_send_the_tokens_ca_and_this_nodes_name() {
        use rustls::pki_types::pem::PemObject;
        let ca_pem = node_cert_pem("stand-in-ca");
        let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
        let mut token = token();
        token.ca_fingerprint = pki::fingerprint(&ca_der);
        let cert_pem = node_cert_pem("n1");
        check_signed("n1", &token, &cert_pem, &ca_pem).unwrap();
        let err = check_signed("n2", &token, &cert_pem, &ca_pem).unwrap_err();
        assert!(err.contains("node n1, not node n2"), "{err}");
        let mut other = token.clone();
        other.ca_fingerprint = [0; 32];
        let err = check_signed("n1", &other, &cert_pem, &ca_pem).unwrap_err();
        assert!(err.contains("wrong head"), "{err}");
    }

    /// A stand-in head: a CA, a server certificate chain [head, CA] for 127.0.0.1, and
    /// a QUIC server on 127.0.0.1 that welcomes one join and answers it with `answer(name, csr)`.
    struct FakeHead {
        addr: String,
        fingerprint: [u8; 32],
        served: tokio::task::JoinHandle<Option<JoinRequest>>,
    }

    fn fake_head(
        answer: fn(&rcgen::Issuer<'static, rcgen::KeyPair>, &JoinRequest, &str) -> JoinReply,
    ) -> FakeHead {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca_key = rcgen::KeyPair::generate_for(pki::KEY_ALGORITHM).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca.pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let head_key = rcgen::KeyPair::generate_for(pki::KEY_ALGORITHM).unwrap();
        let head = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .signed_by(&head_key, &issuer)
            .unwrap();
        let ca_der: CertificateDer<'static> = ca.der().clone();
        let server = endpoint::server(
            ([127, 0, 0, 1], 0).into(),
            vec![head.der().clone(), ca_der.clone()],
            PrivateKeyDer::try_from(head_key.serialize_der()).unwrap(),
            &[1; endpoint::RESET_KEY_BYTES],
            ca_der.clone(),
        )
        .unwrap();
        let port = server.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            use flame_protocol::frame::{FrameReader, FrameWriter};
            use flame_protocol::messages::{Hello, HelloReply};
            let conn = server.accept().await?.await.ok()?;
            let (send, recv) = conn.accept_bi().await.ok()?;
            let mut send = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
            let mut recv = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
            let hello: Hello = recv.read_required().await.ok()?;
            assert_eq!(hello.role, Role::Join);
            assert!(hello.token.is_some());
            send.write(&HelloReply::Welcome {
                head_version: "test".into(),
            })
            .await
            .ok()?;
            let request: JoinRequest = recv.read_required().await.ok()?;
            send.write(&answer(&issuer, &request, &ca_pem)).await.ok()?;
            let _ = send.get_mut().finish();
            conn.closed().await;
            Some(request)
        });
        FakeHead {
            addr: format!("127.0.0.1:{port}"),
            fingerprint: pki::fingerprint(&ca_der),
            served,
        }
    }

    /// Signs as the real head does: for the name asked, whatever the request says.
    fn sign(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        request: &JoinRequest,
        ca_pem: &str,
    ) -> JoinReply {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(pki::node_uri(&request.name).unwrap()).unwrap(),
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        JoinReply::Signed {
            cert_pem: params.signed_by(&csr.public_key, issuer).unwrap().pem(),
            ca_pem: ca_pem.to_string(),
        }
    }

    fn refuse(_: &rcgen::Issuer<'static, rcgen::KeyPair>, _: &JoinRequest, _: &str) -> JoinReply {
        JoinReply::Refused {
            reason: "the token has expired".into(),
        }
    }

    #[tokio::test]
    async fn a_node_joins_through_the_pinned_ca_and_stores_its_files() {
        let head = fake_head(sign);
        let mut token = token();
        token.ca_fingerprint = head.fingerprint;
        let signed = request_certificate(&head.addr, "gpu-07", &token)
            .await
            .unwrap();
        let request = head.served.await.unwrap().unwrap();
        assert_eq!(request.name, "gpu-07");

        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        store(&tls, &signed).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tls), 0o700);
        assert_eq!(mode(&key_path(&tls)), 0o600);
        let (_, name) = load_node_identity(&tls, &cert_path(&tls), &key_path(&tls)).unwrap();
        assert_eq!(name, "gpu-07");
        let ca = endpoint::load_certs(&ca_path(&tls)).unwrap();
        assert_eq!(pki::fingerprint(&ca[0]), head.fingerprint);
        // No temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(&tls)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "node.crt", "node.key"]);
    }

    #[tokio::test]
    async fn a_head_without_the_tokens_ca_gets_no_request() {
        let head = fake_head(sign);
        let err = request_certificate(&head.addr, "gpu-07", &token())
            .await
            .unwrap_err();
        assert!(
            err.contains("does not hold the CA with fingerprint 5c5c5c5c5c5c5c5c"),
            "{err}"
        );
        assert!(err.contains("wrong head"), "{err}");
        head.served.abort();
    }

    #[tokio::test]
    async fn a_refusal_is_reported_with_its_reason() {
        let head = fake_head(refuse);
        let mut token = token();
        token.ca_fingerprint = head.fingerprint;
        let err = request_certificate(&head.addr, "gpu-07", &token)
            .await
            .unwrap_err();
        assert!(
            err.contains("the head refused to join this node: the token has expired"),
            "{err}"
        );
    }
}
