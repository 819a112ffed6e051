//! `opsagent-backend`: the reference backend (see `opsagent::backend`), and
//! `opsagent-backend instances …` to list, reset and pre-register instance pins.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use opsagent::backend::pins::{token_hash, PinStore};
use opsagent::backend::{Backend, BackendOptions, Limits, Rotation, TlsFiles, DEFAULT_MAX_FRAME_BYTES};

/// The parts of opsagent-backend(8) that the command line does not say.
const MANUAL: opsagent::manual::Extra<'static> = opsagent::manual::Extra {
    description: &["Serves recipes from a directory to opsagent agents over WebSocket (TLS unless on loopback), pins \
         each instance's token at first use, records every StateLog in --statelog, and signs recipes with \
         --signing-key. `opsagent-backend instances list|forget|pin` manages the pins."],
    files: &[
        ("STATELOG.pins/", "The instance pins beside the StateLog file (or --pins-dir)."),
        (
            "STATELOG.logs/",
            "Log bundles agents sent when asked with RECIPE_DIR/APP_ID.fetch-logs.json, as INSTANCE.REQUEST.log.gz \
             (or --logs-dir).",
        ),
    ],
    environment: &[
        ("OPSAGENT_SIGNING_KEY_PASSWORD", "The password of an encrypted --signing-key."),
        (
            "LISTEN_FDS, LISTEN_PID",
            "Socket activation (sd_listen_fds(3)): one listening TCP socket at fd 3, for this process, served \
             instead of binding --listen. Anything else (another LISTEN_PID, several sockets, a descriptor that is \
             not a listening TCP socket) is refused at start.",
        ),
    ],
    see_also: &["opsagent(8)", "opsagent-helper(8)"],
};

/// The VisualOps reference backend: serves recipes from a directory to opsagent agents
/// and records their StateLogs.
#[derive(Debug, Parser)]
#[command(name = "opsagent-backend", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Debug, ClapArgs)]
struct Serve {
    /// Address to listen on, e.g. 127.0.0.1:8443 (port 0: any free port). Anything but
    /// loopback needs --tls-cert/--tls-key, or --insecure-plaintext. Not needed, and
    /// ignored, when systemd hands over the listening socket (LISTEN_FDS, fd 3).
    #[arg(long)]
    listen: Option<String>,
    /// One APP_ID.json recipe per app, plus APP_ID.update.json / APP_ID.reconnect.json orders.
    #[arg(long, required = true)]
    recipe_dir: Option<PathBuf>,
    /// StateLogs are appended here, one JSON line each (FILE.versions.json and the
    /// FILE.pins/ directory live next to it).
    #[arg(long, required = true)]
    statelog: Option<PathBuf>,
    /// Connections and every non-StateLog message, one JSON line each.
    #[arg(long)]
    events: Option<PathBuf>,
    /// How often the recipe directory is read, in milliseconds.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// PEM certificate chain: serve wss:// (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain ws:// on an address that is not loopback (recipes and tokens in
    /// clear): warned about at start and every hour.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_plaintext: bool,
    /// Where instance pins live (default: STATELOG.pins).
    #[arg(long)]
    pins_dir: Option<PathBuf>,
    /// Where log bundles received from agents are stored (default: STATELOG.logs).
    #[arg(long)]
    logs_dir: Option<PathBuf>,
    /// An app whose instances must be registered with `instances pin` before they are
    /// served (no trust on first use); repeatable; `*` for every app.
    #[arg(long = "require-pin", value_name = "APP_ID")]
    require_pin: Vec<String>,
    /// Largest incoming frame accepted, in bytes; a larger one closes the connection (1009).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Open connections from one IP address; more are refused with HTTP 429.
    #[arg(long, default_value_t = Limits::default().max_conns_per_addr)]
    max_conns_per_addr: usize,
    /// Open connections in all; more are refused with HTTP 503.
    #[arg(long, default_value_t = Limits::default().max_conns)]
    max_conns: usize,
    /// Seconds a connection has for its first Handshake; then it is closed (1008).
    #[arg(long, default_value_t = Limits::default().handshake_timeout.as_secs())]
    handshake_timeout_s: u64,
    /// Frames read per second per connection (sustained); a faster sender is read slower.
    #[arg(long, default_value_t = Limits::default().frames_per_s)]
    frames_per_s: u32,
    /// Frames a connection may send at once before --frames-per-s applies.
    #[arg(long, default_value_t = Limits::default().frame_burst)]
    frame_burst: u32,
    /// Bytes queued for one connection and not yet read by its agent; past it the
    /// connection is dropped (`slow_reader` event) and the agent reconnects.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes)]
    max_queued_bytes: usize,
    /// The statelog and the event log are rotated (FILE.1, FILE.2, …) past this size.
    #[arg(long, default_value_t = Rotation::default().max_bytes)]
    rotate_bytes: u64,
    /// Rotated files kept of each log.
    #[arg(long, default_value_t = Rotation::default().keep)]
    rotate_keep: u32,
    /// Sign every recipe pushed with this minisign secret key (`minisign -G`; an
    /// encrypted key reads its password from OPSAGENT_SIGNING_KEY_PASSWORD). Agents
    /// whose /etc/opsagent.conf has the public key as recipe_key run only signed recipes.
    #[arg(long, value_name = "FILE")]
    signing_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The instance pins: list, forget (reset) or pin (pre-register).
    #[command(subcommand)]
    Instances(Instances),
    /// Print a shell completion script: `opsagent-backend completion bash >
    /// /usr/share/bash-completion/completions/opsagent-backend`.
    Completion {
        #[arg(value_parser = ["bash"])]
        shell: String,
    },
    /// Write the manual page opsagent-backend.8 into DIR (used by packaging/build-deb).
    #[command(hide = true)]
    Manual { dir: PathBuf },
}

