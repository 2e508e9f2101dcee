//! The host never runs the file the user can overwrite: before a handler is loaded, its `.so`
//! is copied into a directory private to this host process, under a name that holds the hash of
//! its content, and the copy is what gets loaded (by the runner, or in process).
//!
//! Overwriting the original in place (`cp v2.so handler.so`, a build writing its output again)
//! would otherwise change the pages of a library that is mapped and running, and crash it at its
//! next call; an atomic `mv` would be harmless but invisible. With the copy, the original can be
//! rewritten, moved or deleted while the handler serves, and a swap reads it again on purpose.
//!
//! The directory is made by [`PrivateDir::create`] under `$TMPDIR` (mode 0700, refused on a
//! `noexec` mount, from which no library could be mapped) and removed with everything in it when
//! that value is dropped, whatever still refers to its copies. A copy lives as long as some
//! [`PrivateCopy`] refers to it (the generation of the handler loaded from it), then its file is
//! deleted, so a long `--watch` session does not fill the disk with old builds. The same content
//! copied twice while the first copy lives is one file; each file's name is unique, so deleting
//! an old copy never deletes a newer one of the same content.
//!
//! A host killed with SIGKILL cannot remove its directory. Each host holds an exclusive `flock`
//! on a `.lock` file in its own directory for as long as it runs, so the next host to start
//! removes the directories whose lock it can take: their host is gone (a lock, unlike a pid,
//! means the same in every pid namespace that shares the directory). A directory is made under
//! another name, locked, and only then renamed, so one being made is never taken for one left
//! behind; one without a lock file is never removed.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Why a handler file could not be copied before loading.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the original failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The original.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The private directory is on a file system mounted `noexec`.
    #[error("the private directory for handler copies, {dir}, is on a file system mounted noexec, from which no library can be loaded: set TMPDIR to a directory on another file system")]
    NoExec {
        /// The private directory.
        dir: PathBuf,
    },
    /// Writing the private copy failed (a full or read-only `$TMPDIR`).
    #[error("cannot write the private copy of the handler in {dir} ({source}): set TMPDIR to a writable directory")]
    Write {
        /// The private directory.
        dir: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// The private directory of this host's handler copies; removed when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    /// Held while the host runs: the directory is in use (see the module docs). `None` on a
    /// file system without `flock`.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
    _dir: RemovedOnDrop,
    copies: Arc<PrivateCopies>,
}

/// A directory removed, with everything in it, when this is dropped.
#[derive(Debug)]
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The start of every private directory's name.
const PREFIX: &str = "worker-host-handlers-";
/// The start of a private directory's name while it is made (before it is locked).
const STAGING_PREFIX: &str = ".worker-host-starting-";
/// The lock file in each.
const LOCK_FILE: &str = ".lock";
/// Removes the private directories under `parent` whose host is gone: their lock file can be
/// locked. One without a lock file (from a host that could not lock, or an older version) is
/// never removed. Best effort: what cannot be removed stays.
fn remove_left_behind(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = entry.path();
        // Only directories (not symlinks) of this user.
        let ours = std::fs::symlink_metadata(&dir).is_ok_and(|metadata| {
            use std::os::unix::fs::MetadataExt;
            metadata.is_dir() && metadata.uid() == nix::unistd::geteuid().as_raw()
        });
        if !ours {
            continue;
        }
        let gone = std::fs::File::open(dir.join(LOCK_FILE)).is_ok_and(|file| {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        });
        if gone && std::fs::remove_dir_all(&dir).is_ok() {
            tracing::debug!(
                "Removed {}, left behind by a host that is gone.",
                dir.display()
            );
        }
    }
}

/// Makes the copies in the private directory.
#[derive(Debug)]
pub struct PrivateCopies {
    dir: PathBuf,
    /// The live copies by content hash.
    live: Mutex<HashMap<String, Weak<PrivateCopy>>>,
    /// Numbers the files, so each name is used once.
    next: std::sync::atomic::AtomicU64,
}

/// One copied handler file; deleted when the last reference goes.
#[derive(Debug)]
pub struct PrivateCopy {
    path: PathBuf,
    sha256: String,
}

