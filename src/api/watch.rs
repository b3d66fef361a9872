//! Watching tables: `doppler.watch`, `unwatch`, `retry_failed`, `wake`, and the batch step of
//! `doppler.fill`. The SQL-facing wrappers with `regclass`/`name` signatures are in
//! sql/finalize.sql; these check ownership with the caller's rights, then write doppler's
//! catalog as the extension owner.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::session;
use crate::triggers;
use crate::worker::{self, batch};

fn fail(code: PgSqlErrorCode, msg: String, hint: &str) -> ! {
    crate::errors::raise_code(code, msg, hint)
}

/// The extension owner: doppler's catalog is written with its rights.
pub fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'doppler'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| pgrx::error!("extension doppler is not installed"))
}

struct Rel {
    name: String,
    owner: pg_sys::Oid,
}

/// The table, which the caller must own (or be a member of its owner role).
fn owned_table(relid: pg_sys::Oid) -> Rel {
    let row = Spi::get_three_with_args::<String, pg_sys::Oid, String>(
        "SELECT format('%I.%I', n.nspname, c.relname), c.relowner, c.relkind::text
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
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
    if !unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) } {
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
        "SELECT t.typname::text, format_type(a.atttypid, a.atttypmod), a.atttypmod
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[relid.into(), col.into()],
    )
    .ok()
    .and_then(|(a, b, c)| Some((a?, b?, c?)))
}

#[pg_extern(volatile, parallel_unsafe)]
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
        "SELECT array_agg(a.attname::text ORDER BY k.ord)
         FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = $1 AND i.indisprimary",
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
    let (current_model, current_column) = match Spi::get_two_with_args::<String, String>(
        "SELECT model, model_column::text FROM doppler.watched WHERE relid = $1::oid::regclass",
        &[relid.into()],
    ) {
        Ok(row) => row,
        Err(pgrx::spi::Error::InvalidPosition) => (None, None), // not watched yet
        Err(e) => pgrx::error!("could not read doppler.watched: {e}"),
    };
    let spec = session::spec(model.or(current_model.as_deref()));
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
    match column_type(relid, &model_column) {
        None => Spi::run(&format!(
            "ALTER TABLE {name} ADD COLUMN {} text",
            quote_identifier(&model_column)
        ))
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
    let previous = match Spi::get_one_with_args::<String>(
        "SELECT m.name || '@' || m.version FROM doppler.watched w JOIN doppler.models m ON m.name = w.model
         WHERE w.relid = $1::oid::regclass AND w.vector_column = $2",
        &[relid.into(), vector_column.into()],
    ) {
        Ok(tag) => tag,
        Err(pgrx::spi::Error::InvalidPosition) => None, // not watched yet (or another column)
        Err(e) => pgrx::error!("could not read doppler.watched: {e}"),
    };
    let untagged_as = previous.unwrap_or_else(|| spec.tag());
    {
        let (vec, mc) = (
            quote_identifier(vector_column),
            quote_identifier(&model_column),
        );
        Spi::run_with_args(
            &format!("UPDATE {name} SET {mc} = $1 WHERE {vec} IS NOT NULL AND {mc} IS NULL"),
            &[untagged_as.as_str().into()],
        )
        .unwrap_or_else(|e| pgrx::error!("could not tag the vectors of {name}: {e}"));
    }
    // Dedup looks up known hashes for every model run: give it an index unless one leads with
    // the hash column already.
    if let (true, Some(h)) = (dedup, hash_column) {
        let indexed = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
                            ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                            WHERE i.indrelid = $1 AND a.attname = $2)",
            &[relid.into(), h.into()],
        )
        .unwrap_or_else(|e| pgrx::error!("could not read the indexes of {name}: {e}"));
        if indexed != Some(true) {
            Spi::run(&format!("CREATE INDEX ON {name} ({})", quote_identifier(h)))
                .unwrap_or_else(|e| pgrx::error!("could not index the hash column of {name}: {e}"));
        }
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
             VALUES ($1::oid::regclass, $2, $3, $4, $5, $6::name[], $7, $8, $9, $10, $11, $12, $13, $14, $15)
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
    let w = batch::load_watched(Some(relid))
        .into_iter()
        .next()
        .expect("just registered");
    triggers::replace(&w);
    wake();
    format!(
        "doppler watches {name} ({mode}): {source_column} ({source_kind}) -> {vector_column} ({vector_kind}) by {}, key ({})",
        spec.tag(),
        keys.join(", ")
    )
}

