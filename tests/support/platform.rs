//! A stand-in for the RunPod platform's worker-facing endpoints, for running the real
//! `worker-host` binary against real HTTP on loopback.
//!
//! The stand-in owns a job queue, the pending job-stop ids, a list of injected faults per route
//! and a record of every request it received. Tests drive it through a synchronous API
//! ([`Platform`]), so plain `#[test]` functions can use it: the server runs on its own tokio
//! runtime, and a test waits for what the worker did with [`Platform::wait_for`], which wakes on
//! every new request instead of sleeping.
//!
//! Routes (see `runpod-protocol.md` §§ 2, 4, 5, 6, 8):
//!
//! | Request | [`Route`] | Normal answer |
//! |---|---|---|
//! | `GET /v2/{ep}/job-take/{worker}` | [`Route::Take`] | one job as a JSON object, or 204 after the hold |
//! | `GET /v2/{ep}/job-take-batch/{worker}?batch_size=N` | [`Route::TakeBatch`] | up to N jobs as a JSON array, or 204 after the hold |
//! | `GET /v2/{ep}/job-stop/{worker}` | [`Route::Stop`] | `{"jobsToStop": [...]}`, or 204 after the hold |
//! | `POST /v2/{ep}/job-done/{worker}/{job id}` | [`Route::Done`] | 200, empty body |
//! | `POST /v2/{ep}/job-stream/{worker}/{job id}` | [`Route::Stream`] | 200, empty body |
//! | `GET /v2/{ep}/ping/{worker}` | [`Route::Ping`] | 200, empty body |
//! | anything else | [`Route::Other`] | 404 |
//!
//! A worker segment must be a plausible worker id: non-empty and free of `&`, `=`, `?`, `$`, `/`
//! and spaces once percent-decoded, so that a worker which assembles a broken URL (such as
//! `/job-take/wk1&job_in_progress=0`, or one with an unsubstituted `$RUNPOD_POD_ID`) lands on
//! [`Route::Other`] and gets a 404.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::IntoFuture;
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// How long an empty take or job-stop poll is held before the 204, unless a test changes it.
const DEFAULT_HOLD: Duration = Duration::from_millis(200);

/// How often [`Platform::wait_for`] re-checks its predicate when no request arrives.
const RECHECK: Duration = Duration::from_millis(50);

/// How many characters of a body the request dump of a failed [`Platform::wait_for`] shows.
const DUMP_BODY_CHARS: usize = 200;

/// The worker-facing endpoint a request was aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET /v2/{ep}/job-take/{worker}`: take one job.
    Take,
    /// `GET /v2/{ep}/job-take-batch/{worker}`: take up to `batch_size` jobs.
    TakeBatch,
    /// `GET /v2/{ep}/job-stop/{worker}`: poll for jobs to cancel.
    Stop,
    /// `POST /v2/{ep}/job-done/{worker}/{job id}`: a result (or a progress update).
    Done,
    /// `POST /v2/{ep}/job-stream/{worker}/{job id}`: one streamed partial output.
    Stream,
    /// `GET /v2/{ep}/ping/{worker}`: the heartbeat.
    Ping,
    /// Anything else; answered 404.
    Other,
}

/// An answer a test forces on a route instead of the normal one (see [`Platform::inject`]).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer 429, with `Retry-After: N` (seconds) when `Some(N)`.
    TooManyRequests(Option<u64>),
    /// Close the connection without sending any HTTP answer.
    Drop,
    /// Wait this long, then answer normally.
    Stall(Duration),
    /// Answer 200 with this body and `Content-Type: application/json`.
    Body(String),
}

/// One request the stand-in received, and what it answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The endpoint the request was aimed at.
    pub route: Route,
    /// The HTTP method, e.g. `GET`.
    pub method: String,
    /// The path as received (still percent-encoded), without the query.
    pub path: String,
    /// The query as received, without the `?`; empty when there is none.
    pub raw_query: String,
    /// The query, form-decoded, in order.
    pub query: Vec<(String, String)>,
    /// The headers, names in lower case, in the order hyper keeps them (repeated names grouped).
    pub headers: Vec<(String, String)>,
    /// The body, as text (invalid UTF-8 replaced).
    pub body: String,
    /// The status the stand-in answered; 0 while a long-poll is still held, and for
    /// [`Fault::Drop`].
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
    /// When the stand-in answered it (after any [`Fault::Stall`] or long-poll hold); `None` while
    /// it is still held, and for [`Fault::Drop`].
    pub answered: Option<Instant>,
}

