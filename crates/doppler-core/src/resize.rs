//! PIL's antialiased bilinear resampling (`Image.resize(size, Image.BILINEAR)`, which is what
//! torchvision's `Resize` does on a PIL image), reproduced exactly: the same coefficient windows,
//! the same 22-bit fixed-point weights and rounding, the same horizontal-then-vertical order with
//! an 8-bit intermediate. See Pillow's `src/libImaging/Resample.c`.

use crate::decode::RgbImage;

/// Fixed-point precision of PIL's 8-bit resampler: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 22;

/// A resampling filter of Pillow's: the kernel and its support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (triangle), support 1: torchvision's `Resize` on PIL images.
    Bilinear,
    /// `Image.LANCZOS` (a.k.a. ANTIALIAS), support 3: imagehash's resize.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Per output pixel: the first input index, the number of taps, and `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full box `[0, in_size)`.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero, as `as i64` does
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, xmax) = (xmin as usize, xmax.max(0) as usize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Half of one in fixed point: the rounding term every sum starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One pass along the slow axis of a row-major byte matrix `stride` bytes wide: output row `yy`
/// is `clip8(HALF + Σ_t w[yy][t] · src row (ymin + t))`, every byte on its own: PIL's vertical
/// pass. The arithmetic is PIL's (8-bit pixels times 22-bit weights summed in 32 bits, no overflow: a sum
/// stays within ±2^31 as PIL's does), and integer sums do not depend on their order, so running it
/// row-wise over contiguous bytes, in SIMD lanes, gives PIL's bits exactly.
fn pass_rows(src: &[u8], stride: usize, c: &Coeffs, simd: bool) -> Vec<u8> {
    let mut out = vec![0u8; stride * c.bounds.len()];
    #[cfg(target_arch = "x86_64")]
    if simd && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { pass_rows_avx2(src, stride, c, &mut out) };
        return out;
    }
    let _ = simd;
    pass_rows_kernel(src, stride, c, &mut out);
    out
}

/// [`pass_rows_kernel`] compiled for AVX2: 8 lanes of 32-bit multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn pass_rows_avx2(src: &[u8], stride: usize, c: &Coeffs, out: &mut [u8]) {
    pass_rows_kernel(src, stride, c, out)
}

