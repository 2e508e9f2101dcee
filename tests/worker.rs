//! The RunPod queue worker, end to end: the real `worker-host` binary and real handler libraries
//! against a stand-in of the platform on loopback that records every request and injects faults.

use e2e::platform::{results_by_id, Fault, Platform, Recorded, Route};
use e2e::{Sample, WorkerProcess};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// The job-done posts that carry a final result (not progress), successfully answered.
fn results(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.route == Route::Done && r.status == 200 && r.json().get("status").is_none())
        .collect()
}

/// The inner error payload of a job-done body.
fn error_message(body: &Value) -> String {
    let text = body["error"].as_str().expect("error is a string");
    let payload: Value = serde_json::from_str(text).expect("the error string holds JSON");
    payload["error_message"].as_str().unwrap().to_owned()
}

fn jobs(count: usize, prefix: &str) -> Vec<Value> {
    (0..count)
        .map(|n| json!({"id": format!("{prefix}-{n}"), "input": {"n": n, "text": "héllo ✓"}, "extra": "e"}))
        .collect()
}

/// Every job is delivered exactly once with the SDK's body and headers, at concurrency 1.
#[test]
fn delivers_each_job_once_at_concurrency_1() {
    let platform = Platform::start();
    for job in jobs(5, "s") {
        platform.push_job(job);
    }
    let _worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let requests = platform.wait_for(WAIT, "five results", |r| results(r).len() >= 5);
    let by_id = results_by_id(&requests);
    for n in 0..5 {
        assert_eq!(
            by_id[&format!("s-{n}")],
            json!({"output": {"n": n, "text": "héllo ✓"}})
        );
    }
    for post in results(&requests) {
        assert_eq!(post.header("x-request-id"), post.job_id().as_deref());
        assert_eq!(post.header("authorization"), Some("test-key"));
        assert_eq!(post.query_value("isStream"), Some("false"));
        assert_eq!(post.query_value("gpu"), Some("test"));
    }
    let takes: Vec<&Recorded> = requests.iter().filter(|r| r.route == Route::Take).collect();
    assert!(!takes.is_empty());
    assert!(
        takes.iter().all(|t| t.header("x-request-id").is_none()),
        "no stale X-Request-ID on takes"
    );
    assert_eq!(takes[0].query_value("job_in_progress"), Some("0"));
    assert!(
        requests.iter().all(|r| r.route != Route::Other),
        "no malformed URL"
    );
}

/// At concurrency 4 the worker takes in batches of its free slots and still delivers each job
/// exactly once.
#[test]
fn batch_takes_at_concurrency_4() {
    let platform = Platform::start();
    for job in jobs(12, "b") {
        platform.push_job(job);
    }
    let _worker = WorkerProcess::start(&platform, Sample::Echo, &["--concurrency", "4"], &[]);
    let requests = platform.wait_for(WAIT, "twelve results", |r| results(r).len() >= 12);
    assert_eq!(results_by_id(&requests).len(), 12);
    let first = requests
        .iter()
        .find(|r| matches!(r.route, Route::Take | Route::TakeBatch))
        .unwrap();
    assert_eq!(first.route, Route::TakeBatch);
    assert_eq!(first.query_value("batch_size"), Some("4"));
}

