//! One admitted request's job (see `admission` for how it got a slot): running it on the handler
//! (a handler in this process on a blocking thread, never on the runtime), and the answer.
//!
//! - A handler that does not stream: 200 with its output as the body, exactly as it returned it;
//!   a failure 500 with the queue worker's job-done error body (`{"error": "<the SDK's error
//!   payload as a JSON string>"}`).
//! - A streaming handler: Server-Sent Events (`data: <chunk>` per chunk) when the request accepts
//!   `text/event-stream`, else chunked `application/x-ndjson` (one chunk per line); each chunk goes
//!   out as the handler emits it. A failure before the first chunk is a plain 500; one after it
//!   ends the stream with an `event: error` (SSE) or an `{"error": ...}` line (NDJSON).
//!
//! A client that goes away (its connection closes while it waits or streams) cancels its job
//! softly: the handler's `is_cancelled` turns true, and one that ignores it runs on, its result
//! dropped; its runner is never killed for it, which would fail every other job on it. A client
//! that stops reading a stream has its job cancelled the same way once more than
//! [`MAX_UNREAD_STREAM_BYTES`] of chunks wait for it, and its stream ends with an error. A job's
//! slot stays taken until its handler has returned, so no more than `--concurrency` handler calls
//! ever run at once.

use super::{Phase, ServeState};
use crate::handler::{CancelToken, JobEvents};
use crate::http::error_answer;
use crate::job::{job_done_body, Failure, Job, JobResult, Outcome, RawJson};
use crate::metrics::{self, JobOutcome, RefusalReason};
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The most bytes of chunks a stream may hold that its client has not read yet; past that the
/// job is cancelled (softly) and the stream ends with an error, so a client that stops reading
/// cannot make the host hold a fast handler's whole output.
const MAX_UNREAD_STREAM_BYTES: usize = 64 * 1024 * 1024;

/// What the handler thread sends to the request. Kept small (the result boxed): the request's
/// channel allocates room for 32 messages when it is made.
enum Message {
    Chunk(RawJson),
    /// The client did not read fast enough: [`MAX_UNREAD_STREAM_BYTES`] were waiting.
    Overflow,
    Done(Box<JobResult>),
}

/// Where a job's chunks and result go: the request's channel, with the bytes of chunks sent and
/// not yet written to the client counted.
struct ChannelEvents {
    sender: mpsc::UnboundedSender<Message>,
    unread: Arc<AtomicUsize>,
    cancel: CancelToken,
    overflowed: std::sync::atomic::AtomicBool,
}

impl JobEvents for ChannelEvents {
    fn chunk(&self, chunk: RawJson) {
        if self.overflowed.load(Ordering::Acquire) {
            return;
        }
        let size = chunk.get().len();
        if self.unread.fetch_add(size, Ordering::AcqRel) + size > MAX_UNREAD_STREAM_BYTES {
            self.overflowed.store(true, Ordering::Release);
            self.cancel.cancel_softly();
            let _ = self.sender.send(Message::Overflow);
            return;
        }
        let _ = self.sender.send(Message::Chunk(chunk));
    }

    // Progress has no place in an HTTP answer.
    fn progress(&self, _progress: RawJson) {}
}

/// How the stream of a streaming handler is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamFormat {
    /// Server-Sent Events.
    EventStream,
    /// One JSON chunk per line.
    NdJson,
}

impl StreamFormat {
    /// SSE when the request's `Accept` names `text/event-stream`, else NDJSON.
    pub(super) fn for_accept(accept: Option<&HeaderValue>) -> Self {
        let wants_events = accept
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .split(',')
                    .any(|kind| kind.trim().starts_with("text/event-stream"))
            });
        if wants_events {
            Self::EventStream
        } else {
            Self::NdJson
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::EventStream => "text/event-stream",
            Self::NdJson => "application/x-ndjson",
        }
    }

    /// One chunk, framed. A JSON text's raw line breaks are whitespace (inside strings they are
    /// escaped), so they become spaces and a chunk is always one line.
    fn chunk(self, chunk: &str) -> String {
        let line = one_line(chunk);
        match self {
            Self::EventStream => format!("data: {line}\n\n"),
            Self::NdJson => format!("{line}\n"),
        }
    }

    /// The end of a stream that failed, framed.
    fn failure(self, error_body: &str) -> String {
        let line = one_line(error_body);
        match self {
            Self::EventStream => format!("event: error\ndata: {line}\n\n"),
            Self::NdJson => format!("{line}\n"),
        }
    }
}

