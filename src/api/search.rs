//! Reverse image search and near-duplicate groups.
//!
//! * `doppler.l2_distance(real[], real[])`, `doppler.cosine_distance(real[], real[])`: exact
//!   distances in Rust (IMMUTABLE), for `real[]` columns.
//! * `doppler.similar(tbl, query, k, metric)`: the k nearest rows of a watched table to a path,
//!   image bytes or a feature vector: an exact scan on `real[]` columns; pgvector's operators (and
//!   its HNSW index, when `doppler.create_index` built one) on `vector`/`halfvec` columns.
//! * `doppler.create_index(tbl, metric)`: HNSW over `(col::halfvec(n))` for `vector(n)` columns
//!   (pgvector cannot index a 2048-d `vector`, but can a `halfvec`), or over `col` for `halfvec`.
//! * `doppler.duplicates(tbl, max_bits)`: groups of rows whose dHashes are within `max_bits`,
//!   largest first (the seed's "most re-posted images").

use doppler_core::dhash;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};

use crate::errors::{raise, Code, SpiOrRaise};
use crate::gucs;
use crate::privileged::{acts_as, as_owner, current_user, owned_table};
use crate::watch::free_index_name;
use crate::watched::kinds::closed_set;
use crate::watched::{self, lock_for_reading, SourceKind, VectorKind, Watched};

closed_set!(
    /// A distance `similar` orders by, or an index `create_index` builds.
    Metric, "metric", {
    /// Euclidean distance.
    L2 => "l2",
    /// Cosine distance.
    Cosine => "cosine",
    /// Hamming distance between dHashes (an index only: `create_index(tbl, 'hamming')`).
    Hamming => "hamming",
    /// Hamming distance between PDQ hashes (an index only: `create_index(tbl, 'pdq')`).
    Pdq => "pdq",
});

fn same_len(a: &[f32], b: &[f32]) {
    if a.len() != b.len() {
        raise(
            Code::ERRCODE_DATA_EXCEPTION,
            format!("different vector dimensions {} and {}", a.len(), b.len()),
            "",
        );
    }
}

#[pg_extern(immutable, strict, parallel_safe)]
fn l2_distance(a: Vec<f32>, b: Vec<f32>) -> f64 {
    same_len(&a, &b);
    a.iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[pg_extern(immutable, strict, parallel_safe)]
fn cosine_distance(a: Vec<f32>, b: Vec<f32>) -> f64 {
    same_len(&a, &b);
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        dot += x as f64 * y as f64;
        na += (x as f64).powi(2);
        nb += (y as f64).powi(2);
    }
    if na == 0.0 || nb == 0.0 {
        return f64::NAN;
    }
    1.0 - dot / (na.sqrt() * nb.sqrt())
}

/// The watched table, which the caller may read: doppler scans it as its owner (so the owner's
/// casts and operators never run with the caller's rights), after checking that the caller may
/// SELECT it. Row-level security that would hide rows from the caller cannot be honoured by a
/// scan as the owner: such a caller is refused.
pub(super) fn readable(relid: pg_sys::Oid) -> Watched {
    let w = watched(relid);
    if acts_as(current_user(), w.owner) {
        lock_for_reading(relid);
        return w;
    }
    let (may_select, rls) = Spi::get_two_with_args::<bool, bool>(
        "SELECT pg_catalog.has_table_privilege($1::pg_catalog.oid, 'SELECT'),
                pg_catalog.row_security_active($1::pg_catalog.oid)",
        &[relid.into()],
    )
    .unwrap_or((None, None));
    if may_select != Some(true) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for table {}", w.name),
            "doppler.similar and doppler.duplicates need SELECT on the table.",
        );
    }
    if rls != Some(false) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("table {} has row-level security for this role", w.name),
            "doppler searches a table as its owner; with row-level security in force only the owner may.",
        );
    }
    lock_for_reading(relid);
    w
}

fn watched(relid: pg_sys::Oid) -> Watched {
    watched::load_or_raise(
        relid,
        "doppler.similar and doppler.duplicates work on watched tables (doppler.watch).",
    )
}

