//! Application files: the TOML a user writes to register an application.
//!
//! ```toml
//! name = "pi"                 # required
//! command = "./pi-service"    # required; relative paths with a `/` are taken from this file's folder
//! shim = "stdio"              # "stdio" (default) or "unix"
//! args = ["--fast"]           # default []
//! working_dir = "/srv/pi"     # optional, absolute
//! users = ["alice"]           # who may open sessions of it; default: everyone
//! groups = ["lab"]            # and members of these groups (the head's [groups]); default: none
//! user = "svc-pi"             # optional, only with `users` naming one user and no `groups`;
//!                             # default: each owner's own identity on the node (its mode)
//! group = "svc"               # optional, same rule; default: the user's primary group
//! max_instances = 100         # default 100
//! delay_release = "60s"       # default "60s", a humantime duration
//! max_attempts = 3            # default 3
//! retry_on_error = false      # default false
//! task_timeout = "10m"        # optional, a humantime duration
//! allow_root = false          # default false; executors run as root only if this and the node allow it
//!
//! [env]                       # default {}
//! RUST_LOG = "info"
//! API_TOKEN = { value = "s3cret", secret = true }   # stored, never shown
//!
//! [resources]                 # per executor
//! cpus = 0.5                  # default 1; fractions allowed
//! memory = "512MiB"           # optional limit: bytes, or a size such as "2GiB" ("2GB" is decimal)
//! gpus = 0                    # default 0
//!
//! [selector]                  # only nodes with all these labels
//! zone = "a"
//! ```

use flame_protocol::model::{ApplicationSpec, EnvValue, Resources, ShimKind, SpecError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `max_instances` when the file does not say.
pub const DEFAULT_MAX_INSTANCES: u32 = 100;
/// `delay_release` when the file does not say.
pub const DEFAULT_DELAY_RELEASE: &str = "60s";
/// Largest application file read.
pub const APP_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// An application file that could not be turned into an [`ApplicationSpec`]. Every variant
/// names the file; parse and validation errors name the field.
#[derive(Debug, thiserror::Error)]
pub enum AppFileError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`APP_FILE_BYTES_MAX`].
    #[error("{}: the file is {len} bytes; an application file may hold at most {max} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Not valid TOML, a missing or unknown field, or a value of the wrong type.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (which names the field), with the line and column when known.
        message: String,
    },
    /// The values parsed but one of them is not acceptable.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field and the reason.
        source: SpecError,
    },
}

/// The file's layout; converted to the wire's [`ApplicationSpec`] after checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    name: String,
    #[serde(default)]
    shim: ShimKind,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, EnvEntry>,
    working_dir: Option<String>,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    resources: ResourcesFile,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default = "default_max_instances")]
    max_instances: u32,
    #[serde(default = "default_delay_release")]
    delay_release: String,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default)]
    retry_on_error: bool,
    /// A humantime duration such as "30s"; absent means no limit.
    task_timeout: Option<String>,
    #[serde(default)]
    allow_root: bool,
}

/// An `[env]` value: a string, or `{ value = "…", secret = true }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EnvEntry {
    Plain(String),
    Table(EnvTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvTable {
    value: String,
    #[serde(default)]
    secret: bool,
}

/// The `[resources]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    cpus: Option<Number>,
    memory: Option<Size>,
    gpus: Option<u32>,
}

/// A number written as an integer or a float.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

/// A size written as bytes or as text such as "512MiB".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(i64),
    Text(String),
}

/// `cpus` as thousandths of a cpu.
fn cpu_millis(n: Number) -> Result<u32, String> {
    let cpus = match n {
        Number::Int(i) => i as f64,
        Number::Float(f) => f,
    };
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(format!(
            "is {cpus}; it must be a positive number such as 0.5 or 2"
        ));
    }
    let millis = (cpus * 1000.0).round();
    if millis > f64::from(u32::MAX) {
        return Err(format!("is {cpus}; that is far too many"));
    }
    Ok(millis as u32)
}

fn memory_bytes(size: &Size) -> Result<u64, String> {
    match size {
        Size::Bytes(b) => u64::try_from(*b).map_err(|_| format!("is {b}; it must not be negative")),
        Size::Text(t) => crate::units::parse_size(t).map_err(|e| e.to_string()),
    }
}

fn default_max_attempts() -> u32 {
    flame_protocol::model::APP_MAX_ATTEMPTS_DEFAULT
}

