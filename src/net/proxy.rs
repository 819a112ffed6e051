//! HTTP proxies for the backend link and for downloads.
//!
//! Sources, highest first: `[link] proxy` / `[link] no_proxy` in the configuration, then
//! the environment: `https_proxy`/`HTTPS_PROXY` for `wss://` and `https://`,
//! `http_proxy`/`HTTP_PROXY` for `ws://` and `http://`, `all_proxy`/`ALL_PROXY` for both
//! when the specific one is unset; `no_proxy`/`NO_PROXY` lists the hosts reached directly.
//! The configured `proxy` is used for every scheme.
//!
//! A proxy is `http://[user:password@]host[:port]` (or bare `host:port`; port 80 when
//! absent). The WebSocket goes through it with `CONNECT host:port` (written here, before
//! the TLS and WebSocket handshakes), with `Proxy-Authorization: Basic` from the
//! user-info. Downloads use [`http_client_builder`], which gives reqwest the same rules.
//!
//! `no_proxy` entries, separated by commas or spaces, case-insensitive: `*` (every host),
//! a domain (`example.com` or `.example.com`: that host and its subdomains), an IP address,
//! or a CIDR block (`10.0.0.0/8`, `fd00::/8`) matched against IP-literal hosts; any entry
//! may end in `:port` to apply to that port only. Names are not resolved for matching.

use std::fmt;
use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One proxy server.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// Basic credentials (percent-decoded).
    pub auth: Option<(String, String)>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `http://[user:***@]host:port`: the password never appears in logs or status.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.auth {
            Some((user, _)) => write!(f, "http://{user}:***@{}", self.authority()),
            None => write!(f, "http://{}", self.authority()),
        }
    }
}

impl ProxyUrl {
    /// Parses `http://[user:password@]host[:port][/]` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let with_scheme = if text.contains("://") { text.to_string() } else { format!("http://{text}") };
        let url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("{text:?} is not a proxy URL ({e})"))?;
        match url.scheme() {
            "http" => {}
            "https" => return Err(format!("{text:?}: TLS to the proxy (https://) is not supported; use http://")),
            other => return Err(format!("{text:?}: proxy scheme {other}:// is not supported; use http://")),
        }
        if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
            return Err(format!("{text:?}: a proxy URL has no path or query"));
        }
        let host = match url.host_str().map(|h| h.trim_matches(|c| c == '[' || c == ']')) {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => return Err(format!("{text:?}: the proxy URL has no host")),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let auth = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            Some((percent_decode(url.username()), percent_decode(url.password().unwrap_or(""))))
        };
        Ok(Self { host, port, auth })
    }

    /// `host:port`, IPv6 in brackets.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The URL with its credentials, for reqwest.
    fn to_url_with_auth(&self) -> String {
        match &self.auth {
            Some((u, p)) => format!("http://{}:{}@{}", percent_encode(u), percent_encode(p), self.authority()),
            None => format!("http://{}", self.authority()),
        }
    }
}

pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Hosts reached without a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    entries: Vec<NoProxyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Domain(String),
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NoProxyEntry {
    pattern: Pattern,
    port: Option<u16>,
}

impl NoProxy {
    pub fn parse(text: &str) -> Self {
        let mut out = NoProxy::default();
        for raw in text.split(|c: char| c == ',' || c.is_whitespace()).map(str::trim).filter(|s| !s.is_empty()) {
            let raw = raw.to_ascii_lowercase();
            if raw == "*" {
                out.all = true;
                continue;
            }
            let (body, port) = split_port(&raw);
            let pattern = if let Some((ip, bits)) = body.split_once('/') {
                match (ip.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>(), bits.parse::<u8>()) {
                    (Ok(ip), Ok(bits)) if bits <= if ip.is_ipv4() { 32 } else { 128 } => Pattern::Net(ip, bits),
                    _ => continue,
                }
            } else if let Ok(ip) = body.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
                Pattern::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
            } else {
                let d = body.trim_start_matches("*.").trim_start_matches('.').trim_end_matches('.');
                if d.is_empty() {
                    continue;
                }
                Pattern::Domain(d.to_string())
            };
            out.entries.push(NoProxyEntry { pattern, port });
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.entries.is_empty()
    }

