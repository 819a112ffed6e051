//! `common.git`, `common.hg` and `common.svn` against the real tools: upstream
//! repositories created in temporary directories and served on loopback (`git daemon`,
//! `hg serve`, `svnserve` with a password file), plus plain paths.
//!
//! Needs git, mercurial and subversion (`.ci/run` installs them); the tests that run a
//! tool as another user (`nobody`) or check ownership need root and say SKIPPED
//! without it. Every server runs in its own process group, killed when the test drops
//! it.
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{params, run_ok};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use opsagent_helper::cancel::{self, Cancel};
use opsagent_helper::states::storage::find_tool;
use opsagent_helper::states::vcs::{git, hg, svn};
use opsagent_proto::catalogue::{parse_state, CommonGit, CommonHg, CommonSvn};
use opsagent_proto::request::{Change, Outcome};
use serde_json::{json, Value};

const NOBODY_UID: u32 = 65534;

fn need(tool: &str, package: &str) {
    assert!(
        find_tool(tool, &[]).is_some(),
        "{tool} is needed by these tests: apt-get install -y {package} (.ci/run installs it)"
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn git_state(raw: Value) -> Outcome {
    let p = CommonGit::try_from(params("common.git", raw)).unwrap();
    git::apply(&p, Cancel::never()).await
}

async fn hg_state(raw: Value) -> Outcome {
    let p = CommonHg::try_from(params("common.hg", raw)).unwrap();
    hg::apply(&p, Cancel::never()).await
}

async fn svn_state(raw: Value) -> Outcome {
    let p = CommonSvn::try_from(params("common.svn", raw)).unwrap();
    svn::apply(&p, Cancel::never()).await
}

#[track_caller]
fn assert_ok(out: &Outcome) {
    assert!(out.result, "state failed: {out:?}");
}

#[track_caller]
fn assert_unchanged(out: &Outcome) {
    assert!(out.result && out.changes.is_empty(), "expected no change: {out:?}");
    assert!(out.comment.contains("already as wanted"), "{out:?}");
}

/// The change reported for `path`, which must be the only one.
#[track_caller]
fn only_change(out: &Outcome, path: &Path) -> String {
    assert_ok(out);
    assert_eq!(out.changes.len(), 1, "{out:?}");
    assert_eq!(out.changes[0].subject, path.display().to_string(), "{out:?}");
    out.changes[0].what.clone()
}

/// The change of a first checkout into a new directory: the directories created on
/// the way (the checkout's own included) come first, then the clone.
#[track_caller]
fn clone_change(out: &Outcome, path: &Path) -> String {
    assert_ok(out);
    let (last, created) = out.changes.split_last().unwrap_or_else(|| panic!("no change: {out:?}"));
    assert_eq!(last.subject, path.display().to_string(), "{out:?}");
    assert!(created.iter().all(|c| path.starts_with(&c.subject) && c.what.starts_with("directory created")), "{out:?}");
    assert_eq!(created.last().map(|c| c.subject.clone()), Some(path.display().to_string()), "{out:?}");
    last.what.clone()
}

/// Runs a command, which must succeed; its stdout, trimmed.
fn sh(cmd: &mut Command) -> String {
    run_ok(cmd).trim().to_string()
}

fn git_cmd(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    c
}

fn git_in(dir: &Path, args: &[&str]) -> String {
    sh(git_cmd(dir).args(args))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A temporary directory that other users may traverse (the `user` tests).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server in its own process group; the group is killed on drop.
struct Server {
    child: Child,
}

impl Server {
    async fn start(cmd: &mut Command, port: u16) -> Self {
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let server = Self { child };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{cmd:?} does not listen on port {port}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------- git

/// A bare repository with one commit on `branch`, a work clone to make more, and
/// optionally `git daemon` serving it.
struct GitUpstream {
    dir: tempfile::TempDir,
    branch: String,
}

impl GitUpstream {
    fn new(branch: &str) -> Self {
        need("git", "git");
        let dir = open_tempdir();
        let d = dir.path();
        git_in(d, &["init", "--quiet", "--bare", "-b", branch, "up.git"]);
        git_in(d, &["clone", "--quiet", "up.git", "work"]);
        git_in(&d.join("work"), &["checkout", "--quiet", "-b", branch]);
        let up = Self { dir, branch: branch.to_string() };
        up.commit("README", "one\n");
        up
    }

    fn bare(&self) -> PathBuf {
        self.dir.path().join("up.git")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn path_url(&self) -> String {
        self.bare().display().to_string()
    }

    /// Commits `content` to `file` and pushes; the new commit's id.
    fn commit(&self, file: &str, content: &str) -> String {
        let w = self.work();
        std::fs::write(w.join(file), content).unwrap();
        git_in(&w, &["add", file]);
        git_in(&w, &["commit", "--quiet", "-m", &format!("{file}: {content}")]);
        git_in(&w, &["push", "--quiet", "origin", &format!("HEAD:refs/heads/{}", self.branch)]);
        git_in(&w, &["rev-parse", "HEAD"])
    }

    fn tag(&self, name: &str) {
        let w = self.work();
        git_in(&w, &["tag", "-a", "-m", name, name]);
        git_in(&w, &["push", "--quiet", "origin", name]);
    }

    async fn serve(&self) -> (Server, String) {
        let port = free_port();
        let base = self.dir.path().display().to_string();
        let server = Server::start(
            Command::new("git").args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={base}"),
                &base,
            ]),
            port,
        )
        .await;
        (server, format!("git://127.0.0.1:{port}/up.git"))
    }
}

fn short(id: &str) -> &str {
    &id[..12]
}

fn head_of(dir: &Path) -> String {
    git_in(dir, &["rev-parse", "HEAD"])
}

#[tokio::test]
async fn git_clones_follows_a_branch_and_changes_nothing_on_the_second_run() {
    // `master` is the documented default revision: not given here.
    let up = GitUpstream::new("master");
    let (_daemon, url) = up.serve().await;
    let first = head_of(&up.bare());
    let dest = tempfile::tempdir().unwrap();
    let checkouts: Vec<(String, PathBuf)> =
        vec![(up.path_url(), dest.path().join("by-path/app")), (url, dest.path().join("by-daemon/app"))];

    for (repo, path) in &checkouts {
        let out = git_state(json!({"path": path, "repo": repo})).await;
        assert_ok(&out);
        // The missing parent is created too, and reported.
        let parent = path.parent().unwrap().display().to_string();
        assert!(out.changes.iter().any(|c| c.subject == parent && c.what.starts_with("directory created")), "{out:?}");
        let cloned = out.changes.last().unwrap();
        assert_eq!(
            *cloned,
            Change::new(path.display().to_string(), format!("cloned at {} (branch master)", short(&first)))
        );
        assert_eq!(read(&path.join("README")), "one\n");
        assert_eq!(git_in(path, &["symbolic-ref", "--short", "HEAD"]), "master");
        assert_eq!(git_in(path, &["rev-parse", "--abbrev-ref", "@{upstream}"]), "origin/master");
        assert_unchanged(&git_state(json!({"path": path, "repo": repo})).await);
    }

    let second = up.commit("README", "two\n");
    for (repo, path) in &checkouts {
        let out = git_state(json!({"path": path, "repo": repo, "revision": "master"})).await;
        let what = only_change(&out, path);
        assert_eq!(what, format!("revision {} -> {} (branch master)", short(&first), short(&second)));
        assert_eq!(read(&path.join("README")), "two\n");
        assert_eq!(head_of(path), second);
        assert_unchanged(&git_state(json!({"path": path, "repo": repo})).await);
    }

    // A new URL for the same repository: origin is changed, nothing else.
    let (repo, path) = &checkouts[0];
    let file_url = format!("file://{repo}");
    let out = git_state(json!({"path": path, "repo": file_url})).await;
    assert_eq!(only_change(&out, path), format!("remote origin {repo} -> {file_url}"));
    assert_unchanged(&git_state(json!({"path": path, "repo": file_url})).await);
}

#[tokio::test]
async fn git_without_master_follows_the_remote_default_branch() {
    let up = GitUpstream::new("main");
    let first = head_of(&up.bare());
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let state = json!({"path": path, "repo": up.path_url()});
    let out = git_state(state.clone()).await;
    assert_eq!(clone_change(&out, &path), format!("cloned at {} (branch main)", short(&first)));
    assert!(
        out.comment
            .contains("the remote has no branch master (the default revision); following its default branch main"),
        "{out:?}"
    );
    let again = git_state(state.clone()).await;
    assert!(again.changes.is_empty() && again.comment.contains("following its default branch main"), "{again:?}");
    let second = up.commit("README", "two\n");
    let out = git_state(state).await;
    assert_eq!(only_change(&out, &path), format!("revision {} -> {} (branch main)", short(&first), short(&second)));

    // `HEAD` is the default branch as well, without a note.
    let out = git_state(json!({"path": path, "repo": up.path_url(), "revision": "HEAD"})).await;
    assert_unchanged(&out);
    assert!(!out.comment.contains("following"), "{out:?}");

    // Any other unknown revision is an error that lists the branches.
    let out = git_state(json!({"path": path, "repo": up.path_url(), "revision": "release"})).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(
        out.comment,
        format!("revision \"release\" is not a branch, tag or commit of {} (branches: main)", up.path_url())
    );
    assert_eq!(head_of(&path), second, "a failed state moves nothing");
}

#[tokio::test]
async fn git_tags_and_commit_ids_stay_pinned() {
    let up = GitUpstream::new("main");
    let c1 = head_of(&up.bare());
    up.tag("v1");
    let c2 = up.commit("README", "two\n");
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let repo = up.path_url();
    let with = |rev: &str| json!({"path": path, "repo": repo, "revision": rev});

    let out = git_state(with("v1")).await;
    assert_eq!(clone_change(&out, &path), format!("cloned at {} (tag v1)", short(&c1)));
    assert_eq!(read(&path.join("README")), "one\n");
    let c3 = up.commit("README", "three\n");
    assert_unchanged(&git_state(with("v1")).await);
    assert_eq!(head_of(&path), c1);

    // A full commit id, then new upstream commits: it stays.
    let out = git_state(with(&c2)).await;
    assert_eq!(only_change(&out, &path), format!("revision {} -> {} (commit)", short(&c1), short(&c2)));
    up.commit("other", "x\n");
    assert_unchanged(&git_state(with(&c2)).await);
    assert_eq!(head_of(&path), c2);

    // An abbreviated id.
    let out = git_state(with(&c3[..8])).await;
    assert_eq!(only_change(&out, &path), format!("revision {} -> {} (commit)", short(&c2), short(&c3)));
    assert_unchanged(&git_state(with(&c3[..8])).await);

    // Back to the branch: it goes to the newest commit and follows from there.
    let out = git_state(with("main")).await;
    let tip = head_of(&up.bare());
    assert_eq!(only_change(&out, &path), format!("revision {} -> {} (branch main)", short(&c3), short(&tip)));
    assert_eq!(git_in(&path, &["symbolic-ref", "--short", "HEAD"]), "main");
    assert_unchanged(&git_state(with("main")).await);
}

#[tokio::test]
async fn git_force_decides_over_local_changes_and_commits() {
    let up = GitUpstream::new("main");
    let c1 = head_of(&up.bare());
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let repo = up.path_url();
    let state = |force: bool| json!({"path": path, "repo": repo, "revision": "main", "force": force});
    assert_ok(&git_state(state(false)).await);

    // A changed tracked file: refused without force, even when nothing moved upstream.
    std::fs::write(path.join("README"), "edited\n").unwrap();
    std::fs::write(path.join("local.conf"), "untracked\n").unwrap();
    let out = git_state(state(false)).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(out.comment, format!("{} has local changes (README); set force to discard them", path.display()));
    let c2 = up.commit("README", "two\n");
    let out = git_state(state(false)).await;
    assert!(!out.result && out.comment.contains("set force to discard them"), "{out:?}");
    assert_eq!(read(&path.join("README")), "edited\n", "the local change is kept without force");
    assert_eq!(head_of(&path), c1);

    let out = git_state(state(true)).await;
    assert_ok(&out);
    let p = path.display().to_string();
    assert_eq!(
        out.changes,
        [
            Change::new(&p, "local changes discarded (README; force is set)"),
            Change::new(&p, format!("revision {} -> {} (branch main)", short(&c1), short(&c2))),
        ]
    );
    assert_eq!(read(&path.join("README")), "two\n");
    assert_eq!(read(&path.join("local.conf")), "untracked\n", "untracked files are never touched");
    assert_unchanged(&git_state(state(true)).await);

    // A local commit on the followed branch: the remote does not have it.
    std::fs::write(path.join("README"), "local commit\n").unwrap();
    git_in(&path, &["commit", "--quiet", "-am", "local"]);
    let local = head_of(&path);
    let out = git_state(state(false)).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "{}: local branch main has commits that are not on the remote's main; set force to reset it",
            path.display()
        )
    );
    assert_eq!(head_of(&path), local);
    let out = git_state(state(true)).await;
    assert_eq!(
        only_change(&out, &path),
        format!(
            "revision {} -> {} (branch main); local commits on the branch dropped, force is set",
            short(&local),
            short(&c2)
        )
    );
    assert_eq!(head_of(&path), c2);
    assert_unchanged(&git_state(state(true)).await);
}

/// A plan of a git state as the helper's dispatch makes it: in a plan context, the
/// outcome marked planned, a refused write turned into its step.
async fn git_plan(raw: Value) -> Outcome {
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), git_state(raw)).await;
    assert_eq!(plan.refused(), None, "the plan of common.git stopped at a write: {out:?}");
    opsagent_helper::states::planned(out, None, "common.git")
}

