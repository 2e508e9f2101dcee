//! Turns the command line (and the environment standing in for it) into [`Settings`]: which mode
//! to run in, the handler and its configuration, the test job, limits and log settings. All the
//! reading of files named on the command line (`@file` arguments, `./test_input.json`) happens
//! here, before the handler is loaded, so a mistake is reported before a slow `init`.

use crate::cli::{Cli, Command, ResultArgs, WorkerArgs};
use crate::dev_api::store::StoreLimits;
use crate::dev_api::DevApiConfig;
use crate::handler::{HandlerSpec, Limits, SwapPolicy};
use crate::job::{InputRule, Job, JobError, Origin};
use crate::logging::{parse_level, LogFormat, UnknownLevel};
use crate::runpod::PlatformUrls;
use crate::serve::{ServeConfig, DEFAULT_MAX_BODY_BYTES};
use crate::worker::WorkerConfig;
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing_subscriber::filter::LevelFilter;

/// The id a test job gets when its JSON has none (the SDK's).
pub const LOCAL_TEST_JOB_ID: &str = "local_test";

/// The file a one-shot run reads when no test input is given (the SDK's).
pub const DEFAULT_TEST_INPUT_FILE: &str = "test_input.json";

/// The platform marks a worker unhealthy when its cold start takes longer than this (unless
/// RUNPOD_INIT_TIMEOUT says otherwise).
const PLATFORM_COLD_START_LIMIT: Duration = Duration::from_secs(7 * 60);
/// The largest job input and output by default, outside load-balancing mode.
const DEFAULT_MAX_JOB_BYTES: usize = 20 * 1024 * 1024;
/// How many requests may wait per slot in load-balancing mode, by default.
const WAITING_PER_SLOT: usize = 8;
/// How much sooner than the platform the host gives up on `init`, so that it can say why.
const INIT_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// Why the settings could not be built. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No handler path was given.
    #[error("no handler given: pass --handler PATH or set WORKER_HOST_HANDLER to the handler's .so file")]
    NoHandler,
    /// An `@file` argument could not be read.
    #[error("cannot read {what} from {path}: {source}")]
    UnreadableFile {
        /// Which argument.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An argument is not valid JSON.
    #[error("{what} is not valid JSON: {reason}")]
    InvalidJson {
        /// Which argument.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// No test input was given and `./test_input.json` does not exist.
    #[error("no test input: pass --test_input '{{\"input\": ...}}', create ./test_input.json, or set RUNPOD_WEBHOOK_GET_JOB to run as a queue worker")]
    NoTestInput,
    /// The test job is not a valid job.
    #[error("the test input is not a valid job ({0}); it should look like {{\"input\": {{...}}}}")]
    InvalidTestJob(JobError),
    /// A duration flag is negative or not a number.
    #[error("{flag} must be a number of seconds, not {value}")]
    InvalidDuration {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f64,
    },
    /// An unknown log level name.
    #[error(transparent)]
    LogLevel(#[from] UnknownLevel),
    /// The job-take URL is set but the job-done URL is not: every result would be lost.
    #[error("RUNPOD_WEBHOOK_GET_JOB is set but RUNPOD_WEBHOOK_POST_OUTPUT is not, so no result could be delivered: set both (the platform does), or unset RUNPOD_WEBHOOK_GET_JOB for a one-shot test run")]
    NoJobDoneUrl,
    /// The health check path is not a plain path (or is `/metrics`).
    #[error("the health check path must be a plain path such as /ping (no query, no {{ }} or *, not /metrics), not {0:?} (--health-path, HEALTH_CHECK_PATH)")]
    InvalidHealthPath(String),
    /// `worker-host new` writes a project (`scaffold::run`); it has no settings to run with.
    #[error("`worker-host new` writes a project and runs no handler")]
    NotARun,
}

impl ConfigError {
    /// Whether this is a problem with the test job, which the SDK reports as a failed run (exit 1)
    /// rather than as a usage error.
    pub fn is_test_input_error(&self) -> bool {
        matches!(self, Self::NoTestInput | Self::InvalidTestJob(_))
            || matches!(self, Self::InvalidJson { what, .. } | Self::UnreadableFile { what, .. } if *what == "the test input")
    }
}

/// Everything the host needs to run, resolved.
#[derive(Debug)]
pub struct Settings {
    /// What to do.
    pub mode: Mode,
    /// The handler library, and how it is loaded and run.
    pub handler: HandlerSpec,
    /// The handler configuration as JSON text (`{}` when none was given).
    pub handler_config: String,
    /// How the serving modes swap in a new build of the handler.
    pub swaps: Swaps,
    /// How results are shaped.
    pub results: ResultOptions,
    /// The log level.
    pub log_level: LevelFilter,
    /// The log format, with `Auto` resolved.
    pub log_format: LogFormat,
    /// The threads of the serving modes' async runtime (`--io-threads`).
    pub io_threads: usize,
}

/// The async runtime's threads when `--io-threads` is not given: half the CPUs this process
/// may use (its affinity and cgroup quota count), at least 1. The host's I/O needs little CPU
/// next to a handler's, and on a small machine fewer runtime threads wake one another less: on
/// 2 cores, one thread serves load-balancing echo requests through a runner about a quarter
/// faster than two (README, Performance).
pub fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
}

/// How the serving modes swap in a new build of the handler (SIGHUP always asks for one).
#[derive(Debug, Clone, Copy)]
pub struct Swaps {
    /// Whether the handler file is watched (`--watch`).
    pub watch: bool,
    /// What happens to the handler serving meanwhile.
    pub policy: SwapPolicy,
}

/// What the host does once the handler is loaded.
#[derive(Debug)]
pub enum Mode {
    /// Print the descriptor and exit (no `init`).
    Inspect {
        /// As one JSON object.
        json: bool,
    },
    /// Run one job and exit.
    OneShot(OneShot),
    /// Take jobs from the platform.
    Worker(Box<Worker>),
    /// Serve the local dev API and run the jobs submitted to it.
    DevApi(Box<DevApi>),
    /// Serve the handler over HTTP for a load-balancing endpoint.
    LoadBalancing(Box<ServeConfig>),
}

/// A one-shot run: the job, and optionally the output it must produce.
#[derive(Debug)]
pub struct OneShot {
    /// The job.
    pub job: Job,
    /// The expected output (`--test_output`).
    pub expected_output: Option<serde_json::Value>,
}

/// A queue worker: where the platform is, and how to run.
#[derive(Debug)]
pub struct Worker {
    /// The platform's URLs and key.
    pub urls: PlatformUrls,
    /// Operator settings (concurrency before the handler's cap).
    pub config: WorkerConfig,
    /// The largest job input, in bytes.
    pub max_input_bytes: usize,
    /// After a failed `init`, take one job and fail it with the reason (see `worker::claim_one`).
    pub claim_on_init_failure: bool,
    /// Where `/metrics` is served (`--metrics-port`), if anywhere.
    pub metrics_address: Option<(String, u16)>,
}

/// The local dev API: where it listens, and how its worker runs.
#[derive(Debug)]
pub struct DevApi {
    /// The address to listen on.
    pub host: String,
    /// The port (0: any free port).
    pub port: u16,
    /// The API's own settings.
    pub api: DevApiConfig,
    /// The worker's settings (concurrency before the handler's cap).
    pub worker: WorkerConfig,
}

/// How results are shaped for the platform.
#[derive(Debug, Clone, Default)]
pub struct ResultOptions {
    /// Put every streamed chunk in a streaming job's final result.
    pub return_aggregate_stream: bool,
    /// Add `stopPod` to every result and stop after one job.
    pub refresh_worker: bool,
    /// Where error payloads say they come from.
    pub origin: Origin,
}

impl Settings {
    /// Resolves the command line. `working_dir` is where `./test_input.json` is looked for.
    pub fn from_cli(cli: Cli, working_dir: &Path) -> Result<Self, ConfigError> {
        let log_name = cli
            .logging
            .log_level
            .or(cli.logging.runpod_log_level)
            .or(cli.logging.runpod_debug_level);
        let log_level = match log_name {
            Some(name) => parse_level(&name)?,
            None => LevelFilter::INFO,
        };
        let log_format = match cli.logging.log_format {
            LogFormat::Auto
                if cli
                    .platform
                    .endpoint_id
                    .as_deref()
                    .is_some_and(|id| !id.is_empty()) =>
            {
                LogFormat::Json
            }
            LogFormat::Auto => LogFormat::Text,
            other => other,
        };
        let handler_path = cli.handler.handler.ok_or(ConfigError::NoHandler)?;
        let cancel_grace = seconds("--cancel-grace-secs", cli.handler.cancel_grace_secs)?;
        let init_timeout = match (
            cli.handler.init_timeout_secs,
            cli.handler.runpod_init_timeout,
        ) {
            (Some(secs), _) => seconds("--init-timeout-secs", secs)?,
            // Fail (and say why) before the platform gives up on the worker.
            (None, Some(platform)) => seconds("RUNPOD_INIT_TIMEOUT", platform)?
                .saturating_sub(INIT_TIMEOUT_MARGIN)
                .max(Duration::from_secs(1)),
            (None, None) => PLATFORM_COLD_START_LIMIT - INIT_TIMEOUT_MARGIN,
        };
        let handler_config = match cli.handler.handler_config {
            Some(argument) => json_argument("the handler configuration", &argument)?,
            None => "{}".to_owned(),
        };
        let non_empty = |value: Option<String>| value.filter(|text| !text.is_empty());
        let pod_id = non_empty(cli.platform.pod_id.clone());
        let origin = Origin {
            hostname: non_empty(cli.platform.pod_hostname.clone())
                .unwrap_or_else(|| "unknown".into()),
            worker_id: pod_id.clone().unwrap_or_else(|| "unknown".into()),
        };
        // Off the platform there is no RUNPOD_POD_ID; URLs still need a worker id (as in the SDK).
        let worker_id = pod_id.unwrap_or_else(random_worker_id);
        let load_balancing = cli.serve.load_balancing && cli.command.is_none();
        // The platform's limits: 30 MB each way for a load-balancing request, else the queue's.
        let default_limit = if load_balancing {
            DEFAULT_MAX_BODY_BYTES
        } else {
            DEFAULT_MAX_JOB_BYTES
        };
        let max_input_bytes = cli.results.max_input_bytes.unwrap_or(default_limit);
        let max_output_bytes = cli.results.max_output_bytes.unwrap_or(default_limit);
        let mode = match cli.command {
            Some(Command::Inspect { json }) => Mode::Inspect { json },
            None if load_balancing => {
                let concurrency = worker_concurrency(&cli.worker);
                Mode::LoadBalancing(Box::new(ServeConfig {
                    host: "0.0.0.0".into(),
                    port: cli.serve.port,
                    health_port: cli.serve.health_port,
                    health_path: health_path(&cli.serve.health_path)?,
                    api_key: cli.dev_api.api_key.clone().filter(|key| !key.is_empty()),
                    concurrency,
                    max_waiting: cli
                        .serve
                        .max_waiting
                        .unwrap_or(concurrency.saturating_mul(WAITING_PER_SLOT)),
                    max_input_bytes,
                    shutdown_grace: seconds(
                        "--shutdown-grace-secs",
                        cli.worker.shutdown_grace_secs,
                    )?,
                    cancel_grace,
                    origin: Origin {
                        worker_id: worker_id.clone(),
                        ..origin.clone()
                    },
                }))
            }
            Some(Command::New(_)) => return Err(ConfigError::NotARun),
            None => match (
                cli.test.test_input.clone(),
                cli.platform.webhook_get_job.clone(),
            ) {
                (Some(argument), _) => {
                    let text = json_argument("the test input", &argument)?;
                    Mode::OneShot(one_shot(&text, cli.test.test_output.as_deref())?)
                }
                (None, _) if cli.dev_api.serve_api => Mode::DevApi(Box::new(DevApi {
                    host: cli.dev_api.host.clone(),
                    port: cli.dev_api.port,
                    api: DevApiConfig {
                        api_key: cli.dev_api.api_key.clone().filter(|key| !key.is_empty()),
                        webhook_retry: seconds(
                            "--webhook-retry-secs",
                            cli.dev_api.webhook_retry_secs,
                        )?,
                        limits: StoreLimits::default(),
                        worker_id: worker_id.clone(),
                        max_input_bytes,
                    },
                    // Error payloads name the local worker, as status objects do (`workerId`).
                    worker: worker_config(
                        &cli.worker,
                        &cli.results,
                        max_output_bytes,
                        cli.platform.ping_interval,
                        &Origin {
                            worker_id: worker_id.clone(),
                            ..origin.clone()
                        },
                    )?,
                })),
                (None, Some(job_take)) if !job_take.is_empty() => Mode::Worker(Box::new(Worker {
                    urls: PlatformUrls {
                        job_take,
                        job_done: Some(
                            cli.platform
                                .webhook_post_output
                                .clone()
                                .filter(|url| !url.is_empty())
                                .ok_or(ConfigError::NoJobDoneUrl)?,
                        ),
                        job_stream: cli.platform.webhook_post_stream.clone(),
                        ping: cli.platform.webhook_ping.clone(),
                        api_key: cli.platform.api_key.clone().unwrap_or_default(),
                        worker_id: worker_id.clone(),
                    },
                    config: worker_config(
                        &cli.worker,
                        &cli.results,
                        max_output_bytes,
                        cli.platform.ping_interval,
                        &origin,
                    )?,
                    max_input_bytes,
                    claim_on_init_failure: cli.worker.claim_on_init_failure,
                    metrics_address: cli
                        .serve
                        .metrics_port
                        .map(|port| (cli.serve.metrics_host.clone(), port)),
                })),
                (None, _) => {
                    let path = working_dir.join(DEFAULT_TEST_INPUT_FILE);
                    if !path.is_file() {
                        return Err(ConfigError::NoTestInput);
                    }
                    let text = json_argument("the test input", &format!("@{}", path.display()))?;
                    Mode::OneShot(one_shot(&text, cli.test.test_output.as_deref())?)
                }
            },
        };
        let respawn = matches!(
            mode,
            Mode::Worker(_) | Mode::DevApi(_) | Mode::LoadBalancing(_)
        );
        Ok(Self {
            io_threads: cli
                .worker
                .io_threads
                .map_or_else(default_io_threads, usize::from),
            mode,
            handler: HandlerSpec {
                path: handler_path,
                library_dirs: Vec::new(),
                limits: Limits {
                    max_output_bytes,
                    max_chunk_bytes: cli.results.max_chunk_bytes,
                },
                isolation: cli.handler.isolation,
                cancel_grace,
                init_timeout,
                respawn,
            },
            handler_config,
            swaps: Swaps {
                watch: cli.handler.watch,
                policy: cli.handler.swap_policy,
            },
            results: ResultOptions {
                return_aggregate_stream: cli.results.return_aggregate_stream,
                refresh_worker: cli.results.refresh_worker,
                origin,
            },
            log_level,
            log_format,
        })
    }
}

/// The queue worker's settings, for production and for the dev API alike.
fn worker_config(
    worker: &WorkerArgs,
    results: &ResultArgs,
    max_output_bytes: usize,
    ping_interval_ms: u64,
    origin: &Origin,
) -> Result<WorkerConfig, ConfigError> {
    Ok(WorkerConfig {
        concurrency: worker_concurrency(worker),
        shutdown_grace: seconds("--shutdown-grace-secs", worker.shutdown_grace_secs)?,
        result_retry: seconds("--result-retry-secs", worker.result_retry_secs)?,
        ping_interval: Duration::from_millis(ping_interval_ms),
        max_output_bytes,
        return_aggregate_stream: results.return_aggregate_stream,
        refresh_worker: results.refresh_worker,
        origin: origin.clone(),
    })
}

/// How many jobs the operator asked to run at once (before the handler's cap).
fn worker_concurrency(worker: &WorkerArgs) -> usize {
    worker
        .concurrency
        .or(worker.runpod_max_concurrency)
        .unwrap_or(1)
        .max(1)
}

/// A health check path as given: a plain path (it is matched exactly, never as a pattern), and
/// not `/metrics`, which the server answers itself.
fn health_path(path: &str) -> Result<String, ConfigError> {
    let path = path.trim();
    if path.starts_with('/') && !path.contains(['?', '#', ' ', '{', '}', '*']) && path != "/metrics"
    {
        Ok(path.to_owned())
    } else {
        Err(ConfigError::InvalidHealthPath(path.to_owned()))
    }
}

/// A random worker id, 32 hex digits, for a worker started off the platform.
fn random_worker_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn seconds(flag: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value).map_err(|_| ConfigError::InvalidDuration { flag, value })
}

