//! Tables the worker cannot serve for now (its model file differs from the registered one, the
//! model does not load, the owner's code keeps a write from ending): passed over by its claims
//! for a while, by oid (`worker_claim`'s skip), so the worker does not claim and give back the
//! same rows in a loop while other tables wait. A table met when the connection was lost is
//! added by name and its oid looked up on the next connection.

use std::time::{Duration, Instant};

/// How long a table whose model cannot run here is passed over.
pub const MODEL_SKIP: Duration = Duration::from_secs(60);
/// How long a table whose statement overran (the owner's code sleeping in a write) is passed over.
pub const STALL_SKIP: Duration = Duration::from_secs(60);
/// How long a table whose batch failed otherwise is passed over.
pub const BATCH_SKIP: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Skip {
    /// The table's name (as the claim gives it), its oid when known, until when.
    tables: Vec<(String, Option<u32>, Instant)>,
}

impl Skip {
    /// Passes `tbl` over until `now + for_`.
    pub fn add(&mut self, tbl: &str, oid: Option<u32>, now: Instant, for_: Duration) {
        self.tables.retain(|(t, _, _)| t != tbl);
        self.tables.push((tbl.to_string(), oid, now + for_));
    }

    fn prune(&mut self, now: Instant) {
        self.tables.retain(|(_, _, until)| *until > now);
    }

    /// The oids to pass to the claim.
    pub fn oids(&mut self, now: Instant) -> Vec<u32> {
        self.prune(now);
        self.tables.iter().filter_map(|(_, oid, _)| *oid).collect()
    }

    /// Tables whose oid is still to be looked up.
    pub fn unresolved(&self) -> Vec<String> {
        self.tables
            .iter()
            .filter(|(_, oid, _)| oid.is_none())
            .map(|(t, _, _)| t.clone())
            .collect()
    }

    /// The oid of `tbl`, looked up; None: the table is gone, and so is its entry.
    pub fn resolve(&mut self, tbl: &str, oid: Option<u32>) {
        match oid {
            Some(o) => {
                for e in self.tables.iter_mut().filter(|(t, _, _)| t == tbl) {
                    e.1 = Some(o);
                }
            }
            None => self.tables.retain(|(t, _, _)| t != tbl),
        }
    }

    /// Whether `tbl` is passed over now (a table whose oid could not be found is claimed
    /// anyway; the worker then gives its rows back at once).
    pub fn contains(&mut self, tbl: &str, now: Instant) -> bool {
        self.prune(now);
        self.tables.iter().any(|(t, _, _)| t == tbl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let t0 = Instant::now();
        let mut s = Skip::default();
        s.add("\"public\".\"a\"", Some(16384), t0, MODEL_SKIP);
        s.add("\"public\".\"b\"", None, t0, BATCH_SKIP);
        assert_eq!(s.oids(t0), [16384]);
        assert!(s.contains("\"public\".\"b\"", t0));
        let later = t0 + Duration::from_secs(11);
        assert!(!s.contains("\"public\".\"b\"", later));
        assert_eq!(s.oids(later), [16384]);
        assert!(s.oids(t0 + Duration::from_secs(61)).is_empty());
        // added again: one entry, the new time
        s.add("\"public\".\"a\"", Some(16384), t0, BATCH_SKIP);
        s.add("\"public\".\"a\"", Some(16384), t0, MODEL_SKIP);
        assert_eq!(s.oids(t0 + Duration::from_secs(30)), [16384]);
    }

    #[test]
    fn names_resolve_later() {
        let t0 = Instant::now();
        let mut s = Skip::default();
        s.add("a.t", None, t0, STALL_SKIP);
        s.add("a.gone", None, t0, STALL_SKIP);
        assert!(s.oids(t0).is_empty());
        assert_eq!(s.unresolved(), ["a.t", "a.gone"]);
        s.resolve("a.t", Some(7));
        s.resolve("a.gone", None);
        assert!(s.unresolved().is_empty());
        assert_eq!(s.oids(t0), [7]);
        assert!(!s.contains("a.gone", t0));
    }
}
