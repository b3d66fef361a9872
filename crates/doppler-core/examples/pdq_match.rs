//! What matching a table of PDQ hashes against a list costs, index against brute force:
//! `cargo run --release -p doppler-core --example pdq_match -- [ROWS] [LIST] [MAX_BITS]`
//! (defaults 1 000 000, 10 000, 31).
//!
//! Random table hashes, 1 % of them planted within 0..=MAX_BITS bits of a listed hash; builds a
//! [`ListIndex`] of the list, matches every row, and compares every row of a 2 000-row
//! subsample with every listed hash to time brute force. Prints the figures, and the matches
//! found against the planted ones (random 256-bit hashes are never within 31 bits by chance).
use std::time::Instant;

use doppler_core::pdq_near::ListIndex;

/// splitmix64
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn hash(&mut self) -> [u8; 32] {
        let mut h = [0u8; 32];
        for c in h.chunks_exact_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        h
    }
}

fn words(h: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[8 * i..8 * i + 8]);
        u64::from_be_bytes(b)
    })
}

fn hamming(a: &[u8; 32], b: &[u8; 32]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let (rows, listed, max_bits) = (arg(1, 1_000_000), arg(2, 10_000), arg(3, 31) as u32);
    let mut rng = Rng(0x5eed);
    let list: Vec<[u8; 32]> = (0..listed).map(|_| rng.hash()).collect();
    let mut planted = 0usize;
    let table: Vec<[u8; 32]> = (0..rows)
        .map(|_| {
            if !rng.next().is_multiple_of(100) {
                return rng.hash();
            }
            planted += 1;
            let base = list[(rng.next() % listed as u64) as usize];
            let bits = (rng.next() % (u64::from(max_bits) + 1)) as u32;
            let mut h = base;
            // a bit flipped twice is unflipped: flip until `bits` differ
            while hamming(&h, &base) < bits {
                let b = (rng.next() % 256) as usize;
                h[b / 8] ^= 0x80 >> (b % 8);
            }
            h
        })
        .collect();
    let t = Instant::now();
    let index = ListIndex::new(&list);
    let build = t.elapsed();

    // best of three passes: the figure of an unloaded core
    let mut out = Vec::new();
    let (mut found, mut rows_found) = (0usize, 0usize);
    let mut matching = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        (found, rows_found) = (0, 0);
        for h in &table {
            out.clear();
            index.matches(h, max_bits, &mut out);
            found += out.len();
            rows_found += usize::from(!out.is_empty());
        }
        matching = matching.min(t.elapsed().as_secs_f64());
    }
    let per_row = matching / rows as f64;

    // brute force as ListIndex does it for short lists: the list as words, four xor-popcounts
    let sample = rows.min(2000);
    let list_words: Vec<[u64; 4]> = list.iter().map(words).collect();
    let (mut brute, mut brute_found) = (f64::MAX, 0usize);
    for _ in 0..3 {
        let t = Instant::now();
        brute_found = 0;
        for h in table.iter().take(sample) {
            let q = words(h);
            brute_found += list_words
                .iter()
                .filter(|w| (0..4).map(|i| (q[i] ^ w[i]).count_ones()).sum::<u32>() <= max_bits)
                .count();
        }
        brute = brute.min(t.elapsed().as_secs_f64() / sample as f64);
    }
    let mut index_found = 0usize;
    for h in table.iter().take(sample) {
        out.clear();
        index.matches(h, max_bits, &mut out);
        index_found += out.len();
    }

    println!("{rows} rows against {listed} listed hashes within {max_bits} bits");
    println!("index built in {:.1} ms", build.as_secs_f64() * 1e3);
    println!(
        "matched every row in {matching:.3} s (best of 3): {:.3} µs per row",
        per_row * 1e6
    );
    println!(
        "brute force: {:.1} µs per row ({sample} rows, best of 3); the index is {:.0}× faster",
        brute * 1e6,
        brute / per_row
    );
    println!(
        "found {found} matches in {rows_found} rows, {planted} planted; sample: index {index_found}, brute force {brute_found}"
    );
}
