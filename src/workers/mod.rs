//! External workers (`doppler-worker` on other hosts; README: More than one machine): who may be
//! one, their registry (doppler.external_workers, shown by the doppler.workers view), the
//! settings they work under, which table a claim takes, and the backlog an autoscaler reads.
//! The batches themselves go through the fill engine (`fill::remote`); [`guard`] keeps one
//! owner's code from stalling them for everyone.
//!
//! Rights: a worker's role is a member of `doppler_worker` and needs no privilege on any user
//! table. It may claim and write only for tables whose owner allowed external workers
//! (`watch(..., workers => 'external' | 'any')`), only the rows its transaction holds, and only
//! under a worker id its own role registered. Everything it makes doppler do runs as the table's
//! owner (`as_owner`) or as the extension owner over doppler's catalog (`as_catalog`), as for
//! the server's own worker.

pub mod guard;

use std::cell::Cell;
use std::time::{Duration, Instant};

use doppler_core::digest;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::json;

use crate::errors::{in_subtransaction_kept, raise, warn, Code, SpiOrRaise};
use crate::fill::remote;
use crate::gucs;
use crate::privileged::{as_catalog, current_user, extension_owner};
use crate::session::ModelSpec;
use crate::watched::installed::Installed;
use crate::watched::{self, Wait, Watched};

/// Registers the shared memory of the external workers' markers ([`guard`]). Only during
/// shared_preload_libraries.
pub fn register_shmem() {
    // SAFETY: a flag the postmaster sets while it loads the preloaded libraries
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guard::register();
    }
}

/// How often a worker is asked to report (seconds); the view calls a worker alive for three.
pub const HEARTBEAT_S: i64 = 10;

/// Raises 42501 unless the current user may act as an external worker (a member of
/// doppler_worker, or a superuser), and 0A000 when this database's doppler SQL predates them.
pub fn check_member() {
    if !Installed::get().is_some_and(Installed::has_workers) {
        raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            "external workers need doppler 0.10.0's SQL objects in this database",
            "Run ALTER EXTENSION doppler UPDATE.",
        );
    }
    let member = Spi::get_one::<bool>(
        "SELECT pg_catalog.pg_has_role(pg_catalog.current_user(), r.oid, 'MEMBER')
         FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'doppler_worker'",
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !member {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only members of doppler_worker may act as external doppler workers",
            "GRANT doppler_worker TO the worker's login role.",
        );
    }
}

/// Raises unless `worker` is registered by the current user's role (42704 when it is not
/// registered at all: unregistered or pruned, the worker registers again).
pub fn check_worker(worker: i64) {
    check_member();
    let role = as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT (SELECT role FROM doppler.external_workers WHERE id OPERATOR(pg_catalog.=) $1)",
            &[worker.into()],
        )
        .or_raise(|| "could not read doppler.external_workers".into())
    });
    let Some(role) = role else {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("worker {worker} is not registered"),
            "Register with doppler.worker_register() (a worker whose heartbeat stopped for a day is forgotten).",
        )
    };
    // SAFETY: a catalog lookup, in a transaction
    if role != current_user() && !unsafe { pg_sys::superuser() } {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("worker {worker} was registered by another role"),
            "",
        );
    }
}

/// Registers a worker process; returns its id and the settings it works under. Forgets workers
/// whose heartbeat stopped a day ago, and records the SHA-256 of the models of the tables
/// external workers fill that have none yet (their files on this server).
pub fn register(host: &str, pid: i32, provider: &str, version: &str) -> (i64, JsonB) {
    check_member();
    let clip = |s: &str| {
        s.chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>()
    };
    let role = current_user();
    let id = as_catalog(extension_owner(), || {
        Spi::run(
            "DELETE FROM doppler.external_workers
             WHERE heartbeat_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::pg_catalog.interval)",
        )
        .or_raise(|| "could not prune doppler.external_workers".into());
        Spi::get_one_with_args::<i64>(
            "INSERT INTO doppler.external_workers (role, host, pid, provider, version, backend_pid)
             VALUES ($1, $2, $3, $4, $5, pg_catalog.pg_backend_pid()) RETURNING id",
            &[
                role.into(),
                clip(host).into(),
                pid.into(),
                clip(provider).into(),
                clip(version).into(),
            ],
        )
        .or_raise(|| "could not register the worker".into())
    })
    .unwrap_or_default();
    for w in external_tables(&[]) {
        record_sha256(&w.spec());
    }
    (id, JsonB(settings()))
}

