//! Running one command for a state: a scrubbed environment, stdin from /dev/null (or
//! given bytes), stdout and stderr merged into one capped buffer, a deadline, and
//! cancellation that ends everything the command started.
//!
//! Every program a state runs goes through [`run`] (or [`checked`]), and this is the
//! only file of the helper allowed to start a process (`clippy.toml`,
//! `disallowed-methods`). Behind it, one [`Runner`] trait with the two real ways to run
//! a command, chosen once at start-up by [`select_host_runner`]:
//! - [`crate::transient::Transient`], where systemd is PID 1: the command runs as a
//!   transient service unit of its own, `opsagent-state-….service`, with the full
//!   capability of root whatever the helper's own sandbox is (the policy may give a
//!   module's units sandbox properties); its control group is the unit of cleanup, so
//!   even double-forked daemons are caught by a cancellation or a timeout;
//! - [`Direct`], without systemd (cron-fallback hosts, `opsagent apply` where systemd is
//!   not PID 1): a child of the helper in its own process group, the group being the
//!   unit of cleanup (`sh -c 'a & b'` leaves `a` running after the shell is killed
//!   unless the signal goes to the group; a `setsid` escapes it).
//!
//! Tests give a request another runner (a fake) through its [`Scope`].
//!
//! Preemption (a new recipe while a state runs) cancels the running command, except a
//! program that must not be cut in half ([`must_finish`]: package managers, mkfs, LVM
//! and RAID tools, version control): it runs to its end, bounded by its own timeout.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid};
use opsagent_shared::timer::sleep_until_opt;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::cancel::Cancel;

/// Bytes of output kept: the first and last halves of this, with a marker between.
pub const OUTPUT_CAP: usize = 64 * 1024;
/// Between SIGTERM and SIGKILL: time for the group to clean up.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output is still collected after the command ended: a background child may
/// hold the pipe open for ever, and the state must not wait for it.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The complete environment: nothing is inherited from the helper.
    pub env: Vec<(String, String)>,
    pub uid: Uid,
    pub gid: Gid,
    /// `None`: no deadline.
    pub timeout: Option<Duration>,
    /// Written to the command's standard input, which is then closed; `None`: /dev/null.
    /// How secrets reach a tool (a password hash for `chpasswd -e`) without showing up
    /// in its argument list, which every local user can read in /proc.
    pub stdin: Option<Vec<u8>>,
    /// The command only looks at the host (`dpkg-query`, `id`, `systemctl is-enabled`):
    /// the one kind a plan may run. Everything else is refused while planning
    /// ([`crate::plan`]); a module declares its inspections with [`Self::inspection`].
    pub reads_only: bool,
    /// The command must run inside this kernel-enforced sandbox, or not at all: only a
    /// runner that [`Runner::enforces_sandbox`] starts it. A plan runs such a command
    /// although it is not an inspection ([`Self::sandboxed_inspection`]).
    pub sandbox: Option<Sandbox>,
}

/// A sandbox the kernel enforces around a command, so that the command cannot change
/// the host whatever it tries: what lets a plan run a tool whose own dry run writes
/// (Puppet's `--noop` writes its state and reports, and honours `noop => false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// The whole file system read-only (root's home included), a private empty `/tmp`
    /// and `/var/tmp` the only places it can write, gone when it ends; private `/dev`;
    /// kernel tunables, modules, logs, clock, hostname and control groups out of reach;
    /// no capability that could undo this (`CAP_SYS_ADMIN`: remounting) or reach other
    /// processes (`CAP_SYS_PTRACE`, `CAP_KILL`, …), no set-uid gain; no local (`AF_UNIX`)
    /// socket, so no systemd, D-Bus or docker to ask for a change. Reading stays possible
    /// everywhere, as root.
    ReadOnlyHost {
        /// Whether it keeps the host's network (a Puppet agent asks its server for the
        /// catalogue); without, it has a private network namespace of its own.
        network: bool,
    },
}

