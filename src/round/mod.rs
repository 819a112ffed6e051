//! The round engine: applies the recipe's states in order, forever.
//!
//! Semantics (what operators were promised):
//! - A round runs the states in order, one at a time, each through the helper;
//!   `meta.comment` succeeds without the helper; `meta.wait` blocks until the backend
//!   reports the waited state done.
//! - A state that fails restarts the round from the first state. A state that fails a
//!   second time in the same round makes the round cease; the engine waits the retry
//!   delay (doubling with consecutive ceased rounds, capped) and starts a fresh round.
//! - After a complete round the engine waits the round delay and runs again.
//! - A new recipe (another version) stops the current round at once: the running state
//!   is cancelled (the helper kills its processes) and the new recipe's first round
//!   starts. A header-only update (or `"state": []`) with a new version re-runs the
//!   current states at once under that version, as the original's worker did (kill
//!   with wait, load without states): the running state finishes and is reported, a
//!   running wait is aborted, the wait marks are cleared, the round pause is cancelled
//!   and a new round starts from the first state. The same version again is ignored.
//! - An upgrade order waits for the end of the round, then runs exactly once.
//! - Stop: the running state may finish (bounded by the stop timeout, then cancelled);
//!   "stop after the round" lets the whole round finish first.
//! - `opsagent apply` runs exactly one such round ([`Engine::run_local_round`]), with a
//!   local sink for the StateLogs: what an operator sees locally is what the daemon does.
//!   Without a backend nothing can release a `meta.wait`, so it fails saying so.
//! - `opsagent apply --test` runs that round as a plan: every request asks the helper
//!   what would change (it writes nothing), a `meta.wait` counts as satisfied and the
//!   states after it say so, and a state that cannot be planned does not restart the
//!   round (a plan changes nothing, so a restart would plan the same again): every
//!   state gets its line.
//!
//! The engine does no I/O of its own: the helper is behind [`HelperClient`], everything
//! else (reporting, persisting, upgrading) behind [`Effects`], and time is tokio's clock,
//! so tests run it on a paused clock with fakes.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use opsagent_proto::catalogue::{ModuleParams, Parsed};
use opsagent_proto::request::{ApplyRequest, Outcome, AHEAD_MAX_REQUESTS};
use opsagent_shared::timer::sleep_until_opt;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use crate::cancel::{cancel_pair, Cancel};
use crate::helper_client::{HelperClient, Next, SignedState};
// The drift report is a message body (protocol); the engine makes it and callers knew it here.
use crate::protocol::StateLog;
pub use crate::protocol::{DriftReport, DriftedState};
use crate::recipe::{Recipe, RecipeState};

pub mod api;
pub mod intake;
pub use api::{EngineStatus, Event, LastRound, Liveness, Phase, RoundCounts, StopMode, UpdateOrder};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub round_delay: Duration,
    pub retry_delay: Duration,
    pub retry_delay_max: Duration,
    /// How long a stop waits for the running state before cancelling it.
    pub stop_timeout: Duration,
    /// Between rounds, plan the recipe this long after the last round (and again each
    /// interval) and report what would change: drift. `None`: only on a `PlanRequest`.
    pub drift_interval: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            round_delay: Duration::from_secs(600),
            retry_delay: Duration::from_secs(5),
            retry_delay_max: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(30),
            drift_interval: None,
        }
    }
}

impl EngineConfig {
    /// The wait after the `n`-th consecutive ceased round (n ≥ 1).
    pub fn retry_delay_after(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.retry_delay.saturating_mul(factor).min(self.retry_delay_max)
    }
}

/// What the engine persists so that a restarted daemon resumes offline.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub recipe: Arc<Recipe>,
    pub done: BTreeSet<String>,
}

/// A state's result as the helper gave it, with its place in the round: more than its
/// StateLog says (the list of changes, the module), for a local sink that prints a line
/// per state.
#[derive(Debug, Clone, Copy)]
pub struct Reported<'a> {
    pub state: &'a RecipeState,
    /// 0-based position in the recipe.
    pub index: usize,
    pub total: usize,
    pub outcome: &'a Outcome,
}

/// How one round run by [`Engine::run_local_round`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundResult {
    /// Every state succeeded.
    Completed,
    /// A state failed twice (the round restarted once from the first state): the
    /// states after it did not run.
    Ceased,
    /// Stopped from outside before the end.
    Stopped,
}

