//! What a test needs from the machine, and what happens when it is missing: under CI
//! (`CI=true`) the test fails, since CI must provide it; elsewhere it is skipped, loudly, so
//! that a developer without root can still run the rest of the suite. Never silently.

use flame_protocol::model::NodeInfo;

/// Whether CI runs the tests (`CI=true`).
pub fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `true` when nothing is `missing`; otherwise panics under CI, or prints `SKIPPED` and
/// returns `false`.
pub fn require(test: &str, missing: Option<String>) -> bool {
    let Some(missing) = missing else {
        return true;
    };
    if under_ci() {
        panic!("{test} cannot run: {missing}; CI must provide it");
    }
    eprintln!("SKIPPED {test}: {missing} (under CI=true this fails)");
    false
}

/// Root is needed to switch users and to make cgroups.
pub fn root(test: &str) -> bool {
    require(
        test,
        (!nix::unistd::geteuid().is_root())
            .then(|| "it must run as root (executor users and cgroups)".to_string()),
    )
}

/// The node enforces limits with cgroups (`isolation` is not `none`).
pub fn cgroups(test: &str, node: &NodeInfo) -> bool {
    require(
        test,
        (node.isolation == flame_protocol::model::Isolation::None).then(|| {
            format!(
                "node {} has no cgroup isolation (root and a cgroup v1 or v2 hierarchy with cpu, memory and pids are needed)",
                node.name
            )
        }),
    )
}

/// `tool` on `PATH`; `package` names what provides it.
pub fn on_path(test: &str, tool: &str, package: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
    require(
        test,
        (!found).then(|| {
            format!(
                "`{tool}` is not on PATH ({}); install {package}",
                path.to_string_lossy()
            )
        }),
    )
}

/// `python3` on `PATH`.
pub fn python3(test: &str) -> bool {
    on_path(test, "python3", "python3")
}