/// The environment of the tools the helper runs for its own states (package managers,
/// shadow utilities, crontab…): nothing of the helper's own environment, a fixed
/// `PATH`, and the C locale so that their output parses the same everywhere.
pub const TOOL_ENV: &[(&str, &str)] = &[("PATH", BASE_PATH), ("LC_ALL", "C"), ("LANG", "C"), ("HOME", "/root")];
/// Search path of commands run by states; the only one they get.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Deadline of a tool run by a state unless that state says otherwise.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

impl CommandSpec {
    /// A tool run as root in `/`, with [`TOOL_ENV`] and [`TOOL_TIMEOUT`].
    pub fn tool<S: Into<OsString>>(program: &str, args: impl IntoIterator<Item = S>) -> Self {
        Self {
            program: PathBuf::from(program),
            args: args.into_iter().map(Into::into).collect(),
            cwd: PathBuf::from("/"),
            env: TOOL_ENV.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
            uid: Uid::from_raw(0),
            gid: Gid::from_raw(0),
            timeout: Some(TOOL_TIMEOUT),
            stdin: None,
            reads_only: false,
            sandbox: None,
        }
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn with_stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Declares that this command changes nothing on the host, so that a plan runs it.
    /// Only for tools whose arguments make them read-only by construction.
    pub fn inspection(mut self) -> Self {
        self.reads_only = true;
        self
    }

    /// Declares a command a plan may run because `sandbox` keeps it from changing the
    /// host: it is then started only by a runner that enforces the sandbox (a transient
    /// unit of systemd), in a plan as in an apply, and refused everywhere else.
    pub fn sandboxed_inspection(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = Some(sandbox);
        self
    }

    /// The command line, for messages (arguments with blanks are quoted).
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| {
                let a = a.to_string_lossy();
                if a.is_empty() || a.contains(char::is_whitespace) {
                    format!("{a:?}")
                } else {
                    a.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut(Duration),
    Cancelled,
}

#[derive(Debug)]
pub struct Finished {
    pub exit: Exit,
    pub output: String,
    /// What the command used, where the runner can tell (a transient unit's cgroup).
    pub usage: Option<Usage>,
}

/// Resources used by commands, from their control group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, user and system.
    pub cpu: Duration,
    /// The highest memory use seen, where systemd reports it (`MemoryPeak`, systemd 255
    /// and later); for several commands, the highest of them.
    pub peak_memory: Option<u64>,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.cpu += other.cpu;
        self.peak_memory = match (self.peak_memory, other.peak_memory) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cpu {:.3} s", self.cpu.as_secs_f64())?;
        if let Some(peak) = self.peak_memory {
            write!(f, ", peak memory {:.1} MiB", peak as f64 / (1024.0 * 1024.0))?;
        }
        Ok(())
    }
}

/// What the commands of one request are run for: names their transient units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub recipe_version: u64,
    pub state_id: String,
    pub module: String,
    /// The policy's sandbox properties for the module's commands (transient units).
    pub sandbox: Vec<(String, crate::policy::SandboxValue)>,
}

/// One request's context for the commands it runs, carried by its [`Cancel`] token.
#[derive(Default)]
pub struct Scope {
    pub label: Option<Label>,
    /// Runs this request's commands instead of the host's runner (tests).
    pub runner: Option<Arc<dyn Runner>>,
    usage: Mutex<Option<Usage>>,
}

impl Scope {
    pub fn new(label: Label) -> Self {
        Self { label: Some(label), ..Self::default() }
    }

    pub fn with_runner(runner: Arc<dyn Runner>) -> Self {
        Self { runner: Some(runner), ..Self::default() }
    }

    /// What the commands run so far used, added up; `None` when no runner could tell.
    pub fn usage(&self) -> Option<Usage> {
        *self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, usage: Usage) {
        let mut total = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        total.get_or_insert_with(Usage::default).add(usage);
    }
}

pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<Finished, SpawnError>> + Send + 'a>>;

