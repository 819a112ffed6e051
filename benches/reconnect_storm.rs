//! Reconnect storm: N real link instances (in-process, each with its own backoff seeded
//! from the OS, fake outbox) against one reference backend process. The backend is
//! stopped (SIGTERM: every connection closed with 1001, as in a deploy), kept down, then
//! started again on the same port; the report shows how the reconnects spread over time,
//! from the backend's own event log (Handshakes per second) and from the agents' side
//! (time to reconnect, connection attempts while the backend was down).
//!
//! A second scenario sends the reconnect hint first (`APP.reconnect.json`, `after_s`),
//! as a backend about to be deployed would.
//!
//! The backend's own memory is reported too (VmRSS once every agent is connected, and
//! VmHWM, its peak), read from `/proc/PID/status`. Every agent connects from 127.0.0.1,
//! so the backend is started with its per-address cap raised to the fleet's size; beyond
//! ~1,000 agents raise the descriptor limit of both processes first:
//!
//! ```text
//! cargo bench --bench reconnect_storm -- [--agents 300] [--down 5] [--hint 20] [--kill9] [--no-hint]
//! ulimit -n 20000 && cargo bench --bench reconnect_storm -- --agents 10000 --handshake-timeout 300 --connect-limit 900
//! cargo bench --bench reconnect_storm -- --pins 10000 --pins-serial 300
//! ```
//!
//! `--pins N` measures the backend's pins writer alone (group commit of first-use pins).

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use opsagent::link::{Link, LinkConfig, LinkState, LinkStatus, Outbox, Resolver, SystemResolver};
use opsagent::protocol::{Identity, StateLog};
use opsagent::round::EngineStatus;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

