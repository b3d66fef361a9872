//! The fill pipeline without Postgres, to choose thread counts and spinning:
//! `pipeline ORT_LIBRARY MODEL.onnx [--ort-threads N] [--decode-threads M] [--batch B]
//! [--no-spin] [--reps R] FILES...`: decode threads prepare one model run ahead
//! while the model runs (as `doppler.fill` does), and prints images/s (best of R passes) with
//! where the time went.
use std::time::Instant;

use doppler_core::{
    model, prepare_stream, source::SourcePolicy, Limits, Model, Preprocess, Provider,
    SessionConfig, Source, StreamOptions,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let lib = args.next().expect("ORT library");
    let path = args.next().expect("model");
    let (mut ort_threads, mut decode, mut batch, mut spin, mut reps) =
        (2usize, 2usize, 16usize, true, 2usize);
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        let mut num = || {
            args.next()
                .and_then(|v| v.parse::<i64>().ok())
                .expect("a number")
        };
        match a.as_str() {
            "--ort-threads" => ort_threads = num() as usize,
            "--decode-threads" => decode = num() as usize,
            "--batch" => batch = num() as usize,
            "--reps" => reps = num() as usize,
            "--no-spin" => spin = false,
            _ => files.push(Source::Path(a)),
        }
    }
    let env = model::runtime(&lib).expect("ORT");
    let config = SessionConfig {
        model_path: path,
        intra_op_threads: ort_threads,
        spinning: spin,
        provider: Provider::Cpu,
        device_id: 0,
    };
    let mut m = Model::load(env, &config).expect("model");
    let pre = Preprocess::IMAGENET;
    let warm = vec![0f32; pre.slot_len() * batch];
    m.run(&warm, batch).expect("warm-up");
    let opts = StreamOptions {
        threads: decode,
        chunk: batch,
        want_hash: false,
        want_pdq: false,
        release: false,
        scope: 0,
        ahead: &[],
    };
    let policy = SourcePolicy::files(64 << 20);
    let mut best = (0f64, Default::default(), 0f64);
    for _ in 0..reps {
        let t0 = Instant::now();
        let mut infer = 0f64;
        let (stats, _) = prepare_stream(
            &files,
            &pre,
            &Limits::default(),
            &policy,
            opts,
            |_, images| {
                let mut tensor = Vec::with_capacity(images.len() * pre.slot_len());
                for img in &images {
                    tensor.extend_from_slice(&img.as_ref().expect("image").0);
                }
                let t = Instant::now();
                m.run(&tensor, images.len()).expect("run");
                infer += t.elapsed().as_secs_f64();
            },
            || {},
        );
        let rate = files.len() as f64 / t0.elapsed().as_secs_f64();
        if rate > best.0 {
            best = (rate, stats, infer);
        }
    }
    let (rate, s, infer) = best;
    let per = |d: f64| d * 1000.0 / files.len() as f64;
    println!(
        "{{\"rate\": {rate:.2}, \"infer\": {:.3}, \"waited\": {:.3}, \"read\": {:.3}, \"decode\": {:.3}, \"resize\": {:.3}}}",
        per(infer),
        per(s.waited.as_secs_f64()),
        per(s.read.as_secs_f64()),
        per(s.decode.as_secs_f64()),
        per(s.resize.as_secs_f64()),
    );
}
