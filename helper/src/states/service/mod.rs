//! `linux.service`: keeps services running, and acts when their watched files change.
//!
//! Every round, each named service that is not running is started (boot enablement is
//! not touched, as in the original). When the state's `watch` triggers (a watched file's
//! checksum changed since the last successful run, first sight included, or `watch:
//! true`), each service gets its action instead:
//! - `reload` / `restart`: that job;
//! - empty: reload, falling back to restart when the reload fails or is not supported;
//! - anything else: a shell command (`/bin/sh -c`, as root, in `/`, with the helper's
//!   fixed tool environment), after which the service must still be running.
//!
//! A service that is not running when the watch triggers is started rather than
//! reloaded (a fresh start reads the new configuration); with a command action the
//! command runs first. The state fails when a service is not running at the end; the
//! watched checksums are stored only when it succeeds, so a failed reload is retried.

use std::time::Duration;

use opsagent_proto::catalogue::LinuxService;
use opsagent_proto::newtypes::{InvalidValue, StateId, UnitName};
use opsagent_proto::param_types::Watch;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::checksums::{ChecksumError, ChecksumStore, FileChanges};
use crate::exec::{self, CommandSpec, ToolError};
use crate::plan;
use crate::systemd::{self, Job, ServiceError, ServiceManager, SysV, Systemd};

/// Deadline of a command action.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(600);

/// What to do to one service when the watch triggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ReloadOrRestart,
    Reload,
    Restart,
    Command(String),
}

