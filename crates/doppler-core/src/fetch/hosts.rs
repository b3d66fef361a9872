//! Politeness, per process: at most [`FetchLimits::max_in_flight`] requests in flight in all,
//! [`FetchLimits::max_per_host`] to one host, starts to one host spaced by its rate; a host that
//! asked to wait (`Retry-After` on a 429 or 503) or that failed to answer [`UNREACHABLE_IN_A_ROW`]
//! times in a row (timeouts, refused connections) is paused: no requests until then, its URLs
//! answered with [`ErrorKind::RetryLater`] at once. Requests a batch needs now go before
//! lookahead requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::policy::FetchLimits;
use crate::error::{Error, ErrorKind};

/// Failures to answer in a row (timeouts, connections refused or reset) that pause a host.
pub const UNREACHABLE_IN_A_ROW: u32 = 3;
/// The first pause of an unreachable host; each pause after it doubles, up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_secs(5);
pub const MAX_PAUSE: Duration = Duration::from_secs(300);
/// The longest wait a `Retry-After` is taken at: a day.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);
/// The shortest: a server that asks for no wait at all (`Retry-After: 0`, a date in the past)
/// does not get a loop of requests.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Hosts remembered; beyond it, idle hosts are forgotten.
const HOSTS_KEPT: usize = 4096;

/// How a request ended, for its host's health.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// The host answered (whatever the status).
    Answered,
    /// It answered and asked to wait until then.
    AskedToWait(SystemTime),
    /// It did not answer in time, or refused or dropped the connection.
    Unreachable,
    /// Nothing was learnt about the host (refused by policy, cancelled).
    Neither,
}

#[derive(Default)]
struct Host {
    in_flight: usize,
    /// Requests started no earlier than this (the host's rate).
    next_start: Option<Instant>,
    /// Asked to wait (true), or unreachable: no requests before this.
    paused: Option<(Instant, SystemTime, bool)>,
    unreachable: u32,
    pauses: u32,
    last_used: Option<Instant>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    /// Demanded requests waiting for a turn: lookahead requests wait while there are any.
    demand_waiting: usize,
    hosts: HashMap<String, Host>,
}

/// The gate every request passes.
#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

/// A request's turn: given back (with what happened) by [`Gate::done`].
#[must_use]
pub struct Turn {
    host: String,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a turn to request from `host`, or the error a paused host answers with.
    pub async fn turn(
        &self,
        host: &str,
        limits: FetchLimits,
        demanded: bool,
    ) -> Result<Turn, Error> {
        let mut counted = false;
        let r = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut st = self.lock();
                if demanded && !counted {
                    st.demand_waiting += 1;
                    counted = true;
                }
                let now = Instant::now();
                let total_free = st.in_flight < limits.max_in_flight.max(1);
                let others_first = !demanded && st.demand_waiting > 0;
                let h = st.hosts.entry(host.to_string()).or_default();
                match h.paused {
                    Some((until, at, asked)) if until > now => break Err(paused(host, at, asked)),
                    Some(_) => h.paused = None,
                    None => {}
                }
                let wait = h.next_start.filter(|&t| t > now).map(|t| t - now);
                if total_free
                    && !others_first
                    && h.in_flight < limits.max_per_host.max(1)
                    && wait.is_none()
                {
                    h.in_flight += 1;
                    h.last_used = Some(now);
                    if limits.host_rate > 0.0 {
                        h.next_start = now.checked_add(spacing(limits.host_rate));
                    }
                    st.in_flight += 1;
                    break Ok(Turn {
                        host: host.to_string(),
                    });
                }
                wait
            };
            match wait {
                // a rate's spacing: sleep until then (or a change)
                Some(d) => {
                    let _ = tokio::time::timeout(d, notified).await;
                }
                None => notified.await,
            }
        };
        if counted {
            self.lock().demand_waiting -= 1;
            self.changed.notify_waiters();
        }
        r
    }

    /// Gives a turn back, with what the request learnt about its host.
    pub fn done(&self, turn: Turn, outcome: Outcome) {
        {
            let mut st = self.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            let now = Instant::now();
            let h = st.hosts.entry(turn.host).or_default();
            h.in_flight = h.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Answered => (h.unreachable, h.pauses) = (0, 0),
                Outcome::AskedToWait(at) => {
                    h.unreachable = 0;
                    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                    h.paused = Some((now + wait, at, true));
                }
                Outcome::Unreachable => {
                    h.unreachable += 1;
                    if h.unreachable >= UNREACHABLE_IN_A_ROW {
                        let pause = FIRST_PAUSE
                            .saturating_mul(1 << h.pauses.min(16))
                            .min(MAX_PAUSE);
                        h.paused = Some((now + pause, SystemTime::now() + pause, false));
                        h.unreachable = 0;
                        h.pauses += 1;
                    }
                }
                Outcome::Neither => {}
            }
            if st.hosts.len() > HOSTS_KEPT {
                st.hosts.retain(|_, h| {
                    h.in_flight > 0
                        || h.paused.is_some_and(|(until, _, _)| until > now)
                        || h.last_used
                            .is_some_and(|t| now - t < Duration::from_secs(600))
                });
            }
        }
        self.changed.notify_waiters();
    }

    /// Requests in flight now (all hosts, and the busiest host's count).
    pub fn in_flight(&self) -> (usize, usize) {
        let st = self.lock();
        let top = st.hosts.values().map(|h| h.in_flight).max().unwrap_or(0);
        (st.in_flight, top)
    }
}

