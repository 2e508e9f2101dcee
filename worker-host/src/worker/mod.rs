//! The queue worker: takes jobs from the platform, runs them on the handler, and delivers every
//! result exactly once.
//!
//! Four loops share one in-flight set:
//! - **take**: waits for a free slot, then asks for as many jobs as there are free slots (one
//!   batch take), so the next take goes out the moment a job finishes. Errors back off
//!   exponentially with jitter; 429 honours `Retry-After`. A job is also *held* from its take
//!   until its result is delivered, and at most twice `--concurrency` jobs are held: a job's
//!   result is posted while the next job runs, but when the platform stops accepting results
//!   the worker stops taking jobs it could not report. A big job (a MiB of text or more) holds
//!   a spare hold too while one is free, so its result is delivered before the next job is
//!   taken and a worker holds one big job's buffers at a time.
//! - **stop**: long-polls job-stop and cancels the named jobs (nothing is posted for them).
//! - **heartbeat**: pings at a fixed period with the in-flight ids, on its own timer.
//! - **one task per job**: runs the handler off the async runtime's threads (a blocking thread
//!   for a handler in this process; a runner's job only waits, as a task) and posts, in order,
//!   the job's stream chunks and progress reports, then its one final result. Everything a job
//!   sends goes through its own channel, so nothing can overtake the result.
//!
//! The files: `take` (the take loop), `job` (a job's task and result delivery), `control`
//! (job-stop and the heartbeat); the shared state, the start and the drain are here.
//!
//! Shutdown: stop taking at once, let running jobs finish within the grace period, then cancel
//! them and post a failure result for each; then exit. A stop or the end of the grace period
//! reaches a job ahead of any stream chunks still queued for delivery.

use crate::handler::{CancelToken, Current, HandlerInfo, LiveHandler, Readiness};
use crate::job::{job_done_body, Failure, JobResult, Origin, Outcome, RawJson};
use crate::metrics;
use crate::runpod::{PlatformClient, Post, TakeOutcome, TakenJob};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod control;
mod job;
mod take;

use control::{heartbeat_loop, stop_loop};
use take::take_loop;

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
    let body = bytes::Bytes::from(job_done_body(result, origin, None, false).text);
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
