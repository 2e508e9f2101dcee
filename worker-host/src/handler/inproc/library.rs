//! Loading a handler library into this process: `dlopen`, the entry symbol, the descriptor
//! checked field by field; and the three calls into it (`init`, `handle`, `teardown`), each with a
//! fresh call in the registry of `calls` and the callback table of `callbacks`.
//!
//! A loaded library is never unloaded (`dlclose`): Rust and Go libraries cannot be unloaded
//! safely, and a process loads its handler once (a new version gets a new runner process).

use super::callbacks::HOST_API;
use super::calls::{CallState, LiveCall, Phase};
use super::HandlerLog;
use crate::handler::{CancelToken, HandlerInfo, JobEvents, Limits, LoadError};
use crate::job::{Failure, JobResult, Outcome, Output};
use handler_abi::ffi;
use std::ffi::{c_char, CStr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

/// A handler library loaded into this process.
#[derive(Debug)]
pub struct HandlerLibrary {
    /// A copy of the handler's descriptor, as this host's ABI minor lays it out (see
    /// `read_descriptor`). Its strings and functions are static: the library is never unloaded.
    descriptor: ffi::wh_handler_descriptor,
    /// What the descriptor says.
    info: HandlerInfo,
    /// What holds once `init` succeeded: the descriptor's facts with the features `init`
    /// reported (ABI 1.1 `set_features`), if it did.
    after_init: OnceLock<HandlerInfo>,
    limits: Limits,
}

impl HandlerLibrary {
    /// Loads the library at `path` and checks its descriptor, without running `init`.
    pub fn load(path: &Path, limits: Limits) -> Result<Self, LoadError> {
        // dlopen searches the library path for a name without a slash; an operator's path always
        // means a file, so make it absolute first.
        let path_buf = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = path_buf.as_path();
        crate::handler::check_path(path)?;
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
            reason: loader_reason(&error, path),
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
        let missing = |field: &str| LoadError::InvalidDescriptor {
            path: path_buf.clone(),
            field: field.to_owned(),
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
            sha256: String::new(),
        };
        Ok(Self {
            descriptor,
            info,
            after_init: OnceLock::new(),
            limits,
        })
    }

    /// What the handler says about itself: its descriptor, and once `init` succeeded, with the
    /// features `init` reported.
    pub fn info(&self) -> &HandlerInfo {
        self.after_init.get().unwrap_or(&self.info)
    }

    /// Runs the handler's `init` with its configuration (JSON text), on this thread; its log
    /// lines go to `log`.
    pub fn init(&self, config_json: &str, log: &dyn HandlerLog) -> Result<(), LoadError> {
        let init = self.descriptor.init.expect("checked at load");
        let config = nul_terminated(config_json);
        let state = self.lifecycle_call(Phase::Init, log);
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
        let mut record = state.into_record();
        match (record.handler_error(), status) {
            (None, ffi::WH_STATUS_OK) => {
                let mut info = self.info.clone();
                if let Some((max_concurrency, features)) = record.features {
                    info.max_concurrency = max_concurrency;
                    info.streaming = features & ffi::WH_FEATURE_STREAMING != 0;
                }
                // A second `init` (which the host never makes) keeps the first one's features.
                let _ = self.after_init.set(info);
                Ok(())
            }
            (Some(failure), _) => Err(LoadError::InitFailed { failure }),
            (None, status) => Err(LoadError::InitFailed {
                failure: Failure::new(
                    "InitFailed",
                    format!("init returned status {status} without a message"),
                ),
            }),
        }
    }

    /// Runs one job on this thread: what it emits goes to `events`, its log lines to `log`.
    pub fn run(
        &self,
        job: &JobText<'_>,
        events: &dyn JobEvents,
        cancel: &CancelToken,
        log: &dyn HandlerLog,
    ) -> JobResult {
        let handle = self.descriptor.handle.expect("checked at load");
        let raw_job = ffi::wh_job {
            struct_size: std::mem::size_of::<ffi::wh_job>() as u32,
            id: job.id.as_ptr().cast::<c_char>(),
            id_len: job.id.len() - 1,
            input_json: job.input.as_ptr().cast::<c_char>(),
            input_json_len: job.input.len() - 1,
            job_json: job.job_json.as_ptr().cast::<c_char>(),
            job_json_len: job.job_json.len() - 1,
        };
        let streaming = self.info().streaming;
        let state = CallState::new(
            Phase::Job,
            log,
            streaming,
            self.limits,
            Some(events),
            Some(cancel),
        );
        let call = LiveCall::open(&state);
        // SAFETY: `handle` has the header's signature; every buffer `raw_job` points to outlives
        // the call and ends with the NUL the header promises (`JobText` checks it); HOST_API is
        // static. `call.id()` is an id, not an address (see `LiveCall`).
        let status = unsafe { handle(call.id(), &HOST_API, &raw_job) };
        // Ends the call before its state goes: waits for callbacks still running elsewhere.
        drop(call);
        let recycle = state.recycle.load(Ordering::Acquire);
        let mut record = state.into_record();
        let failed = |failure| Outcome::Failed { failure, streaming };
        let error = record.handler_error();
        let rejection = record.chunk_rejection.or(record.output_rejection);
        let outcome = match (rejection, error, status) {
            // A refused output or chunk is the root cause; the handler's own error usually just
            // echoes it.
            (Some(rejection), _, _) => failed(rejection),
            (None, Some(failure), _) => failed(failure),
            (None, None, ffi::WH_STATUS_OK) if streaming => Outcome::Streamed,
            (None, None, ffi::WH_STATUS_OK) => {
                Outcome::Output(record.output.unwrap_or_else(Output::null))
            }
            (None, None, status) => failed(Failure::new(
                "HandlerError",
                format!("the handler returned status {status} without an error message"),
            )),
        };
        JobResult { outcome, recycle }
    }

    /// Runs the handler's `teardown` (if it has one) on this thread. Call once, after every
    /// other call has returned.
    pub fn teardown(&self, log: &dyn HandlerLog) {
        let Some(teardown) = self.descriptor.teardown else {
            return;
        };
        let state = self.lifecycle_call(Phase::Teardown, log);
        let call = LiveCall::open(&state);
        // SAFETY: `teardown` has the header's signature; HOST_API is static. `call.id()` is an
        // id, not an address (see `LiveCall`).
        unsafe { teardown(call.id(), &HOST_API) };
        drop(call);
    }
}

impl HandlerLibrary {
    /// The state of an `init` or `teardown` call: no job, so no events and no cancel.
    fn lifecycle_call<'a>(&self, phase: Phase, log: &'a dyn HandlerLog) -> CallState<'a> {
        CallState::new(phase, log, self.info().streaming, self.limits, None, None)
    }
}

