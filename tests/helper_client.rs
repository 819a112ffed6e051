// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The daemon's helper client against the real helper binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use opsagent::download::{DownloadSettings, Downloader};
use opsagent::helper_client::{cancel_pair, Cancel, Fetcher, HelperClient, Next, UnixHelperClient};
use opsagent_proto::catalogue::parse_state;
use opsagent_proto::newtypes::{AbsPath, StateId};
use opsagent_proto::request::{ApplyRequest, FetchedFile};
use serde_json::json;

fn req(id: &str, module: &str, params: serde_json::Value) -> ApplyRequest {
    ApplyRequest::new(StateId::parse(id).unwrap(), 1, parse_state(module, &params).unwrap().params)
}

#[tokio::test]
async fn a_connection_closed_by_the_helper_while_idle_is_reopened_transparently() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let mut cmd = Command::new(bin("opsagent-helper"));
    let log = tmp.path().join("helper.log");
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--idle-timeout")
        .arg("1")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || socket.exists()));
    let client = UnixHelperClient::new(&socket, "test");
    let file = tmp.path().join("f");
    let r = req("s1", "linux.file", json!({"path": file.display().to_string(), "content": "1"}));
    assert!(client.apply(r.clone(), Cancel::never()).await.unwrap().result);
    // The helper closes idle connections after 1 s (seen in its log, so that the
    // reconnection below really runs); the next request still succeeds.
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || read_log().contains("closing an idle connection")),
        "the helper never closed the idle connection: {}",
        read_log()
    );
    let o = client.apply(r, Cancel::never()).await.unwrap();
    assert!(o.result && o.changes.is_empty(), "{o:?}");
    assert!(client.status().await.is_ok());
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn cancelling_a_running_command_returns_a_cancelled_outcome_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = UnixHelperClient::new(&socket, "test");
    let (handle, cancel) = cancel_pair();
    // The command says it runs: the cancel then certainly meets a running command (a
    // fixed pause could cancel before the helper even started it). Its marker names its
    // sleep among the host's processes.
    let running = tmp.path().join("running");
    let marker = format!("sleep 3{}", std::process::id() % 100_000 + 100_000);
    let cmd = format!("touch {}; {marker}", running.display());
    let r = req("long", "linux.cmd", json!({"cmd": cmd, "cwd": tmp.path().display().to_string()}));
    let run = tokio::spawn(async move { client.apply(r, cancel).await });
    // (Waited for on the runtime: the request runs on this test's thread.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !running.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sleeping = || Command::new("pgrep").arg("-f").arg(&marker).status().is_ok_and(|s| s.success());
    assert!(sleeping(), "the command's sleep runs");
    handle.cancel();
    // Prompt: the outcome is back while the command, left alone, would sleep for over a
    // day, and its process is gone (killed, not waited for). The deadline only ends a
    // broken build's run; how long a loaded machine takes is not what is tested.
    let o = tokio::time::timeout(Duration::from_secs(120), run).await.expect("prompt").unwrap().unwrap();
    assert!(o.cancelled && !o.result, "{o:?}");
    assert!(wait_until(Duration::from_secs(30), || !sleeping()), "the cancelled command's sleep was killed");
}

fn fetched_file(url: &str, path: &std::path::Path, content: &[u8]) -> FetchedFile {
    use sha2::Digest;
    FetchedFile {
        url: url.to_string(),
        path: AbsPath::parse(&path.display().to_string()).unwrap(),
        size: content.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(content)),
    }
}

