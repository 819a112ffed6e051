//! Source checkouts: `common.git`, `common.hg` and `common.svn`, driven through the
//! tools themselves (run as the state's `user`, default root), which do their own
//! networking: the helper links none.
//!
//! What the three share (this file):
//! - `path` must be absolute. Missing parents are created (root, 0755); the checkout
//!   directory itself is created owned by `user`, and the tool clones into it.
//! - An existing directory at `path` must belong to `user`: the tool runs as that user,
//!   and a checkout written by two users ends up half unwritable (git refuses such
//!   repositories outright). A non-directory at `path` is always refused.
//! - A directory that is not empty and not a checkout of this tool is a conflict:
//!   without `force` the state fails naming it; with `force` its content is removed
//!   (never at a path shallower than [`MIN_COMPONENTS_TO_EMPTY`]) and the repository
//!   cloned into it.
//! - Local changes to tracked files are a conflict as well, whether or not the revision
//!   moves: without `force` the state fails and lists them; with `force` they are
//!   discarded. Untracked (and ignored) files are never touched: they are where
//!   deployments keep generated or local files, and removing them is not "checking
//!   out a revision".
//! - The outcome's changes name the revision before and after ("revision 1a2b… ->
//!   3c4d…", "cloned at …"); a round where nothing moved has none.
//! - No tool ever prompts: stdin is /dev/null (or carries the svn password), and each
//!   module sets its tool's non-interactive switches. Cancelling kills the tool's
//!   process group ([`crate::exec`]).
//!
//! Root and links: the helper itself reaches `path` only by descriptor (links on the way
//! followed under [`crate::dirfd`]'s rule), but the tools take it by name. When the tool
//! runs as root, `path` and every directory on the way to it must therefore be root's and
//! writable by nobody else ([`dirfd::root_controlled`]): otherwise whoever can write there
//! could swap the checkout for a link between the helper's check and the tool's run, and
//! root's clone (or `force`'s emptying) would land where they chose. A tool running as
//! another user only ever has that user's rights.
//!
//! A credential written into a repository URL (`https://user:token@host/…`) has to
//! reach the tool on its command line; it is masked in the state's messages, but
//! `ssh-key-file`, svn's `username`/`password`, or a credential helper in the user's
//! configuration keep it off the process list.

pub mod git;
pub mod hg;
pub mod svn;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use opsagent_proto::newtypes::{AbsPath, InvalidValue};
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::dirfd::{self, Dir, Last, WalkError};
use crate::exec::{self, CommandSpec, Finished, ToolError, BASE_PATH, TOOL_TIMEOUT};
use crate::fsutil::{self, kind_of, FsError};
use crate::identity::{self, IdentityError};
use crate::states::storage::{require_tool, MissingTool};

