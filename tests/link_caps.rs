//! Capabilities: extensions only when both sides announced them. An original v1 backend
//! (it never sends Capabilities) sees v1 traffic only; a backend that announced them
//! gets acknowledged StateLogs and heartbeats, which the reference backend records.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod link_support;

use std::time::Duration;

use link_support::*;
use opsagent::round::{EngineStatus, Phase};
use serde_json::{json, Value};
use tokio::net::TcpListener;

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

async fn texts_for(ws: &mut Ws, d: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(v)) = tokio::time::timeout_at(deadline, next_json(ws, 60)).await {
        out.push(v);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_v1_backend_sees_only_v1_traffic() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.heartbeat_interval = Duration::from_secs(1);
    let spawn = Spawn::new(cfg);
    spawn.outbox.push(statelog(5));
    let link = spawn.start();
    let mut ws = accept(&listener, 10).await;
    let hello = next_json(&mut ws, 10).await.unwrap();
    assert_eq!(hello["code"], "Handshake");
    // The only extension text a v1 backend ever sees: the announcement, in a field it
    // ignores (unknown fields are ignored by protocol v1).
    assert!(hello["capabilities"].is_array());
    send(&mut ws, recipe(1)).await;
    let log = next_json(&mut ws, 10).await.unwrap();
    assert_eq!(
        keys(&log),
        [
            "app_id",
            "code",
            "id",
            "instance_id",
            "recipe_version",
            "state_comment",
            "state_result",
            "state_stdout",
            "stateid"
        ],
        "a v1 StateLog, no seq/offline/ran_at: {log}"
    );
    // No acks to wait for: delivered once written.
    assert_eq!(link.outbox.delivered(), vec![(5, false)]);
    // Extension messages from such a backend are not acted upon.
    send(&mut ws, json!({"code": "StateLogAck", "seq": 99})).await;
    send(&mut ws, json!({"code": "Reconnect", "after_s": 30})).await;
    // Heartbeats are due every second with the extension; none come.
    let later = texts_for(&mut ws, Duration::from_millis(3500)).await;
    assert!(later.is_empty(), "v1 backend got {later:?}");
    let st = link.now();
    assert!(is_connected(&st) && st.connects == 1 && st.heartbeats == 0, "{st:?}");
    assert_eq!(link.outbox.delivered(), vec![(5, false)]);
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_with_the_extensions_gets_acks_and_heartbeats() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = quick(&format!("ws://127.0.0.1:{port}/"));
    cfg.heartbeat_interval = Duration::from_secs(1);
    let spawn = Spawn::new(cfg);
    spawn.outbox.push(statelog(5));
    let link = spawn.start();
    link.engine_status.send_replace(EngineStatus {
        recipe_version: Some(7),
        round: 3,
        phase: Phase::Idle { next_round_in_s: 100 },
        ..Default::default()
    });
    let mut ws = accept(&listener, 10).await;
    assert_eq!(next_json(&mut ws, 10).await.unwrap()["code"], "Handshake");
    send(&mut ws, json!({"code": "Capabilities", "capabilities": ["statelog-ack", "heartbeat"]})).await;
    send(&mut ws, recipe(1)).await;
    let frames = texts_for(&mut ws, Duration::from_millis(2600)).await;
    let log = frames.iter().find(|f| f["code"] == "StateLog").expect("the StateLog");
    assert_eq!((log["seq"].as_u64(), log["offline"].as_bool()), (Some(5), Some(true)), "{log}");
    assert_eq!(log["ran_at"], "2026-12-04T05:00:00.000Z", "{log}");
    // Not delivered until acknowledged.
    assert!(link.outbox.delivered().is_empty());
    let beats: Vec<&Value> = frames.iter().filter(|f| f["code"] == "Heartbeat").collect();
    assert!((2..=4).contains(&beats.len()), "one at once, then one a second: {frames:?}");
    let hb = beats[0];
    assert_eq!((hb["instance_id"].as_str(), hb["app_id"].as_str()), (Some("i-test"), Some("app-test")));
    assert_eq!((hb["recipe_version"].as_u64(), hb["round"].as_u64()), (Some(7), Some(3)));
    assert_eq!(hb["phase"], json!({"phase": "idle", "next_round_in_s": 100}));
    assert_eq!(hb["host"]["load"].as_array().map(Vec::len), Some(3), "{hb}");
    for ptr in [
        "/host/memory/total_bytes",
        "/host/memory/available_bytes",
        "/host/disk/total_bytes",
        "/host/disk/used_bytes",
        "/host/uptime_s",
        "/agent/rss_bytes",
        "/agent/open_fds",
        "/agent/uptime_s",
        "/agent/spool_depth",
    ] {
        assert!(hb.pointer(ptr).and_then(Value::as_u64).is_some(), "{ptr} in {hb}");
    }
    assert_eq!(hb["host"]["disk"]["path"], "/");
    send(&mut ws, json!({"code": "StateLogAck", "seq": 5})).await;
    eventually(10, "the acknowledgement", || !link.outbox.delivered().is_empty()).await;
    assert_eq!(link.outbox.delivered(), vec![(5, true)]);
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_reference_backend_announces_and_records_heartbeats() {
    let _clock = paced_clock();
    let tmp = tempfile::tempdir().unwrap();
    let backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let mut cfg = quick(&format!("ws://{}/", backend.addr));
    cfg.heartbeat_interval = Duration::from_secs(1);
    let mut link = Spawn::new(cfg).start();
    let st = link.connected(10).await;
    assert!(st.backend_capabilities.iter().any(|c| c == "heartbeat"), "{st:?}");
    link.wait_for(10, "two heartbeats", |s| s.heartbeats >= 2).await;
    eventually(10, "two heartbeats recorded", || backend.messages("Heartbeat").len() >= 2).await;
    let recorded = backend.messages("Heartbeat");
    assert!(recorded.len() >= 2, "{:?}", backend.events());
    let m = &recorded[0]["message"];
    assert_eq!(m["instance_id"], "i-test");
    assert!(m["host"]["memory"]["total_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["agent"]["rss_bytes"].as_u64().unwrap() > 0, "{m}");
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_announcing_drift_gets_drift_reports_and_may_ask_for_a_plan() {
    let _clock = paced_clock();
    use opsagent::round::{DriftReport, DriftedState};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let spawn = Spawn::new(quick(&format!("ws://127.0.0.1:{port}/")));
    let board = spawn.drift.clone();
    let mut link = spawn.start();
    let mut ws = accept(&listener, 10).await;
    assert_eq!(
        next_json(&mut ws, 10).await.unwrap()["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| *c == "drift")
            .count(),
        1
    );
    send(&mut ws, json!({"code": "Capabilities", "capabilities": ["drift"]})).await;
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    send(&mut ws, json!({"code": "PlanRequest"})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !link.engine_events.lock().unwrap().iter().any(|e| e == "plan-request") {
        assert!(tokio::time::Instant::now() < deadline, "PlanRequest not handed to the engine");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = DriftReport {
        recipe_version: 1,
        states: vec![DriftedState { id: "conf".into(), changes: vec!["mode 0600 -> 0644".into()] }],
    };
    board.post(report);
    let got = texts_for(&mut ws, Duration::from_secs(3)).await;
    let drift: Vec<&Value> = got.iter().filter(|v| v["code"] == "Drift").collect();
    assert_eq!(drift.len(), 1, "{got:?}");
    assert_eq!(drift[0]["recipe_version"], 1);
    assert_eq!(drift[0]["states"], json!([{"id": "conf", "changes": ["mode 0600 -> 0644"]}]));
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_without_drift_gets_no_drift_and_its_plan_request_is_ignored() {
    let _clock = paced_clock();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let spawn = Spawn::new(quick(&format!("ws://127.0.0.1:{port}/")));
    let board = spawn.drift.clone();
    let mut link = spawn.start();
    let mut ws = accept(&listener, 10).await;
    next_json(&mut ws, 10).await.unwrap();
    send(&mut ws, json!({"code": "Capabilities", "capabilities": ["heartbeat"]})).await;
    send(&mut ws, recipe(1)).await;
    link.connected(10).await;
    send(&mut ws, json!({"code": "PlanRequest"})).await;
    board.post(opsagent::round::DriftReport { recipe_version: 1, states: vec![] });
    let got = texts_for(&mut ws, Duration::from_millis(2500)).await;
    assert!(got.iter().all(|v| v["code"] != "Drift"), "{got:?}");
    assert!(!link.engine_events.lock().unwrap().iter().any(|e| e == "plan-request"));
    assert_eq!(board.take_pending(), None, "the report went to the journal");
    link.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_reference_backend_records_drift_reports_like_statelogs() {
    let _clock = paced_clock();
    use opsagent::round::{DriftReport, DriftedState};
    let tmp = tempfile::tempdir().unwrap();
    let backend = RefBackend::start(tmp.path(), "app-test", None).await;
    let spawn = Spawn::new(quick(&format!("ws://{}/", backend.addr)));
    let board = spawn.drift.clone();
    let mut link = spawn.start();
    let st = link.connected(10).await;
    assert!(st.backend_capabilities.iter().any(|c| c == "drift"), "{st:?}");
    board.post(DriftReport {
        recipe_version: 1,
        states: vec![DriftedState { id: "conf".into(), changes: vec!["mode 0600 -> 0644".into()] }],
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let drift = loop {
        if let Some(e) = backend.events().into_iter().find(|e| e["event"] == "drift") {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no drift event: {:?}", backend.events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(drift["instance_id"], "i-test");
    assert_eq!(drift["recipe_version"], 1);
    assert_eq!(drift["states"], json!([{"id": "conf", "changes": ["mode 0600 -> 0644"]}]));
    link.stop().await;
}
