//! The checksum store behind the `watch` parameter, shared by the modules that react to
//! changed files (`linux.service`, `linux.supervisord`, `linux.docker.*`;
//! `common.virtualenv` keeps the checksum of its requirements file the same way, in a
//! directory of its own).
//!
//! As in the original agent (`states.md` 2d): a watched file counts as changed when the
//! MD5 of its content differs from the checksum stored at the last *successful* run of
//! the same state; with nothing stored yet it counts as changed only when the module
//! says first sight counts (`tfirst`). Checksums live in
//! `<state dir>/watch/<state id>-<path>.cksum`, every `/` of that name replaced by `-`,
//! and are written only by [`ChecksumStore::commit`], which the module calls after the
//! state succeeded, so a failed reload is tried again next round.
//!
//! A missing file is a content of its own ("absent"): a file that appears or
//! disappears counts as a change.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use nix::fcntl::OFlag;
use opsagent_proto::newtypes::{AbsPath, StateId};
use sha2::Sha256;

use crate::fsutil::{self, FsError};

/// What is stored for a watched file that does not exist.
const ABSENT: &str = "absent";
/// Longest file name most filesystems take.
const NAME_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    #[error("watched file {path}: cannot {op}: {source}")]
    Read { path: PathBuf, op: &'static str, source: io::Error },
    #[error("watched file {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("watch store: {0}")]
    Store(#[from] FsError),
    #[error("watch store {path}: {source}")]
    StoreIo { path: PathBuf, source: io::Error },
}

/// Checksums of watched files, kept between rounds in the helper's state directory.
#[derive(Debug, Clone)]
pub struct ChecksumStore {
    dir: PathBuf,
}

/// The outcome of a check: which files changed, and what to store once the state has
/// succeeded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileChanges {
    pub changed: Vec<AbsPath>,
    /// Files that do not exist (they still count, see the module docs).
    pub missing: Vec<AbsPath>,
    pending: Vec<(PathBuf, String)>,
}

impl FileChanges {
    pub fn triggered(&self) -> bool {
        !self.changed.is_empty()
    }
}

impl ChecksumStore {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("watch") }
    }

    /// A store of its own, for checksums that are not the `watch` parameter's.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the checksum of `file` for `state` is kept.
    pub fn checksum_path(&self, state: &StateId, file: &AbsPath) -> PathBuf {
        let name = format!("{}-{}.cksum", state.as_str(), file).replace('/', "-");
        if name.len() <= NAME_MAX {
            return self.dir.join(name);
        }
        // Too long for one file name: a digest of it names the same thing.
        self.dir.join(format!("{}.cksum", hex::encode(Sha256::digest(name.as_bytes()))))
    }

    /// Compares the current content of `files` with what was stored for `state`.
    pub fn check(
        &self,
        state: &StateId,
        files: &[AbsPath],
        first_sight_counts: bool,
    ) -> Result<FileChanges, ChecksumError> {
        let mut out = FileChanges::default();
        for file in files {
            let current = checksum(file.as_path())?;
            if current == ABSENT {
                out.missing.push(file.clone());
            }
            let store = self.checksum_path(state, file);
            let stored = match fs::read_to_string(&store) {
                Ok(s) => Some(s.trim().to_string()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(source) => return Err(ChecksumError::StoreIo { path: store, source }),
            };
            let changed = match &stored {
                Some(s) => *s != current,
                None => first_sight_counts,
            };
            if changed {
                out.changed.push(file.clone());
            }
            if stored.as_deref() != Some(current.as_str()) {
                out.pending.push((store, current));
            }
        }
        Ok(out)
    }

    /// Whether `file`, once it holds `content`, would count as changed for `state` by
    /// [`Self::check`] without first sight counting (what a plan asks of a file it
    /// would write). Reads the store only.
    pub fn would_change(&self, state: &StateId, file: &AbsPath, content: &[u8]) -> Result<bool, ChecksumError> {
        let store = self.checksum_path(state, file);
        match fs::read_to_string(&store) {
            Ok(s) => Ok(s.trim() != hex::encode(Md5::digest(content))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ChecksumError::StoreIo { path: store, source }),
        }
    }

    /// Stores the checksums seen by `check`: call only after the state succeeded.
    pub fn commit(&self, check: &FileChanges) -> Result<(), ChecksumError> {
        if check.pending.is_empty() {
            return Ok(());
        }
        crate::plan::check("record watched checksums in", self.dir.display())
            .map_err(|r| ChecksumError::StoreIo { path: self.dir.clone(), source: r.into() })?;
        // A checksum on disk says the watched file had that content: the content goes to
        // disk first, so that after a power cut a checksum never describes a file the
        // disk does not hold (then a rewritten file would not trigger its reload).
        crate::durable::Pending::host().flush();
        let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
        fsutil::create_dir_all(&self.dir, 0o700, root, &mut Vec::new())?;
        for (path, sum) in &check.pending {
            let abs = AbsPath::parse(&path.to_string_lossy())
                .map_err(|e| ChecksumError::StoreIo { path: path.clone(), source: io::Error::other(e) })?;
            fsutil::write_atomic(&abs, format!("{sum}\n").as_bytes(), 0o600, 0, 0)?;
        }
        Ok(())
    }
}

