//! The real daemon, configured only through its config file's `[link]` keys: `wss://`
//! with a private CA (`ca_file`), through a CONNECT proxy (`proxy`), heartbeats recorded
//! by the reference backend, and `opsagent status` telling a reconnect and its last error.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;
mod link_support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, start_helper, wait_until, BackendSocket, Proc};
use link_support::{read_jsonl, Proxy, TestCa};

fn heartbeats(events: &Path) -> Vec<serde_json::Value> {
    read_jsonl(events).into_iter().filter(|e| e["event"] == "message" && e["code"] == "Heartbeat").collect()
}

fn status(conf: &Path) -> String {
    let out = Command::new(bin("opsagent")).arg("status").arg("--config").arg(conf).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_over_wss_through_a_proxy_with_heartbeats_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = TestCa::new("daemon test CA");
    let files = ca.issue(&["localhost"], dir, "backend");
    let ca_pem = ca.write_pem(&dir.join("ca.pem"));
    let recipes = dir.join("recipes");
    std::fs::create_dir(&recipes).unwrap();
    let recipe = r#"{"recipe_version": 1, "state": [{"id": "c", "module": "meta.comment", "parameter": {}}]}"#;
    std::fs::write(recipes.join("app-d.json"), recipe).unwrap();
    let statelog = dir.join("statelog.jsonl");
    let events = dir.join("events.jsonl");
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let ev = events.display().to_string();
    let extra = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--events", ev.as_str()];
    // Every backend serves this one socket: the restart below never races for the port.
    let listen = BackendSocket::bind();
    let port = listen.port;
    let mut backend = listen.start(dir, &recipes, &statelog, &extra);
    let proxy =
        Proxy::start(Some("ops:pa55"), HashMap::from([("localhost".to_string(), "127.0.0.1:0".parse().unwrap())]))
            .await;
    let socket = dir.join("helper.sock");
    let _helper = start_helper(dir, &socket);

    let conf = dir.join("opsagent.conf");
    std::fs::write(
        &conf,
        format!(
            "[userdata]\nws_uri = wss://localhost:{port}/agent\napp_id = app-d\ninstance_id = i-d\n\
             [agent]\ntoken_file = {d}/i-d.token\nstate_dir = {d}/state\nhelper_socket = {s}\n\
             [link]\nca_file = {ca}\nproxy = {proxy}\nping_interval = 2\nheartbeat_interval = 1\nbackoff_max = 2\n",
            d = dir.display(),
            s = socket.display(),
            ca = ca_pem.display(),
            proxy = proxy.url(Some("ops:pa55")),
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let mut cmd = Command::new(bin("opsagent"));
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .env("RUST_LOG", "info")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY");
    cmd.stdout(Stdio::null()).stdin(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    let agent = Proc { child: cmd.spawn().unwrap(), name: "agent".into(), log: Some(log) };

    assert!(
        wait_until(Duration::from_secs(30), || heartbeats(&events).len() >= 2),
        "heartbeats expected; events: {:?}\nagent: {}",
        read_jsonl(&events),
        agent.log_text()
    );
    assert_eq!(proxy.tunnels(), vec![format!("localhost:{port}")]);
    let hb = &heartbeats(&events)[0]["message"];
    assert_eq!(hb["instance_id"], "i-d");
    assert!(hb["host"]["disk"]["total_bytes"].as_u64().unwrap() > 0, "{hb}");
    assert!(hb["agent"]["open_fds"].as_u64().unwrap() > 0, "{hb}");
    assert_eq!(hb["recipe_version"], 1, "{hb}");
    assert!(wait_until(Duration::from_secs(10), || status(&conf).contains("connected to wss://localhost")));
    let text = status(&conf);
    eprintln!("opsagent status while connected:\n{text}");
    assert!(text.contains(" since ") && text.contains(" UTC"), "{text}");

    // The backend goes away: status shows that the daemon is trying again, which
    // attempt, and why. The socket stays open while no backend runs (as under systemd
    // socket activation), so after a short countdown the next attempt waits in its
    // backlog: "reconnecting in N s" or "connecting to …", both with the last error.
    backend.kill9();
    let down = |t: &str| {
        (t.contains("reconnecting in") || t.contains("connecting to wss://localhost"))
            && t.contains("(attempt ")
            && t.contains("last error")
    };
    assert!(wait_until(Duration::from_secs(15), || down(&status(&conf))), "{}", status(&conf));
    let text = status(&conf);
    eprintln!("opsagent status while the backend is down:\n{text}");

    // It comes back on the same port: a new tunnel, a new Handshake.
    let _backend2 = listen.start(dir, &recipes, &statelog, &extra);
    assert!(
        wait_until(Duration::from_secs(20), || status(&conf).contains("connected to wss://localhost")),
        "{}\n{}",
        status(&conf),
        agent.log_text()
    );
    assert!(proxy.tunnels().len() >= 2);
    let handshakes =
        read_jsonl(&events).into_iter().filter(|e| e["event"] == "message" && e["code"] == "Handshake").count();
    assert_eq!(handshakes, 2);
}
