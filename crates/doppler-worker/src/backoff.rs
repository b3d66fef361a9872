//! Waits that grow: reconnecting (1 s doubling to 30 s) and the idle wait between empty claims
//! (the poll interval doubling to 10×), back to the start after a success.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            next: first,
        }
    }

    /// The wait now; the one after is twice as long, up to the maximum.
    pub fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(self.max);
        now
    }

    /// The wait `next` would give, without moving on.
    pub fn peek(&self) -> Duration {
        self.next
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_maximum_and_resets() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(1), s(30));
        let waits: Vec<u64> = (0..7).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.peek(), s(1));
        let mut idle = Backoff::new(Duration::from_millis(2000), Duration::from_millis(20_000));
        let waits: Vec<u128> = (0..6).map(|_| idle.next().as_millis()).collect();
        assert_eq!(waits, [2000, 4000, 8000, 16000, 20000, 20000]);
    }
}
