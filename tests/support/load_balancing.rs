//! Runs the real `worker-host` binary as a load-balancing server (`--load-balancing`) on a free
//! port, for tests that drive it over HTTP.

use crate::server::ServerProcess;
use crate::{artifacts, worker_host, Sample};
use std::path::Path;

/// The line the host logs once it listens (before `init`), followed by its address.
const LISTENING: &str = "Load-balancing server listening on ";

/// A `worker-host --load-balancing` process: a [`ServerProcess`]. Dropping it kills the process.
#[derive(Debug)]
pub struct LoadBalancer(ServerProcess);

impl LoadBalancer {
    /// Starts the server on `sample` with extra arguments, on port 0 (a free port), and waits
    /// until it listens (its `init` may still run). Panics, showing stderr, if it does not
    /// within 30 s.
    pub fn start(sample: Sample, args: &[&str]) -> Self {
        Self::start_library(artifacts().library(sample), args, &[])
    }

    /// [`LoadBalancer::start`] on any handler library, with extra environment variables.
    pub fn start_library(library: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = worker_host();
        command
            .arg("--handler")
            .arg(library)
            .args(["--load-balancing", "--port", "0"])
            .args(args)
            .envs(env.iter().copied());
        Self(ServerProcess::start(command, LISTENING, |address| {
            let port = address.rsplit(':').next().unwrap_or_default();
            format!("http://127.0.0.1:{port}")
        }))
    }
}

impl std::ops::Deref for LoadBalancer {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for LoadBalancer {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.0
    }
}