/// Which pins directory: the backend's --statelog (its FILE.pins/) or --pins-dir.
#[derive(Debug, ClapArgs)]
#[group(required = true, multiple = false)]
struct Store {
    /// The backend's --statelog: the pins are in STATELOG.pins/.
    #[arg(long)]
    statelog: Option<PathBuf>,
    /// The backend's --pins-dir.
    #[arg(long)]
    pins_dir: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
struct Target {
    #[arg(long = "app")]
    app_id: String,
    #[arg(long = "instance")]
    instance_id: String,
}

#[derive(Debug, Subcommand)]
enum Instances {
    /// Every pin: app, instance, when, by whom (first use from a peer, or the operator).
    List {
        #[command(flatten)]
        store: Store,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Removes a pin: the instance's next Handshake pins its token again (unless its app
    /// requires pre-registration).
    Forget {
        #[command(flatten)]
        store: Store,
        #[command(flatten)]
        target: Target,
    },
    /// Pins an instance to a token (pre-registration), replacing any pin it had.
    Pin {
        #[command(flatten)]
        store: Store,
        #[command(flatten)]
        target: Target,
        /// The agent's token file (its first line is the token; never given on the
        /// command line, where other users could read it).
        #[arg(long, required_unless_present = "token_sha256", conflicts_with = "token_sha256")]
        token_file: Option<PathBuf>,
        /// The token's sha256, in hex.
        #[arg(long)]
        token_sha256: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Instances(cmd)) => instances(cmd),
        Some(Command::Completion { shell: _ }) => {
            print!("{}", opsagent::manual::bash_completion(&<Args as clap::CommandFactory>::command()));
            Ok(())
        }
        Some(Command::Manual { dir }) => {
            opsagent::manual::write_page(&dir, &<Args as clap::CommandFactory>::command(), &MANUAL).map(|_| ())
        }
        // Before the runtime starts any thread: taking the socket over edits the
        // environment (LISTEN_FDS and LISTEN_PID are removed).
        None => match opsagent::backend::activation::inherited_listener() {
            Err(e) => Err(anyhow::anyhow!("cannot use the socket systemd passed: {e}")),
            Ok(inherited) => match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime.block_on(run(args.serve, inherited)),
                Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
            },
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opsagent-backend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open_store(store: Store) -> anyhow::Result<PinStore> {
    let dir = match (store.pins_dir, store.statelog) {
        (Some(dir), _) => dir,
        (None, Some(statelog)) => PinStore::default_dir(&statelog),
        (None, None) => anyhow::bail!("give --statelog or --pins-dir"),
    };
    Ok(PinStore::open(&dir)?)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the token", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    anyhow::ensure!(!token.is_empty(), "{}: no token on its first line", path.display());
    Ok(token.to_string())
}

fn instances(cmd: Instances) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        Instances::List { store, json } => {
            let pins = open_store(store)?.list()?;
            for p in pins {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&p)?)?;
                } else {
                    let source = serde_json::to_value(p.source)?;
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}\tsha256:{}…",
                        p.app_id,
                        p.instance_id.escape_debug(),
                        p.pinned_at,
                        source.as_str().unwrap_or("?"),
                        p.peer.as_deref().unwrap_or("-"),
                        &p.token_sha256[..p.token_sha256.len().min(12)]
                    )?;
                }
            }
        }
        Instances::Forget { store, target } => match open_store(store)?.forget(&target.app_id, &target.instance_id)? {
            Some(_) => writeln!(out, "forgot the pin of {} (app {})", target.instance_id, target.app_id)?,
            None => writeln!(out, "{} (app {}) had no pin", target.instance_id, target.app_id)?,
        },
        Instances::Pin { store, target, token_file, token_sha256 } => {
            let hash = match (token_file, token_sha256) {
                (Some(f), _) => token_hash(&read_token(&f)?),
                (None, Some(h)) => h,
                (None, None) => anyhow::bail!("give --token-file or --token-sha256"),
            };
            let old = open_store(store)?.pin(&target.app_id, &target.instance_id, &hash, SystemTime::now())?;
            let replaced = if old.is_some() { " (replacing its earlier pin)" } else { "" };
            writeln!(out, "pinned {} (app {}){replaced}", target.instance_id, target.app_id)?;
        }
    }
    Ok(())
}

