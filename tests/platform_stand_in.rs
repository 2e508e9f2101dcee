//! The stand-in RunPod platform on its own, driven with plain HTTP/1.1 requests over
//! `std::net::TcpStream`, so the end-to-end tests can trust what it answers and records.

use e2e::platform::{of_route, Fault, Platform, Route};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long a test request may take before the test gives up on the stand-in.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// One parsed HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    /// The first value of a header, the name compared case-insensitively.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends one request with `Connection: close` and returns every byte the server sent back
/// (none when the connection was closed or reset without an answer).
fn exchange(
    platform: &Platform,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let base = platform.base_url();
    let address = base.strip_prefix("http://").expect("an http base URL");
    let mut stream = TcpStream::connect(address).expect("the stand-in accepts connections");
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("a read timeout can be set");
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .expect("the request could be sent");

    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer to {method} {target} failed: {e}"),
    }
    received
}

/// Sends one request and parses the answer.
fn send(
    platform: &Platform,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let received = exchange(platform, method, target, headers, body);
    let text = String::from_utf8(received).expect("the answer is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete HTTP head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_owned(), value.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A GET without extra headers.
fn get(platform: &Platform, target: &str) -> Reply {
    send(platform, "GET", target, &[], "")
}

const TAKE: &str = "/v2/ep/job-take/wk1?gpu=test&job_in_progress=0";
const STOP: &str = "/v2/ep/job-stop/wk1?gpu=test";
const PING: &str = "/v2/ep/ping/wk1?gpu=test&runpod_version=0.1.0";

/// A pushed job comes back from job-take as a JSON object, once.
#[test]
fn pushed_job_comes_back_from_take_as_an_object() {
    let platform = Platform::start();
    platform.set_hold(Duration::from_millis(20));
    let job = json!({"id": "j1", "input": {"a": 1}, "extra": "e"});
    platform.push_job(job.clone());

    let reply = get(&platform, TAKE);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), job);
    assert_eq!(platform.pending_jobs(), 0);

    assert_eq!(get(&platform, TAKE).status, 204);
    let statuses: Vec<u16> = platform.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 204]);
}

/// job-take-batch answers up to batch_size jobs as an array, in push order.
#[test]
fn batch_take_returns_up_to_batch_size() {
    let platform = Platform::start();
    for id in ["b1", "b2", "b3"] {
        platform.push_job(json!({"id": id, "input": null}));
    }
    let batch = "/v2/ep/job-take-batch/wk1?gpu=test&batch_size=2&job_in_progress=0";
    let first = get(&platform, batch);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(
        first.json(),
        json!([{"id": "b1", "input": null}, {"id": "b2", "input": null}])
    );
    let rest = get(&platform, batch);
    assert_eq!(rest.json(), json!([{"id": "b3", "input": null}]));

    let requests = platform.requests();
    assert!(requests.iter().all(|r| r.route == Route::TakeBatch));
    assert_eq!(requests[0].query_value("batch_size"), Some("2"));
}

/// A raw take is answered verbatim before queued jobs, to single and batch takes alike.
#[test]
fn raw_takes_come_first_and_verbatim() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "j1", "input": 1}));
    platform.push_raw_take(r#"{"id": "no-input"}"#);
    platform.push_raw_take("not json");

    let raw = get(&platform, TAKE);
    assert_eq!(
        (raw.status, raw.body.as_str()),
        (200, r#"{"id": "no-input"}"#)
    );
    let batch = get(
        &platform,
        "/v2/ep/job-take-batch/wk1?gpu=test&batch_size=3&job_in_progress=0",
    );
    assert_eq!((batch.status, batch.body.as_str()), (200, "not json"));
    assert_eq!(batch.header("content-type"), Some("application/json"));
    assert_eq!(get(&platform, TAKE).json(), json!({"id": "j1", "input": 1}));
}

/// An empty take and an empty job-stop are held for about the hold time, then answered 204.
#[test]
fn empty_polls_are_held_then_answered_204() {
    let platform = Platform::start();
    for target in [TAKE, STOP] {
        let start = Instant::now();
        let reply = get(&platform, target);
        let waited = start.elapsed();
        assert_eq!(reply.status, 204, "{target}");
        assert!(reply.body.is_empty());
        assert!(
            waited >= Duration::from_millis(150),
            "{target} answered after {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{target} answered after {waited:?}"
        );
    }
}

/// A job pushed while a take is held answers that take at once, long before the hold ends.
#[test]
fn push_during_the_hold_answers_at_once() {
    let platform = Platform::start();
    platform.set_hold(Duration::from_secs(60));
    std::thread::scope(|scope| {
        let taker = scope.spawn(|| {
            let start = Instant::now();
            (get(&platform, TAKE), start.elapsed())
        });
        // The held take is already recorded, still unanswered.
        platform.wait_for(Duration::from_secs(10), "a held take", |requests| {
            of_route(requests, Route::Take)
                .iter()
                .any(|r| r.status == 0)
        });
        platform.push_job(json!({"id": "late", "input": {}}));
        let (reply, waited) = taker.join().expect("the taker thread");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["id"], "late");
        assert!(
            waited < Duration::from_secs(30),
            "answered after {waited:?}"
        );
    });
    assert_eq!(platform.requests()[0].status, 200);
}

