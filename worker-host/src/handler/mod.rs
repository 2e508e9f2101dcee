//! The one interface through which the rest of the host runs a handler, and the in-process
//! implementation of it ([`library::HandlerLibrary`], a `.so` loaded into this process).
//!
//! Everything above this module (the one-shot run, the worker loop) sees only [`Handler`]: it
//! hands over a [`Job`], receives stream chunks and progress through [`JobEvents`] while the job
//! runs, can cancel it through a [`CancelToken`], and gets a [`JobResult`] back. Nothing here is
//! async: `run` blocks its thread, so callers run it on threads of their own, never on an async
//! runtime.

pub mod library;

use crate::job::{Job, JobResult, RawJson};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use library::{HandlerLibrary, LoadError};

/// What a handler says about itself in its descriptor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HandlerInfo {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The ABI major it was built for.
    pub abi_major: u16,
    /// The ABI minor it was built for.
    pub abi_minor: u16,
    /// How many jobs may run at once; 0 means no limit.
    pub max_concurrency: u32,
    /// Whether it streams its output.
    pub streaming: bool,
}

/// Receives what a job produces while it runs. Called from the job's thread (or threads the
/// handler spawned), so implementations must be cheap and must not block for long.
pub trait JobEvents: Send + Sync {
    /// A stream chunk; chunks arrive in the order they were emitted.
    fn chunk(&self, chunk: RawJson);
    /// A progress report.
    fn progress(&self, progress: RawJson);
}

/// Ignores every event (for jobs whose chunks and progress nobody reads).
#[derive(Debug, Default, Clone, Copy)]
pub struct DiscardEvents;

impl JobEvents for DiscardEvents {
    fn chunk(&self, _chunk: RawJson) {}
    fn progress(&self, _progress: RawJson) {}
}

/// A shared flag that cancels one job. Cheap to clone; setting it is seen by the handler's next
/// `is_cancelled`, `emit` or `progress`.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the job.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Size limits the host enforces on what a handler hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest output, stream chunk or progress value, in bytes of JSON.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_output_bytes: 20 * 1024 * 1024,
        }
    }
}

/// A handler ready to run jobs: loaded, checked and initialised.
pub trait Handler: Send + Sync + std::fmt::Debug {
    /// What the handler says about itself.
    fn info(&self) -> &HandlerInfo;

    /// Runs one job to its end, blocking the calling thread.
    fn run(&self, job: &Job, events: &dyn JobEvents, cancel: &CancelToken) -> JobResult;

    /// Runs the handler's teardown; call once, after the last job.
    fn teardown(&self);
}
