//! The Python bridge (`python-bridge/`) end to end: the real `worker-host` binary loading the
//! bridge, which runs the `handler.py` scripts under `tests/python/bridge/` unchanged.
//!
//! The conformance tests run each script both ways, as `python3 SCRIPT` with runpod-python
//! 1.12.0 and under worker-host with the bridge, against the same stand-in platform, with the
//! harness of `tests/support/conformance.rs`. The rest cover the one-shot run, the dev API
//! driven by the official client, a script that fails while it loads, a segfault in C code,
//! cancellation, a generator's yielded `error` dict, and load-balancing mode (`--load-balancing`)
//! driven over HTTP. Every test needs `python3` with `runpod==1.12.0` (see
//! [`e2e::python_sdk_available`]).

use e2e::conformance::{compare, Host, Scenario, Sdk};
use e2e::dev_api::DevApi;
use e2e::load_balancing::LoadBalancer;
use e2e::platform::{of_route, results_by_id, Platform, Recorded, Route};
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

/// A generator (sync or async) that yields a dict with a truthy `error` fails its job there, as
/// the SDK's does: that dict is not streamed, nor is anything after it, and the job's result is
/// a failure with the error's text (a falsy `error` is a chunk like any other). Not `both_ways`:
/// the SDK's result is `{"error": "<str(value)>"}`, and worker-host's streaming failure always
/// has the SDK's generator-exception shape (`handler: <message> \ntraceback: <type>: <message>`),
/// so the error text is wrapped (README, "Where the bridge differs from the SDK").
#[test]
fn a_generator_that_yields_an_error_fails_its_job() {
    if !ready("the bridge's yielded error test") {
        return;
    }
    for script in [
        "generator_yields_error.py",
        "async_generator_yields_error.py",
    ] {
        let platform = Platform::start();
        let chunks = json!(["a", {"error": "", "kept": 1}, {"error": "stop here ✓"}, "never"]);
        platform.push_job(json!({"id": "ye-1", "input": {"chunks": chunks}}));
        platform.push_job(json!({"id": "ye-2", "input": {"chunks": ["fine"]}}));
        let args = python_bridge::args(&python_bridge::script(script));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _worker = WorkerProcess::start_library(&platform, python_bridge::library(), &args, &[]);
        let requests = platform.wait_for(WAIT, "both results", |requests| {
            results_by_id(requests).len() == 2
        });
        let streamed = |id: &str| -> Vec<Value> {
            of_route(&requests, Route::Stream)
                .into_iter()
                .filter(|r| r.job_id().as_deref() == Some(id))
                .map(Recorded::json)
                .collect()
        };
        assert_eq!(
            streamed("ye-1"),
            vec![
                json!({"output": "a"}),
                json!({"output": {"error": "", "kept": 1}})
            ],
            "{script}"
        );
        let results = results_by_id(&requests);
        assert_eq!(
            results["ye-1"],
            json!({"error": "handler: stop here ✓ \ntraceback: YieldedError: stop here ✓"}),
            "{script}"
        );
        assert_eq!(
            streamed("ye-2"),
            vec![json!({"output": "fine"})],
            "{script}"
        );
        assert_eq!(results["ye-2"], json!({"output": []}), "{script}");
    }
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

/// `worker-host --load-balancing` on a script, with extra arguments.
fn load_balancer(script: &str, args: &[&str]) -> LoadBalancer {
    let mut all = python_bridge::args(&python_bridge::script(script));
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    LoadBalancer::start_library(python_bridge::library(), &all, &[])
}

/// An HTTP client with [`WAIT`] as its timeout (the first request waits for the script's `init`).
fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("a client can be built")
}

/// The body of a load-balancing answer, as JSON.
fn json_body(answer: reqwest::blocking::Response) -> Value {
    let text = answer.text().expect("the body can be read");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("the body is not JSON: {text}"))
}

/// The SDK's error payload inside a failed answer's `{"error": "<payload as JSON text>"}`.
fn error_payload(body: &Value) -> Value {
    let text = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {body}"));
    serde_json::from_str(text).unwrap_or_else(|_| panic!("the error is not a payload: {text}"))
}

