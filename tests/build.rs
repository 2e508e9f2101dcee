//! Compiles the handler libraries of `fixtures/*.c` with the system C compiler, one shared library
//! per fixture, into OUT_DIR: the deliberately broken ones of `bad_handlers.c` (loading must fail),
//! the careless ones of `careless_handlers.c` (the host must survive them), the versions of
//! `versioned.c` (which the live-swap tests swap for one another), those of `abi_1_1.c` (which use
//! the callbacks ABI 1.1 appended), the handler of `abi_1_0.c` built against the frozen 1.0 header
//! in `fixtures/abi-1.0/`, the C++ handler of `cpp_throws.cpp`, whose exception escapes, and that
//! of `cpp_layer.cpp`, whose exceptions `worker_host.hpp` catches. The tests find them through the
//! `FIXTURE_DIR` variable set here.

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
            "UNDEFINED_SYMBOL",
            "GONE_DEPENDENCY",
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
            "TEARDOWN_TRACE",
        ],
    ),
    (
        "fixtures/versioned.c",
        &[
            "VERSIONED_V1",
            "VERSIONED_V2",
            "VERSIONED_V3",
            "VERSIONED_INIT_FAILS",
            "VERSIONED_SERIAL_STREAM",
        ],
    ),
    ("fixtures/abi_1_1.c", &["TRACEBACK", "LATE_FEATURES"]),
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
    // Linked against libgone_dependency.so, which then goes: its loading fails on the dependency.
    let gone = out_dir.join("libgone_dependency.so");
    compile_with(
        &compiler,
        &manifest_dir.join("fixtures/bad_handlers.c"),
        &include_dir,
        "MISSING_DEPENDENCY",
        &out_dir.join("libmissing_dependency.so"),
        &[
            format!("-L{}", out_dir.display()),
            "-lgone_dependency".to_owned(),
        ],
    );
    std::fs::remove_file(&gone).expect("the dependency was built");
    // The same handler with its dependency shipped with it, found through `$ORIGIN` (beside
    // it) and `$ORIGIN/lib` (below it): loading from the host's private copy must still find it.
    for (dir, lib_dir, run_path) in [("beside", "", "$ORIGIN"), ("below", "lib", "$ORIGIN/lib")] {
        let handler_dir = out_dir.join(dir);
        let lib_dir = handler_dir.join(lib_dir);
        std::fs::create_dir_all(&lib_dir).expect("OUT_DIR is writable");
        compile(
            &compiler,
            &manifest_dir.join("fixtures/bad_handlers.c"),
            &include_dir,
            "GONE_DEPENDENCY",
            &lib_dir.join("libgone_dependency.so"),
        );
        compile_with(
            &compiler,
            &manifest_dir.join("fixtures/bad_handlers.c"),
            &include_dir,
            "MISSING_DEPENDENCY",
            &handler_dir.join("libshipped_dependency.so"),
            &[
                format!("-L{}", lib_dir.display()),
                "-lgone_dependency".to_owned(),
                format!("-Wl,-rpath,{run_path}"),
            ],
        );
    }
    // Built against the frozen copy of the 1.0 header, not today's: a 1.0 handler as it was
    // built then, which every later host must run.
    let frozen = manifest_dir.join("fixtures/abi-1.0");
    let old = manifest_dir.join("fixtures/abi_1_0.c");
    println!("cargo:rerun-if-changed={}", old.display());
    println!(
        "cargo:rerun-if-changed={}",
        frozen.join("worker_host.h").display()
    );
    compile(
        &compiler,
        &old,
        &frozen,
        "ABI_1_0",
        &out_dir.join("libabi_1_0.so"),
    );
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("worker_host.hpp").display()
    );
    let cpp_compiler = cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .get_compiler();
    // cpp_layer.cpp is written on worker_host.hpp, which must compile warning-free as C++17.
    for (name, extra_warnings) in [
        ("cpp_throws", &[][..]),
        ("cpp_layer", &["-Wextra", "-pedantic"]),
    ] {
        let cpp = manifest_dir.join(format!("fixtures/{name}.cpp"));
        println!("cargo:rerun-if-changed={}", cpp.display());
        let status = cpp_compiler
            .to_command()
            .args([
                "-std=c++17",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Werror",
                "-pthread",
            ])
            .args(extra_warnings)
            .arg("-I")
            .arg(&include_dir)
            .arg("-o")
            .arg(out_dir.join(format!("lib{name}.so")))
            .arg(&cpp)
            .status()
            .expect("the C++ compiler could not be started");
        assert!(status.success(), "compiling the C++ fixture {name} failed");
    }
    println!("cargo:rustc-env=FIXTURE_DIR={}", out_dir.display());
}

fn compile(compiler: &cc::Tool, source: &Path, include_dir: &Path, fixture: &str, library: &Path) {
    compile_with(compiler, source, include_dir, fixture, library, &[]);
}

/// [`compile`] with extra arguments after the source (libraries to link).
fn compile_with(
    compiler: &cc::Tool,
    source: &Path,
    include_dir: &Path,
    fixture: &str,
    library: &Path,
    extra: &[String],
) {
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
        .args(extra)
        .status()
        .expect("the C compiler could not be started");
    assert!(status.success(), "compiling fixture {fixture} failed");
}
