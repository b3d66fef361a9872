//! Claiming rows: which rows of a watched table a batch takes, locked for the batch's
//! transaction (`FOR NO KEY UPDATE SKIP LOCKED`: doppler writes no key column, so an open
//! transaction that references a row by foreign key does not hold it back), as the table owner.
//! And `fill`'s wait for the rows other transactions hold ([`wait_for_holders`]).

use doppler_core::Source;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::Claimed;
use crate::errors::{in_subtransaction, raise, Code, SpiOrRaise};
use crate::privileged::{as_catalog, as_owner};
use crate::watched::{self, installed::Installed, SourceKind, Wait, Watched};

/// What a claim does with a row to do that another transaction holds (row-locked).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Locked {
    /// `SKIP LOCKED`: a batch takes the rows nobody holds.
    Skip,
    /// Waits for the holder to end, then takes the row if it is still to do ([`wait_for_holders`]).
    Wait,
    /// Locks nothing: the rows a next claim would take, looked at ([`peek`]).
    Peek,
}

/// Which rows one claim statement looks at.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// These row keys (`$3`): the sync trigger's rows, or rows due for a retry.
    Keys(&'a [String]),
    /// The pending index's rows: no vector (or no hash), a source, not held back.
    Pending,
    /// The rows outside it that are not held back: a vector of another model is found by a scan.
    OutsidePending,
}

/// Claims up to `limit` rows to embed, as the table owner:
/// 1. rows whose failure record is due for a retry, found through doppler.failures' index on
///    `next_attempt` (held rows are out of the pending index: `watched::HELD`);
/// 2. rows without a vector (or without a hash), through the pending index `watch` creates (a
///    partial index over exactly those rows, held rows left out), so the cost follows the batch,
///    not the table;
/// 3. if that leaves room, rows whose vector is from another model: a scan of the table, done
///    until one finds none for this model tag (recorded in doppler.watched.stale_scan, as
///    `catalog_role`; a new model version changes the tag, `watch` clears it).
///
/// With `only` (the sync trigger's rows), one statement over those keys. Due failure records
/// whose row is gone or has nothing left to do are forgotten (as `catalog_role`).
pub fn claim(
    w: &Watched,
    limit: i64,
    only: Option<&[String]>,
    tag: &str,
    catalog_role: pg_sys::Oid,
) -> Vec<Claimed> {
    if let Some(keys) = only {
        return as_owner(w.owner, || {
            select(w, tag, Rows::Keys(keys), limit, Locked::Skip)
        });
    }
    let (rows, no_stale, obsolete) = as_owner(w.owner, || in_phases(w, limit, tag, Locked::Skip));
    if !obsolete.is_empty() {
        as_catalog(catalog_role, || forget_due(w, &obsolete));
    }
    if let Some(tag) = no_stale {
        as_catalog(catalog_role, || {
            Spi::run_with_args(
                "UPDATE doppler.watched SET stale_scan = $2
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[w.relid.into(), tag.as_str().into()],
            )
            .or_raise(|| format!("could not update doppler.watched for {}", w.name))
        });
    }
    rows
}

/// The three phases of [`claim`], as the table owner. Returns the rows, the model tag to record
/// when the scan found no outdated row, and the keys of due records to forget.
fn in_phases(
    w: &Watched,
    limit: i64,
    tag: &str,
    locked: Locked,
) -> (Vec<Claimed>, Option<String>, Vec<String>) {
    let mut rows = Vec::new();
    // (each phase's rows are locked by this transaction, which SKIP LOCKED does not skip: a row
    // that two phases find is kept once)
    let add = |rows: &mut Vec<Claimed>, more: Vec<Claimed>| {
        for c in more {
            if !rows
                .iter()
                .any(|r: &Claimed| r.ctid == c.ctid && r.tableoid == c.tableoid)
            {
                rows.push(c);
            }
        }
    };
    let left = |rows: &Vec<Claimed>| limit - rows.len() as i64;
    let due = due_retries(w, limit);
    let mut obsolete = Vec::new();
    if !due.is_empty() {
        let (more, by) = select_due(w, tag, &due, limit, locked);
        add(&mut rows, more);
        if rows.len() < due.len() {
            obsolete = without_work(&by, &due, tag);
        }
    }
    if left(&rows) > 0 {
        let more = select(w, tag, Rows::Pending, left(&rows), locked);
        add(&mut rows, more);
    }
    let mut no_stale = None;
    if left(&rows) > 0 && w.stale_scan.as_deref() != Some(tag) {
        let more = select(w, tag, Rows::OutsidePending, left(&rows), locked);
        let settles = Installed::get().is_some_and(Installed::has_stale_scan);
        if more.is_empty() && settles && !any_stale(w, tag) {
            no_stale = Some(tag.to_string());
        }
        add(&mut rows, more);
    }
    (rows, no_stale, obsolete)
}

