//! The runner's own main: `worker-host __worker-host-runner HOST_PID MAX_OUTPUT_BYTES
//! MAX_CHUNK_BYTES PATH`, started by the host's supervisor, never by a user. It loads the library,
//! then serves the channel on its stdin (see the [parent module](super) for the frames) until the
//! host says Shutdown or the channel closes.
//!
//! `init` runs on the main thread, as it does in the host with `--isolation none`; each job runs
//! on a thread with 8 MiB of stack, as the header promises: the thread that read it off the
//! channel (see `Serving`).

use super::coalesce::LatestProgress;
use super::protocol::{self, read_frame, write_frame, Frame, Kind, Outcome, RECYCLE};
use crate::buffers::GivenBackOnDrop;
use crate::handler::inproc::{HandlerLibrary, HandlerLog, JobText};
use crate::handler::{CancelToken, JobEvents, Limits};
use crate::job::{self, Failure, RawJson};
use handler_abi::ffi;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// The stack of every job thread, as the header promises.
const JOB_STACK_SIZE: usize = crate::handler::HANDLER_STACK_SIZE;

/// What the runner's command line says.
struct Arguments {
    host_pid: i32,
    limits: Limits,
    path: PathBuf,
}

fn parse(arguments: &[OsString]) -> Option<Arguments> {
    let [host_pid, max_output_bytes, max_chunk_bytes, path] = arguments else {
        return None;
    };
    Some(Arguments {
        host_pid: host_pid.to_str()?.parse().ok()?,
        limits: Limits {
            max_output_bytes: max_output_bytes.to_str()?.parse().ok()?,
            max_chunk_bytes: max_chunk_bytes.to_str()?.parse().ok()?,
        },
        path: PathBuf::from(path),
    })
}

/// Runs the runner with the arguments after [`super::RUNNER_ARGUMENT`]; returns its exit code.
/// The variable in which the host passes the operator's own `LD_LIBRARY_PATH` (`set:VALUE`, or
/// `unset`) when it lengthened the runner's with the handler's `$ORIGIN` directories.
pub(super) const OPERATOR_LIBRARY_PATH: &str = "WORKER_HOST_RUNNER_OPERATOR_LD_LIBRARY_PATH";

/// Puts the operator's `LD_LIBRARY_PATH` back (see [`OPERATOR_LIBRARY_PATH`]): the loader has
/// read the lengthened one at start, and the processes a handler starts get the operator's.
/// Called first thing, before this process has a second thread.
fn restore_library_path() {
    let Some(marked) = std::env::var_os(OPERATOR_LIBRARY_PATH) else {
        return;
    };
    std::env::remove_var(OPERATOR_LIBRARY_PATH);
    use std::os::unix::ffi::OsStrExt;
    match marked.as_bytes().strip_prefix(b"set:") {
        Some(value) => std::env::set_var("LD_LIBRARY_PATH", std::ffi::OsStr::from_bytes(value)),
        None => std::env::remove_var("LD_LIBRARY_PATH"),
    }
}

pub fn main(arguments: &[OsString]) -> ExitCode {
    restore_library_path();
    let Some(arguments) = parse(arguments) else {
        eprintln!("worker-host: the runner mode is started by worker-host itself, not by hand");
        return ExitCode::from(crate::exit::USAGE);
    };
    // Die with the host. The signal is armed only now, so check that the host did not die
    // before: then this process was handed to another parent already.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || nix::unistd::getppid().as_raw() != arguments.host_pid
    {
        return ExitCode::from(crate::exit::JOB_FAILED);
    }
    hide_the_host();
    let channel = match take_channel() {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("worker-host runner: cannot use the host's channel: {error}");
            return ExitCode::from(crate::exit::JOB_FAILED);
        }
    };
    match serve(channel, &arguments) {
        Ok(()) => ExitCode::SUCCESS,
        // The host is gone or broke the protocol: nothing is left to serve.
        Err(error) => {
            eprintln!("worker-host runner: {error}");
            ExitCode::from(crate::exit::JOB_FAILED)
        }
    }
}

/// Takes from the runner (and what it starts) the one power that would let a handler read the
/// host's memory or its `/proc/<pid>/environ`, where the platform's worker key is: tracing another
/// process (`CAP_SYS_PTRACE`, which root has outside a container's default set). The host itself
/// is not dumpable (see the supervisor), so without it those files are closed to the runner.
fn hide_the_host() {
    use caps::{CapSet, Capability};
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let _ = caps::drop(None, set, Capability::CAP_SYS_PTRACE);
    }
    let _ = caps::drop(None, CapSet::Bounding, Capability::CAP_SYS_PTRACE);
}

