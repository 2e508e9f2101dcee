//! The queue worker: takes jobs from the platform, runs them on the handler, and delivers every
//! result exactly once.
//!
//! Four loops share one in-flight set:
//! - **take**: waits for a free slot, then asks for as many jobs as there are free slots (one
//!   batch take), so the next take goes out the moment a job finishes. Errors back off
//!   exponentially with jitter; 429 honours `Retry-After`. A job is also *held* from its take
//!   until its result is delivered, and at most twice `--concurrency` jobs are held: a job's
//!   result is posted while the next job runs, but when the platform stops accepting results
//!   the worker stops taking jobs it could not report.
//! - **stop**: long-polls job-stop and cancels the named jobs (nothing is posted for them).
//! - **heartbeat**: pings at a fixed period with the in-flight ids, on its own timer.
//! - **one task per job**: runs the handler on a blocking thread (never on the async runtime) and
//!   posts, in order, the job's stream chunks and progress reports, then its one final result.
//!   Everything a job sends goes through its own channel, so nothing can overtake the result.
//!
//! Shutdown: stop taking at once, let running jobs finish within the grace period, then cancel
//! them and post a failure result for each; then exit. A stop or the end of the grace period
//! reaches a job ahead of any stream chunks still queued for delivery.

use crate::handler::{CancelToken, Current, HandlerInfo, JobEvents, Lease, LiveHandler, Readiness};
use crate::job::{
    job_done_body, progress_body, stream_chunk_body, Failure, Job, JobResult, Origin, Outcome,
    RawJson,
};
use crate::metrics::{self, JobOutcome, PostResult, TakeResult};
use crate::runpod::{PlatformClient, Post, StopOutcome, TakeOutcome, TakenJob};
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How many jobs may run at once, as the operator asked; each handler generation's own
    /// limit may lower it ([`WorkerConfig::slots_for`]).
    pub concurrency: usize,
    /// How long running jobs may go on after a shutdown signal before they are cancelled.
    pub shutdown_grace: Duration,
    /// How long a result POST is retried before it is given up.
    pub result_retry: Duration,
    /// The heartbeat period.
    pub ping_interval: Duration,
    /// The largest result body, in bytes.
    pub max_output_bytes: usize,
    /// Put every streamed chunk in a streaming job's final result.
    pub return_aggregate_stream: bool,
    /// Add `stopPod` to every result and stop after the first job.
    pub refresh_worker: bool,
    /// Where error payloads say they come from.
    pub origin: Origin,
}

impl WorkerConfig {
    /// How many jobs run at once on `handler`: the operator's concurrency, lowered to the most
    /// the handler allows.
    pub fn slots_for(&self, handler: &HandlerInfo) -> usize {
        Self::slots(self.concurrency, handler)
    }

    /// How many jobs run at once on `handler` when the operator asked for `concurrency`.
    pub fn slots(concurrency: usize, handler: &HandlerInfo) -> usize {
        let asked = concurrency.max(1);
        match handler.max_concurrency {
            0 => asked,
            limit => asked.min(limit as usize),
        }
    }
}

/// The smallest time between two empty takes: a platform that answers "no job" at once (instead
/// of long-polling) must not make the worker spin.
const MIN_EMPTY_TAKE_PERIOD: Duration = Duration::from_millis(100);
/// The first wait after a failed request; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between failed requests.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long job-stop is left alone after an empty answer (the SDK's pacing).
const STOP_POLL_PAUSE: Duration = Duration::from_secs(1);
/// How many jobs per slot may be held between take and delivered result: one running and one
/// whose result is being posted.
const HELD_JOBS_PER_SLOT: usize = 2;
/// How long the jobs of a take the platform began to answer may take to arrive once shutdown
/// has begun (before it, the long-poll timeout applies).
const TAKE_BODY_GRACE: Duration = Duration::from_secs(5);
/// How long the taking may wait for a result to be delivered before it says so.
const HOLD_WARNING_AFTER: Duration = Duration::from_secs(1);

/// What a job's task receives from its handler, in order: what it emitted, then its result.
#[derive(Debug)]
enum JobMessage {
    Chunk(RawJson),
    Progress(RawJson),
    Completed(JobResult),
}

/// How a job ended. The first ending a job's task acts on wins; later ones are ignored.
#[derive(Debug)]
enum Ending {
    /// The handler returned.
    Completed(JobResult),
    /// The platform stopped the job: nothing is posted, as in the SDK.
    Stopped,
    /// The worker shut down before the job finished.
    ShutDown,
}

