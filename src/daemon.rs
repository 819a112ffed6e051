//! `opsagent run`: wires configuration, identity, the spool, the helper, the round engine,
//! the backend link and systemd together, and shuts them down in order.
//!
//! Start-up order matters for systemd: READY=1 is sent once the configuration is valid,
//! the state directory is usable and the helper answers — not when the backend is
//! reachable, so a network outage never fails the start.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};

use crate::atomic_file::write_atomic;
use crate::config::Config;
use crate::download::{DownloadSettings, Downloader};
use crate::helper_client::{Fetcher, HelperClient, UnixHelperClient};
use crate::instance_identity as identity;
use crate::link::{Link, LinkConfig, LinkStatus, Outbox};
use crate::net::ProxySettings;
use crate::protocol::{Identity, StateLog};
use crate::recipe::Recipe;
use crate::round::{DriftReport, Effects, Engine, EngineConfig, EngineStatus, Snapshot, StopMode, UpdateOrder};
use crate::spool::{Spool, SpoolLimits};
use crate::upgrade::{self, Fetch, SystemdStarter, Trigger, UpgradeFailure, UpgradeReports, UpgradeSettings, Verdict};
use opsagent_shared::upgrade::{Health, Record};

/// The most log text a `FetchLogs` answer holds, whatever the backend asks (as
/// `opsagent logs --bundle` by default).
const LOGS_CAP: u64 = crate::logbundle::DEFAULT_MAX_BYTES;

