//! The streamed batch preparation: chunks handed over in order, errors at their own index, the
//! same slots as one image at a time, and a consumer that fails does not leave threads behind.

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
fn chunks_arrive_in_order_with_errors_in_place() {
    let srcs = sources();
    let pre = Preprocess::IMAGENET;
    let policy = SourcePolicy::files(64 << 20);
    let opts = StreamOptions {
        threads: 3,
        chunk: 3,
        want_hash: true,
    };
    let mut starts = Vec::new();
    let mut all = Vec::new();
    prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        opts,
        |start, images| {
            starts.push((start, images.len()));
            all.extend(images);
        },
        || {},
    );
    // a short first chunk (a quarter, at least one image), then whole ones
    assert_eq!(starts, vec![(0, 1), (1, 3), (4, 3), (7, 3), (10, 1)]);
    assert_eq!(all.len(), srcs.len());
    for (i, (src, got)) in srcs.iter().zip(&all).enumerate() {
        let Source::Bytes(bytes) = src else {
            unreachable!()
        };
        let mut want = vec![0f32; pre.slot_len()];
        let one = prepare(bytes, "x", &Limits::default(), &pre, &mut want);
        match (one, got) {
            (Ok(()), Ok((slot, hash))) => {
                assert_eq!(slot, &want, "image {i}");
                assert!(hash.is_some());
            }
            (Err(_), Err(e)) => assert_eq!(i % 4, 2, "{e}"),
            (a, b) => panic!("image {i}: alone {a:?}, streamed {:?}", b.as_ref().err()),
        }
    }
    // large chunks, one thread: the same results
    let mut once = Vec::new();
    let mut runs = Vec::new();
    let one_chunk = StreamOptions {
        threads: 1,
        chunk: srcs.len(),
        want_hash: true,
    };
    prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        one_chunk,
        |start, images| {
            runs.push((start, images.len()));
            once.extend(images);
        },
        || {},
    );
    assert_eq!(runs, vec![(0, 2), (2, 9)]);
    assert_eq!(once.len(), all.len());
    for (a, b) in once.iter().zip(&all) {
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
    };
    let r = std::panic::catch_unwind(|| {
        prepare_stream(
            &srcs,
            &Preprocess::IMAGENET,
            &Limits::default(),
            &SourcePolicy::files(64 << 20),
            opts,
            |start, _| assert!(start < 4, "the consumer fails at chunk {start}"),
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
    let stats = prepare_stream(
        &srcs,
        &pre,
        &Limits::default(),
        &policy,
        StreamOptions {
            threads: 2,
            chunk: 2,
            want_hash: true,
        },
        |_, images| {
            assert!(images.iter().all(|i| i.is_ok()));
            chunks += 1;
        },
        || {},
    );
    assert_eq!(chunks, 4); // 1, 2, 2, 1
    assert!(stats.read > std::time::Duration::ZERO, "{stats:?}");
    assert!(stats.decode > std::time::Duration::ZERO, "{stats:?}");
    assert!(stats.resize > std::time::Duration::ZERO, "{stats:?}");
}
