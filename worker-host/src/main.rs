//! The `worker-host` binary: parse the command line, set up logging, run, exit with a documented
//! code. Everything else lives in the library.

use clap::Parser;
use std::process::ExitCode;
use worker_host::cli::{Cli, Command};
use worker_host::config::Settings;
use worker_host::{exit, logging};

fn main() -> ExitCode {
    // The host starts its handler's runner process from this same binary.
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if arguments
        .get(1)
        .is_some_and(|first| first == worker_host::handler::runner::RUNNER_ARGUMENT)
    {
        return worker_host::handler::runner::child::main(&arguments[2..]);
    }
    let cli = Cli::parse();
    if let Some(Command::New(args)) = &cli.command {
        return match worker_host::scaffold::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("worker-host: {error}");
                ExitCode::from(error.exit_code())
            }
        };
    }
    let working_dir = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let settings = match Settings::from_cli(cli, &working_dir) {
        Ok(settings) => settings,
        Err(error) => return fail(&worker_host::HostError::from(error)),
    };
    logging::init(settings.log_level, settings.log_format);
    match worker_host::run(settings) {
        Ok(code) => ExitCode::from(code),
        Err(error) => fail(&error),
    }
}

/// Prints the error and its causes on one line, and returns its exit code.
fn fail(error: &worker_host::HostError) -> ExitCode {
    let mut line = format!("worker-host: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("{line}");
    let code = error.exit_code();
    debug_assert_ne!(code, exit::SUCCESS);
    ExitCode::from(code)
}
