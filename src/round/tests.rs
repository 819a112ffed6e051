//! The round engine on a paused clock, with a scripted fake helper: no test sleeps on
//! real time, every timing below is exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opsagent_proto::request::{Change, HelperStatus};
use serde_json::json;

use super::*;
use crate::helper_client::{HelperClientError, Next, SignedState};

#[derive(Clone, Debug)]
enum Act {
    Ok,
    Fail,
    /// Takes this long, then succeeds (or reports cancelled if cancelled first).
    Slow(Duration),
    /// Runs until cancelled.
    Hang,
}

#[derive(Clone, Default)]
struct FakeHelper {
    /// Per state id, the behaviours of successive calls (the last one repeats).
    script: Arc<Mutex<HashMap<String, Vec<Act>>>>,
    calls: Arc<Mutex<Vec<(String, u64, Instant)>>>,
    cancels: Arc<Mutex<Vec<String>>>,
    /// Plans asked (state ids), and the states a plan says would change.
    plans: Arc<Mutex<Vec<String>>>,
    drifted: Arc<Mutex<Vec<String>>>,
    /// A plan of this state runs until cancelled.
    plan_hangs: Arc<Mutex<Option<String>>>,
    /// Per state applied: the states offered to go ahead of it, and their withdrawal.
    offered: Arc<Mutex<Vec<Offer>>>,
    /// Calls of `drain` (the engine waits for a state sent ahead before it stops).
    drains: Arc<Mutex<u32>>,
}

/// A state applied, the states offered ahead of it, and their withdrawal token.
type Offer = (String, Vec<String>, Option<Cancel>);

impl FakeHelper {
    fn script(&self, id: &str, acts: &[Act]) {
        self.script.lock().unwrap().insert(id.to_string(), acts.to_vec());
    }

    /// (state, the states offered ahead of the round, whether that offer was withdrawn).
    fn offered(&self) -> Vec<(String, Vec<String>, bool)> {
        let offered = self.offered.lock().unwrap();
        offered.iter().map(|(id, n, w)| (id.clone(), n.clone(), w.as_ref().is_some_and(Cancel::is_cancelled))).collect()
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|c| c.0.clone()).collect()
    }

    fn call_times(&self) -> Vec<(String, Duration)> {
        let calls = self.calls.lock().unwrap();
        let t0 = calls.first().map(|c| c.2).unwrap_or_else(Instant::now);
        calls.iter().map(|c| (c.0.clone(), c.2 - t0)).collect()
    }
}

impl HelperClient for FakeHelper {
    async fn apply(&self, req: ApplyRequest, mut cancel: Cancel) -> Result<Outcome, HelperClientError> {
        let id = req.state_id.to_string();
        if req.plan {
            self.plans.lock().unwrap().push(id.clone());
            if self.plan_hangs.lock().unwrap().as_deref() == Some(id.as_str()) {
                cancel.cancelled().await;
                return Ok(Outcome { cancelled: true, ..Outcome::failed("killed") });
            }
            let changes = if self.drifted.lock().unwrap().contains(&id) {
                vec![Change::new(&id, "mode 0600 -> 0644")]
            } else {
                vec![]
            };
            return Ok(Outcome { planned: true, changes, ..Outcome::ok("planned") });
        }
        self.calls.lock().unwrap().push((id.clone(), req.recipe_version, Instant::now()));
        let act = {
            let mut script = self.script.lock().unwrap();
            match script.get_mut(&id) {
                Some(acts) if acts.len() > 1 => acts.remove(0),
                Some(acts) => acts[0].clone(),
                None => Act::Ok,
            }
        };
        let cancelled = |me: &Self| {
            me.cancels.lock().unwrap().push(id.clone());
            Ok(Outcome { cancelled: true, ..Outcome::failed("killed") })
        };
        match act {
            Act::Ok => Ok(Outcome { changes: vec![Change::new(&id, "applied")], ..Outcome::ok("ok") }),
            Act::Fail => Ok(Outcome::failed("boom")),
            Act::Slow(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => Ok(Outcome::ok("slow ok")),
                    _ = cancel.cancelled() => cancelled(self),
                }
            }
            Act::Hang => {
                cancel.cancelled().await;
                cancelled(self)
            }
        }
    }

    // The engine's choice of signed or not is checked by the daemon's tests; here a
    // signed state is one more state.
    async fn apply_signed(
        &self,
        req: ApplyRequest,
        _: SignedState,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        self.apply(req, cancel).await
    }
    async fn apply_then(
        &self,
        req: ApplyRequest,
        _: Option<SignedState>,
        ahead: Vec<Next>,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        let ids = ahead.iter().map(|n| n.req.state_id.to_string()).collect();
        let withdraw = ahead.first().map(|n| n.withdraw.clone());
        self.offered.lock().unwrap().push((req.state_id.to_string(), ids, withdraw));
        self.apply(req, cancel).await
    }
    async fn drain(&self) {
        *self.drains.lock().unwrap() += 1;
    }
    async fn status(&self) -> Result<HelperStatus, HelperClientError> {
        Ok(HelperStatus {
            helper_version: "fake".into(),
            protocol_version: 1,
            uptime_s: 0,
            running: vec![],
            recipes_verified: false,
            verified_version: None,
        })
    }
}

