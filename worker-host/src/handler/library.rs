//! The in-process handler: a shared library loaded with `dlopen`, its descriptor checked, and the
//! host's callback table it calls back into.
//!
//! This is the host's only `unsafe` code. The rules it relies on are those of
//! `handler-abi/include/worker_host.h`: the descriptor is static; inputs we pass are borrowed for
//! the call; everything the handler passes to a callback is copied before the callback returns.
//!
//! The `wh_call` a handler function receives is not an address but an id, looked up in a
//! registry of live calls, so that a callback made after the call returned (from a thread the
//! handler left running, say) finds nothing and is refused, instead of reading the stack of a
//! function that has returned. A callback holds its call open while it runs; ending a
//! call waits for the callbacks in progress, so the call's state is never dropped under one.
//!
//! Every length a handler passes is checked before a slice is made of it: no length over the
//! output limit (or, for log lines and errors, over `isize::MAX`) reaches
//! `slice::from_raw_parts`.
//!
//! A loaded library is never unloaded (`dlclose`): Rust and Go libraries cannot be unloaded
//! safely, and a worker process loads its handler once.

use super::{CancelToken, Handler, HandlerInfo, JobEvents, Limits};
use crate::job::{Failure, Job, JobResult, Outcome, RawJson};
use handler_abi::ffi;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
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
    /// The path names a directory.
    #[error("handler library {path} is a directory: point --handler / WORKER_HOST_HANDLER at the .so file inside it")]
    IsADirectory {
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
    #[error("{path} has an invalid handler descriptor: {field} is NULL (a handler must set init, handle, name and version in the wh_handler_descriptor its wh_handler_entry returns)")]
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
    /// A copy of the handler's descriptor, as this host's ABI minor lays it out (see
    /// `read_descriptor`). Its strings and functions are static: the library is never unloaded.
    descriptor: ffi::wh_handler_descriptor,
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
        if path.is_dir() {
            return Err(LoadError::IsADirectory { path: path_buf });
        }
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
        // ABI 1.0's size, not our own: a 1.0 handler must keep loading when a later minor of this
        // host appends a field, and a handler from a later minor (larger) must load here.
        let expected = ffi::DESCRIPTOR_SIZE_1_0;
        if (struct_size as usize) < expected {
            return Err(LoadError::DescriptorTooSmall {
                path: path_buf,
                size: struct_size,
                expected,
            });
        }
        // SAFETY: the header makes the descriptor static and `struct_size` bytes long.
        let descriptor = unsafe { read_descriptor(descriptor, struct_size as usize) };
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
        let call = LiveCall::open(&state);
        // SAFETY: `init` has the header's signature; the config buffer outlives the call;
        // HOST_API is static. `call.id()` is an id, not an address (see `LiveCall`).
        let status = unsafe {
            init(
                call.id(),
                &HOST_API,
                config.as_ptr().cast::<c_char>(),
                config_json.len(),
            )
        };
        // Ends the call before its state goes: waits for callbacks still running elsewhere.
        drop(call);
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
        let call = LiveCall::open(&state);
        // SAFETY: `handle` has the header's signature; every buffer `raw_job` points to outlives
        // the call; HOST_API is static. `call.id()` is an id, not an address (see `LiveCall`).
        let status = unsafe { handle(call.id(), &HOST_API, &raw_job) };
        // Ends the call before its state goes: waits for callbacks still running elsewhere.
        drop(call);
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
        let call = LiveCall::open(&state);
        // SAFETY: `teardown` has the header's signature; HOST_API is static. `call.id()` is an
        // id, not an address (see `LiveCall`).
        unsafe { teardown(call.id(), &HOST_API) };
        drop(call);
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

/// A descriptor with every field zero: NULL strings, no functions. The base [`read_descriptor`]
/// copies a handler's descriptor onto, so a field the handler's ABI minor did not have reads as
/// zero. A field appended to `wh_handler_descriptor` must be added here, as zero.
const EMPTY_DESCRIPTOR: ffi::wh_handler_descriptor = ffi::wh_handler_descriptor {
    struct_size: 0,
    abi_major: 0,
    abi_minor: 0,
    name: std::ptr::null(),
    version: std::ptr::null(),
    max_concurrency: 0,
    reserved0: 0,
    features: 0,
    init: None,
    handle: None,
    teardown: None,
};

/// Copies a handler's descriptor into this host's layout: its first `min(struct_size, ours)`
/// bytes over [`EMPTY_DESCRIPTOR`]. An older handler's missing fields read as zero, NULL or
/// `None`; a newer handler's extra fields are not read. The handler's memory is never referenced
/// as a struct larger than the one it declared.
///
/// # Safety
/// `descriptor` must point to `struct_size` readable bytes.
unsafe fn read_descriptor(
    descriptor: *const ffi::wh_handler_descriptor,
    struct_size: usize,
) -> ffi::wh_handler_descriptor {
    let mut copy = EMPTY_DESCRIPTOR;
    let len = struct_size.min(std::mem::size_of::<ffi::wh_handler_descriptor>());
    // SAFETY: the source has `struct_size >= len` readable bytes (caller) and the destination is
    // a whole descriptor of at least `len` bytes; they cannot overlap (one is a local). Every byte
    // pattern is a valid value of every field (integers, raw pointers, `Option` of a function
    // pointer), so the copy is a valid descriptor whatever the handler wrote.
    unsafe {
        std::ptr::copy_nonoverlapping(
            descriptor.cast::<u8>(),
            std::ptr::addr_of_mut!(copy).cast::<u8>(),
            len,
        );
    }
    copy
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

/// The state of one call. Lives on the stack of the function that calls into the handler, which
/// ends the call (drops its [`LiveCall`]) before the state goes; callbacks reach it only through
/// [`with_call`].
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

    /// Checks and copies one JSON value of `len` bytes the handler passed in, read with
    /// [`handler_bytes`] within the output limit.
    fn accept_json(
        &self,
        what: &str,
        bytes: Result<&[u8], Unreadable>,
        len: usize,
    ) -> Result<RawJson, (ffi::wh_status, Failure)> {
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(Unreadable::Null) => {
                return Err((
                    ffi::WH_STATUS_INVALID_ARGUMENT,
                    Failure::new("InvalidOutput", format!("the handler passed a NULL {what}")),
                ));
            }
            Err(Unreadable::TooLong) => {
                let limit = self.limits.max_output_bytes;
                return Err((
                    ffi::WH_STATUS_TOO_LARGE,
                    Failure::new(
                        "OutputTooLarge",
                        format!(
                            "the handler's {what} is {len} bytes, over the limit of {limit} bytes"
                        ),
                    ),
                ));
            }
        };
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

// Live calls.
//
// Why an id and a registry rather than the state's address: a handler may keep its `wh_call` past
// the return of the function it was given to (a detached thread, a callback registered with some
// library). With an address, such a late callback reads a dead stack frame, or the state of
// whichever call lives there now. With an id that is never reused, it finds nothing.
//
// Why this shape: one job may emit thousands of chunks, and several jobs run at once, so a
// callback must stay cheap and must not queue behind other calls. The map is a std
// `RwLock<HashMap>`, locked only for the lookup (its writes are one insert and one remove per
// call, a handful per job). Each call has its own `RwLock`: its callbacks hold it for reading while
// they use the state, and the call's owner takes it once for writing, to end the call, which waits
// for those callbacks. A slow callback (a 20 MiB output being parsed) holds up only the end of its
// own call.

/// The next `wh_call` number. A pointer-sized counter (64 bits on every platform worker-host
/// ships for) does not wrap in the life of a process, so an id is never reused.
static NEXT_CALL_ID: AtomicUsize = AtomicUsize::new(1);

/// Set in every `wh_call` id, so an id is never NULL and never looks like a small integer or a
/// heap address to a language runtime that inspects pointers (Go's stack copier aborts on a
/// pointer below 4096). With the top bit set it is a non-canonical address on x86-64 and
/// aarch64: nothing can live there.
const CALL_ID_TAG: usize = 1 << (usize::BITS - 1);

/// The calls whose handler function has not returned, by id.
static LIVE_CALLS: LazyLock<RwLock<HashMap<usize, Arc<CallSlot>>>> =
    LazyLock::new(Default::default);

/// Where callbacks find one call's state.
struct CallSlot {
    /// The state's address while the call is open, `None` once it ended. Callbacks hold the read
    /// guard for as long as they use the state.
    state: RwLock<Option<StatePtr>>,
}

/// The address of a [`CallState`], its type erased: the slot's lock, not the borrow checker,
/// keeps the state alive while the address is used.
#[derive(Clone, Copy)]
struct StatePtr(NonNull<()>);

// SAFETY: a `StatePtr` is dereferenced only in `with_call`, under its slot's read guard, which
// keeps the state alive (see `LiveCall`); what it reaches is a shared `&CallState`, and
// `CallState` is `Sync` (asserted below), so using it from any thread is sound.
unsafe impl Send for StatePtr {}
// SAFETY: as above.
unsafe impl Sync for StatePtr {}

/// Callbacks use a call's state from the handler's threads.
const _: fn() = || {
    fn is_sync<T: Sync>() {}
    is_sync::<CallState<'static>>();
};

/// One open call: a fresh id in [`LIVE_CALLS`] that leads to a state borrowed for `'s`.
///
/// Dropping it ends the call: the id is removed, then the drop waits for the callbacks in
/// progress, after which no callback can reach the state. The borrow keeps the state alive and in
/// place until then, so the owner drops this before it drops (or moves) the state.
struct LiveCall<'s> {
    id: usize,
    slot: Arc<CallSlot>,
    _state: PhantomData<&'s ()>,
}

impl<'s> LiveCall<'s> {
    /// Opens a call on `state`.
    fn open(state: &'s CallState<'_>) -> Self {
        let id = CALL_ID_TAG | NEXT_CALL_ID.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CallSlot {
            state: RwLock::new(Some(StatePtr(NonNull::from(state).cast()))),
        });
        write(&LIVE_CALLS).insert(id, slot.clone());
        Self {
            id,
            slot,
            _state: PhantomData,
        }
    }

    /// The `wh_call` handed to the handler: the id, as a pointer nobody dereferences.
    fn id(&self) -> *mut ffi::wh_call {
        self.id as *mut ffi::wh_call
    }
}

