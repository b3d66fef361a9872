//! Row counts for `doppler.status`: counted as the table's owner (never as a definer, nor as
//! the superuser who happens to read the view), and only for callers who own the table or may
//! SELECT it. A table whose count fails (its owner's policy raises, say) shows NULL counts and a
//! WARNING: it cannot take the view down for everyone.
//!
//! Reading the view never waits for a lock an owner holds, and runs no code of an owner's in the
//! reader's session ([`countable`]): such a table shows NULL counts.
//!
//! `_counts` (0.2.0's view) scans the whole table. `_status` (the view since 0.3.0) scans only
//! tables up to `doppler.status_exact_rows` rows; for larger ones it adds up:
//! * total: the planner's row estimate (`pg_class.reltuples`, over partitions and children);
//! * the rows still to do, exactly, through the pending index (a cost that follows the work
//!   left, not the table);
//! * skipped (no source, no vector): the estimate `null_frac` of the source column × total
//!   (over the whole tree for a partitioned or inheritance parent, where ANALYZE made one);
//! * stale (a vector of another model): 0 once a claim's scan has found none for the model tag
//!   (doppler.watched.stale_scan), else counted, which scans during a re-embed only;
//! * done: the rest.
//!
//! Nothing is kept in counters, so nothing drifts after a crash: every figure is read from the
//! table and its statistics when the view is read.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::errors::{in_subtransaction, SpiOrRaise};
use crate::gucs;
use crate::privileged::{acts_as, as_owner, current_user};
use crate::watched::{self, Watched};

/// The watch of a table whose counts the caller may see: it owns the table, or may SELECT it
/// with no row-level security in force for it (counted as the owner, the counts would include
/// rows its policies hide).
fn visible_watch(relid: pg_sys::Oid) -> Option<Watched> {
    let w = watched::load(relid)?;
    let visible = acts_as(current_user(), w.owner)
        || Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.has_table_privilege($1::pg_catalog.oid, 'SELECT')
                    AND NOT pg_catalog.row_security_active($1::pg_catalog.oid)",
            &[relid.into()],
        )
        .ok()
        .flatten()
            == Some(true);
    visible.then_some(w)
}

/// Whether the counts of `w` can be read now without waiting and without running code of its
/// owner's in this session (whatever such code changed, advisory locks, settings, would stay with
/// the reader): the table, its partitions or children and their indexes are locked without
/// waiting (a lock someone holds makes the counts unknown for now, not the view wait); every
/// column the counts read is of a type doppler compares without calling anything
/// (`Watched::misfit`); and, unless this session is the owner's own, they are all plain tables
/// with no row-level security forced on the owner (its policies would run) and no index,
/// constraint or statistics object over the owner's functions or operators (the planner runs
/// index predicates and expressions as it plans).
pub(super) fn countable(w: &Watched) -> bool {
    if w.misfit.is_some() {
        return false;
    }
    // the table and its partitions or children, with their indexes (the planner locks those too);
    // whether all are tables, whether row-level security is forced on the owner, and whether an
    // index (its expression or predicate, which the planner evaluates), a constraint or an
    // extended statistics object of any of them calls a function or operator that is not
    // PostgreSQL's or an extension's (the owner's code)
    let row = Spi::get_three_with_args::<Vec<pg_sys::Oid>, bool, bool>(
        "WITH RECURSIVE tree(oid) AS (
             SELECT $1::pg_catalog.oid
             UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent OPERATOR(pg_catalog.=) tree.oid),
         objects(classid, objid) AS (
             SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, x.indexrelid
             FROM pg_catalog.pg_index x JOIN tree ON x.indrelid OPERATOR(pg_catalog.=) tree.oid
             UNION ALL
             SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, k.oid
             FROM pg_catalog.pg_constraint k JOIN tree ON k.conrelid OPERATOR(pg_catalog.=) tree.oid
             UNION ALL
             SELECT 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass::pg_catalog.oid, e.oid
             FROM pg_catalog.pg_statistic_ext e JOIN tree ON e.stxrelid OPERATOR(pg_catalog.=) tree.oid)
         SELECT (SELECT pg_catalog.array_agg(tree.oid) FROM tree)
                    OPERATOR(pg_catalog.||) (SELECT pg_catalog.array_agg(x.indexrelid) FROM pg_catalog.pg_index x
                                              JOIN tree ON x.indrelid OPERATOR(pg_catalog.=) tree.oid),
                (SELECT c.relrowsecurity AND c.relforcerowsecurity FROM pg_catalog.pg_class c
                 WHERE c.oid OPERATOR(pg_catalog.=) $1)
                OR EXISTS (SELECT FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.oid
                           WHERE c.relkind OPERATOR(pg_catalog.<>) ALL ('{r,p}'::pg_catalog.\"char\"[])),
                EXISTS (SELECT FROM objects o JOIN pg_catalog.pg_depend d
                             ON d.classid OPERATOR(pg_catalog.=) o.classid AND d.objid OPERATOR(pg_catalog.=) o.objid
                        WHERE d.refclassid OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.pg_proc'::pg_catalog.regclass,
                                                                            'pg_catalog.pg_operator'::pg_catalog.regclass]::pg_catalog.oid[])
                          AND d.refobjid OPERATOR(pg_catalog.>=) 16384
                          AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend m
                                          WHERE m.classid OPERATOR(pg_catalog.=) d.refclassid
                                            AND m.objid OPERATOR(pg_catalog.=) d.refobjid
                                            AND m.deptype OPERATOR(pg_catalog.=) 'e'))",
        &[w.relid.into()],
    )
    .unwrap_or((None, None, None));
    let (Some(tree), Some(special), Some(owner_code)) = row else {
        return false;
    };
    // SAFETY: a catalog lookup on the current user, in a transaction
    let own = unsafe { pg_sys::is_member_of_role_nosuper(current_user(), w.owner) };
    if (special || owner_code) && !own {
        return false;
    }
    // (after the privilege checks: a role must not hold locks on tables it may not read)
    tree.into_iter().all(|oid| unsafe {
        // SAFETY: a lock on an oid that may not exist (any more) is harmless
        pg_sys::ConditionalLockRelationOid(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
    })
}

