//! `opsagent upgrade --url …`: the operator's manual upgrade. It stages the release the
//! way the daemon does (same downloader, same files), then runs the same installer:
//! through `opsagent-upgrade.service` under systemd, directly with the cron
//! supervisor's restart command elsewhere.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context};
use opsagent_shared::upgrade as hand;

use super::{carry_out, last_record, StartInstaller, Trigger, UpgradeSettings, Verdict};
use crate::config::{Config, Overrides};
use crate::round::UpdateOrder;

const PREFIX: &str = "/opt/visualops/current";

/// The version in a release URL: the name of the archive's directory
/// (`…/1.3.0/opsagent.tgz` → `1.3.0`).
pub fn version_from_url(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let mut parts = path.rsplit('/');
    parts.next()?;
    parts.next().filter(|v| hand::valid_version(v)).map(str::to_string)
}

/// The manual path never starts the unit from inside `carry_out`: it runs the
/// installer itself afterwards, and waits for it.
struct Later;

impl StartInstaller for Later {
    async fn start(&self) -> Result<(), String> {
        Ok(())
    }
}

pub fn cmd_upgrade(
    url: &str,
    version: Option<String>,
    config: Option<&Path>,
    stage_only: bool,
) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root: the installer switches /opt/visualops/current and restarts the agent");
    }
    let config = Config::load(config, &Overrides::default())?;
    let Some(version) = version.or_else(|| version_from_url(url)) else {
        bail!("cannot tell the release version from {url}; pass --version");
    };
    let state_dir = config.agent.state_dir.clone();
    let meta = std::fs::metadata(&state_dir).with_context(|| format!("state directory {}", state_dir.display()))?;
    let owner = (
        nix::unistd::Uid::from_raw(std::os::unix::fs::MetadataExt::uid(&meta)),
        nix::unistd::Gid::from_raw(std::os::unix::fs::MetadataExt::gid(&meta)),
    );
    let settings = UpgradeSettings {
        state_dir: state_dir.clone(),
        base_remote: config.userdata.base_remote.clone(),
        running: crate::version::running().to_string(),
        // An operator asking by hand overrides the hold-off.
        holdoff: Duration::ZERO,
        max_bytes: config.upgrade.max_bytes as u64,
        verdict_wait: Duration::ZERO,
        trigger: Trigger::Supervisor,
    };
    let proxy = crate::net::ProxySettings::from_env(config.link.proxy.as_deref(), config.link.no_proxy.as_deref());
    let downloader = crate::download::Downloader::new(crate::download::DownloadSettings {
        proxy,
        extra_roots: config.link.ca_file.iter().cloned().collect(),
        ..crate::download::DownloadSettings::default()
    })?;
    let order = UpdateOrder { version: version.clone(), url: url.to_string() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match rt.block_on(carry_out(&settings, &order, &downloader, &Later)) {
        Verdict::AlreadyRunning => {
            println!("{version} is already running");
            return Ok(ExitCode::SUCCESS);
        }
        Verdict::Failed { reason, .. } => bail!("{reason}"),
        Verdict::HeldOff { reason, .. } => bail!("held off: {reason}"),
        Verdict::Pending | Verdict::Installed(_) => {}
    }
    // Staged as root inside the daemon's directory: hand the files back to it, so that
    // the daemon can replace them at its next order.
    let upgrade_dir = state_dir.join("upgrade");
    for path in [upgrade_dir.clone(), hand::staged_dir(&state_dir)]
        .into_iter()
        .chain(std::fs::read_dir(hand::staged_dir(&state_dir))?.filter_map(|e| e.ok().map(|e| e.path())))
    {
        nix::unistd::chown(&path, Some(owner.0), Some(owner.1)).with_context(|| format!("chown {}", path.display()))?;
    }
    println!("{version} downloaded and staged in {}", hand::staged_dir(&state_dir).display());
    if stage_only {
        println!("install it with: systemctl start {}", hand::UNIT);
        return Ok(ExitCode::SUCCESS);
    }
    let status = if Path::new("/run/systemd/system").is_dir() {
        println!("running {} (journalctl -u {} -f)", hand::UNIT, hand::UNIT);
        Command::new("systemctl").args(["start", hand::UNIT]).status()
    } else {
        let installer = format!("{PREFIX}/bin/opsagent-upgrade");
        println!("running {installer}");
        Command::new(installer)
            .args(["--restart-command", &format!("{PREFIX}/packaging/opsagent-supervise restart")])
            .status()
    }
    .context("cannot run the installer")?;
    match last_record(&state_dir).filter(|r| r.version == version) {
        Some(r) => {
            println!("{} -> {}: {:?}: {}", r.from, r.version, r.outcome, r.reason);
            Ok(if r.outcome.is_failure() || !status.success() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        None => bail!("the installer left no result ({status}); see journalctl -u {}", hand::UNIT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_comes_from_the_archives_directory() {
        assert_eq!(version_from_url("https://r.example/opsagent/1.3.0/opsagent.tgz").as_deref(), Some("1.3.0"));
        assert_eq!(version_from_url("http://127.0.0.1:8000/2.0-rc1/opsagent.tgz?x=1").as_deref(), Some("2.0-rc1"));
        assert_eq!(version_from_url("opsagent.tgz"), None);
        assert_eq!(version_from_url("https://r.example/../opsagent.tgz"), None);
    }
}
