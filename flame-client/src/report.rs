//! `error: ...` / `hint: ...` reporting, for the `flame` command and for programs built on
//! this library that want the same output.
//!
//! Code attaches a hint where it knows what the user should do ([`HintExt::hint`]);
//! otherwise one is derived from the library error in the chain.

use crate::local::LocalError;
use crate::{ClientError, ConfigError};
use flame_protocol::endpoint::EndpointError;
use flame_protocol::model::{ErrorKind, STORAGE_FAULT_MARK};
use flame_protocol::object_transfer::TransferError;
use std::fmt;

/// An error with advice for the user. Displays as the wrapped error, so the message is
/// unchanged; the hint is printed on its own line by [`report`].
#[derive(Debug)]
pub struct Hinted {
    error: anyhow::Error,
    hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only this level; `{:#}` on the outer anyhow error walks `source()` for the rest.
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Attaching hints to results.
pub trait HintExt<T> {
    /// Attaches `hint` to the error, if any.
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> HintExt<T> for Result<T, E> {
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T> {
        self.map_err(|e| {
            anyhow::Error::new(Hinted {
                error: e.into(),
                hint: hint.into(),
            })
        })
    }
}

/// Prints `error: ...` and, when one applies, `hint: ...` to stderr.
pub fn report(err: &anyhow::Error) {
    eprintln!("error: {}", message(err));
    if let Some(hint) = hint_for(err) {
        eprintln!("hint: {hint}");
    }
}

/// The error and its causes joined by `: `, like anyhow's `{:#}`, except that a cause
/// whose text its parent already shows is skipped (an error type that prints its source
/// and also returns it from `source()`).
pub fn message(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

const LOCAL_HINT: &str =
    "`flame local` starts a head and a node on this machine and prints the exports to use";

/// The hint attached to `err`, or one derived from the library error in its chain.
pub fn hint_for(err: &anyhow::Error) -> Option<String> {
    if let Some(h) = err.chain().find_map(|e| e.downcast_ref::<Hinted>()) {
        return Some(h.hint.clone());
    }
    err.chain().find_map(|e| {
        if let Some(e) = e.downcast_ref::<ConfigError>() {
            return config_hint(e);
        }
        if let Some(e) = e.downcast_ref::<ClientError>() {
            return client_hint(e);
        }
        if let Some(e) = e.downcast_ref::<EndpointError>() {
            return endpoint_hint(e);
        }
        if let Some(e) = e.downcast_ref::<LocalError>() {
            return local_hint(e);
        }
        None
    })
}

/// How to get a token, for hints.
const TOKEN_HINT: &str = "get a new token from an admin (`flame-head token create --user NAME`) \
     and pass it with --token-file PATH or FLAME_TOKEN_FILE";

fn config_hint(e: &ConfigError) -> Option<String> {
    match e {
        ConfigError::Missing { .. } => Some(LOCAL_HINT.to_string()),
        ConfigError::TooOpen { path, .. } => Some(format!(
            "chmod 600 {}, or move the token to a file of its own and name it with `token_file`",
            path.display()
        )),
        ConfigError::Token { .. } => Some(format!(
            "a token is one line as `flame-head token create` prints it; {TOKEN_HINT}"
        )),
        ConfigError::TokenFile { .. } => Some(
            "check the path given with --token-file, FLAME_TOKEN_FILE or `token_file`".to_string(),
        ),
        ConfigError::Conflict { .. } | ConfigError::HalfIdentity { .. } => Some(
            "a client uses a token (--token-file, FLAME_TOKEN_FILE, FLAME_TOKEN) or a certificate \
             with its key (--cert and --key, FLAME_CERT and FLAME_KEY), from one place"
                .to_string(),
        ),
        _ => None,
    }
}

fn client_hint(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Connect(e) => endpoint_hint(e),
        ClientError::Token(_) => Some(TOKEN_HINT.to_string()),
        ClientError::NoTrust { .. } => Some(format!(
            "pass --ca-file (the cluster CA, DATA_DIR/tls/ca.crt on the head) or a token ({LOCAL_HINT})"
        )),
        ClientError::Connection { .. } | ClientError::Timeout { .. } => {
            Some("check that flame-head is still running and reachable".to_string())
        }
        ClientError::ObjectTransfer { source, .. } => object_transfer_hint(source),
        ClientError::ObjectMissing { .. } => Some(
            "no copy of the object is left (its node was lost, or it was removed): put it again; \
             an output of a task in an unfinished session is rebuilt by running the task again, \
             so try again in a moment; `flame object list` shows what the head holds"
                .to_string(),
        ),
        ClientError::Protocol { .. } => {
            Some("the head and this client may be different versions; compare `flame --version` with the head's".to_string())
        }
        _ => match e.kind() {
            Some(ErrorKind::Unavailable) if e.to_string().contains(STORAGE_FAULT_MARK) => Some(
                "nothing was changed; the head's operator must fix its storage as the message \
                 says, then send the same request again (the head resumes by itself)"
                    .to_string(),
            ),
            Some(ErrorKind::Unavailable) => Some("try again in a moment".to_string()),
            Some(ErrorKind::QuotaExceeded) => Some(
                "finish, close or cancel some of your sessions (`flame session list`), or ask an \
                 admin to raise the quota named above (head.toml `[quotas]`, per owner \
                 `[quotas.owners.NAME]`)"
                    .to_string(),
            ),
            Some(ErrorKind::PermissionDenied) => Some(
                "ask an admin, or use a token of the session's owner; `flame whoami` shows who you are"
                    .to_string(),
            ),
            _ => None,
        },
    }
}

fn object_transfer_hint(e: &TransferError) -> Option<String> {
    match e {
        TransferError::Connect { .. } => Some(
            "the node's object endpoint must be reachable from this machine at the address the \
             head gave (`flame node list`); check firewalls for its object port (UDP)"
                .to_string(),
        ),
        TransferError::Stalled { .. } => {
            Some("the node or the network is overloaded, or the node stopped; try again".to_string())
        }
        TransferError::Corrupt { .. } => Some(
            "that node's copy is damaged, or the bytes were altered on the way; try again (the \
             head sends readers to another copy)"
                .to_string(),
        ),
        TransferError::Refused { error, .. } if error.message.contains("full") => Some(
            "the nodes' object caches are full of objects in use: end or cancel sessions, \
             remove kept objects (`flame object remove`), or ask the operator for more cache \
             (`flame-node --object-memory`, `--object-disk`)"
                .to_string(),
        ),
        TransferError::Refused { error, .. } if error.message.contains("grant") => {
            Some("the head's permission expired or the head restarted; try again".to_string())
        }
        TransferError::Setup(_) => Some(format!(
            "object transfers trust the same CA as the head connection: check --ca-file or the token ({LOCAL_HINT})"
        )),
        TransferError::Unavailable { attempts, .. } => {
            attempts.last().and_then(object_transfer_hint)
        }
        _ => None,
    }
}

fn endpoint_hint(e: &EndpointError) -> Option<String> {
    match e {
        EndpointError::Pem { .. } => Some(format!(
            "check --ca-file or FLAME_CA_FILE (the cluster CA, DATA_DIR/tls/ca.crt on the head), \
             and --cert/--key if given ({LOCAL_HINT})"
        )),
        EndpointError::Unreachable { reason, .. } if reason.contains("certificate") => Some(
            "the head's certificate is not signed by the CA this client trusts: --ca-file, or the \
             token's CA fingerprint, may belong to another cluster"
                .to_string(),
        ),
        EndpointError::Unreachable { .. } | EndpointError::Resolve { .. } => Some(format!(
            "check that flame-head runs at that address, and --head or FLAME_HEAD ({LOCAL_HINT})"
        )),
        EndpointError::Refused { reason, .. } => Some(refusal_hint(reason)),
        EndpointError::Handshake { .. } => Some(
            "the head and this client may be different versions, or --ca-file names another cluster's CA".to_string(),
        ),
        _ => None,
    }
}

/// What to do about the head's refusal of a hello, from its reason.
fn refusal_hint(reason: &str) -> String {
    if reason.contains("protocol version") {
        "use flame binaries of the head's release; compare `flame --version` with the head's"
            .to_string()
    } else if reason.starts_with("quota exceeded") {
        "close some of your other flame connections (running `flame` commands and programs), \
         or ask an admin to raise the quota named above"
            .to_string()
    } else if reason.contains("no credentials") {
        format!(
            "give a token: --token-file PATH or FLAME_TOKEN_FILE (an admin makes one with \
             `flame-head token create --user NAME`), or a user certificate with --cert and --key; {LOCAL_HINT}"
        )
    } else if reason.contains("token") {
        TOKEN_HINT.to_string()
    } else if reason.contains("certificate") {
        "check --cert and --key: they must be a user certificate signed by this cluster's CA, and its key"
            .to_string()
    } else {
        "the head and this client may be different versions".to_string()
    }
}

fn local_hint(e: &LocalError) -> Option<String> {
    match e {
        LocalError::BinaryNotFound { .. } => {
            Some("build the workspace first: cargo build --release".to_string())
        }
        LocalError::Exited { .. } | LocalError::NotReady { .. } => {
            Some("the log above says why; RUST_LOG=debug makes it say more".to_string())
        }
        LocalError::Command { .. } | LocalError::CommandTimeout { .. } => Some(
            "flame, flame-head and flame-node must be of one release; build them together: cargo build --release"
                .to_string(),
        ),
        _ => None,
    }
}

/// `1234567` as `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn causes_shown_by_their_parent_are_not_repeated() {
        let err = Err::<(), _>(Outer {
            source: std::io::Error::other("disk full"),
        })
        .context("cannot save");
        let Err(err) = err else { return };
        assert_eq!(message(&err), "cannot save: outer: disk full");
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn refusals_get_hints_by_their_reason() {
        let refused = |reason: &str| {
            let err = anyhow::Error::new(ClientError::Connect(EndpointError::Refused {
                addr: "h:1".into(),
                reason: reason.into(),
            }));
            hint_for(&err).unwrap_or_default()
        };
        assert!(refused("token 0102 has been revoked").contains("token create --user"));
        assert!(refused("token 0102 expired 5 s ago").contains("--token-file"));
        assert!(
            refused("no credentials: this head accepts no anonymous clients")
                .contains("--cert and --key")
        );
        assert!(refused("protocol version 9 is not supported").contains("release"));
        assert!(refused(
            "quota exceeded: connections 16 of 16 for owner bob; close connections or ask an \
             admin to raise quotas.connections"
        )
        .contains("close some of your other flame connections"));
        let quota = anyhow::Error::new(ClientError::Api(flame_protocol::model::ApiError::new(
            ErrorKind::QuotaExceeded,
            "quota exceeded: open sessions 64 of 64 for owner bob",
        )));
        assert!(hint_for(&quota)
            .unwrap_or_default()
            .contains("raise the quota"));
        let denied = anyhow::Error::new(ClientError::Api(flame_protocol::model::ApiError::new(
            ErrorKind::PermissionDenied,
            "session 3 belongs to bob",
        )));
        assert!(hint_for(&denied)
            .unwrap_or_default()
            .contains("token of the session's owner"));
    }

