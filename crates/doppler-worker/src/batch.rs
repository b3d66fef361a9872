//! One claimed batch on this host: the rows' sources (server paths through `--path-map`, URLs as
//! they are, bytea images), read, fetched, decoded and preprocessed by doppler-core's
//! `prepare_stream` on the decode threads, run through the model a chunk at a time on this
//! thread, so the vectors are the server's own (the same code, the same preprocessing). Each row
//! ends with a vector (and its dHash when the table wants one) or a failure.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime};

use doppler_core::{
    dhash, fetch, pdq, prepare_stream, Error, ErrorKind, Marks, Model, PreparedImage, Preprocess,
    Source, StreamOptions, StreamStats,
};
use serde_json::json;

use crate::api::Claimed;
use crate::pathmap::PathMap;
use crate::settings::Settings;

/// Images per model run.
pub const CHUNK: usize = 32;

/// How a batch runs.
pub struct Options<'a> {
    pub decode_threads: usize,
    pub want_hash: bool,
    pub want_pdq: bool,
    pub settings: &'a Settings,
    pub paths: &'a PathMap,
}

/// One row that failed.
#[derive(Debug)]
pub struct Failure {
    pub n: i32,
    pub kind: ErrorKind,
    pub message: String,
    /// A web server's Retry-After (seconds from now).
    pub retry_after_s: Option<f64>,
}

impl Failure {
    fn of(n: i32, e: &Error) -> Failure {
        let retry_after_s = e.retry_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs_f64()
        });
        Failure {
            n,
            kind: e.kind,
            message: e.message.clone(),
            retry_after_s,
        }
    }
}

/// What a batch made of its rows.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The rows with a vector, in the order of `vectors` (`n.len()` × dim), `hashes`, `pdq`
    /// (64 hex digits) and `pdq_quality`.
    pub n: Vec<i32>,
    pub vectors: Vec<f32>,
    pub hashes: Vec<Option<String>>,
    pub pdq: Vec<Option<String>>,
    pub pdq_quality: Vec<Option<i32>>,
    pub failures: Vec<Failure>,
    /// Where the decode threads' time went, and the waits.
    pub stream: StreamStats,
    /// Model runs.
    pub infer: Duration,
}

impl Outcome {
    /// The failures as doppler.worker_write takes them.
    pub fn failures_json(&self) -> String {
        serde_json::Value::Array(
            self.failures
                .iter()
                .map(|f| {
                    json!({
                        "n": f.n,
                        "kind": f.kind.as_str(),
                        "message": f.message,
                        "retry_after_s": f.retry_after_s,
                    })
                })
                .collect(),
        )
        .to_string()
    }
}

/// Why a batch did not end.
#[derive(Debug)]
pub enum Stopped {
    /// `abort` said so (a second SIGTERM): the rows go back to the queue.
    Aborted,
    /// A panic in the pipeline (a bug): the batch is rolled back.
    Panicked(String),
}

/// The unwinding payload that stops a stream from its `poll` or `consume`.
struct Abort;

/// A stream scope per table: fetches of one table's URLs are shared within it.
pub fn scope(tbl: &str) -> u64 {
    let mut h = DefaultHasher::new();
    tbl.hash(&mut h);
    h.finish()
}

/// Where the worker reads row `c`'s image: a server path mapped to this host, a URL as it is,
/// or the bytes; None when the row has neither source nor image.
pub fn source_of(c: &Claimed, paths: &PathMap) -> Option<Source> {
    match (&c.source, &c.image) {
        (Some(p), _) if fetch::is_url(p) => Some(Source::Path(p.clone())),
        (Some(p), _) => Some(Source::Path(paths.map(p).into_owned())),
        (None, Some(b)) => Some(Source::Bytes(b.clone())),
        (None, None) => None,
    }
}

/// Runs the batch `rows` through `model`; `abort` is asked between images and model runs.
pub fn run(
    rows: &[Claimed],
    model: &mut Model,
    pre: &Preprocess,
    opts: &Options,
    abort: &dyn Fn() -> bool,
) -> Result<Outcome, Stopped> {
    let mut out = Outcome::default();
    let mut streamed: Vec<i32> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    for c in rows {
        match source_of(c, opts.paths) {
            Some(s) => {
                streamed.push(c.n);
                sources.push(s);
            }
            None => out.failures.push(Failure::of(
                c.n,
                &Error::new(
                    ErrorKind::NotFound,
                    "the row has neither a source nor image bytes",
                ),
            )),
        }
    }
    let scope = rows.first().map_or(0, |c| scope(&c.tbl));
    let stream_opts = StreamOptions {
        threads: opts.decode_threads.max(1),
        chunk: CHUNK,
        want_hash: opts.want_hash,
        want_pdq: opts.want_pdq,
        release: false,
        scope,
        ahead: &[],
    };
    let settings = opts.settings;
    let stop = || {
        if abort() {
            std::panic::resume_unwind(Box::new(Abort));
        }
    };
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
        prepare_stream(
            &sources,
            pre,
            &settings.limits,
            &settings.policy,
            stream_opts,
            |idx, images| {
                stop();
                run_chunk(&mut out, model, pre, &streamed, &idx, images);
            },
            stop,
        )
    }));
    match ran {
        Ok((stats, _left)) => {
            out.stream = stats;
            Ok(out)
        }
        Err(p) if p.is::<Abort>() => Err(Stopped::Aborted),
        Err(p) => Err(Stopped::Panicked(
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into()),
        )),
    }
}

