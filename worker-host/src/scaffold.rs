//! `worker-host new DIR [--lang ...]`: writes a ready-to-build handler project (an echo handler,
//! `test_input.json`, a build command and a short README) that builds outside this repository.
//!
//! This module owns the project templates (the files under `worker-host/templates/`, compiled
//! into the binary) and the copy of the Rust SDK the binary carries: a Rust project depends on
//! this checkout's `handler-abi` by path when the checkout the binary was built from still exists,
//! and otherwise on a copy of the SDK's sources written into the project. C, C++, Go and Zig
//! projects get the header (and `worker_host.hpp` for C++) beside their source.

use std::fmt;
use std::path::{Path, PathBuf};

/// The arguments of `worker-host new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The project's directory: created, or an existing empty one. Its name is the handler's.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// The handler's language.
    #[arg(long, value_enum, default_value_t = Language::Rust)]
    pub lang: Language,

    /// For Rust: write the SDK's sources into the project (`handler-abi/`) even when this
    /// worker-host's checkout is there to depend on by path.
    #[arg(long)]
    pub copy_sdk: bool,
}

/// A language `worker-host new` writes a project in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// Rust, on the SDK in `handler-abi`, built by cargo.
    Rust,
    /// C11, built with `cc`.
    C,
    /// C++17 on `worker_host.hpp`, built with `c++`.
    Cpp,
    /// Go, a `c-shared` library built with `go build`.
    Go,
    /// Zig, built with `zig build-lib -dynamic`.
    Zig,
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rust => "Rust",
            Self::C => "C",
            Self::Cpp => "C++",
            Self::Go => "Go",
            Self::Zig => "Zig",
        })
    }
}

/// Why no project was written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The directory exists and holds something: nothing is overwritten.
    #[error("{} is not empty: worker-host new writes a project only into a new or empty directory, so nothing was written", dir.display())]
    NotEmpty {
        /// The directory.
        dir: PathBuf,
    },
    /// The path exists and is not a directory.
    #[error("{} exists and is not a directory: give worker-host new a new or empty directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory's name cannot be turned into a handler name.
    #[error("cannot name a handler after {}: give a directory whose name starts with a letter (letters, digits, - and _)", dir.display())]
    BadName {
        /// The directory.
        dir: PathBuf,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// What was being written.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ScaffoldError {
    /// The exit code: a refused directory is a usage error; a failed write is not.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Write { .. } => crate::exit::JOB_FAILED,
            _ => crate::exit::USAGE,
        }
    }
}

/// A project that was written, and how to build and run it.
#[derive(Debug)]
pub struct Project {
    /// Its directory.
    pub dir: PathBuf,
    /// The handler's name (the directory's, as a package name).
    pub name: String,
    /// The shell command that builds it, from any working directory.
    pub build: String,
    /// The shell command that runs it on `test_input.json`, from any working directory.
    pub run: String,
    /// For Rust: where the SDK comes from.
    pub sdk: Option<Sdk>,
}

/// Where a Rust project's `handler-abi` dependency points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sdk {
    /// The checkout this binary was built from, by path.
    Checkout(PathBuf),
    /// The copy of the SDK's sources written into the project's `handler-abi/`.
    Copied,
}

/// The header, the C++ layer and the SDK's sources, as this binary was built with them.
mod carried {
    pub const HEADER: &str = include_str!("../../handler-abi/include/worker_host.h");
    pub const HPP: &str = include_str!("../../handler-abi/include/worker_host.hpp");
    /// Every file of `handler-abi/src`, by its path there (a test checks the list is whole).
    pub const SDK_SOURCES: &[(&str, &str)] = &[
        ("lib.rs", include_str!("../../handler-abi/src/lib.rs")),
        ("ffi.rs", include_str!("../../handler-abi/src/ffi.rs")),
        ("job.rs", include_str!("../../handler-abi/src/job.rs")),
        (
            "__private.rs",
            include_str!("../../handler-abi/src/__private.rs"),
        ),
    ];
    /// The checkout's `handler-abi`, where the binary was built.
    pub const SDK_CHECKOUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../handler-abi");
}

