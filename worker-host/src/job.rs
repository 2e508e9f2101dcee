//! One job's life in data: parsing a job the platform (or a test input) sent, the outcome of
//! running it, and the bodies RunPod receives for it.
//!
//! JSON is kept as raw text (`RawValue`) wherever the host only passes it along, so an input of
//! any size reaches the handler, and an output reaches the platform, byte for byte, without a
//! parse into a tree. Bodies follow `runpod-protocol.md` §6.1–6.3 exactly.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// The version reported as `runpod_version` to the platform (error payloads, heartbeats): the
/// Python SDK release whose wire protocol this host speaks.
pub const RUNPOD_PROTOCOL_VERSION: &str = "1.12.0";

/// A JSON value kept as its text.
pub type RawJson = Box<RawValue>;

/// Why a job could not be parsed. Each message says what was wrong, for the job's error result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// The text is not JSON at all.
    #[error("the job is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON is not an object.
    #[error("the job is not a JSON object")]
    NotAnObject,
    /// No `id` key.
    #[error("the job has no id")]
    MissingId,
    /// `id` is not a string or a number.
    #[error("the job id must be a string, not {0}")]
    InvalidId(String),
    /// No `input` key (or, where null is not accepted, a null input).
    #[error("the job has no input")]
    MissingInput {
        /// The job's id, so the failure can be reported for it.
        id: String,
    },
}

/// One job: its id, its input and the whole job object, all as raw JSON text.
#[derive(Debug, Clone)]
pub struct Job {
    id: String,
    input: RawJson,
    job_json: RawJson,
}

/// How strictly `input` is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRule {
    /// `input` must be present; `null` is accepted (the platform's job-take, like the SDK).
    Present,
    /// `input` must be present and not `null` (a local test input, like the SDK).
    NotNull,
}

impl Job {
    /// Parses one job object. `default_id` is used when the object has no `id` (local tests);
    /// without it a missing id is an error.
    pub fn parse(
        text: &RawValue,
        default_id: Option<&str>,
        rule: InputRule,
    ) -> Result<Self, JobError> {
        let fields = OrderedRawMap::parse(text.get())?;
        let id = match fields.get("id") {
            Some(raw) => parse_id(raw)?,
            None => default_id.ok_or(JobError::MissingId)?.to_owned(),
        };
        let input = match fields.get("input") {
            Some(raw) if rule == InputRule::NotNull && raw.get() == "null" => None,
            Some(raw) => Some(raw.to_owned()),
            None => None,
        };
        let Some(input) = input else {
            return Err(JobError::MissingInput { id });
        };
        let job_json = if fields.get("id").is_some() {
            text.to_owned()
        } else {
            fields.with_first("id", &id)
        };
        Ok(Self {
            id,
            input,
            job_json,
        })
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's `input`, as the text it arrived as.
    pub fn input(&self) -> &RawValue {
        &self.input
    }

    /// The whole job object, with every key it arrived with (and `id`, if it was defaulted).
    pub fn job_json(&self) -> &RawValue {
        &self.job_json
    }
}

fn parse_id(raw: &RawValue) -> Result<String, JobError> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map_err(|error| JobError::InvalidJson(error.to_string()))
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err(JobError::InvalidId(text.to_owned()))
    }
}

/// A JSON object's members in their original order, each value kept raw.
#[derive(Debug, Default)]
pub struct OrderedRawMap(Vec<(String, RawJson)>);