/// Everything under `dir`, `.git` included: each entry's path, kind, size, mtime and
/// content. A plan must leave all of it as it was (a fetch would add refs and objects,
/// a status refresh would rewrite the index).
fn tree_sum(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            let content = if m.is_file() { std::fs::read(&path).unwrap() } else { Vec::new() };
            out.push(format!("{rel} {:?} {} {}.{} {content:?}", m.file_type(), m.len(), m.mtime(), m.mtime_nsec()));
            if m.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = vec![format!("exists: {}", dir.exists())];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn git_plan_apply_plan_cycle_writes_nothing_and_says_what_the_apply_says() {
    let up = GitUpstream::new("main");
    let c1 = head_of(&up.bare());
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let repo = up.path_url();
    let state = json!({"path": path, "repo": repo, "revision": "main"});
    assert_ok(&git_state(state.clone()).await);

    // Converged: the plan finds nothing (no "would run git fetch").
    let before = tree_sum(&path);
    let out = git_plan(state.clone()).await;
    assert!(out.planned && out.result && out.changes.is_empty(), "{out:?}");
    assert!(out.comment.contains("already as wanted"), "{out:?}");
    assert_eq!(tree_sum(&path), before, "a plan of a converged checkout wrote into it");

    // The remote moves on: the plan names the apply's change and fetches nothing.
    let c2 = up.commit("README", "two\n");
    let want = format!("revision {} -> {} (branch main)", short(&c1), short(&c2));
    let out = git_plan(state.clone()).await;
    assert_eq!(only_change(&out, &path), want);
    assert_eq!(tree_sum(&path), before, "the plan wrote into the checkout");
    assert_eq!(only_change(&git_state(state.clone()).await, &path), want);
    let out = git_plan(state.clone()).await;
    assert!(out.result && out.changes.is_empty(), "{out:?}");

    // A new URL for the same repository.
    let file_url = format!("file://{repo}");
    let moved = json!({"path": path, "repo": file_url, "revision": "main"});
    let before = tree_sum(&path);
    let out = git_plan(moved.clone()).await;
    assert_eq!(only_change(&out, &path), format!("remote origin {repo} -> {file_url}"));
    assert_eq!(tree_sum(&path), before);

    // A commit the remote no longer advertises (not a ref's head) and the checkout has
    // not fetched: only a fetch can find it, and the plan says so.
    let c3 = up.commit("README", "three\n");
    up.commit("README", "four\n");
    let out = git_plan(json!({"path": path, "repo": repo, "revision": c3})).await;
    assert_eq!(
        only_change(&out, &path),
        format!(
            "would fetch {repo}: commit {c3} is not advertised by the remote nor in the checkout; only a fetch can find it"
        )
    );
    assert_eq!(tree_sum(&path), before);

    // A local change without force: the plan gives the apply's refusal, and the
    // refused apply and the plan leave it alone.
    std::fs::write(path.join("README"), "edited\n").unwrap();
    let before = tree_sum(&path);
    let planned = git_plan(state.clone()).await;
    assert_eq!(tree_sum(&path), before);
    let applied = git_state(state.clone()).await;
    assert!(!planned.result && !applied.result && planned.changes.is_empty(), "{planned:?}");
    assert_eq!(planned.comment, applied.comment);
    assert_eq!(planned.comment, format!("{} has local changes (README); set force to discard them", path.display()));

    // A local commit on the followed branch, the remote's new head not fetched yet:
    // the plan judges it against the last fetched head and refuses as the apply does.
    git_in(&path, &["commit", "--quiet", "-am", "local"]);
    up.commit("README", "five\n");
    let before = tree_sum(&path);
    let planned = git_plan(state.clone()).await;
    assert_eq!(tree_sum(&path), before);
    let applied = git_state(state.clone()).await;
    assert!(!planned.result && !applied.result && planned.changes.is_empty(), "{planned:?}");
    assert_eq!(planned.comment, applied.comment);
    assert!(
        planned
            .comment
            .ends_with("local branch main has commits that are not on the remote's main; set force to reset it"),
        "{planned:?}"
    );
}

#[tokio::test]
async fn git_plan_of_a_missing_checkout_names_the_clone_and_creates_nothing() {
    let up = GitUpstream::new("main");
    let head = head_of(&up.bare());
    up.tag("v1");
    let dest = tempfile::tempdir().unwrap();
    let parent = dest.path().join("new");
    let path = parent.join("app");
    let repo = up.path_url();
    for (revision, describe) in [("main", "branch main"), ("v1", "tag v1"), ("HEAD", "branch main")] {
        let state = json!({"path": path, "repo": repo, "revision": revision});
        let out = git_plan(state).await;
        assert_eq!(clone_change(&out, &path), format!("cloned at {} ({describe})", short(&head)));
        assert!(out.changes.iter().any(|c| c.subject == parent.display().to_string()), "{out:?}");
        let subjects: std::collections::BTreeSet<_> = out.changes.iter().map(|c| (&c.subject, &c.what)).collect();
        assert_eq!(subjects.len(), out.changes.len(), "each change once: {out:?}");
        assert!(!parent.exists(), "the plan created {}", parent.display());
    }
    let state = json!({"path": path, "repo": repo, "revision": "main"});
    let planned = git_plan(state.clone()).await;
    let out = git_state(state.clone()).await;
    assert_eq!(clone_change(&out, &path), format!("cloned at {} (branch main)", short(&head)));
    assert_eq!(out.changes, planned.changes, "the plan says what the apply does");
    let out = git_plan(state).await;
    assert!(out.result && out.changes.is_empty(), "{out:?}");
}

#[tokio::test]
async fn git_existing_paths_that_are_not_clones() {
    let up = GitUpstream::new("main");
    let dest = tempfile::tempdir().unwrap();
    let repo = up.path_url();

    // A directory with other content: refused, then replaced with force.
    let path = dest.path().join("site");
    std::fs::create_dir_all(path.join("old/deep")).unwrap();
    std::fs::write(path.join("index.html"), "old\n").unwrap();
    let out = git_state(json!({"path": path, "repo": repo, "revision": "main"})).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "{} exists, is not empty (2 entries) and is not a git checkout; set force to replace its content",
            path.display()
        )
    );
    assert!(path.join("index.html").exists());
    let out = git_state(json!({"path": path, "repo": repo, "revision": "main", "force": true})).await;
    assert_ok(&out);
    let p = path.display().to_string();
    assert_eq!(out.changes[0], Change::new(&p, "content removed (2 entries; not a git checkout, force is set)"));
    assert!(out.changes[1].what.starts_with("cloned at "), "{out:?}");
    assert!(!path.join("index.html").exists() && path.join("README").exists());

    // An empty directory is simply cloned into.
    let empty = dest.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = git_state(json!({"path": empty, "repo": repo, "revision": "main"})).await;
    assert!(only_change(&out, &empty).starts_with("cloned at "));

    // A file is never replaced, force or not.
    let file = dest.path().join("file");
    std::fs::write(&file, "data\n").unwrap();
    let out = git_state(json!({"path": file, "repo": repo, "force": true})).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "{} exists and is a regular file, not a directory; a checkout cannot go there (force does not replace it)",
            file.display()
        )
    );
    assert_eq!(read(&file), "data\n");
}

