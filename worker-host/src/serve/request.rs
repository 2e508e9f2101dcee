//! From an HTTP request to a job: its id, its `input` and the `http` object the handler sees.
//!
//! A JSON body (any JSON value) is the job's `input`; a request with no body gets its query
//! parameters as an object of strings (a repeated name keeps its last value). The job object is
//! `{"id": ..., "input": ..., "http": {"method", "path", "query", "headers"}}`: `query` is the raw
//! query string (`""` when there is none), `headers` an object of lower-case names (a repeated
//! header's values joined with `", "`), without `Authorization`, which is the caller's secret.

use crate::job::{Job, RawJson};
use axum::http::{header, HeaderMap, Method, Uri};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The longest `X-Request-ID` taken as the job id. A longer or empty one, or one with a character
/// other than ASCII letters, digits and `-_.:` (which keeps ids safe in log lines and URLs), is
/// replaced by a new id.
const MAX_REQUEST_ID_CHARS: usize = 256;

/// Why a request is not a job (it answers 400).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is not one JSON value.
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
}

/// The job id for a request: its `X-Request-ID` when that is a usable id, else a new one.
pub fn job_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_CHARS
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// The job for a request with this id, method, URI, headers and body.
pub fn job(
    id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Job, RequestError> {
    let query = uri.query().unwrap_or("");
    let query_input: RawJson;
    let input: &str = if body.iter().all(u8::is_ascii_whitespace) {
        let parameters: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        query_input = to_raw(&parameters);
        query_input.get()
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|error| RequestError::NotJson(format!("it is not UTF-8 ({error})")))?;
        serde_json::from_str::<&RawValue>(text)
            .map_err(|error| RequestError::NotJson(error.to_string()))?
            .get()
    };
    let http = http_json(method, uri.path(), query, headers);
    let id_json = json_string(id);
    let mut text = String::with_capacity(id_json.len() + input.len() + http.len() + 29);
    text.push_str(r#"{"id":"#);
    text.push_str(&id_json);
    text.push_str(r#","input":"#);
    let input_start = text.len();
    text.push_str(input);
    let input_range = input_start..text.len();
    text.push_str(r#","http":"#);
    text.push_str(&http);
    text.push('}');
    Ok(Job::from_parts(id.to_owned(), text, input_range))
}

/// The job's `http` object: `{"method", "path", "query", "headers"}`, written straight into its
/// text (this runs for every request).
fn http_json(method: &Method, path: &str, query: &str, headers: &HeaderMap) -> String {
    let mut text = Vec::with_capacity(128 + 48 * headers.len());
    for (key, value) in [
        (&br#"{"method":"#[..], method.as_str()),
        (br#","path":"#, path),
        (br#","query":"#, query),
    ] {
        text.extend_from_slice(key);
        write_json_string(&mut text, value);
    }
    text.extend_from_slice(br#","headers":{"#);
    let mut first = true;
    for name in headers.keys() {
        // The caller's credentials for this host (or a proxy in front of it) are not the
        // handler's business.
        if name == header::AUTHORIZATION || name == header::PROXY_AUTHORIZATION {
            continue;
        }
        // Repeated Cookie headers join as one cookie list does; others as HTTP joins them.
        let separator = if name == header::COOKIE { "; " } else { ", " };
        let mut values = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()));
        let mut joined = values.next().unwrap_or_default();
        for value in values {
            let joined = joined.to_mut();
            joined.push_str(separator);
            joined.push_str(&value);
        }
        if !first {
            text.push(b',');
        }
        first = false;
        write_json_string(&mut text, name.as_str());
        text.push(b':');
        write_json_string(&mut text, &joined);
    }
    text.extend_from_slice(b"}}");
    String::from_utf8(text).expect("JSON text written from strings is UTF-8")
}

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("a string serializes into memory");
}

fn to_raw(value: &impl serde::Serialize) -> RawJson {
    serde_json::value::to_raw_value(value).expect("plain data serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn job_json(job: &Job) -> serde_json::Value {
        serde_json::from_str(job.job_json()).unwrap()
    }

    /// A JSON body is the input as it came, and the handler sees the method, path, query and
    /// headers, but never the caller's Authorization.
    #[test]
    fn a_json_body_is_the_input_and_the_request_is_described() {
        let uri: Uri = "/v1/embed?model=small".parse().unwrap();
        let headers = headers(&[
            ("authorization", "Bearer secret"),
            ("content-type", "application/json"),
            ("x-tag", "a"),
            ("x-tag", "b"),
        ]);
        let job = job(
            "id-1",
            &Method::POST,
            &uri,
            &headers,
            br#"{"text": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(job.input(), r#"{"text": [1, 2]}"#);
        let whole = job_json(&job);
        assert_eq!(whole["id"], "id-1");
        assert_eq!(whole["http"]["method"], "POST");
        assert_eq!(whole["http"]["path"], "/v1/embed");
        assert_eq!(whole["http"]["query"], "model=small");
        assert_eq!(whole["http"]["headers"]["x-tag"], "a, b");
        assert!(whole["http"]["headers"].get("authorization").is_none());
        assert!(!job.job_json().contains("secret"));
    }

    /// Without a body the query parameters are the input, as strings.
    #[test]
    fn without_a_body_the_query_is_the_input() {
        let uri: Uri = "/search?q=caf%C3%A9&n=3&n=4".parse().unwrap();
        let job = job("x", &Method::GET, &uri, &HeaderMap::new(), b"").unwrap();
        let input: serde_json::Value = serde_json::from_str(job.input()).unwrap();
        assert_eq!(input, serde_json::json!({"q": "café", "n": "4"}));
        let none = super::job(
            "y",
            &Method::GET,
            &"/".parse().unwrap(),
            &HeaderMap::new(),
            b"",
        )
        .unwrap();
        assert_eq!(none.input(), "{}");
    }

    /// A body that is not one JSON value is refused with the parser's reason.
    #[test]
    fn a_body_that_is_not_json_is_refused() {
        let uri: Uri = "/".parse().unwrap();
        for body in [&b"{\"a\":"[..], b"hello", b"{} {}", b"\xff\xfe"] {
            let error = job("x", &Method::POST, &uri, &HeaderMap::new(), body).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("the request body is not JSON"),
                "{error}"
            );
        }
    }

    /// X-Request-ID is the id when it is usable; otherwise each request gets a new one.
    #[test]
    fn the_request_id_header_names_the_job() {
        assert_eq!(job_id(&headers(&[("x-request-id", " abc-1 ")])), "abc-1");
        let fresh = job_id(&HeaderMap::new());
        assert_eq!(fresh.len(), 36);
        assert_ne!(fresh, job_id(&HeaderMap::new()));
        let long = "x".repeat(MAX_REQUEST_ID_CHARS + 1);
        assert_ne!(job_id(&headers(&[("x-request-id", &long)])), long);
        let odd = job_id(&headers(&[("x-request-id", "x}: fake")]));
        assert_ne!(odd, "x}: fake");
        assert_eq!(
            job_id(&headers(&[("x-request-id", "a.b:c_d-1")])),
            "a.b:c_d-1"
        );
    }
}