/// The channel is the runner's stdin: moved to a new descriptor (close-on-exec, so processes the
/// handler starts do not hold it), and stdin becomes `/dev/null`, so a handler reading stdin
/// cannot eat the host's frames.
fn take_channel() -> std::io::Result<UnixStream> {
    let channel = std::io::stdin().as_fd().try_clone_to_owned()?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    Ok(UnixStream::from(channel))
}

/// The runner's writing end of the channel, shared by its threads; a frame is written whole
/// under the lock.
#[derive(Clone)]
struct Sender(Arc<Mutex<UnixStream>>);

impl Sender {
    fn lock(&self) -> MutexGuard<'_, UnixStream> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a frame. A failed write means the channel is broken (the host is gone, or the
    /// handler closed a descriptor it does not own): a frame cannot be dropped without a job
    /// losing its result, so the runner ends at once and the host reports its end.
    fn send(&self, kind: Kind, flags: u8, call: u64, parts: &[&[u8]]) {
        let mut channel = self.lock();
        if let Err(error) = write_frame(&mut *channel, kind, flags, call, parts) {
            channel_broken(&error);
        }
    }

    fn send_json(&self, kind: Kind, value: &impl serde::Serialize) {
        let body = serde_json::to_vec(value).expect("plain data serializes");
        self.send(kind, 0, 0, &[&body]);
    }
}

/// A call's log lines, sent as Log frames.
struct FrameLog {
    sender: Sender,
    call: u64,
}

impl HandlerLog for FrameLog {
    fn log(&self, level: ffi::wh_log_level, text: &str) {
        let level = u8::try_from(level).unwrap_or(ffi::WH_LOG_INFO as u8);
        self.sender
            .send(Kind::Log, level, self.call, &[text.as_bytes()]);
    }
}

/// A job's chunks and progress, sent as frames: every chunk at once, in order, after the
/// progress reported before it; progress through `latest` (coalesced, see `coalesce`), or at
/// once where its writer thread could not start.
struct FrameEvents {
    sender: Sender,
    call: u64,
    latest: Option<Arc<LatestProgress>>,
}

impl JobEvents for FrameEvents {
    fn chunk(&self, chunk: RawJson) {
        let write = || {
            self.sender
                .send(Kind::Chunk, 0, self.call, &[chunk.get().as_bytes()]);
        };
        match &self.latest {
            Some(latest) => latest.after_pending(self.call, write),
            None => write(),
        }
    }

    fn progress(&self, progress: RawJson) {
        match &self.latest {
            Some(latest) => latest.report(self.call, progress),
            None => send_progress(&self.sender, self.call, &progress),
        }
    }
}

fn send_progress(sender: &Sender, call: u64, progress: &RawJson) {
    sender.send(Kind::Progress, 0, call, &[progress.get().as_bytes()]);
}

/// Ends the runner at once, saying why on stderr (the host shows it as the runner's last
/// output): nothing can be sent any more. `_exit` runs no exit handlers, which could touch
/// state the handler's threads are using.
fn channel_broken(error: &dyn std::fmt::Display) -> ! {
    eprintln!(
        "worker-host runner: the channel to the host broke ({error}); did the handler close a file descriptor it does not own?"
    );
    crate::handler::inproc::exit_immediately(crate::exit::JOB_FAILED.into())
}

