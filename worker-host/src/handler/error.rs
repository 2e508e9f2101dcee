//! Why a handler could not be made ready: one error type for both ways of running it, so that
//! a load failure found in the runner process keeps the sentence and the exit code it has in
//! process (the runner sends it to the host as it is); and [`check_path`], which looks at the
//! path the user gave before anything is loaded and, when it is not a library, picks the
//! sentence that points at the fix (a Rust crate built without `cdylib`, a hyphen where cargo
//! writes an underscore, a crate directory, an `.rlib`).

use crate::job::Failure;
use std::path::{Path, PathBuf};

/// What a Rust crate's manifest must say for cargo to build a handler library from it.
const CDYLIB_FIX: &str = r#"add `crate-type = ["cdylib"]` to [lib] in Cargo.toml"#;

/// Why a handler library could not be made ready. Each message is one sentence a user can act on.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LoadError {
    /// The path does not name a file.
    #[error("handler library {path} does not exist: build it (cargo build --release) or point --handler / WORKER_HOST_HANDLER at the .so file")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path does not name a file, but a file by the name cargo would have written does: the
    /// user's name has a hyphen where cargo writes an underscore, or lacks the `lib` prefix.
    #[error("handler library {path} does not exist, but {existing} does (cargo names a crate's library lib<name>.so, with underscores for the hyphens of the crate's name): point --handler / WORKER_HOST_HANDLER at it")]
    NotFoundButNamedOtherwise {
        /// The path given.
        path: PathBuf,
        /// The library that does exist.
        existing: PathBuf,
    },
    /// The path does not name a file, but the Rust library (`.rlib`) of the same crate is there:
    /// the crate was built without `cdylib`.
    #[error("handler library {path} does not exist, but {rlib} does: the crate was built as a Rust library only; {fix}, build it again (cargo build --release), and the .so appears beside the .rlib", fix = CDYLIB_FIX)]
    OnlyRustLibraryBuilt {
        /// The path given.
        path: PathBuf,
        /// The `.rlib` that was built instead.
        rlib: PathBuf,
    },
    /// The path names a directory.
    #[error("handler library {path} is a directory: point --handler / WORKER_HOST_HANDLER at the .so file inside it")]
    IsADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The path names a Rust crate's directory (it holds a `Cargo.toml`).
    #[error("{path} is a Rust crate's directory, not a handler library: build it (cargo build --release) and point --handler / WORKER_HOST_HANDLER at the lib{lib_name}.so cargo writes in the target/release directory{fix}")]
    CrateDirectory {
        /// The path given.
        path: PathBuf,
        /// The crate's library name, as cargo spells its file (`my_handler`), or `<name>`.
        lib_name: String,
        /// What the manifest lacks, as a clause (`; first add ...`), or empty.
        fix: String,
    },
    /// The path names a Rust library (`.rlib`), which cannot be loaded.
    #[error("{path} is a Rust library (.rlib), which cannot be loaded: {fix}, build it again (cargo build --release), and point --handler / WORKER_HOST_HANDLER at the .so that appears beside it", fix = CDYLIB_FIX)]
    RustLibrary {
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
            | Self::NotFoundButNamedOtherwise { path, .. }
            | Self::OnlyRustLibraryBuilt { path, .. }
            | Self::IsADirectory { path }
            | Self::CrateDirectory { path, .. }
            | Self::RustLibrary { path }
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

/// Checks that `path` (absolute) names a file that may be a handler library, before anything is
/// copied or loaded; when it does not, the error says what to do, from what lies around it.
pub(crate) fn check_path(path: &Path) -> Result<(), LoadError> {
    if path.is_dir() {
        let manifest = path.join("Cargo.toml");
        return Err(match std::fs::read_to_string(&manifest) {
            Ok(manifest) => crate_directory(path, &manifest),
            Err(_) if manifest.exists() => crate_directory(path, ""),
            Err(_) => LoadError::IsADirectory {
                path: path.to_path_buf(),
            },
        });
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|extension| extension == "rlib")
        {
            return Err(LoadError::RustLibrary {
                path: path.to_path_buf(),
            });
        }
        return Ok(());
    }
    let path_buf = path.to_path_buf();
    let (Some(dir), Some(name)) = (
        path.parent(),
        path.file_name().and_then(|name| name.to_str()),
    ) else {
        return Err(LoadError::NotFound { path: path_buf });
    };
    // The names cargo would have written for what the user meant.
    let mut names = vec![name.replace('-', "_")];
    if !name.starts_with("lib") {
        names.push(format!("lib{}", names[0]));
    }
    names.retain(|candidate| candidate != name);
    if let Some(existing) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        return Err(LoadError::NotFoundButNamedOtherwise {
            path: path_buf,
            existing,
        });
    }
    let stem = name.strip_suffix(".so").unwrap_or(name);
    let rlib = std::iter::once(stem.to_owned())
        .chain(
            names
                .iter()
                .map(|n| n.strip_suffix(".so").unwrap_or(n).to_owned()),
        )
        .map(|stem| dir.join(format!("{stem}.rlib")))
        .find(|rlib| rlib.is_file());
    Err(match rlib {
        Some(rlib) => LoadError::OnlyRustLibraryBuilt {
            path: path_buf,
            rlib,
        },
        None => LoadError::NotFound { path: path_buf },
    })
}

/// The error for a crate directory whose manifest reads `manifest`: the library's file name, and
/// whether the manifest still lacks `cdylib`.
fn crate_directory(path: &Path, manifest: &str) -> LoadError {
    let lib_name = manifest_lib_name(manifest)
        .map_or_else(|| "<name>".to_owned(), |name| name.replace('-', "_"));
    let fix = if manifest.contains("cdylib") {
        String::new()
    } else {
        format!(" (first {CDYLIB_FIX}: without it cargo builds no .so)")
    };
    LoadError::CrateDirectory {
        path: path.to_path_buf(),
        lib_name,
        fix,
    }
}

/// The library name a Cargo manifest gives: `name` in `[lib]`, else in `[package]`. A line scan,
/// not a TOML parser: enough for a message, and `None` when the manifest says it another way.
fn manifest_lib_name(manifest: &str) -> Option<String> {
    let mut section = "";
    let (mut package, mut lib) = (None, None);
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let Some(value) = line
            .strip_prefix("name")
            .map(str::trim_start)
            .and_then(|rest| rest.strip_prefix('='))
        else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        match section {
            "[lib]" => lib = Some(value),
            "[package]" => package = Some(value),
            _ => {}
        }
    }
    lib.or(package).filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library name comes from `[lib]` when it names one, else from `[package]`.
    #[test]
    fn manifest_lib_names() {
        let package = "[package]\nname = \"my-handler\"\nversion = \"0.1.0\"\n";
        assert_eq!(manifest_lib_name(package).as_deref(), Some("my-handler"));
        let lib = format!("{package}\n[lib]\nname = \"engine\"\ncrate-type = [\"cdylib\"]\n");
        assert_eq!(manifest_lib_name(&lib).as_deref(), Some("engine"));
        assert_eq!(manifest_lib_name("[workspace]\nmembers = []\n"), None);
    }
}
