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

use crate::api::watch::owned_table;
use crate::gucs;
use crate::privileged::{acts_as, as_owner, current_user};
use crate::worker::batch::{self, Watched};

fn fail(code: PgSqlErrorCode, msg: String, hint: &str) -> ! {
    crate::errors::raise_code(code, msg, hint)
}

fn same_len(a: &[f32], b: &[f32]) {
    if a.len() != b.len() {
        fail(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
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
fn readable(relid: pg_sys::Oid) -> Watched {
    let w = watched(relid);
    if acts_as(current_user(), w.owner) {
        return w;
    }
    let (may_select, rls) = Spi::get_two_with_args::<bool, bool>(
        "SELECT pg_catalog.has_table_privilege($1::pg_catalog.oid, 'SELECT'),
                pg_catalog.row_security_active($1::pg_catalog.oid)",
        &[relid.into()],
    )
    .unwrap_or((None, None));
    if may_select != Some(true) {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for table {}", w.name),
            "doppler.similar and doppler.duplicates need SELECT on the table.",
        );
    }
    if rls != Some(false) {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("table {} has row-level security for this role", w.name),
            "doppler searches a table as its owner; with row-level security in force only the owner may.",
        );
    }
    w
}

fn watched(relid: pg_sys::Oid) -> Watched {
    batch::load_watched(Some(relid))
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!(
                    "relation with OID {} is not watched by doppler",
                    relid.to_u32()
                ),
                "doppler.similar and doppler.duplicates work on watched tables (doppler.watch).",
            )
        })
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
) -> Vec<(String, Option<String>, f64)> {
    let w = readable(relid);
    let cosine = match metric {
        "l2" => false,
        "cosine" => true,
        _ => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("metric must be l2 or cosine, not \"{metric}\""),
            "",
        ),
    };
    let vec = format!("t.{}", quote_identifier(&w.vector_column));
    let src = if w.source_kind == "bytea" {
        format!(
            "pg_catalog.format('bytea, %s bytes', pg_catalog.octet_length(t.{}))",
            quote_identifier(&w.source_column)
        )
    } else {
        format!("t.{}::pg_catalog.text", quote_identifier(&w.source_column))
    };
    let key = w.key_expr();
    // pgvector's names, qualified: the scan runs under the pinned search_path
    let nsp = &w.vector_schema;
    let (op, suffix) = if cosine {
        (format!("OPERATOR({nsp}.<=>)"), "cosine")
    } else {
        (format!("OPERATOR({nsp}.<->)"), "l2")
    };
    let (vector, halfvec) = (format!("{nsp}.vector"), format!("{nsp}.halfvec"));
    let (distance, order) = match w.vector_kind.as_str() {
        "real[]" => {
            let f = if cosine {
                "doppler.cosine_distance"
            } else {
                "doppler.l2_distance"
            };
            (format!("{f}({vec}, $1)"), "3".to_string())
        }
        "vector" => {
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
        _ => (
            format!("({vec} {op} $1::pg_catalog.float4[]::{halfvec})"),
            format!("{vec} {op} $1::pg_catalog.float4[]::{halfvec}"),
        ),
    };
    // only vectors of the table's current model (during a re-embed, old ones are skipped)
    let current = w.current_vector_over("t", &quote_literal(w.spec().tag()));
    let sql = format!(
        "SELECT {key}, {src}, {distance}::pg_catalog.float8 FROM {table} t WHERE {current} ORDER BY {order} LIMIT $2",
        table = w.name
    );
    as_owner(w.owner, || {
        Spi::connect(|c| {
            c.select(&sql, None, &[q.into(), (k.max(0) as i64).into()])?
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
    .unwrap_or_else(|e| pgrx::error!("doppler.similar on {}: {e}", w.name))
}

/// The k rows nearest to a feature vector (the SQL overloads for paths and bytes extract the
/// query's features first, with extract_features' privileges and limits).
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
    TableIterator::new(search(relid, query, k, metric))
}

/// Builds pgvector's HNSW index for a watched table's vector column; returns its name.
#[pg_extern(volatile, strict, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _create_index(relid: pg_sys::Oid, metric: &str) -> String {
    owned_table(relid);
    let w = watched(relid);
    let ops = match metric {
        "l2" => "halfvec_l2_ops",
        "cosine" => "halfvec_cosine_ops",
        _ => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("metric must be l2 or cosine, not \"{metric}\""),
            "",
        ),
    };
    if let Some(existing) = hnsw_index(&w, ops) {
        notice!("doppler: {} already has the HNSW index {existing}", w.name);
        return existing;
    }
    let vec = quote_identifier(&w.vector_column);
    let n = dims(&w);
    let nsp = &w.vector_schema;
    let expr = match w.vector_kind.as_str() {
        "vector" if n > 0 => format!("(({vec})::{nsp}.halfvec({n}))"),
        "halfvec" => vec.clone(),
        "vector" => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("vector column {vec} of {} has no fixed dimensions", w.name),
            "Declare it as vector(2048) so that it can be indexed as halfvec(2048).",
        ),
        _ => fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "{} stores features as real[], which pgvector cannot index",
                w.name
            ),
            "Use a vector(n) or halfvec(n) column; doppler.similar scans real[] columns exactly.",
        ),
    };
    as_owner(w.owner, || {
        Spi::run(&format!(
            "CREATE INDEX ON {} USING hnsw ({expr} {nsp}.{ops})",
            w.name
        ))
    })
    .unwrap_or_else(|e| pgrx::error!("could not create the HNSW index on {}: {e}", w.name));
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
    let Some(h) = &w.hash_column else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("{} is watched without a hash column", w.name),
            "doppler.watch(tbl, ..., hash_column => 'd_hash') makes the worker fill one.",
        )
    };
    let sql = format!(
        "SELECT {key}, t.{h}::pg_catalog.text FROM {table} t WHERE t.{h} IS NOT NULL",
        key = w.key_expr(),
        h = quote_identifier(h),
        table = w.name
    );
    let rows: Vec<(String, String)> = as_owner(w.owner, || {
        Spi::connect(|c| {
            c.select(&sql, None, &[])?
                .map(|r| {
                    Ok((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<String>(2)?.unwrap_or_default(),
                    ))
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })
    .unwrap_or_else(|e| pgrx::error!("doppler.duplicates on {}: {e}", w.name));
    let skip = gucs::skip_hashes();
    let mut distinct: Vec<(u64, String, Vec<String>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (key, hash) in rows {
        if skip.contains(&hash) {
            continue;
        }
        let Some(bits) = dhash::parse_hex(&hash) else {
            continue;
        };
        let i = *index.entry(bits).or_insert_with(|| {
            distinct.push((bits, hash.clone(), Vec::new()));
            distinct.len() - 1
        });
        distinct[i].2.push(key);
    }
    // union-find over distinct hashes within max_bits
    let mut parent: Vec<usize> = (0..distinct.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for i in 0..distinct.len() {
        check_for_interrupts!(); // O(n²): cancel and statement_timeout act between rows
        for j in i + 1..distinct.len() {
            if dhash::hamming(distinct[i].0, distinct[j].0) <= max_bits.max(0) as u32 {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                if a != b {
                    parent[a] = b;
                }
            }
        }
    }
    let mut groups: std::collections::BTreeMap<usize, (Vec<String>, Vec<String>)> =
        Default::default();
    for (i, (_, hash, keys)) in distinct.iter().enumerate() {
        let g = groups.entry(root(&mut parent, i)).or_default();
        g.0.extend(keys.iter().cloned());
        g.1.push(hash.clone());
    }
    let mut out: Vec<(Vec<String>, Vec<String>)> =
        groups.into_values().filter(|g| g.0.len() > 1).collect();
    out.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.1.cmp(&b.1)));
    TableIterator::new(
        out.into_iter()
            .enumerate()
            .map(|(i, (keys, hashes))| (i as i32 + 1, keys.len() as i32, keys, hashes)),
    )
}
