//! Meta's PDQ perceptual hash (256 bits and a quality score), bit for bit as the PyPI package
//! `pdqhash` 0.2.8 (Cython over ThreatExchange's C++ reference) computes it from RGB8 pixels:
//! `pdqhash.compute(numpy.asarray(Image.open(f).convert('RGB')))` and `compute_dihedral(...)`.
//!
//! The reference's steps, each reproduced in its own precision and order, because PDQ's bits are
//! comparisons with a median and a change in the last place of one float can flip one:
//! 1. Luma: the binding (not the C++, which multiplies in single precision) computes
//!    `R*0.299 + G*0.587 + B*0.114` in numpy's float64, in that order, and rounds it to float32.
//! 2. Blur: a Jarosz tent, i.e. two rounds of a running-sum box filter along rows, then along
//!    columns, in float32, with windows `ceil(n / 128)` (n: the row's or column's length). The
//!    running sums are updated (add the new sample, then subtract the old one) and divided by the
//!    window's count exactly as the reference does, so rounding drifts in the same way. Skipped
//!    by `compute` (not by `compute_dihedral`) when the image is exactly 64x64.
//! 3. Decimation to 64x64 at the sample centres `floor((i + 0.5) * n / 64)` (in double).
//! 4. Quality: the sum of `|trunc((u - v) * 100 / 255)|` over neighbouring samples, / 90, ≤ 100.
//! 5. DCT: rows 1..16 of a 64-point DCT-II matrix (float, from double cosines), `D A Dᵀ` summed
//!    in index order. 6. Bits: coefficient > the Torben median of the 256.
//!
//! Images under 5 pixels on a side hash to zero with quality 0, as in the reference.
//!
//! Streaming instead of the reference's two full-image float buffers: the passes run a group of
//! 8 image rows at a time (rows in SIMD lanes for the sequential row sums; every column at once for
//! the column sums, over a ring of the last `window + 1` rows), and only the 64 needed columns and
//! rows of the second round are divided out. Every sample sees the same operations in the same
//! order as in the reference, so the bits are the same; memory is `O(width * window)` and time
//! linear in the pixels.
//!
//! ## Bit order
//! The reference sets bit `k = 16 i + j` for DCT coefficient (row i, column j) in word
//! `w[k >> 4]` at bit `k & 15`, and prints the words `w[15]` .. `w[0]` as 4 hex digits each, so
//! its 64-digit text is the 256-bit number `Σ 2^k`. [`Pdq::hash`] is the bytes of that text:
//! bit k lives in `hash[31 - k / 8]` at bit `k % 8` (the first text bit, `hash[0]`'s most
//! significant, is coefficient (15, 15)); `w[i] = u16::from_be_bytes([hash[30 - 2 i], hash[31 - 2 i]])`.
//! pdqhash's numpy vector `v` has `v[n]` = bit `255 - n`, i.e. the text's bits in reading order,
//! so `numpy.packbits(v)` gives these 32 bytes and [`to_hex`] gives the reference's text.

use std::sync::OnceLock;

use crate::decode::RgbImage;

/// A PDQ hash and its quality (0 to 100; the reference calls a hash under 50 unreliable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pdq {
    /// The reference's 64-digit hex text as 32 bytes (see the module's "Bit order").
    pub hash: [u8; 32],
    pub quality: u32,
}

/// The eight symmetries of the square, in the order of the reference's (and `compute_dihedral`'s)
/// output. Each is the hash of the image so transformed, derived from the original's DCT by
/// sign changes and a transposition (exact in arithmetic, close but not bit-equal to hashing the
/// transformed pixels, whose blur and sample centres differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dihedral {
    Original,
    /// A quarter turn counter-clockwise (`numpy.rot90(a)`).
    Rotate90,
    Rotate180,
    /// A quarter turn clockwise.
    Rotate270,
    /// Upside down (rows reversed).
    FlipX,
    /// Mirrored (columns reversed).
    FlipY,
    /// Transposed (about the main diagonal).
    FlipPlus1,
    /// Transposed about the anti-diagonal.
    FlipMinus1,
}

