//! The sample handlers that cargo does not build: Go's (`go build -buildmode=c-shared`) and Zig's
//! (`zig build-lib -dynamic`). A cargo build must not need either toolchain, so the tests build
//! them here, once per test process, into `target/<profile>/foreign-handlers/`, and a test that
//! needs one first asks [`available`] whether its toolchain is installed.

use crate::{artifacts, missing_prerequisite, Sample};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The repository's root (the parent of `tests/`).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// How to run a toolchain: the program and the arguments before its subcommand.
#[derive(Debug, Clone)]
pub struct Toolchain {
    program: PathBuf,
    prefix: Vec<String>,
}

impl Toolchain {
    /// A command running this toolchain's `subcommand`.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.prefix).arg(subcommand);
        command
    }
}

/// Whether `program prefix.. version` runs and succeeds.
fn probe(program: &str, prefix: &[&str]) -> Option<Toolchain> {
    let status = Command::new(program)
        .args(prefix)
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then(|| Toolchain {
        program: program.into(),
        prefix: prefix.iter().map(|word| (*word).to_owned()).collect(),
    })
}

/// The Go toolchain, if `go` is on PATH.
pub fn go() -> Option<&'static Toolchain> {
    static GO: OnceLock<Option<Toolchain>> = OnceLock::new();
    GO.get_or_init(|| probe("go", &[])).as_ref()
}

/// The Zig toolchain: `zig` on PATH, or PyPI's `ziglang` (`python3 -m ziglang`, as `.ci/run`
/// installs it into the virtual environment).
pub fn zig() -> Option<&'static Toolchain> {
    static ZIG: OnceLock<Option<Toolchain>> = OnceLock::new();
    ZIG.get_or_init(|| probe("zig", &[]).or_else(|| probe("python3", &["-m", "ziglang"])))
        .as_ref()
}

/// Whether the toolchain `sample` is built with is installed. When it is not, the test fails with
/// what to install, unless skips are allowed outside CI (see [`missing_prerequisite`]): then it
/// prints why `what` is skipped and returns false, and the caller skips.
pub fn available(sample: Sample, what: &str) -> bool {
    let (found, problem, fix) = match sample {
        Sample::GoEcho => (
            go().is_some(),
            "`go` is not on PATH",
            "`apt-get install golang-go`",
        ),
        Sample::ZigEcho => (
            zig().is_some(),
            "neither `zig` nor `python3 -m ziglang` runs",
            "`.venv/bin/pip install ziglang` with .venv/bin on PATH",
        ),
        _ => return true,
    };
    if !found {
        missing_prerequisite(what, problem, fix);
    }
    found
}

/// The shared library of the Go or Zig sample, built on first use. Panics if its toolchain is
/// missing (ask [`available`] first) or the build fails.
pub fn library(sample: Sample) -> &'static Path {
    static GO_ECHO: OnceLock<PathBuf> = OnceLock::new();
    static ZIG_ECHO: OnceLock<PathBuf> = OnceLock::new();
    match sample {
        Sample::GoEcho => GO_ECHO.get_or_init(build_go_echo),
        Sample::ZigEcho => ZIG_ECHO.get_or_init(build_zig_echo),
        other => panic!("{other:?} is built by cargo, not here"),
    }
}

/// `target/<profile>/foreign-handlers/<name>/`, created if missing.
fn build_dir(name: &str) -> PathBuf {
    let profile_dir = artifacts()
        .worker_host
        .parent()
        .expect("the binary lies in the profile directory");
    let dir = profile_dir.join("foreign-handlers").join(name);
    std::fs::create_dir_all(&dir).expect("the target directory is writable");
    dir
}

/// Runs a build command; panics with its output when it fails.
fn run_build(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{what} could not be started: {error}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The library is built under a name of this process's own, then renamed into place, so test
/// processes building at the same time never load a half-written file.
fn publish(built: &Path, library: &Path) {
    std::fs::rename(built, library).expect("the built library can be renamed into place");
}

fn build_go_echo() -> PathBuf {
    let go = go().expect("Go is installed (ask foreign::available first)");
    let dir = build_dir("go-echo");
    let library = dir.join("libgo_echo_handler.so");
    let built = dir.join(format!("libgo_echo_handler.{}.so", std::process::id()));
    run_build(
        go.command("build")
            .current_dir(workspace().join("sample-handlers/go-echo"))
            .args(["-buildmode=c-shared", "-o"])
            .arg(&built)
            .arg("."),
        "go build of sample-handlers/go-echo",
    );
    // go build also writes the cgo export header beside the library; the tests do not need it.
    let _ = std::fs::remove_file(built.with_extension("h"));
    publish(&built, &library);
    library
}

fn build_zig_echo() -> PathBuf {
    let zig = zig().expect("Zig is installed (ask foreign::available first)");
    let dir = build_dir("zig-echo");
    // The source and the translated header sit side by side in a directory of this process's own.
    let sources = dir.join(format!("src.{}", std::process::id()));
    std::fs::create_dir_all(&sources).expect("the target directory is writable");
    std::fs::copy(
        workspace().join("sample-handlers/zig-echo/echo.zig"),
        sources.join("echo.zig"),
    )
    .expect("the Zig source can be copied");
    let include_dir = workspace().join("handler-abi/include");
    let translated = zig
        .command("translate-c")
        .args(["-lc", "-I"])
        .arg(&include_dir)
        .arg(include_dir.join("worker_host.h"))
        .stdin(Stdio::null())
        .output()
        .expect("zig translate-c could not be started");
    assert!(
        translated.status.success(),
        "zig translate-c of worker_host.h failed:\n{}",
        String::from_utf8_lossy(&translated.stderr)
    );
    std::fs::write(sources.join("worker_host.zig"), &translated.stdout)
        .expect("the translated header can be written");
    let library = dir.join("libzig_echo_handler.so");
    let built = dir.join(format!("libzig_echo_handler.{}.so", std::process::id()));
    run_build(
        zig.command("build-lib")
            .current_dir(&sources)
            .args(["-dynamic", "-O", "ReleaseSafe", "-lc", "--cache-dir"])
            .arg(dir.join("zig-cache"))
            .arg("echo.zig")
            .arg(format!("-femit-bin={}", built.display())),
        "zig build-lib of sample-handlers/zig-echo",
    );
    let _ = std::fs::remove_dir_all(&sources);
    publish(&built, &library);
    library
}
