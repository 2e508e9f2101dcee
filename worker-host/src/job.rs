//! One job's life in data: parsing a job the platform (or a test input) sent, the outcome of
//! running it, and the bodies RunPod receives for it.
//!
//! JSON is kept as raw text (`RawValue`) wherever the host only passes it along, so an input of
//! any size reaches the handler, and an output reaches the platform, byte for byte, without a
//! parse into a tree. Bodies follow `runpod-protocol.md` §6.1–6.3 exactly.

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// The version reported as `runpod_version` to the platform (error payloads, heartbeats): the
/// Python SDK release whose wire protocol this host speaks.
pub const RUNPOD_PROTOCOL_VERSION: &str = "1.12.0";

/// A JSON value kept as its text.
pub type RawJson = Box<RawValue>;

/// Why a job could not be parsed. Each message says what was wrong, for the job's error result.
/// [`JobError::InvalidJson`] is only ever about the JSON's syntax.
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
    /// `id` is an empty string: no URL can name the job.
    #[error("the job id is empty")]
    EmptyId,
    /// `id` is a string no Rust string can hold (a lone surrogate escape).
    #[error("the job id cannot be read: {0}")]
    UnreadableId(String),
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

/// Text followed by a NUL byte in the same buffer: the form the ABI hands a handler its job in
/// (`wh_job`'s strings are NUL-terminated), so no call has to copy a 20 MiB input again to add
/// one.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct NulTerminated(String);

impl NulTerminated {
    /// Takes `text` and puts a NUL after it (a reallocation only if its buffer is full).
    fn from_string(mut text: String) -> Self {
        text.push('\0');
        Self(text)
    }

    /// A copy of `text` with a NUL after it.
    pub(crate) fn copy(text: &str) -> Self {
        let mut owned = String::with_capacity(text.len() + 1);
        owned.push_str(text);
        Self::from_string(owned)
    }

    /// The text, without the NUL.
    pub(crate) fn as_str(&self) -> &str {
        &self.0[..self.0.len() - 1]
    }

