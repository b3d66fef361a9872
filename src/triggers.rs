//! The triggers `doppler.watch(..., mode => ...)` installs on a watched table, and the Rust side
//! of their functions (`_wake_trigger` and `_on_truncate` are PL/pgSQL in sql/finalize.sql; the
//! sync trigger and the stale-clearing trigger are the C functions [`doppler_sync_trigger`] and
//! [`doppler_clear_stale`]).
//!
//! No trigger carries column names: they read them from `doppler.watched` when they fire, which
//! the `doppler_follow_renames` event trigger keeps current (`UPDATE OF` and `WHEN` are stored by
//! attribute number and follow a rename by themselves).
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

use crate::errors::{raise, Code, SpiOrRaise};
use crate::fill::{self, Via};
use crate::privileged::{as_catalog, as_owner, extension_owner};
use crate::watched::{self, installed::Installed, Mode, OnError, Wait, Watched, HELD};
use crate::worker::{wake_pids, worker_pids};

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
    .or_raise(|| format!("could not list the triggers of {table}"));
    for t in existing {
        Spi::run(&format!("DROP TRIGGER {t} ON {table}"))
            .or_raise(|| format!("could not drop trigger {t} on {table}"));
    }
}

/// Installs the triggers of `w.mode`, replacing any earlier ones. Called as the table owner.
pub fn replace(w: &Watched) {
    drop_all(&w.name);
    let table = &w.name;
    let src = quote_identifier(&w.source_column);
    // every mode: TRUNCATE forgets the table's failure records
    let mut ddl = vec![format!(
        "CREATE TRIGGER doppler_truncate AFTER TRUNCATE ON {table}
         FOR EACH STATEMENT EXECUTE FUNCTION doppler._on_truncate()"
    )];
    // the columns whose change makes a row to do: the source, and the key (of a held row)
    let mut columns = vec![src.clone()];
    columns.extend(
        w.key_columns
            .iter()
            .map(quote_identifier)
            .filter(|k| *k != src),
    );
    let columns = columns.join(", ");
    if matches!(w.mode, Mode::Async | Mode::Sync) {
        // a changed source clears the derived columns (and a held row's mark: it is tried
        // afresh); so does a changed key of a held row, whose failure record names the old key
        // (keys compared as the text a failure record holds: no operator is looked up)
        ddl.push(format!(
            "CREATE TRIGGER doppler_clear_stale BEFORE UPDATE OF {columns} ON {table} FOR EACH ROW
             WHEN (OLD.{src} IS DISTINCT FROM NEW.{src}
                   OR (OLD.{mc} OPERATOR(pg_catalog.=) {held}::pg_catalog.text
                       AND {old_key} IS DISTINCT FROM {new_key}))
             EXECUTE FUNCTION doppler._clear_stale({})",
            compat_args(w),
            mc = quote_identifier(&w.model_column),
            held = pgrx::spi::quote_literal(HELD),
            old_key = w.key_over("OLD"),
            new_key = w.key_over("NEW"),
        ));
    }
    if w.mode == Mode::Async {
        ddl.push(format!(
            "CREATE TRIGGER doppler_wake AFTER INSERT OR UPDATE OF {columns} ON {table}
             FOR EACH STATEMENT EXECUTE FUNCTION doppler._wake_trigger()"
        ));
    }
    if w.mode == Mode::Sync {
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
        Spi::run(&sql).or_raise(|| format!("could not create doppler's trigger on {table}"));
    }
}

/// The arguments of the stale-clearing trigger: none, since 0.2.0's function reads its columns
/// from doppler.watched. In a database whose SQL objects are still 0.1.0 (binaries upgraded,
/// `ALTER EXTENSION doppler UPDATE` not run yet), 0.1.0's PL/pgSQL function is the one that runs,
/// and it takes the columns as arguments.
fn compat_args(w: &Watched) -> String {
    if !Installed::get().is_some_and(Installed::stale_trigger_takes_columns) {
        return String::new();
    }
    [
        Some(&w.vector_column),
        Some(&w.model_column),
        w.hash_column.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|c| format!("'{}'", c.replace('\'', "''")))
    .collect::<Vec<_>>()
    .join(", ")
}

