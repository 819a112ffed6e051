//! Commands as systemd transient service units, the way `systemd-run --wait --pipe`
//! runs them: `StartTransientUnit` over D-Bus with the program, its user and group,
//! working directory and environment, its standard input, output and error passed as
//! file descriptors (output captured with the same cap as a direct child), and
//! `AddRef`, so that the unit stays loaded until its exit status is read, then let go
//! (`CollectMode=inactive-or-failed`: nothing remains loaded afterwards).
//!
//! Why: the helper's own unit is a tight sandbox (no `CAP_SYS_ADMIN`, no devices, no
//! mount calls); a command it runs for a state gets a unit of its own with the full
//! capability of root (authority — what may run — is the policy's and the recipe
//! signature's business, not the sandbox's), and systemd's control group keeps track
//! of everything it starts, double-forked daemons included.
//!
//! Unit properties come from [`properties`] alone. Defaults:
//! - `Type=exec`: the start job fails when the program cannot be executed, which is
//!   reported as "cannot start", like a failed spawn;
//! - `KillMode=process`: background processes a command leaves behind when it exits
//!   normally are daemons a recipe started on purpose (`nohup app &`), as under the
//!   original agent; they stay in the (then inactive) unit, where `systemctl status`
//!   shows them. A cancellation or a timeout kills the *whole* control group
//!   (`KillUnit` with `who=all`: SIGTERM, [`KILL_GRACE`], SIGKILL);
//! - `RemainAfterExit=yes` and every exit status and signal a "success": the unit stays
//!   "active (exited)" until the helper read the exit status and systemd's CPU and
//!   memory figures (cached when it removed the group); the helper then stops it;
//! - `RuntimeMaxSec` = the command's timeout plus twice the grace: a backstop for a
//!   helper that died meanwhile (the helper itself stops the unit at the timeout);
//! - `IgnoreSIGPIPE=no`, as in a shell; CPU and memory accounting on (the state's
//!   resource use is read from the unit when the command ended);
//! - the policy's `sandbox` properties for the state's module, if any
//!   ([`crate::policy`]);
//! - for a command that asks for a sandbox ([`CommandSpec::sandbox`], a plan's
//!   sandboxed inspection), that sandbox ([`sandbox_properties`]), set before the
//!   policy's, which therefore cannot loosen it; the policy's `ReadWritePaths`, the
//!   one property that would open a write, is dropped for such a command.
//!
//! When the helper stops (upgrade, SIGTERM) while a unit runs, the unit is not stopped:
//! it finishes on its own, bounded by `RuntimeMaxSec`, which is what a package manager
//! half-way through needs.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{Fd, OwnedObjectPath, Value};

use crate::cancel::Cancel;
use crate::exec::{
    collect, CappedOutput, CommandSpec, Exit, Finished, Label, RunFuture, Runner, Sandbox, SpawnError, Usage,
    KILL_GRACE, OUTPUT_CAP,
};
use crate::policy::SandboxValue;
use crate::systemd::{ManagerProxy, UnitProxy, METHOD_TIMEOUT};

