//! Filesystem steps shared by the file-like states.
//!
//! Root acting on paths that other users may control must not be tricked into following
//! a symbolic link: every path is opened component by component through [`crate::dirfd`]
//! (links on the way followed only where only root could have placed them), and owners,
//! modes, creations and replacements go through the opened descriptors, never by path.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::Change;

use crate::dirfd::{self, Dir, Last, Meta, NewDirs, WalkError};
use crate::identity::Owner;

/// Mode and owner of directories created on the way to what a state manages.
pub const PARENT_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{0} is a symbolic link; refusing to act through it")]
    Symlink(PathBuf),
    #[error("{path} exists and is {found}, not a directory")]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error(transparent)]
    Walk(WalkError),
}

impl From<WalkError> for FsError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::Symlink(p) => Self::Symlink(p),
            WalkError::NotADirectory { path, found } => Self::NotADirectory { path, found },
            WalkError::Io { path, op, source } => Self::Io { path, op, source },
            e => Self::Walk(e),
        }
    }
}

pub fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> FsError {
    let path = path.to_path_buf();
    move |source| FsError::Io { path, op, source }
}

/// What kind of object a file type is, for messages.
pub fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "a special file"
    }
}

/// `lstat`, with "missing" as `None`. For looking only: nothing may be changed on the
/// strength of it (the path can change meanwhile).
pub fn lstat(path: &Path) -> Result<Option<fs::Metadata>, FsError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "inspect")(e)),
    }
}

/// Opens an existing object without following a link at its last component (links on
/// the way: under the rule of [`crate::dirfd`]). `O_NONBLOCK` keeps a FIFO swapped in
/// behind our back from hanging the open.
pub fn open_nofollow(path: &Path, directory: bool) -> Result<File, FsError> {
    let r = dirfd::resolve(path, Last::NoFollow, None, &mut |_, _| {})?;
    let missing = || io_err(path, "open")(io::ErrorKind::NotFound.into());
    let Some(name) = r.name else {
        return Ok(r.parent.into_file()?);
    };
    if directory {
        Ok(r.parent.subdir(&name)?.ok_or_else(missing)?.into_file()?)
    } else {
        r.parent.open_file(&name)?.ok_or_else(missing)
    }
}

pub fn describe_mode(mode: u32) -> String {
    format!("{mode:04o}")
}

/// Brings owner and mode of the open object `f` (at `path`) to what is wanted,
/// recording each change. `mode` `None` keeps the mode. Owner first: chown clears
/// set-id bits the mode may want.
pub fn enforce_attrs(
    f: impl AsFd,
    path: &Path,
    mode: Option<u32>,
    owner: &Owner,
    changes: &mut Vec<Change>,
) -> Result<(), FsError> {
    let before = Meta::of_fd(f.as_fd(), path)?;
    enforce_attrs_from(f, path, before, mode, owner, changes)
}

/// [`enforce_attrs`] of an object whose owner and mode `before` its caller has just read
/// by `fstat` of the same descriptor.
pub fn enforce_attrs_from(
    f: impl AsFd,
    path: &Path,
    before: Meta,
    mode: Option<u32>,
    owner: &Owner,
    changes: &mut Vec<Change>,
) -> Result<(), FsError> {
    let fd = f.as_fd();
    let (uid, gid) = (before.uid, before.gid);
    let before_mode = before.mode;
    let (want_uid, want_gid) = owner.applied_to(uid, gid);
    // A plan records the same changes without making them.
    if !crate::plan::active() {
        dirfd::set_attrs_from(fd, path, before, want_uid, want_gid, mode)?;
    }
    if (want_uid, want_gid) != (uid, gid) {
        changes.push(Change::new(path.display().to_string(), format!("owner {uid}:{gid} -> {want_uid}:{want_gid}")));
    }
    // Compared with the mode before chown: a mode that only chown disturbed and we
    // restored is not a change the user asked about twice.
    if let Some(want) = mode.filter(|m| *m != before_mode) {
        changes.push(Change::new(
            path.display().to_string(),
            format!("mode {} -> {}", describe_mode(before_mode), describe_mode(want)),
        ));
    }
    Ok(())
}

/// Creates the missing directories from the nearest existing ancestor down to `path`
/// included, each with `mode` and `owner`, through directory descriptors. Links on the
/// way are followed only under the rule of [`crate::dirfd`].
pub fn create_dirs(path: &AbsPath, mode: u32, owner: (Uid, Gid), changes: &mut Vec<Change>) -> Result<(), FsError> {
    if crate::plan::active() {
        return planned_dirs(path.as_path(), mode, owner, changes).map(drop);
    }
    create_dir_all(path.as_path(), mode, owner, changes).map(drop)
}

