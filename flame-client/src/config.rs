//! Where a client finds its head and how it proves who it is: flags, then environment,
//! then configuration files.
//!
//! Each of the keys `head`, `ca_file` and `owner` is resolved on its own, so `FLAME_HEAD`
//! in the environment and a `ca_file` in the user's config file combine. The order, first
//! match wins:
//!
//! 1. the `--head` / `--ca-file` / `--owner` flags ([`ConfigFlags`]);
//! 2. the environment variables `FLAME_HEAD` / `FLAME_CA_FILE` / `FLAME_OWNER` (empty
//!    counts as unset);
//! 3. `$XDG_CONFIG_HOME/flame/config.toml` (or `~/.config/flame/config.toml`);
//! 4. `/etc/flame/flame.toml`.
//!
//! `object_inline_max` (`--object-inline-max`, `FLAME_OBJECT_INLINE_MAX`) resolves the
//! same way and defaults to [`limits::OBJECT_INLINE_BYTES_DEFAULT`]: task inputs and
//! common data larger than it travel as objects (see [`ClientConfig::object_inline_max`]).
//! It takes a number of bytes, or a size with a unit (`1MiB`, `100 KB`).
//!
//! `head` is required. `owner` is optional and matters only to admins acting for someone
//! else (see [`ClientConfig::owner`]). A relative path in a configuration file (`ca_file`,
//! `token_file`, `cert_file`, `key_file`) is taken relative to that file's folder.
//!
//! ## Credentials
//!
//! The head accepts no anonymous clients. A client proves who it is with a token, which an
//! admin makes with `flame-head token create --user NAME`, or with a user certificate signed
//! by the cluster CA and its key:
//!
//! | source        | token                                              | certificate                     |
//! |---------------|----------------------------------------------------|---------------------------------|
//! | flags         | `--token-file PATH`                                | `--cert PATH --key PATH`        |
//! | environment   | `FLAME_TOKEN_FILE`, or `FLAME_TOKEN` (the text)    | `FLAME_CERT`, `FLAME_KEY`       |
//! | config files  | `token_file`, or `token` (the text, see below)     | `cert_file`, `key_file`         |
//!
//! Unlike the other keys, the credential is resolved as one unit: the first source (in the
//! order above) that names any part of one supplies all of it. A token from the
//! environment is thus never sent along with a certificate from a file, nor a certificate
//! paired with another source's key. Within one source, a token and a certificate, or a
//! token both as a file and as text, are an error rather than a silent choice.
//!
//! There is deliberately no flag taking the token's text: a command line is visible to
//! every user of the machine (`ps`). `FLAME_TOKEN` is visible only to the same user, but
//! every child process inherits it; `FLAME_TOKEN_FILE` is the better way to hand a token
//! on. A `token` written in a configuration file is accepted only when the file is not
//! readable by group or others, as ssh does for private keys.
//!
//! A token is read and checked here, so that a malformed one is reported before any
//! connection. No error message, log line or `Debug` output shows its text ([`Secret`]).
//!
//! `ca_file` may be left out when a token is given: the token carries the fingerprint of
//! the cluster CA's certificate, and the client then trusts that certificate alone
//! ([`Trust::Pinned`]).

use crate::error::ClientError;
use flame_protocol::auth::{ParsedToken, Secret, TokenFormatError};
use flame_protocol::endpoint::Trust;
use flame_protocol::limits;
use serde::Deserialize;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the head address.
pub const ENV_HEAD: &str = "FLAME_HEAD";
/// Environment variable naming the CA certificate file.
pub const ENV_CA_FILE: &str = "FLAME_CA_FILE";
/// Environment variable naming the owner sessions are accounted to.
pub const ENV_OWNER: &str = "FLAME_OWNER";
/// Environment variable giving the size above which inputs travel as objects.
pub const ENV_OBJECT_INLINE_MAX: &str = "FLAME_OBJECT_INLINE_MAX";
/// Environment variable naming a file that holds the token.
pub const ENV_TOKEN_FILE: &str = "FLAME_TOKEN_FILE";
/// Environment variable holding the token's text.
pub const ENV_TOKEN: &str = "FLAME_TOKEN";
/// Environment variable naming the user certificate file (PEM).
pub const ENV_CERT: &str = "FLAME_CERT";
/// Environment variable naming the user certificate's private key file (PEM).
pub const ENV_KEY: &str = "FLAME_KEY";
/// The system-wide configuration file, read after the user's.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/flame/flame.toml";
/// Largest configuration file read; anything bigger is not a config file.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Largest token file read; a token is about 170 bytes, so anything bigger is another file.
pub const TOKEN_FILE_BYTES_MAX: u64 = 4096;
/// Permission bits a configuration file holding a `token` must not have: any access by
/// group or others.
pub const TOKEN_FILE_MODE_FORBIDDEN: u32 = 0o077;