/// A job the worker holds (running, waiting for a slot, or delivering its result).
#[derive(Debug)]
struct InFlightJob {
    cancel: CancelToken,
    /// Stop and shutdown endings: a channel of their own, so they overtake queued chunks.
    interrupt: mpsc::UnboundedSender<Ending>,
}

/// The state the loops share.
#[derive(Debug)]
struct Shared {
    live: Arc<LiveHandler>,
    client: PlatformClient,
    config: WorkerConfig,
    /// One permit per running handler call (`--concurrency`).
    slots: Arc<Semaphore>,
    /// One permit per job from its take until its result is delivered ([`HELD_JOBS_PER_SLOT`] per
    /// slot), so results that cannot be delivered stop the worker from taking more jobs.
    holds: Arc<Semaphore>,
    in_flight: Mutex<HashMap<String, InFlightJob>>,
    /// Cancelled to make the worker stop taking jobs (shutdown, or refresh_worker after a job).
    stop_taking: CancellationToken,
    /// Why the handler cannot serve any more (a crash loop), once it says so.
    handler_failed: Mutex<Option<String>>,
    jobs: TaskTracker,
}

impl Shared {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlightJob>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn in_flight_ids(&self) -> Vec<String> {
        self.in_flight().keys().cloned().collect()
    }
}

/// Runs the worker until `shutdown` resolves (or, with `refresh_worker`, until the first job is
/// done, or the handler can no longer serve), then drains as described in the module docs.
/// Handler calls of jobs cancelled at the end of the grace period may still be running: the
/// caller's `Handler::shutdown` waits for them.
pub async fn run(
    live: Arc<LiveHandler>,
    client: PlatformClient,
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> WorkerExit {
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    // The slots beyond what the handler serving allows, held back (see `follow_the_handler`).
    let held_back = live.serving().and_then(|generation| {
        metrics::get().set_concurrency(config.slots_for(generation.info()));
        let beyond = config.concurrency.max(1) - config.slots_for(generation.info());
        slots.clone().try_acquire_many_owned(beyond as u32).ok()
    });
    let shared = Arc::new(Shared {
        slots,
        holds: Arc::new(Semaphore::new(
            config.concurrency.max(1) * HELD_JOBS_PER_SLOT,
        )),
        live,
        client,
        config,
        in_flight: Mutex::new(HashMap::new()),
        stop_taking: CancellationToken::new(),
        handler_failed: Mutex::new(None),
        jobs: TaskTracker::new(),
    });
    let finished = CancellationToken::new();
    let follower = tokio::spawn(follow_the_handler(
        shared.clone(),
        held_back,
        finished.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone(), finished.clone()));
    let stops = tokio::spawn(stop_loop(shared.clone(), finished.clone()));
    let takes = tokio::spawn(take_loop(shared.clone()));

    let mut shutdown = std::pin::pin!(shutdown);
    let signalled = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("Shutdown signal received: no new jobs will be taken.");
            true
        }
        () = shared.stop_taking.cancelled() => false,
    };
    shared.stop_taking.cancel();
    let _ = takes.await;
    if !signalled {
        // Stopped by refresh_worker: the jobs still running finish in their own time, unless a
        // shutdown signal comes first (then the grace period applies from there).
        shared.jobs.close();
        tokio::select! {
            () = shared.jobs.wait() => {}
            () = &mut shutdown => {
                tracing::info!("Shutdown signal received while the last jobs run.");
            }
        }
    }
    drain(&shared).await;
    finished.cancel();
    let _ = stops.await;
    let _ = heartbeat.await;
    let _ = follower.await;
    let failed = shared
        .handler_failed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match failed {
        Some(reason) => WorkerExit::HandlerFailed(reason),
        None => WorkerExit::Stopped,
    }
}

/// How long the one take after a failed `init` may take (see [`claim_one`]).
const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// After a failed `init` (reported unhealthy already): takes at most one job, with one bounded
/// take, and fails it with `failure`, so that the request that made the platform start this
/// worker learns why instead of waiting out its TTL in the queue. The SDK's open prestart-hook
/// PR does the same.
pub async fn claim_one(client: &PlatformClient, failure: Failure, origin: &Origin) {
    let take = async {
        match client.start_take(1, false).await {
            Ok(answer) => client.read_take(answer).await,
            Err(outcome) => outcome,
        }
    };
    let Ok(TakeOutcome::Jobs(jobs)) = tokio::time::timeout(CLAIM_WAIT, take).await else {
        return;
    };
    let result = JobResult {
        outcome: Outcome::Failed {
            failure,
            streaming: false,
        },
        recycle: false,
    };
    let body = bytes::Bytes::from(job_done_body(&result, origin, None, false).text);
    for taken in jobs {
        let id = match taken {
            TakenJob::Valid(job) => job.id().to_owned(),
            TakenJob::Invalid { id: Some(id), .. } => id,
            TakenJob::Invalid { id: None, .. } => continue,
        };
        for attempt in 1..=3 {
            match client
                .post(Post::Done { is_stream: false }, &id, body.clone())
                .await
            {
                Ok(()) => {
                    tracing::info!(job_id = %id, "Failed the job this worker was started for: its handler's init failed.");
                    break;
                }
                Err(error) => {
                    tracing::warn!(job_id = %id, "Posting the init failure failed (attempt {attempt}): {error}");
                    tokio::time::sleep(FIRST_BACKOFF * 2_u32.pow(attempt)).await;
                }
            }
        }
    }
}

