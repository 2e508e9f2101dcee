//! `dev-api-bench`: what the local dev API adds to a job, measured through real HTTP on loopback;
//! run by hand, not by CI.
//!
//! It starts `worker-host --rp_serve_api` (release build, echo handler, `--rp_log_level WARN`)
//! and sends requests one at a time on one keep-alive connection, as a client app would:
//!
//! - `GET /health`: the HTTP round trip alone (client, loopback, server), no job;
//! - `POST /runsync` of a small echo job: the whole job path (queue, the worker's take over the
//!   private loopback port, the handler, the job-done POST, the answer). The echo handler's own
//!   time is about a microsecond, so the round trip *is* what the dev API adds, and the
//!   difference from `/health` is what the job path adds on top of plain HTTP;
//! - `POST /runsync` from 8 client threads against `--concurrency 8`: jobs per second;
//! - a memory run: 300,000 `/runsync` jobs from 8 clients, with the host's VmRSS sampled along
//!   the way, to show it levels off (finished results are kept for a bounded time and number).
//!
//! When the official Python SDK is installed (`pip install runpod==1.12.0`), its own dev API
//! (`python_echo.py --rp_serve_api`) is measured too, for comparison.
//! Every answer is checked (COMPLETED, output equal to input); the bench exits 1 when one is not.
//!
//! ```text
//! cargo build --release -p worker-host -p echo-handler
//! cargo run --release -p e2e --bin dev-api-bench -- [--requests N] [--python-requests N]
//!     [--soak-jobs N] [--skip-python]
//! ```

use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;
use common::{artefact, cpu_model, describe_binary, python_runpod, vm_kib};

/// How long a server may take to answer its first request.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests sent before measuring (connection set-up, allocator and cache warm-up).
const WARM_UP: usize = 200;
/// Client threads (and worker concurrency) of the throughput run.
const PARALLEL: usize = 8;

const USAGE: &str = "\
usage: dev-api-bench [--requests N] [--python-requests N] [--soak-jobs N] [--skip-python]

  --requests N          measured requests per worker-host run (default 5000)
  --python-requests N   measured /runsync requests against the SDK's dev API (default 500)
  --soak-jobs N         /runsync jobs in the memory run, 8 clients (default 300000; 0 skips it)
  --skip-python         do not run the official SDK's dev API";

/// How many VmRSS samples the memory run takes.
const SOAK_SAMPLES: usize = 6;

/// The memory run's samples: (jobs done so far, the host's VmRSS in KiB).
type MemorySamples = Vec<(usize, u64)>;

struct Options {
    requests: usize,
    python_requests: usize,
    soak_jobs: usize,
    skip_python: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Self {
            requests: 5000,
            python_requests: 500,
            soak_jobs: 300_000,
            skip_python: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = || -> Result<usize, String> {
                args.next()
                    .and_then(|value| value.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{arg} needs a positive number"))
            };
            match arg.as_str() {
                "--requests" => options.requests = number()?,
                "--python-requests" => options.python_requests = number()?,
                "--soak-jobs" => {
                    options.soak_jobs = args
                        .next()
                        .and_then(|value| value.parse().ok())
                        .ok_or("--soak-jobs needs a number")?;
                }
                "--skip-python" => options.skip_python = true,
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(options)
    }
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    /// Kills the server's whole process group: the Python SDK forks a heartbeat process.
    fn drop(&mut self) {
        e2e::kill_process_group(&mut self.child);
    }
}

/// A free loopback port (bound, read, released; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a loopback port can be bound")
}

/// Starts `command` (which serves on `port`) and waits until `probe` answers at all.
fn start(mut command: Command, port: u16, probe: &str) -> Result<Server, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while Instant::now() < deadline {
        let answer = client
            .post(format!("{}{probe}", server.base))
            .json(&json!({"input": {"probe": true}}))
            .send();
        if answer.is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the server did not answer within {STARTUP_TIMEOUT:?}"
    ))
}

/// Sends one request and checks the answer; returns how long it took.
fn timed(
    client: &reqwest::blocking::Client,
    request: &Request,
    n: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let answer = match request {
        Request::Health(url) => client.get(url).send(),
        Request::RunSync(url) => client.post(url).json(&job_input(n)).send(),
    }
    .map_err(|e| format!("request failed: {e}"))?;
    let status = answer.status();
    let body: Value = answer
        .json()
        .map_err(|e| format!("the answer is not JSON: {e}"))?;
    let elapsed = started.elapsed();
    if !status.is_success() {
        return Err(format!("HTTP {status}: {body}"));
    }
    if let Request::RunSync(_) = request {
        if body["status"] != "COMPLETED" || body["output"] != job_input(n)["input"] {
            return Err(format!("wrong answer for job {n}: {body}"));
        }
    }
    Ok(elapsed)
}

enum Request {
    Health(String),
    RunSync(String),
}

fn job_input(n: usize) -> Value {
    json!({"input": {"prompt": "hello", "n": n}})
}

/// Sequential requests on one connection: sorted latencies.
fn sequential(request: &Request, count: usize) -> Result<Vec<Duration>, String> {
    let client = reqwest::blocking::Client::new();
    for n in 0..WARM_UP {
        timed(&client, request, n)?;
    }
    let mut latencies = (0..count)
        .map(|n| timed(&client, request, n))
        .collect::<Result<Vec<_>, _>>()?;
    latencies.sort();
    Ok(latencies)
}

