//! `linux.supervisord`: supervisord running with `config`, and the named programs (or
//! groups) running under it; restarted when watched files change.
//!
//! Everything goes through `supervisorctl -c CONFIG`, which reaches the supervisord of
//! that configuration (its `[supervisorctl] serverurl`). Every round:
//! 1. `supervisorctl pid` does not answer: supervisord is started, and the state waits
//!    (up to [`START_WAIT`]) until it answers. How it is started:
//!    - where systemd is the init, outside the helper's own service, so that it neither
//!      inherits the helper's sandbox (no network) nor dies when the helper restarts:
//!      the distribution's unit when `config` is its configuration
//!      (`/etc/supervisor/supervisord.conf`: `supervisor.service` on Debian/Ubuntu;
//!      `/etc/supervisord.conf`: `supervisord.service` on RHEL) and that unit is
//!      installed, otherwise a transient unit, `systemd-run --unit
//!      opsagent-supervisord-<hash of the config path> --collect supervisord -n -c CONFIG`;
//!    - elsewhere: `supervisord -c CONFIG`, which puts itself in the background (a
//!      configuration with `nodaemon=true` would not return, and is refused).
//! 2. `config` changed since the last successful run (its MD5, stored like a watched
//!    file's; first sight does not count: supervisord may have read it already):
//!    `supervisorctl reload`, which restarts supervisord with the new configuration and
//!    all its programs. The original documentation promised this; its code did not do
//!    it (states.md 2c), and the documentation wins. Included files (`[include]`) are not
//!    followed: list them in `watch`.
//! 3. Each name of `name` (a program, `group:program`, or a group as `group` or
//!    `group:*`) that supervisord does not know: `supervisorctl reread`, then `add`
//!    (the original's "reread + add"); still unknown, the state fails naming it.
//! 4. Every process of those names that is not running: `supervisorctl start`.
//! 5. The watch triggered (a watched file's MD5 changed since the last successful run;
//!    first sight counts, as in the original; or `watch: true`, every round): the
//!    processes that were already running are restarted (`supervisorctl restart`).
//!    Nothing is restarted when step 1 or 2 just started supervisord: its programs
//!    started with the files as they are now.
//! 6. The state waits (up to [`SETTLE_WAIT`]) for the processes to leave STARTING,
//!    BACKOFF and STOPPING, and fails unless every one is RUNNING. The checksums are
//!    stored only then, so a failed restart is retried next round.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::catalogue::LinuxSupervisord;
use opsagent_proto::newtypes::{AbsPath, InvalidValue, StateId, UnitName};
use opsagent_proto::param_types::Watch;
use opsagent_proto::request::{Change, Outcome};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::cancel::Cancel;
use crate::checksums::{ChecksumError, ChecksumStore, FileChanges};
use crate::exec::{self, CommandSpec, Exit, ToolError};
use crate::states::lang::Run;
use crate::states::storage::{find_tool, MissingTool};
use crate::systemd::{self, Job, ServiceError, ServiceManager, Systemd};

/// How long a freshly started (or reloaded) supervisord has to answer.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// How long processes may stay in a transitional state before the state judges them.
pub const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// Deadline of one supervisorctl command (`start` waits for `startsecs`, `restart` for
/// `stopwaitsecs` too).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(200);

/// Configurations of the distributions' packages, and the unit that runs each.
pub const PACKAGED: &[(&str, &str)] =
    &[("/etc/supervisor/supervisord.conf", "supervisor.service"), ("/etc/supervisord.conf", "supervisord.service")];
const UNIT_DIRS: &[&str] =
    &["/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"];

/// How supervisord is started when it does not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `supervisord -c CONFIG`, in the background, from the helper.
    Direct,
    /// A systemd unit (see the module documentation).
    Systemd,
}

/// The supervisor installation a state uses.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub supervisord: PathBuf,
    pub supervisorctl: PathBuf,
    pub launch: Launch,
}