/// The helper takes no path from the daemon on trust: a "download" that the connected
/// peer (root here) does not own is refused, so the daemon cannot have root copy a file
/// it could not read itself.
#[tokio::test]
async fn fetched_files_not_owned_by_the_peer_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_helper, socket) = helper_in(tmp.path());
    let client = UnixHelperClient::new(&socket, "test");
    let target = tmp.path().join("out.conf");
    let url = "http://127.0.0.1:9/remote.conf";
    let params = json!({"path": target.display().to_string(), "remote_uri": url});

    // Without a fetcher the client cannot satisfy the helper's NeedFetch.
    let o = client.apply(req("r", "linux.file", params.clone()), Cancel::never()).await.unwrap();
    assert!(!o.result && o.comment.contains(&format!("needs {url} downloaded")), "{o:?}");

    let dl = tmp.path().join("download");
    std::fs::write(&dl, "secret of uid 65534").unwrap();
    std::os::unix::fs::chown(&dl, Some(65534), Some(65534)).unwrap();
    let mut r = req("r", "linux.file", params);
    r.fetched = vec![fetched_file(url, &dl, b"secret of uid 65534")];
    let o = client.apply(r.clone(), Cancel::never()).await.unwrap();
    assert!(!o.result, "{o:?}");
    assert!(o.comment.contains("is owned by uid 65534, not by the requesting agent (uid 0)"), "{}", o.comment);
    assert!(!target.exists());

    // A link to a file the peer owns is refused too (O_NOFOLLOW).
    std::os::unix::fs::chown(&dl, Some(0), Some(0)).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&dl, &link).unwrap();
    r.fetched = vec![fetched_file(url, &link, b"secret of uid 65534")];
    let o = client.apply(r.clone(), Cancel::never()).await.unwrap();
    assert!(!o.result && o.comment.ends_with("is a symbolic link"), "{o:?}");

    // Owned by the peer, announced correctly: used.
    r.fetched = vec![fetched_file(url, &dl, b"secret of uid 65534")];
    let o = client.apply(r, Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret of uid 65534");
}

/// A helper serving `dir/h.sock`, keeping its state in `dir/hs`.
fn helper_in(dir: &std::path::Path) -> (Proc, std::path::PathBuf) {
    let socket = dir.join("h.sock");
    let helper = start_helper_with(dir, &socket, &["--state-dir", &dir.join("hs").display().to_string()]);
    (helper, socket)
}

/// A client of the helper at `socket` that downloads what it is asked for into
/// `fetch_dir` (one attempt, 1 MiB at most), sweeping what it finds there first.
fn fetching_client(socket: &std::path::Path, fetch_dir: &std::path::Path) -> UnixHelperClient {
    let downloader = Downloader::new(DownloadSettings { attempts: 1, ..DownloadSettings::default() }).unwrap();
    let fetcher = Fetcher::new(downloader, fetch_dir.to_path_buf(), 1 << 20).unwrap();
    UnixHelperClient::new(socket, "test").with_fetcher(fetcher)
}

