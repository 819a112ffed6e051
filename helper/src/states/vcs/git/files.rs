//! A converged checkout recognised from git's own files, without running git for it.
//!
//! On a round where nothing moved, [`super::Git::update`] runs about eleven processes
//! (the fetch alone starts four) to find what the files under `.git` and the remote's
//! repository already say. When the remote is a repository on this host (a path or a
//! `file:///` URL), this module reads both by descriptor and tells whether the apply
//! would end with nothing to do: origin's URL is `repo`, the revision resolves on the
//! remote (in [`super::Git::resolve`]'s order, the default branch's note included) to
//! the commit the checkout has checked out, on the branch of that name for a branch.
//! Only then is the fetch skipped: it would bring nothing the outcome depends on (it
//! still would refresh other branches and tags; the next round that names them fetches).
//! `git status` still decides whether tracked files were changed (the index check is
//! git's own).
//!
//! Anything this reader does not fully understand means "ask git": a link anywhere
//! (never followed; [`crate::dirfd::Dir`] opens without following), a file that is not
//! a regular one, a symbolic ref other than HEAD's, reftable or linked-worktree
//! repositories, configuration it cannot parse for certain (quotes, escapes,
//! continuations, includes), a URL rewrite (`insteadOf`) or hidden refs in any
//! configuration git would read, an abbreviated commit id, a name git would take for
//! something else than a plain ref name. Every such case goes through the full apply,
//! unchanged.
//!
//! Only for git run as root (the default `user`): then the checkout and the remote are
//! read where nobody but root can change anything (each directory read from is
//! [`Dir::root_controlled`]), so what is read is what git itself would read. Run as
//! another user, git reads with that user's rights, which root's reading cannot stand
//! in for (a remote the user cannot read makes the fetch fail).

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;

use crate::dirfd::Dir;
use rustix::fs::FileType;

use super::{is_object_id, looks_like_commit, Target, DEFAULT_REVISION};

/// Files larger than this are left to git (a `packed-refs` of a huge repository).
const MAX_FILE: u64 = 16 << 20;

/// `Some(x)`: known to be `x`; `None`: not known for certain, git decides.
pub(super) type Known<T> = Option<T>;

/// What a file holds: `Some(None)` when nothing (or a directory) is there.
pub(super) fn read_file(dir: &Dir, name: &OsStr) -> Known<Option<String>> {
    let mut file = match dir.open_file(name) {
        Ok(Some(f)) => f,
        Ok(None) => return Some(None),
        Err(_) => return None,
    };
    let meta = file.metadata().ok()?;
    if meta.is_dir() {
        return Some(None);
    }
    if !meta.is_file() || meta.len() > MAX_FILE {
        return None;
    }
    let mut text = String::new();
    file.by_ref().take(MAX_FILE + 1).read_to_string(&mut text).ok()?;
    Some(Some(text))
}

/// The directory `rel` (`/`-separated, relative) under `base`, every step opened without
/// following a link and root-controlled; `Some(None)` if a step is missing.
pub(super) fn walk(base: &Dir, rel: &[&str]) -> Known<Option<Dir>> {
    let mut here = base.try_clone().ok()?;
    for part in rel {
        here = match here.subdir(OsStr::new(part)) {
            Ok(Some(d)) => d,
            Ok(None) => return Some(None),
            Err(_) => return None,
        };
        here.root_controlled().ok()?;
    }
    Some(Some(here))
}

/// `packed-refs`: `(name, id, peeled id)` per ref.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Packed(Vec<(String, String, Option<String>)>);

impl Packed {
    pub fn parse(text: &str) -> Known<Self> {
        let mut refs: Vec<(String, String, Option<String>)> = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some(peeled) = line.strip_prefix('^') {
                let last = refs.last_mut()?;
                if !is_object_id(peeled) || last.2.is_some() {
                    return None;
                }
                last.2 = Some(peeled.to_ascii_lowercase());
                continue;
            }
            let (id, name) = line.split_once(' ')?;
            if !is_object_id(id) || name.is_empty() {
                return None;
            }
            refs.push((name.to_string(), id.to_ascii_lowercase(), None));
        }
        Some(Self(refs))
    }

    fn get(&self, name: &str) -> Option<&(String, String, Option<String>)> {
        self.0.iter().find(|(n, _, _)| n == name)
    }
}

/// A git directory (`.git`, or a bare repository), opened by descriptor.
pub struct GitDir {
    dir: Dir,
    packed: Packed,
}