/// A streaming job's chunks are posted in order to the stream URL, its (coalesced) progress to
/// job-done, and both before its final result (`{"output": []}`, isStream=true).
#[test]
fn streams_chunks_and_progress_before_the_result() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "g-1", "input": {"chunks": [{"part": 1}, "two", [3]]}}));
    let _worker = WorkerProcess::start(&platform, Sample::Stream, &[], &[]);
    let requests = platform.wait_for(WAIT, "the final result", |r| !results(r).is_empty());
    let job_posts: Vec<&Recorded> = requests
        .iter()
        .filter(|r| matches!(r.route, Route::Done | Route::Stream))
        .collect();
    let chunks: Vec<Value> = job_posts
        .iter()
        .filter(|r| r.route == Route::Stream)
        .map(|r| r.json())
        .collect();
    assert_eq!(
        chunks,
        vec![
            json!({"output": {"part": 1}}),
            json!({"output": "two"}),
            json!({"output": [3]})
        ]
    );
    let last = job_posts.last().unwrap();
    assert_eq!(last.json(), json!({"output": []}));
    assert_eq!(last.query_value("isStream"), Some("true"));
    let progress: Vec<Value> = job_posts
        .iter()
        .filter(|r| r.route == Route::Done && r.json().get("status").is_some())
        .map(|r| r.json())
        .collect();
    // Progress is coalesced (the values may all be queued at once): at least the latest is
    // posted, and the values never go backwards.
    assert!(!progress.is_empty() && progress.len() <= 3, "{progress:?}");
    assert_eq!(
        progress.last().unwrap(),
        &json!({"status": "IN_PROGRESS", "output": {"done": 2, "total": 3}})
    );
    let done: Vec<u64> = progress
        .iter()
        .map(|p| p["output"]["done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|pair| pair[0] < pair[1]), "{done:?}");
}

/// Job-done answering 5xx, then a dropped connection, still ends in exactly one delivery.
#[test]
fn result_post_failures_are_retried_to_one_delivery() {
    let platform = Platform::start();
    platform.inject(Route::Done, Fault::Status(503), 2);
    platform.inject(Route::Done, Fault::Drop, 1);
    platform.push_job(json!({"id": "r-1", "input": {"keep": "me"}}));
    let _worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let requests = platform.wait_for(WAIT, "a delivered result", |r| !results(r).is_empty());
    let attempts = requests.iter().filter(|r| r.route == Route::Done).count();
    assert_eq!(attempts, 4, "two 503s, one dropped connection, one success");
    assert_eq!(
        results_by_id(&requests)["r-1"],
        json!({"output": {"keep": "me"}})
    );
}

/// While the platform fails every take, the worker backs off instead of hammering it.
#[test]
fn take_failures_back_off() {
    let platform = Platform::start();
    platform.inject(Route::Take, Fault::Status(500), 10_000);
    let worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let start = std::time::Instant::now();
    let requests = platform.wait_for(WAIT, "six failed takes", |r| {
        r.iter().filter(|r| r.route == Route::Take).count() >= 6
    });
    let elapsed = start.elapsed();
    // Backoff starts at 100 ms and doubles: six attempts take well over a second. Without it
    // (the SDK) they would take a few milliseconds.
    assert!(
        elapsed >= Duration::from_millis(600),
        "six takes in {elapsed:?}: {}",
        worker.stderr()
    );
    assert!(requests.iter().all(|r| r.route != Route::Done));
    assert!(
        worker.stderr().contains("Failed to get job"),
        "{}",
        worker.stderr()
    );
}

/// A 429 with Retry-After pauses taking for that long.
#[test]
fn rate_limited_take_honours_retry_after() {
    let platform = Platform::start();
    platform.inject(Route::Take, Fault::TooManyRequests(Some(1)), 1);
    let _worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let requests = platform.wait_for(WAIT, "a second take", |r| {
        r.iter().filter(|r| r.route == Route::Take).count() >= 2
    });
    let takes: Vec<&Recorded> = requests.iter().filter(|r| r.route == Route::Take).collect();
    let gap = takes[1].at - takes[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
}

/// A job-stop reaches the running handler at once; nothing is posted for the stopped job and the
/// worker goes on with the next one.
#[test]
fn job_stop_cancels_the_handler() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "long", "input": {"mode": "sleep", "ms": 60_000}}));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "a heartbeat listing the job", |r| {
        r.iter()
            .any(|r| r.route == Route::Ping && r.query_value("job_id") == Some("long"))
    });
    platform.stop_job("long");
    platform.push_job(json!({"id": "next", "input": {"mode": "echo"}}));
    let requests = platform.wait_for(WAIT, "the next job's result", |r| !results(r).is_empty());
    let by_id = results_by_id(&requests);
    assert!(by_id.contains_key("next"));
    assert!(
        !by_id.contains_key("long"),
        "nothing is posted for a stopped job"
    );
    assert!(
        worker.stderr().contains("Stopping job."),
        "{}",
        worker.stderr()
    );
}

/// A stopped job whose handler ignores cancellation keeps its slot until the handler returns: at
/// concurrency 1 the next job starts only after it, so no more than `--concurrency` handlers
/// ever run at once.
#[test]
fn a_stopped_job_keeps_its_slot_until_its_handler_returns() {
    let platform = Platform::start();
    platform.push_job(json!({
        "id": "stubborn",
        "input": {"mode": "sleep", "ms": 1500, "ignore_cancel": true}
    }));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &["--concurrency", "1"],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "a heartbeat listing the job", |r| {
        r.iter()
            .any(|r| r.route == Route::Ping && r.query_value("job_id") == Some("stubborn"))
    });
    platform.stop_job("stubborn");
    platform.push_job(json!({"id": "next", "input": {"mode": "echo"}}));
    platform.wait_for(WAIT, "the next job's result", |r| !results(r).is_empty());
    let stderr = worker.stderr();
    let position = |needle: &str| {
        stderr
            .lines()
            .position(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stderr}"))
    };
    let stubborn_returned = position("job_id=stubborn}: slept");
    let next_started = position("job_id=next}: Started.");
    assert!(
        stubborn_returned < next_started,
        "the next job started while the stopped handler still ran:\n{stderr}"
    );
}

/// SIGTERM: a job that finishes within the grace period delivers its own result; one that does
/// not is cancelled and reported as failed; the worker exits 0.
#[test]
fn sigterm_drains_then_reports_unfinished_jobs() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "quick", "input": {"mode": "sleep", "ms": 300}}));
    platform.push_job(json!({"id": "slow", "input": {"mode": "sleep", "ms": 60_000}}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &["--concurrency", "2", "--shutdown-grace-secs", "1.5"],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "both jobs running", |r| {
        r.iter().any(|r| {
            r.route == Route::Ping
                && r.query_value("job_id")
                    .is_some_and(|ids| ids.contains("quick") && ids.contains("slow"))
        })
    });
    worker.terminate();
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
    let by_id = results_by_id(&platform.requests());
    assert_eq!(
        by_id["quick"],
        json!({"output": {"mode": "sleep", "ms": 300}})
    );
    assert_eq!(
        error_message(&by_id["slow"]),
        "worker shut down before the job finished"
    );
}

