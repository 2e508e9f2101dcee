//! The host against handlers that break the rules, or need more than the least the ABI allows,
//! end to end: the real binary running the C fixtures of `fixtures/careless_handlers.c`, in the
//! one-shot mode and behind the local dev API (whose jobs run on the same kind of thread as in
//! production). In each case the host survives and the handler gets the status the header
//! documents.

use e2e::dev_api::DevApi;
use e2e::{fixture, worker_host, Run};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// WH_STATUS_INVALID_ARGUMENT
const INVALID_ARGUMENT: i32 = 2;
/// WH_STATUS_INVALID_STATE
const INVALID_STATE: i32 = 3;
/// WH_STATUS_TOO_LARGE
const TOO_LARGE: i32 = 4;

/// How long a job may take to answer.
const WAIT: Duration = Duration::from_secs(60);

/// The dev API on a fixture library, with a client that waits as long as a job may take.
struct Host {
    api: DevApi,
    http: Client,
}

impl Host {
    /// Starts the dev API on the handler at `library` and waits until it listens.
    fn start(library: &Path) -> Self {
        Self {
            api: DevApi::start_library(library, &[], &[]),
            http: Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    /// Everything the host wrote to stderr so far.
    fn stderr(&self) -> String {
        self.api.stderr()
    }

    /// Panics, with the host's stderr, if the process has ended.
    fn assert_alive(&mut self) {
        if let Some(status) = self.api.exit_status() {
            // Let the stderr reader catch up with the last lines.
            std::thread::sleep(Duration::from_millis(200));
            panic!("worker-host died ({status}); stderr:\n{}", self.stderr());
        }
    }

    /// `POST /runsync` of `{"input": input}`: the job's final status object.
    fn runsync(&mut self, input: Value) -> Value {
        let reply = self
            .http
            .post(self.api.url("/runsync"))
            .json(&json!({ "input": input }))
            .send();
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                self.assert_alive();
                panic!("/runsync failed: {error}; stderr:\n{}", self.stderr());
            }
        };
        assert_eq!(reply.status(), 200, "stderr:\n{}", self.stderr());
        reply.json().expect("/runsync answers JSON")
    }
}

/// `text` with each line cut to 300 characters, for failure messages (one fixture logs a line
/// of 70,000).
fn shown(text: &str) -> String {
    text.lines()
        .map(|line| line.chars().take(300).collect::<String>() + "\n")
        .collect()
}