thread_local! {
    /// The tables whose held marks doppler itself is clearing (unmark; nested when the owner's
    /// trigger clears another table's): the sync trigger does not fill the rows that those
    /// UPDATEs touch (the worker, or the next statement, does). Only those tables': rows that
    /// the owner's own triggers write to other tables meanwhile are filled as in any statement.
    static UNMARKING: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
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

/// The trigger data of a C trigger function's call; an ERROR when not called as a trigger.
///
/// # Safety
/// `fcinfo` must be the function manager's call info.
unsafe fn trigger_data(fcinfo: pg_sys::FunctionCallInfo, what: &str) -> *mut pg_sys::TriggerData {
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            raise(
                Code::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                format!("{what} was not called by a trigger manager"),
                "",
            );
        }
        ctx as *mut pg_sys::TriggerData
    }
}

/// The stale-clearing trigger (`doppler._clear_stale()`, BEFORE UPDATE OF the source FOR EACH
/// ROW, WHEN the source changed): everything derived from the old image (the vector, its model
/// tag, its dHash) becomes NULL in the new row, so that the worker (or the sync trigger) computes
/// it again. The columns come from `doppler.watched` (read as the extension owner: whoever
/// updates the row may not see the watch), so a renamed column is still cleared. C, not
/// PL/pgSQL: setting a column NULL in the tuple runs none of the table's types' code.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn doppler_clear_stale(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the function manager; the TriggerData is checked first, and the new
    // tuple of a BEFORE ROW UPDATE trigger is a valid heap tuple of the relation's descriptor.
    unsafe {
        let tg = trigger_data(fcinfo, "doppler._clear_stale()");
        let event = (*tg).tg_event;
        let wanted = pg_sys::TRIGGER_EVENT_BEFORE | pg_sys::TRIGGER_EVENT_ROW;
        if event & wanted != wanted
            || event & pg_sys::TRIGGER_EVENT_OPMASK != pg_sys::TRIGGER_EVENT_UPDATE
        {
            raise(
                Code::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "doppler._clear_stale() must be fired BEFORE UPDATE FOR EACH ROW",
                "",
            );
        }
        let rel = (*tg).tg_relation;
        let new = (*tg).tg_newtuple;
        let columns = derived_columns((*rel).rd_id);
        let desc = (*rel).rd_att;
        let mut attnums: Vec<std::ffi::c_int> = columns
            .iter()
            .filter_map(|c| std::ffi::CString::new(c.as_str()).ok())
            .map(|c| pg_sys::SPI_fnumber(desc, c.as_ptr()))
            .filter(|&n| n > 0)
            .collect();
        if attnums.is_empty() {
            return pg_sys::Datum::from(new);
        }
        let mut values = vec![pg_sys::Datum::from(0usize); attnums.len()];
        let mut nulls = vec![true; attnums.len()];
        let cleared = pg_sys::heap_modify_tuple_by_cols(
            new,
            desc,
            attnums.len() as std::ffi::c_int,
            attnums.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        pg_sys::Datum::from(cleared)
    }
}

/// `pg_finfo_` record: version-1 calling convention for [`doppler_clear_stale`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_doppler_clear_stale() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The columns of a watched table that are derived from its image: vector, model tag, hash, PDQ
/// hash and quality. For
/// a partition (the trigger is cloned onto each), those of its nearest watched ancestor.
fn derived_columns(relid: pg_sys::Oid) -> Vec<String> {
    as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<Vec<Option<String>>>(
            "SELECT ARRAY[w.vector_column, w.model_column, w.hash_column,
                          pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_column',
                          pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_quality_column']::pg_catalog.text[]
             FROM (SELECT $1::pg_catalog.oid AS relid, 0::pg_catalog.int8 AS depth
                   UNION ALL
                   SELECT a.relid::pg_catalog.oid, a.depth
                   FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid::pg_catalog.regclass)
                        WITH ORDINALITY a(relid, depth)) up
             JOIN doppler.watched w ON w.relid::pg_catalog.oid OPERATOR(pg_catalog.=) up.relid
             ORDER BY up.depth LIMIT 1",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
    .map(|v| v.into_iter().flatten().collect())
    .unwrap_or_default()
}

/// The event trigger that follows ALTER (`doppler._on_rename()`, ddl_command_end of `ALTER TABLE`
/// and `ALTER TYPE`): renames ([`follow_rename`]) and type changes ([`follow_type_changes`]) of
/// the columns a watch uses. Every role's ALTER fires it; it writes doppler's catalog as the
/// extension owner, over oids and names only.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn doppler_on_rename(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the function manager with its call info
    if let Some((old, new)) = unsafe { renamed_column(fcinfo) } {
        follow_rename(&old, &new);
    }
    follow_type_changes();
    pg_sys::Datum::from(0usize)
}

