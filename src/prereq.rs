//! Prerequisites installed on demand, as the original adaptor's `require` entries did:
//! before a state whose tool is missing on this host (git for `common.git`, lvm2 for
//! the LVM states, supervisor, docker, puppet…), the tool's package is installed with
//! the host's package manager, and the state's comment says so.
//!
//! The install is an ordinary `linux.apt.package` / `linux.yum.package` state sent to
//! the helper, so the helper's policy (its `modules` and `packages` keys, see the
//! footprint table) decides about it like about any other package. With `[agent]
//! install_prerequisites = false` nothing is installed: the state runs as it is and
//! fails with the helper's message, which names the package to install.
//!
//! Whether a tool is there is judged from the daemon's view of the usual binary
//! directories; the helper looks again and is the one that decides. `linux.cmd`'s
//! default working directory (/opt/visualops/tmp) is created by the helper itself.
//! Chef has no distribution package: the original installed it with Chef's own
//! installer script, which this agent does not run; chef states fail naming the tool.

use std::path::Path;

use opsagent_proto::catalogue::{parse_state, ModuleParams};
use opsagent_proto::request::{ApplyRequest, Change, Outcome};
use serde_json::json;

use crate::cancel::Cancel;
use crate::helper_client::{HelperClient, HelperClientError, Next, SignedState};
use opsagent_proto::request::HelperStatus;

/// Where tools are looked for (the helper's search path).
const BIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The host's package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    Apt,
    Yum,
}

impl Manager {
    /// apt when `apt-get` is there, yum when `yum` or `dnf` is, under `root`.
    pub fn detect(root: &Path) -> Option<Manager> {
        let has = |tool: &str| BIN_DIRS.iter().any(|d| root.join(d.trim_start_matches('/')).join(tool).is_file());
        if has("apt-get") {
            Some(Manager::Apt)
        } else if has("yum") || has("dnf") {
            Some(Manager::Yum)
        } else {
            None
        }
    }

    fn module(self) -> &'static str {
        match self {
            Manager::Apt => "linux.apt.package",
            Manager::Yum => "linux.yum.package",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Manager::Apt => "apt",
            Manager::Yum => "yum",
        }
    }
}

/// A tool a module needs and the packages that provide it (apt, yum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prerequisite {
    pub tool: &'static str,
    pub apt: &'static [&'static str],
    pub yum: &'static [&'static str],
}

