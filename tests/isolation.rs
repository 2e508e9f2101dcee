//! The supervised runner, end to end: real handlers that crash (SIGSEGV, abort, exit, an escaping
//! C++ exception, SIGKILL from outside) or hang, run by the real binary as a queue worker
//! against the stand-in platform, under the dev API and in a one-shot run. A crash fails only the
//! jobs on that runner, with the cause; the host keeps its pid; a new runner takes the next job.

use e2e::dev_api::DevApi;
use e2e::platform::{results_by_id, Platform, Route};
use e2e::{
    artifacts, child_pids, fixture, process_alive, send_signal, wait_for_one_child, worker_host,
    Run, Sample, WorkerProcess,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// The `error_type` and `error_message` of a job-done body's error payload.
fn error_of(body: &Value) -> (String, String) {
    let text = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"));
    let payload: Value = serde_json::from_str(text).expect("the error string holds JSON");
    (
        payload["error_type"].as_str().unwrap().to_owned(),
        payload["error_message"].as_str().unwrap().to_owned(),
    )
}

/// A one-shot run of the faulty handler on `{"input": ...}` text `test_input`, with `args`.
fn one_shot_faulty(args: &[&str], test_input: &str) -> Run {
    Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(Sample::Faulty))
            .args(args)
            .args(["--test_input", test_input]),
    )
}

/// Starts the faulty handler's worker with `args` and a fast heartbeat, and waits until a
/// heartbeat lists the job `id` as running.
fn start_with_job_running(platform: &Platform, args: &[&str], id: &str) -> WorkerProcess {
    let worker = WorkerProcess::start(
        platform,
        Sample::Faulty,
        args,
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "the job running", |requests| {
        requests
            .iter()
            .any(|r| r.route == Route::Ping && r.query_value("job_id") == Some(id))
    });
    worker
}

/// The dev API's `/runsync` of `{"input": input}`: the job's status object.
fn runsync(api: &DevApi, input: Value) -> Value {
    reqwest::blocking::Client::new()
        .post(api.url("/v2/local/runsync"))
        .json(&json!({"input": input}))
        .send()
        .and_then(|answer| answer.json())
        .expect("a JSON answer")
}

/// Waits until the stand-in has final results for all of `ids`.
fn wait_for_results(platform: &Platform, ids: &[&str]) -> HashMap<String, Value> {
    let requests = platform.wait_for(WAIT, "the results", |requests| {
        let by_id = results_by_id(requests);
        ids.iter().all(|id| by_id.contains_key(*id))
    });
    results_by_id(&requests)
}

/// Each kind of crash (a real SIGSEGV, abort(), exit(3), an exception escaping a C++ handler)
/// fails its own job with one result naming the cause and the handler's last output; the host
/// keeps its pid, a new runner (another pid) runs the next job, which succeeds.
#[test]
fn each_crash_fails_its_job_and_the_next_job_succeeds() {
    let platform = Platform::start();
    let crashes = [
        (
            "segv",
            json!({"mode": "crash", "message": "about to fault"}),
            "was killed by SIGSEGV (signal 11",
        ),
        (
            "abort",
            json!({"mode": "abort", "message": "about to abort"}),
            "was killed by SIGABRT (signal 6",
        ),
        (
            "exit",
            json!({"mode": "exit", "code": 3, "message": "about to exit"}),
            "exited with status 3",
        ),
    ];
    let worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let host = worker.pid();
    for (name, input, cause) in crashes {
        let runner = wait_for_one_child(host, WAIT);
        platform.push_job(json!({"id": name, "input": input}));
        let ok = format!("{name}-after");
        platform.push_job(json!({"id": ok, "input": {"mode": "echo", "n": 1}}));
        let by_id = wait_for_results(&platform, &[name, &ok]);
        let (error_type, message) = error_of(&by_id[name]);
        assert_eq!(error_type, "HandlerCrashed", "{message}");
        assert!(message.contains(cause), "{name}: {message}");
        assert!(
            message.contains(&format!("last output ---\nabout to {}", &input_word(name))),
            "{name}: the handler's last output is missing: {message}"
        );
        assert_eq!(by_id[&ok], json!({"output": {"mode": "echo", "n": 1}}));
        assert!(process_alive(host), "the host died");
        let next_runner = wait_for_one_child(host, WAIT);
        assert_ne!(runner, next_runner, "the runner was not replaced");
        assert!(!process_alive(runner), "the crashed runner lingers");
    }
    assert!(process_alive(host));
    assert!(
        worker.stderr().contains("starting a new one"),
        "{}",
        worker.stderr()
    );
}

