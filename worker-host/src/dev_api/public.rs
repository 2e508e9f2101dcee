//! The public half of the dev API: RunPod's endpoint API (`/run`, `/runsync`, `/status`,
//! `/stream`, `/cancel`, `/retry`, `/health`, `/purge-queue`) as the official client and curl call
//! it, under `/v2/{endpoint_id}/...` for any endpoint id and without the prefix.
//!
//! This module owns the HTTP side only: request limits, validation of job requests (every
//! rejection is a JSON `{"error": ...}` that says what is wrong, axum's own rejections included),
//! the optional API key, and the answers' shapes. The jobs themselves live in [`super::store`].

use super::store::{
    NewJob, RetryOutcome, Status, Store, Submission, DEFAULT_EXECUTION_TIMEOUT, DEFAULT_TTL,
    MAX_POLICY_MS, MIN_EXECUTION_TIMEOUT_MS, MIN_TTL_MS,
};
use crate::http::{error_answer as error, json_answer as json, json_errors};
use crate::job::{JobError, OrderedRawMap};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;

/// The largest `/run` body, as on the platform (10 MiB).
pub const MAX_RUN_BYTES: usize = 10 * 1024 * 1024;
/// The largest `/runsync` body, as on the platform (20 MiB).
pub const MAX_RUNSYNC_BYTES: usize = 20 * 1024 * 1024;
/// How long `/runsync` waits by default.
const DEFAULT_RUNSYNC_WAIT: Duration = Duration::from_secs(90);
/// The range `?wait=` is clamped to, in ms (the platform's).
const RUNSYNC_WAIT_RANGE_MS: (u64, u64) = (1_000, 300_000);
/// How long `/stream` waits for a chunk when none is pending (the official client's requests
/// time out after 10 s, and it polls once a second).
const STREAM_WAIT: Duration = Duration::from_secs(5);
/// The answer for a job id the store does not know (never submitted, purged, or expired).
const UNKNOWN_JOB: &str = "request does not exist";

/// The OpenAPI description of these routes, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// What the public routes share.
#[derive(Debug)]
pub struct PublicApi {
    /// The jobs.
    pub store: Arc<Store>,
    /// When set, every route but `/openapi.json` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Cancelled at shutdown: new jobs are refused (503) while the running ones finish and their
    /// results stay readable.
    pub draining: tokio_util::sync::CancellationToken,
    /// The handler serving (for `/health`).
    pub live: Arc<crate::handler::LiveHandler>,
}

/// The public router: every route with and without the `/v2/{endpoint_id}` prefix.
pub fn router(api: Arc<PublicApi>) -> Router {
    let routes = || {
        Router::new()
            .route(
                "/run",
                post(run).layer(DefaultBodyLimit::max(MAX_RUN_BYTES)),
            )
            .route(
                "/runsync",
                post(runsync).layer(DefaultBodyLimit::max(MAX_RUNSYNC_BYTES)),
            )
            .route("/status/{job_id}", get(status).post(status))
            .route("/stream/{job_id}", get(stream).post(stream))
            .route("/cancel/{job_id}", post(cancel))
            .route("/retry/{job_id}", post(retry))
            .route("/health", get(health))
            .route("/purge-queue", post(purge_queue))
            .route("/openapi.json", get(openapi))
            .route("/ping", get(ping))
            .route("/metrics", get(metrics))
    };
    Router::new()
        .merge(routes())
        .nest("/v2/{endpoint_id}", routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(api.clone(), require_key))
        .layer(middleware::map_response(json_errors))
        .with_state(api)
}

/// `{"id": id, "status": status}`, the answer of `/run`, `/cancel` and `/retry`.
fn id_and_status(id: &str, status: impl serde::Serialize) -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({ "id": id, "status": status }).to_string(),
    )
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route; see /openapi.json")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take this method; see /openapi.json",
    )
}

