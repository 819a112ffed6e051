//! Downloads of remote content for states (`common.archive`, `linux.file` `remote_uri`)
//! and for the agent's own upgrades.
//!
//! The root helper links no network code, so the unprivileged daemon fetches and hands
//! the helper a file, which the helper then checks itself (owner, size, digest). Only
//! `http://` and `https://` are fetched, through the same proxy rules as the backend
//! link ([`crate::net::http_client_builder`]).
//!
//! A body streams into `<dest>.part` (0644, fsynced) and is renamed onto `dest` only
//! once complete, so `dest` is never a partial file. The size cap is checked against
//! `Content-Length` before anything is written, and again while streaming (a server may
//! send no length, or lie). Transient failures — connection errors, timeouts, a body cut
//! short, HTTP 5xx and 429 — are retried with jittered exponential backoff (429 and 503
//! honour `Retry-After`, within a cap); other 4xx answers are final. Waits use
//! `tokio::time`. Messages name the URL with any password in it replaced by `***`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::net::{http_client_builder, Backoff, ProxySettings};

/// First retry pause and the most any pause (including a `Retry-After`) lasts.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// How downloads connect and how hard they try.
#[derive(Debug, Clone)]
pub struct DownloadSettings {
    pub proxy: ProxySettings,
    /// The whole transfer of one attempt, body included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts per URL, at least 1.
    pub attempts: u32,
    /// PEM files of CAs trusted in addition to the system roots (may be empty).
    pub extra_roots: Vec<PathBuf>,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            proxy: ProxySettings::default(),
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(30),
            attempts: 4,
            extra_roots: Vec::new(),
        }
    }
}

