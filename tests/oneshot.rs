//! The one-shot test run, end to end: the real `worker-host` binary running real handler
//! libraries on a test input, as a RunPod user does in CI.

use e2e::{artifacts, worker_host, Run, Sample};
use serde_json::{json, Value};
use std::process::Command;

/// A `worker-host` command for this sample handler.
fn host(sample: Sample) -> Command {
    let mut command = worker_host();
    command.arg("--handler").arg(artifacts().library(sample));
    command
}

/// The inner error payload of a job-done body: the SDK sends it as a JSON string.
fn error_payload(result: &Value) -> Value {
    let text = result["error"].as_str().expect("error is a JSON string");
    serde_json::from_str(text).expect("the error string holds JSON")
}

/// The Rust echo handler returns its input byte for byte, non-ASCII included, and exits 0.
#[test]
fn rust_echo_round_trips_exactly() {
    let input =
        r#"{"héllo": "✓ 日本 🚀", "n": [1, 2.50, 1e3, -0], "nested": {"z": null, "a": true}}"#;
    let run = Run::of(
        host(Sample::Echo)
            .arg("--test_input")
            .arg(format!(r#"{{"input": {input}}}"#)),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.stdout, format!("{{\"output\":{input}}}\n"));
}

/// The C echo handler, built by cargo with the cc crate, round-trips its input the same way.
#[test]
fn c_echo_round_trips_exactly() {
    let input = r#"{"text": "naïve café ✓", "list": [1, 2, 3]}"#;
    let run = Run::of(
        host(Sample::CEcho)
            .arg("--test_input")
            .arg(format!(r#"{{"input": {input}}}"#)),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.stdout, format!("{{\"output\":{input}}}\n"));
    assert!(
        run.stderr.contains("c echo handler ready"),
        "the C init logs through the host"
    );
}

/// A 5 MB input of mixed ASCII and multi-byte text round-trips byte-exactly, in Rust and in C.
#[test]
fn large_input_round_trips_exactly() {
    let unit = "abc✓日本-\\\"quoted\\\" ";
    let text: String = unit.repeat(5 * 1024 * 1024 / unit.len() + 1);
    let input = format!(r#"{{"blob": "{text}", "size": {}}}"#, text.len());
    assert!(input.len() >= 5 * 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.json");
    std::fs::write(&file, format!(r#"{{"input": {input}}}"#)).unwrap();
    for sample in [Sample::Echo, Sample::CEcho] {
        let run = Run::of(
            host(sample)
                .arg("--test_input")
                .arg(format!("@{}", file.display())),
        );
        assert_eq!(run.code, Some(0), "{sample:?} stderr: {}", run.stderr);
        assert!(
            run.stdout == format!("{{\"output\":{input}}}\n"),
            "{sample:?}: the output differs from the input"
        );
    }
}

/// A streaming handler's chunks and progress are printed as they are emitted, in order, and the
/// final result is the SDK's `{"output": []}` (or every chunk with --return-aggregate-stream).
#[test]
fn streaming_prints_each_chunk_then_the_result() {
    let job = r#"{"input": {"chunks": [{"part": 1}, "two", [3]]}}"#;
    let run = Run::of(host(Sample::Stream).arg("--test_input").arg(job));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let chunks: Vec<Value> = run
        .json_lines()
        .into_iter()
        .filter(|line| line.get("status").is_none())
        .collect();
    assert_eq!(
        chunks,
        vec![
            json!({"output": {"part": 1}}),
            json!({"output": "two"}),
            json!({"output": [3]}),
            json!({"output": []}),
        ]
    );
    let lines = run.json_lines();
    assert_eq!(
        lines[0],
        json!({"status": "IN_PROGRESS", "output": {"done": 0, "total": 3}})
    );

    let run = Run::of(
        host(Sample::Stream)
            .args(["--return-aggregate-stream", "--test_input"])
            .arg(job),
    );
    assert_eq!(run.result(), json!({"output": [{"part": 1}, "two", [3]]}));
}

/// A handler error is printed in the SDK's error shape (a JSON string with six keys) and the
/// run exits 1.
#[test]
fn handler_error_exits_1_with_the_sdk_error_shape() {
    let run =
        Run::of(host(Sample::Faulty).arg("--test_input").arg(
            r#"{"input": {"mode": "error", "type": "ValueError", "message": "bad value ✗"}}"#,
        ));
    assert_eq!(run.code, Some(1));
    let result = run.result();
    assert_eq!(
        result.as_object().unwrap().len(),
        1,
        "only `error`: {result}"
    );
    let payload = error_payload(&result);
    let keys: Vec<&str> = payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "error_type",
        "error_message",
        "error_traceback",
        "hostname",
        "worker_id",
        "runpod_version",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(payload["error_type"], "ValueError");
    assert_eq!(payload["error_message"], "bad value ✗");
    assert!(
        run.stderr.contains("Job local_test failed with error"),
        "{}",
        run.stderr
    );
}

/// A panicking handler does not abort the host: the panic message becomes the job's error and
/// the run exits 1.
#[test]
fn panic_becomes_an_error_result() {
    let payload =
        failed_faulty_run(r#"{"input": {"mode": "panic", "message": "index out of range"}}"#);
    assert_eq!(payload["error_type"], "Panic");
    assert_eq!(payload["error_message"], "index out of range");
}

/// Runs the faulty handler on `test_input`, expects exit 1 (not a signal), and returns the
/// result's error payload.
fn failed_faulty_run(test_input: &str) -> Value {
    let run = Run::of(host(Sample::Faulty).arg("--test_input").arg(test_input));
    assert_eq!(
        run.code,
        Some(1),
        "exit code (None = killed by a signal); stderr: {}",
        run.stderr
    );
    error_payload(&run.result())
}

/// A panic payload whose own `Drop` panics fails the job with a `Panic` error; the host is not
/// aborted.
#[test]
fn panic_payload_that_panics_on_drop_is_contained() {
    let payload = failed_faulty_run(r#"{"input": {"mode": "panic_bomb"}}"#);
    assert_eq!(payload["error_type"], "Panic");
}

/// Returning `{"error": ...}` fails the job as in the SDK; `request_recycle` adds `stopPod`.
#[test]
fn error_key_and_recycle_follow_the_sdk() {
    let run = Run::of(
        host(Sample::Faulty)
            .arg("--test_input")
            .arg(r#"{"input": {"mode": "error_key", "message": "no such model"}}"#),
    );
    assert_eq!(run.code, Some(1));
    assert_eq!(run.result(), json!({"error": "no such model"}));

    let run = Run::of(
        host(Sample::Faulty)
            .arg("--test_input")
            .arg(r#"{"input": {"mode": "recycle"}}"#),
    );
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.result(),
        json!({"output": {"mode": "recycle"}, "stopPod": true})
    );
}

/// Without --test_input (and without RUNPOD_WEBHOOK_GET_JOB) the job comes from
/// ./test_input.json; a job's own id is kept and reaches the handler with its other keys.
#[test]
fn test_input_json_fallback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("test_input.json"),
        r#"{"id": "my-job", "input": {"mode": "echo", "k": [1]}}"#,
    )
    .unwrap();
    let run = Run::of(host(Sample::Faulty).current_dir(dir.path()));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.result(), json!({"output": {"mode": "echo", "k": [1]}}));
    assert!(
        run.stderr.contains("Job my-job completed successfully"),
        "{}",
        run.stderr
    );

    let empty = tempfile::tempdir().unwrap();
    let run = Run::of(host(Sample::Echo).current_dir(empty.path()));
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("no test input"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

/// A test input without `input`, with a null `input`, or that is not JSON is a clear error and
/// exit 1, and the handler never runs.
#[test]
fn bad_test_inputs_are_clear_errors() {
    for (job, message) in [
        (r#"{"id": "x"}"#, "the job has no input"),
        (r#"{"input": null}"#, "the job has no input"),
        (r#"[1, 2]"#, "not a JSON object"),
        (r#"{"input": "#, "the test input is not valid JSON"),
    ] {
        let run = Run::of(host(Sample::Echo).arg("--test_input").arg(job));
        assert_eq!(run.code, Some(1), "{job}");
        assert!(run.stderr.contains(message), "{job}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{job}: nothing on stdout");
    }
}

/// --test_output compares the output: equal JSON (any key order) exits 0; a difference exits 1
/// and names the path, the expected and the actual value.
#[test]
fn test_output_match_and_mismatch() {
    let job = r#"{"input": {"a": 1, "b": ["x", "y"]}}"#;
    let run = Run::of(
        host(Sample::Echo)
            .args(["--test_input", job, "--test_output"])
            .arg(r#"{"b": ["x", "y"], "a": 1.0}"#),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);

    let run = Run::of(
        host(Sample::Echo)
            .args(["--test_input", job, "--test_output"])
            .arg(r#"{"a": 2, "b": ["x", "z"]}"#),
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("$.a: expected 2, got 1"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(r#"$.b[1]: expected "z", got "y""#),
        "{}",
        run.stderr
    );

    // A streaming job's output is the list of its chunks.
    let run = Run::of(
        host(Sample::Stream)
            .args(["--test_input", r#"{"input": {"chunks": [1, 2]}}"#])
            .args(["--test_output", "[1, 2]"]),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
}

/// An output that is valid JSON but cannot be read as a value (`1e400` is beyond f64) is a
/// mismatch that says why, with exit 1, not a crash of the host.
#[test]
fn test_output_that_cannot_be_compared_is_a_mismatch() {
    let run = Run::of(host(Sample::Echo).args([
        "--test_input",
        r#"{"input": 1e400}"#,
        "--test_output",
        "1",
    ]));
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert_eq!(run.stdout, "{\"output\":1e400}\n");
    assert!(
        run.stderr.contains(
            "$: the output cannot be compared with the expected one: number out of range"
        ),
        "{}",
        run.stderr
    );
}

/// `{"error": ...}` fails the job even when another key of the output holds a lone surrogate
/// escape (valid JSON that Python's `json` reads); the other key is kept as written.
#[test]
fn error_key_beside_a_lone_surrogate_key_fails_the_job() {
    let run = Run::of(host(Sample::Echo).args([
        "--test_input",
        r#"{"input": {"\ud800": 1, "error": "no such model"}}"#,
    ]));
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert_eq!(
        run.stdout,
        "{\"output\":{\"\\ud800\":1},\"error\":\"no such model\"}\n"
    );
    assert!(
        run.stderr
            .contains("Job local_test failed with error: no such model"),
        "{}",
        run.stderr
    );
}

/// --rp_log_level and RUNPOD_LOG_LEVEL / RUNPOD_DEBUG_LEVEL set the level (WARNING accepted);
/// an unknown level is refused with exit 2.
#[test]
fn log_levels() {
    let job = r#"{"input": 1}"#;
    let run = Run::of(host(Sample::Echo).args(["--test_input", job]));
    assert!(
        run.stderr.contains("completed successfully"),
        "INFO by default"
    );

    let run = Run::of(host(Sample::Echo).args(["--rp_log_level", "WARN", "--test_input", job]));
    assert_eq!(run.code, Some(0));
    assert!(
        !run.stderr.contains("completed successfully"),
        "{}",
        run.stderr
    );

    let run = Run::of(
        host(Sample::Echo)
            .env("RUNPOD_LOG_LEVEL", "WARNING")
            .args(["--test_input", job]),
    );
    assert_eq!(run.code, Some(0));
    assert!(
        !run.stderr.contains("completed successfully"),
        "{}",
        run.stderr
    );

    let run = Run::of(
        host(Sample::Echo)
            .env("RUNPOD_DEBUG_LEVEL", "ERROR")
            .args(["--test_input", job]),
    );
    assert!(
        !run.stderr.contains("completed successfully"),
        "{}",
        run.stderr
    );

    let run = Run::of(host(Sample::Echo).args(["--rp_log_level", "LOUD", "--test_input", job]));
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("unknown log level"), "{}", run.stderr);
}

/// With RUNPOD_ENDPOINT_ID set, logs are the SDK's JSON lines with the job id as requestId.
#[test]
fn json_log_lines_on_the_platform() {
    let run = Run::of(
        host(Sample::Echo)
            .env("RUNPOD_ENDPOINT_ID", "ep-1")
            .args(["--test_input", r#"{"id": "j-7", "input": 1}"#]),
    );
    assert_eq!(run.code, Some(0));
    let lines: Vec<Value> = run
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let done = lines
        .iter()
        .find(|line| line["message"] == "Job j-7 completed successfully.")
        .expect("the completion line");
    assert_eq!(
        done,
        &json!({"requestId": "j-7", "message": "Job j-7 completed successfully.", "level": "INFO"})
    );
}
