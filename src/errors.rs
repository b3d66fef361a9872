//! The boundary: a doppler-core error becomes a Postgres ERROR with a fitting SQLSTATE.

use doppler_core::{Error, ErrorKind};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub fn sqlstate(kind: ErrorKind) -> PgSqlErrorCode {
    use PgSqlErrorCode::*;
    match kind {
        ErrorKind::NotFound => ERRCODE_UNDEFINED_FILE,
        ErrorKind::IsDirectory | ErrorKind::NotRegularFile => ERRCODE_WRONG_OBJECT_TYPE,
        ErrorKind::PermissionDenied | ErrorKind::Refused => ERRCODE_INSUFFICIENT_PRIVILEGE,
        ErrorKind::Io => ERRCODE_IO_ERROR,
        ErrorKind::NotAnImage | ErrorKind::Corrupt => ERRCODE_INVALID_BINARY_REPRESENTATION,
        ErrorKind::Unsupported => ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorKind::TooLarge => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        ErrorKind::RuntimeMissing => ERRCODE_UNDEFINED_FILE,
        ErrorKind::Config | ErrorKind::BadModel => ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorKind::Inference => ERRCODE_SYSTEM_ERROR,
        ErrorKind::Internal => ERRCODE_INTERNAL_ERROR,
        // not 57P03 (cannot_connect_now): connection pools take that for a broken connection
        ErrorKind::ServiceUnavailable => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
    }
}

/// Raises `e` as an ERROR. Does not return.
pub fn raise(e: Error) -> ! {
    let mut report = ErrorReport::new(sqlstate(e.kind), e.message, "doppler");
    if let Some(h) = e.hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Unwraps a doppler-core result or raises it as an ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for doppler_core::Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| raise(e))
    }
}

/// Raises an ERROR with a SQLSTATE, message and (if not empty) hint. Does not return.
pub fn raise_code(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    let mut report = ErrorReport::new(code, message, "doppler");
    if !hint.is_empty() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Runs `f` in an internal subtransaction: an ERROR inside is rolled back (with whatever `f`
/// changed, the current user and settings included) and returned as its SQLSTATE and message,
/// so that one failure does not abort the caller's statement. A cancel is not caught.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, (PgSqlErrorCode, String)> {
    use pgrx::pg_sys;
    // SAFETY: the protocol of PL/pgSQL's exception blocks: begin, then release on success or
    // roll back on error, restoring the memory context and resource owner of the caller.
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    let mut f = Some(f);
    let f = std::panic::AssertUnwindSafe(&mut f);
    pgrx::PgTryBuilder::new(move || {
        let f = f;
        let r = (f.0.take().expect("run once"))();
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
        Ok(r)
    })
    .catch_others(move |e| {
        let (code, msg) = match &e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                (r.sql_error_code(), r.message().to_string())
            }
        };
        // Always roll the subtransaction back first: an error that leaves it open would leave
        // the transaction in a state only this function knows how to end.
        unsafe {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
        // a cancel, statement_timeout or shutdown is the caller's, not the row's
        if code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
            || code == PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN
        {
            e.rethrow();
        }
        Err((code, msg))
    })
    .execute()
}