/// The source as the search functions show it, over alias `t`: the path, or the size of the
/// image bytes.
pub(super) fn source_text(w: &Watched) -> String {
    if w.source_kind == SourceKind::Bytea {
        format!(
            "pg_catalog.format('bytea, %s bytes', pg_catalog.octet_length(t.{}))",
            quote_identifier(&w.source_column)
        )
    } else {
        format!("t.{}::pg_catalog.text", quote_identifier(&w.source_column))
    }
}

/// The HNSW index doppler would use for `w`'s vector column and metric, if one exists.
fn hnsw_index(w: &Watched, ops: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT c.relname::pg_catalog.text FROM pg_catalog.pg_index i
         JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid
         JOIN pg_catalog.pg_am a ON a.oid OPERATOR(pg_catalog.=) c.relam
         JOIN pg_catalog.pg_opclass o ON o.oid OPERATOR(pg_catalog.=) i.indclass[0]
         WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND a.amname OPERATOR(pg_catalog.=) 'hnsw'::pg_catalog.name
           AND o.opcname OPERATOR(pg_catalog.=) $2::pg_catalog.name LIMIT 1",
        &[w.relid.into(), ops.into()],
    )
    .ok()
    .flatten()
}

fn dims(w: &Watched) -> i32 {
    Spi::get_one_with_args::<i32>(
        "SELECT atttypmod FROM pg_catalog.pg_attribute
         WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) $2::pg_catalog.name",
        &[w.relid.into(), w.vector_column.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(-1)
}

fn search(
    relid: pg_sys::Oid,
    q: Vec<f32>,
    k: i32,
    metric: &str,
    filter: Option<&str>,
) -> Vec<(String, Option<String>, f64)> {
    let w = readable(relid);
    let filter_sql = filter.map(|f| filter_over(&w, f, "$3"));
    let cosine = match Metric::parse(metric) {
        Some(Metric::L2) => false,
        Some(Metric::Cosine) => true,
        _ => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("metric must be l2 or cosine, not \"{metric}\""),
            "",
        ),
    };
    let vec = format!("t.{}", quote_identifier(&w.vector_column));
    let src = source_text(&w);
    let key = w.key_over("t");
    // pgvector's names, qualified: the scan runs under the pinned search_path
    let nsp = &w.vector_schema;
    let (op, suffix) = if cosine {
        (format!("OPERATOR({nsp}.<=>)"), "cosine")
    } else {
        (format!("OPERATOR({nsp}.<->)"), "l2")
    };
    let (vector, halfvec) = (format!("{nsp}.vector"), format!("{nsp}.halfvec"));
    let (distance, order) = match w.vector_kind {
        VectorKind::Real => {
            let f = if cosine {
                "doppler.cosine_distance"
            } else {
                "doppler.l2_distance"
            };
            (format!("{f}({vec}, $1)"), "3".to_string())
        }
        VectorKind::Vector => {
            let n = dims(&w);
            let exact = format!("({vec} {op} $1::pg_catalog.float4[]::{vector})");
            // the halfvec expression index, when there is one; exact distances are reported
            match hnsw_index(&w, &format!("halfvec_{suffix}_ops")) {
                Some(_) if n > 0 => (
                    exact,
                    format!(
                        "({vec}::{halfvec}({n})) {op} ($1::pg_catalog.float4[]::{halfvec}({n}))"
                    ),
                ),
                _ => (exact, "3".to_string()),
            }
        }
        VectorKind::Halfvec => (
            format!("({vec} {op} $1::pg_catalog.float4[]::{halfvec})"),
            format!("{vec} {op} $1::pg_catalog.float4[]::{halfvec}"),
        ),
    };
    // only vectors of the table's current model (during a re-embed, old ones are skipped)
    let current = w.current_vector_over("t", &quote_literal(w.spec().tag()));
    let filtered = filter_sql.map(|f| format!(" AND {f}")).unwrap_or_default();
    let sql = format!(
        "SELECT {key}, {src}, {distance}::pg_catalog.float8 FROM {table} t WHERE {current}{filtered} ORDER BY {order} LIMIT $2",
        table = w.name
    );
    // The HNSW index yields hnsw.ef_search candidates, and the filters (stale vectors, the
    // caller's filter) may drop most of them: pgvector 0.8's iterative scan goes on until k rows
    // pass (up to hnsw.max_scan_tuples), in exact distance order. For this query only.
    let before = if w.vector_kind != VectorKind::Real {
        iterative_scan()
    } else {
        None
    };
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![q.into(), (k.max(0) as i64).into()];
    if let Some(f) = filter {
        args.push(f.into());
    }
    let found = as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            c.select(&sql, None, &args)?
                .map(|r| {
                    Ok((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<String>(2)?,
                        r.get::<f64>(3)?.unwrap_or(f64::NAN),
                    ))
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })
    .or_raise(|| format!("could not search {}", w.name));
    restore_setting(before);
    found
}

