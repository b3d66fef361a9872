//! One error type for the pure pipeline. The pgrx glue maps [`ErrorKind`] to a SQLSTATE; the
//! worker records it as a failure class. Messages name the input (path or byte count) and the problem.

/// What went wrong, coarsely: the class a caller maps to a SQLSTATE or a failure record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file (or model file) does not exist.
    NotFound,
    /// The path is a directory.
    IsDirectory,
    /// The path is neither a regular file nor a directory (FIFO, socket, device).
    NotRegularFile,
    /// The OS refused access.
    PermissionDenied,
    /// doppler's own policy refused the input: outside doppler.file_roots, a private address,
    /// a host not allowed, URLs off.
    Refused,
    /// Any other I/O failure while reading.
    Io,
    /// Zero bytes, or bytes in no known image format.
    NotAnImage,
    /// A known format that doppler cannot decode (e.g. lossless JPEG, AVIF).
    Unsupported,
    /// A known format whose data is truncated or corrupt.
    Corrupt,
    /// Over a configured limit (bytes, pixels, dimension).
    TooLarge,
    /// The ONNX Runtime shared library could not be loaded.
    RuntimeMissing,
    /// A setting is missing or invalid (no model configured, a relative path, a conflicting library).
    Config,
    /// The model cannot be used: its inputs/outputs do not fit, or ORT rejected it.
    BadModel,
    /// ONNX Runtime failed while running the model.
    Inference,
    /// A bug or a panic in a dependency, caught at the boundary.
    Internal,
    /// The server's inference service is not running.
    ServiceUnavailable,
    /// A web server asked to wait (429 or 503 with `Retry-After`), or doppler paused a host that
    /// did not answer: tried again at [`Error::retry_at`], not a step towards giving up.
    RetryLater,
}

impl ErrorKind {
    /// Every kind, for reading one back from its name ([`ErrorKind::from_name`]).
    pub const ALL: [ErrorKind; 17] = [
        ErrorKind::NotFound,
        ErrorKind::IsDirectory,
        ErrorKind::NotRegularFile,
        ErrorKind::PermissionDenied,
        ErrorKind::Refused,
        ErrorKind::Io,
        ErrorKind::NotAnImage,
        ErrorKind::Unsupported,
        ErrorKind::Corrupt,
        ErrorKind::TooLarge,
        ErrorKind::RuntimeMissing,
        ErrorKind::Config,
        ErrorKind::BadModel,
        ErrorKind::Inference,
        ErrorKind::Internal,
        ErrorKind::ServiceUnavailable,
        ErrorKind::RetryLater,
    ];

    /// The kind named `name` ([`ErrorKind::as_str`]); unknown names are `Internal`.
    pub fn from_name(name: &str) -> ErrorKind {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap_or(ErrorKind::Internal)
    }

    /// A stable lowercase name, used as the failure class in records.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::IsDirectory => "is_directory",
            ErrorKind::NotRegularFile => "not_regular_file",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Refused => "refused",
            ErrorKind::Io => "io",
            ErrorKind::NotAnImage => "not_an_image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::RuntimeMissing => "runtime_missing",
            ErrorKind::Config => "config",
            ErrorKind::BadModel => "bad_model",
            ErrorKind::Inference => "inference",
            ErrorKind::Internal => "internal",
            ErrorKind::ServiceUnavailable => "service_unavailable",
            ErrorKind::RetryLater => "retry_later",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// Extra context for an ERROR's DETAIL/HINT line.
    pub hint: Option<String>,
    /// [`ErrorKind::RetryLater`]: when to try again.
    pub retry_at: Option<std::time::SystemTime>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
            retry_at: None,
        }
    }

    /// The same error, for another input or caller (errors are not `Clone`: a source's error
    /// stays with its source).
    pub fn copy(&self) -> Self {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            hint: self.hint.clone(),
            retry_at: self.retry_at,
        }
    }

    pub fn retry_at(mut self, at: std::time::SystemTime) -> Self {
        self.retry_at = Some(at);
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Maps an OS error on `what` (e.g. `image file "/a.jpg"`) to a kind and a message.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => Error::new(ErrorKind::NotFound, format!("{what} does not exist")),
            K::PermissionDenied => Error::new(
                ErrorKind::PermissionDenied,
                format!("{what} cannot be read: permission denied for the server's OS user"),
            ),
            K::IsADirectory => Error::new(ErrorKind::IsDirectory, format!("{what} is a directory")),
            _ => Error::new(ErrorKind::Io, format!("could not read {what}: {e}")),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `f`, turning a panic inside it (ours or a dependency's) into an [`ErrorKind::Internal`]
/// error, so that no panic can unwind into Postgres or kill a worker thread silently.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::new(
                ErrorKind::Internal,
                format!("internal error while {what}: {msg}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        // the inference service sends an error's kind to the caller by name
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.as_str()), k);
        }
        let mut names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len(), "names are unique");
        assert_eq!(ErrorKind::from_name("no such kind"), ErrorKind::Internal);
    }
}
