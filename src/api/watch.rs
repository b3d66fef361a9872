//! Watching tables: `doppler.watch`, `unwatch`, `retry_failed`, `wake`, and the batch step of
//! `doppler.fill`. The SQL-facing wrappers with `regclass`/`name` signatures are in
//! sql/finalize.sql; these check the caller's ownership of the table first, then change the
//! table as its owner and doppler's catalog as the extension owner (see `privileged.rs`).

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::privileged::{acts_as, as_catalog, as_owner, current_user, extension_owner};
use crate::session;
use crate::triggers;
use crate::worker::{self, batch};

fn fail(code: PgSqlErrorCode, msg: String, hint: &str) -> ! {
    crate::errors::raise_code(code, msg, hint)
}

pub struct Rel {
    pub name: String,
    pub owner: pg_sys::Oid,
}

/// The table, which the caller must own (or be a member of its owner role).
pub fn owned_table(relid: pg_sys::Oid) -> Rel {
    let row = Spi::get_three_with_args::<String, pg_sys::Oid, String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.relowner, c.relkind::pg_catalog.text
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    );
    let Ok((Some(name), Some(owner), Some(kind))) = row else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
            "",
        )
    };
    if kind != "r" && kind != "p" {
        fail(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{name} is not a table"),
            "doppler watches tables and partitioned tables.",
        );
    }
    if !acts_as(current_user(), owner) {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of table {name}"),
            "",
        );
    }
    Rel { name, owner }
}

