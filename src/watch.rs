//! Watching and unwatching a table (the act; `watched/` describes a watched table), below the SQL
//! functions of `api/watch.rs`: the caller's
//! ownership is checked first (`privileged::owned_table`), then the table is changed as its owner
//! (the model column, the tags of untagged vectors, the dedup index, the pending index, the
//! triggers) and doppler's catalog as the extension owner.

use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};

use crate::errors::{raise, Code, SpiOrRaise};
use crate::privileged::{
    as_catalog, as_owner, extension_owner, may_read_server_files, owned_table, OwnedTable,
};
use crate::session::{self, ModelSpec};
use crate::triggers;
use crate::watched::installed::Installed;
use crate::watched::{
    foreign_child, load, load_all, sql, Mode, OnError, SourceKind, VectorKind, Watched, Workers,
    HELD,
};

/// `doppler.watch(...)`'s arguments, as the caller passed them.
pub struct WatchArgs<'a> {
    pub relid: pg_sys::Oid,
    pub source_column: &'a str,
    pub vector_column: &'a str,
    pub batch_size: i32,
    pub priority: i32,
    pub mode: &'a str,
    pub on_error: &'a str,
    pub hash_column: Option<&'a str>,
    pub dedup: bool,
    pub model: Option<&'a str>,
    pub model_column: Option<&'a str>,
    /// The PDQ hash's `bit(256)` column and its quality's integer column (0.11.0).
    pub pdq_column: Option<&'a str>,
    pub pdq_quality_column: Option<&'a str>,
}

impl WatchArgs<'_> {
    /// The fingerprint columns filled with the vector (`Watched::marks`).
    fn marks(&self) -> Vec<&str> {
        [self.hash_column, self.pdq_column, self.pdq_quality_column]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A watch as `watch` will register it: the arguments checked against the table.
struct Plan<'a> {
    args: &'a WatchArgs<'a>,
    table: OwnedTable,
    keys: Vec<String>,
    source_kind: SourceKind,
    vector_kind: VectorKind,
    mode: Mode,
    on_error: OnError,
    spec: ModelSpec,
    model_column: String,
    /// The watch before this call, if the table was watched.
    current: Option<Watched>,
}

/// Watches a table (or changes its watch); returns what `doppler.watch` says.
pub fn watch(args: &WatchArgs) -> String {
    let plan = plan(args);
    prepare_table(&plan);
    register(&plan);
    let w = load(args.relid).expect("just registered");
    // rows held back without a failure record (their records went with a dropped column, or
    // they came in with their marks: a copy, a restore of one table, a partition attached), and
    // every held row when the source column changed (their records name the old one's values):
    // to do again. (Another vector, hash or model column keeps the given-up rows given up.)
    let source_moved = plan
        .current
        .as_ref()
        .is_some_and(|c| c.source_column != args.source_column);
    as_owner(w.owner, || unmark(&w, !source_moved));
    as_owner(w.owner, || triggers::replace(&w));
    crate::worker::wake();
    format!(
        "doppler watches {} ({}): {} ({}) -> {} ({}) by {}, key ({})",
        plan.table.name,
        plan.mode.as_str(),
        args.source_column,
        plan.source_kind.as_str(),
        args.vector_column,
        plan.vector_kind.as_str(),
        plan.spec.tag(),
        plan.keys.join(", ")
    )
}

