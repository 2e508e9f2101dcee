//! The host's callback table (`wh_host_api`): what a handler calls while the host runs one of its
//! functions. Every callback finds its call through the registry of [`super::calls`] and checks
//! every length a handler passes before a slice is made of it: no length over the output limit
//! (the chunk limit for stream chunks; for log lines and errors, `isize::MAX`) reaches
//! `slice::from_raw_parts`. A stream chunk over the chunk limit fails its job. Everything
//! a handler passes is copied before the callback returns.

use super::calls::{with_call, CallState, Phase};
use crate::job::{Failure, Output, RawJson};
use handler_abi::ffi;
use std::borrow::Cow;
use std::ffi::c_char;
use std::sync::atomic::Ordering;

/// The callback table every handler function receives.
pub(super) static HOST_API: ffi::wh_host_api = ffi::wh_host_api {
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
    set_error_traceback: host_set_error_traceback,
    set_features: host_set_features,
};

/// The longest length of a string that could be in memory: no buffer is larger than
/// `isize::MAX` bytes, and `slice::from_raw_parts` is undefined beyond it.
const MAX_SLICE_LEN: usize = isize::MAX as usize;

/// The longest log line passed on whole, in bytes; a longer one is cut here, with a note.
const MAX_LOG_LINE: usize = 64 * 1024;

/// Why a handler's (pointer, length) string was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    /// NULL with a non-zero length.
    Null,
    /// Longer than the callback accepts.
    TooLong,
}

/// Borrows a handler-provided (pointer, length) byte string of at most `max` bytes; `(NULL, 0)`
/// is empty. The length is checked before a slice is made, so no length over `max` (nor over
/// [`MAX_SLICE_LEN`]) reaches `slice::from_raw_parts`.
///
/// # Safety
/// A non-NULL `ptr` with `len <= max` must point to `len` readable bytes that stay unchanged
/// during the callback.
unsafe fn handler_bytes<'a>(
    ptr: *const c_char,
    len: usize,
    max: usize,
) -> Result<&'a [u8], Unreadable> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(Unreadable::Null)
        };
    }
    if len > max.min(MAX_SLICE_LEN) {
        return Err(Unreadable::TooLong);
    }
    // SAFETY: per the caller, `ptr` points to `len` readable bytes for the callback's duration,
    // and `len` is at most `isize::MAX`.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// A log line as text: `shown`, the first bytes of a `len`-byte line, invalid UTF-8 replaced, with
/// a note when it is not the whole line.
fn log_text(shown: &[u8], len: usize) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(shown);
    if shown.len() == len {
        return text;
    }
    Cow::Owned(format!(
        "{text}... [log line cut: the first {} of {len} bytes]",
        shown.len()
    ))
}

/// `wh_host_api.log`.
///
/// # Safety
/// The header's rules: a non-NULL `message` points to `message_len` readable bytes (the host
/// reads at most [`MAX_LOG_LINE`] of them, and none for a length over `isize::MAX`).
unsafe extern "C" fn host_log(
    call: *mut ffi::wh_call,
    level: ffi::wh_log_level,
    message: *const c_char,
    message_len: usize,
) {
    with_call(call, |state| {
        if message_len > MAX_SLICE_LEN {
            return;
        }
        let shown = message_len.min(MAX_LOG_LINE);
        // SAFETY: per the header, `message` is NULL or has `message_len >= shown` readable bytes.
        let Ok(bytes) = (unsafe { handler_bytes(message, shown, MAX_LOG_LINE) }) else {
            return;
        };
        let text = log_text(bytes, message_len);
        state.log.log(level, &text);
    });
}