/// One chunk: the prepared images in one model run, the others' errors recorded.
fn run_chunk(
    out: &mut Outcome,
    model: &mut Model,
    pre: &Preprocess,
    streamed: &[i32],
    idx: &[usize],
    images: Vec<PreparedImage>,
) {
    let mut ok: Vec<(i32, Marks)> = Vec::new();
    let mut tensor = Vec::with_capacity(idx.len() * pre.slot_len());
    for (&j, image) in idx.iter().zip(images) {
        let n = streamed[j];
        match image {
            Ok((slot, hash)) => {
                tensor.extend_from_slice(&slot);
                ok.push((n, hash));
            }
            Err(e) => out.failures.push(Failure::of(n, &e)),
        }
    }
    if ok.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let ran = model.run(&tensor, ok.len());
    out.infer += t0.elapsed();
    match ran {
        Ok(v) => {
            out.vectors.extend_from_slice(&v);
            for (n, marks) in ok {
                out.n.push(n);
                out.hashes.push(marks.dhash.map(dhash::to_hex));
                out.pdq.push(marks.pdq.map(|p| pdq::to_hex(&p.hash)));
                out.pdq_quality.push(marks.pdq.map(|p| p.quality as i32));
            }
        }
        Err(e) => out
            .failures
            .extend(ok.into_iter().map(|(n, _)| Failure::of(n, &e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pathmap::Rule;

    fn claimed(n: i32, source: Option<&str>, image: Option<&[u8]>) -> Claimed {
        Claimed {
            n,
            tbl: "\"public\".\"t\"".into(),
            model: String::new(),
            source: source.map(str::to_string),
            image: image.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn sources() {
        let paths = PathMap::new(vec![Rule::parse("/srv=/mnt").unwrap()]);
        let path = |s: Option<Source>| match s {
            Some(Source::Path(p)) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            path(source_of(&claimed(1, Some("/srv/a.jpg"), None), &paths)),
            "/mnt/a.jpg"
        );
        assert_eq!(
            path(source_of(
                &claimed(1, Some("https://srv/a.jpg"), None),
                &paths
            )),
            "https://srv/a.jpg"
        );
        assert_eq!(
            path(source_of(&claimed(1, Some("rel.jpg"), None), &paths)),
            "rel.jpg"
        );
        assert!(matches!(
            source_of(&claimed(1, None, Some(b"xy")), &paths),
            Some(Source::Bytes(b)) if b == b"xy"
        ));
        assert!(source_of(&claimed(1, None, None), &paths).is_none());
    }

    #[test]
    fn failures_as_json() {
        let mut o = Outcome::default();
        o.failures.push(Failure::of(
            3,
            &Error::new(ErrorKind::NotAnImage, "image file \"/a\" is not an image"),
        ));
        let later = Error::new(ErrorKind::RetryLater, "busy")
            .retry_at(SystemTime::now() + Duration::from_secs(30));
        o.failures.push(Failure::of(4, &later));
        let v: serde_json::Value = serde_json::from_str(&o.failures_json()).unwrap();
        assert_eq!(v[0]["n"], 3);
        assert_eq!(v[0]["kind"], "not_an_image");
        assert_eq!(v[0]["message"], "image file \"/a\" is not an image");
        assert!(v[0]["retry_after_s"].is_null());
        assert_eq!(v[1]["kind"], "retry_later");
        let s = v[1]["retry_after_s"].as_f64().unwrap();
        assert!((28.0..=30.0).contains(&s), "{s}");
        assert_eq!(Outcome::default().failures_json(), "[]");
    }

    /// ONNX Runtime, the models and the fixtures of scripts/setup, when this host has them.
    fn local_setup() -> Option<(String, String, String)> {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let lib = var(
            "DOPPLER_ORT_LIB",
            "/opt/doppler/lib/libonnxruntime.so.1.31.1",
        );
        let models = var("DOPPLER_MODELS", "/opt/doppler/models");
        let fixtures = var("DOPPLER_FIXTURES", "/opt/doppler/fixtures");
        let there = std::path::Path::new(&lib).is_file()
            && std::path::Path::new(&format!("{models}/efficientnet-lite0.onnx")).is_file()
            && std::path::Path::new(&fixtures).is_dir();
        there.then_some((lib, models, fixtures))
    }

    #[test]
    fn vectors_and_hashes_are_the_cores_one_image_at_a_time() {
        let Some((lib, models, fixtures)) = local_setup() else {
            eprintln!("skipped: no ONNX Runtime, models or fixtures (scripts/setup)");
            return;
        };
        let env = doppler_core::model::runtime(&lib).unwrap();
        let config = doppler_core::SessionConfig {
            model_path: format!("{models}/efficientnet-lite0.onnx"),
            intra_op_threads: 1,
            spinning: false,
            provider: doppler_core::Provider::Cpu,
            device_id: 0,
        };
        let mut model = Model::load(env, &config).unwrap();
        model.set_input_size(224).unwrap();
        // EfficientNet-Lite0 as doppler.models registers it
        let pre = Preprocess {
            size: 224,
            filter: doppler_core::Filter::Bilinear,
            divisor: 1.0,
            mean: [127.0; 3],
            std: [128.0; 3],
        };
        let files = [
            "landscape_640x480.jpg",
            "portrait_300x500.png",
            "gray_200x300.jpg",
            "cmyk_200x200.jpg",
            "gif_160x120.gif",
            "bitmap_123x77.bmp",
            "lossless_240x180.webp",
            "one_1x1.png",
        ];
        // the fixtures as the server names them (/srv/pics), mapped to where they are
        let paths = PathMap::new(vec![Rule::parse(&format!("/srv/pics={fixtures}")).unwrap()]);
        let mut rows: Vec<Claimed> = files
            .iter()
            .enumerate()
            .map(|(i, f)| claimed(i as i32 + 1, Some(&format!("/srv/pics/{f}")), None))
            .collect();
        let bytes = std::fs::read(format!("{fixtures}/tiff_90x60.tif")).unwrap();
        rows.push(claimed(20, None, Some(&bytes)));
        rows.push(claimed(21, Some("/srv/pics/no-such-file.jpg"), None));
        rows.push(claimed(22, None, Some(b"not an image")));
        rows.push(claimed(23, None, None));
        let settings = crate::settings::parse("{}", &paths, &Default::default()).unwrap();
        let opts = Options {
            decode_threads: 3,
            want_hash: true,
            want_pdq: true,
            settings: &settings,
            paths: &paths,
        };
        let out = run(&rows, &mut model, &pre, &opts, &|| false).unwrap();
        let dim = model.dim;
        assert_eq!(out.n.len(), files.len() + 1);
        assert_eq!(out.vectors.len(), out.n.len() * dim);
        let mut failed: Vec<(i32, &str)> = out
            .failures
            .iter()
            .map(|f| (f.n, f.kind.as_str()))
            .collect();
        failed.sort();
        assert_eq!(
            failed,
            [(21, "not_found"), (22, "not_an_image"), (23, "not_found")]
        );
        for (k, &n) in out.n.iter().enumerate() {
            let bytes = match n {
                20 => bytes.clone(),
                n => std::fs::read(format!("{fixtures}/{}", files[n as usize - 1])).unwrap(),
            };
            let mut slot = vec![0f32; pre.slot_len()];
            doppler_core::prepare(&bytes, "x", &Default::default(), &pre, &mut slot).unwrap();
            let one = model.run(&slot, 1).unwrap();
            let got = &out.vectors[k * dim..(k + 1) * dim];
            let max_diff = one
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // bit for bit: the same preprocessing and model, whatever the chunk
            assert!(max_diff == 0.0, "row {n}: {max_diff}");
            let img = doppler_core::decode_rgb(&bytes, "x", &Default::default()).unwrap();
            assert_eq!(
                out.hashes[k],
                Some(dhash::to_hex(dhash::dhash(&img))),
                "row {n}"
            );
            let p = pdq::pdq(&img);
            assert_eq!(out.pdq[k], Some(pdq::to_hex(&p.hash)), "row {n}");
            assert_eq!(out.pdq_quality[k], Some(p.quality as i32), "row {n}");
        }
        // a second signal stops the batch
        let stopped = run(&rows, &mut model, &pre, &opts, &|| true);
        assert!(matches!(stopped, Err(Stopped::Aborted)));
    }

    #[test]
    fn scopes_differ_by_table() {
        assert_eq!(scope("a"), scope("a"));
        assert_ne!(scope("\"public\".\"a\""), scope("\"public\".\"b\""));
    }
}
