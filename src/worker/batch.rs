//! One batch of a watched table, in the current transaction: claim rows whose vector is NULL
//! (`FOR NO KEY UPDATE SKIP LOCKED`, so concurrent fillers never take the same row), prepare their
//! images on threads (pure Rust), run the model once, write the vectors, and record failures.
//! The table is only ever touched as its owner (see `privileged.rs`). Shared by the background
//! worker, `doppler.fill()` and the sync trigger.

use std::time::{Duration, Instant};

use doppler_core::{dhash, prepare_stream, Error, ErrorKind, Source, StreamOptions, StreamStats};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal, SpiClient};

use crate::errors::{in_subtransaction, sqlstate};
use crate::privileged::{as_catalog, as_owner, extension_owner};
use crate::{gucs, session};

/// A watched table, as doppler.watched and the catalogs describe it.
#[derive(Clone, Debug)]
pub struct Watched {
    pub relid: pg_sys::Oid,
    /// `"schema"."table"`, quoted.
    pub name: String,
    pub owner: pg_sys::Oid,
    pub source_column: String,
    pub source_kind: String,
    pub vector_column: String,
    pub vector_kind: String,
    /// The vector column's type, schema-qualified where it is not in pg_catalog (`real[]`,
    /// `public.vector`): casts name it so under the pinned search_path.
    pub vector_type: String,
    /// The schema of the vector column's type, quoted (pgvector's, for `halfvec` and its
    /// operator classes).
    pub vector_schema: String,
    pub key_columns: Vec<String>,
    /// The type of a one-column primary key, schema-qualified where needed (by the catalog,
    /// under the pinned search_path; never the watcher's display text); None when composite.
    pub key_type: Option<String>,
    pub batch_size: i32,
    pub mode: String,
    pub on_error: String,
    pub hash_column: Option<String>,
    pub dedup: bool,
    /// The doppler.models entry that embeds this table.
    pub model: String,
    /// The text column tagging each vector with the model that made it (name@version).
    pub model_column: String,
    /// For which model tag the last scan for outdated vectors found none; None: scan again.
    pub stale_scan: Option<String>,
    /// Whether doppler.watched has that column (not before `ALTER EXTENSION doppler UPDATE`
    /// from 0.1.0: claims then scan as 0.1.0's did).
    pub has_stale_scan: bool,
}

// Read under the pinned search_path (as_catalog), so format_type() qualifies every type that is
// not in pg_catalog.
const WATCHED_SQL: &str = "
    SELECT w.relid::pg_catalog.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), c.relowner,
           w.source_column::pg_catalog.text, w.source_kind, w.vector_column::pg_catalog.text, w.vector_kind,
           pg_catalog.format_type(va.atttypid, NULL), pg_catalog.quote_ident(vn.nspname),
           w.key_columns::pg_catalog.text[], w.batch_size,
           (SELECT pg_catalog.format_type(ka.atttypid, ka.atttypmod) FROM pg_catalog.pg_attribute ka
             WHERE ka.attrelid OPERATOR(pg_catalog.=) c.oid AND ka.attname OPERATOR(pg_catalog.=) w.key_columns[1]
               AND pg_catalog.cardinality(w.key_columns) OPERATOR(pg_catalog.=) 1),
           w.mode, w.on_error, w.hash_column::pg_catalog.text, w.dedup,
           w.model, w.model_column::pg_catalog.text,
           -- (by name from the row: a database whose SQL is still 0.1.0 has no such column)
           pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'stale_scan',
           pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.?) 'stale_scan'
    FROM doppler.watched w
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) w.relid::pg_catalog.oid
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    LEFT JOIN pg_catalog.pg_attribute va ON va.attrelid OPERATOR(pg_catalog.=) c.oid
         AND va.attname OPERATOR(pg_catalog.=) w.vector_column AND NOT va.attisdropped
    LEFT JOIN pg_catalog.pg_type vt ON vt.oid OPERATOR(pg_catalog.=) va.atttypid
    LEFT JOIN pg_catalog.pg_namespace vn ON vn.oid OPERATOR(pg_catalog.=) vt.typnamespace";

/// The watch of `relid`; an ERROR (42704, with `hint`) when the table is not watched.
pub fn watched_or_raise(relid: pg_sys::Oid, hint: &str) -> Watched {
    load_watched(Some(relid))
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            crate::errors::raise_code(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!(
                    "relation with OID {} is not watched by doppler",
                    relid.to_u32()
                ),
                hint,
            )
        })
}

