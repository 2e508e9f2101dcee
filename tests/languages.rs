//! The sample handlers written in C++ (on `worker_host.hpp`), Go and Zig, end to end: each through
//! the one-shot run, the queue worker against the stand-in platform, and the local dev API; and a
//! C++ exception, caught at the boundary by `worker_host.hpp`, failing only its own job.
//!
//! The Go and Zig samples are built by the tests' support (`e2e::foreign`), not by cargo. Their
//! tests need `go` and `zig` (or PyPI's `ziglang`); where one is missing they fail with what to
//! install (`WORKER_HOST_TESTS_ALLOW_SKIPS=1` skips them instead, outside CI).

use e2e::dev_api::DevApi;
use e2e::platform::{results_by_id, Platform, Recorded, Route};
use e2e::{artifacts, fixture, foreign, worker_host, Run, Sample, WorkerProcess};
use serde_json::{json, Value};
use std::time::Duration;

/// How long a test waits for something that normally happens at once.
const WAIT: Duration = Duration::from_secs(30);

/// An input with non-ASCII text, numbers written in ways a re-serialiser would change, and nesting:
/// an echo that passes bytes through returns it byte for byte.
const INPUT: &str = r#"{"text": "naïve café ✓ 日本", "n": [1, 2.50, 1e3], "nested": {"z": null}}"#;

/// The line each sample's init logs through the host.
fn ready_line(sample: Sample) -> &'static str {
    match sample {
        Sample::CppEcho => "c++ echo handler ready",
        Sample::GoEcho => "go echo handler ready",
        Sample::ZigEcho => "zig echo handler ready",
        other => panic!("{other:?} is not one of this file's samples"),
    }
}

/// The inner error payload of a job-done body: the SDK sends it as a JSON string.
fn error_payload(result: &Value) -> Value {
    let text = result["error"].as_str().expect("error is a JSON string");
    serde_json::from_str(text).expect("the error string holds JSON")
}

/// Runs `sample` on [`INPUT`] with `--test_input`: exit 0, the input byte for byte, init's log.
fn one_shot_round_trip(sample: Sample) {
    let run = Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(sample))
            .arg("--test_input")
            .arg(format!(r#"{{"input": {INPUT}}}"#)),
    );
    assert_eq!(run.code, Some(0), "{sample:?} stderr: {}", run.stderr);
    assert_eq!(
        run.stdout,
        format!("{{\"output\":{INPUT}}}\n"),
        "{sample:?}"
    );
    assert!(
        run.stderr.contains(ready_line(sample)),
        "{sample:?}: init logs through the host; stderr: {}",
        run.stderr
    );
}

/// The job-done posts that carry a final result, successfully answered.
fn results(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.route == Route::Done && r.status == 200 && r.json().get("status").is_none())
        .collect()
}

/// Runs `sample` as a queue worker at concurrency 2 on four jobs: each delivered once with its
/// input as output; SIGTERM then ends the worker with 0.
fn queue_worker_round_trip(sample: Sample) {
    let platform = Platform::start();
    for n in 0..4 {
        platform.push_job(json!({"id": format!("j-{n}"), "input": {"n": n, "text": "héllo ✓"}}));
    }
    let mut worker = WorkerProcess::start(&platform, sample, &["--concurrency", "2"], &[]);
    let requests = platform.wait_for(WAIT, "four results", |r| results(r).len() >= 4);
    let by_id = results_by_id(&requests);
    for n in 0..4 {
        assert_eq!(
            by_id[&format!("j-{n}")],
            json!({"output": {"n": n, "text": "héllo ✓"}}),
            "{sample:?}"
        );
    }
    worker.terminate();
    assert_eq!(
        worker.wait(WAIT),
        Some(0),
        "{sample:?} stderr: {}",
        worker.stderr()
    );
}

/// POSTs `{"input": input}` to the dev API's `/runsync`; returns the status object.
fn runsync(api: &DevApi, input: &Value) -> Value {
    let reply = reqwest::blocking::Client::new()
        .post(api.url("/v2/local/runsync"))
        .json(&json!({ "input": input }))
        .timeout(WAIT)
        .send()
        .expect("the dev API answers");
    assert_eq!(reply.status(), 200, "stderr: {}", api.stderr());
    reply.json().expect("the answer is JSON")
}