/// SIGTERM while idle abandons the open long-poll: the worker exits at once, not when the poll
/// would have ended.
#[test]
fn sigterm_while_idle_exits_promptly() {
    let platform = Platform::start();
    platform.set_hold(Duration::from_secs(60));
    let mut worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    platform.wait_for(WAIT, "a take", |r| r.iter().any(|r| r.route == Route::Take));
    let start = std::time::Instant::now();
    worker.terminate();
    assert_eq!(worker.wait(Duration::from_secs(10)), Some(0));
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Malformed jobs in a batch: one with an id but no input fails with a reason, ones without an
/// id are skipped, the valid one runs, and the worker goes on.
#[test]
fn malformed_jobs_fail_alone() {
    let platform = Platform::start();
    platform
        .push_raw_take(r#"[{"input": 1}, 7, {"id": "no-input"}, {"id": "ok", "input": {"a": 1}}]"#);
    platform.push_raw_take("<html>garbage</html>");
    platform.push_job(json!({"id": "after", "input": 2}));
    let worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let requests = platform.wait_for(WAIT, "three results", |r| results(r).len() >= 3);
    let by_id = results_by_id(&requests);
    assert_eq!(by_id["ok"], json!({"output": {"a": 1}}));
    assert_eq!(by_id["after"], json!({"output": 2}));
    assert_eq!(error_message(&by_id["no-input"]), "the job has no input");
    assert!(
        worker.stderr().contains("cannot be identified"),
        "{}",
        worker.stderr()
    );
}

/// Over the size limits: an oversize output and an oversize input each fail their job with the
/// size and the limit; the worker goes on.
#[test]
fn oversize_input_and_output_fail_their_job() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "big-out", "input": {"mode": "big", "bytes": 5000}}));
    platform.push_job(json!({"id": "big-in", "input": {"blob": "x".repeat(5000)}}));
    platform.push_job(json!({"id": "fine", "input": {"mode": "echo"}}));
    let _worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &["--max-output-bytes", "1000", "--max-input-bytes", "2000"],
        &[],
    );
    let requests = platform.wait_for(WAIT, "three results", |r| results(r).len() >= 3);
    let by_id = results_by_id(&requests);
    let out = error_message(&by_id["big-out"]);
    assert!(
        out.contains("5002 bytes") && out.contains("limit of 1000"),
        "{out}"
    );
    let input = error_message(&by_id["big-in"]);
    assert!(input.contains("over the limit of 2000 bytes"), "{input}");
    assert_eq!(by_id["fine"], json!({"output": {"mode": "echo"}}));
}

/// The heartbeat keeps its period while a handler is busy, lists the running job, and carries
/// the protocol version.
#[test]
fn heartbeat_lists_the_running_job() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "busy", "input": {"mode": "sleep", "ms": 1500}}));
    let _worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    let requests = platform.wait_for(WAIT, "three heartbeats with the job", |r| {
        r.iter()
            .filter(|r| r.route == Route::Ping && r.query_value("job_id") == Some("busy"))
            .count()
            >= 3
    });
    let ping = requests.iter().find(|r| r.route == Route::Ping).unwrap();
    assert_eq!(ping.query_value("runpod_version"), Some("1.12.0"));
    assert_eq!(ping.query_value("gpu"), Some("test"));
    assert_eq!(ping.header("authorization"), Some("test-key"));
}

/// URL templates without a `?` still get well-formed query strings.
#[test]
fn url_templates_without_a_query() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "q-1", "input": 1}));
    let base = platform.base_url();
    let env = [
        (
            "RUNPOD_WEBHOOK_GET_JOB",
            format!("{base}/v2/ep/job-take/$RUNPOD_POD_ID"),
        ),
        (
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            format!("{base}/v2/ep/job-done/$RUNPOD_POD_ID/$ID"),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _worker = WorkerProcess::start(&platform, Sample::Echo, &[], &env);
    let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
    assert!(
        requests.iter().all(|r| r.route != Route::Other),
        "a malformed URL was requested"
    );
    let take = requests.iter().find(|r| r.route == Route::Take).unwrap();
    assert_eq!(take.path, "/v2/ep/job-take/wk1");
    assert_eq!(take.raw_query, "job_in_progress=0");
    let done = results(&requests)[0];
    assert_eq!(done.raw_query, "isStream=false");
}

/// A failing init in production reports `unhealthy` once to the ping URL, then takes one job and
/// fails it with the handler's own message and its last output (so the request that started the
/// worker learns why), leaves the rest in the queue, and exits 1.
#[test]
fn init_failure_reports_unhealthy_and_fails_one_job() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "waiting", "input": 1}));
    platform.push_job(json!({"id": "next", "input": 2}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[
            "--handler-config",
            r#"{"fail_init": "no GPU found", "init_says": "probing /dev/nvidia0"}"#,
        ],
        &[],
    );
    assert_eq!(worker.wait(WAIT), Some(1), "{}", worker.stderr());
    let requests = platform.requests();
    let report = requests
        .iter()
        .find(|r| r.route == Route::Ping)
        .expect("an unhealthy report");
    assert_eq!(report.query_value("status"), Some("unhealthy"));
    assert_eq!(report.query_value("check"), Some("handler_init"));
    assert!(report
        .query_value("reason")
        .unwrap()
        .contains("no GPU found"));
    let by_id = results_by_id(&requests);
    assert_eq!(by_id.len(), 1, "one job is claimed: {by_id:?}");
    let text = by_id["waiting"]["error"].as_str().expect("an error result");
    let error: Value = serde_json::from_str(text).unwrap();
    assert_eq!(error["error_type"], "HandlerInitFailed");
    let message = error["error_message"].as_str().unwrap();
    assert!(message.starts_with("no GPU found"), "{message}");
    assert!(message.contains("probing /dev/nvidia0"), "{message}");
    assert_eq!(
        platform.pending_jobs(),
        1,
        "the other job stays in the queue"
    );
    assert!(worker.stderr().contains("no GPU found"));
}

