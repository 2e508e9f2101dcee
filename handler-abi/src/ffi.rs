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
pub const WH_ABI_MINOR: u16 = 1;
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
    /// Appended in ABI 1.1: read only from a table whose `abi_minor >= 1`.
    pub set_error_traceback: unsafe extern "C" fn(*mut wh_call, *const c_char, usize) -> wh_status,
    /// Appended in ABI 1.1: read only from a table whose `abi_minor >= 1`.
    pub set_features: unsafe extern "C" fn(*mut wh_call, u32, u64) -> wh_status,
}

impl wh_host_api {
    /// Whether this table has the callbacks of ABI 1.1 (`set_error_traceback`, `set_features`):
    /// its minor says so and its size reaches past them. A handler must check this before it
    /// reads either field, since a 1.0 host's table ends before them.
    pub fn has_1_1(&self) -> bool {
        self.abi_major == WH_ABI_MAJOR
            && self.abi_minor >= 1
            && self.struct_size as usize >= HOST_API_SIZE_1_1
    }
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

// The ABI 1.0 sizes (and, below, what 1.1 appended). A 1.x reader must accept any `struct_size` at least this large (a 1.0 writer
// fills exactly these bytes) and must not compare against `size_of` of its own struct, which
// grows whenever a minor appends a field. Each is the end of the struct's last 1.0 field, which
// later minors never move; today that is also the struct's size (see the tests below).

/// The smallest `wh_handler_descriptor.struct_size` a 1.x host accepts: the end of `teardown`,
/// the last field of ABI 1.0.
pub const DESCRIPTOR_SIZE_1_0: usize = std::mem::offset_of!(wh_handler_descriptor, teardown)
    + std::mem::size_of::<Option<wh_teardown_fn>>();
/// The smallest `wh_host_api.struct_size` a 1.x handler can be given: the end of
/// `request_recycle`, the last callback of ABI 1.0.
pub const HOST_API_SIZE_1_0: usize = std::mem::offset_of!(wh_host_api, request_recycle)
    + std::mem::size_of::<unsafe extern "C" fn(*mut wh_call)>();
/// The smallest `wh_host_api.struct_size` of a host speaking ABI 1.1: the end of
/// `set_features`, the last callback that minor appended.
pub const HOST_API_SIZE_1_1: usize = std::mem::offset_of!(wh_host_api, set_features)
    + std::mem::size_of::<unsafe extern "C" fn(*mut wh_call, u32, u64) -> wh_status>();
/// The smallest `wh_job.struct_size` a 1.x handler can be given: the end of `job_json_len`, the
/// last field of ABI 1.0.
pub const JOB_SIZE_1_0: usize =
    std::mem::offset_of!(wh_job, job_json_len) + std::mem::size_of::<usize>();

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    /// The mirror describes ABI 1.1, which appended two callbacks to `wh_host_api` and nothing
    /// else: the table's size is its 1.1 size, and the descriptor's and the job's are still their
    /// 1.0 sizes. When a later minor appends a field, this test fails on purpose: add that minor's
    /// constant and compare today's size with it; the earlier constants never change.
    #[test]
    fn today_sizes_are_the_sizes_of_the_last_minor() {
        assert_eq!(WH_ABI_MINOR, 1);
        let today = |end: usize, align: usize| end.next_multiple_of(align);
        assert_eq!(
            size_of::<wh_handler_descriptor>(),
            today(DESCRIPTOR_SIZE_1_0, align_of::<wh_handler_descriptor>())
        );
        assert_eq!(
            size_of::<wh_host_api>(),
            today(HOST_API_SIZE_1_1, align_of::<wh_host_api>())
        );
        assert_eq!(
            size_of::<wh_job>(),
            today(JOB_SIZE_1_0, align_of::<wh_job>())
        );
    }

    /// On 64-bit targets (every platform worker-host ships for) the 1.0 sizes are these numbers,
    /// whatever is appended later.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn one_zero_sizes_on_64_bit_targets() {
        assert_eq!(DESCRIPTOR_SIZE_1_0, 64);
        assert_eq!(HOST_API_SIZE_1_0, 64);
        assert_eq!(JOB_SIZE_1_0, 56);
        assert_eq!(HOST_API_SIZE_1_1, 80);
    }
}
