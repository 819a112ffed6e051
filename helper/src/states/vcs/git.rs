//! `common.git`: a clone at `path` kept at `revision`.
//!
//! Every round fetches from `repo` (`git fetch --prune --tags --force origin
//! +refs/heads/*:refs/remotes/origin/*`: deleted branches disappear, moved tags follow)
//! and then resolves `revision`, in this order:
//! 1. a branch of the remote: the checkout is on a local branch of that name, reset to
//!    the remote's branch each round (a fast-forward; local commits on it are a
//!    conflict, see below), with the remote branch as its upstream;
//! 2. a tag: HEAD detached at the tagged commit;
//! 3. a commit id (4 to 64 hex digits, abbreviated or full): HEAD detached there.
//!
//! `HEAD` stands for the remote's default branch (what its HEAD names now).
//!
//! The one exception to "every round fetches": git run as root with a remote on this
//! host, when the checkout's and the remote's files already show that the round has
//! nothing to do (`files`: read by descriptor, never through a link); then only `git
//! status` runs. The outcome is the same; only branches and tags not named stay
//! unfetched until a round that names them.
//!
//! A tag or commit therefore stays where it is while the remote moves on; a branch
//! follows it. The remote is `origin`; if its URL differs from `repo`, it is changed
//! (and reported).
//!
//! The default revision is `master` (states.md). A remote without a `master` branch
//! (nor a tag or commit of that name) is followed at its default branch instead (what
//! its HEAD names, `main` on most new repositories), with a note saying so in the
//! state's comment: the default stands for "the main line", which is what an operator
//! who left `revision` empty expects. A `master` given explicitly cannot be told apart
//! from the default; the note makes the substitution visible.
//!
//! Conflicts, refused without `force` and resolved with it: local changes to tracked
//! files (`git reset --hard`), local commits on the tracked branch that the remote does
//! not have (the branch is reset to the remote's), and a non-empty directory that is
//! not a clone (emptied, then cloned into).
//!
//! A plan (dry run) fetches nothing: a fetch writes refs and objects into `.git`. It
//! reads the remote's refs with `git ls-remote --symref` (run like the fetch: same user,
//! key and environment), resolves `revision` against them in the order above, compares
//! with the checkout (origin URL, HEAD, branch, local changes, local commits) and
//! reports the apply's own words, or its refusal; a converged checkout plans no change.
//! A commit id the remote does not advertise and the checkout does not have is
//! reported as "would fetch": only a fetch can find it. Local commits are judged
//! against the last fetched head of the branch when the new head's objects are not
//! there yet (a remote that rewrote its history is only noticed by the apply).
//!
//! git never prompts: `GIT_TERMINAL_PROMPT=0`, and `GIT_SSH_COMMAND` is ssh in batch
//! mode (see [`super::ssh_command`]) with, given `ssh-key-file`, `-i KEY -o
//! IdentitiesOnly=yes`. A local repository path must be readable by `user`, and git
//! itself refuses to read a repository that another user owns (its `safe.directory`
//! rule) unless that user's git configuration allows it.

use std::fs;
use std::path::Path;

use opsagent_proto::catalogue::CommonGit;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use super::{
    checkout_dir, describe_files, inspect, mask_url, planned_prepare, prepare, repo_param, revision_param, run, short,
    ssh_command, url_secret, Existing, Runner, VcsError, TRANSFER_TIMEOUT,
};
use crate::cancel::Cancel;
use crate::exec::Exit;

mod files;
mod index;

/// states.md's default `revision`.
pub const DEFAULT_REVISION: &str = "master";
/// Branches named in the message of a revision that was not found.
const BRANCHES_SHOWN: usize = 10;

/// What `revision` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Branch { name: String, id: String },
    Tag { name: String, id: String },
    Commit { id: String },
}

impl Target {
    pub fn id(&self) -> &str {
        match self {
            Target::Branch { id, .. } | Target::Tag { id, .. } | Target::Commit { id } => id,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Branch { name, .. } => format!("branch {name}"),
            Target::Tag { name, .. } => format!("tag {name}"),
            Target::Commit { .. } => "commit".to_string(),
        }
    }
}