/// The time between two starts at `rate` per second (at most an hour).
fn spacing(rate: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / rate)
        .unwrap_or(Duration::MAX)
        .min(Duration::from_secs(3600))
}

/// The error a paused host's URL gets without a request: a host that asked to wait, RetryLater
/// then (not an attempt); a host that did not answer, an ordinary failure (an attempt, retried
/// with the usual backoff).
fn paused(host: &str, at: SystemTime, asked: bool) -> Error {
    let secs = at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs_f64();
    if asked {
        let m =
            format!("the host {host} asked to wait (Retry-After): not asked again for {secs:.0} s");
        Error::new(ErrorKind::RetryLater, m).retry_at(at)
    } else {
        let m = format!(
            "the host {host} did not answer {UNREACHABLE_IN_A_ROW} times in a row: not asked again for {secs:.0} s"
        );
        Error::new(ErrorKind::Io, m)
    }
}

/// When a response's `Retry-After` (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) says to
/// try again, between [`MIN_RETRY_AFTER`] and [`MAX_RETRY_AFTER`]; None when absent or
/// unreadable.
pub fn retry_after(value: Option<&str>, now: SystemTime) -> Option<SystemTime> {
    let v = value?.trim();
    let wait = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or_default()
    };
    Some(now + wait.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(Some("120"), now),
            Some(now + Duration::from_secs(120))
        );
        // no wait at all: a second (not a loop of requests)
        assert_eq!(retry_after(Some(" 0 "), now), Some(now + MIN_RETRY_AFTER));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(Some(&date), now),
            Some(now + Duration::from_secs(30))
        );
        // a date in the past: a second
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(Some(&past), now), Some(now + MIN_RETRY_AFTER));
        // capped at a day; nonsense and negatives ignored
        assert_eq!(
            retry_after(Some("99999999"), now),
            Some(now + MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(Some("-5"), now), None);
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(None, now), None);
    }

    fn limits(total: usize, per_host: usize) -> FetchLimits {
        FetchLimits {
            max_in_flight: total,
            max_per_host: per_host,
            ..FetchLimits::default()
        }
    }

    #[test]
    fn per_host_and_total_limits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g = Gate::default();
            let a1 = g.turn("a", limits(3, 2), true).await.unwrap();
            let _a2 = g.turn("a", limits(3, 2), true).await.unwrap();
            // a third to host a waits; host b still goes
            let third =
                tokio::time::timeout(Duration::from_millis(50), g.turn("a", limits(3, 2), true))
                    .await;
            assert!(third.is_err(), "a third request to one host must wait");
            let _b = g.turn("b", limits(3, 2), true).await.unwrap();
            assert_eq!(g.in_flight(), (3, 2));
            // the total is full now
            let c =
                tokio::time::timeout(Duration::from_millis(50), g.turn("c", limits(3, 2), true))
                    .await;
            assert!(c.is_err(), "the total limit holds");
            g.done(a1, Outcome::Answered);
            let _c = g.turn("c", limits(3, 2), true).await.unwrap();
        });
    }

    #[test]
    fn pauses_after_retry_after_and_unreachable() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g = Gate::default();
            let t = g.turn("a", limits(8, 8), true).await.unwrap();
            let at = SystemTime::now() + Duration::from_secs(60);
            g.done(t, Outcome::AskedToWait(at));
            let e = g.turn("a", limits(8, 8), true).await.err().unwrap();
            assert_eq!(e.kind, ErrorKind::RetryLater);
            assert_eq!(e.retry_at, Some(at));
            // other hosts are not held up
            let b = g.turn("b", limits(8, 8), true).await.unwrap();
            g.done(b, Outcome::Unreachable);
            let b = g.turn("b", limits(8, 8), true).await.unwrap();
            g.done(b, Outcome::Unreachable);
            let b = g.turn("b", limits(8, 8), true).await.unwrap();
            g.done(b, Outcome::Unreachable);
            // (an unreachable host's rows fail as usual: attempts, without a request)
            let e = g.turn("b", limits(8, 8), true).await.err().unwrap();
            assert_eq!(e.kind, ErrorKind::Io, "{}", e.message);
            assert!(e.retry_at.is_none());
            // an answer in between resets the count
            let c = g.turn("c", limits(8, 8), true).await.unwrap();
            g.done(c, Outcome::Unreachable);
            let c = g.turn("c", limits(8, 8), true).await.unwrap();
            g.done(c, Outcome::Answered);
            let c = g.turn("c", limits(8, 8), true).await.unwrap();
            g.done(c, Outcome::Unreachable);
            assert!(g.turn("c", limits(8, 8), true).await.is_ok());
        });
    }

    #[test]
    fn tiny_and_huge_rates_do_not_overflow() {
        assert_eq!(spacing(1e-30), Duration::from_secs(3600));
        assert_eq!(spacing(f64::MIN_POSITIVE), Duration::from_secs(3600));
        assert_eq!(spacing(1e6), Duration::from_micros(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g = Gate::default();
            let l = FetchLimits {
                host_rate: 1e-30,
                ..FetchLimits::default()
            };
            let t = g.turn("a", l, true).await.unwrap();
            g.done(t, Outcome::Answered);
        });
    }

    #[test]
    fn rate_spaces_starts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g = Gate::default();
            let l = FetchLimits {
                host_rate: 20.0,
                ..FetchLimits::default()
            };
            let t0 = Instant::now();
            for _ in 0..4 {
                let t = g.turn("a", l, true).await.unwrap();
                g.done(t, Outcome::Answered);
            }
            assert!(
                t0.elapsed() >= Duration::from_millis(140),
                "{:?}",
                t0.elapsed()
            );
        });
    }

    #[test]
    fn demanded_requests_go_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g = std::sync::Arc::new(Gate::default());
            let held = g.turn("a", limits(1, 1), true).await.unwrap();
            let g2 = g.clone();
            let ahead = tokio::spawn(async move {
                g2.turn("b", limits(1, 1), false)
                    .await
                    .map(|t| (t, Instant::now()))
            });
            let g3 = g.clone();
            let now = tokio::spawn(async move {
                g3.turn("c", limits(1, 1), true)
                    .await
                    .map(|t| (t, Instant::now()))
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            g.done(held, Outcome::Answered);
            let (t, when_now) = now.await.unwrap().unwrap();
            g.done(t, Outcome::Answered);
            let (t, when_ahead) = ahead.await.unwrap().unwrap();
            g.done(t, Outcome::Answered);
            assert!(when_now <= when_ahead);
        });
    }
}
