//! Watching tables: `doppler.watch`, `unwatch`, `retry_failed` and `wake`. The SQL-facing
//! wrappers with `regclass`/`name` signatures are in sql/finalize.sql; the work is in
//! `watch.rs`.

use pgrx::prelude::*;

use crate::errors::{raise, Code};
use crate::watch::{self, WatchArgs};

/// `doppler.watch` before 0.11.0 (a database whose `ALTER EXTENSION doppler UPDATE` has not run
/// yet calls this form): the PDQ columns stay as they are.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn _watch(
    relid: Option<pg_sys::Oid>,
    source_column: &str,
    vector_column: &str,
    batch_size: i32,
    priority: i32,
    mode: &str,
    on_error: &str,
    hash_column: Option<&str>,
    dedup: bool,
    model: Option<&str>,
    model_column: Option<&str>,
) -> String {
    let relid = table(relid);
    let current = crate::watched::load(relid);
    let (pdq, quality) = current
        .as_ref()
        .map(|w| (w.pdq_column.as_deref(), w.pdq_quality_column.as_deref()))
        .unwrap_or_default();
    watch::watch(&WatchArgs {
        relid,
        source_column,
        vector_column,
        batch_size,
        priority,
        mode,
        on_error,
        hash_column,
        dedup,
        model,
        model_column,
        pdq_column: pdq,
        pdq_quality_column: quality,
    })
}

/// `doppler.watch` (0.11.0): with the PDQ hash's column and its quality's.
#[pg_extern(name = "_watch", volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn _watch_with_pdq(
    relid: Option<pg_sys::Oid>,
    source_column: &str,
    vector_column: &str,
    batch_size: i32,
    priority: i32,
    mode: &str,
    on_error: &str,
    hash_column: Option<&str>,
    dedup: bool,
    model: Option<&str>,
    model_column: Option<&str>,
    pdq_column: Option<&str>,
    pdq_quality_column: Option<&str>,
) -> String {
    watch::watch(&WatchArgs {
        relid: table(relid),
        source_column,
        vector_column,
        batch_size,
        priority,
        mode,
        on_error,
        hash_column,
        dedup,
        model,
        model_column,
        pdq_column,
        pdq_quality_column,
    })
}

fn table(relid: Option<pg_sys::Oid>) -> pg_sys::Oid {
    relid.unwrap_or_else(|| {
        raise(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "the table to watch must not be NULL",
            "",
        )
    })
}

/// Who fills a watched table in the background (after `_watch`, in `doppler.watch`).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _watch_workers(relid: pg_sys::Oid, workers: &str, described: &str) -> String {
    watch::set_workers(relid, workers, described)
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _unwatch(relid: pg_sys::Oid) -> bool {
    watch::unwatch(relid)
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _retry_failed(relid: Option<pg_sys::Oid>) -> i64 {
    watch::retry_failed(relid)
}

/// Wakes this database's doppler workers now instead of at their next nap. Returns how many.
#[pg_extern(volatile, parallel_restricted)]
fn wake() -> i32 {
    crate::worker::wake()
}

/// The pid of this database's doppler worker (for doppler.status), whoever asks.
#[pg_extern(stable, parallel_restricted)]
fn _worker_pid() -> Option<i32> {
    crate::worker::worker_pids().into_iter().min()
}
