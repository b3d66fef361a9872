//! dHash fingerprints: `doppler.dhash(path|bytea)`, `doppler.hamming(...)`,
//! `doppler.dhash_to_bigint(text)`.
//!
//! Labels: the path form reads a file (VOLATILE, like extract_features). The bytea form and the
//! hash arithmetic are IMMUTABLE: the result is a pure function of the argument (the limits in
//! doppler.max_image_* can only refuse an input, never change a hash), so they may be used in
//! index expressions.

use doppler_core::{dhash, source, Error, ErrorKind};
use pgrx::prelude::*;

use crate::errors::{raise_error, OrRaise};
use crate::{gucs, sources};

fn hash_of(bytes: &[u8], what: &str) -> String {
    // doppler.jpeg_draft_size must not change a hash
    let limits = gucs::limits().full_decode();
    doppler_core::catch_panic("hashing an image", || {
        let img = doppler_core::decode_rgb(bytes, what, &limits)?;
        Ok(dhash::to_hex(dhash::dhash(&img)))
    })
    .or_raise()
}

#[pg_extern(name = "dhash", volatile, strict, parallel_safe)]
fn dhash_path(path: &str) -> String {
    let (bytes, what) = sources::load_text(path);
    hash_of(&bytes, &what)
}

#[pg_extern(name = "dhash", immutable, strict, parallel_safe)]
fn dhash_bytea(image: &[u8]) -> String {
    sources::check_size(image);
    hash_of(image, &source::describe_bytes(image.len()))
}

pub(crate) fn parse(h: &str) -> u64 {
    dhash::parse_hex(h).unwrap_or_else(|| {
        raise_error(
            Error::new(
                ErrorKind::Config,
                format!("invalid dHash \"{h}\": expected 16 hexadecimal digits"),
            )
            .with_hint("Skip hashes such as NOHASH and nan have no bits to compare."),
        )
    })
}

#[pg_extern(name = "hamming", immutable, strict, parallel_safe)]
fn hamming_text(a: &str, b: &str) -> i32 {
    dhash::hamming(parse(a), parse(b)) as i32
}

#[pg_extern(name = "hamming", immutable, strict, parallel_safe)]
fn hamming_bigint(a: i64, b: i64) -> i32 {
    dhash::hamming(a as u64, b as u64) as i32
}

/// The 64 hash bits as a bigint (two's complement), for compact storage and btree indexes.
#[pg_extern(immutable, strict, parallel_safe)]
fn dhash_to_bigint(hash: &str) -> i64 {
    parse(hash) as i64
}