impl Supervisor {
    /// The host's supervisor, started through systemd where systemd is the init.
    pub fn system() -> Result<Self, SupervisorError> {
        let find = |tool: &str| {
            find_tool(tool, &[]).ok_or_else(|| MissingTool {
                tool: tool.to_string(),
                hint: "Debian/Ubuntu package supervisor, RHEL (EPEL) supervisor, or pip package supervisor".into(),
            })
        };
        let launch = if systemd::booted() { Launch::Systemd } else { Launch::Direct };
        Ok(Self { supervisord: find("supervisord")?, supervisorctl: find("supervisorctl")?, launch })
    }

    pub fn ctl<S: AsRef<str>>(&self, config: &AbsPath, args: &[S]) -> CommandSpec {
        let all = ["-c".to_string(), config.to_string()].into_iter().chain(args.iter().map(|a| a.as_ref().to_string()));
        CommandSpec::tool(&self.supervisorctl.to_string_lossy(), all).with_timeout(CTL_TIMEOUT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Missing(#[from] MissingTool),
    #[error("parameter name: no program named")]
    NoPrograms,
    #[error("parameter name: {0:?} is not a supervisord program or group name")]
    Name(String),
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error(transparent)]
    RootRead(#[from] crate::states::root_read::RootReadError),
    #[error("parameter config: {0} does not exist or is not a regular file")]
    NoConfig(AbsPath),
    #[error(
        "{0} sets nodaemon=true in [supervisord]: `supervisord -c` would not return; remove it, or run supervisord \
         from a service"
    )]
    NoDaemon(AbsPath),
    #[error("{path}: cannot read: {source}")]
    Read { path: AbsPath, source: std::io::Error },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Service(Box<ServiceError>),
    #[error(transparent)]
    Watch(#[from] ChecksumError),
    #[error("supervisord (-c {config}) does not answer {} s after it was started; supervisorctl says: {last}", .waited.as_secs())]
    NotReady { config: AbsPath, waited: Duration, last: String },
    #[error("{name} is not a program or group of the supervisord of {config}, even after a reread")]
    Unknown { name: String, config: AbsPath },
    #[error("{name} is {state} ({detail}), not RUNNING")]
    NotRunning { name: String, state: String, detail: String },
    #[error("cancelled while waiting for {0}")]
    Cancelled(&'static str),
}

impl From<ServiceError> for SupervisorError {
    fn from(e: ServiceError) -> Self {
        SupervisorError::Service(Box::new(e))
    }
}

impl SupervisorError {
    fn is_cancelled(&self) -> bool {
        match self {
            SupervisorError::Tool(e) => e.is_cancelled(),
            SupervisorError::Service(e) => e.is_cancelled(),
            SupervisorError::Cancelled(_) => true,
            _ => false,
        }
    }
}

/// One line of `supervisorctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// `program`, or `group:program`.
    pub name: String,
    pub state: String,
    pub detail: String,
}

impl Process {
    fn running(&self) -> bool {
        self.state == "RUNNING"
    }

    fn settling(&self) -> bool {
        matches!(self.state.as_str(), "STARTING" | "BACKOFF" | "STOPPING")
    }
}

const STATES: &[&str] = &["STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN"];

/// `supervisorctl status` output; error lines (`x: ERROR (no such process)`) skipped.
pub fn parse_status(out: &str) -> Vec<Process> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (name, state) = (words.next()?, words.next()?);
            STATES.contains(&state).then(|| Process {
                name: name.to_string(),
                state: state.to_string(),
                detail: words.collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// The processes a recipe's name stands for: the program itself, or every process of
/// a group (`group`, `group:*`).
pub fn matching<'a>(procs: &'a [Process], name: &str) -> Vec<&'a Process> {
    let group = name.strip_suffix(":*").unwrap_or(name);
    procs
        .iter()
        .filter(|p| p.name == name || p.name.strip_prefix(group).is_some_and(|rest| rest.starts_with(':')))
        .collect()
}

/// The process group `supervisorctl add` takes for a name.
pub fn group_of(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// A program or group name as supervisorctl takes it: nothing blank, nothing it would
/// read as an option.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_graphic() && !"'\"\\;&|<>$`".contains(c))
}

/// Whether a configuration's `[supervisord]` section sets `nodaemon` true.
pub fn nodaemon_set(config: &str) -> bool {
    let mut in_section = false;
    for line in config.lines() {
        let line = line.split([';', '#']).next().unwrap_or("").trim();
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == "supervisord";
        } else if let (true, Some((k, v))) = (in_section, line.split_once('=')) {
            if k.trim() == "nodaemon" {
                return matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "yes" | "on" | "1");
            }
        }
    }
    false
}

