//! Reads a server's `/metrics` the way a Prometheus user would: through the official Python
//! client's strict OpenMetrics parser (`tests/python/parse_metrics.py`), so a text it refuses
//! fails the test.

use crate::missing_prerequisite;
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The parsed samples of one `/metrics` text.
#[derive(Debug)]
pub struct Samples(HashMap<String, f64>);

impl Samples {
    /// The value of `name` with exactly these labels; 0 when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sorted: Vec<_> = labels.to_vec();
        sorted.sort();
        let labels: serde_json::Map<String, serde_json::Value> = sorted
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.into()))
            .collect();
        let key = format!("{name}{}", serde_json::Value::Object(labels));
        self.0.get(&key).copied().unwrap_or(0.0)
    }
}

/// Whether `python3` can import `prometheus_client`; when it cannot, the test fails saying what
/// to install (or, where skipping is allowed, prints why `what` is skipped and returns false).
pub fn parser_available(what: &str) -> bool {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    let problem = PROBLEM.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .stdin(Stdio::null())
            .output();
        match output {
            Err(error) => Some(format!("python3 could not be started: {error}")),
            Ok(output) if !output.status.success() => Some(format!(
                "`import prometheus_client` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(_) => None,
        }
    });
    match problem {
        None => true,
        Some(problem) => {
            missing_prerequisite(
                what,
                problem,
                "the README's test command, or `.venv/bin/pip install prometheus_client` with .venv/bin on PATH",
            );
            false
        }
    }
}

/// Parses `text` with the official parser; panics with its message if it refuses the text.
pub fn parse(text: &str) -> Samples {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/parse_metrics.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 could not be started");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .expect("the parser reads its input");
    let output = child.wait_with_output().expect("the parser ends");
    assert!(
        output.status.success(),
        "the Prometheus client refused the metrics: {}\n--- the text ---\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    Samples(serde_json::from_slice(&output.stdout).expect("the parser prints JSON"))
}
