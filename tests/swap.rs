//! Live handler swap, end to end: the real binary serving a handler library from a path of its
//! own, with the library at that path replaced under it, as a deploy would replace it.
//!
//! Covered: SIGHUP swaps to what the `--handler` path now holds (a file renamed over it, or a
//! re-pointed symlink) under load from several clients with nothing failed or lost and versions
//! only moving forward; a job running during the swap finishes on the old version; a file that
//! does not load, or whose `init` fails, leaves the old version serving and the worker healthy;
//! unchanged content does nothing; `--swap-policy drain-first` lets the old runner finish and
//! exit before the new version's `init`;
//! `--watch` (and `WORKER_HOST_WATCH`) swaps without a signal; overwriting or deleting the file in
//! place without a swap is harmless, in both isolations and across a runner restart; a SIGHUP under
//! `--isolation none` is refused; the queue worker swaps with every job getting one result;
//! `/health` shows the handler served (name, version, SHA-256, generation) and `inspect --json`
//! the file's SHA-256.
//!
//! The versions are the libraries of `fixtures/versioned.c`, whose every answer says which version
//! ran it. No assertion is about how long something took; waits poll with generous deadlines.

use e2e::dev_api::DevApi;
use e2e::platform::{results_by_id, Platform, Route};
use e2e::{fixture, process_alive, send_signal, wait_for_one_child, worker_host, Run};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a test waits for something that normally happens at once.
const WAIT: Duration = Duration::from_secs(30);
/// How often a wait re-checks.
const POLL: Duration = Duration::from_millis(50);
/// What the host logs once a swap is done and the new version serves.
const SWAPPED: &str = "Now serving";
/// What the host logs when a swap fails and the old version keeps serving.
const SWAP_FAILED: &str = "Handler swap failed";
/// What the host logs when the handler path holds what it already serves.
const UNCHANGED: &str = "unchanged";
/// What the host logs when it refuses a swap (`--isolation none`).
const SWAP_REFUSED: &str = "Handler swap refused";
/// The message of the `init` of `VERSIONED_INIT_FAILS` (see `fixtures/versioned.c`).
const INIT_FAILURE: &str = "versioned handler refuses to start: init fails on purpose";

/// The library of one variant of `fixtures/versioned.c`: `v1`, `v2`, `v3` or `init_fails`.
fn versioned(variant: &str) -> PathBuf {
    fixture(&format!("versioned_{variant}"))
}

/// The SHA-256 of a file, in lower-case hex, as `sha256sum` computes it.
fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum could not be started");
    assert!(
        output.status.success(),
        "sha256sum {} failed",
        path.display()
    );
    String::from_utf8(output.stdout)
        .expect("sha256sum prints text")
        .split_whitespace()
        .next()
        .expect("sha256sum prints the digest first")
        .to_owned()
}

/// Polls `done` every 50 ms until it holds, up to `timeout`; panics with `what` and `show()`.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
    show: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in {timeout:?}\n--- host stderr ---\n{}",
            show()
        );
        std::thread::sleep(POLL);
    }
}

/// How many times `needle` occurs in `text`.
fn occurrences(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

// ---------------------------------------------------------------------------------------------
// The handler file and the ways a deploy replaces it
// ---------------------------------------------------------------------------------------------

/// The handler path a host serves from, `handler.so` in a directory of its own (under cargo's
/// target directory, so on a file system that allows mapping code), and the ways a deploy
/// replaces what is there.
struct HandlerFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl HandlerFile {
    /// A new directory whose `handler.so` is a copy of `library`.
    fn holding(library: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("swap-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a temporary directory");
        let path = dir.path().join("handler.so");
        std::fs::copy(library, &path).expect("the handler copies");
        Self { dir, path }
    }

    /// A new directory holding copies of `libraries` (as `v1.so`, ... in order) and `handler.so`,
    /// a symlink to the first.
    fn symlink_to_first(libraries: &[&Path]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("swap-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a temporary directory");
        for (index, library) in libraries.iter().enumerate() {
            std::fs::copy(library, dir.path().join(format!("v{}.so", index + 1)))
                .expect("the handler copies");
        }
        let path = dir.path().join("handler.so");
        std::os::unix::fs::symlink("v1.so", &path).expect("a symlink");
        Self { dir, path }
    }

    /// The path given to `--handler`.
    fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file atomically with a copy of `library`: written under a temporary name in
    /// the same directory, then renamed over the path (`cp v2.so .tmp && mv .tmp handler.so`).
    fn replace_with(&self, library: &Path) {
        self.replace_with_bytes(&std::fs::read(library).expect("the library reads"));
    }

    /// [`HandlerFile::replace_with`] with these bytes, which need not be a library at all.
    fn replace_with_bytes(&self, bytes: &[u8]) {
        let temporary = self.dir.path().join(".handler.so.tmp");
        std::fs::write(&temporary, bytes).expect("the temporary file writes");
        std::fs::rename(&temporary, &self.path).expect("the rename succeeds");
    }

    /// Overwrites the file in place with `library`: the same inode truncated and rewritten, as a
    /// plain `cp v2.so handler.so` does.
    fn overwrite_in_place(&self, library: &Path) {
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&self.path).unwrap());
        std::fs::copy(library, &self.path).expect("the handler is overwritten");
        let after = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&self.path).unwrap());
        assert_eq!(
            inode, after,
            "the overwrite made a new file instead of rewriting it"
        );
    }

    /// Re-points the symlink at `target` (a name in the directory) atomically.
    fn repoint(&self, target: &str) {
        let temporary = self.dir.path().join(".handler.so.link");
        std::os::unix::fs::symlink(target, &temporary).expect("a symlink");
        std::fs::rename(&temporary, &self.path).expect("the rename succeeds");
    }

    /// Deletes the file.
    fn delete(&self) {
        std::fs::remove_file(&self.path).expect("the handler file deletes");
    }
}

