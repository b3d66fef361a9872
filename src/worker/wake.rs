//! Waking this database's doppler workers: now (`doppler.wake()`, `watch`, `retry_failed`), or when
//! the writing transaction commits (the async trigger, `triggers.rs`). Setting a latch needs no
//! SPI, so it can run in a commit callback.

use pgrx::prelude::*;

use super::BACKEND_TYPE;
use crate::privileged::{as_catalog, extension_owner};

/// Wakes this database's doppler workers now instead of at their next nap. Returns how many.
pub fn wake() -> i32 {
    wake_pids(&worker_pids())
}

/// The pids of this database's doppler workers. Read as the extension owner: pg_stat_activity
/// shows another role's backend_type only to roles with pg_read_all_stats, and a plain table
/// owner's writes must wake the worker too.
pub fn worker_pids() -> Vec<i32> {
    as_catalog(extension_owner(), || {
        Spi::connect(|c| {
            c.select(
                "SELECT a.pid FROM pg_catalog.pg_stat_activity a
                 WHERE a.backend_type OPERATOR(pg_catalog.=) $1
                   AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()",
                None,
                &[BACKEND_TYPE.into()],
            )?
            .map(|r| r.get::<i32>(1).map(|p| p.unwrap_or(0)))
            .collect::<Result<Vec<_>, _>>()
        })
        // (best effort: waking is never worth failing the writer's statement)
        .unwrap_or_default()
    })
}

/// Sets the latch of each process. Returns how many there were.
pub fn wake_pids(pids: &[i32]) -> i32 {
    let mut n = 0;
    for &pid in pids {
        // SAFETY: BackendPidGetProc returns NULL or a live PGPROC; setting its latch is what
        // Postgres itself does to wake another process.
        unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            if !proc_.is_null() {
                pg_sys::SetLatch(&mut (*proc_).procLatch);
                n += 1;
            }
        }
    }
    n
}
