//! The supervisor: starts runner processes, reads what each sends, notices when one ends, fails
//! the jobs it held with the cause, and starts the next one.
//!
//! Three kinds of thread:
//! - **the supervisor thread**, one for the handler's life: it spawns every runner (a runner's
//!   parent-death signal fires when the *thread* that spawned it ends, so that thread must live
//!   as long as the runner may), drives each through load and `init`, and decides on restarts;
//! - **a reader thread per runner**, which reads its frames in order, hands job frames to the
//!   job's own thread, control frames to the supervisor thread, and at the channel's end waits
//!   for the exit status and fails every job still on the runner;
//! - **the jobs** of the modes: threads blocked in [`super::Supervised`]'s `run`, or tasks on the
//!   host's async runtime awaiting its `run_async` (a [`JobSender`] says which).
//!
//! Restarts: after a crash a new runner is started with back-off (0.5 s, doubling) and `init` runs
//! again; jobs wait meanwhile ([`Readiness::Restarting`]). [`CRASH_LOOP`] (3) crashes with no job
//! finished in between, or a restart whose load or `init` fails, end the handler for good
//! ([`Readiness::Failed`]). A runner the host killed (a hard stop) is restarted at once and does
//! not count as a crash.

use super::capture::{Capture, LineContext};
use super::crash::{describe, describe_kill, KillReason, OomCounter, RunnerEnd};
use super::protocol::{self, read_frame, write_frame, Frame, Kind, ReadError};
use super::reaper;
use crate::handler::{CancelToken, HandlerInfo, HandlerSpec, LoadError, Readiness};
use crate::job::{Failure, JobResult, Outcome, RawJson};
use crate::metrics::RestartReason;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tracing::Span;

/// The argument that starts the `worker-host` binary as a runner.
pub const RUNNER_ARGUMENT: &str = "__worker-host-runner";
/// Crashes in a row, with no job finished between them, that end the handler for good.
const CRASH_LOOP: u32 = 3;
/// The wait before the first restart after a crash; it doubles with each crash in a row.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(500);
/// How long a runner that closed its channel may take to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a dead runner's output pipes may take to deliver their last lines.
const LAST_OUTPUT_WAIT: Duration = Duration::from_millis(300);
/// How long a runner may take to run `teardown` and exit at shutdown, beyond the cancel grace.
const TEARDOWN_WAIT: Duration = Duration::from_secs(10);
/// Room for the non-output bytes of a frame (a failure's JSON, a log line) over the output and
/// chunk limits.
const FRAME_OVERHEAD: u64 = 1024 * 1024;

/// What a job's thread receives while its job runs on a runner.
#[derive(Debug)]
pub(super) enum ToJob {
    Chunk(RawJson),
    Progress(RawJson),
    Done(JobResult),
    /// The runner ended before the job did.
    Died(Failure),
    /// The job's cancel token fired: tell the runner, start the hard-stop clock.
    Cancel,
}

/// Where a job's messages go: a thread blocked in [`super::Supervised`]'s `run`, or a task
/// awaiting its `run_async`.
#[derive(Debug, Clone)]
pub(super) enum JobSender {
    Thread(mpsc::Sender<ToJob>),
    Task(tokio::sync::mpsc::UnboundedSender<ToJob>),
}

impl JobSender {
    /// Hands `message` to the job (dropped if the job already ended: nobody waits for it).
    pub(super) fn send(&self, message: ToJob) {
        let _ = match self {
            Self::Thread(sender) => sender.send(message).map_err(drop),
            Self::Task(sender) => sender.send(message).map_err(drop),
        };
    }
}

/// A job running on a runner.
#[derive(Debug)]
pub(super) struct Call {
    pub(super) job_id: String,
    pub(super) span: Span,
    pub(super) to_job: JobSender,
}

