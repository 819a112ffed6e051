// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The agent against a scripted backend written here: bad input of every kind gets a
//! clear log line and breaks nothing.

mod common;

use std::time::Duration;

use common::scripted::*;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

async fn statelogs(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = next_json(ws).await;
        if v["code"] == "StateLog" {
            out.push(v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_invalid_recipes_are_logged_and_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _helper = start_helper(dir, &socket);
    let agent = start_agent(dir, port, "app-l", "i-l", &socket, &[]);

    let mut ws = accept(&listener).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["code"], "Handshake");
    assert_eq!(hello["protocol_version"], 1);
    assert_eq!(hello["instance_id"], "i-l");
    assert_eq!(hello["app_id"], "app-l");
    assert_eq!(hello["instance_token"].as_str().unwrap().len(), 64);
    assert!(hello["capabilities"].as_array().unwrap().contains(&json!("statelog-ack")));
    assert!(hello["init_errors"].is_null());

    // Garbage of every kind first.
    ws.send(Message::Text("not json at all".into())).await.unwrap();
    ws.send(Message::Text("[1, 2, 3]".into())).await.unwrap();
    ws.send(Message::Binary(vec![0u8, 1, 2].into())).await.unwrap();
    send(&mut ws, json!({"code": "SomethingNew", "x": 1})).await;
    send(&mut ws, json!({"code": "RecipeMetadata", "recipe_version": 0, "state": []})).await;
    send(&mut ws, json!({"code": "RecipeMetadata", "recipe_version": "seven", "state": []})).await;
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 3, "state": [{"module": "linux.file", "parameter": {}}]}),
    )
    .await;
    send(&mut ws, json!({"code": "AgentUpdate", "version": 5})).await;

    // A valid recipe, with a state of an unknown module and one with a bad parameter.
    let file = dir.join("f");
    // The slow state says it started and then waits for `go`: the invalid recipe below
    // certainly arrives while it runs, however loaded the machine.
    let (started, go) = (dir.join("slow-started"), dir.join("go"));
    let slow = format!(
        "touch {s}; i=0; while [ ! -e {g} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; [ -e {g} ]",
        s = started.display(),
        g = go.display()
    );
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 1, "state": [
            {"id": "slow", "module": "linux.cmd", "parameter": {"cmd": slow, "cwd": dir.display().to_string()}},
            {"id": "f", "module": "linux.file", "parameter": {"path": file.display().to_string(), "content": "x"}},
        ]}),
    )
    .await;
    // While it runs, an invalid recipe must not disturb the round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the slow state never started:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 2, "state": [{"id": "x", "module": "linux.file"}]}),
    )
    .await;
    std::fs::write(&go, "").unwrap();
    let logs = statelogs(&mut ws, 2).await;
    assert_eq!(logs[0]["id"], "slow");
    assert_eq!(logs[0]["state_result"], true, "{}", logs[0]);
    assert_eq!(logs[1]["id"], "f");
    assert_eq!(logs[1]["recipe_version"], 1);

    let log = agent.log_text();
    for needle in [
        "bad frame from the backend ignored",
        "binary frame from the backend refused",
        "unknown message code ignored",
        "positive integer",
        "has no \"id\"",
    ] {
        assert!(log.contains(needle), "agent log lacks {needle:?}:\n{log}");
    }

    // Unknown modules and bad parameters fail their state with the reason.
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 4, "state": [
            {"id": "u", "module": "linux.teleport", "parameter": {}},
        ]}),
    )
    .await;
    let logs = statelogs(&mut ws, 1).await;
    assert_eq!(logs[0]["state_result"], false);
    assert!(logs[0]["state_comment"].as_str().unwrap().contains("unknown module \"linux.teleport\""), "{}", logs[0]);

    // 1,000 garbage frames: the agent gives up on this connection and comes back.
    for _ in 0..1000 {
        if ws.send(Message::Text("{{{".into())).await.is_err() {
            break;
        }
    }
    let mut ws2 = accept(&listener).await;
    assert_eq!(next_json(&mut ws2).await["code"], "Handshake");
    assert!(agent.log_text().contains("consecutive bad frames"));

    // An oversized frame (over the 16 MiB default) is refused; the agent reconnects.
    let big = "x".repeat(17 * 1024 * 1024);
    let _ = ws2.send(Message::Text(big.into())).await;
    let mut ws3 = accept(&listener).await;
    assert_eq!(next_json(&mut ws3).await["code"], "Handshake");
    send(
        &mut ws3,
        json!({"code": "RecipeMetadata", "recipe_version": 9, "state": [
        {"id": "c", "module": "meta.comment", "parameter": {"comment": "still alive"}}]}),
    )
    .await;
    let logs = statelogs(&mut ws3, 1).await;
    assert_eq!((logs[0]["id"].as_str(), logs[0]["state_result"].as_bool()), (Some("c"), Some(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_not_ready_is_retried_on_the_same_connection_and_waits_are_queried() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _helper = start_helper(dir, &socket);
    let agent = start_agent(dir, port, "app-w", "i-w", &socket, &[]);
    let mut ws = accept(&listener).await;
    assert_eq!(next_json(&mut ws).await["code"], "Handshake");
    send(&mut ws, json!({"code": "AppNotReady"})).await;
    // The original agent waited 30 s before repeating the Handshake: the agent's plan, as
    // it logs it, is at most that (the wait itself is timed exactly on a paused clock in
    // link_reconnect.rs; a wall-clock bound here would also time a loaded machine), and the
    // Handshake comes again on the same connection.
    let again = next_json(&mut ws).await;
    assert_eq!(again["code"], "Handshake");
    let log = agent.log_text();
    let planned: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("the Handshake will be repeated"))
        .filter_map(|l| l.split("retry_ms=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(planned.len() == 1 && planned[0] > 0 && planned[0] <= 30_000, "planned {planned:?}:\n{log}");
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 2, "state": [
        {"id": "w", "module": "meta.wait", "parameter": {"state": "@{db.s9}"}},
        {"id": "after", "module": "meta.comment", "parameter": {}}]}),
    )
    .await;
    let q = next_json(&mut ws).await;
    assert_eq!(q, json!({"code": "WaitQuery", "instance_id": "i-w", "app_id": "app-w", "recipe_version": 2}));
    send(&mut ws, json!({"code": "Test"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "Test");
    send(
        &mut ws,
        json!({"code": "WaitList", "recipe_version": 2, "waited": [{"instance_id": "i-db", "state_id": "w"}]}),
    )
    .await;
    let logs = statelogs(&mut ws, 2).await;
    assert_eq!(logs.iter().map(|l| l["id"].as_str().unwrap()).collect::<Vec<_>>(), vec!["w", "after"]);
}