    /// Whether `host:port` is reached directly.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim_matches(|c| c == '[' || c == ']').trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|e| {
            if e.port.is_some_and(|p| p != port) {
                return false;
            }
            match (&e.pattern, ip) {
                (Pattern::Domain(d), None) => host == *d || host.ends_with(&format!(".{d}")),
                (Pattern::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
                _ => false,
            }
        })
    }
}

/// Splits a trailing `:port` off a no_proxy entry (not off a bare IPv6 address).
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((inside, after)) = rest.split_once(']') {
            return (inside, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits.min(32))) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits.min(128))) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The proxy rules of this agent (for the link and for downloads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    /// For `wss://` and `https://`.
    pub https: Option<ProxyUrl>,
    /// For `ws://` and `http://`.
    pub http: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
    /// Where the proxies came from, for logs: "config", "environment" or "none".
    pub source: &'static str,
}

impl ProxySettings {
    /// The configuration keys, else the process environment. An unusable environment
    /// value is logged and ignored (the configuration keys were checked at load time).
    pub fn from_env(config_proxy: Option<&str>, config_no_proxy: Option<&str>) -> Self {
        let (settings, problems) = Self::resolve(config_proxy, config_no_proxy, |k| std::env::var(k).ok());
        for p in problems {
            tracing::warn!("{p}; ignored");
        }
        settings
    }

    /// [`ProxySettings::from_env`] with the environment as a function (tests).
    pub fn resolve(
        config_proxy: Option<&str>,
        config_no_proxy: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        let first = |names: &[&str]| {
            names.iter().find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (n.to_string(), v)))
        };
        let no_proxy = match config_no_proxy {
            Some(text) => NoProxy::parse(text),
            None => first(&["no_proxy", "NO_PROXY"]).map(|(_, v)| NoProxy::parse(&v)).unwrap_or_default(),
        };
        if let Some(text) = config_proxy {
            return match ProxyUrl::parse(text) {
                Ok(p) => (Self { https: Some(p.clone()), http: Some(p), no_proxy, source: "config" }, problems),
                Err(e) => {
                    problems.push(format!("[link] proxy: {e}"));
                    (Self { no_proxy, source: "none", ..Self::default() }, problems)
                }
            };
        }
        let mut pick = |names: &[&str]| {
            let (name, value) = first(names)?;
            ProxyUrl::parse(&value).map_err(|e| problems.push(format!("environment variable {name}: {e}"))).ok()
        };
        let all = pick(&["all_proxy", "ALL_PROXY"]);
        let https = pick(&["https_proxy", "HTTPS_PROXY"]).or_else(|| all.clone());
        let http = pick(&["http_proxy", "HTTP_PROXY"]).or(all);
        let source = if https.is_some() || http.is_some() { "environment" } else { "none" };
        (Self { https, http, no_proxy, source }, problems)
    }

    /// The proxy for `scheme://host:port`, or `None` for a direct connection.
    pub fn proxy_for(&self, scheme: &str, host: &str, port: u16) -> Option<&ProxyUrl> {
        let p = match scheme {
            "wss" | "https" => self.https.as_ref(),
            "ws" | "http" => self.http.as_ref(),
            _ => None,
        }?;
        (!self.no_proxy.matches(host, port)).then_some(p)
    }

    pub fn is_empty(&self) -> bool {
        self.https.is_none() && self.http.is_none()
    }
}

