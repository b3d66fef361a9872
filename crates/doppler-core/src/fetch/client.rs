//! One HTTP client per process and policy, on one small async runtime: connections are kept
//! alive and reused (HTTP/1.1, or HTTP/2 where a TLS server offers it), and one request is
//! [`get`].
//!
//! Addresses are checked where they are used: a custom resolver hands the client only the
//! addresses that pass the policy, so a name that resolves differently the second time (DNS
//! rebinding) cannot reach a refused address; redirects are checked again; proxies from the
//! environment are ignored. A pooled connection is only reused by the client that made it, and
//! a client serves one policy ([`UrlPolicy::client_key`]): a request under a stricter policy gets
//! another client, and never a connection made under a looser one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use super::hosts::{self, Outcome};
use super::policy::UrlPolicy;
use crate::error::{Error, ErrorKind, Result};

/// Clients kept (one per distinct policy seen recently).
const CLIENTS_KEPT: usize = 4;
/// Idle connections are closed after this.
const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The process's fetch runtime: one thread for every request (they wait on the network), more
/// for DNS lookups; made with every signal blocked, so that Postgres signals stay with the
/// backend's own thread. Started on the first fetch, never in the postmaster.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            crate::model::with_signals_blocked(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .max_blocking_threads(8)
                    .thread_name("doppler-fetch")
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
            })
        })
        .as_ref()
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("could not start the fetch runtime: {e}"),
            )
        })
}

/// The client of `policy` (made on first use).
pub fn client(policy: &UrlPolicy) -> Result<reqwest::Client> {
    static CLIENTS: Mutex<Vec<(String, reqwest::Client)>> = Mutex::new(Vec::new());
    let key = policy.client_key();
    let mut clients = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = clients.iter().position(|(k, _)| *k == key) {
        let c = clients.remove(i);
        let client = c.1.clone();
        clients.push(c);
        return Ok(client);
    }
    let client = build(policy)?;
    if clients.len() >= CLIENTS_KEPT {
        clients.remove(0);
    }
    clients.push((key, client.clone()));
    Ok(client)
}

fn build(policy: &UrlPolicy) -> Result<reqwest::Client> {
    let shared = Arc::new(policy.clone());
    let redirect_policy = shared.clone();
    let max_redirects = policy.max_redirects;
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(Resolver(shared)))
        .connect_timeout(policy.connect_timeout)
        .timeout(policy.timeout)
        .pool_idle_timeout(IDLE)
        .pool_max_idle_per_host(policy.limits.max_per_host.max(1))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(format!("more than {max_redirects} redirects"));
            }
            let target = attempt.url().to_string();
            match redirect_policy.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(Refusal(format!("redirect to {target} refused: {why}"))),
            }
        }))
        .user_agent(policy.user_agent.as_str())
        .build()
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("could not build the HTTP client: {e}"),
            )
        })
}

