//! doppler's SQL API for external workers (doppler 0.10.0), typed: register, claim, write,
//! heartbeat, unregister, and how an error from them is to be taken. Every statement is
//! schema-qualified; JSON travels as text and is cast on the server (the `postgres` crate then
//! needs no JSON feature).

use postgres::{Client, Transaction};

/// A registration: the worker's id and the server's settings (jsonb as text).
pub struct Registration {
    pub id: i64,
    pub settings: String,
}

pub fn register(
    c: &mut Client,
    host: &str,
    pid: i32,
    provider: &str,
    version: &str,
) -> Result<Registration, postgres::Error> {
    let row = c.query_one(
        "SELECT id, settings::pg_catalog.text
         FROM doppler.worker_register($1::pg_catalog.text, $2::pg_catalog.int4,
                                      $3::pg_catalog.text, $4::pg_catalog.text)",
        &[&host, &pid, &provider, &version],
    )?;
    Ok(Registration {
        id: row.try_get(0)?,
        settings: row.try_get(1)?,
    })
}

/// One claimed row.
#[derive(Debug)]
pub struct Claimed {
    /// The row's number in the claim (what the write names it by).
    pub n: i32,
    /// The table, `"schema"."name"`.
    pub tbl: String,
    /// The model (jsonb as text).
    pub model: String,
    /// A path or URL (text sources).
    pub source: Option<String>,
    /// The image bytes (bytea sources).
    pub image: Option<Vec<u8>>,
}

/// Claims up to `max_rows` rows of one table, not of the tables `skip` (oids), locked for the
/// transaction `tx`.
pub fn claim(
    tx: &mut Transaction<'_>,
    worker: i64,
    max_rows: i32,
    skip: &[u32],
) -> Result<Vec<Claimed>, postgres::Error> {
    let rows = tx.query(
        "SELECT n, tbl, model::pg_catalog.text, source, image
         FROM doppler.worker_claim($1::pg_catalog.int8, $2::pg_catalog.int4, $3::pg_catalog.oid[])",
        &[&worker, &max_rows, &skip],
    )?;
    rows.iter()
        .map(|r| {
            Ok(Claimed {
                n: r.try_get(0)?,
                tbl: r.try_get(1)?,
                model: r.try_get(2)?,
                source: r.try_get(3)?,
                image: r.try_get(4)?,
            })
        })
        .collect()
}

/// Each answered row's PDQ hash (64 hex digits) and quality.
pub type PdqAnswer<'a> = (&'a [Option<String>], &'a [Option<i32>]);

/// The answer for the batch `tx` holds: vectors (flat, `n.len()` × dim), dHashes and (when the
/// table wants them) PDQ hashes and qualities of rows `n`, and failures (a JSON array as text).
/// Returns the rows written. (Without PDQ hashes, the call a 0.10.0 server knows.)
#[allow(clippy::too_many_arguments)]
pub fn write(
    tx: &mut Transaction<'_>,
    worker: i64,
    sha256: &str,
    n: &[i32],
    vectors: &[f32],
    hashes: &[Option<String>],
    pdq: Option<PdqAnswer>,
    failures: &str,
) -> Result<i64, postgres::Error> {
    if let Some((pdq, quality)) = pdq {
        let row = tx.query_one(
            "SELECT doppler.worker_write($1::pg_catalog.int8, $2::pg_catalog.text, $3::pg_catalog.int4[],
                                         $4::pg_catalog.float4[], $5::pg_catalog.text[],
                                         $6::pg_catalog.text::pg_catalog.jsonb,
                                         $7::pg_catalog.text[], $8::pg_catalog.int4[])::pg_catalog.int8",
            &[&worker, &sha256, &n, &vectors, &hashes, &failures, &pdq, &quality],
        )?;
        return row.try_get(0);
    }
    let row = tx.query_one(
        "SELECT doppler.worker_write($1::pg_catalog.int8, $2::pg_catalog.text, $3::pg_catalog.int4[],
                                     $4::pg_catalog.float4[], $5::pg_catalog.text[],
                                     $6::pg_catalog.text::pg_catalog.jsonb)::pg_catalog.int8",
        &[&worker, &sha256, &n, &vectors, &hashes, &failures],
    )?;
    row.try_get(0)
}

/// The oid of a claimed table, by the name the claim gave it (`"schema"."name"`), read from the
/// catalogs: no lookup through the name (that would need USAGE on the table's schema, which a
/// worker's role need not have). None when the table is gone.
pub fn table_oid(c: &mut Client, tbl: &str) -> Result<Option<u32>, postgres::Error> {
    let row = c.query_opt(
        "SELECT c.oid FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace s ON s.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.relname OPERATOR(pg_catalog.=) (pg_catalog.parse_ident($1::pg_catalog.text))[2]
           AND s.nspname OPERATOR(pg_catalog.=) (pg_catalog.parse_ident($1::pg_catalog.text))[1]",
        &[&tbl],
    )?;
    row.map(|r| r.try_get(0)).transpose()
}