/// A user certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// The certificate, signed by the cluster CA.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// How to reach a head and who to be there. `Debug` never shows the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port`, `[v6]:port`, or a bare host (port [`flame_protocol::DEFAULT_HEAD_PORT`]).
    pub head: String,
    /// PEM file with the certificate(s) the head's certificate must chain to. `None`: trust
    /// the CA whose fingerprint [`ClientConfig::token`] carries (see [`ClientConfig::trust`]).
    pub ca_file: Option<PathBuf>,
    /// Bound on the QUIC + TLS handshake and the hello exchange.
    pub connect_timeout: Duration,
    /// The owner [`Client::create_session`](crate::Client::create_session) gives sessions
    /// whose spec names none. `None`: none is sent, and the head makes the authenticated
    /// user the owner. Only an admin may name another user.
    pub owner: Option<String>,
    /// The token sent in the hello, in its text form.
    pub token: Option<Secret>,
    /// A user certificate presented in the TLS handshake instead of a token.
    pub identity: Option<IdentityFiles>,
    /// Task inputs and common data larger than this many bytes are put to a node's object
    /// cache first and travel as references ([`flame_protocol::object::Payload::Object`]);
    /// smaller ones go inline through the head.
    pub object_inline_max: u64,
}

impl ClientConfig {
    /// The head at `head`, trusted through `ca_file`, with the default connect timeout, no
    /// configured owner and no credentials yet (see [`ClientConfig::with_token`]).
    pub fn new(head: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        ClientConfig {
            head: head.into(),
            ca_file: Some(ca_file.into()),
            connect_timeout: limits::CONNECT_TIMEOUT,
            owner: None,
            token: None,
            identity: None,
            object_inline_max: limits::OBJECT_INLINE_BYTES_DEFAULT,
        }
    }

    /// The head at `head`, as the holder of `token`, trusting the CA whose fingerprint the
    /// token carries: all a client needs besides the address.
    pub fn from_token(head: impl Into<String>, token: Secret) -> Self {
        ClientConfig {
            head: head.into(),
            ca_file: None,
            connect_timeout: limits::CONNECT_TIMEOUT,
            owner: None,
            token: Some(token),
            identity: None,
            object_inline_max: limits::OBJECT_INLINE_BYTES_DEFAULT,
        }
    }

