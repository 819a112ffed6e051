#![forbid(unsafe_code)]
//! `opsagent-upgrade`: installs the release the daemon staged (see the `upgrade` module
//! of the helper library). Run as root by `opsagent-upgrade.service`, by the cron
//! supervisor, or through `opsagent upgrade`.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use opsagent_helper::upgrade::conf::{InstallerConfig, DEFAULT_CONFIG};
use opsagent_helper::upgrade::control::{CommandControl, SystemdControl};
use opsagent_helper::upgrade::releases::{Releases, DEFAULT_PREFIX};
use opsagent_helper::upgrade::units::{InstalledUnits, DEFAULT_UNIT_DIR};
use opsagent_helper::upgrade::{Installer, UpgradeError};

#[derive(Debug, Parser)]
#[command(name = "opsagent-upgrade", version, about = "Installs the opsagent release staged by the daemon")]
struct Cli {
    /// The root-owned configuration holding `[userdata] update_key`.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where releases/ and the current symlink live.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PREFIX)]
    prefix: PathBuf,
    /// Hosts without systemd: the command that restarts the agent from `current`
    /// (whitespace-separated words), e.g. "/usr/local/sbin/opsagent-supervise restart".
    #[arg(long, value_name = "COMMAND")]
    restart_command: Option<String>,
    /// Overrides `[upgrade] health_timeout` (seconds).
    #[arg(long, value_name = "SECONDS")]
    health_timeout: Option<u64>,
    /// systemd hosts: where the userdata script installed the units; those installed there
    /// are brought to the new release's (ignored with --restart-command).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_UNIT_DIR)]
    unit_dir: PathBuf,
    /// The polkit rules directories, in userdata.sh's order (repeat; tests).
    #[arg(long, value_name = "DIR", hide = true)]
    polkit_dir: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    opsagent_helper::logging::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("opsagent-upgrade: must run as root");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("opsagent-upgrade: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(record) => {
            // The reason may quote what the daemon staged: one escaped line, like the log.
            let line = format!("{} -> {}: {:?}: {}", record.from, record.version, record.outcome, record.reason);
            println!("{}", opsagent_logline::escape(&line));
            if record.outcome.is_failure() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e @ UpgradeError::NothingStaged(_)) => {
            eprintln!("opsagent-upgrade: {}", opsagent_logline::escape(&e.to_string()));
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("opsagent-upgrade: {}", opsagent_logline::escape(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<opsagent_shared::upgrade::Record, UpgradeError> {
    let mut config = InstallerConfig::load(&cli.config, 0)?;
    for dir in std::iter::once(&cli.unit_dir).chain(&cli.polkit_dir) {
        if !dir.is_absolute() {
            return Err(UpgradeError::Other(format!(
                "{}: the unit and polkit directories must be absolute",
                dir.display()
            )));
        }
    }
    if let Some(s) = cli.health_timeout {
        config.health_timeout = Duration::from_secs(s.clamp(5, 3600));
    }
    let lock_path = PathBuf::from("/run/opsagent-upgrade.lock");
    // /run is root's (no one else can create or replace an entry there).
    #[allow(clippy::disallowed_methods)]
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| UpgradeError::Io { path: lock_path.clone(), source: e })?;
    if lock.try_lock().is_err() {
        return Err(UpgradeError::Busy(lock_path));
    }
    let releases = Releases::new(&cli.prefix);
    // Both restarts (the new release, and on a revert the old one) fit in the gate.
    let job_timeout = config.health_timeout;
    match cli.restart_command {
        Some(cmd) => {
            let argv = cmd.split_whitespace().map(str::to_string).collect();
            let control = CommandControl { argv, timeout: job_timeout + Duration::from_secs(60) };
            // The cron supervisor has no unit files.
            Installer { config, releases, control, units: None }.run().await
        }
        None => {
            let control = SystemdControl::connect(job_timeout).await.map_err(UpgradeError::Other)?;
            let mut units = InstalledUnits { unit_dir: cli.unit_dir, ..InstalledUnits::default() };
            if !cli.polkit_dir.is_empty() {
                units.polkit_dirs = cli.polkit_dir;
            }
            Installer { config, releases, control, units: Some(units) }.run().await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The hand-written manual page (packaging/man/opsagent-upgrade.8) documents every
    /// option `--help` lists, and no option the installer does not take.
    #[test]
    fn the_manual_page_names_every_option_and_no_other() {
        let page = include_str!("../../packaging/man/opsagent-upgrade.8");
        let help = super::Cli::command().render_help().to_string();
        let in_help: Vec<String> = help
            .lines()
            .filter_map(|l| l.trim_start().split([' ', ',']).find(|w| w.starts_with("--")).map(str::to_string))
            .collect();
        assert!(in_help.len() >= 7, "{in_help:?}");
        let in_page: Vec<String> = page
            .lines()
            .filter_map(|l| l.strip_prefix(".B "))
            .flat_map(|l| l.split([' ', ',']).filter(|w| w.starts_with("\\-\\-")).map(|w| w.replace("\\-", "-")))
            .filter(|w| w.len() > 2)
            .collect();
        for opt in &in_help {
            assert!(in_page.contains(opt), "{opt} is missing from opsagent-upgrade.8");
        }
        for opt in &in_page {
            assert!(in_help.contains(opt), "opsagent-upgrade.8 documents {opt}, which opsagent-upgrade does not take");
        }
    }
}
