//! PDQ, Meta's perceptual hash (the format of ThreatExchange, HMA and GIFCT hash lists):
//! `doppler.pdq(path|bytea)`, `pdq_dihedral`, the hex forms, and matching a watched table's PDQ
//! column (`watch(..., pdq_column => ...)`) against one hash or a list.
//!
//! The SQL wrappers in sql/finalize.sql turn the 64 hex digits these functions speak into
//! PostgreSQL's `bit(256)` and back (`('x' || hex)::bit(256)`: bit i is the i-th bit of the
//! reference's text, read left to right).
//!
//! Labels: the path forms read a file or URL (VOLATILE, like extract_features); the bytea forms
//! and the hex conversions are IMMUTABLE (the limits in doppler.max_image_* only refuse an input,
//! never change a hash).
//!
//! Matching is exact, never approximate (doppler_core::pdq_near): one hash through the GIN index
//! of `create_index(tbl, 'pdq')` when the radius suits it (16 chunks of 16 bits; a table row within
//! `max_bits` shares a token with the query), else a scan; a list by one scan of the table against
//! the list's multi-index in memory.

use doppler_core::{pdq, pdq_near, Error, ErrorKind};
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use super::search::{readable, restore_setting, set_for_query, source_text, TokenIndex};
use crate::errors::{raise, raise_error, Code, OrRaise, SpiOrRaise};
use crate::privileged::as_owner;
use crate::watched::Watched;
use crate::{gucs, sources};

fn decoded(bytes: &[u8], what: &str) -> doppler_core::RgbImage {
    // doppler.jpeg_draft_size must not change a hash
    let limits = gucs::limits().full_decode();
    doppler_core::catch_panic("hashing an image", || {
        doppler_core::decode_rgb(bytes, what, &limits)
    })
    .or_raise()
}

fn one(p: pdq::Pdq) -> TableIterator<'static, (name!(hash, String), name!(quality, i32))> {
    TableIterator::once((pdq::to_hex(&p.hash), p.quality as i32))
}

#[pg_extern(name = "_pdq", volatile, strict, parallel_safe)]
fn pdq_path(path: &str) -> TableIterator<'static, (name!(hash, String), name!(quality, i32))> {
    let (bytes, what) = sources::load_text(path);
    let img = decoded(&bytes, &what);
    one(pdq::pdq(&img))
}

#[pg_extern(name = "_pdq", immutable, strict, parallel_safe)]
fn pdq_bytea(image: &[u8]) -> TableIterator<'static, (name!(hash, String), name!(quality, i32))> {
    sources::check_size(image);
    let img = decoded(image, &doppler_core::source::describe_bytes(image.len()));
    one(pdq::pdq(&img))
}

fn dihedral(img: &doppler_core::RgbImage) -> Vec<String> {
    let (hashes, _) = pdq::pdq_dihedral(img);
    hashes.iter().map(pdq::to_hex).collect()
}

#[pg_extern(name = "_pdq_dihedral", volatile, strict, parallel_safe)]
fn pdq_dihedral_path(path: &str) -> Vec<String> {
    let (bytes, what) = sources::load_text(path);
    dihedral(&decoded(&bytes, &what))
}

#[pg_extern(name = "_pdq_dihedral", immutable, strict, parallel_safe)]
fn pdq_dihedral_bytea(image: &[u8]) -> Vec<String> {
    sources::check_size(image);
    dihedral(&decoded(
        image,
        &doppler_core::source::describe_bytes(image.len()),
    ))
}

/// A PDQ hash from its 64 hex digits (either case); 22P02 for anything else.
pub(crate) fn parse(h: &str) -> [u8; 32] {
    pdq::parse_hex(h).unwrap_or_else(|| {
        raise_error(
            Error::new(
                ErrorKind::Config,
                format!(
                    "invalid PDQ hash \"{}\": expected 64 hexadecimal digits",
                    h.chars().take(80).collect::<String>()
                ),
            )
            .with_hint(
                "PDQ hashes are written as the reference writes them: 64 hex digits, 256 bits.",
            ),
        )
    })
}

