//! The trace hashes both seeded simulations gave for their default seeds, pinned (tests only).
//!
//! A refactor of the core or the scheduler must not change a single decision, and the trace
//! hash of a seed (every event and every decision the simulation saw, hashed) is the proof:
//! the default runs of [`crate::simulation`] and [`crate::scheduler_sim`] compare each seed's
//! hash with the one recorded in `core.txt` and `scheduler.txt` beside this file.
//!
//! A change that alters a decision on purpose (a new rule, a different order of outputs)
//! re-records them with `FLAME_SIM_BLESS=1 cargo test -p flame-head --bin flame-head
//! simulation`, and its commit message says which decision changed and why. The files were
//! first recorded at commit 36a7aaf, before issue 19's refactor.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One simulation's pinned hashes: its file's text and its path for re-recording.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pinned {
    pub(crate) name: &'static str,
    pub(crate) text: &'static str,
    pub(crate) file: &'static str,
}

pub(crate) const CORE: Pinned = Pinned {
    name: "core simulation",
    text: include_str!("core.txt"),
    file: concat!(env!("CARGO_MANIFEST_DIR"), "/src/sim_traces/core.txt"),
};

pub(crate) const SCHEDULER: Pinned = Pinned {
    name: "scheduler simulation",
    text: include_str!("scheduler.txt"),
    file: concat!(env!("CARGO_MANIFEST_DIR"), "/src/sim_traces/scheduler.txt"),
};

/// `seed hash` lines, `#` comments ignored.
fn parse(text: &str) -> Result<BTreeMap<u64, u64>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(seed, hash)| {
            let hash = hash.trim().trim_start_matches("0x");
            Some((seed.parse().ok()?, u64::from_str_radix(hash, 16).ok()?))
        });
        match parsed {
            Some((seed, hash)) => {
                out.insert(seed, hash);
            }
            None => return Err(format!("line {}: {line:?} is not `SEED 0xHASH`", n + 1)),
        }
    }
    Ok(out)
}

/// Checks `got` (seed, hash) against the pinned file, or re-records the file under
/// `FLAME_SIM_BLESS=1`. Panics naming every seed whose trace changed.
pub(crate) fn check(pinned: Pinned, steps: usize, got: &[(u64, u64)]) {
    if std::env::var_os("FLAME_SIM_BLESS").is_some() {
        let mut text = format!(
            "# {} trace hashes, {steps} steps per seed: `SEED HASH`.\n\
             # Re-recorded by FLAME_SIM_BLESS=1 (see sim_traces/mod.rs).\n",
            pinned.name
        );
        for (seed, hash) in got {
            let _ = writeln!(text, "{seed} {hash:#018x}");
        }
        if let Err(e) = std::fs::write(pinned.file, text) {
            panic!("cannot write {}: {e}", pinned.file);
        }
        eprintln!("{}: re-recorded {} trace hashes", pinned.name, got.len());
        return;
    }
    let want = match parse(pinned.text) {
        Ok(want) => want,
        Err(e) => panic!("{}: {e}", pinned.file),
    };
    let mut changed = Vec::new();
    for (seed, hash) in got {
        match want.get(seed) {
            Some(w) if w == hash => {}
            Some(w) => changed.push(format!("seed {seed}: pinned {w:#018x}, now {hash:#018x}")),
            None => changed.push(format!("seed {seed}: no pinned hash")),
        }
    }
    assert!(
        changed.is_empty(),
        "{}: {} of {} seeds made different decisions than the pinned traces in {}:\n  {}\n\
         If the change is meant, re-record with FLAME_SIM_BLESS=1 and say why in the commit.",
        pinned.name,
        changed.len(),
        got.len(),
        pinned.file,
        changed.join("\n  ")
    );
}
