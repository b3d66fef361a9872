//! The background worker: one per database named in `doppler.worker_databases`, registered at
//! server start (doppler in `shared_preload_libraries`) and restarted by the postmaster if it
//! dies. It waits for the extension to exist in its database, then fills watched tables batch by
//! batch, one transaction per batch, sleeping on its latch when there is nothing to do. A pass is
//! fair between table owners (`pass.rs`), and a batch's timeout is one no owner code can catch
//! (`timeout.rs`).
//!
//! A database that does not exist (yet): connecting to it is a FATAL, and the postmaster would
//! start the worker again every 5 s, each time with a FATAL in the log. Instead the failed start
//! is remembered in shared memory ([`MISSING`]), and the next start connects to no database
//! (shared catalogs only), says so once in the log and looks the database up every
//! [`MISSING_RECHECK`] (a catalog read, no connection attempt) until it can connect.

mod pass;
pub mod timeout;
mod wake;

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};
use std::sync::atomic::AtomicU64;

use crate::gucs;
use crate::watched::installed::{self, Installed};
pub use wake::{wake, wake_pids, worker_pids};

/// The `backend_type` of doppler workers in `pg_stat_activity`.
pub const BACKEND_TYPE: &str = "doppler worker";

/// Workers whose last start could not connect to their database: bit `i` stands for the `i`-th
/// entry of `doppler.worker_databases`. In shared memory, because the postmaster starts a
/// worker again as a new process (and a crash-restart clears it, which only costs one FATAL).
static MISSING: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"doppler_missing_databases") };

/// How often a worker whose database is missing looks it up again.
pub const MISSING_RECHECK: Duration = Duration::from_secs(5);

/// Registers one worker per configured database. Only during shared_preload_libraries.
pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    pg_shmem_init!(MISSING);
    timeout::register();
    // (workers past the 64th are not remembered: a missing database costs them a FATAL per start)
    for (slot, db) in gucs::worker_databases().iter().enumerate() {
        BackgroundWorkerBuilder::new(&format!("doppler worker for database {db}"))
            .set_type(BACKEND_TYPE)
            .set_library("doppler")
            .set_function("doppler_worker_main")
            .set_argument(Some(pg_sys::Datum::from(slot)))
            .set_extra(db)
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

/// The worker's entry point.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn doppler_worker_main(arg: pg_sys::Datum) {
    crate::gucs::IN_DOPPLER_WORKER.store(true, Ordering::Relaxed);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    let bit = 1u64.checked_shl(arg.value() as u32).unwrap_or(0);
    if MISSING.get().load(Ordering::SeqCst) & bit != 0 {
        wait_for_database(&db, bit);
    }
    // Connecting to a database that does not exist (or takes no connections) is a FATAL that
    // ends this process: the bit stays set, and the next start waits instead of failing again.
    MISSING.get().fetch_or(bit, Ordering::SeqCst);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    MISSING.get().fetch_and(!bit, Ordering::SeqCst);
    // A superuser connection: no database or role default, nor anything in `public`, may reach
    // its statements.
    crate::privileged::pin_session_search_path();
    log!("doppler worker started in database \"{db}\"");
    timeout::init();
    let mut passes = pass::Passes::new(arg.value());
    // (a first pass at once: rows may have waited for this worker, e.g. one that ended in a batch)
    let mut busy = true;
    let mut last_prune: Option<Instant> = None;
    loop {
        // Sleep only when the last pass found nothing to do; SIGTERM ends the loop either way.
        let naptime = Duration::from_millis(gucs::WORKER_NAPTIME.get() as u64);
        if !busy && !BackgroundWorker::wait_latch(Some(naptime)) {
            STOP.store(true, Ordering::SeqCst);
        }
        if stopping() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            log!(
                "doppler worker in database \"{db}\" reloaded its settings (naptime {} ms)",
                gucs::WORKER_NAPTIME.get()
            );
        }
        busy = pass::one_pass(&mut passes);
        if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(600)) {
            pass::prune();
            last_prune = Some(Instant::now());
        }
    }
    report("doppler: stopping");
    log!("doppler worker in database \"{db}\" stopped");
    // Exit code 1: the postmaster starts the worker again after its restart time (unless the
    // server is shutting down); exit code 0 would unregister it for good.
    unsafe { pg_sys::proc_exit(1) };
}