// ---------------------------------------------------------------------------------------------
// The dev API host
// ---------------------------------------------------------------------------------------------

/// A dev API host serving the handler at some path, and an HTTP client for it.
struct Served {
    api: DevApi,
    http: Client,
}

impl Served {
    /// Starts the dev API on the handler at `handler` with extra arguments.
    fn start(handler: &Path, args: &[&str]) -> Self {
        Self::start_with_env(handler, args, &[])
    }

    /// [`Served::start`] with extra environment variables.
    fn start_with_env(handler: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self {
            api: DevApi::start_library(handler, args, env),
            http: client(),
        }
    }

    /// Everything the host wrote to stderr so far.
    fn stderr(&self) -> String {
        self.api.stderr()
    }

    /// The host's process id.
    fn pid(&self) -> u32 {
        self.api.pid()
    }

    /// Sends SIGHUP to the host: swap to what the handler path holds now.
    fn hang_up(&self) {
        send_signal(self.pid(), "HUP");
    }

    /// How many times `needle` is on the host's stderr so far.
    fn logged(&self, needle: &str) -> usize {
        occurrences(&self.stderr(), needle)
    }

    /// Waits until `needle` is on the host's stderr at least `times` times.
    fn wait_for_log(&self, needle: &str, times: usize) {
        wait_until(
            WAIT,
            &format!("{times} log line(s) with {needle:?}"),
            || self.logged(needle) >= times,
            || self.stderr(),
        );
    }

    /// A GET of `path`, asserting a 200 JSON answer.
    fn get(&self, path: &str) -> Value {
        let answer = self
            .http
            .get(self.api.url(path))
            .send()
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}\n{}", self.stderr()));
        assert_eq!(
            answer.status().as_u16(),
            200,
            "GET {path}\n{}",
            self.stderr()
        );
        answer.json().expect("a JSON answer")
    }

    /// A POST of `body` to `path`, asserting a 200 JSON answer.
    fn post(&self, path: &str, body: &Value) -> Value {
        let answer = self
            .http
            .post(self.api.url(path))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}\n{}", self.stderr()));
        assert_eq!(
            answer.status().as_u16(),
            200,
            "POST {path}\n{}",
            self.stderr()
        );
        answer.json().expect("a JSON answer")
    }

    /// `/runsync` of `{"input": input}`: the status object.
    fn runsync(&self, input: Value) -> Value {
        self.post("/runsync", &json!({ "input": input }))
    }

    /// `/runsync` of `{"input": input}`, asserting it completed with the input echoed; returns the
    /// version that ran it.
    fn version_answering(&self, input: Value) -> String {
        let answer = self.runsync(input.clone());
        completed_version(&answer, &input).unwrap_or_else(|problem| {
            panic!(
                "{problem}: {answer}\n--- host stderr ---\n{}",
                self.stderr()
            )
        })
    }

    /// Asserts that `count` jobs in a row are answered by `version`.
    fn assert_answers_with(&self, version: &str, count: usize, what: &str) {
        for n in 0..count {
            assert_eq!(
                self.version_answering(json!({"n": n, "what": what})),
                version,
                "{what}\n--- host stderr ---\n{}",
                self.stderr()
            );
        }
    }

    /// `/run` of `{"input": input}`: the job id.
    fn run(&self, input: Value) -> String {
        let answer = self.post("/run", &json!({ "input": input }));
        answer["id"].as_str().expect("an id").to_owned()
    }

    /// Polls `/status/{id}` until the job's status is `status`; returns the status object.
    fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let mut last = Value::Null;
        wait_until(
            WAIT,
            &format!("job {id} becoming {status}"),
            || {
                last = self.get(&format!("/status/{id}"));
                last["status"] == status
            },
            || self.stderr(),
        );
        last
    }

    /// Polls `/status/{id}` until the job ended (any status but queued or in progress); returns
    /// the status object.
    fn wait_for_end(&self, id: &str) -> Value {
        let mut last = Value::Null;
        wait_until(
            WAIT,
            &format!("job {id} ending"),
            || {
                last = self.get(&format!("/status/{id}"));
                !matches!(last["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS"))
            },
            || self.stderr(),
        );
        last
    }

    /// `/health`.
    fn health(&self) -> Value {
        self.get("/health")
    }

    /// Polls `/health` until its handler's generation is `generation`; returns it.
    fn wait_for_generation(&self, generation: u64) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let health = self.health();
            if health["handler"]["generation"] == generation {
                return health;
            }
            assert!(
                Instant::now() < deadline,
                "/health never showed handler generation {generation}; last: {health}\n\
                 --- host stderr ---\n{}",
                self.stderr()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Asserts that `/health` shows `library` (version `version`) served as generation
    /// `generation`, and that a job is answered by that version.
    fn assert_serving(&self, library: &Path, version: &str, generation: u64) {
        let health = self.health();
        let handler = &health["handler"];
        let show = || format!("{health}\n--- host stderr ---\n{}", self.stderr());
        assert_eq!(handler["name"], "versioned", "{}", show());
        assert_eq!(handler["version"], version, "{}", show());
        assert_eq!(handler["sha256"], sha256_of(library), "{}", show());
        assert_eq!(handler["generation"], generation, "{}", show());
        assert_eq!(
            self.version_answering(json!({"serving": version})),
            version,
            "{}",
            show()
        );
    }

    /// Asserts the host still runs.
    fn assert_alive(&mut self) {
        let status = self.api.exit_status();
        assert!(
            status.is_none(),
            "the host exited ({status:?})\n--- host stderr ---\n{}",
            self.stderr()
        );
    }
}

