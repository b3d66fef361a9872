//! Near-duplicate search over 256-bit PDQ hashes, exact, by multi-index hashing — the same
//! scheme as [`crate::near`] for dHashes, sized for PDQ's longer hashes and larger thresholds
//! (Meta calls two PDQ hashes a match within 31 bits).
//!
//! A hash is `[u8; 32]`, byte 0's most significant bit first: bit `i` of the 256 is bit `i` of
//! the 64-hex-digit text and of a PostgreSQL `bit(256)` value. It is split into 16 chunks of 16
//! bits. Two hashes within `r` bits differ by at most `r` bits over the 16 chunks, so
//! (pigeonhole) in some chunk by at most `r / 16`: a near hash has, in some chunk, one of the
//! values within `r / 16` bits of the query's (fewer suffice, see [`radii`]). Checking just the
//! hashes found that way with the full distance gives the exact answer, never an approximate one.
//!
//! * One hash against a table ([`probe_tokens`]): a GIN index over the 16 chunk tokens of a
//!   `bit(256)` column, written with built-in immutable SQL only (see [`tokens`]).
//! * Every row of a table against a list ([`ListIndex`]): the list, up to some 100 000 hashes
//!   (or 8 times that with their dihedral variants), is indexed in memory and the table's rows
//!   stream through it; within 31 bits a row costs about a microsecond against 10 000 hashes
//!   (30 µs by comparing with each), 11 µs against 100 000.
//! * All near pairs of one set ([`pairs`]): a [`ListIndex`] of the set, queried by each member.

/// Chunks of the index: 16 × 16 bits, four hex digits each.
pub const INDEX_CHUNKS: u32 = 16;

/// Above this per-chunk radius a GIN lookup costs more than a scan. Radius 1 (`max_bits` 16 to
/// 31, PDQ's usual threshold at the top) probes 17 values per chunk, up to 272 tokens; radius 2
/// (32 to 47) 137 per chunk, up to 2 192 tokens, a few milliseconds of GIN descents, and its
/// candidates are up to 16 × 137 / 65 536 ≈ 3 % of a random table, still far fewer rows than a
/// scan reads. Radius 3 would be 697 per chunk, up to 11 152 tokens, and 17 % of the table as
/// candidates, rechecked by random heap access: then a sequential scan is as fast and simpler.
pub const MAX_PROBE_RADIUS: u32 = 2;

/// Above this per-chunk radius [`ListIndex`] compares with every listed hash: radius 4 would be
/// 2 517 values per chunk, and 16 × 2 517 / 65 536 ≈ 61 % of the list would be candidates
/// anyway. Below it, the list must also be long enough for the radii (see `indexed`).
pub const MAX_LIST_RADIUS: u32 = 3;

/// Lists shorter than this are compared with every hash: they take less time than a query's
/// fixed costs.
const MIN_INDEXED: usize = 64;

/// What [`ListIndex::matches`] costs, in units of one probe (a bitmap test, about 0.8 ns):
/// comparing with one listed hash in a scan of the list costs 4 (four xor-popcounts, about
/// 3 ns without the `popcnt` instruction, which x86-64's baseline lacks), comparing with a
/// candidate found through a bucket 24 (an id and a hash loaded from wherever they lie: 12 ns
/// for a 10 000-hash list, 23 ns for 100 000, 37 ns for 800 000, whose index outgrows the
/// caches). Measured on one core for lists of 64 to 800 000 hashes within 0 to 63 bits; the
/// crossovers this gives are within a factor of 1.5 of the measured ones.
const COMPARE_COST: u64 = 4;
const CANDIDATE_COST: u64 = 24;

/// The largest per-chunk radius of a GIN lookup within `max_bits` (`max_bits / 16`, see
/// [`probe_tokens`]), when the index can serve it.
pub fn probe_radius(max_bits: u32) -> Option<u32> {
    Some(max_bits / INDEX_CHUNKS).filter(|r| *r <= MAX_PROBE_RADIUS)
}

