//! Who is connecting: tokens (kept hashed), job credentials, and the checks on them; and
//! who may make which request ([`access`]).
//!
//! Pure code over an in-memory book; the server persists what changes through
//! [`crate::store::Store::put_token`] and loads the book at start.
//!
//! A token's secret is 32 random bytes, so one round of SHA-256 is enough to store it: no
//! dictionary applies, and a slow hash would only slow every connection down. Lookups go by
//! the token id; the digests are compared in constant time.
//!
//! **Job credentials.** A batch job's ranks run `flame-mpi-agent`, which asks the head to
//! start Open MPI's daemons on the job's other nodes. It authenticates with a credential the
//! head derives from the job id and a key of its own (HMAC-SHA256), given to the ranks in
//! `FLAME_JOB_TOKEN`. It is good only for [`flame_protocol::messages::ClientRequest::JobExec`]
//! on that job, and for nothing once the job has ended. Nothing about it is stored: the key
//! is derived from the head's persistent secret, so it survives restarts.
//!
//! **Access.** [`access`] says, for every [`ClientRequest`], who may make it: admins only,
//! the owner of a session (or an admin), the owner a new session names, or any user. It
//! lists every request and has no catch-all arm, so a request added to the protocol does not
//! compile until someone decides who may make it. The server applies the answer
//! (`server::authorize`), looking up the session's owner where it needs one.

use flame_protocol::auth::{
    hex, validate_user_name, ParsedToken, Principal, Secret, TokenInfo, TokenKind,
    FINGERPRINT_BYTES, TOKEN_ID_BYTES, TOKEN_SECRET_BYTES, TOKEN_TTL_MS_MAX, TOKEN_USES_MAX,
};
use flame_protocol::messages::ClientRequest;
use flame_protocol::model::SpecError;
use flame_protocol::SessionId;
use std::collections::BTreeMap;

/// A token as the store keeps it: the digest of its secret, never the secret. Written as a
/// [`crate::store::records::TokenRecord`]. (Tests serialize it directly: that is the layout
/// schema 6 stored before the records existed, which the record reproduces.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize, serde::Deserialize))]
pub struct StoredToken {
    pub kind: TokenKind,
    pub secret_sha256: [u8; 32],
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
    /// How many times it may be used; `None`: without limit. Added in schema 6.
    pub uses_max: Option<u32>,
    /// How many times it has been used (joins, for node join tokens).
    pub uses: u32,
    /// A node join token that may take this existing node's name.
    pub replace: Option<String>,
}

/// How a new token may be used: its lifetime (`None`: no expiry), its uses (`None`:
/// without limit), and the node name a join token may replace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenLimits {
    pub ttl_ms: Option<u64>,
    pub uses_max: Option<u32>,
    pub replace: Option<String>,
}

/// Most tokens the head keeps, revoked ones included (their records stay, so that a
/// revoked token's id is not handed out again and `token list` shows it).
pub const TOKENS_MAX: usize = 100_000;

/// What a presented token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    /// A user (or admin) client; `token` is its id, for closing its connections on revoke.
    User { principal: Principal, token: String },
    /// A node may join with it.
    NodeJoin { token: String },
    /// A batch job's ranks: `JobExec` on this job only.
    Job(SessionId),
}

/// Why a token was refused. The texts go back to the client: they name the token by its
/// id at most, never by its secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Format(#[from] flame_protocol::auth::TokenFormatError),
    #[error("token {id} is unknown to this head (it may belong to another cluster)")]
    Unknown { id: String },
    #[error("token {id} was not issued for this cluster: its CA fingerprint differs")]
    OtherCluster { id: String },
    #[error("token {id} is not valid: its secret does not match")]
    BadSecret { id: String },
    #[error("token {id} has been revoked")]
    Revoked { id: String },
    #[error("token {id} expired {ago_s} s ago")]
    Expired { id: String, ago_s: u64 },
    #[error(
        "token {id} has been used up: it was good for {uses_max} join(s); make a new one with \
         `flame-head token create --node` (`--uses N` for several nodes)"
    )]
    UsedUp { id: String, uses_max: u32 },
}

