//! One pass of the worker over its database's watched tables, fair between their owners.
//!
//! Owners take turns, one batch each per round (the order rotates from pass to pass, across the
//! worker's restarts; owners whose tables ended workers lately go last), and an owner's batches
//! in one pass stop once they have taken `doppler.worker_batch_timeout` in all: many tables, high
//! priorities or slow batches of one owner cannot take another owner's turn. `priority` orders
//! an owner's own tables. A table whose batch overran the timeout is backed off (left alone for
//! the timeout, doubled with every overrun in a row, at most an hour; `doppler.status` shows it),
//! and a batch that ends in time clears its overruns.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::timeout::{self, TakenOver};
use super::{in_transaction, report, stopping};
use crate::fill::{self, BatchReport, Via};
use crate::watched::{self, installed::Installed, Wait, Watched};

/// What a worker keeps from one pass to the next.
pub struct Passes {
    /// Rows filled and failed per table since the worker started (shown in pg_stat_activity).
    totals: HashMap<pg_sys::Oid, (i64, i64)>,
    /// This worker's slot in doppler.worker_databases.
    slot: usize,
    /// What the worker took over from the one before it in its slot.
    taken_over: TakenOver,
}

impl Passes {
    pub fn new(slot: usize) -> Passes {
        Passes {
            totals: HashMap::new(),
            slot,
            taken_over: timeout::take_over(slot),
        }
    }
}

/// One pass; true when any row was claimed.
pub fn one_pass(state: &mut Passes) -> bool {
    let slot = state.slot;
    let tables = in_transaction("reading doppler.watched", || {
        let installed = Installed::get()?;
        super::check_version(installed);
        // (tables only external workers fill are not this worker's)
        Some(
            watched::load_all()
                .into_iter()
                .filter(|w| w.workers.server())
                .collect::<Vec<_>>(),
        )
    })
    .flatten();
    let Some(tables) = tables else {
        report("doppler: waiting for CREATE EXTENSION doppler");
        return false;
    };
    // the table that ended the worker before this one is backed off, and left out of this pass
    let ended_in = state.taken_over.table.take();
    if let Some(w) = ended_in.and_then(|relid| tables.iter().find(|w| w.relid == relid)) {
        log!(
            "doppler worker: the previous worker ended in a batch of {} (doppler.worker_batch_timeout); it is backed off",
            w.name
        );
        note_overrun(w);
    }
    let passes = timeout::count_pass(slot) as usize;
    let mut queues = owners_in_turn(&tables, passes, &state.taken_over.demoted, ended_in);
    let budget = timeout::limit();
    let mut spent: Vec<Duration> = vec![Duration::ZERO; queues.len()];
    let mut claimed = false;
    // rounds: each owner with a table left and time left in its budget fills one batch
    while queues.iter().any(|q| !q.is_empty()) {
        for (o, queue) in queues.iter_mut().enumerate() {
            if stopping() {
                return claimed;
            }
            if budget.is_some_and(|b| spent[o] >= b) {
                queue.clear();
            }
            let Some(listed) = queue.pop() else {
                continue;
            };
            let t0 = Instant::now();
            let r = batch(slot, listed);
            let took = t0.elapsed();
            spent[o] += took;
            if budget.is_some_and(|b| took >= b) {
                note_overrun(listed);
            } else if listed.overruns > 0 && r.is_some_and(|r| r.claimed > 0) {
                clear_overruns(listed);
            }
            if let Some(r) = r.filter(|r| r.claimed > 0) {
                claimed = true;
                show(state, listed, &r);
            }
        }
    }
    report("doppler: idle");
    claimed
}

/// The tables to fill this pass, a queue per owner (the next table last, for `pop`), owners in
/// this pass's order: by oid, rotated by the passes made, then the owners whose tables ended
/// workers lately, most recent last. Backed-off tables, and `skip`, are left out.
fn owners_in_turn<'a>(
    tables: &'a [Watched],
    passes: usize,
    demoted: &[pg_sys::Oid],
    skip: Option<pg_sys::Oid>,
) -> Vec<Vec<&'a Watched>> {
    let mut owners: Vec<pg_sys::Oid> = Vec::new();
    for w in tables {
        if !owners.contains(&w.owner) {
            owners.push(w.owner);
        }
    }
    owners.sort_by_key(|o| o.to_u32());
    if !owners.is_empty() {
        let n = passes % owners.len();
        owners.rotate_left(n);
    }
    for d in demoted {
        if let Some(i) = owners.iter().position(|o| o == d) {
            let o = owners.remove(i);
            owners.push(o);
        }
    }
    owners
        .into_iter()
        .map(|o| {
            // (load_all lists them by priority, highest first)
            let mut q: Vec<&Watched> = tables
                .iter()
                .filter(|w| w.owner == o && !w.backed_off && Some(w.relid) != skip)
                .collect();
            q.reverse();
            q
        })
        .collect()
}

