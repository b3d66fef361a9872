//! What preparing an image costs, by stage, as `scripts/bench` reports it next to PIL's:
//! `cargo run --release -p doppler-core --example stages -- [--threads N] [--reps R] FILES...`
//!
//! Prints one JSON object: milliseconds per image on one thread for each stage (read the file,
//! decode to RGB8 = PIL's `convert('RGB')`, resize to 224×224 = PIL's bilinear, normalize into a
//! CHW float32 slot), best of `R` passes; and images/s prepared end to end on 1 and on `N`
//! threads (each thread takes the next image), the feed rate a GPU would get.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use doppler_core::{decode_rgb, Limits, Preprocess};

fn prepare(pre: &Preprocess, path: &str, slot: &mut [f32]) {
    let bytes = std::fs::read(path).expect("read");
    let img = decode_rgb(&bytes, path, &Limits::default()).expect("decode");
    pre.write_slot(&img, slot);
}

/// Images/s over `reps` passes (best), `threads` threads taking the next image.
fn rate(pre: &Preprocess, files: &[String], threads: usize, reps: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..reps {
        let next = AtomicUsize::new(0);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut slot = vec![0f32; pre.slot_len()];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        prepare(pre, f, &mut slot);
                    }
                });
            }
        });
        best = best.max(files.len() as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let (mut threads, mut reps) = (2usize, 3usize);
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--threads N")
            }
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps R"),
            _ => files.push(a),
        }
    }
    assert!(
        !files.is_empty(),
        "usage: stages [--threads N] [--reps R] FILES..."
    );
    let pre = Preprocess::IMAGENET;
    let mut slot = vec![0f32; pre.slot_len()];
    let mut best = [f64::MAX; 4];
    for _ in 0..reps.max(1) {
        let mut t = [0f64; 4];
        for f in &files {
            let t0 = Instant::now();
            let bytes = std::fs::read(f).expect("read");
            let t1 = Instant::now();
            let img = decode_rgb(&bytes, f, &Limits::default()).expect("decode");
            let t2 = Instant::now();
            let small = pre.resize(&img);
            let t3 = Instant::now();
            pre.normalize(&small, &mut slot);
            let t4 = Instant::now();
            for (acc, d) in t.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *acc += d.as_secs_f64();
            }
        }
        if t.iter().sum::<f64>() < best.iter().sum::<f64>() {
            best = t;
        }
    }
    let ms = |s: f64| s * 1000.0 / files.len() as f64;
    println!(
        "{{\"images\": {}, \"read\": {:.4}, \"decode\": {:.4}, \"resize\": {:.4}, \"normalize\": {:.4}, \
         \"rate_1\": {:.2}, \"threads\": {}, \"rate_n\": {:.2}}}",
        files.len(),
        ms(best[0]),
        ms(best[1]),
        ms(best[2]),
        ms(best[3]),
        rate(&pre, &files, 1, reps),
        threads,
        rate(&pre, &files, threads, reps)
    );
}