/// With `--claim-on-init-failure false`, a failing init takes no job at all.
#[test]
fn init_failure_can_leave_every_job_to_others() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "never", "input": 1}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[
            "--handler-config",
            r#"{"fail_init": "no GPU found"}"#,
            "--claim-on-init-failure",
            "false",
        ],
        &[],
    );
    assert_eq!(worker.wait(WAIT), Some(1));
    let requests = platform.requests();
    assert!(requests.iter().any(|r| r.route == Route::Ping));
    assert!(
        requests.iter().all(|r| r.route != Route::Take),
        "no job taken"
    );
}

/// A second copy of a job id that is already running is ignored: one result for the id.
#[test]
fn duplicate_job_id_in_flight_runs_once() {
    let platform = Platform::start();
    platform.push_raw_take(
        r#"[{"id": "dup", "input": {"mode": "sleep", "ms": 300}}, {"id": "dup", "input": {"mode": "sleep", "ms": 300}}]"#,
    );
    platform.push_job(json!({"id": "then", "input": 1}));
    let worker = WorkerProcess::start(&platform, Sample::Faulty, &["--concurrency", "2"], &[]);
    let requests = platform.wait_for(WAIT, "two results", |r| results(r).len() >= 2);
    let by_id = results_by_id(&requests);
    assert!(by_id.contains_key("dup") && by_id.contains_key("then"));
    assert!(
        worker.stderr().contains("duplicate is ignored"),
        "{}",
        worker.stderr()
    );
}

/// Waits until the worker says it takes no job until an earlier result is delivered.
fn wait_until_takes_pause(worker: &WorkerProcess) {
    let deadline = std::time::Instant::now() + WAIT;
    while !worker
        .stderr()
        .contains("Results of earlier jobs are still being delivered")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never paused its takes: {}",
            worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While the platform refuses every result, the worker stops taking jobs it could not report:
/// at `--concurrency 1` it holds one job whose result is being retried and one more, and leaves
/// the rest in the queue.
#[test]
fn undeliverable_results_stop_the_taking() {
    let platform = Platform::start();
    platform.inject(Route::Done, Fault::Status(503), 10_000);
    for job in jobs(20, "u") {
        platform.push_job(job);
    }
    let worker = WorkerProcess::start(&platform, Sample::Echo, &["--result-retry-secs", "60"], &[]);
    wait_until_takes_pause(&worker);
    // The take loop is now waiting for a delivery: nothing more is taken.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(platform.pending_jobs(), 18, "{}", worker.stderr());
}

/// A big job (a text of a MiB or more) holds the take-ahead too: while its result waits for
/// delivery no next job is taken, so a worker moving big payloads never holds a second job's
/// buffers beside a result in flight.
#[test]
fn a_big_job_waits_for_its_delivery_before_the_next_take() {
    let platform = Platform::start();
    platform.inject(Route::Done, Fault::Status(503), 10_000);
    let big = "b".repeat(1536 * 1024);
    platform.push_job(json!({"id": "big", "input": {"prompt": big}}));
    for job in jobs(5, "s") {
        platform.push_job(job);
    }
    let worker = WorkerProcess::start(&platform, Sample::Echo, &["--result-retry-secs", "60"], &[]);
    wait_until_takes_pause(&worker);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        platform.pending_jobs(),
        5,
        "only the big job is taken while its result is refused: {}",
        worker.stderr()
    );
}

/// A big job whose handler runs for seconds holds the spare hold all along, but nothing is
/// waiting for a delivery: the worker does not say so.
#[test]
fn a_long_big_job_is_not_reported_as_an_undelivered_result() {
    let platform = Platform::start();
    let pad = "p".repeat(1536 * 1024);
    platform.push_job(json!({"id": "long", "input": {"mode": "sleep", "ms": 1500, "pad": pad}}));
    platform.push_job(json!({"id": "after", "input": {"mode": "echo"}}));
    let worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let requests = platform.wait_for(WAIT, "two results", |r| results(r).len() >= 2);
    assert!(results_by_id(&requests).contains_key("after"));
    assert!(
        !worker
            .stderr()
            .contains("Results of earlier jobs are still being delivered"),
        "{}",
        worker.stderr()
    );
}

/// With `--refresh-worker`, the worker takes no second job: the slot frees only after taking
/// has stopped, so the pod is not handed a job it is about to drop.
#[test]
fn refresh_worker_takes_exactly_one_job() {
    let platform = Platform::start();
    for job in jobs(2, "f") {
        platform.push_job(job);
    }
    let mut worker = WorkerProcess::start(&platform, Sample::Echo, &["--refresh-worker"], &[]);
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
    let requests = platform.requests();
    let by_id = results_by_id(&requests);
    assert_eq!(by_id.len(), 1, "one job, one result: {by_id:?}");
    assert_eq!(by_id["f-0"]["stopPod"], json!(true));
    assert_eq!(platform.pending_jobs(), 1, "the second job stays queued");
}

