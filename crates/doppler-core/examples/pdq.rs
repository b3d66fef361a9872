//! What a PDQ hash costs: `cargo run --release -p doppler-core --example pdq -- [--reps R] DIR`
//!
//! Decodes every image in DIR that doppler reads (not timed), then times [`pdq`] on the pixels,
//! best of `R` passes (default 5), and prints milliseconds per image (the mean over the images)
//! for it and for [`pdq_dihedral`]. `python scripts/bench_pdq.py DIR` prints pdqhash's number for
//! the same pixels (PIL's `convert('RGB')`, which doppler's decode equals): the ratio is
//! `python ms / doppler ms`.
use std::time::Instant;

use doppler_core::pdq::{pdq, pdq_dihedral};
use doppler_core::{decode_rgb, Limits, RgbImage};

/// Milliseconds per image, best of `reps` passes over all images.
fn per_image(images: &[RgbImage], reps: usize, f: impl Fn(&RgbImage) -> u32) -> f64 {
    let mut best = f64::MAX;
    let mut sink = 0u32;
    for _ in 0..reps {
        let t0 = Instant::now();
        for img in images {
            sink = sink.wrapping_add(f(img));
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    1e3 * best / images.len() as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut reps, mut dir) = (5usize, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps R"),
            _ => dir = Some(a),
        }
    }
    let dir = dir.expect("usage: pdq [--reps R] DIR");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("read the directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let (mut images, mut pixels) = (Vec::new(), 0u64);
    for p in &paths {
        let Ok(bytes) = std::fs::read(p) else {
            continue;
        };
        if let Ok(img) = decode_rgb(&bytes, &p.display().to_string(), &Limits::default()) {
            pixels += u64::from(img.width) * u64::from(img.height);
            images.push(img);
        }
    }
    assert!(!images.is_empty(), "no image in {dir} that doppler reads");
    let one = per_image(&images, reps, |i| pdq(i).quality);
    let eight = per_image(&images, reps, |i| pdq_dihedral(i).1);
    println!(
        "doppler pdq: {one:.3} ms/image, pdq_dihedral: {eight:.3} ms/image ({} images, {:.2} Mpixel on average, best of {reps})",
        images.len(),
        pixels as f64 / images.len() as f64 / 1e6
    );
}
