//! A streaming handler: emits the chunks it is given one by one, reports progress before each,
//! and stops early when the job is cancelled.
//!
//! Input: `{"chunks": [<any JSON>...], "delay_ms": <optional pause before each chunk>,
//! "fail_after": <optional: fail once this many chunks are out>, "repeat": <optional: emit the
//! chunks this many times over, default 1>}`.

use handler_abi::{export_handler, Handler, HandlerError, Job};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// What a job asks this handler to stream.
#[derive(Deserialize)]
pub struct StreamInput {
    chunks: Vec<Box<RawValue>>,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    fail_after: Option<usize>,
    #[serde(default = "once")]
    repeat: usize,
}

fn once() -> usize {
    1
}

/// Keeps no state.
pub struct Stream;

impl Handler for Stream {
    type Config = serde_json::Value;
    type Input = StreamInput;
    type Output = ();
    const STREAMING: bool = true;

    fn init(_config: Self::Config) -> Result<Self, HandlerError> {
        Ok(Stream)
    }

    fn handle(&self, input: StreamInput, job: &Job<'_>) -> Result<(), HandlerError> {
        let total = input.chunks.len() * input.repeat;
        for (done, chunk) in input.chunks.iter().cycle().take(total).enumerate() {
            if input.fail_after == Some(done) {
                return Err(HandlerError::new(
                    "StreamFailed",
                    format!("failed after {done} chunk(s), as asked"),
                ));
            }
            if input.delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(input.delay_ms));
            }
            job.progress(&serde_json::json!({ "done": done, "total": total }))?;
            job.emit(chunk)?;
        }
        Ok(())
    }
}

export_handler!(Stream);
