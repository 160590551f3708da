//! Where a client finds its head: flags, then environment, then configuration files.
//!
//! Each key (`head`, `ca_file`, `owner`) is resolved on its own, so `FLAME_HEAD` in the
//! environment and a `ca_file` in the user's config file combine. The order, first match
//! wins:
//!
//! 1. the `--head` / `--ca-file` / `--owner` flags ([`ConfigFlags`]);
//! 2. the environment variables `FLAME_HEAD` / `FLAME_CA_FILE` / `FLAME_OWNER` (empty
//!    counts as unset);
//! 3. `$XDG_CONFIG_HOME/flame/config.toml` (or `~/.config/flame/config.toml`);
//! 4. `/etc/flame/flame.toml`.
//!
//! `head` and `ca_file` are required; `owner` is optional (see [`ClientConfig::owner`]).
//! A relative `ca_file` in a configuration file is taken relative to that file's folder.

use flame_protocol::limits;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the head address.
pub const ENV_HEAD: &str = "FLAME_HEAD";
/// Environment variable naming the CA certificate file.
pub const ENV_CA_FILE: &str = "FLAME_CA_FILE";
/// Environment variable naming the owner sessions are accounted to.
pub const ENV_OWNER: &str = "FLAME_OWNER";
/// The system-wide configuration file, read after the user's.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/flame/flame.toml";
/// Largest configuration file read; anything bigger is not a config file.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// How to reach a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port`, `[v6]:port`, or a bare host (port [`flame_protocol::DEFAULT_HEAD_PORT`]).
    pub head: String,
    /// PEM file with the certificate(s) the head's certificate must chain to.
    pub ca_file: PathBuf,
    /// Bound on the QUIC + TLS handshake and the hello exchange.
    pub connect_timeout: Duration,
    /// The owner [`Client::create_session`](crate::Client::create_session) gives sessions
    /// whose spec names none; `None`: the name of the user running the program.
    pub owner: Option<String>,
}

