//! The backend's state and its reactions: connections and who they are, the recipe
//! served per app, the statelog, wait releases and the operator's orders. Every method
//! runs under one lock and never awaits: frames to agents go into each connection's
//! queue, in order.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use opsagent_proto::wire::StateRef;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::journal::{Events, JsonLines};
use super::recipes::{
    self, parse_recipe, parse_reconnect, parse_update, read_one, valid_app_id, AppRecord, DirFile, FileKind, Scan,
    Served, UpdateOrder, VersionStore,
};
use super::wire::{self, out, AgentMsg, Hello, StateLogMsg};
use super::{BackendError, BackendOptions};
use crate::protocol::capability;
use crate::timefmt::rfc3339;

/// What a connection task is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    Text(String),
    Close { code: u16, reason: String },
}

/// WebSocket close code 1012, "service restart".
pub(crate) const CLOSE_RESTART: u16 = 1012;

/// Who a connection is, from its last Handshake.
#[derive(Debug, Clone)]
struct Reg {
    app_id: String,
    instance_id: String,
    agent_version: Option<String>,
    capabilities: Vec<String>,
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
    tx: UnboundedSender<Out>,
    reg: Option<Reg>,
}

#[derive(Debug, Default)]
struct AppState {
    served: Option<Served>,
    /// Raw hashes of the files last seen, so that a poll acts on changes only.
    recipe_raw: Option<String>,
    update_raw: Option<String>,
    reconnect_raw: Option<String>,
    update: Option<UpdateOrder>,
}