/// The word each crash job prints before it crashes.
fn input_word(name: &str) -> &'static str {
    match name {
        "segv" => "fault",
        "abort" => "abort",
        _ => "exit",
    }
}

/// A C++ handler whose exception escapes `handle` (std::terminate, SIGABRT) fails its job; the
/// worker goes on.
#[test]
fn an_escaping_cpp_exception_fails_only_its_job() {
    let mut api = DevApi::start_library(&fixture("cpp_throws"), &[], &[]);
    let runsync = |input: Value| runsync(&api, input);
    let crashed = runsync(json!("throw"));
    assert_eq!(crashed["status"], "FAILED", "{crashed}");
    let error: Value = serde_json::from_str(crashed["error"].as_str().unwrap()).unwrap();
    let message = error["error_message"].as_str().unwrap();
    assert!(message.contains("SIGABRT"), "{message}");
    assert!(
        message.contains("foreign exception"),
        "the runtime's last words are missing: {message}"
    );
    let fine = runsync(json!("fine"));
    assert_eq!(fine["status"], "COMPLETED", "{fine}");
    assert!(api.exit_status().is_none(), "the dev API died");
}

/// With two jobs running on one runner, a crash fails both: the sibling's failure names the
/// crash and the job that was running with it.
#[test]
fn siblings_of_a_crash_fail_with_the_cause() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "slow", "input": {"mode": "sleep", "ms": 10_000}}));
    let worker = start_with_job_running(&platform, &["--concurrency", "2"], "slow");
    platform.push_job(json!({"id": "boom", "input": {"mode": "crash"}}));
    let by_id = wait_for_results(&platform, &["slow", "boom"]);
    let (error_type, message) = error_of(&by_id["slow"]);
    assert_eq!(error_type, "HandlerCrashed");
    assert!(message.contains("SIGSEGV"), "{message}");
    assert!(message.contains("1 other job(s) (boom)"), "{message}");
    let (_, message) = error_of(&by_id["boom"]);
    assert!(message.contains("1 other job(s) (slow)"), "{message}");
    platform.push_job(json!({"id": "after", "input": 7}));
    let by_id = wait_for_results(&platform, &["after"]);
    assert_eq!(by_id["after"], json!({"output": 7}));
    assert!(process_alive(worker.pid()));
}

/// A runner killed with SIGKILL from outside is reported as a kill, and replaced.
#[test]
fn a_runner_killed_from_outside_is_reported_as_a_kill() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "victim", "input": {"mode": "sleep", "ms": 20_000}}));
    let worker = start_with_job_running(&platform, &[], "victim");
    let runner = wait_for_one_child(worker.pid(), WAIT);
    send_signal(runner, "KILL");
    let by_id = wait_for_results(&platform, &["victim"]);
    let (error_type, message) = error_of(&by_id["victim"]);
    assert_eq!(error_type, "HandlerCrashed");
    assert!(
        message.contains("was killed by SIGKILL (signal 9"),
        "{message}"
    );
    platform.push_job(json!({"id": "next", "input": 1}));
    assert_eq!(
        wait_for_results(&platform, &["next"])["next"],
        json!({"output": 1})
    );
}

/// Three crashes with no finished job between them: the worker reports itself unhealthy (naming
/// the crash loop) and exits 1, leaving the rest of the queue to other workers.
#[test]
fn a_crash_loop_ends_the_worker_unhealthy() {
    let platform = Platform::start();
    for n in 0..5 {
        platform.push_job(json!({"id": format!("c{n}"), "input": {"mode": "crash"}}));
    }
    let mut worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    assert_eq!(worker.wait(WAIT), Some(1), "{}", worker.stderr());
    let requests = platform.requests();
    let by_id = results_by_id(&requests);
    assert_eq!(
        by_id.len(),
        3,
        "three jobs were taken and failed: {by_id:?}"
    );
    let report = requests
        .iter()
        .find(|r| r.route == Route::Ping && r.query_value("status") == Some("unhealthy"))
        .expect("an unhealthy report");
    assert_eq!(report.query_value("check"), Some("handler_crashed"));
    assert!(
        report
            .query_value("reason")
            .unwrap()
            .contains("crashed 3 times"),
        "{report}"
    );
    assert_eq!(platform.pending_jobs(), 2, "the rest stay in the queue");
    assert!(worker.stderr().contains("crashed 3 times"));
}

