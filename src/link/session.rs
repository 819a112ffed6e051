//! One WebSocket session as a state machine: [`Session::on_event`] takes what happened (a
//! frame, already decoded into a protocol message; a timer; a StateLog spooled; a report
//! or a log bundle ready) and the time it happened, and returns what to do, in order:
//! frames to send, messages for the engine, status changes, lines to log, the end of the
//! session. It does no I/O and reads no clock, so its tests feed instants and events
//! without sockets or a runtime; the async shell in the parent module waits on the socket,
//! the timers and the channels, feeds them in and performs the actions.
//!
//! The shell performs the actions of one event in order and stops at the first send that
//! fails (the session then ends with that error): an action placed after a send (a counter,
//! a "sent" log line, a delivery without acks) happens only once the send succeeded.

use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{parse_close_hint, LinkConfig, LinkError};
use crate::net::Backoff;
use crate::protocol::{capability, DriftReport, FetchLogs, Inbound, Outbound, ProtocolError, StateLog};
use crate::round::api::UpdateOrder;
use crate::round::intake::ForEngine;
use crate::upgrade::UpgradeFailure;

/// Distinct unknown message codes logged per connection; the rest are only counted.
pub const MAX_UNKNOWN_LOGGED: usize = 8;

/// Bad frames of a run logged one by one; the rest are counted and summed up once.
pub const MAX_BAD_LOGGED: u32 = 8;

/// How long a shutdown may spend sending the StateLogs still waiting.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Between two liveness ticks (which also deliver pending reports).
const TICK: Duration = Duration::from_secs(1);

/// What each side announced.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    /// The backend sent a Capabilities frame at all (it is not an original v1 backend).
    pub announced: bool,
    pub acks: bool,
    pub heartbeat: bool,
    pub hints: bool,
    pub upgrade_report: bool,
    pub drift: bool,
    pub fetch_logs: bool,
}

