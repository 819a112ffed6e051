//! Walking and changing the file system through directory descriptors.
//!
//! Root must never act through a path that another user can change under it. A path
//! string is resolved by the kernel afresh at every system call, so a walk that builds
//! `top/sub/x` and hands it to `open`/`chown` follows whatever link the owner of `top`
//! swapped in meanwhile (`O_NOFOLLOW` guards only the last component). Here a path is
//! opened once, component by component from `/`, each directory with
//! `openat(O_NOFOLLOW | O_DIRECTORY)` relative to the one before; every change is then
//! made relative to an opened directory ([`Dir`]): `mkdirat`, `openat(O_NOFOLLOW)` and
//! `fchown`/`fchmod` on the descriptor, `fchownat(AT_SYMLINK_NOFOLLOW)`, `renameat`,
//! `unlinkat`, `symlinkat`, and recursive walks that list a descriptor and open each
//! entry relative to it. A directory that is renamed or replaced after it was opened is
//! still the one opened: nothing done through it lands anywhere else.
//!
//! The rule for links on the way: a recipe may name a path through a link
//! (`/etc/resolv.conf` -> `/run/...`). Such a link is followed only when nobody but root
//! can have put it there: the link is owned by root, and every directory on the way to
//! it, its own included, is owned by root and writable by no one else (a sticky
//! directory such as `/tmp` counts as safe for an entry that root owns, since only its
//! owner may rename or remove it). Anything else is refused with [`WalkError::UnsafeLink`],
//! which names the link and who could have planted it. Directories owned by other users
//! are walked (by descriptor, which is safe); what never happens is following a link
//! found in or below one of them.
//!
//! An `openat` chain rather than `openat2(RESOLVE_NO_SYMLINKS)`: links must be inspected
//! (to follow the safe ones), which `openat2` cannot do, and one code path is easier to
//! audit than two.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
// The one module that creates, writes, renames, removes, links and chowns (`*at` calls
// on held descriptors): helper/clippy.toml refuses those calls everywhere else.
#![allow(clippy::disallowed_methods)]

use std::collections::{hash_map::Entry, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

/// Links followed on one resolution before giving up (the kernel's own limit).
const MAX_LINKS: u32 = 40;

/// What every temporary name made by [`Dir::temp_name`] holds.
const TEMP_MARK: &[u8] = b".opsagent-tmp.";

/// A directory of [`LISTED`]: device and inode, and the birth time that tells it from a
/// later directory given the same inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ListedKey {
    dev: u64,
    ino: u64,
    born: (i64, u32),
}
type Listed = HashMap<ListedKey, Vec<OsString>>;
/// Directories this process has listed for dead writers' temporary files, with the
/// temporary-looking regular files found there and not yet removed
/// ([`Dir::remove_dead_temps`]). Only directories with a birth time are kept: one without
/// could not be told from a later directory given its inode number.
static LISTED: std::sync::Mutex<Option<Listed>> = std::sync::Mutex::new(None);
/// Directories remembered at most (then forgotten, and listed again when met).
const LISTED_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{path}: a symbolic link in a directory writable by {writer}; refusing to follow it")]
    UnsafeLink { path: PathBuf, writer: String },
    #[error("{path}: a symbolic link owned by uid {uid}; refusing to follow it")]
    LinkOwner { path: PathBuf, uid: u32 },
    #[error("{path}: a symbolic link below {below}, which {writer} can change; refusing to follow it")]
    LinkBelowUnsafe { path: PathBuf, below: PathBuf, writer: String },
    #[error("{0}: more than {MAX_LINKS} symbolic links on the way")]
    TooManyLinks(PathBuf),
    #[error("{path} exists and is {found}, not a directory")]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is a symbolic link; refusing to act through it")]
    Symlink(PathBuf),
    #[error("{0} changed while it was being opened; refusing to act on it")]
    Changed(PathBuf),
    #[error(
        "{path} can be changed by {writer}, who could swap it (or a directory in it) for a link while root works there"
    )]
    NotRootControlled { path: PathBuf, writer: String },
    /// A write attempted while the request is a plan ([`crate::plan`]).
    #[error(transparent)]
    Plan(#[from] crate::plan::Refused),
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(Errno) -> WalkError {
    let path = path.to_path_buf();
    move |e| WalkError::Io { path, op, source: e.into() }
}

/// What kind of object a file type is, for messages.
pub fn kind_of(ft: FileType) -> &'static str {
    match ft {
        FileType::Symlink => "a symbolic link",
        FileType::Directory => "a directory",
        FileType::RegularFile => "a regular file",
        FileType::Socket => "a socket",
        FileType::Fifo => "a FIFO",
        FileType::BlockDevice | FileType::CharacterDevice => "a device",
        FileType::Unknown => "a special file",
    }
}

