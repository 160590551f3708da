//! The Unix-socket transport of the shim protocol (shim kind `unix`), node side.
//!
//! The frames are the stdio shim's; only the stream differs. The node makes a private
//! directory per executor ([`SocketDir`]) and names a socket path in it through
//! [`ENV_SHIM_SOCKET`]. The application binds and listens there and accepts one connection;
//! the node waits for the socket with [`connect_when_listening`] and then drives the
//! connection with a [`NodeShim`](crate::node::NodeShim):
//!
//! ```no_run
//! # async fn example(child: &mut tokio::process::Child) -> Result<(), flame_shims::ShimError> {
//! use flame_protocol::shim::SHIM_FRAME_BYTES_MAX;
//! use flame_shims::node::NodeShim;
//! use flame_shims::unix::{connect_when_listening, SocketDir};
//! use std::time::Duration;
//!
//! let dir = SocketDir::create("/run/flame".as_ref(), 42, None)?;
//! // ... spawn the application with FLAME_SHIM_SOCKET=dir.socket_path() ...
//! let stream =
//!     connect_when_listening(dir.socket_path(), Duration::from_secs(30), child.wait()).await?;
//! let (read, write) = stream.into_split();
//! let mut shim = NodeShim::new(read, write, SHIM_FRAME_BYTES_MAX);
//! shim.wait_ready().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The application's side is [`crate::service::run`] (Rust) and
//! `shims/python/flame_service.py` (Python); `docs/shim-protocol.md` is normative.

use crate::private_dir::{proc_path, PrivateDir};
use crate::ShimError;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::future::Future;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::time::Instant;

/// The environment variable that names the socket the application must listen on. Its
/// presence selects the Unix transport in the helpers; unset or empty means stdio.
pub const ENV_SHIM_SOCKET: &str = "FLAME_SHIM_SOCKET";

/// The socket's file name inside the executor's private directory.
pub const SOCKET_FILE_NAME: &str = "shim.sock";

