//! The backend link: one WebSocket session at a time, re-established forever.
//!
//! # Connecting
//! Every attempt resolves the host name again (a backend that moved is found), connects
//! (through an HTTP CONNECT proxy when [`crate::net::proxy`] says so), runs TLS for `wss://` (rustls,
//! system roots plus `ca_file`, verification on unless `tls_insecure`, which is warned
//! about at every connect) and upgrades to WebSocket. Each stage has its own timeout and
//! its own error text, kept in [`LinkStatus::last_error`].
//!
//! # Reconnecting
//! Exponential backoff with full jitter ([`Backoff`]): attempt `k` waits a uniform draw in
//! `[0, min(backoff_max, backoff_base·2^(k-1))]`. A session that got an answer from the
//! backend and stayed up `healthy_after` resets the count. Backend hints are honoured
//! within the cap (see below).
//!
//! # AppNotReady
//! As the original agent did, the connection is kept and the Handshake is repeated on it
//! (a v1 backend expects exactly that, and pushes nothing to a not-ready connection).
//! The pause before each repeat follows the same backoff (same base, full jitter,
//! doubling per consecutive `AppNotReady`), with its ceiling lowered to
//! `app_not_ready_retry` (30 s, the original's fixed interval): the backend is up and
//! answering, so the 5-minute cap that protects a struggling backend would only delay the
//! moment the app becomes ready, and the jitter already keeps a fleet from repeating in
//! lockstep.
//!
//! # Liveness
//! A WebSocket ping every `ping_interval`; any frame counts as a sign of life. A session
//! silent for two intervals (a lost pong, a half-open TCP connection) is declared dead
//! and replaced. Writes are bounded by the same two intervals, so a peer that stopped
//! reading cannot wedge the link either. A Handshake unanswered for `answer_timeout`
//! ends the session too.
//!
//! # Bad input
//! Invalid JSON, a frame without `code`, a malformed known message or a binary frame is
//! logged with the reason and counted; after `max_bad_frames` in a row the connection is
//! replaced. Unknown codes are logged, counted apart and ignored (protocol v1). A frame
//! announcing more than `max_frame` bytes is refused from its header, before its payload
//! is read: the connection is closed with 1009 and replaced.
//!
//! # Extensions (used only when both sides announced them in `capabilities`)
//! - `statelog-ack`: StateLogs carry `seq`; one leaves the spool once acknowledged
//!   (`StateLogAck {seq}`, cumulative). Without it a StateLog is delivered once written,
//!   and neither `seq` nor `offline` is sent: a v1 backend sees v1 StateLogs (nor
//!   `ran_at`, sent to a backend that announced its capabilities).
//! - `heartbeat`: a [`heartbeat`] message every `heartbeat_interval`.
//! - `reconnect-hint`: the backend may send `{"code": "Reconnect", "after_s": N}` or close
//!   with a reason `reconnect after N s`; the next attempt then waits a uniform draw in
//!   `[h, min(cap, h + max(h/2, base))]` with `h = min(N, backoff_max)`.
//! - `fetch-logs` (announced only with a log service, [`Link::with_logs`]): a `FetchLogs`
//!   is handed to the service on a task of the session (the bundle is built off the
//!   runtime); its answer comes back to the session loop, which sends the `Logs` frames
//!   in order. One request at a time; a session that ends drops its request.
//!
//! The standard HTTP `Retry-After: N` on a refused WebSocket upgrade (e.g. a 503 from a
//! load balancer during a deploy) is honoured the same way, without negotiation.

mod connect;
pub mod heartbeat;
mod status;
mod tls;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use opsagent_shared::timer::sleep_until_opt;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

pub use connect::{Resolver, SystemResolver, Target, Ws};
// Re-exported: the link's configuration names them, and callers knew them here.
pub use crate::net::{http_client_builder, Backoff, NoProxy, ProxySettings, ProxyUrl};
pub use status::{now_unix, LinkState, LinkStatus};

use crate::protocol::{capability, parse_inbound, Identity, Inbound, Outbound, StateLog};
use crate::round::api::{EngineStatus, Event, Liveness, UpdateOrder};

/// Distinct unknown message codes logged per connection; the rest are only counted.
const MAX_UNKNOWN_LOGGED: usize = 8;

/// Bad frames of a run logged one by one; the rest are counted and summed up once.
const MAX_BAD_LOGGED: u32 = 8;

/// Consecutive bad frames: their count and how many were not logged one by one (said once
/// when the run ends).
#[derive(Default)]
struct BadRun {
    count: u32,
    unlogged: u32,
}

