//! Row counts for `doppler.status`: counted as the table's owner (never as a definer, nor as
//! the superuser who happens to read the view), and only for callers who own the table or may
//! SELECT it. A table whose count fails (its owner's policy raises, say) shows NULL counts and a
//! WARNING: it cannot take the view down for everyone. A full scan: the status view is for
//! people, not hot paths.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::errors::in_subtransaction;
use crate::privileged::{acts_as, as_owner, current_user};
use crate::worker::batch;

#[pg_extern(stable, strict, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn _counts(
    relid: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(total, Option<i64>),
        name!(done, Option<i64>),
        name!(skipped, Option<i64>),
        name!(stale, Option<i64>),
        name!(model, String),
    ),
> {
    let Some(w) = batch::load_watched(Some(relid)).into_iter().next() else {
        return TableIterator::new(Vec::new());
    };
    let visible = acts_as(current_user(), w.owner)
        || Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.has_table_privilege($1::pg_catalog.oid, 'SELECT')",
            &[relid.into()],
        )
        .ok()
        .flatten()
            == Some(true);
    if !visible {
        return TableIterator::new(Vec::new());
    }
    let tag = w.spec().tag();
    let (vec, src) = (
        quote_identifier(&w.vector_column),
        quote_identifier(&w.source_column),
    );
    let current = w.current_vector_over("t", "$1");
    let stale = format!(
        "t.{vec} IS NOT NULL AND t.{mc} OPERATOR(pg_catalog.<>) $1",
        mc = quote_identifier(&w.model_column)
    );
    let sql = format!(
        "SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE {current}),
                pg_catalog.count(*) FILTER (WHERE t.{vec} IS NULL AND t.{src} IS NULL),
                pg_catalog.count(*) FILTER (WHERE {stale})
         FROM {table} t",
        table = w.name
    );
    let counted = in_subtransaction(|| {
        as_owner(w.owner, || {
            Spi::connect(|c| {
                let row = c.select(&sql, Some(1), &[tag.as_str().into()])?.first();
                Ok::<_, pgrx::spi::Error>([
                    row.get::<i64>(1)?,
                    row.get::<i64>(2)?,
                    row.get::<i64>(3)?,
                    row.get::<i64>(4)?,
                ])
            })
        })
        .unwrap_or_else(|e| pgrx::error!("{e}"))
    });
    let [total, done, skipped, stale] = counted.unwrap_or_else(|(_, msg)| {
        warning!("doppler: could not count the rows of {}: {msg}", w.name);
        [None; 4]
    });
    TableIterator::once((total, done, skipped, stale, tag))
}
