//! `common.archive`: an http(s) archive (tar, tar.gz, tar.bz2, zip) extracted into a
//! directory.
//!
//! When to fetch follows the documented rules (states.md, 2c), not the original code:
//! - with `if-path-absent`: fetch while none of those paths exists; once one exists,
//!   fetch again only when `checksum` is set and its value changed;
//! - without it: no `checksum` means fetch every round; with one, fetch when it changed.
//!
//! "Changed" is measured against a record of the last extraction into `path` from
//! `source`, kept in the helper's state directory, so a second round with the same
//! checksum neither changes anything nor asks the daemon to download. A checksum given
//! as a URL counts as changed when the URL does (reading the file it names would need a
//! download every round). A round that does fetch but finds the very archive it last
//! extracted, with its top-level entries still in place, changes nothing either.
//!
//! Checksums: `md5:<hex>` (the original's form; `md5=<hex>` too), `sha256:<hex>`, or the
//! URL of a checksum file holding `<hex>` or `<hex>  <name>` lines (md5 or sha256, told
//! apart by length; the line naming the archive wins when there are several).
//!
//! Extraction goes through [`crate::unpack`] into a private directory next to `path`
//! (same file system), and its top-level entries are then moved into `path`: existing
//! directories are merged, existing files and links replaced, a directory is never
//! replaced by a file. Everything goes through directory descriptors
//! ([`crate::dirfd`]): `path` and its parents are opened (or created) component by
//! component, a link on the way followed only where only root could have placed it; the
//! private directory is made in the opened parent and the unpacker reaches it through
//! its descriptor (`/proc/self/fd/N`), so renaming it or planting links beside it
//! redirects nothing; the moves are `renameat` between opened directories. Everything
//! extracted is owned by root (the module has no user/group parameters).
//!
//! A plan (issue 19) asks for the same downloads (the daemon's, as for an apply), then
//! reads instead of writing: the directories it would create, the download checked
//! against `checksum` and compared with the record, and, when it would extract, the
//! archive read through ([`unpack::survey`]) for the apply's own words (`PATH: extracted
//! URL (tar.gz, 3 entries, 12 bytes)`). Nothing is staged, unpacked or recorded.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::CommonArchive;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::Change;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Ctx, Step};
use crate::dirfd::{self, Dir, Last, NewDirs, WalkError};
use crate::fetched::{FetchError, Fetched};
use crate::fsutil::{self, FsError};
use crate::unpack::{self, ArchiveFormat, Limits, UnpackError};

