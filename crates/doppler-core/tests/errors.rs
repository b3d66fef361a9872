//! Every bad input gives a typed error naming the input, never a panic.

use doppler_core::{decode_rgb, model, source, ErrorKind, Limits, Model, Provider, SessionConfig};

fn tmpdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("doppler-core-errors-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(name: &str, bytes: &[u8]) -> String {
    let p = tmpdir().join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

fn fixture(name: &str) -> Vec<u8> {
    let dir = std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into());
    std::fs::read(format!("{dir}/{name}")).expect("fixtures (run scripts/setup first)")
}

fn decode_err(bytes: &[u8]) -> doppler_core::Error {
    decode_rgb(bytes, "test image", &Limits::default()).expect_err("must fail")
}

#[test]
fn file_errors() {
    let e = source::read_file("/no/such/file.jpg", 1 << 20).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("\"/no/such/file.jpg\" does not exist"),
        "{e}"
    );

    let e = source::read_file("/tmp", 1 << 20).unwrap_err();
    assert_eq!(e.kind, ErrorKind::IsDirectory);

    let fifo = tmpdir().join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // must not block waiting for a writer
    let e = source::read_file(fifo.to_str().unwrap(), 1 << 20).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotRegularFile, "{e}");

    let big = write("big.bin", &[0u8; 2048]);
    let e = source::read_file(&big, 1000).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert!(
        e.message.contains("2048 bytes, over the limit of 1000"),
        "{e}"
    );
}

#[test]
fn decode_errors() {
    assert_eq!(decode_err(b"").kind, ErrorKind::NotAnImage);
    assert_eq!(
        decode_err(b"hello, I am text\n").kind,
        ErrorKind::NotAnImage
    );
    assert_eq!(
        decode_err(b"<html><body>404</body></html>").kind,
        ErrorKind::NotAnImage
    );
    assert_eq!(
        decode_err(b"qoif\0\0\0\x10\0\0\0\x10\x03\0").kind,
        ErrorKind::Unsupported
    );

    let jpeg = fixture("landscape_640x480.jpg");
    let e = decode_err(&jpeg[..jpeg.len() / 2]);
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert_eq!(decode_err(&jpeg[..300]).kind, ErrorKind::Corrupt);

    let png = fixture("portrait_300x500.png");
    assert_eq!(decode_err(&png[..png.len() / 3]).kind, ErrorKind::Corrupt);
    let mut bad = png.clone();
    let mid = bad.len() / 2;
    bad[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0x5A);
    assert_eq!(decode_err(&bad).kind, ErrorKind::Corrupt);

    for name in [
        "gif_160x120.gif",
        "bitmap_123x77.bmp",
        "tiff_90x60.tif",
        "lossless_240x180.webp",
    ] {
        let b = fixture(name);
        let e = decode_err(&b[..b.len() / 2]);
        assert_eq!(e.kind, ErrorKind::Corrupt, "{name}: {e}");
    }
}

#[test]
fn limits_are_checked_from_the_header() {
    let big = fixture("large_3000x2000.jpg");
    let small = Limits {
        max_pixels: 1_000_000,
        max_dimension: 10_000,
        jpeg_draft_size: 0,
    };
    let e = decode_rgb(&big, "big", &small).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert!(e.message.contains("3000x2000"), "{e}");
    let narrow = Limits {
        max_pixels: u64::MAX,
        max_dimension: 2000,
        jpeg_draft_size: 0,
    };
    assert_eq!(
        decode_rgb(&big, "big", &narrow).unwrap_err().kind,
        ErrorKind::TooLarge
    );
    let png = fixture("portrait_300x500.png");
    assert_eq!(
        decode_rgb(
            &png,
            "png",
            &Limits {
                max_pixels: 100,
                max_dimension: 10,
                jpeg_draft_size: 0,
            }
        )
        .unwrap_err()
        .kind,
        ErrorKind::TooLarge
    );
}

#[test]
fn model_errors() {
    let e = model::runtime("/no/such/libonnxruntime.so").unwrap_err();
    assert_eq!(e.kind, ErrorKind::RuntimeMissing);
    let e = model::runtime("relative/libonnxruntime.so").unwrap_err();
    assert_eq!(e.kind, ErrorKind::RuntimeMissing);

    let deps = std::env::var("DOPPLER_DEPS").unwrap_or_else(|_| "/opt/doppler".into());
    let lib = std::env::var("DOPPLER_ORT_LIB")
        .unwrap_or_else(|_| format!("{deps}/lib/libonnxruntime.so.1.31.1"));
    let models = std::env::var("DOPPLER_MODELS").unwrap_or_else(|_| format!("{deps}/models"));
    let env = model::runtime(&lib).unwrap();
    let cfg = |p: String| SessionConfig {
        model_path: p,
        intra_op_threads: 1,
        spinning: true,
        provider: Provider::Cpu,
        device_id: 0,
    };

    let e = Model::load(env, &cfg("/no/such/model.onnx".into()))
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = Model::load(env, &cfg(format!("{models}/wrong-shape.onnx")))
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::BadModel);
    assert!(e.message.contains("does not fit"), "{e}");
    let junk = write("junk.onnx", b"not a model");
    let e = Model::load(env, &cfg(junk)).err().unwrap();
    assert_eq!(e.kind, ErrorKind::BadModel);
    let e = Model::load(env, &cfg(String::new())).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Config);

    // `auto` on a machine without CUDA falls back to the CPU and says why
    let m = Model::load(
        env,
        &SessionConfig {
            provider: Provider::Auto,
            ..cfg(format!("{models}/tiny.onnx"))
        },
    )
    .unwrap();
    assert_eq!(m.dim, 16);
    if m.provider == "CPU" {
        assert!(m.fallback.is_some());
    }
}
