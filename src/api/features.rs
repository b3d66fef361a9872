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

use doppler_core::source;
use pgrx::prelude::*;

use crate::{service, session, sources};

#[pg_extern(name = "extract_features", volatile, parallel_safe)]
fn extract_features_path(
    path: Option<&str>,
    model: default!(Option<&str>, "NULL"),
) -> Option<Vec<f32>> {
    let path = path?;
    let spec = session::spec(model);
    let (bytes, what) = sources::load_text(path);
    Some(session::features_of(&spec, &bytes, &what))
}

#[pg_extern(name = "extract_features", stable, parallel_safe)]
fn extract_features_bytea(
    image: Option<&[u8]>,
    model: default!(Option<&str>, "NULL"),
) -> Option<Vec<f32>> {
    let image = image?;
    let spec = session::spec(model);
    sources::check_size(image);
    Some(session::features_of(
        &spec,
        image,
        &source::describe_bytes(image.len()),
    ))
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
    let inference = service::inference();
    let mode = inference.as_str().to_string();
    let (sessions, created) = match inference {
        service::Inference::Service => service::visible_sessions(),
        service::Inference::Backend => (session::current(), session::sessions_created()),
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
    let rows = service::status()
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
