//! The triggers `doppler.watch(..., mode => ...)` installs on a watched table, and the Rust side
//! of their functions (the trigger functions themselves are PL/pgSQL in sql/finalize.sql).
//!
//! * async: `doppler_wake` (AFTER INSERT OR UPDATE, per statement) wakes the worker when the
//!   transaction commits, and `doppler_clear_stale` (BEFORE UPDATE OF the source, per row, when
//!   it changed) sets the vector to NULL so that it is recomputed. No image work in the writer's
//!   transaction.
//! * sync: `doppler_clear_stale` too, and `doppler_sync_insert` / `doppler_sync_update` (AFTER,
//!   per statement, with transition tables) compute the features of the statement's rows in
//!   batches before the statement ends.
//! * manual: none.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{register_xact_callback, PgXactCallbackEvent};

use crate::api::watch::{extension_owner, wake_pids, worker_pids};
use crate::worker::batch::{self, Watched};

const NAMES: [&str; 4] = [
    "doppler_wake",
    "doppler_clear_stale",
    "doppler_sync_insert",
    "doppler_sync_update",
];

/// Drops doppler's triggers from a table (quoted qualified name), those that exist.
pub fn drop_all(table: &str) {
    let existing: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT tgname::text FROM pg_catalog.pg_trigger WHERE tgrelid = $1::regclass AND tgname = ANY($2)",
            None,
            &[table.into(), NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>().into()],
        )?
        .map(|r| r.get::<String>(1).map(|n| n.unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| pgrx::error!("could not list the triggers of {table}: {e}"));
    for t in existing {
        Spi::run(&format!("DROP TRIGGER {t} ON {table}"))
            .unwrap_or_else(|e| pgrx::error!("could not drop trigger {t} on {table}: {e}"));
    }
}

/// Installs the triggers of `w.mode`, replacing any earlier ones.
pub fn replace(w: &Watched) {
    drop_all(&w.name);
    let table = &w.name;
    let src = quote_identifier(&w.source_column);
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut ddl = Vec::new();
    if w.mode == "async" || w.mode == "sync" {
        ddl.push(format!(
            "CREATE TRIGGER doppler_clear_stale BEFORE UPDATE OF {src} ON {table} FOR EACH ROW
             WHEN (OLD.{src} IS DISTINCT FROM NEW.{src}) EXECUTE FUNCTION doppler._clear_stale({})",
            lit(&w.vector_column)
        ));
    }
    if w.mode == "async" {
        ddl.push(format!(
            "CREATE TRIGGER doppler_wake AFTER INSERT OR UPDATE OF {src} ON {table}
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._wake_trigger()"
        ));
    }
    if w.mode == "sync" {
        let args = format!(
            "{}, {}, {}",
            lit(&w.key_expr_over("n")),
            lit(&w.source_column),
            lit(&w.vector_column)
        );
        ddl.push(format!(
            "CREATE TRIGGER doppler_sync_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._sync_trigger({args})"
        ));
        ddl.push(format!(
            "CREATE TRIGGER doppler_sync_update AFTER UPDATE ON {table} REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._sync_trigger({args})"
        ));
    }
    for sql in ddl {
        Spi::run(&sql)
            .unwrap_or_else(|e| pgrx::error!("could not create doppler's trigger on {table}: {e}"));
    }
}

thread_local! {
    static WAKE_PENDING: Cell<bool> = const { Cell::new(false) };
    static PIDS: RefCell<(Vec<i32>, Option<Instant>)> = const { RefCell::new((Vec::new(), None)) };
}

/// Called by the async trigger: wake the worker when this transaction commits (not before: the
/// worker would not see the rows yet). Once per transaction; the worker pids are cached briefly.
#[pg_extern(volatile, parallel_restricted)]
fn _wake_at_commit() {
    if WAKE_PENDING.with(|p| p.replace(true)) {
        return;
    }
    let pids = PIDS.with(|c| {
        let mut c = c.borrow_mut();
        // an empty list is never cached: the worker may be starting right now
        if c.0.is_empty() || c.1.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *c = (worker_pids(), Some(Instant::now()));
        }
        c.0.clone()
    });
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        WAKE_PENDING.with(|p| p.set(false));
        wake_pids(&pids);
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_PENDING.with(|p| p.set(false))
    });
}

/// Called by the sync trigger with the keys of the statement's rows that need features: fills
/// them in batches of the table's batch size, in this transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn _fill_rows(relid: pg_sys::Oid, keys: Vec<String>) -> i64 {
    let Some(w) = batch::load_watched(Some(relid)).into_iter().next() else {
        return 0;
    };
    let owner = extension_owner();
    let raise = w.on_error == "raise";
    let mut filled = 0;
    // every batch settles its rows (filled, or failed and recorded), so this many batches suffice
    let rounds = keys.len().div_ceil(w.batch_size.max(1) as usize) + 1;
    for _ in 0..rounds {
        let r = batch::run_batch(&w, w.batch_size as i64, owner, "sync", Some(&keys), raise);
        filled += r.filled;
        if r.claimed == 0 {
            break;
        }
    }
    filled
}
