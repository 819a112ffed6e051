//! `linux.dir`: directories with an owner and mode, or their absence.
//!
//! Defaults are the original adaptor's (Salt `file.directory` with `makedirs`):
//! `user`/`group` default to root and are enforced; without `mode` an existing
//! directory keeps its mode and a new one gets 0755. Directories this state creates,
//! parents included, get its owner and mode. `recursive` (default false) also applies
//! the owner, and the mode when one is given, to everything below: sub-directories and
//! regular files alike (Salt's `file_mode` defaulted to `dir_mode`).
//!
//! Everything goes through directory descriptors ([`crate::dirfd`]): the path is opened
//! component by component (a link on the way, or at the path itself, is followed only
//! where only root could have placed it), and the recursive walk lists an opened
//! directory and opens each entry relative to it, never following a link. The owner of
//! the tree may swap a sub-directory for a link to `/etc` during the walk: the walk
//! still only ever changes what it opened below the tree. Links, devices, FIFOs and
//! sockets below are left alone, and so is a file with several hard links whose owner
//! or mode would change (its other name may be anywhere on the file system).

use std::ffi::OsString;
use std::path::PathBuf;
use std::rc::Rc;

use opsagent_proto::catalogue::LinuxDir;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};
use rustix::fs::FileType;

use crate::dirfd::{self, Dir, Last, WalkError};
use crate::fsutil::{self, FsError};
use crate::identity::{IdentityError, Owner};
use crate::plan;

/// Removing a directory this close to the root is never what a recipe means.
const MIN_COMPONENTS_TO_REMOVE: usize = 2;
/// Mode of a directory created without `mode`.
const NEW_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("refusing to remove {0}: a directory to remove needs at least {MIN_COMPONENTS_TO_REMOVE} path components")]
    TooShallow(AbsPath),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{path} is {found}, not a directory; linux.dir leaves it alone")]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error(
        "{0} has several hard links; linux.dir does not change the owner or mode of a file that may also be elsewhere"
    )]
    HardLinked(PathBuf),
}

pub fn apply(p: &LinuxDir) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, &mut changes);
    let target: Vec<String> = p.path.iter().map(ToString::to_string).collect();
    super::finish(&target.join(", "), result, changes, &[])
}

fn run(p: &LinuxDir, changes: &mut Vec<Change>) -> Result<(), DirError> {
    // The paths were checked (all of them) by the catalogue's decode.
    let paths: &[AbsPath] = &p.path;
    if p.absent {
        if let Some(shallow) = paths.iter().find(|d| depth(d) < MIN_COMPONENTS_TO_REMOVE) {
            return Err(DirError::TooShallow(shallow.clone()));
        }
        return paths.iter().try_for_each(|d| remove(d, changes));
    }
    let owner = super::file::owner_or_root(p.user.as_deref(), p.group.as_deref())?;
    let mode = p.mode.map(|m| m.bits());
    for path in paths {
        let (uid, gid) = owner.for_new();
        if plan::active() {
            // The same walk over what exists; what is missing would be created.
            let planned = fsutil::planned_dirs(path.as_path(), mode.unwrap_or(NEW_DIR_MODE), (uid, gid), changes)
                .map_err(|e| match e {
                    FsError::NotADirectory { path, found } => DirError::NotADirectory { path, found },
                    e => e.into(),
                })?;
            if let Some(dir) = planned {
                fsutil::enforce_attrs(&dir, dir.path(), mode, &owner, changes)?;
                if p.recursive {
                    enforce_below(dir, mode, &owner, changes)?;
                }
            }
            continue;
        }
        let dir =
            fsutil::create_dir_all(path.as_path(), mode.unwrap_or(NEW_DIR_MODE), (uid, gid), changes).map_err(|e| {
                match e {
                    FsError::NotADirectory { path, found } => DirError::NotADirectory { path, found },
                    e => e.into(),
                }
            })?;
        fsutil::enforce_attrs(&dir, dir.path(), mode, &owner, changes)?;
        if p.recursive {
            enforce_below(dir, mode, &owner, changes)?;
        }
    }
    Ok(())
}

