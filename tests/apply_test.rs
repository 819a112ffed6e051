// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `opsagent apply --test` end to end, as root uses it: the private helper it starts plans
//! every state of a drifted temp tree, reports the exact changes in the words a real
//! change uses, exits 3 and writes nothing; `--diff` shows the content diff, `--json` is
//! one parseable object per state; after `opsagent apply` the same plan exits 0.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// A run of `opsagent ARGS RECIPE` with the private helper (root, no `--helper-socket`).
fn opsagent(args: &[&str], recipe: &Path) -> Output {
    let mut cmd = Command::new(bin("opsagent"));
    cmd.args(args).arg(recipe);
    // The private helper is found next to the daemon's binary.
    cmd.env("OPSAGENT_HELPER_BIN", bin("opsagent-helper"));
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Everything the plan could touch, as (path, mode, mtime, content) sorted: equal before
/// and after a plan, or the plan wrote.
fn snapshot(root: &Path) -> Vec<(String, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let content = if meta.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
        out.push((p.display().to_string(), meta.mode(), meta.mtime() as u64, content));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_plan_of_a_drifted_tree_names_each_change_writes_nothing_and_is_clean_after_apply() {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none(), "the private helper needs root");
        eprintln!("skipped: opsagent apply starts its private helper only as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    // Drift: someone edited the managed file and opened its mode.
    let file = tree.join("app.conf");
    std::fs::write(&file, "a = 1\nb = 2\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A file only root may read: its plan shows checksums, never the content.
    let key = tree.join("key");
    std::fs::write(&key, "token=1\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = tree.join("data");
    let marker = tree.join("ran");
    let recipe = tmp.path().join("r.json");
    let doc = serde_json::json!({"recipe_version": 1, "state": [
        {"id": "conf", "module": "linux.file",
         "parameter": {"path": file, "content": "a = 1\nb = 3\n", "mode": "0664"}},
        {"id": "key", "module": "linux.file", "parameter": {"path": key, "content": "token=2\n"}},
        {"id": "data", "module": "linux.dir", "parameter": {"path": dir, "mode": "0750"}},
        {"id": "init", "module": "linux.cmd",
         "parameter": {"cmd": format!("touch {}", marker.display()), "if-path-absent": [marker]}}
    ]});
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let before = snapshot(&tree);

    let out = opsagent(&["apply", "--test"], &recipe);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(3), "something would change: {}", text(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "one line per state: {stdout}");
    let f = file.display();
    assert!(lines[0].starts_with("change [1/4] conf  linux.file  "), "{stdout}");
    assert!(lines[0].contains(&format!("{f}: content updated")), "{stdout}");
    assert!(lines[0].contains(&format!("{f}: mode 0644 -> 0664")), "{stdout}");
    assert!(lines[1].starts_with("change [2/4] key  linux.file  "), "{stdout}");
    assert!(lines[1].contains(&format!("{}: content updated", key.display())), "{stdout}");
    assert!(lines[2].starts_with("change [3/4] data  linux.dir  "), "{stdout}");
    assert!(lines[2].contains(&format!("{}: directory created (0750", dir.display())), "{stdout}");
    assert!(lines[3].starts_with("change [4/4] init  linux.cmd  ") && lines[3].contains("would run"), "{stdout}");
    assert_eq!(snapshot(&tree), before, "the plan wrote under {}", tree.display());

    let out = opsagent(&["apply", "--test", "--diff"], &recipe);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for l in ["-b = 2", "+b = 3", " a = 1"] {
        assert!(
            stdout.lines().any(|x| x.trim_start_matches(' ') == l.trim_start() && x.ends_with(l)),
            "{l:?} in {stdout}"
        );
    }
    assert!(stdout.contains(&format!("content of {} not shown (sensitive): sha256 ", key.display())), "{stdout}");
    assert!(!stdout.contains("token="), "a 0600 file's content is never shown: {stdout}");
    assert_eq!(snapshot(&tree), before, "the plan with --diff wrote");

    let out = opsagent(&["apply", "--test", "--json"], &recipe);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let plans: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ids: Vec<&str> = plans.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["conf", "key", "data", "init"]);
    assert!(plans.iter().all(|p| p["result"] == true), "{plans:?}");
    let conf = plans[0]["changes"].to_string();
    assert!(conf.contains("content updated") && conf.contains("mode 0644 -> 0664"), "{conf}");
    assert_eq!(snapshot(&tree), before, "the plan with --json wrote");

    let out = opsagent(&["apply"], &recipe);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a = 1\nb = 3\n");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "token=2\n");
    assert!(dir.is_dir() && marker.exists());

    let out = opsagent(&["apply", "--test"], &recipe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "nothing would change after the apply: {}", text(&out));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ") && l.ends_with("(no change)")).count(), 4, "{stdout}");
}