/// A `RENAME COLUMN` (or `RENAME ATTRIBUTE ... CASCADE` of a typed table's
/// type) of a column a watch uses is written into `doppler.watched`, for the renamed table and
/// its partitions, inheritors and typed tables, in the renaming transaction. The old and new names
/// come from the statement's parse tree ([`renamed_column`]), the table from the event's
/// collected command (its oid): nothing is guessed.
fn follow_rename(old: &str, new: &str) {
    // (the PDQ columns are 0.11.0's)
    let (pdq_set, pdq_cols) = if Installed::get().is_some_and(Installed::has_pdq) {
        (
            "pdq_column = CASE WHEN x.pdq_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.pdq_column END,
                 pdq_quality_column = CASE WHEN x.pdq_quality_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.pdq_quality_column END,",
            ", x.pdq_column, x.pdq_quality_column",
        )
    } else {
        ("", "")
    };
    let sql = format!(
        "WITH RECURSIVE args AS (SELECT $1::pg_catalog.name AS old, $2::pg_catalog.name AS new),
             renamed AS (
                 SELECT DISTINCT c.objid AS relid FROM pg_catalog.pg_event_trigger_ddl_commands() c
                 WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
                   AND c.objsubid OPERATOR(pg_catalog.>) 0),
             tree(relid) AS (
                 SELECT s.relid FROM (
                     SELECT r.relid FROM renamed r
                     UNION  -- the typed tables of a renamed composite type (ALTER TYPE ... CASCADE)
                     SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_class t
                          ON c.reloftype OPERATOR(pg_catalog.=) t.reltype
                     JOIN renamed r ON t.oid OPERATOR(pg_catalog.=) r.relid
                     WHERE t.relkind OPERATOR(pg_catalog.=) 'c') s
                 UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent OPERATOR(pg_catalog.=) tree.relid)
             UPDATE doppler.watched x SET
                 source_column = CASE WHEN x.source_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.source_column END,
                 vector_column = CASE WHEN x.vector_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.vector_column END,
                 hash_column = CASE WHEN x.hash_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.hash_column END,
                 model_column = CASE WHEN x.model_column OPERATOR(pg_catalog.=) a.old THEN a.new ELSE x.model_column END,
                 {pdq_set}
                 key_columns = pg_catalog.array_replace(x.key_columns, a.old, a.new)
             FROM args a
             WHERE x.relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT tree.relid FROM tree))
               AND a.old OPERATOR(pg_catalog.=) ANY (x.key_columns OPERATOR(pg_catalog.||)
                     ARRAY[x.source_column, x.vector_column, x.hash_column, x.model_column{pdq_cols}])"
    );
    as_catalog(extension_owner(), || {
        Spi::run_with_args(&sql, &[old.into(), new.into()])
            .or_raise(|| format!("could not follow the rename of column \"{old}\""))
    });
}

/// The old and new names of a `RENAME COLUMN` or `RENAME ATTRIBUTE`, from the statement's parse
/// tree; None for any other statement.
///
/// # Safety
/// `fcinfo` must be the function manager's call info.
unsafe fn renamed_column(fcinfo: pg_sys::FunctionCallInfo) -> Option<(String, String)> {
    // SAFETY: the context is checked to be an EventTriggerData, and its parse tree to be a
    // RenameStmt, before either is read.
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_EventTriggerData {
            raise(
                Code::ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED,
                "doppler._on_rename() was not called by the event trigger manager",
                "",
            );
        }
        let tree = (*(ctx as *mut pg_sys::EventTriggerData)).parsetree;
        if tree.is_null() || (*tree).type_ != pg_sys::NodeTag::T_RenameStmt {
            return None;
        }
        let stmt = tree as *mut pg_sys::RenameStmt;
        let kind = (*stmt).renameType;
        if kind != pg_sys::ObjectType::OBJECT_COLUMN && kind != pg_sys::ObjectType::OBJECT_ATTRIBUTE
            || (*stmt).subname.is_null()
            || (*stmt).newname.is_null()
        {
            return None;
        }
        let name =
            |p: *mut std::ffi::c_char| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        Some((name((*stmt).subname), name((*stmt).newname)))
    }
}

