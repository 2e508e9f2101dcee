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
//! - `crash`: write to an invalid address, so the process dies of a real SIGSEGV;
//! - `abort`: call `abort()` (SIGABRT);
//! - `orphan`: start `sleep 30` as a child process, write "orphan pid N" to stderr, then crash
//!   (SIGSEGV), leaving the child behind;
//! - `exit`: end the process with `exit(code)`;
//! - `hang`: never return, ignoring cancellation;
//! - `oom`: allocate and touch memory, 64 MiB at a time, until the kernel kills the process;
//! - `close_fds`: close every file descriptor from 3 to 1023 (a daemonising mistake), then
//!   return the input;
//! - `env`: return `{"value": ...}`, the environment variable `message` names (null if unset);
//! - `read_file`: return `{"value": ...}`, the text of the file `message` names (null if it
//!   cannot be read; `$PPID` in the name is the parent's pid);
//! - `print`: write `message` to stdout and to stderr (as a handler's `printf` would), then
//!   return the input;
//! - `recycle`: ask for the worker to be recycled, then return the input;
//! - `big`: return a string of `bytes` bytes;
//! - `progress`: report `count` progress values (`{"done": i}`, i from 1) as fast as it can,
//!   then return `{"reported": count}`;
//! - `job`: return the whole job object the host passed (id, input, and whatever else it holds).
//!
//! Before `crash`, `abort`, `exit` and `hang`, a non-empty `message` is written to stderr.
//!
//! Config: `{"fail_init": "<message>"}` makes `init` fail with that message, and
//! `{"crash_init": true}` makes it crash (SIGSEGV), and `{"init_sleep_ms": N}` makes it take N
//! milliseconds; `{"init_says": "<line>"}` writes that line to stderr in `init` first.

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
    #[serde(default)]
    code: i32,
    #[serde(default)]
    count: u64,
}

/// Keeps no state.
pub struct Faulty;

impl Handler for Faulty {
    type Config = Value;
    type Input = RawJson;
    type Output = RawJson;

    fn init(config: Value) -> Result<Self, HandlerError> {
        if let Some(line) = config.get("init_says").and_then(Value::as_str) {
            eprintln!("{line}");
        }
        if let Some(ms) = config.get("init_sleep_ms").and_then(Value::as_u64) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if config.get("crash_init").and_then(Value::as_bool) == Some(true) {
            crash();
        }
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
            code: 0,
            count: 0,
        });
        if matches!(
            fault.mode.as_str(),
            "crash" | "abort" | "exit" | "hang" | "oom"
        ) && !fault.message.is_empty()
        {
            eprintln!("{}", fault.message);
        }
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
            "job" => Ok(serde_json::value::RawValue::from_string(
                job.job_json().to_owned(),
            )?),
            "crash" => crash(),
            "abort" => std::process::abort(),
            "orphan" => {
                let child = std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .map_err(|error| HandlerError::new("SpawnFailed", error.to_string()))?;
                eprintln!("orphan pid {}", child.id());
                crash()
            }
            "exit" => std::process::exit(fault.code),
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1_u8; 64 * 1024 * 1024]);
                    std::hint::black_box(&hoard);
                }
            }
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "env" => Ok(serde_json::value::to_raw_value(
                &serde_json::json!({ "value": std::env::var(&fault.message).ok() }),
            )?),
            "close_fds" => {
                extern "C" {
                    fn close(fd: std::ffi::c_int) -> std::ffi::c_int;
                }
                for fd in 3..1024 {
                    // SAFETY: `close` is the C library's; closing descriptors this handler does
                    // not own is the careless act this mode stands for.
                    unsafe { close(fd) };
                }
                Ok(input)
            }
            "read_file" => {
                let parent = std::os::unix::process::parent_id().to_string();
                let path = fault.message.replace("$PPID", &parent);
                let text = std::fs::read(path)
                    .ok()
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                Ok(serde_json::value::to_raw_value(
                    &serde_json::json!({ "value": text }),
                )?)
            }
            "print" => {
                println!("{}", fault.message);
                eprintln!("{}", fault.message);
                Ok(input)
            }
            "recycle" => {
                job.request_recycle();
                Ok(input)
            }
            "progress" => {
                for done in 1..=fault.count {
                    job.progress(&serde_json::json!({ "done": done }))
                        .map_err(|error| HandlerError::new("ProgressFailed", error.to_string()))?;
                }
                Ok(serde_json::value::to_raw_value(
                    &serde_json::json!({ "reported": fault.count }),
                )?)
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

/// Kills the process with a segmentation fault, as a buggy native handler would: a write to an
/// address nothing is mapped at. (Raising SIGSEGV would not do: Rust's own SIGSEGV handler
/// returns from a raised signal.)
fn crash() -> ! {
    let address = std::hint::black_box(16_usize) as *mut u8;
    // SAFETY: not safe at all, on purpose: the write faults, and the default SIGSEGV action
    // ends the process before anything could observe the write.
    unsafe { address.write_volatile(1) };
    unreachable!("the write above faults")
}

export_handler!(Faulty);