/// One way of running a command to its end, its deadline or its cancellation, whichever
/// comes first. On cancellation or timeout, everything the command started is ended
/// (SIGTERM, [`KILL_GRACE`], SIGKILL) before the future resolves.
pub trait Runner: Send + Sync {
    /// For logs: `transient-unit`, `direct`.
    fn name(&self) -> &'static str;
    /// Whether this runner starts a [`CommandSpec::sandbox`] command inside that
    /// sandbox, enforced by the kernel. A runner that cannot refuses such a command.
    fn enforces_sandbox(&self) -> bool {
        false
    }
    fn run<'a>(&'a self, spec: &'a CommandSpec, label: Option<&'a Label>, cancel: &'a mut Cancel) -> RunFuture<'a>;
}

/// The runner of this host, chosen once by [`select_host_runner`].
static HOST_RUNNER: OnceLock<Arc<dyn Runner>> = OnceLock::new();

/// The one place that decides how commands run on this host: as transient units where
/// systemd is PID 1 and the helper runs as root (unless `direct` is asked for),
/// directly otherwise. Returns the runner's name. Without a call (tests of the
/// library), commands run directly.
pub fn select_host_runner(direct: bool) -> &'static str {
    let runner = HOST_RUNNER.get_or_init(|| {
        if !direct && crate::systemd::booted() && nix::unistd::geteuid().is_root() {
            Arc::new(crate::transient::Transient::system())
        } else {
            Arc::new(Direct)
        }
    });
    runner.name()
}

fn runner_for(cancel: &Cancel) -> Arc<dyn Runner> {
    if let Some(runner) = cancel.scope().and_then(|s| s.runner.clone()) {
        return runner;
    }
    HOST_RUNNER.get().cloned().unwrap_or_else(|| Arc::new(Direct))
}

/// Programs that must not be cut in half by a preemption: an interrupted package
/// manager leaves dpkg/rpm databases half-configured (`dpkg --audit` complains, the
/// next install fails), an interrupted mkfs/lvcreate/mdadm a device in an unknown
/// state, an interrupted VCS update a working copy with a lock. Matched on the
/// program's file name; `mkfs.*` included.
pub const MUST_FINISH: &[&str] = &[
    "apt", "apt-get", "aptitude", "dpkg", "yum", "dnf", "rpm", "pip", "pip2", "pip3", "npm", "gem", "mkfs", "mke2fs",
    "mkswap", "pvcreate", "vgcreate", "vgextend", "lvcreate", "lvextend", "lvresize", "mdadm", "git", "svn", "hg",
];

/// Whether a preemption lets `spec` run to its end (or its timeout) instead of
/// stopping it; see [`MUST_FINISH`].
pub fn must_finish(spec: &CommandSpec) -> bool {
    let Some(name) = spec.program.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let base = name.split_once('.').map_or(name, |(b, _)| b);
    // pip3.11 and the like.
    let base = if base.starts_with("pip") && base[3..].chars().all(|c| c.is_ascii_digit()) { "pip" } else { base };
    MUST_FINISH.contains(&base)
}

/// A command asked for a sandbox that this host's runner cannot give.
#[derive(Debug, thiserror::Error)]
#[error(
    "no sandbox: commands run as {runner} here, and only a transient unit of systemd (systemd as PID 1) confines one to a read-only host"
)]
pub struct NoSandbox {
    pub runner: &'static str,
}

