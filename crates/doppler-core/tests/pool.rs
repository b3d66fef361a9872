//! The process's fetch pool against keep-alive servers with latency, one loopback address per
//! test (a host's pause is the process's): requests wait on the network together, connections
//! are reused, at most `max_per_host` in flight to one host, a kept connection serves only the
//! policy that made it, Retry-After pauses the host, and a stream leaves what is still on the
//! network.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use doppler_core::fetch::{fetch, FetchLimits, Fetches, Net, UrlPolicy, USER_AGENT};
use doppler_core::source::SourcePolicy;
use doppler_core::{prepare_stream, ErrorKind, Limits, Preprocess, Source, StreamOptions};

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

/// Serves on `addr`: `/d/<ms>/<anything>` answers a PNG after <ms>; `/429/<secs>` answers 429 with
/// Retry-After; `/big/<anything>` a megabyte that is not an image; `/to/<host:port>/<path>`
/// redirects there. HTTP/1.1, kept alive.
fn serve(addr: &str) -> (u16, Arc<Counts>) {
    let l = TcpListener::bind((addr, 0)).expect("bind a loopback address");
    let port = l.local_addr().unwrap().port();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let png = std::fs::read(format!(
        "{}/portrait_300x500.png",
        std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into())
    ))
    .unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            c.connections.fetch_add(1, SeqCst);
            let (c, png) = (c.clone(), png.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    c.requests.fetch_add(1, SeqCst);
                    let now = c.in_flight.fetch_add(1, SeqCst) + 1;
                    c.peak.fetch_max(now, SeqCst);
                    let parts: Vec<&str> = path.split('/').collect();
                    let reply = match parts.get(1) {
                        Some(&"d") => {
                            std::thread::sleep(Duration::from_millis(parts[2].parse().unwrap()));
                            let mut v = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                                png.len()
                            )
                            .into_bytes();
                            v.extend_from_slice(&png);
                            v
                        }
                        Some(&"big") => {
                            // not an image: a megabyte of zeros
                            let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 1 << 20).into_bytes();
                            v.resize(v.len() + (1 << 20), 0);
                            v
                        }
                        Some(&"to") => format!(
                            "HTTP/1.1 302 Found\r\nLocation: http://{}/{}\r\nContent-Length: 0\r\n\r\n",
                            parts[2],
                            parts[3..].join("/")
                        )
                        .into_bytes(),
                        Some(&"429") => format!(
                            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {}\r\nContent-Length: 0\r\n\r\n",
                            parts[2]
                        )
                        .into_bytes(),
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    };
                    c.in_flight.fetch_sub(1, SeqCst);
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, counts)
}

fn policy(networks: &[&str], per_host: usize) -> UrlPolicy {
    UrlPolicy {
        allowed_hosts: vec![],
        allowed_networks: networks.iter().map(|n| Net::parse(n).unwrap()).collect(),
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(10),
        max_redirects: 3,
        max_bytes: 1 << 20,
        user_agent: USER_AGENT.into(),
        limits: FetchLimits {
            max_per_host: per_host,
            ..FetchLimits::default()
        },
    }
}

/// The error of a fetch that must fail (without printing the bytes of one that did not).
fn failed(r: doppler_core::Result<Vec<u8>>) -> doppler_core::Error {
    match r {
        Err(e) => e,
        Ok(b) => panic!("fetched {} bytes", b.len()),
    }
}

