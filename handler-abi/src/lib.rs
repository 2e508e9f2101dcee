//! The worker-host handler ABI and the Rust SDK for handler authors.
//!
//! This crate owns the contract between `worker-host` and a handler library:
//!
//! - `include/worker_host.h`, the C header that defines ABI 1.1 (the source of truth);
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

    /// How many jobs may run at once, as this value (built by [`Handler::init`]) knows it: for a
    /// handler that learns it only in `init` (a bridge that loads a script, say). Read once,
    /// right after `init`; the host then uses it instead of [`Handler::MAX_CONCURRENCY`] (ABI
    /// 1.1, `set_features`). The default is [`Handler::MAX_CONCURRENCY`].
    fn max_concurrency(&self) -> u32 {
        Self::MAX_CONCURRENCY
    }

    /// Whether the handler streams, as this value knows it; read once, right after `init`, like
    /// [`Handler::max_concurrency`], and used instead of [`Handler::STREAMING`] from then on.
    /// The default is [`Handler::STREAMING`].
    fn streaming(&self) -> bool {
        Self::STREAMING
    }
}

/// Why a job (or `init`) failed: a type, which RunPod shows as `error_type`, and a message.
///
/// Any `std::error::Error` converts into it with `?`. The type is the error's short Rust type
/// name: `CallbackError`, `ParseIntError`, or, for the many crates whose error type is simply
/// called `Error`, the crate's name with it (`serde_json::Error`; `std::io::Error` and
/// `std::fmt::Error` keep their module). The message is the error's `Display` text, followed by its `source()`
/// chain (`: caused by ...`) where the text does not already include it. Use
/// [`HandlerError::new`] to choose the type yourself. `HandlerError` deliberately does not
/// implement `std::error::Error` itself, so that blanket conversion can exist.
///
/// An error may carry a traceback ([`HandlerError::with_traceback`]), which RunPod shows as
/// `error_traceback`. The SDK fills it for a panic, with the panic's location and a backtrace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    error_type: String,
    message: String,
    traceback: Option<String>,
}

impl HandlerError {
    /// An error with an explicit type, such as `"ValueError"` or `"ModelNotLoaded"`.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
            traceback: None,
        }
    }

    /// The same error with a traceback: where it was raised and how the code got there, as text
    /// (for example a `std::backtrace::Backtrace` formatted with `to_string`). RunPod shows it as
    /// the job's `error_traceback`; a host older than ABI 1.1 drops it.
    pub fn with_traceback(mut self, traceback: impl Into<String>) -> Self {
        self.traceback = Some(traceback.into());
        self
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

    /// The error's traceback, if it has one.
    pub fn traceback(&self) -> Option<&str> {
        self.traceback.as_deref()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::new(
            short_type_name(std::any::type_name::<E>()),
            message_with_sources(&error),
        )
    }
}

/// A readable `error_type` for a Rust type name as `std::any::type_name` spells it: the last
/// path segment without generics (`handler_abi::job::CallbackError` -> `CallbackError`), or the
/// crate and `Error` when that segment is just `Error` (`serde_json::error::Error` ->
/// `serde_json::Error`), which alone would say nothing. `core` and `alloc` read as `std`, the
/// name users know them by. References and the standard smart pointers show what they point to.
fn short_type_name(full_name: &str) -> String {
    let mut name = full_name.trim_start_matches('&').trim_start_matches("mut ");
    for wrapper in ["alloc::boxed::Box<", "alloc::sync::Arc<", "alloc::rc::Rc<"] {
        if let Some(inner) = name
            .strip_prefix(wrapper)
            .and_then(|rest| rest.strip_suffix('>'))
        {
            return short_type_name(inner);
        }
    }
    // Generic arguments are paths too (`Wrapper<alloc::string::String>`): cut them off first.
    name = name.split('<').next().unwrap_or(name);
    let last = name.rsplit("::").next().unwrap_or(name);
    if last != "Error" {
        return last.to_owned();
    }
    let segments: Vec<&str> = name.split("::").collect();
    match segments.as_slice() {
        // The standard library has several `Error`s: keep the public module, without the
        // private `error` module that `type_name` shows (`std::io::error::Error`).
        ["core" | "alloc" | "std", modules @ .., _] => {
            let mut path = vec!["std"];
            path.extend(modules.iter().filter(|module| **module != "error"));
            path.push("Error");
            path.join("::")
        }
        [krate, _, ..] => format!("{krate}::Error"),
        _ => last.to_owned(),
    }
}