/// Whether commands of this request can be sandboxed ([`CommandSpec::sandbox`]): a
/// module asks before it plans with a sandboxed inspection, to say why it cannot.
pub fn sandbox_available(cancel: &Cancel) -> bool {
    runner_for(cancel).enforces_sandbox()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start {program}: {source}")]
pub struct SpawnError {
    pub program: String,
    pub source: io::Error,
}

/// Runs `spec` to its end, its deadline or `cancel`, whichever comes first; a program
/// that [`must_finish`] ignores `cancel` and is bounded by its deadline only.
pub async fn run(spec: &CommandSpec, cancel: &mut Cancel) -> Result<Finished, SpawnError> {
    let runner = runner_for(cancel);
    // A command that asks for a sandbox never runs without it, plan or not.
    if spec.sandbox.is_some() && !runner.enforces_sandbox() {
        return Err(SpawnError {
            program: spec.program.display().to_string(),
            source: io::Error::new(io::ErrorKind::Unsupported, NoSandbox { runner: runner.name() }),
        });
    }
    // The one door every command goes through: a plan runs inspections only, and
    // commands the runner just confirmed it confines to a read-only sandbox.
    if !spec.reads_only && spec.sandbox.is_none() {
        crate::plan::check("run", spec.display())
            .map_err(|r| SpawnError { program: spec.program.display().to_string(), source: r.into() })?;
    }
    let label = cancel.scope().and_then(|s| s.label.clone());
    let mut uncancellable = Cancel::never();
    let token = if must_finish(spec) {
        if cancel.is_requested() {
            tracing::info!(command = %spec.display(), "preempted, but a package manager, storage or VCS tool runs to its end");
        }
        &mut uncancellable
    } else {
        &mut *cancel
    };
    let finished = runner.run(spec, label.as_ref(), token).await?;
    if let (Some(usage), Some(scope)) = (finished.usage, cancel.scope()) {
        scope.record(usage);
    }
    Ok(finished)
}

/// A runner for unit tests: runs nothing, records every command and answers with the
/// exit, output and usage it was given (or, for a program it names, another exit).
#[derive(Default)]
pub struct Fake {
    pub calls: Mutex<Vec<(CommandSpec, Option<Label>)>>,
    pub answers: Mutex<Vec<(String, Exit, String)>>,
    pub usage: Option<Usage>,
    /// Whether it stands for a runner that enforces sandboxes (a transient unit).
    pub sandboxes: bool,
}

impl Fake {
    /// Commands whose program's file name is `program` end with `exit` and `output`;
    /// anything else exits 0 without output.
    pub fn answer(self, program: &str, exit: Exit, output: &str) -> Self {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).push((
            program.to_string(),
            exit,
            output.to_string(),
        ));
        self
    }

    pub fn calls(&self) -> Vec<(CommandSpec, Option<Label>)> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Runner for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn enforces_sandbox(&self) -> bool {
        self.sandboxes
    }

    fn run<'a>(&'a self, spec: &'a CommandSpec, label: Option<&'a Label>, cancel: &'a mut Cancel) -> RunFuture<'a> {
        Box::pin(async move {
            self.calls.lock().unwrap_or_else(PoisonError::into_inner).push((spec.clone(), label.cloned()));
            if cancel.is_requested() {
                return Ok(Finished { exit: Exit::Cancelled, output: String::new(), usage: self.usage });
            }
            let name = spec.program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
            let (exit, output) = answers
                .iter()
                .find(|(p, _, _)| *p == name)
                .map_or((Exit::Code(0), String::new()), |(_, e, o)| (e.clone(), o.clone()));
            Ok(Finished { exit, output, usage: self.usage })
        })
    }
}

/// Spawns retried while the program's file is busy (ETXTBSY), and the pause between them:
/// a forked child holds the file's descriptors only until its exec, milliseconds at most.
const TEXT_BUSY_RETRIES: u32 = 20;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(10);

/// Runs commands as children of the helper, each in its own process group.
pub struct Direct;

impl Runner for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn run<'a>(&'a self, spec: &'a CommandSpec, _label: Option<&'a Label>, cancel: &'a mut Cancel) -> RunFuture<'a> {
        Box::pin(run_direct(spec, cancel))
    }
}

