//! Load-balancing mode (`worker-host --load-balancing`), end to end: the real binary and real
//! handler libraries, driven over real HTTP on loopback as RunPod's load balancer and a user's
//! client would drive it.
//!
//! Covered: the health codes across a slow `init` (204, then 200) and at shutdown (503); JSON,
//! query-only and non-JSON requests; what the handler sees of the request; handler failures;
//! body limits; streaming as Server-Sent Events and NDJSON, chunks arriving before the job ends,
//! and a failure mid-stream; 429 with Retry-After when every slot and waiting place is taken; a
//! client that disconnects cancels its job; SIGTERM lets a running job finish; the API key; a
//! crashing handler fails its request and the next one is served; `/metrics` counts the jobs.
//!
//! No assertion is about how long something took; waits poll with generous deadlines.

use e2e::load_balancing::LoadBalancer;
use e2e::Sample;
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

/// How long a test waits for something that normally happens at once.
const WAIT: Duration = Duration::from_secs(30);
/// How often a wait re-checks.
const POLL: Duration = Duration::from_millis(20);

fn client() -> Client {
    Client::builder()
        .timeout(WAIT)
        .build()
        .expect("a client can be built")
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`WAIT`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// The value of one sample in the `/metrics` text (`name{labels} value`), 0 when absent.
fn metric(server: &LoadBalancer, sample: &str) -> f64 {
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .and_then(|response| response.text())
        .expect("/metrics answers");
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The health check answers 204 while `init` runs and 200 once it is done; a request sent during
/// `init` waits for it and is then answered.
#[test]
fn health_is_204_during_init_then_200_and_early_requests_wait() {
    let server = LoadBalancer::start(
        Sample::Faulty,
        &["--handler-config", r#"{"init_sleep_ms": 1500}"#],
    );
    let http = client();
    let during = http.get(server.url("/ping")).send().expect("/ping answers");
    assert_eq!(
        during.status(),
        StatusCode::NO_CONTENT,
        "{}",
        server.stderr()
    );
    let early = {
        let url = server.url("/early");
        std::thread::spawn(move || {
            client()
                .post(url)
                .json(&json!({"hello": "early"}))
                .send()
                .expect("the early request is answered")
        })
    };
    wait_for("the health check to turn 200", || {
        let status = http.get(server.url("/ping")).send().ok()?.status();
        assert!(
            status == StatusCode::NO_CONTENT || status == StatusCode::OK,
            "unexpected health status {status}"
        );
        (status == StatusCode::OK).then_some(())
    });
    let early = early.join().expect("the request thread ends");
    assert_eq!(early.status(), StatusCode::OK);
    assert_eq!(early.json::<Value>().unwrap(), json!({"hello": "early"}));
}

/// A JSON body is the job's input and the handler's output is the body, unwrapped; the job
/// id is the request's X-Request-ID; the handler sees the method, path, query and headers, but
/// never the caller's Authorization.
#[test]
fn a_json_request_is_one_job_answered_with_the_output() {
    let server = LoadBalancer::start(Sample::Faulty, &[]);
    let client = client();
    let answer = client
        .post(server.url("/v1/things?verbose=1"))
        .header("X-Request-ID", "req-42")
        .header("Authorization", "Bearer caller-secret")
        .header("X-Custom", "yes")
        .json(&json!({"mode": "job", "n": [1, 2, 3]}))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["x-request-id"], "req-42");
    assert_eq!(answer.headers()["content-type"], "application/json");
    let job: Value = answer.json().unwrap();
    assert_eq!(job["id"], "req-42");
    assert_eq!(job["input"], json!({"mode": "job", "n": [1, 2, 3]}));
    assert_eq!(job["http"]["method"], "POST");
    assert_eq!(job["http"]["path"], "/v1/things");
    assert_eq!(job["http"]["query"], "verbose=1");
    assert_eq!(job["http"]["headers"]["x-custom"], "yes");
    assert!(
        job["http"]["headers"].get("authorization").is_none(),
        "{job}"
    );
    assert!(!job.to_string().contains("caller-secret"));

    // Any JSON value is an input, and the output comes back exactly.
    let echoed = client
        .put(server.url("/anything"))
        .body("[1, \"two\", null]")
        .send()
        .unwrap();
    assert_eq!(echoed.status(), StatusCode::OK);
    assert_eq!(echoed.text().unwrap(), "[1, \"two\", null]");
}

/// A request without a body gets its query parameters as the input, as strings.
#[test]
fn a_request_without_a_body_gets_the_query_as_input() {
    let server = LoadBalancer::start(Sample::Echo, &[]);
    let answer = client()
        .get(server.url("/search?q=caf%C3%A9&limit=3"))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        answer.json::<Value>().unwrap(),
        json!({"q": "café", "limit": "3"})
    );
    let fresh_ids: Vec<String> = (0..2)
        .map(|_| {
            client().get(server.url("/")).send().unwrap().headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_ne!(fresh_ids[0], fresh_ids[1], "each request gets its own id");
}

/// Bad requests get JSON errors: a body that is not JSON 400, one over the limit 413; a failed
/// job 500 with the queue worker's error shape; the worker goes on.
#[test]
fn errors_are_json_with_the_right_status() {
    let server = LoadBalancer::start(Sample::Faulty, &["--max-input-bytes", "1000"]);
    let client = client();
    let not_json = client.post(server.url("/")).body("hello").send().unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let error: Value = not_json.json().unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .starts_with("the request body is not JSON"),
        "{error}"
    );

    let big = format!("\"{}\"", "x".repeat(2000));
    let too_big = client.post(server.url("/")).body(big).send().unwrap();
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let error: Value = too_big.json().unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("1000 bytes"),
        "{error}"
    );

    let failed = client
        .post(server.url("/"))
        .json(&json!({"mode": "error", "type": "ValueError", "message": "bad value"}))
        .send()
        .unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = failed.json().unwrap();
    let payload: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(payload["error_type"], "ValueError");
    assert_eq!(payload["error_message"], "bad value");

    let next = client
        .post(server.url("/"))
        .json(&json!({"ok": true}))
        .send()
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    assert_eq!(next.json::<Value>().unwrap(), json!({"ok": true}));
}

/// A handler that crashes fails only its request, with the cause; the next request is served by
/// a fresh runner, and the restart is counted.
#[test]
fn a_crash_fails_its_request_and_the_next_one_is_served() {
    let server = LoadBalancer::start(Sample::Faulty, &[]);
    let client = client();
    let crashed = client
        .post(server.url("/"))
        .json(&json!({"mode": "crash"}))
        .send()
        .unwrap();
    assert_eq!(crashed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = crashed.json().unwrap();
    let payload: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(payload["error_type"], "HandlerCrashed", "{payload}");
    assert!(
        payload["error_message"]
            .as_str()
            .unwrap()
            .contains("SIGSEGV"),
        "{payload}"
    );
    let next = client
        .post(server.url("/"))
        .json(&json!({"after": 1}))
        .send()
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    assert_eq!(
        metric(
            &server,
            "worker_host_runner_restarts_total{reason=\"crashed\"}"
        ),
        1.0
    );
}

/// Reads one line from a streamed answer.
fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("the stream can be read");
    line
}

/// A streaming handler's chunks go out as NDJSON, one per line, each as soon as it is emitted
/// (the first arrives while the job still runs).
#[test]
fn a_streaming_handler_answers_ndjson_as_it_produces() {
    let server = LoadBalancer::start(Sample::Stream, &[]);
    let answer = client()
        .post(server.url("/generate"))
        .json(&json!({"chunks": [{"t": "a"}, {"t": "b"}, {"t": "c"}], "delay_ms": 700}))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["content-type"], "application/x-ndjson");
    let mut reader = BufReader::new(answer);
    assert_eq!(read_line(&mut reader), "{\"t\":\"a\"}\n");
    // The job is still running: two more chunks are 0.7 s apart each.
    assert_eq!(metric(&server, "worker_host_jobs_in_flight"), 1.0);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "{\"t\":\"b\"}\n{\"t\":\"c\"}\n");
    assert_eq!(
        metric(&server, "worker_host_jobs_total{outcome=\"completed\"}"),
        1.0
    );
}