/// A reqwest client builder that follows the same proxy rules as the link (and ignores
/// reqwest's own reading of the environment, so both always agree).
pub fn http_client_builder(proxy: &ProxySettings) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder().no_proxy();
    if proxy.is_empty() {
        return builder;
    }
    let rules = proxy.clone();
    builder.proxy(reqwest::Proxy::custom(move |url| {
        let host = url.host_str()?.trim_matches(|c| c == '[' || c == ']').to_string();
        let port = url.port_or_known_default()?;
        rules.proxy_for(url.scheme(), &host, port).map(ProxyUrl::to_url_with_auth)
    }))
}

/// Asks the proxy on `stream` for a tunnel to `host:port`. On success the stream carries
/// the tunnel; nothing past the proxy's response header has been read.
pub async fn connect_tunnel<S>(stream: &mut S, proxy: &ProxyUrl, host: &str, port: u16) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = authority(host, port);
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: opsagent/{}\r\nProxy-Connection: Keep-Alive\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some((user, pass)) = &proxy.auth {
        req.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64(format!("{user}:{pass}").as_bytes())));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.map_err(|e| format!("sending CONNECT: {e}"))?;
    stream.flush().await.map_err(|e| format!("sending CONNECT: {e}"))?;
    // Byte by byte: the bytes after the header belong to the TLS/WebSocket handshake.
    const MAX_HEADER: usize = 16 * 1024;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEADER {
            return Err(format!("the proxy's response header exceeds {MAX_HEADER} bytes"));
        }
        match stream.read(&mut byte).await {
            Ok(0) => return Err("the proxy closed the connection before answering CONNECT".to_string()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("reading the proxy's answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    let mut parts = status_line.split_whitespace();
    let (version, code) = (parts.next().unwrap_or(""), parts.next().and_then(|c| c.parse::<u16>().ok()));
    match (version.starts_with("HTTP/1."), code) {
        (true, Some(c)) if (200..300).contains(&c) => Ok(()),
        (true, Some(407)) => Err(format!(
            "proxy authentication required ({status_line}){}",
            if proxy.auth.is_some() {
                ": the credentials were refused"
            } else {
                ": put user:password@ in the proxy URL"
            }
        )),
        (true, Some(_)) => Err(format!("the proxy refused the tunnel: {status_line}")),
        _ => Err(format!("not an HTTP proxy answer: {:?}", status_line.chars().take(80).collect::<String>())),
    }
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyUrl::parse("http://alice:s%3Acret@proxy.corp:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.auth, Some(("alice".into(), "s:cret".into())));
        assert_eq!(p.to_string(), "http://alice:***@proxy.corp:3128");
        assert_eq!(p.to_url_with_auth(), "http://alice:s%3Acret@proxy.corp:3128");
        let p = ProxyUrl::parse("10.0.0.1:8080").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth), ("10.0.0.1", 8080, None));
        assert_eq!(ProxyUrl::parse("http://proxy").unwrap().port, 80);
        assert_eq!(ProxyUrl::parse("http://[::1]:3128").unwrap().authority(), "[::1]:3128");
        assert!(ProxyUrl::parse("socks5://p:1080").unwrap_err().contains("not supported"));
        assert!(ProxyUrl::parse("https://p:443").unwrap_err().contains("not supported"));
        assert!(ProxyUrl::parse("http://p:3128/path").unwrap_err().contains("no path"));
        assert!(ProxyUrl::parse("http://").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let n =
            NoProxy::parse("localhost, .internal.example, example.org:8443 10.0.0.0/8,192.168.1.7,[fd00::1],fe80::/10");
        assert!(n.matches("localhost", 80));
        assert!(n.matches("LOCALHOST.", 80));
        assert!(n.matches("internal.example", 443) && n.matches("a.b.internal.example", 443));
        assert!(!n.matches("notinternal.example", 443));
        assert!(n.matches("example.org", 8443) && !n.matches("example.org", 443));
        assert!(n.matches("10.200.3.4", 1) && !n.matches("11.0.0.1", 1));
        assert!(n.matches("192.168.1.7", 1) && !n.matches("192.168.1.8", 1));
        assert!(n.matches("fd00::1", 1) && n.matches("[fe80::abcd]", 1) && !n.matches("fd00::2", 1));
        assert!(!n.matches("backend.example.com", 443));
        assert!(NoProxy::parse("*").matches("anything", 1));
        assert!(NoProxy::parse("*.corp").matches("x.corp", 1));
        assert!(NoProxy::parse("").is_empty());
    }

    #[test]
    fn environment_and_config_precedence() {
        let (s, problems) = ProxySettings::resolve(
            None,
            None,
            env(&[("https_proxy", "http://p1:3128"), ("HTTP_PROXY", "p2:8080"), ("NO_PROXY", "localhost")]),
        );
        assert!(problems.is_empty());
        assert_eq!(s.source, "environment");
        assert_eq!(s.proxy_for("wss", "b.example", 443).unwrap().host, "p1");
        assert_eq!(s.proxy_for("ws", "b.example", 80).unwrap().host, "p2");
        assert_eq!(s.proxy_for("https", "localhost", 443), None);
        // Lower case wins over upper case; all_proxy fills the gaps.
        let (s, _) = ProxySettings::resolve(
            None,
            None,
            env(&[("https_proxy", "lower:1"), ("HTTPS_PROXY", "upper:1"), ("ALL_PROXY", "all:1")]),
        );
        assert_eq!(s.https.unwrap().host, "lower");
        assert_eq!(s.http.unwrap().host, "all");
        // The config key overrides the environment, for every scheme; so does its no_proxy.
        let (s, _) = ProxySettings::resolve(
            Some("http://cfg:3128"),
            Some("b.example"),
            env(&[("https_proxy", "http://p1:3128"), ("no_proxy", "*")]),
        );
        assert_eq!(s.source, "config");
        assert_eq!(s.proxy_for("ws", "other", 80).unwrap().host, "cfg");
        assert_eq!(s.proxy_for("wss", "b.example", 443), None);
        // Unusable environment values are reported, not fatal.
        let (s, problems) = ProxySettings::resolve(None, None, env(&[("https_proxy", "socks5://x:1")]));
        assert!(s.is_empty() && problems[0].contains("https_proxy"), "{problems:?}");
        let (s, _) = ProxySettings::resolve(None, None, env(&[]));
        assert_eq!((s.is_empty(), s.source), (true, "none"));
    }

    #[test]
    fn base64_and_percent() {
        assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(percent_decode("a%20b%"), "a b%");
        assert_eq!(percent_encode("a b:c"), "a%20b%3Ac");
    }

    #[tokio::test]
    async fn connect_exchange() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let proxy = ProxyUrl::parse("http://u:p@proxy:3128").unwrap();
        let srv = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = server.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            server.write_all(b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nTLS").await.unwrap();
            req
        });
        connect_tunnel(&mut client, &proxy, "b.example", 443).await.unwrap();
        let req = srv.await.unwrap();
        assert!(req.starts_with("CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n"), "{req}");
        assert!(req.contains("Proxy-Authorization: Basic dTpw\r\n"), "{req}");
        // The bytes after the header are left for the next protocol.
        let mut rest = [0u8; 3];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"TLS");

        for (answer, needle) in [
            (&b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"[..], "authentication required"),
            (b"HTTP/1.0 403 Forbidden\r\n\r\n", "refused the tunnel: HTTP/1.0 403 Forbidden"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP proxy answer"),
            (b"HTTP/1.1 200", "closed the connection"),
        ] {
            let (mut client, mut server) = tokio::io::duplex(4096);
            let answer = answer.to_vec();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let _ = server.read(&mut buf).await;
                server.write_all(&answer).await.unwrap();
            });
            let e = connect_tunnel(&mut client, &ProxyUrl::parse("p:1").unwrap(), "h", 1).await.unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