impl BadRun {
    /// A good frame ends the run.
    fn end(&mut self) {
        if self.unlogged > 0 {
            tracing::warn!(
                consecutive = self.count,
                not_logged = self.unlogged,
                "a run of bad frames from the backend ended"
            );
        }
        *self = BadRun::default();
    }
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub ws_uri: String,
    pub ca_file: Option<PathBuf>,
    pub tls_insecure: bool,
    /// `[agent] allow_insecure_transport`: plaintext or unverified TLS to a backend that
    /// is not on this host (see [`transport`]).
    pub allow_insecure_transport: bool,
    pub proxy: ProxySettings,
    pub ping_interval: Duration,
    /// Between two Heartbeats (only to a backend that announced `heartbeat`).
    pub heartbeat_interval: Duration,
    pub max_frame: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A session answered by the backend and up this long resets the backoff.
    pub healthy_after: Duration,
    /// Consecutive bad frames tolerated before the connection is replaced.
    pub max_bad_frames: u32,
    /// Ceiling of the pause before repeating a Handshake answered with AppNotReady.
    pub app_not_ready_retry: Duration,
    /// Bound of each connection stage (resolve, TCP, proxy, TLS, upgrade).
    pub connect_timeout: Duration,
    /// A Handshake unanswered this long ends the session.
    pub answer_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            ws_uri: String::new(),
            ca_file: None,
            tls_insecure: false,
            allow_insecure_transport: false,
            proxy: ProxySettings::default(),
            ping_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(60),
            max_frame: 16 * 1024 * 1024,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            healthy_after: Duration::from_secs(60),
            max_bad_frames: 100,
            app_not_ready_retry: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            answer_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("backend URL {0}")]
    Url(String),
    #[error("insecure backend link: {0}")]
    Insecure(String),
    #[error("TLS set-up: {0}")]
    TlsSetup(String),
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connecting to {what}: {reason}")]
    Tcp { what: String, reason: String },
    #[error("proxy {proxy}: {reason}")]
    Proxy { proxy: String, reason: String },
    #[error("{url}: {reason}")]
    TlsHandshake { url: String, reason: String },
    #[error("{url}: WebSocket upgrade refused with HTTP {status}{}", retry_after.map(|s| format!(" (Retry-After: {s} s)")).unwrap_or_default())]
    Refused { url: String, status: u16, retry_after: Option<u64> },
    #[error("{url}: WebSocket upgrade failed: {reason}")]
    Upgrade { url: String, reason: String },
    #[error("{url}: {stage} took longer than {secs} s")]
    Timeout { url: String, stage: &'static str, secs: u64 },
    #[error("connection to {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("no frame from {url} for {silent_s} s (two ping intervals): connection declared dead")]
    Dead { url: String, silent_s: u64 },
    #[error("{url} did not answer the Handshake within {secs} s")]
    NoAnswer { url: String, secs: u64 },
    #[error("{url} closed the connection{reason}")]
    Closed { url: String, reason: String },
    #[error("{count} consecutive bad frames from {url}; reconnecting")]
    TooManyBadFrames { url: String, count: u32 },
    #[error("{url} sent a frame over the {limit}-byte limit ({detail}); closed with 1009")]
    Oversized { url: String, limit: usize, detail: String },
}

impl LinkError {
    /// A standard "come back later" carried by the error (HTTP `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LinkError::Refused { retry_after: Some(s), .. } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

/// Asked before every connection, as the original built a new manager (and re-read the
/// instance userdata) for each: a new identity when the userdata changed it.
pub type IdentityRefresh =
    Arc<dyn Fn(Identity) -> futures_util::future::BoxFuture<'static, Option<Identity>> + Send + Sync>;

/// Where StateLogs wait for delivery (the spool, or a fake in tests).
pub trait Outbox: Send + Sync {
    /// Pending StateLogs with a sequence number above `seq`, in order.
    fn pending_after(&self, seq: u64) -> Vec<StateLog>;
    /// Delivered: with acks, everything up to `seq`; without, exactly `seq`.
    fn delivered(&self, seq: u64, cumulative: bool);
    /// Signalled whenever a StateLog is added.
    fn added(&self) -> Arc<Notify>;
    /// How many StateLogs wait (for heartbeats), if known.
    fn depth(&self) -> Option<u64> {
        None
    }
}

/// The `reconnect after N s` close reason (the reference backend's spelling; `retry after
/// N` is accepted too).
pub fn parse_close_hint(reason: &str) -> Option<Duration> {
    let lower = reason.to_ascii_lowercase();
    let at = ["reconnect after", "retry after"].iter().find_map(|k| lower.find(k).map(|i| i + k.len()))?;
    let digits: String = lower[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_secs)
}

/// What each side announced.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    /// The backend sent a Capabilities frame at all (it is not an original v1 backend).
    announced: bool,
    acks: bool,
    heartbeat: bool,
    hints: bool,
    upgrade_report: bool,
    drift: bool,
    fetch_logs: bool,
}

