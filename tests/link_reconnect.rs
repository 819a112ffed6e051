//! Reconnecting: host names resolved again on every attempt, backend restarts, backend
//! hints (message, close reason, HTTP Retry-After) honoured within the cap, AppNotReady
//! retried with the backoff on the same connection, and the backoff schedule itself:
//! exact under a paused clock, reset after a healthy connection.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod link_support;

use std::time::Duration;

use link_support::*;
use opsagent::link::{Backoff, LinkState};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

#[tokio::test(start_paused = true)]
async fn a_backend_that_moved_is_found_because_names_are_resolved_on_every_attempt() {
    let _clock = paced_clock();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = RefBackend::start(&tmp.path().join("a"), "app-test", None).await;
    let resolver = MapResolver::new();
    resolver.set("backend.test", a.addr);
    // The port in the URL is the old one: the test resolver decides where the name goes.
    let mut cfg = quick("ws://backend.test:1/agent");
    // Plaintext to a name: only the root-owned setting allows it (loopback needs none).
    cfg.allow_insecure_transport = true;
    let mut link = Spawn::new(cfg).resolver(resolver.clone()).start();
    let st = link.connected(20).await;
    assert_eq!(st.peer, Some(a.addr.to_string()));

    // The backend moves: a new server elsewhere, the name points there, the old one stops.
    let b = RefBackend::start(&tmp.path().join("b"), "app-test", None).await;
    resolver.set("backend.test", b.addr);
    a.shutdown().await;
    let st = link.wait_for(20, "connected to the new address", |s| is_connected(s) && s.connects == 2).await;
    assert_eq!(st.peer, Some(b.addr.to_string()));
    assert_eq!(b.messages("Handshake").len(), 1, "the new backend got the Handshake");
    assert!(resolver.lookups("backend.test") >= 2);
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_backend_gets_a_new_handshake() {
    let _clock = paced_clock();
    let tmp = tempfile::tempdir().unwrap();
    let mut backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let mut link = Spawn::new(quick(&format!("ws://{}/", backend.addr))).start();
    link.connected(20).await;
    backend.restart("app-test").await;
    let st = link.wait_for(20, "reconnected", |s| is_connected(s) && s.connects == 2).await;
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("closed the connection")), "{st:?}");
    assert_eq!(backend.messages("Handshake").len(), 2);
    assert!(link.engine_events.lock().unwrap().iter().filter(|e| *e == "online true").count() == 2);
    link.stop().await;
}

/// Seconds between the reconnect order and the next connection.
async fn hinted_return(after_s: u64, backoff_max: Duration) -> (Duration, opsagent::link::LinkStatus) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let mut cfg = quick(&format!("ws://{}/", backend.addr));
    cfg.backoff_max = backoff_max;
    let mut link = Spawn::new(cfg).start();
    link.connected(20).await;
    let order = json!({ "after_s": after_s }).to_string();
    std::fs::write(backend.dir.join("recipes/app-test.reconnect.json"), order).unwrap();
    let pause = link.wait_for(10, "reconnecting", |s| matches!(s.state, LinkState::Reconnecting { .. })).await;
    let t0 = Instant::now();
    link.wait_for(after_s + 10, "back", |s| is_connected(s) && s.connects == 2).await;
    let took = t0.elapsed();
    link.stop().await;
    (took, pause)
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_message_is_honoured() {
    let _clock = paced_clock();
    let (took, pause) = hinted_return(3, Duration::from_secs(60)).await;
    // Never before the hint; spread over at most half the hint more.
    assert!(took >= Duration::from_millis(2900) && took <= Duration::from_millis(5000), "{took:?}");
    // The session was not up long enough to reset the count: this is attempt 2.
    assert!(matches!(pause.state, LinkState::Reconnecting { in_s: 3..=4, attempt: 2, .. }), "{pause:?}");
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_hint_beyond_the_cap_is_cut_to_the_cap() {
    let _clock = paced_clock();
    let (took, pause) = hinted_return(3600, Duration::from_secs(2)).await;
    assert!(took <= Duration::from_millis(3000), "{took:?}");
    assert!(matches!(pause.state, LinkState::Reconnecting { in_s: 2, .. }), "{pause:?}");
}

/// A scripted backend that answers the Handshake, then closes with `reason`; returns how
/// long the agent stayed away.
async fn away_after_close(announce: bool, reason: &str) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut link = Spawn::new(quick(&format!("ws://127.0.0.1:{port}/"))).start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    if announce {
        send(&mut ws, json!({"code": "Capabilities", "capabilities": ["reconnect-hint"]})).await;
    }
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    let frame = CloseFrame { code: CloseCode::Restart, reason: reason.to_string().into() };
    ws.close(Some(frame)).await.unwrap();
    let t0 = Instant::now();
    let _ws2 = accept(&listener, 20).await;
    let away = t0.elapsed();
    link.stop().await;
    away
}

#[tokio::test(start_paused = true)]
async fn a_close_reason_hint_is_honoured_only_when_announced() {
    let _clock = paced_clock();
    let away = away_after_close(true, "reconnect after 2 s").await;
    assert!(away >= Duration::from_millis(1950) && away <= Duration::from_millis(3500), "{away:?}");
    // A backend that did not announce reconnect-hint gets plain v1 behaviour.
    let away = away_after_close(false, "reconnect after 2 s").await;
    assert!(away <= Duration::from_millis(900), "{away:?}");
}

