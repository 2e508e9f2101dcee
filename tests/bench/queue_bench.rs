//! `queue-bench`: how fast `worker-host` moves jobs through the RunPod queue protocol, what running
//! the handler in a separate runner process costs, and whether its memory stays flat; run by
//! hand, not by CI.
//!
//! The bench starts a lean stand-in of the platform's worker-facing endpoints on loopback (job-take,
//! job-take-batch, job-done, job-stream, job-stop, ping; the same URL layout as
//! `e2e::platform::Platform::worker_env`), fills its queue with N echo jobs and lets a real worker
//! drain it. For each run it prints:
//!
//! - **jobs/s**: N divided by the time from filling the queue to the arrival of the last job-done
//!   POST;
//! - **mean / p50 / p99 latency**: per job, from the moment job-take's answer was ready to the
//!   moment its job-done POST arrived;
//! - the take requests the worker needed, and the CPU time the worker and the stand-in spent per
//!   job (on a 2-core machine they share the cores, so both matter). The worker's CPU is that of
//!   its whole process tree, found through `/proc/<pid>/task/*/children` and read while the worker
//!   still runs: `worker-host`'s runner child (the handler's process under `--isolation runner`)
//!   and the Python SDK's heartbeat process are counted; a child that ended during the run is not.
//!
//! Runs:
//!
//! - **throughput**: `worker-host` (release build, echo handler, `--rp_log_level WARN`) with its
//!   default isolation (`runner`: the handler in a supervised child process; the table's
//!   `worker-host`) and with `--isolation none` (the handler in the host's own process;
//!   `worker-host (none)`), each at concurrency 1 and 8, in `--rounds` interleaved rounds (a
//!   shared machine's noise swamps a single pair); the table shows each one's median round, and
//!   the ratio line every round's isolated jobs/s / in-process jobs/s and their median (target:
//!   at least 0.70);
//! - **big payload**: `--big-jobs` echo jobs at concurrency 1 whose input is
//!   `{"prompt": "<--big-bytes of ASCII text>", "n": n}` (10 MiB by default), for both isolations,
//!   handled by the C echo (`libc_echo_handler.so`, which gives its input straight back to
//!   `set_output`, so the rows measure the host and not a handler's own copies: the Rust SDK's
//!   typed echo copies a 10 MiB input twice more, into its `RawJson` and out of it),
//!   with `--max-input-bytes` and `--max-output-bytes` of 64 MiB, followed by the ratio of the
//!   isolated mean (and p50) latency to the in-process one (target: at most 1.5). The text is
//!   built once and shared; an output is checked by comparing the job-done body's bytes with the
//!   expected `{"output":<input>}` piecewise (parsing it only when those differ), so the check
//!   does not slow the stand-in down;
//! - **one-shot**: `worker-host --handler libecho_handler.so --test_input '{"input": 1}'`, from
//!   spawn to exit, `--oneshot-runs` times for each isolation after one unmeasured warm-up run,
//!   with its median and p90 wall time (target: under 20 ms); its output must be `{"output":1}`;
//! - **the floor**: a bare loop (see `bare_loop`: this binary, one thread, one keep-alive
//!   connection, take a job and post its input back) at concurrency 1 in every round and in the
//!   big-payload runs, with `worker-host`'s ratio to it (targets: `--isolation none` at least
//!   0.80 of its throughput; a 10 MiB job at most 1.3 times its latency, the host's peak RSS at
//!   most 4 times the payload);
//! - **batch**: four jobs of a 15 MiB prompt taken in one batch at concurrency 4, for both
//!   isolations (the C echo again), with the host's peak RSS against the batch's size (target: at most 2.5 times);
//! - the official Python worker (`runpod` 1.12.0, `tests/bench/python_echo.py`) at concurrency 1
//!   and 8 when `python3 -c "import runpod"` works, with a small N because the SDK sleeps 1 s
//!   whenever its slots are full;
//! - the Python bridge (`worker-host` with `libpython_bridge.so`) against the official Python
//!   worker on the same async `tests/bench/python_async_echo.py`, at concurrency 1 and 8, with the
//!   idle memory of each Python run's whole process tree (the host and its runner child; the SDK
//!   and its heartbeat process): VmRSS and PSS summed, read once its `init` is done (1 s after its
//!   first take) and again 1 s after its last result;
//! - **memory**: `worker-host` (default isolation) at concurrency 8 over 100,000 jobs, with its
//!   VmRSS (from `/proc/<pid>/status`, the host process only) sampled every 10,000 jobs, so the
//!   table shows whether it stays flat after warm-up.
//!
//! Every result is checked (each job answered once, output equal to input) and `worker-host` must
//! exit 0 on SIGTERM; the bench exits 1 when a check fails.
//!
//! Usage (`cargo run --bin queue-bench` does not rebuild the worker or the handler, so build them
//! first; the table's header names the binary it measured and when it was built):
//!
//! ```text
//! cargo build --release -p worker-host -p echo-handler -p c-echo-handler
//! cargo run --release -p e2e --bin queue-bench -- [--jobs N] [--big-jobs N] [--big-bytes N]
//!     [--oneshot-runs N] [--soak-jobs N] [--python-jobs N] [--sample-every N]
//!     [--skip-big] [--skip-oneshot] [--skip-python] [--skip-soak]
//! ```
//!
//! It looks for `worker-host`, `libecho_handler.so` and (for the big-payload and batch runs)
//! `libc_echo_handler.so` next to its own executable (the same
//! `target/release` directory). For the Python runs: `pip install runpod==1.12.0`. The whole bench
//! takes about a minute and a half with the defaults on 2 cores (the Python runs and the memory
//! run take about 10 s each, the big-payload and one-shot runs a few seconds).

mod bare_loop;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
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
/// How long a Python run's worker is left idle before its memory is read: after its first take
/// (its `init` is done and it waits on the long-poll) and after its last result.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

