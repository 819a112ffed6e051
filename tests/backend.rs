//! The reference backend, served for real on 127.0.0.1:0 (in-process, or the binary) and
//! driven by WebSocket clients that speak as agents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use opsagent::backend::{Backend, BackendOptions, TlsFiles};
use opsagent::protocol::{parse_inbound, Identity, Outbound, StateLog};
use opsagent::recipe::Recipe;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous: CI machines can be slow. Nothing waits this long when things work.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("recipes")).unwrap();
        Self { dir }
    }

    fn recipes(&self) -> PathBuf {
        self.dir.path().join("recipes")
    }

    fn statelog(&self) -> PathBuf {
        self.dir.path().join("statelog.jsonl")
    }

    fn events(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    fn opts(&self) -> BackendOptions {
        BackendOptions {
            events: Some(self.events()),
            poll: POLL,
            ..BackendOptions::new(self.recipes(), self.statelog())
        }
    }

    async fn start(&self) -> Backend {
        self.start_with(self.opts()).await
    }

    async fn start_with(&self, opts: BackendOptions) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::start(listener, opts).await.unwrap()
    }

    /// Writes a recipe-directory file whole (temporary file, then rename), so that a poll
    /// never sees half of it.
    fn write(&self, name: &str, content: &str) {
        let tmp = self.recipes().join(format!(".tmp-{name}"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.recipes().join(name)).unwrap();
    }

    fn write_json(&self, name: &str, v: &Value) {
        self.write(name, &v.to_string());
    }

    fn statelog_lines(&self) -> Vec<Value> {
        json_lines(&self.statelog())
    }

    fn events_lines(&self) -> Vec<Value> {
        json_lines(&self.events())
    }

    /// Waits until an event matching `pick` is recorded.
    async fn event(&self, pick: impl Fn(&Value) -> bool) -> Value {
        eventually("an event", || self.events_lines().into_iter().find(|e| pick(e))).await
    }
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display())))
        .collect()
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let give_up = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn recipe(states: Value) -> Value {
    json!({"component": {"init": {"state": states}}})
}

fn comment(id: &str) -> Value {
    json!({"id": id, "module": "meta.comment", "parameter": {"comment": id}})
}

fn wait_on(id: &str, refs: Value) -> Value {
    json!({"id": id, "module": "meta.wait", "parameter": {"state": refs}})
}

fn who(app: &str, instance: &str, version: &str) -> Identity {
    Identity {
        instance_id: instance.into(),
        app_id: app.into(),
        instance_token: "secret-token".into(),
        agent_version: version.into(),
    }
}

const ALL_CAPS: &[&str] = &["statelog-ack", "reconnect-hint", "heartbeat", "upgrade-report", "drift", "fetch-logs"];

/// A client speaking as an agent, with the agent's own message builders.
struct Agent {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    who: Identity,
}

impl Agent {
    async fn connect(url: &str, who: Identity) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
        Self { ws, who }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn send_out(&mut self, m: Outbound) {
        let v = m.to_json(&self.who);
        self.send(v).await;
    }