struct Args {
    agents: usize,
    down: Duration,
    hint: u64,
    kill9: bool,
    /// Only the first scenario (no reconnect hint).
    no_hint: bool,
    /// The backend's `--handshake-timeout-s` (default: its own). Thousands of first
    /// Handshakes at once on a small machine can take longer than the default 30 s to be
    /// served: each is closed and retried after backoff, which is what the timeout is
    /// for, but then the bench measures the retries.
    handshake_timeout_s: Option<u64>,
    /// How long the initial connect of the whole fleet may take.
    connect_limit: Duration,
    /// Only the pins writer: N first-use pins submitted at once, committed in batches
    /// (`--pins N`), and the same with one synced file per pin as before (`--pins-serial M`).
    pins: Option<usize>,
    pins_serial: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        agents: 300,
        down: Duration::from_secs(5),
        hint: 20,
        kill9: false,
        no_hint: false,
        handshake_timeout_s: None,
        connect_limit: Duration::from_secs(120),
        pins: None,
        pins_serial: None,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--agents" => a.agents = next.parse().expect("--agents N"),
            "--down" => a.down = Duration::from_secs_f64(next.parse().expect("--down SECONDS")),
            "--hint" => a.hint = next.parse().expect("--hint SECONDS"),
            "--handshake-timeout" => a.handshake_timeout_s = Some(next.parse().expect("--handshake-timeout SECONDS")),
            "--pins" => a.pins = Some(next.parse().expect("--pins N")),
            "--pins-serial" => a.pins_serial = Some(next.parse().expect("--pins-serial N")),
            "--connect-limit" => a.connect_limit = Duration::from_secs(next.parse().expect("--connect-limit SECONDS")),
            "--kill9" => {
                a.kill9 = true;
                i += 1;
                continue;
            }
            "--no-hint" => {
                a.no_hint = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// An outbox with nothing to send.
struct Empty(Arc<Notify>);

impl Outbox for Empty {
    fn pending_after(&self, _seq: u64) -> Vec<StateLog> {
        Vec::new()
    }
    fn delivered(&self, _seq: u64, _cumulative: bool) {}
    fn added(&self) -> Arc<Notify> {
        self.0.clone()
    }
}

/// The system resolver, counting attempts (every attempt resolves).
struct Counting {
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Resolver for Counting {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        self.attempts.lock().unwrap().push(Instant::now());
        SystemResolver.resolve(host, port)
    }
}

struct BackendProc {
    child: Child,
    port: u16,
}

fn backend_bin() -> PathBuf {
    std::env::var_os("OPSAGENT_BACKEND_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_opsagent-backend")))
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn start_backend(dir: &Path, listen: &str, args: &Args) -> BackendProc {
    let agents = args.agents;
    // Every agent comes from 127.0.0.1: the per-address cap must let the fleet in.
    let cap = (agents + 64).to_string();
    for _ in 0..50 {
        let mut cmd = Command::new(backend_bin());
        cmd.arg("--listen")
            .arg(listen)
            .arg("--recipe-dir")
            .arg(dir.join("recipes"))
            .arg("--statelog")
            .arg(dir.join("statelog.jsonl"))
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .arg("--poll-ms")
            .arg("100")
            .args(["--max-conns-per-addr", &cap, "--max-conns", &cap])
            .args(args.handshake_timeout_s.map(|s| format!("--handshake-timeout-s={s}")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("backend.log")).unwrap());
        let mut child = cmd.spawn().expect("start opsagent-backend");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if let Some(port) = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
            return BackendProc { child, port };
        }
        // The port may still be held for a moment after the previous process.
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the backend does not start; see {}", dir.join("backend.log").display());
}

fn stop_backend(b: &mut BackendProc, kill9: bool) {
    let sig = if kill9 { "-KILL" } else { "-TERM" };
    let _ = Command::new("kill").arg(sig).arg(b.child.id().to_string()).status();
    let _ = b.child.wait();
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// `2026-11-21T23:20:32.123Z` → seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm, ss) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

fn handshake_times(dir: &Path) -> Vec<f64> {
    // The event log may have been rotated (events.jsonl.1, …).
    let text: String = (1..=9)
        .rev()
        .map(|n| dir.join(format!("events.jsonl.{n}")))
        .chain([dir.join("events.jsonl")])
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "message" && e["code"] == "Handshake")
        .filter_map(|e| parse_rfc3339(e["at"].as_str()?))
        .collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn histogram(title: &str, times: &[f64], origin: f64, bucket: f64) {
    println!("{title}");
    if times.is_empty() {
        println!("  (none)");
        return;
    }
    let last = times.iter().cloned().fold(f64::MIN, f64::max);
    let n = (((last - origin) / bucket).floor().max(0.0) as usize) + 1;
    let mut counts = vec![0usize; n];
    for t in times {
        let i = ((t - origin) / bucket).floor();
        if i >= 0.0 {
            counts[(i as usize).min(n - 1)] += 1;
        }
    }
    let max = *counts.iter().max().unwrap_or(&1);
    let mut i = 0;
    while i < n {
        let c = counts[i];
        if c == 0 {
            // A run of empty buckets is one line.
            let end = (i..n).find(|j| counts[*j] != 0).unwrap_or(n);
            println!("  {:>6.1}-{:<6.1} s     0", i as f64 * bucket, end as f64 * bucket);
            i = end;
            continue;
        }
        let bar = "#".repeat((c * 50).div_ceil(max.max(1)));
        println!("  {:>6.1}-{:<6.1} s {:>5}  {bar}", i as f64 * bucket, (i + 1) as f64 * bucket, c);
        i += 1;
    }
}

struct Fleet {
    statuses: Vec<watch::Receiver<LinkStatus>>,
    _stop: watch::Sender<bool>,
    _engine: Vec<watch::Sender<EngineStatus>>,
}

fn connected_with(s: &LinkStatus, connects: u64) -> bool {
    matches!(s.state, LinkState::Connected { .. }) && s.connects >= connects
}

async fn all_connected(fleet: &Fleet, connects: u64, limit: Duration) -> Vec<Option<Instant>> {
    // Each agent's first moment at `connects` connections, watched concurrently.
    let mut tasks = Vec::new();
    for rx in &fleet.statuses {
        let mut rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(limit, rx.wait_for(|s| connected_with(s, connects))).await;
            r.ok().map(|_| Instant::now())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Why connections churned: the backend's events by kind (and the reasons of its
/// refusals and timeouts), the sessions the agents opened, and the agents' last errors
/// (the reason of the connect attempt that failed last), most frequent first.
fn churn(dir: &Path, fleet: &Fleet) {
    let text: String = (1..=9)
        .rev()
        .map(|n| dir.join(format!("events.jsonl.{n}")))
        .chain([dir.join("events.jsonl")])
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let mut kind = e["event"].as_str().unwrap_or("?").to_string();
        if kind == "message" {
            kind = format!("message {}", e["code"].as_str().unwrap_or("?"));
        }
        if let Some(r) = e["reason"].as_str() {
            kind = format!("{kind}: {r}");
        }
        *kinds.entry(kind).or_default() += 1;
    }
    println!("backend events so far:");
    for (k, n) in &kinds {
        println!("  {n:>7}  {k}");
    }
    let statuses: Vec<LinkStatus> = fleet.statuses.iter().map(|s| s.borrow().clone()).collect();
    let sessions: u64 = statuses.iter().map(|s| s.connects).sum();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for s in &statuses {
        // Numbers (ports, seconds) differ per agent: one line per kind of error.
        let e = s.last_error.as_deref().unwrap_or("(none)");
        let kind: String = e.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        *errors.entry(kind).or_default() += 1;
    }
    let mut errors: Vec<(String, usize)> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    println!("agents: {sessions} WebSocket sessions opened by {} agents; last errors:", statuses.len());
    for (e, n) in errors.iter().take(8) {
        println!("  {n:>7}  {e}");
    }
}

fn start_fleet(n: usize, url: &str, app: &str, attempts: Arc<Mutex<Vec<Instant>>>) -> Fleet {
    let (stop, stop_rx) = watch::channel(false);
    let mut statuses = Vec::new();
    let mut engines = Vec::new();
    for i in 0..n {
        let (engine_tx, mut engine_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move { while engine_rx.recv().await.is_some() {} });
        let (engine_status, engine_status_rx) = watch::channel(EngineStatus::default());
        let cfg = LinkConfig { ws_uri: url.to_string(), ..LinkConfig::default() };
        let who = Identity {
            instance_id: format!("i-{i:05}"),
            app_id: app.to_string(),
            instance_token: "storm".into(),
            agent_version: "storm".into(),
        };
        let outbox = Arc::new(Empty(Arc::new(Notify::new())));
        let (link, status, _live) =
            Link::new(cfg, who, None, outbox, engine_tx, engine_status_rx, stop_rx.clone()).expect("link");
        let link = link.with_resolver(Arc::new(Counting { attempts: attempts.clone() }));
        tokio::spawn(link.run());
        statuses.push(status);
        engines.push(engine_status);
    }
    Fleet { statuses, _stop: stop, _engine: engines }
}

async fn scenario(args: &Args, hint: Option<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let app = "storm";
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    let recipe = r#"{"recipe_version": 1, "state": [{"id": "c", "module": "meta.comment", "parameter": {}}]}"#;
    std::fs::write(dir.join(format!("recipes/{app}.json")), recipe).unwrap();
    let mut backend = start_backend(dir, "127.0.0.1:0", args);
    let url = format!("ws://127.0.0.1:{}/", backend.port);
    let attempts = Arc::new(Mutex::new(Vec::new()));

    let t_start = Instant::now();
    let fleet = start_fleet(args.agents, &url, app, attempts.clone());
    let first = all_connected(&fleet, 1, args.connect_limit).await;
    let up = first.iter().filter(|t| t.is_some()).count();
    println!(
        "\n=== {} ===\n{} agents against one reference backend (pid {}); default link settings: backoff base 1 s, cap 300 s, full jitter",
        match hint {
            None => "backend restart, no hint",
            Some(_) => "backend restart after a reconnect hint",
        },
        args.agents,
        backend.child.id()
    );
    println!("initial connect: {up}/{} connected in {:.2} s", args.agents, t_start.elapsed().as_secs_f64());
    churn(dir, &fleet);
    let first_hs = handshake_times(dir);
    let origin = first_hs.iter().copied().fold(f64::MAX, f64::min);
    histogram("initial connect: Handshakes per second at the backend (t=0 at the first):", &first_hs, origin, 1.0);
    // Each agent's first Handshake pinned its instance (one file each, synced before the
    // Handshake was answered).
    let pins = std::fs::read_dir(dir.join("statelog.jsonl.pins"))
        .map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))).count())
        .unwrap_or(0);
    println!("instances pinned: {pins}");
    let (rss, hwm) = memory_kib(backend.child.id());
    println!(
        "backend memory with {up} agents connected: VmRSS {:.1} MiB ({:.1} KiB per agent), peak VmHWM {:.1} MiB",
        rss as f64 / 1024.0,
        rss as f64 / up.max(1) as f64,
        hwm as f64 / 1024.0
    );

    // The outage.
    let before = attempts.lock().unwrap().len();
    let t_stop = Instant::now();
    let wall_stop = unix_now();
    if let Some(after_s) = hint {
        std::fs::write(dir.join(format!("recipes/{app}.reconnect.json")), format!("{{\"after_s\": {after_s}}}"))
            .unwrap();
        // Wait until the backend has told everyone (it closes their connections).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && fleet.statuses.iter().any(|s| matches!(s.borrow().state, LinkState::Connected { .. }))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("reconnect hint after_s={after_s} sent; all agents left in {:.2} s", t_stop.elapsed().as_secs_f64());
    }
    stop_backend(&mut backend, args.kill9);
    tokio::time::sleep(args.down).await;
    let t_back = Instant::now();
    let wall_back = unix_now();
    let backend2 = start_backend(dir, &format!("127.0.0.1:{}", backend.port), args);
    let down_attempts = attempts.lock().unwrap()[before..].iter().filter(|t| **t < t_back).count();
    println!(
        "backend {} at t=0, started again at t={:.2} s (same port)",
        if args.kill9 { "killed (SIGKILL)" } else { "stopped (SIGTERM, close 1001 to all)" },
        t_back.duration_since(t_stop).as_secs_f64()
    );

    let limit = Duration::from_secs(args.hint.max(30) * 2 + 360);
    let second = all_connected(&fleet, 2, limit).await;
    let mut from_back: Vec<f64> =
        second.iter().flatten().map(|t| t.saturating_duration_since(t_back).as_secs_f64()).collect();
    let mut from_stop: Vec<f64> = second.iter().flatten().map(|t| t.duration_since(t_stop).as_secs_f64()).collect();
    from_back.sort_by(f64::total_cmp);
    from_stop.sort_by(f64::total_cmp);
    let back = from_back.len();
    println!("reconnected: {back}/{}", args.agents);
    println!(
        "time to reconnect, from the backend's return: p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s",
        pct(&from_back, 50.0),
        pct(&from_back, 90.0),
        pct(&from_back, 99.0),
        pct(&from_back, 100.0)
    );
    println!(
        "time to reconnect, from the outage's start: p50 {:.2} s, p90 {:.2} s, max {:.2} s",
        pct(&from_stop, 50.0),
        pct(&from_stop, 90.0),
        pct(&from_stop, 100.0)
    );
    let all_attempts: Vec<f64> =
        attempts.lock().unwrap()[before..].iter().map(|t| t.duration_since(t_stop).as_secs_f64()).collect();
    println!(
        "connection attempts while the backend was down: {down_attempts} ({:.2} per agent); in total until all were back: {}",
        down_attempts as f64 / args.agents as f64,
        all_attempts.len()
    );
    histogram("connection attempts per second (agent side, t=0 at the outage's start):", &all_attempts, 0.0, 1.0);
    let hs: Vec<f64> = handshake_times(dir).into_iter().filter(|t| *t >= wall_back - 0.5).collect();
    let peak = {
        let mut per: std::collections::BTreeMap<i64, usize> = Default::default();
        for t in &hs {
            *per.entry((t - wall_back).floor() as i64).or_default() += 1;
        }
        per.values().copied().max().unwrap_or(0)
    };
    println!(
        "Handshakes recorded by the backend after its return: {} (peak {peak} in one second; {:.1} s from the outage start to the backend's return)",
        hs.len(),
        wall_back - wall_stop
    );
    histogram("Handshakes per second at the backend (t=0 at the backend's return):", &hs, wall_back, 1.0);
    let (rss, hwm) = memory_kib(backend2.child.id());
    println!(
        "restarted backend's memory with {back} agents reconnected: VmRSS {:.1} MiB, peak VmHWM {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(fleet);
    let mut b2 = backend2;
    stop_backend(&mut b2, false);
}

