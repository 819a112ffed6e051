//! From staged files to a verified release tree: copy out of the daemon's directory,
//! check the signature and its trusted comment, unpack safely, check the MANIFEST.
//!
//! Order matters: nothing from the archive is unpacked before its signature verified,
//! and the signature is checked on the installer's own copy (the daemon cannot swap the
//! file between the check and the use).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use minisign_verify::{PublicKey, Signature};
use opsagent_shared::upgrade as hand;
use sha2::{Digest, Sha256};

use super::order::StagedOrder;
use super::UpgradeError;
use crate::dirfd::{Dir, WalkError};
use crate::fsutil;
use crate::unpack::{self, ArchiveFormat, Limits};

/// Release archives are tens of MiB; anything far larger is not ours.
pub const MAX_ARCHIVE_BYTES: u64 = 256 << 20;
const MAX_SIGNATURE_BYTES: u64 = 4096;
const MAX_ORDER_BYTES: u64 = 64 << 10;
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// The programs every release must carry (the units and the supervisor start them).
pub const REQUIRED_PROGRAMS: &[&str] = &["bin/opsagent", "bin/opsagent-helper", "bin/opsagent-upgrade"];

/// The installer's own copies of the staged files.
#[derive(Debug)]
pub struct Staged {
    pub order: StagedOrder,
    pub archive: PathBuf,
    pub signature: PathBuf,
}

/// Opens a directory of the daemon's without following a symlink, and names its entries
/// through `/proc/self/fd`, so that a path swapped after the check cannot redirect root.
pub struct PinnedDir {
    dir: File,
    shown: PathBuf,
}

impl PinnedDir {
    pub fn open(path: &Path) -> Result<Self, UpgradeError> {
        Self::open_shown(path, path.to_path_buf())
    }

    /// Opens `path` (an [`entry`](Self::entry) of another pinned directory), named
    /// `shown` in messages rather than by its `/proc/self/fd` path.
    pub fn open_shown(path: &Path, shown: PathBuf) -> Result<Self, UpgradeError> {
        let dir = fsutil::open_nofollow(path, true).map_err(|e| UpgradeError::Staged(e.to_string()))?;
        Ok(Self { dir, shown })
    }

