//! One runner process as the host sees it ([`Runner`]): its channel's writing end, the jobs on
//! it ([`Call`], each with a [`JobSender`] to whoever waits for it), how its end is reported
//! ([`EndReport`]), and whose job its output lines belong to. Started by the supervisor, read by
//! the reader thread, written by the jobs.

use super::capture::{Capture, LineContext};
use super::crash::{KillReason, OomCounter};
use super::protocol::{self, write_frame, Kind};
use super::reaper;
use crate::job::{Failure, JobResult, RawJson};
use crate::metrics::RestartReason;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tracing::Span;

/// How long a runner that closed its channel may take to exit before it is killed.
pub(super) const EXIT_WAIT: Duration = Duration::from_secs(2);

/// What a job's thread receives while its job runs on a runner.
#[derive(Debug)]
///
/// Kept small (results and failures boxed): a job's channel allocates room for 32 messages when
/// it is made, once per job.
pub(super) enum ToJob {
    Chunk(RawJson),
    Progress(RawJson),
    Done(Box<JobResult>),
    /// The runner ended before the job did.
    Died(Box<Failure>),
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
    pub(super) generation: u64,
    pub(super) pid: i32,
    pub(super) writer: Mutex<UnixStream>,
    pub(super) calls: Mutex<HashMap<u64, Call>>,
    /// Set when the host kills the runner, so its end is reported as the host's doing.
    pub(super) kill_reason: Mutex<Option<KillReason>>,
    /// Set (under the phase lock) as soon as its channel ends: no job is given to it after.
    pub(super) ended: std::sync::atomic::AtomicBool,
    pub(super) capture: Arc<Capture>,
    pub(super) oom: OomCounter,
    pub(super) oom_kills_before: Option<u64>,
    /// The span of the last job that ran alone, and when it ended: output read just after a job
    /// ended was most likely written by it (the pipes are read on threads of their own).
    pub(super) last_alone: Mutex<Option<(Span, Instant)>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
    pub(super) fn end_call(&self, call: u64) -> Option<Call> {
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
    pub(super) fn failure_for(&self, job_id: &str, all: &[String]) -> Failure {
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
    pub(super) fn output_note(&self) -> String {
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

/// Runs `wait`, which blocks, from a task: on a multi-threaded runtime it first hands this
/// thread's other tasks to another thread (`block_in_place`); elsewhere it just blocks.
pub(super) fn wait_in_place<T>(wait: impl FnOnce() -> T) -> T {
    let multi_threaded = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    if multi_threaded {
        tokio::task::block_in_place(wait)
    } else {
        wait()
    }
}
