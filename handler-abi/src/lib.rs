//! The worker-host handler ABI and the Rust SDK for handler authors.
//!
//! This crate owns the contract between `worker-host` and a handler library:
//!
//! - `include/worker_host.h`, the C header that defines ABI 1.0 (the source of truth);
//! - [`ffi`], its `#[repr(C)]` mirror, used by the host and by this SDK;
//! - the SDK: implement [`Handler`] and call [`export_handler!`], and your crate (built as a
//!   `cdylib`) is a handler that `worker-host` can load. No `unsafe` on your side.
//!
//! ```no_run
//! use handler_abi::{export_handler, Handler, HandlerError, Job, RawJson};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type Config = serde_json::Value;
//!     type Input = RawJson;
//!     type Output = RawJson;
//!
//!     fn init(_config: Self::Config) -> Result<Self, HandlerError> {
//!         Ok(Echo)
//!     }
//!
//!     fn handle(&self, input: RawJson, _job: &Job<'_>) -> Result<RawJson, HandlerError> {
//!         Ok(input)
//!     }
//! }
//!
//! export_handler!(Echo);
//! ```

#[doc(hidden)]
pub mod __private;
pub mod ffi;
mod job;

pub use job::{CallbackError, Job, LogLevel};
pub use serde_json;

use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// A JSON value kept as the exact text it arrived as: echoing it back is byte-exact and costs no
/// parse into a tree.
pub type RawJson = Box<serde_json::value::RawValue>;

/// The path to the C header that defines the ABI, for build scripts of handlers in other
/// languages and for tests.
pub const HEADER_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include/worker_host.h");

/// A handler: turns a job's input into output. One value is built by [`Handler::init`] before the
/// first job and shared by every job after it, so it must be `Sync`; up to
/// [`Handler::MAX_CONCURRENCY`] jobs call [`Handler::handle`] at once, on host threads.
pub trait Handler: Sized + Send + Sync + 'static {
    /// The handler configuration, deserialized from the JSON the operator gave the host (`{}` when
    /// none was given). Use `serde_json::Value` to take it as it is.
    type Config: DeserializeOwned;
    /// The job's `input`. Use [`RawJson`] to take it untouched, `serde_json::Value` for any JSON,
    /// or your own `Deserialize` type: input that does not match fails the job with the reason.
    type Input: DeserializeOwned;
    /// The job's output. Ignored for a streaming handler, whose result is what it emitted.
    type Output: Serialize;

    /// How many jobs may run at once in one process: 1 for a handler that is not thread-safe,
    /// 0 for no limit. The operator's setting can only lower it.
    const MAX_CONCURRENCY: u32 = 0;

    /// Whether the handler streams its output with [`Job::emit`] (a generator handler in RunPod's
    /// Python SDK). Its result is then the stream, and [`Handler::Output`] is discarded.
    const STREAMING: bool = false;

    /// Runs once, before any job: load models, open files, warm caches. An error stops the host
    /// before it takes a job, and the host prints the error's message.
    fn init(config: Self::Config) -> Result<Self, HandlerError>;

    /// Runs one job. A returned error (or a panic) fails the job with its type and message; the
    /// worker goes on with the next job.
    fn handle(&self, input: Self::Input, job: &Job<'_>) -> Result<Self::Output, HandlerError>;

    /// Runs once at shutdown, after the last job. The default does nothing.
    fn teardown(&self) {}
}

/// Why a job (or `init`) failed: a type, which RunPod shows as `error_type`, and a message.
///
/// Any `std::error::Error` converts into it with `?`, taking the error's Rust type name as the
/// type. It deliberately does not implement `std::error::Error` itself, so that blanket conversion
/// can exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    error_type: String,
    message: String,
}

impl HandlerError {
    /// An error with an explicit type, such as `"ValueError"` or `"ModelNotLoaded"`.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// An error of the generic type `HandlerError` with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::new("HandlerError", message)
    }

    /// The error's type.
    pub fn error_type(&self) -> &str {
        &self.error_type
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let full_name = std::any::type_name::<E>();
        Self::new(full_name, error.to_string())
    }
}

/// Exports a [`Handler`] implementation as a worker-host handler library.
///
/// Call it once, at the top level of a crate built with `crate-type = ["cdylib"]`. It defines
/// the library's only exported symbol, `wh_handler_entry`, with the crate's name and version
/// (from Cargo) in the descriptor. Every call into the handler is wrapped in `catch_unwind`, so a
/// panic becomes a job error carrying the panic message instead of aborting the worker.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: () = {
            static INSTANCE: ::std::sync::OnceLock<$handler> = ::std::sync::OnceLock::new();

            unsafe extern "C" fn wh_init(
                call: *mut $crate::ffi::wh_call,
                host: *const $crate::ffi::wh_host_api,
                config_json: *const ::std::ffi::c_char,
                config_json_len: usize,
            ) -> $crate::ffi::wh_status {
                // SAFETY: the host calls this through the descriptor with the arguments the header
                // documents for `wh_init_fn`, which is what `run_init` requires.
                unsafe {
                    $crate::__private::run_init::<$handler>(
                        &INSTANCE,
                        call,
                        host,
                        config_json,
                        config_json_len,
                    )
                }
            }

            unsafe extern "C" fn wh_handle(
                call: *mut $crate::ffi::wh_call,
                host: *const $crate::ffi::wh_host_api,
                job: *const $crate::ffi::wh_job,
            ) -> $crate::ffi::wh_status {
                // SAFETY: the host calls this with the arguments the header documents for
                // `wh_handle_fn`, which is what `run_handle` requires.
                unsafe { $crate::__private::run_handle::<$handler>(&INSTANCE, call, host, job) }
            }

            unsafe extern "C" fn wh_teardown(
                call: *mut $crate::ffi::wh_call,
                host: *const $crate::ffi::wh_host_api,
            ) {
                // SAFETY: the host calls this with the arguments the header documents for
                // `wh_teardown_fn`, which is what `run_teardown` requires.
                unsafe { $crate::__private::run_teardown::<$handler>(&INSTANCE, call, host) }
            }

            static DESCRIPTOR: $crate::ffi::wh_handler_descriptor =
                $crate::ffi::wh_handler_descriptor {
                    struct_size: ::std::mem::size_of::<$crate::ffi::wh_handler_descriptor>() as u32,
                    abi_major: $crate::ffi::WH_ABI_MAJOR,
                    abi_minor: $crate::ffi::WH_ABI_MINOR,
                    name: concat!(env!("CARGO_PKG_NAME"), "\0").as_ptr().cast(),
                    version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast(),
                    max_concurrency: <$handler as $crate::Handler>::MAX_CONCURRENCY,
                    reserved0: 0,
                    features: if <$handler as $crate::Handler>::STREAMING {
                        $crate::ffi::WH_FEATURE_STREAMING
                    } else {
                        0
                    },
                    init: Some(wh_init),
                    handle: Some(wh_handle),
                    teardown: Some(wh_teardown),
                };

            /// The handler library's entry point (see `worker_host.h`).
            #[unsafe(no_mangle)]
            pub extern "C" fn wh_handler_entry() -> *const $crate::ffi::wh_handler_descriptor {
                &DESCRIPTOR
            }
        };
    };
}