fn one_shot(text: &str, test_output: Option<&str>) -> Result<OneShot, ConfigError> {
    let raw: &RawValue = serde_json::from_str(text).map_err(|error| ConfigError::InvalidJson {
        what: "the test input",
        reason: error.to_string(),
    })?;
    let job = Job::parse(raw, Some(LOCAL_TEST_JOB_ID), InputRule::NotNull)
        .map_err(ConfigError::InvalidTestJob)?;
    let expected_output = match test_output {
        Some(argument) => {
            let text = json_argument("the expected test output", argument)?;
            Some(
                serde_json::from_str(&text).map_err(|error| ConfigError::InvalidJson {
                    what: "the expected test output",
                    reason: error.to_string(),
                })?,
            )
        }
        None => None,
    };
    Ok(OneShot {
        job,
        expected_output,
    })
}

/// Reads a JSON argument: the text itself, or the contents of the file after `@`. Checks that it
/// is one JSON value and returns it as text.
fn json_argument(what: &'static str, argument: &str) -> Result<String, ConfigError> {
    let text = match argument.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|source| ConfigError::UnreadableFile {
                what,
                path: PathBuf::from(path),
                source,
            })?
        }
        None => argument.to_owned(),
    };
    serde_json::from_str::<&RawValue>(&text).map_err(|error| ConfigError::InvalidJson {
        what,
        reason: error.to_string(),
    })?;
    Ok(text)
}
