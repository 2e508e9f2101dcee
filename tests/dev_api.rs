//! The local dev API (`worker-host --rp_serve_api`), end to end: the real binary and real handler
//! libraries, driven over real HTTP on loopback as a user's app, curl or the official client
//! would drive it.
//!
//! Each public route is checked for the shapes a user sees (exact key sets and order, status
//! codes, status values) and for its error answers (`{"error": "<sentence naming the problem>"}`):
//! `/run`, `/runsync` (with `?wait=`), `/status`, `/stream`, `/cancel`, `/retry`, `/health`,
//! `/purge-queue`, `/openapi.json`, with and without the `/v2/{endpoint_id}` prefix; handler
//! failures, request validation and body limits, the API key, `policy.executionTimeout` and
//! `policy.ttl`, webhooks and their retries, SIGTERM while a job runs, a port already in use, a
//! failing handler init, and the C handler. The wire contract is the README's "The local dev
//! API" and `worker-host/src/dev_api/openapi.json`.
//!
//! No assertion is about how long something took; waits poll with generous deadlines.

use e2e::dev_api::DevApi;
use e2e::{artifacts, worker_host, Run, Sample};
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{json, Value};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something that normally happens at once.
const WAIT: Duration = Duration::from_secs(30);
/// How often a wait re-checks.
const POLL: Duration = Duration::from_millis(50);
/// The body limits of `/run` and `/runsync`.
const MIB: usize = 1024 * 1024;
/// The status object's keys, in the documented order, for a job that completed with an output.
const COMPLETED_KEYS: [&str; 6] = [
    "delayTime",
    "executionTime",
    "id",
    "output",
    "status",
    "workerId",
];
/// The status object's keys for a job that failed.
const FAILED_KEYS: [&str; 6] = [
    "delayTime",
    "executionTime",
    "id",
    "error",
    "status",
    "workerId",
];

/// One HTTP answer, read whole.
struct Reply {
    code: u16,
    content_type: String,
    text: String,
}

impl Reply {
    /// The body as JSON; `Value::Null` marks a body that is not JSON (the assertions show it).
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The top-level keys of a JSON object body, in the order sent.
    fn keys(&self) -> Vec<String> {
        top_level_keys(&self.text)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.text.chars().take(2000).collect();
        write!(f, "HTTP {} ({}): {shown}", self.code, self.content_type)
    }
}

/// A dev API host and a client for it.
struct Api {
    host: DevApi,
    http: Client,
    /// Sent as `Authorization` with every request, when set.
    key: Option<String>,
}

impl Api {
    fn start(sample: Sample, args: &[&str]) -> Self {
        Self::with(DevApi::start(sample, args))
    }

    fn with(host: DevApi) -> Self {
        let http = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client");
        Self {
            host,
            http,
            key: None,
        }
    }

    /// What an assertion message shows: the answer and the host's stderr.
    fn show(&self, reply: &Reply) -> String {
        format!("{reply}\n--- host stderr ---\n{}", self.host.stderr())
    }

    fn send(&self, request: RequestBuilder) -> Reply {
        let request = match &self.key {
            Some(key) => request.header(AUTHORIZATION, format!("Bearer {key}")),
            None => request,
        };
        self.try_send(request).unwrap_or_else(|error| {
            panic!(
                "the request failed: {error}\n--- host stderr ---\n{}",
                self.host.stderr()
            )
        })
    }

    fn try_send(&self, request: RequestBuilder) -> reqwest::Result<Reply> {
        let response = request.send()?;
        let code = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text()?;
        Ok(Reply {
            code,
            content_type,
            text,
        })
    }

    fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(self.host.url(path)))
    }

    /// POSTs raw body text.
    fn post(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> Reply {
        self.send(self.http.post(self.host.url(path)).body(body))
    }

    fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, body.to_string())
    }

    /// Asserts a 200 JSON answer and returns its body.
    fn ok(&self, reply: &Reply) -> Value {
        assert_eq!(reply.code, 200, "{}", self.show(reply));
        self.json_body(reply)
    }

    /// Asserts a JSON answer with this status code and returns its body.
    fn json_body(&self, reply: &Reply) -> Value {
        assert!(
            reply.content_type.starts_with("application/json"),
            "not JSON: {}",
            self.show(reply)
        );
        let body = reply.json();
        assert!(body.is_object(), "not a JSON object: {}", self.show(reply));
        body
    }

    /// Asserts an error answer `{"error": "..."}` with this status code; returns the sentence.
    fn error(&self, reply: &Reply, code: u16) -> String {
        assert_eq!(reply.code, code, "{}", self.show(reply));
        let body = self.json_body(reply);
        assert_eq!(reply.keys(), ["error"], "{}", self.show(reply));
        let message = body["error"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{}", self.show(reply));
        message
    }

    /// `/run` with this request body; asserts the exact `{"id", "status": "IN_QUEUE"}` answer and
    /// returns the id.
    fn submit(&self, request: &Value) -> String {
        let reply = self.post_json("/run", request);
        let body = self.ok(&reply);
        assert_eq!(reply.keys(), ["id", "status"], "{}", self.show(&reply));
        assert_eq!(body["status"], "IN_QUEUE", "{}", self.show(&reply));
        let id = body["id"].as_str().expect("the id is a string").to_owned();
        assert_uuid(&id);
        id
    }

    /// `/run` of `{"input": input}`.
    fn run(&self, input: Value) -> String {
        self.submit(&json!({ "input": input }))
    }

    /// `/runsync` of `{"input": input}`; returns the status object.
    fn runsync(&self, input: Value) -> Value {
        let reply = self.post_json("/runsync", &json!({ "input": input }));
        self.ok(&reply)
    }

    fn status(&self, id: &str) -> Reply {
        self.get(&format!("/status/{id}"))
    }

    fn health(&self) -> Value {
        self.ok(&self.get("/health"))
    }

    /// Polls `/status/{id}` every 50 ms until `done` holds for the status object; returns it.
    fn wait_for_status(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.status(id);
            let body = reply.json();
            if reply.code == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not become {what} in {timeout:?}; last answer: {}",
                self.show(&reply)
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the job has this status; returns the status object.
    fn wait_for(&self, id: &str, status: &str) -> Value {
        self.wait_for_status(id, status, |body| body["status"] == status, WAIT)
    }

    /// Polls `/health` until `done` holds; returns it.
    fn wait_for_health(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let health = self.health();
            if done(&health) {
                return health;
            }
            assert!(
                Instant::now() < deadline,
                "/health never showed {what}; last: {health}\n--- host stderr ---\n{}",
                self.host.stderr()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// The top-level keys of a JSON object text, in order (empty for anything else).
fn top_level_keys(text: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(KeysVisitor)
        }
    }
    struct KeysVisitor;
    impl<'de> Visitor<'de> for KeysVisitor {
        type Value = Keys;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
            Ok(Keys(keys))
        }
    }
    serde_json::from_str::<Keys>(text)
        .map(|keys| keys.0)
        .unwrap_or_default()
}

fn assert_uuid(id: &str) {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert!(
        groups == [8, 4, 4, 4, 12] && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "{id:?} is not a UUID"
    );
}

/// The status object's keys in order, from its JSON text re-serialized by the server.
fn keys_of(api: &Api, path: &str) -> Vec<String> {
    api.get(path).keys()
}

/// The JSON payload inside a FAILED job's `error` string.
fn error_payload(status: &Value) -> Value {
    let text = status["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error is not a string: {status}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("error {text:?} is not JSON: {e}"))
}

/// The frame of [`body_of_size`]'s padded faulty echo job.
const PAD_HEAD: &str = r#"{"input": {"mode": "echo", "pad": ""#;
const PAD_TAIL: &str = r#""}}"#;

/// A `/run` or `/runsync` body of exactly `size` bytes: a faulty echo job with a padding string.
fn body_of_size(size: usize) -> String {
    let body = format!("{PAD_HEAD}{}{PAD_TAIL}", "x".repeat(pad_len(size)));
    assert_eq!(body.len(), size);
    body
}

/// The padding's length in a [`body_of_size`] body.
fn pad_len(size: usize) -> usize {
    size - PAD_HEAD.len() - PAD_TAIL.len()
}

// ---------------------------------------------------------------------------------------------
// /run, /status, /runsync
// ---------------------------------------------------------------------------------------------

/// `/run` answers exactly `{"id", "status": "IN_QUEUE"}`; `/status` (GET and POST, with and
/// without the `/v2/{endpoint_id}` prefix) then reaches COMPLETED with the full status object,
/// keys in the documented order, the output equal to the input.
#[test]
fn run_then_status_reaches_completed_on_every_path_form() {
    let api = Api::start(Sample::Echo, &[]);
    let input = json!({"prompt": "héllo ✓", "n": [1, 2.5, null], "nested": {"a": true}});
    let id = api.run(input.clone());

    let done = api.wait_for(&id, "COMPLETED");
    let reply = api.status(&id);
    assert_eq!(reply.keys(), COMPLETED_KEYS, "{}", api.show(&reply));
    assert_eq!(done["id"], id.as_str());
    assert_eq!(done["output"], input, "{}", api.show(&reply));
    assert!(done["delayTime"].is_u64(), "{}", api.show(&reply));
    assert!(done["executionTime"].is_u64(), "{}", api.show(&reply));
    let worker = done["workerId"].as_str().unwrap_or_default();
    assert!(!worker.is_empty(), "{}", api.show(&reply));

    let url = format!("/status/{id}");
    for path in [url.clone(), format!("/v2/my-endpoint/status/{id}")] {
        let by_get = api.get(&path);
        assert_eq!(api.ok(&by_get), done, "GET {path}: {}", api.show(&by_get));
        let by_post = api.post(&path, "");
        assert_eq!(
            api.ok(&by_post),
            done,
            "POST {path}: {}",
            api.show(&by_post)
        );
    }

    // A job submitted under the prefix is the same store's job.
    let reply = api.post_json("/v2/abc123/run", &json!({"input": {"k": 1}}));
    let body = api.ok(&reply);
    assert_eq!(reply.keys(), ["id", "status"], "{}", api.show(&reply));
    let prefixed = body["id"].as_str().unwrap().to_owned();
    let done = api.wait_for(&prefixed, "COMPLETED");
    assert_eq!(done["output"], json!({"k": 1}));
    assert_eq!(done["workerId"], worker, "one worker runs every job");
}

/// `/runsync` answers the final status object itself, on both path forms; other request keys
/// are accepted and passed through.
#[test]
fn runsync_returns_the_completed_status_object() {
    let api = Api::start(Sample::Echo, &[]);
    for path in ["/runsync", "/v2/ep-1/runsync"] {
        let input = json!({"path": path, "list": [1, 2, 3]});
        let request = json!({"input": input, "s3Config": {"bucket": "b"}, "extra": 1});
        let reply = api.post_json(path, &request);
        let body = api.ok(&reply);
        assert_eq!(reply.keys(), COMPLETED_KEYS, "{}", api.show(&reply));
        assert_eq!(body["status"], "COMPLETED", "{}", api.show(&reply));
        assert_eq!(body["output"], input, "{}", api.show(&reply));
        let id = body["id"].as_str().unwrap();
        assert_uuid(id);
        // The job stays readable through /status.
        assert_eq!(api.ok(&api.status(id)), body);
    }
}

/// `/runsync?wait=1000` on a job that runs 3 s answers the current (unfinished) status object
/// with the id; the job then completes and is read through `/status`. A `wait` that is not a
/// number is a 400 that names it.
#[test]
fn runsync_wait_answers_early_and_the_job_completes_later() {
    let api = Api::start(Sample::Faulty, &[]);
    let input = json!({"mode": "sleep", "ms": 3000});
    let reply = api.post_json("/runsync?wait=1000", &json!({ "input": input }));
    let body = api.ok(&reply);
    let status = body["status"].as_str().unwrap_or_default();
    assert!(
        status == "IN_PROGRESS" || status == "IN_QUEUE",
        "{}",
        api.show(&reply)
    );
    assert!(body.get("output").is_none(), "{}", api.show(&reply));
    let id = body["id"].as_str().expect("an id").to_owned();
    assert_uuid(&id);
    let done = api.wait_for(&id, "COMPLETED");
    assert_eq!(done["output"], input);

    let message = api.error(
        &api.post_json("/runsync?wait=abc", &json!({"input": {"mode": "echo"}})),
        400,
    );
    assert!(
        message.contains("wait") && message.contains("abc"),
        "{message}"
    );
}

/// The C handler answers through `/runsync` like the Rust ones.
#[test]
fn c_handler_works_through_runsync() {
    let api = Api::start(Sample::CEcho, &[]);
    let input = json!({"text": "naïve café ✓", "list": [1, 2, 3]});
    let body = api.runsync(input.clone());
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert_eq!(body["output"], input, "{body}");
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// A handler error, an `{"error": ...}` output, and a panic each end FAILED with `error` a
/// string and no output; a handler returning `{}` ends COMPLETED without an output.
#[test]
fn handler_failures_are_failed_with_the_error_text() {
    let api = Api::start(Sample::Faulty, &[]);

    let reply = api.post_json(
        "/runsync",
        &json!({"input": {"mode": "error", "message": "bad input"}}),
    );
    let failed = api.ok(&reply);
    assert_eq!(failed["status"], "FAILED", "{}", api.show(&reply));
    assert_eq!(reply.keys(), FAILED_KEYS, "{}", api.show(&reply));
    let payload = error_payload(&failed);
    assert_eq!(payload["error_type"], "ValueError", "{failed}");
    assert_eq!(payload["error_message"], "bad input", "{failed}");

    let typed = api.runsync(json!({"mode": "error", "type": "KeyError", "message": "no key"}));
    assert_eq!(typed["status"], "FAILED", "{typed}");
    assert_eq!(error_payload(&typed)["error_type"], "KeyError", "{typed}");

    let reply = api.post_json(
        "/runsync",
        &json!({"input": {"mode": "error_key", "message": "no GPU today"}}),
    );
    let keyed = api.ok(&reply);
    assert_eq!(keyed["status"], "FAILED", "{}", api.show(&reply));
    assert_eq!(keyed["error"], "no GPU today", "{}", api.show(&reply));
    assert_eq!(reply.keys(), FAILED_KEYS, "{}", api.show(&reply));

    let panicked = api.runsync(json!({"mode": "panic", "message": "boom"}));
    assert_eq!(panicked["status"], "FAILED", "{panicked}");
    assert!(panicked.get("output").is_none(), "{panicked}");
    let payload = error_payload(&panicked);
    assert!(
        payload["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("boom")),
        "{panicked}"
    );

    // The worker survives the panic, and an empty-object output is no output at all.
    let reply = api.post_json("/runsync", &json!({"input": {}}));
    let empty = api.ok(&reply);
    assert_eq!(empty["status"], "COMPLETED", "{}", api.show(&reply));
    assert_eq!(
        reply.keys(),
        ["delayTime", "executionTime", "id", "status", "workerId"],
        "{}",
        api.show(&reply)
    );

    let health = api.health();
    assert_eq!(health["jobs"]["failed"], 4, "{health}");
    assert_eq!(health["jobs"]["completed"], 1, "{health}");
}

// ---------------------------------------------------------------------------------------------
// /stream
// ---------------------------------------------------------------------------------------------

/// Successive `/stream` calls return only the chunks not returned before, in order, each once;
/// the first arrives while the job runs, and `/status` meanwhile shows the progress value.
#[test]
fn stream_returns_each_chunk_once_in_order() {
    let api = Api::start(Sample::Stream, &[]);
    let chunks = vec![
        json!("a"),
        json!({"b": 1}),
        json!(3),
        json!([4, "x"]),
        json!("é ✓"),
    ];
    let id = api.run(json!({"chunks": chunks, "delay_ms": 300}));

    let mut seen: Vec<Value> = Vec::new();
    let mut answers = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = api.get(&format!("/stream/{id}"));
        let body = api.ok(&reply);
        answers += 1;
        assert_eq!(
            reply.keys(),
            ["id", "status", "stream"],
            "{}",
            api.show(&reply)
        );
        assert_eq!(body["id"], id.as_str());
        let stream = body["stream"].as_array().expect("stream is an array");
        if seen.is_empty() && !stream.is_empty() {
            assert_eq!(
                body["status"],
                "IN_PROGRESS",
                "the first chunk comes while the job runs: {}",
                api.show(&reply)
            );
            // The progress posted before each chunk shows in /status while the job runs.
            let progress = api.wait_for_status(
                &id,
                "IN_PROGRESS with a progress output",
                |status| status["status"] == "IN_PROGRESS" && status["output"].is_object(),
                WAIT,
            );
            let keys: Vec<&String> = progress["output"].as_object().unwrap().keys().collect();
            assert_eq!(keys, ["done", "total"], "{progress}");
            assert_eq!(progress["output"]["total"], 5, "{progress}");
            assert!(progress["output"]["done"].is_u64(), "{progress}");
        }
        for item in stream {
            let keys: Vec<&String> = item.as_object().expect("an object").keys().collect();
            assert_eq!(keys, ["output"], "{}", api.show(&reply));
            seen.push(item["output"].clone());
        }
        if body["status"] == "COMPLETED" {
            break;
        }
        assert_eq!(body["status"], "IN_PROGRESS", "{}", api.show(&reply));
        assert!(
            Instant::now() < deadline,
            "the stream never ended: {seen:?}"
        );
    }
    assert_eq!(
        seen, chunks,
        "each chunk once, in order ({answers} answers)"
    );

    // Nothing is returned twice.
    let reply = api.post(&format!("/v2/ep/stream/{id}"), "");
    let body = api.ok(&reply);
    assert_eq!(
        body,
        json!({"id": id, "status": "COMPLETED", "stream": []}),
        "{}",
        api.show(&reply)
    );
}

/// A job of a non-streaming handler streams its final output as one chunk, then nothing.
#[test]
fn stream_of_a_non_streaming_job_is_its_output_once() {
    let api = Api::start(Sample::Echo, &[]);
    let input = json!({"whole": ["output", 1]});
    let id = api.run(input.clone());
    api.wait_for(&id, "COMPLETED");
    let first = api.ok(&api.get(&format!("/stream/{id}")));
    assert_eq!(
        first,
        json!({"id": id, "status": "COMPLETED", "stream": [{"output": input}]})
    );
    let second = api.ok(&api.get(&format!("/stream/{id}")));
    assert_eq!(
        second,
        json!({"id": id, "status": "COMPLETED", "stream": []})
    );
    api.error(&api.get("/stream/no-such-job"), 404);
}

// ---------------------------------------------------------------------------------------------
// /cancel
// ---------------------------------------------------------------------------------------------

/// Cancelling a running job answers `{"id", "status": "CANCELLED"}`, the job stays CANCELLED
/// (the handler's late result is ignored), and the worker is free for the next job.
#[test]
fn cancel_stops_a_running_job_and_frees_the_worker() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let id = api.run(json!({"mode": "sleep", "ms": 60000}));
    api.wait_for(&id, "IN_PROGRESS");

    let reply = api.post(&format!("/cancel/{id}"), "");
    assert_eq!(
        api.ok(&reply),
        json!({"id": id, "status": "CANCELLED"}),
        "{}",
        api.show(&reply)
    );
    assert_eq!(reply.keys(), ["id", "status"]);

    // The worker is free again: the next job runs to completion.
    let reply = api.post_json("/runsync?wait=20000", &json!({"input": {"mode": "echo"}}));
    assert_eq!(
        api.ok(&reply)["status"],
        "COMPLETED",
        "{}",
        api.show(&reply)
    );

    let cancelled = api.ok(&api.status(&id));
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    assert!(cancelled.get("output").is_none(), "{cancelled}");
    assert!(cancelled.get("error").is_none(), "{cancelled}");
    // Cancelling again changes nothing, and a cancelled job is not retried.
    let again = api.ok(&api.post(&format!("/v2/ep/cancel/{id}"), ""));
    assert_eq!(again, json!({"id": id, "status": "CANCELLED"}));
    let message = api.error(&api.post(&format!("/retry/{id}"), ""), 409);
    assert!(message.contains("CANCELLED"), "{message}");
    let health = api.health();
    assert_eq!(health["jobs"]["failed"], 0, "{health}");
    assert_eq!(health["workers"]["running"], 0, "{health}");
}

/// Cancelling a queued job (behind a busy worker, concurrency 1) ends it at once; it never runs.
/// Cancelling a finished job answers its final status unchanged; an unknown id is a 404.
#[test]
fn cancel_of_queued_finished_and_unknown_jobs() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let busy = api.run(json!({"mode": "sleep", "ms": 1500}));
    api.wait_for(&busy, "IN_PROGRESS");
    let queued = api.run(json!({"mode": "echo", "tag": "never runs"}));
    assert_eq!(api.ok(&api.status(&queued))["status"], "IN_QUEUE");

    let reply = api.post(&format!("/cancel/{queued}"), "");
    assert_eq!(
        api.ok(&reply),
        json!({"id": queued, "status": "CANCELLED"}),
        "{}",
        api.show(&reply)
    );

    api.wait_for(&busy, "COMPLETED");
    let after = api.runsync(json!({"mode": "echo"}));
    assert_eq!(after["status"], "COMPLETED", "{after}");
    // Never started: no delayTime, executionTime or workerId.
    let reply = api.status(&queued);
    assert_eq!(reply.keys(), ["id", "status"], "{}", api.show(&reply));
    assert_eq!(api.ok(&reply)["status"], "CANCELLED");
    assert!(
        !api.host.stderr().contains(&format!("job_id={queued}")),
        "the cancelled job ran:\n{}",
        api.host.stderr()
    );

    // Final jobs keep their status.
    let completed = api.ok(&api.post(&format!("/cancel/{busy}"), ""));
    assert_eq!(completed, json!({"id": busy, "status": "COMPLETED"}));
    assert_eq!(api.ok(&api.status(&busy))["status"], "COMPLETED");
    let failed = api.runsync(json!({"mode": "error", "message": "x"}));
    let failed_id = failed["id"].as_str().unwrap();
    let reply = api.post(&format!("/cancel/{failed_id}"), "");
    assert_eq!(api.ok(&reply), json!({"id": failed_id, "status": "FAILED"}));
    assert_eq!(api.ok(&api.status(failed_id)), failed);

    let message = api.error(&api.post("/cancel/no-such-job", ""), 404);
    assert_eq!(message, "request does not exist");
}

// ---------------------------------------------------------------------------------------------
// /retry
// ---------------------------------------------------------------------------------------------

/// A FAILED job is requeued under its id and runs again (failing again); `retried` counts it.
/// A COMPLETED job cannot be retried (400 naming COMPLETED); an unknown id is a 404.
#[test]
fn retry_requeues_failed_jobs_only() {
    let api = Api::start(Sample::Faulty, &[]);
    let id = api.run(json!({"mode": "error", "message": "try again"}));
    let first = api.wait_for(&id, "FAILED");
    assert_eq!(api.health()["jobs"]["retried"], 0);

    let reply = api.post(&format!("/retry/{id}"), "");
    assert_eq!(
        api.ok(&reply),
        json!({"id": id, "status": "IN_QUEUE"}),
        "{}",
        api.show(&reply)
    );
    assert_eq!(reply.keys(), ["id", "status"]);
    let health = api.wait_for_health("the second failure", |h| h["jobs"]["failed"] == 2);
    assert_eq!(health["jobs"]["retried"], 1, "{health}");
    let second = api.wait_for(&id, "FAILED");
    assert_eq!(second["error"], first["error"], "{second}");
    assert_eq!(error_payload(&second)["error_message"], "try again");

    let completed = api.runsync(json!({"mode": "echo"}));
    let completed_id = completed["id"].as_str().unwrap();
    let message = api.error(&api.post(&format!("/retry/{completed_id}"), ""), 409);
    assert!(message.contains("COMPLETED"), "{message}");
    assert_eq!(api.ok(&api.status(completed_id)), completed);

    let message = api.error(&api.post("/v2/ep/retry/no-such-job", ""), 404);
    assert_eq!(message, "request does not exist");
    assert_eq!(api.health()["jobs"]["retried"], 1);
}

// ---------------------------------------------------------------------------------------------
// /health, /purge-queue
// ---------------------------------------------------------------------------------------------

/// A `/health` answer with only the platform's keys (not the extra `handler` key).
fn without_handler(mut health: Value) -> Value {
    if let Some(health) = health.as_object_mut() {
        health.remove("handler");
    }
    health
}

/// `/health` counts finished jobs since start, and queued and running jobs now; the one worker
/// shows as running while a job runs.
#[test]
fn health_counts_jobs_and_the_busy_worker() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let mut health = api.health();
    // Beside the platform's keys, which build serves (see tests/swap.rs).
    let handler = health
        .as_object_mut()
        .and_then(|health| health.remove("handler"))
        .expect("a handler key");
    assert_eq!(handler["name"], "faulty-handler", "{handler}");
    assert_eq!(handler["generation"], 1, "{handler}");
    assert_eq!(
        health,
        json!({
            "jobs": {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0},
            "workers": {"idle": 1, "running": 0}
        })
    );
    api.runsync(json!({"mode": "echo"}));
    api.runsync(json!({"mode": "error", "message": "x"}));

    let busy = api.run(json!({"mode": "sleep", "ms": 60000}));
    api.wait_for(&busy, "IN_PROGRESS");
    let waiting = [api.run(json!({"n": 1})), api.run(json!({"n": 2}))];
    assert_eq!(
        without_handler(api.ok(&api.get("/v2/ep/health"))),
        json!({
            "jobs": {"completed": 1, "failed": 1, "inProgress": 1, "inQueue": 2, "retried": 0},
            "workers": {"idle": 0, "running": 1}
        })
    );

    api.ok(&api.post(&format!("/cancel/{busy}"), ""));
    for id in &waiting {
        api.wait_for(id, "COMPLETED");
    }
    let health = api.wait_for_health("an idle worker", |h| h["workers"]["idle"] == 1);
    assert_eq!(
        without_handler(health),
        json!({
            "jobs": {"completed": 3, "failed": 1, "inProgress": 0, "inQueue": 0, "retried": 0},
            "workers": {"idle": 1, "running": 0}
        })
    );
}

