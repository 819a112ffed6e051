// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `meta.wait` across two real daemons and the reference backend: one wait released by
//! the backend's `State` push while the waiting agent is connected, another released
//! while it is cut off from the backend and learnt from `WaitList` after it reconnects.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A TCP relay to the backend that can be cut: while cut, open connections are shut and
/// new ones closed at once.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(backend_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", backend_port)) else { continue };
                o.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn ok_states(statelog: &Path, instance: &str) -> Vec<String> {
    read_jsonl(statelog)
        .into_iter()
        .filter(|l| l["instance_id"] == instance && l["state_result"] == true)
        .filter_map(|l| l["id"].as_str().map(str::to_string))
        .collect()
}

fn events(path: &Path, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    read_jsonl(path).into_iter().filter(|e| pick(e)).collect()
}

#[test]
fn waits_are_released_by_a_state_push_and_by_waitlist_after_a_reconnect() {
    let s = setup("app-waiter", |w| {
        json!({"component": {"init": {"state": [
            {"id": "w-one", "module": "meta.wait", "parameter": {"state": ["@{i-src.src-one}"]}},
            {"id": "b-mid", "module": "linux.file", "parameter": {"path": format!("{}/b-mid", w.display()), "content": "x"}},
            {"id": "w-two", "module": "meta.wait", "parameter": {"state": ["@{i-src.src-two}"]}},
            {"id": "b-end", "module": "linux.file", "parameter": {"path": format!("{}/b-end", w.display()), "content": "x"}}
        ]}}})
    });
    let flag = s.work.join("go-two");
    let w = s.work.display().to_string();
    std::fs::write(
        s.recipes.join("app-src.json"),
        json!({"component": {"init": {"state": [
            {"id": "src-one", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": w}},
            {"id": "src-two", "module": "linux.cmd", "parameter": {
                "cmd": format!("i=0; while [ ! -e {f} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e {f} ]", f = flag.display()),
                "cwd": w}}
        ]}}})
        .to_string(),
    )
    .unwrap();
    let events_file = s.dir.join("events.jsonl");
    let (_backend, port) = start_backend(
        &s.dir,
        &s.recipes,
        &s.statelog,
        &["--poll-ms", "100", "--events", events_file.to_str().unwrap()],
    );
    let _helper = start_helper(&s.dir, &s.socket);
    let relay = Relay::start(port);
    // The waiting agent reaches the backend through the relay only.
    let waiter = start_agent(&s.dir, relay.port, "app-waiter", "i-wait", &s.socket, &["--round-delay", "600"]);
    assert!(
        wait_until(Duration::from_secs(30), || !events(&events_file, |e| e["event"] == "pinned"
            && e["instance_id"] == "i-wait")
        .is_empty()),
        "the waiting agent connected: {}",
        waiter.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(ok_states(&s.statelog, "i-wait").is_empty(), "nothing passes the first wait before its state is done");

    // 1. Released by a push: the source's src-one, while the waiter is connected.
    let source = start_agent(&s.dir, port, "app-src", "i-src", &s.socket, &["--round-delay", "600"]);
    assert!(
        wait_until(Duration::from_secs(30), || ok_states(&s.statelog, "i-wait").contains(&"b-mid".to_string())),
        "w-one released by the State push; waiter: {}\nsource: {}",
        waiter.log_text(),
        source.log_text()
    );
    let opens = || events(&events_file, |e| e["event"] == "open").len();
    let wait_queries = || {
        events(&events_file, |e| {
            e["event"] == "message" && e["code"] == "WaitQuery" && e["message"]["instance_id"] == "i-wait"
        })
        .len()
    };
    let (opens_before, queries_before) = (opens(), wait_queries());
    assert!(!ok_states(&s.statelog, "i-wait").contains(&"b-end".to_string()));

    // 2. Released while the waiter is cut off: it learns it from WaitList once back.
    relay.cut();
    std::fs::write(&flag, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || !events(&events_file, |e| e["event"] == "wait_released"
            && e["state_id"] == "w-two")
        .is_empty()),
        "w-two released at the backend; source: {}",
        source.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ok_states(&s.statelog, "i-wait").contains(&"b-end".to_string()), "the cut-off waiter went on");
    relay.restore();
    assert!(
        wait_until(Duration::from_secs(60), || ok_states(&s.statelog, "i-wait").contains(&"b-end".to_string())),
        "w-two learnt after the reconnect; waiter: {}",
        waiter.log_text()
    );
    assert!(opens() > opens_before, "the waiter reconnected");
    assert!(wait_queries() > queries_before, "the waiter asked with WaitQuery after reconnecting");
    let b: Vec<String> = ok_states(&s.statelog, "i-wait");
    assert_eq!(b, ["w-one", "b-mid", "w-two", "b-end"], "each state of the waiter once, in order");
}