/// The whole upload of a log bundle to a backend's `upload_url`.
const LOGS_UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long start-up waits for the helper to answer before giving up (systemd restarts
/// the unit, and the journal says why).
const HELPER_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("log uploads: {0}")]
    Upload(#[from] crate::logupload::UploadError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("identity: {0}")]
    Identity(#[from] crate::instance_identity::IdentityError),
    #[error("the helper did not answer within {secs} s: {last}")]
    Helper { secs: u64, last: String },
    #[error("link: {0}")]
    Link(#[from] crate::link::LinkError),
    #[error("downloads: {0}")]
    Download(#[from] crate::download::DownloadError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Lock(#[from] crate::state_lock::LockError),
}

/// How often StateLogs held in memory (the spool could not take them) are offered to the
/// spool again when no new StateLog comes to retry it.
pub const HELD_RETRY: Duration = Duration::from_secs(2);

/// The spool as the engine writes it and the link drains it.
///
/// When the spool cannot grow (its filesystem is full, an I/O error), a StateLog is not
/// thrown away: it is held in memory, in order, and spooled (so only then sent: nothing is
/// sent before it is durable) as soon as a write succeeds again — on the next StateLog or
/// on [`SharedSpool::retry_held`]. The hold is bounded by the spool's record bound; past it
/// the oldest held StateLog is dropped and counted, as the spool's own bounds do.
pub struct SharedSpool {
    inner: Mutex<Inner>,
    added: Arc<Notify>,
}

struct Inner {
    spool: Spool,
    held: std::collections::VecDeque<StateLog>,
    /// Held StateLogs dropped by the bound since the spool last took one.
    held_dropped: u64,
    /// The error that started the current spell of failed writes (logged once).
    failing: Option<String>,
}

impl Inner {
    /// Spools held StateLogs in order until one fails; true when none is left.
    fn drain_held(&mut self) -> bool {
        while let Some(log) = self.held.pop_front() {
            if let Err(e) = self.spool.append(log.clone()) {
                self.held.push_front(log);
                self.note_failure(&e);
                return false;
            }
        }
        if let Some(error) = self.failing.take() {
            tracing::info!(
                earlier_error = %error, dropped = self.held_dropped,
                "the spool takes StateLogs again; the ones held in memory are spooled"
            );
            self.held_dropped = 0;
        }
        true
    }

    /// Logs the first failure of a spell, not every retry.
    fn note_failure(&mut self, e: &crate::spool::SpoolError) {
        if self.failing.is_none() {
            tracing::error!(
                error = %e,
                "cannot spool StateLogs: holding them in memory (not sent until spooled) and retrying"
            );
            self.failing = Some(e.to_string());
        }
    }

    fn hold(&mut self, log: StateLog) {
        let bound = self.spool.limits().max_records.max(1);
        while self.held.len() >= bound {
            self.held.pop_front();
            self.held_dropped += 1;
        }
        self.held.push_back(log);
    }
}

impl SharedSpool {
    pub fn new(spool: Spool) -> Self {
        let inner = Inner { spool, held: Default::default(), held_dropped: 0, failing: None };
        Self { inner: Mutex::new(inner), added: Arc::new(Notify::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the spool's files inconsistent
        // (every write is framed and fsynced), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn append(&self, log: StateLog) {
        let mut inner = self.lock();
        let had_held = !inner.held.is_empty();
        // Held StateLogs go first: sequence numbers follow the order the states ran in.
        if !inner.drain_held() {
            inner.hold(log);
            return;
        }
        match inner.spool.append(log.clone()) {
            Ok(_) => self.added.notify_one(),
            Err(e) => {
                inner.note_failure(&e);
                inner.hold(log);
                if had_held {
                    self.added.notify_one();
                }
            }
        }
    }

    /// Offers the held StateLogs to the spool again; true when none is left held.
    pub fn retry_held(&self) -> bool {
        let mut inner = self.lock();
        if inner.held.is_empty() {
            return true;
        }
        let before = inner.held.len();
        let done = inner.drain_held();
        if inner.held.len() < before {
            self.added.notify_one();
        }
        done
    }

    /// StateLogs held in memory because the spool could not take them.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// The most StateLogs the spool holds undelivered before it drops the oldest.
    pub fn capacity(&self) -> usize {
        self.lock().spool.limits().max_records
    }

    pub fn depth(&self) -> (usize, u64) {
        let s = self.lock();
        (s.spool.depth(), s.spool.dropped() + s.held_dropped)
    }
}

/// Retries the held StateLogs every [`HELD_RETRY`] until the daemon stops.
async fn retry_held(spool: Arc<SharedSpool>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HELD_RETRY);
    loop {
        tokio::select! {
            _ = tick.tick() => { spool.retry_held(); }
            _ = stop.changed() => {
                spool.retry_held();
                return;
            }
        }
    }
}

impl Outbox for SharedSpool {
    fn pending_after(&self, seq: u64) -> Vec<StateLog> {
        self.lock().spool.pending_from(seq.saturating_add(1)).cloned().collect()
    }

    fn delivered(&self, seq: u64, cumulative: bool) {
        let s = &mut self.lock().spool;
        let r = if cumulative { s.ack_through(seq).map(|_| ()) } else { s.ack(seq).map(|_| ()) };
        if let Err(e) = r {
            tracing::error!(error = %e, seq, "cannot record a delivery; the StateLog may be sent again");
        }
    }

    fn added(&self) -> Arc<Notify> {
        self.added.clone()
    }

    fn depth(&self) -> Option<u64> {
        Some(SharedSpool::depth(self).0 as u64)
    }
}

/// The persisted recipe and wait marks (`<state_dir>/recipe.json`), as read back.
#[derive(Debug, Deserialize)]
struct Persisted {
    version: u64,
    recipe: Value,
    done: BTreeSet<String>,
}

/// [`Persisted`] as written: the recipe serialised from the states the engine holds, so a
/// 10,000-state recipe is not copied into a document value first (that copy was ~1.2 KB a
/// state at the round's peak).
#[derive(Serialize)]
struct PersistedRef<'a> {
    version: u64,
    recipe: crate::recipe::Document<'a>,
    done: &'a BTreeSet<String>,
}

/// The bytes of `<state_dir>/recipe.json` for `snapshot`.
pub fn persisted_bytes(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&PersistedRef {
        version: snapshot.version,
        recipe: snapshot.recipe.document(),
        done: &snapshot.done,
    })
}

/// Where downloads for the helper wait until their state has run (emptied at start).
pub fn fetch_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fetch")
}

pub fn recipe_file(state_dir: &Path) -> PathBuf {
    state_dir.join("recipe.json")
}

pub fn load_snapshot(state_dir: &Path) -> Option<Snapshot> {
    let path = recipe_file(state_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    let parsed = serde_json::from_str::<Persisted>(&text)
        .map_err(|e| e.to_string())
        .and_then(|p| Recipe::from_document(&p.recipe).map(|r| (p, r)).map_err(|e| e.to_string()));
    match parsed {
        Ok((p, recipe)) => {
            tracing::info!(version = p.version, states = recipe.states.len(), "resuming the persisted recipe");
            Some(Snapshot { version: p.version, recipe: Arc::new(recipe), done: p.done })
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "persisted recipe unreadable; waiting for the backend");
            None
        }
    }
}

struct DaemonEffects<F> {
    spool: Arc<SharedSpool>,
    /// The latest snapshot to persist; [`persist_snapshots`] writes it in the background.
    persist: watch::Sender<Option<Snapshot>>,
    /// Failed upgrades for the link (extension) and the status file.
    reports: Arc<UpgradeReports>,
    upgrade: UpgradeSettings,
    fetch: F,
    drift: Arc<crate::drift::DriftBoard>,
}

impl<F> DaemonEffects<F> {
    /// Said once: in the log now, in `opsagent status`, and to a backend that announced
    /// `upgrade-report` at its next session. Never as a StateLog: a failing StateLog for
    /// a recipe state would be a state failure the backend never caused.
    fn report_upgrade_failure(&self, version: &str, reason: &str, record: Option<&Record>) {
        tracing::error!(message_id = opsagent_logline::catalog::UPGRADE_FAILED, version, reason, running = %self.upgrade.running, "agent upgrade failed");
        self.reports.push(UpgradeFailure {
            version: version.to_string(),
            running: self.upgrade.running.clone(),
            reason: reason.to_string(),
            at_unix: upgrade::now_unix(),
        });
        if let Some(r) = record {
            if let Err(e) = upgrade::mark_reported(&self.upgrade.state_dir, r) {
                tracing::warn!(error = %e, "cannot mark the upgrade record reported; it may be reported again");
            }
        }
    }

    /// At start-up: the installer's last record. A failure the backend has not heard of
    /// (this is the previous release, revived after a revert) is reported now; it is
    /// delivered once the link is up.
    fn report_last_upgrade(&self) {
        let Some(r) = upgrade::last_record(&self.upgrade.state_dir).filter(|r| !r.reported) else { return };
        if r.outcome.is_failure() {
            let reason = format!("{:?}: {}", r.outcome, r.reason).to_lowercase();
            self.report_upgrade_failure(&r.version, &reason, Some(&r));
        } else if r.version == self.upgrade.running {
            tracing::info!(from = %r.from, version = %r.version, outcome = ?r.outcome, "running after an upgrade");
            let _ = upgrade::mark_reported(&self.upgrade.state_dir, &r);
        }
    }
}

/// Writes persisted snapshots off the engine's path: a new recipe's first state must not
/// wait for an fsync. Only the latest snapshot matters, so a burst is written once; the
/// last one is still written after the engine has stopped (the sender is dropped).
async fn persist_snapshots(state_dir: PathBuf, mut rx: watch::Receiver<Option<Snapshot>>) {
    while rx.changed().await.is_ok() {
        let Some(snapshot) = rx.borrow_and_update().clone() else { continue };
        let path = recipe_file(&state_dir);
        let r = tokio::task::spawn_blocking(move || {
            persisted_bytes(&snapshot).map_err(std::io::Error::other).and_then(|b| write_atomic(&path, &b))
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(dir = %state_dir.display(), error = %e, "cannot persist the recipe"),
            Err(e) => tracing::error!(error = %e, "the recipe writer failed"),
        }
    }
}

impl<F: Fetch + Send + Sync> Effects for DaemonEffects<F> {
    async fn report(&mut self, log: StateLog) {
        self.spool.append(log);
    }

    async fn persist(&mut self, snapshot: &Snapshot) {
        self.persist.send_replace(Some(snapshot.clone()));
    }

    async fn drift(&mut self, report: DriftReport) {
        self.drift.post(report);
    }

    fn undelivered(&self) -> Option<(usize, usize)> {
        let (depth, _) = self.spool.depth();
        Some((depth + self.spool.held(), self.spool.capacity()))
    }

    async fn upgrade(&mut self, order: &UpdateOrder) {
        // The engine runs this once, between rounds; the privileged part is the
        // installer's (see crate::upgrade).
        tracing::info!(version = %order.version, url = %order.url, running = %self.upgrade.running, "upgrade ordered");
        match upgrade::carry_out(&self.upgrade, order, &self.fetch, &SystemdStarter).await {
            Verdict::AlreadyRunning => tracing::info!(version = %order.version, "already running the ordered version"),
            Verdict::HeldOff { until, reason } => tracing::warn!(
                version = %order.version, until = %crate::timefmt::utc(until), reason = %reason,
                "this version failed recently; not tried again before the hold-off ends ([upgrade] holdoff)"
            ),
            Verdict::Failed { reason, record } => self.report_upgrade_failure(&order.version, &reason, record.as_ref()),
            Verdict::Installed(r) => {
                tracing::info!(version = %r.version, outcome = ?r.outcome, reason = %r.reason, "the installer took over")
            }
            Verdict::Pending => tracing::warn!(
                version = %order.version,
                "release staged; no verdict from the installer yet (without systemd the cron supervisor installs it)"
            ),
        }
    }
}

/// Where `opsagent status` finds the running daemon's status.
pub fn status_file(state_dir: &Path) -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(dir) => PathBuf::from(dir).join("status.json"),
        None => state_dir.join("status.json"),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub instance_id: String,
    pub app_id: String,
    pub agent_version: String,
    pub summary: String,
    pub link: Value,
    pub engine: Value,
    pub spool_depth: usize,
    pub spool_dropped: u64,
    /// StateLogs held in memory because the spool cannot grow (its filesystem is full):
    /// spooled, then sent, once it can.
    #[serde(default)]
    pub spool_held: usize,
    /// The round's figures, as in the metrics file.
    #[serde(default)]
    pub metrics: crate::metrics::Figures,
    /// The last failed self-upgrade of this daemon's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_failure: Option<UpgradeFailure>,
    /// The latest drift plan's report (`[agent] drift_interval`, `PlanRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftReport>,
    /// The helper has a `recipe_key` and runs only recipes the backend signed (as it
    /// said when the daemon started).
    #[serde(default)]
    pub recipes_verified: bool,
}

pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Identity self-check: the network daemon is meant to hold no privilege at all.
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        tracing::warn!("running as root: install opsagent.service to run the daemon as the unprivileged opsagent user");
    } else {
        tracing::info!(uid = uid.as_raw(), "running unprivileged");
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (ws_uri, app_id) = config.require_backend()?;
    let (mut ws_uri, app_id) = (ws_uri.to_string(), app_id.to_string());
    let state_dir = config.agent.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .map_err(|source| DaemonError::StateDir { path: state_dir.display().to_string(), source })?;
    // Held until run() returns: a second daemon on this directory refuses to start.
    let _state_dir_lock = crate::state_lock::StateDirLock::acquire(&state_dir)?;
    // A backend URI named by an AgentUpdate replaces the configured one.
    if let Some(ordered) = upgrade::backend_override(&state_dir, crate::version::running()) {
        if ordered != ws_uri {
            tracing::info!(configured = %ws_uri, backend = %ordered, "using the backend URI named by the last upgrade order");
            ws_uri = ordered;
        }
    }
    let probe = state_dir.join(".writable");
    write_atomic(&probe, b"ok")
        .map_err(|source| DaemonError::StateDir { path: state_dir.display().to_string(), source })?;
    let _ = std::fs::remove_file(&probe);

    let mut init_errors = Vec::new();
    let instance_id = match &config.userdata.instance_id {
        Some(id) => id.clone(),
        None => {
            identity::MetadataClient::new(&config.userdata.metadata_url, identity::RetryPolicy::default())?
                .instance_id()
                .await?
        }
    };
    let token = match identity::load_or_create_token(&config.agent.token_file, &app_id) {
        Ok(t) => t,
        Err(e) => {
            init_errors.push(format!("instance token: {e}"));
            String::new()
        }
    };
    let who = Identity {
        instance_id: instance_id.clone(),
        app_id: app_id.clone(),
        instance_token: token,
        agent_version: crate::version::running().to_string(),
    };

    let spool = Spool::open(&state_dir.join("spool"), SpoolLimits::default())?;
    let spool = Arc::new(SharedSpool::new(spool));

    // Downloads follow the link's proxy rules and trust its extra CA bundle.
    let proxy = ProxySettings::from_env(config.link.proxy.as_deref(), config.link.no_proxy.as_deref());
    let downloader = Downloader::new(DownloadSettings {
        proxy: proxy.clone(),
        timeout: config.agent.download_timeout,
        extra_roots: config.link.ca_file.iter().cloned().collect(),
        ..DownloadSettings::default()
    })?;
    let fetch_dir = fetch_dir(&state_dir);
    let fetcher = Fetcher::new(downloader, fetch_dir.clone(), config.agent.download_max_bytes)
        .map_err(|source| DaemonError::StateDir { path: fetch_dir.display().to_string(), source })?;
    let helper = UnixHelperClient::new(&config.agent.helper_socket, crate::version::running()).with_fetcher(fetcher);
    let recipes_verified = wait_for_helper(&helper).await?.recipes_verified;
    if recipes_verified {
        tracing::info!("the helper verifies recipes: only recipes signed by its recipe_key run");
    } else {
        tracing::warn!(
            message_id = opsagent_logline::catalog::RECIPES_NOT_VERIFIED,
            "recipes are not verified: the helper has no recipe_key, so whoever controls this daemon or its backend link controls root (see \"Signed recipes\" in the README)"
        );
    }
    // Missing tools of a state installed first, as the original's `require` entries did.
    let helper = crate::prereq::Prerequisites::new(helper, config.agent.install_prerequisites);

    let resume = load_snapshot(&state_dir);
    let engine_cfg = EngineConfig {
        round_delay: config.agent.round_delay,
        retry_delay: config.agent.retry_delay,
        retry_delay_max: config.agent.retry_delay_max,
        drift_interval: config.agent.drift_interval,
        ..EngineConfig::default()
    };
    let drift = Arc::new(crate::drift::DriftBoard::default());
    let (persist_tx, persist_rx) = watch::channel(None);
    let reports = Arc::new(UpgradeReports::default());
    let persister = tokio::spawn(persist_snapshots(state_dir.clone(), persist_rx));
    let upgrade_settings = UpgradeSettings {
        state_dir: state_dir.clone(),
        base_remote: config.userdata.base_remote.clone(),
        running: crate::version::running().to_string(),
        holdoff: config.upgrade.holdoff,
        max_bytes: config.upgrade.max_bytes as u64,
        verdict_wait: Duration::from_secs(180),
        trigger: Trigger::detect(),
    };
    let effects = DaemonEffects {
        spool: spool.clone(),
        persist: persist_tx,
        reports: reports.clone(),
        upgrade: upgrade_settings,
        fetch: Downloader::new(DownloadSettings {
            proxy: proxy.clone(),
            timeout: config.agent.download_timeout,
            extra_roots: config.link.ca_file.iter().cloned().collect(),
            ..DownloadSettings::default()
        })?,
        drift: drift.clone(),
    };
    effects.report_last_upgrade();
    let (engine, handle) = Engine::new(helper, effects, engine_cfg, resume);

    let (stop_tx, stop_rx) = watch::channel(false);
    let link_cfg = LinkConfig {
        ws_uri: ws_uri.clone(),
        ca_file: config.link.ca_file.clone(),
        tls_insecure: config.link.tls_insecure,
        allow_insecure_transport: config.agent.allow_insecure_transport,
        proxy: proxy.clone(),
        ping_interval: config.link.ping_interval,
        heartbeat_interval: config.link.heartbeat_interval,
        max_frame: config.link.max_frame,
        max_bad_frames: config.link.max_bad_frames,
        backoff_base: config.link.backoff_base,
        backoff_max: config.link.backoff_max,
        ..LinkConfig::default()
    };
    let proxy_for_logs = proxy;
    let init = (!init_errors.is_empty()).then(|| init_errors.join("; "));
    let (link, link_status, link_live) = Link::new(
        link_cfg,
        who.clone(),
        init,
        spool.clone(),
        handle.events.clone(),
        handle.status.clone(),
        stop_rx.clone(),
    )?;
    let logs = log_service(&config, proxy_for_logs)?;
    let mut link = link.with_upgrade_reports(reports.clone()).with_drift(drift.clone()).with_logs(Arc::new(logs));
    if !config.app_id_pinned {
        link = link.with_identity_refresh(userdata_refresh(&config)?);
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;

    let engine_task = tokio::spawn(engine.run());
    let link_task = tokio::spawn(link.run());
    let supervisor = tokio::spawn(crate::service_notify::supervise(
        vec![("round engine", handle.liveness.clone()), ("link", link_live)],
        link_status.clone(),
        handle.status.clone(),
        stop_rx.clone(),
    ));
    let health_task = tokio::spawn(confirm_health(state_dir.clone(), link_status.clone()));
    let held_task = tokio::spawn(retry_held(spool.clone(), stop_rx.clone()));
    let status_task = tokio::spawn(write_status(
        status_file(&state_dir),
        config.agent.metrics_file.clone(),
        Fixed { who, recipes_verified },
        spool.clone(),
        reports,
        drift,
        link_status,
        handle.status.clone(),
        stop_rx,
    ));
    crate::service_notify::ready();
    tracing::info!(instance_id = %instance_id, app_id = %app_id, backend = %ws_uri, "opsagent ready");

    let events = handle.events.clone();
    let mut engine_task = engine_task;
    let asked = tokio::select! {
        _ = sigterm.recv() => Some(("SIGTERM", StopMode::AfterState)),
        _ = sigint.recv() => Some(("SIGINT", StopMode::AfterState)),
        _ = sigusr1.recv() => Some(("SIGUSR1", StopMode::AfterRound)),
        _ = &mut engine_task => None,
    };
    if let Some((signal_name, mode)) = asked {
        tracing::info!(signal = signal_name, ?mode, "stop requested");
        if mode == StopMode::AfterState {
            crate::service_notify::stopping();
        }
        let _ = events.send(crate::round::Event::Stop(mode)).await;
        // A SIGTERM while waiting for the round to end turns it into a prompt stop.
        loop {
            tokio::select! {
                _ = &mut engine_task => break,
                _ = sigterm.recv() => {
                    crate::service_notify::stopping();
                    let _ = events.send(crate::round::Event::Stop(StopMode::AfterState)).await;
                }
            }
        }
    }
    // The engine (and with it the snapshot sender) is gone: the last snapshot is written.
    let _ = tokio::time::timeout(Duration::from_secs(10), persister).await;
    // The engine is done: let the link deliver what is spooled, then close.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), link_task).await;
    supervisor.abort();
    held_task.abort();
    status_task.abort();
    health_task.abort();
    // A status file left behind would describe a daemon that is gone.
    let _ = std::fs::remove_file(status_file(&state_dir));
    tracing::info!("opsagent stopped");
    Ok(())
}

/// The original re-read the instance userdata at every connection (manager.py
/// `__update_ud`) and reset the token when `APP_ID` changed (`token_reset`): so do we.
/// One quick attempt (the metadata service is local); no answer keeps the identity.
/// What answers a backend's `FetchLogs`: the journal on hosts booted with systemd, the
/// cron supervisor's log files elsewhere (as `opsagent logs --bundle` chooses).
fn log_service(config: &Config, proxy: ProxySettings) -> Result<crate::logframes::LogService, DaemonError> {
    use crate::logbundle::{Journal, LogFiles, LogSource};
    let source: Arc<dyn LogSource + Send + Sync> = if Path::new("/run/systemd/system").is_dir() {
        Arc::new(Journal::default())
    } else {
        Arc::new(LogFiles { agent_dir: config.agent.log_dir.clone(), root_dir: config.agent.helper_log_dir.clone() })
    };
    let uploader = crate::logupload::Uploader::new(crate::logupload::UploadSettings {
        proxy,
        timeout: LOGS_UPLOAD_TIMEOUT,
        extra_roots: config.link.ca_file.iter().cloned().collect(),
        allow_insecure: config.agent.allow_insecure_transport,
    })?;
    Ok(crate::logframes::LogService::new(source, LOGS_CAP, uploader))
}

fn userdata_refresh(config: &Config) -> Result<crate::link::IdentityRefresh, DaemonError> {
    let policy = identity::RetryPolicy { attempts: 1, request_timeout: Duration::from_secs(2), ..Default::default() };
    let client = Arc::new(identity::MetadataClient::new(&config.userdata.metadata_url, policy)?);
    let token_file = config.agent.token_file.clone();
    Ok(Arc::new(move |who: Identity| {
        let (client, token_file) = (client.clone(), token_file.clone());
        Box::pin(async move {
            let ud = match client.userdata().await {
                Ok(Some(ud)) => ud,
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "instance userdata not re-read");
                    return None;
                }
            };
            let app = ud.app_id.as_deref().map(str::trim).filter(|a| !a.is_empty())?;
            if app == who.app_id {
                return None;
            }
            let app = match crate::config::identifier(app) {
                Ok(a) => a,
                Err(problem) => {
                    tracing::warn!(%problem, "APP_ID of the instance userdata unusable; identity kept");
                    return None;
                }
            };
            // A token belongs to one app: another app resets it.
            let token = match identity::load_or_create_token(&token_file, &app) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reset the instance token for the new app; identity kept");
                    return None;
                }
            };
            tracing::info!(from = %who.app_id, to = %app, "APP_ID changed in the instance userdata: token reset");
            Some(Identity { app_id: app, instance_token: token, ..who })
        }) as futures_util::future::BoxFuture<'static, Option<Identity>>
    }))
}

