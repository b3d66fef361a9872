//! SIGTERM and SIGINT: the first asks the worker to stop claiming, finish (write) the batch in
//! hand, unregister and exit 0; the second to give the batch in hand back (roll back) and exit
//! at once. signal-hook's handler only writes to a pipe; a thread of ours counts the signals and
//! wakes whoever waits (an idle wait between claims, a reconnect's backoff), so no work is done
//! in a signal handler, whichever thread the kernel picks to run it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::log;

#[derive(Default)]
pub struct Shutdown {
    signals: AtomicUsize,
    lock: Mutex<()>,
    woken: Condvar,
}

impl Shutdown {
    /// Installs the handlers and the thread that counts the signals.
    pub fn install() -> std::io::Result<Arc<Shutdown>> {
        let me = Arc::new(Shutdown::default());
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let counter = Arc::clone(&me);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let n = counter.trigger();
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    let what = if n == 1 {
                        "finishing the batch in hand, then exiting"
                    } else {
                        "rolling back the batch in hand, exiting"
                    };
                    log::info("signal")
                        .field("signal", name)
                        .field("action", what)
                        .emit();
                }
            })?;
        Ok(me)
    }

    /// Counts one stop request and wakes the waiters; returns how many there were.
    pub fn trigger(&self) -> usize {
        let n = self.signals.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.woken.notify_all();
        n
    }

    /// Stop claiming (one signal or more).
    pub fn requested(&self) -> bool {
        self.signals.load(Ordering::SeqCst) >= 1
    }

    /// Give the batch in hand back (a second signal).
    pub fn aborted(&self) -> bool {
        self.signals.load(Ordering::SeqCst) >= 2
    }

    /// Waits `d`, or less when a stop is requested; returns whether one is.
    pub fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.requested() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .woken
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_early_on_a_stop() {
        let s = Arc::new(Shutdown::default());
        let t0 = Instant::now();
        assert!(!s.wait(Duration::from_millis(30)));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        let s2 = Arc::clone(&s);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.trigger()
        });
        let t0 = Instant::now();
        assert!(s.wait(Duration::from_secs(30)));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(waker.join().unwrap(), 1);
        assert!(s.requested() && !s.aborted());
        assert_eq!(s.trigger(), 2);
        assert!(s.aborted());
    }
}