    /// This configuration, authenticating with `token` (its text form, as `flame-head token
    /// create` prints it). It is checked when connecting.
    pub fn with_token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// This configuration, presenting the user certificate `cert` with its key `key`.
    pub fn with_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some(IdentityFiles {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// What the head's certificate is checked against: the CA file when one is configured,
    /// else the CA fingerprint in the token.
    pub fn trust(&self) -> Result<Trust, ClientError> {
        if let Some(ca_file) = &self.ca_file {
            return Ok(Trust::CaFile(ca_file.clone()));
        }
        match &self.token {
            Some(token) => ParsedToken::parse(token.expose())
                .map(|t| Trust::Pinned(t.ca_fingerprint))
                .map_err(ClientError::Token),
            None => Err(ClientError::NoTrust {
                addr: self.head.clone(),
            }),
        }
    }
}

/// Values given on the command line; they win over every other source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    /// `--head`.
    pub head: Option<String>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--owner`.
    pub owner: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--cert`.
    pub cert_file: Option<PathBuf>,
    /// `--key`.
    pub key_file: Option<PathBuf>,
    /// `--object-inline-max`, in bytes.
    pub object_inline_max: Option<u64>,
}

/// A configuration value that could not be found or read. No variant holds a token's text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No source named the key.
    #[error(
        "no {what} is configured: pass {flag}, set {env}, or set `{key}` in {files}{}",
        alternative.map(|a| format!("; {a}")).unwrap_or_default()
    )]
    Missing {
        /// What the key means, for humans.
        what: &'static str,
        /// The key in configuration files.
        key: &'static str,
        /// The command-line flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// The files that were searched, joined for display.
        files: String,
        /// Another way to do without the key, if there is one.
        alternative: Option<&'static str>,
    },
    /// A configuration file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration file is larger than [`CONFIG_FILE_BYTES_MAX`].
    #[error("{} is {len} bytes; a configuration file may hold at most {max} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A configuration file is not valid TOML or has a key of the wrong type.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column when known.
        message: String,
    },
    /// A token file cannot be read, or is too large to be one.
    #[error("cannot read the token file {} ({setting}): {reason}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Where it was named, e.g. `--token-file`.
        setting: String,
        /// Why.
        reason: String,
    },
    /// A token is not in the text form `flame-head token create` prints.
    #[error("{origin} is not a valid token: {source}")]
    Token {
        /// Where it came from, e.g. `the token in FLAME_TOKEN`.
        origin: String,
        /// What is wrong with it (never its text).
        source: TokenFormatError,
    },
    /// A configuration file holds a `token` but others may read it.
    #[error(
        "{} holds a `token` but is readable by group or others (mode 0{mode:03o}): refusing to use it",
        path.display()
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// One source names two credentials; which to use would be a guess.
    #[error("{first} and {second} are both set; keep only one")]
    Conflict {
        /// One setting, e.g. `FLAME_TOKEN_FILE`.
        first: String,
        /// The other, e.g. `FLAME_TOKEN`.
        second: String,
    },
    /// A setting whose value cannot be used.
    #[error("{setting} is `{value}`: {reason}")]
    Invalid {
        /// The setting, e.g. `FLAME_OBJECT_INLINE_MAX`.
        setting: String,
        /// Its value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate without its key, or a key without its certificate.
    #[error("{given} is set but {missing} is not: a client certificate needs its key, and the key its certificate")]
    HalfIdentity {
        /// The setting given.
        given: String,
        /// The one missing, from the same source.
        missing: String,
    },
}

/// The keys a client reads from a configuration file. An unknown top-level key (`hed =
/// ...`) is an error naming the keys; a section (`[name]`) is ignored on purpose, left to
/// whatever other program reads the file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    head: Option<String>,
    ca_file: Option<PathBuf>,
    owner: Option<String>,
    token_file: Option<PathBuf>,
    token: Option<Secret>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    object_inline_max: Option<u64>,
    /// The file's permission bits, from its metadata.
    #[serde(skip)]
    mode: u32,
}

/// The keys of [`FileConfig`], for the messages about an unknown or unquoted one.
const FILE_KEYS: [&str; 8] = [
    "head",
    "ca_file",
    "owner",
    "token_file",
    "token",
    "cert_file",
    "key_file",
    "object_inline_max",
];

/// The keys of [`FILE_KEYS`] whose values are strings, which TOML wants quoted.
const FILE_STRING_KEYS: [&str; 7] = [
    "head",
    "ca_file",
    "owner",
    "token_file",
    "token",
    "cert_file",
    "key_file",
];

/// A credential, resolved.
#[derive(Debug)]
enum Credential {
    Token(Secret),
    Identity(IdentityFiles),
}

/// A value and the setting that gave it, for messages.
#[derive(Debug)]
struct Named<T> {
    value: T,
    setting: String,
}

/// What one source names of a credential, before any file is read.
#[derive(Debug)]
struct CredentialSource {
    token_file: Option<Named<PathBuf>>,
    token: Option<Named<Secret>>,
    cert: Option<Named<PathBuf>>,
    key: Option<Named<PathBuf>>,
    /// The names of the certificate and key settings in this source, for
    /// [`ConfigError::HalfIdentity`].
    cert_setting: String,
    key_setting: String,
}