/// Largest checksum file read.
const CHECKSUM_FILE_MAX: u64 = 64 * 1024;
const SUPPORTED: &str = "tar, tgz, tar.gz, bz, bz2, tbz, tbz2, tar.bz2 or zip";

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("parameter path: \"/\" cannot be replaced by an archive")]
    Root,
    #[error("parameter source {0:?}: only http:// and https:// URLs can be downloaded")]
    SourceScheme(String),
    #[error("parameter source {0:?}: the name must end in {SUPPORTED}")]
    SourceFormat(String),
    #[error("parameter checksum {0:?}: expected md5:<hex>, sha256:<hex> or the http(s) URL of a checksum file")]
    Checksum(String),
    #[error("checksum file {url}: {reason}")]
    ChecksumFile { url: String, reason: String },
    #[error("checksum mismatch for {url}: its {algo} is {got}, expected {want}; nothing was extracted")]
    Mismatch { url: String, algo: &'static str, got: String, want: String },
    #[error("{0} was not downloaded by the daemon")]
    NotFetched(String),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{url}: {error}")]
    Unpack { url: String, error: UnpackError },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{path}: {what}")]
    Target { path: String, what: String },
    #[error("the record of the extraction {path}: {reason}")]
    Record { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Checksum {
    Md5(String),
    Sha256(String),
    Url(String),
}

impl Checksum {
    fn parse(raw: &str) -> Result<Self, ArchiveError> {
        let v = raw.trim();
        let bad = || ArchiveError::Checksum(raw.to_string());
        if super::file::remote_scheme_ok(v) {
            return Ok(Self::Url(v.to_string()));
        }
        let (algo, hex) = v.split_once([':', '=']).ok_or_else(bad)?;
        let hex = hex.trim().to_ascii_lowercase();
        let is_hex = |n: usize| hex.len() == n && hex.bytes().all(|b| b.is_ascii_hexdigit());
        match algo.trim().to_ascii_lowercase().as_str() {
            "md5" if is_hex(32) => Ok(Self::Md5(hex)),
            "sha256" if is_hex(64) => Ok(Self::Sha256(hex)),
            _ => Err(bad()),
        }
    }

    /// The value compared between rounds.
    fn key(&self) -> String {
        match self {
            Self::Md5(h) => format!("md5:{h}"),
            Self::Sha256(h) => format!("sha256:{h}"),
            Self::Url(u) => u.clone(),
        }
    }
}

/// What was last extracted into a path from a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    path: String,
    source: String,
    checksum: Option<String>,
    sha256: String,
    /// Top-level names moved into `path`.
    entries: Vec<String>,
}

struct Checked {
    path: AbsPath,
    source: String,
    format: ArchiveFormat,
    checksum: Option<Checksum>,
    if_absent: Vec<AbsPath>,
}

fn check(p: &CommonArchive) -> Result<Checked, ArchiveError> {
    let path = p.path.abs().clone();
    if path.is_root() {
        return Err(ArchiveError::Root);
    }
    let source = p.source.trim().to_string();
    if !super::file::remote_scheme_ok(&source) {
        return Err(ArchiveError::SourceScheme(source));
    }
    let format = ArchiveFormat::from_name(&source).ok_or_else(|| ArchiveError::SourceFormat(source.clone()))?;
    let checksum = p.checksum.as_deref().filter(|c| !c.trim().is_empty()).map(Checksum::parse).transpose()?;
    let if_absent = p.if_path_absent.iter().flat_map(|a| a.iter()).cloned().collect();
    Ok(Checked { path, source, format, checksum, if_absent })
}

pub fn apply(p: &CommonArchive, ctx: &Ctx, fetched: &Fetched<'_>) -> Step {
    let subject = p.path.0.clone();
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = (|| -> Result<Option<Vec<String>>, ArchiveError> {
        let c = check(p)?;
        let record_path = record_file(&ctx.state_dir, &c);
        let record = read_record(&record_path)?;
        if let Some(why) = skip_reason(&c, record.as_ref()) {
            notes.push(why);
            return Ok(None);
        }
        let mut urls = vec![c.source.as_str()];
        if let Some(Checksum::Url(u)) = &c.checksum {
            urls.push(u);
        }
        let missing = fetched.missing(&urls);
        if !missing.is_empty() {
            return Ok(Some(missing));
        }
        if crate::plan::active() {
            planned(&c, record.as_ref(), fetched, &mut changes, &mut notes)?;
        } else {
            extract(&c, record.as_ref(), &record_path, fetched, &mut changes, &mut notes)?;
        }
        Ok(None)
    })();
    match result {
        Ok(Some(urls)) => Step::NeedFetch(urls),
        Ok(None) => Step::Done(super::finish(&subject, Ok::<(), ArchiveError>(()), changes, &notes)),
        Err(e) => Step::Done(super::finish(&subject, Err(e), changes, &notes)),
    }
}

/// Why this round needs no download, per the documented rules; `None`: fetch.
fn skip_reason(c: &Checked, record: Option<&Record>) -> Option<String> {
    let changed = |cs: &Checksum| record.and_then(|r| r.checksum.as_deref()) != Some(cs.key().as_str());
    if !c.if_absent.is_empty() {
        let present = c.if_absent.iter().find(|p| fs::symlink_metadata(p.as_path()).is_ok())?;
        return match &c.checksum {
            Some(cs) if changed(cs) => None,
            Some(_) => Some(format!("{present} exists and the checksum is unchanged")),
            None => Some(format!("{present} exists (if-path-absent)")),
        };
    }
    let cs = c.checksum.as_ref()?;
    let in_place = fs::symlink_metadata(c.path.as_path()).is_ok_and(|m| m.is_dir());
    (!changed(cs) && in_place).then(|| "checksum unchanged since the last extraction".to_string())
}

fn extract(
    c: &Checked,
    record: Option<&Record>,
    record_path: &Path,
    fetched: &Fetched<'_>,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    // The directory that holds `path`, opened (created: root, 0755) by descriptor.
    let root = NewDirs { mode: fsutil::PARENT_DIR_MODE, uid: 0, gid: 0 };
    let mut created = |dir: &Path, new: NewDirs| {
        changes.push(Change::new(
            dir.display().to_string(),
            format!("directory created ({} {}:{})", fsutil::describe_mode(new.mode), new.uid, new.gid),
        ))
    };
    let r = dirfd::resolve(c.path.as_path(), Last::Follow, Some(root), &mut created)?;
    let (parent, name) = (&r.parent, r.name.clone().ok_or(ArchiveError::Root)?);
    let work = WorkDir::create(parent, &name)?;
    let copy = work.dir.fd_path(OsStr::new("archive"));
    let got = fetched
        .copy_to(&c.source, &work.dir, OsStr::new("archive"))?
        .ok_or_else(|| ArchiveError::NotFetched(c.source.clone()))?;
    verify_checksum(c, fetched, &got.md5, &got.sha256)?;

    if let (Some(r), Some(target)) = (record, target_dir(parent, &name)?) {
        let entries_there = r.entries.iter().map(|e| target.stat(OsStr::new(e))).collect::<Result<Vec<_>, _>>()?;
        if r.sha256 == got.sha256 && entries_there.iter().all(Option::is_some) {
            notes.push("the archive is unchanged since the last extraction".to_string());
            return write_record(record_path, c, &got.sha256, r.entries.clone());
        }
    }

    // The name chose the format at check time; the content has the last word (a
    // `.tar` that is really gzipped still unpacks).
    let format = ArchiveFormat::sniff(&copy).unwrap_or(c.format);
    let tree = work.dir.mkdir(OsStr::new("tree"), NewDirs { mode: 0o700, uid: 0, gid: 0 })?;
    let done = unpack::unpack(&copy, format, &work.dir.fd_path(OsStr::new("tree")), &Limits::default(), None)
        .map_err(|error| ArchiveError::Unpack { url: c.source.clone(), error })?;

    let target = match target_dir(parent, &name)? {
        Some(t) => t,
        None => {
            let made = parent.mkdir(&name, root)?;
            changes.push(Change::new(c.path.to_string(), "directory created (0755 0:0)"));
            made
        }
    };
    let mut entries = BTreeSet::new();
    for (entry, _) in tree.entries()? {
        entries.insert(entry.to_string_lossy().into_owned());
        move_into(&tree, &entry, &target)?;
    }
    target.fsync()?;
    changes.push(Change::new(
        c.path.to_string(),
        format!("extracted {} ({format}, {} entries, {} bytes)", c.source, done.entries, done.bytes),
    ));
    write_record(record_path, c, &got.sha256, entries.into_iter().collect())
}

/// [`extract`]'s look without its writes (a plan, issue 19): the directories it would
/// create, and the extraction in its words, counted by reading the download
/// ([`unpack::survey`]); nothing when the download is the archive last extracted and
/// its entries are in place. The record is not written.
fn planned(
    c: &Checked,
    record: Option<&Record>,
    fetched: &Fetched<'_>,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let (file, got) = fetched.open_checked(&c.source)?.ok_or_else(|| ArchiveError::NotFetched(c.source.clone()))?;
    verify_checksum(c, fetched, &got.md5, &got.sha256)?;
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    // `path` opened when it is a directory; else the directories the apply would create,
    // from the first missing one down to `path` (root, 0755, as the apply makes them).
    let target = fsutil::planned_dirs(c.path.as_path(), fsutil::PARENT_DIR_MODE, root, changes)?;
    if let (Some(r), Some(target)) = (record, &target) {
        let entries_there = r.entries.iter().map(|e| target.stat(OsStr::new(e))).collect::<Result<Vec<_>, _>>()?;
        if r.sha256 == got.sha256 && entries_there.iter().all(Option::is_some) {
            notes.push("the archive is unchanged since the last extraction".to_string());
            return Ok(());
        }
    }
    let shown = PathBuf::from(format!("the download of {}", c.source));
    let mut file = file;
    let format = ArchiveFormat::sniff_reader(&mut file, &shown).unwrap_or(c.format);
    io::Seek::rewind(&mut file).map_err(|source| ArchiveError::Unpack {
        url: c.source.clone(),
        error: UnpackError::Io { path: shown.clone(), op: "rewind", source },
    })?;
    let done = unpack::survey(file, &shown, format, &Limits::default())
        .map_err(|error| ArchiveError::Unpack { url: c.source.clone(), error })?;
    changes.push(Change::new(
        c.path.to_string(),
        format!("extracted {} ({format}, {} entries, {} bytes)", c.source, done.entries, done.bytes),
    ));
    Ok(())
}

fn verify_checksum(c: &Checked, fetched: &Fetched<'_>, md5: &str, sha256: &str) -> Result<(), ArchiveError> {
    let want = match &c.checksum {
        None => return Ok(()),
        Some(Checksum::Url(url)) => {
            let text =
                fetched.read_small(url, CHECKSUM_FILE_MAX)?.ok_or_else(|| ArchiveError::NotFetched(url.clone()))?;
            checksum_from_file(&String::from_utf8_lossy(&text), &c.source)
                .map_err(|reason| ArchiveError::ChecksumFile { url: url.clone(), reason })?
        }
        Some(other) => other.clone(),
    };
    let (algo, got, want) = match want {
        Checksum::Md5(w) => ("md5", md5, w),
        Checksum::Sha256(w) => ("sha256", sha256, w),
        Checksum::Url(u) => {
            return Err(ArchiveError::Checksum(format!("{u} (a checksum file cannot name another checksum file)")))
        }
    };
    if got != want {
        return Err(ArchiveError::Mismatch { url: c.source.clone(), algo, got: got.to_string(), want });
    }
    Ok(())
}

/// The digest in a checksum file: `<hex>` alone, or `<hex>  <name>` lines, where the
/// line naming the archive (by its last path segment) wins.
fn checksum_from_file(text: &str, source: &str) -> Result<Checksum, String> {
    let name = source.split(['?', '#']).next().unwrap_or(source).rsplit('/').next().unwrap_or("");
    let mut candidates = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut parts = line.splitn(2, char::is_whitespace);
        let hex = parts.next().unwrap_or("").to_ascii_lowercase();
        let file = parts.next().map(|f| f.trim().trim_start_matches('*'));
        let digest = match hex.len() {
            32 if hex.bytes().all(|b| b.is_ascii_hexdigit()) => Checksum::Md5(hex),
            64 if hex.bytes().all(|b| b.is_ascii_hexdigit()) => Checksum::Sha256(hex),
            _ => continue,
        };
        if file.is_some_and(|f| f == name || f.rsplit('/').next() == Some(name)) {
            return Ok(digest);
        }
        candidates.push(digest);
    }
    match candidates.len() {
        1 => Ok(candidates.remove(0)),
        0 => Err("no md5 or sha256 digest in it".to_string()),
        n => Err(format!("{n} digests and none names {name:?}")),
    }
}

