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

use super::webhook::{WebhookCall, WebhookSender};
use crate::job::{OrderedRawMap, RawJson};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The platform's default execution timeout (`policy.executionTimeout`), 10 minutes.
pub const DEFAULT_EXECUTION_TIMEOUT: Duration = Duration::from_secs(600);
/// The platform's default time-to-live (`policy.ttl`), 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The smallest execution timeout the platform accepts, in ms.
pub const MIN_EXECUTION_TIMEOUT_MS: u64 = 5_000;
/// The smallest TTL the platform accepts, in ms.
pub const MIN_TTL_MS: u64 = 10_000;
/// The largest execution timeout or TTL the platform accepts (7 days), in ms.
pub const MAX_POLICY_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// The most bytes of stream chunks one job keeps until `/stream` reads them. A streaming job
/// submitted with `/run` and followed only with `/status` would otherwise keep its whole output
/// for as long as it runs; past this the oldest unread chunks are dropped.
pub const MAX_UNREAD_STREAM_BYTES: usize = 64 * 1024 * 1024;
/// While a stopped handler may still hold a slot, a job-take poll for fewer jobs than the worker
/// has slots is answered (empty) within this time, so the worker soon asks again with its count
/// of free slots then.
const STOPPED_HANDLER_RECHECK: Duration = Duration::from_secs(1);

/// How a job was submitted; it decides how long its result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// `/run`: kept 30 minutes after it finishes.
    Async,
    /// `/runsync`: kept 1 minute after it finishes.
    Sync,
}

/// A job's state, named as the platform names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Waiting for the worker.
    InQueue,
    /// Taken by the worker.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled through `/cancel`.
    Cancelled,
    /// Ran past its execution timeout.
    TimedOut,
}

impl Status {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }
}

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
    worker_id: String,
    queued: Notify,
    stops: Notify,
    timers: Notify,
    /// Cancelled at shutdown: waiters answer with the current status at once.
    closed: CancellationToken,
    webhooks: WebhookSender,
}

/// A deadline's key in the ordered deadline map: when, and a tie-breaking sequence number.
type DeadlineKey = (Instant, u64);

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
    sequence: u64,
    in_queue: u64,
    completed: u64,
    failed: u64,
    retried: u64,
}

#[derive(Debug)]
struct Record {
    /// The job as the worker receives it: `{"id": ..., <request members>}`.
    job_json: Arc<str>,
    submission: Submission,
    webhook: Option<String>,
    execution_timeout: Duration,
    submitted: Instant,
    expires: Instant,
    started: Option<Instant>,
    ended: Option<Instant>,
    status: Status,
    output: Option<RawJson>,
    error: Option<RawJson>,
    /// Chunks not yet returned by `/stream`, oldest first.
    unread: VecDeque<RawJson>,
    /// Their size in bytes (at most [`StoreLimits::max_unread_stream_bytes`]).
    unread_bytes: usize,
    /// Unread chunks dropped to keep within that bound since `/stream` last answered.
    unread_dropped: u64,
    /// Whether the worker streamed any chunk (then the final output is not a chunk too).
    streamed: bool,
    /// A non-streaming job's final output, not yet returned by `/stream` as its one chunk.
    output_unread: bool,
    /// Retried while the worker still held the previous attempt: queued once it lets go.
    held_back: bool,
    deadline: Option<DeadlineKey>,
    finished_key: Option<DeadlineKey>,
    changed: Arc<Notify>,
}

/// Calls `check` until it finds something, waking on `wake`, for at most `hold`; returns what it
/// found last (empty when `hold` passed). The wake-up is armed before each check, so a change
/// between a check and the wait is not missed.
async fn long_poll<T>(wake: &Notify, hold: Duration, mut check: impl FnMut() -> Vec<T>) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + hold;
    loop {
        let notified = wake.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let found = check();
        if !found.is_empty() {
            return found;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(deadline) => return Vec::new(),
        }
    }
}

/// The platform's status object, in its key order.
#[derive(Serialize)]
struct StatusObject<'a> {
    #[serde(rename = "delayTime", skip_serializing_if = "Option::is_none")]
    delay_time: Option<u128>,
    #[serde(rename = "executionTime", skip_serializing_if = "Option::is_none")]
    execution_time: Option<u128>,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    status: Status,
    #[serde(rename = "workerId", skip_serializing_if = "Option::is_none")]
    worker_id: Option<&'a str>,
}

/// A `/stream` answer.
#[derive(Serialize)]
struct StreamAnswer<'a> {
    id: &'a str,
    status: Status,
    stream: Vec<ChunkObject<'a>>,
}

#[derive(Serialize)]
struct ChunkObject<'a> {
    output: &'a RawValue,
}

impl Record {
    fn status_json(&self, id: &str, worker_id: &str) -> String {
        let object = StatusObject {
            delay_time: self
                .started
                .map(|started| (started - self.submitted).as_millis()),
            execution_time: self
                .started
                .zip(self.ended)
                .map(|(started, ended)| (ended - started).as_millis()),
            id,
            output: self.output.as_deref(),
            error: self.error.as_deref(),
            status: self.status,
            worker_id: self.started.map(|_| worker_id),
        };
        serde_json::to_string(&object).expect("a status object always serializes")
    }

    /// Whether `/stream` has something to hand out now.
    fn has_unread(&self) -> bool {
        !self.unread.is_empty() || self.output_unread
    }

