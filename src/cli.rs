//! The `opsagent` command line: `run` (the daemon), `apply` (one local round through
//! the helper), `check` (validate recipe files), `status`, `stop` and `upgrade`.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};

use clap::{Parser, Subcommand};
use opsagent_proto::request::{ApplyRequest, Outcome};

use crate::config::{Config, ConfigError, Overrides};
use crate::daemon::{self, StatusReport};
use crate::helper_client::{Cancel, HelperClient, UnixHelperClient};
use crate::recipe::{Recipe, RecipeState};

/// The recipe `opsagent apply` runs when given no file.
pub const DEMO_RECIPE: &str = include_str!("../packaging/examples/demo.json");
/// Said before the demo runs, on a terminal.
pub const DEMO_NOTICE: &str = "opsagent apply: no FILE given, so applying the built-in demo recipe: \
a directory /tmp/opsagent-demo/conf, a file app.conf in it, a link /tmp/opsagent-demo/current to it \
and a command that counts the file's settings. Nothing outside /tmp/opsagent-demo changes. Give a \
recipe FILE to apply your own (`opsagent apply --help`).";

/// The parts of opsagent(8) that the command line does not say.
pub const MANUAL: crate::manual::Extra<'static> = crate::manual::Extra {
    description: &[
        "The unprivileged daemon (user opsagent) keeps one WebSocket to the backend, receives the recipe \
         (an ordered list of idempotent states), applies it in rounds through the root helper \
         opsagent-helper(8), and reports every state's result as a StateLog. `opsagent run` is what \
         opsagent.service starts; the other commands are for operators.",
        "Logs go to the journal: journalctl -u opsagent -u opsagent-helper; journalctl -x explains the \
         events that carry a catalog entry (a failed state, a ceased round, an unreachable backend, a \
         failed upgrade, unverified recipes).",
    ],
    files: &[
        (
            "/etc/opsagent.conf",
            "The configuration (`opsagent config-example` prints every key), also read in the original agent's format.",
        ),
        ("/var/lib/opsagent", "The state directory: persisted recipe, StateLog spool, status file, token."),
        ("/etc/opsagent/helper.policy", "What the root helper may do for the daemon; see opsagent-helper(8)."),
    ],
    environment: &[("RUST_LOG", "Log filter, e.g. opsagent=debug.")],
    see_also: &["opsagent-helper(8)", "opsagent-backend(8)", "systemctl(1)", "journalctl(1)"],
};