/// Why the worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// A shutdown signal, or `--refresh-worker` after its job.
    Stopped,
    /// The handler can no longer serve (a crash loop); reported to the platform as unhealthy.
    HandlerFailed(String),
}

/// Waits until the handler serving can take a job. `false` when the worker stops taking first,
/// or the handler failed for good: then it is reported unhealthy (once) and taking stops.
async fn handler_ready(shared: &Shared) -> bool {
    let mut current = shared.live.subscribe();
    loop {
        let serving = current.borrow_and_update().clone();
        let failed = match serving {
            // A drain-first swap: jobs wait in the platform's queue until the new handler is in.
            Current::Swapping => {
                tokio::select! {
                    biased;
                    () = shared.stop_taking.cancelled() => return false,
                    changed = current.changed() => if changed.is_err() { return false },
                }
                continue;
            }
            Current::Failed(reason) => reason,
            Current::Serving(generation) => {
                let mut readiness = generation.handler().readiness();
                let waited = tokio::select! {
                    biased;
                    () = shared.stop_taking.cancelled() => return false,
                    // A swap: look at the new handler.
                    changed = current.changed() => {
                        if changed.is_err() {
                            return false;
                        }
                        continue;
                    }
                    state = readiness.wait_for(|state| *state != Readiness::Restarting) => state.map(|state| state.clone()),
                };
                match waited {
                    Ok(Readiness::Ready) => return true,
                    Ok(Readiness::Failed(reason)) => reason,
                    Ok(Readiness::Restarting) | Err(_) => {
                        shared.stop_taking.cancel();
                        return false;
                    }
                }
            }
        };
        tracing::error!(
            "The handler cannot serve any more: {failed}. Reporting the worker unhealthy."
        );
        shared
            .client
            .report_unhealthy("handler_crashed", &failed)
            .await;
        *shared
            .handler_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(failed);
        shared.stop_taking.cancel();
        return false;
    }
}

/// Whether the handler serving can take a job right now.
fn handler_ready_now(shared: &Shared) -> bool {
    shared
        .live
        .serving()
        .is_some_and(|generation| *generation.handler().readiness().borrow() == Readiness::Ready)
}

/// Keeps the number of slots at what the handler serving allows: a swap to a handler with
/// another `max_concurrency` holds back slots (as running jobs free them) or gives them back.
/// `held_back` is what is held back for the first handler.
async fn follow_the_handler(
    shared: Arc<Shared>,
    mut held_back: Option<OwnedSemaphorePermit>,
    finished: CancellationToken,
) {
    let asked = shared.config.concurrency.max(1);
    let mut current = shared.live.subscribe();
    current.borrow_and_update();
    loop {
        tokio::select! {
            () = finished.cancelled() => return,
            changed = current.changed() => if changed.is_err() { return },
        }
        let Current::Serving(generation) = current.borrow_and_update().clone() else {
            continue;
        };
        let slots = shared.config.slots_for(generation.info());
        metrics::get().set_concurrency(slots);
        if slots < asked {
            tracing::warn!(
                "Concurrency {asked} lowered to {slots}, the most {} allows.",
                generation.label()
            );
        }
        let beyond = asked - slots;
        let held = held_back
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        if beyond < held {
            if let Some(permits) = held_back.as_mut() {
                drop(permits.split(held - beyond));
            }
        } else if beyond > held {
            let more = tokio::select! {
                () = finished.cancelled() => return,
                more = shared.slots.clone().acquire_many_owned((beyond - held) as u32) => more.expect("the semaphore is never closed"),
            };
            match held_back.as_mut() {
                Some(permits) => permits.merge(more),
                None => held_back = Some(more),
            }
        }
    }
}