#[derive(Clone, Default)]
struct FakeEffects {
    logs: Arc<Mutex<Vec<StateLog>>>,
    snapshots: Arc<Mutex<Vec<Snapshot>>>,
    upgrades: Arc<Mutex<Vec<(String, usize)>>>,
    drift: Arc<Mutex<Vec<DriftReport>>>,
    /// What `undelivered` answers (results not taken by the backend, spool capacity).
    undelivered: Arc<Mutex<Option<(usize, usize)>>>,
}

impl FakeEffects {
    fn logs(&self) -> Vec<(String, bool, u64)> {
        self.logs.lock().unwrap().iter().map(|l| (l.state_id.clone(), l.result, l.recipe_version)).collect()
    }
}

impl Effects for FakeEffects {
    async fn report(&mut self, log: StateLog) {
        self.logs.lock().unwrap().push(log);
    }
    async fn persist(&mut self, snapshot: &Snapshot) {
        self.snapshots.lock().unwrap().push(snapshot.clone());
    }
    async fn upgrade(&mut self, order: &UpdateOrder) {
        let n = self.logs.lock().unwrap().len();
        self.upgrades.lock().unwrap().push((order.version.clone(), n));
    }
    async fn drift(&mut self, report: DriftReport) {
        self.drift.lock().unwrap().push(report);
    }
    fn undelivered(&self) -> Option<(usize, usize)> {
        *self.undelivered.lock().unwrap()
    }
}

fn recipe(version: u64, states: serde_json::Value) -> Arc<Recipe> {
    let mut r = Recipe::from_document(&json!({ "state": states })).unwrap();
    r.version = version;
    Arc::new(r)
}

fn file(id: &str) -> serde_json::Value {
    json!({"id": id, "module": "linux.file", "parameter": {"path": format!("/tmp/{id}")}})
}

fn cfg() -> EngineConfig {
    EngineConfig {
        round_delay: Duration::from_secs(600),
        retry_delay: Duration::from_secs(5),
        retry_delay_max: Duration::from_secs(40),
        stop_timeout: Duration::from_secs(30),
        drift_interval: None,
    }
}

struct Rig {
    helper: FakeHelper,
    effects: FakeEffects,
    handle: EngineHandle,
    task: tokio::task::JoinHandle<()>,
}

fn start(resume: Option<Snapshot>) -> Rig {
    let helper = FakeHelper::default();
    let effects = FakeEffects::default();
    let (engine, handle) = Engine::new(helper.clone(), effects.clone(), cfg(), resume);
    let task = tokio::spawn(engine.run());
    Rig { helper, effects, handle, task }
}

impl Rig {
    async fn send(&self, ev: Event) {
        self.handle.events.send(ev).await.unwrap();
        settle().await;
    }
}

/// Lets every task run until all are blocked (on the paused clock, time does not move
/// unless every task is idle, and then only to the next timer).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn states_run_in_order_and_rounds_repeat_after_the_round_delay() {
    let rig = start(None);
    rig.send(Event::Recipe(recipe(7, json!([file("a"), file("b")])))).await;
    assert_eq!(rig.effects.logs(), vec![("a".into(), true, 7), ("b".into(), true, 7)]);
    advance(Duration::from_secs(599)).await;
    assert_eq!(rig.helper.calls().len(), 2, "no round before the round delay");
    advance(Duration::from_secs(2)).await;
    let times = rig.helper.call_times();
    assert_eq!(times.len(), 4);
    assert_eq!(times[2], ("a".into(), Duration::from_secs(600)));
    assert_eq!(rig.handle.status.borrow().rounds_completed, 2);
}

