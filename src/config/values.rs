//! Checks for single values. Each returns the typed value or a problem sentence that quotes
//! the offending text; the caller adds where the value came from.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest delay accepted anywhere: a week. Anything longer is a typo (minutes vs seconds).
pub(super) const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// Bounds of `[link] max_frame`: 1 KiB .. 1 GiB.
pub(super) const MIN_FRAME: usize = 1024;
pub(super) const MAX_FRAME: usize = 1 << 30;
/// Longest identifier (app id, version, instance id) accepted.
pub(crate) const MAX_ID_LEN: usize = 255;

const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

pub(super) fn seconds(text: &str) -> Result<Duration, String> {
    let n: u64 = text.parse().map_err(|_| format!("{text:?} is not a whole number of seconds"))?;
    seconds_in_range(n)
}

/// The pause between two completed rounds. Unlike every other delay, 0 is accepted: the
/// original agent's `[salt] delay = 0` ran rounds back to back, and a soak wants exactly
/// that. A failed round still waits `retry_delay` (at least 1 s), so 0 never spins on an
/// error.
pub(super) fn round_delay(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(0) => Ok(Duration::ZERO),
        _ => seconds(text),
    }
}

pub(super) fn seconds_in_range(n: u64) -> Result<Duration, String> {
    match n {
        0 => Err("0 is too small: at least 1 second".to_string()),
        n if n > MAX_SECONDS => Err(format!("{n} is too large: at most {MAX_SECONDS} seconds (7 days)")),
        n => Ok(Duration::from_secs(n)),
    }
}

/// Seconds in `min..=max`.
pub(super) fn seconds_between(text: &str, min: u64, max: u64) -> Result<Duration, String> {
    let n: u64 = text.parse().map_err(|_| format!("{text:?} is not a whole number of seconds"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("{n} is out of range: between {min} and {max} seconds"));
    }
    Ok(Duration::from_secs(n))
}

pub(super) fn bytes(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|_| format!("{text:?} is not a whole number of bytes"))?;
    if !(MIN_FRAME..=MAX_FRAME).contains(&n) {
        return Err(format!("{n} is out of range: between {MIN_FRAME} and {MAX_FRAME} bytes"));
    }
    Ok(n)
}

/// Bounds of `[agent] download_max_bytes`: 1 KiB .. 1 TiB.
pub(super) const MIN_DOWNLOAD: u64 = 1024;
pub(super) const MAX_DOWNLOAD: u64 = 1 << 40;

pub(super) fn download_bytes(text: &str) -> Result<u64, String> {
    let n: u64 = text.parse().map_err(|_| format!("{text:?} is not a whole number of bytes"))?;
    if !(MIN_DOWNLOAD..=MAX_DOWNLOAD).contains(&n) {
        return Err(format!("{n} is out of range: between {MIN_DOWNLOAD} and {MAX_DOWNLOAD} bytes"));
    }
    Ok(n)
}

/// A whole number in `min..=max`.
pub(super) fn count(text: &str, min: u32, max: u32) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|_| format!("{text:?} is not a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("{n} is out of range: between {min} and {max}"));
    }
    Ok(n)
}

/// An HTTP proxy URL, `http://[user:password@]host[:port]`; the link parses it the same way.
pub(super) fn proxy_url(text: &str) -> Result<String, String> {
    crate::net::ProxyUrl::parse(text)?;
    Ok(text.trim().to_string())
}

/// A `no_proxy` list: host names, domains, IP addresses or CIDR blocks, optionally with
/// `:port`, separated by commas or spaces; `*` for every host.
pub(super) fn host_list(text: &str) -> Result<String, String> {
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!("{text:?} contains {c:?}"));
    }
    Ok(text.trim().to_string())
}

pub(super) fn boolean(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean (use true or false)")),
    }
}

/// An absolute path: the daemon runs from `/` under systemd, so a relative path in the file
/// would silently point somewhere unexpected.
pub(super) fn absolute_path(text: &str) -> Result<PathBuf, String> {
    checked_path(Path::new(text))
}

pub(super) fn checked_path(path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err("is empty: expected an absolute path".to_string());
    }
    if !path.is_absolute() {
        return Err(format!("{:?} is not an absolute path", path.display().to_string()));
    }
    Ok(path.to_path_buf())
}