    #[test]
    fn hints_are_found_under_context() {
        let err = Err::<(), _>(anyhow::anyhow!("inner"))
            .hint("do this")
            .context("while doing that");
        let Err(err) = err else { return };
        assert_eq!(message(&err), "while doing that: inner");
        assert_eq!(hint_for(&err).as_deref(), Some("do this"));
    }

    #[test]
    fn object_errors_name_the_object_and_get_hints() {
        let id = flame_protocol::object::ObjectId::of(b"x");
        let missing = anyhow::Error::new(ClientError::ObjectMissing {
            id,
            reason: "lost with node n1".into(),
        });
        assert!(message(&missing).contains(&id.to_string()));
        assert!(message(&missing).contains("lost with node n1"));
        assert!(hint_for(&missing)
            .unwrap_or_default()
            .contains("put it again"));
        let unreachable = anyhow::Error::new(ClientError::ObjectTransfer {
            what: format!("reading object {}", id.short()),
            source: Box::new(TransferError::Connect {
                node: "n1".into(),
                addr: "10.0.0.1:7471".into(),
                reason: "timed out".into(),
            }),
        });
        assert!(message(&unreachable).contains("node `n1`"));
        assert!(hint_for(&unreachable)
            .unwrap_or_default()
            .contains("reachable"));
    }
}
