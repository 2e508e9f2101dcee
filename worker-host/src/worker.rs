//! The queue worker: takes jobs from the platform, runs them on the handler, and delivers every
//! result exactly once.
//!
//! Four loops share one in-flight set:
//! - **take**: waits for a free slot, then asks for as many jobs as there are free slots (one
//!   batch take), so the next take goes out the moment a job finishes. Errors back off
//!   exponentially with jitter; 429 honours `Retry-After`.
//! - **stop**: long-polls job-stop and cancels the named jobs (nothing is posted for them).
//! - **heartbeat**: pings at a fixed period with the in-flight ids, on its own timer.
//! - **one task per job**: runs the handler on a blocking thread (never on the async runtime) and
//!   posts, in order, the job's stream chunks and progress reports, then its one final result.
//!   Everything a job sends goes through its own channel, so nothing can overtake the result.
//!
//! Shutdown: stop taking at once, let running jobs finish within the grace period, then cancel
//! them and post a failure result for each; then exit.

use crate::handler::{CancelToken, Handler, JobEvents};
use crate::job::{
    job_done_body, progress_body, stream_chunk_body, Failure, Job, JobResult, Origin, Outcome,
    RawJson,
};
use crate::runpod::{PlatformClient, Post, StopOutcome, TakeOutcome, TakenJob};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How many jobs run at once (already capped by the handler's own limit).
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

/// The smallest time between two empty takes: a platform that answers "no job" at once (instead
/// of long-polling) must not make the worker spin.
const MIN_EMPTY_TAKE_PERIOD: Duration = Duration::from_millis(100);
/// The first wait after a failed request; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between failed requests.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long handlers told to stop at the end of the shutdown grace get to return before the
/// host gives up on them (and skips the handler's teardown).
const CANCELLED_HANDLER_WAIT: Duration = Duration::from_secs(2);
/// How long job-stop is left alone after an empty answer (the SDK's pacing).
const STOP_POLL_PAUSE: Duration = Duration::from_secs(1);

/// What a job's task receives, in order: what the handler emitted, then how the job ended.
#[derive(Debug)]
enum JobMessage {
    Chunk(RawJson),
    Progress(RawJson),
    Final(Ending),
}

/// How a job ended. The first ending a job's task receives wins; later ones are ignored.
#[derive(Debug)]
enum Ending {
    /// The handler returned.
    Completed(JobResult),
    /// The platform stopped the job: nothing is posted, as in the SDK.
    Stopped,
    /// The worker shut down before the job finished.
    ShutDown,
}

/// A job the worker holds (running, or waiting for a slot).
#[derive(Debug)]
struct InFlightJob {
    cancel: CancelToken,
    messages: mpsc::UnboundedSender<JobMessage>,
}

/// The state the loops share.
#[derive(Debug)]
struct Shared {
    handler: Arc<dyn Handler>,
    client: PlatformClient,
    config: WorkerConfig,
    slots: Arc<Semaphore>,
    in_flight: Mutex<HashMap<String, InFlightJob>>,
    /// Cancelled to make the worker stop taking jobs (shutdown, or refresh_worker after a job).
    stop_taking: CancellationToken,
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
/// done), then drains as described in the module docs. Returns whether every handler call has
/// returned, so the handler can be torn down safely; `false` when a handler still runs a
/// cancelled job after the grace period.
pub async fn run(
    handler: Arc<dyn Handler>,
    client: PlatformClient,
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> bool {
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
        handler,
        client,
        config,
        in_flight: Mutex::new(HashMap::new()),
        stop_taking: CancellationToken::new(),
        jobs: TaskTracker::new(),
    });
    let finished = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone(), finished.clone()));
    let stops = tokio::spawn(stop_loop(shared.clone(), finished.clone()));
    let takes = tokio::spawn(take_loop(shared.clone()));

    tokio::select! {
        () = shutdown => tracing::info!("Shutdown signal received: no new jobs will be taken."),
        () = shared.stop_taking.cancelled() => {}
    }
    shared.stop_taking.cancel();
    let _ = takes.await;
    let drain_deadline = Instant::now() + shared.config.shutdown_grace;
    drain(&shared).await;
    finished.cancel();
    let _ = stops.await;
    let _ = heartbeat.await;
    handlers_returned(&shared, drain_deadline).await
}

