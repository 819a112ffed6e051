// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Logs on demand end to end (issue #19 item 6), with real processes: the reference
//! backend asks an agent for its logs (`APP.fetch-logs.json`), the daemon builds the
//! bundle from the log files (this test host has no systemd, so the cron supervisor's
//! files are read, as `[agent] log_dir`/`helper_log_dir` say) and answers in `Logs`
//! frames the backend reassembles, checks and stores — or PUTs it to an `upload_url`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const APP: &str = "app-logs";

fn recipe(work: &Path) -> Value {
    json!({"component": {"init": {"state": [
        {"id": "s-logged-file", "module": "linux.file",
         "parameter": {"path": format!("{}/f.conf", work.display()), "content": "v1\n"}}
    ]}}})
}

fn gunzip(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(b).read_to_string(&mut s).unwrap();
    s
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Asks the app's agents for logs through the backend's trigger file and waits for the
/// event that ends the request.
fn ask(recipes: &Path, events: &Path, request: Value, ends: &[&str]) -> Value {
    let id = request["request"].as_str().unwrap().to_string();
    let tmp = recipes.join(".fetch.tmp");
    std::fs::write(&tmp, request.to_string()).unwrap();
    std::fs::rename(&tmp, recipes.join(format!("{APP}.fetch-logs.json"))).unwrap();
    let mut found = None;
    let done = wait_until(Duration::from_secs(30), || {
        found = read_jsonl(events)
            .into_iter()
            .find(|e| ends.contains(&e["event"].as_str().unwrap_or("")) && e["request"] == id.as_str());
        found.is_some()
    });
    assert!(done, "no {ends:?} event for {id}: {:?}", read_jsonl(events));
    found.unwrap()
}

/// Each PUT received: its path (with the query) and its body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A loopback HTTP server that takes PUT bodies (what an upload_url points at).
struct PutSink {
    base: String,
    bodies: Received,
}

impl PutSink {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let bodies: Received = Arc::default();
        let b = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut len = 0usize;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let ok = method == "PUT" && reader.read_exact(&mut body).is_ok();
                if ok {
                    b.lock().unwrap().push((path, body));
                }
                let status = if ok { "201 Created" } else { "405 Method Not Allowed" };
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                );
            }
        });
        PutSink { base, bodies }
    }
}

