//! The supervisor thread: starts runner processes, drives each through load and `init`, and
//! when one ends (its reader thread, `reader`, fails the jobs it held with the cause) starts the
//! next one, or gives up.
//!
//! Three kinds of thread work on a supervised handler:
//! - **the supervisor thread**, one for the handler's life: it spawns every runner (a runner's
//!   parent-death signal fires when the *thread* that spawned it ends, so that thread must live
//!   as long as the runner may), drives each through load and `init`, and decides on restarts;
//! - **a reader thread per runner** (`reader`), which reads its frames in order, hands job frames to the
//!   job's own thread, control frames to the supervisor thread, and at the channel's end waits
//!   for the exit status and fails every job still on the runner;
//! - **the jobs** of the modes: threads blocked in [`super::Supervised`]'s `run`, or tasks on the
//!   host's async runtime awaiting its `run_async` (a `JobSender` says which).
//!
//! They share the handler's phase and the way onto the ready runner (`shared`), and each
//! runner's channel and jobs (`process`).
//!
//! Restarts: after a crash a new runner is started with back-off (0.5 s, doubling) and `init` runs
//! again; jobs wait meanwhile ([`crate::handler::Readiness::Restarting`]). [`CRASH_LOOP`] (3) crashes with no job
//! finished in between, or a restart whose load or `init` fails, end the handler for good
//! ([`crate::handler::Readiness::Failed`]). A runner the host killed (a hard stop) is restarted at once and does
//! not count as a crash.

use super::capture::Capture;
use super::crash::{KillReason, OomCounter};
use super::process::{lock, EndReport, Runner, EXIT_WAIT};
use super::protocol::Kind;
use super::reader::read_frames;
use super::reaper;
use super::shared::{Control, Event, Phase, Shared};
use crate::handler::{HandlerInfo, LoadError};
use crate::job::Failure;
use crate::metrics::RestartReason;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The argument that starts the `worker-host` binary as a runner.
pub const RUNNER_ARGUMENT: &str = "__worker-host-runner";
/// Crashes in a row, with no job finished between them, that end the handler for good.
const CRASH_LOOP: u32 = 3;
/// The wait before the first restart after a crash; it doubles with each crash in a row.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(500);
/// How long a runner may take to run `teardown` and exit at shutdown, beyond the cancel grace.
const TEARDOWN_WAIT: Duration = Duration::from_secs(10);

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
                Err(Halt::Shutdown) => {
                    // The new runner is loading or in its init: nothing to tear down.
                    self.init_interrupted = true;
                    return;
                }
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
