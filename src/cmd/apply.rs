//! `opsagent apply`: one round of a recipe file, locally, through the root helper, by the
//! daemon's own round engine ([`Engine::run_local_round`]) with a sink that prints a
//! line per state (or, with `--json`, each StateLog exactly as the daemon would send it).
//! `--test` plans the round instead: what would change, nothing written.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use crate::helper_client::{Fetcher, HelperClient, UnixHelperClient};
use crate::private_helper::{helper_binary, PrivateHelper};
use crate::protocol::StateLog;
use crate::recipe::Recipe;
use crate::round::{Effects, Engine, EngineConfig, Reported, RoundResult, Snapshot, UpdateOrder};
use opsagent_proto::request::Outcome;

/// The recipe `opsagent apply` runs when given no file.
pub const DEMO_RECIPE: &str = include_str!("../../packaging/examples/demo.json");
/// Said before the demo runs, on a terminal.
pub const DEMO_NOTICE: &str = "opsagent apply: no FILE given, so applying the built-in demo recipe: \
a directory /tmp/opsagent-demo/conf, a file app.conf in it, a link /tmp/opsagent-demo/current to it \
and a command that counts the file's settings. Nothing outside /tmp/opsagent-demo changes. Give a \
recipe FILE to apply your own (`opsagent apply --help`).";

/// `opsagent apply --test`: every state was planned and something would change.
/// (0: nothing would change; 1: a state could not be planned, or bad input; 2: a bad
/// configuration, as for every command.)
pub const WOULD_CHANGE_EXIT_CODE: u8 = 3;

/// How the results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per state for a person.
    Lines,
    /// One JSON object per line: a StateLog, exactly as the daemon would report it, or
    /// with `--test` the plan of a state (`id`, `module`, `result`, `changes`, `comment`
    /// and with `--diff` the `diff`).
    Json,
}

pub struct ApplyArgs {
    pub file: Option<PathBuf>,
    pub helper_socket: Option<PathBuf>,
    pub helper_bin: Option<PathBuf>,
    pub prerequisites: bool,
    pub format: Format,
    /// Plan instead of applying (`--test`).
    pub test: bool,
    /// With `test`: show the content diffs the helper gives.
    pub diff: bool,
}

pub fn cmd_apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    // The engine's per-state log lines are the daemon's journal; here the sink prints
    // each state, so they would only say it twice.
    crate::logging::init("warn,opsagent::round=error", "opsagent");
    // The private helper starts first: it gets ready while the recipe is parsed.
    let (mut private, socket) = match args.helper_socket {
        Some(s) => (None, s),
        None => {
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "opsagent apply changes the system through the root helper: run it as root \
                     (it then starts a private helper), or pass --helper-socket PATH of a running helper"
                );
            }
            let (h, s) = PrivateHelper::start(&helper_binary(args.helper_bin)?)?;
            (Some(h), s)
        }
    };
    let recipe = match &args.file {
        Some(f) => Recipe::load_file(f)?,
        None => {
            // Someone at a terminal who typed no FILE may not know what is about to change.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                eprintln!("{DEMO_NOTICE}");
            }
            Recipe::from_document(&serde_json::from_str(DEMO_RECIPE)?)?
        }
    };
    // Downloads as the daemon makes them, for whichever state the helper says needs one
    // (its NeedFetch answer decides, not a list of modules here).
    let fetch_dir = std::env::temp_dir().join(format!("opsagent-apply-fetch-{}", std::process::id()));
    let settings = crate::download::DownloadSettings {
        proxy: crate::net::ProxySettings::from_env(None, None),
        ..crate::download::DownloadSettings::default()
    };
    let client = UnixHelperClient::new(&socket, env!("CARGO_PKG_VERSION")).with_fetcher(Fetcher::lazy(
        settings,
        fetch_dir.clone(),
        1 << 30,
    )?);
    // Missing tools installed first, as the daemon does ([agent] install_prerequisites).
    let client = crate::prereq::Prerequisites::new(client, args.prerequisites);
    let rt = super::runtime()?;
    let mode = Mode { format: args.format, test: args.test, diff: args.diff };
    // A task, not the future `block_on` polls: a wake-up of that future (each reply from
    // the helper) goes through the runtime's eventfd and one more `epoll_wait`, a task's
    // through its run queue.
    let result = rt.block_on(async {
        match tokio::spawn(run_round(client, Arc::new(recipe), mode, std::io::stdout())).await {
            Ok(ended) => ended,
            Err(e) => Err(anyhow::anyhow!("the round's task failed: {e}")),
        }
    });
    let _ = std::fs::remove_dir_all(&fetch_dir);
    let ended = result?;
    if ended.result != RoundResult::Completed {
        if let Some(status) = private.as_mut().and_then(PrivateHelper::exited) {
            eprintln!("opsagent: the helper exited ({status}); see its message above");
        }
    }
    Ok(ExitCode::from(ended.exit_code()))
}

