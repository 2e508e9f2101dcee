//! worker-host: runs a handler compiled as a shared library as a RunPod serverless worker.
//!
//! The data flows one way: [`cli`] → [`config`] → [`handler`] (load, check, init) → a mode:
//! [`oneshot`] (one test job), [`worker`] (the RunPod queue worker, over [`runpod`]) or
//! [`dev_api`] (RunPod's public API on localhost, with the same worker behind it). `main` only
//! parses, sets up logging, calls [`run`] and maps the result to an exit code ([`exit`]).
//! [`scaffold`] is apart from that flow: `worker-host new` writes a handler project and runs none.

mod buffers;
pub mod cli;
pub mod config;
pub mod dev_api;
pub mod exit;
pub mod handler;
pub mod http;
pub mod job;
pub mod logging;
pub mod metrics;
pub mod oneshot;
pub mod runpod;
pub mod scaffold;
pub mod serve;
mod shutdown;
pub mod worker;

use config::{ConfigError, Mode, Settings};
use handler::{Generation, HandlerInfo, LiveHandler, LoadError, PrivateCopies, PrivateDir};
use shutdown::Shutdown;
use std::sync::Arc;

/// Why the host stopped before doing its work.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The settings are wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The handler could not be loaded or initialised.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A platform URL template is not a URL.
    #[error(transparent)]
    Url(#[from] runpod::UrlError),
    /// The handler's init failed in production (reported to the platform as unhealthy).
    #[error("{0}")]
    WorkerInitFailed(LoadError),
    /// The handler stopped being able to serve (a crash loop), reported as unhealthy.
    #[error("{0}")]
    HandlerFailed(String),
    /// The local dev API could not start.
    #[error(transparent)]
    DevApi(#[from] dev_api::DevApiError),
    /// The load-balancing server (or the metrics port) could not start.
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    /// The async runtime could not start.
    #[error("the async runtime could not start: {0}")]
    Runtime(std::io::Error),
}

impl HostError {
    /// The process exit code for this error (documented in the README and in [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(error) if error.is_test_input_error() => exit::JOB_FAILED,
            Self::Config(_) | Self::Url(_) => exit::USAGE,
            Self::DevApi(dev_api::DevApiError::Bind { .. }) => exit::USAGE,
            Self::Serve(_) => exit::USAGE,
            Self::DevApi(_) => exit::JOB_FAILED,
            Self::WorkerInitFailed(_) | Self::HandlerFailed(_) | Self::Runtime(_) => {
                exit::JOB_FAILED
            }
            Self::Load(error) => exit::for_load_error(error),
        }
    }
}

/// Runs the host with resolved settings; returns the exit code.
pub fn run(settings: Settings) -> Result<u8, HostError> {
    // The handler is loaded from a private copy (see `handler`); the directory of the copies
    // goes when this returns, whatever still refers to them (runtime tasks, a swap under way).
    let private_dir = PrivateDir::create().map_err(|error| LoadError::PrivateCopy {
        reason: error.to_string(),
    })?;
    let copies = private_dir.copies().clone();
    // For --watch: the file as it was copied, so a change during `init` is seen.
    let loaded = settings
        .swaps
        .watch
        .then(|| handler::Fingerprint::of(&settings.handler.path))
        .flatten();
    let first = Generation::load(&settings.handler, &copies, 1)?;
    let handler = first.handler().clone();
    let info = first.info().clone();
    let Settings {
        mode,
        handler: spec,
        handler_config,
        swaps,
        results,
        io_threads,
        ..
    } = settings;
    let serving = |first| Serving {
        first,
        io_threads,
        spec,
        config: handler_config.clone(),
        swaps,
        copies,
        loaded,
    };
    tracing::debug!(
        handler = %info.name,
        version = %info.version,
        abi = %format_args!("{}.{}", info.abi_major, info.abi_minor),
        "handler loaded"
    );
    match mode {
        Mode::Inspect { json } => {
            handler.shutdown();
            print_descriptor(&info, json);
            Ok(exit::SUCCESS)
        }
        Mode::OneShot(test) => {
            if let Err(error) = first.init(&handler_config) {
                handler.shutdown();
                return Err(error.into());
            }
            let verdict = oneshot::run(&*handler, &test, &results);
            handler.shutdown();
            Ok(match verdict {
                oneshot::Verdict::Passed => exit::SUCCESS,
                oneshot::Verdict::JobFailed => exit::JOB_FAILED,
                oneshot::Verdict::OutputMismatch(differences) => {
                    eprintln!("The output differs from --test_output:");
                    for line in differences {
                        eprintln!("  {line}");
                    }
                    exit::JOB_FAILED
                }
            })
        }
        Mode::Worker(worker) => run_worker(serving(first), *worker),
        Mode::DevApi(dev) => run_dev_api(serving(first), *dev),
        Mode::LoadBalancing(config) => run_load_balancing(serving(first), *config),
    }
}