/// Serves `inherited` (socket activation) when given, else binds `--listen`.
async fn run(args: Serve, inherited: Option<std::net::TcpListener>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let (Some(recipe_dir), Some(statelog)) = (args.recipe_dir, args.statelog) else {
        anyhow::bail!("--recipe-dir and --statelog are required");
    };
    let listener = match (inherited, args.listen) {
        (Some(socket), listen) => {
            if let Some(listen) = listen {
                tracing::info!("serving the socket systemd passed; --listen {listen} is not bound");
            }
            socket.set_nonblocking(true).context("cannot make the inherited socket non-blocking")?;
            tokio::net::TcpListener::from_std(socket).context("cannot serve the inherited socket")?
        }
        (None, Some(listen)) => {
            tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?
        }
        (None, None) => anyhow::bail!("--listen is required (or a socket passed by systemd: LISTEN_FDS)"),
    };
    let opts = BackendOptions {
        events: args.events,
        poll: Duration::from_millis(args.poll_ms),
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles { cert, key }),
        max_frame_bytes: args.max_frame_bytes,
        pins_dir: args.pins_dir,
        logs_dir: args.logs_dir,
        require_pin: args.require_pin,
        insecure_plaintext: args.insecure_plaintext,
        limits: Limits {
            max_conns_per_addr: args.max_conns_per_addr,
            max_conns: args.max_conns,
            handshake_timeout: Duration::from_secs(args.handshake_timeout_s),
            frames_per_s: args.frames_per_s,
            frame_burst: args.frame_burst,
            max_queued_bytes: args.max_queued_bytes,
        },
        rotation: Rotation { max_bytes: args.rotate_bytes, keep: args.rotate_keep },
        signing_key: args.signing_key,
        ..BackendOptions::new(recipe_dir, statelog)
    };
    let backend = Backend::start(listener, opts).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "opsagent-backend listening on {}", backend.local_addr())?;
    stdout.flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    backend.shutdown().await;
    Ok(())
}
