// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Signed recipes end to end (issue 16): the reference backend signing with
//! `--signing-key`, the daemon, and a root helper whose `--config` holds the public key
//! as `recipe_key`. A signed round is applied; a relay that alters one parameter in
//! transit gets a failing StateLog naming the reason; a replayed older version and a
//! recipe of another app are refused; a restarted helper applies the verified recipe
//! with the backend gone.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const APP: &str = "app-signed";

fn recipe(work: &Path, version: u64, content: &str) -> Value {
    let w = work.display();
    json!({"recipe_version": version, "state": [
        {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/f.conf"), "content": content}},
        {"id": "s-cmd", "module": "linux.cmd", "parameter": {"cmd": format!("echo {content} > {w}/cmd.out")}}
    ]})
}

fn logs_of(statelog: &Path, instance: &str, version: u64) -> Vec<Value> {
    read_jsonl(statelog)
        .into_iter()
        .filter(|l| l["instance_id"] == instance && l["recipe_version"] == version)
        .collect()
}

/// A TCP relay to `port` that rewrites `from` into `to` (same length, so WebSocket
/// frame lengths stay right) in what the backend sends: a man in the middle.
fn altering_relay(port: u16, from: &'static [u8], to: &'static [u8]) -> u16 {
    assert_eq!(from.len(), to.len());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else { continue };
            let (mut c_rd, mut s_wr) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c_rd, &mut s_wr));
            let (mut s_rd, mut c_wr) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = match s_rd.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    let mut i = 0;
                    while i + from.len() <= chunk.len() {
                        if &chunk[i..i + from.len()] == from {
                            chunk[i..i + from.len()].copy_from_slice(to);
                        }
                        i += 1;
                    }
                    if c_wr.write_all(chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    relay_port
}

#[test]
fn only_what_the_backend_signed_runs_and_the_rest_is_reported() {
    let s = setup(APP, |w| recipe(w, 1, "signed-ok"));
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);

    let Some((key_file, conf)) = make_key(dir) else { return };
    let helper_state = dir.join("helper-state");
    let helper_args = ["--config", conf.to_str().unwrap(), "--state-dir", helper_state.to_str().unwrap()];

    let sign = ["--poll-ms", "100", "--signing-key", key_file.to_str().unwrap()];
    let (mut backend, port) = start_backend(dir, recipes, statelog, &sign);
    let mut helper = start_helper_with(dir, socket, &helper_args);

    // 1. A signed round is applied.
    let mut agent = start_agent(dir, port, APP, "i-direct", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, "i-direct", 1).len() >= 2),
        "a signed round expected; agent: {}\nhelper: {}",
        agent.log_text(),
        helper.log_text()
    );
    for l in logs_of(statelog, "i-direct", 1) {
        assert_eq!(l["state_result"], true, "{l}");
    }
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "signed-ok");
    assert!(helper.log_text().contains("signed recipe verified"), "{}", helper.log_text());
    agent.signal(libc_sigterm());
    agent.wait_exit(Duration::from_secs(15));

    // 2. A relay alters one parameter: the helper refuses the recipe, the backend gets a
    // failing StateLog naming the reason, and nothing of it runs.
    let relay = altering_relay(port, b"signed-ok", b"relay-bad");
    let mut relayed = start_agent(dir, relay, APP, "i-relayed", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || !logs_of(statelog, "i-relayed", 1).is_empty()),
        "a failing StateLog expected; agent: {}",
        relayed.log_text()
    );
    let first = &logs_of(statelog, "i-relayed", 1)[0];
    assert_eq!(first["state_result"], false, "{first}");
    let comment = first["state_comment"].as_str().unwrap();
    assert!(comment.contains("refused the signed recipe") && comment.contains("does not verify"), "{comment}");
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "signed-ok");
    assert!(!std::fs::read_to_string(work.join("cmd.out")).unwrap().contains("relay-bad"));
    relayed.signal(libc_sigterm());
    relayed.wait_exit(Duration::from_secs(15));

    // 3. Version 2, then a replay of version 1 (an old backend snapshot signed with the
    // same key): refused as older.
    std::fs::write(recipes.join(format!("{APP}.json")), recipe(work, 2, "signed-v2").to_string()).unwrap();
    let mut agent = start_agent(dir, port, APP, "i-direct", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, "i-direct", 2).len() >= 2),
        "version 2 expected; agent: {}",
        agent.log_text()
    );
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "signed-v2");
    agent.signal(libc_sigterm());
    agent.wait_exit(Duration::from_secs(15));

    let old = dir.join("old");
    std::fs::create_dir_all(old.join("recipes")).unwrap();
    std::fs::write(old.join("recipes").join(format!("{APP}.json")), recipe(work, 1, "replayed!").to_string()).unwrap();
    std::fs::write(old.join("recipes/app-other.json"), recipe(work, 5, "other-app").to_string()).unwrap();
    let old_log = old.join("statelog.jsonl");
    let (_old_backend, old_port) = start_backend(&old, &old.join("recipes"), &old_log, &sign);
    let mut replayed = start_agent(dir, old_port, APP, "i-replayed", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || !logs_of(&old_log, "i-replayed", 1).is_empty()),
        "a failing StateLog expected; agent: {}",
        replayed.log_text()
    );
    let first = &logs_of(&old_log, "i-replayed", 1)[0];
    assert_eq!(first["state_result"], false, "{first}");
    let comment = first["state_comment"].as_str().unwrap();
    assert!(comment.contains("not newer than version 2"), "{comment}");
    replayed.signal(libc_sigterm());
    replayed.wait_exit(Duration::from_secs(15));

    // 4. A recipe the same key signed for another app.
    let mut other = start_agent(dir, old_port, "app-other", "i-other", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || !logs_of(&old_log, "i-other", 5).is_empty()),
        "a failing StateLog expected; agent: {}",
        other.log_text()
    );
    let first = &logs_of(&old_log, "i-other", 5)[0];
    assert_eq!(first["state_result"], false, "{first}");
    let comment = first["state_comment"].as_str().unwrap();
    assert!(comment.contains("signed for app \"app-other\""), "{comment}");
    other.signal(libc_sigterm());
    other.wait_exit(Duration::from_secs(15));
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "signed-v2");

    // 5. The helper restarts, the backend is gone: the daemon's kept recipe runs, and
    // the helper verifies it against its own kept copy.
    backend.kill9();
    helper.kill9();
    std::fs::remove_file(socket).unwrap();
    std::fs::remove_file(work.join("f.conf")).unwrap();
    let helper = start_helper_with(dir, socket, &helper_args);
    assert!(
        wait_until(Duration::from_secs(10), || helper.log_text().contains("verified recipe read back")),
        "{}",
        helper.log_text()
    );
    let agent = start_agent(dir, port, APP, "i-direct", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || work.join("f.conf").exists()),
        "the kept recipe applied offline; agent: {}\nhelper: {}",
        agent.log_text(),
        helper.log_text()
    );
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "signed-v2");
    assert!(agent.log_text().contains("the helper verifies recipes"), "{}", agent.log_text());
}

