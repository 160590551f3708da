//! `flame-head init` and `flame-head token ...`: the commands an operator runs on the head's
//! machine.
//!
//! `init` works on the data directory alone (the head is not running yet). `token`
//! commands talk to the running head, over QUIC like any client, as the admin whose token
//! `init` wrote to `DATA_DIR/admin.token`: the head owns the redb file while it runs, and a
//! token made behind its back would not be known to it anyway.

use crate::auth::{JobCredentials, TokenBook, TokenLimits};
use crate::config::{
    CertCommand, HeadConfig, ListOutput, TokenCommand, NODE_TOKEN_TTL_DEFAULT,
    NODE_TOKEN_USES_DEFAULT,
};
use anyhow::Context;
use flame_protocol::auth::{CertRecord, CertTarget, Secret, TokenInfo, TokenKind};
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{ClientRequest, ClientResponse, Role};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Where `init` writes the first admin token.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// `flame-head init`: the CA, the head's certificate, and an admin token.
pub fn init(config: &HeadConfig, admin_name: &str) -> anyhow::Result<()> {
    crate::prepare_data_dir(&config.data_dir)?;
    if crate::tls::is_initialized(&config.data_dir) {
        anyhow::bail!(
            "{} is already initialised (it has a cluster CA); to start over, stop the head and \
             move the data directory aside. docs/security.md tells how to rotate the CA",
            config.data_dir.display()
        );
    }
    let store = crate::store::Store::open(&config.data_dir)?;
    let sans = crate::sans(config);
    let initialized = crate::tls::init(&config.data_dir, &sans)?;
    let reset_key = crate::tls::ensure_reset_key(&config.data_dir)?;
    let fingerprint = initialized.ca_fingerprint;
    let mut book = TokenBook::new(
        store.load_tokens()?,
        JobCredentials::new(&reset_key, fingerprint),
    );
    let kind = TokenKind::User {
        name: admin_name.to_string(),
        admin: true,
    };
    let (text, info, stored) = book
        .create(kind, TokenLimits::default(), crate::server::now_ms())
        .map_err(anyhow::Error::msg)?;
    store.put_token(&info.id, &stored)?;
    let path = admin_token_path(&config.data_dir);
    write_private(&path, format!("{}\n", text.expose()).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "initialised the cluster in {}\n\
         CA certificate (clients' --ca-file): {}\n\
         CA fingerprint: sha256:{}\n\
         admin token of `{admin_name}` (id {}): {}",
        config.data_dir.display(),
        crate::tls::ca_cert_path(&config.data_dir).display(),
        flame_protocol::auth::hex(&fingerprint),
        info.id,
        path.display()
    );
    Ok(())
}

/// `flame-head user-cert NAME [--admin] --out DIR [--ttl DURATION]`.
pub fn user_cert(
    config: &HeadConfig,
    name: &str,
    admin: bool,
    out: &Path,
    ttl: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    flame_protocol::auth::validate_user_name(name).map_err(anyhow::Error::msg)?;
    let days = match ttl {
        None => crate::tls::USER_CERT_VALIDITY_DAYS,
        Some(ttl) => {
            let days = ttl.as_secs() / 86_400;
            if ttl.as_secs() % 86_400 != 0
                || days == 0
                || days > u64::from(crate::tls::USER_CERT_VALIDITY_DAYS_MAX)
            {
                anyhow::bail!(
                    "--ttl must be whole days, from 1 to {} (e.g. `30d`)",
                    crate::tls::USER_CERT_VALIDITY_DAYS_MAX
                );
            }
            days as u32
        }
    };
    if !crate::tls::is_initialized(&config.data_dir) {
        anyhow::bail!(
            "{} holds no cluster CA: run `flame-head init` first",
            config.data_dir.display()
        );
    }
    let identity = crate::tls::HeadIdentity::load(&config.data_dir, &crate::sans(config))?;
    let (cert_pem, key_pem) = identity.sign_user(name, admin, days)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key_path = out.join(format!("{name}.key"));
    let cert_path = out.join(format!("{name}.crt"));
    let ca_path = out.join("ca.crt");
    write_private(&key_path, key_pem.expose().as_bytes()).with_context(|| {
        format!(
            "cannot write {} (it must not exist yet)",
            key_path.display()
        )
    })?;
    std::fs::write(&cert_path, &cert_pem)
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    std::fs::write(&ca_path, identity.ca_pem())
        .with_context(|| format!("cannot write {}", ca_path.display()))?;
    let der = cert_der(&cert_pem)?;
    println!(
        "certificate for {}user `{name}`: {} (key {}, CA {})\n\
         valid {days} days; serial {} (`flame-head cert revoke SERIAL` withdraws it)",
        if admin { "admin " } else { "" },
        cert_path.display(),
        key_path.display(),
        ca_path.display(),
        flame_protocol::pki::serial_of(&der)?,
    );
    Ok(())
}

/// The DER of the first certificate in a PEM text.
fn cert_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    Ok(der.to_vec())
}

