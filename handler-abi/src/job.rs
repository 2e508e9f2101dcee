//! [`Job`]: a handler's safe view of one job and of the host services it may use while the job
//! runs (log, emit, progress, cancellation, recycle).

use crate::ffi;
use serde::Serialize;
use std::ffi::c_char;
use std::marker::PhantomData;

/// Why a host callback refused a value. The value was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// The job was cancelled: stop working and return.
    #[error("the job was cancelled")]
    Cancelled,
    /// The value is larger than the host's limit.
    #[error("the value is larger than the host accepts")]
    TooLarge,
    /// The value is not valid JSON, or could not be serialized.
    #[error("the value is not valid JSON")]
    InvalidJson,
    /// The callback does not apply here (for example `emit` from a handler that does not stream).
    #[error("the callback does not apply here (emit needs a streaming handler: Handler::STREAMING, or Handler::streaming after init)")]
    InvalidState,
    /// The host answered with a status this SDK does not know.
    #[error("the host refused the value with status {0}")]
    Other(i32),
}

impl CallbackError {
    pub(crate) fn check(status: ffi::wh_status) -> Result<(), Self> {
        match status {
            ffi::WH_STATUS_OK => Ok(()),
            ffi::WH_STATUS_CANCELLED => Err(Self::Cancelled),
            ffi::WH_STATUS_TOO_LARGE => Err(Self::TooLarge),
            ffi::WH_STATUS_INVALID_ARGUMENT => Err(Self::InvalidJson),
            ffi::WH_STATUS_INVALID_STATE => Err(Self::InvalidState),
            other => Err(Self::Other(other)),
        }
    }
}

/// Severity of a log line written through the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Very verbose diagnostics.
    Trace,
    /// Diagnostics.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected that the job survives.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    fn to_ffi(self) -> ffi::wh_log_level {
        match self {
            Self::Trace => ffi::WH_LOG_TRACE,
            Self::Debug => ffi::WH_LOG_DEBUG,
            Self::Info => ffi::WH_LOG_INFO,
            Self::Warn => ffi::WH_LOG_WARN,
            Self::Error => ffi::WH_LOG_ERROR,
        }
    }
}

/// One running job: its id, its raw JSON, and the host's services for it.
///
/// `Job` is `Send + Sync`, so a handler may share it with threads it scopes inside `handle`
/// (`std::thread::scope`); its lifetime keeps it from outliving the call.
#[derive(Debug)]
pub struct Job<'call> {
    call: *mut ffi::wh_call,
    host: &'call ffi::wh_host_api,
    id: &'call str,
    input_json: &'call str,
    job_json: &'call str,
    _call: PhantomData<&'call ffi::wh_call>,
}

// SAFETY: the header makes every host callback thread-safe for the life of the call, and `Job`
// cannot outlive the call ('call). The borrowed strings are immutable.
unsafe impl Send for Job<'_> {}
// SAFETY: as above; `&Job` only reads the strings and calls thread-safe callbacks.
unsafe impl Sync for Job<'_> {}

impl<'call> Job<'call> {
    /// Builds the view of one `handle` call.
    ///
    /// # Safety
    /// `call` and `host` must be the arguments of a live `wh_handle_fn` call, and `job` must point
    /// to the `wh_job` of that call, whose strings are valid UTF-8 as the header promises. The
    /// result must not outlive that call ('call is chosen by the caller to end with it).
    pub(crate) unsafe fn from_raw(
        call: *mut ffi::wh_call,
        host: &'call ffi::wh_host_api,
        job: &'call ffi::wh_job,
    ) -> Self {
        // SAFETY: the header guarantees each (pointer, length) pair is valid UTF-8 borrowed for
        // the call, which the caller promises lasts for 'call.
        let (id, input_json, job_json) = unsafe {
            (
                borrowed_str(job.id, job.id_len),
                borrowed_str(job.input_json, job.input_json_len),
                borrowed_str(job.job_json, job.job_json_len),
            )
        };
        Self {
            call,
            host,
            id,
            input_json,
            job_json,
            _call: PhantomData,
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        self.id
    }

    /// The job's `input` as the JSON text the platform sent.
    pub fn input_json(&self) -> &str {
        self.input_json
    }

    /// The whole job object as JSON text, with every key the platform sent (`id`, `input`,
    /// `webhook`, `policy`, ...).
    pub fn job_json(&self) -> &str {
        self.job_json
    }

    /// Writes a log line through the host, tagged with this job's id.
    pub fn log(&self, level: LogLevel, message: &str) {
        // SAFETY: `call` is live for 'call (see `from_raw`) and the message pointer/length pair
        // is a valid &str, which the host copies before returning.
        unsafe {
            (self.host.log)(
                self.call,
                level.to_ffi(),
                message.as_ptr().cast::<c_char>(),
                message.len(),
            )
        }
    }

    /// Emits one stream chunk (streaming handlers only). Chunks are delivered in the order of
    /// the calls that returned `Ok`. `Err(Cancelled)` means: stop and return.
    pub fn emit<T: Serialize + ?Sized>(&self, chunk: &T) -> Result<(), CallbackError> {
        self.send_json(self.host.emit, chunk)
    }

    /// Reports progress, delivered to RunPod as `{"status": "IN_PROGRESS", "output": progress}`,
    /// always before the job's result. `Err(Cancelled)` means: stop and return.
    pub fn progress<T: Serialize + ?Sized>(&self, progress: &T) -> Result<(), CallbackError> {
        self.send_json(self.host.progress, progress)
    }

    /// Whether the job was cancelled (stopped, timed out, or the worker is shutting down).
    /// Cheap; check it in long loops.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: `call` is live for 'call.
        unsafe { (self.host.is_cancelled)(self.call) }
    }

    /// Asks for the worker to be recycled after this job (`"stopPod": true` in its result).
    pub fn request_recycle(&self) {
        // SAFETY: `call` is live for 'call.
        unsafe { (self.host.request_recycle)(self.call) }
    }

    fn send_json<T: Serialize + ?Sized>(
        &self,
        callback: unsafe extern "C" fn(*mut ffi::wh_call, *const c_char, usize) -> ffi::wh_status,
        value: &T,
    ) -> Result<(), CallbackError> {
        let json = serde_json::to_vec(value).map_err(|_| CallbackError::InvalidJson)?;
        // SAFETY: `call` is live for 'call, and `json` outlives the callback, which copies it.
        let status = unsafe { callback(self.call, json.as_ptr().cast::<c_char>(), json.len()) };
        CallbackError::check(status)
    }
}

/// Borrows a host-provided (pointer, length) string.
///
/// # Safety
/// `ptr` must point to `len` bytes of valid UTF-8 that stay valid and unchanged for 'a, or be
/// NULL with `len == 0`.
pub(crate) unsafe fn borrowed_str<'a>(ptr: *const c_char, len: usize) -> &'a str {
    if ptr.is_null() || len == 0 {
        return "";
    }
    // SAFETY: the caller guarantees `ptr` points to `len` readable bytes valid for 'a.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    // The host promises UTF-8; checking keeps a broken host from causing undefined behaviour in
    // safe handler code, and costs one pass over bytes the handler is about to parse anyway.
    std::str::from_utf8(bytes).unwrap_or("")
}