/// A completed download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Lowercase hex (`common.archive` checksums are md5 in the original recipes).
    pub md5: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url:?} is not a valid URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: only http:// and https:// URLs can be downloaded")]
    Scheme { url: String },
    #[error("cannot set up downloads: {0}")]
    Setup(String),
    #[error("{url}: HTTP {status}{}", attempts_note(*attempts))]
    Status { url: String, status: u16, attempts: u32 },
    #[error("{url}: the body ({}) exceeds the download limit of {limit} bytes", size_note(*size))]
    TooLarge { url: String, size: Option<u64>, limit: u64 },
    #[error("{url}: {reason}{}", attempts_note(*attempts))]
    Transfer { url: String, reason: String, attempts: u32 },
    #[error("{url}: {path}: cannot {op}: {source}")]
    Io { url: String, path: PathBuf, op: &'static str, source: std::io::Error },
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

fn size_note(size: Option<u64>) -> String {
    match size {
        Some(n) => format!("{n} bytes"),
        None => "more than that".to_string(),
    }
}

/// One attempt's failure: retry it (after at least `retry_after`, when the server said)
/// or give up.
enum Failure {
    Final(DownloadError),
    Transient { error: DownloadError, retry_after: Option<Duration> },
}

pub struct Downloader {
    client: reqwest::Client,
    attempts: u32,
    retry_base: Duration,
    retry_cap: Duration,
}

impl Downloader {
    pub fn new(settings: DownloadSettings) -> Result<Self, DownloadError> {
        let mut builder = http_client_builder(&settings.proxy)
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("opsagent/", env!("CARGO_PKG_VERSION")));
        for path in &settings.extra_roots {
            let pem = std::fs::read(path)
                .map_err(|e| DownloadError::Setup(format!("CA file {}: cannot read: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| DownloadError::Setup(format!("CA file {}: {}", path.display(), chain(&e))))?;
            if certs.is_empty() {
                return Err(DownloadError::Setup(format!("CA file {}: no CERTIFICATE in the file", path.display())));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| DownloadError::Setup(chain(&e)))?;
        Ok(Self { client, attempts: settings.attempts.max(1), retry_base: RETRY_BASE, retry_cap: RETRY_CAP })
    }

    /// Shorter (or longer) retry pauses than the defaults: first pause `base`, no pause
    /// longer than `cap` (a `Retry-After` included).
    pub fn with_retry_pauses(mut self, base: Duration, cap: Duration) -> Self {
        self.retry_base = base;
        self.retry_cap = cap.max(base);
        self
    }

    /// Downloads `url` to `dest` (replacing it), refusing bodies over `max_bytes`.
    pub async fn fetch(&self, url: &str, dest: &Path, max_bytes: u64) -> Result<Fetched, DownloadError> {
        let parsed = Url::parse(url.trim())
            .map_err(|e| DownloadError::BadUrl { url: redact_text(url), reason: e.to_string() })?;
        let shown = redact(&parsed);
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DownloadError::Scheme { url: shown });
        }
        let mut backoff = Backoff::from_entropy(self.retry_base, self.retry_cap);
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(&parsed, &shown, dest, max_bytes, attempt).await {
                Ok(fetched) => return Ok(fetched),
                Err(f) => f,
            };
            let (error, retry_after) = match failure {
                Failure::Final(e) => return Err(e),
                Failure::Transient { error, retry_after } => (error, retry_after),
            };
            if attempt >= self.attempts {
                return Err(error);
            }
            let pause = match retry_after {
                Some(hint) => backoff.after_hint(hint),
                None => backoff.delay(attempt),
            };
            tracing::info!(url = %shown, attempt, error = %error, pause_ms = pause.as_millis() as u64, "download failed; retrying");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn attempt(
        &self,
        url: &Url,
        shown: &str,
        dest: &Path,
        max_bytes: u64,
        attempt: u32,
    ) -> Result<Fetched, Failure> {
        let transfer = |e: &reqwest::Error| {
            let error = DownloadError::Transfer { url: shown.to_string(), reason: describe(e), attempts: attempt };
            // A request the client could not even build is not worth repeating.
            if e.is_builder() {
                Failure::Final(error)
            } else {
                Failure::Transient { error, retry_after: None }
            }
        };
        let mut response = self.client.get(url.clone()).send().await.map_err(|e| transfer(&e))?;
        let status = response.status();
        if !status.is_success() {
            let error = DownloadError::Status { url: shown.to_string(), status: status.as_u16(), attempts: attempt };
            return Err(if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                Failure::Transient { error, retry_after: retry_after(&response) }
            } else {
                Failure::Final(error)
            });
        }
        if let Some(len) = response.content_length().filter(|len| *len > max_bytes) {
            return Err(Failure::Final(DownloadError::TooLarge {
                url: shown.to_string(),
                size: Some(len),
                limit: max_bytes,
            }));
        }

        let part = part_path(dest);
        let io = |op: &'static str| {
            let (url, path) = (shown.to_string(), part.clone());
            move |source| Failure::Final(DownloadError::Io { url, path, op, source })
        };
        let mut file = open_part(&part).await.map_err(io("create"))?;
        let mut sha = sha2::Sha256::new();
        let mut md5 = md5::Md5::new();
        let mut size = 0u64;
        let streamed: Result<(), Failure> = async {
            while let Some(chunk) = response.chunk().await.map_err(|e| transfer(&e))? {
                size += chunk.len() as u64;
                if size > max_bytes {
                    return Err(Failure::Final(DownloadError::TooLarge {
                        url: shown.to_string(),
                        size: None,
                        limit: max_bytes,
                    }));
                }
                sha.update(&chunk);
                md5.update(&chunk);
                file.write_all(&chunk).await.map_err(io("write"))?;
            }
            file.flush().await.map_err(io("write"))?;
            file.sync_all().await.map_err(io("fsync"))?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = streamed {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        if let Err(source) = tokio::fs::rename(&part, dest).await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(Failure::Final(DownloadError::Io {
                url: shown.to_string(),
                path: dest.to_path_buf(),
                op: "rename the download onto",
                source,
            }));
        }
        Ok(Fetched {
            path: dest.to_path_buf(),
            size,
            sha256: hex::encode(sha.finalize()),
            md5: hex::encode(md5.finalize()),
        })
    }
}

/// `<dest>.part`.
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_os_string();
    name.push(".part");
    PathBuf::from(name)
}

/// Creates (or truncates a leftover) part file, 0644 whatever the umask.
async fn open_part(part: &Path) -> std::io::Result<tokio::fs::File> {
    let file = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(part).await?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644)).await?;
    Ok(file)
}

/// `Retry-After` in seconds (the HTTP-date form is rare for downloads and treated as
/// absent: the backoff applies).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The URL as shown in messages and logs: any password replaced by `***`.
pub fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// [`redact`] for any text: parsed when it is a URL, else masked by hand.
pub fn redact_str(url: &str) -> String {
    match Url::parse(url.trim()) {
        Ok(u) => redact(&u),
        Err(_) => redact_text(url),
    }
}

/// [`redact`] for text that did not parse: everything between `://` and the last `@`
/// of the authority may be credentials.
fn redact_text(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// A reqwest error without its URL (which may hold a password), with its causes.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the transfer broke off"
    } else if e.is_redirect() {
        "too many redirects"
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

fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests;
