//! Runs the real `worker-host` binary as an HTTP server (the dev API, the load-balancing server)
//! and waits for the log line that says where it listens, for tests that drive it over HTTP.

use crate::{send_sigterm, wait_for_exit};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the host may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `worker-host` process serving HTTP. Dropping it kills the process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    base_url: String,
    stderr: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `command` with stderr piped and waits until it logs `marker`; the word after it is
    /// turned into the base URL by `base_url`. Panics, showing stderr, if that does not happen
    /// within 30 s.
    pub fn start(mut command: Command, marker: &'static str, base_url: fn(&str) -> String) -> Self {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("worker-host could not be started");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(start) = line.find(marker) {
                    let rest = &line[start + marker.len()..];
                    let word = rest.split_whitespace().next().unwrap_or_default();
                    let _ = sender.send(base_url(word));
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

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
