//! The cloud metadata service: instance id and userdata.
//!
//! Sources, in order (a source that answers wins):
//! 1. OpenStack `GET {base}/openstack/latest/meta_data.json`, field `uuid`;
//! 2. AWS IMDSv2: `PUT {base}/latest/api/token`, then `GET {base}/latest/meta-data/instance-id`
//!    with the token header;
//! 3. AWS IMDSv1: the same GET without a token, only when no IMDSv2 token was obtained.
//!
//! OpenStack comes first, as in the original agent (protocol.md): OpenStack also serves the
//! EC2-compatible `/latest/meta-data/instance-id` (`i-0000000a`), and the backend knows such
//! instances by their `uuid`. On AWS the OpenStack path simply answers 404.
//!
//! Each request has a short timeout; a round over all sources is retried with exponential
//! backoff only while some source failed in a way that may pass (timeout, connection error,
//! 5xx, 429). No proxy is used: the metadata address is link-local.

use std::fmt;
use std::time::Duration;

use reqwest::{Client, RequestBuilder, StatusCode};

use super::userdata::{parse_userdata, Userdata};
use super::{validate_instance_id, IdentityError};

const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Six hours, the usual value; the token is used at once anyway.
const TOKEN_TTL: &str = "21600";
const OPENSTACK_PATH: &str = "/openstack/latest/meta_data.json";
const TOKEN_PATH: &str = "/latest/api/token";
const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const USERDATA_PATH: &str = "/latest/user-data";
/// Largest id/token/meta_data.json answer read.
const SMALL_CAP: usize = 64 * 1024;
/// Largest userdata read (AWS allows 16 KiB, OpenStack 64 KiB; leave room).
const USERDATA_CAP: usize = 1 << 20;