/// Every watched table (by priority), or the one given. Read as the extension owner: the
/// catalog is visible to each role only for its own tables, and the sync trigger runs as
/// whoever writes the table.
pub fn load_watched(only: Option<pg_sys::Oid>) -> Vec<Watched> {
    let (sql, args) = match only {
        Some(oid) => (
            format!("{WATCHED_SQL} WHERE w.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1"),
            vec![oid.into()],
        ),
        None => (
            format!("{WATCHED_SQL} ORDER BY w.priority DESC, w.relid::pg_catalog.oid"),
            vec![],
        ),
    };
    let read = || {
        Spi::connect(|client| {
            let rows = client.select(&sql, None, &args)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(Watched {
                    relid: r.get(1)?.unwrap_or(pg_sys::InvalidOid),
                    name: r.get(2)?.unwrap_or_default(),
                    owner: r.get(3)?.unwrap_or(pg_sys::InvalidOid),
                    source_column: r.get(4)?.unwrap_or_default(),
                    source_kind: r.get(5)?.unwrap_or_default(),
                    vector_column: r.get(6)?.unwrap_or_default(),
                    vector_kind: r.get(7)?.unwrap_or_default(),
                    vector_type: r.get(8)?.unwrap_or_else(|| "real[]".into()),
                    vector_schema: r.get(9)?.unwrap_or_else(|| "pg_catalog".into()),
                    key_columns: r.get::<Vec<String>>(10)?.unwrap_or_default(),
                    batch_size: r.get(11)?.unwrap_or(32),
                    key_type: r.get(12)?,
                    mode: r.get(13)?.unwrap_or_default(),
                    on_error: r.get(14)?.unwrap_or_default(),
                    hash_column: r.get(15)?,
                    dedup: r.get(16)?.unwrap_or(false),
                    model: r.get(17)?.unwrap_or_default(),
                    model_column: r.get(18)?.unwrap_or_default(),
                    stale_scan: r.get(19)?,
                    has_stale_scan: r.get(20)?.unwrap_or(false),
                });
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_else(|e| pgrx::error!("doppler: could not read doppler.watched: {e}"))
    };
    as_catalog(extension_owner(), read)
}

/// What the model column holds in a row that doppler holds back: its image failed, or its hash
/// is a skip hash; the row's record in doppler.failures says why, and when it is tried again. No
/// model tag starts with `!` (model names are `[A-Za-z0-9_.-]`), so it never reads as one. A held
/// row leaves the pending index, so that failures do not turn claims back into scans; retries come
/// from doppler.failures (by `next_attempt`), and a changed source clears the mark with the vector.
pub const HELD: &str = "!failed";

/// `(vector IS NULL [OR hash IS NULL])`, columns prefixed with `prefix` (`"t."`, or `""` in an
/// index predicate).
pub fn pending_predicate(prefix: &str, vector: &str, hash: Option<&str>) -> String {
    let vec = quote_identifier(vector);
    match hash {
        Some(h) => format!(
            "({prefix}{vec} IS NULL OR {prefix}{} IS NULL)",
            quote_identifier(h)
        ),
        None => format!("{prefix}{vec} IS NULL"),
    }
}

/// `(model IS NULL OR model <> '!failed')`: the row is not held back.
pub fn unheld_predicate(prefix: &str, model: &str) -> String {
    let mc = quote_identifier(model);
    format!(
        "({prefix}{mc} IS NULL OR {prefix}{mc} OPERATOR(pg_catalog.<>) {}::pg_catalog.text)",
        quote_literal(HELD)
    )
}

/// The pending index's predicate: to do ([`pending_predicate`]), with a source, and not held
/// back. Built-in operators only, schema-qualified: the index never runs the owner's code.
pub fn pending_index_predicate(
    prefix: &str,
    source: &str,
    vector: &str,
    hash: Option<&str>,
    model: &str,
) -> String {
    format!(
        "{} AND {prefix}{} IS NOT NULL AND {}",
        pending_predicate(prefix, vector, hash),
        quote_identifier(source),
        unheld_predicate(prefix, model)
    )
}

impl Watched {
    /// The row key as text over table alias `t`: the primary key value, or a row of them for a
    /// composite key.
    pub fn key_expr(&self) -> String {
        self.key_expr_over("t")
    }

    pub fn key_expr_over(&self, alias: &str) -> String {
        let cols: Vec<String> = self
            .key_columns
            .iter()
            .map(|c| format!("{alias}.{}", quote_identifier(c)))
            .collect();
        if cols.len() == 1 {
            format!("{}::pg_catalog.text", cols[0])
        } else {
            format!("ROW({})::pg_catalog.text", cols.join(", "))
        }
    }

    /// The rows the pending index covers, over alias `t`: no vector, or no hash (with a hash
    /// column). Its predicate adds `source IS NOT NULL` and "not held back"
    /// ([`Watched::pending_index_over`]).
    pub fn pending_over(&self, alias: &str) -> String {
        pending_predicate(
            &format!("{alias}."),
            &self.vector_column,
            self.hash_column.as_deref(),
        )
    }

    /// The pending index's own predicate, over alias `t`: the same text as `watch` indexes, so
    /// that the planner proves a claim's condition implies it.
    pub fn pending_index_over(&self, alias: &str) -> String {
        pending_index_predicate(
            &format!("{alias}."),
            &self.source_column,
            &self.vector_column,
            self.hash_column.as_deref(),
            &self.model_column,
        )
    }

    /// Rows doppler does not hold back, over alias `t`: their model column is not [`HELD`].
    pub fn unheld_over(&self, alias: &str) -> String {
        unheld_predicate(&format!("{alias}."), &self.model_column)
    }

    /// How a failure record names the source, so that a changed source is tried afresh.
    fn shown_expr(&self) -> String {
        let src = quote_identifier(&self.source_column);
        if self.source_kind == "bytea" {
            format!("'bytea md5:' OPERATOR(pg_catalog.||) pg_catalog.md5(t.{src})")
        } else {
            format!("t.{src}::pg_catalog.text")
        }
    }

    /// The registered model of this table.
    pub fn spec(&self) -> session::ModelSpec {
        session::spec(Some(&self.model))
    }

    /// SQL over alias `t`: the row's vector is there and made by the model tagged `$tag`
    /// (untagged vectors count as the table's model's: they were there before doppler, or
    /// `watch` tagged them when the model changed).
    pub fn current_vector_over(&self, alias: &str, tag: &str) -> String {
        format!(
            "({alias}.{vec} IS NOT NULL AND ({alias}.{mc} IS NULL OR {alias}.{mc} OPERATOR(pg_catalog.=) {tag}))",
            vec = quote_identifier(&self.vector_column),
            mc = quote_identifier(&self.model_column),
        )
    }

    /// Rows with work to do for model `tag`, over alias `t`: no vector of that model, or (with a
    /// hash column) no hash. What claims take, and what a due failure record needs to stay.
    pub fn todo_over(&self, alias: &str, tag: &str) -> String {
        let current = self.current_vector_over(alias, &quote_literal(tag));
        match &self.hash_column {
            Some(h) => format!("(NOT {current} OR {alias}.{} IS NULL)", quote_identifier(h)),
            None => format!("NOT {current}"),
        }
    }

    /// `$1::real[]` cast to the vector column's type (qualified: pgvector may be in any schema).
    fn vector_param(&self) -> String {
        match self.vector_kind.as_str() {
            "real[]" => "$1::pg_catalog.float4[]".into(),
            _ => format!("$1::pg_catalog.float4[]::{}", self.vector_type),
        }
    }
}

/// Who runs a batch (doppler.batches.via).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The background worker: skips a table someone holds locked.
    Worker,
    /// `doppler.fill()` in the foreground.
    Fill,
    /// The sync trigger, in the writing statement.
    Sync,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Worker => "worker",
            Via::Fill => "fill",
            Via::Sync => "sync",
        }
    }
}

