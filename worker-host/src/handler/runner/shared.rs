//! What every thread of a supervised handler shares ([`Shared`]): where the handler stands (the
//! phase: starting, ready with a runner, restarting, failed, stopped, also published as
//! [`Readiness`]), the jobs' way onto the ready runner (`acquire`, `try_acquire`), the crash
//! count, and the supervisor thread's inbox ([`Event`]).

use super::process::{lock, Call, EndReport, JobSender, Runner, ToJob};
use crate::handler::{CancelToken, HandlerInfo, HandlerSpec, LoadError, Readiness};
use crate::job::Failure;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use tracing::Span;

/// Where the handler stands, shared by every thread.
#[derive(Debug)]
pub(super) enum Phase {
    Starting,
    Ready(Arc<Runner>),
    Restarting,
    Failed(String),
    Stopped,
}

/// What the supervisor thread is told.
#[derive(Debug)]
pub(super) enum Event {
    /// A runner sent a control frame, or ended.
    Control { generation: u64, control: Control },
    /// Run `init` (once, after the first load).
    Init {
        config: String,
        reply: mpsc::Sender<Result<HandlerInfo, LoadError>>,
    },
    /// Shut down: tear down, stop the runner, end the thread.
    Shutdown { reply: mpsc::Sender<()> },
}

/// What a runner says about itself, or its end.
#[derive(Debug)]
pub(super) enum Control {
    Loaded(HandlerInfo),
    Failed(LoadError),
    /// `init` succeeded; the handler's facts after it (with the features it reported).
    Ready(HandlerInfo),
    TornDown,
    Ended(EndReport),
}

