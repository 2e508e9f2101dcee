//! One task per taken job: it runs the handler (through `handler::spawn_job`, off the async
//! runtime's threads), posts the job's stream chunks and progress in order, then its one final
//! result, with retries (`deliver`), and acts on a stop or the shutdown.

use super::{Backoff, Ending, InFlightJob, JobMessage, Permits, Shared};
use crate::handler::{CancelToken, Current, JobEvents, Lease};
use crate::job::{
    job_done_body, progress_body, stream_chunk_body, Failure, Job, JobResult, Outcome, RawJson,
};
use crate::metrics::{self, JobOutcome, PostResult};
use crate::runpod::{Post, TakenJob};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

/// The size of a job's text from which it also holds a spare hold while one is free (see
/// [`accept`]): that of a buffer worth keeping for the next job.
const BIG_JOB_BYTES: usize = crate::buffers::MIN_KEPT;

/// Starts a taken job (or reports an invalid one). `permits` is `None` for a job beyond what
/// was asked for: it waits for a slot of its own.
///
/// A big job (a text of [`BIG_JOB_BYTES`] or more) also holds a spare hold when one is free, so
/// the next take waits for its result to be delivered instead of running beside its post: a
/// worker moving 10 MiB jobs then holds one job's buffers at a time, not a result in flight
/// beside the next job's text, its input's copy and its output.
pub(super) fn accept(shared: &Arc<Shared>, taken: TakenJob, permits: Option<Permits>) {
    let (slot, mut hold) = permits.unzip();
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
                        result,
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
    if let Some(hold) = hold
        .as_mut()
        .filter(|_| job.job_json().len() >= BIG_JOB_BYTES)
    {
        if let Ok(spare) = shared.holds.clone().try_acquire_owned() {
            hold.merge(spare);
        }
    }
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
        // What the log says of a failure, worked out before the result becomes its body.
        let failure = match &result.outcome {
            Outcome::Failed { failure, .. } => {
                Some(format!("{}: {}", failure.error_type, failure.message))
            }
            _ => None,
        };
        let recycle = result.recycle;
        let mut body = job_done_body(result, &config.origin, aggregate, config.refresh_worker);
        // The handler's output itself reported the failure (an `error` key).
        let failed_by_output = body.failed && failure.is_none();
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
                recycle,
            };
            if let Outcome::Failed { failure, .. } = &oversize.outcome {
                tracing::error!("The job fails: {}.", failure.message);
            }
            body = job_done_body(oversize, &config.origin, None, config.refresh_worker);
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
            match failure {
                Some(failure) => tracing::error!("Finished: the job failed ({failure})."),
                None if failed_by_output => {
                    tracing::error!("Finished: the job failed (its output has an error key).");
                }
                None => tracing::info!("Finished."),
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
pub(super) async fn deliver(shared: &Shared, kind: Post, id: &str, body: String) -> bool {
    // The body's buffer is kept for the next job's once the POST is done with it.
    let body = bytes::Bytes::from_owner(crate::buffers::GivenBackOnDrop(body.into_bytes()));
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
