//! ABI 1.1, end to end: what a handler passes with the callbacks 1.1 appended (a traceback with
//! its error, the features `init` learnt) reaches RunPod's result and governs how the worker runs
//! it, in process and in a runner; a Rust panic's traceback names where it panicked; and a handler
//! built against the frozen 1.0 header runs on this host unchanged.

use e2e::platform::{results_by_id, Platform, Recorded, Route};
use e2e::{artifacts, fixture, worker_host, Run, Sample, WorkerProcess};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Both isolations, as `--isolation` names them.
const ISOLATIONS: [&str; 2] = ["runner", "none"];

/// What the C fixture passes as its traceback (see `fixtures/abi_1_1.c`).
const C_TRACEBACK: &str = "Traceback (most recent call last):\n  File \"script.py\", line 7, in handler\n    raise ValueError(\"no such model\")\nValueError: no such model";

/// Runs a one-shot job with `test_input` on the library at `library`, with `--isolation`.
fn one_shot(library: &Path, isolation: &str, test_input: &str) -> Run {
    Run::of(worker_host().arg("--handler").arg(library).args([
        "--isolation",
        isolation,
        "--test_input",
        test_input,
    ]))
}

/// The inner error payload of a result body: the SDK sends it as a JSON string.
fn error_payload(result: &Value) -> Value {
    let text = result["error"].as_str().expect("error is a JSON string");
    serde_json::from_str(text).expect("the error string holds JSON")
}

/// The job-done posts that carry a final result (not progress), successfully answered.
fn results(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.route == Route::Done && r.status == 200 && r.json().get("status").is_none())
        .collect()
}

