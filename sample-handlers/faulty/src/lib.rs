//! A deliberately faulty handler for tests: the job's input picks the fault.
//!
//! Input: `{"mode": "<mode>", ...}` where mode is one of
//! - `echo` (or no mode): return the input unchanged;
//! - `error`: fail with `{"type", "message"}` from the input;
//! - `error_key`: return `{"error": message}` as output (the Python SDK's way to fail a job);
//! - `panic`: panic with `message`;
//! - `panic_bomb`: panic with a payload whose `Drop` panics too;
//! - `sleep`: sleep `ms` milliseconds in 10 ms steps, failing early if the job is cancelled
//!   (unless `ignore_cancel` is true); logs "slept" at INFO when it returns;
//! - `crash`: raise SIGSEGV, killing the process;
//! - `recycle`: ask for the worker to be recycled, then return the input;
//! - `big`: return a string of `bytes` bytes.
//!
//! Config: `{"fail_init": "<message>"}` makes `init` fail with that message.

use handler_abi::{export_handler, Handler, HandlerError, Job, LogLevel, RawJson};
use serde::Deserialize;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The fields a faulty job may carry.
#[derive(Deserialize)]
struct Fault {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    bytes: usize,
    #[serde(default)]
    ignore_cancel: bool,
}

/// Keeps no state.
pub struct Faulty;

impl Handler for Faulty {
    type Config = Value;
    type Input = RawJson;
    type Output = RawJson;

    fn init(config: Value) -> Result<Self, HandlerError> {
        match config.get("fail_init").and_then(Value::as_str) {
            Some(message) => Err(HandlerError::new("InitFailed", message)),
            None => Ok(Faulty),
        }
    }

    fn handle(&self, input: RawJson, job: &Job<'_>) -> Result<RawJson, HandlerError> {
        let fault: Fault = serde_json::from_str(input.get()).unwrap_or(Fault {
            mode: String::new(),
            message: String::new(),
            error_type: None,
            ms: 0,
            bytes: 0,
            ignore_cancel: false,
        });
        match fault.mode.as_str() {
            "error" => Err(HandlerError::new(
                fault.error_type.unwrap_or_else(|| "ValueError".into()),
                fault.message,
            )),
            "error_key" => Ok(serde_json::value::to_raw_value(
                &serde_json::json!({ "error": fault.message }),
            )?),
            "panic" => panic!("{}", fault.message),
            "panic_bomb" => std::panic::panic_any(PanicBomb),
            "sleep" => {
                let deadline = Instant::now() + Duration::from_millis(fault.ms);
                while Instant::now() < deadline {
                    if job.is_cancelled() && !fault.ignore_cancel {
                        job.log(LogLevel::Info, "slept (cancelled)");
                        return Err(HandlerError::new("Cancelled", "the job was cancelled"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                job.log(LogLevel::Info, "slept");
                Ok(input)
            }
            "crash" => crash(),
            "recycle" => {
                job.request_recycle();
                Ok(input)
            }
            "big" => Ok(serde_json::value::to_raw_value(&"x".repeat(fault.bytes))?),
            _ => Ok(input),
        }
    }
}

/// A panic payload that panics again when it is dropped, after the panic was caught.
struct PanicBomb;

impl Drop for PanicBomb {
    fn drop(&mut self) {
        panic!("the panic payload's drop panicked");
    }
}

/// Kills the process with a segmentation fault, as a buggy native handler would.
fn crash() -> ! {
    extern "C" {
        fn raise(signal: std::ffi::c_int) -> std::ffi::c_int;
    }
    const SIGSEGV: std::ffi::c_int = 11;
    // SAFETY: `raise` is the C library's, with its C signature; sending a signal to ourselves
    // touches no Rust memory. The default SIGSEGV action ends the process.
    unsafe { raise(SIGSEGV) };
    std::process::abort()
}

export_handler!(Faulty);