/// A private (root, 0700) directory in the opened parent of `path` (same file system,
/// so the moves are renames), removed with what is left in it when dropped.
struct WorkDir<'a> {
    parent: &'a Dir,
    name: OsString,
    dir: Dir,
}

impl<'a> WorkDir<'a> {
    fn create(parent: &'a Dir, target: &OsStr) -> Result<Self, ArchiveError> {
        let name = parent.temp_name(target);
        let dir = parent.mkdir(&name, NewDirs { mode: 0o700, uid: 0, gid: 0 })?;
        Ok(Self { parent, name, dir })
    }
}

impl Drop for WorkDir<'_> {
    fn drop(&mut self) {
        let _ = self.parent.remove_tree(&self.name);
    }
}

/// The entry `name` of `parent` opened as a directory, or `None` if missing.
fn target_dir(parent: &Dir, name: &OsStr) -> Result<Option<Dir>, ArchiveError> {
    let shown = parent.join(name).display().to_string();
    match parent.stat(name)? {
        None => Ok(None),
        Some(m) if m.kind == rustix::fs::FileType::Symlink => Err(ArchiveError::Target {
            path: shown,
            what: "is a symbolic link that appeared while extracting; archives are never extracted through it".into(),
        }),
        Some(m) if !m.is_dir() => {
            Err(ArchiveError::Target { path: shown, what: format!("is {}, not a directory", dirfd::kind_of(m.kind)) })
        }
        Some(_) => Ok(parent.subdir(name)?),
    }
}