/// Why a token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("invalid user name: {0}")]
    Name(String),
    #[error("a time to live must be between 1 ms and {} days", TOKEN_TTL_MS_MAX / 86_400_000)]
    Ttl,
    #[error("a number of uses must be between 1 and {TOKEN_USES_MAX}")]
    Uses,
    #[error("only node join tokens can replace a node: `--replace {name}` needs `--node`")]
    ReplaceNeedsNode { name: String },
    #[error("only node join tokens can replace a node: invalid node name: {0}")]
    ReplaceName(#[source] SpecError),
    #[error("the head holds {TOKENS_MAX} tokens already; revoke some or remove old ones")]
    Full,
    #[error("the system random source failed")]
    Random,
}

/// Every token the head knows, by id.
#[derive(Debug)]
pub struct TokenBook {
    tokens: BTreeMap<String, StoredToken>,
    /// Job credentials, and the cluster CA's fingerprint that every token carries.
    jobs: JobCredentials,
}

/// Makes and checks job credentials (see the module notes).
#[derive(Clone)]
pub struct JobCredentials {
    key: [u8; 32],
    ca_fingerprint: [u8; FINGERPRINT_BYTES],
}

impl std::fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobCredentials(<key redacted>)")
    }
}

impl JobCredentials {
    /// Derived from the head's persistent secret key.
    pub fn new(head_secret: &[u8], ca_fingerprint: [u8; FINGERPRINT_BYTES]) -> Self {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, head_secret);
        let tag = ring::hmac::sign(&key, b"flame job credentials");
        let mut job_key = [0u8; 32];
        job_key.copy_from_slice(tag.as_ref());
        JobCredentials {
            key: job_key,
            ca_fingerprint,
        }
    }

    fn secret(&self, job: SessionId) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        // The CA is part of it: a credential never outlives the cluster it was made for.
        let mut message = self.ca_fingerprint.to_vec();
        message.extend_from_slice(&job.0.to_be_bytes());
        let tag = ring::hmac::sign(&key, &message);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The credential a job's ranks get in `FLAME_JOB_TOKEN`.
    pub fn for_job(&self, job: SessionId) -> Secret {
        ParsedToken {
            id: hex(&job.0.to_be_bytes()),
            secret: self.secret(job),
            ca_fingerprint: self.ca_fingerprint,
        }
        .to_secret()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Equal in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenBook {
    /// A book over `tokens` (from the store).
    pub fn new(
        tokens: impl IntoIterator<Item = (String, StoredToken)>,
        jobs: JobCredentials,
    ) -> TokenBook {
        TokenBook {
            tokens: tokens.into_iter().collect(),
            jobs,
        }
    }

    /// Makes a token with fresh random id and secret. Returns its text (to show once),
    /// what lists show, and the record to store.
    pub fn create(
        &mut self,
        kind: TokenKind,
        limits: TokenLimits,
        now_ms: u64,
    ) -> Result<(Secret, TokenInfo, StoredToken), CreateError> {
        let TokenLimits {
            ttl_ms,
            uses_max,
            replace,
        } = limits;
        if let TokenKind::User { name, .. } = &kind {
            validate_user_name(name).map_err(CreateError::Name)?;
        }
        if ttl_ms.is_some_and(|t| t == 0 || t > TOKEN_TTL_MS_MAX) {
            return Err(CreateError::Ttl);
        }
        if uses_max.is_some_and(|u| u == 0 || u > TOKEN_USES_MAX) {
            return Err(CreateError::Uses);
        }
        if let Some(name) = &replace {
            if kind != TokenKind::Node {
                return Err(CreateError::ReplaceNeedsNode { name: name.clone() });
            }
            flame_protocol::model::validate_node_name(name).map_err(CreateError::ReplaceName)?;
        }
        if self.tokens.len() >= TOKENS_MAX {
            return Err(CreateError::Full);
        }
        let rng = ring::rand::SystemRandom::new();
        let mut secret = [0u8; TOKEN_SECRET_BYTES];
        ring::rand::SecureRandom::fill(&rng, &mut secret).map_err(|_| CreateError::Random)?;
        let id = loop {
            let mut id = [0u8; TOKEN_ID_BYTES];
            ring::rand::SecureRandom::fill(&rng, &mut id).map_err(|_| CreateError::Random)?;
            // The top bit is set in every token id, and clear in every job credential's.
            id[0] |= 0x80;
            let id = hex(&id);
            if !self.tokens.contains_key(&id) {
                break id;
            }
        };
        let stored = StoredToken {
            kind,
            secret_sha256: sha256(&secret),
            created_ms: now_ms,
            expires_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            revoked: false,
            uses_max,
            uses: 0,
            replace,
        };
        let text = ParsedToken {
            id: id.clone(),
            secret,
            ca_fingerprint: self.jobs.ca_fingerprint,
        }
        .to_secret();
        self.tokens.insert(id.clone(), stored.clone());
        Ok((text, info(&id, &stored), stored))
    }

    /// Marks the token revoked; returns the record to store, or `None` if there is no such
    /// token.
    pub fn revoke(&mut self, id: &str) -> Option<StoredToken> {
        let stored = self.tokens.get_mut(id)?;
        stored.revoked = true;
        Some(stored.clone())
    }

    /// Every token, by id, without secrets.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.tokens.iter().map(|(id, t)| info(id, t)).collect()
    }

    /// Checks a presented token.
    pub fn authenticate(&self, text: &Secret, now_ms: u64) -> Result<Authenticated, AuthError> {
        let token = ParsedToken::parse(text.expose())?;
        let id = token.id.clone();
        if !same(&token.ca_fingerprint, &self.jobs.ca_fingerprint) {
            return Err(AuthError::OtherCluster { id });
        }
        let Some(stored) = self.tokens.get(&id) else {
            return self.authenticate_job(&token);
        };
        if !same(&sha256(&token.secret), &stored.secret_sha256) {
            return Err(AuthError::BadSecret { id });
        }
        if stored.revoked {
            return Err(AuthError::Revoked { id });
        }
        if let Some(expires) = stored.expires_ms {
            if now_ms >= expires {
                return Err(AuthError::Expired {
                    id,
                    ago_s: (now_ms - expires) / 1000,
                });
            }
        }
        if let Some(uses_max) = stored.uses_max.filter(|max| stored.uses >= *max) {
            return Err(AuthError::UsedUp { id, uses_max });
        }
        Ok(match &stored.kind {
            TokenKind::Node => Authenticated::NodeJoin { token: id },
            TokenKind::User { name, admin } => Authenticated::User {
                principal: Principal {
                    name: name.clone(),
                    admin: *admin,
                },
                token: id,
            },
        })
    }

    /// Spends one use of the join token `id` (once the join is sure to go ahead); returns
    /// the record to store. Checked again here: two joins with a single-use token may both
    /// have passed the hello, and only the first gets a certificate.
    pub fn spend(&mut self, id: &str, now_ms: u64) -> Result<StoredToken, AuthError> {
        self.check_id(id, now_ms)?;
        let Some(stored) = self.tokens.get_mut(id) else {
            return Err(AuthError::Unknown { id: id.to_string() });
        };
        if let Some(uses_max) = stored.uses_max.filter(|max| stored.uses >= *max) {
            return Err(AuthError::UsedUp {
                id: id.to_string(),
                uses_max,
            });
        }
        stored.uses += 1;
        Ok(stored.clone())
    }

    /// Gives back a use spent by [`Self::spend`] for a join that then failed.
    pub fn unspend(&mut self, id: &str) -> Option<StoredToken> {
        let stored = self.tokens.get_mut(id)?;
        stored.uses = stored.uses.saturating_sub(1);
        Some(stored.clone())
    }

    /// The node name the token `id` may replace (`--replace`), if any.
    pub fn replaces(&self, id: &str) -> Option<String> {
        self.tokens.get(id).and_then(|t| t.replace.clone())
    }

    /// Whether the token `id` may still be used (not revoked, not expired); job
    /// credentials (unknown ids) always may. For connections opened with it.
    pub fn check_id(&self, id: &str, now_ms: u64) -> Result<(), AuthError> {
        let Some(stored) = self.tokens.get(id) else {
            return Ok(());
        };
        if stored.revoked {
            return Err(AuthError::Revoked { id: id.to_string() });
        }
        match stored.expires_ms {
            Some(expires) if now_ms >= expires => Err(AuthError::Expired {
                id: id.to_string(),
                ago_s: (now_ms - expires) / 1000,
            }),
            _ => Ok(()),
        }
    }

    fn authenticate_job(&self, token: &ParsedToken) -> Result<Authenticated, AuthError> {
        let unknown = || AuthError::Unknown {
            id: token.id.clone(),
        };
        let bytes = flame_protocol::auth::unhex::<TOKEN_ID_BYTES>(&token.id).ok_or_else(unknown)?;
        let job = SessionId(u64::from_be_bytes(bytes));
        if bytes[0] & 0x80 != 0 || !same(&self.jobs.secret(job), &token.secret) {
            return Err(unknown());
        }
        Ok(Authenticated::Job(job))
    }
}

