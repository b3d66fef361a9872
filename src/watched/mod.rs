//! A watched table: what doppler.watched and the catalogs say of it ([`Watched`]), how it is
//! read, locked and checked before doppler touches it, and (in the submodules) the SQL that
//! describes its rows and which SQL version the database has installed.
//!
//! * [`load`] / [`load_all`]: the watch as it is now, read as the extension owner.
//! * [`lock`]: the watch of a table locked for this transaction, so that its name and owner hold
//!   until commit (the fill engine takes a `&Watched` from here); [`lock_for_reading`] for
//!   search and status, after their privilege checks.
//! * [`Watched::check_name`]: before each statement by name, that the name still means the table.
//! * [`sql`]: the predicates and expressions claims, counts and searches build statements from.
//! * [`installed`]: the version of doppler's SQL objects, read once per transaction.
//!
//! Watching a table (the model column, the pending index, the triggers) is `watch.rs`'s.

pub mod installed;
pub mod kinds;
pub mod sql;

use pgrx::prelude::*;

use crate::errors::{raise, warn, Code, SpiOrRaise};
use crate::privileged::{as_catalog, extension_owner};
use crate::session;
pub use kinds::{Mode, OnError, SourceKind, VectorKind, Workers};

/// A watched table, as doppler.watched and the catalogs describe it.
#[derive(Clone, Debug)]
pub struct Watched {
    pub relid: pg_sys::Oid,
    /// `"schema"."table"`, quoted.
    pub name: String,
    pub owner: pg_sys::Oid,
    pub source_column: String,
    pub source_kind: SourceKind,
    pub vector_column: String,
    pub vector_kind: VectorKind,
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
    pub mode: Mode,
    pub on_error: OnError,
    pub hash_column: Option<String>,
    pub dedup: bool,
    /// The doppler.models entry that embeds this table.
    pub model: String,
    /// The text column tagging each vector with the model that made it (name@version).
    pub model_column: String,
    /// For which model tag the last scan for outdated vectors found none; None: scan again.
    pub stale_scan: Option<String>,
    /// The columns whose type no longer fits the watch (`"pic" is integer`), if any: doppler then
    /// reads nothing of the table (see [`MISFIT_SQL`]).
    pub misfit: Option<String>,
    /// Worker batches of this table in a row that overran `doppler.worker_batch_timeout`.
    pub overruns: i32,
    /// Whether the worker leaves the table alone for now, after an overrun (`backoff_until`).
    pub backed_off: bool,
    /// Who fills it in the background: the server's worker, external workers, or both (0.10.0;
    /// `server` in an older catalog).
    pub workers: Workers,
    /// The `bit(256)` column filled with each image's PDQ hash, and the integer column with its
    /// quality (0.11.0).
    pub pdq_column: Option<String>,
    pub pdq_quality_column: Option<String>,
}

/// What the model column holds in a row that doppler holds back: its image failed, or its hash
/// is a skip hash; the row's record in doppler.failures says why, and when it is tried again. No
/// model tag starts with `!` (model names are `[A-Za-z0-9_.-]`), so it never reads as one. A held
/// row leaves the pending index, so that failures do not turn claims back into scans; retries come
/// from doppler.failures (by `next_attempt`), and a changed source clears the mark with the vector.
pub const HELD: &str = "!failed";

// Read under the pinned search_path (as_catalog), so format_type() qualifies every type that is
// not in pg_catalog. `stale_scan` is read by name from the row: the column is missing from a
// database whose SQL objects are still the first release's.
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
           pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'stale_scan',
           (MISFIT),
           coalesce((pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'overruns')::pg_catalog.int4, 0),
           coalesce((pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'backoff_until')::pg_catalog.timestamptz
                    OPERATOR(pg_catalog.>) pg_catalog.now(), false),
           coalesce(pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'workers', 'server'),
           pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_column',
           pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_quality_column'
    FROM doppler.watched w
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) w.relid::pg_catalog.oid
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    LEFT JOIN pg_catalog.pg_attribute va ON va.attrelid OPERATOR(pg_catalog.=) c.oid
         AND va.attname OPERATOR(pg_catalog.=) w.vector_column AND NOT va.attisdropped
    LEFT JOIN pg_catalog.pg_type vt ON vt.oid OPERATOR(pg_catalog.=) va.atttypid
    LEFT JOIN pg_catalog.pg_namespace vn ON vn.oid OPERATOR(pg_catalog.=) vt.typnamespace";

