//! The triggers `doppler.watch(..., mode => ...)` installs on a watched table, and the Rust side
//! of their functions (`_clear_stale` and `_wake_trigger` are PL/pgSQL in sql/finalize.sql; the
//! sync trigger is the C function [`doppler_sync_trigger`]).
//!
//! * async: `doppler_wake` (AFTER INSERT OR UPDATE, per statement) wakes the worker when the
//!   transaction commits, and `doppler_clear_stale` (BEFORE UPDATE OF the source, per row, when
//!   it changed) sets the vector to NULL so that it is recomputed. No image work in the writer's
//!   transaction.
//! * sync: `doppler_clear_stale` too, and `doppler_sync_insert` / `doppler_sync_update` (AFTER,
//!   per statement, with transition tables) compute the features of the statement's rows in
//!   batches before the statement ends.
//! * manual: none of those.
//! * every mode: `doppler_truncate` (AFTER TRUNCATE) forgets the table's failure records.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{register_xact_callback, PgXactCallbackEvent};

use crate::api::watch::{wake_pids, worker_pids};
use crate::privileged::{as_owner, extension_owner};
use crate::worker::batch::{self, Via, Watched};

const NAMES: [&str; 5] = [
    "doppler_truncate",
    "doppler_wake",
    "doppler_clear_stale",
    "doppler_sync_insert",
    "doppler_sync_update",
];

/// Drops doppler's triggers from a table (quoted qualified name), those that exist. Called as
/// the table owner.
pub fn drop_all(table: &str) {
    let existing: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT tgname::pg_catalog.text FROM pg_catalog.pg_trigger
             WHERE tgrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass
               AND tgname OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.name[])",
            None,
            &[
                table.into(),
                NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .into(),
            ],
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

/// Installs the triggers of `w.mode`, replacing any earlier ones. Called as the table owner.
pub fn replace(w: &Watched) {
    drop_all(&w.name);
    let table = &w.name;
    let src = quote_identifier(&w.source_column);
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    // every mode: TRUNCATE forgets the table's failure records
    let mut ddl = vec![format!(
        "CREATE TRIGGER doppler_truncate AFTER TRUNCATE ON {table}
         FOR EACH STATEMENT EXECUTE FUNCTION doppler._on_truncate()"
    )];
    if w.mode == "async" || w.mode == "sync" {
        ddl.push(format!(
            "CREATE TRIGGER doppler_clear_stale BEFORE UPDATE OF {src} ON {table} FOR EACH ROW
             WHEN (OLD.{src} IS DISTINCT FROM NEW.{src}) EXECUTE FUNCTION doppler._clear_stale({})",
            // everything derived from the old image: its vector, the model tag, its dHash
            [
                Some(&w.vector_column),
                Some(&w.model_column),
                w.hash_column.as_ref()
            ]
            .into_iter()
            .flatten()
            .map(|c| lit(c))
            .collect::<Vec<_>>()
            .join(", ")
        ));
    }
    if w.mode == "async" {
        ddl.push(format!(
            "CREATE TRIGGER doppler_wake AFTER INSERT OR UPDATE OF {src} ON {table}
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._wake_trigger()"
        ));
    }
    if w.mode == "sync" {
        ddl.push(format!(
            "CREATE TRIGGER doppler_sync_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._sync_trigger()"
        ));
        ddl.push(format!(
            "CREATE TRIGGER doppler_sync_update AFTER UPDATE ON {table} REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._sync_trigger()"
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

/// The sync trigger (`doppler._sync_trigger()`, AFTER INSERT / UPDATE FOR EACH STATEMENT with
/// the transition table `new_rows`): a C trigger function, so that no SQL-callable entry point
/// fills another owner's rows. Reads the keys of the statement's rows that need features as
/// the table owner, then fills them in batches of the table's batch size, in this transaction.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn doppler_sync_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager calls this with a valid fcinfo; `context` is a TriggerData
    // when called as a trigger, which is checked first.
    let tg = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "doppler._sync_trigger() was not called by a trigger manager"
            );
        }
        ctx as *mut pg_sys::TriggerData
    };
    let (relid, has_rows) = unsafe { ((*(*tg).tg_relation).rd_id, !(*tg).tg_newtable.is_null()) };
    if !has_rows {
        return pg_sys::Datum::from(0usize);
    }
    let Some(w) = batch::load_watched(Some(relid)).into_iter().next() else {
        return pg_sys::Datum::from(0usize);
    };
    if w.mode != "sync" {
        return pg_sys::Datum::from(0usize);
    }
    let sql = format!(
        "SELECT {} FROM new_rows n WHERE n.{} IS NOT NULL AND n.{} IS NULL",
        w.key_expr_over("n"),
        quote_identifier(&w.source_column),
        quote_identifier(&w.vector_column)
    );
    let keys: Vec<String> = as_owner(w.owner, || {
        Spi::connect(|c| {
            // SAFETY: registers this trigger's transition tables with this SPI connection.
            unsafe { pg_sys::SPI_register_trigger_data(tg) };
            c.select(&sql, None, &[])?
                .map(|r| r.get::<String>(1).map(|k| k.unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_else(|e| pgrx::error!("doppler: could not read the new rows of {}: {e}", w.name))
    });
    if !keys.is_empty() {
        fill_rows(&w, &keys);
    }
    pg_sys::Datum::from(0usize)
}

/// `pg_finfo_` record: version-1 calling convention for [`doppler_sync_trigger`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_doppler_sync_trigger() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Fills the rows with these keys, in batches of the table's batch size.
fn fill_rows(w: &Watched, keys: &[String]) -> i64 {
    let owner = extension_owner();
    let raise = w.on_error == "raise";
    let mut filled = 0;
    // every batch settles its rows (filled, or failed and recorded), so this many batches suffice
    let rounds = keys.len().div_ceil(w.batch_size.max(1) as usize) + 1;
    for _ in 0..rounds {
        let r = batch::run_batch(
            w.relid,
            w.batch_size as i64,
            owner,
            Via::Sync,
            Some(keys),
            raise,
        );
        filled += r.filled;
        if r.claimed == 0 {
            break;
        }
    }
    filled
}
