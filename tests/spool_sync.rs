// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The spool's promise, seen from the system calls of a real daemon: a StateLog is in the
//! spool and synced (`fdatasync` of `spool.log`) before anything is written to the
//! backend's socket after it, so a StateLog the backend received is never lost by a
//! crash of the agent's host, and one it did not receive is resent from the spool.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

/// strace present, or the test is skipped — except where `OPSAGENT_TEST_NO_SKIP` is set
/// (CI): there it fails.
fn have_strace() -> bool {
    let found = Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
            "strace is not installed, but OPSAGENT_TEST_NO_SKIP is set: this machine must run the test"
        );
        eprintln!("SKIPPED: strace is not installed");
    }
    found
}

/// The number in `= N` at the end of a system call's line.
fn result_fd(line: &str) -> Option<u32> {
    line.rsplit_once("= ")?.1.split_whitespace().next()?.parse().ok()
}

/// The first argument of a call named in `calls` on this line, if it is `fd`.
fn call_on(line: &str, calls: &[&str], fd: u32) -> bool {
    calls.iter().any(|c| line.contains(&format!(" {c}({fd},")) || line.contains(&format!(" {c}({fd})")))
}

#[test]
fn a_statelog_is_synced_in_the_spool_before_it_is_sent() {
    if !have_strace() {
        return;
    }
    let s = setup("app-sync", |w| {
        json!({"component": {"init": {"state": [
            {"id": "s-sync", "module": "linux.dir", "parameter": {"path": [format!("{}/d", w.display())]}}
        ]}}})
    });
    let (dir, statelog, socket) = (s.dir.as_path(), &s.statelog, &s.socket);
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(dir, socket);

    let conf = dir.join("empty.conf");
    std::fs::write(&conf, "").unwrap();
    let trace = dir.join("agent.strace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-s",
        "300",
        "-e",
        "trace=openat,connect,pwrite64,write,writev,sendto,sendmsg,fdatasync,fsync",
    ])
    .arg("-o")
    .arg(&trace)
    .arg(bin("opsagent"))
    .arg("run")
    .arg("--config")
    .arg(&conf)
    .arg("--ws-uri")
    .arg(format!("ws://127.0.0.1:{port}/"))
    .args(["--app-id", "app-sync", "--instance-id", "i-sync"])
    .arg("--token-file")
    .arg(dir.join("i-sync.token"))
    .arg("--state-dir")
    .arg(dir.join("i-sync.state"))
    .arg("--helper-socket")
    .arg(socket)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null());
    let mut agent = spawn_logged("agent-i-sync", cmd, dir);
    let received = wait_until(Duration::from_secs(60), || {
        read_jsonl(statelog).iter().any(|l| l["id"] == "s-sync" && l["state_result"] == true)
    });
    // The daemon (strace's child) is stopped first: killing strace alone would leave it
    // running, detached.
    let strace = agent.pid();
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap_or_default();
    for pid in children.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let _ = agent.wait_exit(Duration::from_secs(20));
    assert!(received, "no StateLog of s-sync; agent: {}", agent.log_text());

    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let spool_fds: Vec<u32> = lines
        .iter()
        .filter(|l| l.contains("openat(") && l.contains("/spool.log\""))
        .filter_map(|l| result_fd(l))
        .collect();
    assert!(!spool_fds.is_empty(), "the spool log was never opened:\n{text}");
    let backend_fds: Vec<u32> = lines
        .iter()
        .filter(|l| l.contains("connect(") && l.contains(&format!("sin_port=htons({port})")))
        .filter_map(|l| l.split("connect(").nth(1)?.split(',').next()?.trim().parse().ok())
        .collect();
    assert!(!backend_fds.is_empty(), "no connection to the backend in the trace:\n{text}");
    // The StateLog's record written to the spool…
    let (record, spool) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            spool_fds
                .iter()
                .find(|fd| call_on(l, &["pwrite64", "write"], **fd) && l.contains("s-sync"))
                .map(|fd| (i, *fd))
        })
        .unwrap_or_else(|| panic!("the StateLog of s-sync was never written to the spool:\n{text}"));
    // …synced (the call finished: a call cut by another thread's line ends in a
    // `resumed` line)…
    let synced = lines
        .iter()
        .enumerate()
        .skip(record)
        .find(|(_, l)| {
            (call_on(l, &["fdatasync", "fsync"], spool) && !l.contains("unfinished"))
                || l.contains("<... fdatasync resumed>")
                || l.contains("<... fsync resumed>")
        })
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("the spool was not synced after the StateLog's record:\n{text}"));
    // …before anything more goes to the backend.
    let sent = lines
        .iter()
        .enumerate()
        .skip(record)
        .find(|(_, l)| backend_fds.iter().any(|fd| call_on(l, &["write", "writev", "sendto", "sendmsg"], *fd)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("nothing was sent to the backend after the StateLog's record:\n{text}"));
    assert!(synced < sent, "the StateLog left for the backend before the spool was synced:\n{text}");
}
