//! The infer phase of a batch: the claimed rows' images read with the table owner's rights,
//! decoded and preprocessed on threads (`prepare_stream`), and handed over one model run's worth
//! at a time: while the model runs over chunk k, the threads decode chunk k + 1. Per chunk, the
//! rows that need features are grouped (with dedup: one model slot per distinct hash, none for
//! hashes the table or an earlier chunk already has) and run through the model once.

use std::time::Instant;

use doppler_core::{
    dhash, fetch, prepare_stream, Error, ErrorKind, PreparedImage, Preprocess, Source,
    StreamOptions,
};
use pgrx::prelude::*;

use super::{Claimed, Outcome, Phases};
use crate::errors::SpiOrRaise;
use crate::gucs;
use crate::privileged::{as_owner, may_fetch_urls, may_read_server_files};
use crate::session::{self, ModelSpec, Runner};
use crate::watched::Watched;

/// What the infer phase made of the claimed rows (indexed like them).
pub struct Inferred {
    pub outcomes: Vec<Outcome>,
    /// Rows whose image could not be read, decoded or run.
    pub errors: Vec<(usize, Error)>,
    /// Rows whose hash is a skip hash (dedup), with it.
    pub skips: Vec<(usize, String)>,
    /// Model slots saved by dedup.
    pub deduped: i64,
    /// Rows left because their image was still on the network (neither filled nor failed: a
    /// later batch claims them again and takes the answer).
    pub released: Vec<usize>,
}

/// `release`: rows whose image is still on the network when the rest is done may be left for a
/// later batch (the worker, `fill`); the sync trigger waits for all of its rows. `ahead`: the
/// URLs of the rows the next batch will claim, asked for after this batch's own.
pub fn infer(
    w: &Watched,
    spec: &ModelSpec,
    tag: &str,
    claimed: &[Claimed],
    (release, ahead): (bool, &[String]),
    phases: &mut Phases,
) -> Inferred {
    let mut done = Inferred {
        outcomes: claimed.iter().map(|_| Outcome::default()).collect(),
        errors: Vec::new(),
        skips: Vec::new(),
        deduped: 0,
        released: Vec::new(),
    };
    let sources = readable(w, claimed, &mut done.errors);
    if sources.is_empty() {
        return done;
    }
    let srcs: Vec<Source> = sources.iter().map(|(_, s)| s.clone()).collect();
    let opts = StreamOptions {
        threads: gucs::decode_threads(),
        chunk: gucs::INFERENCE_BATCH_SIZE.get().max(1) as usize,
        want_hash: w.hash_column.is_some(),
        want_pdq: w.pdq_column.is_some(),
        release,
        scope: u32::from(w.relid) as u64,
        ahead,
    };
    let (limits, policy) = (gucs::limits(), gucs::source_policy());
    let mut chunks = Chunks {
        w,
        tag,
        claimed,
        rows: sources.iter().map(|(i, _)| *i).collect(),
        skip_list: gucs::skip_hashes(),
        inferred: Vec::new(),
        done: &mut done,
        infer_time: Default::default(),
    };
    let mut left = Vec::new();
    session::with_model(spec, |runner, pre| {
        (phases.stream, left) = prepare_stream(
            &srcs,
            pre,
            &limits,
            &policy,
            opts,
            |rows, images| {
                // cancel, statement_timeout, shutdown: act between model runs
                check_for_interrupts!();
                chunks.run(runner, pre, &rows, images);
            },
            || {
                // and while a chunk decodes: within about one image, not one model run
                check_for_interrupts!();
            },
        );
    });
    phases.infer = chunks.infer_time;
    done.released = left.into_iter().map(|j| sources[j].0).collect();
    done
}