/// The rows of due failure records. Keys are cast to the key's type, so that its index serves
/// them; a record whose key no longer fits it (the key's type changed) must not stop every claim:
/// then the keys are compared as text, a scan, until those records settle. Returns the rows and
/// the watch the keys were compared by. Other errors are raised.
fn select_due(
    w: &Watched,
    tag: &str,
    due: &[String],
    limit: i64,
    locked: Locked,
) -> (Vec<Claimed>, Watched) {
    match in_subtransaction(|| select(w, tag, Rows::Keys(due), limit, locked)) {
        Ok(rows) => (rows, w.clone()),
        // (a lock wait's error is not the key's: raised as it came)
        Err((code, message)) if retried(code) || code == Code::ERRCODE_LOCK_NOT_AVAILABLE => {
            raise(code, message, "")
        }
        Err(_) => {
            let text = Watched {
                key_type: None,
                ..w.clone()
            };
            let rows = select(&text, tag, Rows::Keys(due), limit, locked);
            (rows, text)
        }
    }
}

/// The claim statement: up to `$2` rows of `rows` with work to do for `tag` and a source, not
/// held back by a failure record (a record holds its row back only while the source is the one
/// that failed), locked. `$1` is the table's oid, `$3` the keys of [`Rows::Keys`].
fn claim_sql(w: &Watched, tag: &str, rows: Rows, locked: Locked) -> String {
    let key = w.key_over("t");
    // (the rows' narrowing first, as the pending index's predicate, so that the planner proves
    // it; a key list last)
    let (narrow, keys) = match (rows, &w.key_type) {
        // one-column key: compared in its own type, so that its index serves
        (Rows::Keys(_), Some(ty)) => (
            String::new(),
            format!(
                " AND {} = ANY ($3::pg_catalog.text[]::{ty}[])",
                w.col("t", &w.key_columns[0])
            ),
        ),
        (Rows::Keys(_), None) => (
            String::new(),
            format!(" AND {key} = ANY ($3::pg_catalog.text[])"),
        ),
        (Rows::Pending, _) => (format!("{} AND ", w.pending_index_over("t")), String::new()),
        (Rows::OutsidePending, _) => (
            format!(
                "NOT {} AND {} AND ",
                w.pending_over("t"),
                w.unheld_over("t")
            ),
            String::new(),
        ),
    };
    let hash = match &w.hash_column {
        Some(h) => format!("{}::pg_catalog.text", w.col("t", h)),
        None => "NULL::pg_catalog.text".into(),
    };
    format!(
        "SELECT t.ctid::pg_catalog.text, t.tableoid, {key}, {src}, {shown}, {hash}, {current}
         FROM {table} t
         WHERE {narrow}{todo} AND {src} IS NOT NULL{keys}
           AND NOT EXISTS (SELECT FROM doppler.failures f
                           WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                             AND f.row_key OPERATOR(pg_catalog.=) {key}
                             AND f.source IS NOT DISTINCT FROM {shown}
                             AND (f.next_attempt IS NULL OR f.next_attempt OPERATOR(pg_catalog.>) pg_catalog.now()))
         LIMIT $2{lock}",
        table = w.name,
        src = w.col("t", &w.source_column),
        shown = w.shown_over("t"),
        current = w.current_vector_over("t", &pgrx::spi::quote_literal(tag)),
        todo = w.todo_over("t", tag),
        lock = match locked {
            Locked::Skip => "\n         FOR NO KEY UPDATE OF t SKIP LOCKED",
            Locked::Wait => "\n         FOR NO KEY UPDATE OF t",
            Locked::Peek => "",
        },
    )
}

/// The pending rows a next claim would take (up to `limit`, this batch's own among them), for
/// the lookahead: the claim statement of the pending index, locking nothing. As the table owner.
pub fn peek(w: &Watched, tag: &str, limit: i64) -> Vec<Claimed> {
    as_owner(w.owner, || {
        select(w, tag, Rows::Pending, limit, Locked::Peek)
    })
}

