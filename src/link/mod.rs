//! The backend link: one WebSocket session at a time, re-established forever.
//!
//! # Layout
//! The link only turns frames into protocol messages and back. What a session does with
//! them is decided by a state machine without I/O (`session.rs`: events and instants in,
//! actions out); the async shell here waits on the socket, the timers and the channels,
//! feeds the machine and performs its actions. Messages for the engine go through its
//! door ([`crate::round::intake`]), which types the recipe and says when the backend is
//! owed a `WaitQuery`.
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
mod session;
mod status;
mod tls;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub use connect::{Resolver, SystemResolver, Target, Ws};
// Re-exported: the link's configuration names them, and callers knew them here.
pub use crate::net::{http_client_builder, Backoff, NoProxy, ProxySettings, ProxyUrl};
pub use status::{now_unix, LinkState, LinkStatus};

use crate::protocol::{parse_inbound, Identity, Outbound, StateLog};
use crate::round::api::{EngineStatus, Event, Liveness};
use crate::round::intake::{EngineDoor, ForEngine};
use session::{Action, Collect, Counter, EndKind, Frame, Session, SessionEnd, SessionEvent, StatusChange};

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

pub struct Link<O: Outbox> {
    cfg: LinkConfig,
    who: Identity,
    init_errors: Option<String>,
    outbox: Arc<O>,
    engine: EngineDoor,
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
            engine: EngineDoor::new(engine),
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
                    self.engine.deliver(ForEngine::Online(false)).await;
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
                    // The engine learns the link is down from a failed attempt too, not only
                    // from a session that ended (a daemon started while the backend is down).
                    self.engine.deliver(ForEngine::Online(false)).await;
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

    /// One session on `ws`: [`Session`] decides, this waits on the socket, the timers and
    /// the channels, feeds what happened in and performs the actions.
    async fn session(&mut self, mut ws: Ws) -> SessionEnd {
        let who = session::Params {
            url: self.url().to_string(),
            instance_id: self.who.instance_id.clone(),
            app_id: self.who.app_id.clone(),
            init_errors: self.init_errors.clone(),
            logs: self.logs.is_some(),
        };
        // Lent to the session (AppNotReady pauses draw from it) and taken back, so the
        // reconnection pauses continue the same sequence.
        let mut machine = Session::new(Instant::now(), &self.cfg, who, self.backoff.clone());
        let end = self.drive(&mut machine, &mut ws).await;
        self.backoff = machine.into_backoff();
        end
    }

