//! imagehash's difference hash: `str(imagehash.dhash(Image.open(f), hash_size=8))`, exactly.
//!
//! `image.convert('L')` (PIL's ITU-R 601-2 luma in 16-bit fixed point) → `resize((9, 8),
//! LANCZOS)` (Pillow's resampler, reproduced in [`crate::resize`]) → bit (r, c) = pixel (r, c+1)
//! > pixel (r, c), row-major, most significant first → 16 lowercase hex digits.
//!
//! The input is the RGB that [`crate::decode`] produces; L computed from it equals PIL's L for
//! RGB, RGBA, L, LA and P images. 16-bit grayscale follows doppler's documented deviation (high
//! byte, where PIL clamps to 255).

use crate::decode::RgbImage;
use crate::resize::{resample, Filter};

/// PIL's `L24` luma: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
pub fn luma(img: &RgbImage) -> Vec<u8> {
    img.data
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// The 64-bit difference hash of an image.
pub fn dhash(img: &RgbImage) -> u64 {
    let small = resample(&luma(img), img.width, img.height, 1, 9, 8, Filter::Lanczos);
    let mut h = 0u64;
    for row in small.chunks_exact(9) {
        for c in 0..8 {
            h = (h << 1) | (row[c + 1] > row[c]) as u64;
        }
    }
    h
}

/// 16 lowercase hex digits, as imagehash prints a 64-bit hash.
pub fn to_hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Parses a 16-digit hex hash (either case; no sign, no spaces).
pub fn parse_hex(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Number of differing bits.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_hamming() {
        assert_eq!(to_hex(0x00ff_0000_0000_0001), "00ff000000000001");
        assert_eq!(parse_hex("00FF000000000001"), Some(0x00ff_0000_0000_0001));
        assert_eq!(parse_hex("nan"), None);
        assert_eq!(parse_hex("0123456789abcdeg"), None);
        assert_eq!(hamming(0, u64::MAX), 64);
        assert_eq!(hamming(0b1011, 0b0001), 2);
    }

    #[test]
    fn a_flat_image_hashes_to_zero() {
        let img = RgbImage {
            width: 50,
            height: 40,
            data: vec![128; 50 * 40 * 3],
        };
        assert_eq!(dhash(&img), 0);
    }
}
