// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The walking skeleton, end to end with real processes: the reference backend, the
//! daemon and the root helper on a temp socket, applying a recipe to a temp directory.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn recipe(work: &Path, content: &str) -> Value {
    let w = work.display();
    json!({"component": {"init": {"state": [
        {"id": "s-dir", "module": "linux.dir", "parameter": {"path": [format!("{w}/d")]}},
        {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/d/f.conf"), "content": content}},
        {"id": "s-link", "module": "linux.symlink", "parameter": {"source": format!("{w}/d"), "target": format!("{w}/link")}},
        {"id": "s-cmd", "module": "linux.cmd", "parameter": {
            "cmd": format!("echo once > {w}/once.flag"), "if-path-absent": [format!("{w}/once.flag")], "cwd": w.to_string()}}
    ]}}})
}

fn logs_of(statelog: &Path, version: u64) -> Vec<Value> {
    read_jsonl(statelog).into_iter().filter(|l| l["recipe_version"] == version).collect()
}

#[test]
fn backend_daemon_and_helper_apply_a_recipe_in_rounds() {
    let s = setup("app-e2e", |w| recipe(w, "v1\n"));
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);

    let events = dir.join("events.jsonl");
    let (_backend, port) =
        start_backend(dir, recipes, statelog, &["--poll-ms", "100", "--events", events.to_str().unwrap()]);
    let _helper = start_helper(dir, socket);
    let agent = start_agent(dir, port, "app-e2e", "i-e2e", socket, &["--round-delay", "1"]);

    // Two rounds of four states.
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, 1).len() >= 8),
        "two rounds expected; statelog: {:?}\nagent: {}",
        read_jsonl(statelog),
        agent.log_text()
    );
    let logs = logs_of(statelog, 1);
    let ids: Vec<&str> = logs.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..8], &["s-dir", "s-file", "s-link", "s-cmd", "s-dir", "s-file", "s-link", "s-cmd"]);
    for l in &logs {
        assert_eq!(l["state_result"], true, "{l}");
        assert_eq!(l["stateid"], l["id"]);
        assert_eq!(l["instance_id"], "i-e2e");
        assert_eq!(l["app_id"], "app-e2e");
    }
    // The first round changed things, the second changed nothing.
    for l in &logs[..4] {
        assert!(l["state_comment"].as_str().unwrap_or("").contains("changed:"), "round 1 changes: {l}");
    }
    for l in &logs[4..8] {
        assert!(!l["state_comment"].as_str().unwrap_or("").contains("changed:"), "round 2 changes nothing: {l}");
    }
    assert_eq!(std::fs::read_to_string(work.join("d/f.conf")).unwrap(), "v1\n");
    assert_eq!(std::fs::read_link(work.join("link")).unwrap(), work.join("d"));

    // Editing the recipe file makes the agent apply the new version.
    std::fs::write(recipes.join("app-e2e.json"), recipe(work, "v2\n").to_string()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, 2).len() >= 4),
        "new version expected; agent: {}",
        agent.log_text()
    );
    assert_eq!(std::fs::read_to_string(work.join("d/f.conf")).unwrap(), "v2\n");
    let v2 = logs_of(statelog, 2);
    assert!(v2[1]["state_comment"].as_str().unwrap().contains("changed:"), "{}", v2[1]);

    // Each (version, state, sequence number) appears once: nothing doubled.
    let all = read_jsonl(statelog);
    let mut seqs: Vec<u64> = all.iter().filter_map(|l| l["seq"].as_u64()).collect();
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "no duplicated sequence numbers");
    assert_eq!(n, all.len(), "every StateLog carries a sequence number");
    // The statelog holds each record once whatever the agent sent: the backend's event
    // log counts what arrived again. With one connection, nothing was ever resent.
    let repeated: Vec<Value> =
        read_jsonl(&dir.join("events.jsonl")).into_iter().filter(|e| e["event"] == "statelog_repeated").collect();
    assert!(repeated.is_empty(), "the agent sent StateLogs again: {repeated:?}");
}

