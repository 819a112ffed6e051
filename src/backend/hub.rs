//! The backend's state and its reactions: connections and who they are, the recipe
//! served per app, the statelog, wait releases and the operator's orders. Every method
//! runs under one lock and never awaits: frames to agents go into each connection's
//! queue, in order.
//!
//! Who a connection is comes from its Handshake only, once its `instance_token` matched
//! the instance's pin (see [`super::pins`]). What the connection says afterwards is taken
//! for that instance only: a StateLog, WaitQuery or Heartbeat naming another instance or
//! app, or sent before such a Handshake, is refused (logged, recorded as a `refused`
//! event, not answered).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use opsagent_proto::param_types::StateRef;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::frames::{self, out, AgentMsg, Hello, StateLogMsg};
use super::journal::{DurableAcks, Events, JsonLines, PendingAck};
use super::logstore::{LogStore, Outcome};
use super::pins::{valid_instance_id, PinReply, PinRequest, PinStore, PinWriter, Verdict};
use super::recipes::{
    self, parse_recipe, parse_reconnect, parse_update, read_one, valid_app_id, AppRecord, DirFile, FileKind, Scan,
    Served, UpdateOrder, VersionStore,
};
use super::signing::RecipeSigner;
use super::{BackendError, BackendOptions};
use crate::protocol::capability;
use crate::timefmt::rfc3339;

/// What a connection task is asked to do. A frame pushed to many agents is serialised
/// once and shared by their queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    Text(Arc<str>),
    Close { code: u16, reason: String },
}

impl Out {
    /// What the frame counts against its queue's bound.
    pub fn cost(&self) -> usize {
        match self {
            Out::Text(t) => t.len(),
            Out::Close { reason, .. } => reason.len() + 2,
        }
    }
}

/// A connection's outgoing queue. It is bounded in bytes ([`super::Limits`]
/// `max_queued_bytes`): an agent that reads slower than the backend writes to it is cut
/// off rather than let the backend buffer without end (see [`Hub::queue`]).
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub tx: UnboundedSender<Out>,
    /// Bytes queued and not yet written to the socket: the connection task takes off
    /// what it wrote.
    pub bytes: Arc<AtomicUsize>,
    /// Told when the queue overflowed: the connection task drops the connection at
    /// once, even in the middle of a write its peer does not read.
    pub cut: Arc<Notify>,
}

/// A Handshake waiting for its first-use pin to be durable (see [`Hub::on_text`]).
#[derive(Debug)]
pub(crate) struct PendingHandshake {
    conn: u64,
    app_id: String,
    instance_id: String,
    agent_version: Option<String>,
    capabilities: Option<Vec<String>>,
    required: bool,
    peer: String,
    /// The pin writer's verdict, to wait on.
    reply: Option<PinReply>,
}

impl PendingHandshake {
    /// The verdict (`None`: the pin writer is gone).
    pub async fn verdict(&mut self) -> Option<Result<Verdict, BackendError>> {
        match self.reply.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }
}

/// WebSocket close code 1012, "service restart".
pub(crate) const CLOSE_RESTART: u16 = 1012;
/// WebSocket close code 1008, "policy violation": a Handshake refused.
pub(crate) const CLOSE_POLICY: u16 = 1008;
/// WebSocket close code 1011, "internal error".
pub(crate) const CLOSE_INTERNAL: u16 = 1011;

/// Who a connection is, from its last Handshake.
#[derive(Debug, Clone)]
struct Reg {
    app_id: String,
    instance_id: String,
    agent_version: Option<String>,
    capabilities: Vec<String>,
    /// Its token matched the instance's pin (or pinned it). A connection of an app with
    /// no recipe yet whose instance has no pin is not: nothing was pinned for it.
    authenticated: bool,
    /// It was sent a recipe (not `AppNotReady`): recipe updates are pushed to it.
    ready: bool,
}

