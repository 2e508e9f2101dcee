//! Shared support for the end-to-end tests: building and locating the real `worker-host` binary
//! and the real handler libraries, and running the binary in a clean environment.
//!
//! `cargo test` does not build the `cdylib` handlers or the binary of another package, so the
//! first test that needs them runs `cargo build` for those packages (with the `cargo` that is
//! running the tests) and reads where each artefact landed from cargo's own JSON messages.

pub mod conformance;
pub mod dev_api;
pub mod embed;
pub mod foreign;
pub mod load_balancing;
pub mod metrics;
pub mod platform;
pub mod python_bridge;
pub mod server;

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// The packages the tests load, and the binary they run.
const PACKAGES: &[&str] = &[
    "worker-host",
    "echo-handler",
    "stream-handler",
    "faulty-handler",
    "c-echo-handler",
    "cpp-echo-handler",
];

/// A handler library the tests can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// The Rust echo handler.
    Echo,
    /// The Rust streaming handler.
    Stream,
    /// The Rust handler whose input picks a fault.
    Faulty,
    /// The echo handler written in C.
    CEcho,
    /// The echo handler written in C++ on `worker_host.hpp` (the input `"throw"` throws).
    CppEcho,
    /// The echo handler written in Go, built by [`foreign`] with `go build -buildmode=c-shared`.
    GoEcho,
    /// The echo handler written in Zig, built by [`foreign`] with `zig build-lib -dynamic`.
    ZigEcho,
    /// The sentence-embedding handler (a real model), built on demand by [`embed`].
    Embed,
}

/// Where the build put the binary and each handler.
#[derive(Debug)]
pub struct Artifacts {
    /// The `worker-host` executable.
    pub worker_host: PathBuf,
    libraries: HashMap<&'static str, PathBuf>,
}

impl Artifacts {
    /// The shared library of a sample handler.
    pub fn library(&self, sample: Sample) -> &Path {
        let package = match sample {
            Sample::Echo => "echo-handler",
            Sample::Stream => "stream-handler",
            Sample::Faulty => "faulty-handler",
            Sample::CEcho => "c-echo-handler",
            Sample::CppEcho => "cpp-echo-handler",
            Sample::GoEcho | Sample::ZigEcho => return foreign::library(sample),
            Sample::Embed => return embed::library(),
        };
        &self.libraries[package]
    }

    /// Every sample handler's package name and shared library.
    pub fn libraries(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        self.libraries
            .iter()
            .map(|(package, path)| (*package, path.as_path()))
    }
}

/// Builds (once per test process) and locates the binary and the sample handlers.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(build_artifacts)
}

fn build_artifacts() -> Artifacts {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    let mut command = Command::new(cargo);
    remove_cargo_test_env(&mut command);
    command
        .current_dir(workspace)
        .args(["build", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for package in PACKAGES {
        command.args(["-p", package]);
    }
    let output = command.output().expect("cargo could not be started");
    assert!(
        output.status.success(),
        "building the binary and the sample handlers failed"
    );

    let mut worker_host = None;
    let mut libraries = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(package) = package_of(&message) else {
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") if package == "worker-host" => {
                if let Some(path) = message["executable"].as_str() {
                    worker_host = Some(PathBuf::from(path));
                }
            }
            Some("compiler-artifact") => {
                let shared = message["filenames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .find(|name| name.ends_with(".so"));
                if let Some(path) = shared {
                    libraries.insert(package, PathBuf::from(path));
                }
            }
            // The C and C++ handlers are linked by their build scripts into their OUT_DIR.
            Some("build-script-executed")
                if matches!(package, "c-echo-handler" | "cpp-echo-handler") =>
            {
                let out_dir = message["out_dir"]
                    .as_str()
                    .expect("build scripts have an out_dir");
                let file = format!("lib{}.so", package.replace('-', "_"));
                libraries.insert(package, Path::new(out_dir).join(file));
            }
            _ => {}
        }
    }
    for package in &PACKAGES[1..] {
        assert!(
            libraries.contains_key(package),
            "the build produced no library for {package}"
        );
    }
    Artifacts {
        worker_host: worker_host.expect("the build produced no worker-host executable"),
        libraries,
    }
}

/// Removes the variables cargo gives a running test from `command`'s environment. Cargo gives a
/// running test its package's variables (OUT_DIR, CARGO_MANIFEST_DIR, ...); build scripts that
/// watch them (ring's does) would see a different environment from the outer `cargo test`, and
/// the two builds would keep rebuilding each other's dependencies.
pub fn remove_cargo_test_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "OUT_DIR"
            || name.starts_with("CARGO_PKG_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            command.env_remove(&*name);
        }
    }
}

