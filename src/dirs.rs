//! Where the server's installation keeps doppler's bundled files.
//!
//! doppler's packages put the ONNX Runtime library they were tested with in `$libdir/doppler/`
//! and the bundled model in `$sharedir/doppler/` — directories of the server's own installation,
//! whatever its prefix (a relocated PostgreSQL finds them too). Settings and `doppler.models`
//! name these files with Postgres's own `$libdir` (as in `module_pathname`) and `$sharedir`
//! prefixes; this module expands them for the running server. Nothing else is expanded: any
//! other path is used as written.

use std::ffi::CStr;

use pgrx::pg_sys;

/// The server's package library directory (`pg_config --pkglibdir`).
pub fn libdir() -> String {
    // SAFETY: pkglib_path is a NUL-terminated MAXPGPATH buffer the server fills at start
    // (postmaster and every process it forks) and never changes afterwards.
    unsafe { CStr::from_ptr(std::ptr::addr_of!(pg_sys::pkglib_path).cast()) }
        .to_string_lossy()
        .into_owned()
}

/// The server's share directory (`pg_config --sharedir`).
pub fn sharedir() -> String {
    let mut buf = [0 as std::ffi::c_char; pg_sys::MAXPGPATH as usize];
    // SAFETY: get_share_path writes at most MAXPGPATH bytes, NUL-terminated, from my_exec_path
    // (the server executable's path, set at start).
    unsafe {
        pg_sys::get_share_path(
            std::ptr::addr_of!(pg_sys::my_exec_path).cast(),
            buf.as_mut_ptr(),
        );
        CStr::from_ptr(buf.as_ptr())
    }
    .to_string_lossy()
    .into_owned()
}

/// `path` with a leading `$libdir` or `$sharedir` replaced by the server's directory.
pub fn expand(path: &str) -> String {
    for (prefix, dir) in [
        ("$libdir", libdir as fn() -> String),
        ("$sharedir", sharedir),
    ] {
        if let Some(rest) = path.strip_prefix(prefix) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{}{rest}", dir());
            }
        }
    }
    path.to_string()
}

/// Where doppler's packages install ONNX Runtime (the default of `doppler.onnxruntime_library`).
pub const BUNDLED_ORT: &std::ffi::CStr = c"$libdir/doppler/libonnxruntime.so";
/// Where doppler's packages install the bundled EfficientNet-Lite0 (doppler.models).
pub const BUNDLED_MODEL: &str = "$sharedir/doppler/efficientnet-lite0.onnx";