/// `hnsw.iterative_scan = strict_order` for the next query, when the installed pgvector has it
/// (0.8 and later). Loading pgvector first registers its settings. Returns what
/// [`restore_setting`] puts back.
fn iterative_scan() -> Option<(&'static str, String)> {
    // pgvector's own type, by its extension's schema: never the column type's schema, which the
    // table owner chooses (a domain named vector there would run the owner's CHECK as the caller)
    let schema = Spi::get_one::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname::pg_catalog.text) FROM pg_catalog.pg_extension e
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
         WHERE e.extname OPERATOR(pg_catalog.=) 'vector'::pg_catalog.name",
    )
    .ok()
    .flatten()?;
    Spi::get_one::<String>(&format!("SELECT '[0]'::{schema}.vector::pg_catalog.text")).ok()?;
    set_for_query("hnsw.iterative_scan", "strict_order")
}

/// Sets a planner or pgvector setting for the query that follows (transaction-local, so an error
/// also undoes it); None when the setting does not exist here.
pub(super) fn set_for_query(name: &'static str, value: &str) -> Option<(&'static str, String)> {
    let before = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.current_setting($1, true)",
        &[name.into()],
    )
    .ok()
    .flatten()?;
    Spi::run_with_args(
        "SELECT pg_catalog.set_config($1, $2, true)",
        &[name.into(), value.into()],
    )
    .ok()?;
    Some((name, before))
}

pub(super) fn restore_setting(before: Option<(&'static str, String)>) {
    if let Some((name, value)) = before {
        let _ = Spi::run_with_args(
            "SELECT pg_catalog.set_config($1, $2, true)",
            &[name.into(), value.as_str().into()],
        );
    }
}

/// `similar`'s filter: a JSON object of column → value; a row passes when each named column
/// equals the value, converted to that column's type (without its typmod, so that a value is
/// never rounded into a match; with its collation) by jsonb_to_record, once per query. The JSON is read by PostgreSQL (exact numbers, its own
/// errors), keys are checked against the table's columns and quoted, and values travel as the
/// parameter `param` (text), never in the SQL text. A JSON null matches nothing (`= NULL`).
fn filter_over(w: &Watched, filter: &str, param: &str) -> String {
    let keys = Spi::connect(|c| {
        let kind = c
            .select(
                "SELECT pg_catalog.jsonb_typeof($1::pg_catalog.jsonb)",
                Some(1),
                &[filter.into()],
            )?
            .first()
            .get::<String>(1)?;
        if kind.as_deref() != Some("object") {
            return Ok(None);
        }
        // each key with its column's type, NULL where the table has no such column
        c.select(
            "SELECT k, (SELECT pg_catalog.format_type(a.atttypid, NULL) OPERATOR(pg_catalog.||)
                               CASE WHEN a.attcollation OPERATOR(pg_catalog.=) 0 THEN ''
                                    ELSE (SELECT ' COLLATE ' OPERATOR(pg_catalog.||) pg_catalog.format('%I.%I', n.nspname, o.collname)
                                          FROM pg_catalog.pg_collation o
                                          JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.collnamespace
                                          WHERE o.oid OPERATOR(pg_catalog.=) a.attcollation) END
                        FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid OPERATOR(pg_catalog.=) $2 AND a.attname::pg_catalog.text OPERATOR(pg_catalog.=) k
                          AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped)
             FROM pg_catalog.jsonb_object_keys($1::pg_catalog.jsonb) k ORDER BY k",
            None,
            &[filter.into(), w.relid.into()],
        )?
        .map(|r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?)))
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        .map(Some)
    })
    .or_raise(|| "could not read the filter of similar".into());
    let Some(keys) = keys else {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "filter must be a JSON object of column names and values",
            "For example: filter => '{\"site\": \"example.org\"}'.",
        )
    };
    let mut conds = Vec::new();
    for (col, typ) in keys {
        let Some(typ) = typ else {
            raise(
                Code::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "column {} of table {} does not exist",
                    quote_identifier(&col),
                    w.name
                ),
                "The filter's keys are column names of the table.",
            )
        };
        let c = quote_identifier(&col);
        conds.push(format!(
            "t.{c} OPERATOR(pg_catalog.=) (SELECT r.{c} FROM pg_catalog.jsonb_to_record({param}::pg_catalog.jsonb) AS r({c} {typ}))"
        ));
    }
    if conds.is_empty() {
        "true".into()
    } else {
        conds.join(" AND ")
    }
}