pub async fn apply(p: &CommonGit, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = sync(p, &mut changes, &mut notes, &mut cancel).await;
    let secrets: Vec<&str> = url_secret(p.repo.trim()).into_iter().collect();
    super::outcome(&p.path.0, result, changes, &notes, &secrets)
}

/// The `ssh-key-file` parameter (an absolute path, validated by the catalogue's
/// decode): it must be an existing regular file.
fn key_file(key: Option<&AbsPath>) -> Result<Option<AbsPath>, VcsError> {
    let Some(key) = key.cloned() else {
        return Ok(None);
    };
    match fs::metadata(key.as_path()) {
        Ok(m) if m.is_file() => Ok(Some(key)),
        Ok(_) => Err(VcsError::Param { param: "ssh-key-file", problem: format!("{key} is not a regular file") }),
        Err(e) => Err(VcsError::Param { param: "ssh-key-file", problem: format!("{key}: {e}") }),
    }
}

async fn sync(
    p: &CommonGit,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    cancel: &mut Cancel,
) -> Result<(), VcsError> {
    let path = checkout_dir(&p.path)?;
    let repo = repo_param(&p.repo)?;
    let wanted = revision_param(&p.revision, DEFAULT_REVISION)?;
    let key = key_file(p.ssh_key_file.as_ref().map(|k| k.abs()))?;
    // Run as root, ssh reads the key as root: only a key root controls is used (an
    // agent-owned or planted one would choose root's identity, or leak a root-only
    // file into ssh's messages). Run as `user`, ssh reads it with that user's rights.
    if let (Some(k), None) = (&key, p.user.as_deref().map(str::trim).filter(|u| !u.is_empty())) {
        crate::states::root_read::check("ssh-key-file", k)
            .map_err(|e| VcsError::Param { param: "ssh-key-file", problem: e.to_string() })?;
    }
    let runner = Runner::new("git", "git", p.user.as_deref())?
        .with_env("GIT_TERMINAL_PROMPT", "0")
        .with_env("GIT_SSH_COMMAND", ssh_command(key.as_ref()));
    let existing = inspect(&path, ".git", &runner)?;
    // A converged checkout of a repository on this host, told from the files (see
    // `files`): one `git status` instead of the fetch and the rest.
    if existing == Existing::Checkout && runner.uid.is_root() {
        if let Some((_, note, unchanged)) = files_converged(&path, &repo, &wanted, &runner) {
            let mut git = Git { runner: runner.clone(), path: path.clone(), repo: repo.clone(), cancel: &mut *cancel };
            if unchanged || git.clean(crate::plan::active()).await? {
                notes.extend(note);
                return Ok(());
            }
        }
    }
    // A plan writes nothing, not even into `.git` (a fetch moves refs and adds
    // objects): it reads the remote's refs instead. A directory holding something else
    // goes on to `prepare`, which refuses it or, with force, stops at the plan guard.
    if crate::plan::active() && matches!(existing, Existing::Missing | Existing::Empty | Existing::Checkout) {
        let mut git = Git { runner, path, repo, cancel };
        return git.plan(&existing, &wanted, p.force, changes, notes).await;
    }
    let fresh = prepare(&path, &existing, p.force, &runner, changes)?;
    let git = Git { runner, path, repo, cancel };
    if fresh {
        git.clone_at(&wanted, changes, notes).await
    } else {
        git.update(&wanted, p.force, changes, notes).await
    }
}

/// [`files::converged`] for the checkout at `path`, which [`inspect`] found to be a
/// root-controlled directory holding `.git`, and whether its tracked files are known
/// to be as its commit has them ([`index::unchanged`]; `false`: `git status` decides).
fn files_converged(
    path: &AbsPath,
    repo: &str,
    wanted: &str,
    runner: &Runner,
) -> Option<(Target, Option<String>, bool)> {
    let dir = crate::dirfd::Dir::open(path.as_path()).ok()?;
    dir.root_controlled().ok()?;
    let (target, note) = files::converged(&dir, repo, wanted, runner.home()?)?;
    let unchanged =
        files::walk(&dir, &[".git"]).flatten().and_then(|git_dir| index::unchanged(&dir, &git_dir, target.id()));
    let unchanged = unchanged == Some(true);
    Some((target, note, unchanged))
}

