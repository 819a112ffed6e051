//! Safe extraction of tar, tar.gz, tar.bz2 and zip archives.
//!
//! Archives come from the network, so every entry is treated as hostile: nothing may be
//! created outside `dest`, nothing is written through a symbolic link, no device or FIFO
//! is created, set-id and sticky bits are dropped, and sizes are capped (declared sizes
//! and the bytes actually written, since a header can lie and a compressed stream can
//! expand enormously).
//!
//! Threat model: the *archive* is untrusted, the destination is not shared. Callers
//! unpack into a fresh private temporary directory (root-owned, 0700) and move the
//! result into place. `dest` is opened once and everything happens relative to that
//! descriptor, one component at a time (`openat(O_NOFOLLOW)`, `mkdirat`, `symlinkat`,
//! `linkat`, `unlinkat`, `fchown`/`fchmod` on what was opened; [`crate::dirfd`]): a
//! directory on the way to `dest`, or `dest` itself, renamed or swapped for a link
//! while the unpack runs, changes nothing of where entries land, and no path below
//! `dest` is ever resolved by name from the top again.
//! A failed unpack may leave a partial `dest` behind: callers remove the temporary
//! directory on error and never rename a partial tree into place.
//!
//! Symbolic links inside the archive are allowed when their target is relative and
//! provably stays inside `dest`: the target must be a run of `..` that climbs no higher
//! than the link's own directory depth, followed by plain names only. A `..` after a
//! name (`a/../b`) is refused, because `a` may itself be a link, and resolving it
//! textually would then be wrong (the classic `d/up -> ..`, `x -> d/up/../..`). By
//! induction every link then resolves inside `dest`.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::dirfd::{self, Dir, NewDirs, WalkError};
use rustix::fs::FileType;

/// Mode of a file whose archive entry carries none (zip written on Windows).
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Longest symbolic link target read from a zip entry (its target is its content).
const MAX_LINK_TARGET: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    Tar,
    TarGz,
    TarBz2,
    Zip,
}

impl ArchiveFormat {
    /// The format named by a file name's (or URL path's) suffix, case-insensitive: `tar`,
    /// `tgz`, `tar.gz`, `gz`, `bz`, `bz2`, `tbz`, `tbz2`, `tar.bz2`, `zip`. A query
    /// string or fragment is ignored.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.split(['?', '#']).next().unwrap_or(name).to_ascii_lowercase();
        const SUFFIXES: &[(&str, ArchiveFormat)] = &[
            (".tar.gz", ArchiveFormat::TarGz),
            (".tgz", ArchiveFormat::TarGz),
            // The original adaptor accepted a plain `.gz` as a gzipped tar too.
            (".gz", ArchiveFormat::TarGz),
            (".tar.bz2", ArchiveFormat::TarBz2),
            (".tbz2", ArchiveFormat::TarBz2),
            (".tbz", ArchiveFormat::TarBz2),
            (".bz2", ArchiveFormat::TarBz2),
            (".bz", ArchiveFormat::TarBz2),
            (".tar", ArchiveFormat::Tar),
            (".zip", ArchiveFormat::Zip),
        ];
        SUFFIXES.iter().find(|(suffix, _)| name.ends_with(suffix)).map(|(_, f)| *f)
    }

    /// The format of the file at `path`, by its first bytes.
    pub fn sniff(path: &Path) -> Result<Self, UnpackError> {
        let mut f = File::open(path).map_err(io_err(path, "open"))?;
        Self::sniff_reader(&mut f, path)
    }

    /// [`Self::sniff`] of what `r` reads from where it stands (`path`: for messages).
    pub fn sniff_reader(r: &mut dyn Read, path: &Path) -> Result<Self, UnpackError> {
        let mut head = Vec::with_capacity(512);
        r.take(512).read_to_end(&mut head).map_err(io_err(path, "read"))?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Self::TarGz)
        } else if head.starts_with(b"BZh") {
            Ok(Self::TarBz2)
        } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Ok(Self::Zip)
        } else if head.len() == 512 && (head.get(257..262) == Some(b"ustar".as_slice()) || tar_checksum_ok(&head)) {
            Ok(Self::Tar)
        } else {
            Err(UnpackError::UnknownFormat { path: path.to_path_buf() })
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tar => "tar",
            Self::TarGz => "tar.gz",
            Self::TarBz2 => "tar.bz2",
            Self::Zip => "zip",
        }
    }
}

