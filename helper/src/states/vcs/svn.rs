//! `common.svn`: a Subversion working copy at `path` kept at `revision`.
//!
//! Revisions (keywords in any case; states.md's spelling `COMMITED` is accepted):
//! - `HEAD` (default): follows the repository. The target is the last revision that
//!   changed `repo` (its "Last Changed Rev" at HEAD), not the repository's newest
//!   number: commits elsewhere in the repository do not move the working copy, so a
//!   round without a change to this tree changes nothing.
//! - a number (`1234` or `r1234`) or a date (`{2024-01-31}`): fixed.
//! - `BASE`, and `COMMITTED` (which names the same content): keep the revision the
//!   working copy has; a first checkout takes what `HEAD` would.
//! - `PREV`: the revision before the last change of `repo`, so one change behind
//!   `HEAD`. Subversion's own `PREV` is relative to the working copy and would step one
//!   change further back every round; anchored to the repository it is stable.
//!
//! An existing working copy of another URL is switched (`svn switch
//! --ignore-ancestry`, same repository only); one with local changes (`svn status -q`: tracked files only) is refused
//! without `force` and reverted (`svn revert -R`) with it. Unversioned files are left
//! alone.
//!
//! Credentials: `username` is passed as `--username`; `password` goes on the tool's
//! standard input (`--password-from-stdin`, Subversion 1.10 and later), never on its
//! command line, and `--no-auth-cache` keeps it out of the user's
//! `~/.subversion/auth`. It is masked in the state's messages. svn runs with
//! `--non-interactive`; `svn+ssh://` uses ssh in batch mode (`SVN_SSH`).
//!
//! A plan (dry run) takes the same steps with the read-only ones only: `svn info` and
//! `svn status` of the working copy, `svn info URL[@REV]` of the repository (none
//! writes into the working copy, `.svn` included); it reports what checkout, revert,
//! switch and update would change in their own words, or the apply's refusal, without
//! running them. Like any svn command, it creates the user's `~/.subversion` if that
//! is missing (svn's own configuration area).

use opsagent_proto::catalogue::CommonSvn;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use super::{
    checkout_dir, describe_files, inspect, mask_url, planned_prepare, prepare, repo_param, revision_param, run,
    ssh_command, url_secret, Existing, Runner, VcsError, TRANSFER_TIMEOUT,
};
use crate::cancel::Cancel;
use crate::exec::CommandSpec;

/// states.md's default `revision`.
pub const DEFAULT_REVISION: &str = "HEAD";

/// What `revision` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rev {
    Head,
    /// BASE, COMMITTED: keep what is checked out.
    Base,
    Prev,
    /// A number or a `{date}`, as svn takes it after `-r`.
    Fixed(String),
}

pub fn parse_revision(raw: &str) -> Result<Rev, VcsError> {
    let rev = revision_param(raw, DEFAULT_REVISION)?;
    let number = rev.strip_prefix(['r', 'R']).unwrap_or(&rev);
    match rev.to_ascii_uppercase().as_str() {
        "HEAD" => Ok(Rev::Head),
        "BASE" | "COMMITTED" | "COMMITED" => Ok(Rev::Base),
        "PREV" => Ok(Rev::Prev),
        _ if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => Ok(Rev::Fixed(number.to_string())),
        _ if rev.starts_with('{') && rev.ends_with('}') && rev.len() > 2 => Ok(Rev::Fixed(rev)),
        _ => Err(VcsError::Param {
            param: "revision",
            problem: format!("{rev:?}: expected HEAD, BASE, COMMITTED, PREV, a revision number or {{DATE}}"),
        }),
    }
}

/// The fields of `svn info` this state uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub url: String,
    pub revision: u64,
    pub last_changed: u64,
}

pub fn parse_info(out: &str) -> Option<Info> {
    let field = |name: &str| out.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")).map(str::trim);
    Some(Info {
        url: field("URL")?.to_string(),
        revision: field("Revision")?.parse().ok()?,
        last_changed: field("Last Changed Rev")?.parse().ok()?,
    })
}