/// After an ALTER: a watch of a table the statement altered (or of its partitions, inheritors,
/// typed tables) whose column no longer has a type it fills (`ALTER COLUMN ... TYPE`, `ALTER TYPE
/// ... ALTER ATTRIBUTE ... CASCADE`) ends, with a WARNING (`watched::end`): doppler would
/// otherwise read the column as a type it is not, or compare it through the owner's casts in every
/// reader's session. Only the altered tables' watches are looked at: an ALTER of one role's
/// table never touches another's.
fn follow_type_changes() {
    let altered: Vec<pg_sys::Oid> = as_catalog(extension_owner(), || {
        Spi::get_one::<Vec<pg_sys::Oid>>(
            "WITH RECURSIVE altered AS (
                 SELECT DISTINCT c.objid AS relid FROM pg_catalog.pg_event_trigger_ddl_commands() c
                 WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid),
             tree(relid) AS (
                 SELECT s.relid FROM (
                     SELECT a.relid FROM altered a
                     UNION  -- the typed tables of an altered composite type
                     SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_class t
                          ON c.reloftype OPERATOR(pg_catalog.=) t.reltype
                     JOIN altered a ON t.oid OPERATOR(pg_catalog.=) a.relid
                     WHERE t.relkind OPERATOR(pg_catalog.=) 'c') s
                 UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent OPERATOR(pg_catalog.=) tree.relid)
             SELECT pg_catalog.array_agg(w.relid::pg_catalog.oid) FROM doppler.watched w
             WHERE w.relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT tree.relid FROM tree))",
        )
        .or_raise(|| "could not read the tables an ALTER changed".into())
        .unwrap_or_default()
    });
    for relid in altered {
        if let Some(w) = watched::load(relid) {
            if let Some(misfit) = &w.misfit {
                watched::end(&w, &format!("column {misfit}, not a type doppler fills"));
            }
        }
    }
}

/// `pg_finfo_` record: version-1 calling convention for [`doppler_on_rename`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_doppler_on_rename() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
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
    let tg = unsafe { trigger_data(fcinfo, "doppler._sync_trigger()") };
    let (relid, has_rows) = unsafe { ((*(*tg).tg_relation).rd_id, !(*tg).tg_newtable.is_null()) };
    if !has_rows || UNMARKING.with(|u| u.borrow().contains(&relid)) {
        return pg_sys::Datum::from(0usize);
    }
    let Some(w) = watched::load(relid) else {
        return pg_sys::Datum::from(0usize);
    };
    if w.mode != Mode::Sync {
        return pg_sys::Datum::from(0usize);
    }
    // (not rows held back: the batch that marks a failed row writes it, and fires this again)
    let sql = format!(
        "SELECT {} FROM new_rows n WHERE n.{} IS NOT NULL AND n.{} IS NULL AND {}",
        w.key_over("n"),
        quote_identifier(&w.source_column),
        quote_identifier(&w.vector_column),
        w.unheld_over("n")
    );
    let keys: Vec<String> = as_owner(w.owner, || {
        Spi::connect(|c| {
            // SAFETY: registers this trigger's transition tables with this SPI connection.
            unsafe { pg_sys::SPI_register_trigger_data(tg) };
            c.select(&sql, None, &[])?
                .map(|r| r.get::<String>(1).map(|k| k.unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()
        })
        .or_raise(|| format!("could not read the new rows of {}", w.name))
    });
    if keys.is_empty() {
        return pg_sys::Datum::from(0usize);
    }
    // the watch as it is now, the table locked (as the statement that fired this has it), once
    // for every batch of the statement's rows
    if let Some(w) = watched::lock(relid, watched::FOR_WRITING, Wait::Wait) {
        fill_rows(&w, &keys);
    }
    pg_sys::Datum::from(0usize)
}

/// Runs `f` with the sync trigger of table `relid` off for this backend (restored on error too:
/// an ERROR unwinds through this frame).
pub fn without_sync<R>(relid: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNMARKING.with(|u| u.borrow_mut().truncate(self.0));
        }
    }
    let _restore = Restore(UNMARKING.with(|u| {
        let mut u = u.borrow_mut();
        u.push(relid);
        u.len() - 1
    }));
    f()
}

/// `pg_finfo_` record: version-1 calling convention for [`doppler_sync_trigger`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_doppler_sync_trigger() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Fills the rows with these keys, in batches of the table's batch size.
fn fill_rows(w: &Watched, keys: &[String]) -> i64 {
    let raise = w.on_error == OnError::Raise;
    let mut filled = 0;
    // every batch settles its rows (filled, or failed and recorded), so this many batches suffice
    let rounds = keys.len().div_ceil(w.batch_size.max(1) as usize) + 1;
    for _ in 0..rounds {
        let r = fill::run(w, w.batch_size as i64, Via::Sync, Some(keys), raise);
        filled += r.filled;
        if r.claimed == 0 {
            break;
        }
    }
    filled
}
