#![forbid(unsafe_code)]
//! The root helper of opsagent.
//!
//! The unprivileged daemon decides *what* to do; this process is the only one that runs
//! as root, so it stays small: it accepts connections from allowed uids only
//! ([`server`]), takes one typed request at a time, re-validates what only it can judge
//! (paths, users) and carries out one state ([`states`]). It links no network code.

pub mod cancel;
pub mod checksums;
pub mod cli;
pub mod diff;
pub mod dirfd;
pub mod durable;
pub mod exec;
pub mod fetched;
pub mod footprint;
pub mod fsutil;
pub mod harden;
pub mod identity;
pub mod logging;
pub mod plan;
pub mod policy;
pub mod server;
pub mod signed;
pub mod socket;
pub mod stamp;
pub mod states;
pub mod systemd;
pub mod transient;
pub mod unpack;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::Cli;
use crate::identity::Allowlist;
use crate::policy::Policy;

/// Starts the helper and serves until SIGTERM/SIGINT.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "must run as root (effective uid 0), but the effective uid is {}; \
             it is meant to be started by systemd (opsagent-helper.service)",
            nix::unistd::geteuid()
        );
    }
    // The one decision of how commands run; it also decides what the helper keeps.
    let runner = exec::select_host_runner(cli.direct_exec);
    // While this is the only thread: capability sets are per thread.
    // Commands in units of their own: the helper keeps only what file states need.
    // Commands as its children: they inherit its bounding set, so it keeps what the
    // storage states need too (there is no opt-in switch any more).
    let keep = if runner == "transient-unit" {
        harden::KEEP_WITH_UNITS.iter().copied().collect()
    } else {
        harden::kept_set(true)
    };
    let kept = harden::apply_set(&keep).context("refusing to start: cannot harden the process")?;
    tracing::info!(
        kept = %kept.bounding.join(" "),
        dropped = kept.dropped,
        "core dumps disabled; capability bounding set reduced"
    );
    if cli.storage {
        tracing::warn!(
            "--storage (OPSAGENT_HELPER_STORAGE) has no effect any more: storage states need no switch; \
             remove /etc/systemd/system/opsagent-helper.service.d/60-storage.conf (userdata.sh does)"
        );
    }
    let policy = match &cli.policy {
        Some(path) => Policy::load(path, true),
        None => Policy::load(std::path::Path::new(policy::DEFAULT_POLICY_PATH), false),
    }
    .map_err(policy::startup_error)?;
    tracing::info!(policy = %policy, "policy loaded");
    let trust = if cli.no_recipe_key {
        None
    } else {
        signed::RecipeTrust::load(&cli.config, 0).context("refusing to start: cannot read the recipe signing key")?
    };
    let signed = match trust {
        Some(trust) => {
            tracing::info!(
                config = %cli.config.display(),
                keys = trust.key_count(),
                app_id = trust.app_id(),
                "recipe_key configured: only recipes it signed run"
            );
            Some(Arc::new(signed::SignedStore::open(trust, &cli.state_dir)))
        }
        None => {
            tracing::warn!(
                config = %cli.config.display(),
                "no recipe_key configured: recipes are not verified; the agent's requests run as they come"
            );
            None
        }
    };
    tracing::info!(runner, "commands of states run this way");
    let allow = Allowlist::resolve(&cli.allow_user)?;
    tracing::info!(allowed = %allow, "allowlist resolved");

    // Bind before any thread exists: binding briefly narrows the process umask.
    let (listener, bound_path) = match &cli.socket {
        Some(path) => {
            let listener = socket::bind(path, allow.socket_group())?;
            tracing::info!(path = %path.display(), group = %allow.socket_group(), "bound the socket");
            (listener, Some(path.clone()))
        }
        None => {
            let listener = socket::from_systemd()?;
            tracing::info!(exit_idle_s = cli.exit_idle, "using the socket passed by systemd");
            (listener, None)
        }
    };

    let config = Arc::new(server::Config {
        allow,
        max_frame: cli.max_frame,
        max_connections_per_uid: cli.max_connections_per_uid,
        idle_timeout: (cli.idle_timeout > 0).then(|| Duration::from_secs(cli.idle_timeout)),
        exit_idle: (cli.exit_idle > 0).then(|| Duration::from_secs(cli.exit_idle)),
        reply_timeout: Duration::from_secs(cli.reply_timeout.max(1)),
        ctx: states::Ctx::new(cli.state_dir.clone()).with_policy(policy),
        signed,
    });
    // One thread: the helper serves one agent, one request at a time per connection;
    // a multi-thread scheduler only added cross-thread hand-offs to every request (and
    // memory). Blocking file work still runs on the blocking pool.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).context("cannot register the socket")?;
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot notify systemd that the helper is ready");
        }
        let served = server::serve(listener, config).await;
        // Deliberate (signal or idle exit): systemd shows "deactivating", not a crash.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        served
    });
    // Dropping the tasks of running states kills their process groups (see exec); a
    // blocking file operation gets a moment to finish rather than being torn mid-way.
    runtime.shutdown_timeout(Duration::from_secs(5));
    // What the file states wrote since the last flush goes to disk before the helper
    // is gone (see durable.rs).
    durable::Pending::host().flush();
    if let Some(path) = bound_path {
        socket::remove_if_socket(&path);
    }
    served
}