/// The client answers NeedFetch by downloading into its fetch directory, sends the
/// request again, and removes the download afterwards.
#[tokio::test]
async fn the_client_downloads_what_the_helper_asks_for() {
    let tmp = tempfile::tempdir().unwrap();
    let (_helper, socket) = helper_in(tmp.path());
    let files = Files::start();
    let url = files.put("motd", b"hello from afar\n".to_vec());
    let fetch_dir = tmp.path().join("fetch");
    std::fs::create_dir(&fetch_dir).unwrap();
    std::fs::write(fetch_dir.join("fetch-1-0"), "left by a crash").unwrap();
    let client = fetching_client(&socket, &fetch_dir);
    assert_eq!(std::fs::read_dir(&fetch_dir).unwrap().count(), 0, "leftovers are swept at start");
    let target = tmp.path().join("motd");
    let r = req("m", "linux.file", json!({"path": target.display().to_string(), "remote_uri": url}));
    let o = client.apply(r.clone(), Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello from afar\n");
    let o = client.apply(r, Cancel::never()).await.unwrap();
    assert!(o.result && !o.changed(), "{o:?}");
    assert_eq!(files.hits("motd"), 2);
    assert_eq!(std::fs::read_dir(&fetch_dir).unwrap().count(), 0, "downloads are removed after use");

    let missing = req(
        "x",
        "linux.file",
        json!({"path": target.display().to_string(), "remote_uri": format!("{}/nope", files.base)}),
    );
    let o = client.apply(missing, Cancel::never()).await.unwrap();
    assert!(!o.result && o.comment == format!("download failed: {}/nope: HTTP 404", files.base), "{o:?}");
}

/// Prerequisites (the adaptor's `require` entries) through the real helper: the install
/// is a package state the helper's policy judges; refused, the state fails naming the
/// package, and nothing was installed. Off, the state goes to the helper as it is and
/// fails naming the package to install.
#[tokio::test]
async fn missing_prerequisites_are_installed_through_the_helpers_policy_or_named() {
    use opsagent::prereq::Prerequisites;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // A policy that allows one package only (root-owned, in a root-only directory).
    let policy_dir = tmp.path().join("policy");
    std::fs::create_dir(&policy_dir).unwrap();
    std::fs::set_permissions(&policy_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = policy_dir.join("helper.policy");
    std::fs::write(&policy, "packages = nginx\n").unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper_with(tmp.path(), &socket, &["--policy", policy.to_str().unwrap()]);
    // The host as the daemon sees it: apt, and no selinux tools.
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("usr/bin/apt-get"), "").unwrap();
    let state = || req("se-1", "linux.selinux", json!({"mode": "permissive"}));

    let on = Prerequisites::new(UnixHelperClient::new(&socket, "test"), true).with_root(&root);
    let out = on.apply(state(), Cancel::never()).await.unwrap();
    assert!(!out.result, "{out:?}");
    assert!(
        out.comment.starts_with(
            "prerequisite setsebool (package selinux-utils policycoreutils) could not be installed with apt: "
        ) && out.comment.contains("packages"),
        "{}",
        out.comment
    );
    assert!(out.changes.is_empty());

    // Off: no install asked; the helper's own message names the package.
    let off = Prerequisites::new(UnixHelperClient::new(&socket, "test"), false).with_root(&root);
    let out = off.apply(state(), Cancel::never()).await.unwrap();
    assert!(!out.result && !out.comment.contains("prerequisite"), "{}", out.comment);
    assert!(out.comment.contains("is not installed") && out.comment.contains("selinux-utils"), "{}", out.comment);
}

fn next(req: ApplyRequest) -> (Next, opsagent::helper_client::CancelHandle) {
    let (handle, withdraw) = cancel_pair();
    (Next { req: std::sync::Arc::new(req), signed: None, withdraw }, handle)
}

/// A pipelined round through the real helper: the state after the one applied runs as
/// soon as that one succeeds, before the round asks for it, and asking for it then
/// collects its outcome (it is not applied a second time); behind a failed state it
/// does not run, and asking for it then runs it.
#[tokio::test]
async fn the_next_state_runs_ahead_only_behind_a_success_and_is_collected_not_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = UnixHelperClient::new(&socket, "test");
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let file =
        |id: &str, p: &std::path::Path| req(id, "linux.file", json!({"path": p.display().to_string(), "content": id}));

    let (n, _keep) = next(file("b", &b));
    let o = client.apply_then(file("a", &a), None, vec![n], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "{o:?}");
    // Nobody asked for b yet, and it is there.
    assert!(wait_until(Duration::from_secs(20), || b.exists()), "the state sent ahead did not run");
    let o = client.apply_then(file("b", &b), None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "the outcome of the state that ran ahead, not of a second run: {o:?}");

    let fails = req("f", "linux.cmd", json!({"cmd": "exit 2", "cwd": "/"}));
    let (n, _keep) = next(file("c", &c));
    let o = client.apply_then(fails, None, vec![n], Cancel::never()).await.unwrap();
    assert!(!o.result, "{o:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!c.exists(), "a state sent behind a failed one ran");
    // The round restarts; later it asks for c, which runs then (its not-run answer is
    // not taken for its outcome).
    let o = client.apply_then(file("c", &c), None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed() && c.exists(), "{o:?}");
    assert!(client.status().await.is_ok());
}

/// A line of states sent ahead through the real helper: each runs as soon as the one
/// before it succeeds, all before the round asks for them, and asking then collects each
/// (none runs twice); behind one that fails, the rest of the line does not run, and
/// asking for them then runs each.
#[tokio::test]
async fn a_line_of_states_runs_ahead_behind_successes_and_stops_at_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = std::sync::Arc::new(UnixHelperClient::new(&socket, "test"));
    let path = |name: &str| tmp.path().join(name);
    let file = |id: &str| req(id, "linux.file", json!({"path": path(id).display().to_string(), "content": id}));
    let line = |reqs: Vec<ApplyRequest>| -> (Vec<Next>, opsagent::helper_client::CancelHandle) {
        let (handle, withdraw) = cancel_pair();
        let line = reqs
            .into_iter()
            .map(|req| Next { req: std::sync::Arc::new(req), signed: None, withdraw: withdraw.clone() })
            .collect();
        (line, handle)
    };

    // The first waits for a gate, so that the whole line is sent while it runs.
    let gate = path("gate");
    let waits = req(
        "a",
        "linux.cmd",
        json!({"cmd": format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display()), "cwd": "/"}),
    );
    let (ahead, _keep) = line(vec![file("b"), file("c"), file("d")]);
    let c = std::sync::Arc::clone(&client);
    let run = tokio::spawn(async move { c.apply_then(waits, None, ahead, Cancel::never()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!path("b").exists(), "a state sent ahead ran before the one it follows ended");
    std::fs::write(&gate, "").unwrap();
    assert!(run.await.unwrap().unwrap().result);
    // Nobody asked for b, c or d yet, and they are there.
    assert!(wait_until(Duration::from_secs(20), || path("d").exists()), "the line sent ahead did not run");
    for (id, rest) in [("b", vec![file("c"), file("d")]), ("c", vec![file("d")]), ("d", vec![])] {
        let (ahead, _keep) = line(rest);
        let o = client.apply_then(file(id), None, ahead, Cancel::never()).await.unwrap();
        assert!(o.result && o.changed(), "the outcome of {id} that ran ahead, not of a second run: {o:?}");
    }

    // Behind a failure: e runs, f fails, g and h do not run.
    let fails = || req("f", "linux.cmd", json!({"cmd": "exit 2", "cwd": "/"}));
    let (ahead, _keep) = line(vec![fails(), file("g"), file("h")]);
    assert!(client.apply_then(file("e"), None, ahead, Cancel::never()).await.unwrap().result);
    let (ahead, _keep) = line(vec![file("g"), file("h")]);
    assert!(!client.apply_then(fails(), None, ahead, Cancel::never()).await.unwrap().result);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!path("g").exists() && !path("h").exists(), "a state sent behind a failed one ran");
    // The round restarts from g (a plan goes on): each runs when asked for.
    let (ahead, _keep) = line(vec![file("h")]);
    let o = client.apply_then(file("g"), None, ahead, Cancel::never()).await.unwrap();
    assert!(o.result && o.changed() && path("g").exists(), "{o:?}");
    let o = client.apply_then(file("h"), None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed() && path("h").exists(), "{o:?}");
    assert!(client.status().await.is_ok());
}

