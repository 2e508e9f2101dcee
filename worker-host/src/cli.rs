//! The command line, and the environment variables that stand in for its flags.
//!
//! Flag names follow the Python SDK where it has one (`--test_input`, `--rp_log_level`, ...), with
//! a dashed alias in this host's own style. Everything is read here, at the edge; the library
//! below gets a [`crate::config::Settings`] and never reads the environment itself.

use crate::handler::{Isolation, SwapPolicy, DEFAULT_MAX_CHUNK_BYTES};
use crate::logging::LogFormat;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Runs a handler compiled as a shared library (.so) as a RunPod serverless worker.
///
/// With --test_input (or ./test_input.json, when RUNPOD_WEBHOOK_GET_JOB is not set) it runs one
/// job and exits 0 on success, 1 on failure.
#[derive(Debug, Parser)]
#[command(name = "worker-host", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without a command, run the handler.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The handler and how it is loaded.
    #[command(flatten)]
    pub handler: HandlerArgs,

    /// The one-shot test run.
    #[command(flatten)]
    pub test: TestArgs,

    /// Results and limits.
    #[command(flatten)]
    pub results: ResultArgs,

    /// The queue worker.
    #[command(flatten)]
    pub worker: WorkerArgs,

    /// The local dev API.
    #[command(flatten)]
    pub dev_api: DevApiArgs,

    /// Load-balancing mode, and metrics.
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Logging.
    #[command(flatten)]
    pub logging: LogArgs,

    /// The platform's environment.
    #[command(flatten)]
    pub platform: PlatformEnv,
}

/// Commands other than running the handler.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the handler, print its descriptor (name, version, ABI, concurrency, features) and exit.
    /// Does not run init.
    Inspect {
        /// Print the descriptor as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a new handler project in DIR (an echo handler, test_input.json, a build command and
    /// a README) that builds outside this repository, and print how to build and run it.
    New(crate::scaffold::NewArgs),
}

/// Which handler to load and how to configure it.
#[derive(Debug, Args)]
pub struct HandlerArgs {
    /// The handler's shared library (.so).
    #[arg(long, env = "WORKER_HOST_HANDLER", value_name = "PATH", global = true)]
    pub handler: Option<PathBuf>,

    /// The handler's configuration, passed to its init: JSON, or @FILE to read it from a file.
    #[arg(
        long,
        env = "WORKER_HOST_HANDLER_CONFIG",
        value_name = "JSON|@FILE",
        global = true
    )]
    pub handler_config: Option<String>,

    /// Where the handler runs: `runner`, a child process the host supervises (a crash fails only
    /// its jobs, and a fresh runner takes over), or `none`, in the host's own process (no hop, but
    /// a crash ends the worker)
    #[arg(
        long,
        env = "WORKER_HOST_ISOLATION",
        value_enum,
        default_value_t = Isolation::Runner,
        global = true
    )]
    pub isolation: Isolation,

    /// How long a stopped or cancelled job's handler may take to return before its runner is
    /// killed and restarted (the job's siblings on that runner fail, saying why)
    #[arg(
        long,
        env = "WORKER_HOST_CANCEL_GRACE_SECS",
        value_name = "SECONDS",
        default_value_t = 5.0,
        global = true
    )]
    pub cancel_grace_secs: f64,

    /// How long the handler's `init` may take before it counts as failed (and, in a runner, is
    /// killed); default: RUNPOD_INIT_TIMEOUT less 10 s when it is set, else 410 (10 s under the
    /// platform's 7-minute cold-start limit)
    #[arg(
        long,
        env = "WORKER_HOST_INIT_TIMEOUT_SECS",
        value_name = "SECONDS",
        global = true
    )]
    pub init_timeout_secs: Option<f64>,

    /// The platform's cold-start limit, in seconds.
    #[arg(long, env = "RUNPOD_INIT_TIMEOUT", hide = true, global = true)]
    pub runpod_init_timeout: Option<f64>,

    /// Swap the handler by itself when its file changes (and has then stayed unchanged for a
    /// second), as SIGHUP does: the next job runs the new build
    #[arg(long, env = "WORKER_HOST_WATCH", global = true)]
    pub watch: bool,

    /// How a swap (SIGHUP, --watch) treats the handler serving: `overlap` inits the new one while
    /// the old one serves (no gap), `drain-first` lets the old one finish its jobs and exit first
    /// (for a GPU that cannot hold two models)
    #[arg(
        long,
        env = "WORKER_HOST_SWAP_POLICY",
        value_enum,
        default_value_t = SwapPolicy::Overlap,
        global = true
    )]
    pub swap_policy: SwapPolicy,
}

/// The one-shot test run.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Run one job and exit: the job as JSON ({"input": ...}), or @FILE.
    #[arg(
        long = "test_input",
        visible_alias = "test-input",
        value_name = "JSON|@FILE"
    )]
    pub test_input: Option<String>,

    /// Compare the job's output with this JSON (or @FILE); on a difference print it and exit 1.
    #[arg(
        long = "test_output",
        visible_alias = "test-output",
        value_name = "JSON|@FILE"
    )]
    pub test_output: Option<String>,
}

