//! A JSON object kept as its members' raw text, in order.

use super::result::to_raw;
use super::{JobError, RawJson};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

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
pub(super) fn key_name(raw: &RawValue) -> Cow<'_, str> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{InputRule, Job};
    use serde_json::value::RawValue;

    fn raw(text: &str) -> RawJson {
        RawValue::from_string(text.to_owned()).unwrap()
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