#[allow(clippy::disallowed_methods)] // the one place a process is spawned
async fn run_direct(spec: &CommandSpec, cancel: &mut Cancel) -> Result<Finished, SpawnError> {
    let spawn_err = |source: io::Error| SpawnError { program: spec.program.display().to_string(), source };
    // One pipe for both streams keeps their lines in the order they were written.
    // CLOEXEC: commands started concurrently for other requests must not inherit it.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::from(write_end.try_clone().map_err(spawn_err)?))
        .stderr(Stdio::from(write_end))
        .uid(spec.uid.as_raw())
        .gid(spec.gid.as_raw())
        .process_group(0);
    // A file written just before (a recipe's script, a test's stand-in tool) can still be
    // open for writing in a child that another thread forked and that has not reached its
    // exec yet (it holds a copy of every descriptor until then): for that instant the
    // kernel refuses to run the file (ETXTBSY). A few short retries ride it out; every
    // other error, and a file that stays busy, is final.
    let mut spawned = command.spawn();
    for _ in 0..TEXT_BUSY_RETRIES {
        if !matches!(&spawned, Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)) {
            break;
        }
        tokio::time::sleep(TEXT_BUSY_PAUSE).await;
        spawned = command.spawn();
    }
    // The command holds our copies of the pipe's write end: without dropping it the
    // reader would never see the end of the output.
    drop(command);
    let mut child = spawned.map_err(spawn_err)?;
    if let (Some(data), Some(mut pipe)) = (spec.stdin.clone(), child.stdin.take()) {
        // A writer of its own: a command that does not read its input must not block us.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = pipe.write_all(&data).await;
        });
    }
    let pgid = Pid::from_raw(child.id().and_then(|id| i32::try_from(id).ok()).unwrap_or(0));
    // A package manager half-way is not killed even when the helper itself goes.
    let mut guard = GroupGuard((!must_finish(spec)).then_some(pgid));

    let output = Arc::new(Mutex::new(CappedOutput::new(OUTPUT_CAP)));
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end).map_err(spawn_err)?;
    let mut reader = tokio::spawn(collect(receiver, Arc::clone(&output)));

    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let timer = sleep_until_opt(deadline);
    enum Stop {
        Exited(io::Result<ExitStatus>),
        TimedOut,
        Cancelled,
    }
    let stop = tokio::select! {
        status = child.wait() => Stop::Exited(status),
        () = timer => Stop::TimedOut,
        () = cancel.requested() => Stop::Cancelled,
    };
    let exit = match stop {
        Stop::Exited(status) => {
            // Background children of a finished command may be daemons the recipe
            // started on purpose: they are left running.
            guard.disarm();
            match status {
                Ok(s) => s.code().map_or_else(|| Exit::Signal(s.signal().unwrap_or(0)), Exit::Code),
                Err(e) => return Err(spawn_err(e)),
            }
        }
        Stop::TimedOut => {
            terminate(pgid, &mut child).await;
            guard.disarm();
            Exit::TimedOut(spec.timeout.unwrap_or_default())
        }
        Stop::Cancelled => {
            terminate(pgid, &mut child).await;
            guard.disarm();
            Exit::Cancelled
        }
    };
    if tokio::time::timeout(OUTPUT_GRACE, &mut reader).await.is_err() {
        reader.abort();
    }
    let output = output.lock().map(|o| o.render()).unwrap_or_default();
    Ok(Finished { exit, output, usage: None })
}

/// Why a tool run by a state did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("`{command}` {how}{}", tail_suffix(.output))]
    Failed { command: String, how: String, output: String },
    #[error("cancelled while `{0}` ran; it and every process it started were killed")]
    Cancelled(String),
}

impl ToolError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, ToolError::Cancelled(_))
    }
}

/// Lines of a failed tool's output kept in messages: package managers print their
/// reason last.
pub const TAIL_LINES: usize = 6;

fn tail_suffix(output: &str) -> String {
    let tail = last_lines(output, TAIL_LINES);
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// The last `n` non-blank lines of `output`, joined with " | ".
pub fn last_lines(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.get(lines.len().saturating_sub(n)..).unwrap_or_default().join(" | ")
}

pub fn describe_exit(exit: &Exit) -> String {
    match exit {
        Exit::Code(n) => format!("exited with status {n}"),
        Exit::Signal(s) => format!(
            "was killed by signal {}",
            Signal::try_from(*s).map_or_else(|_| s.to_string(), |s| s.as_str().to_string())
        ),
        Exit::TimedOut(d) => format!("timed out after {} s", d.as_secs()),
        Exit::Cancelled => "was cancelled".to_string(),
    }
}

/// Runs `spec`; its output when it exits with one of `ok_codes`, an error naming the
/// command, how it ended and the last lines it printed otherwise.
pub async fn checked(spec: &CommandSpec, ok_codes: &[i32], cancel: &mut Cancel) -> Result<Finished, ToolError> {
    let finished = run(spec, cancel).await?;
    match finished.exit {
        Exit::Code(c) if ok_codes.contains(&c) => Ok(finished),
        Exit::Cancelled => Err(ToolError::Cancelled(spec.display())),
        ref other => {
            Err(ToolError::Failed { command: spec.display(), how: describe_exit(other), output: finished.output })
        }
    }
}

pub(crate) async fn collect(mut pipe: tokio::net::unix::pipe::Receiver, out: Arc<Mutex<CappedOutput>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut o) = out.lock() {
                    o.push(buf.get(..n).unwrap_or_default());
                }
            }
        }
    }
}