impl Dihedral {
    /// The reference's order: [`pdq_dihedral`]'s hashes are in this order.
    pub const ALL: [Dihedral; 8] = [
        Dihedral::Original,
        Dihedral::Rotate90,
        Dihedral::Rotate180,
        Dihedral::Rotate270,
        Dihedral::FlipX,
        Dihedral::FlipY,
        Dihedral::FlipPlus1,
        Dihedral::FlipMinus1,
    ];

    /// Where coefficient (i, j) goes (transposed or not) and whether it changes sign.
    fn maps(self, i: usize, j: usize) -> (bool, bool) {
        let (odd_i, odd_j, odd_sum) = (i & 1 == 1, j & 1 == 1, (i + j) & 1 == 1);
        match self {
            Dihedral::Original => (false, false),
            Dihedral::Rotate90 => (true, !odd_j),
            Dihedral::Rotate180 => (false, odd_sum),
            Dihedral::Rotate270 => (true, !odd_i),
            Dihedral::FlipX => (false, !odd_i),
            Dihedral::FlipY => (false, !odd_j),
            Dihedral::FlipPlus1 => (true, false),
            Dihedral::FlipMinus1 => (true, odd_sum),
        }
    }
}

/// Images smaller than this on either side hash to zero (the reference's `MIN_HASHABLE_DIM`).
const MIN_SIDE: usize = 5;
/// The downsampled grid's side.
const GRID: usize = 64;
/// Rows filtered together in SIMD lanes by the row passes.
const LANES: usize = 8;

/// The PDQ hash of an image, as `pdqhash.compute` gives it.
pub fn pdq(img: &RgbImage) -> Pdq {
    match grid(img, false) {
        None => Pdq {
            hash: [0; 32],
            quality: 0,
        },
        Some(g) => Pdq {
            hash: bits(&dct64_to16(&g)),
            quality: quality(&g),
        },
    }
}

/// The eight dihedral hashes ([`Dihedral::ALL`]'s order) and the quality (one, shared: the
/// reference computes it once), as `pdqhash.compute_dihedral` gives them. The first equals
/// [`pdq`]'s hash except, rarely, for a 64x64 image: the reference blurs it here and not there.
pub fn pdq_dihedral(img: &RgbImage) -> ([[u8; 32]; 8], u32) {
    let Some(g) = grid(img, true) else {
        return ([[0; 32]; 8], 0);
    };
    let dct = dct64_to16(&g);
    let mut out = [[0u8; 32]; 8];
    let mut moved = [0f32; 256];
    for (hash, v) in out.iter_mut().zip(Dihedral::ALL) {
        for i in 0..16 {
            for j in 0..16 {
                let (transpose, negate) = v.maps(i, j);
                let x = dct[i * 16 + j];
                let at = if transpose { j * 16 + i } else { i * 16 + j };
                moved[at] = if negate { -x } else { x };
            }
        }
        *hash = bits(&moved);
    }
    (out, quality(&g))
}