/// The key an operator makes (`minisign -G -W`, no password) and a helper
/// configuration trusting it: (secret key file, configuration file). `None`: minisign
/// cannot make a key here (said on stderr).
fn make_key(dir: &Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let key_file = dir.join("recipes.key");
    let pub_file = dir.join("recipes.pub");
    let made = std::process::Command::new("minisign")
        .args(["-G", "-W", "-f", "-p"])
        .arg(&pub_file)
        .arg("-s")
        .arg(&key_file)
        .output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        skip(&format!("minisign cannot make a key here ({made:?}); signed recipes end to end not run"));
        return None;
    }
    let public = std::fs::read_to_string(&pub_file).unwrap().lines().nth(1).unwrap().to_string();
    let conf = dir.join("opsagent.conf");
    std::fs::write(&conf, format!("[userdata]\napp_id = {APP}\nrecipe_key = {public}\n")).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).unwrap();
    Some((key_file, conf))
}

/// #18 item 3 in signed mode: a signed recipe with a state whose id is unusable is still
/// verified by the helper, so the states before it run and that state fails with its own
/// StateLog naming the problem — not the whole recipe refused.
#[test]
fn a_bad_state_of_a_signed_recipe_fails_alone() {
    let s = setup(APP, |w| {
        json!({"recipe_version": 1, "state": [
            {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{}/f.conf", w.display()), "content": "before"}},
            {"id": "", "module": "linux.file", "parameter": {"path": format!("{}/bad.conf", w.display()), "content": "bad"}}
        ]})
    });
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);
    let Some((key_file, conf)) = make_key(dir) else { return };
    let helper_state = dir.join("helper-state");
    let helper_args = ["--config", conf.to_str().unwrap(), "--state-dir", helper_state.to_str().unwrap()];
    let sign = ["--poll-ms", "100", "--signing-key", key_file.to_str().unwrap()];
    let (_backend, port) = start_backend(dir, recipes, statelog, &sign);
    let helper = start_helper_with(dir, socket, &helper_args);
    let mut agent = start_agent(dir, port, APP, "i-bad", socket, &["--round-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || logs_of(statelog, "i-bad", 1).len() >= 2),
        "two StateLogs expected; agent: {}\nhelper: {}",
        agent.log_text(),
        helper.log_text()
    );
    let logs = logs_of(statelog, "i-bad", 1);
    assert_eq!((&logs[0]["stateid"], &logs[0]["state_result"]), (&json!("s-file"), &json!(true)), "{}", logs[0]);
    assert_eq!((&logs[1]["stateid"], &logs[1]["state_result"]), (&json!(""), &json!(false)), "{}", logs[1]);
    let comment = logs[1]["state_comment"].as_str().unwrap();
    assert!(comment.contains("state id \"\" is empty"), "{comment}");
    assert_eq!(std::fs::read_to_string(work.join("f.conf")).unwrap(), "before");
    assert!(!work.join("bad.conf").exists());
    agent.signal(libc_sigterm());
    agent.wait_exit(Duration::from_secs(15));
}

fn libc_sigterm() -> i32 {
    15
}

/// Says on stderr that the test cannot run here; fails instead where every test must
/// run (`OPSAGENT_TEST_NO_SKIP=1`, as CI sets it).
fn skip(what: &str) {
    assert!(
        std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
        "{what}, but OPSAGENT_TEST_NO_SKIP is set: this machine must run it"
    );
    eprintln!("{what}");
}
