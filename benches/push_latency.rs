//! Push-to-apply latency of the real daemon: the time from the backend sending a new
//! recipe to the helper receiving the `Apply` of its first state.
//!
//! This bench plays both neighbours of a real `opsagent run` process:
//! - the backend: an in-process WebSocket server on 127.0.0.1 (answers the Handshake
//!   with `Capabilities` and recipe version 1, acknowledges every StateLog);
//! - the helper: an in-process stand-in on a temp Unix socket speaking the real
//!   `opsagent-proto` codec (answers Hello, Status, and every Apply at once with a
//!   successful Outcome), so what is measured is the daemon alone.
//!
//! Each push carries a new recipe version; the clock starts just before the frame is
//! written to the socket and stops when the stand-in has decoded the Apply for that
//! version. The next push waits for the StateLog of the last state of the previous one,
//! plus a short idle gap, so every push finds the daemon idle between rounds.
//!
//! The daemon persists every new recipe (write, fsync, rename, fsync of the directory)
//! and spools every StateLog (fdatasync) before going on, so the figures depend on the
//! disk under its state directory: each series runs twice, with the state directory on
//! the temp directory's disk (`disk`, as `/var/lib` would be) and on `/dev/shm`
//! (`tmpfs`: the daemon's own CPU cost, without the storage's).
//!
//! `cargo bench --bench push_latency` (no root needed). Environment: `PUSHES` (default
//! 200), `WARMUP` (20), `PUSH_STATES` (states per recipe, comma-separated series,
//! default `1,100`), `PUSH_FS` (`disk,tmpfs`), `IDLE_MS` (gap between pushes, 20),
//! `OPSAGENT_LOG` (the daemon's log level, default `info` as in production; its log goes
//! to a file in the temp directory).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use opsagent_proto::codec::{self, DEFAULT_MAX_FRAME};
use opsagent_proto::request::{
    ErrorCode, HelperError, HelperStatus, Outcome, Reply, ReplyFrame, Request, RequestFrame,
};
use opsagent_proto::HELPER_PROTOCOL_VERSION;
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// An Apply as the stand-in helper saw it.
struct Arrival {
    at: Instant,
    recipe_version: u64,
}

/// What the bench asks of the backend task.
enum ToBackend {
    /// Send this text; answer with the instant just before it was written.
    Push(String, oneshot::Sender<Instant>),
}

/// A StateLog the backend received: (recipe_version, state id, received at).
type Logged = (u64, String, Instant);

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