/// `round_delay = 0` (the original's `delay = 0`, and the soak of #22): rounds follow each
/// other at once, and the engine still hears the link between them: a new recipe is taken
/// and a stop ends it.
#[tokio::test(start_paused = true)]
async fn a_round_delay_of_zero_runs_rounds_back_to_back_and_still_takes_events() {
    let rig = start_with(EngineConfig { round_delay: Duration::ZERO, ..cfg() });
    rig.helper.script("a", &[Act::Slow(Duration::from_millis(10))]);
    rig.helper.script("b", &[Act::Slow(Duration::from_millis(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    advance(Duration::from_millis(1000)).await;
    let rounds = rig.handle.status.borrow().rounds_completed;
    assert!((49..=51).contains(&rounds), "20 ms rounds back to back for 1 s: {rounds}");
    let times = rig.helper.call_times();
    assert!(times.windows(2).all(|w| w[1].1 - w[0].1 == Duration::from_millis(10)), "no pause anywhere: {times:?}");
    rig.helper.script("c", &[Act::Slow(Duration::from_millis(10))]);
    rig.send(Event::Recipe(recipe(2, json!([file("c")])))).await;
    advance(Duration::from_millis(100)).await;
    let logs = rig.effects.logs();
    assert!(logs.iter().filter(|l| l.0 == "c" && l.2 == 2).count() >= 9, "the new recipe ran, back to back");
    rig.send(Event::Stop(StopMode::AfterRound)).await;
    advance(Duration::from_millis(20)).await;
    assert!(rig.task.is_finished(), "a stop ends the back-to-back rounds");
}

/// A connected backend slower than the rounds (seen in the 10,000-round soak: rounds back
/// to back made 250 StateLogs/s, the loaded backend took 200/s, and the full spool dropped
/// 27,000): the next round waits, with the spool over half full, until the backend has
/// taken it down to a quarter; offline, for 5 min at most.
#[tokio::test(start_paused = true)]
async fn a_round_waits_while_a_connected_backend_has_not_taken_the_results() {
    let rig = start_with(EngineConfig { round_delay: Duration::from_secs(10), ..cfg() });
    rig.send(Event::Online(true)).await;
    *rig.effects.undelivered.lock().unwrap() = Some((5_001, 10_000));
    rig.send(Event::Recipe(recipe(1, json!([file("a")])))).await;
    assert_eq!(rig.helper.calls().len(), 1);
    advance(Duration::from_secs(30)).await;
    assert_eq!(rig.helper.calls().len(), 1, "over half full: the next round waits past its delay");
    *rig.effects.undelivered.lock().unwrap() = Some((2_600, 10_000));
    advance(Duration::from_secs(5)).await;
    assert_eq!(rig.helper.calls().len(), 1, "it waits until a quarter, not just under half");
    *rig.effects.undelivered.lock().unwrap() = Some((2_500, 10_000));
    advance(Duration::from_millis(150)).await;
    let times = rig.helper.call_times();
    assert_eq!(times.len(), 2, "the round starts once the backend has caught up");
    let at = times[1].1;
    assert!(at >= Duration::from_secs(35) && at <= Duration::from_millis(35_150), "within a poll: {at:?}");
    // Under half full after a round: the delay alone decides.
    advance(Duration::from_secs(10)).await;
    assert_eq!(rig.helper.calls().len(), 3);
    // Offline (a backend restarting, or gone): held back 5 min at most, then rounds go on
    // at that pace whatever the spool holds.
    *rig.effects.undelivered.lock().unwrap() = Some((9_000, 10_000));
    rig.send(Event::Online(false)).await;
    advance(Duration::from_secs(290)).await;
    assert_eq!(rig.helper.calls().len(), 3, "offline, held back too");
    advance(Duration::from_secs(10)).await;
    assert_eq!(rig.helper.calls().len(), 4, "offline, not past 5 min");
    advance(Duration::from_secs(300)).await;
    assert_eq!(rig.helper.calls().len(), 5, "offline, a round every 5 min");
    // Connected again and still full: held back, but a new recipe starts at once.
    rig.send(Event::Online(true)).await;
    advance(Duration::from_secs(600)).await;
    assert_eq!(rig.helper.calls().len(), 5, "connected: held back for as long as it takes");
    rig.send(Event::Recipe(recipe(2, json!([file("b")])))).await;
    assert_eq!(rig.helper.calls(), vec!["a", "a", "a", "a", "a", "b"], "a new recipe is not held back");
}

#[tokio::test(start_paused = true)]
async fn comment_is_skipped_without_the_helper_and_bad_states_fail_with_the_reason() {
    let rig = start(None);
    rig.send(Event::Recipe(recipe(
        1,
        json!([
            {"id": "c", "module": "meta.comment", "parameter": {"comment": "hi"}},
            {"id": "bad", "module": "linux.file", "parameter": {"mode": "0644"}},
        ]),
    )))
    .await;
    let logs = rig.effects.logs.lock().unwrap().clone();
    assert!(rig.helper.calls().is_empty());
    assert_eq!(logs[0].state_id, "c");
    assert!(logs[0].result);
    assert!(!logs[1].result);
    assert!(logs[1].comment.as_deref().unwrap().contains("missing required parameter \"path\""));
}

/// Issue #18 item 3: a recipe with a bad state is taken; the states before it run, the
/// bad one fails with a StateLog carrying its id as sent and naming the problem, and
/// the usual retry rule follows (restart, then cease) as for any failing state.
#[tokio::test(start_paused = true)]
async fn a_bad_state_fails_with_its_own_statelog_and_the_recipe_runs() {
    let rig = start(None);
    rig.send(Event::Recipe(recipe(
        4,
        json!([
            file("a"),
            {"id": "", "module": "linux.file", "parameter": {"path": "/tmp/x"}},
            file("c"),
        ]),
    )))
    .await;
    assert_eq!(rig.helper.calls(), vec!["a", "a"], "the bad state never reaches the helper");
    let logs = rig.effects.logs.lock().unwrap().clone();
    assert_eq!(logs.len(), 4);
    assert_eq!((logs[1].state_id.as_str(), logs[1].result), ("", false));
    assert!(logs[1].comment.as_deref().unwrap().contains("state id \"\" is empty"), "{:?}", logs[1].comment);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::RetryWait { ceased: 1, .. }));
}

#[tokio::test(start_paused = true)]
async fn a_failure_restarts_the_round_and_a_second_failure_ceases_it_with_growing_capped_delays() {
    let rig = start(None);
    rig.helper.script("b", &[Act::Fail]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b"), file("c")])))).await;
    // a, b fails, restart: a, b fails again: ceased.
    assert_eq!(rig.helper.calls(), vec!["a", "b", "a", "b"]);
    // Retry delays: 5, 10, 20, 40, 40 (capped).
    let mut expected_starts = vec![];
    let mut t = Duration::ZERO;
    for d in [5u64, 10, 20, 40, 40] {
        t += Duration::from_secs(d);
        expected_starts.push(t);
    }
    advance(Duration::from_secs(5 + 10 + 20 + 40 + 40 + 1)).await;
    let starts: Vec<Duration> = rig
        .helper
        .call_times()
        .iter()
        .enumerate()
        .filter(|(i, c)| c.0 == "a" && i % 4 == 0)
        .map(|(_, c)| c.1)
        .collect();
    assert_eq!(&starts[1..], &expected_starts[..]);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::RetryWait { ceased: 6, .. }));
    // Once b recovers, the round completes and the next waits the round delay.
    rig.helper.script("b", &[Act::Ok]);
    advance(Duration::from_secs(40)).await;
    assert_eq!(rig.helper.calls().iter().rev().take(3).collect::<Vec<_>>(), vec!["c", "b", "a"]);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::Idle { next_round_in_s: 600 }));
}