/// The package name of a cargo JSON message, if it is one of ours.
fn package_of(message: &Value) -> Option<&'static str> {
    let id = message["package_id"].as_str()?;
    // Package ids look like `path+file:///.../sample-handlers/echo#echo-handler@0.1.0`, or
    // `path+file:///.../worker-host#0.1.0` when the directory has the package's name (or, with
    // older cargo, `echo-handler 0.1.0 (path+file://...)`).
    PACKAGES.iter().copied().find(|package| {
        id.contains(&format!("#{package}@"))
            || id.contains(&format!("/{package}#"))
            || id.starts_with(&format!("{package} "))
    })
}

/// The directory holding the deliberately broken handler libraries built by `build.rs`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("FIXTURE_DIR")).join(format!("lib{name}.so"))
}

/// The runpod-python release the conformance and client tests are written against.
pub const PYTHON_SDK_VERSION: &str = "1.12.0";

/// Whether `python3` with runpod [`PYTHON_SDK_VERSION`] can run here. When it cannot, the test
/// fails with what to install (see [`missing_prerequisite`]), unless skipping was asked for:
/// then it prints why `what` is skipped and returns false, and the caller skips.
pub fn python_sdk_available(what: &str) -> bool {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    let problem = PROBLEM.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import runpod; print(runpod.__version__)"])
            .stdin(Stdio::null())
            .output();
        match &output {
            Err(error) => Some(format!("python3 could not be started: {error}")),
            Ok(output) if !output.status.success() => Some(format!(
                "`import runpod` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(output) => {
                let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                (version != PYTHON_SDK_VERSION).then(|| {
                    format!("runpod {version} is installed, the tests need {PYTHON_SDK_VERSION}")
                })
            }
        }
    });
    let Some(problem) = problem else {
        return true;
    };
    missing_prerequisite(
        what,
        problem,
        &format!("the README's test command, or `.venv/bin/pip install runpod=={PYTHON_SDK_VERSION}` with .venv/bin on PATH"),
    );
    false
}

/// The variable that lets tests whose prerequisite is missing skip instead of failing.
pub const ALLOW_SKIPS: &str = "WORKER_HOST_TESTS_ALLOW_SKIPS";

/// A test's prerequisite (`problem`) is missing. No silent pass: this fails the test with what to
/// do, unless [`ALLOW_SKIPS`] is set (never under CI), when it prints that `what` is skipped and
/// returns, and the caller skips.
pub fn missing_prerequisite(what: &str, problem: &str, fix: &str) {
    let allowed = std::env::var_os(ALLOW_SKIPS).is_some() && std::env::var_os("CI").is_none();
    assert!(
        allowed,
        "{what} needs what is missing here: {problem}; fix: {fix} (or set {ALLOW_SKIPS}=1 to skip it)"
    );
    eprintln!("skipping {what}: {problem}; fix: {fix}");
}