/// Every side effect of the engine except the helper.
pub trait Effects: Send {
    /// A state's full outcome, just before its StateLog is reported. The daemon needs only
    /// the StateLog; a local sink says more.
    fn outcome(&mut self, _reported: Reported<'_>) {}
    /// Record a result durably (the spool) and hand it to the link.
    fn report(&mut self, log: StateLog) -> impl Future<Output = ()> + Send;
    /// Persist the recipe and the wait marks.
    fn persist(&mut self, snapshot: &Snapshot) -> impl Future<Output = ()> + Send;
    /// Carry out an upgrade order (may not return if it replaces the process).
    fn upgrade(&mut self, order: &UpdateOrder) -> impl Future<Output = ()> + Send;
    /// A drift plan's report (only when something would change, or the backend asked).
    fn drift(&mut self, report: DriftReport) -> impl Future<Output = ()> + Send;
    /// Results reported but not yet taken by the backend, and the most the spool holds
    /// before it drops the oldest (`None`: no spool, as in `opsagent apply`).
    fn undelivered(&self) -> Option<(usize, usize)> {
        None
    }
}

const TICK: Duration = Duration::from_secs(1);
/// How often a round held back by undelivered results looks at the spool again.
const BACKLOG_POLL: Duration = Duration::from_millis(100);
/// Offline, the longest a round is held back by undelivered results (counted from the
/// end of the last round): enforcement goes on, at a slower pace.
const OFFLINE_HOLD: Duration = Duration::from_secs(300);

enum RoundEnd {
    Completed,
    Ceased,
    Preempted,
    Stopped,
}

enum StateEnd {
    Done(Outcome),
    /// A new recipe arrived; the state was cancelled with this outcome (if it ran).
    Preempted(Option<Outcome>),
    Stopped(Option<Outcome>),
}

enum Interrupt {
    None,
    Preempt,
    /// The same states under a new version: a running state finishes, then a new round.
    Rerun,
    Stop,
}

/// The engine's mutable state, apart from its collaborators (so that the helper's
/// future can borrow the helper while events update this).
struct State {
    recipe: Option<Arc<Recipe>>,
    version: u64,
    next: Option<Arc<Recipe>>,
    done: BTreeSet<String>,
    update: Option<UpdateOrder>,
    stop: Option<StopMode>,
    online: bool,
    /// The offline warning was given for the current spell offline (once, not per round).
    offline_warned: bool,
    /// The link has said whether it is up: until then (a daemon just started, resuming
    /// its persisted recipe while the link connects) "offline" is not known, only likely.
    link_heard: bool,
    ceased: u32,
    /// A `PlanRequest` not yet answered.
    plan_requested: bool,
    /// The next round waits for the backend to take the results of the last ones.
    held_back: bool,
    status: watch::Sender<EngineStatus>,
}

impl State {
    fn snapshot(&self) -> Option<Snapshot> {
        self.recipe.as_ref().map(|r| Snapshot { version: self.version, recipe: r.clone(), done: self.done.clone() })
    }

    /// Takes one event into account; says whether the running work must stop. The
    /// `bool` says whether something worth persisting changed.
    fn absorb(&mut self, ev: Event) -> (Interrupt, bool) {
        match ev {
            Event::Recipe(r) => {
                let current = match (&self.next, &self.recipe) {
                    (Some(next), _) => Some(next.version),
                    (None, Some(_)) => Some(self.version),
                    (None, None) => None,
                };
                if current == Some(r.version) {
                    tracing::debug!(version = r.version, "recipe version already running; ignored");
                    return (Interrupt::None, false);
                }
                tracing::info!(version = r.version, states = r.states.len(), "new recipe");
                self.next = Some(r);
                (Interrupt::Preempt, false)
            }
            Event::VersionOnly(v) => {
                // The states to re-run: those of a recipe still queued, else the current.
                let Some(base) = self.next.clone().or_else(|| self.recipe.clone()) else {
                    tracing::debug!(version = v, "header-only recipe without a recipe to re-run; ignored");
                    return (Interrupt::None, false);
                };
                let current = if self.next.is_some() { base.version } else { self.version };
                if v == current {
                    tracing::debug!(version = v, "recipe version already running; ignored");
                    return (Interrupt::None, false);
                }
                tracing::info!(from = current, to = v, "header-only recipe: the current states re-run from the first");
                let mut again = (*base).clone();
                again.version = v;
                self.next = Some(Arc::new(again));
                (Interrupt::Rerun, false)
            }
            Event::WaitDone { recipe_version, state_ids } => {
                if recipe_version != self.version {
                    tracing::debug!(
                        recipe_version,
                        current = self.version,
                        "wait release for another version; ignored"
                    );
                    return (Interrupt::None, false);
                }
                // Only ids a wait of this recipe can be released by are kept: a backend
                // pushing other ids (a flood) must not grow the marks, which are persisted.
                let before = self.done.len();
                let waited: Vec<String> = state_ids.into_iter().filter(|id| self.is_waited(id)).collect();
                self.done.extend(waited);
                (Interrupt::None, self.done.len() != before)
            }
            Event::PlanRequest => {
                self.plan_requested = true;
                (Interrupt::None, false)
            }
            Event::AgentUpdate(order) => {
                tracing::info!(version = %order.version, "upgrade ordered; it runs when the round ends");
                self.update = Some(order);
                (Interrupt::None, false)
            }
            Event::Stop(mode) => {
                let now = mode == StopMode::AfterState || self.stop == Some(StopMode::AfterState);
                self.stop = Some(if now { StopMode::AfterState } else { StopMode::AfterRound });
                (if now { Interrupt::Stop } else { Interrupt::None }, false)
            }
            Event::Online(up) => {
                self.online = up;
                self.link_heard = true;
                self.offline_warned &= !up;
                self.status.send_modify(|s| s.online = up);
                (Interrupt::None, false)
            }
        }
    }