fn named<T>(value: Option<T>, setting: impl Into<String>) -> Option<Named<T>> {
    value.map(|value| Named {
        value,
        setting: setting.into(),
    })
}

fn non_empty_path(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !p.as_os_str().is_empty())
}

impl CredentialSource {
    fn flags(flags: &ConfigFlags) -> Self {
        CredentialSource {
            token_file: named(non_empty_path(flags.token_file.clone()), "--token-file"),
            token: None,
            cert: named(non_empty_path(flags.cert_file.clone()), "--cert"),
            key: named(non_empty_path(flags.key_file.clone()), "--key"),
            cert_setting: "--cert".into(),
            key_setting: "--key".into(),
        }
    }

    fn env(env: impl Fn(&str) -> Option<String>) -> Self {
        let value = |name: &str| env(name).filter(|v| !v.is_empty());
        CredentialSource {
            token_file: named(value(ENV_TOKEN_FILE).map(PathBuf::from), ENV_TOKEN_FILE),
            token: named(value(ENV_TOKEN).map(Secret::new), ENV_TOKEN),
            cert: named(value(ENV_CERT).map(PathBuf::from), ENV_CERT),
            key: named(value(ENV_KEY).map(PathBuf::from), ENV_KEY),
            cert_setting: ENV_CERT.into(),
            key_setting: ENV_KEY.into(),
        }
    }

    /// The credential keys of `file`, read from `path`. An inline `token` in a file others
    /// may read is refused here.
    fn file(path: &Path, file: &mut FileConfig) -> Result<Self, ConfigError> {
        let setting = |key: &str| format!("`{key}` in {}", path.display());
        let file_path = |p: Option<PathBuf>| non_empty_path(p).map(|p| relative_to_file(path, p));
        let token = file.token.take().filter(|t| !t.expose().is_empty());
        if token.is_some() && file.mode & TOKEN_FILE_MODE_FORBIDDEN != 0 {
            return Err(ConfigError::TooOpen {
                path: path.to_path_buf(),
                mode: file.mode & 0o777,
            });
        }
        Ok(CredentialSource {
            token_file: named(file_path(file.token_file.take()), setting("token_file")),
            token: named(token, setting("token")),
            cert: named(file_path(file.cert_file.take()), setting("cert_file")),
            key: named(file_path(file.key_file.take()), setting("key_file")),
            cert_setting: setting("cert_file"),
            key_setting: setting("key_file"),
        })
    }

    /// The credential this source names, checked and with its token read; `None` when it
    /// names none.
    fn resolve(self) -> Result<Option<Credential>, ConfigError> {
        let conflict = |first: &str, second: &str| ConfigError::Conflict {
            first: first.to_string(),
            second: second.to_string(),
        };
        if let (Some(file), Some(text)) = (&self.token_file, &self.token) {
            return Err(conflict(&file.setting, &text.setting));
        }
        let token_setting = self
            .token_file
            .as_ref()
            .map(|t| &t.setting)
            .or(self.token.as_ref().map(|t| &t.setting));
        let cert_setting = self
            .cert
            .as_ref()
            .map(|c| &c.setting)
            .or(self.key.as_ref().map(|k| &k.setting));
        if let (Some(token), Some(cert)) = (token_setting, cert_setting) {
            return Err(conflict(token, cert));
        }
        if let Some(file) = self.token_file {
            return read_token_file(&file.value, &file.setting).map(|t| Some(Credential::Token(t)));
        }
        if let Some(text) = self.token {
            return check_token(text.value, || format!("the token in {}", text.setting))
                .map(|t| Some(Credential::Token(t)));
        }
        match (self.cert, self.key) {
            (Some(cert), Some(key)) => Ok(Some(Credential::Identity(IdentityFiles {
                cert: cert.value,
                key: key.value,
            }))),
            (Some(cert), None) => Err(ConfigError::HalfIdentity {
                given: cert.setting,
                missing: self.key_setting,
            }),
            (None, Some(key)) => Err(ConfigError::HalfIdentity {
                given: key.setting,
                missing: self.cert_setting,
            }),
            (None, None) => Ok(None),
        }
    }
}

