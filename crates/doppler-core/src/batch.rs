//! Many images at once: read or fetch, decode and preprocess a batch on a few threads, handed
//! over a chunk (one model run) at a time while the threads prepare the next, so decoding
//! overlaps inference, and every URL is on the network at once. Pure Rust, no Postgres: safe off
//! the backend's thread.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{catch_panic, Error, Result};
use crate::fetch::{self, Fetches, Pins, Taken, UrlPolicy, Want};
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

/// One prepared image: its input slot (`pre.slot_len()` floats) and, when asked for, its
/// fingerprints.
pub type PreparedImage = Result<(Vec<f32>, Marks)>;

/// The fingerprints of one image, from the same decode as its input slot: each one only when
/// asked for ([`StreamOptions::want_hash`], [`StreamOptions::want_pdq`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// imagehash's dHash.
    pub dhash: Option<u64>,
    /// Meta's PDQ hash and its quality.
    pub pdq: Option<crate::pdq::Pdq>,
}

/// How [`prepare_stream`] works: threads, chunk size, dHash, and whether it may leave rows whose
/// image is still on its way.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions<'a> {
    /// Threads that read, decode and resize (at least 1).
    pub threads: usize,
    /// Images handed over at a time: one model run's worth.
    pub chunk: usize,
    /// Also compute each image's dHash.
    pub want_hash: bool,
    /// Also compute each image's PDQ hash (and quality).
    pub want_pdq: bool,
    /// May end without the images still on the network ([`RELEASE_AFTER`]); else waits for all.
    pub release: bool,
    /// Whose fetches these are (a table's oid): a URL left by one stream is taken by the next
    /// stream of the same scope that wants it.
    pub scope: u64,
    /// URLs the next stream of this scope will want: asked for after this stream's own, as far
    /// as the policy's `prefetch_bytes` allows.
    pub ahead: &'a [String],
}

/// Where a stream's time went: the threads' time by stage, summed over threads (so it can exceed
/// the wall time): reading files as wall time (it waits on disks), decoding and resizing as CPU
/// time (what they cost, however long the scheduler kept them waiting); the requests of the URLs
/// it took, summed (they overlap each other and everything else); and how long the caller waited
/// for chunks (the part not overlapped).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamStats {
    /// Reading files.
    pub read: Duration,
    /// Decoding to RGB8 (CPU time).
    pub decode: Duration,
    /// Resizing and normalizing into input slots, and the fingerprints (CPU time).
    pub resize: Duration,
    /// The caller's time waiting for the next chunk.
    pub waited: Duration,
    /// The requests of the URLs taken, summed.
    pub fetch: Duration,
    /// Bytes of the URLs taken.
    pub fetched_bytes: u64,
    /// URLs taken, and how many of them had been asked for before the stream (ahead).
    pub fetched: u32,
    pub ahead: u32,
    /// Sources left because their image was still on its way.
    pub released: u32,
}

impl StreamStats {
    fn add(&mut self, o: &StreamStats) {
        self.read += o.read;
        self.decode += o.decode;
        self.resize += o.resize;
        self.waited += o.waited;
        self.fetch += o.fetch;
        self.fetched_bytes += o.fetched_bytes;
        self.fetched += o.fetched;
        self.ahead += o.ahead;
        self.released += o.released;
    }
}

/// How often [`prepare_stream`] calls its `poll` while it waits for the threads.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// With [`StreamOptions::release`], images still on the network when everything else is done are
/// waited for this long from the stream's start, and not at all when an earlier stream left them
/// already (and this one handed over something).
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Where one source stands.
enum Slot {
    /// A file or bytes to read and decode.
    Ready,
    /// A URL not asked for yet (beyond the window of URLs asked for at once).
    Queued,
    /// A URL asked for; `left`: an earlier stream left it on its way.
    Fetching {
        left: bool,
    },
    /// A URL whose answer has come (for another source with the same URL).
    Answered(Taken),
    /// On a thread.
    Busy,
    Prepared(PreparedImage),
    Taken,
}

struct State {
    slots: Vec<Slot>,
    busy: usize,
    prepared: usize,
    stop: bool,
    stats: StreamStats,
    /// The URLs this stream waits for (unpinned when the stream ends).
    pins: Pins,
}

/// What a thread does next.
enum Next {
    Job(usize, Option<Taken>),
    /// Wait: for an answer from the network (`true`), or for the caller to take images.
    Wait(bool),
    Nothing,
}

impl State {
    fn count(&self, f: impl Fn(&Slot) -> bool) -> usize {
        self.slots.iter().filter(|s| f(s)).count()
    }