/// Serves `sample` with the local dev API: `/runsync` completes with the input as output.
fn dev_api_round_trip(sample: Sample) {
    let api = DevApi::start(sample, &[]);
    let input: Value = serde_json::from_str(INPUT).unwrap();
    let body = runsync(&api, &input);
    assert_eq!(body["status"], "COMPLETED", "{sample:?}: {body}");
    assert_eq!(body["output"], input, "{sample:?}: {body}");
}

/// The C++ echo handler round-trips its input byte for byte through the one-shot run.
#[test]
fn cpp_echo_one_shot() {
    one_shot_round_trip(Sample::CppEcho);
}

/// The C++ echo handler delivers each job once as a queue worker and stops on SIGTERM.
#[test]
fn cpp_echo_queue_worker() {
    queue_worker_round_trip(Sample::CppEcho);
}

/// The C++ echo handler answers through the dev API's `/runsync`.
#[test]
fn cpp_echo_dev_api() {
    dev_api_round_trip(Sample::CppEcho);
}

/// A `std::runtime_error` thrown in `handle` becomes the one-shot job's error, with its `what()`
/// and its type name, and exit code 1 (not an abort).
#[test]
fn cpp_exception_fails_the_one_shot_job_with_its_message() {
    let run = Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(Sample::CppEcho))
            .args(["--test_input", r#"{"input": "throw"}"#]),
    );
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    let payload = error_payload(&run.result());
    assert_eq!(payload["error_message"], "thrown on request", "{payload}");
    assert_eq!(payload["error_type"], "std::runtime_error", "{payload}");
}

/// In a queue worker a thrown exception fails only its job: the jobs around it complete, on the
/// same runner (the handler is initialised once).
#[test]
fn cpp_exception_fails_only_its_job_in_the_worker() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "before", "input": {"a": 1}}));
    platform.push_job(json!({"id": "thrower", "input": "throw"}));
    platform.push_job(json!({"id": "after", "input": {"b": 2}}));
    let mut worker = WorkerProcess::start(&platform, Sample::CppEcho, &[], &[]);
    let requests = platform.wait_for(WAIT, "three results", |r| results(r).len() >= 3);
    let by_id = results_by_id(&requests);
    assert_eq!(by_id["before"], json!({"output": {"a": 1}}));
    assert_eq!(by_id["after"], json!({"output": {"b": 2}}));
    let payload = error_payload(&by_id["thrower"]);
    assert_eq!(payload["error_message"], "thrown on request", "{payload}");
    worker.terminate();
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
    let stderr = worker.stderr();
    assert_eq!(
        stderr.matches(ready_line(Sample::CppEcho)).count(),
        1,
        "init ran once: no runner was restarted; stderr: {stderr}"
    );
}

/// Through the dev API a thrown exception ends the job FAILED with its message, and the next job
/// completes.
#[test]
fn cpp_exception_fails_the_dev_api_job_and_the_next_completes() {
    let api = DevApi::start(Sample::CppEcho, &[]);
    let failed = runsync(&api, &json!("throw"));
    assert_eq!(failed["status"], "FAILED", "{failed}");
    assert_eq!(
        error_payload(&failed)["error_message"],
        "thrown on request",
        "{failed}"
    );
    let body = runsync(&api, &json!({"next": true}));
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert_eq!(body["output"], json!({"next": true}), "{body}");
}

