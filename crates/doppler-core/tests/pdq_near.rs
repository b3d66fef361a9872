//! `pdq_near` against independent references: the GIN index expression's tokens computed the
//! way PostgreSQL computes them (from the bit string's text), and a long list probed at every
//! radius, compared with comparing every pair.
use doppler_core::pdq_near::{pairs, probe_tokens, tokens, ListIndex};

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

    /// `h` with `bits` distinct bits flipped
    fn flip(&mut self, h: &[u8; 32], bits: u32) -> [u8; 32] {
        let mut out = *h;
        while hamming(&out, h) < bits {
            let b = (self.next() % 256) as usize;
            if (out[b / 8] ^ h[b / 8]) & (0x80 >> (b % 8)) == 0 {
                out[b / 8] ^= 0x80 >> (b % 8);
            }
        }
        out
    }
}

fn hamming(a: &[u8; 32], b: &[u8; 32]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// What PostgreSQL computes for `i * 65536 + substring(pdq from 16*i+1 for 16)::bit(16)::int4`,
/// from the `bit(256)` value's text (`B'0101…'`, the 64 hex digits' bits in order): the 16
/// characters read as an unsigned binary number.
fn sql_tokens(h: &[u8; 32]) -> Vec<i32> {
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    let bits: String = hex
        .chars()
        .map(|c| format!("{:04b}", c.to_digit(16).unwrap()))
        .collect();
    assert_eq!(bits.len(), 256);
    (0..16)
        .map(|i| {
            let chunk = &bits[16 * i..16 * i + 16];
            i as i32 * 65536 + i32::from_str_radix(chunk, 2).unwrap()
        })
        .collect()
}

#[test]
fn tokens_are_the_index_expressions() {
    let mut rng = Rng(5);
    let mut hs = vec![[0u8; 32], [0xff; 32]];
    hs.extend((0..500).map(|_| rng.hash()));
    for h in &hs {
        assert_eq!(tokens(h).to_vec(), sql_tokens(h));
    }
    // a chunk whose first bit is set is still positive: bittoint4 right-aligns 16 bits
    let mut h = [0u8; 32];
    h[2] = 0x80;
    assert_eq!(sql_tokens(&h)[1], 65536 + 32768);
    assert_eq!(tokens(&h)[1], 65536 + 32768);
}

#[test]
fn probe_tokens_find_near_copies_through_the_sql_tokens() {
    let mut rng = Rng(6);
    for max_bits in [0, 8, 16, 31, 32, 47] {
        for _ in 0..200 {
            let q = rng.hash();
            let x = rng.flip(&q, max_bits);
            let probes = probe_tokens(&q, max_bits).unwrap();
            assert!(sql_tokens(&x).iter().any(|t| probes.contains(t)));
        }
    }
}

#[test]
fn a_long_list_at_every_radius() {
    // 50 000 hashes are probed at radius 3 in some chunks (max_bits 48 to 61: up to 10 032
    // probes a query, in batches), compared with every listed hash from 62 bits
    let mut rng = Rng(7);
    let mut list: Vec<[u8; 32]> = (0..45_000).map(|_| rng.hash()).collect();
    for _ in 0..5000 {
        let base = list[(rng.next() % 45_000) as usize];
        let bits = (rng.next() % 70) as u32;
        list.push(rng.flip(&base, bits));
    }
    let index = ListIndex::new(&list);
    let mut got = Vec::new();
    for max_bits in [31, 32, 47, 48, 55, 61, 62, 63] {
        let mut total = 0;
        for _ in 0..60 {
            let base = list[(rng.next() % list.len() as u64) as usize];
            let bits = (rng.next() % (max_bits as u64 + 8)) as u32;
            let q = rng.flip(&base, bits);
            got.clear();
            index.matches(&q, max_bits, &mut got);
            got.sort_unstable();
            let want: Vec<(u32, u32)> = list
                .iter()
                .enumerate()
                .filter_map(|(i, x)| {
                    let d = hamming(&q, x);
                    (d <= max_bits).then_some((i as u32, d))
                })
                .collect();
            total += want.len();
            assert_eq!(got, want, "max_bits {max_bits}");
        }
        assert!(total >= 30, "max_bits {max_bits}: too few matches to tell");
    }
}

#[test]
fn pairs_of_dihedral_like_families() {
    // families of 8 hashes within 40 bits of a base, as the 8 dihedral variants of a photo's
    // near copies might be; pairs must equal comparing every pair
    let mut rng = Rng(8);
    let mut h: Vec<[u8; 32]> = Vec::new();
    for _ in 0..300 {
        let base = rng.hash();
        for _ in 0..8 {
            let bits = (rng.next() % 24) as u32;
            h.push(rng.flip(&base, bits));
        }
    }
    for max_bits in [0, 15, 31, 47] {
        let mut got = Vec::new();
        pairs(&h, max_bits, &mut |i, j| got.push((i, j)), &mut || {});
        got.sort_unstable();
        let mut want = Vec::new();
        for i in 0..h.len() {
            for j in i + 1..h.len() {
                if hamming(&h[i], &h[j]) <= max_bits {
                    want.push((i, j));
                }
            }
        }
        assert_eq!(got, want, "max_bits {max_bits}");
        if max_bits >= 31 {
            assert!(want.len() > 1000);
        }
    }
}
