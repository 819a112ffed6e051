//! Self-upgrade, the daemon's part: download, stage, hand over, learn the verdict.
//!
//! The daemon holds no privilege, so it never installs anything. On an `AgentUpdate`
//! (run by the engine between rounds) it downloads the archive and its `.minisig` into
//! `<state_dir>/upgrade/staged/`, writes the order last, and asks for the root installer:
//! under systemd by starting `opsagent-upgrade.service` over D-Bus (the polkit rule
//! allows exactly that), on cron-fallback hosts by leaving the order for the supervisor,
//! which runs the installer at its next pass. The installer's [`Record`] says how it
//! went; a failure is reported to the backend as a failing StateLog (see
//! [`failure_log`]) — by this process when the installer refused the release, or by the
//! revived previous release after a revert.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::upgrade::{self as hand, Order, Record};

use crate::protocol::StateLog;
use crate::round::UpdateOrder;

pub mod cli;

/// The pseudo state id of an upgrade report when no recipe is known yet.
pub const REPORT_STATE_ID: &str = "opsagent-upgrade";

#[derive(Debug, Clone)]
pub struct UpgradeSettings {
    pub state_dir: PathBuf,
    /// The running release.
    pub running: String,
    pub holdoff: Duration,
    pub max_bytes: u64,
    /// How long to wait for the installer's verdict before going on with rounds.
    pub verdict_wait: Duration,
    pub trigger: Trigger,
}

/// Who runs the installer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `opsagent-upgrade.service`, started over D-Bus.
    Systemd,
    /// The cron supervisor (`opsagent-supervise`) finds the staged order.
    Supervisor,
}

impl Trigger {
    /// systemd sets `INVOCATION_ID` for every service it starts.
    pub fn detect() -> Self {
        if std::env::var_os("INVOCATION_ID").is_some() {
            Trigger::Systemd
        } else {
            Trigger::Supervisor
        }
    }
}