/// With `Accept: text/event-stream` the chunks are Server-Sent Events; a failure mid-stream
/// ends the stream with an error event naming it.
#[test]
fn a_streaming_handler_answers_server_sent_events_and_ends_a_failure_with_an_error_event() {
    let server = LoadBalancer::start(Sample::Stream, &[]);
    let client = client();
    let events = client
        .post(server.url("/"))
        .header("Accept", "text/event-stream")
        .json(&json!({"chunks": [1, [2]]}))
        .send()
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    assert_eq!(events.text().unwrap(), "data: 1\n\ndata: [2]\n\n");

    let failing = client
        .post(server.url("/"))
        .header("Accept", "text/event-stream")
        .json(&json!({"chunks": ["x", "y", "z"], "fail_after": 2}))
        .send()
        .unwrap();
    assert_eq!(failing.status(), StatusCode::OK);
    let text = failing.text().unwrap();
    let (chunks, failure) = text.split_once("event: error\n").expect("an error event");
    assert_eq!(chunks, "data: \"x\"\n\ndata: \"y\"\n\n");
    let data = failure
        .strip_prefix("data: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .expect("one data line");
    let error: Value = serde_json::from_str(data).unwrap();
    let payload: Value = serde_json::from_str(error["error"].as_str().unwrap()).unwrap();
    assert_eq!(payload["error_type"], "StreamFailed");

    // NDJSON ends with an error line instead.
    let lines = client
        .post(server.url("/"))
        .json(&json!({"chunks": ["x", "y"], "fail_after": 1}))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert!(last.get("error").is_some(), "{lines}");
    assert_eq!(lines.lines().next().unwrap(), "\"x\"");
}

/// With every slot and waiting place taken, a request gets 429 with Retry-After at once, and is
/// served again once the slot frees.
#[test]
fn overload_is_429_with_retry_after() {
    let server = LoadBalancer::start(
        Sample::Faulty,
        &["--concurrency", "1", "--max-waiting", "1"],
    );
    let long = |ms: u64| {
        let url = server.url("/");
        std::thread::spawn(move || {
            client()
                .post(url)
                .json(&json!({"mode": "sleep", "ms": ms}))
                .send()
                .unwrap()
                .status()
        })
    };
    let running = long(3000);
    wait_for("the first job to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 1.0).then_some(())
    });
    let waiting = long(10);
    wait_for("the second job to wait", || {
        (metric(&server, "worker_host_jobs_waiting") == 1.0).then_some(())
    });
    let refused = client()
        .post(server.url("/"))
        .json(&json!({"mode": "echo"}))
        .send()
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let error: Value = refused.json().unwrap();
    assert!(error["error"].as_str().unwrap().contains("busy"), "{error}");
    assert_eq!(running.join().unwrap(), StatusCode::OK);
    assert_eq!(waiting.join().unwrap(), StatusCode::OK);
}