/// A directory another user owns, where a checkout as root would sit (`/var/www` of
/// `www-data`), and a root-owned "victim" with content (standing in for `/etc`).
struct Planted {
    _base: tempfile::TempDir,
    www: PathBuf,
    victim: PathBuf,
}

impl Planted {
    fn new() -> Self {
        let base = open_tempdir();
        let www = base.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::os::unix::fs::chown(&www, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
        let victim = base.path().join("etc");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("shadow"), "root's\n").unwrap();
        Self { _base: base, www, victim }
    }

    /// `www/NAME` -> the victim, planted (and owned) by the other user.
    fn link(&self, name: &str) -> PathBuf {
        let link = self.www.join(name);
        std::os::unix::fs::symlink(&self.victim, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
        link
    }

    fn victim_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.victim).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["shadow"], "root's directory was changed through the planted link");
        assert_eq!(read(&self.victim.join("shadow")), "root's\n");
    }
}

#[tokio::test]
async fn vcs_as_root_never_follows_a_link_planted_by_another_user() {
    if !is_root() {
        common::skip("vcs_as_root_never_follows_a_link_planted_by_another_user: SKIPPED, needs root");
        return;
    }
    need("git", "git");
    let up = GitUpstream::new("main");
    let scene = Planted::new();
    // The owner of www replaces the checkout with a link to root's directory: with
    // force, root's git would empty that directory and clone into it.
    let app = scene.link("app");
    let out = git_state(json!({"path": app, "repo": up.path_url(), "revision": "main", "force": true})).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert!(
        out.comment
            .contains(&format!("{}: a symbolic link in a directory writable by uid {NOBODY_UID}", app.display())),
        "{out:?}"
    );
    scene.victim_untouched();
    // A link further up the way (`www/sub/app`) is refused the same way, for every tool.
    let sub = scene.link("sub");
    let deeper = sub.join("app");
    let out = git_state(json!({"path": deeper, "repo": up.path_url(), "revision": "main"})).await;
    assert!(!out.result && out.comment.contains("refusing to follow it"), "{out:?}");
    let out = hg_state(json!({"path": deeper, "repo": "/nonexistent/hg", "force": true})).await;
    assert!(!out.result && out.comment.contains("refusing to follow it"), "{out:?}");
    let out = svn_state(json!({"path": deeper, "repo": "file:///nonexistent/svn", "force": true})).await;
    assert!(!out.result && out.comment.contains("refusing to follow it"), "{out:?}");
    scene.victim_untouched();
}

#[tokio::test]
async fn vcs_as_root_refuses_a_checkout_another_user_could_swap() {
    if !is_root() {
        common::skip("vcs_as_root_refuses_a_checkout_another_user_could_swap: SKIPPED, needs root");
        return;
    }
    need("git", "git");
    let up = GitUpstream::new("main");
    let scene = Planted::new();
    // A real root-owned directory, but in www: its owner can rename it away and put a
    // link in its place between the helper's check and git's run (root clones by name).
    let app = scene.www.join("app");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("index.html"), "old\n").unwrap();
    let out = git_state(json!({"path": app, "repo": up.path_url(), "revision": "main", "force": true})).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "git would run as root in {}, but {} can be changed by uid {NOBODY_UID}, who could swap it (or a directory \
             in it) for a link while root works there; set `user` to the owner of that directory, or keep the \
             checkout where only root writes",
            app.display(),
            scene.www.display()
        )
    );
    assert_eq!(read(&app.join("index.html")), "old\n", "force emptied a checkout it then refused");
    // Missing: created (by descriptor) and refused before git runs.
    let fresh = scene.www.join("fresh");
    let out = git_state(json!({"path": fresh, "repo": up.path_url(), "revision": "main"})).await;
    assert!(!out.result && out.comment.starts_with("git would run as root in"), "{out:?}");
    assert!(!fresh.join(".git").exists());
    // As the directory's owner instead, git runs with only that user's rights: no refusal
    // of the kind (git_runs_as_the_given_user shows such a clone through).
    let own = scene.www.join("own");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
    let out = git_state(json!({"path": own, "repo": up.path_url(), "revision": "main", "user": "nobody"})).await;
    assert!(!out.comment.contains("would run as root"), "{out:?}");
    scene.victim_untouched();
}