/// The round will not go on (a new recipe, a stop): the state sent ahead is withdrawn
/// while the one before still runs, and never runs; one that had already started when
/// the round asked for something else is the running state: it is let finish before the
/// next request goes, and the connection stays usable.
#[tokio::test]
async fn a_state_sent_ahead_is_withdrawn_or_let_finish_when_the_round_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = std::sync::Arc::new(UnixHelperClient::new(&socket, "test"));
    let (gate, started, never) = (tmp.path().join("gate"), tmp.path().join("started"), tmp.path().join("never"));
    let waits = req(
        "w",
        "linux.cmd",
        json!({"cmd": format!("touch {}; while [ ! -e {} ]; do sleep 0.05; done", started.display(), gate.display()), "cwd": "/"}),
    );
    let (n, withdraw) = next(req("n", "linux.file", json!({"path": never.display().to_string(), "content": "x"})));
    let c = std::sync::Arc::clone(&client);
    let run = tokio::spawn(async move { c.apply_then(waits, None, vec![n], Cancel::never()).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    withdraw.cancel();
    // Let the withdrawal reach the helper while the state before still runs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&gate, "").unwrap();
    let o = run.await.unwrap().unwrap();
    assert!(o.result, "the running state finishes: {o:?}");
    assert!(client.status().await.is_ok());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!never.exists(), "a withdrawn state ran");

    // Started ahead, then not the state the round asks for: it ends before that one goes.
    let (ahead_started, ahead_done) = (tmp.path().join("ahead-started"), tmp.path().join("ahead-done"));
    let long = req(
        "long",
        "linux.cmd",
        json!({"cmd": format!("touch {}; sleep 1; touch {}", ahead_started.display(), ahead_done.display()), "cwd": "/"}),
    );
    let (n, _keep) = next(long);
    let quick = req("q", "linux.file", json!({"path": tmp.path().join("q").display().to_string(), "content": "q"}));
    assert!(client.apply_then(quick, None, vec![n], Cancel::never()).await.unwrap().result);
    assert!(wait_until(Duration::from_secs(60), || ahead_started.exists()), "the state sent ahead did not start");
    let other = req("o", "linux.file", json!({"path": tmp.path().join("o").display().to_string(), "content": "o"}));
    let o = client.apply_then(other, None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "{o:?}");
    assert!(ahead_done.exists(), "the state that had started ahead was cut short");
}