/// Sends `POST /` with the JSON `body` on a connection of its own, and returns the connection
/// without reading the answer: dropping it is the client going away.
fn post_and_hold(server: &LoadBalancer, body: &str) -> std::net::TcpStream {
    let address = server.base_url().trim_start_matches("http://").to_owned();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    write!(
        socket,
        "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    socket
}

/// A client that goes away while its job runs cancels the job: the handler sees the cancel,
/// and it is counted as cancelled.
#[test]
fn a_client_that_disconnects_cancels_its_job() {
    let server = LoadBalancer::start(Sample::Faulty, &[]);
    let socket = post_and_hold(&server, r#"{"mode": "sleep", "ms": 20000}"#);
    wait_for("the job to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 1.0).then_some(())
    });
    drop(socket);
    wait_for("the handler to see the cancel", || {
        server.stderr().contains("slept (cancelled)").then_some(())
    });
    wait_for("the cancel to be counted", || {
        (metric(&server, "worker_host_jobs_total{outcome=\"cancelled\"}") == 1.0).then_some(())
    });
}

/// SIGTERM turns the health check to 503 and refuses new requests, while the running job
/// finishes and is answered; then the worker exits 0.
#[test]
fn sigterm_drains_running_jobs_and_refuses_new_ones() {
    let mut server = LoadBalancer::start(Sample::Faulty, &[]);
    let running = {
        let url = server.url("/");
        std::thread::spawn(move || {
            let answer = client()
                .post(url)
                .json(&json!({"mode": "sleep", "ms": 1500}))
                .send()
                .unwrap();
            (answer.status(), answer.json::<Value>().unwrap())
        })
    };
    wait_for("the job to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 1.0).then_some(())
    });
    server.terminate();
    let health = wait_for("the health check to turn 503", || {
        let status = client().get(server.url("/ping")).send().ok()?.status();
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(status)
    });
    assert_eq!(health, StatusCode::SERVICE_UNAVAILABLE);
    let refused = client()
        .post(server.url("/"))
        .json(&json!({"late": true}))
        .send()
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, output) = running.join().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(output, json!({"mode": "sleep", "ms": 1500}));
    assert_eq!(server.wait(WAIT), Some(0), "{}", server.stderr());
}

