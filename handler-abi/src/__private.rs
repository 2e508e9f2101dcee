//! The glue `export_handler!` expands to: the `extern "C"` trampolines' bodies. Not a public
//! API; its items are public only so the macro can reach them from the handler's crate.
//!
//! Every entry point runs the handler inside `catch_unwind`: a panic must never cross the C
//! boundary (it would abort the whole worker), so it becomes an error with the panic message.
//! That includes a panic raised while the caught panic's payload is dropped (see
//! `panic_text`).

use crate::ffi;
use crate::job::borrowed_str;
use crate::{Handler, HandlerError, Job};
use std::any::Any;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// The body of the exported `init`.
///
/// # Safety
/// The arguments must be those of a live `wh_init_fn` call as the header documents them: `host`
/// points to the host's table, and `config_json` to `config_json_len` bytes of UTF-8 borrowed for
/// the call.
pub unsafe fn run_init<H: Handler>(
    instance: &OnceLock<H>,
    call: *mut ffi::wh_call,
    host: *const ffi::wh_host_api,
    config_json: *const c_char,
    config_json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the caller guarantees `host` is the host's table, valid for the call.
    let Some(host) = (unsafe { host.as_ref() }) else {
        return ffi::WH_STATUS_ERROR;
    };
    // SAFETY: the caller guarantees the config string is borrowed for the call.
    let config_text = unsafe { borrowed_str(config_json, config_json_len) };
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), HandlerError> {
        let text = if config_text.trim().is_empty() {
            "{}"
        } else {
            config_text
        };
        let config: H::Config = serde_json::from_str(text).map_err(|error| {
            HandlerError::new(
                "InvalidConfig",
                format!(
                    "the handler configuration does not match what this handler expects: {error}"
                ),
            )
        })?;
        let handler = H::init(config)?;
        if instance.set(handler).is_err() {
            return Err(HandlerError::new(
                "AlreadyInitialized",
                "init was called twice; the first instance is kept",
            ));
        }
        Ok(())
    }));
    // SAFETY: `call` and `host` are live for this call.
    unsafe { report(call, host, outcome) }
}

/// The body of the exported `handle`.
///
/// # Safety
/// The arguments must be those of a live `wh_handle_fn` call as the header documents them.
pub unsafe fn run_handle<H: Handler>(
    instance: &OnceLock<H>,
    call: *mut ffi::wh_call,
    host: *const ffi::wh_host_api,
    job: *const ffi::wh_job,
) -> ffi::wh_status {
    // SAFETY: the caller guarantees both pointers are valid for the call.
    let (Some(host), Some(raw_job)) = (unsafe { host.as_ref() }, unsafe { job.as_ref() }) else {
        return ffi::WH_STATUS_ERROR;
    };
    // SAFETY: the arguments are those of a live handle call; `job` is dropped before we return.
    let job = unsafe { Job::from_raw(call, host, raw_job) };
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), HandlerError> {
        let handler = instance.get().ok_or_else(|| {
            HandlerError::new(
                "NotInitialized",
                "handle was called before a successful init",
            )
        })?;
        let input: H::Input = serde_json::from_str(job.input_json()).map_err(|error| {
            HandlerError::new(
                "InvalidInput",
                format!("the job input does not match what this handler expects: {error}"),
            )
        })?;
        let output = handler.handle(input, &job)?;
        if H::STREAMING {
            return Ok(());
        }
        let json = serde_json::to_vec(&output).map_err(|error| {
            HandlerError::new(
                "InvalidOutput",
                format!("the output cannot be serialized: {error}"),
            )
        })?;
        // SAFETY: `call` is live, and `json` outlives the callback, which copies it.
        let status = unsafe { (host.set_output)(call, json.as_ptr().cast::<c_char>(), json.len()) };
        crate::CallbackError::check(status).map_err(|refusal| {
            HandlerError::new(
                "OutputRejected",
                format!("the host refused the output: {refusal}"),
            )
        })
    }));
    // SAFETY: `call` and `host` are live for this call.
    unsafe { report(call, host, outcome) }
}

/// The body of the exported `teardown`.
///
/// # Safety
/// The arguments must be those of a live `wh_teardown_fn` call as the header documents them.
pub unsafe fn run_teardown<H: Handler>(
    instance: &OnceLock<H>,
    call: *mut ffi::wh_call,
    host: *const ffi::wh_host_api,
) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if let Some(handler) = instance.get() {
            handler.teardown();
        }
    }));
    if let Err(payload) = outcome {
        let message = format!("teardown panicked: {}", panic_text(payload));
        // SAFETY: the caller guarantees `host` is valid for the call.
        if let Some(host) = unsafe { host.as_ref() } {
            // SAFETY: `call` is live; the message outlives the callback, which copies it.
            unsafe {
                (host.log)(
                    call,
                    ffi::WH_LOG_ERROR,
                    message.as_ptr().cast::<c_char>(),
                    message.len(),
                )
            };
        }
    }
}