/// 64 lowercase hex digits: the reference's text for the hash.
pub fn to_hex(hash: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for &b in hash {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses 64 hex digits (either case; no prefix, sign or spaces).
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Number of differing bits (0 to 256).
pub fn hamming(a: &[u8; 32], b: &[u8; 32]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// The binding's luma: float64 products summed left to right, rounded to float32.
#[inline(always)]
fn luma(p: &[u8]) -> f32 {
    (f64::from(p[0]) * 0.299 + f64::from(p[1]) * 0.587 + f64::from(p[2]) * 0.114) as f32
}

/// The reference's Jarosz window for a side of `n` samples going to 64: `ceil(n / 128)`.
fn window(n: usize) -> usize {
    n.div_ceil(2 * GRID)
}

/// The sample the reference's decimation takes for output `i` of 64 from `n`.
fn centre(i: usize, n: usize) -> usize {
    ((i as f64 + 0.5) * n as f64 / GRID as f64) as usize
}

/// The blurred and decimated 64x64 luma grid, row-major; `None` under 5 pixels a side.
/// `blur_64` is false for `compute`, which takes a 64x64 image's luma as it is.
fn grid(img: &RgbImage, blur_64: bool) -> Option<Vec<f32>> {
    let width = img.width as usize;
    // the rows present (all of them for what decode_rgb returns)
    let height = (img.height as usize).min(img.data.len() / (3 * width.max(1)));
    if width < MIN_SIDE || height < MIN_SIDE {
        return None;
    }
    let data = &img.data[..3 * width * height];
    if width == GRID && height == GRID && !blur_64 {
        return Some(data.chunks_exact(3).map(luma).collect());
    }
    let mut g = vec![0f32; GRID * GRID];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { downsample_avx2(data, width, height, &mut g) };
        return Some(g);
    }
    downsample(data, width, height, &mut g);
    Some(g)
}

/// [`downsample`] compiled for AVX2 (the same IEEE operations, 8 lanes; no FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn downsample_avx2(data: &[u8], width: usize, height: usize, g: &mut [f32]) {
    downsample(data, width, height, g)
}

/// Luma → the reference's two Jarosz rounds → decimation into `g`, streamed a group of
/// [`LANES`] rows at a time: round 1's row pass (the rows in lanes) → its column pass
/// ([`ColumnBox`], all columns) → round 2's row pass ([`SecondRound`], divided only at the 64
/// sampled columns) → its column pass (64 columns, divided only at the 64 sampled rows).
#[inline(always)]
fn downsample(data: &[u8], width: usize, height: usize, g: &mut [f32]) {
    let along_rows = window(width);
    let along_cols = window(height);
    let mut rows = vec![0f32; LANES * width];
    let mut lanes_in = vec![[0f32; LANES]; width];
    let mut lanes_out = vec![[0f32; LANES]; width];
    let mut first = ColumnBox::new(height, along_cols, width, None);
    let mut second = SecondRound::new(width, height, along_rows, along_cols, g);
    for group in data.chunks(3 * width * LANES) {
        let n = group.len() / (3 * width);
        for (out, rgb) in rows
            .chunks_exact_mut(width)
            .zip(group.chunks_exact(3 * width))
        {
            for (o, px) in out.iter_mut().zip(rgb.chunks_exact(3)) {
                *o = luma(px);
            }
        }
        rows_to_lanes(&rows, &mut lanes_in);
        run_box(&lanes_in, along_rows, |o, sum, count| {
            lanes_out[o] = sum.map(|s| s / count);
        });
        lanes_to_rows(&lanes_out, &mut rows);
        for row in rows.chunks_exact(width).take(n) {
            first.slot().copy_from_slice(row);
            if first.advance(second.next_row()).is_some() {
                second.row_done();
            }
        }
    }
    while first.finish_one(second.next_row()).is_some() {
        second.row_done();
    }
    second.finish();
}

/// A [`LANES`]-row block, row-major (`width` each), to `width` cells of one sample per row: 8x8
/// tiles that the compiler turns into shuffles.
#[inline(always)]
fn rows_to_lanes(rows: &[f32], lanes: &mut [[f32; LANES]]) {
    let width = lanes.len();
    let tiles = width / LANES * LANES;
    for (j0, cells) in (0..tiles).step_by(LANES).zip(lanes.chunks_exact_mut(LANES)) {
        let tile: [[f32; LANES]; LANES] =
            std::array::from_fn(|k| std::array::from_fn(|jj| rows[k * width + j0 + jj]));
        for (jj, cell) in cells.iter_mut().enumerate() {
            *cell = std::array::from_fn(|k| tile[k][jj]);
        }
    }
    for (j, cell) in lanes.iter_mut().enumerate().skip(tiles) {
        *cell = std::array::from_fn(|k| rows[k * width + j]);
    }
}

/// The inverse of [`rows_to_lanes`].
#[inline(always)]
fn lanes_to_rows(lanes: &[[f32; LANES]], rows: &mut [f32]) {
    let width = lanes.len();
    let tiles = width / LANES * LANES;
    for (j0, cells) in (0..tiles).step_by(LANES).zip(lanes.chunks_exact(LANES)) {
        for k in 0..LANES {
            let row: [f32; LANES] = std::array::from_fn(|jj| cells[jj][k]);
            rows[k * width + j0..k * width + j0 + LANES].copy_from_slice(&row);
        }
    }
    for (j, cell) in lanes.iter().enumerate().skip(tiles) {
        for (k, &x) in cell.iter().enumerate() {
            rows[k * width + j] = x;
        }
    }
}

/// The reference's `box1DFloat` over `L` independent sequences at once (element `[x][lane]`):
/// a window of `w` samples centred on the output (the first `w / 2` outputs and the last
/// `(w + 2) / 2 - 1` see a partial window), as a running sum: add the sample entering, subtract
/// the one leaving, divide by the samples in the window. `write(o, sums, count)` gets output `o`.
#[inline(always)]
fn run_box<const L: usize>(
    input: &[[f32; L]],
    w: usize,
    mut write: impl FnMut(usize, &[f32; L], f32),
) {
    let n = input.len();
    let half = (w + 2) / 2;
    let mut sum = [0f32; L];
    let mut count = 0u32;
    // the first half - 1 samples, no output yet
    for x in &input[..half - 1] {
        for (s, v) in sum.iter_mut().zip(x) {
            *s += v;
        }
        count += 1;
    }
    // the window grows to w
    for (o, x) in input[half - 1..w].iter().enumerate() {
        for (s, v) in sum.iter_mut().zip(x) {
            *s += v;
        }
        count += 1;
        write(o, &sum, count as f32);
    }
    // full windows
    let mut o = w + 1 - half;
    for (enter, leave) in input[w..].iter().zip(&input[..n - w]) {
        for ((s, a), b) in sum.iter_mut().zip(enter).zip(leave) {
            *s += a;
            *s -= b;
        }
        write(o, &sum, count as f32);
        o += 1;
    }
    // the window shrinks at the end
    for leave in &input[n - w..n - w + half - 1] {
        for (s, b) in sum.iter_mut().zip(leave) {
            *s -= b;
        }
        count -= 1;
        write(o, &sum, count as f32);
        o += 1;
    }
}

/// The reference's box filter down the columns of a `rows`-row matrix `width` wide, fed one row at
/// a time (write it into [`ColumnBox::slot`], then [`ColumnBox::advance`]; after the last,
/// [`ColumnBox::finish_one`] until `None`), each output row written to the slice given and its
/// index returned: the same per-column operations as [`run_box`], every column at once, over a
/// ring of the last `w + 1` input rows. (No callbacks: closures would not be compiled for AVX2.)
struct ColumnBox {
    rows: usize,
    w: usize,
    half: usize,
    width: usize,
    ring: Vec<f32>,
    sum: Vec<f32>,
    count: u32,
    pushed: usize,
    /// Outputs of the final shrinking windows taken so far.
    finished: usize,
    /// The output rows to divide out and write (`None`: all).
    wanted: Option<Vec<bool>>,
}

impl ColumnBox {
    fn new(rows: usize, w: usize, width: usize, wanted: Option<Vec<bool>>) -> ColumnBox {
        ColumnBox {
            rows,
            w,
            half: (w + 2) / 2,
            width,
            ring: vec![0f32; (w + 1) * width],
            sum: vec![0f32; width],
            count: 0,
            pushed: 0,
            finished: 0,
            wanted,
        }
    }

    /// Where the next input row goes.
    #[inline(always)]
    fn slot(&mut self) -> &mut [f32] {
        let at = (self.pushed % (self.w + 1)) * self.width;
        &mut self.ring[at..at + self.width]
    }

    /// Takes in the row just written to [`ColumnBox::slot`]; the output row it completes, if any
    /// (and wanted), is written to `out`.
    #[inline(always)]
    fn advance(&mut self, out: &mut [f32]) -> Option<usize> {
        let i = self.pushed;
        self.pushed += 1;
        let at = (i % (self.w + 1)) * self.width;
        let enter = &self.ring[at..at + self.width];
        if i < self.w {
            for (s, a) in self.sum.iter_mut().zip(enter) {
                *s += a;
            }
            self.count += 1;
            if i + 1 < self.half {
                return None;
            }
        } else {
            let at = ((i - self.w) % (self.w + 1)) * self.width;
            let leave = &self.ring[at..at + self.width];
            for ((s, a), b) in self.sum.iter_mut().zip(enter).zip(leave) {
                *s += a;
                *s -= b;
            }
        }
        self.emit(i + 1 - self.half, out)
    }

    /// After the last row, one output whose window shrinks, until `None` (skipping unwanted
    /// ones).
    #[inline(always)]
    fn finish_one(&mut self, out: &mut [f32]) -> Option<usize> {
        while self.finished + 1 < self.half {
            let t = self.finished;
            self.finished += 1;
            let leave = self.rows - self.w + t;
            let at = (leave % (self.w + 1)) * self.width;
            for (s, b) in self.sum.iter_mut().zip(&self.ring[at..at + self.width]) {
                *s -= b;
            }
            self.count -= 1;
            if let Some(o) = self.emit(self.rows + 1 - self.half + t, out) {
                return Some(o);
            }
        }
        None
    }

    #[inline(always)]
    fn emit(&mut self, o: usize, out: &mut [f32]) -> Option<usize> {
        if self.wanted.as_ref().is_some_and(|w| !w[o]) {
            return None;
        }
        let count = self.count as f32;
        for (x, s) in out.iter_mut().zip(&self.sum) {
            *x = s / count;
        }
        Some(o)
    }
}

/// The second Jarosz round: rows from the first round's column pass, gathered [`LANES`] at a
/// time for the row pass (divided only at the sampled columns), then down the 64 sampled columns,
/// the sampled rows written into the grid.
struct SecondRound<'g> {
    along_rows: usize,
    width: usize,
    /// Up to [`LANES`] rows of the first round, row-major.
    rows: Vec<f32>,
    filled: usize,
    lanes_in: Vec<[f32; LANES]>,
    lanes_out: Vec<[f32; LANES]>,
    col_wanted: Vec<bool>,
    /// The sampled columns and rows.
    at_col: [usize; GRID],
    at_row: [usize; GRID],
    down: ColumnBox,
    down_out: [f32; GRID],
    grid: &'g mut [f32],
}

