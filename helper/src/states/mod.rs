//! One file per module family; [`apply`] is the one place that maps a module to its
//! implementation. Adding a module = a new file here and one match arm.
//!
//! Every state is idempotent: it looks at the host first and changes only what differs,
//! and its outcome's `changes` lists exactly what it changed (empty: nothing did).
//!
//! A plan request ([`ApplyRequest::plan`]) runs the same code in a plan context
//! ([`crate::plan`]): a module looks at the host as it would before acting and, where it
//! would write, records the same change without making it, so that a plan's `changes`
//! are the very list the apply would report. Whatever a module does not plan for is
//! stopped by the write guard; [`planned`] turns that refusal into the honest answer
//! (this step would be taken; what follows cannot be known without taking it).

pub mod apt;
pub mod archive;
pub mod chef;
pub mod cmd;
pub mod cronjob;
pub mod dir;
pub mod docker;
pub mod dpkg_db;
pub mod file;
pub mod group;
pub mod lang;
pub mod mesos;
pub mod puppet;
pub mod remote;
pub mod repo;
pub mod root_read;
pub mod rpm_db;
pub mod selinux;
pub mod service;
pub mod ssh;
pub mod storage;
pub mod supervisord;
pub mod symlink;
pub mod timezone;
pub mod user;
pub mod vcs;
pub mod yum;

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{ApplyRequest, Change, ErrorCode, HelperError, Outcome};

use crate::cancel::Cancel;
use crate::checksums::ChecksumStore;
use crate::fetched::Fetched;
use crate::plan::{self, Plan, Refused};
use crate::policy::Policy;

/// The working directory of `linux.cmd` when a recipe names none (the catalogue's
/// default), created on demand.
pub const DEFAULT_CMD_CWD: &str = "/opt/visualops/tmp";

/// What states need to know about the helper they run in.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub state_dir: PathBuf,
    /// Created (root, 0755) when a command uses it and it is missing; any other cwd
    /// must already exist.
    pub default_cwd: AbsPath,
    /// The operator's restrictions, checked before any state runs.
    pub policy: Arc<Policy>,
    /// The uid of the connected client (SO_PEERCRED): files it downloaded for a state
    /// must be owned by it. Root for in-process callers.
    pub peer_uid: u32,
}

impl Ctx {
    pub fn new(state_dir: PathBuf) -> Self {
        let default_cwd = AbsPath::parse(DEFAULT_CMD_CWD).expect("the default cwd is a valid absolute path");
        Self { state_dir, default_cwd, policy: Arc::new(Policy::default()), peer_uid: 0 }
    }

    /// This context for a request from `uid`.
    pub fn for_peer(&self, uid: u32) -> Self {
        Self { peer_uid: uid, ..self.clone() }
    }

    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }
}

/// What applying a state came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done(Outcome),
    /// The state needs these URLs downloaded (by the daemon) before it can run; nothing
    /// was changed.
    NeedFetch(Vec<String>),
}

/// A module's work as its own heap-allocated future. Held inline, the futures of thirty
/// modules made [`apply`] one state machine of some 200 KB of code that every request
/// runs through and keeps mapped; boxed (and polled through the box), each module's
/// code stays in its own functions and [`apply`] is a small dispatch.
fn boxed<'a, T>(work: impl Future<Output = T> + Send + 'a) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(work)
}

/// Applies (or, with `req.plan`, plans) one state. `Err` is for requests this helper
/// will not carry out at all; a state that was tried and failed is an `Ok` outcome with
/// `result: false`.
pub async fn apply(req: &ApplyRequest, ctx: &Ctx, cancel: Cancel) -> Result<Step, HelperError> {
    if !req.plan {
        return dispatch(req, ctx, cancel).await;
    }
    let plan = Plan::new();
    let step = plan::scope(Some(Arc::clone(&plan)), dispatch(req, ctx, cancel)).await?;
    Ok(match step {
        // Downloads are the daemon's, in a plan as in an apply: content is compared
        // with what the URL serves now.
        Step::NeedFetch(urls) => Step::NeedFetch(urls),
        Step::Done(outcome) => Step::Done(planned(outcome, plan.refused(), req.params.name())),
    })
}

/// The outcome of a plan: `changes` are what would change. A write the module did
/// not plan for was refused by the guard; that step is what would be done, and the
/// module cannot know what comes after it without doing it.
pub fn planned(mut outcome: Outcome, refused: Option<Refused>, module: &str) -> Outcome {
    outcome.planned = true;
    if let Some(r) = refused {
        outcome.result = true;
        outcome.changes.push(Change::new(r.subject, format!("would {}", r.action)));
        // The step itself is in `changes`; the comment says only why the plan stops
        // there (the daemon heads the list "would change", as a StateLog heads "changed").
        outcome.comment = format!("{module} cannot tell what follows this step without taking it");
    }
    outcome
}

