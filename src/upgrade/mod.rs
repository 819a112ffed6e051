//! Self-upgrade, the daemon's part: download, stage, hand over, learn the verdict.
//!
//! The daemon holds no privilege, so it never installs anything. On an `AgentUpdate`
//! (run by the engine between rounds) it downloads the archive and its `.minisig` into
//! `<state_dir>/upgrade/staged/`, writes the order last, and asks for the root installer:
//! under systemd by starting `opsagent-upgrade.service` over D-Bus (the polkit rule
//! allows exactly that), on cron-fallback hosts by leaving the order for the supervisor,
//! which runs the installer at its next pass. The installer's [`Record`] says how it
//! went; a failure is reported once (see [`UpgradeReports`]) — by this process when the
//! installer refused the release, or by the revived previous release after a revert.
//!
//! # The order's `url`
//! The original backend sent its own WebSocket URI as `url` (manager.py `__act_update`
//! passed it to `update.sh` as the new `WS_URI`; the release came from
//! `BASE_REMOTE/VERSION/`). So a `ws://`/`wss://` url is the backend to use from the new
//! release on (persisted in the state directory, see [`backend_override`]) and the release
//! is `[userdata] base_remote/VERSION/opsagent.tgz`; an `http(s)` url ending in `.tgz` is
//! the release archive itself.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_shared::upgrade::{self as hand, Order, Record};

use crate::round::UpdateOrder;

pub mod cli;

#[derive(Debug, Clone)]
pub struct UpgradeSettings {
    pub state_dir: PathBuf,
    /// `[userdata] base_remote`: where releases are when the order names a backend.
    pub base_remote: Option<String>,
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
    crate::timefmt::now_unix()
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
        crate::atomic_file::write_atomic(&failures_file(state_dir), &bytes)?;
    }
    let bytes = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    crate::atomic_file::write_atomic(&hand::result_file(state_dir), &bytes)
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

/// What an order asks for, once its `url` is understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The release archive (its signature is this URL + `.minisig`).
    pub release_url: String,
    /// The backend to use from the new release on (a `ws(s)://` url).
    pub backend: Option<String>,
}

fn plain_url(url: &str) -> bool {
    !url.is_empty() && !url.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Reads an order's `url` (see the module documentation).
pub fn resolve(order: &UpdateOrder, base_remote: Option<&str>) -> Result<Resolved, String> {
    let url = order.url.as_str();
    if !plain_url(url) {
        return Err(format!("the order's url {url:?} is not a URL"));
    }
    if url.starts_with("ws://") || url.starts_with("wss://") {
        let Some(base) = base_remote else {
            return Err(format!(
                "the order names the backend {url} and the release comes from [userdata] base_remote, which is not set"
            ));
        };
        let release_url = format!("{}/{}/opsagent.tgz", base.trim_end_matches('/'), order.version);
        return Ok(Resolved { release_url, backend: Some(url.to_string()) });
    }
    if (url.starts_with("https://") || url.starts_with("http://")) && url.ends_with(".tgz") {
        return Ok(Resolved { release_url: url.to_string(), backend: None });
    }
    Err(format!("the release URL {url:?} is not an http(s) URL of a .tgz, nor a ws(s):// backend URI"))
}

/// The backend URI an order named, kept for the release it installs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendOverride {
    pub ws_uri: String,
    /// The release that uses it; `None` once adopted by a running release.
    pub version: Option<String>,
}

/// `<state_dir>/backend.json`: the backend URI in force (adopted).
pub fn backend_file(state_dir: &Path) -> PathBuf {
    state_dir.join("backend.json")
}

/// `<state_dir>/upgrade/backend.json`: the URI waiting for its release to start.
fn pending_backend_file(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade").join("backend.json")
}

fn read_override(path: &Path) -> Option<BackendOverride> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_override(path: &Path, o: &BackendOverride) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(o).map_err(std::io::Error::other)?;
    crate::atomic_file::write_atomic(path, &bytes)
}