/// The columns of watch `w` (over `pg_class c`) whose type does not fit it any more, as text, or
/// NULL: the source a text, varchar or bytea as watched, the vector real[] or pgvector's own
/// vector or halfvec as watched, the hash text or varchar of 16 or more, the PDQ column bit(256) or
/// bit varying of 256 or more, its quality smallint, integer or bigint, the model tag text, all
/// PostgreSQL's own types (a type of the same name in another schema is not one). With these, the
/// statements doppler runs over the table (claims, counts) call no code of the owner's types.
/// The event trigger that follows ALTER TABLE ends a watch that stops fitting (`triggers.rs`).
pub const MISFIT_SQL: &str = "
    SELECT pg_catalog.string_agg(pg_catalog.format('%I is %s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)),
                                 ', ' ORDER BY a.attnum)
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
      AND ((a.attname OPERATOR(pg_catalog.=) w.source_column
            AND a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.<>) ALL (
                CASE WHEN w.source_kind OPERATOR(pg_catalog.=) 'bytea' THEN '{pg_catalog.bytea}'
                     ELSE '{pg_catalog.text,pg_catalog.varchar}' END::pg_catalog.regtype[]))
        OR (a.attname OPERATOR(pg_catalog.=) w.model_column
            AND a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.<>) 'pg_catalog.text'::pg_catalog.regtype)
        OR (a.attname OPERATOR(pg_catalog.=) w.hash_column
            AND (a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.<>) ALL ('{pg_catalog.text,pg_catalog.varchar}'::pg_catalog.regtype[])
                 OR a.atttypmod OPERATOR(pg_catalog.>=) 4 AND a.atttypmod OPERATOR(pg_catalog.<) 20))
        OR (a.attname OPERATOR(pg_catalog.=) (pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_column')::pg_catalog.name
            AND NOT (a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.=) 'pg_catalog.varbit'::pg_catalog.regtype
                         AND (a.atttypmod OPERATOR(pg_catalog.<) 0 OR a.atttypmod OPERATOR(pg_catalog.>=) 256)
                     OR a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.=) 'pg_catalog.bit'::pg_catalog.regtype
                         AND a.atttypmod OPERATOR(pg_catalog.=) 256))
        OR (a.attname OPERATOR(pg_catalog.=) (pg_catalog.to_jsonb(w) OPERATOR(pg_catalog.->>) 'pdq_quality_column')::pg_catalog.name
            AND a.atttypid::pg_catalog.regtype OPERATOR(pg_catalog.<>) ALL ('{pg_catalog.int2,pg_catalog.int4,pg_catalog.int8}'::pg_catalog.regtype[]))
        OR (a.attname OPERATOR(pg_catalog.=) w.vector_column AND NOT EXISTS (
                SELECT FROM pg_catalog.pg_type t
                WHERE t.oid OPERATOR(pg_catalog.=) a.atttypid
                  AND CASE WHEN w.vector_kind OPERATOR(pg_catalog.=) 'real[]'
                           THEN t.oid::pg_catalog.regtype OPERATOR(pg_catalog.=) 'pg_catalog.float4[]'::pg_catalog.regtype
                           ELSE t.typname OPERATOR(pg_catalog.=) w.vector_kind::pg_catalog.name
                                AND t.typnamespace OPERATOR(pg_catalog.=) ANY (
                                    SELECT e.extnamespace FROM pg_catalog.pg_extension e
                                    WHERE e.extname OPERATOR(pg_catalog.=) 'vector'::pg_catalog.name) END)))";