/// The templates under `worker-host/templates/`.
mod templates {
    pub const TEST_INPUT: &str = include_str!("../templates/test_input.json");
    pub const README: &str = include_str!("../templates/README.md.in");
    pub const RUST_CARGO: &str = include_str!("../templates/rust/Cargo.toml.in");
    pub const RUST_LIB: &str = include_str!("../templates/rust/src/lib.rs");
    pub const SDK_CARGO: &str = include_str!("../templates/rust/handler-abi.Cargo.toml.in");
    pub const EXPORTS: &str = include_str!("../templates/c/exports.map");
    pub const C_ECHO: &str = include_str!("../templates/c/echo.c");
    pub const C_BUILD: &str = include_str!("../templates/c/build.sh");
    pub const CPP_ECHO: &str = include_str!("../templates/cpp/echo.cpp");
    pub const CPP_BUILD: &str = include_str!("../templates/cpp/build.sh");
    pub const GO_MOD: &str = include_str!("../templates/go/go.mod");
    pub const GO_ECHO: &str = include_str!("../templates/go/echo.go");
    pub const GO_ENTRY: &str = include_str!("../templates/go/entry.c");
    pub const GO_BUILD: &str = include_str!("../templates/go/build.sh");
    pub const ZIG_ECHO: &str = include_str!("../templates/zig/echo.zig");
    pub const ZIG_BUILD: &str = include_str!("../templates/zig/build.sh");
}

/// Runs `worker-host new`: writes the project and prints how to build and run it.
pub fn run(args: &NewArgs) -> Result<(), ScaffoldError> {
    let project = write(args)?;
    let sdk = match &project.sdk {
        Some(Sdk::Checkout(path)) => format!(" (handler-abi from {})", path.display()),
        Some(Sdk::Copied) => " (with a copy of the handler-abi SDK)".to_owned(),
        None => String::new(),
    };
    println!(
        "Wrote the {} handler project {} in {}{sdk}.",
        args.lang,
        project.name,
        project.dir.display()
    );
    println!("Build it:");
    println!("    {}", project.build);
    println!("Then run it on test_input.json:");
    println!("    {}", project.run);
    Ok(())
}

