//! Storage faults: a commit that failed, classified into what happened to the head's disk
//! and what an operator does about it, and the free space of the data directory.
//!
//! A fault is a state of the head, not an error of one request: while it lasts the core
//! admits no writes (clients are answered at once with [`StorageFault::message`]), keeps
//! the results it could not write, and the store writer probes the disk with a backoff
//! ([`PROBE_BACKOFF_MIN_MS`] doubling to [`PROBE_BACKOFF_MAX_MS`]) until a write succeeds.

use crate::store::StoreError;
use flame_protocol::model::STORAGE_FAULT_MARK;
use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// First pause of the store writer before it probes a faulted store.
pub const PROBE_BACKOFF_MIN_MS: u64 = 200;
/// Longest pause between two probes of a faulted store.
pub const PROBE_BACKOFF_MAX_MS: u64 = 5_000;
/// Free space the data directory needs before the store writer probes it: on a disk with
/// less, a write into the state file's free pages may succeed and the next fail again.
pub const PROBE_FREE_BYTES_MIN: u64 = 1 << 20;
/// While a fault lasts, the core says it still does at most this often.
pub const FAULT_LOG_INTERVAL_MS: u64 = 30_000;
/// How often the head reads its data directory's free space.
pub const FREE_SPACE_CHECK_INTERVAL_MS: u64 = 5_000;
/// Free space in the data directory below which the head warns (and `flame queue` shows
/// it), unless the configuration sets another threshold.
pub const LOW_SPACE_BYTES_DEFAULT: u64 = 1 << 30;

/// What kind of failure stopped the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// ENOSPC or EDQUOT: the disk (or the user's quota) is full.
    DiskFull,
    /// Any other I/O error from the file system.
    Io,
    /// redb refuses to go on after an earlier I/O error until the database is reopened.
    Poisoned,
    /// Anything else the store reported.
    Other,
}

/// A classified storage fault: its kind, the error as the store gave it, and the data
/// directory it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageFault {
    pub kind: FaultKind,
    pub detail: String,
    pub data_dir: PathBuf,
}

impl StorageFault {
    /// The cause and what to do, for clients and the log.
    pub fn message(&self) -> String {
        let dir = self.data_dir.display();
        let (what, todo) = match self.kind {
            FaultKind::DiskFull => (
                "its disk is full",
                format!("free space under its data directory {dir}"),
            ),
            FaultKind::Io => (
                "its disk fails",
                format!(
                    "check the file system of its data directory {dir} (dmesg, the device's health)"
                ),
            ),
            FaultKind::Poisoned => (
                "its state file must be reopened after an earlier I/O error",
                format!("check free space and the file system of its data directory {dir}"),
            ),
            FaultKind::Other => ("its store fails", format!("check its data directory {dir}")),
        };
        format!(
            "{STORAGE_FAULT_MARK}: {what} ({}); {todo}. The head resumes by itself once a write \
             succeeds",
            self.detail
        )
    }
}

impl std::fmt::Display for StorageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// The I/O error inside a store error, if there is one.
fn io_error(e: &StoreError) -> Option<&std::io::Error> {
    match e {
        StoreError::Redb(redb::Error::Io(io)) => Some(io),
        StoreError::Open {
            cause: redb::DatabaseError::Storage(redb::StorageError::Io(io)),
            ..
        } => Some(io),
        _ => None,
    }
}

/// Classifies a failed store operation. `free_bytes` is the data directory's free space
/// when known: redb's poisoned state after a full disk is reported as a full disk, which
/// is what an operator has to fix.
pub fn classify(e: &StoreError, data_dir: &Path, free_bytes: Option<u64>) -> StorageFault {
    let kind = match io_error(e) {
        Some(io)
            if io.raw_os_error().is_some_and(|code| {
                code == Errno::ENOSPC as i32 || code == Errno::EDQUOT as i32
            }) =>
        {
            FaultKind::DiskFull
        }
        Some(_) => FaultKind::Io,
        None if matches!(
            e,
            StoreError::Redb(redb::Error::PreviousIo)
                | StoreError::Open {
                    cause: redb::DatabaseError::Storage(redb::StorageError::PreviousIo),
                    ..
                }
        ) =>
        {
            FaultKind::Poisoned
        }
        None => FaultKind::Other,
    };
    let kind = if kind != FaultKind::DiskFull && free_bytes == Some(0) {
        FaultKind::DiskFull
    } else {
        kind
    };
    StorageFault {
        kind,
        detail: e.to_string(),
        data_dir: data_dir.to_path_buf(),
    }
}