/// `wh_host_api.set_output`.
///
/// # Safety
/// The header's rules: a non-NULL `json` points to `json_len` readable bytes (the host reads none
/// when `json_len` is over the output limit).
unsafe extern "C" fn host_set_output(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    with_call(call, |state| {
        // A streaming handler's result is its chunks: an output would be silently dropped.
        if state.phase != Phase::Job || state.streaming {
            return ffi::WH_STATUS_INVALID_STATE;
        }
        // SAFETY: per the header; `handler_bytes` reads nothing over the limit.
        let bytes = unsafe { handler_bytes(json, json_len, state.limits.max_output_bytes) };
        match accept_json(state, "output", bytes, json_len, Output::read) {
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
    })
    .unwrap_or(ffi::WH_STATUS_INVALID_STATE)
}

/// `wh_host_api.set_error`.
///
/// # Safety
/// The header's rules: each non-NULL string points to its length in readable bytes (the host
/// reads none for a length over `isize::MAX`).
unsafe extern "C" fn host_set_error(
    call: *mut ffi::wh_call,
    error_type: *const c_char,
    error_type_len: usize,
    message: *const c_char,
    message_len: usize,
) -> ffi::wh_status {
    with_call(call, |state| {
        if state.phase == Phase::Teardown {
            return ffi::WH_STATUS_INVALID_STATE;
        }
        // SAFETY: per the header.
        let error_type = unsafe { handler_bytes(error_type, error_type_len, MAX_SLICE_LEN) };
        // SAFETY: as above.
        let message = unsafe { handler_bytes(message, message_len, MAX_SLICE_LEN) };
        let (Ok(error_type), Ok(message)) = (error_type, message) else {
            return ffi::WH_STATUS_INVALID_ARGUMENT;
        };
        let error_type = match String::from_utf8_lossy(error_type) {
            text if text.is_empty() => "HandlerError".to_owned(),
            text => text.into_owned(),
        };
        let message = String::from_utf8_lossy(message).into_owned();
        state.record().error = Some(Failure::new(error_type, message));
        ffi::WH_STATUS_OK
    })
    .unwrap_or(ffi::WH_STATUS_INVALID_STATE)
}

/// The longest traceback kept whole, in bytes; a longer one is cut here, with a note.
const MAX_TRACEBACK: usize = 64 * 1024;

/// `wh_host_api.set_error_traceback` (ABI 1.1).
///
/// # Safety
/// The header's rules: a non-NULL `traceback` points to `traceback_len` readable bytes (the host
/// reads at most [`MAX_TRACEBACK`] of them, and none for a length over `isize::MAX`).
unsafe extern "C" fn host_set_error_traceback(
    call: *mut ffi::wh_call,
    traceback: *const c_char,
    traceback_len: usize,
) -> ffi::wh_status {
    with_call(call, |state| {
        if state.phase == Phase::Teardown {
            return ffi::WH_STATUS_INVALID_STATE;
        }
        if traceback_len > MAX_SLICE_LEN {
            return ffi::WH_STATUS_INVALID_ARGUMENT;
        }
        let shown = traceback_len.min(MAX_TRACEBACK);
        // SAFETY: per the header, `traceback` is NULL or has `traceback_len >= shown` readable
        // bytes.
        let Ok(bytes) = (unsafe { handler_bytes(traceback, shown, MAX_TRACEBACK) }) else {
            return ffi::WH_STATUS_INVALID_ARGUMENT;
        };
        let text = if shown == traceback_len {
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            format!(
                "{}... [traceback cut: the first {shown} of {traceback_len} bytes]",
                String::from_utf8_lossy(bytes)
            )
        };
        state.record().traceback = (!text.is_empty()).then_some(text);
        ffi::WH_STATUS_OK
    })
    .unwrap_or(ffi::WH_STATUS_INVALID_STATE)
}

/// `wh_host_api.set_features` (ABI 1.1): recorded for the `init` call; the library applies it
/// when `init` returns OK.
///
/// # Safety
/// None beyond the header's: `call` is only looked up, never dereferenced.
unsafe extern "C" fn host_set_features(
    call: *mut ffi::wh_call,
    max_concurrency: u32,
    features: u64,
) -> ffi::wh_status {
    with_call(call, |state| {
        if state.phase != Phase::Init {
            return ffi::WH_STATUS_INVALID_STATE;
        }
        state.record().features = Some((max_concurrency, features));
        ffi::WH_STATUS_OK
    })
    .unwrap_or(ffi::WH_STATUS_INVALID_STATE)
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
/// As for the callbacks: a non-NULL `json` points to `json_len` readable bytes (none are read
/// over the chunk limit for a chunk, the output limit for progress).
unsafe fn deliver(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
    event: Event,
) -> ffi::wh_status {
    with_call(call, |state| {
        let Some(events) = state.events.filter(|_| state.phase == Phase::Job) else {
            return ffi::WH_STATUS_INVALID_STATE;
        };
        if event == Event::Chunk && !state.streaming {
            return ffi::WH_STATUS_INVALID_STATE;
        }
        if state.is_cancelled() {
            return ffi::WH_STATUS_CANCELLED;
        }
        let (what, limit) = match event {
            Event::Chunk => ("stream chunk", state.limits.max_chunk_bytes),
            Event::Progress => ("progress", state.limits.max_output_bytes),
        };
        // SAFETY: per the caller; `handler_bytes` reads nothing over the limit.
        let bytes = unsafe { handler_bytes(json, json_len, limit) };
        if event == Event::Chunk && matches!(bytes, Err(Unreadable::TooLong)) {
            let failure = Failure::new(
                "OutputTooLarge",
                format!(
                    "stream chunk of {json_len} bytes is over the limit of {limit} bytes \
                     (--max-chunk-bytes)"
                ),
            );
            state.record().chunk_rejection.get_or_insert(failure);
            return ffi::WH_STATUS_TOO_LARGE;
        }
        match accept_json(state, what, bytes, json_len, raw_json) {
            Ok(value) => {
                // Holding the record lock while handing over keeps chunks from concurrent threads
                // in the order their `emit` calls were accepted.
                let _order = state.record();
                match event {
                    Event::Chunk => events.chunk(value),
                    Event::Progress => events.progress(value),
                }
                ffi::WH_STATUS_OK
            }
            Err((status, _)) => status,
        }
    })
    .unwrap_or(ffi::WH_STATUS_INVALID_STATE)
}

/// `wh_host_api.emit`.
///
/// # Safety
/// As for [`deliver`].
unsafe extern "C" fn host_emit(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header's rules for `emit` are those `deliver` requires.
    unsafe { deliver(call, json, json_len, Event::Chunk) }
}

/// `wh_host_api.progress`.
///
/// # Safety
/// As for [`deliver`].
unsafe extern "C" fn host_progress(
    call: *mut ffi::wh_call,
    json: *const c_char,
    json_len: usize,
) -> ffi::wh_status {
    // SAFETY: the header's rules for `progress` are those `deliver` requires.
    unsafe { deliver(call, json, json_len, Event::Progress) }
}

/// `wh_host_api.is_cancelled`: false for a call that is not open.
///
/// # Safety
/// None beyond the header's: `call` is only looked up, never dereferenced.
unsafe extern "C" fn host_is_cancelled(call: *mut ffi::wh_call) -> bool {
    with_call(call, |state| state.is_cancelled()).unwrap_or(false)
}

/// `wh_host_api.request_recycle`: does nothing for a call that is not open.
///
/// # Safety
/// None beyond the header's: `call` is only looked up, never dereferenced.
unsafe extern "C" fn host_request_recycle(call: *mut ffi::wh_call) {
    with_call(call, |state| {
        if state.phase == Phase::Job {
            state.recycle.store(true, Ordering::Release);
        }
    });
}

/// Checks and copies one JSON value of `len` bytes the handler passed in, read with
/// [`handler_bytes`] within the output limit, with `read` (which copies it).
fn accept_json<T>(
    state: &CallState<'_>,
    what: &str,
    bytes: Result<&[u8], Unreadable>,
    len: usize,
    read: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, (ffi::wh_status, Failure)> {
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(Unreadable::Null) => {
            return Err((
                ffi::WH_STATUS_INVALID_ARGUMENT,
                Failure::new("InvalidOutput", format!("the handler passed a NULL {what}")),
            ));
        }
        Err(Unreadable::TooLong) => {
            let limit = state.limits.max_output_bytes;
            return Err((
                ffi::WH_STATUS_TOO_LARGE,
                Failure::new(
                    "OutputTooLarge",
                    format!("the handler's {what} is {len} bytes, over the limit of {limit} bytes"),
                ),
            ));
        }
    };
    read(bytes).map_err(|reason| {
        (
            ffi::WH_STATUS_INVALID_ARGUMENT,
            Failure::new(
                "InvalidOutput",
                format!("the handler's {what} is not valid JSON: {reason}"),
            ),
        )
    })
}

/// A chunk or progress value: UTF-8 JSON, copied.
fn raw_json(bytes: &[u8]) -> Result<RawJson, String> {
    let text = std::str::from_utf8(bytes).map_err(|error| error.to_string())?;
    serde_json::from_str::<RawJson>(text).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::inproc::calls::{CallRecord, LiveCall};
    use crate::handler::inproc::TracingLog;
    use crate::handler::{CancelToken, DiscardEvents, JobEvents, Limits};

    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;
    use tracing::Span;

    /// The output limit of the calls these tests open.
    const LIMIT: usize = 64;

    /// The chunk limit of the calls these tests open: below the output limit, so a test can tell
    /// which one applies.
    const CHUNK_LIMIT: usize = 16;

    /// Opens a job call (of a streaming handler or not) with `events`, runs `body` with its
    /// `wh_call`, ends the call and returns what it recorded.
    fn job_call(
        streaming: bool,
        events: &dyn JobEvents,
        body: impl FnOnce(*mut ffi::wh_call),
    ) -> CallRecord {
        let span = TracingLog(Span::none());
        let cancel = CancelToken::new();
        let limits = Limits {
            max_output_bytes: LIMIT,
            max_chunk_bytes: CHUNK_LIMIT,
        };
        let state = CallState::new(
            Phase::Job,
            &span,
            streaming,
            limits,
            Some(events),
            Some(&cancel),
        );
        let call = LiveCall::open(&state);
        body(call.id());
        drop(call);
        state.into_record()
    }

    /// `text` as the (pointer, length) pair a handler passes.
    fn arg(text: &str) -> (*const c_char, usize) {
        (text.as_ptr().cast::<c_char>(), text.len())
    }

    /// Keeps the chunks and progress reports it receives, as JSON text.
    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);

    impl JobEvents for Collect {
        fn chunk(&self, chunk: RawJson) {
            self.0
                .lock()
                .unwrap()
                .push(format!("chunk {}", chunk.get()));
        }
        fn progress(&self, progress: RawJson) {
            self.0
                .lock()
                .unwrap()
                .push(format!("progress {}", progress.get()));
        }
    }

    /// Every call gets a new, non-NULL id.
    #[test]
    fn call_ids_are_fresh_and_never_null() {
        let span = TracingLog(Span::none());
        let state = CallState::new(Phase::Init, &span, false, Limits::default(), None, None);
        let first = LiveCall::open(&state);
        let second = LiveCall::open(&state);
        assert!(!first.id().is_null());
        assert_ne!(first.id(), second.id());
        let first_id = first.id();
        drop(first);
        assert_ne!(LiveCall::open(&state).id(), first_id);
    }

    /// A callback with a call that ended, or was never handed out, is refused and records nothing.
    #[test]
    fn callbacks_with_an_ended_call_are_refused() {
        let events = Collect::default();
        let mut ended = std::ptr::null_mut();
        let record = job_call(true, &events, |call| ended = call);
        assert!(record.output.is_none() && record.error.is_none());
        for call in [ended, std::ptr::null_mut(), usize::MAX as *mut ffi::wh_call] {
            let (json, len) = arg("1");
            // SAFETY: every string is as long as its length; `call` is only looked up.
            let statuses = unsafe {
                [
                    host_set_output(call, json, len),
                    host_emit(call, json, len),
                    host_progress(call, json, len),
                    host_set_error(call, json, len, json, len),
                    host_set_error_traceback(call, json, len),
                    host_set_features(call, 1, 0),
                ]
            };
            assert_eq!(statuses, [ffi::WH_STATUS_INVALID_STATE; 6]);
            // SAFETY: as above.
            unsafe {
                host_log(call, ffi::WH_LOG_INFO, json, len);
                host_request_recycle(call);
                assert!(!host_is_cancelled(call));
            }
        }
        assert!(events.0.lock().unwrap().is_empty());
    }

    /// Ending a call waits for a callback still running on another thread, and refuses every
    /// callback after.
    #[test]
    fn ending_a_call_waits_for_callbacks_in_progress() {
        struct Gate {
            entered: mpsc::Sender<()>,
            release: Mutex<mpsc::Receiver<()>>,
        }
        impl JobEvents for Gate {
            fn chunk(&self, _chunk: RawJson) {
                self.entered.send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            fn progress(&self, _progress: RawJson) {}
        }
        let (entered, entered_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let gate = Gate {
            entered,
            release: Mutex::new(release_rx),
        };
        let span = TracingLog(Span::none());
        let state = CallState::new(
            Phase::Job,
            &span,
            true,
            Limits::default(),
            Some(&gate),
            None,
        );
        let call = LiveCall::open(&state);
        // Pointers are not Send; the id crosses threads as a number.
        let id = call.id() as usize;
        std::thread::scope(|scope| {
            let emit = scope.spawn(move || {
                let (json, len) = arg("1");
                // SAFETY: the string is as long as its length.
                unsafe { host_emit(id as *mut ffi::wh_call, json, len) }
            });
            entered_rx.recv().unwrap();
            let (ended, ended_rx) = mpsc::channel();
            scope.spawn(move || {
                drop(call);
                ended.send(()).unwrap();
            });
            assert!(
                ended_rx.recv_timeout(Duration::from_millis(200)).is_err(),
                "the call ended while a callback was using its state"
            );
            release.send(()).unwrap();
            ended_rx.recv().unwrap();
            assert_eq!(emit.join().unwrap(), ffi::WH_STATUS_OK);
        });
        let (json, len) = arg("2");
        // SAFETY: the string is as long as its length; `id` is only looked up.
        let late = unsafe { host_emit(id as *mut ffi::wh_call, json, len) };
        assert_eq!(late, ffi::WH_STATUS_INVALID_STATE);
    }

    /// A length no buffer can have is refused before a byte is read: over the output limit for
    /// output, chunks and progress, over `isize::MAX` for errors and log lines.
    #[test]
    fn lengths_are_checked_before_reading() {
        let events = Collect::default();
        let (one, _) = arg("1");
        let record = job_call(false, &events, |call| {
            // SAFETY: the host must refuse these lengths without reading; it reads nothing of
            // `one` past its first byte for any length it accepts here.
            unsafe {
                assert_eq!(
                    host_set_output(call, one, usize::MAX),
                    ffi::WH_STATUS_TOO_LARGE
                );
                assert_eq!(
                    host_progress(call, one, LIMIT + 1),
                    ffi::WH_STATUS_TOO_LARGE
                );
                assert_eq!(
                    host_progress(call, one, usize::MAX),
                    ffi::WH_STATUS_TOO_LARGE
                );
                assert_eq!(
                    host_set_error(call, one, usize::MAX, one, 1),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
                assert_eq!(
                    host_set_error(call, one, 1, one, MAX_SLICE_LEN + 1),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
                host_log(call, ffi::WH_LOG_INFO, one, usize::MAX);
            }
        });
        assert!(record.error.is_none(), "{:?}", record.error);
        let rejection = record
            .output_rejection
            .expect("the refused output fails the job");
        assert!(
            rejection.message.contains(&usize::MAX.to_string()),
            "{rejection:?}"
        );
        let record = job_call(true, &events, |call| {
            // SAFETY: as above.
            let status = unsafe { host_emit(call, one, usize::MAX) };
            assert_eq!(status, ffi::WH_STATUS_TOO_LARGE);
        });
        assert!(record.output_rejection.is_none());
        assert!(record.chunk_rejection.is_some());
        assert!(events.0.lock().unwrap().is_empty());
    }

    /// A chunk over the chunk limit (though within the output limit) is refused and fails the
    /// job with its size and the limit, even when later chunks are accepted; progress of that size
    /// is still accepted (the output limit applies to it).
    #[test]
    fn an_oversize_chunk_fails_the_job() {
        let events = Collect::default();
        let big = format!("\"{}\"", "x".repeat(CHUNK_LIMIT));
        let record = job_call(true, &events, |call| {
            let (json, len) = arg(&big);
            let (small, small_len) = arg("1");
            // SAFETY: each string is as long as its length.
            unsafe {
                assert_eq!(host_emit(call, json, len), ffi::WH_STATUS_TOO_LARGE);
                assert_eq!(host_emit(call, small, small_len), ffi::WH_STATUS_OK);
                assert_eq!(host_progress(call, json, len), ffi::WH_STATUS_OK);
            }
        });
        let rejection = record
            .chunk_rejection
            .expect("the refused chunk fails the job");
        assert_eq!(rejection.error_type, "OutputTooLarge");
        assert_eq!(
            rejection.message,
            format!(
                "stream chunk of {} bytes is over the limit of {CHUNK_LIMIT} bytes \
                 (--max-chunk-bytes)",
                CHUNK_LIMIT + 2
            )
        );
        assert_eq!(
            *events.0.lock().unwrap(),
            ["chunk 1".to_owned(), format!("progress {big}")]
        );
    }

    /// `set_error` refuses NULL with a length (in either string) and records nothing; `(NULL, 0)`
    /// is an empty string.
    #[test]
    fn set_error_refuses_null_with_a_length() {
        let (text, len) = arg("Boom");
        let null = std::ptr::null();
        let record = job_call(false, &DiscardEvents, |call| {
            // SAFETY: each string is NULL or as long as its length.
            unsafe {
                assert_eq!(
                    host_set_error(call, null, 4, text, len),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
                assert_eq!(
                    host_set_error(call, text, len, null, 7),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
            }
        });
        assert!(record.error.is_none(), "{:?}", record.error);
        let record = job_call(false, &DiscardEvents, |call| {
            // SAFETY: as above.
            let status = unsafe { host_set_error(call, null, 0, text, len) };
            assert_eq!(status, ffi::WH_STATUS_OK);
        });
        let error = record.error.expect("recorded");
        assert_eq!(
            (error.error_type.as_str(), error.message.as_str()),
            ("HandlerError", "Boom")
        );
    }

    /// A streaming handler's `set_output` is refused and records nothing (its result is its
    /// chunks); its `emit` is accepted.
    #[test]
    fn set_output_is_refused_for_a_streaming_handler() {
        let events = Collect::default();
        let record = job_call(true, &events, |call| {
            let (json, len) = arg(r#"{"k": 1}"#);
            // SAFETY: the string is as long as its length.
            unsafe {
                assert_eq!(
                    host_set_output(call, json, len),
                    ffi::WH_STATUS_INVALID_STATE
                );
                assert_eq!(host_emit(call, json, len), ffi::WH_STATUS_OK);
            }
        });
        assert!(record.output.is_none() && record.output_rejection.is_none());
        assert_eq!(*events.0.lock().unwrap(), [r#"chunk {"k": 1}"#]);
    }

    /// What the header says of `set_output`: a refused value fails the job even after an
    /// accepted one, until a later value is accepted; a refusal for the state records nothing.
    #[test]
    fn the_last_set_output_decides() {
        let record = job_call(false, &DiscardEvents, |call| {
            for (json, expected) in [
                ("1", ffi::WH_STATUS_OK),
                ("{", ffi::WH_STATUS_INVALID_ARGUMENT),
            ] {
                let (json, len) = arg(json);
                // SAFETY: the string is as long as its length.
                assert_eq!(unsafe { host_set_output(call, json, len) }, expected);
            }
        });
        assert_eq!(
            record.output.as_ref().map(|output| output.json()),
            Some("1")
        );
        assert!(
            record.output_rejection.is_some(),
            "the refusal fails the job"
        );
        let record = job_call(false, &DiscardEvents, |call| {
            for json in ["{", "2"] {
                let (json, len) = arg(json);
                // SAFETY: the string is as long as its length.
                unsafe { host_set_output(call, json, len) };
            }
        });
        assert_eq!(
            record.output.as_ref().map(|output| output.json()),
            Some("2")
        );
        assert!(record.output_rejection.is_none(), "a later value clears it");
    }

    /// `set_error_traceback` records the last traceback ((NULL, 0) clears it), refuses NULL with
    /// a length and a length no buffer can have, and cuts one over the cap with a note;
    /// `set_features` applies only to `init`.
    #[test]
    fn tracebacks_and_features_are_recorded_where_they_apply() {
        let long = "t".repeat(MAX_TRACEBACK + 10);
        let record = job_call(false, &DiscardEvents, |call| {
            let (text, len) = arg("first");
            let (long, long_len) = arg(&long);
            // SAFETY: each string is NULL or as long as its length.
            unsafe {
                assert_eq!(host_set_error_traceback(call, text, len), ffi::WH_STATUS_OK);
                assert_eq!(
                    host_set_error_traceback(call, std::ptr::null(), 3),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
                assert_eq!(
                    host_set_error_traceback(call, text, usize::MAX),
                    ffi::WH_STATUS_INVALID_ARGUMENT
                );
                assert_eq!(
                    host_set_error_traceback(call, long, long_len),
                    ffi::WH_STATUS_OK
                );
                assert_eq!(host_set_features(call, 1, 0), ffi::WH_STATUS_INVALID_STATE);
            }
        });
        let traceback = record.traceback.expect("recorded");
        assert!(traceback.ends_with(&format!(
            "... [traceback cut: the first {MAX_TRACEBACK} of {} bytes]",
            MAX_TRACEBACK + 10
        )));
        assert!(record.features.is_none());
        let record = job_call(false, &DiscardEvents, |call| {
            let (text, len) = arg("first");
            // SAFETY: each string is NULL or as long as its length.
            unsafe {
                host_set_error_traceback(call, text, len);
                host_set_error_traceback(call, std::ptr::null(), 0);
            }
        });
        assert!(record.traceback.is_none(), "(NULL, 0) clears it");
        let span = TracingLog(Span::none());
        let state = CallState::new(Phase::Init, &span, false, Limits::default(), None, None);
        let call = LiveCall::open(&state);
        // SAFETY: `call` is only looked up.
        let status = unsafe { host_set_features(call.id(), 2, ffi::WH_FEATURE_STREAMING) };
        assert_eq!(status, ffi::WH_STATUS_OK);
        drop(call);
        assert_eq!(
            state.into_record().features,
            Some((2, ffi::WH_FEATURE_STREAMING))
        );
    }

    /// A log line over the cap is cut, with a note of its length; a shorter one is kept whole.
    #[test]
    fn long_log_lines_are_cut_with_a_note() {
        assert_eq!(log_text(b"whole", 5), "whole");
        let line = vec![b'a'; MAX_LOG_LINE];
        let text = log_text(&line, MAX_LOG_LINE * 3);
        assert!(text.starts_with("aaaa"));
        assert!(
            text.ends_with(&format!(
                "... [log line cut: the first {MAX_LOG_LINE} of {} bytes]",
                MAX_LOG_LINE * 3
            )),
            "{}",
            &text[MAX_LOG_LINE..]
        );
    }
}
