//! Waiting for the store to change: long-polls that sleep on a wake-up until what they wait for
//! holds or their time runs out.

use super::record::Record;
use super::Store;
use std::time::Duration;
use tokio::sync::Notify;

/// Calls `check` until it finds something, waking on `wake`, for at most `hold`; returns what it
/// found last (empty when `hold` passed). The wake-up is armed before each check, so a change
/// between a check and the wait is not missed.
pub(super) async fn long_poll<T>(
    wake: &Notify,
    hold: Duration,
    mut check: impl FnMut() -> Vec<T>,
) -> Vec<T> {
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

impl Store {
    /// Waits until `ready` holds for the job (or `timeout` passes, or the store closes), then
    /// answers with `answer`. `None` if the job is unknown or was forgotten meanwhile.
    pub(super) async fn wait_for_job(
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
}
