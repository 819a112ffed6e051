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
//! A plan (dry run) pulls nothing and writes nothing into the clone, `.hg` included
//! (`hg status` would: it records the times of files it found unchanged in
//! `.hg/dirstate`). It resolves `revision` on the remote (`hg identify -r REV REPO`,
//! read-only; a repository given as a local path is read like any, and Mercurial may
//! refresh that repository's own caches, as the apply's pull does), reads the working
//! directory's parent and tracked files from `.hg/dirstate` (format v1) and compares
//! them as `hg status` does: recorded size, exec bit and time, and for a file whose
//! time moved but not its size, its content against `hg cat -r .`. It reports the
//! apply's own words or its refusal; a converged clone plans no change. What it cannot
//! read (a dirstate-v2 clone, a changed file larger than it compares) is reported as
//! "would run hg status", and why.
//!
//! Mercurial never prompts: `--noninteractive`, `HGPLAIN=1` (no user aliases, stable
//! output), `ui.merge=internal:fail` (never a merge tool), and ssh in batch mode.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use opsagent_proto::catalogue::CommonHg;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use super::{
    checkout_dir, describe_files, inspect, mask_url, open_checkout, planned_prepare, prepare, repo_param,
    revision_param, run, short, ssh_command, url_secret, Existing, Runner, VcsError, TRANSFER_TIMEOUT,
};
use crate::cancel::Cancel;
use crate::dirfd::{Dir, WalkError};
use crate::exec::{CommandSpec, Exit};
use crate::fsutil::{self, FsError};
use rustix::fs::FileType;

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

/// Mercurial writes caches into a local repository it reads from (`.hg/cache/…`, through
/// its cache directory, which it does not check): as root, only from a repository root
/// alone controls, or its owner could point `.hg/cache` anywhere root then writes. A
/// relative local path (read from a working directory) is refused as root too.
fn local_repo_guard(repo: &str, runner: &Runner) -> Result<(), VcsError> {
    if !runner.uid.is_root() || !is_local(repo) {
        return Ok(());
    }
    let local = repo.strip_prefix("file://").or_else(|| repo.strip_prefix("file:")).unwrap_or(repo);
    let path = AbsPath::parse(local).map_err(|source| VcsError::Path { param: "repo", source })?;
    crate::dirfd::root_controlled(path.as_path()).map_err(|source| VcsError::NotRootControlled {
        tool: runner.tool,
        path,
        source,
    })
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
    local_repo_guard(&repo, &runner)?;
    let existing = inspect(&path, ".hg", &runner)?;
    // A directory holding something else goes on to `prepare`, which refuses it or,
    // with force, stops at the plan guard.
    if crate::plan::active() && !matches!(existing, Existing::Other { .. }) {
        let mut hg = Hg { runner, path, repo, cancel };
        return hg.plan(&existing, &wanted, p.force, changes).await;
    }
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
    let update = update_changes(&hg.path, parent.as_deref(), &target, &wanted, &dirty, p.force)?;
    if update.is_empty() {
        return Ok(());
    }
    let mut args = vec!["update", "--quiet", "-r", &target];
    if p.force {
        args.push("--clean");
    }
    hg.remote(&args, hg.path.clone().as_path()).await?;
    changes.extend(update);
    Ok(())
}

/// What `hg update` to `target` changes in a clone whose working directory has
/// `parent` and the locally changed files `dirty` (`hg status` order), in the apply's
/// words; the refusal of local changes without `force`. Empty: nothing to update.
fn update_changes(
    path: &AbsPath,
    parent: Option<&str>,
    target: &str,
    wanted: &str,
    dirty: &[String],
    force: bool,
) -> Result<Vec<Change>, VcsError> {
    if !dirty.is_empty() && !force {
        return Err(VcsError::LocalChanges { path: path.clone(), files: describe_files(dirty) });
    }
    let mut changes = Vec::new();
    if parent == Some(target) && dirty.is_empty() {
        return Ok(changes);
    }
    let shown = path.to_string();
    if !dirty.is_empty() {
        changes.push(Change::new(&shown, format!("local changes discarded ({}; force is set)", describe_files(dirty))));
    }
    match parent {
        Some(old) if old == target => {}
        Some(old) => {
            changes.push(Change::new(&shown, format!("revision {} -> {} ({wanted})", short(old), short(target))))
        }
        None => changes.push(Change::new(&shown, format!("checked out at {} ({wanted})", short(target)))),
    }
    Ok(changes)
}

/// A repository Mercurial opens as a local one (a path or a `file:` URL): its
/// `identify -r` takes a revset, where a remote takes a plain name.
fn is_local(repo: &str) -> bool {
    repo.starts_with("file:") || !repo.contains("://")
}

