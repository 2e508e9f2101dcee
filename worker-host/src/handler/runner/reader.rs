//! The reader thread of one runner: it reads the runner's frames in order, hands a job's
//! chunks, progress and result to whoever waits for that job, and control frames to the
//! supervisor thread; at the channel's end it waits for the exit status, says how the runner
//! ended, and fails every job still on it.

use super::crash::{describe, describe_kill, KillReason, RunnerEnd};
use super::process::{lock, EndReport, Runner, ToJob, EXIT_WAIT};
use super::protocol::{self, read_frame_led, Frame, Kind, ReadError};
use super::reaper;
use super::shared::{Control, Event, Shared};
use crate::job::{JobResult, Outcome, Output, RawJson};
use crate::metrics::RestartReason;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::Span;

/// How long a dead runner's output pipes may take to deliver their last lines.
const LAST_OUTPUT_WAIT: Duration = Duration::from_millis(300);
/// Room for the non-output bytes of a frame (a failure's JSON, a log line) over the output and
/// chunk limits.
const FRAME_OVERHEAD: u64 = 1024 * 1024;

/// The reader thread of one runner: dispatches its frames until the channel ends, then reports
/// the end.
pub(super) fn read_frames(shared: &Shared, runner: &Arc<Runner>, channel: UnixStream) {
    let max_body = shared.spec.limits.largest() as u64 + FRAME_OVERHEAD;
    let mut channel = std::io::BufReader::with_capacity(64 * 1024, channel);
    let read = || loop {
        match read_frame_led(&mut channel, max_body, output_lead) {
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
    };
    // A panic here must not leave the runner's jobs waiting forever: it ends the runner as a
    // broken channel does.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).is_err() {
        runner.kill(KillReason::Protocol(
            "the host's reader of its channel failed".into(),
        ));
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

/// What a frame's body is read after, and the room left after it: a job's output goes straight
/// after the start of its job-done body, with room for the body's end (see [`Output`]).
fn output_lead(kind: Kind, flags: u8) -> (&'static [u8], usize) {
    let output = kind == Kind::Done
        && protocol::Outcome::from_flags(flags) == Some(protocol::Outcome::Output);
    if output {
        (Output::BODY_START.as_bytes(), Output::BODY_END_ROOM)
    } else {
        (b"", 0)
    }
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
                Some(protocol::Outcome::Output) => Outcome::Output(Output::from_body_start(body)?),
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
            entry.to_job.send(ToJob::Done(Box::new(result)));
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