/// A stop (or a re-run) seen by the round while the state before it was answered: the
/// helper had already started the state sent ahead (the one before succeeded), so it is
/// now the running state, and "a stop lets the running state finish". It must not be
/// cut short by the withdrawal, nor its outcome dropped.
#[tokio::test]
async fn a_state_already_started_ahead_when_the_round_stops_is_let_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = std::sync::Arc::new(UnixHelperClient::new(&socket, "test"));
    let (gate, started) = (tmp.path().join("gate"), tmp.path().join("started"));
    let (b_started, b_done) = (tmp.path().join("b-started"), tmp.path().join("b-done"));
    let a = req(
        "a",
        "linux.cmd",
        json!({"cmd": format!("touch {}; while [ ! -e {} ]; do sleep 0.05; done", started.display(), gate.display()), "cwd": "/"}),
    );
    let b = req(
        "b",
        "linux.cmd",
        json!({"cmd": format!("touch {}; sleep 1; touch {}", b_started.display(), b_done.display()), "cwd": "/"}),
    );
    let (n, withdraw) = next(b);
    let c = std::sync::Arc::clone(&client);
    let run = tokio::spawn(async move { c.apply_then(a, None, vec![n], Cancel::never()).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The runtime's one thread is held from here: a finishes, the helper answers it and
    // starts b at once, before the daemon has read that answer.
    std::fs::write(&gate, "").unwrap();
    assert!(wait_until(Duration::from_secs(20), || b_started.exists()), "b did not start ahead");
    // Now the round sees a stop: the engine fires the withdrawal (run_helper).
    withdraw.cancel();
    let o = run.await.unwrap().unwrap();
    assert!(o.result, "{o:?}");
    // The next use of the connection (a status, or the next round's first state).
    assert!(client.status().await.is_ok());
    assert!(
        wait_until(Duration::from_secs(10), || b_done.exists()),
        "b, which the helper had started before the stop was seen, was killed half-way (and its outcome dropped)"
    );
}

/// A large state (over 64 KiB of request: content given inline) is not sent ahead: a
/// helper with a smaller frame limit would close the connection, and the running state
/// with it. It goes when its turn comes.
#[tokio::test]
async fn a_large_state_is_not_sent_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("h.sock");
    let _helper = start_helper(tmp.path(), &socket);
    let client = UnixHelperClient::new(&socket, "test");
    let (a, big) = (tmp.path().join("a"), tmp.path().join("big"));
    let content = "x".repeat(70 * 1024);
    let big_req = req("big", "linux.file", json!({"path": big.display().to_string(), "content": content}));
    let (n, _keep) = next(big_req.clone());
    let first = req("a", "linux.file", json!({"path": a.display().to_string(), "content": "a"}));
    assert!(client.apply_then(first, None, vec![n], Cancel::never()).await.unwrap().result);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!big.exists(), "a large state was sent ahead");
    let o = client.apply_then(big_req, None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed() && big.exists(), "{o:?}");
}

/// Pipelined with downloads: the state sent ahead behind one that asks for downloads is
/// not run (`need-fetch` is not a success); after the download the first state is sent
/// again with its file and the next one ahead of it once more, and both end applied,
/// each once.
#[tokio::test]
async fn a_state_sent_ahead_behind_a_download_runs_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_helper, socket) = helper_in(tmp.path());
    let files = Files::start();
    let url = files.put("motd", b"hello from afar\n".to_vec());
    let fetch_dir = tmp.path().join("fetch");
    let client = fetching_client(&socket, &fetch_dir);
    let (target, after) = (tmp.path().join("motd"), tmp.path().join("after"));
    let remote = req("m", "linux.file", json!({"path": target.display().to_string(), "remote_uri": url}));
    let local = req("l", "linux.file", json!({"path": after.display().to_string(), "content": "l"}));
    let (n, _keep) = next(local.clone());
    let o = client.apply_then(remote, None, vec![n], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello from afar\n");
    assert!(wait_until(Duration::from_secs(20), || after.exists()), "the state sent again ahead did not run");
    let o = client.apply_then(local, None, vec![], Cancel::never()).await.unwrap();
    assert!(o.result && o.changed(), "collected from its run ahead, not run a second time: {o:?}");
    assert_eq!(files.hits("motd"), 1);
    assert!(client.status().await.is_ok());
}