/// The k rows nearest to a feature vector (the SQL overloads for paths and bytes extract the
/// query's features first, with extract_features' privileges and limits). Without a filter: the
/// signature SQL objects before 0.3.0 call.
#[pg_extern(name = "_similar", stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn similar_vector(
    relid: pg_sys::Oid,
    query: Vec<f32>,
    k: i32,
    metric: &str,
) -> TableIterator<
    'static,
    (
        name!(row_key, String),
        name!(source, Option<String>),
        name!(distance, f64),
    ),
> {
    TableIterator::new(search(relid, query, k, metric, None))
}

/// The same with a filter on other columns (jsonb as text, so that PostgreSQL reads it; NULL:
/// none).
#[pg_extern(name = "_similar", stable, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn similar_vector_filtered(
    relid: Option<pg_sys::Oid>,
    query: Option<Vec<f32>>,
    k: Option<i32>,
    metric: Option<&str>,
    filter: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(row_key, String),
        name!(source, Option<String>),
        name!(distance, f64),
    ),
> {
    // strict in all but the filter
    let (Some(relid), Some(query), Some(k), Some(metric)) = (relid, query, k, metric) else {
        return TableIterator::new(Vec::new());
    };
    TableIterator::new(search(relid, query, k, metric, filter))
}

/// Builds pgvector's HNSW index for a watched table's vector column; returns its name.
#[pg_extern(volatile, strict, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _create_index(relid: pg_sys::Oid, metric: &str) -> String {
    owned_table(relid);
    let w = watched(relid);
    lock_for_reading(relid);
    let ops = match Metric::from_arg(metric) {
        Metric::Hamming => return hash_index(&w).create(&w),
        Metric::Pdq => return super::pdq::create_pdq_index(&w),
        Metric::L2 => "halfvec_l2_ops",
        Metric::Cosine => "halfvec_cosine_ops",
    };
    if let Some(existing) = hnsw_index(&w, ops) {
        notice!("doppler: {} already has the HNSW index {existing}", w.name);
        return existing;
    }
    let vec = quote_identifier(&w.vector_column);
    let n = dims(&w);
    let nsp = &w.vector_schema;
    let expr = match w.vector_kind {
        VectorKind::Vector if n > 0 => format!("(({vec})::{nsp}.halfvec({n}))"),
        VectorKind::Halfvec => vec.clone(),
        VectorKind::Vector => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("vector column {vec} of {} has no fixed dimensions", w.name),
            "Declare it as vector(2048) so that it can be indexed as halfvec(2048).",
        ),
        VectorKind::Real => raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "{} stores features as real[], which pgvector cannot index",
                w.name
            ),
            "Use a vector(n) or halfvec(n) column; doppler.similar scans real[] columns exactly.",
        ),
    };
    as_owner(w.owner, || {
        w.check_name();
        Spi::run(&format!(
            "CREATE INDEX ON {} USING hnsw ({expr} {nsp}.{ops})",
            w.name
        ))
    })
    .or_raise(|| format!("could not create the HNSW index on {}", w.name));
    hnsw_index(&w, ops).unwrap_or_default()
}

