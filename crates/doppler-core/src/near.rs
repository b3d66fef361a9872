//! Near-duplicate search over 64-bit dHashes, exact, by multi-index hashing (Norouzi et al.,
//! "Fast search in Hamming space with multi-index hashing", CVPR 2012).
//!
//! The pigeonhole principle: split the 64 bits into m chunks; two hashes within `r` bits differ
//! in at most `r` of them, so for some chunk they differ by at most `r / m` bits. Candidates that
//! share (or nearly share) a chunk are then checked with the full hamming distance, so answers
//! are exact, never approximate.
//!
//! * One hash against a table ([`probe_tokens`]): doppler indexes four 16-bit chunks (four hex
//!   digits each) as text tokens `"<chunk><4 hex digits>"` in a GIN index; a lookup within
//!   `max_bits` probes every token within `max_bits / 4` bits of the query's chunks.
//! * All pairs of a set ([`near_pairs`]): `max_bits + 1` chunks, so that near pairs share one
//!   chunk exactly; sort by each chunk and compare within runs of equal chunks.
//!
//! Why not pgvector's `bit(64)` HNSW index: HNSW is approximate (a near duplicate can be
//! missed), and doppler's answers must equal the exact ones. Why not a BK-tree: it lives in
//! memory and has to be rebuilt; the GIN index is kept by PostgreSQL, crash-safe and
//! WAL-logged, and a B-tree-like probe per token costs microseconds.

/// Chunks of the table index: 4 × 16 bits, four hex digits each.
pub const INDEX_CHUNKS: u32 = 4;

/// Above this per-chunk radius a lookup probes too many tokens to beat a scan (radius 2: 137
/// per chunk, 548 tokens; radius 3 would be 2 788).
pub const MAX_PROBE_RADIUS: u32 = 2;

/// The per-chunk radius of a lookup within `max_bits`, when the index can serve it.
pub fn probe_radius(max_bits: u32) -> Option<u32> {
    Some(max_bits / INDEX_CHUNKS).filter(|r| *r <= MAX_PROBE_RADIUS)
}

/// The index tokens of a hash: chunk i (0 = most significant) as `"{i}{4 hex digits}"`, as the
/// index expression writes them from the 16 hex digits.
pub fn tokens(h: u64) -> Vec<String> {
    (0..INDEX_CHUNKS)
        .map(|i| format!("{i}{:04x}", chunk16(h, i)))
        .collect()
}

fn chunk16(h: u64, i: u32) -> u64 {
    (h >> (48 - 16 * i)) & 0xffff
}

/// Every token that a hash within `max_bits` of `h` must have at least one of (None: the
/// radius is too large for the index; scan instead).
pub fn probe_tokens(h: u64, max_bits: u32) -> Option<Vec<String>> {
    let r = probe_radius(max_bits)?;
    let mut out = Vec::new();
    for i in 0..INDEX_CHUNKS {
        let c = chunk16(h, i);
        for v in within(c, 16, r) {
            out.push(format!("{i}{v:04x}"));
        }
    }
    Some(out)
}

/// The values of `width` bits within `r` bit flips of `c` (c itself first).
fn within(c: u64, width: u32, r: u32) -> Vec<u64> {
    fn go(c: u64, from: u32, width: u32, left: u32, out: &mut Vec<u64>) {
        if left == 0 {
            return;
        }
        for b in from..width {
            let v = c ^ (1 << b);
            out.push(v);
            go(v, b + 1, width, left - 1, out);
        }
    }
    let mut out = vec![c];
    go(c, 0, width, r, &mut out);
    out
}

