//! Fetching images over http(s): the policy (what may be fetched, [`policy`]), the process's
//! client and its connections ([`client`]), politeness towards hosts ([`hosts`]), and the
//! fetches a process has asked for, waiting to be taken ([`pool`]).

pub mod client;
pub mod hosts;
pub mod policy;
pub mod pool;

use std::time::Duration;

pub use policy::{is_public, is_url, FetchLimits, Net, UrlPolicy, USER_AGENT};
pub use pool::{Fetches, Pins, Taken, Want};

use crate::error::{Error, ErrorKind, Result};

/// `url` parsed and checked against `policy` before any request: a valid URL, http or https, a
/// host the allowlist has, not a refused address literal.
pub fn checked(url: &str, policy: &UrlPolicy) -> Result<reqwest::Url> {
    let what = format!("image URL \"{url}\"");
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
    policy
        .check(&parsed)
        .map_err(|why| client::refused(url, why))?;
    Ok(parsed)
}

/// The host a request goes to, for politeness: the name (lowercase, without a final dot) and the
/// port; another port of the same name is another server.
pub(crate) fn authority(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default().trim_end_matches('.');
    match url.port_or_known_default() {
        Some(port) => format!("{}:{port}", host.to_ascii_lowercase()),
        None => host.to_ascii_lowercase(),
    }
}

/// Fetches `url` under `policy` and waits for it (the process's client and connections).
pub fn fetch(url: &str, policy: &UrlPolicy) -> Result<Vec<u8>> {
    fetch_polled(url, policy, Duration::from_millis(50), || {})
}

/// [`fetch`], calling `poll` every `every` while it waits (a backend checks for a cancel there).
pub fn fetch_polled(
    url: &str,
    policy: &UrlPolicy,
    every: Duration,
    poll: impl FnMut(),
) -> Result<Vec<u8>> {
    checked(url, policy)?;
    Fetches::get().fetch_polled(url, policy, every, poll)
}

#[cfg(test)]
mod tests {
    use super::policy::*;

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
