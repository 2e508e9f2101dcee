//! The SDK conformance harness (used by tests/conformance.rs and tests/python_bridge.rs): runs
//! runpod-python 1.12.0 and `worker-host` on the same handlers against fresh stand-in platforms
//! with the same jobs, and asserts the platform sees the same requests and bodies from both.
//!
//! What is compared, per scenario:
//! - per job id, the ordered job-done / job-stream POSTs (progress excepted): route, path, query
//!   pairs, the headers that matter and the body as parsed JSON;
//! - per job id, the progress POSTs as a multiset (the SDK sends them fire-and-forget, §6.3), and
//!   that each of worker-host's precedes its final result;
//! - the set of jobs that finished (not their order: worker-host posts a result while the next job
//!   runs);
//! - the distinct job-take and job-stop requests (path, query, headers that matter);
//! - the heartbeat: path, parameters and their order, `runpod_version`, `job_id` omitted when idle
//!   and listing the running job while busy.
//!
//! Every normalisation (what may legitimately differ) is documented where it is applied. The test
//! needs `python3` with `runpod==1.12.0`: without it the tests fail saying what to install
//! (`WORKER_HOST_TESTS_ALLOW_SKIPS=1` skips them instead, outside CI).

use crate::platform::{Platform, Recorded, Route};
use crate::{Sample, WorkerProcess};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the SDK may take: it imports slowly and idles ~1 s after every job (§21 item 12).
const SDK_WAIT: Duration = Duration::from_secs(45);

/// How long worker-host may take.
const HOST_WAIT: Duration = Duration::from_secs(20);

/// The heartbeat interval for both workers, in ms. The SDK divides it down to whole seconds and
/// sends no heartbeat at all below 1000 (§21 item 14), so the stand-in's 500 ms would not do.
const PING_INTERVAL_MS: &str = "1000";

/// The headers of a job POST that the platform may act on. User-Agent (the SDK's names Python
/// and the OS, worker-host's itself), Accept, Accept-Encoding, Connection, Host, Content-Length
/// and header order legitimately differ and are not compared.
const POST_HEADERS: &[&str] = &["authorization", "x-request-id", "content-type", "charset"];

/// The headers of a job-take or job-stop GET that are compared. The SDK's sticky
/// `X-Request-ID` on these GETs is a known defect worker-host does not repeat (§21 item 5), so it
/// is not compared.
const GET_HEADERS: &[&str] = &["authorization", "content-type"];

/// The official Python worker, running one handler of `tests/python/sdk_worker.py` in its own
/// process group (the SDK's heartbeat runs in a child process), with its output in a file.
struct SdkWorker {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl SdkWorker {
    fn start(platform: &Platform, side: &Sdk) -> Self {
        use std::os::unix::process::CommandExt;
        let log = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut command = Command::new("python3");
        match side {
            Sdk::Handler(handler) => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/sdk_worker.py");
                command.arg(script).arg(handler);
            }
            Sdk::Script(script) => {
                command.arg(script);
            }
        }
        // The machine's environment (python3 may need its PYENV_*/VIRTUAL_ENV/PYTHONPATH), less
        // anything that could point the SDK elsewhere; then the platform's.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RUNPOD_") {
                command.env_remove(name);
            }
        }
        command
            .envs(platform.worker_env())
            .env("RUNPOD_PING_INTERVAL", PING_INTERVAL_MS)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("the temporary file reopens"))
            .stderr(log.reopen().expect("the temporary file reopens"))
            .process_group(0);
        let child = command.spawn().expect("python3 could not be started");
        Self { child, log }
    }

    /// Everything the SDK logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for SdkWorker {
    /// Kills the whole process group: the worker and its heartbeat process.
    fn drop(&mut self) {
        crate::kill_process_group(&mut self.child);
    }
}

/// The SDK's side of a scenario.
#[derive(Debug, Clone)]
pub enum Sdk {
    /// One of the handlers of `tests/python/sdk_worker.py`, by name.
    Handler(&'static str),
    /// A `handler.py` that calls `runpod.serverless.start` itself, run as `python3 SCRIPT`.
    Script(PathBuf),
}

/// worker-host's side of a scenario.
#[derive(Debug, Clone)]
pub enum Host {
    /// A sample handler.
    Sample(Sample),
    /// A handler library with these extra arguments (the Python bridge and its script, say).
    Library(PathBuf, Vec<String>),
}

/// One scenario: the handler on both sides and the jobs, pushed in this order before the worker
/// starts.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The SDK's side.
    pub sdk: Sdk,
    /// worker-host's side.
    pub host: Host,
    /// The jobs.
    pub jobs: Vec<Value>,
}