    /// The `/stream` answer, handing out (and forgetting) what was unread. Chunks dropped
    /// unread since the last answer (over `limit` bytes were waiting) are logged: the answer's
    /// shape, the platform's, has no place for them.
    fn drain_stream(&mut self, id: &str, limit: usize) -> String {
        let dropped = std::mem::take(&mut self.unread_dropped);
        if dropped > 0 {
            tracing::warn!(
                job_id = %id,
                "/stream: {dropped} older chunk(s) of this job were dropped before this read: \
                 over {limit} bytes of chunks were waiting. Read /stream more often."
            );
        }
        self.unread_bytes = 0;
        let chunks = std::mem::take(&mut self.unread);
        let output = std::mem::take(&mut self.output_unread)
            .then_some(self.output.as_deref())
            .flatten();
        let answer = StreamAnswer {
            id,
            status: self.status,
            stream: chunks
                .iter()
                .map(|chunk| &**chunk)
                .chain(output)
                .map(|output| ChunkObject { output })
                .collect(),
        };
        serde_json::to_string(&answer).expect("a stream answer always serializes")
    }

    /// Back to the queue, as if never taken (a retry, or a take the worker never received).
    fn reset_to_queued(&mut self) {
        self.status = Status::InQueue;
        self.started = None;
        self.ended = None;
        self.output = None;
        self.error = None;
        self.unread.clear();
        self.unread_bytes = 0;
        self.unread_dropped = 0;
        self.streamed = false;
        self.output_unread = false;
        self.changed.notify_waiters();
    }

    /// The next instant something happens to this job unprompted.
    fn next_deadline(&self, limits: &StoreLimits) -> Instant {
        match (self.status, self.started, self.ended) {
            (Status::InProgress, Some(started), _) => {
                (started + self.execution_timeout).min(self.expires)
            }
            (status, _, Some(ended)) if status.is_final() => {
                let retention = match self.submission {
                    Submission::Async => limits.async_retention,
                    Submission::Sync => limits.sync_retention,
                };
                (ended + retention).min(self.expires)
            }
            _ => self.expires,
        }
    }
}

impl State {
    fn next_key(&mut self, at: Instant) -> DeadlineKey {
        self.sequence += 1;
        (at, self.sequence)
    }

    /// Arms the job's deadline from its state; returns whether it is now the earliest one.
    fn arm(&mut self, id: &str, limits: &StoreLimits) -> bool {
        let Some(at) = self.jobs.get(id).map(|job| job.next_deadline(limits)) else {
            return false;
        };
        let key = self.next_key(at);
        let job = self.jobs.get_mut(id).expect("checked above");
        if let Some(old) = job.deadline.replace(key) {
            self.deadlines.remove(&old);
        }
        self.deadlines.insert(key, id.to_owned());
        self.deadlines.keys().next() == Some(&key)
    }

    /// Tells the worker to stop a job it runs.
    fn stop(&mut self, id: &str) {
        if !self.to_stop.iter().any(|queued| queued == id) {
            self.to_stop.push(id.to_owned());
        }
        self.stopping.insert(id.to_owned(), None);
        self.stopped_handler_may_run = true;
    }

    /// Appends a job to the queue, dropping the ids of jobs no longer queued once they outnumber
    /// the queued ones (so cancelling queued jobs cannot grow the queue without bound).
    fn enqueue(&mut self, id: &str, front: bool) {
        self.in_queue += 1;
        if front {
            self.queue.push_front(id.to_owned());
        } else {
            self.queue.push_back(id.to_owned());
        }
        if self.queue.len() > 64 && self.queue.len() as u64 > 2 * self.in_queue {
            let jobs = &self.jobs;
            self.queue.retain(|id| {
                jobs.get(id)
                    .is_some_and(|job| job.status == Status::InQueue && !job.held_back)
            });
        }
    }

    /// Forgets a job entirely. A running job is stopped.
    fn forget(&mut self, id: &str) -> Option<Record> {
        let job = self.jobs.remove(id)?;
        if let Some(key) = job.deadline {
            self.deadlines.remove(&key);
        }
        if let Some(key) = job.finished_key {
            self.finished.remove(&key);
        }
        match job.status {
            Status::InQueue => self.in_queue -= 1,
            Status::InProgress => {
                self.running.remove(id);
                self.stop(id);
            }
            _ => {}
        }
        job.changed.notify_waiters();
        Some(job)
    }
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

