//! The runner's own main: `worker-host __worker-host-runner HOST_PID MAX_OUTPUT_BYTES PATH`, started
//! by the host's supervisor, never by a user. It loads the library, then serves the channel on
//! its stdin (see the [parent module](super) for the frames) until the host says Shutdown or the
//! channel closes.
//!
//! `init` and `teardown` run on the main thread, as they do in the host with `--isolation none`;
//! each job runs on a thread of a small pool, with 8 MiB of stack, as the header promises.

use super::protocol::{self, read_frame, write_frame, Frame, Kind, Outcome, RECYCLE};
use crate::handler::inproc::{HandlerLibrary, HandlerLog, JobText};
use crate::handler::{CancelToken, JobEvents, Limits};
use crate::job::{self, Failure, RawJson};
use handler_abi::ffi;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// The stack of every job thread: the main thread's default on Linux, as the header promises.
const JOB_STACK_SIZE: usize = 8 * 1024 * 1024;

/// What the runner's command line says.
struct Arguments {
    host_pid: i32,
    limits: Limits,
    path: PathBuf,
}

fn parse(arguments: &[OsString]) -> Option<Arguments> {
    let [host_pid, max_output_bytes, path] = arguments else {
        return None;
    };
    Some(Arguments {
        host_pid: host_pid.to_str()?.parse().ok()?,
        limits: Limits {
            max_output_bytes: max_output_bytes.to_str()?.parse().ok()?,
        },
        path: PathBuf::from(path),
    })
}

/// Runs the runner with the arguments after [`super::RUNNER_ARGUMENT`]; returns its exit code.
pub fn main(arguments: &[OsString]) -> ExitCode {
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

    /// Sends a frame. A failed write means the host is gone; the runner is about to be killed
    /// (parent death), so the frame is dropped.
    fn send(&self, kind: Kind, flags: u8, call: u64, parts: &[&[u8]]) {
        let mut channel = self.lock();
        if write_frame(&mut *channel, kind, flags, call, parts).is_err() {
            let _ = channel.flush();
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

/// A job's chunks and progress, sent as frames.
struct FrameEvents {
    sender: Sender,
    call: u64,
}

impl JobEvents for FrameEvents {
    fn chunk(&self, chunk: RawJson) {
        self.sender
            .send(Kind::Chunk, 0, self.call, &[chunk.get().as_bytes()]);
    }

    fn progress(&self, progress: RawJson) {
        self.sender
            .send(Kind::Progress, 0, self.call, &[progress.get().as_bytes()]);
    }
}

/// Loads the library and serves the channel until Shutdown (Ok) or its end (Err).
fn serve(channel: UnixStream, arguments: &Arguments) -> Result<(), protocol::ReadError> {
    let sender = Sender(Arc::new(Mutex::new(channel.try_clone()?)));
    let mut reader = channel;
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
    let cancels: Arc<Mutex<HashMap<u64, CancelToken>>> = Arc::default();
    let pool = Pool::default();
    // `teardown` runs only after a successful `init` (the header promises it).
    let mut initialised = false;
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
                        initialised = true;
                        sender.send(Kind::Ready, 0, 0, &[]);
                    }
                    Err(error) => sender.send_json(Kind::Failed, &error),
                }
            }
            Kind::Job => {
                let cancel = CancelToken::new();
                lock(&cancels).insert(frame.call, cancel.clone());
                let sender = sender.clone();
                let cancels = cancels.clone();
                pool.run(Box::new(move || {
                    let call = frame.call;
                    run_job(library, frame, &cancel, &sender);
                    lock(&cancels).remove(&call);
                }));
            }
            Kind::Cancel => {
                if let Some(cancel) = lock(&cancels).get(&frame.call) {
                    cancel.cancel();
                }
            }
            Kind::Shutdown => {
                pool.wait_idle();
                let log = FrameLog {
                    sender: sender.clone(),
                    call: 0,
                };
                if initialised {
                    library.teardown(&log);
                }
                sender.send(Kind::TornDown, 0, 0, &[]);
                return Ok(());
            }
            other => {
                return Err(protocol::ReadError::Invalid(format!(
                    "a runner frame ({other:?}) from the host"
                )))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs one job and sends its Done frame.
fn run_job(library: &HandlerLibrary, frame: Frame, cancel: &CancelToken, sender: &Sender) {
    let call = frame.call;
    let text = protocol::split_job_body(&frame.body)
        .and_then(|(id, input, job_json)| JobText::new(id, input, job_json));
    let result = match text {
        Some(text) => {
            let events = FrameEvents {
                sender: sender.clone(),
                call,
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
    match &result.outcome {
        job::Outcome::Output(output) => sender.send(
            Kind::Done,
            Outcome::Output as u8 | recycle,
            call,
            &[output.get().as_bytes()],
        ),
        job::Outcome::Streamed => {
            sender.send(Kind::Done, Outcome::Streamed as u8 | recycle, call, &[]);
        }
        job::Outcome::Failed { failure, .. } => {
            let body = serde_json::to_vec(failure).expect("plain data serializes");
            sender.send(Kind::Done, Outcome::Failed as u8 | recycle, call, &[&body]);
        }
    }
}

/// A unit of work for the pool.
type Work = Box<dyn FnOnce() + Send>;

/// Job threads, kept for the next job: a thread per job would cost a spawn each time.
#[derive(Default)]
struct Pool {
    queue: Mutex<Option<mpsc::Sender<Work>>>,
    receiver: Arc<Mutex<Option<mpsc::Receiver<Work>>>>,
    /// Threads waiting for work that no job has claimed yet.
    idle: Arc<AtomicUsize>,
    /// Jobs not finished, and its change.
    busy: Arc<(Mutex<usize>, Condvar)>,
}

impl Pool {
    fn run(&self, work: Work) {
        let mut queue = lock(&self.queue);
        let sender = queue.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel();
            *lock(&self.receiver) = Some(receiver);
            sender
        });
        *lock(&self.busy.0) += 1;
        // Claim an idle thread, or start one: each job must have a thread of its own at once.
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |idle| {
                idle.checked_sub(1)
            })
            .is_ok();
        if !claimed {
            let receiver = self.receiver.clone();
            let idle = self.idle.clone();
            let busy = self.busy.clone();
            let spawned = std::thread::Builder::new()
                .name("handler-job".into())
                .stack_size(JOB_STACK_SIZE)
                .spawn(move || loop {
                    let work = {
                        let receiver = lock(&receiver);
                        match receiver.as_ref().map(mpsc::Receiver::recv) {
                            Some(Ok(work)) => work,
                            _ => return,
                        }
                    };
                    work();
                    *lock(&busy.0) -= 1;
                    busy.1.notify_all();
                    idle.fetch_add(1, Ordering::AcqRel);
                });
            if let Err(error) = spawned {
                eprintln!("worker-host runner: cannot start a job thread: {error}");
                std::process::abort();
            }
        }
        let _ = sender.send(work);
    }

    /// Waits until every job has finished.
    fn wait_idle(&self) {
        let mut busy = lock(&self.busy.0);
        while *busy > 0 {
            busy = self
                .busy
                .1
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}