/// How hard to try the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Rounds over all sources, at least 1.
    pub attempts: u32,
    /// Pause after the first failed round; doubles after each, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Timeout of each request (connect included).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 5 rounds, 0.5 s doubling to at most 4 s, 2 s per request.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(4),
            request_timeout: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The pause after failed round `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// What one source answered when it gave no id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAnswer {
    /// `openstack`, `aws-imdsv2` or `aws-imdsv1`.
    pub source: &'static str,
    /// e.g. `GET /latest/meta-data/instance-id`.
    pub request: String,
    /// e.g. `HTTP 404`, `timed out after 2000 ms`, `connection refused`.
    pub answer: String,
    pub status: Option<u16>,
    /// Whether asking again may help.
    pub transient: bool,
}

impl fmt::Display for SourceAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.source, self.request, self.answer)
    }
}

/// A client of the metadata service at one base URL.
#[derive(Debug, Clone)]
pub struct MetadataClient {
    base: String,
    http: Client,
    retry: RetryPolicy,
}

impl MetadataClient {
    /// `base` like `http://169.254.169.254` (a trailing `/` is ignored). Does no I/O.
    pub fn new(base: &str, retry: RetryPolicy) -> Result<Self, IdentityError> {
        let http = Client::builder()
            .no_proxy()
            .timeout(retry.request_timeout)
            .connect_timeout(retry.request_timeout)
            // A redirect from a link-local service is not expected; report it as is.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| IdentityError::Client { base: base.to_string(), error: error_chain(&e) })?;
        Ok(MetadataClient { base: base.trim_end_matches('/').to_string(), http, retry })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL userdata is read from.
    pub fn userdata_url(&self) -> String {
        format!("{}{USERDATA_PATH}", self.base)
    }

    /// This instance's id, trying every source, with bounded retries.
    pub async fn instance_id(&self) -> Result<String, IdentityError> {
        let mut attempt = 1;
        loop {
            let answers = match self.instance_id_once().await {
                Ok(id) => return Ok(id),
                Err(answers) => answers,
            };
            if attempt >= self.retry.attempts || !answers.iter().any(|a| a.transient) {
                return Err(IdentityError::NoInstanceId { base: self.base.clone(), attempts: attempt, answers });
            }
            let pause = self.retry.delay_after(attempt);
            tracing::debug!(attempt, ?pause, "metadata service gave no instance id; retrying");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// The instance userdata, `None` if the instance has none (HTTP 404).
    pub async fn userdata(&self) -> Result<Option<Userdata>, IdentityError> {
        let mut attempt = 1;
        loop {
            let answer = match self.userdata_once().await {
                Ok(text) => return Ok(Some(parse_userdata(&text))),
                Err(a) if a.status == Some(StatusCode::NOT_FOUND.as_u16()) => return Ok(None),
                Err(a) => a,
            };
            if attempt >= self.retry.attempts || !answer.transient {
                let (url, answer) = (self.userdata_url(), answer.answer);
                return Err(IdentityError::Userdata { url, attempts: attempt, answer });
            }
            tokio::time::sleep(self.retry.delay_after(attempt)).await;
            attempt += 1;
        }
    }

    /// One round over the sources; `Err` lists what each answered.
    async fn instance_id_once(&self) -> Result<String, Vec<SourceAnswer>> {
        let mut answers = Vec::new();
        match self.openstack_uuid().await {
            Ok(id) => return Ok(id),
            Err(a) => answers.push(a),
        }
        let token = match self.imds_token().await {
            Ok(token) => Some(token),
            Err(a) => {
                answers.push(a);
                None
            }
        };
        // With a token, IMDSv2 is the authority; IMDSv1 is only for services without tokens.
        let source = if token.is_some() { "aws-imdsv2" } else { "aws-imdsv1" };
        let request = self.with_token(self.http.get(self.url(INSTANCE_ID_PATH)), token.as_deref());
        let text = self.fetch(source, "GET", INSTANCE_ID_PATH, request, SMALL_CAP).await;
        match text.and_then(|t| checked_id(source, INSTANCE_ID_PATH, &t)) {
            Ok(id) => Ok(id),
            Err(a) => {
                answers.push(a);
                Err(answers)
            }
        }
    }

    async fn openstack_uuid(&self) -> Result<String, SourceAnswer> {
        let source = "openstack";
        let request = self.http.get(self.url(OPENSTACK_PATH));
        let text = self.fetch(source, "GET", OPENSTACK_PATH, request, SMALL_CAP).await?;
        let uuid = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("uuid").and_then(|u| u.as_str()).map(str::to_string));
        match uuid {
            Some(uuid) => checked_id(source, OPENSTACK_PATH, &uuid),
            None => Err(invalid(source, "GET", OPENSTACK_PATH, "not a JSON object with a string \"uuid\"")),
        }
    }

    async fn imds_token(&self) -> Result<String, SourceAnswer> {
        let request = self.http.put(self.url(TOKEN_PATH)).header(TOKEN_TTL_HEADER, TOKEN_TTL);
        let token = self.fetch("aws-imdsv2", "PUT", TOKEN_PATH, request, SMALL_CAP).await?;
        let token = token.trim();
        // The token goes back in a header: it must be a plain visible-ASCII string.
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid("aws-imdsv2", "PUT", TOKEN_PATH, "the token is empty or not printable ASCII"));
        }
        Ok(token.to_string())
    }

    async fn userdata_once(&self) -> Result<String, SourceAnswer> {
        // IMDSv2-only instances refuse userdata without a token; elsewhere the PUT just fails.
        let token = self.imds_token().await.ok();
        let request = self.with_token(self.http.get(self.url(USERDATA_PATH)), token.as_deref());
        self.fetch("userdata", "GET", USERDATA_PATH, request, USERDATA_CAP).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn with_token(&self, request: RequestBuilder, token: Option<&str>) -> RequestBuilder {
        match token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        }
    }

    /// Sends `request` and returns the body of a 200 answer (lossy UTF-8: userdata may be
    /// binary, and ids are checked afterwards), or what went wrong.
    async fn fetch(
        &self,
        source: &'static str,
        method: &str,
        path: &str,
        request: RequestBuilder,
        cap: usize,
    ) -> Result<String, SourceAnswer> {
        let answer = |answer: String, status: Option<u16>, transient: bool| SourceAnswer {
            source,
            request: format!("{method} {path}"),
            answer,
            status,
            transient,
        };
        let mut response = request.send().await.map_err(|e| answer(self.describe(&e), None, true))?;
        let status = response.status();
        if status != StatusCode::OK {
            let transient = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
            return Err(answer(format!("HTTP {}", status.as_u16()), Some(status.as_u16()), transient));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| answer(self.describe(&e), None, true))? {
            if body.len() + chunk.len() > cap {
                return Err(answer(format!("answer larger than {cap} bytes"), Some(200), false));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            format!("timed out after {} ms", self.retry.request_timeout.as_millis())
        } else {
            error_chain(error)
        }
    }
}

fn checked_id(source: &'static str, path: &str, text: &str) -> Result<String, SourceAnswer> {
    validate_instance_id(text)
        .map_err(|problem| invalid(source, "GET", path, &format!("invalid instance id: {problem}")))
}

fn invalid(source: &'static str, method: &str, path: &str, problem: &str) -> SourceAnswer {
    SourceAnswer {
        source,
        request: format!("{method} {path}"),
        answer: problem.to_string(),
        status: Some(200),
        transient: false,
    }
}

/// The innermost causes carry the useful part ("Connection refused"); reqwest's own
/// message only repeats the URL.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
