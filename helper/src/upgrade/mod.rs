//! `opsagent-upgrade`: the root installer of a release the daemon downloaded.
//!
//! Started by `opsagent-upgrade.service` (which the polkit rule lets the daemon start),
//! by the cron supervisor on hosts without systemd, or by `opsagent upgrade` run by an
//! operator. One run, in this order, each step only after the previous one succeeded:
//! 1. copy the staged order, archive and signature out of the daemon's directory and
//!    consume the order (a broken order is never retried in a loop);
//! 2. refuse a release older than the running one unless `[upgrade] allow_downgrade`
//!    says otherwise ([`order`]); verify the signature with the key of root-owned `/etc/opsagent.conf` and its
//!    trusted comment (`opsagent release VERSION`) — before anything is unpacked;
//! 3. unpack safely ([`crate::unpack`]) and check the MANIFEST;
//! 4. install to `releases/VERSION`, switch `current`; on systemd hosts bring the unit
//!    files userdata.sh installed to the release's ([`units`]) and make systemd reload
//!    them (re-creating the helper socket if it changed); a unit that cannot be written
//!    aborts here, before anything was restarted: `current` and the units go back;
//!    restart the agent;
//! 5. health gate: the new daemon must reach READY and complete a Handshake (it writes
//!    `health.json`, removed before the switch so that only the new daemon's counts)
//!    within `[upgrade] health_timeout`, timed on the monotonic clock (a wall clock
//!    stepped meanwhile changes nothing); otherwise switch back, put the
//!    previous release's units back, restart the previous release and record `reverted`;
//! 6. on success keep the previous release (for a manual roll-back) and prune the rest.
//!
//! Every run leaves a [`Record`] for the daemon in `<state_dir>/upgrade/result.json`.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

pub mod conf;
pub mod control;
pub mod order;
pub mod release;
pub mod releases;
pub mod units;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opsagent_shared::upgrade::{self as hand, Health, Outcome, Record};

use self::conf::InstallerConfig;
use self::control::AgentControl;
use self::release::PinnedDir;
use self::releases::Releases;
use self::units::InstalledUnits;
use crate::dirfd::{NewDirs, WalkError};

