//! Whether a checkout's tracked files are as its commit has them, told from git's index
//! and the files' `lstat`, without running `git status`.
//!
//! `git status --untracked-files=no` answers two questions. Does the index differ from
//! HEAD's tree? When the tree its entries make (their object ids and modes, hashed as
//! git writes trees) is the tree of HEAD's commit (read from the object database: a
//! loose object, or a pack entry that is not a delta), the answer is no. The index's
//! cache-tree extension (`TREE`) records those trees too, and git's status takes a
//! valid node whose tree is HEAD's for its entries unread: so each valid node must name
//! the tree and count the entries the entries make (an index written by another tool,
//! or damaged, can say otherwise). Do the files differ from the index? git trusts an
//! entry whose recorded `lstat` data (times to the nanosecond, inode, owner, size, type
//! and executable bit) match the file's and that is older than the index itself (not
//! "racily clean"); so does this module, comparing more fields than git does, never
//! fewer.
//!
//! Anything else means "ask git" (`None`): an index version other than 2 or 3, an entry
//! marked assume-unchanged, skip-worktree or intent-to-add, a conflict stage, a
//! submodule, a split or sparse index, entries out of order, a cache-tree other than
//! the entries make, an object in a form not read here, a file whose data differ in any
//! field, a racy entry, a directory on the way that is a link or that someone other
//! than root controls. git then decides (and, as `git status` does, refreshes the
//! index, so the next round can trust it).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use rustix::fs::{AtFlags, FileType};

use super::files::{read_file, walk, Known};
use crate::dirfd::Dir;

/// An index larger than this is left to git.
const MAX_INDEX: u64 = 64 << 20;
const OID: usize = 20;
/// The id of the empty blob (e69de29b…).
const EMPTY_BLOB: [u8; OID] = [
    0xe6, 0x9d, 0xe2, 0x9b, 0xb2, 0xd1, 0xd6, 0x43, 0x4b, 0x8b, 0x29, 0xae, 0x77, 0x5a, 0xd8, 0xc2, 0xe4, 0x8c, 0x53,
    0x91,
];

/// One index entry's `lstat` data as git recorded it (each field as git stores it: 32
/// bits, times split in seconds and nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    path: Vec<u8>,
    oid: [u8; OID],
    ctime: (u32, u32),
    mtime: (u32, u32),
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u32,
}

fn be32(b: &[u8], at: usize) -> Known<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The parsed index: its entries, in git's order (by path, each once: what the trees
/// are made from), and its cache-tree extension's data if it has one.
struct Index<'a> {
    entries: Vec<Entry>,
    cache_tree: Option<&'a [u8]>,
}

/// Parses index versions 2 and 3; `None` for anything this module does not trust.
fn parse(b: &[u8]) -> Known<Index<'_>> {
    if b.get(..4)? != b"DIRC" || b.len() < 12 + OID {
        return None;
    }
    let version = be32(b, 4)?;
    if version != 2 && version != 3 {
        return None;
    }
    let count = usize::try_from(be32(b, 8)?).ok()?;
    let end = b.len() - OID; // the trailing checksum
    let mut at = 12;
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let start = at;
        let f = |i: usize| be32(b, start + 4 * i);
        let flags = u16::from_be_bytes(b.get(start + 60..start + 62)?.try_into().ok()?);
        // assume-valid, or a stage other than 0 (a conflict).
        if flags & 0x8000 != 0 || (flags >> 12) & 3 != 0 {
            return None;
        }
        at = start + 62;
        if flags & 0x4000 != 0 {
            // Extended flags (version 3): skip-worktree and intent-to-add, or unknown.
            if version < 3 || u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?) != 0 {
                return None;
            }
            at += 2;
        }
        let nul = at + b.get(at..end)?.iter().position(|&c| c == 0)?;
        let path = b[at..nul].to_vec();
        // NUL-padded to a multiple of 8 bytes, at least one NUL.
        at = start + (nul - start + 8) / 8 * 8;
        // git reads the path's length from the flags (0xfff: longer), and the next
        // entry from there: another length is another index for git. A longer path is
        // none a file could have (and would nest the trees too deep).
        let recorded = usize::from(flags & 0xfff);
        if recorded != path.len().min(0xfff) || path.is_empty() || path.len() > 4096 || at > end {
            return None;
        }
        if entries.last().is_some_and(|last: &Entry| last.path >= path) {
            return None;
        }
        let mode = f(6)?;
        if !matches!(mode, 0o100644 | 0o100755 | 0o120000) {
            return None; // a submodule (0o160000), or a mode git would not write
        }
        entries.push(Entry {
            path,
            oid: b[start + 40..start + 40 + OID].try_into().ok()?,
            ctime: (f(0)?, f(1)?),
            mtime: (f(2)?, f(3)?),
            ino: f(5)?,
            mode,
            uid: f(7)?,
            gid: f(8)?,
            size: f(9)?,
        });
    }
    let mut cache_tree = None;
    while at < end {
        let sig = b.get(at..at + 4)?;
        let len = usize::try_from(be32(b, at + 4)?).ok()?;
        let next = (at + 8).checked_add(len).filter(|&next| next <= end)?;
        // Optional extensions (an upper-case first letter) do not change what the
        // entries say, but for the cache-tree, which git's status uses (checked against
        // the entries); a required one (split index `link`, sparse `sdir`) does.
        match sig {
            b"TREE" => cache_tree = Some(&b[at + 8..next]),
            [b'A'..=b'Z', ..] => {}
            _ => return None,
        }
        at = next;
    }
    Some(Index { entries, cache_tree })
}

