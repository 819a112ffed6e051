//! In-process fixtures for the link tests: a fake outbox, a link runner, a test resolver,
//! a test CA, the reference backend in-process, a scripted WebSocket backend, a TCP relay
//! that can go silent, a counting CONNECT proxy, and log capture.
#![allow(dead_code, clippy::disallowed_methods, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use opsagent::backend::{Backend, BackendOptions, TlsFiles};
use opsagent::link::{Link, LinkConfig, LinkStatus, Outbox, Resolver};
use opsagent::protocol::{Identity, StateLog};
use opsagent::round::{EngineStatus, Event};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------- outbox

#[derive(Default)]
pub struct FakeOutbox {
    pub pending: Mutex<Vec<StateLog>>,
    pub delivered: Mutex<Vec<(u64, bool)>>,
    pub notify: Arc<Notify>,
}

impl FakeOutbox {
    pub fn push(&self, log: StateLog) {
        self.pending.lock().unwrap().push(log);
        self.notify.notify_one();
    }

    pub fn delivered(&self) -> Vec<(u64, bool)> {
        self.delivered.lock().unwrap().clone()
    }
}

impl Outbox for FakeOutbox {
    fn pending_after(&self, seq: u64) -> Vec<StateLog> {
        self.pending.lock().unwrap().iter().filter(|l| l.seq.unwrap_or(0) > seq).cloned().collect()
    }

    fn delivered(&self, seq: u64, cumulative: bool) {
        self.delivered.lock().unwrap().push((seq, cumulative));
        self.pending.lock().unwrap().retain(|l| if cumulative { l.seq > Some(seq) } else { l.seq != Some(seq) });
    }

    fn added(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    fn depth(&self) -> Option<u64> {
        Some(self.pending.lock().unwrap().len() as u64)
    }
}

pub fn statelog(seq: u64) -> StateLog {
    StateLog {
        recipe_version: 1,
        state_id: format!("s{seq}"),
        result: true,
        comment: None,
        stdout: None,
        seq: Some(seq),
        offline: true,
        ran_at: Some("2026-12-04T05:00:00.000Z".into()),
    }
}

// ---------------------------------------------------------------- link runner

pub fn who(instance: &str, app: &str) -> Identity {
    Identity {
        instance_id: instance.into(),
        app_id: app.into(),
        instance_token: "tok".into(),
        agent_version: "9.9.9".into(),
    }
}

/// Small, fast settings for tests.
pub fn quick(ws_uri: &str) -> LinkConfig {
    LinkConfig {
        ws_uri: ws_uri.to_string(),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        ..LinkConfig::default()
    }
}

pub struct Running {
    pub status: watch::Receiver<LinkStatus>,
    pub engine_events: Arc<Mutex<Vec<String>>>,
    pub engine_status: watch::Sender<EngineStatus>,
    pub outbox: Arc<FakeOutbox>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

pub struct Spawn {
    pub cfg: LinkConfig,
    pub instance: String,
    pub app: String,
    pub resolver: Option<Arc<dyn Resolver>>,
    pub seed: Option<u64>,
    pub outbox: Arc<FakeOutbox>,
    pub drift: Arc<opsagent::drift::DriftBoard>,
}

impl Spawn {
    pub fn new(cfg: LinkConfig) -> Self {
        Self {
            cfg,
            instance: "i-test".into(),
            app: "app-test".into(),
            resolver: None,
            seed: Some(1),
            outbox: Arc::new(FakeOutbox::default()),
            drift: Arc::new(opsagent::drift::DriftBoard::default()),
        }
    }

    pub fn resolver(mut self, r: Arc<dyn Resolver>) -> Self {
        self.resolver = Some(r);
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn ids(mut self, instance: &str, app: &str) -> Self {
        self.instance = instance.into();
        self.app = app.into();
        self
    }

    pub fn start(self) -> Running {
        let (engine_tx, mut engine_rx) = tokio::sync::mpsc::channel::<Event>(64);
        let (engine_status, engine_status_rx) = watch::channel(EngineStatus::default());
        let (stop, stop_rx) = watch::channel(false);
        let (mut link, status, _live) = Link::new(
            self.cfg,
            who(&self.instance, &self.app),
            None,
            self.outbox.clone(),
            engine_tx,
            engine_status_rx,
            stop_rx,
        )
        .expect("link");
        if let Some(r) = self.resolver {
            link = link.with_resolver(r);
        }
        link = link.with_drift(self.drift.clone());
        if let Some(s) = self.seed {
            link = link.with_seed(s);
        }
        let engine_events = Arc::new(Mutex::new(Vec::new()));
        let ev = engine_events.clone();
        tokio::spawn(async move {
            while let Some(e) = engine_rx.recv().await {
                let name = match e {
                    Event::Recipe(r) => format!("recipe {}", r.version),
                    Event::VersionOnly(v) => format!("version {v}"),
                    Event::WaitDone { recipe_version, .. } => format!("wait-done {recipe_version}"),
                    Event::AgentUpdate(u) => format!("update {}", u.version),
                    Event::Stop(_) => "stop".into(),
                    Event::Online(b) => format!("online {b}"),
                    Event::PlanRequest => "plan-request".into(),
                };
                ev.lock().unwrap().push(name);
            }
        });
        let task = tokio::spawn(link.run());
        Running { status, engine_events, engine_status, outbox: self.outbox, stop, task: Some(task) }
    }
}

impl Running {
    pub fn now(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds (panics with the last status after `secs`).
    pub async fn wait_for(&mut self, secs: u64, what: &str, pred: impl Fn(&LinkStatus) -> bool) -> LinkStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            {
                let s = self.status.borrow_and_update();
                if pred(&s) {
                    return s.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.status.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!("timed out after {secs} s waiting for {what}; status: {:#?}", self.status.borrow()),
            }
        }
    }

