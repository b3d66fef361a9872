//! Parity of the pure pipeline with PIL + onnxruntime, on the fixtures that scripts/setup makes
//! (scripts/make_fixtures.py). Pixels after decode + resize must equal PIL's exactly; features
//! must match the Python reference within cosine >= 0.99999 and max abs diff <= 1e-3.

use doppler_core::{
    decode_rgb, model, resize::resize_bilinear, Limits, Model, Preprocess, Provider, SessionConfig,
};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn fixtures() -> Vec<(String, String)> {
    let dir = env("DOPPLER_FIXTURES", "/opt/doppler/fixtures");
    let manifest = std::fs::read_to_string(format!("{dir}/manifest.tsv"))
        .unwrap_or_else(|e| panic!("{dir}/manifest.tsv: {e} (run scripts/setup first)"));
    manifest
        .lines()
        .map(|l| {
            let name = l.split('\t').next().unwrap().to_string();
            (format!("{dir}/{name}"), name)
        })
        .collect()
}

#[test]
fn decode_and_resize_equal_pil_bit_for_bit() {
    let mut checked = 0;
    for (path, name) in fixtures() {
        let bytes = std::fs::read(&path).unwrap();
        let img =
            decode_rgb(&bytes, &name, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = resize_bilinear(&img, 224, 224);
        let want = std::fs::read(format!("{path}.rgb224")).unwrap();
        assert_eq!(
            want.len(),
            224 * 224 * 3,
            "{name}: PIL's reference is not 224x224 RGB"
        );
        assert_eq!(r.data.len(), want.len(), "{name}: resized image size");
        let diff = r.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        let maxd = r
            .data
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap_or(0);
        assert_eq!(
            diff, 0,
            "{name}: {diff} bytes differ from PIL (max {maxd} levels)"
        );
        checked += 1;
    }
    assert!(checked >= 20);
}

#[test]
fn features_match_the_python_reference() {
    let deps = env("DOPPLER_DEPS", "/opt/doppler");
    let lib = env(
        "DOPPLER_ORT_LIB",
        &format!("{deps}/lib/libonnxruntime.so.1.31.1"),
    );
    let models = env("DOPPLER_MODELS", &format!("{deps}/models"));
    let rt = model::runtime(&lib).expect("ONNX Runtime (run scripts/setup first)");
    let config = SessionConfig {
        model_path: format!("{models}/resnet50-seeded.onnx"),
        intra_op_threads: 2,
        spinning: true,
        provider: Provider::Cpu,
        device_id: 0,
    };
    let mut m = Model::load(rt, &config).unwrap();
    assert_eq!((m.input_size, m.dim, m.provider), (224, 2048, "CPU"));
    let pre = Preprocess::IMAGENET;
    let fx = fixtures();
    // one batched run over all fixtures: batching must not change results
    let mut batch = vec![0f32; fx.len() * pre.slot_len()];
    for ((path, name), slot) in fx.iter().zip(batch.chunks_exact_mut(pre.slot_len())) {
        let bytes = std::fs::read(path).unwrap();
        doppler_core::prepare(&bytes, name, &Limits::default(), &pre, slot).unwrap();
    }
    let out = m.run(&batch, fx.len()).unwrap();
    assert_eq!(out.len(), fx.len() * 2048, "one 2048-d vector per image");
    for ((path, name), got) in fx.iter().zip(out.chunks_exact(2048)) {
        let raw = std::fs::read(format!("{path}.f32")).unwrap();
        let want: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(
            want.len(),
            2048,
            "{name}: the reference features are not 2048-d"
        );
        let (mut dot, mut na, mut nb, mut max) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in got.iter().zip(&want) {
            dot += a as f64 * b as f64;
            na += (a as f64).powi(2);
            nb += (b as f64).powi(2);
            max = max.max((a - b).abs() as f64);
        }
        let cos = dot / (na.sqrt() * nb.sqrt());
        assert!(
            cos >= 0.99999 && max <= 1e-3,
            "{name}: cosine {cos}, max abs {max}"
        );
    }
}

#[test]
fn dhash_equals_imagehash_on_every_generated_image() {
    let dir = format!("{}/dhash", env("DOPPLER_FIXTURES", "/opt/doppler/fixtures"));
    let list = std::fs::read_to_string(format!("{dir}/dhash.tsv"))
        .expect("dhash fixtures (run scripts/setup first)");
    let mut wrong = Vec::new();
    let mut n = 0;
    for line in list.lines() {
        let (name, want) = line.split_once('\t').unwrap();
        let bytes = std::fs::read(format!("{dir}/{name}")).unwrap();
        let img =
            decode_rgb(&bytes, name, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = doppler_core::dhash::to_hex(doppler_core::dhash::dhash(&img));
        if got != want {
            wrong.push(format!("{name}: {got} != {want}"));
        }
        n += 1;
    }
    assert!(n >= 150, "only {n} images");
    assert!(
        wrong.is_empty(),
        "{} of {n} differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
