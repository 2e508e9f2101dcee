//! The in-process handler: a shared library loaded with `dlopen`, its descriptor checked, and the
//! host's callback table it calls back into.
//!
//! This is the host's only `unsafe` code. The rules it relies on are those of
//! `handler-abi/include/worker_host.h`: the descriptor is static; inputs we pass are borrowed for
//! the call; everything the handler passes to a callback is copied before the callback returns;
//! the `wh_call` pointer is valid only while the handler function it was given to runs.
//!
//! A loaded library is never unloaded (`dlclose`): Rust and Go libraries cannot be unloaded
//! safely, and a worker process loads its handler once.

use super::{CancelToken, Handler, HandlerInfo, JobEvents, Limits};
use crate::job::{Failure, Job, JobResult, Outcome, RawJson};
use handler_abi::ffi;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use tracing::Span;

/// Why a handler library could not be made ready. Each message is one sentence a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not name a file.
    #[error("handler library {path} does not exist: build it (cargo build --release) or point --handler / WORKER_HOST_HANDLER at the .so file")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// `dlopen` refused the file.
    #[error("{path} could not be loaded as a shared library ({reason}): is it a .so built for this platform, with its dependencies installed?")]
    NotALibrary {
        /// The path given.
        path: PathBuf,
        /// What the dynamic loader said.
        reason: String,
    },
    /// The entry symbol is missing.
    #[error("{path} is not a worker-host handler: it does not export wh_handler_entry (use export_handler! in Rust, or define wh_handler_entry from worker_host.h in C)")]
    MissingEntry {
        /// The path given.
        path: PathBuf,
    },
    /// The entry function returned NULL.
    #[error("{path} refused to load: its wh_handler_entry returned NULL")]
    NullDescriptor {
        /// The path given.
        path: PathBuf,
    },
    /// The handler was built for another ABI major.
    #[error("{path} was built for handler ABI {handler_major}, but this worker-host speaks ABI {host_major}: rebuild the handler against handler-abi {host_major}.x, or use a worker-host that speaks ABI {handler_major}")]
    AbiMismatch {
        /// The path given.
        path: PathBuf,
        /// The major the handler declares.
        handler_major: u16,
        /// The major this host speaks.
        host_major: u16,
    },
    /// The descriptor is smaller than ABI 1.0's.
    #[error("{path} has a handler descriptor of {size} bytes, smaller than the {expected} bytes of ABI 1.0: it was not built from worker_host.h")]
    DescriptorTooSmall {
        /// The path given.
        path: PathBuf,
        /// `struct_size` as declared.
        size: u32,
        /// The ABI 1.0 size.
        expected: usize,
    },
    /// A required descriptor field is NULL.
    #[error("{path} has an invalid handler descriptor: {field} is NULL")]
    InvalidDescriptor {
        /// The path given.
        path: PathBuf,
        /// The NULL field.
        field: &'static str,
    },
    /// The handler's `init` failed.
    #[error("the handler's init failed: {failure}")]
    InitFailed {
        /// What the handler reported.
        failure: Failure,
    },
}

/// A handler library loaded into this process.
#[derive(Debug)]
pub struct HandlerLibrary {
    descriptor: &'static ffi::wh_handler_descriptor,
    info: HandlerInfo,
    limits: Limits,
}