/// A job's three strings as a handler receives them: each ends with a NUL (not counted in the
/// length the handler is given), and all are borrowed for the call.
#[derive(Debug, Clone, Copy)]
pub struct JobText<'a> {
    id: &'a [u8],
    input: &'a [u8],
    job_json: &'a [u8],
}

impl<'a> JobText<'a> {
    /// The job's strings, each with its terminating NUL; `None` if one lacks it.
    pub fn new(id: &'a [u8], input: &'a [u8], job_json: &'a [u8]) -> Option<Self> {
        let terminated = |text: &[u8]| text.last() == Some(&0);
        (terminated(id) && terminated(input) && terminated(job_json)).then_some(Self {
            id,
            input,
            job_json,
        })
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

/// The dynamic loader's reason, without the path of the library it repeats at the front. The
/// rest is kept whole: for a missing dependency it names the dependency
/// (`libfoo.so.1: cannot open shared object file: ...`), for an undefined symbol the symbol.
fn loader_reason(error: &libloading::Error, path: &Path) -> String {
    let text = error.to_string();
    let prefix = format!("{}: ", path.display());
    match text.find(&prefix) {
        Some(start) if text.len() > start + prefix.len() => text[start + prefix.len()..].to_owned(),
        _ => text,
    }
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(text.len() + 1);
    buffer.extend_from_slice(text.as_bytes());
    buffer.push(0);
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

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