/// The watch of `relid`, if it is watched. Read as the extension owner: the catalog is visible
/// to each role only for its own tables, and the sync trigger runs as whoever writes the table.
pub fn load(relid: pg_sys::Oid) -> Option<Watched> {
    read(
        &format!("{WATCHED_SQL} WHERE w.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1"),
        vec![relid.into()],
    )
    .into_iter()
    .next()
}

/// Every watched table, highest priority first.
pub fn load_all() -> Vec<Watched> {
    read(
        &format!("{WATCHED_SQL} ORDER BY w.priority DESC, w.relid::pg_catalog.oid"),
        vec![],
    )
}

/// The watch of `relid`; 42704 (with `hint`) when the table is not watched.
pub fn load_or_raise(relid: pg_sys::Oid, hint: &str) -> Watched {
    load(relid).unwrap_or_else(|| {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!(
                "relation with OID {} is not watched by doppler",
                relid.to_u32()
            ),
            hint,
        )
    })
}

fn read(sql: &str, args: Vec<pgrx::datum::DatumWithOid>) -> Vec<Watched> {
    let sql = sql.replacen("(MISFIT)", &format!("({MISFIT_SQL})"), 1);
    as_catalog(extension_owner(), || {
        Spi::connect(|client| {
            let rows = client.select(&sql, None, &args)?;
            let mut out = Vec::new();
            for r in rows {
                let name: String = r.get(2)?.unwrap_or_default();
                out.push(Watched {
                    relid: r.get(1)?.unwrap_or(pg_sys::InvalidOid),
                    owner: r.get(3)?.unwrap_or(pg_sys::InvalidOid),
                    source_column: r.get(4)?.unwrap_or_default(),
                    source_kind: closed(SourceKind::parse, r.get(5)?, "source_kind", &name),
                    vector_column: r.get(6)?.unwrap_or_default(),
                    vector_kind: closed(VectorKind::parse, r.get(7)?, "vector_kind", &name),
                    vector_type: r.get(8)?.unwrap_or_else(|| "real[]".into()),
                    vector_schema: r.get(9)?.unwrap_or_else(|| "pg_catalog".into()),
                    key_columns: r.get::<Vec<String>>(10)?.unwrap_or_default(),
                    batch_size: r.get(11)?.unwrap_or(32),
                    key_type: r.get(12)?,
                    mode: closed(Mode::parse, r.get(13)?, "mode", &name),
                    on_error: closed(OnError::parse, r.get(14)?, "on_error", &name),
                    hash_column: r.get(15)?,
                    dedup: r.get(16)?.unwrap_or(false),
                    model: r.get(17)?.unwrap_or_default(),
                    model_column: r.get(18)?.unwrap_or_default(),
                    stale_scan: r.get(19)?,
                    misfit: r.get(20)?,
                    overruns: r.get(21)?.unwrap_or(0),
                    backed_off: r.get(22)?.unwrap_or(false),
                    workers: closed(Workers::parse, r.get(23)?, "workers", &name),
                    pdq_column: r.get(24)?,
                    pdq_quality_column: r.get(25)?,
                    name,
                });
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .or_raise(|| "could not read doppler.watched".into())
    })
}

/// The value of a closed set's word in `column` of a row of doppler.watched; its CHECK
/// constraints allow no other words, so another is a damaged catalog (XX001).
fn closed<T>(parse: fn(&str) -> Option<T>, word: Option<String>, column: &str, table: &str) -> T {
    let word = word.unwrap_or_default();
    parse(&word).unwrap_or_else(|| {
        raise(
            Code::ERRCODE_DATA_CORRUPTED,
            format!("doppler.watched has {column} \"{word}\" for {table}"),
            "doppler.watched's CHECK constraints allow no such value: was it altered?",
        )
    })
}

/// Whether [`lock`] waits for a table someone else holds locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The background worker: a table someone holds locked is skipped this pass.
    Skip,
    /// `fill`, the sync trigger: wait like any statement (lock_timeout applies).
    Wait,
}

/// The watch of `relid` as it is now, with the table locked in `mode` for this transaction, so
/// that its name and owner hold until commit: DROP, RENAME and ALTER ... OWNER wait for the lock.
/// None: not watched, or (with [`Wait::Skip`]) locked by someone else. Raises when a partition or
/// child table has another owner: doppler would run that owner's triggers with the parent
/// owner's rights.
pub fn lock(relid: pg_sys::Oid, mode: pg_sys::LOCKMODE, wait: Wait) -> Option<Watched> {
    // SAFETY: locking an oid that may not exist (any more) is harmless.
    match wait {
        Wait::Skip => {
            if !unsafe { pg_sys::ConditionalLockRelationOid(relid, mode) } {
                return None;
            }
        }
        Wait::Wait => unsafe { pg_sys::LockRelationOid(relid, mode) },
    }
    let w = load(relid)?;
    if let Some(child) = foreign_child(relid, w.owner) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{child}, a partition or child table of {}, has another owner", w.name),
            "doppler works on a table as its owner only: give the partitions the parent's owner, or watch each one.",
        );
    }
    if let Some(misfit) = &w.misfit {
        let why = format!("column {misfit}, not a type doppler fills");
        match wait {
            // (a watch from before type changes were followed: the worker ends it)
            Wait::Skip => {
                end(&w, &why);
                return None;
            }
            Wait::Wait => raise(
                Code::ERRCODE_DATATYPE_MISMATCH,
                format!("doppler cannot fill {}: its {why}", w.name),
                "Watch the table again (doppler.watch) with columns of the types it fills, or doppler.unwatch it.",
            ),
        }
    }
    Some(w)
}