/// A fake helper's socket, and a client of it.
fn fake_helper(dir: &std::path::Path) -> (tokio::net::UnixListener, std::sync::Arc<UnixHelperClient>) {
    let socket = dir.join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    (listener, std::sync::Arc::new(UnixHelperClient::new(&socket, "test")))
}

/// The fake helper's side of the client's connection, once it answered the client's
/// `hello` as a helper taking a line of 8.
async fn fake_greet(listener: &tokio::net::UnixListener) -> tokio::net::UnixStream {
    use opsagent_proto::request::{Reply, Request};
    let (mut s, _) = listener.accept().await.unwrap();
    let hello = fake_read(&mut s).await;
    assert!(matches!(hello.request, Request::Hello { .. }), "{hello:?}");
    let reply = Reply::Hello {
        protocol_version: opsagent_proto::HELPER_PROTOCOL_VERSION,
        helper_version: "fake".into(),
        signed_recipes: false,
        pipelining: true,
        ahead: 8,
    };
    fake_reply(&mut s, hello.id, reply).await;
    s
}

/// The next request a fake helper reads.
async fn fake_read(s: &mut tokio::net::UnixStream) -> opsagent_proto::request::RequestFrame {
    let read = opsagent_proto::codec::read_frame(s, opsagent_proto::codec::DEFAULT_MAX_FRAME);
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("a request in time").unwrap().expect("open")
}

async fn fake_reply(s: &mut tokio::net::UnixStream, id: u64, reply: opsagent_proto::request::Reply) {
    let frame = opsagent_proto::request::ReplyFrame { id, reply };
    opsagent_proto::codec::write_frame(s, &frame, opsagent_proto::codec::DEFAULT_MAX_FRAME).await.unwrap();
}

/// A round that moves on withdraws its whole line, and the helper reads those
/// withdrawals one at a time: between two of them the running state may end, and the
/// helper then starts the next waiting one unless it was already taken back. So the
/// first withdrawal must name the head of the line (the one that starts next; those
/// behind it can then never run, each following the one before). Here a helper faithful
/// to the protocol ends its running state (a success) just after reading each
/// withdrawal: nothing of the line may start, since every start would come after the
/// round said it would not go on.
#[tokio::test]
async fn a_withdrawn_line_is_taken_back_from_its_head() {
    use opsagent_proto::request::{ErrorCode, HelperError, Outcome, Reply, Request, RequestFrame};
    use std::collections::VecDeque;

    let tmp = tempfile::tempdir().unwrap();
    let (listener, client) = fake_helper(tmp.path());
    let file =
        |id: &str| req(id, "linux.file", json!({"path": tmp.path().join(id).display().to_string(), "content": id}));
    let (withdraw_handle, withdraw) = cancel_pair();
    let ahead: Vec<Next> = (1..=8)
        .map(|i| Next { req: std::sync::Arc::new(file(&format!("s{i}"))), signed: None, withdraw: withdraw.clone() })
        .collect();
    let (c, first) = (std::sync::Arc::clone(&client), file("s0"));
    let run = tokio::spawn(async move { c.apply_then(first, None, ahead, Cancel::never()).await });

    let mut s = fake_greet(&listener).await;
    let first = fake_read(&mut s).await;
    assert!(first.after.is_none(), "{first:?}");
    let mut waiting: VecDeque<RequestFrame> = VecDeque::new();
    let mut after = first.id;
    for _ in 0..8 {
        let frame = fake_read(&mut s).await;
        assert_eq!(frame.after, Some(after), "{frame:?}");
        after = frame.id;
        waiting.push_back(frame);
    }
    // The round moves on (a new recipe, a stop).
    withdraw_handle.cancel();
    let not_run = || Reply::Error(HelperError::new(ErrorCode::NotRun, "not run"));
    let mut running = Some(first.id);
    let mut started = Vec::new();
    for _ in 0..8 {
        let frame = fake_read(&mut s).await;
        let Request::Withdraw { target } = frame.request else { panic!("a withdrawal: {frame:?}") };
        let found = waiting.iter().position(|w| w.id == target);
        fake_reply(&mut s, frame.id, Reply::Cancelled { target, found: found.is_some() }).await;
        if let Some(at) = found {
            waiting.remove(at);
            fake_reply(&mut s, target, not_run()).await;
        }
        // The running state ends, a success; the next waiting one starts if it follows it.
        let Some(ended) = running.take() else { continue };
        fake_reply(&mut s, ended, Reply::Outcome(Outcome::ok("ok"))).await;
        let mut last_ok = Some(ended);
        while let Some(next) = waiting.pop_front() {
            if next.after.is_some() && next.after == last_ok {
                started.push(next.id);
                running = Some(next.id);
                break;
            }
            last_ok = None;
            fake_reply(&mut s, next.id, not_run()).await;
        }
    }
    if let Some(ended) = running {
        fake_reply(&mut s, ended, Reply::Outcome(Outcome::ok("ok"))).await;
    }
    let o = run.await.unwrap().unwrap();
    assert!(o.result, "{o:?}");
    assert!(started.is_empty(), "requests of the withdrawn line started after its withdrawal began: {started:?}");
}

