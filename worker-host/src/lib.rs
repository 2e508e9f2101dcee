//! worker-host: runs a handler compiled as a shared library as a RunPod serverless worker.
//!
//! The data flows one way: [`cli`] → [`config`] → [`handler`] (load, check, init) → a mode:
//! [`oneshot`] (one test job), [`worker`] (the RunPod queue worker, over [`runpod`]) or
//! [`dev_api`] (RunPod's public API on localhost, with the same worker behind it). `main` only
//! parses, sets up logging, calls [`run`] and maps the result to an exit code ([`exit`]).

pub mod cli;
pub mod config;
pub mod dev_api;
pub mod exit;
pub mod handler;
pub mod job;
pub mod logging;
pub mod oneshot;
pub mod runpod;
pub mod worker;

use config::{ConfigError, Mode, Settings};
use handler::{Handler, HandlerInfo, LoadError};
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
    let handler = handler::load(&settings.handler)?;
    let info = handler.info().clone();
    tracing::debug!(
        handler = %info.name,
        version = %info.version,
        abi = %format_args!("{}.{}", info.abi_major, info.abi_minor),
        "handler loaded"
    );
    match settings.mode {
        Mode::Inspect { json } => {
            handler.shutdown();
            print_descriptor(&info, json);
            Ok(exit::SUCCESS)
        }
        Mode::OneShot(test) => {
            if let Err(error) = handler.init(&settings.handler_config) {
                handler.shutdown();
                return Err(error.into());
            }
            let verdict = oneshot::run(&*handler, &test, &settings.results);
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
        Mode::Worker(worker) => run_worker(handler, &settings.handler_config, *worker),
        Mode::DevApi(dev) => run_dev_api(handler, &settings.handler_config, *dev),
    }
}

/// Serves the local dev API, with the queue worker behind it, until a shutdown signal.
fn run_dev_api(
    handler: Arc<dyn Handler>,
    handler_config: &str,
    dev: config::DevApi,
) -> Result<u8, HostError> {
    // Bound before init, so a port in use is reported before a slow model load; connections
    // that arrive during init wait in the backlog.
    let listener = dev_api::bind(&dev.host, dev.port)?;
    let runtime = io_runtime()?;
    if let Err(error) = handler.init(handler_config) {
        handler.shutdown();
        return Err(error.into());
    }
    let mut worker = worker_settings(&*handler, dev.worker);
    if worker.refresh_worker {
        tracing::warn!(
            "--refresh-worker has no effect with the dev API: the worker keeps serving."
        );
        worker.refresh_worker = false;
    }
    let served = runtime.block_on(dev_api::serve(
        handler.clone(),
        listener,
        dev.api,
        worker,
        shutdown_signal(),
    ));
    handler.shutdown();
    runtime.shutdown_background();
    worker_exit(served?)
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

/// The async runtime for the worker and the dev API.
fn io_runtime() -> Result<tokio::runtime::Runtime, HostError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("worker-host-io")
        .thread_stack_size(HANDLER_STACK_SIZE)
        .build()
        .map_err(HostError::Runtime)
}

/// The worker settings once the handler is up: concurrency capped by what the handler allows.
fn worker_settings(
    handler: &dyn Handler,
    mut config: worker::WorkerConfig,
) -> worker::WorkerConfig {
    let info = handler.info();
    if info.max_concurrency > 0 && config.concurrency > info.max_concurrency as usize {
        tracing::warn!(
            "Concurrency {} lowered to {}, the most the handler allows.",
            config.concurrency,
            info.max_concurrency
        );
        config.concurrency = info.max_concurrency as usize;
    }
    tracing::info!(
        handler = %info.name,
        version = %info.version,
        concurrency = config.concurrency,
        "--- Starting Serverless Worker |  Version {} ---",
        env!("CARGO_PKG_VERSION")
    );
    config
}

/// Runs the queue worker until a shutdown signal (or, with refresh_worker, one job).
fn run_worker(
    handler: Arc<dyn Handler>,
    handler_config: &str,
    worker: config::Worker,
) -> Result<u8, HostError> {
    let client = runpod::PlatformClient::new(&worker.urls, worker.max_input_bytes)?;
    let runtime = io_runtime()?;
    if let Err(error) = handler.init(handler_config) {
        // As the SDK does for a failed fitness check: one unhealthy report, then exit 1.
        runtime.block_on(client.report_unhealthy("handler_init", &error.to_string()));
        if worker.claim_on_init_failure {
            let message = match &error {
                LoadError::InitFailed { failure } => failure.message.clone(),
                other => other.to_string(),
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
            let failure = job::Failure::new("HandlerInitFailed", message);
            runtime.block_on(worker::claim_one(&client, failure, &worker.config.origin));
        }
        handler.shutdown();
        return Err(HostError::WorkerInitFailed(error));
    }
    let config = worker_settings(&*handler, worker.config);
    let exit = runtime.block_on(worker::run(
        handler.clone(),
        client,
        config,
        shutdown_signal(),
    ));
    handler.shutdown();
    // Handler threads of jobs cancelled at shutdown may still be running; do not wait for them.
    runtime.shutdown_background();
    worker_exit(exit)
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C): the one shutdown trigger. A SIGHUP
/// meanwhile is logged and ignored.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    // SIGHUP will swap the handler (not built yet); until then it must not end the worker and
    // lose the jobs it holds, as its default action would.
    let hangups = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut signal) => {
                while signal.recv().await.is_some() {
                    tracing::warn!("SIGHUP received: swapping the handler is not supported yet, so it is ignored (SIGTERM stops the worker).");
                }
            }
            Err(error) => tracing::warn!("cannot listen for SIGHUP: {error}"),
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
        () = hangups => {}
    }
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
    println!("abi:             {}.{}", info.abi_major, info.abi_minor);
    println!("max concurrency: {concurrency}");
    println!(
        "features:        {}",
        if info.streaming { "streaming" } else { "none" }
    );
}