/// Asks for every URL at once under `scope` and waits for all answers.
fn fetch_all(scope: u64, urls: &[String], p: &UrlPolicy) -> Vec<doppler_core::Result<Vec<u8>>> {
    let f = Fetches::get();
    for u in urls {
        f.want(scope, u, p);
    }
    let mut out: Vec<Option<_>> = urls.iter().map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "answers did not come");
        let seen = f.answers();
        for (i, u) in urls.iter().enumerate() {
            if out[i].is_none() {
                out[i] = f.take(scope, u).map(|t| t.body);
            }
        }
        f.wait(seen, Duration::from_millis(50));
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn requests_wait_together_on_few_kept_connections() {
    let (port, counts) = serve("127.0.0.3");
    let p = policy(&["127.0.0.3/32"], 8);
    let urls: Vec<String> = (0..32)
        .map(|i| format!("http://127.0.0.3:{port}/d/200/{i}"))
        .collect();
    let t0 = Instant::now();
    let got = fetch_all(1001, &urls, &p);
    assert!(got
        .iter()
        .all(|r| r.as_ref().is_ok_and(|b| b.starts_with(b"\x89PNG"))));
    // 32 requests of 200 ms, 8 at a time: about 0.8 s, not 6.4 s
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    let peak = counts.peak.load(SeqCst);
    assert!((2..=8).contains(&peak), "peak in flight {peak}");
    assert!(
        counts.connections.load(SeqCst) <= 8,
        "{} connections",
        counts.connections.load(SeqCst)
    );
    // a second round reuses the kept connections
    let before = counts.connections.load(SeqCst);
    let again: Vec<String> = (0..16)
        .map(|i| format!("http://127.0.0.3:{port}/d/50/again{i}"))
        .collect();
    assert!(fetch_all(1001, &again, &p).iter().all(|r| r.is_ok()));
    assert_eq!(
        counts.connections.load(SeqCst),
        before,
        "connections were not reused"
    );
    assert_eq!(counts.requests.load(SeqCst), 48);
    // the per-host limit is the caller's
    counts.peak.store(0, SeqCst);
    let two = policy(&["127.0.0.3/32"], 2);
    let more: Vec<String> = (0..8)
        .map(|i| format!("http://127.0.0.3:{port}/d/100/two{i}"))
        .collect();
    assert!(fetch_all(1001, &more, &two).iter().all(|r| r.is_ok()));
    assert!(
        counts.peak.load(SeqCst) <= 2,
        "peak {}",
        counts.peak.load(SeqCst)
    );
}

#[test]
fn a_kept_connection_serves_only_the_policy_that_made_it() {
    // `localhost` resolves to loopback: allowed only through url_allowed_networks
    let (port, counts) = serve("127.0.0.1");
    let url = format!("http://localhost:{port}/d/0/x.png");
    let open = policy(&["127.0.0.0/8", "::1/128"], 8);
    assert!(fetch(&url, &open).is_ok());
    assert_eq!(counts.connections.load(SeqCst), 1);
    // a stricter policy: refused, though a connection to that host is kept alive
    let strict = policy(&[], 8);
    let e = failed(fetch(&url, &strict));
    assert_eq!(e.kind, ErrorKind::Refused, "{e}");
    assert!(e.message.contains("private or reserved"), "{e}");
    assert_eq!(
        counts.requests.load(SeqCst),
        1,
        "the refused request reached the server"
    );
    // the open policy still reuses its connection
    assert!(fetch(&url, &open).is_ok());
    assert_eq!(counts.connections.load(SeqCst), 1);
}

#[test]
fn retry_after_pauses_the_host() {
    let (port, counts) = serve("127.0.0.4");
    let p = policy(&["127.0.0.4/32"], 8);
    let e = failed(fetch(&format!("http://127.0.0.4:{port}/429/30"), &p));
    assert_eq!(e.kind, ErrorKind::RetryLater, "{e}");
    let wait = e
        .retry_at
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    // the host's other URLs wait too, without a request
    let e = failed(fetch(&format!("http://127.0.0.4:{port}/d/0/other.png"), &p));
    assert_eq!(e.kind, ErrorKind::RetryLater, "{e}");
    assert!(e.retry_at.is_some());
    assert_eq!(counts.requests.load(SeqCst), 1);
}

