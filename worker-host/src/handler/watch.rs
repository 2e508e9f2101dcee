//! `--watch`: swaps the handler by itself when its file changes.
//!
//! A thread looks at the handler path every [`POLL`] (its size, modification time and inode,
//! through any symlink), and once the file has changed and then stayed as it is for [`SETTLE`],
//! it asks the [`LiveHandler`] for a swap, which loads it only if its content changed. Waiting
//! for the file to settle keeps a half-written build from being loaded (and one that is loaded
//! anyway fails to load, and the old build keeps serving). Polling, rather than inotify, sees
//! every kind of change on every file system, a mounted volume or a network share included, at
//! the cost of one `stat` five times a second.

use super::swap::LiveHandler;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the file is looked at.
const POLL: Duration = Duration::from_millis(200);

/// How long a changed file must stay unchanged before it is loaded.
const SETTLE: Duration = Duration::from_secs(1);

/// What tells one version of the file from another without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    device: u64,
    inode: u64,
    size: u64,
    modified: Option<std::time::SystemTime>,
}

impl Fingerprint {
    /// The file at `path` as it is now (through symlinks); `None` when there is none.
    pub fn of(path: &std::path::Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: metadata.modified().ok(),
        })
    }
}

/// Watches `path` on a thread of its own for as long as `live` serves. `loaded` is the file as
/// it was when the serving handler was copied (before its `init`, so a build written during a
/// slow `init` is swapped in once the worker serves).
pub fn watch_for_changes(live: &Arc<LiveHandler>, path: PathBuf, loaded: Option<Fingerprint>) {
    let live = Arc::downgrade(live);
    let spawned = std::thread::Builder::new()
        .name("handler-watch".into())
        .spawn(move || watch(&live, &path, loaded));
    match spawned {
        Ok(_) => tracing::info!("Watching the handler file for changes (--watch)."),
        Err(error) => tracing::error!(
            "--watch cannot start its thread ({error}): the handler is not watched."
        ),
    }
}

fn watch(live: &Weak<LiveHandler>, path: &std::path::Path, mut loaded: Option<Fingerprint>) {
    // The version seen last, and since when it has not changed.
    let mut seen = Fingerprint::of(path);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(POLL);
        let Some(live) = live.upgrade() else {
            return;
        };
        if live.is_closed() {
            return;
        }
        let now = Fingerprint::of(path);
        if now != seen {
            seen = now;
            since = Instant::now();
            continue;
        }
        if seen != loaded && seen.is_some() && since.elapsed() >= SETTLE {
            loaded = seen.clone();
            live.request_swap("--watch saw the handler file change");
        }
    }
}