    /// Asks for queued URLs while fewer than `window` are on the network (a URL several sources
    /// share is asked for once).
    fn top_up(&mut self, sources: &[Source], policy: Option<&UrlPolicy>, window: usize) {
        let Some(policy) = policy else { return };
        let mut asked = self.count(|s| matches!(s, Slot::Fetching { .. }));
        for i in 0..self.slots.len() {
            if asked >= window {
                break;
            }
            if !matches!(self.slots[i], Slot::Queued) {
                continue;
            }
            let url = url_of(&sources[i]);
            let twin = (0..self.slots.len()).find_map(|j| match self.slots[j] {
                Slot::Fetching { left } if url_of(&sources[j]) == url => Some(left),
                _ => None,
            });
            let left = match twin {
                Some(left) => left,
                None => {
                    asked += 1;
                    self.pins.want(url, policy) == Want::Left
                }
            };
            self.slots[i] = Slot::Fetching { left };
        }
    }

    /// The first source a thread may start: a file or bytes, or a URL whose answer has come;
    /// none while `ahead` images are prepared or on threads (memory: slots the caller has not
    /// taken). A URL whose fetch is gone is asked for again.
    fn next(
        &mut self,
        sources: &[Source],
        scope: u64,
        policy: Option<&UrlPolicy>,
        ahead: usize,
    ) -> Next {
        if self.prepared + self.busy >= ahead {
            return Next::Wait(false);
        }
        let mut fetching = false;
        for i in 0..self.slots.len() {
            match &self.slots[i] {
                Slot::Ready => return Next::Job(i, None),
                Slot::Answered(_) => match std::mem::replace(&mut self.slots[i], Slot::Busy) {
                    Slot::Answered(t) => return Next::Job(i, Some(t)),
                    _ => unreachable!(),
                },
                Slot::Queued => fetching = true,
                Slot::Fetching { .. } => {
                    let url = url_of(&sources[i]);
                    let f = Fetches::get();
                    if let Some(policy) = policy.filter(|p| !f.knows(scope, url, p)) {
                        self.pins.want(url, policy);
                    }
                    if let Some(t) = f.take(scope, url) {
                        // sources with the same URL share its answer
                        for (slot, src) in self.slots.iter_mut().zip(sources).skip(i + 1) {
                            if matches!(slot, Slot::Fetching { .. }) && url_of(src) == url {
                                *slot = Slot::Answered(t.copy());
                            }
                        }
                        return Next::Job(i, Some(t));
                    }
                    fetching = true;
                }
                _ => {}
            }
        }
        if fetching {
            Next::Wait(true)
        } else {
            Next::Nothing
        }
    }
}

fn url_of(s: &Source) -> &str {
    match s {
        Source::Path(p) => p,
        Source::Bytes(_) => "",
    }
}

/// What the caller does next.
enum Step {
    Hand(Vec<usize>),
    Release(Vec<usize>),
    Wait,
    End,
}

/// Reads, fetches, decodes and preprocesses `sources` on `opts.threads` threads and hands them to
/// `consume` on the calling thread one chunk at a time (`consume(rows, images)`: `images[k]` is
/// `sources[rows[k]]`), in the order they are ready, while the threads go on preparing the next.
/// So the caller's model run over one chunk overlaps the decoding of the next, and at most about
/// three chunks of slots are alive at once. The first chunk is a quarter of the others (at least
/// one image): nothing overlaps its decoding, so the model starts after a few images.
///
/// Every URL is asked for at once ([`Fetches::want`], under `policy`): the requests wait on the
/// network together, not one per thread; a thread takes a URL's image when its answer has come. A
/// chunk is handed over early when everything else waits on the network. With `opts.release`,
/// images still on the network when everything else is done are left (see [`RELEASE_AFTER`]):
/// their requests go on, and the next stream of `opts.scope` takes their answers.
///
/// Threads are created with every signal blocked, so Postgres signals stay with the calling
/// backend. While the calling thread waits, it calls `poll` every [`POLL_INTERVAL`] (the backend
/// checks for a cancel there). If `consume` or `poll` panics (a Postgres ERROR), the threads stop
/// after their current image and the panic goes on; requests in flight go on, their answers kept
/// for a while. Returns where the time went, and the sources left.
pub fn prepare_stream(
    sources: &[Source],
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    opts: StreamOptions<'_>,
    mut consume: impl FnMut(Vec<usize>, Vec<PreparedImage>),
    mut poll: impl FnMut(),
) -> (StreamStats, Vec<usize>) {
    if sources.is_empty() {
        return (StreamStats::default(), Vec::new());
    }
    let stream = Stream::start(sources, pre, limits, policy, opts);
    let mut stats = StreamStats::default();
    let mut released = Vec::new();
    std::thread::scope(|s| {
        let _stop = Stop(&stream.state, &stream.ready);
        crate::model::with_signals_blocked(|| {
            for _ in 0..opts.threads.clamp(1, sources.len()) {
                s.spawn(|| stream.work());
            }
        });
        let mut handed = false;
        loop {
            let waiting = Instant::now();
            let rows = loop {
                {
                    let mut st = stream.lock();
                    match stream.step(&st, handed) {
                        Step::Hand(rows) => break Some(stream.take(&mut st, rows)),
                        Step::End => break None,
                        Step::Release(rows) => {
                            released = rows;
                            break None;
                        }
                        Step::Wait => {
                            let _unused = stream
                                .ready
                                .wait_timeout(st, POLL_INTERVAL)
                                .unwrap_or_else(|p| p.into_inner());
                        }
                    }
                }
                // (not holding the lock: a panic here stops the threads through `_stop`)
                poll();
            };
            stats.waited += waiting.elapsed();
            let Some((rows, images)) = rows else { break };
            stream.ready.notify_all();
            handed = true;
            consume(rows, images);
        }
    });
    let threads = stream
        .state
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .stats;
    stats.add(&threads);
    stats.released = released.len() as u32;
    (stats, released)
}

