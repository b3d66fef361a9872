//! External workers' batches (`doppler-worker`; README: More than one machine): the fill engine
//! split over two calls of one transaction, with phase 2 (read, decode, model) on the worker's
//! host.
//!
//! * [`claim`]: a batch of one table, taken the way the server's worker takes one (`claim.rs`:
//!   `FOR NO KEY UPDATE SKIP LOCKED`, as the table owner), kept in this backend for the
//!   transaction. The row locks are the lease: while the worker's transaction is open nobody else
//!   claims or writes those rows, and when it ends (commit, rollback, the connection lost, the
//!   worker killed, `idle_in_transaction_session_timeout` set to `doppler.worker_lease` by the
//!   claim) every row not written is free for the next claim, at once.
//! * [`answer`]: the worker's vectors, hashes and failures, written into exactly the rows this
//!   transaction holds (`write.rs`, as the owner; `failures.rs`), by their number in the claim; a
//!   number it does not hold, a second answer for a row, a vector of the wrong length, a hash that
//!   is not a dHash, a model file of another SHA-256: refused.
//!
//! The worker sees each row's source (a path or URL, or the bytes of a bytea source) and a row
//! number, nothing else of the table: not its key, not its other columns.

use std::cell::RefCell;
use std::time::Instant;

use doppler_core::{pdq, Error, ErrorKind, Source};
use pgrx::prelude::*;

use super::{claim, failures, settle, BatchReport, Claimed, Outcome, Phases, Via};
use crate::errors::{raise, Code};
use crate::gucs;
use crate::watched::{self, Wait, Watched};

/// The batch this transaction holds for an external worker.
struct Held {
    /// The transaction that claimed the rows (their locks end with it).
    xid: pg_sys::TransactionId,
    worker: i64,
    relid: pg_sys::Oid,
    tag: String,
    sha256: String,
    dim: usize,
    claimed: Vec<Claimed>,
    answered: Vec<bool>,
    since: Instant,
    claim: std::time::Duration,
}

impl Held {
    /// Whether it was claimed by this transaction (its rows still locked).
    fn in_this_transaction(&self) -> bool {
        self.xid == current_xid() && self.xid != pg_sys::InvalidTransactionId
    }
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// A claimed batch, as the worker receives it.
pub struct Batch {
    /// The rows' sources (`Source::Path`: a server path or URL; `Source::Bytes`: the image).
    pub sources: Vec<Source>,
}

/// The fingerprints of a worker's answer, one per answered row (or none at all): dHashes, PDQ
/// hashes (64 hex digits) and their qualities.
pub struct Answered<'a> {
    pub hashes: &'a [Option<String>],
    pub pdq: &'a [Option<String>],
    pub pdq_quality: &'a [Option<i32>],
}

/// One row's failure, as a worker reports it.
pub struct Reported {
    /// The row's number in the claim (1-based).
    pub n: i32,
    /// doppler-core's name of the error's kind (`decode`, `not_found`, ...).
    pub kind: String,
    pub message: String,
    /// A web server's Retry-After, in seconds.
    pub retry_after_s: Option<f64>,
}

/// The table of the batch this transaction holds, if any.
pub fn held_table() -> Option<pg_sys::Oid> {
    HELD.with(|h| {
        h.borrow()
            .as_ref()
            .filter(|h| h.in_this_transaction())
            .map(|h| h.relid)
    })
}

/// Raises 55000 when this transaction holds a batch already (one batch per transaction: its
/// rows are answered, then the transaction ends).
pub fn check_none_held() {
    let held_here = HELD.with(|h| h.borrow().as_ref().is_some_and(Held::in_this_transaction));
    if held_here {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "this transaction holds a batch of doppler rows already",
            "Answer it with doppler.worker_write() and commit (or roll back) before the next claim.",
        );
    }
}

/// The top-level transaction's id, if it has one (row locks give it one).
fn current_xid() -> pg_sys::TransactionId {
    // SAFETY: in a transaction
    unsafe { pg_sys::GetTopTransactionIdIfAny() }
}

