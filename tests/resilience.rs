// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Results are never lost or doubled: the backend dies mid-round, the daemon is killed
//! with SIGKILL mid-round, a new recipe arrives during a long command.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Five commands of ~0.3 s each: a round lasts long enough to be interrupted.
fn slow_recipe(work: &Path, tag: &str) -> Value {
    let states: Vec<Value> = (1..=5)
        .map(|i| {
            json!({"id": format!("{tag}-{i}"), "module": "linux.cmd",
                   "parameter": {"cmd": format!("sleep 0.3; echo {tag} {i}"), "cwd": work.display().to_string()}})
        })
        .collect();
    json!({ "state": states })
}

/// The backend's event log (`--events`), appended to by every backend started on it.
fn events_of(s: &Setup) -> std::path::PathBuf {
    s.dir.join("events.jsonl")
}

/// The backend's arguments: its event log, where it counts the StateLogs it had already
/// recorded (the statelog holds each record once, whatever the agent sent).
fn backend_args(s: &Setup) -> Vec<String> {
    vec!["--events".to_string(), events_of(s).display().to_string()]
}

/// What the agent really sent, not only what the backend kept: the records the backend
/// had already recorded once (`statelog_repeated`). An interruption (a backend or a
/// daemon killed) may leave a record recorded but not yet acknowledged, which the agent
/// rightly sends again; more than `per_interruption` such repeats per interruption is an
/// agent that resends what was acknowledged (its spool, on every reconnect).
fn assert_sent_once(s: &Setup, interruptions: usize, per_interruption: usize) {
    let logs = read_jsonl(&s.statelog);
    let repeated: Vec<u64> = read_jsonl(&events_of(s))
        .iter()
        .filter(|e| e["event"] == "statelog_repeated")
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    eprintln!("{} StateLogs recorded, {} sent again: {repeated:?}", logs.len(), repeated.len());
    assert!(
        repeated.len() <= interruptions * per_interruption,
        "the agent sent {} StateLogs the backend had already recorded ({repeated:?}) over {interruptions} \
         interruption(s): more than the ones in flight at each",
        repeated.len()
    );
}