impl Reg {
    fn has(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

#[derive(Debug)]
struct Conn {
    peer: String,
    queue: Queue,
    reg: Option<Reg>,
    /// A Handshake was accepted (answered with a recipe or `AppNotReady`).
    handshaken: bool,
    /// Refused: it is being closed and nothing more it says is read.
    closing: bool,
}

#[derive(Debug, Default)]
struct AppState {
    served: Option<Served>,
    /// Raw hashes of the files last seen, so that a poll acts on changes only.
    recipe_raw: Option<String>,
    update_raw: Option<String>,
    reconnect_raw: Option<String>,
    fetch_logs_raw: Option<String>,
    plan_request_raw: Option<String>,
    update: Option<UpdateOrder>,
}

/// An instance the backend has heard of (by Handshake or StateLog).
#[derive(Debug, Default)]
struct Instance {
    app_id: String,
    /// The recipe version last sent to it: its StateLogs for another version are
    /// recorded but release no wait.
    runs: Option<u64>,
    /// Per recipe version, the states whose latest StateLog was a success.
    done: BTreeMap<u64, BTreeSet<String>>,
}

/// A released wait: the wait state and the instance that satisfied it (`None` when
/// several did).
type Release = (String, Option<String>);

#[derive(Debug)]
pub(crate) struct Hub {
    recipe_dir: PathBuf,
    /// The backend's own files, never read as recipes.
    skip: Vec<PathBuf>,
    statelog: JsonLines,
    /// Sends StateLogAcks once their lines are synced, off this lock.
    acks: DurableAcks,
    events: Events,
    versions: VersionStore,
    pins: PinStore,
    /// Makes first-use pins durable, in batches, off this lock.
    pin_writer: PinWriter,
    /// Frames queued per connection at most (see [`Out`]).
    max_queued: usize,
    /// Apps with no trust on first use (`*`: all).
    require_pin: Vec<String>,
    apps: BTreeMap<String, AppState>,
    conns: BTreeMap<u64, Conn>,
    instances: BTreeMap<String, Instance>,
    /// `(instance_id, seq)` of every StateLog recorded.
    seen: HashSet<(String, u64)>,
    /// `(instance_id, recipe_version)` → waits released for it, in release order.
    released: BTreeMap<(String, u64), Vec<Release>>,
    /// `--signing-key`: every pushed recipe is signed.
    signer: Option<RecipeSigner>,
    /// Log bundles being received and stored.
    logs: LogStore,
    /// Log requests sent, for their default names.
    fetch_seq: u64,
}

/// The `RecipeMetadata` of `s`, signed when the backend has a signing key.
fn recipe_frame(signer: &mut Option<RecipeSigner>, app: &str, s: &Served) -> Value {
    let mut frame = out::recipe_metadata(s.version, s.module.as_ref(), &s.states);
    if let Some(signer) = signer.as_mut() {
        match signer.sign(app, s.version, &s.hash, &s.states) {
            Ok(sig) => frame["signature"] = Value::String(sig),
            Err(e) => error!(
                "app {app} recipe version {}: cannot sign it: {e}; pushed unsigned (agents that verify recipes will not run it)",
                s.version
            ),
        }
    }
    frame
}

/// Marks a statelog line that released nothing (another recipe version than the one the
/// instance was sent), so that a restart does not count it either.
const NO_WAIT_PROGRESS: &str = "wait_progress";

fn redacted(mut o: Map<String, Value>) -> Value {
    if let Some(t) = o.get_mut("instance_token") {
        *t = Value::String("<redacted>".into());
    }
    Value::Object(o)
}

fn short(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Hub {
    /// Opens the journals, replays the statelog (de-duplication set, wait progress),
    /// restores the persisted recipes and reads the recipe directory once.
    pub fn open(opts: &BackendOptions) -> Result<Self, BackendError> {
        let md = std::fs::metadata(&opts.recipe_dir)
            .map_err(|source| BackendError::io("recipe directory", &opts.recipe_dir, source))?;
        if !md.is_dir() {
            return Err(BackendError::Config(format!("{}: not a directory", opts.recipe_dir.display())));
        }
        let versions = VersionStore::load(recipes::versions_path(&opts.statelog))?;
        let pins = PinStore::open(&opts.pins_dir())?;
        let history = JsonLines::read_all_rotated(&opts.statelog, opts.rotation)?;
        let mut skip = vec![opts.statelog.clone(), versions.path().to_path_buf()];
        skip.extend(opts.events.clone());
        let skip = skip.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect();
        let mut hub = Self {
            recipe_dir: opts.recipe_dir.clone(),
            skip,
            statelog: JsonLines::open(&opts.statelog, opts.rotation)?,
            acks: DurableAcks::start(&opts.statelog)?,
            events: Events::open(opts.events.as_deref(), opts.rotation)?,
            versions,
            pins: pins.clone(),
            pin_writer: PinWriter::start(pins)?,
            max_queued: opts.limits.max_queued_bytes,
            require_pin: opts.require_pin.clone(),
            apps: BTreeMap::new(),
            conns: BTreeMap::new(),
            instances: BTreeMap::new(),
            seen: HashSet::new(),
            released: BTreeMap::new(),
            signer: opts.signing_key.as_deref().map(RecipeSigner::load).transpose()?,
            logs: LogStore::new(opts.logs_dir()),
            fetch_seq: 0,
        };
        if let Some(signer) = &hub.signer {
            info!("signing every recipe; agents verify them with recipe_key = {}", signer.public_key());
        }
        for line in &history {
            let s = frames::statelog_fields(line);
            if let (Some(i), Some(seq)) = (&s.instance_id, s.seq) {
                hub.seen.insert((i.clone(), seq));
            }
            if line.get(NO_WAIT_PROGRESS) != Some(&Value::Bool(false)) {
                hub.record_result(&s);
            }
        }
        for (app, rec) in &hub.versions.apps {
            match rec.served() {
                Some(s) => hub.apps.entry(app.clone()).or_default().served = Some(s),
                None => warn!(
                    "{}: the recorded recipe of app {app} no longer validates; ignored",
                    hub.versions.path().display()
                ),
            }
        }
        info!("statelog {}: {} records", opts.statelog.display(), history.len());
        let scan = recipes::scan_dir(&hub.recipe_dir, &hub.skip)?;
        hub.apply_scan(scan);
        Ok(hub)
    }

    pub fn recipe_dir(&self) -> &Path {
        &self.recipe_dir
    }

    pub fn skip(&self) -> &[PathBuf] {
        &self.skip
    }

    fn send(&mut self, conn: u64, v: &Value) {
        let text: Arc<str> = v.to_string().into();
        debug!(conn, "→ {}", short(&text));
        self.queue(conn, Out::Text(text));
    }

    /// One frame to several connections, serialised once.
    fn send_all(&mut self, conns: &[u64], v: &Value) {
        let text: Arc<str> = v.to_string().into();
        for conn in conns {
            debug!(conn, "→ {}", short(&text));
            self.queue(*conn, Out::Text(text.clone()));
        }
    }

    /// Queues `out` for `conn`, unless that would take its queue past the bound while
    /// it already holds something (a single frame always fits an empty queue): then the
    /// agent is not reading what it is sent, and the connection is cut — no close frame
    /// (it would queue behind the rest), a `slow_reader` event and a warning. The agent
    /// reconnects and gets the current state again from its Handshake, which is all
    /// the frames it missed would have told it.
    fn queue(&mut self, conn: u64, out: Out) {
        let max = self.max_queued;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let cost = out.cost();
        let queued = c.queue.bytes.load(Ordering::Acquire);
        if queued > 0 && queued.saturating_add(cost) > max {
            if c.closing {
                return;
            }
            c.closing = true;
            c.queue.cut.notify_one();
            let (peer, instance) = (c.peer.clone(), c.reg.as_ref().map(|r| r.instance_id.clone()));
            warn!(conn, "{peer}: {queued} bytes queued and not read (at most {max}): connection cut");
            self.events.record(
                "slow_reader",
                json!({"conn": conn, "peer": peer, "instance_id": instance, "queued_bytes": queued, "max_queued_bytes": max}),
            );
            return;
        }
        c.queue.bytes.fetch_add(cost, Ordering::AcqRel);
        // A closed queue means the connection is going away: nothing to do.
        let _ = c.queue.tx.send(out);
    }

    /// Ids of the registered connections `pick` selects.
    fn conns_where(&self, pick: impl Fn(&Reg) -> bool) -> Vec<u64> {
        self.conns.iter().filter(|(_, c)| c.reg.as_ref().is_some_and(&pick)).map(|(id, _)| *id).collect()
    }

    fn instance_of(&self, conn: u64) -> Option<String> {
        self.conns.get(&conn)?.reg.as_ref().map(|r| r.instance_id.clone())
    }

    /// Who the connection proved to be, if it did.
    fn authenticated(&self, conn: u64) -> Option<Reg> {
        self.conns.get(&conn)?.reg.as_ref().filter(|r| r.authenticated).cloned()
    }

    pub fn connect(&mut self, conn: u64, peer: String, queue: Queue) {
        info!(conn, "connection from {peer}");
        self.events.record("open", json!({"conn": conn, "peer": peer}));
        self.conns.insert(conn, Conn { peer, queue, reg: None, handshaken: false, closing: false });
    }

    /// Whether the connection has had a Handshake accepted (for the Handshake timeout).
    pub fn handshaken(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.handshaken)
    }

    /// Records why a connection is refused (before or at its Handshake) and closes it
    /// with `code` and `reason` (a close reason must fit in 123 bytes: the details are in
    /// the event).
    fn refuse_handshake(&mut self, conn: u64, app: &str, instance: &str, code: u16, reason: &str, detail: String) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        warn!(conn, "Handshake from {} refused: {detail}", c.peer);
        self.events.record(
            "handshake_refused",
            json!({"conn": conn, "peer": c.peer, "app_id": app, "instance_id": instance, "reason": detail}),
        );
        c.reg = None;
        self.queue(conn, Out::Close { code, reason: reason.into() });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
        }
    }