#[test]
fn a_stream_leaves_what_is_still_on_the_network() {
    let (port, _) = serve("127.0.0.5");
    let url = |ms: u32, i: u32| format!("http://127.0.0.5:{port}/d/{ms}/{i}.png");
    let sources: Vec<Source> = vec![
        Source::Path(url(0, 1)),
        Source::Path(url(3000, 2)),
        Source::Path(url(0, 3)),
        Source::Path(url(50, 4)),
    ];
    let policy = SourcePolicy {
        max_bytes: 1 << 20,
        file_roots: vec![],
        urls: Some(policy(&["127.0.0.5/32"], 8)),
    };
    let opts = StreamOptions {
        threads: 2,
        chunk: 4,
        want_hash: false,
        want_pdq: false,
        release: true,
        scope: 2002,
        ahead: &[],
    };
    let mut handed = Vec::new();
    let t0 = Instant::now();
    let (stats, left) = prepare_stream(
        &sources,
        &Preprocess::IMAGENET,
        &Limits::default(),
        &policy,
        opts,
        |rows, images| {
            assert!(images.iter().all(|i| i.is_ok()));
            handed.extend(rows);
        },
        || {},
    );
    handed.sort();
    assert_eq!(handed, vec![0, 2, 3]);
    assert_eq!(left, vec![1]);
    assert_eq!(stats.released, 1);
    assert_eq!(stats.fetched, 3);
    assert!(stats.fetched_bytes > 0);
    // left after about a second, not after the slow answer's 3 s
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    // the next stream of the scope takes the left one's answer when it comes (without waiting
    // for a second: it was left before)
    let (stats, left) = prepare_stream(
        &sources[1..2],
        &Preprocess::IMAGENET,
        &Limits::default(),
        &policy,
        StreamOptions {
            release: false,
            ..opts
        },
        |_, images| assert!(images[0].is_ok()),
        || {},
    );
    assert!(left.is_empty());
    assert_eq!(stats.fetched, 1);
    assert!(t0.elapsed() >= Duration::from_millis(2900));
}

/// Answers a stream waits for are never dropped, however many there are: 40 answers of a
/// megabyte, lookahead off (its budget 0, so only the minimum of unpinned answers is kept).
#[test]
fn a_stream_gets_every_answer_it_waits_for() {
    let (port, counts) = serve("127.0.0.6");
    let mut p = policy(&["127.0.0.6/32"], 8);
    p.max_bytes = 2 << 20;
    p.limits.prefetch_bytes = 0;
    let sources: Vec<Source> = (0..40)
        .map(|i| Source::Path(format!("http://127.0.0.6:{port}/big/{i}")))
        .collect();
    let policy = SourcePolicy {
        max_bytes: 2 << 20,
        file_roots: vec![],
        urls: Some(p),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut handed = 0;
    let (stats, left) = prepare_stream(
        &sources,
        &Preprocess::IMAGENET,
        &Limits::default(),
        &policy,
        StreamOptions {
            threads: 1,
            chunk: 2,
            want_hash: false,
            want_pdq: false,
            release: false,
            scope: 3003,
            ahead: &[],
        },
        |_, images| {
            // (a slow consumer: the answers pile up)
            std::thread::sleep(Duration::from_millis(20));
            handed += images.len();
            assert!(images
                .iter()
                .all(|i| i.as_ref().is_err_and(|e| e.kind == ErrorKind::NotAnImage)));
        },
        || {
            assert!(
                Instant::now() < deadline,
                "the stream waits for an answer that will not come"
            )
        },
    );
    assert!(left.is_empty());
    assert_eq!(handed, 40);
    assert_eq!(stats.fetched, 40);
    assert_eq!(
        counts.requests.load(SeqCst),
        40,
        "answers were fetched again"
    );
}

/// A host's pause is its own: not another port's of the same name, not a redirect target's.
#[test]
fn a_pause_is_charged_to_the_host_that_earned_it() {
    let (port, counts) = serve("127.0.0.7");
    let (other, _) = serve("127.0.0.7");
    let p = policy(&["127.0.0.7/32"], 8);
    // a closed port on the same address: three connection failures pause 127.0.0.7:1 only
    for i in 0..3 {
        let e = failed(fetch(&format!("http://127.0.0.7:1/x{i}.png"), &p));
        assert_eq!(e.kind, ErrorKind::Io, "{e}");
    }
    let e = failed(fetch("http://127.0.0.7:1/x3.png", &p));
    assert!(e.message.contains("did not answer"), "{e}");
    assert!(fetch(&format!("http://127.0.0.7:{port}/d/0/a.png"), &p).is_ok());
    // a redirect to a host that asks to wait pauses that host, not the one that redirected
    let e = failed(fetch(
        &format!("http://127.0.0.7:{port}/to/127.0.0.7:{other}/429/600"),
        &p,
    ));
    assert_eq!(e.kind, ErrorKind::RetryLater, "{e}");
    assert!(fetch(&format!("http://127.0.0.7:{port}/d/0/b.png"), &p).is_ok());
    assert_eq!(counts.requests.load(SeqCst), 3);
}