#[inline(always)]
fn pass_rows_kernel(src: &[u8], stride: usize, c: &Coeffs, out: &mut [u8]) {
    let mut acc = vec![0i32; stride];
    for (yy, (&(ymin, ymax), orow)) in c
        .bounds
        .iter()
        .zip(out.chunks_exact_mut(stride))
        .enumerate()
    {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
        acc.fill(HALF);
        let mut taps = k.chunks_exact(2);
        let mut y = ymin;
        for pair in &mut taps {
            let (w0, w1) = (pair[0], pair[1]);
            let r0 = &src[y * stride..(y + 1) * stride];
            let r1 = &src[(y + 1) * stride..(y + 2) * stride];
            for ((a, &p0), &p1) in acc.iter_mut().zip(r0).zip(r1) {
                *a += i32::from(p0) * w0 + i32::from(p1) * w1;
            }
            y += 2;
        }
        if let [w0] = *taps.remainder() {
            let r0 = &src[y * stride..(y + 1) * stride];
            for (a, &p0) in acc.iter_mut().zip(r0) {
                *a += i32::from(p0) * w0;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            // = PIL's clip8: 255 from 256 << 22 up, 0 at and below 0
            *o = (a >> PRECISION_BITS).clamp(0, 255) as u8;
        }
    }
}

/// PIL's horizontal pass over rows `first..first + rows` of a packed `ch`-channel image `in_w`
/// wide: per output pixel, the taps over its window of source pixels, the channels unrolled.
fn horizontal(
    src: &[u8],
    in_w: usize,
    ch: usize,
    first: usize,
    rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    match ch {
        1 => horizontal_n::<1>(src, in_w, first, rows, c),
        3 => horizontal_n::<3>(src, in_w, first, rows, c),
        _ => unreachable!("1 or 3 channels"),
    }
}

fn horizontal_n<const CH: usize>(
    src: &[u8],
    in_w: usize,
    first: usize,
    rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let ow = c.bounds.len();
    let (px, _) = src[first * in_w * CH..(first + rows) * in_w * CH].as_chunks::<CH>();
    let mut out = vec![[0u8; CH]; ow * rows];
    // each output pixel's window and weights, sliced once for every row
    let windows: Vec<(usize, &[i32])> = c
        .bounds
        .iter()
        .enumerate()
        .map(|(xx, &(xmin, n))| (xmin, &c.weights[xx * c.ksize..xx * c.ksize + n]))
        .collect();
    for (row, orow) in px.chunks_exact(in_w).zip(out.chunks_exact_mut(ow)) {
        for (o, &(xmin, k)) in orow.iter_mut().zip(&windows) {
            let mut ss = [HALF; CH];
            for (p, &w) in row[xmin..xmin + k.len()].iter().zip(k) {
                for (s, &v) in ss.iter_mut().zip(p) {
                    *s += i32::from(v) * w;
                }
            }
            for (o, s) in o.iter_mut().zip(ss) {
                *o = (s >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    out.into_flattened()
}

/// PIL's vertical pass of a packed `ch`-channel image `w` wide; `c.bounds` index rows of `src`.
fn vertical(src: &[u8], w: usize, ch: usize, c: &Coeffs, simd: bool) -> Vec<u8> {
    pass_rows(src, w * ch, c, simd)
}

/// Resizes packed RGB8 to `out_w × out_h` exactly as PIL's bilinear `resize` does.
pub fn resize_bilinear(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let data = resample(
        &src.data,
        src.width,
        src.height,
        3,
        out_w,
        out_h,
        Filter::Bilinear,
    );
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Resamples a packed 8-bit image of `ch` channels (1 or 3) exactly as Pillow 13's
/// `ImagingResampleInner` does, pass order included: the vertical pass runs first when the height
/// shrinks by more than twice as many pixels as the width (older Pillow always ran the horizontal
/// pass first, which can differ by one level in some pixels).
pub fn resample(
    src: &[u8],
    in_w: u32,
    in_h: u32,
    ch: usize,
    out_w: u32,
    out_h: u32,
    filter: Filter,
) -> Vec<u8> {
    resample_with(src, in_w, in_h, ch, out_w, out_h, filter, true)
}

/// [`resample`], with the AVX2 kernel allowed or not (the tests run both).
#[allow(clippy::too_many_arguments)]
fn resample_with(
    src: &[u8],
    in_w: u32,
    in_h: u32,
    ch: usize,
    out_w: u32,
    out_h: u32,
    filter: Filter,
    simd: bool,
) -> Vec<u8> {
    assert!(ch == 1 || ch == 3, "1 or 3 channels");
    let (in_w, in_h) = (in_w as usize, in_h as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if in_w == 0 || in_h == 0 || ow == 0 || oh == 0 {
        return Vec::new(); // nothing to resample (decoders refuse empty images before this)
    }
    let need_h = ow != in_w;
    let need_v = oh != in_h;
    let (dw, dh) = (in_w as i64 - ow as i64, in_h as i64 - oh as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    match (need_h, need_v) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal(src, in_w, ch, 0, in_h, &coeffs(in_w, ow, filter)),
        (false, true) => vertical(src, in_w, ch, &coeffs(in_h, oh, filter), simd),
        (true, true) if horizontal_first => {
            let mut vert = coeffs(in_h, oh, filter);
            // only the source rows the vertical pass reads go through the horizontal pass
            let first = vert.bounds[0].0;
            let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
            vert.bounds.iter_mut().for_each(|b| b.0 -= first);
            let tmp = horizontal(
                src,
                in_w,
                ch,
                first,
                last - first,
                &coeffs(in_w, ow, filter),
            );
            vertical(&tmp, ow, ch, &vert, simd)
        }
        (true, true) => {
            let tmp = vertical(src, in_w, ch, &coeffs(in_h, oh, filter), simd);
            horizontal(&tmp, in_w, ch, 0, oh, &coeffs(in_w, ow, filter))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resampler as it was before the row-pass kernel: PIL's loops, pixel by pixel. The
    /// property test below holds the fast one to it on random images.
    mod reference {
        use super::super::Coeffs;
        use super::super::{coeffs, Filter, PRECISION_BITS};

        #[inline]
        fn clip8(v: i32) -> u8 {
            if v >= (1 << PRECISION_BITS << 8) {
                255
            } else if v <= 0 {
                0
            } else {
                (v >> PRECISION_BITS) as u8
            }
        }

        /// Horizontal pass over rows `first..first + rows` of a packed `ch`-channel image `in_w` wide.
        fn horizontal(
            src: &[u8],
            in_w: usize,
            ch: usize,
            first: usize,
            rows: usize,
            c: &Coeffs,
        ) -> Vec<u8> {
            let ow = c.bounds.len();
            let mut out = vec![0u8; ow * rows * ch];
            let mut ss = [0i32; 4];
            for y in 0..rows {
                let row = &src[(y + first) * in_w * ch..(y + first + 1) * in_w * ch];
                let orow = &mut out[y * ow * ch..(y + 1) * ow * ch];
                for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
                    let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
                    ss[..ch].fill(1 << (PRECISION_BITS - 1));
                    for (x, &w) in k.iter().enumerate() {
                        let p = &row[(x + xmin) * ch..(x + xmin + 1) * ch];
                        for (s, &v) in ss.iter_mut().zip(p) {
                            *s += v as i32 * w;
                        }
                    }
                    for (o, &s) in orow[xx * ch..(xx + 1) * ch].iter_mut().zip(&ss) {
                        *o = clip8(s);
                    }
                }
            }
            out
        }

        /// Vertical pass of a packed `ch`-channel image `w` wide; `c.bounds` index rows of `src`.
        fn vertical(src: &[u8], w: usize, ch: usize, c: &Coeffs) -> Vec<u8> {
            let stride = w * ch;
            let oh = c.bounds.len();
            let mut out = vec![0u8; stride * oh];
            let mut acc = vec![0i32; stride];
            for (yy, &(ymin, ymax)) in c.bounds.iter().enumerate() {
                let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
                acc.fill(1 << (PRECISION_BITS - 1));
                for (y, &wt) in k.iter().enumerate() {
                    let row = &src[(y + ymin) * stride..(y + ymin + 1) * stride];
                    for (a, &p) in acc.iter_mut().zip(row) {
                        *a += p as i32 * wt;
                    }
                }
                for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
                    *o = clip8(a);
                }
            }
            out
        }

        pub fn resample(
            src: &[u8],
            in_w: usize,
            in_h: usize,
            ch: usize,
            ow: usize,
            oh: usize,
            filter: Filter,
        ) -> Vec<u8> {
            let (dw, dh) = (in_w as i64 - ow as i64, in_h as i64 - oh as i64);
            let horizontal_first = !(dh > 0 && dh > dw * 2);
            match (ow != in_w, oh != in_h) {
                (false, false) => src.to_vec(),
                (true, false) => horizontal(src, in_w, ch, 0, in_h, &coeffs(in_w, ow, filter)),
                (false, true) => vertical(src, in_w, ch, &coeffs(in_h, oh, filter)),
                (true, true) if horizontal_first => {
                    let mut vert = coeffs(in_h, oh, filter);
                    let first = vert.bounds[0].0;
                    let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
                    vert.bounds.iter_mut().for_each(|b| b.0 -= first);
                    let tmp = horizontal(
                        src,
                        in_w,
                        ch,
                        first,
                        last - first,
                        &coeffs(in_w, ow, filter),
                    );
                    vertical(&tmp, ow, ch, &vert)
                }
                (true, true) => {
                    let tmp = vertical(src, in_w, ch, &coeffs(in_h, oh, filter));
                    horizontal(&tmp, in_w, ch, 0, oh, &coeffs(in_w, ow, filter))
                }
            }
        }
    }

    #[test]
    fn the_row_pass_kernel_equals_pils_loops_on_random_images() {
        // xorshift: no dependency, the same images every run
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut cases = 0;
        for _ in 0..300 {
            let (w, h) = (1 + next() as usize % 700, 1 + next() as usize % 700);
            let ch = if next() % 4 == 0 { 1 } else { 3 };
            let filter = if next() % 3 == 0 {
                Filter::Lanczos
            } else {
                Filter::Bilinear
            };
            let (ow, oh) = match next() % 4 {
                0 => (224, 224),
                1 => (9, 8),
                _ => (1 + next() as usize % 400, 1 + next() as usize % 400),
            };
            // photos are smooth, screenshots are not: half noise, half ramps with edges
            let src: Vec<u8> = if next() % 2 == 0 {
                (0..w * h * ch).map(|_| next() as u8).collect()
            } else {
                (0..w * h * ch)
                    .map(|i| {
                        ((i % (w * ch)) * 255 / (w * ch)) as u8
                            ^ if (i / (w * ch)) % 37 < 5 { 0xff } else { 0 }
                    })
                    .collect()
            };
            let want = reference::resample(&src, w, h, ch, ow, oh, filter);
            for simd in [false, true] {
                let got = resample_with(
                    &src, w as u32, h as u32, ch, ow as u32, oh as u32, filter, simd,
                );
                assert!(
                    got == want,
                    "{w}x{h}x{ch} -> {ow}x{oh} {filter:?} simd {simd}"
                );
            }
            cases += 1;
        }
        assert_eq!(cases, 300);
        // one axis only, 1-pixel sides, upscaling: the paths random sizes rarely take
        let fixed = [
            ((300, 1), (300, 8)),
            ((1, 300), (9, 300)),
            ((224, 224), (224, 100)),
            ((224, 500), (100, 500)),
            ((5, 4), (224, 224)),
            ((1, 1), (224, 224)),
            ((700, 3), (224, 224)),
        ];
        for ((w, h), (ow, oh)) in fixed {
            for (ch, filter) in [(3, Filter::Bilinear), (1, Filter::Lanczos)] {
                let src: Vec<u8> = (0..w * h * ch).map(|_| next() as u8).collect();
                let want = reference::resample(&src, w, h, ch, ow, oh, filter);
                for simd in [false, true] {
                    let got = resample_with(
                        &src, w as u32, h as u32, ch, ow as u32, oh as u32, filter, simd,
                    );
                    assert!(
                        got == want,
                        "{w}x{h}x{ch} -> {ow}x{oh} {filter:?} simd {simd}"
                    );
                }
            }
        }
    }

    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            data: rgb.repeat((w * h) as usize),
        }
    }

    #[test]
    fn a_solid_image_stays_solid_in_every_direction() {
        for (w, h) in [
            (1, 1),
            (7, 5),
            (300, 500),
            (500, 300),
            (224, 1000),
            (3, 301),
        ] {
            let r = resize_bilinear(&solid(w, h, [10, 128, 250]), 224, 224);
            assert_eq!((r.width, r.height), (224, 224));
            assert!(
                r.data.chunks_exact(3).all(|p| p == [10, 128, 250]),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage {
            width: 2,
            height: 2,
            data: (0..12).collect(),
        };
        assert_eq!(resize_bilinear(&img, 2, 2), img);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 224), (7, 224), (3000, 224), (224, 224)] {
            let c = coeffs(i, o, Filter::Bilinear);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i32 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i32,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }
}