/// A handler that ignores cancellation keeps its slot after its job is cancelled: `/health`
/// shows the worker running (with no job in progress) until the handler returns, then idle, and
/// the worker takes jobs again.
#[test]
fn health_shows_the_worker_running_while_a_cancelled_handler_still_runs() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    // Long enough that a stalled CI machine still checks while it sleeps, short of WAIT.
    let id = api.run(json!({"mode": "sleep", "ms": 12_000, "ignore_cancel": true}));
    api.wait_for(&id, "IN_PROGRESS");
    api.ok(&api.post(&format!("/cancel/{id}"), ""));
    // The handler sleeps on for seconds after the cancel; look for the first of them.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let health = api.health();
        assert_eq!(health["jobs"]["inProgress"], 0, "{health}");
        assert_eq!(
            health["workers"],
            json!({"idle": 0, "running": 1}),
            "the cancelled handler still runs: {health}\n--- host stderr ---\n{}",
            api.host.stderr()
        );
        std::thread::sleep(POLL);
    }
    let health = api.wait_for_health("an idle worker", |h| h["workers"]["idle"] == 1);
    assert_eq!(health["workers"]["running"], 0, "{health}");
    assert_eq!(api.ok(&api.status(&id))["status"], "CANCELLED");
    assert_eq!(api.runsync(json!({"mode": "echo"}))["status"], "COMPLETED");
}