/// The largest file whose content a plan compares itself (its hex form must fit in a
/// command's captured output).
const COMPARE_MAX: u64 = 16 * 1024;
/// The largest `.hg/dirstate` (and `.hg/requires`) a plan reads itself.
const DIRSTATE_MAX: u64 = 16 * 1024 * 1024;
/// `S_IFMT` and `S_IFLNK` of a dirstate entry's mode.
const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

/// One tracked file of a dirstate (format v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `n` normal, `a` added, `r` removed, `m` merged.
    pub state: u8,
    pub mode: u32,
    /// -1: unknown; -2: from the second parent.
    pub size: i32,
    /// Seconds, -1: unknown.
    pub mtime: i32,
    pub name: Vec<u8>,
    pub copied: bool,
}

/// `.hg/dirstate` in format v1: the working directory's first parent (hex) and its
/// entries; `None` if it is not that format.
pub fn parse_dirstate(data: &[u8]) -> Option<(String, Vec<Entry>)> {
    let parent = hex::encode(data.get(..20)?);
    let mut rest = data.get(40..)?;
    let mut entries = Vec::new();
    let int = |b: &[u8]| -> Option<i32> { Some(i32::from_be_bytes(b.try_into().ok()?)) };
    while !rest.is_empty() {
        let head = rest.get(..17)?;
        let len = usize::try_from(int(&head[13..17])?).ok()?;
        let raw = rest.get(17..17 + len)?;
        let (name, copied) = match raw.iter().position(|&b| b == 0) {
            Some(at) => (raw[..at].to_vec(), true),
            None => (raw.to_vec(), false),
        };
        // Names are relative to the working directory and stay in it; anything else (a
        // clone's owner can write the dirstate) is not a dirstate the plan reads.
        if !tracked_name(&name) {
            return None;
        }
        entries.push(Entry {
            state: head[0],
            mode: u32::from_be_bytes(head[1..5].try_into().ok()?),
            size: int(&head[5..9])?,
            mtime: int(&head[9..13])?,
            name,
            copied,
        });
        rest = &rest[17 + len..];
    }
    Some((parent, entries))
}

/// A tracked file's name as hg writes it: relative, no empty, `.` or `..` component,
/// nothing inside `.hg`.
fn tracked_name(name: &[u8]) -> bool {
    !name.is_empty()
        && !name.starts_with(b"/")
        && name.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
        && !name.starts_with(b".hg/")
}

/// What a plan finds of a tracked file on disk.
enum Seen {
    Clean,
    Modified,
    Deleted,
    /// Its time moved but not its size: only its content can tell (the file as it is
    /// on disk, or the link's target).
    Compare(Vec<u8>),
    /// Likewise, but too large for the plan to compare.
    TooLarge,
}

/// The directory holding tracked file `name` and its last component, reached without
/// following a link; `None` where hg would not find the file (a directory on the way
/// missing or replaced by a link or a file).
fn parent_of<'n>(root: &Dir, name: &'n [u8]) -> Result<Option<(Dir, &'n OsStr)>, VcsError> {
    let mut parts: Vec<&[u8]> = name.split(|&b| b == b'/').collect();
    let Some(last) = parts.pop() else { return Ok(None) };
    let mut dir = root.try_clone().map_err(FsError::from)?;
    for part in parts {
        match dir.subdir(OsStr::from_bytes(part)) {
            Ok(Some(d)) => dir = d,
            Ok(None) | Err(WalkError::Symlink(_) | WalkError::NotADirectory { .. }) => return Ok(None),
            Err(e) => return Err(FsError::from(e).into()),
        }
    }
    Ok(Some((dir, OsStr::from_bytes(last))))
}

