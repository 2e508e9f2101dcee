//! The glue `export_handler!` expands to: the `extern "C"` trampolines' bodies. Not a public
//! API; its items are public only so the macro can reach them from the handler's crate.
//!
//! Every entry point runs the handler inside `catch_unwind`: a panic must never cross the C
//! boundary (it would abort the whole worker), so it becomes an error with the panic message.
//! That includes a panic raised while the caught panic's payload is dropped (see
//! `panic_text`). The error's traceback is the panic's location and a backtrace, which a panic
//! hook (see `install_panic_hook`) keeps for the thread that catches the panic.

use crate::ffi;
use crate::job::borrowed_str;
use crate::{Handler, HandlerError, Job};
use std::any::Any;
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

thread_local! {
    /// Whether this thread is inside one of the SDK's `catch_unwind`s: only its panics need a
    /// traceback taken (a backtrace is not free).
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// The location and backtrace of this thread's last panic inside a `catch_unwind` of the SDK,
    /// taken by the panic hook, read once the panic is caught.
    static PANIC_TRACE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Adds the SDK's panic hook in front of the one already set (once per handler library, which
/// has its own copy of std and so its own hook). It records where a panic inside an SDK call was
/// raised, and a backtrace (whatever `RUST_BACKTRACE` says), then runs the previous hook, which
/// prints the panic as it always did: stderr gets nothing more than before.
fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.try_with(Cell::get).unwrap_or(false) {
                let location = info
                    .location()
                    .map_or_else(|| "an unknown location".to_owned(), ToString::to_string);
                let trace = format!(
                    "panicked at {location}\nstack backtrace:\n{}",
                    Backtrace::force_capture()
                );
                let _ = PANIC_TRACE.try_with(|slot| {
                    if let Ok(mut slot) = slot.try_borrow_mut() {
                        *slot = Some(trace);
                    }
                });
            }
            previous(info);
        }));
    });
}

/// Marks this thread as inside an SDK `catch_unwind` until dropped (and forgets an older trace).
struct Catching {
    was: bool,
}

impl Catching {
    fn enter() -> Self {
        let _ = PANIC_TRACE.try_with(|slot| slot.borrow_mut().take());
        Self {
            was: CATCHING.with(|catching| catching.replace(true)),
        }
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        CATCHING.with(|catching| catching.set(self.was));
    }
}

