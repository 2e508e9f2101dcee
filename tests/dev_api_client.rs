//! The official RunPod client (runpod-python 1.12.0) against the local dev API: for each scenario
//! of `tests/python/dev_api_client.py`, `worker-host --rp_serve_api` runs a sample handler on a
//! free port, the script drives it with `RUNPOD_ENDPOINT_BASE_URL=<base>/v2` through the
//! client's public API only (`runpod.Endpoint`, `Job`, the asyncio `Endpoint`), and prints what it
//! observed as one JSON line, which is checked here.
//!
//! What is checked is what a user of the client sees: `run_sync` and `Job.output` return the
//! handler's output; `Job.status` goes IN_QUEUE/IN_PROGRESS → COMPLETED; `Job.stream` yields the
//! chunks in order, the first while the job is still running; `Job.cancel` stops a running or
//! queued job, which then stays CANCELLED and frees the worker; `health` counts jobs;
//! `purge_queue` drops the queued jobs (whose status then raises 404); a handler error or panic
//! is a FAILED job whose `error` says why; the asyncio client does the same, concurrently too; a
//! wrong API key is refused with 401. Only ordering facts are asserted, never durations.
//!
//! The tests need `python3` with `runpod==1.12.0`: without it they fail saying what to install
//! (`WORKER_HOST_TESTS_ALLOW_SKIPS=1` skips them instead, outside CI).

use e2e::dev_api::DevApi;
use e2e::{Run, Sample};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a scenario script may run before it is killed: importing the client takes a second
/// or two and every scenario finishes well under 10 s.
const SCRIPT_WAIT: Duration = Duration::from_secs(60);

/// The key the client sends when the dev API was started without `--api-key` (any will do).
const NO_KEY: &str = "unused-local-key";

/// Runs `tests/python/dev_api_client.py <scenario>` against `host` with `key` as the client's
/// API key, to its end. Kills it and panics, showing both sides' stderr, if it runs past
/// [`SCRIPT_WAIT`].
fn run_script(host: &DevApi, scenario: &str, key: &str) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dev_api_client.py");
    let stdout = tempfile::NamedTempFile::new().expect("a temporary file");
    let stderr = tempfile::NamedTempFile::new().expect("a temporary file");
    let mut command = Command::new("python3");
    command.arg(script).arg(scenario);
    // The machine's environment (python3 may need its PYENV_*/VIRTUAL_ENV/PYTHONPATH), less
    // anything that could point the client elsewhere.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RUNPOD_") {
            command.env_remove(name);
        }
    }
    command
        .env(
            "RUNPOD_ENDPOINT_BASE_URL",
            format!("{}/v2", host.base_url()),
        )
        .env("DEV_API_KEY", key)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(stdout.reopen().expect("the temporary file reopens"))
        .stderr(stderr.reopen().expect("the temporary file reopens"));
    let mut child = command.spawn().expect("python3 could not be started");
    let read =
        |file: &tempfile::NamedTempFile| std::fs::read_to_string(file.path()).unwrap_or_default();
    let deadline = Instant::now() + SCRIPT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("the script can be waited for") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scenario {scenario} did not finish in {SCRIPT_WAIT:?}\nthe script's stdout:\n{}\nthe script's stderr:\n{}\nworker-host's stderr:\n{}",
                read(&stdout),
                read(&stderr),
                host.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: read(&stdout),
        stderr: read(&stderr),
    }
}

/// Starts the dev API on `sample` with `args`, runs `scenario` against it with `key`, and hands
/// the one JSON line the script printed to `check`. When the script fails or `check` panics,
/// shows the script's output and worker-host's stderr too. Returns at once, doing nothing, when
/// the client is not installed (see [`e2e::python_sdk_available`]).
fn scenario(scenario: &str, sample: Sample, args: &[&str], key: &str, check: impl FnOnce(&Value)) {
    if !e2e::python_sdk_available("the official client's dev API test") {
        return;
    }
    let host = DevApi::start(sample, args);
    let script = run_script(&host, scenario, key);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(
            script.code,
            Some(0),
            "scenario {scenario}: the script failed"
        );
        let lines = script.json_lines();
        assert_eq!(
            lines.len(),
            1,
            "scenario {scenario}: the script must print one JSON line, printed {lines:?}"
        );
        check(&lines[0]);
    }));
    if let Err(panic) = outcome {
        eprintln!(
            "scenario {scenario}\nthe script's stdout:\n{}\nthe script's stderr:\n{}\nworker-host's stderr:\n{}",
            script.stdout,
            script.stderr,
            host.stderr()
        );
        std::panic::resume_unwind(panic);
    }
}

