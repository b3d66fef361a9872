//! `--health-port`: a tiny HTTP/1.1 server for Kubernetes' probes (or any monitor), on a thread
//! of its own, that only reads what the main loop records:
//! * `GET /healthz` (liveness): 200 while the main loop makes progress (a claim returned, with
//!   rows or none) within max(60 s, 3 × its current idle wait + the last batch's time); else 503.
//! * `GET /readyz` (readiness): 200 while both connections are up and the worker is registered.
//!
//! Anything else is 404. Bodies are short JSON objects. One request per connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::log;

/// The shortest time without progress that counts as stalled.
pub const MIN_STALL: Duration = Duration::from_secs(60);

/// What the main loop records.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    /// When the main loop last made progress (its start, before the first claim).
    pub progress: Instant,
    /// How long the last batch took.
    pub last_batch: Duration,
    /// The current wait between empty claims.
    pub idle_wait: Duration,
    /// Connected and registered.
    pub ready: bool,
}

pub struct Health {
    state: Mutex<Snapshot>,
}

impl Health {
    pub fn new(idle_wait: Duration) -> Health {
        Health {
            state: Mutex::new(Snapshot {
                progress: Instant::now(),
                last_batch: Duration::ZERO,
                idle_wait,
                ready: false,
            }),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A claim returned; `batch`: how long its batch took (zero for an empty claim).
    pub fn progress(&self, batch: Option<Duration>) {
        self.with(|s| {
            s.progress = Instant::now();
            if let Some(b) = batch {
                s.last_batch = b;
            }
        });
    }

    pub fn idle_wait(&self, wait: Duration) {
        self.with(|s| s.idle_wait = wait);
    }

    pub fn ready(&self, ready: bool) {
        self.with(|s| s.ready = ready);
    }

    pub fn snapshot(&self) -> Snapshot {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listens on 0.0.0.0:`port` and answers on a thread of its own (signals blocked there:
    /// they are the main thread's).
    pub fn serve(self: &Arc<Self>, port: u16) -> std::io::Result<()> {
        let listener = TcpListener::bind(("0.0.0.0", port))?;
        let me = Arc::clone(self);
        doppler_core::model::with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("health".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        match conn {
                            Ok(stream) => me.answer(stream),
                            Err(e) => {
                                log::warning("health_accept_failed")
                                    .field("error", e.to_string())
                                    .emit();
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
                .map(|_| ())
        })
    }

    fn answer(&self, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // the request head, up to 8 KiB
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let line = head.lines().next().unwrap_or("");
        let (code, body) = respond(line, &self.snapshot(), Instant::now());
        let mut response = http(code, &body);
        if line.starts_with("HEAD ") {
            response.truncate(response.len() - body.len());
        }
        let _ = stream.write_all(response.as_bytes());
    }
}

/// The status and body for a request line (`GET /healthz HTTP/1.1`).
pub fn respond(request_line: &str, s: &Snapshot, now: Instant) -> (u16, String) {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return (404, json!({"error": "not found"}).to_string());
    }
    match path {
        "/healthz" => {
            let since = now.saturating_duration_since(s.progress);
            let limit = MIN_STALL.max(3 * s.idle_wait + s.last_batch);
            let ok = since <= limit;
            let body = json!({
                "status": if ok { "ok" } else { "stalled" },
                "since_progress_s": log::round3(since.as_secs_f64()),
                "limit_s": log::round3(limit.as_secs_f64()),
            });
            (if ok { 200 } else { 503 }, body.to_string())
        }
        "/readyz" => {
            let body = json!({"status": if s.ready { "ready" } else { "not ready" }});
            (if s.ready { 200 } else { 503 }, body.to_string())
        }
        _ => (404, json!({"error": "not found"}).to_string()),
    }
}

/// A whole HTTP/1.1 response.
fn http(code: u16, body: &str) -> String {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(progress_ago: u64, last_batch: u64, idle: u64, ready: bool, now: Instant) -> Snapshot {
        Snapshot {
            progress: now - Duration::from_secs(progress_ago),
            last_batch: Duration::from_secs(last_batch),
            idle_wait: Duration::from_secs(idle),
            ready,
        }
    }

    #[test]
    fn liveness() {
        let now = Instant::now() + Duration::from_secs(1000);
        let get = |s: &Snapshot| respond("GET /healthz HTTP/1.1", s, now).0;
        assert_eq!(get(&snap(5, 0, 2, false, now)), 200);
        assert_eq!(get(&snap(59, 0, 2, true, now)), 200);
        assert_eq!(get(&snap(61, 0, 2, true, now)), 503);
        // a long last batch or a long idle wait stretch the limit
        assert_eq!(get(&snap(100, 100, 2, true, now)), 200);
        assert_eq!(get(&snap(100, 50, 2, true, now)), 503);
        assert_eq!(get(&snap(100, 0, 40, true, now)), 200);
        assert_eq!(get(&snap(130, 0, 40, true, now)), 503);
        let (code, body) = respond(
            "GET /healthz?verbose=1 HTTP/1.1",
            &snap(61, 0, 2, true, now),
            now,
        );
        assert_eq!(code, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "stalled");
        assert_eq!(v["limit_s"], 60.0);
    }

    #[test]
    fn readiness_and_others() {
        let now = Instant::now();
        let s = snap(0, 0, 2, true, now);
        assert_eq!(respond("GET /readyz HTTP/1.1", &s, now).0, 200);
        let not = snap(0, 0, 2, false, now);
        let (code, body) = respond("GET /readyz HTTP/1.1", &not, now);
        assert_eq!((code, body.as_str()), (503, r#"{"status":"not ready"}"#));
        for other in [
            "GET / HTTP/1.1",
            "POST /healthz HTTP/1.1",
            "GET /metrics HTTP/1.1",
            "",
            "garbage",
        ] {
            assert_eq!(respond(other, &s, now).0, 404, "{other}");
        }
    }

    #[test]
    fn serves_over_tcp() {
        let h = Arc::new(Health::new(Duration::from_secs(2)));
        // find a free port, then serve on it
        let port = TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        h.serve(port).unwrap();
        let get = |path: &str| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let r = get("/readyz");
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        h.ready(true);
        let r = get("/readyz");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with(r#"{"status":"ready"}"#), "{r}");
        assert!(get("/healthz").starts_with("HTTP/1.1 200 OK"));
        assert!(get("/nope").starts_with("HTTP/1.1 404 Not Found"));
    }
}
