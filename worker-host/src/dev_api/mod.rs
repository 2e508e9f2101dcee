//! The local dev API (`--rp_serve_api`): RunPod's public endpoint API on localhost, so the
//! official client (`runpod.Endpoint` with `RUNPOD_ENDPOINT_BASE_URL=http://HOST:PORT/v2`), curl
//! or any app can call the handler exactly as production calls it.
//!
//! It is a faithful local stand-in of the platform, in three parts sharing one [`store::Store`]:
//! - [`public`]: the public routes users call (`/run`, `/runsync`, `/status`, `/stream`, ...);
//! - [`worker_facing`]: the platform's worker routes (job-take, job-done, ...) on a private
//!   loopback port;
//! - the ordinary queue worker ([`crate::worker::run`]) of this process, pointed at that port.
//!
//! So jobs run on the production code path, with the same concurrency, limits and error shapes;
//! the loopback hop costs tens of microseconds. [`webhook`] sends final statuses to webhooks.
//! [`crate::http`] serves both halves over HTTP/1.1 (request limits below the routers, JSON
//! bodies for hyper's own rejections, the header read timeout, graceful shutdown).
//!
//! Shutdown (SIGTERM or Ctrl-C): new jobs (and retries) are refused (503) while the worker drains
//! as in production (running jobs get the grace period) and results stay readable; then waiting
//! requests answer with the current status, the servers stop, and the webhooks of finished jobs,
//! those under way and those still queued, get a few seconds (what is left then is abandoned
//! and logged by job id). Queued jobs that never started are dropped with the process.

pub mod public;
pub mod store;
pub mod webhook;
pub mod worker_facing;

use crate::handler::{Current, LiveHandler};
use crate::http::connections;
use crate::http::startup::{OwnRoute, StartupGate};
use crate::runpod::{PlatformClient, UrlError};
use crate::worker::WorkerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreLimits};
use tokio_util::sync::CancellationToken;

/// How long open requests may take to answer once the worker has drained at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long webhook deliveries (under way or queued) may go on at shutdown.
const WEBHOOK_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the dev API runs.
#[derive(Debug, Clone)]
pub struct DevApiConfig {
    /// When set, public requests need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The wait between webhook attempts.
    pub webhook_retry: Duration,
    /// Retention of finished jobs.
    pub limits: StoreLimits,
    /// The local worker's id (`workerId` in status objects).
    pub worker_id: String,
    /// The largest job input the worker accepts, in bytes.
    pub max_input_bytes: usize,
}

/// Why the dev API could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevApiError {
    /// The public address could not be bound.
    #[error("cannot listen on {address}: {source}; pick another --rp_api_port or --rp_api_host")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The private loopback port for the worker could not be set up.
    #[error("cannot open the worker's loopback port: {0}")]
    Loopback(std::io::Error),
    /// The worker's URLs could not be built.
    #[error(transparent)]
    Url(#[from] UrlError),
}

/// Binds the public address (before the handler's init, so a taken port is reported at once).
pub fn bind(host: &str, port: u16) -> Result<std::net::TcpListener, DevApiError> {
    connections::bind(host, port).map_err(|source| DevApiError::Bind {
        address: format!("{host}:{port}"),
        source,
    })
}

/// The public half's server, listening from before the handler's `init`: until [`serve`] opens
/// it, `/ping` answers 204 and other requests wait (see [`crate::http::startup`]).
#[derive(Debug)]
pub struct PublicServer {
    address: SocketAddr,
    gate: StartupGate,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl PublicServer {
    /// Starts serving `listener` on `runtime`.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        api_key: Option<String>,
    ) -> Result<Self, DevApiError> {
        let address = listener.local_addr().map_err(|source| DevApiError::Bind {
            address: "the dev API's socket".into(),
            source,
        })?;
        let _entered = runtime.enter();
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|source| DevApiError::Bind {
                address: address.to_string(),
                source,
            })?;
        let (gate, router) = StartupGate::new(
            |path| match public::route_of(path) {
                Some("ping") => Some(OwnRoute::Ping),
                Some("metrics") => Some(OwnRoute::Metrics),
                _ => None,
            },
            api_key,
        );
        let router = router.layer(axum::middleware::map_response(crate::http::json_errors));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = runtime.spawn(connections::serve(
            listener,
            router,
            Some(connections::header_read_timeout()),
            async move { stopped.cancelled().await },
        ));
        Ok(Self {
            address,
            gate,
            stop,
            server,
        })
    }

    /// The handler's `init` failed: the requests held meanwhile are answered 503 (the gate
    /// closes for good), then the server stops (bounded).
    pub async fn init_failed(self) {
        drop(self.gate);
        self.stop.cancel();
        connections::close_within(vec![self.server], SHUTDOWN_GRACE).await;
    }
}