pub(super) fn ws_url(text: &str) -> Result<String, String> {
    url_with_scheme(text, &["ws", "wss"])
}

pub(super) fn http_url(text: &str) -> Result<String, String> {
    url_with_scheme(text, &["http", "https"])
}

/// Returns the URL as written (minus trailing `/` for http bases, which are joined with paths
/// later), after checking it parses, has a host and one of `schemes`.
fn url_with_scheme(text: &str, schemes: &[&str]) -> Result<String, String> {
    let wanted = schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(" or ");
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e}); expected {wanted}…"))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("{text:?} must start with {wanted}"));
    }
    if url.host_str().filter(|h| !h.is_empty()).is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if url.scheme().starts_with("http") {
        return Ok(text.trim_end_matches('/').to_string());
    }
    Ok(text.to_string())
}

/// An identifier sent on the wire: non-empty, printable ASCII without spaces, bounded.
pub(crate) fn identifier(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("is empty".to_string());
    }
    if text.len() > MAX_ID_LEN {
        return Err(format!("is {} characters long: at most {MAX_ID_LEN}", text.len()));
    }
    if let Some(c) = text.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{text:?} contains {c:?}: only printable ASCII without spaces is allowed"));
    }
    Ok(text.to_string())
}

/// A minisign public key: the base64 line of a `minisign.pub` file (decoded later, by the
/// upgrade code; here only the alphabet is checked, to catch pasting the comment line).
pub(super) fn base64_key(text: &str) -> Result<String, String> {
    let body = text.trim_end_matches('=');
    let alphabet_ok = body.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
    if text.is_empty() || !alphabet_ok || !text.len().is_multiple_of(4) || text.len() - body.len() > 2 {
        return Err(format!(
            "{text:?} is not base64 text (expected the key line of a minisign .pub file, e.g. \"RWQ…\")"
        ));
    }
    Ok(text.to_string())
}

/// One or more minisign public keys separated by blanks or commas (`recipe_key`).
pub(super) fn base64_keys(text: &str) -> Result<String, String> {
    let keys: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == ',').filter(|k| !k.is_empty()).collect();
    if keys.is_empty() {
        return Err("no key given (expected one or more key lines of minisign .pub files)".into());
    }
    for k in &keys {
        base64_key(k)?;
    }
    Ok(keys.join(" "))
}

/// A tracing filter: one of the levels, or an `EnvFilter` directive list (`info,opsagent=debug`)
/// which the logging set-up checks in full.
pub(super) fn log_level(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    let is_directive = lower.contains('=') || lower.contains(',');
    if lower.is_empty()
        || lower.chars().any(char::is_whitespace)
        || !(is_directive || LOG_LEVELS.contains(&lower.as_str()))
    {
        return Err(format!("{text:?} is not a log level (one of {})", LOG_LEVELS.join(", ")));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(ws_url("wss://b.example/agent/").unwrap(), "wss://b.example/agent/");
        assert_eq!(http_url("http://169.254.169.254/").unwrap(), "http://169.254.169.254");
        assert!(ws_url("https://b.example").unwrap_err().contains("must start with ws:// or wss://"));
        assert!(ws_url("b.example").unwrap_err().contains("is not a URL"));
        assert!(http_url("http://").unwrap_err().contains("not a URL"));
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(seconds("600").unwrap(), Duration::from_secs(600));
        assert!(seconds("-1").unwrap_err().contains("whole number"));
        assert!(seconds("0").unwrap_err().contains("at least 1"));
        assert!(seconds("604801").unwrap_err().contains("at most"));
        assert!(bytes("12").unwrap_err().contains("between"));
        assert_eq!(boolean("Yes"), Ok(true));
        assert_eq!(boolean("off"), Ok(false));
    }

    #[test]
    fn identifiers_keys_levels() {
        assert!(identifier("app 1").unwrap_err().contains("' '"));
        assert!(identifier(&"a".repeat(256)).unwrap_err().contains("at most 255"));
        assert!(base64_key("RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3").is_ok());
        assert!(base64_key("untrusted comment: minisign public key").is_err());
        assert_eq!(log_level("DEBUG").unwrap(), "debug");
        assert!(log_level("info,opsagent=trace").is_ok());
        assert!(log_level("inf").is_err());
    }
}