/// Runs one claim statement ([`claim_sql`]), as the table owner.
fn select(w: &Watched, tag: &str, rows: Rows, limit: i64, locked: Locked) -> Vec<Claimed> {
    let sql = claim_sql(w, tag, rows, locked);
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![w.relid.into(), limit.into()];
    if let Rows::Keys(keys) = rows {
        args.push(keys.to_vec().into());
    }
    let bytes = w.source_kind == SourceKind::Bytea;
    w.check_name();
    Spi::connect_mut(|client: &mut SpiClient| {
        let mut out = Vec::new();
        for r in client.update(&sql, None, &args)? {
            let source = if bytes {
                Source::Bytes(r.get::<Vec<u8>>(4)?.unwrap_or_default())
            } else {
                Source::Path(r.get::<String>(4)?.unwrap_or_default())
            };
            out.push(Claimed {
                ctid: r.get(1)?.unwrap_or_default(),
                tableoid: r.get(2)?.unwrap_or(pg_sys::InvalidOid),
                key: r.get(3)?.unwrap_or_default(),
                source,
                shown: r.get(5)?.unwrap_or_default(),
                hash: r.get(6)?,
                has_vector: r.get(7)?.unwrap_or(false),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .or_raise(|| format!("could not claim rows of {}", w.name))
}

/// The keys of rows whose failure record is due (`next_attempt` passed), oldest first: through
/// the index on (relid, next_attempt), so given-up and waiting rows cost nothing. As the table
/// owner, who reads the records of its own tables (row-level security).
fn due_retries(w: &Watched, limit: i64) -> Vec<String> {
    Spi::connect(|c| {
        c.select(
            "SELECT f.row_key FROM doppler.failures f
             WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
               AND f.next_attempt OPERATOR(pg_catalog.<=) pg_catalog.now()
             ORDER BY f.next_attempt LIMIT $2",
            None,
            &[w.relid.into(), limit.into()],
        )?
        .map(|r| r.get::<String>(1).map(|k| k.unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()
    })
    .or_raise(|| format!("could not read the failures of {}", w.name))
}

/// Of these keys, those of no row with work to do (deleted, filled by hand, source set NULL):
/// a due failure record of such a key would come up in every claim. Rows locked by another
/// claim still count as rows with work. As the table owner.
fn without_work(w: &Watched, keys: &[String], tag: &str) -> Vec<String> {
    let matches = match &w.key_type {
        Some(ty) => format!("{} = k.k::{ty}", w.col("t", &w.key_columns[0])),
        None => format!("{} = k.k", w.key_over("t")),
    };
    let sql = format!(
        "SELECT k.k FROM pg_catalog.unnest($1::pg_catalog.text[]) AS k(k)
         WHERE NOT EXISTS (SELECT FROM {table} t WHERE {matches} AND {todo} AND {src} IS NOT NULL)",
        table = w.name,
        todo = w.todo_over("t", tag),
        src = w.col("t", &w.source_column),
    );
    w.check_name();
    Spi::connect(|c| {
        c.select(&sql, None, &[keys.to_vec().into()])?
            .map(|r| r.get::<String>(1).map(|k| k.unwrap_or_default()))
            .collect::<Result<Vec<_>, _>>()
    })
    .or_raise(|| format!("could not look up rows of {}", w.name))
}

/// Deletes the due failure records of these keys (not one a concurrent batch has just written
/// again, for a new row with the same key). As the catalog role.
fn forget_due(w: &Watched, keys: &[String]) {
    Spi::run_with_args(
        "DELETE FROM doppler.failures
         WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
           AND row_key OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[])
           AND next_attempt OPERATOR(pg_catalog.<=) pg_catalog.now()",
        &[w.relid.into(), keys.to_vec().into()],
    )
    .or_raise(|| format!("could not clear failures of {}", w.name));
}

/// Whether any row outside the pending index has a vector from another model (failed or locked
/// rows included, held rows not: only a table without any may skip the scan). As the table
/// owner.
fn any_stale(w: &Watched, tag: &str) -> bool {
    let sql = format!(
        "SELECT EXISTS (SELECT FROM {table} t
                        WHERE NOT {pending} AND {unheld} AND {src} IS NOT NULL AND NOT {current})",
        table = w.name,
        pending = w.pending_over("t"),
        unheld = w.unheld_over("t"),
        src = w.col("t", &w.source_column),
        current = w.current_vector_over("t", &pgrx::spi::quote_literal(tag)),
    );
    w.check_name();
    Spi::get_one::<bool>(&sql)
        .or_raise(|| format!("could not scan {}", w.name))
        .unwrap_or(true)
}

/// For `fill`, once its claims find nothing: waits until the transactions that hold rows of
/// `relid` with work to do end (the worker's batch, another fill, a sync statement, or any
/// transaction that locked them), one row at a time, then says whether a row is left that a
/// claim can take. The claim's own statements without SKIP LOCKED, for one row, as the table
/// owner, with the table in ROW SHARE mode. Batches wait for no row, so a batch and this wait
/// never deadlock. The wait keeps the locks of rows it found filled meanwhile until fill commits:
/// a deadlock with another transaction over those (or a serialization failure, under REPEATABLE
/// READ) rolls the wait back and says true, and fill tries again in a new transaction. A cancel
/// or `lock_timeout` ends the wait with its error.
pub fn wait_for_holders(relid: pg_sys::Oid) -> bool {
    let Some(w) = &watched::lock(relid, watched::FOR_ROW_LOCKS, Wait::Wait) else {
        return false;
    };
    let tag = w.spec().tag();
    match in_subtransaction(|| as_owner(w.owner, || in_phases(w, 1, &tag, Locked::Wait))) {
        Ok((rows, _, _)) => !rows.is_empty(),
        Err((code, _)) if retried(code) => true,
        Err((code, message)) => raise(code, message, ""),
    }
}

/// Errors of a lock wait that end when the transaction does: deadlock and serialization
/// failures. Never a reason to read a row another way.
fn retried(code: Code) -> bool {
    code == Code::ERRCODE_T_R_DEADLOCK_DETECTED || code == Code::ERRCODE_T_R_SERIALIZATION_FAILURE
}