impl std::fmt::Display for ArchiveFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A pre-POSIX tar header has no magic; its checksum field still identifies it.
fn tar_checksum_ok(head: &[u8]) -> bool {
    let field = String::from_utf8_lossy(head.get(148..156).unwrap_or_default());
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8) else {
        return false;
    };
    let sum: u32 = head.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u32::from(*b) }).sum();
    head.iter().any(|b| *b != 0) && sum == stored
}

/// Caps on what one archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries of any kind (files, directories, links).
    pub max_entries: u64,
    /// Bytes of one file.
    pub max_entry_bytes: u64,
    /// Bytes of all files together.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    /// Generous for software distributions, small enough that a decompression bomb
    /// cannot fill a typical root file system.
    fn default() -> Self {
        Self { max_entries: 200_000, max_entry_bytes: 1 << 30, max_total_bytes: 2 << 30 }
    }
}

/// What an unpack created: entries of any kind, and file bytes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{path}: not a tar, tar.gz, tar.bz2 or zip archive")]
    UnknownFormat { path: PathBuf },
    #[error("{archive}: corrupt or unreadable {format} archive: {reason}")]
    Corrupt { archive: PathBuf, format: ArchiveFormat, reason: String },
    #[error("entry {entry:?}: absolute paths are refused")]
    Absolute { entry: String },
    #[error("entry {entry:?}: \"..\" components are refused")]
    ParentComponent { entry: String },
    #[error("entry {entry:?}: the name is not usable ({reason})")]
    BadName { entry: String, reason: &'static str },
    #[error("entry {entry:?}: symbolic link to {target:?} refused: {reason}")]
    SymlinkEscapes { entry: String, target: String, reason: &'static str },
    #[error("entry {entry:?}: hard link to {target:?} refused: {reason}")]
    HardLink { entry: String, target: String, reason: String },
    #[error("entry {entry:?}: {kind} entries are refused")]
    Special { entry: String, kind: String },
    #[error("entry {entry:?}: {link} is a symbolic link; nothing is written through a link")]
    ThroughSymlink { entry: String, link: String },
    #[error("entry {entry:?}: {path} is {found}, not a directory")]
    NotADirectory { entry: String, path: String, found: &'static str },
    #[error("entry {entry:?}: cannot replace the directory {path} with a non-directory")]
    ReplacesDirectory { entry: String, path: String },
    #[error("entry {entry:?}: {size} bytes exceeds the limit of {limit} bytes per file")]
    EntryTooLarge { entry: String, size: u64, limit: u64 },
    #[error("entry {entry:?}: the archive unpacks to more than the limit of {limit} bytes in total")]
    TotalTooLarge { entry: String, limit: u64 },
    #[error("the archive has more than the limit of {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("entry {entry:?}: the archive unpacks to more than the {free} bytes free for unprivileged use on the target file system")]
    NoRoom { entry: String, free: u64 },
    #[error(transparent)]
    Walk(#[from] WalkError),
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.to_path_buf();
    move |source| UnpackError::Io { path, op, source }
}

/// Unpacks `archive` (of `format`) into the existing directory `dest`. Every created
/// object is owned by `owner` (`None`: root). See the module documentation for what is
/// refused; on error `dest` may hold part of the archive.
pub fn unpack(
    archive: &Path,
    format: ArchiveFormat,
    dest: &Path,
    limits: &Limits,
    owner: Option<(u32, u32)>,
) -> Result<Unpacked, UnpackError> {
    crate::plan::check("unpack into", dest.display()).map_err(|r| io_err(dest, "unpack into")(r.into()))?;
    let dest_dir = match Dir::open_given(dest) {
        Ok(d) => d,
        Err(WalkError::Symlink(_) | WalkError::Io { .. }) if fs::symlink_metadata(dest).is_ok_and(|m| !m.is_dir()) => {
            let found = fs::symlink_metadata(dest).map_or("gone", |m| crate::fsutil::kind_of(m.file_type()));
            return Err(UnpackError::NotADirectory { entry: String::new(), path: dest.display().to_string(), found });
        }
        Err(e) => return Err(e.into()),
    };
    // What unprivileged users may still write there: root's reserve stays untouched, so
    // an archive cannot fill the file system the host needs to keep running.
    let vfs =
        nix::sys::statvfs::fstatvfs(&dest_dir).map_err(|e| io_err(dest, "measure the free space of")(e.into()))?;
    #[allow(clippy::useless_conversion)] // fsblkcnt_t and c_ulong are narrower on 32-bit targets
    let room = u64::from(vfs.blocks_available()).saturating_mul(u64::from(vfs.fragment_size()));
    let file = File::open(archive).map_err(io_err(archive, "open"))?;
    let mut x = Extractor {
        dest: dest_dir,
        limits: *limits,
        room,
        owner: owner.unwrap_or((0, 0)),
        done: Unpacked::default(),
        dir_modes: Vec::new(),
    };
    read_entries(&mut x, file, archive, format)?;
    x.finish_dirs()?;
    Ok(x.done)
}

/// What [`unpack`] of `file` would report, found by reading the archive only (a plan's
/// look, issue 19): its entries and file bytes, with the refusals that need no
/// destination (names, link targets, entry kinds, the size and count caps). What only
/// the destination can tell (free space, links or non-directories already in the way,
/// a hard link's target) is left to the unpack. `archive`: for messages.
pub fn survey(file: File, archive: &Path, format: ArchiveFormat, limits: &Limits) -> Result<Unpacked, UnpackError> {
    let mut s = Survey { limits: *limits, done: Unpacked::default() };
    read_entries(&mut s, file, archive, format)?;
    Ok(s.done)
}

/// Reads every entry of the archive and hands it to `to`: the one reading of archives
/// that [`unpack`] and [`survey`] share, so that both see the same entries.
fn read_entries(to: &mut dyn Entries, file: File, archive: &Path, format: ArchiveFormat) -> Result<(), UnpackError> {
    let corrupt = |e: io::Error| UnpackError::Corrupt { archive: archive.to_path_buf(), format, reason: e.to_string() };
    match format {
        ArchiveFormat::Tar => read_tar(to, io::BufReader::new(file), &corrupt),
        ArchiveFormat::TarGz => read_tar(to, flate2::read::MultiGzDecoder::new(io::BufReader::new(file)), &corrupt),
        ArchiveFormat::TarBz2 => read_tar(to, bzip2::read::MultiBzDecoder::new(io::BufReader::new(file)), &corrupt),
        ArchiveFormat::Zip => read_zip(to, file, archive),
    }
}

/// Where the entries of an archive go.
trait Entries {
    fn max_entries(&self) -> u64;
    fn entry(&mut self, name: &[u8], shown: &str, kind: Kind, data: &mut dyn Read) -> Result<(), UnpackError>;
}

/// Counts what an unpack would create ([`survey`]).
struct Survey {
    limits: Limits,
    done: Unpacked,
}

impl Entries for Survey {
    fn max_entries(&self) -> u64 {
        self.limits.max_entries
    }

    fn entry(&mut self, name: &[u8], shown: &str, kind: Kind, data: &mut dyn Read) -> Result<(), UnpackError> {
        if self.done.entries >= self.limits.max_entries {
            return Err(UnpackError::TooManyEntries { limit: self.limits.max_entries });
        }
        let parts = entry_components(name, shown)?;
        let Some((_, parents)) = parts.split_last() else {
            return Ok(());
        };
        let total_error =
            |entry: &str| UnpackError::TotalTooLarge { entry: entry.into(), limit: self.limits.max_total_bytes };
        match kind {
            Kind::File { declared, .. } => {
                if declared > self.limits.max_entry_bytes {
                    let limit = self.limits.max_entry_bytes;
                    return Err(UnpackError::EntryTooLarge { entry: shown.into(), size: declared, limit });
                }
                if self.done.bytes.saturating_add(declared) > self.limits.max_total_bytes {
                    return Err(total_error(shown));
                }
                // Inflated no further than the bound (a zip's declared size may lie): one
                // byte past it is enough to refuse it, as the extractor does.
                let mut capped = data.take(self.limits.max_entry_bytes.saturating_add(1));
                let read = io::copy(&mut capped, &mut io::sink()).map_err(io_err(Path::new(shown), "read"))?;
                if read > self.limits.max_entry_bytes {
                    let limit = self.limits.max_entry_bytes;
                    return Err(UnpackError::EntryTooLarge { entry: shown.into(), size: read, limit });
                }
                self.done.bytes = self.done.bytes.saturating_add(read);
                if self.done.bytes > self.limits.max_total_bytes {
                    return Err(total_error(shown));
                }
            }
            Kind::Symlink { target } => {
                check_symlink_target(&target, parents.len(), shown, &String::from_utf8_lossy(&target))?;
            }
            Kind::Dir { .. } | Kind::HardLink { .. } => {}
        }
        self.done.entries += 1;
        Ok(())
    }
}

/// What one entry asks to create.
enum Kind {
    File { mode: u32, declared: u64 },
    Dir { mode: u32 },
    Symlink { target: Vec<u8> },
    HardLink { target: Vec<u8> },
}

struct Extractor {
    /// The destination, held: every entry is reached from this descriptor.
    dest: Dir,
    limits: Limits,
    /// Bytes free for unprivileged use on `dest`'s file system when the unpack began.
    room: u64,
    owner: (u32, u32),
    done: Unpacked,
    /// Directories (as components below `dest`) get their archive mode at the end: a
    /// read-only directory created early would refuse its own children.
    dir_modes: Vec<(Vec<PathBuf>, u32)>,
}

impl Entries for Extractor {
    fn max_entries(&self) -> u64 {
        self.limits.max_entries
    }

    fn entry(&mut self, name: &[u8], shown: &str, kind: Kind, data: &mut dyn Read) -> Result<(), UnpackError> {
        Extractor::entry(self, name, shown, kind, data)
    }
}

fn read_tar<R: Read>(
    to: &mut dyn Entries,
    reader: R,
    corrupt: &dyn Fn(io::Error) -> UnpackError,
) -> Result<(), UnpackError> {
    use tar::EntryType as T;
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&name).into_owned();
        let header = entry.header();
        let mode = header.mode().unwrap_or(DEFAULT_FILE_MODE);
        let kind = match header.entry_type() {
            T::Regular | T::Continuous | T::GNUSparse => Kind::File { mode, declared: entry.size() },
            T::Directory => Kind::Dir { mode },
            T::Symlink => Kind::Symlink { target: link_name(&entry, &shown, corrupt)? },
            T::Link => Kind::HardLink { target: link_name(&entry, &shown, corrupt)? },
            T::Char => return Err(special(&shown, "character device")),
            T::Block => return Err(special(&shown, "block device")),
            T::Fifo => return Err(special(&shown, "FIFO")),
            // Metadata the tar crate did not fold into the next entry: nothing to create.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
            other => return Err(special(&shown, &format!("tar type {:?}", other.as_byte() as char))),
        };
        to.entry(&name, &shown, kind, &mut entry).map_err(|e| match e {
            // A read error in the middle of a file is the archive's fault.
            UnpackError::Io { op: "read", source, .. } => corrupt(source),
            e => e,
        })?;
    }
    Ok(())
}

fn read_zip(to: &mut dyn Entries, file: File, archive: &Path) -> Result<(), UnpackError> {
    let corrupt =
        |reason: String| UnpackError::Corrupt { archive: archive.to_path_buf(), format: ArchiveFormat::Zip, reason };
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file)).map_err(|e| corrupt(e.to_string()))?;
    if zip.len() as u64 > to.max_entries() {
        return Err(UnpackError::TooManyEntries { limit: to.max_entries() });
    }
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| corrupt(e.to_string()))?;
        let name = entry.name().as_bytes().to_vec();
        let shown = entry.name().to_string();
        if entry.encrypted() {
            return Err(special(&shown, "encrypted"));
        }
        let unix = entry.unix_mode();
        const S_IFMT: u32 = 0o170000;
        let kind = match unix.map(|m| m & S_IFMT) {
            _ if entry.is_dir() => Kind::Dir { mode: unix.map_or(DEFAULT_DIR_MODE, |m| m & 0o7777) },
            None | Some(0o100000) | Some(0) => {
                Kind::File { mode: unix.map_or(DEFAULT_FILE_MODE, |m| m & 0o7777), declared: entry.size() }
            }
            Some(0o040000) => Kind::Dir { mode: unix.map_or(DEFAULT_DIR_MODE, |m| m & 0o7777) },
            Some(0o120000) => {
                let mut target = Vec::new();
                (&mut entry)
                    .take(MAX_LINK_TARGET + 1)
                    .read_to_end(&mut target)
                    .map_err(|e| corrupt(format!("entry {shown:?}: {e}")))?;
                if target.len() as u64 > MAX_LINK_TARGET {
                    return Err(UnpackError::SymlinkEscapes {
                        entry: shown,
                        target: String::from_utf8_lossy(target.get(..64).unwrap_or_default()).into_owned() + "...",
                        reason: "the target is too long",
                    });
                }
                Kind::Symlink { target }
            }
            Some(0o020000) => return Err(special(&shown, "character device")),
            Some(0o060000) => return Err(special(&shown, "block device")),
            Some(0o010000) => return Err(special(&shown, "FIFO")),
            Some(0o140000) => return Err(special(&shown, "socket")),
            Some(other) => return Err(special(&shown, &format!("file type {other:o}"))),
        };
        to.entry(&name, &shown, kind, &mut entry).map_err(|e| match e {
            UnpackError::Io { op: "read", source, .. } => corrupt(format!("entry {shown:?}: {source}")),
            e => e,
        })?;
    }
    Ok(())
}