/// The watch of `relid` as it is now, with the table locked for this transaction (ROW
/// EXCLUSIVE: it is about to be updated), so that its name and owner hold until commit: DROP,
/// RENAME and ALTER ... OWNER wait for the lock. The worker does not wait for a table someone
/// holds locked (None: skipped this pass). Raises when a partition or child table has another
/// owner: doppler would run that owner's triggers with the parent owner's rights.
pub fn lock_current(relid: pg_sys::Oid, via: Via) -> Option<Watched> {
    lock_watched(relid, via, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE)
}

/// [`lock_current`] with a lock mode of the caller's: fill's wait only reads and row-locks (ROW
/// SHARE, as `SELECT ... FOR UPDATE` takes), so that it does not hold CREATE INDEX or CREATE
/// TRIGGER back for as long as it waits.
fn lock_watched(relid: pg_sys::Oid, via: Via, mode: pg_sys::LOCKMODE) -> Option<Watched> {
    if via == Via::Worker {
        if !unsafe { pg_sys::ConditionalLockRelationOid(relid, mode) } {
            return None;
        }
    } else {
        unsafe { pg_sys::LockRelationOid(relid, mode) };
    }
    let w = load_watched(Some(relid)).into_iter().next()?;
    if let Some(child) = foreign_child(relid, w.owner) {
        crate::errors::raise_code(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{child}, a partition or child table of {}, has another owner", w.name),
            "doppler works on a table as its owner only: give the partitions the parent's owner, or watch each one.",
        );
    }
    Some(w)
}

/// A partition or inheritance child of `relid` (at any depth) owned by a role other than
/// `owner`, by name.
pub fn foreign_child(relid: pg_sys::Oid, owner: pg_sys::Oid) -> Option<String> {
    as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<String>(
            "WITH RECURSIVE tree (oid) AS (
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent OPERATOR(pg_catalog.=) $1
                 UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent OPERATOR(pg_catalog.=) tree.oid)
             SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
             FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.oid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
             WHERE c.relowner OPERATOR(pg_catalog.<>) $2 LIMIT 1",
            &[relid.into(), owner.into()],
        )
    })
    .or_else(|e| match e {
        pgrx::spi::Error::InvalidPosition => Ok(None), // none
        e => Err(e),
    })
    .unwrap_or_else(|e| pgrx::error!("doppler: could not read the partitions of relation {}: {e}", relid.to_u32()))
}

impl Watched {
    /// Raises unless the table's name still names this table. Called as the owner before each
    /// statement over the table: a schema can be renamed without any lock on the tables in it,
    /// and a role that owns the schema of someone else's table could otherwise put another
    /// table under the same name.
    pub fn check_name(&self) {
        let same = Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid IS NOT DISTINCT FROM $2",
            &[self.name.as_str().into(), self.relid.into()],
        )
        .ok()
        .flatten();
        if same != Some(true) {
            crate::errors::raise_code(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{} no longer names relation {} (renamed during the batch)",
                    self.name,
                    self.relid.to_u32()
                ),
                "The batch is rolled back; the next one reads the table's name afresh.",
            );
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

/// What a batch writes into one claimed row.
#[derive(Default)]
struct Outcome {
    vector: Option<Vec<f32>>,
    hash: Option<String>,
}

struct Claimed {
    ctid: String,
    tableoid: pg_sys::Oid,
    key: String,
    source: Source,
    shown: String,
    /// The row's hash column, when it already has a value.
    hash: Option<String>,
    /// The vector is there already; only the hash is missing.
    has_vector: bool,
}

fn may_read_server_files(role: pg_sys::Oid) -> bool {
    unsafe {
        pg_sys::superuser_arg(role)
            || pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES))
    }
}

