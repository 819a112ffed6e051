// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! One engine: `opsagent apply` runs the daemon's round engine, so the daemon and a local
//! apply of the same recipe on the same host produce the same StateLogs, state for state
//! (a failure's restart of the round and its cease included).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// States of every kind the engine treats apart: applied by the helper with changes, a
/// command with output, a comment the engine answers itself, a state with a parameter
/// warning, one the catalogue refuses, and a failing command (the round restarts once
/// from the first state, then ceases with the state after it not run).
fn recipe(work: &Path) -> Value {
    let w = work.display();
    json!({"recipe_version": 1, "state": [
        {"id": "s-dir", "module": "linux.dir", "parameter": {"path": [format!("{w}/d")]}},
        {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/d/f.conf"), "content": "a = 1\n"}},
        {"id": "s-note", "module": "meta.comment", "parameter": {"comment": "a note"}},
        {"id": "s-warn", "module": "linux.file", "parameter": {"path": format!("{w}/d/g.conf"), "content": "b\n", "colour": "red"}},
        {"id": "s-cmd", "module": "linux.cmd", "parameter": {"cmd": "echo counted; echo to-err >&2", "cwd": w.to_string()}},
        {"id": "s-bad", "module": "linux.file", "parameter": {"path": "relative/path"}},
        {"id": "s-after", "module": "linux.file", "parameter": {"path": format!("{w}/never"), "content": "x"}}
    ]})
}

/// (id, result, comment, stdout) of a StateLog, from either side's spelling.
fn key(id: &Value, result: &Value, comment: &Value, stdout: &Value) -> (String, bool, Option<String>, Option<String>) {
    (
        id.as_str().unwrap().to_string(),
        result.as_bool().unwrap(),
        comment.as_str().map(str::to_string),
        stdout.as_str().map(str::to_string),
    )
}

#[test]
fn apply_and_the_daemon_report_the_same_statelogs_for_the_same_recipe() {
    let s = setup("app-one", recipe);
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);
    let (_backend, port) = start_backend(dir, recipes, statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(dir, socket);

    // The daemon's first round: 6 states, the 6th fails, 6 again, the 6th fails: ceased.
    let mut agent =
        start_agent(dir, port, "app-one", "i-one", socket, &["--round-delay", "3600", "--retry-delay", "300"]);
    assert!(
        wait_until(Duration::from_secs(30), || agent.log_text().contains("the round ceases")),
        "the daemon's round never ceased; statelog: {:?}\nagent: {}",
        read_jsonl(statelog),
        agent.log_text()
    );
    // The ceasing state's StateLog is recorded before the backend sees nothing more.
    assert!(wait_until(Duration::from_secs(10), || read_jsonl(statelog).len() >= 12), "{:?}", read_jsonl(statelog));
    agent.signal(15);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some(), "the daemon did not stop");
    let daemon: Vec<_> = read_jsonl(statelog)
        .iter()
        .map(|l| key(&l["id"], &l["state_result"], &l["state_comment"], &l["state_stdout"]))
        .collect();

    // The same host as the daemon found it, and the same recipe through `opsagent apply`.
    std::fs::remove_dir_all(work).unwrap();
    std::fs::create_dir(work).unwrap();
    let file = dir.join("apply.json");
    std::fs::write(&file, recipe(work).to_string()).unwrap();
    let out = Command::new(bin("opsagent"))
        .args(["apply", "--json", "--helper-socket", socket.to_str().unwrap(), file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let logs: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for l in &logs {
        assert_eq!(l["recipe_version"], 1, "{l}");
        assert_eq!(l["offline"], false, "a local round is not an offline one: {l}");
    }
    let local: Vec<_> = logs.iter().map(|l| key(&l["state_id"], &l["result"], &l["comment"], &l["stdout"])).collect();

    assert_eq!(local, daemon, "apply:\n{stdout}");
    // What the comparison stands on: the round restarted once and ceased at s-bad.
    let ids: Vec<&str> = local.iter().map(|k| k.0.as_str()).collect();
    assert_eq!(ids, ["s-dir", "s-file", "s-note", "s-warn", "s-cmd", "s-bad"].repeat(2));
    assert!(local[1].2.as_deref().unwrap_or("").contains("changed:"), "{:?}", local[1]);
    assert!(local[3].2.as_deref().unwrap_or("").contains("warning:"), "{:?}", local[3]);
    assert!(local[4].3.as_deref().unwrap_or("").contains("counted"), "{:?}", local[4]);
    assert!(!local[5].1);
    assert!(!work.join("never").exists());
}
