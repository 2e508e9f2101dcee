//! The one interface through which the rest of the host drives a handler, whichever way it runs:
//! [`Generation::load`] copies a `.so` to a private place ([`PrivateDir`]) and makes a
//! [`Handler`] from the copy with the isolation chosen, and every mode (the one-shot run, the
//! queue worker, the dev API) sees only that trait. The serving modes hold it through a
//! [`LiveHandler`], which swaps in a new build without a restart (`swap`, `watch`).
//!
//! A handler's life: loaded (the library is loaded and its descriptor checked), then
//! [`Handler::init`] once, then any number of [`Handler::run`] calls (at once, up to the
//! concurrency), then [`Handler::shutdown`] once. [`Handler::readiness`] says, at any moment,
//! whether a job may be given to it: a supervised runner that crashed is restarting and takes no
//! job until its `init` has run again, and one that keeps crashing has failed for good.
//!
//! Two implementations:
//! - [`inproc`]: the library is loaded into this process (`--isolation none`). No hop, but a
//!   handler that crashes takes the host with it.
//! - [`runner`]: the library is loaded into a runner process, a child of the host that the host
//!   supervises (the default). A crash fails the jobs on that runner, with the cause, and a fresh
//!   runner takes over.
//!
//! `run` blocks its thread, so callers run it on threads of their own, never on an async
//! runtime; a handler whose jobs run elsewhere (a runner) also offers `run_async`, a future
//! that waits for the job without a thread (see [`Handler::blocks`]). [`spawn_job`] picks.

mod error;
mod generation;
pub mod inproc;
mod origin;
mod private_copy;
pub mod runner;
mod spawn;
mod swap;
mod watch;

use crate::job::{Job, JobResult, RawJson};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub(crate) use error::check_path;
pub use error::LoadError;
pub use generation::{Generation, Lease};
pub use private_copy::{sha256_of, CopyError, PrivateCopies, PrivateDir};
pub use spawn::spawn_job;
pub use swap::{Current, LiveHandler, SwapPolicy};
pub use watch::{watch_for_changes, Fingerprint};

/// What a handler says about itself in its descriptor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The SHA-256 of the library's content, in lowercase hex (what the host loaded: its
    /// private copy of the file at `path`).
    #[serde(default)]
    pub sha256: String,
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

/// What a [`CancelToken`] runs when it is cancelled (again when a soft cancel turns hard).
type Waker = Arc<dyn Fn() + Send + Sync>;

/// How hard a job was cancelled, in order: a token only ever moves up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    #[default]
    None,
    /// Without a hard stop (see [`CancelToken::cancel_softly`]).
    Soft,
    /// Hard, after the cancel grace ([`CancelToken::cancel`]).
    Hard,
    /// Hard with no grace (see [`CancelToken::stop_at_once`]).
    AtOnce,
}

/// The shared state of a [`CancelToken`].
#[derive(Default)]
struct CancelState {
    stop: Stop,
    /// Run at the cancel, and again when a soft cancel turns hard: whoever waits on the job is
    /// woken.
    wakers: Vec<Waker>,
}

/// A shared flag that cancels one job. Cheap to clone; setting it is seen by the handler's next
/// `is_cancelled`, `emit` or `progress`, and wakes whoever registered with [`Self::on_cancel`]
/// (the runner proxy, which then tells the runner and starts the hard-stop clock).
#[derive(Clone, Default)]
pub struct CancelToken(Arc<Mutex<CancelState>>);

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CancelToken")
            .field(&self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels the job, and runs the wakers registered so far. A second cancel does nothing,
    /// unless the first was soft ([`Self::cancel_softly`]): then the cancel turns hard, and the
    /// wakers run again (the runner proxy starts the hard-stop clock then).
    pub fn cancel(&self) {
        self.cancel_with(Stop::Hard);
    }

    /// Cancels the job as [`Self::cancel`] does, but asks for no hard stop: the handler sees
    /// `is_cancelled`, and one that ignores it runs on (its result is dropped) instead of having
    /// its runner killed, which would fail every other job on it. For a load-balancing client
    /// that went away: a routine event, not a deliberate stop.
    pub fn cancel_softly(&self) {
        self.cancel_with(Stop::Soft);
    }

    /// Cancels the job hard with no grace: a runner running it is killed at once if the job
    /// has not ended (the wakers run again if it was cancelled before). For jobs that already
    /// ignored a soft cancel for a grace.
    pub fn stop_at_once(&self) {
        self.cancel_with(Stop::AtOnce);
    }

    fn cancel_with(&self, stop: Stop) {
        let wakers = {
            let mut state = self.state();
            if stop <= state.stop {
                return;
            }
            state.stop = stop;
            state.wakers.clone()
        };
        for wake in wakers {
            wake();
        }
    }

    /// Whether the cancel asks for no hard stop ([`Self::cancel_softly`]).
    pub fn is_soft(&self) -> bool {
        self.state().stop == Stop::Soft
    }

    /// Whether the cancel asks for a hard stop with no grace ([`Self::stop_at_once`]).
    pub fn is_at_once(&self) -> bool {
        self.state().stop == Stop::AtOnce
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.state().stop != Stop::None
    }

    /// Runs `wake` when the job is cancelled: now, on this thread, if it already is; otherwise
    /// on the thread that cancels it. It runs again if a soft cancel turns hard.
    pub fn on_cancel(&self, wake: impl Fn() + Send + Sync + 'static) {
        let wake: Waker = Arc::new(wake);
        let mut state = self.state();
        state.wakers.push(wake.clone());
        if state.stop != Stop::None {
            drop(state);
            wake();
        }
    }
}