/// The transient unit that runs supervisord for a configuration.
pub fn transient_unit(config: &AbsPath) -> String {
    let digest = hex::encode(Sha256::digest(config.to_string().as_bytes()));
    format!("opsagent-supervisord-{}.service", &digest[..12])
}

pub fn systemd_run_args(supervisord: &Path, config: &AbsPath) -> Vec<String> {
    vec![
        format!("--unit={}", transient_unit(config)),
        "--collect".into(),
        "--quiet".into(),
        format!("--description=supervisord -c {config} (started by opsagent)"),
        supervisord.display().to_string(),
        "-n".into(),
        "-c".into(),
        config.to_string(),
    ]
}

/// The distribution's unit for `config`, when it is installed.
fn packaged_unit(config: &AbsPath) -> Option<UnitName> {
    let (_, unit) = PACKAGED.iter().find(|(path, _)| config.as_path() == Path::new(path))?;
    UNIT_DIRS.iter().any(|d| Path::new(d).join(unit).exists()).then(|| UnitName::service(unit).ok()).flatten()
}

pub async fn apply(p: &LinuxSupervisord, state: &StateId, store: &ChecksumStore, cancel: Cancel) -> Outcome {
    match Supervisor::system() {
        Ok(sup) => run(p, state, store, &sup, cancel).await,
        Err(e) => Outcome::failed(e.to_string()),
    }
}

/// The state with a given supervisor installation.
pub async fn run(
    p: &LinuxSupervisord,
    state: &StateId,
    store: &ChecksumStore,
    sup: &Supervisor,
    cancel: Cancel,
) -> Outcome {
    let mut run = Run::new(cancel);
    let result = steps(p, state, store, sup, &mut run).await;
    let cancelled = result.as_ref().is_err_and(SupervisorError::is_cancelled);
    let subject = format!("{} (supervisord -c {})", p.name.join(", "), p.config.0);
    run.finish_with(&subject, result, cancelled)
}