    /// A path to `name` inside the pinned directory (one component, no symlink follow
    /// at the directory itself).
    pub fn entry(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_raw_fd()))
    }

    pub fn shown(&self, name: &str) -> PathBuf {
        self.shown.join(name)
    }

    /// Reads a regular file (no symlink) of at most `max` bytes.
    pub fn read(&self, name: &str, max: u64) -> Result<Vec<u8>, UpgradeError> {
        let shown = self.shown(name);
        let bad = |problem: String| UpgradeError::Staged(format!("{}: {problem}", shown.display()));
        let file = fsutil::open_nofollow(&self.entry(name), false).map_err(|e| bad(e.to_string()))?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.len() > max {
            return Err(bad(format!("{} bytes, more than the {max} allowed", meta.len())));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(max + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 > max {
            return Err(bad(format!("grew past the {max} bytes allowed while being read")));
        }
        Ok(bytes)
    }

    /// The pinned directory as a [`Dir`], for every change made in it (by descriptor:
    /// the daemon owns this directory and may swap anything in it for a link).
    pub fn dir(&self) -> Result<Dir, UpgradeError> {
        Dir::open_given(&self.entry(".")).map_err(self.walk_err("."))
    }

    /// A [`WalkError`] about `name` as an error naming it by its shown path.
    pub fn walk_err(&self, name: &str) -> impl FnOnce(WalkError) -> UpgradeError {
        let path = self.shown(name);
        move |e| match e {
            WalkError::Io { source, .. } => UpgradeError::Io { path, source },
            e => UpgradeError::Staged(format!("{}: {e}", path.display())),
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(dir) = self.dir() {
            let _ = dir.unlink(OsStr::new(name));
        }
    }
}

/// Copies the staged order, archive and signature into `work` (root's, 0700).
pub fn take(staged: &PinnedDir, work: &Path) -> Result<Staged, UpgradeError> {
    let order_bytes = staged.read(hand::ORDER, MAX_ORDER_BYTES)?;
    let order = StagedOrder::parse(&order_bytes, super::now_unix())
        .map_err(|e| UpgradeError::Staged(format!("{}: {e}", staged.shown(hand::ORDER).display())))?;
    let copy = |name: &str, max: u64| -> Result<PathBuf, UpgradeError> {
        let bytes = staged.read(name, max)?;
        let to = work.join(name);
        // Root's scratch directory under the installer's releases tree (root-owned, 0700).
        #[allow(clippy::disallowed_methods)]
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&to)
            .map_err(|e| UpgradeError::Io { path: to.clone(), source: e })?;
        f.write_all(&bytes).map_err(|e| UpgradeError::Io { path: to.clone(), source: e })?;
        Ok(to)
    };
    let archive = copy(hand::ARCHIVE, MAX_ARCHIVE_BYTES)?;
    let signature = copy(hand::SIGNATURE, MAX_SIGNATURE_BYTES)?;
    Ok(Staged { order, archive, signature })
}

/// The archive is signed by `update_key`, and the signature's trusted comment names
/// exactly `version` (a valid signature of another release must not pass as this one).
pub fn verify_signature(update_key: &str, archive: &Path, signature: &Path, version: &str) -> Result<(), UpgradeError> {
    let key = PublicKey::from_base64(update_key.trim())
        .map_err(|e| UpgradeError::Rejected(format!("the configured update_key is not a minisign public key: {e}")))?;
    let text =
        fs::read_to_string(signature).map_err(|e| UpgradeError::Io { path: signature.to_path_buf(), source: e })?;
    let sig = Signature::decode(&text)
        .map_err(|e| UpgradeError::Rejected(format!("the signature file is not a minisign signature: {e}")))?;
    let bytes = fs::read(archive).map_err(|e| UpgradeError::Io { path: archive.to_path_buf(), source: e })?;
    key.verify(&bytes, &sig, false).map_err(|e| {
        UpgradeError::Rejected(format!("the archive's signature does not verify with the configured update_key: {e}"))
    })?;
    let want = hand::trusted_comment(version);
    if sig.trusted_comment() != want {
        return Err(UpgradeError::Rejected(format!(
            "the signature's trusted comment is {:?}, not {want:?}: it signs another release",
            sig.trusted_comment()
        )));
    }
    Ok(())
}

/// Unpacks a verified archive into `work/tree` and returns the release directory inside
/// (`opsagent-VERSION`), whose MANIFEST is then checked.
pub fn unpack_and_check(archive: &Path, work: &Path, version: &str) -> Result<PathBuf, UpgradeError> {
    let tree = work.join("tree");
    // Root's scratch directory under the installer's releases tree (root-owned, 0700).
    #[allow(clippy::disallowed_methods)]
    fs::create_dir(&tree).map_err(|e| UpgradeError::Io { path: tree.clone(), source: e })?;
    let limits =
        Limits { max_entries: 10_000, max_entry_bytes: MAX_ARCHIVE_BYTES, max_total_bytes: 4 * MAX_ARCHIVE_BYTES };
    unpack::unpack(archive, ArchiveFormat::TarGz, &tree, &limits, None)
        .map_err(|e| UpgradeError::Rejected(format!("unsafe or broken archive: {e}")))?;
    let top = format!("opsagent-{version}");
    let names: Vec<String> = fs::read_dir(&tree)
        .map_err(|e| UpgradeError::Io { path: tree.clone(), source: e })?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if names != [top.clone()] {
        return Err(UpgradeError::Rejected(format!(
            "the archive must hold exactly one directory {top}/, it holds {names:?}"
        )));
    }
    let release = tree.join(&top);
    check_manifest(&release, version)?;
    Ok(release)
}

/// Line 1 `version VERSION`, then `SHA256  PATH` lines (sha256sum format); the tree must
/// hold exactly the listed regular files (plus MANIFEST) and directories, nothing else.
pub fn check_manifest(release: &Path, version: &str) -> Result<(), UpgradeError> {
    let reject = |problem: String| UpgradeError::Rejected(format!("MANIFEST: {problem}"));
    let path = release.join("MANIFEST");
    let meta = fs::symlink_metadata(&path).map_err(|_| reject("missing".into()))?;
    if !meta.is_file() || meta.len() > MAX_MANIFEST_BYTES {
        return Err(reject("not a regular file of reasonable size".into()));
    }
    let text = fs::read_to_string(&path).map_err(|e| reject(e.to_string()))?;
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    if first != format!("version {version}") {
        return Err(reject(format!("line 1 is {first:?}, not \"version {version}\"")));
    }
    let mut listed = BTreeSet::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let (hash, name) = line
            .split_once("  ")
            .filter(|(h, _)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| reject(format!("line {n} is not \"SHA256  PATH\"")))?;
        let rel = Path::new(name);
        if name == "MANIFEST" || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(reject(format!("line {n}: {name:?} is not a plain relative path")));
        }
        if !listed.insert(name.to_string()) {
            return Err(reject(format!("line {n}: {name} is listed twice")));
        }
        let file = release.join(rel);
        let meta = fs::symlink_metadata(&file).map_err(|_| reject(format!("{name} is listed but missing")))?;
        if !meta.is_file() {
            return Err(reject(format!("{name} is not a regular file")));
        }
        let bytes = fs::read(&file).map_err(|e| UpgradeError::Io { path: file.clone(), source: e })?;
        if hex::encode(Sha256::digest(&bytes)) != hash.to_ascii_lowercase() {
            return Err(reject(format!("{name} does not match its sha256")));
        }
    }
    let mut present = BTreeSet::new();
    walk(release, release, &mut present)?;
    present.remove("MANIFEST");
    if let Some(extra) = present.difference(&listed).next() {
        return Err(reject(format!("{extra} is in the archive but not listed")));
    }
    for program in REQUIRED_PROGRAMS {
        let mode = fs::metadata(release.join(program)).map(|m| m.permissions().mode()).unwrap_or(0);
        if !listed.contains(*program) || mode & 0o111 == 0 {
            return Err(reject(format!("{program} is missing or not executable")));
        }
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeSet<String>) -> Result<(), UpgradeError> {
    let entries = fs::read_dir(dir).map_err(|e| UpgradeError::Io { path: dir.to_path_buf(), source: e })?;
    for entry in entries {
        let entry = entry.map_err(|e| UpgradeError::Io { path: dir.to_path_buf(), source: e })?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| UpgradeError::Io { path: path.clone(), source: e })?;
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        if ft.is_dir() {
            walk(root, &path, files)?;
        } else if ft.is_file() {
            files.insert(rel);
        } else {
            return Err(UpgradeError::Rejected(format!("MANIFEST: {rel} is a {}, not a file", fsutil::kind_of(ft))));
        }
    }
    Ok(())
}
