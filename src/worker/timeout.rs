//! `doppler.worker_batch_timeout`, which no table owner's code can swallow. A batch runs the
//! owner's code (triggers, casts, policies), and a sleep or a lock wait there must not stall the
//! other owners' tables. At the timeout the batch is cancelled (the timer behind
//! statement_timeout, which SPI in a background worker never arms): ordinary code stops there,
//! and the worker goes on with the next table. Code that catches the cancel (`EXCEPTION WHEN
//! query_canceled`) gets [`GRACE`] more; then the worker ends itself the way `pg_terminate_backend`
//! would (a FATAL, which no exception block catches): its transaction is rolled back, so the rows
//! go back, and the postmaster starts the worker again after its restart time.
//!
//! What a worker's successor must know is kept in shared memory ([`SLOTS_STATE`], by the worker's
//! slot in `doppler.worker_databases`): the table it is filling and that table's owner (so that
//! the next worker knows which table made the last one end, backs it off and leaves it out of its
//! first pass), how many passes it made (the owners' turns go on rotating across restarts), and
//! the owners whose tables ended workers lately (served last, most recent last).

use std::ffi::c_int;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgLwLock};

use crate::gucs;

/// How long a batch that caught its cancel may go on before the worker ends itself.
pub const GRACE: Duration = Duration::from_secs(1);

/// Workers past this slot are not remembered (their overruns are noted only when the batch
/// ends at the cancel).
const SLOTS: usize = 64;

/// Per worker slot: [the table being filled (0: none), its owner, passes made, then the owners
/// whose tables ended workers lately, most recent last (0: none)].
static SLOTS_STATE: PgLwLock<[[u32; STATE]; SLOTS]> =
    unsafe { PgLwLock::new(c"doppler_worker_slots") };
const STATE: usize = 3 + DEMOTED;
/// Owners remembered for having ended a worker.
const DEMOTED: usize = 4;

/// Registers the shared memory. Only during shared_preload_libraries.
pub fn register() {
    pg_shmem_init!(SLOTS_STATE = [[0u32; STATE]; SLOTS]);
}

// utils/timeout.h (not in pgrx's bindings). STATEMENT_TIMEOUT is 3 in PostgreSQL 15 to 18;
// USER_TIMEOUT, the first id an extension may register, moved when 17 added TRANSACTION_TIMEOUT.
const STATEMENT_TIMEOUT: c_int = 3;
#[cfg(feature = "pg15")]
const USER_TIMEOUT: c_int = 12;
#[cfg(not(feature = "pg15"))]
const USER_TIMEOUT: c_int = 13;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
    fn RegisterTimeout(id: c_int, handler: extern "C" fn()) -> c_int;
    fn get_timeout_indicator(id: c_int, reset_indicator: bool) -> bool;
}

/// The id of this process's overrun timer (0: not registered).
static OVERRUN_TIMER: AtomicI32 = AtomicI32::new(0);