/// Tells the threads to stop, also when the caller unwinds.
struct Stop<'a>(&'a Mutex<State>, &'a Condvar);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.1.notify_all();
    }
}

/// One [`prepare_stream`]: its sources, settings and shared state.
struct Stream<'a> {
    sources: &'a [Source],
    pre: &'a Preprocess,
    limits: &'a Limits,
    policy: &'a source::SourcePolicy,
    opts: StreamOptions<'a>,
    started: Instant,
    /// Images per chunk, the first chunk's, and how many may be prepared or on threads at once.
    chunk: usize,
    first: usize,
    ahead: usize,
    fetches: &'static Fetches,
    /// The URL policy (None: URLs are off), and how many URLs may be on the network at once.
    url_policy: Option<UrlPolicy>,
    window: usize,
    state: Mutex<State>,
    ready: Condvar,
}

impl<'a> Stream<'a> {
    /// Asks for every URL (then for the lookahead's), and sets the sources out.
    fn start(
        sources: &'a [Source],
        pre: &'a Preprocess,
        limits: &'a Limits,
        policy: &'a source::SourcePolicy,
        opts: StreamOptions<'a>,
    ) -> Stream<'a> {
        let chunk = opts.chunk.clamp(1, sources.len());
        let fetches = Fetches::get();
        let url_policy = policy.url_policy();
        if let Some(u) = &url_policy {
            fetches.set_budget(u);
        }
        let slots = sources
            .iter()
            .map(|s| match (s, &url_policy) {
                (Source::Path(p), Some(_)) if fetch::is_url(p) => Slot::Queued,
                _ => Slot::Ready,
            })
            .collect();
        let ahead = (2 * chunk).max(opts.threads);
        // (the answers a stream waits for are pinned: it asks for a window of them at a time)
        let window = ahead + url_policy.as_ref().map_or(0, |u| u.limits.max_in_flight);
        let mut state = State {
            slots,
            busy: 0,
            prepared: 0,
            stop: false,
            stats: StreamStats::default(),
            pins: Pins::new(opts.scope),
        };
        state.top_up(sources, url_policy.as_ref(), window);
        if let Some(u) = &url_policy {
            fetches.prefetch(opts.scope, opts.ahead, u);
        }
        Stream {
            sources,
            pre,
            limits,
            policy,
            opts,
            started: Instant::now(),
            chunk,
            first: (chunk / 4).max(1),
            ahead,
            fetches,
            url_policy,
            window,
            state: Mutex::new(state),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A thread: takes the next source it may start, prepares it, until none is left or the
    /// stream stops.
    fn work(&self) {
        let mut mine = StreamStats::default();
        loop {
            let seen = self.fetches.answers();
            let (i, taken) = {
                let mut st = self.lock();
                if st.stop {
                    break;
                }
                let policy = self.url_policy.as_ref();
                st.top_up(self.sources, policy, self.window);
                match st.next(self.sources, self.opts.scope, policy, self.ahead) {
                    Next::Job(i, taken) => {
                        st.slots[i] = Slot::Busy;
                        st.busy += 1;
                        (i, taken)
                    }
                    Next::Wait(true) => {
                        drop(st);
                        self.fetches.wait(seen, POLL_INTERVAL);
                        continue;
                    }
                    Next::Wait(false) => {
                        let _unused = self
                            .ready
                            .wait_timeout(st, POLL_INTERVAL)
                            .unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    Next::Nothing => break,
                }
            };
            if let Some(t) = &taken {
                mine.fetch += t.took;
                mine.fetched += 1;
                mine.ahead += t.ahead as u32;
                mine.fetched_bytes += t.body.as_ref().map_or(0, |b| b.len() as u64);
            }
            let r = catch_panic("preparing an image", || {
                let mut slot = vec![0f32; self.pre.slot_len()];
                let marks = prepare_one(
                    &self.sources[i],
                    taken.map(|t| t.body),
                    (self.pre, self.limits, self.policy),
                    &mut slot,
                    (self.opts.want_hash, self.opts.want_pdq),
                    &mut mine,
                )?;
                Ok((slot, marks))
            });
            let mut st = self.lock();
            st.slots[i] = Slot::Prepared(r);
            st.busy -= 1;
            st.prepared += 1;
            drop(st);
            self.ready.notify_all();
        }
        self.lock().stats.add(&mine);
        self.ready.notify_all();
    }

    /// What the caller does next: hand over a chunk (a whole one, or what there is when everything
    /// else waits on the network), leave what is on the network, wait, or end.
    fn step(&self, st: &State, handed: bool) -> Step {
        let want = if handed { self.chunk } else { self.first };
        let todo = st.count(|s| matches!(s, Slot::Ready | Slot::Answered(_))) + st.busy;
        // (a URL not asked for yet waits behind the network too: it is left with the others)
        let on_network: Vec<(usize, bool)> = st
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Fetching { left } => Some((i, *left)),
                Slot::Queued => Some((i, false)),
                _ => None,
            })
            .collect();
        // (an answer that has come but no thread took yet is not on the network)
        let only_network = todo == 0
            && on_network.iter().all(|(i, _)| {
                !self
                    .fetches
                    .answered(self.opts.scope, url_of(&self.sources[*i]))
            });
        if st.prepared >= want || (st.prepared > 0 && only_network) {
            let rows = st
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, Slot::Prepared(_)))
                .map(|(i, _)| i)
                .take(want)
                .collect();
            return Step::Hand(rows);
        }
        if st.prepared == 0 && todo == 0 && on_network.is_empty() {
            return Step::End;
        }
        let leave = self.opts.release
            && st.prepared == 0
            && only_network
            && (self.started.elapsed() >= RELEASE_AFTER
                || handed && on_network.iter().all(|(_, left)| *left));
        if leave {
            return Step::Release(on_network.iter().map(|(i, _)| *i).collect());
        }
        Step::Wait
    }

    /// Takes the prepared images of `rows` out of the state.
    fn take(&self, st: &mut State, rows: Vec<usize>) -> (Vec<usize>, Vec<PreparedImage>) {
        let images = rows
            .iter()
            .map(
                |&i| match std::mem::replace(&mut st.slots[i], Slot::Taken) {
                    Slot::Prepared(r) => r,
                    _ => unreachable!("handed rows are prepared"),
                },
            )
            .collect();
        st.prepared -= rows.len();
        (rows, images)
    }
}

