//! The worker-facing half of the dev API: the platform's job-take, job-stop, job-done,
//! job-stream and ping endpoints (`runpod-protocol.md` §2–§8), served on a private loopback port
//! to the ordinary queue worker of this same process. The worker cannot tell it from the platform,
//! so local development runs the production code path.
//!
//! The port is bound to 127.0.0.1 and guarded by a random key that only this process knows, so
//! nothing else on the machine can take or answer jobs.

use super::store::Store;
use crate::job::OrderedRawMap;
use crate::runpod::PlatformUrls;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;

/// How long a job-take or job-stop poll is held open when there is nothing to hand out; under
/// the worker's own long-poll timeout.
const HOLD: Duration = Duration::from_secs(20);

/// The local worker's heartbeat period: frequent, since a heartbeat is how the store learns which
/// jobs the worker holds (see [`super::store::StoreLimits::lost_after`]).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// The platform URLs the worker is given for the router below at `base` (`http://127.0.0.1:P`):
/// the same paths as the routes, in the platform's template form.
pub fn worker_urls(base: &str, key: &str, worker_id: &str) -> PlatformUrls {
    PlatformUrls {
        job_take: format!("{base}/job-take/$ID"),
        job_done: Some(format!("{base}/job-done/$RUNPOD_POD_ID/$ID")),
        job_stream: Some(format!("{base}/job-stream/$RUNPOD_POD_ID/$ID")),
        ping: Some(format!("{base}/ping/$RUNPOD_POD_ID")),
        api_key: key.to_owned(),
        worker_id: worker_id.to_owned(),
    }
}

/// What the worker-facing routes share.
#[derive(Debug)]
pub struct WorkerFacing {
    /// The jobs.
    pub store: Arc<Store>,
    /// The key the worker sends as `Authorization`.
    pub key: String,
}

/// The worker-facing router.
pub fn router(api: Arc<WorkerFacing>) -> Router {
    Router::new()
        .route("/job-take/{worker}", get(take))
        .route("/job-take-batch/{worker}", get(take_batch))
        .route("/job-stop/{worker}", get(stop))
        .route("/job-done/{worker}/{*job_id}", post(done))
        .route("/job-stream/{worker}/{*job_id}", post(stream))
        .route("/ping/{worker}", get(ping))
        // Results are already bounded by the worker's --max-output-bytes.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(api.clone(), require_key))
        .with_state(api)
}

async fn require_key(
    State(api): State<Arc<WorkerFacing>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if given == Some(api.key.as_str()) {
        next.run(request).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

fn json(body: String) -> Response {
    crate::http::json_answer(StatusCode::OK, body)
}

async fn take(State(api): State<Arc<WorkerFacing>>) -> Response {
    match api.store.take_wait(1, HOLD).await.pop() {
        Some(job) => json(job.to_string()),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct BatchQuery {
    batch_size: Option<usize>,
}

async fn take_batch(
    State(api): State<Arc<WorkerFacing>>,
    Query(query): Query<BatchQuery>,
) -> Response {
    let jobs = api
        .store
        .take_wait(query.batch_size.unwrap_or(1).max(1), HOLD)
        .await;
    if jobs.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let mut body = String::from("[");
    for (index, job) in jobs.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(job);
    }
    body.push(']');
    json(body)
}

async fn stop(State(api): State<Arc<WorkerFacing>>) -> Response {
    let ids = api.store.stops_wait(HOLD).await;
    if ids.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    json(serde_json::json!({ "jobsToStop": ids }).to_string())
}

/// `/job-done/{worker}/{job id}` and `/job-stream/...`: the job id after the worker segment.
#[derive(serde::Deserialize)]
struct JobPath {
    job_id: String,
}

#[derive(serde::Deserialize)]
struct DoneQuery {
    #[serde(rename = "isStream")]
    is_stream: Option<String>,
}

async fn done(
    State(api): State<Arc<WorkerFacing>>,
    Path(path): Path<JobPath>,
    Query(query): Query<DoneQuery>,
    body: Bytes,
) -> Response {
    let Some(body) = object(&body) else {
        tracing::warn!(job_id = %path.job_id, "The worker posted a result that is not a JSON object; ignored.");
        return StatusCode::BAD_REQUEST.into_response();
    };
    let is_stream = query.is_stream.as_deref() == Some("true");
    api.store.add_result(&path.job_id, body, is_stream);
    StatusCode::OK.into_response()
}

async fn stream(
    State(api): State<Arc<WorkerFacing>>,
    Path(path): Path<JobPath>,
    body: Bytes,
) -> Response {
    let Some(mut body) = object(&body) else {
        tracing::warn!(job_id = %path.job_id, "The worker posted a stream chunk that is not a JSON object; ignored.");
        return StatusCode::BAD_REQUEST.into_response();
    };
    if let Some(chunk) = body.remove("output") {
        api.store.add_chunk(&path.job_id, chunk);
    }
    StatusCode::OK.into_response()
}

#[derive(serde::Deserialize)]
struct PingQuery {
    /// The jobs the worker holds, comma-separated (absent when it holds none).
    job_id: Option<String>,
}

async fn ping(State(api): State<Arc<WorkerFacing>>, Query(query): Query<PingQuery>) -> StatusCode {
    let holds: Vec<&str> = query
        .job_id
        .as_deref()
        .map(|list| list.split(',').filter(|id| !id.is_empty()).collect())
        .unwrap_or_default();
    api.store.heartbeat(&holds);
    StatusCode::OK
}

fn object(body: &[u8]) -> Option<OrderedRawMap> {
    OrderedRawMap::parse(std::str::from_utf8(body).ok()?).ok()
}