/// Whether a request is a progress report: a job-done POST with `"status": "IN_PROGRESS"`.
fn is_progress(request: &Recorded) -> bool {
    request.route == Route::Done
        && serde_json::from_str::<Value>(&request.body)
            .is_ok_and(|body| body.get("status") == Some(&json!("IN_PROGRESS")))
}

/// Whether a request is a job's final result: any other job-done POST.
fn is_final(request: &Recorded) -> bool {
    request.route == Route::Done && !is_progress(request)
}

/// The job ids with a final result, each once, in the order their first final result arrived.
fn finished(requests: &[Recorded]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for request in requests.iter().filter(|r| is_final(r)) {
        let id = request.job_id().expect("a job id in the path");
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// How many progress POSTs each job got.
fn progress_counts(requests: &[Recorded]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests.iter().filter(|r| is_progress(r)) {
        *counts
            .entry(request.job_id().expect("a job id in the path"))
            .or_default() += 1;
    }
    counts
}

/// Whether a heartbeat without `job_id` arrived after the last final result: the worker has
/// gone idle and said so.
fn idle_ping_after_last_result(requests: &[Recorded]) -> bool {
    let Some(last) = requests.iter().rposition(is_final) else {
        return false;
    };
    requests[last..]
        .iter()
        .any(|r| r.route == Route::Ping && r.query_value("job_id").is_none())
}

/// A running worker whose output can be shown when it does not do what was expected.
trait Worker {
    fn output(&self) -> String;
}

impl Worker for WorkerProcess {
    fn output(&self) -> String {
        self.stderr()
    }
}

impl Worker for SdkWorker {
    fn output(&self) -> String {
        self.log()
    }
}

/// Runs one side on a fresh platform until every job has its final result, `progress` (per job,
/// if given) progress POSTs have arrived and an idle heartbeat followed; returns what the
/// platform saw. On timeout, shows the worker's output too.
fn observe<W: Worker>(
    scenario: &Scenario,
    who: &str,
    timeout: Duration,
    progress: Option<&BTreeMap<String, usize>>,
    start: impl FnOnce(&Platform) -> W,
) -> Vec<Recorded> {
    let platform = Platform::start();
    for job in &scenario.jobs {
        platform.push_job(job.clone());
    }
    let worker = start(&platform);
    let ids: BTreeSet<String> = scenario.jobs.iter().map(job_id).collect();
    let what = format!("{who}: every final result, progress {progress:?}, then an idle heartbeat");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        platform.wait_for(timeout, &what, |requests| {
            finished(requests).into_iter().collect::<BTreeSet<_>>() == ids
                && progress.is_none_or(|expected| at_least(&progress_counts(requests), expected))
                && idle_ping_after_last_result(requests)
        })
    }));
    outcome.unwrap_or_else(|panic| {
        eprintln!("{who}'s output:\n{}", worker.output());
        std::panic::resume_unwind(panic)
    })
}

/// Whether every job in `expected` got at least that many progress POSTs.
fn at_least(counts: &BTreeMap<String, usize>, expected: &BTreeMap<String, usize>) -> bool {
    expected
        .iter()
        .all(|(id, n)| counts.get(id).is_some_and(|count| count >= n))
}

fn job_id(job: &Value) -> String {
    job["id"].as_str().expect("jobs have string ids").to_owned()
}

