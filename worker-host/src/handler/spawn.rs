//! Starting one job on a leased handler from the async runtime, the way its kind needs: a
//! handler in this process blocks a thread for the job's length, so it gets a blocking-pool
//! thread; a supervised runner only waits for frames, so its job is a task (no hand-off to a
//! thread and back, which is most of what a small job costs).

use super::{CancelToken, JobEvents, Lease};
use crate::job::{Job, JobResult};
use crate::metrics;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

/// Runs `job` on `lease`'s handler, in the current span, and then calls `done` with its result
/// (a panic in the host's part of the run is a worker error), on the thread or task that ran
/// it. The job counts as running for the metrics until its handler returns; then the build's
/// slot, then the lease, are freed, before `done` runs.
pub fn spawn_job<E>(
    lease: Lease,
    build_slot: Option<OwnedSemaphorePermit>,
    job: Job,
    events: E,
    cancel: CancelToken,
    done: impl FnOnce(JobResult, &E) + Send + 'static,
) where
    E: JobEvents + 'static,
{
    let span = tracing::Span::current();
    let streaming = lease.info().streaming;
    let handler = lease.handler().clone();
    let finish = move |result: std::thread::Result<JobResult>, events: &E| {
        let result = result.unwrap_or_else(|_| JobResult::worker_error(streaming));
        drop(build_slot);
        drop(lease);
        done(result, events);
    };
    if handler.blocks() {
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let running = metrics::get().job_started();
            let run = std::panic::AssertUnwindSafe(|| handler.run(&job, &events, &cancel));
            let result = std::panic::catch_unwind(run);
            drop(running);
            finish(result, &events);
        });
    } else {
        let task = async move {
            let running = metrics::get().job_started();
            // Built inside the future, so a panic while building it is caught too.
            let run = async { handler.run_async(job, &events, &cancel).await };
            let result = std::panic::AssertUnwindSafe(run).catch_unwind().await;
            drop(running);
            finish(result, &events);
        };
        tokio::spawn(task.instrument(span));
    }
}