/// Deadline of a clone, fetch, pull, checkout or update: large repositories over slow
/// links take a while, but a hung server must not hold the state for ever.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// `force` never empties a directory this close to the root (`/srv` with force and a
/// stray file must not become an empty `/srv`).
pub const MIN_COMPONENTS_TO_EMPTY: usize = 2;
/// Locally changed files named in a message; the rest are counted.
const FILES_SHOWN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum VcsError {
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error("parameter {param}: {problem}")]
    Param { param: &'static str, problem: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "{tool} would run as root in {path}, but {source}; set `user` to the owner of that directory, or keep the \
         checkout where only root writes"
    )]
    NotRootControlled { tool: &'static str, path: AbsPath, source: WalkError },
    #[error("{path} exists and is {found}, not a directory; a checkout cannot go there (force does not replace it)")]
    NotADirectory { path: AbsPath, found: &'static str },
    #[error(
        "{path} belongs to uid {owner}, but {tool} runs as {user} (uid {uid}): give the directory to {user} \
         or set `user` to its owner"
    )]
    Owner { path: AbsPath, owner: u32, tool: &'static str, user: String, uid: u32 },
    #[error("{path} exists, is not empty ({entries} entries) and is not a {tool} checkout; set force to replace its content")]
    NotACheckout { path: AbsPath, tool: &'static str, entries: usize },
    #[error("refusing to empty {0} for a checkout: force empties only directories at least {MIN_COMPONENTS_TO_EMPTY} levels below /")]
    TooShallow(AbsPath),
    #[error("{path} has local changes ({files}); set force to discard them")]
    LocalChanges { path: AbsPath, files: String },
    #[error("{path}: local branch {branch} has commits that are not on the remote's {branch}; set force to reset it")]
    Diverged { path: AbsPath, branch: String },
    #[error("revision {revision:?} is not {expected} of {repo}{known}")]
    NoRevision { revision: String, expected: &'static str, repo: String, known: String },
    #[error("`{command}` printed something unexpected: {output:?}")]
    Unexpected { command: String, output: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl VcsError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, VcsError::Tool(e) if e.is_cancelled())
    }
}

/// [`checkout_dir`] of a path given as text (the unit tests').
#[cfg(test)]
pub fn checkout_path(raw: &str) -> Result<AbsPath, VcsError> {
    let path = AbsPath::parse(raw.trim()).map_err(|source| VcsError::Path { param: "path", source })?;
    checkout_dir(&path)
}

/// The checkout directory, from the `path` parameter (validated by the catalogue's
/// decode). `/` itself can never hold one.
pub fn checkout_dir(path: &AbsPath) -> Result<AbsPath, VcsError> {
    let path = path.clone();
    if path.is_root() {
        return Err(VcsError::Param { param: "path", problem: "/ cannot be a checkout directory".into() });
    }
    Ok(path)
}

/// A repository URL or path, as given, with the checks all three tools need: not empty,
/// no NUL or line break, and not something the tool would take for an option.
pub fn repo_param(raw: &str) -> Result<String, VcsError> {
    let repo = raw.trim();
    let problem = if repo.is_empty() {
        Some("the repository is empty")
    } else if repo.starts_with('-') {
        Some("a repository cannot start with '-'")
    } else if repo.contains(['\0', '\n', '\r']) {
        Some("the repository contains a NUL byte or a line break")
    } else {
        None
    };
    match problem {
        Some(p) => Err(VcsError::Param { param: "repo", problem: format!("{p} ({})", mask_url(repo)) }),
        None => Ok(repo.to_string()),
    }
}

/// A revision, trimmed; empty means `default`. Like the repository, it must not look
/// like an option.
pub fn revision_param(raw: &str, default: &str) -> Result<String, VcsError> {
    let rev = raw.trim();
    if rev.is_empty() {
        return Ok(default.to_string());
    }
    if rev.starts_with('-') || rev.contains(|c: char| c.is_control()) {
        return Err(VcsError::Param {
            param: "revision",
            problem: format!("{rev:?} is not a revision (it starts with '-' or contains control characters)"),
        });
    }
    Ok(rev.to_string())
}

/// The part of a URL that is a credential: the password of `user:password@`, or for
/// http(s) and ftp(s) a lone user part (`https://TOKEN@host/`, how tokens are usually
/// written). `ssh://git@host` has none.
pub fn url_secret(repo: &str) -> Option<&str> {
    let (scheme, rest) = repo.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, _) = authority.rsplit_once('@')?;
    if let Some((_, password)) = userinfo.split_once(':') {
        return Some(password).filter(|p| !p.is_empty());
    }
    let web = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https" | "ftp" | "ftps");
    (web && !userinfo.is_empty()).then_some(userinfo)
}

/// `repo` for messages, its credential (if any) replaced by `***`.
pub fn mask_url(repo: &str) -> String {
    match url_secret(repo) {
        Some(secret) => repo.replacen(&format!("{secret}@"), "***@", 1),
        None => repo.to_string(),
    }
}

/// Replaces every occurrence of the secrets in the outcome's texts. Tools do not echo
/// passwords, but a URL with a token may come back in their error output.
pub fn redact(mut outcome: Outcome, secrets: &[&str]) -> Outcome {
    let scrub = |s: &mut String| {
        for secret in secrets.iter().filter(|s| s.len() >= 2) {
            if s.contains(secret) {
                *s = s.replace(secret, "***");
            }
        }
    };
    scrub(&mut outcome.comment);
    scrub(&mut outcome.stdout);
    for c in &mut outcome.changes {
        scrub(&mut c.subject);
        scrub(&mut c.what);
    }
    outcome
}

/// The outcome of a checkout state: [`super::finish`], the cancelled flag, secrets
/// masked.
pub fn outcome(
    path: &str,
    result: Result<(), VcsError>,
    changes: Vec<Change>,
    notes: &[String],
    secrets: &[&str],
) -> Outcome {
    let cancelled = matches!(&result, Err(e) if e.is_cancelled());
    let mut outcome = super::finish(path.trim(), result, changes, notes);
    outcome.cancelled = cancelled;
    redact(outcome, secrets)
}

/// Who runs a tool, and how: the program found on the helper's search path, the user's
/// ids, and the environment (nothing of the helper's own, the user's `HOME`, plus what
/// the module adds to keep its tool non-interactive).
#[derive(Debug, Clone)]
pub struct Runner {
    pub program: PathBuf,
    pub tool: &'static str,
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    env: Vec<(String, String)>,
}

