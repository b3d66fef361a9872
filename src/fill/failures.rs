//! The record phase of a batch: what failed goes to doppler.failures (with its next attempt, by
//! doppler.max_attempts and doppler.retry_backoff), rows with a skip hash are recorded as skipped,
//! the records of rows now settled are forgotten, and the batch goes to doppler.batches. As the
//! catalog role, over plain values.

use doppler_core::{Error, ErrorKind};
use pgrx::prelude::*;

use super::{BatchReport, Claimed, Outcome, Phases, Via};
use crate::errors::{sqlstate, unpack_sqlstate, SpiOrRaise};
use crate::gucs;
use crate::privileged::as_catalog;
use crate::watched::{installed::Installed, Watched};

/// Why a row failed, as doppler.failures.error_class names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Its image: read, decode or model run (the error's kind: `not_found`, `corrupt`, ...).
    Image(ErrorKind),
    /// Writing its features into the table.
    Write,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Image(kind) => kind.as_str(),
            Class::Write => "write",
        }
    }
}

/// A row that could not be filled: why, as doppler.failures records it.
pub struct Failure {
    pub row: usize,
    pub class: Class,
    pub sqlstate: String,
    pub message: String,
    /// A web server asked to wait (or its host is paused): tried again then, and not a step
    /// towards giving up.
    pub retry_at: Option<std::time::SystemTime>,
}

/// The failures of rows whose image failed.
pub fn of_errors(errors: &[(usize, Error)]) -> Vec<Failure> {
    errors
        .iter()
        .map(|(row, e)| Failure {
            row: *row,
            class: Class::Image(e.kind),
            sqlstate: unpack_sqlstate(sqlstate(e.kind) as i32),
            message: e.message.clone(),
            retry_at: e.retry_at,
        })
        .collect()
}

/// Which claimed rows are marked held (out of the pending index until retried): those that
/// failed or were skipped, but not a row whose vector is current and only its hash failed
/// (marking it would take its vector out of search; it stays in the pending index, held back by
/// its record).
pub fn held(claimed: &[Claimed], failed: &[Failure], skips: &[(usize, String)]) -> Vec<bool> {
    let mut held = vec![false; claimed.len()];
    for i in failed
        .iter()
        .map(|f| f.row)
        .chain(skips.iter().map(|s| s.0))
    {
        held[i] = !claimed[i].has_vector;
    }
    held
}

/// Records failures and skips, and forgets the records of rows that are settled now (a vector
/// written, or the hash a row with a current vector lacked). As `catalog_role`.
pub fn record(
    w: &Watched,
    catalog_role: pg_sys::Oid,
    claimed: &[Claimed],
    outcomes: &[Outcome],
    failed: &[Failure],
    skips: &[(usize, String)],
) {
    as_catalog(catalog_role, || {
        record_failures(w, claimed, failed);
        record_skips(w, claimed, skips);
        let settled: Vec<String> = claimed
            .iter()
            .zip(outcomes)
            .filter(|(c, o)| {
                o.vector.is_some() || (c.has_vector && (o.hash.is_some() || o.pdq.is_some()))
            })
            .map(|(c, _)| c.key.clone())
            .collect();
        Spi::run_with_args(
            "DELETE FROM doppler.failures
             WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
               AND row_key OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[])",
            &[w.relid.into(), settled.into()],
        )
        .or_raise(|| format!("could not clear failures of {}", w.name));
    });
}

/// A failure's record: the first attempt (given up at once when doppler.max_attempts is 1, else
/// retried after doppler.retry_backoff), or the next (the backoff doubled each time).
const RECORD_FAILURE: &str = "
    INSERT INTO doppler.failures AS f (relid, row_key, source, error_class, sqlstate, message, next_attempt)
    VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6,
            CASE WHEN $7::pg_catalog.int4 OPERATOR(pg_catalog.<=) 1 THEN NULL
                 ELSE pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $8::pg_catalog.float8) END)
    ON CONFLICT (relid, row_key) DO UPDATE
       SET source = EXCLUDED.source, error_class = EXCLUDED.error_class, sqlstate = EXCLUDED.sqlstate,
           message = EXCLUDED.message, attempts = f.attempts OPERATOR(pg_catalog.+) 1, last_attempt = pg_catalog.now(),
           next_attempt = CASE WHEN f.attempts OPERATOR(pg_catalog.+) 1 OPERATOR(pg_catalog.>=) $7::pg_catalog.int4 THEN NULL
                               ELSE pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs =>
                                    $8::pg_catalog.float8 OPERATOR(pg_catalog.*)
                                    pg_catalog.power(2::pg_catalog.float8, f.attempts::pg_catalog.float8)) END";

/// A row a web server asked to wait for (429 or 503 with Retry-After): tried again at that time;
/// its attempts are not counted (a first record has none) for a day after its first attempt.
/// After that each wait counts, and the row is given up after doppler.max_attempts: a host that
/// asks to wait forever does not keep rows waiting forever.
const RECORD_WAIT: &str = "
    INSERT INTO doppler.failures AS f (relid, row_key, source, error_class, sqlstate, message, attempts, next_attempt)
    VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, 0,
            pg_catalog.to_timestamp($7::pg_catalog.float8))
    ON CONFLICT (relid, row_key) DO UPDATE
       SET source = EXCLUDED.source, error_class = EXCLUDED.error_class, sqlstate = EXCLUDED.sqlstate,
           message = EXCLUDED.message, last_attempt = pg_catalog.now(),
           attempts = f.attempts OPERATOR(pg_catalog.+) (f.first_attempt OPERATOR(pg_catalog.<)
                      (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::pg_catalog.interval))::pg_catalog.int4,
           next_attempt = CASE WHEN f.first_attempt OPERATOR(pg_catalog.<)
                                    (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::pg_catalog.interval)
                                AND (f.attempts OPERATOR(pg_catalog.+) 1) OPERATOR(pg_catalog.>=) $8::pg_catalog.int4
                               THEN NULL ELSE EXCLUDED.next_attempt END";