#[test]
fn the_backend_asks_for_logs_and_stores_the_agents_and_the_helpers_entries_of_the_last_round() {
    let s = setup(APP, recipe);
    let (dir, recipes, statelog, socket) = (s.dir.as_path(), &s.recipes, &s.statelog, &s.socket);
    // The files the cron supervisor would write: here the processes' own logs.
    let (agent_logs, root_logs) = (dir.join("var-log-visualops"), dir.join("var-log-opsagent-root"));
    std::fs::create_dir(&agent_logs).unwrap();
    std::fs::create_dir(&root_logs).unwrap();
    std::os::unix::fs::symlink(dir.join("agent-i-logs.log"), agent_logs.join("opsagent.log")).unwrap();
    std::os::unix::fs::symlink(dir.join("helper.log"), root_logs.join("opsagent-helper.log")).unwrap();

    let events = dir.join("events.jsonl");
    let stored = dir.join("bundles");
    let (_backend, port) = start_backend(
        dir,
        recipes,
        statelog,
        &["--poll-ms", "100", "--events", events.to_str().unwrap(), "--logs-dir", stored.to_str().unwrap()],
    );
    let _helper = start_helper(dir, socket);
    // A small frame limit, so that the bundle comes in several parts.
    let conf = format!(
        "[agent]\nlog_dir = {}\nhelper_log_dir = {}\n[link]\nmax_frame = 1024\n",
        agent_logs.display(),
        root_logs.display()
    );
    let agent = start_agent_with_conf(dir, port, APP, "i-logs", socket, &conf, &["--round-delay", "600"]);
    assert!(
        wait_until(Duration::from_secs(30), || read_jsonl(statelog).iter().any(|l| l["id"] == "s-logged-file")),
        "no round; agent: {}",
        agent.log_text()
    );
    // The round's entries are in both logs before anyone asks.
    assert!(wait_until(Duration::from_secs(10), || agent.log_text().contains("s-logged-file")
        && std::fs::read_to_string(dir.join("helper.log")).unwrap_or_default().contains("f.conf")));

    // 1. In frames: the stored bundle holds the agent's and the helper's entries of the round.
    let e = ask(
        recipes,
        &events,
        json!({"request": "q-frames", "what": ["agent", "helper"]}),
        &["logs_stored", "logs_refused", "logs_invalid"],
    );
    assert_eq!(e["event"], "logs_stored", "{e}");
    assert_eq!(e["instance_id"], "i-logs");
    assert_eq!(e["bound"], json!(16 << 20), "the agent's cap: {e}");
    assert_eq!(e["cut"], json!([]), "{e}");
    let path = stored.join("i-logs.q-frames.log.gz");
    assert_eq!(PathBuf::from(e["file"].as_str().unwrap()), path);
    let bundle = std::fs::read(&path).unwrap();
    assert_eq!(sha256(&bundle), e["sha256"].as_str().unwrap());
    assert!(e["parts"].as_u64().unwrap() > 1, "a bundle of several frames expected: {e}");
    let text = gunzip(&bundle);
    let agent_part = text.split("==== opsagent log bundle: helper").next().unwrap();
    let helper_part =
        text.split("==== opsagent log bundle: helper").nth(1).unwrap_or_else(|| panic!("no helper part: {text}"));
    assert!(agent_part.starts_with("==== opsagent log bundle: agent"), "{text}");
    assert!(agent_part.contains("s-logged-file"), "the agent's entries of the round: {agent_part}");
    assert!(helper_part.contains("f.conf"), "the helper's entries of the round: {helper_part}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    // 2. An oversized request is cut to its bound and says so, in part 0 and in the text.
    let e = ask(
        recipes,
        &events,
        json!({"request": "q-small", "what": ["agent", "helper"], "max_bytes": 600}),
        &["logs_stored", "logs_refused", "logs_invalid"],
    );
    assert_eq!(e["event"], "logs_stored", "{e}");
    assert_eq!(e["bound"], json!(600), "{e}");
    let cut = e["cut"].as_array().unwrap();
    assert!(cut.iter().any(|c| c["part"] == "agent" && c["bytes"].as_u64().unwrap() > 0), "{e}");
    let text = gunzip(&std::fs::read(stored.join("i-logs.q-small.log.gz")).unwrap());
    assert!(text.contains("==== cut:") && text.contains("older agent entries left out"), "{text}");
    let body: usize = text.lines().filter(|l| !l.starts_with("==== ")).map(|l| l.len() + 1).sum();
    assert!(body <= 600, "{body} bytes of log text under a bound of 600: {text}");

    // 3. upload_url: the bundle is PUT there and the agent answers with its sha256.
    let sink = PutSink::start();
    let url = format!("{}/bundles/q-up?sig=secret", sink.base);
    let e = ask(
        recipes,
        &events,
        json!({"request": "q-up", "what": ["agent"], "upload_url": url}),
        &["logs_uploaded", "logs_refused", "logs_invalid"],
    );
    assert_eq!(e["event"], "logs_uploaded", "{e}");
    let bodies = sink.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "one PUT");
    assert_eq!(bodies[0].0, "/bundles/q-up?sig=secret");
    assert_eq!(sha256(&bodies[0].1), e["sha256"].as_str().unwrap());
    assert_eq!(e["bytes"], json!(bodies[0].1.len()));
    assert!(gunzip(&bodies[0].1).contains("s-logged-file"));
    assert!(!stored.join("i-logs.q-up.log.gz").exists());

    // An upload that cannot be made is a refusal naming why: plain http off this host.
    let e = ask(
        recipes,
        &events,
        json!({"request": "q-plain", "upload_url": "http://logs.example/x?sig=secret"}),
        &["logs_uploaded", "logs_refused", "logs_invalid"],
    );
    assert_eq!(e["event"], "logs_refused", "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("https://") && reason.contains("logs.example") && !reason.contains("secret"), "{reason}");
}

/// A loopback HTTP server that takes one PUT and holds its answer until told: an upload
/// in progress for as long as the test needs.
struct StalledSink {
    url: String,
    /// The PUT arrived (headers and body read).
    arrived: Arc<Mutex<bool>>,
    release: std::sync::mpsc::Sender<()>,
}

impl StalledSink {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/bundles/slow", listener.local_addr().unwrap());
        let arrived = Arc::new(Mutex::new(false));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let a = arrived.clone();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            *a.lock().unwrap() = true;
            // The test drops the sender (or sends) when the upload may end.
            let _ = released.recv();
            let _ = stream.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        });
        StalledSink { url, arrived, release }
    }
}