/// Space of the file system holding `dir`: (available to the head's user, total), bytes.
pub fn free_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let unit = st.fragment_size() as u64;
    Ok((
        (st.blocks_available() as u64).saturating_mul(unit),
        (st.blocks() as u64).saturating_mul(unit),
    ))
}

/// The next pause of a backoff that starts at [`PROBE_BACKOFF_MIN_MS`].
pub fn next_backoff_ms(current_ms: u64) -> u64 {
    current_ms
        .saturating_mul(2)
        .clamp(PROBE_BACKOFF_MIN_MS, PROBE_BACKOFF_MAX_MS)
}

/// Why a group commit did not become durable, as the store writer reports it to the core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The store is faulted: this commit failed, or an earlier one did and the store takes
    /// no writes until a probe succeeds.
    #[error("{}", .0.message())]
    Faulted(StorageFault),
    /// The store writer has stopped (the head is shutting down).
    #[error("the store writer has stopped")]
    WriterStopped,
    /// The transaction was abandoned before anything reached the disk (a record could not
    /// be encoded): this commit fails, and the store is not faulted.
    #[error("{0}")]
    Refused(String),
}

/// The free space of the head's data directory, as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// The configured threshold below which the head warns.
    pub low_bytes: u64,
}

impl DiskSpace {
    pub fn is_low(&self) -> bool {
        self.free_bytes < self.low_bytes
    }
}

/// The head's view of its storage, kept by the core: the fault it is in, if any, and the
/// data directory's free space. Logs once per change of state, and while a fault lasts at
/// most every [`FAULT_LOG_INTERVAL_MS`].
#[derive(Debug, Default)]
pub struct StorageHealth {
    fault: Option<StorageFault>,
    since_ms: u64,
    logged_ms: u64,
    space: Option<DiskSpace>,
}

impl StorageHealth {
    pub fn is_faulted(&self) -> bool {
        self.fault.is_some()
    }

    /// The store writer reported a fault (a new one, or a change of its kind).
    pub fn enter(&mut self, fault: StorageFault, now_ms: u64) {
        if self.fault.as_ref() == Some(&fault) {
            return;
        }
        if self.fault.is_none() {
            self.since_ms = now_ms;
        }
        tracing::error!(
            kind = ?fault.kind,
            "storage fault: {}; writes are refused and results are held in memory until a probe write succeeds",
            fault.message()
        );
        self.logged_ms = now_ms;
        self.fault = Some(fault);
    }

    /// A probe write succeeded. Returns whether there was a fault to clear.
    pub fn recover(&mut self, now_ms: u64) -> bool {
        let Some(fault) = self.fault.take() else {
            return false;
        };
        tracing::info!(
            kind = ?fault.kind,
            faulted_ms = now_ms.saturating_sub(self.since_ms),
            "storage recovered: writes are admitted again and held results are written"
        );
        true
    }

    /// Periodic: while a fault lasts, says so at most every [`FAULT_LOG_INTERVAL_MS`].
    pub fn tick(&mut self, held_results: usize, now_ms: u64) {
        if let Some(fault) = &self.fault {
            if now_ms.saturating_sub(self.logged_ms) >= FAULT_LOG_INTERVAL_MS {
                self.logged_ms = now_ms;
                tracing::warn!(
                    kind = ?fault.kind,
                    faulted_ms = now_ms.saturating_sub(self.since_ms),
                    held_results,
                    "storage still faulted: {}",
                    fault.message()
                );
            }
        }
    }