/// SIGTERM to the group, SIGKILL to whatever is left after [`KILL_GRACE`].
async fn terminate(pgid: Pid, child: &mut tokio::process::Child) {
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        // Reap our own child so it does not count as a live member.
        let _ = child.try_wait();
        if !group_alive(pgid) {
            break;
        }
        if Instant::now() >= deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = child.wait().await;
}

/// Kills the group if the request is dropped while its command runs (the connection's
/// task aborted, the helper shutting down): no stray processes, whatever the path out.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Live (non-zombie) processes of a process group, from /proc.
pub fn group_members(pgid: Pid) -> io::Result<Vec<Pid>> {
    let mut live = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // A process may exit while we look: a missing stat file is not an error.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after
        // the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|s| s.parse::<i32>().ok());
        if pgrp == Some(pgid.as_raw()) && state != Some("Z") && state != Some("X") {
            live.push(Pid::from_raw(pid));
        }
    }
    Ok(live)
}

fn group_alive(pgid: Pid) -> bool {
    match group_members(pgid) {
        Ok(members) => !members.is_empty(),
        // No /proc view: ask the kernel (counts zombies, so may wait for SIGKILL).
        Err(_) => killpg(pgid, None).is_ok(),
    }
}

/// The first and the last `cap / 2` bytes of a stream, and how much was cut between.
#[derive(Debug)]
pub struct CappedOutput {
    half: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    cut: u64,
}

impl CappedOutput {
    pub fn new(cap: usize) -> Self {
        Self { half: cap / 2, head: Vec::new(), tail: VecDeque::new(), cut: 0 }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        let room = self.half.saturating_sub(self.head.len());
        let (to_head, rest) = data.split_at(room.min(data.len()));
        self.head.extend_from_slice(to_head);
        data = rest;
        if data.len() > self.half {
            let skip = data.len() - self.half;
            self.cut += (self.tail.len() + skip) as u64;
            self.tail.clear();
            data = data.get(skip..).unwrap_or_default();
        }
        self.tail.extend(data);
        if self.tail.len() > self.half {
            let excess = self.tail.len() - self.half;
            self.tail.drain(..excess);
            self.cut += excess as u64;
        }
    }