/// How results are shaped and bounded.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// For streaming handlers, put every chunk in the final result too (the SDK's
    /// return_aggregate_stream); by default the final result's output is [].
    #[arg(long, env = "WORKER_HOST_RETURN_AGGREGATE_STREAM")]
    pub return_aggregate_stream: bool,

    /// Add "stopPod": true to every result and exit after the first job (the SDK's config-level
    /// refresh_worker).
    #[arg(long, env = "WORKER_HOST_REFRESH_WORKER")]
    pub refresh_worker: bool,

    /// The largest job input the worker accepts, in bytes; a larger job fails with the reason
    /// (default 20 MiB; with --load-balancing the platform's 30 MB, and a larger request gets 413)
    #[arg(long, env = "WORKER_HOST_MAX_INPUT_BYTES", value_name = "BYTES")]
    pub max_input_bytes: Option<usize>,

    /// The largest output (or progress value, or result body) a handler may return, in bytes
    /// (default 20 MiB; with --load-balancing the platform's 30 MB)
    #[arg(long, env = "WORKER_HOST_MAX_OUTPUT_BYTES", value_name = "BYTES")]
    pub max_output_bytes: Option<usize>,

    /// The largest stream chunk a handler may emit, in bytes; a larger one fails the job with the
    /// reason. The default is the 1 MB RunPod documents as the most a streamed chunk may be.
    #[arg(long, env = "WORKER_HOST_MAX_CHUNK_BYTES", value_name = "BYTES", default_value_t = DEFAULT_MAX_CHUNK_BYTES)]
    pub max_chunk_bytes: usize,
}

/// The queue worker.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// How many jobs run at once (default 1, or RUNPOD_MAX_CONCURRENCY when the platform sets
    /// it); capped by what the handler declares.
    #[arg(
        long,
        visible_alias = "rp_api_concurrency",
        env = "WORKER_HOST_CONCURRENCY",
        value_name = "N"
    )]
    pub concurrency: Option<usize>,

    /// The platform's newer runtime variable for the concurrency.
    #[arg(long, env = "RUNPOD_MAX_CONCURRENCY", hide = true)]
    pub runpod_max_concurrency: Option<usize>,

    /// After SIGTERM or Ctrl-C, how long running jobs may go on before they are cancelled and
    /// reported as failed.
    #[arg(
        long,
        env = "WORKER_HOST_SHUTDOWN_GRACE_SECS",
        value_name = "SECONDS",
        default_value_t = 30.0
    )]
    pub shutdown_grace_secs: f64,

    /// How long a result that cannot be delivered (connection error, timeout, 5xx) is retried.
    #[arg(
        long,
        env = "WORKER_HOST_RESULT_RETRY_SECS",
        value_name = "SECONDS",
        default_value_t = 120.0
    )]
    pub result_retry_secs: f64,

    /// After a failed init, take one job and fail it with the reason (so the request that started
    /// this worker learns why), then exit 1; false leaves every job to other workers
    #[arg(
        long,
        env = "WORKER_HOST_CLAIM_ON_INIT_FAILURE",
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub claim_on_init_failure: bool,

    /// The threads of the host's async runtime (HTTP, the platform's API, the runner channel) in
    /// every serving mode; default: half the CPUs this process may use, at least 1, so the
    /// handler keeps the rest
    #[arg(
        long,
        env = "WORKER_HOST_IO_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub io_threads: Option<u16>,
}

/// The local dev API: RunPod's public endpoint API on this machine.
#[derive(Debug, Args)]
pub struct DevApiArgs {
    /// Serve RunPod's endpoint API (/run, /runsync, /status, /stream, /cancel, /health, ...)
    /// locally and run jobs submitted to it; point the official client at it with
    /// RUNPOD_ENDPOINT_BASE_URL=http://HOST:PORT/v2.
    #[arg(
        long = "rp_serve_api",
        visible_alias = "serve-api",
        conflicts_with = "test_input"
    )]
    pub serve_api: bool,

    /// The address the dev API listens on (0.0.0.0 to reach it from other machines).
    #[arg(
        long = "rp_api_host",
        visible_alias = "api-host",
        env = "WORKER_HOST_API_HOST",
        value_name = "HOST",
        default_value = "127.0.0.1"
    )]
    pub host: String,

    /// The dev API's port (0 picks a free one; the log says which).
    #[arg(
        long = "rp_api_port",
        visible_alias = "api-port",
        env = "WORKER_HOST_API_PORT",
        value_name = "PORT",
        default_value_t = 8000
    )]
    pub port: u16,

    /// Require this key from dev API and load-balancing clients (Authorization: Bearer KEY); off
    /// by default.
    #[arg(
        long,
        env = "WORKER_HOST_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// How long the dev API waits before retrying a failed webhook (two retries, as the
    /// platform does).
    #[arg(
        long,
        env = "WORKER_HOST_WEBHOOK_RETRY_SECS",
        value_name = "SECONDS",
        default_value_t = 10.0
    )]
    pub webhook_retry_secs: f64,
}