    /// A new measurement of the free space; warns when it falls below the threshold and
    /// says when it is back above.
    pub fn measured(&mut self, space: DiskSpace) {
        let was_low = self.space.is_some_and(|s| s.is_low());
        if space.is_low() && !was_low {
            tracing::warn!(
                free_bytes = space.free_bytes,
                threshold_bytes = space.low_bytes,
                "the head's data directory is low on space; free some before it fills, or \
                 writes will stop"
            );
        } else if !space.is_low() && was_low {
            tracing::info!(
                free_bytes = space.free_bytes,
                "the head's data directory has space again"
            );
        }
        self.space = Some(space);
    }

    /// What `flame queue` shows of the head's storage.
    pub fn report(&self) -> Option<flame_protocol::model::HeadStorage> {
        let space = self.space?;
        Some(flame_protocol::model::HeadStorage {
            free_bytes: space.free_bytes,
            total_bytes: space.total_bytes,
            low_bytes: space.low_bytes,
            fault: self.fault.as_ref().map(StorageFault::message),
        })
    }

    /// The answer to a request that needs a commit while the store is faulted.
    pub fn refusal(&self) -> Option<flame_protocol::model::ApiError> {
        self.fault.as_ref().map(|f| {
            flame_protocol::model::ApiError::new(
                flame_protocol::model::ErrorKind::Unavailable,
                format!("refused: {}", f.message()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(code: i32) -> StoreError {
        StoreError::Redb(redb::Error::Io(std::io::Error::from_raw_os_error(code)))
    }

    #[test]
    fn a_full_disk_or_quota_is_named_with_the_directory_and_what_to_do() {
        let dir = Path::new("/var/lib/flame");
        for code in [Errno::ENOSPC as i32, Errno::EDQUOT as i32] {
            let f = classify(&io(code), dir, Some(10 << 20));
            assert_eq!(f.kind, FaultKind::DiskFull);
            let m = f.message();
            assert!(m.contains("disk is full"), "{m}");
            assert!(
                m.contains("free space under its data directory /var/lib/flame"),
                "{m}"
            );
        }
    }

    #[test]
    fn other_io_errors_poisoned_state_and_the_rest_are_told_apart() {
        let dir = Path::new("/d");
        assert_eq!(
            classify(&io(Errno::EIO as i32), dir, Some(1)).kind,
            FaultKind::Io
        );
        let poisoned = StoreError::Redb(redb::Error::PreviousIo);
        assert_eq!(classify(&poisoned, dir, Some(1)).kind, FaultKind::Poisoned);
        assert!(classify(&poisoned, dir, None)
            .message()
            .contains("must be reopened"));
        let other = StoreError::Corrupt {
            table: "tasks",
            cause: postcard::Error::DeserializeUnexpectedEnd,
        };
        assert_eq!(classify(&other, dir, Some(1)).kind, FaultKind::Other);
    }

    #[test]
    fn a_poisoned_store_on_a_disk_with_no_space_is_a_full_disk() {
        let poisoned = StoreError::Redb(redb::Error::PreviousIo);
        let f = classify(&poisoned, Path::new("/d"), Some(0));
        assert_eq!(f.kind, FaultKind::DiskFull);
        assert!(f.message().contains("disk is full"));
    }

    #[test]
    fn the_probe_backoff_doubles_within_its_limits() {
        let mut ms = PROBE_BACKOFF_MIN_MS;
        let mut seen = vec![ms];
        for _ in 0..10 {
            ms = next_backoff_ms(ms);
            seen.push(ms);
        }
        assert_eq!(&seen[..4], &[200, 400, 800, 1600]);
        assert_eq!(*seen.last().unwrap(), PROBE_BACKOFF_MAX_MS);
        assert_eq!(next_backoff_ms(0), PROBE_BACKOFF_MIN_MS);
    }

    #[test]
    fn free_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = free_space(dir.path()).unwrap();
        assert!(total > 0 && free <= total);
        assert!(free_space(&dir.path().join("missing")).is_err());
    }
}