impl PrivateCopy {
    /// The file to load.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 of its content, in lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

impl Drop for PrivateCopy {
    fn drop(&mut self) {
        // A mapped library stays mapped after its file is gone; nothing loads it again once
        // the last generation that could respawn from it is over.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The SHA-256 of a file's content, in lowercase hex (to tell whether it changed without
/// copying it).
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    hash_through(&mut std::fs::File::open(path)?, |error| error, |_| Ok(()))
}

/// Reads `source` to its end in chunks, handing each to `sink`; the SHA-256 of all of it, in
/// lowercase hex. A read error becomes `read_error`'s, a sink's error is returned as it is.
fn hash_through<E>(
    source: &mut impl Read,
    read_error: impl Fn(std::io::Error) -> E,
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<String, E> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; 256 * 1024];
    loop {
        let read = source.read(&mut buffer).map_err(&read_error)?;
        if read == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
        sink(&buffer[..read])?;
    }
}

impl PrivateDir {
    /// Makes the private directory (`worker-host-handlers-*` under `$TMPDIR`, mode 0700). It is
    /// made under a name the sweep of other hosts ignores, locked, and only then renamed to
    /// its own, so no host ever removes a directory that is being made.
    pub fn create() -> Result<Self, CopyError> {
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir();
        remove_left_behind(&parent);
        let staging = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|source| CopyError::Write {
                dir: parent.clone(),
                source,
            })?;
        let write_error = |source| CopyError::Write {
            dir: staging.path().to_path_buf(),
            source,
        };
        let noexec = nix::sys::statvfs::statvfs(staging.path())
            .is_ok_and(|fs| fs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        if noexec {
            return Err(CopyError::NoExec {
                dir: staging.path().to_path_buf(),
            });
        }
        let lock_path = staging.path().join(LOCK_FILE);
        let lock_file = std::fs::File::create(&lock_path).map_err(write_error)?;
        let lock =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => Some(lock),
                Err((_, errno)) => {
                    // A file system without flock: no lock file either, so no sweep removes the
                    // directory (nor, if the host is killed, ever will).
                    tracing::debug!("cannot lock {}: {errno}", lock_path.display());
                    let _ = std::fs::remove_file(&lock_path);
                    None
                }
            };
        let name = staging
            .path()
            .file_name()
            .map(|name| name.to_string_lossy().replacen(STAGING_PREFIX, PREFIX, 1))
            .unwrap_or_else(|| format!("{PREFIX}{}", std::process::id()));
        let dir = parent.join(name);
        std::fs::rename(staging.path(), &dir).map_err(write_error)?;
        // The staging guard now names nothing; the directory's own guard removes it.
        drop(staging);
        let copies = Arc::new(PrivateCopies {
            dir: dir.clone(),
            live: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        });
        Ok(Self {
            _lock: lock,
            _dir: RemovedOnDrop(dir),
            copies,
        })
    }

    /// What makes the copies.
    pub fn copies(&self) -> &Arc<PrivateCopies> {
        &self.copies
    }
}

impl PrivateCopies {
    /// Copies `original` (following symlinks) into the private directory, hashing it on the
    /// way, so the name always matches the bytes copied even if the original is rewritten
    /// meanwhile. The caller has checked that `original` is a file.
    pub fn copy(&self, original: &Path) -> Result<Arc<PrivateCopy>, CopyError> {
        let read_error = |source| CopyError::Read {
            path: original.to_path_buf(),
            source,
        };
        let write_error = |source| CopyError::Write {
            dir: self.dir.clone(),
            source,
        };
        let mut source = std::fs::File::open(original).map_err(read_error)?;
        let mut staging = tempfile::NamedTempFile::new_in(&self.dir).map_err(write_error)?;
        let sha256 = hash_through(&mut source, read_error, |chunk| {
            staging.write_all(chunk).map_err(write_error)
        })?;
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|_, copy| copy.strong_count() > 0);
        if let Some(copy) = live.get(&sha256).and_then(Weak::upgrade) {
            return Ok(copy);
        }
        let name = original
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "handler.so".to_owned());
        let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{number}-{name}", &sha256[..16]));
        staging
            .persist(&path)
            .map_err(|error| write_error(error.error))?;
        let copy = Arc::new(PrivateCopy { path, sha256 });
        live.insert(copy.sha256.clone(), Arc::downgrade(&copy));
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_whose_host_is_gone_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let make = |name: &str, lock: bool| {
            let dir = parent.path().join(format!("{PREFIX}{name}"));
            std::fs::create_dir(&dir).unwrap();
            lock.then(|| std::fs::File::create(dir.join(LOCK_FILE)).unwrap());
            dir
        };
        let live = make("live", true);
        let _held = nix::fcntl::Flock::lock(
            std::fs::File::open(live.join(LOCK_FILE)).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let gone = make("gone", true);
        let being_made = make("new", false);
        let other = parent.path().join("something-else");
        std::fs::create_dir(&other).unwrap();

        remove_left_behind(parent.path());
        assert!(live.exists(), "a running host's directory stays");
        assert!(!gone.exists(), "an unlocked one is removed");
        assert!(
            being_made.exists(),
            "one without a lock file is never removed"
        );
        assert!(other.exists(), "others' directories are not touched");
    }

    #[test]
    fn a_copy_is_named_by_its_content_and_outlives_changes_to_the_original() {
        let dir = PrivateDir::create().unwrap();
        let copies = dir.copies();
        let work = tempfile::tempdir().unwrap();
        let original = work.path().join("handler.so");
        std::fs::write(&original, b"version one").unwrap();
        let first = copies.copy(&original).unwrap();
        assert_eq!(first.sha256(), hex(&Sha256::digest(b"version one")));
        assert_eq!(first.sha256(), sha256_of(&original).unwrap());
        assert!(first
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&first.sha256()[..16]));

        std::fs::write(&original, b"version two").unwrap();
        assert_eq!(std::fs::read(first.path()).unwrap(), b"version one");
        let second = copies.copy(&original).unwrap();
        assert_ne!(first.path(), second.path());

        std::fs::write(&original, b"version one").unwrap();
        let again = copies.copy(&original).unwrap();
        assert_eq!(again.path(), first.path(), "one file for one content");

        let first_path = first.path().to_path_buf();
        drop((first, again));
        assert!(!first_path.exists(), "the last reference deletes the copy");
        assert!(second.path().exists());

        let private = copies.dir.clone();
        assert_eq!(private, dir._dir.0);
        assert!(private.join(LOCK_FILE).exists());
        drop(dir);
        assert!(
            !private.exists(),
            "the directory goes with its PrivateDir, copies or not"
        );
    }
}