/// Whether the last apply fetched: `git fetch` (re)writes `.git/FETCH_HEAD`, which is
/// removed after looking.
fn fetched(checkout: &Path) -> bool {
    let fetch_head = checkout.join(".git/FETCH_HEAD");
    let was = fetch_head.exists();
    let _ = std::fs::remove_file(&fetch_head);
    was
}

#[tokio::test]
async fn git_converged_checkout_of_a_local_remote_is_told_from_its_files() {
    if !is_root() {
        common::skip("git_converged_checkout_of_a_local_remote_is_told_from_its_files: SKIPPED, needs root");
        return;
    }
    let up = GitUpstream::new("main");
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let repo = up.path_url();
    let state = json!({"path": path, "repo": repo, "revision": "main"});
    let c1 = head_of(&up.bare());
    assert_eq!(clone_change(&git_state(state.clone()).await, &path), format!("cloned at {} (branch main)", short(&c1)));
    fetched(&path);

    // Converged: the same outcome, without a fetch.
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path), "a converged checkout of a local remote was fetched");
    // The remote moves on: seen in its refs, then fetched and followed.
    let c2 = up.commit("README", "two\n");
    let out = git_state(state.clone()).await;
    assert_eq!(only_change(&out, &path), format!("revision {} -> {} (branch main)", short(&c1), short(&c2)));
    assert!(fetched(&path));
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path));
    // The default revision on a remote without master: the same note as the full apply.
    let out = git_state(json!({"path": path, "repo": repo})).await;
    assert!(out.result && out.changes.is_empty(), "{out:?}");
    assert!(out.comment.contains("following its default branch main"), "{out:?}");
    assert!(!fetched(&path));
    // A lightweight tag and a full commit id of the commit the checkout is at: nothing
    // to do for the apply either (HEAD stays on the branch), told from the files.
    git_in(&up.work(), &["tag", "light"]);
    git_in(&up.work(), &["push", "--quiet", "origin", "light"]);
    assert_unchanged(&git_state(json!({"path": path, "repo": repo, "revision": "light"})).await);
    assert!(!fetched(&path));
    assert_unchanged(&git_state(json!({"path": path, "repo": repo, "revision": c2})).await);
    assert!(!fetched(&path));
    // An abbreviated id is left to git (only its object database can expand it).
    assert_unchanged(&git_state(json!({"path": path, "repo": repo, "revision": &c2[..10]})).await);
    assert!(fetched(&path));

    // A changed tracked file: the apply's refusal, word for word.
    std::fs::write(path.join("README"), "edited\n").unwrap();
    let out = git_state(state.clone()).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(out.comment, format!("{} has local changes (README); set force to discard them", path.display()));
    assert!(fetched(&path), "the refusal comes from the full apply");
    std::fs::write(path.join("README"), "two\n").unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path));
    // Another URL for origin: the full apply, which changes it.
    let file_url = format!("file://{repo}");
    let out = git_state(json!({"path": path, "repo": file_url, "revision": "main"})).await;
    assert_eq!(only_change(&out, &path), format!("remote origin {repo} -> {file_url}"));
    assert!(fetched(&path));
    assert_unchanged(&git_state(json!({"path": path, "repo": file_url, "revision": "main"})).await);
    assert!(!fetched(&path));
}

#[tokio::test]
async fn git_converged_check_never_reads_through_a_link_or_a_directory_another_user_controls() {
    if !is_root() {
        common::skip("git_converged_check_never_reads_through_a_link...: SKIPPED, needs root");
        return;
    }
    let up = GitUpstream::new("main");
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let state = json!({"path": path, "repo": up.path_url(), "revision": "main"});
    assert_ok(&git_state(state.clone()).await);
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path));
    let git = path.join(".git");
    let elsewhere = dest.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();

    // Links planted in `.git`, which git follows: the helper does not; the full apply
    // runs, with the same outcome. HEAD as a link to the branch's ref (git reads it as
    // `ref: refs/heads/main`), and the branch's ref as a link to a file with its id.
    std::fs::remove_file(git.join("HEAD")).unwrap();
    std::os::unix::fs::symlink("refs/heads/main", git.join("HEAD")).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(fetched(&path), "the check read .git/HEAD through a link");
    std::fs::remove_file(git.join("HEAD")).unwrap();
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    let branch = git.join("refs/heads/main");
    assert!(branch.is_file(), "the clone left a loose ref");
    std::fs::rename(&branch, elsewhere.join("local-main")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("local-main"), &branch).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(fetched(&path), "the check read .git/refs/heads/main through a link");
    std::fs::remove_file(&branch).unwrap();
    std::fs::rename(elsewhere.join("local-main"), &branch).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path));

    // The same in the remote: its branch ref a link to a file with the same id.
    let main = up.bare().join("refs/heads/main");
    assert!(main.is_file(), "the push left a loose ref");
    std::fs::rename(&main, elsewhere.join("main")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("main"), &main).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(fetched(&path), "the check read the remote's ref through a link");
    std::fs::remove_file(&main).unwrap();
    std::fs::rename(elsewhere.join("main"), &main).unwrap();

    // A directory of refs another user owns (they could swap what is in it).
    let heads = git.join("refs/heads");
    std::os::unix::fs::chown(&heads, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(fetched(&path), "the check read refs from a directory uid {NOBODY_UID} owns");
    std::os::unix::fs::chown(&heads, Some(0), Some(0)).unwrap();
    assert_unchanged(&git_state(state.clone()).await);
    assert!(!fetched(&path));
}

#[tokio::test]
async fn git_bad_parameters_fail_clearly() {
    let up = GitUpstream::new("main");
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");

    // Refused by the catalogue (the daemon's check and the helper's decoding alike).
    let err = parse_state("common.git", &json!({"path": "srv/app", "repo": up.path_url()})).unwrap_err();
    assert_eq!(err.to_string(), "common.git: parameter \"path\": path \"srv/app\" is not absolute");
    let err = parse_state("common.git", &json!({"path": "/srv/app"})).unwrap_err();
    assert_eq!(err.to_string(), "common.git: missing required parameter \"repo\"");

    // A repository that does not exist: git's own reason, and nothing cloned.
    let missing = dest.path().join("no-such-repo.git");
    let out = git_state(json!({"path": path, "repo": missing})).await;
    assert!(!out.result, "{out:?}");
    assert!(out.comment.contains("`/usr") && out.comment.contains(" clone "), "{out:?}");
    assert!(out.comment.contains("does not exist"), "{out:?}");

    // An unknown revision: the clone is made (and reported), nothing checked out, and
    // the next round with a good revision checks out without needing force.
    let out = git_state(json!({"path": path, "repo": up.path_url(), "revision": "nope"})).await;
    assert!(!out.result, "{out:?}");
    assert!(out.comment.starts_with("revision \"nope\" is not a branch, tag or commit of"), "{out:?}");
    assert_eq!(out.changes.last().unwrap().what, format!("cloned from {}; nothing checked out", up.path_url()));
    let out = git_state(json!({"path": path, "repo": up.path_url(), "revision": "main"})).await;
    assert!(only_change(&out, &path).starts_with("checked out at "), "{out:?}");
    assert_eq!(read(&path.join("README")), "one\n");

    // ssh in batch mode with the key: a refused connection fails at once, no prompt.
    // (In a directory only root controls: ssh run as root reads no key anyone else chose.)
    let keys = tempfile::Builder::new().prefix(".opsagent-test-keys").tempdir_in("/").unwrap();
    let key = keys.path().join("id_test");
    std::fs::write(&key, "not a key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = git_state(json!({
        "path": dest.path().join("ssh"),
        "repo": format!("ssh://git@127.0.0.1:{}/x.git", free_port()),
        "ssh-key-file": key,
    }))
    .await;
    assert!(!out.result && out.comment.contains("Connection refused"), "{out:?}");

    // A token in the URL stays out of the messages.
    let out = git_state(json!({"path": dest.path().join("tok"), "repo": format!("https://tok3n-s3cret@127.0.0.1:{}/x.git", free_port())})).await;
    assert!(!out.result, "{out:?}");
    assert!(!format!("{out:?}").contains("tok3n-s3cret"), "{out:?}");
}

