//! Plan requests (issue 19) against a real helper on a temp socket, sent as the agent's
//! uid (a child re-running this binary, as `compromised_daemon.rs` does): a plan
//! reports the drift of a managed file with its diff and writes nothing, runs no
//! command, goes through the same policy as an apply; in signed mode an unsigned plan
//! is root's only.
//!
//! These tests need root, as the helper does.
// The harness re-runs this test binary under another uid.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod policy_support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use opsagent_proto::request::{ErrorCode, Outcome, Reply};
use policy_support::{apply_json, Client, Helper, AGENT_GID, AGENT_UID};
use serde_json::{json, Value};

const CHILD_ENV: &str = "OPSAGENT_HELPER_TEST_PLAN_DIR";

fn plan_json(state_id: &str, module: &str, raw: Value) -> Value {
    let mut req = apply_json(state_id, module, raw, &[]);
    req["plan"] = json!(true);
    req
}

fn outcome(reply: Option<Reply>) -> Outcome {
    match reply {
        Some(Reply::Outcome(o)) => o,
        other => panic!("expected an outcome, got {other:?}"),
    }
}

fn changes(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// The file's content, mode and owner.
fn snapshot(p: &Path) -> (String, u32, u32) {
    let m = fs::metadata(p).unwrap();
    (fs::read_to_string(p).unwrap(), m.mode() & 0o7777, m.uid())
}

/// Runs `child` (a test of this binary) as the agent's uid; its replies, as JSON lines
/// it wrote in `dir/results`.
fn as_agent(dir: &Path, child: &str) -> Vec<Value> {
    let results = dir.join("results");
    fs::create_dir_all(&results).unwrap();
    std::os::unix::fs::chown(&results, Some(AGENT_UID), Some(AGENT_GID)).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .uid(AGENT_UID)
        .gid(AGENT_GID)
        .output()
        .unwrap();
    let text = fs::read_to_string(results.join(format!("{child}.json"))).unwrap_or_else(|e| {
        panic!(
            "the agent-uid child wrote nothing ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// The child half: sends `requests` as the agent's uid and writes the replies.
async fn agent_sends(child: &str, requests: impl FnOnce(&Path) -> Vec<Value>) {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    assert_eq!(nix::unistd::getuid().as_raw(), AGENT_UID, "the child must run as the agent's uid");
    let mut client = Client::connect(&dir.join("h.sock")).await;
    let mut replies = Vec::new();
    for request in requests(&dir) {
        let reply = client.call_raw(request).await.expect("the helper closed the connection");
        replies.push(serde_json::to_value(reply).unwrap());
    }
    fs::write(dir.join(format!("results/{child}.json")), serde_json::to_vec(&replies).unwrap()).unwrap();
}

fn drifted_file_state(dir: &Path) -> Value {
    json!({"path": dir.join("allowed/app.conf"), "content": "a=1\nb=3\n", "mode": "0644"})
}

fn command_state(dir: &Path) -> Value {
    json!({"cmd": format!("touch {}", dir.join("allowed/ran").display()), "cwd": dir.join("allowed")})
}

#[tokio::test]
async fn a_plan_from_the_agent_reports_drift_with_a_diff_and_writes_nothing() {
    let h = Helper::start(|dir| {
        format!("modules = linux.file linux.cmd\nwrite_prefixes = {}\n", dir.join("allowed").display())
    })
    .await;
    let dir = h.dir.path().to_path_buf();
    fs::create_dir(dir.join("allowed")).unwrap();
    let conf = dir.join("allowed/app.conf");
    fs::write(&conf, "a=1\nb=2\n").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o664)).unwrap();
    let before = snapshot(&conf);

    let replies = as_agent(&dir, "agent_plans");
    let [file, cmd, outside]: [Value; 3] = replies.try_into().unwrap();
    let file = outcome(serde_json::from_value(file).ok());
    let shown = conf.display().to_string();
    assert!(file.result && file.planned, "{file:?}");
    assert_eq!(changes(&file), [format!("{shown}: content updated"), format!("{shown}: mode 0664 -> 0644")]);
    assert_eq!(
        file.diff.as_deref(),
        Some(format!("--- {shown}\n+++ {shown}\n@@ -1,2 +1,2 @@\n a=1\n-b=2\n+b=3\n").as_str())
    );
    let cmd = outcome(serde_json::from_value(cmd).ok());
    assert!(cmd.planned && changes(&cmd) == ["cmd: ran"], "{cmd:?}");
    assert_eq!(outside["code"], json!("denied"), "the policy does not apply to plans: {outside}");
    // Nothing was touched.
    assert_eq!(snapshot(&conf), before);
    assert!(!dir.join("allowed/ran").exists(), "a plan ran a command");
    h.wait_for_log(&["outcome", "planned=true"]).await.unwrap();

    // The apply makes that change; a plan after it finds nothing.
    let mut root = Client::connect(&h.sock).await;
    let applied = outcome(root.call_raw(apply_json("f", "linux.file", drifted_file_state(&dir), &[])).await);
    assert_eq!(changes(&applied), changes(&file));
    assert_eq!(snapshot(&conf), ("a=1\nb=3\n".to_string(), 0o644, 0));
    let again = outcome(root.call_raw(plan_json("f", "linux.file", drifted_file_state(&dir))).await);
    assert!(again.planned && again.changes.is_empty() && again.diff.is_none(), "{again:?}");
}

/// Not a test of its own: the agent's half of the test above.
#[tokio::test]
async fn agent_plans() {
    agent_sends("agent_plans", |dir| {
        vec![
            plan_json("f", "linux.file", drifted_file_state(dir)),
            plan_json("c", "linux.cmd", command_state(dir)),
            plan_json("o", "linux.file", json!({"path": dir.join("elsewhere.conf"), "content": "x"})),
        ]
    })
    .await;
}

#[tokio::test]
async fn in_signed_mode_an_unsigned_plan_is_roots_only() {
    let key = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let h =
        Helper::start_signed(|_| format!("[userdata]\napp_id = app-plan\nrecipe_key = {}\n", key.pk.to_base64())).await;
    let dir = h.dir.path().to_path_buf();
    fs::create_dir(dir.join("allowed")).unwrap();
    let conf = dir.join("allowed/app.conf");
    fs::write(&conf, "a=1\nb=2\n").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o664)).unwrap();
    let before = snapshot(&conf);

    let replies = as_agent(&dir, "agent_plans_unsigned");
    assert_eq!(replies[0]["code"], json!("unverified"), "{}", replies[0]);
    let mut root = Client::connect(&h.sock).await;
    let planned = outcome(root.call_raw(plan_json("f", "linux.file", drifted_file_state(&dir))).await);
    assert!(planned.planned && planned.changes.len() == 2, "{planned:?}");
    // An unsigned apply stays refused, root or not.
    let applied = root.call_raw(apply_json("f", "linux.file", drifted_file_state(&dir), &[])).await;
    assert!(matches!(&applied, Some(Reply::Error(e)) if e.code == ErrorCode::Unverified), "{applied:?}");
    assert_eq!(snapshot(&conf), before);
}

/// Not a test of its own: the agent's half of the test above.
#[tokio::test]
async fn agent_plans_unsigned() {
    agent_sends("agent_plans_unsigned", |dir| vec![plan_json("f", "linux.file", drifted_file_state(dir))]).await;
}
