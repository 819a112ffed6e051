//! `linux.file`: a regular file's content, owner and mode, or its absence.
//!
//! Content is rewritten only when it differs, atomically (temporary file in the same
//! directory, renamed over the file), all through the opened directory
//! ([`crate::dirfd`]); the file system is flushed once per burst of writes, not per file
//! ([`crate::durable`], which says what a power cut can take). Defaults are the original adaptor's (Salt `file.managed`): without
//! `mode` an existing file keeps its mode (a managed executable script stays
//! executable) and a new one gets 0644; `user`/`group` default to root and are enforced
//! on an existing file too. A link on the way or at the path (`/etc/resolv.conf`) is
//! followed only where only root could have placed it; any other link is refused,
//! naming it: writing through it would let whoever controls it choose which file root
//! overwrites. A directory at the path is an error.
//!
//! With `remote_uri` (which overrides `content`) the helper first answers `NeedFetch`:
//! the daemon downloads the URL every round, and the file is then compared with the
//! download like `content` would be — rewritten only when it differs.
//!
//! A plan ([`crate::plan`]) makes the same inspection through the same descriptors,
//! reads the download instead of staging it, and reports the same changes plus a diff
//! of the content ([`crate::diff`]; checksums only under the policy's `secret_paths`,
//! for a file others may not read, and for binary content).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::LinuxFile;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};
use rustix::fs::FileType;

use super::{Ctx, Step};
use crate::diff::{self, Hidden};
use crate::dirfd::{self, Dir, Last, Meta, NewDirs, WalkError};
use crate::fetched::{FetchError, Fetched};
use crate::fsutil::{self, Durable, FsError};
use crate::identity::{IdentityError, Owner};
use crate::plan;
use crate::policy::Policy;

/// Largest download a plan reads to compare (a plan compares in memory).
const PLAN_READ_CAP: u64 = 256 * 1024 * 1024;

/// Mode of a file created without `mode`.
const NEW_FILE_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("parameter path: \"/\" is not a file")]
    Root,
    #[error("remote_uri {0:?}: only http:// and https:// URLs can be downloaded")]
    RemoteScheme(String),
    #[error("remote_uri {0:?} was not downloaded by the daemon")]
    NotFetched(String),
    #[error("remote_uri: {0}")]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{0} is a symbolic link; linux.file never writes through a link it cannot trust")]
    Symlink(PathBuf),
    #[error("{path} is {found}, not a regular file; linux.file manages regular files only")]
    NotAFile { path: PathBuf, found: &'static str },
}

pub fn apply(p: &LinuxFile, _ctx: &Ctx, fetched: &Fetched<'_>) -> Step {
    if let Some(uri) = wanted_download(p) {
        if !fetched.has(uri) {
            return Step::NeedFetch(vec![uri.to_string()]);
        }
    }
    Step::Done(outcome(p, &_ctx.policy, fetched))
}

/// For states that write a file through this one with inline content (repository
/// files): no download is ever asked for.
pub fn apply_inline(p: &LinuxFile) -> Outcome {
    outcome(p, &Policy::default(), &Fetched::none())
}

fn outcome(p: &LinuxFile, policy: &Policy, fetched: &Fetched<'_>) -> Outcome {
    let mut changes = Vec::new();
    let mut diff = None;
    let result = if plan::active() {
        planned(p, policy, fetched, &mut changes, &mut diff)
    } else {
        run(p, fetched, &mut changes)
    };
    let mut outcome = super::finish(&p.path.0, result, changes, &[]);
    outcome.diff = diff;
    outcome
}

/// The owner the file-like states enforce: `user` and `group` default to root, as the
/// original adaptor set them (so an existing file's owner is brought back to root).
///
/// The default is the kernel's root, uid 0 and gid 0, taken as numbers: only a name the
/// recipe gives is looked up. A state that names neither (most do) asks the account
/// files nothing, so it stats neither them nor `nsswitch.conf` (3 `statx` per converged
/// file state before); a name given is still looked up, and checked against the files'
/// current version, at every state that gives it.
pub(crate) fn owner_or_root(user: Option<&str>, group: Option<&str>) -> Result<Owner, IdentityError> {
    let named = Owner::resolve(user, group)?;
    Ok(Owner { uid: Some(named.uid.unwrap_or(ROOT_UID)), gid: Some(named.gid.unwrap_or(ROOT_GID)) })
}

const ROOT_UID: Uid = Uid::from_raw(0);
const ROOT_GID: Gid = Gid::from_raw(0);

