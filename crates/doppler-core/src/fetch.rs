//! Fetching images over http(s), under a policy: only http and https; a host allowlist; no
//! private, loopback, link-local, multicast, unspecified or otherwise reserved addresses (v4 and
//! v6, mapped forms too) unless a network is explicitly allowed; connect and total timeouts; at
//! most N redirects, each checked again; a byte cap enforced while reading the body.
//!
//! Addresses are checked where they are used: a custom resolver hands the HTTP client only the
//! addresses that pass, so a name that resolves differently the second time (DNS rebinding)
//! cannot reach a refused address. Proxies from the environment are ignored.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// A network in CIDR form, e.g. `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    bits: u8,
}

impl Net {
    pub fn parse(s: &str) -> Option<Net> {
        let (a, b) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = if b.is_empty() { max } else { b.parse().ok()? };
        (bits <= max).then_some(Net { addr, bits })
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
}

impl UrlPolicy {
    fn ip_allowed(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed_networks.iter().any(|n| n.contains(ip))
    }

    fn host_allowed(&self, host: &str) -> bool {
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
    fn check(&self, url: &reqwest::Url) -> std::result::Result<(), String> {
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

struct Resolver(Arc<UrlPolicy>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = (host.as_str(), 0).to_socket_addrs()?.collect();
            let ok: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.ip_allowed(a.ip()))
                .collect();
            if ok.is_empty() {
                let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves only to private or reserved addresses ({})",
                    shown.join(", ")
                )
                .into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Fetches `url` under `policy`.
pub fn fetch(url: &str, policy: &UrlPolicy) -> Result<Vec<u8>> {
    let what = format!("image URL \"{url}\"");
    let refused = |why: String| Error::new(ErrorKind::Refused, format!("{what} refused: {why}"));
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Error::new(ErrorKind::Config, format!("{what} is not a valid URL: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what} uses the unsupported scheme {}: (only http and https)",
                parsed.scheme()
            ),
        ));
    }
    policy.check(&parsed).map_err(refused)?;
    let shared = Arc::new(policy.clone());
    let redirect_policy = shared.clone();
    let max_redirects = policy.max_redirects;
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(Resolver(shared)))
        .connect_timeout(policy.connect_timeout)
        .timeout(policy.timeout)
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(format!("more than {max_redirects} redirects"));
            }
            let target = attempt.url().to_string();
            match redirect_policy.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(format!("redirect to {target} refused: {why}")),
            }
        }))
        .user_agent(concat!("doppler/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("could not build the HTTP client: {e}"),
            )
        })?;
    let resp = client.get(parsed).send().map_err(|e| {
        let msg = chain(&e);
        if msg.contains("refused:")
            || msg.contains("private or reserved")
            || msg.contains("not in doppler.url_allowed_hosts")
        {
            refused(msg)
        } else if e.is_timeout() {
            Error::new(
                ErrorKind::Io,
                format!("{what} timed out after {:?}", policy.timeout),
            )
        } else if e.is_redirect() {
            Error::new(ErrorKind::Io, format!("{what}: {msg}"))
        } else {
            Error::new(ErrorKind::Io, format!("could not fetch {what}: {msg}"))
        }
    })?;
    let status = resp.status();
    if status.is_redirection() {
        // reqwest stops at a redirect it cannot follow (another scheme, a bad Location)
        let to = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .unwrap_or("?")
            .to_string();
        return Err(refused(format!(
            "redirect to {to} not followed (only http and https)"
        )));
    }
    if !status.is_success() {
        let kind =
            if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
        return Err(Error::new(kind, format!("{what} answered HTTP {status}")));
    }
    let too_big = |n: u64| {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "{what} is {n} bytes or more, over the limit of {} bytes",
                policy.max_bytes
            ),
        )
        .with_hint("Raise doppler.max_image_bytes to accept larger images.")
    };
    if let Some(n) = resp.content_length().filter(|&n| n > policy.max_bytes) {
        return Err(too_big(n));
    }
    let mut buf = Vec::new();
    resp.take(policy.max_bytes + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            if e.to_string().contains("timed out") || e.kind() == std::io::ErrorKind::TimedOut {
                Error::new(
                    ErrorKind::Io,
                    format!("{what} timed out after {:?}", policy.timeout),
                )
            } else {
                Error::new(
                    ErrorKind::Io,
                    format!("could not read {what}: {}", chain(&e)),
                )
            }
        })?;
    if buf.len() as u64 > policy.max_bytes {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "::7f00:1",
            "2001:db8::1",
        ] {
            assert!(!is_public(s.parse().unwrap()), "{s} must not be public");
        }
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(s.parse().unwrap()), "{s} is public");
        }
    }

    #[test]
    fn networks() {
        let n = Net::parse("127.0.0.0/8").unwrap();
        assert!(n.contains("127.9.9.9".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("128.0.0.1".parse().unwrap()));
        assert!(Net::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_none());
        assert!(Net::parse("nonsense").is_none());
    }
}