/// Paths of `svn status -q` lines, relative to the working copy; the lines svn adds
/// about externals are not changes.
pub fn changed_files(status: &str, root: &str) -> Vec<String> {
    let prefix = format!("{root}/");
    status
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('X') && !l.starts_with("Performing status"))
        .filter_map(|l| l.get(8..))
        .map(|p| {
            let p = p.trim();
            p.strip_prefix(&prefix).unwrap_or(if p == root { "." } else { p }).to_string()
        })
        .collect()
}

/// A working-copy path as an svn target: with a trailing `@`, so that an `@` in the
/// path is not read as a peg revision (`info`, `status`, `update`, `revert`; the path
/// of `checkout` and `switch` is not a target and is given as it is).
fn wc_target(path: &AbsPath) -> String {
    format!("{path}@")
}

pub async fn apply(p: &CommonSvn, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = sync(p, &mut changes, &mut cancel).await;
    let password = p.password.as_deref().filter(|pw| !pw.is_empty());
    let secrets: Vec<&str> = password.into_iter().chain(url_secret(p.repo.trim())).collect();
    super::outcome(&p.path.0, result, changes, &[], &secrets)
}

async fn sync(p: &CommonSvn, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), VcsError> {
    let path = checkout_dir(&p.path)?;
    let repo = repo_param(&p.repo)?;
    let rev = parse_revision(&p.revision)?;
    let username = p.username.as_deref().map(str::trim).filter(|u| !u.is_empty());
    if username.is_some_and(|u| u.starts_with('-') || u.contains(|c: char| c.is_control())) {
        return Err(VcsError::Param { param: "username", problem: "not a user name".into() });
    }
    let runner = Runner::new("svn", "subversion", p.user.as_deref())?.with_env("SVN_SSH", ssh_command(None));
    let existing = inspect(&path, ".svn", &runner)?;
    // A plan runs the same steps with its inspections only (`svn info`, `svn info URL`,
    // `svn status`: none writes into the working copy) and records what checkout,
    // revert, switch and update would change instead of running them. A directory
    // holding something else goes on to `prepare`, which refuses it or, with force,
    // stops at the plan guard.
    let planning = crate::plan::active() && !matches!(existing, Existing::Other { .. });
    let fresh = if planning {
        if existing == Existing::Missing {
            planned_prepare(&path, &runner, changes)?;
        }
        existing != Existing::Checkout
    } else {
        prepare(&path, &existing, p.force, &runner, changes)?
    };
    let mut svn = Svn {
        runner,
        username: username.map(str::to_string),
        password: p.password.as_ref().map(|pw| pw.0.clone()).filter(|pw| !pw.is_empty()),
        cancel,
    };
    let shown = path.to_string();

    if fresh {
        let head = svn.remote_info(&repo, None).await?;
        let target = match &rev {
            Rev::Head | Rev::Base => head.last_changed,
            Rev::Prev => prev(&head, &repo)?,
            Rev::Fixed(r) => svn.remote_info(&repo, Some(r)).await?.revision,
        };
        let t = target.to_string();
        if !planning {
            let args = svn.remote_args(&["checkout", "--quiet", "-r", &t, "--", &repo, &shown]);
            svn.remote(args).await?;
        }
        changes.push(Change::new(&shown, format!("checked out at r{target}")));
        return Ok(());
    }

    let wc = svn.local_info(&path).await?;
    let status = svn.inspect(&["status", "--quiet", "--ignore-externals", "--", &wc_target(&path)]).await?;
    let dirty = changed_files(&status, &shown);
    if !dirty.is_empty() && !p.force {
        return Err(VcsError::LocalChanges { path: path.clone(), files: describe_files(&dirty) });
    }
    let (remote, target) = match &rev {
        Rev::Head => {
            let head = svn.remote_info(&repo, None).await?;
            let t = head.last_changed;
            (head, t)
        }
        Rev::Prev => {
            let head = svn.remote_info(&repo, None).await?;
            let t = prev(&head, &repo)?;
            (head, t)
        }
        Rev::Base => (svn.remote_info(&repo, None).await?, wc.revision),
        Rev::Fixed(r) => {
            let at = svn.remote_info(&repo, Some(r)).await?;
            let t = at.revision;
            (at, t)
        }
    };
    if !dirty.is_empty() {
        if !planning {
            svn.local(&["revert", "--quiet", "--recursive", "--", &wc_target(&path)]).await?;
        }
        changes
            .push(Change::new(&shown, format!("local changes discarded ({}; force is set)", describe_files(&dirty))));
    }
    let t = target.to_string();
    let force_flag: &[&str] = if p.force { &["--force"] } else { &[] };
    // `svn info URL` gives the URL as svn writes it in the working copy, so the two
    // compare equal whatever form `repo` was given in.
    if remote.url != wc.url {
        // Another directory of the same repository need not share history with this one.
        // (svn reads a peg revision in switch's URL, not in its path.)
        let mut args = vec!["switch", "--quiet", "--ignore-ancestry", "-r", &t];
        args.extend(force_flag);
        args.extend(["--", &repo, &shown]);
        if !planning {
            svn.remote(svn.remote_args(&args)).await?;
        }
        changes.push(Change::new(&shown, format!("url {} -> {}", mask_url(&wc.url), mask_url(&remote.url))));
    } else if wc.revision != target {
        let mut args = vec!["update", "--quiet", "-r", &t];
        args.extend(force_flag);
        let target_arg = wc_target(&path);
        args.extend(["--", &target_arg]);
        if !planning {
            svn.remote(svn.remote_args(&args)).await?;
        }
    }
    if wc.revision != target {
        changes.push(Change::new(&shown, format!("revision r{} -> r{target}", wc.revision)));
    }
    Ok(())
}