impl GitDir {
    /// `dir` as a git directory this module can read: root-controlled, files-backed refs
    /// (no `reftable`), not a linked worktree (no `commondir`), with `HEAD`, `objects`
    /// and `refs`.
    fn new(dir: Dir) -> Known<Self> {
        dir.root_controlled().ok()?;
        for absent in ["reftable", "commondir"] {
            if dir.stat(OsStr::new(absent)).ok()?.is_some() {
                return None;
            }
        }
        for (name, kind) in
            [("HEAD", FileType::RegularFile), ("objects", FileType::Directory), ("refs", FileType::Directory)]
        {
            if dir.stat(OsStr::new(name)).ok()??.kind != kind {
                return None;
            }
        }
        let packed = match read_file(&dir, OsStr::new("packed-refs"))? {
            Some(text) => Packed::parse(&text)?,
            None => Packed::default(),
        };
        Some(Self { dir, packed })
    }

    /// The file `rel` (a `/`-separated path inside the git directory).
    fn read(&self, rel: &str) -> Known<Option<String>> {
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, dirs) = parts.split_last()?;
        match walk(&self.dir, dirs)? {
            Some(d) => read_file(&d, OsStr::new(name)),
            None => Some(None),
        }
    }

    /// The object id the ref `name` (`refs/…`) holds: its loose file first, then
    /// `packed-refs`; a symbolic ref is left to git. With it, the peeled id when
    /// `packed-refs` records one (annotated tags).
    fn ref_id(&self, name: &str) -> Known<Option<(String, Option<String>)>> {
        if let Some(text) = self.read(name)? {
            let id = text.trim();
            return is_object_id(id).then(|| Some((id.to_ascii_lowercase(), None)));
        }
        Some(self.packed.get(name).map(|(_, id, peeled)| (id.clone(), peeled.clone())))
    }

    /// Whether git could read a ref by the name `rel`: any entry there but a directory.
    fn has_ref(&self, rel: &str) -> Known<bool> {
        Some(self.read(rel)?.is_some() || self.packed.get(rel).is_some())
    }

    /// `HEAD`: `Ok(branch)` for `ref: refs/heads/BRANCH`, `Err(id)` when detached.
    fn head(&self) -> Known<Result<String, String>> {
        let text = self.read("HEAD")??;
        let text = text.trim();
        if let Some(target) = text.strip_prefix("ref: ") {
            let branch = target.trim().strip_prefix("refs/heads/")?;
            return plain_ref_name(branch).then(|| Ok(branch.to_string()));
        }
        is_object_id(text).then(|| Err(text.to_ascii_lowercase()))
    }

    /// The commit HEAD is at, through its branch when it names one.
    fn head_id(&self) -> Known<String> {
        match self.head()? {
            Ok(branch) => Some(self.ref_id(&format!("refs/heads/{branch}"))??.0),
            Err(id) => Some(id),
        }
    }

    /// The configuration file, with nothing in it that this module cannot judge.
    fn config(&self) -> Known<String> {
        let text = self.read("config")?.unwrap_or_default();
        plain_config(&text).then_some(text)
    }
}

/// A repository this host holds: `repo` is an absolute path or a `file:///` URL (none
/// with `%`-escapes, which git would decode).
pub fn local_path(repo: &str) -> Option<&str> {
    let path = match repo.strip_prefix("file://") {
        Some(rest) => rest.strip_prefix('/').map(|_| rest).filter(|r| !r.contains(['%', '?', '#']))?,
        None => repo,
    };
    path.starts_with('/').then_some(path)
}

/// The git directory at the local remote `path`, as `git-upload-pack` finds it: the
/// `.git` inside a work tree, or the (bare) repository itself.
fn open_remote(path: &str) -> Known<GitDir> {
    let dir = Dir::open(Path::new(path)).ok()?;
    dir.root_controlled().ok()?;
    match dir.stat(OsStr::new(".git")).ok()? {
        Some(m) if m.kind == FileType::Directory => GitDir::new(walk(&dir, &[".git"])??),
        Some(_) => None,
        None => GitDir::new(dir),
    }
}

/// A branch or tag name git takes as nothing but a ref name: letters, digits, `._-/`,
/// no empty component, none starting with `.` or ending with `.lock`, no `..`.
pub fn plain_ref_name(name: &str) -> bool {
    !name.is_empty()
        && name != "HEAD"
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && !name.contains("..")
        && !name.ends_with('.')
        && name.split('/').all(|c| !c.is_empty() && !c.starts_with('.') && !c.ends_with(".lock"))
}