/// MD5 (hex) of a file's content, or the word `absent`. Links are followed (reading through a
/// link writes nothing); anything but a regular file is refused, and the open does not
/// block on a FIFO.
// Read-only (`OpenOptions` for O_NONBLOCK, no write flag): reading through a link
// writes nothing, and the type is checked on the opened descriptor.
#[allow(clippy::disallowed_methods)]
pub fn checksum(path: &Path) -> Result<String, ChecksumError> {
    let err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| ChecksumError::Read { path, op, source }
    };
    // Read-only (`OpenOptions` only for O_NONBLOCK, no write flag): the file
    // is checked on its descriptor once opened; nothing is written.
    #[allow(clippy::disallowed_methods)]
    let mut f =
        match OpenOptions::new().read(true).custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits()).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ABSENT.to_string()),
            Err(e) => return Err(err("open")(e)),
        };
    if !f.metadata().map_err(err("stat"))?.is_file() {
        return Err(ChecksumError::NotAFile(path.to_path_buf()));
    }
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(err("read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    fn abs(p: &Path) -> AbsPath {
        AbsPath::parse(&p.to_string_lossy()).unwrap()
    }

    #[test]
    fn checksum_file_names_follow_the_original_scheme() {
        let store = ChecksumStore::new(Path::new("/var/lib/opsagent-helper"));
        let id = StateId::parse("state-7").unwrap();
        let path = store.checksum_path(&id, &AbsPath::parse("/etc/nginx/nginx.conf").unwrap());
        assert_eq!(path, Path::new("/var/lib/opsagent-helper/watch/state-7--etc-nginx-nginx.conf.cksum"));
        // A state id with a slash cannot climb out of the store.
        let odd = StateId::parse("../x").unwrap();
        let path = store.checksum_path(&odd, &AbsPath::parse("/a").unwrap());
        assert_eq!(path.parent().unwrap(), Path::new("/var/lib/opsagent-helper/watch"));
        let long = StateId::parse(&"s".repeat(300)).unwrap();
        let name = store.checksum_path(&long, &AbsPath::parse("/a").unwrap());
        assert_eq!(name.file_name().unwrap().len(), 64 + 6);
    }

    #[test]
    fn first_sight_change_and_commit_only_after_success() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChecksumStore::new(tmp.path());
        let id = StateId::parse("s-1").unwrap();
        let conf = tmp.path().join("app.conf");
        fs::write(&conf, "a=1\n").unwrap();
        let files = [abs(&conf)];

        // First sight: changed when tfirst, not otherwise.
        let first = store.check(&id, &files, true).unwrap();
        assert_eq!(first.changed, files);
        assert!(!store.check(&id, &files, false).unwrap().triggered());
        // Not committed (the state failed): still changed next time.
        assert!(store.check(&id, &files, true).unwrap().triggered());
        store.commit(&first).unwrap();
        let stored = fs::read_to_string(store.checksum_path(&id, &files[0])).unwrap();
        assert_eq!(stored, format!("{}\n", hex::encode(Md5::digest(b"a=1\n"))));
        let again = store.check(&id, &files, true).unwrap();
        assert!(!again.triggered() && again.pending.is_empty());

        // A change, then the file going away: both count.
        fs::write(&conf, "a=2\n").unwrap();
        let changed = store.check(&id, &files, true).unwrap();
        assert!(changed.triggered());
        store.commit(&changed).unwrap();
        fs::remove_file(&conf).unwrap();
        let gone = store.check(&id, &files, true).unwrap();
        assert!(gone.triggered() && gone.missing == files);
        store.commit(&gone).unwrap();
        assert!(!store.check(&id, &files, true).unwrap().triggered());
        // Another state watching the same file has its own memory.
        let other = StateId::parse("s-2").unwrap();
        assert!(store.check(&other, &files, true).unwrap().triggered());
    }

    #[test]
    fn a_checksum_is_written_only_after_the_batched_file_writes_are_flushed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChecksumStore::new(tmp.path());
        let id = StateId::parse("s-1").unwrap();
        let conf = tmp.path().join("app.conf");
        // As linux.file writes it: renamed into place, its flush left to the batch.
        let dir = crate::dirfd::Dir::open(tmp.path()).unwrap();
        fsutil::write_in(&dir, std::ffi::OsStr::new("app.conf"), b"a=1\n", (0o644, 0, 0), fsutil::Durable::Batched)
            .unwrap();
        let pending = crate::durable::Pending::host();
        let before = pending.syncs();
        let check = store.check(&id, &[abs(&conf)], true).unwrap();
        store.commit(&check).unwrap();
        assert!(pending.syncs() > before, "flushed before the checksum was written");
    }

    #[test]
    fn directories_and_fifos_are_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(checksum(tmp.path()), Err(ChecksumError::NotAFile(_))));
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(checksum(&fifo), Err(ChecksumError::NotAFile(_))));
    }
}
