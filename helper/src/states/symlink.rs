//! `linux.symlink`: a symbolic link at `target` pointing to `source`, or its absence.
//!
//! A link pointing elsewhere is replaced atomically (a new link beside it, renamed over
//! it), so the path never disappears in between. Anything that is not a link at
//! `target` is left alone and reported: replacing a real file or directory is not
//! something a link state should do by surprise.
//!
//! The link's own owner (`lchown`) is enforced, `user` and `group` defaulting to root
//! as the original adaptor set them for `file.symlink`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::LinuxSymlink;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};
use rustix::fs::FileType;

use crate::dirfd::{self, Dir, Last, Resolved, WalkError};
use crate::fsutil::FsError;
use crate::identity::IdentityError;
use crate::plan;

#[derive(Debug, thiserror::Error)]
pub enum SymlinkError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("the directory {0} that should hold the link does not exist (linux.symlink does not create it)")]
    NoParent(AbsPath),
    #[error("{path} is {found}, not a symbolic link; linux.symlink leaves it alone")]
    NotALink { path: PathBuf, found: &'static str },
}

pub fn apply(p: &LinuxSymlink) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, &mut changes);
    let notes = match p.mode {
        Some(m) => vec![format!("mode {m} ignored: a symbolic link's mode means nothing on Linux")],
        None => Vec::new(),
    };
    super::finish(&p.target.0, result, changes, &notes)
}