/// At start-up: the backend URI an AgentUpdate named, which replaces the configured one
/// (as the original's `update.sh` rewrote `WS_URI` in its config). A pending URI is
/// adopted when `running` is the release it was ordered with; one whose release never
/// came up (refused, reverted) is dropped.
pub fn backend_override(state_dir: &Path, running: &str) -> Option<String> {
    let pending = pending_backend_file(state_dir);
    if let Some(p) = read_override(&pending) {
        if p.version.as_deref() == Some(running) {
            let adopted = BackendOverride { ws_uri: p.ws_uri, version: None };
            match write_override(&backend_file(state_dir), &adopted) {
                Ok(()) => {
                    tracing::info!(backend = %adopted.ws_uri, version = running, "backend URI of the upgrade order adopted");
                    let _ = std::fs::remove_file(&pending);
                }
                Err(e) => tracing::error!(error = %e, "cannot adopt the backend URI of the upgrade order"),
            }
        } else if last_record(state_dir)
            .is_some_and(|r| Some(&r.version) == p.version.as_ref() && r.outcome.is_failure())
        {
            tracing::warn!(backend = %p.ws_uri, "the upgrade that named this backend failed; its URI is not used");
            let _ = std::fs::remove_file(&pending);
        }
    }
    read_override(&backend_file(state_dir)).map(|o| o.ws_uri)
}

/// A failed upgrade, as `opsagent status` shows it and the `upgrade-report` extension
/// sends it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeFailure {
    pub version: String,
    pub running: String,
    pub reason: String,
    pub at_unix: u64,
}

/// Failed upgrades waiting for the backend link. The backend hears of each once: through
/// `UpgradeReport` when it announced `upgrade-report`, and otherwise not at all (a
/// failing StateLog would name a state it never sent): then the log and `opsagent
/// status` are where it is said.
#[derive(Debug, Default)]
pub struct UpgradeReports {
    inner: std::sync::Mutex<(Option<UpgradeFailure>, Option<UpgradeFailure>)>,
}

impl UpgradeReports {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<UpgradeFailure>, Option<UpgradeFailure>)> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new failure: the last one shown, and pending for the next session.
    pub fn push(&self, f: UpgradeFailure) {
        let mut g = self.lock();
        g.0 = Some(f.clone());
        g.1 = Some(f);
    }

    /// The pending report, taken: the link sends it (extension) or drops it (v1).
    pub fn take_pending(&self) -> Option<UpgradeFailure> {
        self.lock().1.take()
    }

    /// The last failure of this process's life, for `opsagent status`.
    pub fn last(&self) -> Option<UpgradeFailure> {
        self.lock().0.clone()
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
        // The release is there already; a backend it names is used from the next start.
        if let Ok(Resolved { backend: Some(ws_uri), .. }) = resolve(order, s.base_remote.as_deref()) {
            match write_override(&backend_file(&s.state_dir), &BackendOverride { ws_uri, version: None }) {
                Ok(()) => tracing::info!("the ordered backend URI is used from the next start"),
                Err(e) => tracing::error!(error = %e, "cannot keep the ordered backend URI"),
            }
        }
        return Verdict::AlreadyRunning;
    }
    if !hand::valid_version(&order.version) {
        return failed(format!("{:?} is not a release version", order.version));
    }
    let resolved = match resolve(order, s.base_remote.as_deref()) {
        Ok(r) => r,
        Err(reason) => return failed(reason),
    };
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
    let signature_url = format!("{}.minisig", resolved.release_url);
    for (url, name) in [(resolved.release_url.as_str(), hand::ARCHIVE), (signature_url.as_str(), hand::SIGNATURE)] {
        if let Err(e) = fetch.fetch(url, &staged.join(name), s.max_bytes).await {
            return failed(format!("download of {url} failed: {e}"));
        }
    }
    let ordered_at = now_unix();
    let staged_order = Order {
        version: order.version.clone(),
        url: resolved.release_url.clone(),
        from: s.running.clone(),
        ordered_at,
    };
    let pending = pending_backend_file(&s.state_dir);
    let _ = std::fs::remove_file(&pending);
    if let Some(ws_uri) = &resolved.backend {
        let o = BackendOverride { ws_uri: ws_uri.clone(), version: Some(order.version.clone()) };
        if let Err(e) = write_override(&pending, &o) {
            return failed(format!("cannot keep the ordered backend URI in {}: {e}", pending.display()));
        }
    }
    let written = serde_json::to_vec_pretty(&staged_order)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::atomic_file::write_atomic(&staged.join(hand::ORDER), &b));
    if let Err(e) = written {
        return failed(format!("cannot write the staged order: {e}"));
    }
    tracing::info!(version = %order.version, trigger = ?s.trigger, "release downloaded and staged for the installer");
    if s.trigger == Trigger::Systemd {
        if let Err(e) = starter.start().await {
            let _ = std::fs::remove_file(staged.join(hand::ORDER));
            let _ = std::fs::remove_file(&pending);
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