/// `text` trimmed, when it parses as a token; the error names `origin()`, never the text.
pub(crate) fn check_token(
    text: Secret,
    origin: impl FnOnce() -> String,
) -> Result<Secret, ConfigError> {
    let trimmed = text.expose().trim();
    match ParsedToken::parse(trimmed) {
        Ok(_) => Ok(Secret::new(trimmed)),
        Err(source) => Err(ConfigError::Token {
            origin: origin(),
            source,
        }),
    }
}

/// Reads and checks the token in `path` (named by `setting`).
pub(crate) fn read_token_file(path: &Path, setting: &str) -> Result<Secret, ConfigError> {
    let err = |reason: String| ConfigError::TokenFile {
        path: path.to_path_buf(),
        setting: setting.to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells an oversized file from one of exactly the limit.
    file.take(TOKEN_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > TOKEN_FILE_BYTES_MAX {
        return Err(err(format!(
            "it is larger than {TOKEN_FILE_BYTES_MAX} bytes, too large for a token"
        )));
    }
    // Not quoted on failure: the bytes may be a token with a stray character.
    let text = String::from_utf8(bytes).map_err(|_| err("it is not UTF-8 text".into()))?;
    check_token(Secret::new(text), || {
        format!("the token in {} ({setting})", path.display())
    })
}

impl ClientConfig {
    /// Resolves the configuration from `flags`, the process environment and the default
    /// configuration files.
    pub fn resolve(flags: &ConfigFlags) -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let files = default_config_files(env);
        Self::resolve_with(flags, env, &files)
    }

    /// Resolves the configuration from explicit sources: `env` answers environment lookups
    /// and `files` are read in order (missing files are skipped). Tests use this to avoid
    /// touching the process environment.
    pub fn resolve_with(
        flags: &ConfigFlags,
        env: impl Fn(&str) -> Option<String>,
        files: &[PathBuf],
    ) -> Result<Self, ConfigError> {
        let env_value = |name: &str| env(name).filter(|v| !v.is_empty());
        let mut head = flags
            .head
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| env_value(ENV_HEAD));
        let mut ca_file = non_empty_path(flags.ca_file.clone())
            .or_else(|| env_value(ENV_CA_FILE).map(PathBuf::from));
        let mut owner = flags
            .owner
            .clone()
            .filter(|o| !o.is_empty())
            .or_else(|| env_value(ENV_OWNER));
        let mut object_inline_max = match flags.object_inline_max {
            Some(bytes) => Some(bytes),
            None => env_value(ENV_OBJECT_INLINE_MAX)
                .map(|v| parse_bytes(ENV_OBJECT_INLINE_MAX, &v))
                .transpose()?,
        };
        let mut credential = CredentialSource::flags(flags).resolve()?;
        if credential.is_none() {
            credential = CredentialSource::env(&env).resolve()?;
        }
        for path in files {
            if head.is_some()
                && ca_file.is_some()
                && owner.is_some()
                && credential.is_some()
                && object_inline_max.is_some()
            {
                break;
            }
            let Some(mut file) = read_config_file(path)? else {
                continue;
            };
            if credential.is_none() {
                credential = CredentialSource::file(path, &mut file)?.resolve()?;
            }
            if head.is_none() {
                head = file.head.filter(|h| !h.is_empty());
            }
            if ca_file.is_none() {
                ca_file = non_empty_path(file.ca_file).map(|p| relative_to_file(path, p));
            }
            if owner.is_none() {
                owner = file.owner.filter(|o| !o.is_empty());
            }
            if object_inline_max.is_none() {
                object_inline_max = file.object_inline_max;
            }
        }
        let files_display = || {
            if files.is_empty() {
                "a configuration file".to_string()
            } else {
                files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            }
        };
        let head = head.ok_or_else(|| ConfigError::Missing {
            what: "head address",
            key: "head",
            flag: "--head",
            env: ENV_HEAD,
            files: files_display(),
            alternative: None,
        })?;
        let (token, identity) = match credential {
            Some(Credential::Token(t)) => (Some(t), None),
            Some(Credential::Identity(i)) => (None, Some(i)),
            None => (None, None),
        };
        if ca_file.is_none() && token.is_none() {
            return Err(ConfigError::Missing {
                what: "CA certificate file",
                key: "ca_file",
                flag: "--ca-file",
                env: ENV_CA_FILE,
                files: files_display(),
                alternative: Some(
                    "or give a token (--token-file, FLAME_TOKEN_FILE, FLAME_TOKEN or `token_file`), \
                     which carries the CA's fingerprint",
                ),
            });
        }
        Ok(ClientConfig {
            head,
            ca_file,
            connect_timeout: limits::CONNECT_TIMEOUT,
            owner,
            token,
            identity,
            object_inline_max: object_inline_max.unwrap_or(limits::OBJECT_INLINE_BYTES_DEFAULT),
        })
    }
}