impl Caps {
    pub fn from_backend(list: &[String]) -> Self {
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

/// Consecutive bad frames: their count and how many were not logged one by one (said once
/// when the run ends).
#[derive(Debug, Default)]
struct BadRun {
    count: u32,
    unlogged: u32,
}

#[derive(Debug)]
pub enum EndKind {
    Error(LinkError),
    /// The backend asked to be left alone for a while.
    Hint(Duration),
    /// The backend answered our Test (`TestAns`): the session is over, as in the
    /// original (manager.py `__act_test_ans` stopped the manager and it reconnected).
    TestDone,
    Shutdown,
}

#[derive(Debug)]
pub struct SessionEnd {
    pub kind: EndKind,
    /// Answered by the backend and up at least `healthy_after`.
    pub healthy: bool,
}

/// A frame as the shell read it, turned into a protocol message where it is one.
#[derive(Debug)]
pub enum Frame {
    Message(Inbound),
    /// A text frame that is not a valid message (not JSON, no code, a malformed known one).
    Bad(ProtocolError),
    /// A binary frame of this many bytes.
    Binary(usize),
    /// The backend closed, with its close frame's code and reason if it sent one.
    Close(Option<(u16, String)>),
    /// Ping, pong: only a sign of life.
    Control,
    /// The stream ended without a close frame.
    Gone,
    /// A frame over the size limit, refused from its header.
    Oversized(String),
    /// The connection failed while reading.
    Broken(String),
}

#[derive(Debug)]
pub enum SessionEvent {
    Frame(Frame),
    /// A StateLog was added to the outbox.
    Spooled,
    /// The outbox's StateLogs after the sequence number asked for ([`Collect::StateLogs`]).
    Pending(Vec<StateLog>),
    /// An upgrade failure waiting to be reported ([`Collect::UpgradeReport`]).
    UpgradeFailed(UpgradeFailure),
    /// A drift report waiting to be sent ([`Collect::Drift`]).
    Drift(DriftReport),
    /// The answer to the running `FetchLogs`, or `None` when its task ended without one.
    LogsReady(Option<Vec<serde_json::Value>>),
    /// [`Session::next_deadline`] passed.
    Timer,
    /// The daemon is stopping.
    Shutdown,
}

/// What the shell reads (and takes) for the machine, feeding it back as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// The outbox's StateLogs with a sequence number above `after` → [`SessionEvent::Pending`].
    StateLogs { after: u64 },
    /// The pending upgrade failure, if any → [`SessionEvent::UpgradeFailed`].
    UpgradeReport,
    /// The pending drift report, if any → [`SessionEvent::Drift`].
    Drift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    BadFrames,
    BinaryFrames,
    UnknownFrames,
    /// An oversized frame: a bad frame and an oversized one at once.
    Oversized,
    /// A StateLog written to the backend.
    Sent,
    Heartbeats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusChange {
    Count(Counter),
    /// The session is established (the first RecipeMetadata); the shell adds the wall time.
    Connected,
    /// The Handshake will be repeated after `delay` (attempt `attempt`).
    AppNotReady {
        attempt: u32,
        delay: Duration,
    },
    /// The backend's capability list.
    Capabilities(Vec<String>),
}

#[derive(Debug)]
pub enum Action {
    /// Write this message (the shell adds the instance's ids).
    Send(Outbound),
    /// Write a WebSocket ping.
    Ping,
    /// Write a Heartbeat (the shell gathers the host's vitals).
    Heartbeat {
        connected_s: u64,
    },
    /// Read something for the machine and feed it back, performing what it returns here.
    Collect(Collect),
    /// Shutting down: [`Collect::StateLogs`], its sends bounded by `within` in all, a
    /// failure only ending them.
    FinalFlush {
        after: u64,
        within: Duration,
    },
    /// The outbox may drop StateLogs: up to `seq` when `cumulative` (an ack), else `seq`.
    Delivered {
        seq: u64,
        cumulative: bool,
    },
    /// Hand this to the engine (which may answer the backend through the shell).
    Engine(ForEngine),
    Status(StatusChange),
    /// Whether drift reports go to the backend (else to the journal).
    DriftListening(bool),
    /// Build the answer to this `FetchLogs` off the session's loop; it comes back as
    /// [`SessionEvent::LogsReady`].
    StartLogs(FetchLogs),
    Notice(Notice),
    /// Tick the watchdog's liveness.
    Alive,
    /// Close the WebSocket (bounded), with this code and reason if any.
    Close(Option<(CloseCode, &'static str)>),
    /// The session is over; nothing follows.
    End(EndKind),
}

/// A line for the journal, logged by the shell where it stands among the actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    HandshakeSent { url: String, instance_id: String, app_id: String },
    BadFrame { consecutive: u32, what: &'static str, reason: String },
    BadRunEnded { consecutive: u32, not_logged: u32 },
    UnknownCode(String),
    AppNotReady { url: String, retry_ms: u64, attempt: u32 },
    TestAnswer { result: bool, error: Option<String> },
    Capabilities(Vec<String>),
    AckIgnored { seq: u64 },
    ReconnectIgnored { after_s: u64 },
    PlanRequestIgnored,
    LogsRefused { request: String },
    LogsAsked { request: String, since: u64, upload: bool },
    FetchLogsIgnored { request: String },
    LogsSent { frames: usize },
    Oversized { limit: usize, detail: String },
    UpgradeNotAnnounced { version: String },
    UpgradeReported { version: String },
    DriftSent { recipe_version: u64, states: usize },
}

impl Notice {
    pub fn log(&self) {
        match self {
            Notice::HandshakeSent { url, instance_id, app_id } => {
                tracing::info!(url = %url, instance_id = %instance_id, app_id = %app_id, "handshake sent")
            }
            Notice::BadFrame { consecutive, what, reason } => {
                tracing::warn!(consecutive = *consecutive, reason = %reason, "{what}")
            }
            Notice::BadRunEnded { consecutive, not_logged } => tracing::warn!(
                consecutive = *consecutive,
                not_logged = *not_logged,
                "a run of bad frames from the backend ended"
            ),
            Notice::UnknownCode(code) => tracing::info!(
                code = %code,
                "unknown message code ignored (logged once per code and connection; all are counted)"
            ),
            Notice::AppNotReady { url, retry_ms, attempt } => tracing::info!(
                url = %url,
                retry_ms = *retry_ms,
                attempt = *attempt,
                "backend: app not ready; the Handshake will be repeated"
            ),
            Notice::TestAnswer { result: true, .. } => tracing::info!("backend test answer: success"),
            Notice::TestAnswer { result: false, error } => {
                tracing::warn!(error = error.as_deref().unwrap_or(""), "backend test answer: failure")
            }
            Notice::Capabilities(list) => tracing::info!(capabilities = ?list, "backend capabilities"),
            Notice::AckIgnored { seq } => {
                tracing::warn!(seq = *seq, "StateLogAck from a backend that did not announce statelog-ack: ignored")
            }
            Notice::ReconnectIgnored { after_s } => tracing::warn!(
                after_s = *after_s,
                "Reconnect from a backend that did not announce reconnect-hint: ignored"
            ),
            Notice::PlanRequestIgnored => {
                tracing::warn!("PlanRequest from a backend that did not announce drift: ignored")
            }
            Notice::LogsRefused { request } => {
                tracing::warn!(request = %request, "FetchLogs refused: another one is being answered")
            }
            Notice::LogsAsked { request, since, upload } => {
                tracing::info!(request = %request, since = *since, upload = *upload, "the backend asked for logs")
            }
            Notice::FetchLogsIgnored { request } => tracing::warn!(
                request = %request,
                "FetchLogs from a backend that did not announce fetch-logs: ignored"
            ),
            Notice::LogsSent { frames } => tracing::info!(frames = *frames, "logs sent to the backend"),
            Notice::Oversized { limit, detail } => tracing::warn!(
                limit = *limit,
                detail = %detail,
                "frame over the size limit refused before reading it; closing with 1009"
            ),
            Notice::UpgradeNotAnnounced { version } => tracing::info!(
                version = %version,
                "the backend did not announce upgrade-report: the failed upgrade stays in the log and `opsagent status`"
            ),
            Notice::UpgradeReported { version } => {
                tracing::info!(version = %version, "failed upgrade reported to the backend")
            }
            Notice::DriftSent { recipe_version, states } => {
                tracing::info!(recipe_version = *recipe_version, states = *states, "drift report sent to the backend")
            }
        }
    }
}

/// Who the session speaks for and what it may offer, fixed for the session.
#[derive(Debug, Clone)]
pub struct Params {
    pub url: String,
    pub instance_id: String,
    pub app_id: String,
    pub init_errors: Option<String>,
    /// A log service answers `FetchLogs` (and `fetch-logs` is announced).
    pub logs: bool,
}

pub struct Session {
    cfg: LinkConfig,
    who: Params,
    /// Shared with the reconnection pauses: the shell lends it for the session.
    backoff: Backoff,
    opened: Instant,
    /// The backend sent a known message.
    answered: bool,
    caps: Caps,
    /// Since the first RecipeMetadata (until an AppNotReady).
    established: Option<Instant>,
    /// The last StateLog sent on this connection.
    last_sent: u64,
    bad_run: BadRun,
    /// Unknown codes logged in this session (a few distinct ones, each once).
    unknown_logged: Vec<String>,
    fetch_logs_warned: bool,
    /// A FetchLogs is being answered (one at a time).
    logs_running: bool,
    last_heard: Instant,
    next_ping: Instant,
    answer_deadline: Option<Instant>,
    rehandshake: Option<Instant>,
    /// Consecutive AppNotReady answers.
    not_ready: u32,
    next_heartbeat: Option<Instant>,
    next_tick: Instant,
    /// New StateLogs may be waiting, so the outbox is read only then.
    dirty: bool,
    /// An End was returned: nothing more is added to that event's actions.
    over: bool,
}

impl Session {
    /// A session whose connection opened at `now`; [`Session::start`] gives its first
    /// actions.
    pub fn new(now: Instant, cfg: &LinkConfig, who: Params, backoff: Backoff) -> Self {
        Self {
            backoff,
            opened: now,
            answered: false,
            caps: Caps::default(),
            established: None,
            last_sent: 0,
            bad_run: BadRun::default(),
            unknown_logged: Vec::new(),
            fetch_logs_warned: false,
            logs_running: false,
            last_heard: now,
            next_ping: now + cfg.ping_interval,
            answer_deadline: Some(now + cfg.answer_timeout),
            rehandshake: None,
            not_ready: 0,
            next_heartbeat: None,
            // The first tick at once, as a tokio interval's.
            next_tick: now,
            dirty: false,
            over: false,
            cfg: cfg.clone(),
            who,
        }
    }

    /// The Handshake opening the session.
    pub fn start(&mut self) -> Vec<Action> {
        let w = &self.who;
        let sent =
            Notice::HandshakeSent { url: w.url.clone(), instance_id: w.instance_id.clone(), app_id: w.app_id.clone() };
        vec![Action::Send(self.handshake()), Action::Notice(sent)]
    }

    /// The backoff lent for the session, to be given back to the reconnection loop.
    pub fn into_backoff(self) -> Backoff {
        self.backoff
    }

    /// When [`SessionEvent::Timer`] is due: the earliest of the silence limit, the
    /// Handshake's answer deadline, the repeated Handshake, the heartbeat, the ping and
    /// the liveness tick.
    pub fn next_deadline(&self) -> Instant {
        [self.answer_deadline, self.rehandshake, self.next_heartbeat]
            .into_iter()
            .flatten()
            .fold(self.dead_at().min(self.next_ping).min(self.next_tick), Instant::min)
    }

    /// How the session ended, at `now` (also for an end the shell met: a failed send).
    pub fn end(&self, now: Instant, kind: EndKind) -> SessionEnd {
        SessionEnd {
            kind,
            healthy: self.answered && now.saturating_duration_since(self.opened) >= self.cfg.healthy_after,
        }
    }

    pub fn on_event(&mut self, now: Instant, ev: SessionEvent) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            SessionEvent::Frame(f) => self.frame(now, f, &mut out),
            SessionEvent::Spooled => self.dirty = true,
            SessionEvent::Pending(logs) => self.pending(logs, &mut out),
            SessionEvent::UpgradeFailed(f) => {
                if self.caps.upgrade_report {
                    let version = f.version.clone();
                    out.push(Action::Send(Outbound::UpgradeReport {
                        version: f.version,
                        running: f.running,
                        reason: f.reason,
                    }));
                    out.push(Action::Notice(Notice::UpgradeReported { version }));
                } else {
                    out.push(Action::Notice(Notice::UpgradeNotAnnounced { version: f.version }));
                }
            }
            SessionEvent::Drift(report) => {
                let (recipe_version, states) = (report.recipe_version, report.states.len());
                out.push(Action::Send(Outbound::Drift(report)));
                out.push(Action::Notice(Notice::DriftSent { recipe_version, states }));
            }
            SessionEvent::LogsReady(frames) => {
                self.logs_running = false;
                if let Some(frames) = frames {
                    let n = frames.len();
                    out.extend(frames.into_iter().map(|f| Action::Send(Outbound::Logs(f))));
                    out.push(Action::Notice(Notice::LogsSent { frames: n }));
                }
            }
            SessionEvent::Timer => self.timers(now, &mut out),
            SessionEvent::Shutdown => {
                if self.established.is_some() {
                    out.push(Action::FinalFlush { after: self.last_sent, within: FINAL_FLUSH });
                }
                out.push(Action::Close(None));
                self.finish(EndKind::Shutdown, &mut out);
            }
        }
        // Whatever made StateLogs wait, they go out once the session is established.
        if !self.over && self.established.is_some() && self.dirty {
            self.dirty = false;
            out.push(Action::Collect(Collect::StateLogs { after: self.last_sent }));
        }
        out
    }

    fn finish(&mut self, kind: EndKind, out: &mut Vec<Action>) {
        self.over = true;
        out.push(Action::End(kind));
    }

    fn fail(&mut self, e: LinkError, out: &mut Vec<Action>) {
        self.finish(EndKind::Error(e), out);
    }

    fn url(&self) -> String {
        self.who.url.clone()
    }

    fn dead_at(&self) -> Instant {
        self.last_heard + self.cfg.ping_interval * 2
    }

    fn handshake(&self) -> Outbound {
        // `fetch-logs` only when there is something to answer with.
        let capabilities = capability::ALL
            .iter()
            .filter(|c| **c != capability::FETCH_LOGS || self.who.logs)
            .map(|c| c.to_string())
            .collect();
        Outbound::Handshake { init_errors: self.who.init_errors.clone(), capabilities }
    }

    fn frame(&mut self, now: Instant, f: Frame, out: &mut Vec<Action>) {
        self.last_heard = now;
        match f {
            Frame::Gone => self.fail(LinkError::Closed { url: self.url(), reason: String::new() }, out),
            Frame::Broken(reason) => self.fail(LinkError::Transport { url: self.url(), reason }, out),
            Frame::Oversized(detail) => {
                let limit = self.cfg.max_frame;
                out.push(Action::Status(StatusChange::Count(Counter::Oversized)));
                out.push(Action::Notice(Notice::Oversized { limit, detail: detail.clone() }));
                out.push(Action::Close(Some((CloseCode::Size, "frame too large"))));
                self.fail(LinkError::Oversized { url: self.url(), limit, detail }, out);
            }
            Frame::Binary(len) => {
                out.push(Action::Status(StatusChange::Count(Counter::BinaryFrames)));
                let reason = format!("{len} bytes; the protocol uses text frames");
                self.bad_frame("binary frame from the backend refused", reason, out);
            }
            Frame::Close(frame) => {
                let hinted = frame.as_ref().filter(|_| self.caps.hints).and_then(|(_, r)| parse_close_hint(r));
                match hinted {
                    Some(h) => self.finish(EndKind::Hint(h), out),
                    None => {
                        let reason = frame.map(|(code, r)| format!(" ({code} {r})")).unwrap_or_default();
                        self.fail(LinkError::Closed { url: self.url(), reason }, out);
                    }
                }
            }
            Frame::Control => {}
            Frame::Bad(e) => self.bad_frame("bad frame from the backend ignored", e.to_string(), out),
            Frame::Message(Inbound::Unknown(code)) => {
                out.push(Action::Status(StatusChange::Count(Counter::UnknownFrames)));
                if self.unknown_logged.len() < MAX_UNKNOWN_LOGGED && !self.unknown_logged.contains(&code) {
                    self.unknown_logged.push(code.clone());
                    out.push(Action::Notice(Notice::UnknownCode(code)));
                }
            }
            Frame::Message(m) => {
                // A good frame ends a run of bad ones.
                if self.bad_run.unlogged > 0 {
                    let (consecutive, not_logged) = (self.bad_run.count, self.bad_run.unlogged);
                    out.push(Action::Notice(Notice::BadRunEnded { consecutive, not_logged }));
                }
                self.bad_run = BadRun::default();
                self.answered = true;
                self.answer_deadline = None;
                self.message(now, m, out);
            }
        }
    }

    /// Counts a bad frame; the session ends when too many came in a row. The first
    /// [`MAX_BAD_LOGGED`] of a run are logged one by one, the rest only counted: a flood
    /// would otherwise write up to `max_bad_frames` lines per connection.
    fn bad_frame(&mut self, what: &'static str, reason: String, out: &mut Vec<Action>) {
        self.bad_run.count += 1;
        out.push(Action::Status(StatusChange::Count(Counter::BadFrames)));
        if self.bad_run.count > MAX_BAD_LOGGED {
            self.bad_run.unlogged += 1;
        } else {
            out.push(Action::Notice(Notice::BadFrame { consecutive: self.bad_run.count, what, reason }));
        }
        if self.bad_run.count >= self.cfg.max_bad_frames {
            self.fail(LinkError::TooManyBadFrames { url: self.url(), count: self.bad_run.count }, out);
        }
    }

    fn message(&mut self, now: Instant, m: Inbound, out: &mut Vec<Action>) {
        match m {
            Inbound::RecipeMetadata(r) => {
                if self.established.is_none() {
                    self.established = Some(now);
                    self.dirty = true;
                    self.last_sent = 0;
                    self.not_ready = 0;
                    self.rehandshake = None;
                    out.push(Action::Status(StatusChange::Connected));
                    if self.caps.heartbeat {
                        self.next_heartbeat = Some(now);
                    }
                    out.push(Action::Engine(ForEngine::Online(true)));
                    out.push(Action::Collect(Collect::UpgradeReport));
                }
                out.push(Action::Engine(ForEngine::Recipe(r)));
            }
            Inbound::State { recipe_version, state_id } => {
                out.push(Action::Engine(ForEngine::WaitDone { recipe_version, state_ids: vec![state_id] }));
            }
            Inbound::WaitList { recipe_version, waited } => {
                let state_ids = waited.into_iter().map(|w| w.state_id).collect();
                out.push(Action::Engine(ForEngine::WaitDone { recipe_version, state_ids }));
            }
            Inbound::AgentUpdate { version, url } => {
                out.push(Action::Engine(ForEngine::AgentUpdate(UpdateOrder { version, url })));
            }
            Inbound::AppNotReady => {
                if self.established.take().is_some() {
                    self.next_heartbeat = None;
                    out.push(Action::Engine(ForEngine::Online(false)));
                }
                if self.rehandshake.is_none() {
                    self.not_ready += 1;
                    let attempt = self.not_ready;
                    let delay = self.backoff.delay_capped(attempt, self.cfg.app_not_ready_retry);
                    self.rehandshake = Some(now + delay);
                    out.push(Action::Status(StatusChange::AppNotReady { attempt, delay }));
                    let retry_ms = delay.as_millis() as u64;
                    out.push(Action::Notice(Notice::AppNotReady { url: self.url(), retry_ms, attempt }));
                }
            }
            Inbound::Test => out.push(Action::Send(Outbound::Test { init_errors: self.who.init_errors.clone() })),
            Inbound::TestAns { result, error } => {
                out.push(Action::Notice(Notice::TestAnswer { result, error }));
                out.push(Action::Close(Some((CloseCode::Normal, "test answered"))));
                self.finish(EndKind::TestDone, out);
            }
            Inbound::Capabilities(list) => {
                self.caps = Caps::from_backend(&list);
                out.push(Action::Notice(Notice::Capabilities(list.clone())));
                if self.caps.heartbeat && self.established.is_some() && self.next_heartbeat.is_none() {
                    self.next_heartbeat = Some(now);
                }
                out.push(Action::Status(StatusChange::Capabilities(list)));
                out.push(Action::DriftListening(self.caps.drift));
            }
            Inbound::StateLogAck { seq } => {
                if self.caps.acks {
                    out.push(Action::Delivered { seq, cumulative: true });
                } else {
                    out.push(Action::Notice(Notice::AckIgnored { seq }));
                }
            }
            Inbound::Reconnect { after_s } => {
                if self.caps.hints {
                    out.push(Action::Close(Some((CloseCode::Normal, "reconnect hint"))));
                    self.finish(EndKind::Hint(Duration::from_secs(after_s)), out);
                } else {
                    out.push(Action::Notice(Notice::ReconnectIgnored { after_s }));
                }
            }
            Inbound::PlanRequest => {
                if self.caps.drift {
                    out.push(Action::Engine(ForEngine::PlanRequest));
                } else {
                    out.push(Action::Notice(Notice::PlanRequestIgnored));
                }
            }
            Inbound::FetchLogs(req) => self.fetch_logs(req, out),
            // Counted and logged before: protocol v1 ignores unknown codes.
            Inbound::Unknown(_) => {}
        }
    }

    fn fetch_logs(&mut self, req: FetchLogs, out: &mut Vec<Action>) {
        if !(self.who.logs && self.caps.fetch_logs) {
            // Once per connection: a backend retrying must not fill the journal.
            if !self.fetch_logs_warned {
                self.fetch_logs_warned = true;
                out.push(Action::Notice(Notice::FetchLogsIgnored { request: req.request }));
            }
            return;
        }
        if self.logs_running {
            let no = crate::logframes::refusal(&req.request, "another log request is being answered");
            out.push(Action::Notice(Notice::LogsRefused { request: req.request }));
            out.push(Action::Send(Outbound::Logs(no)));
            return;
        }
        let asked =
            Notice::LogsAsked { request: req.request.clone(), since: req.since.0, upload: req.upload_url.is_some() };
        out.push(Action::Notice(asked));
        self.logs_running = true;
        out.push(Action::StartLogs(req));
    }

    /// Sends every pending StateLog not yet sent on this connection.
    fn pending(&mut self, logs: Vec<StateLog>, out: &mut Vec<Action>) {
        for mut log in logs {
            let seq = log.seq.unwrap_or(0);
            // A v1 backend gets v1 StateLogs: no extension fields.
            if !self.caps.acks {
                log.seq = None;
            }
            if !self.caps.announced {
                log.offline = false;
                log.ran_at = None;
            }
            out.push(Action::Send(Outbound::StateLog(log)));
            self.last_sent = seq;
            out.push(Action::Status(StatusChange::Count(Counter::Sent)));
            if !self.caps.acks {
                out.push(Action::Delivered { seq, cumulative: false });
            }
        }
    }

    fn timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        if now >= self.dead_at() {
            let silent_s = now.saturating_duration_since(self.last_heard).as_secs();
            return self.fail(LinkError::Dead { url: self.url(), silent_s }, out);
        }
        if self.answer_deadline.is_some_and(|d| now >= d) {
            let secs = self.cfg.answer_timeout.as_secs();
            return self.fail(LinkError::NoAnswer { url: self.url(), secs }, out);
        }
        if self.rehandshake.is_some_and(|t| now >= t) {
            self.rehandshake = None;
            out.push(Action::Send(self.handshake()));
            self.answer_deadline = Some(now + self.cfg.answer_timeout);
        }
        if self.next_heartbeat.is_some_and(|t| now >= t) {
            self.next_heartbeat = Some(now + self.cfg.heartbeat_interval);
            let connected_s = self.established.map_or(0, |t| now.saturating_duration_since(t).as_secs());
            out.push(Action::Heartbeat { connected_s });
            out.push(Action::Status(StatusChange::Count(Counter::Heartbeats)));
        }
        if now >= self.next_ping {
            out.push(Action::Ping);
            self.next_ping = now + self.cfg.ping_interval;
        }
        if now >= self.next_tick {
            out.push(Action::Alive);
            // A failure of an upgrade run while connected goes out within a second.
            if self.established.is_some() {
                out.push(Action::Collect(Collect::UpgradeReport));
                out.push(Action::Collect(Collect::Drift));
            }
            // A late tick is not made up for: one tick, then the next a second on.
            let next = self.next_tick + TICK;
            self.next_tick = if next > now { next } else { now + TICK };
        }
    }
}

#[cfg(test)]
mod tests;