async fn dispatch(req: &ApplyRequest, ctx: &Ctx, cancel: Cancel) -> Result<Step, HelperError> {
    if !req.params.is_builtin() {
        ctx.policy.check(&req.params)?;
    }
    let id = &req.state_id;
    let fetched = Fetched::new(&req.fetched, ctx.peer_uid);
    // Package files and keys given as URLs: downloaded by the daemon first, then
    // installed from root-only copies, removed when the state ends.
    let urls = remote::remote_urls(&req.params);
    let _staged;
    let localised;
    let params = if urls.is_empty() {
        &req.params
    } else {
        let wanted: Vec<&str> = urls.iter().map(String::as_str).collect();
        let missing = fetched.missing(&wanted);
        if !missing.is_empty() {
            return Ok(Step::NeedFetch(missing));
        }
        if plan::active() {
            // A package file or key is installed by its tool, which has no dry run of
            // its own here: what it would change is not known before it runs.
            let changes = urls
                .iter()
                .map(|u| Change::new(u.clone(), "would be installed from the download (its tool cannot tell what it would change without installing)"))
                .collect();
            return Ok(Step::Done(Outcome { result: true, changes, ..Outcome::default() }));
        }
        match boxed(blocking((urls, req.fetched.clone(), ctx.clone()), |(urls, files, ctx)| {
            remote::stage(urls, &Fetched::new(files, ctx.peer_uid), &ctx.state_dir)
        }))
        .await?
        {
            Ok(staged) => {
                localised = staged.localise(&req.params);
                _staged = staged;
                &localised
            }
            Err(e) => return Ok(Step::Done(Outcome::failed(e.to_string()))),
        }
    };
    Ok(Step::Done(match params {
        ModuleParams::LinuxCmd(p) => boxed(cmd::apply(p, ctx, cancel)).await,
        // The three file states are a few local system calls, not interruptible half-way:
        // they run inline. A hop to the blocking pool per state cost ~4x the work itself
        // (thread wake-ups), which dominated an idempotent round.
        ModuleParams::LinuxDir(p) => dir::apply(p),
        // Remote content may be large: copying and comparing it runs off the runtime's
        // one thread, so that a Cancel is still read meanwhile.
        ModuleParams::LinuxFile(p) if p.remote_uri.is_some() && !p.absent => {
            return boxed(blocking_step(p, req, ctx, file::apply)).await;
        }
        ModuleParams::LinuxFile(p) => return Ok(file::apply(p, ctx, &fetched)),
        ModuleParams::CommonArchive(p) => return boxed(blocking_step(p, req, ctx, archive::apply)).await,
        ModuleParams::LinuxSymlink(p) => symlink::apply(p),
        ModuleParams::LinuxAptRepo(p) => boxed(blocking(p.clone(), repo::apt_repo)).await?,
        ModuleParams::LinuxAptPpa(p) => boxed(blocking(p.clone(), repo::apt_ppa)).await?,
        ModuleParams::LinuxService(p) => {
            boxed(service::apply(p, id, &ChecksumStore::new(&ctx.state_dir), cancel)).await
        }
        ModuleParams::LinuxAptPackage(p) => boxed(apt::apply(p, &ctx.state_dir, cancel)).await,
        ModuleParams::LinuxYumPackage(p) => boxed(yum::apply(p, cancel)).await,
        ModuleParams::LinuxYumRepo(p) => boxed(repo::yum_repo(p, cancel)).await,
        ModuleParams::LinuxRpmKey(p) => boxed(repo::rpm_key(p, cancel)).await,
        ModuleParams::LinuxUser(p) => boxed(user::apply(p, cancel)).await,
        ModuleParams::LinuxGroup(p) => boxed(group::apply(p, cancel)).await,
        ModuleParams::LinuxCronjob(p) => boxed(cronjob::apply(p, id, cancel)).await,
        ModuleParams::CommonTimezone(p) => boxed(timezone::apply(p, cancel)).await,
        ModuleParams::LinuxMkfs(p) => boxed(storage::mkfs::apply(p, cancel)).await,
        ModuleParams::LinuxMount(p) => boxed(storage::mount::apply(p, cancel)).await,
        ModuleParams::LinuxLvmPv(p) => boxed(storage::lvm::apply_pv(p, cancel)).await,
        ModuleParams::LinuxLvmVg(p) => boxed(storage::lvm::apply_vg(p, cancel)).await,
        ModuleParams::LinuxLvmLv(p) => boxed(storage::lvm::apply_lv(p, cancel)).await,
        ModuleParams::LinuxRaid(p) => boxed(storage::raid::apply(p, cancel)).await,
        ModuleParams::LinuxDockerPulled(p) => {
            boxed(docker::image::pulled(&docker::Engine::system(), p, ctx, cancel)).await
        }
        ModuleParams::LinuxDockerBuilt(p) => {
            boxed(docker::image::built(&docker::Engine::system(), p, id, ctx, cancel)).await
        }
        ModuleParams::LinuxDockerPushed(p) => {
            boxed(docker::image::pushed(&docker::Engine::system(), p, id, ctx, cancel)).await
        }
        ModuleParams::LinuxDockerRunning(p) => {
            boxed(docker::run::running(&docker::Engine::system(), p, id, ctx, cancel)).await
        }
        ModuleParams::LinuxDockerDeploy(p) => {
            boxed(docker::run::deploy(&docker::Engine::system(), p, id, ctx, cancel)).await
        }
        ModuleParams::LinuxPuppetAgent(p) => boxed(puppet::agent(p, cancel)).await,
        ModuleParams::LinuxPuppetApply(p) => boxed(puppet::apply(p, cancel)).await,
        ModuleParams::LinuxPuppetRun(p) => boxed(puppet::run(p, cancel)).await,
        ModuleParams::LinuxChefClient(p) => boxed(chef::client(p, cancel)).await,
        ModuleParams::LinuxChefSolo(p) => boxed(chef::solo(p, cancel)).await,
        ModuleParams::CommonPipPackage(p) => boxed(lang::pip::apply(p, cancel)).await,
        ModuleParams::CommonNpmPackage(p) => boxed(lang::npm::apply(p, cancel)).await,
        ModuleParams::CommonGemPackage(p) => boxed(lang::gem::apply(p, cancel)).await,
        ModuleParams::CommonGemSource(p) => boxed(lang::gem::source(p, cancel)).await,
        // A few small reads and one atomic write in the user's directory.
        ModuleParams::CommonSshAuth(p) => boxed(blocking(p.clone(), ssh::auth)).await?,
        ModuleParams::CommonSshKnownHost(p) => boxed(ssh::known_host(p, cancel)).await,
        ModuleParams::LinuxSelinux(p) => boxed(selinux::apply(p, cancel)).await,
        ModuleParams::CommonVirtualenv(p) => boxed(lang::virtualenv::apply(p, id, &ctx.state_dir, cancel)).await,
        ModuleParams::LinuxSupervisord(p) => {
            boxed(supervisord::apply(p, id, &ChecksumStore::new(&ctx.state_dir), cancel)).await
        }
        ModuleParams::LinuxMesosMaster(p) => mesos::master(p),
        ModuleParams::LinuxMesosSlave(p) => mesos::slave(p),
        ModuleParams::CommonGit(p) => boxed(vcs::git::apply(p, cancel)).await,
        ModuleParams::CommonHg(p) => boxed(vcs::hg::apply(p, cancel)).await,
        ModuleParams::CommonSvn(p) => boxed(vcs::svn::apply(p, cancel)).await,
        // Every other module is handled above: a module added to the catalogue does not
        // compile until it gets its arm here.
        p @ (ModuleParams::MetaComment(_) | ModuleParams::MetaWait(_)) => {
            return Err(HelperError::new(
                ErrorCode::Unsupported,
                format!("{} is built-in, runs in the daemon", p.name()),
            ))
        }
    }))
}