    pub async fn connected(&mut self, secs: u64) -> LinkStatus {
        self.wait_for(secs, "connected", |s| matches!(s.state, opsagent::link::LinkState::Connected { .. })).await
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Waits until `cond` holds, looking every 10 ms, instead of sleeping a fixed time and
/// hoping: a passing run waits only as long as the event takes, and `secs` is a deadline
/// for a broken build only (it panics naming `what`).
pub async fn eventually(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Paces tokio's paused clock (`#[tokio::test(start_paused = true)]`) for tests over real
/// sockets. Paused, tokio moves the clock to the next timer whenever the runtime has
/// nothing to run, including while a frame is on its way through a socket (an I/O wake-up
/// does not stop the jump) or a thread such as the backend's fsync works: alone, it would
/// fire the link's timeouts early and at random. This task keeps a timer 1 ms ahead, so a
/// jump is 1 ms at most, and blocks 1 ms of real time per 1 ms of clock, so the clock never
/// runs ahead of real time and falls behind it under load. Timer-driven intervals (backoff,
/// ping deadlines, hints) are then exact on the clock however loaded the machine; a wait
/// on a socket costs 1 ms when the kernel has the data at once and at most its real time
/// when it does not; a deadline is at least as long in real time as it says.
pub struct PacedClock(JoinHandle<()>);

pub fn paced_clock() -> PacedClock {
    PacedClock(tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            std::thread::sleep(Duration::from_millis(1));
        }
    }))
}

impl Drop for PacedClock {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn is_connected(s: &LinkStatus) -> bool {
    matches!(s.state, opsagent::link::LinkState::Connected { .. })
}

// ---------------------------------------------------------------- resolver

/// Names → addresses, changeable at any time; every lookup is recorded with the
/// (possibly paused) tokio clock.
#[derive(Default)]
pub struct MapResolver {
    map: Mutex<HashMap<String, SocketAddr>>,
    pub calls: Mutex<Vec<(String, tokio::time::Instant)>>,
}

impl MapResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, host: &str, addr: SocketAddr) {
        self.map.lock().unwrap().insert(host.to_string(), addr);
    }

    pub fn lookups(&self, host: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|(h, _)| h == host).count()
    }
}

impl Resolver for MapResolver {
    fn resolve(&self, host: &str, _port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        self.calls.lock().unwrap().push((host.to_string(), tokio::time::Instant::now()));
        let found = self.map.lock().unwrap().get(host).copied();
        let host = host.to_string();
        Box::pin(async move {
            found
                .map(|a| vec![a])
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no such test host")))
        })
    }
}

// ---------------------------------------------------------------- TLS

pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    pub fn write_pem(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).unwrap();
        path.to_path_buf()
    }

    /// A server certificate for `names`, written as `<stem>.crt`/`<stem>.key` in `dir`.
    pub fn issue(&self, names: &[&str], dir: &Path, stem: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let files = TlsFiles { cert: dir.join(format!("{stem}.crt")), key: dir.join(format!("{stem}.key")) };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

// ---------------------------------------------------------------- reference backend

pub struct RefBackend {
    pub backend: Option<Backend>,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    tls: Option<TlsFiles>,
    /// The listening socket, bound once and kept for the fixture's life: a restart serves
    /// the same socket again instead of binding its port anew, which another process may
    /// have taken meanwhile. While no backend serves it, connections wait in its backlog.
    socket: std::net::TcpListener,
}

impl RefBackend {
    /// The reference backend in-process on a fresh loopback port, serving `app` a
    /// one-state recipe.
    pub async fn start(dir: &Path, app: &str, tls: Option<TlsFiles>) -> Self {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut b = Self { backend: None, dir: dir.to_path_buf(), addr, tls, socket };
        b.serve(app).await;
        b
    }

    async fn serve(&mut self, app: &str) {
        let recipes = self.dir.join("recipes");
        std::fs::create_dir_all(&recipes).unwrap();
        let recipe = json!({"recipe_version": 1, "state": [
            {"id": "c", "module": "meta.comment", "parameter": {"comment": "hello"}}]});
        std::fs::write(recipes.join(format!("{app}.json")), recipe.to_string()).unwrap();
        let listener = TcpListener::from_std(self.socket.try_clone().unwrap()).unwrap();
        let mut opts = BackendOptions::new(&recipes, self.dir.join("statelog.jsonl"));
        opts.events = Some(self.dir.join("events.jsonl"));
        opts.poll = Duration::from_millis(50);
        opts.tls = self.tls.clone();
        self.backend = Some(Backend::start(listener, opts).await.expect("backend starts"));
    }

    pub async fn shutdown(&mut self) {
        if let Some(b) = self.backend.take() {
            b.shutdown().await;
        }
    }

    /// Stops and starts again on the same socket.
    pub async fn restart(&mut self, app: &str) {
        self.shutdown().await;
        self.serve(app).await;
    }

    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.dir.join("events.jsonl"))
    }

    /// The agent messages the backend recorded with this code.
    pub fn messages(&self, code: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == "message" && e["code"] == code).collect()
    }
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

