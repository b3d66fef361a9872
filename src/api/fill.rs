//! The internal functions of `CALL doppler.fill` (a procedure in sql/finalize.sql, which commits
//! between batches): one batch, and the wait for rows other transactions hold. Both check that the
//! caller owns the table first; the work is the fill engine's (`fill/`).

use pgrx::prelude::*;

use crate::fill::{self, BatchReport, Via};
use crate::privileged::owned_table;
use crate::watched::{self, Wait};

/// Claims and fills one batch of a watched table in the caller's transaction.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _fill_batch(
    relid: pg_sys::Oid,
    max_rows: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(claimed, i64),
        name!(filled, i64),
        name!(failed, i64),
        name!(seconds, f64),
    ),
> {
    let listed = owned_watched(relid);
    let limit = max_rows
        .map(|m| m as i64)
        .unwrap_or(listed.batch_size as i64);
    let r = if limit <= 0 {
        BatchReport::default()
    } else {
        match watched::lock(relid, watched::FOR_WRITING, Wait::Wait) {
            Some(w) => fill::run(&w, limit, Via::Fill, None, false),
            None => BatchReport::default(), // unwatched meanwhile
        }
    };
    TableIterator::once((r.claimed, r.filled, r.failed, r.seconds))
}

/// For `fill`, when its claim found nothing: waits for the rows with work to do that other
/// transactions hold, and says whether a row is left to claim ([`fill::wait_for_holders`]).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _fill_wait(relid: pg_sys::Oid) -> bool {
    owned_watched(relid);
    fill::wait_for_holders(relid)
}

/// The watch of a table the caller owns (42501 otherwise); 42704 when it is not watched.
fn owned_watched(relid: pg_sys::Oid) -> watched::Watched {
    owned_table(relid);
    watched::load_or_raise(relid, "Call doppler.watch() first.")
}