/// `--api-key` guards every route but the health check.
#[test]
fn the_api_key_guards_jobs_and_metrics_but_not_health() {
    let server = LoadBalancer::start(Sample::Echo, &["--api-key", "sekret"]);
    let client = client();
    // The server listens before init: the health check is 204 until it is done, with no key.
    wait_for("the health check to turn 200 without a key", || {
        (client.get(server.url("/ping")).send().ok()?.status() == StatusCode::OK).then_some(())
    });
    let refused = client.post(server.url("/")).json(&json!(1)).send().unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.json::<Value>().unwrap()["error"].is_string());
    assert_eq!(
        client.get(server.url("/metrics")).send().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let served = client
        .post(server.url("/"))
        .bearer_auth("sekret")
        .json(&json!(1))
        .send()
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

/// The health check can have its own path and port, as $HEALTH_CHECK_PATH and $PORT_HEALTH say.
#[test]
fn the_health_check_moves_to_its_own_path_and_port() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_port = probe.local_addr().unwrap().port();
    drop(probe);
    let server = LoadBalancer::start_library(
        e2e::artifacts().library(Sample::Echo),
        &[],
        &[
            ("PORT_HEALTH", &health_port.to_string()),
            ("HEALTH_CHECK_PATH", "/healthz"),
        ],
    );
    let client = client();
    let health = format!("http://127.0.0.1:{health_port}/healthz");
    wait_for("the health check to be ready", || {
        (client.get(&health).send().ok()?.status() == StatusCode::OK).then_some(())
    });
    // On the main port, /ping is an ordinary route now: a job.
    let job = client.get(server.url("/ping?x=1")).send().unwrap();
    assert_eq!(job.status(), StatusCode::OK);
    assert_eq!(job.json::<Value>().unwrap(), json!({"x": "1"}));
}

/// A client that goes away cancels only its own job, softly: a sibling running on the same runner
/// is never failed by it, even when the gone client's handler ignores the cancel past
/// `--cancel-grace-secs`.
#[test]
fn a_disconnect_never_fails_the_jobs_beside_it() {
    let server = LoadBalancer::start(
        Sample::Faulty,
        &["--concurrency", "2", "--cancel-grace-secs", "0.2"],
    );
    let sibling = {
        let url = server.url("/");
        std::thread::spawn(move || {
            let answer = client()
                .post(url)
                .json(&json!({"mode": "sleep", "ms": 1500, "ignore_cancel": true}))
                .send()
                .unwrap();
            (answer.status(), answer.json::<Value>().unwrap())
        })
    };
    wait_for("the sibling to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 1.0).then_some(())
    });
    let socket = post_and_hold(
        &server,
        r#"{"mode": "sleep", "ms": 1000, "ignore_cancel": true}"#,
    );
    wait_for("both jobs to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 2.0).then_some(())
    });
    drop(socket);
    let (status, output) = sibling.join().unwrap();
    assert_eq!(status, StatusCode::OK, "{output}");
    assert_eq!(output["ms"], 1500);
    assert_eq!(
        metric(
            &server,
            "worker_host_runner_restarts_total{reason=\"hung\"}"
        ),
        0.0
    );
}

/// A handler that never returns, whose client went away, does not hold its slot for good: when
/// a request needs the slot and every running job was given up by its client past
/// `--cancel-grace-secs`, they are stopped hard and their runner is restarted, and the waiting
/// request is served.
#[test]
fn jobs_given_up_by_their_clients_do_not_wedge_the_worker() {
    let server = LoadBalancer::start(
        Sample::Faulty,
        &["--concurrency", "1", "--cancel-grace-secs", "0.3"],
    );
    let socket = post_and_hold(&server, r#"{"mode": "hang"}"#);
    wait_for("the hanging job to run", || {
        (metric(&server, "worker_host_jobs_in_flight") == 1.0).then_some(())
    });
    drop(socket);
    wait_for("the client's going to be counted", || {
        (metric(&server, "worker_host_jobs_total{outcome=\"cancelled\"}") == 1.0).then_some(())
    });
    let answer = client()
        .post(server.url("/"))
        .json(&json!({"after": "the hang"}))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "{}", server.stderr());
    assert_eq!(
        answer.json::<Value>().unwrap(),
        json!({"after": "the hang"})
    );
    assert_eq!(
        metric(
            &server,
            "worker_host_runner_restarts_total{reason=\"hung\"}"
        ),
        1.0
    );
    assert!(
        server
            .stderr()
            .contains("is held by a job whose client went away"),
        "{}",
        server.stderr()
    );
}