/// `flame-head cert ...`.
pub async fn cert(config: &HeadConfig, command: CertCommand) -> anyhow::Result<()> {
    let request = match &command {
        CertCommand::Revoke {
            serial: Some(serial),
            ..
        } => ClientRequest::RevokeCert {
            target: CertTarget::Serial(serial.clone()),
        },
        CertCommand::Revoke {
            node: Some(node), ..
        } => ClientRequest::RevokeCert {
            target: CertTarget::Node(node.clone()),
        },
        CertCommand::Revoke {
            file: Some(file), ..
        } => {
            let pem = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let der = cert_der(&pem).with_context(|| format!("{}", file.display()))?;
            let holder = flame_protocol::pki::identity_of(&der)
                .map(|who| who.to_string())
                .with_context(|| format!("{} is not a Flame certificate", file.display()))?;
            ClientRequest::RevokeCert {
                target: CertTarget::Certificate {
                    fingerprint: flame_protocol::auth::hex(&flame_protocol::pki::fingerprint(&der)),
                    serial: flame_protocol::pki::serial_of(&der)?,
                    holder,
                },
            }
        }
        CertCommand::Revoke { .. } => anyhow::bail!("say SERIAL, --file CERT or --node NAME"),
        CertCommand::List { .. } => ClientRequest::ListCerts,
    };
    let what = match &request {
        ClientRequest::RevokeCert {
            target: CertTarget::Serial(s),
        } => format!("the certificate with serial {s}"),
        ClientRequest::RevokeCert {
            target: CertTarget::Node(n),
        } => format!("every certificate of node `{n}`"),
        ClientRequest::RevokeCert {
            target: CertTarget::Certificate { serial, holder, .. },
        } => format!("the certificate of {holder} (serial {serial})"),
        _ => String::new(),
    };
    match (command, ask_head(config, request).await?) {
        (_, ClientResponse::Error(e)) => anyhow::bail!("{e}"),
        (CertCommand::Revoke { .. }, ClientResponse::Ok) => {
            println!("revoked {what}; connections made with it were closed")
        }
        (CertCommand::List { output, json }, ClientResponse::Certs(records)) => {
            print_certs(&records, json || output == ListOutput::Json)
        }
        (_, other) => anyhow::bail!("unexpected answer from the head: {other:?}"),
    }
    Ok(())
}

fn print_certs(records: &[CertRecord], json: bool) {
    for record in records {
        let line = match record {
            CertRecord::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            } if json => serde_json::json!({
                "kind": "revoked",
                "serial": serial,
                "fingerprint": fingerprint,
                "holder": holder,
                "revoked_ms": revoked_ms,
            })
            .to_string(),
            CertRecord::Node {
                name,
                fingerprint,
                issued_ms,
                revoked_ms,
            } if json => serde_json::json!({
                "kind": "node",
                "node": name,
                "fingerprint": fingerprint,
                "issued_ms": issued_ms,
                "revoked_ms": revoked_ms,
            })
            .to_string(),
            CertRecord::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            } => format!(
                "revoked  {}  serial {}  sha256 {}  since {}",
                holder.as_deref().unwrap_or("-"),
                serial.as_deref().unwrap_or("-"),
                fingerprint.as_deref().unwrap_or("-"),
                when(*revoked_ms)
            ),
            CertRecord::Node {
                name,
                fingerprint,
                issued_ms,
                revoked_ms,
            } => format!(
                "node     {name}  sha256 {}  {}",
                if fingerprint.is_empty() {
                    "-"
                } else {
                    fingerprint
                },
                match revoked_ms {
                    Some(at) => format!("revoked since {}", when(*at)),
                    None => format!("joined {}", when(*issued_ms)),
                }
            ),
        };
        println!("{line}");
    }
}