#[tokio::test(start_paused = true)]
async fn a_different_state_failing_in_the_retry_restarts_again_but_each_state_only_once() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Ok, Act::Fail, Act::Ok]);
    rig.helper.script("b", &[Act::Fail, Act::Ok]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    // a ok, b fails → restart; a fails → restart; a ok, b ok → complete.
    assert_eq!(rig.helper.calls(), vec!["a", "b", "a", "a", "b"]);
    assert_eq!(rig.handle.status.borrow().rounds_completed, 1);
}

#[tokio::test(start_paused = true)]
async fn meta_wait_blocks_until_the_backend_reports_done_for_this_version() {
    let rig = start(None);
    let r = recipe(
        3,
        json!([file("a"), {"id": "w", "module": "meta.wait", "parameter": {"state": "@{db.state-9}"}}, file("b")]),
    );
    rig.send(Event::Recipe(r)).await;
    assert_eq!(rig.helper.calls(), vec!["a"]);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::Waiting { index: 2, .. }));
    advance(Duration::from_secs(3600)).await;
    assert_eq!(rig.helper.calls(), vec!["a"], "still waiting");
    rig.send(Event::WaitDone { recipe_version: 2, state_ids: vec!["w".into()] }).await;
    assert_eq!(rig.helper.calls(), vec!["a"], "another version's release is ignored");
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: vec!["w".into()] }).await;
    assert_eq!(rig.helper.calls(), vec!["a", "b"]);
    assert_eq!(rig.effects.logs()[1], ("w".into(), true, 3));
    // The mark was persisted with the recipe.
    let snaps = rig.effects.snapshots.lock().unwrap();
    assert!(snaps.last().unwrap().done.contains("w"));
}

