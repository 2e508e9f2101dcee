//! The one-shot test run: one job through the handler, the result printed, exit 0 or 1.
//!
//! stdout carries, one JSON line each, exactly the bodies RunPod would receive for the job: each
//! stream chunk as it is emitted (`{"output": chunk}`), each progress report
//! (`{"status": "IN_PROGRESS", "output": ...}`), and last the job-done body. Logs go to stderr.

use crate::config::{OneShot, ResultOptions};
use crate::handler::{CancelToken, Handler, JobEvents};
use crate::job::{
    job_done_body, progress_body, stream_chunk_body, OrderedRawMap, Outcome, RawJson,
};
use serde_json::Value;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// How a one-shot run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The job succeeded (and matched the expected output, if one was given).
    Passed,
    /// The job failed.
    JobFailed,
    /// The job succeeded but its output differs from the expected one; the differences, one per
    /// line.
    OutputMismatch(Vec<String>),
}

/// Prints stream chunks and progress to stdout as they arrive, and keeps the chunks for the
/// final result and the output comparison.
struct StdoutEvents {
    chunks: Mutex<Vec<RawJson>>,
}

impl StdoutEvents {
    fn print(line: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout must not fail the job; the final result is what matters.
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    }
}

impl JobEvents for StdoutEvents {
    fn chunk(&self, chunk: RawJson) {
        Self::print(&stream_chunk_body(&chunk));
        self.chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(chunk);
    }

    fn progress(&self, progress: RawJson) {
        Self::print(&progress_body(&progress));
    }
}

/// Runs the test job on this thread and prints its result.
pub fn run(handler: &dyn Handler, test: &OneShot, options: &ResultOptions) -> Verdict {
    let job = &test.job;
    let span = tracing::info_span!("job", job_id = %job.id());
    let _entered = span.enter();
    tracing::info!("Started.");
    let events = StdoutEvents {
        chunks: Mutex::new(Vec::new()),
    };
    let result = handler.run(job, &events, &CancelToken::new());
    let chunks = events
        .chunks
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let aggregate = options.return_aggregate_stream.then_some(chunks.as_slice());
    // Read for --test_output before the result becomes its body.
    let actual = test
        .expected_output
        .as_ref()
        .map(|_| match &result.outcome {
            Outcome::Output(output) => serde_json::from_str::<serde_json::Value>(output.json()),
            _ => serde_json::to_value(&chunks),
        });
    let body = job_done_body(result, &options.origin, aggregate, options.refresh_worker);
    StdoutEvents::print(&body.text);

    if body.failed {
        tracing::error!(
            "Job {} failed with error: {}",
            job.id(),
            failure_text(&body.text)
        );
        return Verdict::JobFailed;
    }
    tracing::info!("Job {} completed successfully.", job.id());
    let (Some(expected), Some(actual)) = (&test.expected_output, actual) else {
        return Verdict::Passed;
    };
    // The output is valid JSON, but not all JSON fits a `Value`: a number beyond f64 (`1e400`),
    // a lone surrogate escape ("\ud800"), nesting deeper than 128. --test_output was read into a
    // `Value`, so such an output cannot equal it: a mismatch that says why, never a panic.
    let actual = match actual {
        Ok(actual) => actual,
        Err(error) => {
            tracing::error!("The output is valid JSON but cannot be compared: {error}");
            let problem =
                format!("$: the output cannot be compared with the expected one: {error}");
            return Verdict::OutputMismatch(vec![problem]);
        }
    };
    let differences = differences(expected, &actual);
    if differences.is_empty() {
        tracing::info!("The output matches the expected test output.");
        Verdict::Passed
    } else {
        Verdict::OutputMismatch(differences)
    }
}

/// The `error` member of a job-done body, for the log line of a failed job: the string's text,
/// or any other value's JSON as it is (read without a tree, so that an output a `Value` cannot
/// hold still shows its error).
fn failure_text(body: &str) -> String {
    let Ok(members) = OrderedRawMap::parse(body) else {
        return String::new();
    };
    let Some(error) = members.get("error") else {
        return String::new();
    };
    serde_json::from_str::<String>(error.get()).unwrap_or_else(|_| error.get().to_owned())
}

/// The places where `actual` differs from `expected`, as `path: expected X, got Y` lines.
/// Numbers compare by value (`1` equals `1.0`); object key order does not matter.
pub fn differences(expected: &Value, actual: &Value) -> Vec<String> {
    let mut found = Vec::new();
    compare("$", expected, actual, &mut found);
    found
}

fn compare(path: &str, expected: &Value, actual: &Value, found: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => {
            for (key, want_value) in want {
                let child = format!("{path}.{key}");
                match got.get(key) {
                    Some(got_value) => compare(&child, want_value, got_value, found),
                    None => {
                        found.push(format!("{child}: expected {want_value}, but it is missing"))
                    }
                }
            }
            for (key, got_value) in got {
                if !want.contains_key(key) {
                    found.push(format!("{path}.{key}: not expected, got {got_value}"));
                }
            }
        }
        (Value::Array(want), Value::Array(got)) => {
            for (index, (want_value, got_value)) in want.iter().zip(got).enumerate() {
                compare(&format!("{path}[{index}]"), want_value, got_value, found);
            }
            if want.len() != got.len() {
                found.push(format!(
                    "{path}: expected {} items, got {}",
                    want.len(),
                    got.len()
                ));
            }
        }
        (Value::Number(want), Value::Number(got)) if want.as_f64() == got.as_f64() => {}
        _ if expected == actual => {}
        _ => found.push(format!("{path}: expected {expected}, got {actual}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Differences name the path, the expected and the actual value; equal values give none.
    #[test]
    fn differences_are_readable() {
        let expected = json!({"a": 1, "b": [1, 2], "c": "x"});
        assert!(differences(&expected, &json!({"c": "x", "b": [1.0, 2], "a": 1})).is_empty());
        let found = differences(&expected, &json!({"a": 2, "b": [1], "d": true}));
        assert_eq!(
            found,
            vec![
                "$.a: expected 1, got 2",
                "$.b: expected 2 items, got 1",
                "$.c: expected \"x\", but it is missing",
                "$.d: not expected, got true",
            ]
        );
    }
}