/// Runs worker-host, then the SDK, on the scenario and compares what the two platforms saw.
pub fn compare(scenario: &Scenario) {
    if !crate::python_sdk_available("the SDK conformance test") {
        return;
    }
    let env = [("RUNPOD_PING_INTERVAL", PING_INTERVAL_MS)];
    let host = observe(
        scenario,
        "worker-host",
        HOST_WAIT,
        None,
        |platform| match &scenario.host {
            Host::Sample(sample) => WorkerProcess::start(platform, *sample, &[], &env),
            Host::Library(library, args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                WorkerProcess::start_library(platform, library, &args, &env)
            }
        },
    );
    // The SDK's progress POSTs may trail its final result (§6.3): wait for as many as
    // worker-host sent, so the multisets below compare complete sets.
    let expected_progress = progress_counts(&host);
    let sdk = observe(
        scenario,
        "the SDK",
        SDK_WAIT,
        Some(&expected_progress),
        |platform| SdkWorker::start(platform, &scenario.sdk),
    );

    // Captured by the test harness; shown when a comparison below fails.
    eprintln!(
        "the SDK's requests:\n{}\nworker-host's requests:\n{}",
        transcript(&sdk),
        transcript(&host)
    );
    for (who, requests) in [("SDK", &sdk), ("worker-host", &host)] {
        let malformed: Vec<String> = requests
            .iter()
            .filter(|r| r.route == Route::Other)
            .map(ToString::to_string)
            .collect();
        assert!(
            malformed.is_empty(),
            "{who} sent malformed requests: {malformed:#?}"
        );
    }

    // Both finish the same jobs. The order of their results may differ: worker-host frees the
    // slot when the handler returns and posts the result while the next job runs, so a long
    // stream's last POSTs can land after a quick next job's result.
    assert_eq!(
        sorted(finished(&sdk)),
        sorted(finished(&host)),
        "the jobs that finished"
    );

    // Every job is compared before failing, so one run reports every difference.
    let mut differences: Vec<String> = Vec::new();
    for job in &scenario.jobs {
        let id = job_id(job);
        let (sdk_posts, sdk_progress) = job_posts(&sdk, &id);
        let (host_posts, host_progress) = job_posts(&host, &id);
        if sdk_posts != host_posts {
            differences.push(format!(
                "job {id}: result and stream POSTs\n  SDK:         {sdk_posts:?}\n  worker-host: {host_posts:?}"
            ));
        }
        let (sdk_progress, host_progress) = (sorted(sdk_progress), sorted(host_progress));
        if sdk_progress != host_progress {
            differences.push(format!(
                "job {id}: progress POSTs, as a multiset\n  SDK:         {sdk_progress:?}\n  worker-host: {host_progress:?}"
            ));
        }
        // worker-host awaits each progress POST before going on; the SDK does not (§21 item 15).
        let of_job = |r: &Recorded| r.job_id().as_deref() == Some(id.as_str());
        let last_progress = host.iter().rposition(|r| is_progress(r) && of_job(r));
        let first_final = host.iter().position(|r| is_final(r) && of_job(r));
        if last_progress.is_some_and(|last| first_final.is_none_or(|first| last > first)) {
            differences.push(format!(
                "job {id}: worker-host sent progress after its result"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "the platform saw different job POSTs:\n{}",
        differences.join("\n")
    );

    check_job_in_progress(scenario, "SDK", &sdk);
    check_job_in_progress(scenario, "worker-host", &host);
    assert_eq!(
        distinct(&sdk, &[Route::Take, Route::TakeBatch]),
        distinct(&host, &[Route::Take, Route::TakeBatch]),
        "the job-take requests (left: SDK, right: worker-host)"
    );
    assert_eq!(
        distinct(&sdk, &[Route::Stop]),
        distinct(&host, &[Route::Stop]),
        "the job-stop requests (left: SDK, right: worker-host)"
    );
    compare_heartbeats(scenario, &sdk, &host);
}

/// A job POST, reduced to what the platform may act on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Post {
    route: String,
    /// Percent-decoded: worker-host escapes every reserved character of a job id, `/` included,
    /// where the SDK leaves a `/` as it is; both name the same id.
    path: String,
    /// The decoded query pairs, in order.
    query: Vec<(String, String)>,
    /// [`POST_HEADERS`], each with its value if sent.
    headers: Vec<(String, Option<String>)>,
    /// The body parsed as JSON (see [`normalise_body`]); as text so posts can be sorted.
    body: String,
}

impl Post {
    fn of(request: &Recorded) -> Self {
        Self {
            route: format!("{:?}", request.route),
            path: crate::platform::percent_decode(&request.path),
            query: request.query.clone(),
            headers: headers(request, POST_HEADERS),
            body: normalise_body(request.json()).to_string(),
        }
    }
}

/// The named headers of a request with their values, in a fixed order: header order and the
/// case of names legitimately differ.
fn headers(request: &Recorded, names: &[&str]) -> Vec<(String, Option<String>)> {
    names
        .iter()
        .map(|name| ((*name).to_owned(), request.header(name).map(str::to_owned)))
        .collect()
}

/// A body as compared. It is parsed, so whitespace (the SDK writes `", "` and `": "`), key order
/// and escaping (`\u00e9` vs `é`) do not count. In an error payload (the JSON text inside
/// `error`, §6.1) the traceback is dropped (the SDK's is a Python traceback, worker-host's is
/// empty) and the SDK's `error_type` `<class 'ValueError'>` becomes `ValueError`, the plain type
/// name worker-host's handlers report. A generator's error keeps its traceback, less the SDK's
/// own frames (see [`without_sdk_frames`]).
fn normalise_body(mut body: Value) -> Value {
    let payload = body
        .get("error")
        .and_then(Value::as_str)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|payload| payload.get("error_type").is_some());
    if let Some(mut payload) = payload {
        let fields = payload.as_object_mut().expect("has error_type");
        fields.remove("error_traceback");
        if let Some(Value::String(kind)) = fields.get_mut("error_type") {
            if let Some(name) = kind
                .strip_prefix("<class '")
                .and_then(|rest| rest.strip_suffix("'>"))
            {
                *kind = name.to_owned();
            }
        }
        body["error"] = payload;
    } else if let Some(text) = body.get("error").and_then(Value::as_str) {
        body["error"] = Value::String(without_sdk_frames(text));
    }
    body
}

/// The SDK's generator error (§6.2, `handler: <message> \ntraceback: <traceback>`, a plain
/// string) less the traceback's frames in the runpod package's own files: the SDK runs a
/// generator from `rp_job.py`, where worker-host's Python bridge starts the traceback at the
/// handler. Any other text is returned as it is.
fn without_sdk_frames(text: &str) -> String {
    if !text.starts_with("handler: ") || !text.contains("\ntraceback: Traceback (") {
        return text.to_owned();
    }
    let mut kept = String::with_capacity(text.len());
    let mut in_sdk_frame = false;
    for line in text.split_inclusive('\n') {
        if line.starts_with("  File \"") {
            in_sdk_frame = line.contains("/runpod/serverless/");
        } else if !line.starts_with("    ") {
            in_sdk_frame = false;
        }
        if !in_sdk_frame {
            kept.push_str(line);
        }
    }
    kept
}

/// A job's POSTs in arrival order, less progress; and its progress POSTs.
fn job_posts(requests: &[Recorded], id: &str) -> (Vec<Post>, Vec<Post>) {
    let (progress, others): (Vec<&Recorded>, Vec<&Recorded>) = requests
        .iter()
        .filter(|r| matches!(r.route, Route::Done | Route::Stream))
        .filter(|r| r.job_id().as_deref() == Some(id))
        .partition(|r| is_progress(r));
    (
        others.into_iter().map(Post::of).collect(),
        progress.into_iter().map(Post::of).collect(),
    )
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

/// One line per request: time since the first, method, path, query, status, X-Request-ID and
/// the start of the body.
fn transcript(requests: &[Recorded]) -> String {
    let Some(first) = requests.first() else {
        return "  (none)".to_owned();
    };
    requests
        .iter()
        .map(|r| {
            let ms = r.at.duration_since(first.at).as_millis();
            let id = r.header("x-request-id").unwrap_or("-");
            format!("  +{ms}ms [x-request-id: {id}] {r}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A job-take or job-stop GET, reduced to what is compared.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Get {
    route: String,
    path: String,
    /// The decoded query pairs, in order; `job_in_progress`'s value is checked separately (see
    /// [`check_job_in_progress`]) and replaced by `0|1` here.
    query: Vec<(String, String)>,
    /// [`GET_HEADERS`], each with its value if sent.
    headers: Vec<(String, Option<String>)>,
}

/// The distinct GETs on these routes. How many of each were sent depends on timing (each empty
/// long-poll is sent again), so only the distinct requests are compared.
fn distinct(requests: &[Recorded], routes: &[Route]) -> BTreeSet<Get> {
    requests
        .iter()
        .filter(|r| routes.contains(&r.route))
        .map(|r| Get {
            route: format!("{:?}", r.route),
            path: r.path.clone(),
            query: r
                .query
                .iter()
                .map(|(key, value)| match key.as_str() {
                    "job_in_progress" => (key.clone(), "0|1".to_owned()),
                    _ => (key.clone(), value.clone()),
                })
                .collect(),
            headers: headers(r, GET_HEADERS),
        })
        .collect()
}

/// `job_in_progress` on each take. Its value legitimately depends on timing: the SDK takes only
/// once the previous result POST has been answered (so it always sends `0` at concurrency 1),
/// while worker-host takes the next job as soon as the handler returns, with the result still in
/// flight, and then truthfully says `1`. What must hold for both: the first take says `0`; a
/// take saying `0` comes after the final result of every job taken before it; a take saying `1`
/// comes after some job was taken. (The n-th answered take got the n-th pushed job.)
fn check_job_in_progress(scenario: &Scenario, who: &str, requests: &[Recorded]) {
    let mut taken: Vec<String> = Vec::new();
    for (index, take) in requests.iter().enumerate() {
        if take.route != Route::Take {
            continue;
        }
        let flag = take.query_value("job_in_progress");
        if taken.is_empty() {
            assert_eq!(flag, Some("0"), "{who}: the first take {take}");
        }
        match flag {
            Some("0") => {
                let earlier = &requests[..index];
                for id in &taken {
                    assert!(
                        earlier
                            .iter()
                            .any(|r| is_final(r) && r.job_id().as_ref() == Some(id)),
                        "{who}: {take} says no job is in progress, but job {id} has no result yet"
                    );
                }
            }
            Some("1") => assert!(
                !taken.is_empty(),
                "{who}: {take} says a job is in progress before any was taken"
            ),
            _ => panic!("{who}: {take} has no valid job_in_progress"),
        }
        if take.status == 200 {
            taken.push(job_id(&scenario.jobs[taken.len()]));
        }
    }
}

/// A heartbeat, reduced to what is compared: path, decoded query pairs in order (the ids in
/// `job_id` sorted: the SDK lists them in set order) and `Authorization`. User-Agent, Accept and
/// the like legitimately differ (the SDK's heartbeat comes from python-requests).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Beat {
    path: String,
    query: Vec<(String, String)>,
    authorization: Option<String>,
}

impl Beat {
    fn of(request: &Recorded) -> Self {
        let query = request
            .query
            .iter()
            .map(|(key, value)| {
                if key != "job_id" {
                    return (key.clone(), value.clone());
                }
                let ids: BTreeSet<&str> = value.split(',').collect();
                (key.clone(), ids.into_iter().collect::<Vec<_>>().join(","))
            })
            .collect();
        Self {
            path: request.path.clone(),
            query,
            authorization: request.header("authorization").map(str::to_owned),
        }
    }

    /// The heartbeat both must send: idle, or listing the running jobs.
    fn expected(job_ids: Option<&str>) -> Self {
        let mut query = vec![("gpu".to_owned(), "test".to_owned())];
        if let Some(ids) = job_ids {
            query.push(("job_id".to_owned(), ids.to_owned()));
        }
        query.push((
            "runpod_version".to_owned(),
            crate::PYTHON_SDK_VERSION.to_owned(),
        ));
        Self {
            path: "/v2/ep/ping/wk1".to_owned(),
            query,
            authorization: Some("test-key".to_owned()),
        }
    }
}

/// Heartbeats. Which of them catch a job depends on timing, so each side's are checked against
/// the same rules (every one idle or listing pushed jobs, comma-separated), and the heartbeats
/// both must have sent are compared exactly: the idle one (no `job_id`) and, when a job runs for
/// longer than a heartbeat period, the busy one (`job_id` = that job).
fn compare_heartbeats(scenario: &Scenario, sdk: &[Recorded], host: &[Recorded]) {
    let pushed: BTreeSet<String> = scenario.jobs.iter().map(job_id).collect();
    let beats = |who: &str, requests: &[Recorded]| -> BTreeSet<Beat> {
        let beats: BTreeSet<Beat> = requests
            .iter()
            .filter(|r| r.route == Route::Ping)
            .map(Beat::of)
            .collect();
        for beat in &beats {
            let listed = beat.query.iter().find(|(key, _)| key == "job_id");
            let fits = match listed {
                Some((_, ids)) => ids.split(',').all(|id| pushed.contains(id)),
                None => true,
            };
            assert!(
                fits && *beat == Beat::expected(listed.map(|(_, ids)| ids.as_str())),
                "{who}: unexpected heartbeat {beat:?}"
            );
        }
        beats
    };
    let sdk_beats = beats("SDK", sdk);
    let host_beats = beats("worker-host", host);
    let mut required = vec![Beat::expected(None)];
    if let Some(id) = scenario.busy_job() {
        required.push(Beat::expected(Some(&id)));
    }
    for beat in required {
        assert!(
            sdk_beats.contains(&beat) && host_beats.contains(&beat),
            "both must send {beat:?}; the SDK sent {sdk_beats:#?}, worker-host {host_beats:#?}"
        );
    }
}

impl Scenario {
    /// The job that runs for longer than a heartbeat period (1 s), if any: `delay_ms` × chunks.
    fn busy_job(&self) -> Option<String> {
        self.jobs
            .iter()
            .find(|job| {
                let delay = job["input"]["delay_ms"].as_u64().unwrap_or(0);
                let chunks = job["input"]["chunks"].as_array().map_or(0, Vec::len) as u64;
                delay * chunks >= 1_400
            })
            .map(job_id)
    }
}