fn record_failures(w: &Watched, claimed: &[Claimed], failed: &[Failure]) {
    if failed.is_empty() {
        return;
    }
    let max_attempts = gucs::MAX_ATTEMPTS.get();
    let backoff = gucs::RETRY_BACKOFF.get() as f64;
    Spi::connect_mut(|client| {
        for e in failed {
            let c = &claimed[e.row];
            let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
                w.relid.into(),
                c.key.as_str().into(),
                c.shown.as_str().into(),
                e.class.as_str().into(),
                e.sqlstate.as_str().into(),
                e.message.as_str().into(),
            ];
            let sql = match e.retry_at {
                Some(at) => {
                    let epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    args.extend([epoch.as_secs_f64().into(), max_attempts.into()]);
                    RECORD_WAIT
                }
                None => {
                    args.extend([max_attempts.into(), backoff.into()]);
                    RECORD_FAILURE
                }
            };
            client.update(sql, None, &args)?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .or_raise(|| format!("could not record failures of {}", w.name));
}

/// Rows whose hash is a skip hash: recorded as skipped (class skip_hash, never retried).
fn record_skips(w: &Watched, claimed: &[Claimed], skips: &[(usize, String)]) {
    for (i, h) in skips {
        let c = &claimed[*i];
        Spi::run_with_args(
            "INSERT INTO doppler.failures AS f (relid, row_key, source, error_class, sqlstate, message, next_attempt)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, 'skip_hash', '00000', $4, NULL)
             ON CONFLICT (relid, row_key) DO UPDATE SET source = EXCLUDED.source, error_class = 'skip_hash',
                sqlstate = '00000', message = EXCLUDED.message, last_attempt = pg_catalog.now(), next_attempt = NULL",
            &[
                w.relid.into(),
                c.key.as_str().into(),
                c.shown.as_str().into(),
                format!("skipped: its hash {h} is in doppler.skip_hashes").into(),
            ],
        )
        .or_raise(|| format!("could not record a skipped row of {}", w.name));
    }
}

/// Logs the batch: a DEBUG1 line, and a row of doppler.batches (as `catalog_role`; without the
/// phase columns where the installed SQL has none yet).
pub fn log_batch(
    w: &Watched,
    via: Via,
    catalog_role: pg_sys::Oid,
    report: &BatchReport,
    phases: &Phases,
) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let st = &phases.stream;
    pgrx::debug1!(
        "doppler: batch of {} ({}): {} rows claimed, {} filled, {} failed, {} left on the network in \
         {:.1} ms: claim {:.1} ms, waited for images {:.1} ms, infer {:.1} ms, write {:.1} ms; decode \
         threads read {:.1} ms, decode {:.1} ms, resize {:.1} ms; {} URLs ({} asked for ahead, {} bytes) \
         in {:.1} ms of requests",
        w.name,
        via.as_str(),
        report.claimed,
        report.filled,
        report.failed,
        report.released,
        report.seconds * 1e3,
        ms(phases.claim),
        ms(st.waited),
        ms(phases.infer),
        ms(phases.write),
        ms(st.read),
        ms(st.decode),
        ms(st.resize),
        st.fetched,
        st.ahead,
        st.fetched_bytes,
        ms(st.fetch)
    );
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
        w.relid.into(),
        (report.claimed as i32).into(),
        (report.filled as i32).into(),
        (report.failed as i32).into(),
        report.seconds.into(),
        via.as_str().into(),
        (report.deduped as i32).into(),
    ];
    let installed = as_catalog(catalog_role, Installed::get);
    let phase_columns = installed.is_some_and(Installed::has_phase_columns);
    let fetch_columns = installed.is_some_and(Installed::has_fetch_columns);
    let sql = if fetch_columns {
        let phases = [
            phases.claim,
            st.read,
            st.decode,
            st.resize,
            st.waited,
            phases.infer,
            phases.write,
            st.fetch,
        ];
        args.extend(phases.map(|d| d.as_secs_f64().into()));
        args.push((st.fetched_bytes as i64).into());
        args.push((report.released as i32).into());
        "INSERT INTO doppler.batches (relid, claimed, filled, failed, seconds, via, deduped,
                                      claim_s, read_s, decode_s, resize_s, wait_s, infer_s, write_s,
                                      fetch_s, fetched_bytes, released)
         VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7,
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    } else if phase_columns {
        let phases = [
            phases.claim,
            st.read,
            st.decode,
            st.resize,
            st.waited,
            phases.infer,
            phases.write,
        ];
        args.extend(phases.map(|d| d.as_secs_f64().into()));
        "INSERT INTO doppler.batches (relid, claimed, filled, failed, seconds, via, deduped,
                                      claim_s, read_s, decode_s, resize_s, wait_s, infer_s, write_s)
         VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7,
                 $8, $9, $10, $11, $12, $13, $14)"
    } else {
        "INSERT INTO doppler.batches (relid, claimed, filled, failed, seconds, via, deduped)
         VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7)"
    };
    as_catalog(catalog_role, || {
        Spi::run_with_args(sql, &args).or_raise(|| format!("could not log a batch of {}", w.name))
    });
}