/// How often a running unit's state is read again when no change signal came.
const POLL: Duration = Duration::from_secs(1);
/// How often the control group's `memory.peak` (a high-water mark) is read while the
/// command runs: systemd before 255 has no `MemoryPeak` and removes the group as soon as
/// the command exits, so the last reading is the peak, missing at most a rise in the last
/// interval before the exit.
const PEAK_SAMPLE: Duration = Duration::from_millis(100);
/// Prefix of every unit name made here.
pub const UNIT_PREFIX: &str = "opsagent-state-";
/// How long output is still collected after the unit ended (see exec's OUTPUT_GRACE).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// journald's native-protocol socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
trait Service {
    #[zbus(property)]
    fn exec_main_code(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn control_group(&self) -> zbus::Result<String>;
    #[zbus(property, name = "CPUUsageNSec")]
    fn cpu_usage_nsec(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_peak(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_current(&self) -> zbus::Result<u64>;
}

/// Runs commands as transient units of the system manager.
pub struct Transient {
    conn: OnceCell<zbus::Connection>,
}

impl Transient {
    /// On the system bus, connected at the first command.
    pub fn system() -> Self {
        Self { conn: OnceCell::new() }
    }

    /// The bus connection, made and subscribed to the manager's signals once (unit
    /// PropertiesChanged and JobRemoved are only sent to subscribers).
    async fn conn(&self) -> zbus::Result<&zbus::Connection> {
        self.conn
            .get_or_try_init(|| async {
                let conn = zbus::connection::Builder::system()?.method_timeout(METHOD_TIMEOUT).build().await?;
                match ManagerProxy::new(&conn).await?.subscribe().await {
                    Ok(()) => {}
                    Err(zbus::Error::MethodError(name, _, _)) if name.as_str().ends_with(".AlreadySubscribed") => {}
                    Err(e) => return Err(e),
                }
                Ok(conn)
            })
            .await
    }
}

impl Runner for Transient {
    fn name(&self) -> &'static str {
        "transient-unit"
    }

    fn enforces_sandbox(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, spec: &'a CommandSpec, label: Option<&'a Label>, cancel: &'a mut Cancel) -> RunFuture<'a> {
        Box::pin(self.run_unit(spec, label, cancel))
    }
}

/// The unit's name: `opsagent-state-<recipe version>-<state id>-<module>-<random>.service`,
/// the state id cut to 64 characters and anything but letters, digits, `_` and `-`
/// written `_` (the module's dots kept); the random part keeps two runs of one state apart (a unit that kept a
/// daemon may still be loaded).
pub fn unit_name(label: Option<&Label>) -> String {
    let mut random = [0u8; 4];
    // Without entropy, the time still makes a clash unlikely.
    if getrandom::fill(&mut random).is_err() {
        random =
            (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos())
                .to_be_bytes();
    }
    let suffix = hex::encode(random);
    let clean = |s: &str, max: usize, extra: char| -> String {
        s.chars()
            .take(max)
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == extra { c } else { '_' })
            .collect()
    };
    match label {
        Some(l) => format!(
            "{UNIT_PREFIX}{}-{}-{}-{suffix}.service",
            l.recipe_version,
            clean(&l.state_id, 64, '-'),
            // Catalogue names (`linux.apt.package`) keep their dots.
            clean(&l.module, 40, '.')
        ),
        None => format!("{UNIT_PREFIX}helper-{suffix}.service"),
    }
}

/// The command's unit properties, all of them: see the module documentation.
pub fn properties<'a>(
    spec: &'a CommandSpec,
    label: Option<&Label>,
    stdin: Option<&'a OwnedFd>,
    output: &'a OwnedFd,
    sandbox: Vec<(String, SandboxValue)>,
) -> Result<Vec<(String, Value<'a>)>, String> {
    let utf8 = |what: &str, s: &std::ffi::OsStr| {
        s.to_str().map(str::to_string).ok_or_else(|| format!("{what} is not valid UTF-8, which D-Bus requires"))
    };
    let program = utf8("the program path", spec.program.as_os_str())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(utf8("an argument", a)?);
    }
    let cwd = utf8("the working directory", spec.cwd.as_os_str())?;
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let description = match label {
        Some(l) => format!("opsagent state {} ({}): {}", l.state_id, l.module, spec.display()),
        None => format!("opsagent helper: {}", spec.display()),
    };
    let mut p: Vec<(String, Value<'a>)> = vec![
        ("Description".into(), Value::from(description)),
        ("Type".into(), Value::from("exec")),
        // ExecStartEx with `no-env-expand` (systemd 243+): systemd would otherwise
        // expand `$VAR` and `${VAR}` in the arguments itself, before `sh -c` sees them
        // (and dpkg-query's `${Package}` format).
        ("ExecStartEx".into(), Value::from(vec![(program, argv, vec!["no-env-expand".to_string()])])),
        ("WorkingDirectory".into(), Value::from(cwd)),
        ("Environment".into(), Value::from(env)),
        ("StandardOutputFileDescriptor".into(), Value::Fd(Fd::from(output))),
        ("StandardErrorFileDescriptor".into(), Value::Fd(Fd::from(output))),
        ("KillMode".into(), Value::from("process")),
        // Kept "active (exited)" whatever the exit, until the helper read the exit
        // status and the figures of the control group; it then stops the unit.
        ("RemainAfterExit".into(), Value::from(true)),
        ("SuccessExitStatus".into(), Value::from(((1..=255).collect::<Vec<i32>>(), (1..=31).collect::<Vec<i32>>()))),
        ("IgnoreSIGPIPE".into(), Value::from(false)),
        ("CollectMode".into(), Value::from("inactive-or-failed")),
        ("AddRef".into(), Value::from(true)),
        ("CPUAccounting".into(), Value::from(true)),
        ("MemoryAccounting".into(), Value::from(true)),
    ];
    if let Some(fd) = stdin {
        p.push(("StandardInputFileDescriptor".into(), Value::Fd(Fd::from(fd))));
    }
    if spec.uid.as_raw() != 0 {
        p.push(("User".into(), Value::from(spec.uid.as_raw().to_string())));
    }
    if spec.gid.as_raw() != 0 || spec.uid.as_raw() != 0 {
        p.push(("Group".into(), Value::from(spec.gid.as_raw().to_string())));
    }
    if let Some(t) = spec.timeout {
        let max = t.saturating_add(KILL_GRACE * 2);
        p.push(("RuntimeMaxUSec".into(), Value::from(u64::try_from(max.as_micros()).unwrap_or(u64::MAX))));
    }
    if let Some(s) = spec.sandbox {
        p.extend(sandbox_properties(s));
    }
    for (key, value) in sandbox {
        // The policy's sandbox comes last, but never replaces what runs or how, nor
        // a sandbox the command asked for; it cannot make such a command's host writable.
        if p.iter().any(|(k, _)| *k == key) || (spec.sandbox.is_some() && key == "ReadWritePaths") {
            continue;
        }
        let v = match value {
            SandboxValue::Bool(b) => Value::from(b),
            SandboxValue::Str(s) => Value::from(s),
            SandboxValue::Strs(v) => Value::from(v),
        };
        p.push((key, v));
    }
    Ok(p)
}