impl OrderedRawMap {
    /// Parses an object; anything else is [`JobError::NotAnObject`].
    pub fn parse(text: &str) -> Result<Self, JobError> {
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            return match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => Err(JobError::NotAnObject),
                Err(error) => Err(JobError::InvalidJson(error.to_string())),
            };
        }
        serde_json::from_str(text).map_err(|error| JobError::InvalidJson(error.to_string()))
    }

    /// The value of the first member named `key`.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| &**value)
    }

    /// Removes every member named `key`, returning the first one's value.
    pub fn remove(&mut self, key: &str) -> Option<RawJson> {
        let position = self.0.iter().position(|(name, _)| name == key)?;
        let (_, value) = self.0.remove(position);
        self.0.retain(|(name, _)| name != key);
        Some(value)
    }

    /// Whether the object has no members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object as JSON text with a string member `key: value` put first.
    pub fn with_first(&self, key: &str, value: &str) -> RawJson {
        let mut members = Vec::with_capacity(self.0.len() + 1);
        let value = serde_json::value::to_raw_value(value).expect("a string always serializes");
        members.push((key.to_owned(), value));
        members.extend(self.0.iter().map(|(name, raw)| (name.clone(), raw.clone())));
        OrderedRawMap(members).to_raw()
    }

    /// The object as JSON text.
    pub fn to_raw(&self) -> RawJson {
        serde_json::value::to_raw_value(self).expect("raw JSON members always serialize")
    }
}

impl Serialize for OrderedRawMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