impl Recorded {
    /// The first value of a header, the name compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The first decoded value of a query parameter.
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON; panics, showing the request, when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body of {self} is not JSON ({e}): {}", self.body))
    }

    /// For [`Route::Done`] and [`Route::Stream`]: the job id, which is everything after
    /// `/{worker}/` in the path, percent-decoded (a `/` in a job id stays a path separator on the
    /// wire, so the id may span several segments).
    pub fn job_id(&self) -> Option<String> {
        if !matches!(self.route, Route::Done | Route::Stream) {
            return None;
        }
        let segments: Vec<&str> = self.path.trim_start_matches('/').splitn(5, '/').collect();
        segments.get(4).map(|id| percent_decode(id))
    }
}

/// One line: method, path and query, status and the start of the body.
impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.raw_query.is_empty() {
            write!(f, "?{}", self.raw_query)?;
        }
        write!(f, " -> {}", self.status)?;
        if !self.body.is_empty() {
            let start: String = self.body.chars().take(DUMP_BODY_CHARS).collect();
            let more = if start.len() < self.body.len() {
                "…"
            } else {
                ""
            };
            write!(f, " {start}{more}")?;
        }
        Ok(())
    }
}

/// The requests of `requests` aimed at `route`, in arrival order.
pub fn of_route(requests: &[Recorded], route: Route) -> Vec<&Recorded> {
    requests.iter().filter(|r| r.route == route).collect()
}

/// The final results among `requests` (job-done posts answered 200 that are not progress
/// updates), by job id; panics if a job got two.
pub fn results_by_id(requests: &[Recorded]) -> HashMap<String, Value> {
    let mut by_id = HashMap::new();
    for post in requests
        .iter()
        .filter(|r| r.route == Route::Done && r.status == 200 && r.json().get("status").is_none())
    {
        let id = post.job_id().expect("a job id in the path");
        assert!(
            by_id.insert(id.clone(), post.json()).is_none(),
            "job {id} got two results"
        );
    }
    by_id
}

/// The stand-in platform. Dropping it shuts the server down: held requests and open connections
/// are dropped with it.
pub struct Platform {
    shared: Arc<Shared>,
    base_url: String,
    /// Always `Some` until `drop` takes it.
    runtime: Option<Runtime>,
}

impl Platform {
    /// Starts the stand-in on `127.0.0.1`, port 0, on its own tokio runtime (whose worker threads
    /// run in the background). It accepts connections as soon as this returns.
    pub fn start() -> Platform {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("platform-stand-in")
            .enable_all()
            .build()
            .expect("the stand-in's runtime could not be built");
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .expect("the stand-in could not bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("the stand-in's listener could not be made non-blocking");
        let address = listener
            .local_addr()
            .expect("a bound listener has an address");

        let shared = Arc::new(Shared {
            state: Mutex::new(Inner {
                jobs: VecDeque::new(),
                raw_takes: VecDeque::new(),
                stops: Vec::new(),
                faults: HashMap::new(),
                hold: DEFAULT_HOLD,
                requests: Vec::new(),
                generation: 0,
            }),
            queues_changed: Notify::new(),
            recorded: Condvar::new(),
            started: Instant::now(),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&shared));
        {
            let _context = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)
                .expect("the listener could not join the stand-in's runtime");
            runtime.spawn(axum::serve(listener, app).into_future());
        }

        Platform {
            shared,
            base_url: format!("http://{address}"),
            runtime: Some(runtime),
        }
    }