/// Capabilities a sandboxed command keeps (`CapabilityBoundingSet`): reading every
/// file as root (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`) and what a tool does to its
/// own files in the private `/tmp` (`CAP_CHOWN`, `CAP_FOWNER`, `CAP_SETUID`,
/// `CAP_SETGID`: Puppet hands its directories to user `puppet`). Not kept:
/// `CAP_SYS_ADMIN` (a remount would undo the read-only view), `CAP_SYS_PTRACE` and
/// `CAP_KILL` (other users' processes), `CAP_NET_ADMIN`, `CAP_SYS_MODULE`, `CAP_MKNOD`…
const SANDBOX_CAPABILITIES: u64 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 7);

/// The unit properties of a [`Sandbox`]: systemd makes the mount namespace, the
/// capability bounding set and the seccomp filter before the program runs.
pub fn sandbox_properties<'a>(sandbox: Sandbox) -> Vec<(String, Value<'a>)> {
    let Sandbox::ReadOnlyHost { network } = sandbox;
    let mut p: Vec<(String, Value<'a>)> = vec![
        // Everything read-only but /dev, /proc, /sys, which the next lines close.
        ("ProtectSystem".into(), Value::from("strict")),
        ("ProtectHome".into(), Value::from("read-only")),
        ("PrivateTmp".into(), Value::from(true)),
        ("PrivateDevices".into(), Value::from(true)),
        ("ProtectKernelTunables".into(), Value::from(true)),
        ("ProtectKernelModules".into(), Value::from(true)),
        ("ProtectKernelLogs".into(), Value::from(true)),
        ("ProtectControlGroups".into(), Value::from(true)),
        ("ProtectClock".into(), Value::from(true)),
        ("ProtectHostname".into(), Value::from(true)),
        ("NoNewPrivileges".into(), Value::from(true)),
        ("RestrictSUIDSGID".into(), Value::from(true)),
        ("CapabilityBoundingSet".into(), Value::from(SANDBOX_CAPABILITIES)),
        // An allow-list without AF_UNIX: a root process that may connect to
        // systemd's, D-Bus's or docker's socket can have them change the host for it.
        // Netlink stays for reading addresses (Facter); changing them needs
        // CAP_NET_ADMIN, which is gone.
        (
            "RestrictAddressFamilies".into(),
            Value::from((true, vec!["AF_INET".to_string(), "AF_INET6".into(), "AF_NETLINK".into()])),
        ),
    ];
    if !network {
        p.push(("PrivateNetwork".into(), Value::from(true)));
    }
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Ended,
    TimedOut,
    Cancelled,
}

