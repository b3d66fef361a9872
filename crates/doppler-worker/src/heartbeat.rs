//! The heartbeat: a thread that owns the `ctl` connection while the worker is registered and
//! reports what the main loop holds and has done, every `heartbeat_s` and at once when the main
//! loop asks (rows claimed, a batch written). A thread, not the main loop, so that a long batch
//! (a big model on a CPU, slow URLs) still reports on time. A lost connection is left for the
//! main loop to see ([`Heartbeat::lost`]); the thread then ends.
//!
//! It is also the watchdog of the statements on `work` ([`Heartbeat::watch`]): a claim or write
//! runs the table owner's code (policies, triggers), which may keep it from ending, and swallow
//! the cancel `statement_timeout` sends. A statement past its deadline has its server process
//! terminated from `ctl` (the worker's own role may end its own sessions); the main loop's call
//! then returns, and the worker reconnects and passes that table over.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::json;

use crate::api::{self, Failure};
use crate::log;

/// What a heartbeat reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub holding_table: Option<String>,
    pub holding_rows: i64,
    pub rows_done: i64,
    pub rows_failed: i64,
    /// Rows per second over the last minute.
    pub rate: f64,
    pub last_error: Option<String>,
}

impl Report {
    pub fn json(&self) -> String {
        json!({
            "holding_table": self.holding_table,
            "holding_rows": self.holding_rows,
            "rows_done": self.rows_done,
            "rows_failed": self.rows_failed,
            "rate": log::round3(self.rate),
            "last_error": self.last_error,
        })
        .to_string()
    }
}

/// Rows per second over the last minute (or since the start, when that is shorter).
#[derive(Debug)]
pub struct Rate {
    started: Instant,
    batches: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Rate {
    pub fn new(now: Instant) -> Rate {
        Rate {
            started: now,
            batches: VecDeque::new(),
        }
    }

    pub fn add(&mut self, now: Instant, rows: u64) {
        self.batches.push_back((now, rows));
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some((t, _)) = self.batches.front() {
            if now.saturating_duration_since(*t) > RATE_WINDOW {
                self.batches.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn per_second(&mut self, now: Instant) -> f64 {
        self.prune(now);
        let rows: u64 = self.batches.iter().map(|(_, r)| r).sum();
        let span = now
            .saturating_duration_since(self.started)
            .min(RATE_WINDOW)
            .as_secs_f64();
        if span <= 0.0 {
            0.0
        } else {
            rows as f64 / span
        }
    }
}

/// A statement on `work` that must end by `deadline`, else the server process `pid` is ended.
struct Watch {
    pid: i32,
    deadline: Instant,
}

struct State {
    report: Report,
    watch: Option<Watch>,
    /// The watchdog ended the `work` connection's server process.
    terminated: bool,
    /// Send now.
    due: bool,
    stop: bool,
    /// Why the thread ended without being asked to: the connection lost, or the worker's id not
    /// registered any more.
    lost: Option<(Failure, String)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The running heartbeat.
pub struct Heartbeat {
    shared: Arc<Shared>,
    /// The `ctl` connection, handed back when the thread ends (None: lost).
    done: mpsc::Receiver<Option<Client>>,
}

impl Heartbeat {
    /// Starts the thread with `ctl`, worker `id`, reporting `report` every `every`.
    pub fn start(
        ctl: Client,
        id: i64,
        every: Duration,
        report: Report,
    ) -> std::io::Result<Heartbeat> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                report,
                watch: None,
                terminated: false,
                due: true,
                stop: false,
                lost: None,
            }),
            changed: Condvar::new(),
        });
        let (tx, done) = mpsc::channel();
        let me = Arc::clone(&shared);
        doppler_core::model::with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("heartbeat".into())
                .spawn(move || {
                    let ctl = beat(ctl, id, every, &me);
                    let _ = tx.send(ctl);
                })
        })?;
        Ok(Heartbeat { shared, done })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the report; `now`: send it at once.
    pub fn update(&self, now: bool, f: impl FnOnce(&mut Report)) {
        let mut st = self.lock();
        f(&mut st.report);
        if now {
            st.due = true;
            self.shared.changed.notify_all();
        }
    }

    /// Watches a statement on `work` (server process `pid`) until the guard is dropped: past
    /// `limit`, the process is terminated.
    pub fn watch(&self, pid: i32, limit: Duration) -> WatchGuard<'_> {
        let mut st = self.lock();
        st.watch = Some(Watch {
            pid,
            deadline: Instant::now() + limit,
        });
        self.shared.changed.notify_all();
        WatchGuard(self)
    }

    /// Whether the watchdog ended the `work` connection (a statement overran).
    pub fn terminated_work(&self) -> bool {
        self.lock().terminated
    }

    /// Why the heartbeat ended, when it did on its own.
    pub fn lost(&self) -> Option<(Failure, String)> {
        self.lock().lost.clone()
    }

    /// Stops the thread and hands `ctl` back, waiting at most `wait` for a heartbeat in flight
    /// (None: lost, or still stuck in a call: it is left to end by itself).
    pub fn stop(self, wait: Duration) -> Option<Client> {
        {
            let mut st = self.lock();
            st.stop = true;
            self.shared.changed.notify_all();
        }
        self.done.recv_timeout(wait).ok().flatten()
    }
}

