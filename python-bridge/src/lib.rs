//! worker-host's Python bridge: a handler library that embeds Python and runs a RunPod
//! `handler.py` as it is.
//!
//! `init` starts the interpreter (`interpreter.rs`), runs the script named by the handler config
//! (`{"script": "handler.py"}`, relative to the working directory) or by
//! `WORKER_HOST_PYTHON_SCRIPT`, with `runpod.serverless.start` captured, and reports what the
//! script's config says (streaming for a generator handler, the concurrency of an async one) as
//! ABI 1.1 post-init features. Each job then runs in Python (`job.rs`); the Python half lives in
//! `bridge.py`.

mod interpreter;
mod job;

use handler_abi::{export_handler, Handler, HandlerError, Job, RawJson};
use pyo3::prelude::*;
use pyo3::types::PyModule;
use serde::Deserialize;
use std::path::Path;

/// The variable that names the script when the handler config does not.
pub const SCRIPT_VARIABLE: &str = "WORKER_HOST_PYTHON_SCRIPT";

/// The handler config.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// The script to run, relative to the working directory.
    script: Option<String>,
}

/// The loaded script: the bridge module and what the script's `start` config said.
pub struct PythonBridge {
    bridge: Py<PyModule>,
    streaming: bool,
    concurrency: u32,
    refresh_worker: bool,
}

impl Handler for PythonBridge {
    type Config = Option<BridgeConfig>;
    type Input = RawJson;
    type Output = RawJson;
    // The real values are known only once the script ran (see `streaming`, `max_concurrency`).
    const MAX_CONCURRENCY: u32 = 1;

    fn init(config: Option<BridgeConfig>) -> Result<Self, HandlerError> {
        let script = script_path(config, std::env::var(SCRIPT_VARIABLE).ok())?;
        let bridge = interpreter::start()
            .map_err(|error| HandlerError::new("BridgeError", error.to_string()))?;
        Python::attach(|py| {
            let loaded = bridge
                .bind(py)
                .call_method1("load", (script.as_str(),))
                .map_err(|error| job::python_error("loading the script", &error))?;
            let status: String = loaded.get_item(0)?.extract()?;
            if status != "ok" {
                let (_, error_type, message, traceback): (String, String, String, String) =
                    loaded.extract()?;
                let error = HandlerError::new(error_type, message);
                return Err(if traceback.is_empty() {
                    error
                } else {
                    error.with_traceback(traceback)
                });
            }
            let (_, kind, concurrency, _aggregate, refresh_worker): (
                String,
                String,
                u32,
                bool,
                bool,
            ) = loaded.extract()?;
            Ok(PythonBridge {
                bridge: bridge.clone_ref(py),
                streaming: kind.ends_with("generator"),
                concurrency,
                refresh_worker,
            })
        })
    }

    fn handle(&self, _input: RawJson, job: &Job<'_>) -> Result<RawJson, HandlerError> {
        let result = job::run(&self.bridge, job);
        if self.refresh_worker {
            job.request_recycle();
        }
        result
    }

    fn max_concurrency(&self) -> u32 {
        self.concurrency
    }

    fn streaming(&self) -> bool {
        self.streaming
    }
}

/// The script to run: the config's, else the variable's (`env`), which must be an existing file.
fn script_path(config: Option<BridgeConfig>, env: Option<String>) -> Result<String, HandlerError> {
    let script = config
        .and_then(|config| config.script)
        .or_else(|| env.filter(|value| !value.is_empty()))
        .ok_or_else(|| {
            HandlerError::new(
                "NoScript",
                format!(
                    "no Python script to run: give --handler-config '{{\"script\": \"handler.py\"}}' or set {SCRIPT_VARIABLE}"
                ),
            )
        })?;
    if !Path::new(&script).is_file() {
        let cwd = std::env::current_dir().unwrap_or_default();
        return Err(HandlerError::new(
            "ScriptNotFound",
            format!(
                "the Python script {script} does not exist (relative paths start at {})",
                cwd.display()
            ),
        ));
    }
    Ok(script)
}

export_handler!(PythonBridge);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Option<BridgeConfig> {
        serde_json::from_str(json).expect("the config parses")
    }

    /// The config's script wins over the variable, which stands in when the config has none.
    #[test]
    fn the_config_names_the_script_before_the_variable() {
        let this = file!().to_owned();
        let here = format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"));
        let given = config(&serde_json::json!({ "script": here }).to_string());
        assert_eq!(script_path(given, Some(this.clone())).unwrap(), here);
        assert_eq!(script_path(config("{}"), Some(here.clone())).unwrap(), here);
        assert_eq!(script_path(None, Some(here.clone())).unwrap(), here);
    }

    /// No script at all, or one that does not exist, fails `init` saying what to do.
    #[test]
    fn a_missing_script_says_how_to_name_one() {
        let error = script_path(config("{}"), Some(String::new())).unwrap_err();
        assert_eq!(error.error_type(), "NoScript");
        assert!(error.message().contains(SCRIPT_VARIABLE), "{error}");
        let error = script_path(None, Some("no/such/handler.py".to_owned())).unwrap_err();
        assert_eq!(error.error_type(), "ScriptNotFound");
    }

    /// A misspelt config key is refused rather than ignored.
    #[test]
    fn unknown_config_keys_are_refused() {
        assert!(serde_json::from_str::<Option<BridgeConfig>>(r#"{"scrpit": "a.py"}"#).is_err());
    }
}