/// What a serving mode needs to start its handler and swap it later.
struct Serving {
    first: Arc<Generation>,
    /// The async runtime's threads (`--io-threads`).
    io_threads: usize,
    spec: handler::HandlerSpec,
    config: String,
    swaps: config::Swaps,
    copies: Arc<PrivateCopies>,
    /// The handler file as it was copied (for `--watch`).
    loaded: Option<handler::Fingerprint>,
}

impl Serving {
    /// Runs the first handler's `init`; on failure it is shut down.
    fn init(&self) -> Result<(), LoadError> {
        self.timed_init()
            .inspect_err(|_| self.first.handler().shutdown())
    }

    /// Listens for the shutdown signal from now on (before `init`: see [`shutdown`]).
    fn listen_for_shutdown(&self, runtime: &tokio::runtime::Runtime) -> Shutdown {
        let in_process = self.spec.isolation == handler::Isolation::None;
        Shutdown::listen(runtime, self.first.handler().clone(), !in_process)
    }

    /// After a shutdown asked for during `init`: the handler is stopped and the worker ends
    /// without serving.
    fn stopped_during_init(&self) -> Result<u8, HostError> {
        self.first.handler().shutdown();
        tracing::info!("The worker stopped during init, as asked.");
        Ok(exit::SUCCESS)
    }

    /// Runs the first handler's `init` and records how long it took (on success).
    fn timed_init(&self) -> Result<(), LoadError> {
        let started = std::time::Instant::now();
        self.first.init(&self.config)?;
        metrics::get().set_init_duration(started.elapsed());
        Ok(())
    }

    /// Listens for SIGHUP from now on (before `init`, so one that comes during a slow `init`
    /// is not fatal, as its default action would be, but asks for a swap once the worker serves).
    fn listen_for_hangups(
        runtime: &tokio::runtime::Runtime,
    ) -> Option<tokio::signal::unix::Signal> {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|error| {
                tracing::warn!("cannot listen for SIGHUP, so it cannot swap the handler: {error}");
            })
            .ok()
    }

    /// The handler once its `init` has run, with swaps on SIGHUP (`hangups`, on a task of
    /// `runtime`) and, with `--watch`, when its file changes.
    fn go_live(
        self,
        runtime: &tokio::runtime::Runtime,
        hangups: Option<tokio::signal::unix::Signal>,
    ) -> Arc<LiveHandler> {
        let path = self.spec.path.clone();
        let in_process = self.spec.isolation == handler::Isolation::None;
        let live = LiveHandler::new(
            self.first,
            self.spec,
            self.config,
            self.swaps.policy,
            self.copies,
        );
        if self.swaps.watch && in_process {
            tracing::warn!("--watch is ignored with --isolation none: a handler in the host's own process cannot be swapped.");
        } else if self.swaps.watch {
            handler::watch_for_changes(&live, path, self.loaded);
        }
        // The build serving, in the metrics (a swap replaces it).
        let mut current = live.subscribe();
        runtime.spawn(async move {
            loop {
                if let handler::Current::Serving(generation) = &*current.borrow_and_update() {
                    metrics::get().set_handler(generation.info());
                }
                if current.changed().await.is_err() {
                    return;
                }
            }
        });
        if let Some(mut hangups) = hangups {
            let swapper = live.clone();
            runtime.spawn(async move {
                while hangups.recv().await.is_some() {
                    swapper.request_swap("SIGHUP");
                }
            });
        }
        live
    }
}