/// The probe radius of each chunk in a search within `max_bits` (None: not probed), by the
/// pigeonhole principle with budgets: give chunk `k` a budget `b_k`, with `Σ b_k = max_bits + 1`
/// spread as evenly as possible. A hash that differed from the query by `b_k` bits or more in
/// every chunk would differ by `max_bits + 1` or more in all, so a hash within `max_bits`
/// differs by at most `b_k - 1` bits in some chunk `k`: probing radius `b_k - 1` in each chunk
/// (none where `b_k = 0`) finds it. Within 31 bits that is radius 1 everywhere (272 probes,
/// as plain `max_bits / 16` would give), but within 16 bits one chunk at radius 1 and the
/// others at 0 (32 probes, not 272), within 5 bits six chunks at radius 0.
fn radii(max_bits: u32) -> [Option<u32>; 16] {
    let budget = u64::from(max_bits) + 1;
    let (each, extra) = (budget / 16, budget % 16);
    std::array::from_fn(|k| {
        let b = each + u64::from((k as u64) < extra);
        b.checked_sub(1).map(|r| r.min(u64::from(u32::MAX)) as u32)
    })
}

/// Chunk `i` (0 = bits 0..16, the first four hex digits) as an unsigned 16-bit number, bit
/// `16 i` most significant.
fn chunk(h: &[u8; 32], i: usize) -> u16 {
    u16::from_be_bytes([h[2 * i], h[2 * i + 1]])
}

/// The index tokens of a hash: token `i` = `i * 65536 + chunk_i`, each chunk tagged with its
/// number so that equal values in different chunks are different tokens (all fit an `int4`:
/// the largest is 1 048 575).
///
/// The index expression that writes the same tokens from a `bit(256)` column `pdq`, built-in
/// immutable SQL only (`substring` of a bit string, the `bit(16)` length cast, and `bittoint4`,
/// which reads the bits most significant first and right-aligns them, so a 16-bit string is its
/// unsigned value: `B'1000000000000000'::int4` = 32768):
///
/// ```sql
/// CREATE INDEX ON t USING gin ((ARRAY[
///      0 * 65536 + substring(pdq from   1 for 16)::bit(16)::int4,
///      1 * 65536 + substring(pdq from  17 for 16)::bit(16)::int4,
///     -- … chunk i: i * 65536 + substring(pdq from 16*i+1 for 16)::bit(16)::int4 …
///     15 * 65536 + substring(pdq from 241 for 16)::bit(16)::int4]));
/// ```
///
/// A lookup repeats the same expression and asks for overlap with [`probe_tokens`], then
/// rechecks the distance: `WHERE ARRAY[…] && $1::int4[] AND bit_count(pdq # $2) <= $3`.
pub fn tokens(h: &[u8; 32]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, t) in out.iter_mut().enumerate() {
        *t = (i as i32) * 65536 + i32::from(chunk(h, i));
    }
    out
}

/// Tokens of which every hash within `max_bits` of `h` has at least one: for each chunk, the
/// values within that chunk's radius of the query's (its own first), the radii spread so that
/// they add up to as few tokens as the pigeonhole principle allows (see [`radii`]): 272 tokens
/// within 31 bits, 2 192 within 47, but 32 within 16 and 1 within 0. None: the radius is too
/// large for the index ([`MAX_PROBE_RADIUS`]); scan instead.
pub fn probe_tokens(h: &[u8; 32], max_bits: u32) -> Option<Vec<i32>> {
    probe_radius(max_bits)?;
    let masks = masks(MAX_PROBE_RADIUS);
    let mut out = Vec::new();
    for ((i, base), r) in tokens(h).into_iter().enumerate().zip(radii(max_bits)) {
        let Some(r) = r else { continue };
        let c = chunk(h, i);
        out.extend(
            masks[..within(r)]
                .iter()
                .map(|&m| base - i32::from(c) + i32::from(c ^ m)),
        );
    }
    Some(out)
}

