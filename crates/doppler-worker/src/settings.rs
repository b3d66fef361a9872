//! The server's settings, as `doppler.worker_register` hands them over (jsonb), turned into
//! doppler-core's source policy and decoding limits: the worker reads, fetches and decodes under
//! exactly the limits the server's own fill would use. Read again at every registration, so a
//! changed setting reaches the worker when it reconnects.

use std::time::Duration;

use doppler_core::fetch::{FetchLimits, Net, UrlPolicy, USER_AGENT};
use doppler_core::source::SourcePolicy;
use doppler_core::Limits;
use serde::Deserialize;

use crate::pathmap::PathMap;

/// What the worker works under.
#[derive(Clone, Debug)]
pub struct Settings {
    /// With the server's file_roots mapped to this host (see [`PathMap::map_roots`]).
    pub policy: SourcePolicy,
    pub limits: Limits,
    /// How often to send a heartbeat.
    pub heartbeat: Duration,
    /// How long the server waits for a heartbeat before it counts the worker as gone.
    pub lease: Duration,
    /// allowed_networks entries that are not networks (the server skips them too).
    pub bad_networks: Vec<String>,
}

// The server sends every key; the defaults (doppler's GUC defaults) only make an older or newer
// server's payload without one still usable.
#[derive(Deserialize)]
#[serde(default)]
struct Raw {
    max_image_bytes: u64,
    file_roots: Vec<String>,
    allow_urls: bool,
    /// null when URLs are off
    url: Option<RawUrl>,
    limits: RawLimits,
    heartbeat_s: f64,
    lease_s: f64,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            max_image_bytes: 64 << 20,
            file_roots: Vec::new(),
            allow_urls: false,
            url: None,
            limits: RawLimits::default(),
            heartbeat_s: 10.0,
            lease_s: 60.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawUrl {
    allowed_hosts: Vec<String>,
    allowed_networks: Vec<String>,
    connect_timeout_ms: u64,
    timeout_ms: u64,
    max_redirects: usize,
    user_agent: Option<String>,
    max_in_flight: usize,
    max_per_host: usize,
    host_rate: f64,
    prefetch_bytes: u64,
}

impl Default for RawUrl {
    fn default() -> Self {
        let l = FetchLimits::default();
        RawUrl {
            allowed_hosts: Vec::new(),
            allowed_networks: Vec::new(),
            connect_timeout_ms: 3_000,
            timeout_ms: 10_000,
            max_redirects: 3,
            user_agent: None,
            max_in_flight: l.max_in_flight,
            max_per_host: l.max_per_host,
            host_rate: l.host_rate,
            prefetch_bytes: l.prefetch_bytes,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawLimits {
    max_pixels: u64,
    max_dimension: u32,
    jpeg_draft_size: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_pixels: 100_000_000,
            max_dimension: 30_000,
            jpeg_draft_size: 0,
        }
    }
}

/// A whole number of seconds from 1 to a day (a bad value: the default).
fn secs(v: f64, default: u64) -> Duration {
    if v.is_finite() && v >= 1.0 {
        Duration::from_secs_f64(v.min(86_400.0))
    } else {
        Duration::from_secs(default)
    }
}

/// What this host allows whatever the server says (the command line): the server's settings can
/// narrow it, never widen it.
#[derive(Clone, Debug, Default)]
pub struct Caps {
    /// Folders image files are read in (empty: the path map's targets, else the server's roots).
    pub file_roots: Vec<String>,
    /// Private networks URLs may reach, when the server allows them too.
    pub networks: Vec<String>,
}

/// A root no path is inside (doppler-core matches absolute roots only): "no file at all".
const NO_FILE: &str = "\u{0}";

/// Whether folder `inner` is `outer` or inside it.
fn inside(inner: &str, outer: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner == outer || inner.starts_with(&format!("{outer}/")) || outer.is_empty()
}

/// The roots both this host and the server allow: `own` (empty: anywhere) and `server` (the
/// server's roots mapped; empty: anywhere).
fn both_roots(own: Vec<String>, server: Vec<String>) -> Vec<String> {
    match (own.is_empty(), server.is_empty()) {
        (true, _) => server,
        (false, true) => own,
        (false, false) => {
            let mut out: Vec<String> = server
                .iter()
                .filter(|s| own.iter().any(|o| inside(s, o)))
                .cloned()
                .collect();
            out.extend(
                own.iter()
                    .filter(|o| server.iter().any(|s| inside(o, s)))
                    .cloned(),
            );
            out.dedup();
            if out.is_empty() {
                out.push(NO_FILE.to_string());
            }
            out
        }
    }
}

/// Parses the settings jsonb (as text); `paths` maps the server's file_roots to this host;
/// `caps` is what this host allows.
pub fn parse(json: &str, paths: &PathMap, caps: &Caps) -> Result<Settings, String> {
    let unreadable = |e: String| {
        format!("doppler.worker_register returned settings the worker cannot read: {e}")
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| unreadable(e.to_string()))?;
    if !value.is_object() {
        return Err(unreadable("not a JSON object".into()));
    }
    let raw: Raw = serde_json::from_value(value).map_err(|e| unreadable(e.to_string()))?;
    let mut bad_networks = Vec::new();
    let own_networks: Vec<Net> = caps.networks.iter().filter_map(|n| Net::parse(n)).collect();
    let url = raw.url.unwrap_or_default();
    let urls = raw.allow_urls.then(|| {
        let u = &url;
        UrlPolicy {
            allowed_hosts: u.allowed_hosts.clone(),
            allowed_networks: u
                .allowed_networks
                .iter()
                .filter_map(|n| {
                    let net = Net::parse(n);
                    if net.is_none() {
                        bad_networks.push(n.clone());
                    }
                    net
                })
                // (only where this host allows it too)
                .filter(|n| own_networks.iter().any(|o| o.covers(n)))
                .collect(),
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            timeout: Duration::from_millis(u.timeout_ms),
            max_redirects: u.max_redirects,
            max_bytes: raw.max_image_bytes,
            // (no control characters: a header value cannot hold them)
            user_agent: match u
                .user_agent
                .as_deref()
                .unwrap_or("")
                .replace(|c: char| c.is_control(), "")
            {
                ua if ua.trim().is_empty() => USER_AGENT.to_string(),
                ua => ua,
            },
            limits: FetchLimits {
                max_in_flight: u.max_in_flight.max(1),
                max_per_host: u.max_per_host.max(1),
                host_rate: if u.host_rate.is_finite() && u.host_rate > 0.0 {
                    u.host_rate
                } else {
                    0.0
                },
                prefetch_bytes: u.prefetch_bytes,
            },
        }
    });
    Ok(Settings {
        policy: SourcePolicy {
            max_bytes: raw.max_image_bytes,
            file_roots: both_roots(
                if caps.file_roots.is_empty() {
                    paths.targets()
                } else {
                    caps.file_roots.clone()
                },
                paths.map_roots(&raw.file_roots),
            ),
            urls,
        },
        limits: Limits {
            max_pixels: raw.limits.max_pixels,
            max_dimension: raw.limits.max_dimension,
            jpeg_draft_size: raw.limits.jpeg_draft_size,
        },
        heartbeat: secs(raw.heartbeat_s, 10),
        lease: secs(raw.lease_s, 60),
        bad_networks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pathmap::Rule;

    const FULL: &str = r#"{
        "max_image_bytes": 1048576,
        "file_roots": ["/srv/images", "/var/lib/pics/"],
        "allow_urls": true,
        "url": {
            "allowed_hosts": ["img.example.com", ".cdn.example"],
            "allowed_networks": ["10.0.0.0/8", "bogus", "::1"],
            "connect_timeout_ms": 1500,
            "timeout_ms": 7000,
            "max_redirects": 2,
            "user_agent": "crawler\u0007/1",
            "max_in_flight": 16,
            "max_per_host": 4,
            "host_rate": 2.5,
            "prefetch_bytes": 0
        },
        "limits": {"max_pixels": 4000000, "max_dimension": 5000, "jpeg_draft_size": 300},
        "heartbeat_s": 5,
        "lease_s": 30
    }"#;

    #[test]
    fn full_settings() {
        let paths = PathMap::new(vec![Rule::parse("/srv/images=/mnt/img").unwrap()]);
        let caps = Caps {
            file_roots: Vec::new(),
            networks: vec!["0.0.0.0/0".into(), "::/0".into()],
        };
        let s = parse(FULL, &paths, &caps).unwrap();
        assert_eq!(s.policy.max_bytes, 1 << 20);
        // (the path map's target is this host's own root: the server's other root is not mounted)
        assert_eq!(s.policy.file_roots, ["/mnt/img"]);
        let u = s.policy.url_policy().unwrap();
        assert_eq!(u.allowed_hosts, ["img.example.com", ".cdn.example"]);
        assert_eq!(u.allowed_networks.len(), 2);
        assert_eq!(s.bad_networks, ["bogus"]);
        assert_eq!(u.connect_timeout, Duration::from_millis(1500));
        assert_eq!(u.timeout, Duration::from_secs(7));
        assert_eq!(u.max_redirects, 2);
        assert_eq!(u.max_bytes, 1 << 20);
        assert_eq!(u.user_agent, "crawler/1");
        assert_eq!(
            u.limits,
            FetchLimits {
                max_in_flight: 16,
                max_per_host: 4,
                host_rate: 2.5,
                prefetch_bytes: 0
            }
        );
        assert_eq!(s.limits.max_pixels, 4_000_000);
        assert_eq!(s.limits.max_dimension, 5000);
        assert_eq!(s.limits.jpeg_draft_size, 300);
        assert_eq!(s.heartbeat, Duration::from_secs(5));
        assert_eq!(s.lease, Duration::from_secs(30));
    }

    #[test]
    fn the_server_only_narrows_what_this_host_allows() {
        // networks: the server's, where this host allows them too
        let none = parse(FULL, &PathMap::default(), &Caps::default()).unwrap();
        assert!(none
            .policy
            .url_policy()
            .unwrap()
            .allowed_networks
            .is_empty());
        let caps = Caps {
            file_roots: Vec::new(),
            networks: vec!["10.1.0.0/16".into()],
        };
        assert!(parse(FULL, &PathMap::default(), &caps)
            .unwrap()
            .policy
            .url_policy()
            .unwrap()
            .allowed_networks
            .is_empty());
        // roots: both, or none at all
        assert_eq!(
            both_roots(vec!["/mnt".into()], vec!["/mnt/a".into(), "/srv".into()]),
            ["/mnt/a"]
        );
        assert_eq!(both_roots(vec!["/mnt".into()], Vec::new()), ["/mnt"]);
        assert_eq!(both_roots(Vec::new(), vec!["/srv".into()]), ["/srv"]);
        assert_eq!(
            both_roots(vec!["/mnt".into()], vec!["/srv".into()]),
            [NO_FILE]
        );
        let own = Caps {
            file_roots: vec!["/data/pics".into()],
            networks: Vec::new(),
        };
        let s = parse("{}", &PathMap::default(), &own).unwrap();
        assert_eq!(s.policy.file_roots, ["/data/pics"]);
    }

    #[test]
    fn urls_off_and_defaults() {
        let s = parse(
            r#"{"allow_urls": false, "url": {"timeout_ms": 1}}"#,
            &PathMap::default(),
            &Caps::default(),
        )
        .unwrap();
        assert!(s.policy.urls.is_none());
        assert!(s.policy.file_roots.is_empty());
        assert_eq!(s.policy.max_bytes, 64 << 20);
        assert_eq!(s.limits.max_dimension, 30_000);
        assert_eq!(s.heartbeat, Duration::from_secs(10));
        assert_eq!(s.lease, Duration::from_secs(60));
        let s = parse(
            r#"{"allow_urls": true, "url": {"user_agent": null}, "heartbeat_s": 0}"#,
            &PathMap::default(),
            &Caps::default(),
        )
        .unwrap();
        assert_eq!(s.policy.urls.unwrap().user_agent, USER_AGENT);
        assert_eq!(s.heartbeat, Duration::from_secs(10));
    }

    #[test]
    fn bad_settings_are_errors_not_panics() {
        for bad in [
            "",
            "null",
            "[]",
            r#"{"max_image_bytes": -1}"#,
            r#"{"file_roots": "/srv"}"#,
            r#"{"limits": {"max_pixels": "many"}}"#,
            r#"{"allow_urls": "yes"}"#,
        ] {
            assert!(
                parse(bad, &PathMap::default(), &Caps::default()).is_err(),
                "{bad}"
            );
        }
    }
}
