//! The host never runs the file the user can overwrite: before a handler is loaded, its `.so`
//! is copied into a directory private to this host process, under a name that holds the hash of
//! its content, and the copy is what gets loaded (by the runner, or in process).
//!
//! Overwriting the original in place (`cp v2.so handler.so`, a build writing its output again)
//! would otherwise change the pages of a library that is mapped and running, and crash it at its
//! next call; an atomic `mv` would be harmless but invisible. With the copy, the original can be
//! rewritten, moved or deleted while the handler serves, and a swap reads it again on purpose.
//!
//! The directory is made by [`PrivateCopies::create`] under `$TMPDIR` (mode 0700) and removed
//! with everything in it when that value is dropped. A copy lives as long as some [`PrivateCopy`]
//! refers to it (the generation of the handler loaded from it), then its file is deleted, so a
//! long `--watch` session does not fill the disk with old builds. The same content copied twice
//! while the first copy lives is one file.

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
    /// Writing the private copy failed (a full or read-only `$TMPDIR`).
    #[error("cannot write the private copy of the handler in {dir} ({source}): set TMPDIR to a writable directory")]
    Write {
        /// The private directory.
        dir: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// The private directory of this host's handler copies.
#[derive(Debug)]
pub struct PrivateCopies {
    dir: tempfile::TempDir,
    /// The live copies by content hash.
    live: Mutex<HashMap<String, Weak<PrivateCopy>>>,
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

impl PrivateCopies {
    /// Makes the private directory (`worker-host-handlers-*` under `$TMPDIR`, mode 0700).
    pub fn create() -> Result<Self, CopyError> {
        let dir = tempfile::Builder::new()
            .prefix("worker-host-handlers-")
            .tempdir()
            .map_err(|source| CopyError::Write {
                dir: std::env::temp_dir(),
                source,
            })?;
        Ok(Self {
            dir,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Copies `original` (following symlinks) into the private directory, hashing it on the
    /// way, so the name always matches the bytes copied even if the original is rewritten
    /// meanwhile. The caller has checked that `original` is a file.
    pub fn copy(&self, original: &Path) -> Result<Arc<PrivateCopy>, CopyError> {
        let read_error = |source| CopyError::Read {
            path: original.to_path_buf(),
            source,
        };
        let write_error = |source| CopyError::Write {
            dir: self.dir.path().to_path_buf(),
            source,
        };
        let mut source = std::fs::File::open(original).map_err(read_error)?;
        let mut staging = tempfile::NamedTempFile::new_in(self.dir.path()).map_err(write_error)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0_u8; 256 * 1024];
        loop {
            let read = source.read(&mut buffer).map_err(read_error)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            staging.write_all(&buffer[..read]).map_err(write_error)?;
        }
        let sha256 = hex(&hasher.finalize());
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|_, copy| copy.strong_count() > 0);
        if let Some(copy) = live.get(&sha256).and_then(Weak::upgrade) {
            return Ok(copy);
        }
        let name = original
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "handler.so".to_owned());
        let path = self.dir.path().join(format!("{}-{name}", &sha256[..16]));
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
    fn a_copy_is_named_by_its_content_and_outlives_changes_to_the_original() {
        let copies = PrivateCopies::create().unwrap();
        let work = tempfile::tempdir().unwrap();
        let original = work.path().join("handler.so");
        std::fs::write(&original, b"version one").unwrap();
        let first = copies.copy(&original).unwrap();
        assert_eq!(first.sha256(), hex(&Sha256::digest(b"version one")));
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
    }
}
