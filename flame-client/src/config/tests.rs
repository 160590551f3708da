//! The configuration's resolution: flags, environment and files, credentials as one unit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use flame_protocol::auth::{hex, FINGERPRINT_BYTES, TOKEN_SECRET_BYTES};
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

fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = write(dir, name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A well-formed token whose secret is `fill` repeated and whose CA fingerprint is
/// `0x5c` repeated.
fn token(fill: u8) -> Secret {
    ParsedToken {
        id: hex(&[fill; 8]),
        secret: [fill; TOKEN_SECRET_BYTES],
        ca_fingerprint: [0x5c; FINGERPRINT_BYTES],
    }
    .to_secret()
}

/// The secret part of `token(fill)`, to check that it shows nowhere.
fn secret_hex(fill: u8) -> String {
    hex(&[fill; TOKEN_SECRET_BYTES])
}

fn resolve(
    flags: &ConfigFlags,
    env: &[(&str, &str)],
    files: &[PathBuf],
) -> Result<ClientConfig, ConfigError> {
    ClientConfig::resolve_with(flags, env_of(env), files)
}

/// Flags naming a head and a CA, so that a test can look at the credentials alone.
fn base_flags() -> ConfigFlags {
    ConfigFlags {
        head: Some("h:1".into()),
        ca_file: Some("/ca.crt".into()),
        ..ConfigFlags::default()
    }
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
        ..ConfigFlags::default()
    };
    let env = env_of(&[
        (ENV_HEAD, "env:1"),
        (ENV_CA_FILE, "/env.crt"),
        (ENV_OWNER, "env-owner"),
    ]);
    let c = ClientConfig::resolve_with(&flags, env, &[file]).unwrap();
    assert_eq!(c.head, "flag:1");
    assert_eq!(c.ca_file, Some(PathBuf::from("/flag.crt")));
    assert_eq!(c.owner.as_deref(), Some("flag-owner"));
    assert_eq!(c.connect_timeout, limits::CONNECT_TIMEOUT);
    assert_eq!(c.token, None);
    assert_eq!(c.identity, None);
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
    assert_eq!(c.ca_file, Some(PathBuf::from("/file.crt")));
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
    assert_eq!(c.ca_file, Some(dir.path().join("certs/ca.crt")));
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

#[test]
fn token_file_comes_from_the_flag_then_env_then_files_and_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let flag_file = write(
        dir.path(),
        "flag.token",
        &format!("{}\n", token(1).expose()),
    );
    let env_file = write(dir.path(), "env.token", token(2).expose());
    write(
        dir.path(),
        "file.token",
        &format!("  {}\n\n", token(3).expose()),
    );
    // Relative to the configuration file's folder.
    let config = write(
        dir.path(),
        "c.toml",
        "head = \"h:1\"\nca_file = \"/ca.crt\"\ntoken_file = \"file.token\"\n",
    );
    let env_file_text = env_file.display().to_string();
    let env = [(ENV_TOKEN_FILE, env_file_text.as_str())];
    let files = std::slice::from_ref(&config);
    let from_flag = resolve(
        &ConfigFlags {
            token_file: Some(flag_file),
            ..ConfigFlags::default()
        },
        &env,
        files,
    )
    .unwrap();
    assert_eq!(from_flag.token, Some(token(1)));
    let from_env = resolve(&ConfigFlags::default(), &env, files).unwrap();
    assert_eq!(from_env.token, Some(token(2)));
    let from_file = resolve(&ConfigFlags::default(), &[], files).unwrap();
    assert_eq!(from_file.token, Some(token(3)));
    assert_eq!(from_file.identity, None);
}

#[test]
fn token_text_from_the_environment_and_its_conflict_with_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "t", token(2).expose());
    let text = token(1).expose().to_string();
    let c = resolve(&base_flags(), &[(ENV_TOKEN, &text)], &[]).unwrap();
    assert_eq!(c.token, Some(token(1)));
    let file_text = file.display().to_string();
    let err = resolve(
        &base_flags(),
        &[(ENV_TOKEN, &text), (ENV_TOKEN_FILE, &file_text)],
        &[],
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Conflict { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains(ENV_TOKEN_FILE) && shown.contains(ENV_TOKEN),
        "{shown}"
    );
    // The flag is a level above: it wins without a conflict.
    let c = resolve(
        &ConfigFlags {
            token_file: Some(file),
            ..base_flags()
        },
        &[(ENV_TOKEN, &text)],
        &[],
    )
    .unwrap();
    assert_eq!(c.token, Some(token(2)));
}

