//! `flame-ping`: the built-in application. It echoes each task's input followed by the name
//! of the node and the executor that ran it (see [`flame_protocol::ping`]), so `flame ping`
//! can check that every task reached an executor and came back with its own output.

use flame_shims::service::{executor_info, run, Service, TaskContext};

/// Stands in for an executor id when the process runs outside Flame (e.g. under
/// `flame-shim-check`), so the reply still passes `check_reply`.
const UNKNOWN_EXECUTOR: &str = "unknown";

/// The ping service: where it runs is fixed at start-up.
#[derive(Debug)]
struct Ping {
    host: String,
    executor: String,
}

impl Service for Ping {
    fn invoke(&mut self, _ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        Ok(flame_protocol::ping::reply(
            input,
            &self.host,
            &self.executor,
        ))
    }
}

fn main() {
    flame_shims::service::exit_if_help(
        "flame-ping: the built-in `ping` application; echoes each input with the node and executor that ran it.",
    );
    let info = executor_info();
    let host = match info.node {
        Some(node) => node,
        None => {
            match nix::unistd::gethostname() {
                Ok(name) => name.to_string_lossy().into_owned(),
                Err(e) => {
                    eprintln!("flame-ping: error: FLAME_NODE is unset and the host name is unreadable: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let executor = info
        .executor_id
        .unwrap_or_else(|| UNKNOWN_EXECUTOR.to_owned());
    if let Err(e) = run(Ping { host, executor }) {
        eprintln!("flame-ping: error: {e}");
        std::process::exit(1);
    }
}