/// An HTTP client with a deadline longer than `/runsync`'s own 90 s.
fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client")
}

/// The version that ran a job, from its status object: `Err` saying what is wrong unless it
/// completed with the versioned handler's output for exactly `input`.
fn completed_version(status: &Value, input: &Value) -> Result<String, String> {
    if status["status"] != "COMPLETED" {
        return Err("the job did not complete".to_owned());
    }
    let output = &status["output"];
    if output["input"] != *input {
        return Err(format!("the answer is not for the input {input}"));
    }
    output["version"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "the output has no version".to_owned())
}

/// Kills the host's runner with SIGKILL while it is idle, and waits until it is gone and the host
/// said it starts a new one: the next job runs on a runner started after this.
fn restart_runner(host: &Served) {
    let runner = wait_for_one_child(host.pid(), WAIT);
    let restarts = host.logged("starting a new one");
    send_signal(runner, "KILL");
    wait_until(
        WAIT,
        "the killed runner going and the host starting a new one",
        || !process_alive(runner) && host.logged("starting a new one") > restarts,
        || host.stderr(),
    );
}

// ---------------------------------------------------------------------------------------------
// Clients sending jobs without pause
// ---------------------------------------------------------------------------------------------

/// One `/runsync` a load client sent, and what came back.
#[derive(Clone, Debug)]
struct Answered {
    client: usize,
    seq: u64,
    /// When the request was sent.
    sent: Instant,
    /// The status object, or why there was none.
    outcome: Result<Value, String>,
}

impl Answered {
    /// The input this request sent.
    fn input(&self) -> Value {
        json!({"client": self.client, "seq": self.seq})
    }

    /// The version that answered, or what went wrong.
    fn version(&self) -> Result<u32, String> {
        let status = self.outcome.as_ref().map_err(Clone::clone)?;
        let version =
            completed_version(status, &self.input()).map_err(|e| format!("{e}: {status}"))?;
        version
            .parse()
            .map_err(|_| format!("version {version:?} is not a number: {status}"))
    }
}

