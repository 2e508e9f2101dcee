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
//!
//! Shutdown (SIGTERM or Ctrl-C): the public port stops accepting, the worker drains as in
//! production (running jobs get the grace period), then both servers stop.

pub mod public;
pub mod store;
pub mod webhook;
pub mod worker_facing;

use crate::handler::Handler;
use crate::runpod::{PlatformClient, PlatformUrls, UrlError};
use crate::worker::WorkerConfig;
use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreLimits};
use tokio_util::sync::CancellationToken;

/// How long in-flight public requests may go on after the worker has drained at shutdown.
const PUBLIC_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

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
    let address = format!("{host}:{port}");
    let bind = || {
        let listener = std::net::TcpListener::bind((host, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    bind().map_err(|source| DevApiError::Bind { address, source })
}

/// Serves the dev API on `listener` and runs the worker against it until `shutdown` resolves.
pub async fn serve(
    handler: Arc<dyn Handler>,
    listener: std::net::TcpListener,
    config: DevApiConfig,
    worker: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DevApiError> {
    let public_listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| DevApiError::Bind {
            address: "the dev API address".into(),
            source,
        })?;
    let public_address = public_listener
        .local_addr()
        .map_err(DevApiError::Loopback)?;
    let loopback = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(DevApiError::Loopback)?;
    let loopback_address = loopback.local_addr().map_err(DevApiError::Loopback)?;

    let (webhook_sender, webhook_receiver) = tokio::sync::mpsc::unbounded_channel();
    let store = Arc::new(Store::new(
        config.limits.clone(),
        config.worker_id.clone(),
        webhook_sender,
    ));
    let key = format!("{:032x}", rand::random::<u128>());
    let client = PlatformClient::new(
        &worker_urls(loopback_address, &key, &config.worker_id),
        config.max_input_bytes,
    )?;

    let background = tokio_util::task::TaskTracker::new();
    let sweeper_store = store.clone();
    let sweeper = tokio::spawn(async move { sweeper_store.sweep_forever().await });
    let webhooks = tokio::spawn(webhook::deliver_all(webhook_receiver, config.webhook_retry));

    let worker_done = CancellationToken::new();
    let facing = worker_facing::router(Arc::new(worker_facing::WorkerFacing {
        store: store.clone(),
        key,
    }));
    let facing_stop = worker_done.clone();
    background.spawn(async move {
        let server = axum::serve(loopback.tap_io(no_delay), facing)
            .with_graceful_shutdown(async move { facing_stop.cancelled().await });
        if let Err(error) = server.await {
            tracing::error!("The worker's loopback server failed: {error}");
        }
    });

    let stop_accepting = CancellationToken::new();
    let public = public::router(Arc::new(public::PublicApi {
        store: store.clone(),
        api_key: config.api_key.clone(),
    }));
    let public_stop = stop_accepting.clone();
    let public_server = tokio::spawn(async move {
        let server = axum::serve(public_listener.tap_io(no_delay), public)
            .with_graceful_shutdown(async move { public_stop.cancelled().await });
        if let Err(error) = server.await {
            tracing::error!("The dev API server failed: {error}");
        }
    });
    announce(public_address, config.api_key.is_some());

    let stop = stop_accepting.clone();
    crate::worker::run(handler, client, worker, async move {
        shutdown.await;
        stop.cancel();
    })
    .await;
    stop_accepting.cancel();
    worker_done.cancel();
    // Requests still open (a /runsync whose job never started) are cut after a short grace.
    let _ = tokio::time::timeout(PUBLIC_SHUTDOWN_GRACE, public_server).await;
    background.close();
    let _ = tokio::time::timeout(PUBLIC_SHUTDOWN_GRACE, background.wait()).await;
    sweeper.abort();
    webhooks.abort();
    Ok(())
}

/// Small answers go out at once instead of waiting on Nagle's algorithm.
fn no_delay(stream: &mut tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {error}");
    }
}

/// The platform URLs the worker uses: the private loopback port, in the platform's shapes.
fn worker_urls(address: SocketAddr, key: &str, worker_id: &str) -> PlatformUrls {
    let base = format!("http://{address}");
    PlatformUrls {
        job_take: format!("{base}/job-take/$ID"),
        job_done: Some(format!("{base}/job-done/$RUNPOD_POD_ID/$ID")),
        job_stream: Some(format!("{base}/job-stream/$RUNPOD_POD_ID/$ID")),
        ping: Some(format!("{base}/ping/$RUNPOD_POD_ID")),
        api_key: key.to_owned(),
        worker_id: worker_id.to_owned(),
    }
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
