//! Whether the backend link may be unauthenticated: plaintext `ws://` or `wss://` with
//! `tls_insecure`. Whoever speaks for the backend pushes recipes the root helper
//! applies, so a link a man in the middle can take over is allowed only to this host
//! itself (a loopback address, reached directly), or when the root-owned configuration
//! says so (`[agent] allow_insecure_transport = true`) — and then it is said loudly, at
//! start and in `opsagent status`.

use std::net::IpAddr;

use super::connect::Target;
use super::LinkError;

/// `Ok(None)`: authenticated, or loopback. `Ok(Some(warning))`: insecure but allowed by
/// the configuration. `Err`: refused.
pub fn check(target: &Target, tls_insecure: bool, via_proxy: bool, allowed: bool) -> Result<Option<String>, LinkError> {
    let weakness = match (target.tls(), tls_insecure) {
        (true, false) => return Ok(None),
        (true, true) => "TLS without certificate verification (tls_insecure = true)",
        (false, _) => "plaintext ws://",
    };
    if is_loopback(&target.host) && !via_proxy {
        return Ok(None);
    }
    let what = format!(
        "{weakness} to {}: anyone on the path can impersonate the backend and have recipes run as root",
        target.url
    );
    if allowed {
        Ok(Some(format!("{what} (allowed by [agent] allow_insecure_transport)")))
    } else {
        Err(LinkError::Insecure(format!(
            "{what}; refused: use wss:// with certificate verification, or set \
             [agent] allow_insecure_transport = true in the root-owned /etc/opsagent.conf"
        )))
    }
}

/// `localhost` or a loopback address literal (names other than `localhost` may resolve
/// anywhere).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    #[test]
    fn plaintext_or_unverified_tls_is_refused_off_this_host() {
        for (url, insecure) in
            [("ws://backend.example/agent", false), ("wss://backend.example/", true), ("ws://10.0.0.1/", false)]
        {
            let e = check(&t(url), insecure, false, false).unwrap_err().to_string();
            assert!(e.contains("refused") && e.contains("allow_insecure_transport"), "{url}: {e}");
        }
        // Through a proxy even a loopback name leaves the host.
        assert!(check(&t("ws://127.0.0.1:8080/"), false, true, false).is_err());
    }

    #[test]
    fn loopback_and_verified_tls_pass_quietly() {
        for url in ["ws://127.0.0.1:8080/", "ws://[::1]:80/", "ws://localhost/", "ws://127.1.2.3/", "wss://b.example/"]
        {
            assert_eq!(check(&t(url), false, false, false).unwrap(), None, "{url}");
        }
        assert_eq!(check(&t("wss://127.0.0.1/"), true, false, false).unwrap(), None);
    }

    #[test]
    fn the_root_owned_setting_allows_it_with_a_warning() {
        let w = check(&t("ws://backend.example/"), false, false, true).unwrap().unwrap();
        assert!(w.contains("plaintext ws://") && w.contains("allowed by [agent] allow_insecure_transport"), "{w}");
    }
}