/// Each directory's trees as [`tree_of`] makes them: by path prefix ("" for the root,
/// "a/b/" below), its number of entries and its tree.
type Made = BTreeMap<Vec<u8>, (usize, [u8; OID])>;

/// Whether a cache-tree (`TREE` data) says what the entries make (`made`). git's
/// status takes a valid node's entries as unchanged when its tree is HEAD's, without
/// looking at them: every valid node must have the count and tree the entries make.
/// Nodes in pre-order: name NUL, "<entries> <subtrees>" LF, the tree unless invalid
/// (entries -1).
fn cache_tree_agrees(mut data: &[u8], made: &Made) -> Known<()> {
    let mut open: Vec<(Vec<u8>, usize)> = Vec::new(); // prefix, subtrees still to come
    let mut first = true;
    while !data.is_empty() {
        let nul = data.iter().position(|&c| c == 0)?;
        let lf = nul + data[nul..].iter().position(|&c| c == b'\n')?;
        let (count, subtrees) = std::str::from_utf8(&data[nul + 1..lf]).ok()?.split_once(' ')?;
        let (count, subtrees) = (count.parse::<i64>().ok()?, subtrees.parse::<usize>().ok()?);
        let prefix = match open.last_mut() {
            None if first && nul == 0 => Vec::new(),
            None => return None, // a second root
            Some((parent, left)) => {
                *left = left.checked_sub(1)?;
                [parent.as_slice(), &data[..nul], b"/"].concat()
            }
        };
        first = false;
        data = &data[lf + 1..];
        if count != -1 {
            let oid: [u8; OID] = data.get(..OID)?.try_into().ok()?;
            data = &data[OID..];
            if made.get(&prefix) != Some(&(usize::try_from(count).ok()?, oid)) {
                return None;
            }
        }
        open.push((prefix, subtrees));
        while open.last().is_some_and(|(_, left)| *left == 0) {
            open.pop();
        }
    }
    open.is_empty().then_some(())
}

/// The id of the tree `entries` make, all in one directory and named from byte `from`
/// of their paths on: per name (in index order, which is a tree's), "<octal mode>
/// <name>" NUL and the object id, a sub-directory's entries making its tree.
/// Each tree made is kept in `made`.
fn tree_of(entries: &[Entry], from: usize, made: &mut Made) -> [u8; OID] {
    use sha1::{Digest, Sha1};
    let mut body = Vec::new();
    let mut i = 0;
    while let Some(e) = entries.get(i) {
        let rest = &e.path[from..];
        let (mode, name, oid) = match rest.iter().position(|&c| c == b'/') {
            None => {
                i += 1;
                (e.mode, rest, e.oid)
            }
            Some(n) => {
                let dir = &rest[..=n];
                let all = entries[i..].iter().take_while(|d| d.path[from..].starts_with(dir)).count();
                let sub = tree_of(&entries[i..i + all], from + n + 1, made);
                i += all;
                (0o40000, &rest[..n], sub)
            }
        };
        body.extend_from_slice(format!("{mode:o} ").as_bytes());
        body.extend_from_slice(name);
        body.push(0);
        body.extend_from_slice(&oid);
    }
    let mut sha = Sha1::new();
    sha.update(format!("tree {}\0", body.len()));
    sha.update(&body);
    let tree = sha.finalize().into();
    let prefix = entries.first().map_or(&[][..], |e| &e.path[..from]);
    made.insert(prefix.to_vec(), (entries.len(), tree));
    tree
}

fn hex_oid(hex: &str) -> Known<[u8; OID]> {
    if hex.len() != 2 * OID || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut oid = [0; OID];
    for (i, o) in oid.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(oid)
}