/// The server's settings a worker applies itself: the image limits and the URL policy.
fn settings() -> serde_json::Value {
    let policy = gucs::source_policy();
    let limits = gucs::limits();
    let url = policy.urls.as_ref().map(|u| {
        json!({
            "allowed_hosts": u.allowed_hosts,
            "allowed_networks": u.allowed_networks.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "connect_timeout_ms": u.connect_timeout.as_millis() as u64,
            "timeout_ms": u.timeout.as_millis() as u64,
            "max_redirects": u.max_redirects,
            "user_agent": u.user_agent,
            "max_in_flight": u.limits.max_in_flight,
            "max_per_host": u.limits.max_per_host,
            "host_rate": u.limits.host_rate,
            "prefetch_bytes": u.limits.prefetch_bytes,
        })
    });
    json!({
        "max_image_bytes": policy.max_bytes,
        "file_roots": policy.file_roots,
        "allow_urls": url.is_some(),
        "url": url,
        "limits": {
            "max_pixels": limits.max_pixels,
            "max_dimension": limits.max_dimension,
            "jpeg_draft_size": limits.jpeg_draft_size,
        },
        "heartbeat_s": HEARTBEAT_S,
        "lease_s": gucs::WORKER_LEASE.get() / 1000,
    })
}

/// What a worker reports between batches: what it holds now, its totals and rate, its last error.
pub fn heartbeat(worker: i64, state: &serde_json::Value) {
    check_worker(worker);
    let text = |k: &str| {
        state.get(k).and_then(|v| v.as_str()).map(|s| {
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(2000)
                .collect::<String>()
        })
    };
    let int = |k: &str| state.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    // the table it holds rows of, by name: only one external workers may fill (else nothing)
    // (looked up as the extension owner: the worker's role need not see the table's schema)
    let holding = text("holding_table")
        .and_then(|t| {
            as_catalog(extension_owner(), || {
                Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
                    &[t.into()],
                )
            })
            .ok()
            .flatten()
        })
        .filter(|&relid| watched::load(relid).is_some_and(|w| w.workers.external()));
    let rate = state
        .get("rate")
        .and_then(|v| v.as_f64())
        .filter(|r| r.is_finite());
    as_catalog(extension_owner(), || {
        Spi::run_with_args(
            "UPDATE doppler.external_workers
                SET heartbeat_at = pg_catalog.now(),
                    holding = $2::pg_catalog.oid::pg_catalog.regclass,
                    holding_rows = CASE WHEN $2 IS NULL THEN 0 ELSE GREATEST($3, 0) END,
                    holding_since = CASE WHEN $2 IS NULL THEN NULL
                                         WHEN holding IS NOT DISTINCT FROM $2::pg_catalog.oid::pg_catalog.regclass
                                              AND holding_since IS NOT NULL THEN holding_since
                                         ELSE pg_catalog.now() END,
                    rows_done = GREATEST($4, 0), rows_failed = GREATEST($5, 0),
                    rate = $6::pg_catalog.float4,
                    last_error_at = CASE WHEN $7 IS DISTINCT FROM last_error AND $7 IS NOT NULL
                                         THEN pg_catalog.now() ELSE last_error_at END,
                    last_error = coalesce($7, last_error),
                    backend_pid = pg_catalog.pg_backend_pid()
              WHERE id OPERATOR(pg_catalog.=) $1",
            &[
                worker.into(),
                holding.into(),
                (int("holding_rows").min(i32::MAX as i64) as i32).into(),
                int("rows_done").into(),
                int("rows_failed").into(),
                rate.into(),
                text("last_error").into(),
            ],
        )
        .or_raise(|| "could not record the worker's heartbeat".into())
    });
}

/// Forgets a worker that stops cleanly.
pub fn unregister(worker: i64) {
    check_worker(worker);
    as_catalog(extension_owner(), || {
        Spi::run_with_args(
            "DELETE FROM doppler.external_workers WHERE id OPERATOR(pg_catalog.=) $1",
            &[worker.into()],
        )
        .or_raise(|| "could not unregister the worker".into())
    });
}

/// Whether worker `worker` computes PDQ hashes: doppler-worker 0.11.0 and later do; an older
/// one is not handed the rows of tables with a PDQ column (its answers would lack them).
fn computes_pdq(worker: i64) -> bool {
    let version = as_catalog(extension_owner(), || {
        Spi::get_one_with_args::<String>(
            "SELECT (SELECT version FROM doppler.external_workers WHERE id OPERATOR(pg_catalog.=) $1)",
            &[worker.into()],
        )
        .or_raise(|| "could not read doppler.external_workers".into())
    });
    version.is_some_and(|v| Installed::parse(&v) >= Installed::parse("0.11.0"))
}

/// The watched tables external workers may fill, highest priority first, less `skip` (tables a
/// worker cannot serve now, its model file differing, say).
pub fn external_tables(skip: &[pg_sys::Oid]) -> Vec<Watched> {
    watched::load_all()
        .into_iter()
        .filter(|w| w.workers.external() && w.misfit.is_none() && !skip.contains(&w.relid))
        .collect()
}