/// Client threads, each sending `/runsync` requests one after another without pause.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<Answered>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` threads against the dev API at `base_url`.
    fn start(base_url: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|client| {
                let stop = Arc::clone(&stop);
                let answered = Arc::clone(&answered);
                let url = format!("{base_url}/runsync");
                std::thread::spawn(move || {
                    let http = self::client();
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let sent = Instant::now();
                        let outcome = http
                            .post(&url)
                            .json(&json!({"input": {"client": client, "seq": seq}}))
                            .send()
                            .and_then(|answer| answer.error_for_status())
                            .and_then(|answer| answer.json::<Value>())
                            .map_err(|e| e.to_string());
                        let mut answered = answered.lock().unwrap_or_else(PoisonError::into_inner);
                        answered.push(Answered {
                            client,
                            seq,
                            sent,
                            outcome,
                        });
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            clients,
        }
    }

    /// Waits until every client got an answer from version `version`.
    fn wait_for_every_client_to_see(&self, version: u32, host: &Served) {
        let clients = self.clients.len();
        wait_until(
            WAIT,
            &format!("every client getting an answer from version {version}"),
            || {
                let answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
                (0..clients).all(|client| {
                    answered
                        .iter()
                        .any(|a| a.client == client && a.version() == Ok(version))
                })
            },
            || host.stderr(),
        );
    }

    /// Stops the clients (each finishes the request it is in) and returns every answer.
    fn finish(mut self) -> Vec<Answered> {
        self.stop.store(true, Ordering::Relaxed);
        for client in std::mem::take(&mut self.clients) {
            client.join().expect("a load client panicked");
        }
        let answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
        answered.clone()
    }
}

/// A test that fails while the load runs must not leave its clients spinning on a dead host.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// SIGHUP under the dev API
// ---------------------------------------------------------------------------------------------

/// Four clients send jobs without pause while the handler is swapped from version 1 to 2 to 3
/// (each new file renamed over the path, then SIGHUP; each new `init` takes a while, so the old
/// version serves meanwhile). No request fails or goes unanswered, each answer is for its own
/// request, each client only ever sees the version go up, every client sees each new version,
/// and a request sent after `/health` showed a version is answered by it or a later one.
#[test]
fn swaps_under_load_lose_nothing_and_only_move_forward() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(
        file.path(),
        &[
            "--concurrency",
            "4",
            "--handler-config",
            r#"{"init_sleep_ms": 300}"#,
        ],
    );
    host.assert_serving(&versioned("v1"), "1", 1);
    let load = Load::start(host.api.base_url(), 4);
    load.wait_for_every_client_to_see(1, &host);

    // When /health first showed each version: every request sent after that is answered by it.
    let mut shown_at: Vec<(u32, Instant)> = Vec::new();
    for (version, variant) in [(2, "v2"), (3, "v3")] {
        let swapped = host.logged(SWAPPED);
        file.replace_with(&versioned(variant));
        host.hang_up();
        let health = host.wait_for_generation(u64::from(version));
        shown_at.push((version, Instant::now()));
        assert_eq!(
            health["handler"]["version"],
            version.to_string(),
            "{health}"
        );
        assert_eq!(
            health["handler"]["sha256"],
            sha256_of(&versioned(variant)),
            "{health}"
        );
        load.wait_for_every_client_to_see(version, &host);
        host.wait_for_log(SWAPPED, swapped + 1);
    }
    let answered = load.finish();

    let failed: Vec<String> = answered
        .iter()
        .filter_map(|a| {
            a.version()
                .err()
                .map(|e| format!("client {} #{}: {e}", a.client, a.seq))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed or were lost, first ones:\n{}\n--- host stderr ---\n{}",
        failed.len(),
        answered.len(),
        failed[..failed.len().min(10)].join("\n"),
        host.stderr()
    );
    let mut by_client: HashMap<usize, Vec<&Answered>> = HashMap::new();
    for answer in &answered {
        by_client.entry(answer.client).or_default().push(answer);
    }
    for (client, answers) in &mut by_client {
        answers.sort_by_key(|a| a.seq);
        let versions: Vec<u32> = answers.iter().map(|a| a.version().unwrap()).collect();
        assert!(
            versions.windows(2).all(|pair| pair[0] <= pair[1]),
            "client {client} saw the version go back: {versions:?}"
        );
        for version in 1..=3 {
            assert!(
                versions.contains(&version),
                "client {client} never saw version {version}"
            );
        }
    }
    for (version, at) in shown_at {
        let stale: Vec<&Answered> = answered
            .iter()
            .filter(|a| a.sent >= at && a.version().unwrap() < version)
            .collect();
        assert!(
            stale.is_empty(),
            "{} request(s) sent after /health showed version {version} were answered by an older \
             one, e.g. {:?}",
            stale.len(),
            stale.first()
        );
    }
    host.assert_serving(&versioned("v3"), "3", 3);
}

/// A job running when the swap happens finishes on the version it started on; a job sent after
/// the swap runs on the new one.
#[test]
fn a_job_running_during_a_swap_finishes_on_the_old_version() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(file.path(), &["--concurrency", "2"]);
    let long_input = json!({"sleep_ms": 3000});
    let long = host.run(long_input.clone());
    host.wait_for_status(&long, "IN_PROGRESS");
    file.replace_with(&versioned("v2"));
    host.hang_up();
    host.wait_for_generation(2);
    assert_eq!(host.version_answering(json!({"after": "the swap"})), "2");
    let finished = host.wait_for_end(&long);
    assert_eq!(
        completed_version(&finished, &long_input),
        Ok("1".to_owned()),
        "{finished}\n--- host stderr ---\n{}",
        host.stderr()
    );
    host.assert_serving(&versioned("v2"), "2", 2);
}

