//! The connection: a libpq connection string (`key=value ...` or a `postgres[ql]://` URL), the
//! usual `PG*` environment variables for what it leaves out, and libpq's defaults, turned into a
//! `postgres::Config` and an OpenSSL connector.
//!
//! The `postgres` crate parses connection strings too, but it knows only sslmode disable, prefer
//! and require, no environment variables and no root certificates; so the worker reads the
//! string itself, with libpq's rules, and builds the TLS side to libpq's semantics: `require`
//! encrypts without verifying (unless a root certificate file is there: then it verifies the
//! chain, as libpq does), `verify-ca` verifies the chain, `verify-full` the chain and the host
//! name, against `sslrootcert` (a file, or `system` for the system's roots; by default
//! `~/.postgresql/root.crt` when it exists, else the system's roots).

use std::net::IpAddr;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use postgres::config::{
    ChannelBinding, LoadBalanceHosts, SslMode as PgSslMode, SslNegotiation, TargetSessionAttrs,
};
use postgres_openssl::MakeTlsConnector;

/// The Unix socket folder tried when no host is given (Debian's and the PGDG packages').
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
pub const DEFAULT_APPLICATION_NAME: &str = "doppler-worker";
/// How long one connection attempt may take when the connection string does not say: a worker
/// retries, so a host that does not answer should not hold it for the kernel's minutes.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalives, so a server host that vanishes is noticed in about a minute, not two hours.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_KEEPALIVES_COUNT: u32 = 3;

/// The connection string keywords the worker understands (libpq's names).
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "options",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslnegotiation",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Environment variables for keywords the connection string leaves out (libpq's).
const ENV: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("options", "PGOPTIONS"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("channel_binding", "PGCHANNELBINDING"),
];

/// libpq's sslmode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries without TLS first; the `postgres` crate cannot, so this is `prefer`.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("invalid sslmode \"{other}\" (disable, allow, prefer, require, verify-ca or verify-full)")),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Which certificates a verified connection trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    File(String),
    /// The system's roots (OpenSSL's default paths).
    System,
}

/// How much of the server's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Encrypted, nothing checked.
    Nothing,
    /// The chain, against these roots.
    Chain(Roots),
    /// The chain and the host name.
    Full(Roots),
}

/// Everything the worker connects with, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Host names, IP addresses or Unix socket folders (starting with `/`).
    pub hosts: Vec<String>,
    pub hostaddrs: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub options: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// As given (after libpq's upgrade of `require` to `verify-ca` when a root file is there).
    pub sslmode: SslMode,
    pub verify: Verify,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub ssl_negotiation: SslNegotiation,
    pub keepalives: bool,
    pub keepalives_idle: Duration,
    pub keepalives_interval: Duration,
    pub keepalives_count: u32,
    pub tcp_user_timeout: Option<Duration>,
    pub target_session_attrs: TargetSessionAttrs,
    pub channel_binding: ChannelBinding,
    pub load_balance_hosts: LoadBalanceHosts,
}

/// What `resolve` may look at besides the string: environment variables and whether a path
/// exists (the socket folder, root certificate files).
pub struct Env<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    pub exists: &'a dyn Fn(&str) -> bool,
    /// The OS user, when `$USER` is not set (libpq's default user).
    pub os_user: &'a dyn Fn() -> Option<String>,
}

/// Parses a connection string into its keywords and values, in either form.
pub fn parse(conninfo: &str) -> Result<Vec<(String, String)>, String> {
    let s = conninfo.trim();
    let pairs = if let Some(rest) = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
    {
        parse_url(rest)?
    } else {
        parse_keywords(s)?
    };
    for (k, _) in &pairs {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!("invalid connection option \"{k}\""));
        }
    }
    Ok(pairs)
}

/// `key=value key2='quoted \' value'` (libpq's rules: spaces around `=`, single quotes,
/// backslash escapes).
fn parse_keywords(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after \"{key}\" in the connection string"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unterminated quoted value of \"{key}\" in the connection string"
                        ))
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(format!(
                                "unterminated quoted value of \"{key}\" in the connection string"
                            ))
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

