//! The embedded interpreter: starting it once per process, making libpython's symbols visible to
//! the C extensions it will load, and loading the bridge's Python half (`bridge.py`) as a module.

use pyo3::prelude::*;
use pyo3::types::PyModule;
use std::ffi::{c_void, CStr};

/// The bridge's Python half, compiled into the library.
const BRIDGE_SOURCE: &CStr =
    match CStr::from_bytes_with_nul(concat!(include_str!("bridge.py"), "\0").as_bytes()) {
        Ok(source) => source,
        Err(_) => panic!("bridge.py holds a NUL byte"),
    };

/// Why the interpreter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The loader does not know which file holds libpython.
    #[error("the bridge cannot find the libpython it was linked with (dladdr found no file)")]
    LibpythonNotFound,
    /// libpython could not be made global.
    #[error("libpython could not be made visible to C extensions (dlopen RTLD_GLOBAL failed)")]
    NotGlobal,
    /// `bridge.py` did not load.
    #[error("the bridge's Python module failed to load: {0}")]
    Module(PyErr),
}

/// Starts the interpreter (once; a second call finds it running) and returns the bridge module.
pub fn start() -> Result<Py<PyModule>, StartError> {
    make_libpython_global()?;
    Python::initialize();
    Python::attach(|py| {
        let module = PyModule::from_code(
            py,
            BRIDGE_SOURCE,
            c"<worker-host python bridge>",
            c"worker_host_bridge",
        )
        .map_err(StartError::Module)?;
        Ok(module.unbind())
    })
}

/// worker-host loads a handler with `RTLD_LOCAL`, so libpython, which came in as this library's
/// dependency, is not in the global symbol scope. C extension modules (`_ctypes`, numpy, torch)
/// are not linked against libpython and expect its symbols to be global: without this, the first
/// `import` of one fails with an undefined symbol. Reopening the already loaded libpython with
/// `RTLD_NOLOAD | RTLD_GLOBAL` promotes it, as `python3` itself has it.
fn make_libpython_global() -> Result<(), StartError> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let symbol = pyo3::ffi::Py_IsInitialized as *const c_void;
    // SAFETY: dladdr only reads the address (a function of libpython, which is loaded) and fills
    // `info`, a valid, writable Dl_info.
    let found = unsafe { libc::dladdr(symbol, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return Err(StartError::LibpythonNotFound);
    }
    // SAFETY: `dli_fname` is the loader's NUL-terminated path of a library that stays loaded
    // (this library depends on it). RTLD_NOLOAD opens nothing new; the handle is kept for the
    // life of the process (never closed), so the promotion lasts.
    let handle = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD,
        )
    };
    if handle.is_null() {
        return Err(StartError::NotGlobal);
    }
    Ok(())
}