/// Each build brings its own facts: after a swap to a build that streams and allows one job at
/// a time, a job still running on version 1 is reported as version 1's (an output, not a stream),
/// the new build's jobs stream their answer, and no two of them ever run at once although the
/// worker has `--concurrency 4`.
#[test]
fn a_new_build_brings_its_own_concurrency_and_streaming() {
    let file = HandlerFile::holding(&versioned("v1"));
    // The final result lists the chunks (by default it is [], as in the SDK).
    let host = Served::start(
        file.path(),
        &["--concurrency", "4", "--return-aggregate-stream"],
    );
    let long_input = json!({"sleep_ms": 2000});
    let long = host.run(long_input.clone());
    host.wait_for_status(&long, "IN_PROGRESS");
    file.replace_with(&versioned("serial_stream"));
    host.hang_up();
    host.wait_for_generation(2);

    let ids: Vec<String> = (0..3)
        .map(|n| host.run(json!({"n": n, "sleep_ms": 300})))
        .collect();
    let finished = host.wait_for_end(&long);
    assert_eq!(
        completed_version(&finished, &long_input),
        Ok("1".to_owned()),
        "{finished}\n--- host stderr ---\n{}",
        host.stderr()
    );
    for (n, id) in ids.iter().enumerate() {
        let status = host.wait_for_end(id);
        assert_eq!(status["status"], "COMPLETED", "{status}");
        let chunks = status["output"]
            .as_array()
            .unwrap_or_else(|| panic!("a streaming job's output is its chunks: {status}"));
        assert_eq!(chunks.len(), 1, "{status}");
        let answer = &chunks[0];
        assert_eq!(answer["version"], "serial-stream", "{status}");
        assert_eq!(answer["input"]["n"], n, "{status}");
        assert_eq!(
            answer["most_at_once"],
            1,
            "the new build allows one job at a time: {status}\n--- host stderr ---\n{}",
            host.stderr()
        );
    }
}

/// A second SIGHUP while a swap's `init` runs (a build written meanwhile) is not lost and does
/// not start a second swap beside the first: once the first swap is in, the file is read again,
/// and the last build written serves.
#[test]
fn a_sighup_during_a_swap_reads_the_file_again_after_it() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(
        file.path(),
        &["--handler-config", r#"{"init_sleep_ms": 1000}"#],
    );
    host.assert_serving(&versioned("v1"), "1", 1);
    file.replace_with(&versioned("v2"));
    host.hang_up();
    host.wait_for_log("loaded; running its init", 1);
    file.replace_with(&versioned("v3"));
    host.hang_up();
    host.wait_for_log("while one is under way", 1);
    host.wait_for_generation(3);
    host.assert_serving(&versioned("v3"), "3", 3);
    assert_eq!(host.logged(SWAPPED), 2, "{}", host.stderr());
}

/// A symlink as `--handler`, re-pointed at another version: SIGHUP swaps to what it points at now.
#[test]
fn sighup_follows_a_repointed_symlink() {
    let file = HandlerFile::symlink_to_first(&[&versioned("v1"), &versioned("v2")]);
    let host = Served::start(file.path(), &[]);
    host.assert_serving(&versioned("v1"), "1", 1);
    file.repoint("v2.so");
    host.hang_up();
    host.wait_for_generation(2);
    host.assert_serving(&versioned("v2"), "2", 2);
}

/// A file that is no library, then one whose `init` fails: each swap fails with a log line (the
/// second naming init's reason), version 1 keeps answering, `/health` still answers with
/// generation 1, and the host lives. A good file after them still swaps.
#[test]
fn a_failed_swap_keeps_the_old_version_serving() {
    let file = HandlerFile::holding(&versioned("v1"));
    let mut host = Served::start(file.path(), &[]);
    host.assert_serving(&versioned("v1"), "1", 1);

    let failed = host.logged(SWAP_FAILED);
    file.replace_with_bytes(b"not an elf");
    host.hang_up();
    host.wait_for_log(SWAP_FAILED, failed + 1);
    host.assert_alive();
    host.assert_answers_with("1", 3, "after a swap to a file that is no library");
    host.assert_serving(&versioned("v1"), "1", 1);

    file.replace_with(&versioned("init_fails"));
    host.hang_up();
    host.wait_for_log(SWAP_FAILED, failed + 2);
    assert!(
        host.stderr().contains(INIT_FAILURE),
        "the log does not say why init failed:\n{}",
        host.stderr()
    );
    host.assert_alive();
    host.assert_answers_with("1", 3, "after a swap to a handler whose init fails");
    host.assert_serving(&versioned("v1"), "1", 1);

    file.replace_with(&versioned("v2"));
    host.hang_up();
    host.wait_for_generation(2);
    host.assert_serving(&versioned("v2"), "2", 2);
    host.assert_alive();
}