#[tokio::test(start_paused = true)]
async fn meta_wait_also_accepts_the_referenced_state_ids() {
    let rig = start(None);
    let r = recipe(
        3,
        json!([{"id": "w", "module": "meta.wait", "parameter": {"state": ["@{db.s1}", "@{web.s2}"]}}, file("b")]),
    );
    rig.send(Event::Recipe(r)).await;
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: vec!["s1".into()] }).await;
    assert!(rig.helper.calls().is_empty(), "one of two references is not enough");
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: vec!["s2".into()] }).await;
    assert_eq!(rig.helper.calls(), vec!["b"]);
}

#[tokio::test(start_paused = true)]
async fn releases_of_ids_no_wait_names_are_not_kept_as_marks() {
    let rig = start(None);
    let r = recipe(3, json!([{"id": "w", "module": "meta.wait", "parameter": {"state": "@{db.s1}"}}, file("b")]));
    rig.send(Event::Recipe(r)).await;
    let flood: Vec<String> = (0..1000).map(|i| format!("flood-{i}")).collect();
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: flood }).await;
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: vec!["s1".into()] }).await;
    assert_eq!(rig.helper.calls(), vec!["b"]);
    let snaps = rig.effects.snapshots.lock().unwrap();
    let done = &snaps.last().unwrap().done;
    assert_eq!(done.iter().collect::<Vec<_>>(), vec!["s1"], "only the waited id is kept and persisted");
}

#[tokio::test(start_paused = true)]
async fn a_new_recipe_cancels_the_running_state_and_starts_at_once() {
    let rig = start(None);
    rig.helper.script("long", &[Act::Hang]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("long"), file("z")])))).await;
    advance(Duration::from_secs(100)).await;
    let before = Instant::now();
    rig.send(Event::Recipe(recipe(2, json!([file("n1"), file("n2")])))).await;
    assert_eq!(Instant::now(), before, "no time passes between the recipe and the new round");
    assert_eq!(*rig.helper.cancels.lock().unwrap(), vec!["long".to_string()]);
    let logs = rig.effects.logs.lock().unwrap().clone();
    let long = logs.iter().find(|l| l.state_id == "long").unwrap();
    assert!(!long.result && long.comment.as_deref().unwrap().starts_with("cancelled: a new recipe arrived"));
    assert_eq!(long.recipe_version, 1);
    assert_eq!(rig.helper.calls(), vec!["a", "long", "n1", "n2"]);
    assert_eq!(rig.effects.logs().last().unwrap(), &("n2".into(), true, 2));
}

#[tokio::test(start_paused = true)]
async fn a_new_recipe_during_a_wait_or_the_round_delay_starts_at_once() {
    let rig = start(None);
    rig.send(Event::Recipe(recipe(1, json!([{"id": "w", "module": "meta.wait", "parameter": {"state": "@{x.y}"}}]))))
        .await;
    rig.send(Event::Recipe(recipe(2, json!([file("a")])))).await;
    assert_eq!(rig.helper.calls(), vec!["a"]);
    assert!(!rig.effects.logs.lock().unwrap()[0].result, "the aborted wait is reported as failed");
    advance(Duration::from_secs(10)).await;
    rig.send(Event::Recipe(recipe(3, json!([file("b")])))).await;
    assert_eq!(rig.helper.calls(), vec!["a", "b"]);
}

/// Issue #18 item 2, worker.py: a header-only RecipeMetadata with a new version kills
/// the execution with `wait=True` (the running state finishes) and loads no states, so
/// the same states run again from the first, at once. The same version is ignored.
#[tokio::test(start_paused = true)]
async fn header_only_update_reruns_the_recipe_at_once_after_the_running_state() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10)), Act::Ok]);
    rig.send(Event::Recipe(recipe(5, json!([file("a"), file("b")])))).await;
    rig.send(Event::VersionOnly(6)).await;
    rig.send(Event::Recipe(recipe(6, json!([file("x")])))).await;
    rig.send(Event::VersionOnly(6)).await;
    advance(Duration::from_secs(10)).await;
    assert_eq!(rig.helper.calls(), vec!["a", "a", "b"], "a finished, then a new round from the first state");
    assert_eq!(rig.effects.logs(), vec![("a".into(), true, 5), ("a".into(), true, 6), ("b".into(), true, 6)]);
    assert!(rig.helper.cancels.lock().unwrap().is_empty(), "the running state was not cut");
    assert_eq!(rig.handle.status.borrow().recipe_version, Some(6));
    assert_eq!(rig.handle.status.borrow().round, 2);
    // b had been offered ahead of the first round; the re-run withdrew that offer.
    assert_eq!(rig.helper.offered()[0], ("a".into(), vec!["b".into()], true));
    assert_eq!(rig.helper.offered()[1], ("a".into(), vec!["b".into()], false));
}