    /// The text and the NUL after it.
    pub(crate) fn with_nul(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for NulTerminated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// One job: its id, and the whole job object as the JSON text it arrived as, kept
/// NUL-terminated as a handler receives it; its input is a range of that text.
///
/// The job object's text is the buffer it arrived in (a take answer of one job is read into it,
/// not copied out of it), and the input is not copied out of it in the host at all: a handler in
/// this process gets a NUL-terminated copy for the call, a runner gets the range.
#[derive(Debug, Clone)]
pub struct Job {
    id: NulTerminated,
    batch_id: Option<String>,
    job_json: NulTerminated,
    /// Where `input` is in `job_json`.
    input: Range<usize>,
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
        Self::from_text(text.get().to_owned(), default_id, rule)
    }

    /// Parses one job object from its text, which becomes the job's own (no copy of it is
    /// made). As [`Self::parse`] otherwise. Whitespace around the object is dropped.
    pub fn from_text(
        mut text: String,
        default_id: Option<&str>,
        rule: InputRule,
    ) -> Result<Self, JobError> {
        text.truncate(text.trim_end().len());
        let leading = text.len() - text.trim_start().len();
        text.drain(..leading);
        let (id, input, batch_id, has_id) = {
            let fields = JobFields::parse(&text)?;
            let id = match fields.id {
                Some(raw) => parse_id(raw)?,
                None => default_id.ok_or(JobError::MissingId)?.to_owned(),
            };
            let input = match fields.input {
                Some(raw) if rule == InputRule::NotNull && raw.get() == "null" => None,
                Some(raw) => Some(range_in(&text, raw.get())),
                None => None,
            };
            let Some(input) = input else {
                return Err(JobError::MissingInput { id });
            };
            let batch_id = fields.batch_id.and_then(parse_batch_id);
            (id, input, batch_id, fields.id.is_some())
        };
        if !has_id {
            // A local test job: the id goes first, and the input moves with it.
            let with_id = OrderedRawMap::parse(&text)?
                .with_first("id", &id)
                .get()
                .to_owned();
            return Self::from_text(with_id, None, InputRule::Present);
        }
        Ok(Self {
            id: NulTerminated::from_string(id),
            batch_id,
            job_json: NulTerminated::from_string(text),
            input,
        })
    }

    /// A job the host made itself (a load-balancing request): `job_json` is the whole job
    /// object, as JSON text that holds `id` as given and the input at `input`.
    pub(crate) fn from_parts(id: String, job_json: String, input: Range<usize>) -> Self {
        assert!(
            job_json.get(input.clone()).is_some(),
            "the input is a range of the job object"
        );
        Self {
            id: NulTerminated::from_string(id),
            batch_id: None,
            job_json: NulTerminated::from_string(job_json),
            input,
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The batch the job belongs to (the platform's `batchId`), which prefixes the job's log
    /// lines as `[batchId=<id>] `, as in the SDK; `None` when the job has none.
    pub fn batch_id(&self) -> Option<&str> {
        self.batch_id.as_deref()
    }

    /// The job's `input`, as the JSON text it arrived as.
    pub fn input(&self) -> &str {
        &self.job_json.as_str()[self.input.clone()]
    }

    /// Where [`Self::input`] is in [`Self::job_json`].
    pub(crate) fn input_range(&self) -> Range<usize> {
        self.input.clone()
    }

    /// The whole job object as JSON text, with every key it arrived with (and `id`, if it was
    /// defaulted).
    pub fn job_json(&self) -> &str {
        self.job_json.as_str()
    }

    /// The id and the job object, each with its NUL, as a handler receives them.
    pub(crate) fn nul_terminated(&self) -> [&[u8]; 2] {
        [self.id.with_nul(), self.job_json.with_nul()]
    }
}

/// Where `part`, a slice of `text`, is in it.
fn range_in(text: &str, part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - text.as_ptr() as usize;
    start..start + part.len()
}

/// The members of a job object the host reads, borrowed from its text; the others are checked
/// as JSON and skipped. Of a repeated key the first counts.
#[derive(Default)]
struct JobFields<'a> {
    id: Option<&'a RawValue>,
    input: Option<&'a RawValue>,
    batch_id: Option<&'a RawValue>,
}

impl<'a> JobFields<'a> {
    /// Reads an object; anything else is [`JobError::NotAnObject`].
    fn parse(text: &'a str) -> Result<Self, JobError> {
        if !text.trim_start().starts_with('{') {
            return match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => Err(JobError::NotAnObject),
                Err(error) => Err(JobError::InvalidJson(error.to_string())),
            };
        }
        serde_json::from_str(text).map_err(|error| JobError::InvalidJson(error.to_string()))
    }
}

impl<'de> Deserialize<'de> for JobFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = JobFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = JobFields::default();
                while let Some(key) = map.next_key::<&'de RawValue>()? {
                    let slot = match &*key_name(key) {
                        "id" => &mut fields.id,
                        "input" => &mut fields.input,
                        "batchId" => &mut fields.batch_id,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        *slot = Some(map.next_value()?);
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

fn parse_id(raw: &RawValue) -> Result<String, JobError> {
    let text = raw.get();
    if text.starts_with('"') {
        match serde_json::from_str::<String>(text) {
            Ok(id) if id.is_empty() => Err(JobError::EmptyId),
            Ok(id) => Ok(id),
            Err(error) => Err(JobError::UnreadableId(error.to_string())),
        }
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err(JobError::InvalidId(text.to_owned()))
    }
}

/// A `batchId` as the SDK shows it: a non-empty string, or an integer other than 0 (the values
/// Python's `if batch_id` keeps that print the same from Rust). Anything else is no batch id.
fn parse_batch_id(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .ok()
            .filter(|id| !id.is_empty())
    } else {
        text.parse::<i64>()
            .ok()
            .filter(|&n| n != 0)
            .map(|n| n.to_string())
    }
}

/// A JSON object's members in their original order, each key and value kept raw.
///
/// Keys are kept as written, not only decoded: JSON allows a lone surrogate escape such as
/// `"\ud800"` in a key (Python's `json` reads and writes it), which no Rust `String` can hold.
/// Such an object parses, keeps its key byte for byte, and its other members can be looked up.
#[derive(Debug, Default)]
pub struct OrderedRawMap(Vec<Member>);

/// One member of an [`OrderedRawMap`].
#[derive(Debug, Clone)]
struct Member {
    /// The key decoded, for lookups (see [`key_name`]).
    name: String,
    /// The key as written, quotes included.
    key: RawJson,
    value: RawJson,
}

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
            .find(|member| member.name == key)
            .map(|member| &*member.value)
    }