impl Extractor {
    fn entry(&mut self, name: &[u8], shown: &str, kind: Kind, data: &mut dyn Read) -> Result<(), UnpackError> {
        if self.done.entries >= self.limits.max_entries {
            return Err(UnpackError::TooManyEntries { limit: self.limits.max_entries });
        }
        let parts = entry_components(name, shown)?;
        // `./` (or an empty name): the destination itself, which already exists.
        let Some((last, parents)) = parts.split_last() else {
            return Ok(());
        };
        let parent = self.ensure_parents(parents, shown)?;
        let last = last.as_os_str();
        match kind {
            Kind::Dir { mode } => self.dir(&parent, &parts, shown, mode)?,
            Kind::File { mode, declared } => {
                self.check_size(shown, declared)?;
                clear(&parent, last, &parts, shown)?;
                self.file(&parent, last, shown, mode, data)?;
            }
            Kind::Symlink { target } => {
                let target_shown = String::from_utf8_lossy(&target).into_owned();
                check_symlink_target(&target, parents.len(), shown, &target_shown)?;
                clear(&parent, last, &parts, shown)?;
                parent.symlink(Path::new(&bytes_to_os(&target)), last)?;
                parent.chown_entry(last, self.owner.0, self.owner.1)?;
            }
            Kind::HardLink { target } => {
                let (src, src_name) = self.hard_link_source(&target, shown)?;
                clear(&parent, last, &parts, shown)?;
                parent.hard_link_from(&src, &src_name, last)?;
            }
        }
        self.done.entries += 1;
        Ok(())
    }