    /// `id` releases a wait of the current recipe: the wait's own id or one it names.
    fn is_waited(&self, id: &str) -> bool {
        let Some(recipe) = &self.recipe else { return false };
        recipe.states.iter().filter(|s| s.module == "meta.wait").any(|s| {
            s.id == id
                || matches!(s.typed(), Ok(p) if matches!(&p.params, ModuleParams::MetaWait(w)
                    if w.state.as_ref().is_some_and(|refs| refs.0.iter().any(|r| r.state == id || r.raw == id))))
        })
    }

    fn wait_satisfied(&self, state: &RecipeState) -> bool {
        if self.done.contains(&state.id) {
            return true;
        }
        // Without `state`, only a push of the wait's own id (checked above) releases it,
        // as in the original (worker.py `__exec_wait`).
        match state.typed() {
            Ok(p) => match &p.params {
                ModuleParams::MetaWait(w) => w.state.as_ref().is_some_and(|refs| {
                    !refs.0.is_empty()
                        && refs.0.iter().all(|r| self.done.contains(&r.state) || self.done.contains(&r.raw))
                }),
                _ => false,
            },
            Err(_) => false,
        }
    }
}

pub struct Engine<H, E> {
    helper: H,
    effects: E,
    inbox: mpsc::Receiver<Event>,
    cfg: EngineConfig,
    liveness: Liveness,
    st: State,
    /// A round run by `opsagent apply`: no backend (nothing releases a wait, nothing is
    /// "offline").
    local: bool,
    /// Plan, don't act (`opsagent apply --test`).
    plan: bool,
    /// In a plan: the `meta.wait` planned as if satisfied, which the later states' plans
    /// rest on.
    assumed_wait: Option<String>,
    /// The helper states after the running one, in order, typed while it ran and offered
    /// to the helper to go ahead; each used when the round gets to it.
    prepared: VecDeque<Prepared>,
}

/// What a state is to the engine.
// Built once per state and taken apart at once: boxing would add an allocation per state.
#[allow(clippy::large_enum_variant)]
enum Turn {
    Helper(Prepared),
    Comment,
    Wait,
}

/// A helper state's request, typed once.
struct Prepared {
    /// Where it sits: the recipe (by identity), its version, its index, plan or apply.
    recipe: Arc<Recipe>,
    index: usize,
    req: Arc<ApplyRequest>,
    signed: Option<SignedState>,
    warnings: Vec<String>,
}

/// Everything a caller keeps to drive and watch an engine.
pub struct EngineHandle {
    pub events: mpsc::Sender<Event>,
    pub status: watch::Receiver<EngineStatus>,
    pub liveness: Liveness,
}

impl<H: HelperClient, E: Effects> Engine<H, E> {
    /// `resume`: what a previous run persisted; the engine starts applying it at once.
    pub fn new(helper: H, effects: E, cfg: EngineConfig, resume: Option<Snapshot>) -> (Self, EngineHandle) {
        let (tx, inbox) = mpsc::channel(64);
        let (status_tx, status) = watch::channel(EngineStatus::default());
        let liveness = Liveness::default();
        let mut st = State {
            recipe: None,
            version: 0,
            next: None,
            done: BTreeSet::new(),
            update: None,
            stop: None,
            online: false,
            offline_warned: false,
            link_heard: false,
            held_back: false,
            ceased: 0,
            plan_requested: false,
            status: status_tx,
        };
        if let Some(s) = resume {
            st.version = s.version;
            st.done = s.done;
            st.recipe = Some(s.recipe);
            st.status.send_modify(|x| x.recipe_version = Some(s.version));
        }
        let engine = Self {
            helper,
            effects,
            inbox,
            cfg,
            liveness: liveness.clone(),
            st,
            local: false,
            plan: false,
            assumed_wait: None,
            prepared: VecDeque::new(),
        };
        (engine, EngineHandle { events: tx, status, liveness })
    }