impl Drop for LiveCall<'_> {
    fn drop(&mut self) {
        write(&LIVE_CALLS).remove(&self.id);
        // Waits for every callback that found the slot before it left the map.
        *write(&self.slot.state) = None;
    }
}

/// Runs `use_state` on the state of the open call `call` names, keeping the call open until it
/// returns. `None` when `call` names no open call: it ended, or it was never handed out.
fn with_call<R>(call: *mut ffi::wh_call, use_state: impl FnOnce(&CallState<'_>) -> R) -> Option<R> {
    let slot = read(&LIVE_CALLS).get(&(call as usize)).cloned()?;
    let open = read(&slot.state);
    let state = (*open)?;
    // SAFETY: the address is in the slot only while its call is open: the `LiveCall` that put it
    // there borrows the state, and before that borrow ends it takes this lock for writing (so
    // waits for `open`) and clears the slot. So the state is alive and in place until `open` is
    // dropped, after `use_state` has returned; `use_state` cannot keep the reference, since its
    // result type does not depend on the reference's lifetime.
    let state = unsafe { state.0.cast::<CallState<'_>>().as_ref() };
    Some(use_state(state))
}

/// Locks for reading; a poisoned lock is still used (its data is never left half-written).
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Locks for writing; a poisoned lock is still used (its data is never left half-written).
fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

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
        state.span.in_scope(|| match level {
            ffi::WH_LOG_TRACE => tracing::trace!(target: "handler", "{text}"),
            ffi::WH_LOG_DEBUG => tracing::debug!(target: "handler", "{text}"),
            ffi::WH_LOG_WARN => tracing::warn!(target: "handler", "{text}"),
            ffi::WH_LOG_ERROR => tracing::error!(target: "handler", "{text}"),
            _ => tracing::info!(target: "handler", "{text}"),
        });
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
        match state.accept_json("output", bytes, json_len) {
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
/// over the output limit).
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
        // SAFETY: per the caller; `handler_bytes` reads nothing over the limit.
        let bytes = unsafe { handler_bytes(json, json_len, state.limits.max_output_bytes) };
        let what = match event {
            Event::Chunk => "stream chunk",
            Event::Progress => "progress",
        };
        match state.accept_json(what, bytes, json_len) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::DiscardEvents;
    use std::mem::{offset_of, size_of};
    use std::sync::mpsc;
    use std::time::Duration;

    /// The output limit of the calls these tests open.
    const LIMIT: usize = 64;

    /// Opens a job call (of a streaming handler or not) with `events`, runs `body` with its
    /// `wh_call`, ends the call and returns what it recorded.
    fn job_call(
        streaming: bool,
        events: &dyn JobEvents,
        body: impl FnOnce(*mut ffi::wh_call),
    ) -> CallRecord {
        let span = Span::none();
        let cancel = CancelToken::new();
        let limits = Limits {
            max_output_bytes: LIMIT,
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
        let span = Span::none();
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
                ]
            };
            assert_eq!(statuses, [ffi::WH_STATUS_INVALID_STATE; 4]);
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
        let span = Span::none();
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
        assert!(events.0.lock().unwrap().is_empty());
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
        assert_eq!(record.output.as_ref().map(|json| json.get()), Some("1"));
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
        assert_eq!(record.output.as_ref().map(|json| json.get()), Some("2"));
        assert!(record.output_rejection.is_none(), "a later value clears it");
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

    unsafe extern "C" fn test_init(
        _call: *mut ffi::wh_call,
        _host: *const ffi::wh_host_api,
        _config: *const c_char,
        _config_len: usize,
    ) -> ffi::wh_status {
        ffi::WH_STATUS_OK
    }

    unsafe extern "C" fn test_handle(
        _call: *mut ffi::wh_call,
        _host: *const ffi::wh_host_api,
        _job: *const ffi::wh_job,
    ) -> ffi::wh_status {
        ffi::WH_STATUS_OK
    }

    unsafe extern "C" fn test_teardown(_call: *mut ffi::wh_call, _host: *const ffi::wh_host_api) {}

    /// A descriptor with every field set.
    fn full_descriptor() -> ffi::wh_handler_descriptor {
        ffi::wh_handler_descriptor {
            struct_size: size_of::<ffi::wh_handler_descriptor>() as u32,
            abi_major: ffi::WH_ABI_MAJOR,
            abi_minor: ffi::WH_ABI_MINOR,
            name: c"name".as_ptr(),
            version: c"1.0.0".as_ptr(),
            max_concurrency: 3,
            reserved0: 0,
            features: ffi::WH_FEATURE_STREAMING,
            init: Some(test_init),
            handle: Some(test_handle),
            teardown: Some(test_teardown),
        }
    }

    /// Fields past a (smaller, older) descriptor's `struct_size` read as zero: a handler built
    /// before a field was appended gets `None` for it, not whatever follows its descriptor.
    #[test]
    fn fields_past_struct_size_read_as_zero() {
        let full = full_descriptor();
        let cut = offset_of!(ffi::wh_handler_descriptor, teardown);
        // SAFETY: `full` is a whole descriptor, so its first `cut` bytes are readable.
        let copy = unsafe { read_descriptor(&full, cut) };
        assert!(copy.teardown.is_none());
        assert!(copy.init.is_some() && copy.handle.is_some());
        assert_eq!(
            (copy.max_concurrency, copy.features, copy.name),
            (3, ffi::WH_FEATURE_STREAMING, full.name)
        );
    }

    /// A larger (newer) descriptor is read up to the fields this host knows.
    #[test]
    fn a_larger_descriptor_is_read_up_to_our_fields() {
        #[repr(C)]
        struct Newer {
            known: ffi::wh_handler_descriptor,
            appended: [u64; 4],
        }
        let newer = Newer {
            known: ffi::wh_handler_descriptor {
                struct_size: size_of::<Newer>() as u32,
                ..full_descriptor()
            },
            appended: [u64::MAX; 4],
        };
        // SAFETY: `newer` is `struct_size` bytes long.
        let copy = unsafe { read_descriptor(&newer.known, size_of::<Newer>()) };
        assert_eq!(copy.struct_size as usize, size_of::<Newer>());
        assert!(copy.teardown.is_some());
        assert_eq!(copy.version, newer.known.version);
        assert_eq!(newer.appended, [u64::MAX; 4]);
    }
}