impl<'g> SecondRound<'g> {
    fn new(
        width: usize,
        height: usize,
        along_rows: usize,
        along_cols: usize,
        grid: &'g mut [f32],
    ) -> SecondRound<'g> {
        let at_col: [usize; GRID] = std::array::from_fn(|j| centre(j, width));
        let at_row: [usize; GRID] = std::array::from_fn(|i| centre(i, height));
        let mut col_wanted = vec![false; width];
        for &c in &at_col {
            col_wanted[c] = true;
        }
        let mut row_wanted = vec![false; height];
        for &r in &at_row {
            row_wanted[r] = true;
        }
        SecondRound {
            along_rows,
            width,
            rows: vec![0f32; LANES * width],
            filled: 0,
            lanes_in: vec![[0f32; LANES]; width],
            lanes_out: vec![[0f32; LANES]; width],
            col_wanted,
            at_col,
            at_row,
            down: ColumnBox::new(height, along_cols, GRID, Some(row_wanted)),
            down_out: [0f32; GRID],
            grid,
        }
    }

    /// Where the first round's next row goes; [`SecondRound::row_done`] once it is there.
    #[inline(always)]
    fn next_row(&mut self) -> &mut [f32] {
        let at = self.filled * self.width;
        &mut self.rows[at..at + self.width]
    }

    #[inline(always)]
    fn row_done(&mut self) {
        self.filled += 1;
        if self.filled == LANES {
            self.flush();
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        rows_to_lanes(&self.rows, &mut self.lanes_in);
        let (wanted, out) = (&self.col_wanted, &mut self.lanes_out);
        run_box(&self.lanes_in, self.along_rows, |o, sum, count| {
            if wanted[o] {
                out[o] = sum.map(|s| s / count);
            }
        });
        for k in 0..self.filled {
            for (x, &c) in self.down.slot().iter_mut().zip(&self.at_col) {
                *x = self.lanes_out[c][k];
            }
            if let Some(o) = self.down.advance(&mut self.down_out) {
                place(&self.at_row, self.grid, o, &self.down_out);
            }
        }
        self.filled = 0;
    }

    #[inline(always)]
    fn finish(mut self) {
        self.flush();
        while let Some(o) = self.down.finish_one(&mut self.down_out) {
            place(&self.at_row, self.grid, o, &self.down_out);
        }
    }
}