    /// Removes every member named `key`, returning the first one's value.
    pub fn remove(&mut self, key: &str) -> Option<RawJson> {
        let position = self.0.iter().position(|member| member.name == key)?;
        let removed = self.0.remove(position);
        self.0.retain(|member| member.name != key);
        Some(removed.value)
    }

    /// Whether the object has no members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object as JSON text with a string member `key: value` put first. The members are
    /// written straight into the text, not cloned first: an input may be 20 MiB.
    pub fn with_first(&self, key: &str, value: &str) -> RawJson {
        let first = Member::new(key, to_raw(value));
        let text = members_json(std::iter::once(&first).chain(&self.0));
        RawValue::from_string(text).expect("raw JSON members make a JSON object")
    }

    /// The object as JSON text.
    pub fn to_raw(&self) -> RawJson {
        RawValue::from_string(self.to_json()).expect("raw JSON members make a JSON object")
    }

    /// The object as JSON text, its keys and values as they were written.
    fn to_json(&self) -> String {
        members_json(self.0.iter())
    }
}

/// An object's JSON text from its members, each key and value as written.
fn members_json<'m>(members: impl Iterator<Item = &'m Member> + Clone) -> String {
    let length: usize = members
        .clone()
        .map(|member| member.key.get().len() + member.value.get().len() + 2)
        .sum();
    let mut text = String::with_capacity(length + 2);
    text.push('{');
    for (index, member) in members.enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(member.key.get());
        text.push(':');
        text.push_str(member.value.get());
    }
    text.push('}');
    text
}

impl Member {
    fn new(key: &str, value: RawJson) -> Self {
        Self {
            name: key.to_owned(),
            key: to_raw(key),
            value,
        }
    }
}

impl Serialize for OrderedRawMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Written as raw JSON so that every key keeps its exact text (see the type's docs).
        self.to_raw().serialize(serializer)
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
                while let Some((key, value)) = map.next_entry::<RawJson, RawJson>()? {
                    let name = key_name(&key).into_owned();
                    members.push(Member { name, key, value });
                }
                Ok(OrderedRawMap(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The text of an object key, given as its raw JSON (quotes included), for comparing with the
/// names the host looks for. A lone surrogate escape, which JSON allows but UTF-8 cannot hold,
/// becomes U+FFFD; no name the host looks for contains one, so nothing is mistaken for it.
fn key_name(raw: &RawValue) -> Cow<'_, str> {
    /// Takes a string's unescaped bytes (WTF-8 where an escape is a lone surrogate).
    struct Lossy;
    impl Visitor<'_> for Lossy {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON string")
        }
        fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<String, E> {
            Ok(String::from_utf8_lossy(bytes).into_owned())
        }
    }
    let text = raw.get();
    let inner = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or(text);
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    // `deserialize_bytes` unescapes without requiring the result to be UTF-8.
    let mut deserializer = serde_json::Deserializer::from_str(text);
    match deserializer.deserialize_bytes(Lossy) {
        Ok(name) => Cow::Owned(name),
        Err(_) => Cow::Borrowed(inner),
    }
}

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
            Outcome::Output(output) => !matches!(output_error(output), Ok(None)),
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
    result: &JobResult,
    origin: &Origin,
    aggregate: Option<&[RawJson]>,
    force_stop_pod: bool,
) -> JobDoneBody {
    let mut body = BodyMembers::new();
    let mut stop_pod = result.recycle || force_stop_pod;
    match &result.outcome {
        Outcome::Output(output) => match map_output(output) {
            Ok((members, refresh)) => {
                stop_pod |= refresh;
                body = members;
            }
            Err(failure) => body.push("error", Cow::Owned(error_payload(&failure, origin))),
        },
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
        } => body.push("error", Cow::Owned(error_payload(failure, origin))),
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

/// The members of a job-done body, in order: plain keys, and values borrowed from the result
/// where they can be (an output is written into the body straight from the handler's text: its
/// only copy on the way to the platform).
struct BodyMembers<'a>(Vec<(&'static str, Cow<'a, RawValue>)>);

impl<'a> BodyMembers<'a> {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn push(&mut self, key: &'static str, value: Cow<'a, RawValue>) {
        self.0.push((key, value));
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(name, _)| *name == key)
    }

    /// The body's JSON text (every key is plain ASCII, written as is).
    fn to_json(&self) -> String {
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
#[derive(Default)]
struct SpecialKeys<'a> {
    error: Option<&'a RawValue>,
    refresh_worker: Option<&'a RawValue>,
}

/// Reads only the special keys' values, without copying or checking the rest. Keys are matched
/// by their decoded text and may hold lone surrogates (see [`key_name`]); a repeated key counts
/// with its last value, as in the Python dict the SDK reads the output into.
impl<'de> Deserialize<'de> for SpecialKeys<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecialVisitor;
        impl<'de> Visitor<'de> for SpecialVisitor {
            type Value = SpecialKeys<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut special = SpecialKeys::default();
                while let Some(key) = map.next_key::<&'de RawValue>()? {
                    match &*key_name(key) {
                        "error" => special.error = Some(map.next_value()?),
                        "refresh_worker" => special.refresh_worker = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(special)
            }
        }
        deserializer.deserialize_map(SpecialVisitor)
    }
}