/// The 16-bit masks of at most `r` ≤ 3 bits, fewest bits first (0 first): XORed with a chunk,
/// the values within `r` bits of it, [`within`]`(r)` of them.
fn masks(r: u32) -> Vec<u16> {
    let bit = |a: u32| 1u16 << a;
    let mut out = vec![0u16];
    if r >= 1 {
        out.extend((0..16).map(bit));
    }
    if r >= 2 {
        for a in 0..16 {
            out.extend((a + 1..16).map(|b| bit(a) | bit(b)));
        }
    }
    if r >= 3 {
        for a in 0..16 {
            for b in a + 1..16 {
                out.extend((b + 1..16).map(|c| bit(a) | bit(b) | bit(c)));
            }
        }
    }
    out
}

/// A hash as four big-endian words: word `w` holds chunks `4w .. 4w + 4`, most significant
/// first.
fn words(h: &[u8; 32]) -> [u64; 4] {
    let mut w = [0u64; 4];
    for (i, x) in w.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[8 * i..8 * i + 8]);
        *x = u64::from_be_bytes(b);
    }
    w
}

fn distance(a: &[u64; 4], b: &[u64; 4]) -> u32 {
    (a[0] ^ b[0]).count_ones()
        + (a[1] ^ b[1]).count_ones()
        + (a[2] ^ b[2]).count_ones()
        + (a[3] ^ b[3]).count_ones()
}

/// Chunk `k` of the XOR of two hashes in words: the bits in which that chunk differs.
fn xor_chunk(a: &[u64; 4], b: &[u64; 4], k: usize) -> u64 {
    ((a[k / 4] ^ b[k / 4]) >> (48 - 16 * (k % 4))) & 0xffff
}

/// A list of hashes indexed for "which listed hashes are within `max_bits` of this one",
/// asked once per row of a table. Per chunk a CSR table: the list's ids sorted by that chunk's
/// value, and where each value's bucket of ids starts. No hashing: a probe is an array index.
///
/// The bucket starts are stored compactly, for the empty buckets' sake: a 10 000-hash list
/// fills 14 % of a chunk's 65 536 buckets, so most probes find nothing. A bitmap of the
/// non-empty buckets (8 KiB per chunk) answers those; a probe that hits counts the bits below
/// it (a per-word running count, plus one popcount) to find its bucket's start among the
/// non-empty buckets' only. Plain 65 537-entry offset tables were 4 MiB for the 16 chunks, more
/// than a core's L2 cache, and their misses were 40 % of the time of a query; this way a
/// 10 000-hash list's index is 1.7 MiB, and a query within 31 bits takes 0.8 µs, not 1.35.
/// Memory: 192 KiB + 96 to 160 bytes per listed hash (its words, its 16 ids, and up to 16
/// bucket starts).
pub struct ListIndex {
    /// The listed hashes as words, for the full comparison.
    hashes: Vec<[u64; 4]>,
    /// Per chunk `k`: bit `v` of `bitmap[k * 1024 ..]` says whether some listed hash has chunk
    /// `k` = `v`.
    bitmap: Vec<u64>,
    /// `rank[k * 1024 + w]`: the index in `starts` of chunk `k`'s first non-empty bucket at or
    /// above value `64 w`.
    rank: Vec<u32>,
    /// The non-empty buckets' bounds in `ids`, chunk after chunk, each chunk's closed by its
    /// end: bucket `j` is `ids[starts[j] .. starts[j + 1]]`.
    starts: Vec<u32>,
    /// Chunk `k`'s list ids, sorted by chunk `k`'s value, at `ids[k * n .. (k + 1) * n]`, as
    /// `k << 28 | id`: a candidate carries the chunk that found it.
    ids: Vec<u32>,
    /// All 16-bit masks of at most [`MAX_LIST_RADIUS`] bits, fewest bits first.
    masks: Vec<u16>,
}

/// The number of 16-bit values within `r` bits of one: `masks[..within(r)]`.
fn within(r: u32) -> usize {
    [1, 17, 137, 697].get(r as usize).copied().unwrap_or(65536)
}