/// The part of a URL after `postgresql://`: `[user[:password]@][host[:port][,...]][/dbname][?k=v&...]`.
fn parse_url(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let (main, query) = match s.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (s, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let netloc = match authority.split_once('@') {
        Some((userinfo, netloc)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".into(), decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".into(), decode(p)?));
            }
            netloc
        }
        None => authority,
    };
    if !netloc.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for item in netloc.split(',') {
            let (host, port) = if let Some(v6) = item.strip_prefix('[') {
                let Some((addr, after)) = v6.split_once(']') else {
                    return Err(format!("unterminated IPv6 address in the URL \"{item}\""));
                };
                let port = match after {
                    "" => "",
                    p => p.strip_prefix(':').ok_or_else(|| {
                        format!("unexpected \"{p}\" after the IPv6 address in the URL")
                    })?,
                };
                (addr.to_string(), port)
            } else {
                match item.rsplit_once(':') {
                    Some((h, p)) => (decode(h)?, p),
                    None => (decode(item)?, ""),
                }
            };
            hosts.push(host);
            ports.push(decode(port)?);
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), decode(db)?));
    }
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let Some((k, v)) = param.split_once('=') else {
            return Err(format!("missing \"=\" in the URL parameter \"{param}\""));
        };
        let (k, v) = (decode(k)?, decode(v)?);
        // (JDBC's ssl=true, which libpq accepts too)
        if k == "ssl" && v == "true" {
            out.push(("sslmode".into(), "require".into()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Percent-decoding (a `+` stays a `+`, as in libpq).
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoded token in the URL \"{s}\""))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL part \"{s}\" is not UTF-8"))
}

