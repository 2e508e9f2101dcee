//! A handler's output: its JSON text, checked once, in the buffer its job-done body is sent
//! from, and what its top-level keys say to the SDK's rules (`error` fails the job,
//! `refresh_worker` asks for a new worker), read in the same pass.
//!
//! A 10 MiB output is copied once on its way to the platform: out of the handler's memory (the
//! ABI's `set_output` copies) or off the runner channel, straight after the `{"output":` its
//! body begins with. The check that it is JSON is the only read of it; finishing the body
//! appends a `}`.

use super::ordered_map::key_name;
use super::result::{to_raw, BodyMembers};
use super::{range_in, OrderedRawMap, RawJson};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// The keys of an output object the SDK gives meaning to. `Some` whenever the key is present,
/// even with a `null` value: the SDK removes the key from the output in either case.
#[derive(Default)]
struct SpecialKeys<'a> {
    error: Option<&'a RawValue>,
    refresh_worker: Option<&'a RawValue>,
    /// How many members the object has.
    members: usize,
}

/// Reads the special keys' values, checking the rest as JSON without copying it. Keys are matched
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
                    special.members += 1;
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

/// What an output's top-level keys say to the SDK's rules, as byte ranges of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keys {
    /// The output is not an object.
    NotAnObject,
    /// The output is an object.
    Object {
        /// Where its `error` value is (present, even if `null`: the SDK removes the key).
        error: Option<Range<usize>>,
        /// Where its `refresh_worker` value is.
        refresh_worker: Option<Range<usize>>,
        /// It has no members (`{}`: the SDK's body is then empty).
        empty: bool,
    },
}

/// A handler's output, valid JSON, kept after the start of its job-done body.
#[derive(Clone, PartialEq, Eq)]
pub struct Output {
    /// [`Output::BODY_START`], then the output's JSON text (whitespace around it included).
    buffer: String,
    keys: Keys,
}

impl Output {
    /// What a job-done body of an output begins with, and so what an output's buffer begins
    /// with (a reader of the output's text puts it there first).
    pub(crate) const BODY_START: &'static str = r#"{"output":"#;
    /// The room left after the text for the body's end (`,"stopPod":true}`).
    pub(crate) const BODY_END_ROOM: usize = Self::STOP_POD_END.len();
    /// The longest end a body is finished with (the other is `}`).
    const STOP_POD_END: &'static str = r#","stopPod":true}"#;

    /// Checks `json` and copies it into a buffer of its own (its one copy; a kept one when it
    /// is big, see `buffers.rs`); the reason when it is not UTF-8 JSON.
    pub fn read(json: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(json).map_err(|error| error.to_string())?;
        let keys = read_keys(text)?;
        let mut buffer = String::from_utf8(crate::buffers::take(
            Self::BODY_START.len() + text.len() + Self::BODY_END_ROOM,
        ))
        .expect("an empty buffer");
        buffer.push_str(Self::BODY_START);
        buffer.push_str(text);
        Ok(Self { buffer, keys })
    }

    /// Checks the JSON text after [`Output::BODY_START`] in `buffer`, which becomes the output's
    /// own (no copy); the reason when it is not UTF-8 JSON.
    pub(crate) fn from_body_start(buffer: Vec<u8>) -> Result<Self, String> {
        if !buffer.starts_with(Self::BODY_START.as_bytes()) {
            return Err("the output's buffer does not begin its body".into());
        }
        let buffer = String::from_utf8(buffer).map_err(|error| error.to_string())?;
        let keys = read_keys(&buffer[Self::BODY_START.len()..])?;
        Ok(Self { buffer, keys })
    }

    /// `null`: the output of a handler that set none.
    pub fn null() -> Self {
        Self::read(b"null").expect("null is JSON")
    }

    /// The output's JSON text.
    pub fn json(&self) -> &str {
        &self.buffer[Self::BODY_START.len()..]
    }

    /// The output's JSON text as bytes, without a copy (an HTTP answer's body).
    pub fn into_json_bytes(mut self) -> bytes::Bytes {
        let buffer = std::mem::take(&mut self.buffer);
        bytes::Bytes::from_owner(crate::buffers::GivenBackOnDrop(buffer.into_bytes()))
            .slice(Self::BODY_START.len()..)
    }

    /// The output's truthy `error` value: the SDK's way for a handler to fail a job by
    /// returning `{"error": ...}`.
    pub(super) fn error(&self) -> Option<&str> {
        match &self.keys {
            Keys::Object {
                error: Some(range), ..
            } => Some(&self.json()[range.clone()]).filter(|value| is_truthy(value)),
            _ => None,
        }
    }

