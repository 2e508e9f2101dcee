//! The queue: jobs waiting for the worker, in submission order, and the worker's job-take
//! polls that hand them out.

use super::record::Status;
use super::wait::{wait_until, Check};
use super::{State, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// While a stopped handler may still hold a slot, a job-take poll for fewer jobs than the worker
/// has slots is answered (empty) within this time, so the worker soon asks again with its count
/// of free slots then.
const STOPPED_HANDLER_RECHECK: Duration = Duration::from_secs(1);

impl State {
    /// Appends a job to the queue, dropping the ids of jobs no longer queued once they outnumber
    /// the queued ones (so cancelling queued jobs cannot grow the queue without bound).
    pub(super) fn enqueue(&mut self, id: &str, front: bool) {
        self.in_queue += 1;
        if front {
            self.queue.push_front(id.to_owned());
        } else {
            self.queue.push_back(id.to_owned());
        }
        if self.queue.len() > 64 && self.queue.len() as u64 > 2 * self.in_queue {
            let jobs = &self.jobs;
            self.queue.retain(|id| {
                jobs.get(id)
                    .is_some_and(|job| job.status == Status::InQueue && !job.held_back)
            });
        }
    }
}

impl Store {
    /// Forgets every queued job; returns how many there were.
    pub fn purge_queue(&self) -> u64 {
        let mut state = self.state();
        let queued: Vec<String> = state
            .jobs
            .iter()
            .filter(|(_, job)| job.status == Status::InQueue)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &queued {
            state.forget(id);
        }
        state.queue.clear();
        queued.len() as u64
    }

    /// Hands up to `max` queued jobs to the worker (marking them in progress), as job JSON texts.
    pub fn take(&self, max: usize) -> Vec<Arc<str>> {
        let mut taken = Vec::new();
        let mut guard = self.state();
        let state = &mut *guard;
        let now = Instant::now();
        let mut earliest = false;
        while taken.len() < max {
            let Some(id) = state.queue.pop_front() else {
                break;
            };
            let Some(job) = state.jobs.get_mut(&id) else {
                continue;
            };
            if job.status != Status::InQueue || job.held_back {
                continue;
            }
            job.status = Status::InProgress;
            job.started = Some(now);
            job.changed.notify_waiters();
            taken.push(job.job_json.clone());
            state.in_queue -= 1;
            state.running.insert(id.clone());
            earliest |= state.arm(&id, &self.limits);
        }
        if earliest {
            self.timers.notify_one();
        }
        taken
    }

    /// Waits up to `hold` for queued jobs and takes up to `max` of them (a job-take long-poll;
    /// the worker asks for as many jobs as it has free slots).
    ///
    /// A take for every slot shows that no handler runs, so none told to stop either (see
    /// [`Store::worker_running`]). While one may, a take for fewer is answered within
    /// a second, so the worker soon asks again with its free slots then.
    pub async fn take_wait(&self, max: usize, hold: Duration) -> Vec<Arc<str>> {
        let every_slot = max >= self.worker_slots.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + hold;
        wait_until(&self.queued, deadline, None, || {
            let recheck = {
                let mut state = self.state();
                // Valid for as long as this poll is open: the worker holds every slot for it.
                if every_slot {
                    state.stopped_handler_may_run = false;
                }
                state.stopped_handler_may_run
            };
            let taken = self.take(max);
            if !taken.is_empty() {
                Check::Ready(taken)
            } else if recheck {
                Check::NotYetGiveUpAt(tokio::time::Instant::now() + STOPPED_HANDLER_RECHECK)
            } else {
                Check::NotYet
            }
        })
        .await
        .unwrap_or_default()
    }

    /// The worker now runs up to `slots` jobs at once (a swapped-in handler has another limit).
    pub fn set_worker_slots(&self, slots: usize) {
        self.worker_slots
            .store(slots.max(1), std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::Duration;

    /// Purging drops only queued jobs.
    #[test]
    fn purge_drops_only_queued_jobs() {
        let (store, _) = store(StoreLimits::default());
        let running = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        let queued: Vec<String> = (0..3)
            .map(|_| store.submit(job(Submission::Async)))
            .collect();
        assert_eq!(store.purge_queue(), 3);
        assert!(queued.iter().all(|id| store.status(id).is_none()));
        assert_eq!(status_of(&store, &running)["status"], "IN_PROGRESS");
        assert_eq!(store.counts().in_queue, 0);
        assert_eq!(live_jobs(&store).0, 1);
    }

    /// A handler told to stop may still hold its slot: the worker counts as running until it
    /// asks for a job for every slot it has; a take for fewer proves nothing, and is answered
    /// within a second so the worker asks again soon.
    #[tokio::test]
    async fn a_stopped_handler_keeps_the_worker_running_until_every_slot_is_free() {
        let (store, _) = store(StoreLimits {
            worker_slots: 2,
            ..StoreLimits::default()
        });
        assert!(!store.worker_running());
        let id = started(&store);
        assert!(store.worker_running());
        store.cancel(&id);
        assert_eq!(store.counts().in_progress, 0);
        assert!(
            store.worker_running(),
            "the cancelled handler may still run"
        );
        let partial = tokio::time::timeout(
            Duration::from_secs(30),
            store.take_wait(1, Duration::from_secs(60)),
        )
        .await
        .expect("a take for one slot of two is answered soon");
        assert!(partial.is_empty());
        assert!(
            store.worker_running(),
            "one free slot of two proves nothing"
        );
        assert!(store
            .take_wait(2, Duration::from_millis(10))
            .await
            .is_empty());
        assert!(!store.worker_running(), "every slot is free");
    }

    /// Cancelling queued jobs leaves their ids in the queue only until they outnumber the live
    /// ones: the queue stays proportional to the jobs really waiting.
    #[test]
    fn cancelled_queued_jobs_do_not_pile_up_in_the_queue() {
        let (store, _) = store(StoreLimits::default());
        for _ in 0..1000 {
            let id = store.submit(job(Submission::Async));
            store.cancel(&id);
        }
        let live = store.submit(job(Submission::Async));
        assert!(
            store.state().queue.len() <= 130,
            "{}",
            store.state().queue.len()
        );
        let taken = store.take(10);
        assert_eq!(taken.len(), 1);
        assert!(taken[0].contains(&live));
    }
}