impl Caps {
    fn from_backend(list: &[String]) -> Self {
        let has = |c: &str| list.iter().any(|x| x == c) && capability::ALL.contains(&c);
        Self {
            announced: true,
            acks: has(capability::STATELOG_ACK),
            heartbeat: has(capability::HEARTBEAT),
            hints: has(capability::RECONNECT_HINT),
            upgrade_report: has(capability::UPGRADE_REPORT),
            drift: has(capability::DRIFT),
            fetch_logs: has(capability::FETCH_LOGS),
        }
    }
}

enum EndKind {
    Error(LinkError),
    /// The backend asked to be left alone for a while.
    Hint(Duration),
    /// The backend answered our Test (`TestAns`): the session is over, as in the
    /// original (manager.py `__act_test_ans` stopped the manager and it reconnected).
    TestDone,
    Shutdown,
}

struct SessionEnd {
    kind: EndKind,
    /// Answered by the backend and up at least `healthy_after`.
    healthy: bool,
}

pub struct Link<O: Outbox> {
    cfg: LinkConfig,
    who: Identity,
    init_errors: Option<String>,
    outbox: Arc<O>,
    engine: mpsc::Sender<Event>,
    engine_status: watch::Receiver<EngineStatus>,
    status: watch::Sender<LinkStatus>,
    liveness: Liveness,
    shutdown: watch::Receiver<bool>,
    backoff: Backoff,
    connector: connect::Connector,
    started: Instant,
    upgrades: Option<Arc<crate::upgrade::UpgradeReports>>,
    drift: Option<Arc<crate::drift::DriftBoard>>,
    logs: Option<Arc<crate::logframes::LogService>>,
    refresh: Option<IdentityRefresh>,
}