/// Checks the arguments against the table; raises with a fitting SQLSTATE when they do not fit.
fn plan<'a>(args: &'a WatchArgs<'a>) -> Plan<'a> {
    let table = owned_table(args.relid);
    let name = &table.name;
    let temporary = Spi::get_one_with_args::<bool>(
        "SELECT c.relpersistence OPERATOR(pg_catalog.=) 't' FROM pg_catalog.pg_class c
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[args.relid.into()],
    )
    .or_raise(|| format!("could not read the catalog entry of {name}"));
    if temporary == Some(true) {
        raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{name} is a temporary table, which doppler does not watch"),
            "A temporary table ends with its session, which no event reports: watch a regular or unlogged table, or call doppler.extract_features() on the rows.",
        );
    }
    if let Some(child) = foreign_child(args.relid, table.owner) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{child}, a partition or child table of {name}, has another owner"),
            "doppler works on a table as its owner only: give the partitions the parent's owner, or watch each one.",
        );
    }
    let (mode, on_error) = (Mode::from_arg(args.mode), OnError::from_arg(args.on_error));
    if !(1..=4096).contains(&args.batch_size) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "batch_size must be between 1 and 4096, not {}",
                args.batch_size
            ),
            "",
        );
    }
    let keys = primary_key(args.relid, name);
    let source_kind = source_kind(args, name);
    if args.source_column == args.vector_column {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "the source and vector columns must differ",
            "",
        );
    }
    let (vector_kind, dims) = vector_kind(args, name);
    // Watching again without naming a model keeps the table's model and model column.
    let current = load(args.relid);
    let spec = session::spec(args.model.or(current.as_ref().map(|w| w.model.as_str())));
    // a model whose file is missing would only fail in the worker, batch after batch
    session::check_file(&spec);
    if dims > 0 && dims != spec.dim as i32 {
        raise(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "vector column {} of table {name} has {dims} dimensions, model \"{}\" produces {}",
                quote_identifier(args.vector_column),
                spec.name,
                spec.dim
            ),
            "Use a column of the model's dimensions, or one without a fixed dimension (real[], vector).",
        );
    }
    if source_kind == SourceKind::Path && !may_read_server_files(table.owner) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("the owner of table {name} may not read server files"),
            "Watching a path column reads server files with the table owner's rights: grant pg_read_server_files to the owner, or store the images as bytea.",
        );
    }
    check_hash_column(args, name);
    check_pdq_columns(args, name, &keys);
    let model_column = model_column(args, current.as_ref());
    Plan {
        args,
        table,
        keys,
        source_kind,
        vector_kind,
        mode,
        on_error,
        spec,
        model_column,
        current,
    }
}

/// `(type name, format_type, typmod)` of a column, if the table has it. The type name is bare
/// only for PostgreSQL's own types and pgvector's `vector` and `halfvec` (`text`, `_float4`,
/// `vector`), schema-qualified for any other (a type named `text` in another schema is not
/// text): the same types `watched::MISFIT_SQL` accepts.
fn column_type(relid: pg_sys::Oid, col: &str) -> Option<(String, String, i32)> {
    Spi::get_three_with_args::<String, String, i32>(
        "SELECT CASE WHEN t.typnamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
                       OR (t.typname OPERATOR(pg_catalog.=) ANY ('{vector,halfvec}'::pg_catalog.name[])
                           AND t.typnamespace OPERATOR(pg_catalog.=) ANY (
                               SELECT e.extnamespace FROM pg_catalog.pg_extension e
                               WHERE e.extname OPERATOR(pg_catalog.=) 'vector'::pg_catalog.name))
                     THEN t.typname::pg_catalog.text
                     ELSE pg_catalog.format('%I.%I', n.nspname, t.typname) END,
                pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypmod
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) t.typnamespace
         WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped",
        &[relid.into(), col.into()],
    )
    .ok()
    .and_then(|(a, b, c)| Some((a?, b?, c?)))
}

/// The column's type, or 42703.
fn existing_column(relid: pg_sys::Oid, col: &str, table: &str) -> (String, String, i32) {
    column_type(relid, col).unwrap_or_else(|| {
        raise(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "column {} of table {table} does not exist",
                quote_identifier(col)
            ),
            "",
        )
    })
}

/// The primary key's columns, or 42P16.
fn primary_key(relid: pg_sys::Oid, name: &str) -> Vec<String> {
    let keys = Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY k.ord)
         FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                                       AND a.attnum OPERATOR(pg_catalog.=) k.attnum
         WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisprimary",
        &[relid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    if keys.is_empty() {
        raise(
            Code::ERRCODE_INVALID_TABLE_DEFINITION,
            format!("table {name} has no primary key"),
            "doppler finds and records rows by primary key: ALTER TABLE ... ADD PRIMARY KEY first.",
        );
    }
    keys
}

fn source_kind(args: &WatchArgs, name: &str) -> SourceKind {
    match existing_column(args.relid, args.source_column, name) {
        (t, _, _) if t == "text" || t == "varchar" => SourceKind::Path,
        (t, _, _) if t == "bytea" => SourceKind::Bytea,
        (_, shown, _) => raise(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "source column {} of table {name} is {shown}",
                quote_identifier(args.source_column)
            ),
            "The source column holds image paths (text) or image bytes (bytea).",
        ),
    }
}