/// One runner process: one generation of the handler.
#[derive(Debug)]
pub(super) struct Runner {
    generation: u64,
    pid: i32,
    writer: Mutex<UnixStream>,
    calls: Mutex<HashMap<u64, Call>>,
    /// Set when the host kills the runner, so its end is reported as the host's doing.
    kill_reason: Mutex<Option<KillReason>>,
    /// Set (under the phase lock) as soon as its channel ends: no job is given to it after.
    ended: std::sync::atomic::AtomicBool,
    capture: Arc<Capture>,
    oom: OomCounter,
    oom_kills_before: Option<u64>,
    /// The span of the last job that ran alone, and when it ended: output read just after a job
    /// ended was most likely written by it (the pipes are read on threads of their own).
    last_alone: Mutex<Option<(Span, Instant)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Runner {
    /// Writes one frame to the runner. An error means it is gone (its end reports why).
    pub(super) fn send(&self, kind: Kind, call: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        write_frame(&mut *lock(&self.writer), kind, 0, call, parts)
    }

    /// Writes one frame from a task on the host's async runtime: at once when the socket has
    /// room for it (small frames, the usual case), and otherwise the rest in
    /// [`wait_in_place`], so a slow runner never holds a runtime thread that other tasks need.
    pub(super) fn send_from_task(
        &self,
        kind: Kind,
        call: u64,
        parts: &[&[u8]],
    ) -> std::io::Result<()> {
        let mut writer = match self.writer.try_lock() {
            Ok(writer) => writer,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Another frame is being written (a large one, waiting for the runner to read).
            Err(std::sync::TryLockError::WouldBlock) => {
                return wait_in_place(|| self.send(kind, call, parts))
            }
        };
        let written = protocol::try_write_frame(&writer, kind, 0, call, parts)?;
        if written == protocol::frame_len(parts) {
            return Ok(());
        }
        wait_in_place(|| protocol::write_rest_of_frame(&mut *writer, kind, 0, call, parts, written))
    }

    /// Kills the runner for `reason` (the first reason given is the one reported).
    pub(super) fn kill(&self, reason: KillReason) {
        lock(&self.kill_reason).get_or_insert(reason);
        reaper::kill_child(self.pid);
    }

    /// The runner's process id.
    pub(super) fn pid(&self) -> i32 {
        self.pid
    }
}

/// How long after a job that ran alone ended its runner's output is still logged in its span.
const OUTPUT_LINGER: Duration = Duration::from_millis(250);

impl Runner {
    /// Forgets a job whose frame could not be sent (the runner is dying), so it can go to the
    /// next runner; false when the runner's end has already claimed it (its failure is on the
    /// way to the job).
    pub(super) fn withdraw(&self, call: u64) -> bool {
        lock(&self.calls).remove(&call).is_some()
    }

    /// Forgets the job `call` (its result came); `None` if it was not running.
    fn end_call(&self, call: u64) -> Option<Call> {
        let mut calls = lock(&self.calls);
        let ended = calls.remove(&call)?;
        if calls.is_empty() {
            *lock(&self.last_alone) = Some((ended.span.clone(), Instant::now()));
        }
        Some(ended)
    }
}

impl LineContext for Runner {
    fn span(&self) -> Span {
        let calls = lock(&self.calls);
        match calls.len() {
            1 => calls
                .values()
                .next()
                .map_or_else(Span::none, |call| call.span.clone()),
            0 => match &*lock(&self.last_alone) {
                Some((span, ended)) if ended.elapsed() < OUTPUT_LINGER => span.clone(),
                _ => Span::none(),
            },
            _ => Span::none(),
        }
    }
}

/// Where the handler stands, shared by every thread.
#[derive(Debug)]
enum Phase {
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

/// How a runner ended, in words.
#[derive(Debug, Clone)]
pub(super) struct EndReport {
    /// "was killed by SIGSEGV (...)", "exited with status 3 (...)".
    pub(super) description: String,
    /// The host killed it (not counted as a crash).
    pub(super) killed_by_host: bool,
    /// Its last output lines.
    pub(super) last_output: String,
    /// How it ended, as the restart metric counts it.
    pub(super) restart_reason: RestartReason,
}

impl EndReport {
    /// The failure of one job that was on the runner, among `all` the jobs on it.
    fn failure_for(&self, job_id: &str, all: &[String]) -> Failure {
        let others: Vec<&str> = all
            .iter()
            .map(String::as_str)
            .filter(|id| *id != job_id)
            .collect();
        let company = match others.len() {
            0 => String::new(),
            n => format!(" and {n} other job(s) ({})", others.join(", ")),
        };
        let error_type = if self.killed_by_host {
            "HandlerKilled"
        } else {
            "HandlerCrashed"
        };
        Failure::new(
            error_type,
            format!(
                "the handler's runner process {} while running this job{company}{}",
                self.description,
                self.output_note()
            ),
        )
    }