/// Owner, mode and type of an object, from `fstat`/`fstatat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: FileType,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with set-id and sticky (`& 0o7777`).
    pub mode: u32,
    pub size: u64,
    pub several_links: bool,
    /// The file system's device number.
    pub dev: u64,
    pub ino: u64,
}

impl Meta {
    fn of(st: &Stat) -> Self {
        Self {
            kind: FileType::from_raw_mode(st.st_mode),
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            size: u64::try_from(st.st_size).unwrap_or(0),
            several_links: st.st_nlink > 1,
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    /// `fstat` of an open file.
    pub fn of_file(f: &File, path: &Path) -> Result<Self, WalkError> {
        Self::of_fd(f.as_fd(), path)
    }

    /// `fstat` of an open descriptor.
    pub fn of_fd(fd: BorrowedFd<'_>, path: &Path) -> Result<Self, WalkError> {
        Ok(Self::of(&rustix::fs::fstat(fd).map_err(io_err(path, "inspect"))?))
    }

    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }

    /// Who other than root could rename or replace an entry owned by `entry_uid` in
    /// this directory; `None`: nobody.
    fn writer_besides_root(&self, entry_uid: u32) -> Option<String> {
        if self.uid != 0 {
            return Some(format!("uid {}", self.uid));
        }
        let sticky_protects = self.mode & 0o1000 != 0 && entry_uid == 0;
        if self.mode & 0o002 != 0 && !sticky_protects {
            return Some("every user".to_string());
        }
        if self.mode & 0o020 != 0 && !sticky_protects {
            return Some(format!("group {}", self.gid));
        }
        None
    }
}

/// `statx` of an opened directory: its [`Meta`] and, where the file system records it,
/// its birth time (which tells a directory from a later one that got its inode number).
fn stat_dir(fd: BorrowedFd<'_>, path: &Path) -> Result<(Meta, Option<(i64, u32)>), WalkError> {
    use rustix::fs::StatxFlags;
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS | StatxFlags::BTIME)
        .map_err(io_err(path, "inspect"))?;
    let meta = Meta {
        kind: FileType::from_raw_mode(u32::from(st.stx_mode)),
        uid: st.stx_uid,
        gid: st.stx_gid,
        mode: u32::from(st.stx_mode) & 0o7777,
        size: st.stx_size,
        several_links: st.stx_nlink > 1,
        dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
    };
    let born = (st.stx_mask & StatxFlags::BTIME.bits() != 0).then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec));
    Ok((meta, born))
}

/// How to treat the last component of a path being resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Last {
    /// A link there is followed under the rule (a file or directory a recipe names).
    Follow,
    /// The last component is the object itself, link or not (removal, a link state).
    NoFollow,
}

/// Owner and mode of directories created on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDirs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The descriptor of a [`Dir`]: its own, or the one of `/` that the process holds.
#[derive(Debug)]
enum DirFd {
    Owned(OwnedFd),
    /// `/`, opened once per process ([`Dir::root`]).
    Root(&'static OwnedFd),
}

impl AsFd for DirFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Owned(fd) => fd.as_fd(),
            DirFd::Root(fd) => fd.as_fd(),
        }
    }
}

impl DirFd {
    /// A descriptor of the same directory that this one's holder may keep: `/`'s is
    /// shared, not duplicated.
    fn try_clone(&self) -> io::Result<Self> {
        match self {
            DirFd::Owned(fd) => fd.try_clone().map(DirFd::Owned),
            DirFd::Root(fd) => Ok(DirFd::Root(fd)),
        }
    }

    /// A descriptor of its own (a duplicate of `/`'s).
    fn into_owned(self) -> io::Result<OwnedFd> {
        match self {
            DirFd::Owned(fd) => Ok(fd),
            DirFd::Root(fd) => fd.try_clone(),
        }
    }
}

/// `Ok` when no one but root could have replaced any directory on the way to a
/// directory, and root owns each; else where trust was lost and who could have changed
/// things there.
type Trust = Result<(), (PathBuf, String)>;

/// How a directory was reached, from which its [`Trust`] is worked out.
#[derive(Debug, Clone)]
enum Reached {
    /// `/`: trusted when no one but root can write it.
    Root,
    /// Opened by a walk ([`resolve`]) in the directory held here: trusted as that one's
    /// [`Dir::child_trust`] says. Holding it keeps its descriptor open, so its owner and
    /// mode can be read from that descriptor when the trust is first asked for.
    In(Arc<Dir>),
    /// Decided when the directory was opened.
    Known(Trust),
}

