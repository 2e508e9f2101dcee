//! Deadlines: the platform's policy bounds, and what happens to a job unprompted: its execution
//! timeout, its time-to-live and its retention once finished, applied by the sweeper.
//!
//! Every job has at most one armed deadline, the next instant at which something happens to it:
//! its TTL (`policy.ttl`, counted from submission) while queued; the earlier of its execution
//! timeout and its TTL while running; the earlier of its retention and its TTL once finished.
//! [`Store::sweep`] applies what is due and re-arms.

use super::record::{Record, Status, Submission};
use super::{State, Store, StoreLimits};
use std::time::{Duration, Instant};

/// The platform's default execution timeout (`policy.executionTimeout`), 10 minutes.
pub const DEFAULT_EXECUTION_TIMEOUT: Duration = Duration::from_secs(600);
/// The platform's default time-to-live (`policy.ttl`), 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The smallest execution timeout the platform accepts, in ms.
pub const MIN_EXECUTION_TIMEOUT_MS: u64 = 5_000;
/// The smallest TTL the platform accepts, in ms.
pub const MIN_TTL_MS: u64 = 10_000;
/// The largest execution timeout or TTL the platform accepts (7 days), in ms.
pub const MAX_POLICY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// A deadline's key in the ordered deadline map: when, and a tie-breaking sequence number.
pub(super) type DeadlineKey = (Instant, u64);

impl Record {
    /// The next instant something happens to this job unprompted.
    fn next_deadline(&self, limits: &StoreLimits) -> Instant {
        match (self.status, self.started, self.ended) {
            (Status::InProgress, Some(started), _) => {
                (started + self.execution_timeout).min(self.expires)
            }
            (status, _, Some(ended)) if status.is_final() => {
                let retention = match self.submission {
                    Submission::Async => limits.async_retention,
                    Submission::Sync => limits.sync_retention,
                };
                (ended + retention).min(self.expires)
            }
            _ => self.expires,
        }
    }
}

impl State {
    /// A key for `at` in the deadline or finished maps, unique by its sequence number.
    pub(super) fn next_key(&mut self, at: Instant) -> DeadlineKey {
        self.sequence += 1;
        (at, self.sequence)
    }

    /// Arms the job's deadline from its state; returns whether it is now the earliest one.
    pub(super) fn arm(&mut self, id: &str, limits: &StoreLimits) -> bool {
        let Some(at) = self.jobs.get(id).map(|job| job.next_deadline(limits)) else {
            return false;
        };
        let key = self.next_key(at);
        let job = self.jobs.get_mut(id).expect("checked above");
        if let Some(old) = job.deadline.replace(key) {
            self.deadlines.remove(&old);
        }
        self.deadlines.insert(key, id.to_owned());
        self.deadlines.keys().next() == Some(&key)
    }
}

impl Store {
    /// Applies every deadline due at `now` (timeouts, TTLs, retention); returns the next one.
    pub fn sweep(&self, now: Instant) -> Option<Instant> {
        let mut state = self.state();
        let mut stopped = false;
        while let Some(entry) = state.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            let Some(job) = state.jobs.get_mut(&id) else {
                continue;
            };
            job.deadline = None;
            let status = job.status;
            if now >= job.expires {
                tracing::info!(job_id = %id, "Job expired (policy.ttl): forgotten.");
                state.forget(&id);
                stopped |= status == Status::InProgress;
            } else if status == Status::InProgress {
                tracing::warn!(job_id = %id, "Job ran past its execution timeout: TIMED_OUT.");
                state.stop(&id);
                stopped = true;
                self.end(&mut state, &id, Status::TimedOut, None, None);
            } else if status.is_final() {
                state.forget(&id);
            } else {
                state.arm(&id, &self.limits);
            }
        }
        if stopped {
            self.stops.notify_waiters();
            self.queued.notify_waiters();
        }
        state.deadlines.keys().next().map(|(at, _)| *at)
    }

    /// Runs [`Store::sweep`] whenever a deadline is due, until the store closes.
    pub async fn sweep_forever(&self) {
        loop {
            let notified = self.timers.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next = self.sweep(Instant::now());
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = due => {}
                () = self.closed.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::{Duration, Instant};

    const MINUTE: Duration = Duration::from_secs(60);

    /// A /runsync result is forgotten after a minute, a /run result after 30 minutes, and
    /// nothing of either is left behind.
    #[test]
    fn finished_jobs_are_forgotten_after_their_retention() {
        let (store, _) = store(StoreLimits::default());
        let sync = store.submit(job(Submission::Sync));
        run(&store, &sync, r#"{"output": 1}"#);
        let run_id = store.submit(job(Submission::Async));
        run(&store, &run_id, r#"{"output": 2}"#);
        let now = Instant::now();

        store.sweep(now + MINUTE - Duration::from_secs(1));
        assert!(store.status(&sync).is_some(), "kept for its first minute");
        store.sweep(now + MINUTE + Duration::from_secs(1));
        assert!(
            store.status(&sync).is_none(),
            "a /runsync result is kept 1 minute"
        );
        assert!(store.status(&run_id).is_some());
        store.sweep(now + 30 * MINUTE + Duration::from_secs(1));
        assert!(
            store.status(&run_id).is_none(),
            "a /run result is kept 30 minutes"
        );
        assert_eq!(live_jobs(&store), (0, 0, 0));
    }

    /// However fast jobs finish, at most `max_finished` results are kept, the oldest dropped.
    #[test]
    fn the_number_of_kept_results_is_capped() {
        let (store, _) = store(StoreLimits {
            max_finished: 3,
            ..StoreLimits::default()
        });
        let ids: Vec<String> = (0..5)
            .map(|_| {
                let id = store.submit(job(Submission::Async));
                run(&store, &id, r#"{"output": 0}"#);
                id
            })
            .collect();
        let kept: Vec<bool> = ids.iter().map(|id| store.status(id).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert_eq!(live_jobs(&store), (3, 3, 3));
    }

    /// A job running past its execution timeout ends TIMED_OUT, the worker is told to stop it,
    /// and its late result is ignored.
    #[test]
    fn execution_timeout_ends_a_running_job() {
        let (store, _) = store(StoreLimits::default());
        let id = timed_out(&store);
        assert_eq!(status_of(&store, &id)["status"], "TIMED_OUT");
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.add_result(&id, request(r#"{"output": "late"}"#), false);
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "TIMED_OUT");
        assert!(status.get("output").is_none(), "{status}");
        assert_eq!(store.counts().failed, 1);
        assert_eq!(store.counts().in_progress, 0);
    }

    /// A job's TTL counts from submission and forgets it in any state; a running one is stopped.
    #[test]
    fn ttl_forgets_queued_and_running_jobs() {
        let (store, _) = store(StoreLimits::default());
        let mut running = job(Submission::Async);
        running.ttl = Duration::from_secs(10);
        let running = store.submit(running);
        assert_eq!(store.take(1).len(), 1);
        let mut queued = job(Submission::Async);
        queued.ttl = Duration::from_secs(10);
        let queued = store.submit(queued);
        store.sweep(Instant::now() + Duration::from_secs(11));
        assert!(store.status(&running).is_none());
        assert!(store.status(&queued).is_none());
        assert_eq!(store.state().to_stop, vec![running]);
        assert_eq!(store.counts(), Counts::default());
        assert!(store.worker_running(), "the stopped handler may still run");
        assert!(store.take(1).is_empty());
        assert_eq!(live_jobs(&store), (0, 0, 0));
    }
}