struct Git<'a> {
    runner: Runner,
    path: AbsPath,
    repo: String,
    cancel: &'a mut Cancel,
}

impl Git<'_> {
    /// A git command in the checkout; its output, trimmed.
    async fn local(&mut self, args: &[&str]) -> Result<String, VcsError> {
        Ok(self.local_raw(args).await?.trim().to_string())
    }

    /// Its output as printed (`git status` lines start with a blank column).
    async fn local_raw(&mut self, args: &[&str]) -> Result<String, VcsError> {
        let spec = self.runner.local(args, self.path.as_path());
        Ok(run(&spec, &[0], self.cancel).await?.output)
    }

    /// A git command that talks to the remote.
    async fn remote(&mut self, args: &[&str], cwd: &Path) -> Result<String, VcsError> {
        let spec = self.runner.spec(args, cwd, TRANSFER_TIMEOUT);
        Ok(run(&spec, &[0], self.cancel).await?.output.trim().to_string())
    }

    /// No tracked file differs from the index or HEAD (`git status`, as the apply runs
    /// it; a plan's does not refresh the index). A failure other than a cancel is
    /// `false`: the full apply then meets it where it always did.
    async fn clean(&mut self, plan: bool) -> Result<bool, VcsError> {
        let args: &[&str] = if plan {
            &["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]
        } else {
            &["status", "--porcelain", "--untracked-files=no"]
        };
        let mut spec = self.runner.local(args, self.path.as_path());
        if plan {
            spec = spec.inspection();
        }
        match run(&spec, &[0], self.cancel).await {
            Ok(done) => Ok(changed_files(&done.output).is_empty()),
            Err(e) if e.is_cancelled() => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// The object id `name` stands for, if it names a commit.
    async fn rev_parse(&mut self, name: &str) -> Result<Option<String>, VcsError> {
        // No `--end-of-options` (git 2.24+): names never start with '-' here.
        let args = ["rev-parse", "--verify", "--quiet", name];
        let spec = self.runner.local(args, self.path.as_path()).inspection();
        // 1: no such object; 128: not a valid name at all (`a..b`). Both are "not this".
        let finished = run(&spec, &[0, 1, 128], self.cancel).await?;
        if finished.exit != Exit::Code(0) {
            return Ok(None);
        }
        let id = finished.output.lines().last().unwrap_or("").trim().to_string();
        if !is_object_id(&id) {
            return Err(VcsError::Unexpected { command: spec.display(), output: finished.output });
        }
        Ok(Some(id))
    }

    /// `ancestor` is `descendant` or one of its ancestors.
    async fn is_ancestor(&mut self, ancestor: &str, descendant: &str) -> Result<bool, VcsError> {
        let spec =
            self.runner.local(["merge-base", "--is-ancestor", ancestor, descendant], self.path.as_path()).inspection();
        Ok(run(&spec, &[0, 1], self.cancel).await?.exit == Exit::Code(0))
    }

    async fn clone_at(
        mut self,
        wanted: &str,
        changes: &mut Vec<Change>,
        notes: &mut Vec<String>,
    ) -> Result<(), VcsError> {
        let path = self.path.to_string();
        let repo = self.repo.clone();
        // Without a checkout: the revision is resolved like on every later round, then
        // checked out (forced: there is nothing local to lose yet).
        self.remote(&["clone", "--quiet", "--no-checkout", "--origin", "origin", "--", &repo, &path], Path::new("/"))
            .await?;
        let target = match self.resolve(wanted, notes).await {
            Ok(t) => t,
            Err(e) => {
                changes.push(Change::new(&path, format!("cloned from {}; nothing checked out", mask_url(&repo))));
                return Err(e);
            }
        };
        self.checkout(&target, true).await?;
        changes.push(Change::new(&path, format!("cloned at {} ({})", short(target.id()), target.describe())));
        Ok(())
    }

    async fn update(
        mut self,
        wanted: &str,
        force: bool,
        changes: &mut Vec<Change>,
        notes: &mut Vec<String>,
    ) -> Result<(), VcsError> {
        let path = self.path.to_string();
        let repo = self.repo.clone();
        let spec = self.runner.local(["config", "--get", "remote.origin.url"], self.path.as_path()).inspection();
        let origin = run(&spec, &[0, 1], self.cancel).await?;
        match origin.exit {
            Exit::Code(0) if origin.output.trim() == repo => {}
            Exit::Code(0) => {
                self.local(&["remote", "set-url", "origin", &repo]).await?;
                let was = mask_url(origin.output.trim());
                changes.push(Change::new(&path, format!("remote origin {was} -> {}", mask_url(&repo))));
            }
            _ => {
                self.local(&["remote", "add", "origin", &repo]).await?;
                changes.push(Change::new(&path, format!("remote origin {} added", mask_url(&repo))));
            }
        }
        self.remote(
            &["fetch", "--quiet", "--prune", "--tags", "--force", "origin", "+refs/heads/*:refs/remotes/origin/*"],
            self.path.clone().as_path(),
        )
        .await?;
        let target = self.resolve(wanted, notes).await?;

        // A clone whose first checkout failed (say, an unknown revision) has no index:
        // every file would look deleted, but there is nothing local to protect.
        let git_dir = self.path.as_path().join(".git");
        if git_dir.is_dir() && !git_dir.join("index").exists() {
            self.checkout(&target, true).await?;
            changes.push(Change::new(&path, format!("checked out at {} ({})", short(target.id()), target.describe())));
            return Ok(());
        }
        let head = self.rev_parse("HEAD^{commit}").await?;
        let spec = self.runner.local(["symbolic-ref", "--quiet", "--short", "HEAD"], self.path.as_path()).inspection();
        let symbolic = run(&spec, &[0, 1], self.cancel).await?;
        let on_branch = (symbolic.exit == Exit::Code(0)).then(|| symbolic.output.trim().to_string());
        let status = self.local_raw(&["status", "--porcelain", "--untracked-files=no"]).await?;
        let dirty = changed_files(&status);

        if !dirty.is_empty() && !force {
            return Err(VcsError::LocalChanges { path: self.path.clone(), files: describe_files(&dirty) });
        }
        let mut dropped_commits = false;
        if let Target::Branch { name, id } = &target {
            // Local commits on the branch would be lost by the reset to the remote's.
            if let Some(local) = self.rev_parse(&format!("refs/heads/{name}^{{commit}}")).await? {
                if local != *id && !self.is_ancestor(&local, id).await? {
                    if !force {
                        return Err(VcsError::Diverged { path: self.path.clone(), branch: name.clone() });
                    }
                    dropped_commits = true;
                }
            }
        }
        if !dirty.is_empty() {
            self.local(&["reset", "--quiet", "--hard"]).await?;
            changes.push(Change::new(
                &path,
                format!("local changes discarded ({}; force is set)", describe_files(&dirty)),
            ));
        }
        let at_target = head.as_deref() == Some(target.id())
            && match &target {
                Target::Branch { name, .. } => on_branch.as_deref() == Some(name.as_str()) && !dropped_commits,
                _ => true,
            };
        if at_target {
            return Ok(());
        }
        self.checkout(&target, force).await?;
        let mut what = match head.as_deref() {
            Some(h) if h == target.id() => format!("{} checked out at {}", target.describe(), short(h)),
            Some(h) => format!("revision {} -> {} ({})", short(h), short(target.id()), target.describe()),
            None => format!("checked out at {} ({})", short(target.id()), target.describe()),
        };
        if dropped_commits {
            what.push_str("; local commits on the branch dropped, force is set");
        }
        changes.push(Change::new(&path, what));
        Ok(())
    }

    async fn checkout(&mut self, target: &Target, force: bool) -> Result<(), VcsError> {
        let mut args = vec!["-c", "advice.detachedHead=false", "checkout", "--quiet"];
        if force {
            args.push("--force");
        }
        let upstream;
        match target {
            Target::Branch { name, .. } => {
                upstream = format!("refs/remotes/origin/{name}");
                args.extend(["--track", "-B", name.as_str(), upstream.as_str()]);
            }
            Target::Tag { id, .. } | Target::Commit { id } => args.extend(["--detach", id.as_str()]),
        }
        self.local(&args).await.map(drop)
    }

    /// `wanted` as a branch, a tag or a commit, after a fetch.
    async fn resolve(&mut self, wanted: &str, notes: &mut Vec<String>) -> Result<Target, VcsError> {
        // `HEAD` is the remote's default branch, followed like any branch (the clone's
        // `origin/HEAD` is only what it was at clone time).
        if wanted == "HEAD" {
            if let Some(branch) = self.default_branch().await? {
                if let Some(id) = self.rev_parse(&format!("refs/remotes/origin/{branch}^{{commit}}")).await? {
                    return Ok(Target::Branch { name: branch, id });
                }
            }
        }
        let branch = match wanted {
            "HEAD" => None,
            _ => self.rev_parse(&format!("refs/remotes/origin/{wanted}^{{commit}}")).await?,
        };
        if let Some(id) = branch {
            return Ok(Target::Branch { name: wanted.to_string(), id });
        }
        if let Some(id) = self.rev_parse(&format!("refs/tags/{wanted}^{{commit}}")).await? {
            return Ok(Target::Tag { name: wanted.to_string(), id });
        }
        if looks_like_commit(wanted) {
            if let Some(id) = self.rev_parse(&format!("{wanted}^{{commit}}")).await? {
                return Ok(Target::Commit { id });
            }
        }
        if wanted == DEFAULT_REVISION {
            if let Some(branch) = self.default_branch().await? {
                if let Some(id) = self.rev_parse(&format!("refs/remotes/origin/{branch}^{{commit}}")).await? {
                    notes.push(format!(
                        "the remote has no branch {DEFAULT_REVISION} (the default revision); following its default branch {branch}"
                    ));
                    return Ok(Target::Branch { name: branch, id });
                }
            }
        }
        let branches = self.local(&["for-each-ref", "--format=%(refname:lstrip=3)", "refs/remotes/origin"]).await?;
        let branches: Vec<&str> = branches.lines().map(str::trim).filter(|b| !b.is_empty() && *b != "HEAD").collect();
        Err(self.no_revision(wanted, &branches))
    }

    /// The plan of [`sync`]: what the apply would report, found without writing.
    async fn plan(
        &mut self,
        existing: &Existing,
        wanted: &str,
        force: bool,
        changes: &mut Vec<Change>,
        notes: &mut Vec<String>,
    ) -> Result<(), VcsError> {
        let path = self.path.to_string();
        let local = *existing == Existing::Checkout;
        if !local {
            if *existing == Existing::Missing {
                // The missing parents once (root's), then the checkout directory (the user's).
                planned_prepare(&self.path, &self.runner, changes)?;
            }
            let refs = self.ls_remote(Path::new("/")).await?;
            return match self.resolve_advertised(wanted, &refs, false, notes).await? {
                Some(target) => {
                    changes
                        .push(Change::new(&path, format!("cloned at {} ({})", short(target.id()), target.describe())));
                    Ok(())
                }
                None => {
                    changes.push(Change::new(
                        &path,
                        format!("would clone {}: {}", mask_url(&self.repo), unadvertised(wanted)),
                    ));
                    Ok(())
                }
            };
        }
        let repo = self.repo.clone();
        let spec = self.runner.local(["config", "--get", "remote.origin.url"], self.path.as_path()).inspection();
        let origin = run(&spec, &[0, 1], self.cancel).await?;
        match origin.exit {
            Exit::Code(0) if origin.output.trim() == repo => {}
            Exit::Code(0) => {
                let was = mask_url(origin.output.trim());
                changes.push(Change::new(&path, format!("remote origin {was} -> {}", mask_url(&repo))));
            }
            _ => changes.push(Change::new(&path, format!("remote origin {} added", mask_url(&repo)))),
        }
        let refs = self.ls_remote(self.path.clone().as_path()).await?;
        let Some(target) = self.resolve_advertised(wanted, &refs, true, notes).await? else {
            changes.push(Change::new(&path, format!("would fetch {}: {}", mask_url(&repo), unadvertised(wanted))));
            return Ok(());
        };
        let git_dir = self.path.as_path().join(".git");
        if git_dir.is_dir() && !git_dir.join("index").exists() {
            changes.push(Change::new(&path, format!("checked out at {} ({})", short(target.id()), target.describe())));
            return Ok(());
        }
        let head = self.rev_parse("HEAD^{commit}").await?;
        let spec = self.runner.local(["symbolic-ref", "--quiet", "--short", "HEAD"], self.path.as_path()).inspection();
        let symbolic = run(&spec, &[0, 1], self.cancel).await?;
        let on_branch = (symbolic.exit == Exit::Code(0)).then(|| symbolic.output.trim().to_string());
        // `--no-optional-locks`: a status refreshes the index otherwise (a write).
        let args = ["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"];
        let spec = self.runner.local(args, self.path.as_path()).inspection();
        let dirty = changed_files(&run(&spec, &[0], self.cancel).await?.output);
        if !dirty.is_empty() && !force {
            return Err(VcsError::LocalChanges { path: self.path.clone(), files: describe_files(&dirty) });
        }
        let mut dropped_commits = false;
        if let Target::Branch { name, id } = &target {
            if let Some(local) = self.rev_parse(&format!("refs/heads/{name}^{{commit}}")).await? {
                // The apply asks whether the local branch is an ancestor of the remote's
                // new head. Without that head's objects (not fetched yet), the last
                // fetched head stands in: a local branch behind it has no commits of its
                // own (a remote that rewrote its history is only seen by the apply).
                let against = match self.rev_parse(&format!("{id}^{{commit}}")).await? {
                    Some(known) => Some(known),
                    None => self.rev_parse(&format!("refs/remotes/origin/{name}^{{commit}}")).await?,
                };
                let diverged = match against {
                    Some(a) => local != *id && local != a && !self.is_ancestor(&local, &a).await?,
                    None => local != *id,
                };
                if diverged {
                    if !force {
                        return Err(VcsError::Diverged { path: self.path.clone(), branch: name.clone() });
                    }
                    dropped_commits = true;
                }
            }
        }
        if !dirty.is_empty() {
            changes.push(Change::new(
                &path,
                format!("local changes discarded ({}; force is set)", describe_files(&dirty)),
            ));
        }
        let at_target = head.as_deref() == Some(target.id())
            && match &target {
                Target::Branch { name, .. } => on_branch.as_deref() == Some(name.as_str()) && !dropped_commits,
                _ => true,
            };
        if at_target {
            return Ok(());
        }
        let mut what = match head.as_deref() {
            Some(h) if h == target.id() => format!("{} checked out at {}", target.describe(), short(h)),
            Some(h) => format!("revision {} -> {} ({})", short(h), short(target.id()), target.describe()),
            None => format!("checked out at {} ({})", short(target.id()), target.describe()),
        };
        if dropped_commits {
            what.push_str("; local commits on the branch dropped, force is set");
        }
        changes.push(Change::new(&path, what));
        Ok(())
    }

    /// The remote's refs (`git ls-remote --symref`): read-only, run as the fetch
    /// would be (same user, key and environment), from `cwd`.
    async fn ls_remote(&mut self, cwd: &Path) -> Result<Advertised, VcsError> {
        let repo = self.repo.clone();
        let spec = self.runner.spec(["ls-remote", "--symref", "--", repo.as_str()], cwd, TRANSFER_TIMEOUT).inspection();
        Ok(Advertised::parse(&run(&spec, &[0], self.cancel).await?.output))
    }

    /// `wanted` against the advertised refs, in [`Self::resolve`]'s order. A commit id
    /// the remote does not advertise may still be in the checkout (`in_checkout`);
    /// `None`: only a fetch could tell.
    async fn resolve_advertised(
        &mut self,
        wanted: &str,
        refs: &Advertised,
        in_checkout: bool,
        notes: &mut Vec<String>,
    ) -> Result<Option<Target>, VcsError> {
        if wanted == "HEAD" {
            if let Some(branch) = refs.head.clone() {
                if let Some(id) = refs.branch(&branch) {
                    return Ok(Some(Target::Branch { name: branch, id }));
                }
            }
        } else if let Some(id) = refs.branch(wanted) {
            return Ok(Some(Target::Branch { name: wanted.to_string(), id }));
        }
        if let Some(id) = refs.tag(wanted) {
            return Ok(Some(Target::Tag { name: wanted.to_string(), id }));
        }
        if looks_like_commit(wanted) {
            let lower = wanted.to_ascii_lowercase();
            let mut ids: Vec<&str> =
                refs.refs.iter().map(|(id, _)| id.as_str()).filter(|id| id.starts_with(&lower)).collect();
            ids.dedup();
            if ids.len() == 1 {
                return Ok(Some(Target::Commit { id: ids[0].to_string() }));
            }
            if in_checkout {
                if let Some(id) = self.rev_parse(&format!("{wanted}^{{commit}}")).await? {
                    return Ok(Some(Target::Commit { id }));
                }
            }
            return Ok(None);
        }
        if wanted == DEFAULT_REVISION {
            if let Some(branch) = refs.head.clone() {
                if let Some(id) = refs.branch(&branch) {
                    notes.push(format!(
                        "the remote has no branch {DEFAULT_REVISION} (the default revision); following its default branch {branch}"
                    ));
                    return Ok(Some(Target::Branch { name: branch, id }));
                }
            }
        }
        let branches: Vec<&str> = refs.refs.iter().filter_map(|(_, r)| r.strip_prefix("refs/heads/")).collect();
        Err(self.no_revision(wanted, &branches))
    }

    /// `wanted` names nothing in the remote: the error lists (some of) its branches, the
    /// same way whether they came from the fetched refs or from `ls-remote`.
    fn no_revision(&self, wanted: &str, branches: &[&str]) -> VcsError {
        let known = if branches.is_empty() {
            " (it has no branches)".to_string()
        } else {
            let mut list = branches.iter().take(BRANCHES_SHOWN).copied().collect::<Vec<_>>().join(", ");
            if branches.len() > BRANCHES_SHOWN {
                list.push_str(", …");
            }
            format!(" (branches: {list})")
        };
        VcsError::NoRevision {
            revision: wanted.to_string(),
            expected: "a branch, tag or commit",
            repo: mask_url(&self.repo),
            known,
        }
    }

    /// The branch the remote's HEAD names, if it names one.
    async fn default_branch(&mut self) -> Result<Option<String>, VcsError> {
        let out = self.remote(&["ls-remote", "--symref", "origin", "HEAD"], self.path.clone().as_path()).await?;
        Ok(parse_symref(&out))
    }
}

/// Why a plan cannot name the commit `wanted` without fetching.
fn unadvertised(wanted: &str) -> String {
    format!("commit {wanted} is not advertised by the remote nor in the checkout; only a fetch can find it")
}

/// What `git ls-remote --symref` printed: the branch HEAD names, and `(id, ref)` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Advertised {
    pub head: Option<String>,
    pub refs: Vec<(String, String)>,
}

impl Advertised {
    pub fn parse(out: &str) -> Self {
        let refs = out
            .lines()
            .filter(|l| !l.starts_with("ref: "))
            .filter_map(|l| l.split_once('\t'))
            .map(|(id, name)| (id.trim().to_ascii_lowercase(), name.trim().to_string()))
            .filter(|(id, _)| is_object_id(id))
            .collect();
        Self { head: parse_symref(out), refs }
    }

    fn id_of(&self, name: &str) -> Option<String> {
        self.refs.iter().find(|(_, r)| r == name).map(|(id, _)| id.clone())
    }

    pub fn branch(&self, name: &str) -> Option<String> {
        self.id_of(&format!("refs/heads/{name}"))
    }

    /// The commit a tag names: the peeled line of an annotated tag first.
    pub fn tag(&self, name: &str) -> Option<String> {
        self.id_of(&format!("refs/tags/{name}^{{}}")).or_else(|| self.id_of(&format!("refs/tags/{name}")))
    }
}

/// `ref: refs/heads/main<TAB>HEAD` in `git ls-remote --symref` output.
pub fn parse_symref(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let (target, name) = l.strip_prefix("ref: ")?.split_once('\t')?;
        (name.trim() == "HEAD").then_some(target.strip_prefix("refs/heads/")?.to_string())
    })
}