/// One log request at a time per agent: a `FetchLogs` that arrives while another is being
/// answered (here: its upload held by the receiver) is refused at once, naming why, and
/// the first one still completes.
#[test]
fn a_second_log_request_while_one_is_being_answered_is_refused_and_the_first_completes() {
    let s = setup(APP, recipe);
    let (dir, recipes, statelog, socket) = (s.dir.as_path(), &s.recipes, &s.statelog, &s.socket);
    let agent_logs = dir.join("var-log-visualops");
    std::fs::create_dir(&agent_logs).unwrap();
    std::os::unix::fs::symlink(dir.join("agent-i-busy.log"), agent_logs.join("opsagent.log")).unwrap();
    let events = dir.join("events.jsonl");
    let (_backend, port) = start_backend(
        dir,
        recipes,
        statelog,
        &[
            "--poll-ms",
            "100",
            "--events",
            events.to_str().unwrap(),
            "--logs-dir",
            dir.join("bundles").to_str().unwrap(),
        ],
    );
    let _helper = start_helper(dir, socket);
    let conf = format!("[agent]\nlog_dir = {}\nhelper_log_dir = {}\n", agent_logs.display(), agent_logs.display());
    let agent = start_agent_with_conf(dir, port, APP, "i-busy", socket, &conf, &["--round-delay", "600"]);
    assert!(
        wait_until(Duration::from_secs(30), || read_jsonl(statelog).iter().any(|l| l["id"] == "s-logged-file")),
        "no round; agent: {}",
        agent.log_text()
    );

    // 1. A request whose upload the receiver holds: it is being answered until released.
    let sink = StalledSink::start();
    let tmp = recipes.join(".fetch.tmp");
    std::fs::write(&tmp, json!({"request": "q-slow", "what": ["agent"], "upload_url": sink.url}).to_string()).unwrap();
    std::fs::rename(&tmp, recipes.join(format!("{APP}.fetch-logs.json"))).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || *sink.arrived.lock().unwrap()),
        "the upload of q-slow never arrived; events: {:?}\nagent: {}",
        read_jsonl(&events),
        agent.log_text()
    );

    // 2. The second request meanwhile: refused with the documented reason.
    let e = ask(
        recipes,
        &events,
        json!({"request": "q-second", "what": ["agent"]}),
        &["logs_stored", "logs_refused", "logs_invalid"],
    );
    assert_eq!(e["event"], "logs_refused", "{e}");
    assert_eq!(e["instance_id"], "i-busy", "{e}");
    assert_eq!(e["reason"], "another log request is being answered", "{e}");
    assert!(!dir.join("bundles/i-busy.q-second.log.gz").exists());

    // 3. Released, the first request completes as if nothing had happened.
    sink.release.send(()).unwrap();
    let mut done = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            done = read_jsonl(&events).into_iter().find(|e| e["request"] == "q-slow" && e["event"] != "fetch_logs");
            done.is_some()
        }),
        "q-slow never ended; events: {:?}",
        read_jsonl(&events)
    );
    let done = done.unwrap();
    assert_eq!(done["event"], "logs_uploaded", "{done}");
}
