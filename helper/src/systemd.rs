//! Services: systemd over D-Bus, or the `service` command where systemd is not PID 1.
//!
//! The D-Bus surface is hand-written and minimal (the members used below, nothing
//! else), so that an auditor reads all of it here. A job is started the way the
//! systemd documentation asks: subscribe to `JobRemoved` *before* calling
//! `StartUnit`/`ReloadUnit`/`RestartUnit` (a fast job could otherwise end before we
//! listen), wait for the signal of *our* job, treat any result but `done` as a
//! failure, then read `ActiveState` again without the proxy's property cache.
//!
//! The same holds for `StartTransientUnit` (a transient unit made and started in one
//! job), which `linux.mount` uses so that systemd, in the host's mount namespace,
//! mounts for the sandboxed helper; `Reload` (daemon-reload) is a plain call that
//! returns once the manager has reloaded.
//!
//! Authorization: systemd lets uid 0 manage units without asking polkit (checked on
//! systemd 252 with CAP_SYS_ADMIN dropped, as the helper runs), so the helper needs no
//! capability for this.

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use futures_util_lite::next;
use opsagent_proto::newtypes::{InvalidValue, UnitName};
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit, ToolError};

/// How long a start, reload or restart job may take before the state gives up on it
/// (systemd's own default start timeout is 90 s; units may set more).
pub const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one D-Bus call (not the job it starts) may take.
pub const METHOD_TIMEOUT: Duration = Duration::from_secs(60);
/// Where systemd says it is the running init (`sd_booted()`).
pub const SYSTEMD_RUNTIME_DIR: &str = "/run/systemd/system";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
pub trait Manager {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reload_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Signals `signal` to the unit's processes; `who`: `main`, `control` or `all`.
    fn kill_unit(&self, name: &str, who: &str, signal: i32) -> zbus::Result<()>;
    /// Asks the manager to send unit and job signals to this connection.
    fn subscribe(&self) -> zbus::Result<()>;
    /// `properties` are the unit's settings (`a(sv)`); `aux` (further transient units
    /// started with it) is always empty here.
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, Vec<(&str, Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;
    fn reload(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    /// Drops the reference `AddRef` took at StartTransientUnit.
    fn unref(&self) -> zbus::Result<()>;
}

/// What a state asks of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Start,
    Reload,
    Restart,
    /// Only the upgrade installer stops a unit (the old helper, so that its socket
    /// starts the new one); no state can ask for it.
    Stop,
}

impl Job {
    pub fn verb(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Reload => "reload",
            Job::Restart => "restart",
            Job::Stop => "stop",
        }
    }