/// The vector column's kind and its dimensions (-1: not fixed).
fn vector_kind(args: &WatchArgs, name: &str) -> (VectorKind, i32) {
    match existing_column(args.relid, args.vector_column, name) {
        (t, _, _) if t == "_float4" => (VectorKind::Real, -1),
        (t, _, m) if t == "vector" => (VectorKind::Vector, m),
        (t, _, m) if t == "halfvec" => (VectorKind::Halfvec, m),
        (_, shown, _) => raise(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "vector column {} of table {name} is {shown}",
                quote_identifier(args.vector_column)
            ),
            "Use real[], or pgvector's vector(n) or halfvec(n).",
        ),
    }
}

fn check_hash_column(args: &WatchArgs, name: &str) {
    if let Some(h) = args.hash_column {
        match existing_column(args.relid, h, name) {
            // varchar(n): typmod n + 4; a dHash is 16 hex digits
            (t, shown, m) if t == "varchar" && m >= 4 && m - 4 < 16 => raise(
                Code::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "hash column {} of table {name} is {shown}, too short for a dHash",
                    quote_identifier(h)
                ),
                "A dHash is 16 hex digits: use text or varchar(16) or longer.",
            ),
            (t, _, _) if t == "text" || t == "varchar" => {}
            (_, shown, _) => raise(
                Code::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "hash column {} of table {name} is {shown}",
                    quote_identifier(h)
                ),
                "The hash column holds dHash strings (text).",
            ),
        }
        if h == args.source_column || h == args.vector_column {
            raise(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                "the hash column must differ from the source and vector columns",
                "",
            );
        }
    }
    if args.dedup && args.hash_column.is_none() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "dedup needs a hash column",
            "Pass hash_column => 'd_hash' (a text column) with dedup => true.",
        );
    }
}

/// The PDQ column is `bit(256)` (or `bit varying`, 256 bits or more), its quality column an
/// integer, neither one of the other columns; they need 0.11.0's catalog.
fn check_pdq_columns(args: &WatchArgs, name: &str, keys: &[String]) {
    if args.pdq_quality_column.is_some() && args.pdq_column.is_none() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "pdq_quality_column needs a pdq_column",
            "Pass pdq_column => 'pdq' (a bit(256) column) with the quality column.",
        );
    }
    let Some(p) = args.pdq_column else {
        return;
    };
    if !Installed::get().is_some_and(Installed::has_pdq) {
        raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            "PDQ columns need doppler 0.11.0's SQL objects in this database",
            "Run ALTER EXTENSION doppler UPDATE.",
        );
    }
    match existing_column(args.relid, p, name) {
        (t, _, m) if t == "bit" && m == 256 => {}
        (t, _, m) if t == "varbit" && !(0..256).contains(&m) => {}
        (_, shown, _) => raise(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "PDQ column {} of table {name} is {shown}",
                quote_identifier(p)
            ),
            "A PDQ hash is 256 bits: use a bit(256) column.",
        ),
    }
    if let Some(q) = args.pdq_quality_column {
        match existing_column(args.relid, q, name) {
            (t, _, _) if t == "int2" || t == "int4" || t == "int8" => {}
            (_, shown, _) => raise(
                Code::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "PDQ quality column {} of table {name} is {shown}",
                    quote_identifier(q)
                ),
                "The quality is an integer from 0 to 100: use an integer column.",
            ),
        }
    }
    let mut named = vec![args.source_column, args.vector_column, p];
    named.extend(args.hash_column);
    named.extend(args.pdq_quality_column);
    named.extend(keys.iter().map(String::as_str));
    let mut sorted = named.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != named.len() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "the PDQ and PDQ quality columns must differ from each other and from the source, vector, hash and key columns",
            "",
        );
    }
}

