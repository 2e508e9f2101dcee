//! Build script: gives the bridge a run path to the directory of the libpython it links, so the
//! runner's loader finds `libpython3.x.so` without `LD_LIBRARY_PATH` (a pyenv or `/usr/local`
//! Python keeps it outside the loader's default directories).

fn main() {
    let config = pyo3_build_config::get();
    if let Some(dir) = &config.lib_dir {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
