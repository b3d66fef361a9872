//! Any bytes through decode + preprocess + dHash: errors are fine, panics, crashes, hangs and
//! unbounded memory are not. Limits are small so that a claimed huge image is refused, not
//! allocated.
#![no_main]

use doppler_core::{decode_rgb, dhash, Limits, Preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_pixels: 4_000_000, max_dimension: 8_000, jpeg_draft_size: 0 };
    if let Ok(img) = decode_rgb(data, "fuzz input", &limits) {
        let pre = Preprocess::IMAGENET;
        let mut slot = vec![0f32; pre.slot_len()];
        pre.write_slot(&img, &mut slot);
        assert!(slot.iter().all(|v| v.is_finite()));
        let _ = dhash::dhash(&img);
    }
});