/// The `status` of a status object (or of a cancel answer).
fn status(object: &Value) -> &str {
    object["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in {object}"))
}

/// The keys of a JSON object, sorted.
fn keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {object}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// `run_sync` returns the handler's output: the echoed input.
#[test]
fn run_sync_returns_the_output() {
    scenario("run_sync", Sample::Echo, &[], NO_KEY, |observed| {
        assert_eq!(observed["output"], json!({"prompt": "hi"}), "{observed}");
    });
}

/// `run`, then `status` (not final yet, or already done), `output` (the echoed input) and
/// `status` again (COMPLETED); the status object has the output and the job's id.
#[test]
fn run_then_status_and_output() {
    scenario("run_status_output", Sample::Echo, &[], NO_KEY, |observed| {
        let first = observed["first_status"].as_str().unwrap_or_default();
        assert!(
            ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].contains(&first),
            "the first status: {observed}"
        );
        assert_eq!(observed["output"], json!({"prompt": "hi"}), "{observed}");
        assert_eq!(observed["final_status"], "COMPLETED", "{observed}");
        let raw = &observed["raw"];
        assert_eq!(raw["id"], observed["id"], "{observed}");
        assert_eq!(status(raw), "COMPLETED", "{observed}");
        assert_eq!(raw["output"], json!({"prompt": "hi"}), "{observed}");
    });
}

/// `Job.stream()` yields every chunk once, in order, the first while the job is still running
/// (chunks are delivered as they come, not at the end); once the job is seen COMPLETED it stays
/// so, and the generator ends.
#[test]
fn stream_yields_chunks_while_running() {
    scenario("stream", Sample::Stream, &[], NO_KEY, |observed| {
        let seen = observed["chunks"]
            .as_array()
            .unwrap_or_else(|| panic!("no chunks: {observed}"));
        let chunks: Vec<&Value> = seen.iter().map(|c| &c["chunk"]).collect();
        assert_eq!(
            chunks,
            [&json!("a"), &json!("b"), &json!("c"), &json!("d")],
            "{observed}"
        );
        let statuses: Vec<&str> = seen.iter().map(status).collect();
        assert_eq!(
            statuses[0], "IN_PROGRESS",
            "the first chunk must be yielded while the job runs: {observed}"
        );
        let done = statuses.iter().position(|s| *s != "IN_PROGRESS");
        assert!(
            done.is_none_or(|done| statuses[done..].iter().all(|s| *s == "COMPLETED")),
            "IN_PROGRESS then COMPLETED, nothing else: {observed}"
        );
        assert_eq!(observed["final_status"], "COMPLETED", "{observed}");
    });
}

/// `Job.cancel()` on a running job answers CANCELLED; the job stays CANCELLED (the stopped
/// handler's late result does not change it, nor count as failed) and the only worker slot is
/// free for the next job.
#[test]
fn cancel_stops_a_running_job() {
    let args = ["--concurrency", "1"];
    scenario("cancel", Sample::Faulty, &args, NO_KEY, |observed| {
        assert_eq!(status(&observed["running"]), "IN_PROGRESS", "{observed}");
        assert_eq!(
            observed["cancel"],
            json!({"id": observed["id"], "status": "CANCELLED"}),
            "the cancel answer: {observed}"
        );
        assert_eq!(observed["status_after_cancel"], "CANCELLED", "{observed}");
        assert_eq!(
            observed["next_output"],
            json!({"mode": "echo", "x": 1}),
            "the next job's output: {observed}"
        );
        let later = &observed["raw_later"];
        assert_eq!(status(later), "CANCELLED", "{observed}");
        assert!(
            later.get("output").is_none() && later.get("error").is_none(),
            "a cancelled job has neither output nor error: {observed}"
        );
        let jobs = &observed["health"]["jobs"];
        assert_eq!(
            (&jobs["completed"], &jobs["failed"]),
            (&json!(1), &json!(0)),
            "one job completed, the cancelled one is not failed: {observed}"
        );
    });
}