/// In load-balancing mode a sync script answers a JSON request with its output as the body (200,
/// not wrapped), sees the request's method and path in `job["http"]`, fails a returned `error`
/// dict and an exception with 500 and the queue worker's error body (the exception's payload
/// with the SDK's `<class '...'>` type and the script's traceback), and serves on after both.
#[test]
fn load_balancing_answers_a_sync_script_with_its_output() {
    if !ready("the bridge's load-balancing test") {
        return;
    }
    let server = load_balancer("sync_handler.py", &[]);
    let http = http();
    let input = json!({"text": "héllo ✓", "n": [1, 2.5, null]});
    let answer = http
        .post(server.url("/v1/echo"))
        .header("X-Request-ID", "lb-1")
        .json(&input)
        .send()
        .expect("the request is answered");
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::OK,
        "{}",
        server.stderr()
    );
    assert_eq!(answer.headers()["content-type"], "application/json");
    assert_eq!(answer.headers()["x-request-id"], "lb-1");
    assert_eq!(json_body(answer), input);

    let refused = http
        .post(server.url("/"))
        .json(&json!({"error": "handler says no", "partial": 1}))
        .send()
        .expect("the request is answered");
    assert_eq!(refused.status(), reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        json_body(refused),
        json!({"output": {"partial": 1}, "error": "handler says no"})
    );

    let raised = http
        .post(server.url("/"))
        .json(&json!({"raise": "boom ✓"}))
        .send()
        .expect("the request is answered");
    assert_eq!(raised.status(), reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    let payload = error_payload(&json_body(raised));
    assert_eq!(payload["error_type"], "<class 'ValueError'>", "{payload}");
    assert_eq!(payload["error_message"], "boom ✓", "{payload}");
    let traceback = payload["error_traceback"].as_str().expect("a traceback");
    let script = python_bridge::script("sync_handler.py");
    assert!(
        traceback.contains(&format!("File \"{}\", line", script.display()))
            && traceback.ends_with("ValueError: boom ✓\n"),
        "{traceback}"
    );

    let after = http
        .put(server.url("/again"))
        .body("[1, \"two\"]")
        .send()
        .expect("the request is answered");
    assert_eq!(after.status(), reqwest::StatusCode::OK);
    assert_eq!(json_body(after), json!([1, "two"]));
    drop(server);

    let server = load_balancer("routes_handler.py", &[]);
    let answer = http
        .post(server.url("/v1/embed?model=small"))
        .json(&json!({"text": "a"}))
        .send()
        .expect("the request is answered");
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::OK,
        "{}",
        server.stderr()
    );
    assert_eq!(
        json_body(answer),
        json!({"route": "POST /v1/embed", "input": {"text": "a"}})
    );
}

/// The lines of an NDJSON answer, each parsed.
fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line:?}")))
        .collect()
}

/// The `data:` of each event of a Server-Sent Events answer, parsed, with its event name when it
/// has one.
fn events(text: &str) -> Vec<(Option<String>, Value)> {
    text.split_terminator("\n\n")
        .map(|event| {
            let mut name = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(value).expect("the data is JSON"));
                } else {
                    panic!("unexpected line {line:?} in {text:?}");
                }
            }
            (name, data.unwrap_or_else(|| panic!("no data in {event:?}")))
        })
        .collect()
}