/// Runs a state that may use fetched files on the blocking pool.
async fn blocking_step<P: Clone + Send + 'static>(
    params: &P,
    req: &ApplyRequest,
    ctx: &Ctx,
    f: fn(&P, &Ctx, &Fetched<'_>) -> Step,
) -> Result<Step, HelperError> {
    let (params, files, ctx) = (params.clone(), req.fetched.clone(), ctx.clone());
    // The plan context does not follow a task to the blocking pool by itself.
    let plan = plan::current();
    tokio::task::spawn_blocking(move || plan::in_thread(plan, || f(&params, &ctx, &Fetched::new(&files, ctx.peer_uid))))
        .await
        .map_err(|e| HelperError::new(ErrorCode::Internal, format!("the state's task failed: {e}")))
}

async fn blocking<P: Send + 'static, T: Send + 'static>(params: P, f: fn(&P) -> T) -> Result<T, HelperError> {
    let plan = plan::current();
    tokio::task::spawn_blocking(move || plan::in_thread(plan, || f(&params)))
        .await
        .map_err(|e| HelperError::new(ErrorCode::Internal, format!("the state's task failed: {e}")))
}

/// The outcome of a state from its result and the changes made before it ended (a
/// failure half-way still reports what it already changed).
pub fn finish<E: Display>(subject: &str, result: Result<(), E>, changes: Vec<Change>, notes: &[String]) -> Outcome {
    let mut outcome = match result {
        Ok(()) if changes.is_empty() => Outcome::ok(format!("{subject}: already as wanted")),
        Ok(()) => Outcome::ok(changes.iter().map(Change::to_string).collect::<Vec<_>>().join("; ")),
        Err(e) => Outcome::failed(e.to_string()),
    };
    for note in notes {
        outcome.comment.push_str("; ");
        outcome.comment.push_str(note);
    }
    outcome.changes = changes;
    outcome
}