/// `PARALLEL` client threads sending `count` /runsync requests in all: jobs per second.
fn parallel(url: &str, count: usize) -> Result<f64, String> {
    let per_thread = count.div_ceil(PARALLEL);
    let started = Instant::now();
    let threads: Vec<_> = (0..PARALLEL)
        .map(|thread| {
            let request = Request::RunSync(url.to_owned());
            std::thread::spawn(move || -> Result<(), String> {
                let client = reqwest::blocking::Client::new();
                for n in 0..per_thread {
                    timed(&client, &request, thread * per_thread + n)?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "a client thread panicked")??;
    }
    Ok((per_thread * PARALLEL) as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn micros(duration: Duration) -> String {
    format!("{} µs", duration.as_micros())
}

struct Row {
    what: String,
    latencies: Vec<Duration>,
    /// /runsync jobs per second from [`PARALLEL`] client threads, for the /runsync rows.
    throughput: Option<f64>,
}

/// The memory run: `jobs` /runsync jobs from [`PARALLEL`] clients, the host's VmRSS sampled
/// [`SOAK_SAMPLES`] times along the way, as (jobs done so far, KiB).
fn soak(server: &Server, url: &str, jobs: usize) -> Result<MemorySamples, String> {
    let mut samples = Vec::new();
    if jobs == 0 {
        return Ok(samples);
    }
    let step = jobs.div_ceil(SOAK_SAMPLES);
    let mut done = 0;
    while done < jobs {
        parallel(url, step)?;
        done += step.div_ceil(PARALLEL) * PARALLEL;
        let rss = vm_kib(server.child.id(), "VmRSS").ok_or("cannot read the host's VmRSS")?;
        samples.push((done, rss));
    }
    Ok(samples)
}

/// The worker-host rows, and the memory run's samples.
fn worker_host_rows(
    binary: &PathBuf,
    handler: &PathBuf,
    options: &Options,
) -> Result<(Vec<Row>, MemorySamples), String> {
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .arg("--handler")
        .arg(handler)
        .args(["--rp_serve_api", "--rp_log_level", "WARN", "--rp_api_port"])
        .arg(port.to_string())
        .args(["--concurrency", &PARALLEL.to_string()]);
    let server = start(command, port, "/runsync")?;
    let health = sequential(
        &Request::Health(format!("{}/v2/bench/health", server.base)),
        options.requests,
    )?;
    let runsync_url = format!("{}/v2/bench/runsync", server.base);
    let runsync = sequential(&Request::RunSync(runsync_url.clone()), options.requests)?;
    let throughput = parallel(&runsync_url, options.requests)?;
    let memory = soak(&server, &runsync_url, options.soak_jobs)?;
    Ok((
        vec![
            Row {
                what: "worker-host GET /health (HTTP alone)".into(),
                latencies: health,
                throughput: None,
            },
            Row {
                what: "worker-host POST /runsync (echo job)".into(),
                latencies: runsync,
                throughput: Some(throughput),
            },
        ],
        memory,
    ))
}

fn python_row(options: &Options) -> Result<Row, String> {
    let version = python_runpod()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/python_echo.py");
    let port = free_port();
    let mut command = Command::new("python3");
    command
        .arg(script)
        .args(["--rp_serve_api", "--rp_api_port"])
        .arg(port.to_string());
    let server = start(command, port, "/runsync")?;
    let url = format!("{}/runsync", server.base);
    let latencies = sequential(&Request::RunSync(url.clone()), options.python_requests)?;
    let throughput = parallel(&url, options.python_requests)?;
    Ok(Row {
        what: format!("runpod {version} --rp_serve_api POST /runsync"),
        latencies,
        throughput: Some(throughput),
    })
}

fn run(options: &Options) -> Result<(), String> {
    let binary = artefact("worker-host")?;
    let handler = artefact("libecho_handler.so")?;
    println!("dev-api-bench on {}", cpu_model());
    println!("binary: {}", describe_binary(&binary));
    println!(
        "{} measured requests per worker-host row ({WARM_UP} warm-up), one keep-alive connection\n",
        options.requests
    );
    let (mut rows, memory) = worker_host_rows(&binary, &handler, options)?;
    let mut python_note = None;
    if !options.skip_python {
        match python_row(options) {
            Ok(row) => rows.push(row),
            Err(reason) => python_note = Some(reason),
        }
    }
    println!("| what | p50 | p99 | max | jobs/s, {PARALLEL} clients |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.what,
            micros(percentile(&row.latencies, 0.50)),
            micros(percentile(&row.latencies, 0.99)),
            micros(*row.latencies.last().expect("rows are not empty")),
            row.throughput
                .map_or_else(|| "-".to_owned(), |rate| format!("{rate:.0}")),
        );
    }
    let health = percentile(&rows[0].latencies, 0.50);
    let runsync = percentile(&rows[1].latencies, 0.50);
    println!(
        "\n/runsync of the echo handler adds {} at p50 (round trip; the handler's own time is about \
         1 µs), {} more than a plain HTTP round trip to the same server.",
        micros(runsync),
        micros(runsync.saturating_sub(health)),
    );
    println!(
        "(jobs/s: {PARALLEL} client threads at once; worker-host runs with --concurrency {PARALLEL})"
    );
    if !memory.is_empty() {
        let line: Vec<String> = memory
            .iter()
            .map(|(jobs, kib)| format!("{jobs} jobs: {} MiB", kib / 1024))
            .collect();
        println!(
            "\nworker-host memory (VmRSS), /runsync from {PARALLEL} clients: {}",
            line.join(", ")
        );
        println!(
            "(finished results are kept 1 minute for /runsync and at most 100,000 at once, so the \
             memory levels off)"
        );
    }
    if let Some(reason) = python_note {
        println!("(the Python SDK's dev API was not measured: {reason})");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dev-api-bench failed: {message}");
            ExitCode::FAILURE
        }
    }
}