/// A queued job cancelled behind a running one is CANCELLED without ever starting (no
/// `workerId`, no `delayTime`); the running one is still running until cancelled in turn, and
/// the worker then takes the next job.
#[test]
fn cancel_a_queued_job() {
    let args = ["--concurrency", "1"];
    scenario("cancel_queued", Sample::Faulty, &args, NO_KEY, |observed| {
        assert_eq!(observed["second_status_before"], "IN_QUEUE", "{observed}");
        assert_eq!(
            observed["cancel_second"],
            json!({"id": observed["second"], "status": "CANCELLED"}),
            "{observed}"
        );
        assert_eq!(
            observed["first_status_after_second_cancelled"], "IN_PROGRESS",
            "{observed}"
        );
        assert_eq!(
            observed["cancel_first"],
            json!({"id": observed["first"], "status": "CANCELLED"}),
            "{observed}"
        );
        assert_eq!(
            observed["next_output"],
            json!({"mode": "echo", "x": 2}),
            "{observed}"
        );
        assert_eq!(status(&observed["raw_first"]), "CANCELLED", "{observed}");
        let second = &observed["raw_second"];
        assert_eq!(status(second), "CANCELLED", "{observed}");
        assert!(
            second.get("workerId").is_none() && second.get("delayTime").is_none(),
            "the cancelled queued job never started: {observed}"
        );
    });
}

/// `health()` after two `run_sync` calls: both counted completed, nothing running or queued,
/// the worker idle; and exactly the documented keys (the platform's, and which handler serves).
#[test]
fn health_counts_jobs() {
    scenario("health", Sample::Echo, &[], NO_KEY, |observed| {
        assert_eq!(
            observed["outputs"],
            json!([{"n": 0}, {"n": 1}]),
            "{observed}"
        );
        let health = &observed["health"];
        assert_eq!(keys(health), ["handler", "jobs", "workers"], "{observed}");
        assert_eq!(health["handler"]["name"], "echo-handler", "{observed}");
        assert_eq!(
            keys(&health["jobs"]),
            ["completed", "failed", "inProgress", "inQueue", "retried"],
            "{observed}"
        );
        assert_eq!(keys(&health["workers"]), ["idle", "running"], "{observed}");
        let completed = health["jobs"]["completed"].as_u64().unwrap_or_default();
        assert!(completed >= 2, "two jobs completed: {observed}");
        assert_eq!(
            (
                &health["jobs"]["inProgress"],
                &health["jobs"]["inQueue"],
                &health["jobs"]["failed"]
            ),
            (&json!(0), &json!(0), &json!(0)),
            "{observed}"
        );
        assert_eq!(
            health["workers"],
            json!({"idle": 1, "running": 0}),
            "{observed}"
        );
    });
}