/// Turns the outcome of a handler function into its status, reporting errors to the host.
///
/// # Safety
/// `call` must be live and `host` the host's table for it.
unsafe fn report(
    call: *mut ffi::wh_call,
    host: &ffi::wh_host_api,
    outcome: std::thread::Result<Result<(), HandlerError>>,
) -> ffi::wh_status {
    let error = match outcome {
        Ok(Ok(())) => return ffi::WH_STATUS_OK,
        Ok(Err(error)) => error,
        Err(payload) => HandlerError::new("Panic", panic_text(payload)),
    };
    let (error_type, message) = (error.error_type(), error.message());
    // SAFETY: `call` is live; both strings outlive the callback, which copies them.
    unsafe {
        (host.set_error)(
            call,
            error_type.as_ptr().cast::<c_char>(),
            error_type.len(),
            message.as_ptr().cast::<c_char>(),
            message.len(),
        )
    };
    ffi::WH_STATUS_ERROR
}

/// The message of a caught panic; consumes its payload.
///
/// The payload is any value the handler passed to `panic_any`, and its `Drop` may panic in turn.
/// Dropped outside `catch_unwind`, that second panic would unwind out of the `extern "C"`
/// trampoline and abort the worker; so the payload is dropped inside one, and the second
/// payload, which could do the same again, is leaked instead.
fn panic_text(payload: Box<dyn Any + Send>) -> String {
    let message = panic_message(&*payload);
    if let Err(second) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(second);
    }
    message
}

/// The message a panic was raised with, as `panic!` formats it.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "the handler panicked with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// What the fake host's callbacks received on this test's thread: (type, message) of
        /// each `set_error`, and each log line.
        static ERRORS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
        static LOGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    fn text(ptr: *const c_char, len: usize) -> String {
        // SAFETY: the SDK passes a (pointer, length) pair of a live `&str`.
        unsafe { borrowed_str(ptr, len) }.to_owned()
    }

    extern "C" fn log(_: *mut ffi::wh_call, _: ffi::wh_log_level, ptr: *const c_char, len: usize) {
        LOGS.with(|logs| logs.borrow_mut().push(text(ptr, len)));
    }

    extern "C" fn set_error(
        _: *mut ffi::wh_call,
        type_ptr: *const c_char,
        type_len: usize,
        message_ptr: *const c_char,
        message_len: usize,
    ) -> ffi::wh_status {
        let error = (text(type_ptr, type_len), text(message_ptr, message_len));
        ERRORS.with(|errors| errors.borrow_mut().push(error));
        ffi::WH_STATUS_OK
    }

    extern "C" fn accept(_: *mut ffi::wh_call, _: *const c_char, _: usize) -> ffi::wh_status {
        ffi::WH_STATUS_OK
    }

    extern "C" fn not_cancelled(_: *mut ffi::wh_call) -> bool {
        false
    }

    extern "C" fn ignore(_: *mut ffi::wh_call) {}

    fn host() -> ffi::wh_host_api {
        ffi::wh_host_api {
            struct_size: std::mem::size_of::<ffi::wh_host_api>() as u32,
            abi_major: ffi::WH_ABI_MAJOR,
            abi_minor: ffi::WH_ABI_MINOR,
            log,
            set_output: accept,
            set_error,
            emit: accept,
            progress: accept,
            is_cancelled: not_cancelled,
            request_recycle: ignore,
        }
    }

    /// A panic payload whose `Drop` panics too.
    struct Bomb;

    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("the payload's drop panicked");
        }
    }

    /// Panics with a [`Bomb`] in `handle` and in `teardown`.
    struct Bomber;

    impl Handler for Bomber {
        type Config = serde_json::Value;
        type Input = serde_json::Value;
        type Output = ();

        fn init(_config: serde_json::Value) -> Result<Self, HandlerError> {
            Ok(Bomber)
        }

        fn handle(&self, _input: serde_json::Value, _job: &Job<'_>) -> Result<(), HandlerError> {
            std::panic::panic_any(Bomb)
        }

        fn teardown(&self) {
            std::panic::panic_any(Bomb)
        }
    }

    /// A panic whose payload panics again when dropped still fails only the job (and teardown
    /// only logs): nothing unwinds out of the SDK's entry points.
    #[test]
    fn a_payload_that_panics_on_drop_is_contained() {
        let instance = OnceLock::new();
        assert!(instance.set(Bomber).is_ok());
        let host = host();
        let (id, input) = ("job-1", "{}");
        let job = ffi::wh_job {
            struct_size: std::mem::size_of::<ffi::wh_job>() as u32,
            id: id.as_ptr().cast(),
            id_len: id.len(),
            input_json: input.as_ptr().cast(),
            input_json_len: input.len(),
            job_json: input.as_ptr().cast(),
            job_json_len: input.len(),
        };
        let call = std::ptr::null_mut();
        // SAFETY: `host` and `job` live across the call and their strings are UTF-8; the fake
        // host never dereferences `call`.
        let status = unsafe { run_handle(&instance, call, &host, &job) };
        assert_eq!(status, ffi::WH_STATUS_ERROR);
        let errors = ERRORS.with(|errors| errors.take());
        assert_eq!(
            errors,
            vec![(
                "Panic".to_owned(),
                "the handler panicked with a non-string payload".to_owned()
            )]
        );

        // SAFETY: as above.
        unsafe { run_teardown(&instance, call, &host) };
        let logs = LOGS.with(|logs| logs.take());
        assert_eq!(
            logs,
            vec!["teardown panicked: the handler panicked with a non-string payload"]
        );
    }
}