fn column_type(relid: pg_sys::Oid, col: &str) -> Option<(String, String, i32)> {
    // (type name, format_type, typmod)
    Spi::get_three_with_args::<String, String, i32>(
        "SELECT t.typname::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypmod
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
         WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped",
        &[relid.into(), col.into()],
    )
    .ok()
    .and_then(|(a, b, c)| Some((a?, b?, c?)))
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn _watch(
    relid: Option<pg_sys::Oid>,
    source_column: &str,
    vector_column: &str,
    batch_size: i32,
    priority: i32,
    mode: &str,
    on_error: &str,
    hash_column: Option<&str>,
    dedup: bool,
    model: Option<&str>,
    model_column: Option<&str>,
) -> String {
    let Some(relid) = relid else {
        fail(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "the table to watch must not be NULL".into(),
            "",
        )
    };
    let rel = owned_table(relid);
    let name = &rel.name;
    if let Some(child) = batch::foreign_child(relid, rel.owner) {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{child}, a partition or child table of {name}, has another owner"),
            "doppler works on a table as its owner only: give the partitions the parent's owner, or watch each one.",
        );
    }
    if !["async", "sync", "manual"].contains(&mode) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("mode must be async, sync or manual, not \"{mode}\""),
            "",
        );
    }
    if !["raise", "defer"].contains(&on_error) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("on_error must be raise or defer, not \"{on_error}\""),
            "",
        );
    }
    if !(1..=4096).contains(&batch_size) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("batch_size must be between 1 and 4096, not {batch_size}"),
            "",
        );
    }
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
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            format!("table {name} has no primary key"),
            "doppler finds and records rows by primary key: ALTER TABLE ... ADD PRIMARY KEY first.",
        );
    }
    let source_kind = match column_type(relid, source_column) {
        None => fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "column {} of table {name} does not exist",
                quote_identifier(source_column)
            ),
            "",
        ),
        Some((t, _, _)) if t == "text" || t == "varchar" => "path",
        Some((t, _, _)) if t == "bytea" => "bytea",
        Some((_, shown, _)) => fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "source column {} of table {name} is {shown}",
                quote_identifier(source_column)
            ),
            "The source column holds image paths (text) or image bytes (bytea).",
        ),
    };
    if source_column == vector_column {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "the source and vector columns must differ".into(),
            "",
        );
    }
    let (vector_kind, dims) = match column_type(relid, vector_column) {
        None => fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "column {} of table {name} does not exist",
                quote_identifier(vector_column)
            ),
            "",
        ),
        Some((t, _, _)) if t == "_float4" => ("real[]", -1),
        Some((t, _, m)) if t == "vector" || t == "halfvec" => {
            (if t == "vector" { "vector" } else { "halfvec" }, m)
        }
        Some((_, shown, _)) => fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "vector column {} of table {name} is {shown}",
                quote_identifier(vector_column)
            ),
            "Use real[], or pgvector's vector(n) or halfvec(n).",
        ),
    };
    // Watching again without naming a model keeps the table's model and model column.
    let current = batch::load_watched(Some(relid)).into_iter().next();
    let (current_model, current_column) = (
        current.as_ref().map(|w| w.model.clone()),
        current.as_ref().map(|w| w.model_column.clone()),
    );
    let spec = session::spec(model.or(current_model.as_deref()));
    // a model whose file is missing would only fail in the worker, batch after batch
    session::check_file(&spec);
    if dims > 0 && dims != spec.dim as i32 {
        fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "vector column {} of table {name} has {dims} dimensions, model \"{}\" produces {}",
                quote_identifier(vector_column),
                spec.name,
                spec.dim
            ),
            "Use a column of the model's dimensions, or one without a fixed dimension (real[], vector).",
        );
    }
    if source_kind == "path"
        && !unsafe {
            pg_sys::superuser_arg(rel.owner)
                || pg_sys::has_privs_of_role(
                    rel.owner,
                    pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES),
                )
        }
    {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("the owner of table {name} may not read server files"),
            "Watching a path column reads server files with the table owner's rights: grant pg_read_server_files to the owner, or store the images as bytea.",
        );
    }
    if let Some(h) = hash_column {
        match column_type(relid, h) {
            None => fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "column {} of table {name} does not exist",
                    quote_identifier(h)
                ),
                "",
            ),
            // varchar(n): typmod n + 4; a dHash is 16 hex digits
            Some((t, shown, m)) if t == "varchar" && m >= 4 && m - 4 < 16 => fail(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "hash column {} of table {name} is {shown}, too short for a dHash",
                    quote_identifier(h)
                ),
                "A dHash is 16 hex digits: use text or varchar(16) or longer.",
            ),
            Some((t, _, _)) if t == "text" || t == "varchar" => {}
            Some((_, shown, _)) => fail(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "hash column {} of table {name} is {shown}",
                    quote_identifier(h)
                ),
                "The hash column holds dHash strings (text).",
            ),
        }
        if h == source_column || h == vector_column {
            fail(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "the hash column must differ from the source and vector columns".into(),
                "",
            );
        }
    }
    if dedup && hash_column.is_none() {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "dedup needs a hash column".into(),
            "Pass hash_column => 'd_hash' (a text column) with dedup => true.",
        );
    }
    // The column that records which model (name@version) made each row's vector.
    let model_column = model_column
        .map(str::to_string)
        .or(current_column)
        .unwrap_or_else(|| format!("{vector_column}_model"));
    if model_column.len() > 63 {
        fail(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            format!("the model column name \"{model_column}\" is longer than 63 bytes"),
            "Pass a shorter model_column => ...",
        );
    }
    if [source_column, vector_column, hash_column.unwrap_or("")].contains(&model_column.as_str()) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "the model column must differ from the source, vector and hash columns".into(),
            "",
        );
    }
    // The table itself is changed as its owner (the caller may be a superuser or a member of
    // the owner role): the owner's triggers, defaults and index expressions run with its rights.
    match column_type(relid, &model_column) {
        None => as_owner(rel.owner, || {
            Spi::run(&format!(
                "ALTER TABLE {name} ADD COLUMN {} pg_catalog.text",
                quote_identifier(&model_column)
            ))
        })
        .unwrap_or_else(|e| pgrx::error!("could not add the model column to {name}: {e}")),
        Some((t, _, _)) if t == "text" => {}
        Some((_, shown, _)) => fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "model column {} of table {name} is {shown}, not text",
                quote_identifier(&model_column)
            ),
            "The model column holds name@version text.",
        ),
    }
    // Vectors nobody tagged (there before doppler, or written by hand) are tagged now: with the
    // table's previous model when the model changes (so they are re-embedded, readable until
    // then), else with this one. Afterwards only the worker writes tags.
    let previous = current
        .as_ref()
        .filter(|w| w.vector_column == vector_column)
        .map(|w| w.spec().tag());
    let untagged_as = previous.unwrap_or_else(|| spec.tag());
    {
        let (vec, mc) = (
            quote_identifier(vector_column),
            quote_identifier(&model_column),
        );
        as_owner(rel.owner, || {
            Spi::run_with_args(
                &format!("UPDATE {name} SET {mc} = $1 WHERE {vec} IS NOT NULL AND {mc} IS NULL"),
                &[untagged_as.as_str().into()],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("could not tag the vectors of {name}: {e}"));
    }
    // Dedup looks up known hashes for every model run: give it an index unless one leads with
    // the hash column already.
    if let (true, Some(h)) = (dedup, hash_column) {
        let indexed = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
                            ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]
                            WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
            &[relid.into(), h.into()],
        )
        .unwrap_or_else(|e| pgrx::error!("could not read the indexes of {name}: {e}"));
        if indexed != Some(true) {
            as_owner(rel.owner, || {
                Spi::run(&format!("CREATE INDEX ON {name} ({})", quote_identifier(h)))
            })
            .unwrap_or_else(|e| pgrx::error!("could not index the hash column of {name}: {e}"));
        }
    }
    // Claims find the rows without a vector through a partial index over exactly those rows (kept
    // when it exists for these columns; built again when the source or vector column changed).
    let moved = current.as_ref().is_some_and(|w| {
        w.vector_column != vector_column
            || w.source_column != source_column
            || w.hash_column.as_deref() != hash_column
            || w.model_column != model_column
    });
    let existing = pending_indexes(relid);
    // (0.3.0's index, which keeps held rows, is built again)
    let outdated = existing.iter().any(|(_, current)| !current);
    if moved || existing.is_empty() || outdated {
        as_owner(rel.owner, || {
            for (i, _) in &existing {
                Spi::run(&format!("DROP INDEX {i}"))?;
            }
            create_pending_index(
                name,
                relid,
                &keys,
                source_column,
                vector_column,
                hash_column,
                &model_column,
            )
        })
        .unwrap_or_else(|e| pgrx::error!("could not index the pending rows of {name}: {e}"));
    }
    let key_type = if keys.len() == 1 {
        column_type(relid, &keys[0]).map(|(_, shown, _)| shown)
    } else {
        None
    };
    let owner = extension_owner();
    as_catalog(owner, || {
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
                relid.into(),
                source_column.into(),
                source_kind.into(),
                vector_column.into(),
                vector_kind.into(),
                keys.clone().into(),
                batch_size.into(),
                priority.into(),
                key_type.into(),
                mode.into(),
                on_error.into(),
                hash_column.into(),
                dedup.into(),
                spec.name.as_str().into(),
                model_column.as_str().into(),
            ],
        )
    })
    .unwrap_or_else(|e| pgrx::error!("could not register {name}: {e}"));
    // look for vectors of another model again (not in a database whose SQL is still 0.1.0)
    if crate::privileged::extension_version().as_deref() != Some("0.1.0") {
        as_catalog(owner, || {
            Spi::run_with_args(
                "UPDATE doppler.watched SET stale_scan = NULL
                 WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
                &[relid.into()],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("could not register {name}: {e}"));
    }
    let w = batch::load_watched(Some(relid))
        .into_iter()
        .next()
        .expect("just registered");
    // rows held back without a failure record (their records went with a dropped column, or
    // they came in with their marks: a copy, a restore of one table, a partition attached), and
    // every held row when the source column changed (their records name the old one's values):
    // to do again. (Another vector, hash or model column keeps the given-up rows given up.)
    let source_moved = current
        .as_ref()
        .is_some_and(|c| c.source_column != source_column);
    as_owner(rel.owner, || unmark(&w, !source_moved));
    as_owner(rel.owner, || triggers::replace(&w));
    wake();
    format!(
        "doppler watches {name} ({mode}): {source_column} ({source_kind}) -> {vector_column} ({vector_kind}) by {}, key ({})",
        spec.tag(),
        keys.join(", ")
    )
}

/// What the pending index's comment says: doppler finds its index by it (names are the user's,
/// and a comment survives pg_dump and restore). 0.3.0's index, which still held the rows held
/// back, says only the first part.
const PENDING_COMMENT_0_3: &str = "doppler: the rows whose vector is to be computed";
const PENDING_COMMENT: &str =
    "doppler: the rows whose vector is to be computed (rows held back after a failure left out)";

/// The pending indexes of a table (quoted qualified names), and whether each is this version's:
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
            &[relid.into(), PENDING_COMMENT.into(), PENDING_COMMENT_0_3.into()],
        )?
        .map(|r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<bool>(2)?.unwrap_or(false))))
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| pgrx::error!("could not read the indexes of relation {}: {e}", relid.to_u32()))
}

