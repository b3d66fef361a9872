//! `doppler.extract_features(path text, model text)` and `doppler.extract_features(image bytea,
//! model text)`; `model` names an entry of doppler.models (NULL: `doppler.default_model`).
//!
//! Labels, and why:
//! * path form: VOLATILE, since it reads a file that can change between (and during) statements,
//!   like `pg_read_file`. Bytea form: STABLE, since the result depends on settings
//!   (`doppler.model_path`) and on the model file, not only on the argument; not IMMUTABLE, so it
//!   must not be used in an index expression.
//! * Not STRICT (a NULL model means the default model), but a NULL image gives NULL.
//! * PARALLEL SAFE: no writes, no backend-shared state; each parallel worker builds its own session
//!   (with `doppler.intra_op_threads` threads), which lets a parallel scan extract on several cores.
//! * COST 10000 (set in sql/finalize.sql): a model run costs far more than an ordinary function,
//!   so the planner evaluates it as few times as it can.
//!
//! Reading server files is a privilege: only superusers and members of `pg_read_server_files` may
//! call the path form (the rule `COPY ... FROM 'file'` follows). Relative paths are refused.

use doppler_core::{fetch, source, Error, ErrorKind};
use pgrx::prelude::*;

use crate::errors::{raise, OrRaise};
use crate::session;

#[pg_extern(name = "extract_features", volatile, parallel_safe)]
fn extract_features_path(
    path: Option<&str>,
    model: default!(Option<&str>, "NULL"),
) -> Option<Vec<f32>> {
    let path = path?;
    let spec = session::spec(model);
    let (bytes, what) = load_text_source(path);
    Some(features_of(&spec, &bytes, &what))
}

/// A text source: a server path (superusers and pg_read_server_files members, inside
/// doppler.file_roots) or an http(s) URL (doppler.allow_urls, superusers and doppler_url_reader
/// members, under the URL policy). Returns the bytes and how messages name the source.
pub fn load_text_source(s: &str) -> (Vec<u8>, String) {
    let what = if fetch::is_url(s) {
        check_fetch_urls(s);
        format!("image URL \"{s}\"")
    } else {
        check_read_server_files(s);
        source::describe_path(s)
    };
    let bytes = source::load(s, &crate::gucs::source_policy()).or_raise();
    (bytes, what)
}

/// Whether `role` may fetch URLs: a superuser or a member of doppler_url_reader.
pub fn may_fetch_urls(role: pg_sys::Oid) -> bool {
    unsafe {
        if pg_sys::superuser_arg(role) {
            return true;
        }
        let reader = pg_sys::get_role_oid(c"doppler_url_reader".as_ptr(), true);
        reader != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, reader)
    }
}

fn check_fetch_urls(url: &str) {
    if (url.starts_with("http://") || url.starts_with("https://"))
        && !may_fetch_urls(unsafe { pg_sys::GetUserId() })
    {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to fetch image URL \"{url}\""),
            "Only superusers and members of doppler_url_reader may fetch URLs."
        );
    }
}

#[pg_extern(name = "extract_features", stable, parallel_safe)]
fn extract_features_bytea(
    image: Option<&[u8]>,
    model: default!(Option<&str>, "NULL"),
) -> Option<Vec<f32>> {
    let image = image?;
    let spec = session::spec(model);
    check_size(image);
    Some(features_of(
        &spec,
        image,
        &source::describe_bytes(image.len()),
    ))
}

/// doppler.max_image_bytes, for values already in the database.
pub fn check_size(image: &[u8]) {
    let max = crate::gucs::max_image_bytes();
    if image.len() as u64 > max {
        raise(
            Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{} is over the limit of {max} bytes",
                    source::describe_bytes(image.len())
                ),
            )
            .with_hint("Raise doppler.max_image_bytes to accept larger images."),
        );
    }
}

/// Describes this backend's model sessions (most recently used first; one row of NULLs when
/// there is none) and how many sessions it has created. Loads nothing.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)] // pgrx's name!() tuple is the SQL row type
fn session_info() -> TableIterator<
    'static,
    (
        name!(model, Option<String>),
        name!(model_path, Option<String>),
        name!(execution_provider, Option<String>),
        name!(input_size, Option<i32>),
        name!(dimensions, Option<i32>),
        name!(intra_op_threads, Option<i32>),
        name!(sessions_created, i64),
    ),
> {
    let created = session::sessions_created();
    let mut rows: Vec<_> = session::current()
        .into_iter()
        .map(|s| {
            (
                Some(s.model),
                Some(s.model_path),
                Some(s.provider.to_string()),
                Some(s.input_size),
                Some(s.dim),
                Some(s.threads),
                created,
            )
        })
        .collect();
    if rows.is_empty() {
        rows.push((None, None, None, None, None, None, created));
    }
    TableIterator::new(rows)
}

pub fn features_of(spec: &session::ModelSpec, bytes: &[u8], what: &str) -> Vec<f32> {
    session::with_model(spec, |model, pre| {
        let mut slot = vec![0f32; pre.slot_len()];
        doppler_core::prepare(bytes, what, &crate::gucs::limits(), pre, &mut slot).or_raise();
        model.run(&slot, 1).or_raise()
    })
}

/// Loads the registered model `name` in this backend, checking its file, input and output
/// against doppler.models; returns its tag (name@version). Used by `doppler.register_model`.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _check_model(name: &str) -> String {
    let spec = session::spec(Some(name));
    // load it afresh, even if this backend has a session of the same file
    session::forget(&spec);
    session::with_model(&spec, |_, _| ());
    spec.tag()
}

/// Superusers and members of pg_read_server_files only.
pub fn check_read_server_files(path: &str) {
    // SAFETY: plain catalog lookups on the current user, in a transaction.
    let allowed = unsafe {
        pg_sys::superuser()
            || pg_sys::has_privs_of_role(
                pg_sys::GetUserId(),
                pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES),
            )
    };
    if !allowed {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to read image file \"{path}\""),
            "Only superusers and roles with privileges of pg_read_server_files may read server files; others can pass the image as bytea."
        );
    }
}
