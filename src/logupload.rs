//! The upload variant of `fetch-logs`: the gzipped bundle PUT to the request's
//! `upload_url`, through the same proxy rules and trusted CAs as the rest of the daemon.
//!
//! Logs may hold what states printed, so they go only where a man in the middle cannot
//! read or redirect them: `https://` with certificate verification, or plain `http://` to
//! this host itself (a loopback address reached directly), the rule the backend link
//! follows for `ws://` — or anywhere the root-owned `allow_insecure_transport` allows.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::net::{http_client_builder, ProxySettings};

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload_url is not a valid URL: {0}")]
    BadUrl(String),
    #[error("upload to {url} refused: {why}")]
    Refused { url: String, why: String },
    #[error("cannot set up uploads: {0}")]
    Setup(String),
    #[error("upload to {url} failed: {reason}")]
    Transfer { url: String, reason: String },
    #[error("upload to {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
}

/// How uploads connect.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    pub proxy: ProxySettings,
    /// The whole PUT, body included: a stalled receiver cannot hold a request forever.
    pub timeout: Duration,
    /// PEM files of CAs trusted in addition to the system roots.
    pub extra_roots: Vec<PathBuf>,
    /// `[agent] allow_insecure_transport`: plain http off this host is allowed.
    pub allow_insecure: bool,
}

pub struct Uploader {
    client: reqwest::Client,
    proxy: ProxySettings,
    allow_insecure: bool,
}

impl Uploader {
    pub fn new(settings: UploadSettings) -> Result<Self, UploadError> {
        let mut builder = http_client_builder(&settings.proxy)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            // A redirect could take the logs to another host, past the check below.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("opsagent/", env!("CARGO_PKG_VERSION")));
        for path in &settings.extra_roots {
            let pem = std::fs::read(path)
                .map_err(|e| UploadError::Setup(format!("CA file {}: cannot read: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| UploadError::Setup(format!("CA file {}: {e}", path.display())))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| UploadError::Setup(e.to_string()))?;
        Ok(Self { client, proxy: settings.proxy, allow_insecure: settings.allow_insecure })
    }

    /// PUTs `bundle` to `url`; any 2xx answer is success.
    pub async fn put(&self, url: &str, bundle: Vec<u8>) -> Result<(), UploadError> {
        let parsed = Url::parse(url).map_err(|e| UploadError::BadUrl(e.to_string()))?;
        let shown = shown(&parsed);
        self.check(&parsed).map_err(|why| UploadError::Refused { url: shown.clone(), why })?;
        let response = self
            .client
            .put(parsed)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(bundle)
            .send()
            .await
            .map_err(|e| UploadError::Transfer { url: shown.clone(), reason: describe(&e) })?;
        let status = response.status();
        if !status.is_success() {
            return Err(UploadError::Status { url: shown, status: status.as_u16() });
        }
        Ok(())
    }

    fn check(&self, url: &Url) -> Result<(), String> {
        match url.scheme() {
            "https" => Ok(()),
            "http" => {
                let host = url.host_str().unwrap_or_default().trim_matches(|c| c == '[' || c == ']');
                let port = url.port_or_known_default().unwrap_or(80);
                let direct = self.proxy.proxy_for("http", host, port).is_none();
                if (is_loopback(host) && direct) || self.allow_insecure {
                    Ok(())
                } else {
                    Err("plain http:// leaves this host readable by anyone on the path; use https:// (or set \
                         [agent] allow_insecure_transport = true in the root-owned /etc/opsagent.conf)"
                        .to_string())
                }
            }
            other => Err(format!("{other}:// is not http:// or https://")),
        }
    }
}

/// `localhost` or a loopback address literal.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The URL as logs and answers show it: no credentials, no query (a pre-signed upload
/// URL carries its token there).
fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A reqwest error with its causes, without the URL (said once, redacted, by the caller).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut parts = vec![kind.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uploader(allow_insecure: bool) -> Uploader {
        Uploader::new(UploadSettings {
            proxy: ProxySettings::default(),
            timeout: Duration::from_secs(5),
            extra_roots: Vec::new(),
            allow_insecure,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn plain_http_off_this_host_is_refused_before_connecting() {
        let e = uploader(false).put("http://user:pw@logs.example/r?sig=secret", vec![1]).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, UploadError::Refused { .. }), "{text}");
        assert!(text.contains("https://") && !text.contains("secret") && !text.contains("pw"), "{text}");
        let e = uploader(false).put("ftp://127.0.0.1/x", vec![1]).await.unwrap_err();
        assert!(matches!(e, UploadError::Refused { .. }), "{e}");
        assert!(uploader(false).check(&Url::parse("http://127.0.0.1:9/x").unwrap()).is_ok());
        assert!(uploader(false).check(&Url::parse("https://logs.example/x").unwrap()).is_ok());
        assert!(uploader(true).check(&Url::parse("http://logs.example/x").unwrap()).is_ok());
    }
}
