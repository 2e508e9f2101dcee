//! The echo handler written in C++ (`cpp/echo.cpp`, on `worker_host.hpp`). The Rust side only
//! records where `build.rs` put the shared library.

/// The path of the C++ echo handler's shared library, as built for this profile.
pub const SHARED_LIBRARY: &str = env!("CPP_ECHO_HANDLER_SO");