/// `purge_queue()` drops the three jobs queued behind a running one, and only them: a purged
/// job's status then raises the client's HTTPError with 404, and the running job runs on until
/// cancelled.
#[test]
fn purge_queue_drops_queued_jobs() {
    let args = ["--concurrency", "1"];
    scenario("purge_queue", Sample::Faulty, &args, NO_KEY, |observed| {
        assert_eq!(
            observed["queued_statuses"],
            json!(["IN_QUEUE", "IN_QUEUE", "IN_QUEUE"]),
            "{observed}"
        );
        let before = &observed["health_before"];
        assert_eq!(
            (&before["jobs"]["inQueue"], &before["jobs"]["inProgress"]),
            (&json!(3), &json!(1)),
            "{observed}"
        );
        assert_eq!(
            before["workers"],
            json!({"idle": 0, "running": 1}),
            "{observed}"
        );
        assert_eq!(
            observed["purge"],
            json!({"removed": 3, "status": "completed"}),
            "{observed}"
        );
        let purged = &observed["purged_status"];
        assert_eq!(
            (&purged["raised"], &purged["status_code"]),
            (&json!("HTTPError"), &json!(404)),
            "a purged job's status: {observed}"
        );
        let body: Value = serde_json::from_str(purged["body"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the 404 body is not JSON ({e}): {observed}"));
        assert!(body["error"].is_string(), "the 404 body: {observed}");
        let after = &observed["health_after"];
        assert_eq!(
            (&after["jobs"]["inQueue"], &after["jobs"]["inProgress"]),
            (&json!(0), &json!(1)),
            "{observed}"
        );
        assert_eq!(observed["running_status"], "IN_PROGRESS", "{observed}");
        assert_eq!(
            status(&observed["cancel_running"]),
            "CANCELLED",
            "{observed}"
        );
    });
}

/// A handler error and a handler panic: `run_sync` and `Job.output` return None, the job is
/// FAILED, and its `error` is the SDK's error JSON text saying why.
#[test]
fn failing_jobs_are_failed() {
    scenario("failing", Sample::Faulty, &[], NO_KEY, |observed| {
        for (case, error_type, message) in [
            ("error", "ValueError", "bad input"),
            ("panic", "Panic", "boom"),
        ] {
            let seen = &observed[case];
            assert_eq!(seen["run_sync_output"], Value::Null, "{case}: {observed}");
            assert_eq!(seen["output"], Value::Null, "{case}: {observed}");
            assert_eq!(seen["status"], "FAILED", "{case}: {observed}");
            let raw = &seen["raw"];
            assert_eq!(status(raw), "FAILED", "{case}: {observed}");
            let error = raw["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{case}: `error` must be a string: {observed}"));
            assert!(error.contains(message), "{case}: {observed}");
            let payload: Value = serde_json::from_str(error)
                .unwrap_or_else(|e| panic!("{case}: `error` is not JSON text ({e}): {observed}"));
            if case == "error" {
                assert_eq!(
                    (&payload["error_type"], &payload["error_message"]),
                    (&json!(error_type), &json!(message)),
                    "{case}: {observed}"
                );
            }
        }
    });
}

/// The asyncio client: run, status, output, stream (a non-streaming job's output as one
/// chunk), cancel of a finished job (left as it was), concurrent runs each getting its own
/// output, health and purge_queue.
#[test]
fn asyncio_client() {
    scenario("asyncio", Sample::Echo, &[], NO_KEY, |observed| {
        let first = observed["first_status"].as_str().unwrap_or_default();
        assert!(
            ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].contains(&first),
            "the first status: {observed}"
        );
        assert_eq!(observed["output"], json!({"prompt": "async"}), "{observed}");
        assert_eq!(observed["final_status"], "COMPLETED", "{observed}");
        assert_eq!(
            observed["streamed"],
            json!([{"prompt": "streamed"}]),
            "{observed}"
        );
        assert_eq!(
            observed["cancel_finished"],
            json!({"id": observed["streamed_id"], "status": "COMPLETED"}),
            "{observed}"
        );
        assert_eq!(
            observed["outputs"], observed["inputs"],
            "each concurrent job's output is its input: {observed}"
        );
        assert_eq!(observed["distinct_ids"], 6, "{observed}");
        assert_eq!(
            observed["health"]["jobs"]["completed"], 8,
            "every job so far completed: {observed}"
        );
        assert_eq!(
            observed["purge"],
            json!({"removed": 0, "status": "completed"}),
            "{observed}"
        );
    });
}

/// With `--api-key k1`: a client with a wrong key gets the client's 401 error; with `k1` it
/// works.
#[test]
fn api_key_is_required() {
    scenario(
        "auth",
        Sample::Echo,
        &["--api-key", "k1"],
        "k1",
        |observed| {
            let wrong = &observed["wrong_key"];
            let message = wrong["message"].as_str().unwrap_or_default();
            assert!(
                wrong["raised"].is_string() && message.contains("401"),
                "a wrong key must raise a 401 error: {observed}"
            );
            assert_eq!(observed["right_key_output"], json!({"k": 1}), "{observed}");
        },
    );
}