/// The most hashes a [`ListIndex`] holds: its ids are 28 bits (next to a chunk's number), its
/// bucket starts `u32`.
pub const MAX_LISTED: usize = ID as usize;

impl ListIndex {
    /// Indexes `hashes`; list index `i` in [`ListIndex::matches`] is `hashes[i]`. At most
    /// [`MAX_LISTED`] (268 million, 8 GiB of hashes) are indexed; the rest are left out, which
    /// [`ListIndex::len`] tells.
    pub fn new(hashes: &[[u8; 32]]) -> ListIndex {
        let hashes: Vec<[u64; 4]> = hashes.iter().take(MAX_LISTED).map(words).collect();
        let n = hashes.len();
        let mut bitmap = vec![0u64; 16 * 1024];
        let mut rank = vec![0u32; 16 * 1024];
        let mut starts: Vec<u32> = Vec::new();
        let mut ids = vec![0u32; 16 * n];
        let value = |w: &[u64; 4], k: usize| xor_chunk(w, &[0; 4], k) as usize;
        let mut next = vec![0u32; 65536];
        for k in 0..16 {
            // counting sort of the ids by chunk k: counts, bucket starts, then placement
            next.fill(0);
            for w in &hashes {
                next[value(w, k)] += 1;
            }
            let mut at = (k * n) as u32;
            for (v, count) in next.iter_mut().enumerate() {
                if v % 64 == 0 {
                    rank[k * 1024 + v / 64] = starts.len() as u32;
                }
                if *count > 0 {
                    bitmap[k * 1024 + v / 64] |= 1 << (v % 64);
                    starts.push(at);
                }
                (at, *count) = (at + *count, at);
            }
            starts.push(at);
            for (i, w) in hashes.iter().enumerate() {
                let at = &mut next[value(w, k)];
                ids[*at as usize] = (k as u32) << 28 | i as u32;
                *at += 1;
            }
        }
        ListIndex {
            hashes,
            bitmap,
            rank,
            starts,
            ids,
            masks: masks(MAX_LIST_RADIUS),
        }
    }

    /// The number of listed hashes.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether probing at these radii beats comparing with every listed hash: `p` probes
    /// find about `p n / 65 536` candidates among `n` random hashes, so by the costs above the
    /// index wins when `p + 24 p n / 65 536 ≤ 4 n`. Within 31 bits (272 probes) that is lists
    /// of 70 hashes or more; within 47 (2 192) of 686 or more; within 55 (6 672: radius 3 in
    /// half the chunks) of 4 287 or more; within 63 (11 152, radius 3 everywhere) never: 17 %
    /// of the list would be candidates, each costing more than a streamed comparison.
    fn indexed(&self, radii: &[Option<u32>; 16]) -> bool {
        let n = self.hashes.len() as u64;
        let mut probes = 0u64;
        for r in radii.iter().flatten() {
            if *r > MAX_LIST_RADIUS {
                return false;
            }
            probes += within(*r) as u64;
        }
        n >= MIN_INDEXED as u64 && probes * (65536 + CANDIDATE_COST * n) <= COMPARE_COST * 65536 * n
    }

    /// Appends to `out` `(i, distance)` for every listed hash `i` within `max_bits` of `h`,
    /// each once, in no particular order. Exact: the same set as comparing `h` with every
    /// listed hash, which is what it does when the list is short or `max_bits` large.
    pub fn matches(&self, h: &[u8; 32], max_bits: u32, out: &mut Vec<(u32, u32)>) {
        let q = words(h);
        let radii = radii(max_bits);
        if !self.indexed(&radii) {
            for (i, w) in self.hashes.iter().enumerate() {
                let d = distance(&q, w);
                if d <= max_bits {
                    out.push((i as u32, d));
                }
            }
            return;
        }
        // Two passes over a batch of probes: first the bitmap tests, branch-free, collecting
        // the non-empty buckets as `k << 16 | v`; then their ids. The second pass's loads do
        // not wait behind mispredicted branches, so they overlap.
        let mut hits = [0u32; HITS];
        let mut nh = 0;
        for (k, r) in radii.iter().enumerate() {
            let Some(r) = *r else { continue };
            let c = xor_chunk(&q, &[0; 4], k) as u16;
            let bitmap = &self.bitmap[k * 1024..(k + 1) * 1024];
            let tag = (k as u32) << 16;
            for piece in self.masks[..within(r)].chunks(HITS) {
                if nh + piece.len() > HITS {
                    self.candidates(&q, max_bits, &radii, &hits[..nh], out);
                    nh = 0;
                }
                for &m in piece {
                    let v = c ^ m;
                    hits[nh] = tag | u32::from(v);
                    nh += (bitmap[usize::from(v / 64)] >> (v % 64)) as usize & 1;
                }
            }
        }
        self.candidates(&q, max_bits, &radii, &hits[..nh], out);
    }

