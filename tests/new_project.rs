//! `worker-host new`, end to end: for each language, a project written into a temporary directory
//! outside this workspace, built with the command `new` printed, then run with the one-shot
//! command it printed, which must answer the project's `test_input.json`.
//!
//! Rust projects are built offline (`CARGO_NET_OFFLINE`) with the cargo running these tests, so
//! the registry cache must hold serde, serde_json and thiserror (building this workspace puts them
//! there). The Go and Zig projects need their toolchains (see `e2e::foreign`).

use e2e::{artifacts, foreign, remove_cargo_test_env, worker_host, Run, Sample};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What each project answers to its `test_input.json`.
fn expected() -> Value {
    json!({"output": {"text": "hello from worker-host new"}})
}

/// The two commands `worker-host new` printed: how to build and how to run the project.
struct Printed {
    build: String,
    run: String,
}

/// Runs `worker-host new DIR --lang LANG` plus `extra`; returns the commands it printed.
fn new_project(dir: &Path, lang: &str, extra: &[&str]) -> Printed {
    let run = Run::of(
        worker_host()
            .arg("new")
            .arg(dir)
            .args(["--lang", lang])
            .args(extra),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let mut commands = run
        .stdout
        .lines()
        .filter_map(|line| line.strip_prefix("    "));
    let build = commands.next().expect("a build command").to_owned();
    let run_command = commands.next().expect("a run command").to_owned();
    Printed {
        build,
        run: run_command,
    }
}

/// PATH with the directories of `programs` first.
fn path_with(programs: &[&Path]) -> OsString {
    let mut dirs: Vec<PathBuf> = programs
        .iter()
        .filter_map(|program| program.parent().map(Path::to_path_buf))
        .collect();
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).expect("PATH entries hold no separator")
}

/// A `sh -c COMMAND` with the tests' environment, less cargo's per-test variables.
fn shell(command: &str) -> Command {
    let mut shell = Command::new("sh");
    shell.args(["-c", command]).stdin(Stdio::null());
    remove_cargo_test_env(&mut shell);
    shell
}

/// Runs the printed build command; panics with its output when it fails.
fn build(printed: &Printed, env: &[(&str, OsString)]) {
    let mut command = shell(&printed.build);
    command.envs(env.iter().map(|(name, value)| (name, value)));
    let output = command.output().expect("sh could not be started");
    assert!(
        output.status.success(),
        "`{}` failed:\n{}{}",
        printed.build,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the printed one-shot command, with this build's `worker-host` first on PATH, and checks
/// it exits 0 with the expected result.
fn run_printed(printed: &Printed) {
    let mut command = shell(&printed.run);
    command.env("PATH", path_with(&[&artifacts().worker_host]));
    // No RUNPOD_* variable of the machine may turn the one-shot run into a queue worker.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RUNPOD_") {
            command.env_remove(name);
        }
    }
    let run = Run::of(&mut command);
    assert_eq!(
        run.code,
        Some(0),
        "`{}`: stderr: {}",
        printed.run,
        run.stderr
    );
    assert_eq!(run.result(), expected(), "`{}`", printed.run);
}

/// The environment for a Rust project's build: this cargo first on PATH, offline, and the
/// project's own target directory (whatever CARGO_TARGET_DIR the tests run with).
fn cargo_env(project: &Path) -> Vec<(&'static str, OsString)> {
    let cargo = PathBuf::from(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    vec![
        ("PATH", path_with(&[&cargo])),
        ("CARGO_NET_OFFLINE", "true".into()),
        ("CARGO_TARGET_DIR", project.join("target").into()),
    ]
}

/// Writes, builds and runs a project of a language that needs no more than a C or C++ compiler,
/// Go or Zig.
fn native_project(lang: &str, name: &str) {
    let root = tempfile::tempdir().expect("a temporary directory");
    let printed = new_project(&root.path().join(name), lang, &[]);
    build(&printed, &[]);
    run_printed(&printed);
}

/// A Rust project depending on this checkout's SDK by path, and one with the SDK's sources copied
/// in (`--copy-sdk`, what a binary without its checkout writes), each build offline outside the
/// workspace and answer their test input.
#[test]
fn rust_projects_build_offline_and_run() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let by_path = root.path().join("by-path");
    let printed = new_project(&by_path, "rust", &[]);
    let manifest = std::fs::read_to_string(by_path.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("handler-abi = { path = \"/"),
        "{manifest}"
    );
    assert!(manifest.contains("\n[workspace]\n"), "{manifest}");
    build(&printed, &cargo_env(&by_path));
    run_printed(&printed);

    let copied = root.path().join("copied-sdk");
    let printed = new_project(&copied, "rust", &["--copy-sdk"]);
    let manifest = std::fs::read_to_string(copied.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("handler-abi = { path = \"handler-abi\" }"),
        "{manifest}"
    );
    // The second build shares the first one's target directory (through a link, so the printed
    // `target/release/...` path holds): only the SDK and the handler compile again.
    std::os::unix::fs::symlink(by_path.join("target"), copied.join("target")).unwrap();
    build(&printed, &cargo_env(&copied));
    run_printed(&printed);
}

/// A C project builds with its build.sh and answers its test input.
#[test]
fn c_project_builds_and_runs() {
    native_project("c", "c-handler");
}

/// A C++ project (on worker_host.hpp) builds with its build.sh and answers its test input.
#[test]
fn cpp_project_builds_and_runs() {
    native_project("cpp", "cpp-handler");
}

/// A Go project builds with `go build -buildmode=c-shared` and answers its test input.
#[test]
fn go_project_builds_and_runs() {
    if foreign::available(Sample::GoEcho, "the Go `worker-host new` test") {
        native_project("go", "go-handler");
    }
}

/// A Zig project builds with `zig translate-c` and `zig build-lib` and answers its test input.
#[test]
fn zig_project_builds_and_runs() {
    if foreign::available(Sample::ZigEcho, "the Zig `worker-host new` test") {
        native_project("zig", "zig-handler");
    }
}

/// `worker-host new` refuses a non-empty directory with a sentence saying so, exits 2, and
/// writes nothing.
#[test]
fn refuses_a_non_empty_directory() {
    let root = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(root.path().join("keep.txt"), "mine").unwrap();
    let run = Run::of(worker_host().arg("new").arg(root.path()));
    assert_eq!(run.code, Some(2), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("is not empty") && run.stderr.contains("nothing was written"),
        "{}",
        run.stderr
    );
    let entries: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "only keep.txt");
}