/// Groups of rows whose hashes are within `max_bits` of each other (single linkage), largest
/// first; rows with skip hashes (doppler.skip_hashes) or no hash are left out.
#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _duplicates(
    relid: pg_sys::Oid,
    max_bits: i32,
) -> TableIterator<
    'static,
    (
        name!(group_id, i32),
        name!(size, i32),
        name!(row_keys, Vec<String>),
        name!(hashes, Vec<String>),
    ),
> {
    let w = readable(relid);
    if max_bits < 0 {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_bits must be 0 or more, not {max_bits}"),
            "",
        );
    }
    let Some(h) = &w.hash_column else {
        raise(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("{} is watched without a hash column", w.name),
            "doppler.watch(tbl, ..., hash_column => 'd_hash') makes the worker fill one.",
        )
    };
    // Read in chunks of 1 024 heap pages (of each partition), each as two arrays: one SPI row per chunk instead of
    // one per table row (SPI's per-row cost dominated on millions of rows), and no array near
    // the 1 GB limit of a value however large the table.
    let sql = format!(
        "SELECT pg_catalog.array_agg({key}), pg_catalog.array_agg(t.{h}::pg_catalog.text) FROM {table} t
         WHERE t.{h} IS NOT NULL
         GROUP BY t.tableoid, ((t.ctid::pg_catalog.text::pg_catalog.point)[0]::pg_catalog.int8 OPERATOR(pg_catalog./) 1024)",
        key = w.key_over("t"),
        h = quote_identifier(h),
        table = w.name
    );
    let skip = gucs::skip_hashes();
    let (mut keys, mut hashes, mut bits) = (Vec::new(), Vec::new(), Vec::new());
    as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            for chunk in c.select(&sql, None, &[])? {
                check_for_interrupts!();
                let (Some(ks), Some(hs)) = (
                    chunk.get::<pgrx::Array<&str>>(1)?,
                    chunk.get::<pgrx::Array<&str>>(2)?,
                ) else {
                    continue;
                };
                for (key, hash) in ks.iter().zip(hs.iter()) {
                    let (Some(key), Some(hash)) = (key, hash) else {
                        continue;
                    };
                    if skip.iter().any(|s| s == hash) {
                        continue;
                    }
                    if let Some(b) = dhash::parse_hex(hash) {
                        keys.push(key.to_string());
                        hashes.push(hash.to_string());
                        bits.push(b);
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
    })
    .or_raise(|| format!("could not read the hashes of {}", w.name));
    // exact groups by multi-index hashing (doppler_core::near: the same pairs as comparing all);
    // cancel and statement_timeout act while pairs are compared
    let groups = doppler_core::near::groups(&bits, max_bits.clamp(0, 64) as u32, &mut || {
        check_for_interrupts!();
    });
    let mut out: Vec<(Vec<String>, Vec<String>)> = groups
        .into_iter()
        .map(|rows| {
            // one string per hash value (the first row's spelling)
            let mut seen = std::collections::HashSet::new();
            let mut hs: Vec<String> = rows
                .iter()
                .filter(|&&r| seen.insert(bits[r]))
                .map(|&r| hashes[r].clone())
                .collect();
            hs.sort_unstable();
            (
                rows.iter().map(|&r| std::mem::take(&mut keys[r])).collect(),
                hs,
            )
        })
        .collect();
    // largest first; ties in the order of their hashes (not of the scan)
    out.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.1.cmp(&b.1)));
    TableIterator::new(
        out.into_iter()
            .enumerate()
            .map(|(i, (keys, hashes))| (i as i32 + 1, keys.len() as i32, keys, hashes)),
    )
}