/// Serves the local dev API, with the queue worker behind it, until a shutdown signal.
fn run_dev_api(serving: Serving, dev: config::DevApi) -> Result<u8, HostError> {
    // Bound before init, so a port in use is reported before a slow model load; connections
    // that arrive during init wait in the backlog.
    let listener = dev_api::bind(&dev.host, dev.port)?;
    let runtime = io_runtime(serving.io_threads)?;
    let hangups = Serving::listen_for_hangups(&runtime);
    let shutdown = serving.listen_for_shutdown(&runtime);
    // Listening during init: /ping answers 204, other requests wait for the handler.
    let public = dev_api::PublicServer::start(&runtime, listener, dev.api.api_key.clone())?;
    let initialized = serving.init();
    if shutdown.init_ended() {
        runtime.block_on(public.init_failed());
        return serving.stopped_during_init();
    }
    if let Err(error) = initialized {
        runtime.block_on(public.init_failed());
        return Err(error.into());
    }
    let mut worker = worker_settings(serving.first.info(), dev.worker);
    if worker.refresh_worker {
        tracing::warn!(
            "--refresh-worker has no effect with the dev API: the worker keeps serving."
        );
        worker.refresh_worker = false;
    }
    let live = serving.go_live(&runtime, hangups);
    let served = runtime.block_on(dev_api::serve(
        live.clone(),
        public,
        dev.api,
        worker,
        shutdown.requested(),
    ));
    live.shutdown();
    runtime.shutdown_background();
    worker_exit(served?)
}

/// Serves the handler over HTTP for a load-balancing endpoint until a shutdown signal (or until
/// its handler cannot serve any more).
fn run_load_balancing(serving: Serving, config: serve::ServeConfig) -> Result<u8, HostError> {
    let runtime = io_runtime(serving.io_threads)?;
    let hangups = Serving::listen_for_hangups(&runtime);
    let concurrency = config.concurrency;
    let shutdown = serving.listen_for_shutdown(&runtime);
    // Listening during init: the health check answers 204, requests wait for the handler.
    let server = serve::Server::start(&runtime, config)?;
    let initialized = serving.init();
    if shutdown.init_ended() {
        runtime.block_on(server.stopped_during_init());
        return serving.stopped_during_init();
    }
    if let Err(error) = initialized {
        // Requests held during init are answered 503 before the host exits.
        runtime.block_on(server.init_failed());
        return Err(HostError::WorkerInitFailed(error));
    }
    // The handler's own limit as init reported it (ABI 1.1 may change the descriptor's).
    let slots = worker::WorkerConfig::slots(concurrency, serving.first.info());
    tracing::info!(
        handler = %serving.first.info().name,
        version = %serving.first.info().version,
        concurrency = slots,
        "--- Starting Serverless Worker (load-balancing) |  Version {} ---",
        env!("CARGO_PKG_VERSION")
    );
    let live = serving.go_live(&runtime, hangups);
    let exit = runtime.block_on(server.serve(live.clone(), shutdown.requested()));
    live.shutdown();
    runtime.shutdown_background();
    worker_exit(exit)
}

/// Serves `/metrics` alone on `address` (the queue worker's `--metrics-port`), on `runtime`
/// until the process ends.
fn serve_metrics(
    runtime: &tokio::runtime::Runtime,
    (host, port): (String, u16),
) -> Result<(), HostError> {
    let bind = || {
        let listener = http::connections::bind(&host, port)?;
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
    };
    let listener = bind().map_err(|source| serve::ServeError::MetricsBind {
        address: format!("{host}:{port}"),
        source,
    })?;
    let address = listener.local_addr().ok();
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async { metrics::answer() }),
        )
        .fallback(|| async {
            http::error_answer(
                axum::http::StatusCode::NOT_FOUND,
                "this port answers only /metrics",
            )
        });
    runtime.spawn(http::connections::serve(
        listener,
        router,
        Some(http::connections::header_read_timeout()),
        std::future::pending(),
    ));
    if let Some(address) = address {
        tracing::info!("Metrics on http://{address}/metrics");
    }
    Ok(())
}

/// The exit code of a worker that stopped, or the error of one whose handler failed.
fn worker_exit(exit: worker::WorkerExit) -> Result<u8, HostError> {
    match exit {
        worker::WorkerExit::Stopped => Ok(exit::SUCCESS),
        worker::WorkerExit::HandlerFailed(reason) => Err(HostError::HandlerFailed(reason)),
    }
}