/// In load-balancing mode a generator script streams its chunks as NDJSON, one per line, or as
/// Server-Sent Events with `Accept: text/event-stream` (its progress updates, which have no place
/// in an HTTP answer, are dropped without breaking it); one that yields nothing answers an empty
/// stream.
#[test]
fn load_balancing_streams_a_generator_script() {
    if !ready("the bridge's load-balancing stream test") {
        return;
    }
    let server = load_balancer("generator_handler.py", &[]);
    let http = http();
    let chunks = json!([{"part": 1}, "two ✓", [3]]);
    let answer = http
        .post(server.url("/generate"))
        .json(&json!({ "chunks": chunks }))
        .send()
        .expect("the request is answered");
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::OK,
        "{}",
        server.stderr()
    );
    assert_eq!(answer.headers()["content-type"], "application/x-ndjson");
    assert_eq!(Value::from(ndjson(&answer.text().unwrap())), chunks);

    let answer = http
        .post(server.url("/generate"))
        .header("Accept", "text/event-stream")
        .json(&json!({ "chunks": chunks }))
        .send()
        .expect("the request is answered");
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let streamed = events(&answer.text().unwrap());
    assert!(
        streamed.iter().all(|(name, _)| name.is_none()),
        "{streamed:?}"
    );
    let data: Vec<Value> = streamed.into_iter().map(|(_, data)| data).collect();
    assert_eq!(Value::from(data), chunks);

    let empty = http
        .post(server.url("/generate"))
        .json(&json!({"chunks": []}))
        .send()
        .expect("the request is answered");
    assert_eq!(empty.status(), reqwest::StatusCode::OK);
    assert_eq!(empty.text().unwrap(), "");
}

/// In load-balancing mode a generator script that raises after its chunks ends the stream with
/// the error (a last `{"error": ...}` line in NDJSON, an `error` event in SSE) holding the SDK's
/// error payload of the exception; one that raises before its first chunk answers a plain 500
/// with that payload.
#[test]
fn load_balancing_ends_a_raising_generator_script_with_its_error() {
    if !ready("the bridge's load-balancing stream failure test") {
        return;
    }
    let server = load_balancer("generator_raises.py", &[]);
    let http = http();
    let check = |payload: &Value, message: &str| {
        assert_eq!(payload["error_type"], "<class 'ValueError'>", "{payload}");
        assert_eq!(payload["error_message"], message, "{payload}");
        let traceback = payload["error_traceback"].as_str().expect("a traceback");
        assert!(
            traceback.ends_with(&format!("ValueError: {message}\n")),
            "{traceback}"
        );
    };
    let input = json!({"chunks": ["a", {"b": 2}], "raise": "mid-stream ✓"});
    let answer = http
        .post(server.url("/"))
        .json(&input)
        .send()
        .expect("the request is answered");
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::OK,
        "{}",
        server.stderr()
    );
    let mut lines = ndjson(&answer.text().unwrap());
    let last = lines.pop().expect("an error line");
    assert_eq!(Value::from(lines), json!(["a", {"b": 2}]));
    check(&error_payload(&last), "mid-stream ✓");

    let answer = http
        .post(server.url("/"))
        .header("Accept", "text/event-stream")
        .json(&input)
        .send()
        .expect("the request is answered");
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    let mut streamed = events(&answer.text().unwrap());
    let (name, last) = streamed.pop().expect("an error event");
    assert_eq!(name.as_deref(), Some("error"));
    check(&error_payload(&last), "mid-stream ✓");
    assert_eq!(streamed, vec![(None, json!("a")), (None, json!({"b": 2}))]);

    let answer = http
        .post(server.url("/"))
        .json(&json!({"chunks": [], "raise": "before any chunk"}))
        .send()
        .expect("the request is answered");
    assert_eq!(answer.status(), reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    check(&error_payload(&json_body(answer)), "before any chunk");
}

/// In load-balancing mode an async script's `concurrency_modifier` (capped by `--concurrency`)
/// serves requests at once: three requests that each wait for the other two all meet.
#[test]
fn load_balancing_serves_an_async_script_concurrently() {
    if !ready("the bridge's load-balancing concurrency test") {
        return;
    }
    let server = load_balancer("concurrent_async.py", &["--concurrency", "8"]);
    let answers: Vec<_> = (0..3)
        .map(|_| {
            let url = server.url("/meet");
            std::thread::spawn(move || {
                let answer = http()
                    .post(url)
                    .json(&json!({"meet": 3}))
                    .send()
                    .expect("the request is answered");
                (answer.status(), json_body(answer))
            })
        })
        .collect();
    for answer in answers {
        let (status, body) = answer.join().expect("the request thread ends");
        assert_eq!(status, reqwest::StatusCode::OK, "{}", server.stderr());
        assert_eq!(body, json!({"met": true}));
    }
}