/// The URL to download first, when the state is otherwise valid (a bad path fails at
/// once, without a download).
fn wanted_download(p: &LinuxFile) -> Option<&str> {
    let uri = p.remote_uri.as_deref()?;
    let path_ok = !p.path.is_root();
    (!p.absent && path_ok && remote_scheme_ok(uri)).then_some(uri)
}

pub(crate) fn remote_scheme_ok(uri: &str) -> bool {
    let lower = uri.trim().to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// A download copied into the file's directory, removed unless it was renamed into
/// place.
struct Staged<'a> {
    dir: &'a Dir,
    name: OsString,
    file: File,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        let _ = self.dir.unlink(&self.name);
    }
}

fn run(p: &LinuxFile, fetched: &Fetched<'_>, changes: &mut Vec<Change>) -> Result<(), FileError> {
    let path = p.path.abs().clone();
    if path.is_root() {
        return Err(FileError::Root);
    }
    if p.absent {
        return remove(&path, changes);
    }
    let owner = owner_or_root(p.user.as_deref(), p.group.as_deref())?;
    let mode = p.mode.map(|m| m.bits());
    let content = p.content.as_deref().map(str::as_bytes);
    if let Some(uri) = p.remote_uri.as_deref().filter(|u| !remote_scheme_ok(u)) {
        return Err(FileError::RemoteScheme(uri.to_string()));
    }
    // Missing parents are created (root, 0755); a link on the way, or at the path
    // itself, is followed only where only root could have placed it.
    let parents = NewDirs { mode: fsutil::PARENT_DIR_MODE, uid: 0, gid: 0 };
    let mut created = |dir: &Path, new: NewDirs| {
        changes.push(Change::new(
            dir.display().to_string(),
            format!("directory created ({} {}:{})", fsutil::describe_mode(new.mode), new.uid, new.gid),
        ))
    };
    let r = dirfd::resolve(path.as_path(), Last::Follow, Some(parents), &mut created)?;
    let shown = r.path();
    let (dir, name) = (&r.parent, r.name.as_deref().ok_or(FileError::Root)?);

    let mut staged = match p.remote_uri.as_deref() {
        Some(uri) => Some(stage(dir, name, uri, fetched)?),
        None => None,
    };
    let write = |staged: &Option<Staged<'_>>, uid: u32, gid: u32, mode: u32| -> Result<(), FsError> {
        match staged {
            Some(s) => fsutil::install_in(dir, &s.name, &s.file, name, (mode, uid, gid), Durable::Batched),
            None => fsutil::write_in(dir, name, content.unwrap_or_default(), (mode, uid, gid), Durable::Batched),
        }
    };

    let Some(found) = r.stat_last()? else {
        let (uid, gid) = owner.for_new();
        let mode = mode.unwrap_or(NEW_FILE_MODE);
        write(&staged, uid.as_raw(), gid.as_raw(), mode)?;
        changes.push(Change::new(
            shown.display().to_string(),
            format!("file created ({} {uid}:{gid})", fsutil::describe_mode(mode)),
        ));
        return Ok(());
    };
    check_is_file(&shown, found.kind)?;
    let mut f = dir.open_file(name)?.ok_or_else(|| WalkError::Changed(shown.clone()))?;
    // Type again through the descriptor: the name may have been swapped since the stat.
    let meta = Meta::of_file(&f, &shown)?;
    check_is_file(&shown, meta.kind)?;
    let differs = match (&mut staged, content) {
        (Some(s), _) => fsutil::files_differ(&mut f, &shown, &mut s.file, &dir.join(&s.name))?,
        (None, Some(want)) => fsutil::content_differs(&mut f, &shown, meta.size, want)?,
        (None, None) => false,
    };
    if differs {
        let (uid, gid) = owner.applied_to(meta.uid, meta.gid);
        // Without `mode` the file keeps its own (an executable script stays one), less
        // the set-user-id and set-group-id bits, as the kernel drops them when anyone
        // but root writes a file: new content in a set-id program is code running as
        // its owner, which only an explicit `mode` (a grant of its own under a policy,
        // see footprint.rs) may ask for.
        let new_mode = mode.unwrap_or(meta.mode & !0o6000);
        write(&staged, uid, gid, new_mode)?;
        let subject = shown.display().to_string();
        changes.push(Change::new(subject.clone(), "content updated"));
        if (uid, gid) != (meta.uid, meta.gid) {
            changes.push(Change::new(subject.clone(), format!("owner {}:{} -> {uid}:{gid}", meta.uid, meta.gid)));
        }
        if meta.mode != new_mode {
            changes.push(Change::new(
                subject,
                format!("mode {} -> {}", fsutil::describe_mode(meta.mode), fsutil::describe_mode(new_mode)),
            ));
        }
    } else {
        fsutil::enforce_attrs_from(&f, &shown, meta, mode, &owner, changes)?;
    }
    Ok(())
}