    pub fn done(self) -> &'static str {
        match self {
            Job::Start => "started",
            Job::Reload => "reloaded",
            Job::Restart => "restarted",
            Job::Stop => "stopped",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot connect to systemd over D-Bus: {0}")]
    Connect(zbus::Error),
    /// A job or reload asked for while the request is a plan ([`crate::plan`]).
    #[error(transparent)]
    Plan(#[from] crate::plan::Refused),
    #[error("{unit}: cannot {op}: {source}")]
    Bus { unit: UnitName, op: &'static str, source: zbus::Error },
    #[error("{0}: no such unit (not found by systemd)")]
    NotFound(UnitName),
    #[error("{unit}: the {} job ended with result \"{result}\"", .job.verb())]
    JobFailed { unit: UnitName, job: Job, result: String },
    #[error("{unit}: the {} job did not end within {} s", .job.verb(), .timeout.as_secs())]
    JobTimeout { unit: UnitName, job: Job, timeout: Duration },
    #[error("{unit}: cancelled while waiting for the {} job", .job.verb())]
    Cancelled { unit: UnitName, job: Job },
    #[error("{unit}: {source}")]
    Tool { unit: UnitName, source: ToolError },
    #[error("cannot make systemd reload its configuration (daemon-reload): {0}")]
    Reload(zbus::Error),
}

impl ServiceError {
    pub fn is_cancelled(&self) -> bool {
        match self {
            ServiceError::Cancelled { .. } => true,
            ServiceError::Tool { source, .. } => source.is_cancelled(),
            _ => false,
        }
    }

    /// The D-Bus error name of a call the manager refused
    /// (`org.freedesktop.systemd1.NoSuchUnit`, `…UnitExists`).
    pub fn dbus_error(&self) -> Option<&str> {
        match self {
            ServiceError::Bus { source: zbus::Error::MethodError(name, _, _), .. } => Some(name.as_str()),
            _ => None,
        }
    }
}

/// A unit's state as the manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// `ActiveState` (`active`, `inactive`, `failed`, …), or what `service status` said.
    pub active_state: String,
}

impl ServiceState {
    /// Running, for the purpose of "keep it running": `reloading` is a running service.
    pub fn running(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "reloading" | "refreshing")
    }
}

/// The operations `linux.service` needs, behind a trait so that its logic is tested
/// against a fake systemd (and later shared with the SysV fallback).
#[allow(async_fn_in_trait)] // used with concrete types only; no Send bound needed
pub trait ServiceManager {
    /// The unit's current state, read afresh.
    async fn state(&self, unit: &UnitName) -> Result<ServiceState, ServiceError>;
    /// Runs a job to its end; `Ok` only for the result `done`.
    async fn run(&self, unit: &UnitName, job: Job, cancel: &mut Cancel) -> Result<(), ServiceError>;
}

/// systemd's manager on a D-Bus connection (the system bus, or a test's peer).
pub struct Systemd {
    conn: zbus::Connection,
    job_timeout: Duration,
}

impl Systemd {
    pub async fn system() -> Result<Self, ServiceError> {
        let conn = zbus::connection::Builder::system()
            .map_err(ServiceError::Connect)?
            .method_timeout(METHOD_TIMEOUT)
            .build()
            .await
            .map_err(ServiceError::Connect)?;
        Ok(Self::with_connection(conn))
    }

    pub fn with_connection(conn: zbus::Connection) -> Self {
        Self { conn, job_timeout: JOB_TIMEOUT }
    }

    pub fn with_job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    async fn manager(&self, unit: &UnitName) -> Result<ManagerProxy<'_>, ServiceError> {
        ManagerProxy::new(&self.conn).await.map_err(|source| ServiceError::Bus {
            unit: unit.clone(),
            op: "reach the manager",
            source,
        })
    }
}

impl Systemd {
    /// Clears a unit's failed state and start-rate counter (the upgrade installer, before
    /// restarting a release after a broken one used up restarts).
    pub async fn reset_failed(&self, unit: &UnitName) -> Result<(), ServiceError> {
        crate::plan::check("reset-failed", unit.as_str())?;
        let manager = self.manager(unit).await?;
        manager.reset_failed_unit(unit.as_str()).await.map_err(|source| ServiceError::Bus {
            unit: unit.clone(),
            op: "reset-failed",
            source,
        })
    }
}

impl ServiceManager for Systemd {
    async fn state(&self, unit: &UnitName) -> Result<ServiceState, ServiceError> {
        let bus = |op: &'static str| move |source| ServiceError::Bus { unit: unit.clone(), op, source };
        let manager = self.manager(unit).await?;
        // Paths come from LoadUnit: they are escaped forms of the name, never built here.
        let path = manager.load_unit(unit.as_str()).await.map_err(bus("load the unit"))?;
        let proxy = UnitProxy::builder(&self.conn)
            .path(path)
            .map_err(bus("address the unit"))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(bus("address the unit"))?;
        if proxy.load_state().await.map_err(bus("read LoadState"))? == "not-found" {
            return Err(ServiceError::NotFound(unit.clone()));
        }
        let active_state = proxy.active_state().await.map_err(bus("read ActiveState"))?;
        Ok(ServiceState { active_state })
    }

    async fn run(&self, unit: &UnitName, job: Job, cancel: &mut Cancel) -> Result<(), ServiceError> {
        self.job(unit, Call::Unit(job), cancel).await
    }
}

/// What a job is started with.
enum Call<'a> {
    Unit(Job),
    /// `StartTransientUnit` with these properties (a start job).
    Transient(&'a [(&'a str, Value<'a>)]),
}