    /// All files together: the cap, or the free space if that is less.
    fn total_limit(&self) -> u64 {
        self.limits.max_total_bytes.min(self.room)
    }

    fn total_error(&self, entry: &str) -> UnpackError {
        if self.room < self.limits.max_total_bytes {
            UnpackError::NoRoom { entry: entry.into(), free: self.room }
        } else {
            UnpackError::TotalTooLarge { entry: entry.into(), limit: self.limits.max_total_bytes }
        }
    }

    fn check_size(&self, entry: &str, size: u64) -> Result<(), UnpackError> {
        if size > self.limits.max_entry_bytes {
            return Err(UnpackError::EntryTooLarge { entry: entry.into(), size, limit: self.limits.max_entry_bytes });
        }
        if self.done.bytes.saturating_add(size) > self.total_limit() {
            return Err(self.total_error(entry));
        }
        Ok(())
    }

    /// Opens (and creates) the directories leading to an entry, one component at a
    /// time from `dest`'s descriptor, refusing any link or non-directory on the way.
    fn ensure_parents(&mut self, parents: &[PathBuf], entry: &str) -> Result<Dir, UnpackError> {
        let mut cur = self.dest.try_clone()?;
        for (i, part) in parents.iter().enumerate() {
            let upto = parents.get(..=i).unwrap_or(parents);
            let name = part.as_os_str();
            cur = match cur.stat(name)? {
                Some(m) if m.kind == FileType::Symlink => {
                    return Err(UnpackError::ThroughSymlink { entry: entry.into(), link: shown_of(upto) });
                }
                Some(m) if m.is_dir() => open_sub(&cur, name, upto, entry)?,
                Some(m) => {
                    return Err(UnpackError::NotADirectory {
                        entry: entry.into(),
                        path: shown_of(upto),
                        found: dirfd::kind_of(m.kind),
                    })
                }
                None => self.make_dir(&cur, name, upto, DEFAULT_DIR_MODE)?,
            };
        }
        Ok(cur)
    }