impl Runner {
    pub fn new(tool: &'static str, package: &str, user: Option<&str>) -> Result<Self, VcsError> {
        let name = user.map(str::trim).filter(|u| !u.is_empty()).unwrap_or("root");
        let u = identity::user(name)?;
        let program = require_tool(tool, package)?;
        let env = vec![
            ("PATH".to_string(), BASE_PATH.to_string()),
            ("HOME".to_string(), u.dir.display().to_string()),
            ("USER".to_string(), u.name.clone()),
            ("LOGNAME".to_string(), u.name.clone()),
            // Messages are parsed (svn info, hg status): the C locale keeps them English.
            ("LC_ALL".to_string(), "C".to_string()),
            ("LANG".to_string(), "C".to_string()),
        ];
        Ok(Self { program, tool, user: u.name, uid: u.uid, gid: u.gid, env })
    }

    /// The user's home directory, as the tool sees it (`HOME`).
    pub fn home(&self) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == "HOME").map(|(_, v)| v.as_str())
    }

    pub fn with_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// The tool with `args`, run as the user in `cwd`.
    pub fn spec<S: Into<OsString>>(
        &self,
        args: impl IntoIterator<Item = S>,
        cwd: &Path,
        timeout: Duration,
    ) -> CommandSpec {
        CommandSpec {
            program: self.program.clone(),
            args: args.into_iter().map(Into::into).collect(),
            cwd: cwd.to_path_buf(),
            env: self.env.clone(),
            uid: self.uid,
            gid: self.gid,
            timeout: Some(timeout),
            stdin: None,
            reads_only: false,
            sandbox: None,
        }
    }

    /// A local command (status, rev-parse…): the shorter default deadline.
    pub fn local<S: Into<OsString>>(&self, args: impl IntoIterator<Item = S>, cwd: &Path) -> CommandSpec {
        self.spec(args, cwd, TOOL_TIMEOUT)
    }
}

/// Runs `spec`; its output if it exits with one of `ok_codes`.
pub async fn run(spec: &CommandSpec, ok_codes: &[i32], cancel: &mut Cancel) -> Result<Finished, VcsError> {
    Ok(exec::checked(spec, ok_codes, cancel).await?)
}

/// What is at the checkout path before the state acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Missing,
    Empty,
    /// A directory holding the tool's metadata directory (`.git`, `.hg`, `.svn`).
    Checkout,
    /// A directory with other content.
    Other {
        entries: usize,
    },
}

/// Looks at `path`, by descriptor: a link to a directory counts as that directory
/// (checkouts often live behind one) when [`crate::dirfd`]'s rule lets it be followed;
/// anything else than a directory is refused, and so is a directory that `uid` does not
/// own, or one another user could swap under a tool that runs as root.
pub fn inspect(path: &AbsPath, marker: &str, runner: &Runner) -> Result<Existing, VcsError> {
    let Some(dir) = open_checkout(path)? else {
        return Ok(Existing::Missing);
    };
    let meta = dir.meta().map_err(FsError::from)?;
    if meta.uid != runner.uid.as_raw() {
        return Err(VcsError::Owner {
            path: path.clone(),
            owner: meta.uid,
            tool: runner.tool,
            user: runner.user.clone(),
            uid: runner.uid.as_raw(),
        });
    }
    guard(&dir, path, runner)?;
    let mut entries = 0;
    for (name, _) in dir.entries().map_err(FsError::from)? {
        if name == marker {
            return Ok(Existing::Checkout);
        }
        entries += 1;
    }
    Ok(if entries == 0 { Existing::Empty } else { Existing::Other { entries } })
}

/// The directory at `path`, opened under the link rule; `None` if nothing is there.
fn open_checkout(path: &AbsPath) -> Result<Option<Dir>, VcsError> {
    let resolved = match dirfd::resolve(path.as_path(), Last::Follow, None, &mut |_, _| {}) {
        Ok(r) => r,
        Err(WalkError::Missing(_)) => return Ok(None),
        Err(e) => return Err(FsError::from(e).into()),
    };
    let Some(name) = &resolved.name else {
        return Err(VcsError::Param { param: "path", problem: "/ cannot be a checkout directory".into() });
    };
    match resolved.parent.subdir(name) {
        Ok(Some(dir)) => Ok(Some(dir)),
        Ok(None) => match fsutil::lstat(path.as_path())? {
            // A dangling link is "missing" once followed, but is not ours to replace.
            Some(m) => Err(VcsError::NotADirectory { path: path.clone(), found: kind_of(m.file_type()) }),
            None => Ok(None),
        },
        Err(WalkError::NotADirectory { found, .. }) => Err(VcsError::NotADirectory { path: path.clone(), found }),
        Err(e) => Err(FsError::from(e).into()),
    }
}

