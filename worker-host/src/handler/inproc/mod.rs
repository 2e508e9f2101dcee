//! The in-process handler: a shared library loaded into the process that runs it. With
//! `--isolation none` that is the host itself ([`InProcess`]); by default it is the runner
//! process, whose main ([`crate::handler::runner`]) drives the same [`HandlerLibrary`].
//!
//! This module holds the host's only `unsafe` code (with `handler-abi`'s). The rules it relies on
//! are those of `handler-abi/include/worker_host.h`: the descriptor is static; inputs we pass are
//! borrowed for the call; everything the handler passes to a callback is copied before the
//! callback returns.
//! - [`library`]: loading, the descriptor, and the calls into the handler;
//! - `calls`: the registry of live calls that the callbacks look their call up in;
//! - `callbacks`: the callback table (`wh_host_api`) itself.

mod callbacks;
mod calls;
pub mod library;

use super::{CancelToken, Handler, HandlerInfo, HandlerSpec, JobEvents, LoadError, Readiness};
use crate::job::{Job, JobResult, NulTerminated};
use handler_abi::ffi;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::Span;

pub use library::{HandlerLibrary, JobText};

/// Where a handler's log lines (its `log` callback) go.
pub trait HandlerLog: Sync {
    /// One line at the handler's level; called from the handler's threads.
    fn log(&self, level: ffi::wh_log_level, text: &str);
}

/// Logs a handler's lines in a span of this process's log (target `handler`), so that lines from
/// threads the handler started still carry the job's id.
#[derive(Debug)]
pub struct TracingLog(pub Span);

impl HandlerLog for TracingLog {
    fn log(&self, level: ffi::wh_log_level, text: &str) {
        log_in(&self.0, level, text);
    }
}

/// Logs one handler line at its level in `span` (target `handler`).
pub fn log_in(span: &Span, level: ffi::wh_log_level, text: &str) {
    span.in_scope(|| match level {
        ffi::WH_LOG_TRACE => tracing::trace!(target: "handler", "{text}"),
        ffi::WH_LOG_DEBUG => tracing::debug!(target: "handler", "{text}"),
        ffi::WH_LOG_WARN => tracing::warn!(target: "handler", "{text}"),
        ffi::WH_LOG_ERROR => tracing::error!(target: "handler", "{text}"),
        _ => tracing::info!(target: "handler", "{text}"),
    });
}

/// Flushes every C stdio output stream of the process (`fflush(NULL)`): a C handler's `printf`
/// to a pipe is block-buffered, and would otherwise reach the log only when a buffer fills.
pub fn flush_c_stdio() {
    // SAFETY: `fflush(NULL)` is defined by C to flush every output stream; it takes no pointer
    // of ours, and stdio's own locks make it safe to call while handler threads use the streams.
    unsafe { libc::fflush(std::ptr::null_mut()) };
}

/// Ends the process at once with `code` (`_exit`): no exit handlers run, since they could free
/// state that handler threads still use.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: `_exit` takes a plain integer and never returns; it touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// How long [`Handler::shutdown`] waits for calls still running (jobs cancelled at the end of the
/// shutdown grace) before it gives up on them and skips the teardown.
const CANCELLED_CALL_WAIT: Duration = Duration::from_secs(2);

/// A handler loaded into the host's own process (`--isolation none`).
#[derive(Debug)]
pub struct InProcess {
    /// Never unloaded (see `library`), so it can be lent to the `init` thread for good.
    library: &'static HandlerLibrary,
    init_timeout: std::time::Duration,
    /// Whether `init` succeeded: `teardown` runs only then (the header promises it).
    initialised: std::sync::atomic::AtomicBool,
    /// How many `run` calls have not returned.
    running: Mutex<usize>,
    returned: Condvar,
    readiness: tokio::sync::watch::Sender<Readiness>,
}

impl InProcess {
    /// Loads the library at `path` into this process.
    pub fn load(spec: &HandlerSpec) -> Result<Self, LoadError> {
        let library = HandlerLibrary::load(&spec.path, spec.limits)?;
        Ok(Self {
            library: Box::leak(Box::new(library)),
            init_timeout: spec.init_timeout,
            initialised: std::sync::atomic::AtomicBool::new(false),
            running: Mutex::new(0),
            returned: Condvar::new(),
            readiness: tokio::sync::watch::Sender::new(Readiness::Ready),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, usize> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts one `run` call from its start to its return (or unwind).
struct RunningCall<'a>(&'a InProcess);

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        *self.0.running() -= 1;
        self.0.returned.notify_all();
    }
}

impl Handler for InProcess {
    fn info(&self) -> &HandlerInfo {
        self.library.info()
    }

    fn init(&self, config_json: &str) -> Result<(), LoadError> {
        // On a thread of its own, so that an `init` past its deadline fails the start; it cannot
        // be stopped in this process, and goes when the host exits.
        let span = tracing::info_span!("init", handler = %self.info().name);
        let library = self.library;
        let config = config_json.to_owned();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("handler-init".into())
            .stack_size(crate::handler::HANDLER_STACK_SIZE)
            .spawn(move || {
                let _ = done.send(library.init(&config, &TracingLog(span)));
            })
            .map_err(|error| LoadError::InitFailed {
                failure: crate::job::Failure::new(
                    "InitFailed",
                    format!("no thread for init: {error}"),
                ),
            })?;
        match result.recv_timeout(self.init_timeout) {
            Ok(outcome) => outcome?,
            Err(_) => return Err(super::runner::init_timed_out(self.init_timeout)),
        }
        self.initialised
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn run(&self, job: &Job, events: &dyn JobEvents, cancel: &CancelToken) -> JobResult {
        *self.running() += 1;
        let _running = RunningCall(self);
        // The input's only copy in the host: the handler is promised a NUL after it.
        let input = NulTerminated::copy(job.input());
        let [id, job_json] = job.nul_terminated();
        let text = JobText::new(id, input.with_nul(), job_json).expect("each ends with a NUL");
        self.library
            .run(&text, events, cancel, &TracingLog(Span::current()))
    }

    fn readiness(&self) -> tokio::sync::watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }

    fn shutdown(&self) {
        if !self.initialised.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let deadline = Instant::now() + CANCELLED_CALL_WAIT;
        let mut running = self.running();
        while *running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // The ABI promises teardown only after every call has returned, so a C
                // handler's state is never freed under a call still using it.
                tracing::warn!(
                    "Skipping the handler's teardown: a handler call has not returned {CANCELLED_CALL_WAIT:?} after it was asked to stop."
                );
                return;
            }
            running = self
                .returned
                .wait_timeout(running, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(running);
        let span = tracing::info_span!("teardown", handler = %self.info().name);
        self.library.teardown(&TracingLog(span));
    }
}
