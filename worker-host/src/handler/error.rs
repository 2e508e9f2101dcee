//! Why a handler could not be made ready: one error type for both ways of running it, so that
//! a load failure found in the runner process keeps the sentence and the exit code it has in
//! process (the runner sends it to the host as it is).

use crate::job::Failure;
use std::path::PathBuf;

/// Why a handler library could not be made ready. Each message is one sentence a user can act on.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
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
    /// The file could not be read (to copy it before loading).
    #[error("handler library {path} cannot be read ({reason}): check its permissions")]
    Unreadable {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// The private copy the host loads could not be written.
    #[error("{reason}")]
    PrivateCopy {
        /// Why, in a sentence that names the directory.
        reason: String,
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
        field: String,
    },
    /// The runner process could not be started (or broke the protocol while starting).
    #[error("the handler's runner process could not be started ({reason}); --isolation none runs the handler in the host's own process instead")]
    RunnerStart {
        /// Why.
        reason: String,
    },
    /// The handler's `init` failed.
    #[error("the handler's init failed: {failure}")]
    InitFailed {
        /// What the handler reported.
        failure: Failure,
    },
}

impl LoadError {
    /// The same error about `original`: the library is loaded from a private copy, but a user
    /// knows it by the path they gave.
    pub(crate) fn about(mut self, original: &std::path::Path) -> Self {
        match &mut self {
            Self::NotFound { path }
            | Self::IsADirectory { path }
            | Self::Unreadable { path, .. }
            | Self::NotALibrary { path, .. }
            | Self::MissingEntry { path }
            | Self::NullDescriptor { path }
            | Self::AbiMismatch { path, .. }
            | Self::DescriptorTooSmall { path, .. }
            | Self::InvalidDescriptor { path, .. } => *path = original.to_path_buf(),
            Self::PrivateCopy { .. } | Self::RunnerStart { .. } | Self::InitFailed { .. } => {}
        }
        self
    }
}