/// The column that records which model (name@version) made each row's vector: the one named,
/// else the current watch's, else `<vector>_model`.
fn model_column(args: &WatchArgs, current: Option<&Watched>) -> String {
    let model_column = args
        .model_column
        .map(str::to_string)
        .or(current.map(|w| w.model_column.clone()))
        .unwrap_or_else(|| format!("{}_model", args.vector_column));
    if model_column.len() > 63 {
        raise(
            Code::ERRCODE_NAME_TOO_LONG,
            format!("the model column name \"{model_column}\" is longer than 63 bytes"),
            "Pass a shorter model_column => ...",
        );
    }
    let others = [
        args.source_column,
        args.vector_column,
        args.hash_column.unwrap_or(""),
        args.pdq_column.unwrap_or(""),
        args.pdq_quality_column.unwrap_or(""),
    ];
    if others.contains(&model_column.as_str()) {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "the model column must differ from the source, vector, hash and PDQ columns",
            "",
        );
    }
    model_column
}

/// Changes the table as its owner (the caller may be a superuser or a member of the owner
/// role: the owner's triggers, defaults and index expressions run with the owner's rights): the
/// model column, the tags of untagged vectors, the dedup index, the pending index.
fn prepare_table(plan: &Plan) {
    let (args, relid, name, owner) = (
        plan.args,
        plan.args.relid,
        &plan.table.name,
        plan.table.owner,
    );
    let mc = quote_identifier(&plan.model_column);
    match column_type(relid, &plan.model_column) {
        None => as_owner(owner, || {
            Spi::run(&format!(
                "ALTER TABLE {name} ADD COLUMN {mc} pg_catalog.text"
            ))
            .or_raise(|| format!("could not add the model column to {name}"))
        }),
        Some((t, _, _)) if t == "text" => {}
        Some((_, shown, _)) => raise(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!("model column {mc} of table {name} is {shown}, not text"),
            "The model column holds name@version text.",
        ),
    }
    // Vectors nobody tagged (there before doppler, or written by hand) are tagged now: with the
    // table's previous model when the model changes (so they are re-embedded, readable until
    // then), else with this one. Afterwards only the fill engine writes tags.
    let previous = plan
        .current
        .as_ref()
        .filter(|w| w.vector_column == args.vector_column)
        .map(|w| w.spec().tag());
    let untagged_as = previous.unwrap_or_else(|| plan.spec.tag());
    let vec = quote_identifier(args.vector_column);
    as_owner(owner, || {
        Spi::run_with_args(
            &format!("UPDATE {name} SET {mc} = $1 WHERE {vec} IS NOT NULL AND {mc} IS NULL"),
            &[untagged_as.as_str().into()],
        )
        .or_raise(|| format!("could not tag the vectors of {name}"))
    });
    // Dedup looks up known hashes for every model run: give it an index unless one leads with
    // the hash column already.
    if let (true, Some(h)) = (args.dedup, args.hash_column) {
        index_hash_column(relid, name, owner, h);
    }
    // Claims find the rows without a vector through a partial index over exactly those rows (kept
    // when it exists for these columns; built again when a column changed).
    let moved = plan.current.as_ref().is_some_and(|w| {
        w.vector_column != args.vector_column
            || w.source_column != args.source_column
            || w.hash_column.as_deref() != args.hash_column
            || w.pdq_column.as_deref() != args.pdq_column
            || w.pdq_quality_column.as_deref() != args.pdq_quality_column
            || w.model_column != plan.model_column
    });
    let existing = pending_indexes(relid);
    // (an index of an earlier release, which kept held rows, is built again)
    let outdated = existing.iter().any(|(_, current)| !current);
    if moved || existing.is_empty() || outdated {
        as_owner(owner, || {
            for (i, _) in &existing {
                Spi::run(&format!("DROP INDEX {i}"))
                    .or_raise(|| format!("could not drop index {i}"));
            }
            create_pending_index(plan);
        });
    }
}

fn index_hash_column(relid: pg_sys::Oid, name: &str, owner: pg_sys::Oid, h: &str) {
    let indexed = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
                        ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]
                        WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
        &[relid.into(), h.into()],
    )
    .or_raise(|| format!("could not read the indexes of {name}"));
    if indexed != Some(true) {
        as_owner(owner, || {
            Spi::run(&format!("CREATE INDEX ON {name} ({})", quote_identifier(h)))
                .or_raise(|| format!("could not index the hash column of {name}"))
        });
    }
}