/// An instance the backend has heard of (by Handshake or StateLog).
#[derive(Debug, Default)]
struct Instance {
    app_id: String,
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
    events: Events,
    versions: VersionStore,
    apps: BTreeMap<String, AppState>,
    conns: BTreeMap<u64, Conn>,
    instances: BTreeMap<String, Instance>,
    /// `(instance_id, seq)` of every StateLog recorded.
    seen: HashSet<(String, u64)>,
    /// `(instance_id, recipe_version)` → waits released for it, in release order.
    released: BTreeMap<(String, u64), Vec<Release>>,
}

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
        let history = JsonLines::read_all(&opts.statelog)?;
        let mut skip = vec![opts.statelog.clone(), versions.path().to_path_buf()];
        skip.extend(opts.events.clone());
        let skip = skip.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect();
        let mut hub = Self {
            recipe_dir: opts.recipe_dir.clone(),
            skip,
            statelog: JsonLines::open(&opts.statelog)?,
            events: Events::open(opts.events.as_deref())?,
            versions,
            apps: BTreeMap::new(),
            conns: BTreeMap::new(),
            instances: BTreeMap::new(),
            seen: HashSet::new(),
            released: BTreeMap::new(),
        };
        for line in &history {
            let s = wire::statelog_fields(line);
            if let (Some(i), Some(seq)) = (&s.instance_id, s.seq) {
                hub.seen.insert((i.clone(), seq));
            }
            hub.record_result(&s);
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

    fn send(&self, conn: u64, v: &Value) {
        if let Some(c) = self.conns.get(&conn) {
            debug!(conn, "→ {}", short(&v.to_string()));
            // A closed queue means the connection is going away: nothing to do.
            let _ = c.tx.send(Out::Text(v.to_string()));
        }
    }

    /// Ids of the registered connections `pick` selects.
    fn conns_where(&self, pick: impl Fn(&Reg) -> bool) -> Vec<u64> {
        self.conns.iter().filter(|(_, c)| c.reg.as_ref().is_some_and(&pick)).map(|(id, _)| *id).collect()
    }

    fn instance_of(&self, conn: u64) -> Option<String> {
        self.conns.get(&conn)?.reg.as_ref().map(|r| r.instance_id.clone())
    }

    pub fn connect(&mut self, conn: u64, peer: String, tx: UnboundedSender<Out>) {
        info!(conn, "connection from {peer}");
        self.events.record("open", json!({"conn": conn, "peer": peer}));
        self.conns.insert(conn, Conn { peer, tx, reg: None });
    }

    pub fn disconnect(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            let instance = c.reg.as_ref().map(|r| r.instance_id.clone());
            info!(conn, "connection from {} closed ({})", c.peer, instance.as_deref().unwrap_or("no handshake"));
            self.events.record("close", json!({"conn": conn, "peer": c.peer, "instance_id": instance}));
        }
    }

    pub fn on_binary(&mut self, conn: u64, len: usize) {
        warn!(conn, "binary frame of {len} bytes ignored (the protocol uses text frames)");
        self.events.record("binary", json!({"conn": conn, "len": len}));
    }

    pub fn on_text(&mut self, conn: u64, text: &str) {
        let (msg, obj) = match wire::parse_agent(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(conn, "frame ignored: {e}: {}", short(text));
                self.events.record("invalid", json!({"conn": conn, "error": e.to_string(), "frame": short(text)}));
                return;
            }
        };
        debug!(conn, "← {}", short(text));
        if !matches!(msg, AgentMsg::StateLog(_)) {
            self.events.record("message", json!({"conn": conn, "code": msg.code(), "message": redacted(obj.clone())}));
        }
        match msg {
            AgentMsg::Handshake(h) => self.on_handshake(conn, h),
            AgentMsg::Test(_) => self.send(conn, &out::test_ans()),
            AgentMsg::StateLog(s) => self.on_statelog(conn, s, obj),
            AgentMsg::WaitQuery { instance_id, app_id, recipe_version } => {
                self.on_wait_query(conn, instance_id, app_id, recipe_version)
            }
            AgentMsg::Heartbeat => debug!(conn, "heartbeat"),
            AgentMsg::Unknown(code) => warn!(conn, "message with unknown code {code:?} ignored"),
        }
    }

    fn on_handshake(&mut self, conn: u64, h: Hello) {
        let (Some(app_id), Some(instance_id)) = (h.app_id, h.instance_id) else {
            warn!(conn, "Handshake without app_id or instance_id: AppNotReady");
            self.send(conn, &out::app_not_ready());
            return;
        };
        if !valid_app_id(&app_id) {
            warn!(conn, "Handshake with unusable app_id {app_id:?}: AppNotReady");
            self.send(conn, &out::app_not_ready());
            return;
        }
        // Pick up a file created or edited since the last poll right away.
        self.refresh_app(&app_id);
        self.instances.entry(instance_id.clone()).or_default().app_id = app_id.clone();
        let app = self.apps.get(&app_id);
        let served = app.and_then(|a| a.served.as_ref());
        let update = app.and_then(|a| a.update.clone());
        let announced = h.capabilities.is_some();
        let reg = Reg {
            app_id: app_id.clone(),
            instance_id: instance_id.clone(),
            agent_version: h.agent_version,
            capabilities: h.capabilities.unwrap_or_default(),
            ready: served.is_some(),
        };
        let mut frames = Vec::new();
        if announced {
            frames.push(out::capabilities());
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
                frames.push(out::recipe_metadata(s.version, s.module.as_ref(), &s.states));
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
        for f in &frames {
            self.send(conn, f);
        }
        self.evaluate_waits();
    }

    fn on_statelog(&mut self, conn: u64, mut s: StateLogMsg, obj: Map<String, Value>) {
        let reg = self.conns.get(&conn).and_then(|c| c.reg.clone());
        if let Some(r) = &reg {
            s.instance_id.get_or_insert_with(|| r.instance_id.clone());
            s.app_id.get_or_insert_with(|| r.app_id.clone());
        }
        let ack = reg.as_ref().is_some_and(|r| r.has(capability::STATELOG_ACK));
        let fresh = match (&s.instance_id, s.seq) {
            (Some(i), Some(seq)) => self.seen.insert((i.clone(), seq)),
            _ => true,
        };
        if let (false, true, Some(seq)) = (fresh, ack, s.seq) {
            debug!(conn, "StateLog seq {seq} already recorded: acknowledged again, not appended");
            self.send(conn, &out::statelog_ack(seq));
            return;
        }
        let mut line = obj;
        line.insert("received_at".into(), Value::String(rfc3339(SystemTime::now())));
        self.statelog.append(&Value::Object(line));
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
        self.record_result(&s);
        if let (true, Some(seq)) = (ack, s.seq) {
            self.send(conn, &out::statelog_ack(seq));
        }
        self.evaluate_waits();
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
        self.evaluate_waits();
        let Some(instance_id) = instance_id.or_else(|| self.instance_of(conn)) else {
            warn!(conn, "WaitQuery without instance_id before any Handshake: ignored");
            return;
        };
        let app_id = app_id.or_else(|| self.instances.get(&instance_id).map(|i| i.app_id.clone()));
        let current = app_id.and_then(|a| self.apps.get(&a)?.served.as_ref().map(|s| s.version));
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
        let frame = out::recipe_metadata(version, served.module.as_ref(), &served.states);
        state.served = Some(served);
        if self.versions.apps.get(app) != Some(&record) {
            self.versions.set(app, record);
        }
        for conn in self.conns_where(|r| r.app_id == app && r.ready) {
            self.send(conn, &frame);
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
        for conn in targets {
            self.send(conn, &out::agent_update(&order.version, &order.url));
        }
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
                    if let Some(c) = self.conns.get(&conn) {
                        let reason = format!("reconnect after {after_s} s");
                        let _ = c.tx.send(Out::Close { code: CLOSE_RESTART, reason });
                    }
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
