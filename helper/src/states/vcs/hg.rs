//! `common.hg`: a Mercurial clone at `path` kept at `revision` (default `default`, the
//! default branch; the older spellings `rev` and `branch` are read by the catalogue).
//!
//! Every round pulls from `repo` (`hg pull REPO`, the URL given each time: a changed
//! `repo` is used from the next round on, while the clone's `.hg/hgrc` keeps the one
//! it was made from), then resolves `revision` in the clone as Mercurial does for
//! `hg update -r`: a bookmark, tag, branch name (its newest head) or a node id
//! (prefix). It is passed to Mercurial as a quoted revset literal, so names such as
//! `feature-x` or `1.0` are never read as revset expressions. The working directory
//! is updated only when its parent differs: a branch or bookmark follows the remote, a
//! tag or node id stays fixed.
//!
//! Conflicts: uncommitted changes (`hg status --modified --added --removed
//! --deleted`), refused without `force` and discarded with it (`hg update --clean`);
//! untracked files are left alone. Local commits are not looked for: a clone that is
//! committed to is not one this state manages.
//!
//! Mercurial never prompts: `--noninteractive`, `HGPLAIN=1` (no user aliases, stable
//! output), `ui.merge=internal:fail` (never a merge tool), and ssh in batch mode.

use std::path::Path;

use opsagent_proto::catalogue::CommonHg;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use super::{
    checkout_dir, describe_files, inspect, mask_url, prepare, repo_param, revision_param, run, short, ssh_command,
    url_secret, Runner, VcsError, TRANSFER_TIMEOUT,
};
use crate::cancel::Cancel;
use crate::exec::Exit;

/// states.md's default `revision`: the default branch.
pub const DEFAULT_REVISION: &str = "default";
/// The parent of a working directory that has nothing checked out.
const NULL_NODE: &str = "0000000000000000000000000000000000000000";

pub async fn apply(p: &CommonHg, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = sync(p, &mut changes, &mut cancel).await;
    let secrets: Vec<&str> = url_secret(p.repo.trim()).into_iter().collect();
    super::outcome(&p.path.0, result, changes, &[], &secrets)
}

/// A revset string literal: whatever the revision contains, Mercurial looks it up as
/// one symbol (name or node prefix).
pub fn revset_literal(rev: &str) -> String {
    format!("'{}'", rev.replace('\\', r"\\").replace('\'', r"\'"))
}

/// Paths of `hg status` lines (`M path`).
pub fn changed_files(status: &str) -> Vec<String> {
    status.lines().filter_map(|l| l.get(2..)).map(str::to_string).filter(|p| !p.is_empty()).collect()
}

async fn sync(p: &CommonHg, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), VcsError> {
    let path = checkout_dir(&p.path)?;
    let repo = repo_param(&p.repo)?;
    let wanted = revision_param(&p.revision, DEFAULT_REVISION)?;
    let runner =
        Runner::new("hg", "mercurial", p.user.as_deref())?.with_env("HGPLAIN", "1").with_env("HGENCODING", "utf-8");
    let existing = inspect(&path, ".hg", &runner)?;
    let fresh = prepare(&path, &existing, p.force, &runner, changes)?;
    let mut hg = Hg { runner, path, repo, cancel };
    let path = hg.path.to_string();
    if fresh {
        let repo = hg.repo.clone();
        hg.remote(&["clone", "--quiet", "--noupdate", "--", &repo, &path], Path::new("/")).await?;
        let target = match hg.resolve(&wanted).await {
            Ok(t) => t,
            Err(e) => {
                changes.push(Change::new(&path, format!("cloned from {}; nothing checked out", mask_url(&repo))));
                return Err(e);
            }
        };
        hg.remote(&["update", "--quiet", "--clean", "-r", &target], hg.path.clone().as_path()).await?;
        changes.push(Change::new(&path, format!("cloned at {} ({wanted})", short(&target))));
        return Ok(());
    }

    let repo = hg.repo.clone();
    hg.remote(&["pull", "--quiet", "--", &repo], hg.path.clone().as_path()).await?;
    let target = hg.resolve(&wanted).await?;
    let parent = hg.local(&["log", "-r", ".", "-T", "{node}"]).await?;
    let parent = Some(parent).filter(|n| n != NULL_NODE);
    let dirty = changed_files(&hg.local(&["status", "--modified", "--added", "--removed", "--deleted"]).await?);
    if !dirty.is_empty() && !p.force {
        return Err(VcsError::LocalChanges { path: hg.path.clone(), files: describe_files(&dirty) });
    }
    if parent.as_deref() == Some(target.as_str()) && dirty.is_empty() {
        return Ok(());
    }
    let mut args = vec!["update", "--quiet", "-r", &target];
    if p.force {
        args.push("--clean");
    }
    hg.remote(&args, hg.path.clone().as_path()).await?;
    if !dirty.is_empty() {
        changes.push(Change::new(&path, format!("local changes discarded ({}; force is set)", describe_files(&dirty))));
    }
    match parent.as_deref() {
        Some(old) if old == target => {}
        Some(old) => {
            changes.push(Change::new(&path, format!("revision {} -> {} ({wanted})", short(old), short(&target))))
        }
        None => changes.push(Change::new(&path, format!("checked out at {} ({wanted})", short(&target)))),
    }
    Ok(())
}