/// [`run`]'s inspection without its writes: the changes it would make, and the diff of
/// the content.
fn planned(
    p: &LinuxFile,
    policy: &Policy,
    fetched: &Fetched<'_>,
    changes: &mut Vec<Change>,
    diff: &mut Option<String>,
) -> Result<(), FileError> {
    let path = p.path.abs().clone();
    if path.is_root() {
        return Err(FileError::Root);
    }
    if p.absent {
        return remove(&path, changes);
    }
    let owner = owner_or_root(p.user.as_deref(), p.group.as_deref())?;
    let mode = p.mode.map(|m| m.bits());
    if let Some(uri) = p.remote_uri.as_deref().filter(|u| !remote_scheme_ok(u)) {
        return Err(FileError::RemoteScheme(uri.to_string()));
    }
    let want: Option<Vec<u8>> = match p.remote_uri.as_deref() {
        Some(uri) => {
            Some(fetched.read_small(uri, PLAN_READ_CAP)?.ok_or_else(|| FileError::NotFetched(uri.to_string()))?)
        }
        None => p.content.as_ref().map(|c| c.as_bytes().to_vec()),
    };
    let secret = policy.is_secret(&path);
    let hidden = |file_mode: u32| (secret || file_mode & 0o004 == 0).then_some(Hidden::Sensitive);
    let create = |shown: &Path, changes: &mut Vec<Change>, diff: &mut Option<String>| {
        let (uid, gid) = owner.for_new();
        let mode = mode.unwrap_or(NEW_FILE_MODE);
        changes.push(Change::new(
            shown.display().to_string(),
            format!("file created ({} {uid}:{gid})", fsutil::describe_mode(mode)),
        ));
        let new = want.as_deref().unwrap_or_default();
        *diff = Some(diff::content(&shown.display().to_string(), None, new, hidden(mode)));
    };
    let r = match dirfd::resolve(path.as_path(), Last::Follow, None, &mut |_, _| {}) {
        Ok(r) => r,
        Err(WalkError::Missing(first)) => {
            // The directories from the first missing one down to the file's parent.
            let parent = path.as_path().parent().unwrap_or(Path::new("/"));
            let mut missing: Vec<&Path> = parent.ancestors().take_while(|a| a.starts_with(&first)).collect();
            if missing.is_empty() {
                missing.push(&first);
            }
            for dir in missing.into_iter().rev() {
                changes.push(Change::new(
                    dir.display().to_string(),
                    format!("directory created ({} 0:0)", fsutil::describe_mode(fsutil::PARENT_DIR_MODE)),
                ));
            }
            create(path.as_path(), changes, diff);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let shown = r.path();
    let (dir, name) = (&r.parent, r.name.as_deref().ok_or(FileError::Root)?);
    let Some(found) = r.stat_last()? else {
        create(&shown, changes, diff);
        return Ok(());
    };
    check_is_file(&shown, found.kind)?;
    let mut f = dir.open_file(name)?.ok_or_else(|| WalkError::Changed(shown.clone()))?;
    let meta = Meta::of_file(&f, &shown)?;
    check_is_file(&shown, meta.kind)?;
    let differs = match &want {
        Some(w) => fsutil::content_differs(&mut f, &shown, meta.size, w)?,
        None => false,
    };
    if !differs {
        return Ok(fsutil::enforce_attrs_from(&f, &shown, meta, mode, &owner, changes)?);
    }
    let (uid, gid) = owner.applied_to(meta.uid, meta.gid);
    let new_mode = mode.unwrap_or(meta.mode & !0o6000);
    let subject = shown.display().to_string();
    changes.push(Change::new(subject.clone(), "content updated"));
    if (uid, gid) != (meta.uid, meta.gid) {
        changes.push(Change::new(subject.clone(), format!("owner {}:{} -> {uid}:{gid}", meta.uid, meta.gid)));
    }
    if meta.mode != new_mode {
        changes.push(Change::new(
            subject.clone(),
            format!("mode {} -> {}", fsutil::describe_mode(meta.mode), fsutil::describe_mode(new_mode)),
        ));
    }
    // The old content, read only as far as a diff is shown (more is named by checksum).
    let old = read_capped(&mut f, &shown)?;
    let new = want.as_deref().unwrap_or_default();
    *diff = Some(diff::content(&subject, Some(&old), new, hidden(meta.mode & new_mode)));
    Ok(())
}

/// The file's content from its start, at most one byte past [`diff::DIFF_INPUT_CAP`]
/// (enough to know it is too large to diff).
fn read_capped(f: &mut File, path: &Path) -> Result<Vec<u8>, FsError> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(0)).map_err(fsutil::io_err(path, "read"))?;
    let mut old = Vec::new();
    let cap = u64::try_from(diff::DIFF_INPUT_CAP).unwrap_or(u64::MAX) + 1;
    f.take(cap).read_to_end(&mut old).map_err(fsutil::io_err(path, "read"))?;
    Ok(old)
}