/// The special keys of an output that is an object; `Ok(None)` for any other output.
///
/// Every output the host holds is valid JSON, and this reading accepts all of it, lone surrogate
/// escapes included, as the SDK's `json` does. Should it still fail, the caller fails the job
/// (see [`unreadable_output`]) rather than let an `error` key it could not see pass as success.
fn special_keys(output: &RawValue) -> Result<Option<SpecialKeys<'_>>, Failure> {
    if !output.get().trim_start().starts_with('{') {
        return Ok(None);
    }
    serde_json::from_str::<SpecialKeys<'_>>(output.get())
        .map(Some)
        .map_err(|error| unreadable_output(&error.to_string()))
}

/// The failure for an output object whose keys cannot be read. A handler that returns an object
/// may be failing the job with `{"error": ...}`; if the host cannot tell, reporting success could
/// hide a failure from the caller (and from retries), so the job fails, saying why.
fn unreadable_output(reason: &str) -> Failure {
    Failure::new(
        "InvalidOutput",
        format!(
            "the handler's output object cannot be read, so whether it fails the job with an \
             `error` key is unknown: {reason}"
        ),
    )
}

/// The output's truthy `error` value, if it is an object that has one (the SDK's way for a
/// handler to fail a job by returning `{"error": ...}`); `Err` if the object cannot be read.
fn output_error(output: &RawValue) -> Result<Option<&RawValue>, Failure> {
    Ok(special_keys(output)?.and_then(|special| special.error.filter(|value| is_truthy(value))))
}