/// Copies filtered row `o` to every grid row that samples it (several when the image has fewer
/// than 64 rows).
#[inline(always)]
fn place(at_row: &[usize; GRID], grid: &mut [f32], o: usize, row: &[f32]) {
    for (i, _) in at_row.iter().enumerate().filter(|&(_, &r)| r == o) {
        grid[i * GRID..(i + 1) * GRID].copy_from_slice(row);
    }
}

/// The reference's quality heuristic on the 64x64 grid.
fn quality(g: &[f32]) -> u32 {
    let step = |u: f32, v: f32| (((u - v) * 100.0 / 255.0) as i32).abs();
    let mut sum = 0i32;
    for i in 0..GRID - 1 {
        for j in 0..GRID {
            sum += step(g[i * GRID + j], g[(i + 1) * GRID + j]);
        }
    }
    for i in 0..GRID {
        for j in 0..GRID - 1 {
            sum += step(g[i * GRID + j], g[i * GRID + j + 1]);
        }
    }
    (sum / 90).min(100) as u32
}

/// Rows 1..=16 of the 64-point DCT-II matrix, as the reference builds it, and its transpose.
struct DctMatrix {
    /// 16 x 64: `d[i * 64 + k]`.
    d: [f32; 16 * GRID],
    /// 64 x 16: `t[k * 16 + i] = d[i * 64 + k]`.
    t: [f32; GRID * 16],
}