/// Rejects requests without the API key, when one is set.
async fn require_key(State(api): State<Arc<PublicApi>>, request: Request, next: Next) -> Response {
    let Some(key) = &api.api_key else {
        return next.run(request).await;
    };
    if is_open_route(request.uri().path()) {
        return next.run(request).await;
    }
    match crate::http::check_key(request.headers(), key) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

/// Whether `path` is `/openapi.json` or `/ping` (or either under `/v2/{endpoint_id}/`), the
/// routes that need no key: a description, and a health check a platform or an orchestrator
/// polls without one.
fn is_open_route(path: &str) -> bool {
    matches!(route_of(path), Some("openapi.json" | "ping"))
}

/// The route a path names, with or without the `/v2/{endpoint_id}/` prefix (`ping` for both
/// `/ping` and `/v2/ep/ping`); `None` for a prefix with no endpoint id.
pub fn route_of(path: &str) -> Option<&str> {
    match path.strip_prefix("/v2/") {
        Some(rest) => match rest.split_once('/') {
            Some((endpoint, route)) if !endpoint.is_empty() => Some(route),
            _ => None,
        },
        None => Some(path.strip_prefix('/').unwrap_or(path)),
    }
}

/// The `{job_id}` of a route (an `{endpoint_id}` in front is ignored).
#[derive(serde::Deserialize)]
struct JobPath {
    job_id: String,
}

/// The `{job_id}` of a route; a path axum cannot decode (`/status/%ff`: not UTF-8) is a JSON 400.
struct JobId(String);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<JobPath>::from_request_parts(parts, state).await {
            Ok(Path(path)) => Ok(Self(path.job_id)),
            Err(rejection) => Err(error(
                rejection.status(),
                format!("the request path cannot be read: {}", rejection.body_text()),
            )),
        }
    }
}

/// The answer to a new job or a retry while the worker shuts down.
fn shutting_down() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the worker is shutting down and takes no new jobs",
    )
}

async fn run(State(api): State<Arc<PublicApi>>, body: Result<Bytes, BytesRejection>) -> Response {
    if api.draining.is_cancelled() {
        return shutting_down();
    }
    let new = match read_job_request(body, Submission::Async, MAX_RUN_BYTES, "/run") {
        Ok(new) => new,
        Err((status, message)) => return error(status, message),
    };
    let id = api.store.submit(new);
    id_and_status(&id, Status::InQueue)
}

async fn runsync(
    State(api): State<Arc<PublicApi>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if api.draining.is_cancelled() {
        return shutting_down();
    }
    let wait = match runsync_wait(query.as_deref()) {
        Ok(wait) => wait,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let new = match read_job_request(body, Submission::Sync, MAX_RUNSYNC_BYTES, "/runsync") {
        Ok(new) => new,
        Err((status, message)) => return error(status, message),
    };
    let id = api.store.submit(new);
    match api.store.wait_final(&id, wait).await {
        Some(status) => json(StatusCode::OK, status),
        None => error(StatusCode::NOT_FOUND, UNKNOWN_JOB),
    }
}

/// The `?wait=` of `/runsync`, in ms, clamped to the platform's range.
fn runsync_wait(query: Option<&str>) -> Result<Duration, String> {
    let Some(query) = query else {
        return Ok(DEFAULT_RUNSYNC_WAIT);
    };
    let value = url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "wait")
        .map(|(_, value)| value.into_owned());
    let Some(value) = value else {
        return Ok(DEFAULT_RUNSYNC_WAIT);
    };
    let millis: u64 = value.trim().parse().map_err(|_| {
        format!("wait must be a whole number of milliseconds (it is clamped to 1000-300000), not {value:?}")
    })?;
    let (low, high) = RUNSYNC_WAIT_RANGE_MS;
    Ok(Duration::from_millis(millis.clamp(low, high)))
}

async fn status(State(api): State<Arc<PublicApi>>, JobId(id): JobId) -> Response {
    match api.store.status(&id) {
        Some(status) => json(StatusCode::OK, status),
        None => error(StatusCode::NOT_FOUND, UNKNOWN_JOB),
    }
}

async fn stream(State(api): State<Arc<PublicApi>>, JobId(id): JobId) -> Response {
    match api.store.read_stream(&id, STREAM_WAIT).await {
        Some(answer) => json(StatusCode::OK, answer),
        None => error(StatusCode::NOT_FOUND, UNKNOWN_JOB),
    }
}