fn depth(p: &AbsPath) -> usize {
    p.as_path().components().filter(|c| matches!(c, std::path::Component::Normal(_))).count()
}

/// Walks the tree below `top` by descriptor (an explicit stack: depth is bounded by
/// memory, not by the thread's stack; open descriptors by the depth of the tree).
/// An entry that is swapped between listing and opening is skipped: only the tree's
/// owner can do that, and what they get is a walk that missed their own entry.
fn enforce_below(top: Dir, mode: Option<u32>, owner: &Owner, changes: &mut Vec<Change>) -> Result<(), DirError> {
    let mut pending: Vec<(Rc<Dir>, OsString)> = Vec::new();
    let top = Rc::new(top);
    push_entries(&top, &mut pending)?;
    while let Some((parent, name)) = pending.pop() {
        let Some(meta) = parent.stat(&name)? else { continue };
        match meta.kind {
            FileType::Directory => {
                let sub = match parent.subdir(&name) {
                    Ok(Some(sub)) => sub,
                    Ok(None) | Err(WalkError::Symlink(_) | WalkError::NotADirectory { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                fsutil::enforce_attrs(&sub, sub.path(), mode, owner, changes)?;
                let sub = Rc::new(sub);
                push_entries(&sub, &mut pending)?;
            }
            FileType::RegularFile => {
                let path = parent.join(&name);
                let f = match parent.open_file(&name) {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(WalkError::Symlink(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                // The type and link count on the descriptor: the name may have changed.
                let now = dirfd::Meta::of_file(&f, &path)?;
                if now.kind != FileType::RegularFile {
                    continue;
                }
                let (uid, gid) = owner.applied_to(now.uid, now.gid);
                if now.several_links && ((uid, gid) != (now.uid, now.gid) || mode.is_some_and(|m| m != now.mode)) {
                    return Err(DirError::HardLinked(path));
                }
                fsutil::enforce_attrs(&f, &path, mode, owner, changes)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn push_entries(dir: &Rc<Dir>, pending: &mut Vec<(Rc<Dir>, OsString)>) -> Result<(), DirError> {
    for (name, _) in dir.entries()? {
        pending.push((Rc::clone(dir), name));
    }
    Ok(())
}

fn remove(dir: &AbsPath, changes: &mut Vec<Change>) -> Result<(), DirError> {
    let r = match dirfd::resolve(dir.as_path(), Last::NoFollow, None, &mut |_, _| {}) {
        Ok(r) => r,
        // A missing directory on the way: nothing to remove.
        Err(WalkError::Missing(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let Some(name) = r.name else {
        return Err(DirError::TooShallow(dir.clone()));
    };
    match r.parent.stat(&name)? {
        None => Ok(()),
        Some(m) if m.is_dir() => {
            if !plan::active() {
                r.parent.remove_tree(&name)?;
            }
            changes.push(Change::new(dir.to_string(), "removed"));
            Ok(())
        }
        Some(m) => Err(DirError::NotADirectory { path: dir.as_path().to_path_buf(), found: dirfd::kind_of(m.kind) }),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    use serde_json::{json, Value};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    fn dir(raw: Value) -> LinuxDir {
        crate::states::testutil::typed("linux.dir", raw)
    }

    fn attrs(p: &Path) -> (u32, u32, u32) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    }

    #[test]
    fn creates_with_parents_then_does_nothing_the_second_time() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("x/y");
        let b = tmp.path().join("z");
        let p = dir(json!({"path": [a, b], "mode": "0750", "user": "nobody"}));
        let out = apply(&p);
        assert!(out.result, "{}", out.comment);
        assert_eq!(out.changes.len(), 3, "{:?}", out.changes);
        assert_eq!(attrs(&a), (0o750, 65534, 0));
        assert_eq!(attrs(&tmp.path().join("x")), (0o750, 65534, 0));
        let again = apply(&p);
        assert!(again.result && again.changes.is_empty(), "{again:?}");
    }

    #[test]
    fn without_mode_an_existing_directory_keeps_its_mode_and_a_new_one_gets_0755() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o2770)).unwrap();
        std::os::unix::fs::chown(&old, Some(65534), Some(65534)).unwrap();
        let new = tmp.path().join("new");
        let out = apply(&dir(json!({"path": [old, new]})));
        assert!(out.result, "{}", out.comment);
        // user and group default to root and are enforced, as the adaptor did; chown
        // clears set-gid, which the kept mode puts back.
        assert_eq!(attrs(&old), (0o2770, 0, 0));
        assert_eq!(attrs(&new), (0o755, 0, 0));
        let what: Vec<_> = out.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["owner 65534:65534 -> 0:0", "directory created (0755 0:0)"]);
    }

    #[test]
    fn recursive_defaults_to_false_and_applies_owner_and_mode_to_files_too() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("app");
        fs::create_dir_all(top.join("sub/deeper")).unwrap();
        fs::write(top.join("sub/file"), "").unwrap();
        fs::set_permissions(top.join("sub/file"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("/etc", top.join("sub/link")).unwrap();

        let flat = apply(&dir(json!({"path": top, "mode": "0711", "group": "nogroup"})));
        assert_eq!(flat.changes.len(), 2, "{:?}", flat.changes);
        assert_eq!(attrs(&top.join("sub")).0, 0o755, "recursive is off by default");

        let p = dir(json!({"path": top, "mode": "0711", "group": "nogroup", "recursive": true}));
        let out = apply(&p);
        assert!(out.result, "{}", out.comment);
        for d in [&top, &top.join("sub"), &top.join("sub/deeper"), &top.join("sub/file")] {
            assert_eq!(attrs(d), (0o711, 0, 65534), "{}", d.display());
        }
        // Links below are not touched, nor followed.
        assert_eq!(attrs(&top.join("sub/link")).2, 0);
        assert_ne!(attrs(Path::new("/etc")).2, 65534);
        assert!(apply(&p).changes.is_empty());

        // Without mode, recursive brings the owner only.
        let p = dir(json!({"path": top, "user": "nobody", "recursive": true}));
        assert!(apply(&p).result);
        assert_eq!(attrs(&top.join("sub/file")), (0o711, 65534, 0));
    }

    #[test]
    fn recursive_leaves_a_hard_linked_file_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("app");
        fs::create_dir(&top).unwrap();
        let precious = tmp.path().join("shadow");
        fs::write(&precious, "").unwrap();
        fs::set_permissions(&precious, fs::Permissions::from_mode(0o600)).unwrap();
        fs::hard_link(&precious, top.join("h")).unwrap();
        let out = apply(&dir(json!({"path": top, "user": "nobody", "recursive": true})));
        assert!(!out.result && out.comment.contains("has several hard links"), "{}", out.comment);
        assert_eq!(attrs(&precious), (0o600, 0, 0));
    }

    #[test]
    fn absent_removes_recursively_and_refuses_shallow_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("gone");
        fs::create_dir_all(top.join("a/b")).unwrap();
        let p = dir(json!({"path": top, "absent": true}));
        let out = apply(&p);
        assert!(out.result && out.changes.len() == 1, "{out:?}");
        assert!(!top.exists());
        assert!(apply(&p).changes.is_empty());

        for shallow in ["/", "/etc"] {
            let out = apply(&dir(json!({"path": [top, shallow], "absent": true})));
            assert!(!out.result && out.comment.contains("refusing to remove"), "{}", out.comment);
        }
        assert!(Path::new("/etc").is_dir());
    }

    #[test]
    fn a_file_or_an_untrusted_link_where_a_directory_is_wanted_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, "").unwrap();
        let out = apply(&dir(json!({"path": f})));
        assert!(!out.result && out.comment.contains("is a regular file, not a directory"), "{}", out.comment);
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let www = tmp.path().join("www");
        fs::create_dir(&www).unwrap();
        std::os::unix::fs::chown(&www, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::symlink(&victim, www.join("l")).unwrap();
        let out = apply(&dir(json!({"path": www.join("l"), "user": "nobody"})));
        assert_eq!(
            out.comment,
            format!(
                "{}: a symbolic link in a directory writable by uid 65534; refusing to follow it",
                www.join("l").display()
            )
        );
        assert_eq!(attrs(&victim).1, 0);
        crate::states::testutil::refused("linux.dir", json!({"path": ["relative/x"]}), "not absolute");
    }
}
