//! The echo handler: returns each job's input unchanged, byte for byte.
//!
//! Copy this to start a handler of your own: implement `Handler`, call `export_handler!`, and
//! build the crate as a `cdylib`.

use handler_abi::{export_handler, Handler, HandlerError, Job, RawJson};

/// Keeps no state: every job is answered from its input alone.
pub struct Echo;

impl Handler for Echo {
    type Config = serde_json::Value;
    type Input = RawJson;
    type Output = RawJson;

    fn init(_config: Self::Config) -> Result<Self, HandlerError> {
        Ok(Echo)
    }

    fn handle(&self, input: RawJson, _job: &Job<'_>) -> Result<RawJson, HandlerError> {
        Ok(input)
    }
}

export_handler!(Echo);