async fn cancel(State(api): State<Arc<PublicApi>>, JobId(id): JobId) -> Response {
    match api.store.cancel(&id) {
        Some(status) => id_and_status(&id, status),
        None => error(StatusCode::NOT_FOUND, UNKNOWN_JOB),
    }
}

async fn retry(State(api): State<Arc<PublicApi>>, JobId(id): JobId) -> Response {
    // A retry is a new run of the job: refused while shutting down, as new jobs are.
    if api.draining.is_cancelled() {
        return shutting_down();
    }
    match api.store.retry(&id) {
        Some(RetryOutcome::Requeued) => id_and_status(&id, Status::InQueue),
        // The request is fine; the job's state is what stands in the way.
        Some(RetryOutcome::NotRetryable(status)) => error(
            StatusCode::CONFLICT,
            format!(
                "only FAILED or TIMED_OUT jobs can be retried; this job is {}",
                serde_json::to_value(status).expect("a status serializes")
            ),
        ),
        None => error(StatusCode::NOT_FOUND, UNKNOWN_JOB),
    }
}

async fn health(State(api): State<Arc<PublicApi>>) -> Response {
    let counts = api.store.counts();
    // Not `inProgress > 0`: a handler told to stop may still hold the worker's slot.
    let running = u64::from(api.store.worker_running());
    let mut health = serde_json::json!({
        "jobs": {
            "completed": counts.completed,
            "failed": counts.failed,
            "inProgress": counts.in_progress,
            "inQueue": counts.in_queue,
            "retried": counts.retried,
        },
        "workers": { "idle": 1 - running, "running": running },
    });
    // Not the platform's: which build serves now (a swap changes it; none during a drain-first
    // swap).
    if let Some(generation) = api.live.serving() {
        let info = generation.info();
        health["handler"] = serde_json::json!({
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "generation": generation.number(),
        });
    }
    json(StatusCode::OK, health.to_string())
}

/// RunPod's health contract: 200 when the worker can take a job (204 while `init` runs, answered
/// before this router is up), 503 while it cannot (shutting down, a crashed runner restarting, a
/// drain-first swap).
async fn ping(State(api): State<Arc<PublicApi>>) -> Response {
    let ready = !api.draining.is_cancelled()
        && api.live.serving().is_some_and(|generation| {
            *generation.handler().readiness().borrow() == crate::handler::Readiness::Ready
        });
    if ready {
        json(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker cannot take a job now (shutting down, or its handler is restarting)",
        )
    }
}

async fn metrics() -> Response {
    crate::metrics::answer()
}

async fn purge_queue(State(api): State<Arc<PublicApi>>) -> Response {
    let removed = api.store.purge_queue();
    json(
        StatusCode::OK,
        serde_json::json!({ "removed": removed, "status": "completed" }).to_string(),
    )
}

/// The OpenAPI description of this server: as written when a key is set; without one, with no
/// security requirement, since no route then asks for a key.
async fn openapi(State(api): State<Arc<PublicApi>>) -> Response {
    if api.api_key.is_some() {
        return json(StatusCode::OK, OPENAPI_JSON.to_owned());
    }
    json(StatusCode::OK, openapi_without_key())
}

/// [`OPENAPI_JSON`] for a server without a key (worked out once).
fn openapi_without_key() -> String {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut document: serde_json::Value =
            serde_json::from_str(OPENAPI_JSON).expect("openapi.json is valid JSON");
        document["security"] = serde_json::json!([]);
        document.to_string()
    })
    .clone()
}

/// Reads and checks a `/run` or `/runsync` body; a rejection is the status and message of the
/// error answer to send.
fn read_job_request(
    body: Result<Bytes, BytesRejection>,
    submission: Submission,
    limit: usize,
    route: &str,
) -> Result<NewJob, (StatusCode, String)> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes for {route}"),
        ),
        status => (
            status,
            format!("the request body could not be read: {rejection}"),
        ),
    })?;
    parse_job_request(&body, submission).map_err(|message| (StatusCode::BAD_REQUEST, message))
}

