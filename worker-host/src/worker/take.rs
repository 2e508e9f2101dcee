//! Taking jobs: the take loop waits for a hold and a slot, then asks for as many jobs as there
//! are free slots (one batch take), pacing empty answers and backing off on errors.

use super::job::accept;
use super::{
    handler_ready, handler_ready_now, pause, Backoff, Permits, Shared, HOLD_WARNING_AFTER,
    MIN_EMPTY_TAKE_PERIOD, TAKE_BODY_GRACE,
};
use crate::metrics::{self, TakeResult};
use crate::runpod::TakeOutcome;
use std::sync::Arc;
use std::time::Instant;

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
            // while that job runs); one that holds the taking up for long is worth a line. With
            // no slot free the wait is for a running job (a big one holds a spare hold too), not
            // for a delivery: looked at again a period later.
            () = tokio::time::sleep(HOLD_WARNING_AFTER), if !warned => {
                if shared.slots.available_permits() > 0 {
                    tracing::warn!(
                        "Results of earlier jobs are still being delivered: no new job is taken until one is."
                    );
                    warned = true;
                }
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

pub(super) async fn take_loop(shared: Arc<Shared>) {
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