    /// The next frame of any kind.
    async fn next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("connection ended")
            .expect("connection failed")
    }

    /// The next text frame, checked against the agent's own parser.
    async fn recv(&mut self) -> Value {
        loop {
            match self.next().await {
                Message::Text(t) => {
                    parse_inbound(t.as_str()).unwrap_or_else(|e| panic!("the agent cannot parse {t}: {e}"));
                    return serde_json::from_str(t.as_str()).unwrap();
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn expect(&mut self, code: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["code"], code, "{v}");
        v
    }

    async fn handshake(&mut self, caps: &[&str]) {
        let capabilities = caps.iter().map(|c| c.to_string()).collect();
        self.send_out(Outbound::Handshake { init_errors: None, capabilities }).await;
        if !caps.is_empty() {
            let v = self.expect("Capabilities").await;
            assert_eq!(v["capabilities"], json!(ALL_CAPS));
        }
    }

    /// Handshake answered with a recipe: its (version, states).
    async fn handshake_for_recipe(&mut self, caps: &[&str]) -> (u64, Vec<Value>) {
        self.handshake(caps).await;
        let v = self.expect("RecipeMetadata").await;
        (v["recipe_version"].as_u64().unwrap(), v["state"].as_array().unwrap().clone())
    }

    async fn state_log(&mut self, version: u64, state: &str, ok: bool, seq: Option<u64>) {
        let log = StateLog {
            recipe_version: version,
            state_id: state.into(),
            result: ok,
            comment: Some("done".into()),
            stdout: None,
            seq,
            offline: false,
            ran_at: None,
        };
        self.send_out(Outbound::StateLog(log)).await;
    }

    /// Proves that nothing was queued for this agent: the answer to a Test is the very
    /// next frame.
    async fn quiet(&mut self) {
        self.send(json!({"code": "Test"})).await;
        let v = self.recv().await;
        assert_eq!(v, json!({"code": "TestAns", "result": true, "error": null}), "unexpected frame");
    }

    async fn wait_list(&mut self, version: u64) -> Value {
        self.send_out(Outbound::WaitQuery { recipe_version: version }).await;
        let v = self.expect("WaitList").await;
        assert_eq!(v["recipe_version"], version);
        v["waited"].clone()
    }
}

fn ids(states: &[Value]) -> Vec<&str> {
    states.iter().map(|s| s["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn handshake_is_answered_with_the_recipe_file_states() {
    let env = Env::new();
    // The original test suite's recipes, each as an app.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/visualops-basic");
    let mut apps = Vec::new();
    for e in std::fs::read_dir(&fixtures).unwrap_or_else(|e| panic!("{}: {e}", fixtures.display())) {
        let path = e.unwrap().path();
        let app = path.file_stem().unwrap().to_str().unwrap().replace('.', "-");
        std::fs::copy(&path, env.recipes().join(format!("{app}.json"))).unwrap();
        apps.push((app, path));
    }
    assert!(apps.len() >= 36, "the original basic recipes are in {}", fixtures.display());
    env.write_json(
        "app-1.json",
        &json!({"recipe_version": 3, "module": {"repo": "https://x/salt.git", "tag": "v1"},
                "state": [comment("s1"), {"id": "s2", "module": "linux.file", "parameter": {"path": "/tmp/x"}}]}),
    );
    let backend = env.start().await;

    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake(ALL_CAPS).await;
    let v = agent.expect("RecipeMetadata").await;
    assert_eq!(v["recipe_version"], 3);
    assert_eq!(v["module"], json!({"repo": "https://x/salt.git", "tag": "v1"}));
    assert_eq!(v["state"][1], json!({"id": "s2", "module": "linux.file", "parameter": {"path": "/tmp/x"}}));
    // A second Handshake on the live connection (here from a v1 agent: no capabilities)
    // is harmless: the recipe again.
    agent.handshake(&[]).await;
    let v = agent.expect("RecipeMetadata").await;
    assert_eq!((v["recipe_version"].as_u64(), ids(v["state"].as_array().unwrap())), (Some(3), vec!["s1", "s2"]));
    agent.quiet().await;

    for (app, path) in apps {
        let mut agent = Agent::connect(&backend.url(), who(&app, "i-2", "1.2.0")).await;
        agent.handshake(&[]).await;
        let v = agent.recv().await;
        match Recipe::load_file(&path) {
            Ok(r) => {
                assert_eq!(v["code"], "RecipeMetadata", "{}: {v}", path.display());
                assert_eq!(v["recipe_version"], 1);
                let expected: Vec<Value> = r
                    .states
                    .iter()
                    .map(|s| json!({"id": s.id.as_str(), "module": s.module, "parameter": s.parameter}))
                    .collect();
                assert_eq!(v["state"], json!(expected), "{}", path.display());
            }
            Err(e) => assert_eq!(v["code"], "AppNotReady", "{}: {e}", path.display()),
        }
    }
    backend.shutdown().await;
}

#[tokio::test]
async fn an_unknown_app_is_not_ready_until_its_file_is_valid() {
    let env = Env::new();
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-new", "i-1", "1.2.0")).await;
    agent.handshake(ALL_CAPS).await;
    agent.expect("AppNotReady").await;
    // An invalid file is no better.
    env.write("app-new.json", r#"{"state": [{"module": "meta.comment", "parameter": {}}]}"#);
    agent.handshake(ALL_CAPS).await;
    agent.expect("AppNotReady").await;
    env.event(|e| e["event"] == "recipe_rejected" && e["app_id"] == "app-new").await;
    // The agent retries on the same connection and gets the recipe once the file is there.
    env.write_json("app-new.json", &recipe(json!([comment("s1")])));
    let (version, states) = agent.handshake_for_recipe(ALL_CAPS).await;
    assert_eq!((version, ids(&states)), (1, vec!["s1"]));
    agent.quiet().await;
    backend.shutdown().await;
}

#[tokio::test]
async fn statelogs_are_appended_one_line_each() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1"), comment("s2")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(&[]).await;
    agent.state_log(1, "s1", true, None).await;
    agent.state_log(1, "s2", false, None).await;
    // The original documentation's spelling, and a seq from an agent that did not
    // announce statelog-ack: recorded, not acknowledged.
    agent
        .send(json!({"code": "StateLog", "instance_id": "i-1", "app_id": "app-1", "recipe_version": 1,
                     "stateid": "s2", "state_result": true, "state_comment": null, "state_stdout": null, "seq": 5}))
        .await;
    agent.quiet().await;
    let lines = eventually("three statelog lines", || Some(env.statelog_lines()).filter(|l| l.len() == 3)).await;
    assert_eq!(lines[0]["id"], "s1");
    assert_eq!(lines[0]["stateid"], "s1");
    assert_eq!(lines[0]["state_result"], true);
    assert_eq!(lines[0]["instance_id"], "i-1");
    assert_eq!(lines[1]["state_result"], false);
    assert_eq!(lines[2]["stateid"], "s2");
    for l in &lines {
        let at = l["received_at"].as_str().unwrap();
        assert!(at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
    }
    // StateLogs are not events.
    assert!(env.events_lines().iter().all(|e| e["code"] != "StateLog"));
    backend.shutdown().await;
}

#[tokio::test]
async fn resent_statelogs_are_acknowledged_but_recorded_once_even_across_a_restart() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1"), comment("s2")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    for seq in [1, 2, 1] {
        agent.state_log(1, if seq == 1 { "s1" } else { "s2" }, true, Some(seq)).await;
        assert_eq!(agent.expect("StateLogAck").await["seq"], seq);
    }
    // Sequence numbers are per instance.
    let mut other = Agent::connect(&backend.url(), who("app-1", "i-2", "1.2.0")).await;
    other.handshake_for_recipe(ALL_CAPS).await;
    other.state_log(1, "s1", true, Some(1)).await;
    other.expect("StateLogAck").await;
    assert_eq!(env.statelog_lines().len(), 3);

    backend.shutdown().await;
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    agent.state_log(1, "s2", true, Some(2)).await;
    assert_eq!(agent.expect("StateLogAck").await["seq"], 2);
    agent.state_log(1, "s1", true, Some(3)).await;
    assert_eq!(agent.expect("StateLogAck").await["seq"], 3);
    let lines = env.statelog_lines();
    let seqs: Vec<(&str, u64)> =
        lines.iter().map(|l| (l["instance_id"].as_str().unwrap(), l["seq"].as_u64().unwrap())).collect();
    assert_eq!(seqs, vec![("i-1", 1), ("i-1", 2), ("i-2", 1), ("i-1", 3)]);
    backend.shutdown().await;
}

#[tokio::test]
async fn an_edited_recipe_is_pushed_with_the_next_version() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    assert_eq!(agent.handshake_for_recipe(ALL_CAPS).await.0, 1);
    let mut other_app = Agent::connect(&backend.url(), who("app-2", "i-9", "1.2.0")).await;
    other_app.handshake(&[]).await;
    other_app.expect("AppNotReady").await;

    env.write_json("app-1.json", &recipe(json!([comment("s1"), comment("s2")])));
    let v = agent.expect("RecipeMetadata").await;
    assert_eq!((v["recipe_version"].as_u64(), ids(v["state"].as_array().unwrap())), (Some(2), vec!["s1", "s2"]));

    // The same content laid out differently is no new recipe: a Handshake (which re-reads
    // the file) still gets version 2, and the first agent got no push.
    env.write("app-1.json", &serde_json::to_string_pretty(&recipe(json!([comment("s1"), comment("s2")]))).unwrap());
    let mut late = Agent::connect(&backend.url(), who("app-1", "i-2", "1.2.0")).await;
    assert_eq!(late.handshake_for_recipe(&[]).await.0, 2);
    agent.quiet().await;

    // A file's own higher recipe_version is taken.
    env.write_json("app-1.json", &json!({"recipe_version": 10, "state": [comment("s3")]}));
    let v = agent.expect("RecipeMetadata").await;
    assert_eq!((v["recipe_version"].as_u64(), ids(v["state"].as_array().unwrap())), (Some(10), vec!["s3"]));
    assert_eq!(late.expect("RecipeMetadata").await["recipe_version"], 10);
    other_app.quiet().await;
    backend.shutdown().await;
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_previous_version_and_pushes_nothing() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;

    for (n, broken) in [
        r#"{"component": {"init": {"state": [{"id": "s1", "module": "meta.comment"}]}}}"#,
        r#"{"component": "#,
        r#"{"recipe_version": 0, "state": []}"#,
    ]
    .into_iter()
    .enumerate()
    {
        env.write("app-1.json", broken);
        let rejected = eventually("the rejection", || {
            let all: Vec<Value> = env.events_lines().into_iter().filter(|e| e["event"] == "recipe_rejected").collect();
            all.get(n).cloned()
        })
        .await;
        assert!(rejected["file"].as_str().unwrap().ends_with("app-1.json"), "{rejected}");
        assert!(!rejected["reason"].as_str().unwrap().is_empty());
        assert_eq!(rejected["serving"], 1);
        agent.quiet().await;
        let mut late = Agent::connect(&backend.url(), who("app-1", "i-2", "1.2.0")).await;
        let (version, states) = late.handshake_for_recipe(&[]).await;
        assert_eq!((version, ids(&states)), (1, vec!["s1"]));
    }
    // Fixed: the next version.
    env.write_json("app-1.json", &recipe(json!([comment("s2")])));
    assert_eq!(agent.expect("RecipeMetadata").await["recipe_version"], 2);
    backend.shutdown().await;
}

#[tokio::test]
async fn a_restart_serves_unchanged_recipes_under_the_same_version() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    env.write_json("app-1.json", &recipe(json!([comment("s2")])));
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    assert_eq!(agent.handshake_for_recipe(&[]).await.0, 2);
    backend.shutdown().await;

    // Unchanged: same version.
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    let (version, states) = agent.handshake_for_recipe(&[]).await;
    assert_eq!((version, ids(&states)), (2, vec!["s2"]));
    backend.shutdown().await;

    // Changed while the backend was down: the next version, never an earlier one.
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    assert_eq!(agent.handshake_for_recipe(&[]).await.0, 3);
    backend.shutdown().await;

    // Broken while the backend was down: the last valid recipe, same version.
    env.write("app-1.json", "{");
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    let (version, states) = agent.handshake_for_recipe(&[]).await;
    assert_eq!((version, ids(&states)), (3, vec!["s1"]));
    backend.shutdown().await;
}

#[tokio::test]
async fn a_wait_is_released_when_the_remote_state_succeeds() {
    let env = Env::new();
    env.write_json("web.json", &recipe(json!([comment("web-1"), comment("web-2")])));
    env.write_json(
        "app-b.json",
        &recipe(json!([
            comment("b-1"),
            wait_on("b-wait", json!("@{web.web-1}")),
            wait_on("b-both", json!(["@{i-a.web-1}", "@{*.web-2}"])),
        ])),
    );
    let backend = env.start().await;
    let mut b = Agent::connect(&backend.url(), who("app-b", "i-b", "1.2.0")).await;
    b.handshake_for_recipe(ALL_CAPS).await;
    assert_eq!(b.wait_list(1).await, json!([]));

    let mut a = Agent::connect(&backend.url(), who("web", "i-a", "1.2.0")).await;
    a.handshake_for_recipe(&[]).await;
    // A failure, or a success under another recipe version, releases nothing.
    a.state_log(1, "web-1", false, None).await;
    a.state_log(7, "web-1", true, None).await;
    a.quiet().await;
    b.quiet().await;

    a.state_log(1, "web-1", true, None).await;
    let v = b.expect("State").await;
    assert_eq!((v["recipe_version"].as_u64(), v["stateid"].as_str()), (Some(1), Some("b-wait")));
    b.quiet().await;
    assert_eq!(b.wait_list(1).await, json!([{"instance_id": "i-a", "state_id": "b-wait"}]));

    a.state_log(1, "web-2", true, None).await;
    let v = b.expect("State").await;
    assert_eq!(v["stateid"], "b-both");
    assert_eq!(
        b.wait_list(1).await,
        json!([{"instance_id": "i-a", "state_id": "b-wait"}, {"instance_id": "i-a", "state_id": "b-both"}])
    );
    // Another version of B's recipe has had nothing released.
    assert_eq!(b.wait_list(2).await, json!([]));

    // A new recipe for web: web-1 must succeed again under the new version for a new
    // version of B's recipe.
    env.write_json("web.json", &recipe(json!([comment("web-1"), comment("web-2"), comment("web-3")])));
    assert_eq!(a.expect("RecipeMetadata").await["recipe_version"], 2);
    env.write_json("app-b.json", &recipe(json!([wait_on("b-wait", json!("@{web.web-1}"))])));
    assert_eq!(b.expect("RecipeMetadata").await["recipe_version"], 2);
    b.quiet().await;
    a.state_log(2, "web-1", true, None).await;
    assert_eq!(b.expect("State").await["recipe_version"], 2);

    // Releases are rebuilt from the statelog after a restart; an instance heard of for
    // the first time since is told at its Handshake.
    backend.shutdown().await;
    let backend = env.start().await;
    let mut b = Agent::connect(&backend.url(), who("app-b", "i-b", "1.2.0")).await;
    b.handshake_for_recipe(&[]).await;
    assert_eq!(b.expect("State").await["stateid"], "b-wait");
    assert_eq!(b.wait_list(2).await, json!([{"instance_id": "i-a", "state_id": "b-wait"}]));
    backend.shutdown().await;
}

#[tokio::test]
async fn agent_updates_are_ordered_by_file_and_on_handshake() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut old = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    old.handshake_for_recipe(ALL_CAPS).await;
    let mut new = Agent::connect(&backend.url(), who("app-1", "i-2", "1.3.0")).await;
    new.handshake_for_recipe(&[]).await;
    let mut elsewhere = Agent::connect(&backend.url(), who("app-2", "i-3", "1.2.0")).await;
    elsewhere.handshake(&[]).await;
    elsewhere.expect("AppNotReady").await;

    env.write_json("app-1.update.json", &json!({"version": "1.3.0", "url": "https://dl.example/1.3.0/opsagent.tgz"}));
    let v = old.expect("AgentUpdate").await;
    assert_eq!(v, json!({"code": "AgentUpdate", "version": "1.3.0", "url": "https://dl.example/1.3.0/opsagent.tgz"}));
    new.quiet().await;
    elsewhere.quiet().await;

    // An agent that was not connected when the order was given gets it on Handshake.
    let mut stopped = Agent::connect(&backend.url(), who("app-1", "i-4", "1.1.0")).await;
    stopped.handshake_for_recipe(&[]).await;
    assert_eq!(stopped.expect("AgentUpdate").await["version"], "1.3.0");
    stopped.quiet().await;
    new.handshake_for_recipe(&[]).await;
    new.quiet().await;

    // A changed order goes to everyone not on that version.
    env.write_json("app-1.update.json", &json!({"version": "1.4.0", "url": "https://dl.example/1.4.0/opsagent.tgz"}));
    for agent in [&mut old, &mut new, &mut stopped] {
        assert_eq!(agent.expect("AgentUpdate").await["version"], "1.4.0");
    }
    // Withdrawn: no more orders on Handshake (which re-reads the app's files).
    std::fs::remove_file(env.recipes().join("app-1.update.json")).unwrap();
    let mut later = Agent::connect(&backend.url(), who("app-1", "i-5", "1.1.0")).await;
    later.handshake_for_recipe(&[]).await;
    later.quiet().await;
    backend.shutdown().await;
}