/// Downloads one URL to a file (the daemon's downloader; a fake in tests).
pub trait Fetch: Sync {
    fn fetch(&self, url: &str, dest: &Path, max_bytes: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// Starts the installer unit.
pub trait StartInstaller: Sync {
    fn start(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// What became of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The order names the running version.
    AlreadyRunning,
    /// The version failed recently; not tried again before `until` (Unix seconds).
    HeldOff { until: u64, reason: String },
    /// Refused before or by the installer; to be reported. The record, when the
    /// installer wrote one, is marked reported by the caller.
    Failed { reason: String, record: Option<Record> },
    /// The installer switched (this process is about to be replaced) or confirmed.
    Installed(Record),
    /// No verdict within the wait (a cron host whose supervisor has not run yet);
    /// the order stays staged.
    Pending,
}

pub fn now_unix() -> u64 {
    crate::link::now_unix()
}

/// The installer's last record, if readable.
pub fn last_record(state_dir: &Path) -> Option<Record> {
    let bytes = std::fs::read(hand::result_file(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Marks the record reported, so that the next start does not report it again; a
/// failure is also remembered by version (`upgrade/failures.json`) for the hold-off, since
/// the next upgrade (say, an operator's manual roll-back) replaces `result.json`.
pub fn mark_reported(state_dir: &Path, record: &Record) -> std::io::Result<()> {
    let mut r = record.clone();
    r.reported = true;
    if r.outcome.is_failure() {
        let mut failures = past_failures(state_dir);
        // Old entries cannot hold anything off any more.
        failures.retain(|_, f| f.at.saturating_add(FAILURE_MEMORY.as_secs()) > now_unix());
        failures.insert(r.version.clone(), r.clone());
        let bytes = serde_json::to_vec_pretty(&failures).map_err(std::io::Error::other)?;
        crate::daemon::write_atomic(&failures_file(state_dir), &bytes)?;
    }
    let bytes = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    crate::daemon::write_atomic(&hand::result_file(state_dir), &bytes)
}

/// How long a failed version is remembered (longer than any sensible hold-off).
const FAILURE_MEMORY: Duration = Duration::from_secs(30 * 24 * 3600);

fn failures_file(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade").join("failures.json")
}

fn past_failures(state_dir: &Path) -> std::collections::BTreeMap<String, Record> {
    std::fs::read(failures_file(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The last failure of `version`, from the last record or the remembered ones.
fn last_failure(state_dir: &Path, version: &str) -> Option<Record> {
    let last = last_record(state_dir).filter(|r| r.version == version && r.outcome.is_failure());
    let remembered = past_failures(state_dir).remove(version);
    match (last, remembered) {
        (Some(a), Some(b)) => Some(if a.at >= b.at { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// A failed upgrade the backend has not heard of (checked at start-up: the previous
/// release, revived after a revert, reports it).
pub fn unreported_failure(state_dir: &Path) -> Option<Record> {
    last_record(state_dir).filter(|r| r.outcome.is_failure() && !r.reported)
}

/// The failing StateLog that tells a backend of any protocol version about a failed
/// upgrade: for the last state of the current recipe (whose next round reports its real
/// result again), or for [`REPORT_STATE_ID`] when there is no recipe.
pub fn failure_log(recipe: Option<(u64, String)>, version: &str, running: &str, reason: &str) -> StateLog {
    let (recipe_version, state_id) = recipe.unwrap_or((0, REPORT_STATE_ID.to_string()));
    StateLog {
        recipe_version,
        state_id,
        result: false,
        comment: Some(format!("agent upgrade to {version} failed: {reason}; {running} keeps running")),
        stdout: None,
        seq: None,
        offline: false,
    }
}

/// Carries out one order. Never panics, never leaves a half-written order behind.
pub async fn carry_out<F: Fetch, S: StartInstaller>(
    s: &UpgradeSettings,
    order: &UpdateOrder,
    fetch: &F,
    starter: &S,
) -> Verdict {
    let failed = |reason: String| Verdict::Failed { reason, record: None };
    if order.version == s.running {
        return Verdict::AlreadyRunning;
    }
    if !hand::valid_version(&order.version) {
        return failed(format!("{:?} is not a release version", order.version));
    }
    if !(order.url.starts_with("https://") || order.url.starts_with("http://"))
        || order.url.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return failed(format!("the release URL {:?} is not an http(s) URL", order.url));
    }
    if let Some(r) = last_failure(&s.state_dir, &order.version) {
        let until = r.at.saturating_add(s.holdoff.as_secs());
        if now_unix() < until {
            return Verdict::HeldOff { until, reason: r.reason };
        }
    }
    let staged = hand::staged_dir(&s.state_dir);
    if let Err(e) = prepare_dir(&staged) {
        return failed(format!("cannot prepare {}: {e}", staged.display()));
    }
    let signature_url = format!("{}.minisig", order.url);
    for (url, name) in [(order.url.as_str(), hand::ARCHIVE), (signature_url.as_str(), hand::SIGNATURE)] {
        if let Err(e) = fetch.fetch(url, &staged.join(name), s.max_bytes).await {
            return failed(format!("download of {url} failed: {e}"));
        }
    }
    let ordered_at = now_unix();
    let staged_order =
        Order { version: order.version.clone(), url: order.url.clone(), from: s.running.clone(), ordered_at };
    let written = serde_json::to_vec_pretty(&staged_order)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::daemon::write_atomic(&staged.join(hand::ORDER), &b));
    if let Err(e) = written {
        return failed(format!("cannot write the staged order: {e}"));
    }
    tracing::info!(version = %order.version, trigger = ?s.trigger, "release downloaded and staged for the installer");
    if s.trigger == Trigger::Systemd {
        if let Err(e) = starter.start().await {
            let _ = std::fs::remove_file(staged.join(hand::ORDER));
            return failed(format!("cannot start {}: {e}", hand::UNIT));
        }
    }
    wait_for_verdict(s, &order.version, ordered_at).await
}

/// An empty staging directory (a previous, unfinished order is replaced).
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

async fn wait_for_verdict(s: &UpgradeSettings, version: &str, since: u64) -> Verdict {
    // No wait: the caller (`opsagent upgrade`) runs the installer itself afterwards. A
    // record of the same version from an earlier run in the same second (a refused
    // downgrade, retried once allowed) must not pass for this order's.
    if s.verdict_wait.is_zero() {
        return Verdict::Pending;
    }
    let deadline = tokio::time::Instant::now() + s.verdict_wait;
    loop {
        if let Some(r) = last_record(&s.state_dir).filter(|r| r.version == version && r.at >= since) {
            return if r.outcome.is_failure() {
                Verdict::Failed { reason: r.reason.clone(), record: Some(r) }
            } else {
                Verdict::Installed(r)
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Verdict::Pending;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts `opsagent-upgrade.service` on the system bus, as the `opsagent` user (polkit
/// decides; `polkit/50-opsagent.rules` allows exactly this unit and verb).
pub struct SystemdStarter;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
trait Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
}

impl StartInstaller for SystemdStarter {
    async fn start(&self) -> Result<(), String> {
        let conn = zbus::Connection::system().await.map_err(|e| format!("system bus: {e}"))?;
        let manager = ManagerProxy::new(&conn).await.map_err(|e| e.to_string())?;
        manager.start_unit(hand::UNIT, "replace").await.map(drop).map_err(|e| e.to_string())
    }
}

impl Fetch for crate::download::Downloader {
    async fn fetch(&self, url: &str, dest: &Path, max_bytes: u64) -> Result<(), String> {
        // The inherent method (retries, size cap, proxy rules of the link).
        crate::download::Downloader::fetch(self, url, dest, max_bytes).await.map(drop).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
