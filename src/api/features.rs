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

/// Describes the model sessions that serve this connection, most recently used first (one row
/// of NULLs when there is none), how many sessions were created, and where model runs happen:
/// `inference` is `service` (the server's inference service holds the sessions: its sessions
/// and count are shown) or `backend` (this connection's own). Loads nothing.
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
        name!(inference, String),
    ),
> {
    let inference = crate::service::inference();
    let mode = inference.as_str().to_string();
    let (sessions, created) = if inference == crate::service::Inference::Service {
        let (list, created) = crate::service::sessions();
        // The service serves every database: others see only the sessions of this database's
        // models, under this database's names (superusers see them all).
        let mine = this_databases_models();
        let superuser = unsafe { pg_sys::superuser() };
        let list = list
            .into_iter()
            .filter_map(|mut s| {
                match mine.iter().find(|(_, path)| *path == s.model_path) {
                    Some((name, _)) => s.model.clone_from(name),
                    None if superuser => {}
                    None => return None,
                }
                Some(s)
            })
            .collect();
        (list, created)
    } else {
        (session::current(), session::sessions_created())
    };
    let mut rows: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            (
                Some(s.model),
                Some(s.model_path),
                Some(s.provider),
                Some(s.input_size),
                Some(s.dim),
                Some(s.threads),
                created,
                mode.clone(),
            )
        })
        .collect();
    if rows.is_empty() {
        rows.push((None, None, None, None, None, None, created, mode));
    }
    TableIterator::new(rows)
}

/// (name, resolved file) of each doppler.models entry of this database.
fn this_databases_models() -> Vec<(String, String)> {
    Spi::connect(|client| {
        let rows = client.select("SELECT name, onnx_path FROM doppler.models", None, &[])?;
        let mut out = Vec::new();
        for r in rows {
            let name = r.get::<String>(1)?.unwrap_or_default();
            let path = r
                .get::<String>(2)?
                .map(|p| crate::dirs::expand(&p))
                .unwrap_or_else(crate::gucs::model_path);
            out.push((name, path));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_default()
}

/// The inference service: its process, when it started, how often the postmaster started it,
/// what it has served (requests, images, model runs, the largest run, requests answered with an
/// error), and the requests queued and running now. No row when doppler is not in
/// shared_preload_libraries.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn service_status() -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(starts, i64),
        name!(requests, i64),
        name!(images, i64),
        name!(runs, i64),
        name!(largest_run, i64),
        name!(failed, i64),
        name!(queued, i64),
        name!(running, i64),
    ),
> {
    let rows = crate::service::status()
        .map(|s| {
            (
                s.pid,
                s.started_at
                    .and_then(|t| pgrx::datum::TimestampWithTimeZone::try_from(t).ok()),
                s.starts,
                s.requests,
                s.images,
                s.runs,
                s.largest_run,
                s.failed,
                s.queued,
                s.running,
            )
        })
        .into_iter()
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

pub fn features_of(spec: &session::ModelSpec, bytes: &[u8], what: &str) -> Vec<f32> {
    session::with_model(spec, |runner, pre| {
        let mut slot = vec![0f32; pre.slot_len()];
        doppler_core::prepare(bytes, what, &crate::gucs::limits(), pre, &mut slot).or_raise();
        runner.run(&slot, 1).or_raise()
    })
}

/// Loads the registered model `name` (in the inference service, or in this backend), checking its file, input and output
/// against doppler.models; returns its tag (name@version). Used by `doppler.register_model`.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _check_model(name: &str) -> String {
    let spec = session::spec(Some(name));
    // load it afresh, even if this backend has a session of the same file (the service keeps a
    // session only while the file is unchanged, and checks the registered dim on every request)
    session::forget(&spec);
    session::with_model(&spec, |runner, _| runner.check());
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