    /// Records a message refused for what it claims; the connection stays.
    fn refuse_message(&mut self, conn: u64, code: &str, reason: String) {
        let instance = self.instance_of(conn);
        warn!(conn, "{code} refused: {reason}");
        self.events.record("refused", json!({"conn": conn, "code": code, "instance_id": instance, "reason": reason}));
    }

    /// The authenticated identity of `conn` if the message's own `instance_id` and
    /// `app_id` (when it has them) are that identity; else the message is refused.
    fn speaker(&mut self, conn: u64, code: &str, instance: Option<&str>, app: Option<&str>) -> Option<Reg> {
        let Some(reg) = self.authenticated(conn) else {
            self.refuse_message(conn, code, "no accepted Handshake on this connection".into());
            return None;
        };
        if let Some(i) = instance.filter(|i| *i != reg.instance_id) {
            self.refuse_message(conn, code, format!("names instance {i:?}, the connection is {:?}", reg.instance_id));
            return None;
        }
        if let Some(a) = app.filter(|a| *a != reg.app_id) {
            self.refuse_message(conn, code, format!("names app {a:?}, the connection is of app {:?}", reg.app_id));
            return None;
        }
        Some(reg)
    }

    pub fn disconnect(&mut self, conn: u64) {
        self.logs.forget(conn);
        if let Some(c) = self.conns.remove(&conn) {
            let instance = c.reg.as_ref().map(|r| r.instance_id.clone());
            info!(conn, "connection from {} closed ({})", c.peer, instance.as_deref().unwrap_or("no handshake"));
            self.events.record("close", json!({"conn": conn, "peer": c.peer, "instance_id": instance}));
        }
    }

    /// A connection over a cap, answered with `status` and `reason` instead of a
    /// WebSocket.
    pub fn record_refused_connection(&mut self, conn: u64, peer: std::net::SocketAddr, status: u16, reason: &str) {
        self.events.record(
            "connection_refused",
            json!({"conn": conn, "peer": peer.to_string(), "status": status, "reason": reason}),
        );
    }

    /// The first time a connection is read slower than it sends.
    pub fn record_throttled(&mut self, conn: u64, per_s: u32) {
        let instance = self.instance_of(conn);
        info!(conn, "more than {per_s} frames per second: reading slower");
        self.events.record("throttled", json!({"conn": conn, "instance_id": instance, "frames_per_s": per_s}));
    }

    pub fn record_too_big(&mut self, conn: u64, reason: &str) {
        let instance = self.instance_of(conn);
        self.events.record("frame_too_big", json!({"conn": conn, "instance_id": instance, "reason": reason}));
    }

