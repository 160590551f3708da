//! The daemons' ready lines: the one line each daemon prints on stdout once it serves, and
//! that whoever started it waits for.
//!
//! - `flame-head listening on IP:PORT`, once its endpoint is bound (the bound port, also
//!   when it was asked for port 0);
//! - `flame-node registered as NAME`, once the head accepted its registration, and again
//!   after each re-registration.
//!
//! The serving daemons print nothing else on stdout (logs go to stderr), so a launcher
//! reads stdout line by line until the line it waits for. The daemons print with
//! [`Daemon::ready_line`]; the launchers parse with [`Daemon::parse_ready`] or match
//! [`Daemon::ready_prefix`]: `flame_client::local::LocalCluster` (`flame local`, `flame
//! bench`, examples), the end-to-end harness (`tests/src/cluster.rs`,
//! `tests/tests/packages.rs`), and the supervisor `flame cluster up` runs on hosts without
//! systemd (given the prefix as `--ready-prefix`, which is why the prefixes are part of the
//! contract, not only the functions). Changing a line's text breaks supervisors already
//! deployed and any script that waits for the line: treat it as a protocol change.

use std::fmt::Display;

/// A daemon that prints a ready line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// `flame-head`: the detail is the address it listens on.
    Head,
    /// `flame-node`: the detail is the name it registered under.
    Node,
}

/// What `flame-head` prints on stdout, followed by `ip:port`, once it accepts connections.
pub const HEAD_READY_PREFIX: &str = "flame-head listening on ";
/// What `flame-node` prints on stdout, followed by its name, once the head registered it.
pub const NODE_READY_PREFIX: &str = "flame-node registered as ";

impl Daemon {
    /// The start of its ready line, up to and including the space before the detail.
    pub const fn ready_prefix(self) -> &'static str {
        match self {
            Daemon::Head => HEAD_READY_PREFIX,
            Daemon::Node => NODE_READY_PREFIX,
        }
    }

    /// The ready line, without its newline: the prefix and `detail` (the head's bound
    /// address, the node's name).
    pub fn ready_line(self, detail: impl Display) -> String {
        format!("{}{detail}", self.ready_prefix())
    }

    /// The detail of `line` when it is this daemon's ready line, trimmed of surrounding
    /// whitespace (and of the line's newline, if it still has one); `None` for any other
    /// line.
    pub fn parse_ready(self, line: &str) -> Option<&str> {
        line.trim_end()
            .strip_prefix(self.ready_prefix())
            .map(str::trim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_parses_back_to_its_detail() {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 7470).into();
        let line = Daemon::Head.ready_line(addr);
        assert_eq!(line, "flame-head listening on 127.0.0.1:7470");
        assert_eq!(Daemon::Head.parse_ready(&line), Some("127.0.0.1:7470"));
        let line = Daemon::Node.ready_line("node-1");
        assert_eq!(line, "flame-node registered as node-1");
        assert_eq!(
            Daemon::Node.parse_ready(&format!("{line}\r\n")),
            Some("node-1")
        );
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        assert_eq!(
            Daemon::Node.parse_ready("flame-head listening on 1.2.3.4:5"),
            None
        );
        assert_eq!(Daemon::Head.parse_ready("starting"), None);
        // The prefix with no detail is not a ready line.
        assert_eq!(Daemon::Head.parse_ready("flame-head listening on \n"), None);
    }
}