/// One batch of a table, in a transaction of its own, under the batch timeout. None when it
/// failed (the error is in the log) or the table was skipped (locked by someone, unwatched).
fn batch(slot: usize, listed: &Watched) -> Option<BatchReport> {
    report(&format!("doppler: filling {}", listed.name));
    let run = || {
        in_transaction(&format!("filling {}", listed.name), || {
            // the watch as it is now, the table locked (skipped while someone holds it)
            let w = watched::lock(listed.relid, watched::FOR_WRITING, Wait::Skip)?;
            Some(fill::run(&w, w.batch_size as i64, Via::Worker, None, false))
        })
    };
    timeout::run(slot, listed.relid, listed.owner, run).flatten()
}

fn show(state: &mut Passes, w: &Watched, r: &BatchReport) {
    let t = state.totals.entry(w.relid).or_default();
    t.0 += r.filled;
    t.1 += r.failed;
    report(&format!(
        "doppler: {}.{} +{} ({} filled, {} failed since start)",
        w.name, w.vector_column, r.filled, t.0, t.1
    ));
    debug1!(
        "doppler: {}: {} filled, {} failed in {:.2}s",
        w.name,
        r.filled,
        r.failed,
        r.seconds
    );
}

/// A batch of `w` overran the timeout: back it off. Its row of doppler.watched is skipped when
/// someone holds it (the owner's watch in an open transaction): the worker never waits on a lock
/// an owner holds.
fn note_overrun(w: &Watched) {
    let Some(limit) = timeout::limit() else {
        return;
    };
    warning!(
        "doppler worker: a batch of {} overran doppler.worker_batch_timeout; the table is backed off",
        w.name
    );
    in_transaction("backing off a table", || {
        if !Installed::get().is_some_and(Installed::has_overruns) {
            return;
        }
        let _ = Spi::run_with_args(
            "UPDATE doppler.watched x
                SET overruns = x.overruns OPERATOR(pg_catalog.+) 1,
                    backoff_until = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs =>
                        LEAST($2::pg_catalog.float8 OPERATOR(pg_catalog.*)
                                         pg_catalog.power(2::pg_catalog.float8, x.overruns::pg_catalog.float8),
                                         3600::pg_catalog.float8))
              WHERE x.relid OPERATOR(pg_catalog.=) ANY (ARRAY(
                    SELECT y.relid FROM doppler.watched y
                    WHERE y.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                    FOR NO KEY UPDATE SKIP LOCKED))",
            &[w.relid.into(), limit.as_secs_f64().into()],
        );
    });
}

/// A batch of `w` ended in time after overruns: it is not backed off any more.
fn clear_overruns(w: &Watched) {
    in_transaction("clearing a table's overruns", || {
        if !Installed::get().is_some_and(Installed::has_overruns) {
            return;
        }
        let _ = Spi::run_with_args(
            "UPDATE doppler.watched x SET overruns = 0, backoff_until = NULL
              WHERE x.relid OPERATOR(pg_catalog.=) ANY (ARRAY(
                    SELECT y.relid FROM doppler.watched y
                    WHERE y.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                    FOR NO KEY UPDATE SKIP LOCKED))",
            &[w.relid.into()],
        );
    });
}

/// Deletes doppler.batches' rows older than a day, but not rows someone holds (an owner's open
/// transaction that unwatched or dropped its table): the worker never waits on an owner's lock.
pub fn prune() {
    in_transaction("pruning doppler.batches", || {
        if Installed::get().is_none() {
            return;
        }
        let _ = Spi::run("SET LOCAL lock_timeout = '1s'");
        let _ = Spi::run(
            "DELETE FROM doppler.batches b
              WHERE b.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
                    SELECT x.ctid FROM doppler.batches x
                    WHERE x.finished_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::pg_catalog.interval)
                    FOR UPDATE SKIP LOCKED))",
        );
    });
}
