//! `queue-bench`: how fast `worker-host` moves jobs through the RunPod queue protocol, and whether
//! its memory stays flat; run by hand, not by CI.
//!
//! The bench starts a lean stand-in of the platform's worker-facing endpoints on loopback (job-take,
//! job-take-batch, job-done, job-stream, job-stop, ping; the same URL layout as
//! `e2e::platform::Platform::worker_env`), fills its queue with N echo jobs and lets a real worker
//! drain it. For each run it prints:
//!
//! - **jobs/s**: N divided by the time from filling the queue to the arrival of the last job-done
//!   POST;
//! - **p50 / p99 latency**: per job, from the moment job-take handed it out to the moment its
//!   job-done POST arrived;
//! - the take requests the worker needed, and the CPU time the worker and the stand-in spent per
//!   job (on a 2-core machine they share the cores, so both matter).
//!
//! Runs: `worker-host` (release build, echo handler, `--rp_log_level WARN`) at concurrency 1 and 8;
//! the official Python worker (`runpod` 1.12.0, `tests/bench/python_echo.py`) at concurrency 1
//! and 8 when `python3 -c "import runpod"` works, with a small N because the SDK sleeps 1 s whenever
//! its slots are full; and a memory run: `worker-host` at concurrency 8 over 100,000 jobs, with its
//! VmRSS (from `/proc/<pid>/status`) sampled every 10,000 jobs, so the table shows whether it
//! stays flat after warm-up. Every result is checked (each job answered once, output equal to
//! input) and `worker-host` must exit 0 on SIGTERM; the bench exits 1 when a check fails.
//!
//! Usage (`cargo run --bin queue-bench` does not rebuild the worker or the handler, so build them
//! first; the table's header names the binary it measured and when it was built):
//!
//! ```text
//! cargo build --release -p worker-host -p echo-handler
//! cargo run --release -p e2e --bin queue-bench -- [--jobs N] [--soak-jobs N] [--python-jobs N]
//!     [--sample-every N] [--skip-python] [--skip-soak]
//! ```
//!
//! It looks for `worker-host` and `libecho_handler.so` next to its own executable (the same
//! `target/release` directory). For the Python runs: `pip install runpod==1.12.0`. The whole bench
//! takes under a minute with the defaults on 2 cores (the Python runs take about 10 s of it).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path as FsPath, PathBuf};
use std::pin::pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[path = "common.rs"]
mod common;
use common::{artefact, cpu_model, describe_binary, python_runpod, vm_kib};

/// How long an empty take is held (long-poll) before the 204.
const TAKE_HOLD: Duration = Duration::from_secs(2);
/// How long a job-stop poll is held before the 204 (nothing is ever stopped here).
const STOP_HOLD: Duration = Duration::from_secs(2);
/// The heartbeat period given to the workers, in milliseconds (the Python SDK rounds it down to
/// whole seconds, so it must be at least 1000).
const PING_INTERVAL_MS: &str = "1000";
/// How long a worker may take from start to its first take request.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `worker-host` may take to exit after SIGTERM (its default grace period is 30 s, and
/// nothing is running when the signal comes).
const EXIT_TIMEOUT: Duration = Duration::from_secs(40);
/// How often the driver looks at the run's progress and at the worker process.
const POLL: Duration = Duration::from_millis(20);

const USAGE: &str = "\
usage: queue-bench [--jobs N] [--soak-jobs N] [--python-jobs N] [--sample-every N]
                   [--skip-python] [--skip-soak]

  --jobs N          jobs per worker-host throughput run, at concurrency 1 and 8 (default 20000)
  --soak-jobs N     jobs in the worker-host memory run at concurrency 8 (default 100000)
  --sample-every N  sample worker-host's VmRSS every N jobs of the memory run (default 10000)
  --python-jobs N   jobs per Python SDK run (default 10: the SDK manages about 1 job/s)
  --skip-python     do not run the official Python worker
  --skip-soak       do not run the memory run";