/// A `worker-host` command with a clean environment: no RUNPOD_* or WORKER_HOST_* variable from
/// the machine running the tests leaks in.
pub fn worker_host() -> Command {
    let mut command = Command::new(&artifacts().worker_host);
    command.env_clear();
    for name in ["PATH", "HOME", "LANG", "LD_LIBRARY_PATH"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// The finished run of a command, with its streams as text.
#[derive(Debug)]
pub struct Run {
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Run {
    /// Runs the command to its end.
    pub fn of(command: &mut Command) -> Self {
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().expect("the command could not be started");
        Self {
            code: status.code(),
            stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// stdout's lines, each parsed as JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    /// The last stdout line: the job-done body of a one-shot run.
    pub fn result(&self) -> Value {
        self.json_lines().pop().expect("no result on stdout")
    }
}

/// Kills `child` and every process in its group (start it with `process_group(0)`), then reaps
/// it: the Python SDK forks a heartbeat process that a plain kill leaves running.
pub fn kill_process_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.wait();
}

/// Sends SIGTERM to a process, as a container runtime does to stop a worker.
pub fn send_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill could not be started");
    assert!(status.success(), "kill -TERM failed");
}

/// Waits for `child` to exit, up to `timeout`; returns its exit code (None = signal). Kills it and
/// panics, showing `stderr()`, if it is still running then.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    stderr: impl Fn() -> String,
) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "worker-host did not exit in {timeout:?}; stderr:\n{}",
                stderr()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A `worker-host` process running as a queue worker, with stderr captured to a file.
#[derive(Debug)]
pub struct WorkerProcess {
    child: std::process::Child,
    stderr_file: tempfile::NamedTempFile,
}

impl WorkerProcess {
    /// Starts the worker on `sample` against the stand-in platform, with extra arguments and
    /// environment variables (which override the platform's).
    pub fn start(
        platform: &platform::Platform,
        sample: Sample,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(platform, sample, args, env, false)
    }

    /// [`WorkerProcess::start`] in a process group of its own, as a shell runs a command in a
    /// terminal (so a signal to the group is what Ctrl-C sends).
    pub fn start_in_own_group(
        platform: &platform::Platform,
        sample: Sample,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(platform, sample, args, env, true)
    }

    /// [`WorkerProcess::start`] on the handler library at `library` (a fixture, say).
    pub fn start_library(
        platform: &platform::Platform,
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_library(platform, library, args, env, false)
    }

    fn spawn(
        platform: &platform::Platform,
        sample: Sample,
        args: &[&str],
        env: &[(&str, &str)],
        own_group: bool,
    ) -> Self {
        Self::spawn_library(platform, artifacts().library(sample), args, env, own_group)
    }

    fn spawn_library(
        platform: &platform::Platform,
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        own_group: bool,
    ) -> Self {
        let stderr_file = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut command = worker_host();
        command.arg("--handler").arg(library);
        command.args(args);
        for (name, value) in platform.worker_env() {
            command.env(name, value);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        command
            .stdout(Stdio::null())
            .stderr(stderr_file.reopen().expect("the temporary file reopens"));
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let child = command.spawn().expect("worker-host could not be started");
        Self { child, stderr_file }
    }

    /// Sends SIGTERM, as a container runtime does to stop a worker.
    pub fn terminate(&self) {
        send_sigterm(self.child.id());
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code (None = signal).
    /// Panics, with the worker's stderr, if it is still running then.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let stderr_path = self.stderr_file.path().to_owned();
        wait_for_exit(&mut self.child, timeout, || {
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        })
    }

    /// Everything the worker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_file.path()).unwrap_or_default()
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The child processes of `pid` (of any of its threads), from /proc.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    children.sort_unstable();
    children.dedup();
    children
}

/// Waits up to `timeout` for `pid` to have exactly one child (its runner), and returns it.
pub fn wait_for_one_child(pid: u32, timeout: std::time::Duration) -> u32 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let [child] = child_pids(pid)[..] {
            return child;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} has children {:?}, not one runner",
            child_pids(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends `signal` (a name such as `KILL`) to a process.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill could not be started");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
