//! Times decode and resize+normalize per image, single-threaded: `cargo run --release -p doppler-core
//! --example decode_time -- FILES...` (used to compare the per-image CPU cost with PIL's).
use std::time::Instant;

use doppler_core::{decode_rgb, Limits, Preprocess};

fn main() {
    let pre = Preprocess::IMAGENET;
    let mut slot = vec![0f32; pre.slot_len()];
    let (mut t_read, mut t_dec, mut t_pre) = (0f64, 0f64, 0f64);
    let files: Vec<String> = std::env::args().skip(1).collect();
    for f in &files {
        let t0 = Instant::now();
        let bytes = std::fs::read(f).unwrap();
        let t1 = Instant::now();
        let img = decode_rgb(&bytes, f, &Limits::default()).unwrap();
        let t2 = Instant::now();
        pre.write_slot(&img, &mut slot);
        let t3 = Instant::now();
        t_read += (t1 - t0).as_secs_f64();
        t_dec += (t2 - t1).as_secs_f64();
        t_pre += (t3 - t2).as_secs_f64();
    }
    let n = files.len() as f64;
    println!(
        "{} images: read {:.1} ms, decode {:.1} ms, resize+normalize {:.1} ms per image",
        files.len(),
        t_read * 1000.0 / n,
        t_dec * 1000.0 / n,
        t_pre * 1000.0 / n
    );
}