/// A tool running as root takes `path` by name: only where nobody else can change it.
fn guard(dir: &Dir, path: &AbsPath, runner: &Runner) -> Result<(), VcsError> {
    if !runner.uid.is_root() {
        return Ok(());
    }
    dir.root_controlled().map_err(|source| VcsError::NotRootControlled {
        tool: runner.tool,
        path: path.clone(),
        source,
    })
}

/// Makes `path` an empty directory owned by the runner's user, ready for a clone:
/// creates it (and missing parents, root 0755) or, with `force`, empties a directory
/// that holds something else. Returns `false` when `path` already is a checkout.
pub fn prepare(
    path: &AbsPath,
    existing: &Existing,
    force: bool,
    runner: &Runner,
    changes: &mut Vec<Change>,
) -> Result<bool, VcsError> {
    match existing {
        Existing::Checkout => Ok(false),
        Existing::Empty => Ok(true),
        Existing::Missing => {
            fsutil::ensure_parent(&path.parent(), changes)?;
            let dir =
                fsutil::create_dir_all(path.as_path(), fsutil::PARENT_DIR_MODE, (runner.uid, runner.gid), changes)?;
            guard(&dir, path, runner)?;
            Ok(true)
        }
        Existing::Other { entries } if !force => {
            Err(VcsError::NotACheckout { path: path.clone(), tool: runner.tool, entries: *entries })
        }
        Existing::Other { entries } => {
            if path.as_path().components().count() - 1 < MIN_COMPONENTS_TO_EMPTY {
                return Err(VcsError::TooShallow(path.clone()));
            }
            let dir = open_checkout(path)?.ok_or_else(|| FsError::from(WalkError::Missing(path.as_path().into())))?;
            guard(&dir, path, runner)?;
            empty_dir(&dir)?;
            changes.push(Change::new(
                path.to_string(),
                format!("content removed ({entries} entries; not a {} checkout, force is set)", runner.tool),
            ));
            Ok(true)
        }
    }
}

/// What [`prepare`] reports for a missing checkout directory, found by a plan: the
/// missing parents (root's), then the directory itself (the user's), created by nobody.
pub fn planned_prepare(path: &AbsPath, runner: &Runner, changes: &mut Vec<Change>) -> Result<(), VcsError> {
    fsutil::ensure_parent(&path.parent(), changes)?;
    let mode = fsutil::describe_mode(fsutil::PARENT_DIR_MODE);
    changes.push(Change::new(path.to_string(), format!("directory created ({mode} {}:{})", runner.uid, runner.gid)));
    Ok(())
}

/// Removes everything inside the opened `dir`, by descriptor: links inside are removed,
/// never followed, and a directory renamed meanwhile is still the one emptied.
fn empty_dir(dir: &Dir) -> Result<(), FsError> {
    for (entry, _) in dir.entries()? {
        dir.remove_tree(&entry)?;
    }
    Ok(())
}