/// How often the health file is read during the gate.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    #[error("nothing staged: {0}")]
    NothingStaged(String),
    #[error("staged files: {0}")]
    Staged(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot bring this unit file to the release's: {source}")]
    Unit { path: PathBuf, source: crate::fsutil::FsError },
    #[error("systemd did not reload its configuration after the units were replaced: {0}")]
    Reload(String),
    #[error("another upgrade is running (lock {0} is held)")]
    Busy(PathBuf),
    #[error("{0}")]
    Other(String),
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub struct Installer<C> {
    pub config: InstallerConfig,
    pub releases: Releases,
    pub control: C,
    /// Where userdata.sh installed the units (systemd hosts); `None` on hosts without
    /// systemd, whose supervisor has no unit files.
    pub units: Option<InstalledUnits>,
}

impl<C: AgentControl> Installer<C> {
    /// Carries out the staged order; `Err` only when there was nothing to act on or
    /// the result could not even be recorded. The record is also written for the daemon.
    pub async fn run(&self) -> Result<Record, UpgradeError> {
        let state = PinnedDir::open(&self.config.state_dir)?;
        let owner = {
            let m = fs::metadata(state.entry(".")).map_err(|e| UpgradeError::Staged(e.to_string()))?;
            (m.uid(), m.gid())
        };
        let upgrade_dir = state.entry("upgrade");
        let staged = match PinnedDir::open_shown(&upgrade_dir.join("staged"), self.staged_shown()) {
            Ok(d) if d.read(hand::ORDER, 1 << 16).is_ok() => d,
            _ => return Err(UpgradeError::NothingStaged(format!("no order in {}", self.staged_shown().display()))),
        };
        let from = self.releases.current().unwrap_or_else(|| "none".into());
        let work = self.releases.work_dir()?;
        let record = self.carry_out(&staged, &state, &work, &from, owner).await;
        // Root's scratch directory under the installer's releases tree (root-owned, 0700).
        #[allow(clippy::disallowed_methods)]
        let _ = fs::remove_dir_all(&work);
        let record = match record {
            Ok(r) => r,
            Err((version, e)) => {
                let r = record_of(version, &from, Outcome::Rejected, e.to_string());
                write_record(&state, owner, &r)?;
                r
            }
        };
        tracing::info!(
            version = %record.version, from = %record.from, outcome = ?record.outcome, reason = %record.reason,
            "upgrade finished"
        );
        Ok(record)
    }

    fn staged_shown(&self) -> PathBuf {
        hand::staged_dir(&self.config.state_dir)
    }

    async fn carry_out(
        &self,
        staged: &PinnedDir,
        state: &PinnedDir,
        work: &std::path::Path,
        from: &str,
        owner: (u32, u32),
    ) -> Result<Record, (String, UpgradeError)> {
        let taken = release::take(staged, work);
        // Consumed whatever happens: a bad order must not be retried by every cron run.
        for name in [hand::ORDER, hand::ARCHIVE, hand::SIGNATURE] {
            staged.remove(name);
        }
        let taken = taken.map_err(|e| ("unknown".to_string(), e))?;
        let version = taken.order.version().to_string();
        let fail = |e| (version.clone(), e);
        tracing::info!(version = %version, from = %from, url = %taken.order.url(), "installing a staged release");
        if version == from {
            let r = record_of(
                version.clone(),
                from,
                Outcome::Confirmed,
                format!("{version} is already the current release"),
            );
            write_record(state, owner, &r).map_err(fail)?;
            return Ok(r);
        }
        order::check_not_older(&version, from, self.config.allow_downgrade).map_err(fail)?;
        release::verify_signature(&self.config.update_key, &taken.archive, &taken.signature, &version).map_err(fail)?;
        let tree = release::unpack_and_check(&taken.archive, work, &version).map_err(fail)?;
        self.releases.install(&tree, &version).map_err(fail)?;
        // The gate passes on a health file naming the new version; one left by an earlier
        // attempt at this version must not pass it, so it goes before the switch. (Not a
        // wall-clock "written after the switch" test: a clock stepped back between the
        // switch and the new daemon's Handshake would fail a healthy release.)
        forget_health(state).map_err(fail)?;
        self.releases.switch(&version).map_err(fail)?;
        let switched =
            record_of(version.clone(), from, Outcome::Switched, "switched; waiting for the health gate".into());
        write_record(state, owner, &switched).map_err(fail)?;
        let socket = match self.bring_units(&version).await {
            Ok(socket) => socket,
            Err(e) => return self.abort_switched(state, owner, &version, from, &e).await.map_err(fail),
        };
        tracing::info!(version = %version, from = %from, "switched; restarting the agent");

        let verdict = match self.start(socket).await {
            Err(e) => Err(format!("the new daemon did not start: {e}")),
            Ok(()) => self.wait_healthy(state, &version).await,
        };
        let record = match verdict {
            Ok(()) => {
                let kept: Vec<&str> = [version.as_str(), from].into_iter().filter(|v| *v != "none").collect();
                let pruned = self.releases.prune(&kept).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot prune old releases");
                    Vec::new()
                });
                let note = if pruned.is_empty() { String::new() } else { format!("; pruned {}", pruned.join(", ")) };
                let r = record_of(
                    version.clone(),
                    from,
                    Outcome::Confirmed,
                    format!("{version} is healthy; {from} kept for a manual roll-back{note}"),
                );
                write_record(state, owner, &r).map_err(fail)?;
                r
            }
            Err(why) if self.can_revert_to(from) => {
                tracing::error!(version = %version, from = %from, reason = %why, "new release unhealthy; reverting");
                self.releases.switch(from).map_err(fail)?;
                let (socket, note) = self.units_back(from).await;
                let r = record_of(version.clone(), from, Outcome::Reverted, format!("{why}; reverted to {from}{note}"));
                // Before the restart: the revived daemon reads it at start-up.
                write_record(state, owner, &r).map_err(fail)?;
                if let Err(e) = self.start(socket).await {
                    tracing::error!(error = %e, "the previous release did not restart either");
                }
                if let Err(e) = self.releases.remove(&version) {
                    tracing::warn!(error = %e, "cannot remove the failed release");
                }
                r
            }
            Err(why) => {
                let r = record_of(
                    version.clone(),
                    from,
                    Outcome::Failed,
                    format!("{why}; no previous release to revert to"),
                );
                write_record(state, owner, &r).map_err(fail)?;
                r
            }
        };
        Ok(record)
    }

    /// Brings the installed units to `version`'s and makes systemd reload them if any
    /// changed; `Ok(true)` when the helper's socket changed (it must be re-created).
    /// Nothing to do without systemd.
    async fn bring_units(&self, version: &str) -> Result<bool, UpgradeError> {
        let Some(units) = &self.units else { return Ok(false) };
        let replaced = units.bring_to(&self.releases.path(version))?;
        if replaced.is_empty() {
            tracing::info!(version, "the installed units are already this release's");
            return Ok(false);
        }
        tracing::info!(version, units = %replaced.list(), "replaced the installed units with this release's");
        if replaced.needs_reload() {
            self.control.reload_units().await.map_err(UpgradeError::Reload)?;
            tracing::info!(version, "systemd reloaded its configuration");
        }
        Ok(replaced.socket())
    }

    /// Whether there is a previous release to go back to.
    fn can_revert_to(&self, from: &str) -> bool {
        from != "none" && self.releases.path(from).is_dir()
    }

    /// Puts the units of the release `from` back after `current` was switched back to
    /// it: whether its socket must be re-created, and a note for the record when they
    /// could not be put back (the revert goes on: the previous release runs either way).
    async fn units_back(&self, from: &str) -> (bool, String) {
        match self.bring_units(from).await {
            Ok(socket) => (socket, String::new()),
            Err(e) => {
                tracing::error!(error = %e, "cannot put the previous release's units back");
                (false, format!(" (its units could not be put back: {e})"))
            }
        }
    }

    /// Starts the release `current` points at; the helper's socket first, when its unit
    /// changed (its settings apply only to a re-created socket).
    async fn start(&self, socket: bool) -> Result<(), String> {
        if socket {
            self.control.restart_socket().await.map_err(|e| format!("cannot re-create the helper's socket: {e}"))?;
            tracing::info!("re-created the helper's socket with its new unit");
        }
        self.control.restart().await
    }

    /// The units of `version` could not be installed: nothing was restarted yet, so the
    /// previous release is still running; `current` and the units go back to it.
    async fn abort_switched(
        &self,
        state: &PinnedDir,
        owner: (u32, u32),
        version: &str,
        from: &str,
        error: &UpgradeError,
    ) -> Result<Record, UpgradeError> {
        tracing::error!(version, from, error = %error, "cannot install the release's units; not restarting");
        let why = format!("cannot install the units of {version}: {error}");
        if !self.can_revert_to(from) {
            let r =
                record_of(version.into(), from, Outcome::Failed, format!("{why}; no previous release to revert to"));
            write_record(state, owner, &r)?;
            return Ok(r);
        }
        self.releases.switch(from)?;
        // The socket was not re-created yet (that comes with the start), so the running
        // one already has the previous settings, whatever its file says.
        let (_, note) = self.units_back(from).await;
        if let Err(e) = self.releases.remove(version) {
            tracing::warn!(error = %e, "cannot remove the release whose units failed");
        }
        let r = record_of(
            version.into(),
            from,
            Outcome::Reverted,
            format!("{why}; reverted to {from}, which kept running{note}"),
        );
        write_record(state, owner, &r)?;
        Ok(r)
    }

    /// Waits for `health.json` naming `version` (written since the switch: the previous
    /// one was removed before it), on the monotonic clock.
    async fn wait_healthy(&self, state: &PinnedDir, version: &str) -> Result<(), String> {
        let timeout = self.config.health_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(bytes) = state.read("health.json", 1 << 16) {
                if let Ok(h) = serde_json::from_slice::<Health>(&bytes) {
                    if h.version == version {
                        tracing::info!(version, pid = h.pid, "the new daemon completed a Handshake");
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{version} did not complete a Handshake within {} s", timeout.as_secs()));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Removes the daemon's last `health.json` (none is fine).
fn forget_health(state: &PinnedDir) -> Result<(), UpgradeError> {
    match state.dir()?.unlink(OsStr::new("health.json")) {
        Err(WalkError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(state.walk_err("health.json")),
    }
}

fn record_of(version: String, from: &str, outcome: Outcome, reason: String) -> Record {
    Record { version, from: from.to_string(), outcome, reason, at: now_unix(), reported: false }
}

/// Writes `result.json` under the daemon's `upgrade/` directory without following any
/// symlink the daemon may have planted, owned by the daemon (it marks it reported). All
/// by directory descriptor ([`crate::dirfd`]): a new `upgrade/` is created root-only
/// and handed to the daemon through its own descriptor, so a link swapped in for it
/// meanwhile is never chowned.
pub fn write_record(state: &PinnedDir, owner: (u32, u32), record: &Record) -> Result<(), UpgradeError> {
    let state_dir = state.dir()?;
    let upgrade = OsStr::new("upgrade");
    let up = loop {
        if let Some(up) = state_dir.subdir(upgrade).map_err(state.walk_err("upgrade"))? {
            break up;
        }
        match state_dir.mkdir(upgrade, NewDirs { mode: 0o755, uid: owner.0, gid: owner.1 }) {
            Ok(up) => break up,
            // The daemon made it meanwhile: use that one.
            Err(WalkError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(state.walk_err("upgrade")(e)),
        }
    };
    let shown = state.shown("upgrade").join("result.json");
    let walk_err = |e: WalkError| match e {
        WalkError::Io { source, .. } => UpgradeError::Io { path: shown.clone(), source },
        e => UpgradeError::Staged(format!("{}: {e}", shown.display())),
    };
    let tmp = OsStr::new(".result.json.tmp");
    let _ = up.unlink(tmp);
    let mut f = up.create_named(tmp).map_err(&walk_err)?;
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| UpgradeError::Other(e.to_string()))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|source| UpgradeError::Io { path: shown.clone(), source })?;
    let _ = std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1));
    up.rename(tmp, OsStr::new("result.json")).map_err(walk_err)
}

#[cfg(test)]
mod tests;