/// Longest socket path, in bytes, that fits `sockaddr_un.sun_path` (108 bytes on Linux)
/// with its terminating NUL.
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Mode of the per-executor directory: only its owner (the application's user) may enter.
pub const SOCKET_DIR_MODE: u32 = 0o700;

/// Mode of the socket file, set by both sides: only its owner may connect.
pub const SOCKET_FILE_MODE: u32 = 0o600;

/// First pause before connecting again after `ECONNREFUSED` (the file exists but nobody
/// listens yet: between `bind` and `listen`).
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(2);

/// Longest pause between connection attempts; the pause doubles up to this.
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(100);

/// A private directory for one executor's socket, `<runtime>/exec-<id>/`, mode 0700 and
/// owned by the application's user (a [`PrivateDir`]). Removed with its contents when
/// dropped (or by [`remove`](Self::remove), which reports failures).
#[derive(Debug)]
pub struct SocketDir {
    dir: PrivateDir,
    socket: PathBuf,
    /// False once removed, so that drop does nothing more.
    armed: bool,
}

impl SocketDir {
    /// Creates `<runtime_dir>/exec-<executor_id>/` (and `runtime_dir` if missing) with mode
    /// 0700, and gives it to `owner` (`(uid, gid)`) when one is given: the node runs as root
    /// and the application as someone else. A directory left by an earlier executor of the
    /// same id is removed first. No step follows a link (see [`PrivateDir::create`]).
    ///
    /// Fails with [`ShimError::SocketPathTooLong`] when the socket path would not fit in a
    /// socket address, so that the mistake shows here and not as a bind error in the
    /// application.
    pub fn create(
        runtime_dir: &Path,
        executor_id: u64,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, ShimError> {
        let name = format!("exec-{executor_id}");
        let socket = runtime_dir.join(&name).join(SOCKET_FILE_NAME);
        let len = socket.as_os_str().as_bytes().len();
        if len > SOCKET_PATH_BYTES_MAX {
            return Err(ShimError::SocketPathTooLong {
                path: socket,
                len,
                max: SOCKET_PATH_BYTES_MAX,
            });
        }
        std::fs::create_dir_all(runtime_dir).map_err(|source| ShimError::Socket {
            path: runtime_dir.to_path_buf(),
            source,
        })?;
        let dir = PrivateDir::create(runtime_dir, &name, SOCKET_DIR_MODE, owner)?;
        Ok(SocketDir {
            dir,
            socket,
            armed: true,
        })
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket path to hand the application in [`ENV_SHIM_SOCKET`].
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Removes the directory and everything in it, reporting a failure (drop does the same
    /// silently).
    pub fn remove(mut self) -> Result<(), ShimError> {
        self.armed = false;
        self.dir.remove().map_err(|source| ShimError::Socket {
            path: self.dir.path().to_path_buf(),
            source,
        })
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover directory holds nothing but a dead socket.
            let _ = self.dir.remove();
        }
    }
}

/// Waits until the application listens on `socket`, connects, and restricts the socket file
/// to its owner (mode 0600).
///
/// The node runs as root and the socket's folder belongs to the application's user, who
/// may put anything under the socket's name: a link to a root daemon's socket, say. So the
/// name is opened without following it ([`PrivateDir::open_socket`]), accepted only as a
/// socket owned by the folder's owner, and both the connection and the mode change go to
/// that inode through `/proc/self/fd/N`. Anything else there fails the wait with
/// [`ShimError::PrivateDir`], naming what was found.
///
/// The wait is event-driven: an inotify watch on the socket's directory wakes it when the
/// file appears, with no polling. A connection refused (`ECONNREFUSED`: the file exists but
/// the application has not called `listen` yet) is retried after a short pause, doubling
/// from 2 ms to 100 ms. Where no inotify instance can be had (the per-user limit is
/// reached), the same bounded pauses stand in for the watch.
///
/// Fails with [`ShimError::NotListening`] naming the path once `timeout` has passed, with
/// [`ShimError::ExitedBeforeListening`] as soon as `exited` completes (pass the child's
/// `wait()`: an application that dies before listening fails fast; tokio's `Child` keeps
/// the exit status for a later `wait` or `try_wait`), and with
/// [`ShimError::Socket`] when the directory cannot be watched, the connection fails for
/// another reason, or the mode cannot be set.
///
/// The stream's halves (`into_split`) go to [`NodeShim::new`](crate::node::NodeShim::new).
pub async fn connect_when_listening<F: Future>(
    socket: &Path,
    timeout: Duration,
    exited: F,
) -> Result<UnixStream, ShimError> {
    let deadline = Instant::now() + timeout;
    let socket_err = |source| ShimError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let dir = match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = socket
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| socket_err(std::io::Error::from(ErrorKind::InvalidInput)))?;
    let folder = PrivateDir::open_existing(dir)?;
    // The watch is in place before the first attempt, so a socket created in between
    // still wakes the wait below.
    let mut watch = DirWatch::new(dir)?;
    let attempts = async {
        let mut pause = CONNECT_RETRY_FIRST;
        loop {
            let inode = match folder.open_socket(name) {
                Ok(fd) => fd,
                Err(e) if e.is_not_found() => {
                    watch.changed().await?;
                    continue;
                }
                Err(e) => return Err(ShimError::from(e)),
            };
            let at = proc_path(inode.as_fd());
            match UnixStream::connect(&at).await {
                Ok(stream) => return Ok((stream, inode)),
                // Not listening yet (or its backlog is full): a short pause, not a watch,
                // because no file event marks the moment `listen` is called.
                Err(e)
                    if e.kind() == ErrorKind::ConnectionRefused
                        || e.kind() == ErrorKind::WouldBlock =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(CONNECT_RETRY_MAX);
                }
                Err(e) => return Err(socket_err(e)),
            }
        }
    };
    let (stream, inode) = tokio::select! {
        biased;
        connected = tokio::time::timeout_at(deadline, attempts) => match connected {
            Ok(connected) => connected?,
            Err(_) => {
                return Err(ShimError::NotListening {
                    path: socket.to_path_buf(),
                    timeout,
                })
            }
        },
        _ = exited => {
            return Err(ShimError::ExitedBeforeListening {
                path: socket.to_path_buf(),
            })
        }
    };
    // The directory is private already; this keeps the socket private should the directory
    // ever be opened up. Through the descriptor: the inode checked above, whatever the
    // name points to by now.
    std::fs::set_permissions(
        proc_path(inode.as_fd()),
        std::fs::Permissions::from_mode(SOCKET_FILE_MODE),
    )
    .map_err(socket_err)?;
    Ok(stream)
}

/// Wakes when something changes in a directory.
enum DirWatch {
    /// An inotify instance watching the directory for new entries.
    Inotify(AsyncFd<InotifyFd>),
    /// No inotify instance could be had: bounded pauses instead.
    Pause(Duration),
}

/// [`AsyncFd`] wants `AsRawFd`, which nix's `Inotify` lacks. Owns the descriptor.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirWatch {
    fn new(dir: &Path) -> Result<Self, ShimError> {
        let dir_err = |e: nix::Error| ShimError::Socket {
            path: dir.to_path_buf(),
            source: std::io::Error::from(e),
        };
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(inotify) => inotify,
            // Out of inotify instances (a per-user limit of 128 by default) or no inotify.
            Err(nix::Error::EMFILE | nix::Error::ENFILE | nix::Error::ENOSYS) => {
                return Ok(DirWatch::Pause(CONNECT_RETRY_FIRST))
            }
            Err(e) => return Err(dir_err(e)),
        };
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
            )
            .map_err(dir_err)?;
        // SAFETY: `InotifyFd` owns the inotify descriptor, nothing can take it out, and
        // `as_raw_fd` returns that same open descriptor for as long as the `AsyncFd` lives.
        let fd = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|e| ShimError::Socket {
                path: dir.to_path_buf(),
                source: e.into_parts().1,
            })?;
        Ok(DirWatch::Inotify(fd))
    }

    /// Returns after the next change (any new entry: the caller looks again).
    async fn changed(&mut self) -> Result<(), ShimError> {
        match self {
            DirWatch::Inotify(fd) => loop {
                let mut ready = fd.readable().await?;
                match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(Into::into)) {
                    Ok(Ok(_events)) => return Ok(()),
                    Ok(Err(e)) => return Err(ShimError::Io(e)),
                    // Spurious readiness; try_io cleared it.
                    Err(_would_block) => continue,
                }
            },
            DirWatch::Pause(pause) => {
                tokio::time::sleep(*pause).await;
                *pause = (*pause * 2).min(CONNECT_RETRY_MAX);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn socket_dir_is_private_and_removed_on_drop() {
        let runtime = tempfile::tempdir().unwrap();
        let dir = SocketDir::create(runtime.path(), 7, None).unwrap();
        assert_eq!(dir.dir(), runtime.path().join("exec-7"));
        assert_eq!(dir.socket_path(), runtime.path().join("exec-7/shim.sock"));
        let mode = std::fs::metadata(dir.dir()).unwrap().mode() & 0o7777;
        assert_eq!(mode, SOCKET_DIR_MODE);
        // A leftover of the same id is replaced, not reused.
        std::fs::write(dir.dir().join("stale"), b"x").unwrap();
        let path = dir.dir().to_path_buf();
        std::mem::forget(dir);
        let dir = SocketDir::create(runtime.path(), 7, None).unwrap();
        assert!(!path.join("stale").exists());
        drop(dir);
        assert!(!path.exists());
        // Given to an owner (here: the one it has already, since tests do not run as root).
        let meta = std::fs::metadata(runtime.path()).unwrap();
        let dir = SocketDir::create(runtime.path(), 8, Some((meta.uid(), meta.gid()))).unwrap();
        let owned = std::fs::metadata(dir.dir()).unwrap();
        assert_eq!((owned.uid(), owned.gid()), (meta.uid(), meta.gid()));
        let path = dir.dir().to_path_buf();
        dir.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_socket_path_too_long_is_refused_up_front() {
        let runtime = PathBuf::from("/tmp").join("r".repeat(100));
        assert!(matches!(
            SocketDir::create(&runtime, 1, None),
            Err(ShimError::SocketPathTooLong { max: 107, .. })
        ));
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error_naming_it() {
        let runtime = tempfile::tempdir().unwrap();
        let socket = runtime.path().join("absent/shim.sock");
        let e = connect_when_listening(
            &socket,
            Duration::from_secs(5),
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                &e,
                ShimError::PrivateDir(crate::private_dir::PrivateDirError::Io { path, .. })
                    if path == &runtime.path().join("absent")
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn connects_once_the_socket_appears_and_sets_its_mode() {
        let runtime = tempfile::tempdir().unwrap();
        let socket = runtime.path().join("shim.sock");
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let listener_path = socket.clone();
        let app = std::thread::spawn(move || {
            // Wait until the node watches, so the socket appears after the first attempt.
            let _ = bound_rx.blocking_recv();
            let listener = std::os::unix::net::UnixListener::bind(&listener_path).unwrap();
            listener.accept().unwrap()
        });
        let connect = connect_when_listening(
            &socket,
            Duration::from_secs(10),
            std::future::pending::<()>(),
        );
        tokio::pin!(connect);
        // Let the connect start and find nothing, then create the socket.
        tokio::select! {
            biased;
            _ = &mut connect => panic!("connected to nothing"),
            () = tokio::task::yield_now() => {}
        }
        bound_tx.send(()).unwrap();
        let stream = connect.await.unwrap();
        let (_accepted, _) = app.join().unwrap();
        drop(stream);
        let mode = std::fs::metadata(&socket).unwrap().mode() & 0o7777;
        assert_eq!(mode, SOCKET_FILE_MODE);
    }
}