/// Writes the project `args` asks for; returns what was written and how to build and run it.
pub fn write(args: &NewArgs) -> Result<Project, ScaffoldError> {
    check_empty(&args.dir)?;
    let name = package_name(&args.dir).ok_or_else(|| ScaffoldError::BadName {
        dir: args.dir.clone(),
    })?;
    let lib = name.replace('-', "_");
    let sdk = (args.lang == Language::Rust).then(|| {
        let checkout = Path::new(carried::SDK_CHECKOUT);
        match checkout.join("Cargo.toml").is_file() && !args.copy_sdk {
            true => Sdk::Checkout(checkout.canonicalize().unwrap_or_else(|_| checkout.into())),
            false => Sdk::Copied,
        }
    });
    let library = match args.lang {
        Language::Rust => format!("target/release/lib{lib}.so"),
        _ => format!("lib{lib}.so"),
    };
    let build_here = match args.lang {
        Language::Rust => "cargo build --release",
        _ => "./build.sh",
    };
    let dir = &args.dir;
    let quoted = shell_quote(&dir.display().to_string());
    let build = format!("cd {quoted} && {build_here}");
    let run =
        format!("cd {quoted} && worker-host --handler {library} --test_input @test_input.json");
    let fill = |template: &str| {
        template
            .replace("{{name}}", &name)
            .replace("{{lib}}", &lib)
            .replace("{{library}}", &library)
    };

    let mut files: Vec<(PathBuf, String, bool)> = Vec::new();
    let mut add = |path: &str, text: String| files.push((dir.join(path), text, false));
    add("test_input.json", templates::TEST_INPUT.to_owned());
    match args.lang {
        Language::Rust => {
            let sdk_path = match &sdk {
                Some(Sdk::Checkout(path)) => path.display().to_string(),
                _ => "handler-abi".to_owned(),
            };
            add(
                "Cargo.toml",
                fill(templates::RUST_CARGO).replace("{{sdk_path}}", &toml_escape(&sdk_path)),
            );
            add("src/lib.rs", fill(templates::RUST_LIB));
            add(".gitignore", "/target\n".to_owned());
            if sdk == Some(Sdk::Copied) {
                add(
                    "handler-abi/Cargo.toml",
                    templates::SDK_CARGO.replace("{{sdk_version}}", env!("CARGO_PKG_VERSION")),
                );
                add(
                    "handler-abi/include/worker_host.h",
                    carried::HEADER.to_owned(),
                );
                for (path, text) in carried::SDK_SOURCES {
                    add(&format!("handler-abi/src/{path}"), (*text).to_owned());
                }
            }
        }
        Language::C => {
            add("echo.c", fill(templates::C_ECHO));
            add("exports.map", templates::EXPORTS.to_owned());
            add("worker_host.h", carried::HEADER.to_owned());
            add("build.sh", fill(templates::C_BUILD));
        }
        Language::Cpp => {
            add("echo.cpp", fill(templates::CPP_ECHO));
            add("exports.map", templates::EXPORTS.to_owned());
            add("worker_host.h", carried::HEADER.to_owned());
            add("worker_host.hpp", carried::HPP.to_owned());
            add("build.sh", fill(templates::CPP_BUILD));
        }
        Language::Go => {
            add("go.mod", fill(templates::GO_MOD));
            add("echo.go", fill(templates::GO_ECHO));
            add("entry.c", fill(templates::GO_ENTRY));
            add("worker_host.h", carried::HEADER.to_owned());
            add("build.sh", fill(templates::GO_BUILD));
        }
        Language::Zig => {
            add("echo.zig", fill(templates::ZIG_ECHO));
            add("worker_host.h", carried::HEADER.to_owned());
            add("build.sh", fill(templates::ZIG_BUILD));
        }
    }
    if args.lang != Language::Rust {
        add(".gitignore", "*.so\n".to_owned());
    }
    let readme = fill(templates::README)
        .replace("{{language}}", &args.lang.to_string())
        .replace("{{build}}", build_here)
        .replace(
            "{{run}}",
            &format!("worker-host --handler {library} --test_input @test_input.json"),
        )
        .replace("{{notes}}", notes(args.lang));
    add("README.md", readme);
    for (path, _, executable) in &mut files {
        *executable = path.file_name().is_some_and(|name| name == "build.sh");
    }
    for (path, text, executable) in &files {
        write_file(path, text, *executable)?;
    }
    Ok(Project {
        dir: dir.clone(),
        name,
        build,
        run,
        sdk,
    })
}

/// What the README says about each language beyond the build.
fn notes(language: Language) -> &'static str {
    match language {
        Language::Rust => {
            "Implement `Handler` in `src/lib.rs`: `Input` and `Output` are any serde types, an \
             `Err(HandlerError::new(\"ValueError\", \"why\"))` or a panic fails only that job. \
             Keep `crate-type = [\"cdylib\"]` and cargo's default `panic = \"unwind\"`."
        }
        Language::C => {
            "`worker_host.h` is the whole contract: every callback's threads, lifetimes and \
             return states are documented there. The host copies whatever a callback is given."
        }
        Language::Cpp => {
            "`worker_host.hpp` is a header-only C++17 layer over `worker_host.h`: the class's \
             constructor is `init`, `handle` runs each job, and an exception thrown in either \
             fails that call with its `what()`, instead of aborting the worker."
        }
        Language::Go => {
            "The Go runtime starts when the library is loaded and is never unloaded: one Go \
             handler per process (worker-host's runner process gives each handler its own). \
             `entry.c` holds the descriptor and calls the host's callbacks, which Go cannot \
             call itself; a Go pointer given to a callback is copied before it returns."
        }
        Language::Zig => {
            "`build.sh` translates `worker_host.h` into `worker_host.zig` with `zig translate-c` \
             (what `@cImport` did), links libc (`-lc`) and exports `wh_handler_entry` with \
             `export fn`. Set `ZIG` to choose the compiler (`ZIG=\"python3 -m ziglang\"` for \
             PyPI's ziglang)."
        }
    }
}