/// Claims up to `limit` rows of `w` (locked by the caller for this transaction) for external
/// worker `worker`, whose model file must have SHA-256 `sha256`. None when the table has no row
/// to take; an empty batch when every row taken was refused (recorded as failures). Raises 55000
/// when this transaction holds a batch already.
pub fn claim(w: &Watched, worker: i64, limit: i64, sha256: &str, dim: usize) -> Option<Batch> {
    check_none_held();
    let t0 = Instant::now();
    let tag = w.spec().tag();
    let limit = limit.clamp(1, w.batch_size.max(1) as i64);
    let claimed = claim::claim(w, limit, None, &tag, Via::External.catalog_role());
    if claimed.is_empty() {
        return None;
    }
    // rows whose source the owner may not read (a URL without doppler_url_reader, a path without
    // pg_read_server_files, a relative path) are failures now, as in the server's own batches:
    // never handed to a worker
    let mut refused = Vec::new();
    let readable = super::infer::readable(w, &claimed, &mut refused);
    if !refused.is_empty() {
        let mut outcomes: Vec<Outcome> = claimed.iter().map(|_| Outcome::default()).collect();
        settle(
            w,
            &tag,
            Via::External,
            &claimed,
            &mut outcomes,
            &refused,
            &[],
            true,
        );
    }
    let keep: Vec<usize> = readable.iter().map(|(i, _)| *i).collect();
    let claimed: Vec<Claimed> = claimed
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, c)| c)
        .collect();
    if claimed.is_empty() {
        // (an empty batch when rows were refused: their records are to be kept)
        return (!refused.is_empty()).then(|| Batch {
            sources: Vec::new(),
        });
    }
    let sources = claimed.iter().map(|c| c.source.clone()).collect();
    let n = claimed.len();
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held {
            xid: current_xid(),
            worker,
            relid: w.relid,
            tag,
            sha256: sha256.to_string(),
            dim,
            claimed,
            answered: vec![false; n],
            since: t0,
            claim: t0.elapsed(),
        })
    });
    // a prepared transaction would keep the rows past the worker's connection and the lease
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, || {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "a transaction that holds a batch of doppler rows cannot be prepared",
            "Answer the batch and COMMIT, or ROLL BACK.",
        )
    });
    Some(Batch { sources })
}

/// The worker's answer for rows of the batch this transaction holds: `n` (row numbers) with
/// `vectors` (`n.len()` × the model's dim, row-major) and fingerprints (`marks`: each one per
/// row, or none), and `failed` rows. Written as the table owner; failures recorded as for the server's own
/// batches. Returns the rows whose vector (or missing hash) was written.
pub fn answer(
    worker: i64,
    sha256: &str,
    n: &[i32],
    vectors: &[f32],
    marks: &Answered,
    failed: &[Reported],
) -> i64 {
    let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) else {
        not_held(worker)
    };
    if !held.in_this_transaction() || held.worker != worker {
        // (another transaction's batch is gone with it: its rows are free)
        if held.in_this_transaction() {
            HELD.with(|h| *h.borrow_mut() = Some(held));
        }
        not_held(worker)
    }
    let r = check_and_write(&mut held, sha256, n, vectors, marks, failed);
    HELD.with(|h| *h.borrow_mut() = Some(held));
    r
}

fn not_held(worker: i64) -> ! {
    raise(
        Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("this transaction holds no batch of doppler rows for worker {worker}"),
        "Call doppler.worker_claim() in the same transaction (BEGIN; claim; write; COMMIT).",
    )
}

fn bad(message: String) -> ! {
    raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, message, "")
}

