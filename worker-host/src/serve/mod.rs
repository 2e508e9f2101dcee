//! Load-balancing mode (`--load-balancing`): the handler served over HTTP, as RunPod's
//! load-balancing endpoints send requests straight to a worker's own server, with no queue in
//! between.
//!
//! Routes, on `0.0.0.0:$PORT`:
//! - the health path (`$HEALTH_CHECK_PATH`, default `/ping`; on `$PORT_HEALTH` when that differs
//!   from `$PORT`), as the platform polls it: **204 while `init` runs, 200 when the worker can
//!   take a job**, 503 while it cannot (its runner is being restarted, a drain-first swap, or it
//!   is shutting down). The listener is up before `init` starts.
//! - `GET /metrics`: the host's metrics ([`crate::metrics`]).
//! - every other path and method runs one job ([`request`] says what the job holds, `admission`
//!   when it may run or gets 429, `answer` how it is answered, streamed, limited and cancelled,
//!   and `abandoned` what becomes of jobs whose clients went away).
//!
//! Every error is JSON (`{"error": "..."}`); `--api-key` guards everything but the health path.
//! A request body over `--max-input-bytes` (30 MB by default in this mode, the platform's limit)
//! gets 413.
//!
//! Shutdown (SIGTERM or Ctrl-C): the health check and new requests answer 503 at once; admitted
//! requests (running or waiting) go on for the grace period (`--shutdown-grace-secs`); those
//! still running then are cancelled and answered with a shutdown error; then the server stops.

mod abandoned;
mod admission;
mod answer;
pub mod request;

use crate::handler::{Current, LiveHandler, Readiness};
use crate::http::{check_key, connections, error_answer, json_errors};
use crate::job::Origin;
use crate::worker::{WorkerConfig, WorkerExit};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The platform's limit on a load-balancing request or answer: 30 MB each way.
pub const DEFAULT_MAX_BODY_BYTES: usize = 30_000_000;

/// How long a request's body may take to arrive (it holds a waiting place meanwhile, never a
/// slot); then 408.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// How long open connections may take to finish their answers once the jobs are over at
/// shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How the load-balancing server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The address to listen on (`0.0.0.0`, as the platform needs).
    pub host: String,
    /// The port (`$PORT`, default 80; 0 picks a free one, and the log says which).
    pub port: u16,
    /// The health check's own port (`$PORT_HEALTH`), when it differs from `port`.
    pub health_port: Option<u16>,
    /// The health check's path (`$HEALTH_CHECK_PATH`, default `/ping`).
    pub health_path: String,
    /// When set, requests but the health check need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How many jobs run at once (capped by what the handler allows).
    pub concurrency: usize,
    /// How many admitted requests may wait for a slot; beyond that, 429.
    pub max_waiting: usize,
    /// The largest request body, in bytes.
    pub max_input_bytes: usize,
    /// How long admitted requests may go on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The cancel grace (`--cancel-grace-secs`): here, how long a job's handler may ignore the
    /// cancel of a client that went away before, when every slot is held so and a request needs
    /// one, it is stopped (see `abandoned`).
    pub cancel_grace: Duration,
    /// Where error payloads say they come from.
    pub origin: Origin,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An address could not be bound.
    #[error("cannot listen on {address}: {source}; pick another --port (or $PORT, $PORT_HEALTH)")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The queue worker's `--metrics-port` could not be bound.
    #[error("cannot listen on {address} for /metrics: {source}; pick another --metrics-port")]
    MetricsBind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Where the worker is in its life, as requests and the health check see it.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// `init` runs: health 204, requests wait.
    Starting,
    /// Serving jobs on this handler.
    Serving(Arc<LiveHandler>),
    /// `init` failed: nothing will be served.
    Failed,
    /// Shutting down: health and new requests 503.
    Draining,
}

/// What every request shares.
#[derive(Debug)]
pub(crate) struct ServeState {
    phase: watch::Receiver<Phase>,
    /// One permit per slot the operator asked for (`--concurrency`); a job holds one until its
    /// handler returns. Those beyond what the handler serving allows are held back
    /// ([`follow_the_handler`]).
    running: Arc<Semaphore>,
    /// How many slots there are now.
    slots: AtomicUsize,
    /// How many admitted requests wait for a slot.
    waiting: AtomicUsize,
    /// Cancelled at the end of the shutdown grace: jobs still running are ended.
    stop_jobs: CancellationToken,
    /// The jobs running, and which were given up by their clients.
    running_jobs: abandoned::RunningJobs,
    config: ServeConfig,
}