/// Several takes held at once each get a different job when jobs arrive.
#[test]
fn concurrent_held_takes_share_the_jobs() {
    let platform = Platform::start();
    platform.set_hold(Duration::from_secs(60));
    let ids = std::thread::scope(|scope| {
        let takers: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| get(&platform, TAKE)))
            .collect();
        platform.wait_for(Duration::from_secs(10), "three held takes", |requests| {
            of_route(requests, Route::Take).len() == 3
        });
        for id in ["c1", "c2", "c3"] {
            platform.push_job(json!({"id": id, "input": null}));
        }
        let mut ids: Vec<String> = takers
            .into_iter()
            .map(|taker| {
                let reply = taker.join().expect("a taker thread");
                assert_eq!(reply.status, 200);
                reply.json()["id"].as_str().expect("an id").to_owned()
            })
            .collect();
        ids.sort();
        ids
    });
    assert_eq!(ids, ["c1", "c2", "c3"]);
}

/// inject(Status(503), 2) fails exactly the next two requests of that route and no other.
#[test]
fn injected_status_affects_exactly_two_requests() {
    let platform = Platform::start();
    platform.inject(Route::Ping, Fault::Status(503), 2);
    let statuses: Vec<u16> = (0..3).map(|_| get(&platform, PING).status).collect();
    assert_eq!(statuses, [503, 503, 200]);

    let done = send(
        &platform,
        "POST",
        "/v2/ep/job-done/wk1/j1?isStream=false",
        &[],
        "{}",
    );
    assert_eq!(done.status, 200);
    let recorded: Vec<u16> = platform.requests().iter().map(|r| r.status).collect();
    assert_eq!(recorded, [503, 503, 200, 200]);
}

/// The other faults: 429 with Retry-After, a forced JSON body, and a stall before the answer.
#[test]
fn other_faults_answer_as_described() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "j1", "input": 1}));
    platform.inject(Route::Take, Fault::TooManyRequests(Some(7)), 1);
    platform.inject(Route::Take, Fault::TooManyRequests(None), 1);
    platform.inject(Route::Take, Fault::Body("[1, 2]".to_owned()), 1);
    platform.inject(Route::Take, Fault::Stall(Duration::from_millis(300)), 1);

    let limited = get(&platform, TAKE);
    assert_eq!(
        (limited.status, limited.header("retry-after")),
        (429, Some("7"))
    );
    let limited = get(&platform, TAKE);
    assert_eq!((limited.status, limited.header("retry-after")), (429, None));
    let forced = get(&platform, TAKE);
    assert_eq!((forced.status, forced.body.as_str()), (200, "[1, 2]"));
    assert_eq!(forced.header("content-type"), Some("application/json"));

    let start = Instant::now();
    let stalled = get(&platform, TAKE);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(stalled.json()["id"], "j1");
}

/// Fault::Drop closes the connection without a single response byte; the next request is normal.
#[test]
fn drop_closes_the_connection_without_an_answer() {
    let platform = Platform::start();
    platform.inject(Route::Done, Fault::Drop, 1);
    let target = "/v2/ep/job-done/wk1/j1?gpu=test&isStream=false";
    let received = exchange(&platform, "POST", target, &[], r#"{"output": 1}"#);
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );

    let again = send(&platform, "POST", target, &[], r#"{"output": 1}"#);
    assert_eq!(again.status, 200);
    let requests = platform.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [0, 200]);
    assert_eq!(requests[0].json(), json!({"output": 1}));
}