/// The command line.
#[derive(Debug, Clone)]
struct Options {
    jobs: usize,
    soak_jobs: usize,
    sample_every: usize,
    python_jobs: usize,
    skip_python: bool,
    skip_soak: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            jobs: 20_000,
            soak_jobs: 100_000,
            sample_every: 10_000,
            python_jobs: 10,
            skip_python: false,
            skip_soak: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = |name: &str| -> Result<usize, String> {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{name} needs a number"))?;
                value
                    .replace(['_', ','], "")
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{name}: {value:?} is not a positive number"))
            };
            match arg.as_str() {
                "--jobs" => options.jobs = number("--jobs")?,
                "--soak-jobs" => options.soak_jobs = number("--soak-jobs")?,
                "--sample-every" => options.sample_every = number("--sample-every")?,
                "--python-jobs" => options.python_jobs = number("--python-jobs")?,
                "--skip-python" => options.skip_python = true,
                "--skip-soak" => options.skip_soak = true,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(options)
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in platform
// ---------------------------------------------------------------------------------------------

/// What the server and the driver share.
struct Shared {
    state: Mutex<RunState>,
    /// Woken when jobs are queued, for held takes.
    jobs_ready: Notify,
}

impl Shared {
    /// The state; a panic elsewhere must not wedge the server, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One run's bookkeeping. Requests from any other worker id (a worker of an earlier run whose
/// long-poll is still held) are answered at once and otherwise ignored.
#[derive(Default)]
struct RunState {
    /// The worker id of the current run; job ids are `{worker}-{n}`.
    worker: String,
    /// Job numbers not handed out yet.
    queue: VecDeque<usize>,
    /// When each job was handed out, by job number.
    taken_at: Vec<Option<Instant>>,
    /// Whether each job's result has arrived, by job number.
    answered: Vec<bool>,
    /// Taken-to-done time of each answered job, in arrival order.
    latencies: Vec<Duration>,
    done: usize,
    last_done: Option<Instant>,
    /// When the worker's first take arrived: it is up.
    ready_at: Option<Instant>,
    takes: u64,
    batch_takes: u64,
    empty_takes: u64,
    pings: u64,
    /// Results for unknown or never-taken job ids, repeated results, outputs unequal to inputs,
    /// and requests to URLs the stand-in does not serve.
    unknown_results: u64,
    duplicate_results: u64,
    wrong_outputs: u64,
    stray_requests: u64,
    /// The worker's pid and, when sampling, VmRSS every `sample_every` results: (jobs done, KiB).
    pid: u32,
    sample_every: Option<usize>,
    rss_samples: Vec<(usize, u64)>,
}

/// The query of a take: only `batch_size` matters here (`gpu`, `job_in_progress` are ignored).
#[derive(Deserialize)]
struct TakeQuery {
    batch_size: Option<usize>,
}

/// The input of job number `n`; the echo handler must return it unchanged.
fn job_input(n: usize) -> String {
    format!(r#"{{"prompt":"echo me","n":{n}}}"#)
}

/// Starts the stand-in on its own thread and single-threaded runtime (a lean server leaves the
/// cores to the worker being measured); returns its base URL.
fn start_stand_in(shared: Arc<Shared>) -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    listener.set_nonblocking(true)?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/v2/{ep}/job-take/{worker}", get(take))
        .route("/v2/{ep}/job-take-batch/{worker}", get(take_batch))
        .route("/v2/{ep}/job-done/{worker}/{*id}", post(done))
        .route("/v2/{ep}/job-stream/{worker}/{*id}", post(stream))
        .route("/v2/{ep}/job-stop/{worker}", get(stop))
        .route("/v2/{ep}/ping/{worker}", get(ping))
        .fallback(other)
        .with_state(shared);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("stand-in".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("the listener could not join the stand-in's runtime")
                    .tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                axum::serve(listener, app)
                    .await
                    .expect("the stand-in stopped serving");
            });
        })?;
    Ok(base)
}

async fn take(
    State(shared): State<Arc<Shared>>,
    Path((_endpoint, worker)): Path<(String, String)>,
) -> Response {
    hand_out(&shared, &worker, None).await
}

