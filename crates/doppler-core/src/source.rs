//! Reading image bytes from a source, under a byte limit.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::fetch::{self, UrlPolicy};

/// Where images may come from, and how big they may be.
#[derive(Clone, Debug)]
pub struct SourcePolicy {
    pub max_bytes: u64,
    /// Folders server files must resolve into (after symlinks and `..`); empty: anywhere.
    pub file_roots: Vec<String>,
    /// The URL policy; None: URLs are refused (doppler.allow_urls is off).
    pub urls: Option<UrlPolicy>,
}

impl SourcePolicy {
    /// The URL policy with this policy's byte limit; None when URLs are off.
    pub fn url_policy(&self) -> Option<UrlPolicy> {
        self.urls.as_ref().map(|u| UrlPolicy {
            max_bytes: self.max_bytes,
            ..u.clone()
        })
    }

    /// Files anywhere, no URLs.
    pub fn files(max_bytes: u64) -> SourcePolicy {
        SourcePolicy {
            max_bytes,
            file_roots: Vec::new(),
            urls: None,
        }
    }
}

/// Reads a path or fetches a URL (by its form), under `policy`.
pub fn load(path_or_url: &str, policy: &SourcePolicy) -> Result<Vec<u8>> {
    load_polled(path_or_url, policy, || {})
}

/// [`load`], calling `poll` every 50 ms while it waits for a URL (a backend checks for a cancel
/// there).
pub fn load_polled(
    path_or_url: &str,
    policy: &SourcePolicy,
    poll: impl FnMut(),
) -> Result<Vec<u8>> {
    if fetch::is_url(path_or_url) {
        match policy.url_policy() {
            Some(u) => {
                fetch::fetch_polled(path_or_url, &u, std::time::Duration::from_millis(50), poll)
            }
            None if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") => {
                Err(Error::new(
                    ErrorKind::Refused,
                    format!("image URL \"{path_or_url}\" refused: fetching URLs is off"),
                )
                .with_hint("A superuser can turn on doppler.allow_urls."))
            }
            None => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "image URL \"{path_or_url}\" uses an unsupported scheme (only http and https)"
                ),
            )),
        }
    } else {
        read_path(path_or_url, policy)
    }
}

/// Reads a server file: absolute paths only, inside `policy.file_roots` when set. The check is
/// made on the file actually opened (its path as the kernel resolved it), so neither `..` nor a
/// symlink, swapped in at any time, can lead outside the roots.
pub fn read_path(path: &str, policy: &SourcePolicy) -> Result<Vec<u8>> {
    if !path.starts_with('/') {
        return Err(Error::new(
            ErrorKind::Config,
            format!("image path \"{path}\" is not absolute"),
        )
        .with_hint("doppler reads server files by absolute path only."));
    }
    read_file_checked(path, policy.max_bytes, &policy.file_roots)
}

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
    read_file_checked(path, max_bytes, &[])
}

fn read_file_checked(path: &str, max_bytes: u64, roots: &[String]) -> Result<Vec<u8>> {
    let what = describe_path(path);
    if path.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "image path is empty"));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(Path::new(path))
        .map_err(|e| Error::io(&what, &e))?;
    if !roots.is_empty() {
        use std::os::fd::AsRawFd;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| Error::io(&what, &e))?;
        let inside = roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|r| real.starts_with(&r));
        if !inside {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "{what} is outside doppler.file_roots (it resolves to \"{}\")",
                    real.display()
                ),
            )
            .with_hint("Only files inside the folders of doppler.file_roots may be read."));
        }
    }
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