/// [`create_dir_all`] in a plan: the directory `path` opened when it exists; otherwise
/// `None`, and the directories that would be created are recorded as created.
pub fn planned_dirs(
    path: &Path,
    mode: u32,
    owner: (Uid, Gid),
    changes: &mut Vec<Change>,
) -> Result<Option<Dir>, FsError> {
    let mut record = |dir: &Path| {
        changes.push(Change::new(
            dir.display().to_string(),
            format!("directory created ({} {}:{})", describe_mode(mode), owner.0, owner.1),
        ))
    };
    let first_missing = match dirfd::resolve(path, Last::Follow, None, &mut |_, _| {}) {
        Ok(r) => match r.name {
            None => return Ok(Some(r.parent)),
            Some(name) => match r.parent.stat(&name)? {
                Some(m) if m.is_dir() => return Ok(r.parent.subdir(&name)?),
                Some(m) => {
                    return Err(FsError::NotADirectory { path: r.parent.join(&name), found: dirfd::kind_of(m.kind) })
                }
                None => r.parent.join(&name),
            },
        },
        Err(WalkError::Missing(first)) => first,
        Err(e) => return Err(e.into()),
    };
    // From the first missing directory down to `path` (a link on the way may have
    // taken the walk elsewhere: then the first missing one is all that is known).
    let mut missing: Vec<&Path> = path.ancestors().take_while(|a| a.starts_with(&first_missing)).collect();
    if missing.is_empty() {
        missing.push(&first_missing);
    }
    for dir in missing.into_iter().rev() {
        record(dir);
    }
    Ok(None)
}

/// [`create_dirs`], returning the opened directory `path`.
pub fn create_dir_all(path: &Path, mode: u32, owner: (Uid, Gid), changes: &mut Vec<Change>) -> Result<Dir, FsError> {
    let new = NewDirs { mode, uid: owner.0.as_raw(), gid: owner.1.as_raw() };
    let mut record = |dir: &Path, new: NewDirs| {
        changes.push(Change::new(
            dir.display().to_string(),
            format!("directory created ({} {}:{})", describe_mode(new.mode), new.uid, new.gid),
        ))
    };
    Ok(dirfd::create_dir_all(path, new, &mut record)?)
}

/// Makes sure `dir` (a file's parent) exists, creating root-owned 0755 directories.
pub fn ensure_parent(dir: &AbsPath, changes: &mut Vec<Change>) -> Result<(), FsError> {
    create_dirs(dir, PARENT_DIR_MODE, (Uid::from_raw(0), Gid::from_raw(0)), changes)
}

pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    Ok(Dir::open(dir)?.fsync()?)
}

/// When a replaced file is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Before the call returns: the file and its directory are `fsync`ed.
    Now,
    /// By the next flush of [`crate::durable::Pending::host`] (`linux.file`: see
    /// durable.rs for what a power cut can take).
    Batched,
}

/// Replaces (or creates) `path` with `content`, owner and mode, atomically: a reader
/// sees the old file or the new one, and after a crash one of them is on disk whole.
/// A link at `path` is replaced, never written through.
pub fn write_atomic(path: &AbsPath, content: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
    let r = dirfd::resolve(path.as_path(), Last::NoFollow, None, &mut |_, _| {})?;
    let name = r.name.ok_or_else(|| FsError::NotADirectory { path: "/".into(), found: "the root" })?;
    write_in(&r.parent, &name, content, (mode, uid, gid), Durable::Now)
}

/// [`write_atomic`] of the entry `name` of the opened directory `dir`: a temporary file
/// created in `dir`, written, owned and renamed onto `name`, made durable as `durable`
/// says.
pub fn write_in(
    dir: &Dir,
    name: &OsStr,
    content: &[u8],
    (mode, uid, gid): (u32, u32, u32),
    durable: Durable,
) -> Result<(), FsError> {
    let (tmp, mut f) = dir.create_temp(name)?;
    let shown = dir.join(&tmp);
    let written = (|| {
        f.write_all(content).map_err(io_err(&shown, "write"))?;
        install_in(dir, &tmp, &f, name, (mode, uid, gid), durable)
    })();
    if written.is_err() {
        let _ = dir.unlink(&tmp);
    }
    written
}

/// Puts the finished temporary file `tmp` (an entry of `dir`, open as `f`) in place of
/// `name` with owner and mode, atomically, and makes it durable as `durable` says.
pub fn install_in(
    dir: &Dir,
    tmp: &OsStr,
    f: &File,
    name: &OsStr,
    (mode, uid, gid): (u32, u32, u32),
    durable: Durable,
) -> Result<(), FsError> {
    let shown = dir.join(tmp);
    // Set on the descriptor: the umask must not decide the mode.
    dirfd::set_attrs(f.as_fd(), &shown, uid, gid, Some(mode))?;
    match durable {
        Durable::Now => {
            f.sync_all().map_err(io_err(&shown, "fsync"))?;
            dir.rename(tmp, name)?;
            Ok(dir.fsync()?)
        }
        Durable::Batched => {
            dir.rename(tmp, name)?;
            Ok(crate::durable::Pending::host().note(dir)?)
        }
    }
}