impl<O: Outbox + 'static> Link<O> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: LinkConfig,
        who: Identity,
        init_errors: Option<String>,
        outbox: Arc<O>,
        engine: mpsc::Sender<Event>,
        engine_status: watch::Receiver<EngineStatus>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, watch::Receiver<LinkStatus>, Liveness), LinkError> {
        let connector = connect::Connector::new(&cfg, Arc::new(SystemResolver))?;
        // Said in the status from the start, and logged at every connect (the first at start).
        let (status, status_rx) =
            watch::channel(LinkStatus { insecure_transport: connector.insecure.clone(), ..LinkStatus::default() });
        let liveness = Liveness::default();
        let backoff = Backoff::from_entropy(cfg.backoff_base, cfg.backoff_max);
        let link = Self {
            cfg,
            who,
            init_errors,
            outbox,
            engine,
            engine_status,
            status,
            liveness: liveness.clone(),
            shutdown,
            backoff,
            connector,
            started: Instant::now(),
            upgrades: None,
            drift: None,
            logs: None,
            refresh: None,
        };
        Ok((link, status_rx, liveness))
    }

    /// Resolves host names with `resolver` (tests point a name at another port).
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.connector.resolver = resolver;
        self
    }

    /// Re-reads who this instance is before every connection.
    pub fn with_identity_refresh(mut self, refresh: IdentityRefresh) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// Failed upgrades to report (once, to a backend that announced `upgrade-report`).
    pub fn with_upgrade_reports(mut self, reports: Arc<crate::upgrade::UpgradeReports>) -> Self {
        self.upgrades = Some(reports);
        self
    }

    /// Drift reports to send to a backend that announced `drift`.
    pub fn with_drift(mut self, board: Arc<crate::drift::DriftBoard>) -> Self {
        self.drift = Some(board);
        self
    }

    /// Answers `FetchLogs` (and announces `fetch-logs`) with `service`.
    pub fn with_logs(mut self, service: Arc<crate::logframes::LogService>) -> Self {
        self.logs = Some(service);
        self
    }

    async fn deliver_drift(&self, ws: &mut Ws) -> Result<(), LinkError> {
        let Some(report) = self.drift.as_ref().and_then(|d| d.take_pending()) else { return Ok(()) };
        let states = report.states.len();
        let version = report.recipe_version;
        self.send(ws, self.frame(&Outbound::Drift(report))).await?;
        tracing::info!(recipe_version = version, states, "drift report sent to the backend");
        Ok(())
    }

    /// Once the session is established: the pending upgrade failure goes to a backend
    /// that announced `upgrade-report`; a backend that did not never hears of it (it was
    /// logged and is in `opsagent status`).
    async fn deliver_upgrade_report(&self, ws: &mut Ws, caps: Caps) -> Result<(), LinkError> {
        let Some(f) = self.upgrades.as_ref().and_then(|u| u.take_pending()) else { return Ok(()) };
        if !caps.upgrade_report {
            tracing::info!(version = %f.version, "the backend did not announce upgrade-report: the failed upgrade stays in the log and `opsagent status`");
            return Ok(());
        }
        let msg = Outbound::UpgradeReport { version: f.version.clone(), running: f.running, reason: f.reason };
        self.send(ws, self.frame(&msg)).await?;
        tracing::info!(version = %f.version, "failed upgrade reported to the backend");
        Ok(())
    }

    /// A fixed backoff seed (deterministic tests and benches).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.backoff = Backoff::new(self.cfg.backoff_base, self.cfg.backoff_max, seed);
        self
    }

    fn set_state(&self, state: LinkState) {
        self.status.send_modify(|s| s.state = state);
    }

    fn record_error(&self, e: &LinkError) {
        let text = e.to_string();
        self.status.send_modify(|s| {
            s.last_error = Some(text);
            s.last_error_unix = Some(now_unix());
        });
    }

    fn url(&self) -> &str {
        &self.connector.target.url
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub async fn run(mut self) {
        // Attempts since start or since the last healthy session.
        let mut attempt: u32 = 0;
        let t = &self.connector.target;
        match self.cfg.proxy.proxy_for(&t.scheme, &t.host, t.port) {
            Some(p) => {
                tracing::info!(proxy = %p, source = self.cfg.proxy.source, url = %t.url, "the backend is reached through a proxy")
            }
            None if !self.cfg.proxy.is_empty() => {
                tracing::info!(url = %t.url, "no_proxy matches the backend: direct connection")
            }
            None => {}
        }
        loop {
            if self.stopping() {
                break;
            }
            attempt = attempt.saturating_add(1);
            self.set_state(LinkState::Connecting { url: self.url().to_string(), attempt });
            self.liveness.touch();
            let mut hint = None;
            if let Some(refresh) = self.refresh.clone() {
                let current = self.who.clone();
                let refreshed = tokio::select! {
                    who = refresh(current) => who,
                    _ = self.liveness_ticks() => None,
                    _ = wait_true(self.shutdown.clone()) => break,
                };
                if let Some(who) = refreshed {
                    tracing::info!(from = %self.who.app_id, to = %who.app_id, "the instance userdata names another app: new identity");
                    self.who = who;
                }
            }
            if let Some(warning) = &self.connector.insecure {
                tracing::warn!(url = %self.url(), warning = %warning, "the backend link is not authenticated");
            }
            let opened = tokio::select! {
                r = self.connector.open(&self.cfg, self.cfg.connect_timeout) => Some(r),
                _ = self.liveness_ticks() => None,
                _ = wait_true(self.shutdown.clone()) => None,
            };
            match opened {
                None => break,
                Some(Ok((ws, opened))) => {
                    let (peer, via) = (opened.peer.to_string(), opened.via.as_ref().map(ToString::to_string));
                    self.status.send_modify(|s| {
                        s.connects += 1;
                        s.peer = Some(peer.clone());
                        s.proxy = via.clone();
                        s.backend_capabilities.clear();
                    });
                    tracing::info!(url = %self.url(), peer = %peer, proxy = via.as_deref().unwrap_or("none"), attempt, "connected");
                    let end = self.session(ws).await;
                    if let Some(d) = &self.drift {
                        // Reports made while no backend listens go to the journal.
                        d.set_listening(false);
                    }
                    let _ = self.engine.send(Event::Online(false)).await;
                    if end.healthy {
                        attempt = 0;
                    }
                    match end.kind {
                        EndKind::Shutdown => break,
                        EndKind::Hint(d) => {
                            tracing::info!(url = %self.url(), after_s = d.as_secs(), "the backend asked to reconnect later");
                            hint = Some(d);
                        }
                        EndKind::TestDone => tracing::info!(url = %self.url(), "test answered; connecting again"),
                        EndKind::Error(e) => {
                            tracing::warn!(message_id = opsagent_logline::catalog::BACKEND_UNREACHABLE, error = %e, "backend connection lost");
                            self.record_error(&e);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(message_id = opsagent_logline::catalog::BACKEND_UNREACHABLE, error = %e, attempt, "cannot reach the backend");
                    hint = e.retry_after();
                    self.record_error(&e);
                }
            }
            let delay = match hint {
                Some(h) => self.backoff.after_hint(h),
                None => self.backoff.delay(attempt.max(1)),
            };
            let next = attempt.saturating_add(1);
            // Whole seconds, rounded as the end is: the pause shown is never cut by the
            // clamp against a wall clock stepped back (see LinkStatus::describe_at).
            let in_s = delay.as_secs_f64().round() as u64;
            let until_unix = now_unix() + in_s;
            self.set_state(LinkState::Reconnecting { in_s, until_unix, attempt: next });
            tracing::info!(delay_ms = delay.as_millis() as u64, attempt = next, "reconnecting");
            if self.pause(delay).await {
                break;
            }
        }
        self.set_state(LinkState::Stopped);
    }

    /// Ticks the liveness every second, forever (raced against slow work).
    async fn liveness_ticks(&self) {
        loop {
            sleep(Duration::from_secs(1)).await;
            self.liveness.touch();
        }
    }

    /// Sleeps, ticking the liveness; `true` if the daemon is shutting down.
    async fn pause(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return false,
                _ = sleep(Duration::from_secs(1)) => self.liveness.touch(),
                r = self.shutdown.changed() => if r.is_err() || *self.shutdown.borrow() { return true },
            }
        }
    }

    fn handshake(&self) -> Message {
        // `fetch-logs` only when there is something to answer with.
        let caps = capability::ALL
            .iter()
            .filter(|c| **c != capability::FETCH_LOGS || self.logs.is_some())
            .map(|c| c.to_string())
            .collect();
        self.frame(&Outbound::Handshake { init_errors: self.init_errors.clone(), capabilities: caps })
    }

    /// Bytes the link adds to a `Logs` frame built without them (the instance's ids).
    fn frame_overhead(&self) -> usize {
        let ids = serde_json::json!({"instance_id": self.who.instance_id, "app_id": self.who.app_id});
        ids.to_string().len()
    }

    fn frame(&self, msg: &Outbound) -> Message {
        Message::Text(msg.to_json(&self.who).to_string().into())
    }

    /// A write bounded by two ping intervals: a peer that stopped reading is dead too.
    async fn send(&self, ws: &mut Ws, msg: Message) -> Result<(), LinkError> {
        let limit = self.cfg.ping_interval * 2;
        match timeout(limit, ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LinkError::Transport { url: self.url().to_string(), reason: e.to_string() }),
            Err(_) => Err(LinkError::Dead { url: self.url().to_string(), silent_s: limit.as_secs() }),
        }
    }

    /// Counts a bad frame; `Some` when too many came in a row.
    /// The first [`MAX_BAD_LOGGED`] of a run are logged one by one, the rest only counted:
    /// a flood would otherwise write up to `max_bad_frames` lines per connection.
    fn bad_frame(&self, bad_run: &mut BadRun, what: &str, reason: &str) -> Option<LinkError> {
        bad_run.count += 1;
        self.status.send_modify(|s| s.bad_frames += 1);
        if bad_run.count > MAX_BAD_LOGGED {
            bad_run.unlogged += 1;
        } else {
            tracing::warn!(consecutive = bad_run.count, reason = %reason, "{what}");
        }
        (bad_run.count >= self.cfg.max_bad_frames)
            .then(|| LinkError::TooManyBadFrames { url: self.url().to_string(), count: bad_run.count })
    }

    async fn session(&mut self, mut ws: Ws) -> SessionEnd {
        let opened_at = Instant::now();
        let mut answered = false;
        let end = |kind: EndKind, answered: bool, healthy_after: Duration| SessionEnd {
            kind,
            healthy: answered && opened_at.elapsed() >= healthy_after,
        };
        let healthy_after = self.cfg.healthy_after;
        let url = self.url().to_string();
        if let Err(e) = self.send(&mut ws, self.handshake()).await {
            return end(EndKind::Error(e), false, healthy_after);
        }
        tracing::info!(url = %url, instance_id = %self.who.instance_id, app_id = %self.who.app_id, "handshake sent");
        let added = self.outbox.added();
        let mut caps = Caps::default();
        let mut established: Option<Instant> = None;
        let mut last_sent: u64 = 0;
        let mut bad_run = BadRun::default();
        // Unknown codes logged in this session (a few distinct ones, each once).
        let mut unknown_logged: Vec<String> = Vec::new();
        let mut fetch_logs_warned = false;
        // The answer to a FetchLogs is built on its own task (reading and gzipping logs
        // must not stall this loop) and comes back here to be sent in order; one at a
        // time, and dropped with the session.
        let (logs_tx, mut logs_rx) = mpsc::channel::<Vec<serde_json::Value>>(1);
        let mut logs_task: Option<AbortOnDrop> = None;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval_at(Instant::now() + self.cfg.ping_interval, self.cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answer_deadline = Some(Instant::now() + self.cfg.answer_timeout);
        let mut rehandshake: Option<Instant> = None;
        let mut not_ready: u32 = 0;
        let mut next_heartbeat: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Set when new StateLogs may be waiting, so the spool is read only then.
        let mut dirty = false;
        loop {
            if established.is_some() && dirty {
                dirty = false;
                if let Err(e) = self.flush(&mut ws, caps, &mut last_sent).await {
                    return end(EndKind::Error(e), answered, healthy_after);
                }
            }
            let notified = added.notified();
            let dead_at = last_heard + self.cfg.ping_interval * 2;
            tokio::select! {
                frame = ws.next() => {
                    last_heard = Instant::now();
                    let msg = match frame {
                        None => return end(EndKind::Error(LinkError::Closed { url, reason: String::new() }), answered, healthy_after),
                        Some(Err(e)) => {
                            let e = self.read_error(&mut ws, e).await;
                            return end(EndKind::Error(e), answered, healthy_after);
                        }
                        Some(Ok(m)) => m,
                    };
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(b) => {
                            self.status.send_modify(|s| s.binary_frames += 1);
                            let reason = format!("{} bytes; the protocol uses text frames", b.len());
                            if let Some(e) = self.bad_frame(&mut bad_run, "binary frame from the backend refused", &reason) {
                                return end(EndKind::Error(e), answered, healthy_after);
                            }
                            continue;
                        }
                        Message::Close(frame) => {
                            let hinted = frame.as_ref().filter(|_| caps.hints).and_then(|f| parse_close_hint(f.reason.as_str()));
                            if let Some(h) = hinted {
                                return end(EndKind::Hint(h), answered, healthy_after);
                            }
                            let reason = frame.map(|f| format!(" ({} {})", u16::from(f.code), f.reason)).unwrap_or_default();
                            return end(EndKind::Error(LinkError::Closed { url, reason }), answered, healthy_after);
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    };
                    let inbound = match parse_inbound(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            if let Some(e) = self.bad_frame(&mut bad_run, "bad frame from the backend ignored", &e.to_string()) {
                                return end(EndKind::Error(e), answered, healthy_after);
                            }
                            continue;
                        }
                    };
                    if let Inbound::Unknown(code) = &inbound {
                        self.status.send_modify(|s| s.unknown_frames += 1);
                        if unknown_logged.len() < MAX_UNKNOWN_LOGGED && !unknown_logged.contains(code) {
                            unknown_logged.push(code.clone());
                            tracing::info!(code = %code, "unknown message code ignored (logged once per code and connection; all are counted)");
                        }
                        continue;
                    }
                    bad_run.end();
                    answered = true;
                    answer_deadline = None;
                    match inbound {
                        Inbound::RecipeMetadata(r) => {
                            if established.is_none() {
                                established = Some(Instant::now());
                                dirty = true;
                                last_sent = 0;
                                not_ready = 0;
                                rehandshake = None;
                                self.set_state(LinkState::Connected { url: url.clone(), since_unix: now_unix() });
                                if caps.heartbeat {
                                    next_heartbeat = Some(Instant::now());
                                }
                                let _ = self.engine.send(Event::Online(true)).await;
                                if let Err(e) = self.deliver_upgrade_report(&mut ws, caps).await { return end(EndKind::Error(e), answered, healthy_after); }
                            }
                            let version = r.recipe_version;
                            match r.states {
                                // worker.py `load`: no states, or an empty list, is "no change in states".
                                None => { let _ = self.engine.send(Event::VersionOnly(version)).await; }
                                Some(states) if states.is_empty() => { let _ = self.engine.send(Event::VersionOnly(version)).await; }
                                Some(states) => match crate::recipe::Recipe::from_wire(version, r.module, states) {
                                    Ok(mut recipe) => {
                                        if let Some(sig) = r.signature {
                                            recipe.attach_signature(sig);
                                        }
                                        let waits = recipe.has_waits();
                                        let _ = self.engine.send(Event::Recipe(Arc::new(recipe))).await;
                                        if waits {
                                            let q = self.frame(&Outbound::WaitQuery { recipe_version: version });
                                            if let Err(e) = self.send(&mut ws, q).await { return end(EndKind::Error(e), answered, healthy_after); }
                                        }
                                    }
                                    Err(e) => tracing::error!(error = %e, version, "invalid recipe rejected; the current round goes on"),
                                },
                            }
                        }
                        Inbound::State { recipe_version, state_id } => {
                            let _ = self.engine.send(Event::WaitDone { recipe_version, state_ids: vec![state_id] }).await;
                        }
                        Inbound::WaitList { recipe_version, waited } => {
                            let ids = waited.into_iter().map(|w| w.state_id).collect();
                            let _ = self.engine.send(Event::WaitDone { recipe_version, state_ids: ids }).await;
                        }
                        Inbound::AgentUpdate { version, url: u } => {
                            let _ = self.engine.send(Event::AgentUpdate(UpdateOrder { version, url: u })).await;
                        }
                        Inbound::AppNotReady => {
                            if established.take().is_some() {
                                next_heartbeat = None;
                                let _ = self.engine.send(Event::Online(false)).await;
                            }
                            if rehandshake.is_none() {
                                not_ready += 1;
                                let delay = self.backoff.delay_capped(not_ready, self.cfg.app_not_ready_retry);
                                rehandshake = Some(Instant::now() + delay);
                                let until_unix = now_unix() + delay.as_secs_f64().round() as u64;
                                self.set_state(LinkState::AppNotReady {
                                    url: url.clone(),
                                    attempt: not_ready,
                                    in_s: delay.as_secs_f64().round() as u64,
                                    until_unix,
                                });
                                tracing::info!(url = %url, retry_ms = delay.as_millis() as u64, attempt = not_ready, "backend: app not ready; the Handshake will be repeated");
                            }
                        }
                        Inbound::Test => {
                            let test = Outbound::Test { init_errors: self.init_errors.clone() };
                            if let Err(e) = self.send(&mut ws, self.frame(&test)).await { return end(EndKind::Error(e), answered, healthy_after); }
                        }
                        Inbound::TestAns { result, error } => {
                            if result {
                                tracing::info!("backend test answer: success");
                            } else {
                                tracing::warn!(error = error.as_deref().unwrap_or(""), "backend test answer: failure");
                            }
                            let _ = timeout(Duration::from_secs(1), ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "test answered".into() }))).await;
                            return end(EndKind::TestDone, answered, healthy_after);
                        }
                        Inbound::Capabilities(list) => {
                            caps = Caps::from_backend(&list);
                            tracing::info!(capabilities = ?list, "backend capabilities");
                            if caps.heartbeat && established.is_some() && next_heartbeat.is_none() {
                                next_heartbeat = Some(Instant::now());
                            }
                            self.status.send_modify(|s| s.backend_capabilities = list);
                            if let Some(d) = &self.drift {
                                d.set_listening(caps.drift);
                            }
                        }
                        Inbound::StateLogAck { seq } => {
                            if caps.acks {
                                self.outbox.delivered(seq, true);
                            } else {
                                tracing::warn!(seq, "StateLogAck from a backend that did not announce statelog-ack: ignored");
                            }
                        }
                        Inbound::Reconnect { after_s } => {
                            if caps.hints {
                                let _ = timeout(Duration::from_secs(1), ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "reconnect hint".into() }))).await;
                                return end(EndKind::Hint(Duration::from_secs(after_s)), answered, healthy_after);
                            }
                            tracing::warn!(after_s, "Reconnect from a backend that did not announce reconnect-hint: ignored");
                        }
                        Inbound::PlanRequest => {
                            if caps.drift {
                                let _ = self.engine.send(Event::PlanRequest).await;
                            } else {
                                tracing::warn!("PlanRequest from a backend that did not announce drift: ignored");
                            }
                        }
                        Inbound::FetchLogs(req) => match (&self.logs, caps.fetch_logs) {
                            (Some(service), true) => {
                                if logs_task.as_ref().is_some_and(|t| !t.0.is_finished()) {
                                    tracing::warn!(request = %req.request, "FetchLogs refused: another one is being answered");
                                    let no = crate::logframes::refusal(&req.request, "another log request is being answered");
                                    if let Err(e) = self.send(&mut ws, self.frame(&Outbound::Logs(no))).await { return end(EndKind::Error(e), answered, healthy_after); }
                                    continue;
                                }
                                tracing::info!(request = %req.request, since = req.since.0, upload = req.upload_url.is_some(), "the backend asked for logs");
                                let (service, tx) = (service.clone(), logs_tx.clone());
                                // Room for the ids the link adds to every frame.
                                let max_frame = self.cfg.max_frame.saturating_sub(self.frame_overhead());
                                logs_task = Some(AbortOnDrop(tokio::spawn(async move {
                                    let _ = tx.send(service.serve(req, max_frame).await).await;
                                })));
                            }
                            _ => {
                                // Once per connection: a backend retrying must not fill the journal.
                                if !fetch_logs_warned {
                                    fetch_logs_warned = true;
                                    tracing::warn!(request = %req.request, "FetchLogs from a backend that did not announce fetch-logs: ignored");
                                }
                            }
                        },
                        Inbound::Unknown(_) => {}
                    }
                }
                Some(frames) = logs_rx.recv() => {
                    let parts = frames.len();
                    for f in frames {
                        if let Err(e) = self.send(&mut ws, self.frame(&Outbound::Logs(f))).await { return end(EndKind::Error(e), answered, healthy_after); }
                    }
                    tracing::info!(frames = parts, "logs sent to the backend");
                }
                _ = notified => dirty = true,
                _ = ping.tick() => {
                    if let Err(e) = self.send(&mut ws, Message::Ping(Vec::new().into())).await { return end(EndKind::Error(e), answered, healthy_after); }
                }
                _ = sleep_until(dead_at) => {
                    let silent_s = last_heard.elapsed().as_secs();
                    return end(EndKind::Error(LinkError::Dead { url, silent_s }), answered, healthy_after);
                }
                _ = sleep_until_opt(answer_deadline) => {
                    let secs = self.cfg.answer_timeout.as_secs();
                    return end(EndKind::Error(LinkError::NoAnswer { url, secs }), answered, healthy_after);
                }
                _ = sleep_until_opt(rehandshake) => {
                    rehandshake = None;
                    if let Err(e) = self.send(&mut ws, self.handshake()).await { return end(EndKind::Error(e), answered, healthy_after); }
                    answer_deadline = Some(Instant::now() + self.cfg.answer_timeout);
                }
                _ = sleep_until_opt(next_heartbeat) => {
                    next_heartbeat = Some(Instant::now() + self.cfg.heartbeat_interval);
                    let connected_s = established.map_or(0, |t| t.elapsed().as_secs());
                    let msg = self.heartbeat(connected_s);
                    if let Err(e) = self.send(&mut ws, msg).await { return end(EndKind::Error(e), answered, healthy_after); }
                    self.status.send_modify(|s| s.heartbeats += 1);
                }
                _ = tick.tick() => {
                    self.liveness.touch();
                    // A failure of an upgrade run while connected goes out within a second.
                    if established.is_some() {
                        if let Err(e) = self.deliver_upgrade_report(&mut ws, caps).await { return end(EndKind::Error(e), answered, healthy_after); }
                        if let Err(e) = self.deliver_drift(&mut ws).await { return end(EndKind::Error(e), answered, healthy_after); }
                    }
                }
                r = self.shutdown.changed() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        if established.is_some() {
                            let _ = timeout(Duration::from_secs(2), self.flush(&mut ws, caps, &mut last_sent)).await;
                        }
                        let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                        return end(EndKind::Shutdown, answered, healthy_after);
                    }
                }
            }
        }
    }

    /// Turns a read error into the session's end; an oversized frame is counted and the
    /// connection closed with 1009 first.
    async fn read_error(&self, ws: &mut Ws, e: tokio_tungstenite::tungstenite::Error) -> LinkError {
        use tokio_tungstenite::tungstenite::Error as E;
        let url = self.url().to_string();
        match e {
            E::Capacity(c) => {
                self.status.send_modify(|s| {
                    s.bad_frames += 1;
                    s.oversized_frames += 1;
                });
                tracing::warn!(limit = self.cfg.max_frame, detail = %c, "frame over the size limit refused before reading it; closing with 1009");
                let close = CloseFrame { code: CloseCode::Size, reason: "frame too large".into() };
                let _ = timeout(Duration::from_secs(1), ws.close(Some(close))).await;
                LinkError::Oversized { url, limit: self.cfg.max_frame, detail: c.to_string() }
            }
            other => LinkError::Transport { url, reason: other.to_string() },
        }
    }

    fn heartbeat(&self, connected_s: u64) -> Message {
        let facts = {
            let s = self.status.borrow();
            heartbeat::LinkFacts {
                agent_version: self.who.agent_version.clone(),
                agent_uptime_s: self.started.elapsed().as_secs(),
                connected_s,
                connects: s.connects,
                bad_frames: s.bad_frames,
                spool_depth: self.outbox.depth(),
            }
        };
        let body = heartbeat::body(&self.engine_status.borrow(), &facts);
        self.frame(&Outbound::Heartbeat(body))
    }

    /// Sends every pending StateLog not yet sent on this connection.
    async fn flush(&self, ws: &mut Ws, caps: Caps, last_sent: &mut u64) -> Result<(), LinkError> {
        for mut log in self.outbox.pending_after(*last_sent) {
            let seq = log.seq.unwrap_or(0);
            // A v1 backend gets v1 StateLogs: no extension fields.
            if !caps.acks {
                log.seq = None;
            }
            if !caps.announced {
                log.offline = false;
                log.ran_at = None;
            }
            self.send(ws, self.frame(&Outbound::StateLog(log))).await?;
            *last_sent = seq;
            self.status.send_modify(|s| s.sent += 1);
            if !caps.acks {
                self.outbox.delivered(seq, false);
            }
        }
        Ok(())
    }
}

/// A task that ends with the session that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the flag is (or becomes) true, or its sender is gone.
async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_hints() {
        assert_eq!(parse_close_hint("reconnect after 30 s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_close_hint("Retry after 5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_close_hint("backend shutting down"), None);
        assert_eq!(parse_close_hint("reconnect after soon"), None);
    }

    #[test]
    fn only_known_capabilities_count() {
        let c = Caps::from_backend(&["heartbeat".into(), "teleport".into()]);
        assert!(c.announced && c.heartbeat && !c.acks && !c.hints);
        let c = Caps::default();
        assert!(!c.announced && !c.heartbeat);
    }
}
