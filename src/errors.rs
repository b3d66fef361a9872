//! The one way doppler raises an ERROR: [`raise`], with a SQLSTATE that fits the condition, a
//! message and an optional hint. Everything else goes through it:
//! * a doppler-core [`Error`] takes the SQLSTATE of its kind ([`sqlstate`], [`raise_error`],
//!   [`OrRaise`] on a core `Result`);
//! * an SPI call that fails without an ERROR of its own (pgrx returns those as `spi::Error`: a
//!   value of an unexpected type, a statement doppler built wrongly) is raised with
//!   [`SpiOrRaise::or_raise`] and a word on what doppler was doing; a value of another type is
//!   42804 (a column whose type changed under a watch), the rest XX000 (doppler's own fault).
//!
//! [`in_subtransaction`] turns an ERROR back into a value where one row's or one table's failure
//! must not end the statement (a row's write, a table's count).

use doppler_core::{Error, ErrorKind};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub use pgrx::PgSqlErrorCode as Code;

/// The SQLSTATE of a doppler-core error kind.
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
        // a web server's 429 or 503 with Retry-After: the io_error of other HTTP failures
        ErrorKind::RetryLater => ERRCODE_IO_ERROR,
    }
}

/// Raises an ERROR with a SQLSTATE, message and (if not empty) hint. Does not return.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: &str) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "doppler");
    if !hint.is_empty() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Reports a WARNING with a SQLSTATE, message and (if not empty) hint, and goes on.
pub fn warn(code: PgSqlErrorCode, message: impl Into<String>, hint: &str) {
    let mut report = ErrorReport::new(code, message.into(), "doppler");
    if !hint.is_empty() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::WARNING);
}

/// Raises a doppler-core error with its kind's SQLSTATE. Does not return.
pub fn raise_error(e: Error) -> ! {
    raise(sqlstate(e.kind), e.message, e.hint.as_deref().unwrap_or(""))
}

/// Unwraps a doppler-core result or raises it as an ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for doppler_core::Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| raise_error(e))
    }
}

/// Unwraps an SPI result or raises it, saying what doppler was doing (`"could not claim rows of
/// \"s\".\"t\""`). A statement's own ERROR never gets here (it is raised as it came); these are
/// values of an unexpected type and statements doppler got wrong.
pub trait SpiOrRaise<T> {
    fn or_raise(self, doing: impl FnOnce() -> String) -> T;
}

impl<T> SpiOrRaise<T> for Result<T, pgrx::spi::Error> {
    fn or_raise(self, doing: impl FnOnce() -> String) -> T {
        self.unwrap_or_else(|e| {
            let code = spi_sqlstate(&e);
            let hint = if code == PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH {
                "A column doppler uses changed its type after doppler.watch(): watch the table again."
            } else {
                ""
            };
            raise(code, format!("doppler: {}: {e}", doing()), hint)
        })
    }
}

/// The SQLSTATE of an SPI error that is not a statement's own ERROR.
fn spi_sqlstate(e: &pgrx::spi::Error) -> PgSqlErrorCode {
    use pgrx::spi::Error as E;
    match e {
        // a value is not of the type doppler read it as: the column's type changed
        E::DatumError(_) => PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
        _ => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
    }
}

/// Runs `f` in an internal subtransaction: an ERROR inside is rolled back (with whatever `f`
/// changed, the current user and settings included) and returned as its SQLSTATE and message,
/// so that one failure does not abort the caller's statement. A cancel is not caught.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, (PgSqlErrorCode, String)> {
    in_subtransaction_kept(|| (f(), true))
}

/// [`in_subtransaction`], where `f` also says whether to keep what it did: when it says false,
/// the subtransaction is rolled back (its locks released) although it succeeded.
pub fn in_subtransaction_kept<R>(
    f: impl FnOnce() -> (R, bool),
) -> Result<R, (PgSqlErrorCode, String)> {
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
        let (r, keep) = (f.0.take().expect("run once"))();
        unsafe {
            if keep {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
        Ok(r)
    })
    .catch_others(move |e| {
        let (code, msg, interrupt) = match &e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                (r.sql_error_code(), r.message().to_string(), is_interrupt(r))
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
        // a cancel or statement_timeout is the caller's, not the row's (a terminate or shutdown
        // is a FATAL, never caught here); an ERROR with its SQLSTATE that some code RAISEd
        // itself is that code's failure
        if interrupt {
            e.rethrow();
        }
        Err((code, msg))
    })
    .execute()
}

/// Whether an ERROR is the server's own cancel (a cancel request, `statement_timeout`, a lock or
/// recovery-conflict timeout: raised where the server processes interrupts), not a
/// `query_canceled` that some code raised itself.
pub fn is_interrupt(r: &pgrx::pg_sys::panic::ErrorReportWithLevel) -> bool {
    r.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
        && r.function_name() == Some("ProcessInterrupts")
}

/// Postgres packs the five SQLSTATE characters six bits each.
pub fn unpack_sqlstate(code: i32) -> String {
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}