#[tokio::test(start_paused = true)]
async fn header_only_update_cancels_the_pause_and_clears_wait_marks() {
    let rig = start(None);
    let wait = json!({"id": "w", "module": "meta.wait", "parameter": {}});
    rig.send(Event::Recipe(recipe(1, json!([file("a"), wait])))).await;
    rig.send(Event::WaitDone { recipe_version: 1, state_ids: vec!["w".into()] }).await;
    assert_eq!(rig.effects.logs(), vec![("a".into(), true, 1), ("w".into(), true, 1)]);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::Idle { .. }));
    advance(Duration::from_secs(60)).await;
    let before = Instant::now();
    rig.send(Event::VersionOnly(2)).await;
    assert_eq!(Instant::now(), before, "the round pause is cancelled");
    assert_eq!(rig.helper.calls(), vec!["a", "a"]);
    assert!(matches!(rig.handle.status.borrow().phase, Phase::Waiting { index: 2, .. }), "the mark was cleared");
    // The wait runs again under version 2: a push of its own id releases it; a rerun
    // meanwhile aborts it and starts over (marks cleared again).
    rig.send(Event::VersionOnly(3)).await;
    let logs = rig.effects.logs.lock().unwrap().clone();
    let aborted = &logs[3];
    assert_eq!((aborted.state_id.as_str(), aborted.result, aborted.recipe_version), ("w", false, 2));
    assert!(aborted.comment.as_deref().unwrap().contains("re-runs the recipe"));
    rig.send(Event::WaitDone { recipe_version: 3, state_ids: vec!["w".into()] }).await;
    assert_eq!(rig.effects.logs().last().unwrap(), &("w".into(), true, 3));
    let snaps = rig.effects.snapshots.lock().unwrap();
    assert_eq!(snaps.last().unwrap().version, 3);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_order_runs_exactly_once_when_the_round_ends() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    rig.send(Event::AgentUpdate(UpdateOrder { version: "2.0".into(), url: "u".into() })).await;
    assert!(rig.effects.upgrades.lock().unwrap().is_empty(), "not mid-round");
    advance(Duration::from_secs(11)).await;
    assert_eq!(*rig.effects.upgrades.lock().unwrap(), vec![("2.0".to_string(), 2)], "after both states");
    advance(Duration::from_secs(1300)).await;
    assert_eq!(rig.effects.upgrades.lock().unwrap().len(), 1, "exactly once");
    // While idle between rounds an order runs at once.
    rig.send(Event::AgentUpdate(UpdateOrder { version: "3.0".into(), url: "u".into() })).await;
    assert_eq!(rig.effects.upgrades.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn stop_lets_the_running_state_finish() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    rig.send(Event::Stop(StopMode::AfterState)).await;
    advance(Duration::from_secs(11)).await;
    assert!(rig.task.is_finished());
    assert_eq!(rig.effects.logs(), vec![("a".into(), true, 1)]);
    assert!(rig.helper.cancels.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn stop_cancels_a_state_that_outlives_the_stop_timeout() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Hang]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    rig.send(Event::Stop(StopMode::AfterState)).await;
    advance(Duration::from_secs(29)).await;
    assert!(!rig.task.is_finished());
    advance(Duration::from_secs(2)).await;
    assert!(rig.task.is_finished());
    let logs = rig.effects.logs.lock().unwrap().clone();
    assert_eq!(logs.len(), 1);
    assert!(logs[0].comment.as_deref().unwrap().starts_with("cancelled: the agent is stopping"));
}

#[tokio::test(start_paused = true)]
async fn stop_after_round_finishes_the_round() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    rig.send(Event::Stop(StopMode::AfterRound)).await;
    advance(Duration::from_secs(11)).await;
    assert!(rig.task.is_finished());
    assert_eq!(rig.helper.calls(), vec!["a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_recipe_runs_at_once_offline_and_keeps_its_wait_marks() {
    let r = recipe(4, json!([{"id": "w", "module": "meta.wait", "parameter": {"state": "@{x.y}"}}, file("a")]));
    let snap = Snapshot { version: 4, recipe: r, done: ["w".to_string()].into_iter().collect() };
    let rig = start(Some(snap));
    settle().await;
    assert_eq!(rig.helper.calls(), vec!["a"]);
    let logs = rig.effects.logs.lock().unwrap().clone();
    assert!(logs.iter().all(|l| l.offline), "applied while the backend is unreachable");
    rig.send(Event::Online(true)).await;
    // The same version from the backend does not restart anything.
    rig.send(Event::Recipe(recipe(4, json!([file("zzz")])))).await;
    advance(Duration::from_secs(601)).await;
    assert_eq!(rig.helper.calls(), vec!["a", "a"]);
    assert!(!rig.effects.logs.lock().unwrap().last().unwrap().offline);
}

#[tokio::test(start_paused = true)]
async fn liveness_ticks_while_a_long_state_runs() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Hang]);
    rig.send(Event::Recipe(recipe(1, json!([file("a")])))).await;
    advance(Duration::from_secs(120)).await;
    assert!(rig.handle.liveness.age() <= Duration::from_secs(1));
}

