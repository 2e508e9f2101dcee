//! Stops and reconciliation: the jobs the worker must stop, handed to its job-stop polls, and
//! its heartbeats (the jobs it holds) kept in step with the store: a stop not honoured is sent
//! again, a take the worker never received is queued again, and a retry waits until the
//! worker has let go of the id's previous attempt (see the store's module docs).

use super::wait::{wait_until, Check};
use super::{State, Store};
use std::collections::HashSet;
use std::time::{Duration, Instant};

impl State {
    /// Tells the worker to stop a job it runs.
    pub(super) fn stop(&mut self, id: &str) {
        if !self.to_stop.iter().any(|queued| queued == id) {
            self.to_stop.push(id.to_owned());
        }
        self.stopping.insert(id.to_owned(), None);
        self.stopped_handler_may_run = true;
    }
}

impl Store {
    /// Whether the worker is busy (`/health`'s running worker): a job is in progress, or a
    /// handler told to stop may still be running (see the module docs).
    pub fn worker_running(&self) -> bool {
        let state = self.state();
        !state.running.is_empty() || state.stopped_handler_may_run
    }

    /// Waits up to `hold` for jobs the worker must stop, and hands them over (a job-stop poll).
    pub async fn stops_wait(&self, hold: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + hold;
        wait_until(&self.stops, deadline, None, || {
            let stops = self.hand_out_stops();
            if stops.is_empty() {
                Check::NotYet
            } else {
                Check::Ready(stops)
            }
        })
        .await
        .unwrap_or_default()
    }

    /// The stops waiting for the worker, now handed to it (noted for [`Store::heartbeat`]).
    pub(super) fn hand_out_stops(&self) -> Vec<String> {
        let mut guard = self.state();
        let state = &mut *guard;
        let ids = std::mem::take(&mut state.to_stop);
        for id in &ids {
            if let Some(handed_out) = state.stopping.get_mut(id) {
                *handed_out = Some(state.heartbeats);
            }
        }
        ids
    }