/// The load-balancing server, listening from before the handler's `init`.
#[derive(Debug)]
pub struct Server {
    phase: watch::Sender<Phase>,
    state: Arc<ServeState>,
    stop_accepting: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds one address (before `init`, so a taken port is reported at once).
fn bind(host: &str, port: u16) -> Result<std::net::TcpListener, ServeError> {
    connections::bind(host, port).map_err(|source| ServeError::Bind {
        address: format!("{host}:{port}"),
        source,
    })
}

impl Server {
    /// Binds and starts serving on `runtime`: the health check says 204 and requests wait until
    /// [`Server::serve`].
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        config: ServeConfig,
    ) -> Result<Self, ServeError> {
        let slots = config.concurrency.max(1);
        let main = bind(&config.host, config.port)?;
        let health = match config.health_port {
            Some(port) if port != config.port => Some(bind(&config.host, port)?),
            _ => None,
        };
        let (phase, watched) = watch::channel(Phase::Starting);
        let state = Arc::new(ServeState {
            phase: watched,
            running: Arc::new(Semaphore::new(slots)),
            slots: AtomicUsize::new(slots),
            waiting: AtomicUsize::new(0),
            stop_jobs: CancellationToken::new(),
            running_jobs: abandoned::RunningJobs::default(),
            config,
        });
        let stop_accepting = CancellationToken::new();
        let timeout = Some(connections::header_read_timeout());
        let _entered = runtime.enter();
        let mut servers = Vec::new();
        let mut announce = Vec::new();
        let mut listen = |listener: std::net::TcpListener, router: Router| {
            let address = listener.local_addr().map_err(|source| ServeError::Bind {
                address: "the server's socket".into(),
                source,
            })?;
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(|source| ServeError::Bind {
                    address: address.to_string(),
                    source,
                })?;
            let stop = stop_accepting.clone();
            servers.push(runtime.spawn(connections::serve(
                listener,
                router,
                timeout,
                async move { stop.cancelled().await },
            )));
            announce.push(address);
            Ok::<_, ServeError>(())
        };
        match health {
            Some(health) => {
                listen(main, router(&state, false))?;
                listen(health, health_router(&state))?;
                tracing::info!(
                    "Load-balancing server listening on {} (health check on {} at {})",
                    announce[0],
                    announce[1],
                    state.config.health_path
                );
            }
            None => {
                listen(main, router(&state, true))?;
                tracing::info!(
                    "Load-balancing server listening on {} (health check at {})",
                    announce[0],
                    state.config.health_path
                );
            }
        }
        Ok(Self {
            phase,
            state,
            stop_accepting,
            servers,
        })
    }

    /// `init` failed: the health check and the requests held during `init` answer 503, and
    /// the server closes (bounded).
    pub async fn init_failed(self) {
        self.close_before_serving(Phase::Failed).await;
    }

    /// A shutdown was asked for during `init`: as [`Self::init_failed`], but the answers say
    /// the worker is shutting down.
    pub async fn stopped_during_init(self) {
        self.close_before_serving(Phase::Draining).await;
    }

    async fn close_before_serving(self, phase: Phase) {
        self.phase.send_replace(phase);
        self.stop_accepting.cancel();
        connections::close_within(self.servers, CLOSE_GRACE).await;
    }