async fn take_batch(
    State(shared): State<Arc<Shared>>,
    Path((_endpoint, worker)): Path<(String, String)>,
    Query(query): Query<TakeQuery>,
) -> Response {
    match query.batch_size.filter(|&n| n > 0) {
        Some(batch_size) => hand_out(&shared, &worker, Some(batch_size)).await,
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// Answers a take: one job as an object (`batch` is `None`) or up to `batch` jobs as an array;
/// when the queue is empty, holds the request until jobs arrive or [`TAKE_HOLD`] passes (204).
async fn hand_out(shared: &Shared, worker: &str, batch: Option<usize>) -> Response {
    {
        let mut state = shared.lock();
        if state.worker != worker {
            state.stray_requests += 1;
            return StatusCode::NO_CONTENT.into_response();
        }
        state.ready_at.get_or_insert_with(Instant::now);
        state.takes += 1;
        if batch.is_some() {
            state.batch_takes += 1;
        }
    }
    let deadline = tokio::time::Instant::now() + TAKE_HOLD;
    loop {
        // Registered before looking, so jobs queued between the look and the wait still wake us.
        let mut ready = pin!(shared.jobs_ready.notified());
        ready.as_mut().enable();
        {
            let mut state = shared.lock();
            if state.worker != worker {
                return StatusCode::NO_CONTENT.into_response();
            }
            if !state.queue.is_empty() {
                let count = batch.unwrap_or(1).min(state.queue.len());
                let now = Instant::now();
                let mut body = String::with_capacity(64 * count + 2);
                if batch.is_some() {
                    body.push('[');
                }
                for i in 0..count {
                    let n = state.queue.pop_front().expect("checked non-empty");
                    state.taken_at[n] = Some(now);
                    if i > 0 {
                        body.push(',');
                    }
                    let _ = write!(body, r#"{{"id":"{worker}-{n}","input":{}}}"#, job_input(n));
                }
                if batch.is_some() {
                    body.push(']');
                }
                drop(state);
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
        }
        if tokio::time::timeout_at(deadline, ready).await.is_err() {
            shared.lock().empty_takes += 1;
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

async fn done(
    State(shared): State<Arc<Shared>>,
    Path((_endpoint, worker, id)): Path<(String, String, String)>,
    body: Bytes,
) -> StatusCode {
    let arrived = Instant::now();
    // The job number, and whether the output is the input, are worked out before locking.
    let number = id
        .strip_prefix(worker.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let output_ok = number.is_some_and(|n| {
        let expected: Value = serde_json::from_str(&job_input(n)).expect("job inputs are JSON");
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|mut result| result.get_mut("output").map(Value::take))
            .is_some_and(|output| output == expected)
    });
    let mut state = shared.lock();
    if state.worker != worker {
        state.stray_requests += 1;
        return StatusCode::OK;
    }
    let Some(taken_at) = number.and_then(|n| state.taken_at.get(n).copied().flatten()) else {
        state.unknown_results += 1;
        return StatusCode::OK;
    };
    let n = number.expect("a taken job has a number");
    if state.answered[n] {
        state.duplicate_results += 1;
        return StatusCode::OK;
    }
    state.answered[n] = true;
    state.latencies.push(arrived - taken_at);
    state.done += 1;
    state.last_done = Some(arrived);
    if !output_ok {
        state.wrong_outputs += 1;
    }
    if let Some(every) = state.sample_every {
        if state.done % every == 0 {
            let sample = (state.done, vm_kib(state.pid, "VmRSS").unwrap_or(0));
            state.rss_samples.push(sample);
        }
    }
    StatusCode::OK
}

async fn stream() -> StatusCode {
    StatusCode::OK
}

async fn stop() -> StatusCode {
    tokio::time::sleep(STOP_HOLD).await;
    StatusCode::NO_CONTENT
}

async fn ping(
    State(shared): State<Arc<Shared>>,
    Path((_endpoint, worker)): Path<(String, String)>,
) -> StatusCode {
    let mut state = shared.lock();
    if state.worker == worker {
        state.pings += 1;
    }
    StatusCode::OK
}

async fn other(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().stray_requests += 1;
    StatusCode::NOT_FOUND
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// User plus system CPU time a process has used so far (`/proc/<pid>/stat`), or of this process
/// when `pid` is `None`.
fn cpu_time(pid: Option<u32>, ticks_per_second: u64) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(
        ticks * 1000 / ticks_per_second.max(1),
    ))
}

/// The kernel's clock ticks per second (for `/proc/<pid>/stat`), 100 when `getconf` fails.
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// Which worker a run starts.
#[derive(Debug, Clone)]
enum Subject {
    /// The release `worker-host` with the echo handler.
    WorkerHost { binary: PathBuf, handler: PathBuf },
    /// The official Python SDK running `python_echo.py`.
    Python { script: PathBuf },
}

impl Subject {
    fn label(&self) -> &'static str {
        match self {
            Subject::WorkerHost { .. } => "worker-host",
            Subject::Python { .. } => "python runpod 1.12.0",
        }
    }

    /// The command that starts the worker at `concurrency`, in `dir`, pointed at `base`.
    fn command(&self, base: &str, worker: &str, concurrency: usize, dir: &FsPath) -> Command {
        let mut command = match self {
            Subject::WorkerHost { binary, .. } => Command::new(binary),
            Subject::Python { .. } => Command::new("python3"),
        };
        // The platform's variables only: nothing inherited may change how the worker runs.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("RUNPOD_") || name.starts_with("WORKER_HOST_") {
                command.env_remove(&*name);
            }
        }
        match self {
            Subject::WorkerHost { handler, .. } => {
                command
                    .arg("--handler")
                    .arg(handler)
                    .args(["--concurrency", &concurrency.to_string()])
                    .args(["--rp_log_level", "WARN"]);
            }
            Subject::Python { script } => {
                command
                    .arg(script)
                    .env("BENCH_CONCURRENCY", concurrency.to_string())
                    .env("RUNPOD_LOG_LEVEL", "ERROR")
                    .env("PYTHONUNBUFFERED", "1");
            }
        }
        command
            .current_dir(dir)
            .env(
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{base}/v2/ep/job-take/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{base}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{base}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_PING",
                format!("{base}/v2/ep/ping/$RUNPOD_POD_ID?gpu=test"),
            )
            .env("RUNPOD_POD_ID", worker)
            .env("RUNPOD_AI_API_KEY", "bench-key")
            .env("RUNPOD_PING_INTERVAL", PING_INTERVAL_MS)
            .stdin(Stdio::null());
        command
    }
}

/// What one run measured.
struct RunReport {
    label: &'static str,
    concurrency: usize,
    jobs: usize,
    done: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    takes: u64,
    batch_takes: u64,
    worker_cpu: Option<Duration>,
    stand_in_cpu: Option<Duration>,
    rss_samples: Vec<(usize, u64)>,
    rss_end: Option<u64>,
    hwm_end: Option<u64>,
    /// How the worker ended: "exit 0", "killed", ...
    ending: String,
    /// How many lines the worker logged (at WARN for worker-host, ERROR for Python).
    log_lines: usize,
    /// Everything that went wrong; empty for a clean run.
    problems: Vec<String>,
}

impl RunReport {
    fn jobs_per_second(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The last `max_lines` lines of a log file.
fn log_tail(path: &FsPath, max_lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// Waits up to `timeout` for the process to exit.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => return None,
        }
    }
}

/// The stand-in and what every run needs.
struct Bench {
    shared: Arc<Shared>,
    base: String,
    dir: tempfile::TempDir,
    ticks: u64,
}

impl Bench {
    /// Starts `subject` at `concurrency`, waits for its first take, queues `jobs` jobs, waits for
    /// every result (or `timeout`), then stops the worker: SIGTERM for `worker-host` (which must
    /// exit 0), a kill for Python.
    fn run(
        &self,
        subject: &Subject,
        concurrency: usize,
        jobs: usize,
        sample_every: Option<usize>,
        timeout: Duration,
    ) -> RunReport {
        let worker = format!(
            "{}-c{concurrency}-n{jobs}",
            match subject {
                Subject::WorkerHost { .. } => "wh",
                Subject::Python { .. } => "py",
            }
        );
        *self.shared.lock() = RunState {
            worker: worker.clone(),
            taken_at: vec![None; jobs],
            answered: vec![false; jobs],
            latencies: Vec::with_capacity(jobs),
            sample_every,
            ..RunState::default()
        };
        let mut report = RunReport {
            label: subject.label(),
            concurrency,
            jobs,
            done: 0,
            elapsed: Duration::ZERO,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            takes: 0,
            batch_takes: 0,
            worker_cpu: None,
            stand_in_cpu: None,
            rss_samples: Vec::new(),
            rss_end: None,
            hwm_end: None,
            ending: String::new(),
            log_lines: 0,
            problems: Vec::new(),
        };
        let log_path = self.dir.path().join(format!("{worker}.log"));
        let log = match std::fs::File::create(&log_path) {
            Ok(log) => log,
            Err(error) => {
                report
                    .problems
                    .push(format!("cannot create {log_path:?}: {error}"));
                return report;
            }
        };
        let mut command = subject.command(&self.base, &worker, concurrency, self.dir.path());
        command.stdout(Stdio::null()).stderr(log).process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                report.problems.push(format!("cannot start it: {error}"));
                return report;
            }
        };
        let pid = child.id();
        self.shared.lock().pid = pid;

        // Up when its first take arrives.
        let started = Instant::now();
        let mut exited = None;
        while self.shared.lock().ready_at.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                report.problems.push(format!(
                    "no take request within {STARTUP_TIMEOUT:?} of starting"
                ));
                break;
            }
            std::thread::sleep(POLL);
        }

        let mut cpu_start = (None, None);
        let mut queued_at = Instant::now();
        if exited.is_none() && report.problems.is_empty() {
            cpu_start = (cpu_time(Some(pid), self.ticks), cpu_time(None, self.ticks));
            {
                let mut state = self.shared.lock();
                state.queue.extend(0..jobs);
                queued_at = Instant::now();
            }
            self.shared.jobs_ready.notify_waiters();
            loop {
                if self.shared.lock().done >= jobs {
                    break;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    break;
                }
                if queued_at.elapsed() > timeout {
                    report
                        .problems
                        .push(format!("not every job was answered within {timeout:?}"));
                    break;
                }
                std::thread::sleep(POLL);
            }
        }

        // Measured while the worker still runs.
        let delta = |end: Option<Duration>, start: Option<Duration>| Some(end? - start?);
        report.worker_cpu = delta(cpu_time(Some(pid), self.ticks), cpu_start.0);
        report.stand_in_cpu = delta(cpu_time(None, self.ticks), cpu_start.1);
        report.rss_end = vm_kib(pid, "VmRSS");
        report.hwm_end = vm_kib(pid, "VmHWM");

        report.ending = match (exited, subject) {
            (Some(status), _) => {
                report
                    .problems
                    .push(format!("the worker exited early ({status})"));
                format!("early {status}")
            }
            (None, Subject::WorkerHost { .. }) => {
                let signalled = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .is_ok_and(|status| status.success());
                if !signalled {
                    report.problems.push("`kill -TERM` failed".into());
                }
                match wait_for_exit(&mut child, EXIT_TIMEOUT) {
                    Some(status) if status.success() => "SIGTERM, exit 0".into(),
                    Some(status) => {
                        report
                            .problems
                            .push(format!("after SIGTERM the worker ended with {status}"));
                        format!("SIGTERM, {status}")
                    }
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        report.problems.push(format!(
                            "the worker did not exit within {EXIT_TIMEOUT:?} of SIGTERM"
                        ));
                        "killed (SIGTERM ignored)".into()
                    }
                }
            }
            (None, Subject::Python { .. }) => {
                // The SDK forks a heartbeat process: kill the whole group.
                e2e::kill_process_group(&mut child);
                "killed".into()
            }
        };

        let mut state = self.shared.lock();
        // Later requests (a held take of this worker) must not touch the next run.
        state.worker.clear();
        report.done = state.done;
        report.elapsed = state.last_done.map_or(Duration::ZERO, |last| {
            last.saturating_duration_since(queued_at)
        });
        let mut latencies = std::mem::take(&mut state.latencies);
        latencies.sort_unstable();
        report.p50 = percentile(&latencies, 50.0);
        report.p99 = percentile(&latencies, 99.0);
        report.takes = state.takes;
        report.batch_takes = state.batch_takes;
        report.rss_samples = std::mem::take(&mut state.rss_samples);
        if state.done < jobs {
            report
                .problems
                .push(format!("{} of {jobs} jobs answered", state.done));
        }
        for (count, what) in [
            (
                state.unknown_results,
                "results for unknown or never-taken jobs",
            ),
            (state.duplicate_results, "repeated results"),
            (state.wrong_outputs, "outputs unequal to the input"),
        ] {
            if count > 0 {
                report.problems.push(format!("{count} {what}"));
            }
        }
        drop(state);
        report.log_lines = std::fs::read_to_string(&log_path)
            .map(|text| text.lines().count())
            .unwrap_or(0);
        if !report.problems.is_empty() {
            report.problems.push(format!(
                "last lines of its log ({}):\n{}",
                log_path.display(),
                log_tail(&log_path, 20)
            ));
        }
        report
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Jobs per second: one decimal below 100, whole thousands-separated numbers above.
fn rate(per_second: f64) -> String {
    if per_second < 100.0 {
        format!("{per_second:.1}")
    } else {
        thousands(per_second.round() as u64)
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1000.0)
}

