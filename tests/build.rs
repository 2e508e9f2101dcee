//! Compiles the deliberately broken handler libraries of `fixtures/bad_handlers.c` with the
//! system C compiler, one shared library per fixture, into OUT_DIR. The tests find them through
//! the `FIXTURE_DIR` variable set here.

use std::path::{Path, PathBuf};

const FIXTURES: &[&str] = &[
    "NO_ENTRY",
    "ABI_2",
    "TOO_SMALL",
    "NULL_HANDLE",
    "FUTURE_MINOR",
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let source = manifest_dir.join("fixtures/bad_handlers.c");
    let include_dir = manifest_dir.join("../handler-abi/include");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("worker_host.h").display()
    );
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    for fixture in FIXTURES {
        let library = out_dir.join(format!("lib{}.so", fixture.to_ascii_lowercase()));
        compile(&compiler, &source, &include_dir, fixture, &library);
    }
    println!("cargo:rustc-env=FIXTURE_DIR={}", out_dir.display());
}

fn compile(compiler: &cc::Tool, source: &Path, include_dir: &Path, fixture: &str, library: &Path) {
    let status = compiler
        .to_command()
        .args([
            "-std=c11",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            "-Wno-unused-function",
        ])
        .arg(format!("-DFIXTURE_{fixture}"))
        .arg("-I")
        .arg(include_dir)
        .arg("-o")
        .arg(library)
        .arg(source)
        .status()
        .expect("the C compiler could not be started");
    assert!(status.success(), "compiling fixture {fixture} failed");
}
