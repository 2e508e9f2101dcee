//! Compiles the handler libraries of `fixtures/*.c` with the system C compiler, one shared library
//! per fixture, into OUT_DIR: the deliberately broken ones of `bad_handlers.c` (loading must fail)
//! and the careless ones of `careless_handlers.c` (the host must survive them). The tests find
//! them through the `FIXTURE_DIR` variable set here.

use std::path::{Path, PathBuf};

/// Each fixture source, with the FIXTURE_* macros it is compiled with (one library per macro).
const FIXTURES: &[(&str, &[&str])] = &[
    (
        "fixtures/bad_handlers.c",
        &[
            "NO_ENTRY",
            "ABI_2",
            "TOO_SMALL",
            "NULL_HANDLE",
            "FUTURE_MINOR",
        ],
    ),
    (
        "fixtures/careless_handlers.c",
        &[
            "LATE_CALLBACKS",
            "NEWER_MINOR",
            "DEEP_STACK",
            "ODD_ARGUMENTS",
            "STREAMING_SET_OUTPUT",
        ],
    ),
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let include_dir = manifest_dir.join("../handler-abi/include");
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("worker_host.h").display()
    );
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    for (source, fixtures) in FIXTURES {
        let source = manifest_dir.join(source);
        println!("cargo:rerun-if-changed={}", source.display());
        for fixture in *fixtures {
            let library = out_dir.join(format!("lib{}.so", fixture.to_ascii_lowercase()));
            compile(&compiler, &source, &include_dir, fixture, &library);
        }
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
            "-pthread",
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
