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
    let (in_w, in_h) = (in_w as usize, in_h as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let need_h = ow != in_w;
    let need_v = oh != in_h;
    let (dw, dh) = (in_w as i64 - ow as i64, in_h as i64 - oh as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    match (need_h, need_v) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal(src, in_w, ch, 0, in_h, &coeffs(in_w, ow, filter)),
        (false, true) => vertical(src, in_w, ch, &coeffs(in_h, oh, filter)),
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
            vertical(&tmp, ow, ch, &vert)
        }
        (true, true) => {
            let tmp = vertical(src, in_w, ch, &coeffs(in_h, oh, filter));
            horizontal(&tmp, in_w, ch, 0, oh, &coeffs(in_w, ow, filter))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
