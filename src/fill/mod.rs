//! The fill engine: one batch of a watched table, in the current transaction. Shared by the
//! background worker (`worker/`), `CALL doppler.fill` (`api/fill.rs`) and the sync trigger
//! (`triggers.rs`), which each lock the table and read its watch first (`watched::lock`) and hand
//! the engine that `&Watched`.
//!
//! A batch, [`run`], in four phases, each in its own file:
//! 1. **claim** ([`claim`]): rows with work to do, `FOR NO KEY UPDATE SKIP LOCKED`, as the table
//!    owner;
//! 2. **infer** ([`infer`]): their images read (with the owner's rights), decoded and
//!    preprocessed on threads, one model run per chunk while the next chunk decodes, dedup;
//! 3. **write** ([`write`]): vectors, hashes and model tags written back as the owner, a row that
//!    cannot be written isolated and recorded;
//! 4. **record** ([`failures`]): failures and skips into doppler.failures, the batch into
//!    doppler.batches, as the catalog role.
//!
//! External workers (`doppler-worker`) run phase 2 on their own hosts: [`remote`] splits the
//! batch over two calls of one transaction, the claim (phase 1) and the answer (phases 3 and 4).
//!
//! The table is only ever touched as its owner, doppler's catalog only as the catalog role (see
//! `privileged.rs`).

pub mod claim;
mod failures;
mod infer;
pub mod remote;
mod write;

use std::time::{Duration, Instant};

use doppler_core::{Source, StreamStats};
use pgrx::prelude::*;

use crate::errors::raise_error;
use crate::privileged::{as_owner, current_user, extension_owner};
use crate::watched::Watched;
pub use claim::wait_for_holders;

/// Who runs a batch (doppler.batches.via).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The background worker.
    Worker,
    /// `CALL doppler.fill()` in the foreground.
    Fill,
    /// The sync trigger, in the writing statement.
    Sync,
    /// An external worker (`doppler-worker`), through doppler.worker_claim and worker_write.
    External,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Worker => "worker",
            Via::Fill => "fill",
            Via::Sync => "sync",
            Via::External => "external",
        }
    }

    /// Who writes doppler's catalog for the batch: the worker itself (a superuser), or the
    /// extension owner for `fill` and the sync trigger, whose callers may be plain roles.
    fn catalog_role(self) -> pg_sys::Oid {
        match self {
            Via::Worker => current_user(),
            Via::Fill | Via::Sync | Via::External => extension_owner(),
        }
    }
}

/// What a batch did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchReport {
    pub claimed: i64,
    pub filled: i64,
    pub failed: i64,
    /// Rows with a skip hash (dedup): not inferred, not failed.
    pub skipped: i64,
    /// Model runs saved by dedup: vectors copied or shared instead of inferred.
    pub deduped: i64,
    /// Rows left because their image was still on the network (claimed again later).
    pub released: i64,
    pub seconds: f64,
}

/// Where a batch's time went (doppler.batches' `*_s` columns): its phases on the backend's own
/// thread (claim, wait for images, infer, write), and the decode threads' time by stage, summed
/// over the threads (it overlaps the inference).
#[derive(Default)]
struct Phases {
    claim: Duration,
    stream: StreamStats,
    infer: Duration,
    write: Duration,
}

/// A claimed row.
pub struct Claimed {
    ctid: String,
    tableoid: pg_sys::Oid,
    key: String,
    source: Source,
    /// How a failure record names the source (`Watched::shown_over`).
    shown: String,
    /// The row's hash column, when it already has a value.
    hash: Option<String>,
    /// The vector is there already; only the hash is missing.
    has_vector: bool,
}

/// What a batch writes into one claimed row.
#[derive(Default)]
struct Outcome {
    vector: Option<Vec<f32>>,
    hash: Option<String>,
    /// The PDQ hash (with a PDQ column): written where the row has none.
    pdq: Option<doppler_core::pdq::Pdq>,
}

/// Claims up to `limit` rows of `w` and fills them. `w` comes from `watched::lock` in this
/// transaction. Model errors (no model, library missing) are raised: they are not the rows'
/// fault.
///
/// `only` restricts the claim to these row keys (the sync trigger's rows); with `raise`, the
/// first bad image raises its ERROR instead of being recorded.
pub fn run(w: &Watched, limit: i64, via: Via, only: Option<&[String]>, raise: bool) -> BatchReport {
    let t0 = Instant::now();
    let limit = limit.clamp(1, w.batch_size as i64);
    let spec = w.spec();
    let tag = spec.tag();
    let catalog_role = via.catalog_role();
    let mut phases = Phases::default();

    // 1. claim (as the table owner: its casts, operators and policies run with its own rights)
    let claimed = claim::claim(w, limit, only, &tag, catalog_role);
    phases.claim = t0.elapsed();
    if claimed.is_empty() {
        return BatchReport::default();
    }

    // 2. infer: read or fetch, decode and preprocess on threads, one model run per chunk; the
    //    worker and fill leave rows still on the network to a later batch, and ask for the next
    //    batch's URLs meanwhile
    let release = via != Via::Sync;
    let ahead = if release {
        infer::lookahead(w, &tag, &claimed, limit)
    } else {
        Vec::new()
    };
    let mut done = infer::infer(w, &spec, &tag, &claimed, (release, &ahead), &mut phases);
    if raise {
        if let Some((_, e)) = done.errors.into_iter().min_by_key(|(i, _)| *i) {
            raise_error(e);
        }
        done.errors = Vec::new();
    }

    // 3. write, as the owner: a row that cannot be written is a failure of its own;
    // 4. record failures and skips, forget the records of rows that are settled
    let writing = Instant::now();
    let failed = settle(
        w,
        &tag,
        via,
        &claimed,
        &mut done.outcomes,
        &done.errors,
        &done.skips,
        !raise,
    );
    phases.write = writing.elapsed();
    let report = BatchReport {
        claimed: claimed.len() as i64,
        filled: done.outcomes.iter().filter(|o| o.vector.is_some()).count() as i64,
        failed: failed as i64,
        skipped: done.skips.len() as i64,
        deduped: done.deduped,
        released: done.released.len() as i64,
        seconds: t0.elapsed().as_secs_f64(),
    };
    failures::log_batch(w, via, catalog_role, &report, &phases);
    report
}

/// Phases 3 and 4 of a batch, shared with external workers' answers ([`remote`]): the rows'
/// outcomes written as the owner (with `isolate`, a row that cannot be written becomes a failure
/// of its own, its outcome dropped), then failures and skips recorded and the records of settled
/// rows forgotten, as the catalog role. Rows of `claimed` without an outcome, failure or skip are
/// left as they are. Returns how many rows failed.
#[allow(clippy::too_many_arguments)]
fn settle(
    w: &Watched,
    tag: &str,
    via: Via,
    claimed: &[Claimed],
    outcomes: &mut [Outcome],
    errors: &[(usize, doppler_core::Error)],
    skips: &[(usize, String)],
    isolate: bool,
) -> usize {
    let mut failed = failures::of_errors(errors);
    let held = failures::held(claimed, &failed, skips);
    let unwritten = as_owner(w.owner, || {
        write::write(w, tag, claimed, outcomes, &held, isolate)
    });
    for f in &unwritten {
        outcomes[f.row] = Outcome::default();
    }
    failed.extend(unwritten);
    failures::record(w, via.catalog_role(), claimed, outcomes, &failed, skips);
    failed.len()
}