    async fn drive(&mut self, machine: &mut Session, ws: &mut Ws) -> SessionEnd {
        let added = self.outbox.added();
        // The answer to a FetchLogs is built on its own task (reading and gzipping logs
        // must not stall this loop) and comes back here to be sent in order; dropped with
        // the session.
        let mut logs: Option<LogsTask> = None;
        let mut actions = machine.start();
        loop {
            if let Some(kind) = self.perform(machine, ws, &mut logs, actions).await {
                return machine.end(Instant::now(), kind);
            }
            let event = tokio::select! {
                frame = ws.next() => SessionEvent::Frame(decode(frame)),
                _ = added.notified() => SessionEvent::Spooled,
                answer = logs_answer(&mut logs) => {
                    logs = None;
                    SessionEvent::LogsReady(answer)
                }
                _ = sleep_until(machine.next_deadline()) => SessionEvent::Timer,
                r = self.shutdown.changed() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        SessionEvent::Shutdown
                    } else {
                        actions = Vec::new();
                        continue;
                    }
                }
            };
            actions = machine.on_event(Instant::now(), event);
        }
    }

    /// Performs `actions` in order; `Some` when the session ends (asked, or a send failed:
    /// what follows a failed send is not done).
    fn perform<'a>(
        &'a self,
        machine: &'a mut Session,
        ws: &'a mut Ws,
        logs: &'a mut Option<LogsTask>,
        actions: Vec<Action>,
    ) -> BoxFuture<'a, Option<EndKind>> {
        Box::pin(async move {
            for action in actions {
                let sent = match action {
                    Action::Send(msg) => self.send(ws, self.frame(&msg)).await,
                    Action::Ping => self.send(ws, Message::Ping(Vec::new().into())).await,
                    Action::Heartbeat { connected_s } => self.send(ws, self.heartbeat(connected_s)).await,
                    Action::Engine(msg) => match self.engine.deliver(msg).await {
                        Some(reply) => self.send(ws, self.frame(&reply)).await,
                        None => Ok(()),
                    },
                    Action::Collect(what) => {
                        let event = match what {
                            Collect::StateLogs { after } => {
                                Some(SessionEvent::Pending(self.outbox.pending_after(after)))
                            }
                            Collect::UpgradeReport => {
                                self.upgrades.as_ref().and_then(|u| u.take_pending()).map(SessionEvent::UpgradeFailed)
                            }
                            Collect::Drift => {
                                self.drift.as_ref().and_then(|d| d.take_pending()).map(SessionEvent::Drift)
                            }
                        };
                        if let Some(event) = event {
                            let more = machine.on_event(Instant::now(), event);
                            if let Some(end) = self.perform(machine, ws, logs, more).await {
                                return Some(end);
                            }
                        }
                        Ok(())
                    }
                    Action::FinalFlush { after, within } => {
                        let pending = SessionEvent::Pending(self.outbox.pending_after(after));
                        let more = machine.on_event(Instant::now(), pending);
                        // Best effort: the session ends either way.
                        let _ = timeout(within, self.perform(machine, ws, logs, more)).await;
                        Ok(())
                    }
                    Action::Delivered { seq, cumulative } => {
                        self.outbox.delivered(seq, cumulative);
                        Ok(())
                    }
                    Action::Status(change) => {
                        self.apply(change);
                        Ok(())
                    }
                    Action::DriftListening(on) => {
                        if let Some(d) = &self.drift {
                            d.set_listening(on);
                        }
                        Ok(())
                    }
                    Action::StartLogs(req) => {
                        if let Some(service) = self.logs.clone() {
                            // Room for the ids the link adds to every frame.
                            let max_frame = self.cfg.max_frame.saturating_sub(self.frame_overhead());
                            let (tx, answer) = oneshot::channel();
                            let task = tokio::spawn(async move {
                                let _ = tx.send(service.serve(req, max_frame).await);
                            });
                            *logs = Some(LogsTask { _task: AbortOnDrop(task), answer });
                        }
                        Ok(())
                    }
                    Action::Notice(n) => {
                        n.log();
                        Ok(())
                    }
                    Action::Alive => {
                        self.liveness.touch();
                        Ok(())
                    }
                    Action::Close(frame) => {
                        let frame = frame.map(|(code, reason)| CloseFrame { code, reason: reason.into() });
                        let _ = timeout(Duration::from_secs(1), ws.close(frame)).await;
                        Ok(())
                    }
                    Action::End(kind) => return Some(kind),
                };
                if let Err(e) = sent {
                    return Some(EndKind::Error(e));
                }
            }
            None
        })
    }

    fn apply(&self, change: StatusChange) {
        match change {
            StatusChange::Count(c) => self.status.send_modify(|s| match c {
                Counter::BadFrames => s.bad_frames += 1,
                Counter::BinaryFrames => s.binary_frames += 1,
                Counter::UnknownFrames => s.unknown_frames += 1,
                Counter::Oversized => {
                    s.bad_frames += 1;
                    s.oversized_frames += 1;
                }
                Counter::Sent => s.sent += 1,
                Counter::Heartbeats => s.heartbeats += 1,
            }),
            StatusChange::Connected => {
                self.set_state(LinkState::Connected { url: self.url().to_string(), since_unix: now_unix() })
            }
            StatusChange::AppNotReady { attempt, delay } => {
                let in_s = delay.as_secs_f64().round() as u64;
                let until_unix = now_unix() + in_s;
                self.set_state(LinkState::AppNotReady { url: self.url().to_string(), attempt, in_s, until_unix });
            }
            StatusChange::Capabilities(list) => self.status.send_modify(|s| s.backend_capabilities = list),
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
}

/// A task that ends with the session that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

/// The running answer to a FetchLogs: its task and where its frames come back.
struct LogsTask {
    _task: AbortOnDrop,
    answer: oneshot::Receiver<Vec<serde_json::Value>>,
}

/// The running FetchLogs' frames once built (`None`: its task ended without any);
/// pending for ever while none runs.
async fn logs_answer(logs: &mut Option<LogsTask>) -> Option<Vec<serde_json::Value>> {
    match logs {
        Some(t) => (&mut t.answer).await.ok(),
        None => std::future::pending().await,
    }
}

/// A read from the WebSocket as the session sees it: a protocol message, or why not.
fn decode(frame: Option<Result<Message, WsError>>) -> Frame {
    match frame {
        None => Frame::Gone,
        Some(Err(WsError::Capacity(c))) => Frame::Oversized(c.to_string()),
        Some(Err(e)) => Frame::Broken(e.to_string()),
        Some(Ok(Message::Text(t))) => match parse_inbound(&t) {
            Ok(m) => Frame::Message(m),
            Err(e) => Frame::Bad(e),
        },
        Some(Ok(Message::Binary(b))) => Frame::Binary(b.len()),
        Some(Ok(Message::Close(f))) => Frame::Close(f.map(|f| (u16::from(f.code), f.reason.to_string()))),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Frame::Control,
    }
}

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
}