#[test]
fn the_credential_is_resolved_as_one_unit() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "c.toml",
        "cert_file = \"me.crt\"\nkey_file = \"/keys/me.key\"\n",
    );
    let text = token(1).expose().to_string();
    let files = std::slice::from_ref(&config);
    // A token in the environment: the file's certificate is not used with it.
    let c = resolve(&base_flags(), &[(ENV_TOKEN, &text)], files).unwrap();
    assert_eq!(c.token, Some(token(1)));
    assert_eq!(c.identity, None);
    // Nothing above the file: its certificate, the relative path taken from its folder.
    let c = resolve(&base_flags(), &[], files).unwrap();
    assert_eq!(c.token, None);
    assert_eq!(
        c.identity,
        Some(IdentityFiles {
            cert: dir.path().join("me.crt"),
            key: PathBuf::from("/keys/me.key"),
        })
    );
    // A certificate on the command line wins over the environment's token.
    let c = resolve(
        &ConfigFlags {
            cert_file: Some("/a.crt".into()),
            key_file: Some("/a.key".into()),
            ..base_flags()
        },
        &[(ENV_TOKEN, &text)],
        files,
    )
    .unwrap();
    assert_eq!(c.token, None);
    assert_eq!(
        c.identity,
        Some(IdentityFiles {
            cert: "/a.crt".into(),
            key: "/a.key".into(),
        })
    );
}

#[test]
fn half_a_certificate_or_a_certificate_with_a_token_is_refused() {
    let err = resolve(&base_flags(), &[(ENV_CERT, "/a.crt")], &[]).unwrap_err();
    assert!(matches!(err, ConfigError::HalfIdentity { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains(ENV_CERT) && shown.contains(ENV_KEY),
        "{shown}"
    );
    // The key from another source does not complete it.
    let err = resolve(
        &ConfigFlags {
            key_file: Some("/a.key".into()),
            ..base_flags()
        },
        &[(ENV_CERT, "/a.crt")],
        &[],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("--key") && err.to_string().contains("--cert"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "t", token(1).expose());
    let err = resolve(
        &ConfigFlags {
            token_file: Some(file),
            cert_file: Some("/a.crt".into()),
            key_file: Some("/a.key".into()),
            ..base_flags()
        },
        &[],
        &[],
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("--token-file"), "{err}");
}

#[test]
fn an_inline_token_needs_a_file_no_one_else_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "head = \"h:1\"\nca_file = \"/ca.crt\"\ntoken = \"{}\"\n",
        token(1).expose()
    );
    let open = write(dir.path(), "open.toml", &text);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = resolve(&ConfigFlags::default(), &[], std::slice::from_ref(&open)).unwrap_err();
    assert!(
        matches!(err, ConfigError::TooOpen { mode: 0o640, .. }),
        "{err}"
    );
    let shown = err.to_string();
    assert!(shown.contains("640"), "{shown}");
    assert!(!shown.contains(&secret_hex(1)), "{shown}");
    // A higher source's credential means the file's token is not read at all.
    let other = token(2).expose().to_string();
    let c = resolve(
        &ConfigFlags::default(),
        &[(ENV_TOKEN, &other)],
        std::slice::from_ref(&open),
    )
    .unwrap();
    assert_eq!(c.token, Some(token(2)));

    let private = write_private(dir.path(), "private.toml", &text);
    let c = resolve(&ConfigFlags::default(), &[], std::slice::from_ref(&private)).unwrap();
    assert_eq!(c.token, Some(token(1)));
}

#[test]
fn malformed_tokens_are_reported_without_their_text() {
    let dir = tempfile::tempdir().unwrap();
    let good = token(7).expose().to_string();
    let bad = good.replacen("flame1", "flame9", 1);
    let file = write(dir.path(), "bad.token", &bad);
    let err = resolve(
        &ConfigFlags {
            token_file: Some(file.clone()),
            ..base_flags()
        },
        &[],
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Token {
                source: TokenFormatError::Prefix,
                ..
            }
        ),
        "{err}"
    );
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(&file.display().to_string()), "{shown}");
    assert!(!shown.contains(&secret_hex(7)), "{shown}");

    let truncated = &good[..good.len() - 2];
    let err = resolve(&base_flags(), &[(ENV_TOKEN, truncated)], &[]).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(ENV_TOKEN), "{shown}");
    assert!(!shown.contains(&secret_hex(7)), "{shown}");
}