/// Paths of `git status --porcelain` (format v1) lines (`XY path`, `XY from -> to`).
pub fn changed_files(status: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|l| l.get(3..))
        .map(|p| p.rsplit_once(" -> ").map_or(p, |(_, to)| to).to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Could be an abbreviated or full SHA-1/SHA-256 commit id.
pub fn looks_like_commit(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn output_parsers() {
        assert_eq!(parse_symref("ref: refs/heads/main\tHEAD\n1234abcd\tHEAD\n").as_deref(), Some("main"));
        assert_eq!(parse_symref("1234abcd\tHEAD\n"), None);
        assert_eq!(changed_files(" M src/a.rs\nA  b\nR  old -> new\n"), ["src/a.rs", "b", "new"]);
        assert!(changed_files("").is_empty());
        assert!(looks_like_commit("deadbeef") && !looks_like_commit("abc") && !looks_like_commit("v1.0"));
        assert!(is_object_id(&"a".repeat(40)) && !is_object_id("abcd"));
    }

    #[test]
    fn advertised_refs_are_parsed() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let out = format!(
            "ref: refs/heads/main\tHEAD\n{a}\tHEAD\n{a}\trefs/heads/main\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n{b}\trefs/tags/light\n"
        );
        let refs = Advertised::parse(&out);
        assert_eq!(refs.head.as_deref(), Some("main"));
        assert_eq!(refs.branch("main"), Some(a.clone()));
        assert_eq!(refs.branch("v1"), None);
        assert_eq!(refs.tag("v1"), Some(c), "an annotated tag names the commit of its peeled line");
        assert_eq!(refs.tag("light"), Some(b));
        assert_eq!(Advertised::parse("garbage\n"), Advertised::default());
    }

    #[test]
    fn targets_describe_themselves() {
        let b = Target::Branch { name: "main".into(), id: "a".repeat(40) };
        assert_eq!((b.describe(), b.id().len()), ("branch main".to_string(), 40));
        assert_eq!(Target::Tag { name: "v1".into(), id: "b".into() }.describe(), "tag v1");
        assert_eq!(Target::Commit { id: "c".into() }.describe(), "commit");
    }

    #[tokio::test]
    async fn bad_parameters_fail_before_anything_runs() {
        crate::states::testutil::refused(
            "common.git",
            json!({"path": "srv/app", "repo": "/srv/r.git"}),
            "not absolute",
        );
        let out = apply(&typed("common.git", json!({"path": "/", "repo": "/srv/r.git"})), Cancel::never()).await;
        assert!(!out.result && out.comment.contains("parameter path"), "{out:?}");
        assert!(out.changes.is_empty());
        let out = apply(
            &typed("common.git", json!({"path": "/srv/app", "repo": "/srv/r.git", "ssh-key-file": "/nonexistent/key"})),
            Cancel::never(),
        )
        .await;
        assert!(!out.result && out.comment.starts_with("parameter ssh-key-file: /nonexistent/key"), "{out:?}");
        let out = apply(
            &typed("common.git", json!({"path": "/srv/app", "repo": "/srv/r.git", "user": "no-such-user-xyz"})),
            Cancel::never(),
        )
        .await;
        assert_eq!(out.comment, "unknown user \"no-such-user-xyz\"");
        crate::states::testutil::refused(
            "common.git",
            json!({"path": "/srv/app", "repo": "-oProxyCommand=x"}),
            "parameter \"repo\"",
        );
        crate::states::testutil::refused(
            "common.git",
            json!({"path": "/srv/app", "repo": "https://u:tok3n@h/x", "revision": "--x"}),
            "parameter \"revision\"",
        );
    }
}