async fn steps(
    p: &LinuxSupervisord,
    state: &StateId,
    store: &ChecksumStore,
    sup: &Supervisor,
    run: &mut Run,
) -> Result<(), SupervisorError> {
    let config = p.config.abs().clone();
    if !config.as_path().is_file() {
        return Err(SupervisorError::NoConfig(config));
    }
    // supervisord reads it as root and runs the programs it names: only a file root
    // controls ([`crate::states::root_read`]).
    crate::states::root_read::check("config", &config)?;
    let names: Vec<&str> = p.name.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Err(SupervisorError::NoPrograms);
    }
    if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
        return Err(SupervisorError::Name(bad.to_string()));
    }
    let (triggered, check) = match &p.watch {
        None => (false, FileChanges::default()),
        Some(Watch::EveryRound) => {
            run.notes.push("watch: true, restarting every round".into());
            (true, FileChanges::default())
        }
        // Absolute, normalised paths by their type (`Watch`, checked at decode).
        Some(Watch::Files(files)) => {
            let check = store.check(state, files, true)?;
            if check.triggered() {
                let changed: Vec<String> = check.changed.iter().map(ToString::to_string).collect();
                run.notes.push(format!("watched {} changed", changed.join(", ")));
            }
            for missing in &check.missing {
                run.notes.push(format!("watched {missing} does not exist"));
            }
            (check.triggered(), check)
        }
    };
    let config_check = store.check(state, std::slice::from_ref(&config), false)?;

    if crate::plan::active() {
        return planned(sup, &config, &names, triggered, config_check.triggered(), run).await;
    }

    // 1 and 2: supervisord itself.
    let mut fresh = false;
    if pid(sup, &config, run).await?.is_none() {
        launch(sup, &config, run).await?;
        wait_ready(sup, &config, run).await?;
        fresh = true;
    } else if config_check.triggered() {
        run.act(&sup.ctl(&config, &["reload"])).await?;
        run.changes.push(Change::new(config.to_string(), "supervisord restarted (reload): the configuration changed"));
        wait_ready(sup, &config, run).await?;
        fresh = true;
    }

    // 3: names it does not know yet.
    let mut procs = status(sup, &config, run).await?;
    let mut reread = false;
    for name in &names {
        if !matching(&procs, name).is_empty() {
            continue;
        }
        if !reread {
            run.act(&sup.ctl(&config, &["reread"])).await?;
            reread = true;
        }
        let added = run.act(&sup.ctl(&config, &["add", group_of(name)])).await;
        procs = status(sup, &config, run).await?;
        if matching(&procs, name).is_empty() {
            return Err(SupervisorError::Unknown { name: name.to_string(), config });
        }
        added?;
        run.changes.push(Change::new(group_of(name), "added to supervisord"));
    }
    let mut targets: Vec<String> = Vec::new();
    for name in &names {
        for p in matching(&procs, name) {
            if !targets.contains(&p.name) {
                targets.push(p.name.clone());
            }
        }
    }
    let was_running: BTreeSet<String> = procs.iter().filter(|p| p.running()).map(|p| p.name.clone()).collect();

    // 4: start what does not run ("already started" for a process still starting is
    // fine: step 6 waits for it).
    let to_start: Vec<&String> = targets.iter().filter(|t| !was_running.contains(*t)).collect();
    if !to_start.is_empty() {
        let mut args = vec!["start".to_string()];
        args.extend(to_start.iter().map(|s| s.to_string()));
        let out = loose(sup.ctl(&config, &args), run).await?;
        for line in out.lines() {
            if let Some(name) = line.trim().strip_suffix(": started") {
                run.changes.push(Change::new(name, "started"));
            }
        }
    }

    // 5: the watch.
    if triggered {
        let restart: Vec<&String> = targets.iter().filter(|t| was_running.contains(*t)).collect();
        if fresh {
            run.notes.push("supervisord was (re)started this round, so its programs already run with them".into());
        } else if !restart.is_empty() {
            let mut args = vec!["restart".to_string()];
            args.extend(restart.iter().map(|s| s.to_string()));
            loose(sup.ctl(&config, &args), run).await?;
            for name in restart {
                run.changes.push(Change::new(name.as_str(), "restarted"));
            }
        }
    }

    // 6: judge.
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let procs = status(sup, &config, run).await?;
        let ours: Vec<&Process> = procs.iter().filter(|p| targets.contains(&p.name)).collect();
        if ours.iter().any(|p| p.settling()) && Instant::now() < deadline {
            pause(run, "the programs to start").await?;
            continue;
        }
        if let Some(p) = ours.iter().find(|p| !p.running()) {
            return Err(SupervisorError::NotRunning {
                name: p.name.clone(),
                state: p.state.clone(),
                detail: p.detail.clone(),
            });
        }
        if let Some(gone) = targets.iter().find(|t| !ours.iter().any(|p| &p.name == *t)) {
            return Err(SupervisorError::Unknown { name: gone.clone(), config });
        }
        break;
    }
    // Only now: a failure above keeps the old checksums, so the restart is retried.
    store.commit(&check)?;
    store.commit(&config_check)?;
    Ok(())
}

/// [`steps`] 1 to 5 as a plan: the same decisions from `pid` and `status`, without
/// acting. A supervisord that does not run would be started, and what it then runs is
/// known only once it has read its configuration.
async fn planned(
    sup: &Supervisor,
    config: &AbsPath,
    names: &[&str],
    triggered: bool,
    config_changed: bool,
    run: &mut Run,
) -> Result<(), SupervisorError> {
    if pid(sup, config, run).await?.is_none() {
        run.changes.push(Change::new(config.to_string(), "supervisord started"));
        run.notes.push("what it runs is known once it has read its configuration".into());
        return Ok(());
    }
    if config_changed {
        run.changes.push(Change::new(config.to_string(), "supervisord restarted (reload): the configuration changed"));
    }
    let procs = status(sup, config, run).await?;
    let mut targets: Vec<String> = Vec::new();
    for name in names {
        let found = matching(&procs, name);
        if found.is_empty() {
            run.changes.push(Change::new(group_of(name), "added to supervisord"));
        }
        for p in found {
            if !targets.contains(&p.name) {
                targets.push(p.name.clone());
            }
        }
    }
    for t in &targets {
        let running = procs.iter().any(|p| &p.name == t && p.running());
        if !running {
            run.changes.push(Change::new(t.as_str(), "started"));
        } else if triggered && !config_changed {
            run.changes.push(Change::new(t.as_str(), "restarted"));
        }
    }
    Ok(())
}