    /// A new directory, private (0700) and owned by `owner` from the start; its mode is
    /// set at the end.
    fn make_dir(&mut self, parent: &Dir, name: &OsStr, parts: &[PathBuf], mode: u32) -> Result<Dir, UnpackError> {
        let made = parent.mkdir(name, NewDirs { mode: 0o700, uid: self.owner.0, gid: self.owner.1 })?;
        self.dir_modes.push((parts.to_vec(), mode));
        Ok(made)
    }

    fn dir(&mut self, parent: &Dir, parts: &[PathBuf], entry: &str, mode: u32) -> Result<(), UnpackError> {
        let name = parts.last().map_or(OsStr::new(""), |p| p.as_os_str());
        match parent.stat(name)? {
            Some(m) if m.is_dir() => {
                self.dir_modes.push((parts.to_vec(), mode));
                Ok(())
            }
            Some(m) if m.kind == FileType::Symlink => {
                Err(UnpackError::ThroughSymlink { entry: entry.into(), link: shown_of(parts) })
            }
            Some(m) => Err(UnpackError::NotADirectory {
                entry: entry.into(),
                path: shown_of(parts),
                found: dirfd::kind_of(m.kind),
            }),
            None => self.make_dir(parent, name, parts, mode).map(drop),
        }
    }

