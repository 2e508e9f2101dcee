//! The jobs the server is running, and freeing the slots of those whose clients went away when
//! they wedge the worker.
//!
//! A client that goes away cancels its job softly (see `answer`): the handler sees the cancel,
//! and one that ignores it runs on, because stopping it hard kills its runner and with it every
//! other job there. But a handler that never returns would hold its slot for good; once every
//! slot is held so, each request waits (or gets 429) while the health check says 200, and the
//! worker is lost until someone restarts it. So when a request finds no slot, every slot is held
//! by a running job, and every one of those was given up by its client more than the cancel
//! grace (`--cancel-grace-secs`) ago, they are stopped at once: they had their grace, so their
//! runner is killed and started again (counted in `runner_restarts_total{reason="hung"}`). No
//! client that still waits loses its job to it: every slot, so every job on that runner, is one
//! of those (a job that returns at that very moment frees a slot a waiting request may take just
//! before the kill: a window of microseconds). With `--isolation none` a handler's thread cannot
//! be stopped, and the slots stay taken.

use crate::handler::CancelToken;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The running jobs, by a number of their own.
#[derive(Debug, Default)]
pub(super) struct RunningJobs {
    jobs: Mutex<HashMap<u64, Running>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Running {
    cancel: CancelToken,
    /// When its client went away.
    abandoned_at: Option<Instant>,
    /// Whether it was stopped hard for it already.
    stopped: bool,
}

impl RunningJobs {
    fn jobs(&self) -> MutexGuard<'_, HashMap<u64, Running>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a job as running until [`Self::ended`]; returns its number.
    pub(super) fn started(&self, cancel: CancelToken) -> u64 {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let running = Running {
            cancel,
            abandoned_at: None,
            stopped: false,
        };
        self.jobs().insert(number, running);
        number
    }

    /// Its client went away (its job was cancelled softly).
    pub(super) fn abandoned(&self, number: u64) {
        if let Some(running) = self.jobs().get_mut(&number) {
            running.abandoned_at.get_or_insert_with(Instant::now);
        }
    }

    /// Its handler returned.
    pub(super) fn ended(&self, number: u64) {
        self.jobs().remove(&number);
    }

    /// When the jobs running hold all `slots` and every one was abandoned more than `grace` ago,
    /// stops at once those not stopped yet and says how many; otherwise 0.
    pub(super) fn stop_if_all_abandoned(&self, grace: Duration, slots: usize) -> usize {
        let stopped: Vec<CancelToken> = {
            let mut jobs = self.jobs();
            let wedged = jobs
                .values()
                .all(|running| running.abandoned_at.is_some_and(|at| at.elapsed() >= grace));
            if jobs.len() < slots.max(1) || !wedged {
                return 0;
            }
            jobs.values_mut()
                .filter_map(|running| {
                    let first = !std::mem::replace(&mut running.stopped, true);
                    first.then(|| running.cancel.clone())
                })
                .collect()
        };
        for cancel in &stopped {
            cancel.stop_at_once();
        }
        stopped.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only when abandoned jobs hold every slot, each for long enough, are they stopped, hard
    /// and at once.
    #[test]
    fn jobs_are_stopped_only_when_abandoned_ones_hold_every_slot_long_enough() {
        let jobs = RunningJobs::default();
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 1), 0);
        let (gone, live) = (CancelToken::new(), CancelToken::new());
        let gone_number = jobs.started(gone.clone());
        let live_number = jobs.started(live.clone());
        jobs.abandoned(gone_number);
        gone.cancel_softly();
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 2), 0);
        assert!(!live.is_cancelled());
        jobs.ended(live_number);
        // A free slot: nothing is wedged.
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 2), 0);
        assert_eq!(jobs.stop_if_all_abandoned(Duration::from_secs(3600), 1), 0);
        assert!(gone.is_soft());
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 1), 1);
        assert!(gone.is_cancelled() && !gone.is_soft() && gone.is_at_once());
        // Once only.
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 1), 0);
        jobs.ended(gone_number);
        assert_eq!(jobs.stop_if_all_abandoned(Duration::ZERO, 1), 0);
    }
}