/// Configuration with nothing that could change what this module reads from it or what
/// a fetch would do: no include, URL rewrite, hidden refs or per-worktree file, and no
/// line continued onto the next.
pub fn plain_config(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    !["include", "insteadof", "hiderefs", "worktreeconfig"].iter().any(|w| lower.contains(w))
        && !text.lines().any(|l| l.trim_end().ends_with('\\'))
}

/// `remote.origin.url` in a (plain) configuration file: the last value, as `git config
/// --get` prints it; `Some(None)` if the file sets none. Quoted or escaped values and
/// forms of section header it does not parse for certain are left to git.
pub fn origin_url(config: &str) -> Known<Option<String>> {
    let mut in_origin = false;
    let mut url = None;
    for line in config.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let (header, rest) = header.split_once(']')?;
            if !(rest.trim().is_empty() || rest.trim_start().starts_with(['#', ';'])) {
                return None;
            }
            let (section, sub) = match header.split_once(char::is_whitespace) {
                Some((s, sub)) => (s, Some(sub.trim())),
                None => (header, None),
            };
            if section.contains('.') || section.contains('"') {
                return None;
            }
            in_origin = section.eq_ignore_ascii_case("remote")
                && match sub {
                    Some(sub) => sub.strip_prefix('"').and_then(|s| s.strip_suffix('"')) == Some("origin"),
                    None => false,
                };
            continue;
        }
        if !in_origin {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        if key.eq_ignore_ascii_case("url") {
            let value = value?;
            if value.is_empty() || value.contains(['"', '\\', '#', ';']) || value.contains(char::is_whitespace) {
                return None;
            }
            url = Some(value.to_string());
        } else if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
    }
    Some(url)
}

/// The configuration git reads besides the repository's own: system, then global
/// (`~/.gitconfig`, `~/.config/git/config`); each must be plain. A file that is a
/// link, or in a directory someone else controls, is left to git.
fn plain_outer_configs(home: &str) -> Known<()> {
    let files = [("/etc", "gitconfig"), (home, ".gitconfig"), (&format!("{home}/.config/git"), "config")];
    for (dir, name) in files {
        let dir = match Dir::open(Path::new(dir)) {
            Ok(d) => d,
            Err(crate::dirfd::WalkError::Missing(_)) => continue,
            Err(_) => return None,
        };
        dir.root_controlled().ok()?;
        if let Some(text) = read_file(&dir, OsStr::new(name))? {
            if !plain_config(&text) {
                return None;
            }
        }
    }
    Some(())
}

/// `wanted` resolved on the remote in [`super::Git::resolve`]'s order, with the note
/// that resolution adds; `None` where only git could tell (the cases that would fail
/// or need the object database included).
fn resolve(remote: &GitDir, wanted: &str) -> Known<(Target, Option<String>)> {
    let default_branch = || -> Known<Target> {
        let branch = remote.head()?.ok()?;
        let (id, _) = remote.ref_id(&format!("refs/heads/{branch}"))??;
        Some(Target::Branch { name: branch, id })
    };
    if wanted == "HEAD" {
        return Some((default_branch()?, None));
    }
    if !plain_ref_name(wanted) {
        return None;
    }
    if let Some((id, _)) = remote.ref_id(&format!("refs/heads/{wanted}"))? {
        return Some((Target::Branch { name: wanted.to_string(), id }, None));
    }
    if let Some((id, peeled)) = remote.ref_id(&format!("refs/tags/{wanted}"))? {
        return Some((Target::Tag { name: wanted.to_string(), id: peeled.unwrap_or(id) }, None));
    }
    if looks_like_commit(wanted) {
        return is_object_id(wanted).then(|| (Target::Commit { id: wanted.to_ascii_lowercase() }, None));
    }
    if wanted == DEFAULT_REVISION {
        let target = default_branch()?;
        let note = format!(
            "the remote has no branch {DEFAULT_REVISION} (the default revision); following its default branch {}",
            match &target {
                Target::Branch { name, .. } => name.as_str(),
                _ => return None,
            }
        );
        return Some((target, Some(note)));
    }
    None
}

/// Whether the checkout `co` is at `target`, as the apply judges it: HEAD at the
/// target's commit and, for a branch, on that branch (as `git symbolic-ref --short`
/// names it: no other ref that the short name could mean) with an index.
fn at_target(co: &GitDir, target: &Target) -> Known<bool> {
    if co.dir.stat(OsStr::new("index")).ok()??.kind != FileType::RegularFile {
        return None;
    }
    match target {
        Target::Branch { name, id } => {
            let Ok(on) = co.head()? else { return Some(false) };
            if on != *name {
                return Some(false);
            }
            for other in [name.clone(), format!("refs/{name}"), format!("refs/tags/{name}")] {
                if co.has_ref(&other)? {
                    return None;
                }
            }
            Some(co.ref_id(&format!("refs/heads/{name}"))??.0 == *id)
        }
        Target::Tag { id, .. } | Target::Commit { id } => Some(co.head_id()? == *id),
    }
}