impl HandlerLibrary {
    /// Loads the library at `path` and checks its descriptor, without running `init`.
    pub fn load(path: &Path, limits: Limits) -> Result<Self, LoadError> {
        // dlopen searches the library path for a name without a slash; an operator's path always
        // means a file, so make it absolute first.
        let path_buf = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = path_buf.as_path();
        if !path.is_file() {
            return Err(LoadError::NotFound { path: path_buf });
        }
        // SAFETY: loading a library runs its initialisers. That is the point of a handler
        // library, and the operator chose this file; nothing in this process depends on the
        // library's initialisers not running.
        let library = unsafe {
            libloading::os::unix::Library::open(
                Some(path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|error| LoadError::NotALibrary {
            path: path_buf.clone(),
            reason: loader_reason(&error),
        })?;
        // SAFETY: the header declares the entry symbol with exactly this type.
        let entry = unsafe { library.get::<ffi::wh_handler_entry_fn>(ffi::WH_ENTRY_SYMBOL) }
            .map_err(|_| LoadError::MissingEntry {
                path: path_buf.clone(),
            })?;
        let entry: ffi::wh_handler_entry_fn = *entry;
        // The library stays loaded for the life of the process (see the module docs), which is
        // what makes the descriptor and every function pointer in it 'static.
        std::mem::forget(library);
        // SAFETY: the entry function takes no arguments and, per the header, returns a pointer to
        // a static descriptor or NULL.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(LoadError::NullDescriptor { path: path_buf });
        }
        // SAFETY: a non-NULL descriptor is static and immutable (header), and its first eight
        // bytes (struct_size, abi_major, abi_minor) are at these offsets in every ABI major, so
        // reading them is valid before we know the major.
        let (struct_size, abi_major) = unsafe { read_header(descriptor) };
        if abi_major != ffi::WH_ABI_MAJOR {
            return Err(LoadError::AbiMismatch {
                path: path_buf,
                handler_major: abi_major,
                host_major: ffi::WH_ABI_MAJOR,
            });
        }
        let expected = std::mem::size_of::<ffi::wh_handler_descriptor>();
        if (struct_size as usize) < expected {
            return Err(LoadError::DescriptorTooSmall {
                path: path_buf,
                size: struct_size,
                expected,
            });
        }
        // SAFETY: the descriptor is at least as large as ABI 1.0's and built for ABI 1, so every
        // 1.0 field is present; it is static because the library is never unloaded.
        let descriptor: &'static ffi::wh_handler_descriptor = unsafe { &*descriptor };
        let missing = |field| LoadError::InvalidDescriptor {
            path: path_buf.clone(),
            field,
        };
        if descriptor.init.is_none() {
            return Err(missing("init"));
        }
        if descriptor.handle.is_none() {
            return Err(missing("handle"));
        }
        // SAFETY: the header makes `name` and `version` static NUL-terminated strings or NULL.
        let name = unsafe { static_str(descriptor.name) }.ok_or_else(|| missing("name"))?;
        // SAFETY: as above.
        let version =
            unsafe { static_str(descriptor.version) }.ok_or_else(|| missing("version"))?;
        let info = HandlerInfo {
            path: path_buf,
            name,
            version,
            abi_major: descriptor.abi_major,
            abi_minor: descriptor.abi_minor,
            max_concurrency: descriptor.max_concurrency,
            streaming: descriptor.features & ffi::WH_FEATURE_STREAMING != 0,
        };
        Ok(Self {
            descriptor,
            info,
            limits,
        })
    }

    /// Runs the handler's `init` with its configuration (JSON text).
    pub fn init(&self, config_json: &str) -> Result<(), LoadError> {
        let init = self.descriptor.init.expect("checked at load");
        let config = nul_terminated(config_json);
        let span = tracing::info_span!("init", handler = %self.info.name);
        let state = CallState::new(
            Phase::Init,
            &span,
            self.info.streaming,
            self.limits,
            None,
            None,
        );
        // SAFETY: `init` has the header's signature; the call state and the config buffer
        // outlive the call; HOST_API is static.
        let status = unsafe {
            init(
                state.as_call(),
                &HOST_API,
                config.as_ptr().cast::<c_char>(),
                config_json.len(),
            )
        };
        let record = state.into_record();
        match (record.error, status) {
            (None, ffi::WH_STATUS_OK) => Ok(()),
            (Some(failure), _) => Err(LoadError::InitFailed { failure }),
            (None, status) => Err(LoadError::InitFailed {
                failure: Failure::new(
                    "InitFailed",
                    format!("init returned status {status} without a message"),
                ),
            }),
        }
    }
}

impl Handler for HandlerLibrary {
    fn info(&self) -> &HandlerInfo {
        &self.info
    }