/// A streaming handler's final result is posted with isStream=true even when it failed, as the
/// SDK does for a generator handler.
#[test]
fn a_failed_streaming_job_is_posted_as_a_stream() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "sf-1", "input": {"chunks": "not a list"}}));
    let _worker = WorkerProcess::start(&platform, Sample::Stream, &[], &[]);
    let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
    let result = results(&requests)[0];
    assert_eq!(result.query_value("isStream"), Some("true"));
    assert!(result.json().get("error").is_some(), "{}", result.body);
}

/// Once a stream chunk is given up after the whole retry time, the job's later chunks are not
/// retried as long: the final result follows at once.
#[test]
fn chunks_after_a_given_up_chunk_are_dropped() {
    let platform = Platform::start();
    platform.inject(Route::Stream, Fault::Status(503), 10_000);
    platform.push_job(json!({"id": "d-1", "input": {"chunks": [1, 2, 3, 4, 5, 6]}}));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Stream,
        &["--result-retry-secs", "1"],
        &[],
    );
    let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
    let bodies: Vec<Value> = requests
        .iter()
        .filter(|r| r.route == Route::Stream)
        .map(Recorded::json)
        .collect();
    assert!(!bodies.is_empty());
    assert!(
        bodies.iter().all(|body| *body == json!({"output": 1})),
        "only the first chunk was tried: {bodies:?}"
    );
    assert!(
        worker
            .stderr()
            .contains("5 stream chunk(s) were not delivered"),
        "{}",
        worker.stderr()
    );
}

/// The end of the shutdown grace reaches a job ahead of chunks still queued behind a failing
/// stream route: the worker exits promptly and the handler's result is still posted.
#[test]
fn shutdown_is_not_held_up_by_queued_chunks() {
    let platform = Platform::start();
    platform.inject(Route::Stream, Fault::Status(503), 10_000);
    platform.push_job(json!({"id": "q-1", "input": {"chunks": [1, 2, 3, 4, 5]}}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Stream,
        &["--result-retry-secs", "60", "--shutdown-grace-secs", "0.5"],
        &[],
    );
    platform.wait_for(WAIT, "a chunk being retried", |r| {
        r.iter().filter(|r| r.route == Route::Stream).count() >= 2
    });
    worker.terminate();
    // Without the interrupt, five chunks x 60 s of retries would hold the exit for minutes.
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
    let by_id = results_by_id(&platform.requests());
    assert_eq!(by_id["q-1"], json!({"output": []}));
}

/// Taking jobs without a job-done URL would lose every result: the worker refuses to start.
#[test]
fn a_missing_job_done_url_is_a_usage_error() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "m-1", "input": 1}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Echo,
        &[],
        &[("RUNPOD_WEBHOOK_POST_OUTPUT", "")],
    );
    assert_eq!(worker.wait(WAIT), Some(2));
    assert!(
        worker
            .stderr()
            .contains("RUNPOD_WEBHOOK_POST_OUTPUT is not, so no result could be delivered"),
        "{}",
        worker.stderr()
    );
    assert_eq!(platform.pending_jobs(), 1);
}

/// A handler's recycle request (`request_recycle`, or a truthy `refresh_worker` in its output)
/// puts `stopPod` on that job's result and nothing else changes, as in the SDK: the platform
/// replaces the worker, which serves on until then.
#[test]
fn a_recycle_request_marks_its_result_only() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "r-1", "input": {"mode": "recycle"}}));
    platform.push_job(json!({"id": "r-2", "input": {"mode": "echo"}}));
    let _worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let requests = platform.wait_for(WAIT, "both results", |r| results(r).len() == 2);
    let by_id = results_by_id(&requests);
    assert_eq!(
        by_id["r-1"],
        json!({"output": {"mode": "recycle"}, "stopPod": true})
    );
    assert_eq!(by_id["r-2"], json!({"output": {"mode": "echo"}}));
}

/// A failed job says so in the worker's log, with the handler's error; a successful one does not.
#[test]
fn a_failed_job_is_logged_with_its_error() {
    let platform = Platform::start();
    platform.push_job(
        json!({"id": "l-1", "input": {"mode": "error", "type": "ValueError", "message": "boom"}}),
    );
    platform.push_job(json!({"id": "l-2", "input": {"mode": "echo"}}));
    let worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    platform.wait_for(WAIT, "both results", |r| results(r).len() == 2);
    // The worker logs once the platform has answered: give it a moment after the POSTs arrive.
    let deadline = std::time::Instant::now() + WAIT;
    let mut log = worker.stderr();
    while log.matches("Finished").count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = worker.stderr();
    }
    let failures: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("the job failed"))
        .collect();
    assert_eq!(failures.len(), 1, "{log}");
    assert!(
        failures[0].contains("l-1") && failures[0].contains("ValueError: boom"),
        "{log}"
    );
}