/// `files` for a message: the first few, then how many more.
pub fn describe_files(files: &[String]) -> String {
    let mut shown = files.iter().take(FILES_SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if files.len() > FILES_SHOWN {
        shown.push_str(&format!(" and {} more", files.len() - FILES_SHOWN));
    }
    shown
}

/// Single quotes for a POSIX shell (`GIT_SSH_COMMAND`, hg's `ui.ssh` and `SVN_SSH` are
/// run through one).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The ssh command the tools use: never a prompt (BatchMode fails instead of asking for
/// a passphrase or password), and a host seen for the first time is recorded rather
/// than asked about, while a changed host key still fails (accept-new). With a key, only
/// that key is offered.
pub fn ssh_command(key: Option<&AbsPath>) -> String {
    let mut cmd = String::from("ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new");
    if let Some(k) = key {
        cmd.push_str(&format!(" -i {} -o IdentitiesOnly=yes", shell_quote(&k.to_string())));
    }
    cmd
}

/// An abbreviated commit id for messages.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn url_credentials_are_found_and_masked() {
        assert_eq!(url_secret("https://user:s3cret@example.com/r.git"), Some("s3cret"));
        assert_eq!(url_secret("https://ghp_token@example.com/r.git"), Some("ghp_token"));
        assert_eq!(url_secret("ssh://git@example.com/r.git"), None);
        assert_eq!(url_secret("svn+ssh://bob:pw@host/r"), Some("pw"));
        assert_eq!(url_secret("git@example.com:r.git"), None);
        assert_eq!(url_secret("/srv/repo.git"), None);
        assert_eq!(url_secret("https://example.com/a@b"), None);
        assert_eq!(mask_url("https://user:s3cret@example.com/r.git"), "https://user:***@example.com/r.git");
        assert_eq!(mask_url("https://tok@example.com/r"), "https://***@example.com/r");
        let o = Outcome::failed("cannot reach https://u:s3cret@h/x");
        assert_eq!(redact(o, &["s3cret"]).comment, "cannot reach https://u:***@h/x");
    }

    #[test]
    fn parameters_are_checked() {
        assert!(checkout_path("srv/app").unwrap_err().to_string().contains("not absolute"));
        assert!(checkout_path("/").is_err());
        assert_eq!(checkout_path(" /srv/app/ ").unwrap().to_string(), "/srv/app");
        assert!(repo_param("--upload-pack=evil").unwrap_err().to_string().contains("cannot start with '-'"));
        assert!(repo_param("  ").is_err());
        assert_eq!(revision_param("", "master").unwrap(), "master");
        assert_eq!(revision_param(" v1.0 ", "master").unwrap(), "v1.0");
        assert!(revision_param("-x", "master").is_err());
    }

    #[test]
    fn ssh_commands_never_prompt_and_quote_the_key() {
        assert_eq!(ssh_command(None), "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new");
        let key = AbsPath::parse("/root/.ssh/it's key").unwrap();
        assert_eq!(
            ssh_command(Some(&key)),
            r"ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -i '/root/.ssh/it'\''s key' -o IdentitiesOnly=yes"
        );
    }

    #[test]
    fn file_lists_are_capped() {
        let files: Vec<String> = (1..=7).map(|i| format!("f{i}")).collect();
        assert_eq!(describe_files(&files), "f1, f2, f3, f4, f5 and 2 more");
        assert_eq!(describe_files(&files[..2]), "f1, f2");
    }

    #[test]
    fn inspection_tells_checkouts_from_other_content_and_checks_the_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = Runner {
            program: "/bin/true".into(),
            tool: "git",
            user: "me".into(),
            uid: nix::unistd::getuid(),
            gid: nix::unistd::getgid(),
            env: Vec::new(),
        };
        let at = |p: &Path| AbsPath::parse(&p.display().to_string()).unwrap();
        let dir = tmp.path().join("co");
        assert_eq!(inspect(&at(&dir), ".git", &runner).unwrap(), Existing::Missing);
        fs::create_dir(&dir).unwrap();
        assert_eq!(inspect(&at(&dir), ".git", &runner).unwrap(), Existing::Empty);
        fs::write(dir.join("README"), "x").unwrap();
        assert_eq!(inspect(&at(&dir), ".git", &runner).unwrap(), Existing::Other { entries: 1 });
        fs::create_dir(dir.join(".git")).unwrap();
        assert_eq!(inspect(&at(&dir), ".git", &runner).unwrap(), Existing::Checkout);
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        let err = inspect(&at(&file), ".git", &runner).unwrap_err();
        assert!(err.to_string().contains("is a regular file, not a directory"), "{err}");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), tmp.path().join("dangling")).unwrap();
        assert!(inspect(&at(&tmp.path().join("dangling")), ".git", &runner).is_err());
        let other = Runner { uid: Uid::from_raw(runner.uid.as_raw() + 4242), ..runner.clone() };
        let err = inspect(&at(&dir), ".git", &other).unwrap_err();
        assert!(err.to_string().contains("give the directory to me"), "{err}");

        let mut changes = Vec::new();
        let err = prepare(&at(&dir.join("sub")), &Existing::Other { entries: 1 }, false, &runner, &mut changes);
        assert!(err.unwrap_err().to_string().contains("set force to replace its content"));
        fs::remove_dir_all(dir.join(".git")).unwrap();
        fs::create_dir(dir.join("d")).unwrap();
        std::os::unix::fs::symlink(&file, dir.join("link")).unwrap();
        assert!(prepare(&at(&dir), &Existing::Other { entries: 3 }, true, &runner, &mut changes).unwrap());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert!(file.exists(), "a link inside is removed, not followed");
        assert_eq!(changes.len(), 1);
        let shallow = AbsPath::parse("/srv").unwrap();
        assert!(matches!(
            prepare(&shallow, &Existing::Other { entries: 1 }, true, &runner, &mut changes),
            Err(VcsError::TooShallow(_))
        ));
    }
}
