//! `pi-service`: the pi application in Rust. The node starts it and speaks the stdio shim
//! protocol with it; see `flame_example_pi::wire` for what the tasks carry.

use flame_example_pi::service::PiService;

fn main() {
    flame_shims::service::exit_if_help(
        "pi-service: the example application that estimates pi by sampling (see examples/pi).",
    );
    if let Err(e) = flame_shims::service::run(PiService::default()) {
        eprintln!("error: pi-service: {e}");
        std::process::exit(1);
    }
}