/// A handler's recycle request (which ends a production worker after its job) does not stop the
/// local server: the job completes and later jobs are still served.
#[test]
fn a_recycle_request_does_not_stop_the_dev_api() {
    let api = Api::start(Sample::Faulty, &[]);
    let first = api.runsync(json!({"mode": "recycle"}));
    assert_eq!(first["status"], "COMPLETED", "{first}");
    assert_eq!(first["output"], json!({"mode": "recycle"}));
    let second = api.runsync(json!({"mode": "recycle"}));
    assert_eq!(
        second["status"],
        "COMPLETED",
        "{second}\n--- host stderr ---\n{}",
        api.host.stderr()
    );
}

/// `/purge-queue` forgets the queued jobs only: it answers how many, their ids are unknown
/// afterwards, and the running job still finishes.
#[test]
fn purge_queue_removes_only_queued_jobs() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let running = api.run(json!({"mode": "sleep", "ms": 1500}));
    api.wait_for(&running, "IN_PROGRESS");
    let queued = [api.run(json!({"n": 1})), api.run(json!({"n": 2}))];

    let reply = api.post("/purge-queue", "");
    assert_eq!(
        api.ok(&reply),
        json!({"removed": 2, "status": "completed"}),
        "{}",
        api.show(&reply)
    );
    assert_eq!(reply.keys(), ["removed", "status"]);
    for id in &queued {
        let message = api.error(&api.status(id), 404);
        assert_eq!(message, "request does not exist");
    }
    assert_eq!(api.health()["jobs"]["inQueue"], 0);

    let done = api.wait_for(&running, "COMPLETED");
    assert_eq!(done["output"], json!({"mode": "sleep", "ms": 1500}));
    let again = api.ok(&api.post("/v2/ep/purge-queue", ""));
    assert_eq!(again, json!({"removed": 0, "status": "completed"}));
    assert_eq!(api.health()["jobs"]["completed"], 1);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Unknown jobs are `404 {"error": "request does not exist"}` on every job route; an unknown