    /// The last output, as a note to append to a message.
    fn output_note(&self) -> String {
        if self.last_output.trim().is_empty() {
            String::new()
        } else {
            format!(
                "\n--- the handler's last output ---\n{}",
                self.last_output.trim_end()
            )
        }
    }
}

/// The state every thread shares.
#[derive(Debug)]
pub(super) struct Shared {
    spec: HandlerSpec,
    phase: Mutex<Phase>,
    changed: Condvar,
    readiness: tokio::sync::watch::Sender<Readiness>,
    events: mpsc::Sender<Event>,
    next_call: AtomicU64,
    /// The runner started last (for its output).
    newest: Mutex<Option<Arc<Runner>>>,
    /// Crashes since the last job that finished on a runner.
    crashes: AtomicU32,
    /// Whether a runner that ended is replaced: the spec's `respawn`, until the handler is
    /// retired (a swap replaced it, and no new job comes).
    respawn: std::sync::atomic::AtomicBool,
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

    fn set_phase(&self, phase: Phase) {
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
    fn claim(
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
    fn retire(&self, runner: &Runner) {
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
    fn set_ready(&self, runner: Arc<Runner>) -> bool {
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
    fn runner_ended(&self, runner: &Runner, report: &EndReport) {
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
            call.to_job.send(ToJob::Died(failure));
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// The supervisor thread: loads the first runner (its result goes to `loaded`), then serves
/// events until shutdown.
pub(super) fn supervise(
    shared: Arc<Shared>,
    events: mpsc::Receiver<Event>,
    loaded: mpsc::Sender<Result<HandlerInfo, LoadError>>,
) {
    let mut supervisor = Supervisor {
        shared,
        events,
        generation: 0,
        current: None,
        config: None,
        ready_info: None,
        shutdown: None,
        ended_early: None,
        init_interrupted: false,
    };
    match supervisor.start_runner() {
        Ok(info) => {
            let _ = loaded.send(Ok(info));
        }
        Err(Halt::Failed(error)) => {
            let _ = loaded.send(Err(error));
            supervisor.finish();
            return;
        }
        Err(Halt::Shutdown) => {
            supervisor.finish();
            return;
        }
    }
    while supervisor.shutdown.is_none() {
        let Ok(event) = supervisor.events.recv() else {
            break;
        };
        match event {
            Event::Init { config, reply } => {
                let result = match supervisor.init_current(&config) {
                    Ok(info) => {
                        supervisor.config = Some(config);
                        supervisor.ready_info = Some(info.clone());
                        Ok(info)
                    }
                    Err(Halt::Failed(error)) => Err(error),
                    Err(Halt::Shutdown) => {
                        supervisor.init_interrupted = true;
                        Err(LoadError::InitFailed {
                            failure: Failure::new(
                                "WorkerShutdown",
                                "the worker shut down during init",
                            ),
                        })
                    }
                };
                let _ = reply.send(result);
            }
            Event::Shutdown { reply } => supervisor.shutdown = Some(reply),
            Event::Control {
                generation,
                control: Control::Ended(report),
            } if generation == supervisor.generation => {
                supervisor.current = None;
                if supervisor.config.is_some() {
                    supervisor.restart_after(report);
                } else {
                    supervisor.ended_early = Some(report);
                }
            }
            Event::Control { .. } => {}
        }
    }
    supervisor.finish();
}

/// Why the supervisor stops what it is doing.
enum Halt {
    /// Loading or `init` failed.
    Failed(LoadError),
    /// A shutdown was asked for meanwhile (kept in `Supervisor::shutdown`).
    Shutdown,
}

struct Supervisor {
    shared: Arc<Shared>,
    events: mpsc::Receiver<Event>,
    generation: u64,
    current: Option<Arc<Runner>>,
    /// The configuration `init` ran with, for restarts.
    config: Option<String>,
    /// The handler's facts after its first `init`: what the host serves with, whatever a
    /// restarted runner's `init` reports.
    ready_info: Option<HandlerInfo>,
    /// Set once shutdown was asked for: answered when the runner is gone.
    shutdown: Option<mpsc::Sender<()>>,
    /// How the first runner ended, when it ended between its load and `init`.
    ended_early: Option<EndReport>,
    /// A shutdown came while `init` ran: the runner has nothing to finish, and is killed.
    init_interrupted: bool,
}

impl Supervisor {
    /// Waits for the next control message of the current runner; other runners' messages are
    /// stale and ignored. A shutdown asked for meanwhile halts the wait.
    fn next_control(&mut self, deadline: Option<Instant>) -> Result<Option<Control>, Halt> {
        loop {
            let event = match deadline {
                Some(deadline) => {
                    match self
                        .events
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        Ok(event) => event,
                        Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Halt::Shutdown),
                    }
                }
                None => self.events.recv().map_err(|_| Halt::Shutdown)?,
            };
            match event {
                Event::Control {
                    generation,
                    control,
                } if generation == self.generation => {
                    if matches!(control, Control::Ended(_)) {
                        self.current = None;
                    }
                    return Ok(Some(control));
                }
                Event::Control { .. } => {}
                Event::Shutdown { reply } => {
                    self.shutdown = Some(reply);
                    return Err(Halt::Shutdown);
                }
                Event::Init { reply, .. } => {
                    let _ = reply.send(Err(LoadError::InitFailed {
                        failure: Failure::new("InitFailed", "init was asked for twice"),
                    }));
                }
            }
        }
    }

    /// Starts a new runner and waits for it to load the library.
    fn start_runner(&mut self) -> Result<HandlerInfo, Halt> {
        self.generation += 1;
        let runner = spawn_runner(&self.shared, self.generation).map_err(|error| {
            Halt::Failed(LoadError::RunnerStart {
                reason: error.to_string(),
            })
        })?;
        self.current = Some(runner);
        match self.next_control(None)? {
            Some(Control::Loaded(info)) => Ok(info),
            Some(Control::Failed(error)) => Err(Halt::Failed(error)),
            Some(Control::Ended(report)) => Err(Halt::Failed(LoadError::NotALibrary {
                path: std::path::absolute(&self.shared.spec.path)
                    .unwrap_or_else(|_| self.shared.spec.path.clone()),
                reason: format!(
                    "loading it ended the runner process, which {}; the file may be truncated or corrupt, or a library constructor in it crashed{}",
                    report.description,
                    report.output_note()
                ),
            })),
            Some(other) => Err(Halt::Failed(protocol_error(&other, "Loaded"))),
            None => unreachable!("no deadline"),
        }
    }

    /// Runs `init` on the current runner; on success the handler is ready, with the facts it
    /// reported after `init`.
    fn init_current(&mut self, config: &str) -> Result<HandlerInfo, Halt> {
        let Some(runner) = self.current.clone() else {
            let description = self
                .ended_early
                .take()
                .map_or_else(|| "ended".to_owned(), |report| report.description);
            return Err(Halt::Failed(LoadError::InitFailed {
                failure: Failure::new(
                    "HandlerCrashed",
                    format!("its runner process {description} before init"),
                ),
            }));
        };
        // A write error means the runner died; its end is the answer.
        let _ = runner.send(Kind::Init, 0, &[config.as_bytes()]);
        let timeout = self.shared.spec.init_timeout;
        match self.next_control(Some(Instant::now() + timeout))? {
            None => {
                runner.kill(KillReason::InitTimeout);
                // Its end (now on the way) is not a crash of a job; the failure is the timeout.
                while !matches!(self.next_control(None)?, Some(Control::Ended(_))) {}
                Err(Halt::Failed(init_timed_out(timeout)))
            }
            Some(Control::Ready(info)) if self.shared.set_ready(runner) => Ok(info),
            Some(Control::Ready(_)) => {
                // It ended right after init: its end, which is on its way, says how.
                let description = loop {
                    if let Some(Control::Ended(report)) = self.next_control(None)? {
                        break report.description;
                    }
                };
                Err(Halt::Failed(LoadError::InitFailed {
                    failure: Failure::new(
                        "HandlerCrashed",
                        format!("its runner process {description} right after init"),
                    ),
                }))
            }
            Some(Control::Failed(error)) => Err(Halt::Failed(error)),
            Some(Control::Ended(report)) => Err(Halt::Failed(LoadError::InitFailed {
                failure: Failure::new(
                    "HandlerCrashed",
                    format!(
                        "its runner process {} during init{}",
                        report.description,
                        report.output_note()
                    ),
                ),
            })),
            Some(other) => Err(Halt::Failed(protocol_error(&other, "Ready"))),
        }
    }

    /// The current runner ended on its own (or was killed): restart it with back-off, or give up.
    fn restart_after(&mut self, mut report: EndReport) {
        if !self.shared.respawn.load(Ordering::Acquire) {
            // A one-shot run is over with its job: no new runner (and no second init).
            self.shared.set_phase(Phase::Failed(format!(
                "the handler's runner process {}",
                report.description
            )));
            return;
        }
        self.shared.set_phase(Phase::Restarting);
        loop {
            let crashes = if report.killed_by_host {
                self.shared.crashes.load(Ordering::Acquire)
            } else {
                self.shared.crashes.fetch_add(1, Ordering::AcqRel) + 1
            };
            if crashes >= CRASH_LOOP {
                let reason = format!(
                    "the handler crashed {crashes} times in a row without finishing a job; the last time its runner process {}",
                    report.description
                );
                tracing::error!("{reason}. The worker stops.");
                self.shared.set_phase(Phase::Failed(reason));
                return;
            }
            let delay = if report.killed_by_host {
                Duration::ZERO
            } else {
                FIRST_RESTART_DELAY * 2_u32.pow(crashes.saturating_sub(1))
            };
            tracing::warn!(
                "The handler's runner process {}; starting a new one in {delay:?} (init runs again).",
                report.description
            );
            crate::metrics::get().runner_restarted(report.restart_reason);
            let restart_at = Instant::now() + delay;
            while Instant::now() < restart_at {
                // Only a shutdown matters here; anything else is from the dead runner.
                if self.next_control(Some(restart_at)).is_err() {
                    return;
                }
            }
            let config = self.config.clone().unwrap_or_else(|| "{}".into());
            let started = self.start_runner().and_then(|_| self.init_current(&config));
            match started {
                Ok(info) => {
                    let features = |info: &HandlerInfo| (info.streaming, info.max_concurrency);
                    if let Some(first) = self
                        .ready_info
                        .as_ref()
                        .filter(|first| features(first) != features(&info))
                    {
                        tracing::warn!(
                            "The handler's new runner reported other features after init (streaming {}, max concurrency {}) than the first (streaming {}, max concurrency {}); the worker goes on with the first.",
                            info.streaming,
                            info.max_concurrency,
                            first.streaming,
                            first.max_concurrency
                        );
                    }
                    tracing::info!("The handler's new runner process is ready.");
                    return;
                }
                Err(Halt::Shutdown) => return,
                // A runner that crashes during init is one more crash in a row.
                Err(Halt::Failed(LoadError::InitFailed { failure }))
                    if failure.error_type == "HandlerCrashed" =>
                {
                    report = EndReport {
                        description: failure.message,
                        killed_by_host: false,
                        last_output: String::new(),
                        restart_reason: RestartReason::crashed,
                    };
                }
                Err(Halt::Failed(error)) => {
                    let reason = format!(
                        "the handler could not be started again after its runner process ended: {error}"
                    );
                    tracing::error!("{reason}. The worker stops.");
                    self.shared.set_phase(Phase::Failed(reason));
                    return;
                }
            }
        }
    }

    /// Stops the current runner in order (teardown, exit) or by force, and answers a shutdown.
    fn finish(&mut self) {
        let was_failed = matches!(&*lock(&self.shared.phase), Phase::Failed(_));
        if !was_failed {
            self.shared.set_phase(Phase::Stopped);
        }
        if let Some(runner) = self.current.take() {
            if self.init_interrupted {
                // Its init may take minutes (a model load), and nothing is to be torn down.
                runner.kill(KillReason::ShutdownDuringInit);
            }
            let _ = runner.send(Kind::Shutdown, 0, &[]);
            let deadline = Instant::now() + self.shared.spec.cancel_grace + TEARDOWN_WAIT;
            let mut ended = false;
            while !ended {
                match self.next_control(Some(deadline)) {
                    Ok(Some(Control::Ended(_))) => ended = true,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        if Instant::now() >= deadline {
                            tracing::warn!(
                                "The handler's runner did not exit in time at shutdown: killing it."
                            );
                            runner.kill(KillReason::Shutdown);
                            let _ = self.next_control(Some(Instant::now() + EXIT_WAIT));
                            ended = true;
                        }
                    }
                }
            }
        }
        if let Some(reply) = self.shutdown.take() {
            let _ = reply.send(());
        }
    }
}

/// The failure of an `init` that ran past its deadline.
pub(crate) fn init_timed_out(timeout: Duration) -> LoadError {
    LoadError::InitFailed {
        failure: Failure::new(
            "InitTimeout",
            format!(
                "init did not finish within {} s (--init-timeout-secs, or RUNPOD_INIT_TIMEOUT less 10 s)",
                timeout.as_secs_f64()
            ),
        ),
    }
}

fn protocol_error(control: &Control, expected: &str) -> LoadError {
    LoadError::RunnerStart {
        reason: format!("the runner sent {control:?} where {expected} was expected"),
    }
}

/// Starts runner `generation`: the same binary in runner mode, its stdin the control channel,
/// its stdout and stderr captured, in a process group of its own (so Ctrl-C in a terminal reaches
/// only the host, which stops the runner in order), with the host's environment less the
/// platform's worker key.
fn spawn_runner(shared: &Arc<Shared>, generation: u64) -> std::io::Result<Arc<Runner>> {
    let (host_end, runner_end) = UnixStream::pair()?;
    let spec = &shared.spec;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(RUNNER_ARGUMENT)
        .arg(std::process::id().to_string())
        .arg(spec.limits.max_output_bytes.to_string())
        .arg(spec.limits.max_chunk_bytes.to_string())
        .arg(&spec.path)
        .env_remove("RUNPOD_AI_API_KEY")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(runner_end)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !spec.library_dirs.is_empty() {
        // The runner loads the private copy, so `$ORIGIN` in the handler's run path names the
        // private directory; the libraries shipped with the original are still found, after
        // whatever the operator's own LD_LIBRARY_PATH names.
        let operators = std::env::var_os("LD_LIBRARY_PATH");
        // The runner puts the operator's own value back once it runs (the loader has read the
        // longer one by then), so what the handler starts does not inherit the additions.
        let mut marked =
            std::ffi::OsString::from(if operators.is_some() { "set:" } else { "unset" });
        marked.push(operators.clone().unwrap_or_default());
        command.env(super::child::OPERATOR_LIBRARY_PATH, marked);
        let mut search = operators.unwrap_or_default();
        for dir in &spec.library_dirs {
            if !search.is_empty() {
                search.push(":");
            }
            search.push(dir);
        }
        command.env("LD_LIBRARY_PATH", search);
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let oom = OomCounter::of_this_process();
    let oom_kills_before = oom.read();
    let mut child = reaper::spawn(&mut command, Some(host_end.try_clone()?))?;
    // The runner's end must not stay open here, or its death would not close the channel.
    drop(command);
    let runner = Arc::new(Runner {
        generation,
        pid: child.id() as i32,
        writer: Mutex::new(host_end.try_clone()?),
        calls: Mutex::new(HashMap::new()),
        kill_reason: Mutex::new(None),
        ended: std::sync::atomic::AtomicBool::new(false),
        capture: Capture::new(),
        oom,
        oom_kills_before,
        last_alone: Mutex::new(None),
    });
    if let Some(stdout) = child.stdout.take() {
        runner.capture.follow("stdout", stdout, runner.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        runner.capture.follow("stderr", stderr, runner.clone());
    }
    tracing::debug!(pid = runner.pid, generation, "Runner process started.");
    *lock(&shared.newest) = Some(runner.clone());
    let reader_shared = shared.clone();
    let reader_runner = runner.clone();
    std::thread::Builder::new()
        .name(format!("runner-{generation}-reader"))
        .spawn(move || read_frames(&reader_shared, &reader_runner, host_end))?;
    Ok(runner)
}

/// The reader thread of one runner: dispatches its frames until the channel ends, then reports
/// the end.
fn read_frames(shared: &Shared, runner: &Arc<Runner>, channel: UnixStream) {
    let max_body = shared.spec.limits.largest() as u64 + FRAME_OVERHEAD;
    let mut channel = std::io::BufReader::with_capacity(64 * 1024, channel);
    loop {
        match read_frame(&mut channel, max_body) {
            Ok(frame) => {
                if let Err(problem) = dispatch(shared, runner, frame) {
                    runner.kill(KillReason::Protocol(problem));
                    break;
                }
            }
            Err(ReadError::Closed | ReadError::Io(_)) => break,
            Err(ReadError::Invalid(problem)) => {
                runner.kill(KillReason::Protocol(problem));
                break;
            }
        }
    }
    // No job goes to it from now on, while its exit status and last output are awaited.
    shared.retire(runner);
    let status = reaper::wait(runner.pid, EXIT_WAIT).or_else(|| {
        // The channel closed but the process lives on: it cannot serve, so it goes.
        runner.kill(KillReason::Protocol("it closed its channel".into()));
        reaper::wait(runner.pid, EXIT_WAIT)
    });
    let killed_for = lock(&runner.kill_reason).clone();
    let end = status.and_then(RunnerEnd::of);
    let restart_reason = match (&killed_for, end) {
        (Some(_), _) => RestartReason::hung,
        (None, Some(RunnerEnd::Signaled(signal))) if signal == libc::SIGKILL => {
            RestartReason::killed
        }
        (None, Some(RunnerEnd::Exited(_))) => RestartReason::exited,
        (None, _) => RestartReason::crashed,
    };
    let description = match (&killed_for, end) {
        (Some(reason), _) => describe_kill(reason),
        (None, Some(end)) => {
            let oom_killed = match (runner.oom_kills_before, runner.oom.read()) {
                (Some(before), Some(after)) => Some(after > before),
                _ => None,
            };
            describe(end, oom_killed)
        }
        (None, None) => "ended in a way the host could not read".to_owned(),
    };
    let report = EndReport {
        description,
        killed_by_host: killed_for.is_some(),
        last_output: runner.capture.last_output(LAST_OUTPUT_WAIT),
        restart_reason,
    };
    shared.runner_ended(runner, &report);
    let _ = shared.events.send(Event::Control {
        generation: runner.generation,
        control: Control::Ended(report),
    });
}

/// Hands one frame to whoever it is for; an error says how the frame breaks the protocol.
fn dispatch(shared: &Shared, runner: &Runner, frame: Frame) -> Result<(), String> {
    let Frame {
        kind,
        flags,
        call,
        body,
    } = frame;
    let control = match kind {
        Kind::Loaded => Control::Loaded(
            serde_json::from_slice(&body)
                .map_err(|error| format!("a bad Loaded frame: {error}"))?,
        ),
        Kind::Failed => Control::Failed(
            serde_json::from_slice(&body)
                .map_err(|error| format!("a bad Failed frame: {error}"))?,
        ),
        Kind::Ready => Control::Ready(
            serde_json::from_slice(&body).map_err(|error| format!("a bad Ready frame: {error}"))?,
        ),
        Kind::TornDown => Control::TornDown,
        Kind::Log => {
            let text = String::from_utf8_lossy(&body);
            if call == 0 {
                // The lines of init and teardown are what a failure report needs.
                runner.capture.keep(text.clone().into_owned());
            }
            let span = lock(&runner.calls)
                .get(&call)
                .map_or_else(Span::none, |call| call.span.clone());
            crate::handler::inproc::log_in(&span, i32::from(flags), &text);
            return Ok(());
        }
        Kind::Chunk | Kind::Progress | Kind::Done => {
            return job_frame(shared, runner, kind, flags, call, body);
        }
        Kind::Init | Kind::Job | Kind::Cancel | Kind::Shutdown => {
            return Err(format!("a host frame ({kind:?}) from the runner"));
        }
    };
    let _ = shared.events.send(Event::Control {
        generation: runner.generation,
        control,
    });
    Ok(())
}

/// A chunk, progress report or result of one job.
fn job_frame(
    shared: &Shared,
    runner: &Runner,
    kind: Kind,
    flags: u8,
    call: u64,
    body: Vec<u8>,
) -> Result<(), String> {
    let json = |body: Vec<u8>| -> Result<RawJson, String> {
        let text = String::from_utf8(body).map_err(|error| error.to_string())?;
        serde_json::value::RawValue::from_string(text).map_err(|error| error.to_string())
    };
    let message = match kind {
        Kind::Chunk => ToJob::Chunk(json(body)?),
        Kind::Progress => ToJob::Progress(json(body)?),
        _ => {
            // The job's thread knows whether the handler streams, and sets it.
            let streaming = false;
            let outcome = match protocol::Outcome::from_flags(flags) {
                Some(protocol::Outcome::Output) => Outcome::Output(json(body)?),
                Some(protocol::Outcome::Streamed) => Outcome::Streamed,
                Some(protocol::Outcome::Failed) => Outcome::Failed {
                    failure: serde_json::from_slice(&body)
                        .map_err(|error| format!("a bad failure: {error}"))?,
                    streaming,
                },
                None => return Err(format!("a Done frame with flags {flags:#x}")),
            };
            let result = JobResult {
                outcome,
                recycle: flags & protocol::RECYCLE != 0,
            };
            shared.crashes.store(0, Ordering::Release);
            let Some(entry) = runner.end_call(call) else {
                return Err(format!("a result for call {call}, which is not running"));
            };
            entry.to_job.send(ToJob::Done(result));
            return Ok(());
        }
    };
    match lock(&runner.calls).get(&call) {
        Some(entry) => {
            entry.to_job.send(message);
            Ok(())
        }
        None => Err(format!("a {kind:?} for call {call}, which is not running")),
    }
}

/// Runs `wait`, which blocks, from a task: on a multi-threaded runtime it first hands this
/// thread's other tasks to another thread (`block_in_place`); elsewhere it just blocks.
fn wait_in_place<T>(wait: impl FnOnce() -> T) -> T {
    let multi_threaded = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    if multi_threaded {
        tokio::task::block_in_place(wait)
    } else {
        wait()
    }
}
