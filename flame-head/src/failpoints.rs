//! Named crash points for fault tests (TiKV's `fail-rs` style).
//!
//! A crash point makes the head die on the spot, with no cleanup, as `kill -9` would, at
//! a chosen dangerous instant: between a commit and its ack, between accepting a result
//! and making it durable, in the middle of a group commit. Tests configure them through
//! the `FLAME_FAILPOINTS` environment variable, `name=actions;...` in the `fail` crate's
//! syntax: `after-commit-before-ack=return` crashes at the first pass,
//! `after-commit-before-ack=5%return` at each pass with a 5 % chance,
//! `mid-batch=20*off->return` at the 21st.
//!
//! The points are compiled into debug builds only: a release build has no call sites and
//! pays nothing for them.

/// The crash points, for `FLAME_FAILPOINTS` (read by debug builds only).
#[cfg_attr(not(debug_assertions), allow(dead_code))]
pub const POINTS: [&str; 3] = [
    "after-commit-before-ack",
    "after-result-before-commit",
    "mid-batch",
];

/// Dies at `$name` when a test armed it; a no-op in release builds.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(debug_assertions)]
        fail::fail_point!($name, |_| -> () {
            eprintln!("flame-head: crash point `{}` reached; aborting", $name);
            std::process::abort()
        });
    };
}
pub(crate) use crash_point;

/// Arms the crash points named in `FLAME_FAILPOINTS`. A malformed value or an unknown name
/// is an error, not a silent no-op: a fault test that arms nothing proves nothing.
#[cfg(debug_assertions)]
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FLAME_FAILPOINTS") else {
        return Ok(());
    };
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, actions) = item
            .split_once('=')
            .ok_or_else(|| format!("FLAME_FAILPOINTS: `{item}` is not name=actions"))?;
        if !POINTS.contains(&name) {
            return Err(format!(
                "FLAME_FAILPOINTS: unknown crash point `{name}`; known: {}",
                POINTS.join(", ")
            ));
        }
        fail::cfg(name, actions).map_err(|e| format!("FLAME_FAILPOINTS: `{item}`: {e}"))?;
        tracing::warn!(point = name, actions, "crash point armed");
    }
    Ok(())
}

/// Release builds have no crash points; asking for one is an error.
#[cfg(not(debug_assertions))]
pub fn arm_from_env() -> Result<(), String> {
    match std::env::var("FLAME_FAILPOINTS") {
        Ok(_) => {
            Err("FLAME_FAILPOINTS is set, but this is a release build without crash points".into())
        }
        Err(_) => Ok(()),
    }
}
