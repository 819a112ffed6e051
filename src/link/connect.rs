//! Opening one WebSocket session, stage by stage, each with its own timeout and error:
//! resolve (again on every attempt, so a backend that moved is found), TCP, the proxy's
//! CONNECT tunnel, TLS, the WebSocket upgrade.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{tls, LinkConfig, LinkError};
use crate::net::proxy::{self, ProxyUrl};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Name resolution, swappable in tests (e.g. to point a name at another port).
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (getaddrinfo, through tokio's blocking pool). Nothing is cached
/// here: every attempt asks again.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// The backend URL, split once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub scheme: String,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, LinkError> {
        let u = reqwest::Url::parse(url).map_err(|e| LinkError::Url(format!("{url:?}: {e}")))?;
        let scheme = u.scheme().to_string();
        if scheme != "ws" && scheme != "wss" {
            return Err(LinkError::Url(format!("{url:?}: the scheme must be ws:// or wss://")));
        }
        let host = u.host_str().unwrap_or("").trim_matches(|c| c == '[' || c == ']').to_string();
        if host.is_empty() {
            return Err(LinkError::Url(format!("{url:?} has no host")));
        }
        let port = u.port_or_known_default().unwrap_or(if scheme == "wss" { 443 } else { 80 });
        Ok(Self { url: url.to_string(), scheme, host, port })
    }

    pub fn tls(&self) -> bool {
        self.scheme == "wss"
    }
}

/// Everything needed to open a session; built once per link.
pub struct Connector {
    pub target: Target,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub resolver: Arc<dyn Resolver>,
    pub ws_config: WebSocketConfig,
    /// Why the link is not authenticated, when the configuration allows that.
    pub insecure: Option<String>,
}

/// What was reached, for logs and status.
#[derive(Debug, Clone)]
pub struct Opened {
    pub peer: SocketAddr,
    pub via: Option<ProxyUrl>,
}

impl Connector {
    pub fn new(cfg: &LinkConfig, resolver: Arc<dyn Resolver>) -> Result<Self, LinkError> {
        let target = Target::parse(&cfg.ws_uri)?;
        let via_proxy = cfg.proxy.proxy_for(&target.scheme, &target.host, target.port).is_some();
        let insecure = super::transport::check(&target, cfg.tls_insecure, via_proxy, cfg.allow_insecure_transport)?;
        let tls = if target.tls() {
            tls::server_name(&target.host)?;
            Some(Arc::new(tls::client_config(cfg.ca_file.as_deref(), cfg.tls_insecure)?))
        } else {
            None
        };
        let ws_config =
            WebSocketConfig::default().max_message_size(Some(cfg.max_frame)).max_frame_size(Some(cfg.max_frame));
        Ok(Self { target, tls, resolver, ws_config, insecure })
    }

    /// One attempt: resolve, connect, tunnel, TLS, upgrade. Every stage is bounded by
    /// `limit`.
    pub async fn open(&self, cfg: &LinkConfig, limit: Duration) -> Result<(Ws, Opened), LinkError> {
        let t = &self.target;
        let via = cfg.proxy.proxy_for(&t.scheme, &t.host, t.port).cloned();
        let (dial_host, dial_port) = match &via {
            Some(p) => (p.host.clone(), p.port),
            None => (t.host.clone(), t.port),
        };
        let stage = |stage: &'static str| LinkError::Timeout { url: t.url.clone(), stage, secs: limit.as_secs() };

        let addrs = timeout(limit, self.resolver.resolve(&dial_host, dial_port))
            .await
            .map_err(|_| stage("resolving"))?
            .map_err(|e| LinkError::Resolve { host: dial_host.clone(), reason: e.to_string() })?;
        if addrs.is_empty() {
            return Err(LinkError::Resolve { host: dial_host, reason: "no address".into() });
        }
        let mut last = String::new();
        let mut tcp = None;
        for addr in &addrs {
            match timeout(limit, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some((s, *addr));
                    break;
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {} s", limit.as_secs()),
            }
        }
        let Some((mut tcp, peer)) = tcp else {
            let what = if via.is_some() { "proxy " } else { "" };
            return Err(LinkError::Tcp {
                what: format!("{what}{}", proxy::authority(&dial_host, dial_port)),
                reason: last,
            });
        };
        let _ = tcp.set_nodelay(true);

        if let Some(p) = &via {
            timeout(limit, proxy::connect_tunnel(&mut tcp, p, &t.host, t.port))
                .await
                .map_err(|_| stage("waiting for the proxy's CONNECT answer"))?
                .map_err(|reason| LinkError::Proxy { proxy: p.to_string(), reason })?;
        }

        let stream = match &self.tls {
            None => MaybeTlsStream::Plain(tcp),
            Some(config) => {
                let name = tls::server_name(&t.host)?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let s = timeout(limit, connector.connect(name, tcp))
                    .await
                    .map_err(|_| stage("TLS handshake"))?
                    .map_err(|e| LinkError::TlsHandshake {
                        url: t.url.clone(),
                        reason: tls::explain(&e, &t.host, cfg.ca_file.as_deref()),
                    })?;
                MaybeTlsStream::Rustls(s)
            }
        };

        let (ws, _response) =
            timeout(limit, tokio_tungstenite::client_async_with_config(t.url.as_str(), stream, Some(self.ws_config)))
                .await
                .map_err(|_| stage("WebSocket upgrade"))?
                .map_err(|e| upgrade_error(&t.url, e))?;
        Ok((ws, Opened { peer, via }))
    }
}

fn upgrade_error(url: &str, e: tokio_tungstenite::tungstenite::Error) -> LinkError {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(resp) => {
            // A standard way for a backend (or its load balancer) to say "later".
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            LinkError::Refused { url: url.to_string(), status: resp.status().as_u16(), retry_after }
        }
        other => LinkError::Upgrade { url: url.to_string(), reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("wss://b.example/agent/").unwrap();
        assert_eq!((t.scheme.as_str(), t.host.as_str(), t.port, t.tls()), ("wss", "b.example", 443, true));
        let t = Target::parse("ws://[::1]:8080/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls()), ("::1", 8080, false));
        assert!(Target::parse("https://b/").is_err());
        assert!(Target::parse("nonsense").is_err());
    }
}
