//! What a finished job produced, and the bodies RunPod receives for it (§6.1–6.3).

use super::output::Output;
use super::{RawJson, RUNPOD_PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Why a job failed, as the handler (or the host on its behalf) reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The error's type, e.g. `ValueError`, `Panic`, `InvalidOutput`.
    pub error_type: String,
    /// What went wrong.
    pub message: String,
    /// Where it went wrong, as the handler reported it (ABI 1.1 `set_error_traceback`; a Rust
    /// panic's location and backtrace): RunPod's `error_traceback`. Empty when there is none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceback: String,
}

impl Failure {
    /// A failure with this type and message, and no traceback.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
            traceback: String::new(),
        }
    }

    /// The same failure with this traceback.
    pub fn with_traceback(mut self, traceback: impl Into<String>) -> Self {
        self.traceback = traceback.into();
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A non-streaming handler succeeded with this output (`null` when it set none).
    Output(Output),
    /// A streaming handler finished; its chunks were delivered as they were emitted.
    Streamed,
    /// The job failed.
    Failed {
        /// Why.
        failure: Failure,
        /// Whether the handler streams: its errors take the SDK's generator error shape.
        streaming: bool,
    },
}

/// A finished job: its outcome, and whether the handler asked for the worker to be recycled.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The outcome.
    pub outcome: Outcome,
    /// The handler called `request_recycle`.
    pub recycle: bool,
}

impl JobResult {
    /// A failed job that asks for no recycle; `streaming` as [`Outcome::Failed`] says.
    pub fn failed(failure: Failure, streaming: bool) -> Self {
        Self {
            outcome: Outcome::Failed { failure, streaming },
            recycle: false,
        }
    }

    /// The result of a job whose handler call panicked in the host itself (caught, so the job
    /// still gets one result).
    pub fn worker_error(streaming: bool) -> Self {
        Self::failed(
            Failure::new("WorkerError", "the worker failed while running the job"),
            streaming,
        )
    }

    /// Whether the platform will see this job as failed.
    pub fn is_failure(&self) -> bool {
        match &self.outcome {
            Outcome::Failed { .. } => true,
            Outcome::Streamed => false,
            Outcome::Output(output) => output.error().is_some(),
        }
    }
}

/// Where an error payload says it came from (`hostname`, `worker_id` in the SDK's shape).
#[derive(Debug, Clone)]
pub struct Origin {
    /// `RUNPOD_POD_HOSTNAME`, or `unknown`.
    pub hostname: String,
    /// `RUNPOD_POD_ID`, or `unknown`.
    pub worker_id: String,
}

impl Default for Origin {
    fn default() -> Self {
        Self {
            hostname: "unknown".into(),
            worker_id: "unknown".into(),
        }
    }
}

/// How a Python traceback (`traceback.format_exc()`) begins.
const PYTHON_TRACEBACK: &str = "Traceback (most recent call last):\n";

/// The SDK's handler-exception payload (§6.1), in its key order.
#[derive(Serialize)]
struct ErrorPayload<'a> {
    error_type: &'a str,
    error_message: &'a str,
    error_traceback: &'a str,
    hostname: &'a str,
    worker_id: &'a str,
    runpod_version: &'a str,
}

/// A job-done body, and whether the platform will see the job as failed (it has an `error`).
#[derive(Debug)]
pub struct JobDoneBody {
    /// The body's JSON text.
    pub text: String,
    /// Whether the body reports a failure: worked out while building it, so a caller need not
    /// read the output again.
    pub failed: bool,
}