    fn set_phase(&self, phase: Phase) {
        self.st.status.send_modify(|s| s.phase = phase);
    }

    async fn persist(&mut self) {
        if let Some(snap) = self.st.snapshot() {
            self.effects.persist(&snap).await;
        }
    }

    /// Waits for the next event while ticking the liveness; `None` when every sender is
    /// gone (treated as a stop).
    async fn next_event(&mut self) -> Option<Event> {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                ev = self.inbox.recv() => return ev,
                _ = tick.tick() => self.liveness.touch(),
            }
        }
    }

    async fn absorb(&mut self, ev: Option<Event>) -> Interrupt {
        let Some(ev) = ev else {
            self.st.stop = Some(StopMode::AfterState);
            return Interrupt::Stop;
        };
        let (interrupt, changed) = self.st.absorb(ev);
        if changed {
            self.persist().await;
        }
        interrupt
    }

    /// Runs until stopped.
    pub async fn run(mut self) {
        self.liveness.touch();
        loop {
            if self.st.stop.is_some() {
                break;
            }
            if let Some(next) = self.st.next.take() {
                self.st.version = next.version;
                self.st.recipe = Some(next);
                self.st.done.clear();
                self.st.ceased = 0;
                let v = self.st.version;
                self.st.status.send_modify(|s| s.recipe_version = Some(v));
                self.persist().await;
            }
            if self.st.recipe.is_none() {
                self.set_phase(Phase::NoRecipe);
                let ev = self.next_event().await;
                self.absorb(ev).await;
                continue;
            }
            let started = Instant::now();
            let end = self.run_round().await;
            let completed = matches!(end, RoundEnd::Completed);
            let pause = match end {
                RoundEnd::Preempted => continue,
                RoundEnd::Stopped => break,
                RoundEnd::Completed => {
                    self.st.ceased = 0;
                    self.cfg.round_delay
                }
                RoundEnd::Ceased => {
                    self.st.ceased += 1;
                    self.cfg.retry_delay_after(self.st.ceased)
                }
            };
            let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.st.status.send_modify(|s| {
                if completed {
                    s.rounds_completed += 1;
                } else {
                    s.rounds_ceased += 1;
                }
                s.last_round = Some(LastRound { round: s.round, completed, states: s.current, duration_ms });
            });
            if self.st.stop == Some(StopMode::AfterRound) {
                break;
            }
            self.run_pending_upgrade().await;
            self.idle(pause).await;
        }
        // A state the helper started ahead, just as the round stopped, ends first.
        self.helper.drain().await;
        self.set_phase(Phase::Stopped);
        tracing::info!("round engine stopped");
    }

    /// Runs one round of `recipe` and returns how it ended: `opsagent apply`. The same
    /// round as [`Engine::run`] runs (a failure restarts it once from the first state),
    /// but without a backend: a `meta.wait` fails, saying that it needs one, and the
    /// StateLogs are not marked offline. Events still count (a stop ends the round as it
    /// would the daemon's); the caller keeps the handle's sender while it runs.
    ///
    /// With `plan`, the round asks what would change instead (see the module's notes);
    /// it ends `Ceased` when a state could not be planned.
    pub async fn run_local_round(mut self, recipe: Arc<Recipe>, plan: bool) -> RoundResult {
        self.local = true;
        self.plan = plan;
        self.st.version = recipe.version;
        self.st.recipe = Some(recipe);
        self.st.status.send_modify(|s| s.recipe_version = Some(self.st.version));
        self.liveness.touch();
        let result = match self.run_round().await {
            RoundEnd::Completed => RoundResult::Completed,
            RoundEnd::Ceased => RoundResult::Ceased,
            RoundEnd::Preempted | RoundEnd::Stopped => RoundResult::Stopped,
        };
        self.helper.drain().await;
        self.set_phase(Phase::Stopped);
        result
    }

    async fn run_pending_upgrade(&mut self) {
        if let Some(order) = self.st.update.take() {
            // The upgrade restarts the daemon: nothing of the round may be left running.
            self.helper.drain().await;
            self.set_phase(Phase::Upgrading { version: order.version.clone() });
            self.effects.upgrade(&order).await;
        }
    }

    /// Waits `pause` between rounds, taking events: a new recipe or a stop ends the
    /// wait at once, an upgrade order runs at once (no round is running).
    async fn idle(&mut self, pause: Duration) {
        if pause.is_zero() {
            // Rounds back to back (`round_delay = 0`): a round whose states all answer at
            // once never waits on anything, so give the rest of the runtime (the link,
            // the watchdog) its turn between two rounds.
            tokio::task::yield_now().await;
        }
        let idle_since = Instant::now();
        let mut deadline = idle_since + pause;
        let idle_phase = |this: &Self, deadline: Instant| {
            let secs = deadline.saturating_duration_since(Instant::now()).as_secs();
            this.set_phase(if this.st.ceased > 0 {
                Phase::RetryWait { next_round_in_s: secs, ceased: this.st.ceased }
            } else {
                Phase::Idle { next_round_in_s: secs }
            });
        };
        idle_phase(self, deadline);
        let mut next_drift = self.cfg.drift_interval.map(|d| Instant::now() + d);
        let mut tick = tokio::time::interval(TICK);
        loop {
            if self.st.plan_requested || next_drift.is_some_and(|t| t <= Instant::now()) {
                let asked = std::mem::take(&mut self.st.plan_requested);
                if !self.plan_drift(asked).await {
                    // A new recipe or a stop came during the plan.
                    return;
                }
                if self.st.stop.is_some() {
                    return;
                }
                self.run_pending_upgrade().await;
                next_drift = self.cfg.drift_interval.map(|d| Instant::now() + d);
                idle_phase(self, deadline);
                continue;
            }
            tokio::select! {
                _ = sleep_until(deadline) => {
                    if !self.held_back(idle_since) {
                        return;
                    }
                    deadline = Instant::now() + BACKLOG_POLL;
                }
                _ = sleep_until_opt(next_drift) => {}
                ev = self.inbox.recv() => {
                    match self.absorb(ev).await {
                        Interrupt::None => {}
                        Interrupt::Preempt | Interrupt::Rerun | Interrupt::Stop => return,
                    }
                    if self.st.stop == Some(StopMode::AfterRound) {
                        return;
                    }
                    self.run_pending_upgrade().await;
                }
                _ = tick.tick() => self.liveness.touch(),
            }
        }
    }

    /// Whether the next round waits for the backend to take the results already made.
    /// Rounds can make StateLogs faster than the backend takes them (rounds back to back,
    /// a loaded backend, a backend restarting); unchecked, the spool fills and drops the
    /// oldest undelivered ones. So a round does not start with the spool over half full,
    /// and waits until the backend has taken it down to a quarter (events are still taken
    /// meanwhile). Offline, a round is held back [`OFFLINE_HOLD`] at most: applying the
    /// recipe matters more than old results, and the spool's bound says what it drops.
    fn held_back(&mut self, idle_since: Instant) -> bool {
        let Some((undelivered, capacity)) = self.effects.undelivered() else { return false };
        if self.local {
            return false;
        }
        let was = self.st.held_back;
        let over = if was { undelivered > capacity / 4 } else { undelivered > capacity / 2 };
        self.st.held_back = over && (self.st.online || idle_since.elapsed() < OFFLINE_HOLD);
        if self.st.held_back && !was {
            tracing::info!(
                undelivered,
                "the backend takes results slower than rounds make them: the next round waits until it has taken most of them"
            );
        } else if was && !self.st.held_back {
            tracing::info!(undelivered, "the backend has caught up: rounds go on");
        }
        self.st.held_back
    }

    /// Plans every state of the current recipe (changing nothing) and reports those that
    /// would change; `asked`: report even when nothing would. Returns `false` when an
    /// event (a new recipe, a stop) cut the plan short; nothing is reported then.
    async fn plan_drift(&mut self, asked: bool) -> bool {
        let Some(recipe) = self.st.recipe.clone() else {
            return true;
        };
        self.plan = true;
        self.assumed_wait = None;
        let total = recipe.states.len();
        let mut states = Vec::new();
        let mut finished = true;
        for (i, state) in recipe.states.iter().enumerate() {
            match self.run_state(state, i, total).await {
                StateEnd::Done(o) => {
                    // A state that could not be planned has not drifted: it is said by
                    // the next round, which applies it.
                    if o.result && o.planned && !o.changes.is_empty() {
                        let changes = o.changes.iter().map(ToString::to_string).collect();
                        states.push(DriftedState { id: state.id.clone(), changes });
                    } else if !o.result {
                        tracing::debug!(state_id = %state.id, comment = %o.comment, "state not planned for drift");
                    }
                }
                StateEnd::Preempted(_) | StateEnd::Stopped(_) => {
                    finished = false;
                    break;
                }
            }
        }
        self.plan = false;
        self.assumed_wait = None;
        if finished && (asked || !states.is_empty()) {
            self.effects.drift(DriftReport { recipe_version: self.st.version, states }).await;
        }
        finished
    }

    async fn run_round(&mut self) -> RoundEnd {
        let Some(recipe) = self.st.recipe.clone() else {
            return RoundEnd::Completed;
        };
        self.st.status.send_modify(|s| {
            s.round += 1;
            s.current = RoundCounts::default();
        });
        let round = self.st.status.borrow().round;
        let total = recipe.states.len();
        self.prepared.clear();
        tracing::info!(recipe_version = self.st.version, round, states = total, "round starts");
        if !self.st.online && self.st.link_heard && !self.local && !self.st.offline_warned {
            self.st.offline_warned = true;
            tracing::warn!(
                recipe_version = self.st.version,
                round,
                "backend unreachable: applying the last known recipe offline; results are spooled"
            );
        }
        let mut failed_once = BTreeSet::new();
        let mut plan_failed = false;
        let mut i = 0;
        while i < total {
            let state = &recipe.states[i];
            let end = self.run_state(state, i, total).await;
            let outcome = match end {
                StateEnd::Done(o) => o,
                StateEnd::Preempted(o) => {
                    if let Some(o) = o {
                        self.report(state, i, total, o).await;
                    }
                    return RoundEnd::Preempted;
                }
                StateEnd::Stopped(o) => {
                    if let Some(o) = o {
                        self.report(state, i, total, o).await;
                    }
                    return RoundEnd::Stopped;
                }
            };
            let ok = outcome.result;
            self.report(state, i, total, outcome).await;
            if self.st.stop == Some(StopMode::AfterState) {
                return RoundEnd::Stopped;
            }
            if ok {
                i += 1;
            } else if self.plan {
                // Nothing changed, so planning again from the first state would say the
                // same; the remaining states are planned and the round counts as ceased.
                plan_failed = true;
                i += 1;
            } else if failed_once.insert(i) {
                tracing::warn!(state_id = %state.id, round, "state failed; the round restarts from the first state");
                i = 0;
            } else {
                tracing::warn!(message_id = opsagent_logline::catalog::ROUND_CEASED, state_id = %state.id, round, "state failed again; the round ceases");
                return RoundEnd::Ceased;
            }
        }
        if plan_failed {
            return RoundEnd::Ceased;
        }
        tracing::info!(recipe_version = self.st.version, round, "round complete");
        RoundEnd::Completed
    }

    async fn report(&mut self, state: &RecipeState, index: usize, total: usize, outcome: Outcome) {
        let log = statelog(self.st.version, state, &outcome, !self.st.online && !self.local);
        let round = self.st.status.borrow().round;
        if outcome.result {
            tracing::info!(
                recipe_version = self.st.version, round, state_id = %state.id, module = %state.module,
                result = outcome.result, changes = outcome.changes.len(), "state applied"
            );
        } else {
            tracing::warn!(
                message_id = opsagent_logline::catalog::STATE_FAILED,
                recipe_version = self.st.version, round, state_id = %state.id, module = %state.module,
                result = outcome.result, comment = %outcome.comment, "state failed"
            );
        }
        let changed = !outcome.changes.is_empty();
        self.st.status.send_modify(|s| {
            s.last = Some((state.id.to_string(), outcome.result));
            if outcome.result {
                s.current.ok += 1;
            } else {
                s.current.failed += 1;
            }
            s.current.changed += u64::from(changed);
        });
        self.effects.outcome(Reported { state, index, total, outcome: &outcome });
        self.effects.report(log).await;
    }

    async fn run_state(&mut self, state: &RecipeState, index: usize, total: usize) -> StateEnd {
        self.liveness.touch();
        let prepared = match self.prepared.pop_front().filter(|p| p.index == index && self.is_current(p)) {
            Some(p) => p,
            None => {
                // Typed for another turn (a restarted round, a new recipe): none of them
                // follows this state.
                self.prepared.clear();
                match self.prepare(state, index) {
                    Ok(Turn::Helper(p)) => p,
                    Ok(Turn::Comment) => return StateEnd::Done(Outcome::ok("comment")),
                    Ok(Turn::Wait) => return self.run_wait(state, index, total).await,
                    Err(reason) => return StateEnd::Done(Outcome::failed(reason)),
                }
            }
        };
        self.set_phase(Phase::Applying {
            index: index + 1,
            total,
            state_id: state.id.to_string(),
            module: state.module.clone(),
        });
        // The states after it, as far as they go to the helper, are offered to go ahead of
        // the round.
        self.prepare_ahead(index);
        let ahead = self.prepared.iter().map(|p| (Arc::clone(&p.req), p.signed.clone())).collect();
        let Prepared { req, signed, warnings, .. } = prepared;
        // Its own copy by now: the copies offered ahead were dropped with their turns.
        let end = self.run_helper(Arc::unwrap_or_clone(req), signed, ahead).await;
        match end {
            StateEnd::Done(mut o) => {
                for w in &warnings {
                    o.comment = join_comment(&o.comment, &format!("warning: {w}"));
                }
                if let Some(wait) = &self.assumed_wait {
                    o.comment = join_comment(&o.comment, &format!("planned as if the meta.wait {wait} were satisfied"));
                }
                StateEnd::Done(o)
            }
            other => other,
        }
    }

    /// What state `index` (`state`) of the current recipe is to the engine; `Err` for
    /// one that cannot run. Typed now, for this turn only (the recipe holds each state
    /// once, as text).
    fn prepare(&self, state: &RecipeState, index: usize) -> Result<Turn, String> {
        let (id, Parsed { params, warnings }) = state.runnable()?;
        let recipe = match params {
            ModuleParams::MetaComment(_) => return Ok(Turn::Comment),
            ModuleParams::MetaWait(_) => return Ok(Turn::Wait),
            _ => match self.st.recipe.clone() {
                Some(r) => r,
                None => return Err("no recipe".into()),
            },
        };
        let mut req = ApplyRequest::new(id, self.st.version, params);
        req.plan = self.plan;
        // A signed recipe: the helper may run its own verified copy of this state.
        let signed = recipe.signed.clone().and_then(|upload| {
            Some(SignedState { upload, version: recipe.version, index: u32::try_from(index).ok()? })
        });
        Ok(Turn::Helper(Prepared { recipe, index, req: Arc::new(req), signed, warnings }))
    }

    /// Types the helper states after state `index`, up to `AHEAD_MAX_REQUESTS` of them,
    /// stopping at the first that is not one (a comment, a wait, a state that cannot run).
    fn prepare_ahead(&mut self, index: usize) {
        let Some(recipe) = self.st.recipe.clone() else { return };
        while self.prepared.len() < AHEAD_MAX_REQUESTS {
            let at = index + 1 + self.prepared.len();
            match recipe.states.get(at).map(|s| self.prepare(s, at)) {
                Some(Ok(Turn::Helper(p))) => self.prepared.push_back(p),
                _ => break,
            }
        }
    }

    /// `p` was prepared for the recipe, version and mode the round runs now.
    fn is_current(&self, p: &Prepared) -> bool {
        self.st.recipe.as_ref().is_some_and(|r| Arc::ptr_eq(r, &p.recipe))
            && p.req.recipe_version == self.st.version
            && p.req.plan == self.plan
    }

    /// Runs a state in the helper. `ahead`: the states after it, which the helper may
    /// start each as soon as the one before succeeds; withdrawn if a new recipe or a stop
    /// arrives meanwhile.
    async fn run_helper(
        &mut self,
        req: ApplyRequest,
        signed: Option<SignedState>,
        ahead: Vec<(Arc<ApplyRequest>, Option<SignedState>)>,
    ) -> StateEnd {
        let (handle, cancel): (_, Cancel) = cancel_pair();
        let (withdraw_handle, withdraw): (_, Cancel) = cancel_pair();
        let ahead = ahead.into_iter().map(|(req, signed)| Next { req, signed, withdraw: withdraw.clone() }).collect();
        let helper = &self.helper;
        let fut = helper.apply_then(req, signed, ahead, cancel);
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(TICK);
        let mut stop_deadline: Option<Instant> = None;
        let mut cancel_sent = false;
        let mut preempted = false;
        let mut rerun = false;
        let mut inbox_open = true;
        loop {
            tokio::select! {
                r = &mut fut => {
                    let o = r.unwrap_or_else(|e| Outcome::failed(format!("helper: {e}")));
                    return if preempted {
                        StateEnd::Preempted(Some(cancelled(o, "a new recipe arrived")))
                    } else if cancel_sent {
                        StateEnd::Stopped(Some(cancelled(o, "the agent is stopping")))
                    } else if rerun {
                        // Finished, reported as it is; the round then starts again.
                        StateEnd::Preempted(Some(o))
                    } else {
                        StateEnd::Done(o)
                    };
                }
                ev = self.inbox.recv(), if inbox_open && !preempted => {
                    let interrupt = match ev {
                        None => {
                            inbox_open = false;
                            self.st.stop = Some(StopMode::AfterState);
                            Interrupt::Stop
                        }
                        Some(ev) => {
                            let (interrupt, changed) = self.st.absorb(ev);
                            if changed {
                                if let Some(snap) = self.st.snapshot() {
                                    self.effects.persist(&snap).await;
                                }
                            }
                            interrupt
                        }
                    };
                    // The round will not go on to the next state: not ahead either.
                    if !matches!(interrupt, Interrupt::None) {
                        withdraw_handle.cancel();
                    }
                    match interrupt {
                        Interrupt::None => {}
                        Interrupt::Preempt => {
                            handle.cancel();
                            preempted = true;
                        }
                        Interrupt::Rerun => rerun = true,
                        Interrupt::Stop => {
                            stop_deadline.get_or_insert(Instant::now() + self.cfg.stop_timeout);
                        }
                    }
                }
                _ = sleep_until_opt(stop_deadline), if !cancel_sent && !preempted => {
                    tracing::warn!("stop timeout reached; cancelling the running state");
                    handle.cancel();
                    cancel_sent = true;
                }
                _ = tick.tick() => self.liveness.touch(),
            }
        }
    }

    async fn run_wait(&mut self, state: &RecipeState, index: usize, total: usize) -> StateEnd {
        if self.plan && !self.st.wait_satisfied(state) {
            // A plan runs without the backend that would release the wait; what comes
            // after it is planned as if it were released, and says so.
            self.assumed_wait = Some(state.id.clone());
            return StateEnd::Done(Outcome {
                planned: true,
                ..Outcome::ok("not waited: the states after it are planned as if the waited states were done")
            });
        }
        if self.local && !self.st.wait_satisfied(state) {
            return StateEnd::Done(Outcome::failed(
                "meta.wait needs a backend to report the waited states (use opsagent run)",
            ));
        }
        self.set_phase(Phase::Waiting { index: index + 1, total, state_id: state.id.to_string() });
        loop {
            if self.st.wait_satisfied(state) {
                return StateEnd::Done(Outcome::ok("waited states are done"));
            }
            let ev = self.next_event().await;
            match self.absorb(ev).await {
                Interrupt::None => {}
                Interrupt::Preempt => {
                    return StateEnd::Preempted(Some(Outcome::failed("wait aborted: a new recipe arrived")))
                }
                Interrupt::Rerun => {
                    return StateEnd::Preempted(Some(Outcome::failed(
                        "wait aborted: a new recipe version re-runs the recipe from the first state",
                    )))
                }
                Interrupt::Stop => {
                    return StateEnd::Stopped(Some(Outcome::failed("wait aborted: the agent is stopping")))
                }
            }
        }
    }
}

