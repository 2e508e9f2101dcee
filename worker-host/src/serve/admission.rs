//! Admission of a load-balancing request: at most `--max-waiting` admitted requests wait for a
//! slot (the rest get 429 at once), and one slot per running job (`--concurrency`). While
//! requests wait, jobs given up by their clients that hold every slot are stopped (see
//! `abandoned`).

use super::answer::shutting_down;
use super::ServeState;
use crate::http::error_answer;
use crate::metrics;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use std::sync::atomic::Ordering;
use tokio::sync::OwnedSemaphorePermit;

/// How long a client told 429 is asked to wait (`Retry-After`, seconds).
const RETRY_AFTER_SECS: u64 = 1;

/// A request admitted but not running yet: it reads its body, then waits for a slot. At most
/// `--max-waiting` are; beyond that a request gets 429 at once. A slot is taken only once the
/// body is in, so a client that sends its body slowly (or never) holds a waiting place, never a
/// slot.
pub(super) struct Admission<'a> {
    _place: WaitingPlace<'a>,
    _counted: metrics::WaitingJob,
    state: &'a ServeState,
}

/// Admits a request; `None` when every waiting place is taken (answer [`busy`]).
pub(super) fn admit(state: &ServeState) -> Option<Admission<'_>> {
    let place = WaitingPlace::take(state);
    if place.ahead >= state.config.max_waiting {
        return None;
    }
    Some(Admission {
        _place: place,
        _counted: metrics::get().job_waiting(),
        state,
    })
}

impl Admission<'_> {
    /// Waits for a slot (the request leaves the waiting ones then). While it waits, jobs whose
    /// clients went away and that hold every slot are stopped hard ([`stop_wedged_jobs`]).
    pub(super) async fn slot(self) -> Result<OwnedSemaphorePermit, Response> {
        let grace = self.state.config.cancel_grace;
        let acquire = self.state.running.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => return Ok(permit.expect("the semaphore is never closed")),
                () = self.state.stop_jobs.cancelled() => return Err(shutting_down()),
                // Checked each grace (from when it began to wait): a job counts once it was
                // abandoned a grace ago, so the stop comes within two graces of the last client's
                // going.
                () = tokio::time::sleep(grace.max(MIN_WEDGE_CHECK)) => stop_wedged_jobs(self.state),
            }
        }
    }
}

/// The shortest pause between two checks of a waiting request for wedged jobs.
const MIN_WEDGE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Stops at once the running jobs when they hold every slot and every one was given up by its
/// client a grace ago (see `abandoned`), and says so.
pub(super) fn stop_wedged_jobs(state: &ServeState) {
    let grace = state.config.cancel_grace;
    let slots = state.slots.load(Ordering::Acquire);
    let stopped = state.running_jobs.stop_if_all_abandoned(grace, slots);
    if stopped > 0 {
        tracing::warn!(
            "Every slot ({stopped}) is held by a job whose client went away and whose handler ignored the cancel for {grace:?}: stopping them (a handler's runner is restarted; with --isolation none they run on)."
        );
    }
}

/// The 429 of a worker whose slots and waiting places are all taken.
pub(super) fn busy(state: &ServeState) -> Response {
    stop_wedged_jobs(state);
    let mut response = error_answer(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "the worker is busy: {} job(s) running and {} waiting, its limits (--concurrency, --max-waiting); retry later",
            state.slots.load(Ordering::Acquire), state.config.max_waiting
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

/// A request's place among those waiting for a slot (counted while it waits).
struct WaitingPlace<'a> {
    state: &'a ServeState,
    /// How many were waiting before it.
    ahead: usize,
}

impl<'a> WaitingPlace<'a> {
    fn take(state: &'a ServeState) -> Self {
        let ahead = state.waiting.fetch_add(1, Ordering::AcqRel);
        Self { state, ahead }
    }
}

impl Drop for WaitingPlace<'_> {
    fn drop(&mut self) {
        self.state.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}
