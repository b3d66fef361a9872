//! Which version of doppler's SQL objects this database has. The library serves databases whose
//! `ALTER EXTENSION doppler UPDATE` has not run yet (README, Upgrading): the few places where an
//! older catalog differs ask [`Installed`], which reads `pg_extension` once per transaction (and
//! again in a subtransaction: a savepoint's rollback may take an update with it).

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};

/// doppler's SQL objects in this database: their version, as (major, minor, patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Installed(u32, u32, u32);

thread_local! {
    /// The answer, with the subtransaction that read it (cleared when the transaction ends):
    /// an `ALTER EXTENSION doppler UPDATE` rolled back to a savepoint takes its answer with it.
    static CACHED: Cell<Option<(pg_sys::SubTransactionId, Option<Installed>)>> = const { Cell::new(None) };
}

impl Installed {
    /// The version installed in this database (None: no doppler extension here), read once per
    /// transaction: an `ALTER EXTENSION doppler UPDATE` in the middle of a transaction is seen by
    /// its next one.
    pub fn get() -> Option<Installed> {
        // SAFETY: in a transaction (every caller is)
        let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
        if let Some((read_in, v)) = CACHED.with(Cell::get) {
            if read_in == sub {
                return v;
            }
        }
        let v = Spi::get_one::<String>(
            "SELECT e.extversion FROM pg_catalog.pg_extension e
             WHERE e.extname OPERATOR(pg_catalog.=) 'doppler'::pg_catalog.name",
        )
        .ok()
        .flatten()
        .map(|s| Installed::parse(&s));
        let first = CACHED.with(|c| c.replace(Some((sub, v)))).is_none();
        if first {
            let clear = || CACHED.with(|c| c.set(None));
            register_xact_callback(PgXactCallbackEvent::Commit, clear);
            register_xact_callback(PgXactCallbackEvent::Abort, clear);
            register_xact_callback(PgXactCallbackEvent::Prepare, clear);
        }
        v
    }

    /// `major.minor.patch` (missing or unreadable parts are 0).
    pub fn parse(version: &str) -> Installed {
        let part = |i: usize| -> u32 {
            version
                .split('.')
                .nth(i)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        Installed(part(0), part(1), part(2))
    }

    /// The version as `pg_extension` shows it.
    pub fn text(self) -> String {
        format!("{}.{}.{}", self.0, self.1, self.2)
    }

    /// doppler.watched has `stale_scan`, claims settle the scan for outdated vectors (0.2.0).
    pub fn has_stale_scan(self) -> bool {
        self >= Installed(0, 2, 0)
    }

    /// doppler.batches has the per-phase columns (`claim_s` ... `write_s`, 0.5.0).
    pub fn has_phase_columns(self) -> bool {
        self >= Installed(0, 5, 0)
    }

    /// doppler.watched has `overruns` and `backoff_until` (0.8.0).
    pub fn has_overruns(self) -> bool {
        self >= Installed(0, 8, 0)
    }

    /// doppler.batches has `fetch_s`, `fetched_bytes` and `released` (0.9.0).
    pub fn has_fetch_columns(self) -> bool {
        self >= Installed(0, 9, 0)
    }

    /// doppler.watched has `workers`, doppler.models `sha256`, and the external workers' registry
    /// and functions exist (0.10.0).
    pub fn has_workers(self) -> bool {
        self >= Installed(0, 10, 0)
    }

    /// doppler.watched has `pdq_column` and `pdq_quality_column`, and worker_write takes PDQ
    /// hashes (0.11.0).
    pub fn has_pdq(self) -> bool {
        self >= Installed(0, 11, 0)
    }

    /// The stale-clearing trigger function is 0.1.0's PL/pgSQL one, which takes the derived
    /// columns as trigger arguments (later ones read them from doppler.watched).
    pub fn stale_trigger_takes_columns(self) -> bool {
        self < Installed(0, 2, 0)
    }
}

/// What the library's own SQL would be: the version of this build.
pub fn library() -> Installed {
    Installed::parse(env!("CARGO_PKG_VERSION"))
}