/// The answer's rows, checked and written: the model file, the lengths, each row once.
fn check_and_write(
    held: &mut Held,
    sha256: &str,
    n: &[i32],
    vectors: &[f32],
    marks: &Answered,
    failed: &[Reported],
) -> i64 {
    check_shapes(held, sha256, n, vectors, marks);
    // each row of the batch answered once: by a vector or a failure
    let rows: Vec<usize> = n.iter().map(|&k| take(held, k)).collect();
    let errors: Vec<(usize, Error)> = failed
        .iter()
        .map(|f| (take(held, f.n), reported_error(f)))
        .collect();
    let w = locked_watch(held);
    let writing = Instant::now();
    let (mut outcomes, skips) = outcomes_of(&w, held, &rows, n, vectors, marks);
    let failed = settle(
        &w,
        &held.tag,
        Via::External,
        &held.claimed,
        &mut outcomes,
        &errors,
        &skips,
        true,
    );
    let report = BatchReport {
        claimed: (rows.len() + errors.len()) as i64,
        filled: outcomes.iter().filter(|o| o.vector.is_some()).count() as i64,
        failed: failed as i64,
        skipped: skips.len() as i64,
        deduped: 0,
        released: 0,
        seconds: held.since.elapsed().as_secs_f64(),
    };
    let phases = Phases {
        claim: std::mem::take(&mut held.claim),
        write: writing.elapsed(),
        ..Default::default()
    };
    failures::log_batch(
        &w,
        Via::External,
        Via::External.catalog_role(),
        &report,
        &phases,
    );
    held.since = Instant::now();
    outcomes
        .iter()
        .zip(&held.claimed)
        .filter(|(o, c)| {
            o.vector.is_some() || (c.has_vector && (o.hash.is_some() || o.pdq.is_some()))
        })
        .count() as i64
}

/// The model file is the recorded one, there are dim finite floats per row and a hash, PDQ hash
/// and quality per row (or none); 22023 otherwise.
fn check_shapes(held: &Held, sha256: &str, n: &[i32], vectors: &[f32], marks: &Answered) {
    if !sha256.eq_ignore_ascii_case(&held.sha256) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "the worker's model file has SHA-256 {sha256}, but doppler.models records {} for {}",
                held.sha256, held.tag
            ),
            "Copy the registered model file to the worker's --model-dir, or register the file the workers have as a new version.",
        );
    }
    if vectors.len() != n.len() * held.dim {
        bad(format!(
            "{} vectors of {} (the model's dim) are {} floats, not {}",
            n.len(),
            held.dim,
            n.len() * held.dim,
            vectors.len()
        ));
    }
    if let Some(k) = vectors.iter().position(|v| !v.is_finite()) {
        bad(format!(
            "the vector of row {} holds {} (features are finite numbers)",
            n.get(k / held.dim.max(1)).copied().unwrap_or(0),
            vectors[k]
        ));
    }
    for (what, len) in [
        ("hashes", marks.hashes.len()),
        ("PDQ hashes", marks.pdq.len()),
        ("PDQ qualities", marks.pdq_quality.len()),
    ] {
        if len != 0 && len != n.len() {
            bad(format!(
                "{len} {what} for {} rows: one per row, or none",
                n.len()
            ));
        }
    }
}

/// The index of row number `k` of the held batch, marked answered; 22023 for a number not in
/// the batch or answered already.
fn take(held: &mut Held, k: i32) -> usize {
    let i = usize::try_from(k)
        .ok()
        .filter(|&i| (1..=held.claimed.len()).contains(&i))
        .unwrap_or_else(|| {
            bad(format!(
                "row {k} is not in the batch this transaction holds (rows 1 to {})",
                held.claimed.len()
            ))
        })
        - 1;
    if std::mem::replace(&mut held.answered[i], true) {
        bad(format!("row {k} was answered already"));
    }
    i
}

/// The watch as it is now, the table locked for writing; 55000 when it is no longer watched or
/// its model is no longer the batch's.
fn locked_watch(held: &Held) -> Watched {
    let Some(w) = watched::lock(held.relid, watched::FOR_WRITING, Wait::Wait) else {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the table of this batch is no longer watched by doppler",
            "",
        )
    };
    if w.spec().tag() != held.tag {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "{} is now embedded by {}, not {} as claimed",
                w.name,
                w.spec().tag(),
                held.tag
            ),
            "Roll back: the rows go back to the queue, and the next claim names the new model.",
        );
    }
    w
}