#[test]
fn retry_delay_doubles_and_caps() {
    let c = cfg();
    let d: Vec<u64> = (1..=6).map(|n| c.retry_delay_after(n).as_secs()).collect();
    assert_eq!(d, vec![5, 10, 20, 40, 40, 40]);
    assert_eq!(c.retry_delay_after(1000).as_secs(), 40);
}

#[test]
fn describe_says_each_change_once_and_keeps_the_rest_of_the_comment() {
    let change = |what: &str| Change::new("/srv/d", what);
    let mut o = Outcome::ok("directory created (0755 0:0); owner kept");
    o.changes = vec![change("directory created (0755 0:0)")];
    let text = describe(&o);
    assert_eq!(text.matches("directory created").count(), 1, "{text}");
    assert_eq!(text, format!("owner kept; changed: {}", o.changes[0]));
    // No change: the comment as it is; no comment: the changes alone.
    assert_eq!(describe(&Outcome::ok("already there")), "already there");
    let mut bare = Outcome::ok("");
    bare.changes = vec![change("x")];
    assert_eq!(describe(&bare), format!("changed: {}", bare.changes[0]));
}

#[tokio::test(start_paused = true)]
async fn each_ended_round_leaves_its_figures_for_status_and_metrics() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(3))]);
    rig.helper.script("b", &[Act::Fail]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    advance(Duration::from_secs(4)).await;
    advance(Duration::from_secs(4)).await;
    // a (3 s), b fails, restart: a (3 s), b fails again: ceased after 6 s.
    let st = rig.handle.status.borrow().clone();
    assert_eq!((st.rounds_completed, st.rounds_ceased), (0, 1), "{st:?}");
    let last = st.last_round.clone().unwrap();
    assert_eq!(last.round, 1);
    assert!(!last.completed);
    assert_eq!((last.states.ok, last.states.failed), (2, 2), "{last:?}");
    assert_eq!(last.duration_ms, 6_000);
    // The next round succeeds; its figures replace the last one's.
    rig.helper.script("a", &[Act::Ok]);
    rig.helper.script("b", &[Act::Ok]);
    advance(Duration::from_secs(6)).await;
    let st = rig.handle.status.borrow().clone();
    assert_eq!((st.rounds_completed, st.rounds_ceased), (1, 1), "{st:?}");
    let last = st.last_round.unwrap();
    assert_eq!((last.round, last.completed, last.states.ok, last.states.failed, last.duration_ms), (2, true, 2, 0, 0));
}

fn start_with(cfg: EngineConfig) -> Rig {
    let helper = FakeHelper::default();
    let effects = FakeEffects::default();
    let (engine, handle) = Engine::new(helper.clone(), effects.clone(), cfg, None);
    let task = tokio::spawn(engine.run());
    Rig { helper, effects, handle, task }
}

fn drift_state(id: &str) -> DriftedState {
    DriftedState { id: id.into(), changes: vec![format!("{id}: mode 0600 -> 0644")] }
}

#[tokio::test(start_paused = true)]
async fn drift_is_planned_every_interval_between_rounds_and_only_drifted_states_are_reported() {
    let rig = start_with(EngineConfig { drift_interval: Some(Duration::from_secs(100)), ..cfg() });
    rig.send(Event::Recipe(recipe(4, json!([file("a"), file("b")])))).await;
    assert_eq!(rig.helper.calls().len(), 2);
    advance(Duration::from_secs(99)).await;
    assert!(rig.helper.plans.lock().unwrap().is_empty(), "no plan before the interval");
    advance(Duration::from_secs(2)).await;
    assert_eq!(*rig.helper.plans.lock().unwrap(), vec!["a", "b"]);
    assert!(rig.effects.drift.lock().unwrap().is_empty(), "nothing drifted: nothing reported");
    rig.helper.drifted.lock().unwrap().push("b".into());
    advance(Duration::from_secs(100)).await;
    assert_eq!(
        *rig.effects.drift.lock().unwrap(),
        vec![DriftReport { recipe_version: 4, states: vec![drift_state("b")] }]
    );
    assert_eq!(rig.helper.calls().len(), 2, "a plan applies nothing");
    assert_eq!(rig.effects.logs().len(), 2, "a plan sends no StateLog");
    // The round delay is not pushed back by the plans.
    advance(Duration::from_secs(600 - 201)).await;
    assert_eq!(rig.helper.calls().len(), 4);
    assert_eq!(rig.handle.status.borrow().rounds_completed, 2);
    rig.task.abort();
}