/// An opened directory, and the path it was reached by (for messages only: nothing is
/// ever resolved through it again).
///
/// Its owner and mode, and the trust that follows from them and from the directories
/// on the way, are read when first needed: by a link met in it, a directory made or
/// opened in it outside a walk, [`Dir::root_controlled`], the sweep for temporary files.
/// A walk to a file that is already as wanted needs none of them, and read them (one
/// `statx` per directory on the way) for nothing before. Reading later is as sound as
/// reading at the open: the `statx` is of the descriptor, so of the directory opened
/// whatever happened to its name; only the owner (or root) can change a directory's
/// mode, and only root its owner (no one gives a directory away on Linux), so a
/// directory some other user owned when it was opened is still not root's, hence not
/// trusted, and one root owned changes only at root's own hand.
#[derive(Debug)]
pub struct Dir {
    fd: DirFd,
    path: PathBuf,
    reached: Reached,
    /// From `reached` at first need ([`Dir::trusted`]): links found here may be followed
    /// if this directory is not writable by others either (checked when one is met).
    trusted: OnceLock<Trust>,
    /// Owner, mode and type by `statx` of the descriptor, and its birth time where the
    /// file system records one ([`Dir::opened`]): the trust checks of entries found in it
    /// ([`Dir::child_trust`], [`Dir::link_refusal`]) read these.
    opened: OnceLock<(Meta, Option<(i64, u32)>)>,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The result of resolving a path: the directory that holds its last component, and
/// that component's name (`None` for `/`).
#[derive(Debug)]
pub struct Resolved {
    pub parent: Dir,
    pub name: Option<OsString>,
    /// What `fstatat(AT_SYMLINK_NOFOLLOW)` found at the last component, when the walk
    /// looked there (it does under [`Last::Follow`], to follow a link): `Some(None)` for
    /// nothing there. `None`: not looked at.
    last_stat: Option<Option<Meta>>,
}

impl Resolved {
    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of the last component (`None`: missing), as the walk
    /// found it when it looked there, else asked now. Like any stat of a name, for
    /// deciding whether to open it: what is opened is checked again on its descriptor.
    pub fn stat_last(&self) -> Result<Option<Meta>, WalkError> {
        match (&self.last_stat, &self.name) {
            (Some(found), _) => Ok(*found),
            (None, Some(name)) => self.parent.stat(name),
            (None, None) => Ok(Some(self.parent.opened()?.0)),
        }
    }

    /// The path of the object, as reached (for messages).
    pub fn path(&self) -> PathBuf {
        match &self.name {
            Some(n) => self.parent.path.join(n),
            None => self.parent.path.clone(),
        }
    }
}

const DIR_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC).union(OFlags::NOCTTY);

impl Dir {
    /// `/`, the start of every walk.
    ///
    /// Its descriptor is opened once per process and kept (every walk opened and closed
    /// it before: 2 of a converged `linux.file` state's system calls). It is the same
    /// directory every `open("/")` would give: `/` resolves to the process's root, which
    /// only `chroot`/`pivot_root` by the process itself changes, and the helper does
    /// neither. Its owner and mode are read again by every walk that needs them (a `Dir`
    /// reads them at most once), so a `/` made writable by others is seen by the next
    /// walk that follows a link, as before.
    pub fn root() -> Result<Self, WalkError> {
        static ROOT: OnceLock<OwnedFd> = OnceLock::new();
        let fd = match ROOT.get() {
            Some(fd) => fd,
            None => {
                let fd = rustix::fs::open("/", DIR_FLAGS, Mode::empty()).map_err(io_err(Path::new("/"), "open"))?;
                // A thread that got here first keeps its descriptor; this one is closed.
                let _ = ROOT.set(fd);
                ROOT.get().ok_or_else(|| WalkError::Changed(PathBuf::from("/")))?
            }
        };
        Ok(Self::lazy(DirFd::Root(fd), PathBuf::from("/"), Reached::Root))
    }

    /// A directory whose owner, mode and trust are read when first needed.
    fn lazy(fd: DirFd, path: PathBuf, reached: Reached) -> Self {
        Self { fd, path, reached, trusted: OnceLock::new(), opened: OnceLock::new() }
    }

    /// A directory whose owner, mode and trust were read as it was opened.
    fn known(fd: DirFd, path: PathBuf, opened: (Meta, Option<(i64, u32)>), trusted: Trust) -> Self {
        let reached = Reached::Known(trusted.clone());
        Self { fd, path, reached, trusted: OnceLock::from(trusted), opened: OnceLock::from(opened) }
    }

    /// Owner, mode and type by `statx` of the descriptor (the first call's: see [`Dir`]),
    /// and the birth time.
    fn opened(&self) -> Result<(Meta, Option<(i64, u32)>), WalkError> {
        if let Some(opened) = self.opened.get() {
            return Ok(*opened);
        }
        let opened = stat_dir(self.fd.as_fd(), &self.path)?;
        Ok(*self.opened.get_or_init(|| opened))
    }

