//! `embed-bench`: a real model through `worker-host`, against the same work with no host; run by
//! hand, not by CI.
//!
//! It measures the embed sample handler (all-MiniLM-L6-v2 on the CPU, see
//! `sample-handlers/embed`) in release builds:
//!
//! - **direct**: `embed-direct` (an example of the embed crate that links it as an `rlib`) loads
//!   the model as `init` does and embeds the bench's batches one after the other, with no host,
//!   no JSON and no process boundary: the handler's own time;
//! - **through the queue worker**: the same batches as jobs (`{"texts": [...]}`) queued on the
//!   stand-in platform (`e2e::platform::Platform`, loopback), drained by `worker-host` (default
//!   runner isolation) at concurrency 1 and 2. Wall time runs from the first job-take's answer to
//!   the last job-done's arrival; the handler's own time inside the host is summed from its
//!   DEBUG line per job (`embedded N texts ... in N µs`), so the host's share of each job is
//!   visible;
//! - **cold start**: from spawning `worker-host` to the platform's first job-take (the worker
//!   takes no job before `init` has returned), against `init`'s own time as the handler logs it.
//!
//! Every result is checked (one 384-dimensional vector per text). Usage:
//!
//! ```text
//! sample-handlers/embed/fetch-model.sh
//! cargo build --release -p worker-host -p embed-handler --example embed-direct
//! cargo run --release -p e2e --bin embed-bench -- [--jobs N] [--batch N]
//! ```

use e2e::platform::{results_by_id, Platform, Route};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "common.rs"]
#[allow(dead_code)] // embed-bench needs the machine's and the binary's description only
mod common;
use common::{cpu_model, describe_binary};

/// Sentences of everyday lengths (6 to 40 tokens); batches cycle through them.
const SENTENCES: &[&str] = &[
    "A man is eating food.",
    "The new movie is awesome and everybody should watch it this weekend.",
    "How do I reset my password if I no longer have access to my email address?",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
    "A cat is sleeping on the sofa.",
    "The train to Berlin leaves platform nine at a quarter past noon, weather permitting.",
    "Please summarise the attached report in three sentences for the board meeting tomorrow.",
    "Worker-host loads the handler once, runs init before the first job, and serves the queue.",
    "I love hiking in the mountains when the air is clear and the trails are empty.",
    "Error 502: the upstream server did not answer in time; retry with exponential backoff.",
    "She plays the violin in an orchestra that tours Europe every summer.",
    "What is the capital of Australia, and why is it not Sydney?",
];

const WAIT: Duration = Duration::from_secs(600);

struct Options {
    jobs: usize,
    batch: usize,
}

fn options() -> Result<Options, String> {
    let mut options = Options { jobs: 40, batch: 8 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .ok_or(format!("{arg} needs a positive number"))
        };
        match arg.as_str() {
            "--jobs" => options.jobs = value(&mut args)?,
            "--batch" => options.batch = value(&mut args)?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

/// The bench's jobs: `jobs` batches of `batch` texts, cycling through [`SENTENCES`].
fn batches(options: &Options) -> Vec<Vec<String>> {
    (0..options.jobs)
        .map(|job| {
            (0..options.batch)
                .map(|n| SENTENCES[(job * options.batch + n) % SENTENCES.len()].to_owned())
                .collect()
        })
        .collect()
}

/// What one measured run found.
struct Report {
    what: String,
    concurrency: usize,
    wall: Duration,
    /// The handler's own time, summed over the jobs.
    handler: Duration,
    /// Process start to the first job taken (queue runs only).
    cold_start: Option<Duration>,
    /// `init`'s own time.
    init: Duration,
}

/// The number after `key` in `text` (`key` included, e.g. `"in "`), up to the first non-digit.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn run_direct(direct: &Path, model_dir: &Path, batches: &[Vec<String>]) -> Result<Report, String> {
    let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(file.path(), serde_json::to_vec(batches).unwrap()).map_err(|e| e.to_string())?;
    let output = Command::new(direct)
        .arg(model_dir)
        .arg(file.path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} cannot be started: {e}", direct.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "embed-direct failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|line| number_after(line, key))
            .map(Duration::from_micros)
            .ok_or(format!("embed-direct printed no {key}: {stdout}"))
    };
    let total = field("total_us=")?;
    Ok(Report {
        what: "direct (embed-direct, no host)".into(),
        concurrency: 1,
        wall: total,
        handler: total,
        cold_start: None,
        init: field("init_us=")?,
    })
}

