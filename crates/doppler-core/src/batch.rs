//! Many images at once: read, decode and preprocess a batch on a few threads, handed over a
//! chunk (one model run) at a time while the threads prepare the next, so decoding overlaps
//! inference. Pure Rust, no Postgres: safe off the backend's thread.

use std::sync::{Condvar, Mutex};

use crate::error::{catch_panic, Error, Result};
use crate::{decode_rgb, source, Limits, Preprocess};

/// Where one image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// An absolute path on the server, or an http(s) URL (the caller has checked the privilege
    /// to read or fetch it).
    Path(String),
    /// Image bytes.
    Bytes(Vec<u8>),
}

impl Source {
    /// How messages name this input.
    pub fn describe(&self) -> String {
        match self {
            Source::Path(p) if crate::fetch::is_url(p) => format!("image URL \"{p}\""),
            Source::Path(p) => source::describe_path(p),
            Source::Bytes(b) => source::describe_bytes(b.len()),
        }
    }
}

/// One prepared image: its input slot (`pre.slot_len()` floats) and, when asked for, its dHash.
pub type PreparedImage = Result<(Vec<f32>, Option<u64>)>;

/// How [`prepare_stream`] works: threads, chunk size, dHash.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// Threads that read, decode and resize (at least 1).
    pub threads: usize,
    /// Images handed over at a time: one model run's worth.
    pub chunk: usize,
    /// Also compute each image's dHash.
    pub want_hash: bool,
}

/// How often [`prepare_stream`] calls its `poll` while it waits for the threads.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads, decodes and preprocesses `sources` on `opts.threads` threads, in order, and hands them
/// to `consume` on the calling thread one chunk at a time (`consume(start, images)` gets
/// `sources[start..start + images.len()]`), while the threads go on preparing the next chunk.
/// So the caller's model run over chunk k overlaps the decoding of chunk k + 1, and at most about
/// three chunks of slots are alive at once. Threads are created with every signal blocked, so
/// Postgres signals stay with the calling backend. While the calling thread waits for a chunk, it
/// calls `poll` every [`POLL_INTERVAL`] (the backend checks for a cancel there). If `consume` or
/// `poll` panics (a Postgres ERROR), the threads stop after their current image and the panic
/// goes on.
pub fn prepare_stream(
    sources: &[Source],
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    opts: StreamOptions,
    mut consume: impl FnMut(usize, Vec<PreparedImage>),
    mut poll: impl FnMut(),
) {
    let n = sources.len();
    if n == 0 {
        return;
    }
    let chunk = opts.chunk.clamp(1, n);
    struct State {
        next: usize,
        /// Workers may start images below this index: the chunk being consumed plus one ahead.
        limit: usize,
        results: Vec<Option<PreparedImage>>,
        stop: bool,
    }
    let state = Mutex::new(State {
        next: 0,
        limit: (2 * chunk).min(n),
        results: (0..n).map(|_| None).collect(),
        stop: false,
    });
    let ready = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let work = || loop {
        let i = {
            let mut st = lock();
            while !st.stop && st.next < n && st.next >= st.limit {
                st = ready.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop || st.next >= n {
                return;
            }
            st.next += 1;
            st.next - 1
        };
        let r = catch_panic("preparing an image", || {
            let mut slot = vec![0f32; pre.slot_len()];
            let hash = prepare_one(&sources[i], pre, limits, policy, &mut slot, opts.want_hash)?;
            Ok((slot, hash))
        });
        lock().results[i] = Some(r);
        ready.notify_all();
    };
    /// Tells the workers to stop, also when the consumer unwinds.
    struct Stop<'a>(&'a Mutex<State>, &'a Condvar);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            self.1.notify_all();
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&state, &ready);
        crate::model::with_signals_blocked(|| {
            for _ in 0..opts.threads.clamp(1, n) {
                s.spawn(work);
            }
        });
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let images: Vec<PreparedImage> = loop {
                {
                    let mut st = lock();
                    if st.results[start..end].iter().all(Option::is_some) {
                        st.limit = (end + chunk).min(n);
                        let taken = st.results[start..end].iter_mut().map(|r| r.take());
                        break taken.map(|r| r.expect("checked above")).collect();
                    }
                    let _unused = ready
                        .wait_timeout(st, POLL_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner());
                }
                // (not holding the lock: a panic here stops the threads through `_stop`)
                poll();
            };
            ready.notify_all();
            consume(start, images);
        }
    });
}

fn prepare_one(
    src: &Source,
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    slot: &mut [f32],
    want_hash: bool,
) -> Result<Option<u64>> {
    let max_bytes = policy.max_bytes;
    let what = src.describe();
    let full = limits.full_decode();
    let limits = if want_hash { &full } else { limits };
    let img = match src {
        Source::Path(p) => decode_rgb(&source::load(p, policy)?, &what, limits)?,
        Source::Bytes(b) if b.len() as u64 > max_bytes => {
            return Err(Error::new(
                crate::ErrorKind::TooLarge,
                format!("{what} is over the limit of {max_bytes} bytes"),
            ))
        }
        Source::Bytes(b) => decode_rgb(b, &what, limits)?,
    };
    pre.write_slot(&img, slot);
    Ok(want_hash.then(|| crate::dhash::dhash(&img)))
}