/// Moves the entry `name` of `src` (in the private tree) into the directory `dst`,
/// merging directories.
fn move_into(src: &Dir, name: &OsStr, dst: &Dir) -> Result<(), ArchiveError> {
    let here = dst.join(name);
    let src_meta = src.stat(name)?.ok_or_else(|| WalkError::Changed(src.join(name)))?;
    match dst.stat(name)? {
        Some(existing) if existing.is_dir() => {
            if !src_meta.is_dir() {
                return Err(ArchiveError::Target {
                    path: here.display().to_string(),
                    what: "is a directory; the archive has a file there and a directory is never replaced by one"
                        .into(),
                });
            }
            let sub = dst.subdir(name)?.ok_or_else(|| WalkError::Changed(here.clone()))?;
            let from = src.subdir(name)?.ok_or_else(|| WalkError::Changed(src.join(name)))?;
            for (entry, _) in from.entries()? {
                move_into(&from, &entry, &sub)?;
            }
            // The archive's mode for a directory that was already there (as tar does).
            let m = sub.meta()?;
            sub.set_attrs(m.uid, m.gid, Some(src_meta.mode & 0o777))?;
            Ok(())
        }
        Some(_) if src_meta.is_dir() => {
            // A file or a link where the archive has a directory: the link is replaced,
            // never followed.
            dst.unlink(name)?;
            Ok(dst.rename_from(src, name, name)?)
        }
        // rename(2) replaces a file or a link atomically.
        _ => Ok(dst.rename_from(src, name, name)?),
    }
}