/// The connection string, the environment and the defaults, resolved (conninfo wins over the
/// environment, the environment over the defaults).
pub fn resolve(conninfo: &str, env: &Env) -> Result<Target, String> {
    let given = parse(conninfo)?;
    let get = |key: &str| -> Option<String> {
        // (a keyword given twice: the last one, as libpq)
        let v = given
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone());
        v.or_else(|| {
            ENV.iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, var)| (env.var)(var))
        })
        .filter(|v| !v.is_empty())
    };
    let default_host = || {
        if (env.exists)(DEFAULT_SOCKET_DIR) {
            DEFAULT_SOCKET_DIR.to_string()
        } else {
            "localhost".to_string()
        }
    };
    let hostaddrs: Vec<IpAddr> = match get("hostaddr") {
        Some(list) => list
            .split(',')
            .map(|a| {
                a.trim()
                    .parse()
                    .map_err(|_| format!("invalid hostaddr \"{a}\""))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let hosts: Vec<String> = match get("host") {
        Some(list) => list
            .split(',')
            .map(|h| match h.trim() {
                "" => default_host(),
                h => h.to_string(),
            })
            .collect(),
        None if hostaddrs.is_empty() => vec![default_host()],
        None => Vec::new(),
    };
    if !hostaddrs.is_empty() && !hosts.is_empty() && hostaddrs.len() != hosts.len() {
        return Err(format!(
            "could not match {} host names to {} hostaddr values",
            hosts.len(),
            hostaddrs.len()
        ));
    }
    let ports: Vec<u16> = match get("port") {
        Some(list) => list
            .split(',')
            .map(|p| match p.trim() {
                "" => Ok(5432),
                p => p
                    .parse::<u16>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("invalid port number \"{p}\"")),
            })
            .collect::<Result<_, _>>()?,
        None => vec![5432],
    };
    let nhosts = hosts.len().max(hostaddrs.len());
    if ports.len() != 1 && ports.len() != nhosts {
        return Err(format!(
            "could not match {} port numbers to {nhosts} hosts",
            ports.len()
        ));
    }
    let user = get("user")
        .or_else(|| (env.var)("USER").filter(|u| !u.is_empty()))
        .or_else(|| (env.os_user)())
        .ok_or("no user name: give user= in the connection string, or set PGUSER")?;
    let dbname = get("dbname").unwrap_or_else(|| user.clone());
    let application_name = get("application_name")
        .or_else(|| get("fallback_application_name"))
        .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.into());
    let seconds = |key: &str| -> Result<Option<Duration>, String> {
        match get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(|n| Some(Duration::from_secs(n)))
                .map_err(|_| format!("invalid {key} \"{v}\"")),
        }
    };
    // libpq: 0 waits forever; below 2 seconds means 2
    let connect_timeout = match seconds("connect_timeout")? {
        None => Some(DEFAULT_CONNECT_TIMEOUT),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d.max(Duration::from_secs(2))),
    };
    let mut sslmode = SslMode::parse(&get("sslmode").unwrap_or_else(|| "prefer".into()))?;
    let rootcert = get("sslrootcert");
    let default_root = (env.var)("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| format!("{}/.postgresql/root.crt", h.trim_end_matches('/')))
        .filter(|p| (env.exists)(p));
    let root_file = match rootcert.as_deref() {
        Some("system") => None,
        Some(f) => (env.exists)(f).then(|| f.to_string()),
        None => default_root,
    };
    // libpq: with a root certificate file there, require verifies the chain (as verify-ca)
    if sslmode == SslMode::Require && root_file.is_some() {
        sslmode = SslMode::VerifyCa;
    }
    let roots = || -> Result<Roots, String> {
        match (rootcert.as_deref(), &root_file) {
            (Some("system"), _) => Ok(Roots::System),
            (_, Some(f)) => Ok(Roots::File(f.clone())),
            (Some(f), None) => Err(format!(
                "root certificate file \"{f}\" does not exist (sslrootcert, sslmode={})",
                sslmode.as_str()
            )),
            (None, None) => Ok(Roots::System),
        }
    };
    let verify = match sslmode {
        SslMode::VerifyCa => Verify::Chain(roots()?),
        SslMode::VerifyFull => Verify::Full(roots()?),
        _ => Verify::Nothing,
    };
    let (sslcert, sslkey) = (get("sslcert"), get("sslkey"));
    if sslcert.is_some() != sslkey.is_some() {
        return Err("sslcert and sslkey go together: give both or neither".into());
    }
    let keepalives = match get("keepalives").as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(v) => return Err(format!("invalid keepalives \"{v}\" (0 or 1)")),
    };
    let keepalives_count = match get("keepalives_count") {
        None => DEFAULT_KEEPALIVES_COUNT,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("invalid keepalives_count \"{v}\""))?,
    };
    Ok(Target {
        hosts,
        hostaddrs,
        ports,
        password: get("password"),
        dbname,
        application_name,
        options: get("options"),
        connect_timeout,
        sslmode,
        verify,
        sslcert,
        sslkey,
        ssl_negotiation: match get("sslnegotiation").as_deref() {
            None | Some("postgres") => SslNegotiation::Postgres,
            Some("direct") => SslNegotiation::Direct,
            Some(v) => {
                return Err(format!(
                    "invalid sslnegotiation \"{v}\" (postgres or direct)"
                ))
            }
        },
        keepalives,
        keepalives_idle: seconds("keepalives_idle")?.unwrap_or(DEFAULT_KEEPALIVES_IDLE),
        keepalives_interval: seconds("keepalives_interval")?.unwrap_or(DEFAULT_KEEPALIVES_INTERVAL),
        keepalives_count,
        tcp_user_timeout: match get("tcp_user_timeout") {
            None => None,
            Some(v) => Some(Duration::from_millis(
                v.trim()
                    .parse()
                    .map_err(|_| format!("invalid tcp_user_timeout \"{v}\""))?,
            )),
        },
        target_session_attrs: match get("target_session_attrs").as_deref() {
            None | Some("any") => TargetSessionAttrs::Any,
            Some("read-write") => TargetSessionAttrs::ReadWrite,
            Some("read-only") => TargetSessionAttrs::ReadOnly,
            Some(v) => {
                return Err(format!(
                    "invalid target_session_attrs \"{v}\" (any, read-write or read-only)"
                ))
            }
        },
        channel_binding: match get("channel_binding").as_deref() {
            None | Some("prefer") => ChannelBinding::Prefer,
            Some("disable") => ChannelBinding::Disable,
            Some("require") => ChannelBinding::Require,
            Some(v) => {
                return Err(format!(
                    "invalid channel_binding \"{v}\" (disable, prefer or require)"
                ))
            }
        },
        load_balance_hosts: match get("load_balance_hosts").as_deref() {
            None | Some("disable") => LoadBalanceHosts::Disable,
            Some("random") => LoadBalanceHosts::Random,
            Some(v) => {
                return Err(format!(
                    "invalid load_balance_hosts \"{v}\" (disable or random)"
                ))
            }
        },
        user,
    })
}

impl Target {
    /// Whether every host is a Unix socket: libpq uses no TLS there (the server offers none), so
    /// the sslmode does not apply.
    fn only_sockets(&self) -> bool {
        self.hostaddrs.is_empty() && self.hosts.iter().all(|h| h.starts_with('/'))
    }

