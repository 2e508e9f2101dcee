//! `/metrics` and readiness in every mode, end to end: the queue worker's `--metrics-port`, the
//! dev API and the load-balancing server, each read through the official Prometheus Python
//! client's strict OpenMetrics parser, with counters that match the jobs run; the dev API's
//! `/ping` across a slow `init`.
//!
//! No assertion is about how long something took; waits poll with generous deadlines.

use e2e::load_balancing::LoadBalancer;
use e2e::metrics::{parse, parser_available, Samples};
use e2e::platform::{results_by_id, Platform, Route};
use e2e::{Sample, WorkerProcess};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

fn client() -> Client {
    Client::builder().timeout(WAIT).build().unwrap()
}

fn scrape(url: &str) -> Samples {
    let answer = client().get(url).send().expect("/metrics answers");
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        answer.headers()
    );
    parse(&answer.text().unwrap())
}

/// Polls until `check` holds, or panics with `what`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// The queue worker serves `/metrics` on `--metrics-port` (loopback by default), and its counters
/// match the jobs it ran: completed and failed jobs, takes, result posts, the duration
/// histogram, the concurrency, init's duration and the handler serving.
#[test]
fn the_queue_worker_counts_its_jobs_on_the_metrics_port() {
    if !parser_available("the queue worker's metrics test") {
        return;
    }
    let platform = Platform::start();
    for n in 0..3 {
        platform.push_job(json!({"id": format!("ok-{n}"), "input": {"n": n}}));
    }
    platform.push_job(json!({"id": "bad", "input": {"mode": "error", "message": "no"}}));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &["--metrics-port", "0", "--concurrency", "2"],
        &[],
    );
    let requests = platform.wait_for(WAIT, "four results", |requests| {
        results_by_id(requests).len() >= 4
    });
    assert!(requests.iter().any(|r| r.route == Route::Done));
    let mut url = None;
    wait_until("the metrics address in the log", || {
        url = worker
            .stderr()
            .lines()
            .find_map(|line| Some(line.split("Metrics on ").nth(1)?.trim().to_owned()));
        url.is_some()
    });
    let url = url.unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut samples = scrape(&url);
    // The last result may be counted just after the platform saw it.
    wait_until("every job to be counted", || {
        samples = scrape(&url);
        samples.value("worker_host_jobs_total", &[("outcome", "completed")])
            + samples.value("worker_host_jobs_total", &[("outcome", "failed")])
            == 4.0
    });
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "completed")]),
        3.0
    );
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "failed")]),
        1.0
    );
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "cancelled")]),
        0.0
    );
    assert_eq!(
        samples.value("worker_host_job_duration_seconds_count", &[]),
        4.0
    );
    assert!(samples.value("worker_host_take_requests_total", &[("result", "jobs")]) >= 1.0);
    assert!(samples.value("worker_host_result_posts_total", &[("result", "delivered")]) >= 4.0);
    assert_eq!(samples.value("worker_host_jobs_in_flight", &[]), 0.0);
    assert_eq!(samples.value("worker_host_concurrency", &[]), 2.0);
    assert!(samples.value("worker_host_init_duration_seconds", &[]) > 0.0);
    assert_eq!(
        samples.value(
            "worker_host_handler_info",
            &[
                ("name", "faulty-handler"),
                ("version", "0.1.0"),
                ("abi", "1.1")
            ]
        ),
        1.0
    );
}

/// The dev API answers `/ping` 204 while the handler's `init` runs and 200 once it is ready, a
/// job submitted meanwhile runs once `init` is done, and its `/metrics` counts it.
#[test]
fn the_dev_api_is_204_during_init_then_ready_and_counts_jobs() {
    if !parser_available("the dev API's metrics test") {
        return;
    }
    // The dev API announces itself once init is done; to see it during init, it gets a port
    // known in advance (one found free).
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut slow = e2e::worker_host();
    slow.arg("--handler")
        .arg(e2e::artifacts().library(Sample::Faulty))
        .args(["--rp_serve_api", "--rp_api_port", &port.to_string()])
        .args(["--handler-config", r#"{"init_sleep_ms": 2000}"#])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut slow = KillOnDrop(slow.spawn().unwrap());
    let ping = format!("http://127.0.0.1:{port}/ping");
    let mut first = None;
    wait_until("the slow dev API to listen", || {
        first = client()
            .get(&ping)
            .send()
            .ok()
            .map(|answer| answer.status());
        first.is_some()
    });
    assert_eq!(first, Some(StatusCode::NO_CONTENT), "init has 2 s to go");
    let runsync = {
        let url = format!("http://127.0.0.1:{port}/runsync");
        std::thread::spawn(move || {
            client()
                .post(url)
                .json(&json!({"input": {"during": "init"}}))
                .send()
                .unwrap()
                .json::<serde_json::Value>()
                .unwrap()
        })
    };
    wait_until("/ping to turn 200", || {
        client()
            .get(&ping)
            .send()
            .is_ok_and(|answer| answer.status() == StatusCode::OK)
    });
    let answer = runsync.join().unwrap();
    assert_eq!(answer["status"], "COMPLETED", "{answer}");
    assert_eq!(answer["output"], json!({"during": "init"}));
    let samples = scrape(&format!("http://127.0.0.1:{port}/metrics"));
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "completed")]),
        1.0
    );
    assert!(samples.value("worker_host_init_duration_seconds", &[]) >= 2.0);
    slow.0.kill().ok();
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The load-balancing server's `/metrics` counts completed, failed and waiting jobs, and the
/// requests it refused without running a job, and parses; each job's end is logged.
#[test]
fn the_load_balancing_server_counts_its_jobs() {
    if !parser_available("the load-balancing metrics test") {
        return;
    }
    let server = LoadBalancer::start(
        Sample::Faulty,
        &["--concurrency", "3", "--max-input-bytes", "1000"],
    );
    let client = client();
    for n in 0..5 {
        let answer = client
            .post(server.url("/"))
            .json(&json!({"n": n}))
            .send()
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
    }
    let failed = client
        .post(server.url("/"))
        .json(&json!({"mode": "error", "message": "no"}))
        .send()
        .unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let not_json = client
        .post(server.url("/"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    for _ in 0..2 {
        let too_large = client
            .post(server.url("/"))
            .json(&json!({"prompt": "x".repeat(2000)}))
            .send()
            .unwrap();
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let samples = scrape(&server.url("/metrics"));
    assert_eq!(
        samples.value(
            "worker_host_requests_refused_total",
            &[("reason", "bad_request")]
        ),
        1.0
    );
    assert_eq!(
        samples.value(
            "worker_host_requests_refused_total",
            &[("reason", "too_large")]
        ),
        2.0
    );
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "completed")]),
        5.0
    );
    assert_eq!(
        samples.value("worker_host_jobs_total", &[("outcome", "failed")]),
        1.0
    );
    assert_eq!(
        samples.value("worker_host_job_duration_seconds_count", &[]),
        6.0
    );
    assert_eq!(samples.value("worker_host_jobs_waiting", &[]), 0.0);
    assert_eq!(samples.value("worker_host_concurrency", &[]), 3.0);
    let stderr = server.stderr();
    let finished = stderr
        .lines()
        .filter(|line| line.contains("Finished."))
        .count();
    assert_eq!(finished, 5, "{stderr}");
    assert!(
        stderr.contains("Finished: the job failed (ValueError: no)."),
        "{stderr}"
    );
}