fn run_queue(
    worker_host: &Path,
    library: &Path,
    model_dir: &Path,
    batches: &[Vec<String>],
    concurrency: usize,
) -> Result<Report, String> {
    let platform = Platform::start();
    for (n, batch) in batches.iter().enumerate() {
        platform.push_job(json!({"id": format!("job-{n}"), "input": {"texts": batch}}));
    }
    let stderr = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let mut command = Command::new(worker_host);
    command.env_clear();
    for name in ["PATH", "HOME", "LANG"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
        .arg("--handler")
        .arg(library)
        .arg("--handler-config")
        .arg(json!({ "model_dir": model_dir }).to_string())
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--rp_log_level", "DEBUG", "--log-format", "text"])
        .envs(platform.worker_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().map_err(|e| e.to_string())?);
    let spawned = Instant::now();
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    let requests = platform.wait_for(WAIT, "every embedding job's result", |r| {
        results_by_id(r).len() >= batches.len()
    });
    e2e::send_sigterm(child.id());
    let _ = child.wait();
    let log = std::fs::read_to_string(stderr.path()).unwrap_or_default();

    let by_id = results_by_id(&requests);
    for (n, batch) in batches.iter().enumerate() {
        let body = &by_id[&format!("job-{n}")];
        let vectors = body["output"]["embeddings"].as_array();
        let good = vectors.is_some_and(|v| {
            v.len() == batch.len()
                && v.iter()
                    .all(|e| e.as_array().is_some_and(|e| e.len() == 384))
        });
        if !good {
            return Err(format!("job-{n} got {}", abbreviate(body)));
        }
    }
    let first_take = requests
        .iter()
        .find(|r| matches!(r.route, Route::Take | Route::TakeBatch))
        .ok_or("no job-take")?;
    // The jobs were queued before the worker started, so its first take is answered with one.
    let first_answer = first_take
        .answered
        .ok_or("the first job-take was not answered")?;
    let last_done = requests
        .iter()
        .filter(|r| r.route == Route::Done)
        .map(|r| r.at)
        .max()
        .ok_or("no job-done")?;
    let handler = log
        .lines()
        .filter(|line| line.contains("embedded ") && line.contains(" µs"))
        .filter_map(|line| number_after(line, "padded) in "))
        .map(Duration::from_micros)
        .sum();
    let init = log
        .lines()
        .find(|line| line.contains("embed: loaded all-MiniLM-L6-v2"))
        .and_then(|line| number_after(line, " in "))
        .map(Duration::from_millis)
        .ok_or("the handler logged no init line")?;
    Ok(Report {
        what: "worker-host queue worker".into(),
        concurrency,
        wall: last_done.saturating_duration_since(first_answer),
        handler,
        cold_start: Some(first_take.at.saturating_duration_since(spawned)),
        init,
    })
}

fn abbreviate(value: &Value) -> String {
    let text = value.to_string();
    text.chars().take(300).collect()
}

fn main() -> ExitCode {
    if cfg!(debug_assertions) {
        eprintln!("embed-bench: warning: this is a debug build; run it with `cargo run --release`");
    }
    let options = match options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("embed-bench: {error}");
            return ExitCode::from(2);
        }
    };
    let exe = std::env::current_exe().expect("this executable's path");
    let release = exe.parent().expect("target/release").to_owned();
    let worker_host = release.join("worker-host");
    let library = release.join("libembed_handler.so");
    let direct = release.join("examples/embed-direct");
    let model_dir: PathBuf = release
        .parent()
        .expect("target/")
        .join("models/all-MiniLM-L6-v2");
    for (path, fix) in [
        (
            &worker_host,
            "cargo build --release -p worker-host -p embed-handler --example embed-direct",
        ),
        (
            &library,
            "cargo build --release -p worker-host -p embed-handler --example embed-direct",
        ),
        (
            &direct,
            "cargo build --release -p worker-host -p embed-handler --example embed-direct",
        ),
        (
            &model_dir.join("model.safetensors"),
            "sample-handlers/embed/fetch-model.sh",
        ),
    ] {
        if !path.exists() {
            eprintln!("embed-bench: {} is missing: run `{fix}`", path.display());
            return ExitCode::FAILURE;
        }
    }
    let batches = batches(&options);
    let texts = options.jobs * options.batch;
    println!(
        "embed-bench on {} ({} cores)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("binary: {}", describe_binary(&worker_host));
    println!(
        "{} jobs of {} texts each ({texts} texts, {} distinct sentences of 6 to 40 tokens), all-MiniLM-L6-v2 on the CPU\n",
        options.jobs,
        options.batch,
        SENTENCES.len()
    );

    let mut reports = Vec::new();
    let runs: [&dyn Fn() -> Result<Report, String>; 3] = [
        &|| run_direct(&direct, &model_dir, &batches),
        &|| run_queue(&worker_host, &library, &model_dir, &batches, 1),
        &|| run_queue(&worker_host, &library, &model_dir, &batches, 2),
    ];
    for run in runs {
        match run() {
            Ok(report) => reports.push(report),
            Err(error) => {
                eprintln!("embed-bench: {error}");
                return ExitCode::FAILURE;
            }
        }
    }

    println!("| what | conc | wall s | embeddings/s | ms/job | handler ms/job | host ms/job | host share |");
    println!("|---|---|---|---|---|---|---|---|");
    let jobs = options.jobs as f64;
    for report in &reports {
        let wall = report.wall.as_secs_f64();
        let handler = report.handler.as_secs_f64();
        // At concurrency 2 jobs overlap: the host's share is the wall time per job beyond what
        // the handler's own time accounts for at that concurrency.
        let per_job = wall / jobs * report.concurrency as f64;
        let handler_per_job = handler / jobs;
        let host = per_job - handler_per_job;
        println!(
            "| {} | {} | {wall:.2} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1}% |",
            report.what,
            report.concurrency,
            texts as f64 / wall,
            per_job * 1e3,
            handler_per_job * 1e3,
            host * 1e3,
            host / per_job * 100.0,
        );
    }
    println!(
        "\ncold start (queue worker): process start to the first job-take, against init's own time"
    );
    println!("| conc | process start to first take ms | init ms (handler's log) | the rest ms |");
    println!("|---|---|---|---|");
    for report in reports.iter().filter(|r| r.cold_start.is_some()) {
        let cold = report.cold_start.unwrap_or_default();
        println!(
            "| {} | {} | {} | {} |",
            report.concurrency,
            cold.as_millis(),
            report.init.as_millis(),
            cold.saturating_sub(report.init).as_millis()
        );
    }
    let direct = &reports[0];
    println!(
        "(direct: the model loads in {} ms with no host)",
        direct.init.as_millis()
    );
    ExitCode::SUCCESS
}