#[tokio::test(start_paused = true)]
async fn http_retry_after_on_a_refused_upgrade_is_honoured() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut link = Spawn::new(quick(&format!("ws://127.0.0.1:{port}/"))).start();
    // First attempt: a load balancer in the middle of a deploy.
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let _ = tcp.read(&mut buf).await.unwrap();
    tcp.write_all(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    drop(tcp);
    let t0 = Instant::now();
    let st = link.wait_for(10, "the refusal", |s| s.last_error.is_some()).await;
    assert!(st.last_error.unwrap().contains("refused with HTTP 503 (Retry-After: 2 s)"));
    let _ws = accept(&listener, 10).await;
    let away = t0.elapsed();
    assert!(away >= Duration::from_millis(1900) && away <= Duration::from_millis(3500), "{away:?}");
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_backoff_schedule_is_exact_under_a_paused_clock() {
    // Nothing resolves: every attempt fails at once, so the gaps between lookups are the
    // backoff delays themselves.
    let resolver = MapResolver::new();
    let mut cfg = quick("ws://nowhere.test/");
    cfg.allow_insecure_transport = true;
    cfg.backoff_base = Duration::from_secs(1);
    cfg.backoff_max = Duration::from_secs(16);
    let mut link = Spawn::new(cfg).resolver(resolver.clone()).seed(42).start();
    link.wait_for(100_000, "12 attempts", |_| resolver.lookups("nowhere.test") >= 12).await;
    let calls: Vec<Instant> = resolver.calls.lock().unwrap().iter().take(12).map(|(_, t)| *t).collect();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    let mut expected = Backoff::new(Duration::from_secs(1), Duration::from_secs(16), 42);
    for (i, gap) in gaps.iter().enumerate() {
        let attempt = i as u32 + 1;
        let want = expected.delay(attempt);
        let diff = gap.abs_diff(want);
        assert!(diff <= Duration::from_millis(2), "attempt {attempt}: waited {gap:?}, expected {want:?}; all {gaps:?}");
        let ceiling = Duration::from_secs(1u64 << (attempt - 1)).min(Duration::from_secs(16));
        assert!(*gap <= ceiling + Duration::from_millis(2), "attempt {attempt}: {gap:?} over {ceiling:?}");
    }
    assert!(link.now().last_error.unwrap().contains("nowhere.test: no such test host"));
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_backoff_resets_after_a_healthy_connection() {
    let _clock = paced_clock();
    let base = Duration::from_millis(400);
    let cap = Duration::from_secs(10);
    // A seed for which the delay after the reset (window 0.4 s) is short while the delay
    // without it (window 1.6 s, attempt 3) would be long: the measured gap tells them apart.
    let seed = (0..100_000u64)
        .find(|s| {
            let mut b = Backoff::new(base, cap, *s);
            let (_, _) = (b.delay(1), b.delay(2));
            let mut no_reset = b.clone();
            b.delay(1) < Duration::from_millis(100) && no_reset.delay(3) > Duration::from_millis(1300)
        })
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.backoff_base = base;
    cfg.backoff_max = cap;
    cfg.healthy_after = Duration::from_secs(1);
    let link = Spawn::new(cfg).seed(seed).start();
    // Sessions 1 and 2 are answered and closed at once (not healthy), session 3 is
    // answered and held past healthy_after; each gap is measured up to the next accept.
    let mut ws = accept(&listener, 10).await;
    let mut gaps = Vec::new();
    for hold in [0u64, 0, 1500] {
        assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
        send(&mut ws, recipe(1)).await;
        tokio::time::sleep(Duration::from_millis(hold)).await;
        ws.close(None).await.unwrap();
        let t0 = Instant::now();
        ws = accept(&listener, 10).await;
        gaps.push(t0.elapsed());
    }
    let mut b = Backoff::new(base, cap, seed);
    let expected = [b.delay(1), b.delay(2), b.delay(1)];
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            // On the paced clock a gap is the delay plus the socket hops (1 ms each, up to
            // ~35 ms seen with both cores busy); a sleep twice the delay is caught.
            *gap + Duration::from_millis(20) >= want && *gap <= want + Duration::from_millis(100),
            "{gaps:?} vs {expected:?}"
        );
    }
    // Without the reset the third pause would have been over 1.3 s.
    assert!(gaps[2] < Duration::from_millis(400), "{gaps:?}");
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn app_not_ready_is_retried_on_the_same_connection_with_the_backoff() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.app_not_ready_retry = Duration::from_secs(1);
    let mut link = Spawn::new(cfg).start();
    let mut ws = accept(&listener, 10).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let hello = next_json(&mut ws, 10).await.expect("a Handshake on the same connection");
        assert_eq!(hello["code"], "Handshake");
        times.push(Instant::now());
        send(&mut ws, json!({"code": "AppNotReady"})).await;
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= Duration::from_millis(1300)), "capped at app_not_ready_retry: {gaps:?}");
    let st = link.wait_for(5, "attempt 5", |s| matches!(s.state, LinkState::AppNotReady { attempt: 5, .. })).await;
    assert!(st.describe().contains("app not ready, Handshake again in"), "{}", st.describe());
    // The app becomes ready: the same connection carries on.
    send(&mut ws, recipe(3)).await;
    let st = link.connected(10).await;
    assert_eq!(st.connects, 1);
    assert!(tokio::time::timeout(Duration::from_millis(500), listener.accept()).await.is_err(), "no new connection");
    link.stop().await;
}
