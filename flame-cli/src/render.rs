//! Output: aligned tables or JSON on stdout, and the number, size and time formats they use.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How a listing or a show prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// The protocol's model types as JSON, for scripts.
    Json,
}

/// The `--output` flag of listings and shows.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output format
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Stdout is a closed pipe (`flame app list | head -1`): the reader has what it wanted.
///
/// Every write to stdout in this crate maps `EPIPE` to this error, and `main` ends the
/// process quietly with status 0 when it reaches the top, as `ripgrep` does. The error
/// travels up like any other, so sessions are still cancelled and connections closed on
/// the way. `SIGPIPE` is deliberately left ignored (the Rust default) rather than reset to
/// its default action: `flame` also writes to sockets and to the pipes of the children it
/// starts (`flame local`, `flame cluster`), where a closed peer is an error to handle, not
/// a reason to die without cleaning up.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
pub struct StdoutClosed;

/// Maps a failed write to stdout: `EPIPE` becomes [`StdoutClosed`], anything else an error
/// naming stdout.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// Writes one formatted line to stdout; see [`StdoutClosed`] for a closed pipe.
pub fn write_line(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(stdout_error)
}

/// `println!` that returns an error instead of panicking when stdout is closed, to be used
/// with `?` everywhere this crate prints to stdout.
macro_rules! outln {
    () => {
        $crate::render::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::render::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode the output as JSON")?;
    outln!("{text}")
}

/// A column: its header and whether its cells are numbers (right-aligned).
pub struct Column {
    pub header: &'static str,
    pub numeric: bool,
}

/// A text column.
pub const fn text(header: &'static str) -> Column {
    Column {
        header,
        numeric: false,
    }
}

/// A number column.
pub const fn number(header: &'static str) -> Column {
    Column {
        header,
        numeric: true,
    }
}

/// Prints rows under borderless, aligned headers, like `ps` or `kubectl get`.
pub fn print_table(columns: &[Column], rows: Vec<Vec<String>>) -> anyhow::Result<()> {
    outln!("{}", table(columns, rows))
}

/// The text [`print_table`] prints, without the final newline.
pub fn table(columns: &[Column], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        // Long cells stay on one line: wrapping would break `grep` and `awk`.
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(columns.iter().map(|c| {
            let cell = Cell::new(c.header);
            if c.numeric {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
    for row in rows {
        table.add_row(row);
    }
    for (column, spec) in table.column_iter_mut().zip(columns) {
        column.set_padding((0, 3));
        if spec.numeric {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

/// An application's name for a table: a batch job's ranks run under an internal
/// application `job.N`, shown as `(job)`, since the row's id is the job's and `flame job`
/// shows it.
pub fn application(name: &str) -> String {
    if flame_protocol::model::job_of_application(name).is_some() {
        "(job)".to_string()
    } else {
        name.to_string()
    }
}

/// Thousandths as a percentage with one decimal: `250` → `25.0%`.
pub fn permille(p: u32) -> String {
    format!("{}.{}%", p / 10, p % 10)
}

/// Prints `field: value` pairs aligned, for one object.
pub fn print_fields(fields: Vec<(&str, String)>) -> anyhow::Result<()> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in fields {
        outln!("{:<width$}  {value}", format!("{key}:"), width = width + 1)?;
    }
    Ok(())
}

pub use flame_client::report::group;

/// Bytes in binary units: `512 B`, `1.5 KiB`, `15.6 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long before `now_ms` the time `ms` was, e.g. `3s ago`; `just now` for the future.
pub fn ago(ms: u64, now_ms: u64) -> String {
    match now_ms.checked_sub(ms) {
        Some(d) if d >= 1000 => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(d / 1000))
        ),
        _ => "just now".to_string(),
    }
}

/// A Unix time in milliseconds as local wall time: `HH:MM:SS` when it is today,
/// `YYYY-MM-DD HH:MM` otherwise. Falls back to UTC (RFC 3339) if the local time zone
/// cannot be applied.
pub fn local_time(ms: u64, now_ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    match (local_tm(secs), local_tm(now_secs)) {
        (Some(t), Some(now)) if (t.tm_year, t.tm_yday) == (now.tm_year, now.tm_yday) => {
            format!("{:02}:{:02}:{:02}", t.tm_hour, t.tm_min, t.tm_sec)
        }
        (Some(t), _) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            i64::from(t.tm_year) + 1900,
            t.tm_mon + 1,
            t.tm_mday,
            t.tm_hour,
            t.tm_min
        ),
        (None, _) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
    }
}

/// The broken-down local time of `secs` since the epoch, from the C library, which knows
/// the time zone (TZ, /etc/localtime); the standard library does not.
fn local_tm(secs: i64) -> Option<nix::libc::tm> {
    let t: nix::libc::time_t = secs;
    let mut tm = std::mem::MaybeUninit::<nix::libc::tm>::zeroed();
    // SAFETY: `localtime_r` is the thread-safe variant: it reads `t` and writes only into
    // the `tm` we own, and returns null on failure.
    let result = unsafe { nix::libc::localtime_r(&t, tm.as_mut_ptr()) };
    if result.is_null() {
        return None;
    }
    // SAFETY: `localtime_r` succeeded, so it filled `tm` (which was zeroed before anyway).
    Some(unsafe { tm.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024 * 1024), "16.0 GiB");
    }

    #[test]
    fn jobs_internal_applications_show_as_jobs() {
        assert_eq!(application("job.7"), "(job)");
        assert_eq!(application("ping"), "ping");
    }

    #[test]
    fn permille_as_percent() {
        assert_eq!(permille(0), "0.0%");
        assert_eq!(permille(250), "25.0%");
        assert_eq!(permille(333), "33.3%");
        assert_eq!(permille(1000), "100.0%");
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago(10_000, 10_500), "just now");
        assert_eq!(ago(10_000, 13_000), "3s ago");
        assert_eq!(ago(20_000, 10_000), "just now");
    }

    #[test]
    fn local_time_has_a_clock_shape() {
        let now = now_ms();
        let today = local_time(now, now);
        assert_eq!(today.len(), 8, "{today}");
        assert_eq!(today.matches(':').count(), 2, "{today}");
        let long_ago = local_time(86_400_000 * 400, now);
        assert!(long_ago.starts_with("1971-"), "{long_ago}");
    }
}