/// The directory that holds the link (opened through descriptors, links on the way
/// followed only under the rule of [`crate::dirfd`]) and the link's name.
fn open_parent(link: &AbsPath) -> Result<Option<Resolved>, SymlinkError> {
    match dirfd::resolve(link.as_path(), Last::NoFollow, None, &mut |_, _| {}) {
        Ok(r) if r.name.is_some() => Ok(Some(r)),
        Ok(_) => Err(SymlinkError::NotALink { path: "/".into(), found: "a directory" }),
        Err(WalkError::Missing(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn run(p: &LinuxSymlink, changes: &mut Vec<Change>) -> Result<(), SymlinkError> {
    let link = p.target.abs().clone();
    if p.absent {
        return remove(&link, changes);
    }
    let source = p.source.abs().clone();
    let owner = super::file::owner_or_root(p.user.as_deref(), p.group.as_deref())?;
    let Some(r) = open_parent(&link)? else {
        return Err(SymlinkError::NoParent(link.parent()));
    };
    let (dir, name) = (&r.parent, r.name.as_deref().unwrap_or_default());
    match dir.stat(name)? {
        None => {
            let (uid, gid) = owner.for_new();
            replace(dir, name, &source, (uid.as_raw(), gid.as_raw()))?;
            changes.push(Change::new(link.to_string(), format!("link created -> {source}")));
        }
        Some(m) if m.kind == FileType::Symlink => {
            let current = dir.read_link(name)?;
            if points_to(&current, &source) {
                let want = owner.applied_to(m.uid, m.gid);
                if want != (m.uid, m.gid) {
                    if !plan::active() {
                        dir.chown_entry(name, want.0, want.1)?;
                    }
                    changes.push(Change::new(
                        link.to_string(),
                        format!("owner {}:{} -> {}:{}", m.uid, m.gid, want.0, want.1),
                    ));
                }
            } else {
                replace(dir, name, &source, owner.applied_to(m.uid, m.gid))?;
                changes
                    .push(Change::new(link.to_string(), format!("link retargeted {} -> {source}", current.display())));
            }
        }
        Some(m) => {
            return Err(SymlinkError::NotALink { path: link.as_path().to_path_buf(), found: dirfd::kind_of(m.kind) })
        }
    }
    Ok(())
}

/// `current` and `want` name the same path once written the same way (`/a//b` is `/a/b`).
fn points_to(current: &Path, want: &AbsPath) -> bool {
    current.to_str().and_then(|s| AbsPath::parse(s).ok()).is_some_and(|c| &c == want)
}

/// A new link beside `name`, owned with `fchownat(AT_SYMLINK_NOFOLLOW)`, renamed over it.
/// A plan records the change without making it.
fn replace(dir: &Dir, name: &OsStr, source: &AbsPath, (uid, gid): (u32, u32)) -> Result<(), SymlinkError> {
    if plan::active() {
        return Ok(());
    }
    let tmp = dir.temp_name(name);
    let made = (|| {
        dir.symlink(source.as_path(), &tmp)?;
        if (uid, gid) != (0, 0) {
            dir.chown_entry(&tmp, uid, gid)?;
        }
        dir.rename(&tmp, name)
    })();
    if made.is_err() {
        let _ = dir.unlink(&tmp);
    }
    made?;
    Ok(dir.fsync()?)
}

fn remove(link: &AbsPath, changes: &mut Vec<Change>) -> Result<(), SymlinkError> {
    let Some(r) = open_parent(link)? else {
        return Ok(());
    };
    let (dir, name) = (&r.parent, r.name.as_deref().unwrap_or_default());
    match dir.stat(name)? {
        None => Ok(()),
        Some(m) if m.kind == FileType::Symlink => {
            if !plan::active() {
                dir.unlink(name)?;
            }
            changes.push(Change::new(link.to_string(), "link removed"));
            Ok(())
        }
        Some(m) => Err(SymlinkError::NotALink { path: link.as_path().to_path_buf(), found: dirfd::kind_of(m.kind) }),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    use serde_json::{json, Value};
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn symlink(raw: Value) -> LinuxSymlink {
        crate::states::testutil::typed("linux.symlink", raw)
    }

    #[test]
    fn creates_then_does_nothing_then_retargets() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("current");
        let v1 = tmp.path().join("v1");
        let v2 = tmp.path().join("v2");
        let p = symlink(json!({"target": link, "source": v1}));
        let out = apply(&p);
        assert!(out.result && out.changes.len() == 1, "{out:?}");
        assert_eq!(fs::read_link(&link).unwrap(), v1);
        let again = apply(&p);
        assert!(again.result && again.changes.is_empty(), "{again:?}");

        let out = apply(&symlink(json!({"target": link, "source": v2, "user": "nobody"})));
        assert!(out.result, "{}", out.comment);
        assert!(out.changes[0].what.starts_with("link retargeted"), "{:?}", out.changes);
        assert_eq!(fs::read_link(&link).unwrap(), v2);
        assert_eq!(fs::symlink_metadata(&link).unwrap().uid(), 65534);
        // Only the link remains in the directory: no temporary left behind.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        // Without user and group the owner goes back to root, as the adaptor set it.
        let out = apply(&symlink(json!({"target": link, "source": v2})));
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert_eq!(out.changes[0].what, "owner 65534:0 -> 0:0");
        assert_eq!(fs::symlink_metadata(&link).unwrap().uid(), 0);
    }

    #[test]
    fn owner_is_enforced_with_lchown_and_mode_is_ignored_with_a_note() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("l");
        let target_file = tmp.path().join("real");
        fs::write(&target_file, "").unwrap();
        std::os::unix::fs::symlink(&target_file, &link).unwrap();
        let out = apply(&symlink(json!({"target": link, "source": target_file, "group": "nogroup", "mode": "0777"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert!(out.comment.contains("mode 0777 ignored"), "{}", out.comment);
        assert_eq!(fs::symlink_metadata(&link).unwrap().gid(), 65534);
        // The file the link points to is untouched.
        assert_eq!(fs::metadata(&target_file).unwrap().gid(), 0);
    }

    #[test]
    fn refuses_non_links_and_missing_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, "data").unwrap();
        let out = apply(&symlink(json!({"target": file, "source": "/etc"})));
        assert!(!out.result && out.comment.contains("is a regular file, not a symbolic link"), "{}", out.comment);
        let out = apply(&symlink(json!({"target": file, "absent": true, "source": "/etc"})));
        assert!(!out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&file).unwrap(), "data");

        let out = apply(&symlink(json!({"target": tmp.path().join("no/l"), "source": "/etc"})));
        assert!(!out.result && out.comment.contains("does not exist"), "{}", out.comment);
        crate::states::testutil::refused(
            "linux.symlink",
            json!({"target": tmp.path().join("l"), "source": "../etc"}),
            "parameter \"source\"",
        );
    }

    #[test]
    fn a_link_planted_on_the_way_where_another_user_writes_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let www = tmp.path().join("www");
        fs::create_dir(&www).unwrap();
        std::os::unix::fs::chown(&www, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::symlink(&victim, www.join("conf")).unwrap();
        let out = apply(&symlink(json!({"target": www.join("conf/current"), "source": "/srv/v2"})));
        assert_eq!(
            out.comment,
            format!(
                "{}: a symbolic link in a directory writable by uid 65534; refusing to follow it",
                www.join("conf").display()
            )
        );
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
        // The link itself, in the user's directory, is managed without being followed.
        let out = apply(&symlink(json!({"target": www.join("conf"), "source": "/srv/v2"})));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_link(www.join("conf")).unwrap(), Path::new("/srv/v2"));
    }

    #[test]
    fn absent_removes_only_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let p = symlink(json!({"target": link, "source": "/x", "absent": true}));
        let out = apply(&p);
        assert!(out.result && out.changes.len() == 1, "{out:?}");
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(tmp.path().is_dir());
        assert!(apply(&p).changes.is_empty());
    }
}