    /// This directory's [`Trust`], worked out at first need.
    fn trusted(&self) -> Result<&Trust, WalkError> {
        if let Some(trust) = self.trusted.get() {
            return Ok(trust);
        }
        // The directories on the way whose trust is not known yet, this one first: worked
        // out from the farthest one down, in a loop (a path may be thousands deep).
        let mut chain = vec![self];
        let mut at = self;
        while let Reached::In(parent) = &at.reached {
            if parent.trusted.get().is_some() {
                break;
            }
            at = &**parent;
            chain.push(at);
        }
        for dir in chain.into_iter().rev() {
            let trust = match &dir.reached {
                Reached::Root => match dir.opened()?.0.writer_besides_root(0) {
                    None => Ok(()),
                    Some(w) => Err((dir.path.clone(), w)),
                },
                Reached::In(parent) => parent.child_trust(&dir.path, dir.opened()?.0.uid)?,
                Reached::Known(trust) => trust.clone(),
            };
            // Another thread may have worked it out meanwhile: the same answer.
            let _ = dir.trusted.set(trust);
        }
        self.trusted.get().ok_or_else(|| WalkError::Changed(self.path.clone()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number of the directory's file system.
    pub fn dev(&self) -> Result<u64, WalkError> {
        Ok(self.opened()?.0.dev)
    }

    /// Opens the directory `path` as the kernel resolves it, the last component never
    /// followed, for a caller that answers for the path itself: a path made of a held
    /// descriptor (`/proc/self/fd/N/name`, see [`Dir::fd_path`]) or one only root could
    /// have made. Nothing found in it is ever trusted to be followed.
    pub fn open_given(path: &Path) -> Result<Self, WalkError> {
        match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let untrusted = Err((path.to_path_buf(), "whoever made the path given".to_string()));
                Ok(Self::lazy(DirFd::Owned(fd), path.to_path_buf(), Reached::Known(untrusted)))
            }
            Err(Errno::LOOP) => Err(WalkError::Symlink(path.to_path_buf())),
            Err(Errno::NOENT) => Err(WalkError::Missing(path.to_path_buf())),
            Err(e) => Err(io_err(path, "open")(e)),
        }
    }

    /// A second descriptor of the same directory.
    pub fn try_clone(&self) -> Result<Self, WalkError> {
        let fd =
            self.fd.try_clone().map_err(|source| WalkError::Io { path: self.path.clone(), op: "duplicate", source })?;
        Ok(Self {
            fd,
            path: self.path.clone(),
            reached: self.reached.clone(),
            trusted: self.trusted.clone(),
            opened: self.opened.clone(),
        })
    }

    pub fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// Opens the directory at `path` (its last component followed under the rule).
    pub fn open(path: &Path) -> Result<Self, WalkError> {
        let r = resolve(path, Last::Follow, None, &mut |_, _| {})?;
        match r.name {
            None => Ok(r.parent),
            Some(name) => r.parent.subdir(&name)?.ok_or_else(|| WalkError::Missing(r.parent.join(&name))),
        }
    }

    pub fn meta(&self) -> Result<Meta, WalkError> {
        Ok(Meta::of(&rustix::fs::fstat(&self.fd).map_err(io_err(&self.path, "inspect"))?))
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of an entry; `None` if missing.
    pub fn stat(&self, name: &OsStr) -> Result<Option<Meta>, WalkError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta::of(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err(&self.join(name), "inspect")(e)),
        }
    }