/// A stopped job whose handler never returns is hard-stopped after --cancel-grace-secs: its
/// runner is killed, the heartbeat lists the job until then, its sibling fails saying why, no
/// result is posted for the stopped job, and the freed slots take the next job.
#[test]
fn a_hung_stopped_job_is_hard_stopped() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "hung", "input": {"mode": "hang"}}));
    platform.push_job(json!({"id": "sibling", "input": {"mode": "sleep", "ms": 20_000}}));
    let worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &["--concurrency", "2", "--cancel-grace-secs", "1"],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "both jobs running", |requests| {
        requests.iter().any(|r| {
            r.route == Route::Ping
                && r.query_value("job_id")
                    .is_some_and(|ids| ids.contains("hung") && ids.contains("sibling"))
        })
    });
    let runner = wait_for_one_child(worker.pid(), WAIT);
    let stopped_at = Instant::now();
    platform.stop_job("hung");
    let by_id = wait_for_results(&platform, &["sibling"]);
    assert!(stopped_at.elapsed() >= Duration::from_millis(900));
    let (error_type, message) = error_of(&by_id["sibling"]);
    assert_eq!(error_type, "HandlerKilled", "{message}");
    assert!(
        message.contains("because job hung was stopped and its handler did not return within 1 s"),
        "{message}"
    );
    assert!(
        !by_id.contains_key("hung"),
        "nothing is posted for a stopped job"
    );
    // Until the kill the heartbeat still listed the stopped job.
    let requests = platform.requests();
    let listed_after_stop = requests.iter().any(|r| {
        r.route == Route::Ping
            && r.at >= stopped_at + Duration::from_millis(300)
            && r.query_value("job_id")
                .is_some_and(|ids| ids.contains("hung"))
    });
    assert!(
        listed_after_stop,
        "the heartbeat dropped the stopped job before its handler returned"
    );
    platform.push_job(json!({"id": "next", "input": 2}));
    assert_eq!(
        wait_for_results(&platform, &["next"])["next"],
        json!({"output": 2})
    );
    assert_ne!(wait_for_one_child(worker.pid(), WAIT), runner);
}

/// Killing the host, even with SIGKILL, takes its runner with it: no process is left holding the
/// model.
#[test]
fn killing_the_host_leaves_no_runner() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "busy", "input": {"mode": "sleep", "ms": 30_000}}));
    let mut worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let runner = wait_for_one_child(worker.pid(), WAIT);
    send_signal(worker.pid(), "KILL");
    worker.wait(WAIT);
    wait_until_gone(runner, "the runner outlived its host");
}

/// A process the handler started does not outlive its crashed runner: the runner's whole process
/// group goes with it, so nothing is left holding memory or a GPU.
#[test]
fn what_a_crashed_handler_started_goes_with_it() {
    let run = one_shot_faulty(&[], r#"{"input": {"mode": "orphan"}}"#);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let (_, message) = error_of(&run.result());
    let orphan: u32 = message
        .split("orphan pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no orphan pid in {message}"));
    wait_until_gone(orphan, "the handler's child outlived its runner");
}

/// Waits up to 5 s for `pid` to be gone (or a zombie); panics with `what` if it is not.
fn wait_until_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{what}: process {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C in a terminal (SIGINT to the whole foreground process group) reaches the host only:
/// the running job finishes with its own result (it is not killed with the runner), and the
/// worker exits 0.
#[test]
fn ctrl_c_drains_instead_of_killing_the_runner() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "drained", "input": {"mode": "sleep", "ms": 1500}}));
    let mut worker = WorkerProcess::start_in_own_group(
        &platform,
        Sample::Faulty,
        &[],
        &[("RUNPOD_PING_INTERVAL", "100")],
    );
    platform.wait_for(WAIT, "the job running", |requests| {
        requests
            .iter()
            .any(|r| r.route == Route::Ping && r.query_value("job_id") == Some("drained"))
    });
    let group = format!("-{}", worker.pid());
    let status = std::process::Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(worker.wait(WAIT), Some(0), "{}", worker.stderr());
    let by_id = results_by_id(&platform.requests());
    assert_eq!(
        by_id["drained"],
        json!({"output": {"mode": "sleep", "ms": 1500}}),
        "{}",
        worker.stderr()
    );
}