fn dct_matrix() -> &'static DctMatrix {
    static M: OnceLock<DctMatrix> = OnceLock::new();
    M.get_or_init(|| {
        // a float scale, times a double cosine, rounded to float: the reference's types
        let scale = (2.0f64 / GRID as f64).sqrt() as f32;
        let mut m = DctMatrix {
            d: [0.0; 16 * GRID],
            t: [0.0; GRID * 16],
        };
        for i in 0..16 {
            for k in 0..GRID {
                let angle =
                    std::f64::consts::PI / 2.0 / GRID as f64 * (i + 1) as f64 * (2 * k + 1) as f64;
                let v = (f64::from(scale) * angle.cos()) as f32;
                m.d[i * GRID + k] = v;
                m.t[k * 16 + i] = v;
            }
        }
        m
    })
}

/// `D A Dᵀ` for the 64x64 grid `A`: 16x16, row-major. Each sum runs over k in order from 0.0, as
/// in the reference (vectorized across the other index, which changes no sum's order).
fn dct64_to16(a: &[f32]) -> [f32; 256] {
    let m = dct_matrix();
    let mut t = [0f32; 16 * GRID];
    for (acc, d) in t.chunks_exact_mut(GRID).zip(m.d.chunks_exact(GRID)) {
        for (&dk, arow) in d.iter().zip(a.chunks_exact(GRID)) {
            for (s, &x) in acc.iter_mut().zip(arow) {
                *s += dk * x;
            }
        }
    }
    let mut b = [0f32; 256];
    for (acc, trow) in b.chunks_exact_mut(16).zip(t.chunks_exact(GRID)) {
        for (&tk, dcol) in trow.iter().zip(m.t.chunks_exact(16)) {
            for (s, &d) in acc.iter_mut().zip(dcol) {
                *s += tk * d;
            }
        }
    }
    b
}

/// Bit k set where coefficient k exceeds the median, packed as the reference's text.
fn bits(dct: &[f32; 256]) -> [u8; 32] {
    let median = torben(dct);
    let mut h = [0u8; 32];
    for (k, &x) in dct.iter().enumerate() {
        if x > median {
            h[31 - k / 8] |= 1 << (k % 8);
        }
    }
    h
}

