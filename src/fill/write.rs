//! The write phase of a batch: each claimed row's vector, hash and model tag written back by
//! ctid, in the claiming transaction, as the table owner.

use doppler_core::pdq;
use pgrx::prelude::*;

use super::failures::{Class, Failure};
use super::{Claimed, Outcome};
use crate::errors::{in_subtransaction, unpack_sqlstate, SpiOrRaise};
use crate::watched::{Watched, HELD};

/// Writes the outcomes of the rows that have one (a vector or hash, or a held mark). With
/// `isolate`, a row that cannot be written (a CHECK, a trigger, a too-narrow hash column, a NaN
/// into pgvector) does not take the batch down: the batch is written in one subtransaction, and
/// when that fails, row by row, each in its own; the rows that fail are returned with their
/// error. Without, the first error is raised (the sync trigger with on_error => raise: the
/// writing statement fails).
pub fn write(
    w: &Watched,
    tag: &str,
    claimed: &[Claimed],
    outcomes: &[Outcome],
    held: &[bool],
    isolate: bool,
) -> Vec<Failure> {
    let written = |i: usize| {
        let o = &outcomes[i];
        o.vector.is_some() || o.hash.is_some() || o.pdq.is_some()
    };
    let rows: Vec<usize> = (0..claimed.len())
        .filter(|&i| written(i) || held[i])
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let statement = Update {
        w,
        tag,
        claimed,
        outcomes,
        held,
    };
    if !isolate {
        statement.rows(&rows);
        return Vec::new();
    }
    if in_subtransaction(|| statement.rows(&rows)).is_ok() {
        return Vec::new();
    }
    rows.into_iter()
        .filter_map(|i| {
            let err = in_subtransaction(|| statement.rows(&[i])).err();
            // (a row that only failed to be marked held keeps its own failure, and stays in the
            // pending index, where its record holds it back)
            err.filter(|_| written(i)).map(|(code, msg)| Failure {
                row: i,
                class: Class::Write,
                sqlstate: unpack_sqlstate(code as i32),
                message: format!("could not write the row's features into {}: {msg}", w.name),
                retry_at: None,
            })
        })
        .collect()
}

/// The UPDATE of a batch's rows.
struct Update<'a> {
    w: &'a Watched,
    tag: &'a str,
    claimed: &'a [Claimed],
    outcomes: &'a [Outcome],
    held: &'a [bool],
}

impl Update<'_> {
    /// The statement: the vector where one was made (`$1`), the model tag (this model's where a
    /// vector is written, [`HELD`] where the row failed or was skipped: `$4`), the hash where
    /// the row had none (`$5`), the PDQ hash (`$6`, 64 hex digits) and its quality (`$7`) where
    /// the row had none, by ctid (`$2`) and tableoid (`$3`).
    fn sql(&self) -> String {
        let w = self.w;
        let mut hash_set = match &w.hash_column {
            Some(h) => {
                let h = pgrx::spi::quote_identifier(h);
                format!(", {h} = coalesce({h}, $5)")
            }
            None => String::new(),
        };
        if let Some(p) = &w.pdq_column {
            let p = pgrx::spi::quote_identifier(p);
            hash_set.push_str(&format!(
                ", {p} = coalesce({p}, ('x' OPERATOR(pg_catalog.||) $6)::pg_catalog.bit(256))"
            ));
            if let Some(q) = &w.pdq_quality_column {
                let q = pgrx::spi::quote_identifier(q);
                hash_set.push_str(&format!(", {q} = coalesce({q}, $7)"));
            }
        }
        format!(
            "UPDATE {table} SET {vec} = coalesce({param}, {vec}),
                    {mc} = CASE WHEN $1 IS NOT NULL THEN {tag} WHEN $4 THEN {held}::pg_catalog.text ELSE {mc} END{hash_set}
             WHERE ctid OPERATOR(pg_catalog.=) $2::pg_catalog.tid AND tableoid OPERATOR(pg_catalog.=) $3",
            table = w.name,
            vec = pgrx::spi::quote_identifier(&w.vector_column),
            mc = pgrx::spi::quote_identifier(&w.model_column),
            param = w.vector_param(1),
            tag = pgrx::spi::quote_literal(self.tag),
            held = pgrx::spi::quote_literal(HELD),
        )
    }

    /// Writes these rows (indexes into the claimed rows), one prepared statement.
    fn rows(&self, rows: &[usize]) {
        let w = self.w;
        let mut types = vec![
            pgrx::PgOid::from(pg_sys::FLOAT4ARRAYOID),
            pgrx::PgOid::from(pg_sys::TEXTOID),
            pgrx::PgOid::from(pg_sys::OIDOID),
            pgrx::PgOid::from(pg_sys::BOOLOID),
        ];
        // ($5 .. $7 always: a statement may leave a parameter unused, not untyped)
        types.push(pgrx::PgOid::from(pg_sys::TEXTOID));
        types.push(pgrx::PgOid::from(pg_sys::TEXTOID));
        types.push(pgrx::PgOid::from(pg_sys::INT4OID));
        let sql = self.sql();
        w.check_name();
        Spi::connect_mut(|client| {
            let stmt = client.prepare_mut(&sql, &types)?;
            for &i in rows {
                let (c, o) = (&self.claimed[i], &self.outcomes[i]);
                let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
                    o.vector.clone().into(),
                    c.ctid.as_str().into(),
                    c.tableoid.into(),
                    self.held[i].into(),
                ];
                args.push(o.hash.clone().into());
                args.push(o.pdq.map(|p| pdq::to_hex(&p.hash)).into());
                args.push(o.pdq.map(|p| p.quality as i32).into());
                w.check_name(); // (a plan invalidated by a rename would look the name up again)
                client.update(&stmt, None, &args)?;
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .or_raise(|| format!("could not write vectors into {}", w.name));
    }
}
