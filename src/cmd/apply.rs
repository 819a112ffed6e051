//! `opsagent apply`: one round of a recipe file, locally, through the root helper, by the
//! daemon's own round engine ([`Engine::run_local_round`]) with a sink that prints a
//! line per state (or, with `--json`, each StateLog exactly as the daemon would send it).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use crate::helper_client::{Fetcher, HelperClient, UnixHelperClient};
use crate::private_helper::{helper_binary, PrivateHelper};
use crate::protocol::StateLog;
use crate::recipe::Recipe;
use crate::round::{Effects, Engine, EngineConfig, Reported, RoundResult, Snapshot, UpdateOrder};

/// The recipe `opsagent apply` runs when given no file.
pub const DEMO_RECIPE: &str = include_str!("../../packaging/examples/demo.json");
/// Said before the demo runs, on a terminal.
pub const DEMO_NOTICE: &str = "opsagent apply: no FILE given, so applying the built-in demo recipe: \
a directory /tmp/opsagent-demo/conf, a file app.conf in it, a link /tmp/opsagent-demo/current to it \
and a command that counts the file's settings. Nothing outside /tmp/opsagent-demo changes. Give a \
recipe FILE to apply your own (`opsagent apply --help`).";

/// How the results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per state for a person.
    Lines,
    /// One StateLog per line, as JSON: what the daemon would report.
    StateLogs,
}

pub struct ApplyArgs {
    pub file: Option<PathBuf>,
    pub helper_socket: Option<PathBuf>,
    pub helper_bin: Option<PathBuf>,
    pub prerequisites: bool,
    pub format: Format,
}

pub fn cmd_apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    crate::logging::init("warn", "opsagent");
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
    let downloader = crate::download::Downloader::new(crate::download::DownloadSettings {
        proxy: crate::link::ProxySettings::from_env(None, None),
        ..crate::download::DownloadSettings::default()
    })?;
    let client = UnixHelperClient::new(&socket, env!("CARGO_PKG_VERSION")).with_fetcher(Fetcher::new(
        downloader,
        fetch_dir.clone(),
        1 << 30,
    )?);
    // Missing tools installed first, as the daemon does ([agent] install_prerequisites).
    let client = crate::prereq::Prerequisites::new(client, args.prerequisites);
    let rt = super::runtime()?;
    let result = rt.block_on(async {
        if let Some(helper) = &private {
            // A failure here shows again, with its reason, at the first state.
            if client.status().await.is_ok() {
                helper.share_cpu();
            }
        }
        run_round(client, Arc::new(recipe), args.format, std::io::stdout()).await
    });
    let _ = std::fs::remove_dir_all(&fetch_dir);
    let completed = result? == RoundResult::Completed;
    if !completed {
        if let Some(status) = private.as_mut().and_then(PrivateHelper::exited) {
            eprintln!("opsagent: the helper exited ({status}); see its message above");
        }
    }
    Ok(if completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How long lines may wait in the buffer: a round of quick states is not one `write` per
/// state, and whoever watches still sees each line as soon as a state takes noticeable
/// time.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// What the sink and the caller share: the buffered output, the first write error and
/// the last failed state (0-based index, total) for the closing line.
struct Shared<W: Write> {
    out: BufWriter<W>,
    error: Option<std::io::Error>,
    last_failed: Option<(usize, usize)>,
}

type Out<W> = Arc<Mutex<Shared<W>>>;

fn lock<W: Write>(out: &Out<W>) -> std::sync::MutexGuard<'_, Shared<W>> {
    out.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One round of `recipe` by the round engine, printed to `out`.
async fn run_round<W: Write + Send + 'static>(
    helper: impl HelperClient,
    recipe: Arc<Recipe>,
    format: Format,
    out: W,
) -> anyhow::Result<RoundResult> {
    let out: Out<W> =
        Arc::new(Mutex::new(Shared { out: BufWriter::with_capacity(64 * 1024, out), error: None, last_failed: None }));
    let sink = LocalSink { out: out.clone(), format };
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
    let result = engine.run_local_round(recipe).await;
    flusher.abort();
    let mut shared = lock(&out);
    if let (RoundResult::Ceased, Some((index, total)), Format::Lines) = (result, shared.last_failed, format) {
        if index + 1 < total {
            writeln!(shared.out, "       {} later state(s) not run", total - index - 1)?;
        }
    }
    shared.out.flush()?;
    if let Some(e) = shared.error.take() {
        return Err(e.into());
    }
    Ok(result)
}

/// The engine's effects for a local round: results to the output, nothing persisted (a
/// local round is not resumed) and no upgrade (only a backend orders one).
struct LocalSink<W: Write> {
    out: Out<W>,
    format: Format,
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
    fn outcome(&mut self, r: Reported<'_>) {
        let o = r.outcome;
        if !o.result {
            lock(&self.out).last_failed = Some((r.index, r.total));
        }
        if self.format != Format::Lines {
            return;
        }
        self.write(&line(r));
    }

    async fn report(&mut self, log: StateLog) {
        if self.format == Format::StateLogs {
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
