//! Loading a handler library, end to end: every way loading can fail ends the host with one
//! actionable sentence and its documented exit code, and `inspect` prints the descriptor.

use e2e::{artifacts, fixture, worker_host, Run, Sample};
use serde_json::{json, Value};
use std::path::Path;

/// Runs a one-shot job on the handler at `path`.
fn run_on(path: &Path) -> Run {
    Run::of(
        worker_host()
            .arg("--handler")
            .arg(path)
            .args(["--test_input", r#"{"input": {"k": 1}}"#]),
    )
}

/// Asserts one line on stderr, containing every fragment, and the exit code.
fn assert_refused(run: &Run, code: i32, fragments: &[&str]) {
    assert_eq!(run.code, Some(code), "stderr: {}", run.stderr);
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "one sentence: {}",
        run.stderr
    );
    for fragment in fragments {
        assert!(
            run.stderr.contains(fragment),
            "missing {fragment:?} in: {}",
            run.stderr
        );
    }
    assert!(run.stdout.is_empty(), "no result printed: {}", run.stdout);
}

/// A path that does not exist: exit 3, naming the path and the flag to fix.
#[test]
fn missing_file() {
    let run = run_on(Path::new("/no/such/handler.so"));
    assert_refused(
        &run,
        3,
        &["/no/such/handler.so", "does not exist", "--handler"],
    );
}

/// A directory where the library should be: exit 3, saying so (it exists, so "does not exist"
/// would mislead).
#[test]
fn a_directory_instead_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_on(dir.path());
    assert_refused(&run, 3, &["is a directory", "the .so file inside it"]);
}

/// The fix for a Rust crate built without `cdylib`, as the messages spell it.
const CDYLIB_FIX: &str = r#"add `crate-type = ["cdylib"]` to [lib] in Cargo.toml"#;

/// A missing `.so` whose crate was built as an `.rlib` only (no `cdylib`): exit 3, naming the
/// `.rlib` and the line to add to Cargo.toml.
#[test]
fn a_missing_library_beside_its_rlib_says_add_cdylib() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libmy_handler.rlib"), "!<arch>\n").unwrap();
    let run = run_on(&dir.path().join("libmy_handler.so"));
    assert_refused(
        &run,
        3,
        &[
            "libmy_handler.so does not exist",
            "libmy_handler.rlib",
            CDYLIB_FIX,
        ],
    );
    // Also under the hyphenated name the user may have typed.
    let run = run_on(&dir.path().join("libmy-handler.so"));
    assert_refused(&run, 3, &["libmy_handler.rlib", CDYLIB_FIX]);
}

/// A hyphen where cargo writes an underscore (or a name without `lib`): exit 3, naming the file
/// that does exist.
#[test]
fn a_hyphenated_name_names_the_library_cargo_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("libmy_handler.so");
    std::fs::copy(artifacts().library(Sample::Echo), &built).unwrap();
    for typed in ["libmy-handler.so", "my-handler.so", "my_handler.so"] {
        let run = run_on(&dir.path().join(typed));
        assert_refused(
            &run,
            3,
            &[
                &format!("{typed} does not exist, but {} does", built.display()),
                "underscores",
            ],
        );
    }
}

/// A crate's directory (it has a Cargo.toml): exit 3, naming the library cargo builds from it,
/// and the `cdylib` line when the manifest lacks it.
#[test]
fn a_crate_directory_names_the_library_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "[package]\nname = \"my-handler\"\nversion = \"0.1.0\"\n";
    std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
    let run = run_on(dir.path());
    assert_refused(
        &run,
        3,
        &[
            "a Rust crate's directory",
            "libmy_handler.so",
            "target/release",
            CDYLIB_FIX,
        ],
    );
    let with_cdylib = format!("{manifest}\n[lib]\ncrate-type = [\"cdylib\"]\n");
    std::fs::write(dir.path().join("Cargo.toml"), with_cdylib).unwrap();
    let run = run_on(dir.path());
    assert_refused(&run, 3, &["a Rust crate's directory", "libmy_handler.so"]);
    assert!(!run.stderr.contains("crate-type"), "{}", run.stderr);
}