/// Waits for every handler call to return (each holds a slot until it does), until `deadline`
/// or, for handlers cancelled at its end, a moment after it.
async fn handlers_returned(shared: &Shared, deadline: Instant) -> bool {
    let slots = u32::try_from(shared.config.concurrency.max(1)).unwrap_or(u32::MAX);
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(CANCELLED_HANDLER_WAIT);
    match tokio::time::timeout(wait, shared.slots.acquire_many(slots)).await {
        Ok(_) => true,
        Err(_) => {
            tracing::warn!(
                "A handler is still running a cancelled job {wait:?} after it was asked to stop."
            );
            false
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
    let unfinished: Vec<(String, CancelToken, mpsc::UnboundedSender<JobMessage>)> = shared
        .in_flight()
        .iter()
        .map(|(id, job)| (id.clone(), job.cancel.clone(), job.messages.clone()))
        .collect();
    tracing::warn!(
        "The shutdown grace period is over: cancelling {} job(s) and reporting them as failed.",
        unfinished.len()
    );
    for (_, cancel, messages) in unfinished {
        cancel.cancel();
        let _ = messages.send(JobMessage::Final(Ending::ShutDown));
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

async fn take_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    loop {
        let first = tokio::select! {
            permit = shared.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shared.stop_taking.cancelled() => return,
        };
        let mut permits = vec![first];
        while let Ok(permit) = shared.slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let in_progress = !shared.in_flight().is_empty();
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = shared.client.take(permits.len(), in_progress) => outcome,
            // Abandon the open long-poll at once: no job arrives after shutdown began.
            () = shared.stop_taking.cancelled() => return,
        };
        match outcome {
            TakeOutcome::Jobs(jobs) => {
                backoff.reset();
                tracing::debug!("Jobs taken: {}", jobs.len());
                for taken in jobs {
                    accept(&shared, taken, permits.pop());
                }
            }
            TakeOutcome::NoJob => {
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
                drop(permits);
                tracing::warn!("Job take rate-limited (429): waiting {wait:?}.");
                if !pause(&shared.stop_taking, wait).await {
                    return;
                }
            }
            TakeOutcome::Failed(reason) => {
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

/// Starts a taken job (or reports an invalid one).
fn accept(shared: &Arc<Shared>, taken: TakenJob, permit: Option<OwnedSemaphorePermit>) {
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
            let result = JobResult {
                outcome: Outcome::Failed {
                    failure: Failure::new("InvalidJob", reason),
                    streaming: false,
                },
                recycle: false,
            };
            let shared = shared.clone();
            let span = tracing::info_span!("job", job_id = %id);
            shared.jobs.clone().spawn(
                async move {
                    let body = job_done_body(
                        &result,
                        &shared.config.origin,
                        None,
                        shared.config.refresh_worker,
                    );
                    deliver(&shared, Post::Done { is_stream: false }, &id, body).await;
                }
                .instrument(span),
            );
            return;
        }
    };
    let (sender, receiver) = mpsc::unbounded_channel();
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
                messages: sender.clone(),
            },
        );
    }
    let span = tracing::info_span!("job", job_id = %job.id());
    shared
        .jobs
        .clone()
        .spawn(run_job(shared.clone(), job, permit, cancel, sender, receiver).instrument(span));
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

/// One job's life: wait for a slot (over-fetched jobs), run the handler on a blocking thread,
/// post what it emits, then its result.
async fn run_job(
    shared: Arc<Shared>,
    job: Job,
    permit: Option<OwnedSemaphorePermit>,
    cancel: CancelToken,
    sender: mpsc::UnboundedSender<JobMessage>,
    mut receiver: mpsc::UnboundedReceiver<JobMessage>,
) {
    let id = job.id().to_owned();
    let permit = match permit {
        Some(permit) => Some(permit),
        None => tokio::select! {
            permit = shared.slots.clone().acquire_owned() => permit.ok(),
            // Stopped or shut down before it could start.
            Some(JobMessage::Final(ending)) = receiver.recv() => {
                finish(&shared, &id, ending, &[]).await;
                return;
            }
        },
    };
    tracing::info!("Started.");
    let handler = shared.handler.clone();
    let events = ChannelEvents(sender.clone());
    let handler_cancel = cancel.clone();
    let span = tracing::Span::current();
    // A blocking-pool thread: the handler may block for minutes without touching the runtime.
    // The slot goes with it and frees when the handler returns, before the result is posted (the
    // next take need not wait for delivery), but never earlier: a job that was stopped or ended
    // by shutdown keeps its slot until its handler has noticed, so no more than --concurrency
    // handlers ever run at once.
    let _handler_thread = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let result = handler.run(&job, &events, &handler_cancel);
        let _ = events.0.send(JobMessage::Final(Ending::Completed(result)));
        drop(permit);
    });
    drop(sender);

    let mut chunks = Vec::new();
    while let Some(message) = receiver.recv().await {
        match message {
            JobMessage::Chunk(chunk) => {
                deliver(&shared, Post::Stream, &id, stream_chunk_body(&chunk)).await;
                if shared.config.return_aggregate_stream {
                    chunks.push(chunk);
                }
            }
            JobMessage::Progress(progress) => {
                deliver(&shared, Post::Progress, &id, progress_body(&progress)).await;
            }
            JobMessage::Final(ending) => {
                finish(&shared, &id, ending, &chunks).await;
                return;
            }
        }
    }
}