    /// The second pass of [`ListIndex::matches`]: the listed hashes in the buckets `hits`
    /// within `max_bits` of `q`. The buckets' entries are gathered first, and compared in
    /// batches of [`CANDIDATES`], again so that their loads overlap.
    fn candidates(
        &self,
        q: &[u64; 4],
        max_bits: u32,
        radii: &[Option<u32>; 16],
        hits: &[u32],
        out: &mut Vec<(u32, u32)>,
    ) {
        // bucket numbers first, a load apiece, independent: they overlap
        let mut buckets = [0u32; HITS];
        for (b, &hit) in buckets.iter_mut().zip(hits) {
            let (k, v) = ((hit >> 16) as usize, hit & 0xffff);
            let word = k * 1024 + (v / 64) as usize;
            let below = self.bitmap[word] & ((1u64 << (v % 64)) - 1);
            *b = self.rank[word] + below.count_ones();
        }
        let mut batch = [0u32; CANDIDATES];
        let mut nc = 0;
        for &j in &buckets[..hits.len()] {
            let j = j as usize;
            for &e in &self.ids[self.starts[j] as usize..self.starts[j + 1] as usize] {
                if nc == CANDIDATES {
                    self.compare(q, max_bits, radii, &batch, out);
                    nc = 0;
                }
                batch[nc] = e;
                nc += 1;
            }
        }
        self.compare(q, max_bits, radii, &batch[..nc], out);
    }

    /// Compares `q` with the listed hashes `batch` (entries of `ids`: chunk << 28 | id).
    fn compare(
        &self,
        q: &[u64; 4],
        max_bits: u32,
        radii: &[Option<u32>; 16],
        batch: &[u32],
        out: &mut Vec<(u32, u32)>,
    ) {
        for &e in batch {
            let (k, i) = ((e >> 28) as usize, e & ID);
            let w = &self.hashes[i as usize];
            let d = distance(q, w);
            // once per listed hash: at the first chunk within its radius of the query's,
            // where the probes found it too (only true matches get this far)
            if d <= max_bits && first_near_chunk(q, w, radii) == Some(k) {
                out.push((i, d));
            }
        }
    }
}

/// The listed hashes compared at once by [`ListIndex::candidates`].
const CANDIDATES: usize = 128;

/// The id bits of an entry of [`ListIndex`]'s `ids`; the 4 bits above are the chunk's number.
const ID: u32 = (1 << 28) - 1;

/// The probes of [`ListIndex::matches`] tested before their buckets are read: all 272 within
/// 31 bits, two chunks' within 47.
const HITS: usize = 288;

/// The first chunk in which `a` and `b` differ by no more than that chunk's radius.
fn first_near_chunk(a: &[u64; 4], b: &[u64; 4], radii: &[Option<u32>; 16]) -> Option<usize> {
    (0..16).find(|&k| radii[k].is_some_and(|r| xor_chunk(a, b, k).count_ones() <= r))
}