/// Writes the watch into doppler.watched (as the extension owner), and clears its settled
/// stale-model scan: a new model, or new columns, mean looking again.
fn register(plan: &Plan) {
    let args = plan.args;
    let key_type = if plan.keys.len() == 1 {
        column_type(args.relid, &plan.keys[0]).map(|(_, shown, _)| shown)
    } else {
        None
    };
    as_catalog(extension_owner(), || {
        Spi::run_with_args(
            "INSERT INTO doppler.watched (relid, source_column, source_kind, vector_column, vector_kind, key_columns, batch_size, priority,
                                          key_type, mode, on_error, hash_column, dedup, model, model_column)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6::pg_catalog.name[], $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (relid) DO UPDATE SET source_column = EXCLUDED.source_column, source_kind = EXCLUDED.source_kind,
                vector_column = EXCLUDED.vector_column, vector_kind = EXCLUDED.vector_kind, key_columns = EXCLUDED.key_columns,
                batch_size = EXCLUDED.batch_size, priority = EXCLUDED.priority, key_type = EXCLUDED.key_type,
                mode = EXCLUDED.mode, on_error = EXCLUDED.on_error,
                hash_column = EXCLUDED.hash_column, dedup = EXCLUDED.dedup,
                model = EXCLUDED.model, model_column = EXCLUDED.model_column",
            &[
                args.relid.into(),
                args.source_column.into(),
                plan.source_kind.as_str().into(),
                args.vector_column.into(),
                plan.vector_kind.as_str().into(),
                plan.keys.clone().into(),
                args.batch_size.into(),
                args.priority.into(),
                key_type.into(),
                plan.mode.as_str().into(),
                plan.on_error.as_str().into(),
                args.hash_column.into(),
                args.dedup.into(),
                plan.spec.name.as_str().into(),
                plan.model_column.as_str().into(),
            ],
        )
        .or_raise(|| format!("could not register {}", plan.table.name));
        if Installed::get().is_some_and(Installed::has_pdq) {
            Spi::run_with_args(
                "UPDATE doppler.watched SET pdq_column = $2, pdq_quality_column = $3
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[
                    args.relid.into(),
                    args.pdq_column.into(),
                    args.pdq_quality_column.into(),
                ],
            )
            .or_raise(|| format!("could not register {}", plan.table.name));
        }
        if Installed::get().is_some_and(Installed::has_stale_scan) {
            Spi::run_with_args(
                "UPDATE doppler.watched SET stale_scan = NULL
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[args.relid.into()],
            )
            .or_raise(|| format!("could not register {}", plan.table.name));
        }
    });
}

/// What the pending index's comment says: doppler finds its index by it (names are the user's,
/// and a comment survives pg_dump and restore). The index of releases before held rows (0.3.0),
/// which kept them, says only the first part.
const PENDING_COMMENT_WITH_HELD: &str = "doppler: the rows whose vector is to be computed";
const PENDING_COMMENT: &str =
    "doppler: the rows whose vector is to be computed (rows held back after a failure left out)";

/// The pending indexes of a table (quoted qualified names), and whether each is current:
/// partial indexes over the rows without a vector, which claims use.
fn pending_indexes(relid: pg_sys::Oid) -> Vec<(String, bool)> {
    Spi::connect(|c| {
        c.select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, x.relname),
                    pg_catalog.obj_description(x.oid, 'pg_class') OPERATOR(pg_catalog.=) $2
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) i.indexrelid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) x.relnamespace
             WHERE i.indrelid OPERATOR(pg_catalog.=) $1
               AND pg_catalog.obj_description(x.oid, 'pg_class') OPERATOR(pg_catalog.=) ANY (ARRAY[$2, $3])",
            None,
            &[relid.into(), PENDING_COMMENT.into(), PENDING_COMMENT_WITH_HELD.into()],
        )?
        .map(|r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<bool>(2)?.unwrap_or(false))))
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .or_raise(|| format!("could not read the indexes of relation {}", relid.to_u32()))
}