/// The hash's 64 hex digits, lower case (`pdq_from_hex` builds the bits from them).
#[pg_extern(immutable, strict, parallel_safe)]
fn _pdq_hex(hex: &str) -> String {
    let h = hex.trim();
    match pdq::parse_hex(h) {
        Some(b) => pdq::to_hex(&b),
        None => raise(
            Code::ERRCODE_INVALID_TEXT_REPRESENTATION,
            format!(
                "invalid PDQ hash \"{}\": expected 64 hexadecimal digits",
                h.chars().take(80).collect::<String>()
            ),
            "PDQ hashes are written as the reference writes them: 64 hex digits, 256 bits.",
        ),
    }
}

/// The 64 hex digits of a `bit(256)`'s text (its 256 binary digits); 22026 for another length.
#[pg_extern(immutable, strict, parallel_safe)]
fn _pdq_bits_hex(bits: &str) -> String {
    if bits.len() != 256 || !bits.bytes().all(|b| b == b'0' || b == b'1') {
        raise(
            Code::ERRCODE_STRING_DATA_LENGTH_MISMATCH,
            format!("a PDQ hash has 256 bits, not {}", bits.len()),
            "",
        );
    }
    let mut out = [0u8; 32];
    for (i, b) in bits.bytes().enumerate() {
        if b == b'1' {
            out[i / 8] |= 0x80 >> (i % 8);
        }
    }
    pdq::to_hex(&out)
}

fn pdq_column(w: &Watched) -> &str {
    w.pdq_column.as_deref().unwrap_or_else(|| {
        raise(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("{} is watched without a PDQ column", w.name),
            "doppler.watch(tbl, ..., pdq_column => 'pdq') makes doppler fill one (a bit(256) column).",
        )
    })
}

fn check_args(max_bits: i32, min_quality: i32) -> u32 {
    if !(0..=256).contains(&max_bits) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_bits must be between 0 and 256, not {max_bits}"),
            "The reference's threshold for a match is 31.",
        );
    }
    if !(0..=100).contains(&min_quality) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("min_quality must be between 0 and 100, not {min_quality}"),
            "The reference matches hashes of quality 50 or more.",
        );
    }
    max_bits as u32
}

/// What the PDQ index's comment says: doppler finds its index by it.
pub const PDQ_INDEX_COMMENT: &str = "doppler: PDQ chunks for near-duplicate search";

/// The 16 index tokens of a PDQ column over `col` (`t."pdq"` in queries, `"pdq"` in the
/// index): chunk i (bits 16i .. 16i + 15, the first the most significant) as `i * 65536 +
/// chunk`. Built-in immutable functions only: the index never calls doppler. A value of another
/// length than 256 bits (a varbit column) gives tokens that match nothing the query probes for
/// beyond its length, and is checked again exactly.
fn tokens_expr(col: &str) -> String {
    let parts: Vec<String> = (0..pdq_near::INDEX_CHUNKS)
        .map(|i| {
            format!(
                "{} OPERATOR(pg_catalog.+) pg_catalog.\"substring\"(({col})::pg_catalog.varbit, {}, 16)::pg_catalog.bit(16)::pg_catalog.int4",
                i * 65536,
                1 + 16 * i
            )
        })
        .collect();
    format!("(ARRAY[{}])", parts.join(", "))
}

/// The PDQ index of a table's PDQ column (GIN over its 16 chunk tokens).
fn pdq_index(w: &Watched) -> TokenIndex<'_> {
    TokenIndex {
        column: pdq_column(w),
        comment: PDQ_INDEX_COMMENT,
        suffix: "_doppler_pdq",
        what: "PDQ",
        expr: tokens_expr,
    }
}

/// Builds the PDQ index, as the table's owner; returns its name (`create_index(tbl, 'pdq')`).
pub(crate) fn create_pdq_index(w: &Watched) -> String {
    pdq_index(w).create(w)
}

/// A row of a PDQ match: its key, source, hash (hex), quality, and for a list, the listed hash
/// it is near (1-based) with the distance.
type Found = (String, Option<String>, String, Option<i32>);