/// A free name for an index of `relid` in its schema: the table's name cut to 40 bytes (on a
/// character boundary, so that no name is truncated at 63 bytes), `suffix`, and `_<n>` when
/// taken. Returns the quoted name and the quoted schema-qualified name.
pub fn free_index_name(
    relid: pg_sys::Oid,
    suffix: &str,
) -> Result<(String, String), pgrx::spi::Error> {
    let (relname, schema) = Spi::get_two_with_args::<String, String>(
        "SELECT c.relname::pg_catalog.text, n.nspname::pg_catalog.text FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    )?;
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
        )?;
        if taken != Some(true) {
            return Ok((
                quote_identifier(&name),
                format!("{}.{}", quote_identifier(&schema), quote_identifier(&name)),
            ));
        }
    }
    pgrx::error!("no free name for an index of relation {}", relid.to_u32())
}

/// Builds the pending index: `(key) WHERE (vector IS NULL [OR hash IS NULL]) AND source IS NOT
/// NULL AND model is not '!failed'` ([`batch::pending_index_predicate`]), named after the table
/// (a free name in its schema). As the table owner.
fn create_pending_index(
    table: &str,
    relid: pg_sys::Oid,
    keys: &[String],
    source_column: &str,
    vector_column: &str,
    hash_column: Option<&str>,
    model_column: &str,
) -> Result<(), pgrx::spi::Error> {
    let (index, schema_index) = free_index_name(relid, "_doppler_pending")?;
    let cols: Vec<String> = keys.iter().map(quote_identifier).collect();
    let predicate =
        batch::pending_index_predicate("", source_column, vector_column, hash_column, model_column);
    Spi::run(&format!(
        "CREATE INDEX {index} ON {table} ({}) WHERE {predicate}",
        cols.join(", "),
    ))?;
    Spi::run(&format!(
        "COMMENT ON INDEX {schema_index} IS {}",
        pgrx::spi::quote_literal(PENDING_COMMENT)
    ))
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _unwatch(relid: pg_sys::Oid) -> bool {
    let rel = owned_table(relid);
    let watched = batch::load_watched(Some(relid)).into_iter().next();
    as_owner(rel.owner, || {
        triggers::drop_all(&rel.name);
        for (i, _) in pending_indexes(relid) {
            Spi::run(&format!("DROP INDEX {i}"))
                .unwrap_or_else(|e| pgrx::error!("could not drop index {i}: {e}"));
        }
        // the rows held back lose their mark with their failure records (after the triggers:
        // this fires none of doppler's)
        if let Some(w) = &watched {
            unmark(w, false);
        }
    });
    as_catalog(extension_owner(), || {
        let this = "relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass";
        Spi::run_with_args(
            &format!("DELETE FROM doppler.failures WHERE {this}"),
            &[relid.into()],
        )?;
        Spi::run_with_args(
            &format!("DELETE FROM doppler.batches WHERE {this}"),
            &[relid.into()],
        )?;
        Spi::get_one_with_args::<bool>(
            &format!(
                "WITH d AS (DELETE FROM doppler.watched WHERE {this} RETURNING 1)
                      SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM d"
            ),
            &[relid.into()],
        )
    })
    .unwrap_or_else(|e| pgrx::error!("could not unwatch: {e}"))
    .unwrap_or(false)
}

/// Clears the held mark ([`batch::HELD`]) of a table's rows, so that claims see them again: all
/// of them (unwatch), or (`orphans`) those without a failure record (a key changed where no
/// trigger saw it, a record deleted by hand or with a dropped column, a row copied with its
/// mark). The vector goes too: a held row's vector, if any, is an older model's, and an untagged
/// vector would read as current. A scan of the table, as the table owner (not over partitions
/// of other owners, whose triggers would run with this owner's rights; the sync trigger does
/// not fill these rows here); returns how many rows it cleared.
fn unmark(w: &batch::Watched, orphans: bool) -> i64 {
    if let Some(child) = batch::foreign_child(w.relid, w.owner) {
        notice!(
            "doppler: held rows of {} are left marked: partition {child} has another owner",
            w.name
        );
        return 0;
    }
    let (mc, vec) = (
        quote_identifier(&w.model_column),
        quote_identifier(&w.vector_column),
    );
    let orphan = if orphans {
        format!(
            "AND NOT EXISTS (SELECT FROM doppler.failures f
                             WHERE f.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                               AND f.row_key OPERATOR(pg_catalog.=) {})",
            w.key_expr()
        )
    } else {
        String::new()
    };
    w.check_name();
    triggers::without_sync(w.relid, || {
        Spi::get_one_with_args::<i64>(
            &format!(
                "WITH u AS (UPDATE {table} t SET {mc} = NULL, {vec} = NULL
                            WHERE t.{mc} OPERATOR(pg_catalog.=) $2::pg_catalog.text {orphan} RETURNING 1)
                 SELECT pg_catalog.count(*) FROM u",
                table = w.name
            ),
            &[w.relid.into(), batch::HELD.into()],
        )
    })
    .unwrap_or_else(|e| pgrx::error!("could not clear the held rows of {}: {e}", w.name))
    .unwrap_or(0)
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _retry_failed(relid: Option<pg_sys::Oid>) -> i64 {
    // the caller's tables only (all of them for a superuser)
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
    for w in batch::load_watched(None)
        .into_iter()
        .filter(|w| tables.contains(&w.relid))
    {
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
    })
    .unwrap_or_else(|e| pgrx::error!("could not retry failures: {e}"))
    .unwrap_or(0);
    wake();
    n
}

