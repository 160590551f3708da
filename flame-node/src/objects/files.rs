//! The files under the object store: sealed memfds for the memory tier, and spill files
//! in the node's own folder for the disk tier, made so that the node (root, often) never
//! follows a path a user could change: the folder is created 0700 and must be a folder the
//! node owns, files are created 0600 with `O_NOFOLLOW|O_EXCL` under a temporary name and
//! renamed into place.

use super::cache::ObjectKey;
use super::store::{unlink, Backing, CacheError, ChunkHash};
use flame_protocol::object::{chunk_hash, id_of_chunks, ObjectId, ObjectRef, OBJECT_CHUNK_BYTES};
use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes copied per read when moving an object between files.
const COPY_BYTES: usize = 1024 * 1024;

/// The seals a memfd must carry before its bytes are trusted.
pub(super) fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE
}

/// Hashes a descriptor's bytes, in one pass: each chunk, and (their hashes merged) the
/// whole against `object`.
pub(super) fn hash_file(file: &File, object: ObjectRef) -> Result<Vec<ChunkHash>, CacheError> {
    let mut chunks = Vec::with_capacity(object.chunks() as usize);
    let mut buf = vec![0u8; OBJECT_CHUNK_BYTES.min(object.size) as usize];
    let mut offset = 0;
    while offset < object.size {
        let len = OBJECT_CHUNK_BYTES.min(object.size - offset) as usize;
        file.read_exact_at(&mut buf[..len], offset)
            .map_err(CacheError::Memory)?;
        let index = chunks.len() as u64;
        chunks.push(chunk_hash(object.size, index, &buf[..len]));
        offset += len as u64;
    }
    if id_of_chunks(object.size, &chunks) != Some(object.id) {
        return Err(CacheError::Mismatch {
            id: object.id,
            why: "their hash is another".into(),
        });
    }
    Ok(chunks)
}

pub(super) fn new_memfd(id: &ObjectId) -> Result<File, CacheError> {
    let name = format!("flame-object-{}", id.short());
    let fd = memfd_create(
        name.as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| CacheError::Memory(e.into()))?;
    Ok(File::from(fd))
}

pub(super) fn seal(file: &File) -> Result<(), CacheError> {
    nix::fcntl::fcntl(
        file.as_fd(),
        FcntlArg::F_ADD_SEALS(required_seals() | SealFlag::F_SEAL_SEAL),
    )
    .map_err(|e| CacheError::Memory(e.into()))?;
    Ok(())
}

/// Makes the spill folder the node's own and empty.
pub(super) fn prepare_spill_dir(dir: &Path) -> Result<(), CacheError> {
    let disk = |cause| CacheError::Disk {
        path: dir.to_path_buf(),
        cause,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(disk)?;
        }
        Err(e) => return Err(disk(e)),
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(disk(std::io::Error::other(
                    "it is not a folder (a link or a file); the node makes its own",
                )));
            }
            if meta.uid() != nix::unistd::geteuid().as_raw() {
                return Err(disk(std::io::Error::other(format!(
                    "it belongs to uid {}, not to the node",
                    meta.uid()
                ))));
            }
            for entry in std::fs::read_dir(dir).map_err(disk)? {
                let path = entry.map_err(disk)?.path();
                let removed = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                removed.map_err(|cause| CacheError::Disk {
                    path: path.clone(),
                    cause,
                })?;
            }
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(disk)
}

/// A spill file being written under a temporary name.
#[derive(Debug)]
pub(super) struct SpillFile {
    file: File,
    temp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl SpillFile {
    pub(super) fn create(
        spill_dir: &Path,
        key: &ObjectKey,
        generation: u64,
    ) -> Result<SpillFile, CacheError> {
        let owner = blake3::hash(key.owner.as_bytes());
        let dir = spill_dir.join(flame_protocol::auth::hex(&owner.as_bytes()[..16]));
        let disk = |path: &Path, cause| CacheError::Disk {
            path: path.to_path_buf(),
            cause,
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(disk(&dir, e)),
        }
        let name = format!("{}.{generation}", key.id);
        let temp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(|e| disk(&temp, e))?;
        Ok(SpillFile {
            file,
            temp,
            path,
            done: false,
        })
    }

    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        self.file.write_all(data).map_err(|cause| CacheError::Disk {
            path: self.temp.clone(),
            cause,
        })
    }

    /// Renames the file into place and opens it read-only.
    pub(super) fn finish(mut self) -> Result<Backing, CacheError> {
        let disk = |path: &Path, cause| CacheError::Disk {
            path: path.to_path_buf(),
            cause,
        };
        std::fs::rename(&self.temp, &self.path).map_err(|e| disk(&self.temp, e))?;
        self.done = true;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| disk(&self.path, e))?;
        Ok(Backing::Disk {
            file: Arc::new(file),
            path: self.path.clone(),
        })
    }

    pub(super) fn copy_from(
        spill_dir: &Path,
        key: &ObjectKey,
        generation: u64,
        from: &File,
        size: u64,
    ) -> Result<Backing, CacheError> {
        let mut out = SpillFile::create(spill_dir, key, generation)?;
        let mut buf = vec![0u8; COPY_BYTES.min(size as usize)];
        let mut offset = 0;
        while offset < size {
            let len = (COPY_BYTES as u64).min(size - offset) as usize;
            from.read_exact_at(&mut buf[..len], offset)
                .map_err(CacheError::Memory)?;
            out.write(&buf[..len])?;
            offset += len as u64;
        }
        out.finish()
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if !self.done {
            unlink(&self.temp);
        }
    }
}