/// The row's quality over alias `t` as an int4 (clamped: the column may be a bigint), and
/// `quality >= min_quality` (a NULL quality, not computed yet, is 0); no quality column: NULL, and
/// every row. Built-in operators only.
fn quality_over(w: &Watched, min_quality: i32) -> (String, String) {
    match &w.pdq_quality_column {
        Some(q) => {
            let q = format!("t.{}::pg_catalog.int8", quote_identifier(q));
            (
                // (GREATEST and LEAST pass over NULLs: a NULL quality stays NULL by the CASE)
                format!("(CASE WHEN {q} IS NOT NULL THEN LEAST(GREATEST({q}, -2147483648), 2147483647) END)::pg_catalog.int4"),
                format!("coalesce({q}, 0) OPERATOR(pg_catalog.>=) {min_quality}::pg_catalog.int8"),
            )
        }
        None => ("NULL::pg_catalog.int4".into(), "true".into()),
    }
}

/// At most this many rows (near_duplicates) or (row, listed hash) pairs (pdq_matches) in one
/// answer: a threshold or a list that matches more (a list of one hash a million times, max_bits
/// 256 over a large table) asks for more than an answer should hold in memory; 54000 instead.
const MAX_MATCHES: usize = 1_000_000;

fn too_many(w: &Watched) -> ! {
    raise(
        Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!("more than {MAX_MATCHES} PDQ matches in {}", w.name),
        "Lower max_bits (the reference's threshold is 31), or match the list in parts.",
    )
}

/// The rows whose PDQ hash is within `max_bits` of `hash` (64 hex digits) and whose quality is
/// at least `min_quality`, nearest first. Exact: the index (when create_index(tbl, 'pdq') built
/// one, up to max_bits 47) only narrows the candidates, whose distance is then computed.
#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _pdq_near(
    relid: pg_sys::Oid,
    hash: &str,
    max_bits: i32,
    min_quality: i32,
) -> TableIterator<
    'static,
    (
        name!(row_key, String),
        name!(source, Option<String>),
        name!(hash, String),
        name!(quality, Option<i32>),
        name!(distance, i32),
    ),
> {
    let w = readable(relid);
    let p = pdq_column(&w);
    let max = check_args(max_bits, min_quality);
    let query = parse(hash);
    let col = format!("t.{}", quote_identifier(p));
    let probes = pdq_near::probe_tokens(&query, max).filter(|_| pdq_index(&w).find(&w).is_some());
    let candidates = match &probes {
        Some(_) => format!(
            "{} OPERATOR(pg_catalog.&&) $1::pg_catalog.int4[]",
            tokens_expr(&col)
        ),
        None => format!("{col} IS NOT NULL AND $1::pg_catalog.int4[] IS NULL"),
    };
    let (quality, good) = quality_over(&w, min_quality);
    // the distance in SQL too (built-in bit operators; a value of another length is left out),
    // so that only near rows become results; checked again below
    let sql = format!(
        "SELECT {key}, {src}, pg_catalog.varbit_send({col}::pg_catalog.varbit), {quality}
         FROM {table} t
         WHERE {candidates} AND {good}
           AND pg_catalog.length({col}) OPERATOR(pg_catalog.=) 256
           AND pg_catalog.bit_count({col}::pg_catalog.varbit::pg_catalog.bit(256)
                                    OPERATOR(pg_catalog.#) ('x' OPERATOR(pg_catalog.||) $2)::pg_catalog.bit(256))
               OPERATOR(pg_catalog.<=) $3
         LIMIT {limit}",
        key = w.key_over("t"),
        src = source_text(&w),
        table = w.name,
        limit = MAX_MATCHES + 1,
    );
    // GIN cannot estimate an overlap with hundreds of tokens: the index is always the cheaper
    // way when it serves, and the answer is the same either way
    let before = probes
        .as_ref()
        .and_then(|_| set_for_query("enable_seqscan", "off"));
    let rows: Vec<(Found, [u8; 32])> = as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            c.select(
                &sql,
                None,
                &[
                    probes.clone().into(),
                    pdq::to_hex(&query).into(),
                    (max as i64).into(),
                ],
            )?
            .filter_map(|r| row_of(&r).transpose())
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
    })
    .or_raise(|| format!("could not look up near duplicates in {}", w.name));
    restore_setting(before);
    if rows.len() > MAX_MATCHES {
        too_many(&w);
    }
    let mut out: Vec<_> = rows
        .into_iter()
        .filter_map(|((k, s, x, q), h)| {
            let d = pdq::hamming(&h, &query);
            (d <= max).then_some((k, s, x, q, d as i32))
        })
        .collect();
    out.sort_by(|a, b| a.4.cmp(&b.4).then_with(|| a.0.cmp(&b.0)));
    TableIterator::new(out)
}