impl ClientConfig {
    /// The head at `head`, trusted through `ca_file`, with the default connect timeout and
    /// no configured owner.
    pub fn new(head: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        ClientConfig {
            head: head.into(),
            ca_file: ca_file.into(),
            connect_timeout: limits::CONNECT_TIMEOUT,
            owner: None,
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
}

/// A configuration value that could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No source named the key.
    #[error("no {what} is configured: pass {flag}, set {env}, or set `{key}` in {files}")]
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
}

/// The keys a client reads from a configuration file. Unknown keys are ignored on purpose:
/// `/etc/flame/flame.toml` may be shared with the head's and the node's settings.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    head: Option<String>,
    ca_file: Option<PathBuf>,
    owner: Option<String>,
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
        let mut head = flags.head.clone().or_else(|| env_value(ENV_HEAD));
        let mut ca_file = flags
            .ca_file
            .clone()
            .or_else(|| env_value(ENV_CA_FILE).map(PathBuf::from));
        let mut owner = flags
            .owner
            .clone()
            .filter(|o| !o.is_empty())
            .or_else(|| env_value(ENV_OWNER));
        for path in files {
            if head.is_some() && ca_file.is_some() && owner.is_some() {
                break;
            }
            let Some(file) = read_config_file(path)? else {
                continue;
            };
            if head.is_none() {
                head = file.head.filter(|h| !h.is_empty());
            }
            if ca_file.is_none() {
                ca_file = file
                    .ca_file
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|p| relative_to_file(path, p));
            }
            if owner.is_none() {
                owner = file.owner.filter(|o| !o.is_empty());
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
        })?;
        let ca_file = ca_file.ok_or_else(|| ConfigError::Missing {
            what: "CA certificate file",
            key: "ca_file",
            flag: "--ca-file",
            env: ENV_CA_FILE,
            files: files_display(),
        })?;
        Ok(ClientConfig {
            head,
            ca_file,
            connect_timeout: limits::CONNECT_TIMEOUT,
            owner,
        })
    }
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
    toml::from_str::<FileConfig>(&text)
        .map(Some)
        .map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: crate::app_file::describe_toml_error(&text, &e),
        })
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_win_over_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "head = \"file:1\"\nca_file = \"/file.crt\"\n",
        );
        let flags = ConfigFlags {
            head: Some("flag:1".into()),
            ca_file: Some("/flag.crt".into()),
            owner: Some("flag-owner".into()),
        };
        let env = env_of(&[
            (ENV_HEAD, "env:1"),
            (ENV_CA_FILE, "/env.crt"),
            (ENV_OWNER, "env-owner"),
        ]);
        let c = ClientConfig::resolve_with(&flags, env, &[file]).unwrap();
        assert_eq!(c.head, "flag:1");
        assert_eq!(c.ca_file, PathBuf::from("/flag.crt"));
        assert_eq!(c.owner.as_deref(), Some("flag-owner"));
        assert_eq!(c.connect_timeout, limits::CONNECT_TIMEOUT);
    }

    #[test]
    fn env_wins_over_files_and_keys_resolve_independently() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "head = \"file:1\"\nca_file = \"/file.crt\"\n",
        );
        let env = env_of(&[(ENV_HEAD, "env:1"), (ENV_CA_FILE, "")]);
        let c = ClientConfig::resolve_with(&ConfigFlags::default(), env, &[file]).unwrap();
        assert_eq!(c.head, "env:1");
        // An empty variable counts as unset, so the file supplies the CA.
        assert_eq!(c.ca_file, PathBuf::from("/file.crt"));
    }

    #[test]
    fn user_file_wins_over_system_file_and_missing_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let user = write(dir.path(), "user.toml", "head = \"user:1\"\n");
        let system = write(
            dir.path(),
            "system.toml",
            "head = \"system:1\"\nca_file = \"certs/ca.crt\"\n[head_settings]\nx = 1\n",
        );
        let missing = dir.path().join("absent.toml");
        let c = ClientConfig::resolve_with(
            &ConfigFlags::default(),
            env_of(&[]),
            &[missing, user, system],
        )
        .unwrap();
        assert_eq!(c.head, "user:1");
        // Relative to the system file's folder.
        assert_eq!(c.ca_file, dir.path().join("certs/ca.crt"));
        // No source names an owner: that is allowed.
        assert_eq!(c.owner, None);
    }

    #[test]
    fn owner_comes_from_env_then_files_and_empty_counts_as_unset() {
        let dir = tempfile::tempdir().unwrap();
        let user = write(
            dir.path(),
            "user.toml",
            "head = \"user:1\"\nca_file = \"/ca.crt\"\nowner = \"\"\n",
        );
        let system = write(dir.path(), "system.toml", "owner = \"team-a\"\n");
        let files = [user, system];
        let from_env = ClientConfig::resolve_with(
            &ConfigFlags::default(),
            env_of(&[(ENV_OWNER, "env-owner")]),
            &files,
        )
        .unwrap();
        assert_eq!(from_env.owner.as_deref(), Some("env-owner"));
        // An empty flag, variable or key is skipped, so the system file supplies it.
        let from_file = ClientConfig::resolve_with(
            &ConfigFlags {
                owner: Some(String::new()),
                ..ConfigFlags::default()
            },
            env_of(&[(ENV_OWNER, "")]),
            &files,
        )
        .unwrap();
        assert_eq!(from_file.owner.as_deref(), Some("team-a"));
    }

    #[test]
    fn missing_head_names_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("none.toml");
        let err = ClientConfig::resolve_with(
            &ConfigFlags {
                ca_file: Some("/ca.crt".into()),
                ..ConfigFlags::default()
            },
            env_of(&[]),
            std::slice::from_ref(&file),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ConfigError::Missing { key: "head", .. }),
            "{text}"
        );
        assert!(text.contains("--head"), "{text}");
        assert!(text.contains(ENV_HEAD), "{text}");
        assert!(text.contains(&file.display().to_string()), "{text}");
    }

    #[test]
    fn broken_config_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "bad.toml", "head = [\n");
        let err = ClientConfig::resolve_with(
            &ConfigFlags::default(),
            env_of(&[]),
            std::slice::from_ref(&file),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn default_files_follow_xdg_then_home() {
        let with_xdg = default_config_files(env_of(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")]));
        assert_eq!(
            with_xdg,
            vec![
                PathBuf::from("/x/flame/config.toml"),
                PathBuf::from(SYSTEM_CONFIG_FILE)
            ]
        );
        let home_only = default_config_files(env_of(&[("HOME", "/h")]));
        assert_eq!(home_only[0], PathBuf::from("/h/.config/flame/config.toml"));
        let neither = default_config_files(env_of(&[]));
        assert_eq!(neither, vec![PathBuf::from(SYSTEM_CONFIG_FILE)]);
    }
}
