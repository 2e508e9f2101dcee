//! Waiting for the store to change. Every long-poll (job-take, job-stop, `/runsync`, `/stream`)
//! is the same loop, [`wait_until`]: check the store, sleep until a wake-up, check again, until
//! the check finds what the poll waits for or the poll's time runs out. (The sweeper in
//! `deadlines` is a timer that runs until the store closes, not a wait, and has its own loop.)

use super::record::Record;
use super::Store;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one check of a [`wait_until`] found.
pub(super) enum Check<T> {
    /// What the wait is for: it ends with this.
    Ready(T),
    /// Not yet: sleep until the next wake-up (or the wait's deadline) and check again.
    NotYet,
    /// Not yet, and the wait gives up at this instant if it comes before the wait's deadline.
    NotYetGiveUpAt(Instant),
}

/// Calls `check` until it is [`Check::Ready`], sleeping on `wake` between checks, for at most
/// until `deadline` (or the earlier instant a check gives up at), and no longer than until
/// `closed`, when given, is cancelled. Returns what the check found, or `None` when the wait
/// gave up. The wake-up is armed before each check, so a change between a check and the sleep
/// is not missed.
pub(super) async fn wait_until<T>(
    wake: &Notify,
    deadline: Instant,
    closed: Option<&CancellationToken>,
    mut check: impl FnMut() -> Check<T>,
) -> Option<T> {
    loop {
        let notified = wake.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let give_up_at = match check() {
            Check::Ready(found) => return Some(found),
            Check::NotYet => deadline,
            Check::NotYetGiveUpAt(at) => deadline.min(at),
        };
        let closed = async {
            match closed {
                Some(closed) => closed.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(give_up_at) => return None,
            () = closed => return None,
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
        let deadline = Instant::now() + timeout;
        // A job keeps its wake-up for as long as it is known; forgetting it wakes the waiters.
        let changed = self.state().jobs.get(id)?.changed.clone();
        let found = wait_until(&changed, deadline, Some(&self.closed), || {
            let mut state = self.state();
            match state.jobs.get_mut(id) {
                None => Check::Ready(None),
                Some(job) if ready(job) => Check::Ready(Some(answer(job))),
                Some(_) => Check::NotYet,
            }
        })
        .await;
        match found {
            Some(answered) => answered,
            None => self.state().jobs.get_mut(id).map(answer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const LONG: Duration = Duration::from_secs(60);

    /// A wake-up makes the wait check again, and it ends with what the check found.
    #[tokio::test]
    async fn a_wake_up_checks_again() {
        let wake = Arc::new(Notify::new());
        let ready = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (wake, ready) = (wake.clone(), ready.clone());
            tokio::spawn(async move {
                wait_until(&wake, Instant::now() + LONG, None, || {
                    if ready.load(Ordering::SeqCst) {
                        Check::Ready("found")
                    } else {
                        Check::NotYet
                    }
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready.store(true, Ordering::SeqCst);
        wake.notify_waiters();
        let found = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the wake-up ended the wait")
            .expect("the waiter ran");
        assert_eq!(found, Some("found"));
    }

    /// A wait gives up at its deadline, at an earlier instant a check gives, or when closed.
    #[tokio::test]
    async fn a_wait_gives_up_at_its_deadline_a_checks_instant_or_closing() {
        let wake = Notify::new();
        let short = Instant::now() + Duration::from_millis(10);
        let at_deadline = wait_until(&wake, short, None, || Check::<()>::NotYet);
        assert_eq!(at_deadline.await, None);

        let checks_instant = wait_until(&wake, Instant::now() + LONG, None, || {
            Check::<()>::NotYetGiveUpAt(Instant::now() + Duration::from_millis(10))
        });
        let given_up = tokio::time::timeout(Duration::from_secs(30), checks_instant).await;
        assert_eq!(given_up.expect("gave up at the check's instant"), None);

        let closed = CancellationToken::new();
        closed.cancel();
        let closing = wait_until(&wake, Instant::now() + LONG, Some(&closed), || {
            Check::<()>::NotYet
        });
        let given_up = tokio::time::timeout(Duration::from_secs(30), closing).await;
        assert_eq!(given_up.expect("gave up when closed"), None);
    }
}