impl Action {
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "" => Action::ReloadOrRestart,
            "reload" => Action::Reload,
            "restart" => Action::Restart,
            _ => Action::Command(value.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("parameter name: {0}")]
    Name(InvalidValue),
    #[error(transparent)]
    Watch(#[from] ChecksumError),
    #[error(transparent)]
    Service(Box<ServiceError>),
    #[error("{unit}: the action command {source}")]
    Command { unit: UnitName, source: ToolError },
    #[error("{unit} is not running after {what} (ActiveState {state})")]
    NotRunning { unit: UnitName, what: &'static str, state: String },
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        Error::Service(Box::new(e))
    }
}

impl Error {
    fn is_cancelled(&self) -> bool {
        match self {
            Error::Service(e) => e.is_cancelled(),
            Error::Command { source, .. } => source.is_cancelled(),
            _ => false,
        }
    }
}

pub async fn apply(p: &LinuxService, state: &StateId, store: &ChecksumStore, cancel: Cancel) -> Outcome {
    if systemd::booted() {
        match Systemd::system().await {
            Ok(manager) => run(p, state, store, &manager, cancel).await,
            Err(e) => Outcome::failed(e.to_string()),
        }
    } else {
        run(p, state, store, &SysV::default(), cancel).await
    }
}

/// The state against any service manager (the real one, or a test's fake).
pub async fn run<M: ServiceManager>(
    p: &LinuxService,
    state: &StateId,
    store: &ChecksumStore,
    manager: &M,
    mut cancel: Cancel,
) -> Outcome {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let mut output = String::new();
    let result = async {
        let services = p
            .name
            .iter()
            .map(|e| Ok((UnitName::service(e.key.trim()).map_err(Error::Name)?, Action::parse(e.value_or_empty()))))
            .collect::<Result<Vec<_>, Error>>()?;
        let (triggered, check) = match &p.watch {
            None => (false, FileChanges::default()),
            Some(Watch::EveryRound) => (true, FileChanges::default()),
            // Absolute, normalised paths by their type (`Watch`, checked at decode).
            Some(Watch::Files(files)) => {
                let check = store.check(state, files, true)?;
                (check.triggered(), check)
            }
        };
        if triggered {
            let why = if check.changed.is_empty() {
                "watch: true, acting every round".to_string()
            } else {
                format!(
                    "watched {} changed",
                    check.changed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                )
            };
            notes.push(why);
        }
        for missing in &check.missing {
            notes.push(format!("watched {missing} does not exist"));
        }
        for (unit, action) in &services {
            one(manager, unit, action, triggered, &mut changes, &mut output, &mut cancel).await?;
        }
        // Only now: a failure above leaves the old checksums, so the action is retried.
        // A plan leaves them too: the apply after it must still see the change.
        if !plan::active() {
            store.commit(&check)?;
        }
        Ok::<(), Error>(())
    }
    .await;
    let cancelled = result.as_ref().is_err_and(Error::is_cancelled);
    let subject = p.name.iter().map(|e| e.key.as_str()).collect::<Vec<_>>().join(", ");
    let mut outcome = super::finish(&subject, result, changes, &notes);
    outcome.cancelled = cancelled;
    outcome.stdout = output;
    outcome
}

async fn one<M: ServiceManager>(
    manager: &M,
    unit: &UnitName,
    action: &Action,
    triggered: bool,
    changes: &mut Vec<Change>,
    output: &mut String,
    cancel: &mut Cancel,
) -> Result<(), Error> {
    let mut state = manager.state(unit).await?;
    let mut what = None;
    if plan::active() {
        // The same decisions on the state read above, without the jobs. A command
        // action's effect (and whether the service runs after it) cannot be known
        // without running it.
        let would = match action {
            Action::Command(_) if triggered => Some("action command ran"),
            _ if triggered && state.running() => Some(match action {
                Action::Restart => Job::Restart.done(),
                _ => Job::Reload.done(),
            }),
            _ if !state.running() => Some(Job::Start.done()),
            _ => None,
        };
        changes.extend(would.map(|w| Change::new(unit.as_str(), w)));
        return Ok(());
    }
    if triggered {
        if let Action::Command(cmd) = action {
            let spec = CommandSpec::tool("/bin/sh", ["-c", cmd.as_str()]).with_timeout(ACTION_TIMEOUT);
            match exec::checked(&spec, &[0], cancel).await {
                Ok(f) => output.push_str(&f.output),
                Err(source) => return Err(Error::Command { unit: unit.clone(), source }),
            }
            changes.push(Change::new(unit.as_str(), "action command ran"));
            what = Some("its action command");
        } else if state.running() {
            what = Some(reload_or_restart(manager, unit, action, changes, cancel).await?);
        }
        if what.is_some() {
            state = manager.state(unit).await?;
        }
    }
    // Not running (and not brought back by the action): start it.
    if !state.running() {
        manager.run(unit, Job::Start, cancel).await?;
        changes.push(Change::new(unit.as_str(), "started"));
        what = Some("its start job");
        state = manager.state(unit).await?;
    }
    match what {
        Some(what) if !state.running() => {
            Err(Error::NotRunning { unit: unit.clone(), what, state: state.active_state })
        }
        _ => Ok(()),
    }
}

async fn reload_or_restart<M: ServiceManager>(
    manager: &M,
    unit: &UnitName,
    action: &Action,
    changes: &mut Vec<Change>,
    cancel: &mut Cancel,
) -> Result<&'static str, Error> {
    let (job, why) = match action {
        Action::Reload => (Job::Reload, String::new()),
        Action::Restart => (Job::Restart, String::new()),
        Action::ReloadOrRestart => match manager.run(unit, Job::Reload, cancel).await {
            Ok(()) => (Job::Reload, String::new()),
            Err(e) if e.is_cancelled() => return Err(e.into()),
            Err(e) => {
                manager.run(unit, Job::Restart, cancel).await?;
                (Job::Restart, format!(" (reload failed: {e})"))
            }
        },
        Action::Command(_) => return Ok("its action command"),
    };
    if matches!(action, Action::Reload | Action::Restart) {
        manager.run(unit, job, cancel).await?;
    }
    changes.push(Change::new(unit.as_str(), format!("{}{why}", job.done())));
    Ok(if job == Job::Reload { "its reload job" } else { "its restart job" })
}

#[cfg(test)]
mod tests;