#[tokio::test]
async fn garbage_frames_are_ignored() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start_with(BackendOptions { max_frame_bytes: 64 * 1024, ..env.opts() }).await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.ws.send(Message::text("not json")).await.unwrap();
    agent.ws.send(Message::text("[1, 2]")).await.unwrap();
    agent.send(json!({"code": 5})).await;
    agent.send(json!({"code": "Brand-New", "x": 1})).await;
    agent.send(json!({"code": "StateLog"})).await;
    agent.send(json!({"code": "WaitQuery"})).await;
    agent.send(json!({"code": "Handshake", "app_id": "../../etc/passwd", "instance_id": "i-1"})).await;
    agent.expect("AppNotReady").await;
    agent.ws.send(Message::binary(vec![0u8, 159, 146, 150])).await.unwrap();
    agent.ws.send(Message::Ping(b"hello".to_vec().into())).await.unwrap();
    match agent.next().await {
        Message::Pong(p) => assert_eq!(p.as_ref(), b"hello"),
        other => panic!("expected a pong, got {other:?}"),
    }
    agent.quiet().await;
    agent.handshake_for_recipe(&[]).await;
    agent.quiet().await;
    env.event(|e| e["event"] == "binary" && e["len"] == 4).await;
    env.event(|e| e["event"] == "invalid" && e["frame"] == "not json").await;
    env.event(|e| e["event"] == "message" && e["code"] == "Brand-New").await;

    // An oversized frame ends that connection only.
    let _ = agent.ws.send(Message::text("x".repeat(100 * 1024))).await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match agent.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the oversized frame did not end the connection");
    let mut again = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    again.handshake_for_recipe(&[]).await;
    backend.shutdown().await;
}