#[pg_extern(volatile, parallel_unsafe)]
fn _unwatch(relid: pg_sys::Oid) -> bool {
    let rel = owned_table(relid);
    triggers::drop_all(&rel.name);
    let owner = extension_owner();
    as_catalog(owner, || {
        Spi::run_with_args("DELETE FROM doppler.failures WHERE relid = $1::oid::regclass", &[relid.into()])?;
        Spi::run_with_args("DELETE FROM doppler.batches WHERE relid = $1::oid::regclass", &[relid.into()])?;
        Spi::get_one_with_args::<bool>(
            "WITH d AS (DELETE FROM doppler.watched WHERE relid = $1::oid::regclass RETURNING 1) SELECT count(*) > 0 FROM d",
            &[relid.into()],
        )
    })
    .unwrap_or_else(|e| pgrx::error!("could not unwatch: {e}"))
    .unwrap_or(false)
}

#[pg_extern(volatile, parallel_unsafe)]
fn _retry_failed(relid: Option<pg_sys::Oid>) -> i64 {
    // the caller's tables only (all of them for a superuser)
    let tables: Vec<pg_sys::Oid> = match relid {
        Some(r) => {
            owned_table(r);
            vec![r]
        }
        None => Spi::connect(|c| {
            c.select(
                "SELECT w.relid::oid FROM doppler.watched w JOIN pg_catalog.pg_class c ON c.oid = w.relid
                 WHERE pg_catalog.pg_has_role(c.relowner, 'USAGE')",
                None,
                &[],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(|o| o.unwrap_or(pg_sys::InvalidOid)))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default(),
    };
    let owner = extension_owner();
    let n = as_catalog(owner, || {
        Spi::get_one_with_args::<i64>(
            "WITH u AS (UPDATE doppler.failures SET attempts = 0, next_attempt = now()
                        WHERE relid = ANY($1::oid[]::regclass[]) RETURNING 1) SELECT count(*) FROM u",
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
    owned_table(relid);
    let Some(w) = batch::load_watched(Some(relid)).into_iter().next() else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!(
                "relation with OID {} is not watched by doppler",
                relid.to_u32()
            ),
            "Call doppler.watch() first.",
        )
    };
    let limit = max_rows.map(|m| m as i64).unwrap_or(w.batch_size as i64);
    let r = if limit <= 0 {
        batch::BatchReport::default()
    } else {
        batch::run_batch(&w, limit, extension_owner(), "fill", None, false)
    };
    TableIterator::once((r.claimed, r.filled, r.failed, r.seconds))
}

/// Wakes this database's doppler workers now instead of at their next nap. Returns how many.
#[pg_extern(volatile, parallel_restricted)]
pub fn wake() -> i32 {
    wake_pids(&worker_pids())
}

/// The pids of this database's doppler workers.
pub fn worker_pids() -> Vec<i32> {
    Spi::connect(|c| {
        c.select(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = $1 AND datname = pg_catalog.current_database()",
            None,
            &[worker::BACKEND_TYPE.into()],
        )?
        .map(|r| r.get::<i32>(1).map(|p| p.unwrap_or(0)))
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default()
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

/// Writes doppler's catalog with the extension owner's rights, like a SECURITY DEFINER
/// function, after the caller's rights were checked.
fn as_catalog<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut user, mut ctx) = (pg_sys::InvalidOid, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut ctx);
        pg_sys::SetUserIdAndSecContext(owner, ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, ctx) };
    r
}
