//! `opsagent-backend`: the reference backend (see `opsagent::backend`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use opsagent::backend::{Backend, BackendOptions, TlsFiles, DEFAULT_MAX_FRAME_BYTES};

/// The VisualOps reference backend: serves recipes from a directory to opsagent agents
/// and records their StateLogs.
#[derive(Debug, Parser)]
#[command(name = "opsagent-backend", version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8443 (port 0: any free port).
    #[arg(long)]
    listen: String,
    /// One APP_ID.json recipe per app, plus APP_ID.update.json / APP_ID.reconnect.json orders.
    #[arg(long)]
    recipe_dir: PathBuf,
    /// StateLogs are appended here, one JSON line each (FILE.versions.json lives next to it).
    #[arg(long)]
    statelog: PathBuf,
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
    /// Largest incoming frame accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("opsagent-backend: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opsagent-backend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let opts = BackendOptions {
        events: args.events,
        poll: Duration::from_millis(args.poll_ms),
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles { cert, key }),
        max_frame_bytes: args.max_frame_bytes,
        ..BackendOptions::new(args.recipe_dir, args.statelog)
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
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