thread_local! {
    /// Where this backend's next claim starts in the list of tables: claims go round them.
    static NEXT: Cell<usize> = const { Cell::new(0) };
    /// Tables whose claim failed in this backend (an owner's policy or trigger raised, a
    /// statement timeout), passed over until then: one table's trouble must not stall the worker
    /// for every other owner's tables.
    static COOLDOWN: std::cell::RefCell<Vec<(pg_sys::Oid, Instant)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How long this backend passes over a table whose claim failed.
const COOLDOWN_AFTER_ERROR: Duration = Duration::from_secs(60);

/// A claimed row, as doppler.worker_claim returns it: its number, the table, the model (jsonb),
/// and its source (path or URL) or image bytes.
pub type ClaimRow = (i32, String, JsonB, Option<String>, Option<Vec<u8>>);

/// A batch of one table for worker `worker`, in this transaction (25P01 outside a transaction
/// block: the rows would be free again as the statement ends): the tables external workers may
/// fill, taken in turns from where this backend's last claim left off. Passed over: a table
/// someone holds locked, one whose model has no recorded SHA-256, and for a minute one whose
/// claim failed (each table is claimed in a subtransaction; its error becomes a WARNING).
pub fn claim(worker: i64, max_rows: i32, skip: &[pg_sys::Oid]) -> Vec<ClaimRow> {
    check_worker(worker);
    release_advisory_locks();
    // SAFETY: reads the transaction state
    if !unsafe { pg_sys::IsTransactionBlock() } {
        raise(
            Code::ERRCODE_NO_ACTIVE_SQL_TRANSACTION,
            "doppler.worker_claim must run in a transaction block",
            "BEGIN; claim; compute; doppler.worker_write(); COMMIT: the rows stay locked until the transaction ends.",
        );
    }
    check_top_level("doppler.worker_claim");
    remote::check_none_held();
    lease();
    let now = Instant::now();
    let cooling: Vec<pg_sys::Oid> = COOLDOWN.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(_, until)| *until > now);
        c.iter().map(|(relid, _)| *relid).collect()
    });
    let skip: Vec<pg_sys::Oid> = skip.iter().chain(&cooling).copied().collect();
    let pdq = computes_pdq(worker);
    let tables: Vec<Watched> = external_tables(&skip)
        .into_iter()
        .filter(|w| pdq || w.pdq_column.is_none())
        .collect();
    let start = NEXT.with(|n| n.get());
    let mut rows = Vec::new();
    for k in 0..tables.len() {
        let listed = &tables[(start + k) % tables.len()];
        // (the next claim starts after this table, whatever happens to it)
        NEXT.with(|n| n.set(start.wrapping_add(k + 1)));
        if guard::passed_over(listed.relid) {
            continue;
        }
        // (a table without rows leaves no lock behind: its subtransaction is rolled back)
        let tried = in_subtransaction_kept(|| {
            let batch = guard::run(listed.relid, || claim_table(listed, worker, max_rows));
            let found = batch.is_some();
            (batch, found)
        });
        match tried {
            // (an empty batch: its rows were refused and recorded, the subtransaction kept)
            Ok(None) => continue,
            Ok(Some(batch)) if batch.is_empty() => continue,
            Ok(Some(batch)) => {
                rows = batch;
                break;
            }
            Err((code, message)) => {
                warn(
                    code,
                    format!(
                        "doppler could not claim rows of {} for worker {worker}: {message}",
                        listed.name
                    ),
                    "This connection passes the table over for a minute.",
                );
                COOLDOWN.with(|c| {
                    c.borrow_mut()
                        .push((listed.relid, Instant::now() + COOLDOWN_AFTER_ERROR))
                });
            }
        }
    }
    release_advisory_locks();
    rows
}

/// Raises 25000 inside a subtransaction (a savepoint): the rows a claim locks there would be
/// released by its rollback while doppler still took them for held.
pub fn check_top_level(what: &str) {
    // SAFETY: reads the transaction state
    if unsafe { pg_sys::GetCurrentTransactionNestLevel() } > 1 {
        raise(
            Code::ERRCODE_INVALID_TRANSACTION_STATE,
            format!("{what} cannot run inside a savepoint"),
            "Claim and write at the top level of the transaction.",
        );
    }
}

