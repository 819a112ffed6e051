// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `opsagent-backend` on a socket handed over the systemd way (`LISTEN_FDS`): it serves
//! a daemon, a backend killed with SIGKILL is replaced on the same socket with no bind
//! and no StateLog lost, and a socket that is not for it, or not a listening TCP socket,
//! is refused with a message that says which.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn counting_recipe(work: &Path) -> serde_json::Value {
    json!({"state": [{"id": "count", "module": "linux.cmd",
        "parameter": {"cmd": "echo run >> runs", "cwd": work.display().to_string()}}]})
}

/// Sequence numbers 1..=max each recorded, none twice.
fn assert_none_lost(statelog: &Path) {
    let seqs: Vec<u64> = read_jsonl(statelog).iter().map(|l| l["seq"].as_u64().expect("seq")).collect();
    let set: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(set.len(), seqs.len(), "doubled: {seqs:?}");
    let max = *set.last().unwrap();
    let missing: Vec<u64> = (1..=max).filter(|s| !set.contains(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?} of {seqs:?}");
}

#[test]
fn a_backend_killed_with_sigkill_is_replaced_on_the_same_socket_and_loses_nothing() {
    let s = setup("app-sa", counting_recipe);
    let listen = BackendSocket::bind();
    let mut backend = listen.start(&s.dir, &s.recipes, &s.statelog, &["--poll-ms", "100"]);
    let _helper = start_helper(&s.dir, &s.socket);
    let agent = start_agent(&s.dir, listen.port, "app-sa", "i-sa", &s.socket, &["--round-delay", "1"]);
    assert!(wait_until(Duration::from_secs(30), || read_jsonl(&s.statelog).len() >= 2), "{}", agent.log_text());

    for round in 0..2 {
        let lost = agent.log_text().matches("backend connection lost").count();
        backend.kill9();
        assert!(
            wait_until(Duration::from_secs(30), || agent.log_text().matches("backend connection lost").count() > lost),
            "the agent never noticed the dead backend: {}",
            agent.log_text()
        );
        // No backend runs, yet the port is still taken: nobody can have it meanwhile.
        let taken = std::net::TcpListener::bind(("127.0.0.1", listen.port));
        assert!(taken.is_err(), "the port was free while the backend was down (restart {round})");
        let before = read_jsonl(&s.statelog).len();
        backend = listen.start(&s.dir, &s.recipes, &s.statelog, &["--poll-ms", "100"]);
        assert!(
            wait_until(Duration::from_secs(60), || read_jsonl(&s.statelog).len() >= before + 2),
            "the agent is served again by the new backend: {}\nbackend: {}",
            agent.log_text(),
            backend.log_text()
        );
        assert!(!backend.log_text().contains("cannot listen"), "{}", backend.log_text());
    }
    assert_none_lost(&s.statelog);
}

/// A backend given `fd` the systemd way (and `LISTEN_PID` if set): it must exit at once
/// with an error; returns what it said.
fn refused(dir: &Path, fd: &impl AsFd, listen_pid: Option<&str>, name: &str) -> String {
    let mut cmd = Command::new(bin("opsagent-backend"));
    cmd.arg("--recipe-dir").arg(dir.join("recipes")).arg("--statelog").arg(dir.join("statelog.jsonl"));
    let inherited = hand_over(&mut cmd, fd);
    if let Some(pid) = listen_pid {
        cmd.env("LISTEN_PID", pid);
    }
    let mut p = spawn_logged(name, cmd, dir);
    drop(inherited);
    let status = p.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| panic!("{name}: the backend kept running"));
    assert!(!status.success(), "{name}: {status}");
    let text = p.log_text();
    assert!(text.contains("cannot use the socket systemd passed"), "{name}: {text}");
    text
}

#[test]
fn a_socket_for_another_process_or_not_a_listening_tcp_socket_is_refused_by_name() {
    let s = setup("app-sb", counting_recipe);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();

    // LISTEN_PID names someone else (pid 1): the socket is not ours to serve.
    let text = refused(&s.dir, &listener, Some("1"), "other-pid");
    assert!(text.contains("LISTEN_PID=\"1\" names another process"), "{text}");

    // A regular file.
    let file = std::fs::File::open(s.recipes.join("app-sb.json")).unwrap();
    let text = refused(&s.dir, &file, None, "file");
    assert!(text.contains("is not a TCP socket") && text.contains("not a socket"), "{text}");

    // A Unix socket.
    let unix = std::os::unix::net::UnixListener::bind(s.dir.join("u.sock")).unwrap();
    let text = refused(&s.dir, &unix, None, "unix");
    assert!(text.contains("is not a TCP socket"), "{text}");

    // A TCP socket, but a connection, not a listener.
    let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let text = refused(&s.dir, &stream, None, "connected");
    assert!(text.contains("TCP socket that is not listening"), "{text}");
}