    fn file(
        &mut self,
        parent: &Dir,
        name: &OsStr,
        entry: &str,
        mode: u32,
        data: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        let path = parent.join(name);
        // O_CREAT | O_EXCL | O_NOFOLLOW, 0600: a fresh file, never one planted meanwhile.
        let mut f = parent.create_named(name)?;
        // The declared size was checked; the bytes that really come out are checked as
        // they are written (a header may lie, a compressed stream may not end).
        let left_total = self.total_limit().saturating_sub(self.done.bytes);
        let cap = self.limits.max_entry_bytes.min(left_total);
        let mut written = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&path, "read")(e)),
            };
            written += n as u64;
            if written > cap {
                drop(f);
                let _ = parent.unlink(name);
                return Err(if written > self.limits.max_entry_bytes {
                    UnpackError::EntryTooLarge {
                        entry: entry.into(),
                        size: written,
                        limit: self.limits.max_entry_bytes,
                    }
                } else {
                    self.total_error(entry)
                });
            }
            f.write_all(buf.get(..n).unwrap_or_default()).map_err(io_err(&path, "write"))?;
        }
        std::os::unix::fs::fchown(&f, Some(self.owner.0), Some(self.owner.1))
            .map_err(io_err(&path, "change the owner of"))?;
        // Only the rwx bits: set-id and sticky bits from a downloaded archive are refused
        // silently (root would otherwise install set-uid programs on a stranger's say).
        f.set_permissions(fs::Permissions::from_mode(mode & 0o777)).map_err(io_err(&path, "change the mode of"))?;
        self.done.bytes += written;
        Ok(())
    }

    /// The existing regular file inside `dest` that a hard link entry names: the
    /// directory holding it (opened by descriptor) and its name there.
    fn hard_link_source(&mut self, target: &[u8], entry: &str) -> Result<(Dir, OsString), UnpackError> {
        let target_shown = String::from_utf8_lossy(target).into_owned();
        let refuse =
            |reason: String| UnpackError::HardLink { entry: entry.to_string(), target: target_shown.clone(), reason };
        let parts = entry_components(target, &target_shown).map_err(|e| refuse(e.to_string()))?;
        let Some((last, parents)) = parts.split_last() else {
            return Err(refuse("it names the destination directory".into()));
        };
        let mut cur = self.dest.try_clone()?;
        for (i, part) in parts.iter().enumerate() {
            let upto = parts.get(..=i).unwrap_or(&parts);
            let is_last = i == parents.len();
            match cur.stat(part.as_os_str())? {
                None => return Err(refuse("the target is not in the archive (links must follow their target)".into())),
                Some(m) if m.kind == FileType::Symlink => {
                    return Err(refuse(format!("{} is a symbolic link", shown_of(upto))))
                }
                Some(m) if is_last && m.kind != FileType::RegularFile => {
                    return Err(refuse(format!("the target is {}, not a regular file", dirfd::kind_of(m.kind))))
                }
                Some(m) if !is_last && !m.is_dir() => {
                    return Err(refuse(format!("{} is {}", shown_of(upto), dirfd::kind_of(m.kind))))
                }
                Some(_) if is_last => {}
                Some(_) => cur = open_sub(&cur, part.as_os_str(), upto, entry)?,
            }
        }
        Ok((cur, last.as_os_str().to_os_string()))
    }

    /// Gives each directory its archive mode, deepest last-created first, reaching each
    /// again from `dest`'s descriptor without following anything.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (parts, mode) in std::mem::take(&mut self.dir_modes).into_iter().rev() {
            let mut cur = self.dest.try_clone()?;
            for (i, part) in parts.iter().enumerate() {
                cur = open_sub(&cur, part.as_os_str(), parts.get(..=i).unwrap_or(&parts), "")?;
            }
            cur.set_attrs(self.owner.0, self.owner.1, Some(mode & 0o777))?;
        }
        Ok(())
    }
}