    fn run(&self, job: &Job, events: &dyn JobEvents, cancel: &CancelToken) -> JobResult {
        let handle = self.descriptor.handle.expect("checked at load");
        let id = nul_terminated(job.id());
        let input = nul_terminated(job.input().get());
        let job_json = nul_terminated(job.job_json().get());
        let raw_job = ffi::wh_job {
            struct_size: std::mem::size_of::<ffi::wh_job>() as u32,
            id: id.as_ptr().cast::<c_char>(),
            id_len: id.len() - 1,
            input_json: input.as_ptr().cast::<c_char>(),
            input_json_len: input.len() - 1,
            job_json: job_json.as_ptr().cast::<c_char>(),
            job_json_len: job_json.len() - 1,
        };
        let span = Span::current();
        let state = CallState::new(
            Phase::Job,
            &span,
            self.info.streaming,
            self.limits,
            Some(events),
            Some(cancel),
        );
        // SAFETY: `handle` has the header's signature; the call state and every buffer `raw_job`
        // points to outlive the call; HOST_API is static.
        let status = unsafe { handle(state.as_call(), &HOST_API, &raw_job) };
        let recycle = state.recycle.load(Ordering::Acquire);
        let record = state.into_record();
        let streaming = self.info.streaming;
        let failed = |failure| Outcome::Failed { failure, streaming };
        let outcome = match (record.output_rejection, record.error, status) {
            // A refused output is the root cause; the handler's own error usually just echoes it.
            (Some(rejection), _, _) => failed(rejection),
            (None, Some(failure), _) => failed(failure),
            (None, None, ffi::WH_STATUS_OK) if streaming => Outcome::Streamed,
            (None, None, ffi::WH_STATUS_OK) => {
                Outcome::Output(record.output.unwrap_or_else(json_null))
            }
            (None, None, status) => failed(Failure::new(
                "HandlerError",
                format!("the handler returned status {status} without an error message"),
            )),
        };
        JobResult { outcome, recycle }
    }

    fn teardown(&self) {
        let Some(teardown) = self.descriptor.teardown else {
            return;
        };
        let span = tracing::info_span!("teardown", handler = %self.info.name);
        let state = CallState::new(
            Phase::Teardown,
            &span,
            self.info.streaming,
            self.limits,
            None,
            None,
        );
        // SAFETY: `teardown` has the header's signature; the call state outlives the call.
        unsafe { teardown(state.as_call(), &HOST_API) };
    }
}

/// Reads `struct_size` and `abi_major`, the fields every ABI major keeps at the same offsets.
///
/// # Safety
/// `descriptor` must be non-NULL and point to at least eight readable bytes laid out as the
/// header's first three descriptor fields.
unsafe fn read_header(descriptor: *const ffi::wh_handler_descriptor) -> (u32, u16) {
    // SAFETY: the caller guarantees the first eight bytes are readable; the offsets are those of
    // `struct_size` and `abi_major` in every ABI.
    unsafe {
        (
            std::ptr::addr_of!((*descriptor).struct_size).read(),
            std::ptr::addr_of!((*descriptor).abi_major).read(),
        )
    }
}

/// Copies a static C string, replacing invalid UTF-8. `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string that lives for the process.
unsafe fn static_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL, NUL-terminated and static, as the caller guarantees.
    let text = unsafe { CStr::from_ptr(ptr) };
    Some(text.to_string_lossy().into_owned())
}

/// The dynamic loader's reason, without the path it repeats.
fn loader_reason(error: &libloading::Error) -> String {
    let text = error.to_string();
    match text.rsplit_once(": ") {
        Some((_, reason)) if !reason.is_empty() => reason.to_owned(),
        _ => text,
    }
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(text.len() + 1);
    buffer.extend_from_slice(text.as_bytes());
    buffer.push(0);
    buffer
}

fn json_null() -> RawJson {
    serde_json::value::RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// Which handler function a call belongs to; callbacks check it to refuse what does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init,
    Job,
    Teardown,
}

/// What a call reported through its callbacks.
#[derive(Debug, Default)]
struct CallRecord {
    output: Option<RawJson>,
    output_rejection: Option<Failure>,
    error: Option<Failure>,
}

/// The state behind one `wh_call` pointer. Lives on the stack of the function that calls into
/// the handler, so it outlives the call by construction.
struct CallState<'a> {
    phase: Phase,
    span: &'a Span,
    streaming: bool,
    limits: Limits,
    events: Option<&'a dyn JobEvents>,
    cancel: Option<&'a CancelToken>,
    recycle: AtomicBool,
    record: Mutex<CallRecord>,
}