/// The largest stream chunk RunPod documents it takes: "Maximum size for a single streamed
/// payload chunk is 1 MB" (the `/stream` operation reference). 1 MB read as 10^6 bytes, the
/// smaller of its two readings, so no chunk the host lets through is over it either way.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 1_000_000;

/// Size limits the host enforces on what a handler hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest output or progress value, in bytes of JSON.
    pub max_output_bytes: usize,
    /// The largest stream chunk, in bytes of JSON; a larger one fails its job.
    pub max_chunk_bytes: usize,
}

impl Limits {
    /// The largest value a handler may hand back, of any kind.
    pub fn largest(&self) -> usize {
        self.max_output_bytes.max(self.max_chunk_bytes)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_output_bytes: 20 * 1024 * 1024,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
        }
    }
}

/// The stack of every thread a handler function runs on: 8 MiB, the main thread's stack on
/// Linux by default (`ulimit -s`). The header promises handlers at least this much.
pub const HANDLER_STACK_SIZE: usize = 8 * 1024 * 1024;

/// Where the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// In a runner process the host supervises: a crash fails only that runner's jobs.
    #[default]
    Runner,
    /// In the host's own process: no hop, but a crash ends the host.
    None,
}

/// Everything needed to load a handler.
#[derive(Debug, Clone)]
pub struct HandlerSpec {
    /// The `.so` file (the one the user named; [`Generation::load`] loads a private copy of it).
    pub path: PathBuf,
    /// Where the libraries the handler finds through `$ORIGIN` lie, when `path` is the host's
    /// private copy of it (the user's file's directory, and its run path expanded against it): a
    /// runner has them at the end of its library path.
    pub library_dirs: Vec<PathBuf>,
    /// The limits on what it hands back.
    pub limits: Limits,
    /// Where it runs.
    pub isolation: Isolation,
    /// How long a cancelled job's handler may take to return before its runner is killed
    /// (runner isolation only).
    pub cancel_grace: Duration,
    /// How long `init` may take before it counts as failed (a runner's is killed then).
    pub init_timeout: Duration,
    /// Whether a runner that ended is replaced (a serving mode), or the handler is done with
    /// (a one-shot run, `inspect`).
    pub respawn: bool,
}

/// Whether a handler can take a job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Jobs may be given to it.
    Ready,
    /// Its runner crashed (or was killed) and a fresh one is starting: jobs wait.
    Restarting,
    /// It cannot serve again (a crash loop, or `init` failed on a restart); the sentence says
    /// why. The worker reports itself unhealthy and exits.
    Failed(String),
}

/// A loaded handler, whichever way it runs. Thread-safe: `run` is called from several threads
/// at once (up to the concurrency).
pub trait Handler: Send + Sync + std::fmt::Debug {
    /// What the handler says about itself.
    fn info(&self) -> &HandlerInfo;

    /// Runs the handler's `init` with its configuration (JSON text). Called once, before any job.
    fn init(&self, config_json: &str) -> Result<(), LoadError>;

    /// Runs one job to its end, blocking the calling thread. Always returns a result, even when
    /// the handler crashed (a failure that says so).
    fn run(&self, job: &Job, events: &dyn JobEvents, cancel: &CancelToken) -> JobResult;

    /// Whether [`Self::run`] holds its thread for the job's length (a handler in this process
    /// runs on it): callers then give each job a thread of its own. False where the job runs
    /// elsewhere and [`Self::run_async`] only waits for it, which needs no thread.
    fn blocks(&self) -> bool {
        true
    }

    /// Runs one job as [`Self::run`] does, as a future that waits without holding a thread:
    /// for handlers whose [`Self::blocks`] is false, polled on the async runtime. It owns the
    /// job, so it can free the job's text as soon as the handler has it (a runner's copy is in
    /// its own memory once the job's frame is written). The default runs `run` when first
    /// polled, blocking (so never poll it there when `blocks` is true).
    fn run_async<'a>(
        &'a self,
        job: Job,
        events: &'a dyn JobEvents,
        cancel: &'a CancelToken,
    ) -> futures_util::future::BoxFuture<'a, JobResult> {
        Box::pin(async move { self.run(&job, events, cancel) })
    }

    /// The handler's last output lines (its log lines and, in a runner, its stdout and stderr),
    /// bounded, for a failure report; empty where nothing is kept.
    fn recent_output(&self) -> String {
        String::new()
    }

    /// No new job will be given to the handler (a swap replaced it; its running jobs finish):
    /// a runner that ends now is not replaced.
    fn retire(&self) {}

    /// Whether jobs may be given to the handler now, and its changes.
    fn readiness(&self) -> tokio::sync::watch::Receiver<Readiness>;

    /// Ends the handler after the last job: waits (bounded) for calls still running, runs its
    /// `teardown` if every call has returned, and frees what it holds. Call once.
    fn shutdown(&self);
}
