//! What the bench binaries share: finding the release artefacts they measure, describing the
//! machine and the binary in the table header, and checking for the official Python SDK.

use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};

/// Where `name` should be: next to this executable (`target/release`).
pub fn artefact(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe.parent().ok_or("this executable has no directory")?;
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p worker-host -p echo-handler`",
            path.display()
        ))
    }
}

/// Whether `python3 -c "import runpod"` works; the reason when not.
pub fn python_runpod() -> Result<String, String> {
    let output = Command::new("python3")
        .args(["-c", "import runpod; print(runpod.__version__)"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("python3 cannot be started: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err("`python3 -c \"import runpod\"` failed (pip install runpod==1.12.0)".into())
    }
}

/// The binary's path, `--version` and build time, so a stale build is noticed.
pub fn describe_binary(binary: &FsPath) -> String {
    let version = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    let age = std::fs::metadata(binary)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .map(|age| format!(", built {} min ago", age.as_secs() / 60))
        .unwrap_or_default();
    format!("{} ({version}{age})", binary.display())
}

/// The machine's CPU model, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
