//! A folder that root makes and hands to an executor's user, and the few file operations
//! root still does inside it, none of which follows a path that user can change.
//!
//! Once a folder belongs to the executor's user, every name in it is theirs: any program of
//! that user (another executor, a `flame submit --each` line) may put a symbolic link, a hard
//! link or a file of their own under the name root is about to use. So root never opens a
//! path in it. [`PrivateDir`] keeps a descriptor of the folder itself, opened when root made
//! it (before the hand-over), and each operation names one entry relative to it:
//!
//! - [`PrivateDir::write_new`] creates a file that must not exist yet (`O_CREAT | O_EXCL`,
//!   which never follows a link and never opens an existing file), then sets its mode and
//!   owner on the open descriptor (`fchmod`, `fchown`). A name already taken is an error
//!   that says so; nothing outside the folder is touched.
//! - [`PrivateDir::open_socket`] opens an entry without following it (`O_PATH |
//!   O_NOFOLLOW`) and accepts it only if it is a socket owned by the folder's owner;
//!   connecting and changing its mode then go through `/proc/self/fd/N`, which names
//!   that very inode, whatever the name points to by then.
//!
//! Each open is `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has
//! it (5.6 and later), else `openat` with `O_NOFOLLOW`. Names are single path components
//! (checked), so both refuse the same things: `O_NOFOLLOW` covers the only component.
//!
//! The folder is made with `mkdirat` under its parent (which must be root's and not
//! writable by the executor's user: the node's work and runtime folders, mode 0755), then
//! opened with `O_DIRECTORY | O_NOFOLLOW` and given its mode and owner through that
//! descriptor. Removal is [`std::fs::remove_dir_all`], which does not follow links inside
//! the tree (since Rust 1.58.1).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Why an operation inside a private folder failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// The operating system refused a step.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The name to create exists already: something other than the node put it there.
    #[error(
        "{} exists already, and the node makes it fresh: something else put it there (a \
         link to a file elsewhere?); refusing to write through it",
        path.display()
    )]
    Planted { path: PathBuf },
    /// The entry is not what the node expects (a link, a file, a directory) or belongs to
    /// someone other than the folder's owner.
    #[error("{} is {found}, not {wanted}; refusing to use it", path.display())]
    Unexpected {
        path: PathBuf,
        found: String,
        wanted: &'static str,
    },
    /// A name with a `/`, a NUL, or `.`/`..`: only single entries are allowed.
    #[error("`{name}` is not a single file name")]
    BadName { name: String },
}

impl PrivateDirError {
    /// Whether the entry did not exist (only from [`PrivateDir::open_socket`]).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PrivateDirError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A folder made by root for one executor and handed to its user; see the module
/// documentation.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
    /// The user the folder was given to (`None`: left to the node's own user).
    owner_uid: u32,
}

