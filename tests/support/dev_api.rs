//! Runs the real `worker-host` binary as a local dev API (`--rp_serve_api`) on a free loopback
//! port, for tests that drive it over HTTP.

use crate::{artifacts, send_sigterm, wait_for_exit, worker_host, Sample};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The line the host logs once the dev API accepts connections, followed by its base URL.
const LISTENING: &str = "Local dev API listening on ";

/// How long the host may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `worker-host --rp_serve_api` process. Dropping it kills the process.
#[derive(Debug)]
pub struct DevApi {
    child: Child,
    base_url: String,
    stderr: Arc<Mutex<String>>,
}

impl DevApi {
    /// Starts the dev API on `sample` with extra arguments, on port 0 (a free port), and waits
    /// until it listens. Panics, showing stderr, if it does not within 30 s.
    pub fn start(sample: Sample, args: &[&str]) -> Self {
        Self::start_with_env(sample, args, &[])
    }

    /// [`DevApi::start`] with extra environment variables.
    pub fn start_with_env(sample: Sample, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_library(artifacts().library(sample), args, env)
    }

    /// [`DevApi::start_with_env`] on any handler library, such as a test fixture.
    pub fn start_library(library: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command: Command = worker_host();
        command
            .arg("--handler")
            .arg(library)
            .args(["--rp_serve_api", "--rp_api_port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("worker-host could not be started");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(start) = line.find(LISTENING) {
                    let rest = &line[start + LISTENING.len()..];
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let _ = sender.send(url.to_owned());
                }
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let base_url = loop {
            if let Ok(url) = receiver.recv_timeout(Duration::from_millis(50)) {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "worker-host exited ({status}) before listening; stderr:\n{}",
                    stderr.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "worker-host did not start listening in {START_TIMEOUT:?}; stderr:\n{}",
                    stderr.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
        };
        Self {
            child,
            base_url,
            stderr,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The base URL joined with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the host wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How the process ended, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the child can be waited for")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        send_sigterm(self.child.id());
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code (None = signal).
    /// Panics, with stderr, if it is still running then.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let stderr = self.stderr.clone();
        wait_for_exit(&mut self.child, timeout, || {
            stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }
}

impl Drop for DevApi {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