/// With `--refresh-worker`, jobs still running when the first one finishes are not cut short by
/// the shutdown grace: they finish, then the worker exits.
#[test]
fn refresh_worker_lets_the_other_running_jobs_finish() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "slow", "input": {"mode": "sleep", "ms": 2000}}));
    platform.push_job(json!({"id": "quick", "input": {"mode": "echo"}}));
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[
            "--refresh-worker",
            "--concurrency",
            "2",
            "--shutdown-grace-secs",
            "0.2",
        ],
        &[],
    );
    assert_eq!(worker.wait(WAIT), Some(0), "stderr: {}", worker.stderr());
    let by_id = results_by_id(&platform.requests());
    assert_eq!(
        by_id["slow"],
        json!({"output": {"mode": "sleep", "ms": 2000}, "stopPod": true})
    );
    assert_eq!(
        by_id["quick"],
        json!({"output": {"mode": "echo"}, "stopPod": true})
    );
}

/// A progress flood (200,000 values in a fraction of a second) is coalesced: few progress posts,
/// each newer than the last, none after the result, and the result is not held back behind
/// 200,000 posts.
#[test]
fn a_progress_flood_is_coalesced() {
    const COUNT: u64 = 200_000;
    let platform = Platform::start();
    platform.push_job(json!({"id": "flood", "input": {"mode": "progress", "count": COUNT}}));
    let _worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let requests = platform.wait_for(WAIT, "the result", |r| !results(r).is_empty());
    let by_id = results_by_id(&requests);
    assert_eq!(by_id["flood"], json!({"output": {"reported": COUNT}}));
    let progress: Vec<(u64, std::time::Instant)> = requests
        .iter()
        .filter(|r| r.route == Route::Done && r.json()["status"] == "IN_PROGRESS")
        .map(|r| (r.json()["output"]["done"].as_u64().unwrap(), r.at))
        .collect();
    // How many depends on how fast posts go here (one is in flight at a time); without
    // coalescing it would be every one of them.
    assert!(
        !progress.is_empty() && progress.len() < (COUNT / 20) as usize,
        "{} progress posts for {COUNT} values",
        progress.len()
    );
    assert!(
        progress.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "progress went backwards: {progress:?}"
    );
    let result_at = results(&requests)[0].at;
    assert!(
        progress.iter().all(|(_, at)| *at <= result_at),
        "a progress post came after the result"
    );
}

/// Job ids with `&`, `#`, `/`, `?`, `%` or a space reach the platform percent-encoded, each
/// result under its own id; an empty id is a malformed job (skipped and logged), and the worker
/// goes on.
#[test]
fn odd_job_ids_are_escaped_in_urls() {
    let platform = Platform::start();
    let ids = ["a&b c", "x/y#z?w", "100%", "ünï"];
    for id in ids {
        platform.push_job(json!({"id": id, "input": id}));
    }
    platform.push_job(json!({"id": "", "input": "nobody"}));
    platform.push_job(json!({"id": "last", "input": 0}));
    let worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    let requests = platform.wait_for(WAIT, "the results", |r| results(r).len() > ids.len());
    let by_id = results_by_id(&requests);
    for id in ids {
        assert_eq!(by_id.get(id), Some(&json!({"output": id})), "{by_id:?}");
    }
    assert_eq!(by_id["last"], json!({"output": 0}));
    assert_eq!(by_id.len(), ids.len() + 1, "{by_id:?}");
    assert!(
        worker.stderr().contains("the job id is empty"),
        "{}",
        worker.stderr()
    );
}

/// RUNPOD_MAX_CONCURRENCY (the platform's newer variable) sets the concurrency when neither
/// `--concurrency` nor WORKER_HOST_CONCURRENCY does.
#[test]
fn runpod_max_concurrency_sets_the_concurrency() {
    for (env, expected) in [
        (vec![("RUNPOD_MAX_CONCURRENCY", "3")], "3"),
        (
            vec![
                ("RUNPOD_MAX_CONCURRENCY", "3"),
                ("WORKER_HOST_CONCURRENCY", "2"),
            ],
            "2",
        ),
    ] {
        let platform = Platform::start();
        let _worker = WorkerProcess::start(&platform, Sample::Echo, &[], &env);
        let requests = platform.wait_for(WAIT, "a batch take", |r| {
            r.iter().any(|r| r.route == Route::TakeBatch)
        });
        let take = requests
            .iter()
            .find(|r| r.route == Route::TakeBatch)
            .unwrap();
        assert_eq!(take.query_value("batch_size"), Some(expected), "{env:?}");
    }
}

