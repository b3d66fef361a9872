//! The process's fetches: every URL a caller wants is requested on the fetch runtime (through
//! the [`Gate`]), and its answer waits here until the caller takes it. A fill asks for its batch's
//! URLs ([`Fetches::want`]) and for the next batch's ([`Fetches::prefetch`]), so the model does
//! not wait on the network; a URL still on its way when a batch ends stays here for the batch that
//! claims its row again.
//!
//! Fetches are keyed by a scope (the table, or one caller's call) and the URL, and remember the
//! policy they ran under: a caller under another policy gets a fetch of its own. A fetch a caller
//! waits for is pinned (until it is taken, or the caller's [`Pins`] are dropped): it is never
//! dropped. Memory is bounded: a caller asks for a window of its URLs at a time; lookahead starts
//! only while unpinned answers hold less than `prefetch_bytes`; unpinned answers nobody took are
//! dropped after [`KEPT`] or, oldest first, beyond the budget (at least [`MIN_HELD`] and one
//! image); a body is capped by the policy's byte limit.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::client::{self, Got};
use super::hosts::{Gate, Outcome};
use super::policy::UrlPolicy;
use crate::error::{Error, ErrorKind, Result};

/// How long an answer nobody takes is kept.
pub const KEPT: Duration = Duration::from_secs(120);
/// Answers kept even when lookahead is off (the rows a batch left for the next).
pub const MIN_HELD: u64 = 16 << 20;

/// A fetch's answer, taken.
pub struct Taken {
    pub body: Result<Vec<u8>>,
    /// How long its request took (from its turn to the last byte).
    pub took: Duration,
    /// It was asked for ahead of the batch that took it.
    pub ahead: bool,
}

impl Taken {
    /// The same answer, for another source with the same URL.
    pub fn copy(&self) -> Taken {
        Taken {
            body: match &self.body {
                Ok(b) => Ok(b.clone()),
                Err(e) => Err(e.copy()),
            },
            took: self.took,
            ahead: self.ahead,
        }
    }
}

struct Fetch {
    id: u64,
    policy: String,
    /// A batch wants it now (its requests go before lookahead).
    wanted: bool,
    /// Asked for by a lookahead.
    ahead: bool,
    /// Callers waiting for it: never dropped while there are any.
    pins: u32,
    done: Option<(Got, Instant)>,
}

#[derive(Default)]
struct State {
    fetches: HashMap<(u64, String), Fetch>,
    next_id: u64,
    /// Bytes of answers waiting to be taken.
    held: u64,
    /// Moves on every answer (waiters compare it).
    answers: u64,
}

/// The fetches of this process.
pub struct Fetches {
    state: Mutex<State>,
    answered: Condvar,
    gate: Arc<Gate>,
}

/// Whether a wanted URL's fetch is new, or was asked for before: by a lookahead, or by a batch
/// that left its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Started,
    Ahead,
    Left,
}