fn prev(head: &Info, repo: &str) -> Result<u64, VcsError> {
    head.last_changed.checked_sub(1).ok_or_else(|| VcsError::NoRevision {
        revision: "PREV".into(),
        expected: "available (the last change is revision 0)",
        repo: mask_url(repo),
        known: String::new(),
    })
}

struct Svn<'a> {
    runner: Runner,
    username: Option<String>,
    password: Option<String>,
    cancel: &'a mut Cancel,
}

impl Svn<'_> {
    /// Arguments of a command that contacts the server: credentials as options, the
    /// password itself announced as coming on stdin.
    fn remote_args(&self, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = vec!["--non-interactive".into(), "--no-auth-cache".into()];
        if let Some(u) = &self.username {
            all.extend(["--username".to_string(), u.clone()]);
        }
        if self.password.is_some() {
            all.push("--password-from-stdin".into());
        }
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    fn remote_spec(&self, args: Vec<String>) -> CommandSpec {
        let spec = self.runner.spec(args, std::path::Path::new("/"), TRANSFER_TIMEOUT);
        match &self.password {
            // svn reads one line.
            Some(pw) => spec.with_stdin(format!("{pw}\n")),
            None => spec,
        }
    }

    async fn remote(&mut self, args: Vec<String>) -> Result<String, VcsError> {
        let spec = self.remote_spec(args);
        Ok(run(&spec, &[0], self.cancel).await?.output)
    }

    async fn local(&mut self, args: &[&str]) -> Result<String, VcsError> {
        let mut all = vec!["--non-interactive"];
        all.extend(args);
        let spec = self.runner.local(all, std::path::Path::new("/"));
        Ok(run(&spec, &[0], self.cancel).await?.output)
    }

    /// [`Self::local`] for `svn info` and `svn status` of the working copy, which only
    /// read it: inspections, run by a plan too.
    async fn inspect(&mut self, args: &[&str]) -> Result<String, VcsError> {
        let mut all = vec!["--non-interactive"];
        all.extend(args);
        let spec = self.runner.local(all, std::path::Path::new("/")).inspection();
        Ok(run(&spec, &[0], self.cancel).await?.output)
    }

    /// `svn info` of the repository URL, at HEAD or at `rev`.
    async fn remote_info(&mut self, repo: &str, rev: Option<&str>) -> Result<Info, VcsError> {
        let mut args = vec!["info"];
        if let Some(r) = rev {
            args.extend(["-r", r]);
        }
        args.extend(["--", repo]);
        // Reads the repository only: an inspection.
        let spec = self.remote_spec(self.remote_args(&args)).inspection();
        let out = run(&spec, &[0], self.cancel).await?.output;
        parse_info(&out).ok_or_else(|| VcsError::Unexpected { command: spec.display(), output: out })
    }

    async fn local_info(&mut self, path: &AbsPath) -> Result<Info, VcsError> {
        let target = wc_target(path);
        let out = self.inspect(&["info", "--", &target]).await?;
        parse_info(&out)
            .ok_or_else(|| VcsError::Unexpected { command: format!("svn info -- {target}"), output: out.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    #[test]
    fn revisions_parse_in_every_documented_spelling() {
        assert_eq!(parse_revision("").unwrap(), Rev::Head);
        assert_eq!(parse_revision("head").unwrap(), Rev::Head);
        assert_eq!(parse_revision("COMMITED").unwrap(), Rev::Base);
        assert_eq!(parse_revision("committed").unwrap(), Rev::Base);
        assert_eq!(parse_revision("BASE").unwrap(), Rev::Base);
        assert_eq!(parse_revision("PREV").unwrap(), Rev::Prev);
        assert_eq!(parse_revision("r42").unwrap(), Rev::Fixed("42".into()));
        assert_eq!(parse_revision("42").unwrap(), Rev::Fixed("42".into()));
        assert_eq!(parse_revision("{2024-01-31}").unwrap(), Rev::Fixed("{2024-01-31}".into()));
        let err = parse_revision("trunk").unwrap_err().to_string();
        assert!(err.contains("expected HEAD, BASE, COMMITTED, PREV"), "{err}");
        assert!(parse_revision("r").is_err());
    }

    #[test]
    fn info_and_status_parse() {
        let out = "Path: wc\nURL: svn://127.0.0.1:1/r/trunk\nRelative URL: ^/trunk\nRevision: 7\nNode Kind: directory\nLast Changed Rev: 5\n";
        assert_eq!(
            parse_info(out),
            Some(Info { url: "svn://127.0.0.1:1/r/trunk".into(), revision: 7, last_changed: 5 })
        );
        assert_eq!(parse_info("Path: x\n"), None);
        let status = "M       /srv/wc/a.txt\n!       /srv/wc/sub/gone\nX       /srv/wc/ext\n\nPerforming status on external item at '/srv/wc/ext':\n M      /srv/wc\n";
        assert_eq!(changed_files(status, "/srv/wc"), ["a.txt", "sub/gone", "."]);
    }

    #[test]
    fn the_password_goes_to_stdin_never_to_the_arguments() {
        let mut cancel = Cancel::never();
        let svn = Svn {
            runner: Runner {
                program: "/usr/bin/svn".into(),
                tool: "svn",
                user: "root".into(),
                uid: Uid::from_raw(0),
                gid: Gid::from_raw(0),
                env: Vec::new(),
            },
            username: Some("alice".into()),
            password: Some("s3cret pw".into()),
            cancel: &mut cancel,
        };
        let spec = svn.remote_spec(svn.remote_args(&["info", "--", "svn://h/r"]));
        assert!(spec.args.iter().all(|a| !a.to_string_lossy().contains("s3cret")), "{:?}", spec.args);
        assert!(!spec.display().contains("s3cret"));
        let args: Vec<String> = spec.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--non-interactive",
                "--no-auth-cache",
                "--username",
                "alice",
                "--password-from-stdin",
                "info",
                "--",
                "svn://h/r"
            ]
        );
        assert_eq!(spec.stdin.as_deref(), Some(&b"s3cret pw\n"[..]));
    }
}