    /// The `postgres` crate's configuration (its sslmode: whether to ask for TLS and insist).
    pub fn config(&self) -> postgres::Config {
        let mut c = postgres::Config::new();
        for h in &self.hosts {
            c.host(h);
        }
        for a in &self.hostaddrs {
            c.hostaddr(*a);
        }
        for p in &self.ports {
            c.port(*p);
        }
        c.user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .keepalives(self.keepalives)
            .keepalives_idle(self.keepalives_idle)
            .keepalives_interval(self.keepalives_interval)
            .keepalives_retries(self.keepalives_count)
            .target_session_attrs(self.target_session_attrs)
            .channel_binding(self.channel_binding)
            .load_balance_hosts(self.load_balance_hosts)
            .ssl_negotiation(self.ssl_negotiation);
        if let Some(p) = &self.password {
            c.password(p);
        }
        if let Some(o) = &self.options {
            c.options(o);
        }
        if let Some(t) = self.connect_timeout {
            c.connect_timeout(t);
        }
        if let Some(t) = self.tcp_user_timeout {
            c.tcp_user_timeout(t);
        }
        c.ssl_mode(match self.sslmode {
            _ if self.only_sockets() => PgSslMode::Disable,
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        c
    }

    /// The TLS connector for the sslmode: nothing verified, the chain, or the chain and the
    /// host name; TLS 1.2 at least (libpq's default); the client certificate when given.
    pub fn connector(&self) -> Result<MakeTlsConnector, String> {
        let ssl = |e: openssl::error::ErrorStack| format!("TLS setup failed: {e}");
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(ssl)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl)?;
        let roots = match &self.verify {
            Verify::Nothing => {
                b.set_verify(SslVerifyMode::NONE);
                None
            }
            Verify::Chain(r) | Verify::Full(r) => {
                b.set_verify(SslVerifyMode::PEER);
                Some(r)
            }
        };
        match roots {
            Some(Roots::File(f)) => b
                .set_ca_file(f)
                .map_err(|e| format!("cannot read root certificate file \"{f}\": {e}"))?,
            Some(Roots::System) => b.set_default_verify_paths().map_err(ssl)?,
            None => {}
        }
        if let (Some(cert), Some(key)) = (&self.sslcert, &self.sslkey) {
            b.set_certificate_chain_file(cert)
                .map_err(|e| format!("cannot read client certificate \"{cert}\": {e}"))?;
            b.set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| format!("cannot read client key \"{key}\": {e}"))?;
            b.check_private_key()
                .map_err(|e| format!("client key \"{key}\" does not match \"{cert}\": {e}"))?;
        }
        let mut c = MakeTlsConnector::new(b.build());
        let check_name = matches!(self.verify, Verify::Full(_));
        c.set_callback(move |cfg, _host| {
            cfg.set_verify_hostname(check_name);
            Ok(())
        });
        Ok(c)
    }