/// route is a JSON 404 and a wrong method a JSON 405.
#[test]
fn unknown_jobs_routes_and_methods_are_json_errors() {
    let api = Api::start(Sample::Echo, &[]);
    let unknown = "00000000-0000-0000-0000-000000000000";
    for reply in [
        api.get(&format!("/status/{unknown}")),
        api.post(&format!("/v2/ep/status/{unknown}"), ""),
        api.get(&format!("/stream/{unknown}")),
        api.post(&format!("/cancel/{unknown}"), ""),
        api.post(&format!("/retry/{unknown}"), ""),
    ] {
        assert_eq!(reply.code, 404, "{}", api.show(&reply));
        assert_eq!(
            api.json_body(&reply),
            json!({"error": "request does not exist"})
        );
    }
    for path in ["/nope", "/v2/ep/nope", "/v2/ep/status", "/"] {
        let message = api.error(&api.get(path), 404);
        assert!(message.contains("route"), "{path}: {message}");
    }
    for reply in [
        api.get("/run"),
        api.get("/v2/ep/runsync"),
        api.get("/cancel/x"),
        api.post("/health", ""),
    ] {
        api.error(&reply, 405);
    }
}

/// A path axum cannot decode (a job or endpoint id that is not UTF-8 once percent-decoded) is a
/// JSON 400 like every other error, not axum's plain-text rejection.
#[test]
fn undecodable_paths_are_json_errors() {
    let api = Api::start(Sample::Echo, &[]);
    for reply in [
        api.get("/status/%ff"),
        api.post("/v2/ep/status/%ff", ""),
        api.get("/stream/%ff"),
        api.post("/cancel/%ff", ""),
        api.post("/retry/%ff", ""),
        api.get("/v2/%ff/status/x"),
    ] {
        let message = api.error(&reply, 400);
        assert!(message.contains("path"), "{message}");
    }
}