/// The URLs of the rows the next batches of `w` will claim (the claim statement, locking nothing;
/// a batch's worth, or as many as may be in flight when that is more): when this batch fetches
/// URLs, lookahead is on and the owner may fetch. Not this batch's rows.
pub fn lookahead(w: &Watched, tag: &str, claimed: &[Claimed], limit: i64) -> Vec<String> {
    let is_url = |c: &Claimed| matches!(&c.source, Source::Path(p) if fetch::is_url(p));
    let on = gucs::ALLOW_URLS.get() && gucs::URL_PREFETCH_BYTES.get() > 0;
    if !on || !claimed.iter().any(is_url) || !may_fetch_urls(w.owner) {
        return Vec::new();
    }
    let ahead = limit.max(gucs::URL_MAX_IN_FLIGHT.get() as i64);
    super::claim::peek(w, tag, claimed.len() as i64 + ahead)
        .into_iter()
        .filter(|c| {
            is_url(c)
                && !claimed
                    .iter()
                    .any(|d| d.ctid == c.ctid && d.tableoid == c.tableoid)
        })
        .filter_map(|c| match c.source {
            Source::Path(p) => Some(p),
            Source::Bytes(_) => None,
        })
        .collect()
}

/// The rows whose source the table owner may read (with their index), the others' errors
/// added to `errors`: a URL needs doppler_url_reader, a path pg_read_server_files and to be
/// absolute.
pub(super) fn readable(
    w: &Watched,
    claimed: &[Claimed],
    errors: &mut Vec<(usize, Error)>,
) -> Vec<(usize, Source)> {
    let owner_reads_files = may_read_server_files(w.owner);
    let owner_fetches = may_fetch_urls(w.owner);
    let mut sources = Vec::new();
    for (i, c) in claimed.iter().enumerate() {
        let refused = match &c.source {
            Source::Path(p) if fetch::is_url(p) && !owner_fetches => Some(
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!("the owner of {} may not fetch URLs ({p})", w.name),
                )
                .with_hint("Grant doppler_url_reader to the table owner."),
            ),
            Source::Path(p) if !fetch::is_url(p) && !owner_reads_files => Some(
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "the owner of {} may not read server files ({})",
                        w.name, c.shown
                    ),
                )
                .with_hint(
                    "Grant pg_read_server_files to the table owner, or store the images as bytea.",
                ),
            ),
            Source::Path(p) if !fetch::is_url(p) && !p.starts_with('/') => Some(Error::new(
                ErrorKind::Config,
                format!("image path \"{p}\" is not absolute"),
            )),
            _ => None,
        };
        match refused {
            Some(e) => errors.push((i, e)),
            None => sources.push((i, c.source.clone())),
        }
    }
    sources
}

/// The state of one batch's chunks.
struct Chunks<'a> {
    w: &'a Watched,
    tag: &'a str,
    claimed: &'a [Claimed],
    /// The claimed row of each streamed source.
    rows: Vec<usize>,
    skip_list: Vec<String>,
    /// dedup: the vectors this batch inferred, by hash
    inferred: Vec<(String, Vec<f32>)>,
    done: &'a mut Inferred,
    infer_time: std::time::Duration,
}

/// One model slot: the key the rows share (their hash with dedup, else the row), the rows, and
/// the preprocessed input.
type Group = (String, Vec<usize>, Vec<f32>);