/// Drift (issue 19): a managed file edited by hand between rounds is planned by the
/// daemon within its drift interval and reported to the reference backend, which records
/// it; the plan leaves the edit in place (the next round, not the plan, repairs it).
#[test]
fn a_file_edited_by_hand_is_reported_as_drift_and_left_alone_until_the_next_round() {
    let s = setup("app-drift", |w| recipe(w, "v1\n"));
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);
    let events = dir.join("events.jsonl");
    let (_backend, port) =
        start_backend(dir, recipes, statelog, &["--poll-ms", "100", "--events", events.to_str().unwrap()]);
    let _helper = start_helper(dir, socket);
    // No second round during the test: only a plan can notice the edit.
    let agent = start_agent_with_conf(
        dir,
        port,
        "app-drift",
        "i-drift",
        socket,
        "[agent]\ndrift_interval = 1\n",
        &["--round-delay", "3600"],
    );
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, 1).len() >= 4),
        "the first round; agent: {}",
        agent.log_text()
    );
    let drifts = || -> Vec<Value> { read_jsonl(&events).into_iter().filter(|e| e["event"] == "drift").collect() };

    let managed = work.join("d/f.conf");
    std::fs::write(&managed, "edited by hand\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || drifts().iter().any(|d| d["states"].to_string().contains("s-file"))),
        "no drift report of s-file; events: {:?}\nagent: {}",
        read_jsonl(&events),
        agent.log_text()
    );
    let report = drifts().into_iter().find(|d| d["states"].to_string().contains("s-file")).unwrap();
    assert_eq!(report["instance_id"], "i-drift", "{report}");
    assert_eq!(report["recipe_version"], 1, "{report}");
    // Only the edited state drifted: the directory, the link and the guarded command
    // still match.
    let states = report["states"].as_array().unwrap();
    assert_eq!(states.len(), 1, "{report}");
    assert_eq!(states[0]["id"], "s-file");
    assert_eq!(states[0]["changes"], json!([format!("{}: content updated", managed.display())]), "{report}");
    // The plan changed nothing and sent no StateLog.
    assert_eq!(std::fs::read_to_string(&managed).unwrap(), "edited by hand\n");
    assert_eq!(logs_of(statelog, 1).len(), 4, "a plan must not report StateLogs");
}

#[test]
fn a_second_daemon_on_the_same_state_directory_refuses_to_start_naming_the_first() {
    let s = setup("app-lock", |w| recipe(w, "v1\n"));
    let (dir, recipes, statelog, socket) = (s.dir.as_path(), &s.recipes, &s.statelog, &s.socket);
    let (_backend, port) = start_backend(dir, recipes, statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(dir, socket);
    let first = start_agent(dir, port, "app-lock", "i-lock", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, 1).len() >= 4),
        "the first daemon runs a round; agent: {}",
        first.log_text()
    );

    // The same state directory and token, its own log file.
    let second_dir = dir.join("second");
    std::fs::create_dir(&second_dir).unwrap();
    let mut out = std::process::Command::new(bin("opsagent"))
        .arg("run")
        .arg("--config")
        .arg(dir.join("empty.conf"))
        .arg("--ws-uri")
        .arg(format!("ws://127.0.0.1:{port}/"))
        .args(["--app-id", "app-lock", "--instance-id", "i-lock"])
        .arg("--token-file")
        .arg(dir.join("i-lock.token"))
        .arg("--state-dir")
        .arg(dir.join("i-lock.state"))
        .arg("--helper-socket")
        .arg(socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(second_dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    let ended = wait_until(Duration::from_secs(15), || {
        status = out.try_wait().unwrap();
        status.is_some()
    });
    if !ended {
        out.kill().unwrap();
        out.wait().unwrap();
    }
    let stderr = std::fs::read_to_string(second_dir.join("agent.log")).unwrap();
    assert!(ended, "the second daemon must not run beside the first: {stderr}");
    assert!(!status.unwrap().success(), "the second daemon must fail: {stderr}");
    assert!(
        stderr.contains(&format!("in use by another opsagent daemon (pid {})", first.pid())),
        "the refusal names the first daemon's pid: {stderr}"
    );
    // The first one goes on: another round is reported after the refusal.
    let before = logs_of(statelog, 1).len();
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, 1).len() >= before + 4),
        "the first daemon keeps running its rounds; agent: {}",
        first.log_text()
    );
}

