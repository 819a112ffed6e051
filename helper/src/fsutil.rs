//! Filesystem steps shared by the file-like states.
//!
//! Root acting on paths that other users may control must not be tricked into following
//! a symbolic link at the final component: objects are opened with `O_NOFOLLOW` and
//! their owner and mode changed through that descriptor, never by path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::OFlag;
use nix::unistd::{Gid, Uid};
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::Change;

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

/// `lstat`, with "missing" as `None`.
pub fn lstat(path: &Path) -> Result<Option<fs::Metadata>, FsError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "inspect")(e)),
    }
}

/// Opens an existing object without following a link at its last component.
/// `O_NONBLOCK` keeps a FIFO swapped in behind our back from hanging the open.
pub fn open_nofollow(path: &Path, directory: bool) -> Result<File, FsError> {
    let mut flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    OpenOptions::new().read(true).custom_flags(flags.bits()).open(path).map_err(|e| {
        if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
            FsError::Symlink(path.to_path_buf())
        } else {
            io_err(path, "open")(e)
        }
    })
}

pub fn describe_mode(mode: u32) -> String {
    format!("{mode:04o}")
}

/// Brings owner and mode of the open object `f` (at `path`) to what is wanted,
/// recording each change. Owner first: chown clears set-id bits the mode may want.
pub fn enforce_attrs(
    f: &File,
    path: &Path,
    mode: Option<u32>,
    owner: &Owner,
    changes: &mut Vec<Change>,
) -> Result<(), FsError> {
    let meta = f.metadata().map_err(io_err(path, "stat"))?;
    enforce_attrs_known(f, &meta, path, mode, owner, changes)
}

/// [`enforce_attrs`] for a caller that has just read `meta` through `f` (one `fstat`
/// less on the path every idempotent file state takes).
pub fn enforce_attrs_known(
    f: &File,
    meta: &fs::Metadata,
    path: &Path,
    mode: Option<u32>,
    owner: &Owner,
    changes: &mut Vec<Change>,
) -> Result<(), FsError> {
    let (uid, gid) = (meta.uid(), meta.gid());
    let (want_uid, want_gid) = owner.applied_to(uid, gid);
    let mut current_mode = meta.mode() & 0o7777;
    if (want_uid, want_gid) != (uid, gid) {
        std::os::unix::fs::fchown(f, Some(want_uid), Some(want_gid)).map_err(io_err(path, "change the owner of"))?;
        changes.push(Change::new(path.display().to_string(), format!("owner {uid}:{gid} -> {want_uid}:{want_gid}")));
        current_mode = f.metadata().map_err(io_err(path, "stat"))?.mode() & 0o7777;
    }
    if let Some(want) = mode {
        if current_mode != want {
            f.set_permissions(fs::Permissions::from_mode(want)).map_err(io_err(path, "change the mode of"))?;
            // Compare with the mode before chown: a mode that only chown disturbed
            // and we restored is not a change the user asked about twice.
            let before = meta.mode() & 0o7777;
            if before != want {
                changes.push(Change::new(
                    path.display().to_string(),
                    format!("mode {} -> {}", describe_mode(before), describe_mode(want)),
                ));
            }
        }
    }
    Ok(())
}

