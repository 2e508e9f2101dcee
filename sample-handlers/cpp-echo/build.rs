//! Links `cpp/echo.cpp` into a shared library with the C++ compiler the `cc` crate picks, as
//! C++17 with every warning an error, exporting only `wh_handler_entry`. The library is written to
//! OUT_DIR and copied next to the Rust handlers (`target/<profile>/libcpp_echo_handler.so`), where
//! users and tests look for handlers.

use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let source = manifest_dir.join("cpp/echo.cpp");
    let version_script = manifest_dir.join("cpp/exports.map");
    let include_dir = Path::new(handler_abi::HEADER_PATH)
        .parent()
        .expect("the header lives in a directory");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", version_script.display());
    println!("cargo:rerun-if-changed={}", handler_abi::HEADER_PATH);
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("worker_host.hpp").display()
    );

    let compiler = cc::Build::new()
        .cpp(true)
        .opt_level(2)
        .cargo_metadata(false)
        .get_compiler();
    let library = out_dir.join("libcpp_echo_handler.so");
    let status = compiler
        .to_command()
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-shared",
            "-fPIC",
        ])
        .arg("-I")
        .arg(include_dir)
        .arg(format!("-Wl,--version-script={}", version_script.display()))
        .arg("-o")
        .arg(&library)
        .arg(&source)
        .status()
        .expect("the C++ compiler could not be started");
    assert!(status.success(), "compiling {} failed", source.display());

    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out: three levels up is the profile dir.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = std::fs::copy(&library, profile_dir.join("libcpp_echo_handler.so"));
    }
    println!("cargo:rustc-env=CPP_ECHO_HANDLER_SO={}", library.display());
}