/// Runs `body` inside `catch_unwind`: a panic becomes a `Panic` error with the panic's message
/// and, as its traceback, its location and backtrace.
fn caught<T>(body: impl FnOnce() -> Result<T, HandlerError>) -> Result<T, HandlerError> {
    install_panic_hook();
    let catching = Catching::enter();
    let outcome = catch_unwind(AssertUnwindSafe(body));
    drop(catching);
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            // Taken before the payload is dropped: a drop that panics would replace it.
            let trace = PANIC_TRACE.with(|slot| slot.borrow_mut().take());
            let error = HandlerError::new("Panic", panic_text(payload));
            Err(match trace {
                Some(trace) => error.with_traceback(trace),
                None => error,
            })
        }
    }
}

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
    let outcome = caught(|| -> Result<(), HandlerError> {
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
        // SAFETY: `call` is live and `host` is its table.
        unsafe { report_features(call, host, &handler)? };
        if instance.set(handler).is_err() {
            return Err(HandlerError::new(
                "AlreadyInitialized",
                "init was called twice; the first instance is kept",
            ));
        }
        Ok(())
    });
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
    let outcome = caught(|| -> Result<(), HandlerError> {
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
        if handler.streaming() {
            return Ok(());
        }
        // Sized for an output about as large as the input (an echo, a transform): written
        // without a reallocation then. For a small output of a big input, the capacity it
        // leaves unused is never written, so the system gives it no memory.
        let mut json = Vec::with_capacity(job.input_json().len().saturating_add(64));
        serde_json::to_writer(&mut json, &output).map_err(|error| {
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
    });
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

/// Tells the host the features `handler` reports once built ([`Handler::max_concurrency`],
/// [`Handler::streaming`]) where they differ from the descriptor's (ABI 1.1 `set_features`). A
/// host without that callback cannot honour them: `init` fails, saying so.
///
/// # Safety
/// `call` must be a live `init` call and `host` the host's table for it.
unsafe fn report_features<H: Handler>(
    call: *mut ffi::wh_call,
    host: &ffi::wh_host_api,
    handler: &H,
) -> Result<(), HandlerError> {
    let (max_concurrency, streaming) = (handler.max_concurrency(), handler.streaming());
    if max_concurrency == H::MAX_CONCURRENCY && streaming == H::STREAMING {
        return Ok(());
    }
    if !host.has_1_1() {
        return Err(HandlerError::new(
            "UnsupportedHost",
            format!(
                "the handler reports its features after init, which needs a host speaking handler \
                 ABI 1.1; this host speaks {}.{}",
                host.abi_major, host.abi_minor
            ),
        ));
    }
    let features = if streaming {
        ffi::WH_FEATURE_STREAMING
    } else {
        0
    };
    // SAFETY: `call` is live, and the table has the 1.1 callbacks (checked above).
    let status = unsafe { (host.set_features)(call, max_concurrency, features) };
    crate::CallbackError::check(status).map_err(|refusal| {
        HandlerError::new(
            "FeaturesRejected",
            format!("the host refused the features reported after init: {refusal}"),
        )
    })
}

/// Turns the outcome of a handler function into its status, reporting errors (and their
/// tracebacks, to a host that takes them) to the host.
///
/// # Safety
/// `call` must be live and `host` the host's table for it.
unsafe fn report(
    call: *mut ffi::wh_call,
    host: &ffi::wh_host_api,
    outcome: Result<(), HandlerError>,
) -> ffi::wh_status {
    let error = match outcome {
        Ok(()) => return ffi::WH_STATUS_OK,
        Err(error) => error,
    };
    if let Some(traceback) = error.traceback().filter(|_| host.has_1_1()) {
        // SAFETY: `call` is live, the table has the 1.1 callbacks (checked), and the text
        // outlives the callback, which copies it.
        unsafe {
            (host.set_error_traceback)(call, traceback.as_ptr().cast::<c_char>(), traceback.len())
        };
    }
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
        static TRACEBACKS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
        static FEATURES: RefCell<Vec<(u32, u64)>> = const { RefCell::new(Vec::new()) };
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

    extern "C" fn set_error_traceback(
        _: *mut ffi::wh_call,
        ptr: *const c_char,
        len: usize,
    ) -> ffi::wh_status {
        TRACEBACKS.with(|tracebacks| tracebacks.borrow_mut().push(text(ptr, len)));
        ffi::WH_STATUS_OK
    }

    extern "C" fn set_features(
        _: *mut ffi::wh_call,
        max_concurrency: u32,
        features: u64,
    ) -> ffi::wh_status {
        FEATURES.with(|reported| reported.borrow_mut().push((max_concurrency, features)));
        ffi::WH_STATUS_OK
    }

    /// Learns in `init` that it streams and takes one job at a time.
    struct Bridge;

    impl Handler for Bridge {
        type Config = serde_json::Value;
        type Input = serde_json::Value;
        type Output = ();

        fn init(_config: serde_json::Value) -> Result<Self, HandlerError> {
            Ok(Bridge)
        }

        fn handle(&self, _input: serde_json::Value, _job: &Job<'_>) -> Result<(), HandlerError> {
            Ok(())
        }

        fn streaming(&self) -> bool {
            true
        }

        fn max_concurrency(&self) -> u32 {
            1
        }
    }

    /// Features that differ from the constants are reported with `set_features` after `init`;
    /// a host without that callback (ABI 1.0) fails the `init`, saying why, and is never given
    /// a call past its table.
    #[test]
    fn features_known_after_init_are_reported() {
        let config = "{}";
        let host = host();
        let instance = OnceLock::new();
        // SAFETY: `host` and the config live across the call; the fake host never dereferences
        // `call`.
        let status = unsafe {
            run_init::<Bridge>(
                &instance,
                std::ptr::null_mut(),
                &host,
                config.as_ptr().cast(),
                2,
            )
        };
        assert_eq!(status, ffi::WH_STATUS_OK);
        let reported = FEATURES.with(|reported| reported.take());
        assert_eq!(reported, vec![(1, ffi::WH_FEATURE_STREAMING)]);

        let old_host = ffi::wh_host_api {
            struct_size: ffi::HOST_API_SIZE_1_0 as u32,
            abi_minor: 0,
            ..host
        };
        let instance = OnceLock::new();
        // SAFETY: as above.
        let status = unsafe {
            run_init::<Bridge>(
                &instance,
                std::ptr::null_mut(),
                &old_host,
                config.as_ptr().cast(),
                2,
            )
        };
        assert_eq!(status, ffi::WH_STATUS_ERROR);
        assert!(FEATURES.with(|reported| reported.take()).is_empty());
        let errors = ERRORS.with(|errors| errors.take());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "UnsupportedHost");
        assert!(errors[0].1.contains("ABI 1.1"), "{errors:?}");
    }

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
            set_error_traceback,
            set_features,
        }
    }

    /// A job for the fake host: id `job-1`, input `{}`.
    fn job() -> ffi::wh_job {
        let (id, input) = ("job-1", "{}");
        ffi::wh_job {
            struct_size: std::mem::size_of::<ffi::wh_job>() as u32,
            id: id.as_ptr().cast(),
            id_len: id.len(),
            input_json: input.as_ptr().cast(),
            input_json_len: input.len(),
            job_json: input.as_ptr().cast(),
            job_json_len: input.len(),
        }
    }

    /// Panics with a message, from a line the test finds by its text.
    struct Panicker;

    impl Handler for Panicker {
        type Config = serde_json::Value;
        type Input = serde_json::Value;
        type Output = ();

        fn init(_config: serde_json::Value) -> Result<Self, HandlerError> {
            Ok(Panicker)
        }

        fn handle(&self, _input: serde_json::Value, _job: &Job<'_>) -> Result<(), HandlerError> {
            panic!("the marker panic") // the traceback test looks for this line
        }
    }

    /// A panic's error carries a traceback that names the file and line of the `panic!` and holds
    /// a backtrace, handed to the host with `set_error_traceback`; the message is unchanged.
    #[test]
    fn a_panic_s_traceback_names_its_location() {
        let instance = OnceLock::new();
        assert!(instance.set(Panicker).is_ok());
        let host = host();
        let job = job();
        // SAFETY: `host` and `job` live across the call and their strings are UTF-8; the fake
        // host never dereferences `call`.
        let status = unsafe { run_handle(&instance, std::ptr::null_mut(), &host, &job) };
        assert_eq!(status, ffi::WH_STATUS_ERROR);
        let errors = ERRORS.with(|errors| errors.take());
        assert_eq!(
            errors,
            vec![("Panic".to_owned(), "the marker panic".to_owned())]
        );
        let line = include_str!("__private.rs")
            .lines()
            .position(|line| line.contains("panic!(\"the marker panic\")"))
            .expect("the marker line")
            + 1;
        let tracebacks = TRACEBACKS.with(|tracebacks| tracebacks.take());
        assert_eq!(tracebacks.len(), 1, "{tracebacks:?}");
        let traceback = &tracebacks[0];
        assert!(
            traceback.starts_with(&format!("panicked at handler-abi/src/__private.rs:{line}:")),
            "{traceback}"
        );
        assert!(traceback.contains("stack backtrace:"), "{traceback}");
    }

    /// An error that carries a traceback hands it to the host; one without does not call
    /// `set_error_traceback` at all.
    #[test]
    fn an_error_s_own_traceback_reaches_the_host() {
        let host = host();
        for (error, expected) in [
            (
                HandlerError::msg("bad").with_traceback("at the step that failed"),
                vec!["at the step that failed".to_owned()],
            ),
            (HandlerError::msg("bad"), vec![]),
        ] {
            // SAFETY: the fake host never dereferences `call`.
            let status = unsafe { report(std::ptr::null_mut(), &host, Err(error)) };
            assert_eq!(status, ffi::WH_STATUS_ERROR);
            assert_eq!(TRACEBACKS.with(|tracebacks| tracebacks.take()), expected);
        }
        ERRORS.with(|errors| errors.take());
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
        let job = job();
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