#[tokio::test]
async fn events_record_connections_handshakes_and_heartbeats() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut agent = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    agent.send_out(Outbound::Heartbeat(json!({"state": "idle"}))).await;
    agent.send_out(Outbound::WaitQuery { recipe_version: 1 }).await;
    agent.expect("WaitList").await;
    agent.ws.close(None).await.unwrap();
    let close = env.event(|e| e["event"] == "close").await;
    assert_eq!(close["instance_id"], "i-1");
    let events = env.events_lines();
    let kinds: Vec<String> = events
        .iter()
        .filter(|e| e["event"] != "recipe_loaded")
        .map(|e| {
            format!(
                "{}{}",
                e["event"].as_str().unwrap(),
                e["code"].as_str().map(|c| format!(":{c}")).unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(kinds, ["open", "message:Handshake", "pinned", "message:Heartbeat", "message:WaitQuery", "close"]);
    let hs = &events.iter().find(|e| e["code"] == "Handshake").unwrap()["message"];
    assert_eq!(hs["instance_id"], "i-1");
    assert_eq!(hs["instance_token"], "<redacted>");
    assert_eq!(events.iter().find(|e| e["code"] == "Heartbeat").unwrap()["message"]["state"], "idle");
    assert!(events.iter().all(|e| e["at"].as_str().is_some_and(|t| t.ends_with('Z'))));
    backend.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_order_closes_hinted_agents_with_1012() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let backend = env.start().await;
    let mut hinted = Agent::connect(&backend.url(), who("app-1", "i-1", "1.2.0")).await;
    hinted.handshake_for_recipe(ALL_CAPS).await;
    let mut v1 = Agent::connect(&backend.url(), who("app-1", "i-2", "1.2.0")).await;
    v1.handshake_for_recipe(&[]).await;

    env.write_json("app-1.reconnect.json", &json!({"after_s": 3}));
    assert_eq!(hinted.expect("Reconnect").await, json!({"code": "Reconnect", "after_s": 3}));
    match hinted.next().await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Restart);
            assert_eq!(f.reason.as_str(), "reconnect after 3 s");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // The agent's close reply goes out as it reads on; then the connection ends.
    let end = tokio::time::timeout(WAIT, hinted.ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    eventually("the order file removed", || Some(()).filter(|()| !env.recipes().join("app-1.reconnect.json").exists()))
        .await;
    v1.quiet().await;
    backend.shutdown().await;
}

/// Kills the child when the test ends, however it ends.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test]
async fn the_binary_serves_wss_with_a_self_signed_certificate() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (env.dir.path().join("cert.pem"), env.dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    // The library refuses bad files up front.
    let bad = BackendOptions { tls: Some(TlsFiles { cert: key_pem.clone(), key: key_pem.clone() }), ..env.opts() };
    assert!(Backend::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), bad).await.is_err());

    let mut child = Child(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_opsagent-backend"))
            .args(["--listen", "127.0.0.1:0", "--poll-ms", "50"])
            .arg("--recipe-dir")
            .arg(env.recipes())
            .arg("--statelog")
            .arg(env.statelog())
            .arg("--events")
            .arg(env.events())
            .arg("--tls-cert")
            .arg(&cert_pem)
            .arg("--tls-key")
            .arg(&key_pem)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    let mut lines = tokio::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("no listening line");
    let addr = line.strip_prefix("opsagent-backend listening on ").unwrap_or_else(|| panic!("{line:?}"));
    let port = addr.rsplit(':').next().unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(client));
    let url = format!("wss://127.0.0.1:{port}");
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, false, Some(connector)),
    )
    .await
    .unwrap()
    .unwrap();
    let mut agent = Agent { ws, who: who("app-1", "i-1", "1.2.0") };
    let (version, states) = agent.handshake_for_recipe(ALL_CAPS).await;
    assert_eq!((version, ids(&states)), (1, vec!["s1"]));
    agent.state_log(1, "s1", true, Some(1)).await;
    agent.expect("StateLogAck").await;

    // A client that does not trust the certificate gets nowhere; plain ws neither.
    let untrusting = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url.as_str())).await.unwrap();
    assert!(untrusting.is_err());
    let plain =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}"))).await.unwrap();
    assert!(plain.is_err());
    agent.quiet().await;

    child.0.start_kill().unwrap();
    tokio::time::timeout(WAIT, child.0.wait()).await.unwrap().unwrap();
}