/// The target of a converged checkout at `checkout` (opened by descriptor, already
/// found to be root-controlled by the caller) and the resolution's note, if the files
/// show it is one; `None`: run the full apply.
pub fn converged(checkout: &Dir, repo: &str, wanted: &str, home: &str) -> Known<(Target, Option<String>)> {
    let co = GitDir::new(walk(checkout, &[".git"])??)?;
    if origin_url(&co.config()?)?.as_deref() != Some(repo) {
        return None;
    }
    let remote = open_remote(local_path(repo)?)?;
    remote.config()?;
    plain_outer_configs(home)?;
    let (target, note) = resolve(&remote, wanted)?;
    at_target(&co, &target)?.then_some((target, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_git_could_take_for_something_else_are_refused() {
        for ok in ["master", "main", "release/1.2", "feature-x_y", "v1.0"] {
            assert!(plain_ref_name(ok), "{ok}");
        }
        for no in
            ["", "HEAD", "a..b", "master~1", "x^{}", "a@{1}", "a:b", "/a", "a/", "a//b", ".a", "a/.b", "a.lock", "a."]
        {
            assert!(!plain_ref_name(no), "{no}");
        }
    }

    #[test]
    fn local_remotes_are_paths_and_plain_file_urls() {
        assert_eq!(local_path("/srv/r.git"), Some("/srv/r.git"));
        assert_eq!(local_path("file:///srv/r.git"), Some("/srv/r.git"));
        assert_eq!(local_path("file:///srv/a%20b"), None);
        assert_eq!(local_path("file://host/srv/r.git"), None);
        assert_eq!(local_path("ssh://h/srv/r.git"), None);
        assert_eq!(local_path("h:/srv/r.git"), None);
        assert_eq!(local_path("srv/r.git"), None);
    }

    #[test]
    fn origin_url_is_the_last_value_and_unclear_files_are_refused() {
        let plain = "[core]\n\tbare = false\n[remote \"origin\"]\n\turl = /srv/a.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n\tremote = origin\n";
        assert_eq!(origin_url(plain), Some(Some("/srv/a.git".into())));
        assert_eq!(origin_url("[remote \"origin\"]\nurl = /a\n[Remote \"origin\"]\n URL=/b ; c\n"), None);
        assert_eq!(
            origin_url("[remote \"origin\"]\nurl = /a\n[REMOTE \"origin\"]\n URL = /b\n"),
            Some(Some("/b".into()))
        );
        assert_eq!(origin_url("[remote \"other\"]\nurl = /a\n"), Some(None));
        assert_eq!(origin_url("[remote \"Origin\"]\nurl = /a\n"), Some(None), "subsections are case-sensitive");
        for unclear in [
            "[remote \"origin\"]\nurl = \"/a\"\n",
            "[remote.origin]\nurl = /a\n",
            "[remote \"origin\"] url = /a\n",
            "[remote \"origin\"]\nurl\n",
            "[remote \"origin\"]\nurl = /a b\n",
            "[remote \"origin\"]\nurl = /a#x\n",
        ] {
            assert_eq!(origin_url(unclear), None, "{unclear:?}");
        }
        assert!(plain_config(plain));
        for p in ["[include]\npath = x\n", "[url \"/b\"]\n insteadOf = /a\n", "[uploadpack]\nhideRefs = refs/heads\n"] {
            assert!(!plain_config(p), "{p:?}");
        }
        assert!(!plain_config("[core]\n x = a\\\n b\n"));
    }

    #[test]
    fn packed_refs_with_peeled_tags() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let text =
            format!("# pack-refs with: peeled fully-peeled sorted \n{a} refs/heads/main\n{b} refs/tags/v1\n^{c}\n");
        let p = Packed::parse(&text).unwrap();
        assert_eq!(p.get("refs/heads/main").map(|r| (r.1.clone(), r.2.clone())), Some((a.clone(), None)));
        assert_eq!(p.get("refs/tags/v1").map(|r| r.2.clone()), Some(Some(c.clone())));
        assert_eq!(Packed::parse(&format!("^{c}\n")), None, "a peeled line belongs to a ref");
        assert_eq!(Packed::parse("zz refs/heads/x\n"), None);
    }
}