impl Fetches {
    /// The process's fetches.
    pub fn get() -> &'static Fetches {
        static FETCHES: OnceLock<Fetches> = OnceLock::new();
        FETCHES.get_or_init(|| Fetches {
            state: Mutex::new(State::default()),
            answered: Condvar::new(),
            gate: Arc::new(Gate::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight in this process now: all hosts, and the busiest host.
    pub fn in_flight(&self) -> (usize, usize) {
        self.gate.in_flight()
    }

    /// Asks for `url` now (unless it was asked for under the same policy already).
    pub fn want(&'static self, scope: u64, url: &str, policy: &UrlPolicy) -> Want {
        let key = (scope, url.to_string());
        let pkey = policy_key(policy);
        let mut st = self.lock();
        if let Some(f) = st.fetches.get_mut(&key) {
            if f.policy == pkey {
                let was = if f.wanted { Want::Left } else { Want::Ahead };
                f.wanted = true;
                f.pins += 1;
                return was;
            }
        }
        self.start(&mut st, key, pkey, policy, true);
        Want::Started
    }

    /// A caller no longer waits for `url` (it left it, or stopped): the answer may be dropped
    /// after [`KEPT`] or beyond the budget.
    pub fn unpin(&self, scope: u64, url: &str) {
        if let Some(f) = self.lock().fetches.get_mut(&(scope, url.to_string())) {
            f.pins = f.pins.saturating_sub(1);
        }
    }

    /// Whether a fetch of `url` under `policy` is here (on its way or answered): one that is gone
    /// (or ran under another policy) must be asked for again.
    pub fn knows(&self, scope: u64, url: &str, policy: &UrlPolicy) -> bool {
        let pkey = policy_key(policy);
        self.lock()
            .fetches
            .get(&(scope, url.to_string()))
            .is_some_and(|f| f.policy == pkey)
    }

    /// Asks for `urls` ahead of the batch that will need them, as far as `prefetch_bytes` allows.
    pub fn prefetch(&'static self, scope: u64, urls: &[String], policy: &UrlPolicy) {
        let budget = policy.limits.prefetch_bytes;
        if budget == 0 {
            return;
        }
        let pkey = policy_key(policy);
        let mut st = self.lock();
        let cap = 4 * policy.limits.max_in_flight.max(1);
        let mut ahead = st
            .fetches
            .values()
            .filter(|f| f.ahead && f.done.is_none())
            .count();
        for url in urls {
            if unpinned(&st) >= budget || ahead >= cap {
                break;
            }
            let key = (scope, url.clone());
            if st.fetches.get(&key).is_some_and(|f| f.policy == pkey) {
                continue;
            }
            self.start(&mut st, key, pkey.clone(), policy, false);
            ahead += 1;
        }
    }

    fn start(
        &'static self,
        st: &mut State,
        key: (u64, String),
        pkey: String,
        policy: &UrlPolicy,
        wanted: bool,
    ) {
        st.next_id += 1;
        let id = st.next_id;
        if let Some(old) = st.fetches.insert(
            key.clone(),
            Fetch {
                id,
                policy: pkey,
                wanted,
                ahead: !wanted,
                pins: wanted as u32,
                done: None,
            },
        ) {
            st.held -= held_by(&old);
        }
        let policy = policy.clone();
        let spawned = client::runtime().map(|rt| {
            self.sweeping(rt);
            rt.spawn(async move {
                // (the request in a task of its own: a panic in it is an answer too)
                let k = key.clone();
                let got = tokio::spawn(async move { self.request(&k, id, &policy, wanted).await })
                    .await
                    .unwrap_or_else(|e| Got {
                        body: Err(Error::new(
                            ErrorKind::Internal,
                            format!("internal error while fetching an image URL: {e}"),
                        )),
                        host: Outcome::Neither,
                        took: Duration::ZERO,
                    });
                self.answer(key, id, got);
            })
        });
        if let Err(e) = spawned {
            let got = Got {
                body: Err(e),
                host: Outcome::Neither,
                took: Duration::ZERO,
            };
            if let Some(f) = st.fetches.values_mut().find(|f| f.id == id) {
                f.done = Some((got, Instant::now()));
            }
        }
    }

    /// Whether fetch `id` of `url` is still wanted (not dropped, not replaced under another
    /// policy): a request that waited for its turn is not sent for nobody.
    fn still_wanted(&self, key: &(u64, String), id: u64) -> bool {
        self.lock().fetches.get(key).is_some_and(|f| f.id == id)
    }

    async fn request(&self, key: &(u64, String), id: u64, policy: &UrlPolicy, wanted: bool) -> Got {
        let url = key.1.as_str();
        let failed = |body| Got {
            body: Err(body),
            host: Outcome::Neither,
            took: Duration::ZERO,
        };
        let parsed = match super::checked(url, policy) {
            Ok(u) => u,
            Err(e) => return failed(e),
        };
        let client = match client::client(policy) {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        let host = super::authority(&parsed);
        let turn = match self.gate.turn(&host, policy.limits, wanted).await {
            Ok(t) => t,
            Err(e) => {
                return failed(Error {
                    message: format!("image URL \"{url}\" not fetched: {}", e.message),
                    ..e
                })
            }
        };
        if !self.still_wanted(key, id) {
            self.gate.done(turn, Outcome::Neither);
            return failed(Error::new(ErrorKind::Internal, "no longer wanted"));
        }
        let got = client::get(&client, parsed, policy).await;
        // (the connection goes back to the client's pool in a task of its own: let it run, so
        // that the next request to the host finds it idle instead of opening another)
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.gate.done(turn, got.host);
        got
    }

    fn answer(&self, key: (u64, String), id: u64, got: Got) {
        let mut st = self.lock();
        if let Some(f) = st.fetches.get_mut(&key).filter(|f| f.id == id) {
            let n = got.body.as_ref().map_or(0, |b| b.len() as u64);
            f.done = Some((got, Instant::now()));
            st.held += n;
        }
        st.answers += 1;
        self.sweep(&mut st);
        drop(st);
        self.answered.notify_all();
    }

    /// Sweeps every [`KEPT`] / 4 on the fetch runtime (started with the first fetch): an idle
    /// backend (a pooled connection after a fill) does not keep the answers nobody took.
    fn sweeping(&'static self, rt: &tokio::runtime::Runtime) {
        static STARTED: std::sync::Once = std::sync::Once::new();
        STARTED.call_once(|| {
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(KEPT / 4).await;
                    self.sweep(&mut self.lock());
                }
            });
        });
    }

    /// Drops the unpinned answers nobody took: after [`KEPT`], or oldest first while they hold
    /// more than the budget.
    fn sweep(&self, st: &mut State) {
        let now = Instant::now();
        let budget = MIN_HELD.max(self.prefetch_budget());
        let mut stale: Vec<(Instant, (u64, String))> = st
            .fetches
            .iter()
            .filter(|(_, f)| f.pins == 0)
            .filter_map(|(k, f)| f.done.as_ref().map(|(_, at)| (*at, k.clone())))
            .collect();
        stale.sort();
        let mut over = unpinned(st).saturating_sub(budget);
        for (at, k) in stale {
            if now - at < KEPT && over == 0 {
                break;
            }
            if let Some(f) = st.fetches.remove(&k) {
                let n = held_by(&f);
                st.held -= n;
                over = over.saturating_sub(n);
            }
        }
    }

    fn prefetch_budget(&self) -> u64 {
        PREFETCH_BUDGET.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remembers the lookahead budget (the answers kept may use it; at least one image).
    pub fn set_budget(&self, policy: &UrlPolicy) {
        PREFETCH_BUDGET.store(
            policy.limits.prefetch_bytes.max(policy.max_bytes),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The answer for `url` if it has come (and forgets the fetch).
    pub fn take(&self, scope: u64, url: &str) -> Option<Taken> {
        let mut st = self.lock();
        let key = (scope, url.to_string());
        st.fetches.get(&key)?.done.as_ref()?;
        let f = st.fetches.remove(&key)?;
        st.held -= held_by(&f);
        let (got, _) = f.done?;
        Some(Taken {
            body: got.body,
            took: got.took,
            ahead: f.ahead,
        })
    }

    /// Whether the answer for `url` has come (and is not taken yet).
    pub fn answered(&self, scope: u64, url: &str) -> bool {
        self.lock()
            .fetches
            .get(&(scope, url.to_string()))
            .is_some_and(|f| f.done.is_some())
    }

    /// A number that moves on every answer: [`Fetches::wait`] returns when it has moved.
    pub fn answers(&self) -> u64 {
        self.lock().answers
    }

    /// Waits until an answer comes after `seen` ([`Fetches::answers`]), or `timeout`.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let st = self.lock();
        if st.answers == seen {
            let _unused = self
                .answered
                .wait_timeout_while(st, timeout, |s| s.answers == seen)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Fetches `url` now and waits for it, calling `poll` every `every` while it waits (the
    /// backend checks for a cancel there; the request goes on and its answer is dropped).
    pub fn fetch_polled(
        &'static self,
        url: &str,
        policy: &UrlPolicy,
        every: Duration,
        mut poll: impl FnMut(),
    ) -> Result<Vec<u8>> {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // a scope of its own: nobody else takes this answer
        let scope = (1 << 63) | CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.set_budget(policy);
        let mut pins = Pins::new(scope);
        pins.want(url, policy);
        loop {
            let seen = self.answers();
            if !self.knows(scope, url, policy) {
                pins.want(url, policy);
            }
            if let Some(t) = self.take(scope, url) {
                return t.body;
            }
            self.wait(seen, every);
            poll();
        }
    }
}

static PREFETCH_BUDGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The fetches one caller wants, unpinned when it drops them (done, left, or unwinding).
pub struct Pins {
    scope: u64,
    urls: Vec<String>,
}

impl Pins {
    pub fn new(scope: u64) -> Pins {
        Pins {
            scope,
            urls: Vec::new(),
        }
    }

    /// [`Fetches::want`], pinned until this is dropped.
    pub fn want(&mut self, url: &str, policy: &UrlPolicy) -> Want {
        self.urls.push(url.to_string());
        Fetches::get().want(self.scope, url, policy)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let f = Fetches::get();
        for url in &self.urls {
            f.unpin(self.scope, url);
        }
    }
}

/// What identifies the policy an answer was fetched under.
fn policy_key(policy: &UrlPolicy) -> String {
    format!("{}|{}", policy.client_key(), policy.max_bytes)
}

/// Bytes of answers nobody waits for.
fn unpinned(st: &State) -> u64 {
    st.fetches
        .values()
        .filter(|f| f.pins == 0)
        .map(held_by)
        .sum()
}

fn held_by(f: &Fetch) -> u64 {
    match &f.done {
        Some((g, _)) => g.body.as_ref().map_or(0, |b| b.len() as u64),
        None => 0,
    }
}