/// supervisord's pid, or `None` when it does not answer.
async fn pid(sup: &Supervisor, config: &AbsPath, run: &mut Run) -> Result<Option<u32>, SupervisorError> {
    let finished =
        exec::run(&sup.ctl(config, &["pid"]).inspection(), &mut run.cancel).await.map_err(ToolError::from)?;
    Ok(match finished.exit {
        Exit::Code(0) => finished.output.lines().rev().find_map(|l| l.trim().parse::<u32>().ok()),
        Exit::Cancelled => return Err(SupervisorError::Cancelled("supervisorctl pid")),
        _ => None,
    })
}

async fn status(sup: &Supervisor, config: &AbsPath, run: &mut Run) -> Result<Vec<Process>, SupervisorError> {
    // 3: some processes do not run; 4: a name is unknown (both still list the rest).
    let out = run.query(&sup.ctl(config, &["status"]).inspection(), &[0, 3, 4]).await?;
    Ok(parse_status(&out))
}

/// A supervisorctl command whose exit status does not decide: it is judged by the
/// status that follows. Its output goes to the outcome's output.
async fn loose(spec: CommandSpec, run: &mut Run) -> Result<String, SupervisorError> {
    let finished = exec::run(&spec, &mut run.cancel).await.map_err(ToolError::from)?;
    run.output.push_str(&format!("$ {}\n{}", spec.display(), finished.output));
    match finished.exit {
        Exit::Code(_) => Ok(finished.output),
        Exit::Cancelled => Err(ToolError::Cancelled(spec.display()).into()),
        other => Err(ToolError::Failed {
            command: spec.display(),
            how: exec::describe_exit(&other),
            output: finished.output,
        }
        .into()),
    }
}

async fn launch(sup: &Supervisor, config: &AbsPath, run: &mut Run) -> Result<(), SupervisorError> {
    match sup.launch {
        Launch::Direct => {
            let text = std::fs::read_to_string(config.as_path())
                .map_err(|source| SupervisorError::Read { path: config.clone(), source })?;
            if nodaemon_set(&text) {
                return Err(SupervisorError::NoDaemon(config.clone()));
            }
            let args = ["-c".to_string(), config.to_string()];
            run.act(&CommandSpec::tool(&sup.supervisord.to_string_lossy(), args)).await?;
            run.changes.push(Change::new(config.to_string(), "supervisord started"));
        }
        Launch::Systemd => match packaged_unit(config) {
            Some(unit) => {
                Systemd::system().await?.run(&unit, Job::Start, &mut run.cancel).await?;
                run.changes.push(Change::new(unit.as_str(), format!("started (supervisord -c {config})")));
            }
            None => {
                let program = find_tool("systemd-run", &[]).unwrap_or_else(|| PathBuf::from("/usr/bin/systemd-run"));
                let spec = CommandSpec::tool(&program.to_string_lossy(), systemd_run_args(&sup.supervisord, config));
                run.act(&spec).await?;
                run.changes.push(Change::new(transient_unit(config), format!("started (supervisord -n -c {config})")));
            }
        },
    }
    Ok(())
}

async fn wait_ready(sup: &Supervisor, config: &AbsPath, run: &mut Run) -> Result<(), SupervisorError> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if pid(sup, config, run).await?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let last = exec::run(&sup.ctl(config, &["pid"]), &mut run.cancel)
                .await
                .map(|f| exec::last_lines(&f.output, 2))
                .unwrap_or_default();
            return Err(SupervisorError::NotReady { config: config.clone(), waited: START_WAIT, last });
        }
        pause(run, "supervisord to answer").await?;
    }
}