/// Copies the download for `uri` into a new private file in `dir`, beside `name`.
fn stage<'a>(dir: &'a Dir, name: &OsStr, uri: &str, fetched: &Fetched<'_>) -> Result<Staged<'a>, FileError> {
    let tmp = dir.temp_name(name);
    // By the directory's descriptor: the copy lands in the directory opened, whatever
    // happens to its name (the copy itself refuses a link at `tmp`).
    let copied = fetched.copy_to(uri, dir, &tmp)?;
    copied.ok_or_else(|| FileError::NotFetched(uri.to_string()))?;
    let file = dir.open_file(&tmp)?.ok_or_else(|| WalkError::Changed(dir.join(&tmp)))?;
    Ok(Staged { dir, name: tmp, file })
}

fn check_is_file(path: &Path, kind: FileType) -> Result<(), FileError> {
    match kind {
        FileType::RegularFile => Ok(()),
        FileType::Symlink => Err(FileError::Symlink(path.to_path_buf())),
        other => Err(FileError::NotAFile { path: path.to_path_buf(), found: dirfd::kind_of(other) }),
    }
}

/// Removes a file (or a link: removing the link itself writes through nothing). A
/// directory is refused: that is `linux.dir`'s job, with its own safety checks.
fn remove(path: &AbsPath, changes: &mut Vec<Change>) -> Result<(), FileError> {
    let r = match dirfd::resolve(path.as_path(), Last::NoFollow, None, &mut |_, _| {}) {
        Ok(r) => r,
        Err(WalkError::Missing(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let name = r.name.as_deref().ok_or(FileError::Root)?;
    let Some(meta) = r.parent.stat(name)? else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(FileError::NotAFile { path: path.as_path().to_path_buf(), found: "a directory" });
    }
    if !plan::active() {
        r.parent.unlink(name)?;
    }
    changes.push(Change::new(path.to_string(), "removed"));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    use serde_json::{json, Value};
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn file(raw: Value) -> LinuxFile {
        crate::states::testutil::typed("linux.file", raw)
    }

    fn apply_with(p: &LinuxFile, fetched: &Fetched<'_>) -> Step {
        super::apply(p, &Ctx::new("/nonexistent".into()), fetched)
    }

    fn apply(p: &LinuxFile) -> Outcome {
        match apply_with(p, &Fetched::none()) {
            Step::Done(o) => o,
            other => panic!("expected an outcome, got {other:?}"),
        }
    }

    /// A file "downloaded" for `url`, owned by root like the in-process peer.
    fn download(dir: &Path, url: &str, content: &[u8]) -> opsagent_proto::request::FetchedFile {
        use sha2::Digest;
        let path = dir.join(format!("dl-{}", content.len()));
        fs::write(&path, content).unwrap();
        opsagent_proto::request::FetchedFile {
            url: url.into(),
            path: AbsPath::parse(&path.display().to_string()).unwrap(),
            size: content.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(content)),
        }
    }

    #[test]
    fn creates_with_parents_then_does_nothing_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/conf");
        let p = file(json!({"path": path, "content": "hello\n"}));
        let first = apply(&p);
        assert!(first.result, "{}", first.comment);
        // Two parent directories and the file.
        assert_eq!(first.changes.len(), 3, "{:?}", first.changes);
        assert_eq!(fs::read_to_string(&path).unwrap(), "hello\n");
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 0, 0));
        assert_eq!(fs::metadata(dir.path().join("a")).unwrap().mode() & 0o7777, 0o755);

        let second = apply(&p);
        assert!(second.result && second.changes.is_empty(), "{second:?}");
        assert!(second.comment.ends_with("already as wanted"));
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn content_change_rewrites_and_brings_the_owner_to_root_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let out = apply(&file(json!({"path": path, "content": "new", "mode": "0600"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 0, 0));
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["content updated", "owner 65534:65534 -> 0:0", "mode 0644 -> 0600"]);

        // A named user is kept on a rewrite.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let out = apply(&file(
            json!({"path": path, "content": "newer", "mode": "0600", "user": "nobody", "group": "nogroup"}),
        ));
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert_eq!(fs::metadata(&path).unwrap().uid(), 65534);
    }

    #[test]
    fn without_mode_an_executable_script_managed_by_content_keeps_0755() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("deploy.sh");
        fs::write(&script, "#!/bin/sh\necho v1\n").unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = apply(&file(json!({"path": script, "content": "#!/bin/sh\necho v2\n"})));
        assert!(out.result, "{}", out.comment);
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["content updated"]);
        assert_eq!(fs::metadata(&script).unwrap().mode() & 0o7777, 0o755);
        // Unchanged content, still no mode: nothing to do, mode kept.
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
        let out = apply(&file(json!({"path": script, "content": "#!/bin/sh\necho v2\n"})));
        assert!(out.result && out.changes.is_empty(), "{out:?}");
        assert_eq!(fs::metadata(&script).unwrap().mode() & 0o7777, 0o750);
        // New content in a set-id file without mode: the set-id bits go.
        let setuid = dir.path().join("su");
        fs::write(&setuid, "old").unwrap();
        fs::set_permissions(&setuid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
        let out = apply(&file(json!({"path": setuid, "content": "new"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::metadata(&setuid).unwrap().mode() & 0o7777, 0o755);
        assert!(
            out.changes.iter().any(|c| c.what == "mode 4755 -> 0755" || c.what.contains("-> 0755")),
            "{:?}",
            out.changes
        );
        // A new file without mode: 0644.
        let new = dir.path().join("new");
        assert!(apply(&file(json!({"path": new, "content": "x"}))).result);
        assert_eq!(fs::metadata(&new).unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn mode_and_owner_are_enforced_without_touching_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf");
        fs::write(&path, "keep").unwrap();
        let p = file(json!({"path": path, "mode": "0640", "user": "nobody", "group": "nogroup"}));
        let out = apply(&p);
        assert!(out.result, "{}", out.comment);
        assert_eq!(out.changes.len(), 2, "{:?}", out.changes);
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 65534, 65534));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep");
        assert!(apply(&p).changes.is_empty());
    }

    #[test]
    fn a_user_named_without_a_group_gets_group_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf");
        fs::write(&path, "keep").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let out = apply(&file(json!({"path": path, "user": "nobody"})));
        assert!(out.result, "{}", out.comment);
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["owner 65534:65534 -> 65534:0"]);
        let out = apply(&file(json!({"path": path, "group": "nogroup"})));
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["owner 65534:0 -> 0:65534"]);
    }

    #[test]
    fn absent_removes_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        fs::write(&path, "x").unwrap();
        let p = file(json!({"path": path, "absent": true}));
        let out = apply(&p);
        assert!(out.result && out.changes.len() == 1, "{out:?}");
        assert!(!path.exists());
        let out = apply(&p);
        assert!(out.result && out.changes.is_empty(), "{out:?}");

        let out = apply(&file(json!({"path": dir.path(), "absent": true})));
        assert!(!out.result && out.comment.contains("is a directory"), "{}", out.comment);
        assert!(dir.path().exists());
    }

    #[test]
    fn follows_a_link_only_where_only_root_could_have_placed_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // As /etc/resolv.conf -> ../run/...: root-owned link in a root-only directory.
        fs::create_dir(dir.path().join("run")).unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        let real = dir.path().join("run/resolv.conf");
        fs::write(&real, "old").unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", dir.path().join("etc/resolv.conf")).unwrap();
        let out = apply(&file(json!({"path": dir.path().join("etc/resolv.conf"), "content": "nameserver 10.0.0.2\n"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&real).unwrap(), "nameserver 10.0.0.2\n");
        assert!(fs::symlink_metadata(dir.path().join("etc/resolv.conf")).unwrap().file_type().is_symlink());

        // A link planted in a directory another user can write: refused, nothing written.
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let www = dir.path().join("www");
        fs::create_dir(&www).unwrap();
        std::os::unix::fs::chown(&www, Some(65534), Some(65534)).unwrap();
        let link = www.join("index.html");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let out = apply(&file(json!({"path": link, "content": "pwned", "mode": "0666"})));
        assert!(!out.result && out.changes.is_empty(), "{out:?}");
        assert_eq!(
            out.comment,
            format!("{}: a symbolic link in a directory writable by uid 65534; refusing to follow it", link.display())
        );
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o644);

        // The same with the link on the way to the file (a parent directory).
        std::os::unix::fs::symlink(dir.path().join("run"), www.join("sub")).unwrap();
        let out = apply(&file(json!({"path": www.join("sub/new"), "content": "pwned"})));
        assert!(!out.result && out.comment.contains("refusing to follow it"), "{}", out.comment);
        assert!(!dir.path().join("run/new").exists());
        assert_eq!(fs::read_dir(dir.path().join("run")).unwrap().count(), 1);

        let out = apply(&file(json!({"path": dir.path(), "content": "x"})));
        assert!(!out.result && out.comment.contains("is a directory, not a regular file"), "{}", out.comment);
    }

    #[test]
    fn bad_paths_unknown_users_and_remote_uri_fail_without_action() {
        crate::states::testutil::refused("linux.file", json!({"path": "etc/x", "content": "x"}), "not absolute");
        crate::states::testutil::refused("linux.file", json!({"path": "/tmp/../etc/x", "content": "x"}), "\"..\"");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let out = apply(&file(json!({"path": path, "user": "no-such-user-xyz"})));
        assert!(!out.result && out.comment.contains("unknown user \"no-such-user-xyz\""), "{}", out.comment);
        let out = apply(&file(json!({"path": path, "remote_uri": "ftp://example.com/x"})));
        assert!(!out.result && out.comment.contains("only http:// and https:// URLs"), "{}", out.comment);
        assert!(!path.exists());
    }

    #[test]
    fn remote_uri_asks_for_a_download_then_compares_like_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/remote.conf");
        let url = "https://example.com/remote.conf";
        let p = file(json!({"path": path, "remote_uri": url, "content": "ignored", "mode": "0640"}));
        assert_eq!(apply_with(&p, &Fetched::none()), Step::NeedFetch(vec![url.to_string()]));
        assert!(!path.exists() && !dir.path().join("sub").exists(), "nothing changes before the download");

        let dl = tempfile::tempdir().unwrap();
        let files = [download(dl.path(), url, b"remote v1\n")];
        let Step::Done(out) = apply_with(&p, &Fetched::new(&files, 0)) else { panic!("outcome expected") };
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&path).unwrap(), "remote v1\n", "remote_uri overrides content");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(out.changes.last().unwrap().what, "file created (0640 0:0)");

        let Step::Done(out) = apply_with(&p, &Fetched::new(&files, 0)) else { panic!("outcome expected") };
        assert!(out.result && out.changes.is_empty(), "{out:?}");
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 1, "no staged copy left behind");

        let files = [download(dl.path(), url, b"remote v2, longer\n")];
        let Step::Done(out) = apply_with(&p, &Fetched::new(&files, 0)) else { panic!("outcome expected") };
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["content updated"]);
        assert_eq!(fs::read_to_string(&path).unwrap(), "remote v2, longer\n");

        // A download the helper cannot trust changes nothing.
        let files = [download(dl.path(), url, b"remote v3\n")];
        let Step::Done(out) = apply_with(&p, &Fetched::new(&files, 65534)) else { panic!("outcome expected") };
        assert!(!out.result && out.comment.contains("not by the requesting agent (uid 65534)"), "{}", out.comment);
        assert_eq!(fs::read_to_string(&path).unwrap(), "remote v2, longer\n");
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);

        // absent wins over remote_uri: no download is asked for.
        let gone = file(json!({"path": path, "remote_uri": url, "absent": true}));
        assert!(matches!(apply_with(&gone, &Fetched::none()), Step::Done(o) if o.result && o.changes.len() == 1));
    }

    #[test]
    fn missing_content_only_ensures_existence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let p = file(json!({"path": path}));
        assert_eq!(apply(&p).changes.len(), 1);
        fs::write(&path, "written by someone else").unwrap();
        let out = apply(&p);
        assert!(out.result && out.changes.is_empty(), "{out:?}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "written by someone else");
    }
}