// ---------------------------------------------------------------- who may say what

/// The binary with `extra` arguments on 127.0.0.1:0 (unless `extra` says `--listen`);
/// returns it and its `ws://` URL.
async fn spawn_binary(env: &Env, extra: &[&str]) -> (Child, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_opsagent-backend"));
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--poll-ms", "50"])
        .arg("--recipe-dir")
        .arg(env.recipes())
        .arg("--statelog")
        .arg(env.statelog())
        .arg("--events")
        .arg(env.events())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = Child(cmd.spawn().unwrap());
    let mut lines = tokio::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("no listening line");
    let addr = line.strip_prefix("opsagent-backend listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    (child, format!("ws://{addr}"))
}

/// `opsagent-backend instances ARGS… --statelog STATELOG`: its stdout.
fn instances(env: &Env, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opsagent-backend"))
        .arg("instances")
        .args(args)
        .arg("--statelog")
        .arg(env.statelog())
        .output()
        .unwrap();
    assert!(out.status.success(), "instances {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn with_token(mut who: Identity, token: &str) -> Identity {
    who.instance_token = token.into();
    who
}

impl Agent {
    /// The connection is closed by the backend with `code` and a reason, and sent no
    /// text frame before.
    async fn refused(&mut self, code: CloseCode) -> String {
        loop {
            match self.next().await {
                Message::Close(Some(f)) => {
                    assert_eq!(f.code, code, "{f:?}");
                    return f.reason.to_string();
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected the connection refused, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_second_client_with_another_token_gets_no_recipe_and_is_logged() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("secret-state")])));
    let (_backend, url) = spawn_binary(&env, &[]).await;
    let mut owner = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    owner.handshake_for_recipe(ALL_CAPS).await;
    env.event(|e| e["event"] == "pinned" && e["instance_id"] == "i-1").await;

    // Same app, same instance, another token: closed, never a recipe.
    let mut thief = Agent::connect(&url, with_token(who("app-1", "i-1", "1.2.0"), "guessed")).await;
    thief.send_out(Outbound::Handshake { init_errors: None, capabilities: vec![] }).await;
    let reason = thief.refused(CloseCode::Policy).await;
    assert_eq!(reason, "instance_token does not match the pinned one");
    let refused = env.event(|e| e["event"] == "handshake_refused").await;
    assert_eq!((&refused["app_id"], &refused["instance_id"]), (&json!("app-1"), &json!("i-1")));
    assert!(refused["reason"].as_str().unwrap().contains("pinned to another instance_token"), "{refused}");
    assert!(refused["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{refused}");
    // No token at all is no better.
    let mut bare = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    bare.send(json!({"code": "Handshake", "app_id": "app-1", "instance_id": "i-1"})).await;
    assert_eq!(bare.refused(CloseCode::Policy).await, "no instance_token");

    // Without a Handshake, a StateLog in i-1's name is not recorded.
    let mut forger = Agent::connect(&url, with_token(who("app-1", "i-1", "1.2.0"), "guessed")).await;
    forger.state_log(1, "secret-state", true, Some(1)).await;
    forger.quiet().await;
    env.event(|e| e["event"] == "refused" && e["code"] == "StateLog").await;
    assert!(env.statelog_lines().is_empty());

    // The owner reconnects with its token as before.
    let mut again = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    again.handshake_for_recipe(ALL_CAPS).await;
    again.state_log(1, "secret-state", true, Some(1)).await;
    again.expect("StateLogAck").await;

    // The operator sees the pin (hash only) and can reset it: then the next token pins.
    let list = instances(&env, &["list", "--json"]);
    let pin: Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&pin["app_id"], &pin["instance_id"], &pin["source"]),
        (&json!("app-1"), &json!("i-1"), &json!("first-use"))
    );
    assert!(!list.contains("secret-token"));
    assert!(instances(&env, &["forget", "--app", "app-1", "--instance", "i-1"]).contains("forgot"));
    let mut successor = Agent::connect(&url, with_token(who("app-1", "i-1", "1.2.0"), "new-token")).await;
    successor.handshake_for_recipe(&[]).await;
    let mut old = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    old.send_out(Outbound::Handshake { init_errors: None, capabilities: vec![] }).await;
    old.refused(CloseCode::Policy).await;
}

#[tokio::test]
async fn an_app_that_requires_pre_registration_serves_registered_instances_only() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    env.write_json("app-2.json", &recipe(json!([comment("s1")])));
    let (_backend, url) = spawn_binary(&env, &["--require-pin", "app-1"]).await;
    let mut stranger = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    stranger.send_out(Outbound::Handshake { init_errors: None, capabilities: vec![] }).await;
    assert_eq!(stranger.refused(CloseCode::Policy).await, "instance not registered");
    env.event(|e| e["event"] == "handshake_refused" && e["reason"].as_str().unwrap().contains("not registered")).await;
    assert!(instances(&env, &["list"]).is_empty(), "a refused Handshake pins nothing");
    // Other apps still trust on first use.
    Agent::connect(&url, who("app-2", "i-2", "1.2.0")).await.handshake_for_recipe(&[]).await;

    // Registered from the agent's token file: served, and no other token is.
    let token = env.dir.path().join("i-1.token");
    std::fs::write(&token, "secret-token\napp-1\n").unwrap();
    let out = instances(&env, &["pin", "--app", "app-1", "--instance", "i-1", "--token-file", token.to_str().unwrap()]);
    assert!(out.contains("pinned i-1"), "{out}");
    let mut agent = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(&[]).await;
    let mut other = Agent::connect(&url, with_token(who("app-1", "i-1", "1.2.0"), "x")).await;
    other.send_out(Outbound::Handshake { init_errors: None, capabilities: vec![] }).await;
    other.refused(CloseCode::Policy).await;
    let list = instances(&env, &["list"]);
    assert!(list.contains("app-1\ti-1\t") && list.contains("\toperator\t-\t"), "{list}");
}