#[tokio::test]
async fn git_runs_as_the_given_user() {
    if !is_root() {
        common::skip("git_runs_as_the_given_user: SKIPPED, needs root to run git as nobody");
        return;
    }
    let up = GitUpstream::new("main");
    // A repository owned by root: nobody reads it through the daemon (git refuses
    // other users' repositories on a path).
    let (_daemon, url) = up.serve().await;
    let dest = open_tempdir();
    let path = dest.path().join("apps/app");
    let state = json!({"path": path, "repo": url, "revision": "main", "user": "nobody"});
    let out = git_state(state.clone()).await;
    assert_ok(&out);
    for p in [path.clone(), path.join("README"), path.join(".git"), path.join(".git/HEAD")] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), NOBODY_UID, "{}", p.display());
    }
    // The parent made on the way is root's.
    assert_eq!(std::fs::metadata(dest.path().join("apps")).unwrap().uid(), 0);
    assert_unchanged(&git_state(state.clone()).await);
    up.commit("NEW", "new\n");
    let out = git_state(state).await;
    assert!(only_change(&out, &path).starts_with("revision "));
    assert_eq!(std::fs::metadata(path.join("NEW")).unwrap().uid(), NOBODY_UID);

    // A directory of another user is refused before git runs.
    let root_owned = dest.path().join("root-owned");
    std::fs::create_dir(&root_owned).unwrap();
    let out = git_state(json!({"path": root_owned, "repo": url, "user": "nobody"})).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "{} belongs to uid 0, but git runs as nobody (uid {NOBODY_UID}): give the directory to nobody or set `user` to its owner",
            root_owned.display()
        )
    );
}

#[tokio::test]
async fn a_preempted_git_clone_is_not_cut_in_half() {
    // A VCS update runs to its end when the round is preempted (issue 18 item 4: a
    // half-done checkout is worse than a late one); only its timeout bounds it. Here the
    // "server" accepts and answers nothing until the test lets it hang up.
    need("git", "git");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let (hang_up_tx, mut hang_up_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let _ = accepted_tx.send(());
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                // Told to hang up: git sees the end of the stream and fails.
                _ = &mut hang_up_rx => return "hung up",
                r = tokio::io::AsyncReadExt::read(&mut conn, &mut buf) => match r {
                    Ok(0) | Err(_) => return "client gone",
                    Ok(_) => {}
                },
            }
        }
    });
    let dest = tempfile::tempdir().unwrap();
    let p = CommonGit::try_from(params(
        "common.git",
        json!({"path": dest.path().join("app"), "repo": format!("git://127.0.0.1:{port}/x.git")}),
    ))
    .unwrap();
    let (canceller, cancel) = cancel::pair();
    let mut state = tokio::spawn(async move { git::apply(&p, cancel).await });
    tokio::time::timeout(Duration::from_secs(20), accepted_rx).await.unwrap().unwrap();
    canceller.cancel();
    // Preempted, git is still connected and the state still runs.
    assert!(tokio::time::timeout(Duration::from_secs(2), &mut state).await.is_err(), "git was cut by the preemption");
    assert!(!server.is_finished(), "git hung up after the preemption");
    hang_up_tx.send(()).unwrap();
    assert_eq!(server.await.unwrap(), "hung up");
    let out = tokio::time::timeout(Duration::from_secs(20), state).await.expect("git ends with its server").unwrap();
    assert!(!out.result, "{out:?}");
}

// ----------------------------------------------------------------------------- hg

/// Mercurial writes caches into a local repository it reads; as root, a repository
/// another user controls could have `.hg/cache` pointed anywhere. Refused, in a plan and
/// in an apply, naming the repository; nothing cloned.
#[tokio::test]
async fn hg_as_root_refuses_a_local_repository_another_user_controls() {
    let up = HgUpstream::new();
    sh(Command::new("chown").args(["-R", "65534:65534"]).arg(up.repo()));
    let dest = open_tempdir();
    let path = dest.path().join("app");
    for repo in [up.repo().display().to_string(), format!("file://{}", up.repo().display())] {
        let state = json!({"path": path, "repo": repo, "revision": "default"});
        for out in [hg_state(state.clone()).await, plan_of("common.hg", hg_state(state)).await] {
            assert!(!out.result, "{out:?}");
            assert!(out.comment.contains("hg would run as root in") && out.comment.contains("/up"), "{out:?}");
            assert!(!path.exists(), "cloned from a repository nobody owns");
        }
    }
}

struct HgUpstream {
    dir: tempfile::TempDir,
}

impl HgUpstream {
    fn new() -> Self {
        need("hg", "mercurial");
        let dir = open_tempdir();
        sh(Command::new("hg").args(["init", "up"]).current_dir(dir.path()));
        let up = Self { dir };
        up.commit("README", "one\n");
        up
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("up")
    }

    fn hg(&self, args: &[&str]) -> String {
        sh(Command::new("hg")
            .args(args)
            .current_dir(self.repo())
            .env("HGPLAIN", "1")
            .env("HGUSER", "Test <t@example.com>"))
    }

    fn commit(&self, file: &str, content: &str) -> String {
        std::fs::write(self.repo().join(file), content).unwrap();
        self.hg(&["add", "-q", file]);
        self.hg(&["commit", "-q", "-m", &format!("{file}: {content}")]);
        self.tip()
    }

    fn tip(&self) -> String {
        self.hg(&["log", "-r", "tip", "-T", "{node}"])
    }

    async fn serve(&self) -> (Server, String) {
        let port = free_port();
        let repo = self.repo().display().to_string();
        let server = Server::start(
            Command::new("hg").args(["serve", "-R", &repo, "-a", "127.0.0.1", "-p", &port.to_string()]),
            port,
        )
        .await;
        (server, format!("http://127.0.0.1:{port}/"))
    }
}

fn hg_parent(dir: &Path) -> String {
    sh(Command::new("hg").args(["log", "-r", ".", "-T", "{node}"]).current_dir(dir).env("HGPLAIN", "1"))
}