/// Waits for running jobs within the grace period, then ends the rest with a failure result.
async fn drain(shared: &Shared) {
    shared.jobs.close();
    let running = shared.in_flight().len();
    if running > 0 {
        tracing::info!(
            "Waiting up to {:?} for {running} running job(s) to finish.",
            shared.config.shutdown_grace
        );
    }
    if tokio::time::timeout(shared.config.shutdown_grace, shared.jobs.wait())
        .await
        .is_ok()
    {
        return;
    }
    let unfinished: Vec<(String, CancelToken, mpsc::UnboundedSender<Ending>)> = shared
        .in_flight()
        .iter()
        .map(|(id, job)| (id.clone(), job.cancel.clone(), job.interrupt.clone()))
        .collect();
    tracing::warn!(
        "The shutdown grace period is over: cancelling {} job(s) and reporting them as failed.",
        unfinished.len()
    );
    for (_, cancel, interrupt) in unfinished {
        cancel.cancel();
        let _ = interrupt.send(Ending::ShutDown);
    }
    // Each task now posts its failure result (bounded by the result retry time).
    shared.jobs.wait().await;
}

/// Exponential backoff with full jitter, reset on success.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// The wait before the next attempt: random in [next/2, next], then `next` doubles.
    fn wait(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// Sleeps unless `token` is cancelled first; returns false when it was.
async fn pause(token: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => true,
        () = token.cancelled() => false,
    }
}

/// A slot and a hold: what one taken job needs.
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Waits for a hold, then a slot; `None` once the worker stops taking jobs. The hold comes
/// first so that no slot sits idle while results wait for delivery: a job already here (sent
/// beyond what was asked for) may use it.
async fn first_permits(shared: &Shared) -> Option<Permits> {
    let mut warned = false;
    let hold = loop {
        tokio::select! {
            biased;
            () = shared.stop_taking.cancelled() => return None,
            hold = shared.holds.clone().acquire_owned() => {
                break hold.expect("the semaphore is never closed");
            }
            // A result still in flight when the next job could start is normal (it is posted
            // while that job runs); one that holds the taking up for long is worth a line.
            () = tokio::time::sleep(HOLD_WARNING_AFTER), if !warned => {
                tracing::warn!(
                    "Results of earlier jobs are still being delivered: no new job is taken until one is."
                );
                warned = true;
            }
        }
    };
    let slot = tokio::select! {
        biased;
        () = shared.stop_taking.cancelled() => return None,
        permit = shared.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
    };
    Some((slot, hold))
}

async fn take_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    loop {
        // Jobs wait in the platform's queue, not here, while a crashed runner restarts.
        if !handler_ready(&shared).await {
            return;
        }
        let Some(first) = first_permits(&shared).await else {
            return;
        };
        // A runner that crashed under the job whose slot this is was marked as restarting before
        // that job ended: look again, so no job is taken for a handler that cannot run it.
        if !handler_ready_now(&shared) {
            drop(first);
            continue;
        }
        let mut permits = vec![first];
        while let Ok(hold) = shared.holds.clone().try_acquire_owned() {
            let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
                break;
            };
            permits.push((slot, hold));
        }
        let in_progress = !shared.in_flight().is_empty();
        let started = Instant::now();
        let answer = tokio::select! {
            biased;
            // Abandon the open long-poll at once: no job arrives after shutdown began.
            () = shared.stop_taking.cancelled() => return,
            answer = shared.client.start_take(permits.len(), in_progress) => answer,
        };
        // Once the platform has answered with jobs, they are read and run even if shutdown has
        // begun meanwhile: dropping them now would leave them without a result.
        let outcome = match answer {
            Ok(answer) => {
                let read = shared.client.read_take(answer);
                let shutdown_deadline = async {
                    shared.stop_taking.cancelled().await;
                    tokio::time::sleep(TAKE_BODY_GRACE).await;
                };
                tokio::select! {
                    outcome = read => outcome,
                    () = shutdown_deadline => TakeOutcome::Failed(format!(
                        "the jobs of a take answered as shutdown began did not arrive within {TAKE_BODY_GRACE:?}"
                    )),
                }
            }
            Err(outcome) => outcome,
        };
        match outcome {
            TakeOutcome::Jobs(jobs) => {
                metrics::get().take_request(TakeResult::jobs);
                backoff.reset();
                tracing::debug!("Jobs taken: {}", jobs.len());
                for taken in jobs {
                    accept(&shared, taken, permits.pop());
                }
            }
            TakeOutcome::NoJob => {
                metrics::get().take_request(TakeResult::empty);
                backoff.reset();
                drop(permits);
                let elapsed = started.elapsed();
                if elapsed < MIN_EMPTY_TAKE_PERIOD
                    && !pause(&shared.stop_taking, MIN_EMPTY_TAKE_PERIOD - elapsed).await
                {
                    return;
                }
            }
            TakeOutcome::RateLimited(wait) => {
                metrics::get().take_request(TakeResult::throttled);
                drop(permits);
                tracing::warn!("Job take rate-limited (429): waiting {wait:?}.");
                if !pause(&shared.stop_taking, wait).await {
                    return;
                }
            }
            TakeOutcome::Failed(reason) => {
                metrics::get().take_request(TakeResult::error);
                drop(permits);
                let wait = backoff.wait();
                tracing::error!("Failed to get job: {reason}; retrying in {wait:?}.");
                if !pause(&shared.stop_taking, wait).await {
                    return;
                }
            }
        }
    }
}

