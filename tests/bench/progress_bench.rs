//! progress-bench: what a progress flood costs. The faulty handler's `progress` mode reports
//! `count` progress values as fast as it can, then returns; each value the worker posted would
//! be one POST (the Python SDK's way: 200,000 values delayed a result by about 10 s). The host
//! coalesces them: while a progress post is in flight, newer values replace older unsent ones.
//!
//! For each isolation (runner, none), in the queue worker (through the recording stand-in
//! platform of the e2e support library) and in the dev API (`/runsync`), the bench runs the same
//! job with `count` 0 and with the flood, and prints how long each took (queue worker: from the
//! take's answer to the result's arrival; dev API: the `/runsync` round trip), what the flood
//! added, and how many progress posts the platform got. Target (issue 10): the flood finishes
//! within about a second of the handler's own time.
//!
//! ```text
//! cargo build --release -p worker-host -p faulty-handler -p e2e
//! cargo run --release -p e2e --bin progress-bench -- [--count N]
//! ```

#[allow(dead_code)] // progress-bench needs the artefacts and the machine's description only
mod common;

use common::{artefact, cpu_model, describe_binary};
use e2e::platform::{Platform, Route};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

fn main() {
    let mut count: u64 = 200_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--count", Some(value)) => count = value.parse().expect("--count takes a number"),
            _ => {
                eprintln!("usage: progress-bench [--count N]");
                std::process::exit(2);
            }
        }
    }
    let binary = artefact("worker-host").unwrap_or_else(|error| fail(&error));
    let handler = artefact("libfaulty_handler.so").unwrap_or_else(|error| {
        fail(&format!(
            "{error} (cargo build --release -p faulty-handler)"
        ))
    });
    println!("progress-bench on {}", cpu_model());
    println!("binary: {}", describe_binary(&binary));
    println!("the faulty handler's progress mode, {count} values\n");
    println!(
        "{:<12} {:<10} {:>12} {:>12} {:>12} {:>15}  target",
        "mode", "isolation", "0 values ms", "flood ms", "added ms", "progress posts"
    );
    for isolation in ["runner", "none"] {
        let quiet = queue_worker(&binary, &handler, isolation, 0);
        let flood = queue_worker(&binary, &handler, isolation, count);
        row("queue worker", isolation, quiet.0, flood.0, Some(flood.1));
        let quiet = dev_api(&binary, &handler, isolation, 0);
        let flood = dev_api(&binary, &handler, isolation, count);
        row("dev API", isolation, quiet, flood, None);
    }
    println!(
        "\nadded: the flood's time less the same job's with no progress values: the handler's \
         own reporting plus what the host adds for it;\nprogress posts: IN_PROGRESS job-done \
         posts the platform got (without coalescing, one per value)."
    );
}

fn fail(message: &str) -> ! {
    eprintln!("progress-bench: {message}");
    std::process::exit(1);
}

fn row(mode: &str, isolation: &str, quiet: Duration, flood: Duration, posts: Option<usize>) {
    let added = flood.saturating_sub(quiet);
    let posts = posts.map_or_else(|| "-".to_owned(), |posts| posts.to_string());
    let verdict = if added <= Duration::from_secs(1) {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "{mode:<12} {isolation:<10} {:>12.1} {:>12.1} {:>12.1} {posts:>15}  within 1 s: {verdict}",
        ms(quiet),
        ms(flood),
        ms(added)
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One progress job through a queue worker: how long from the take's answer to the result, and
/// how many progress posts came.
fn queue_worker(binary: &Path, handler: &Path, isolation: &str, count: u64) -> (Duration, usize) {
    let platform = Platform::start();
    platform.push_job(json!({"id": "flood", "input": {"mode": "progress", "count": count}}));
    let mut command = Command::new(binary);
    command
        .arg("--handler")
        .arg(handler)
        .args(["--isolation", isolation])
        .envs(platform.worker_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let worker = command.spawn().expect("worker-host starts");
    let is_result = |r: &&e2e::platform::Recorded| {
        r.route == Route::Done && r.json()["status"] != "IN_PROGRESS"
    };
    let requests = platform.wait_for(WAIT, "the result", |requests| {
        requests.iter().any(|r| is_result(&r))
    });
    stop(worker);
    // The queue holds the one job, so the first take is answered with it.
    let taken = requests
        .iter()
        .find(|r| matches!(r.route, Route::Take | Route::TakeBatch))
        .and_then(|take| take.answered)
        .expect("the job was taken");
    let result = requests.iter().find(is_result).expect("a result");
    assert_eq!(
        result.json()["output"],
        json!({"reported": count}),
        "the job's result"
    );
    let posts = requests
        .iter()
        .filter(|r| r.route == Route::Done && r.json()["status"] == "IN_PROGRESS")
        .count();
    (result.at.saturating_duration_since(taken), posts)
}

/// One progress job through the dev API's `/runsync`: its round trip.
fn dev_api(binary: &Path, handler: &Path, isolation: &str, count: u64) -> Duration {
    let port = free_port();
    let worker = Command::new(binary)
        .arg("--handler")
        .arg(handler)
        .args(["--isolation", isolation, "--rp_serve_api"])
        .args(["--rp_api_port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker-host starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("an HTTP client");
    let deadline = Instant::now() + WAIT;
    while !client
        .get(format!("{base}/ping"))
        .send()
        .is_ok_and(|answer| answer.status() == 200)
    {
        assert!(Instant::now() < deadline, "the dev API never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let answer: Value = client
        .post(format!("{base}/runsync"))
        .json(&json!({"input": {"mode": "progress", "count": count}}))
        .send()
        .and_then(|answer| answer.json())
        .expect("/runsync answers");
    let took = started.elapsed();
    stop(worker);
    assert_eq!(answer["output"], json!({"reported": count}), "{answer}");
    took
}

/// SIGTERMs a worker-host process and reaps it (killed if it has not exited within 30 s).
fn stop(mut worker: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}