#[test]
fn unreadable_or_oversized_token_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.token");
    let err = resolve(
        &ConfigFlags {
            token_file: Some(absent.clone()),
            ..base_flags()
        },
        &[],
        &[],
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::TokenFile { .. }), "{err}");
    assert!(
        err.to_string().contains(&absent.display().to_string()),
        "{err}"
    );
    let big = write(
        dir.path(),
        "big.token",
        &"x".repeat(TOKEN_FILE_BYTES_MAX as usize + 1),
    );
    let err = resolve(
        &ConfigFlags {
            token_file: Some(big),
            ..base_flags()
        },
        &[],
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn without_a_ca_file_the_token_pins_the_ca() {
    let text = token(1).expose().to_string();
    let c = resolve(
        &ConfigFlags {
            head: Some("h:1".into()),
            ..ConfigFlags::default()
        },
        &[(ENV_TOKEN, &text)],
        &[],
    )
    .unwrap();
    assert_eq!(c.ca_file, None);
    assert!(
        matches!(c.trust(), Ok(Trust::Pinned(fp)) if fp == [0x5c; FINGERPRINT_BYTES]),
        "{c:?}"
    );
    // A CA file, when given, is what is trusted.
    let c = resolve(&base_flags(), &[(ENV_TOKEN, &text)], &[]).unwrap();
    assert!(
        matches!(c.trust(), Ok(Trust::CaFile(p)) if p == Path::new("/ca.crt")),
        "{c:?}"
    );
    // Neither: the error says both ways.
    let err = resolve(
        &ConfigFlags {
            head: Some("h:1".into()),
            ..ConfigFlags::default()
        },
        &[],
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(err, ConfigError::Missing { key: "ca_file", .. }),
        "{err}"
    );
    let shown = err.to_string();
    assert!(
        shown.contains("--ca-file") && shown.contains("--token-file"),
        "{shown}"
    );
    // Built by hand without either, the client reports it too.
    let mut bare = ClientConfig::new("h:1", "/ca.crt");
    bare.ca_file = None;
    assert!(matches!(bare.trust(), Err(ClientError::NoTrust { .. })));
    let malformed = ClientConfig::from_token("h:1", Secret::new("flame1.x"));
    assert!(matches!(malformed.trust(), Err(ClientError::Token(_))));
}

#[test]
fn the_object_threshold_comes_from_the_flag_then_env_then_files_then_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", "object_inline_max = 4096\n");
    let files = [file];
    let config = resolve(&base_flags(), &[], &[]).unwrap();
    assert_eq!(
        config.object_inline_max,
        limits::OBJECT_INLINE_BYTES_DEFAULT
    );
    let config = resolve(&base_flags(), &[], &files).unwrap();
    assert_eq!(config.object_inline_max, 4096);
    let env = [(ENV_OBJECT_INLINE_MAX, "1MiB")];
    let config = resolve(&base_flags(), &env, &files).unwrap();
    assert_eq!(config.object_inline_max, 1024 * 1024);
    let config = resolve(&base_flags(), &[(ENV_OBJECT_INLINE_MAX, "")], &files).unwrap();
    assert_eq!(config.object_inline_max, 4096);
    let flags = ConfigFlags {
        object_inline_max: Some(7),
        ..base_flags()
    };
    let config = resolve(&flags, &env, &files).unwrap();
    assert_eq!(config.object_inline_max, 7);
    let err = resolve(&base_flags(), &[(ENV_OBJECT_INLINE_MAX, "lots")], &[]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { setting, .. } if setting == ENV_OBJECT_INLINE_MAX),
        "{err}"
    );
    assert!(err.to_string().contains("`lots`"), "{err}");
    assert_eq!(
        ClientConfig::new("h:1", "/ca.crt").object_inline_max,
        limits::OBJECT_INLINE_BYTES_DEFAULT
    );
}

#[test]
fn debug_output_never_shows_the_token() {
    let c = ClientConfig::new("h:1", "/ca.crt").with_token(token(9));
    let shown = format!("{c:?} {c:#?}");
    assert!(!shown.contains(&secret_hex(9)), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
    let with_identity = ClientConfig::new("h:1", "/ca.crt").with_identity("/c", "/k");
    assert_eq!(
        with_identity.identity,
        Some(IdentityFiles {
            cert: "/c".into(),
            key: "/k".into()
        })
    );
}

#[test]
fn unknown_keys_in_the_users_file_are_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "config.toml", "hed = \"h:1\"\n");
    let err = ClientConfig::resolve_with(
        &ConfigFlags::default(),
        env_of(&[]),
        std::slice::from_ref(&file),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown key `hed`"), "{err}");
    assert!(err.contains("head, ca_file"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[test]
fn an_unquoted_head_says_to_quote_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "config.toml", "head = 127.0.0.1:50057\n");
    let err = ClientConfig::resolve_with(
        &ConfigFlags::default(),
        env_of(&[]),
        std::slice::from_ref(&file),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("head = \"127.0.0.1:50057\""), "{err}");
}