/// The error's message, then each cause in its `source()` chain as `: caused by <cause>`. Many
/// errors already print their cause in their own message (`#[error("reading the model: {0}")]`);
/// a cause whose text is already there is not repeated.
fn message_with_sources(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": caused by ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Exports a [`Handler`] implementation as a worker-host handler library.
///
/// Call it once, at the top level of a crate built with `crate-type = ["cdylib"]`. It defines
/// the library's only exported symbol, `wh_handler_entry`, with the crate's name and version
/// (from Cargo) in the descriptor. Every call into the handler is wrapped in `catch_unwind`, so a
/// panic becomes a job error carrying the panic message instead of aborting the worker, with the
/// panic's location and a backtrace as its traceback (taken by a panic hook the SDK adds in front
/// of the one already set, which still prints the panic as before; a handler that replaces the
/// panic hook itself gets no traceback for its panics).
///
/// # Panic strategy
///
/// That protection needs panics to unwind, Cargo's default. A handler built with
/// `panic = "abort"` (in a `[profile.*]` section of the workspace's `Cargo.toml`, or
/// `-C panic=abort` in `RUSTFLAGS`) would have any panic kill the whole worker, with every job in
/// flight. The macro refuses to compile there: remove the setting, or set `panic = "unwind"`.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        #[cfg(panic = "abort")]
        ::core::compile_error!(
            "export_handler! needs panics to unwind, but this crate is built with panic = \"abort\", \
             so a panic in the handler would kill the whole worker instead of failing one job. \
             Build the handler with panic = \"unwind\" (Cargo's default): remove `panic = \"abort\"` \
             from the [profile] sections of your workspace's Cargo.toml and `-C panic=abort` from \
             RUSTFLAGS."
        );

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

#[cfg(test)]
mod tests {
    use super::*;

    /// An error type named `Error`, in a module named `error`, as many crates spell theirs.
    mod error {
        #[derive(Debug, thiserror::Error)]
        #[error("the model file is missing")]
        pub struct Error {
            #[source]
            pub source: std::io::Error,
        }
    }

    /// An error whose message already quotes its cause.
    #[derive(Debug, thiserror::Error)]
    #[error("reading the config: {0}")]
    struct ReadConfig(#[from] std::io::Error);

    /// `?` gives a short, readable `error_type` and keeps the error's own message.
    #[test]
    fn error_type_is_the_short_type_name() {
        let cases = [
            (
                HandlerError::from(CallbackError::Cancelled),
                "CallbackError",
            ),
            (
                HandlerError::from(serde_json::from_str::<u8>("x").unwrap_err()),
                "serde_json::Error",
            ),
            (
                HandlerError::from(std::io::Error::other("disk full")),
                "std::io::Error",
            ),
            (
                HandlerError::from("x".parse::<u8>().unwrap_err()),
                "ParseIntError",
            ),
            (HandlerError::from(std::fmt::Error), "std::fmt::Error"),
        ];
        for (error, expected) in cases {
            assert_eq!(error.error_type(), expected, "{error}");
        }
        let error = HandlerError::from(serde_json::from_str::<u8>("x").unwrap_err());
        assert_eq!(error.message(), "expected value at line 1 column 1");
        assert_eq!(
            HandlerError::from(CallbackError::Cancelled).message(),
            "the job was cancelled"
        );
    }

    /// Generic arguments, references and smart pointers do not leak into the name.
    #[test]
    fn short_names_drop_paths_and_generics() {
        let cases = [
            ("handler_abi::job::CallbackError", "CallbackError"),
            ("serde_json::error::Error", "serde_json::Error"),
            ("std::io::error::Error", "std::io::Error"),
            ("core::fmt::Error", "std::fmt::Error"),
            ("my_crate::Wrapper<alloc::string::String>", "Wrapper"),
            ("my_crate::error::Error<my_crate::Kind>", "my_crate::Error"),
            (
                "alloc::boxed::Box<serde_json::error::Error>",
                "serde_json::Error",
            ),
            ("alloc::sync::Arc<my_crate::Failed>", "Failed"),
            ("&my_crate::Failed", "Failed"),
            ("&mut my_crate::error::Error", "my_crate::Error"),
            ("Error", "Error"),
        ];
        for (full, short) in cases {
            assert_eq!(short_type_name(full), short, "{full}");
        }
        assert_eq!(
            HandlerError::from(error::Error {
                source: std::io::ErrorKind::NotFound.into(),
            })
            .error_type(),
            "handler_abi::Error"
        );
    }

    /// The `source()` chain follows the message as `: caused by ...`, unless the message
    /// already says it.
    #[test]
    fn message_includes_the_source_chain_once() {
        let missing = error::Error {
            source: std::io::Error::other("no such file: model.bin"),
        };
        assert_eq!(
            HandlerError::from(missing).message(),
            "the model file is missing: caused by no such file: model.bin"
        );
        let config = ReadConfig(std::io::Error::other("permission denied"));
        assert_eq!(
            HandlerError::from(config).message(),
            "reading the config: permission denied"
        );
    }

    /// `export_handler!` refuses to compile in a handler crate built with `panic = "abort"`, and
    /// says how to fix it (a real `cargo check` of a small handler crate).
    #[test]
    fn export_handler_refuses_panic_abort() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let sdk = env!("CARGO_MANIFEST_DIR");
        let manifest = format!(
            "[package]\nname = \"abort-handler\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\npath = \"lib.rs\"\n\n\
             [dependencies]\nhandler-abi = {{ path = {sdk:?} }}\n\n\
             [profile.dev]\npanic = \"abort\"\n\n[workspace]\n"
        );
        let source = "use handler_abi::{export_handler, Handler, HandlerError, Job};\n\
             pub struct Echo;\n\
             impl Handler for Echo {\n\
                 type Config = handler_abi::serde_json::Value;\n\
                 type Input = handler_abi::RawJson;\n\
                 type Output = handler_abi::RawJson;\n\
                 fn init(_: Self::Config) -> Result<Self, HandlerError> { Ok(Echo) }\n\
                 fn handle(&self, input: Self::Input, _: &Job<'_>) -> Result<Self::Output, HandlerError> { Ok(input) }\n\
             }\n\
             export_handler!(Echo);\n";
        std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
        std::fs::write(dir.path().join("lib.rs"), source).unwrap();
        // The workspace's lock file pins the dependencies to versions already on this machine.
        let lock = std::path::Path::new(sdk).join("../Cargo.lock");
        if lock.exists() {
            std::fs::copy(lock, dir.path().join("Cargo.lock")).unwrap();
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = std::process::Command::new(cargo)
            .args(["check", "--offline", "--quiet"])
            .current_dir(dir.path())
            .env("CARGO_TARGET_DIR", dir.path().join("target"))
            .output()
            .expect("cargo could not be started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "it compiled; stderr: {stderr}");
        assert!(
            stderr.contains(r#"Build the handler with panic = "unwind" (Cargo's default)"#),
            "{stderr}"
        );
    }
}