/// SIGHUP when the path holds what is served (the same file, or the same bytes renamed over it)
/// logs that it is unchanged and does nothing: the same runner, generation 1.
#[test]
fn sighup_with_unchanged_content_does_nothing() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(file.path(), &[]);
    host.assert_serving(&versioned("v1"), "1", 1);
    let runner = wait_for_one_child(host.pid(), WAIT);
    let unchanged = host.logged(UNCHANGED);
    let swapped = host.logged(SWAPPED);

    host.hang_up();
    host.wait_for_log(UNCHANGED, unchanged + 1);
    file.replace_with(&versioned("v1"));
    host.hang_up();
    host.wait_for_log(UNCHANGED, unchanged + 2);

    host.assert_serving(&versioned("v1"), "1", 1);
    assert_eq!(host.logged(SWAPPED), swapped, "{}", host.stderr());
    assert_eq!(
        wait_for_one_child(host.pid(), WAIT),
        runner,
        "the runner was replaced"
    );
}

/// `--swap-policy drain-first`: the job running on version 1 finishes on it, the job sent after
/// the SIGHUP runs on version 2, nothing fails, and the old runner has finished and exited before
/// the new version's `init` runs (the new build is only loaded and checked before that, so a
/// broken file stops nothing).
#[test]
fn drain_first_finishes_the_old_jobs_before_the_new_version_starts() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(
        file.path(),
        &["--swap-policy", "drain-first", "--concurrency", "1"],
    );
    host.assert_serving(&versioned("v1"), "1", 1);
    let old_runner = wait_for_one_child(host.pid(), WAIT);
    let long_input = json!({"sleep_ms": 1500});
    let long = host.run(long_input.clone());
    host.wait_for_status(&long, "IN_PROGRESS");
    file.replace_with(&versioned("v2"));
    host.hang_up();
    // With one slot, taken by the long job, this job waits until the drain is done.
    let later_input = json!({"later": true});
    let later = host.run(later_input.clone());

    let long = host.wait_for_end(&long);
    let later = host.wait_for_end(&later);
    host.wait_for_generation(2);
    let stderr = host.stderr();
    let old_stopped = stderr
        .find("has finished its jobs and stopped")
        .unwrap_or(usize::MAX);
    let new_init = stderr
        .find("versioned handler 2 ready")
        .unwrap_or(usize::MAX);
    let show = format!("{long}\n{later}\n--- host stderr ---\n{}", host.stderr());
    assert_eq!(
        completed_version(&long, &long_input),
        Ok("1".to_owned()),
        "{show}"
    );
    assert_eq!(
        completed_version(&later, &later_input),
        Ok("2".to_owned()),
        "{show}"
    );
    assert!(
        old_stopped < new_init && new_init != usize::MAX,
        "the new init ran before the old runner had stopped\n{show}"
    );
    assert!(!process_alive(old_runner), "the old runner lingers\n{show}");
    host.assert_serving(&versioned("v2"), "2", 2);
}

/// Under `--isolation none` a SIGHUP is refused with a log line, and version 1 keeps serving.
#[test]
fn isolation_none_refuses_a_swap() {
    let file = HandlerFile::holding(&versioned("v1"));
    let mut host = Served::start(file.path(), &["--isolation", "none"]);
    host.assert_serving(&versioned("v1"), "1", 1);
    let refused = host.logged(SWAP_REFUSED);
    file.replace_with(&versioned("v2"));
    host.hang_up();
    host.wait_for_log(SWAP_REFUSED, refused + 1);
    host.assert_alive();
    host.assert_answers_with("1", 3, "after a refused swap");
    host.assert_serving(&versioned("v1"), "1", 1);
}

// ---------------------------------------------------------------------------------------------
// --watch
// ---------------------------------------------------------------------------------------------

/// Sends jobs one after another until one is answered by `version`; every answer before it must
/// be a completed job of some version.
fn wait_for_answers_from(host: &Served, version: &str) {
    let mut n = 0;
    wait_until(
        WAIT,
        &format!("an answer from version {version}"),
        || {
            n += 1;
            host.version_answering(json!({"n": n, "waiting_for": version})) == version
        },
        || host.stderr(),
    );
}

/// `--watch`: a file overwritten in place (no signal) is swapped to once it stopped changing; a
/// later rename over the path is swapped to as well. Every job in between completes.
#[test]
fn watch_swaps_without_a_signal() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start(file.path(), &["--watch"]);
    host.assert_serving(&versioned("v1"), "1", 1);
    let swapped = host.logged(SWAPPED);

    file.overwrite_in_place(&versioned("v2"));
    wait_for_answers_from(&host, "2");
    host.wait_for_generation(2);
    host.wait_for_log(SWAPPED, swapped + 1);
    host.assert_serving(&versioned("v2"), "2", 2);

    file.replace_with(&versioned("v3"));
    wait_for_answers_from(&host, "3");
    host.wait_for_generation(3);
    host.assert_serving(&versioned("v3"), "3", 3);
}