    /// The target for log lines: hosts, ports, database, user, sslmode (never the password).
    pub fn describe(&self) -> String {
        let hosts = if self.hosts.is_empty() {
            self.hostaddrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            self.hosts.join(",")
        };
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        format!(
            "host={hosts} port={} dbname={} user={} sslmode={}",
            ports.join(","),
            self.dbname,
            self.user,
            self.sslmode.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(
        conninfo: &str,
        vars: &[(&str, &str)],
        files: &[&str],
    ) -> Result<Target, String> {
        let var = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let exists = |p: &str| files.contains(&p);
        let os_user = || Some("osuser".to_string());
        resolve(
            conninfo,
            &Env {
                var: &var,
                exists: &exists,
                os_user: &os_user,
            },
        )
    }

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse(s).unwrap()
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keyword_form() {
        assert_eq!(
            pairs("host=db  port = 5433 dbname='my db' password='it\\'s' user=a\\ b"),
            kv(&[
                ("host", "db"),
                ("port", "5433"),
                ("dbname", "my db"),
                ("password", "it's"),
                ("user", "a b"),
            ])
        );
        assert_eq!(pairs("  "), kv(&[]));
        assert_eq!(
            pairs("options='-c search_path=x'"),
            kv(&[("options", "-c search_path=x")])
        );
        assert!(parse("host").is_err());
        assert!(parse("host=db password='open").is_err());
        assert!(parse("mydb").is_err());
        assert!(parse("hots=db").unwrap_err().contains("hots"));
    }

    #[test]
    fn url_form() {
        assert_eq!(
            pairs("postgresql://w:p%40ss@db.example:5433/app?sslmode=verify-full&application_name=gpu"),
            kv(&[
                ("user", "w"),
                ("password", "p@ss"),
                ("host", "db.example"),
                ("port", "5433"),
                ("dbname", "app"),
                ("sslmode", "verify-full"),
                ("application_name", "gpu"),
            ])
        );
        assert_eq!(
            pairs("postgres://[::1]:6000,h2/db"),
            kv(&[("host", "::1,h2"), ("port", "6000,"), ("dbname", "db")])
        );
        assert_eq!(
            pairs("postgresql://%2Fvar%2Frun%2Fpostgresql/db"),
            kv(&[("host", "/var/run/postgresql"), ("dbname", "db")])
        );
        assert_eq!(
            pairs("postgresql:///db?host=/tmp&port=5999"),
            kv(&[("dbname", "db"), ("host", "/tmp"), ("port", "5999")])
        );
        assert_eq!(pairs("postgresql://"), kv(&[]));
        assert_eq!(
            pairs("postgresql://h?ssl=true"),
            kv(&[("host", "h"), ("sslmode", "require")])
        );
        assert!(parse("postgresql://h/db?sslmode").is_err());
        assert!(parse("postgresql://h/db%zz").is_err());
        assert!(parse("postgresql://[::1/db").is_err());
        assert!(parse("postgresql://h/db?nonsense=1").is_err());
    }

    #[test]
    fn defaults_and_environment() {
        let t = resolve_with("", &[("USER", "alice")], &[]).unwrap();
        assert_eq!(t.hosts, ["localhost"]);
        assert_eq!(t.ports, [5432]);
        assert_eq!((t.user.as_str(), t.dbname.as_str()), ("alice", "alice"));
        assert_eq!(t.application_name, "doppler-worker");
        assert_eq!(t.sslmode, SslMode::Prefer);
        assert_eq!(t.verify, Verify::Nothing);
        assert_eq!(t.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(t.password, None);

        // the socket folder when it exists; the OS user without $USER
        let t = resolve_with("", &[], &[DEFAULT_SOCKET_DIR]).unwrap();
        assert_eq!(t.hosts, [DEFAULT_SOCKET_DIR]);
        assert_eq!(t.user, "osuser");

        let env = [
            ("PGHOST", "envhost"),
            ("PGPORT", "6543"),
            ("PGUSER", "bob"),
            ("PGPASSWORD", "secret"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "0"),
            ("USER", "alice"),
        ];
        let t = resolve_with("", &env, &[DEFAULT_SOCKET_DIR]).unwrap();
        assert_eq!(t.hosts, ["envhost"]);
        assert_eq!(t.ports, [6543]);
        assert_eq!(t.user, "bob");
        assert_eq!(t.password.as_deref(), Some("secret"));
        assert_eq!(t.dbname, "envdb");
        assert_eq!(t.sslmode, SslMode::Require);
        assert_eq!(t.application_name, "envapp");
        assert_eq!(t.connect_timeout, None);

        // the connection string wins, in either form
        for conninfo in [
            "host=h port=1 user=u dbname=d sslmode=disable application_name=a connect_timeout=1",
            "postgresql://u@h:1/d?sslmode=disable&application_name=a&connect_timeout=1",
        ] {
            let t = resolve_with(conninfo, &env, &[]).unwrap();
            assert_eq!(t.hosts, ["h"]);
            assert_eq!(t.ports, [1]);
            assert_eq!((t.user.as_str(), t.dbname.as_str()), ("u", "d"));
            assert_eq!(t.password.as_deref(), Some("secret"));
            assert_eq!(t.sslmode, SslMode::Disable);
            assert_eq!(t.application_name, "a");
            assert_eq!(t.connect_timeout, Some(Duration::from_secs(2)));
        }
        // an empty value falls back
        let t = resolve_with("host='' user=u", &[], &[]).unwrap();
        assert_eq!(t.hosts, ["localhost"]);
        // fallback_application_name only when nothing else names the application
        let t = resolve_with("user=u fallback_application_name=fb", &[], &[]).unwrap();
        assert_eq!(t.application_name, "fb");
    }

    #[test]
    fn several_hosts() {
        let t = resolve_with("host=a,b,/sock port=1,,3 user=u", &[], &[]).unwrap();
        assert_eq!(t.hosts, ["a", "b", "/sock"]);
        assert_eq!(t.ports, [1, 5432, 3]);
        assert!(resolve_with("host=a,b port=1,2,3 user=u", &[], &[]).is_err());
        let t = resolve_with("hostaddr=10.0.0.1 user=u", &[], &[]).unwrap();
        assert!(t.hosts.is_empty());
        assert_eq!(t.hostaddrs, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(resolve_with("hostaddr=db user=u", &[], &[]).is_err());
        assert!(resolve_with("port=0 user=u", &[], &[]).is_err());
        assert!(resolve_with("port=99999 user=u", &[], &[]).is_err());
    }

    #[test]
    fn sslmodes() {
        let mode = |conninfo: &str, vars: &[(&str, &str)], files: &[&str]| {
            let t = resolve_with(conninfo, vars, files).unwrap();
            (t.sslmode, t.verify.clone(), t.config().get_ssl_mode())
        };
        let u = "user=u host=db ";
        assert_eq!(
            mode(&format!("{u}sslmode=disable"), &[], &[]),
            (SslMode::Disable, Verify::Nothing, PgSslMode::Disable)
        );
        assert_eq!(
            mode(&format!("{u}sslmode=allow"), &[], &[]),
            (SslMode::Allow, Verify::Nothing, PgSslMode::Prefer)
        );
        assert_eq!(
            mode(u, &[], &[]),
            (SslMode::Prefer, Verify::Nothing, PgSslMode::Prefer)
        );
        assert_eq!(
            mode(&format!("{u}sslmode=require"), &[], &[]),
            (SslMode::Require, Verify::Nothing, PgSslMode::Require)
        );
        // libpq: require with a root certificate file verifies the chain
        assert_eq!(
            mode(
                &format!("{u}sslmode=require sslrootcert=/ca.pem"),
                &[],
                &["/ca.pem"]
            ),
            (
                SslMode::VerifyCa,
                Verify::Chain(Roots::File("/ca.pem".into())),
                PgSslMode::Require
            )
        );
        assert_eq!(
            mode(
                &format!("{u}sslmode=require"),
                &[("HOME", "/home/w/")],
                &["/home/w/.postgresql/root.crt"]
            ),
            (
                SslMode::VerifyCa,
                Verify::Chain(Roots::File("/home/w/.postgresql/root.crt".into())),
                PgSslMode::Require
            )
        );
        assert_eq!(
            mode(&format!("{u}sslmode=verify-ca"), &[], &[]),
            (
                SslMode::VerifyCa,
                Verify::Chain(Roots::System),
                PgSslMode::Require
            )
        );
        assert_eq!(
            mode(
                "postgresql://u@db/?sslmode=verify-full&sslrootcert=system",
                &[],
                &[]
            ),
            (
                SslMode::VerifyFull,
                Verify::Full(Roots::System),
                PgSslMode::Require
            )
        );
        assert_eq!(
            mode(
                u,
                &[
                    ("PGSSLMODE", "verify-full"),
                    ("PGSSLROOTCERT", "/etc/ca.pem")
                ],
                &["/etc/ca.pem"]
            ),
            (
                SslMode::VerifyFull,
                Verify::Full(Roots::File("/etc/ca.pem".into())),
                PgSslMode::Require
            )
        );
        // a named root file that is not there
        assert!(resolve_with(
            &format!("{u}sslmode=verify-full sslrootcert=/nope"),
            &[],
            &[]
        )
        .unwrap_err()
        .contains("/nope"));
        assert!(resolve_with(&format!("{u}sslmode=verify"), &[], &[]).is_err());
        // no TLS over Unix sockets, whatever the mode (as libpq)
        let t = resolve_with("user=u host=/run/pg sslmode=require", &[], &[]).unwrap();
        assert_eq!(t.config().get_ssl_mode(), PgSslMode::Disable);
        assert!(resolve_with(&format!("{u}sslcert=/c.pem"), &[], &[]).is_err());
    }

    #[test]
    fn config_and_connector() {
        let t = resolve_with(
            "postgresql://u:pw@h1:5000,h2:5001/d?options=-c%20x%3D1&keepalives_idle=5",
            &[],
            &[],
        )
        .unwrap();
        let c = t.config();
        assert_eq!(c.get_ports(), [5000, 5001]);
        assert_eq!(c.get_user(), Some("u"));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_dbname(), Some("d"));
        assert_eq!(c.get_options(), Some("-c x=1"));
        assert_eq!(c.get_application_name(), Some("doppler-worker"));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(c.get_hosts().len(), 2);
        assert!(t.connector().is_ok());
        let d = t.describe();
        assert!(d.contains("host=h1,h2") && d.contains("port=5000,5001") && !d.contains("pw"));
        let t = resolve_with("user=u host=db sslmode=verify-full", &[], &[]).unwrap();
        assert!(t.connector().is_ok());
    }
}