#[tokio::test]
async fn a_client_cannot_release_another_instances_wait() {
    let env = Env::new();
    env.write_json("web.json", &recipe(json!([comment("web-1")])));
    env.write_json("evil.json", &recipe(json!([comment("web-1")])));
    env.write_json("app-b.json", &recipe(json!([wait_on("b-wait", json!("@{web.web-1}"))])));
    let (_backend, url) = spawn_binary(&env, &[]).await;
    let mut a = Agent::connect(&url, who("web", "i-a", "1.2.0")).await;
    a.handshake_for_recipe(ALL_CAPS).await;
    let mut b = Agent::connect(&url, who("app-b", "i-b", "1.2.0")).await;
    b.handshake_for_recipe(ALL_CAPS).await;

    // An attacker with an instance of its own (trusted on first use) …
    let mut x = Agent::connect(&url, with_token(who("evil", "i-x", "1.2.0"), "attacker")).await;
    x.handshake_for_recipe(ALL_CAPS).await;
    // … reports web-1 as i-a, as an instance of web, and as itself; asks for i-b's waits.
    x.send(json!({"code": "StateLog", "instance_id": "i-a", "app_id": "web", "recipe_version": 1,
                  "id": "web-1", "state_result": true, "seq": 1}))
        .await;
    x.send(json!({"code": "StateLog", "app_id": "web", "recipe_version": 1, "id": "web-1", "state_result": true}))
        .await;
    x.send_out(Outbound::WaitQuery { recipe_version: 1 }).await;
    x.expect("WaitList").await;
    x.send(json!({"code": "WaitQuery", "instance_id": "i-b", "app_id": "app-b", "recipe_version": 1})).await;
    x.send(json!({"code": "Heartbeat", "instance_id": "i-a", "app_id": "web"})).await;
    x.state_log(1, "web-1", true, None).await;
    x.quiet().await;
    // The owner of web-1 reporting it under a version it was not sent: no release either.
    a.state_log(2, "web-1", true, None).await;
    a.quiet().await;
    b.quiet().await;
    assert_eq!(b.wait_list(1).await, json!([]));
    let refused: Vec<Value> = env.events_lines().into_iter().filter(|e| e["event"] == "refused").collect();
    let codes: Vec<&str> = refused.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["StateLog", "StateLog", "WaitQuery", "Heartbeat"], "{refused:?}");
    assert!(refused.iter().all(|e| e["instance_id"] == "i-x"));
    // Only x's own StateLog and a's were recorded, each under its pinned identity.
    let lines = env.statelog_lines();
    let who_said: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["instance_id"].as_str().unwrap(), l["app_id"].as_str().unwrap())).collect();
    assert_eq!(who_said, [("i-x", "evil"), ("i-a", "web")]);
    assert_eq!(lines[1]["wait_progress"], false);

    // The owner, for the version it runs: released.
    a.state_log(1, "web-1", true, None).await;
    assert_eq!(b.expect("State").await["stateid"], "b-wait");
    assert_eq!(b.wait_list(1).await, json!([{"instance_id": "i-a", "state_id": "b-wait"}]));
}

#[tokio::test]
async fn plaintext_on_a_non_loopback_address_refuses_to_start_without_the_flag() {
    let env = Env::new();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_opsagent-backend"))
        .args(["--listen", "0.0.0.0:0", "--recipe-dir"])
        .arg(env.recipes())
        .arg("--statelog")
        .arg(env.statelog())
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address") && err.contains("--insecure-plaintext"), "{err}");
    assert!(out.stdout.is_empty(), "it never said it listens");
    // The library refuses it too.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    assert!(matches!(Backend::start(listener, env.opts()).await, Err(opsagent::backend::BackendError::Config(_))));

    // With the flag it serves, and says why that is dangerous.
    let (mut backend, url) = spawn_binary(&env, &["--listen", "0.0.0.0:0", "--insecure-plaintext"]).await;
    let port = url.rsplit(':').next().unwrap();
    let mut agent = Agent::connect(&format!("ws://127.0.0.1:{port}"), who("app-1", "i-1", "1.2.0")).await;
    agent.quiet().await;
    backend.0.start_kill().unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut backend.0.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains("serving plain ws://") && stderr.contains("--insecure-plaintext"), "{stderr}");
}

/// The HTTP answer to a refused WebSocket upgrade: (status, body).
async fn refused_upgrade(url: &str) -> (u16, String) {
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap() {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            (r.status().as_u16(), String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned())
        }
        Ok(_) => panic!("the connection was accepted"),
        Err(e) => panic!("refused without an answer: {e}"),
    }
}

/// The handshake timeout covers the TLS and WebSocket upgrade too, not a fixed 15 s beside
/// it: a client that opens TCP and never upgrades is closed within the operator's bound.
#[tokio::test]
async fn a_connection_that_never_upgrades_is_closed_within_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let env = Env::new();
    let (_backend, url) = spawn_binary(&env, &["--handshake-timeout-s", "1"]).await;
    let mut tcp = tokio::net::TcpStream::connect(url.strip_prefix("ws://").unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open 10 s after a 1 s handshake timeout: {read:?}");
}

