//! The supervised runner (the default isolation): the handler runs in a runner process, a child
//! of the host started from the same binary in a hidden mode, and the host drives it over one
//! channel. A crash (a segfault, an abort, an `exit`, an OOM kill) ends the runner, not the
//! host: each job on it fails with the cause, and a fresh runner runs `init` again.
//!
//! - [`Supervised`] (here): the [`Handler`] the modes see; a job sends its frame over the channel
//!   and waits for what comes back, and a cancelled job whose handler does not return within
//!   `--cancel-grace-secs` gets its runner killed (a hard stop). The serving modes run each job
//!   as a task (`run_async`: the frame is written without waiting when the socket has room, the
//!   reader thread wakes the task, and no thread is held); the one-shot run blocks in `run`.
//! - `supervisor`: starting, watching and restarting runners; `reader`: each runner's frames and
//!   the report of its end; `shared`: the handler's phase and the jobs' way onto the ready
//!   runner; `process`: one runner's channel and the jobs on it.
//! - `protocol`: the frames. [`child`]: the runner's own main. `capture`: its stdout and
//!   stderr. `crash`: what a runner's end means. `reaper`: waiting for child processes.
//!
//! # The channel
//!
//! The runner's stdin is one end of a Unix socketpair (the runner moves it off fd 0 and puts
//! `/dev/null` there); its stdout and stderr are pipes the host logs, never the channel. Frames
//! are length-prefixed (`protocol`); `call` numbers a job on the channel.
//!
//! ```text
//! host                                   runner
//!                                        loads the .so
//!      <── Loaded {descriptor facts}     (or Failed {load error}, then it exits)
//! Init {config} ──>
//!      <── Log {call 0}...               init runs
//!      <── Ready {facts after init}      (or Failed {init error}, then it waits for Shutdown)
//! Job {call, id, input, job JSON} ──>    one thread per running job
//! Cancel {call} ──>                      (any time; the handler sees is_cancelled)
//!      <── Log / Chunk / Progress {call} (any number, in order; progress is coalesced: a
//!                                         job's newer value replaces an unsent older one)
//!      <── Done {call, outcome, recycle} (exactly one per job, after its other frames; a
//!                                         failure carries the handler's traceback, ABI 1.1)
//! Shutdown ──>                           waits for its running jobs, runs teardown
//!      <── TornDown                      then exits
//! ```
//!
//! Jobs interleave: frames of different calls come in any order, those of one call in order. The
//! end of the channel (or of the process, which the host's reaper sees) ends every call still
//! open with the runner's cause of death. The runner exits when the channel closes, and dies with
//! the host (`PR_SET_PDEATHSIG`, checked against the host's pid after it is set).
//!
//! A large input or output crosses the channel without an extra copy: the host writes the job's
//! own buffers with one vectored write, the runner hands the handler pointers into the frame it
//! read, and an output goes back the same way.

mod capture;
pub mod child;
mod coalesce;
mod crash;
mod process;
mod protocol;
mod reader;
mod reaper;
mod shared;
mod supervisor;

use super::{CancelToken, Handler, HandlerInfo, HandlerSpec, JobEvents, LoadError, Readiness};
use crate::job::{Failure, Job, JobResult, Outcome};
use crash::KillReason;
use futures_util::future::BoxFuture;
use process::{JobSender, ToJob};
use protocol::Kind;
use shared::{Event, Shared};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Instant;

pub(crate) use supervisor::init_timed_out;
pub use supervisor::RUNNER_ARGUMENT;

