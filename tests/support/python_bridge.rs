//! The Python bridge (`python-bridge/`) for the tests: built once per test process with the
//! `cargo` running the tests (it is not a default member: it needs a Python to build), and its
//! fixture scripts under `tests/python/bridge/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The bridge's package name.
const PACKAGE: &str = "python-bridge";

/// The bridge's shared library, built on first use.
pub fn library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(build)
}

/// A fixture script's absolute path.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python/bridge")
        .join(name)
}

/// The `--handler-config` arguments that run `script` on the bridge.
pub fn args(script: &Path) -> Vec<String> {
    vec![
        "--handler-config".to_owned(),
        serde_json::json!({ "script": script }).to_string(),
    ]
}

fn build() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    let mut command = Command::new(cargo);
    crate::remove_cargo_test_env(&mut command);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "-p",
            PACKAGE,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let output = command.output().expect("cargo could not be started");
    assert!(
        output.status.success(),
        "building the Python bridge failed (it needs python3 with a shared libpython on PATH)"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| {
            message["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("/python-bridge#"))
        })
        .flat_map(|message| message["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|name| name.as_str().map(PathBuf::from))
        .find(|name| name.extension().is_some_and(|ext| ext == "so"))
        .expect("the build produced no libpython_bridge.so")
}