/// Loads the library, runs `init` on this (the main) thread, then serves jobs until Shutdown.
/// Returns at the channel's end (Err) or after a failed load (Ok).
fn serve(channel: UnixStream, arguments: &Arguments) -> Result<(), protocol::ReadError> {
    let sender = Sender(Arc::new(Mutex::new(channel.try_clone()?)));
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, channel);
    let library: &'static HandlerLibrary =
        match HandlerLibrary::load(&arguments.path, arguments.limits) {
            // Never unloaded (see `inproc::library`): leaking it makes it 'static for the job threads.
            Ok(library) => Box::leak(Box::new(library)),
            Err(error) => {
                sender.send_json(Kind::Failed, &error);
                return Ok(());
            }
        };
    sender.send_json(Kind::Loaded, library.info());
    // Until `init` succeeds only Init and Shutdown can come.
    loop {
        let frame = read_frame(&mut reader, u64::MAX)?;
        match frame.kind {
            Kind::Init => {
                let config = String::from_utf8_lossy(&frame.body);
                let log = FrameLog {
                    sender: sender.clone(),
                    call: 0,
                };
                match library.init(&config, &log) {
                    Ok(()) => {
                        // The facts after init: the features it reported (ABI 1.1), if any.
                        sender.send_json(Kind::Ready, library.info());
                        break;
                    }
                    Err(error) => sender.send_json(Kind::Failed, &error),
                }
            }
            // `teardown` runs only after a successful `init` (the header promises it).
            Kind::Shutdown => {
                sender.send(Kind::TornDown, 0, 0, &[]);
                return Ok(());
            }
            other => {
                return Err(protocol::ReadError::Invalid(format!(
                    "a {other:?} frame before init succeeded"
                )))
            }
        }
    }
    let progress_sender = sender.clone();
    let latest_progress =
        LatestProgress::start(move |call, value| send_progress(&progress_sender, call, value))
            .inspect_err(|error| {
                eprintln!("worker-host runner: progress is sent uncoalesced: {error}");
            })
            .ok();
    let serving = Arc::new(Serving {
        library,
        sender,
        latest_progress,
        reader: Mutex::new(reader),
        waiting: AtomicUsize::new(0),
        cancels: Mutex::new(HashMap::new()),
        running: Mutex::new(0),
        finished: Condvar::new(),
        shutting_down: AtomicBool::new(false),
    });
    // Jobs run on threads with 8 MiB of stack, not on this one (its stack is what the limit
    // says); the runner ends from those threads.
    if !start_follower(&serving) {
        channel_broken(&"no job thread could be started");
    }
    loop {
        std::thread::park();
    }
}

/// What the runner's threads share once the handler is ready.
///
/// The threads take turns reading the channel (leader and followers): the one holding `reader`
/// reads frames; when it reads a job it hands the reader to a waiting thread (starting one if
/// none waits) and runs the job itself, with no hand-off between reading a job and starting it.
/// So a job starts on the thread that read it, and the channel is always being read (a Cancel
/// gets through while every job runs).
struct Serving {
    library: &'static HandlerLibrary,
    sender: Sender,
    /// The jobs' latest unsent progress (`None` if its writer thread could not start).
    latest_progress: Option<Arc<LatestProgress>>,
    reader: Mutex<std::io::BufReader<UnixStream>>,
    /// Threads waiting for their turn at the reader.
    waiting: AtomicUsize,
    /// The cancel token of each running job.
    cancels: Mutex<HashMap<u64, CancelToken>>,
    /// Jobs running, and its change (teardown waits for none).
    running: Mutex<usize>,
    finished: Condvar,
    shutting_down: AtomicBool,
}

/// One thread's turns at the reader; a job read is run on this thread. Returns only at the
/// channel's end (Err).
fn follow(serving: &Arc<Serving>) -> Result<(), protocol::ReadError> {
    loop {
        serving.waiting.fetch_add(1, Ordering::AcqRel);
        let mut reader = lock(&serving.reader);
        serving.waiting.fetch_sub(1, Ordering::AcqRel);
        let frame = read_frame(&mut *reader, u64::MAX)?;
        match frame.kind {
            Kind::Job if serving.shutting_down.load(Ordering::Acquire) => {
                let failure = Failure::new(
                    "WorkerShutdown",
                    "the worker is shutting down: the handler takes no more jobs",
                );
                let body = serde_json::to_vec(&failure).expect("plain data serializes");
                serving
                    .sender
                    .send(Kind::Done, Outcome::Failed as u8, frame.call, &[&body]);
            }
            Kind::Job => {
                let cancel = CancelToken::new();
                lock(&serving.cancels).insert(frame.call, cancel.clone());
                *lock(&serving.running) += 1;
                // Hand the reader on; if no thread can be started, this job runs with the reader
                // held (a Cancel for it waits, but nothing is lost).
                if serving.waiting.load(Ordering::Acquire) > 0 || start_follower(serving) {
                    drop(reader);
                }
                let call = frame.call;
                run_job(serving, frame, &cancel);
                lock(&serving.cancels).remove(&call);
                *lock(&serving.running) -= 1;
                serving.finished.notify_all();
            }
            Kind::Cancel => {
                if let Some(cancel) = lock(&serving.cancels).get(&frame.call) {
                    cancel.cancel();
                }
            }
            Kind::Shutdown => {
                if !serving.shutting_down.swap(true, Ordering::AcqRel) {
                    start_teardown(serving);
                }
            }
            other => {
                return Err(protocol::ReadError::Invalid(format!(
                    "a {other:?} frame from the host"
                )))
            }
        }
    }
}