/// An `.rlib` passed directly: exit 4 (not a loadable library), saying what to add and where the
/// `.so` will be.
#[test]
fn an_rlib_says_add_cdylib() {
    let dir = tempfile::tempdir().unwrap();
    let rlib = dir.path().join("libmy_handler.rlib");
    std::fs::write(&rlib, "!<arch>\n").unwrap();
    let run = run_on(&rlib);
    assert_refused(
        &run,
        4,
        &[
            "libmy_handler.rlib is a Rust library (.rlib)",
            CDYLIB_FIX,
            "beside it",
        ],
    );
}

/// A file that is not a shared library: exit 4, with the loader's reason.
#[test]
fn not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handler.so");
    std::fs::write(&path, "this is not an ELF file").unwrap();
    let run = run_on(&path);
    assert_refused(
        &run,
        4,
        &["could not be loaded as a shared library", "handler.so"],
    );
}

/// A truncated library (a copy cut short, as an interrupted download or build leaves it), which
/// once crashed the dynamic loader with SIGBUS: exit 4, "not a shared library", one sentence.
#[test]
fn a_truncated_library() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(artifacts().library(Sample::Echo)).unwrap();
    for keep in [100, 4096, 200_000] {
        let path = dir.path().join(format!("cut-{keep}.so"));
        std::fs::write(&path, &whole[..keep]).unwrap();
        let run = run_on(&path);
        assert_refused(
            &run,
            4,
            &[
                "could not be loaded as a shared library",
                &format!("cut-{keep}.so"),
            ],
        );
    }
}

/// A library whose dependency is missing names the dependency; one with an undefined symbol
/// names the symbol (exit 4 both).
#[test]
fn a_missing_dependency_or_symbol_is_named() {
    let run = run_on(&fixture("missing_dependency"));
    assert_refused(
        &run,
        4,
        &["libgone_dependency.so", "cannot open shared object"],
    );
    let run = run_on(&fixture("undefined_symbol"));
    assert_refused(
        &run,
        4,
        &["undefined symbol", "wh_fixture_symbol_nobody_defines"],
    );
}