/// What the near-duplicate index's comment says: doppler finds its index by it.
pub const HASH_INDEX_COMMENT: &str = "doppler: dHash chunks for near-duplicate search";

/// The four index tokens of a dHash column (16 hex digits), over `col` (`t."h"` in queries,
/// `"h"` in the index): `'<chunk>' || <4 hex digits>`, lower case, in the C collation. Built-in
/// immutable functions only: the index never calls doppler, and never raises on a bad hash.
fn hash_tokens_expr(col: &str) -> String {
    let h = format!("pg_catalog.lower(({col})::pg_catalog.text COLLATE pg_catalog.\"C\")");
    let parts: Vec<String> = (0..doppler_core::near::INDEX_CHUNKS)
        .map(|i| {
            format!(
                "'{i}'::pg_catalog.text OPERATOR(pg_catalog.||) pg_catalog.substr({h}, {}, 4)",
                1 + 4 * i
            )
        })
        .collect();
    format!("(ARRAY[{}])", parts.join(", "))
}

fn hash_column(w: &Watched) -> &str {
    w.hash_column.as_deref().unwrap_or_else(|| {
        raise(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("{} is watched without a hash column", w.name),
            "doppler.watch(tbl, ..., hash_column => 'd_hash') makes the worker fill one.",
        )
    })
}

/// A GIN index doppler built over one column of a watched table (the near-duplicate and PDQ
/// indexes): found by its comment (names are the user's; a comment survives dump and restore),
/// over that column (an index over a former hash column does not count).
pub(super) struct TokenIndex<'a> {
    pub column: &'a str,
    /// The index's comment.
    pub comment: &'a str,
    /// The suffix of its name (after the table's).
    pub suffix: &'a str,
    /// What it is called in messages.
    pub what: &'a str,
    /// The GIN index's expression over the quoted column.
    pub expr: fn(&str) -> String,
}

impl TokenIndex<'_> {
    /// Its qualified, quoted name, if it exists.
    pub fn find(&self, w: &Watched) -> Option<String> {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.format('%I.%I', n.nspname, x.relname)
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) i.indexrelid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) x.relnamespace
             WHERE i.indrelid OPERATOR(pg_catalog.=) $1
               AND pg_catalog.obj_description(x.oid, 'pg_class') OPERATOR(pg_catalog.=) $2
               AND EXISTS (SELECT FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_attribute a
                             ON a.attrelid OPERATOR(pg_catalog.=) d.refobjid AND a.attnum OPERATOR(pg_catalog.=) d.refobjsubid
                           WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                             AND d.objid OPERATOR(pg_catalog.=) x.oid AND d.refobjid OPERATOR(pg_catalog.=) $1
                             AND a.attname OPERATOR(pg_catalog.=) $3::pg_catalog.name)
             LIMIT 1",
            &[w.relid.into(), self.comment.into(), self.column.into()],
        )
        .ok()
        .flatten()
    }

    /// Builds it as the table's owner (kept when it exists); returns its name.
    pub fn create(&self, w: &Watched) -> String {
        if let Some(existing) = self.find(w) {
            notice!(
                "doppler: {} already has the {} index {existing}",
                w.name,
                self.what
            );
            return existing;
        }
        let expr = (self.expr)(&quote_identifier(self.column));
        as_owner(w.owner, || {
            w.check_name();
            let (bare, index) = free_index_name(w.relid, self.suffix);
            Spi::run(&format!(
                "CREATE INDEX {bare} ON {} USING gin ({expr})",
                w.name
            ))?;
            Spi::run(&format!(
                "COMMENT ON INDEX {index} IS {}",
                quote_literal(self.comment)
            ))?;
            Ok::<_, pgrx::spi::Error>(index)
        })
        .or_raise(|| format!("could not create the {} index on {}", self.what, w.name))
    }
}

