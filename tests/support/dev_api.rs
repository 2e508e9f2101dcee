//! Runs the real `worker-host` binary as a local dev API (`--rp_serve_api`) on a free loopback
//! port, for tests that drive it over HTTP.

use crate::server::ServerProcess;
use crate::{artifacts, worker_host, Sample};
use std::path::Path;

/// The line the host logs once the dev API serves, followed by its base URL.
const LISTENING: &str = "Local dev API listening on ";

/// A `worker-host --rp_serve_api` process: a [`ServerProcess`] (its URL, stderr, signals and
/// exit). Dropping it kills the process.
#[derive(Debug)]
pub struct DevApi(ServerProcess);

impl DevApi {
    /// Starts the dev API on `sample` with extra arguments, on port 0 (a free port), and waits
    /// until it serves. Panics, showing stderr, if it does not within 30 s.
    pub fn start(sample: Sample, args: &[&str]) -> Self {
        Self::start_with_env(sample, args, &[])
    }

    /// [`DevApi::start`] with extra environment variables.
    pub fn start_with_env(sample: Sample, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_library(artifacts().library(sample), args, env)
    }

    /// [`DevApi::start_with_env`] on any handler library, such as a test fixture.
    pub fn start_library(library: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = worker_host();
        command
            .arg("--handler")
            .arg(library)
            .args(["--rp_serve_api", "--rp_api_port", "0"])
            .args(args)
            .envs(env.iter().copied());
        Self(ServerProcess::start(command, LISTENING, str::to_owned))
    }
}

impl std::ops::Deref for DevApi {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for DevApi {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.0
    }
}