/// Load-balancing mode (RunPod's load-balancing endpoints send HTTP requests straight to the
/// worker), and the queue worker's metrics port.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve the handler over HTTP for a RunPod load-balancing endpoint: every request is one job,
    /// answered with the handler's output; the health check is at $HEALTH_CHECK_PATH.
    #[arg(
        long,
        env = "WORKER_HOST_LOAD_BALANCING",
        conflicts_with_all = ["test_input", "serve_api"]
    )]
    pub load_balancing: bool,

    /// The load-balancing server's port (0 picks a free one; the log says which).
    #[arg(
        long = "port",
        id = "load_balancing_port",
        env = "PORT",
        value_name = "PORT",
        default_value_t = 80
    )]
    pub port: u16,

    /// The health check's port, when it is not --port.
    #[arg(long, env = "PORT_HEALTH", value_name = "PORT")]
    pub health_port: Option<u16>,

    /// The health check's path: 204 while init runs, 200 ready, 503 when the worker cannot serve.
    #[arg(
        long,
        env = "HEALTH_CHECK_PATH",
        value_name = "PATH",
        default_value = "/ping"
    )]
    pub health_path: String,

    /// How many requests may wait for a slot in load-balancing mode; more get 429 with
    /// Retry-After (default: 8 per slot)
    #[arg(long, env = "WORKER_HOST_MAX_WAITING", value_name = "N")]
    pub max_waiting: Option<usize>,

    /// Serve /metrics (Prometheus text) on this port in the queue worker; off by default (the dev
    /// API and the load-balancing server always have /metrics)
    #[arg(long, env = "WORKER_HOST_METRICS_PORT", value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// The address --metrics-port listens on.
    #[arg(
        long,
        env = "WORKER_HOST_METRICS_HOST",
        value_name = "HOST",
        default_value = "127.0.0.1"
    )]
    pub metrics_host: String,
}

/// Logging.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level: TRACE, DEBUG, INFO, WARN (or WARNING), ERROR or NOTSET. Default: the
    /// RUNPOD_LOG_LEVEL variable, else RUNPOD_DEBUG_LEVEL, else INFO.
    #[arg(
        long = "rp_log_level",
        visible_alias = "log-level",
        value_name = "LEVEL"
    )]
    pub log_level: Option<String>,

    /// The SDK's log level variable; the flag wins over it.
    #[arg(long, env = "RUNPOD_LOG_LEVEL", hide = true)]
    pub runpod_log_level: Option<String>,

    /// The SDK's fallback log level variable.
    #[arg(long, env = "RUNPOD_DEBUG_LEVEL", hide = true)]
    pub runpod_debug_level: Option<String>,

    /// Log line format.
    #[arg(long, env = "WORKER_HOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// Variables the RunPod platform sets in a worker's environment.
#[derive(Debug, Args)]
pub struct PlatformEnv {
    /// The job-take URL template; when set (and no test input is given), run as a queue worker.
    #[arg(long, env = "RUNPOD_WEBHOOK_GET_JOB", hide = true)]
    pub webhook_get_job: Option<String>,

    /// The job-done URL template.
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_OUTPUT", hide = true)]
    pub webhook_post_output: Option<String>,

    /// The stream URL template.
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_STREAM", hide = true)]
    pub webhook_post_stream: Option<String>,

    /// The heartbeat URL template.
    #[arg(long, env = "RUNPOD_WEBHOOK_PING", hide = true)]
    pub webhook_ping: Option<String>,

    /// The heartbeat period in milliseconds.
    #[arg(
        long,
        env = "RUNPOD_PING_INTERVAL",
        hide = true,
        default_value_t = 10_000
    )]
    pub ping_interval: u64,

    /// The platform's key, sent as `Authorization` (not the dev API's `--api-key`).
    #[arg(
        long = "runpod-ai-api-key",
        id = "runpod_ai_api_key",
        env = "RUNPOD_AI_API_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// The endpoint id; when set, logs default to JSON lines.
    #[arg(long, env = "RUNPOD_ENDPOINT_ID", hide = true)]
    pub endpoint_id: Option<String>,

    /// The worker id.
    #[arg(long, env = "RUNPOD_POD_ID", hide = true)]
    pub pod_id: Option<String>,

    /// The worker's host name, reported in error payloads.
    #[arg(long, env = "RUNPOD_POD_HOSTNAME", hide = true)]
    pub pod_hostname: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks: unique names, valid defaults, no flag clashes (a clash
    /// would otherwise only surface as a panic at start in debug builds).
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The dev API's key and the platform's key are separate settings.
    #[test]
    fn the_dev_api_key_is_not_the_platform_key() {
        let cli = Cli::try_parse_from(["worker-host", "--api-key", "dev", "--rp_serve_api"])
            .expect("valid command line");
        assert_eq!(cli.dev_api.api_key.as_deref(), Some("dev"));
        assert_eq!(cli.platform.api_key, None);
    }
}