/// `json` on one line for any line splitter: raw CR and LF are whitespace in JSON text and become
/// spaces; U+0085, U+2028 and U+2029 (which some splitters, Python's `str.splitlines` among them,
/// also break at) can only be inside strings, where their `\u` escapes mean the same.
fn one_line(json: &str) -> std::borrow::Cow<'_, str> {
    const BREAKS: [char; 5] = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    if !json.contains(BREAKS) {
        return json.into();
    }
    let mut line = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '\n' | '\r' => line.push(' '),
            '\u{85}' => line.push_str("\\u0085"),
            '\u{2028}' => line.push_str("\\u2028"),
            '\u{2029}' => line.push_str("\\u2029"),
            other => line.push(other),
        }
    }
    line.into()
}

/// Cancels the job when dropped before it ended (the client went away), and counts and logs
/// (in the job's span, as the queue worker does) how it ended.
struct JobGuard {
    cancel: CancelToken,
    ended: bool,
    span: tracing::Span,
    /// Where the job counts as running, and its number there (marked abandoned at a drop).
    running: Arc<ServeState>,
    number: u64,
}

impl JobGuard {
    fn new(cancel: CancelToken, running: Arc<ServeState>, number: u64) -> Self {
        Self {
            cancel,
            ended: false,
            span: tracing::Span::current(),
            running,
            number,
        }
    }

    fn end(&mut self, outcome: JobOutcome) {
        self.end_with(outcome, None);
    }

    /// Ends a job whose result is `result`, a failure (named in the log line).
    fn end_failed(&mut self, result: &JobResult) {
        match &result.outcome {
            Outcome::Failed { failure, .. } => self.end_with(JobOutcome::failed, Some(failure)),
            _ => self.end(JobOutcome::failed),
        }
    }

    fn end_with(&mut self, outcome: JobOutcome, failure: Option<&Failure>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if outcome == JobOutcome::cancelled {
            // Its client did not read its stream: given up as a client that went away is.
            self.running.running_jobs.abandoned(self.number);
        }
        metrics::get().job_ended(outcome);
        let _entered = self.span.enter();
        match (outcome, failure) {
            (JobOutcome::failed, Some(failure)) => tracing::error!(
                "Finished: the job failed ({}: {}).",
                failure.error_type,
                failure.message.lines().next().unwrap_or_default()
            ),
            (JobOutcome::failed, None) => tracing::error!("Finished: the job failed."),
            (JobOutcome::cancelled, _) => tracing::info!("Finished: the job was cancelled."),
            _ => tracing::info!("Finished."),
        }
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.ended {
            // Softly: a handler that ignores it runs on rather than its runner being killed
            // with every other job on it (unless such jobs come to hold every slot: see
            // `abandoned`).
            self.running.running_jobs.abandoned(self.number);
            self.cancel.cancel_softly();
            let _entered = self.span.enter();
            tracing::info!("The client went away: the job is cancelled.");
            metrics::get().job_ended(JobOutcome::cancelled);
        }
    }
}

/// Runs `job` and answers with its output, its stream or its failure.
pub(super) async fn run(
    state: Arc<ServeState>,
    job: Job,
    permit: OwnedSemaphorePermit,
    format: StreamFormat,
) -> Response {
    let id = job.id().to_owned();
    let request_id = HeaderValue::from_str(&id).ok();
    let mut response = run_job(state, job, permit, format).await;
    if let Some(request_id) = request_id {
        response.headers_mut().insert("x-request-id", request_id);
    }
    response
}