/// The handler does not see the platform's worker key, and its stdout and stderr lines are logged
/// by the host in the job's span.
#[test]
fn the_runner_hides_the_worker_key_and_its_output_is_logged() {
    let platform = Platform::start();
    platform
        .push_job(json!({"id": "env", "input": {"mode": "env", "message": "RUNPOD_AI_API_KEY"}}));
    platform.push_job(json!({"id": "home", "input": {"mode": "env", "message": "HOME"}}));
    platform.push_job(
        json!({"id": "talk", "input": {"mode": "print", "message": "hello from printf"}}),
    );
    let worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let by_id = wait_for_results(&platform, &["env", "home", "talk"]);
    assert_eq!(by_id["env"], json!({"output": {"value": null}}));
    assert_eq!(
        by_id["home"],
        json!({"output": {"value": std::env::var("HOME").ok()}}),
        "the rest of the environment is the host's"
    );
    // The runner's output is read on its own thread, so its lines may be logged just after the
    // job's result went out.
    let talk_lines = |stderr: &str| {
        stderr
            .lines()
            .filter(|line| line.contains("job_id=talk") && line.contains("hello from printf"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while talk_lines(&worker.stderr()) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = worker.stderr();
    assert_eq!(
        talk_lines(&stderr),
        2,
        "one line from stdout, one from stderr:\n{stderr}"
    );
}

/// A handler that closes every descriptor (the runner's channel with them) fails its job with a
/// reason instead of leaving it without a result forever; the next job runs on a new runner.
#[test]
fn a_handler_that_closes_the_channel_fails_its_job() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "closer", "input": {"mode": "close_fds"}}));
    platform.push_job(json!({"id": "after", "input": 4}));
    let _worker = WorkerProcess::start(&platform, Sample::Faulty, &[], &[]);
    let by_id = wait_for_results(&platform, &["closer", "after"]);
    let (error_type, message) = error_of(&by_id["closer"]);
    assert_eq!(error_type, "HandlerCrashed", "{message}");
    assert!(
        message.contains("the channel to the host broke"),
        "{message}"
    );
    assert_eq!(by_id["after"], json!({"output": 4}));
}

/// Under the dev API a crash fails that request with the cause, and the next one succeeds.
#[test]
fn the_dev_api_survives_a_crash() {
    let mut api = DevApi::start(Sample::Faulty, &[]);
    let runsync = |input: Value| runsync(&api, input);
    let crashed = runsync(json!({"mode": "abort"}));
    assert_eq!(crashed["status"], "FAILED", "{crashed}");
    assert!(
        crashed["error"].as_str().unwrap().contains("SIGABRT"),
        "{crashed}"
    );
    let fine = runsync(json!({"n": 5}));
    assert_eq!(fine["output"], json!({"n": 5}), "{fine}");
    assert!(api.exit_status().is_none());
}