#[tokio::test]
async fn hg_clones_follows_pins_and_forces() {
    let up = HgUpstream::new();
    let (_server, url) = up.serve().await;
    let n1 = up.tip();
    let dest = tempfile::tempdir().unwrap();
    let served = dest.path().join("served");
    let local = dest.path().join("local");

    // The default revision `default`, over http and from a path.
    for (repo, path) in [(url.clone(), &served), (up.repo().display().to_string(), &local)] {
        let out = hg_state(json!({"path": path, "repo": repo})).await;
        assert_eq!(clone_change(&out, path), format!("cloned at {} (default)", short(&n1)));
        assert_eq!(read(&path.join("README")), "one\n");
        assert_unchanged(&hg_state(json!({"path": path, "repo": repo})).await);
    }
    let n2 = up.commit("README", "two\n");
    let out = hg_state(json!({"path": served, "repo": url})).await;
    assert_eq!(only_change(&out, &served), format!("revision {} -> {} (default)", short(&n1), short(&n2)));
    assert_eq!(read(&served.join("README")), "two\n");
    assert_unchanged(&hg_state(json!({"path": served, "repo": url})).await);

    // A tag stays where it is; so does a node id (the older spelling `branch` works).
    up.hg(&["tag", "-r", &n1, "v1"]);
    let out = hg_state(json!({"path": served, "repo": url, "revision": "v1"})).await;
    assert_eq!(only_change(&out, &served), format!("revision {} -> {} (v1)", short(&n2), short(&n1)));
    up.commit("README", "three\n");
    assert_unchanged(&hg_state(json!({"path": served, "repo": url, "revision": "v1"})).await);
    let out = hg_state(json!({"path": served, "repo": url, "branch": &n2[..10]})).await;
    assert_eq!(only_change(&out, &served), format!("revision {} -> {} ({})", short(&n1), short(&n2), &n2[..10]));
    up.commit("other", "x\n");
    assert_unchanged(&hg_state(json!({"path": served, "repo": url, "branch": &n2[..10]})).await);
    assert_eq!(hg_parent(&served), n2);

    // Local changes: refused without force, discarded with it.
    std::fs::write(served.join("README"), "edited\n").unwrap();
    let out = hg_state(json!({"path": served, "repo": url})).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(out.comment, format!("{} has local changes (README); set force to discard them", served.display()));
    assert_eq!(read(&served.join("README")), "edited\n");
    let out = hg_state(json!({"path": served, "repo": url, "force": true})).await;
    assert_ok(&out);
    let tip = up.tip();
    let p = served.display().to_string();
    assert_eq!(
        out.changes,
        [
            Change::new(&p, "local changes discarded (README; force is set)"),
            Change::new(&p, format!("revision {} -> {} (default)", short(&n2), short(&tip))),
        ]
    );
    assert_eq!(read(&served.join("README")), "three\n");
    assert_unchanged(&hg_state(json!({"path": served, "repo": url, "force": true})).await);

    let out = hg_state(json!({"path": served, "repo": url, "revision": "no-such-branch"})).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(
        out.comment,
        format!("revision \"no-such-branch\" is not a branch, bookmark, tag or changeset of {url} (branches: default)")
    );
}

/// Whether `tool` is here; if not, the test says so and is skipped (a failure where
/// `OPSAGENT_TEST_NO_SKIP` is set).
fn have(test: &str, tool: &str, package: &str) -> bool {
    if find_tool(tool, &[]).is_some() {
        return true;
    }
    common::skip(&format!("{test}: SKIPPED, {tool} is missing (apt-get install -y {package})"));
    false
}

/// A plan of a state as the helper's dispatch makes it (in a plan context, the outcome
/// marked planned); the module must not have stopped at a write.
async fn plan_of(module: &str, work: impl std::future::Future<Output = Outcome>) -> Outcome {
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), work).await;
    assert_eq!(plan.refused(), None, "the plan of {module} stopped at a write: {out:?}");
    opsagent_helper::states::planned(out, None, module)
}

#[track_caller]
fn assert_nothing_planned(out: &Outcome) {
    assert!(out.planned && out.result && out.changes.is_empty(), "expected no change: {out:?}");
    assert!(out.comment.contains("already as wanted"), "{out:?}");
}

#[tokio::test]
async fn hg_plan_apply_plan_cycle_writes_nothing_and_says_what_the_apply_says() {
    const TEST: &str = "hg_plan_apply_plan_cycle_writes_nothing_and_says_what_the_apply_says";
    if !have(TEST, "hg", "mercurial") {
        return;
    }
    let up = HgUpstream::new();
    up.commit("other", "x\n");
    let n1 = up.tip();
    let dest = tempfile::tempdir().unwrap();
    let parent = dest.path().join("new");
    let path = parent.join("app");
    let repo = format!("file://{}", up.repo().display());
    let state = |rev: &str, force: bool| json!({"path": path, "repo": repo, "revision": rev, "force": force});
    let plan = |raw: Value| plan_of("common.hg", hg_state(raw));

    // Missing: the plan names the clone and creates nothing; the apply says the same.
    let planned = plan(state("default", false)).await;
    assert_eq!(clone_change(&planned, &path), format!("cloned at {} (default)", short(&n1)));
    assert!(!parent.exists(), "the plan created {}", parent.display());
    assert_eq!(hg_state(state("default", false)).await.changes, planned.changes);

    // Converged, right after the update (file times not yet recorded in .hg/dirstate,
    // where `hg status` would record them): nothing, and nothing written.
    let before = tree_sum(&path);
    assert_nothing_planned(&plan(state("default", false)).await);
    assert_eq!(tree_sum(&path), before, "a plan of a converged clone wrote into it");

    // The remote moves on: the plan names the apply's change and pulls nothing.
    let n2 = up.commit("README", "two\n");
    let want = format!("revision {} -> {} (default)", short(&n1), short(&n2));
    assert_eq!(only_change(&plan(state("default", false)).await, &path), want);
    assert_eq!(tree_sum(&path), before, "the plan wrote into the clone");
    assert_eq!(only_change(&hg_state(state("default", false)).await, &path), want);
    assert_nothing_planned(&plan(state("default", false)).await);

    // A tag, with the repository given as a plain path (resolved as a revset literal).
    up.hg(&["tag", "-r", &n1, "v-1.0"]);
    let by_path = json!({"path": path, "repo": up.repo(), "revision": "v-1.0"});
    let before = tree_sum(&path);
    let want = format!("revision {} -> {} (v-1.0)", short(&n2), short(&n1));
    assert_eq!(only_change(&plan(by_path.clone()).await, &path), want);
    assert_eq!(tree_sum(&path), before);
    assert_eq!(only_change(&hg_state(by_path.clone()).await, &path), want);
    assert_nothing_planned(&plan(by_path).await);
    let out = plan(state("no-such-branch", false)).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert!(
        out.comment.starts_with("revision \"no-such-branch\" is not a branch, bookmark, tag or changeset"),
        "{out:?}"
    );

    // Local changes: a same-size edit whose time moved (only the content tells) and a
    // deleted file. Without force the plan gives the apply's refusal; with force, the
    // apply's changes.
    std::fs::write(path.join("README"), "on3\n").unwrap();
    sh(Command::new("touch").args(["-d", "2001-01-01 00:00:00"]).arg(path.join("README")));
    std::fs::remove_file(path.join("other")).unwrap();
    let before = tree_sum(&path);
    let planned = plan(state("default", false)).await;
    assert_eq!(tree_sum(&path), before);
    let applied = hg_state(state("default", false)).await;
    assert!(!planned.result && !applied.result && planned.changes.is_empty(), "{planned:?}");
    assert_eq!(planned.comment, applied.comment);
    assert_eq!(
        planned.comment,
        format!("{} has local changes (README, other); set force to discard them", path.display())
    );
    // (The refused apply pulled first; the plan after it writes nothing either.)
    let before = tree_sum(&path);
    let tip = up.tip();
    let p = path.display().to_string();
    let want = [
        Change::new(&p, "local changes discarded (README, other; force is set)"),
        Change::new(&p, format!("revision {} -> {} (default)", short(&n1), short(&tip))),
    ];
    assert_eq!(plan(state("default", true)).await.changes, want);
    assert_eq!(tree_sum(&path), before);
    assert_eq!(hg_state(state("default", true)).await.changes, want);
    assert_nothing_planned(&plan(state("default", true)).await);
    assert_eq!(read(&path.join("README")), "two\n");
}