    /// Records the timeout and closes the connection (1008).
    pub fn handshake_timed_out(&mut self, conn: u64, reason: &str) {
        let peer = self.conns.get(&conn).map(|c| c.peer.clone());
        warn!(conn, "{}: {reason}: closed", peer.as_deref().unwrap_or("?"));
        self.events.record("handshake_timeout", json!({"conn": conn, "peer": peer, "reason": reason}));
        self.queue(conn, Out::Close { code: CLOSE_POLICY, reason: reason.into() });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
        }
    }

    pub fn on_binary(&mut self, conn: u64, len: usize) {
        warn!(conn, "binary frame of {len} bytes ignored (the protocol uses text frames)");
        self.events.record("binary", json!({"conn": conn, "len": len}));
    }

    /// Acts on a text frame. A Handshake that makes a first-use pin is answered only once
    /// the pin is durable: its [`PendingHandshake`] is returned, for the connection to
    /// wait on (reading nothing else meanwhile, so that the order of its frames holds)
    /// and hand back to [`Hub::finish_handshake`].
    pub fn on_text(&mut self, conn: u64, text: &str) -> Option<PendingHandshake> {
        if self.conns.get(&conn).is_none_or(|c| c.closing) {
            return None;
        }
        let (msg, obj) = match frames::parse_agent(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(conn, "frame ignored: {e}: {}", short(text));
                self.events.record("invalid", json!({"conn": conn, "error": e.to_string(), "frame": short(text)}));
                return None;
            }
        };
        debug!(conn, "← {}", short(text));
        // Logs frames carry the bundle: recorded once it is whole, not frame by frame.
        if !matches!(msg, AgentMsg::StateLog(_) | AgentMsg::Drift { .. } | AgentMsg::Logs { .. }) {
            self.events.record("message", json!({"conn": conn, "code": msg.code(), "message": redacted(obj.clone())}));
        }
        match msg {
            AgentMsg::Handshake(h) => return self.on_handshake(conn, h),
            AgentMsg::Test(_) => self.send(conn, &out::test_ans()),
            AgentMsg::StateLog(s) => self.on_statelog(conn, s, obj),
            AgentMsg::WaitQuery { instance_id, app_id, recipe_version } => {
                self.on_wait_query(conn, instance_id, app_id, recipe_version)
            }
            AgentMsg::Heartbeat { instance_id, app_id } => {
                if self.speaker(conn, "Heartbeat", instance_id.as_deref(), app_id.as_deref()).is_some() {
                    debug!(conn, "heartbeat");
                }
            }
            AgentMsg::UpgradeReport { instance_id, version, reason } => warn!(
                conn,
                "agent {} reports that its upgrade to {} failed: {}",
                instance_id.as_deref().unwrap_or("?"),
                version.as_deref().unwrap_or("?"),
                reason.as_deref().unwrap_or("")
            ),
            AgentMsg::Drift { instance_id, recipe_version, states } => {
                info!(
                    conn,
                    "agent {} drifted from recipe {}: {} state(s) would change",
                    instance_id.as_deref().unwrap_or("?"),
                    recipe_version.map_or("?".to_string(), |v| v.to_string()),
                    states.len()
                );
                self.events.record(
                    "drift",
                    json!({"conn": conn, "instance_id": instance_id, "recipe_version": recipe_version, "states": states}),
                );
            }
            AgentMsg::Logs { instance_id, app_id } => {
                if let Some(reg) = self.speaker(conn, "Logs", instance_id.as_deref(), app_id.as_deref()) {
                    self.on_logs(conn, &reg.instance_id, &Value::Object(obj));
                }
            }
            AgentMsg::Unknown(code) => warn!(conn, "message with unknown code {code:?} ignored"),
        }
        None
    }

    fn on_logs(&mut self, conn: u64, instance: &str, frame: &Value) {
        match self.logs.accept(conn, instance, frame) {
            Outcome::Partial => {}
            Outcome::Stored(event) => {
                info!(conn, "log bundle of {instance} stored: {}", event["file"]);
                self.events.record("logs_stored", event);
            }
            Outcome::Other(name, event) => {
                info!(conn, "{name} from {instance}: {event}");
                self.events.record(name, event);
            }
            Outcome::Failed(reason) => {
                warn!(conn, "log bundle of {instance} dropped: {reason}");
                self.events.record("logs_invalid", json!({"conn": conn, "instance_id": instance, "reason": reason}));
            }
        }
    }

    fn apply_fetch_logs_file(&mut self, app: &str, f: DirFile) {
        let state = self.apps.entry(app.to_string()).or_default();
        if state.fetch_logs_raw.as_deref() == Some(f.raw_hash.as_str()) {
            return;
        }
        state.fetch_logs_raw = Some(f.raw_hash.clone());
        self.fetch_seq += 1;
        let default_request = format!("r-{}-{}", crate::link::now_unix(), self.fetch_seq);
        match recipes::parse_fetch_logs(&f.bytes, &default_request) {
            Err(reason) => {
                error!("{}: log request ignored: {reason}", f.path.display());
                self.events.record("fetch_logs_rejected", json!({"app_id": app, "file": f.path, "reason": reason}));
            }
            Ok(frame) => {
                let targets = self.conns_where(|r| r.app_id == app && r.authenticated && r.has(capability::FETCH_LOGS));
                let instances: Vec<String> = targets.iter().filter_map(|c| self.instance_of(*c)).collect();
                info!(
                    "{}: logs {} asked of the agents of app {app}: {instances:?}",
                    f.path.display(),
                    frame["request"]
                );
                self.events
                    .record("fetch_logs", json!({"app_id": app, "request": frame["request"], "sent_to": instances}));
                self.send_all(&targets, &frame);
            }
        }
        if let Err(e) = std::fs::remove_file(&f.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                error!("{}: cannot remove after acting on it: {e}", f.path.display());
            }
        }
    }

    /// `APP_ID.plan-request.json`: the app's authenticated agents that announced `drift`
    /// are asked for a plan now; each answers with a `Drift` frame, recorded as a `drift`
    /// event like any other report. The file is deleted once acted on.
    fn apply_plan_request_file(&mut self, app: &str, f: DirFile) {
        let state = self.apps.entry(app.to_string()).or_default();
        if state.plan_request_raw.as_deref() == Some(f.raw_hash.as_str()) {
            return;
        }
        state.plan_request_raw = Some(f.raw_hash.clone());
        match recipes::parse_plan_request(&f.bytes) {
            Err(reason) => {
                error!("{}: plan request ignored: {reason}", f.path.display());
                self.events.record("plan_request_rejected", json!({"app_id": app, "file": f.path, "reason": reason}));
            }
            Ok(frame) => {
                let targets = self.conns_where(|r| r.app_id == app && r.authenticated && r.has(capability::DRIFT));
                let instances: Vec<String> = targets.iter().filter_map(|c| self.instance_of(*c)).collect();
                info!("{}: a plan asked of the agents of app {app}: {instances:?}", f.path.display());
                self.events.record("plan_request", json!({"app_id": app, "sent_to": instances}));
                self.send_all(&targets, &frame);
            }
        }
        if let Err(e) = std::fs::remove_file(&f.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                error!("{}: cannot remove after acting on it: {e}", f.path.display());
            }
        }
    }

    fn on_handshake(&mut self, conn: u64, h: Hello) -> Option<PendingHandshake> {
        let (Some(app_id), Some(instance_id)) = (h.app_id, h.instance_id) else {
            warn!(conn, "Handshake without app_id or instance_id: AppNotReady");
            self.send(conn, &out::app_not_ready());
            return None;
        };
        if !valid_app_id(&app_id) {
            warn!(conn, "Handshake with unusable app_id {app_id:?}: AppNotReady");
            self.send(conn, &out::app_not_ready());
            return None;
        }
        if !valid_instance_id(&instance_id) {
            let detail = format!("unusable instance_id {:?}", short(&instance_id));
            self.refuse_handshake(conn, &app_id, "", CLOSE_POLICY, "unusable instance_id", detail);
            return None;
        }
        let Some(token) = h.instance_token else {
            let detail = format!("Handshake of {instance_id} (app {app_id}) without instance_token");
            self.refuse_handshake(conn, &app_id, &instance_id, CLOSE_POLICY, "no instance_token", detail);
            return None;
        };
        // Pick up a file created or edited since the last poll right away.
        self.refresh_app(&app_id);
        let has_recipe = self.apps.get(&app_id).is_some_and(|a| a.served.is_some());
        let required = self.require_pin.iter().any(|a| a == "*" || *a == app_id);
        let peer = self.conns.get(&conn).map(|c| c.peer.clone()).unwrap_or_default();
        let pending = PendingHandshake {
            conn,
            app_id,
            instance_id,
            agent_version: h.agent_version,
            capabilities: h.capabilities,
            required,
            peer,
            reply: None,
        };
        // Only an app the operator serves gets pins on first use: a client naming
        // made-up apps must not fill the pins directory.
        let may_pin = has_recipe && !required;
        match self.pins.verdict(&pending.app_id, &pending.instance_id, &token) {
            Ok(Verdict::Unpinned) if may_pin => {
                let request =
                    PinRequest::new(&pending.app_id, &pending.instance_id, &token, &pending.peer, SystemTime::now());
                let reply = self.pin_writer.submit(request);
                Some(PendingHandshake { reply: Some(reply), ..pending })
            }
            verdict => {
                self.finish_handshake(pending, verdict);
                None
            }
        }
    }

    /// Answers a Handshake once its pin verdict is known (see [`Hub::on_text`]).
    pub fn finish_handshake(&mut self, p: PendingHandshake, verdict: Result<Verdict, BackendError>) {
        let PendingHandshake { conn, app_id, instance_id, agent_version, capabilities, required, peer, reply: _ } = p;
        if self.conns.get(&conn).is_none_or(|c| c.closing) {
            return;
        }
        let authenticated = match verdict {
            Ok(Verdict::Known) => true,
            Ok(Verdict::Pinned) => {
                info!(conn, "instance {instance_id} of app {app_id} pinned to the token it showed from {peer}");
                self.events.record(
                    "pinned",
                    json!({"conn": conn, "peer": peer, "app_id": app_id, "instance_id": instance_id}),
                );
                true
            }
            Ok(Verdict::Mismatch) => {
                let detail = format!(
                    "instance {instance_id} of app {app_id} is pinned to another instance_token; \
                     `opsagent-backend instances forget` resets it"
                );
                return self.refuse_handshake(
                    conn,
                    &app_id,
                    &instance_id,
                    CLOSE_POLICY,
                    "instance_token does not match the pinned one",
                    detail,
                );
            }
            Ok(Verdict::Unpinned) if required => {
                let detail = format!(
                    "instance {instance_id} of app {app_id} is not registered and the app requires it \
                     (`opsagent-backend instances pin`)"
                );
                return self.refuse_handshake(
                    conn,
                    &app_id,
                    &instance_id,
                    CLOSE_POLICY,
                    "instance not registered",
                    detail,
                );
            }
            Ok(Verdict::Unpinned) => false,
            Err(e) => {
                error!(conn, "{e}");
                let detail = format!("cannot check the pin of {instance_id} (app {app_id}): {e}");
                return self.refuse_handshake(
                    conn,
                    &app_id,
                    &instance_id,
                    CLOSE_INTERNAL,
                    "the backend cannot check the pin",
                    detail,
                );
            }
        };
        let app = self.apps.get(&app_id);
        let served = app.and_then(|a| a.served.as_ref()).filter(|_| authenticated);
        let update = app.and_then(|a| a.update.clone());
        let announced = capabilities.is_some();
        let reg = Reg {
            app_id: app_id.clone(),
            instance_id: instance_id.clone(),
            agent_version,
            capabilities: capabilities.unwrap_or_default(),
            authenticated,
            ready: served.is_some(),
        };
        let served_version = served.map(|s| s.version);
        let mut frames = Vec::new();
        if announced {
            frames.push(out::capabilities(self.signer.is_some()));
        }
        match served {
            None => {
                info!(conn, "handshake of {instance_id}: app {app_id} has no valid recipe: AppNotReady");
                frames.push(out::app_not_ready());
            }
            Some(s) => {
                info!(
                    conn,
                    "handshake of {instance_id} (app {app_id}, agent {}): recipe version {}",
                    reg.agent_version.as_deref().unwrap_or("?"),
                    s.version
                );
                frames.push(recipe_frame(&mut self.signer, &app_id, s));
                if let Some(order) = update.filter(|o| reg.agent_version.as_deref() != Some(o.version.as_str())) {
                    info!(conn, "AgentUpdate {} to {instance_id}", order.version);
                    frames.push(out::agent_update(&order.version, &order.url));
                }
            }
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.reg = Some(reg);
        c.handshaken = true;
        if authenticated {
            let inst = self.instances.entry(instance_id).or_default();
            inst.app_id = app_id;
            if served_version.is_some() {
                inst.runs = served_version;
            }
        }
        for f in &frames {
            self.send(conn, f);
        }
        self.evaluate_waits();
    }

    fn on_statelog(&mut self, conn: u64, mut s: StateLogMsg, obj: Map<String, Value>) {
        let Some(reg) = self.speaker(conn, "StateLog", s.instance_id.as_deref(), s.app_id.as_deref()) else {
            return;
        };
        s.instance_id = Some(reg.instance_id.clone());
        s.app_id = Some(reg.app_id.clone());
        let ack = reg.has(capability::STATELOG_ACK);
        let fresh = match (&s.instance_id, s.seq) {
            (Some(i), Some(seq)) => self.seen.insert((i.clone(), seq)),
            _ => true,
        };
        if let (false, Some(seq)) = (fresh, s.seq) {
            // Counted where a test (or an operator) can see what the agent really sent:
            // the statelog itself holds each record once.
            self.events.record(
                "statelog_repeated",
                json!({"conn": conn, "instance_id": reg.instance_id, "seq": seq, "acknowledged": ack}),
            );
        }
        if let (false, true, Some(seq)) = (fresh, ack, s.seq) {
            debug!(conn, "StateLog seq {seq} already recorded: acknowledged again, not appended");
            // Recorded, but perhaps not synced yet (the first copy's ack may be waiting).
            self.ack_when_durable(conn, seq);
            return;
        }
        let mut line = obj;
        line.insert("instance_id".into(), Value::String(reg.instance_id.clone()));
        line.insert("app_id".into(), Value::String(reg.app_id.clone()));
        line.insert("received_at".into(), Value::String(rfc3339(SystemTime::now())));
        let runs = self.instances.get(&reg.instance_id).and_then(|i| i.runs);
        let counts = s.recipe_version.is_some() && s.recipe_version == runs;
        if !counts {
            line.insert(NO_WAIT_PROGRESS.into(), Value::Bool(false));
        }
        if !self.statelog.append(&Value::Object(line)) {
            // Not recorded: not acknowledged either, and a resend must be appended.
            if let (Some(i), Some(seq)) = (&s.instance_id, s.seq) {
                self.seen.remove(&(i.clone(), seq));
            }
            return;
        }
        info!(
            conn,
            "StateLog {} {} v{} {}",
            s.instance_id.as_deref().unwrap_or("?"),
            s.state_id.as_deref().unwrap_or("?"),
            s.recipe_version.map_or("?".to_string(), |v| v.to_string()),
            match s.result {
                Some(true) => "ok",
                Some(false) => "failed",
                None => "(no result)",
            }
        );
        if counts {
            self.record_result(&s);
        } else {
            debug!(
                conn,
                "StateLog for recipe version {:?}, the instance runs {runs:?}: no wait progress", s.recipe_version
            );
        }
        if let (true, Some(seq)) = (ack, s.seq) {
            self.ack_when_durable(conn, seq);
        }
        self.evaluate_waits();
    }

    /// Queues the StateLogAck of `seq` to be sent once the statelog is synced: the agent
    /// forgets an acknowledged record, so a crash after the ack must not lose it.
    fn ack_when_durable(&mut self, conn: u64, seq: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        let frame: Arc<str> = out::statelog_ack(seq).to_string().into();
        debug!(conn, "→ {} (once synced)", short(&frame));
        self.acks.submit(PendingAck { file: self.statelog.file(), queue: c.queue.clone(), frame });
    }

    fn record_result(&mut self, s: &StateLogMsg) {
        let (Some(i), Some(v), Some(state), Some(ok)) = (&s.instance_id, s.recipe_version, &s.state_id, s.result)
        else {
            return;
        };
        let inst = self.instances.entry(i.clone()).or_default();
        if let Some(app) = &s.app_id {
            inst.app_id.clone_from(app);
        }
        let done = inst.done.entry(v).or_default();
        if ok {
            done.insert(state.clone());
        } else {
            done.remove(state);
        }
    }

    fn on_wait_query(&mut self, conn: u64, instance_id: Option<String>, app_id: Option<String>, version: Option<u64>) {
        let Some(reg) = self.speaker(conn, "WaitQuery", instance_id.as_deref(), app_id.as_deref()) else {
            return;
        };
        self.evaluate_waits();
        let instance_id = reg.instance_id;
        let current = self.apps.get(&reg.app_id).and_then(|a| a.served.as_ref().map(|s| s.version));
        let Some(version) = version.filter(|v| *v > 0).or(current) else {
            warn!(conn, "WaitQuery of {instance_id} without a recipe version and no recipe served: ignored");
            return;
        };
        let list = self.released.get(&(instance_id, version)).cloned().unwrap_or_default();
        self.send(conn, &out::wait_list(version, &list));
    }

    /// The instance whose successful StateLog satisfies `r`, if any (see the module
    /// documentation of `backend` for the rule).
    fn satisfier(&self, r: &StateRef) -> Option<String> {
        let host = r.host.as_deref().filter(|h| *h != "*");
        self.instances.iter().find_map(|(id, inst)| {
            if host.is_some_and(|h| h != id && h != inst.app_id) {
                return None;
            }
            let current = self.apps.get(&inst.app_id)?.served.as_ref()?.version;
            inst.done.get(&current)?.contains(&r.state).then(|| id.clone())
        })
    }

    /// Releases every wait whose references are all satisfied, for each known instance's
    /// current recipe version, and pushes `State` to the instance's connections.
    fn evaluate_waits(&mut self) {
        let mut newly = Vec::new();
        for (id, inst) in &self.instances {
            let Some(served) = self.apps.get(&inst.app_id).and_then(|a| a.served.as_ref()) else {
                continue;
            };
            // Most apps wait for nothing: with 10,000 instances, each Handshake must not
            // cost 10,000 key copies.
            if served.waits.is_empty() {
                continue;
            }
            let released = self.released.get(&(id.clone(), served.version));
            for w in &served.waits {
                if w.refs.is_empty() || released.is_some_and(|l| l.iter().any(|(s, _)| *s == w.state_id)) {
                    continue;
                }
                let by: Option<BTreeSet<String>> = w.refs.iter().map(|r| self.satisfier(r)).collect();
                if let Some(by) = by {
                    let by = if by.len() == 1 { by.into_iter().next() } else { None };
                    newly.push((id.clone(), served.version, w.state_id.clone(), by));
                }
            }
        }
        for (instance, version, state, by) in newly {
            info!(
                "wait {state} of {instance} (recipe version {version}) released by {}",
                by.as_deref().unwrap_or("several instances")
            );
            self.events.record(
                "wait_released",
                json!({"instance_id": instance, "recipe_version": version, "state_id": state, "by": by}),
            );
            for conn in self.conns_where(|r| r.instance_id == instance) {
                self.send(conn, &out::state_done(version, &state));
            }
            self.released.entry((instance, version)).or_default().push((state, by));
        }
    }

    /// Acts on one poll of the recipe directory.
    pub fn apply_scan(&mut self, mut scan: Scan) {
        let apps: BTreeSet<String> = self
            .apps
            .keys()
            .chain(scan.recipes.keys())
            .chain(scan.updates.keys())
            .chain(scan.reconnects.keys())
            .chain(scan.fetch_logs.keys())
            .chain(scan.plan_requests.keys())
            .cloned()
            .collect();
        for app in &apps {
            match scan.recipes.remove(app) {
                Some(f) => self.apply_recipe_file(app, f),
                None => self.recipe_file_gone(app),
            }
            match scan.updates.remove(app) {
                Some(f) => self.apply_update_file(app, f),
                None => self.update_file_gone(app),
            }
            match scan.reconnects.remove(app) {
                Some(f) => self.apply_reconnect_file(app, f),
                None => {
                    if let Some(a) = self.apps.get_mut(app) {
                        a.reconnect_raw = None;
                    }
                }
            }
            match scan.fetch_logs.remove(app) {
                Some(f) => self.apply_fetch_logs_file(app, f),
                None => {
                    if let Some(a) = self.apps.get_mut(app) {
                        a.fetch_logs_raw = None;
                    }
                }
            }
            match scan.plan_requests.remove(app) {
                Some(f) => self.apply_plan_request_file(app, f),
                None => {
                    if let Some(a) = self.apps.get_mut(app) {
                        a.plan_request_raw = None;
                    }
                }
            }
        }
        self.evaluate_waits();
    }

    /// Re-reads one app's recipe and update order now.
    fn refresh_app(&mut self, app: &str) {
        for kind in [FileKind::Recipe, FileKind::Update] {
            let path = self.recipe_dir.join(recipes::file_name(app, kind));
            if self.skip.iter().any(|s| *s == std::path::absolute(&path).unwrap_or_else(|_| path.clone())) {
                continue;
            }
            match (read_one(&self.recipe_dir, app, kind), kind) {
                (Ok(Some(f)), FileKind::Recipe) => self.apply_recipe_file(app, f),
                (Ok(None), FileKind::Recipe) => self.recipe_file_gone(app),
                (Ok(Some(f)), _) => self.apply_update_file(app, f),
                (Ok(None), _) => self.update_file_gone(app),
                (Err(e), _) => warn!("{}: cannot read: {e}", path.display()),
            }
        }
    }

    /// A recipe file seen with this content: validate it and, if it is a new recipe,
    /// give it the next version and push it to the app's agents.
    fn apply_recipe_file(&mut self, app: &str, f: DirFile) {
        let state = self.apps.entry(app.to_string()).or_default();
        if state.recipe_raw.as_deref() == Some(f.raw_hash.as_str()) {
            return;
        }
        state.recipe_raw = Some(f.raw_hash.clone());
        let candidate = match parse_recipe(&f.bytes) {
            Ok(c) => c,
            Err(reason) => {
                let keep = match &state.served {
                    Some(s) => format!("still serving recipe version {}", s.version),
                    None => "the app stays not ready".to_string(),
                };
                error!("{}: recipe rejected: {reason}; {keep}", f.path.display());
                self.events.record(
                    "recipe_rejected",
                    json!({"app_id": app, "file": f.path, "reason": reason,
                           "serving": state.served.as_ref().map(|s| s.version)}),
                );
                return;
            }
        };
        if state.served.as_ref().is_some_and(|s| s.hash == candidate.hash) {
            debug!("{}: rewritten with the same recipe", f.path.display());
            return;
        }
        let record = self.versions.apps.get(app);
        let version = match record {
            Some(r) if r.hash == candidate.hash => r.version,
            _ => {
                let previous =
                    record.map(|r| r.version).into_iter().chain(state.served.as_ref().map(|s| s.version)).max();
                match previous {
                    Some(p) => (p + 1).max(candidate.explicit_version.unwrap_or(0)),
                    None => candidate.explicit_version.unwrap_or(1),
                }
            }
        };
        let record = AppRecord {
            version,
            hash: candidate.hash.clone(),
            module: candidate.module.clone(),
            state: candidate.states.clone(),
            explicit_version: candidate.explicit_version,
        };
        let served = candidate.serve(version);
        info!("{}: app {app} recipe version {version} ({} states)", f.path.display(), served.states.len());
        self.events.record("recipe_loaded", json!({"app_id": app, "file": f.path, "recipe_version": version}));
        let frame = recipe_frame(&mut self.signer, app, &served);
        state.served = Some(served);
        if self.versions.apps.get(app) != Some(&record) {
            self.versions.set(app, record);
        }
        let targets = self.conns_where(|r| r.app_id == app && r.ready);
        self.send_all(&targets, &frame);
        for conn in targets {
            if let Some(i) = self.instance_of(conn).and_then(|i| self.instances.get_mut(&i)) {
                i.runs = Some(version);
            }
        }
    }

    fn recipe_file_gone(&mut self, app: &str) {
        let Some(state) = self.apps.get_mut(app) else {
            return;
        };
        state.recipe_raw = None;
        if let Some(s) = state.served.take() {
            warn!(
                "{}: removed: app {app} (recipe version {}) is no longer served",
                recipes::file_name(app, FileKind::Recipe),
                s.version
            );
            self.events.record("recipe_removed", json!({"app_id": app, "recipe_version": s.version}));
        }
    }

    fn apply_update_file(&mut self, app: &str, f: DirFile) {
        let state = self.apps.entry(app.to_string()).or_default();
        if state.update_raw.as_deref() == Some(f.raw_hash.as_str()) {
            return;
        }
        state.update_raw = Some(f.raw_hash.clone());
        let order = match parse_update(&f.bytes) {
            Ok(o) => o,
            Err(reason) => {
                error!("{}: update order ignored: {reason}", f.path.display());
                self.events.record("update_rejected", json!({"app_id": app, "file": f.path, "reason": reason}));
                return;
            }
        };
        if state.update.as_ref() == Some(&order) {
            return;
        }
        state.update = Some(order.clone());
        let targets =
            self.conns_where(|r| r.app_id == app && r.agent_version.as_deref() != Some(order.version.as_str()));
        let instances: Vec<String> = targets.iter().filter_map(|c| self.instance_of(*c)).collect();
        info!("{}: agents of app {app} are to run {}; told now: {instances:?}", f.path.display(), order.version);
        self.events.record(
            "agent_update",
            json!({"app_id": app, "version": order.version, "url": order.url, "sent_to": instances}),
        );
        self.send_all(&targets, &out::agent_update(&order.version, &order.url));
    }

    fn update_file_gone(&mut self, app: &str) {
        let Some(state) = self.apps.get_mut(app) else {
            return;
        };
        state.update_raw = None;
        if let Some(o) = state.update.take() {
            info!("update order {} of app {app} withdrawn", o.version);
        }
    }

    fn apply_reconnect_file(&mut self, app: &str, f: DirFile) {
        let state = self.apps.entry(app.to_string()).or_default();
        if state.reconnect_raw.as_deref() == Some(f.raw_hash.as_str()) {
            return;
        }
        state.reconnect_raw = Some(f.raw_hash.clone());
        match parse_reconnect(&f.bytes) {
            Err(reason) => {
                error!("{}: reconnect order ignored: {reason}", f.path.display());
                self.events.record("reconnect_rejected", json!({"app_id": app, "file": f.path, "reason": reason}));
            }
            Ok(after_s) => {
                let targets = self.conns_where(|r| r.app_id == app && r.has(capability::RECONNECT_HINT));
                let instances: Vec<String> = targets.iter().filter_map(|c| self.instance_of(*c)).collect();
                info!("{}: agents of app {app} told to reconnect after {after_s} s: {instances:?}", f.path.display());
                self.events.record("reconnect", json!({"app_id": app, "after_s": after_s, "sent_to": instances}));
                for conn in targets {
                    self.send(conn, &out::reconnect(after_s));
                    let reason = format!("reconnect after {after_s} s");
                    self.queue(conn, Out::Close { code: CLOSE_RESTART, reason });
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&f.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                error!("{}: cannot remove after acting on it: {e}", f.path.display());
            }
        }
    }
}
