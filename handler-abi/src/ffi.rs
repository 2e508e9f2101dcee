//! The `#[repr(C)]` mirror of `include/worker_host.h`, field for field.
//!
//! The header is the source of truth; this module must match it exactly, and `tests/header.rs`
//! compiles the header with the system C compiler and compares every size and offset. Names keep
//! the header's `wh_` spelling so a reader can move between the two without a map.

#![allow(non_camel_case_types)]

use std::ffi::c_char;

/// `WH_ABI_MAJOR`: changes only with a breaking change.
pub const WH_ABI_MAJOR: u16 = 1;
/// `WH_ABI_MINOR`: grows when fields or callbacks are appended.
pub const WH_ABI_MINOR: u16 = 0;
/// `WH_ENTRY_SYMBOL`, NUL-terminated for `dlsym`.
pub const WH_ENTRY_SYMBOL: &[u8] = b"wh_handler_entry\0";
/// `WH_FEATURE_STREAMING`: the handler's result is its stream of `emit`ted chunks.
pub const WH_FEATURE_STREAMING: u64 = 1 << 0;

/// `wh_status`: a plain 32-bit integer, so a value the host does not know is still sound.
pub type wh_status = i32;
/// `WH_STATUS_OK`
pub const WH_STATUS_OK: wh_status = 0;
/// `WH_STATUS_ERROR`
pub const WH_STATUS_ERROR: wh_status = 1;
/// `WH_STATUS_INVALID_ARGUMENT`
pub const WH_STATUS_INVALID_ARGUMENT: wh_status = 2;
/// `WH_STATUS_INVALID_STATE`
pub const WH_STATUS_INVALID_STATE: wh_status = 3;
/// `WH_STATUS_TOO_LARGE`
pub const WH_STATUS_TOO_LARGE: wh_status = 4;
/// `WH_STATUS_CANCELLED`
pub const WH_STATUS_CANCELLED: wh_status = 5;

/// `wh_log_level`
pub type wh_log_level = i32;
/// `WH_LOG_TRACE`
pub const WH_LOG_TRACE: wh_log_level = 0;
/// `WH_LOG_DEBUG`
pub const WH_LOG_DEBUG: wh_log_level = 1;
/// `WH_LOG_INFO`
pub const WH_LOG_INFO: wh_log_level = 2;
/// `WH_LOG_WARN`
pub const WH_LOG_WARN: wh_log_level = 3;
/// `WH_LOG_ERROR`
pub const WH_LOG_ERROR: wh_log_level = 4;

/// `wh_call`: opaque to the handler; the host casts it to its own per-call state.
#[repr(C)]
#[derive(Debug)]
pub struct wh_call {
    _opaque: [u8; 0],
    _not_send_sync_unpin: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
}

/// `wh_host_api`: the host's callback table.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct wh_host_api {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub log: unsafe extern "C" fn(*mut wh_call, wh_log_level, *const c_char, usize),
    pub set_output: unsafe extern "C" fn(*mut wh_call, *const c_char, usize) -> wh_status,
    pub set_error:
        unsafe extern "C" fn(*mut wh_call, *const c_char, usize, *const c_char, usize) -> wh_status,
    pub emit: unsafe extern "C" fn(*mut wh_call, *const c_char, usize) -> wh_status,
    pub progress: unsafe extern "C" fn(*mut wh_call, *const c_char, usize) -> wh_status,
    pub is_cancelled: unsafe extern "C" fn(*mut wh_call) -> bool,
    pub request_recycle: unsafe extern "C" fn(*mut wh_call),
}

/// `wh_job`: one job, borrowed for the duration of `handle`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct wh_job {
    pub struct_size: u32,
    pub id: *const c_char,
    pub id_len: usize,
    pub input_json: *const c_char,
    pub input_json_len: usize,
    pub job_json: *const c_char,
    pub job_json_len: usize,
}

/// `wh_init_fn`
pub type wh_init_fn =
    unsafe extern "C" fn(*mut wh_call, *const wh_host_api, *const c_char, usize) -> wh_status;
/// `wh_handle_fn`
pub type wh_handle_fn =
    unsafe extern "C" fn(*mut wh_call, *const wh_host_api, *const wh_job) -> wh_status;
/// `wh_teardown_fn`
pub type wh_teardown_fn = unsafe extern "C" fn(*mut wh_call, *const wh_host_api);

/// `wh_handler_descriptor`: static, immutable, valid for the life of the process.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct wh_handler_descriptor {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub name: *const c_char,
    pub version: *const c_char,
    pub max_concurrency: u32,
    pub reserved0: u32,
    pub features: u64,
    /// Never NULL in a valid descriptor; `Option` so the host can check instead of trusting.
    pub init: Option<wh_init_fn>,
    /// Never NULL in a valid descriptor.
    pub handle: Option<wh_handle_fn>,
    /// May be NULL.
    pub teardown: Option<wh_teardown_fn>,
}

// SAFETY: a descriptor is static and immutable by contract (see the header); its pointers refer
// to static strings and functions, so sharing it across threads is sound.
unsafe impl Sync for wh_handler_descriptor {}
// SAFETY: as above; the descriptor owns nothing that is tied to a thread.
unsafe impl Send for wh_handler_descriptor {}

/// `wh_handler_entry_fn`
pub type wh_handler_entry_fn = unsafe extern "C" fn() -> *const wh_handler_descriptor;