/// A free name for an index of `relid` in its schema: the table's name cut to 40 bytes (on a
/// character boundary, so that no name is truncated at 63 bytes), `suffix`, and `_<n>` when
/// taken. Returns the quoted name and the quoted schema-qualified name.
pub fn free_index_name(relid: pg_sys::Oid, suffix: &str) -> (String, String) {
    let what = || format!("could not name an index of relation {}", relid.to_u32());
    let (relname, schema) = Spi::get_two_with_args::<String, String>(
        "SELECT c.relname::pg_catalog.text, n.nspname::pg_catalog.text FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    )
    .or_raise(what);
    let (relname, schema) = (relname.unwrap_or_default(), schema.unwrap_or_default());
    let mut cut = 40.min(relname.len());
    while !relname.is_char_boundary(cut) {
        cut -= 1;
    }
    let base = format!("{}{suffix}", &relname[..cut]);
    for n in 0..1000 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}_{n}")
        };
        let taken = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_class o, pg_catalog.pg_class c
                            WHERE c.oid OPERATOR(pg_catalog.=) $1
                              AND o.relnamespace OPERATOR(pg_catalog.=) c.relnamespace
                              AND o.relname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
            &[relid.into(), name.as_str().into()],
        )
        .or_raise(what);
        if taken != Some(true) {
            return (
                quote_identifier(&name),
                format!("{}.{}", quote_identifier(&schema), quote_identifier(&name)),
            );
        }
    }
    raise(
        Code::ERRCODE_DUPLICATE_OBJECT,
        format!("no free name for an index of relation {}", relid.to_u32()),
        "",
    )
}

/// Builds the pending index: `(key) WHERE (vector IS NULL [OR hash IS NULL]) AND source IS NOT
/// NULL AND model is not '!failed'` ([`sql::pending_index_predicate`]), named after the table
/// (a free name in its schema), and comments it. As the table owner.
fn create_pending_index(plan: &Plan) {
    let args = plan.args;
    let (index, schema_index) = free_index_name(args.relid, "_doppler_pending");
    let sql = format!(
        "CREATE INDEX {index} ON {table} ({keys}) WHERE {predicate}",
        table = plan.table.name,
        keys = plan
            .keys
            .iter()
            .map(quote_identifier)
            .collect::<Vec<_>>()
            .join(", "),
        predicate = sql::pending_index_predicate(
            "",
            args.source_column,
            args.vector_column,
            &args.marks(),
            &plan.model_column
        ),
    );
    let what = || format!("could not index the pending rows of {}", plan.table.name);
    Spi::run(&sql).or_raise(what);
    Spi::run(&format!(
        "COMMENT ON INDEX {schema_index} IS {}",
        quote_literal(PENDING_COMMENT)
    ))
    .or_raise(what);
}

/// Who fills a watched table the caller owns in the background (`watch(..., workers => ...)`):
/// the server's worker, external workers, or both. Allowing external workers records the
/// SHA-256 of the model's file, which they check their own copy against. Returns the watch's
/// description with who fills it.
pub fn set_workers(relid: pg_sys::Oid, workers: &str, described: &str) -> String {
    let table = owned_table(relid);
    let workers = Workers::from_arg(workers);
    let Some(w) = load(relid) else {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("{} is not watched by doppler", table.name),
            "",
        )
    };
    if workers != Workers::Server && !Installed::get().is_some_and(Installed::has_workers) {
        raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            "external workers need doppler 0.10.0's SQL objects in this database",
            "Run ALTER EXTENSION doppler UPDATE.",
        );
    }
    if Installed::get().is_some_and(Installed::has_workers) {
        as_catalog(extension_owner(), || {
            Spi::run_with_args(
                "UPDATE doppler.watched SET workers = $2
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[relid.into(), workers.as_str().into()],
            )
            .or_raise(|| format!("could not register {}", table.name))
        });
    }
    if workers.external() {
        crate::workers::record_sha256(&w.spec());
    }
    match workers {
        Workers::Server => described.to_string(),
        Workers::External => format!("{described}; filled by external workers"),
        Workers::Any => format!("{described}; filled by the server's worker and external workers"),
    }
}

