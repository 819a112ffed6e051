//! The socket server: who may connect, and the request loop of one connection.
//!
//! Every connection's peer uid (SO_PEERCRED, set by the kernel at connect time, so it
//! cannot be forged) is checked against the allowlist before a byte is read. A
//! connection then speaks `Hello` first and runs one request at a time. While an
//! `Apply` runs, a separate task keeps reading frames, so that a `Cancel` (or the
//! connection closing) reaches the running state at once; a state is never dropped
//! half-way: it is told to stop and answers for itself.
//!
//! A pipelined round: apply requests may wait behind the running one, each sent to
//! follow the one before ([`RequestFrame::after`]; at most [`AHEAD_MAX_REQUESTS`]); each
//! starts when the one before ends, if it succeeded; otherwise it is answered `not-run`.
//! Each is one more request, not a way around any check: it goes through
//! `Connection::handle` like any other, when it starts.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opsagent_logline::catalog;
use opsagent_proto::codec::{CodecError, DEFAULT_MAX_FRAME};
use opsagent_proto::request::{
    self, ApplyRequest, ApplySignedRequest, Change, DecodeError, ErrorCode, HelperError, HelperStatus, Reply,
    ReplyFrame, Request, RequestFrame, AHEAD_MAX_FRAME, AHEAD_MAX_REQUESTS,
};
use opsagent_proto::stream::{self, FrameReader, FrameWriter};
use opsagent_proto::HELPER_PROTOCOL_VERSION;
use opsagent_shared::timer::sleep_until_opt;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cancel::{self, Canceller};
use crate::exec;
use crate::identity::Allowlist;
use crate::signed::{self as signed_mode, SignedApply, SignedStore};
use crate::states::{self, Ctx, Step};

pub const HELPER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Signed recipes up to this size are verified on the request loop (well under a
/// millisecond); larger ones on the blocking pool.
const INLINE_VERIFY_BYTES: usize = 64 * 1024;

pub struct Config {
    pub allow: Allowlist,
    /// Largest request frame accepted.
    pub max_frame: usize,
    /// Connections one uid may hold at once.
    pub max_connections_per_uid: usize,
    /// A connection with nothing running and nothing received for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// The helper exits once no request has run or arrived for this long (socket
    /// activation starts it again).
    pub exit_idle: Option<Duration>,
    /// A reply not written within this long drops the connection: a peer that never
    /// reads would otherwise hold the request (and the helper's idle exit) forever.
    pub reply_timeout: Duration,
    pub ctx: Ctx,
    /// Signed mode: the `recipe_key` and the verified recipe. `None`: no key is
    /// configured and recipes are not verified (the daemon sends parameters).
    pub signed: Option<Arc<SignedStore>>,
}

/// State shared by all connections: what runs now, for `Status`.
struct Shared {
    config: Arc<Config>,
    started: Instant,
    next_key: AtomicU64,
    running: Mutex<BTreeMap<u64, (String, String)>>,
    /// Open connections per peer uid.
    connections: Mutex<BTreeMap<u32, usize>>,
    /// When a connection was last accepted, a frame last arrived or a request last
    /// ended: the start of the idle time that `exit_idle` measures.
    last_active: Mutex<Instant>,
}

/// A connection's place in [`Shared::connections`], given back when it closes.
struct Slot {
    shared: Arc<Shared>,
    uid: u32,
}

impl Slot {
    /// `None` when `uid` already holds as many connections as allowed.
    fn take(shared: &Arc<Shared>, uid: u32) -> Option<Self> {
        let mut conns = shared.connections.lock().unwrap_or_else(PoisonError::into_inner);
        let n = conns.entry(uid).or_default();
        if *n >= shared.config.max_connections_per_uid {
            return None;
        }
        *n += 1;
        Some(Self { shared: Arc::clone(shared), uid })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self.shared.connections.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = conns.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&self.uid);
            }
        }
    }
}

impl Shared {
    fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            started: Instant::now(),
            next_key: AtomicU64::new(0),
            running: Mutex::new(BTreeMap::new()),
            connections: Mutex::new(BTreeMap::new()),
            last_active: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// When the helper may exit if nothing happens meanwhile; `None` while a request runs.
    fn exit_at(&self, exit_idle: Duration) -> Option<Instant> {
        if !self.running.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            return None;
        }
        Some(*self.last_active.lock().unwrap_or_else(PoisonError::into_inner) + exit_idle)
    }

    fn status(&self) -> HelperStatus {
        HelperStatus {
            helper_version: HELPER_VERSION.to_string(),
            protocol_version: HELPER_PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            running: self.running.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect(),
            recipes_verified: self.config.signed.is_some(),
            verified_version: self.config.signed.as_ref().and_then(|s| s.version()),
        }
    }
}