/// A one-shot run whose handler crashes prints the crash result and exits 1 (never dies by a
/// signal), so a CI log says what happened; a crash in init exits 8 with a sentence.
#[test]
fn a_one_shot_crash_exits_1_with_the_cause() {
    let run = one_shot_faulty(&[], r#"{"input": {"mode": "crash"}}"#);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let (error_type, message) = error_of(&run.result());
    assert_eq!(error_type, "HandlerCrashed");
    assert!(message.contains("SIGSEGV"), "{message}");
    let run = one_shot_faulty(
        &["--handler-config", r#"{"crash_init": true}"#],
        r#"{"input": 1}"#,
    );
    assert_eq!(run.code, Some(8), "{}", run.stderr);
    assert!(run.stderr.contains("init failed"), "{}", run.stderr);
    assert!(run.stderr.contains("SIGSEGV"), "{}", run.stderr);
}

/// A memory cgroup of its own for one test, with a limit, removed when dropped; `None` (with a
/// note) where none can be made (not root, or no memory controller).
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn create(limit_bytes: u64) -> Option<Self> {
        let name = format!("worker-host-test-{}", std::process::id());
        // cgroup v1's memory hierarchy, or v2's unified one with the memory controller.
        let candidates = [
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
            ("/sys/fs/cgroup", "memory.max"),
        ];
        for (root, limit_file) in candidates {
            let dir = std::path::Path::new(root).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            if std::fs::write(dir.join(limit_file), limit_bytes.to_string()).is_ok() {
                // No swap to escape to (v2); v1's swappiness.
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                let _ = std::fs::write(dir.join("memory.swappiness"), "0");
                return Some(Self { dir });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        e2e::missing_prerequisite(
            "the OOM-kill test",
            "no memory cgroup can be made here",
            "run the tests as root on a host with cgroup v1, or v2 with the memory controller",
        );
        None
    }

    /// A shell command line that joins the cgroup, then runs `program` with `args`.
    fn command(&self, program: &std::path::Path, args: &[&str]) -> std::process::Command {
        let mut command = worker_host();
        let mut line = format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\"",
            self.dir.display()
        );
        for index in 1..=args.len() {
            line.push_str(&format!(" \"${index}\""));
        }
        let mut shell = std::process::Command::new("sh");
        shell.arg("-c").arg(line).arg(program).args(args);
        // The clean environment of `worker_host()`.
        shell.env_clear();
        for (name, value) in command.get_envs() {
            if let Some(value) = value {
                shell.env(name, value);
            }
        }
        command.env_clear();
        shell.stdin(std::process::Stdio::null());
        shell
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The cgroup can go once its processes have.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A handler killed by the kernel's OOM killer (in a memory cgroup of 256 MiB) is reported as out
/// of memory, from the cgroup's OOM-kill count, not as a bare SIGKILL.
#[test]
fn an_oom_kill_is_reported_as_out_of_memory() {
    let Some(cgroup) = MemoryCgroup::create(256 * 1024 * 1024) else {
        return;
    };
    let library = artifacts()
        .library(Sample::Faulty)
        .to_str()
        .unwrap()
        .to_owned();
    let run = Run::of(&mut cgroup.command(
        &artifacts().worker_host,
        &[
            "--handler",
            &library,
            "--test_input",
            r#"{"input": {"mode": "oom"}}"#,
        ],
    ));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let (error_type, message) = error_of(&run.result());
    assert_eq!(error_type, "HandlerCrashed");
    assert!(
        message.contains("killed by SIGKILL (signal 9) because it ran out of memory"),
        "{message}"
    );
}

/// An `init` past `--init-timeout-secs` fails the start with a sentence that says so (exit 8), in
/// both isolations, long before the handler would have finished.
#[test]
fn an_init_past_its_deadline_fails() {
    for isolation in ["runner", "none"] {
        let started = Instant::now();
        let run = one_shot_faulty(
            &[
                "--isolation",
                isolation,
                "--init-timeout-secs",
                "0.5",
                "--handler-config",
                r#"{"init_sleep_ms": 60000}"#,
            ],
            r#"{"input": 1}"#,
        );
        assert_eq!(run.code, Some(8), "{isolation}: {}", run.stderr);
        assert!(
            run.stderr.contains("init did not finish within 0.5 s"),
            "{isolation}: {}",
            run.stderr
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{isolation}");
    }
}

/// With `--isolation none` the handler runs in the host: no runner process.
#[test]
fn isolation_none_runs_in_process() {
    let mut api = DevApi::start(Sample::Echo, &["--isolation", "none"]);
    assert!(child_pids(api.pid()).is_empty(), "a runner was started");
    let answer: Value = reqwest::blocking::Client::new()
        .post(api.url("/v2/local/runsync"))
        .json(&json!({"input": 3}))
        .send()
        .and_then(|answer| answer.json())
        .unwrap();
    assert_eq!(answer["output"], 3);
    assert!(api.exit_status().is_none());
}

/// A SIGHUP while a job runs does not end the worker (its default action would, losing the job):
/// it asks for a swap (here of an unchanged file), and the job delivers its result.
#[test]
fn sighup_loses_nothing() {
    let platform = Platform::start();
    platform.push_job(json!({"id": "during", "input": {"mode": "sleep", "ms": 1000}}));
    let worker = start_with_job_running(&platform, &[], "during");
    send_signal(worker.pid(), "HUP");
    let by_id = wait_for_results(&platform, &["during"]);
    assert_eq!(
        by_id["during"],
        json!({"output": {"mode": "sleep", "ms": 1000}})
    );
    assert!(process_alive(worker.pid()));
    assert!(
        worker.stderr().contains("Handler swap requested (SIGHUP)"),
        "{}",
        worker.stderr()
    );
}

/// SIGTERM while a slow `init` runs (a model load) stops the worker in every serving mode: exit
/// 0 well before the load would have ended, its runner gone, nothing taken or served. (Without
/// it, the signal's default action ended the host with 143, or, as PID 1 in a container, did
/// nothing until the platform's kill.)
#[test]
fn a_shutdown_during_init_stops_every_serving_mode() {
    let config = r#"{"init_sleep_ms": 60000, "init_says": "loading the model"}"#;
    let args = ["--handler-config", config];
    let init_started = |stderr: &dyn Fn() -> String| {
        let deadline = Instant::now() + WAIT;
        while !stderr().contains("loading the model") {
            assert!(
                Instant::now() < deadline,
                "init never started: {}",
                stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stopped = |mode: &str, code: Option<i32>, stderr: String, runner: u32| {
        assert_eq!(code, Some(0), "{mode}: {stderr}");
        assert!(
            stderr.contains("Shutdown asked for during init"),
            "{mode}: {stderr}"
        );
        wait_until_gone(runner, "the runner outlived a shutdown during init");
    };

    let platform = Platform::start();
    platform.push_job(json!({"id": "never", "input": {}}));
    let mut worker = WorkerProcess::start(&platform, Sample::Faulty, &args, &[]);
    init_started(&|| worker.stderr());
    let runner = wait_for_one_child(worker.pid(), WAIT);
    worker.terminate();
    let code = worker.wait(Duration::from_secs(20));
    stopped("queue worker", code, worker.stderr(), runner);
    assert!(
        !platform
            .requests()
            .iter()
            .any(|r| matches!(r.route, Route::Take | Route::TakeBatch)),
        "a job was taken after the shutdown"
    );

    let mut balancer = e2e::load_balancing::LoadBalancer::start(Sample::Faulty, &args);
    init_started(&|| balancer.stderr());
    let runner = wait_for_one_child(balancer.pid(), WAIT);
    balancer.terminate();
    let code = balancer.wait(Duration::from_secs(20));
    stopped("load balancing", code, balancer.stderr(), runner);

    // The dev API says it listens only once init is done: its stderr goes to a file instead.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut dev = worker_host()
        .arg("--handler")
        .arg(artifacts().library(Sample::Faulty))
        .args(args)
        .args(["--rp_serve_api", "--rp_api_port", "0"])
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let dev_stderr = || std::fs::read_to_string(log.path()).unwrap_or_default();
    init_started(&dev_stderr);
    let runner = wait_for_one_child(dev.id(), WAIT);
    send_signal(dev.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = dev.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = dev.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stopped("dev API", code, dev_stderr(), runner);
}

/// A handler in the host's own process cannot have its `init` interrupted: after a SIGTERM the
/// host waits for it (still running, having said so), and a second SIGTERM ends it at once with
/// 143, the code a shell gives a process SIGTERM ended.
#[test]
fn a_second_sigterm_ends_an_uninterruptible_init_at_once() {
    let platform = Platform::start();
    let mut worker = WorkerProcess::start(
        &platform,
        Sample::Faulty,
        &[
            "--isolation",
            "none",
            "--handler-config",
            r#"{"init_sleep_ms": 60000, "init_says": "loading the model"}"#,
        ],
        &[],
    );
    let deadline = Instant::now() + WAIT;
    while !worker.stderr().contains("loading the model") {
        assert!(
            Instant::now() < deadline,
            "init never started: {}",
            worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.terminate();
    let deadline = Instant::now() + WAIT;
    while !worker.stderr().contains("cannot be interrupted") {
        assert!(Instant::now() < deadline, "{}", worker.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        process_alive(worker.pid()),
        "the first SIGTERM ended the host"
    );
    worker.terminate();
    assert_eq!(
        worker.wait(Duration::from_secs(10)),
        Some(143),
        "{}",
        worker.stderr()
    );
}