/// What the command line asked for.
#[derive(Debug, Clone, Copy)]
struct Mode {
    format: Format,
    test: bool,
    diff: bool,
}

/// How a local round ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ended {
    result: RoundResult,
    test: bool,
    /// Some state would change (a plan) or changed.
    changes: bool,
}

impl Ended {
    fn exit_code(self) -> u8 {
        match (self.result, self.test) {
            (RoundResult::Completed, true) if self.changes => WOULD_CHANGE_EXIT_CODE,
            (RoundResult::Completed, _) => 0,
            _ => 1,
        }
    }
}

/// How long lines may wait in the buffer: a round of quick states is not one `write` per
/// state, and whoever watches still sees each line as soon as a state takes noticeable
/// time.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// What the sink and the caller share: the buffered output, the first write error, the
/// last failed state (0-based index, total) for the closing line and whether any state
/// changed (or would).
struct Shared<W: Write> {
    out: BufWriter<W>,
    error: Option<std::io::Error>,
    last_failed: Option<(usize, usize)>,
    changes: bool,
}

type Out<W> = Arc<Mutex<Shared<W>>>;

fn lock<W: Write>(out: &Out<W>) -> std::sync::MutexGuard<'_, Shared<W>> {
    out.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One round of `recipe` by the round engine, printed to `out`.
async fn run_round<W: Write + Send + 'static>(
    helper: impl HelperClient,
    recipe: Arc<Recipe>,
    mode: Mode,
    out: W,
) -> anyhow::Result<Ended> {
    let out: Out<W> = Arc::new(Mutex::new(Shared {
        out: BufWriter::with_capacity(64 * 1024, out),
        error: None,
        last_failed: None,
        changes: false,
    }));
    let sink = LocalSink { out: out.clone(), mode };
    let resume = Snapshot { version: recipe.version, recipe: recipe.clone(), done: Default::default() };
    // Kept while the round runs: a closed inbox would be a stop.
    let (engine, _handle) = Engine::new(helper, sink, EngineConfig::default(), Some(resume));
    let flusher = {
        let out = out.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_AFTER);
            loop {
                tick.tick().await;
                let mut shared = lock(&out);
                if let Err(e) = shared.out.flush() {
                    shared.error.get_or_insert(e);
                }
            }
        })
    };
    let result = engine.run_local_round(recipe, mode.test).await;
    flusher.abort();
    let mut shared = lock(&out);
    // A plan goes on after a failure: only an applied round leaves states not run.
    if let (RoundResult::Ceased, Some((index, total)), Format::Lines, false) =
        (result, shared.last_failed, mode.format, mode.test)
    {
        if index + 1 < total {
            writeln!(shared.out, "       {} later state(s) not run", total - index - 1)?;
        }
    }
    shared.out.flush()?;
    if let Some(e) = shared.error.take() {
        return Err(e.into());
    }
    Ok(Ended { result, test: mode.test, changes: shared.changes })
}

/// The engine's effects for a local round: results to the output, nothing persisted (a
/// local round is not resumed) and no upgrade (only a backend orders one).
struct LocalSink<W: Write> {
    out: Out<W>,
    mode: Mode,
}

impl<W: Write> LocalSink<W> {
    fn write(&self, text: &str) {
        let mut shared = lock(&self.out);
        if let Err(e) = shared.out.write_all(text.as_bytes()) {
            shared.error.get_or_insert(e);
        }
    }
}

impl<W: Write + Send> Effects for LocalSink<W> {
    // `run_local_round` never idles, so it never plans for drift.
    async fn drift(&mut self, _: crate::round::DriftReport) {}

    fn outcome(&mut self, r: Reported<'_>) {
        let o = r.outcome;
        {
            let mut shared = lock(&self.out);
            if !o.result {
                shared.last_failed = Some((r.index, r.total));
            }
            shared.changes |= o.changed();
        }
        match (self.mode.format, self.mode.test) {
            (Format::Lines, false) => self.write(&line(r)),
            (Format::Lines, true) => self.write(&plan_line(r, self.mode.diff)),
            (Format::Json, true) => {
                let mut plan = serde_json::json!({
                    "id": r.state.id, "module": r.state.module, "result": o.result,
                    "changes": o.changes, "comment": o.comment,
                });
                if self.mode.diff {
                    plan["diff"] = serde_json::json!(o.diff);
                }
                self.write(&format!("{plan}\n"));
            }
            // The StateLog is printed when the engine reports it.
            (Format::Json, false) => {}
        }
    }