/// A byte count from a setting: a number of bytes, or a size with a binary unit (`64K`,
/// `1 MiB`); see [`crate::units::parse_size`].
fn parse_bytes(setting: &str, value: &str) -> Result<u64, ConfigError> {
    crate::units::parse_size(value).map_err(|e| ConfigError::Invalid {
        setting: setting.to_string(),
        value: value.chars().take(80).collect(),
        reason: e.to_string(),
    })
}

/// The configuration files a client reads, in order: the user's, then the system's.
/// `env` answers environment lookups (`XDG_CONFIG_HOME`, `HOME`).
pub fn default_config_files(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut files = Vec::with_capacity(2);
    let user_dir = env("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        });
    if let Some(dir) = user_dir {
        files.push(dir.join("flame").join("config.toml"));
    }
    files.push(PathBuf::from(SYSTEM_CONFIG_FILE));
    files
}

/// Reads one configuration file; `None` when it does not exist.
fn read_config_file(path: &Path) -> Result<Option<FileConfig>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    if meta.len() > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
            max: CONFIG_FILE_BYTES_MAX,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let parse_err = |message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let table = toml::from_str::<toml::Table>(&text).map_err(|e| {
        let mut message = crate::app_file::describe_toml_error(&text, &e);
        if let Some(hint) = unquoted_string_hint(&text, &e) {
            message.push_str("; ");
            message.push_str(&hint);
        }
        parse_err(message)
    })?;
    // A section (`[head]`) is left to whoever reads it; a bare key is ours, so a typo in
    // one is reported rather than silently ignored.
    let unknown = table
        .iter()
        .find(|(k, v)| !v.is_table() && !FILE_KEYS.contains(&k.as_str()));
    if let Some((key, _)) = unknown {
        return Err(parse_err(format!(
            "unknown key `{}`: a client's config file takes only {}",
            key.chars().take(80).collect::<String>(),
            FILE_KEYS.join(", ")
        )));
    }
    let mut file = toml::from_str::<FileConfig>(&text)
        .map_err(|e| parse_err(crate::app_file::describe_toml_error(&text, &e)))?;
    file.mode = meta.permissions().mode();
    Ok(Some(file))
}

/// When TOML failed on a line that gives a string key a bare value (`head = 1.2.3.4:7470`,
/// which TOML reads as a broken number), how to write it.
fn unquoted_string_hint(text: &str, err: &toml::de::Error) -> Option<String> {
    let start = err.span()?.start;
    let line_start = text.get(..start)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, value) = line.split_once('=')?;
    let (key, value) = (key.trim(), value.trim());
    let quoted = value.starts_with('"') || value.starts_with('\'');
    if !FILE_STRING_KEYS.contains(&key) || quoted || value.is_empty() {
        return None;
    }
    let value: String = value.chars().take(80).collect();
    Some(format!(
        "`{key}` is text, which TOML wants in quotes: {key} = \"{value}\""
    ))
}

/// A path from a configuration file, taken relative to the file's folder when relative.
fn relative_to_file(file: &Path, value: PathBuf) -> PathBuf {
    if value.is_absolute() {
        return value;
    }
    match file.parent() {
        Some(dir) => dir.join(value),
        None => value,
    }
}

#[cfg(test)]
mod tests;