#[tokio::test]
async fn caps_are_each_refused_with_a_reason() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let (_backend, url) = spawn_binary(
        &env,
        &[
            "--max-conns-per-addr",
            "2",
            "--handshake-timeout-s",
            "1",
            "--max-frame-bytes",
            "4096",
            "--frames-per-s",
            "20",
            "--frame-burst",
            "10",
        ],
    )
    .await;
    // Connections per address.
    let mut first = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    first.handshake_for_recipe(ALL_CAPS).await;
    let mut idle = Agent::connect(&url, who("app-1", "i-2", "1.2.0")).await;
    let (status, body) = refused_upgrade(&url).await;
    assert_eq!((status, body.as_str()), (429, "too many connections from 127.0.0.1 (at most 2)"));
    env.event(|e| e["event"] == "connection_refused" && e["status"] == 429).await;

    // No Handshake within the timeout: closed, and the place is free again.
    assert_eq!(idle.refused(CloseCode::Policy).await, "no Handshake within 1 s");
    env.event(|e| e["event"] == "handshake_timeout").await;
    drop(idle);
    let mut second = eventually_connect(&url, who("app-1", "i-2", "1.2.0")).await;
    second.handshake_for_recipe(&[]).await;

    // Frame size.
    let _ = second.ws.send(Message::text("x".repeat(5000))).await;
    assert_eq!(second.refused(CloseCode::Size).await, "frame larger than 4096 bytes");
    env.event(|e| e["event"] == "frame_too_big").await;
    drop(second);

    // Frame rate: 50 frames past a burst of 10 at 20/s take about 2 s to be read, and
    // every one is answered.
    let started = tokio::time::Instant::now();
    for _ in 0..60 {
        first.send(json!({"code": "Test"})).await;
    }
    for _ in 0..60 {
        first.expect("TestAns").await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "60 frames read in {took:?}");
    env.event(|e| e["event"] == "throttled" && e["instance_id"] == "i-1").await;
}