/// Malformed job requests are refused on `/run` and `/runsync` with a 400 whose sentence names
/// the problem, and nothing is queued.
#[test]
fn malformed_job_requests_are_400_naming_the_problem() {
    let api = Api::start(Sample::Echo, &[]);
    let cases: &[(&str, &[&str])] = &[
        ("this is not json", &["not valid JSON"]),
        ("", &["not valid JSON"]),
        ("[1, 2]", &["not a JSON object"]),
        (r#""input""#, &["not a JSON object"]),
        (r#"{"inputs": {"a": 1}}"#, &[r#"no "input""#]),
        (r#"{"input": null}"#, &["input", "null"]),
        (
            r#"{"input": 1, "webhook": "not a url"}"#,
            &["webhook", "not a url"],
        ),
        (r#"{"input": 1, "webhook": "ftp://host/x"}"#, &["webhook"]),
        (r#"{"input": 1, "webhook": 7}"#, &["webhook"]),
        (r#"{"input": 1, "policy": 3}"#, &["policy"]),
        (
            r#"{"input": 1, "policy": {"executionTimeout": 100}}"#,
            &["policy.executionTimeout", "5000", "100"],
        ),
        (
            r#"{"input": 1, "policy": {"executionTimeout": 604800001}}"#,
            &["policy.executionTimeout", "604800000"],
        ),
        (
            r#"{"input": 1, "policy": {"executionTimeout": 5000.5}}"#,
            &["policy.executionTimeout"],
        ),
        (
            r#"{"input": 1, "policy": {"ttl": "x"}}"#,
            &["policy.ttl", "10000"],
        ),
        (
            r#"{"input": 1, "policy": {"ttl": 9999}}"#,
            &["policy.ttl", "10000"],
        ),
        (
            r#"{"input": 1, "policy": {"lowPriority": "yes"}}"#,
            &["policy.lowPriority"],
        ),
    ];
    for route in ["/run", "/runsync", "/v2/ep/run"] {
        for (body, words) in cases {
            let message = api.error(&api.post(route, *body), 400);
            for word in *words {
                assert!(
                    message.contains(word),
                    "POST {route} {body:?}: {message:?} does not name {word:?}"
                );
            }
        }
    }
    let message = api.error(&api.post("/run", vec![0xff_u8, 0xfe, b'{']), 400);
    assert!(message.contains("UTF-8"), "{message}");
    let health = api.health();
    assert_eq!(health["jobs"]["inQueue"], 0, "{health}");
    assert_eq!(health["jobs"]["completed"], 0, "{health}");

    // The edges of every range are accepted.
    let id = api.submit(&json!({
        "input": {"edge": true},
        "policy": {"executionTimeout": 5000, "ttl": 604800000, "lowPriority": true}
    }));
    api.wait_for(&id, "COMPLETED");
    let id = api.submit(&json!({
        "input": {"edge": true},
        "policy": {"executionTimeout": 604800000, "ttl": 10000, "lowPriority": false}
    }));
    api.wait_for(&id, "COMPLETED");
}

/// `/run` takes bodies up to 10 MiB and `/runsync` up to 20 MiB; one byte more is a JSON 413
/// naming the limit.
#[test]
fn body_size_limits_are_413_with_the_limit() {
    let api = Api::start(Sample::Faulty, &[]);

    let message = api.error(&api.post("/run", body_of_size(10 * MIB + 1)), 413);
    assert!(
        message.contains("10485760") && message.contains("/run"),
        "{message}"
    );
    let id = {
        let reply = api.post("/run", body_of_size(10 * MIB));
        api.ok(&reply)["id"].as_str().unwrap().to_owned()
    };
    assert_eq!(api.wait_for(&id, "COMPLETED")["status"], "COMPLETED");

    let reply = api.post("/runsync", body_of_size(10 * MIB));
    let body = api.ok(&reply);
    assert_eq!(body["status"], "COMPLETED", "{}", api.show(&reply));
    let pad = body["output"]["pad"].as_str().unwrap_or_default();
    assert_eq!(
        pad.len(),
        pad_len(10 * MIB),
        "the output is the whole input"
    );

    let message = api.error(&api.post("/runsync", body_of_size(20 * MIB + 1)), 413);
    assert!(
        message.contains("20971520") && message.contains("/runsync"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// --api-key
// ---------------------------------------------------------------------------------------------

/// With `--api-key`, requests without the key or with a wrong one are JSON 401s; the key works
/// as `Bearer KEY` and raw; `/openapi.json` needs none. WORKER_HOST_API_KEY sets it too.
#[test]
fn api_key_guards_every_route_but_openapi() {
    let api = Api::start(Sample::Echo, &["--api-key", "s3cret"]);
    let health = api.host.url("/health");
    for request in [
        api.http.get(&health),
        api.http.get(&health).header(AUTHORIZATION, "Bearer nope"),
        api.http.get(&health).header(AUTHORIZATION, "s3cre"),
        api.http
            .post(api.host.url("/v2/ep/runsync"))
            .body(r#"{"input": 1}"#),
    ] {
        let reply = api.try_send(request).expect("an answer");
        let message = api.error(&reply, 401);
        assert!(message.contains("API key"), "{message}");
    }
    for value in ["Bearer s3cret", "s3cret", "bearer s3cret"] {
        let reply = api
            .try_send(api.http.get(&health).header(AUTHORIZATION, value))
            .expect("an answer");
        api.ok(&reply);
    }
    for path in ["/openapi.json", "/v2/ep/openapi.json"] {
        let reply = api
            .try_send(api.http.get(api.host.url(path)))
            .expect("an answer");
        let document = api.ok(&reply);
        assert!(
            document["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            api.show(&reply)
        );
    }
    let mut keyed = api;
    keyed.key = Some("s3cret".into());
    let body = keyed.runsync(json!({"k": "v"}));
    assert_eq!(body["output"], json!({"k": "v"}));

    let from_env = Api::with(DevApi::start_with_env(
        Sample::Echo,
        &[],
        &[("WORKER_HOST_API_KEY", "envkey")],
    ));
    from_env.error(&from_env.get("/health"), 401);
    let reply = from_env
        .try_send(
            from_env
                .http
                .get(from_env.host.url("/health"))
                .header(AUTHORIZATION, "Bearer envkey"),
        )
        .expect("an answer");
    from_env.ok(&reply);
}

/// Only the `/openapi.json` route is open without the key: a job route whose id happens to be
/// `openapi.json` is not.
#[test]
fn api_key_exemption_is_the_openapi_route_only() {
    let api = Api::start(Sample::Echo, &["--api-key", "s3cret"]);
    for reply in [
        api.get("/status/openapi.json"),
        api.post("/cancel/openapi.json", ""),
        api.get("/v2/ep/stream/openapi.json"),
    ] {
        api.error(&reply, 401);
    }
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// A job running past `policy.executionTimeout` ends TIMED_OUT, counts as failed, frees the
/// worker, and can be retried.
#[test]
fn execution_timeout_times_out_and_frees_the_worker() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let id = api.submit(&json!({
        "input": {"mode": "sleep", "ms": 60000},
        "policy": {"executionTimeout": 5000}
    }));
    let timed_out = api.wait_for_status(
        &id,
        "TIMED_OUT",
        |s| s["status"] == "TIMED_OUT",
        Duration::from_secs(60),
    );
    assert!(timed_out.get("output").is_none(), "{timed_out}");
    assert_eq!(
        keys_of(&api, &format!("/status/{id}")),
        ["delayTime", "executionTime", "id", "status", "workerId"]
    );

    let reply = api.post_json("/runsync?wait=20000", &json!({"input": {"mode": "echo"}}));
    assert_eq!(
        api.ok(&reply)["status"],
        "COMPLETED",
        "{}",
        api.show(&reply)
    );
    assert_eq!(api.ok(&api.status(&id))["status"], "TIMED_OUT");
    let health = api.health();
    assert_eq!(health["jobs"]["failed"], 1, "{health}");
    assert_eq!(health["jobs"]["completed"], 1, "{health}");

    // A timed-out job may be retried; cancel the rerun rather than wait for it.
    let reply = api.post(&format!("/retry/{id}"), "");
    assert_eq!(api.ok(&reply), json!({"id": id, "status": "IN_QUEUE"}));
    api.wait_for(&id, "IN_PROGRESS");
    let message = api.error(&api.post(&format!("/retry/{id}"), ""), 409);
    assert!(message.contains("IN_PROGRESS"), "{message}");
    api.ok(&api.post(&format!("/cancel/{id}"), ""));
}

/// A job still queued when its `policy.ttl` runs out is forgotten: `/status` turns 404.
#[test]
fn ttl_forgets_a_queued_job() {
    let api = Api::start(Sample::Faulty, &["--concurrency", "1"]);
    let busy = api.run(json!({"mode": "sleep", "ms": 60000}));
    api.wait_for(&busy, "IN_PROGRESS");
    let short = api.submit(&json!({"input": {"mode": "echo"}, "policy": {"ttl": 10000}}));
    assert_eq!(api.ok(&api.status(&short))["status"], "IN_QUEUE");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = api.status(&short);
        if reply.code == 404 {
            assert_eq!(api.error(&reply, 404), "request does not exist");
            break;
        }
        assert_eq!(api.ok(&reply)["status"], "IN_QUEUE", "{}", api.show(&reply));
        assert!(
            Instant::now() < deadline,
            "the job outlived its ttl: {}",
            api.show(&reply)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let health = api.health();
    assert_eq!(health["jobs"]["inQueue"], 0, "{health}");
    assert_eq!(api.ok(&api.status(&busy))["status"], "IN_PROGRESS");
    api.ok(&api.post(&format!("/cancel/{busy}"), ""));
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

/// What a webhook receiver got: the path, the content type and the body of each POST.
type Calls = Arc<Mutex<Vec<(String, String, String)>>>;

/// A tiny HTTP server on its own runtime that records every request and answers `answer`.
struct Hook {
    _runtime: tokio::runtime::Runtime,
    url: String,
    calls: Calls,
}

impl Hook {
    fn start(answer: u16) -> Self {
        Self::start_slow(answer, Duration::ZERO)
    }

    /// A receiver that takes `delay` to answer each request.
    fn start_slow(answer: u16, delay: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("an address");
        let calls: Calls = Arc::default();
        let recorded = calls.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let recorded = recorded.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let content_type = headers
                        .get(CONTENT_TYPE.as_str())
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    recorded
                        .lock()
                        .unwrap()
                        .push((uri.path().to_owned(), content_type, body));
                    axum::http::StatusCode::from_u16(answer).expect("a status code")
                }
            },
        );
        {
            let _context = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            runtime.spawn(async move { axum::serve(listener, app).await });
        }
        Self {
            _runtime: runtime,
            url: format!("http://{address}/hook"),
            calls,
        }
    }

    fn calls(&self) -> Vec<(String, String, String)> {
        self.calls.lock().unwrap().clone()
    }

    /// The job ids of the status objects received, sorted.
    fn job_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .calls()
            .iter()
            .map(|(_, _, body)| {
                let posted: Value = serde_json::from_str(body).expect("the webhook body is JSON");
                posted["id"].as_str().expect("an id").to_owned()
            })
            .collect();
        ids.sort();
        ids
    }

    /// Waits until at least `count` requests arrived; returns them all.
    fn wait_for(&self, api: &Api, count: usize) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let calls = self.calls();
            if calls.len() >= count {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook got {} of {count} calls: {calls:?}\n--- host stderr ---\n{}",
                calls.len(),
                api.host.stderr()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// A job's webhook receives one POST whose JSON body is the final status object, and no more:
/// a 200 is not retried.
#[test]
fn webhook_receives_the_final_status_object() {
    let hook = Hook::start(200);
    // A short retry period, so that a wrong re-post after the 200 would arrive within the wait
    // below.
    let api = Api::start(Sample::Echo, &["--webhook-retry-secs", "0.1"]);
    let input = json!({"to": "webhook"});
    let id = api.submit(&json!({"input": input, "webhook": hook.url}));
    let calls = hook.wait_for(&api, 1);
    let done = api.wait_for(&id, "COMPLETED");
    let (path, content_type, body) = &calls[0];
    assert_eq!(path, "/hook");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let posted: Value = serde_json::from_str(body).expect("the webhook body is JSON");
    assert_eq!(posted, done, "the webhook body is the final status object");
    assert_eq!(posted["id"], id.as_str());
    assert_eq!(posted["status"], "COMPLETED");
    assert_eq!(posted["output"], input);
    assert_eq!(
        top_level_keys(body),
        COMPLETED_KEYS,
        "the status object's key order"
    );
    // One POST only (no retry after a 200): give stray re-posts, 0.1 s apart, ten times that to
    // show.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        hook.calls().len(),
        1,
        "exactly one delivery: {:?}",
        hook.calls()
    );
}

/// A webhook answering 500 gets three attempts in all, `--webhook-retry-secs` apart.
#[test]
fn failing_webhook_gets_three_attempts() {
    let hook = Hook::start(500);
    let api = Api::start(Sample::Faulty, &["--webhook-retry-secs", "0.2"]);
    let id = api.submit(&json!({
        "input": {"mode": "error", "message": "hooked"},
        "webhook": hook.url
    }));
    let calls = hook.wait_for(&api, 3);
    let failed = api.wait_for(&id, "FAILED");
    for (path, _, body) in &calls {
        assert_eq!(path, "/hook");
        let posted: Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(posted, failed);
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        hook.calls().len(),
        3,
        "no fourth attempt: {:?}",
        hook.calls()
    );
}

/// A webhook receiver that accepts connections but never answers: a listener that never
/// accepts, so connections wait in its backlog and no request is ever answered.
fn dead_receiver() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a loopback port");
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    (listener, url)
}

/// More jobs whose webhook never answers than there are webhook slots in all (64): submitted
/// and finished, so their calls are queued or under way. Returns their ids.
fn jobs_with_a_dead_webhook(api: &Api, url: &str) -> Vec<String> {
    let ids: Vec<String> = (0..70)
        .map(|n| api.submit(&json!({"input": {"n": n}, "webhook": url})))
        .collect();
    for id in &ids {
        api.wait_for(id, "COMPLETED");
    }
    ids
}

/// A receiver that never answers slows only the calls to itself: behind more calls to it than
/// there are webhook slots, another job's webhook still arrives promptly (not after the dead
/// receiver's 10 s attempts).
#[test]
fn a_webhook_receiver_that_never_answers_does_not_hold_up_others() {
    let (_dead, dead_url) = dead_receiver();
    let hook = Hook::start(200);
    let api = Api::start(Sample::Echo, &[]);
    jobs_with_a_dead_webhook(&api, &dead_url);

    let id = api.submit(&json!({"input": {"to": "healthy"}, "webhook": hook.url}));
    api.wait_for(&id, "COMPLETED");
    // Generous for a loaded machine, yet short of the dead receiver's 10 s attempt timeout,
    // which is how long a call stuck behind it would wait.
    let deadline = Instant::now() + Duration::from_secs(8);
    while hook.calls().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the healthy webhook did not arrive within 8 s\n--- host stderr ---\n{}",
            api.host.stderr()
        );
        std::thread::sleep(POLL);
    }
    assert_eq!(hook.job_ids(), [id]);
}

/// SIGTERM right after a `/runsync` whose webhook receiver is healthy but slow: the webhooks of
/// finished jobs still queued then (more than one receiver may get at once, behind calls to a
/// receiver that never answers) are all delivered within the 5 s the host gives them at
/// shutdown; the calls still stuck then are abandoned, each logged by job id; the host exits 0.
#[test]
fn webhooks_still_queued_at_shutdown_are_delivered() {
    let (_dead, dead_url) = dead_receiver();
    let hook = Hook::start_slow(200, Duration::from_millis(500));
    let mut api = Api::start(Sample::Echo, &[]);
    let stuck = jobs_with_a_dead_webhook(&api, &dead_url);

    let mut ids: Vec<String> = (0..19)
        .map(|n| api.submit(&json!({"input": {"slow": n}, "webhook": hook.url})))
        .collect();
    let reply = api.post_json(
        "/runsync",
        &json!({"input": {"last": 1}, "webhook": hook.url}),
    );
    let last = api.ok(&reply);
    assert_eq!(last["status"], "COMPLETED", "{}", api.show(&reply));
    ids.push(last["id"].as_str().expect("an id").to_owned());
    api.host.terminate();
    assert_eq!(
        api.host.wait(WAIT),
        Some(0),
        "stderr:\n{}",
        api.host.stderr()
    );

    ids.sort();
    assert_eq!(
        hook.job_ids(),
        ids,
        "every queued webhook was delivered\n--- host stderr ---\n{}",
        api.host.stderr()
    );
    let stderr = api.host.stderr();
    let abandoned: Vec<&str> = stderr.lines().filter(|l| l.contains("abandoned")).collect();
    for id in &stuck {
        assert!(
            abandoned.iter().any(|line| line.contains(id.as_str())),
            "no abandoned webhook logged for {id}; stderr:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Process
// ---------------------------------------------------------------------------------------------

/// While the worker drains after SIGTERM, new jobs and retries are refused with 503 and a JSON
/// reason, and the running job stays readable; the host exits 0 once it is done.
#[test]
fn during_the_drain_new_jobs_are_refused_and_running_ones_stay_readable() {
    let mut api = Api::start(Sample::Faulty, &["--shutdown-grace-secs", "20"]);
    let failed = api.runsync(json!({"mode": "error", "message": "retry me"}));
    let failed = failed["id"].as_str().expect("an id").to_owned();
    let id = api.run(json!({"mode": "sleep", "ms": 3000}));
    api.wait_for(&id, "IN_PROGRESS");
    api.host.terminate();
    let refused = loop {
        let reply = api.post_json("/run", &json!({"input": {"mode": "echo"}}));
        if reply.code != 200 {
            break reply;
        }
        std::thread::sleep(POLL);
    };
    assert_eq!(refused.code, 503, "{}", api.show(&refused));
    let body = api.json_body(&refused);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{}",
        api.show(&refused)
    );
    // A retry is a new run of the job: refused the same way, and the job stays FAILED.
    let message = api.error(&api.post(&format!("/retry/{failed}"), ""), 503);
    assert!(message.contains("shutting down"), "{message}");
    assert_eq!(api.ok(&api.status(&failed))["status"], "FAILED");
    let status = api.get(&format!("/status/{id}"));
    assert_eq!(
        api.ok(&status)["status"],
        "IN_PROGRESS",
        "{}",
        api.show(&status)
    );
    assert_eq!(
        api.host.wait(WAIT),
        Some(0),
        "stderr:\n{}",
        api.host.stderr()
    );
    assert!(
        !api.host
            .stderr()
            .contains("Skipping the handler's teardown"),
        "{}",
        api.host.stderr()
    );
}

/// SIGTERM while a job runs: the host exits 0 once the shutdown grace is over, and the
/// `/runsync` waiting for that job is answered with a FAILED status saying the worker shut down.
#[test]
fn sigterm_while_a_job_runs_exits_0_and_answers_the_waiting_runsync() {
    let mut api = Api::start(Sample::Faulty, &["--shutdown-grace-secs", "2"]);
    let url = api.host.url("/runsync");
    let http = api.http.clone();
    let waiting = std::thread::spawn(move || {
        http.post(url)
            .body(r#"{"input": {"mode": "sleep", "ms": 60000}}"#)
            .send()
            .and_then(|response| Ok((response.status().as_u16(), response.text()?)))
    });
    api.wait_for_health("a running job", |h| h["jobs"]["inProgress"] == 1);
    api.host.terminate();
    let code = api.host.wait(WAIT);
    assert_eq!(code, Some(0), "stderr:\n{}", api.host.stderr());

    let answer = waiting.join().expect("the client thread");
    let (code, text) = answer.unwrap_or_else(|error| {
        panic!(
            "the waiting /runsync got no answer: {error}\n{}",
            api.host.stderr()
        )
    });
    assert_eq!(code, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["status"], "FAILED", "{text}");
    let payload = error_payload(&body);
    assert_eq!(payload["error_type"], "WorkerShutdown", "{text}");
    assert!(
        payload["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("shut down")),
        "{text}"
    );
}

/// A dev API port already in use is a usage error (exit 2) with one stderr line naming it.
#[test]
fn port_in_use_is_exit_2_naming_the_port() {
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a loopback port");
    let port = taken.local_addr().unwrap().port().to_string();
    let run = Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(Sample::Faulty))
            .args(["--rp_serve_api", "--rp_api_port", &port]),
    );
    assert_eq!(run.code, Some(2), "stderr:\n{}", run.stderr);
    let lines: Vec<&str> = run.stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "stderr:\n{}", run.stderr);
    assert!(
        lines[0].contains(&format!("127.0.0.1:{port}")) && lines[0].contains("cannot listen"),
        "{}",
        lines[0]
    );
}

/// A handler whose init fails stops the dev API before it listens, with the handler's message.
#[test]
fn failing_handler_init_exits_with_its_message() {
    let run = Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(Sample::Faulty))
            .args(["--rp_serve_api", "--rp_api_port", "0"])
            .args(["--handler-config", r#"{"fail_init": "no model"}"#]),
    );
    assert_eq!(run.code, Some(8), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("no model"), "stderr:\n{}", run.stderr);
    assert!(
        !run.stderr.contains("Local dev API listening"),
        "stderr:\n{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Below the routers: requests hyper rejects, and connections that stall
// ---------------------------------------------------------------------------------------------

/// The test-only variable that shortens the 30 s header read timeout, in whole seconds.
const HEADER_TIMEOUT_ENV: &str = "WORKER_HOST_DEV_API_HEADER_TIMEOUT_SECS";

/// Opens a connection to the host, with reads that give up after [`WAIT`].
fn raw_connection(api: &Api) -> std::net::TcpStream {
    let address = api
        .host
        .base_url()
        .strip_prefix("http://")
        .expect("an http:// base URL");
    let stream = std::net::TcpStream::connect(address).expect("a connection to the host");
    stream.set_read_timeout(Some(WAIT)).expect("a read timeout");
    stream
}

/// Reads until the server closes the connection; panics if it neither closes it nor sends
/// anything more within [`WAIT`]. A reset after the answer (the server closed with part of the
/// request unread) ends the reading like a close.
fn read_to_close(api: &Api, stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::{ErrorKind, Read};
    let mut received = Vec::new();
    let mut buffer = [0; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return received,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the connection is still open after {WAIT:?}; received so far: {:?}\n\
                     --- host stderr ---\n{}",
                    String::from_utf8_lossy(&received),
                    api.host.stderr()
                )
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_reset) => return received,
        }
    }
}

/// The answer in `received`, one HTTP/1.1 answer read whole.
fn parse_raw_reply(received: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(received);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let code = lines
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let content_type = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Reply {
        code,
        content_type,
        text: body.to_owned(),
    }
}

/// Sends `request` as is on a fresh connection and returns the answer, read until the server
/// closes the connection (as it does after each of these rejections). A write the server cuts
/// short by closing (it answers before reading the whole request) is not an error.
fn raw_exchange(api: &Api, request: &[u8]) -> Reply {
    use std::io::Write;
    let mut stream = raw_connection(api);
    let _ = stream.write_all(request);
    parse_raw_reply(&read_to_close(api, &mut stream))
}

/// A `GET` of `target` with one extra header line (none when empty), asking the server to close
/// the connection after its answer.
fn raw_get(target: &str, extra_header: &str) -> Vec<u8> {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !extra_header.is_empty() {
        request.push_str(extra_header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// A URL over hyper's 65,534-byte limit never reaches the router, and still gets a JSON 414 (a
/// long one under the limit is routed as usual).
#[test]
fn a_100_kb_url_gets_414_json() {
    let api = Api::start(Sample::Echo, &[]);
    let reply = raw_exchange(
        &api,
        &raw_get(&format!("/status/{}", "a".repeat(100_000)), ""),
    );
    let message = api.error(&reply, 414);
    assert!(
        message.contains("URL") && message.contains("65534"),
        "{message}"
    );

    let reply = raw_exchange(
        &api,
        &raw_get(&format!("/status/{}", "a".repeat(20_000)), ""),
    );
    assert_eq!(api.error(&reply, 404), "request does not exist");
}

/// A megabyte of headers, or too many of them, gets a JSON 431 naming the limits.
#[test]
fn oversize_headers_get_431_json() {
    let api = Api::start(Sample::Echo, &[]);
    let big = format!("X-Big: {}", "a".repeat(MIB));
    let message = api.error(&raw_exchange(&api, &raw_get("/health", &big)), 431);
    assert!(message.contains("128 KiB"), "{message}");

    let many: Vec<String> = (0..150).map(|n| format!("X-Header-{n}: {n}")).collect();
    let message = api.error(
        &raw_exchange(&api, &raw_get("/health", &many.join("\r\n"))),
        431,
    );
    assert!(message.contains("100 headers"), "{message}");

    // Headers under the limit are fine.
    let fine = format!("X-Big: {}", "a".repeat(64 * 1024));
    let reply = raw_exchange(&api, &raw_get("/health", &fine));
    assert_eq!(reply.code, 200, "{}", api.show(&reply));
}

/// A request that is not HTTP (a garbled request line, a header line without a colon, an unknown
/// HTTP version) gets a JSON 400, and the host goes on serving.
#[test]
fn a_garbled_request_gets_400_json() {
    let api = Api::start(Sample::Echo, &[]);
    for request in [
        &b"HELLO WORLD\r\n\r\n"[..],
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost localhost\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: localhost\r\n\r\n",
    ] {
        let reply = raw_exchange(&api, request);
        let message = api.error(&reply, 400);
        assert!(message.contains("not valid HTTP"), "{message}");
    }
    api.ok(&api.get("/health"));
}

/// A connection that sends half a request line and stops is closed, with no answer, once the
/// header read timeout (shortened to 1 s here) is over; so is an idle keep-alive connection. A
/// stalled connection does not hold up others.
#[test]
fn a_connection_that_stalls_mid_request_line_is_closed() {
    use std::io::Write;
    let api = Api::with(DevApi::start_with_env(
        Sample::Echo,
        &[],
        &[(HEADER_TIMEOUT_ENV, "1")],
    ));
    let mut stalled = raw_connection(&api);
    stalled.write_all(b"GET /hea").expect("half a request line");
    api.ok(&api.get("/health"));
    let received = read_to_close(&api, &mut stalled);
    assert!(
        received.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&received)
    );

    // Idle after an answer: closed too, the answer delivered whole first.
    let mut idle = raw_connection(&api);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("a request");
    let reply = parse_raw_reply(&read_to_close(&api, &mut idle));
    api.ok(&reply);
}