    /// Queues a job; returns its new id.
    pub fn submit(&self, new: NewJob) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut request = new.request;
        request.remove("id");
        let job_json: Arc<str> = Arc::from(request.with_first("id", &id).get());
        let now = Instant::now();
        let record = Record {
            job_json,
            submission: new.submission,
            webhook: new.webhook,
            execution_timeout: new.execution_timeout,
            submitted: now,
            expires: now + new.ttl,
            started: None,
            ended: None,
            status: Status::InQueue,
            output: None,
            error: None,
            unread: VecDeque::new(),
            unread_bytes: 0,
            unread_dropped: 0,
            streamed: false,
            output_unread: false,
            held_back: false,
            deadline: None,
            finished_key: None,
            changed: Arc::new(Notify::new()),
        };
        let earliest = {
            let mut state = self.state();
            state.jobs.insert(id.clone(), record);
            state.enqueue(&id, false);
            state.arm(&id, &self.limits)
        };
        if earliest {
            self.timers.notify_one();
        }
        self.queued.notify_waiters();
        id
    }

    /// The job's status object, or `None` for an unknown job.
    pub fn status(&self, id: &str) -> Option<String> {
        let state = self.state();
        state
            .jobs
            .get(id)
            .map(|job| job.status_json(id, &self.worker_id))
    }

    /// Waits until `ready` holds for the job (or `timeout` passes, or the store closes), then
    /// answers with `answer`. `None` if the job is unknown or was forgotten meanwhile.
    async fn wait_for_job(
        &self,
        id: &str,
        timeout: Duration,
        ready: impl Fn(&Record) -> bool,
        answer: impl Fn(&mut Record) -> String,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.state().jobs.get(id)?.changed.clone();
            let notified = changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            // Checked after `enable`, so a change in between wakes the wait below.
            {
                let mut state = self.state();
                let job = state.jobs.get_mut(id)?;
                if ready(job) {
                    return Some(answer(job));
                }
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => break,
                () = self.closed.cancelled() => break,
            }
        }
        let mut state = self.state();
        state.jobs.get_mut(id).map(answer)
    }

    /// Waits until the job is final or `timeout` passes; returns its status object then, or
    /// `None` if the job is unknown (or was forgotten meanwhile).
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Option<String> {
        self.wait_for_job(
            id,
            timeout,
            |job| job.status.is_final(),
            |job| job.status_json(id, &self.worker_id),
        )
        .await
    }

    /// The `/stream` answer: the chunks not returned before (waiting up to `wait` for one, or for
    /// the job's end, when there is none yet), or `None` for an unknown job.
    pub async fn read_stream(&self, id: &str, wait: Duration) -> Option<String> {
        self.wait_for_job(
            id,
            wait,
            |job| job.has_unread() || job.status.is_final(),
            |job| job.drain_stream(id, self.limits.max_unread_stream_bytes),
        )
        .await
    }

    /// Cancels a queued or running job. Returns its status afterwards, or `None` when unknown.
    pub fn cancel(&self, id: &str) -> Option<Status> {
        let mut state = self.state();
        let status = state.jobs.get(id)?.status;
        if status.is_final() {
            return Some(status);
        }
        if status == Status::InProgress {
            state.stop(id);
            self.stops.notify_waiters();
            // Open take polls re-check how long to hold (see `take_wait`).
            self.queued.notify_waiters();
        }
        self.end(&mut state, id, Status::Cancelled, None, None);
        Some(Status::Cancelled)
    }

    /// Requeues a failed or timed-out job under its id. `None` when unknown.
    pub fn retry(&self, id: &str) -> Option<RetryOutcome> {
        let earliest = {
            let mut guard = self.state();
            let state = &mut *guard;
            let job = state.jobs.get_mut(id)?;
            if !matches!(job.status, Status::Failed | Status::TimedOut) {
                return Some(RetryOutcome::NotRetryable(job.status));
            }
            job.reset_to_queued();
            if let Some(key) = job.finished_key.take() {
                state.finished.remove(&key);
            }
            // The worker may still hold the previous attempt (a timed-out handler that has not
            // stopped yet): a second copy under the same id would be refused, so the retry waits
            // until a heartbeat shows the id let go.
            job.held_back = state.stopping.contains_key(id);
            state.retried += 1;
            if job.held_back {
                state.in_queue += 1;
            } else {
                state.enqueue(id, false);
            }
            state.arm(id, &self.limits)
        };
        if earliest {
            self.timers.notify_one();
        }
        self.queued.notify_waiters();
        Some(RetryOutcome::Requeued)
    }

    /// Forgets every queued job; returns how many there were.
    pub fn purge_queue(&self) -> u64 {
        let mut state = self.state();
        let queued: Vec<String> = state
            .jobs
            .iter()
            .filter(|(_, job)| job.status == Status::InQueue)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &queued {
            state.forget(id);
        }
        state.queue.clear();
        queued.len() as u64
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

    /// Hands up to `max` queued jobs to the worker (marking them in progress), as job JSON texts.
    pub fn take(&self, max: usize) -> Vec<Arc<str>> {
        let mut taken = Vec::new();
        let mut guard = self.state();
        let state = &mut *guard;
        let now = Instant::now();
        let mut earliest = false;
        while taken.len() < max {
            let Some(id) = state.queue.pop_front() else {
                break;
            };
            let Some(job) = state.jobs.get_mut(&id) else {
                continue;
            };
            if job.status != Status::InQueue || job.held_back {
                continue;
            }
            job.status = Status::InProgress;
            job.started = Some(now);
            job.changed.notify_waiters();
            taken.push(job.job_json.clone());
            state.in_queue -= 1;
            state.running.insert(id.clone());
            earliest |= state.arm(&id, &self.limits);
        }
        if earliest {
            self.timers.notify_one();
        }
        taken
    }

    /// Waits up to `hold` for queued jobs and takes up to `max` of them (a job-take long-poll;
    /// the worker asks for as many jobs as it has free slots).
    ///
    /// A take for every slot shows that no handler runs, so none told to stop either (see
    /// [`Store::worker_running`]). While one may, a take for fewer is answered within
    /// a second, so the worker soon asks again with its free slots then.
    pub async fn take_wait(&self, max: usize, hold: Duration) -> Vec<Arc<str>> {
        let every_slot = max >= self.worker_slots.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            let notified = self.queued.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let recheck = {
                let mut state = self.state();
                // Valid for as long as this poll is open: the worker holds every slot for it.
                if every_slot {
                    state.stopped_handler_may_run = false;
                }
                state.stopped_handler_may_run
            };
            let taken = self.take(max);
            if !taken.is_empty() {
                return taken;
            }
            let until = if recheck {
                deadline.min(tokio::time::Instant::now() + STOPPED_HANDLER_RECHECK)
            } else {
                deadline
            };
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(until) => return Vec::new(),
            }
        }
    }

    /// The worker now runs up to `slots` jobs at once (a swapped-in handler has another limit).
    pub fn set_worker_slots(&self, slots: usize) {
        self.worker_slots
            .store(slots.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the worker is busy (`/health`'s running worker): a job is in progress, or a
    /// handler told to stop may still be running (see the module docs).
    pub fn worker_running(&self) -> bool {
        let state = self.state();
        !state.running.is_empty() || state.stopped_handler_may_run
    }

    /// Waits up to `hold` for jobs the worker must stop, and hands them over (a job-stop poll).
    pub async fn stops_wait(&self, hold: Duration) -> Vec<String> {
        long_poll(&self.stops, hold, || self.hand_out_stops()).await
    }

    /// The stops waiting for the worker, now handed to it (noted for [`Store::heartbeat`]).
    fn hand_out_stops(&self) -> Vec<String> {
        let mut guard = self.state();
        let state = &mut *guard;
        let ids = std::mem::take(&mut state.to_stop);
        for id in &ids {
            if let Some(handed_out) = state.stopping.get_mut(id) {
                *handed_out = Some(state.heartbeats);
            }
        }
        ids
    }

    /// Applies a heartbeat listing the jobs the worker `holds` (see the module docs): stops not
    /// yet honoured are sent again; ids the worker let go of release their held-back retries;
    /// running jobs the worker does not hold although they were handed out over
    /// [`StoreLimits::lost_after`] ago are queued again.
    ///
    /// A heartbeat lists what the worker held when it was sent, which may be before it received
    /// a stop, or even the job: such a heartbeat proves nothing. A stopped id counts as let go
    /// only when the second heartbeat to arrive after the stop was handed out does not list it:
    /// heartbeats go out a period (1 s) apart and take far less on loopback, so that one was sent
    /// after the first arrived, which was after the hand-out.
    pub fn heartbeat(&self, holds: &[&str]) {
        let now = Instant::now();
        let holds: HashSet<&str> = holds.iter().copied().collect();
        let mut guard = self.state();
        let state = &mut *guard;
        state.heartbeats += 1;
        let beat = state.heartbeats;
        let mut unhonoured = Vec::new();
        let mut let_go = Vec::new();
        for (id, handed_out) in &state.stopping {
            if holds.contains(id.as_str()) {
                unhonoured.push(id.clone());
            } else if handed_out.is_some_and(|handed_out| beat >= handed_out + 2) {
                let_go.push(id.clone());
            }
        }
        let resend = unhonoured
            .iter()
            .any(|id| !state.to_stop.iter().any(|queued| queued == id));
        for id in unhonoured {
            state.stop(&id);
        }
        let mut requeued = false;
        for id in let_go {
            state.stopping.remove(&id);
            if let Some(job) = state.jobs.get_mut(&id).filter(|job| job.held_back) {
                job.held_back = false;
                state.in_queue -= 1;
                state.enqueue(&id, true);
                requeued = true;
            }
        }
        let lost: Vec<String> = state
            .running
            .iter()
            .filter(|id| !holds.contains(id.as_str()) && !state.stopping.contains_key(*id))
            .filter(|id| {
                state
                    .jobs
                    .get(*id)
                    .and_then(|job| job.started)
                    .is_some_and(|started| now >= started + self.limits.lost_after)
            })
            .cloned()
            .collect();
        for id in lost {
            tracing::warn!(job_id = %id, "The worker never received this job; it is queued again.");
            state.running.remove(&id);
            if let Some(job) = state.jobs.get_mut(&id) {
                job.reset_to_queued();
            }
            state.enqueue(&id, true);
            state.arm(&id, &self.limits);
            requeued = true;
        }
        drop(guard);
        if resend {
            self.stops.notify_waiters();
        }
        if requeued {
            self.queued.notify_waiters();
        }
    }

    /// Records a stream chunk the worker posted for a running job (others are ignored). Past
    /// [`StoreLimits::max_unread_stream_bytes`] unread, the oldest unread chunks are dropped.
    pub fn add_chunk(&self, id: &str, chunk: RawJson) {
        let mut state = self.state();
        let Some(job) = state.jobs.get_mut(id) else {
            return;
        };
        if job.status != Status::InProgress {
            return;
        }
        job.unread_bytes += chunk.get().len();
        job.unread.push_back(chunk);
        job.streamed = true;
        let dropped_before = job.unread_dropped;
        while job.unread_bytes > self.limits.max_unread_stream_bytes {
            let Some(oldest) = job.unread.pop_front() else {
                break;
            };
            job.unread_bytes -= oldest.get().len();
            job.unread_dropped += 1;
        }
        if dropped_before == 0 && job.unread_dropped > 0 {
            tracing::warn!(
                job_id = %id,
                "Over {} bytes of this job's stream chunks wait for /stream: the oldest are \
                 dropped until it reads them.",
                self.limits.max_unread_stream_bytes
            );
        }
        job.changed.notify_waiters();
    }

    /// Records a job-done POST for a running job: a progress update (`{"status": "IN_PROGRESS",
    /// "output": ...}`) or its result. A result for a job no longer running (cancelled, timed
    /// out, forgotten) is ignored, as the platform does.
    pub fn add_result(&self, id: &str, mut body: OrderedRawMap, is_stream: bool) {
        let mut state = self.state();
        let Some(job) = state.jobs.get_mut(id) else {
            return;
        };
        if job.status != Status::InProgress {
            return;
        }
        let output = body.remove("output");
        if body
            .get("status")
            .is_some_and(|status| status.get() == r#""IN_PROGRESS""#)
        {
            job.output = output;
            job.changed.notify_waiters();
            return;
        }
        let error = body.remove("error");
        // `/stream` of a job that streamed nothing hands out its output as the one chunk.
        job.output_unread = !is_stream && !job.streamed && output.is_some();
        let status = if error.is_some() {
            Status::Failed
        } else {
            Status::Completed
        };
        self.end(&mut state, id, status, output, error);
    }

    /// Moves a queued or running job to a final state; arms its retention; sends its webhook.
    fn end(
        &self,
        state: &mut State,
        id: &str,
        status: Status,
        output: Option<RawJson>,
        error: Option<RawJson>,
    ) {
        let now = Instant::now();
        let finished_key = state.next_key(now);
        let job = state.jobs.get_mut(id).expect("the caller checked the job");
        let was = job.status;
        job.status = status;
        job.ended = Some(now);
        // A final result replaces any progress value; a cancelled or timed-out job keeps none.
        job.output = output;
        job.error = error;
        job.finished_key = Some(finished_key);
        job.changed.notify_waiters();
        let webhook = job
            .webhook
            .clone()
            .map(|url| (url, job.status_json(id, &self.worker_id)));
        match was {
            Status::InQueue => {
                job.held_back = false;
                state.in_queue -= 1;
            }
            Status::InProgress => {
                state.running.remove(id);
            }
            _ => {}
        }
        match status {
            Status::Completed => state.completed += 1,
            Status::Failed | Status::TimedOut => state.failed += 1,
            _ => {}
        }
        state.finished.insert(finished_key, id.to_owned());
        if state.arm(id, &self.limits) {
            self.timers.notify_one();
        }
        while state.finished.len() > self.limits.max_finished {
            let Some((_, oldest)) = state.finished.pop_first() else {
                break;
            };
            if let Some(job) = state.jobs.get_mut(&oldest) {
                job.finished_key = None;
            }
            state.forget(&oldest);
            tracing::debug!(job_id = %oldest, "Result dropped: too many finished jobs are kept.");
        }
        if let Some((url, body)) = webhook {
            self.webhooks.send(WebhookCall {
                url,
                job_id: id.to_owned(),
                body,
            });
        }
    }

    /// Applies every deadline due at `now` (timeouts, TTLs, retention); returns the next one.
    pub fn sweep(&self, now: Instant) -> Option<Instant> {
        let mut state = self.state();
        let mut stopped = false;
        while let Some(entry) = state.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            let Some(job) = state.jobs.get_mut(&id) else {
                continue;
            };
            job.deadline = None;
            let status = job.status;
            if now >= job.expires {
                tracing::info!(job_id = %id, "Job expired (policy.ttl): forgotten.");
                state.forget(&id);
                stopped |= status == Status::InProgress;
            } else if status == Status::InProgress {
                tracing::warn!(job_id = %id, "Job ran past its execution timeout: TIMED_OUT.");
                state.stop(&id);
                stopped = true;
                self.end(&mut state, &id, Status::TimedOut, None, None);
            } else if status.is_final() {
                state.forget(&id);
            } else {
                state.arm(&id, &self.limits);
            }
        }
        if stopped {
            self.stops.notify_waiters();
            self.queued.notify_waiters();
        }
        state.deadlines.keys().next().map(|(at, _)| *at)
    }

    /// Runs [`Store::sweep`] whenever a deadline is due, until the store closes.
    pub async fn sweep_forever(&self) {
        loop {
            let notified = self.timers.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next = self.sweep(Instant::now());
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = due => {}
                () = self.closed.cancelled() => return,
            }
        }
    }

    /// Shutdown: every `/runsync` and `/stream` waiter answers now with the job's current state.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_api::webhook;

    const MINUTE: Duration = Duration::from_secs(60);

    fn store(limits: StoreLimits) -> (Store, webhook::Webhooks) {
        let (sender, receiver) = webhook::channel(Duration::ZERO);
        (Store::new(limits, "wk".into(), sender), receiver)
    }

    fn request(text: &str) -> OrderedRawMap {
        OrderedRawMap::parse(text).expect("test requests are objects")
    }

    fn job(submission: Submission) -> NewJob {
        NewJob {
            request: request(r#"{"input": {"n": 1}}"#),
            submission,
            webhook: None,
            execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
            ttl: DEFAULT_TTL,
        }
    }

    /// Submits a /run job and hands it to the worker; returns its id.
    fn started(store: &Store) -> String {
        let id = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        id
    }

    /// Submits a job with a 5 s execution timeout, hands it out and lets it time out.
    fn timed_out(store: &Store) -> String {
        let mut new = job(Submission::Async);
        new.execution_timeout = Duration::from_secs(5);
        let id = store.submit(new);
        assert_eq!(store.take(1).len(), 1);
        store.sweep(Instant::now() + Duration::from_secs(6));
        id
    }

    /// Takes one job and finishes it with `body`.
    fn run(store: &Store, id: &str, body: &str) {
        let taken = store.take(1);
        assert_eq!(taken.len(), 1, "nothing to take for {id}");
        assert!(taken[0].contains(id));
        store.add_result(id, request(body), false);
    }

    fn status_of(store: &Store, id: &str) -> serde_json::Value {
        let text = store
            .status(id)
            .unwrap_or_else(|| panic!("{id} is unknown"));
        serde_json::from_str(&text).expect("status objects are JSON")
    }

    /// A store with one /runsync job, and a task waiting (up to 5 minutes) for its end.
    fn runsync_waiting() -> (Arc<Store>, String, tokio::task::JoinHandle<Option<String>>) {
        let store = Arc::new(store(StoreLimits::default()).0);
        let id = store.submit(job(Submission::Sync));
        let waiting = {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move { store.wait_final(&id, Duration::from_secs(300)).await })
        };
        (store, id, waiting)
    }

    fn live_jobs(store: &Store) -> (usize, usize, usize) {
        let state = store.state();
        (
            state.jobs.len(),
            state.deadlines.len(),
            state.finished.len(),
        )
    }

    /// A /runsync result is forgotten after a minute, a /run result after 30 minutes, and
    /// nothing of either is left behind.
    #[test]
    fn finished_jobs_are_forgotten_after_their_retention() {
        let (store, _) = store(StoreLimits::default());
        let sync = store.submit(job(Submission::Sync));
        run(&store, &sync, r#"{"output": 1}"#);
        let run_id = store.submit(job(Submission::Async));
        run(&store, &run_id, r#"{"output": 2}"#);
        let now = Instant::now();

        store.sweep(now + MINUTE - Duration::from_secs(1));
        assert!(store.status(&sync).is_some(), "kept for its first minute");
        store.sweep(now + MINUTE + Duration::from_secs(1));
        assert!(
            store.status(&sync).is_none(),
            "a /runsync result is kept 1 minute"
        );
        assert!(store.status(&run_id).is_some());
        store.sweep(now + 30 * MINUTE + Duration::from_secs(1));
        assert!(
            store.status(&run_id).is_none(),
            "a /run result is kept 30 minutes"
        );
        assert_eq!(live_jobs(&store), (0, 0, 0));
    }

    /// However fast jobs finish, at most `max_finished` results are kept, the oldest dropped.
    #[test]
    fn the_number_of_kept_results_is_capped() {
        let (store, _) = store(StoreLimits {
            max_finished: 3,
            ..StoreLimits::default()
        });
        let ids: Vec<String> = (0..5)
            .map(|_| {
                let id = store.submit(job(Submission::Async));
                run(&store, &id, r#"{"output": 0}"#);
                id
            })
            .collect();
        let kept: Vec<bool> = ids.iter().map(|id| store.status(id).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert_eq!(live_jobs(&store), (3, 3, 3));
    }

    /// A job running past its execution timeout ends TIMED_OUT, the worker is told to stop it,
    /// and its late result is ignored.
    #[test]
    fn execution_timeout_ends_a_running_job() {
        let (store, _) = store(StoreLimits::default());
        let id = timed_out(&store);
        assert_eq!(status_of(&store, &id)["status"], "TIMED_OUT");
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.add_result(&id, request(r#"{"output": "late"}"#), false);
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "TIMED_OUT");
        assert!(status.get("output").is_none(), "{status}");
        assert_eq!(store.counts().failed, 1);
        assert_eq!(store.counts().in_progress, 0);
    }

    /// A job's TTL counts from submission and forgets it in any state; a running one is stopped.
    #[test]
    fn ttl_forgets_queued_and_running_jobs() {
        let (store, _) = store(StoreLimits::default());
        let mut running = job(Submission::Async);
        running.ttl = Duration::from_secs(10);
        let running = store.submit(running);
        assert_eq!(store.take(1).len(), 1);
        let mut queued = job(Submission::Async);
        queued.ttl = Duration::from_secs(10);
        let queued = store.submit(queued);
        store.sweep(Instant::now() + Duration::from_secs(11));
        assert!(store.status(&running).is_none());
        assert!(store.status(&queued).is_none());
        assert_eq!(store.state().to_stop, vec![running]);
        assert_eq!(store.counts(), Counts::default());
        assert!(store.worker_running(), "the stopped handler may still run");
        assert!(store.take(1).is_empty());
        assert_eq!(live_jobs(&store), (0, 0, 0));
    }

    /// A cancelled queued job never runs; a cancelled running job is handed to the worker to stop.
    #[test]
    fn cancel_skips_queued_jobs_and_stops_running_ones() {
        let (store, _) = store(StoreLimits::default());
        let first = store.submit(job(Submission::Async));
        let second = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        assert_eq!(store.cancel(&second), Some(Status::Cancelled));
        assert!(
            store.take(1).is_empty(),
            "a cancelled job is not handed out"
        );
        assert_eq!(store.cancel(&first), Some(Status::Cancelled));
        assert_eq!(store.state().to_stop, vec![first.clone()]);
        assert_eq!(store.cancel(&first), Some(Status::Cancelled));
        assert_eq!(store.cancel("unknown"), None);
        assert_eq!(store.counts().in_queue + store.counts().in_progress, 0);
    }

    /// Progress shows as the output while running; the final result replaces it, even when the
    /// final result has no output.
    #[test]
    fn progress_shows_until_the_result() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.add_result(
            &id,
            request(r#"{"status": "IN_PROGRESS", "output": {"done": 1}}"#),
            false,
        );
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "IN_PROGRESS");
        assert_eq!(status["output"], serde_json::json!({"done": 1}));
        store.add_result(&id, request("{}"), false);
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "COMPLETED");
        assert!(status.get("output").is_none(), "{status}");
    }

    /// A failed job can be retried under its id; it runs again and is counted.
    #[test]
    fn retry_requeues_failed_jobs_only() {
        let (store, _) = store(StoreLimits::default());
        let id = store.submit(job(Submission::Async));
        run(&store, &id, r#"{"error": "boom"}"#);
        assert_eq!(status_of(&store, &id)["error"], "boom");
        assert_eq!(store.retry(&id), Some(RetryOutcome::Requeued));
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "IN_QUEUE");
        assert!(status.get("error").is_none(), "{status}");
        run(&store, &id, r#"{"output": "ok"}"#);
        assert_eq!(
            store.retry(&id),
            Some(RetryOutcome::NotRetryable(Status::Completed))
        );
        assert_eq!(store.counts().retried, 1);
        assert_eq!(live_jobs(&store), (1, 1, 1));
    }

    /// Purging drops only queued jobs.
    #[test]
    fn purge_drops_only_queued_jobs() {
        let (store, _) = store(StoreLimits::default());
        let running = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        let queued: Vec<String> = (0..3)
            .map(|_| store.submit(job(Submission::Async)))
            .collect();
        assert_eq!(store.purge_queue(), 3);
        assert!(queued.iter().all(|id| store.status(id).is_none()));
        assert_eq!(status_of(&store, &running)["status"], "IN_PROGRESS");
        assert_eq!(store.counts().in_queue, 0);
        assert_eq!(live_jobs(&store).0, 1);
    }

    /// `/stream` hands each chunk out once; a non-streaming job's output is one chunk.
    #[tokio::test]
    async fn stream_chunks_are_handed_out_once() {
        let (store, _) = store(StoreLimits::default());
        let streaming = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        let chunk = |text: &str| RawValue::from_string(text.to_owned()).expect("valid JSON");
        store.add_chunk(&streaming, chunk("1"));
        store.add_chunk(&streaming, chunk("2"));
        let wait = Duration::from_millis(10);
        let first = store.read_stream(&streaming, wait).await.expect("known");
        assert_eq!(
            first,
            format!(
                r#"{{"id":"{streaming}","status":"IN_PROGRESS","stream":[{{"output":1}},{{"output":2}}]}}"#
            )
        );
        store.add_chunk(&streaming, chunk("3"));
        store.add_result(&streaming, request(r#"{"output": []}"#), true);
        let last = store.read_stream(&streaming, wait).await.expect("known");
        assert!(
            last.ends_with(r#""status":"COMPLETED","stream":[{"output":3}]}"#),
            "{last}"
        );
        let empty = store.read_stream(&streaming, wait).await.expect("known");
        assert!(empty.ends_with(r#""stream":[]}"#), "{empty}");

        let plain = store.submit(job(Submission::Async));
        run(&store, &plain, r#"{"output": {"a": 1}}"#);
        let answer = store.read_stream(&plain, wait).await.expect("known");
        assert!(
            answer.ends_with(r#""stream":[{"output":{"a": 1}}]}"#),
            "{answer}"
        );
    }

    /// A streaming job nobody reads keeps at most `max_unread_stream_bytes` of chunks: the
    /// oldest are dropped (and counted, for the next `/stream` to log), the newest come out in
    /// order, and reading starts the count anew.
    #[tokio::test]
    async fn unread_stream_chunks_are_capped_by_bytes() {
        assert_eq!(
            StoreLimits::default().max_unread_stream_bytes,
            MAX_UNREAD_STREAM_BYTES
        );
        let (store, _) = store(StoreLimits {
            max_unread_stream_bytes: 10,
            ..StoreLimits::default()
        });
        let id = started(&store);
        let chunk = |n: usize| RawValue::from_string(format!(r#""{n}""#)).expect("valid JSON");
        for n in 0..10 {
            store.add_chunk(&id, chunk(n));
        }
        let unread = |store: &Store| {
            let state = store.state();
            let job = &state.jobs[&id];
            (job.unread.len(), job.unread_bytes, job.unread_dropped)
        };
        assert_eq!(
            unread(&store),
            (3, 9, 7),
            "three 3-byte chunks fit in 10 bytes"
        );
        let wait = Duration::from_millis(10);
        let answer = store.read_stream(&id, wait).await.expect("known");
        assert!(
            answer.ends_with(r#""stream":[{"output":"7"},{"output":"8"},{"output":"9"}]}"#),
            "{answer}"
        );
        assert_eq!(unread(&store), (0, 0, 0));
        store.add_chunk(&id, chunk(10));
        assert_eq!(unread(&store), (1, 4, 0));
    }

    /// A handler told to stop may still hold its slot: the worker counts as running until it
    /// asks for a job for every slot it has; a take for fewer proves nothing, and is answered
    /// within a second so the worker asks again soon.
    #[tokio::test]
    async fn a_stopped_handler_keeps_the_worker_running_until_every_slot_is_free() {
        let (store, _) = store(StoreLimits {
            worker_slots: 2,
            ..StoreLimits::default()
        });
        assert!(!store.worker_running());
        let id = started(&store);
        assert!(store.worker_running());
        store.cancel(&id);
        assert_eq!(store.counts().in_progress, 0);
        assert!(
            store.worker_running(),
            "the cancelled handler may still run"
        );
        let partial = tokio::time::timeout(
            Duration::from_secs(30),
            store.take_wait(1, Duration::from_secs(60)),
        )
        .await
        .expect("a take for one slot of two is answered soon");
        assert!(partial.is_empty());
        assert!(
            store.worker_running(),
            "one free slot of two proves nothing"
        );
        assert!(store
            .take_wait(2, Duration::from_millis(10))
            .await
            .is_empty());
        assert!(!store.worker_running(), "every slot is free");
    }

    /// `/runsync` waits for the result, and gives the current status when the wait runs out.
    #[tokio::test]
    async fn wait_final_returns_the_result_or_the_current_status() {
        let (store, id, waiting) = runsync_waiting();
        assert_eq!(store.take(1).len(), 1);
        store.add_result(&id, request(r#"{"output": "done"}"#), false);
        let answer = waiting.await.expect("the waiter ran").expect("known");
        assert!(
            answer.contains(r#""output":"done","status":"COMPLETED""#),
            "{answer}"
        );

        let slow = store.submit(job(Submission::Sync));
        let answer = store
            .wait_final(&slow, Duration::from_millis(20))
            .await
            .expect("known");
        assert!(answer.contains(r#""status":"IN_QUEUE""#), "{answer}");
    }

    /// A job with a webhook sends its final status object there once.
    #[test]
    fn a_final_status_goes_to_the_webhook() {
        let (store, mut webhooks) = store(StoreLimits::default());
        let mut new = job(Submission::Async);
        new.webhook = Some("http://127.0.0.1:9/hook".into());
        let id = store.submit(new);
        run(&store, &id, r#"{"output": 7}"#);
        let call = webhooks.try_recv().expect("one webhook call");
        assert_eq!(call.url, "http://127.0.0.1:9/hook");
        let body: serde_json::Value = serde_json::from_str(&call.body).expect("JSON");
        assert_eq!(body["id"], id);
        assert_eq!(body["status"], "COMPLETED");
        assert_eq!(body["output"], 7);
        assert!(webhooks.try_recv().is_none(), "only one call");
    }

    /// A job handed out that the worker's heartbeats do not list never reached it: once
    /// `lost_after` has passed it is queued again, and runs.
    #[test]
    fn a_take_the_worker_never_received_is_queued_again() {
        let (store, _) = store(StoreLimits {
            lost_after: Duration::ZERO,
            ..StoreLimits::default()
        });
        let id = started(&store);
        store.heartbeat(&[&id]);
        assert_eq!(status_of(&store, &id)["status"], "IN_PROGRESS");
        store.heartbeat(&[]);
        assert_eq!(status_of(&store, &id)["status"], "IN_QUEUE");
        assert_eq!(store.counts().in_queue, 1);
        assert_eq!(store.counts().in_progress, 0);
        run(&store, &id, r#"{"output": 1}"#);
        assert_eq!(status_of(&store, &id)["status"], "COMPLETED");
    }

    /// A job within `lost_after` of its take is not counted lost, whatever the heartbeat says.
    #[test]
    fn a_fresh_take_is_not_lost() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.heartbeat(&[]);
        assert_eq!(status_of(&store, &id)["status"], "IN_PROGRESS");
    }

    /// A stop the worker has not honoured (it still lists the job) is sent again; once the worker
    /// lets go of the id, nothing more is sent.
    #[test]
    fn unhonoured_stops_are_sent_again() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.cancel(&id);
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[&id]);
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[]);
        store.heartbeat(&[]);
        assert!(store.state().to_stop.is_empty());
        assert!(store.state().stopping.is_empty());
    }

    /// A heartbeat sent before the worker received a job (or its stop) does not list it, and
    /// proves nothing: a stop still waiting is kept, and a stop handed out is sent again when a
    /// later heartbeat shows the worker holds the job after all. Only the second heartbeat after
    /// the hand-out counts.
    #[test]
    fn a_stale_heartbeat_does_not_lose_a_stop() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.cancel(&id);
        store.heartbeat(&[]);
        assert_eq!(
            store.hand_out_stops(),
            vec![id.clone()],
            "a stop not yet handed out is kept"
        );
        // The worker did not have the job yet when the stop came ("not here"), and a heartbeat
        // sent before the hand-out arrives after it.
        store.heartbeat(&[]);
        store.heartbeat(&[&id]);
        assert_eq!(store.hand_out_stops(), vec![id.clone()], "sent again");
        store.heartbeat(&[]);
        assert!(store.state().stopping.contains_key(&id));
        store.heartbeat(&[]);
        assert!(store.state().stopping.is_empty(), "let go");
        assert!(store.hand_out_stops().is_empty());
    }

    /// A timed-out job retried while the worker still runs its first attempt waits until the
    /// worker lets go of the id, then runs under the same id.
    #[test]
    fn a_retry_waits_for_the_previous_attempt_to_be_let_go() {
        let (store, _) = store(StoreLimits::default());
        let id = timed_out(&store);
        assert_eq!(store.retry(&id), Some(RetryOutcome::Requeued));
        assert_eq!(status_of(&store, &id)["status"], "IN_QUEUE");
        assert_eq!(store.counts().in_queue, 1);
        assert!(
            store.take(1).is_empty(),
            "the worker still holds the first attempt"
        );
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[&id]);
        assert!(store.take(1).is_empty());
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[]);
        assert!(
            store.take(1).is_empty(),
            "the heartbeat may predate the stop"
        );
        store.heartbeat(&[]);
        run(&store, &id, r#"{"output": "second"}"#);
        assert_eq!(status_of(&store, &id)["output"], "second");
        assert_eq!(store.counts().in_queue, 0);
    }

    /// Cancelling queued jobs leaves their ids in the queue only until they outnumber the live
    /// ones: the queue stays proportional to the jobs really waiting.
    #[test]
    fn cancelled_queued_jobs_do_not_pile_up_in_the_queue() {
        let (store, _) = store(StoreLimits::default());
        for _ in 0..1000 {
            let id = store.submit(job(Submission::Async));
            store.cancel(&id);
        }
        let live = store.submit(job(Submission::Async));
        assert!(
            store.state().queue.len() <= 130,
            "{}",
            store.state().queue.len()
        );
        let taken = store.take(10);
        assert_eq!(taken.len(), 1);
        assert!(taken[0].contains(&live));
    }

    /// At shutdown a waiting `/runsync` answers at once with the job's current status.
    #[tokio::test]
    async fn closing_answers_waiters_at_once() {
        let (store, _, waiting) = runsync_waiting();
        tokio::task::yield_now().await;
        store.close();
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter answered")
            .expect("the waiter ran")
            .expect("known");
        assert!(answer.contains(r#""status":"IN_QUEUE""#), "{answer}");
    }
}
