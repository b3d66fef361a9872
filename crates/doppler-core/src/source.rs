//! Reading image bytes from a source, under a byte limit.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// How to name an input in messages: `image file "/a.jpg"` or `image bytes (1234 bytes)`.
pub fn describe_path(path: &str) -> String {
    format!("image file \"{path}\"")
}

pub fn describe_bytes(len: usize) -> String {
    format!("image data ({len} bytes)")
}

/// Reads a whole regular file, refusing directories, FIFOs, sockets and devices without blocking
/// on them (the file is opened with O_NONBLOCK, then checked with fstat), and refusing files
/// larger than `max_bytes` (checked by size and again while reading).
pub fn read_file(path: &str, max_bytes: u64) -> Result<Vec<u8>> {
    let what = describe_path(path);
    if path.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "image path is empty"));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(Path::new(path))
        .map_err(|e| Error::io(&what, &e))?;
    let meta = file.metadata().map_err(|e| Error::io(&what, &e))?;
    if meta.is_dir() {
        return Err(Error::new(
            ErrorKind::IsDirectory,
            format!("{what} is a directory"),
        ));
    }
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::NotRegularFile,
            format!("{what} is not a regular file (FIFO, socket or device)"),
        ));
    }
    if meta.len() > max_bytes {
        return Err(too_many_bytes(&what, meta.len(), max_bytes));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(&what, &e))?;
    if buf.len() as u64 > max_bytes {
        return Err(too_many_bytes(&what, buf.len() as u64, max_bytes));
    }
    Ok(buf)
}

fn too_many_bytes(what: &str, len: u64, max: u64) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("{what} is {len} bytes, over the limit of {max} bytes"),
    )
    .with_hint("Raise doppler.max_image_bytes to accept larger files.")
}