/// A plan goes on after a state that could not be planned, to the state sent ahead
/// behind it, which the helper answered not-run; such a state is sent again on its own.
/// But not once the round has cancelled it (a new recipe, a stop): it would start in the
/// helper after the round said it would not go on.
#[tokio::test]
async fn a_state_answered_not_run_is_not_sent_again_once_cancelled() {
    use opsagent_proto::request::{ErrorCode, HelperError, Outcome, Reply, Request};

    let tmp = tempfile::tempdir().unwrap();
    let (listener, client) = fake_helper(tmp.path());
    let plan = |id: &str| {
        let mut r = req(id, "linux.file", json!({"path": tmp.path().join(id).display().to_string(), "content": id}));
        r.plan = true;
        r
    };
    let (first, second) = (plan("a"), plan("b"));
    let (n, _keep) = next(second.clone());
    let (c, a) = (std::sync::Arc::clone(&client), first);
    let run = tokio::spawn(async move { c.apply_then(a, None, vec![n], Cancel::never()).await });

    let mut s = fake_greet(&listener).await;
    let a = fake_read(&mut s).await;
    let b = fake_read(&mut s).await;
    assert_eq!(b.after, Some(a.id), "{b:?}");
    // a could not be planned; b, behind it, is not run.
    fake_reply(&mut s, a.id, Reply::Outcome(Outcome { planned: true, ..Outcome::failed("cannot plan") })).await;
    fake_reply(&mut s, b.id, Reply::Error(HelperError::new(ErrorCode::NotRun, "not run"))).await;
    assert!(!run.await.unwrap().unwrap().result);

    // The plan goes on to b, and the round is cancelled (a new recipe arrived).
    let (handle, cancel) = cancel_pair();
    handle.cancel();
    let c = std::sync::Arc::clone(&client);
    let run = tokio::spawn(async move { c.apply_then(second, None, vec![], cancel).await });
    let mut sent_again = Vec::new();
    loop {
        let read = opsagent_proto::codec::read_frame::<_, opsagent_proto::request::RequestFrame>(
            &mut s,
            opsagent_proto::codec::DEFAULT_MAX_FRAME,
        );
        let Ok(frame) = tokio::time::timeout(Duration::from_millis(500), read).await else { break };
        let Some(frame) = frame.unwrap() else { break };
        match frame.request {
            Request::Cancel { target } => {
                fake_reply(&mut s, frame.id, Reply::Cancelled { target, found: false }).await;
            }
            Request::Apply(_) => {
                sent_again.push(frame.id);
                let o = Outcome { cancelled: true, ..Outcome::failed("cancelled") };
                fake_reply(&mut s, frame.id, Reply::Outcome(o)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let o = run.await.unwrap().unwrap();
    assert!(!o.result && o.cancelled, "{o:?}");
    assert!(sent_again.is_empty(), "a state the round had cancelled was sent again: {sent_again:?}");
}
