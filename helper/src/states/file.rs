//! `linux.file`: a regular file's content, owner and mode, or its absence.
//!
//! Content is rewritten only when it differs, atomically (temporary file in the same
//! directory, fsync, rename, fsync of the directory). Owner and mode are enforced on an
//! existing file too. A link or a directory at the path is an error: writing through a
//! link would let whoever controls the link choose which file root overwrites.
//!
//! With `remote_uri` (which overrides `content`) the helper first answers `NeedFetch`:
//! the daemon downloads the URL every round, and the file is then compared with the
//! download like `content` would be — rewritten only when it differs.

use std::path::PathBuf;

use opsagent_proto::catalogue::LinuxFile;
use opsagent_proto::newtypes::{AbsPath, InvalidValue};
use opsagent_proto::request::{Change, Outcome};

use super::{Ctx, Step};
use crate::fetched::{FetchError, Fetched};
use crate::fsutil::{self, kind_of, FsError};
use crate::identity::{IdentityError, Owner};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("parameter path: {0}")]
    Path(#[from] InvalidValue),
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
    #[error("{0} is a symbolic link; linux.file never writes through a link")]
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
    Step::Done(outcome(p, fetched))
}

/// For states that write a file through this one with inline content (repository
/// files): no download is ever asked for.
pub fn apply_inline(p: &LinuxFile) -> Outcome {
    outcome(p, &Fetched::none())
}

fn outcome(p: &LinuxFile, fetched: &Fetched<'_>) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, fetched, &mut changes);
    super::finish(&p.path, result, changes, &[])
}

/// The URL to download first, when the state is otherwise valid (a bad path fails at
/// once, without a download).
fn wanted_download(p: &LinuxFile) -> Option<&str> {
    let uri = p.remote_uri.as_deref()?;
    let path_ok = AbsPath::parse(&p.path).is_ok_and(|a| !a.is_root());
    (!p.absent && path_ok && remote_scheme_ok(uri)).then_some(uri)
}

pub(crate) fn remote_scheme_ok(uri: &str) -> bool {
    let lower = uri.trim().to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// A download copied next to the file, removed unless it was renamed into place.
struct Staged {
    path: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn run(p: &LinuxFile, fetched: &Fetched<'_>, changes: &mut Vec<Change>) -> Result<(), FileError> {
    let path = AbsPath::parse(&p.path)?;
    if path.is_root() {
        return Err(FileError::Root);
    }
    if p.absent {
        return remove(&path, changes);
    }
    let owner = Owner::resolve(p.user.as_deref(), p.group.as_deref())?;
    let mode = p.mode.bits();
    let content = p.content.as_deref().map(str::as_bytes);
    // An existing file has its directories: only a missing one (or an error, which
    // the parent check names better) needs them checked and created.
    let existing = fsutil::lstat(path.as_path()).ok().flatten();
    if existing.is_none() {
        fsutil::ensure_parent(&path.parent(), changes)?;
    }
    let staged = match p.remote_uri.as_deref() {
        Some(uri) if !remote_scheme_ok(uri) => return Err(FileError::RemoteScheme(uri.to_string())),
        Some(uri) => {
            let staged = Staged { path: fsutil::temp_sibling(&path) };
            fetched.copy_to(uri, &staged.path)?.ok_or_else(|| FileError::NotFetched(uri.to_string()))?;
            Some(staged)
        }
        None => None,
    };
    let write = |uid: u32, gid: u32| -> Result<(), FsError> {
        match &staged {
            Some(s) => fsutil::install_file(&s.path, &path, mode, uid, gid),
            None => fsutil::write_atomic(&path, content.unwrap_or_default(), mode, uid, gid),
        }
    };

    let existing = match existing {
        Some(meta) => Some(meta),
        None => fsutil::lstat(path.as_path())?,
    };
    let Some(meta) = existing else {
        let (uid, gid) = owner.for_new();
        write(uid.as_raw(), gid.as_raw())?;
        changes
            .push(Change::new(path.to_string(), format!("file created ({} {uid}:{gid})", fsutil::describe_mode(mode))));
        return Ok(());
    };
    check_is_file(&path, meta.file_type())?;

    let mut f = fsutil::open_nofollow(path.as_path(), false).map_err(|e| match e {
        FsError::Symlink(p) => FileError::Symlink(p),
        e => e.into(),
    })?;
    // Type again through the descriptor: the path may have been swapped since lstat.
    let meta = f.metadata().map_err(fsutil::io_err(path.as_path(), "stat"))?;
    check_is_file(&path, meta.file_type())?;
    let differs = match (&staged, content) {
        (Some(s), _) => fsutil::files_differ(&mut f, path.as_path(), &s.path)?,
        (None, Some(want)) => fsutil::content_differs(&mut f, path.as_path(), meta.len(), want)?,
        (None, None) => false,
    };
    if differs {
        use std::os::unix::fs::MetadataExt;
        let (uid, gid) = owner.applied_to(meta.uid(), meta.gid());
        write(uid, gid)?;
        changes.push(Change::new(path.to_string(), "content updated"));
        if (uid, gid) != (meta.uid(), meta.gid()) {
            changes.push(Change::new(path.to_string(), format!("owner {}:{} -> {uid}:{gid}", meta.uid(), meta.gid())));
        }
        let before = meta.mode() & 0o7777;
        if before != mode {
            changes.push(Change::new(
                path.to_string(),
                format!("mode {} -> {}", fsutil::describe_mode(before), fsutil::describe_mode(mode)),
            ));
        }
    } else {
        fsutil::enforce_attrs_known(&f, &meta, path.as_path(), Some(mode), &owner, changes)?;
    }
    Ok(())
}

fn check_is_file(path: &AbsPath, ft: std::fs::FileType) -> Result<(), FileError> {
    if ft.is_symlink() {
        return Err(FileError::Symlink(path.as_path().to_path_buf()));
    }
    if !ft.is_file() {
        return Err(FileError::NotAFile { path: path.as_path().to_path_buf(), found: kind_of(ft) });
    }
    Ok(())
}

/// Removes a file (or a link: removing the link itself writes through nothing). A
/// directory is refused: that is `linux.dir`'s job, with its own safety checks.
fn remove(path: &AbsPath, changes: &mut Vec<Change>) -> Result<(), FileError> {
    let Some(meta) = fsutil::lstat(path.as_path())? else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(FileError::NotAFile { path: path.as_path().to_path_buf(), found: "a directory" });
    }
    std::fs::remove_file(path).map_err(fsutil::io_err(path.as_path(), "remove"))?;
    changes.push(Change::new(path.to_string(), "removed"));
    Ok(())
}

#[cfg(test)]
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
    fn content_change_rewrites_and_keeps_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let out = apply(&file(json!({"path": path, "content": "new", "mode": "0600"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, 65534));
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["content updated", "mode 0644 -> 0600"]);
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
    fn never_writes_through_a_link_or_onto_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let out = apply(&file(json!({"path": link, "content": "pwned"})));
        assert!(!out.result && out.changes.is_empty(), "{out:?}");
        assert!(out.comment.contains("is a symbolic link"), "{}", out.comment);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");

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
