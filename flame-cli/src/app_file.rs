//! Application files: the TOML a user writes to register an application.
//!
//! ```toml
//! name = "pi"                 # required
//! command = "./pi-service"    # required; relative paths with a `/` are taken from this file's folder
//! shim = "stdio"              # default "stdio"
//! args = ["--fast"]           # default []
//! env = { RUST_LOG = "info" } # default {}
//! working_dir = "/srv/pi"     # optional, absolute
//! max_instances = 100         # default 100
//! delay_release = "60s"       # default "60s", a humantime duration
//! ```

use flame_protocol::model::{ApplicationSpec, ShimKind, SpecError};
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
    env: BTreeMap<String, String>,
    working_dir: Option<String>,
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
    let spec = ApplicationSpec {
        name: file.name,
        shim: file.shim,
        command,
        args: file.args,
        env: file.env,
        working_dir: file.working_dir,
        max_instances: file.max_instances,
        delay_release_ms,
        max_attempts: file.max_attempts,
        retry_on_error: file.retry_on_error,
        task_timeout_ms,
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

/// A toml error as `line L, column C: message`. The message of a missing or unknown field
/// already names the field, so it is kept as written.
pub(crate) fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    match err.span() {
        Some(span) if span.start <= text.len() => {
            let before = text.get(..span.start).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        _ => message.to_string(),
    }
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
        assert_eq!(spec.env.get("RUST_LOG").map(String::as_str), Some("info"));
        assert_eq!(spec.working_dir.as_deref(), Some("/srv"));
        assert_eq!(spec.max_instances, 7);
        assert_eq!(spec.delay_release_ms, 90_000);
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
