//! The streamed batch preparation: every source handed over once, in chunks, errors with their own
//! source, the same slots as one image at a time, and a consumer that fails does not leave
//! threads behind.

use doppler_core::{
    prepare, prepare_stream, source::SourcePolicy, Limits, Preprocess, Source, StreamOptions,
};

fn fixture(name: &str) -> Vec<u8> {
    let dir = std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into());
    std::fs::read(format!("{dir}/{name}")).expect("fixtures (run scripts/setup first)")
}

fn sources() -> Vec<Source> {
    let good = [
        "landscape_640x480.jpg",
        "portrait_300x500.png",
        "gif_160x120.gif",
        "bitmap_123x77.bmp",
    ];
    (0..11)
        .map(|i| {
            if i % 4 == 2 {
                Source::Bytes(b"not an image".to_vec())
            } else {
                Source::Bytes(fixture(good[i % good.len()]))
            }
        })
        .collect()
}

#[test]
fn every_source_is_handed_over_once_with_its_own_result() {
    let srcs = sources();
    let pre = Preprocess::IMAGENET;
    let policy = SourcePolicy::files(64 << 20);
    let opts = StreamOptions {
        threads: 3,
        chunk: 3,
        want_hash: true,
        want_pdq: true,
        release: false,
        scope: 0,
        ahead: &[],
    };
    let mut sizes = Vec::new();
    let mut all: Vec<Option<doppler_core::PreparedImage>> = srcs.iter().map(|_| None).collect();
    prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        opts,
        |rows, images| {
            sizes.push(images.len());
            for (i, img) in rows.into_iter().zip(images) {
                assert!(
                    all[i].replace(img).is_none(),
                    "source {i} handed over twice"
                );
            }
        },
        || {},
    );
    // a short first chunk (a quarter, at least one image), then at most whole ones
    assert_eq!(sizes[0], 1, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
    let all: Vec<_> = all
        .into_iter()
        .map(|r| r.expect("every source handed over"))
        .collect();
    for (i, (src, got)) in srcs.iter().zip(&all).enumerate() {
        let Source::Bytes(bytes) = src else {
            unreachable!()
        };
        let mut want = vec![0f32; pre.slot_len()];
        let one = prepare(bytes, "x", &Limits::default(), &pre, &mut want);
        match (one, got) {
            (Ok(()), Ok((slot, hash))) => {
                assert_eq!(slot, &want, "image {i}");
                assert!(hash.dhash.is_some() && hash.pdq.is_some());
            }
            (Err(_), Err(e)) => assert_eq!(i % 4, 2, "{e}"),
            (a, b) => panic!("image {i}: alone {a:?}, streamed {:?}", b.as_ref().err()),
        }
    }
    // large chunks, one thread: the same results
    let mut once: Vec<Option<doppler_core::PreparedImage>> = srcs.iter().map(|_| None).collect();
    let mut runs = Vec::new();
    let one_chunk = StreamOptions {
        threads: 1,
        chunk: srcs.len(),
        want_hash: true,
        want_pdq: true,
        release: false,
        scope: 0,
        ahead: &[],
    };
    prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        one_chunk,
        |rows, images| {
            runs.push(images.len());
            for (i, img) in rows.into_iter().zip(images) {
                once[i] = Some(img);
            }
        },
        || {},
    );
    // one thread: in order, the first chunk a quarter
    assert_eq!(runs, vec![2, 9]);
    for (a, b) in once
        .iter()
        .map(|r| r.as_ref().expect("handed over"))
        .zip(&all)
    {
        assert_eq!(a.as_ref().ok(), b.as_ref().ok());
    }
}

#[test]
fn a_failing_consumer_stops_the_threads() {
    let srcs = sources();
    let opts = StreamOptions {
        threads: 2,
        chunk: 2,
        want_hash: false,
        want_pdq: false,
        release: false,
        scope: 0,
        ahead: &[],
    };
    let r = std::panic::catch_unwind(|| {
        prepare_stream(
            &srcs,
            &Preprocess::IMAGENET,
            &Limits::default(),
            &SourcePolicy::files(64 << 20),
            opts,
            |rows, _| assert!(rows[0] < 4, "the consumer fails at chunk {}", rows[0]),
            || {},
        )
    });
    assert!(r.is_err(), "the consumer's panic goes on");
}

/// While a chunk decodes, the caller is polled (a backend checks for a cancel there); a poll that
/// fails (a cancel) stops the stream before the chunk is handed over, and the threads with it.
#[test]
fn the_caller_is_polled_while_a_chunk_decodes() {
    let big = fixture("large_3000x2000.jpg");
    let srcs: Vec<Source> = (0..24).map(|_| Source::Bytes(big.clone())).collect();
    let opts = StreamOptions {
        threads: 1,
        chunk: 24,
        want_hash: true,
        want_pdq: false,
        release: false,
        scope: 0,
        ahead: &[],
    };
    let polls = std::cell::Cell::new(0);
    let consumed = std::cell::Cell::new(false);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prepare_stream(
            &srcs,
            &Preprocess::IMAGENET,
            &Limits::default(),
            &SourcePolicy::files(64 << 20),
            opts,
            |_, _| consumed.set(true),
            || {
                polls.set(polls.get() + 1);
                assert!(polls.get() < 2, "cancelled");
            },
        )
    }));
    assert!(r.is_err(), "the poll's panic goes on");
    assert!(!consumed.get(), "the chunk was handed over");
    assert_eq!(polls.get(), 2);
}

#[test]
fn the_stream_says_where_its_time_went() {
    let dir = std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into());
    let srcs: Vec<Source> = ["landscape_640x480.jpg", "portrait_300x500.png"]
        .iter()
        .cycle()
        .take(6)
        .map(|f| Source::Path(format!("{dir}/{f}")))
        .collect();
    let pre = Preprocess::IMAGENET;
    let policy = SourcePolicy::files(64 << 20);
    let mut chunks = 0;
    let (stats, left) = prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        StreamOptions {
            threads: 2,
            chunk: 2,
            want_hash: true,
            want_pdq: false,
            release: false,
            scope: 0,
            ahead: &[],
        },
        |_, images| {
            assert!(images.iter().all(|i| i.is_ok()));
            chunks += 1;
        },
        || {},
    );
    assert!(left.is_empty());
    assert!(chunks >= 3, "{chunks}"); // 1, 2, 2, 1 (or fewer, larger ones)
    assert!(stats.read > std::time::Duration::ZERO, "{stats:?}");
    assert!(stats.decode > std::time::Duration::ZERO, "{stats:?}");
    assert!(stats.resize > std::time::Duration::ZERO, "{stats:?}");
}