#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _counts(
    relid: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(total, Option<i64>),
        name!(done, Option<i64>),
        name!(skipped, Option<i64>),
        name!(stale, Option<i64>),
        name!(model, String),
    ),
> {
    let Some(w) = visible_watch(relid) else {
        return TableIterator::new(Vec::new());
    };
    let tag = w.spec().tag();
    if !countable(&w) {
        return TableIterator::once((None, None, None, None, tag));
    }
    let (vec, src) = (
        quote_identifier(&w.vector_column),
        quote_identifier(&w.source_column),
    );
    let current = w.current_vector_over("t", "$1");
    let stale = format!(
        "t.{vec} IS NOT NULL AND t.{mc} OPERATOR(pg_catalog.<>) $1",
        mc = quote_identifier(&w.model_column)
    );
    let sql = format!(
        "SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE {current}),
                pg_catalog.count(*) FILTER (WHERE t.{vec} IS NULL AND t.{src} IS NULL),
                pg_catalog.count(*) FILTER (WHERE {stale})
         FROM {table} t",
        table = w.name
    );
    let counted = in_subtransaction(|| {
        as_owner(w.owner, || {
            w.check_name();
            Spi::connect(|c| {
                let row = c.select(&sql, Some(1), &[tag.as_str().into()])?.first();
                Ok::<_, pgrx::spi::Error>([
                    row.get::<i64>(1)?,
                    row.get::<i64>(2)?,
                    row.get::<i64>(3)?,
                    row.get::<i64>(4)?,
                ])
            })
        })
        .or_raise(|| "reading the counts".into())
    });
    let [total, done, skipped, stale] = counted.unwrap_or_else(|(_, msg)| {
        warning!("doppler: could not count the rows of {}: {msg}", w.name);
        [None; 4]
    });
    TableIterator::once((total, done, skipped, stale, tag))
}

/// The figures of `doppler.status` (0.3.0): exact for small tables, else estimated (see above).
#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _status(
    relid: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(total, Option<i64>),
        name!(done, Option<i64>),
        name!(skipped, Option<i64>),
        name!(stale, Option<i64>),
        name!(model, String),
        name!(exact, bool),
    ),