fn cancelled(mut o: Outcome, why: &str) -> Outcome {
    o.result = false;
    o.cancelled = true;
    o.comment = join_comment(&format!("cancelled: {why}"), &o.comment);
    o
}

fn join_comment(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}; {b}"),
    }
}

/// What a state did, for a person: the helper's comment, then `changed: …` listing each
/// change once (`would change: …` for a plan). Modules often say a change in their
/// comment too; a comment part that only repeats a change is dropped, so that each change
/// is said once.
pub fn describe(o: &Outcome) -> String {
    let heading = if o.planned { "would change" } else { "changed" };
    let list: Vec<String> = o.changes.iter().map(ToString::to_string).collect();
    let repeats = |part: &str| o.changes.iter().zip(&list).any(|(c, full)| part == c.what || part == full);
    let said: Vec<&str> = o.comment.split("; ").filter(|part| !part.is_empty() && !repeats(part)).collect();
    let comment = said.join("; ");
    if list.is_empty() {
        comment
    } else {
        join_comment(&comment, &format!("{heading}: {}", list.join(", ")))
    }
}

/// The StateLog of one state: the comment says what changed.
pub fn statelog(version: u64, state: &RecipeState, o: &Outcome, offline: bool) -> StateLog {
    let comment = describe(o);
    StateLog {
        recipe_version: version,
        state_id: state.id.to_string(),
        result: o.result,
        comment: (!comment.is_empty()).then_some(comment),
        stdout: (!o.stdout.is_empty()).then(|| o.stdout.clone()),
        seq: None,
        offline,
        // The wall clock now, as it is (stepped or not): what the host believed when the
        // state ran; the engine's own timing stays on the monotonic clock.
        ran_at: Some(crate::timefmt::rfc3339(std::time::SystemTime::now())),
    }
}

#[cfg(test)]
mod tests;