async fn run_job(
    state: Arc<ServeState>,
    job: Job,
    permit: OwnedSemaphorePermit,
    format: StreamFormat,
) -> Response {
    // The handler to run on, or why there is none: a refusal, before any job runs.
    let leased = async {
        // A request that came during init waits for it.
        let mut phase = state.phase.clone();
        let started = tokio::select! {
            phase = phase.wait_for(|phase| !matches!(phase, Phase::Starting)) => phase.map(|phase| phase.clone()),
            () = state.stop_jobs.cancelled() => return Err(shutting_down()),
        };
        let live = match started {
            Ok(Phase::Serving(live)) => live,
            Ok(Phase::Failed) => {
                return Err(error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the handler's init failed: this worker cannot serve",
                ))
            }
            _ => return Err(shutting_down()),
        };
        let lease = tokio::select! {
            lease = live.next_lease() => lease,
            () = state.stop_jobs.cancelled() => return Err(shutting_down()),
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(reason) => {
                return Err(error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the handler cannot serve: {reason}"),
                ))
            }
        };
        let build_slot = tokio::select! {
            slot = lease.slot() => slot,
            () = state.stop_jobs.cancelled() => return Err(shutting_down()),
        };
        Ok((lease, build_slot))
    };
    let (lease, build_slot) = match leased.await {
        Ok(leased) => leased,
        Err(refusal) => return counted(refusal),
    };
    let streaming = lease.info().streaming;
    let cancel = CancelToken::new();
    let number = state.running_jobs.started(cancel.clone());
    let mut guard = JobGuard::new(cancel.clone(), state.clone(), number);
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let unread = Arc::new(AtomicUsize::new(0));
    let events = ChannelEvents {
        sender,
        unread: unread.clone(),
        cancel: cancel.clone(),
        overflowed: false.into(),
    };
    tracing::info!("Started.");
    let running = state.clone();
    crate::handler::spawn_job(
        lease,
        build_slot,
        job,
        events,
        cancel,
        move |result, events| {
            // The result is on its way before the slot frees (a shutdown waits for the slots, and
            // then ends what is still running), and the slot frees only once the handler returned.
            let _ = events.sender.send(Message::Done(Box::new(result)));
            running.running_jobs.ended(number);
            drop(permit);
        },
    );

    let first = tokio::select! {
        biased;
        message = receiver.recv() => message,
        () = state.stop_jobs.cancelled() => {
            guard.cancel.cancel();
            guard.end_failed(&shutdown_result());
            let text = failure_text(&state, &shutdown_result());
            return crate::http::json_answer(StatusCode::SERVICE_UNAVAILABLE, text);
        }
    };
    match first {
        None => {
            guard.end(JobOutcome::failed);
            failure_answer(
                &state,
                Failure::new("WorkerError", "the handler thread ended without a result"),
            )
        }
        Some(Message::Done(result)) => {
            if result.is_failure() {
                guard.end_failed(&result);
            } else {
                guard.end(JobOutcome::completed);
            }
            finished(&state, *result, streaming, format)
        }
        Some(Message::Chunk(chunk)) => stream(state, guard, receiver, unread, chunk, format),
        // Cannot come first: a chunk over the whole limit is refused by the handler's own
        // chunk limit (--max-chunk-bytes) long before.
        Some(Message::Overflow) => {
            guard.end(JobOutcome::cancelled);
            failure_answer(&state, overflow_failure())
        }
    }
}

/// The answer of a job that ended before it streamed anything.
fn finished(
    state: &ServeState,
    result: JobResult,
    streaming: bool,
    format: StreamFormat,
) -> Response {
    if result.is_failure() {
        return error_body(state, &result);
    }
    match result.outcome {
        Outcome::Output(output) if !streaming => {
            crate::http::json_answer(StatusCode::OK, output.into_json_bytes())
        }
        // A streaming handler that emitted nothing: an empty stream.
        _ => stream_answer(format, Body::empty()),
    }
}

/// A 500 with the queue worker's job-done error body for `result` (a failure).
fn error_body(state: &ServeState, result: &JobResult) -> Response {
    let text = failure_text(state, result);
    crate::http::json_answer(StatusCode::INTERNAL_SERVER_ERROR, text)
}

/// The job-done body of a failed result, in the non-streaming shape.
fn failure_text(state: &ServeState, result: &JobResult) -> String {
    let plain = match &result.outcome {
        Outcome::Failed { failure, .. } => JobResult::failed(failure.clone(), false),
        other => JobResult {
            outcome: other.clone(),
            recycle: false,
        },
    };
    job_done_body(plain, &state.config.origin, None, false).text
}

fn failure_answer(state: &ServeState, failure: Failure) -> Response {
    error_body(state, &JobResult::failed(failure, false))
}