/// Serves the dev API on `public` and runs the worker against it until `shutdown` resolves.
/// Handler calls cancelled at shutdown may still run when it returns (see [`crate::worker::run`]).
pub async fn serve(
    live: Arc<LiveHandler>,
    public: PublicServer,
    config: DevApiConfig,
    mut worker: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<crate::worker::WorkerExit, DevApiError> {
    let public_address = public.address;
    let loopback = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(DevApiError::Loopback)?;
    let loopback_address = loopback.local_addr().map_err(DevApiError::Loopback)?;

    let (webhook_sender, webhooks) = webhook::channel(config.webhook_retry);
    let limits = StoreLimits {
        worker_slots: live
            .serving()
            .map_or(1, |generation| worker.slots_for(generation.info())),
        ..config.limits.clone()
    };
    let store = Arc::new(Store::new(limits, config.worker_id.clone(), webhook_sender));
    let key = format!("{:032x}", rand::random::<u128>());
    let client = PlatformClient::new(
        &worker_facing::worker_urls(
            &format!("http://{loopback_address}"),
            &key,
            &config.worker_id,
        ),
        config.max_input_bytes,
    )?;
    worker.ping_interval = worker_facing::HEARTBEAT_PERIOD;

    let slots_store = store.clone();
    let slots_worker = worker.clone();
    let mut current = live.subscribe();
    let slots_follower = tokio::spawn(async move {
        while current.changed().await.is_ok() {
            if let Current::Serving(generation) = &*current.borrow_and_update() {
                slots_store.set_worker_slots(slots_worker.slots_for(generation.info()));
            }
        }
    });
    let sweeper_store = store.clone();
    let sweeper = tokio::spawn(async move { sweeper_store.sweep_forever().await });
    let webhooks_stop = CancellationToken::new();
    let webhooks_stopped = webhooks_stop.clone();
    let webhooks = tokio::spawn(webhooks.run(
        async move { webhooks_stopped.cancelled().await },
        WEBHOOK_SHUTDOWN_GRACE,
    ));

    let worker_done = CancellationToken::new();
    let facing = worker_facing::router(Arc::new(worker_facing::WorkerFacing {
        store: store.clone(),
        key,
    }));
    let facing_stop = worker_done.clone();
    // The worker's own loopback connections are never timed out: a pooled one closed under it
    // would only cost a retry, but nothing here needs guarding against.
    let facing_server = tokio::spawn(connections::serve(loopback, facing, None, async move {
        facing_stop.cancelled().await
    }));

    let draining = CancellationToken::new();
    public.gate.open(public::router(Arc::new(public::PublicApi {
        store: store.clone(),
        api_key: config.api_key.clone(),
        draining: draining.clone(),
        live: live.clone(),
    })));
    let stop_accepting = public.stop;
    let public_server = public.server;
    announce(public_address, config.api_key.is_some());

    // At the signal new jobs are refused, while running ones finish (or are failed at the end of
    // the grace period) and their results stay readable.
    let exit = crate::worker::run(live, client, worker, async move {
        shutdown.await;
        draining.cancel();
    })
    .await;
    // Waiting /runsync and /stream requests answer with the current status, then the servers go.
    store.close();
    stop_accepting.cancel();
    connections::close_within(vec![public_server], SHUTDOWN_GRACE).await;
    worker_done.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, facing_server).await;
    // Jobs no longer end (a straggling request's webhook would be dropped, and logged): the
    // calls queued are delivered, or abandoned and logged, within the grace.
    sweeper.abort();
    slots_follower.abort();
    webhooks_stop.cancel();
    if tokio::time::timeout(WEBHOOK_SHUTDOWN_GRACE + SHUTDOWN_GRACE, webhooks)
        .await
        .is_err()
    {
        tracing::warn!("Webhook deliveries still under way at exit are abandoned.");
    }
    Ok(exit)
}

/// Logs where the API listens and how to point the official client at it.
fn announce(address: SocketAddr, keyed: bool) {
    let shown = if address.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
    } else {
        address
    };
    tracing::info!(
        "Local dev API listening on http://{shown} (RUNPOD_ENDPOINT_BASE_URL=http://{shown}/v2){}",
        if keyed {
            "; requests need Authorization: Bearer <--api-key>"
        } else {
            ""
        }
    );
}