/// Posts a job's final result (if it gets one) and forgets the job.
async fn finish(shared: &Arc<Shared>, id: &str, ending: Ending, chunks: &[RawJson]) {
    let config = &shared.config;
    let result = match ending {
        Ending::Stopped => {
            shared.in_flight().remove(id);
            tracing::info!("Job stopped.");
            return;
        }
        Ending::ShutDown => JobResult {
            outcome: Outcome::Failed {
                failure: Failure::new("WorkerShutdown", "worker shut down before the job finished"),
                streaming: shared.handler.info().streaming,
            },
            recycle: false,
        },
        Ending::Completed(result) => result,
    };
    let aggregate = config.return_aggregate_stream.then_some(chunks);
    let mut body = job_done_body(&result, &config.origin, aggregate, config.refresh_worker);
    if body.len() > config.max_output_bytes {
        let oversize = JobResult {
            outcome: Outcome::Failed {
                failure: Failure::new(
                    "OutputTooLarge",
                    format!(
                        "the job's result is {} bytes, over the limit of {} bytes",
                        body.len(),
                        config.max_output_bytes
                    ),
                ),
                streaming: false,
            },
            recycle: result.recycle,
        };
        body = job_done_body(&oversize, &config.origin, None, config.refresh_worker);
    }
    let is_stream = matches!(result.outcome, Outcome::Streamed);
    // The job stays in the heartbeat's list until its result is delivered (or given up), so the
    // platform does not take it for lost while a POST is being retried.
    deliver(shared, Post::Done { is_stream }, id, body).await;
    shared.in_flight().remove(id);
    tracing::info!("Finished.");
    if config.refresh_worker {
        tracing::info!("refresh_worker is set: stopping after this job.");
        shared.stop_taking.cancel();
    }
}

/// Posts with retries: connection errors, timeouts, 408, 429 and 5xx are retried with backoff
/// until the result retry time is spent. Every failure and the final give-up are logged.
async fn deliver(shared: &Shared, kind: Post, id: &str, body: String) {
    let body = bytes::Bytes::from(body);
    let deadline = Instant::now() + shared.config.result_retry;
    let mut backoff = Backoff::new();
    let mut attempt = 1;
    loop {
        match shared.client.post(kind, id, body.clone()).await {
            Ok(()) => return,
            Err(error) if error.retryable && Instant::now() < deadline => {
                let wait = backoff
                    .wait()
                    .min(deadline.saturating_duration_since(Instant::now()));
                tracing::warn!("Posting the {kind:?} for job {id} failed (attempt {attempt}): {error}; retrying in {wait:?}.");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(error) => {
                tracing::error!("Failed to return job results for job {id} after {attempt} attempt(s): {error}. Giving up.");
                return;
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
    let _ = job.messages.send(JobMessage::Final(Ending::Stopped));
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