/// The line of `sample-handlers/faulty/src/lib.rs` whose `panic!` the `panic` mode runs.
fn faulty_panic_line() -> usize {
    let source = include_str!("../sample-handlers/faulty/src/lib.rs");
    source
        .lines()
        .position(|line| line.contains(r#""panic" => panic!("#))
        .expect("the faulty handler's panic mode")
        + 1
}

/// A Rust panic's traceback (its location and a backtrace, taken by the SDK) reaches
/// `error_traceback`, naming the handler's source file and line, in both isolations; the error
/// type and message are what they were before 1.1.
#[test]
fn a_rust_panic_s_traceback_names_its_file_and_line() {
    let line = faulty_panic_line();
    for isolation in ISOLATIONS {
        let run = one_shot(
            artifacts().library(Sample::Faulty),
            isolation,
            r#"{"input": {"mode": "panic", "message": "index out of range"}}"#,
        );
        assert_eq!(run.code, Some(1), "{isolation}: {}", run.stderr);
        let payload = error_payload(&run.result());
        assert_eq!(payload["error_type"], "Panic");
        assert_eq!(payload["error_message"], "index out of range");
        let traceback = payload["error_traceback"].as_str().unwrap();
        assert!(
            traceback.starts_with(&format!(
                "panicked at sample-handlers/faulty/src/lib.rs:{line}:"
            )),
            "{isolation}: {traceback}"
        );
        assert!(
            traceback.contains("stack backtrace:"),
            "{isolation}: {traceback}"
        );
    }
}

/// A C handler's traceback (`set_error_traceback`) reaches `error_traceback` as it passed it, in
/// the one-shot run in both isolations.
#[test]
fn a_c_handler_s_traceback_reaches_the_one_shot_result() {
    for isolation in ISOLATIONS {
        let run = one_shot(&fixture("traceback"), isolation, r#"{"input": {}}"#);
        assert_eq!(run.code, Some(1), "{isolation}: {}", run.stderr);
        let payload = error_payload(&run.result());
        assert_eq!(payload["error_type"], "ValueError", "{isolation}");
        assert_eq!(payload["error_message"], "no such model", "{isolation}");
        assert_eq!(payload["error_traceback"], C_TRACEBACK, "{isolation}");
    }
}

/// The queue worker posts a C handler's traceback in the job's result, in both isolations.
#[test]
fn a_c_handler_s_traceback_reaches_the_platform() {
    for isolation in ISOLATIONS {
        let platform = Platform::start();
        platform.push_job(json!({"id": "tb-1", "input": {}}));
        let _worker = WorkerProcess::start_library(
            &platform,
            &fixture("traceback"),
            &["--isolation", isolation],
            &[],
        );
        let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
        let body = &results_by_id(&requests)["tb-1"];
        let payload = error_payload(body);
        assert_eq!(payload["error_type"], "ValueError", "{isolation}");
        assert_eq!(payload["error_traceback"], C_TRACEBACK, "{isolation}");
    }
}

/// A failing `init` that passed a traceback still exits 8 with its message, and the traceback is
/// in the host's log.
#[test]
fn an_init_failure_s_traceback_is_logged() {
    for isolation in ISOLATIONS {
        let run = Run::of(
            worker_host()
                .arg("--handler")
                .arg(fixture("traceback"))
                .args(["--isolation", isolation])
                .args(["--handler-config", r#"{"fail_init": true}"#])
                .args(["--test_input", r#"{"input": {}}"#]),
        );
        assert_eq!(run.code, Some(8), "{isolation}: {}", run.stderr);
        assert!(
            run.stderr.contains("the script failed to load"),
            "{isolation}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("raise ValueError(\"no such model\")"),
            "{isolation}: {}",
            run.stderr
        );
    }
}

/// Features reported by `init` (`set_features`) replace the descriptor's: a handler whose
/// descriptor says it does not stream has its chunks streamed in the one-shot run, in both
/// isolations (a non-streaming handler's `emit` would be refused).
#[test]
fn streaming_reported_after_init_is_honoured_in_the_one_shot_run() {
    for isolation in ISOLATIONS {
        let run = one_shot(
            &fixture("late_features"),
            isolation,
            r#"{"input": {"k": 1}}"#,
        );
        assert_eq!(run.code, Some(0), "{isolation}: {}", run.stderr);
        let lines: Vec<Value> = run
            .json_lines()
            .into_iter()
            .filter(|line| line.get("status").is_none())
            .collect();
        assert_eq!(
            lines,
            vec![
                json!({"output": {"most_at_once": 1, "input": {"k": 1}}}),
                json!({"output": []}),
            ],
            "{isolation}"
        );
    }
}

/// In the queue worker, a handler that reports after `init` that it streams and runs one job at
/// a time has its chunks posted to the stream URL and never runs two jobs at once, though the
/// worker's concurrency is 4 and its descriptor sets no limit; in both isolations.
#[test]
fn features_reported_after_init_govern_the_worker() {
    for isolation in ISOLATIONS {
        let platform = Platform::start();
        for n in 0..4 {
            platform
                .push_job(json!({"id": format!("late-{n}"), "input": {"sleep_ms": 50, "n": n}}));
        }
        let _worker = WorkerProcess::start_library(
            &platform,
            &fixture("late_features"),
            &["--isolation", isolation, "--concurrency", "4"],
            &[],
        );
        let requests = platform.wait_for(WAIT, "four results", |r| results(r).len() >= 4);
        for result in results(&requests) {
            assert_eq!(result.json(), json!({"output": []}), "{isolation}");
            assert_eq!(result.query_value("isStream"), Some("true"), "{isolation}");
        }
        let chunks: Vec<Value> = requests
            .iter()
            .filter(|r| r.route == Route::Stream)
            .map(Recorded::json)
            .collect();
        assert_eq!(chunks.len(), 4, "{isolation}: {chunks:?}");
        for chunk in &chunks {
            assert_eq!(
                chunk["output"]["most_at_once"], 1,
                "{isolation}: {chunks:?}"
            );
        }
    }
}

/// A handler built against the frozen ABI 1.0 header loads, runs `init` and a job, and answers
/// as it did on a 1.0 host: in the one-shot run in both isolations, and in the queue worker.
#[test]
fn a_handler_built_against_the_1_0_header_runs_unchanged() {
    let input = r#"{"text": "héllo ✓", "n": [1, 2]}"#;
    for isolation in ISOLATIONS {
        let run = one_shot(
            &fixture("abi_1_0"),
            isolation,
            &format!(r#"{{"input": {input}}}"#),
        );
        assert_eq!(run.code, Some(0), "{isolation}: {}", run.stderr);
        assert_eq!(
            run.stdout.lines().last(),
            Some(&*format!("{{\"output\":{input}}}"))
        );
        assert!(
            run.stderr.contains("abi 1.0 handler ready"),
            "{isolation}: {}",
            run.stderr
        );
    }
    let inspect = Run::of(
        worker_host()
            .args(["inspect", "--json", "--handler"])
            .arg(fixture("abi_1_0")),
    );
    assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
    let info: Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(
        (info["abi_major"].clone(), info["abi_minor"].clone()),
        (json!(1), json!(0))
    );

    let platform = Platform::start();
    platform.push_job(json!({"id": "old-1", "input": {"k": "v"}}));
    let _worker = WorkerProcess::start_library(&platform, &fixture("abi_1_0"), &[], &[]);
    let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
    assert_eq!(
        results_by_id(&requests)["old-1"],
        json!({"output": {"k": "v"}})
    );
}