impl Systemd {
    /// Makes a transient unit from `properties` and starts it, to the end of its job
    /// (`Ok` only for the result `done`). systemd refuses a name that is already loaded
    /// (`UnitExists`, see [`ServiceError::dbus_error`]).
    pub async fn start_transient(
        &self,
        unit: &UnitName,
        properties: &[(&str, Value<'_>)],
        cancel: &mut Cancel,
    ) -> Result<(), ServiceError> {
        self.job(unit, Call::Transient(properties), cancel).await
    }

    /// daemon-reload: the manager reads unit files again and re-runs the generators
    /// (`/etc/fstab` becomes mount units that way). The reply comes once it is done.
    pub async fn daemon_reload(&self) -> Result<(), ServiceError> {
        crate::plan::check("reload", "the systemd manager")?;
        let manager = ManagerProxy::new(&self.conn).await.map_err(ServiceError::Reload)?;
        manager.reload().await.map_err(ServiceError::Reload)
    }

    async fn job(&self, unit: &UnitName, call: Call<'_>, cancel: &mut Cancel) -> Result<(), ServiceError> {
        let bus = |op: &'static str| move |source| ServiceError::Bus { unit: unit.clone(), op, source };
        let job = match call {
            Call::Unit(job) => {
                // Jobs change the host. A transient unit is a command, which exec
                // checked already (inspections run as transient units too).
                crate::plan::check(job.verb(), unit.as_str())?;
                job
            }
            Call::Transient(_) => Job::Start,
        };
        let manager = self.manager(unit).await?;
        // Listen first: the job may end before the call below returns.
        let mut removed = manager.receive_job_removed().await.map_err(bus("subscribe to JobRemoved"))?;
        let call = match call {
            Call::Unit(Job::Start) => manager.start_unit(unit.as_str(), "replace").await,
            Call::Unit(Job::Reload) => manager.reload_unit(unit.as_str(), "replace").await,
            Call::Unit(Job::Restart) => manager.restart_unit(unit.as_str(), "replace").await,
            Call::Unit(Job::Stop) => manager.stop_unit(unit.as_str(), "replace").await,
            Call::Transient(properties) => {
                manager.start_transient_unit(unit.as_str(), "replace", properties, &[]).await
            }
        };
        let job_path = call.map_err(bus(job.verb()))?;
        let wait = async {
            while let Some(signal) = next(&mut removed).await {
                let Ok(args) = signal.args() else { continue };
                if args.job == job_path {
                    return Some(args.result);
                }
            }
            None
        };
        let result = tokio::select! {
            r = tokio::time::timeout(self.job_timeout, wait) => r,
            () = cancel.requested() => return Err(ServiceError::Cancelled { unit: unit.clone(), job }),
        };
        match result {
            Ok(Some(r)) if r == "done" => Ok(()),
            Ok(Some(result)) => Err(ServiceError::JobFailed { unit: unit.clone(), job, result }),
            Ok(None) => Err(bus("wait for the job")(zbus::Error::InputOutput(
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the D-Bus connection closed").into(),
            ))),
            Err(_) => Err(ServiceError::JobTimeout { unit: unit.clone(), job, timeout: self.job_timeout }),
        }
    }
}

/// Hosts without systemd as PID 1 (the cron-fallback hosts): the `service` command.
pub struct SysV {
    pub program: PathBuf,
}

impl Default for SysV {
    fn default() -> Self {
        Self { program: PathBuf::from("service") }
    }
}

impl SysV {
    fn command(&self, unit: &UnitName, verb: &str) -> CommandSpec {
        let name = unit.as_str().strip_suffix(".service").unwrap_or(unit.as_str());
        let mut spec = CommandSpec::tool("service", [name, verb]);
        spec.program.clone_from(&self.program);
        spec
    }
}

impl ServiceManager for SysV {
    async fn state(&self, unit: &UnitName) -> Result<ServiceState, ServiceError> {
        let spec = self.command(unit, "status");
        let finished = exec::run(&spec, &mut Cancel::never())
            .await
            .map_err(|e| ServiceError::Tool { unit: unit.clone(), source: e.into() })?;
        Ok(sysv_state(&finished.exit))
    }

    async fn run(&self, unit: &UnitName, job: Job, cancel: &mut Cancel) -> Result<(), ServiceError> {
        let spec = self.command(unit, job.verb());
        exec::checked(&spec, &[0], cancel)
            .await
            .map(drop)
            .map_err(|source| ServiceError::Tool { unit: unit.clone(), source })
    }
}

/// LSB: 0 running, 1-3 not running (dead with pid file, dead with lock, stopped).
fn sysv_state(exit: &Exit) -> ServiceState {
    let active_state = match exit {
        Exit::Code(0) => "active",
        Exit::Code(1..=3) => "inactive",
        _ => "unknown",
    };
    ServiceState { active_state: active_state.to_string() }
}

/// The unit systemd names after `path` (`systemd-escape --path --suffix=SUFFIX`):
/// `/srv/my-data` → `srv-my\x2ddata.mount`. The path is simplified first (repeated
/// and trailing slashes dropped), each `/` between components becomes `-`, a leading
/// `.` and every byte that is not an ASCII letter, digit, `:`, `_` or `.` is written
/// `\xNN` (lowercase hex), `-` and `\` included. `Err` when the result is not a unit
/// name [`UnitName`] accepts: longer than 255 bytes, or `/` itself (`-.mount`, the
/// root mount, which no state manages).
pub fn unit_name_from_path(path: &std::path::Path, suffix: &str) -> Result<UnitName, InvalidValue> {
    use std::os::unix::ffi::OsStrExt;
    let parts: Vec<&[u8]> =
        path.as_os_str().as_bytes().split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
    let mut out = String::new();
    if parts.is_empty() {
        out.push('-');
    }
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && (i, j) != (0, 0));
            if plain {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out.push('.');
    out.push_str(suffix);
    UnitName::parse(&out)
}

/// Whether systemd is the running init (the test `sd_booted()` makes).
pub fn booted() -> bool {
    std::path::Path::new(SYSTEMD_RUNTIME_DIR).is_dir()
}

/// The one stream combinator needed here, without a futures dependency.
mod futures_util_lite {
    use std::future::poll_fn;
    use std::pin::Pin;

    use zbus::export::futures_core::Stream;

    pub async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
        poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    /// The SysV fallback's reading of `service NAME status`, against the fake runner.
    #[tokio::test]
    async fn sysv_reads_the_lsb_status_codes() {
        let unit = UnitName::parse("nginx.service").unwrap();
        for (code, want) in [(0, "active"), (3, "inactive"), (4, "unknown")] {
            let fake = Arc::new(exec::Fake::default().answer("service", Exit::Code(code), ""));
            let scope = Arc::new(exec::Scope::with_runner(fake.clone()));
            let sysv = SysV::default();
            let mut cancel = Cancel::never().with_scope(scope);
            // SysV::state runs with a token of its own; the scope goes through run().
            let spec = sysv.command(&unit, "status");
            let finished = exec::run(&spec, &mut cancel).await.unwrap();
            assert_eq!(finished.exit, Exit::Code(code));
            assert_eq!(sysv_state(&finished.exit).active_state, want);
            let calls = fake.calls();
            assert_eq!(calls[0].0.display(), "service nginx status");
        }
    }

    #[test]
    fn unit_names_are_escaped_as_systemd_escape_path_does() {
        // Expected values from `systemd-escape --path --suffix=mount` (systemd 252).
        for (path, want) in [
            ("/data", "data.mount"),
            ("/srv/my-data", "srv-my\\x2ddata.mount"),
            ("//srv///x/", "srv-x.mount"),
            ("/srv/./x", "srv-x.mount"),
            ("/mnt/my data", "mnt-my\\x20data.mount"),
            ("/.hidden/a.b", "\\x2ehidden-a.b.mount"),
            ("/a/.b", "a-.b.mount"),
            ("/back\\slash", "back\\x5cslash.mount"),
            ("/x:y_z@1", "x:y_z\\x401.mount"),
            ("/caf\u{e9}", "caf\\xc3\\xa9.mount"),
        ] {
            assert_eq!(unit_name_from_path(Path::new(path), "mount").unwrap().as_str(), want, "{path}");
        }
        assert_eq!(unit_name_from_path(Path::new("/srv/app"), "automount").unwrap().as_str(), "srv-app.automount");
        // `/` is `-.mount` to systemd; no state manages the root mount, so it is refused.
        assert!(unit_name_from_path(Path::new("/"), "mount").is_err());
        let long = format!("/{}", "a".repeat(250));
        assert!(unit_name_from_path(Path::new(&long), "mount").is_err());
    }
}