/// Ends the watch of `w`, with a WARNING saying why: its rows of doppler's catalog go (as the
/// extension owner), as when the table loses a column doppler uses. The table's triggers stay,
/// and do nothing without a watch, until `watch` or `unwatch`.
pub fn end(w: &Watched, why: &str) {
    warn(
        Code::ERRCODE_WARNING,
        format!("doppler no longer watches {}: its {why}", w.name),
        "Call doppler.watch() again with columns of the types it fills, or doppler.unwatch() to remove its triggers.",
    );
    as_catalog(extension_owner(), || {
        for table in ["watched", "failures", "batches"] {
            Spi::run_with_args(
                &format!(
                    "DELETE FROM doppler.{table}
                     WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1"
                ),
                &[w.relid.into()],
            )
            .or_raise(|| format!("could not end the watch of {}", w.name));
        }
    });
}

/// ROW EXCLUSIVE: the lock of a batch, which updates the table.
pub const FOR_WRITING: pg_sys::LOCKMODE = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
/// ROW SHARE, as `SELECT ... FOR UPDATE` takes: fill's wait, which only reads and row-locks, so
/// that it does not hold CREATE INDEX or CREATE TRIGGER back while it waits.
pub const FOR_ROW_LOCKS: pg_sys::LOCKMODE = pg_sys::RowShareLock as pg_sys::LOCKMODE;

/// Locks a table the caller may read (ACCESS SHARE, until the transaction ends), so that it is not
/// dropped or altered under the statements doppler runs by its name; each of those checks first
/// that the name still means this table ([`Watched::check_name`]). Only after the privilege
/// checks: a role must not be able to hold locks on tables it may not read.
pub fn lock_for_reading(relid: pg_sys::Oid) {
    // SAFETY: a lock on an oid that may not exist (any more) is harmless.
    unsafe { pg_sys::LockRelationOid(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
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
    .or_raise(|| format!("could not read the partitions of relation {}", relid.to_u32()))
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
            raise(
                Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{} no longer names relation {} (renamed during the batch)",
                    self.name,
                    self.relid.to_u32()
                ),
                "The batch is rolled back; the next one reads the table's name afresh.",
            );
        }
    }

    /// The registered model of this table.
    pub fn spec(&self) -> session::ModelSpec {
        session::spec(Some(&self.model))
    }
}