/// Writes `health.json` once the backend has accepted this daemon's Handshake (it sent
/// a recipe): the upgrade installer's health gate waits for it. READY=1 was sent before.
async fn confirm_health(state_dir: PathBuf, mut link: watch::Receiver<LinkStatus>) {
    loop {
        if matches!(link.borrow_and_update().state, crate::link::LinkState::Connected { .. }) {
            let health = Health {
                version: crate::version::running().to_string(),
                pid: std::process::id(),
                handshake_at: upgrade::now_unix(),
            };
            let path = opsagent_shared::upgrade::health_file(&state_dir);
            let r = serde_json::to_vec(&health).map_err(std::io::Error::other).and_then(|b| write_atomic(&path, &b));
            match r {
                Ok(()) => tracing::info!(version = %health.version, "handshake completed; health confirmed"),
                Err(e) => tracing::error!(error = %e, path = %path.display(), "cannot confirm health"),
            }
            return;
        }
        if link.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_for_helper(helper: &UnixHelperClient) -> Result<opsagent_proto::request::HelperStatus, DaemonError> {
    let deadline = tokio::time::Instant::now() + HELPER_WAIT;
    let mut logged = false;
    loop {
        match helper.status().await {
            Ok(s) => {
                tracing::info!(helper_version = %s.helper_version, socket = %helper.path().display(), "helper answers");
                return Ok(s);
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(DaemonError::Helper { secs: HELPER_WAIT.as_secs(), last: e.to_string() })
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, "waiting for the helper");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Keeps the status file (and the metrics file, when configured) current: every second,
/// and at once when a round ends. Round starts and ends are stamped with the wall clock
/// as they are seen ([`crate::metrics::RoundClock`]); the files are written only when
/// their content changed.
/// What the status file says that does not change while the daemon runs.
struct Fixed {
    who: Identity,
    /// The helper said at start that it verifies recipes.
    recipes_verified: bool,
}

#[allow(clippy::too_many_arguments)] // each is one independent source of the report
async fn write_status(
    path: PathBuf,
    metrics_path: Option<PathBuf>,
    Fixed { who, recipes_verified }: Fixed,
    spool: Arc<SharedSpool>,
    reports: Arc<UpgradeReports>,
    drift: Arc<crate::drift::DriftBoard>,
    link: watch::Receiver<LinkStatus>,
    mut engine: watch::Receiver<EngineStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = Vec::new();
    let mut last_metrics = String::new();
    let mut metrics_error: Option<String> = None;
    let mut clock = crate::metrics::RoundClock::default();
    let now_unix =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = engine.changed() => {
                if changed.is_err() {
                    return;
                }
                // Most engine changes (each state's phase) wait for the next tick.
                if !clock.observe(&engine.borrow_and_update(), now_unix()) {
                    continue;
                }
            }
            _ = stop.changed() => return,
        }
        clock.observe(&engine.borrow(), now_unix());
        let (depth, dropped) = spool.depth();
        let metrics = crate::metrics::Figures::new(&engine.borrow(), &link.borrow(), &clock, (depth, dropped));
        if let Some(metrics_path) = &metrics_path {
            let labels = crate::metrics::Labels {
                version: &who.agent_version,
                instance_id: &who.instance_id,
                app_id: &who.app_id,
            };
            let text = crate::metrics::render(&metrics, &labels);
            if text != last_metrics {
                match write_atomic(metrics_path, text.as_bytes()) {
                    Ok(()) => {
                        if metrics_error.take().is_some() {
                            tracing::info!(path = %metrics_path.display(), "the metrics file is written again");
                        }
                        last_metrics = text;
                    }
                    // Once per condition, not every second.
                    Err(e) if metrics_error.as_deref() != Some(&e.to_string()) => {
                        tracing::warn!(error = %e, path = %metrics_path.display(), "cannot write the metrics file");
                        metrics_error = Some(e.to_string());
                    }
                    Err(_) => {}
                }
            }
        }
        let report = StatusReport {
            pid: std::process::id(),
            instance_id: who.instance_id.clone(),
            app_id: who.app_id.clone(),
            agent_version: who.agent_version.clone(),
            summary: crate::service_notify::status_line(&link.borrow(), &engine.borrow()),
            link: serde_json::to_value(&*link.borrow()).unwrap_or(Value::Null),
            engine: serde_json::to_value(&*engine.borrow()).unwrap_or(Value::Null),
            spool_depth: depth,
            spool_dropped: dropped,
            spool_held: spool.held(),
            metrics,
            upgrade_failure: reports.last(),
            drift: drift.last(),
            recipes_verified,
        };
        let bytes = serde_json::to_vec_pretty(&report).unwrap_or_default();
        if bytes != last {
            if let Err(e) = write_atomic(&path, &bytes) {
                tracing::debug!(error = %e, path = %path.display(), "cannot write the status file");
            }
            last = bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recipe store: what the engine persists is what a restarted daemon resumes,
    /// signature, pins, module info and wait marks included.
    #[test]
    fn a_persisted_snapshot_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = Recipe::from_document(&serde_json::json!({"recipe_version": 3, "signature": "SIG",
            "module": {"repo": "r"}, "state": [
            {"id": "w", "module": "meta.wait", "parameter": {"state": "@{x.y}"}},
            {"id": "f", "module": "linux.file", "parameter": {"path": "/tmp/x", "content": "a"},
             "fetch_sha256": {"http://h/x": "ab"}},
            {"id": "", "module": "meta.comment", "parameter": {}}
        ]}))
        .unwrap();
        let snap = Snapshot { version: 3, recipe: Arc::new(recipe), done: ["w".to_string()].into_iter().collect() };
        write_atomic(&recipe_file(dir.path()), &persisted_bytes(&snap).unwrap()).unwrap();
        let back = load_snapshot(dir.path()).expect("loads");
        assert_eq!(back, snap);
        assert!(matches!(&back.recipe.signed, Some(Ok(u)) if u.signature == "SIG"));
    }
}