    /// The sub-directory `name`, never through a link; `None` if missing. A link or a
    /// non-directory there is an error naming it.
    pub fn subdir(&self, name: &OsStr) -> Result<Option<Dir>, WalkError> {
        let path = self.join(name);
        match self.open_subdir(name)? {
            Ok(dir) => Ok(Some(dir)),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP) => Err(WalkError::Symlink(path)),
            // O_DIRECTORY meets a link before O_NOFOLLOW does: ENOTDIR for both.
            Err(Errno::NOTDIR) => match self.stat(name)?.map(|m| m.kind) {
                Some(FileType::Symlink) => Err(WalkError::Symlink(path)),
                found => Err(WalkError::NotADirectory { path, found: found.map_or("gone", kind_of) }),
            },
            Err(e) => Err(io_err(&path, "open")(e)),
        }
    }

    /// `openat(O_DIRECTORY | O_NOFOLLOW)` of the sub-directory `name`, then its `fstat`
    /// for the trust rule; the error number when the entry is missing (`NOENT`), a link
    /// or not a directory (`NOTDIR`, `LOOP`).
    fn open_subdir(&self, name: &OsStr) -> Result<Result<Dir, Errno>, WalkError> {
        Ok(match self.openat_dir(name)? {
            Ok(fd) => {
                let path = self.join(name);
                let opened = stat_dir(fd.as_fd(), &path)?;
                let trusted = self.child_trust(&path, opened.0.uid)?;
                Ok(Dir::known(DirFd::Owned(fd), path, opened, trusted))
            }
            Err(e) => Err(e),
        })
    }

    /// `openat(O_DIRECTORY | O_NOFOLLOW)` of the sub-directory `name`, which keeps `dir`
    /// (this one) open until its trust is worked out; the error number as
    /// [`Dir::open_subdir`]'s. For a walk, which holds the directories it passes.
    fn open_subdir_in(dir: &Arc<Dir>, name: &OsStr) -> Result<Result<Dir, Errno>, WalkError> {
        Ok(dir.openat_dir(name)?.map(|fd| Dir::lazy(DirFd::Owned(fd), dir.join(name), Reached::In(Arc::clone(dir)))))
    }

    /// `openat(O_DIRECTORY | O_NOFOLLOW)` of `name`; the error number when the entry is
    /// missing (`NOENT`), a link or not a directory (`NOTDIR`, `LOOP`).
    fn openat_dir(&self, name: &OsStr) -> Result<Result<OwnedFd, Errno>, WalkError> {
        match rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Ok(fd)),
            Err(e @ (Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => Ok(Err(e)),
            Err(e) => Err(io_err(&self.join(name), "open")(e)),
        }
    }

    /// Opens an existing non-directory `name` for reading without following a link and
    /// without blocking on a FIFO; the caller checks the type on the descriptor.
    pub fn open_file(&self, name: &OsStr) -> Result<Option<File>, WalkError> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP) => Err(WalkError::Symlink(self.join(name))),
            Err(e) => Err(io_err(&self.join(name), "open")(e)),
        }
    }

    /// The descriptor as a `File` (for `fsync`, `fchown` and the like by callers).
    pub fn into_file(self) -> Result<File, WalkError> {
        let path = self.path;
        self.fd.into_owned().map(File::from).map_err(|source| WalkError::Io { path, op: "duplicate", source })
    }

    /// A path that reaches the entry `name` of this opened directory through
    /// `/proc/self/fd`, whatever happens to the directory's own name meanwhile: for code
    /// that only takes paths (the unpacker, the copy of a download) and works inside a
    /// directory nobody else can write.
    pub fn fd_path(&self, name: &OsStr) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_fd().as_raw_fd())).join(name)
    }

    /// Creates the new private (0600) file `name`; fails if anything is there.
    pub fn create_named(&self, name: &OsStr) -> Result<File, WalkError> {
        crate::plan::check("create", self.join(name).display())?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(0o600))
            .map(File::from)
            .map_err(io_err(&self.join(name), "create"))
    }

    /// A fresh name beginning with `.{prefix}` for a temporary object in this directory
    /// (not created: the creation must refuse an existing one).
    pub fn temp_name(&self, prefix: &OsStr) -> OsString {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut name = OsString::from(".");
        name.push(prefix);
        name.push(format!(".opsagent-tmp.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        name
    }

    /// Creates a new private (0600) file with a fresh unique name beginning with
    /// `.{prefix}`; its name and the open file.
    pub fn create_temp(&self, prefix: &OsStr) -> Result<(OsString, File), WalkError> {
        crate::plan::check("create a temporary file in", self.path.display())?;
        self.remove_dead_temps(prefix)?;
        loop {
            let name = self.temp_name(prefix);
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&self.fd, &name, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((name, File::from(fd))),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(io_err(&self.join(&name), "create temporary file")(e)),
            }
        }
    }

    /// Removes the temporary files of `.{prefix}` (named by [`Self::temp_name`]) that a
    /// helper killed while writing left behind: those whose writer, the process of the
    /// pid in the name, no longer exists. A live writer's (this process's, or another
    /// helper's) is left alone; a reused pid only postpones the cleanup.
    ///
    /// The directory is listed once per helper process (kept by device, inode and birth
    /// time in [`LISTED`], with the temporary-looking names found): a first run writing
    /// 1,000 files in one directory listed it 1,000 times, a cost that grew with the
    /// square of the count. Temporary files are only left by a helper that died, and a
    /// helper that dies is followed by a new process, which lists again. A directory
    /// removed and made again is another directory (its birth time); on a file system
    /// that records none, the directory is listed every time, as before.
    fn remove_dead_temps(&self, prefix: &OsStr) -> Result<(), WalkError> {
        let mut start = b".".to_vec();
        start.extend_from_slice(prefix.as_bytes());
        start.extend_from_slice(b".opsagent-tmp.");
        let (opened, born) = self.opened()?;
        let Some(born) = born else {
            // No birth time: a directory could not be told from a later one with its
            // inode number, so nothing is remembered; listed every time.
            return self.remove_dead(&mut self.temp_files()?, &start);
        };
        let key = ListedKey { dev: opened.dev, ino: opened.ino, born };
        let mut listed = LISTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let listed = listed.get_or_insert_with(HashMap::new);
        if listed.len() >= LISTED_MAX && !listed.contains_key(&key) {
            listed.clear();
        }
        let found = match listed.entry(key) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => new.insert(self.temp_files()?),
        };
        self.remove_dead(found, &start)
    }

    /// The regular files of this directory whose names hold [`TEMP_MARK`].
    fn temp_files(&self) -> Result<Vec<OsString>, WalkError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(name, kind)| {
                *kind == FileType::RegularFile && name.as_bytes().windows(TEMP_MARK.len()).any(|w| w == TEMP_MARK)
            })
            .map(|(name, _)| name)
            .collect())
    }

    /// Removes those of `found` that begin with `start` and whose writer is dead, and
    /// drops them from `found`.
    fn remove_dead(&self, found: &mut Vec<OsString>, start: &[u8]) -> Result<(), WalkError> {
        let mut removed = Vec::new();
        for name in found.iter() {
            let Some(rest) = name.as_bytes().strip_prefix(start) else { continue };
            let pid = rest.split(|&b| b == b'.').next().and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
            let Some(pid) = pid.filter(|&p| p != std::process::id()) else { continue };
            let Ok(raw) = i32::try_from(pid) else { continue };
            // Signal 0 only asks whether the process exists.
            let dead = nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) == Err(nix::errno::Errno::ESRCH);
            // Still a regular file (not a link swapped in since the listing).
            if dead && self.stat(name)?.is_some_and(|m| m.kind == FileType::RegularFile) {
                self.unlink(name)?;
                removed.push(name.clone());
            }
        }
        found.retain(|n| !removed.contains(n));
        Ok(())
    }

    /// Creates the private (0700, root) directory `name`, then gives it `mode` and owner
    /// through its descriptor: it is never visible with looser rights.
    pub fn mkdir(&self, name: &OsStr, new: NewDirs) -> Result<Dir, WalkError> {
        crate::plan::check("create the directory", self.join(name).display())?;
        let path = self.join(name);
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)).map_err(io_err(&path, "create directory"))?;
        let dir = self.subdir(name)?.ok_or_else(|| WalkError::Changed(path.clone()))?;
        let (uid, gid) = (rustix::fs::Uid::from_raw(new.uid), rustix::fs::Gid::from_raw(new.gid));
        rustix::fs::fchown(&dir.fd, Some(uid), Some(gid)).map_err(io_err(&path, "change the owner of"))?;
        rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(new.mode)).map_err(io_err(&path, "change the mode of"))?;
        // Read again: the owner and mode just given.
        let opened = stat_dir(dir.fd.as_fd(), &path)?;
        // Trusted as a directory of that owner and mode is.
        let trusted = self.child_trust(&path, opened.0.uid)?;
        Ok(Dir::known(dir.fd, path, opened, trusted))
    }

    /// `renameat` within this directory (atomic replacement of `to`).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("rename onto", self.join(to).display())?;
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(io_err(&self.join(to), "rename onto"))
    }

    /// Moves `from` (an entry of `src`) to `to` in this directory.
    pub fn rename_from(&self, src: &Dir, from: &OsStr, to: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("move into place", self.join(to).display())?;
        rustix::fs::renameat(&src.fd, from, &self.fd, to).map_err(io_err(&self.join(to), "move into place"))
    }

    /// The hard link `to` in this directory of the entry `from` of `src` (never through
    /// a link: `linkat` without `AT_SYMLINK_FOLLOW` links a link itself).
    pub fn hard_link_from(&self, src: &Dir, from: &OsStr, to: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("create the hard link", self.join(to).display())?;
        rustix::fs::linkat(&src.fd, from, &self.fd, to, AtFlags::empty())
            .map_err(io_err(&self.join(to), "create the hard link"))
    }

    /// Removes the non-directory `name` (a link itself, never its target).
    pub fn unlink(&self, name: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("remove", self.join(name).display())?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(io_err(&self.join(name), "remove"))
    }

    /// Removes `name` and, for a directory, everything below it, by descriptor: a link
    /// inside is removed, never followed.
    pub fn remove_tree(&self, name: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("remove", self.join(name).display())?;
        let Some(meta) = self.stat(name)? else {
            return Ok(());
        };
        if !meta.is_dir() {
            return self.unlink(name);
        }
        if let Some(sub) = self.subdir(name)? {
            for (entry, _) in sub.entries()? {
                sub.remove_tree(&entry)?;
            }
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(&self.join(name), "remove")(e)),
        }
    }

    /// Creates the link `name` -> `target`.
    pub fn symlink(&self, target: &Path, name: &OsStr) -> Result<(), WalkError> {
        crate::plan::check("create the link", self.join(name).display())?;
        rustix::fs::symlinkat(target, &self.fd, name).map_err(io_err(&self.join(name), "create the link"))
    }

    pub fn read_link(&self, name: &OsStr) -> Result<PathBuf, WalkError> {
        let target =
            rustix::fs::readlinkat(&self.fd, name, Vec::new()).map_err(io_err(&self.join(name), "read the link"))?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// `fchownat(AT_SYMLINK_NOFOLLOW)`: the owner of `name` itself, link or not.
    pub fn chown_entry(&self, name: &OsStr, uid: u32, gid: u32) -> Result<(), WalkError> {
        crate::plan::check("change the owner of", self.join(name).display())?;
        let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
        rustix::fs::chownat(&self.fd, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err(&self.join(name), "change the owner of"))
    }

    /// The entries (without `.` and `..`) and their types as the directory lists them.
    pub fn entries(&self) -> Result<Vec<(OsString, FileType)>, WalkError> {
        let list = io_err(&self.path, "list");
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(list)? {
            let entry = entry.map_err(io_err(&self.path, "list"))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push((OsStr::from_bytes(name).to_os_string(), entry.file_type()));
            }
        }
        Ok(out)
    }

    pub fn fsync(&self) -> Result<(), WalkError> {
        rustix::fs::fsync(&self.fd).map_err(io_err(&self.path, "fsync"))
    }

    /// Owner then mode, on the descriptor (chown clears set-id bits a mode may want).
    pub fn set_attrs(&self, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), WalkError> {
        set_attrs(self.fd.as_fd(), &self.path, uid, gid, mode)
    }

    /// `Ok` when nobody but root can change this directory, its entries or any
    /// directory on the way to it: a tool root runs here *by name* (a working directory
    /// or an argument of `git`, `python -m venv`) then meets what the helper checked.
    /// Otherwise the error names the first directory someone else controls, and who.
    pub fn root_controlled(&self) -> Result<(), WalkError> {
        if let Err((path, writer)) = self.trusted()? {
            return Err(WalkError::NotRootControlled { path: path.clone(), writer: writer.clone() });
        }
        // Not an entry root owns: the sticky bit does not stop others adding entries.
        match self.meta()?.writer_besides_root(u32::MAX) {
            Some(writer) => Err(WalkError::NotRootControlled { path: self.path.clone(), writer }),
            None => Ok(()),
        }
    }

    /// Whether a child directory owned by `uid` keeps the chain trusted: this chain is,
    /// nobody but root can replace the entry, and root owns the child.
    fn child_trust(&self, path: &Path, uid: u32) -> Result<Trust, WalkError> {
        let trusted = self.trusted()?;
        if trusted.is_err() {
            return Ok(trusted.clone());
        }
        Ok(match self.opened()?.0.writer_besides_root(uid) {
            Some(w) => Err((self.path.clone(), w)),
            None if uid != 0 => Err((path.to_path_buf(), format!("uid {uid}"))),
            None => Ok(()),
        })
    }

    /// Why a link found in this directory may not be followed; `None`: it may.
    fn link_refusal(&self, link: &Path, link_uid: u32) -> Result<Option<WalkError>, WalkError> {
        if let Err((below, writer)) = self.trusted()? {
            if below != &self.path {
                return Ok(Some(WalkError::LinkBelowUnsafe {
                    path: link.to_path_buf(),
                    below: below.clone(),
                    writer: writer.clone(),
                }));
            }
        }
        if let Some(writer) = self.opened()?.0.writer_besides_root(link_uid) {
            return Ok(Some(WalkError::UnsafeLink { path: link.to_path_buf(), writer }));
        }
        if link_uid != 0 {
            return Ok(Some(WalkError::LinkOwner { path: link.to_path_buf(), uid: link_uid }));
        }
        Ok(None)
    }
}

