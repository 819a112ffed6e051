// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `opsagent apply --test` against a real helper: a plan request is a plan request all
//! the way down. A helper that cannot plan refuses it (it never falls back to applying),
//! so every state says so, nothing is written and the exit status is 1.

mod common;

use std::process::Command;

use common::*;

#[test]
fn a_plan_against_a_helper_that_cannot_plan_writes_nothing_and_names_why() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let target = tmp.path().join("written");
    let recipe = tmp.path().join("r.json");
    let doc = serde_json::json!({"state": [
        {"id": "s1", "module": "linux.file", "parameter": {"path": target, "content": "x"}},
        {"id": "s2", "module": "linux.cmd", "parameter": {"cmd": format!("touch {}", target.display())}}
    ]});
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let out = Command::new(bin("opsagent"))
        .args(["apply", "--test", "--helper-socket", socket.to_str().unwrap(), recipe.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "every state is planned, none twice: {stdout}");
    assert!(lines[0].starts_with("FAILED [1/2] s1  linux.file  ") && lines[0].contains("cannot plan"), "{stdout}");
    assert!(lines[1].starts_with("FAILED [2/2] s2  linux.cmd  ") && lines[1].contains("cannot plan"), "{stdout}");
    assert!(!target.exists(), "a plan wrote {}", target.display());
    // Each state is said once, on stdout: the engine's journal lines stay out of it.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("state failed"), "{stderr}");
}