/// The state every thread shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) spec: HandlerSpec,
    pub(super) phase: Mutex<Phase>,
    pub(super) changed: Condvar,
    pub(super) readiness: tokio::sync::watch::Sender<Readiness>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) next_call: AtomicU64,
    /// The runner started last (for its output).
    pub(super) newest: Mutex<Option<Arc<Runner>>>,
    /// Crashes since the last job that finished on a runner.
    pub(super) crashes: AtomicU32,
    /// Whether a runner that ended is replaced: the spec's `respawn`, until the handler is
    /// retired (a swap replaced it, and no new job comes).
    pub(super) respawn: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(super) fn new(spec: HandlerSpec, events: mpsc::Sender<Event>) -> Self {
        Self {
            phase: Mutex::new(Phase::Starting),
            changed: Condvar::new(),
            readiness: tokio::sync::watch::Sender::new(Readiness::Restarting),
            events,
            next_call: AtomicU64::new(1),
            newest: Mutex::new(None),
            crashes: AtomicU32::new(0),
            respawn: std::sync::atomic::AtomicBool::new(spec.respawn),
            spec,
        }
    }

    /// From now on a runner that ends is not replaced.
    pub(super) fn stop_respawning(&self) {
        self.respawn.store(false, Ordering::Release);
    }

    pub(super) fn spec(&self) -> &HandlerSpec {
        &self.spec
    }

    /// The last output of the newest runner.
    pub(super) fn recent_output(&self) -> String {
        lock(&self.newest)
            .as_ref()
            .map(|runner| runner.capture.recent())
            .unwrap_or_default()
    }

    pub(super) fn readiness(&self) -> tokio::sync::watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        let readiness = match &phase {
            Phase::Ready(_) => Readiness::Ready,
            Phase::Starting | Phase::Restarting => Readiness::Restarting,
            Phase::Failed(reason) => Readiness::Failed(reason.clone()),
            Phase::Stopped => Readiness::Failed("the handler was shut down".into()),
        };
        let mut current = lock(&self.phase);
        *current = phase;
        // Published under the lock, so the watch never disagrees with the phase for long.
        self.readiness.send_replace(readiness);
        drop(current);
        self.changed.notify_all();
    }

    /// Waits for a ready runner and registers a job on it. The failure says why no runner will
    /// take the job: the handler failed for good, the worker is shutting down, or the job was
    /// cancelled while it waited (a cancel wakes the wait).
    pub(super) fn acquire(
        &self,
        job_id: &str,
        to_job: JobSender,
        cancel: &CancelToken,
    ) -> Result<(Arc<Runner>, u64), Failure> {
        let mut phase = lock(&self.phase);
        loop {
            if let Some(claimed) = self.claim(&phase, job_id, &to_job, cancel) {
                return claimed;
            }
            phase = self
                .changed
                .wait(phase)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// [`Self::acquire`] without the wait: `None` while a runner is starting (wait for a change
    /// of [`Self::readiness`], or the job's cancel, and try again).
    pub(super) fn try_acquire(
        &self,
        job_id: &str,
        to_job: &JobSender,
        cancel: &CancelToken,
    ) -> Option<Result<(Arc<Runner>, u64), Failure>> {
        self.claim(&lock(&self.phase), job_id, to_job, cancel)
    }

    /// Registers a job on the ready runner of `phase`, or says why none will take it; `None`
    /// while one is starting.
    pub(super) fn claim(
        &self,
        phase: &Phase,
        job_id: &str,
        to_job: &JobSender,
        cancel: &CancelToken,
    ) -> Option<Result<(Arc<Runner>, u64), Failure>> {
        Some(match phase {
            Phase::Failed(reason) => Err(Failure::new("HandlerUnavailable", reason.clone())),
            Phase::Stopped => Err(Failure::new(
                "WorkerShutdown",
                "the worker is shutting down: the handler takes no more jobs",
            )),
            _ if cancel.is_cancelled() => Err(Failure::new(
                "Cancelled",
                "the job was cancelled while it waited for the handler to restart",
            )),
            Phase::Ready(runner) => {
                let call = self.next_call.fetch_add(1, Ordering::Relaxed);
                lock(&runner.calls).insert(
                    call,
                    Call {
                        job_id: job_id.to_owned(),
                        span: Span::current(),
                        to_job: to_job.clone(),
                    },
                );
                Ok((runner.clone(), call))
            }
            Phase::Starting | Phase::Restarting => return None,
        })
    }

    /// Wakes the jobs waiting in [`Self::acquire`] (one of them was cancelled).
    pub(super) fn wake_waiting(&self) {
        let _phase = lock(&self.phase);
        self.changed.notify_all();
    }

    /// The runner's channel ended: from now on no job is given to it.
    pub(super) fn retire(&self, runner: &Runner) {
        let mut phase = lock(&self.phase);
        runner.ended.store(true, Ordering::Release);
        if matches!(&*phase, Phase::Ready(current) if current.generation == runner.generation) {
            *phase = Phase::Restarting;
            self.readiness.send_replace(Readiness::Restarting);
            drop(phase);
            self.changed.notify_all();
        }
    }

    /// Makes `runner` the one jobs go to, unless its channel has ended meanwhile (false).
    pub(super) fn set_ready(&self, runner: Arc<Runner>) -> bool {
        {
            let mut phase = lock(&self.phase);
            if runner.ended.load(Ordering::Acquire) {
                return false;
            }
            *phase = Phase::Ready(runner);
            self.readiness.send_replace(Readiness::Ready);
        }
        self.changed.notify_all();
        true
    }

    /// A runner ended: it takes no more jobs, and each job on it gets its failure.
    pub(super) fn runner_ended(&self, runner: &Runner, report: &EndReport) {
        {
            let mut phase = lock(&self.phase);
            if matches!(&*phase, Phase::Ready(current) if current.generation == runner.generation) {
                *phase = Phase::Restarting;
                drop(phase);
                self.changed.notify_all();
                self.readiness.send_replace(Readiness::Restarting);
            }
        }
        let calls = std::mem::take(&mut *lock(&runner.calls));
        let ids: Vec<String> = calls.values().map(|call| call.job_id.clone()).collect();
        for call in calls.into_values() {
            let failure = report.failure_for(&call.job_id, &ids);
            call.span.in_scope(|| {
                tracing::error!("{}: {}", failure.error_type, first_line(&failure.message));
            });
            call.to_job.send(ToJob::Died(Box::new(failure)));
        }
    }
}

pub(super) fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}