/// Ends the watch of a table the caller owns: doppler's triggers, the pending index and the held
/// marks go (as the owner), and so do the table's rows of doppler's catalog (as the extension
/// owner). Returns whether it was watched.
pub fn unwatch(relid: pg_sys::Oid) -> bool {
    let table = owned_table(relid);
    let watched = load(relid);
    as_owner(table.owner, || {
        triggers::drop_all(&table.name);
        for (i, _) in pending_indexes(relid) {
            Spi::run(&format!("DROP INDEX {i}")).or_raise(|| format!("could not drop index {i}"));
        }
        // the rows held back lose their mark with their failure records (after the triggers:
        // this fires none of doppler's)
        if let Some(w) = &watched {
            unmark(w, false);
        }
    });
    as_catalog(extension_owner(), || {
        let this = "relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass";
        let what = || format!("could not unwatch {}", table.name);
        Spi::run_with_args(
            &format!("DELETE FROM doppler.failures WHERE {this}"),
            &[relid.into()],
        )
        .or_raise(what);
        Spi::run_with_args(
            &format!("DELETE FROM doppler.batches WHERE {this}"),
            &[relid.into()],
        )
        .or_raise(what);
        Spi::get_one_with_args::<bool>(
            &format!(
                "WITH d AS (DELETE FROM doppler.watched WHERE {this} RETURNING 1)
                      SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM d"
            ),
            &[relid.into()],
        )
        .or_raise(what)
        .unwrap_or(false)
    })
}

/// Makes the failed rows of the caller's tables due again (one table, or all the caller owns,
/// every watched table for a superuser), clearing the held marks of rows without a record first.
/// Returns how many failure records were reset.
pub fn retry_failed(relid: Option<pg_sys::Oid>) -> i64 {
    let tables: Vec<pg_sys::Oid> = match relid {
        Some(r) => {
            owned_table(r);
            vec![r]
        }
        None => Spi::connect(|c| {
            c.select(
                "SELECT w.relid::pg_catalog.oid FROM doppler.watched w
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) w.relid::pg_catalog.oid
                 WHERE pg_catalog.pg_has_role(c.relowner, 'USAGE')",
                None,
                &[],
            )?
            .map(|r| {
                r.get::<pg_sys::Oid>(1)
                    .map(|o| o.unwrap_or(pg_sys::InvalidOid))
            })
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default(),
    };
    // rows held back without a record (their key changed where no trigger saw it): to do again
    for w in load_all().into_iter().filter(|w| tables.contains(&w.relid)) {
        as_owner(w.owner, || unmark(&w, true));
    }
    let n = as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<i64>(
            "WITH u AS (UPDATE doppler.failures SET attempts = 0, next_attempt = pg_catalog.now()
                        WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[])
                        RETURNING 1)
             SELECT pg_catalog.count(*) FROM u",
            &[tables.into()],
        )
        .or_raise(|| "could not retry failures".into())
        .unwrap_or(0)
    });
    crate::worker::wake();
    n
}

/// Clears the held mark ([`HELD`]) of a table's rows, so that claims see them again: all of them
/// (unwatch), or (`orphans`) those without a failure record (a key changed where no trigger saw
/// it, a record deleted by hand or with a dropped column, a row copied with its mark). The
/// vector goes too: a held row's vector, if any, is an older model's, and an untagged vector
/// would read as current. A scan of the table, as the table owner (not over partitions of other
/// owners, whose triggers would run with this owner's rights; the sync trigger does not fill
/// these rows here); returns how many rows it cleared.
fn unmark(w: &Watched, orphans: bool) -> i64 {
    if let Some(child) = foreign_child(w.relid, w.owner) {
        notice!(
            "doppler: held rows of {} are left marked: partition {child} has another owner",
            w.name
        );
        return 0;
    }
    let orphan = if orphans {
        format!(
            "AND NOT EXISTS (SELECT FROM doppler.failures f
                             WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                               AND f.row_key OPERATOR(pg_catalog.=) {})",
            w.key_over("t")
        )
    } else {
        String::new()
    };
    let sql = format!(
        "WITH u AS (UPDATE {table} t SET {mc} = NULL, {vec} = NULL
                    WHERE t.{mc} OPERATOR(pg_catalog.=) $2::pg_catalog.text {orphan} RETURNING 1)
         SELECT pg_catalog.count(*) FROM u",
        table = w.name,
        mc = quote_identifier(&w.model_column),
        vec = quote_identifier(&w.vector_column),
    );
    w.check_name();
    triggers::without_sync(w.relid, || {
        Spi::get_one_with_args::<i64>(&sql, &[w.relid.into(), HELD.into()])
    })
    .or_raise(|| format!("could not clear the held rows of {}", w.name))
    .unwrap_or(0)
}