fn default_max_instances() -> u32 {
    DEFAULT_MAX_INSTANCES
}

fn default_delay_release() -> String {
    DEFAULT_DELAY_RELEASE.to_string()
}

/// Reads, parses and validates the application file at `path`.
pub fn load_app_file(path: &Path) -> Result<ApplicationSpec, AppFileError> {
    let read_err = |source| AppFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > APP_FILE_BYTES_MAX {
        return Err(AppFileError::TooLarge {
            path: path.to_path_buf(),
            len,
            max: APP_FILE_BYTES_MAX,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_app_file(&text, path)
}

/// Parses and validates application-file `text` that was read from `path`. The path names
/// the file in errors, and a relative `command` containing a `/` is resolved against its
/// folder (made absolute with the current directory when the path itself is relative).
pub fn parse_app_file(text: &str, path: &Path) -> Result<ApplicationSpec, AppFileError> {
    let file: AppFile = toml::from_str(text).map_err(|e| AppFileError::Parse {
        path: path.to_path_buf(),
        message: describe_toml_error(text, &e),
    })?;
    let invalid = |field: &'static str, reason: String| AppFileError::Invalid {
        path: path.to_path_buf(),
        source: SpecError { field, reason },
    };
    let delay = humantime::parse_duration(&file.delay_release).map_err(|e| {
        invalid(
            "delay_release",
            format!(
                "`{}` is not a duration such as \"30s\" or \"5m\": {e}",
                file.delay_release
            ),
        )
    })?;
    let delay_release_ms = u64::try_from(delay.as_millis())
        .map_err(|_| invalid("delay_release", "is far too long".to_string()))?;
    let task_timeout_ms = match &file.task_timeout {
        None => None,
        Some(text) => {
            let d = humantime::parse_duration(text).map_err(|e| {
                invalid(
                    "task_timeout",
                    format!("`{text}` is not a duration such as \"30s\" or \"5m\": {e}"),
                )
            })?;
            Some(
                u64::try_from(d.as_millis())
                    .map_err(|_| invalid("task_timeout", "is far too long".to_string()))?,
            )
        }
    };
    let command =
        resolve_command(&file.command, path).map_err(|reason| invalid("command", reason))?;
    let defaults = Resources::default();
    let resources = Resources {
        cpu_millis: match file.resources.cpus {
            Some(n) => cpu_millis(n).map_err(|r| invalid("resources.cpus", r))?,
            None => defaults.cpu_millis,
        },
        memory_bytes: match &file.resources.memory {
            Some(m) => Some(memory_bytes(m).map_err(|r| invalid("resources.memory", r))?),
            None => None,
        },
        gpus: file.resources.gpus.unwrap_or(defaults.gpus),
    };
    let env = file
        .env
        .into_iter()
        .map(|(k, v)| {
            let value = match v {
                EnvEntry::Plain(value) => EnvValue::plain(value),
                EnvEntry::Table(t) => EnvValue {
                    value: t.value,
                    secret: t.secret,
                },
            };
            (k, value)
        })
        .collect();
    let spec = ApplicationSpec {
        name: file.name,
        shim: file.shim,
        command,
        args: file.args,
        env,
        working_dir: file.working_dir,
        user: file.user,
        group: file.group,
        users: file.users,
        groups: file.groups,
        resources,
        selector: file.selector,
        max_instances: file.max_instances,
        delay_release_ms,
        max_attempts: file.max_attempts,
        retry_on_error: file.retry_on_error,
        task_timeout_ms,
        allow_root: file.allow_root,
    };
    spec.validate().map_err(|source| AppFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(spec)
}

/// A relative command with a `/` (`./svc`, `bin/svc`) names a file next to the application
/// file, so it is made absolute; a bare name (`python3`) is left for the node's `PATH`.
fn resolve_command(command: &str, app_file: &Path) -> Result<String, String> {
    let as_path = Path::new(command);
    if !command.contains('/') || as_path.is_absolute() {
        return Ok(command.to_string());
    }
    let file = std::path::absolute(app_file)
        .map_err(|e| format!("cannot make `{command}` absolute: {e}"))?;
    let dir = file.parent().unwrap_or(Path::new("/"));
    // `components()` drops the interior `.` of `dir/./svc`.
    let resolved: PathBuf = dir.join(as_path).components().collect();
    resolved.into_os_string().into_string().map_err(|p| {
        format!(
            "resolved path {} is not valid UTF-8",
            Path::new(&p).display()
        )
    })
}

/// A toml error as `line L, column C: field `F`: message`. The message of a missing or
/// unknown field already names the field; for a bad value the field is taken from the
/// `key = value` line the error points at, with its `[table]`.
pub(crate) fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    match err.span() {
        Some(span) if span.start <= text.len() => {
            let before = text.get(..span.start).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            match field_at(text, line) {
                Some(field) if !message.contains("field `") => {
                    format!("line {line}, column {column}: field `{field}`: {message}")
                }
                _ => format!("line {line}, column {column}: {message}"),
            }
        }
        _ => message.to_string(),
    }
}

/// The dotted name of the key assigned on `line` (1-based), e.g. `resources.cpus`.
fn field_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?;
    let (key, _) = here.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = lines[..line - 1].iter().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ApplicationSpec, AppFileError> {
        parse_app_file(text, Path::new("/apps/pi.toml"))
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let spec = parse("name = \"pi\"\ncommand = \"pi-service\"\n").unwrap();
        assert_eq!(spec.name, "pi");
        assert_eq!(spec.shim, ShimKind::Stdio);
        assert_eq!(spec.command, "pi-service");
        assert!(spec.args.is_empty());
        assert!(spec.env.is_empty());
        assert_eq!(spec.working_dir, None);
        assert_eq!(spec.max_instances, DEFAULT_MAX_INSTANCES);
        assert_eq!(spec.delay_release_ms, 60_000);
    }

    #[test]
    fn full_file_parses() {
        let spec = parse(
            r#"
name = "pi"
shim = "stdio"
command = "/usr/bin/pi"
args = ["-n", "3"]
env = { RUST_LOG = "info" }
working_dir = "/srv"
max_instances = 7
delay_release = "1m 30s"
"#,
        )
        .unwrap();
        assert_eq!(spec.args, vec!["-n", "3"]);
        assert_eq!(spec.env.get("RUST_LOG"), Some(&EnvValue::plain("info")));
        assert_eq!(spec.working_dir.as_deref(), Some("/srv"));
        assert_eq!(spec.max_instances, 7);
        assert_eq!(spec.delay_release_ms, 90_000);
    }

    #[test]
    fn resources_user_selector_and_secrets_parse() {
        let spec = parse(
            r#"
name = "hog"
command = "/bin/hog"
shim = "unix"
user = "nobody"
group = "nogroup"
users = ["alice"]
[env]
PLAIN = "shown"
TOKEN = { value = "s3cret", secret = true }
[resources]
cpus = 0.5
memory = "64MiB"
gpus = 1
[selector]
zone = "a"
"#,
        )
        .unwrap();
        assert_eq!(spec.shim, ShimKind::Unix);
        assert_eq!(spec.user.as_deref(), Some("nobody"));
        assert_eq!(spec.group.as_deref(), Some("nogroup"));
        assert_eq!(spec.users, vec!["alice".to_string()]);
        assert!(spec.groups.is_empty());
        assert_eq!(spec.resources.cpu_millis, 500);
        assert_eq!(spec.resources.memory_bytes, Some(64 << 20));
        assert_eq!(spec.resources.gpus, 1);
        assert_eq!(spec.selector.get("zone").map(String::as_str), Some("a"));
        assert!(spec.env["TOKEN"].secret);
        assert!(!spec.env["PLAIN"].secret);
        let spec =
            parse("name = \"a\"\ncommand = \"x\"\n[resources]\ncpus = 2\nmemory = 1073741824\n")
                .unwrap();
        assert_eq!(spec.resources.cpu_millis, 2000);
        assert_eq!(spec.resources.memory_bytes, Some(1 << 30));
    }

    #[test]
    fn every_bad_field_is_named() {
        let base = "name = \"a\"\ncommand = \"x\"\n";
        let cases = [
            ("shim = \"tcp\"\n", "shim"),
            ("user = \"Bad User\"\nusers = [\"a\"]\n", "user"),
            ("group = \"\"\nusers = [\"a\"]\n", "group"),
            // A fixed identity would be shared by every user who may use it.
            ("user = \"nobody\"\n", "user"),
            ("user = \"nobody\"\nusers = [\"a\", \"b\"]\n", "user"),
            (
                "group = \"nogroup\"\nusers = [\"a\"]\ngroups = [\"lab\"]\n",
                "group",
            ),
            ("users = [\"a b\"]\n", "users"),
            ("groups = [\"\"]\n", "groups"),
            ("working_dir = \"rel\"\n", "working_dir"),
            ("max_instances = 0\n", "max_instances"),
            ("max_attempts = 0\n", "max_attempts"),
            ("delay_release = \"2d\"\n", "delay_release"),
            ("task_timeout = \"0s\"\n", "task_timeout"),
            ("[resources]\ncpus = 0\n", "resources.cpus"),
            ("[resources]\ncpus = -1.5\n", "resources.cpus"),
            ("[resources]\ncpus = 0.001\n", "resources.cpus"),
            ("[resources]\nmemory = \"lots\"\n", "resources.memory"),
            ("[resources]\nmemory = 100\n", "resources.memory"),
            ("[resources]\ngpus = 1000\n", "resources.gpus"),
            ("[resources]\ndisk = 1\n", "disk"),
            ("[selector]\n\"Bad Key\" = \"x\"\n", "selector"),
            ("[env]\n\"A=B\" = \"x\"\n", "env"),
            ("[env]\nA = { value = \"x\", hidden = true }\n", "env"),
        ];
        for (extra, field) in cases {
            let err = parse(&format!("{base}{extra}")).unwrap_err();
            assert!(err.to_string().contains(field), "{extra:?}: {err}");
        }
    }

    #[test]
    fn missing_field_is_named_with_the_file() {
        let err = parse("name = \"pi\"\n").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AppFileError::Parse { .. }), "{text}");
        assert!(text.starts_with("/apps/pi.toml: "), "{text}");
        assert!(text.contains("missing field `command`"), "{text}");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = parse("name = \"pi\"\ncommand = \"x\"\ncomand = \"y\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field `comand`"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn bad_delay_release_names_the_field() {
        let err = parse("name = \"pi\"\ncommand = \"x\"\ndelay_release = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        match &err {
            AppFileError::Invalid { source, .. } => assert_eq!(source.field, "delay_release"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            text.starts_with("/apps/pi.toml: field `delay_release`: "),
            "{text}"
        );
        assert!(text.contains("soon"), "{text}");
    }

    #[test]
    fn validation_errors_name_file_and_field() {
        let err = parse("name = \"pi\"\ncommand = \"\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/apps/pi.toml: field `command`: must not be empty"
        );
        let err = parse("name = \"Pi\"\ncommand = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("field `name`"), "{err}");
        let err = parse("name = \"pi\"\ncommand = \"x\"\nmax_instances = 0\n").unwrap_err();
        assert!(err.to_string().contains("field `max_instances`"), "{err}");
    }

    #[test]
    fn relative_commands_resolve_against_the_file() {
        let spec = parse("name = \"pi\"\ncommand = \"./pi-service\"\n").unwrap();
        assert_eq!(spec.command, "/apps/pi-service");
        let spec = parse("name = \"pi\"\ncommand = \"bin/pi-service\"\n").unwrap();
        assert_eq!(spec.command, "/apps/bin/pi-service");
        let spec = parse("name = \"pi\"\ncommand = \"../bin/pi\"\n").unwrap();
        assert_eq!(spec.command, "/apps/../bin/pi");
        // Bare names are looked up in the node's PATH; absolute paths stay as written.
        let spec = parse("name = \"pi\"\ncommand = \"python3\"\n").unwrap();
        assert_eq!(spec.command, "python3");
        let spec = parse("name = \"pi\"\ncommand = \"/opt/pi\"\n").unwrap();
        assert_eq!(spec.command, "/opt/pi");
    }

    #[test]
    fn relative_file_path_is_made_absolute() {
        let spec = parse_app_file(
            "name = \"pi\"\ncommand = \"./svc\"\n",
            Path::new("apps/pi.toml"),
        )
        .unwrap();
        let expected = std::env::current_dir().unwrap().join("apps/svc");
        assert_eq!(Path::new(&spec.command), expected);
    }

    #[test]
    fn load_reads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pi.toml");
        std::fs::write(&path, "name = \"pi\"\ncommand = \"./svc\"\n").unwrap();
        let spec = load_app_file(&path).unwrap();
        assert_eq!(Path::new(&spec.command), dir.path().join("svc"));
        let err = load_app_file(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(err, AppFileError::Read { .. }), "{err}");
    }
}