/// What to write into each answered row (as the server's own batch decides it: a row that only
/// lacked its hash gets the hash; with dedup, a skip hash is a skip), and the skips.
fn outcomes_of(
    w: &Watched,
    held: &Held,
    rows: &[usize],
    n: &[i32],
    vectors: &[f32],
    marks: &Answered,
) -> (Vec<Outcome>, Vec<(usize, String)>) {
    let skip_list = if w.dedup {
        gucs::skip_hashes()
    } else {
        Vec::new()
    };
    let mut outcomes: Vec<Outcome> = held.claimed.iter().map(|_| Outcome::default()).collect();
    let mut skips = Vec::new();
    for (k, &i) in rows.iter().enumerate() {
        let c = &held.claimed[i];
        if w.pdq_column.is_some() {
            outcomes[i].pdq = Some(answered_pdq(marks, k, n[k], &w.name));
        }
        let hash = match marks.hashes.get(k).cloned().flatten() {
            Some(h) if is_dhash(&h) => Some(h.to_ascii_lowercase()),
            Some(h) => bad(format!("\"{}\" is not a dHash (16 hex digits)", shown(&h))),
            None => None,
        };
        if w.hash_column.is_some() && c.hash.is_none() {
            if hash.is_none() {
                bad(format!(
                    "row {} needs its dHash: {} has a hash column",
                    n[k], w.name
                ));
            }
            outcomes[i].hash = hash.clone();
        }
        let hash = c.hash.clone().or(hash);
        if c.has_vector {
            continue; // only its hash was missing
        }
        match hash {
            Some(h) if skip_list.contains(&h) => skips.push((i, h)),
            _ => outcomes[i].vector = Some(vectors[k * held.dim..(k + 1) * held.dim].to_vec()),
        }
    }
    (outcomes, skips)
}

/// Row `k`'s PDQ hash and quality in a worker's answer (row number `number`): 64 hex digits and
/// 0 to 100; 22023 when missing or malformed.
fn answered_pdq(marks: &Answered, k: usize, number: i32, table: &str) -> pdq::Pdq {
    let (Some(h), Some(q)) = (
        marks.pdq.get(k).cloned().flatten(),
        marks.pdq_quality.get(k).copied().flatten(),
    ) else {
        bad(format!(
            "row {number} needs its PDQ hash and quality: {table} has a PDQ column"
        ))
    };
    let Some(hash) = pdq::parse_hex(&h) else {
        bad(format!(
            "\"{}\" is not a PDQ hash (64 hex digits)",
            shown(&h)
        ))
    };
    if !(0..=100).contains(&q) {
        bad(format!(
            "row {number}: PDQ quality {q} is not between 0 and 100"
        ));
    }
    pdq::Pdq {
        hash,
        quality: q as u32,
    }
}

/// A string a worker sent, as an error message shows it: 80 characters at most, control
/// characters as spaces.
fn shown(s: &str) -> String {
    s.chars()
        .take(80)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A failure a worker reports, as doppler-core's error (an unknown kind is `internal`); a
/// Retry-After clamped to the server's own bounds (a second to a day).
fn reported_error(f: &Reported) -> Error {
    let kind = ErrorKind::from_name(&f.kind);
    let message: String = f
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(2000)
        .collect();
    let e = Error::new(kind, format!("{message} (on an external worker)"));
    match f.retry_after_s.filter(|s| s.is_finite()) {
        Some(s) if kind == ErrorKind::RetryLater => e.retry_at(
            std::time::SystemTime::now()
                + std::time::Duration::from_secs_f64(s.clamp(1.0, 86_400.0)),
        ),
        _ => e,
    }
}

/// 16 hex digits: imagehash's dHash as doppler writes it.
fn is_dhash(h: &str) -> bool {
    h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit())
}