impl<'a> CallState<'a> {
    fn new(
        phase: Phase,
        span: &'a Span,
        streaming: bool,
        limits: Limits,
        events: Option<&'a dyn JobEvents>,
        cancel: Option<&'a CancelToken>,
    ) -> Self {
        Self {
            phase,
            span,
            streaming,
            limits,
            events,
            cancel,
            recycle: AtomicBool::new(false),
            record: Mutex::new(CallRecord::default()),
        }
    }

    /// The opaque pointer handed to the handler. Valid while `self` is borrowed.
    fn as_call(&self) -> *mut ffi::wh_call {
        (self as *const Self).cast_mut().cast::<ffi::wh_call>()
    }

    fn into_record(self) -> CallRecord {
        self.record
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self) -> std::sync::MutexGuard<'_, CallRecord> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.is_some_and(CancelToken::is_cancelled)
    }

    /// Checks and copies one JSON value the handler passed in, within the output limit.
    fn accept_json(
        &self,
        what: &str,
        bytes: Option<&[u8]>,
    ) -> Result<RawJson, (ffi::wh_status, Failure)> {
        let Some(bytes) = bytes else {
            return Err((
                ffi::WH_STATUS_INVALID_ARGUMENT,
                Failure::new("InvalidOutput", format!("the handler passed a NULL {what}")),
            ));
        };
        let limit = self.limits.max_output_bytes;
        if bytes.len() > limit {
            return Err((
                ffi::WH_STATUS_TOO_LARGE,
                Failure::new(
                    "OutputTooLarge",
                    format!(
                        "the handler's {what} is {} bytes, over the limit of {limit} bytes",
                        bytes.len()
                    ),
                ),
            ));
        }
        let parsed = std::str::from_utf8(bytes)
            .map_err(|error| error.to_string())
            .and_then(|text| {
                serde_json::from_str::<RawJson>(text).map_err(|error| error.to_string())
            });
        parsed.map_err(|reason| {
            (
                ffi::WH_STATUS_INVALID_ARGUMENT,
                Failure::new(
                    "InvalidOutput",
                    format!("the handler's {what} is not valid JSON: {reason}"),
                ),
            )
        })
    }
}

/// The callback table every handler function receives.
static HOST_API: ffi::wh_host_api = ffi::wh_host_api {
    struct_size: std::mem::size_of::<ffi::wh_host_api>() as u32,
    abi_major: ffi::WH_ABI_MAJOR,
    abi_minor: ffi::WH_ABI_MINOR,
    log: host_log,
    set_output: host_set_output,
    set_error: host_set_error,
    emit: host_emit,
    progress: host_progress,
    is_cancelled: host_is_cancelled,
    request_recycle: host_request_recycle,
};

/// Recovers the call state behind a `wh_call` pointer.
///
/// # Safety
/// `call` must be a pointer made by [`CallState::as_call`] whose call has not returned.
unsafe fn call_state<'a>(call: *mut ffi::wh_call) -> Option<&'a CallState<'a>> {
    // SAFETY: per the caller, `call` is NULL or points to a live CallState.
    unsafe { call.cast::<CallState<'a>>().cast_const().as_ref() }
}

/// Borrows a handler-provided (pointer, length) byte string; `(NULL, 0)` is empty, and NULL with
/// a length is `None`.
///
/// # Safety
/// A non-NULL `ptr` must point to `len` readable bytes that stay unchanged during the callback.
unsafe fn handler_bytes<'a>(ptr: *const c_char, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return (len == 0).then_some(&[]);
    }
    // SAFETY: per the caller, `ptr` points to `len` readable bytes for the callback's duration.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