/// CPU time per job, in microseconds.
fn per_job(cpu: Option<Duration>, jobs: usize) -> String {
    match cpu {
        Some(cpu) if jobs > 0 => format!("{:.0}", cpu.as_secs_f64() * 1e6 / jobs as f64),
        _ => "-".into(),
    }
}

fn print_table(reports: &[&RunReport], python_note: Option<&str>) {
    println!(
        "{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>15} {:>9} {:>9}  stop",
        "worker",
        "conc",
        "jobs",
        "wall s",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "takes (batch)",
        "wk µs/job",
        "pf µs/job",
    );
    for r in reports {
        let jobs = if r.done == r.jobs {
            thousands(r.jobs as u64)
        } else {
            format!("{}/{}", r.done, r.jobs)
        };
        let jobs = if r.label.starts_with("python") {
            format!("{jobs}*")
        } else {
            jobs
        };
        println!(
            "{:<22} {:>4} {:>8} {:>8.2} {:>8} {:>8} {:>8} {:>15} {:>9} {:>9}  {}",
            r.label,
            r.concurrency,
            jobs,
            r.elapsed.as_secs_f64(),
            rate(r.jobs_per_second()),
            millis(r.p50),
            millis(r.p99),
            format!("{} ({})", thousands(r.takes), thousands(r.batch_takes)),
            per_job(r.worker_cpu, r.done),
            per_job(r.stand_in_cpu, r.done),
            r.ending
        );
    }
    println!();
    println!("jobs/s: jobs / (last job-done arrival - queue filled); latency: job-take answer -> job-done arrival;");
    println!("takes (batch): take requests (of them job-take-batch); wk / pf µs/job: CPU time (user+sys) of the");
    println!("worker / of the stand-in platform (this process) per job.");
    if let Some(note) = python_note {
        println!("{note}");
    }
    let logged: Vec<String> = reports
        .iter()
        .filter(|r| r.log_lines > 0)
        .map(|r| format!("{} c{}: {}", r.label, r.concurrency, r.log_lines))
        .collect();
    if logged.is_empty() {
        println!("no worker logged anything (worker-host at WARN, Python at ERROR).");
    } else {
        println!(
            "log lines (worker-host at WARN, Python at ERROR): {}",
            logged.join("; ")
        );
    }
}