/// Claims and fills one batch of a watched table in the caller's transaction.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _fill_batch(
    relid: pg_sys::Oid,
    max_rows: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(claimed, i64),
        name!(filled, i64),
        name!(failed, i64),
        name!(seconds, f64),
    ),
> {
    let w = owned_watched(relid);
    let limit = max_rows.map(|m| m as i64).unwrap_or(w.batch_size as i64);
    let r = if limit <= 0 {
        batch::BatchReport::default()
    } else {
        batch::run_batch(
            w.relid,
            limit,
            extension_owner(),
            batch::Via::Fill,
            None,
            false,
        )
    };
    TableIterator::once((r.claimed, r.filled, r.failed, r.seconds))
}

/// For `fill`, when its claim found nothing: waits for the rows with work to do that other
/// transactions hold, and says whether a row is left to claim ([`batch::wait_for_holders`]).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _fill_wait(relid: pg_sys::Oid) -> bool {
    owned_watched(relid);
    batch::wait_for_holders(relid)
}

/// The watch of a table the caller owns (42501 otherwise), for fill's internal functions;
/// 42704 when it is not watched.
fn owned_watched(relid: pg_sys::Oid) -> batch::Watched {
    owned_table(relid);
    batch::watched_or_raise(relid, "Call doppler.watch() first.")
}