#[tokio::test(start_paused = true)]
async fn drift_is_off_by_default_and_a_plan_request_is_answered_at_once_even_without_drift() {
    let rig = start(None);
    rig.send(Event::Recipe(recipe(2, json!([file("a")])))).await;
    advance(Duration::from_secs(500)).await;
    assert!(rig.helper.plans.lock().unwrap().is_empty(), "off by default");
    rig.send(Event::PlanRequest).await;
    assert_eq!(*rig.effects.drift.lock().unwrap(), vec![DriftReport { recipe_version: 2, states: vec![] }]);
    rig.helper.drifted.lock().unwrap().push("a".into());
    rig.send(Event::PlanRequest).await;
    assert_eq!(rig.effects.drift.lock().unwrap()[1].states, vec![drift_state("a")]);
    rig.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_new_recipe_during_a_drift_plan_cuts_it_short_and_its_round_runs() {
    let rig = start_with(EngineConfig { drift_interval: Some(Duration::from_secs(10)), ..cfg() });
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    *rig.helper.plan_hangs.lock().unwrap() = Some("a".into());
    rig.helper.drifted.lock().unwrap().push("b".into());
    advance(Duration::from_secs(11)).await;
    assert_eq!(*rig.helper.plans.lock().unwrap(), vec!["a"]);
    rig.send(Event::Recipe(recipe(2, json!([file("c")])))).await;
    assert!(rig.effects.drift.lock().unwrap().is_empty(), "a plan cut short reports nothing");
    assert_eq!(rig.effects.logs().last().map(|l| (l.0.clone(), l.2)), Some(("c".to_string(), 2)));
    rig.task.abort();
}

/// Pipelining: each helper state is applied with the states after it offered to go
/// ahead, as far as they are helper states (up to a comment or a wait, or the end) and
/// at most `AHEAD_MAX_REQUESTS` of them; the offer stands in an undisturbed round.
#[tokio::test(start_paused = true)]
async fn the_next_helper_states_are_offered_ahead_of_the_round() {
    let rig = start(None);
    let comment = json!({"id": "c", "module": "meta.comment", "parameter": {}});
    rig.send(Event::Recipe(recipe(1, json!([file("a"), comment, file("b"), file("d")])))).await;
    let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rig.helper.offered(),
        vec![("a".into(), vec![], false), ("b".into(), ids(&["d"]), false), ("d".into(), vec![], false)]
    );
    assert_eq!(rig.effects.logs().len(), 4);

    // A longer line: each state offers the next ones, as many as may wait.
    let rig = start(None);
    let names: Vec<String> = (0..AHEAD_MAX_REQUESTS + 4).map(|i| format!("s{i}")).collect();
    let states: Vec<_> = names.iter().map(|n| file(n)).collect();
    rig.send(Event::Recipe(recipe(1, serde_json::Value::Array(states)))).await;
    let offered = rig.helper.offered();
    assert_eq!(offered.len(), names.len());
    for (i, (id, ahead, withdrawn)) in offered.iter().enumerate() {
        let end = (i + 1 + AHEAD_MAX_REQUESTS).min(names.len());
        assert_eq!((id, ahead.as_slice(), *withdrawn), (&names[i], &names[i + 1..end], false));
    }
}

/// A stop or a new recipe while a state runs: the round will not go on to the next
/// state, so the offer to run it ahead is withdrawn (the helper then never starts it).
#[tokio::test(start_paused = true)]
async fn a_stop_or_a_new_recipe_withdraws_the_state_offered_ahead() {
    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    assert_eq!(rig.helper.offered(), vec![("a".into(), vec!["b".into()], false)]);
    rig.send(Event::Recipe(recipe(2, json!([file("x"), file("y")])))).await;
    assert_eq!(rig.helper.offered()[0], ("a".into(), vec!["b".into()], true));
    assert_eq!(rig.helper.offered()[1..], [("x".into(), vec!["y".into()], false), ("y".into(), vec![], false)]);

    let rig = start(None);
    rig.helper.script("a", &[Act::Slow(Duration::from_secs(10))]);
    rig.send(Event::Recipe(recipe(1, json!([file("a"), file("b")])))).await;
    rig.send(Event::Stop(StopMode::AfterState)).await;
    advance(Duration::from_secs(11)).await;
    assert!(rig.task.is_finished());
    assert_eq!(rig.helper.offered(), vec![("a".into(), vec!["b".into()], true)]);
    // Before it stopped, the engine waited for whatever the helper had started ahead.
    assert_eq!(*rig.helper.drains.lock().unwrap(), 1);
}