#[derive(Debug, Parser)]
#[command(name = "opsagent", version, about = "VisualOps configuration agent (systemd-native)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: connect to the backend and apply its recipe in rounds, forever.
    Run {
        /// Configuration file [default: /etc/opsagent.conf if it exists]
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Apply a recipe file once, locally, through the root helper, and print each result.
    /// Without FILE, applies the built-in demo recipe (under /tmp/opsagent-demo).
    Apply {
        file: Option<PathBuf>,
        /// Use the helper listening here instead of starting a private one (needs root).
        #[arg(long, value_name = "PATH")]
        helper_socket: Option<PathBuf>,
        /// The helper binary to start [default: opsagent-helper next to this binary]
        #[arg(long, value_name = "PATH", env = "OPSAGENT_HELPER_BIN")]
        helper_bin: Option<PathBuf>,
        /// Do not install a state's missing tool first (`[agent] install_prerequisites =
        /// false` of the daemon): the state fails naming the package.
        #[arg(long)]
        no_prerequisites: bool,
    },
    /// Check recipe files against the state catalogue; one line per state.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show what the running agent is doing.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's state directory, when it was started with --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Print a fully commented /etc/opsagent.conf with every key and its default.
    ConfigExample,
    /// Upgrade this host's agent by hand (root): download the release and its
    /// signature, then run the same installer as a backend-ordered upgrade (signature
    /// check, switch, restart, health gate, automatic revert).
    Upgrade {
        /// The release archive, e.g. https://releases.example.com/1.3.0/opsagent.tgz;
        /// its signature is URL.minisig.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The release version [default: the URL's parent directory name]
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Download and stage only; `systemctl start opsagent-upgrade` installs it.
        #[arg(long)]
        stage_only: bool,
    },
    /// Stop the running agent (SIGTERM: after the running state), or with
    /// --after-round once the current round has finished (SIGUSR1).
    Stop {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's state directory, when it was started with --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        after_round: bool,
    },
    /// Print a shell completion script: `opsagent completion bash >
    /// /usr/share/bash-completion/completions/opsagent`.
    Completion {
        #[arg(value_parser = ["bash"])]
        shell: String,
    },
    /// Write the manual page opsagent.8 into DIR (used by packaging/build-deb).
    #[command(hide = true)]
    Manual { dir: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, overrides } => cmd_run(config.as_deref(), &overrides),
        Command::Apply { file, helper_socket, helper_bin, no_prerequisites } => {
            cmd_apply(file.as_deref(), helper_socket, helper_bin, !no_prerequisites)
        }
        Command::Check { files } => cmd_check(&files),
        Command::Status { config, state_dir, json } => cmd_status(config.as_deref(), state_dir, json),
        Command::Stop { config, state_dir, after_round } => cmd_stop(config.as_deref(), state_dir, after_round),
        Command::Upgrade { url, version, config, stage_only } => {
            crate::upgrade::cli::cmd_upgrade(&url, version, config.as_deref(), stage_only)
        }
        Command::ConfigExample => {
            print!("{}", crate::config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell: _ } => {
            print!("{}", crate::manual::bash_completion(&<Cli as clap::CommandFactory>::command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Manual { dir } => crate::manual::write_page(&dir, &<Cli as clap::CommandFactory>::command(), &MANUAL)
            .map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("opsagent: error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(ConfigError::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the daemon's work is sequential and mostly waiting; this keeps its
    // footprint small.
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn cmd_run(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(path, overrides)?;
    crate::logging::init(&config.agent.log_level, "opsagent");
    let rt = runtime()?;
    rt.block_on(async {
        if config.require_backend().is_err() {
            fill_from_metadata(&mut config).await;
        }
        daemon::run(config).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Instances installed from userdata may have no config file: read the userdata.
async fn fill_from_metadata(config: &mut Config) {
    let client = match crate::identity::MetadataClient::new(
        &config.userdata.metadata_url,
        crate::identity::RetryPolicy::default(),
    ) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "no metadata client"),
    };
    match client.userdata().await {
        Ok(Some(ud)) => {
            let url = client.userdata_url();
            match crate::identity::fill_from_userdata(config, &ud, &url) {
                Ok(filled) => {
                    tracing::info!(keys = ?filled, "configuration completed from the instance userdata")
                }
                Err(e) => tracing::warn!(error = %e, "instance userdata unusable"),
            }
        }
        Ok(None) => tracing::info!("no instance userdata"),
        Err(e) => tracing::warn!(error = %e, "cannot read the instance userdata"),
    }
}

fn cmd_check(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut all_ok = true;
    let mut out = std::io::stdout().lock();
    for file in files {
        match Recipe::load_file(file) {
            Err(e) => {
                all_ok = false;
                writeln!(out, "INVALID {e}")?;
            }
            Ok(recipe) => {
                for s in &recipe.states {
                    match &s.parsed {
                        Ok(p) if p.warnings.is_empty() => {
                            writeln!(out, "ok      {}  {}  {}", file.display(), s.id, s.module)?
                        }
                        Ok(p) => writeln!(
                            out,
                            "ok      {}  {}  {}  warning: {}",
                            file.display(),
                            s.id,
                            s.module,
                            p.warnings.join("; ")
                        )?,
                        Err(reason) => {
                            all_ok = false;
                            writeln!(out, "INVALID {}  {}  {}  {reason}", file.display(), s.id, s.module)?;
                        }
                    }
                }
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A helper started by `opsagent apply` on a private socket, killed when dropped.
struct PrivateHelper {
    child: Child,
    dir: PathBuf,
}

impl PrivateHelper {
    /// Binds the socket here and hands the listening descriptor to the helper the way
    /// systemd socket activation does (`LISTEN_FDS`), so the socket accepts connections
    /// before the helper has even started: no waiting for a file to appear, and the
    /// caller can do its own start-up (parsing the recipe) while the helper does its.
    fn start(bin: &Path) -> anyhow::Result<(Self, PathBuf)> {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixListener;

        use nix::fcntl::{fcntl, FcntlArg, FdFlag};

        let dir = std::env::temp_dir().join(format!("opsagent-apply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // 0700 and root's: nobody else can reach the socket inside, whatever its mode.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let socket = dir.join("helper.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| anyhow::anyhow!("cannot bind the helper's socket {}: {e}", socket.display()))?;
        // A duplicate without close-on-exec is what the helper inherits; ours (and the
        // duplicate) are closed once it runs, so that the helper holds the only listening
        // descriptor and a helper that dies at start resets our connection instead of
        // leaving it waiting in the backlog.
        let inherited = listener.try_clone()?;
        fcntl(inherited.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        let mut cmd = std::process::Command::new(bin);
        // Root asked for this apply and is the only one who can reach this helper (its
        // socket is in a 0700 root directory), so it keeps root's storage capabilities:
        // without systemd as PID 1, mount(8), lvm2 and mdadm need CAP_SYS_ADMIN and
        // CAP_MKNOD, which the system helper keeps only with its opt-in drop-in.
        cmd.arg("--storage");
        // Local use by root needs no signature (root is already root): the private
        // helper ignores a recipe_key in /etc/opsagent.conf. `--helper-socket` against
        // the system helper follows that helper's rule instead.
        cmd.arg("--no-recipe-key");
        cmd.stdin(std::process::Stdio::null())
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDS_FIRST_FD", inherited.as_raw_fd().to_string())
            // Unset LISTEN_PID is accepted as "for this process" (we cannot know the
            // child's pid before it exists); an inherited one would name another process.
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        // The per-request log lines of a private helper would drown the result lines.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "error");
        }
        let spawned = cmd.spawn();
        drop(inherited);
        drop(listener);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::bail!("cannot start the helper {}: {e}", bin.display());
            }
        };
        Ok((Self { child, dir }, socket))
    }

    /// Puts this process and the helper on the CPU this process runs on. The two hand
    /// every request back and forth and never run at the same time; across CPUs each
    /// hand-over is a wake-up of an idle CPU, which on a busy VM costs more than the
    /// state itself (measured: 8 µs per round trip on one CPU, 40-90 µs across two;
    /// see benches/RESULTS.md). Only once the helper has answered: it notes the CPUs
    /// it started with first, and gives them back to every command it runs. Best
    /// effort: a failure leaves both where the scheduler puts them.
    fn share_cpu(&self) {
        use nix::sched::{sched_getcpu, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;

        let (Ok(cpu), Ok(helper)) = (sched_getcpu(), i32::try_from(self.child.id())) else {
            return;
        };
        let mut one = CpuSet::new();
        if one.set(cpu).is_err() || sched_setaffinity(Pid::from_raw(0), &one).is_err() {
            return;
        }
        if let Err(e) = sched_setaffinity(Pid::from_raw(helper), &one) {
            tracing::debug!(error = %e, "cannot keep the helper on this process's CPU");
        }
    }

    /// How the helper ended, if it has (it only ends early when it cannot start).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for PrivateHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn helper_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("opsagent-helper");
    if !bin.exists() {
        anyhow::bail!(
            "{} not found; build it (cargo build --workspace) or pass --helper-bin / OPSAGENT_HELPER_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

fn cmd_apply(
    file: Option<&Path>,
    helper_socket: Option<PathBuf>,
    helper_bin: Option<PathBuf>,
    prerequisites: bool,
) -> anyhow::Result<ExitCode> {
    crate::logging::init("warn", "opsagent");
    // The private helper starts first: it gets ready while the recipe is parsed.
    let (mut private, socket) = match helper_socket {
        Some(s) => (None, s),
        None => {
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "opsagent apply changes the system through the root helper: run it as root \
                     (it then starts a private helper), or pass --helper-socket PATH of a running helper"
                );
            }
            let (h, s) = PrivateHelper::start(&helper_binary(helper_bin)?)?;
            (Some(h), s)
        }
    };
    let recipe = match file {
        Some(f) => Recipe::load_file(f)?,
        None => {
            // Someone at a terminal who typed no FILE may not know what is about to change.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                eprintln!("{DEMO_NOTICE}");
            }
            Recipe::from_document(&serde_json::from_str(DEMO_RECIPE)?)?
        }
    };
    let mut client = UnixHelperClient::new(&socket, env!("CARGO_PKG_VERSION"));
    // Downloads (common.archive, linux.file remote_uri) as the daemon makes them; the
    // HTTP client is built only for recipes that need it (it costs a few milliseconds).
    let fetch_dir = std::env::temp_dir().join(format!("opsagent-apply-fetch-{}", std::process::id()));
    if recipe.states.iter().any(needs_download) {
        let downloader = crate::download::Downloader::new(crate::download::DownloadSettings {
            proxy: crate::link::ProxySettings::from_env(None, None),
            ..crate::download::DownloadSettings::default()
        })?;
        client = client.with_fetcher(crate::helper_client::Fetcher::new(downloader, fetch_dir.clone(), 1 << 30)?);
    }
    // Missing tools installed first, as the daemon does ([agent] install_prerequisites).
    let client = crate::prereq::Prerequisites::new(client, prerequisites);
    let rt = runtime()?;
    let all_ok = rt.block_on(async {
        if let Some(helper) = &private {
            // A failure here shows again, with its reason, at the first state.
            if client.status().await.is_ok() {
                helper.share_cpu();
            }
        }
        apply_round(&client, &recipe).await
    });
    let _ = std::fs::remove_dir_all(&fetch_dir);
    let all_ok = all_ok?;
    if !all_ok {
        if let Some(status) = private.as_mut().and_then(PrivateHelper::exited) {
            eprintln!("opsagent: the helper exited ({status}); see its message above");
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn needs_download(state: &RecipeState) -> bool {
    use opsagent_proto::catalogue::ModuleParams;
    match state.parsed.as_ref().map(|p| &p.params) {
        Ok(ModuleParams::CommonArchive(_)) => true,
        Ok(ModuleParams::LinuxFile(f)) => f.remote_uri.is_some(),
        // Package files, keys and repository RPMs given as http(s) URLs.
        Ok(ModuleParams::LinuxAptPackage(_) | ModuleParams::LinuxYumPackage(_)) => state_has_url(state),
        Ok(ModuleParams::LinuxRpmKey(_) | ModuleParams::LinuxYumRepo(_)) => state_has_url(state),
        _ => false,
    }
}

fn state_has_url(state: &RecipeState) -> bool {
    state.parsed.as_ref().ok().and_then(|p| serde_json::to_string(&p.params).ok()).is_some_and(|t| {
        let t = t.to_ascii_lowercase();
        t.contains("http://") || t.contains("https://")
    })
}

/// How long a state may run before the lines of the states before it are written out.
/// Lines are buffered so that a round of quick states is not one `write` per state;
/// whoever watches still sees them as soon as a state takes noticeable time.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Runs every state once, in order, stopping at the first failure (as a round would
/// restart there). One line per state.
async fn apply_round(client: &impl HelperClient, recipe: &Recipe) -> anyhow::Result<bool> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let all_ok = apply_states(client, recipe, &mut out).await;
    out.flush()?;
    all_ok
}

async fn apply_states<W: Write>(
    client: &impl HelperClient,
    recipe: &Recipe,
    out: &mut std::io::BufWriter<W>,
) -> anyhow::Result<bool> {
    let total = recipe.states.len();
    for (i, s) in recipe.states.iter().enumerate() {
        let applied = apply_one(client, recipe.version, s);
        let o = if out.buffer().is_empty() {
            applied.await
        } else {
            tokio::pin!(applied);
            tokio::select! {
                biased;
                o = &mut applied => o,
                _ = tokio::time::sleep(FLUSH_AFTER) => {
                    out.flush()?;
                    applied.await
                }
            }
        };
        let tag = if o.result { "ok" } else { "FAILED" };
        let mut line = format!("{tag:<6} [{}/{total}] {}  {}", i + 1, s.id, s.module);
        let described = crate::round::describe(&o);
        if !described.is_empty() {
            line.push_str(&format!("  {}", described.replace('\n', " ")));
        }
        if o.changes.is_empty() {
            line.push_str("  (no change)");
        }
        writeln!(out, "{line}")?;
        if !o.result {
            if !o.stdout.is_empty() {
                writeln!(out, "       output: {}", o.stdout.trim_end().replace('\n', "\n               "))?;
            }
            if i + 1 < total {
                writeln!(out, "       {} later state(s) not run", total - i - 1)?;
            }
            return Ok(false);
        }
    }
    Ok(true)
}

async fn apply_one(client: &impl HelperClient, version: u64, s: &RecipeState) -> Outcome {
    let (id, parsed) = match s.runnable() {
        Ok(ok) => ok,
        Err(reason) => return Outcome::failed(reason),
    };
    if parsed.params.name() == "meta.comment" {
        return Outcome::ok("comment");
    }
    if parsed.params.name() == "meta.wait" {
        return Outcome::failed("meta.wait needs a backend to report the waited states (use opsagent run)");
    }
    let req = ApplyRequest::new(id, version, parsed.params.clone());
    let mut o = client.apply(req, Cancel::never()).await.unwrap_or_else(|e| Outcome::failed(format!("helper: {e}")));
    for w in &parsed.warnings {
        o.comment = if o.comment.is_empty() { format!("warning: {w}") } else { format!("{}; warning: {w}", o.comment) };
    }
    o
}

fn read_status(config: Option<&Path>, state_dir: Option<PathBuf>) -> anyhow::Result<StatusReport> {
    // A state directory named on the command line is the only place to look: the
    // system daemon's /run file must not answer for another daemon.
    let named = state_dir.is_some();
    let cfg = Config::load(config, &Overrides { state_dir, ..Overrides::default() })?;
    let mut candidates = vec![PathBuf::from("/run/opsagent/status.json"), daemon::status_file(&cfg.agent.state_dir)];
    if named {
        candidates.remove(0);
    }
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("the agent is not running (no status file at {})", candidates[0].display()))?;
    let report: StatusReport = serde_json::from_slice(&std::fs::read(path)?)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(report.pid)?);
    if nix::sys::signal::kill(pid, None).is_err() {
        anyhow::bail!("the agent is not running (pid {} in {} is gone)", report.pid, path.display());
    }
    Ok(report)
}

fn cmd_status(config: Option<&Path>, state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let r = read_status(config, state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("opsagent {} (pid {})", r.agent_version, r.pid);
    println!("  instance   {} of app {}", r.instance_id, r.app_id);
    println!("  status     {}", r.summary);
    if let Some(warning) = r.link.get("insecure_transport").and_then(|w| w.as_str()) {
        println!("  WARNING    {warning}");
    }
    if let Some(err) = r.link.get("last_error").and_then(|e| e.as_str()) {
        let at = r.link.get("last_error_unix").and_then(|t| t.as_u64()).map(crate::timefmt::utc);
        println!("  last error {err}{}", at.map(|t| format!(" (at {t})")).unwrap_or_default());
    }
    print_link_details(&r.link);
    if r.recipes_verified {
        println!("  recipes    verified: the helper runs only recipes signed by its recipe_key");
    } else {
        println!("  recipes    NOT verified: the helper has no recipe_key (see \"Signed recipes\" in the README)");
    }
    if let Some(last) = r.engine.get("last").and_then(|l| l.as_array()) {
        if let [id, ok] = last.as_slice() {
            let verdict = if ok.as_bool() == Some(true) { "succeeded" } else { "FAILED" };
            println!("  last state {} {verdict}", id.as_str().unwrap_or("?"));
        }
    }
    println!("  rounds     {} completed", r.engine.get("rounds_completed").and_then(|v| v.as_u64()).unwrap_or(0));
    println!("  spool      {} StateLog(s) waiting, {} dropped", r.spool_depth, r.spool_dropped);
    if r.spool_held > 0 {
        println!("             {} held in memory: the spool cannot grow (filesystem full?)", r.spool_held);
    }
    if let Some(f) = &r.upgrade_failure {
        println!(
            "  upgrade    to {} FAILED (at {}): {}; {} keeps running",
            f.version,
            crate::timefmt::utc(f.at_unix),
            f.reason,
            f.running
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The link's counters, proxy and the backend's extensions, when there is anything to say.
fn print_link_details(link: &serde_json::Value) {
    let n = |k: &str| link.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let mut via = Vec::new();
    if let Some(peer) = link.get("peer").and_then(|v| v.as_str()) {
        via.push(format!("peer {peer}"));
    }
    if let Some(proxy) = link.get("proxy").and_then(|v| v.as_str()) {
        via.push(format!("proxy {proxy}"));
    }
    let caps: Vec<&str> = link
        .get("backend_capabilities")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    via.push(if caps.is_empty() {
        "backend extensions: none".to_string()
    } else {
        format!("backend extensions: {}", caps.join(", "))
    });
    println!("  link       {} connection(s) opened; {}", n("connects"), via.join("; "));
    let refused = n("bad_frames") + n("unknown_frames");
    if refused > 0 {
        println!(
            "  frames     {} refused ({} binary, {} oversized), {} with unknown codes ignored",
            n("bad_frames"),
            n("binary_frames"),
            n("oversized_frames"),
            n("unknown_frames")
        );
    }
}

fn cmd_stop(config: Option<&Path>, state_dir: Option<PathBuf>, after_round: bool) -> anyhow::Result<ExitCode> {
    use nix::sys::signal::{kill, Signal};
    let r = read_status(config, state_dir)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(r.pid)?);
    let sig = if after_round { Signal::SIGUSR1 } else { Signal::SIGTERM };
    kill(pid, sig)?;
    println!(
        "asked opsagent (pid {}) to stop {}",
        r.pid,
        if after_round { "after the current round" } else { "after the running state" }
    );
    Ok(ExitCode::SUCCESS)
}