/// A result row (key, source, varbit_send bytes, quality) as a Found and its hash; None for a
/// value of another length than 256 bits.
fn row_of(r: &pgrx::spi::SpiHeapTupleData) -> Result<Option<(Found, [u8; 32])>, pgrx::spi::Error> {
    let Some(h) = r.get::<Vec<u8>>(3)?.and_then(|b| sent_bits(&b)) else {
        return Ok(None);
    };
    Ok(Some((
        (
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<String>(2)?,
            pdq::to_hex(&h),
            r.get::<i32>(4)?,
        ),
        h,
    )))
}

/// The 256 bits of a `varbit_send` value (a 4-byte bit length, then the bits, first bit the
/// most significant of the first byte); None for another length.
fn sent_bits(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() != 36 || b[..4] != 256u32.to_be_bytes() {
        return None;
    }
    b[4..].try_into().ok()
}

/// Every (row, listed hash) pair within `max_bits` whose row's quality is at least
/// `min_quality`: the "where did these known images appear" query. `hashes` are 64 hex digits
/// each (NULLs ignored); `listed` is the 1-based position of the listed hash. Exact, by one scan
/// of the table (as its owner) against the list's multi-index in memory.
#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _pdq_matches(
    relid: pg_sys::Oid,
    hashes: Vec<Option<String>>,
    max_bits: i32,
    min_quality: i32,
) -> TableIterator<
    'static,
    (
        name!(row_key, String),
        name!(source, Option<String>),
        name!(hash, String),
        name!(quality, Option<i32>),
        name!(listed, i32),
        name!(distance, i32),
    ),