/// An entry in [`Shared::running`] for as long as it lives.
struct Running {
    shared: Arc<Shared>,
    key: u64,
}

impl Running {
    fn register(shared: &Arc<Shared>, state_id: &str, module: &str) -> Self {
        let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
        shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (state_id.to_string(), module.to_string()));
        Self { shared: Arc::clone(shared), key }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// The changes of an outcome as one log field, `; `-separated. Formatted only when
/// the event is logged: a helper logging at warn (as `opsagent apply` runs its private
/// one) does not build the string for every state.
struct Joined<'a>(&'a [Change]);

impl std::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// Accepts connections until SIGTERM or SIGINT, or until idle for `exit_idle`.
pub async fn serve(listener: UnixListener, config: Arc<Config>) -> anyhow::Result<()> {
    let exit_idle = config.exit_idle;
    let shared = Arc::new(Shared::new(config));
    // Flushes what the file states write, once their writes pause (durable.rs).
    let flusher = tokio::spawn(crate::durable::run(Arc::clone(crate::durable::Pending::host())));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    info!(version = HELPER_VERSION, protocol_version = HELPER_PROTOCOL_VERSION, "helper ready");
    loop {
        // While a request runs there is no deadline yet: look again a little later (a
        // request's end moves the deadline but does not wake this loop).
        let deadline = exit_idle
            .map(|idle| shared.exit_at(idle).unwrap_or_else(|| Instant::now() + idle.min(Duration::from_secs(5))));
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            () = sleep_until_opt(deadline) => {
                if let Some(idle) = exit_idle {
                    if shared.exit_at(idle).is_some_and(|at| at <= Instant::now()) {
                        // The listening socket stays with systemd: a connection queued
                        // from now on starts a new helper, which accepts it.
                        info!(idle_s = idle.as_secs(), "no request for a while; exiting until the next connection");
                        flusher.abort();
                        return Ok(());
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => admit(stream, &shared),
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    info!("stopping");
    flusher.abort();
    Ok(())
}

fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    shared.touch();
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, reason = "cannot read the peer's credentials", "refused connection");
            return;
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    if !shared.config.allow.allows(uid) {
        // Closed without a word: an unknown peer learns nothing about the protocol.
        warn!(
            message_id = catalog::CONNECTION_REFUSED,
            uid,
            pid,
            reason = "uid is not in the allowlist",
            "refused connection"
        );
        return;
    }
    let Some(slot) = Slot::take(shared, uid) else {
        let limit = shared.config.max_connections_per_uid;
        warn!(
            message_id = catalog::CONNECTION_REFUSED,
            uid,
            pid,
            limit,
            reason = "too many connections from this uid",
            "refused connection"
        );
        return;
    };
    let (rd, wr) = match stream::split_tokio(stream) {
        Ok(halves) => halves,
        Err(e) => {
            warn!(uid, pid, error = %e, reason = "cannot set up the connection", "refused connection");
            return;
        }
    };
    info!(uid, pid, "connection accepted");
    let conn = Connection::new(rd, wr, Arc::clone(shared), uid);
    tokio::spawn(async move {
        conn.run().await;
        drop(slot);
        debug!(uid, pid, "connection closed");
    });
}

enum Incoming {
    Frame(Vec<u8>),
    Closed,
    Broken(CodecError),
}

/// Reads frames as they come, whether or not a request is running. The channel is
/// small: a client flooding requests while one runs is slowed down, not buffered.
async fn read_frames(mut rd: FrameReader, tx: mpsc::Sender<Incoming>, max: usize) {
    loop {
        let (incoming, last) = match rd.read_raw(max).await {
            Ok(Some(body)) => (Incoming::Frame(body), false),
            Ok(None) => (Incoming::Closed, true),
            Err(e) => (Incoming::Broken(e), true),
        };
        if tx.send(incoming).await.is_err() || last {
            return;
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Incoming>,
    wr: FrameWriter,
    reader: tokio::task::JoinHandle<()>,
    /// The peer's uid (SO_PEERCRED), for the states' checks of fetched files.
    peer_uid: u32,
    greeted: bool,
    /// Why the last `recipe` on this connection was refused: the `apply-signed` a client
    /// sent right behind it (without waiting for the answer) is refused too, so that a
    /// state of the recipe verified before does not run in place of the one it asked for.
    refused_recipe: Option<String>,
    /// The peer is gone or the stream is unusable: write nothing more.
    dead: bool,
    /// The last request that ran a state (or was refused): its id, and whether its
    /// outcome succeeded and was not cancelled. A request sent `after` it runs only then.
    last: Option<(u64, bool)>,
    /// The apply requests sent to follow the running one, in order, each `after` the
    /// one before it (at most `AHEAD_MAX_REQUESTS`).
    queued: VecDeque<RequestFrame>,
}

impl Connection {
    fn new(rd: FrameReader, wr: FrameWriter, shared: Arc<Shared>, peer_uid: u32) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(read_frames(rd, tx, shared.config.max_frame));
        Self {
            shared,
            rx,
            wr,
            reader,
            peer_uid,
            greeted: false,
            refused_recipe: None,
            dead: false,
            last: None,
            queued: VecDeque::new(),
        }
    }

    async fn run(mut self) {
        while !self.dead {
            let next = match self.shared.config.idle_timeout {
                Some(idle) => match tokio::time::timeout(idle, self.rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        info!(idle_s = idle.as_secs(), "closing an idle connection");
                        break;
                    }
                },
                None => self.rx.recv().await,
            };
            let Some(incoming) = next else {
                break;
            };
            let body = match incoming {
                Incoming::Frame(body) => {
                    self.shared.touch();
                    body
                }
                Incoming::Closed => break,
                Incoming::Broken(e) => {
                    self.broken(&e).await;
                    break;
                }
            };
            if let Some(RequestFrame { id, after, request }) = self.decode(&body).await {
                self.handle(id, after, request).await;
                // What was sent to follow it starts now, without a round trip; a
                // withdrawal that arrived meanwhile is read first, so that it finds the
                // request it names still waiting.
                loop {
                    self.read_arrived().await;
                    if self.dead {
                        // Nobody would read their outcomes: they must not run.
                        break;
                    }
                    let Some(RequestFrame { id, after, request }) = self.queued.pop_front() else {
                        break;
                    };
                    self.handle(id, after, request).await;
                }
                self.shared.touch();
            }
        }
        self.reader.abort();
    }

    /// `after`: the request this one was sent to follow (pipelining); it runs only if that
    /// one was the last to run and succeeded.
    async fn handle(&mut self, id: u64, after: Option<u64>, request: Request) {
        if let Some(after) = after {
            if !matches!(request, Request::Apply(_) | Request::ApplySigned(_)) {
                let message = "only apply requests may be sent to follow another";
                self.reply(id, Reply::Error(HelperError::new(ErrorCode::BadRequest, message))).await;
                return;
            }
            if self.last != Some((after, true)) {
                let message = format!("not run: request {after} did not succeed on this connection");
                debug!(id, after, "{message}");
                self.reply(id, Reply::Error(HelperError::new(ErrorCode::NotRun, message))).await;
                return;
            }
        }
        match request {
            Request::Hello { protocol_version, agent_version } => {
                if protocol_version != HELPER_PROTOCOL_VERSION {
                    let message = format!(
                        "protocol version {protocol_version} is not supported: this helper ({HELPER_VERSION}) speaks version {HELPER_PROTOCOL_VERSION}"
                    );
                    warn!(id, protocol_version, agent_version, "{message}");
                    self.reply(id, Reply::Error(HelperError::new(ErrorCode::VersionMismatch, message))).await;
                    self.dead = true;
                    return;
                }
                info!(id, agent_version, "hello");
                self.greeted = true;
                let hello = Reply::Hello {
                    protocol_version: HELPER_PROTOCOL_VERSION,
                    helper_version: HELPER_VERSION.into(),
                    signed_recipes: self.shared.config.signed.is_some(),
                    pipelining: true,
                    ahead: u32::try_from(AHEAD_MAX_REQUESTS).unwrap_or(1),
                };
                self.reply(id, hello).await;
            }
            _ if !self.greeted => {
                let e = HelperError::new(ErrorCode::Busy, "the first request on a connection must be hello");
                self.reply(id, Reply::Error(e)).await;
            }
            Request::Status => {
                // Debug only: status doubles as a liveness probe and may be frequent.
                debug!(id, "status");
                let status = self.shared.status();
                self.reply(id, Reply::Status(status)).await;
            }
            Request::Cancel { target } | Request::Withdraw { target } => {
                debug!(id, target, "cancel or withdrawal requested, but nothing runs or waits");
                self.reply(id, Reply::Cancelled { target, found: false }).await;
            }
            Request::Apply(req) => {
                // A plan of an unsigned state writes nothing, but it still has root read
                // the host on the daemon's say: with signed recipes, only root itself
                // (`opsagent apply --test`) may ask for one.
                if self.shared.config.signed.is_some() && !(req.plan && self.peer_uid == 0) {
                    let message = format!(
                        "a recipe_key is configured: only states of a signed recipe run, and state {} came with its parameters from the daemon",
                        req.state_id.as_str()
                    );
                    let (state_id, module) = (req.state_id.as_str(), req.params.name());
                    warn!(message_id = catalog::REQUEST_REFUSED, id, state_id, module, result = "refused", code = ?ErrorCode::Unverified, error = %message, "request refused");
                    self.reply(id, Reply::Error(HelperError::new(ErrorCode::Unverified, message))).await;
                    return;
                }
                self.apply(id, req, None).await;
            }
            Request::Recipe(upload) => {
                let Some(store) = self.shared.config.signed.clone() else {
                    let message = "no recipe_key is configured: recipes are not verified; send apply requests";
                    self.reply(id, Reply::Error(HelperError::new(ErrorCode::Unsupported, message))).await;
                    return;
                };
                // A small recipe is verified here (a hop to the blocking pool cost as much
                // as the work, on the path from a push to its first state); a large one,
                // which takes milliseconds, on the blocking pool, so that cancellations on
                // other connections are not held up.
                let accepted = if upload.bytes.len() <= INLINE_VERIFY_BYTES {
                    store.accept(&upload)
                } else {
                    let verifier = Arc::clone(&store);
                    match tokio::task::spawn_blocking(move || verifier.accept(&upload)).await {
                        Ok(r) => r,
                        Err(e) => Err(HelperError::new(ErrorCode::Internal, format!("verification failed: {e}"))),
                    }
                };
                match accepted {
                    Ok(a) => {
                        self.refused_recipe = None;
                        let states = u32::try_from(a.states).unwrap_or(u32::MAX);
                        let (app_id, version) = (a.app_id.clone(), a.version);
                        let reply = Reply::RecipeVerified { app_id: a.app_id, recipe_version: a.version, states };
                        // Answered before the log line: writing to the journal's stream can
                        // block (0.06–7 ms measured under load), and the daemon's first state
                        // waits on this answer.
                        self.reply(id, reply).await;
                        info!(id, app_id, recipe_version = version, states = a.states, "signed recipe verified");
                        // Kept on disk once the first state is on its way (see `persist`).
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = store.persist() {
                                warn!(error = %e, "cannot keep the verified recipe in the state directory");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(message_id = catalog::SIGNED_RECIPE_REFUSED, id, result = "refused", code = ?e.code, error = %e.message, "signed recipe refused");
                        self.refused_recipe = Some(e.message.clone());
                        self.reply(id, Reply::Error(e)).await;
                    }
                }
            }
            Request::ApplySigned(req) => self.apply_signed(id, &req).await,
        }
    }

    async fn apply_signed(&mut self, id: u64, req: &ApplySignedRequest) {
        let Some(store) = self.shared.config.signed.clone() else {
            let message = "no recipe_key is configured: recipes are not verified; send apply requests";
            self.reply(id, Reply::Error(HelperError::new(ErrorCode::Unsupported, message))).await;
            return;
        };
        let checked = match self.refused_recipe.take() {
            Some(why) => Err(HelperError::new(
                ErrorCode::Unverified,
                format!("the recipe sent before on this connection was refused: {why}"),
            )),
            None => store.request(req),
        };
        match checked {
            Ok(signed) => self.apply(id, signed.apply.clone(), Some(&signed)).await,
            Err(e) => {
                let (version, index) = (req.recipe_version, req.index);
                warn!(message_id = catalog::REQUEST_REFUSED, id, recipe_version = version, index, result = "refused", code = ?e.code, error = %e.message, "request refused");
                self.reply(id, Reply::Error(e)).await;
            }
        }
    }

    /// Runs one state. `signed`: it is a state of the verified recipe, whose downloads
    /// must be pinned.
    async fn apply(&mut self, id: u64, req: ApplyRequest, signed: Option<&SignedApply>) {
        let shared = Arc::clone(&self.shared);
        let module = req.params.name();
        let state_id = req.state_id.as_str();
        // One journal line per state at info, its outcome (which carries these fields
        // too): a converged round of a thousand states is a thousand lines for journald,
        // not two thousand. A state that hangs shows in `status` (`running`).
        let recipe_version = req.recipe_version;
        debug!(id, state_id, module, recipe_version, plan = req.plan, "apply");
        let _running = Running::register(&shared, state_id, module);
        let (canceller, cancel) = cancel::pair();
        // The request's commands are named after it (their transient units) and their
        // resource use is added up for its outcome.
        let ctx = shared.config.ctx.for_peer(self.peer_uid);
        let scope = Arc::new(exec::Scope::new(exec::Label {
            recipe_version: req.recipe_version,
            state_id: state_id.to_string(),
            module: module.to_string(),
            sandbox: ctx.policy.sandbox_for(module),
        }));
        let cancel = cancel.with_scope(Arc::clone(&scope));
        let started = Instant::now();
        let work = states::apply(&req, &ctx, cancel);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                incoming = self.rx.recv(), if !self.dead => {
                    self.while_busy(Some(id), incoming, &canceller).await;
                    if self.dead {
                        // Nobody is left to read the outcome: stop the work now.
                        canceller.cancel();
                    }
                }
            }
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(Step::NeedFetch(urls)) if signed.and_then(|s| s.unpinned(&urls)).is_some() => {
                let url = signed.and_then(|s| s.unpinned(&urls)).unwrap_or_default();
                let mut outcome = request::Outcome::failed(signed_mode::unpinned(url));
                outcome.duration_ms = duration_ms;
                warn!(id, state_id, module, recipe_version, result = false, url, duration_ms, comment = %outcome.comment, "outcome");
                self.reply(id, Reply::Outcome(outcome)).await;
            }
            Ok(Step::NeedFetch(urls)) => {
                info!(id, state_id, module, recipe_version, urls = %urls.join(" "), duration_ms, "needs downloads");
                self.reply(id, Reply::NeedFetch { urls }).await;
            }
            Ok(Step::Done(mut outcome)) => {
                outcome.duration_ms = duration_ms;
                if let Some(usage) = scope.usage() {
                    // The commands' own figures, from their units' control groups.
                    outcome.comment = if outcome.comment.is_empty() {
                        format!("commands used {usage}")
                    } else {
                        format!("{} (commands used {usage})", outcome.comment)
                    };
                }
                info!(
                    id, state_id, module, recipe_version,
                    result = outcome.result,
                    planned = outcome.planned,
                    cancelled = outcome.cancelled,
                    changes = outcome.changes.len(),
                    changed = %Joined(&outcome.changes),
                    duration_ms,
                    comment = %outcome.comment,
                    "outcome"
                );
                self.reply(id, Reply::Outcome(outcome)).await;
            }
            Err(e) => {
                let result = if e.code == ErrorCode::Denied { "denied" } else { "refused" };
                warn!(message_id = catalog::REQUEST_REFUSED, id, state_id, module, recipe_version, result, code = ?e.code, error = %e.message, duration_ms, "request refused");
                self.reply(id, Reply::Error(e)).await;
            }
        }
    }

    /// The frames that arrived while the last request ran, read without waiting, while
    /// requests wait behind it: the connection is busy until the last of them ends.
    async fn read_arrived(&mut self) {
        let (idle, _) = cancel::pair();
        while !self.dead && !self.queued.is_empty() {
            match self.rx.try_recv() {
                Ok(incoming) => self.while_busy(None, Some(incoming), &idle).await,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.while_busy(None, None, &idle).await,
            }
        }
    }

    /// A frame (or the end of the stream) that arrived while request `running` runs, or
    /// (`None`) between two requests of the line waiting to run.
    async fn while_busy(&mut self, running: Option<u64>, incoming: Option<Incoming>, canceller: &Canceller) {
        // Nothing answered here ran a state (busy, not-run for a withdrawn request, a
        // malformed frame), so none of these answers stands for the last request that did:
        // the next of the line is judged by that one's outcome.
        let last = self.last;
        match incoming {
            Some(Incoming::Frame(body)) => match self.decode(&body).await {
                Some(RequestFrame { id, request: Request::Cancel { target }, .. }) => {
                    let running_found = Some(target) == running;
                    if running_found {
                        info!(id, target, "cancel requested");
                        canceller.cancel();
                    }
                    self.take_back(id, target, running_found).await;
                }
                // Never the running request: a withdrawal only takes back one waiting.
                Some(RequestFrame { id, request: Request::Withdraw { target }, .. }) => {
                    self.take_back(id, target, false).await;
                }
                // The next in the line of requests sent to follow the running one.
                Some(
                    frame @ RequestFrame {
                        after: Some(_), request: Request::Apply(_) | Request::ApplySigned(_), ..
                    },
                ) if frame.after == self.queued.back().map(|q| q.id).or(running)
                    && self.queued.len() < AHEAD_MAX_REQUESTS
                    && body.len() <= AHEAD_MAX_FRAME =>
                {
                    debug!(
                        id = frame.id,
                        after = frame.after,
                        waiting = self.queued.len(),
                        "queued to follow the running request"
                    );
                    self.queued.push_back(frame);
                }
                Some(RequestFrame { id, .. }) => {
                    let busy = running.or_else(|| self.queued.front().map(|q| q.id)).unwrap_or_default();
                    let message = format!("request {busy} is still running; only cancel is accepted until it ends");
                    self.reply(id, Reply::Error(HelperError::new(ErrorCode::Busy, message))).await;
                }
                None => {}
            },
            Some(Incoming::Closed) | None => {
                info!(id = running, "connection closed while a request runs; cancelling it");
                self.dead = true;
            }
            Some(Incoming::Broken(e)) => {
                self.broken(&e).await;
                self.dead = true;
            }
        }
        self.last = last;
    }

    /// Answers a `cancel` or `withdraw` of `target` (`found` already when it cancelled the
    /// running request), and takes back the waiting request it names: answered `not-run`,
    /// it never starts, nor do those sent to follow it (answered `not-run` in their turn).
    async fn take_back(&mut self, id: u64, target: u64, running_found: bool) {
        let waiting = self.queued.iter().position(|q| q.id == target);
        self.reply(id, Reply::Cancelled { target, found: running_found || waiting.is_some() }).await;
        if let Some(at) = waiting {
            self.queued.remove(at);
            debug!(id, target, "a request waiting to follow the running one was withdrawn");
            let message = format!("not run: request {target} was cancelled before it started");
            self.reply(target, Reply::Error(HelperError::new(ErrorCode::NotRun, message))).await;
        }
    }

    /// The stream is no longer aligned on frames: say why if we can, then close.
    async fn broken(&mut self, e: &CodecError) {
        match e {
            CodecError::TooLarge { .. } => {
                warn!(error = %e, "closing the connection");
                self.reply(0, Reply::Error(HelperError::new(ErrorCode::BadRequest, e.to_string()))).await;
            }
            _ => debug!(error = %e, "connection broken"),
        }
        self.dead = true;
    }

    /// A well-framed body that is not a valid request is answered and skipped: the
    /// next frame starts at a known place, so the connection stays usable.
    /// A parameter the catalogue refuses (the checks `opsagent check` runs) is answered
    /// `invalid-parameter`, naming it; nothing runs.
    async fn decode(&mut self, body: &[u8]) -> Option<RequestFrame> {
        match request::decode_request(body) {
            Ok(frame) => Some(frame),
            Err(DecodeError::Invalid { id, state_id, module, error }) => {
                let state_id = state_id.as_ref().map_or("", |s| s.as_str());
                warn!(message_id = catalog::REQUEST_REFUSED, id, state_id, module = ?module, result = "refused", code = ?ErrorCode::InvalidParameter, error = %error, "request refused");
                let e = HelperError::new(ErrorCode::InvalidParameter, error.to_string());
                self.reply(id, Reply::Error(e)).await;
                None
            }
            Err(DecodeError::Malformed { id, message }) => {
                warn!(id, error = %message, "malformed request");
                let message = format!("malformed request: {message}");
                self.reply(id, Reply::Error(HelperError::new(ErrorCode::BadRequest, message))).await;
                None
            }
        }
    }

    async fn reply(&mut self, id: u64, reply: Reply) {
        // What a request sent to follow this one will be judged by: only an outcome
        // that succeeded lets it run.
        match &reply {
            Reply::Outcome(o) => self.last = Some((id, o.result && !o.cancelled)),
            Reply::NeedFetch { .. } | Reply::Error(_) => self.last = Some((id, false)),
            Reply::Hello { .. } | Reply::RecipeVerified { .. } | Reply::Cancelled { .. } | Reply::Status(_) => {}
        }
        if self.dead {
            return;
        }
        // Replies are bounded by the client's default limit, not by our request limit.
        let limit = self.shared.config.reply_timeout;
        match tokio::time::timeout(limit, self.wr.write(&ReplyFrame { id, reply }, DEFAULT_MAX_FRAME)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(id, error = %e, "cannot write the reply; closing the connection");
                self.dead = true;
            }
            Err(_) => {
                warn!(
                    id,
                    uid = self.peer_uid,
                    timeout_s = limit.as_secs(),
                    reason = "the peer does not read its replies",
                    "reply not written in time; closing the connection"
                );
                self.dead = true;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use opsagent_proto::catalogue::parse_state;
    use opsagent_proto::newtypes::StateId;

    /// Between two requests of a line the helper reads the frames that arrived (a
    /// status, a withdrawal of a later request, a malformed frame) and answers them; none
    /// of them ran a state, so none may stand for the request the next one follows: it
    /// still runs when that one succeeded.
    #[tokio::test]
    async fn frames_answered_between_two_requests_of_a_line_do_not_stop_it() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Arc::new(Config {
            allow: Allowlist::from_users([]),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections_per_uid: 4,
            idle_timeout: None,
            exit_idle: None,
            reply_timeout: Duration::from_secs(10),
            ctx: Ctx::new(tmp.path().join("state")),
            signed: None,
        });
        let shared = Arc::new(Shared::new(config));
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (rd, wr) = stream::split_tokio(ours).unwrap();
        let (mut peer_rd, mut peer_wr) = stream::split_tokio(theirs).unwrap();
        let mut conn = Connection::new(rd, wr, shared, 0);
        conn.greeted = true;
        let target = tmp.path().join("next");
        let apply = |id: &str, path: &std::path::Path| {
            let raw = serde_json::json!({"path": path, "content": "x"});
            Request::Apply(ApplyRequest::new(
                StateId::parse(id).unwrap(),
                1,
                parse_state("linux.file", &raw).unwrap().params,
            ))
        };
        // Request 1 has just succeeded; 2 waits behind it, 3 behind 2.
        conn.last = Some((1, true));
        conn.queued.push_back(RequestFrame { id: 2, after: Some(1), request: apply("next", &target) });
        conn.queued.push_back(RequestFrame { id: 3, after: Some(2), request: apply("third", &tmp.path().join("t")) });
        // Meanwhile a status, a withdrawal of 3 and a malformed frame arrived.
        peer_wr.write(&RequestFrame::new(5, Request::Status), DEFAULT_MAX_FRAME).await.unwrap();
        peer_wr.write(&RequestFrame::new(6, Request::Withdraw { target: 3 }), DEFAULT_MAX_FRAME).await.unwrap();
        peer_wr.write(&serde_json::json!({"id": 7, "request": {"type": "nonsense"}}), DEFAULT_MAX_FRAME).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while conn.rx.len() < 3 {
            assert!(Instant::now() < deadline, "the frames never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // What the request loop does between two requests of the line.
        conn.read_arrived().await;
        let RequestFrame { id, after, request } = conn.queued.pop_front().unwrap();
        conn.handle(id, after, request).await;
        assert!(conn.queued.is_empty());
        let mut replies = Vec::new();
        while replies.last().is_none_or(|r: &ReplyFrame| r.id != 2) {
            replies.push(peer_rd.read::<ReplyFrame>(DEFAULT_MAX_FRAME).await.unwrap().unwrap());
        }
        let Some(ReplyFrame { reply: Reply::Outcome(o), .. }) = replies.last() else {
            panic!("request 2 did not run though request 1 succeeded: {replies:?}")
        };
        assert!(o.result && target.exists(), "{o:?}");
    }
}
