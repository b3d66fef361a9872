//! Many images at once: read, decode and preprocess a batch on a few threads, handed over a
//! chunk (one model run) at a time while the threads prepare the next, so decoding overlaps
//! inference. Pure Rust, no Postgres: safe off the backend's thread.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Where a stream's time went: the threads' time by stage, summed over threads (so it can exceed
/// the wall time): reading as wall time (it waits on disks and networks), decoding and resizing as
/// CPU time (what they cost, however long the scheduler kept them waiting); and how long the
/// caller waited for chunks (the part not overlapped).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamStats {
    /// Reading files or fetching URLs.
    pub read: Duration,
    /// Decoding to RGB8 (CPU time).
    pub decode: Duration,
    /// Resizing and normalizing into input slots, and the dHash (CPU time).
    pub resize: Duration,
    /// The caller's time waiting for the next chunk.
    pub waited: Duration,
}

impl StreamStats {
    fn add(&mut self, o: &StreamStats) {
        self.read += o.read;
        self.decode += o.decode;
        self.resize += o.resize;
        self.waited += o.waited;
    }
}

/// How often [`prepare_stream`] calls its `poll` while it waits for the threads.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads, decodes and preprocesses `sources` on `opts.threads` threads, in order, and hands them
/// to `consume` on the calling thread one chunk at a time (`consume(start, images)` gets
/// `sources[start..start + images.len()]`), while the threads go on preparing the next chunk.
/// So the caller's model run over chunk k overlaps the decoding of chunk k + 1, and at most about
/// three chunks of slots are alive at once. The first chunk is a quarter of the others (at least
/// one image): nothing overlaps its decoding, so the model starts after a few images, not a whole
/// chunk's worth. Threads are created with every signal blocked, so
/// Postgres signals stay with the calling backend. While the calling thread waits for a chunk, it
/// calls `poll` every [`POLL_INTERVAL`] (the backend checks for a cancel there). If `consume` or
/// `poll` panics (a Postgres ERROR), the threads stop after their current image and the panic
/// goes on. Returns where the time went.
pub fn prepare_stream(
    sources: &[Source],
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    opts: StreamOptions,
    mut consume: impl FnMut(usize, Vec<PreparedImage>),
    mut poll: impl FnMut(),
) -> StreamStats {
    let n = sources.len();
    let mut stats = StreamStats::default();
    if n == 0 {
        return stats;
    }
    let chunk = opts.chunk.clamp(1, n);
    // chunk boundaries: [0, first), then `chunk` at a time
    let first = (chunk / 4).max(1);
    let bounds: Vec<usize> = std::iter::once(0)
        .chain((first..n).step_by(chunk))
        .chain(std::iter::once(n))
        .collect();
    let end_of = |k: usize| bounds[(k + 1).min(bounds.len() - 1)];
    struct State {
        next: usize,
        /// Workers may start images below this index: the chunk being consumed plus one ahead.
        limit: usize,
        results: Vec<Option<PreparedImage>>,
        stop: bool,
        stats: StreamStats,
    }
    let state = Mutex::new(State {
        next: 0,
        limit: end_of(1),
        results: (0..n).map(|_| None).collect(),
        stop: false,
        stats: StreamStats::default(),
    });
    let ready = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let work = || {
        let mut mine = StreamStats::default();
        loop {
            let i = {
                let mut st = lock();
                while !st.stop && st.next < n && st.next >= st.limit {
                    st = ready.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop || st.next >= n {
                    st.stats.add(&mine);
                    return;
                }
                st.next += 1;
                st.next - 1
            };
            let r = catch_panic("preparing an image", || {
                let mut slot = vec![0f32; pre.slot_len()];
                let hash = prepare_one(
                    &sources[i],
                    pre,
                    limits,
                    policy,
                    &mut slot,
                    opts.want_hash,
                    &mut mine,
                )?;
                Ok((slot, hash))
            });
            lock().results[i] = Some(r);
            ready.notify_all();
        }
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
        for k in 0..bounds.len() - 1 {
            let (start, end) = (bounds[k], bounds[k + 1]);
            let waiting = Instant::now();
            let images: Vec<PreparedImage> = loop {
                {
                    let mut st = lock();
                    if st.results[start..end].iter().all(Option::is_some) {
                        st.limit = end_of(k + 1);
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
            stats.waited += waiting.elapsed();
            ready.notify_all();
            consume(start, images);
        }
    });
    let threads = state.into_inner().unwrap_or_else(|p| p.into_inner()).stats;
    stats.add(&threads);
    stats
}

fn prepare_one(
    src: &Source,
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    slot: &mut [f32],
    want_hash: bool,
    stats: &mut StreamStats,
) -> Result<Option<u64>> {
    let max_bytes = policy.max_bytes;
    let what = src.describe();
    let full = limits.full_decode();
    let limits = if want_hash { &full } else { limits };
    let t0 = Instant::now();
    let loaded;
    let bytes: &[u8] = match src {
        Source::Path(p) => {
            let r = source::load(p, policy);
            stats.read += t0.elapsed();
            loaded = r?;
            &loaded
        }
        Source::Bytes(b) if b.len() as u64 > max_bytes => {
            return Err(Error::new(
                crate::ErrorKind::TooLarge,
                format!("{what} is over the limit of {max_bytes} bytes"),
            ))
        }
        Source::Bytes(b) => b,
    };
    let t1 = thread_cpu();
    let img = decode_rgb(bytes, &what, limits);
    let t2 = thread_cpu();
    stats.decode += t2.saturating_sub(t1);
    let img = img?;
    pre.write_slot(&img, slot);
    let hash = want_hash.then(|| crate::dhash::dhash(&img));
    stats.resize += thread_cpu().saturating_sub(t2);
    Ok(hash)
}

/// The calling thread's CPU time so far (zero where it cannot be read).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