// ---------------------------------------------------------------- scripted backend

pub type Ws = WebSocketStream<TcpStream>;

pub async fn accept(listener: &TcpListener, secs: u64) -> Ws {
    let (tcp, _) =
        tokio::time::timeout(Duration::from_secs(secs), listener.accept()).await.expect("the agent connects").unwrap();
    tokio_tungstenite::accept_async(tcp).await.unwrap()
}

/// The next text frame as JSON (control frames skipped); `None` if the connection ended
/// or nothing came within `secs`.
pub async fn next_json(ws: &mut Ws, secs: u64) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

pub fn recipe(version: u64) -> Value {
    json!({"code": "RecipeMetadata", "recipe_version": version, "state": [
        {"id": "c", "module": "meta.comment", "parameter": {"comment": "x"}}]})
}

// ---------------------------------------------------------------- TCP relay

/// Forwards TCP to `target`; [`Relay::freeze`] makes every current connection a black
/// hole (nothing passes either way, nothing is closed): a half-open connection as seen
/// from both ends. New connections forward normally.
pub struct Relay {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, a) = (conns.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(target).await else { continue };
                let open = Arc::new(AtomicBool::new(true));
                c.lock().unwrap().push(open.clone());
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, open.clone()));
                tokio::spawn(pump(ur, dw, open));
            }
        });
        Self { addr, conns, accepted }
    }

    pub fn freeze(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.store(false, Ordering::SeqCst);
        }
    }
}

async fn pump(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, open: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if open.load(Ordering::SeqCst) {
                    let _ = w.shutdown().await;
                    return;
                }
                // Frozen: never pass the close on either.
                std::future::pending::<()>().await;
                return;
            }
            Ok(n) => n,
        };
        if open.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- CONNECT proxy

/// An HTTP CONNECT proxy that counts tunnels, optionally requires Basic credentials, and
/// maps test host names to addresses.
pub struct Proxy {
    pub addr: SocketAddr,
    pub tunnels: Arc<Mutex<Vec<String>>>,
    pub refused: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(auth: Option<&str>, hosts: HashMap<String, SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let expected = auth.map(|a| format!("basic {}", b64(a.as_bytes())));
        let (t, rf) = (tunnels.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (t, rf, expected, hosts) = (t.clone(), rf.clone(), expected.clone(), hosts.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let mut lines = text.lines();
                    let first: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
                    let auth_ok = match &expected {
                        None => true,
                        Some(want) => lines.any(|l| {
                            l.to_ascii_lowercase().strip_prefix("proxy-authorization:").map(str::trim)
                                == Some(want.as_str())
                        }),
                    };
                    if first.first() != Some(&"CONNECT") {
                        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await;
                        return;
                    }
                    if !auth_ok {
                        rf.fetch_add(1, Ordering::SeqCst);
                        let _ = client
                            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\n\r\n")
                            .await;
                        return;
                    }
                    let target = first[1].to_string();
                    let (host, port) = target.rsplit_once(':').unwrap();
                    let dest = match hosts.get(host) {
                        Some(a) => SocketAddr::new(a.ip(), port.parse().unwrap()),
                        None => format!("{host}:{port}").parse().unwrap(),
                    };
                    let Ok(mut up) = TcpStream::connect(dest).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    t.lock().unwrap().push(target);
                    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
            }
        });
        Self { addr, tunnels, refused }
    }

    pub fn url(&self, auth: Option<&str>) -> String {
        match auth {
            Some(a) => format!("http://{a}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

fn b64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() { ABC[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    // The comparison above is on lower-cased header lines.
    out.to_ascii_lowercase()
}

// ---------------------------------------------------------------- logs

/// Captures this thread's tracing output (use with a current-thread runtime, where
/// spawned tasks run on the test's thread).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs.clone(), tracing::subscriber::set_default(sub))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

pub struct LogsWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogsWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogsWriter(self.0.clone())
    }
}