/// Torben Mogensen's median (the reference's; for an even count, the lower middle unless ties
/// say otherwise): bisect on value between the smallest and largest sample. Ends because every
/// round excludes at least one distinct value.
fn torben(m: &[f32]) -> f32 {
    let n = m.len();
    let mut min = m[0];
    let mut max = m[0];
    for &x in &m[1..] {
        if x < min {
            min = x;
        }
        if x > max {
            max = x;
        }
    }
    let half = n.div_ceil(2);
    loop {
        let guess = (min + max) / 2.0;
        let (mut less, mut greater, mut equal) = (0, 0, 0);
        let (mut max_lt, mut min_gt) = (min, max);
        for &x in m {
            if x < guess {
                less += 1;
                if x > max_lt {
                    max_lt = x;
                }
            } else if x > guess {
                greater += 1;
                if x < min_gt {
                    min_gt = x;
                }
            } else {
                equal += 1;
            }
        }
        if less <= half && greater <= half {
            return if less >= half {
                max_lt
            } else if less + equal >= half {
                guess
            } else {
                min_gt
            };
        }
        if less > greater {
            max = max_lt;
        } else {
            min = min_gt;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&f(x, y));
            }
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Something with structure at every scale, deterministic.
    fn scene(width: u32, height: u32) -> RgbImage {
        image(width, height, |x, y| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let r = 128.0 + 100.0 * (fx * 9.0 + fy * 3.0).sin();
            let g = 255.0 * fx * fy;
            let b = if (x / 7 + y / 11) % 3 == 0 {
                200.0
            } else {
                30.0 + 90.0 * fy
            };
            [r as u8, g as u8, b as u8]
        })
    }

    fn rotate_ccw(img: &RgbImage) -> RgbImage {
        let (w, h) = (img.width, img.height);
        // numpy.rot90: out[y][x] = in[x][w - 1 - y], out is w rows of h
        image(h, w, |x, y| {
            let at = ((x * w + (w - 1 - y)) * 3) as usize;
            [img.data[at], img.data[at + 1], img.data[at + 2]]
        })
    }

    fn transpose(img: &RgbImage) -> RgbImage {
        image(img.height, img.width, |x, y| {
            let at = ((x * img.width + y) * 3) as usize;
            [img.data[at], img.data[at + 1], img.data[at + 2]]
        })
    }

    #[test]
    fn hex_round_trip() {
        let mut h = [0u8; 32];
        h[0] = 0xa5;
        h[31] = 0x01;
        let text = to_hex(&h);
        assert_eq!(text.len(), 64);
        assert!(text.starts_with("a500") && text.ends_with("0001"));
        assert_eq!(parse_hex(&text), Some(h));
        assert_eq!(parse_hex(&text.to_uppercase()), Some(h));
    }

    #[test]
    fn parse_refuses_malformed_text() {
        let ok = "f".repeat(64);
        assert_eq!(parse_hex(&ok), Some([0xff; 32]));
        assert_eq!(parse_hex(&ok[1..]), None);
        assert_eq!(parse_hex(&format!("{ok}0")), None);
        assert_eq!(parse_hex(&format!("g{}", &ok[1..])), None);
        assert_eq!(parse_hex(&format!("+{}", &ok[1..])), None);
        assert_eq!(parse_hex(&format!(" {}", &ok[1..])), None);
        assert_eq!(parse_hex(&format!("0x{}", &ok[2..])), None);
        assert_eq!(parse_hex(&format!("é{}", &ok[2..])), None);
        assert_eq!(parse_hex(""), None);
    }

    #[test]
    fn hamming_counts_bits() {
        let mut a = [0u8; 32];
        assert_eq!(hamming(&a, &a), 0);
        assert_eq!(hamming(&a, &[0xff; 32]), 256);
        a[3] = 0b1011;
        a[30] = 0x80;
        assert_eq!(hamming(&a, &[0; 32]), 4);
    }

    #[test]
    fn bit_k_is_the_texts_number() {
        // coefficient 0 alone above the median cannot happen; check the packing directly
        let mut dct = [0f32; 256];
        dct[0] = 1.0;
        dct[255] = 1.0;
        dct[17] = 1.0;
        let h = bits(&dct);
        // the text is Σ 2^k: bit 255 first, bit 0 last
        assert_eq!(h[0], 0x80);
        assert_eq!(h[31], 0x01);
        assert_eq!(h[31 - 2], 0x02);
        assert_eq!(hamming(&h, &[0; 32]), 3);
    }

    #[test]
    fn torben_is_the_lower_median() {
        let v: Vec<f32> = (0..256).map(|i| ((i * 37) % 256) as f32).collect();
        assert_eq!(torben(&v), 127.0);
        assert_eq!(torben(&[5.0; 256]), 5.0);
        assert_eq!(torben(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn tiny_and_thin_images_do_not_panic() {
        for (w, h) in [
            (1, 1),
            (2, 3),
            (4, 4),
            (4, 100),
            (100, 4),
            (1, 5000),
            (5000, 1),
        ] {
            let p = pdq(&scene(w, h));
            assert_eq!(
                p,
                Pdq {
                    hash: [0; 32],
                    quality: 0
                },
                "{w}x{h}"
            );
            assert_eq!(pdq_dihedral(&scene(w, h)), ([[0; 32]; 8], 0), "{w}x{h}");
        }
        for (w, h) in [
            (5, 5),
            (5, 3000),
            (3000, 5),
            (6, 7),
            (63, 65),
            (64, 64),
            (129, 5),
        ] {
            let img = scene(w, h);
            let p = pdq(&img);
            let (d, q) = pdq_dihedral(&img);
            assert_eq!(q, p.quality, "{w}x{h}");
            assert!(hamming(&d[0], &p.hash) <= 8, "{w}x{h}");
            assert!(
                hamming(&p.hash, &[0; 32]) > 64,
                "{w}x{h}: half the bits are set"
            );
        }
        // short data: hashed as the rows present, no panic
        let mut img = scene(40, 40);
        img.data.truncate(3 * 40 * 3);
        assert_eq!(pdq(&img).quality, 0);
    }

    #[test]
    fn the_avx2_build_computes_the_same_floats() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for (w, h) in [(300, 200), (13, 1000), (1001, 7), (64, 64)] {
                let img = scene(w, h);
                let (mut plain, mut avx2) = (vec![0f32; GRID * GRID], vec![0f32; GRID * GRID]);
                downsample(&img.data, w as usize, h as usize, &mut plain);
                // SAFETY: the CPU has AVX2, checked above.
                unsafe { downsample_avx2(&img.data, w as usize, h as usize, &mut avx2) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&plain), bits(&avx2), "{w}x{h}");
            }
        }
    }

    #[test]
    fn a_flat_image_has_quality_zero() {
        let p = pdq(&image(50, 40, |_, _| [128, 128, 128]));
        assert_eq!(p.quality, 0);
    }

    #[test]
    fn dihedral_variants_match_the_transformed_images() {
        // The reference derives the variants from the DCT, so hashing the rotated pixels is close
        // but not bit-equal (blur direction, sample centres); pdqhash shows 0 to ~40 bits.
        let img = scene(300, 200);
        let (d, q) = pdq_dihedral(&img);
        assert_eq!(d[0], pdq(&img).hash);
        assert_eq!(q, pdq(&img).quality);
        let rot = rotate_ccw(&img);
        let near = hamming(&pdq(&rot).hash, &d[1]);
        let far = hamming(&pdq(&rot).hash, &d[0]);
        assert!(
            near <= 40 && far > 80,
            "rotate 90: {near} bits from its variant, {far} from the original"
        );
        let rot3 = rotate_ccw(&rotate_ccw(&rot));
        assert!(hamming(&pdq(&rot3).hash, &d[3]) <= 40);
        assert!(hamming(&pdq(&rotate_ccw(&rot)).hash, &d[2]) <= 40);
        assert!(hamming(&pdq(&transpose(&img)).hash, &d[6]) <= 40);
    }
}