/// Creates the missing directories from the nearest existing ancestor down to `path`
/// included, each with `mode` and `owner`. An existing ancestor must be a directory
/// (a link to one is fine: only the final component is treated strictly by callers).
pub fn create_dirs(path: &AbsPath, mode: u32, owner: (Uid, Gid), changes: &mut Vec<Change>) -> Result<(), FsError> {
    let mut missing = Vec::new();
    let mut cur = path.as_path();
    loop {
        match fs::metadata(cur) {
            Ok(m) if m.is_dir() => break,
            Ok(m) => {
                return Err(FsError::NotADirectory { path: cur.to_path_buf(), found: kind_of(m.file_type()) });
            }
            // ENOTDIR: an ancestor is not a directory; walking up finds and names it.
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
                // A dangling link is "missing" to metadata() but must not be replaced.
                if e.kind() == io::ErrorKind::NotFound {
                    if let Some(m) = lstat(cur)? {
                        return Err(FsError::NotADirectory { path: cur.to_path_buf(), found: kind_of(m.file_type()) });
                    }
                }
                missing.push(cur);
                match cur.parent() {
                    Some(p) => cur = p,
                    None => break,
                }
            }
            Err(e) => return Err(io_err(cur, "inspect")(e)),
        }
    }
    for dir in missing.into_iter().rev() {
        // Created private, then opened and set: never visible with looser rights.
        fs::DirBuilder::new().mode(0o700).create(dir).map_err(io_err(dir, "create directory"))?;
        let f = open_nofollow(dir, true)?;
        std::os::unix::fs::fchown(&f, Some(owner.0.as_raw()), Some(owner.1.as_raw()))
            .map_err(io_err(dir, "change the owner of"))?;
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(dir, "change the mode of"))?;
        changes.push(Change::new(
            dir.display().to_string(),
            format!("directory created ({} {}:{})", describe_mode(mode), owner.0, owner.1),
        ));
    }
    Ok(())
}

/// Makes sure `dir` (a file's parent) exists, creating root-owned 0755 directories.
pub fn ensure_parent(dir: &AbsPath, changes: &mut Vec<Change>) -> Result<(), FsError> {
    create_dirs(dir, PARENT_DIR_MODE, (Uid::from_raw(0), Gid::from_raw(0)), changes)
}

/// A name next to `path` for a temporary object, unique within this process.
pub fn temp_sibling(path: &AbsPath) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.as_path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.parent().as_path().join(format!(".{name}.opsagent-tmp.{}.{n}", std::process::id()))
}

pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    open_nofollow(dir, true)?.sync_all().map_err(io_err(dir, "fsync"))
}

/// Replaces (or creates) `path` with `content`, owner and mode, atomically: a reader
/// sees the old file or the new one, and after a crash one of them is on disk whole.
pub fn write_atomic(path: &AbsPath, content: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
    write_atomic_via(&temp_sibling(path), path.as_path(), content, mode, uid, gid)
}

/// [`write_atomic`] through the temporary file `tmp`, which must not exist and must be
/// in `path`'s directory (for callers that need a name of their own choosing).
pub fn write_atomic_via(tmp: &Path, path: &Path, content: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(tmp)
            .map_err(io_err(tmp, "create temporary file"))?;
        f.write_all(content).map_err(io_err(tmp, "write"))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io_err(tmp, "change the owner of"))?;
        // Set on the descriptor: the umask must not decide the mode.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(tmp, "change the mode of"))?;
        f.sync_all().map_err(io_err(tmp, "fsync"))?;
        fs::rename(tmp, path).map_err(io_err(path, "rename the temporary file onto"))
    })();
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written?;
    fsync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Puts the finished temporary file `tmp` (next to `path`, already fsynced) in place
/// of `path` with owner and mode, atomically.
pub fn install_file(tmp: &Path, path: &AbsPath, mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
    let f = open_nofollow(tmp, false)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io_err(tmp, "change the owner of"))?;
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(tmp, "change the mode of"))?;
    fs::rename(tmp, path).map_err(io_err(path.as_path(), "rename the temporary file onto"))?;
    fsync_dir(path.parent().as_path())
}

/// Whether the open regular file's content differs from the file at `other`, compared
/// in chunks (either may be large).
pub fn files_differ(f: &mut File, path: &Path, other: &Path) -> Result<bool, FsError> {
    let mut o = open_nofollow(other, false)?;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    if len != o.metadata().map_err(io_err(other, "stat"))?.len() {
        return Ok(true);
    }
    let (mut a, mut b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(f, &mut a).map_err(io_err(path, "read"))?;
        let m = read_full(&mut o, &mut b[..n.max(1)]).map_err(io_err(other, "read"))?;
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
mod tests {
    use super::*;

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
    fn open_nofollow_reports_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(matches!(open_nofollow(&link, false), Err(FsError::Symlink(_))));
    }
}