/// Writes a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The address to reach a head listening on `listen` from its own machine.
fn local_address(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

/// `flame-head token ...`.
pub async fn token(config: &HeadConfig, command: TokenCommand) -> anyhow::Result<()> {
    let request = match &command {
        TokenCommand::Create {
            node,
            user,
            admin,
            ttl,
            uses,
            replace,
        } => {
            if !*node && (uses.is_some() || replace.is_some()) {
                anyhow::bail!("--uses and --replace are for node join tokens (--node)");
            }
            let kind = match (node, user) {
                (true, _) => TokenKind::Node,
                (false, Some(name)) => TokenKind::User {
                    name: name.clone(),
                    admin: *admin,
                },
                (false, None) => anyhow::bail!(
                    "say what the token is for: --node (joins nodes; with --uses, --replace, --ttl) or --user NAME (a client; with --admin, --ttl)"
                ),
            };
            let ttl = ttl.or((kind == TokenKind::Node).then_some(NODE_TOKEN_TTL_DEFAULT));
            let uses_max = uses.or((kind == TokenKind::Node).then_some(NODE_TOKEN_USES_DEFAULT));
            ClientRequest::CreateToken {
                kind,
                ttl_ms: ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                uses_max,
                replace: replace.clone(),
            }
        }
        TokenCommand::List { .. } => ClientRequest::ListTokens,
        TokenCommand::Revoke { id } => ClientRequest::RevokeToken { id: id.clone() },
    };
    let response = ask_head(config, request).await?;
    match (command, response) {
        (_, ClientResponse::Error(e)) => anyhow::bail!("{e}"),
        (TokenCommand::Create { .. }, ClientResponse::TokenCreated { token, info }) => {
            eprintln!(
                "token {} ({}{}{}); it is shown only this once:",
                info.id,
                describe(&info),
                info.expires_ms
                    .map(|e| format!(", expires {}", when(e)))
                    .unwrap_or_default(),
                info.uses_max
                    .map(|n| format!(", good for {n} use(s)"))
                    .unwrap_or_default()
            );
            println!("{}", token.expose());
        }
        (TokenCommand::List { output, json }, ClientResponse::Tokens(tokens)) => {
            print_tokens(&tokens, json || output == ListOutput::Json)
        }
        (TokenCommand::Revoke { id }, ClientResponse::Ok) => println!("token {id} revoked"),
        (_, other) => anyhow::bail!("unexpected answer from the head: {other:?}"),
    }
    Ok(())
}

fn describe(info: &TokenInfo) -> String {
    match &info.kind {
        TokenKind::Node => match &info.replace {
            Some(name) => format!("joins nodes, may replace `{name}`"),
            None => "joins nodes".into(),
        },
        TokenKind::User { name, admin: true } => format!("admin user `{name}`"),
        TokenKind::User { name, admin: false } => format!("user `{name}`"),
    }
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn print_tokens(tokens: &[TokenInfo], json: bool) {
    if json {
        for t in tokens {
            let (kind, user, admin) = match &t.kind {
                TokenKind::Node => ("node", None, false),
                TokenKind::User { name, admin } => ("user", Some(name.as_str()), *admin),
            };
            let line = serde_json::json!({
                "id": t.id,
                "kind": kind,
                "user": user,
                "admin": admin,
                "created_ms": t.created_ms,
                "expires_ms": t.expires_ms,
                "revoked": t.revoked,
                "uses_max": t.uses_max,
                "uses": t.uses,
                "replace": t.replace,
            });
            println!("{line}");
        }
        return;
    }
    println!(
        "{:<16}  {:<28}  {:<20}  {:<20}  STATE",
        "ID", "KIND", "CREATED", "EXPIRES"
    );
    for t in tokens {
        let state = if t.revoked {
            "revoked"
        } else if t.expires_ms.is_some_and(|e| e <= crate::server::now_ms()) {
            "expired"
        } else if t.uses_max.is_some_and(|max| t.uses >= max) {
            "used up"
        } else {
            "valid"
        };
        println!(
            "{:<16}  {:<28}  {:<20}  {:<20}  {state}",
            t.id,
            describe(t),
            when(t.created_ms),
            t.expires_ms.map_or_else(|| "never".to_string(), when),
        );
    }
}

/// One request to the running head as the admin of `admin.token`.
async fn ask_head(config: &HeadConfig, request: ClientRequest) -> anyhow::Result<ClientResponse> {
    let token_path = admin_token_path(&config.data_dir);
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "cannot read the admin token {} (run `flame-head init` first, as the user the \
             head runs as)",
            token_path.display()
        )
    })?;
    let token = Secret::new(token.trim());
    let ca = crate::tls::ca_cert_path(&config.data_dir);
    let endpoint =
        flame_protocol::endpoint::client(&flame_protocol::endpoint::Trust::CaFile(ca), None)?;
    let addr = local_address(config.listen);
    let agent = format!("flame-head {}", env!("CARGO_PKG_VERSION"));
    let greeted = flame_protocol::endpoint::connect(
        &endpoint,
        &addr,
        Role::Client,
        &agent,
        Some(&token),
        limits::CONNECT_TIMEOUT,
    )
    .await
    .with_context(|| format!("cannot reach the head at {addr}; is it running?"))?;
    let exchange = async {
        let (send, recv) = greeted.connection.open_bi().await?;
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
        writer.write(&request).await?;
        let _ = writer.get_mut().finish();
        let response: ClientResponse = reader.read_required().await?;
        Ok::<_, anyhow::Error>(response)
    };
    let response = tokio::time::timeout(limits::REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the head at {addr} did not answer within {:?}",
                limits::REQUEST_TIMEOUT
            )
        })??;
    greeted.connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_commands_reach_a_wildcard_listener_on_loopback() {
        assert_eq!(
            local_address("0.0.0.0:7470".parse().unwrap()),
            "127.0.0.1:7470"
        );
        assert_eq!(local_address("[::]:9".parse().unwrap()), "[::1]:9");
        assert_eq!(local_address("10.0.0.1:9".parse().unwrap()), "10.0.0.1:9");
    }
}
