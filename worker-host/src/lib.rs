//! worker-host: runs a handler compiled as a shared library as a RunPod serverless worker.
//!
//! The data flows one way: [`cli`] → [`config`] → [`handler`] (load, check, init) → a mode
//! ([`oneshot`] today). `main` only parses, sets up logging, calls [`run`] and maps the result to
//! an exit code ([`exit`]).

pub mod cli;
pub mod config;
pub mod exit;
pub mod handler;
pub mod job;
pub mod logging;
pub mod oneshot;

use config::{ConfigError, Mode, Settings};
use handler::{Handler, HandlerInfo, HandlerLibrary, LoadError};

/// Why the host stopped before doing its work.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The settings are wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The handler could not be loaded or initialised.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The queue worker is not available in this build.
    #[error("RUNPOD_WEBHOOK_GET_JOB is set, but this build of worker-host cannot run as a queue worker yet: pass --test_input to run one job")]
    WorkerUnavailable,
}

impl HostError {
    /// The process exit code for this error (documented in the README and in [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(error) if error.is_test_input_error() => exit::JOB_FAILED,
            Self::Config(_) | Self::WorkerUnavailable => exit::USAGE,
            Self::Load(error) => exit::for_load_error(error),
        }
    }
}

/// Runs the host with resolved settings; returns the exit code.
pub fn run(settings: Settings) -> Result<u8, HostError> {
    let handler = HandlerLibrary::load(&settings.handler_path, settings.limits)?;
    let info = handler.info().clone();
    tracing::debug!(
        handler = %info.name,
        version = %info.version,
        abi = %format_args!("{}.{}", info.abi_major, info.abi_minor),
        "handler loaded"
    );
    match settings.mode {
        Mode::Inspect { json } => {
            print_descriptor(&info, json);
            Ok(exit::SUCCESS)
        }
        Mode::OneShot(test) => {
            handler.init(&settings.handler_config)?;
            let verdict = oneshot::run(&handler, &test, &settings.results);
            handler.teardown();
            Ok(match verdict {
                oneshot::Verdict::Passed => exit::SUCCESS,
                oneshot::Verdict::JobFailed => exit::JOB_FAILED,
                oneshot::Verdict::OutputMismatch(differences) => {
                    eprintln!("The output differs from --test_output:");
                    for line in differences {
                        eprintln!("  {line}");
                    }
                    exit::JOB_FAILED
                }
            })
        }
        Mode::Worker { .. } => Err(HostError::WorkerUnavailable),
    }
}

fn print_descriptor(info: &HandlerInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(info).expect("plain data serializes")
        );
        return;
    }
    let concurrency = match info.max_concurrency {
        0 => "no limit".to_owned(),
        n => n.to_string(),
    };
    println!("path:            {}", info.path.display());
    println!("name:            {}", info.name);
    println!("version:         {}", info.version);
    println!("abi:             {}.{}", info.abi_major, info.abi_minor);
    println!("max concurrency: {concurrency}");
    println!(
        "features:        {}",
        if info.streaming { "streaming" } else { "none" }
    );
}