impl Transient {
    async fn run_unit(
        &self,
        spec: &CommandSpec,
        label: Option<&Label>,
        cancel: &mut Cancel,
    ) -> Result<Finished, SpawnError> {
        let program = spec.program.display().to_string();
        let err = |source: std::io::Error| SpawnError { program: program.clone(), source };
        let bus = |what: &str, e: zbus::Error| err(std::io::Error::other(format!("{what}: {e}")));
        let name = unit_name(label);

        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| err(e.into()))?;
        let stdin = match &spec.stdin {
            Some(data) => {
                let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| err(e.into()))?;
                let data = data.clone();
                let sender = tokio::net::unix::pipe::Sender::from_owned_fd(w).map_err(err)?;
                // A writer of its own: a command that does not read its input must not
                // block us.
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut sender = sender;
                    let _ = sender.write_all(&data).await;
                });
                Some(r)
            }
            None => None,
        };
        let sandbox = label.map(|l| l.sandbox.clone()).unwrap_or_default();
        let props =
            properties(spec, label, stdin.as_ref(), &write_end, sandbox).map_err(|m| err(std::io::Error::other(m)))?;
        let props_ref: Vec<(&str, Value<'_>)> = props
            .iter()
            .map(|(k, v)| v.try_clone().map(|v| (k.as_str(), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;

        let conn = self.conn().await.map_err(|e| bus("cannot connect to systemd over D-Bus", e))?;
        let manager = ManagerProxy::new(conn).await.map_err(|e| bus("cannot reach systemd", e))?;
        let mut removed = manager.receive_job_removed().await.map_err(|e| bus("subscribe to JobRemoved", e))?;
        let job = manager
            .start_transient_unit(&name, "fail", &props_ref, &[])
            .await
            .map_err(|e| bus(&format!("{name}: StartTransientUnit"), e))?;
        drop(props_ref);
        drop(props);
        // systemd holds its own copies now.
        drop(write_end);
        drop(stdin);
        let output = Arc::new(Mutex::new(CappedOutput::new(OUTPUT_CAP)));
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end).map_err(err)?;
        let mut reader = tokio::spawn(collect(receiver, Arc::clone(&output)));

        let path = manager.get_unit(&name).await.map_err(|e| bus(&format!("{name}: GetUnit"), e))?;
        let unit = uncached::<UnitProxy<'_>>(conn, &path).await.map_err(|e| bus(&name, e))?;
        let service = uncached::<ServiceProxy<'_>>(conn, &path).await.map_err(|e| bus(&name, e))?;
        let control_group = service.control_group().await.unwrap_or_default();
        // Woken by the unit's PropertiesChanged signals (ActiveState, SubState), listened
        // to before the state is first read; POLL is only the fallback.
        let properties = zbus::fdo::PropertiesProxy::builder(conn)
            .destination("org.freedesktop.systemd1")
            .and_then(|b| b.path(path.clone()))
            .map_err(|e| bus(&name, e))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus(&name, e))?;
        let mut changes = properties.receive_properties_changed().await.map_err(|e| bus(&name, e))?;

        // The start job: `done` once the program was executed (Type=exec).
        let started = async {
            while let Some(signal) = crate::systemd::next(&mut removed).await {
                let Ok(args) = signal.args() else { continue };
                if args.job == job {
                    return Some(args.result);
                }
            }
            None
        };
        let job_result = started.await;
        if job_result.as_deref() != Some("done") {
            let result = job_result.unwrap_or_else(|| "unknown".into());
            let _ = unit.unref().await;
            let _ = manager.reset_failed_unit(&name).await;
            reader.abort();
            let out = output.lock().map(|o| o.render()).unwrap_or_default();
            let detail = crate::exec::last_lines(&out, 2);
            return Err(err(std::io::Error::other(format!(
                "{name}: the start job ended with result \"{result}\" (the program could not be executed){}",
                if detail.is_empty() { String::new() } else { format!(": {detail}") }
            ))));
        }

        let deadline = spec.timeout.map(|t| Instant::now() + t);
        let mut signals = true;
        let mut peak_seen = None;
        let stop = loop {
            peak_seen = peak_seen.max(memory_peak(&control_group));
            if ended(&unit).await {
                break Stop::Ended;
            }
            tokio::select! {
                change = crate::systemd::next(&mut changes), if signals => signals = change.is_some(),
                () = tokio::time::sleep(if peak_seen.is_some() { PEAK_SAMPLE } else { POLL }) => {}
                () = opsagent_shared::timer::sleep_until_opt(deadline) => break Stop::TimedOut,
                () = cancel.requested() => break Stop::Cancelled,
            }
        };
        if stop != Stop::Ended {
            kill_all(&manager, &unit, &name, &control_group).await;
        }
        let exit = match stop {
            Stop::Ended => {
                let code = service.exec_main_code().await.map_err(|e| bus(&name, e))?;
                let status = service.exec_main_status().await.map_err(|e| bus(&name, e))?;
                // CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3.
                if code == 1 {
                    Exit::Code(status)
                } else {
                    Exit::Signal(status)
                }
            }
            Stop::TimedOut => Exit::TimedOut(spec.timeout.unwrap_or_default()),
            Stop::Cancelled => Exit::Cancelled,
        };
        // The unit stays "active (exited)" (RemainAfterExit, every exit a success) with
        // systemd's figures of its (removed) control group.
        let usage = usage(&service, &control_group, peak_seen).await;
        // Now it goes: stopped (KillMode=process: daemons a successful command left
        // stay in the group), let go, and collected by systemd once inactive.
        match manager.stop_unit(&name, "replace").await {
            Ok(stop_job) => {
                let stopped = async {
                    while let Some(signal) = crate::systemd::next(&mut removed).await {
                        if signal.args().is_ok_and(|a| a.job == stop_job) {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(KILL_GRACE, stopped).await;
            }
            Err(e) => tracing::warn!(unit = %name, error = %e, "cannot stop the unit"),
        }
        let _ = unit.unref().await;
        if unit.active_state().await.is_ok_and(|s| s == "failed") {
            let _ = manager.reset_failed_unit(&name).await;
        }
        if tokio::time::timeout(OUTPUT_GRACE, &mut reader).await.is_err() {
            reader.abort();
        }
        let output = output.lock().map(|o| o.render()).unwrap_or_default();
        journal_output(&name, spec, &output);
        Ok(Finished { exit, output, usage })
    }
}

async fn uncached<'c, P>(conn: &'c zbus::Connection, path: &OwnedObjectPath) -> zbus::Result<P>
where
    P: From<zbus::Proxy<'c>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(conn).path(path.clone())?.cache_properties(CacheProperties::No).build().await
}

/// The main process is gone: the unit is "active (exited)" (see `RemainAfterExit` in
/// [`properties`]), or no longer active at all.
async fn ended(unit: &UnitProxy<'_>) -> bool {
    match unit.active_state().await {
        Ok(s) if matches!(s.as_str(), "inactive" | "failed") => true,
        Ok(_) => unit.sub_state().await.is_ok_and(|s| s == "exited"),
        // The unit is gone: it ended (AddRef normally keeps it).
        Err(_) => true,
    }
}

/// SIGTERM to every process of the unit's control group, then SIGKILL to whatever is
/// left after [`KILL_GRACE`]; returns once the group is empty (or after a last grace).
async fn kill_all(manager: &ManagerProxy<'_>, unit: &UnitProxy<'_>, name: &str, control_group: &str) {
    let _ = manager.kill_unit(name, "all", Signal::SIGTERM as i32).await;
    let grace_end = Instant::now() + KILL_GRACE;
    while Instant::now() < grace_end {
        if ended(unit).await && group_empty(control_group) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = manager.kill_unit(name, "all", Signal::SIGKILL as i32).await;
    let end = Instant::now() + KILL_GRACE;
    while Instant::now() < end {
        if ended(unit).await && group_empty(control_group) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(unit = name, "processes of the unit survived SIGKILL");
}

/// Whether the unit's control group holds no process; a group that is gone or cannot be
/// read counts as empty (the unit state decides then).
fn group_empty(control_group: &str) -> bool {
    if control_group.is_empty() {
        return true;
    }
    // cgroup v2, then the name=systemd hierarchy of a v1 (legacy or hybrid) host.
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/systemd"] {
        if let Ok(procs) = std::fs::read_to_string(format!("{root}{control_group}/cgroup.procs")) {
            return procs.trim().is_empty();
        }
    }
    true
}

/// The unit's CPU time (systemd's `CPUUsageNSec`, which systemd caches when it removes
/// the group; `u64::MAX`: not known, as on cgroup v1 hosts where the container or host
/// has no cpuacct accounting) and peak memory (`MemoryPeak` from systemd 255; before,
/// the group's `memory.peak` where it still exists, else the last reading taken while the
/// command ran, `peak_seen`).
async fn usage(service: &ServiceProxy<'_>, control_group: &str, peak_seen: Option<u64>) -> Option<Usage> {
    let cpu = service.cpu_usage_nsec().await.ok().filter(|n| *n != u64::MAX)?;
    let peak_memory = match service.memory_peak().await.ok().filter(|n| *n != u64::MAX) {
        Some(peak) => Some(peak),
        None => memory_peak(control_group).max(peak_seen),
    };
    Some(Usage { cpu: Duration::from_nanos(cpu), peak_memory })
}

/// The high-water mark of the group's memory (cgroup v2, Linux 5.19 and later), while the
/// group exists.
fn memory_peak(control_group: &str) -> Option<u64> {
    if control_group.is_empty() {
        return None;
    }
    std::fs::read_to_string(format!("/sys/fs/cgroup{control_group}/memory.peak"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The command's output in the journal, attributed to its unit (`OBJECT_SYSTEMD_UNIT`,
/// which `journalctl -u` matches for messages logged by root), one entry per line,
/// control characters escaped; the captured (capped) output only.
fn journal_output(unit: &str, spec: &CommandSpec, output: &str) {
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else { return };
    if socket.connect(JOURNAL_SOCKET).is_err() {
        return;
    }
    let ident = spec.program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for line in output.lines() {
        let entry = opsagent_logline::journal_entry(&[
            ("MESSAGE", line),
            ("PRIORITY", "6"),
            ("SYSLOG_IDENTIFIER", &ident),
            ("OBJECT_SYSTEMD_UNIT", unit),
        ]);
        // Nowhere to report a lost line to; the output is in the StateLog anyway.
        let _ = socket.send(&entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    fn label() -> Label {
        Label {
            recipe_version: 12,
            state_id: "web/setup nginx".into(),
            module: "linux.cmd".into(),
            sandbox: Vec::new(),
        }
    }

    #[test]
    fn unit_names_say_what_runs_and_are_valid_unit_names() {
        let name = unit_name(Some(&label()));
        assert!(name.starts_with("opsagent-state-12-web_setup_nginx-linux.cmd-"), "{name}");
        assert!(name.ends_with(".service"));
        opsagent_proto::newtypes::UnitName::parse(&name).unwrap();
        assert_ne!(unit_name(Some(&label())), name, "two runs of one state get two units");
        let long = Label { state_id: "x".repeat(500), ..label() };
        opsagent_proto::newtypes::UnitName::parse(&unit_name(Some(&long))).unwrap();
        assert!(unit_name(None).starts_with("opsagent-state-helper-"));
    }

    fn find<'a>(props: &'a [(String, Value<'a>)], key: &str) -> Option<&'a Value<'a>> {
        props.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    #[test]
    fn properties_run_the_command_as_its_user_with_the_policy_sandbox_last() {
        let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let mut spec = CommandSpec::tool("/bin/sh", ["-c", "id"]).with_timeout(Duration::from_secs(30));
        spec.uid = Uid::from_raw(1000);
        spec.gid = Gid::from_raw(1001);
        let sandbox = vec![
            ("ProtectSystem".to_string(), SandboxValue::Str("strict".into())),
            ("ExecStartEx".to_string(), SandboxValue::Str("/bin/evil".into())),
            ("ProtectHome".to_string(), SandboxValue::Bool(true)),
        ];
        let props = properties(&spec, Some(&label()), None, &w, sandbox).unwrap();
        assert_eq!(find(&props, "User"), Some(&Value::from("1000")));
        assert_eq!(find(&props, "Group"), Some(&Value::from("1001")));
        assert_eq!(find(&props, "Type"), Some(&Value::from("exec")));
        assert_eq!(find(&props, "KillMode"), Some(&Value::from("process")));
        assert_eq!(find(&props, "CollectMode"), Some(&Value::from("inactive-or-failed")));
        assert_eq!(find(&props, "RemainAfterExit"), Some(&Value::from(true)));
        // The timeout plus twice the grace, as a backstop.
        assert_eq!(find(&props, "RuntimeMaxUSec"), Some(&Value::from(40_000_000u64)));
        assert_eq!(
            find(&props, "ExecStartEx"),
            Some(&Value::from(vec![(
                "/bin/sh".to_string(),
                vec!["/bin/sh".to_string(), "-c".into(), "id".into()],
                vec!["no-env-expand".to_string()]
            )]))
        );
        assert_eq!(find(&props, "ProtectSystem"), Some(&Value::from("strict")));
        assert_eq!(find(&props, "ProtectHome"), Some(&Value::from(true)));
        assert_eq!(
            props.iter().filter(|(k, _)| k == "ExecStartEx").count(),
            1,
            "the sandbox cannot replace ExecStartEx"
        );
        assert!(find(&props, "StandardInputFileDescriptor").is_none());

        // Root: no User=/Group= (systemd's default), and no deadline without a timeout.
        let mut root = CommandSpec::tool("/bin/true", Vec::<String>::new());
        root.timeout = None;
        let props = properties(&root, None, None, &w, Vec::new()).unwrap();
        assert!(find(&props, "User").is_none() && find(&props, "Group").is_none());
        assert!(find(&props, "RuntimeMaxUSec").is_none());
    }

    /// A sandboxed inspection gets the read-only sandbox, which the policy's sandbox
    /// for the module can tighten (PrivateNetwork) but neither loosen (ProtectSystem=no)
    /// nor open (ReadWritePaths); an ordinary command gets none of it.
    #[test]
    fn a_sandboxed_command_gets_a_read_only_host_the_policy_cannot_open() {
        let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let policy = vec![
            ("ProtectSystem".to_string(), SandboxValue::Str("no".into())),
            ("ReadWritePaths".to_string(), SandboxValue::Strs(vec!["/etc".into()])),
            ("PrivateNetwork".to_string(), SandboxValue::Bool(true)),
        ];
        let spec = CommandSpec::tool("/usr/bin/puppet", ["apply", "--noop"])
            .sandboxed_inspection(Sandbox::ReadOnlyHost { network: true });
        let props = properties(&spec, Some(&label()), None, &w, policy.clone()).unwrap();
        assert_eq!(find(&props, "ProtectSystem"), Some(&Value::from("strict")));
        assert_eq!(props.iter().filter(|(k, _)| k == "ProtectSystem").count(), 1);
        assert_eq!(find(&props, "ProtectHome"), Some(&Value::from("read-only")));
        for key in ["PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectControlGroups", "NoNewPrivileges"]
        {
            assert_eq!(find(&props, key), Some(&Value::from(true)), "{key}");
        }
        assert_eq!(find(&props, "CapabilityBoundingSet"), Some(&Value::from(0xcfu64)));
        assert!(find(&props, "ReadWritePaths").is_none(), "the policy opened a write");
        // The policy's own tightening stays.
        assert_eq!(find(&props, "PrivateNetwork"), Some(&Value::from(true)));
        let family = find(&props, "RestrictAddressFamilies").unwrap().to_string();
        assert!(family.contains("AF_INET") && !family.contains("AF_UNIX"), "{family}");
        // Without the network (puppet apply): a network namespace of its own.
        let offline = spec.clone().sandboxed_inspection(Sandbox::ReadOnlyHost { network: false });
        let props = properties(&offline, None, None, &w, Vec::new()).unwrap();
        assert_eq!(find(&props, "PrivateNetwork"), Some(&Value::from(true)));
        // An ordinary command: none of it, and the policy's ReadWritePaths applies.
        let plain = CommandSpec::tool("/usr/bin/puppet", ["apply"]);
        let props = properties(&plain, None, None, &w, policy).unwrap();
        assert_eq!(find(&props, "ProtectSystem"), Some(&Value::from("no")));
        assert!(find(&props, "ReadWritePaths").is_some() && find(&props, "CapabilityBoundingSet").is_none());
        assert!(Transient::system().enforces_sandbox());
    }

    #[test]
    fn arguments_that_d_bus_cannot_carry_are_refused() {
        use std::os::unix::ffi::OsStringExt;
        let (_r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let spec = CommandSpec::tool("/bin/echo", [std::ffi::OsString::from_vec(vec![0xff, 0xfe])]);
        let err = properties(&spec, None, None, &w, Vec::new()).unwrap_err();
        assert_eq!(err, "an argument is not valid UTF-8, which D-Bus requires");
    }
}