/// What the plan cannot read itself it names as a step it would take, and why: a file
/// changed at its recorded size but too large to compare, a dirstate in format v2.
#[tokio::test]
async fn hg_plan_says_would_run_where_it_cannot_read_the_clone() {
    const TEST: &str = "hg_plan_says_would_run_where_it_cannot_read_the_clone";
    if !have(TEST, "hg", "mercurial") {
        return;
    }
    let up = HgUpstream::new();
    let big = "x".repeat(20_000);
    let tip = up.commit("big", &big);
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("app");
    let state = json!({"path": path, "repo": up.repo()});
    assert_ok(&hg_state(state.clone()).await);
    assert_unchanged(&hg_state(state.clone()).await);
    // Same size, another time: only a comparison of the content could tell.
    std::fs::write(path.join("big"), "y".repeat(20_000)).unwrap();
    // (Another second than any hg recorded, whenever the test runs.)
    sh(Command::new("touch").args(["-d", "2001-01-01 00:00:00"]).arg(path.join("big")));
    let before = tree_sum(&path);
    let out = plan_of("common.hg", hg_state(state.clone())).await;
    assert_eq!(
        only_change(&out, &path),
        format!(
            "would run hg status, then update to {} (default): big changed on disk at its recorded size, and only hg \
             status compares a file that large (it records what it found in .hg/dirstate)",
            short(&tip)
        )
    );
    assert_eq!(tree_sum(&path), before);
    let requires = path.join(".hg/requires");
    std::fs::write(&requires, format!("{}dirstate-v2\n", read(&requires))).unwrap();
    let before = tree_sum(&path);
    let out = plan_of("common.hg", hg_state(state)).await;
    assert_eq!(
        only_change(&out, &path),
        format!(
            "would run hg status, then update to {} (default): this clone's .hg/dirstate is not in the format the \
             plan reads",
            short(&tip)
        )
    );
    assert_eq!(tree_sum(&path), before);
}

#[tokio::test]
async fn hg_runs_as_the_given_user() {
    if !is_root() {
        common::skip("hg_runs_as_the_given_user: SKIPPED, needs root to run hg as nobody");
        return;
    }
    let up = HgUpstream::new();
    let (_server, url) = up.serve().await;
    let dest = open_tempdir();
    let path = dest.path().join("app");
    let state = json!({"path": path, "repo": url, "user": "nobody"});
    let out = hg_state(state.clone()).await;
    assert!(clone_change(&out, &path).starts_with("cloned at "));
    for p in [path.clone(), path.join("README"), path.join(".hg")] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), NOBODY_UID, "{}", p.display());
    }
    assert_unchanged(&hg_state(state).await);
}

// ---------------------------------------------------------------------------- svn

const SVN_USER: &str = "alice";
const SVN_PASSWORD: &str = "Pa55-w0rd-xyz";

/// A repository with `trunk/README` (r1) and `other/` (r2), served by svnserve with a
/// password file and no anonymous access; a file:// working copy makes commits.
struct SvnUpstream {
    dir: tempfile::TempDir,
    _server: Server,
    port: u16,
}

impl SvnUpstream {
    async fn new() -> Self {
        need("svn", "subversion");
        need("svnserve", "subversion");
        let dir = open_tempdir();
        let d = dir.path();
        sh(Command::new("svnadmin").args(["create", "repo"]).current_dir(d));
        std::fs::write(
            d.join("repo/conf/svnserve.conf"),
            "[general]\nanon-access = none\nauth-access = write\npassword-db = passwd\nrealm = test\n",
        )
        .unwrap();
        std::fs::write(d.join("repo/conf/passwd"), format!("[users]\n{SVN_USER} = {SVN_PASSWORD}\n")).unwrap();
        let port = free_port();
        let root = d.display().to_string();
        let server = Server::start(
            Command::new("svnserve").args([
                "-d",
                "--foreground",
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                &port.to_string(),
                "-r",
                &root,
            ]),
            port,
        )
        .await;
        let d = d.to_path_buf();
        let up = Self { dir, _server: server, port };
        up.svn(&["checkout", "-q", &format!("file://{root}/repo"), &d.join("work").display().to_string()]);
        std::fs::create_dir_all(d.join("work/trunk")).unwrap();
        std::fs::create_dir_all(d.join("work/other")).unwrap();
        std::fs::write(d.join("work/trunk/README"), "one\n").unwrap();
        up.svn_work(&["add", "-q", "trunk"]);
        up.svn_work(&["commit", "-q", "-m", "r1"]);
        up.svn_work(&["add", "-q", "other"]);
        up.svn_work(&["commit", "-q", "-m", "r2"]);
        up
    }

    fn svn(&self, args: &[&str]) -> String {
        sh(Command::new("svn").args(["--non-interactive"]).args(args).current_dir(self.dir.path()))
    }

    fn svn_work(&self, args: &[&str]) -> String {
        sh(Command::new("svn").args(["--non-interactive"]).args(args).current_dir(self.dir.path().join("work")))
    }

    /// Commits `content` to `file` (relative to the repository root); the new revision.
    fn commit(&self, file: &str, content: &str) -> u64 {
        let path = self.dir.path().join("work").join(file);
        let new = !path.exists();
        std::fs::write(&path, content).unwrap();
        if new {
            self.svn_work(&["add", "-q", file]);
        }
        self.svn_work(&["commit", "-q", "-m", &format!("commit {file}")]);
        self.svn_work(&["update", "-q"]);
        self.svn_work(&["info", "--show-item", "revision"]).parse().unwrap()
    }

    fn trunk(&self) -> String {
        format!("svn://127.0.0.1:{}/repo/trunk", self.port)
    }
}

fn assert_no_password(out: &Outcome, password: &str) {
    let text = format!("{} {} {:?}", out.comment, out.stdout, out.changes);
    assert!(!text.contains(password), "the password leaked: {out:?}");
}

/// `--no-auth-cache`: nothing under root's `~/.subversion/auth` holds the password.
fn assert_password_not_cached() {
    fn walk(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p);
            } else {
                let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()).into_owned();
                assert!(!text.contains(SVN_PASSWORD), "{} holds the password", p.display());
            }
        }
    }
    let home = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().dir;
    walk(&home.join(".subversion/auth"));
}

#[tokio::test]
async fn svn_checks_out_with_credentials_and_follows_head() {
    let up = SvnUpstream::new().await;
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("wc");
    let state = |rev: &str, force: bool| json!({"path": path, "repo": up.trunk(), "username": SVN_USER, "password": SVN_PASSWORD, "revision": rev, "force": force});

    // Without credentials, or with a wrong password: a failure, never a prompt.
    let out = svn_state(json!({"path": path, "repo": up.trunk()})).await;
    assert!(!out.result, "{out:?}");
    let wrong = "Wr0ng-pa55word";
    let out = svn_state(json!({"path": path, "repo": up.trunk(), "username": SVN_USER, "password": wrong})).await;
    assert!(!out.result && out.comment.contains("svn"), "{out:?}");
    assert_no_password(&out, wrong);

    // HEAD (the default) is the last change of trunk: r1, although the repository is at r2.
    let out = svn_state(state("", false)).await;
    assert_eq!(only_change(&out, &path), "checked out at r1");
    assert_no_password(&out, SVN_PASSWORD);
    assert_eq!(read(&path.join("README")), "one\n");
    assert_password_not_cached();
    assert_unchanged(&svn_state(state("HEAD", false)).await);
    // A commit elsewhere in the repository moves nothing.
    up.commit("other/file", "x\n");
    assert_unchanged(&svn_state(state("HEAD", false)).await);
    let r4 = up.commit("trunk/README", "two\n");
    let out = svn_state(state("head", false)).await;
    assert_eq!(only_change(&out, &path), format!("revision r1 -> r{r4}"));
    assert_no_password(&out, SVN_PASSWORD);
    assert_eq!(read(&path.join("README")), "two\n");
    assert_unchanged(&svn_state(state("HEAD", false)).await);

    // A number stays; BASE keeps what is there; PREV is one change behind HEAD.
    let out = svn_state(state("r1", false)).await;
    assert_eq!(only_change(&out, &path), format!("revision r{r4} -> r1"));
    let r5 = up.commit("trunk/README", "three\n");
    assert_unchanged(&svn_state(state("1", false)).await);
    assert_unchanged(&svn_state(state("BASE", false)).await);
    assert_unchanged(&svn_state(state("COMMITED", false)).await);
    let out = svn_state(state("PREV", false)).await;
    assert_eq!(only_change(&out, &path), format!("revision r1 -> r{}", r5 - 1));
    assert_eq!(read(&path.join("README")), "two\n");
    assert_unchanged(&svn_state(state("PREV", false)).await);

    // Local changes: refused without force, reverted with it.
    std::fs::write(path.join("README"), "edited\n").unwrap();
    let out = svn_state(state("HEAD", false)).await;
    assert!(!out.result, "{out:?}");
    assert_eq!(out.comment, format!("{} has local changes (README); set force to discard them", path.display()));
    let out = svn_state(state("HEAD", true)).await;
    assert_ok(&out);
    let p = path.display().to_string();
    assert_eq!(
        out.changes,
        [
            Change::new(&p, "local changes discarded (README; force is set)"),
            Change::new(&p, format!("revision r{} -> r{r5}", r5 - 1)),
        ]
    );
    assert_eq!(read(&path.join("README")), "three\n");
    assert_no_password(&out, SVN_PASSWORD);
    assert_unchanged(&svn_state(state("HEAD", true)).await);

    // Another URL of the same repository: switched.
    let other = format!("svn://127.0.0.1:{}/repo/other", up.port);
    let out = svn_state(json!({"path": path, "repo": other, "username": SVN_USER, "password": SVN_PASSWORD})).await;
    assert_ok(&out);
    assert_eq!(out.changes[0], Change::new(&p, format!("url {} -> {other}", up.trunk())));
    assert!(path.join("file").exists() && !path.join("README").exists());

    // An `@` in the path is not taken for a peg revision.
    let at = dest.path().join("wc@2");
    let at_state = json!({"path": at, "repo": up.trunk(), "username": SVN_USER, "password": SVN_PASSWORD});
    assert_eq!(clone_change(&svn_state(at_state.clone()).await, &at), format!("checked out at r{r5}"));
    assert_unchanged(&svn_state(at_state).await);

    let out = svn_state(state("trunk", false)).await;
    assert!(out.comment.starts_with("parameter revision: \"trunk\": expected HEAD, BASE, COMMITTED, PREV"), "{out:?}");
}

