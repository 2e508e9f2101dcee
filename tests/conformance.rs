//! Conformance with the official Python worker: runpod-python 1.12.0 (`tests/python/sdk_worker.py`)
//! and `worker-host` on the sample handlers, compared by the harness in
//! `tests/support/conformance.rs` (what is compared and every normalisation are documented there).

use e2e::conformance::{compare, Host, Scenario, Sdk};
use e2e::Sample;
use serde_json::json;

/// Echo: non-ASCII text, extra job keys, an id that needs escaping, non-object inputs and the
/// output keys the SDK interprets (`{}`; truthy, falsy and null `error` and `refresh_worker`)
/// give the same job-done POSTs as the SDK's.
#[test]
fn echo_matches_the_sdk() {
    compare(&Scenario {
        sdk: Sdk::Handler("echo"),
        host: Host::Sample(Sample::Echo),
        jobs: vec![
            json!({
                "id": "e-1",
                "input": {"text": "héllo ✓ 日本", "n": 1, "nested": {"a": [1, 2.5, null, true]}},
                "webhook": "http://example.invalid/hook",
                "policy": {"executionTimeout": 60_000, "ttl": 86_400_000},
                "batchId": "b-1",
                "extra": "e",
            }),
            json!({"id": "c 1/é", "input": "just a string ✓"}),
            json!({"id": "e-3", "input": [1, "two", null]}),
            json!({"id": "e-4", "input": null}),
            json!({"id": "e-5", "input": {}}),
            json!({"id": "e-6", "input": {"error": "handler says no ✓", "partial": 1}}),
            json!({"id": "e-7", "input": {"error": "", "keep": true}}),
            json!({"id": "e-8", "input": {"error": null, "keep": 2}}),
            json!({"id": "e-9", "input": {"refresh_worker": true, "keep": 3}}),
            json!({"id": "e-10", "input": {"refresh_worker": null, "keep": 4}}),
            json!({"id": "e-11", "input": {"error": 0, "refresh_worker": false, "keep": 5}}),
        ],
    });
}

/// Streaming: the chunks go to the stream URL in order, the progress reports to job-done, the
/// final `{"output": []}` with `isStream=true`; the heartbeat lists the job while it runs.
#[test]
fn stream_matches_the_sdk() {
    compare(&Scenario {
        sdk: Sdk::Handler("stream"),
        host: Host::Sample(Sample::Stream),
        jobs: vec![
            json!({"id": "g-1", "input": {"chunks": [{"part": 1}, "two ✓", [3]], "delay_ms": 500}}),
            json!({"id": "g-2", "input": {"chunks": []}}),
        ],
    });
}

/// A handler that raises: the same error payload (type, message, hostname, worker id, version).
#[test]
fn failure_matches_the_sdk() {
    compare(&Scenario {
        sdk: Sdk::Handler("faulty"),
        host: Host::Sample(Sample::Faulty),
        jobs: vec![
            json!({"id": "f-1", "input": {"mode": "error", "type": "ValueError", "message": "boom"}}),
            json!({
                "id": "f-2",
                "input": {"mode": "error", "type": "ValueError", "message": "non-ASCII ✓ \"quoted\"\nsecond line"},
            }),
        ],
    });
}
