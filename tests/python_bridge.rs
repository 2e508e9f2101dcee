//! The Python bridge (`python-bridge/`) end to end: the real `worker-host` binary loading the
//! bridge, which runs the `handler.py` scripts under `tests/python/bridge/` unchanged.
//!
//! The conformance tests run each script both ways, as `python3 SCRIPT` with runpod-python
//! 1.12.0 and under worker-host with the bridge, against the same stand-in platform, with the
//! harness of `tests/support/conformance.rs`. The rest cover the one-shot run, the dev API
//! driven by the official client, a script that fails while it loads, a segfault in C code and
//! cancellation. Every test needs `python3` with `runpod==1.12.0` (see
//! [`e2e::python_sdk_available`]).

use e2e::conformance::{compare, Host, Scenario, Sdk};
use e2e::dev_api::DevApi;
use e2e::platform::{results_by_id, Platform};
use e2e::{python_bridge, worker_host, Run, WorkerProcess};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a client scenario, a platform wait or a log line may take (the SDK imports slowly).
const WAIT: Duration = Duration::from_secs(60);

/// Whether the tests can run here; the bridge is built on first use.
fn ready(what: &str) -> bool {
    e2e::python_sdk_available(what)
}

/// The conformance scenario of one fixture script, `host_args` added on worker-host's side.
fn both_ways(script: &str, host_args: &[&str], jobs: Vec<Value>) {
    if !ready("the bridge's SDK conformance test") {
        return;
    }
    let script = python_bridge::script(script);
    let mut args = python_bridge::args(&script);
    args.extend(host_args.iter().map(|arg| (*arg).to_owned()));
    compare(&Scenario {
        sdk: Sdk::Script(script),
        host: Host::Library(python_bridge::library().to_owned(), args),
        jobs,
    });
}

/// A sync `handler.py` gives the platform what the SDK gives it: the echoed input, a returned
/// dict with `error` (a failed job) and with `refresh_worker` (`stopPod`), progress updates, and
/// an exception as the SDK's error payload. One progress update per job: values reported faster
/// than the host posts them are coalesced to the latest (README, "The queue worker"), where the
/// SDK posts each.
#[test]
fn sync_handler_matches_the_sdk() {
    both_ways(
        "sync_handler.py",
        &[],
        vec![
            json!({"id": "s-1", "input": {"text": "héllo ✓", "n": [1, 2.5, null]}}),
            json!({"id": "s-2", "input": {"error": "handler says no", "partial": 1}}),
            json!({"id": "s-3", "input": {"refresh_worker": true, "keep": 3}}),
            json!({"id": "s-4", "input": {"progress": [{"step": "one ✓"}], "done": true}}),
            json!({"id": "s-5", "input": {"raise": "boom ✓"}}),
            json!({"id": "s-6", "input": "just a string"}),
            json!({"id": "s-7", "input": {}}),
        ],
    );
}

/// An async `handler.py` matches the SDK on output, error dict, progress and exception.
#[test]
fn async_handler_matches_the_sdk() {
    both_ways(
        "async_handler.py",
        &[],
        vec![
            json!({"id": "a-1", "input": {"text": "async ✓"}}),
            json!({"id": "a-2", "input": {"error": "no", "progress": ["p"]}}),
            json!({"id": "a-3", "input": {"raise": "async boom"}}),
        ],
    );
}

/// A generator `handler.py` streams each yielded value as a chunk, with its progress, like the
/// SDK's generator handler.
#[test]
fn generator_handler_matches_the_sdk() {
    both_ways(
        "generator_handler.py",
        &[],
        vec![
            json!({"id": "g-1", "input": {"chunks": [{"part": 1}, "two ✓", [3]]}}),
            json!({"id": "g-2", "input": {"chunks": []}}),
        ],
    );
}

/// An async generator with `return_aggregate_stream` (worker-host run with
/// `--return-aggregate-stream`, as the bridge's warning asks) streams its chunks and puts them
/// all in the final result, like the SDK.
#[test]
fn async_generator_handler_matches_the_sdk() {
    both_ways(
        "async_generator_handler.py",
        &["--return-aggregate-stream"],
        vec![json!({"id": "ag-1", "input": {"chunks": ["a", {"b": 2}]}})],
    );
}

/// A generator that yields chunks and then raises: the platform gets the chunks, then the
/// SDK's generator error (`handler: <message> \ntraceback: <traceback>`, a plain string); one
/// that raises before its first chunk gets that error alone.
#[test]
fn a_generator_that_raises_mid_stream_matches_the_sdk() {
    both_ways(
        "generator_raises.py",
        &[],
        vec![
            json!({"id": "gr-1", "input": {"chunks": [{"part": 1}, "two ✓"], "raise": "mid-stream ✓"}}),
            json!({"id": "gr-2", "input": {"chunks": [], "raise": "before any chunk"}}),
        ],
    );
}