> {
    let w = readable(relid);
    let p = pdq_column(&w);
    let max = check_args(max_bits, min_quality);
    let (positions, list): (Vec<i32>, Vec<[u8; 32]>) = hashes
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_deref().map(|h| (i as i32 + 1, parse(h))))
        .unzip();
    if list.is_empty() {
        return TableIterator::new(Vec::new());
    }
    // one index entry per distinct hash (a list may repeat one), each with its positions
    let mut distinct: Vec<([u8; 32], Vec<i32>)> = Vec::new();
    {
        let mut at: std::collections::HashMap<[u8; 32], usize> = std::collections::HashMap::new();
        for (h, pos) in list.iter().zip(&positions) {
            let k = *at.entry(*h).or_insert_with(|| {
                distinct.push((*h, Vec::new()));
                distinct.len() - 1
            });
            distinct[k].1.push(*pos);
        }
    }
    let hashes: Vec<[u8; 32]> = distinct.iter().map(|(h, _)| *h).collect();
    let index = pdq_near::ListIndex::new(&hashes);
    let col = format!("t.{}", quote_identifier(p));
    let (_, good) = quality_over(&w, min_quality);
    // the hashes in chunks of 1 024 heap pages (of each partition): one SPI row per chunk, not
    // per table row, fetched a chunk at a time through a cursor (memory: one chunk, whatever the
    // table's size); each near row's place (tableoid, ctid) and hash kept, to read it back by
    let scan = format!(
        "SELECT pg_catalog.array_agg(t.tableoid), pg_catalog.array_agg(t.ctid::pg_catalog.text),
                pg_catalog.array_agg(pg_catalog.varbit_send({col}::pg_catalog.varbit))
         FROM {table} t
         WHERE {col} IS NOT NULL AND {good}
         GROUP BY t.tableoid, ((t.ctid::pg_catalog.text::pg_catalog.point)[0]::pg_catalog.int8 OPERATOR(pg_catalog./) 1024)",
        table = w.name
    );
    // (place, listed index, distance) and the places: (tableoid, ctid) -> the row's hash
    let mut pairs: Vec<(u32, u32, u32)> = Vec::new();
    let mut places: Vec<((pg_sys::Oid, String), [u8; 32])> = Vec::new();
    let mut found = Vec::new();
    // (rows seen, and the answer's rows so far: a pair for each position of its listed hash)
    let (mut seen, mut answer) = (0usize, 0usize);
    as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            let mut cursor = c.try_open_cursor(scan.as_str(), &[])?;
            loop {
                let chunks = cursor.fetch(1)?;
                if chunks.is_empty() {
                    break;
                }
                for chunk in chunks {
                    let (Some(oids), Some(ctids), Some(bits)) = (
                        chunk.get::<pgrx::Array<pg_sys::Oid>>(1)?,
                        chunk.get::<pgrx::Array<&str>>(2)?,
                        chunk.get::<pgrx::Array<&[u8]>>(3)?,
                    ) else {
                        continue;
                    };
                    for ((oid, ctid), b) in oids.iter().zip(ctids.iter()).zip(bits.iter()) {
                        // cancel and statement_timeout act within a chunk too (a long list
                        // compared with every row costs milliseconds a row)
                        seen += 1;
                        if seen.is_multiple_of(16) {
                            check_for_interrupts!();
                        }
                        let (Some(oid), Some(ctid), Some(h)) = (oid, ctid, b.and_then(sent_bits))
                        else {
                            continue;
                        };
                        found.clear();
                        index.matches(&h, max, &mut found);
                        if found.is_empty() {
                            continue;
                        }
                        let place = places.len() as u32;
                        places.push(((oid, ctid.to_string()), h));
                        for &(j, d) in &found {
                            pairs.push((place, j, d));
                            answer += distinct[j as usize].1.len();
                        }
                        if answer > MAX_MATCHES {
                            too_many(&w);
                        }
                    }
                }
                // (the chunk's arrays are not needed any more: free them now, not at the end)
                // SAFETY: the tuple table of the fetch just read, which nothing refers to now
                unsafe {
                    if !pg_sys::SPI_tuptable.is_null() {
                        pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                        pg_sys::SPI_tuptable = std::ptr::null_mut();
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
    })
    .or_raise(|| format!("could not read the PDQ hashes of {}", w.name));
    if pairs.is_empty() {
        return TableIterator::new(Vec::new());
    }
    // the near rows, read back by their place; a row whose hash or quality is not the one the
    // scan saw (updated meanwhile, its place reused) is left out
    let (oids, ctids): (Vec<pg_sys::Oid>, Vec<String>) =
        places.iter().map(|((o, c), _)| (*o, c.clone())).unzip();
    let (quality, good) = quality_over(&w, min_quality);
    let read = format!(
        "SELECT t.tableoid, t.ctid::pg_catalog.text, {key}, {src}, pg_catalog.varbit_send({col}::pg_catalog.varbit), {quality}
         FROM {table} t
         WHERE t.ctid OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.tid[])
           AND t.tableoid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[]) AND {good}",
        key = w.key_over("t"),
        src = source_text(&w),
        table = w.name
    );
    let mut by_place: std::collections::HashMap<(pg_sys::Oid, String), (Found, [u8; 32])> =
        std::collections::HashMap::new();
    as_owner(w.owner, || {
        w.check_name();
        Spi::connect(|c| {
            for r in c.select(&read, None, &[oids.clone().into(), ctids.clone().into()])? {
                let place = (
                    r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    r.get::<String>(2)?.unwrap_or_default(),
                );
                let Some(h) = r.get::<Vec<u8>>(5)?.and_then(|b| sent_bits(&b)) else {
                    continue;
                };
                let found = (
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?,
                    pdq::to_hex(&h),
                    r.get::<i32>(6)?,
                );
                by_place.insert(place, (found, h));
            }
            Ok::<_, pgrx::spi::Error>(())
        })
    })
    .or_raise(|| format!("could not read the matches in {}", w.name));
    let mut out: Vec<(String, Option<String>, String, Option<i32>, i32, i32)> = Vec::new();
    for (place, j, d) in pairs {
        let (at, scanned) = &places[place as usize];
        let Some((row, h)) = by_place.get(at) else {
            continue;
        };
        if h != scanned {
            continue;
        }
        for &listed in &distinct[j as usize].1 {
            let (k, s, x, q) = row.clone();
            out.push((k, s, x, q, listed, d as i32));
        }
    }
    out.sort_by(|a, b| {
        a.4.cmp(&b.4)
            .then(a.5.cmp(&b.5))
            .then_with(|| a.0.cmp(&b.0))
    });
    TableIterator::new(out)
}