fn stream_answer(format: StreamFormat, body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// What a streamed answer still has to write.
struct Streaming {
    state: Arc<ServeState>,
    guard: JobGuard,
    receiver: mpsc::UnboundedReceiver<Message>,
    /// Bytes of chunks sent and not yet written out.
    unread: Arc<AtomicUsize>,
    first: Option<RawJson>,
    format: StreamFormat,
    done: bool,
}

/// A 200 whose body is the job's chunks as they come; dropping it (the client went away)
/// cancels the job.
fn stream(
    state: Arc<ServeState>,
    guard: JobGuard,
    receiver: mpsc::UnboundedReceiver<Message>,
    unread: Arc<AtomicUsize>,
    first: RawJson,
    format: StreamFormat,
) -> Response {
    let streaming = Streaming {
        state,
        guard,
        receiver,
        unread,
        first: Some(first),
        format,
        done: false,
    };
    let chunks = futures_util::stream::unfold(streaming, |mut streaming| async move {
        if let Some(first) = streaming.first.take() {
            streaming
                .unread
                .fetch_sub(first.get().len(), Ordering::AcqRel);
            let text = streaming.format.chunk(first.get());
            return Some((Ok::<_, std::convert::Infallible>(text), streaming));
        }
        if streaming.done {
            return None;
        }
        // The end of the shutdown grace first: a handler that streams without pause would
        // otherwise keep it waiting.
        let message = tokio::select! {
            biased;
            () = streaming.state.stop_jobs.cancelled() => {
                streaming.guard.cancel.cancel();
                streaming.guard.end_failed(&shutdown_result());
                streaming.done = true;
                let text = failure_text(&streaming.state, &shutdown_result());
                return Some((Ok(streaming.format.failure(&text)), streaming));
            }
            message = streaming.receiver.recv() => message,
        };
        match message {
            Some(Message::Chunk(chunk)) => {
                streaming
                    .unread
                    .fetch_sub(chunk.get().len(), Ordering::AcqRel);
                let text = streaming.format.chunk(chunk.get());
                Some((Ok(text), streaming))
            }
            Some(Message::Overflow) => {
                streaming.guard.end(JobOutcome::cancelled);
                streaming.done = true;
                let failure = JobResult::failed(overflow_failure(), false);
                let text = failure_text(&streaming.state, &failure);
                Some((Ok(streaming.format.failure(&text)), streaming))
            }
            Some(Message::Done(result)) if result.is_failure() => {
                streaming.guard.end_failed(&result);
                streaming.done = true;
                let text = failure_text(&streaming.state, &result);
                Some((Ok(streaming.format.failure(&text)), streaming))
            }
            Some(Message::Done(_)) => {
                streaming.guard.end(JobOutcome::completed);
                None
            }
            None => {
                streaming.guard.end(JobOutcome::failed);
                None
            }
        }
    });
    stream_answer(format, Body::from_stream(chunks))
}

fn overflow_failure() -> Failure {
    Failure::new(
        "StreamNotRead",
        format!(
            "the client read the stream too slowly: over {} MiB of chunks were waiting for it, so the job was cancelled",
            MAX_UNREAD_STREAM_BYTES / (1024 * 1024)
        ),
    )
}

fn shutdown_result() -> JobResult {
    JobResult::failed(
        Failure::new("WorkerShutdown", "worker shut down before the job finished"),
        false,
    )
}

/// `refusal` (an answer to a request that ran no job), counted in the metrics by its status.
pub(super) fn counted(refusal: Response) -> Response {
    let reason = match refusal.status() {
        StatusCode::TOO_MANY_REQUESTS => RefusalReason::busy,
        StatusCode::PAYLOAD_TOO_LARGE => RefusalReason::too_large,
        StatusCode::REQUEST_TIMEOUT => RefusalReason::slow_body,
        StatusCode::UNAUTHORIZED => RefusalReason::unauthorized,
        StatusCode::SERVICE_UNAVAILABLE => RefusalReason::unavailable,
        _ => RefusalReason::bad_request,
    };
    metrics::get().request_refused(reason);
    refusal
}

/// The answer to a job the worker will not run because it is shutting down.
pub(super) fn shutting_down() -> Response {
    error_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        "the worker is shutting down and takes no new jobs",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SSE is chosen only when the client accepts it; chunks are one line in either format.
    #[test]
    fn chunks_are_framed_one_per_line() {
        let sse = HeaderValue::from_static("application/json, text/event-stream;q=0.9");
        assert_eq!(
            StreamFormat::for_accept(Some(&sse)),
            StreamFormat::EventStream
        );
        assert_eq!(StreamFormat::for_accept(None), StreamFormat::NdJson);
        let json = HeaderValue::from_static("application/json");
        assert_eq!(StreamFormat::for_accept(Some(&json)), StreamFormat::NdJson);
        let pretty = "{\n  \"a\": \"x\\ny\"\n}";
        assert_eq!(
            StreamFormat::NdJson.chunk(pretty),
            "{   \"a\": \"x\\ny\" }\n"
        );
        assert_eq!(StreamFormat::EventStream.chunk("[1]"), "data: [1]\n\n");
        assert_eq!(
            StreamFormat::EventStream.failure("{\"error\":\"e\"}"),
            "event: error\ndata: {\"error\":\"e\"}\n\n"
        );
    }
}