/// The last start could not connect to `db`: connect to no database (shared catalogs only), say
/// so once, and look `db` up every [`MISSING_RECHECK`] until it exists and takes connections;
/// then end, to be started again (in 5 s) by the postmaster, and connect.
fn wait_for_database(db: &str, bit: u64) -> ! {
    BackgroundWorker::connect_worker_to_spi(None, None);
    log!(
        "doppler worker: database \"{db}\" (doppler.worker_databases) does not exist or does not accept connections; looking for it every {} s",
        MISSING_RECHECK.as_secs()
    );
    report(&format!("doppler: waiting for database {db}"));
    // There already (the connection failed for another reason, e.g. a role or connection limit):
    // try again much later, not every 5 s.
    let mut wait = MISSING_RECHECK;
    if database_ready(db) {
        wait = Duration::from_secs(60);
        log!("doppler worker: database \"{db}\" exists, but the worker could not connect to it; trying again in 60 s");
        if !BackgroundWorker::wait_latch(Some(wait)) || stopping() {
            unsafe { pg_sys::proc_exit(1) };
        }
    }
    loop {
        if database_ready(db) {
            MISSING.get().fetch_and(!bit, Ordering::SeqCst);
            log!("doppler worker: database \"{db}\" is there now, connecting");
            break;
        }
        if !BackgroundWorker::wait_latch(Some(wait)) || stopping() {
            break;
        }
    }
    unsafe { pg_sys::proc_exit(1) };
    unreachable!("proc_exit returned")
}

/// Whether database `db` exists and accepts connections (pg_database, a shared catalog).
fn database_ready(db: &str) -> bool {
    let Ok(name) = CString::new(db) else {
        return false;
    };
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        let oid = pg_sys::get_database_oid(name.as_ptr(), true);
        let mut ready = false;
        if oid != pg_sys::InvalidOid {
            let tup = pg_sys::SearchSysCache1(
                pg_sys::SysCacheIdentifier::DATABASEOID as _,
                pg_sys::Datum::from(oid),
            );
            if !tup.is_null() {
                let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
                // datconnlimit -2: left invalid by an interrupted DROP DATABASE (PG 15.4+)
                ready = (*form).datallowconn && (*form).datconnlimit != -2;
                pg_sys::ReleaseSysCache(tup);
            }
        }
        pg_sys::CommitTransactionCommand();
        ready
    }
}

/// Says once (per worker process) when the database's doppler SQL objects are of another
/// version than this library: the binaries were upgraded and `ALTER EXTENSION doppler UPDATE`
/// has not run yet. The worker goes on (the update scripts keep the tables' shape).
fn check_version(installed: Installed) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let library = installed::library();
    if installed != library && !WARNED.swap(true, Ordering::SeqCst) {
        warning!(
            "doppler's SQL objects in this database are version {}, its library is {}: run ALTER EXTENSION doppler UPDATE",
            installed.text(),
            library.text()
        );
    }
}

/// lock.h's USER_LOCKMETHOD: advisory locks.
const USER_LOCKMETHOD: pg_sys::LOCKMETHODID = 2;

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether SIGTERM (or postmaster death) asked the worker to stop. Sticky: pgrx's own flag is
/// reset by every read.
fn stopping() -> bool {
    if BackgroundWorker::sigterm_received() {
        STOP.store(true, Ordering::SeqCst);
    }
    STOP.load(Ordering::SeqCst)
}

/// Runs `f` in its own transaction. A Postgres ERROR inside is logged and the transaction rolled
/// back, and the worker goes on: `None` then.
pub fn in_transaction<R>(what: &str, f: impl FnOnce() -> R) -> Option<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let mut f = Some(f);
    let f = std::panic::AssertUnwindSafe(&mut f);
    let result = PgTryBuilder::new(move || {
        let f = f;
        Some((f.0.take().expect("run once"))())
    })
    .catch_others(|e| {
        let msg = match &e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
        };
        warning!("doppler worker: error while {what}, batch rolled back: {msg}");
        None
    })
    .execute();
    unsafe {
        if result.is_some() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            // out of any subtransaction too (an ERROR may escape one that doppler opened)
            pg_sys::AbortOutOfAnyTransaction();
        }
        // Session-level advisory locks outlive the transaction: a table owner's trigger must
        // not leave one held by the worker (what pg_advisory_unlock_all() does).
        pg_sys::LockReleaseSession(USER_LOCKMETHOD);
    }
    // (after the commit, which the batch timeout covers too)
    timeout::disarm();
    result
}

/// Shows what the worker does in pg_stat_activity.query.
fn report(activity: &str) {
    let c = CString::new(activity).unwrap_or_default();
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c.as_ptr()) };
}
