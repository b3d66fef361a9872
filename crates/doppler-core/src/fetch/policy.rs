//! What a fetch may do: only http and https; a host allowlist; no private, loopback,
//! link-local, multicast, unspecified or otherwise reserved addresses (v4 and v6, mapped forms
//! too) unless a network is explicitly allowed; connect and total timeouts; at most N redirects,
//! each checked again; a byte cap. And how hard doppler may press the hosts it fetches from
//! ([`FetchLimits`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// A network in CIDR form, e.g. `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    bits: u8,
}

impl std::fmt::Display for Net {
    /// CIDR form, as [`Net::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl Net {
    pub fn parse(s: &str) -> Option<Net> {
        let (a, b) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = if b.is_empty() { max } else { b.parse().ok()? };
        (bits <= max).then_some(Net { addr, bits })
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &Net) -> bool {
        self.bits <= other.bits && self.contains(other.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(i)) => prefix_eq(&n.octets(), &i.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(i)) => prefix_eq(&n.octets(), &i.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (full, rest) = ((bits / 8) as usize, bits % 8);
    a[..full] == b[..full] && (rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0)
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let o = v6.octets();
                // ::a.b.c.d (deprecated IPv4-compatible) and 64:ff9b::a.b.c.d (NAT64)
                if o[..12] == [0; 12] && !v6.is_loopback() && !v6.is_unspecified()
                    || o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]
                {
                    IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || a == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1))
        }
    }
}

/// What a fetch may do.
#[derive(Clone, Debug)]
pub struct UrlPolicy {
    /// Hosts that may be fetched (exact names, or `.example.com` for subdomains); empty: any.
    pub allowed_hosts: Vec<String>,
    /// Non-public networks that may be reached anyway (e.g. a local image server).
    pub allowed_networks: Vec<Net>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_redirects: usize,
    pub max_bytes: u64,
    /// The User-Agent header sent.
    pub user_agent: String,
    /// Politeness and concurrency, per process; not part of what a connection may reach.
    pub limits: FetchLimits,
}

/// How many requests a process keeps in flight, and how hard it presses one host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FetchLimits {
    /// Requests in flight at once, all hosts together.
    pub max_in_flight: usize,
    /// Requests in flight at once to one host.
    pub max_per_host: usize,
    /// Requests started per second to one host; 0: no limit.
    pub host_rate: f64,
    /// Bytes of images fetched ahead of the batch that will need them; 0: no lookahead.
    pub prefetch_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_in_flight: 32,
            max_per_host: 8,
            host_rate: 0.0,
            prefetch_bytes: 64 << 20,
        }
    }
}

/// The default User-Agent: doppler and its version.
pub const USER_AGENT: &str = concat!("doppler/", env!("CARGO_PKG_VERSION"));

impl UrlPolicy {
    /// What decides which connections a client may make and reuse: everything but the limits
    /// (and the byte cap, checked per response). Two policies with the same key may share a
    /// connection pool.
    pub(crate) fn client_key(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{}",
            self.allowed_hosts,
            self.allowed_networks,
            self.connect_timeout,
            self.timeout,
            self.max_redirects,
            self.user_agent
        )
    }

    pub(crate) fn ip_allowed(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed_networks.iter().any(|n| n.contains(ip))
    }

    pub(crate) fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.is_empty()
            || self.allowed_hosts.iter().any(|h| {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix('.') {
                    Some(suffix) => host == suffix || host.ends_with(&format!(".{suffix}")),
                    None => host == h,
                }
            })
    }

    /// Scheme, host allowlist and (for address literals) the address rule, for one URL.
    pub(crate) fn check(&self, url: &reqwest::Url) -> std::result::Result<(), String> {
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "the URL scheme {}: is not allowed (only http and https)",
                url.scheme()
            ));
        }
        let host = url.host_str().ok_or("the URL has no host")?;
        if !self.host_allowed(host) {
            return Err(format!(
                "the host {host} is not in doppler.url_allowed_hosts"
            ));
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            if !self.ip_allowed(ip) {
                return Err(format!("the address {ip} is private or reserved"));
            }
        }
        Ok(())
    }
}

/// Whether `s` looks like a URL rather than a path.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}