> {
    let Some(w) = visible_watch(relid) else {
        return TableIterator::new(Vec::new());
    };
    let tag = w.spec().tag();
    if !countable(&w) {
        return TableIterator::once((None, None, None, None, tag, false));
    }
    let src = format!("t.{}", quote_identifier(&w.source_column));
    let vec = format!("t.{}", quote_identifier(&w.vector_column));
    // to do: the pending index's rows (its predicate, so the planner takes it), and the rows
    // held back after a failure (in the exact count; else their failure records)
    let pending = w.pending_index_over("t");
    let held = format!("(NOT {} AND {src} IS NOT NULL)", w.unheld_over("t"));
    let stale = format!(
        "{vec} IS NOT NULL AND t.{mc} OPERATOR(pg_catalog.<>) $1 AND {unheld}",
        mc = quote_identifier(&w.model_column),
        unheld = w.unheld_over("t"),
    );
    let skipped = format!("{vec} IS NULL AND {src} IS NULL");
    let table = &w.name;
    let limit = gucs::STATUS_EXACT_ROWS.get();
    let counted = in_subtransaction(|| {
        as_owner(w.owner, || {
            w.check_name();
            // the planner's estimate over the table and every partition or child (-1: a table
            // that was never vacuumed or analyzed has none; an empty one that never had a page
            // counts as 0, so that a table's unused future partitions do not force a count)
            let estimate = Spi::get_one_with_args::<f64>(
                "WITH RECURSIVE tree(oid) AS (
                     SELECT $1::pg_catalog.oid
                     UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent OPERATOR(pg_catalog.=) tree.oid)
                 SELECT CASE WHEN pg_catalog.bool_or(c.reltuples OPERATOR(pg_catalog.<) 0 AND c.relpages OPERATOR(pg_catalog.>) 0)
                             THEN NULL
                             ELSE pg_catalog.sum(GREATEST(c.reltuples, 0)) END::pg_catalog.float8
                 FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.oid
                 WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,m,f}'::pg_catalog.\"char\"[])",
                &[w.relid.into()],
            )?;
            let exact = limit < 0 || estimate.is_none_or(|n| n <= limit as f64);
            let one = |sql: &str| -> Result<i64, pgrx::spi::Error> {
                Ok(Spi::get_one_with_args::<i64>(sql, &[tag.as_str().into()])?.unwrap_or(0))
            };
            if exact {
                w.check_name();
                let row = Spi::connect(|c| {
                    let r = c
                        .select(
                            &format!(
                                "SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE {pending} OR {held}),
                                        pg_catalog.count(*) FILTER (WHERE {skipped}),
                                        pg_catalog.count(*) FILTER (WHERE {stale} AND NOT ({pending}))
                                 FROM {table} t"
                            ),
                            Some(1),
                            &[tag.as_str().into()],
                        )?
                        .first();
                    Ok::<_, pgrx::spi::Error>([
                        r.get::<i64>(1)?.unwrap_or(0),
                        r.get::<i64>(2)?.unwrap_or(0),
                        r.get::<i64>(3)?.unwrap_or(0),
                        r.get::<i64>(4)?.unwrap_or(0),
                    ])
                })?;
                let [total, todo, skipped, stale] = row;
                return Ok([total, total - todo - skipped - stale, skipped, stale, 1]);
            }
            let total = estimate.unwrap_or(0.0).round() as i64;
            // through the pending index (its predicate is repeated, so the planner takes it)
            w.check_name();
            let todo = Spi::get_one::<i64>(&format!(
                "SELECT pg_catalog.count(*) FROM {table} t WHERE {pending}"
            ))?
            .unwrap_or(0)
                + Spi::get_one_with_args::<i64>(
                    "SELECT pg_catalog.count(*) FROM doppler.failures f
                     WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                    &[w.relid.into()],
                )?
                .unwrap_or(0);
            let stale = if w.stale_scan.as_deref() == Some(tag.as_str()) {
                0
            } else {
                w.check_name();
                one(&format!(
                    "SELECT pg_catalog.count(*) FROM {table} t WHERE {stale} AND NOT ({pending})"
                ))?
            };
            let null_frac = Spi::get_one_with_args::<f64>(
                "SELECT s.null_frac::pg_catalog.float8 FROM pg_catalog.pg_stats s
                 JOIN pg_catalog.pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) s.schemaname
                 JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid
                      AND c.relname OPERATOR(pg_catalog.=) s.tablename
                 WHERE c.oid OPERATOR(pg_catalog.=) $1 AND s.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                 ORDER BY s.inherited DESC LIMIT 1",
                &[w.relid.into(), w.source_column.as_str().into()],
            )?
            .unwrap_or(0.0);
            let skipped = ((total as f64) * null_frac).round() as i64;
            let done = (total - todo - skipped - stale).max(0);
            Ok::<_, pgrx::spi::Error>([total.max(todo + stale), done, skipped, stale, 0])
        })
        .or_raise(|| "reading the counts".into())
    });
    match counted {
        Ok([total, done, skipped, stale, exact]) => TableIterator::once((
            Some(total),
            Some(done),
            Some(skipped),
            Some(stale),
            tag,
            exact == 1,
        )),
        Err((_, msg)) => {
            warning!("doppler: could not count the rows of {}: {msg}", w.name);
            TableIterator::once((None, None, None, None, tag, false))
        }
    }
}
