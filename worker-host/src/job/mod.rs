//! One job's life in data: parsing a job the platform (or a test input) sent, the outcome of
//! running it, and the bodies RunPod receives for it.
//!
//! JSON is kept as raw text (`RawValue`) wherever the host only passes it along, so an input of
//! any size reaches the handler, and an output reaches the platform, byte for byte, without a
//! parse into a tree. Bodies follow `runpod-protocol.md` §6.1–6.3 exactly.
//!
//! This module parses a job; `ordered_map` keeps a JSON object as its raw members (a test job
//! that gets an id put first, an output whose special keys are taken out); `output` reads what
//! an output object says to the SDK's rules; `result` holds a finished job's outcome and builds
//! the bodies posted for it.

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
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

    /// A copy of `text` with a NUL after it, in a kept buffer when it is big (see
    /// [`crate::buffers`]).
    pub(crate) fn copy(text: &str) -> Self {
        let mut owned =
            String::from_utf8(crate::buffers::take(text.len() + 1)).expect("an empty buffer");
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

impl Drop for NulTerminated {
    /// A big text's buffer is kept for the next job's (see [`crate::buffers`]).
    fn drop(&mut self) {
        crate::buffers::give_back(std::mem::take(&mut self.0).into_bytes());
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

mod ordered_map;
mod output;
mod result;

use ordered_map::key_name;
pub use ordered_map::OrderedRawMap;
pub use output::Output;
pub use result::{
    job_done_body, progress_body, stream_chunk_body, Failure, JobDoneBody, JobResult, Origin,
    Outcome,
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn raw(text: &str) -> RawJson {
        RawValue::from_string(text.to_owned()).unwrap()
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
}