impl Chunks<'_> {
    /// One chunk of prepared images, of the streamed sources `rows`.
    fn run(
        &mut self,
        runner: &mut Runner,
        pre: &Preprocess,
        rows: &[usize],
        images: Vec<PreparedImage>,
    ) {
        let mut groups = self.group(rows, images);
        if self.w.dedup && !groups.is_empty() {
            self.drop_known(&mut groups);
        }
        if groups.is_empty() {
            return;
        }
        let mut tensor = Vec::with_capacity(groups.len() * pre.slot_len());
        for (_, _, slot) in &groups {
            tensor.extend_from_slice(slot);
        }
        let running = Instant::now();
        let run = runner.run(&tensor, groups.len());
        self.infer_time += running.elapsed();
        match run {
            Ok(out) => {
                let dim = runner.dim();
                for (n, (key, rows, _)) in groups.into_iter().enumerate() {
                    let v = &out[n * dim..(n + 1) * dim];
                    self.done.deduped += rows.len() as i64 - 1;
                    for &i in &rows {
                        self.done.outcomes[i].vector = Some(v.to_vec());
                    }
                    if self.w.dedup {
                        self.inferred.push((key, v.to_vec()));
                    }
                }
            }
            Err(e) => {
                for (_, rows, _) in &groups {
                    let failed = rows
                        .iter()
                        .map(|&i| (i, Error::new(e.kind, e.message.clone())));
                    self.done.errors.extend(failed);
                }
            }
        }
    }

    /// The chunk's rows that need the model, in groups; the others settled here: an image that
    /// failed, a row that only needed its hashes, a skip hash, a hash this batch already inferred.
    fn group(&mut self, rows: &[usize], images: Vec<PreparedImage>) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (&j, image) in rows.iter().zip(images) {
            let i = self.rows[j];
            let (slot, computed) = match image {
                Ok(ok) => ok,
                Err(e) => {
                    self.done.errors.push((i, e));
                    continue;
                }
            };
            let c = &self.claimed[i];
            self.done.outcomes[i].pdq = computed.pdq;
            let hash = c.hash.clone().or_else(|| computed.dhash.map(dhash::to_hex));
            if c.hash.is_none() {
                self.done.outcomes[i].hash = hash.clone();
            }
            if c.has_vector {
                continue; // only its hash was missing
            }
            let key = match (&hash, self.w.dedup) {
                (Some(h), true) if self.skip_list.contains(h) => {
                    self.done.skips.push((i, h.clone()));
                    continue;
                }
                (Some(h), true) => h.clone(),
                _ => format!("row {i}"),
            };
            if let Some((_, v)) = self.inferred.iter().find(|(k, _)| *k == key) {
                self.done.outcomes[i].vector = Some(v.clone());
                self.done.deduped += 1;
            } else if let Some(g) = groups.iter_mut().find(|g| g.0 == key) {
                g.1.push(i);
            } else {
                groups.push((key, vec![i], slot));
            }
        }
        groups
    }

    /// dedup: the groups whose hash the table already has a current vector for get that vector
    /// and leave the model run.
    fn drop_known(&mut self, groups: &mut Vec<Group>) {
        let keys: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
        let known = as_owner(self.w.owner, || existing_vectors(self.w, self.tag, &keys));
        let done = &mut *self.done;
        groups.retain(|(h, rows, _)| match known.iter().find(|(k, _)| k == h) {
            Some((_, v)) => {
                for &i in rows {
                    done.outcomes[i].vector = Some(v.clone());
                }
                done.deduped += rows.len() as i64;
                false
            }
            None => true,
        });
    }
}

/// Vectors the table already has for these hashes, made by the model tagged `tag` (dedup), as
/// real[]. As the table owner.
fn existing_vectors(w: &Watched, tag: &str, hashes: &[String]) -> Vec<(String, Vec<f32>)> {
    let Some(h) = &w.hash_column else {
        return Vec::new();
    };
    let sql = format!(
        "SELECT DISTINCT ON ({hash}) {hash}::pg_catalog.text, {vec}::pg_catalog.float4[]
         FROM {table} t
         WHERE {hash} = ANY ($1::pg_catalog.text[]) AND {current}",
        table = w.name,
        hash = w.col("t", h),
        vec = w.col("t", &w.vector_column),
        current = w.current_vector_over("t", &pgrx::spi::quote_literal(tag)),
    );
    w.check_name();
    Spi::connect(|client| {
        client
            .select(&sql, None, &[hashes.to_vec().into()])?
            .map(|r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<Vec<f32>>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .or_raise(|| format!("could not look up known hashes in {}", w.name))
}