/// The overrun timer's handler, in signal context: what `die()` does for SIGTERM in a backend
/// (ProcessInterrupts then ends the process with a FATAL at its next interrupt check).
extern "C" fn overrun() {
    // SAFETY: only sig_atomic_t flags and SetLatch, which are safe in a signal handler.
    unsafe {
        if !pg_sys::proc_exit_inprogress {
            pg_sys::InterruptPending = 1;
            pg_sys::ProcDiePending = 1;
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// Registers the overrun timer (once per process, after the connection is made: the background
/// worker, or a backend that serves an external worker's claims).
pub fn init() {
    if OVERRUN_TIMER.load(Ordering::Relaxed) == 0 {
        // SAFETY: timeouts are initialized in a background worker with a connection.
        let id = unsafe { RegisterTimeout(USER_TIMEOUT, overrun) };
        OVERRUN_TIMER.store(id, Ordering::Relaxed);
    }
}

/// The batch timeout, if one is set.
pub fn limit() -> Option<Duration> {
    let ms = gucs::WORKER_BATCH_TIMEOUT.get();
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

/// Runs `f`, a batch of table `relid` in worker slot `slot`, under the batch timeout: cancelled
/// at the timeout, the worker ended [`GRACE`] later. The timers are disarmed by [`disarm`] (the
/// worker's transaction end calls it on every path).
pub fn run<R>(slot: usize, relid: pg_sys::Oid, owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    set_filling(slot, relid.to_u32(), owner.to_u32());
    if let Some(limit) = limit() {
        arm(limit);
    }
    let r = f();
    disarm();
    set_filling(slot, 0, 0);
    r
}

/// Arms both timers: the cancel at `limit` (the statement timeout's timer), this process's end
/// [`GRACE`] later (when [`init`] registered it). [`disarm`] undoes it.
pub fn arm(limit: Duration) {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128) as c_int;
    // SAFETY: timers of this process; the caller disarms them
    unsafe {
        enable_timeout_after(STATEMENT_TIMEOUT, ms(limit));
        let timer = OVERRUN_TIMER.load(Ordering::Relaxed);
        if timer != 0 {
            enable_timeout_after(timer, ms(limit + GRACE));
        }
    }
}

/// Whether the cancel of [`arm`] has fired since it was armed (clearing the indicator).
pub fn cancel_fired() -> bool {
    // SAFETY: reads (and resets) a flag of this process's timer
    unsafe { get_timeout_indicator(STATEMENT_TIMEOUT, true) }
}

/// Disarms both timers (the batch ended, or its transaction is being rolled back).
pub fn disarm() {
    // SAFETY: disabling a timer that is not armed is a no-op.
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        let timer = OVERRUN_TIMER.load(Ordering::Relaxed);
        if timer != 0 {
            disable_timeout(timer, false);
        }
    }
}

fn set_filling(slot: usize, relid: u32, owner: u32) {
    if slot < SLOTS {
        let mut state = SLOTS_STATE.exclusive();
        state[slot][0] = relid;
        state[slot][1] = owner;
    }
}

/// What a worker starting in `slot` takes over from its predecessor.
pub struct TakenOver {
    /// The table the predecessor was filling when it ended (the overrun's FATAL, or a terminate
    /// mid-batch), if any.
    pub table: Option<pg_sys::Oid>,
    /// Owners whose tables ended workers lately, most recent last.
    pub demoted: Vec<pg_sys::Oid>,
}

/// The state a worker in `slot` takes over (the table being filled is cleared, its owner added to
/// the demoted owners).
pub fn take_over(slot: usize) -> TakenOver {
    if slot >= SLOTS {
        return TakenOver {
            table: None,
            demoted: Vec::new(),
        };
    }
    let mut all = SLOTS_STATE.exclusive();
    let state = &mut all[slot];
    let (table, owner) = (std::mem::take(&mut state[0]), std::mem::take(&mut state[1]));
    if owner != 0 {
        let mut demoted: Vec<u32> = state[3..]
            .iter()
            .copied()
            .filter(|&o| o != 0 && o != owner)
            .collect();
        demoted.push(owner);
        let keep = demoted.len().saturating_sub(DEMOTED);
        let demoted = &demoted[keep..];
        state[3..].fill(0);
        state[3..3 + demoted.len()].copy_from_slice(demoted);
    }
    TakenOver {
        table: (table != 0).then(|| pg_sys::Oid::from(table)),
        demoted: state[3..]
            .iter()
            .filter(|&&o| o != 0)
            .map(|&o| pg_sys::Oid::from(o))
            .collect(),
    }
}

/// Counts a pass of the worker in `slot` (the owners' turns rotate by it across restarts).
pub fn count_pass(slot: usize) -> u32 {
    if slot >= SLOTS {
        return 0;
    }
    let mut all = SLOTS_STATE.exclusive();
    all[slot][2] = all[slot][2].wrapping_add(1);
    all[slot][2]
}