/// A client that sends its body slowly (or never) holds a waiting place, never a slot: with the
/// only slot free, the next request is served at once.
#[test]
fn a_slow_body_does_not_hold_a_slot() {
    let server = LoadBalancer::start(Sample::Echo, &["--concurrency", "1"]);
    let address = server.base_url().trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stalled,
        "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Length: 100\r\n\r\n{{"
    )
    .unwrap();
    wait_for("the stalled request to be admitted", || {
        (metric(&server, "worker_host_jobs_waiting") == 1.0).then_some(())
    });
    let served = client()
        .post(server.url("/"))
        .json(&json!({"next": true}))
        .send()
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.json::<Value>().unwrap(), json!({"next": true}));
    drop(stalled);
}

/// Requests held during a failing `init` are answered 503 with the reason, and the host exits
/// 1, as a queue worker whose init failed does.
#[test]
fn requests_held_during_a_failed_init_get_503() {
    let mut server = LoadBalancer::start(
        Sample::Faulty,
        &[
            "--handler-config",
            r#"{"init_sleep_ms": 1000, "fail_init": "no model"}"#,
        ],
    );
    let answer = client()
        .post(server.url("/"))
        .json(&json!(1))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error: Value = answer.json().unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("init failed"),
        "{error}"
    );
    assert_eq!(server.wait(WAIT), Some(1), "{}", server.stderr());
}

/// A health path that would be a route pattern, or the metrics' path, is refused with a sentence.
#[test]
fn a_health_path_that_is_not_a_plain_path_is_refused() {
    for path in ["/{x}", "/metrics", "/a/{*rest", "ping"] {
        let run = e2e::Run::of(
            e2e::worker_host()
                .arg("--handler")
                .arg(e2e::artifacts().library(Sample::Echo))
                .args(["--load-balancing", "--port", "0", "--health-path", path]),
        );
        assert_eq!(run.code, Some(2), "{path}: {}", run.stderr);
        assert!(run.stderr.contains("plain path"), "{path}: {}", run.stderr);
    }
}

/// A client that stops reading a stream does not make the worker hold the whole stream: once
/// 64 MiB of chunks wait for it, the job is cancelled and its stream ends with a `StreamNotRead`
/// failure line. Here the handler would stream about 280 MB; the worker's peak memory stays
/// far below that, and the next request is served.
#[test]
fn a_stream_nobody_reads_is_cancelled_past_64_mib() {
    let server = LoadBalancer::start(Sample::Stream, &[]);
    let chunk = "x".repeat(900_000);
    let answer = client()
        .post(server.url("/generate"))
        .json(&json!({"chunks": [chunk], "repeat": 300}))
        .send()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    // Not read: the handler runs until the unread chunks pass the limit and it is cancelled.
    wait_for("the handler to stop", || {
        (metric(&server, "worker_host_jobs_in_flight") == 0.0).then_some(())
    });
    let mut lines = Vec::new();
    for line in BufReader::new(answer).lines() {
        lines.push(line.expect("the stream can be read"));
    }
    let last: Value = serde_json::from_str(lines.last().expect("a line")).unwrap();
    assert!(
        last.to_string().contains("StreamNotRead"),
        "the stream ends with {last}"
    );
    assert!(
        lines.len() < 300,
        "{} chunks came: the job was not cancelled",
        lines.len() - 1
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 200 * 1024,
        "the worker peaked at {peak_kib} KiB for a stream its client did not read"
    );
    let next = client()
        .post(server.url("/generate"))
        .json(&json!({"chunks": [1]}))
        .send()
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    assert_eq!(next.text().unwrap(), "1\n");
}

/// `--io-threads` sets the threads of the host's async runtime (named `worker-host-io`), which
/// serve every request; the server answers with them.
#[test]
fn io_threads_sets_the_runtime_s_threads() {
    let server = LoadBalancer::start(Sample::Echo, &["--io-threads", "3"]);
    let http = client();
    wait_for("the health check to turn 200", || {
        let status = http.get(server.url("/ping")).send().ok()?.status();
        (status == StatusCode::OK).then_some(())
    });
    let answer = http
        .post(server.url("/echo"))
        .json(&json!({"n": 1}))
        .send()
        .expect("the request is answered");
    assert_eq!(answer.json::<Value>().unwrap(), json!({"n": 1}));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap();
    let runtime_threads = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "worker-host-io")
        .count();
    assert_eq!(runtime_threads, 3, "{}", server.stderr());
}
