//! Liveness and limits: a half-open connection or a backend that stops answering pings is
//! declared dead within two ping intervals and replaced; an oversized frame is refused
//! from its header alone; binary and garbage frames are counted and survived.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod link_support;

use std::time::Duration;

use futures_util::SinkExt;
use link_support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn fast_pings(url: &str) -> opsagent::link::LinkConfig {
    let mut cfg = quick(url);
    cfg.ping_interval = Duration::from_secs(1);
    cfg
}

#[tokio::test(start_paused = true)]
async fn a_half_open_connection_is_declared_dead_within_two_ping_intervals() {
    let _clock = paced_clock();
    let tmp = tempfile::tempdir().unwrap();
    let backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let relay = Relay::start(backend.addr).await;
    let mut link = Spawn::new(fast_pings(&format!("ws://{}/", relay.addr))).start();
    link.connected(10).await;
    // Pings are answered: no false alarm over several intervals.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let st = link.now();
    assert!(is_connected(&st) && st.connects == 1, "{st:?}");

    // The path goes silent both ways, nothing is closed: a half-open connection.
    relay.freeze();
    let t0 = Instant::now();
    let st = link.wait_for(10, "the dead connection", |s| !is_connected(s)).await;
    let detected = t0.elapsed();
    assert!(detected <= Duration::from_millis(2300), "declared dead after {detected:?}");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("connection declared dead")), "{st:?}");
    // Replaced: a new connection through the relay.
    let st = link.wait_for(10, "a new connection", |s| is_connected(s) && s.connects == 2).await;
    assert_eq!(relay.accepted.load(std::sync::atomic::Ordering::SeqCst), 2, "{st:?}");
    assert_eq!(backend.messages("Handshake").len(), 2);
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_stops_answering_pings_is_replaced() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut link = Spawn::new(fast_pings(&format!("ws://127.0.0.1:{port}/"))).start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    // The backend stops reading: its pongs never go out, the socket stays open.
    let t0 = Instant::now();
    let _ws2 = accept(&listener, 10).await;
    let replaced = t0.elapsed();
    assert!(replaced <= Duration::from_millis(2600), "replaced after {replaced:?}");
    assert!(link.now().last_error.unwrap().contains("no frame from"), "{:?}", link.now());
    drop(ws);
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_oversized_frame_is_refused_from_its_header_and_closed_with_1009() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.max_frame = 1 << 20;
    let mut link = Spawn::new(cfg).start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    // Only the header of a 1 GiB text frame: the payload never comes, so an agent that
    // waited for (or buffered) it would hang; it must refuse at once.
    let mut header = vec![0x81u8, 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    let tcp = ws.get_mut();
    tcp.write_all(&header).await.unwrap();
    tcp.flush().await.unwrap();
    // The agent's answer: a masked close frame with code 1009.
    let mut raw = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut raw)).await.expect("a close frame").unwrap();
    assert_eq!(raw[0], 0x88, "a close frame: {raw:?}");
    let code = u16::from_be_bytes([raw[6] ^ raw[2], raw[7] ^ raw[3]]);
    assert_eq!(code, 1009);
    let st = link.wait_for(5, "the refusal", |s| s.oversized_frames == 1).await;
    assert!(st.last_error.unwrap().contains("over the 1048576-byte limit"));
    assert_eq!(st.bad_frames, 1);
    // And it comes back.
    let mut ws2 = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws2, 10).await.unwrap()["code"], "Handshake");
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn binary_and_garbage_frames_are_counted_and_the_connection_survives() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.max_bad_frames = 5000;
    let mut link = Spawn::new(cfg).start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    for _ in 0..3 {
        ws.send(Message::Binary(vec![0u8, 1, 2, 3].into())).await.unwrap();
    }
    for i in 0..1000 {
        ws.send(Message::Text(format!("{{{{garbage {i}").into())).await.unwrap();
    }
    send(&mut ws, json!({"code": "FromTheFuture"})).await;
    send(&mut ws, json!({"code": "AlsoNew", "x": 1})).await;
    send(&mut ws, json!({"code": "State", "recipe_version": 1})).await;
    send(&mut ws, recipe(2)).await;
    let st = link.wait_for(10, "all counted", |s| s.bad_frames == 1004 && s.unknown_frames == 2).await;
    assert_eq!((st.binary_frames, st.connects), (3, 1), "{st:?}");
    assert!(is_connected(&st));
    // The valid recipe after the garbage went through.
    let events = link.engine_events.clone();
    eventually(10, "recipe 2 at the engine", || events.lock().unwrap().contains(&"recipe 2".to_string())).await;
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn too_many_consecutive_bad_frames_replace_the_connection() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.max_bad_frames = 10;
    let mut link = Spawn::new(cfg).start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    send(&mut ws, recipe(1)).await;
    // Nine bad frames, a good one (the run restarts), then ten bad ones.
    for _ in 0..9 {
        ws.send(Message::Text("nope".into())).await.unwrap();
    }
    // (A repeat of the current recipe: a good frame that keeps the connection, unlike
    // TestAns, which ends the session as in the original.)
    send(&mut ws, recipe(1)).await;
    for _ in 0..10 {
        let _ = ws.send(Message::Text("nope".into())).await;
    }
    // The connection is replaced: a new one is made and opens with a Handshake.
    let mut ws2 = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws2, 10).await.unwrap()["code"], "Handshake");
    let st = link.wait_for(5, "the error", |s| s.last_error.is_some()).await;
    assert!(st.last_error.unwrap().contains("10 consecutive bad frames"));
    assert_eq!(st.bad_frames, 19);
    link.stop().await;
}