/// The pins writer alone, on this machine's disk: N pins asked for at once (as N first
/// Handshakes would), each answered once durable.
async fn pins_only(n: usize, serial: Option<usize>) {
    use opsagent::backend::pins::{PinRequest, PinStore, PinWriter};
    let tmp = tempfile::tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into())).unwrap();
    let store = PinStore::open(&tmp.path().join("pins")).unwrap();
    let writer = PinWriter::start(store.clone()).unwrap();
    let now = SystemTime::now();
    let t = Instant::now();
    let replies: Vec<_> = (0..n)
        .map(|i| writer.submit(PinRequest::new("storm", &format!("i-{i:05}"), "storm", "127.0.0.1:1", now)))
        .collect();
    for r in replies {
        r.await.unwrap().unwrap();
    }
    let took = t.elapsed().as_secs_f64();
    let batches = writer.stats().batches.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "pins writer: {n} first-use pins durable in {took:.2} s ({:.0} per second), {batches} batches (one syncfs + one directory fsync each), in {}",
        n as f64 / took,
        tmp.path().display()
    );
    if let Some(m) = serial {
        // The previous way: each pin's file synced on its own, one after the other.
        let t = Instant::now();
        for i in 0..m {
            store.check("serial", &format!("i-{i:05}"), "storm", "127.0.0.1:1", true, now).unwrap();
        }
        let took = t.elapsed().as_secs_f64();
        println!("one batch per pin, serially: {m} pins in {took:.2} s ({:.0} per second)", m as f64 / took);
    }
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if let Some(n) = args.pins {
        return rt.block_on(pins_only(n, args.pins_serial));
    }
    rt.block_on(async {
        scenario(&args, None).await;
        if !args.no_hint {
            scenario(&args, Some(args.hint)).await;
        }
    });
}
