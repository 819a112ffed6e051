//! Proxies: the WebSocket goes through an HTTP CONNECT proxy written here (which counts
//! its tunnels and checks Basic credentials), chosen by the config key or the environment,
//! bypassed for `no_proxy` hosts; downloads follow the same rules.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod link_support;

use std::collections::HashMap;

use link_support::*;
use opsagent::link::{http_client_builder, ProxySettings};

fn settings(proxy: Option<&str>, no_proxy: Option<&str>, env: &[(&str, &str)]) -> ProxySettings {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let (s, problems) = ProxySettings::resolve(proxy, no_proxy, |k| env.get(k).cloned());
    assert!(problems.is_empty(), "{problems:?}");
    s
}

struct TlsSetup {
    _tmp: tempfile::TempDir,
    backend: RefBackend,
    ca: std::path::PathBuf,
    proxy: Proxy,
}

async fn tls_setup(auth: Option<&str>) -> TlsSetup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("proxy test CA");
    let files = ca.issue(&["backend.test"], tmp.path(), "backend");
    let ca_pem = ca.write_pem(&tmp.path().join("ca.pem"));
    let backend = RefBackend::start(&tmp.path().join("b"), "app-test", Some(files)).await;
    // Only the proxy knows where backend.test is: the agent never resolves it.
    let proxy = Proxy::start(auth, HashMap::from([("backend.test".to_string(), backend.addr)])).await;
    TlsSetup { _tmp: tmp, backend, ca: ca_pem, proxy }
}

#[tokio::test]
async fn wss_goes_through_a_connect_proxy_with_basic_credentials() {
    let mut s = tls_setup(Some("alice:s3cret")).await;
    let port = s.backend.addr.port();
    let mut cfg = quick(&format!("wss://backend.test:{port}/agent"));
    cfg.ca_file = Some(s.ca.clone());
    cfg.proxy = settings(Some(&s.proxy.url(Some("alice:s3cret"))), None, &[("https_proxy", "http://ignored:1")]);
    let mut link = Spawn::new(cfg).start();
    let st = link.connected(20).await;
    assert_eq!(s.proxy.tunnels(), vec![format!("backend.test:{port}")]);
    assert_eq!(st.proxy, Some(format!("http://alice:***@{}", s.proxy.addr)), "password masked");
    assert_eq!(st.peer, Some(s.proxy.addr.to_string()));
    // TLS and the host name were checked end to end through the tunnel.
    assert_eq!(s.backend.messages("Handshake").len(), 1);
    // Every reconnect opens a new tunnel.
    s.backend.restart("app-test").await;
    link.wait_for(20, "reconnected", |st| is_connected(st) && st.connects == 2).await;
    assert_eq!(s.proxy.tunnels().len(), 2);
    link.stop().await;
}

#[tokio::test]
async fn refused_proxy_credentials_are_reported() {
    let s = tls_setup(Some("alice:s3cret")).await;
    let mut cfg = quick(&format!("wss://backend.test:{}/agent", s.backend.addr.port()));
    cfg.ca_file = Some(s.ca.clone());
    cfg.proxy = settings(Some(&s.proxy.url(Some("alice:wrong"))), None, &[]);
    let mut link = Spawn::new(cfg).start();
    let st = link.wait_for(20, "an error", |st| st.last_error.is_some()).await;
    let err = st.last_error.unwrap();
    assert!(err.contains("proxy http://alice:***@") && err.contains("credentials were refused"), "{err}");
    assert!(!err.contains("wrong"), "no password in messages: {err}");
    assert!(s.proxy.tunnels().is_empty());
    link.stop().await;
}

#[tokio::test]
async fn the_environment_chooses_the_proxy_by_scheme_and_no_proxy_bypasses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let proxy = Proxy::start(None, HashMap::new()).await;
    let url = format!("ws://{}/", backend.addr);

    // ws:// follows http_proxy (https_proxy is for wss://).
    let mut cfg = quick(&url);
    cfg.proxy = settings(None, None, &[("http_proxy", &proxy.url(None)), ("https_proxy", "http://nowhere.invalid:1")]);
    // Plaintext through a proxy leaves the host: only the root-owned setting allows it.
    cfg.allow_insecure_transport = true;
    let mut link = Spawn::new(cfg).start();
    link.connected(20).await;
    assert_eq!(proxy.tunnels(), vec![backend.addr.to_string()]);
    link.stop().await;

    // NO_PROXY lists the backend: direct.
    let mut cfg = quick(&url);
    cfg.proxy = settings(None, None, &[("HTTP_PROXY", &proxy.url(None)), ("NO_PROXY", "localhost,127.0.0.0/8")]);
    let mut link = Spawn::new(cfg).start();
    let st = link.connected(20).await;
    assert_eq!((st.proxy, st.peer), (None, Some(backend.addr.to_string())));
    assert_eq!(proxy.tunnels().len(), 1, "no new tunnel");
    link.stop().await;
}

#[tokio::test]
async fn downloads_follow_the_same_rules() {
    let s = tls_setup(Some("bob:pw")).await;
    let port = s.backend.addr.port();
    let rules = settings(Some(&s.proxy.url(Some("bob:pw"))), Some("127.0.0.1"), &[]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&s.ca).unwrap()).unwrap();
    let client = http_client_builder(&rules).add_root_certificate(ca).build().unwrap();
    // The backend answers no plain HTTP; what matters is the way the request went.
    let _ = client.get(format!("https://backend.test:{port}/opsagent.tgz")).send().await;
    assert_eq!(s.proxy.tunnels(), vec![format!("backend.test:{port}")], "through the proxy, with credentials");
    assert_eq!(s.proxy.refused.load(std::sync::atomic::Ordering::SeqCst), 0);
    // no_proxy: direct (the proxy would refuse a plain GET).
    let _ = client.get(format!("https://127.0.0.1:{port}/x")).send().await;
    assert_eq!(s.proxy.tunnels().len(), 1);
}