impl PrivateDir {
    /// Makes `parent/name` afresh with `mode` (exactly: the umask does not apply) and gives
    /// it to `owner` (`(uid, gid)`) when one is given. A folder of that name left by an
    /// earlier executor is removed first. `parent` must exist.
    pub fn create(
        parent: &Path,
        name: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<PrivateDir, PrivateDirError> {
        check_name(name)?;
        let path = parent.join(name);
        let io = |what| {
            let path = path.clone();
            move |source| PrivateDirError::Io { path, what, source }
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing what an earlier executor left")(e)),
        }
        let parent_fd = nix::fcntl::open(
            parent,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| PrivateDirError::Io {
            path: parent.to_path_buf(),
            what: "opening the parent folder",
            source: e.into(),
        })?;
        nix::sys::stat::mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| io("making the folder")(e.into()))?;
        let fd = open_beneath(
            parent_fd.as_fd(),
            name,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            0,
        )
        .map_err(|e| io("opening the folder just made")(e.into()))?;
        let dir = File::from(fd);
        dir.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
                .map_err(io("giving it to the executor's user"))?;
        }
        let owner_uid = dir.metadata().map_err(io("reading it back"))?.uid();
        Ok(PrivateDir {
            path,
            fd: dir.into(),
            owner_uid,
        })
    }

    /// Opens a folder made earlier (by [`PrivateDir::create`], or one the caller trusts
    /// to be the path it names: its parent is not the executor user's to change). The
    /// folder's owner is whoever owns it now.
    pub fn open_existing(path: &Path) -> Result<PrivateDir, PrivateDirError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| PrivateDirError::Io { path, what, source }
        };
        let fd = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io("opening the folder")(e.into()))?;
        let owner_uid = nix::sys::stat::fstat(&fd)
            .map_err(|e| io("reading its owner")(e.into()))?
            .st_uid;
        Ok(PrivateDir {
            path: path.to_path_buf(),
            fd,
            owner_uid,
        })
    }

    /// The folder's path, for the executor (never used by root to reach inside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file `name` that must not exist yet, with `mode` and `owner`, through
    /// the folder's descriptor. Fails with [`PrivateDirError::Planted`] when the name is
    /// taken (by a link, a file or anything else).
    pub fn write_new(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), PrivateDirError> {
        check_name(name)?;
        let path = self.path.join(name);
        let io = |what| {
            let path = path.clone();
            move |source| PrivateDirError::Io { path, what, source }
        };
        let fd = match open_beneath(
            self.fd.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
        ) {
            Ok(fd) => fd,
            // EEXIST: a file or a link is there; ELOOP: openat2 met a link.
            Err(Errno::EEXIST | Errno::ELOOP) => return Err(PrivateDirError::Planted { path }),
            Err(e) => return Err(io("creating it")(e.into())),
        };
        let mut file = File::from(fd);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(io("giving it to the executor's user"))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("setting its mode"))?;
        file.write_all(bytes).map_err(io("writing it"))?;
        Ok(())
    }

    /// Opens the socket `name` without following it: accepted only if it is a socket
    /// owned by the folder's owner. The descriptor (`O_PATH`) names that inode for
    /// [`proc_path`]: connect to it, or change its mode, through that path.
    pub fn open_socket(&self, name: &str) -> Result<OwnedFd, PrivateDirError> {
        check_name(name)?;
        let path = self.path.join(name);
        let fd = open_beneath(self.fd.as_fd(), name, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0)
            .map_err(|e| PrivateDirError::Io {
                path: path.clone(),
                what: "opening it",
                source: e.into(),
            })?;
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| PrivateDirError::Io {
            path: path.clone(),
            what: "reading what it is",
            source: e.into(),
        })?;
        let kind = stat.st_mode & nix::libc::S_IFMT;
        if kind != nix::libc::S_IFSOCK {
            return Err(PrivateDirError::Unexpected {
                path,
                found: kind_name(kind).to_string(),
                wanted: "a socket",
            });
        }
        if stat.st_uid != self.owner_uid {
            return Err(PrivateDirError::Unexpected {
                path,
                found: format!("a socket of uid {}", stat.st_uid),
                wanted: "a socket of the folder's owner",
            });
        }
        Ok(fd)
    }

    /// Removes the folder and everything in it (links inside are removed, not followed).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The path that names the very inode `fd` refers to: `/proc/self/fd/N`. Connecting to it,
