// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The daemon's helper client against the real helper binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use opsagent::helper_client::{cancel_pair, Cancel, HelperClient, UnixHelperClient};
use opsagent_proto::catalogue::parse_state;
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::ApplyRequest;
use serde_json::json;

fn req(id: &str, module: &str, params: serde_json::Value) -> ApplyRequest {
    ApplyRequest {
        state_id: StateId::parse(id).unwrap(),
        recipe_version: 1,
        params: parse_state(module, &params).unwrap().params,
    }
}

#[tokio::test]
async fn a_connection_closed_by_the_helper_while_idle_is_reopened_transparently() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let mut cmd = Command::new(bin("opsagent-helper"));
    cmd.arg("--socket").arg(&socket).arg("--idle-timeout").arg("1").stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || socket.exists()));
    let client = UnixHelperClient::new(&socket, "test");
    let file = tmp.path().join("f");
    let r = req("s1", "linux.file", json!({"path": file.display().to_string(), "content": "1"}));
    assert!(client.apply(r.clone(), Cancel::never()).await.unwrap().result);
    // The helper closes idle connections after 1 s; the next request still succeeds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let o = client.apply(r, Cancel::never()).await.unwrap();
    assert!(o.result && o.changes.is_empty(), "{o:?}");
    assert!(client.status().await.is_ok());
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn cancelling_a_running_command_returns_a_cancelled_outcome_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = UnixHelperClient::new(&socket, "test");
    let (handle, cancel) = cancel_pair();
    let r = req("long", "linux.cmd", json!({"cmd": "sleep 300", "cwd": tmp.path().display().to_string()}));
    let started = std::time::Instant::now();
    let run = tokio::spawn(async move { client.apply(r, cancel).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.cancel();
    let o = tokio::time::timeout(Duration::from_secs(15), run).await.expect("prompt").unwrap().unwrap();
    assert!(o.cancelled && !o.result, "{o:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}