/// [`write_atomic`] through the temporary file `tmp`, which must not exist and must be
/// in `path`'s directory (for callers that need a name of their own choosing).
pub fn write_atomic_via(tmp: &Path, path: &Path, content: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
    let r = dirfd::resolve(path, Last::NoFollow, None, &mut |_, _| {})?;
    let name = r.name.ok_or_else(|| FsError::NotADirectory { path: "/".into(), found: "the root" })?;
    let tmp_name = tmp.file_name().ok_or_else(|| FsError::NotADirectory { path: tmp.into(), found: "no name" })?;
    let mut f = r.parent.create_named(tmp_name)?;
    let written = (|| {
        f.write_all(content).map_err(io_err(tmp, "write"))?;
        install_in(&r.parent, tmp_name, &f, &name, (mode, uid, gid), Durable::Now)
    })();
    if written.is_err() {
        let _ = r.parent.unlink(tmp_name);
    }
    written
}

/// Whether the open regular file's content differs from the open file `o` (at
/// `other`), compared in chunks (either may be large).
pub fn files_differ(f: &mut File, path: &Path, o: &mut File, other: &Path) -> Result<bool, FsError> {
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    if len != o.metadata().map_err(io_err(other, "stat"))?.len() {
        return Ok(true);
    }
    let (mut a, mut b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(f, &mut a).map_err(io_err(path, "read"))?;
        let m = read_full(o, &mut b[..n.max(1)]).map_err(io_err(other, "read"))?;
        if n != m || a[..n] != b[..m] {
            return Ok(true);
        }
        if n == 0 {
            return Ok(false);
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Whether the open regular file, `len` bytes long by its `fstat`, differs from `want`.
/// Reads exactly `len` bytes: no size probe and no read to see the end (`read_to_end`
/// costs an `fstat`, an `lseek` and an extra `read` per file); a file that shrinks
/// meanwhile reads short and differs, one that grows is caught by the next round.
pub fn content_differs(f: &mut File, path: &Path, len: u64, want: &[u8]) -> Result<bool, FsError> {
    if len != want.len() as u64 {
        return Ok(true);
    }
    let mut have = vec![0; want.len()];
    let n = read_full(f, &mut have).map_err(io_err(path, "read"))?;
    Ok(n != want.len() || have != want)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn create_dirs_creates_each_missing_level_and_refuses_files_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let deep = AbsPath::parse(&format!("{}/a/b/c", dir.path().display())).unwrap();
        let mut changes = Vec::new();
        create_dirs(&deep, 0o750, (Uid::from_raw(65534), Gid::from_raw(65534)), &mut changes).unwrap();
        assert_eq!(changes.len(), 3);
        let m = fs::metadata(deep.as_path()).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o750, 65534));
        changes.clear();
        create_dirs(&deep, 0o750, (Uid::from_raw(0), Gid::from_raw(0)), &mut changes).unwrap();
        assert!(changes.is_empty());

        fs::write(dir.path().join("f"), "").unwrap();
        let under_file = AbsPath::parse(&format!("{}/f/x", dir.path().display())).unwrap();
        let err = create_dirs(&under_file, 0o755, (Uid::from_raw(0), Gid::from_raw(0)), &mut changes).unwrap_err();
        assert!(err.to_string().contains("is a regular file, not a directory"), "{err}");
    }

    #[test]
    fn create_dirs_and_write_atomic_refuse_a_link_planted_where_another_user_writes() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::symlink(&victim, home.join("cache")).unwrap();
        let mut changes = Vec::new();
        let deep = AbsPath::parse(&format!("{}/cache/a/b", home.display())).unwrap();
        let err = create_dirs(&deep, 0o755, (Uid::from_raw(0), Gid::from_raw(0)), &mut changes).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}/cache: a symbolic link in a directory writable by uid 65534; refusing to follow it",
                home.display()
            )
        );
        let file = AbsPath::parse(&format!("{}/cache/conf", home.display())).unwrap();
        let err = write_atomic(&file, b"x", 0o644, 0, 0).unwrap_err();
        assert!(err.to_string().contains("refusing to follow it"), "{err}");
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 0, "nothing written outside");
        assert!(changes.is_empty());
        // In the user's own directory, by descriptor, creating is fine.
        let own = AbsPath::parse(&format!("{}/a/b", home.display())).unwrap();
        create_dirs(&own, 0o700, (Uid::from_raw(65534), Gid::from_raw(65534)), &mut changes).unwrap();
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn open_nofollow_reports_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(matches!(open_nofollow(&link, false), Err(FsError::Symlink(_))));
    }
}
