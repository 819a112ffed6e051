//! Backends that misbehave, one after another, against the real daemon: one that never
//! answers the WebSocket upgrade, one that stalls mid-frame (slowloris), a 100 MB frame, a
//! recipe of 1,000,000 states, a flood of `State`/`WaitList` pushes, a flood of garbage
//! frames. After each, the daemon is alive, its peak memory stays within a bound, it logged
//! the condition a bounded number of times (not once per frame), and it kept applying the
//! last recipe it had.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::common::scripted::{next_json, send, Ws};
use crate::common::*;

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn accept_tcp(listener: &TcpListener) -> TcpStream {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(90), listener.accept())
        .await
        .expect("the agent connects again")
        .unwrap();
    tcp
}

/// Upgrades and reads the Handshake.
async fn upgrade(tcp: TcpStream) -> Ws {
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let hs = next_json(&mut ws).await;
    assert_eq!(hs["code"], "Handshake", "{hs}");
    ws
}

/// The header of an unmasked server text frame announcing `len` bytes.
fn text_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81, 127];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    NoUpgrade,
    Slowloris,
    HugeFrame,
    MillionStates,
    WaitFlood,
    GarbageFlood,
}

impl Misbehaviour {
    fn fault(self) -> &'static str {
        match self {
            Self::NoUpgrade => "backend accepts TCP and never answers the WebSocket upgrade",
            Self::Slowloris => "backend stalls mid-frame (slowloris: 1 byte of a 4 KiB frame every 0.5 s)",
            Self::HugeFrame => "backend sends a 100 MB frame",
            Self::MillionStates => "backend sends a recipe of 1,000,000 states (~60 MB)",
            Self::WaitFlood => "backend floods 100,000 `State` + 1,000 `WaitList` (100,000 ids) pushes",
            Self::GarbageFlood => "backend floods 1,000 frames: non-JSON and unknown codes in turn",
        }
    }

    /// Starts misbehaving on the connection; the task holds it until the agent leaves.
    async fn start(self, tcp: TcpStream) -> tokio::task::JoinHandle<()> {
        match self {
            Self::NoUpgrade => tokio::spawn(async move {
                let _held = tcp;
                tokio::time::sleep(Duration::from_secs(600)).await;
            }),
            Self::Slowloris => {
                let mut ws = upgrade(tcp).await;
                tokio::spawn(async move {
                    let raw = ws.get_mut();
                    let _ = raw.write_all(&text_header(4096)).await;
                    for _ in 0..4096 {
                        if raw.write_all(b"x").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                })
            }
            Self::HugeFrame => {
                let mut ws = upgrade(tcp).await;
                tokio::spawn(async move {
                    let raw = ws.get_mut();
                    let _ = raw.write_all(&text_header(100 * 1024 * 1024)).await;
                    let chunk = vec![b'x'; 1024 * 1024];
                    for _ in 0..100 {
                        if raw.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                })
            }
            Self::MillionStates => {
                let frame = million_states();
                let mut ws = upgrade(tcp).await;
                tokio::spawn(async move {
                    use futures_util::SinkExt;
                    let _ = ws.send(tokio_tungstenite::tungstenite::Message::Text(frame.into())).await;
                    tokio::time::sleep(Duration::from_secs(600)).await;
                })
            }
            Self::WaitFlood => {
                let mut ws = upgrade(tcp).await;
                tokio::spawn(async move {
                    // The same version: accepted as "no change", the link is established.
                    if !send_or_stop(&mut ws, json!({"code": "RecipeMetadata", "recipe_version": 1})).await {
                        return;
                    }
                    for i in 0..100_000 {
                        let m = json!({"code": "State", "recipe_version": 1, "stateid": format!("flood-{i}")});
                        if !send_or_stop(&mut ws, m).await {
                            return;
                        }
                    }
                    for i in 0..1_000 {
                        let waited: Vec<Value> = (0..100)
                            .map(|j| json!({"instance_id": "i-other", "state_id": format!("list-{i}-{j}")}))
                            .collect();
                        if !send_or_stop(&mut ws, json!({"code": "WaitList", "recipe_version": 1, "waited": waited}))
                            .await
                        {
                            return;
                        }
                    }
                    // Done: hang up, the agent reconnects.
                })
            }
            Self::GarbageFlood => {
                let mut ws = upgrade(tcp).await;
                tokio::spawn(async move {
                    use futures_util::SinkExt;
                    for i in 0..1_000 {
                        // Not JSON, and a code no version of the protocol has, in turn.
                        let text = if i % 2 == 0 {
                            format!("garbage {i} {{")
                        } else {
                            json!({"code": "Nope", "n": i}).to_string()
                        };
                        let m = tokio_tungstenite::tungstenite::Message::Text(text.into());
                        if ws.send(m).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(600)).await;
                })
            }
        }
    }
}

/// A RecipeMetadata of 1,000,000 states, built once (before its phase starts: building it
/// takes longer than the agent waits for a frame).
fn million_states() -> String {
    static FRAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FRAME
        .get_or_init(|| {
            let mut s = String::from(r#"{"code":"RecipeMetadata","recipe_version":2,"state":["#);
            for i in 0..1_000_000 {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&format!(r#"{{"id":"s{i}","module":"meta.comment","parameter":{{"comment":"x"}}}}"#));
            }
            s.push_str("]}");
            s
        })
        .clone()
}

async fn send_or_stop(ws: &mut Ws, v: Value) -> bool {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(v.to_string().into())).await.is_ok()
}

/// `opsagent run` against `port` with short link timers, so that each condition is over in
/// seconds: pings every 2 s (a silent peer is dead after 4 s), reconnect pauses of at most 2 s.
fn start_agent_fast(dir: &Path, port: u16, socket: &Path) -> Proc {
    let conf = dir.join("fast.conf");
    std::fs::write(&conf, "[link]\nping_interval = 2\nbackoff_base = 1\nbackoff_max = 2\n").unwrap();
    let mut cmd = Command::new(bin("opsagent"));
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .args(["--ws-uri", &format!("ws://127.0.0.1:{port}/"), "--app-id", "app-mb", "--instance-id", "i-mb"])
        .arg("--token-file")
        .arg(dir.join("i-mb.token"))
        .arg("--state-dir")
        .arg(dir.join("i-mb.state"))
        .arg("--helper-socket")
        .arg(socket)
        .args(["--round-delay", "1", "--retry-delay", "1"])
        // The link at info, everything else from warnings up: a round a second would
        // otherwise drown the lines this test counts.
        .env("RUST_LOG", "warn,opsagent::link=info")
        .stdout(Stdio::null());
    spawn_logged("agent-i-mb", cmd, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_backend_costs_bounded_memory_and_log_lines_and_the_last_recipe_keeps_running() {
    let s = setup("app-mb", |_| json!({}));
    let dir = s.dir.as_path();
    let ran_file = s.work.join("ran");
    let ran = || std::fs::read_to_string(&ran_file).unwrap_or_default().lines().count();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _helper = start_helper(dir, &s.socket);
    let agent = start_agent_fast(dir, port, &s.socket);
    let pid = agent.pid();

    // A well-behaved backend first: recipe 1, one command per round, a round every second.
    let mut ws = upgrade(accept_tcp(&listener).await).await;
    let recipe = json!({"code": "RecipeMetadata", "recipe_version": 1, "state": [
        {"id": "tick", "module": "linux.cmd", "parameter": {"cmd": "echo tick >> ran", "cwd": s.work.display().to_string()}}
    ]});
    send(&mut ws, recipe).await;
    let t0 = Instant::now();
    while ran() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "recipe 1 runs: {}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ws);
    million_states();
    let base = peak_kib(pid);
    const BOUND_KIB: u64 = 48 * 1024;

    let mut tcp = accept_tcp(&listener).await;
    for m in [
        Misbehaviour::NoUpgrade,
        Misbehaviour::Slowloris,
        Misbehaviour::HugeFrame,
        Misbehaviour::MillionStates,
        Misbehaviour::WaitFlood,
        Misbehaviour::GarbageFlood,
    ] {
        let started = Instant::now();
        let (ran_before, log_before) = (ran(), agent.log_text().lines().count());
        let task = m.start(tcp).await;
        // The agent gives the connection up and comes back: that is the recovery.
        tcp = accept_tcp(&listener).await;
        let recovered = started.elapsed();
        task.abort();
        let log = agent.log_text();
        let new_lines: Vec<&str> = log.lines().skip(log_before).collect();
        let peak = peak_kib(pid);
        let ran_during = ran() - ran_before;
        eprintln!(
            "{m:?}: {:.1} s, {} log lines, peak {} KiB (base {base}), {ran_during} rounds",
            recovered.as_secs_f64(),
            new_lines.len(),
            peak
        );
        assert!(agent_alive(pid), "{m:?}: the daemon died: {log}");
        assert!(peak < base + BOUND_KIB, "{m:?}: peak RSS {peak} KiB, {base} KiB before: over the bound");
        assert!(
            new_lines.len() <= 16,
            "{m:?}: logged per frame, not per condition ({} lines): {new_lines:#?}",
            new_lines.len()
        );
        if recovered > Duration::from_secs(3) {
            assert!(ran_during >= 1, "{m:?}: the last recipe kept running ({ran_during} rounds in {recovered:?})");
        }
        if let Misbehaviour::WaitFlood = m {
            let persisted = std::fs::metadata(dir.join("i-mb.state/recipe.json")).map(|m| m.len()).unwrap_or(0);
            assert!(
                persisted < 64 * 1024,
                "wait marks for states no wait of the recipe names are kept: recipe.json is {persisted} bytes"
            );
        }
        crate::row(
            m.fault(),
            &format!(
                "closed the connection and reconnected; {} log lines; peak RSS +{} KiB; {ran_during} rounds of the last recipe meanwhile",
                new_lines.len(),
                peak.saturating_sub(base)
            ),
            "nothing",
            recovered,
        );
    }
    // A well-behaved backend again: the agent is back with recipe 1.
    let mut ws = upgrade(tcp).await;
    send(&mut ws, json!({"code": "RecipeMetadata", "recipe_version": 1})).await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["code"], "StateLog", "{v}");
    assert_eq!(v["recipe_version"], 1, "{v}");
}

fn agent_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