/// or changing its mode, reaches that inode, not whatever its name points to now.
pub fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens the single entry `name` of `dir` following no link: `openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, else (`ENOSYS`, before Linux 5.6) `openat`
/// with `O_NOFOLLOW`. Always close-on-exec.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: OFlag,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(mode);
    let how = OpenHow::new()
        .flags(flags)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(dir, name, how) {
        Err(Errno::ENOSYS) => nix::fcntl::openat(dir, name, flags, mode),
        other => other,
    }
}

/// Refuses anything but one plain entry name.
fn check_name(name: &str) -> Result<(), PrivateDirError> {
    let bytes = OsStr::new(name).as_bytes();
    if bytes.is_empty()
        || name == "."
        || name == ".."
        || bytes.contains(&b'/')
        || bytes.contains(&0)
    {
        return Err(PrivateDirError::BadName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// A file type for an error message.
fn kind_name(kind: nix::libc::mode_t) -> &'static str {
    match kind {
        nix::libc::S_IFLNK => "a symbolic link",
        nix::libc::S_IFREG => "a regular file",
        nix::libc::S_IFDIR => "a directory",
        nix::libc::S_IFIFO => "a named pipe",
        nix::libc::S_IFCHR | nix::libc::S_IFBLK => "a device",
        nix::libc::S_IFSOCK => "a socket",
        _ => "something unknown",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a panic is the report.
    use super::*;
    use std::os::unix::fs::symlink;

    fn my_uid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { nix::libc::geteuid() }
    }

    fn is_root() -> bool {
        my_uid() == 0
    }

    /// A root-owned parent (mode 0755) and a victim file outside it.
    fn setup() -> (tempfile::TempDir, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let victim = top.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        (top, victim)
    }

    fn assert_untouched(victim: &Path, owner: u32) {
        assert_eq!(std::fs::read_to_string(victim).unwrap(), "precious");
        let meta = std::fs::metadata(victim).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644);
        assert_eq!(meta.uid(), owner);
    }

    #[test]
    fn write_new_refuses_a_planted_link_and_touches_nothing_outside() {
        let (top, victim) = setup();
        let me = my_uid();
        let dir = PrivateDir::create(top.path(), "exec-1", 0o700, None).unwrap();
        symlink(&victim, dir.path().join("hostfile")).unwrap();
        let e = dir.write_new("hostfile", b"evil", 0o644, None).unwrap_err();
        assert!(matches!(e, PrivateDirError::Planted { .. }), "{e}");
        assert!(e.to_string().contains("exists already"), "{e}");
        assert_untouched(&victim, me);
        // A dangling link (to a file that does not exist yet) creates nothing either.
        let absent = top.path().join("absent");
        symlink(&absent, dir.path().join("other")).unwrap();
        let e = dir.write_new("other", b"evil", 0o644, None).unwrap_err();
        assert!(matches!(e, PrivateDirError::Planted { .. }), "{e}");
        assert!(!absent.exists());
        // A hard link to the victim is an existing name as well.
        std::fs::hard_link(&victim, dir.path().join("hard")).unwrap();
        let e = dir.write_new("hard", b"evil", 0o644, None).unwrap_err();
        assert!(matches!(e, PrivateDirError::Planted { .. }), "{e}");
        assert_untouched(&victim, me);
    }

    #[test]
    fn write_new_writes_a_fresh_file_with_mode_and_owner() {
        let (top, _) = setup();
        let dir = PrivateDir::create(top.path(), "exec-2", 0o700, None).unwrap();
        dir.write_new("hostfile", b"node-0 slots=1\n", 0o640, None)
            .unwrap();
        let path = dir.path().join("hostfile");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "node-0 slots=1\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        if is_root() {
            dir.write_new("owned", b"x", 0o600, Some((65534, 65534)))
                .unwrap();
            let meta = std::fs::metadata(dir.path().join("owned")).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
    }

    #[test]
    fn names_must_be_single_entries() {
        let (top, _) = setup();
        let dir = PrivateDir::create(top.path(), "exec-3", 0o700, None).unwrap();
        for bad in ["", ".", "..", "../victim", "a/b", "a\0b"] {
            let e = dir.write_new(bad, b"x", 0o600, None).unwrap_err();
            assert!(matches!(e, PrivateDirError::BadName { .. }), "{bad:?}: {e}");
        }
        assert!(PrivateDir::create(top.path(), "../x", 0o700, None).is_err());
    }

    #[test]
    fn create_replaces_a_leftover_and_sets_mode_and_owner_exactly() {
        let (top, victim) = setup();
        let me = my_uid();
        // A leftover folder with a link to the victim inside: removed, the victim kept.
        let leftover = top.path().join("exec-4");
        std::fs::create_dir(&leftover).unwrap();
        symlink(&victim, leftover.join("hostfile")).unwrap();
        symlink(top.path(), leftover.join("up")).unwrap();
        let owner = is_root().then_some((65534u32, 65534u32));
        let dir = PrivateDir::create(top.path(), "exec-4", 0o700, owner).unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), owner.map_or(me, |o| o.0));
        assert_untouched(&victim, me);
        // A link in place of the folder itself is removed, not followed.
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), "k").unwrap();
        symlink(&elsewhere, top.path().join("exec-5")).unwrap();
        let dir = PrivateDir::create(top.path(), "exec-5", 0o700, None).unwrap();
        assert!(std::fs::symlink_metadata(dir.path()).unwrap().is_dir());
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("keep")).unwrap(),
            "k"
        );
        dir.remove().unwrap();
        assert!(!top.path().join("exec-5").exists());
        assert_untouched(&victim, me);
    }

    #[test]
    fn open_socket_refuses_links_files_and_foreign_sockets() {
        let (top, victim) = setup();
        let dir = PrivateDir::create(top.path(), "exec-6", 0o700, None).unwrap();
        // Nothing there yet.
        let e = dir.open_socket("shim.sock").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // A link to a socket elsewhere (a root daemon's, say).
        let outside = top.path().join("daemon.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&outside).unwrap();
        symlink(&outside, dir.path().join("shim.sock")).unwrap();
        let e = dir.open_socket("shim.sock").unwrap_err();
        assert!(
            e.to_string().contains("a symbolic link, not a socket"),
            "{e}"
        );
        // A plain file.
        std::fs::write(dir.path().join("file"), "x").unwrap();
        let e = dir.open_socket("file").unwrap_err();
        assert!(e.to_string().contains("a regular file"), "{e}");
        // A real socket of the folder's owner is accepted, and its proc path connects.
        let own = dir.path().join("own.sock");
        let listener = std::os::unix::net::UnixListener::bind(&own).unwrap();
        let fd = dir.open_socket("own.sock").unwrap();
        let _client = std::os::unix::net::UnixStream::connect(proc_path(fd.as_fd())).unwrap();
        listener.accept().unwrap();
        if is_root() {
            // A hard link to a socket of another user, in a folder of someone else.
            let theirs =
                PrivateDir::create(top.path(), "exec-7", 0o700, Some((65534, 65534))).unwrap();
            std::fs::hard_link(&outside, theirs.path().join("shim.sock")).unwrap();
            let e = theirs.open_socket("shim.sock").unwrap_err();
            assert!(e.to_string().contains("a socket of uid 0"), "{e}");
        }
        assert_untouched(&victim, my_uid());
    }
}