/// `WORKER_HOST_WATCH=true` turns watching on as `--watch` does.
#[test]
fn watch_can_be_turned_on_from_the_environment() {
    let file = HandlerFile::holding(&versioned("v1"));
    let host = Served::start_with_env(file.path(), &[], &[("WORKER_HOST_WATCH", "true")]);
    host.assert_serving(&versioned("v1"), "1", 1);
    file.replace_with(&versioned("v2"));
    wait_for_answers_from(&host, "2");
    host.wait_for_generation(2);
    host.assert_serving(&versioned("v2"), "2", 2);
}

// ---------------------------------------------------------------------------------------------
// Changing the file without a swap
// ---------------------------------------------------------------------------------------------

/// Without a swap (no SIGHUP, no --watch), overwriting the served file in place and then deleting
/// it does no harm, in both isolations: version 1 keeps answering, the host lives, `/health`
/// shows generation 1. With a runner, a runner started after each change (the old one killed)
/// still loads version 1: the host's own copy, not whatever the path holds now.
#[test]
fn changing_the_file_without_a_swap_is_harmless() {
    for isolation in ["runner", "none"] {
        let file = HandlerFile::holding(&versioned("v1"));
        // The runner isolation as the default, without the flag.
        let args: &[&str] = match isolation {
            "none" => &["--isolation", "none"],
            _ => &[],
        };
        let mut host = Served::start(file.path(), args);
        host.assert_serving(&versioned("v1"), "1", 1);

        file.overwrite_in_place(&versioned("v2"));
        host.assert_answers_with("1", 5, &format!("{isolation}: after an overwrite in place"));
        if isolation == "runner" {
            restart_runner(&host);
            host.assert_answers_with("1", 3, "runner: a new runner after an overwrite in place");
        }
        host.assert_alive();

        file.delete();
        host.assert_answers_with("1", 5, &format!("{isolation}: after the file was deleted"));
        if isolation == "runner" {
            restart_runner(&host);
            host.assert_answers_with("1", 3, "runner: a new runner after the file was deleted");
        }
        host.assert_alive();
        host.assert_serving(&versioned("v1"), "1", 1);
    }
}

// ---------------------------------------------------------------------------------------------
// The queue worker
// ---------------------------------------------------------------------------------------------

/// A `worker-host` queue worker on the handler at some path, against the stand-in platform, with
/// stderr captured to a file.
struct QueueWorker {
    child: Child,
    stderr_file: tempfile::NamedTempFile,
}

impl QueueWorker {
    /// Starts the worker on `handler` with extra arguments.
    fn start(platform: &Platform, handler: &Path, args: &[&str]) -> Self {
        let stderr_file = tempfile::NamedTempFile::new().expect("a temporary file");
        let child = worker_host()
            .arg("--handler")
            .arg(handler)
            .args(args)
            .envs(platform.worker_env())
            .stdout(Stdio::null())
            .stderr(stderr_file.reopen().expect("the temporary file reopens"))
            .spawn()
            .expect("worker-host could not be started");
        Self { child, stderr_file }
    }

    /// Everything the worker wrote to stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_file.path()).unwrap_or_default()
    }

    /// Waits for the worker to exit, up to `timeout`; its exit code.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let path = self.stderr_file.path().to_owned();
        e2e::wait_for_exit(&mut self.child, timeout, || {
            std::fs::read_to_string(&path).unwrap_or_default()
        })
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A queue job for the versioned handler, whose input names the job.
fn queue_job(id: &str) -> Value {
    json!({"id": id, "input": {"job": id, "sleep_ms": 20}})
}

/// The version in a job-done body, if it is the versioned handler's output for job `id`.
fn result_version(body: &Value, id: &str) -> Option<String> {
    let output = body.get("output")?;
    (output["input"]["job"] == id)
        .then(|| output["version"].as_str().map(str::to_owned))
        .flatten()
}

