// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Issue #18: the agent as a drop-in for the original, against backends written from the
//! original's own code (its test server `tests/fixtures/original/ws_server.py`, its
//! manager.py), with the real daemon and helper.

mod common;

use std::time::Duration;

use common::scripted::*;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Every text frame within `d`.
async fn frames_for(ws: &mut Ws, d: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = m {
            out.push(serde_json::from_str(&t).unwrap());
        }
    }
    out
}

/// The table of accepted values of the original test server (`valid = {...}` in
/// ws_server.py), read from the copied file: Python literals turned into JSON, its
/// `instance_id()` (the cloud's metadata) the instance id we gave, and `agent_version`
/// — the one value the issue allows to differ — ours.
fn original_table(instance_id: &str, agent_version: &str) -> serde_json::Map<String, Value> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/original/ws_server.py")).unwrap();
    let start = src.find("valid = {").unwrap() + "valid = ".len();
    let end = start + src[start..].find("\n}\n").unwrap() + 2;
    let text = src[start..end]
        .replace("instance_id()", &format!("{instance_id:?}"))
        .replace("[None,", "[null,")
        .replace("\"1.0\"", &format!("{agent_version:?}"));
    let Value::Object(table) = serde_json::from_str(&text).unwrap() else { panic!("{text}") };
    assert_eq!(table["instance_token"], "testtoken", "the fixture is the original's");
    table
}

/// ws_server.py `Actions.test_ans`: every key of the table must match (lists are the
/// accepted alternatives); the first mismatch is the error.
fn original_test_ans(table: &serde_json::Map<String, Value>, d: &Value) -> Value {
    let mut error = Value::Null;
    for (key, accepted) in table {
        let accepted = match accepted {
            Value::Array(a) => a.clone(),
            one => vec![one.clone()],
        };
        let got = d.get(key).cloned().unwrap_or(Value::Null);
        if !accepted.contains(&got) {
            error = json!(format!("Invalid value ({key}), should be {accepted:?}; got '{got}'"));
            break;
        }
    }
    json!({"code": "TestAns", "result": error.is_null(), "error": error})
}

/// Items 5 and 6: the original test server's exchange (Handshake → Test → our Test →
/// TestAns) with the token file its suite wrote (`echo -n "testtoken"`): the answer is
/// accepted with only `agent_version` adjusted, then the agent closes and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_test_server_accepts_our_test_answer_and_the_agent_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    std::fs::write(dir.join("i-orig.token"), "testtoken").unwrap();
    let _helper = start_helper(dir, &socket);
    let agent = start_agent(dir, port, "app-id", "i-orig", &socket, &[]);

    let mut ws = accept(&listener).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["code"], "Handshake");
    assert_eq!(hello["instance_token"], "testtoken", "an existing token is sent as it is");
    let table = original_table("i-orig", hello["agent_version"].as_str().unwrap());
    // Actions.test
    send(&mut ws, json!({"code": "Test"})).await;
    let test = next_json(&mut ws).await;
    assert_eq!(test["code"], "Test");
    assert!(test.as_object().unwrap().contains_key("init_errors"), "{test}");
    let ans = original_test_ans(&table, &test);
    assert_eq!(ans["result"], true, "{ans}");
    send(&mut ws, ans).await;
    // manager.py `__act_test_ans`: stop(), then the daemon loop connects again.
    assert_eq!(next_json_or_close(&mut ws, Duration::from_secs(10)).await, None, "the agent closes the connection");
    let mut again = accept(&listener).await;
    let hello = next_json(&mut again).await;
    assert_eq!((hello["code"].as_str(), hello["instance_token"].as_str()), (Some("Handshake"), Some("testtoken")));
    assert_eq!(std::fs::read_to_string(dir.join("i-orig.token")).unwrap(), "testtoken", "the file is untouched");
    assert!(agent.log_text().contains("test answered; connecting again"));
}