/// Ends the watch when the statement has returned.
pub struct WatchGuard<'a>(&'a Heartbeat);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().watch = None;
    }
}

/// What the thread does next.
enum Job {
    Beat(String),
    Terminate(i32),
}

/// The thread: a heartbeat when one is due, an overrunning statement's process ended, until
/// stopped or the connection is lost.
fn beat(mut ctl: Client, id: i64, every: Duration, shared: &Shared) -> Option<Client> {
    let mut next = Instant::now();
    let mut last_failure: Option<String> = None;
    loop {
        let job = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if st.stop {
                    return Some(ctl);
                }
                let now = Instant::now();
                if let Some(w) = st.watch.take_if(|w| now >= w.deadline) {
                    st.terminated = true;
                    break Job::Terminate(w.pid);
                }
                if st.due || now >= next {
                    st.due = false;
                    break Job::Beat(st.report.json());
                }
                let wake = st.watch.as_ref().map_or(next, |w| w.deadline.min(next));
                st = shared
                    .changed
                    .wait_timeout(st, wake - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let json = match job {
            Job::Beat(json) => json,
            Job::Terminate(pid) => {
                log::error("statement_overran")
                    .field("worker", id)
                    .field(
                        "error",
                        format!("a statement of the work connection (server process {pid}) overran its deadline: ending that process"),
                    )
                    .field("sqlstate", serde_json::Value::Null)
                    .emit();
                if let Err(e) = api::terminate(&mut ctl, pid) {
                    log::error("statement_overran")
                        .field("worker", id)
                        .field("error", api::describe(&e))
                        .field("sqlstate", api::sqlstate(&e))
                        .emit();
                }
                continue;
            }
        };
        next = Instant::now() + every;
        match api::heartbeat(&mut ctl, id, &json) {
            Ok(()) => last_failure = None,
            Err(e) => {
                let why = api::describe(&e);
                match api::classify(&e, ctl.is_closed()) {
                    f @ (Failure::Connection | Failure::Unregistered) => {
                        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.lost = Some((f, why));
                        return None;
                    }
                    Failure::NotPermitted | Failure::Other => {
                        // (said once, not every beat)
                        if last_failure.as_deref() != Some(why.as_str()) {
                            log::error("heartbeat_failed")
                                .field("worker", id)
                                .field("error", why.clone())
                                .field("sqlstate", api::sqlstate(&e))
                                .emit();
                        }
                        last_failure = Some(why);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json() {
        let r = Report {
            holding_table: Some("\"public\".\"t\"".into()),
            holding_rows: 32,
            rows_done: 1000,
            rows_failed: 3,
            rate: 12.34567,
            last_error: None,
        };
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["holding_table"], "\"public\".\"t\"");
        assert_eq!(v["holding_rows"], 32);
        assert_eq!(v["rows_done"], 1000);
        assert_eq!(v["rows_failed"], 3);
        assert_eq!(v["rate"], 12.346);
        assert!(v["last_error"].is_null());
        let v: serde_json::Value = serde_json::from_str(&Report::default().json()).unwrap();
        assert!(v["holding_table"].is_null());
    }

    #[test]
    fn rate_over_the_last_minute() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        assert_eq!(r.per_second(t0), 0.0);
        r.add(t0 + Duration::from_secs(5), 50);
        // 50 rows in the first 10 s
        assert_eq!(r.per_second(t0 + Duration::from_secs(10)), 5.0);
        r.add(t0 + Duration::from_secs(30), 70);
        assert_eq!(r.per_second(t0 + Duration::from_secs(60)), 2.0);
        // the first batch leaves the window
        assert_eq!(r.per_second(t0 + Duration::from_secs(80)), 70.0 / 60.0);
        assert_eq!(r.per_second(t0 + Duration::from_secs(200)), 0.0);
    }
}