/// One table's batch for `worker`, or None when it has none (locked by someone, no recorded
/// SHA-256, no row to do).
fn claim_table(listed: &Watched, worker: i64, max_rows: i32) -> Option<Vec<ClaimRow>> {
    let w = watched::lock(listed.relid, watched::FOR_WRITING, Wait::Skip)?;
    if !w.workers.external() {
        return None;
    }
    let spec = w.spec();
    let Some(sha256) = recorded_sha256(&spec) else {
        warn(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "{} is passed over: doppler.models records no SHA-256 for {} (its file is not on the database server)",
                w.name,
                spec.tag()
            ),
            "Register the model with doppler.register_model() where its file is readable by the server.",
        );
        return None;
    };
    let batch = remote::claim(&w, worker, max_rows as i64, &sha256, spec.dim)?;
    let model = model_json(&w, &spec, &sha256);
    Some(
        batch
            .sources
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let (source, image) = match s {
                    doppler_core::Source::Path(p) => (Some(p), None),
                    doppler_core::Source::Bytes(b) => (None, Some(b)),
                };
                (
                    i as i32 + 1,
                    w.name.clone(),
                    JsonB(model.clone()),
                    source,
                    image,
                )
            })
            .collect(),
    )
}

/// Session-level advisory locks a table owner's code took in this worker's session (its
/// triggers, policies, casts run here, as the owner) do not outlive the call, as in the server's
/// own worker. The worker's connection takes none of its own.
pub fn release_advisory_locks() {
    // lock.h's USER_LOCKMETHOD
    const USER_LOCKMETHOD: pg_sys::LOCKMETHODID = 2;
    // SAFETY: what pg_advisory_unlock_all() does
    unsafe { pg_sys::LockReleaseSession(USER_LOCKMETHOD) };
}

/// The claim's lease: the transaction's idle_in_transaction_session_timeout lowered to
/// doppler.worker_lease (SET LOCAL; a shorter one stays).
fn lease() {
    let lease = gucs::WORKER_LEASE.get();
    // SAFETY: the server's own settings lookup and SET LOCAL
    unsafe {
        let now = pg_sys::GetConfigOptionByName(
            c"idle_in_transaction_session_timeout".as_ptr(),
            std::ptr::null_mut(),
            false,
        );
        let current: i64 = std::ffi::CStr::from_ptr(now)
            .to_str()
            .ok()
            .and_then(parse_ms)
            .unwrap_or(0);
        if current == 0 || current > lease as i64 {
            let value = std::ffi::CString::new(lease.to_string()).expect("digits");
            pg_sys::set_config_option(
                c"idle_in_transaction_session_timeout".as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_LOCAL,
                true,
                0,
                false,
            );
        }
    }
}

/// A duration setting as SHOW prints it (`0`, `500ms`, `2min`...) in milliseconds.
fn parse_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: i64 = digits.parse().ok()?;
    let unit = match &s[digits.len()..] {
        "" | "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * unit)
}

/// What a worker needs to run a table's model as the server would: its file's base name and
/// SHA-256, its preprocessing and dim, and whether rows need a dHash and a PDQ hash.
fn model_json(w: &Watched, spec: &ModelSpec, sha256: &str) -> serde_json::Value {
    let file = std::path::Path::new(&spec.path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    json!({
        "name": spec.name,
        "version": spec.version,
        "tag": spec.tag(),
        "file": file,
        "sha256": sha256,
        "input_size": spec.input_size,
        "resize": match spec.filter {
            doppler_core::Filter::Bilinear => "bilinear",
            doppler_core::Filter::Lanczos => "lanczos",
        },
        "divisor": spec.divisor,
        "mean": spec.mean,
        "std": spec.std,
        "dim": spec.dim,
        "want_hash": w.hash_column.is_some(),
        "want_pdq": w.pdq_column.is_some(),
    })
}

/// The SHA-256 doppler.models records for `spec`'s entry.
fn recorded_sha256(spec: &ModelSpec) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT sha256 FROM doppler.models WHERE name OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2",
        &[spec.name.as_str().into(), spec.version.as_str().into()],
    )
    .ok()
    .flatten()
}

/// The SHA-256 of `spec`'s file on this server, if it is there.
pub fn file_sha256(spec: &ModelSpec) -> Option<String> {
    digest::sha256_file(&spec.path).ok()
}

/// Records the SHA-256 of `spec`'s file in doppler.models when none is recorded yet and the file
/// is on this server (entries registered before 0.10.0, the built-in ones). As the extension
/// owner.
pub fn record_sha256(spec: &ModelSpec) {
    if recorded_sha256(spec).is_some() {
        return;
    }
    let Some(sha) = file_sha256(spec) else {
        return;
    };
    as_catalog(extension_owner(), || {
        Spi::run_with_args(
            "UPDATE doppler.models SET sha256 = $3
             WHERE name OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2 AND sha256 IS NULL",
            &[
                spec.name.as_str().into(),
                spec.version.as_str().into(),
                sha.into(),
            ],
        )
        .or_raise(|| "could not record the model's SHA-256".into())
    });
}