    async fn report(&mut self, log: StateLog) {
        if self.mode.format == Format::Json && !self.mode.test {
            match serde_json::to_string(&log) {
                Ok(json) => self.write(&format!("{json}\n")),
                Err(e) => {
                    lock(&self.out).error.get_or_insert(std::io::Error::other(e));
                }
            }
        }
    }

    async fn persist(&mut self, _: &Snapshot) {}

    async fn upgrade(&mut self, _: &UpdateOrder) {}
}

/// A state's line: `ok     [2/5] id  module  what it did`, and on a failure the command's
/// output under it.
fn line(r: Reported<'_>) -> String {
    let o = r.outcome;
    let tag = if o.result { "ok" } else { "FAILED" };
    let mut line = format!("{tag:<6} [{}/{}] {}  {}", r.index + 1, r.total, r.state.id, r.state.module);
    let described = crate::round::describe(o);
    if !described.is_empty() {
        line.push_str(&format!("  {}", described.replace('\n', " ")));
    }
    if o.changes.is_empty() {
        line.push_str("  (no change)");
    }
    line.push('\n');
    if !o.result && !o.stdout.is_empty() {
        line.push_str(&format!("       output: {}\n", o.stdout.trim_end().replace('\n', "\n               ")));
    }
    line
}

/// A state's plan: `ok` (nothing would change), `change` (what would, in the words a real
/// change uses) or `FAILED` (it could not be planned); with `diff` the content diff under
/// it.
fn plan_line(r: Reported<'_>, diff: bool) -> String {
    // Said as a plan even if a helper forgot to mark it: nothing was applied.
    let o = Outcome { planned: true, ..r.outcome.clone() };
    let tag = match (o.result, o.changed()) {
        (false, _) => "FAILED",
        (true, true) => "change",
        (true, false) => "ok",
    };
    let mut line = format!("{tag:<6} [{}/{}] {}  {}", r.index + 1, r.total, r.state.id, r.state.module);
    let described = crate::round::describe(&o);
    if !described.is_empty() {
        line.push_str(&format!("  {}", described.replace('\n', " ")));
    }
    if o.result && !o.changed() {
        line.push_str("  (no change)");
    }
    line.push('\n');
    if let (true, Some(d)) = (diff, &o.diff) {
        for l in d.lines() {
            line.push_str(&format!("       {l}\n"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opsagent_proto::request::{ApplyRequest, Change, HelperStatus};
    use serde_json::json;

    use super::*;
    use crate::helper_client::{Cancel, HelperClientError, SignedState};

    /// A helper that plans: per state id, the changes a plan finds (none when absent) or
    /// a refusal; it records whether anything asked it to act.
    #[derive(Default)]
    struct Planner {
        changes: HashMap<&'static str, Vec<Change>>,
        refuse: Vec<&'static str>,
        acted: Mutex<Vec<String>>,
    }

    impl HelperClient for Planner {
        async fn apply(&self, req: ApplyRequest, _: Cancel) -> Result<Outcome, HelperClientError> {
            let id = req.state_id.to_string();
            if !req.plan {
                self.acted.lock().unwrap().push(id.clone());
            }
            if self.refuse.contains(&id.as_str()) {
                return Ok(Outcome::failed("not allowed by the policy"));
            }
            let changes = self.changes.get(id.as_str()).cloned().unwrap_or_default();
            let diff = (!changes.is_empty()).then(|| "--- old\n+++ new\n-a = 1\n+a = 2".to_string());
            Ok(Outcome { planned: req.plan, changes, diff, ..Outcome::ok("") })
        }
        async fn apply_signed(
            &self,
            req: ApplyRequest,
            _: SignedState,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            self.apply(req, c).await
        }
        async fn status(&self) -> Result<HelperStatus, HelperClientError> {
            Err(HelperClientError::Protocol { path: "test".into(), what: "no status".into() })
        }
    }

    /// A writer the test reads back after the round.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn recipe(states: serde_json::Value) -> Arc<Recipe> {
        Arc::new(Recipe::from_document(&json!({"recipe_version": 4, "state": states})).unwrap())
    }

    fn file(id: &str) -> serde_json::Value {
        json!({"id": id, "module": "linux.file", "parameter": {"path": format!("/srv/{id}"), "content": "a = 2\n"}})
    }

    async fn plan(helper: Planner, states: serde_json::Value, format: Format, diff: bool) -> (Ended, String, Planner) {
        let out = Captured::default();
        let helper = Arc::new(helper);
        let mode = Mode { format, test: true, diff };
        let ended = run_round(Shared2(helper.clone()), recipe(states), mode, out.clone()).await.unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let helper = Arc::try_unwrap(helper).ok().expect("the engine is gone");
        (ended, text, helper)
    }

    /// The engine takes its helper by value; the test keeps a handle to read it back.
    struct Shared2(Arc<Planner>);

    impl HelperClient for Shared2 {
        async fn apply(&self, req: ApplyRequest, c: Cancel) -> Result<Outcome, HelperClientError> {
            self.0.apply(req, c).await
        }
        async fn apply_signed(
            &self,
            req: ApplyRequest,
            s: SignedState,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            self.0.apply_signed(req, s, c).await
        }
        async fn status(&self) -> Result<HelperStatus, HelperClientError> {
            self.0.status().await
        }
    }

    #[tokio::test]
    async fn a_plan_prints_what_would_change_per_state_acts_on_nothing_and_exits_3() {
        let helper =
            Planner { changes: HashMap::from([("s2", vec![Change::new("/srv/s2", "content")])]), ..Planner::default() };
        let (ended, text, helper) = plan(helper, json!([file("s1"), file("s2")]), Format::Lines, true).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ok     [1/2] s1  linux.file  (no change)", "{text}");
        assert_eq!(lines[1], "change [2/2] s2  linux.file  would change: /srv/s2: content", "{text}");
        assert_eq!(&lines[2..], ["       --- old", "       +++ new", "       -a = 1", "       +a = 2"], "{text}");
        assert!(helper.acted.lock().unwrap().is_empty(), "a plan asked the helper to act");
        assert_eq!(ended.exit_code(), WOULD_CHANGE_EXIT_CODE);
    }

    #[tokio::test]
    async fn a_plan_where_nothing_would_change_exits_0_and_diffs_only_when_asked() {
        let (ended, text, _) = plan(Planner::default(), json!([file("s1")]), Format::Lines, false).await;
        assert_eq!(text, "ok     [1/1] s1  linux.file  (no change)\n");
        assert_eq!(ended.exit_code(), 0);
        let helper =
            Planner { changes: HashMap::from([("s1", vec![Change::new("/srv/s1", "content")])]), ..Planner::default() };
        let (_, text, _) = plan(helper, json!([file("s1")]), Format::Lines, false).await;
        assert!(!text.contains("+a = 2"), "{text}");
    }

    #[tokio::test]
    async fn states_after_a_meta_wait_are_planned_as_if_it_were_satisfied_and_say_so() {
        let wait = json!({"id": "w", "module": "meta.wait", "parameter": {"state": "@{c.s1}"}});
        let (ended, text, _) =
            plan(Planner::default(), json!([file("s1"), wait, file("s2")]), Format::Lines, false).await;
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines[0].contains("meta.wait"), "{text}");
        assert!(lines[1].starts_with("ok     [2/3] w  meta.wait  not waited"), "{text}");
        assert!(lines[2].contains("planned as if the meta.wait w were satisfied"), "{text}");
        assert_eq!(ended.exit_code(), 0);
    }

    #[tokio::test]
    async fn a_state_that_cannot_be_planned_fails_the_plan_but_every_state_is_planned() {
        let helper = Planner { refuse: vec!["s1"], ..Planner::default() };
        let (ended, text, _) = plan(helper, json!([file("s1"), file("s2")]), Format::Json, false).await;
        let plans: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(plans.len(), 2, "{text}");
        assert_eq!(plans[0]["result"], false);
        assert_eq!(plans[0]["comment"], "not allowed by the policy");
        assert_eq!((plans[1]["id"].as_str(), plans[1]["result"].as_bool()), (Some("s2"), Some(true)));
        assert_eq!(ended.exit_code(), 1);
    }

    /// Without `--test` a wait fails: no backend can release it.
    #[tokio::test]
    async fn an_applied_meta_wait_fails_saying_it_needs_a_backend() {
        let out = Captured::default();
        let wait = json!({"id": "w", "module": "meta.wait", "parameter": {"state": "@{c.s1}"}});
        let mode = Mode { format: Format::Lines, test: false, diff: false };
        let ended = run_round(Planner::default(), recipe(json!([file("s1"), wait, file("s2")])), mode, out.clone())
            .await
            .unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("FAILED [2/3] w  meta.wait  meta.wait needs a backend"), "{text}");
        assert!(text.ends_with("       1 later state(s) not run\n"), "{text}");
        assert_eq!(ended.exit_code(), 1);
    }
}
