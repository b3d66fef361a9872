//! External workers' SQL surface (README: More than one machine): register, claim, write,
//! heartbeat, unregister, and the backlog an autoscaler reads. EXECUTE is granted to
//! doppler_worker only; each function checks membership again (and that the worker id is the
//! caller's own). The work is in `workers.rs` and `fill/remote.rs`.

use pgrx::prelude::*;
use pgrx::JsonB;

use crate::errors::{in_subtransaction, raise, Code, SpiOrRaise};
use crate::fill::remote::{self, Reported};
use crate::privileged::{as_catalog, as_owner, extension_owner};
use crate::watched::Watched;
use crate::workers;

/// Registers a worker process: its id and the server's settings it works under (image limits,
/// URL policy, heartbeat interval, lease).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_register(
    host: &str,
    pid: i32,
    provider: &str,
    version: &str,
) -> TableIterator<'static, (name!(id, i64), name!(settings, JsonB))> {
    TableIterator::once(workers::register(host, pid, provider, version))
}

/// A batch of one table for this worker, locked until the transaction ends: each row's number,
/// the table, the model (file, SHA-256, preprocessing, dim), and its source (path or URL) or
/// image bytes.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn worker_claim(
    worker: i64,
    max_rows: default!(i32, 32),
    skip: default!(Vec<pg_sys::Oid>, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(n, i32),
        name!(tbl, String),
        name!(model, JsonB),
        name!(source, Option<String>),
        name!(image, Option<Vec<u8>>),
    ),
> {
    if !(1..=4096).contains(&max_rows) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_rows must be between 1 and 4096, not {max_rows}"),
            "",
        );
    }
    TableIterator::new(workers::claim(worker, max_rows, &skip))
}

/// The worker's results for rows of the batch this transaction holds: vectors (flat, rows ×
/// dim) and dHashes for rows `n`, and failures (`[{"n", "kind", "message", "retry_after_s"}]`).
/// Returns the rows written. (doppler-worker 0.10.0's form; tables with a PDQ column need the
/// other.)
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_write(
    worker: i64,
    sha256: &str,
    n: Vec<i32>,
    vectors: Vec<f32>,
    hashes: default!(Vec<Option<String>>, "'{}'"),
    failures: default!(JsonB, "'[]'"),
) -> i64 {
    write(
        worker,
        sha256,
        (&n, &vectors),
        &hashes,
        (&[], &[]),
        &failures,
    )
}

/// The same with each row's PDQ hash (64 hex digits) and quality (0.11.0).
#[pg_extern(name = "worker_write", volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn worker_write_pdq(
    worker: i64,
    sha256: &str,
    n: Vec<i32>,
    vectors: Vec<f32>,
    hashes: Vec<Option<String>>,
    failures: JsonB,
    pdq: Vec<Option<String>>,
    pdq_quality: Vec<Option<i32>>,
) -> i64 {
    write(
        worker,
        sha256,
        (&n, &vectors),
        &hashes,
        (&pdq, &pdq_quality),
        &failures,
    )
}

fn write(
    worker: i64,
    sha256: &str,
    (n, vectors): (&[i32], &[f32]),
    hashes: &[Option<String>],
    (pdq, pdq_quality): (&[Option<String>], &[Option<i32>]),
    failures: &JsonB,
) -> i64 {
    workers::check_worker(worker);
    workers::release_advisory_locks();
    workers::check_top_level("doppler.worker_write");
    let failed = reported(&failures.0);
    let marks = remote::Answered {
        hashes,
        pdq,
        pdq_quality,
    };
    // (the write runs the owner's triggers: under the same limit as a claim)
    let written = match remote::held_table() {
        Some(relid) => workers::guard::run(relid, || {
            remote::answer(worker, sha256, n, vectors, &marks, &failed)
        }),
        None => remote::answer(worker, sha256, n, vectors, &marks, &failed),
    };
    workers::release_advisory_locks();
    written
}

/// Failures as a worker reports them; 22023 for anything else.
fn reported(v: &serde_json::Value) -> Vec<Reported> {
    let bad = |why: &str| -> ! {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("failures must be a JSON array of {{\"n\", \"kind\", \"message\"[, \"retry_after_s\"]}}: {why}"),
            "",
        )
    };
    let Some(items) = v.as_array() else {
        bad("not an array")
    };
    items
        .iter()
        .map(|f| Reported {
            n: f.get("n")
                .and_then(|n| n.as_i64())
                .and_then(|n| i32::try_from(n).ok())
                .unwrap_or_else(|| bad("an item without an integer n")),
            kind: f
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("internal")
                .to_string(),
            message: f
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .to_string(),
            retry_after_s: f.get("retry_after_s").and_then(|s| s.as_f64()),
        })
        .collect()
}

/// What a worker reports between batches (what it holds, totals, rate, last error).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_heartbeat(worker: i64, state: JsonB) {
    workers::heartbeat(worker, &state.0);
}

/// Forgets a worker that stops cleanly.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_unregister(worker: i64) {
    workers::unregister(worker);
}

/// Rows waiting for external workers, over the tables that allow them: rows to do through each
/// pending index (up to `cap` per table), plus failed rows due for a retry. Counted as each
/// table's owner; a table locked by someone, or whose reading would run its owner's code in
/// this session, is left out. For an autoscaler (KEDA's postgresql trigger).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_backlog(cap: default!(i64, 1_000_000)) -> i64 {
    workers::check_member();
    let cap = cap.max(0);
    workers::external_tables(&[])
        .iter()
        .filter(|w| super::status::countable(w))
        .map(|w| in_subtransaction(|| pending(w, cap)).unwrap_or(0))
        .sum()
}

/// Rows of `w` to do (to `cap`) plus its due retries.
fn pending(w: &Watched, cap: i64) -> i64 {
    let sql = format!(
        "SELECT pg_catalog.count(*) FROM (SELECT FROM {table} t WHERE {pending} LIMIT $1) p",
        table = w.name,
        pending = w.pending_index_over("t"),
    );
    let todo = as_owner(w.owner, || {
        // (as the owner: the worker's role need not see the table's schema)
        w.check_name();
        Spi::get_one_with_args::<i64>(&sql, &[cap.into()])
            .or_raise(|| format!("could not count the rows of {}", w.name))
    })
    .unwrap_or(0);
    let due = as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(*) FROM doppler.failures f
             WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
               AND f.next_attempt OPERATOR(pg_catalog.<=) pg_catalog.now()",
            &[w.relid.into()],
        )
        .or_raise(|| format!("could not count the failures of {}", w.name))
    })
    .unwrap_or(0);
    todo + due
}

/// The SHA-256 of a registered model's file on this server (doppler.register_model records it).
#[pg_extern(volatile, strict, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _model_sha256(name: &str) -> Option<String> {
    workers::file_sha256(&crate::session::spec(Some(name)))
}