/// An async generator that raises mid-stream, with `return_aggregate_stream`: the streamed
/// chunks, then the SDK's generator error, the aggregated chunks dropped, as the SDK does.
#[test]
fn an_async_generator_that_raises_mid_stream_matches_the_sdk() {
    both_ways(
        "async_generator_raises.py",
        &["--return-aggregate-stream"],
        vec![
            json!({"id": "agr-1", "input": {"chunks": ["a", {"b": 2}], "raise": "async mid-stream"}}),
        ],
    );
}

/// A one-shot run of a `--handler`-less bridge: `WORKER_HOST_PYTHON_SCRIPT` names the script.
fn oneshot(script: &Path, input: &Value, extra: &[(&str, &str)]) -> Run {
    let mut command = worker_host();
    command
        .arg("--handler")
        .arg(python_bridge::library())
        .arg("--test_input")
        .arg(json!({ "input": input }).to_string())
        .env("WORKER_HOST_PYTHON_SCRIPT", script)
        .envs(extra.iter().copied());
    Run::of(&mut command)
}

/// `--test_input` on a script: top-level code runs first, progress lines then the output; an
/// exception exits 1 with the SDK's `<class '...'>` type and a traceback that names the script's
/// line.
#[test]
fn test_input_runs_a_script() {
    if !ready("the bridge's one-shot test") {
        return;
    }
    let script = python_bridge::script("sync_handler.py");
    let run = oneshot(&script, &json!({"a": "✓", "progress": [7]}), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.json_lines(),
        vec![
            json!({"status": "IN_PROGRESS", "output": 7}),
            json!({"output": {"a": "✓", "progress": [7]}}),
        ]
    );
    assert!(
        run.stderr.contains("loading the model (top level)"),
        "{run:?}"
    );

    let run = oneshot(&script, &json!({"raise": "boom"}), &[]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let error: Value = serde_json::from_str(run.result()["error"].as_str().expect("an error"))
        .expect("the error is a JSON payload");
    assert_eq!(error["error_type"], "<class 'ValueError'>", "{error}");
    assert_eq!(error["error_message"], "boom", "{error}");
    let traceback = error["error_traceback"].as_str().expect("a traceback");
    assert!(
        traceback.starts_with("Traceback (most recent call last):")
            && traceback.contains(&format!("File \"{}\", line", script.display()))
            && traceback.ends_with("ValueError: boom\n"),
        "{traceback}"
    );
}

/// The config's `refresh_worker` asks for a fresh worker after every job: `stopPod` is set.
#[test]
fn refresh_worker_config_sets_stop_pod() {
    if !ready("the bridge's refresh_worker test") {
        return;
    }
    let run = oneshot(
        &python_bridge::script("refresh_worker_handler.py"),
        &json!(1),
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.result(),
        json!({"output": {"seen": 1}, "stopPod": true})
    );
}

/// The installed runpod package keeps working beside the captured `start`
/// (`runpod.serverless.utils.rp_validator`).
#[test]
fn the_installed_runpod_package_still_works() {
    if !ready("the bridge's runpod helpers test") {
        return;
    }
    let script = python_bridge::script("with_utils.py");
    let run = oneshot(&script, &json!({"n": 3}), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.result(),
        json!({"output": {"validated_input": {"n": 3}}})
    );
}

/// Without the runpod package (hidden from `sys.path` by a `sitecustomize`), the script's
/// `import runpod` gets the bridge's stand-in, whose `start` and `progress_update` work.
#[test]
fn a_stand_in_runpod_serves_without_the_package() {
    if !ready("the bridge's stand-in test") {
        return;
    }
    let hide = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        hide.path().join("sitecustomize.py"),
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n",
    )
    .expect("sitecustomize.py is written");
    let path = hide.path().to_str().expect("a UTF-8 path");
    let run = oneshot(
        &python_bridge::script("stand_in.py"),
        &json!("x"),
        &[("PYTHONPATH", path)],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.json_lines(),
        vec![
            json!({"status": "IN_PROGRESS", "output": "half"}),
            json!({"output": {"has_utils": false, "input": "x"}}),
        ]
    );
}

/// A script that raises while it loads fails `init`: exit 8 (the documented code for a failed
/// `init` in a one-shot run), with the exception and its traceback, which names the script, on
/// stderr. A script that never calls `start` fails the same way, saying so.
#[test]
fn a_script_that_fails_at_import_fails_init() {
    if !ready("the bridge's import failure test") {
        return;
    }
    let script = python_bridge::script("import_error.py");
    let run = oneshot(&script, &json!({}), &[]);
    assert_eq!(run.code, Some(8), "{run:?}");
    assert!(
        run.stderr
            .contains("FileNotFoundError: model.safetensors is not there")
            && run.stderr.contains("Traceback (most recent call last):")
            && run
                .stderr
                .contains(&format!("File \"{}\"", script.display())),
        "{}",
        run.stderr
    );

    let run = oneshot(&python_bridge::script("no_start.py"), &json!({}), &[]);
    assert_eq!(run.code, Some(8), "{run:?}");
    assert!(
        run.stderr
            .contains("without calling runpod.serverless.start"),
        "{}",
        run.stderr
    );
}

