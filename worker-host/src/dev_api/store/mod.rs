//! The dev API's job store: every job submitted to the public API, from queue to expiry, and the
//! one source of truth both halves of the dev API read and write.
//!
//! The store is plain synchronous state behind one mutex (held for microseconds, never across an
//! await), plus wake-ups: `queued` for job-take long-polls, `stops` for job-stop long-polls,
//! `timers` for the sweeper when an earlier deadline appears, and one per job, so a `/runsync` or
//! `/stream` waiter sleeps until its job changes.
//!
//! Every job has at most one armed deadline, the next instant at which something happens to it
//! unprompted: its time-to-live (`policy.ttl`, counted from submission) while queued; the earlier
//! of its execution timeout and its TTL while running; the earlier of its retention and its TTL
//! once finished. [`Store::sweep`] applies what is due and re-arms. So memory is bounded: a
//! finished job is forgotten after its retention, and at most [`StoreLimits::max_finished`]
//! finished jobs are kept at all (the oldest go first).
//!
//! A streaming job's chunks wait for `/stream` up to [`MAX_UNREAD_STREAM_BYTES`] per job; past it
//! the oldest are dropped, and the next `/stream` answer logs how many.
//!
//! The worker's heartbeats ([`Store::heartbeat`]) keep the store and the worker in step, as the
//! platform does: a stop the worker has not honoured is sent again, a job the store handed out
//! but the worker never received is queued again, and a retried job waits until the worker has
//! let go of the id's previous attempt. A heartbeat lists what the worker held when it was sent,
//! which may be before the worker received a job or a stop; so an id counts as let go only when
//! a heartbeat sent after the stop was handed out does not list it (see [`Store::heartbeat`]).
//!
//! Whether the worker is busy ([`Store::worker_running`]) is not only whether jobs are in
//! progress: a handler told to stop (cancel, timeout, TTL) may go on running, holding its slot,
//! although the job is over and the worker has let go of the id (it leaves the heartbeat at the
//! stop, as with the platform). The worker asks job-take for as many jobs as it has free slots,
//! so a take for all its slots shows that every such handler has returned.
//!
//! The store is split by concern; each part adds its methods to [`Store`] and its helpers to
//! the shared state:
//! - `record`: a job's record and its status object;
//! - `lifecycle`: a job from submission to its end (results, cancel, retry, webhooks) and until
//!   it is forgotten;
//! - `queue`: the queue and the worker's job-take polls;
//! - `reconcile`: stops, and keeping in step with the worker's heartbeats;
//! - `deadlines`: execution timeouts, TTLs and retention, and the sweeper that applies them;
//! - `stream`: stream chunks waiting for `/stream`;
//! - `wait`: waiting for the store to change.

mod deadlines;
mod lifecycle;
mod queue;
mod reconcile;
mod record;
mod stream;
#[cfg(test)]
mod test_support;
mod wait;

pub use deadlines::{
    DEFAULT_EXECUTION_TIMEOUT, DEFAULT_TTL, MAX_POLICY_MS, MIN_EXECUTION_TIMEOUT_MS, MIN_TTL_MS,
};
pub use record::{Status, Submission};
pub use stream::MAX_UNREAD_STREAM_BYTES;

use super::webhook::WebhookSender;
use crate::job::OrderedRawMap;
use deadlines::DeadlineKey;
use record::Record;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long results are kept, and how many; when a job counts as lost.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    /// How long a `/run` job's result is kept after it finishes.
    pub async_retention: Duration,
    /// How long a `/runsync` job's result is kept after it finishes.
    pub sync_retention: Duration,
    /// The most finished jobs kept; past it the oldest finished job is forgotten.
    pub max_finished: usize,
    /// A job handed to the worker this long ago that a heartbeat does not list never reached the
    /// worker, and is queued again. Several heartbeat periods.
    pub lost_after: Duration,
    /// The most bytes of unread stream chunks kept per job ([`MAX_UNREAD_STREAM_BYTES`]).
    pub max_unread_stream_bytes: usize,
    /// How many jobs the worker runs at once (its `--concurrency`).
    pub worker_slots: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            async_retention: Duration::from_secs(30 * 60),
            sync_retention: Duration::from_secs(60),
            max_finished: 100_000,
            lost_after: Duration::from_secs(3),
            max_unread_stream_bytes: MAX_UNREAD_STREAM_BYTES,
            worker_slots: 1,
        }
    }
}