/// Claims up to `limit` rows of `w` and fills them. The table is claimed, read and written as
/// its owner ([`as_owner`]); `catalog_role` writes doppler's catalog (the worker itself, or the
/// extension owner for `fill` and the sync trigger) with plain values. Model errors (no model, library missing) are raised: they are not the
/// rows' fault.
///
/// `only` restricts the claim to these row keys (the sync trigger's rows); with `raise`, the
/// first bad image raises its ERROR instead of being recorded.
pub fn run_batch(
    relid: pg_sys::Oid,
    limit: i64,
    catalog_role: pg_sys::Oid,
    via: Via,
    only: Option<&[String]>,
    raise: bool,
) -> BatchReport {
    let t0 = Instant::now();
    let Some(w) = &lock_current(relid, via) else {
        return BatchReport::default();
    };
    let limit = limit.clamp(1, w.batch_size as i64);
    let spec = w.spec();
    let tag = spec.tag();
    let mut phases = Phases::default();
    // claim: as the table owner (its casts, operators and policies run with its own rights)
    let (claimed, no_stale, obsolete) =
        as_owner(w.owner, || claim(w, limit, only, &tag, Locked::Skip));
    phases.claim = t0.elapsed();
    if !obsolete.is_empty() {
        as_catalog(catalog_role, || forget_failures(w, &obsolete));
    }
    if let Some(signature) = no_stale {
        as_catalog(catalog_role, || {
            Spi::run_with_args(
                "UPDATE doppler.watched SET stale_scan = $2
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[w.relid.into(), signature.as_str().into()],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("doppler: could not update doppler.watched: {e}"));
    }
    if claimed.is_empty() {
        return BatchReport::default();
    }

    // Server files are read with the table owner's rights.
    let mut errors: Vec<(usize, Error)> = Vec::new();
    let mut sources: Vec<(usize, Source)> = Vec::new();
    let owner_reads_files = may_read_server_files(w.owner);
    let owner_fetches = crate::api::features::may_fetch_urls(w.owner);
    for (i, c) in claimed.iter().enumerate() {
        match &c.source {
            Source::Path(p) if doppler_core::fetch::is_url(p) && !owner_fetches => errors.push((
                i,
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!("the owner of {} may not fetch URLs ({p})", w.name),
                )
                .with_hint("Grant doppler_url_reader to the table owner."),
            )),
            Source::Path(p) if !doppler_core::fetch::is_url(p) && !owner_reads_files => errors
                .push((
                i,
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
            )),
            Source::Path(p) if !doppler_core::fetch::is_url(p) && !p.starts_with('/') => errors
                .push((
                    i,
                    Error::new(
                        ErrorKind::Config,
                        format!("image path \"{p}\" is not absolute"),
                    ),
                )),
            s => sources.push((i, s.clone())),
        }
    }

    // Decode + preprocess on threads, handed over one model run's worth at a time: while the
    // model runs over chunk k, the threads decode chunk k + 1. Per chunk, the rows that need
    // features are grouped (with dedup: one model slot per distinct hash, none for hashes the
    // table or an earlier chunk already has) and run through the model once.
    let want_hash = w.hash_column.is_some();
    let mut outcomes: Vec<Outcome> = claimed.iter().map(|_| Outcome::default()).collect();
    let mut skips: Vec<(usize, String)> = Vec::new();
    let mut deduped = 0i64;
    if !sources.is_empty() {
        let srcs: Vec<Source> = sources.iter().map(|(_, s)| s.clone()).collect();
        let (threads, chunk) = (
            gucs::decode_threads(),
            gucs::INFERENCE_BATCH_SIZE.get().max(1) as usize,
        );
        let (limits, policy, skip_list) =
            (gucs::limits(), gucs::source_policy(), gucs::skip_hashes());
        let mut inferred: Vec<(String, Vec<f32>)> = Vec::new(); // dedup: vectors of this batch
        session::with_model(&spec, |runner, pre| {
            let opts = StreamOptions {
                threads,
                chunk,
                want_hash,
            };
            phases.stream = prepare_stream(
                &srcs,
                pre,
                &limits,
                &policy,
                opts,
                |start, images| {
                    // cancel, statement_timeout, shutdown: act between model runs
                    check_for_interrupts!();
                    // (group key, rows, input slot)
                    let mut groups: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
                    for (j, image) in (start..).zip(images) {
                        let i = sources[j].0;
                        let (slot, computed) = match image {
                            Ok(ok) => ok,
                            Err(e) => {
                                errors.push((i, e));
                                continue;
                            }
                        };
                        let c = &claimed[i];
                        let hash = c.hash.clone().or_else(|| computed.map(dhash::to_hex));
                        if c.hash.is_none() {
                            outcomes[i].hash = hash.clone();
                        }
                        if c.has_vector {
                            continue; // only its hash was missing
                        }
                        let key = match (&hash, w.dedup) {
                            (Some(h), true) if skip_list.contains(h) => {
                                skips.push((i, h.clone()));
                                continue;
                            }
                            (Some(h), true) => h.clone(),
                            _ => format!("row {i}"),
                        };
                        if let Some((_, v)) = inferred.iter().find(|(k, _)| *k == key) {
                            outcomes[i].vector = Some(v.clone());
                            deduped += 1;
                        } else if let Some(g) = groups.iter_mut().find(|g| g.0 == key) {
                            g.1.push(i);
                        } else {
                            groups.push((key, vec![i], slot));
                        }
                    }
                    if w.dedup && !groups.is_empty() {
                        let keys: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
                        let known = as_owner(w.owner, || existing_vectors(w, &tag, &keys));
                        groups.retain(|(h, rows, _)| match known.iter().find(|(k, _)| k == h) {
                            Some((_, v)) => {
                                for &i in rows {
                                    outcomes[i].vector = Some(v.clone());
                                }
                                deduped += rows.len() as i64;
                                false
                            }
                            None => true,
                        });
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
                    phases.infer += running.elapsed();
                    match run {
                        Ok(out) => {
                            for (n, (key, rows, _)) in groups.into_iter().enumerate() {
                                let dim = runner.dim();
                                let v = &out[n * dim..(n + 1) * dim];
                                deduped += rows.len() as i64 - 1;
                                for &i in &rows {
                                    outcomes[i].vector = Some(v.to_vec());
                                }
                                if w.dedup {
                                    inferred.push((key, v.to_vec()));
                                }
                            }
                        }
                        Err(e) => {
                            for (_, rows, _) in &groups {
                                errors.extend(
                                    rows.iter()
                                        .map(|&i| (i, Error::new(e.kind, e.message.clone()))),
                                );
                            }
                        }
                    }
                },
                || {
                    // and while a chunk decodes: within about one image, not one model run
                    check_for_interrupts!();
                },
            );
        });
    }

    if raise {
        if let Some((_, e)) = errors.into_iter().min_by_key(|(i, _)| *i) {
            crate::errors::raise(e);
        }
        errors = Vec::new();
    }
    let mut failures: Vec<Failure> = errors.iter().map(|(i, e)| Failure::of(*i, e)).collect();
    // write: as the owner; rows it cannot write are failures of their own, the rest is written,
    // and failed or skipped rows are marked held (out of the pending index until retried)
    // (not a row whose vector is current and only its hash failed: marking it would take its
    // vector out of search; it stays in the pending index, held back by its record)
    let mut held = vec![false; claimed.len()];
    for i in failures
        .iter()
        .map(|f| f.row)
        .chain(skips.iter().map(|s| s.0))
    {
        held[i] = !claimed[i].has_vector;
    }
    let writing = Instant::now();
    let unwritten = as_owner(w.owner, || {
        write_isolated(w, &tag, &claimed, &outcomes, &held, !raise)
    });
    for f in &unwritten {
        outcomes[f.row] = Outcome::default();
    }
    failures.extend(unwritten);
    let filled = outcomes.iter().filter(|o| o.vector.is_some()).count() as i64;
    as_catalog(catalog_role, || {
        record_failures(w, &claimed, &failures);
        record_skips(w, &claimed, &skips);
        let settled: Vec<String> = claimed
            .iter()
            .zip(&outcomes)
            .filter(|(c, o)| o.vector.is_some() || (c.has_vector && o.hash.is_some()))
            .map(|(c, _)| c.key.clone())
            .collect();
        Spi::run_with_args(
            "DELETE FROM doppler.failures
             WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
               AND row_key OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[])",
            &[w.relid.into(), settled.into()],
        )
        .unwrap_or_else(|e| pgrx::error!("doppler: could not clear failures of {}: {e}", w.name));
    });
    phases.write = writing.elapsed();
    let report = BatchReport {
        claimed: claimed.len() as i64,
        filled,
        failed: failures.len() as i64,
        skipped: skips.len() as i64,
        deduped,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let secs = |d: Duration| d.as_secs_f64();
    let st = &phases.stream;
    pgrx::debug1!(
        "doppler: batch of {} ({}): {} rows claimed, {} filled, {} failed in {:.1} ms: claim {:.1} ms, \
         waited for images {:.1} ms, infer {:.1} ms, write {:.1} ms; decode threads read {:.1} ms, \
         decode {:.1} ms, resize {:.1} ms",
        w.name,
        via.as_str(),
        report.claimed,
        report.filled,
        report.failed,
        report.seconds * 1e3,
        secs(phases.claim) * 1e3,
        secs(st.waited) * 1e3,
        secs(phases.infer) * 1e3,
        secs(phases.write) * 1e3,
        secs(st.read) * 1e3,
        secs(st.decode) * 1e3,
        secs(st.resize) * 1e3
    );
    as_catalog(catalog_role, || {
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
            w.relid.into(),
            (report.claimed as i32).into(),
            (report.filled as i32).into(),
            (report.failed as i32).into(),
            report.seconds.into(),
            via.as_str().into(),
            (report.deduped as i32).into(),
        ];
        // SQL objects older than 0.5.0 (the library is installed, ALTER EXTENSION UPDATE not yet
        // run: README, Upgrading) have no phase columns; the batch is logged without them
        let sql = if crate::privileged::extension_version().is_some_and(|v| has_phase_columns(&v)) {
            args.extend(
                [
                    phases.claim,
                    st.read,
                    st.decode,
                    st.resize,
                    st.waited,
                    phases.infer,
                    phases.write,
                ]
                .map(|d| secs(d).into()),
            );
            "INSERT INTO doppler.batches (relid, claimed, filled, failed, seconds, via, deduped,
                                          claim_s, read_s, decode_s, resize_s, wait_s, infer_s, write_s)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7,
                     $8, $9, $10, $11, $12, $13, $14)"
        } else {
            "INSERT INTO doppler.batches (relid, claimed, filled, failed, seconds, via, deduped)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7)"
        };
        Spi::run_with_args(sql, &args)
            .unwrap_or_else(|e| pgrx::error!("doppler: could not log a batch: {e}"));
    });
    report
}

