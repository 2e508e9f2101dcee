//! What the host's HTTP servers share (the dev API's public half and the load-balancing server):
//! JSON answers and errors, the optional API key, and, in [`connections`], the HTTP/1.1
//! connections below the routers (request-head limits, the header read timeout, graceful
//! shutdown, JSON bodies for hyper's own rejections).
//!
//! Every error either server sends is JSON, `{"error": "<what is wrong>"}`: the routers' own, the
//! rejections axum writes as plain text ([`json_errors`] rewrites those), and hyper's
//! ([`connections`] rewrites those).

pub mod connections;
pub mod startup;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// The largest error text [`json_errors`] reads from an answer it rewrites.
const MAX_ERROR_TEXT_BYTES: usize = 16 * 1024;

/// What a request without the right key is told.
const WRONG_KEY: &str =
    "missing or wrong API key: send Authorization: Bearer <the key given to --api-key>";

/// A JSON answer from JSON text.
pub fn json_answer(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

/// An error answer: `{"error": message}`.
pub fn error_answer(status: StatusCode, message: impl AsRef<str>) -> Response {
    json_answer(
        status,
        serde_json::json!({ "error": message.as_ref() }).to_string(),
    )
}

/// Every error answer is JSON: one that is not yet (a rejection axum writes itself as plain text)
/// becomes `{"error": <its text>}` with the same status. For `axum::middleware::map_response`.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), MAX_ERROR_TEXT_BYTES)
        .await
        .map(|body| String::from_utf8_lossy(&body).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_lowercase()
    } else {
        text
    };
    error_answer(status, message)
}

/// `None` when `headers` carry `key` (`Authorization: Bearer <key>`, or the bare key, as the
/// platform accepts), else the 401 answer to send.
pub fn check_key(headers: &HeaderMap, key: &str) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            let value = value.trim();
            match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                _ => value,
            }
        });
    let matches = given.is_some_and(|given| same_bytes(given.as_bytes(), key.as_bytes()));
    (!matches).then(|| error_answer(StatusCode::UNAUTHORIZED, WRONG_KEY))
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only (not on where
/// they first differ), so the key cannot be guessed a byte at a time from answer times.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter()
        .zip(b)
        .fold(0_u8, |differ, (x, y)| differ | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key is accepted as a bearer token (any case of the scheme) or bare, and nothing else.
    #[test]
    fn the_key_is_checked_as_the_platform_does() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert!(check_key(&with("Bearer sekret"), "sekret").is_none());
        assert!(check_key(&with("bearer  sekret "), "sekret").is_none());
        assert!(check_key(&with("sekret"), "sekret").is_none());
        assert!(check_key(&with("Bearer other"), "sekret").is_some());
        assert!(check_key(&HeaderMap::new(), "sekret").is_some());
    }
}