    /// Serves jobs on `live` until `shutdown` resolves (or the handler cannot serve any more),
    /// then drains (see the module doc).
    pub async fn serve(
        self,
        live: Arc<LiveHandler>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> WorkerExit {
        // The slots follow the handler serving: its limit after init, then each swap's.
        let follower = tokio::spawn(follow_the_handler(self.state.clone(), live.clone()));
        self.phase.send_replace(Phase::Serving(live.clone()));
        let exit = tokio::select! {
            () = shutdown => {
                tracing::info!("Shutdown signal received: no new requests are taken.");
                WorkerExit::Stopped
            }
            reason = cannot_serve(&live) => {
                tracing::error!("The handler cannot serve any more: {reason}. The worker stops.");
                WorkerExit::HandlerFailed(reason)
            }
        };
        self.phase.send_replace(Phase::Draining);
        // Its held-back permits come back, so the drain below waits for the jobs alone.
        follower.abort();
        let _ = follower.await;
        let slots = u32::try_from(self.state.config.concurrency.max(1)).unwrap_or(u32::MAX);
        // The semaphore is fair: every admitted request (running or waiting) is ahead of this.
        let drained = tokio::time::timeout(
            self.state.config.shutdown_grace,
            self.state.running.acquire_many(slots),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(
                "Jobs still running after the shutdown grace ({:?}) are cancelled.",
                self.state.config.shutdown_grace
            );
        }
        self.state.stop_jobs.cancel();
        self.stop_accepting.cancel();
        connections::close_within(self.servers, CLOSE_GRACE).await;
        exit
    }
}

/// Keeps the number of slots at what the handler serving allows (`--concurrency`, lowered to its
/// `max_concurrency` as `init` reported it): permits beyond that are held back here, and given
/// back or held as swaps change the limit.
async fn follow_the_handler(state: Arc<ServeState>, live: Arc<LiveHandler>) {
    let asked = state.config.concurrency.max(1);
    let mut held_back: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut current = live.subscribe();
    loop {
        let limit = match &*current.borrow_and_update() {
            Current::Serving(generation) => Some(WorkerConfig::slots(asked, generation.info())),
            Current::Swapping | Current::Failed(_) => None,
        };
        if let Some(slots) = limit {
            let beyond = asked - slots;
            let held = held_back
                .as_ref()
                .map_or(0, |permits| permits.num_permits());
            if beyond < held {
                if let Some(permits) = held_back.as_mut() {
                    drop(permits.split(held - beyond));
                }
            } else if beyond > held {
                let more = state
                    .running
                    .clone()
                    .acquire_many_owned(u32::try_from(beyond - held).unwrap_or(u32::MAX))
                    .await
                    .expect("the semaphore is never closed");
                match held_back.as_mut() {
                    Some(permits) => permits.merge(more),
                    None => held_back = Some(more),
                }
            }
            state
                .slots
                .store(slots, std::sync::atomic::Ordering::Release);
            crate::metrics::get().set_concurrency(slots);
        }
        if current.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves with the reason once the handler can never serve again (a crash loop, a restart
/// whose `init` failed).
async fn cannot_serve(live: &LiveHandler) -> String {
    let mut current = live.subscribe();
    loop {
        let now = current.borrow_and_update().clone();
        match now {
            Current::Failed(reason) => return reason,
            Current::Swapping => {}
            Current::Serving(generation) => {
                let mut readiness = generation.handler().readiness();
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return std::future::pending().await },
                    state = readiness.wait_for(|state| matches!(state, Readiness::Failed(_))) => {
                        if let Ok(state) = state {
                            if let Readiness::Failed(reason) = &*state {
                                return reason.clone();
                            }
                        }
                        return std::future::pending().await;
                    }
                }
                continue;
            }
        }
        if current.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The main router: jobs, `/metrics`, and the health check when it shares the port.
fn router(state: &Arc<ServeState>, with_health: bool) -> Router {
    // The host's own two paths answer GET only (other methods there get 405).
    let mut router = Router::new().route("/metrics", get(metrics));
    if with_health {
        router = router.route(&state.config.health_path, get(health));
    }
    router
        .fallback(job)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state.clone())
}

/// The health port's router: the health check, and 404 for the rest.
fn health_router(state: &Arc<ServeState>) -> Router {
    Router::new()
        .route(&state.config.health_path, get(health))
        .fallback(|| async {
            error_answer(
                StatusCode::NOT_FOUND,
                "this port answers only the health check",
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state.clone())
}

/// RunPod's health contract: 204 while `init` runs, 200 ready, 503 otherwise.
async fn health(State(state): State<Arc<ServeState>>) -> Response {
    let phase = state.phase.borrow().clone();
    match phase {
        Phase::Starting => StatusCode::NO_CONTENT.into_response(),
        Phase::Serving(live) => {
            let ready = live.serving().is_some_and(|generation| {
                *generation.handler().readiness().borrow() == Readiness::Ready
            });
            if ready {
                crate::http::json_answer(StatusCode::OK, r#"{"status":"ready"}"#)
            } else {
                error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the handler is restarting or being swapped",
                )
            }
        }
        Phase::Failed => error_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the handler's init failed: this worker cannot serve",
        ),
        Phase::Draining => error_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is shutting down",
        ),
    }
}

async fn metrics(State(state): State<Arc<ServeState>>, request: Request) -> Response {
    if let Some(refused) = refused(&state, &request) {
        return refused;
    }
    crate::metrics::answer()
}

/// The 401 for a request without the key, when one is set.
fn refused(state: &ServeState, request: &Request) -> Option<Response> {
    state
        .config
        .api_key
        .as_deref()
        .and_then(|key| check_key(request.headers(), key))
}

/// Any other request: one job.
async fn job(State(state): State<Arc<ServeState>>, request: Request) -> Response {
    if let Some(refused) = refused(&state, &request) {
        return answer::counted(refused);
    }
    if matches!(&*state.phase.borrow(), Phase::Draining | Phase::Failed) {
        return answer::counted(answer::shutting_down());
    }
    let id = request::job_id(request.headers());
    let format = answer::StreamFormat::for_accept(request.headers().get(header::ACCEPT));
    let span = tracing::info_span!("job", job_id = %id);
    async move {
        let admitted = async {
            let Some(admission) = admission::admit(&state) else {
                return Err(admission::busy(&state));
            };
            let limit = state.config.max_input_bytes;
            let (parts, body) = request.into_parts();
            let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit));
            let body = match read.await {
                Ok(Ok(body)) => body,
                Ok(Err(error)) => return Err(body_error(&error, limit)),
                Err(_) => {
                    return Err(error_answer(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("the request body did not arrive within {BODY_READ_TIMEOUT:?}"),
                    ))
                }
            };
            let job = request::job(&id, &parts.method, &parts.uri, &parts.headers, &body)
                .map_err(|error| error_answer(StatusCode::BAD_REQUEST, error.to_string()))?;
            drop(body);
            Ok((job, admission.slot().await?))
        };
        match admitted.await {
            Ok((job, permit)) => answer::run(state, job, permit, format).await,
            Err(refusal) => answer::counted(refusal),
        }
    }
    .instrument(span)
    .await
}

/// The answer for a body that could not be read: 413 over the limit, else 400.
fn body_error(error: &axum::Error, limit: usize) -> Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return error_answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the limit of {limit} bytes (--max-input-bytes)"),
            );
        }
        source = cause.source();
    }
    error_answer(
        StatusCode::BAD_REQUEST,
        format!("the request body could not be read: {error}"),
    )
}