/// Whether doppler.batches has the phase columns: SQL objects of 0.5.0 or later.
fn has_phase_columns(version: &str) -> bool {
    let part = |i: usize| -> u32 {
        version
            .split('.')
            .nth(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    (part(0), part(1)) >= (0, 5)
}

/// For `fill`, once its claims find nothing: waits until the transactions that hold rows of
/// `relid` with work to do end (the worker's batch, another fill, a sync statement, or any
/// transaction that locked them), one row at a time, then says whether a row is left that a
/// claim can take. The claim's own query without SKIP LOCKED, for one row; as the table owner.
/// Batches wait for no row, so a batch and this wait never deadlock. The wait keeps the locks
/// of rows it found filled meanwhile until fill commits: a deadlock with another transaction
/// over those (or a serialization failure, under REPEATABLE READ) rolls the wait back and says
/// true, and fill tries again in a new transaction. A cancel or `lock_timeout` ends the wait
/// with its error.
pub fn wait_for_holders(relid: pg_sys::Oid) -> bool {
    let Some(w) = &lock_watched(relid, Via::Fill, pg_sys::RowShareLock as pg_sys::LOCKMODE) else {
        return false;
    };
    let tag = w.spec().tag();
    match in_subtransaction(|| as_owner(w.owner, || claim(w, 1, None, &tag, Locked::Wait))) {
        Ok((rows, _, _)) => !rows.is_empty(),
        Err((code, _)) if retried(code) => true,
        Err((code, message)) => crate::errors::raise_code(code, message, ""),
    }
}

/// Errors of a lock wait that end when the transaction does: deadlock and serialization
/// failures. Never a reason to read a row another way.
fn retried(code: PgSqlErrorCode) -> bool {
    code == PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
        || code == PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
}

/// Claims up to `limit` rows to embed (locked, FOR NO KEY UPDATE SKIP LOCKED: doppler writes no
/// key column, so an open transaction that references a row by foreign key does not hold it
/// back), as the table owner:
/// 1. rows whose failure record is due for a retry, found through doppler.failures' index on
///    `next_attempt` (held rows are out of the pending index: [`HELD`]);
/// 2. rows without a vector (or without a hash), through the pending index `watch` creates (a
///    partial index over exactly those rows, held rows left out), so the cost follows the batch,
///    not the table;
/// 3. if that leaves room, rows whose vector is from another model: a scan of the table, done
///    until one finds none for this model tag (recorded in doppler.watched; a new model version
///    changes the tag, `watch` clears it).
///
/// With `only` (the sync trigger's rows), one query over those keys. Runs as the table owner;
/// returns the rows, the model tag to record when the scan found no outdated row, and the keys
/// of due failure records whose row is gone or has nothing left to do (records to forget).
fn claim(
    w: &Watched,
    limit: i64,
    only: Option<&[String]>,
    tag: &str,
    locked: Locked,
) -> (Vec<Claimed>, Option<String>, Vec<String>) {
    if only.is_some() {
        return (
            claim_where(w, limit, only, tag, None, locked),
            None,
            Vec::new(),
        );
    }
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
    let due = due_retries(w, limit);
    let mut obsolete = Vec::new();
    if !due.is_empty() {
        // (keys are cast to the key's type, so that its index serves them; a record whose key no
        // longer fits it, after the key's type changed, must not stop every claim: then the keys
        // are compared as text, a scan, until those records settle. Other errors are raised.)
        let (more, by) =
            match in_subtransaction(|| claim_where(w, limit, Some(&due), tag, None, locked)) {
                Ok(more) => (more, w.clone()),
                // (a lock wait's error is not the key's: raised as it came)
                Err((code, message))
                    if retried(code) || code == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE =>
                {
                    crate::errors::raise_code(code, message, "")
                }
                Err(_) => {
                    let text = Watched {
                        key_type: None,
                        ..w.clone()
                    };
                    (
                        claim_where(&text, limit, Some(&due), tag, None, locked),
                        text,
                    )
                }
            };
        add(&mut rows, more);
        if rows.len() < due.len() {
            obsolete = without_work(&by, &due, tag);
        }
    }
    if (rows.len() as i64) < limit {
        let pending = w.pending_index_over("t");
        let more = claim_where(
            w,
            limit - rows.len() as i64,
            None,
            tag,
            Some(&pending),
            locked,
        );
        add(&mut rows, more);
    }
    let mut no_stale = None;
    if (rows.len() as i64) < limit && w.stale_scan.as_deref() != Some(tag) {
        let outside = format!("NOT {} AND {}", w.pending_over("t"), w.unheld_over("t"));
        let more = claim_where(
            w,
            limit - rows.len() as i64,
            None,
            tag,
            Some(&outside),
            locked,
        );
        if more.is_empty() && w.has_stale_scan && !any_stale(w, tag) {
            no_stale = Some(tag.to_string());
        }
        add(&mut rows, more);
    }
    (rows, no_stale, obsolete)
}

/// Of these keys, those of no row with work to do (deleted, filled by hand, source set NULL):
/// a due failure record of such a key would come up in every claim. Rows locked by another
/// claim still count as rows with work. As the table owner.
fn without_work(w: &Watched, keys: &[String], tag: &str) -> Vec<String> {
    let matches = match &w.key_type {
        Some(ty) => format!("t.{} = k.k::{ty}", quote_identifier(&w.key_columns[0])),
        None => format!("{} = k.k", w.key_expr()),
    };
    let todo = w.todo_over("t", tag);
    w.check_name();
    Spi::connect(|c| {
        c.select(
            &format!(
                "SELECT k.k FROM pg_catalog.unnest($1::pg_catalog.text[]) AS k(k)
                 WHERE NOT EXISTS (SELECT FROM {table} t WHERE {matches} AND {todo}
                                     AND t.{src} IS NOT NULL)",
                table = w.name,
                src = quote_identifier(&w.source_column),
            ),
            None,
            &[keys.to_vec().into()],
        )?
        .map(|r| r.get::<String>(1).map(|k| k.unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| pgrx::error!("doppler: could not look up rows of {}: {e}", w.name))
}

/// Deletes the due failure records of these keys (not one a concurrent batch has just written
/// again, for a new row with the same key). As the extension owner.
fn forget_failures(w: &Watched, keys: &[String]) {
    Spi::run_with_args(
        "DELETE FROM doppler.failures
         WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
           AND row_key OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[])
           AND next_attempt OPERATOR(pg_catalog.<=) pg_catalog.now()",
        &[w.relid.into(), keys.to_vec().into()],
    )
    .unwrap_or_else(|e| pgrx::error!("doppler: could not clear failures of {}: {e}", w.name));
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
    .unwrap_or_else(|e| pgrx::error!("doppler: could not read the failures of {}: {e}", w.name))
}

/// Whether any row outside the pending index has a vector from another model (failed or locked
/// rows included, held rows not: only a table without any may skip the scan). Called as the
/// table owner.
fn any_stale(w: &Watched, tag: &str) -> bool {
    let current = w.current_vector_over("t", &quote_literal(tag));
    w.check_name();
    Spi::get_one::<bool>(&format!(
        "SELECT EXISTS (SELECT FROM {} t WHERE NOT {} AND {} AND t.{} IS NOT NULL AND NOT {current})",
        w.name,
        w.pending_over("t"),
        w.unheld_over("t"),
        quote_identifier(&w.source_column)
    ))
    .unwrap_or_else(|e| pgrx::error!("doppler: could not scan {}: {e}", w.name))
    .unwrap_or(true)
}

/// What a claim does with a row to do that another transaction holds (row-locked).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Locked {
    /// `SKIP LOCKED`: a batch takes the rows nobody holds.
    Skip,
    /// Waits for the holder to end, then takes the row if it is still to do ([`wait_for_holders`]).
    Wait,
}

/// One claim query: the rows to do (`narrow`: and this condition over alias `t`).
fn claim_where(
    w: &Watched,
    limit: i64,
    only: Option<&[String]>,
    tag: &str,
    narrow: Option<&str>,
    locked: Locked,
) -> Vec<Claimed> {
    let key = w.key_expr();
    let src = quote_identifier(&w.source_column);
    let shown = w.shown_expr();
    let only_filter = match (only, &w.key_type) {
        (None, _) => String::new(),
        // one-column key: compare in its own type, so its index can serve
        (Some(_), Some(ty)) => format!(
            "AND t.{} = ANY ($3::pg_catalog.text[]::{ty}[])",
            quote_identifier(&w.key_columns[0])
        ),
        (Some(_), None) => format!("AND {key} = ANY ($3::pg_catalog.text[])"),
    };
    let narrow = narrow.map(|n| format!("{n} AND")).unwrap_or_default();
    let current = w.current_vector_over("t", &quote_literal(tag));
    let todo = w.todo_over("t", tag);
    let hash_sel = match &w.hash_column {
        Some(h) => format!("t.{}::pg_catalog.text", quote_identifier(h)),
        None => "NULL::pg_catalog.text".to_string(),
    };
    // A failure record holds the row back only while its source is unchanged. Runs as the
    // table owner, who sees the failure records of its own tables (row-level security).
    w.check_name();
    let sql = format!(
        "SELECT t.ctid::pg_catalog.text, t.tableoid, {key}, t.{src}, {shown}, {hash_sel}, {current}
         FROM {table} t
         WHERE {narrow} {todo} AND t.{src} IS NOT NULL {only_filter}
           AND NOT EXISTS (SELECT FROM doppler.failures f
                           WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                             AND f.row_key OPERATOR(pg_catalog.=) {key}
                             AND f.source IS NOT DISTINCT FROM {shown}
                             AND (f.next_attempt IS NULL OR f.next_attempt OPERATOR(pg_catalog.>) pg_catalog.now()))
         LIMIT $2
         FOR NO KEY UPDATE OF t {skip}",
        table = w.name,
        skip = if locked == Locked::Skip { "SKIP LOCKED" } else { "" },
    );
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![w.relid.into(), limit.into()];
    if let Some(keys) = only {
        args.push(keys.to_vec().into());
    }
    let bytes = w.source_kind == "bytea";
    Spi::connect_mut(|client: &mut SpiClient| {
        let rows = client.update(&sql, None, &args)?;
        let mut out = Vec::new();
        for r in rows {
            let ctid: String = r.get(1)?.unwrap_or_default();
            let tableoid: pg_sys::Oid = r.get(2)?.unwrap_or(pg_sys::InvalidOid);
            let key: String = r.get(3)?.unwrap_or_default();
            let shown: String = r.get(5)?.unwrap_or_default();
            let source = if bytes {
                Source::Bytes(r.get::<Vec<u8>>(4)?.unwrap_or_default())
            } else {
                Source::Path(r.get::<String>(4)?.unwrap_or_default())
            };
            let hash: Option<String> = r.get(6)?;
            let has_vector: bool = r.get(7)?.unwrap_or(false);
            out.push(Claimed {
                ctid,
                tableoid,
                key,
                source,
                shown,
                hash,
                has_vector,
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| pgrx::error!("doppler: could not claim rows of {}: {e}", w.name))
}

/// Writes the outcomes of `rows`. With `isolate`, a row that cannot be written (a CHECK, a
/// trigger, a too-narrow hash column, a NaN into pgvector) does not take the batch down: the
/// batch is written in one subtransaction, and when that fails, row by row, each in its own;
/// the rows that fail are returned with their error. Without, the first error is raised (the
/// sync trigger with on_error => raise: the writing statement fails).
fn write_isolated(
    w: &Watched,
    tag: &str,
    claimed: &[Claimed],
    outcomes: &[Outcome],
    held: &[bool],
    isolate: bool,
) -> Vec<Failure> {
    let written = |i: usize| outcomes[i].vector.is_some() || outcomes[i].hash.is_some();
    let rows: Vec<usize> = (0..claimed.len())
        .filter(|&i| written(i) || held[i])
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    if !isolate {
        write_rows(w, tag, claimed, outcomes, held, &rows);
        return Vec::new();
    }
    if in_subtransaction(|| write_rows(w, tag, claimed, outcomes, held, &rows)).is_ok() {
        return Vec::new();
    }
    rows.into_iter()
        .filter_map(|i| {
            let err = in_subtransaction(|| write_rows(w, tag, claimed, outcomes, held, &[i])).err();
            // (a row that only failed to be marked held keeps its own failure, and stays in the
            // pending index, where its record holds it back)
            err.filter(|_| written(i)).map(|(code, msg)| Failure {
                row: i,
                class: "write",
                sqlstate: unpack_sqlstate(code as i32),
                message: format!("could not write the row's features into {}: {msg}", w.name),
            })
        })
        .collect()
}

/// Writes the rows' vectors and hashes, and the model tag: the current one where a vector is
/// written, [`HELD`] where the row failed or was skipped. By ctid, in the claiming transaction.
fn write_rows(
    w: &Watched,
    tag: &str,
    claimed: &[Claimed],
    outcomes: &[Outcome],
    held: &[bool],
    rows: &[usize],
) {
    let vec = quote_identifier(&w.vector_column);
    let hash_set = match &w.hash_column {
        Some(h) => {
            let h = quote_identifier(h);
            format!(", {h} = coalesce({h}, $5)")
        }
        None => String::new(),
    };
    let mc = quote_identifier(&w.model_column);
    w.check_name();
    let sql = format!(
        "UPDATE {table} SET {vec} = coalesce({param}, {vec}),
                {mc} = CASE WHEN $1 IS NOT NULL THEN {tag} WHEN $4 THEN {held}::pg_catalog.text ELSE {mc} END{hash_set}
         WHERE ctid OPERATOR(pg_catalog.=) $2::pg_catalog.tid AND tableoid OPERATOR(pg_catalog.=) $3",
        table = w.name,
        param = w.vector_param(),
        tag = quote_literal(tag),
        held = quote_literal(HELD),
    );
    let mut types = vec![
        pgrx::PgOid::from(pg_sys::FLOAT4ARRAYOID),
        pgrx::PgOid::from(pg_sys::TEXTOID),
        pgrx::PgOid::from(pg_sys::OIDOID),
        pgrx::PgOid::from(pg_sys::BOOLOID),
    ];
    if w.hash_column.is_some() {
        types.push(pgrx::PgOid::from(pg_sys::TEXTOID));
    }
    Spi::connect_mut(|client| {
        let stmt = client.prepare_mut(&sql, &types)?;
        for &i in rows {
            let (c, o) = (&claimed[i], &outcomes[i]);
            let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
                o.vector.clone().into(),
                c.ctid.as_str().into(),
                c.tableoid.into(),
                held[i].into(),
            ];
            if w.hash_column.is_some() {
                args.push(o.hash.clone().into());
            }
            w.check_name(); // (a plan invalidated by a rename would look the name up again)
            client.update(&stmt, None, &args)?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| pgrx::error!("doppler: could not write vectors into {}: {e}", w.name));
}

/// Vectors the table already has for these hashes (dedup), as real[].
fn existing_vectors(w: &Watched, tag: &str, hashes: &[String]) -> Vec<(String, Vec<f32>)> {
    let Some(h) = &w.hash_column else {
        return Vec::new();
    };
    let (h, vec) = (quote_identifier(h), quote_identifier(&w.vector_column));
    w.check_name();
    let sql = format!(
        "SELECT DISTINCT ON (t.{h}) t.{h}::pg_catalog.text, t.{vec}::pg_catalog.float4[] FROM {table} t
         WHERE t.{h} = ANY ($1::pg_catalog.text[]) AND {current}",
        table = w.name,
        current = w.current_vector_over("t", &quote_literal(tag)),
    );
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
    .unwrap_or_else(|e| pgrx::error!("doppler: could not look up known hashes in {}: {e}", w.name))
}

/// Rows whose hash is a skip hash: recorded as skipped (class skip_hash, never retried).
fn record_skips(w: &Watched, claimed: &[Claimed], skips: &[(usize, String)]) {
    for (i, h) in skips {
        let c = &claimed[*i];
        Spi::run_with_args(
            "INSERT INTO doppler.failures AS f (relid, row_key, source, error_class, sqlstate, message, next_attempt)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, 'skip_hash', '00000', $4, NULL)
             ON CONFLICT (relid, row_key) DO UPDATE SET source = EXCLUDED.source, error_class = 'skip_hash',
                sqlstate = '00000', message = EXCLUDED.message, last_attempt = pg_catalog.now(), next_attempt = NULL",
            &[
                w.relid.into(),
                c.key.as_str().into(),
                c.shown.as_str().into(),
                format!("skipped: its hash {h} is in doppler.skip_hashes").into(),
            ],
        )
        .unwrap_or_else(|e| pgrx::error!("doppler: could not record a skipped row of {}: {e}", w.name));
    }
}

/// A row that could not be filled: why, as doppler.failures records it.
struct Failure {
    row: usize,
    class: &'static str,
    sqlstate: String,
    message: String,
}

impl Failure {
    fn of(row: usize, e: &Error) -> Failure {
        Failure {
            row,
            class: e.kind.as_str(),
            sqlstate: unpack_sqlstate(sqlstate(e.kind) as i32),
            message: e.message.clone(),
        }
    }
}

fn record_failures(w: &Watched, claimed: &[Claimed], errors: &[Failure]) {
    if errors.is_empty() {
        return;
    }
    let sql = "
        INSERT INTO doppler.failures AS f (relid, row_key, source, error_class, sqlstate, message, next_attempt)
        VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6,
                CASE WHEN $7::pg_catalog.int4 OPERATOR(pg_catalog.<=) 1 THEN NULL
                     ELSE pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $8::pg_catalog.float8) END)
        ON CONFLICT (relid, row_key) DO UPDATE
           SET source = EXCLUDED.source, error_class = EXCLUDED.error_class, sqlstate = EXCLUDED.sqlstate,
               message = EXCLUDED.message, attempts = f.attempts OPERATOR(pg_catalog.+) 1, last_attempt = pg_catalog.now(),
               next_attempt = CASE WHEN f.attempts OPERATOR(pg_catalog.+) 1 OPERATOR(pg_catalog.>=) $7::pg_catalog.int4 THEN NULL
                                   ELSE pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs =>
                                        $8::pg_catalog.float8 OPERATOR(pg_catalog.*)
                                        pg_catalog.power(2::pg_catalog.float8, f.attempts::pg_catalog.float8)) END";
    let max_attempts = gucs::MAX_ATTEMPTS.get();
    let backoff = gucs::RETRY_BACKOFF.get() as f64;
    Spi::connect_mut(|client| {
        for e in errors {
            let c = &claimed[e.row];
            client.update(
                sql,
                None,
                &[
                    w.relid.into(),
                    c.key.as_str().into(),
                    c.shown.as_str().into(),
                    e.class.into(),
                    e.sqlstate.as_str().into(),
                    e.message.as_str().into(),
                    max_attempts.into(),
                    backoff.into(),
                ],
            )?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| pgrx::error!("doppler: could not record failures of {}: {e}", w.name));
}

/// Postgres packs the five SQLSTATE characters six bits each.
pub fn unpack_sqlstate(code: i32) -> String {
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}