#[cfg(test)]
pub(crate) mod testutil {
    use opsagent_proto::catalogue::{parse_state, ModuleParams};
    use serde_json::Value;

    /// Typed parameters through the real catalogue, as the daemon would send them.
    pub fn params(module: &str, raw: Value) -> ModuleParams {
        parse_state(module, &raw).unwrap_or_else(|e| panic!("{module}: {e}")).params
    }

    /// The catalogue's refusal of `raw` (as `opsagent check` and the helper's decoding
    /// give it); the message must contain `needle`. Such values never reach a module.
    pub fn refused(module: &str, raw: Value, needle: &str) {
        let err = parse_state(module, &raw).map(|_| ()).map_err(|e| e.to_string());
        assert!(err.as_ref().is_err_and(|e| e.contains(needle)), "{module} {raw}: {err:?} (wanted {needle:?})");
    }

    /// One module's typed parameters (`typed::<LinuxFile>("linux.file", raw)`).
    pub fn typed<T: TryFrom<ModuleParams, Error = ModuleParams>>(module: &str, raw: Value) -> T {
        T::try_from(params(module, raw)).unwrap_or_else(|other| panic!("{module}: got {}", other.name()))
    }

    /// The real [`Systemd`](crate::systemd::Systemd) client on one end of a socket pair
    /// (zbus peer-to-peer), `manager` served at systemd's object path on the other: tests
    /// run the client's D-Bus code against a fake of their own. Keep the returned server
    /// connection alive for as long as the client is used.
    pub async fn fake_systemd<M: zbus::object_server::Interface>(
        manager: M,
    ) -> (crate::systemd::Systemd, zbus::Connection) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let server = zbus::connection::Builder::unix_stream(a)
            .server(zbus::Guid::generate())
            .unwrap()
            .p2p()
            .serve_at("/org/freedesktop/systemd1", manager)
            .unwrap()
            .build();
        let client = zbus::connection::Builder::unix_stream(b).p2p().build();
        let (server, client) = tokio::try_join!(server, client).unwrap();
        // Short enough that a fake that never ends a job fails the test rather than hangs it.
        let systemd =
            crate::systemd::Systemd::with_connection(client).with_job_timeout(std::time::Duration::from_secs(10));
        (systemd, server)
    }

    /// Ends job `id` of `unit` as systemd announces it (`JobRemoved` on the Manager), after
    /// another job's end, so that a client must wait for its own; the job's path. Fakes
    /// call it before their method returns: only a client that subscribed before calling,
    /// as it must, sees the signal.
    pub async fn end_job(
        e: &zbus::object_server::SignalEmitter<'_>,
        id: u32,
        unit: &str,
        result: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedObjectPath> {
        const MANAGER: &str = "org.freedesktop.systemd1.Manager";
        let job = zbus::zvariant::OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}"))?;
        let other = zbus::zvariant::ObjectPath::try_from("/org/freedesktop/systemd1/job/9999")?;
        e.emit(MANAGER, "JobRemoved", &(9999u32, other, "other.service", "failed")).await?;
        e.emit(MANAGER, "JobRemoved", &(id, job.as_ref(), unit, result)).await?;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opsagent_proto::newtypes::StateId;
    use serde_json::json;

    fn request(module: &str, raw: serde_json::Value) -> ApplyRequest {
        ApplyRequest::new(StateId::parse("s-1").unwrap(), 1, testutil::params(module, raw))
    }

    #[tokio::test]
    async fn builtin_modules_are_unsupported() {
        let ctx = Ctx::new("/nonexistent".into());
        let comment = request("meta.comment", json!({"comment": "hi"}));
        let err = apply(&comment, &ctx, Cancel::never()).await.unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (ErrorCode::Unsupported, "meta.comment is built-in, runs in the daemon")
        );
    }
}

#[cfg(test)]
mod plan_tests;
