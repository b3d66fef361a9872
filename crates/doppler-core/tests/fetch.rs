//! The URL policy against a local HTTP server (127.0.0.2, allowed explicitly), and file roots.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use doppler_core::fetch::{fetch, Net, UrlPolicy};
use doppler_core::source::{load, SourcePolicy};
use doppler_core::ErrorKind;

/// Serves canned answers by path, on 127.0.0.2:<port>, for the life of the test process.
fn server() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let n = c.read(&mut buf).unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let png = std::fs::read(format!(
                        "{}/portrait_300x500.png",
                        std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into())
                    ))
                    .unwrap();
                    let reply = |c: &mut std::net::TcpStream, status: &str, headers: &str, body: &[u8]| {
                        let _ = c.write_all(
                            format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                                .as_bytes(),
                        );
                        let _ = c.write_all(body);
                    };
                    match path.as_str() {
                        "/ok.png" => reply(&mut c, "200 OK", "Content-Type: image/png\r\n", &png),
                        "/missing.png" => reply(&mut c, "404 Not Found", "", b"no"),
                        "/broken.png" => reply(&mut c, "500 Internal Server Error", "", b"oops"),
                        "/html.jpg" => reply(&mut c, "200 OK", "Content-Type: image/jpeg\r\n", b"<html><body>hi</body></html>"),
                        "/slow.png" => {
                            std::thread::sleep(Duration::from_secs(3));
                            reply(&mut c, "200 OK", "", &png)
                        }
                        "/loop" => reply(&mut c, "302 Found", &format!("Location: http://127.0.0.2:{port}/loop\r\n"), b""),
                        "/to-loopback" => {
                            reply(&mut c, "302 Found", &format!("Location: http://127.0.0.1:{port}/ok.png\r\n"), b"")
                        }
                        "/to-file" => reply(&mut c, "302 Found", "Location: file:///etc/passwd\r\n", b""),
                        "/huge" => {
                            // no Content-Length: the cap must hold while streaming
                            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                            let chunk = vec![0xFFu8; 64 * 1024];
                            for _ in 0..64 {
                                if c.write_all(&chunk).is_err() {
                                    break;
                                }
                            }
                        }
                        _ => reply(&mut c, "404 Not Found", "", b""),
                    }
                });
            }
        });
        port
    })
}

fn policy() -> UrlPolicy {
    UrlPolicy {
        allowed_hosts: vec![],
        allowed_networks: vec![Net::parse("127.0.0.2/32").unwrap()],
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        max_redirects: 3,
        max_bytes: 1 << 20,
        user_agent: doppler_core::fetch::USER_AGENT.into(),
        limits: Default::default(),
    }
}

fn err(url: &str, p: &UrlPolicy) -> (ErrorKind, String) {
    let e = fetch(url, p).expect_err(url);
    (e.kind, e.message)
}

#[test]
fn url_policy() {
    let port = server();
    let u = |p: &str| format!("http://127.0.0.2:{port}{p}");
    let p = policy();
    let png = fetch(&u("/ok.png"), &p).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    assert_eq!(err(&u("/missing.png"), &p).0, ErrorKind::NotFound);
    let (k, m) = err(&u("/broken.png"), &p);
    assert!(k == ErrorKind::Io && m.contains("500"), "{m}");
    let (k, m) = err(&u("/slow.png"), &p);
    assert!(k == ErrorKind::Io && m.contains("timed out"), "{m}");
    let (k, m) = err(&u("/loop"), &p);
    assert!(k == ErrorKind::Io && m.contains("redirects"), "{m}");
    let (k, m) = err(&u("/to-loopback"), &p);
    assert!(k == ErrorKind::Refused && m.contains("127.0.0.1"), "{m}");
    let (k, m) = err(&u("/to-file"), &p);
    assert!(k == ErrorKind::Refused && m.contains("file"), "{m}");
    let (k, m) = err(&u("/huge"), &p);
    assert!(
        k == ErrorKind::TooLarge && m.contains("over the limit"),
        "{m}"
    );
    // HTML served as image/jpeg arrives, and is then not an image
    let html = fetch(&u("/html.jpg"), &p).unwrap();
    let e = doppler_core::decode_rgb(&html, "html", &Default::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotAnImage);

    // private and reserved addresses, literal or after DNS, v4 and v6 and mapped
    let strict = UrlPolicy {
        allowed_networks: vec![],
        ..policy()
    };
    for url in [
        u("/ok.png"),
        format!("http://127.0.0.1:{port}/ok.png"),
        format!("http://localhost:{port}/ok.png"),
        format!("http://[::1]:{port}/ok.png"),
        format!("http://[::ffff:127.0.0.2]:{port}/ok.png"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1/x.png".to_string(),
        "http://0.0.0.0/x.png".to_string(),
    ] {
        let (k, m) = err(&url, &strict);
        assert_eq!(k, ErrorKind::Refused, "{url}: {m}");
    }
    // host allowlist
    let only = UrlPolicy {
        allowed_hosts: vec!["images.example.org".into()],
        ..policy()
    };
    assert_eq!(err(&u("/ok.png"), &only).0, ErrorKind::Refused);
    // schemes
    assert_eq!(err("ftp://127.0.0.2/x.png", &p).0, ErrorKind::Unsupported);
    assert_eq!(err("file:///etc/passwd", &p).0, ErrorKind::Unsupported);
}

#[test]
fn urls_off_and_other_schemes_through_load() {
    let off = SourcePolicy::files(1 << 20);
    assert_eq!(
        load("http://127.0.0.2/x.png", &off).unwrap_err().kind,
        ErrorKind::Refused
    );
    assert_eq!(
        load("file:///etc/passwd", &off).unwrap_err().kind,
        ErrorKind::Unsupported
    );
    assert_eq!(
        load("ftp://example.org/x.png", &off).unwrap_err().kind,
        ErrorKind::Unsupported
    );
}

#[test]
fn file_roots() {
    let base = std::env::temp_dir().join(format!("doppler-roots-{}", std::process::id()));
    let root = base.join("allowed");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("in.png"), b"\x89PNG").unwrap();
    std::fs::write(base.join("secret.png"), b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(base.join("secret.png"), root.join("escape.png"));
    let p = SourcePolicy {
        max_bytes: 1 << 20,
        file_roots: vec![root.to_string_lossy().into()],
        urls: None,
    };
    let r = root.to_string_lossy();
    assert_eq!(load(&format!("{r}/in.png"), &p).unwrap(), b"\x89PNG");
    for bad in [
        format!("{r}/escape.png"),
        format!("{r}/../secret.png"),
        "/etc/hostname".to_string(),
    ] {
        let e = load(&bad, &p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused, "{bad}: {e}");
        assert!(e.message.contains("outside doppler.file_roots"), "{e}");
    }
    assert_eq!(
        load("relative/in.png", &p).unwrap_err().kind,
        ErrorKind::Config
    );
}

/// A refusal is the policy's by its type, not by words: a URL whose text reads like one, on a port
/// nothing listens on, is an I/O failure.
#[test]
fn a_url_cannot_pass_for_a_refusal() {
    let url =
        "http://127.0.0.2:1/refused:/private%20or%20reserved/not%20in%20doppler.url_allowed_hosts";
    let (k, m) = err(url, &policy());
    assert_eq!(k, ErrorKind::Io, "{m}");
}