#[tokio::test]
async fn svn_runs_as_the_given_user() {
    if !is_root() {
        common::skip("svn_runs_as_the_given_user: SKIPPED, needs root to run svn as nobody");
        return;
    }
    let up = SvnUpstream::new().await;
    let dest = open_tempdir();
    let path = dest.path().join("wc");
    let state =
        json!({"path": path, "repo": up.trunk(), "username": SVN_USER, "password": SVN_PASSWORD, "user": "nobody"});
    let out = svn_state(state.clone()).await;
    assert_eq!(clone_change(&out, &path), "checked out at r1");
    for p in [path.clone(), path.join("README"), path.join(".svn")] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), NOBODY_UID, "{}", p.display());
    }
    assert_unchanged(&svn_state(state).await);
}

/// A repository on a local path (`svnadmin create`, reached as `file://`): `trunk/README`
/// (r1) and `other/file` (r2).
struct SvnLocal {
    dir: tempfile::TempDir,
}

impl SvnLocal {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        sh(Command::new("svnadmin").args(["create", "repo"]).current_dir(&d));
        let up = Self { dir };
        up.svn(&["checkout", "-q", &up.url(""), "work"]);
        std::fs::create_dir_all(d.join("work/trunk")).unwrap();
        std::fs::write(d.join("work/trunk/README"), "one\n").unwrap();
        up.svn(&["add", "-q", "work/trunk"]);
        up.svn(&["commit", "-q", "-m", "r1", "work"]);
        std::fs::create_dir_all(d.join("work/other")).unwrap();
        std::fs::write(d.join("work/other/file"), "x\n").unwrap();
        up.svn(&["add", "-q", "work/other"]);
        up.svn(&["commit", "-q", "-m", "r2", "work"]);
        up
    }

    fn url(&self, dir: &str) -> String {
        format!("file://{}/repo/{dir}", self.dir.path().display())
    }

    fn svn(&self, args: &[&str]) -> String {
        sh(Command::new("svn").args(["--non-interactive"]).args(args).current_dir(self.dir.path()))
    }

    /// Commits `content` to `file` under the repository root; the new revision.
    fn commit(&self, file: &str, content: &str) -> u64 {
        std::fs::write(self.dir.path().join("work").join(file), content).unwrap();
        self.svn(&["commit", "-q", "-m", file, "work"]);
        self.svn(&["update", "-q", "work"]);
        self.svn(&["info", "--show-item", "revision", "work"]).parse().unwrap()
    }
}

#[tokio::test]
async fn svn_plan_apply_plan_cycle_writes_nothing_and_says_what_the_apply_says() {
    const TEST: &str = "svn_plan_apply_plan_cycle_writes_nothing_and_says_what_the_apply_says";
    if !have(TEST, "svn", "subversion") || !have(TEST, "svnadmin", "subversion") {
        return;
    }
    let up = SvnLocal::new();
    let dest = tempfile::tempdir().unwrap();
    let parent = dest.path().join("new");
    let path = parent.join("wc");
    let trunk = up.url("trunk");
    let state =
        |repo: &str, rev: &str, force: bool| json!({"path": path, "repo": repo, "revision": rev, "force": force});
    let plan = |raw: Value| plan_of("common.svn", svn_state(raw));

    // Missing: the plan names the checkout and creates nothing; the apply says the same.
    let planned = plan(state(&trunk, "HEAD", false)).await;
    assert_eq!(clone_change(&planned, &path), "checked out at r1");
    assert!(!parent.exists(), "the plan created {}", parent.display());
    assert_eq!(svn_state(state(&trunk, "HEAD", false)).await.changes, planned.changes);

    // Converged: nothing, and nothing written (`.svn` included).
    let before = tree_sum(&path);
    assert_nothing_planned(&plan(state(&trunk, "HEAD", false)).await);
    assert_eq!(tree_sum(&path), before, "a plan of a converged working copy wrote into it");

    // The repository moves on: the plan names the update and runs none.
    let r3 = up.commit("trunk/README", "two\n");
    let want = format!("revision r1 -> r{r3}");
    assert_eq!(only_change(&plan(state(&trunk, "HEAD", false)).await, &path), want);
    assert_eq!(tree_sum(&path), before, "the plan wrote into the working copy");
    assert_eq!(only_change(&svn_state(state(&trunk, "HEAD", false)).await, &path), want);
    assert_nothing_planned(&plan(state(&trunk, "HEAD", false)).await);

    // A fixed revision (read with `svn info URL@REV`).
    let before = tree_sum(&path);
    let want = format!("revision r{r3} -> r1");
    assert_eq!(only_change(&plan(state(&trunk, "r1", false)).await, &path), want);
    assert_eq!(tree_sum(&path), before);
    assert_eq!(only_change(&svn_state(state(&trunk, "r1", false)).await, &path), want);
    assert_nothing_planned(&plan(state(&trunk, "1", false)).await);

    // Local changes: the apply's refusal without force, its changes with it.
    std::fs::write(path.join("README"), "edited\n").unwrap();
    let before = tree_sum(&path);
    let planned = plan(state(&trunk, "HEAD", false)).await;
    assert_eq!(tree_sum(&path), before);
    let applied = svn_state(state(&trunk, "HEAD", false)).await;
    assert!(!planned.result && !applied.result && planned.changes.is_empty(), "{planned:?}");
    assert_eq!(planned.comment, applied.comment);
    assert_eq!(planned.comment, format!("{} has local changes (README); set force to discard them", path.display()));
    let p = path.display().to_string();
    let want = [
        Change::new(&p, "local changes discarded (README; force is set)"),
        Change::new(&p, format!("revision r1 -> r{r3}")),
    ];
    assert_eq!(plan(state(&trunk, "HEAD", true)).await.changes, want);
    assert_eq!(tree_sum(&path), before);
    assert_eq!(svn_state(state(&trunk, "HEAD", true)).await.changes, want);
    assert_nothing_planned(&plan(state(&trunk, "HEAD", true)).await);
    assert_eq!(read(&path.join("README")), "two\n");

    // Another directory of the repository: the switch, then nothing.
    let other = up.url("other");
    let before = tree_sum(&path);
    let want = [Change::new(&p, format!("url {trunk} -> {other}")), Change::new(&p, format!("revision r{r3} -> r2"))];
    assert_eq!(plan(state(&other, "HEAD", false)).await.changes, want);
    assert_eq!(tree_sum(&path), before);
    assert_eq!(svn_state(state(&other, "HEAD", false)).await.changes, want);
    assert_nothing_planned(&plan(state(&other, "HEAD", false)).await);
    assert!(path.join("file").exists() && !path.join("README").exists());
}