/// Calls `each(i, j)` once for every pair `i < j` of `hashes` within `max_bits` of each other
/// (hashes should be distinct: equal ones are one group already). `poll` is called now and
/// then, so that a caller can check for interrupts. Exact: the result equals comparing every
/// pair.
pub fn near_pairs(
    hashes: &[u64],
    max_bits: u32,
    each: &mut dyn FnMut(usize, usize),
    poll: &mut dyn FnMut(),
) {
    let n = hashes.len();
    let m = max_bits.saturating_add(1);
    if m > 16 || n < 64 {
        // chunks of 3 bits or fewer gain nothing over comparing all pairs
        for i in 0..n {
            if i % 1024 == 0 {
                poll();
            }
            for j in i + 1..n {
                if (hashes[i] ^ hashes[j]).count_ones() <= max_bits {
                    each(i, j);
                }
            }
        }
        return;
    }
    // m chunks of 64 / m bits (the first ones one bit wider when m does not divide 64)
    let bounds: Vec<(u32, u32)> = {
        let (base, extra) = (64 / m, 64 % m);
        let mut at = 0;
        (0..m)
            .map(|k| {
                let w = base + u32::from(k < extra);
                let b = (at, w);
                at += w;
                b
            })
            .collect()
    };
    let chunk = |h: u64, (at, w): (u32, u32)| (h >> (64 - at - w)) & (u64::MAX >> (64 - w));
    // (chunk, hash, index), sorted by chunk: the runs of equal chunks are contiguous in memory
    let mut sorted: Vec<(u64, u64, u32)> = Vec::with_capacity(n);
    let mut work = 0usize;
    for (k, &b) in bounds.iter().enumerate() {
        sorted.clear();
        sorted.extend(
            hashes
                .iter()
                .enumerate()
                .map(|(i, &h)| (chunk(h, b), h, i as u32)),
        );
        sorted.sort_unstable_by_key(|e| e.0);
        poll();
        let mut start = 0;
        while start < n {
            let c = sorted[start].0;
            let mut end = start + 1;
            while end < n && sorted[end].0 == c {
                end += 1;
            }
            for x in start..end {
                let (_, a, i) = sorted[x];
                for &(_, z, j) in &sorted[x + 1..end] {
                    if (a ^ z).count_ones() > max_bits {
                        continue;
                    }
                    // once per pair: in the first chunk where the two agree
                    if bounds[..k].iter().any(|&e| chunk(a, e) == chunk(z, e)) {
                        continue;
                    }
                    let (i, j) = (i as usize, j as usize);
                    each(i.min(j), i.max(j));
                }
                work += end - x;
                if work > 1 << 22 {
                    work = 0;
                    poll();
                }
            }
            start = end;
        }
    }
}