/// Checks a job request as the platform does: a JSON object with a non-null `input`, an optional
/// http(s) `webhook` and an optional `policy` within the platform's ranges.
pub fn parse_job_request(body: &[u8], submission: Submission) -> Result<NewJob, String> {
    const SHAPE: &str = r#"send a JSON object like {"input": {...}}"#;
    let text = std::str::from_utf8(body)
        .map_err(|_| format!("the request body is not UTF-8 text; {SHAPE}"))?;
    let request = OrderedRawMap::parse(text).map_err(|error| match error {
        JobError::NotAnObject => format!("the request body is not a JSON object; {SHAPE}"),
        JobError::InvalidJson(reason) => {
            format!("the request body is not valid JSON ({reason}); {SHAPE}")
        }
        other => format!("the request body is not valid ({other}); {SHAPE}"),
    })?;
    match request.get("input") {
        None => return Err(format!(r#"the request has no "input"; {SHAPE}"#)),
        Some(input) if input.get() == "null" => {
            return Err(format!(r#"the request's "input" is null; {SHAPE}"#))
        }
        Some(_) => {}
    }
    let webhook = match request.get("webhook").filter(|raw| raw.get() != "null") {
        None => None,
        Some(raw) => Some(parse_webhook(raw)?),
    };
    let (execution_timeout, ttl) = match request.get("policy").filter(|raw| raw.get() != "null") {
        None => (DEFAULT_EXECUTION_TIMEOUT, DEFAULT_TTL),
        Some(raw) => parse_policy(raw)?,
    };
    if let Some(s3_config) = request.get("s3Config") {
        if !(s3_config.get() == "null" || s3_config.get().starts_with('{')) {
            return Err(format!(
                r#""s3Config" must be a JSON object, not {}"#,
                s3_config.get()
            ));
        }
    }
    Ok(NewJob {
        request,
        submission,
        webhook,
        execution_timeout,
        ttl,
    })
}

fn parse_webhook(raw: &RawValue) -> Result<String, String> {
    let problem = || {
        format!(
            r#""webhook" must be an http:// or https:// URL, not {}"#,
            raw.get()
        )
    };
    let url: String = serde_json::from_str(raw.get()).map_err(|_| problem())?;
    match url::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(url),
        _ => Err(problem()),
    }
}

/// `policy`: `executionTimeout` and `ttl` in ms within the platform's ranges, `lowPriority` a
/// boolean (accepted; one local worker has no priorities).
fn parse_policy(raw: &RawValue) -> Result<(Duration, Duration), String> {
    let policy = OrderedRawMap::parse(raw.get())
        .map_err(|_| format!(r#""policy" must be a JSON object, not {}"#, raw.get()))?;
    let millis = |name: &str, low: u64, default: Duration| -> Result<Duration, String> {
        let Some(value) = policy.get(name).filter(|raw| raw.get() != "null") else {
            return Ok(default);
        };
        // A whole number, written as an integer or not (`60000.0` is the same number, as JSON
        // Schema's `integer` says).
        let whole = serde_json::from_str::<u64>(value.get()).ok().or_else(|| {
            serde_json::from_str::<f64>(value.get())
                .ok()
                .filter(|ms| ms.fract() == 0.0 && (0.0..=MAX_POLICY_MS as f64).contains(ms))
                .map(|ms| ms as u64)
        });
        match whole {
            Some(ms) if (low..=MAX_POLICY_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                r#""policy.{name}" must be a whole number of milliseconds from {low} to {MAX_POLICY_MS}, not {}"#,
                value.get()
            )),
        }
    };
    let execution_timeout = millis(
        "executionTimeout",
        MIN_EXECUTION_TIMEOUT_MS,
        DEFAULT_EXECUTION_TIMEOUT,
    )?;
    let ttl = millis("ttl", MIN_TTL_MS, DEFAULT_TTL)?;
    if let Some(value) = policy.get("lowPriority") {
        if !matches!(value.get(), "true" | "false" | "null") {
            return Err(format!(
                r#""policy.lowPriority" must be true or false, not {}"#,
                value.get()
            ));
        }
    }
    Ok((execution_timeout, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(body: &str) -> String {
        parse_job_request(body.as_bytes(), Submission::Async)
            .err()
            .unwrap_or_else(|| panic!("{body} was accepted"))
    }

    /// Each malformed request is refused with a sentence that names what is wrong.
    #[test]
    fn malformed_requests_say_what_is_wrong() {
        assert!(rejection("").contains("not valid JSON"));
        assert!(rejection("[1]").contains("not a JSON object"));
        assert!(rejection(r#"{"inputs": 1}"#).contains(r#"no "input""#));
        assert!(rejection(r#"{"input": null}"#).contains("is null"));
        assert!(rejection(r#"{"input": 1, "webhook": 3}"#).contains(r#""webhook""#));
        assert!(rejection(r#"{"input": 1, "webhook": "ftp://x"}"#).contains("http://"));
        assert!(rejection(r#"{"input": 1, "policy": []}"#).contains(r#""policy""#));
        let message = rejection(r#"{"input": 1, "policy": {"executionTimeout": 10}}"#);
        assert!(message.contains("policy.executionTimeout") && message.contains("5000"));
        assert!(rejection(r#"{"input": 1, "policy": {"ttl": "1h"}}"#).contains("policy.ttl"));
        assert!(rejection(r#"{"input": 1, "policy": {"lowPriority": 1}}"#).contains("lowPriority"));
        assert!(rejection(r#"{"input": 1, "s3Config": [null]}"#).contains(r#""s3Config""#));
        assert!(rejection(r#"{"input": 1, "policy": {"ttl": 10000.5}}"#).contains("policy.ttl"));
    }

    /// A whole number of milliseconds is accepted however it is written, and a null s3Config
    /// is none, as the OpenAPI description says.
    #[test]
    fn whole_numbers_written_as_floats_are_whole_numbers() {
        let new = parse_job_request(
            br#"{"input": 1, "policy": {"executionTimeout": 68328717.0, "ttl": 1e5}, "s3Config": null}"#,
            Submission::Async,
        )
        .unwrap();
        assert_eq!(new.execution_timeout, Duration::from_millis(68_328_717));
        assert_eq!(new.ttl, Duration::from_millis(100_000));
    }

    /// A valid request keeps its policy and webhook, and defaults what it leaves out.
    #[test]
    fn valid_requests_keep_policy_and_webhook() {
        let new = parse_job_request(
            br#"{"input": {"a": 1}, "webhook": "http://127.0.0.1:9/hook", "policy": {"executionTimeout": 6000}}"#,
            Submission::Sync,
        )
        .expect("valid");
        assert_eq!(new.execution_timeout, Duration::from_millis(6000));
        assert_eq!(new.ttl, DEFAULT_TTL);
        assert_eq!(new.webhook.as_deref(), Some("http://127.0.0.1:9/hook"));
        assert_eq!(new.submission, Submission::Sync);
    }

    /// Only the OpenAPI route itself is open without a key, not a job id that looks like it.
    #[test]
    fn only_the_description_and_the_health_check_are_exempt_from_the_key() {
        assert!(is_open_route("/openapi.json"));
        assert!(is_open_route("/v2/ep/openapi.json"));
        assert!(is_open_route("/ping"));
        assert!(is_open_route("/v2/ep/ping"));
        assert!(!is_open_route("/status/openapi.json"));
        assert!(!is_open_route("/v2/ep/status/openapi.json"));
        assert!(!is_open_route("/v2//openapi.json"));
        assert!(!is_open_route("/v2/ep"));
        assert!(!is_open_route("/metrics"));
        assert!(!is_open_route("/health"));
    }

    /// `?wait=` defaults to 90 s, is clamped to the platform's range, and must be a number.
    #[test]
    fn runsync_wait_is_clamped() {
        assert_eq!(runsync_wait(None), Ok(DEFAULT_RUNSYNC_WAIT));
        assert_eq!(runsync_wait(Some("x=1")), Ok(DEFAULT_RUNSYNC_WAIT));
        assert_eq!(runsync_wait(Some("wait=5")), Ok(Duration::from_secs(1)));
        assert_eq!(
            runsync_wait(Some("wait=2500")),
            Ok(Duration::from_millis(2500))
        );
        assert_eq!(
            runsync_wait(Some("wait=999999999")),
            Ok(Duration::from_secs(300))
        );
        assert!(runsync_wait(Some("wait=soon")).is_err());
    }
}