/// Every sequence number 1..=max exactly once: nothing lost, nothing doubled.
fn assert_exactly_once(statelog: &Path) -> usize {
    let logs = read_jsonl(statelog);
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for l in &logs {
        *count.entry(l["seq"].as_u64().expect("seq")).or_default() += 1;
    }
    let max = *count.keys().last().unwrap();
    let doubled: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
    let missing: Vec<u64> = (1..=max).filter(|s| !count.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    logs.len()
}

#[test]
fn a_backend_killed_mid_round_loses_and_doubles_nothing() {
    let s = setup("app-r1", |w| slow_recipe(w, "r1"));
    let args = backend_args(&s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Every backend serves this one socket: a restart never races for the port.
    let listen = BackendSocket::bind();
    let mut backend = listen.start(&s.dir, &s.recipes, &s.statelog, &args);
    let _helper = start_helper(&s.dir, &s.socket);
    let agent = start_agent(&s.dir, listen.port, "app-r1", "i-r1", &s.socket, &["--round-delay", "1"]);
    assert!(wait_until(Duration::from_secs(30), || read_jsonl(&s.statelog).len() >= 2), "{}", agent.log_text());
    for _ in 0..2 {
        // The backend stays down until the agent has seen its connection die: it then
        // applies rounds offline, which a fixed pause did not make certain. (Its next
        // connection waits in the socket's backlog for the next backend.)
        let lost = agent.log_text().matches("backend connection lost").count();
        backend.kill9();
        assert!(
            wait_until(Duration::from_secs(30), || agent.log_text().matches("backend connection lost").count() > lost),
            "the agent never noticed the dead backend: {}",
            agent.log_text()
        );
        let before = read_jsonl(&s.statelog).len();
        backend = listen.start(&s.dir, &s.recipes, &s.statelog, &args);
        assert!(
            wait_until(Duration::from_secs(30), || read_jsonl(&s.statelog).len() >= before + 6),
            "the agent reconnected and delivered what it applied meanwhile: {}",
            agent.log_text()
        );
    }
    let n = assert_exactly_once(&s.statelog);
    assert!(n >= 12);
    // Acknowledged records are never sent again: two kills, at most one record each in
    // flight (written by the dying backend, its acknowledgement lost).
    assert_sent_once(&s, 2, 1);
}

#[test]
fn a_daemon_killed_with_sigkill_mid_round_resumes_with_its_spool_intact() {
    let s = setup("app-r2", |w| slow_recipe(w, "r2"));
    let backend_args = backend_args(&s);
    let backend_args: Vec<&str> = backend_args.iter().map(String::as_str).collect();
    let (_backend, port) = start_backend(&s.dir, &s.recipes, &s.statelog, &backend_args);
    let _helper = start_helper(&s.dir, &s.socket);
    let args = ["--round-delay", "1"];
    let mut agent = start_agent(&s.dir, port, "app-r2", "i-r2", &s.socket, &args);
    for round in 0..3 {
        let before = read_jsonl(&s.statelog).len();
        assert!(
            wait_until(Duration::from_secs(30), || read_jsonl(&s.statelog).len() >= before + 3),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(150 * round));
        agent.kill9();
        agent = start_agent(&s.dir, port, "app-r2", "i-r2", &s.socket, &args);
    }
    let before = read_jsonl(&s.statelog).len();
    assert!(
        wait_until(Duration::from_secs(30), || read_jsonl(&s.statelog).len() >= before + 5),
        "{}",
        agent.log_text()
    );
    assert_exactly_once(&s.statelog);
    // Three SIGKILLs: each may cut between the acknowledgement and its removal from
    // the spool, and between a send and its acknowledgement.
    assert_sent_once(&s, 3, 2);
    // The restarted daemon resumed the persisted recipe rather than waiting for nothing,
    // and did not call the backend unreachable while its link was still connecting.
    assert!(agent.log_text().contains("resuming the persisted recipe"), "{}", agent.log_text());
    assert!(!agent.log_text().contains("backend unreachable"), "{}", agent.log_text());
}

fn stray(marker: &str) -> bool {
    std::process::Command::new("pgrep").arg("-f").arg(marker).status().map(|s| s.success()).unwrap_or(false)
}

#[test]
fn a_new_recipe_during_a_long_command_starts_promptly_and_leaves_no_stray_process() {
    let marker = format!("sleep 6{}", std::process::id() % 1000 + 1000);
    let m = marker.clone();
    let s = setup("app-r3", move |w| {
        json!({"state": [
            {"id": "quick", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": w.display().to_string()}},
            {"id": "long", "module": "linux.cmd", "parameter": {"cmd": format!("{m}; echo never"), "cwd": w.display().to_string()}}
        ]})
    });
    let (_backend, port) = start_backend(&s.dir, &s.recipes, &s.statelog, &["--poll-ms", "50"]);
    let _helper = start_helper(&s.dir, &s.socket);
    let agent = start_agent(&s.dir, port, "app-r3", "i-r3", &s.socket, &[]);
    assert!(wait_until(Duration::from_secs(30), || stray(&marker)), "the long command runs: {}", agent.log_text());

    let t0 = Instant::now();
    std::fs::write(
        s.recipes.join("app-r3.json"),
        json!({"state": [{"id": "next", "module": "linux.file",
                          "parameter": {"path": format!("{}/next", s.work.display()), "content": "x"}}]})
        .to_string(),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || read_jsonl(&s.statelog).iter().any(|l| l["id"] == "next")),
        "{}",
        agent.log_text()
    );
    let elapsed = t0.elapsed();
    assert!(!stray(&marker), "the cancelled command's process group is gone");
    let logs = read_jsonl(&s.statelog);
    let long = logs.iter().find(|l| l["id"] == "long").expect("the cancelled state is reported");
    assert_eq!(long["state_result"], false);
    assert!(long["state_comment"].as_str().unwrap().contains("cancelled"), "{long}");
    eprintln!(
        "new recipe file written → new round's first StateLog: {elapsed:?} (includes the backend's file polling)"
    );
}

/// The README's offline promise, with real processes: a daemon restarted while the
/// backend is unreachable applies its persisted recipe anyway, and the StateLogs of those
/// rounds reach the backend once it is back, marked `"offline": true`, each once.
#[test]
fn a_daemon_restarted_while_the_backend_is_down_applies_offline_and_reports_later() {
    let s = setup("app-r4", |w| {
        json!({"state": [{"id": "r4-count", "module": "linux.cmd",
            "parameter": {"cmd": "echo run >> runs", "cwd": w.display().to_string()}}]})
    });
    let runs = || std::fs::read_to_string(s.work.join("runs")).unwrap_or_default().lines().count();
    let b_args = backend_args(&s);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let listen = BackendSocket::bind();
    let port = listen.port;
    let mut backend = listen.start(&s.dir, &s.recipes, &s.statelog, &b_args);
    let _helper = start_helper(&s.dir, &s.socket);
    let args = ["--round-delay", "1"];
    let mut agent = start_agent(&s.dir, port, "app-r4", "i-r4", &s.socket, &args);
    assert!(wait_until(Duration::from_secs(30), || !read_jsonl(&s.statelog).is_empty()), "{}", agent.log_text());
    assert!(read_jsonl(&s.statelog).iter().all(|l| l.get("offline").is_none_or(|o| o == false)));

    backend.kill9();
    agent.kill9();
    let online_runs = runs();
    let agent = start_agent(&s.dir, port, "app-r4", "i-r4", &s.socket, &args);
    assert!(
        wait_until(Duration::from_secs(30), || runs() >= online_runs + 2),
        "the restarted daemon applies the persisted recipe without a backend: {}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("resuming the persisted recipe"), "{}", agent.log_text());
    // The test holds the backend's listening socket, so the link's attempt is accepted
    // by the kernel and fails only at its 30 s connect timeout.
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log_text()
            .contains("backend unreachable: applying the last known recipe offline")),
        "a backend that does not answer is said once it is known: {}",
        agent.log_text()
    );
    let offline_runs = runs() - online_runs;

    let _backend = listen.start(&s.dir, &s.recipes, &s.statelog, &b_args);
    assert!(
        wait_until(Duration::from_secs(60), || {
            read_jsonl(&s.statelog).iter().filter(|l| l["offline"] == true).count() >= offline_runs
        }),
        "the offline rounds are reported once the backend is back: {:?}\n{}",
        read_jsonl(&s.statelog),
        agent.log_text()
    );
    assert_exactly_once(&s.statelog);
    // Backend and daemon both killed once.
    assert_sent_once(&s, 2, 2);
}