/// Groups of rows whose hashes are within `max_bits` of each other (single linkage: a chain of
/// near pairs is one group), as row indices; equal hashes are one group. Only groups of two rows
/// or more, largest first (ties: by smallest row index). Not generic, so that it runs as
/// optimized code whoever calls it.
pub fn groups(hashes: &[u64], max_bits: u32, poll: &mut dyn FnMut()) -> Vec<Vec<usize>> {
    // distinct hashes, each with its rows
    let mut at: std::collections::HashMap<u64, usize> =
        std::collections::HashMap::with_capacity(hashes.len());
    let mut distinct: Vec<u64> = Vec::new();
    let mut first_row: Vec<usize> = Vec::new();
    let mut of_row: Vec<usize> = Vec::with_capacity(hashes.len());
    for (row, &h) in hashes.iter().enumerate() {
        let i = *at.entry(h).or_insert_with(|| {
            distinct.push(h);
            first_row.push(row);
            distinct.len() - 1
        });
        of_row.push(i);
    }
    drop(at);
    let mut parent: Vec<usize> = (0..distinct.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    near_pairs(
        &distinct,
        max_bits,
        &mut |i, j| {
            let (a, b) = (root(&mut parent, i), root(&mut parent, j));
            if a != b {
                parent[a.max(b)] = a.min(b);
            }
        },
        poll,
    );
    let mut size = vec![0usize; distinct.len()];
    let roots: Vec<usize> = of_row.iter().map(|&i| root(&mut parent, i)).collect();
    for &r in &roots {
        size[r] += 1;
    }
    let mut slot = vec![usize::MAX; distinct.len()];
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (row, &r) in roots.iter().enumerate() {
        if size[r] < 2 {
            continue;
        }
        if slot[r] == usize::MAX {
            slot[r] = out.len();
            out.push(Vec::with_capacity(size[r]));
        }
        out[slot[r]].push(row);
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a[0].cmp(&b[0])));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: hashes, and near copies of some of them
    fn corpus(n: usize, seed: u64) -> Vec<u64> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut v: Vec<u64> = Vec::new();
        while v.len() < n {
            let r = next();
            if !v.is_empty() && r % 3 == 0 {
                // a repost: a few bits flipped
                let base = v[(r as usize / 7) % v.len()];
                let mut h = base;
                for _ in 0..(r % 9) {
                    h ^= 1 << (next() % 64);
                }
                v.push(h);
            } else {
                v.push(r);
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    fn brute(h: &[u64], max_bits: u32) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for i in 0..h.len() {
            for j in i + 1..h.len() {
                if (h[i] ^ h[j]).count_ones() <= max_bits {
                    out.push((i, j));
                }
            }
        }
        out
    }

    #[test]
    fn near_pairs_equal_all_pairs() {
        let h = corpus(3000, 0x9e37_79b9_7f4a_7c15);
        for max_bits in [0, 1, 2, 3, 4, 5, 7, 8, 12, 15, 16, 20, 64] {
            let mut got = Vec::new();
            near_pairs(&h, max_bits, &mut |i, j| got.push((i, j)), &mut || {});
            got.sort_unstable();
            let want = brute(&h, max_bits);
            assert_eq!(got.len(), want.len(), "max_bits {max_bits}");
            assert_eq!(got, want, "max_bits {max_bits}");
        }
    }

    #[test]
    fn groups_join_chains_of_near_pairs() {
        // 0 ~ 1 (1 bit), 1 ~ 3 (1 bit): one group of three; 0xff00 twice: a group; 0xffff_0000 alone
        let h = [0b0, 0b1, 0xff00, 0b11, 0xffff_0000, 0xff00];
        assert_eq!(groups(&h, 1, &mut || {}), vec![vec![0, 1, 3], vec![2, 5]]);
        assert_eq!(groups(&h, 0, &mut || {}), vec![vec![2, 5]]);
        assert!(groups(&[], 4, &mut || {}).is_empty());
    }

    #[test]
    fn one_64_bit_chunk_pairs_only_equal_hashes() {
        // max_bits 0: one chunk of all 64 bits (a mask bug once made it one run of everything)
        let h: Vec<u64> = (0..200_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut n = 0;
        near_pairs(&h, 0, &mut |_, _| n += 1, &mut || {});
        assert_eq!(n, 0);
        let mut pairs = Vec::new();
        near_pairs(
            &[5, 7, 5, 9, 5],
            0,
            &mut |i, j| pairs.push((i, j)),
            &mut || {},
        );
        pairs.sort_unstable();
        assert_eq!(pairs, [(0, 2), (0, 4), (2, 4)]);
    }

    #[test]
    fn probes_cover_every_hash_within_max_bits() {
        let h = corpus(4000, 0x2545_f491_4f6c_dd1d);
        for max_bits in 0..=11u32 {
            for &q in h.iter().step_by(97) {
                let probes: std::collections::HashSet<String> =
                    probe_tokens(q, max_bits).unwrap().into_iter().collect();
                for &x in &h {
                    if (q ^ x).count_ones() <= max_bits {
                        assert!(
                            tokens(x).iter().any(|t| probes.contains(t)),
                            "{x:016x} within {max_bits} of {q:016x} but no shared token"
                        );
                    }
                }
            }
        }
        assert!(probe_tokens(0, 12).is_none());
        assert_eq!(probe_tokens(0, 4).unwrap().len(), 4 * 17);
        assert_eq!(probe_tokens(0, 11).unwrap().len(), 4 * 137);
        // the tokens are the index expression's: chunk number, then four of the hex digits
        assert_eq!(
            tokens(0x0123_4567_89ab_cdef),
            ["00123", "14567", "289ab", "3cdef"]
        );
    }
}

#[cfg(test)]
mod timing {
    /// `cargo test -p doppler-core --release near::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn a_million_hashes() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut h = Vec::new();
        for i in 0..1_000_000u64 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            h.push(if i % 3 == 0 && i > 0 {
                h[i as usize - 1] ^ (1 << (i % 63))
            } else {
                s
            });
        }
        for mb in [0, 4, 8] {
            let t = std::time::Instant::now();
            let g = super::groups(&h, mb, &mut || {});
            println!("max_bits {mb}: {} groups in {:?}", g.len(), t.elapsed());
        }
    }
}
