//! An echo handler for worker-host: takes `{"text": ...}` and returns it.

use handler_abi::{export_handler, Handler, HandlerError, Job};
use serde::{Deserialize, Serialize};

/// The job's `input`. An input that does not match fails the job with the reason.
#[derive(Deserialize)]
pub struct Input {
    text: String,
}

/// The job's output.
#[derive(Serialize)]
pub struct Output {
    text: String,
}

/// The handler's state, built once by `init` and shared by every job.
pub struct Echo;

impl Handler for Echo {
    type Config = serde_json::Value; // the JSON given with --handler-config, {} by default
    type Input = Input;
    type Output = Output;

    fn init(_config: Self::Config) -> Result<Self, HandlerError> {
        Ok(Echo) // load your model here: this runs once, before the first job
    }

    fn handle(&self, input: Input, _job: &Job<'_>) -> Result<Output, HandlerError> {
        Ok(Output { text: input.text })
    }
}

export_handler!(Echo);