    /// The server's root, e.g. `http://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The environment that points a worker (`RUNPOD_POD_ID=wk1`, endpoint `ep`) at this stand-in,
    /// with the URL templates as the platform sets them and a 500 ms ping interval.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let base = &self.base_url;
        [
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{base}/v2/ep/job-take/$ID?gpu=test"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{base}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=test"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{base}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=test"),
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                format!("{base}/v2/ep/ping/$RUNPOD_POD_ID?gpu=test"),
            ),
            ("RUNPOD_POD_ID", "wk1".to_owned()),
            ("RUNPOD_AI_API_KEY", "test-key".to_owned()),
            ("RUNPOD_PING_INTERVAL", "500".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Queues a job (first in, first out); a take being held is answered at once.
    pub fn push_job(&self, job: Value) {
        self.shared.lock().jobs.push_back(job);
        self.shared.queues_changed.notify_waiters();
    }

    /// The next take (single or batch) is answered with exactly this body, status 200 and
    /// `Content-Type: application/json`, ahead of any queued job; for malformed-job tests.
    pub fn push_raw_take(&self, body: &str) {
        self.shared.lock().raw_takes.push_back(body.to_owned());
        self.shared.queues_changed.notify_waiters();
    }

    /// The next job-stop poll returns this id in `{"jobsToStop": [...]}`, once.
    pub fn stop_job(&self, id: &str) {
        self.shared.lock().stops.push(id.to_owned());
        self.shared.queues_changed.notify_waiters();
    }

    /// The next `times` requests on `route` get `fault` instead of the normal answer. Faults
    /// queue up per route and are used in the order they were injected.
    pub fn inject(&self, route: Route, fault: Fault, times: usize) {
        if let Fault::Status(code) = fault {
            assert!(
                StatusCode::from_u16(code).is_ok(),
                "{code} is not an HTTP status code"
            );
        }
        self.shared
            .lock()
            .faults
            .entry(route)
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// How long an empty take or job-stop poll is held (long-poll) before the 204; applies to
    /// requests arriving from now on. 200 ms unless changed.
    pub fn set_hold(&self, hold: Duration) {
        self.shared.lock().hold = hold;
    }

    /// How many pushed jobs no take has collected yet.
    pub fn pending_jobs(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Blocks until `done(&requests)` holds, checking again on every new request or answer (and
    /// at least every 50 ms), and returns the requests it held for. On timeout, panics with
    /// `what` and a dump of every request.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let (requests, generation) = {
                let state = self.shared.lock();
                (state.requests.clone(), state.generation)
            };
            // The predicate runs without the lock, so it may call back into the platform.
            if done(&requests) {
                return requests;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; requests so far:\n{}",
                    self.dump(&requests)
                );
            }
            let state = self.shared.lock();
            let _wait = self
                .shared
                .recorded
                .wait_timeout_while(state, (deadline - now).min(RECHECK), |state| {
                    state.generation == generation
                })
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// One line per request, each with its arrival time since the start.
    fn dump(&self, requests: &[Recorded]) -> String {
        if requests.is_empty() {
            return "  (none)".to_owned();
        }
        requests
            .iter()
            .map(|r| {
                let ms = r.at.duration_since(self.shared.started).as_millis();
                format!("  +{ms}ms {r}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // Not a graceful shutdown: a worker may still hold keep-alive connections and takes.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What the server and the test threads share.
struct Shared {
    state: Mutex<Inner>,
    /// Woken when a job, raw take or stop id is queued, for the held long-polls.
    queues_changed: Notify,
    /// Woken when a request is recorded or answered, for [`Platform::wait_for`].
    recorded: Condvar,
    started: Instant,
}

/// The mutable state; every lock is short and never held across an await.
struct Inner {
    jobs: VecDeque<Value>,
    raw_takes: VecDeque<String>,
    stops: Vec<String>,
    faults: HashMap<Route, VecDeque<Fault>>,
    hold: Duration,
    requests: Vec<Recorded>,
    /// Bumped on every change to `requests`, so waiters can tell whether anything happened.
    generation: u64,
}

impl Shared {
    /// The state; a panicking test thread must not wedge the server, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the status answered to request number `index`.
    fn set_status(&self, index: usize, status: StatusCode) {
        let mut state = self.lock();
        state.requests[index].status = status.as_u16();
        state.requests[index].answered = Some(Instant::now());
        state.generation += 1;
        drop(state);
        self.recorded.notify_all();
    }

    /// Answers with what `take` finds in the state, or, when it finds nothing, waits for the
    /// queues to change until the hold time has passed and then answers 204.
    async fn long_poll(
        &self,
        hold: Duration,
        mut take: impl FnMut(&mut Inner) -> Option<String>,
    ) -> Answer {
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            // Registered before looking, so a push between the look and the wait still wakes us.
            let mut changed = pin!(self.queues_changed.notified());
            changed.as_mut().enable();
            let found = take(&mut self.lock());
            if let Some(body) = found {
                return Answer::Json(StatusCode::OK, body);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Answer::Empty(StatusCode::NO_CONTENT);
            }
        }
    }
}

/// The answer to one request.
enum Answer {
    /// This status and an empty body.
    Empty(StatusCode),
    /// This status and this body, as `application/json`.
    Json(StatusCode, String),
    /// 429, with `Retry-After` when given.
    TooManyRequests(Option<u64>),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Empty(status) | Answer::Json(status, _) => *status,
            Answer::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Empty(status) => status.into_response(),
            Answer::Json(status, body) => (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            Answer::TooManyRequests(None) => StatusCode::TOO_MANY_REQUESTS.into_response(),
            Answer::TooManyRequests(Some(seconds)) => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, HeaderValue::from(seconds))],
            )
                .into_response(),
        }
    }
}

/// The single handler: records the request, then answers with a fault or the normal behaviour.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = classify(&method, uri.path());
    let raw_query = uri.query().unwrap_or_default().to_owned();
    let query: Vec<(String, String)> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let mut recorded = Recorded {
        route,
        method: method.to_string(),
        path: uri.path().to_owned(),
        raw_query,
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: 0,
        at: Instant::now(),
        answered: None,
    };

    let (index, fault, hold) = {
        let mut state = shared.lock();
        // Stamped under the lock, so arrival times never disagree with the recorded order.
        recorded.at = Instant::now();
        state.requests.push(recorded);
        state.generation += 1;
        let fault = state.faults.get_mut(&route).and_then(VecDeque::pop_front);
        (state.requests.len() - 1, fault, state.hold)
    };
    shared.recorded.notify_all();

    let answer = match fault {
        Some(Fault::Status(code)) => {
            Answer::Empty(StatusCode::from_u16(code).expect("inject checked the code"))
        }
        Some(Fault::TooManyRequests(retry_after)) => Answer::TooManyRequests(retry_after),
        Some(Fault::Body(body)) => Answer::Json(StatusCode::OK, body),
        Some(Fault::Drop) => {
            // Unwinding out of the handler ends hyper's connection task, which drops the socket
            // before a byte of the response is written. `resume_unwind` skips the panic hook, so
            // nothing is printed; tokio catches the unwind at the task boundary.
            std::panic::resume_unwind(Box::new("dropped by Fault::Drop"));
        }
        Some(Fault::Stall(delay)) => {
            tokio::time::sleep(delay).await;
            normal(&shared, route, &query, hold).await
        }
        None => normal(&shared, route, &query, hold).await,
    };
    shared.set_status(index, answer.status());
    answer.into_response()
}

/// The answer of a route when no fault is injected.
async fn normal(
    shared: &Shared,
    route: Route,
    query: &[(String, String)],
    hold: Duration,
) -> Answer {
    match route {
        Route::Take => {
            shared
                .long_poll(hold, |state| {
                    state
                        .raw_takes
                        .pop_front()
                        .or_else(|| state.jobs.pop_front().map(|job| job.to_string()))
                })
                .await
        }
        Route::TakeBatch => {
            let batch_size = query
                .iter()
                .find(|(key, _)| key == "batch_size")
                .and_then(|(_, value)| value.parse::<usize>().ok())
                .filter(|&n| n > 0);
            let Some(batch_size) = batch_size else {
                return Answer::Empty(StatusCode::BAD_REQUEST);
            };
            shared
                .long_poll(hold, |state| {
                    if let Some(raw) = state.raw_takes.pop_front() {
                        return Some(raw);
                    }
                    if state.jobs.is_empty() {
                        return None;
                    }
                    let n = batch_size.min(state.jobs.len());
                    Some(Value::Array(state.jobs.drain(..n).collect()).to_string())
                })
                .await
        }
        Route::Stop => {
            shared
                .long_poll(hold, |state| {
                    if state.stops.is_empty() {
                        return None;
                    }
                    let ids = std::mem::take(&mut state.stops);
                    Some(serde_json::json!({ "jobsToStop": ids }).to_string())
                })
                .await
        }
        Route::Done | Route::Stream | Route::Ping => Answer::Empty(StatusCode::OK),
        Route::Other => Answer::Empty(StatusCode::NOT_FOUND),
    }
}

/// The route of a request, from its method and raw path.
fn classify(method: &Method, path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Other;
    };
    let segments: Vec<&str> = rest.splitn(4, '/').collect();
    let (endpoint, kind, worker, tail) = match segments[..] {
        [endpoint, kind, worker] => (endpoint, kind, worker, None),
        [endpoint, kind, worker, tail] => (endpoint, kind, worker, Some(tail)),
        _ => return Route::Other,
    };
    if endpoint.is_empty() || !is_worker_id(worker) {
        return Route::Other;
    }
    match (method, kind, tail) {
        (&Method::GET, "job-take", None) => Route::Take,
        (&Method::GET, "job-take-batch", None) => Route::TakeBatch,
        (&Method::GET, "job-stop", None) => Route::Stop,
        (&Method::GET, "ping", None) => Route::Ping,
        (&Method::POST, "job-done", Some(id)) if !id.is_empty() => Route::Done,
        (&Method::POST, "job-stream", Some(id)) if !id.is_empty() => Route::Stream,
        _ => Route::Other,
    }
}

/// Whether a raw path segment can be a worker id rather than the debris of a broken URL.
fn is_worker_id(segment: &str) -> bool {
    let id = percent_decode(segment);
    !id.is_empty() && !id.contains(['&', '=', '?', '$', '/', ' '])
}

/// Decodes `%XX` escapes (and only those: `+` stays `+` in a path); invalid UTF-8 is replaced.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}