/// Runs the `cpp_layer` fixture (on `worker_host.hpp`) on one job given as text; returns the run.
fn cpp_layer_job(input: &str, extra: &[&str]) -> Run {
    Run::of(
        worker_host()
            .arg("--handler")
            .arg(fixture("cpp_layer"))
            .args(extra)
            .arg("--test_input")
            .arg(format!(r#"{{"input": {input}}}"#)),
    )
}

/// `worker_host.hpp` turns each kind of exception into the job's error: a `wh::Error` with its
/// own type, a standard exception with its demangled type name and `what()`, a `bad_alloc`, and
/// a thrown `int` with a generic message; an input that throws nothing is echoed.
#[test]
fn cpp_layer_reports_each_kind_of_exception() {
    for (input, error_type, message) in [
        (r#""typed""#, "ValueError", "a typed error"),
        (r#""std""#, "std::out_of_range", "index 7 is out of range"),
        (r#""alloc""#, "std::bad_alloc", "std::bad_alloc"),
        (
            r#""int""#,
            "CppException",
            "a C++ exception that is not a std::exception",
        ),
    ] {
        let run = cpp_layer_job(input, &[]);
        assert_eq!(run.code, Some(1), "{input}: stderr: {}", run.stderr);
        let payload = error_payload(&run.result());
        assert_eq!(payload["error_type"], error_type, "{input}: {payload}");
        assert_eq!(payload["error_message"], message, "{input}: {payload}");
    }
    let run = cpp_layer_job(r#"{"fine": 1}"#, &[]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.result(), json!({"output": {"fine": 1}}));
}

/// A `wh::Error` thrown by the handler's constructor fails `init` with its message: the host
/// exits 8 (init failed) before running the job.
#[test]
fn cpp_layer_constructor_exception_fails_init() {
    let run = cpp_layer_job(
        r#""never run""#,
        &["--handler-config", r#"{"fail_init": true}"#],
    );
    assert_eq!(run.code, Some(8), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("init refused: fail_init is set"),
        "{}",
        run.stderr
    );
}

/// The Go echo handler (c-shared, one Go runtime in the runner) round-trips through the one-shot
/// run.
#[test]
fn go_echo_one_shot() {
    if foreign::available(Sample::GoEcho, "the Go one-shot test") {
        one_shot_round_trip(Sample::GoEcho);
    }
}

/// The Go echo handler serves a queue worker at concurrency 2 (Go called from two host threads)
/// and the worker still stops on SIGTERM with the Go runtime loaded.
#[test]
fn go_echo_queue_worker() {
    if foreign::available(Sample::GoEcho, "the Go queue worker test") {
        queue_worker_round_trip(Sample::GoEcho);
    }
}

/// The Go echo handler answers through the dev API's `/runsync`.
#[test]
fn go_echo_dev_api() {
    if foreign::available(Sample::GoEcho, "the Go dev API test") {
        dev_api_round_trip(Sample::GoEcho);
    }
}

/// With the Go runtime in the host's own process (`--isolation none`), the queue worker still
/// serves and SIGTERM still reaches the host's shutdown: Go leaves the host's handlers in place.
#[test]
fn go_echo_in_the_host_process_stops_on_sigterm() {
    if !foreign::available(Sample::GoEcho, "the Go in-process test") {
        return;
    }
    let platform = Platform::start();
    platform.push_job(json!({"id": "in-process", "input": {"go": true}}));
    let mut worker = WorkerProcess::start(&platform, Sample::GoEcho, &["--isolation", "none"], &[]);
    let requests = platform.wait_for(WAIT, "a result", |r| !results(r).is_empty());
    assert_eq!(
        results_by_id(&requests)["in-process"],
        json!({"output": {"go": true}})
    );
    worker.terminate();
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
}

/// The Zig echo handler round-trips through the one-shot run.
#[test]
fn zig_echo_one_shot() {
    if foreign::available(Sample::ZigEcho, "the Zig one-shot test") {
        one_shot_round_trip(Sample::ZigEcho);
    }
}

/// The Zig echo handler serves a queue worker at concurrency 2 and stops on SIGTERM.
#[test]
fn zig_echo_queue_worker() {
    if foreign::available(Sample::ZigEcho, "the Zig queue worker test") {
        queue_worker_round_trip(Sample::ZigEcho);
    }
}

/// The Zig echo handler answers through the dev API's `/runsync`.
#[test]
fn zig_echo_dev_api() {
    if foreign::available(Sample::ZigEcho, "the Zig dev API test") {
        dev_api_round_trip(Sample::ZigEcho);
    }
}