async fn pause(run: &mut Run, what: &'static str) -> Result<(), SupervisorError> {
    tokio::select! {
        () = tokio::time::sleep(POLL) => Ok(()),
        () = run.cancel.requested() => Err(SupervisorError::Cancelled(what)),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn status_lines() {
        let out = "g:a                              RUNNING   pid 9726, uptime 0:00:02\n\
                   g:b                              STOPPED   Not started\n\
                   sleeper                          STARTING  \n\
                   nope: ERROR (no such process)\n\
                   unix:///tmp/x/sock no such file\n";
        let procs = parse_status(out);
        assert_eq!(procs.len(), 3);
        assert_eq!(
            procs[0],
            Process { name: "g:a".into(), state: "RUNNING".into(), detail: "pid 9726, uptime 0:00:02".into() }
        );
        assert_eq!(
            (procs[2].name.as_str(), procs[2].state.as_str(), procs[2].detail.as_str()),
            ("sleeper", "STARTING", "")
        );
        let names = |n: &str| matching(&procs, n).iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names("g"), ["g:a", "g:b"]);
        assert_eq!(names("g:*"), ["g:a", "g:b"]);
        assert_eq!(names("g:b"), ["g:b"]);
        assert_eq!(names("sleeper"), ["sleeper"]);
        assert!(names("sleep").is_empty());
        assert_eq!(group_of("g:b"), "g");
        assert_eq!(group_of("sleeper"), "sleeper");
    }

    #[test]
    fn names_configs_and_units() {
        for ok in ["web", "g:*", "g:web_00", "a.b-c"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["-c", "a b", "", "x;y", "$(x)"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(nodaemon_set("[supervisord]\nlogfile=/x\nnodaemon = true ; foreground\n"));
        assert!(!nodaemon_set("[supervisord]\nnodaemon=false\n[program:x]\nnodaemon=true\n"));
        assert!(!nodaemon_set("[unix_http_server]\nfile=/x\n"));
        let config = AbsPath::parse("/srv/app/supervisord.conf").unwrap();
        let unit = transient_unit(&config);
        assert!(unit.starts_with("opsagent-supervisord-") && unit.ends_with(".service") && unit.len() == 41, "{unit}");
        assert_eq!(
            systemd_run_args(Path::new("/usr/bin/supervisord"), &config).join(" "),
            format!(
                "--unit={unit} --collect --quiet --description=supervisord -c /srv/app/supervisord.conf (started by \
                 opsagent) /usr/bin/supervisord -n -c /srv/app/supervisord.conf"
            )
        );
        let sup = Supervisor {
            supervisord: "/usr/bin/supervisord".into(),
            supervisorctl: "/usr/bin/supervisorctl".into(),
            launch: Launch::Direct,
        };
        assert_eq!(
            sup.ctl(&config, &["status"]).display(),
            "/usr/bin/supervisorctl -c /srv/app/supervisord.conf status"
        );
    }

    #[tokio::test]
    async fn bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChecksumStore::new(dir.path());
        let id = StateId::parse("s-1").unwrap();
        let sup = Supervisor {
            supervisord: "/nonexistent/supervisord".into(),
            supervisorctl: "/nonexistent/supervisorctl".into(),
            launch: Launch::Direct,
        };
        let p: LinuxSupervisord = typed("linux.supervisord", json!({"config": "/nonexistent/s.conf", "name": ["web"]}));
        let out = run(&p, &id, &store, &sup, Cancel::never()).await;
        assert_eq!(
            (out.result, out.comment.as_str()),
            (false, "parameter config: /nonexistent/s.conf does not exist or is not a regular file")
        );
        let conf = dir.path().join("s.conf");
        std::fs::write(&conf, "[supervisord]\n").unwrap();
        crate::states::testutil::refused(
            "linux.supervisord",
            json!({"config": conf.to_str().unwrap(), "name": ["-c/etc/x"]}),
            "parameter \"name\"",
        );
        crate::states::testutil::refused(
            "linux.supervisord",
            json!({"config": conf.to_str().unwrap(), "name": ["web"], "watch": ["rel/x"]}),
            "parameter \"watch\": path \"rel/x\" is not absolute",
        );
    }
}