/// The tree named by a commit object's first line (`tree <hex>`), from the object's
/// inflated start.
fn tree_line(body: &[u8]) -> Known<[u8; OID]> {
    let hex = body.strip_prefix(b"tree ")?.get(..2 * OID)?;
    hex_oid(std::str::from_utf8(hex).ok()?)
}

/// The first bytes of a zlib stream (enough for a commit's `tree` line).
fn inflate_start(compressed: impl Read, want: usize) -> Known<Vec<u8>> {
    let mut out = Vec::with_capacity(want);
    flate2::read::ZlibDecoder::new(compressed).take(want as u64).read_to_end(&mut out).ok()?;
    Some(out)
}

/// The tree of the commit `commit`, read from the object database under `objects`.
fn commit_tree(objects: &Dir, commit: &[u8; OID]) -> Known<[u8; OID]> {
    let hex: String = commit.iter().map(|b| format!("{b:02x}")).collect();
    // Loose: objects/xx/<38 hex>, "commit <size>" NUL, then the commit.
    if let Some(dir) = walk(objects, &[&hex[..2]])? {
        if let Some(file) = dir.open_file(OsStr::new(&hex[2..])).ok()? {
            let body = inflate_start(file, 128)?;
            let nul = body.iter().position(|&c| c == 0)?;
            body[..nul].starts_with(b"commit ").then_some(())?;
            return tree_line(&body[nul + 1..]);
        }
    }
    let pack = walk(objects, &["pack"])??;
    for (name, kind) in pack.entries().ok()? {
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".idx")) else { continue };
        if kind != FileType::RegularFile {
            continue;
        }
        let idx = pack.open_file(&name).ok()??;
        if let Some(offset) = pack_offset(&idx, commit)? {
            let data = pack.open_file(OsStr::new(&format!("{stem}.pack"))).ok()??;
            return packed_commit_tree(&data, offset);
        }
    }
    None
}

/// Where `oid` is in the pack a version 2 `.idx` describes: `Some(None)` if not there.
fn pack_offset(idx: &File, oid: &[u8; OID]) -> Known<Option<u64>> {
    let mut head = [0u8; 8 + 256 * 4];
    idx.read_exact_at(&mut head, 0).ok()?;
    if head[..8] != [0xff, b't', b'O', b'c', 0, 0, 0, 2] {
        return None;
    }
    let fan = |i: usize| be32(&head, 8 + 4 * i).and_then(|n| usize::try_from(n).ok());
    let first = usize::from(oid[0]);
    let lo = if first == 0 { 0 } else { fan(first - 1)? };
    let (hi, n) = (fan(first)?, fan(255)?);
    // A damaged fan-out must not size the read below: the object ids, checksums and
    // offsets of `n` objects must fit in the file.
    if lo > hi || hi > n || u64::try_from(head.len() + n * (OID + 8)).ok()? > idx.metadata().ok()?.len() {
        return None;
    }
    let mut ids = vec![0u8; (hi - lo) * OID];
    let ids_at = head.len() + lo * OID;
    idx.read_exact_at(&mut ids, u64::try_from(ids_at).ok()?).ok()?;
    let Some(i) = ids.chunks_exact(OID).position(|id| id == oid) else { return Some(None) };
    let at = head.len() + n * (OID + 4) + (lo + i) * 4;
    let mut word = [0u8; 4];
    idx.read_exact_at(&mut word, u64::try_from(at).ok()?).ok()?;
    let small = u32::from_be_bytes(word);
    if small & 0x8000_0000 == 0 {
        return Some(Some(u64::from(small)));
    }
    let mut big = [0u8; 8];
    let big_at = head.len() + n * (OID + 8) + 8 * usize::try_from(small & 0x7fff_ffff).ok()?;
    idx.read_exact_at(&mut big, u64::try_from(big_at).ok()?).ok()?;
    Some(Some(u64::from_be_bytes(big)))
}

/// The tree of the commit stored whole (not as a delta) at `offset` in a pack.
fn packed_commit_tree(pack: &File, offset: u64) -> Known<[u8; OID]> {
    let mut buf = [0u8; 512];
    let got = pack.read_at(&mut buf, offset).ok()?;
    let buf = &buf[..got];
    // Type in bits 4-6 of the first byte (1: commit); the size's varint follows.
    if (buf.first()? >> 4) & 7 != 1 {
        return None;
    }
    let header = 1 + buf.iter().take_while(|&&c| c & 0x80 != 0).count();
    tree_line(&inflate_start(buf.get(header..)?, 2 * OID + 6)?)
}