/// A handler whose dependency is shipped with it, found through `-rpath '$ORIGIN'` (beside it)
/// or `'$ORIGIN/lib'`, still loads although the host loads a private copy of it from elsewhere:
/// in a runner (whose library path ends with the run path expanded against the original's
/// directory), and in process when LD_LIBRARY_PATH names the directory (the README says so); in
/// process without it the missing library is named.
#[test]
fn a_dependency_shipped_with_the_handler_is_found_from_the_private_copy() {
    for dir in ["beside", "below"] {
        let handler =
            Path::new(env!("FIXTURE_DIR")).join(format!("{dir}/libshipped_dependency.so"));
        let run = run_on(&handler);
        assert_eq!(run.code, Some(0), "{dir}: stderr: {}", run.stderr);
        assert_eq!(run.result(), json!({"output": {"k": 1}}), "{dir}");
    }
    let handler = Path::new(env!("FIXTURE_DIR")).join("beside/libshipped_dependency.so");

    let in_process = || {
        let mut command = worker_host();
        command
            .arg("--handler")
            .arg(&handler)
            .args(["--isolation", "none"])
            .args(["--test_input", r#"{"input": {"k": 1}}"#]);
        command
    };
    let run = Run::of(&mut in_process());
    assert_refused(&run, 4, &["libgone_dependency.so"]);
    let run = Run::of(in_process().env("LD_LIBRARY_PATH", handler.parent().unwrap()));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
}

/// The runner's longer library path is for the loader only: the handler (and what it starts)
/// sees the operator's `LD_LIBRARY_PATH`, or none when the operator set none.
#[test]
fn the_handler_sees_the_operators_library_path() {
    let value_seen = |library_path: Option<&str>| {
        let mut command = worker_host();
        command
            .arg("--handler")
            .arg(artifacts().library(Sample::Faulty))
            .args([
                "--test_input",
                r#"{"input": {"mode": "env", "message": "LD_LIBRARY_PATH"}}"#,
            ]);
        command.env_remove("LD_LIBRARY_PATH");
        if let Some(value) = library_path {
            command.env("LD_LIBRARY_PATH", value);
        }
        let run = Run::of(&mut command);
        assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
        run.result()["output"]["value"].clone()
    };
    assert_eq!(
        value_seen(Some("/opt/operator/lib")),
        json!("/opt/operator/lib")
    );
    assert_eq!(value_seen(None), Value::Null);
}

/// A library without `wh_handler_entry`: exit 5, saying how to export it.
#[test]
fn missing_entry_symbol() {
    let run = run_on(&fixture("no_entry"));
    assert_refused(
        &run,
        5,
        &["does not export wh_handler_entry", "export_handler!"],
    );
}

/// A handler built for ABI 2: exit 6, naming the ABI each side speaks.
#[test]
fn abi_major_mismatch() {
    let run = run_on(&fixture("abi_2"));
    assert_refused(&run, 6, &["built for handler ABI 2", "speaks ABI 1"]);
}

/// A descriptor smaller than ABI 1.0's, or one without a handle function: exit 7.
#[test]
fn invalid_descriptors() {
    let run = run_on(&fixture("too_small"));
    assert_refused(&run, 7, &["descriptor of 8 bytes", "smaller than"]);
    let run = run_on(&fixture("null_handle"));
    assert_refused(
        &run,
        7,
        &["handle is NULL", "a handler must set init, handle"],
    );
}

/// A failing init: exit 8, with the handler's own message; no job runs.
#[test]
fn init_failure() {
    let run = Run::of(
        worker_host()
            .arg("--handler")
            .arg(artifacts().library(Sample::Faulty))
            .args(["--handler-config", r#"{"fail_init": "CUDA out of memory"}"#])
            .args(["--test_input", r#"{"input": 1}"#]),
    );
    assert_refused(&run, 8, &["init failed", "CUDA out of memory"]);
}

/// A handler built against a later 1.x header (larger descriptor, higher minor) loads and runs.
#[test]
fn later_minor_version_still_runs() {
    let run = run_on(&fixture("future_minor"));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.result(), json!({"output": {"k": 1}}));
}

/// No handler at all: exit 2, naming the flag and the variable.
#[test]
fn no_handler_given() {
    let run = Run::of(worker_host().args(["--test_input", r#"{"input": 1}"#]));
    assert_refused(&run, 2, &["--handler", "WORKER_HOST_HANDLER"]);
}

/// The handler path can come from WORKER_HOST_HANDLER, and the config from an @file.
#[test]
fn handler_from_environment_and_config_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"fail_init": "from the file"}"#).unwrap();
    let run = Run::of(
        worker_host()
            .env("WORKER_HOST_HANDLER", artifacts().library(Sample::Faulty))
            .arg("--handler-config")
            .arg(format!("@{}", config.display()))
            .args(["--test_input", r#"{"input": 1}"#]),
    );
    assert_refused(&run, 8, &["from the file"]);
}

/// `inspect` prints each sample's descriptor, as text and as JSON, without running init.
#[test]
fn inspect_prints_the_descriptor() {
    let run = Run::of(
        worker_host()
            .args(["inspect", "--json", "--handler"])
            .arg(artifacts().library(Sample::Stream)),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let info: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(info["name"], "stream-handler");
    assert_eq!(info["version"], "0.1.0");
    assert_eq!(
        (info["abi_major"].as_u64(), info["abi_minor"].as_u64()),
        (Some(1), Some(1)),
        "a handler built with this SDK declares ABI 1.1"
    );
    assert_eq!(info["max_concurrency"], 0);
    assert_eq!(info["streaming"], true);

    let run = Run::of(
        worker_host()
            .arg("inspect")
            .arg("--handler")
            .arg(artifacts().library(Sample::CEcho)),
    );
    assert_eq!(run.code, Some(0));
    assert!(
        run.stdout.contains("name:            c-echo-handler"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("features:        none"),
        "{}",
        run.stdout
    );

    // inspect does not run init, so a handler whose init would fail is still described.
    let run = Run::of(
        worker_host()
            .args([
                "inspect",
                "--handler-config",
                r#"{"fail_init": "x"}"#,
                "--handler",
            ])
            .arg(artifacts().library(Sample::Faulty)),
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
}