/// `<state_dir>/archive/<sha256 of path and source>.json`.
fn record_file(state_dir: &Path, c: &Checked) -> PathBuf {
    let mut h = Sha256::new();
    h.update(c.path.to_string().as_bytes());
    h.update([0]);
    h.update(c.source.as_bytes());
    state_dir.join("archive").join(format!("{}.json", hex::encode(h.finalize())))
}

fn read_record(path: &Path) -> Result<Option<Record>, ArchiveError> {
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(r) => Ok(Some(r)),
            // A damaged record only costs a download: treat it as absent.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable archive record; ignoring it");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ArchiveError::Record { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

fn write_record(path: &Path, c: &Checked, sha256: &str, entries: Vec<String>) -> Result<(), ArchiveError> {
    let record = Record {
        path: c.path.to_string(),
        source: c.source.clone(),
        checksum: c.checksum.as_ref().map(Checksum::key),
        sha256: sha256.to_string(),
        entries,
    };
    let err = |reason: String| ArchiveError::Record { path: path.to_path_buf(), reason };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fsutil::create_dir_all(dir, 0o700, (Uid::from_raw(0), Gid::from_raw(0)), &mut Vec::new())
        .map_err(|e| err(e.to_string()))?;
    let bytes = serde_json::to_vec_pretty(&record).map_err(|e| err(e.to_string()))?;
    let abs = AbsPath::parse(&path.display().to_string()).map_err(|e| err(e.to_string()))?;
    fsutil::write_atomic(&abs, &bytes, 0o600, 0, 0).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests;