fn print_memory(report: &RunReport) {
    println!();
    println!(
        "worker-host memory, concurrency {}, {} jobs (VmRSS from /proc/{{pid}}/status):",
        report.concurrency,
        thousands(report.jobs as u64)
    );
    println!("{:>10} {:>12}", "jobs done", "VmRSS KiB");
    for (done, kib) in &report.rss_samples {
        println!("{:>10} {:>12}", thousands(*done as u64), thousands(*kib));
    }
    if let Some(hwm) = report.hwm_end {
        println!("{:>10} {:>12}", "peak", thousands(hwm));
    }
    let (Some(&(first_done, first)), Some(&(last_done, last))) =
        (report.rss_samples.first(), report.rss_samples.last())
    else {
        println!("(no samples)");
        return;
    };
    let growth = last as i64 - first as i64;
    let per_10k = if last_done > first_done {
        growth as f64 * 10_000.0 / (last_done - first_done) as f64
    } else {
        0.0
    };
    // A leak grows as fast in the second half as in the first; allocator warm-up levels off.
    let (middle_done, middle) = report.rss_samples[(report.rss_samples.len() - 1) / 2];
    let second_half = last as i64 - middle as i64;
    // Flat: under 1 MiB or 5 % of the warm-up size over the run, whichever is larger.
    let allowed = (first / 20).max(1024) as i64;
    println!(
        "growth after warm-up ({} -> {} jobs): {:+} KiB ({:+.1} KiB per 10,000 jobs on average; \
         {:+} KiB in the second half, {} -> {}): {}",
        thousands(first_done as u64),
        thousands(last_done as u64),
        growth,
        per_10k,
        second_half,
        thousands(middle_done as u64),
        thousands(last_done as u64),
        if growth <= allowed { "flat" } else { "GROWING" }
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args) {
        Ok(options) => options,
        Err(error) if error.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("queue-bench: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let worker_host = match (artefact("worker-host"), artefact("libecho_handler.so")) {
        (Ok(binary), Ok(handler)) => Subject::WorkerHost { binary, handler },
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("queue-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    if cfg!(debug_assertions) {
        eprintln!("queue-bench: warning: this is a debug build; run it with `cargo run --release`");
    }
    let python = if options.skip_python {
        Err("skipped (--skip-python)".to_owned())
    } else {
        let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/python_echo.py"));
        python_runpod().and_then(|version| {
            if !script.is_file() {
                return Err(format!("{} is missing", script.display()));
            }
            eprintln!("queue-bench: python runpod {version} found");
            Ok(Subject::Python { script })
        })
    };

    let shared = Arc::new(Shared {
        state: Mutex::new(RunState::default()),
        jobs_ready: Notify::new(),
    });
    let base = match start_stand_in(shared.clone()) {
        Ok(base) => base,
        Err(error) => {
            eprintln!("queue-bench: the stand-in platform could not start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("queue-bench: no temporary directory: {error}");
            return ExitCode::FAILURE;
        }
    };
    let bench = Bench {
        shared,
        base,
        dir,
        ticks: clock_ticks(),
    };
    // Generous bounds: a run that overruns them is reported as failed rather than left waiting.
    let timeout_for = |jobs: usize, per_job: Duration| {
        Duration::from_secs(60) + per_job * u32::try_from(jobs).unwrap_or(u32::MAX)
    };

    let mut reports = Vec::new();
    for concurrency in [1, 8] {
        eprintln!(
            "queue-bench: worker-host, concurrency {concurrency}, {} jobs...",
            options.jobs
        );
        reports.push(bench.run(
            &worker_host,
            concurrency,
            options.jobs,
            None,
            timeout_for(options.jobs, Duration::from_millis(2)),
        ));
    }
    let python_note = match &python {
        Ok(subject) => {
            for concurrency in [1, 8] {
                eprintln!(
                    "queue-bench: python runpod, concurrency {concurrency}, {} jobs...",
                    options.python_jobs
                );
                reports.push(bench.run(
                    subject,
                    concurrency,
                    options.python_jobs,
                    None,
                    timeout_for(options.python_jobs, Duration::from_secs(3)),
                ));
            }
            Some(format!(
                "* python runs use only {} jobs: the SDK sleeps 1 s whenever its slots are full, so it \
                 manages about concurrency jobs/s;\n  its figures include that sleep, and its CPU \
                 columns are rough (10 ms clock ticks over a few jobs).",
                options.python_jobs
            ))
        }
        Err(reason) => Some(format!("python runpod: not run: {reason}")),
    };
    let soak = (!options.skip_soak).then(|| {
        eprintln!(
            "queue-bench: worker-host memory run, concurrency 8, {} jobs...",
            options.soak_jobs
        );
        bench.run(
            &worker_host,
            8,
            options.soak_jobs,
            Some(options.sample_every),
            timeout_for(options.soak_jobs, Duration::from_millis(2)),
        )
    });

    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!(
        "queue-bench: echo handler through a loopback stand-in platform; {cores} cores, {}",
        cpu_model()
    );
    let mut command = "cargo run --release -p e2e --bin queue-bench".to_owned();
    if !args.is_empty() {
        command = format!("{command} -- {}", args.join(" "));
    }
    println!("command: {command}");
    if let Subject::WorkerHost { binary, .. } = &worker_host {
        println!("worker-host: {}", describe_binary(binary));
    }
    println!();
    let mut table: Vec<&RunReport> = reports.iter().collect();
    table.extend(soak.as_ref());
    print_table(&table, python_note.as_deref());
    if let Some(soak) = &soak {
        print_memory(soak);
    }
    if let Some(c1) = reports
        .iter()
        .find(|r| r.label == "worker-host" && r.concurrency == 1)
    {
        println!();
        println!(
            "target: >= 2,000 jobs/s at concurrency 1: {} ({} jobs/s)",
            if c1.jobs_per_second() >= 2000.0 {
                "met"
            } else {
                "MISSED"
            },
            thousands(c1.jobs_per_second().round() as u64)
        );
    }

    let mut failed = false;
    for r in table {
        for problem in &r.problems {
            failed = true;
            eprintln!(
                "queue-bench: {} at concurrency {}: {problem}",
                r.label, r.concurrency
            );
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
