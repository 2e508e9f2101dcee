//! The embed sample handler, a real model (sample-handlers/embed), which `cargo build` leaves out
//! because candle takes minutes to compile: the tests that need it build it here, with the
//! `cargo` running them, and find its weights where `sample-handlers/embed/fetch-model.sh` puts
//! them.

use crate::{missing_prerequisite, remove_cargo_test_env};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The embed handler's package.
const PACKAGE: &str = "embed-handler";

/// What the model directory must hold.
const MODEL_FILES: &[&str] = &["model.safetensors", "config.json", "tokenizer.json"];

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// Builds (once per test process) and locates the embed handler's shared library.
pub fn library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(build)
}

fn build() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    remove_cargo_test_env(&mut command);
    let output = command
        .current_dir(workspace())
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "-p",
            PACKAGE,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo could not be started");
    assert!(output.status.success(), "building {PACKAGE} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact"
                && message["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains(&format!("#{PACKAGE}@")))
        })
        .flat_map(|message| {
            message["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(PathBuf::from)
                .collect::<Vec<_>>()
        })
        .find(|path| path.extension().is_some_and(|ext| ext == "so"))
        .unwrap_or_else(|| panic!("the build produced no library for {PACKAGE}"))
}

/// The directory `fetch-model.sh` unpacks all-MiniLM-L6-v2 into.
pub fn default_model_dir() -> PathBuf {
    workspace().join("target/models/all-MiniLM-L6-v2")
}

/// The model directory, when it holds the model. When it does not, the test fails with what
/// to run (see [`missing_prerequisite`]), unless skipping was asked for: then it returns `None`
/// and the caller skips.
pub fn model_dir(what: &str) -> Option<PathBuf> {
    let dir = default_model_dir();
    let missing: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|file| !dir.join(file).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    missing_prerequisite(
        what,
        &format!("{} lacks {}", dir.display(), missing.join(", ")),
        "sample-handlers/embed/fetch-model.sh",
    );
    None
}

/// The `--handler-config` that points the handler at `dir`.
pub fn config(dir: &Path) -> String {
    serde_json::json!({ "model_dir": dir }).to_string()
}
