//! What a handler's output object says to the SDK's rules: its `error` and `refresh_worker` keys.

use super::ordered_map::key_name;
use super::result::{BodyMembers, Failure};
use super::OrderedRawMap;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

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
pub(super) fn output_error(output: &RawValue) -> Result<Option<&RawValue>, Failure> {
    Ok(special_keys(output)?.and_then(|special| special.error.filter(|value| is_truthy(value))))
}

/// Maps a handler's output to body members as the SDK does (§6.1): `{"output": R}`, except that
/// an object's truthy `error` fails the job, `refresh_worker` becomes `stopPod`, and `{}` becomes
/// an empty body. Returns the members and whether `stopPod` was asked for, or the failure of an
/// output object that cannot be read.
pub(super) fn map_output(output: &RawValue) -> Result<(BodyMembers<'_>, bool), Failure> {
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
