//! TLS: verification on by default, a private CA through `ca_file`, wrong CA and wrong
//! host name refused with a clear error, `tls_insecure` warned about at every connect.
//! The reference backend runs in-process with a certificate from a CA made here.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod link_support;

use std::time::Duration;

use link_support::*;
use opsagent::link::LinkState;

struct Setup {
    _tmp: tempfile::TempDir,
    backend: RefBackend,
    resolver: std::sync::Arc<MapResolver>,
    ca: std::path::PathBuf,
    other_ca: std::path::PathBuf,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("opsagent test CA");
    let files = ca.issue(&["backend.test"], tmp.path(), "backend");
    let ca_pem = ca.write_pem(&tmp.path().join("ca.pem"));
    let other_pem = TestCa::new("some other CA").write_pem(&tmp.path().join("other.pem"));
    let backend = RefBackend::start(&tmp.path().join("b"), "app-test", Some(files)).await;
    let resolver = MapResolver::new();
    // Two names for the same server; its certificate is only valid for the first.
    resolver.set("backend.test", backend.addr);
    resolver.set("wrong-name.test", backend.addr);
    Setup { backend, resolver, ca: ca_pem, other_ca: other_pem, _tmp: tmp }
}

fn url(host: &str, s: &Setup) -> String {
    format!("wss://{host}:{}/agent", s.backend.addr.port())
}

#[tokio::test(start_paused = true)]
async fn a_private_ca_from_ca_file_is_trusted() {
    let _clock = paced_clock();
    let s = setup().await;
    let mut cfg = quick(&url("backend.test", &s));
    cfg.ca_file = Some(s.ca.clone());
    let mut link = Spawn::new(cfg).resolver(s.resolver.clone()).start();
    let st = link.connected(20).await;
    assert_eq!(st.connects, 1);
    assert!(st.backend_capabilities.contains(&"heartbeat".to_string()), "{st:?}");
    assert!(st.last_error.is_none(), "{st:?}");
    // The handshake went over TLS to the reference backend.
    assert_eq!(s.backend.messages("Handshake").len(), 1);
    link.stop().await;
}

async fn refused_with(cfg: opsagent::link::LinkConfig, s: &Setup, needle: &str) -> String {
    let mut link = Spawn::new(cfg).resolver(s.resolver.clone()).start();
    let st = link.wait_for(20, "a TLS error", |st| st.last_error.is_some()).await;
    let err = st.last_error.clone().unwrap();
    assert!(err.contains(needle), "error {err:?} lacks {needle:?}");
    // It keeps trying, and never gets through.
    let st =
        link.wait_for(20, "a second attempt", |st| matches!(st.state, LinkState::Connecting { attempt: 3, .. })).await;
    assert_eq!(st.connects, 0, "{st:?}");
    assert!(s.backend.messages("Handshake").is_empty());
    link.stop().await;
    err
}

#[tokio::test(start_paused = true)]
async fn a_certificate_from_another_ca_is_refused() {
    let _clock = paced_clock();
    let s = setup().await;
    let mut cfg = quick(&url("backend.test", &s));
    cfg.ca_file = Some(s.other_ca.clone());
    let err = refused_with(cfg, &s, "the server certificate is not signed by a trusted CA").await;
    assert!(err.contains("other.pem"), "names the trusted bundle: {err}");
}

#[tokio::test(start_paused = true)]
async fn system_roots_alone_do_not_trust_a_private_ca() {
    let _clock = paced_clock();
    let s = setup().await;
    let cfg = quick(&url("backend.test", &s));
    let err = refused_with(cfg, &s, "not signed by a trusted CA").await;
    assert!(err.contains("set [link] ca_file for a private CA"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_host_name_is_refused() {
    let _clock = paced_clock();
    let s = setup().await;
    let mut cfg = quick(&url("wrong-name.test", &s));
    cfg.ca_file = Some(s.ca.clone());
    refused_with(cfg, &s, "the server certificate is not valid for the host name \"wrong-name.test\"").await;
}

#[tokio::test(start_paused = true)]
async fn tls_insecure_connects_and_warns_at_every_connect() {
    let _clock = paced_clock();
    // Current-thread runtime: every task logs on this thread, into the capture.
    let (logs, _guard) = Logs::capture();
    let s = setup().await;
    // The wrong name and no CA: only tls_insecure lets this through.
    let mut cfg = quick(&url("wrong-name.test", &s));
    cfg.tls_insecure = true;
    // Off this host, unverified TLS also needs the root-owned setting.
    cfg.allow_insecure_transport = true;
    let mut link = Spawn::new(cfg).resolver(s.resolver.clone()).start();
    link.connected(20).await;
    // Ask the agent to come back (reconnect hint), three times.
    for n in 2..=4u64 {
        // Different bytes each time: the backend acts on changed files only.
        let order = format!("{{\"after_s\": 0{}}}", " ".repeat(n as usize));
        std::fs::write(s.backend.dir.join("recipes/app-test.reconnect.json"), order).unwrap();
        let wait = link.wait_for(20, "a reconnect", |st| st.connects == n && is_connected(st));
        if tokio::time::timeout(Duration::from_secs(15), wait).await.is_err() {
            panic!("no reconnect {n}:\n{}", logs.text());
        }
    }
    let warning = "TLS without certificate verification (tls_insecure = true) to wss://wrong-name.test";
    eventually(10, "the fourth connect's warning", || logs.count(warning) >= 4).await;
    let warnings = logs.count("TLS without certificate verification (tls_insecure = true) to wss://wrong-name.test");
    assert_eq!(warnings, 4, "one warning per connect:\n{}", logs.text());
    link.stop().await;
}