async fn stand_in_helper(listener: UnixListener, arrivals: mpsc::UnboundedSender<Arrival>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            let started = Instant::now();
            while let Ok(Some(frame)) = codec::read_frame::<_, RequestFrame>(&mut r, DEFAULT_MAX_FRAME).await {
                let reply = match frame.request {
                    Request::Apply(req) => {
                        let _ = arrivals.send(Arrival { at: Instant::now(), recipe_version: req.recipe_version });
                        Reply::Outcome(Outcome::ok("bench stand-in: nothing done"))
                    }
                    Request::Hello { .. } => Reply::Hello {
                        protocol_version: HELPER_PROTOCOL_VERSION,
                        helper_version: "bench-stand-in".into(),
                        signed_recipes: false,
                        pipelining: false,
                        ahead: 0,
                    },
                    Request::Status => Reply::Status(HelperStatus {
                        helper_version: "bench-stand-in".into(),
                        protocol_version: HELPER_PROTOCOL_VERSION,
                        uptime_s: started.elapsed().as_secs(),
                        running: vec![],
                        recipes_verified: false,
                        verified_version: None,
                    }),
                    Request::Cancel { target } | Request::Withdraw { target } => {
                        Reply::Cancelled { target, found: false }
                    }
                    // Signed recipes are measured through the real helper (push_e2e.py
                    // SIGNED=1); this stand-in says it has no recipe_key.
                    Request::Recipe(_) | Request::ApplySigned(_) => Reply::Error(HelperError::new(
                        ErrorCode::Unsupported,
                        "bench stand-in: no recipe_key configured",
                    )),
                };
                if codec::write_frame(&mut w, &ReplyFrame { id: frame.id, reply }, DEFAULT_MAX_FRAME).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// One agent connection: Handshake → Capabilities + recipe v1; StateLogs acknowledged
/// and forwarded; pushes written on request.
async fn backend(
    listener: TcpListener,
    first_recipe: String,
    mut pushes: mpsc::UnboundedReceiver<ToBackend>,
    logged: mpsc::UnboundedSender<Logged>,
) {
    let (tcp, _) = listener.accept().await.expect("the daemon connects");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("WebSocket handshake");
    let mut pushes_open = true;
    loop {
        tokio::select! {
            cmd = pushes.recv(), if pushes_open => match cmd {
                Some(ToBackend::Push(text, sent)) => {
                    let t0 = Instant::now();
                    ws.send(Message::text(text)).await.expect("push sent");
                    let _ = sent.send(t0);
                }
                None => pushes_open = false,
            },
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return,
                };
                let at = Instant::now();
                let v: Value = serde_json::from_str(text.as_str()).expect("agent frames are JSON");
                let reply = match v["code"].as_str() {
                    Some("Handshake") => {
                        let caps = json!({"code": "Capabilities", "capabilities": ["statelog-ack", "reconnect-hint", "heartbeat"]});
                        ws.send(Message::text(caps.to_string())).await.expect("send");
                        Some(first_recipe.clone())
                    }
                    Some("StateLog") => {
                        let version = v["recipe_version"].as_u64().unwrap_or(0);
                        let id = v["stateid"].as_str().unwrap_or_default().to_string();
                        let _ = logged.send((version, id, at));
                        v["seq"].as_u64().map(|seq| json!({"code": "StateLogAck", "seq": seq}).to_string())
                    }
                    Some("WaitQuery") => Some(
                        json!({"code": "WaitList", "recipe_version": v["recipe_version"], "waited": []}).to_string(),
                    ),
                    Some("Test") => Some(json!({"code": "TestAns", "result": true, "error": null}).to_string()),
                    _ => None,
                };
                if let Some(r) = reply {
                    ws.send(Message::text(r)).await.expect("send");
                }
            }
        }
    }
}

fn recipe_text(version: u64, states: usize) -> String {
    let states: Vec<Value> = (0..states)
        .map(|i| {
            json!({"id": format!("state-{i}"), "module": "linux.file",
                   "parameter": {"path": format!("/srv/bench/conf-{i}"), "content": "x = 1\n", "mode": "0644"}})
        })
        .collect();
    json!({"code": "RecipeMetadata", "recipe_version": version, "module": null, "state": states}).to_string()
}

/// Nearest-rank percentile of sorted microsecond values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(name: &str, mut us: Vec<f64>) -> String {
    us.sort_by(f64::total_cmp);
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    format!(
        "{name:<34} n={:<4} p50={:>8.1} us  p90={:>8.1} us  p99={:>8.1} us  max={:>8.1} us  mean={:>8.1} us",
        us.len(),
        pct(&us, 50.0),
        pct(&us, 90.0),
        pct(&us, 99.0),
        us[us.len() - 1],
        mean
    )
}

struct Series {
    states: usize,
    to_apply: Vec<f64>,
    to_first_log: Vec<f64>,
    to_last_log: Vec<f64>,
}