    pub fn render(&self) -> String {
        let mut bytes = self.head.clone();
        if self.cut > 0 {
            bytes.extend_from_slice(format!("\n[… {} bytes cut …]\n", self.cut).as_bytes());
        }
        bytes.extend(self.tail.iter());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    #[test]
    fn capped_output_keeps_head_and_tail() {
        let mut o = CappedOutput::new(8);
        o.push(b"ab");
        assert_eq!(o.render(), "ab");
        o.push(b"cdefgh");
        assert_eq!(o.render(), "abcdefgh");
        o.push(b"ij");
        assert_eq!(o.render(), "abcd\n[… 2 bytes cut …]\nghij");
        o.push(&[b'x'; 100]);
        assert_eq!(o.render(), "abcd\n[… 102 bytes cut …]\nxxxx");
    }

    fn spec(program: &str) -> CommandSpec {
        CommandSpec::tool(program, ["x"])
    }

    #[tokio::test]
    async fn a_program_busy_for_an_instant_is_started_once_it_is_free() {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&tool).unwrap();
        file.write_all(b"#!/bin/sh\necho started\n").unwrap();
        // Still open for writing, as in a child another thread forked before its exec:
        // the kernel refuses to run it (ETXTBSY) until the descriptor is gone.
        let refused = fs::metadata(&tool).map(|_| std::process::Command::new(&tool).status());
        assert_eq!(refused.unwrap().unwrap_err().raw_os_error(), Some(nix::errno::Errno::ETXTBSY as i32));
        let released = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            drop(file);
        });
        let spec = CommandSpec::tool(tool.to_str().unwrap(), Vec::<String>::new());
        let finished = Direct.run(&spec, None, &mut crate::cancel::pair().1).await.unwrap();
        assert_eq!((finished.exit, finished.output.trim()), (Exit::Code(0), "started"));
        released.await.unwrap();
    }

    #[test]
    fn package_managers_storage_and_vcs_tools_must_finish() {
        for p in [
            "apt-get",
            "/usr/bin/dpkg",
            "mkfs.ext4",
            "mkfs",
            "pip3",
            "pip3.11",
            "/srv/venv/bin/pip",
            "git",
            "lvcreate",
            "mdadm",
            "yum",
            "rpm",
            "npm",
            "gem",
        ] {
            assert!(must_finish(&spec(p)), "{p}");
        }
        for p in ["/bin/sh", "bash", "sleep", "pipx", "gitk", "systemctl", "apt-cache-x"] {
            assert!(!must_finish(&spec(p)), "{p}");
        }
    }

    #[tokio::test]
    async fn a_scope_gives_its_runner_the_label_and_adds_up_the_usage() {
        let fake = Arc::new(
            Fake { usage: Some(Usage { cpu: Duration::from_millis(30), peak_memory: Some(10) }), ..Fake::default() }
                .answer("false", Exit::Code(1), "no\n"),
        );
        let label =
            Label { recipe_version: 7, state_id: "s-1".into(), module: "linux.cmd".into(), sandbox: Vec::new() };
        let scope = Arc::new(Scope { label: Some(label.clone()), ..Scope::with_runner(fake.clone()) });
        let mut cancel = Cancel::never().with_scope(Arc::clone(&scope));
        let ok = checked(&spec("true"), &[0], &mut cancel).await.unwrap();
        assert_eq!(ok.exit, Exit::Code(0));
        let err = checked(&spec("/bin/false"), &[0], &mut cancel).await.unwrap_err();
        assert_eq!(err.to_string(), "`/bin/false x` exited with status 1: no");
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].0.program, PathBuf::from("/bin/false"));
        assert_eq!(calls[1].1.as_ref(), Some(&label));
        assert_eq!(scope.usage(), Some(Usage { cpu: Duration::from_millis(60), peak_memory: Some(10) }));
        assert_eq!(scope.usage().unwrap().to_string(), "cpu 0.060 s, peak memory 0.0 MiB");
    }

    /// In a plan, a command not declared an inspection never reaches the runner, the
    /// real one included; an inspection runs.
    #[tokio::test]
    async fn a_plan_runs_inspections_only() {
        let fake = Arc::new(Fake::default());
        let mut cancel = Cancel::never().with_scope(Arc::new(Scope::with_runner(fake.clone())));
        let plan = crate::plan::Plan::new();
        let (refused, inspected) = crate::plan::scope(Some(Arc::clone(&plan)), async {
            let refused = run(&spec("useradd"), &mut cancel).await;
            let inspected = run(&spec("dpkg-query").inspection(), &mut cancel).await;
            (refused, inspected)
        })
        .await;
        let err = refused.unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(err.source.to_string(), "a plan writes nothing: refused to run useradd x");
        assert_eq!(inspected.unwrap().exit, Exit::Code(0));
        let calls: Vec<PathBuf> = fake.calls().into_iter().map(|(s, _)| s.program).collect();
        assert_eq!(calls, [PathBuf::from("dpkg-query")]);
        // The real runner too: the marker is never created.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let touch = CommandSpec::tool("/usr/bin/touch", [marker.as_os_str()]);
        let r = crate::plan::scope(Some(plan), run(&touch, &mut Cancel::never())).await;
        assert!(r.is_err() && !marker.exists(), "{r:?}");
    }

    /// A sandboxed inspection runs in a plan only through a runner that enforces the
    /// sandbox; any other runner, the real direct one included, refuses it, plan or not,
    /// and the plan guard still refuses the same command without the sandbox.
    #[tokio::test]
    async fn a_sandboxed_inspection_runs_only_where_the_sandbox_is_enforced() {
        let sandbox = Sandbox::ReadOnlyHost { network: false };
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let touch = CommandSpec::tool("/usr/bin/touch", [marker.as_os_str()]);
        let enforcing = Arc::new(Fake { sandboxes: true, ..Fake::default() });
        let mut cancel = Cancel::never().with_scope(Arc::new(Scope::with_runner(enforcing.clone())));
        let plan = crate::plan::Plan::new();
        let (sandboxed, plain) = crate::plan::scope(Some(Arc::clone(&plan)), async {
            let sandboxed = run(&touch.clone().sandboxed_inspection(sandbox), &mut cancel).await;
            let plain = run(&touch, &mut cancel).await;
            (sandboxed, plain)
        })
        .await;
        assert_eq!(sandboxed.unwrap().exit, Exit::Code(0));
        assert_eq!(plain.unwrap_err().source.kind(), io::ErrorKind::PermissionDenied);
        let calls = enforcing.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0.sandbox, Some(sandbox));
        assert!(sandbox_available(&cancel));

        // The real direct runner: refused in a plan and in an apply, nothing runs.
        for planning in [true, false] {
            let mut direct = Cancel::never().with_scope(Arc::new(Scope::with_runner(Arc::new(Direct))));
            assert!(!sandbox_available(&direct));
            let spec = touch.clone().sandboxed_inspection(sandbox);
            let r = crate::plan::scope(planning.then(crate::plan::Plan::new), run(&spec, &mut direct)).await;
            let err = r.unwrap_err();
            assert_eq!(err.source.kind(), io::ErrorKind::Unsupported, "{err}");
            assert!(err.to_string().contains("no sandbox: commands run as direct here"), "{err}");
            assert!(!marker.exists());
        }
        assert_eq!(plan.refused().map(|r| r.subject), Some(touch.display()));
    }

    #[tokio::test]
    async fn a_cancelled_request_stops_a_command_but_not_a_package_manager() {
        let fake = Arc::new(Fake::default());
        let (canceller, cancel) = crate::cancel::pair();
        let mut cancel = cancel.with_scope(Arc::new(Scope::with_runner(fake.clone())));
        canceller.cancel();
        assert_eq!(run(&spec("/bin/sh"), &mut cancel).await.unwrap().exit, Exit::Cancelled);
        assert_eq!(run(&spec("apt-get"), &mut cancel).await.unwrap().exit, Exit::Code(0));
        assert_eq!(fake.calls().len(), 2);
    }

    /// The real direct runner: a program named like a package manager runs to its end
    /// although cancellation was asked before it started; any other is stopped.
    #[tokio::test]
    async fn direct_runs_a_package_manager_to_its_end_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let dpkg = dir.path().join("dpkg");
        std::os::unix::fs::symlink("/bin/sh", &dpkg).unwrap();
        let (canceller, mut cancel) = crate::cancel::pair();
        canceller.cancel();
        let mut finishing = CommandSpec::tool(dpkg.to_str().unwrap(), ["-c", "sleep 0.2; echo finished"]);
        finishing.timeout = Some(Duration::from_secs(60));
        let done = run(&finishing, &mut cancel).await.unwrap();
        assert_eq!((done.exit, done.output.trim()), (Exit::Code(0), "finished"));
        let stopped = run(&CommandSpec::tool("/bin/sh", ["-c", "sleep 30"]), &mut cancel).await.unwrap();
        assert_eq!(stopped.exit, Exit::Cancelled);
    }

    #[test]
    fn group_members_sees_this_process() {
        let me = nix::unistd::getpgrp();
        let members = group_members(me).unwrap();
        assert!(members.contains(&nix::unistd::getpid()));
    }
}