/// `fchown` then `fchmod` on an open descriptor, each only when it changes something.
pub fn set_attrs(fd: BorrowedFd<'_>, path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), WalkError> {
    let st = Meta::of(&rustix::fs::fstat(fd).map_err(io_err(path, "inspect"))?);
    set_attrs_from(fd, path, st, uid, gid, mode)
}

/// [`set_attrs`] of a descriptor whose owner and mode `st` its caller has just read by
/// `fstat` (no second `fstat` unless a `fchown` may have changed the mode).
pub fn set_attrs_from(
    fd: BorrowedFd<'_>,
    path: &Path,
    st: Meta,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
) -> Result<(), WalkError> {
    let mut now = st;
    if (st.uid, st.gid) != (uid, gid) {
        crate::plan::check("change the owner of", path.display())?;
        let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
        rustix::fs::fchown(fd, Some(u), Some(g)).map_err(io_err(path, "change the owner of"))?;
        // Read again: chown may have cleared set-id bits.
        if mode.is_some() {
            now = Meta::of(&rustix::fs::fstat(fd).map_err(io_err(path, "inspect"))?);
        }
    }
    if let Some(mode) = mode {
        if now.mode != mode {
            crate::plan::check("change the mode of", path.display())?;
            rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(io_err(path, "change the mode of"))?;
        }
    }
    Ok(())
}