/// A take answer larger than its jobs could be at `--max-input-bytes` is refused as it arrives
/// (a failed take, logged with the sizes), not read into memory whole; the worker goes on.
#[test]
fn an_oversize_take_answer_is_refused() {
    let platform = Platform::start();
    let huge = format!(
        r#"{{"id": "huge", "input": "{}"}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    platform.push_raw_take(&huge);
    platform.push_job(json!({"id": "after", "input": 1}));
    let worker = WorkerProcess::start(&platform, Sample::Echo, &["--max-input-bytes", "1000"], &[]);
    let requests = platform.wait_for(WAIT, "the next job's result", |r| !results(r).is_empty());
    let by_id = results_by_id(&requests);
    assert_eq!(by_id.get("after"), Some(&json!({"output": 1})), "{by_id:?}");
    assert!(
        worker.stderr().contains("the take answer is"),
        "{}",
        worker.stderr()
    );
}

/// Where a post of the stream handler's job belongs in the order the handler produced it:
/// progress `k` (reported before chunk `k`) is `2k`, chunk `k` is `2k + 1`, the final result is
/// `2 * chunks.len()`.
fn stream_position(post: &Recorded, chunks: &[Value]) -> usize {
    let body = post.json();
    match post.route {
        Route::Stream => {
            let index = chunks
                .iter()
                .position(|chunk| body == json!({ "output": chunk }))
                .unwrap_or_else(|| panic!("an unknown chunk: {post}"));
            2 * index + 1
        }
        Route::Done if body.get("status").is_some() => {
            assert_eq!(body["status"], "IN_PROGRESS", "{post}");
            2 * body["output"]["done"].as_u64().expect("a progress count") as usize
        }
        Route::Done => 2 * chunks.len(),
        _ => unreachable!("not a post of a job: {post}"),
    }
}

/// A streaming job's chunks and progress keep their order when the first post of a route fails
/// (503, retried) or stalls: the platform sees (answers) every chunk once and in order, each
/// progress value between the chunks it was reported between, none after the final result, and
/// the result last. Nothing overtakes a post still being retried or answered.
#[test]
fn chunks_and_progress_stay_in_order_when_a_post_fails_or_stalls() {
    let chunks = vec![json!({"part": 1}), json!("two"), json!([3])];
    let result_position = 2 * chunks.len();
    let stall = Fault::Stall(Duration::from_secs(1));
    let scenarios = [
        (
            "the first progress post gets a 503",
            Route::Done,
            Fault::Status(503),
        ),
        ("the first progress post stalls", Route::Done, stall.clone()),
        (
            "the first chunk post gets a 503",
            Route::Stream,
            Fault::Status(503),
        ),
        ("the first chunk post stalls", Route::Stream, stall),
    ];
    for (scenario, route, fault) in scenarios {
        let platform = Platform::start();
        platform.inject(route, fault.clone(), 1);
        platform.push_job(json!({"id": "o-1", "input": {"chunks": chunks, "delay_ms": 20}}));
        let worker = WorkerProcess::start(&platform, Sample::Stream, &[], &[]);
        let job_posts_answered = |r: &[Recorded]| {
            r.iter()
                .filter(|r| matches!(r.route, Route::Done | Route::Stream))
                .all(|r| r.answered.is_some())
        };
        platform.wait_for(WAIT, "the final result", |r| {
            !results(r).is_empty() && job_posts_answered(r)
        });
        // Give a stray post (a retry, one still stalled) the time to show.
        std::thread::sleep(Duration::from_millis(500));
        let requests = platform.wait_for(WAIT, "every post answered", job_posts_answered);
        let context = || format!("{scenario}; worker stderr:\n{}", worker.stderr());
        let posts: Vec<&Recorded> = requests
            .iter()
            .filter(|r| matches!(r.route, Route::Done | Route::Stream))
            .collect();
        if matches!(fault, Fault::Status(_)) {
            assert!(
                posts.iter().any(|r| r.status != 200),
                "the 503 was not used; {}",
                context()
            );
        }
        // Every attempt, in arrival order: never back to an earlier item (a retry repeats its
        // own position), so nothing is posted after the result.
        let arrived: Vec<usize> = posts.iter().map(|r| stream_position(r, &chunks)).collect();
        assert!(
            arrived.windows(2).all(|pair| pair[0] <= pair[1]),
            "posts arrived out of order: {arrived:?}; {}",
            context()
        );
        // The delivered posts, in the order the platform answered them: each item once, in the
        // handler's order, every chunk, the latest progress, and the result last.
        let mut delivered: Vec<&Recorded> = posts.into_iter().filter(|r| r.status == 200).collect();
        delivered.sort_by_key(|r| r.answered.expect("an answered post"));
        let seen: Vec<usize> = delivered
            .iter()
            .map(|r| stream_position(r, &chunks))
            .collect();
        assert!(
            seen.windows(2).all(|pair| pair[0] < pair[1]),
            "the platform saw the posts out of order (or twice): {seen:?}; {}",
            context()
        );
        assert_eq!(seen.last(), Some(&result_position), "{}", context());
        for k in 0..chunks.len() {
            assert!(
                seen.contains(&(2 * k + 1)),
                "chunk {k} is missing: {seen:?}; {}",
                context()
            );
        }
        assert!(
            seen.contains(&(result_position - 2)),
            "the latest progress is missing: {seen:?}; {}",
            context()
        );
        assert_eq!(
            results_by_id(&requests)["o-1"],
            json!({"output": []}),
            "{}",
            context()
        );
    }
}

/// The heartbeat lists a job while it runs and while its result POST is being retried (so the
/// platform does not take it for lost), and no longer once the result is delivered: the next
/// heartbeats carry no job id. A copy of the id the platform sends during the retry is not run
/// again: one run, one result.
#[test]
fn a_job_is_listed_in_heartbeats_until_its_result_is_delivered() {
    let platform = Platform::start();
    // Four failures: the retries take at least 50 + 100 + 200 + 400 ms.
    platform.inject(Route::Done, Fault::Status(503), 4);
    platform.push_job(json!({"id": "held", "input": {"mode": "sleep", "ms": 500}}));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    let lists_held =
        |r: &Recorded| r.route == Route::Ping && r.query_value("job_id") == Some("held");
    let requests = platform.wait_for(WAIT, "a failed result post", |r| {
        r.iter().any(|r| r.route == Route::Done && r.status == 503)
    });
    // The platform sends the running id again while its result is being retried.
    platform.push_job(json!({"id": "held", "input": {"mode": "echo", "copy": 2}}));
    let first_attempt = requests
        .iter()
        .position(|r| r.route == Route::Done)
        .unwrap();
    assert!(
        requests[..first_attempt].iter().any(lists_held),
        "no heartbeat listed the job while it ran: {}",
        worker.stderr()
    );

    let requests = platform.wait_for(WAIT, "the delivered result", |r| !results(r).is_empty());
    let delivered = requests
        .iter()
        .position(|r| r.route == Route::Done && r.status == 200)
        .unwrap();
    let retry_pings: Vec<&Recorded> = requests[first_attempt..delivered]
        .iter()
        .filter(|r| r.route == Route::Ping)
        .collect();
    assert!(
        !retry_pings.is_empty(),
        "no heartbeat during the retries: {}",
        worker.stderr()
    );
    assert!(
        retry_pings.iter().all(|r| lists_held(r)),
        "a heartbeat during the retries did not list the job: {:?}\n{}",
        retry_pings
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        worker.stderr()
    );

    // Once delivered, the worker holds nothing: a heartbeat without job ids follows (a beat
    // built just before the delivery may still list it).
    let requests = platform.wait_for(WAIT, "heartbeats after the delivery", |r| {
        let after: Vec<&Recorded> = r[delivered + 1..]
            .iter()
            .filter(|r| r.route == Route::Ping)
            .collect();
        after.len() >= 10 || after.iter().any(|r| r.query_value("job_id").is_none())
    });
    let after: Vec<&Recorded> = requests[delivered + 1..]
        .iter()
        .filter(|r| r.route == Route::Ping)
        .collect();
    assert!(
        after.iter().any(|r| r.query_value("job_id").is_none()),
        "the job is still listed after its result was delivered: {:?}\n{}",
        after.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        worker.stderr()
    );

    assert_eq!(platform.pending_jobs(), 0, "the copy was taken");
    let by_id = results_by_id(&platform.requests());
    assert_eq!(
        by_id["held"],
        json!({"output": {"mode": "sleep", "ms": 500}})
    );
    let stderr = worker.stderr();
    assert_eq!(
        stderr.matches("job_id=held}: Started.").count(),
        1,
        "the id ran twice:\n{stderr}"
    );
    assert!(stderr.contains("duplicate is ignored"), "{stderr}");
}

/// A platform that answers "no job" at once (no long-poll) is polled at most about 10 times a
/// second, not in a hot loop. A bound on the count in any one-second window, not on speed.
#[test]
fn an_empty_queue_answered_at_once_is_not_polled_in_a_hot_loop() {
    let platform = Platform::start();
    platform.set_hold(Duration::ZERO);
    let worker = WorkerProcess::start(&platform, Sample::Echo, &[], &[]);
    platform.wait_for(WAIT, "a take", |r| r.iter().any(|r| r.route == Route::Take));
    std::thread::sleep(Duration::from_secs(2));
    let observed_until = std::time::Instant::now();
    let takes: Vec<std::time::Instant> = platform
        .requests()
        .iter()
        .filter(|r| matches!(r.route, Route::Take | Route::TakeBatch))
        .map(|r| r.at)
        .collect();
    assert!(
        takes.len() >= 2,
        "{} takes: {}",
        takes.len(),
        worker.stderr()
    );
    let window = Duration::from_secs(1);
    let most = takes
        .iter()
        .filter(|start| **start + window <= observed_until)
        .map(|start| {
            takes
                .iter()
                .filter(|at| **at >= *start && **at < *start + window)
                .count()
        })
        .max()
        .expect("a full window was observed");
    assert!(
        most <= 15,
        "{most} takes in one second ({} in all)",
        takes.len()
    );
}

/// `--max-input-bytes` bounds the job's input JSON as sent: an input of exactly the limit runs,
/// one a byte longer fails with its size.
#[test]
fn an_input_of_exactly_the_limit_is_accepted_and_one_byte_more_refused() {
    const LIMIT: usize = 1000;
    // A JSON string of n characters is n + 2 bytes with its quotes.
    let at_limit = json!("x".repeat(LIMIT - 2));
    let over = json!("y".repeat(LIMIT - 1));
    assert_eq!(at_limit.to_string().len(), LIMIT);
    assert_eq!(over.to_string().len(), LIMIT + 1);
    let platform = Platform::start();
    platform.push_job(json!({"id": "at-limit", "input": at_limit}));
    platform.push_job(json!({"id": "over", "input": over}));
    let limit = LIMIT.to_string();
    let _worker =
        WorkerProcess::start(&platform, Sample::Echo, &["--max-input-bytes", &limit], &[]);
    let requests = platform.wait_for(WAIT, "two results", |r| results(r).len() >= 2);
    let by_id = results_by_id(&requests);
    let start = |body: &Value| body.to_string().chars().take(200).collect::<String>();
    assert!(
        by_id["at-limit"] == json!({"output": at_limit}),
        "the input of exactly the limit did not run: {}",
        start(&by_id["at-limit"])
    );
    assert!(
        by_id["over"].get("output").is_none(),
        "the input one byte over the limit ran: {}",
        start(&by_id["over"])
    );
    let message = error_message(&by_id["over"]);
    assert!(
        message.contains("1001 bytes, over the limit of 1000 bytes"),
        "{message}"
    );
}