/// Starts a taken job (or reports an invalid one). `permits` is `None` for a job beyond what
/// was asked for: it waits for a slot of its own.
fn accept(shared: &Arc<Shared>, taken: TakenJob, permits: Option<Permits>) {
    let (slot, hold) = permits.unzip();
    let job = match taken {
        TakenJob::Valid(job) => job,
        TakenJob::Invalid { id: None, reason } => {
            tracing::error!("Skipped a job that cannot be identified: {reason}.");
            return;
        }
        TakenJob::Invalid {
            id: Some(id),
            reason,
        } => {
            tracing::error!(job_id = %id, "Job rejected: {reason}.");
            let result = JobResult::failed(Failure::new("InvalidJob", reason), false);
            let shared = shared.clone();
            let span = tracing::info_span!("job", job_id = %id);
            shared.jobs.clone().spawn(
                async move {
                    let _hold = hold;
                    let body = job_done_body(
                        &result,
                        &shared.config.origin,
                        None,
                        shared.config.refresh_worker,
                    );
                    let delivered =
                        deliver(&shared, Post::Done { is_stream: false }, &id, body.text).await;
                    metrics::get().job_ended(if delivered {
                        JobOutcome::failed
                    } else {
                        JobOutcome::undelivered
                    });
                }
                .instrument(span),
            );
            return;
        }
    };
    let (interrupt, interrupts) = mpsc::unbounded_channel();
    let cancel = CancelToken::new();
    {
        let mut in_flight = shared.in_flight();
        if in_flight.contains_key(job.id()) {
            // The platform sent a job that is already running here: running it twice would post
            // two results for one id. The running copy's result answers for both.
            tracing::warn!(job_id = %job.id(), "Job already in progress here; the duplicate is ignored.");
            return;
        }
        in_flight.insert(
            job.id().to_owned(),
            InFlightJob {
                cancel: cancel.clone(),
                interrupt,
            },
        );
    }
    let span = tracing::info_span!("job", job_id = %job.id(), batchId = job.batch_id().map(tracing::field::display));
    let task = JobTask {
        shared: shared.clone(),
        id: job.id().to_owned(),
        interrupts,
        _hold: hold,
        streaming: shared
            .live
            .serving()
            .is_some_and(|generation| generation.info().streaming),
    };
    shared
        .jobs
        .clone()
        .spawn(task.run(job, slot, cancel).instrument(span));
}

/// Sends a job's handler events into its channel.
struct ChannelEvents(mpsc::UnboundedSender<JobMessage>);

impl JobEvents for ChannelEvents {
    fn chunk(&self, chunk: RawJson) {
        let _ = self.0.send(JobMessage::Chunk(chunk));
    }

    fn progress(&self, progress: RawJson) {
        let _ = self.0.send(JobMessage::Progress(progress));
    }
}

/// A job's messages, with those already taken off the channel to look past a progress value.
struct JobMessages {
    receiver: mpsc::UnboundedReceiver<JobMessage>,
    ahead: VecDeque<JobMessage>,
}

impl JobMessages {
    /// The next message, in order; `None` once the handler's side is gone and all are read.
    async fn recv(&mut self) -> Option<JobMessage> {
        match self.ahead.pop_front() {
            Some(message) => Some(message),
            None => self.receiver.recv().await,
        }
    }

    /// The next message if one is there now.
    fn try_recv(&mut self) -> Result<JobMessage, mpsc::error::TryRecvError> {
        match self.ahead.pop_front() {
            Some(message) => Ok(message),
            None => self.receiver.try_recv(),
        }
    }

    /// Whether a newer progress value is already queued behind the one just taken.
    fn progress_superseded(&mut self) -> bool {
        while let Ok(message) = self.receiver.try_recv() {
            self.ahead.push_back(message);
        }
        self.ahead
            .iter()
            .any(|message| matches!(message, JobMessage::Progress(_)))
    }
}

