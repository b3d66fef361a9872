//! Many images at once: read, decode and preprocess a batch on a few threads, into one batch
//! tensor ready for [`crate::Model::run`]. Pure Rust, no Postgres: safe off the backend's thread.

use std::sync::Mutex;

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

/// A prepared batch: the input tensor holds `ok.len()` slots, in the order of `ok`
/// (indices into the sources); `errors` holds the rest, by index. With `want_hash`, `hashes[i]`
/// is the dHash of source `i` (None where it could not be decoded).
pub struct Prepared {
    pub tensor: Vec<f32>,
    pub ok: Vec<usize>,
    pub errors: Vec<(usize, Error)>,
    pub hashes: Vec<Option<u64>>,
}

impl Prepared {
    /// The input slot of source `i`, if it was prepared.
    pub fn slot(&self, i: usize, slot_len: usize) -> Option<&[f32]> {
        let n = self.ok.iter().position(|&j| j == i)?;
        Some(&self.tensor[n * slot_len..(n + 1) * slot_len])
    }
}

/// Reads, decodes and preprocesses `sources` on up to `threads` threads. Threads are created
/// with every signal blocked, so Postgres signals stay with the calling backend.
pub fn prepare_batch(
    sources: &[Source],
    pre: &Preprocess,
    limits: &Limits,
    policy: &source::SourcePolicy,
    threads: usize,
    want_hash: bool,
) -> Prepared {
    let slot_len = pre.slot_len();
    let mut tensor = vec![0f32; sources.len() * slot_len];
    let results: Vec<Mutex<Option<Result<Option<u64>>>>> =
        sources.iter().map(|_| Mutex::new(None)).collect();
    {
        let work = Mutex::new(
            sources
                .iter()
                .zip(tensor.chunks_exact_mut(slot_len))
                .enumerate(),
        );
        let job = || loop {
            let next = work.lock().map(|mut w| w.next()).unwrap_or(None);
            let Some((i, (src, slot))) = next else { break };
            let r = catch_panic("preparing an image", || {
                prepare_one(src, pre, limits, policy, slot, want_hash)
            });
            if let Ok(mut cell) = results[i].lock() {
                *cell = Some(r);
            }
        };
        let n = threads.clamp(1, sources.len().max(1));
        if n == 1 {
            job();
        } else {
            std::thread::scope(|s| {
                crate::model::with_signals_blocked(|| {
                    for _ in 0..n {
                        s.spawn(job);
                    }
                });
            });
        }
    }
    let mut ok = Vec::with_capacity(sources.len());
    let mut errors = Vec::new();
    let mut hashes = vec![None; sources.len()];
    for (i, cell) in results.into_iter().enumerate() {
        match cell.into_inner().ok().flatten() {
            Some(Ok(hash)) => {
                hashes[i] = hash;
                // compact: move slot i down to position ok.len()
                let dst = ok.len();
                if dst != i {
                    tensor.copy_within(i * slot_len..(i + 1) * slot_len, dst * slot_len);
                }
                ok.push(i);
            }
            Some(Err(e)) => errors.push((i, e)),
            None => errors.push((
                i,
                Error::new(crate::ErrorKind::Internal, "image was not processed"),
            )),
        }
    }
    tensor.truncate(ok.len() * slot_len);
    Prepared {
        tensor,
        ok,
        errors,
        hashes,
    }
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