/// `opsagent status --json` read and checked, then `opsagent stop --after-round` and
/// `opsagent stop` against a running daemon: the first lets the round finish, the
/// second only the running state.
#[test]
fn status_and_stop_against_a_running_daemon() {
    let s = setup("app-stop", |work| {
        let w = work.display().to_string();
        json!({"recipe_version": 1, "state": [
            {"id": "s-slow", "module": "linux.cmd", "parameter": {"cmd": "echo >> started; sleep 2", "cwd": w}},
            {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/f"), "content": "x"}}
        ]})
    });
    let (dir, work, statelog, socket) = (s.dir.as_path(), &s.work, &s.statelog, &s.socket);
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(dir, socket);
    let state_dir = dir.join("i-stop.state");
    let opsagent = |args: &[&str]| {
        let out = std::process::Command::new(bin("opsagent"))
            .args(args)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--config")
            .arg(dir.join("empty.conf"))
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let count = |id: &str| logs_of(statelog, 1).iter().filter(|l| l["id"] == id).count();
    // How many times the slow state has started; more than reported: it runs now.
    let started = || std::fs::read_to_string(work.join("started")).unwrap_or_default().lines().count();
    let slow_runs_now = || started() > count("s-slow");

    let mut agent = start_agent(dir, port, "app-stop", "i-stop", socket, &["--round-delay", "1"]);
    assert!(wait_until(Duration::from_secs(30), || count("s-file") >= 1), "a round: {}", agent.log_text());
    // The status file follows the daemon within moments: read until it shows the round.
    let status_json = || {
        let (ok, text) = opsagent(&["status", "--json"]);
        assert!(ok, "{text}");
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {text}"))
    };
    let mut status = status_json();
    assert!(
        wait_until(Duration::from_secs(15), || {
            status = status_json();
            status["engine"]["rounds_completed"].as_u64().is_some_and(|n| n >= 1)
        }),
        "{status:#}"
    );
    assert_eq!(status["pid"], agent.pid(), "{status:#}");
    assert_eq!(status["instance_id"], "i-stop", "{status:#}");
    assert_eq!(status["app_id"], "app-stop", "{status:#}");
    assert!(status["spool_depth"].is_u64(), "{status:#}");
    assert!(status["summary"].as_str().is_some_and(|s| !s.is_empty()), "{status:#}");

    // --after-round while the slow state of a round runs: that round still ends with
    // s-file, then the daemon exits.
    assert!(wait_until(Duration::from_secs(30), slow_runs_now), "{}", agent.log_text());
    let (ok, text) = opsagent(&["stop", "--after-round"]);
    assert!(ok && text.contains("after the current round"), "{text}");
    let exit =
        agent.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running: {}", agent.log_text()));
    assert!(exit.success(), "{exit:?}: {}", agent.log_text());
    assert_eq!(count("s-slow"), started(), "{:?}", logs_of(statelog, 1));
    assert_eq!(count("s-file"), started(), "the round ran to its end: {:?}", logs_of(statelog, 1));

    // A plain stop while the slow state runs: that state ends and is reported, the next
    // one does not run.
    let mut agent = start_agent(dir, port, "app-stop", "i-stop", socket, &["--round-delay", "1"]);
    assert!(wait_until(Duration::from_secs(30), slow_runs_now), "{}", agent.log_text());
    let (ok, text) = opsagent(&["stop"]);
    assert!(ok && text.contains("after the running state"), "{text}");
    let exit =
        agent.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running: {}", agent.log_text()));
    assert!(exit.success(), "{exit:?}: {}", agent.log_text());
    assert_eq!(count("s-slow"), started(), "the running state was reported: {:?}", logs_of(statelog, 1));
    assert_eq!(count("s-file"), started() - 1, "the next state did not run: {:?}", logs_of(statelog, 1));
}

/// The metrics file (`--metrics-file`) scraped with Prometheus' own Python parser
/// (Debian's python3-prometheus-client), after a round that completed and one that
/// ceased; `status --json` carries the same figures.
#[test]
fn metrics_file_holds_the_round_figures_in_prometheus_text_format() {
    let doc = |work: &Path, version: u64, guard: &str| {
        let w = work.display().to_string();
        json!({"recipe_version": version, "state": [
            {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/f"), "content": format!("v{version}")}},
            {"id": "s-check", "module": "linux.cmd", "parameter": {"cmd": guard, "cwd": w}}
        ]})
    };
    let s = setup("app-metrics", |work| doc(work, 1, "true"));
    let (dir, statelog, socket) = (s.dir.as_path(), &s.statelog, &s.socket);
    let write_recipe = |version: u64, guard: &str| {
        std::fs::write(s.recipes.join("app-metrics.json"), doc(&s.work, version, guard).to_string()).unwrap();
    };
    let metrics = dir.join("textfile/opsagent.prom");
    std::fs::create_dir(metrics.parent().unwrap()).unwrap();
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(dir, socket);
    let agent = start_agent(
        dir,
        port,
        "app-metrics",
        "i-metrics",
        socket,
        &["--round-delay", "1", "--retry-delay", "1", "--metrics-file", &metrics.display().to_string()],
    );
    // Parsed by the real parser; returns {sample name + labels: value}.
    let scrape = || -> Value {
        let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    out["type:" + fam.name] = fam.type
print(json.dumps(out))
"#;
        let out = std::process::Command::new("/usr/bin/python3").arg("-c").arg(script).arg(&metrics).output().unwrap();
        assert!(out.status.success(), "the parser refused the file: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let completed = "opsagent_rounds_total{result=completed}";
    assert!(
        wait_until(Duration::from_secs(30), || metrics.exists() && scrape()[completed].as_f64() >= Some(1.0)),
        "a completed round in the metrics: {:?}; agent: {}",
        std::fs::read_to_string(&metrics),
        agent.log_text()
    );
    let m = scrape();
    assert_eq!(m["opsagent_connected"], 1.0, "{m:#}");
    assert_eq!(m["opsagent_recipe_version"], 1.0, "{m:#}");
    assert_eq!(m["opsagent_last_round_success"], 1.0, "{m:#}");
    assert_eq!(m["opsagent_last_round_states{result=ok}"], 2.0, "{m:#}");
    assert_eq!(m["opsagent_last_round_states{result=failed}"], 0.0, "{m:#}");
    assert_eq!(m["opsagent_info{app_id=app-metrics,instance_id=i-metrics,version=0.1.0}"], 1.0, "{m:#}");
    assert_eq!(m["type:opsagent_rounds"], "counter", "{m:#}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (start, end) = (
        m["opsagent_last_round_start_timestamp_seconds"].as_f64().unwrap(),
        m["opsagent_last_round_end_timestamp_seconds"].as_f64().unwrap(),
    );
    assert!(start <= end && end <= now + 1.0 && now - end < 60.0, "{m:#}");
    assert_eq!(m["opsagent_last_successful_round_timestamp_seconds"].as_f64(), Some(end), "{m:#}");

    // A failing recipe: its rounds cease; the last success stays where it was.
    let success = end;
    write_recipe(2, "false");
    let ceased = "opsagent_rounds_total{result=ceased}";
    assert!(
        wait_until(Duration::from_secs(30), || scrape()[ceased].as_f64() >= Some(1.0)),
        "a ceased round in the metrics: {:?}",
        std::fs::read_to_string(&metrics)
    );
    let m = scrape();
    assert_eq!(m["opsagent_recipe_version"], 2.0, "{m:#}");
    assert_eq!(m["opsagent_last_round_success"], 0.0, "{m:#}");
    assert_eq!(m["opsagent_last_round_states{result=failed}"], 2.0, "failed twice: restarted, then ceased: {m:#}");
    assert_eq!(m["opsagent_last_successful_round_timestamp_seconds"].as_f64(), Some(success), "{m:#}");

    // The same figures in status --json.
    let out = std::process::Command::new(bin("opsagent"))
        .args(["status", "--json", "--config"])
        .arg(dir.join("empty.conf"))
        .arg("--state-dir")
        .arg(dir.join("i-metrics.state"))
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["metrics"]["rounds_ceased"].as_u64() >= Some(1), "{status:#}");
    assert_eq!(status["metrics"]["last_successful_round_unix"].as_f64(), Some(success), "{status:#}");
}