const fn pre(tool: &'static str, apt: &'static [&'static str], yum: &'static [&'static str]) -> Prerequisite {
    Prerequisite { tool, apt, yum }
}

/// What a state needs installed, from its parameters: the adaptor's `require` list,
/// with today's package names.
pub fn prerequisites(params: &ModuleParams) -> Vec<Prerequisite> {
    use ModuleParams as M;
    let lvm = pre("lvcreate", &["lvm2"], &["lvm2"]);
    let docker = pre("docker", &["docker.io"], &["docker"]);
    let puppet = pre("puppet", &["puppet"], &["puppet"]);
    match params {
        M::CommonGit(_) => vec![pre("git", &["git"], &["git"])],
        M::CommonSvn(_) => vec![pre("svn", &["subversion"], &["subversion"])],
        M::CommonHg(_) => vec![pre("hg", &["mercurial"], &["mercurial"])],
        M::CommonGemPackage(_) | M::CommonGemSource(_) => vec![pre("gem", &["ruby"], &["rubygems"])],
        M::CommonNpmPackage(_) => vec![pre("npm", &["npm"], &["npm"])],
        M::CommonPipPackage(_) => vec![pre("pip3", &["python3-pip"], &["python3-pip"])],
        M::CommonVirtualenv(p) if p.extra_search_dir.as_ref().is_some_and(|d| !d.is_empty()) => {
            vec![pre("virtualenv", &["python3-virtualenv"], &["python3-virtualenv"])]
        }
        M::CommonVirtualenv(_) => vec![pre("python3", &["python3-venv"], &["python3"])],
        M::LinuxSupervisord(_) => vec![pre("supervisord", &["supervisor"], &["supervisor"])],
        M::LinuxLvmPv(_) | M::LinuxLvmVg(_) | M::LinuxLvmLv(_) => vec![lvm],
        M::LinuxMkfs(p) => match p.fstype.trim().to_ascii_lowercase().as_str() {
            "xfs" => vec![pre("mkfs.xfs", &["xfsprogs"], &["xfsprogs"])],
            "ext2" | "ext3" | "ext4" => vec![pre("mke2fs", &["e2fsprogs"], &["e2fsprogs"])],
            "btrfs" => vec![pre("mkfs.btrfs", &["btrfs-progs"], &["btrfs-progs"])],
            "vfat" | "fat" | "msdos" => vec![pre("mkfs.vfat", &["dosfstools"], &["dosfstools"])],
            _ => Vec::new(),
        },
        M::LinuxRaid(_) => vec![pre("mdadm", &["mdadm"], &["mdadm"])],
        M::LinuxDockerPulled(_)
        | M::LinuxDockerBuilt(_)
        | M::LinuxDockerPushed(_)
        | M::LinuxDockerRunning(_)
        | M::LinuxDockerDeploy(_) => vec![docker],
        M::LinuxPuppetApply(_) | M::LinuxPuppetAgent(_) | M::LinuxPuppetRun(_) => vec![puppet],
        M::LinuxSelinux(_) => {
            vec![pre("setsebool", &["selinux-utils", "policycoreutils"], &["libselinux-utils", "policycoreutils"])]
        }
        M::CommonSshKnownHost(_) => vec![pre("ssh-keyscan", &["openssh-client"], &["openssh-clients"])],
        M::LinuxCronjob(_) => vec![pre("crontab", &["cron"], &["cronie"])],
        _ => Vec::new(),
    }
}

/// Whether `tool` is an executable file in one of the usual directories under `root`.
pub fn tool_present(root: &Path, tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    BIN_DIRS.iter().any(|d| {
        std::fs::metadata(root.join(d.trim_start_matches('/')).join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The package state that installs `packages`.
pub fn install_state(manager: Manager, packages: &[&str]) -> ModuleParams {
    let names: Vec<_> = packages.iter().map(|p| json!({"key": p})).collect();
    parse_state(manager.module(), &json!({"name": names}))
        .expect("package names of the prerequisite table are valid")
        .params
}

/// A [`HelperClient`] that installs the missing prerequisites of a state before it.
pub struct Prerequisites<C> {
    inner: C,
    enabled: bool,
    root: std::path::PathBuf,
}

impl<C: HelperClient> Prerequisites<C> {
    pub fn new(inner: C, enabled: bool) -> Self {
        Self { inner, enabled, root: "/".into() }
    }

    /// Tools and the package manager are looked for under `root` (tests).
    pub fn with_root(mut self, root: impl Into<std::path::PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C: HelperClient> Prerequisites<C> {
    /// Installs the missing tools of `req`'s module. `Err(outcome)`: the state fails
    /// with it; `Ok((notes, changes))`: what was installed, to prefix the state's own.
    async fn install_missing(
        &self,
        req: &ApplyRequest,
        cancel: &Cancel,
    ) -> Result<Result<(Vec<String>, Vec<Change>), Outcome>, HelperClientError> {
        let missing: Vec<Prerequisite> = if self.enabled {
            prerequisites(&req.params).into_iter().filter(|p| !tool_present(&self.root, p.tool)).collect()
        } else {
            Vec::new()
        };
        // Looked for only when something is missing: most states need nothing, and the
        // look-up is four `stat`s.
        let manager = if missing.is_empty() { None } else { Manager::detect(&self.root) };
        let mut notes = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        for p in &missing {
            let Some(manager) = manager else {
                notes.push(format!("{} is missing and no package manager (apt, yum) was found", p.tool));
                continue;
            };
            let packages = match manager {
                Manager::Apt => p.apt,
                Manager::Yum => p.yum,
            };
            let mut install =
                ApplyRequest::new(req.state_id.clone(), req.recipe_version, install_state(manager, packages));
            // A plan installs nothing: the install is planned with the state.
            install.plan = req.plan;
            let list = packages.join(" ");
            // A refusal (the helper's policy) fails this state, naming the package.
            let out = match self.inner.apply(install, cancel.clone()).await {
                Ok(out) => out,
                Err(HelperClientError::Refused { error, .. }) => Outcome::failed(error.message),
                Err(e) => return Err(e),
            };
            if !out.result || out.cancelled {
                return Ok(Err(Outcome {
                    cancelled: out.cancelled,
                    changes: out.changes,
                    stdout: out.stdout,
                    ..Outcome::failed(format!(
                        "prerequisite {} (package {list}) could not be installed with {}: {}",
                        p.tool,
                        manager.name(),
                        out.comment
                    ))
                }));
            }
            let done = if req.plan { "would be installed" } else { "installed" };
            notes.push(format!("prerequisite {} {done} with {} (package {list})", p.tool, manager.name()));
            changes.extend(out.changes);
        }
        Ok(Ok((notes, changes)))
    }
}

/// The installs' notes and changes put before the state's own.
fn with_notes(mut out: Outcome, notes: Vec<String>, mut changes: Vec<Change>) -> Outcome {
    if !notes.is_empty() {
        out.comment = format!("{}; {}", notes.join("; "), out.comment);
        changes.append(&mut out.changes);
        out.changes = changes;
    }
    out
}

impl<C: HelperClient> HelperClient for Prerequisites<C> {
    async fn apply(&self, req: ApplyRequest, cancel: Cancel) -> Result<Outcome, HelperClientError> {
        self.apply_then(req, None, Vec::new(), cancel).await
    }

    // A helper that verifies recipes refuses the unsigned install of a prerequisite
    // (the daemon may not invent states); the state then fails naming the package, and
    // the recipe's signer adds a package state for it.
    async fn apply_signed(
        &self,
        req: ApplyRequest,
        signed: SignedState,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        self.apply_then(req, Some(signed), Vec::new(), cancel).await
    }

    async fn status(&self) -> Result<HelperStatus, HelperClientError> {
        self.inner.status().await
    }

    async fn drain(&self) {
        self.inner.drain().await;
    }

    // A state goes ahead only when it needs nothing installed first: ahead, it would start
    // before its install.
    async fn apply_then(
        &self,
        req: ApplyRequest,
        signed: Option<SignedState>,
        mut ahead: Vec<Next>,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        let (notes, changes) = match self.install_missing(&req, &cancel).await? {
            Ok(done) => done,
            Err(failed) => return Ok(failed),
        };
        // Whether a later state needs an install is only known once the states before it
        // have run (one may remove the tool); ahead, it would start before that check. So
        // the states ahead stop at the first with prerequisites.
        if self.enabled {
            let with_prerequisites = ahead.iter().position(|n| !prerequisites(&n.req.params).is_empty());
            ahead.truncate(with_prerequisites.unwrap_or(ahead.len()));
        }
        Ok(with_notes(self.inner.apply_then(req, signed, ahead, cancel).await?, notes, changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn managers_and_tools_are_found_under_a_root() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Manager::detect(tmp.path()), None);
        let bin = tmp.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("dnf"), "").unwrap();
        assert_eq!(Manager::detect(tmp.path()), Some(Manager::Yum));
        std::fs::write(bin.join("apt-get"), "").unwrap();
        assert_eq!(Manager::detect(tmp.path()), Some(Manager::Apt));
        std::fs::write(bin.join("git"), "").unwrap();
        assert!(!tool_present(tmp.path(), "git"), "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(tool_present(tmp.path(), "git"));
    }

    /// The adaptor's `require` entries, module by module.
    #[test]
    fn the_adaptor_requirements() {
        let of = |module: &str, raw: serde_json::Value| -> Vec<(&'static str, &'static [&'static str])> {
            prerequisites(&parse_state(module, &raw).unwrap().params).iter().map(|p| (p.tool, p.apt)).collect()
        };
        assert_eq!(of("common.git", json!({"path": "/srv/g", "repo": "https://h/r"})), [("git", &["git"][..])]);
        assert_eq!(of("common.svn", json!({"path": "/s", "repo": "svn://h/r"})), [("svn", &["subversion"][..])]);
        assert_eq!(of("common.hg", json!({"path": "/h", "repo": "https://h/r"})), [("hg", &["mercurial"][..])]);
        assert_eq!(of("linux.lvm.pv", json!({"path": ["/dev/x"]})), [("lvcreate", &["lvm2"][..])]);
        assert_eq!(of("linux.mkfs", json!({"device": "/dev/x", "fstype": "xfs"})), [("mkfs.xfs", &["xfsprogs"][..])]);
        assert_eq!(
            of("linux.supervisord", json!({"config": "/c", "name": ["p"]})),
            [("supervisord", &["supervisor"][..])]
        );
        assert_eq!(of("linux.docker.pulled", json!({"repo": "i"})), [("docker", &["docker.io"][..])]);
        assert_eq!(of("linux.puppet.run", json!({})), [("puppet", &["puppet"][..])]);
        assert_eq!(of("common.gem.package", json!({"name": [{"key": "rake"}]})), [("gem", &["ruby"][..])]);
        assert_eq!(of("common.npm.package", json!({"name": [{"key": "x"}]})), [("npm", &["npm"][..])]);
        assert_eq!(of("common.pip.package", json!({"name": [{"key": "x"}]})), [("pip3", &["python3-pip"][..])]);
        assert!(of("linux.file", json!({"path": "/x"})).is_empty());
        let install = install_state(Manager::Yum, &["lvm2"]);
        assert_eq!(install.name(), "linux.yum.package");
    }

    /// Records every request; answers each as applied (or planned).
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<ApplyRequest>>, std::sync::Mutex<Vec<Vec<String>>>);

    impl HelperClient for Recorder {
        async fn apply(&self, req: ApplyRequest, _: Cancel) -> Result<Outcome, HelperClientError> {
            let planned = req.plan;
            self.0.lock().unwrap().push(req);
            Ok(Outcome { planned, changes: vec![Change::new("git", "installed")], ..Outcome::ok("") })
        }
        async fn apply_signed(
            &self,
            req: ApplyRequest,
            _: SignedState,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            self.apply(req, c).await
        }
        async fn status(&self) -> Result<HelperStatus, HelperClientError> {
            Err(HelperClientError::Protocol { path: "test".into(), what: "no status".into() })
        }
        async fn apply_then(
            &self,
            req: ApplyRequest,
            _: Option<SignedState>,
            ahead: Vec<Next>,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            self.1.lock().unwrap().push(ahead.iter().map(|n| n.req.state_id.to_string()).collect());
            self.apply(req, c).await
        }
    }

    /// A state that needs a tool installed first may not go ahead of the round: ahead,
    /// it would start before its install; nor may those after it, which follow it. Others
    /// may.
    #[tokio::test]
    async fn states_go_ahead_only_up_to_one_that_needs_an_install() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::write(root.path().join("usr/bin/apt-get"), "").unwrap();
        let client = Prerequisites::new(Recorder::default(), true).with_root(root.path());
        let state = |id: &str, module: &str, raw: serde_json::Value| {
            let params = parse_state(module, &raw).unwrap().params;
            ApplyRequest::new(opsagent_proto::newtypes::StateId::parse(id).unwrap(), 1, params)
        };
        let git = || state("g", "common.git", json!({"path": "/srv/g", "repo": "https://h/r"}));
        let file = |id: &str| state(id, "linux.file", json!({"path": "/x"}));
        let ahead = |reqs: Vec<ApplyRequest>| -> Vec<Next> {
            reqs.into_iter().map(|req| Next { req: Arc::new(req), signed: None, withdraw: Cancel::never() }).collect()
        };
        client.apply_then(file("a"), None, ahead(vec![file("b"), git(), file("c")]), Cancel::never()).await.unwrap();
        client.apply_then(git(), None, ahead(vec![file("c"), file("d")]), Cancel::never()).await.unwrap();
        let offered = client.inner().1.lock().unwrap().clone();
        // b goes ahead of a, and git (and c behind it) do not; the install of git goes
        // through `apply`, then git itself with c and d offered.
        assert_eq!(offered, vec![vec!["b".to_string()], vec!["c".to_string(), "d".to_string()]]);
        let sent: Vec<_> = client.inner().0.lock().unwrap().iter().map(|r| r.params.name()).collect();
        assert_eq!(sent, ["linux.file", "linux.apt.package", "common.git"]);
    }

    /// A helper that pipelines, as `HelperClient::apply_then` allows: the state offered
    /// ahead starts the moment the one before it succeeds. Records, for each state started
    /// ahead, whether git was on the host when it started; a state `rm-git` removes git.
    struct Pipelining {
        root: std::path::PathBuf,
        started_ahead: std::sync::Mutex<Vec<(String, bool)>>,
    }

    impl HelperClient for Pipelining {
        async fn apply(&self, req: ApplyRequest, _: Cancel) -> Result<Outcome, HelperClientError> {
            if req.state_id.as_str() == "rm-git" {
                std::fs::remove_file(self.root.join("usr/bin/git")).unwrap();
            }
            Ok(Outcome::ok(""))
        }
        async fn apply_signed(
            &self,
            req: ApplyRequest,
            _: SignedState,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            self.apply(req, c).await
        }
        async fn status(&self) -> Result<HelperStatus, HelperClientError> {
            Err(HelperClientError::Protocol { path: "test".into(), what: "no status".into() })
        }
        async fn apply_then(
            &self,
            req: ApplyRequest,
            _: Option<SignedState>,
            ahead: Vec<Next>,
            c: Cancel,
        ) -> Result<Outcome, HelperClientError> {
            let o = self.apply(req, c).await?;
            for n in ahead.iter().filter(|_| o.result) {
                let present = tool_present(&self.root, "git");
                self.started_ahead.lock().unwrap().push((n.req.state_id.to_string(), present));
            }
            Ok(o)
        }
    }

    /// Whether the next state needs an install is only known once the state before it has
    /// run (it may remove the tool): a state with prerequisites must not start ahead of
    /// the check that installs them.
    #[tokio::test]
    async fn a_state_started_ahead_never_lacks_its_prerequisite() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("apt-get"), "").unwrap();
        std::fs::write(bin.join("git"), "").unwrap();
        std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let inner = Pipelining { root: root.path().to_path_buf(), started_ahead: Default::default() };
        let client = Prerequisites::new(inner, true).with_root(root.path());
        let state = |id: &str, module: &str, raw: serde_json::Value| {
            let params = parse_state(module, &raw).unwrap().params;
            ApplyRequest::new(opsagent_proto::newtypes::StateId::parse(id).unwrap(), 1, params)
        };
        let rm = state("rm-git", "linux.cmd", json!({"cmd": "apt-get -y remove git", "cwd": "/"}));
        let git = state("g", "common.git", json!({"path": "/srv/g", "repo": "https://h/r"}));
        let ahead = vec![Next { req: Arc::new(git), signed: None, withdraw: Cancel::never() }];
        client.apply_then(rm, None, ahead, Cancel::never()).await.unwrap();
        let started = client.inner().started_ahead.lock().unwrap().clone();
        assert!(started.iter().all(|(_, present)| *present), "started ahead without its tool: {started:?}");
    }

    /// `opsagent apply --test` and drift plans go through this wrapper too: the missing
    /// tool's install must be a plan as well, or a plan would install packages.
    #[tokio::test]
    async fn a_plan_installs_no_prerequisite_it_plans_the_install() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::write(root.path().join("usr/bin/apt-get"), "").unwrap();
        let client = Prerequisites::new(Recorder::default(), true).with_root(root.path());
        let params = parse_state("common.git", &json!({"path": "/srv/g", "repo": "https://h/r"})).unwrap().params;
        let mut req = ApplyRequest::new(opsagent_proto::newtypes::StateId::parse("g").unwrap(), 1, params);
        req.plan = true;
        let out = client.apply(req, Cancel::never()).await.unwrap();
        let sent = client.inner().0.lock().unwrap();
        assert_eq!(sent.len(), 2, "the install, then the state");
        assert_eq!(sent[0].params.name(), "linux.apt.package");
        assert!(sent.iter().all(|r| r.plan), "every request of a plan is a plan: {sent:?}");
        assert!(out.comment.contains("prerequisite git would be installed with apt"), "{}", out.comment);
    }
}