/// Wakes this database's doppler workers now instead of at their next nap. Returns how many.
#[pg_extern(volatile, parallel_restricted)]
pub fn wake() -> i32 {
    wake_pids(&worker_pids())
}

/// The pids of this database's doppler workers. Read as the extension owner: pg_stat_activity
/// shows another role's backend_type only to roles with pg_read_all_stats, and a plain table
/// owner's writes must wake the worker too.
pub fn worker_pids() -> Vec<i32> {
    as_catalog(extension_owner(), || {
        Spi::connect(|c| {
            c.select(
                "SELECT a.pid FROM pg_catalog.pg_stat_activity a
                 WHERE a.backend_type OPERATOR(pg_catalog.=) $1
                   AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()",
                None,
                &[worker::BACKEND_TYPE.into()],
            )?
            .map(|r| r.get::<i32>(1).map(|p| p.unwrap_or(0)))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default()
    })
}

/// The pid of this database's doppler worker (for doppler.status), whoever asks.
#[pg_extern(stable, parallel_restricted)]
fn _worker_pid() -> Option<i32> {
    worker_pids().into_iter().min()
}

/// Sets the latch of each process; needs no SPI, so it can run in a commit callback.
pub fn wake_pids(pids: &[i32]) -> i32 {
    let mut n = 0;
    for &pid in pids {
        // SAFETY: BackendPidGetProc returns NULL or a live PGPROC; setting its latch is what
        // Postgres itself does to wake another process.
        unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            if !proc_.is_null() {
                pg_sys::SetLatch(&mut (*proc_).procLatch);
                n += 1;
            }
        }
    }
    n
}