/// The `lstat` of `path` (an index path) under `checkout`, walking by descriptor with
/// directories opened as in [`super::files`]: never through a link, each root-controlled.
/// `dirs` keeps the directories of the previous entry (entries come sorted by path).
fn lstat(checkout: &Dir, dirs: &mut Vec<(Vec<u8>, Dir)>, path: &[u8]) -> Known<rustix::fs::Stat> {
    use std::os::unix::ffi::OsStrExt;
    let mut parts: Vec<&[u8]> = path.split(|&c| c == b'/').collect();
    let name = parts.pop()?;
    if parts.iter().chain([&name]).any(|p| p.is_empty() || *p == b"." || *p == b"..") {
        return None;
    }
    let keep = dirs.iter().zip(&parts).take_while(|((held, _), want)| held.as_slice() == **want).count();
    dirs.truncate(keep);
    for part in &parts[keep..] {
        let parent = dirs.last().map_or(checkout, |(_, d)| d);
        let dir = parent.subdir(OsStr::from_bytes(part)).ok()??;
        dir.root_controlled().ok()?;
        dirs.push((part.to_vec(), dir));
    }
    let parent = dirs.last().map_or(checkout, |(_, d)| d);
    rustix::fs::statat(parent, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).ok()
}

/// Whether the file's `lstat` is what the index recorded, as git compares them (and the
/// device, which git leaves out, left out too).
fn same(e: &Entry, st: &rustix::fs::Stat) -> bool {
    // git keeps the low 32 bits of each field.
    let low = |v: i64| v as u32;
    let kind_ok = match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => e.mode == 0o120000,
        FileType::RegularFile => (e.mode == 0o100755) == (st.st_mode & 0o100 != 0) && e.mode != 0o120000,
        _ => false,
    };
    kind_ok
        && (low(st.st_mtime), st.st_mtime_nsec as u32) == e.mtime
        && (low(st.st_ctime), st.st_ctime_nsec as u32) == e.ctime
        && st.st_ino as u32 == e.ino
        && st.st_uid == e.uid
        && st.st_gid == e.gid
        && st.st_size as u32 == e.size
        // Size 0 for a blob that is not empty: "racily smudged" (git found the file
        // changed when it wrote the index, and keeps the rest of the data), changed.
        && (e.size != 0 || e.oid == EMPTY_BLOB)
}

/// Nothing that has git status read other objects than the ones named (a replace ref,
/// loose or packed) or other files than the checkout's (`core.worktree`; `core.bare`,
/// with which it fails): any mention of one is left to git.
fn plain_setup(git_dir: &Dir) -> Known<()> {
    if git_dir.subdir(OsStr::new("refs")).ok()??.stat(OsStr::new("replace")).ok()?.is_some() {
        return None;
    }
    if read_file(git_dir, OsStr::new("packed-refs"))?.is_some_and(|t| t.contains("refs/replace/")) {
        return None;
    }
    let config = read_file(git_dir, OsStr::new("config"))?.unwrap_or_default().to_ascii_lowercase();
    for line in config.lines().map(|l| l.replace([' ', '\t'], "")) {
        if line.starts_with("worktree") || (line.starts_with("bare") && line != "bare=false") {
            return None;
        }
    }
    Some(())
}