struct Resolver(Arc<UrlPolicy>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.ip_allowed(a.ip()))
                .collect();
            if ok.is_empty() {
                let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                let refusal = Refusal(format!(
                    "{host} resolves only to private or reserved addresses ({})",
                    shown.join(", ")
                ));
                return Err(Box::new(refusal) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The policy's refusal of an address or a redirect, inside reqwest's errors: found by its type
/// (a URL's own text cannot pass for one).
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Whether `e`, or an error it came from, is the policy's [`Refusal`].
fn is_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<Refusal>() {
            return true;
        }
        cur = c.source();
    }
    false
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
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

/// What one request gave: the body or the error, and what it says about the host.
pub struct Got {
    pub body: Result<Vec<u8>>,
    pub host: Outcome,
    pub took: std::time::Duration,
}

/// GETs `url` (already checked against the policy) with `client`, reading at most
/// `policy.max_bytes` of the body. What it says about the host is only about `url`'s own host: a
/// redirect's target that fails or asks to wait is not charged to the host that redirected.
pub async fn get(client: &reqwest::Client, url: reqwest::Url, policy: &UrlPolicy) -> Got {
    let t0 = Instant::now();
    let host = super::authority(&url);
    let (body, outcome) = match send(client, url.clone(), policy).await {
        Ok(resp) => {
            let ours = super::authority(resp.url()) == host;
            let (body, outcome) = read(resp, url.as_str(), policy).await;
            (body, if ours { outcome } else { Outcome::Answered })
        }
        Err((e, outcome, at)) => {
            let ours = at.is_none_or(|u| super::authority(&u) == host);
            (Err(e), if ours { outcome } else { Outcome::Answered })
        }
    };
    Got {
        body,
        host: outcome,
        took: t0.elapsed(),
    }
}

fn what(url: &str) -> String {
    format!("image URL \"{url}\"")
}

pub(crate) fn refused(url: &str, why: String) -> Error {
    Error::new(ErrorKind::Refused, format!("{} refused: {why}", what(url)))
}

/// Sends the request; an error comes with what it says about the host, and the URL it was
/// about (a redirect's target, maybe).
async fn send(
    client: &reqwest::Client,
    url: reqwest::Url,
    policy: &UrlPolicy,
) -> std::result::Result<reqwest::Response, (Error, Outcome, Option<reqwest::Url>)> {
    let shown = url.to_string();
    let what = what(&shown);
    client.get(url).send().await.map_err(|e| {
        let at = e.url().cloned();
        let (e, outcome) = classify(&e, &shown, &what, policy);
        (e, outcome, at)
    })
}

/// An error of a request without an answer: a refusal by the policy (nothing learnt about the
/// host), a timeout or a failed connection (the host did not answer), or another failure.
fn classify(e: &reqwest::Error, shown: &str, what: &str, policy: &UrlPolicy) -> (Error, Outcome) {
    {
        let msg = chain(e);
        if is_refusal(e) {
            (refused(shown, msg), Outcome::Neither)
        } else if e.is_timeout() {
            let m = format!("{what} timed out after {:?}", policy.timeout);
            (Error::new(ErrorKind::Io, m), Outcome::Unreachable)
        } else if e.is_redirect() {
            (
                Error::new(ErrorKind::Io, format!("{what}: {msg}")),
                Outcome::Answered,
            )
        } else {
            let host = if e.is_connect() {
                Outcome::Unreachable
            } else {
                Outcome::Neither
            };
            let m = format!("could not fetch {what}: {msg}");
            (Error::new(ErrorKind::Io, m), host)
        }
    }
}

async fn read(
    mut resp: reqwest::Response,
    url: &str,
    policy: &UrlPolicy,
) -> (Result<Vec<u8>>, Outcome) {
    let what = what(url);
    let status = resp.status();
    if status.is_redirection() {
        // reqwest stops at a redirect it cannot follow (another scheme, a bad Location)
        let to = header(&resp, "location").unwrap_or("?").to_string();
        let why = format!("redirect to {to} not followed (only http and https)");
        return (Err(refused(url, why)), Outcome::Answered);
    }
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
    {
        if let Some(at) = hosts::retry_after(header(&resp, "retry-after"), SystemTime::now()) {
            let secs = at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs_f64();
            let e = Error::new(
                ErrorKind::RetryLater,
                format!("{what} answered HTTP {status}: asked to wait {secs:.0} s (Retry-After)"),
            );
            return (Err(e.retry_at(at)), Outcome::AskedToWait(at));
        }
    }
    if !status.is_success() {
        let kind =
            if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
        return (
            Err(Error::new(kind, format!("{what} answered HTTP {status}"))),
            Outcome::Answered,
        );
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
        return (Err(too_big(n)), Outcome::Answered);
    }
    // (not more than a megabyte ahead of the bytes that came: a Content-Length is a claim)
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(0).min(1 << 20) as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if (buf.len() + chunk.len()) as u64 > policy.max_bytes {
                    return (
                        Err(too_big((buf.len() + chunk.len()) as u64)),
                        Outcome::Answered,
                    );
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return (Ok(buf), Outcome::Answered),
            Err(e) if e.is_timeout() => {
                // (the host answered, slowly: not a host that does not answer)
                let m = format!("{what} timed out after {:?}", policy.timeout);
                return (Err(Error::new(ErrorKind::Io, m)), Outcome::Answered);
            }
            Err(e) => {
                let m = format!("could not read {what}: {}", chain(&e));
                return (Err(Error::new(ErrorKind::Io, m)), Outcome::Neither);
            }
        }
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}