#[tokio::test]
async fn logs_are_rotated_by_size_and_replayed_across_a_restart() {
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let flags = ["--rotate-bytes", "600", "--rotate-keep", "3"];
    let (backend, url) = spawn_binary(&env, &flags).await;
    let mut agent = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    for seq in 1..=12 {
        agent.state_log(1, "s1", true, Some(seq)).await;
        assert_eq!(agent.expect("StateLogAck").await["seq"], seq);
    }
    let file = |name: &str| env.dir.path().join(name);
    for name in ["statelog.jsonl", "statelog.jsonl.1", "statelog.jsonl.2", "events.jsonl", "events.jsonl.1"] {
        let len = std::fs::metadata(file(name)).unwrap_or_else(|e| panic!("{name}: {e}")).len();
        assert!(len <= 600, "{name}: {len} bytes");
    }
    assert!(!file("statelog.jsonl.4").exists());
    drop(agent);
    drop(backend);

    // A resend of a StateLog now in a rotated file is acknowledged, not appended again.
    let (_backend, url) = spawn_binary(&env, &flags).await;
    let mut agent = Agent::connect(&url, who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    let before = std::fs::read_to_string(file("statelog.jsonl")).unwrap();
    let oldest_kept = json_lines(&file("statelog.jsonl.3"))
        .first()
        .map(|l| l["seq"].as_u64().unwrap())
        .unwrap_or_else(|| json_lines(&file("statelog.jsonl.2"))[0]["seq"].as_u64().unwrap());
    agent.state_log(1, "s1", true, Some(oldest_kept)).await;
    assert_eq!(agent.expect("StateLogAck").await["seq"], oldest_kept);
    agent.quiet().await;
    assert_eq!(std::fs::read_to_string(file("statelog.jsonl")).unwrap(), before);
}

/// Connects, retrying while a closing connection still holds a place.
async fn eventually_connect(url: &str, who: Identity) -> Agent {
    let give_up = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return Agent { ws, who },
            Err(e) => assert!(tokio::time::Instant::now() < give_up, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- bounded and durable

/// A tool a test needs: absent, the test is skipped with a word on stderr, except where
/// `OPSAGENT_TEST_NO_SKIP` is set (CI): there it fails.
fn have_tool(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
            "{tool} is not installed, but OPSAGENT_TEST_NO_SKIP is set: this machine must run the test"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// The crash-after-ack property, seen from the system calls: the pin's file content is
/// synced before its name is linked into place, the directory is synced after, and only
/// then does the RecipeMetadata answering the Handshake leave the backend. A backend
/// killed right after answering has the pin.
#[tokio::test]
async fn a_first_use_pin_is_on_disk_before_the_handshake_is_answered() {
    if !have_tool("strace") {
        return;
    }
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let trace = env.dir.path().join("strace.txt");
    let mut cmd = tokio::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-s", "4000", "-e", "trace=syncfs,fsync,fdatasync,link,linkat,write,writev,sendto,sendmsg"])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_opsagent-backend"))
        .args(["--listen", "127.0.0.1:0", "--poll-ms", "50"])
        .arg("--recipe-dir")
        .arg(env.recipes())
        .arg("--statelog")
        .arg(env.statelog())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = Child(cmd.spawn().unwrap());
    let mut lines = tokio::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("no listening line");
    let addr = line.strip_prefix("opsagent-backend listening on ").unwrap_or_else(|| panic!("{line:?}"));
    let mut agent = Agent::connect(&format!("ws://{addr}"), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    // The backend (strace's child) killed at once: no chance to write anything more.
    // Killing strace alone would leave it running, detached.
    let strace = child.0.id().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap();
    let pid: i32 = children.split_whitespace().next().expect("strace runs the backend").parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    tokio::time::timeout(WAIT, child.0.wait()).await.unwrap().unwrap();
    let listed = instances(&env, &["list"]);
    assert!(listed.contains("i-1"), "the pin of an answered Handshake is there after a kill: {listed}");

    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let find =
        |from: usize, what: &dyn Fn(&str) -> bool| lines.iter().skip(from).position(|l| what(l)).map(|i| i + from);
    let link = find(0, &|l| l.contains("link") && l.contains(".pins/") && l.contains(".json\""))
        .unwrap_or_else(|| panic!("no link of the pin in the trace:\n{text}"));
    let syncfs = find(0, &|l| l.contains("syncfs(")).unwrap_or_else(|| panic!("no syncfs in the trace:\n{text}"));
    assert!(syncfs < link, "the pin's content is synced before its name exists:\n{text}");
    // The directory's fsync, finished (a call cut by another thread's line ends in a
    // `resumed` line).
    let dir_sync =
        find(link, &|l| (l.contains("fsync(") && !l.contains("unfinished")) || l.contains("<... fsync resumed>"))
            .unwrap_or_else(|| panic!("no fsync after the link:\n{text}"));
    let answer =
        find(0, &|l| l.contains("RecipeMetadata")).unwrap_or_else(|| panic!("no RecipeMetadata written:\n{text}"));
    assert!(dir_sync < answer, "the Handshake is answered only once the pin is durable:\n{text}");
}

/// A recipe of about `kib` KiB, different for each `n`.
fn big_recipe(n: usize, kib: usize) -> Value {
    let pad = "x".repeat(500);
    recipe(Value::Array(
        (0..kib * 2)
            .map(|i| json!({"id": format!("s{i}"), "module": "meta.comment", "parameter": {"comment": format!("{n} {pad}")}}))
            .collect(),
    ))
}

/// The outgoing queue is bounded: an agent that stops reading while recipes keep being
/// pushed to it is cut off (`slow_reader`), with no more queued for it than the bound;
/// an agent of the same app that reads is served every push and stays.
#[tokio::test]
async fn an_agent_that_does_not_read_is_cut_off_and_one_that_reads_is_not() {
    let env = Env::new();
    env.write_json("app-1.json", &big_recipe(0, 256));
    // Room for a few pushes: a reading agent is never that far behind.
    let max = 1 << 20;
    let opts = BackendOptions {
        poll: Duration::from_millis(20),
        limits: opsagent::backend::Limits { max_queued_bytes: max, ..Default::default() },
        ..env.opts()
    };
    let backend = env.start_with(opts).await;
    let url = backend.url();

    // The slow one reads its Handshake's answer, then nothing more.
    let mut slow = Agent::connect(&url, who("app-1", "i-slow", "1.2.0")).await;
    slow.handshake_for_recipe(ALL_CAPS).await;
    let slow_conn = env.event(|e| e["event"] == "pinned" && e["instance_id"] == "i-slow").await["conn"].clone();
    let mut fast = Agent::connect(&url, with_token(who("app-1", "i-fast", "1.2.0"), "other")).await;
    fast.handshake_for_recipe(ALL_CAPS).await;
    let fast_conn = env.event(|e| e["event"] == "pinned" && e["instance_id"] == "i-fast").await["conn"].clone();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut pushes = 0u64;
        loop {
            tokio::select! {
                m = fast.ws.next() => match m {
                    Some(Ok(Message::Text(t))) if t.as_str().contains("RecipeMetadata") => pushes += 1,
                    Some(Ok(_)) => {}
                    other => panic!("the reading agent lost its connection: {other:?}"),
                },
                _ = &mut stop_rx => return (fast, pushes),
            }
        }
    });

    // New recipes until the backend gives up on the slow one (its socket buffers fill
    // first, then its queue).
    let give_up = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    let cut = loop {
        if let Some(e) = env.events_lines().into_iter().find(|e| e["event"] == "slow_reader") {
            break e;
        }
        assert!(tokio::time::Instant::now() < give_up, "timed out waiting for the slow reader cut off");
        n += 1;
        env.write_json("app-1.json", &big_recipe(n, 256));
        tokio::time::sleep(Duration::from_millis(60)).await;
    };
    assert_eq!(cut["conn"], slow_conn, "{cut}");
    assert_eq!(cut["instance_id"], "i-slow");
    assert!(cut["queued_bytes"].as_u64().unwrap() <= max as u64, "never more queued than the bound: {cut}");
    // Its connection ends (the frames the network held, then the end).
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = slow.ws.next().await {} })
        .await
        .expect("the slow reader's connection is closed");

    // The reader got every push it was sent and is still served.
    let loaded = env.events_lines().iter().filter(|e| e["event"] == "recipe_loaded").count() as u64;
    stop_tx.send(()).unwrap();
    let (mut fast, mut pushes) = reader.await.unwrap();
    fast.send(json!({"code": "Test"})).await;
    loop {
        let v = fast.recv().await;
        match v["code"].as_str() {
            Some("RecipeMetadata") => pushes += 1,
            Some("TestAns") => break,
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(pushes, loaded - 1, "every recipe after its Handshake's reached the reading agent");
    assert!(!env.events_lines().iter().any(|e| e["event"] == "slow_reader" && e["conn"] == fast_conn));
    backend.shutdown().await;
}

/// A StateLogAck tells the agent it may forget the record: the line must be on disk
/// first. Seen from the system calls: the statelog line is written, then the file is
/// synced (finished), and only then does the ack leave the backend — for a first record
/// and for a resend of one already recorded.
#[tokio::test]
async fn a_statelog_line_is_on_disk_before_it_is_acknowledged() {
    if !have_tool("strace") {
        return;
    }
    let env = Env::new();
    env.write_json("app-1.json", &recipe(json!([comment("s1")])));
    let trace = env.dir.path().join("strace.txt");
    let mut cmd = tokio::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-s", "4000", "-e", "trace=fsync,fdatasync,write,writev,sendto,sendmsg"])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_opsagent-backend"))
        .args(["--listen", "127.0.0.1:0", "--poll-ms", "50"])
        .arg("--recipe-dir")
        .arg(env.recipes())
        .arg("--statelog")
        .arg(env.statelog())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = Child(cmd.spawn().unwrap());
    let mut lines = tokio::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("no listening line");
    let addr = line.strip_prefix("opsagent-backend listening on ").unwrap_or_else(|| panic!("{line:?}"));
    let mut agent = Agent::connect(&format!("ws://{addr}"), who("app-1", "i-1", "1.2.0")).await;
    agent.handshake_for_recipe(ALL_CAPS).await;
    agent.state_log(1, "s1", true, Some(7)).await;
    assert_eq!(agent.expect("StateLogAck").await["seq"], 7);
    // The same record again: acknowledged, not appended, and still only once durable.
    agent.state_log(1, "s1", true, Some(7)).await;
    assert_eq!(agent.expect("StateLogAck").await["seq"], 7);
    let strace = child.0.id().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap();
    let pid: i32 = children.split_whitespace().next().expect("strace runs the backend").parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    tokio::time::timeout(WAIT, child.0.wait()).await.unwrap().unwrap();
    assert_eq!(env.statelog_lines().len(), 1, "the acknowledged line is there after a kill");

    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let find =
        |from: usize, what: &dyn Fn(&str) -> bool| lines.iter().skip(from).position(|l| what(l)).map(|i| i + from);
    let synced = |l: &str| {
        ((l.contains("fdatasync(") || l.contains("fsync(")) && !l.contains("unfinished"))
            || l.contains("<... fdatasync resumed>")
            || l.contains("<... fsync resumed>")
    };
    let written = find(0, &|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains("received_at"))
        .unwrap_or_else(|| panic!("no statelog line written:\n{text}"));
    let mut from = written;
    for n in 1..=2 {
        let ack = find(from, &|l| l.contains("StateLogAck"))
            .unwrap_or_else(|| panic!("StateLogAck {n} not written after the line:\n{text}"));
        let sync = find(from, &synced).unwrap_or_else(|| panic!("no sync after the line:\n{text}"));
        assert!(sync < ack, "StateLogAck {n} leaves before the line is synced:\n{text}");
        from = ack + 1;
    }
}