/// Item 5: init_errors ride on the Test answer as on the Handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_answer_carries_the_init_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // A token path that cannot be a file: an init error, as the original's unwritable
    // directories were.
    std::fs::create_dir(dir.join("i-err.token")).unwrap();
    let _helper = start_helper(dir, &socket);
    let _agent = start_agent(dir, port, "app-e", "i-err", &socket, &[]);
    let mut ws = accept(&listener).await;
    let hello = next_json(&mut ws).await;
    let errors = hello["init_errors"].as_str().expect("init errors in the Handshake").to_string();
    assert!(errors.contains("instance token"), "{errors}");
    send(&mut ws, json!({"code": "Test"})).await;
    let test = next_json(&mut ws).await;
    assert_eq!(test["init_errors"], json!(errors));
}

/// Items 1 and 2 (manager.py `__act_update`, `__act_recipe`, worker.py `load`): an
/// AgentUpdate whose `url` is a WebSocket URI and whose version is a number is taken;
/// its failure (here: no `base_remote` to fetch the release from) reaches a backend
/// that announced `upgrade-report` once, as an `UpgradeReport`, and a v1 backend not at
/// all — never as a failing StateLog; `opsagent status` shows it. `"state": []` with a
/// new version re-runs the recipe at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_is_reported_once_and_never_as_a_statelog() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _helper = start_helper(dir, &socket);
    let agent = start_agent(dir, port, "app-u", "i-u", &socket, &[]);
    let state = |v: u64| {
        json!({"code": "RecipeMetadata", "recipe_version": v,
               "state": [{"id": "c", "module": "meta.comment", "parameter": {"comment": "x"}}]})
    };

    let mut ws = accept(&listener).await;
    assert_eq!(next_json(&mut ws).await["code"], "Handshake");
    send(&mut ws, json!({"code": "Capabilities", "capabilities": ["upgrade-report"]})).await;
    send(&mut ws, state(1)).await;
    let log = next_json(&mut ws).await;
    assert_eq!((log["code"].as_str(), log["recipe_version"].as_u64()), (Some("StateLog"), Some(1)));
    // worker.py: an empty list is "no change in states"; the new version re-runs them.
    send(&mut ws, json!({"code": "RecipeMetadata", "recipe_version": 2, "state": []})).await;
    let log = next_json(&mut ws).await;
    assert_eq!((log["id"].as_str(), log["recipe_version"].as_u64()), (Some("c"), Some(2)), "{log}");

    send(&mut ws, json!({"code": "AgentUpdate", "version": 7, "url": "wss://backend.example/agent/"})).await;
    let report = next_json(&mut ws).await;
    assert_eq!(report["code"], "UpgradeReport", "{report}");
    assert_eq!((report["version"].as_str(), report["result"].as_bool()), (Some("7"), Some(false)));
    assert!(report["reason"].as_str().unwrap().contains("base_remote, which is not set"), "{report}");
    let rest = frames_for(&mut ws, Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "once, and no StateLog: {rest:?}");

    // A v1 backend (no Capabilities): the next failure is in the log and the status only.
    drop(ws);
    let mut v1 = accept(&listener).await;
    assert_eq!(next_json(&mut v1).await["code"], "Handshake");
    send(&mut v1, state(2)).await;
    send(&mut v1, json!({"code": "AgentUpdate", "version": "8", "url": "wss://backend.example/agent/"})).await;
    let status = dir.join("i-u.state/status.json");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| v["upgrade_failure"]["version"] == "8")
        }),
        "status shows the failure: {}",
        agent.log_text()
    );
    let out = std::process::Command::new(bin("opsagent"))
        .args(["status", "--state-dir"])
        .arg(dir.join("i-u.state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("upgrade    to 8 FAILED") && text.contains("base_remote"), "{text}");
    let rest = frames_for(&mut v1, Duration::from_secs(3)).await;
    assert!(rest.iter().all(|f| f["code"] != "UpgradeReport" && f["state_result"] != false), "{rest:?}");
    assert!(agent.log_text().contains("did not announce upgrade-report"));
}

/// Item 8: an `/etc/opsagent.conf` as the original's scripts/init.sh wrote it starts the
/// agent (`[salt] delay` minutes become the round delay, the rest warned about once);
/// the instance userdata is re-read at every connection and a changed `APP_ID` resets
/// the token (manager.py `__update_ud`, config.py `token_reset`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_config_starts_the_agent_and_a_changed_app_id_resets_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("helper.sock");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let metadata = Files::start();
    let userdata =
        |app: &str| format!("#!/bin/bash\nexport WS_URI=ws://127.0.0.1:{port}/agent/\nexport APP_ID={app}\n");
    metadata.put("latest/user-data", userdata("app-a").into_bytes());
    let conf = dir.join("opsagent.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nplatform=APT\nenvroot=/opt/visualops/env\nconf_path={state}\nlog_path=/var/log/visualops\n\
             token=/etc/opsagent.token\nuser=root\nwatch=/var/lib/visualops/opsagent/watch\n\
             [userdata]\nws_uri=ws://127.0.0.1:{port}/agent/\napp_id=app-a\nversion=2015-03-31\n\
             base_remote=https://s3.amazonaws.com/visualops\ngpg_key_uri=https://s3.amazonaws.com/k.gpg\n\
             [module]\nroot=/opt/visualops/bootstrap\nname=salt\nmod_repo=\nmod_tag=\n\
             [network]\ninstance_id={base}/latest/meta-data/instance-id\n[salt]\ndelay=1\n",
            state = dir.join("state").display(),
            base = metadata.base,
        ),
    )
    .unwrap();
    let _helper = start_helper(dir, &socket);
    let token_file = dir.join("token");
    let mut cmd = std::process::Command::new(bin("opsagent"));
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .arg("--token-file")
        .arg(&token_file)
        .arg("--helper-socket")
        .arg(&socket)
        .arg("--instance-id")
        .arg("i-conf")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null());
    let agent = spawn_logged("agent-i-conf", cmd, dir);

    let mut ws = accept(&listener).await;
    let hello = next_json(&mut ws).await;
    assert_eq!((hello["code"].as_str(), hello["app_id"].as_str()), (Some("Handshake"), Some("app-a")), "{hello}");
    let first_token = hello["instance_token"].as_str().unwrap().to_string();
    send(
        &mut ws,
        json!({"code": "RecipeMetadata", "recipe_version": 1,
               "state": [{"id": "c", "module": "meta.comment", "parameter": {"comment": "x"}}]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "StateLog");
    let status = dir.join("state/status.json");
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                // Whole seconds left, read a moment after the round ended (a loaded machine
                // shows 59); the default delay would show 600.
                .is_some_and(|v| {
                    v["engine"]["phase"]["next_round_in_s"].as_u64().is_some_and(|s| (50..=60).contains(&s))
                })
        }),
        "[salt] delay=1 is a 60 s round delay: {}",
        std::fs::read_to_string(&status).unwrap_or_default()
    );

    // The userdata now names another app; the next connection says so, with a new token.
    metadata.put("latest/user-data", userdata("app-b").into_bytes());
    drop(ws);
    let mut ws = accept(&listener).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["app_id"], "app-b", "{hello}");
    let second_token = hello["instance_token"].as_str().unwrap();
    assert_ne!(second_token, first_token, "APP_ID changed: token reset");
    assert!(std::fs::read_to_string(&token_file).unwrap().ends_with("app_id=app-b\n"));
    let log = agent.log_text();
    assert_eq!(log.matches("[module] root has no meaning for this agent").count(), 1, "warned once:\n{log}");
    assert!(log.contains("[userdata] gpg_key_uri has no meaning"), "{log}");
}