/// Calls `each(i, j)` once for every pair `i < j` of `hashes` within `max_bits` of each other
/// (equal hashes are a pair too). `poll` is called now and then, so that a caller can check for
/// interrupts. Exact: the result equals comparing every pair.
pub fn pairs(
    hashes: &[[u8; 32]],
    max_bits: u32,
    each: &mut dyn FnMut(usize, usize),
    poll: &mut dyn FnMut(),
) {
    let index = ListIndex::new(hashes);
    let n = index.len();
    if !index.indexed(&radii(max_bits)) {
        // the triangle of comparisons: half the work of querying each member
        for i in 0..n {
            if i % 1024 == 0 {
                poll();
            }
            let a = &index.hashes[i];
            for (j, b) in index.hashes.iter().enumerate().skip(i + 1) {
                if distance(a, b) <= max_bits {
                    each(i, j);
                }
            }
        }
        return;
    }
    let mut found = Vec::new();
    for (i, h) in hashes.iter().take(n).enumerate() {
        if i % 1024 == 0 {
            poll();
        }
        found.clear();
        index.matches(h, max_bits, &mut found);
        found.sort_unstable();
        for &(j, _) in &found {
            if j as usize > i {
                each(i, j as usize);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: the same hashes every run, no dependency
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
            let mut done = 0;
            while done < bits {
                let b = (self.next() % 256) as usize;
                if (out[b / 8] ^ h[b / 8]) & (0x80 >> (b % 8)) == 0 {
                    out[b / 8] ^= 0x80 >> (b % 8);
                    done += 1;
                }
            }
            out
        }
    }

    fn hamming(a: &[u8; 32], b: &[u8; 32]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    /// `n` random hashes, and `near` copies of random ones of them with 0..=40 bits flipped
    /// (30, 31 and 32 bits, at the edge of PDQ's threshold, a third of the time)
    fn corpus(rng: &mut Rng, n: usize, near: usize) -> Vec<[u8; 32]> {
        let mut v: Vec<[u8; 32]> = (0..n).map(|_| rng.hash()).collect();
        for _ in 0..near {
            let base = v[(rng.next() % n as u64) as usize];
            let bits = match rng.next() % 6 {
                0 => 30,
                1 => 31,
                2 => 32,
                _ => (rng.next() % 41) as u32,
            };
            v.push(rng.flip(&base, bits));
        }
        v
    }

    const MAX_BITS: [u32; 8] = [0, 1, 15, 16, 31, 32, 47, 70];

    #[test]
    fn tokens_of_known_hashes() {
        let t: Vec<i32> = (0..16).map(|i| i * 65536).collect();
        assert_eq!(tokens(&[0; 32]).to_vec(), t);
        let t: Vec<i32> = (0..16).map(|i| i * 65536 + 65535).collect();
        assert_eq!(tokens(&[0xff; 32]).to_vec(), t);
        // the first bit of the text is the first chunk's most significant one
        let mut h = [0u8; 32];
        h[0] = 0x80;
        assert_eq!(tokens(&h)[0], 0x8000);
        let mut t: Vec<i32> = (0..16).map(|i| i * 65536).collect();
        t[0] = 0x8000;
        assert_eq!(tokens(&h).to_vec(), t);
        // the last chunk: bytes 30 and 31
        h[30] = 0x12;
        h[31] = 0x34;
        assert_eq!(tokens(&h)[15], 15 * 65536 + 0x1234);
    }

    #[test]
    fn probe_token_counts() {
        let h = [0u8; 32];
        assert_eq!(probe_tokens(&h, 0).unwrap(), [0]);
        assert_eq!(probe_tokens(&h, 5).unwrap().len(), 6);
        assert_eq!(probe_tokens(&h, 15).unwrap().len(), 16);
        assert_eq!(probe_tokens(&h, 16).unwrap().len(), 17 + 15);
        assert_eq!(probe_tokens(&h, 31).unwrap().len(), 272);
        assert_eq!(probe_tokens(&h, 32).unwrap().len(), 137 + 15 * 17);
        assert_eq!(probe_tokens(&h, 47).unwrap().len(), 2192);
        assert!(probe_tokens(&h, 48).is_none());
        // the query's own tokens come first in each chunk, and no token repeats
        let q = Rng(7).hash();
        let p = probe_tokens(&q, 31).unwrap();
        for (i, t) in tokens(&q).into_iter().enumerate() {
            assert_eq!(p[17 * i], t);
        }
        let mut s = p.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), p.len());
        assert!(p.iter().all(|t| (0..16 * 65536).contains(t)));
    }

    #[test]
    fn probes_cover_every_hash_within_max_bits() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for max_bits in [0, 1, 2, 5, 15, 16, 17, 30, 31, 32, 33, 40, 46, 47] {
            let radii = radii(max_bits);
            for _ in 0..300 {
                let q = rng.hash();
                let probes = probe_tokens(&q, max_bits).unwrap();
                let x = if rng.next().is_multiple_of(2) {
                    // anywhere, at or near the limit
                    let bits = max_bits.saturating_sub((rng.next() % 3) as u32);
                    rng.flip(&q, bits)
                } else {
                    // the worst case: one bit more than its radius in every chunk but one
                    // probed chunk, which differs by exactly its radius (max_bits in all)
                    let probed: Vec<usize> = (0..16).filter(|&k| radii[k].is_some()).collect();
                    let j = probed[(rng.next() % probed.len() as u64) as usize];
                    let mut x = q;
                    for (k, r) in radii.iter().enumerate() {
                        let d = r.map_or(0, |r| if k == j { r } else { r + 1 });
                        let mut flipped = 0;
                        while flipped < d {
                            let bit = 16 * k + (rng.next() % 16) as usize;
                            if (x[bit / 8] ^ q[bit / 8]) & (0x80 >> (bit % 8)) == 0 {
                                x[bit / 8] ^= 0x80 >> (bit % 8);
                                flipped += 1;
                            }
                        }
                    }
                    assert_eq!(hamming(&q, &x), max_bits);
                    x
                };
                assert!(hamming(&q, &x) <= max_bits);
                assert!(
                    tokens(&x).iter().any(|t| probes.contains(t)),
                    "within {max_bits} but no shared token"
                );
            }
        }
    }

    #[test]
    fn radii_spend_max_bits_plus_one() {
        for max_bits in 0..200 {
            let r = radii(max_bits);
            let budget: u32 = r.iter().map(|r| r.map_or(0, |r| r + 1)).sum();
            assert_eq!(budget, max_bits + 1);
            assert_eq!(r.iter().flatten().max(), Some(&(max_bits / 16)));
        }
        let m = masks(3);
        assert_eq!(m.len(), within(3));
        for r in 0..=3 {
            let mut some: Vec<u16> = m[..within(r)].to_vec();
            assert!(some.iter().all(|m| m.count_ones() <= r));
            some.sort_unstable();
            some.dedup();
            assert_eq!(some.len(), within(r));
        }
    }

    fn brute(list: &[[u8; 32]], h: &[u8; 32], max_bits: u32) -> Vec<(u32, u32)> {
        list.iter()
            .enumerate()
            .filter_map(|(i, x)| {
                let d = hamming(h, x);
                (d <= max_bits).then_some((i as u32, d))
            })
            .collect()
    }

    #[test]
    fn matches_equal_comparing_every_listed_hash() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // 9 000 hashes are probed up to radius 1, 12 000 up to radius 2 (see `indexed`); 70
        // are probed at radius 0 only, 40 never
        for (n, near) in [(6000, 3000), (10_000, 2000), (50, 20), (30, 10), (0, 0)] {
            let list = corpus(&mut rng, n, near);
            let index = ListIndex::new(&list);
            assert_eq!(index.len(), list.len());
            // queries: near copies of listed hashes, listed hashes themselves, random ones
            let mut queries: Vec<[u8; 32]> = (0..200).map(|_| rng.hash()).collect();
            if !list.is_empty() {
                for _ in 0..400 {
                    let base = list[(rng.next() % list.len() as u64) as usize];
                    let bits = [0, 1, 15, 16, 30, 31, 32, 33, 46, 47, 48, 60, 70]
                        [(rng.next() % 13) as usize];
                    queries.push(rng.flip(&base, bits));
                }
                queries.extend(list.iter().step_by(97));
            }
            let mut got = Vec::new();
            for max_bits in MAX_BITS {
                let mut total = 0;
                for q in &queries {
                    got.clear();
                    index.matches(q, max_bits, &mut got);
                    got.sort_unstable();
                    let want = brute(&list, q, max_bits);
                    total += want.len();
                    assert_eq!(got, want, "n {n}, max_bits {max_bits}");
                }
                if n > 0 {
                    assert!(total > 0, "n {n}, max_bits {max_bits}: nothing compared");
                }
            }
        }
    }

    #[test]
    fn the_index_serves_the_usual_thresholds() {
        let list: Vec<[u8; 32]> = {
            let mut rng = Rng(1);
            (0..10_000).map(|_| rng.hash()).collect()
        };
        let index = ListIndex::new(&list);
        for max_bits in [0, 16, 31, 47, 48, 55] {
            assert!(index.indexed(&radii(max_bits)), "{max_bits}");
        }
        for max_bits in [62, 63, 64, 256, u32::MAX] {
            assert!(!index.indexed(&radii(max_bits)), "{max_bits}");
        }
        assert!(!ListIndex::new(&list[..63]).indexed(&radii(0)));
        // the long list of tests/pdq_near.rs is probed at radius 3 in some chunks
        let long: Vec<[u8; 32]> = list.iter().cycle().take(50_000).copied().collect();
        let long = ListIndex::new(&long);
        assert!(long.indexed(&radii(55)) && long.indexed(&radii(59)));
        assert!(!long.indexed(&radii(63)));
    }

    #[test]
    fn crowded_buckets_and_long_probes() {
        // 3 000 hashes alike in their first 128 bits: buckets far longer than a batch of
        // candidates; and a 3 000-hash list is probed at radius 1 in all 16 chunks
        let mut rng = Rng(99);
        let head = rng.hash();
        let list: Vec<[u8; 32]> = (0..3000)
            .map(|i| {
                let mut h = rng.hash();
                h[..16].copy_from_slice(&head[..16]);
                if i % 3 == 0 {
                    let bits = (rng.next() % 4) as u32;
                    h = rng.flip(&h, bits);
                }
                h
            })
            .collect();
        let index = ListIndex::new(&list);
        let mut got = Vec::new();
        for max_bits in [0, 16, 31, 70, 100] {
            for q in list.iter().step_by(101) {
                let q = rng.flip(q, max_bits.min(40) / 2);
                got.clear();
                index.matches(&q, max_bits, &mut got);
                got.sort_unstable();
                assert_eq!(got, brute(&list, &q, max_bits), "max_bits {max_bits}");
            }
        }
    }

    fn brute_pairs(h: &[[u8; 32]], max_bits: u32) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for i in 0..h.len() {
            for j in i + 1..h.len() {
                if hamming(&h[i], &h[j]) <= max_bits {
                    out.push((i, j));
                }
            }
        }
        out
    }

    #[test]
    fn pairs_equal_all_pairs() {
        let mut rng = Rng(0x1234_5678);
        for (n, near) in [(3000, 2000), (50, 40)] {
            let mut h = corpus(&mut rng, n, near);
            // an exact duplicate is a pair at every threshold
            h.push(h[3]);
            for max_bits in MAX_BITS {
                let mut got = Vec::new();
                let mut polls = 0;
                pairs(&h, max_bits, &mut |i, j| got.push((i, j)), &mut || {
                    polls += 1
                });
                got.sort_unstable();
                let want = brute_pairs(&h, max_bits);
                assert!(want.contains(&(3, h.len() - 1)));
                assert_eq!(got.len(), want.len(), "n {n}, max_bits {max_bits}");
                assert_eq!(got, want, "n {n}, max_bits {max_bits}");
                assert!(polls > 0);
            }
        }
        pairs(&[], 31, &mut |_, _| unreachable!(), &mut || {});
    }
}
