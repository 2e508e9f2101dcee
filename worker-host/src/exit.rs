//! The host's exit codes. They are part of its interface (the README lists them), so they never
//! change meaning.

use crate::handler::LoadError;

/// The run succeeded (and, for a one-shot run, the job did).
pub const SUCCESS: u8 = 0;
/// A one-shot job failed, its output differed from `--test_output`, or the test input was
/// missing or invalid (as in the Python SDK).
pub const JOB_FAILED: u8 = 1;
/// The command line or configuration is wrong.
pub const USAGE: u8 = 2;
/// The handler file does not exist (or is a directory, a crate's included).
pub const HANDLER_NOT_FOUND: u8 = 3;
/// The handler file is not a loadable shared library (an `.rlib` included).
pub const NOT_A_LIBRARY: u8 = 4;
/// The library does not export `wh_handler_entry`.
pub const MISSING_ENTRY: u8 = 5;
/// The handler was built for another ABI major.
pub const ABI_MISMATCH: u8 = 6;
/// The handler's descriptor is invalid (NULL, too small, or missing a function).
pub const INVALID_DESCRIPTOR: u8 = 7;
/// The handler's `init` failed.
pub const INIT_FAILED: u8 = 8;

/// The exit code for a handler that could not be made ready.
pub fn for_load_error(error: &LoadError) -> u8 {
    match error {
        LoadError::NotFound { .. }
        | LoadError::NotFoundButNamedOtherwise { .. }
        | LoadError::OnlyRustLibraryBuilt { .. }
        | LoadError::IsADirectory { .. }
        | LoadError::CrateDirectory { .. } => HANDLER_NOT_FOUND,
        LoadError::NotALibrary { .. }
        | LoadError::Unreadable { .. }
        | LoadError::RustLibrary { .. } => NOT_A_LIBRARY,
        LoadError::MissingEntry { .. } => MISSING_ENTRY,
        LoadError::AbiMismatch { .. } => ABI_MISMATCH,
        LoadError::NullDescriptor { .. }
        | LoadError::DescriptorTooSmall { .. }
        | LoadError::InvalidDescriptor { .. } => INVALID_DESCRIPTOR,
        LoadError::InitFailed { .. } => INIT_FAILED,
        LoadError::RunnerStart { .. } | LoadError::PrivateCopy { .. } => JOB_FAILED,
    }
}
