//! What keeps one table owner's code from stalling the external workers of every owner: each
//! claim or write of a table runs under a limit no owner code can swallow (the server worker's
//! two timers, `worker/timeout.rs`: the cancel at the limit, the connection's end a second later),
//! and the tables that overran are backed off for every worker of the server, in shared memory:
//!
//! * while a backend claims or writes table X it holds a marker (X, its process, the deadline);
//!   other workers pass X over meanwhile (a claim takes milliseconds: a table someone is claiming
//!   now is served by the next claim), and its marker is cleared when the call ends;
//! * a call that overran is cancelled: its marker becomes a back-off of X for [`BACKOFF`];
//! * a call whose owner code caught the cancel ends the connection (a FATAL): its marker stays,
//!   and a marker whose deadline has passed backs X off until deadline + [`BACKOFF`].
//!
//! Markers are few (one per backend in a call, plus back-offs): a small fixed table, under one
//! lock, taken for a few microseconds before and after each call.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgLwLock};

use crate::errors::{is_interrupt, raise, Code};
use crate::gucs;
use crate::worker::timeout;

/// How long a table whose claim or write overran is passed over by every external worker.
pub const BACKOFF: Duration = Duration::from_secs(600);

/// Markers kept: [relid, the backend's pid (0: a back-off), deadline or end of the back-off
/// (seconds since the epoch)].
const MARKERS: usize = 256;
static MARKED: PgLwLock<[[u32; 3]; MARKERS]> =
    unsafe { PgLwLock::new(c"doppler_external_markers") };

/// Whether the markers' shared memory exists (doppler in shared_preload_libraries; the
/// postmaster sets it, its children inherit it). Without it, the limit still holds, per backend.
static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Registers the shared memory. Only during shared_preload_libraries.
pub fn register() {
    pg_shmem_init!(MARKED = [[0u32; 3]; MARKERS]);
    REGISTERED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn registered() -> bool {
    REGISTERED.load(std::sync::atomic::Ordering::Relaxed)
}

fn now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u32::MAX as u64) as u32)
}

/// This backend (its pid: never 0, unique among live processes).
fn me() -> u32 {
    // SAFETY: this process's own pid
    unsafe { pg_sys::MyProcPid as u32 }
}

/// The limit of one claim or write of a table: `doppler.worker_batch_timeout` (when set), at most
/// `doppler.worker_lease`.
pub fn limit() -> Duration {
    let lease = Duration::from_millis(gucs::WORKER_LEASE.get().max(1) as u64);
    timeout::limit().map_or(lease, |l| l.min(lease))
}

/// Whether external workers pass `relid` over now: another backend is claiming or writing it,
/// it overran lately, or a backend ended while in it.
pub fn passed_over(relid: pg_sys::Oid) -> bool {
    let (relid, now, me) = (relid.to_u32(), now(), me());
    let backoff = BACKOFF.as_secs() as u32;
    if !registered() {
        return false;
    }
    let mut all = MARKED.exclusive();
    let mut passed = false;
    for m in all.iter_mut().filter(|m| m[0] == relid) {
        let [_, pid, t] = *m;
        passed |= match pid {
            0 => now < t,
            p if p == me => false,
            // a backend that ended before its deadline (terminated, crashed) did not overrun:
            // its marker goes
            p if now < t && !alive(p) => {
                *m = [0, 0, 0];
                false
            }
            // in a call now, or ended (or stuck) past its deadline: an overrun
            _ => now < t.saturating_add(backoff),
        };
    }
    passed
}

/// Whether process `pid` is alive (a backend of this server runs as the same OS user).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Runs `f`, a claim or write of table `relid` (its owner's code), under [`limit`]: marked while
/// it runs, backed off for every worker when it overran. The timers are this backend's own: a
/// session `statement_timeout` does not apply to the rest of the statement.
pub fn run<R>(relid: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    timeout::init();
    let limit = limit();
    mark(relid, now().saturating_add(limit.as_secs().max(1) as u32));
    let started = std::time::Instant::now();
    // (overran: measured by this clock, not by the timer's flag, which the cancel itself clears)
    let overran = move || started.elapsed() + Duration::from_millis(50) >= limit;
    timeout::arm(limit);
    let mut f = Some(f);
    let f = std::panic::AssertUnwindSafe(&mut f);
    let r = pgrx::PgTryBuilder::new(move || {
        let f = f;
        (f.0.take().expect("run once"))()
    })
    .catch_others(move |e| {
        timeout::disarm();
        let cancelled = match &e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
            | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => is_interrupt(r),
        };
        if !(cancelled && overran()) {
            unmark();
            e.rethrow()
        }
        back_off(relid);
        // (not the cancel itself: a caller's cancel must end the statement, this one only
        // the table's turn)
        raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "a claim or write of relation {} for an external worker overran {} s (its owner's code); external workers pass it over for {} minutes",
                relid.to_u32(),
                limit.as_secs(),
                BACKOFF.as_secs() / 60
            ),
            "",
        )
    })
    .execute();
    timeout::disarm();
    if overran() {
        // the owner's code caught the cancel and returned within the grace
        back_off(relid);
    } else {
        unmark();
    }
    r
}

/// This backend's marker for `relid` until `deadline`. (A marker a backend left when it ended
/// in a call stays until its back-off is over.)
fn mark(relid: pg_sys::Oid, deadline: u32) {
    let (me, now) = (me(), now());
    let backoff = BACKOFF.as_secs() as u32;
    if !registered() {
        return;
    }
    let mut all = MARKED.exclusive();
    for m in all.iter_mut() {
        if m[1] == me {
            *m = [0, 0, 0];
        }
    }
    // a free entry, or one whose back-off is over
    let free = all.iter().position(|&[r, p, t]| {
        r == 0 || (p == 0 && t <= now) || (p != 0 && t.saturating_add(backoff) <= now)
    });
    if let Some(i) = free {
        all[i] = [relid.to_u32(), me, deadline];
    }
}

/// Clears this backend's marker.
fn unmark() {
    let me = me();
    if !registered() {
        return;
    }
    for m in MARKED.exclusive().iter_mut() {
        if m[1] == me {
            *m = [0, 0, 0];
        }
    }
}

/// Turns this backend's marker of `relid` into a back-off for every worker.
fn back_off(relid: pg_sys::Oid) {
    let (me, until) = (me(), now().saturating_add(BACKOFF.as_secs() as u32));
    if registered() {
        for m in MARKED.exclusive().iter_mut() {
            if m[1] == me {
                *m = [relid.to_u32(), 0, until];
            }
        }
    }
}
