// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! A real daemon against an original (v1) backend: one that announces no capabilities,
//! acknowledges nothing and keeps every frame it is sent (it does not deduplicate). Here
//! a StateLog sent once must arrive once: a reconnect sends only what was not sent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Every text frame received, with the number of the connection it came on.
type Received = Arc<Mutex<Vec<(usize, Value)>>>;

/// The v1 backend: answers a Handshake with the recipe (no Capabilities), records every
/// frame, and drops its first connection right after the first StateLog.
async fn v1_backend(listener: tokio::net::TcpListener, recipe: Value, got: Received) {
    let mut n = 0;
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        n += 1;
        let (recipe, got) = (recipe.clone(), got.clone());
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                got.lock().unwrap().push((n, v.clone()));
                match v["code"].as_str() {
                    Some("Handshake") => ws.send(Message::text(recipe.to_string())).await.unwrap(),
                    Some("StateLog") if n == 1 => return, // dropped without a close
                    _ => {}
                }
            }
        });
    }
}

#[test]
fn against_a_v1_backend_a_reconnect_resends_nothing() {
    let s = setup("app-v1", |_| json!({}));
    let flag = s.work.join("go");
    let w = s.work.display().to_string();
    let recipe = json!({"code": "RecipeMetadata", "recipe_version": 1, "module": null, "state": [
        {"id": "v1-one", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": w}},
        {"id": "v1-two", "module": "linux.cmd", "parameter": {
            "cmd": format!("i=0; while [ ! -e {f} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e {f} ]", f = flag.display()),
            "cwd": w}},
        {"id": "v1-three", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": w}}
    ]});
    let got: Received = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(v1_backend(listener, recipe, got.clone()));
    let _helper = start_helper(&s.dir, &s.socket);
    let agent = start_agent(&s.dir, port, "app-v1", "i-v1", &s.socket, &["--round-delay", "600"]);

    let frames = |code: &str| -> Vec<(usize, Value)> {
        got.lock().unwrap().iter().filter(|(_, v)| v["code"] == code).cloned().collect()
    };
    // v1-one on the first connection, then the drop and a second Handshake.
    assert!(
        wait_until(Duration::from_secs(60), || frames("Handshake").iter().any(|(n, _)| *n >= 2)),
        "the agent reconnected: {:?}\n{}",
        got.lock().unwrap(),
        agent.log_text()
    );
    std::fs::write(&flag, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || frames("StateLog").iter().any(|(_, v)| v["id"] == "v1-three")),
        "the round finished: {:?}\n{}",
        got.lock().unwrap(),
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let logs: Vec<(usize, String)> =
        frames("StateLog").into_iter().map(|(n, v)| (n, v["id"].as_str().unwrap_or("?").to_string())).collect();
    let ids: Vec<&str> = logs.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["v1-one", "v1-two", "v1-three"], "each StateLog sent once: {logs:?}");
    assert_eq!(logs[0].0, 1, "v1-one went on the first connection: {logs:?}");
    // v1 frames: no extension fields a v1 backend would not know.
    for (_, v) in frames("StateLog") {
        assert!(v.get("seq").is_none() && v.get("offline").is_none() && v.get("ran_at").is_none(), "{v}");
    }
    drop(rt);
}