unsafe extern "C" fn host_log(
    call: *mut ffi::wh_call,
    level: ffi::wh_log_level,
    message: *const c_char,
    message_len: usize,
) {
    // SAFETY: the header requires `call` to be live and the message to be `message_len` bytes.
    let (Some(state), Some(bytes)) = (unsafe { call_state(call) }, unsafe {
        handler_bytes(message, message_len)
    }) else {
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    state.span.in_scope(|| match level {
        ffi::WH_LOG_TRACE => tracing::trace!(target: "handler", "{text}"),
        ffi::WH_LOG_DEBUG => tracing::debug!(target: "handler", "{text}"),
        ffi::WH_LOG_WARN => tracing::warn!(target: "handler", "{text}"),
        ffi::WH_LOG_ERROR => tracing::error!(target: "handler", "{text}"),
        _ => tracing::info!(target: "handler", "{text}"),
    });
}

unsafe extern "C" fn host_set_output(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header requires `call` to be live.
    let Some(state) = (unsafe { call_state(call) }) else {
        return ffi::WH_STATUS_INVALID_ARGUMENT;
    };
    if state.phase != Phase::Job {
        return ffi::WH_STATUS_INVALID_STATE;
    }
    // SAFETY: the header requires `json` to be `json_len` readable bytes during the call.
    let bytes = unsafe { handler_bytes(json, json_len) };
    match state.accept_json("output", bytes) {
        Ok(output) => {
            let mut record = state.record();
            record.output = Some(output);
            record.output_rejection = None;
            ffi::WH_STATUS_OK
        }
        Err((status, rejection)) => {
            state.record().output_rejection = Some(rejection);
            status
        }
    }
}

unsafe extern "C" fn host_set_error(
    call: *mut ffi::wh_call,
    error_type: *const c_char,
    error_type_len: usize,
    message: *const c_char,
    message_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header requires `call` to be live.
    let Some(state) = (unsafe { call_state(call) }) else {
        return ffi::WH_STATUS_INVALID_ARGUMENT;
    };
    if state.phase == Phase::Teardown {
        return ffi::WH_STATUS_INVALID_STATE;
    }
    // SAFETY: the header requires each string to be its length in readable bytes, or NULL.
    let error_type = unsafe { handler_bytes(error_type, error_type_len) }.unwrap_or_default();
    // SAFETY: as above.
    let message = unsafe { handler_bytes(message, message_len) }.unwrap_or_default();
    let error_type = match String::from_utf8_lossy(error_type) {
        text if text.is_empty() => "HandlerError".to_owned(),
        text => text.into_owned(),
    };
    let message = String::from_utf8_lossy(message).into_owned();
    state.record().error = Some(Failure::new(error_type, message));
    ffi::WH_STATUS_OK
}

/// What a handler hands over while a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Chunk,
    Progress,
}

/// The shared body of `emit` and `progress`.
///
/// # Safety
/// As for the callbacks: `call` live, `json` readable for `json_len` bytes.
unsafe fn deliver(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
    event: Event,
) -> ffi::wh_status {
    // SAFETY: per the caller.
    let Some(state) = (unsafe { call_state(call) }) else {
        return ffi::WH_STATUS_INVALID_ARGUMENT;
    };
    let Some(events) = state.events.filter(|_| state.phase == Phase::Job) else {
        return ffi::WH_STATUS_INVALID_STATE;
    };
    if event == Event::Chunk && !state.streaming {
        return ffi::WH_STATUS_INVALID_STATE;
    }
    if state.is_cancelled() {
        return ffi::WH_STATUS_CANCELLED;
    }
    // SAFETY: per the caller.
    let bytes = unsafe { handler_bytes(json, json_len) };
    let what = match event {
        Event::Chunk => "stream chunk",
        Event::Progress => "progress",
    };
    match state.accept_json(what, bytes) {
        Ok(value) => {
            // Holding the record lock while handing over keeps chunks from concurrent threads in
            // the order their `emit` calls were accepted.
            let _order = state.record();
            match event {
                Event::Chunk => events.chunk(value),
                Event::Progress => events.progress(value),
            }
            ffi::WH_STATUS_OK
        }
        Err((status, _)) => status,
    }
}

unsafe extern "C" fn host_emit(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header's rules for `emit` are those `deliver` requires.
    unsafe { deliver(call, json, json_len, Event::Chunk) }
}

unsafe extern "C" fn host_progress(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header's rules for `progress` are those `deliver` requires.
    unsafe { deliver(call, json, json_len, Event::Progress) }
}

unsafe extern "C" fn host_is_cancelled(call: *mut ffi::wh_call) -> bool {
    // SAFETY: the header requires `call` to be live.
    unsafe { call_state(call) }.is_some_and(CallState::is_cancelled)
}

unsafe extern "C" fn host_request_recycle(call: *mut ffi::wh_call) {
    // SAFETY: the header requires `call` to be live.
    if let Some(state) = unsafe { call_state(call) } {
        if state.phase == Phase::Job {
            state.recycle.store(true, Ordering::Release);
        }
    }
}