/// Maps a handler's output to body members as the SDK does (§6.1): `{"output": R}`, except that
/// an object's truthy `error` fails the job, `refresh_worker` becomes `stopPod`, and `{}` becomes
/// an empty body. Returns the members and whether `stopPod` was asked for, or the failure of an
/// output object that cannot be read.
fn map_output(output: &RawValue) -> Result<(BodyMembers<'_>, bool), Failure> {
    let mut body = BodyMembers::new();
    let Some(special) = special_keys(output)? else {
        body.push("output", Cow::Borrowed(output));
        return Ok((body, false));
    };
    if special.error.is_none() && special.refresh_worker.is_none() {
        if output.get().trim() != "{}" {
            body.push("output", Cow::Borrowed(output));
        }
        return Ok((body, false));
    }
    let mut members = OrderedRawMap::parse(output.get())
        .map_err(|error| unreadable_output(&error.to_string()))?;
    members.remove("error");
    members.remove("refresh_worker");
    let error = special.error.filter(|value| is_truthy(value));
    let refresh = special.refresh_worker.is_some_and(is_truthy);
    if !members.is_empty() {
        body.push("output", Cow::Owned(members.to_raw()));
    }
    if let Some(error) = error {
        body.push("error", Cow::Borrowed(error));
    }
    Ok((body, refresh))
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

    /// A job without id gets the default one, put first, and keeps its other keys.
    #[test]
    fn job_parse_defaults_the_id_and_keeps_extra_keys() {
        let text = raw(r#"{"input":{"b":1,"a":2},"extra":"e"}"#);
        let job = Job::parse(&text, Some("local_test"), InputRule::NotNull).unwrap();
        assert_eq!(job.id(), "local_test");
        assert_eq!(job.input(), r#"{"b":1,"a":2}"#);
        assert_eq!(
            job.job_json(),
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
        for (output, body) in cases {
            let result = JobResult {
                outcome: Outcome::Output(raw(output)),
                recycle: false,
            };
            assert_eq!(
                result.is_failure(),
                body.contains(r#""error""#),
                "output {output}"
            );
            assert_eq!(
                done(Outcome::Output(raw(output)), false),
                body,
                "output {output}"
            );
        }
    }

    /// A repeated `error` key counts with its last value, as in the dict the SDK reads the
    /// output into; it is not a reason to miss the failure.
    #[test]
    fn repeated_error_key_fails_the_job_with_the_last_value() {
        let output = raw(r#"{"error":"","x":1,"error":"second"}"#);
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

    /// `batchId` is kept where the SDK would prefix log lines with it: a non-empty string, or a
    /// non-zero integer; an empty string, 0, null or another type is no batch id.
    #[test]
    fn job_parse_keeps_the_batch_id_the_sdk_shows() {
        let batch_id = |value: &str| {
            let text = raw(&format!(r#"{{"id":"j","input":1,"batchId":{value}}}"#));
            Job::parse(&text, None, InputRule::NotNull)
                .unwrap()
                .batch_id()
                .map(str::to_owned)
        };
        assert_eq!(batch_id(r#""b-1""#).as_deref(), Some("b-1"));
        assert_eq!(batch_id(r#""café""#).as_deref(), Some("café"));
        assert_eq!(batch_id("42").as_deref(), Some("42"));
        for none in [r#""""#, "0", "null", "true", "[1]", r#"{"a":1}"#] {
            assert_eq!(batch_id(none), None, "batchId {none}");
        }
        let text = raw(r#"{"id":"j","input":1}"#);
        let job = Job::parse(&text, None, InputRule::NotNull).unwrap();
        assert_eq!(job.batch_id(), None);
    }

    /// An object whose keys hold escapes, lone surrogates included, parses; members are found by
    /// their decoded name and written back byte for byte.
    #[test]
    fn ordered_map_keeps_keys_as_written() {
        let text = r#"{"\ud800":1,"caf\u00e9":2,"\u0069d":"j","input":{"\udbff":0}}"#;
        let mut members = OrderedRawMap::parse(text).unwrap();
        assert_eq!(members.to_raw().get(), text);
        assert_eq!(members.get("café").map(RawValue::get), Some("2"));
        assert_eq!(members.get("id").map(RawValue::get), Some(r#""j""#));
        assert_eq!(
            members.with_first("x", "y").get(),
            r#"{"x":"y","\ud800":1,"caf\u00e9":2,"\u0069d":"j","input":{"\udbff":0}}"#
        );
        assert!(members.remove("id").is_some());
        assert_eq!(
            serde_json::to_string(&members).unwrap(),
            r#"{"\ud800":1,"caf\u00e9":2,"input":{"\udbff":0}}"#
        );
        let job = Job::parse(&raw(text), None, InputRule::NotNull).unwrap();
        assert_eq!((job.id(), job.input()), ("j", r#"{"\udbff":0}"#));
    }
}