struct Hg<'a> {
    runner: Runner,
    path: AbsPath,
    repo: String,
    cancel: &'a mut Cancel,
}

impl Hg<'_> {
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = ["--noninteractive", "--config", "ui.merge=internal:fail", "--config"]
            .into_iter()
            .map(String::from)
            .collect();
        all.push(format!("ui.ssh={}", ssh_command(None)));
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    async fn local(&mut self, args: &[&str]) -> Result<String, VcsError> {
        let spec = self.runner.local(self.args(args), self.path.as_path());
        Ok(run(&spec, &[0], self.cancel).await?.output.trim().to_string())
    }

    /// A command that may talk to the remote or write the whole working directory.
    async fn remote(&mut self, args: &[&str], cwd: &Path) -> Result<String, VcsError> {
        let spec = self.runner.spec(self.args(args), cwd, TRANSFER_TIMEOUT);
        Ok(run(&spec, &[0], self.cancel).await?.output.trim().to_string())
    }

    /// The full node id `wanted` names in the clone.
    async fn resolve(&mut self, wanted: &str) -> Result<String, VcsError> {
        let literal = revset_literal(wanted);
        let spec = self.runner.local(self.args(&["log", "-r", &literal, "-T", "{node}\n"]), self.path.as_path());
        let found = run(&spec, &[0, 255], self.cancel).await?;
        let node = found.output.lines().last().unwrap_or("").trim().to_string();
        if found.exit == Exit::Code(0) && node.len() == 40 && node.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(node);
        }
        if found.exit == Exit::Code(0) {
            return Err(VcsError::Unexpected { command: spec.display(), output: found.output });
        }
        let branches = self.local(&["branches", "-T", "{branch}\n"]).await?;
        let branches: Vec<&str> = branches.lines().map(str::trim).filter(|b| !b.is_empty()).collect();
        let known = if branches.is_empty() {
            " (it has no commits)".to_string()
        } else {
            format!(" (branches: {})", branches.join(", "))
        };
        Err(VcsError::NoRevision {
            revision: wanted.to_string(),
            expected: "a branch, bookmark, tag or changeset",
            repo: mask_url(&self.repo),
            known,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literals_and_status() {
        assert_eq!(revset_literal("feature-x"), "'feature-x'");
        assert_eq!(revset_literal(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(changed_files("M a.txt\n! gone\nA new file\n"), ["a.txt", "gone", "new file"]);
    }

    #[tokio::test]
    async fn bad_parameters_fail_clearly() {
        crate::states::testutil::refused("common.hg", json!({"path": "rel", "repo": "/srv/r"}), "parameter \"path\"");
        crate::states::testutil::refused("common.hg", json!({"path": "/srv/x", "repo": "-r"}), "parameter \"repo\"");
    }
}