/// The sub-directory `name` of `parent`, never through a link.
fn open_sub(parent: &Dir, name: &OsStr, parts: &[PathBuf], entry: &str) -> Result<Dir, UnpackError> {
    match parent.subdir(name) {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(WalkError::Changed(parent.join(name)).into()),
        Err(WalkError::Symlink(_)) => Err(UnpackError::ThroughSymlink { entry: entry.into(), link: shown_of(parts) }),
        Err(e) => Err(e.into()),
    }
}

/// Makes room for a non-directory at `name`: a later entry replaces an earlier one (as
/// tar does), and a link there is removed, never followed.
fn clear(parent: &Dir, name: &OsStr, parts: &[PathBuf], entry: &str) -> Result<(), UnpackError> {
    match parent.stat(name)? {
        None => Ok(()),
        Some(m) if m.is_dir() => Err(UnpackError::ReplacesDirectory { entry: entry.into(), path: shown_of(parts) }),
        Some(_) => parent.unlink(name).map_err(|e| match e {
            WalkError::Io { path, source, .. } => UnpackError::Io { path, op: "replace", source },
            e => e.into(),
        }),
    }
}

/// A path inside `dest`, as the archive names it (for messages).
fn shown_of(parts: &[PathBuf]) -> String {
    parts.iter().collect::<PathBuf>().display().to_string()
}