/// The near-duplicate index of a table's dHash column (GIN over its four chunk tokens).
fn hash_index(w: &Watched) -> TokenIndex<'_> {
    TokenIndex {
        column: hash_column(w),
        comment: HASH_INDEX_COMMENT,
        suffix: "_doppler_dhash",
        what: "near-duplicate",
        expr: hash_tokens_expr,
    }
}

/// The rows whose dHash is within `max_bits` of `hash`, nearest first. Exact: the index (when
/// doppler.create_index(tbl, 'hamming') built one) only narrows the candidates, whose distance
/// is then computed; without it, or beyond what it can serve (max_bits over 11), a scan.
#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _near_duplicates(
    relid: pg_sys::Oid,
    hash: &str,
    max_bits: i32,
) -> TableIterator<
    'static,
    (
        name!(row_key, String),
        name!(source, Option<String>),
        name!(hash, String),
        name!(distance, i32),
    ),
> {
    let w = readable(relid);
    let h = hash_column(&w);
    if max_bits < 0 {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_bits must be 0 or more, not {max_bits}"),
            "",
        );
    }
    let skip = gucs::skip_hashes();
    if skip.iter().any(|s| s == hash) {
        return TableIterator::new(Vec::new());
    }
    let query = crate::api::hash::parse(hash);
    let col = format!("t.{}", quote_identifier(h));
    let src = source_text(&w);
    // through the index when there is one and the radius suits it; else a scan (evaluating the
    // tokens of every row would only make the scan slower)
    let probes = doppler_core::near::probe_tokens(query, max_bits as u32)
        .filter(|_| hash_index(&w).find(&w).is_some());
    let candidates = match &probes {
        Some(_) => format!(
            "{} OPERATOR(pg_catalog.&&) $1::pg_catalog.text[]",
            hash_tokens_expr(&col)
        ),
        None => format!("{col} IS NOT NULL AND $1::pg_catalog.text[] IS NULL"),
    };
    // the distance in SQL too, so that only the near rows are turned into results (guarded:
    // a string that is no hash never reaches the bit cast); checked again below
    let h = format!("({col})::pg_catalog.text COLLATE pg_catalog.\"C\"");
    let near = format!(
        "CASE WHEN {h} OPERATOR(pg_catalog.~) '^[0-9a-fA-F]{{16}}$'
              THEN pg_catalog.bit_count(('x' OPERATOR(pg_catalog.||) {h})::pg_catalog.bit(64)
                                        OPERATOR(pg_catalog.#) $2::pg_catalog.bit(64)) OPERATOR(pg_catalog.<=) $3
              ELSE false END"
    );
    let sql = format!(
        "SELECT {key}, {src}, {col}::pg_catalog.text FROM {table} t WHERE {candidates} AND {near}",
        key = w.key_over("t"),
        table = w.name
    );
    // GIN cannot estimate an overlap with hundreds of tokens (it guesses a third of the table),
    // and on smaller tables the planner would scan, computing every row's tokens: the index is
    // always the cheaper way, and the answer is the same either way
    let before = probes
        .as_ref()
        .and_then(|_| set_for_query("enable_seqscan", "off"));
    let rows: Vec<(String, Option<String>, String)> = as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            c.select(
                &sql,
                None,
                &[
                    probes.clone().into(),
                    format!("x{query:016x}").into(),
                    (max_bits as i64).into(),
                ],
            )?
            .map(|r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get::<String>(3)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })
    .or_raise(|| format!("could not look up near duplicates in {}", w.name));
    restore_setting(before);
    let mut out: Vec<(String, Option<String>, String, i32)> = rows
        .into_iter()
        .filter(|(_, _, x)| !skip.contains(x))
        .filter_map(|(k, s, x)| {
            let d = dhash::hamming(dhash::parse_hex(&x)?, query);
            (d <= max_bits as u32).then_some((k, s, x, d as i32))
        })
        .collect();
    out.sort_by(|a, b| a.3.cmp(&b.3).then_with(|| a.0.cmp(&b.0)));
    TableIterator::new(out)
}