/// One job's task: what it needs to run the job and deliver what the job produces.
struct JobTask {
    shared: Arc<Shared>,
    id: String,
    /// Stop and shutdown, checked before anything queued.
    interrupts: mpsc::UnboundedReceiver<Ending>,
    /// Released when the task ends, after the result is delivered (or given up).
    _hold: Option<OwnedSemaphorePermit>,
    /// Whether the handler that runs it streams (as the one serving when it arrived says,
    /// until it starts on one).
    streaming: bool,
}

/// Resolves once `lease`'s generation no longer serves (a swap).
async fn swapped_from(shared: &Shared, lease: &Lease) {
    let mut current = shared.live.subscribe();
    loop {
        let moved = match &*current.borrow_and_update() {
            Current::Serving(generation) => !lease.is_on(generation),
            Current::Swapping | Current::Failed(_) => true,
        };
        if moved {
            return;
        }
        if current.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

impl JobTask {
    /// Waits for a slot (over-fetched jobs), runs the handler on a blocking thread, posts what
    /// it emits, then its result.
    async fn run(mut self, job: Job, slot: Option<OwnedSemaphorePermit>, cancel: CancelToken) {
        let shared = self.shared.clone();
        let slot = match slot {
            Some(slot) => slot,
            None => tokio::select! {
                biased;
                // Stopped or shut down before it could start.
                Some(ending) = self.interrupts.recv() => return self.finish(ending, &[]).await,
                slot = shared.slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            },
        };
        // Bound to the handler serving when it starts: it runs there and is reported as that
        // handler's, even if a swap moves later jobs to another. It also waits for a slot of
        // that build's own (its max_concurrency, which the worker's slots reach only as earlier
        // jobs end); a swap meanwhile binds it to the new build instead.
        let (lease, build_slot) = loop {
            let lease = tokio::select! {
                biased;
                Some(ending) = self.interrupts.recv() => return self.finish(ending, &[]).await,
                lease = shared.live.next_lease() => lease,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(reason) => {
                    let result = JobResult::failed(Failure::new("HandlerFailed", reason), false);
                    return self.finish(Ending::Completed(result), &[]).await;
                }
            };
            tokio::select! {
                biased;
                Some(ending) = self.interrupts.recv() => return self.finish(ending, &[]).await,
                slot = lease.slot() => break (lease, slot),
                () = swapped_from(&shared, &lease) => {}
            }
        };
        self.streaming = lease.info().streaming;
        tracing::info!("Started.");
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut messages = JobMessages {
            receiver,
            ahead: VecDeque::new(),
        };
        let stop_taking = shared.stop_taking.clone();
        let refresh_worker = shared.config.refresh_worker;
        // A blocking-pool thread for a handler in this process (it may block for minutes without
        // touching the runtime), a task for a runner's. The slot goes with it and frees when the handler returns, before the result is
        // posted (the next take need not wait for delivery; the job's hold bounds how many
        // results may wait), but never earlier: a job that was stopped or ended by shutdown keeps
        // its slot until its handler has noticed, so no more than --concurrency handlers ever run
        // at once.
        crate::handler::spawn_job(
            lease,
            build_slot,
            job,
            ChannelEvents(sender),
            cancel,
            move |result, events| {
                // With --refresh-worker the worker takes no job after this one: stop taking
                // before the slot frees (and after the result is on its way, so the shutdown
                // that follows finds it). A handler's own recycle request only sets stopPod, as
                // in the SDK: the platform replaces the worker.
                let _ = events.0.send(JobMessage::Completed(result));
                if refresh_worker {
                    stop_taking.cancel();
                }
                drop(slot);
            },
        );

        let mut chunks = Vec::new();
        let mut stream_given_up = false;
        let mut chunks_dropped = 0_usize;
        loop {
            let message = tokio::select! {
                biased;
                Some(ending) = self.interrupts.recv() => {
                    return self.interrupted(ending, &mut messages, &chunks).await;
                }
                message = messages.recv() => message,
            };
            let Some(message) = message else {
                // The handler thread ended without a result (it cannot: its result is sent
                // unconditionally); end the job rather than hold it forever.
                return self.finish(Ending::ShutDown, &chunks).await;
            };
            let (kind, body) = match message {
                JobMessage::Completed(result) => {
                    if chunks_dropped > 0 {
                        metrics::get().stream_chunks_dropped(chunks_dropped);
                        tracing::error!("{chunks_dropped} stream chunk(s) were not delivered.");
                    }
                    return self.finish(Ending::Completed(result), &chunks).await;
                }
                JobMessage::Chunk(chunk) => {
                    let body = stream_chunk_body(&chunk);
                    if shared.config.return_aggregate_stream {
                        chunks.push(chunk);
                    }
                    if stream_given_up {
                        chunks_dropped += 1;
                        continue;
                    }
                    (Post::Stream, body)
                }
                // Progress is state, not a log: a value with a newer one behind it is never
                // posted (the latest still is, before the result). So however fast a handler reports, at most one progress
                // post is in flight and the next one carries the latest value.
                JobMessage::Progress(_) if messages.progress_superseded() => continue,
                JobMessage::Progress(progress) => (Post::Progress, progress_body(&progress)),
            };
            let delivered = tokio::select! {
                biased;
                Some(ending) = self.interrupts.recv() => {
                    return self.interrupted(ending, &mut messages, &chunks).await;
                }
                delivered = deliver(&shared, kind, &self.id, body) => delivered,
            };
            // Once a chunk is given up after the whole retry time, the stream route is down:
            // retrying every later chunk as long would hold the result back for hours.
            if !delivered && kind == Post::Stream {
                stream_given_up = true;
            }
        }
    }

    /// A stop or the end of the shutdown grace reached the job. Chunks still queued are not
    /// posted; a result the handler already returned is still posted (it is the job's real
    /// answer), otherwise the stop or shutdown ending applies.
    async fn interrupted(mut self, ending: Ending, messages: &mut JobMessages, chunks: &[RawJson]) {
        while let Ok(message) = messages.try_recv() {
            if let JobMessage::Completed(result) = message {
                return self.finish(Ending::Completed(result), chunks).await;
            }
        }
        if matches!(ending, Ending::Stopped) {
            // The job stays in the heartbeat's list until its handler has returned (as in the
            // SDK), or the end of the shutdown grace gives up on it; what it sends meanwhile is
            // dropped.
            loop {
                tokio::select! {
                    biased;
                    Some(Ending::ShutDown) = self.interrupts.recv() => break,
                    message = messages.recv() => match message {
                        Some(JobMessage::Completed(_)) | None => break,
                        Some(_) => {}
                    },
                }
            }
        }
        self.finish(ending, chunks).await;
    }

    /// Posts the job's final result (if it gets one) and forgets the job.
    async fn finish(self, ending: Ending, chunks: &[RawJson]) {
        let shared = &self.shared;
        let id = self.id.as_str();
        let config = &shared.config;
        let streaming = self.streaming;
        let result = match ending {
            Ending::Stopped => {
                metrics::get().job_ended(JobOutcome::cancelled);
                shared.in_flight().remove(id);
                tracing::info!("Job stopped by the platform: nothing is posted for it.");
                return;
            }
            Ending::ShutDown => JobResult {
                outcome: Outcome::Failed {
                    failure: Failure::new(
                        "WorkerShutdown",
                        "worker shut down before the job finished",
                    ),
                    streaming,
                },
                recycle: false,
            },
            Ending::Completed(result) => result,
        };
        let aggregate = config.return_aggregate_stream.then_some(chunks);
        let mut body = job_done_body(&result, &config.origin, aggregate, config.refresh_worker);
        // The handler's output itself reported the failure (an `error` key).
        let failed_by_output = body.failed && matches!(result.outcome, Outcome::Output(_));
        if body.text.len() > config.max_output_bytes {
            let oversize = JobResult {
                outcome: Outcome::Failed {
                    failure: Failure::new(
                        "OutputTooLarge",
                        format!(
                            "the job's result is {} bytes, over the limit of {} bytes",
                            body.text.len(),
                            config.max_output_bytes
                        ),
                    ),
                    streaming: false,
                },
                recycle: result.recycle,
            };
            body = job_done_body(&oversize, &config.origin, None, config.refresh_worker);
            if let Outcome::Failed { failure, .. } = &oversize.outcome {
                tracing::error!("The job fails: {}.", failure.message);
            }
        }
        // The SDK marks every final result of a streaming handler isStream=true, failures
        // included.
        let is_stream = streaming;
        // The job stays in the heartbeat's list until its result is delivered (or given up), so
        // the platform does not take it for lost while a POST is being retried.
        let delivered = deliver(shared, Post::Done { is_stream }, id, body.text).await;
        shared.in_flight().remove(id);
        metrics::get().job_ended(if !delivered {
            JobOutcome::undelivered
        } else if body.failed {
            JobOutcome::failed
        } else {
            JobOutcome::completed
        });
        if delivered {
            // A failure is worth a line of its own in the worker's log, as the SDK logs the
            // handler's exception.
            match &result.outcome {
                Outcome::Failed { failure, .. } => tracing::error!(
                    "Finished: the job failed ({}: {}).",
                    failure.error_type,
                    failure.message
                ),
                _ if failed_by_output => {
                    tracing::error!("Finished: the job failed (its output has an error key).");
                }
                _ => tracing::info!("Finished."),
            }
        }
        if config.refresh_worker {
            tracing::info!("refresh_worker is set: no more jobs are taken.");
            shared.stop_taking.cancel();
        }
    }
}

/// Posts with retries: connection errors, timeouts, 408, 429 and 5xx are retried with backoff
/// until the result retry time is spent. Every failure and the final give-up are logged.
/// Returns whether the POST was delivered.
async fn deliver(shared: &Shared, kind: Post, id: &str, body: String) -> bool {
    let body = bytes::Bytes::from(body);
    let deadline = Instant::now() + shared.config.result_retry;
    let mut backoff = Backoff::new();
    let mut attempt = 1;
    // Whether an earlier attempt may have landed without our seeing the answer.
    let mut unsure = false;
    loop {
        match shared.client.post(kind, id, body.clone()).await {
            Ok(()) => {
                metrics::get().result_post(PostResult::delivered);
                return true;
            }
            Err(error) if error.retryable && Instant::now() < deadline => {
                metrics::get().result_post(PostResult::retried);
                unsure |= error.outcome_unknown;
                let wait = backoff
                    .wait()
                    .min(deadline.saturating_duration_since(Instant::now()));
                tracing::warn!("Posting the {} for job {id} failed (attempt {attempt}): {error}; retrying in {wait:?}.", kind.noun());
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(error) if unsure && !error.retryable => {
                metrics::get().result_post(PostResult::delivered);
                tracing::warn!("The platform refused a retry of the {} for job {id} ({error}); an earlier attempt that timed out has probably been delivered.", kind.noun());
                return true;
            }
            Err(error) => {
                metrics::get().result_post(PostResult::given_up);
                let lost = match kind {
                    Post::Done { .. } => "Failed to return job results",
                    Post::Stream => "Failed to post a stream chunk",
                    Post::Progress => "Failed to post progress",
                };
                tracing::error!(
                    "{lost} for job {id} after {attempt} attempt(s): {error}. Giving up."
                );
                return false;
            }
        }
    }
}

async fn stop_loop(shared: Arc<Shared>, finished: CancellationToken) {
    if !shared.client.has_stop_channel() {
        return;
    }
    let mut backoff = Backoff::new();
    loop {
        let outcome = tokio::select! {
            outcome = shared.client.poll_stop() => outcome,
            () = finished.cancelled() => return,
        };
        let wait = match outcome {
            StopOutcome::Stop(ids) if ids.is_empty() => {
                backoff.reset();
                STOP_POLL_PAUSE
            }
            StopOutcome::Stop(ids) => {
                backoff.reset();
                for id in ids {
                    stop_job(&shared, &id);
                }
                Duration::ZERO
            }
            StopOutcome::RateLimited(wait) => wait,
            StopOutcome::Failed(reason) => {
                let wait = backoff.wait();
                tracing::warn!("Job-stop poll failed: {reason}; retrying in {wait:?}.");
                wait
            }
        };
        if !pause(&finished, wait).await {
            return;
        }
    }
}

fn stop_job(shared: &Shared, id: &str) {
    let in_flight = shared.in_flight();
    let Some(job) = in_flight.get(id) else {
        tracing::debug!(job_id = %id, "Stop requested for a job that is not here.");
        return;
    };
    tracing::info!(job_id = %id, "Stopping job.");
    job.cancel.cancel();
    let _ = job.interrupt.send(Ending::Stopped);
}

async fn heartbeat_loop(shared: Arc<Shared>, finished: CancellationToken) {
    if !shared.client.has_ping() {
        tracing::info!("RUNPOD_WEBHOOK_PING is not set: no heartbeat.");
        return;
    }
    let period = shared.config.ping_interval.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = finished.cancelled() => return,
        }
        // Each beat is its own task, so a slow answer never delays the next beat.
        let ids = shared.in_flight_ids();
        let client = shared.client.clone();
        tokio::spawn(async move { client.ping(&ids, period * 2).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff waits grow, stay within the cap, and restart small after a reset.
    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut backoff = Backoff::new();
        let waits: Vec<Duration> = (0..10).map(|_| backoff.wait()).collect();
        assert!(waits[0] <= FIRST_BACKOFF);
        assert!(waits.iter().all(|wait| *wait <= MAX_BACKOFF));
        assert!(waits[9] >= MAX_BACKOFF / 2);
        backoff.reset();
        assert!(backoff.wait() <= FIRST_BACKOFF);
    }
}
