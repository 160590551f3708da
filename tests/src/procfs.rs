//! Looking at processes through `/proc`: whether one is alive, its open descriptors, its
//! zombie children, and which processes carry a marker on their command line. Every
//! function reads a snapshot; a process that exits meanwhile is simply not in it.

use std::path::PathBuf;

/// A process's state letter and parent, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub ppid: i32,
}

/// `/proc/<pid>/stat`'s state and parent; `None` when there is no such process.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The state and parent in a stat line: `pid (comm) state ppid ...`, where comm may hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (_, after) = text.rsplit_once(')')?;
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid })
}

/// Clock ticks per second in `/proc/<pid>/stat`'s times: Linux's `USER_HZ`, 100 on
/// every architecture's user ABI.
pub const USER_HZ: u64 = 100;

/// The CPU time `pid` has used, user and system, in [`USER_HZ`] ticks; `None` when there
/// is no such process.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = text.rsplit_once(')')?;
    // After the comm: state is field 3, utime 14 and stime 15.
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Whether `pid` is a process that still runs: it exists and is neither a zombie nor dead.
pub fn is_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Children of `ppid` in state `Z`: exited, and never waited for.
pub fn zombie_children(ppid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.ppid == ppid && s.state == 'Z'))
        .collect()
}

/// Children of `ppid`, whatever their state.
pub fn children(ppid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.ppid == ppid))
        .collect()
}

/// The descriptors `pid` has open, each with what it points to (`socket:[123]`, a path,
/// ...). `Err` when the folder cannot be read.
pub fn fds(pid: i32) -> Result<Vec<(i32, String)>, String> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut fds: Vec<(i32, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            Some((fd, target))
        })
        .collect();
    fds.sort();
    Ok(fds)
}

/// The command line of `pid` with its arguments joined by spaces; `None` when it is gone
/// (or a kernel thread, which has none).
pub fn cmdline(pid: i32) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if bytes.is_empty() {
        return None;
    }
    let args: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// Processes (other than zombies) whose command line contains `marker`, with it.
pub fn with_cmdline_containing(marker: &str) -> Vec<(i32, String)> {
    all_pids()
        .into_iter()
        .filter(|&p| is_alive(p))
        .filter_map(|p| cmdline(p).map(|c| (p, c)))
        .filter(|(_, c)| c.contains(marker))
        .collect()
}

/// A process's resident set size and its peak (`VmRSS`, `VmHWM` in /proc/PID/status), in
/// KiB; `None` when it is gone.
pub fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let s = parse_stat("42 (a) b) (c) Z 7 42 42 0 -1").unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'Z',
                ppid: 7
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_has_descriptors() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(fds(me).unwrap().iter().any(|(fd, _)| *fd == 0));
        assert!(cmdline(me).is_some());
    }
}