/// `Some(true)`: the checkout's tracked files and index are exactly HEAD's (`commit`),
/// what `git status --porcelain --untracked-files=no` would print nothing for; `None`:
/// ask git. `checkout` and `git_dir` are already known to be root-controlled.
pub fn unchanged(checkout: &Dir, git_dir: &Dir, commit: &str) -> Known<bool> {
    let mut file = git_dir.open_file(OsStr::new("index")).ok()??;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_INDEX {
        return None;
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).ok()?);
    file.read_to_end(&mut bytes).ok()?;
    let index = parse(&bytes)?;
    plain_setup(git_dir)?;
    let objects = walk(git_dir, &["objects"])??;
    let mut made = Made::new();
    if commit_tree(&objects, &hex_oid(commit)?)? != tree_of(&index.entries, 0, &mut made) {
        return None;
    }
    if let Some(data) = index.cache_tree {
        cache_tree_agrees(data, &made)?;
    }
    use std::os::unix::fs::MetadataExt;
    let written = meta.mtime();
    let mut dirs = Vec::new();
    for e in &index.entries {
        // Racily clean: changed in the same instant the index was written, which its
        // recorded data cannot show. git looks at the content; this module asks git.
        // The instant is the second: git built without `USE_NSEC` (Debian's) compares
        // seconds only, so an entry a fraction older than its index is racy there too.
        if i64::from(e.mtime.0) >= written {
            return None;
        }
        if !same(e, &lstat(checkout, &mut dirs, &e.path)?) {
            return None;
        }
    }
    Some(true)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built with git, by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git is installed (.ci/run installs it)");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// What this module says, next to what `git status` says; it may only say "clean"
    /// when git does. `git status` runs after (it may refresh the index).
    fn check(dir: &Path) -> (Known<bool>, bool) {
        let checkout = Dir::open(dir).unwrap();
        let git_dir = checkout.subdir(OsStr::new(".git")).unwrap().unwrap();
        let head = git(dir, &["rev-parse", "HEAD"]);
        let ours = unchanged(&checkout, &git_dir, head.trim());
        let clean = git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        if ours == Some(true) {
            assert!(clean, "said clean where git status does not");
        }
        (ours, clean)
    }

    /// A checkout settled the way a converged round finds it: the index written after
    /// its files (a second later: not racy whatever the clock's resolution).
    fn settled(dir: &Path) {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        git(dir, &["update-index", "--refresh", "--really-refresh"]);
        // `git status` writes a refreshed index with the cache-tree git keeps.
        git(dir, &["status", "--porcelain"]);
    }

    /// Root's check walks root-controlled directories only.
    fn as_root(test: &str) -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("{test}: SKIPPED, needs root");
        }
        root
    }

    #[test]
    fn a_settled_checkout_is_clean_and_every_change_is_left_to_git() {
        let Some(tmp) = repo_scene("a_settled_checkout_is_clean_and_every_change_is_left_to_git") else { return };
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("README"), "one\n").unwrap();
        std::fs::write(d.join("a/b/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(d.join("a/b/run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("README", d.join("a/link")).unwrap();
        git(d, &["add", "-A"]);
        git(d, &["commit", "--quiet", "-m", "one"]);
        git(d, &["read-tree", "HEAD"]); // a full cache-tree, as a checkout has
        settled(d);
        assert_eq!(check(d), (Some(true), true), "a settled checkout (loose objects)");

        // Packed: the commit read from the pack.
        git(d, &["gc", "--quiet"]);
        assert!(std::fs::read_dir(d.join(".git/objects/pack")).unwrap().count() >= 2);
        assert_eq!(check(d), (Some(true), true), "a settled checkout (packed objects)");

        // A file rewritten with the same content: stat data differ, git decides (and
        // refreshes the index, after which it is trusted again).
        std::fs::write(d.join("README"), "one\n").unwrap();
        assert_eq!(check(d).0, None);
        settled(d);
        assert_eq!(check(d).0, Some(true));

        // A changed file, a mode change, a deleted file: git decides, and says dirty.
        std::fs::write(d.join("a/b/run.sh"), "#!/bin/sh\nexit 1\n").unwrap();
        assert_eq!(check(d), (None, false));
        git(d, &["checkout", "--", "a/b/run.sh"]);
        std::fs::set_permissions(d.join("a/b/run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert_eq!(check(d), (None, false));
        git(d, &["checkout", "--", "a/b/run.sh"]);
        std::fs::remove_file(d.join("a/link")).unwrap();
        assert_eq!(check(d), (None, false));
        git(d, &["checkout", "--", "a/link"]);
        settled(d);
        assert_eq!(check(d), (Some(true), true));

        // The index no longer HEAD's tree: a staged change (cache-tree invalidated), a
        // HEAD moved under an unchanged index.
        std::fs::write(d.join("README"), "two\n").unwrap();
        git(d, &["add", "README"]);
        settled(d);
        assert_eq!(check(d), (None, false));
        git(d, &["commit", "--quiet", "-m", "two"]);
        settled(d);
        assert_eq!(check(d).0, Some(true));
        git(d, &["reset", "--quiet", "--soft", "HEAD~1"]);
        settled(d);
        assert_eq!(check(d), (None, false));
        git(d, &["reset", "--quiet", "--hard", "HEAD@{1}"]);
        settled(d);
        assert_eq!(check(d).0, Some(true));

        // Flags git's status would weigh differently: left to git.
        git(d, &["update-index", "--assume-unchanged", "README"]);
        assert_eq!(check(d).0, None);
        git(d, &["update-index", "--no-assume-unchanged", "README"]);
        // `update-index` drops the cache-tree, which is not needed.
        settled(d);
        assert_eq!(check(d), (Some(true), true));
        git(d, &["reset", "--quiet", "--hard"]);
        settled(d);
        assert_eq!(check(d).0, Some(true));

        // Racily clean: an entry no older than the index that recorded it (here the
        // index's time set back an hour; every recorded field still matches): the data
        // cannot show a change made in that instant, so git decides.
        let index = std::fs::File::options().write(true).open(d.join(".git/index")).unwrap();
        index.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(check(d), (None, true));
    }

    #[test]
    fn malformed_indexes_are_left_to_git() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        git(d, &["init", "--quiet"]);
        std::fs::write(d.join("f"), "x\n").unwrap();
        git(d, &["add", "f"]);
        git(d, &["commit", "--quiet", "-m", "x"]);
        git(d, &["read-tree", "HEAD"]);
        let good = std::fs::read(d.join(".git/index")).unwrap();
        assert!(parse(&good).is_some());
        // Every truncation, and every single-byte change of the header and first entry,
        // is refused or parsed without a panic.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        for at in 0..good.len().min(120) {
            let mut bad = good.clone();
            bad[at] ^= 0xff;
            let _ = parse(&bad);
        }
        let mut v4 = good.clone();
        v4[7] = 4;
        assert!(parse(&v4).is_none(), "version 4 is left to git");
    }

    /// A settled checkout of two commits (`a` changed by the second), for the cases below.
    fn two_commits(d: &Path) {
        std::fs::write(d.join("a"), "one\n").unwrap();
        std::fs::write(d.join("b"), "two\n").unwrap();
        git(d, &["add", "-A"]);
        git(d, &["commit", "--quiet", "-m", "one"]);
        std::fs::write(d.join("a"), "three\n").unwrap();
        git(d, &["commit", "--quiet", "-am", "two"]);
        git(d, &["read-tree", "HEAD"]);
        settled(d);
    }

    /// A settled checkout of two commits in a temporary directory; `None` (noted) when
    /// not run as root.
    fn two_commit_scene(test: &str) -> Option<tempfile::TempDir> {
        let tmp = repo_scene(test)?;
        two_commits(tmp.path());
        Some(tmp)
    }

    /// An empty repository in a temporary directory; `None` (noted) when not run as root.
    fn repo_scene(test: &str) -> Option<tempfile::TempDir> {
        if !as_root(test) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        git(tmp.path(), &["init", "--quiet"]);
        Some(tmp)
    }

    /// The first entry of `index` given the times and inode of `st` and `size`, as if
    /// git had recorded that file.
    fn record_first(index: &mut [u8], st: &rustix::fs::Stat, size: u32) {
        let fields = [
            (0, st.st_ctime as u32),
            (1, st.st_ctime_nsec as u32),
            (2, st.st_mtime as u32),
            (3, st.st_mtime_nsec as u32),
            (5, st.st_ino as u32),
            (9, size),
        ];
        for (field, value) in fields {
            index[12 + 4 * field..12 + 4 * field + 4].copy_from_slice(&value.to_be_bytes());
        }
    }

    /// The index replaced by `index` (as a tool would write it), older than its files.
    fn rewrite_index(d: &Path, index: &[u8]) {
        std::fs::write(d.join(".git/index"), index).unwrap();
        settled_index_time(d);
    }

    /// Root reads the files' data only through directories root alone controls, never
    /// through a link: a directory of the checkout another user owns (who could swap
    /// what is in it between the look and git's own), or one swapped for a link to a
    /// copy whose files keep every recorded field (a rename changes no file's ctime),
    /// leaves the decision to git, which here sees the tracked files gone.
    #[test]
    fn files_are_looked_at_only_through_root_controlled_directories_never_a_link() {
        let Some(tmp) = repo_scene("files_are_looked_at_only_through_root_controlled_directories_never_a_link") else {
            return;
        };
        let d = tmp.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/f"), "x\n").unwrap();
        git(d, &["add", "-A"]);
        git(d, &["commit", "--quiet", "-m", "one"]);
        git(d, &["read-tree", "HEAD"]);
        settled(d);
        assert_eq!(check(d), (Some(true), true));

        std::os::unix::fs::chown(d.join("sub"), Some(65534), None).unwrap();
        assert_eq!(check(d), (None, true), "read through a directory uid 65534 owns");
        std::os::unix::fs::chown(d.join("sub"), Some(0), None).unwrap();
        assert_eq!(check(d), (Some(true), true));

        std::fs::rename(d.join("sub"), d.join("sub.real")).unwrap();
        std::os::unix::fs::symlink("sub.real", d.join("sub")).unwrap();
        let checkout = Dir::open(d).unwrap();
        let git_dir = checkout.subdir(OsStr::new(".git")).unwrap().unwrap();
        let head = git(d, &["rev-parse", "HEAD"]);
        assert_eq!(unchanged(&checkout, &git_dir, head.trim()), None, "read through a link");
        let status = git(d, &["status", "--porcelain", "--untracked-files=no"]);
        assert!(!status.is_empty(), "git takes sub/f as gone: {status:?}");
    }

    /// `git replace` makes git read another object for HEAD's commit, and so another
    /// tree: git status compares the index with that one.
    #[test]
    fn replaced_objects_are_left_to_git() {
        let Some(tmp) = two_commit_scene("replaced_objects_are_left_to_git") else { return };
        let d = tmp.path();
        assert_eq!(check(d), (Some(true), true));
        git(d, &["replace", "HEAD", "HEAD~1"]);
        assert_eq!(check(d), (None, false), "loose replace ref");
        git(d, &["pack-refs", "--all"]);
        assert!(!d.join(".git/refs/replace").join(git(d, &["rev-parse", "HEAD"]).trim()).exists());
        assert_eq!(check(d), (None, false), "packed replace ref");
    }

    /// `core.worktree` sends git status to other files; `core.bare` makes it fail.
    #[test]
    fn a_configured_work_tree_or_bare_repository_is_left_to_git() {
        if !as_root("a_configured_work_tree_or_bare_repository_is_left_to_git") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = &tmp.path().join("co");
        std::fs::create_dir(d).unwrap();
        git(d, &["init", "--quiet"]);
        two_commits(d);
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("a"), "changed\n").unwrap();
        git(d, &["config", "core.worktree", other.to_str().unwrap()]);
        assert_eq!(check(d), (None, false), "another work tree");
        git(d, &["config", "--unset", "core.worktree"]);
        git(d, &["config", "core.bare", "true"]);
        let checkout = Dir::open(d).unwrap();
        let git_dir = checkout.subdir(OsStr::new(".git")).unwrap().unwrap();
        let head = git(d, &["rev-parse", "HEAD"]);
        assert_eq!(unchanged(&checkout, &git_dir, head.trim()), None, "git status fails in a bare repository");
    }

    /// git status compares the entries' object ids with HEAD's tree; a cache-tree that
    /// disagrees with them (an index written by another tool, or damaged) must not
    /// stand in for that comparison. git does not check the index's checksum.
    #[test]
    fn entries_that_differ_from_their_cache_tree_are_seen() {
        let Some(tmp) = two_commit_scene("entries_that_differ_from_their_cache_tree_are_seen") else { return };
        let d = tmp.path();
        assert_eq!(check(d), (Some(true), true));
        let mut index = std::fs::read(d.join(".git/index")).unwrap();
        index[12 + 40] ^= 1; // the first entry's object id
        rewrite_index(d, &index);
        assert_eq!(check(d), (None, false));
    }

    /// A racily clean entry whose file changed is written "smudged" by git: size 0, the
    /// rest of its data kept. Here the file then is empty, with the data recorded (as a
    /// change within one timestamp tick leaves them): every field matches, but git
    /// takes a size of 0 for a blob that is not empty as changed.
    #[test]
    fn a_smudged_entry_is_changed_even_when_its_file_matches() {
        let Some(tmp) = two_commit_scene("a_smudged_entry_is_changed_even_when_its_file_matches") else { return };
        let d = tmp.path();
        std::fs::write(d.join("a"), "").unwrap();
        let st = rustix::fs::lstat(d.join("a")).unwrap();
        let mut index = std::fs::read(d.join(".git/index")).unwrap();
        assert_eq!(&index[12 + 62..12 + 64], b"a\0", "the first entry is a");
        record_first(&mut index, &st, 0);
        rewrite_index(d, &index);
        assert_eq!(check(d), (None, false));
    }

    /// An entry whose time is in the index's second, before it by a fraction: git
    /// built without `USE_NSEC` (as Debian's is) takes it as racily clean and looks at
    /// the content. Here the file's content changed with every recorded field kept.
    #[test]
    fn an_entry_in_the_index_second_is_racy() {
        let Some(tmp) = repo_scene("an_entry_in_the_index_second_is_racy") else { return };
        let d = tmp.path();
        std::fs::write(d.join("a"), "one\n").unwrap();
        git(d, &["add", "a"]);
        git(d, &["commit", "--quiet", "-m", "one"]);
        git(d, &["read-tree", "HEAD"]);
        let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 10;
        let at = |nanos| std::time::UNIX_EPOCH + std::time::Duration::new(second, nanos);
        std::fs::write(d.join("a"), "two\n").unwrap();
        std::fs::File::options().write(true).open(d.join("a")).unwrap().set_modified(at(500_000_000)).unwrap();
        let st = rustix::fs::lstat(d.join("a")).unwrap();
        let mut index = std::fs::read(d.join(".git/index")).unwrap();
        record_first(&mut index, &st, st.st_size as u32);
        std::fs::write(d.join(".git/index"), &index).unwrap();
        let file = std::fs::File::options().write(true).open(d.join(".git/index")).unwrap();
        file.set_modified(at(700_000_000)).unwrap();
        assert_eq!(check(d), (None, false));
    }

    /// The length recorded in an entry's flags is what git reads its path (and finds
    /// the next entry) by: one that is not the path's makes another index for git.
    #[test]
    fn a_path_length_other_than_the_path_is_refused() {
        let Some(tmp) = two_commit_scene("a_path_length_other_than_the_path_is_refused") else { return };
        let d = tmp.path();
        assert_eq!(check(d), (Some(true), true));
        let mut index = std::fs::read(d.join(".git/index")).unwrap();
        assert_eq!(&index[12 + 60..12 + 64], b"\0\x01a\0", "the first entry is a");
        index[12 + 61] = 47;
        rewrite_index(d, &index);
        let checkout = Dir::open(d).unwrap();
        let git_dir = checkout.subdir(OsStr::new(".git")).unwrap().unwrap();
        let head = git(d, &["rev-parse", "HEAD"]);
        assert_eq!(unchanged(&checkout, &git_dir, head.trim()), None);
        let status =
            Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).current_dir(d).output();
        let status = status.unwrap();
        assert!(!status.status.success() || !status.stdout.is_empty(), "git status takes it for another index");
    }

    /// git's status uses the cache-tree: a valid node whose tree is HEAD's stands for
    /// its count of entries, unread. A count or tree other than the entries make (a
    /// damaged index, another tool's) makes git print changes; it is refused.
    #[test]
    fn a_cache_tree_other_than_the_entries_make_is_refused() {
        let Some(tmp) = repo_scene("a_cache_tree_other_than_the_entries_make_is_refused") else { return };
        let d = tmp.path();
        std::fs::create_dir(d.join("d")).unwrap();
        for f in ["a", "d/x", "d/y", "e"] {
            std::fs::write(d.join(f), f).unwrap();
        }
        git(d, &["add", "-A"]);
        git(d, &["commit", "--quiet", "-m", "one"]);
        git(d, &["read-tree", "HEAD"]);
        settled(d);
        assert_eq!(check(d), (Some(true), true));
        let good = std::fs::read(d.join(".git/index")).unwrap();
        let node = good.windows(6).position(|w| w == b"d\x002 0\n").expect("d's node, valid");
        let checkout = Dir::open(d).unwrap();
        let git_dir = checkout.subdir(OsStr::new(".git")).unwrap().unwrap();
        let head = git(d, &["rev-parse", "HEAD"]);
        for (at, value) in [(node + 2, b'1'), (node + 2, b'3')] {
            let mut index = good.clone();
            index[at] = value;
            rewrite_index(d, &index);
            assert_eq!(unchanged(&checkout, &git_dir, head.trim()), None, "{at} {value}");
            let mut status = Command::new("git");
            let status =
                status.args(["status", "--porcelain", "--untracked-files=no"]).current_dir(d).output().unwrap();
            assert!(!status.stdout.is_empty(), "git status prints changes ({value})");
        }
    }

    /// Names sorting around '/' (a tree's order is the index's), nested directories,
    /// modes, a name that is not UTF-8: the tree made is `git write-tree`'s.
    #[test]
    fn trees_are_hashed_as_git_writes_them() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        git(d, &["init", "--quiet"]);
        for dir in ["a", "b/c", "a.d"] {
            std::fs::create_dir_all(d.join(dir)).unwrap();
        }
        for f in ["a.b", "a/x", "a-c", "a0", "b/c/d", "b/e", "a.d/f", "sp ace"] {
            std::fs::write(d.join(f), f).unwrap();
        }
        std::fs::write(d.join(OsStr::from_bytes(b"n\xff")), "x").unwrap();
        std::os::unix::fs::symlink("a0", d.join("b/l")).unwrap();
        std::fs::set_permissions(d.join("a/x"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        git(d, &["add", "-A"]);
        let tree = hex_oid(git(d, &["write-tree"]).trim()).unwrap();
        let index = std::fs::read(d.join(".git/index")).unwrap();
        assert_eq!(tree_of(&parse(&index).unwrap().entries, 0, &mut Made::new()), tree);
    }

    /// The index's time set a second ahead of its entries, without a refresh (which
    /// would rewrite it).
    fn settled_index_time(d: &Path) {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let index = std::fs::File::options().write(true).open(d.join(".git/index")).unwrap();
        index.set_modified(std::time::SystemTime::now()).unwrap();
    }

    /// A damaged `.idx` claiming four billion objects: refused, not allocated for.
    #[test]
    fn a_pack_index_claiming_more_than_its_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.idx");
        let mut idx = vec![0xff, b't', b'O', b'c', 0, 0, 0, 2];
        idx.extend(std::iter::repeat_n(0xffu8, 256 * 4));
        idx.extend([0u8; 64]);
        std::fs::write(&path, &idx).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(pack_offset(&file, &[0; OID]), None);
    }
}
