//! `linux.dir`: directories with an owner and mode, or their absence.
//!
//! Directories this state creates, parents included, get its owner and mode (as Salt's
//! `makedirs` did). With `recursive` (the default) owner and mode also go to every
//! sub-directory; files inside are left alone. Links are never followed: a link where a
//! directory is wanted is an error, and the recursive walk does not descend into one.

use std::fs;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::LinuxDir;
use opsagent_proto::newtypes::{AbsPath, InvalidValue};
use opsagent_proto::request::{Change, Outcome};

use crate::fsutil::{self, kind_of, FsError};
use crate::identity::{IdentityError, Owner};

/// Removing a directory this close to the root is never what a recipe means.
const MIN_COMPONENTS_TO_REMOVE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("parameter path: {0}")]
    Path(#[from] InvalidValue),
    #[error("refusing to remove {0}: a directory to remove needs at least {MIN_COMPONENTS_TO_REMOVE} path components")]
    TooShallow(AbsPath),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path} is {found}, not a directory; linux.dir leaves it alone")]
    NotADirectory { path: PathBuf, found: &'static str },
}

pub fn apply(p: &LinuxDir) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, &mut changes);
    super::finish(&p.path.join(", "), result, changes, &[])
}

fn run(p: &LinuxDir, changes: &mut Vec<Change>) -> Result<(), DirError> {
    // All paths are checked before anything is touched.
    let paths = p.path.iter().map(|s| AbsPath::parse(s)).collect::<Result<Vec<_>, _>>()?;
    if p.absent {
        if let Some(shallow) = paths.iter().find(|d| depth(d) < MIN_COMPONENTS_TO_REMOVE) {
            return Err(DirError::TooShallow(shallow.clone()));
        }
        return paths.iter().try_for_each(|d| remove(d, changes));
    }
    let owner = Owner::resolve(p.user.as_deref(), p.group.as_deref())?;
    let mode = p.mode.bits();
    for dir in &paths {
        match fsutil::lstat(dir.as_path())? {
            None => fsutil::create_dirs(dir, mode, owner.for_new(), changes)?,
            Some(m) if m.is_dir() => {
                let f = fsutil::open_nofollow(dir.as_path(), true)?;
                fsutil::enforce_attrs(&f, dir.as_path(), Some(mode), &owner, changes)?;
            }
            Some(m) => {
                return Err(DirError::NotADirectory {
                    path: dir.as_path().to_path_buf(),
                    found: kind_of(m.file_type()),
                })
            }
        }
        if p.recursive {
            enforce_below(dir.as_path(), mode, &owner, changes)?;
        }
    }
    Ok(())
}

fn depth(p: &AbsPath) -> usize {
    p.as_path().components().filter(|c| matches!(c, std::path::Component::Normal(_))).count()
}

/// Walks the tree below `top` without following links (an explicit stack: depth is
/// bounded by memory, not by the thread's stack).
fn enforce_below(top: &Path, mode: u32, owner: &Owner, changes: &mut Vec<Change>) -> Result<(), DirError> {
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(fsutil::io_err(&dir, "list"))? {
            let entry = entry.map_err(fsutil::io_err(&dir, "list"))?;
            let ft = entry.file_type().map_err(fsutil::io_err(&entry.path(), "inspect"))?;
            if ft.is_dir() {
                let sub = entry.path();
                let f = fsutil::open_nofollow(&sub, true)?;
                fsutil::enforce_attrs(&f, &sub, Some(mode), owner, changes)?;
                pending.push(sub);
            }
        }
    }
    Ok(())
}

fn remove(dir: &AbsPath, changes: &mut Vec<Change>) -> Result<(), DirError> {
    match fsutil::lstat(dir.as_path())? {
        None => Ok(()),
        Some(m) if m.is_dir() => {
            fs::remove_dir_all(dir).map_err(fsutil::io_err(dir.as_path(), "remove"))?;
            changes.push(Change::new(dir.to_string(), "removed"));
            Ok(())
        }
        Some(m) => Err(DirError::NotADirectory { path: dir.as_path().to_path_buf(), found: kind_of(m.file_type()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::{json, Value};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
    fn enforces_on_existing_directories_and_recursively_on_subdirectories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("app");
        fs::create_dir_all(top.join("sub/deeper")).unwrap();
        fs::write(top.join("sub/file"), "").unwrap();
        fs::set_permissions(top.join("sub/file"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("/etc", top.join("sub/link")).unwrap();
        let p = dir(json!({"path": top, "mode": "0711", "group": "nogroup"}));
        let out = apply(&p);
        assert!(out.result, "{}", out.comment);
        for d in [&top, &top.join("sub"), &top.join("sub/deeper")] {
            assert_eq!(attrs(d), (0o711, 0, 65534), "{}", d.display());
        }
        // Files and links below are not touched, and the link is not followed.
        assert_eq!(attrs(&top.join("sub/file")), (0o600, 0, 0));
        assert_ne!(attrs(Path::new("/etc")).2, 65534);
        assert!(apply(&p).changes.is_empty());

        let flat = dir(json!({"path": top, "mode": "0755", "recursive": false}));
        let out = apply(&flat);
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert_eq!(attrs(&top.join("sub")).0, 0o711);
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
    fn a_file_or_link_where_a_directory_is_wanted_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, "").unwrap();
        let out = apply(&dir(json!({"path": f})));
        assert!(!out.result && out.comment.contains("is a regular file, not a directory"), "{}", out.comment);
        let l = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &l).unwrap();
        let out = apply(&dir(json!({"path": l})));
        assert!(!out.result && out.comment.contains("is a symbolic link"), "{}", out.comment);
        crate::states::testutil::refused("linux.dir", json!({"path": ["relative/x"]}), "not absolute");
    }
}