/// A tracked file as `hg status` finds it on disk (before comparing content).
fn look_at(root: &Dir, entry: &Entry) -> Result<Seen, VcsError> {
    let Some((dir, name)) = parent_of(root, &entry.name)? else { return Ok(Seen::Deleted) };
    let Some(meta) = dir.stat(name).map_err(FsError::from)? else { return Ok(Seen::Deleted) };
    if entry.state != b'n' {
        // Added or merged: present is all that matters.
        return Ok(if meta.kind == FileType::RegularFile || meta.kind == FileType::Symlink {
            Seen::Modified
        } else {
            Seen::Deleted
        });
    }
    let was_link = entry.mode & S_IFMT == S_IFLNK;
    match meta.kind {
        FileType::Symlink if was_link => {
            let target = dir.read_link(name).map_err(FsError::from)?;
            Ok(Seen::Compare(target.into_os_string().into_vec()))
        }
        FileType::RegularFile if !was_link => {
            let Some(file) = dir.open_file(name).map_err(FsError::from)? else { return Ok(Seen::Deleted) };
            let shown = dir.join(name);
            let st = rustix::fs::fstat(&file).map_err(|e| fsutil::io_err(&shown, "inspect")(e.into()))?;
            let exec_changed = (entry.mode ^ st.st_mode) & 0o100 != 0;
            let size_changed = entry.size >= 0
                && i64::from(entry.size) != st.st_size
                && i64::from(entry.size) != st.st_size & 0x7fff_ffff;
            if size_changed || exec_changed || entry.size == -2 || entry.copied {
                return Ok(Seen::Modified);
            }
            if entry.size != -1 && entry.mtime != -1 && i64::from(entry.mtime) == st.st_mtime & 0x7fff_ffff {
                return Ok(Seen::Clean);
            }
            if u64::try_from(st.st_size).unwrap_or(u64::MAX) > COMPARE_MAX {
                return Ok(Seen::TooLarge);
            }
            // Capped while reading too: the file may grow after the fstat.
            let mut content = Vec::new();
            file.take(COMPARE_MAX + 1).read_to_end(&mut content).map_err(fsutil::io_err(&shown, "read"))?;
            if u64::try_from(content.len()).unwrap_or(u64::MAX) > COMPARE_MAX {
                return Ok(Seen::TooLarge);
            }
            Ok(Seen::Compare(content))
        }
        // A file became a link or the other way round.
        FileType::Symlink | FileType::RegularFile => Ok(Seen::Modified),
        _ => Ok(Seen::Deleted),
    }
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

    /// The plan of [`sync`]: what the apply would report, found without writing.
    async fn plan(
        &mut self,
        existing: &Existing,
        wanted: &str,
        force: bool,
        changes: &mut Vec<Change>,
    ) -> Result<(), VcsError> {
        let path = self.path.to_string();
        if *existing == Existing::Missing {
            planned_prepare(&self.path, &self.runner, changes)?;
        }
        let target = self.identify(wanted).await?;
        if *existing != Existing::Checkout {
            changes.push(Change::new(&path, format!("cloned at {} ({wanted})", short(&target))));
            return Ok(());
        }
        let Some(root) = open_checkout(&self.path)? else {
            return Err(FsError::from(WalkError::Missing(self.path.as_path().into())).into());
        };
        let hgdir = root.subdir(OsStr::new(".hg")).map_err(FsError::from)?;
        let hgdir = hgdir.ok_or_else(|| FsError::from(WalkError::Missing(self.path.as_path().join(".hg"))))?;
        // Read at most DIRSTATE_MAX (the clone's owner can make these files any size):
        // a longer one is not read, and the plan falls back to naming hg status.
        let read = |name: &str| -> Result<Option<Vec<u8>>, VcsError> {
            let Some(f) = hgdir.open_file(OsStr::new(name)).map_err(FsError::from)? else { return Ok(None) };
            let mut data = Vec::new();
            f.take(DIRSTATE_MAX + 1)
                .read_to_end(&mut data)
                .map_err(fsutil::io_err(&hgdir.join(OsStr::new(name)), "read"))?;
            Ok(Some(data))
        };
        let too_long = |d: &Vec<u8>| u64::try_from(d.len()).unwrap_or(u64::MAX) > DIRSTATE_MAX;
        let requires = String::from_utf8_lossy(&read("requires")?.unwrap_or_default()).into_owned();
        let parsed = match read("dirstate")? {
            // A clone whose first update failed has no working directory state yet.
            None => Some((NULL_NODE.to_string(), Vec::new())),
            Some(_) if requires.lines().any(|l| l.trim() == "dirstate-v2") => None,
            Some(data) if too_long(&data) => None,
            Some(data) => parse_dirstate(&data),
        };
        let Some((parent, entries)) = parsed else {
            changes.push(Change::new(
                &path,
                format!(
                    "would run hg status, then update to {} ({wanted}): this clone's .hg/dirstate is not in the format \
                     the plan reads",
                    short(&target)
                ),
            ));
            return Ok(());
        };
        let parent = Some(parent).filter(|n| n != NULL_NODE);
        let (mut modified, mut added, mut removed, mut deleted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for entry in &entries {
            let name = String::from_utf8_lossy(&entry.name).into_owned();
            if entry.state == b'r' {
                removed.push(name);
                continue;
            }
            let seen = look_at(&root, entry)?;
            let changed = match seen {
                Seen::Deleted => {
                    deleted.push(name);
                    continue;
                }
                Seen::Clean => false,
                Seen::Modified => true,
                Seen::Compare(content) => {
                    let spec =
                        self.inspect_spec(&["cat", "-r", ".", "-T", "{data|hex}", "--", &format!("path:{name}")]);
                    let out = run(&spec, &[0], self.cancel).await?.output;
                    out.trim() != hex::encode(content)
                }
                Seen::TooLarge => {
                    changes.push(Change::new(
                        &path,
                        format!(
                            "would run hg status, then update to {} ({wanted}): {name} changed on disk at its recorded \
                             size, and only hg status compares a file that large (it records what it found in \
                             .hg/dirstate)",
                            short(&target)
                        ),
                    ));
                    return Ok(());
                }
            };
            match entry.state {
                b'a' => added.push(name),
                b'm' => modified.push(name),
                _ if changed => modified.push(name),
                _ => {}
            }
        }
        let mut dirty = Vec::new();
        for mut group in [modified, added, removed, deleted] {
            group.sort();
            dirty.extend(group);
        }
        changes.extend(update_changes(&self.path, parent.as_deref(), &target, wanted, &dirty, force)?);
        Ok(())
    }

    /// The full node id `wanted` names in the remote repository (`hg identify`: reads
    /// it, pulls nothing).
    async fn identify(&mut self, wanted: &str) -> Result<String, VcsError> {
        let repo = self.repo.clone();
        let rev = if is_local(&repo) { revset_literal(wanted) } else { wanted.to_string() };
        let args = self.args(&["identify", "--id", "--debug", "-r", &rev, "--", &repo]);
        let spec = self.runner.spec(args, Path::new("/"), TRANSFER_TIMEOUT).inspection();
        let found = run(&spec, &[0, 255], self.cancel).await?;
        let node = found.output.lines().last().unwrap_or("").trim().to_string();
        if found.exit == Exit::Code(0) && node.len() == 40 && node.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(node);
        }
        if found.exit != Exit::Code(0) && found.output.contains("unknown revision") {
            return Err(VcsError::NoRevision {
                revision: wanted.to_string(),
                expected: "a branch, bookmark, tag or changeset",
                repo: mask_url(&repo),
                known: String::new(),
            });
        }
        Err(VcsError::Unexpected { command: spec.display(), output: found.output })
    }

    /// A read-only hg command in the clone.
    fn inspect_spec(&self, args: &[&str]) -> CommandSpec {
        self.runner.local(self.args(args), self.path.as_path()).inspection()
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

    #[test]
    fn dirstate_v1_parses() {
        let entry = |state: u8, mode: u32, size: i32, mtime: i32, name: &[u8]| {
            let mut e = vec![state];
            e.extend(mode.to_be_bytes());
            e.extend(size.to_be_bytes());
            e.extend(mtime.to_be_bytes());
            e.extend(u32::try_from(name.len()).unwrap().to_be_bytes());
            e.extend(name);
            e
        };
        let mut data = vec![0xab; 20];
        data.extend([0; 20]);
        data.extend(entry(b'n', 0o100644, 4, -1, b"README"));
        data.extend(entry(b'a', 0o100755, -1, -1, b"bin/new\0old"));
        let (parent, entries) = parse_dirstate(&data).unwrap();
        assert_eq!(parent, "ab".repeat(20));
        assert_eq!(
            entries,
            [
                Entry { state: b'n', mode: 0o100644, size: 4, mtime: -1, name: b"README".to_vec(), copied: false },
                Entry { state: b'a', mode: 0o100755, size: -1, mtime: -1, name: b"bin/new".to_vec(), copied: true },
            ]
        );
        // Cut short, or not format v1 at all: not read.
        assert_eq!(parse_dirstate(&data[..data.len() - 1]), None);
        assert_eq!(parse_dirstate(b"dirstate-v2\n"), None);
        // A name that leaves the working directory (the clone's owner writes the
        // dirstate): not a dirstate the plan reads, so no file outside it is looked at.
        for bad in
            [&b"../../../root/.ssh/id_rsa"[..], b"/etc/shadow", b"a/../../x", b"a//b", b"./a", b"", b".hg/store/x"]
        {
            let mut hostile = vec![0xab; 20];
            hostile.extend([0; 20]);
            hostile.extend(entry(b'n', 0o100644, 4, -1, b"README"));
            hostile.extend(entry(b'n', 0o100644, 4, -1, bad));
            assert_eq!(parse_dirstate(&hostile), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(is_local("/srv/repo") && is_local("file:///srv/repo") && !is_local("https://h/r"));
    }

    #[tokio::test]
    async fn bad_parameters_fail_clearly() {
        crate::states::testutil::refused("common.hg", json!({"path": "rel", "repo": "/srv/r"}), "parameter \"path\"");
        crate::states::testutil::refused("common.hg", json!({"path": "/srv/x", "repo": "-r"}), "parameter \"repo\"");
    }
}