async fn run_series(dir: &Path, states: usize, pushes: usize, warmup: usize, idle: Duration) -> Series {
    let sock = dir.join(format!("helper-{states}.sock"));
    let state_dir = dir.join(format!("state-{states}"));
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let config = dir.join("empty.conf");
    std::fs::write(&config, "").expect("config");
    let token = dir.join(format!("token-{states}"));

    let (arr_tx, mut arrivals) = mpsc::unbounded_channel();
    tokio::spawn(stand_in_helper(UnixListener::bind(&sock).expect("helper socket"), arr_tx));

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let (log_tx, mut logs) = mpsc::unbounded_channel();
    tokio::spawn(backend(listener, recipe_text(1, states), push_rx, log_tx));

    let log = std::fs::File::create(dir.join(format!("daemon-{states}.log"))).expect("log file");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_opsagent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--ws-uri", &format!("ws://127.0.0.1:{port}/"), "--app-id", "bench-app", "--instance-id", "i-bench"])
        .arg("--token-file")
        .arg(&token)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--helper-socket")
        .arg(&sock)
        .args(["--round-delay", "600"])
        .env("RUST_LOG", std::env::var("OPSAGENT_LOG").unwrap_or_else(|_| "info".into()))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start opsagent run");

    // Waits until every state of `version` has been reported; returns the instants of
    // the first and the last StateLog.
    async fn round_done(logs: &mut mpsc::UnboundedReceiver<Logged>, version: u64, states: usize) -> (Instant, Instant) {
        let mut first = None;
        let mut seen = 0;
        loop {
            let (v, _id, at) = timeout(WAIT, logs.recv())
                .await
                .unwrap_or_else(|_| panic!("no StateLog of version {version} within {WAIT:?}"))
                .expect("backend running");
            if v == version {
                first.get_or_insert(at);
                seen += 1;
                if seen == states {
                    return (first.expect("set above"), at);
                }
            }
        }
    }

    round_done(&mut logs, 1, states).await;
    tokio::time::sleep(idle).await;

    let mut series = Series { states, to_apply: vec![], to_first_log: vec![], to_last_log: vec![] };
    for i in 0..warmup + pushes {
        let version = 2 + i as u64;
        let text = recipe_text(version, states);
        let (sent_tx, sent_rx) = oneshot::channel();
        push_tx.send(ToBackend::Push(text, sent_tx)).unwrap_or_else(|_| panic!("backend task gone"));
        let t0 = sent_rx.await.expect("push written");
        let applied = loop {
            let a = timeout(WAIT, arrivals.recv())
                .await
                .unwrap_or_else(|_| panic!("no Apply of version {version} within {WAIT:?}"))
                .expect("stand-in helper running");
            if a.recipe_version == version {
                break a.at;
            }
        };
        let (first_log, last_log) = round_done(&mut logs, version, states).await;
        if i >= warmup {
            series.to_apply.push(applied.duration_since(t0).as_secs_f64() * 1e6);
            series.to_first_log.push(first_log.duration_since(t0).as_secs_f64() * 1e6);
            series.to_last_log.push(last_log.duration_since(t0).as_secs_f64() * 1e6);
        }
        while arrivals.try_recv().is_ok() {}
        tokio::time::sleep(idle).await;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    series
}

fn main() {
    let pushes = env_num("PUSHES", 200).max(1);
    let warmup = env_num("WARMUP", 20);
    let idle = Duration::from_millis(env_num("IDLE_MS", 20) as u64);
    let sizes: Vec<usize> = std::env::var("PUSH_STATES")
        .unwrap_or_else(|_| "1,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    // Two threads: the backend and the stand-in helper must not queue behind each other
    // (the daemon itself is a separate process with its own single-threaded runtime).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!(
        "push_latency: real `opsagent run` ({}), in-process backend (ws://127.0.0.1) and stand-in helper \
         (unix socket); {pushes} pushes after {warmup} warm-up, {} ms idle between pushes",
        env!("CARGO_BIN_EXE_opsagent"),
        idle.as_millis()
    );
    let kinds = std::env::var("PUSH_FS").unwrap_or_else(|_| "disk,tmpfs".into());
    for kind in kinds.split(',').map(str::trim) {
        let base = match kind {
            "disk" => std::env::temp_dir(),
            "tmpfs" if Path::new("/dev/shm").is_dir() => "/dev/shm".into(),
            other => {
                println!("PUSH_FS: {other:?} skipped (disk or tmpfs, and tmpfs needs /dev/shm)");
                continue;
            }
        };
        let dir = tempfile::Builder::new().prefix("opsagent-push-").tempdir_in(&base).expect("temp dir");
        for &states in &sizes {
            let s = rt.block_on(run_series(dir.path(), states, pushes, warmup, idle));
            println!("state dir on {kind} ({}), recipe of {} state(s):", base.display(), s.states);
            println!("  {}", summary("push -> Apply of first state", s.to_apply));
            println!("  {}", summary("push -> StateLog of first state", s.to_first_log));
            println!("  {}", summary("push -> StateLog of last state", s.to_last_log));
        }
    }
}