fn prepare_one(
    src: &Source,
    fetched: Option<Result<Vec<u8>>>,
    (pre, limits, policy): (&Preprocess, &Limits, &source::SourcePolicy),
    slot: &mut [f32],
    (want_hash, want_pdq): (bool, bool),
    stats: &mut StreamStats,
) -> Result<Marks> {
    let max_bytes = policy.max_bytes;
    let what = src.describe();
    // (a reduced-DCT decode would change the fingerprints)
    let full = limits.full_decode();
    let limits = if want_hash || want_pdq { &full } else { limits };
    let loaded;
    let bytes: &[u8] = match (src, fetched) {
        (_, Some(body)) => {
            loaded = body?;
            &loaded
        }
        (Source::Path(p), None) => {
            let t0 = Instant::now();
            let r = source::load(p, policy);
            stats.read += t0.elapsed();
            loaded = r?;
            &loaded
        }
        (Source::Bytes(b), None) if b.len() as u64 > max_bytes => {
            return Err(Error::new(
                crate::ErrorKind::TooLarge,
                format!("{what} is over the limit of {max_bytes} bytes"),
            ))
        }
        (Source::Bytes(b), None) => b,
    };
    let t1 = thread_cpu();
    let img = decode_rgb(bytes, &what, limits);
    let t2 = thread_cpu();
    stats.decode += t2.saturating_sub(t1);
    let img = img?;
    pre.write_slot(&img, slot);
    let marks = Marks {
        dhash: want_hash.then(|| crate::dhash::dhash(&img)),
        pdq: want_pdq.then(|| crate::pdq::pdq(&img)),
    };
    stats.resize += thread_cpu().saturating_sub(t2);
    Ok(marks)
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
