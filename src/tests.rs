//! Integration tests inside a real Postgres (`cargo pgrx test pg15|pg18`). Each test runs in its
//! own connection, hence its own backend process. Fixtures and models come from scripts/setup.

use pgrx::prelude::*;

fn setting(name: &str) -> String {
    Spi::get_one_with_args::<String>("SELECT current_setting($1)", &[name.into()])
        .unwrap()
        .unwrap()
}

fn fixtures() -> String {
    setting("doppler_test.fixtures")
}

fn models() -> String {
    setting("doppler_test.models")
}

fn features(path: &str) -> Vec<f32> {
    Spi::get_one_with_args::<Vec<f32>>("SELECT doppler.extract_features($1::text)", &[path.into()])
        .unwrap()
        .expect("features are not NULL")
}

fn reference(path: &str) -> Vec<f32> {
    let raw = std::fs::read(format!("{path}.f32")).expect("reference features (run scripts/setup)");
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut dot, mut na, mut nb, mut max) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
        max = max.max((x - y).abs());
    }
    (dot / (na.sqrt() * nb.sqrt()), max)
}

/// `SQLSTATE message` of the error `sql` raises, or "ok".
fn error_of(sql: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.err_of(q text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN EXECUTE q; RETURN 'ok';
         EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.err_of($1)", &[sql.into()])
        .unwrap()
        .unwrap()
}

fn assert_error(sql: &str, sqlstate: &str, contains: &str) {
    let got = error_of(sql);
    assert!(
        got.starts_with(sqlstate) && got.contains(contains),
        "{sql}\n  expected {sqlstate} containing {contains:?}\n  got {got}"
    );
}

fn tmp_file(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("doppler-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn parity_with_the_python_reference_on_every_fixture() {
        let dir = fixtures();
        let manifest = std::fs::read_to_string(format!("{dir}/manifest.tsv"))
            .expect("manifest (run scripts/setup)");
        let mut n = 0;
        for line in manifest.lines() {
            let name = line.split('\t').next().unwrap();
            let path = format!("{dir}/{name}");
            let got = features(&path);
            assert_eq!(got.len(), 2048, "{name}");
            let (cos, max) = compare(&got, &reference(&path));
            assert!(
                cos >= 0.99999 && max <= 1e-3,
                "{name}: cosine {cos}, max abs diff {max}"
            );
            n += 1;
        }
        assert!(n >= 20, "only {n} fixtures");
    }

    #[pg_test]
    fn bytea_form_equals_path_form() {
        let path = format!("{}/landscape_640x480.jpg", fixtures());
        let from_bytes = Spi::get_one_with_args::<Vec<f32>>(
            "SELECT doppler.extract_features(pg_read_binary_file($1))",
            &[path.as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(from_bytes, features(&path));
    }

    #[pg_test]
    fn one_session_per_backend_rebuilt_when_the_model_changes() {
        let path = format!("{}/portrait_300x500.png", fixtures());
        assert_eq!(
            Spi::get_one::<i64>("SELECT sessions_created FROM doppler.session_info()").unwrap(),
            Some(0)
        );
        let first = features(&path);
        let second = features(&path);
        assert_eq!(first, second);
        assert_eq!(
            Spi::get_one::<i64>("SELECT sessions_created FROM doppler.session_info()").unwrap(),
            Some(1)
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT execution_provider FROM doppler.session_info()")
                .unwrap()
                .as_deref(),
            Some("CPU")
        );

        // another registered model: a second session
        Spi::run(&format!(
            "SELECT doppler.register_model('tiny', '{}/tiny.onnx', dim => 16)",
            models()
        ))
        .unwrap();
        let tiny = || {
            Spi::get_one_with_args::<Vec<f32>>(
                "SELECT doppler.extract_features($1, 'tiny')",
                &[path.as_str().into()],
            )
            .unwrap()
            .unwrap()
        };
        assert_eq!(tiny().len(), 16);
        assert_eq!(
            Spi::get_two::<String, i32>("SELECT model, dimensions FROM doppler.session_info()")
                .unwrap(),
            (Some("tiny".into()), Some(16))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT sessions_created FROM doppler.session_info()").unwrap(),
            Some(2)
        );

        // back to the first model: its session is still cached (doppler.max_sessions = 2)
        assert_eq!(features(&path), first);
        assert_eq!(
            Spi::get_one::<i64>("SELECT max(sessions_created) FROM doppler.session_info()")
                .unwrap(),
            Some(2)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM doppler.session_info()").unwrap(),
            Some(2)
        );
        // a setting the session depends on: a new session, the least recently used one dropped
        Spi::run("SET doppler.intra_op_threads = 2").unwrap();
        tiny();
        assert_eq!(
            Spi::get_one::<i64>("SELECT max(sessions_created) FROM doppler.session_info()")
                .unwrap(),
            Some(3)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM doppler.session_info()").unwrap(),
            Some(2)
        );
    }

    /// No CUDA here (the CPU build of ONNX Runtime): `cuda` falls back to the CPU (with a WARNING)
    /// and gives the same features.
    #[pg_test]
    fn cuda_falls_back_to_the_cpu() {
        let path = format!("{}/landscape_640x480.jpg", fixtures());
        let cpu = features(&path);
        let created = || {
            Spi::get_one::<i64>("SELECT sessions_created FROM doppler.session_info() LIMIT 1")
                .unwrap()
                .unwrap()
        };
        let before = created();
        Spi::run("SET doppler.execution_provider = 'cuda'").unwrap();
        assert_eq!(features(&path), cpu);
        // a session of its own was built for the setting (the WARNING is checked in
        // tests/integration/test_models.py), and it runs on the CPU
        assert_eq!(created(), before + 1);
        assert_eq!(
            Spi::get_one::<String>("SELECT execution_provider FROM doppler.session_info() LIMIT 1")
                .unwrap()
                .as_deref(),
            Some("CPU")
        );
    }

    /// doppler.jpeg_draft_size changes how large JPEGs are decoded (features move a little) but
    /// never a dHash.
    #[pg_test]
    fn jpeg_draft_changes_features_not_hashes() {
        let path = format!("{}/large_3000x2000.jpg", fixtures());
        let hash = || {
            Spi::get_one_with_args::<String>(
                "SELECT doppler.dhash($1::text)",
                &[path.as_str().into()],
            )
            .unwrap()
        };
        let (full, full_hash) = (features(&path), hash());
        Spi::run("SET doppler.jpeg_draft_size = 448").unwrap();
        let draft = features(&path);
        assert_ne!(draft, full);
        let dot: f64 = full
            .iter()
            .zip(&draft)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(dot / (norm(&full) * norm(&draft)) > 0.9);
        assert_eq!(hash(), full_hash);
    }

    /// doppler.model_path is the file of the resnet50 entry: a model of other dimensions there is
    /// refused (register it under its own name instead).
    #[pg_test(
        error = "model \"resnet50\" (/opt/doppler/models/tiny.onnx) produces 16-dimensional features, but doppler.models says 2048"
    )]
    fn model_path_must_fit_the_resnet50_entry() {
        Spi::run(&format!(
            "SET doppler.model_path = '{}/tiny.onnx'",
            models()
        ))
        .unwrap();
        features(&format!("{}/portrait_300x500.png", fixtures()));
    }

    #[pg_test]
    fn null_in_null_out() {
        assert_eq!(
            Spi::get_one::<Vec<f32>>("SELECT doppler.extract_features(NULL::text)").unwrap(),
            None
        );
        assert_eq!(
            Spi::get_one::<Vec<f32>>("SELECT doppler.extract_features(NULL::bytea)").unwrap(),
            None
        );
    }

    #[pg_test]
    fn file_errors_name_the_path_and_the_problem() {
        let ef = |p: &str| format!("SELECT doppler.extract_features('{p}'::text)");
        assert_error(
            &ef("/no/such/image.jpg"),
            "58P01",
            "\"/no/such/image.jpg\" does not exist",
        );
        assert_error(&ef("/tmp"), "42809", "\"/tmp\" is a directory");
        assert_error(&ef("relative/cat.jpg"), "22023", "is not absolute");

        let secret = tmp_file("secret.jpg", b"\xFF\xD8\xFF");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        assert_error(&ef(&secret), "42501", "permission denied");

        let empty = tmp_file("empty.png", b"");
        assert_error(&ef(&empty), "22P03", "is empty");

        let text = tmp_file("notes.jpg", b"this is not an image at all\n");
        assert_error(&ef(&text), "22P03", "is not an image");

        let jpeg = std::fs::read(format!("{}/landscape_640x480.jpg", fixtures())).unwrap();
        let truncated = tmp_file("truncated.jpg", &jpeg[..jpeg.len() / 2]);
        assert_error(&ef(&truncated), "22P03", "JPEG");

        let mut png = std::fs::read(format!("{}/portrait_300x500.png", fixtures())).unwrap();
        let mid = png.len() / 2;
        png[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0x5A);
        let corrupt = tmp_file("corrupt.png", &png);
        assert_error(&ef(&corrupt), "22P03", "corrupt");

        let qoi = tmp_file(
            "picture.qoi",
            b"qoif\x00\x00\x00\x10\x00\x00\x00\x10\x03\x00rest",
        );
        assert_error(&ef(&qoi), "0A000", "unsupported image format");

        Spi::run("SET doppler.max_image_bytes = 1000").unwrap();
        assert_error(
            &ef(&format!("{}/landscape_640x480.jpg", fixtures())),
            "54000",
            "over the limit of 1000 bytes",
        );
    }

    #[pg_test]
    fn bytea_errors() {
        assert_error(
            "SELECT doppler.extract_features(''::bytea)",
            "22P03",
            "image data (0 bytes) is empty",
        );
        assert_error(
            "SELECT doppler.extract_features('\\x0102030405'::bytea)",
            "22P03",
            "is not an image",
        );
        // a tiny PNG whose header claims 60000 x 60000 pixels: refused from the header
        let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(kind);
            png.extend_from_slice(data);
            png.extend_from_slice(&crc32(&[kind, data].concat()).to_be_bytes());
        };
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let ihdr = [
            &60000u32.to_be_bytes()[..],
            &60000u32.to_be_bytes()[..],
            &[8, 2, 0, 0, 0],
        ]
        .concat();
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        chunk(&mut png, b"IEND", b"");
        let path = tmp_file("bomb.png", &png);
        assert_error(
            &format!("SELECT doppler.extract_features('{path}'::text)"),
            "54000",
            "60000x60000",
        );
    }

    #[pg_test]
    fn model_errors() {
        let img = format!("{}/tiny_7x5.png", fixtures());
        let q = format!("SELECT doppler.extract_features('{img}'::text)");
        Spi::run("SET doppler.model_path = '/no/such/model.onnx'").unwrap();
        assert_error(
            &q,
            "58P01",
            "model file \"/no/such/model.onnx\" does not exist",
        );
        Spi::run(&format!(
            "SET doppler.model_path = '{}/wrong-shape.onnx'",
            models()
        ))
        .unwrap();
        assert_error(&q, "22023", "does not fit");
        Spi::run(&format!(
            "SET doppler.model_path = '{}/manifest.tsv'",
            fixtures()
        ))
        .unwrap();
        assert_error(&q, "22023", "cannot load model");
        Spi::run("SET doppler.model_path = ''").unwrap();
        assert_error(&q, "22023", "has no file: doppler.model_path is not set");
    }

    /// `$libdir` and `$sharedir` name the server's own directories (where packages put the
    /// bundled ONNX Runtime and model); nothing else is expanded.
    #[pg_test]
    fn install_dirs_are_the_servers() {
        use crate::dirs::{expand, libdir, sharedir};
        let lib = libdir();
        let share = sharedir();
        assert!(
            std::path::Path::new(&lib).join("doppler.so").is_file(),
            "{lib}"
        );
        assert!(
            std::path::Path::new(&share)
                .join("extension/doppler.control")
                .is_file(),
            "{share}"
        );
        assert_eq!(
            expand("$libdir/doppler/x.so"),
            format!("{lib}/doppler/x.so")
        );
        assert_eq!(expand("$sharedir"), share);
        assert_eq!(
            expand("$sharedir/doppler/m.onnx"),
            format!("{share}/doppler/m.onnx")
        );
        for kept in [
            "$libdirx/y",
            "/abs/$libdir/y",
            "$LIBDIR/y",
            "relative/$sharedir",
        ] {
            assert_eq!(expand(kept), kept);
        }
        // the library the packages install is the default
        let default = Spi::get_one::<String>(
            "SELECT boot_val FROM pg_settings WHERE name = 'doppler.onnxruntime_library'",
        )
        .unwrap();
        assert_eq!(default.as_deref(), crate::dirs::BUNDLED_ORT.to_str().ok());
        // and the bundled model is registered, named in the share directory
        let path = Spi::get_one::<String>(
            "SELECT onnx_path FROM doppler.models WHERE name = 'efficientnet_lite0'",
        )
        .unwrap();
        assert_eq!(path.as_deref(), Some(crate::dirs::BUNDLED_MODEL));
    }

    #[pg_test]
    fn missing_onnxruntime_library() {
        // a fresh backend: ONNX Runtime is not loaded yet
        Spi::run("SET doppler.onnxruntime_library = '/no/such/libonnxruntime.so'").unwrap();
        let img = format!("{}/tiny_7x5.png", fixtures());
        assert_error(
            &format!("SELECT doppler.extract_features('{img}'::text)"),
            "58P01",
            "could not load the ONNX Runtime library \"/no/such/libonnxruntime.so\"",
        );
    }

    #[pg_test]
    fn privileges() {
        Spi::run("CREATE ROLE doppler_plain_user").unwrap();
        Spi::run("GRANT USAGE ON SCHEMA doppler TO doppler_plain_user").unwrap();
        let img = format!("{}/tiny_7x5.png", fixtures());
        Spi::run("SET ROLE doppler_plain_user").unwrap();
        assert_error(
            &format!("SELECT doppler.extract_features('{img}'::text)"),
            "42501",
            "permission denied to read image file",
        );
        assert_error(
            "SET doppler.model_path = '/tmp/evil.onnx'",
            "42501",
            "doppler.model_path",
        );
        assert_error(
            "SET doppler.onnxruntime_library = '/tmp/evil.so'",
            "42501",
            "doppler.onnxruntime_library",
        );
        Spi::run("RESET ROLE").unwrap();
        let bytes = std::fs::read(&img).unwrap();
        Spi::run("GRANT pg_read_server_files TO doppler_plain_user").unwrap();
        Spi::run("SET ROLE doppler_plain_user").unwrap();
        assert_eq!(features(&img).len(), 2048);
        let n = Spi::get_one_with_args::<i32>(
            "SELECT array_length(doppler.extract_features($1::bytea), 1)",
            &[bytes.as_slice().into()],
        )
        .unwrap();
        assert_eq!(n, Some(2048));
    }

    #[pg_test]
    fn dhash_equals_imagehash_and_hamming() {
        let dir = format!("{}/dhash", fixtures());
        let list = std::fs::read_to_string(format!("{dir}/dhash.tsv")).expect("dhash fixtures");
        let mut n = 0;
        for line in list.lines() {
            let (name, want) = line.split_once('\t').unwrap();
            let path = format!("{dir}/{name}");
            let got = Spi::get_one_with_args::<String>(
                "SELECT doppler.dhash($1::text)",
                &[path.as_str().into()],
            )
            .unwrap();
            assert_eq!(got.as_deref(), Some(want), "{name}");
            let from_bytes = Spi::get_one_with_args::<String>(
                "SELECT doppler.dhash(pg_read_binary_file($1))",
                &[path.as_str().into()],
            )
            .unwrap();
            assert_eq!(from_bytes.as_deref(), Some(want), "{name} (bytea)");
            n += 1;
        }
        assert!(n >= 150);
        assert_eq!(
            Spi::get_one::<i32>("SELECT doppler.hamming('00ff000000000000', '00fe000000000001')")
                .unwrap(),
            Some(2)
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT doppler.hamming(0::bigint, -1::bigint)").unwrap(),
            Some(64)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT doppler.dhash_to_bigint('ffffffffffffffff')").unwrap(),
            Some(-1)
        );
        assert_error(
            "SELECT doppler.hamming('nan', '0000000000000000')",
            "22023",
            "invalid dHash \"nan\"",
        );
        assert_error(
            "SELECT doppler.l2_distance('{1,2}'::real[], '{1,2,3}'::real[])",
            "22000",
            "different vector dimensions 2 and 3",
        );
        assert_eq!(
            Spi::get_one::<f64>("SELECT doppler.l2_distance('{0,3}'::real[], '{4,0}'::real[])")
                .unwrap(),
            Some(5.0)
        );
        assert_eq!(
            Spi::get_one::<f64>("SELECT doppler.cosine_distance('{1,0}'::real[], '{0,2}'::real[])")
                .unwrap(),
            Some(1.0)
        );
    }

    /// The closed sets of a watch read back from their words, and an unknown word is 22023
    /// naming the words allowed (never a default).
    #[pg_test]
    fn closed_sets_read_back_and_refuse_unknown_words() {
        use crate::watched::{Mode, OnError, SourceKind, VectorKind};
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.as_str()), Some(*m));
        }
        for o in OnError::ALL {
            assert_eq!(OnError::parse(o.as_str()), Some(*o));
        }
        for k in SourceKind::ALL {
            assert_eq!(SourceKind::parse(k.as_str()), Some(*k));
        }
        for k in VectorKind::ALL {
            assert_eq!(VectorKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(Mode::parse("Async"), None);
        assert_eq!(crate::watched::kinds::one_of(&["a", "b", "c"]), "a, b or c");
        Spi::run("CREATE TABLE closed_sets (id int PRIMARY KEY, img bytea, features real[])")
            .unwrap();
        assert_error(
            "SELECT doppler.watch('closed_sets', 'img', mode => 'Async')",
            "22023",
            "mode must be async, sync or manual, not \"Async\"",
        );
        assert_error(
            "SELECT doppler.watch('closed_sets', 'img', on_error => 'ignore')",
            "22023",
            "on_error must be raise or defer",
        );
        Spi::run("SELECT doppler.watch('closed_sets', 'img', mode => 'manual')").unwrap();
        assert_error(
            "SELECT doppler.similar('closed_sets', ARRAY[1,2]::real[], 1, 'manhattan')",
            "22023",
            "metric must be l2 or cosine, not \"manhattan\"",
        );
        assert_error(
            "SELECT doppler.similar('closed_sets', ARRAY[1,2]::real[], 1, 'hamming')",
            "22023",
            "metric must be l2 or cosine, not \"hamming\"",
        );
        assert_error(
            "SELECT doppler.create_index('closed_sets', 'manhattan')",
            "22023",
            "metric must be l2, cosine, hamming or pdq, not \"manhattan\"",
        );
    }

    /// A watched column whose type changes under the watch ends the watch (the event trigger
    /// that follows ALTER; fill then says the table is not watched); a watch left from before
    /// (the event trigger off, as in session_replication_role = replica) is a clear 42804 when
    /// filled, never an internal error.
    #[pg_test]
    fn a_retyped_column_ends_the_watch_or_is_a_datatype_mismatch() {
        for (table, replica) in [("retyped", false), ("retyped_quietly", true)] {
            Spi::run(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, pic bytea, features real[])"
            ))
            .unwrap();
            Spi::run(&format!(
                "SELECT doppler.watch('{table}', 'pic', mode => 'manual')"
            ))
            .unwrap();
            if replica {
                Spi::run("SET session_replication_role = replica").unwrap();
            }
            Spi::run(&format!(
                "ALTER TABLE {table} ALTER COLUMN pic TYPE text USING encode(pic, 'base64')"
            ))
            .unwrap();
            Spi::run("RESET session_replication_role").unwrap();
            Spi::run(&format!("INSERT INTO {table} VALUES (1, 'aGVsbG8=')")).unwrap();
            let fill = format!("SELECT * FROM doppler._fill_batch('{table}'::regclass::oid, NULL)");
            if replica {
                assert_error(
                    &fill,
                    "42804",
                    "its column pic is text, not a type doppler fills",
                );
            } else {
                assert_error(&fill, "42704", "is not watched by doppler");
            }
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
}
