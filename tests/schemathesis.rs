//! The OpenAPI descriptions and the servers agree: `schemathesis` (PyPI) runs every check it has
//! against the real binary, with a bounded number of examples and a fixed seed (so a failure
//! replays): the dev API from its own `/openapi.json`, with and without `--api-key`, and the
//! load-balancing server from `worker-host/src/serve/openapi.json`.
//!
//! Needs `schemathesis` on PATH (the README's test command installs it into `.venv`).

use e2e::dev_api::DevApi;
use e2e::load_balancing::LoadBalancer;
use e2e::{missing_prerequisite, Sample};
use std::process::{Command, Stdio};

/// How many examples schemathesis generates per operation and phase.
const MAX_EXAMPLES: &str = "25";
/// The seed, so that a run (and a failure) can be replayed.
const SEED: &str = "20261202";
const KEY: &str = "schemathesis-key";

/// Whether `schemathesis` can run here (or, where skipping is allowed, why `what` is skipped).
fn available(what: &str) -> bool {
    match Command::new("schemathesis")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            missing_prerequisite(
                what,
                &format!(
                    "schemathesis --version failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ),
                "the README's test command, or `.venv/bin/pip install schemathesis` with .venv/bin on PATH",
            );
            false
        }
        Err(error) => {
            missing_prerequisite(
                what,
                &format!("schemathesis could not be started: {error}"),
                "the README's test command, or `.venv/bin/pip install schemathesis` with .venv/bin on PATH",
            );
            false
        }
    }
}

/// Runs schemathesis on `schema` (a URL or a file) against `base_url`; panics with its report
/// when it finds anything.
fn run(schema: &str, base_url: Option<&str>, key: Option<&str>, extra: &[&str]) {
    let workdir = tempfile::tempdir().unwrap();
    let mut command = Command::new("schemathesis");
    command
        .current_dir(workdir.path())
        .args(["run", schema, "--checks", "all", "--no-color"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        .args(extra)
        .stdin(Stdio::null());
    if let Some(url) = base_url {
        command.args(["--url", url]);
    }
    if let Some(key) = key {
        command.args(["-H", &format!("Authorization: Bearer {key}")]);
    }
    let output = command.output().expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found disagreements between {schema} and the server:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// With a key, the dev API answers every generated request as its description says.
#[test]
fn the_dev_api_with_a_key_agrees_with_its_description() {
    if !available("the dev API schemathesis run") {
        return;
    }
    let api = DevApi::start(Sample::Echo, &["--api-key", KEY]);
    run(&api.url("/openapi.json"), None, Some(KEY), &[]);
}

/// Without a key, the description asks for none, and the dev API agrees with it.
#[test]
fn the_dev_api_without_a_key_agrees_with_its_description() {
    if !available("the dev API schemathesis run") {
        return;
    }
    let api = DevApi::start(Sample::Echo, &[]);
    run(&api.url("/openapi.json"), None, None, &[]);
}

/// The load-balancing server agrees with its description. Its job route takes every method (any
/// path and method is a job, by design), so the check that undeclared methods get 405 is left
/// out.
#[test]
fn the_load_balancing_server_agrees_with_its_description() {
    if !available("the load-balancing schemathesis run") {
        return;
    }
    let server = LoadBalancer::start(Sample::Echo, &["--api-key", KEY]);
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../worker-host/src/serve/openapi.json"
    );
    run(
        schema,
        Some(server.base_url()),
        Some(KEY),
        &["--exclude-checks", "unsupported_method"],
    );
}