/// A job request the public API has already validated.
#[derive(Debug)]
pub struct NewJob {
    /// The request body's members, in order (`id` is added in front by the store).
    pub request: OrderedRawMap,
    /// `/run` or `/runsync`.
    pub submission: Submission,
    /// Where to POST the final status object.
    pub webhook: Option<String>,
    /// `policy.executionTimeout`.
    pub execution_timeout: Duration,
    /// `policy.ttl`.
    pub ttl: Duration,
}

/// What `/retry` can answer.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Requeued.
    Requeued,
    /// Only failed and timed-out jobs can be retried; this one is in this state.
    NotRetryable(Status),
}

/// The job and worker counts `/health` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Jobs completed since start.
    pub completed: u64,
    /// Jobs failed (or timed out) since start.
    pub failed: u64,
    /// Jobs running now.
    pub in_progress: u64,
    /// Jobs waiting now.
    pub in_queue: u64,
    /// Retries requested since start.
    pub retried: u64,
}

/// The shared job store. See the module docs.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
    limits: StoreLimits,
    /// How many jobs the worker runs at once now (the handler serving may lower it).
    worker_slots: std::sync::atomic::AtomicUsize,
    /// The local worker's id, for status objects.
    worker_id: String,
    /// Wakes job-take polls: a job was queued, or how long a take holds may have changed.
    queued: Notify,
    /// Wakes job-stop polls: the worker has stops waiting.
    stops: Notify,
    /// Wakes the sweeper: an earlier deadline was armed.
    timers: Notify,
    /// Cancelled at shutdown: waiters answer with the current status at once.
    closed: CancellationToken,
    webhooks: WebhookSender,
}

/// Everything behind the store's mutex. Each part of the store keeps its fields here: the jobs
/// (`lifecycle`), the queue (`queue`), stops and heartbeats (`reconcile`), deadlines and finished
/// jobs (`deadlines`), and the counts `/health` reports.
#[derive(Debug, Default)]
struct State {
    jobs: HashMap<String, Record>,
    /// Ids in submission order; an id whose job is no longer queued (cancelled, expired) is
    /// skipped when reached, and the queue is compacted when such ids pile up.
    queue: VecDeque<String>,
    /// Ids the worker must stop, not yet handed to a job-stop poll.
    to_stop: Vec<String>,
    /// Ids the worker was told to stop and has not yet been seen to let go of, each with the
    /// number of heartbeats received when its stop was handed to a job-stop poll (`None` while
    /// the stop waits in `to_stop`).
    stopping: HashMap<String, Option<u64>>,
    /// Heartbeats received so far.
    heartbeats: u64,
    /// A handler told to stop may still run (and hold a slot) although its job is over: set at
    /// each stop, cleared when the worker asks for a job for every slot it has.
    stopped_handler_may_run: bool,
    /// Ids of the jobs in progress.
    running: HashSet<String>,
    /// Every armed deadline, earliest first.
    deadlines: BTreeMap<DeadlineKey, String>,
    /// Every finished job, oldest first (for the cap on finished jobs).
    finished: BTreeMap<DeadlineKey, String>,
    /// The last sequence number of a deadline key.
    sequence: u64,
    /// Jobs waiting (held-back retries included), for `/health`.
    in_queue: u64,
    completed: u64,
    failed: u64,
    retried: u64,
}

impl Store {
    /// An empty store. Final status objects of jobs with a webhook are sent to `webhooks`.
    pub fn new(limits: StoreLimits, worker_id: String, webhooks: WebhookSender) -> Self {
        Self {
            state: Mutex::new(State::default()),
            worker_slots: std::sync::atomic::AtomicUsize::new(limits.worker_slots),
            limits,
            worker_id,
            queued: Notify::new(),
            stops: Notify::new(),
            timers: Notify::new(),
            closed: CancellationToken::new(),
            webhooks,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `/health` counts.
    pub fn counts(&self) -> Counts {
        let state = self.state();
        Counts {
            completed: state.completed,
            failed: state.failed,
            in_progress: state.running.len() as u64,
            in_queue: state.in_queue,
            retried: state.retried,
        }
    }

    /// Shutdown: every `/runsync` and `/stream` waiter answers now with the job's current state.
    pub fn close(&self) {
        self.closed.cancel();
    }
}