/// Starts another thread (8 MiB of stack) to take its turns at the reader; false (said on
/// stderr) when none can be started.
fn start_follower(serving: &Arc<Serving>) -> bool {
    let serving = serving.clone();
    let spawned = std::thread::Builder::new()
        .name("handler-job".into())
        .stack_size(JOB_STACK_SIZE)
        .spawn(move || {
            if let Err(error) = follow(&serving) {
                host_gone(&error);
            }
        });
    match spawned {
        Ok(_) => true,
        Err(error) => {
            eprintln!("worker-host runner: cannot start a job thread: {error}");
            false
        }
    }
}

/// Waits for the running jobs (they finish, or are cancelled and hard-stopped by the host) on a
/// thread of its own while the channel is read on, so the host is never blocked writing to it;
/// then runs `teardown`, says so, and exits.
fn start_teardown(serving: &Arc<Serving>) {
    let serving = serving.clone();
    let spawned = std::thread::Builder::new()
        .name("teardown".into())
        .stack_size(JOB_STACK_SIZE)
        .spawn(move || {
            let mut running = lock(&serving.running);
            while *running > 0 {
                running = serving
                    .finished
                    .wait(running)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(running);
            let log = FrameLog {
                sender: serving.sender.clone(),
                call: 0,
            };
            serving.library.teardown(&log);
            crate::handler::inproc::flush_c_stdio();
            serving.sender.send(Kind::TornDown, 0, 0, &[]);
            std::process::exit(0)
        });
    if let Err(error) = spawned {
        channel_broken(&error);
    }
}

/// The channel ended or broke while a follower read it: nothing is left to serve.
fn host_gone(error: &protocol::ReadError) -> ! {
    match error {
        protocol::ReadError::Closed => crate::handler::inproc::exit_immediately(0),
        other => channel_broken(other),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs one job and sends its Done frame (after its last progress).
fn run_job(serving: &Serving, frame: Frame, cancel: &CancelToken) {
    let (library, sender) = (serving.library, &serving.sender);
    let call = frame.call;
    // The frame's body and the input's copy are kept buffers when big: given back when the
    // job is done, for the next job's.
    let body = GivenBackOnDrop(frame.body);
    let parts = protocol::split_job_body(&body.0);
    // The handler is promised a NUL after the input: its one copy in the runner.
    let input = parts.as_ref().map(|parts| {
        let mut input = crate::buffers::take(parts.input.len() + 1);
        input.extend_from_slice(parts.input);
        input.push(0);
        GivenBackOnDrop(input)
    });
    let text = parts
        .zip(input.as_ref())
        .and_then(|(parts, input)| JobText::new(parts.id, &input.0, parts.job_json));
    let result = match text {
        Some(text) => {
            let events = FrameEvents {
                sender: sender.clone(),
                call,
                latest: serving.latest_progress.clone(),
            };
            let log = FrameLog {
                sender: sender.clone(),
                call,
            };
            let run = std::panic::AssertUnwindSafe(|| library.run(&text, &events, cancel, &log));
            std::panic::catch_unwind(run).unwrap_or_else(|_| job::JobResult {
                outcome: job::Outcome::Failed {
                    failure: Failure::new("WorkerError", "the runner failed while running the job"),
                    streaming: false,
                },
                recycle: false,
            })
        }
        None => job::JobResult {
            outcome: job::Outcome::Failed {
                failure: Failure::new("WorkerError", "the runner received a malformed job"),
                streaming: false,
            },
            recycle: false,
        },
    };
    // What the handler printed with C's stdio sits in its buffers (block-buffered on a pipe)
    // until flushed: push it out now, so it is logged with this job and not at the exit.
    crate::handler::inproc::flush_c_stdio();
    let recycle = if result.recycle { RECYCLE } else { 0 };
    let done = || match &result.outcome {
        job::Outcome::Output(output) => sender.send(
            Kind::Done,
            Outcome::Output as u8 | recycle,
            call,
            &[output.json().as_bytes()],
        ),
        job::Outcome::Streamed => {
            sender.send(Kind::Done, Outcome::Streamed as u8 | recycle, call, &[]);
        }
        job::Outcome::Failed { failure, .. } => {
            let body = serde_json::to_vec(failure).expect("plain data serializes");
            sender.send(Kind::Done, Outcome::Failed as u8 | recycle, call, &[&body]);
        }
    };
    match &serving.latest_progress {
        Some(latest) => latest.after_pending(call, done),
        None => done(),
    }
}