fn special(entry: &str, kind: &str) -> UnpackError {
    UnpackError::Special { entry: entry.to_string(), kind: kind.to_string() }
}

fn link_name<R: Read>(
    entry: &tar::Entry<'_, R>,
    shown: &str,
    corrupt: &dyn Fn(io::Error) -> UnpackError,
) -> Result<Vec<u8>, UnpackError> {
    match entry.link_name_bytes() {
        Some(t) if !t.is_empty() => Ok(t.into_owned()),
        _ => Err(corrupt(io::Error::other(format!("entry {shown:?}: a link without a target")))),
    }
}

fn bytes_to_os(b: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(b.to_vec())
}

/// The plain components of an entry name: refuses absolute names, `..` anywhere and NUL
/// bytes; drops `.` and empty components (`a//b`, `./a`, `a/`).
fn entry_components(name: &[u8], shown: &str) -> Result<Vec<PathBuf>, UnpackError> {
    if name.contains(&0) {
        return Err(UnpackError::BadName { entry: shown.into(), reason: "it contains a NUL byte" });
    }
    // Archives written on Windows may use backslashes; on unpack they must not smuggle
    // in a `..` that only another tool would see as a separator.
    let os = bytes_to_os(name);
    let path = Path::new(&os);
    if name.starts_with(b"/") {
        return Err(UnpackError::Absolute { entry: shown.into() });
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => {
                if part.as_encoded_bytes().split(|b| *b == b'\\').any(|p| p == b"..") {
                    return Err(UnpackError::ParentComponent { entry: shown.into() });
                }
                out.push(PathBuf::from(part));
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::ParentComponent { entry: shown.into() }),
            Component::RootDir | Component::Prefix(_) => return Err(UnpackError::Absolute { entry: shown.into() }),
        }
    }
    Ok(out)
}

/// See the module documentation: `(..)* name*`, climbing no higher than `depth` (the
/// number of directories between `dest` and the link).
fn check_symlink_target(target: &[u8], depth: usize, entry: &str, shown: &str) -> Result<(), UnpackError> {
    let refuse = |reason| UnpackError::SymlinkEscapes { entry: entry.into(), target: shown.into(), reason };
    if target.contains(&0) {
        return Err(refuse("the target contains a NUL byte"));
    }
    if target.starts_with(b"/") {
        return Err(refuse("absolute targets point outside the destination"));
    }
    let os = bytes_to_os(target);
    let mut ups = 0usize;
    let mut descended = false;
    for c in Path::new(&os).components() {
        match c {
            Component::ParentDir if descended => {
                return Err(refuse("\"..\" after a name is refused: that name may itself be a link"))
            }
            Component::ParentDir => ups += 1,
            Component::Normal(_) => descended = true,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("absolute targets point outside the destination"))
            }
        }
    }
    if ups > depth {
        return Err(refuse("it resolves outside the destination"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