/// Sets the flag when dropped, also while a panic unwinds.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The queue worker swaps on SIGHUP while jobs keep arriving: every job gets exactly one result,
/// none fails, jobs pushed once a version-2 result was posted all run on version 2, and the
/// worker still shuts down cleanly.
#[test]
fn the_queue_worker_swaps_on_sighup_while_jobs_arrive() {
    let platform = Platform::start();
    let file = HandlerFile::holding(&versioned("v1"));
    let mut worker = QueueWorker::start(&platform, file.path(), &["--concurrency", "2"]);
    let mut ids: Vec<String> = Vec::new();
    let push = |id: String, ids: &mut Vec<String>| {
        platform.push_job(queue_job(&id));
        ids.push(id);
    };
    let before: Vec<String> = (0..10).map(|n| format!("before-{n}")).collect();
    for id in &before {
        push(id.clone(), &mut ids);
    }
    platform.wait_for(WAIT, "the first jobs' results", |requests| {
        let by_id = results_by_id(requests);
        before.iter().all(|id| by_id.contains_key(id))
    });

    let stop = AtomicBool::new(false);
    let during = std::thread::scope(|scope| {
        let pusher = scope.spawn(|| {
            let mut during = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let id = format!("during-{}", during.len());
                platform.push_job(queue_job(&id));
                during.push(id);
                std::thread::sleep(Duration::from_millis(10));
            }
            during
        });
        // Stops the pusher however this ends: a panic below must not leave the scope waiting.
        let stop_pushing = StopOnDrop(&stop);
        file.replace_with(&versioned("v2"));
        send_signal(worker.child.id(), "HUP");
        platform.wait_for(WAIT, "a result from version 2", |requests| {
            results_by_id(requests)
                .iter()
                .any(|(id, body)| result_version(body, id).as_deref() == Some("2"))
        });
        drop(stop_pushing);
        pusher.join().expect("the pusher panicked")
    });
    ids.extend(during);
    let after: Vec<String> = (0..10).map(|n| format!("after-{n}")).collect();
    for id in &after {
        push(id.clone(), &mut ids);
    }

    let requests = platform.wait_for(WAIT, "every job's result", |requests| {
        let by_id = results_by_id(requests);
        ids.iter().all(|id| by_id.contains_key(id))
    });
    let by_id = results_by_id(&requests);
    assert_eq!(
        by_id.len(),
        ids.len(),
        "results for jobs never pushed: {by_id:?}"
    );
    let versions: HashMap<&str, String> = ids
        .iter()
        .map(|id| {
            let version = result_version(&by_id[id], id).unwrap_or_else(|| {
                panic!(
                    "job {id} did not succeed: {}\n--- worker stderr ---\n{}",
                    by_id[id],
                    worker.stderr()
                )
            });
            (id.as_str(), version)
        })
        .collect();
    for id in &before {
        assert_eq!(versions[id.as_str()], "1", "{id}");
    }
    for id in &after {
        assert_eq!(versions[id.as_str()], "2", "{id}\n{}", worker.stderr());
    }
    assert!(
        worker.stderr().contains(SWAPPED),
        "no swap was logged:\n{}",
        worker.stderr()
    );
    e2e::send_sigterm(worker.child.id());
    assert_eq!(worker.wait(WAIT), Some(0), "{}", worker.stderr());
}

// ---------------------------------------------------------------------------------------------
// inspect
// ---------------------------------------------------------------------------------------------

/// `inspect --json` shows the library's SHA-256: 64 hex digits, the file's digest.
#[test]
fn inspect_shows_the_sha256_of_the_file() {
    let mut digests = Vec::new();
    for (variant, version) in [("v1", "1"), ("v2", "2")] {
        let library = versioned(variant);
        let run = Run::of(
            worker_host()
                .args(["inspect", "--json", "--handler"])
                .arg(&library),
        );
        assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
        let info: Value =
            serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
        assert_eq!(info["version"], version, "{info}");
        let sha256 = info["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("no sha256 string: {info}"));
        assert!(
            sha256.len() == 64 && sha256.chars().all(|c| c.is_ascii_hexdigit()),
            "not 64 hex digits: {sha256}"
        );
        assert_eq!(sha256, sha256_of(&library), "{}", library.display());
        digests.push(sha256.to_owned());
    }
    assert_ne!(digests[0], digests[1], "two versions, one digest");
}

/// A take that was open with every slot when a swap made a build with a limit of one serve: the
/// batch it brings still runs one job at a time on the new build.
#[test]
fn a_batch_taken_across_a_swap_keeps_to_the_new_builds_limit() {
    let platform = Platform::start();
    // Takes are held open long enough that the one open at the swap answers the batch.
    platform.set_hold(Duration::from_secs(30));
    let file = HandlerFile::holding(&versioned("v1"));
    let worker = QueueWorker::start(
        &platform,
        file.path(),
        &["--concurrency", "4", "--return-aggregate-stream"],
    );
    platform.wait_for(WAIT, "a take for every slot", |requests| {
        requests
            .iter()
            .any(|r| matches!(r.route, Route::Take | Route::TakeBatch))
    });
    file.replace_with(&versioned("serial_stream"));
    send_signal(worker.child.id(), "HUP");
    wait_until(
        WAIT,
        "the swap",
        || worker.stderr().contains(SWAPPED),
        || worker.stderr(),
    );
    let ids = ["batch-0", "batch-1", "batch-2"];
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "input": {"job": id, "sleep_ms": 300}}))
        .collect();
    platform.push_raw_take(&Value::Array(batch).to_string());
    let by_id = platform.wait_for(WAIT, "the batch's results", |requests| {
        let by_id = results_by_id(requests);
        ids.iter().all(|id| by_id.contains_key(*id))
    });
    let by_id = results_by_id(&by_id);
    for id in ids {
        assert_eq!(
            by_id[id]["output"][0]["most_at_once"],
            1,
            "the new build allows one job at a time: {}\n--- worker stderr ---\n{}",
            by_id[id],
            worker.stderr()
        );
    }
}