/// Who may make a request (see [`access`]). A job credential may make `JobExec` on its
/// own job only, whatever this says (`server::authorize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Admins only. `why` begins the refusal a user who is not an admin gets.
    Admin { why: &'static str },
    /// The owner of this session (a batch job is a session), or an admin. Anyone asking
    /// about a session that does not exist is told so, admins included.
    SessionOwner(SessionId),
    /// A new session, for the owner it names: a user for itself (an empty owner is the
    /// caller), an admin for anyone.
    NamedOwner,
    /// Objects of the owner the request names, the same way: a user its own (an empty
    /// owner is the caller), an admin anyone's. Naming another owner is refused by name
    /// alone, so the refusal tells nothing about that owner's objects.
    ObjectOwner,
    /// Any user. What some answers show is trimmed to the caller's own (the server filters
    /// session lists and the queue's sessions for users who are not admins).
    Anyone,
}

/// Who may make `request`. Every request is listed: no catch-all arm, so a new request
/// is not open to everyone by default.
pub fn access(request: &ClientRequest) -> Access {
    const APPLICATIONS: &str = "registering, changing or removing applications is for \
                                admins: an application is code every node runs";
    const NODES: &str = "draining nodes is for admins";
    const TOKENS: &str = "managing tokens is for admins";
    const CERTS: &str = "managing certificates is for admins";
    match request {
        ClientRequest::RegisterApplication(_)
        | ClientRequest::UpdateApplication(_)
        | ClientRequest::RemoveApplication { .. } => Access::Admin { why: APPLICATIONS },
        ClientRequest::DrainNode { .. } | ClientRequest::UndrainNode { .. } => {
            Access::Admin { why: NODES }
        }
        ClientRequest::CreateToken { .. }
        | ClientRequest::ListTokens
        | ClientRequest::RevokeToken { .. } => Access::Admin { why: TOKENS },
        ClientRequest::RevokeCert { .. } | ClientRequest::ListCerts => Access::Admin { why: CERTS },
        // A batch job's ranks run as application `job.<id>`: its spec is the job owner's.
        ClientRequest::GetApplication { name } => {
            match flame_protocol::model::job_of_application(name) {
                Some(job) => Access::SessionOwner(job),
                None => Access::Anyone,
            }
        }
        ClientRequest::GetSession { id }
        | ClientRequest::CloseSession { id }
        | ClientRequest::CancelSession { id } => Access::SessionOwner(*id),
        ClientRequest::ListTasks { session, .. }
        | ClientRequest::OpenSubmitStream { session }
        | ClientRequest::WatchResults { session }
        | ClientRequest::Logs { session, .. } => Access::SessionOwner(*session),
        ClientRequest::JobExec { job, .. } => Access::SessionOwner(*job),
        ClientRequest::CreateSession(_) => Access::NamedOwner,
        ClientRequest::PutObjects { .. }
        | ClientRequest::LocateObjects { .. }
        | ClientRequest::ListObjects { .. }
        | ClientRequest::RemoveObjects { .. } => Access::ObjectOwner,
        ClientRequest::ListApplications
        | ClientRequest::ListSessions
        | ClientRequest::ListNodes
        | ClientRequest::Queue
        | ClientRequest::WhoAmI => Access::Anyone,
    }
}