/// `ctypes.string_at(0)` segfaults the runner: that job fails with `HandlerCrashed`, the worker
/// lives on, runs the script's `init` again and completes the next job.
#[test]
fn a_segfault_in_c_code_fails_only_its_job() {
    if !ready("the bridge's segfault test") {
        return;
    }
    let platform = Platform::start();
    platform.push_job(json!({"id": "crash", "input": "crash"}));
    platform.push_job(json!({"id": "after", "input": "fine"}));
    let script = python_bridge::script("crash_handler.py");
    let args = python_bridge::args(&script);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let worker = WorkerProcess::start_library(&platform, python_bridge::library(), &args, &[]);
    let requests = platform.wait_for(WAIT, "both results", |requests| {
        results_by_id(requests).len() == 2
    });
    let results = results_by_id(&requests);
    assert_eq!(results["after"], json!({"output": "fine"}), "{results:?}");
    let error: Value = serde_json::from_str(results["crash"]["error"].as_str().expect("an error"))
        .expect("the error is a JSON payload");
    assert_eq!(error["error_type"], "HandlerCrashed", "{error}");
    assert!(worker.stderr().contains("SIGSEGV"), "{}", worker.stderr());
}

/// An async handler's `concurrency_modifier` gives real concurrency on the one event loop: three
/// jobs that each wait for the other two all meet (the host's `--concurrency`, 1 by default,
/// caps what the script asks for).
#[test]
fn concurrency_modifier_runs_async_jobs_at_once() {
    if !ready("the bridge's concurrency test") {
        return;
    }
    let platform = Platform::start();
    for id in ["m-1", "m-2", "m-3"] {
        platform.push_job(json!({"id": id, "input": {"meet": 3}}));
    }
    let script = python_bridge::script("concurrent_async.py");
    let mut args = python_bridge::args(&script);
    args.extend(["--concurrency".to_owned(), "8".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _worker = WorkerProcess::start_library(&platform, python_bridge::library(), &args, &[]);
    let requests = platform.wait_for(WAIT, "three results", |requests| {
        results_by_id(requests).len() == 3
    });
    for (id, result) in results_by_id(&requests) {
        assert_eq!(result, json!({"output": {"met": true}}), "job {id}");
    }
}

/// Runs `tests/python/bridge/client.py SCENARIO` against `host`; returns the JSON line it printed.
fn client(host: &DevApi, scenario: &str) -> Value {
    let mut command = Command::new("python3");
    command
        .arg(python_bridge::script("client.py"))
        .arg(scenario)
        .env(
            "RUNPOD_ENDPOINT_BASE_URL",
            format!("{}/v2", host.base_url()),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null());
    let run = Run::of(&mut command);
    assert_eq!(
        run.code,
        Some(0),
        "client.py {scenario}: {run:?}\nworker-host's stderr:\n{}",
        host.stderr()
    );
    run.result()
}

/// The dev API on a script starts with its args.
fn dev_api(script: &str, args: &[&str]) -> DevApi {
    let mut all = python_bridge::args(&python_bridge::script(script));
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    DevApi::start_library(python_bridge::library(), &all, &[])
}

/// The official client's `run_sync` and `Job.stream()` work on scripts through the dev API.
#[test]
fn the_official_client_drives_the_dev_api() {
    if !ready("the bridge's dev API client test") {
        return;
    }
    let host = dev_api("sync_handler.py", &[]);
    assert_eq!(
        client(&host, "run_sync"),
        json!({"output": {"prompt": "hi ✓"}})
    );
    drop(host);
    let host = dev_api("generator_handler.py", &[]);
    assert_eq!(
        client(&host, "stream"),
        json!({"chunks": ["a", {"b": 2}, [3]], "status": "COMPLETED"})
    );
}

/// Waits until the worker's stderr holds `line`, up to [`WAIT`].
fn wait_for_log(host: &DevApi, line: &str) {
    let deadline = Instant::now() + WAIT;
    while !host.stderr().contains(line) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in worker-host's stderr:\n{}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A cancelled async job gets `asyncio.CancelledError` raised in the handler; the next job runs.
#[test]
fn a_cancelled_async_job_raises_cancelled_error() {
    if !ready("the bridge's async cancel test") {
        return;
    }
    let host = dev_api("async_handler.py", &[]);
    let observed = client(&host, "cancel");
    assert_eq!(
        observed,
        json!({"running": "IN_PROGRESS", "cancel": "CANCELLED", "next_output": {"x": 1}})
    );
    wait_for_log(&host, "the async handler saw CancelledError");
}

/// A cancelled sync job gets `JobCancelled` raised in the handler, which its `except Exception`
/// does not swallow; the next job runs.
#[test]
fn a_cancelled_sync_job_raises_past_except_exception() {
    if !ready("the bridge's sync cancel test") {
        return;
    }
    let host = dev_api("sync_cancel.py", &[]);
    let observed = client(&host, "cancel");
    assert_eq!(observed["cancel"], "CANCELLED", "{observed}");
    wait_for_log(&host, "the sync handler was stopped by JobCancelled");
}