/// The job-done body for a finished job (§6.1, §6.2).
///
/// `aggregate` is the list of streamed chunks when the operator asked for aggregated stream
/// results (`return_aggregate_stream`); `force_stop_pod` adds `stopPod` to every result (the
/// SDK's config-level `refresh_worker`).
pub fn job_done_body(
    result: JobResult,
    origin: &Origin,
    aggregate: Option<&[RawJson]>,
    force_stop_pod: bool,
) -> JobDoneBody {
    let stop_pod = result.recycle || force_stop_pod;
    let mut body = BodyMembers::new();
    match result.outcome {
        Outcome::Output(output) => {
            let (text, failed) = output.into_done_body(stop_pod);
            return JobDoneBody { text, failed };
        }
        Outcome::Streamed => {
            let chunks: &[RawJson] = aggregate.unwrap_or(&[]);
            body.push("output", Cow::Owned(to_raw(&chunks)));
        }
        Outcome::Failed {
            failure,
            streaming: true,
        } => {
            // The SDK's generator error: its traceback part is Python's `format_exc()`. A
            // handler's traceback that is one (the Python bridge's) is used as it is; otherwise
            // the part is the error line, then the handler's traceback where it gave one.
            let mut text = format!("handler: {} \ntraceback: ", failure.message);
            if failure.traceback.starts_with(PYTHON_TRACEBACK) {
                text.push_str(&failure.traceback);
            } else {
                text.push_str(&format!("{}: {}", failure.error_type, failure.message));
                if !failure.traceback.is_empty() {
                    text.push('\n');
                    text.push_str(&failure.traceback);
                }
            }
            body.push("error", Cow::Owned(to_raw(&text)));
        }
        Outcome::Failed {
            failure,
            streaming: false,
        } => body.push("error", Cow::Owned(error_payload(&failure, origin))),
    }
    let failed = body.has("error");
    if stop_pod {
        body.push("stopPod", Cow::Owned(to_raw(&true)));
    }
    JobDoneBody {
        text: body.to_json(),
        failed,
    }
}

/// The members of a job-done body, in order: plain keys, and values borrowed where they can be.
pub(super) struct BodyMembers<'a>(Vec<(&'static str, Cow<'a, RawValue>)>);

impl<'a> BodyMembers<'a> {
    pub(super) fn new() -> Self {
        Self(Vec::new())
    }

    pub(super) fn push(&mut self, key: &'static str, value: Cow<'a, RawValue>) {
        self.0.push((key, value));
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(name, _)| *name == key)
    }

    /// The body's JSON text (every key is plain ASCII, written as is).
    pub(super) fn to_json(&self) -> String {
        let length: usize = self
            .0
            .iter()
            .map(|(key, value)| key.len() + value.get().len() + 4)
            .sum();
        let mut text = String::with_capacity(length + 2);
        text.push('{');
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            text.push('"');
            text.push_str(key);
            text.push_str("\":");
            text.push_str(value.get());
        }
        text.push('}');
        text
    }
}

/// The `error` member of a failed non-streaming job: the SDK's payload, as a JSON string.
fn error_payload(failure: &Failure, origin: &Origin) -> RawJson {
    let payload = ErrorPayload {
        error_type: &failure.error_type,
        error_message: &failure.message,
        error_traceback: &failure.traceback,
        hostname: &origin.hostname,
        worker_id: &origin.worker_id,
        runpod_version: RUNPOD_PROTOCOL_VERSION,
    };
    let text = serde_json::to_string(&payload).expect("strings always serialize");
    to_raw(&text)
}

/// The body of a stream chunk POST: `{"output": chunk}`.
pub fn stream_chunk_body(chunk: &RawValue) -> String {
    wrap_output(chunk)
}