fn info(id: &str, t: &StoredToken) -> TokenInfo {
    TokenInfo {
        id: id.to_string(),
        kind: t.kind.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        revoked: t.revoked,
        uses_max: t.uses_max,
        uses: t.uses,
        replace: t.replace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> TokenBook {
        TokenBook::new([], JobCredentials::new(b"head secret", [7; 32]))
    }

    fn ttl(ms: u64) -> TokenLimits {
        TokenLimits {
            ttl_ms: Some(ms),
            ..TokenLimits::default()
        }
    }

    fn user(name: &str, admin: bool) -> TokenKind {
        TokenKind::User {
            name: name.into(),
            admin,
        }
    }

    #[test]
    fn a_created_token_authenticates_as_its_kind() {
        let mut book = book();
        let (text, info, stored) = book
            .create(user("alice", false), TokenLimits::default(), 1_000)
            .unwrap();
        assert_ne!(stored.secret_sha256, [0; 32]);
        match book.authenticate(&text, 2_000).unwrap() {
            Authenticated::User { principal, token } => {
                assert_eq!(principal.name, "alice");
                assert!(!principal.admin);
                assert_eq!(token, info.id);
            }
            other => panic!("{other:?}"),
        }
        let (node, _, _) = book
            .create(TokenKind::Node, TokenLimits::default(), 1_000)
            .unwrap();
        assert!(matches!(
            book.authenticate(&node, 2_000).unwrap(),
            Authenticated::NodeJoin { .. }
        ));
    }

    #[test]
    fn revoked_expired_forged_and_foreign_tokens_are_refused_by_id_only() {
        let mut book = book();
        let (text, info, _) = book.create(user("bob", true), ttl(10_000), 0).unwrap();
        let expired = book.authenticate(&text, 15_000).unwrap_err();
        assert_eq!(
            expired.to_string(),
            format!("token {} expired 5 s ago", info.id)
        );
        book.revoke(&info.id).unwrap();
        let revoked = book.authenticate(&text, 1).unwrap_err();
        assert_eq!(
            revoked,
            AuthError::Revoked {
                id: info.id.clone()
            }
        );

        let mut parsed = ParsedToken::parse(text.expose()).unwrap();
        parsed.secret[0] ^= 1;
        let forged = book.authenticate(&parsed.to_secret(), 1).unwrap_err();
        assert_eq!(
            forged,
            AuthError::BadSecret {
                id: info.id.clone()
            }
        );
        parsed.ca_fingerprint[0] ^= 1;
        let foreign = book.authenticate(&parsed.to_secret(), 1).unwrap_err();
        assert_eq!(
            foreign,
            AuthError::OtherCluster {
                id: info.id.clone()
            }
        );
        for e in [expired, revoked, forged, foreign] {
            assert!(!e.to_string().contains(&text.expose()[30..50]), "{e}");
        }
    }

    #[test]
    fn job_credentials_are_good_for_their_job_only() {
        let book = book();
        let cred = JobCredentials::new(b"head secret", [7; 32]).for_job(SessionId(42));
        assert_eq!(
            book.authenticate(&cred, 0).unwrap(),
            Authenticated::Job(SessionId(42))
        );
        let mut parsed = ParsedToken::parse(cred.expose()).unwrap();
        parsed.id = hex(&43u64.to_be_bytes());
        assert!(matches!(
            book.authenticate(&parsed.to_secret(), 0),
            Err(AuthError::Unknown { .. })
        ));
        // Another head secret makes other credentials.
        let other = TokenBook::new([], JobCredentials::new(b"another secret", [7; 32]));
        assert!(other.authenticate(&cred, 0).is_err());
    }

    #[test]
    fn bad_names_and_lifetimes_are_refused() {
        let mut book = book();
        assert!(matches!(
            book.create(user("", false), TokenLimits::default(), 0),
            Err(CreateError::Name(_))
        ));
        assert_eq!(
            book.create(user("a", false), ttl(0), 0).unwrap_err(),
            CreateError::Ttl
        );
    }

    #[test]
    fn a_join_token_is_used_up_after_its_uses() {
        let mut book = book();
        let limits = TokenLimits {
            uses_max: Some(2),
            ..TokenLimits::default()
        };
        let (text, info, _) = book.create(TokenKind::Node, limits, 0).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                book.authenticate(&text, 1).unwrap(),
                Authenticated::NodeJoin { .. }
            ));
            book.spend(&info.id, 1).unwrap();
        }
        let used = book.authenticate(&text, 1).unwrap_err();
        assert_eq!(
            used,
            AuthError::UsedUp {
                id: info.id.clone(),
                uses_max: 2
            }
        );
        assert!(used.to_string().contains("used up"), "{used}");
        assert!(book.spend(&info.id, 1).is_err());
        // A join that failed after spending gives its use back.
        book.unspend(&info.id).unwrap();
        assert!(book.authenticate(&text, 1).is_ok());
        assert_eq!(book.list()[0].uses, 1);
    }

    #[test]
    fn access_names_who_may_make_each_request() {
        use flame_protocol::model::{ApplicationSpec, SessionSpec};
        let app = ApplicationSpec::new("web", "/bin/cat");
        match access(&ClientRequest::RegisterApplication(app)) {
            Access::Admin { why } => assert_eq!(
                why,
                "registering, changing or removing applications is for admins: an application \
                 is code every node runs"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            access(&ClientRequest::ListTokens),
            Access::Admin {
                why: "managing tokens is for admins"
            }
        ));
        assert!(matches!(
            access(&ClientRequest::DrainNode { name: "n1".into() }),
            Access::Admin {
                why: "draining nodes is for admins"
            }
        ));
        assert!(matches!(
            access(&ClientRequest::ListCerts),
            Access::Admin {
                why: "managing certificates is for admins"
            }
        ));
        let s = SessionId(7);
        for request in [
            ClientRequest::GetSession { id: s },
            ClientRequest::CancelSession { id: s },
            ClientRequest::OpenSubmitStream { session: s },
            ClientRequest::Logs {
                session: s,
                executor: None,
                follow: true,
            },
            ClientRequest::JobExec {
                job: s,
                node: "n1".into(),
                argv: Vec::new(),
            },
            ClientRequest::GetApplication {
                name: "job.7".into(),
            },
        ] {
            assert_eq!(access(&request), Access::SessionOwner(s), "{request:?}");
        }
        assert_eq!(
            access(&ClientRequest::GetApplication { name: "web".into() }),
            Access::Anyone
        );
        assert_eq!(
            access(&ClientRequest::CreateSession(SessionSpec::new("web"))),
            Access::NamedOwner
        );
        for request in [
            ClientRequest::ListSessions,
            ClientRequest::Queue,
            ClientRequest::WhoAmI,
        ] {
            assert_eq!(access(&request), Access::Anyone, "{request:?}");
        }
        for request in [
            ClientRequest::PutObjects {
                owner: String::new(),
                session: None,
                objects: Vec::new(),
                replicas: 1,
            },
            ClientRequest::LocateObjects {
                owner: "bob".into(),
                ids: Vec::new(),
            },
            ClientRequest::ListObjects {
                owner: String::new(),
                session: Some(s),
            },
            ClientRequest::RemoveObjects {
                owner: String::new(),
                ids: Vec::new(),
            },
        ] {
            assert_eq!(access(&request), Access::ObjectOwner, "{request:?}");
        }
    }

    #[test]
    fn only_node_tokens_replace_and_uses_are_bounded() {
        let mut book = book();
        let replace = |name: &str| TokenLimits {
            replace: Some(name.into()),
            ..TokenLimits::default()
        };
        let needs_node = book.create(user("a", false), replace("n1"), 0).unwrap_err();
        assert_eq!(
            needs_node.to_string(),
            "only node join tokens can replace a node: `--replace n1` needs `--node`"
        );
        let bad_name = book
            .create(TokenKind::Node, replace("Not A Name"), 0)
            .unwrap_err();
        assert!(matches!(bad_name, CreateError::ReplaceName(_)));
        assert!(bad_name
            .to_string()
            .starts_with("only node join tokens can replace a node: invalid node name: "));
        let (_, info, _) = book.create(TokenKind::Node, replace("n1"), 0).unwrap();
        assert_eq!(book.replaces(&info.id).as_deref(), Some("n1"));
        let uses = |n| TokenLimits {
            uses_max: Some(n),
            ..TokenLimits::default()
        };
        assert_eq!(
            book.create(TokenKind::Node, uses(0), 0).unwrap_err(),
            CreateError::Uses
        );
        assert_eq!(
            book.create(TokenKind::Node, uses(TOKEN_USES_MAX + 1), 0)
                .unwrap_err(),
            CreateError::Uses
        );
    }
}