    /// The job-done body of this output as the SDK maps it (§6.1): `{"output": R}`, except that
    /// an object's truthy `error` fails the job, `refresh_worker` becomes `stopPod`, and `{}`
    /// becomes an empty body; `stop_pod` adds `stopPod` in any case. Also says whether the body
    /// fails the job. An output without those keys is finished in its own buffer.
    pub(super) fn into_done_body(mut self, stop_pod: bool) -> (String, bool) {
        let (error, refresh_worker) = match &self.keys {
            Keys::NotAnObject
            | Keys::Object {
                error: None,
                refresh_worker: None,
                empty: false,
            } => {
                let mut body = std::mem::take(&mut self.buffer);
                body.push_str(if stop_pod { Self::STOP_POD_END } else { "}" });
                return (body, false);
            }
            Keys::Object {
                error: None,
                refresh_worker: None,
                empty: true,
            } => {
                let body = if stop_pod {
                    r#"{"stopPod":true}"#
                } else {
                    "{}"
                };
                return (body.to_owned(), false);
            }
            Keys::Object {
                error,
                refresh_worker,
                ..
            } => (error.clone(), refresh_worker.clone()),
        };
        let json = self.json();
        let value = |range: Range<usize>| -> RawJson {
            RawValue::from_string(json[range].to_owned()).expect("a value of a checked output")
        };
        let mut members = OrderedRawMap::parse(json).expect("a checked output object parses");
        members.remove("error");
        members.remove("refresh_worker");
        let error = error.map(value).filter(|value| is_truthy(value.get()));
        let stop_pod = stop_pod || refresh_worker.is_some_and(|range| is_truthy(&json[range]));
        let mut body = BodyMembers::new();
        if !members.is_empty() {
            body.push("output", Cow::Owned(members.to_raw()));
        }
        let failed = error.is_some();
        if let Some(error) = error {
            body.push("error", Cow::Owned(error));
        }
        if stop_pod {
            body.push("stopPod", Cow::Owned(to_raw(&true)));
        }
        (body.to_json(), failed)
    }
}

impl Drop for Output {
    /// A big output's buffer is kept for the next job (see `buffers.rs`): one that was
    /// never sent (its job failed or was dropped) or one the runner child has written to the
    /// channel.
    fn drop(&mut self) {
        crate::buffers::give_back(std::mem::take(&mut self.buffer).into_bytes());
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Output").field(&self.json()).finish()
    }
}

/// Checks that `text` is one JSON value (whitespace around it allowed) and reads its special
/// keys, in one pass. Keys are matched by their decoded text and may hold lone surrogates (see
/// [`key_name`]), as the SDK's `json` reads them.
fn read_keys(text: &str) -> Result<Keys, String> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let keys = if text.trim_start().starts_with('{') {
        let special =
            SpecialKeys::deserialize(&mut deserializer).map_err(|error| error.to_string())?;
        let range = |value: &RawValue| range_in(text, value.get());
        Keys::Object {
            error: special.error.map(range),
            refresh_worker: special.refresh_worker.map(range),
            empty: special.members == 0,
        }
    } else {
        IgnoredAny::deserialize(&mut deserializer).map_err(|error| error.to_string())?;
        Keys::NotAnObject
    };
    deserializer.end().map_err(|error| error.to_string())?;
    Ok(keys)
}

/// Python's truthiness of a JSON value: false for `null`, `false`, `0`, `""`, `[]` and `{}`.
fn is_truthy(value: &str) -> bool {
    let text = value.trim();
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

    fn body(text: &str, stop_pod: bool) -> (String, bool) {
        Output::read(text.as_bytes())
            .unwrap()
            .into_done_body(stop_pod)
    }

    /// What `set_output` and the runner channel refuse: anything but one UTF-8 JSON value.
    #[test]
    fn only_one_json_value_is_an_output() {
        for bad in [
            &b""[..],
            b"   ",
            b"{",
            b"1 2",
            b"{\"a\":1}x",
            b"\"\xff\"",
            b"[1,]",
        ] {
            assert!(
                Output::read(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut buffer = Output::BODY_START.as_bytes().to_vec();
        buffer.extend_from_slice(b"{\"a\":");
        assert!(Output::from_body_start(buffer).is_err());
        assert!(Output::from_body_start(b"{\"a\":1}".to_vec()).is_err());
    }

    /// An output is kept as given, whitespace included, and its body is finished in place, with
    /// `stopPod` when asked; an empty object, however written, is an empty body.
    #[test]
    fn bodies_are_finished_in_the_output_s_buffer() {
        let output = Output::read(b" [1, {\"b\": 2}] ").unwrap();
        assert_eq!(output.json(), " [1, {\"b\": 2}] ");
        assert_eq!(&output.clone().into_json_bytes()[..], b" [1, {\"b\": 2}] ");
        assert_eq!(
            output.into_done_body(false),
            (r#"{"output": [1, {"b": 2}] }"#.to_owned(), false)
        );
        assert_eq!(
            body("7", true),
            (r#"{"output":7,"stopPod":true}"#.to_owned(), false)
        );
        assert_eq!(body("{ }", false), ("{}".to_owned(), false));
        assert_eq!(body("{ }", true), (r#"{"stopPod":true}"#.to_owned(), false));
        assert_eq!(
            body(r#"{"error":"bad","refresh_worker":1}"#, false),
            (r#"{"error":"bad","stopPod":true}"#.to_owned(), true)
        );
        let mut buffer = Output::BODY_START.as_bytes().to_vec();
        buffer.extend_from_slice(br#"{"error":null}"#);
        let output = Output::from_body_start(buffer).unwrap();
        assert_eq!(output.error(), None);
        assert_eq!(output.into_done_body(false), ("{}".to_owned(), false));
    }
}