/// Refuses a path that exists and is not an empty directory.
fn check_empty(dir: &Path) -> Result<(), ScaffoldError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(ScaffoldError::NotEmpty { dir: dir.into() }),
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if dir.exists() && !dir.is_dir() => {
            Err(ScaffoldError::NotADirectory { path: dir.into() })
        }
        Err(source) => Err(ScaffoldError::Write {
            path: dir.into(),
            source,
        }),
    }
}

/// The directory's name as a package name: lowercase letters, digits, `-` and `_`, starting with
/// a letter (other characters become `-`).
fn package_name(dir: &Path) -> Option<String> {
    let base = dir.file_name()?.to_str()?;
    let name: String = base
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    name.starts_with(|c: char| c.is_ascii_lowercase())
        .then_some(name)
}

/// Writes one file, creating its directory.
fn write_file(path: &Path, text: &str, executable: bool) -> Result<(), ScaffoldError> {
    let error = |source| ScaffoldError::Write {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(path, text).map_err(error)?;
    if executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(error)?;
    }
    Ok(())
}

/// A word the shell reads back as `text`.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    match plain {
        true => text.to_owned(),
        false => format!("'{}'", text.replace('\'', r"'\''")),
    }
}

/// `text` inside a TOML basic string.
fn toml_escape(text: &str) -> String {
    text.replace('\\', r"\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary carries every source file of the SDK, so a copied SDK builds.
    #[test]
    fn carried_sdk_sources_are_the_whole_sdk() {
        let src = Path::new(carried::SDK_CHECKOUT).join("src");
        let mut on_disk: Vec<String> = std::fs::read_dir(&src)
            .expect("handler-abi/src is readable")
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut carried: Vec<String> = carried::SDK_SOURCES
            .iter()
            .map(|(path, _)| (*path).to_owned())
            .collect();
        carried.sort();
        assert_eq!(
            carried, on_disk,
            "add the new files of handler-abi/src to SDK_SOURCES"
        );
    }

    /// The copied SDK's manifest names every dependency of the real one, with versions.
    #[test]
    fn copied_sdk_manifest_has_the_sdk_dependencies() {
        let real = std::fs::read_to_string(Path::new(carried::SDK_CHECKOUT).join("Cargo.toml"))
            .expect("handler-abi/Cargo.toml is readable");
        let dependencies = real
            .split("[dependencies]")
            .nth(1)
            .expect("the SDK has dependencies")
            .split("\n[")
            .next()
            .unwrap_or_default();
        for line in dependencies.lines().filter(|line| line.contains('=')) {
            let name = line
                .split('=')
                .next()
                .unwrap()
                .trim()
                .trim_end_matches(".workspace");
            assert!(
                templates::SDK_CARGO.contains(&format!("\n{name} = ")),
                "the copied SDK's Cargo.toml lacks {name}"
            );
        }
        assert!(!templates::SDK_CARGO.contains("workspace"));
    }

    /// Directory names become package names; ones that cannot are refused.
    #[test]
    fn package_names_follow_the_directory() {
        assert_eq!(
            package_name(Path::new("/x/My Handler")).as_deref(),
            Some("my-handler")
        );
        assert_eq!(package_name(Path::new("echo_2")).as_deref(), Some("echo_2"));
        assert_eq!(package_name(Path::new("/x/2fast")), None);
    }

    /// Paths with spaces or quotes are quoted for the shell.
    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/tmp/a-b"), "/tmp/a-b");
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