impl<'de> Deserialize<'de> for OrderedRawMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = OrderedRawMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(member) = map.next_entry::<String, RawJson>()? {
                    members.push(member);
                }
                Ok(OrderedRawMap(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Why a job failed, as the handler (or the host on its behalf) reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The error's type, e.g. `ValueError`, `Panic`, `InvalidOutput`.
    pub error_type: String,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// A failure with this type and message.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
        }
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
    Output(RawJson),
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
    /// Whether the platform will see this job as failed.
    pub fn is_failure(&self) -> bool {
        match &self.outcome {
            Outcome::Failed { .. } => true,
            Outcome::Streamed => false,
            Outcome::Output(output) => output_error(output).is_some(),
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

/// The job-done body for a finished job (§6.1, §6.2).
///
/// `aggregate` is the list of streamed chunks when the operator asked for aggregated stream
/// results (`return_aggregate_stream`); `force_stop_pod` adds `stopPod` to every result (the
/// SDK's config-level `refresh_worker`).
pub fn job_done_body(
    result: &JobResult,
    origin: &Origin,
    aggregate: Option<&[RawJson]>,
    force_stop_pod: bool,
) -> String {
    let mut body = OrderedRawMap::default();
    let mut stop_pod = result.recycle || force_stop_pod;
    match &result.outcome {
        Outcome::Output(output) => {
            let (members, refresh) = map_output(output);
            stop_pod |= refresh;
            body = members;
        }
        Outcome::Streamed => {
            let chunks: &[RawJson] = aggregate.unwrap_or(&[]);
            body.0.push(("output".into(), to_raw(&chunks)));
        }
        Outcome::Failed {
            failure,
            streaming: true,
        } => {
            let text = format!(
                "handler: {} \ntraceback: {}: {}",
                failure.message, failure.error_type, failure.message
            );
            body.0.push(("error".into(), to_raw(&text)));
        }
        Outcome::Failed {
            failure,
            streaming: false,
        } => {
            let payload = ErrorPayload {
                error_type: &failure.error_type,
                error_message: &failure.message,
                error_traceback: "",
                hostname: &origin.hostname,
                worker_id: &origin.worker_id,
                runpod_version: RUNPOD_PROTOCOL_VERSION,
            };
            let text = serde_json::to_string(&payload).expect("strings always serialize");
            body.0.push(("error".into(), to_raw(&text)));
        }
    }
    if stop_pod {
        body.0.push(("stopPod".into(), to_raw(&true)));
    }
    serde_json::to_string(&body).expect("raw JSON members always serialize")
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
    body.push_str(r#"{"output":"#);
    body.push_str(value.get());
    body.push('}');
    body
}

fn to_raw<T: Serialize + ?Sized>(value: &T) -> RawJson {
    serde_json::value::to_raw_value(value).expect("plain values always serialize")
}

/// The keys of an output object the SDK gives meaning to. `Some` whenever the key is present,
/// even with a `null` value: the SDK removes the key from the output in either case.
#[derive(Deserialize)]
struct SpecialKeys<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    refresh_worker: Option<&'a RawValue>,
}

/// Deserializes a present key's value as it is, `null` included (a plain `Option` would read a
/// `null` as an absent key).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// The output's truthy `error` value, if it is an object that has one (the SDK's way for a handler
/// to fail a job by returning `{"error": ...}`).
fn output_error(output: &RawValue) -> Option<&RawValue> {
    let special = special_keys(output)?;
    special.error.filter(|value| is_truthy(value))
}

fn special_keys(output: &RawValue) -> Option<SpecialKeys<'_>> {
    if !output.get().trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<SpecialKeys<'_>>(output.get()).ok()
}

/// Maps a handler's output to body members as the SDK does (§6.1): `{"output": R}`, except that
/// an object's truthy `error` fails the job, `refresh_worker` becomes `stopPod`, and `{}` becomes
/// an empty body. Returns the members and whether `stopPod` was asked for.
fn map_output(output: &RawJson) -> (OrderedRawMap, bool) {
    let mut body = OrderedRawMap::default();
    let Some(special) = special_keys(output) else {
        body.0.push(("output".into(), output.clone()));
        return (body, false);
    };
    if special.error.is_none() && special.refresh_worker.is_none() {
        if output.get().trim() != "{}" {
            body.0.push(("output".into(), output.clone()));
        }
        return (body, false);
    }
    let mut members = OrderedRawMap::parse(output.get()).expect("already parsed as an object");
    let error = members.remove("error").filter(|value| is_truthy(value));
    let refresh = members
        .remove("refresh_worker")
        .is_some_and(|value| is_truthy(&value));
    if !members.is_empty() {
        body.0.push(("output".into(), members.to_raw()));
    }
    if let Some(error) = error {
        body.0.push(("error".into(), error));
    }
    (body, refresh)
}

/// Python's truthiness of a JSON value: false for `null`, `false`, `0`, `""`, `[]` and `{}`.
fn is_truthy(value: &RawValue) -> bool {
    let text = value.get().trim();
    match text {
        "null" | "false" | "\"\"" => false,
        _ if text.starts_with('[') || text.starts_with('{') => {
            let inner = text[1..text.len() - 1].trim();
            !inner.is_empty()
        }
        _ if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => text
            .parse::<f64>()
            .map(|number| number != 0.0)
            .unwrap_or(true),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawJson {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn done(outcome: Outcome, recycle: bool) -> String {
        job_done_body(
            &JobResult { outcome, recycle },
            &Origin::default(),
            None,
            false,
        )
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
        for (output, body) in cases {
            assert_eq!(
                done(Outcome::Output(raw(output)), false),
                body,
                "output {output}"
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

    /// A job without id gets the default one, put first, and keeps its other keys.
    #[test]
    fn job_parse_defaults_the_id_and_keeps_extra_keys() {
        let text = raw(r#"{"input":{"b":1,"a":2},"extra":"e"}"#);
        let job = Job::parse(&text, Some("local_test"), InputRule::NotNull).unwrap();
        assert_eq!(job.id(), "local_test");
        assert_eq!(job.input().get(), r#"{"b":1,"a":2}"#);
        assert_eq!(
            job.job_json().get(),
            r#"{"id":"local_test","input":{"b":1,"a":2},"extra":"e"}"#
        );
        let null_input = raw(r#"{"id":"j","input":null}"#);
        assert_eq!(
            Job::parse(&null_input, None, InputRule::NotNull).unwrap_err(),
            JobError::MissingInput { id: "j".into() }
        );
        assert!(Job::parse(&null_input, None, InputRule::Present).is_ok());
        assert_eq!(
            Job::parse(&raw("[1]"), None, InputRule::Present).unwrap_err(),
            JobError::NotAnObject
        );
    }
}