    /// Applies a heartbeat listing the jobs the worker `holds` (see the module docs): stops not
    /// yet honoured are sent again; ids the worker let go of release their held-back retries;
    /// running jobs the worker does not hold although they were handed out over
    /// [`StoreLimits::lost_after`](super::StoreLimits::lost_after) ago are queued again.
    ///
    /// A heartbeat lists what the worker held when it was sent, which may be before it received
    /// a stop, or even the job: such a heartbeat proves nothing. A stopped id counts as let go
    /// only when the second heartbeat to arrive after the stop was handed out does not list it:
    /// heartbeats go out a period (1 s) apart and take far less on loopback, so that one was sent
    /// after the first arrived, which was after the hand-out.
    pub fn heartbeat(&self, holds: &[&str]) {
        let now = Instant::now();
        let holds: HashSet<&str> = holds.iter().copied().collect();
        let mut guard = self.state();
        let state = &mut *guard;
        state.heartbeats += 1;
        let beat = state.heartbeats;
        let mut unhonoured = Vec::new();
        let mut let_go = Vec::new();
        for (id, handed_out) in &state.stopping {
            if holds.contains(id.as_str()) {
                unhonoured.push(id.clone());
            } else if handed_out.is_some_and(|handed_out| beat >= handed_out + 2) {
                let_go.push(id.clone());
            }
        }
        let resend = unhonoured
            .iter()
            .any(|id| !state.to_stop.iter().any(|queued| queued == id));
        for id in unhonoured {
            state.stop(&id);
        }
        let mut requeued = false;
        for id in let_go {
            state.stopping.remove(&id);
            if let Some(job) = state.jobs.get_mut(&id).filter(|job| job.held_back) {
                job.held_back = false;
                state.in_queue -= 1;
                state.enqueue(&id, true);
                requeued = true;
            }
        }
        let lost: Vec<String> = state
            .running
            .iter()
            .filter(|id| !holds.contains(id.as_str()) && !state.stopping.contains_key(*id))
            .filter(|id| {
                state
                    .jobs
                    .get(*id)
                    .and_then(|job| job.started)
                    .is_some_and(|started| now >= started + self.limits.lost_after)
            })
            .cloned()
            .collect();
        for id in lost {
            tracing::warn!(job_id = %id, "The worker never received this job; it is queued again.");
            state.running.remove(&id);
            if let Some(job) = state.jobs.get_mut(&id) {
                job.reset_to_queued();
            }
            state.enqueue(&id, true);
            state.arm(&id, &self.limits);
            requeued = true;
        }
        drop(guard);
        if resend {
            self.stops.notify_waiters();
        }
        if requeued {
            self.queued.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::Duration;

    /// A job handed out that the worker's heartbeats do not list never reached it: once
    /// `lost_after` has passed it is queued again, and runs.
    #[test]
    fn a_take_the_worker_never_received_is_queued_again() {
        let (store, _) = store(StoreLimits {
            lost_after: Duration::ZERO,
            ..StoreLimits::default()
        });
        let id = started(&store);
        store.heartbeat(&[&id]);
        assert_eq!(status_of(&store, &id)["status"], "IN_PROGRESS");
        store.heartbeat(&[]);
        assert_eq!(status_of(&store, &id)["status"], "IN_QUEUE");
        assert_eq!(store.counts().in_queue, 1);
        assert_eq!(store.counts().in_progress, 0);
        run(&store, &id, r#"{"output": 1}"#);
        assert_eq!(status_of(&store, &id)["status"], "COMPLETED");
    }

    /// A job within `lost_after` of its take is not counted lost, whatever the heartbeat says.
    #[test]
    fn a_fresh_take_is_not_lost() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.heartbeat(&[]);
        assert_eq!(status_of(&store, &id)["status"], "IN_PROGRESS");
    }

    /// A stop the worker has not honoured (it still lists the job) is sent again; once the worker
    /// lets go of the id, nothing more is sent.
    #[test]
    fn unhonoured_stops_are_sent_again() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.cancel(&id);
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[&id]);
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[]);
        store.heartbeat(&[]);
        assert!(store.state().to_stop.is_empty());
        assert!(store.state().stopping.is_empty());
    }

    /// A heartbeat sent before the worker received a job (or its stop) does not list it, and
    /// proves nothing: a stop still waiting is kept, and a stop handed out is sent again when a
    /// later heartbeat shows the worker holds the job after all. Only the second heartbeat after
    /// the hand-out counts.
    #[test]
    fn a_stale_heartbeat_does_not_lose_a_stop() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.cancel(&id);
        store.heartbeat(&[]);
        assert_eq!(
            store.hand_out_stops(),
            vec![id.clone()],
            "a stop not yet handed out is kept"
        );
        // The worker did not have the job yet when the stop came ("not here"), and a heartbeat
        // sent before the hand-out arrives after it.
        store.heartbeat(&[]);
        store.heartbeat(&[&id]);
        assert_eq!(store.hand_out_stops(), vec![id.clone()], "sent again");
        store.heartbeat(&[]);
        assert!(store.state().stopping.contains_key(&id));
        store.heartbeat(&[]);
        assert!(store.state().stopping.is_empty(), "let go");
        assert!(store.hand_out_stops().is_empty());
    }

    /// A timed-out job retried while the worker still runs its first attempt waits until the
    /// worker lets go of the id, then runs under the same id.
    #[test]
    fn a_retry_waits_for_the_previous_attempt_to_be_let_go() {
        let (store, _) = store(StoreLimits::default());
        let id = timed_out(&store);
        assert_eq!(store.retry(&id), Some(RetryOutcome::Requeued));
        assert_eq!(status_of(&store, &id)["status"], "IN_QUEUE");
        assert_eq!(store.counts().in_queue, 1);
        assert!(
            store.take(1).is_empty(),
            "the worker still holds the first attempt"
        );
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[&id]);
        assert!(store.take(1).is_empty());
        assert_eq!(store.hand_out_stops(), vec![id.clone()]);
        store.heartbeat(&[]);
        assert!(
            store.take(1).is_empty(),
            "the heartbeat may predate the stop"
        );
        store.heartbeat(&[]);
        run(&store, &id, r#"{"output": "second"}"#);
        assert_eq!(status_of(&store, &id)["output"], "second");
        assert_eq!(store.counts().in_queue, 0);
    }
}