/// How many times a job whose frame could not be written is offered to a runner (a new one each
/// time, once the dead one is retired) before it fails.
const MAX_SEND_TRIES: u32 = 1000;
/// The wait before a job whose frame could not be written is offered again.
const RESEND_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// A handler loaded into a supervised runner process.
#[derive(Debug)]
pub struct Supervised {
    shared: Arc<Shared>,
    /// What the descriptor says (the runner's Loaded frame).
    info: HandlerInfo,
    /// What the first `init` reported (its Ready frame): the descriptor's facts with the
    /// features `init` set (ABI 1.1), used from then on.
    after_init: std::sync::OnceLock<HandlerInfo>,
    events: mpsc::Sender<Event>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Supervised {
    /// Starts the first runner and waits for it to load the library (not to run `init`).
    pub fn start(spec: &HandlerSpec) -> Result<Self, LoadError> {
        let (events, receiver) = mpsc::channel();
        let shared = Arc::new(Shared::new(spec.clone(), events.clone()));
        let (loaded, load_result) = mpsc::channel();
        let supervisor_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("runner-supervisor".into())
            .spawn(move || supervisor::supervise(supervisor_shared, receiver, loaded))
            .map_err(|error| LoadError::RunnerStart {
                reason: error.to_string(),
            })?;
        match load_result.recv() {
            Ok(Ok(info)) => Ok(Self {
                shared,
                info,
                after_init: std::sync::OnceLock::new(),
                events,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => Err(LoadError::RunnerStart {
                reason: "its supervisor thread ended".into(),
            }),
        }
    }
}

impl Supervised {
    /// The failure of a job that never reached a runner.
    fn failed(&self, failure: Failure) -> JobResult {
        JobResult::failed(failure, self.info().streaming)
    }

    /// One waker for the job's whole life: it wakes a wait for a restart, and tells the job
    /// (which forwards the cancel to the runner once the job is there).
    fn wake_on_cancel(&self, cancel: &CancelToken, to_job: &JobSender) {
        let shared = self.shared.clone();
        let to_job = to_job.clone();
        cancel.on_cancel(move || {
            shared.wake_waiting();
            to_job.send(ToJob::Cancel);
        });
    }
}

/// Whether a job whose frame was written to `runner` (or not: `sent`) is on it (true), or must
/// go to the next runner (false: the runner died before it could take the job; the caller
/// waits [`RESEND_PAUSE`] for the dead one's reader to retire it), or fails.
fn placed(
    runner: &process::Runner,
    call: u64,
    sent: std::io::Result<()>,
    tries: &mut u32,
) -> Result<bool, Failure> {
    let Err(error) = sent else {
        return Ok(true);
    };
    *tries += 1;
    if !runner.withdraw(call) {
        // Its end has claimed the job: a Died follows.
        return Ok(true);
    }
    if *tries >= MAX_SEND_TRIES {
        return Err(Failure::new(
            "WorkerError",
            format!("the job could not be sent to the handler's runner process: {error}"),
        ));
    }
    Ok(false)
}

/// A job on a runner, waiting for its result.
struct Wait<'a> {
    job_id: &'a str,
    runner: Arc<process::Runner>,
    call: u64,
    streaming: bool,
    grace: std::time::Duration,
    /// When the runner is killed if the job has not ended (set by a hard cancel).
    hard_stop_at: Option<Instant>,
}

impl<'a> Wait<'a> {
    fn new(handler: &Supervised, job_id: &'a str, runner: Arc<process::Runner>, call: u64) -> Self {
        Self {
            job_id,
            runner,
            call,
            streaming: handler.info().streaming,
            grace: handler.shared.spec().cancel_grace,
            hard_stop_at: None,
        }
    }

    /// The stopped job's handler did not return within the grace: its runner is killed (the
    /// job's Died follows).
    /// `at_once`: it was stopped with no grace ([`CancelToken::stop_at_once`]).
    fn hard_stop(&mut self, at_once: bool) {
        let job_id = self.job_id.to_owned();
        let reason = if at_once {
            tracing::warn!(
                "The job's client went away and its handler ignored the cancel: killing its runner process (pid {}).",
                self.runner.pid()
            );
            KillReason::Abandoned { job_id }
        } else {
            tracing::warn!(
                "The job's handler did not return within {:?} of the stop: killing its runner process (pid {}).",
                self.grace,
                self.runner.pid()
            );
            KillReason::HardStop {
                job_id,
                grace_secs: self.grace.as_secs_f64(),
            }
        };
        self.runner.kill(reason);
        self.hard_stop_at = None;
    }

    /// The hard-stop deadline passed: what the job sent before it (`queued`) is handled first,
    /// and a job that ended in time is not stopped; otherwise its runner is killed (its Died
    /// follows).
    fn past_deadline(
        &mut self,
        queued: impl Iterator<Item = ToJob>,
        events: &dyn JobEvents,
        cancel: &CancelToken,
        cancel_frame: &dyn Fn(&process::Runner, u64),
    ) -> Option<JobResult> {
        for message in queued {
            if let Some(result) = self.on_message(Some(message), events, cancel, cancel_frame) {
                return Some(result);
            }
        }
        self.hard_stop(cancel.is_at_once());
        None
    }

    /// Handles one message for the job (`None`: its channel ended); the job's result once it
    /// has one. `cancel_frame` writes a Cancel frame to the runner.
    fn on_message(
        &mut self,
        message: Option<ToJob>,
        events: &dyn JobEvents,
        cancel: &CancelToken,
        cancel_frame: &dyn Fn(&process::Runner, u64),
    ) -> Option<JobResult> {
        let failed = |failure| JobResult::failed(failure, self.streaming);
        match message {
            Some(ToJob::Chunk(chunk)) => events.chunk(chunk),
            Some(ToJob::Progress(progress)) => events.progress(progress),
            Some(ToJob::Done(mut result)) => {
                if let Outcome::Failed {
                    streaming: ref mut of_a_stream,
                    ..
                } = result.outcome
                {
                    *of_a_stream = self.streaming;
                }
                return Some(*result);
            }
            Some(ToJob::Died(failure)) => return Some(failed(*failure)),
            Some(ToJob::Cancel) => {
                // The clock starts before the write, which may wait for the channel. A soft
                // cancel (a load-balancing client gone) never kills the runner; it comes again
                // if it turns hard.
                if cancel.is_at_once() {
                    self.hard_stop_at = Some(Instant::now());
                } else if !cancel.is_soft() {
                    self.hard_stop_at.get_or_insert(Instant::now() + self.grace);
                }
                cancel_frame(&self.runner, self.call);
            }
            // The channel always ends a call with Done or Died before it drops the sender.
            None => {
                return Some(failed(Failure::new(
                    "HandlerCrashed",
                    "the handler's runner process ended without a result for this job",
                )))
            }
        }
        None
    }
}

impl Handler for Supervised {
    fn info(&self) -> &HandlerInfo {
        self.after_init.get().unwrap_or(&self.info)
    }

    fn init(&self, config_json: &str) -> Result<(), LoadError> {
        let (reply, answer) = mpsc::channel();
        let sent = self.events.send(Event::Init {
            config: config_json.to_owned(),
            reply,
        });
        match sent.ok().and_then(|()| answer.recv().ok()) {
            Some(result) => result.map(|info| {
                let _ = self.after_init.set(info);
            }),
            None => Err(LoadError::RunnerStart {
                reason: "its supervisor thread ended".into(),
            }),
        }
    }

    fn run(&self, job: &Job, events: &dyn JobEvents, cancel: &CancelToken) -> JobResult {
        let (sender, messages) = mpsc::channel();
        let to_job = JobSender::Thread(sender);
        self.wake_on_cancel(cancel, &to_job);
        let mut numbers = [0; 32];
        let [id, job_json] = job.nul_terminated();
        let body = protocol::job_body(&mut numbers, id, job_json, job.input_range());
        let mut tries = 0;
        let (runner, call) = loop {
            let (runner, call) = match self.shared.acquire(job.id(), to_job.clone(), cancel) {
                Ok(acquired) => acquired,
                Err(failure) => return self.failed(failure),
            };
            let sent = runner.send(Kind::Job, call, &body);
            match placed(&runner, call, sent, &mut tries) {
                Ok(true) => break (runner, call),
                Ok(false) => std::thread::sleep(RESEND_PAUSE),
                Err(failure) => return self.failed(failure),
            }
        };
        let mut wait = Wait::new(self, job.id(), runner, call);
        loop {
            let cancel_frame = |runner: &process::Runner, call| {
                let _ = runner.send(Kind::Cancel, call, &[]);
            };
            let message = match wait.hard_stop_at {
                None => messages.recv().ok(),
                Some(at) if Instant::now() >= at => {
                    let queued = std::iter::from_fn(|| messages.try_recv().ok());
                    if let Some(result) = wait.past_deadline(queued, events, cancel, &cancel_frame)
                    {
                        return result;
                    }
                    continue;
                }
                Some(at) => {
                    match messages.recv_timeout(at.saturating_duration_since(Instant::now())) {
                        Ok(message) => Some(message),
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                }
            };
            if let Some(result) = wait.on_message(message, events, cancel, &cancel_frame) {
                return result;
            }
        }
    }

    fn blocks(&self) -> bool {
        false
    }

    fn run_async<'a>(
        &'a self,
        job: Job,
        events: &'a dyn JobEvents,
        cancel: &'a CancelToken,
    ) -> BoxFuture<'a, JobResult> {
        Box::pin(async move {
            let (sender, mut messages) = tokio::sync::mpsc::unbounded_channel();
            let to_job = JobSender::Task(sender);
            self.wake_on_cancel(cancel, &to_job);
            let mut numbers = [0; 32];
            let [id, job_json] = job.nul_terminated();
            let body = protocol::job_body(&mut numbers, id, job_json, job.input_range());
            let mut tries = 0;
            let mut readiness = self.shared.readiness();
            let (runner, call) = loop {
                let Some(acquired) = self.shared.try_acquire(job.id(), &to_job, cancel) else {
                    // A runner is starting: wait for it, or for the job's cancel (which the
                    // next try sees).
                    tokio::select! {
                        _ = readiness.changed() => {}
                        _ = messages.recv() => {}
                    }
                    continue;
                };
                let (runner, call) = match acquired {
                    Ok(acquired) => acquired,
                    Err(failure) => return self.failed(failure),
                };
                let sent = runner.send_from_task(Kind::Job, call, &body);
                match placed(&runner, call, sent, &mut tries) {
                    Ok(true) => break (runner, call),
                    Ok(false) => tokio::time::sleep(RESEND_PAUSE).await,
                    Err(failure) => return self.failed(failure),
                }
            };
            // The runner has the job's text now: a big one's buffer goes back for the next take
            // while the job runs (only the id is kept, for a hard stop's report).
            let job_id = job.id().to_owned();
            drop(job);
            let mut wait = Wait::new(self, &job_id, runner, call);
            loop {
                let cancel_frame = |runner: &process::Runner, call| {
                    let _ = runner.send_from_task(Kind::Cancel, call, &[]);
                };
                let message = match wait.hard_stop_at {
                    None => messages.recv().await,
                    Some(at) => tokio::select! {
                        // The deadline first, so a handler that streams without pause is still
                        // stopped; what came before it is handled first (below).
                        biased;
                        () = tokio::time::sleep_until(at.into()) => {
                            let queued = std::iter::from_fn(|| messages.try_recv().ok());
                            if let Some(result) =
                                wait.past_deadline(queued, events, cancel, &cancel_frame)
                            {
                                return result;
                            }
                            continue;
                        }
                        message = messages.recv() => message,
                    },
                };
                if let Some(result) = wait.on_message(message, events, cancel, &cancel_frame) {
                    return result;
                }
            }
        })
    }

    fn readiness(&self) -> tokio::sync::watch::Receiver<Readiness> {
        self.shared.readiness()
    }

    fn recent_output(&self) -> String {
        self.shared.recent_output()
    }

    fn retire(&self) {
        self.shared.stop_respawning();
    }

    fn shutdown(&self) {
        let (reply, done) = mpsc::channel();
        if self.events.send(Event::Shutdown { reply }).is_ok() {
            let _ = done.recv();
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