/// Requests are recorded with their route, raw path, raw and decoded query, lower-case headers and
/// body; a job id with a space, a slash and non-ASCII decodes from the path.
#[test]
fn requests_are_recorded_faithfully() {
    let platform = Platform::start();
    let done = send(
        &platform,
        "POST",
        "/v2/ep/job-done/wk1/c%201/%C3%A9?gpu=test&isStream=false",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-Request-ID", "c 1"),
            ("Authorization", "test-key"),
        ],
        r#"{"output": {"text": "héllo ✓"}}"#,
    );
    assert_eq!((done.status, done.body.as_str()), (200, ""));
    get(
        &platform,
        "/v2/ep/ping/wk1?gpu=test&job_id=c-1%2Cc+2&runpod_version=0.1.0",
    );
    let stream = send(
        &platform,
        "POST",
        "/v2/ep/job-stream/wk1/s-1?gpu=test&isStream=false",
        &[],
        "{}",
    );
    assert_eq!(stream.status, 200);

    let requests = platform.requests();
    let done = &requests[0];
    assert_eq!(done.route, Route::Done);
    assert_eq!(done.method, "POST");
    assert_eq!(done.path, "/v2/ep/job-done/wk1/c%201/%C3%A9");
    assert_eq!(done.raw_query, "gpu=test&isStream=false");
    assert_eq!(done.query_value("isStream"), Some("false"));
    assert_eq!(done.job_id().as_deref(), Some("c 1/é"));
    assert_eq!(done.header("X-Request-Id"), Some("c 1"));
    assert!(done
        .headers
        .iter()
        .any(|(name, value)| name == "x-request-id" && value == "c 1"));
    assert!(done
        .headers
        .iter()
        .all(|(name, _)| *name == name.to_lowercase()));
    assert_eq!(done.json(), json!({"output": {"text": "héllo ✓"}}));
    assert_eq!(done.status, 200);

    let ping = &requests[1];
    assert_eq!(ping.route, Route::Ping);
    assert_eq!(ping.job_id(), None);
    assert_eq!(
        ping.query,
        [
            ("gpu".to_owned(), "test".to_owned()),
            ("job_id".to_owned(), "c-1,c 2".to_owned()),
            ("runpod_version".to_owned(), "0.1.0".to_owned()),
        ]
    );
    assert_eq!(requests[2].route, Route::Stream);
    assert_eq!(requests[2].job_id().as_deref(), Some("s-1"));
}

/// A broken URL, a wrong method or an unsubstituted placeholder is Route::Other, answered 404.
#[test]
fn malformed_requests_are_other_and_404() {
    let platform = Platform::start();
    for (method, target) in [
        ("GET", "/v2/ep/job-take/wk1&job_in_progress=0"),
        (
            "GET",
            "/v2/ep/job-take/$RUNPOD_POD_ID?gpu=test&job_in_progress=0",
        ),
        ("POST", "/v2/ep/job-take/wk1?gpu=test"),
        ("GET", "/v2/ep/job-done/wk1/j1?isStream=false"),
        ("POST", "/v2/ep/job-done/wk1?isStream=false"),
        ("GET", "/health"),
    ] {
        assert_eq!(
            send(&platform, method, target, &[], "").status,
            404,
            "{method} {target}"
        );
    }
    assert!(platform.requests().iter().all(|r| r.route == Route::Other));
}

/// A stopped job id shows up in the next job-stop poll, once.
#[test]
fn stop_job_shows_up_in_job_stop_once() {
    let platform = Platform::start();
    platform.set_hold(Duration::from_millis(20));
    platform.stop_job("j9");
    platform.stop_job("j10");
    let reply = get(&platform, STOP);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), json!({"jobsToStop": ["j9", "j10"]}));
    assert_eq!(get(&platform, STOP).status, 204);
    assert!(platform.requests().iter().all(|r| r.route == Route::Stop));
}

/// wait_for returns as soon as its predicate holds, with the requests it held for.
#[test]
fn wait_for_returns_once_the_predicate_holds() {
    let platform = Platform::start();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..3 {
                get(&platform, PING);
            }
        });
        let requests = platform.wait_for(Duration::from_secs(10), "three pings", |requests| {
            of_route(requests, Route::Ping)
                .iter()
                .filter(|r| r.status == 200)
                .count()
                == 3
        });
        assert_eq!(of_route(&requests, Route::Ping).len(), 3);
    });
}

/// wait_for panics on timeout, naming what it waited for and listing the requests.
#[test]
#[should_panic(expected = "a job-done POST; requests so far:\n  +")]
fn wait_for_panics_with_a_dump_on_timeout() {
    let platform = Platform::start();
    get(&platform, PING);
    platform.wait_for(Duration::from_millis(100), "a job-done POST", |requests| {
        !of_route(requests, Route::Done).is_empty()
    });
}

/// worker_env points every URL template at the stand-in, as the platform writes them.
#[test]
fn worker_env_points_at_the_stand_in() {
    let platform = Platform::start();
    let base = platform.base_url();
    let env = platform.worker_env();
    let value = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("{name} is missing"))
    };
    assert_eq!(
        value("RUNPOD_WEBHOOK_GET_JOB"),
        format!("{base}/v2/ep/job-take/$ID?gpu=test")
    );
    assert_eq!(
        value("RUNPOD_WEBHOOK_POST_OUTPUT"),
        format!("{base}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=test")
    );
    assert_eq!(
        value("RUNPOD_WEBHOOK_POST_STREAM"),
        format!("{base}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=test")
    );
    assert_eq!(
        value("RUNPOD_WEBHOOK_PING"),
        format!("{base}/v2/ep/ping/$RUNPOD_POD_ID?gpu=test")
    );
    assert_eq!(value("RUNPOD_POD_ID"), "wk1");
    assert_eq!(value("RUNPOD_AI_API_KEY"), "test-key");
    assert_eq!(value("RUNPOD_PING_INTERVAL"), "500");
}