/// The prompt of an ordinary (small) job.
const SMALL_PROMPT: &str = "echo me";
/// `--max-input-bytes` and `--max-output-bytes` of the big-payload runs.
const BIG_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// The batch run: this many jobs of [`BATCH_JOB_BYTES`] each, taken in one batch at this
/// concurrency (the issue's valid batch of 4 x 15 MB).
const BATCH_JOBS: usize = 4;
/// The prompt of each job of the batch run.
const BATCH_JOB_BYTES: usize = 15 * 1024 * 1024;
/// The one-shot run's job, as the issue gives it.
const ONESHOT_INPUT: &str = r#"{"input": 1}"#;
/// What the echo handler's one-shot run must print.
const ONESHOT_OUTPUT: &str = r#"{"output":1}"#;

const USAGE: &str = "\
usage: queue-bench [--jobs N] [--rounds N] [--big-jobs N] [--big-bytes N] [--oneshot-runs N]
                   [--soak-jobs N] [--python-jobs N] [--sample-every N]
                   [--skip-big] [--skip-oneshot] [--skip-python] [--skip-soak]

  --jobs N          jobs per worker-host throughput run, for each isolation (runner, none) at
                    concurrency 1 and 8 (default 20000)
  --rounds N        throughput rounds, each running both isolations one after the other; the
                    table shows each run's median round and the ratio line every round's ratio
                    (default 5: a shared machine's noise swamps a single pair)
  --big-jobs N      jobs per big-payload run, for each isolation at concurrency 1 (default 20)
  --big-bytes N     bytes of ASCII text in each big job's prompt (default 10485760, 10 MiB)
  --oneshot-runs N  measured one-shot runs (--test_input) per isolation (default 50)
  --soak-jobs N     jobs in the worker-host memory run at concurrency 8 (default 100000)
  --sample-every N  sample worker-host's VmRSS every N jobs of the memory run (default 10000)
  --python-jobs N   jobs per Python SDK run (default 10: the SDK manages about 1 job/s)
  --skip-big        do not run the big-payload runs (nor the 4 x 15 MiB batch runs)
  --skip-oneshot    do not time the one-shot runs
  --skip-python     do not run the official Python worker (nor the Python bridge)
  --bridge-jobs N   jobs per Python bridge run (default 2,000)
  --skip-soak       do not run the memory run";

/// The command line.
#[derive(Debug, Clone)]
struct Options {
    jobs: usize,
    rounds: usize,
    big_jobs: usize,
    big_bytes: usize,
    oneshot_runs: usize,
    soak_jobs: usize,
    sample_every: usize,
    python_jobs: usize,
    bridge_jobs: usize,
    skip_big: bool,
    skip_oneshot: bool,
    skip_python: bool,
    skip_soak: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            jobs: 20_000,
            rounds: 5,
            big_jobs: 20,
            big_bytes: 10_485_760,
            oneshot_runs: 50,
            soak_jobs: 100_000,
            sample_every: 10_000,
            python_jobs: 10,
            bridge_jobs: 2_000,
            skip_big: false,
            skip_oneshot: false,
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
                "--rounds" => options.rounds = number("--rounds")?,
                "--big-jobs" => options.big_jobs = number("--big-jobs")?,
                "--big-bytes" => options.big_bytes = number("--big-bytes")?,
                "--oneshot-runs" => options.oneshot_runs = number("--oneshot-runs")?,
                "--soak-jobs" => options.soak_jobs = number("--soak-jobs")?,
                "--sample-every" => options.sample_every = number("--sample-every")?,
                "--python-jobs" => options.python_jobs = number("--python-jobs")?,
                "--bridge-jobs" => options.bridge_jobs = number("--bridge-jobs")?,
                "--skip-big" => options.skip_big = true,
                "--skip-oneshot" => options.skip_oneshot = true,
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
    /// The prompt of every job of the run (built once; shared with the handlers that need it),
    /// or `None` for [`SMALL_PROMPT`].
    prompt: Option<Arc<str>>,
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
    /// Outputs whose bytes differed from the expected ones, so that they had to be parsed (all
    /// of the Python SDK's, which spaces its JSON; none of `worker-host`'s, which echoes raw).
    parsed_outputs: u64,
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

/// Appends the input of job number `n`, `{"prompt":"<prompt>","n":<n>}`, to `body`; the echo
/// handler must return it unchanged. `prompt` holds no character JSON would escape.
fn write_input(body: &mut String, prompt: &str, n: usize) {
    body.push_str(r#"{"prompt":""#);
    body.push_str(prompt);
    let _ = write!(body, r#"","n":{n}}}"#);
}

/// `bytes` of ASCII text (lower-case words and spaces), the same on every call.
fn big_prompt(bytes: usize) -> Arc<str> {
    const WORDS: [&str; 16] = [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
        "sed",
        "do",
        "eiusmod",
        "tempor",
        "incididunt",
        "ut",
        "labore",
        "magna",
    ];
    let mut text = String::with_capacity(bytes + 16);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    while text.len() < bytes {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push_str(WORDS[(seed >> 60) as usize]);
        text.push(' ');
    }
    text.truncate(bytes);
    text.into()
}

/// Whether a job-done body carries job `n`'s input as its output. `worker-host` echoes the input
/// raw, so its body is `{"output":<input>}` byte for byte: that is compared piecewise, without
/// building the expected text (a memcmp even for 10 MB). Anything else is parsed and compared
/// as JSON; `parsed` says whether that was needed.
fn output_matches(body: &[u8], prompt: &str, n: usize) -> (bool, bool) {
    let suffix = format!(r#"","n":{n}}}}}"#);
    let exact = body
        .strip_prefix(br#"{"output":{"prompt":""#)
        .and_then(|rest| rest.strip_prefix(prompt.as_bytes()))
        .is_some_and(|rest| rest == suffix.as_bytes());
    if exact {
        return (true, false);
    }
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|result| {
            result
                .get("output")
                .and_then(Value::as_object)
                .is_some_and(|output| {
                    output.len() == 2
                        && output.get("prompt").and_then(Value::as_str) == Some(prompt)
                        && output.get("n").and_then(Value::as_u64) == u64::try_from(n).ok()
                })
        });
    (parsed, true)
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
        // Big-payload results are far over axum's default 2 MB body limit.
        .layer(DefaultBodyLimit::disable())
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
                let numbers: Vec<usize> = state.queue.drain(..count).collect();
                let prompt = state.prompt.clone();
                drop(state);
                // Built unlocked (a big job's body is megabytes), and timed from when it is ready.
                let prompt = prompt.as_deref().unwrap_or(SMALL_PROMPT);
                let mut body = String::with_capacity((64 + prompt.len()) * count + 2);
                if batch.is_some() {
                    body.push('[');
                }
                for (i, &n) in numbers.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    let _ = write!(body, r#"{{"id":"{worker}-{n}","input":"#);
                    write_input(&mut body, prompt, n);
                    body.push('}');
                }
                if batch.is_some() {
                    body.push(']');
                }
                let now = Instant::now();
                let mut state = shared.lock();
                if state.worker == worker {
                    for &n in &numbers {
                        if let Some(taken_at) = state.taken_at.get_mut(n) {
                            *taken_at = Some(now);
                        }
                    }
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
    // The job number, and whether the output is the input, are worked out unlocked.
    let number = id
        .strip_prefix(worker.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let prompt = shared.lock().prompt.clone();
    let prompt = prompt.as_deref().unwrap_or(SMALL_PROMPT);
    let (output_ok, parsed) = number.map_or((false, false), |n| output_matches(&body, prompt, n));
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
    state
        .latencies
        .push(arrived.saturating_duration_since(taken_at));
    if parsed {
        state.parsed_outputs += 1;
    }
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

/// The CPU time so far of `pid` and of every process below it, by pid. Children are listed per
/// thread in `/proc/<pid>/task/<tid>/children` (`worker-host`'s runner is spawned by its
/// supervisor thread, not by the main one). Read it while the processes run: an ended child's
/// `/proc` entry is gone.
fn tree_cpu_times(pid: u32, ticks_per_second: u64) -> HashMap<u32, Duration> {
    tree_pids(pid)
        .into_iter()
        .filter_map(|pid| Some((pid, cpu_time(Some(pid), ticks_per_second)?)))
        .collect()
}

/// The CPU a process tree used between two [`tree_cpu_times`] readings: a process that was not
/// there at the start counts from zero, one gone by the end not at all.
fn tree_cpu_delta(
    start: &HashMap<u32, Duration>,
    end: &HashMap<u32, Duration>,
) -> Option<Duration> {
    if end.is_empty() {
        return None;
    }
    Some(
        end.iter()
            .map(|(pid, cpu)| cpu.saturating_sub(start.get(pid).copied().unwrap_or_default()))
            .sum(),
    )
}

/// The pids of `pid` and of every process below it that are there now.
fn tree_pids(pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        if pids.contains(&pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        pids.push(pid);
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pending.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    pids
}

/// A process tree's memory at one moment.
#[derive(Debug, Clone)]
struct TreeMemory {
    /// Each process's VmRSS in KiB, the worker's first (then its runner, or the SDK's heartbeat
    /// process).
    by_process: Vec<u64>,
    /// The sum of their VmRSS, in KiB. Pages two of them share (a forked child's, say) count
    /// once for each.
    rss_kib: u64,
    /// The sum of their PSS (`/proc/<pid>/smaps_rollup`), in KiB: each shared page split among
    /// its sharers, so the tree's own share of the machine's memory; `None` when unreadable.
    pss_kib: Option<u64>,
}

/// The memory of `pid`'s process tree now (the worker and, for `worker-host`, its runner child;
/// for the Python SDK, its heartbeat process).
fn tree_memory(pid: u32) -> TreeMemory {
    let pids = tree_pids(pid);
    let by_process: Vec<u64> = pids
        .iter()
        .filter_map(|&pid| vm_kib(pid, "VmRSS"))
        .collect();
    let rss_kib = by_process.iter().sum();
    let pss_kib = pids.iter().try_fold(0, |sum, &pid| {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let pss: u64 = rollup.lines().find_map(|line| {
            line.strip_prefix("Pss:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })?;
        Some(sum + pss)
    });
    TreeMemory {
        by_process,
        rss_kib,
        pss_kib,
    }
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

/// Where `worker-host` runs the handler (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// The default, `runner`: a supervised child process. No flag is passed.
    Runner,
    /// `--isolation none`: in the host's own process.
    InProcess,
}

impl Isolation {
    /// The flag that selects it; none for the default.
    fn args(self) -> &'static [&'static str] {
        match self {
            Isolation::Runner => &[],
            Isolation::InProcess => &["--isolation", "none"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Isolation::Runner => "runner",
            Isolation::InProcess => "none",
        }
    }
}

/// Removes the inherited variables that could change how a worker runs: the platform's are set
/// by the bench, `worker-host`'s (`WORKER_HOST_ISOLATION`, ...) must not be there at all.
fn clean_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("RUNPOD_") || name.starts_with("WORKER_HOST_") {
            command.env_remove(&*name);
        }
    }
}

/// Which worker a run starts.
#[derive(Debug, Clone)]
enum Subject {
    /// The release `worker-host` with the echo handler.
    WorkerHost {
        binary: PathBuf,
        handler: PathBuf,
        isolation: Isolation,
    },
    /// The official Python SDK running a script (`python_echo.py`, `python_async_echo.py`).
    Python {
        script: PathBuf,
        label: &'static str,
    },
    /// The release `worker-host` with the Python bridge running `python_async_echo.py`.
    Bridge {
        binary: PathBuf,
        bridge: PathBuf,
        script: PathBuf,
    },
    /// The floor: this binary's bare loop (see `bare_loop`), concurrency 1 only.
    BareLoop { binary: PathBuf },
}

impl Subject {
    fn label(&self) -> &'static str {
        match self {
            Subject::WorkerHost {
                isolation: Isolation::Runner,
                ..
            } => "worker-host",
            Subject::WorkerHost {
                isolation: Isolation::InProcess,
                ..
            } => "worker-host (none)",
            Subject::Python { label, .. } => label,
            Subject::Bridge { .. } => "bridge (worker-host)",
            Subject::BareLoop { .. } => "bare loop (floor)",
        }
    }

    /// A short name for worker ids.
    fn tag(&self) -> &'static str {
        match self {
            Subject::WorkerHost {
                isolation: Isolation::Runner,
                ..
            } => "wh",
            Subject::WorkerHost {
                isolation: Isolation::InProcess,
                ..
            } => "wh-none",
            Subject::Python { .. } => "py",
            Subject::Bridge { .. } => "wh-py",
            Subject::BareLoop { .. } => "bare",
        }
    }

    /// Whether a run of it reads its idle memory (the Python bridge against the Python SDK).
    fn measures_idle_memory(&self) -> bool {
        matches!(self, Subject::Bridge { .. } | Subject::Python { .. })
    }

    /// The same `worker-host` with another handler (any other subject is returned unchanged).
    fn with_handler(&self, handler: &std::path::Path) -> Subject {
        match self {
            Subject::WorkerHost {
                binary, isolation, ..
            } => Subject::WorkerHost {
                binary: binary.clone(),
                handler: handler.to_owned(),
                isolation: *isolation,
            },
            _ => self.clone(),
        }
    }

    /// The same `worker-host` with another isolation (a Python subject is returned unchanged).
    fn with_isolation(&self, isolation: Isolation) -> Subject {
        match self {
            Subject::WorkerHost {
                binary, handler, ..
            } => Subject::WorkerHost {
                binary: binary.clone(),
                handler: handler.clone(),
                isolation,
            },
            Subject::Python { .. } | Subject::Bridge { .. } | Subject::BareLoop { .. } => {
                self.clone()
            }
        }
    }

    /// The command that starts the worker at `concurrency`, in `dir`, pointed at `base`; `big`
    /// raises `worker-host`'s input and output limits to [`BIG_LIMIT_BYTES`].
    fn command(
        &self,
        base: &str,
        worker: &str,
        concurrency: usize,
        dir: &FsPath,
        big: bool,
    ) -> Command {
        let mut command = match self {
            Subject::WorkerHost { binary, .. }
            | Subject::Bridge { binary, .. }
            | Subject::BareLoop { binary } => Command::new(binary),
            Subject::Python { .. } => Command::new("python3"),
        };
        // The platform's variables only: nothing inherited may change how the worker runs.
        clean_env(&mut command);
        match self {
            Subject::WorkerHost {
                handler, isolation, ..
            } => {
                command
                    .arg("--handler")
                    .arg(handler)
                    .args(isolation.args())
                    .args(["--concurrency", &concurrency.to_string()])
                    .args(["--rp_log_level", "WARN"]);
                if big {
                    let limit = BIG_LIMIT_BYTES.to_string();
                    command
                        .args(["--max-input-bytes", &limit])
                        .args(["--max-output-bytes", &limit]);
                }
            }
            Subject::BareLoop { .. } => {
                command.arg(bare_loop::ARGUMENT);
            }
            Subject::Bridge { bridge, script, .. } => {
                command
                    .arg("--handler")
                    .arg(bridge)
                    .arg("--handler-config")
                    .arg(serde_json::json!({ "script": script }).to_string())
                    .args(["--rp_log_level", "WARN"])
                    // As an environment variable, so the bridge sees the concurrency was given.
                    .env("WORKER_HOST_CONCURRENCY", concurrency.to_string())
                    .env("BENCH_CONCURRENCY", concurrency.to_string());
            }
            Subject::Python { script, .. } => {
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
    mean: Duration,
    p50: Duration,
    p99: Duration,
    takes: u64,
    batch_takes: u64,
    worker_cpu: Option<Duration>,
    stand_in_cpu: Option<Duration>,
    rss_samples: Vec<(usize, u64)>,
    rss_end: Option<u64>,
    hwm_end: Option<u64>,
    /// A Python run's idle memory (see [`Subject::measures_idle_memory`]): after `init`, before
    /// the first job, and once the last result is in.
    idle_before: Option<TreeMemory>,
    idle_after: Option<TreeMemory>,
    /// Outputs that had to be parsed to be checked (see [`output_matches`]).
    parsed_outputs: u64,
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

/// The Python bridge's subject (the release `libpython_bridge.so` beside this binary) and the
/// SDK's, both on `python_async_echo.py`.
fn bridge_subjects() -> Result<(Subject, Subject), String> {
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/bench/python_async_echo.py"
    ));
    let bridge = artefact("libpython_bridge.so")
        .map_err(|error| format!("{error} (cargo build --release -p python-bridge)"))?;
    let binary = artefact("worker-host")?;
    Ok((
        Subject::Bridge {
            binary,
            bridge,
            script: script.clone(),
        },
        Subject::Python {
            script,
            label: "python runpod async",
        },
    ))
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
    /// Starts `subject` at `concurrency`, waits for its first take, queues `jobs` jobs (whose
    /// prompt is `prompt`, or [`SMALL_PROMPT`]), waits for every result (or `timeout`), then stops
    /// the worker: SIGTERM for `worker-host` (which must exit 0), a kill for Python.
    fn run(
        &self,
        subject: &Subject,
        concurrency: usize,
        jobs: usize,
        prompt: Option<&Arc<str>>,
        sample_every: Option<usize>,
        timeout: Duration,
    ) -> RunReport {
        let worker = format!(
            "{}-c{concurrency}-n{jobs}{}",
            subject.tag(),
            if prompt.is_some() { "-big" } else { "" }
        );
        *self.shared.lock() = RunState {
            worker: worker.clone(),
            prompt: prompt.cloned(),
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
            mean: Duration::ZERO,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            takes: 0,
            batch_takes: 0,
            worker_cpu: None,
            stand_in_cpu: None,
            rss_samples: Vec::new(),
            rss_end: None,
            hwm_end: None,
            idle_before: None,
            idle_after: None,
            parsed_outputs: 0,
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
        let mut command = subject.command(
            &self.base,
            &worker,
            concurrency,
            self.dir.path(),
            prompt.is_some(),
        );
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

        let idle = subject.measures_idle_memory() && exited.is_none() && report.problems.is_empty();
        if idle {
            std::thread::sleep(IDLE_SETTLE);
            report.idle_before = Some(tree_memory(pid));
        }
        let mut cpu_start = (HashMap::new(), None);
        let mut queued_at = Instant::now();
        if exited.is_none() && report.problems.is_empty() {
            cpu_start = (tree_cpu_times(pid, self.ticks), cpu_time(None, self.ticks));
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

        // Measured while the worker (and its runner) still runs.
        if !cpu_start.0.is_empty() {
            report.worker_cpu = tree_cpu_delta(&cpu_start.0, &tree_cpu_times(pid, self.ticks));
        }
        report.stand_in_cpu = cpu_time(None, self.ticks)
            .zip(cpu_start.1)
            .and_then(|(end, start)| end.checked_sub(start));
        if idle && exited.is_none() && self.shared.lock().done >= jobs {
            std::thread::sleep(IDLE_SETTLE);
            report.idle_after = Some(tree_memory(pid));
        }
        report.rss_end = vm_kib(pid, "VmRSS");
        report.hwm_end = vm_kib(pid, "VmHWM");

        report.ending = match (exited, subject) {
            (Some(status), _) => {
                report
                    .problems
                    .push(format!("the worker exited early ({status})"));
                format!("early {status}")
            }
            (
                None,
                Subject::WorkerHost { .. } | Subject::Bridge { .. } | Subject::BareLoop { .. },
            ) => {
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
        if !latencies.is_empty() {
            report.mean = latencies.iter().sum::<Duration>()
                / u32::try_from(latencies.len()).unwrap_or(u32::MAX);
        }
        latencies.sort_unstable();
        report.p50 = percentile(&latencies, 50.0);
        report.p99 = percentile(&latencies, 99.0);
        report.takes = state.takes;
        report.batch_takes = state.batch_takes;
        report.parsed_outputs = state.parsed_outputs;
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

/// Wall times of `runs` one-shot runs (`--test_input`), from spawn to exit, after one unmeasured
/// warm-up run. stdout goes to a file (a pipe could be held open by a runner that outlives the
/// host, which would time the pipe rather than the process); it must be [`ONESHOT_OUTPUT`].
fn time_oneshot(subject: &Subject, runs: usize, dir: &FsPath) -> Result<Vec<Duration>, String> {
    let Subject::WorkerHost {
        binary,
        handler,
        isolation,
    } = subject
    else {
        return Err("only worker-host has a one-shot mode here".into());
    };
    let out_path = dir.join(format!("oneshot-{}.out", isolation.name()));
    let err_path = dir.join(format!("oneshot-{}.err", isolation.name()));
    let mut times = Vec::with_capacity(runs);
    for run in 0..=runs {
        let create = |path: &FsPath| {
            std::fs::File::create(path).map_err(|e| format!("cannot create {path:?}: {e}"))
        };
        let mut command = Command::new(binary);
        clean_env(&mut command);
        command
            .arg("--handler")
            .arg(handler)
            .args(["--test_input", ONESHOT_INPUT])
            .args(isolation.args())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(create(&out_path)?)
            .stderr(create(&err_path)?);
        let started = Instant::now();
        let status = command
            .spawn()
            .and_then(|mut child| child.wait())
            .map_err(|e| format!("cannot run it: {e}"))?;
        let elapsed = started.elapsed();
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        if !status.success() || output.trim() != ONESHOT_OUTPUT {
            return Err(format!(
                "run {run} ended with {status} and printed {:?}; its stderr:\n{}",
                output.trim(),
                log_tail(&err_path, 20)
            ));
        }
        if run > 0 {
            times.push(elapsed);
        }
    }
    Ok(times)
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

/// CPU time per job, in milliseconds (for big jobs).
fn per_job_ms(cpu: Option<Duration>, jobs: usize) -> String {
    match cpu {
        Some(cpu) if jobs > 0 => format!("{:.2}", cpu.as_secs_f64() * 1e3 / jobs as f64),
        _ => "-".into(),
    }
}

/// `isolated / in_process`, with whether it meets `target` (`at_least`: the ratio must be at
/// least the target, else at most).
fn verdict(ratio: f64, target: f64, at_least: bool) -> &'static str {
    if !ratio.is_finite() {
        "NOT MEASURED"
    } else if (at_least && ratio >= target) || (!at_least && ratio <= target) {
        "met"
    } else {
        "MISSED"
    }
}

/// The isolated (`worker-host`) and in-process (`worker-host (none)`) reports at `concurrency`.
fn isolation_pair(reports: &[RunReport], concurrency: usize) -> Option<(&RunReport, &RunReport)> {
    let find = |label: &str| {
        reports
            .iter()
            .find(|r| r.label == label && r.concurrency == concurrency)
    };
    Some((find("worker-host")?, find("worker-host (none)")?))
}

/// Each round's isolated / in-process throughput ratio, by concurrency (rounds run the two
/// isolations of one concurrency one after the other).
fn round_ratios(rounds: &[RunReport]) -> Vec<(usize, Vec<f64>)> {
    [1, 8]
        .into_iter()
        .map(|concurrency| {
            let of = |label: &str| -> Vec<f64> {
                rounds
                    .iter()
                    .filter(|r| r.label == label && r.concurrency == concurrency)
                    .map(RunReport::jobs_per_second)
                    .collect()
            };
            let ratios = of("worker-host")
                .iter()
                .zip(of("worker-host (none)"))
                .map(|(isolated, in_process)| isolated / in_process)
                .collect();
            (concurrency, ratios)
        })
        .collect()
}

/// Each concurrency-1 round's `worker-host` / floor and `worker-host (none)` / floor throughput
/// ratios (the floor runs right after the two isolations in each round).
fn floor_ratios(rounds: &[RunReport]) -> (Vec<f64>, Vec<f64>) {
    let of = |label: &str| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.label == label && r.concurrency == 1)
            .map(RunReport::jobs_per_second)
            .collect()
    };
    let floor = of("bare loop (floor)");
    let against = |label: &str| -> Vec<f64> {
        of(label)
            .iter()
            .zip(&floor)
            .map(|(worker, floor)| worker / floor)
            .collect()
    };
    (against("worker-host"), against("worker-host (none)"))
}

/// The floor's ratio line: each round's ratio to the bare loop at concurrency 1, and their
/// medians (target for `--isolation none`: at least 0.80).
fn print_floor_ratios(ratios: &(Vec<f64>, Vec<f64>)) {
    let (isolated, in_process) = ratios;
    if in_process.is_empty() {
        return;
    }
    let each = |ratios: &[f64]| -> String {
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    println!("against the floor (a bare take/post loop, no handler), concurrency 1:");
    println!(
        "  worker-host (none) / floor: median {:.2} ({}) (target >= 0.80: {}); \
         worker-host / floor: median {:.2} ({})",
        median(in_process),
        each(in_process),
        verdict(median(in_process), 0.80, true),
        median(isolated),
        each(isolated),
    );
}

/// The run of median throughput of each worker and concurrency, out of all rounds, carrying
/// the problems of every round.
fn median_rounds(rounds: Vec<RunReport>) -> Vec<RunReport> {
    let mut groups: Vec<Vec<RunReport>> = Vec::new();
    for report in rounds {
        match groups
            .iter_mut()
            .find(|g| g[0].label == report.label && g[0].concurrency == report.concurrency)
        {
            Some(group) => group.push(report),
            None => groups.push(vec![report]),
        }
    }
    groups
        .into_iter()
        .map(|mut group| {
            group.sort_by(|a, b| a.jobs_per_second().total_cmp(&b.jobs_per_second()));
            // A problem in any round fails the bench, not only one in the median run.
            let problems: Vec<String> = group.iter().flat_map(|r| r.problems.clone()).collect();
            let middle = group.len() / 2;
            let mut median = group.swap_remove(middle);
            median.problems = problems;
            median
        })
        .collect()
}

/// The median of some ratios.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The throughput ratio lines, one per concurrency: the median rounds' figures, then every
/// round's ratio and their median, which the target is checked against.
fn print_throughput_ratios(reports: &[RunReport], ratios: &[(usize, Vec<f64>)]) {
    println!();
    println!("isolation cost, throughput (worker-host = --isolation runner, the default; (none) = in-process):");
    for (concurrency, round_ratios) in ratios {
        let Some((isolated, in_process)) = isolation_pair(reports, *concurrency) else {
            continue;
        };
        let ratio = median(round_ratios);
        let each: Vec<String> = round_ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "  concurrency {concurrency}: median ratio {ratio:.2} over {} rounds ({}) (target >= 0.70: {}); \
             median runs {} / {} jobs/s, p50 {} vs {} ms, worker CPU {} vs {} µs/job",
            round_ratios.len(),
            each.join(", "),
            verdict(ratio, 0.70, true),
            rate(isolated.jobs_per_second()),
            rate(in_process.jobs_per_second()),
            millis(isolated.p50),
            millis(in_process.p50),
            per_job(isolated.worker_cpu, isolated.done),
            per_job(in_process.worker_cpu, in_process.done),
        );
    }
}

/// The big-payload table and its ratio line.
fn print_big(reports: &[RunReport], bytes: usize) {
    println!();
    println!(
        "big payload: echo jobs of a {} byte prompt ({:.1} MiB) for the C echo, concurrency 1, \
         --max-input-bytes/--max-output-bytes {}:",
        thousands(bytes as u64),
        bytes as f64 / (1024.0 * 1024.0),
        thousands(BIG_LIMIT_BYTES as u64)
    );
    println!(
        "{:<22} {:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  stop",
        "worker",
        "conc",
        "jobs",
        "wall s",
        "jobs/s",
        "mean ms",
        "p50 ms",
        "p99 ms",
        "wk ms/job",
        "pf ms/job",
    );
    for r in reports {
        let jobs = if r.done == r.jobs {
            thousands(r.jobs as u64)
        } else {
            format!("{}/{}", r.done, r.jobs)
        };
        println!(
            "{:<22} {:>4} {:>6} {:>8.2} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>9}  {}",
            r.label,
            r.concurrency,
            jobs,
            r.elapsed.as_secs_f64(),
            rate(r.jobs_per_second()),
            r.mean.as_secs_f64() * 1e3,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            per_job_ms(r.worker_cpu, r.done),
            per_job_ms(r.stand_in_cpu, r.done),
            r.ending
        );
    }
    let parsed: u64 = reports.iter().map(|r| r.parsed_outputs).sum();
    if parsed > 0 {
        println!(
            "note: {parsed} outputs were not byte-identical to {{\"output\":<input>}} and had to be parsed \
             (slow for big jobs)"
        );
    }
    let floor = reports.iter().find(|r| r.label == "bare loop (floor)");
    if let Some(floor) = floor {
        println!(
            "against the floor, big payload (mean latency; peak RSS is the host process's VmHWM):"
        );
        for r in reports
            .iter()
            .filter(|r| r.label.starts_with("worker-host"))
        {
            let ratio = r.mean.as_secs_f64() / floor.mean.as_secs_f64();
            let hwm = r.hwm_end.map_or(f64::NAN, |kib| kib as f64 * 1024.0);
            let rss_ratio = hwm / bytes as f64;
            println!(
                "  {}: {:.2} / {:.2} ms = {ratio:.2} (target <= 1.3: {}); peak RSS {:.0} MiB = {rss_ratio:.1} x the payload (target <= 4: {})",
                r.label,
                r.mean.as_secs_f64() * 1e3,
                floor.mean.as_secs_f64() * 1e3,
                verdict(ratio, 1.3, false),
                hwm / (1024.0 * 1024.0),
                verdict(rss_ratio, 4.0, false),
            );
        }
    }
    if let Some((isolated, in_process)) = isolation_pair(reports, 1) {
        let mean = isolated.mean.as_secs_f64() / in_process.mean.as_secs_f64();
        let p50 = isolated.p50.as_secs_f64() / in_process.p50.as_secs_f64();
        println!(
            "isolation cost, big payload: mean {:.2} / {:.2} ms = {mean:.2} (target <= 1.5: {}); \
             p50 {:.2} / {:.2} ms = {p50:.2} ({})",
            isolated.mean.as_secs_f64() * 1e3,
            in_process.mean.as_secs_f64() * 1e3,
            verdict(mean, 1.5, false),
            isolated.p50.as_secs_f64() * 1e3,
            in_process.p50.as_secs_f64() * 1e3,
            verdict(p50, 1.5, false),
        );
    }
}

/// The batch runs' peak memory against the batch's size (target: at most 2.5 times).
fn print_batch(reports: &[RunReport]) {
    let batch = (BATCH_JOBS * BATCH_JOB_BYTES) as f64;
    println!();
    println!(
        "batch: {BATCH_JOBS} C echo jobs of a {} byte prompt taken at once (concurrency {BATCH_JOBS}), {:.0} MiB in all; peak RSS is the host process's VmHWM:",
        thousands(BATCH_JOB_BYTES as u64),
        batch / (1024.0 * 1024.0)
    );
    for r in reports {
        let hwm = r.hwm_end.map_or(f64::NAN, |kib| kib as f64 * 1024.0);
        let ratio = hwm / batch;
        println!(
            "  {}: {} jobs in {:.2} s (takes {}, of them batch {}); peak RSS {:.0} MiB = {ratio:.1} x the batch (target <= 2.5: {})",
            r.label,
            r.done,
            r.elapsed.as_secs_f64(),
            r.takes,
            r.batch_takes,
            hwm / (1024.0 * 1024.0),
            verdict(ratio, 2.5, false),
        );
    }
}

/// The one-shot timings: (isolation, wall times or why not).
fn print_oneshot(results: &[(Isolation, Result<Vec<Duration>, String>)]) {
    println!();
    println!(
        "one-shot: worker-host --handler libecho_handler.so --test_input '{ONESHOT_INPUT}', spawn to exit:"
    );
    println!(
        "{:<22} {:>5} {:>8} {:>8} {:>8} {:>8}  target < 20 ms (median, p90)",
        "worker", "runs", "min ms", "p50 ms", "p90 ms", "max ms"
    );
    for (isolation, result) in results {
        let label = match isolation {
            Isolation::Runner => "worker-host",
            Isolation::InProcess => "worker-host (none)",
        };
        match result {
            Ok(times) => {
                let mut sorted = times.clone();
                sorted.sort_unstable();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let target = Duration::from_millis(20);
                let p50 = percentile(&sorted, 50.0);
                let p90 = percentile(&sorted, 90.0);
                println!(
                    "{:<22} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}, {}",
                    label,
                    sorted.len(),
                    ms(sorted.first().copied().unwrap_or_default()),
                    ms(p50),
                    ms(p90),
                    ms(sorted.last().copied().unwrap_or_default()),
                    if p50 < target { "met" } else { "MISSED" },
                    if p90 < target { "met" } else { "MISSED" },
                );
            }
            Err(error) => println!("{label:<22} failed: {error}"),
        }
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

/// The idle memory of the runs that read it: the worker's whole process tree after `init`
/// and after its jobs.
fn print_idle_memory(reports: &[&RunReport]) {
    let measured: Vec<&&RunReport> = reports.iter().filter(|r| r.idle_before.is_some()).collect();
    if measured.is_empty() {
        return;
    }
    println!();
    println!(
        "idle memory of the Python runs, the worker's process tree (worker-host + its runner; the SDK + its heartbeat process):"
    );
    println!(
        "{:<22} {:>4} {:>6} {:>13} {:>13} {:>13} {:>13}  RSS KiB by process, init",
        "worker", "conc", "jobs", "RSS KiB init", "RSS KiB after", "PSS KiB init", "PSS KiB after"
    );
    let kib = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), thousands);
    for r in measured {
        let (before, after) = (r.idle_before.as_ref(), r.idle_after.as_ref());
        let by_process = before.map_or_else(String::new, |m| {
            let each: Vec<String> = m.by_process.iter().map(|&kib| thousands(kib)).collect();
            each.join(" + ")
        });
        println!(
            "{:<22} {:>4} {:>6} {:>13} {:>13} {:>13} {:>13}  {by_process}",
            r.label,
            r.concurrency,
            thousands(r.done as u64),
            kib(before.map(|m| m.rss_kib)),
            kib(after.map(|m| m.rss_kib)),
            kib(before.and_then(|m| m.pss_kib)),
            kib(after.and_then(|m| m.pss_kib)),
        );
    }
    println!(
        "init: {IDLE_SETTLE:?} after the first take (init done, waiting on the long-poll); after: {IDLE_SETTLE:?} after the last result."
    );
    println!(
        "RSS: the processes' VmRSS summed (pages they share count once each); PSS: smaps_rollup's Pss summed (shared pages split)."
    );
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
    if args.first().map(String::as_str) == Some(bare_loop::ARGUMENT) {
        return bare_loop::main();
    }
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
        (Ok(binary), Ok(handler)) => Subject::WorkerHost {
            binary,
            handler,
            isolation: Isolation::Runner,
        },
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
            Ok(Subject::Python {
                script,
                label: "python runpod 1.12.0",
            })
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

    let in_process = worker_host.with_isolation(Isolation::InProcess);
    let floor = match std::env::current_exe() {
        Ok(binary) => Subject::BareLoop { binary },
        Err(error) => {
            eprintln!("queue-bench: cannot find its own executable: {error}");
            return ExitCode::FAILURE;
        }
    };

    // Rounds of (runner, none) pairs, interleaved, so that both isolations see the same noise.
    let mut rounds: Vec<RunReport> = Vec::new();
    for round in 1..=options.rounds {
        for concurrency in [1, 8] {
            let subjects: &[&Subject] = if concurrency == 1 {
                &[&worker_host, &in_process, &floor]
            } else {
                &[&worker_host, &in_process]
            };
            for subject in subjects {
                eprintln!(
                    "queue-bench: round {round}/{}: {}, concurrency {concurrency}, {} jobs...",
                    options.rounds,
                    subject.label(),
                    options.jobs
                );
                rounds.push(bench.run(
                    subject,
                    concurrency,
                    options.jobs,
                    None,
                    None,
                    timeout_for(options.jobs, Duration::from_millis(2)),
                ));
            }
        }
    }
    let ratios = round_ratios(&rounds);
    let floors = floor_ratios(&rounds);
    let mut reports = median_rounds(rounds);
    let mut big_reports = Vec::new();
    // The big-payload and batch runs measure the host with a handler that copies nothing.
    let big_subjects = if options.skip_big {
        None
    } else {
        match artefact("libc_echo_handler.so") {
            Ok(c_echo) => {
                let host = worker_host.with_handler(&c_echo);
                let in_process = host.with_isolation(Isolation::InProcess);
                Some((host, in_process))
            }
            Err(error) => {
                eprintln!("queue-bench: {error} (or pass --skip-big)");
                return ExitCode::FAILURE;
            }
        }
    };
    if let Some((big_host, big_in_process)) = &big_subjects {
        let prompt = big_prompt(options.big_bytes);
        for subject in [big_host, big_in_process, &floor] {
            eprintln!(
                "queue-bench: {}, big payload ({} bytes), concurrency 1, {} jobs...",
                subject.label(),
                options.big_bytes,
                options.big_jobs
            );
            big_reports.push(bench.run(
                subject,
                1,
                options.big_jobs,
                Some(&prompt),
                None,
                timeout_for(options.big_jobs, Duration::from_secs(5)),
            ));
        }
    }
    let mut batch_reports = Vec::new();
    if let Some((big_host, big_in_process)) = &big_subjects {
        let prompt = big_prompt(BATCH_JOB_BYTES);
        for subject in [big_host, big_in_process] {
            eprintln!(
                "queue-bench: {}, a batch of {BATCH_JOBS} jobs of {BATCH_JOB_BYTES} bytes, concurrency {BATCH_JOBS}...",
                subject.label(),
            );
            batch_reports.push(bench.run(
                subject,
                BATCH_JOBS,
                BATCH_JOBS,
                Some(&prompt),
                None,
                timeout_for(BATCH_JOBS, Duration::from_secs(10)),
            ));
        }
    }
    let mut oneshots = Vec::new();
    if !options.skip_oneshot {
        for subject in [&worker_host, &in_process] {
            eprintln!(
                "queue-bench: {}, one-shot, {} runs...",
                subject.label(),
                options.oneshot_runs
            );
            if let Subject::WorkerHost { isolation, .. } = subject {
                oneshots.push((
                    *isolation,
                    time_oneshot(subject, options.oneshot_runs, bench.dir.path()),
                ));
            }
        }
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
    let bridge_note = python
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| bridge_subjects())
        .map(|(bridge, sdk)| {
            for concurrency in [1, 8] {
                eprintln!(
                    "queue-bench: python bridge and python runpod on an async handler.py, concurrency {concurrency}..."
                );
                reports.push(bench.run(
                    &bridge,
                    concurrency,
                    options.bridge_jobs,
                    None,
                    None,
                    timeout_for(options.bridge_jobs, Duration::from_millis(50)),
                ));
                reports.push(bench.run(
                    &sdk,
                    concurrency,
                    options.python_jobs,
                    None,
                    None,
                    timeout_for(options.python_jobs, Duration::from_secs(3)),
                ));
            }
            "bridge (worker-host) and python runpod async: the same async handler.py \
             (bench/python_async_echo.py), concurrency_modifier = the run's concurrency."
                .to_owned()
        })
        .unwrap_or_else(|reason| format!("python bridge: not run: {reason}"));
    let python_note = Some(match python_note {
        Some(note) => format!("{note}\n{bridge_note}"),
        None => bridge_note,
    });
    let soak = (!options.skip_soak).then(|| {
        eprintln!(
            "queue-bench: worker-host memory run, concurrency 8, {} jobs...",
            options.soak_jobs
        );
        bench.run(
            &worker_host,
            8,
            options.soak_jobs,
            None,
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
    print_idle_memory(&table);
    print_throughput_ratios(&reports, &ratios);
    print_floor_ratios(&floors);
    if !big_reports.is_empty() {
        print_big(&big_reports, options.big_bytes);
    }
    if !batch_reports.is_empty() {
        print_batch(&batch_reports);
    }
    if !oneshots.is_empty() {
        print_oneshot(&oneshots);
    }
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
    for (isolation, result) in &oneshots {
        if let Err(error) = result {
            failed = true;
            eprintln!(
                "queue-bench: worker-host one-shot, isolation {}: {error}",
                isolation.name()
            );
        }
    }
    for r in table.into_iter().chain(&big_reports).chain(&batch_reports) {
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
