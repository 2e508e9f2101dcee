//! The two loops beside the taking: job-stop (cancels the jobs the platform names) and the
//! heartbeat (the in-flight ids, on its own timer).

use super::{pause, Backoff, Ending, Shared, STOP_POLL_PAUSE};
use crate::runpod::StopOutcome;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(super) async fn stop_loop(shared: Arc<Shared>, finished: CancellationToken) {
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

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, finished: CancellationToken) {
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
