//! Any bytes through decode + preprocess + dHash: errors are fine, panics, crashes, hangs and
//! unbounded memory are not. Limits are small so that a claimed huge image is refused, not
//! allocated.
#![no_main]

use doppler_core::{decode_rgb, dhash, Limits, Preprocess};
use libfuzzer_sys::fuzz_target;

static HOOK: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // decode_rgb catches a decoder's panic and refuses the image (0A000), as the server does:
    // only a panic that escapes it is a crash (libfuzzer-sys aborts on those), so its panic hook,
    // which aborts on every panic, caught or not, gives way to one that only reports
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic (a crash only if uncaught): {info}")
        }))
    });
    let limits = Limits {
        max_pixels: 4_000_000,
        max_dimension: 8_000,
        jpeg_draft_size: 0,
    };
    if let Ok(img) = decode_rgb(data, "fuzz input", &limits) {
        let pre = Preprocess::IMAGENET;
        let mut slot = vec![0f32; pre.slot_len()];
        pre.write_slot(&img, &mut slot);
        assert!(slot.iter().all(|v| v.is_finite()));
        let _ = dhash::dhash(&img);
    }
});