/// The components of an absolute or relative path, `.` dropped, `..` kept.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Resolves `path` (absolute) from `/`, one component at a time: directories are opened
/// relative to the one before, links are followed only under the module's rule, and with
/// `create` missing directories on the way are created (`on_create` is told each one).
/// Returns the directory holding the last component and its name; the last component
/// itself is neither opened nor required to exist.
pub fn resolve(
    path: &Path,
    last: Last,
    create: Option<NewDirs>,
    on_create: &mut dyn FnMut(&Path, NewDirs),
) -> Result<Resolved, WalkError> {
    // Each directory held by the next one opened in it until the walk's result (and
    // whatever it opens in turn) is dropped: their trust is worked out only if asked.
    let mut stack = vec![Arc::new(Dir::root()?)];
    let mut pending = components(path);
    let mut links = 0;
    loop {
        let Some(name) = pending.pop_front() else {
            let parent = take(stack.pop().ok_or_else(|| WalkError::Changed(path.to_path_buf()))?)?;
            return Ok(Resolved { parent, name: None, last_stat: None });
        };
        if name == ".." {
            // Only reached through a link's target, which was found where only root
            // writes, so `..` means what its author meant.
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let at_last = pending.is_empty();
        let top = stack.last().ok_or_else(|| WalkError::Changed(path.to_path_buf()))?;
        if at_last && last == Last::NoFollow {
            return Ok(Resolved {
                parent: take(stack.pop().ok_or(WalkError::Changed(path.to_path_buf()))?)?,
                name: Some(name),
                last_stat: None,
            });
        }
        // A directory on the way is opened at once (one `openat`; its `statx` for the
        // trust rule only if that is asked for); only what does not open as one is looked
        // at: a link, a missing entry, something else.
        if !at_last {
            if let Ok(d) = Dir::open_subdir_in(top, &name)? {
                stack.push(Arc::new(d));
                continue;
            }
        }
        let here = top.join(&name);
        let found = top.stat(&name)?;
        match found {
            Some(m) if m.kind == FileType::Symlink => {
                if let Some(refusal) = top.link_refusal(&here, m.uid)? {
                    return Err(refusal);
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(WalkError::TooManyLinks(here));
                }
                let target = top.read_link(&name)?;
                if target.is_absolute() {
                    stack.truncate(1);
                }
                for c in components(&target).into_iter().rev() {
                    pending.push_front(c);
                }
            }
            None | Some(_) if at_last => {
                return Ok(Resolved {
                    parent: take(stack.pop().ok_or(WalkError::Changed(path.to_path_buf()))?)?,
                    name: Some(name),
                    last_stat: Some(found),
                })
            }
            Some(m) if m.is_dir() => match top.subdir(&name) {
                Ok(Some(d)) => stack.push(Arc::new(d)),
                // Replaced between the stat and the open: only someone who may write
                // here can do that, and it fails their own state.
                Ok(None) | Err(WalkError::Symlink(_)) => return Err(WalkError::Changed(here)),
                Err(e) => return Err(e),
            },
            Some(m) => return Err(WalkError::NotADirectory { path: here, found: kind_of(m.kind) }),
            None => match create {
                None => return Err(WalkError::Missing(here)),
                Some(new) => match top.mkdir(&name, new) {
                    Ok(d) => {
                        on_create(&here, new);
                        stack.push(Arc::new(d));
                    }
                    Err(WalkError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                        pending.push_front(name)
                    }
                    Err(e) => return Err(e),
                },
            },
        }
    }
}

/// The directory a walk held, for its caller: the walk's own (no directory opened in it
/// is left), else a second descriptor.
fn take(dir: Arc<Dir>) -> Result<Dir, WalkError> {
    Arc::try_unwrap(dir).or_else(|dir| dir.try_clone())
}

/// [`Dir::root_controlled`] for the directory `path`, which need not exist yet: then the
/// deepest directory on the way that exists must be root-controlled, since a tool
/// creating the rest as root creates it where only root could have put anything. Links
/// on the way are followed under the module's rule (an unsafe one is an error naming it).
pub fn root_controlled(path: &Path) -> Result<(), WalkError> {
    match resolve(path, Last::Follow, None, &mut |_, _| {}) {
        Ok(Resolved { parent, name: None, .. }) => parent.root_controlled(),
        Ok(Resolved { parent, name: Some(name), .. }) => match parent.subdir(&name)? {
            Some(dir) => dir.root_controlled(),
            None => parent.root_controlled(),
        },
        Err(WalkError::Missing(missing)) => root_controlled(missing.parent().unwrap_or(Path::new("/"))),
        Err(e) => Err(e),
    }
}

/// Opens (creating what is missing, with `new`) the directory `path`, its last
/// component included; links on the way and at the end are followed under the rule.
pub fn create_dir_all(path: &Path, new: NewDirs, on_create: &mut dyn FnMut(&Path, NewDirs)) -> Result<Dir, WalkError> {
    let r = resolve(path, Last::Follow, Some(new), on_create)?;
    let Some(name) = r.name else {
        return Ok(r.parent);
    };
    loop {
        if let Some(d) = r.parent.subdir(&name)? {
            return Ok(d);
        }
        match r.parent.mkdir(&name, new) {
            Ok(d) => {
                on_create(&r.parent.join(&name), new);
                return Ok(d);
            }
            Err(WalkError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