/// The body of a progress POST: `{"status": "IN_PROGRESS", "output": progress}`.
pub fn progress_body(progress: &RawValue) -> String {
    let mut body = String::with_capacity(progress.get().len() + 40);
    body.push_str(r#"{"status":"IN_PROGRESS","output":"#);
    body.push_str(progress.get());
    body.push('}');
    body
}

fn wrap_output(value: &RawValue) -> String {
    let mut body = String::with_capacity(value.get().len() + 12);
    body.push_str(Output::BODY_START);
    body.push_str(value.get());
    body.push('}');
    body
}

pub(super) fn to_raw<T: Serialize + ?Sized>(value: &T) -> RawJson {
    serde_json::value::to_raw_value(value).expect("plain values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(text: &str) -> Output {
        Output::read(text.as_bytes()).unwrap()
    }

    fn done(outcome: Outcome, recycle: bool) -> String {
        job_done_body(
            JobResult { outcome, recycle },
            &Origin::default(),
            None,
            false,
        )
        .text
    }

    /// Output objects map to bodies exactly as the SDK's table in §6.1 says.
    #[test]
    fn output_mapping_matches_the_sdk() {
        let cases = [
            (r#"{"a":1}"#, r#"{"output":{"a":1}}"#),
            (r#"{}"#, r#"{}"#),
            (r#""text""#, r#"{"output":"text"}"#),
            (r#"null"#, r#"{"output":null}"#),
            (
                r#"{"error":"bad","x":1}"#,
                r#"{"output":{"x":1},"error":"bad"}"#,
            ),
            (r#"{"error":{"code":3}}"#, r#"{"error":{"code":3}}"#),
            (r#"{"error":"","x":1}"#, r#"{"output":{"x":1}}"#),
            (
                r#"{"refresh_worker":true,"x":1}"#,
                r#"{"output":{"x":1},"stopPod":true}"#,
            ),
        ];
        for (text, body) in cases {
            assert_eq!(
                done(Outcome::Output(output(text)), false),
                body,
                "output {text}"
            );
        }
    }

    /// A handler failure becomes the SDK's JSON-string error payload with its six keys in order.
    #[test]
    fn failure_uses_the_sdk_error_payload() {
        let body = done(
            Outcome::Failed {
                failure: Failure::new("ValueError", "boom ✓"),
                streaming: false,
            },
            true,
        );
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let payload = value["error"].as_str().unwrap();
        assert!(payload.starts_with(r#"{"error_type":"ValueError","error_message":"boom ✓","error_traceback":"","hostname":"unknown","worker_id":"unknown","runpod_version":"1.12.0"}"#));
        assert_eq!(value["stopPod"], true);
    }

    /// A failure's traceback becomes `error_traceback`, and follows the error line of a
    /// streaming handler's error text.
    #[test]
    fn a_traceback_reaches_the_error_payload() {
        let failure = Failure::new("ValueError", "boom").with_traceback("at line 3\nat line 9");
        for streaming in [false, true] {
            let body = done(
                Outcome::Failed {
                    failure: failure.clone(),
                    streaming,
                },
                false,
            );
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            let error = value["error"].as_str().unwrap();
            if streaming {
                assert_eq!(
                    error,
                    "handler: boom \ntraceback: ValueError: boom\nat line 3\nat line 9"
                );
            } else {
                let payload: serde_json::Value = serde_json::from_str(error).unwrap();
                assert_eq!(payload["error_traceback"], "at line 3\nat line 9");
            }
        }
    }

    /// A streaming handler's Python traceback (the Python bridge's) is the traceback part of the
    /// error text by itself, as the SDK's `format_exc()` is: it already ends with the error line.
    #[test]
    fn a_python_traceback_is_a_stream_error_s_whole_traceback_part() {
        let traceback = "Traceback (most recent call last):\n  File \"handler.py\", line 9, in handler\n    raise ValueError(\"boom\")\nValueError: boom\n";
        let failure = Failure::new("<class 'ValueError'>", "boom").with_traceback(traceback);
        let body = done(
            Outcome::Failed {
                failure,
                streaming: true,
            },
            false,
        );
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            value["error"],
            format!("handler: boom \ntraceback: {traceback}")
        );
    }

    /// An output object with a lone surrogate escape in a key ("\ud800", which Python's `json`
    /// reads and writes) still fails the job through its `error` key, as in the SDK; the other
    /// members stay in `output` with their keys exactly as written.
    #[test]
    fn error_key_next_to_a_lone_surrogate_key_fails_the_job() {
        let cases = [
            (
                r#"{"\ud800":1,"error":"bad"}"#,
                r#"{"output":{"\ud800":1},"error":"bad"}"#,
            ),
            (
                r#"{"error":"bad","k\udc00\n":[1]}"#,
                r#"{"output":{"k\udc00\n":[1]},"error":"bad"}"#,
            ),
            (
                r#"{"\ud800":1,"refresh_worker":true}"#,
                r#"{"output":{"\ud800":1},"stopPod":true}"#,
            ),
            (r#"{"\ud800":1}"#, r#"{"output":{"\ud800":1}}"#),
            (r#"{"err\u006fr":"bad"}"#, r#"{"error":"bad"}"#),
        ];
        for (text, body) in cases {
            let result = JobResult {
                outcome: Outcome::Output(output(text)),
                recycle: false,
            };
            assert_eq!(
                result.is_failure(),
                body.contains(r#""error""#),
                "output {text}"
            );
            assert_eq!(
                done(Outcome::Output(output(text)), false),
                body,
                "output {text}"
            );
        }
    }

    /// A repeated `error` key counts with its last value, as in the dict the SDK reads the
    /// output into; it is not a reason to miss the failure.
    #[test]
    fn repeated_error_key_fails_the_job_with_the_last_value() {
        let output = output(r#"{"error":"","x":1,"error":"second"}"#);
        let result = JobResult {
            outcome: Outcome::Output(output.clone()),
            recycle: false,
        };
        assert!(result.is_failure());
        assert_eq!(
            done(Outcome::Output(output), false),
            r#"{"output":{"x":1},"error":"second"}"#
        );
    }
}