/// What the worker holds and has done (jsonb as text).
pub fn heartbeat(c: &mut Client, worker: i64, state: &str) -> Result<(), postgres::Error> {
    c.execute(
        "SELECT doppler.worker_heartbeat($1::pg_catalog.int8, $2::pg_catalog.text::pg_catalog.jsonb)",
        &[&worker, &state],
    )?;
    Ok(())
}

/// Ends the server process `pid` (the worker's own `work` connection, whose statement overran).
pub fn terminate(c: &mut Client, pid: i32) -> Result<(), postgres::Error> {
    c.execute(
        "SELECT pg_catalog.pg_terminate_backend($1::pg_catalog.int4)",
        &[&pid],
    )?;
    Ok(())
}

/// The server process of a connection.
pub fn backend_pid(c: &mut Client) -> Result<i32, postgres::Error> {
    c.query_one("SELECT pg_catalog.pg_backend_pid()", &[])?
        .try_get(0)
}

/// Bounds each statement of the connection: `statement_timeout` (the owner's code a claim or
/// write runs may sleep); 0 turns it off.
pub fn set_statement_timeout(
    c: &mut Client,
    limit: std::time::Duration,
) -> Result<(), postgres::Error> {
    c.batch_execute(&format!("SET statement_timeout = {}", limit.as_millis()))
}

pub fn unregister(c: &mut Client, worker: i64) -> Result<(), postgres::Error> {
    c.execute(
        "SELECT doppler.worker_unregister($1::pg_catalog.int8)",
        &[&worker],
    )?;
    Ok(())
}

/// How an error from the server is to be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection is gone (closed, I/O, the server shutting down or the backend terminated,
    /// the lease's idle timeout): connect again.
    Connection,
    /// The worker's id is not registered (any more): register again.
    Unregistered,
    /// The role may not act as a worker (42501 from register): fatal.
    NotPermitted,
    /// Anything else: this batch or call failed; the worker goes on.
    Other,
}

/// An error's SQLSTATE, when the server sent one.
pub fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// How `e` is to be taken; `closed`: whether the connection it came from is closed now.
pub fn classify(e: &postgres::Error, closed: bool) -> Failure {
    let message = e.as_db_error().map_or("", |d| d.message());
    classify_code(sqlstate(e), message, closed || e.is_closed() || is_io(e))
}

/// Whether `e` comes from the socket (I/O, TLS).
fn is_io(e: &postgres::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        if cause.is::<std::io::Error>() {
            return true;
        }
        src = cause.source();
    }
    false
}

fn classify_code(sqlstate: Option<&str>, message: &str, closed: bool) -> Failure {
    match sqlstate {
        _ if closed => Failure::Connection,
        // the client's own (a value it cannot convert, say): the connection is fine
        None => Failure::Other,
        // connection exceptions; admin or crash shutdown, cannot connect now, terminated, idle
        // session timeout; the idle-in-transaction timeout (the lease)
        Some(s) if s.starts_with("08") || s.starts_with("57P") || s == "25P03" => {
            Failure::Connection
        }
        // (42704 is also "model ... is not registered": only the worker's own is this)
        Some("42704")
            if message.starts_with("worker ") && message.ends_with("is not registered") =>
        {
            Failure::Unregistered
        }
        Some("42501") => Failure::NotPermitted,
        Some(_) => Failure::Other,
    }
}

/// `e` in one line: the server's message (with its detail), or the client's.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{}: {detail}", d.message()),
            None => d.message().to_string(),
        },
        None => {
            // the client's error and its cause ("error connecting to server: Connection refused")
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                let c = cause.to_string();
                if !s.contains(&c) {
                    s.push_str(": ");
                    s.push_str(&c);
                }
                src = cause.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let c = |code: Option<&str>, msg: &str| classify_code(code, msg, false);
        assert_eq!(c(None, ""), Failure::Other);
        assert_eq!(classify_code(None, "", true), Failure::Connection);
        assert_eq!(
            c(
                Some("57P01"),
                "terminating connection due to administrator command"
            ),
            Failure::Connection
        );
        assert_eq!(
            c(
                Some("25P03"),
                "terminating connection due to idle-in-transaction timeout"
            ),
            Failure::Connection
        );
        assert_eq!(c(Some("08006"), ""), Failure::Connection);
        assert_eq!(
            c(Some("42704"), "worker 7 is not registered"),
            Failure::Unregistered
        );
        assert_eq!(
            c(Some("42704"), "model \"x\" is not registered"),
            Failure::Other
        );
        assert_eq!(
            c(
                Some("42501"),
                "only members of doppler_worker may act as external doppler workers"
            ),
            Failure::NotPermitted
        );
        assert_eq!(
            c(Some("22023"), "the worker's model file has SHA-256"),
            Failure::Other
        );
        assert_eq!(classify_code(Some("22023"), "", true), Failure::Connection);
    }
}