/// Runs one `--test_input` job of `input` on the handler at `library`.
fn one_shot(library: &Path, input: &str) -> Run {
    Run::of(
        worker_host()
            .arg("--handler")
            .arg(library)
            .args(["--test_input", &format!(r#"{{"input": {input}}}"#)]),
    )
}

/// A handler thread that calls back with a job's `wh_call` after the job returned, while the
/// next job runs, is refused on every callback (nothing reaches the running job) and the worker
/// keeps serving.
#[test]
fn callbacks_after_the_call_returned_are_refused() {
    let mut host = Host::start(&fixture("late_callbacks"));
    let first = host.runsync(json!("keep"));
    assert_eq!(
        (&first["status"], &first["output"]),
        (&json!("COMPLETED"), &json!("kept")),
        "{first}"
    );
    let second = host.runsync(json!("report"));
    assert_eq!(second["status"], "COMPLETED", "{second}");
    assert_eq!(
        second["output"],
        json!({
            "set_output": INVALID_STATE,
            "set_error": INVALID_STATE,
            "emit": INVALID_STATE,
            "progress": INVALID_STATE,
            "is_cancelled": false,
        }),
        "stderr:\n{}",
        host.stderr()
    );
    host.assert_alive();
    let third = host.runsync(json!("keep"));
    assert_eq!(third["status"], "COMPLETED", "{third}");
    assert!(
        !host.stderr().contains("late log line"),
        "a late log line was logged:\n{}",
        host.stderr()
    );
}

/// A job that needs 6 MiB of stack completes on the dev API's job threads (8 MiB), as it does in
/// a `--test_input` run on the main thread.
#[test]
fn jobs_get_eight_mib_of_stack() {
    let library = fixture("deep_stack");
    let run = one_shot(&library, "{}");
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.result(), json!({"output": "deep"}));
    let mut host = Host::start(&library);
    let done = host.runsync(json!({}));
    assert_eq!(
        (&done["status"], &done["output"]),
        (&json!("COMPLETED"), &json!("deep")),
        "{done}"
    );
}

/// A handler built against a later 1.x header, with a larger descriptor and minor 9, loads,
/// shows its ABI and runs a job.
#[test]
fn a_larger_descriptor_from_a_later_minor_loads_and_runs() {
    let library = fixture("newer_minor");
    let run = Run::of(
        worker_host()
            .args(["inspect", "--json", "--handler"])
            .arg(&library),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let info: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        (&info["name"], &info["abi_major"], &info["abi_minor"]),
        (&json!("newer-minor"), &json!(1), &json!(9))
    );
    let run = one_shot(&library, r#"{"k": [1, 2]}"#);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.result(), json!({"output": {"k": [1, 2]}}));
}

/// Lengths no buffer has (SIZE_MAX) are refused before the host reads a byte, NULL with a length
/// is refused by `set_error`, and a log line over 64 KiB is cut with a note.
#[test]
fn odd_lengths_are_refused_before_reading() {
    let run = one_shot(&fixture("odd_arguments"), "{}");
    assert_eq!(run.code, Some(0), "stderr: {}", shown(&run.stderr));
    assert_eq!(
        run.result(),
        json!({"output": {
            "set_output": TOO_LARGE,
            "progress": TOO_LARGE,
            "set_error_null": INVALID_ARGUMENT,
            "set_error_huge": INVALID_ARGUMENT,
        }})
    );
    assert!(
        run.stderr
            .contains("[log line cut: the first 65536 of 70000 bytes]"),
        "{}",
        shown(&run.stderr)
    );
}

/// A streaming handler's `set_output` is refused with WH_STATUS_INVALID_STATE instead of being
/// silently dropped; its chunks are its result.
#[test]
fn set_output_is_refused_for_a_streaming_handler() {
    let run = one_shot(&fixture("streaming_set_output"), r#"{"k": 1}"#);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(
        run.json_lines(),
        [
            json!({"output": {"set_output": INVALID_STATE}}),
            json!({"output": []})
        ]
    );
}

/// `teardown` runs once after a successful `init`, in both isolations, and never after a failed
/// `init` or an `inspect` (which runs no `init`).
#[test]
fn teardown_runs_only_after_a_successful_init() {
    let library = fixture("teardown_trace");
    for isolation in ["runner", "none"] {
        let run = |args: &[&str]| {
            Run::of(
                worker_host()
                    .arg("--handler")
                    .arg(&library)
                    .args(["--isolation", isolation])
                    .args(args),
            )
        };
        let served = run(&["--test_input", r#"{"input": 1}"#]);
        assert_eq!(served.code, Some(0), "{}", served.stderr);
        assert_eq!(
            served.stderr.matches("teardown ran").count(),
            1,
            "{}",
            served.stderr
        );
        let failed = run(&[
            "--handler-config",
            r#"{"fail": true}"#,
            "--test_input",
            r#"{"input": 1}"#,
        ]);
        assert_eq!(failed.code, Some(8), "{}", failed.stderr);
        assert!(
            !failed.stderr.contains("teardown ran"),
            "{isolation}: {}",
            failed.stderr
        );
        let inspected = run(&["inspect"]);
        assert_eq!(inspected.code, Some(0), "{}", inspected.stderr);
        assert!(
            !inspected.stderr.contains("teardown ran"),
            "{isolation}: {}",
            inspected.stderr
        );
    }
}