/// The stack of every thread of the runtime, including the blocking-pool threads that run
/// in-process handler jobs: 8 MiB, as the header promises handlers (tokio's default is 2 MiB,
/// and a handler that needs 4 MiB would pass its local test and crash in production). Only the
/// pages a thread touches cost memory.
const HANDLER_STACK_SIZE: usize = handler::HANDLER_STACK_SIZE;

/// The async runtime for the serving modes, with `threads` worker threads.
fn io_runtime(threads: usize) -> Result<tokio::runtime::Runtime, HostError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("worker-host-io")
        .thread_stack_size(HANDLER_STACK_SIZE)
        .build()
        .map_err(HostError::Runtime)
}

/// The worker settings once the first handler is up (the operator's concurrency stays as it is:
/// each handler's own limit applies while it serves, see `WorkerConfig::slots_for`).
fn worker_settings(info: &HandlerInfo, config: worker::WorkerConfig) -> worker::WorkerConfig {
    let slots = config.slots_for(info);
    if slots < config.concurrency {
        tracing::warn!(
            "Concurrency {} lowered to {slots}, the most the handler allows.",
            config.concurrency,
        );
    }
    tracing::info!(
        handler = %info.name,
        version = %info.version,
        concurrency = slots,
        "--- Starting Serverless Worker |  Version {} ---",
        env!("CARGO_PKG_VERSION")
    );
    config
}

/// Runs the queue worker until a shutdown signal (or, with refresh_worker, one job).
fn run_worker(serving: Serving, worker: config::Worker) -> Result<u8, HostError> {
    let client = runpod::PlatformClient::new(&worker.urls, worker.max_input_bytes)?;
    let runtime = io_runtime(serving.io_threads)?;
    if let Some(address) = worker.metrics_address.clone() {
        serve_metrics(&runtime, address)?;
    }
    let hangups = Serving::listen_for_hangups(&runtime);
    let shutdown = serving.listen_for_shutdown(&runtime);
    let handler = serving.first.handler().clone();
    let initialized = serving.timed_init();
    if shutdown.init_ended() {
        return serving.stopped_during_init();
    }
    if let Err(error) = initialized {
        // As the SDK does for a failed fitness check: one unhealthy report, then exit 1.
        runtime.block_on(client.report_unhealthy("handler_init", &error.to_string()));
        if worker.claim_on_init_failure {
            let (message, traceback) = match &error {
                LoadError::InitFailed { failure } => {
                    (failure.message.clone(), failure.traceback.clone())
                }
                other => (other.to_string(), String::new()),
            };
            let output = handler.recent_output();
            let message = if output.trim().is_empty() {
                message
            } else {
                format!(
                    "{message}\n--- the handler's last output ---\n{}",
                    output.trim_end()
                )
            };
            let failure = job::Failure::new("HandlerInitFailed", message).with_traceback(traceback);
            runtime.block_on(worker::claim_one(&client, failure, &worker.config.origin));
        }
        handler.shutdown();
        return Err(HostError::WorkerInitFailed(error));
    }
    let config = worker_settings(serving.first.info(), worker.config);
    let live = serving.go_live(&runtime, hangups);
    let exit = runtime.block_on(worker::run(
        live.clone(),
        client,
        config,
        shutdown.requested(),
    ));
    live.shutdown();
    // Handler threads of jobs cancelled at shutdown may still be running; do not wait for them.
    runtime.shutdown_background();
    worker_exit(exit)
}

fn print_descriptor(info: &HandlerInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(info).expect("plain data serializes")
        );
        return;
    }
    let concurrency = match info.max_concurrency {
        0 => "no limit".to_owned(),
        n => n.to_string(),
    };
    println!("path:            {}", info.path.display());
    println!("name:            {}", info.name);
    println!("version:         {}", info.version);
    println!("sha256:          {}", info.sha256);
    println!("abi:             {}.{}", info.abi_major, info.abi_minor);
    println!("max concurrency: {concurrency}");
    println!(
        "features:        {}",
        if info.streaming { "streaming" } else { "none" }
    );
}
