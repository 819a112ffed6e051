//! `linux.cmd`: runs `shell -c cmd` as a user, unless its path guards say not to.
//!
//! The guards are this module's only idempotency: without them the command runs every
//! round, as it did in the original agent. The command sees a fixed environment plus
//! the recipe's `env`, never the helper's own (which would leak root's settings).

use std::path::PathBuf;
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::LinuxCmd;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit, SpawnError};
use crate::fsutil::{self, kind_of, FsError};
use crate::identity::{self, IdentityError};
use crate::states::Ctx;

pub use crate::exec::BASE_PATH;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("working directory {0} does not exist")]
    NoCwd(AbsPath),
    #[error("working directory {path} is {found}, not a directory")]
    CwdNotADirectory { path: AbsPath, found: &'static str },
    #[error("parameter env: {0:?} is not a valid environment variable name")]
    EnvName(String),
    #[error("parameter env: the value of {0} contains a NUL byte")]
    EnvValue(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// What to do, once the parameters are checked.
enum Plan {
    Skip(String),
    Run(CommandSpec),
}

pub async fn apply(p: &LinuxCmd, ctx: &Ctx, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let spec = match plan(p, ctx, &mut changes) {
        Ok(Plan::Run(spec)) => spec,
        Ok(Plan::Skip(why)) => return Outcome::ok(format!("not run: {why}")),
        Err(e) => return super::finish("linux.cmd", Err(e), changes, &[]),
    };
    if crate::plan::active() {
        // The guards let it through: it would run. What it would change is known
        // only by running it.
        changes.push(Change::new("cmd", "ran"));
        let mut outcome = super::finish("linux.cmd", Ok::<(), CmdError>(()), changes, &[]);
        outcome.comment = format!(
            "would run {}: a command's effect cannot be known without running it (no if-path-present/if-path-absent guard stops it)",
            spec.display()
        );
        return outcome;
    }
    tracing::debug!(program = %spec.program.display(), uid = %spec.uid, cwd = %spec.cwd.display(), "running command");
    let finished = match exec::run(&spec, &mut cancel).await {
        Ok(f) => f,
        Err(e) => return super::finish("linux.cmd", Err(CmdError::from(e)), changes, &[]),
    };
    changes.push(Change::new("cmd", "ran"));
    let mut outcome = match finished.exit {
        Exit::Code(0) => Outcome::ok("command exited with status 0"),
        Exit::Code(n) => Outcome::failed(format!("command exited with status {n}")),
        Exit::Signal(s) => Outcome::failed(format!("command was killed by signal {}", signal_name(s))),
        Exit::TimedOut(d) => Outcome::failed(format!(
            "timed out after {} s; the command and every process it started were killed",
            d.as_secs()
        )),
        Exit::Cancelled => {
            let mut o = Outcome::failed("cancelled; the command and every process it started were killed");
            o.cancelled = true;
            o
        }
    };
    outcome.stdout = finished.output;
    outcome.changes = changes;
    outcome
}

fn plan(p: &LinuxCmd, ctx: &Ctx, changes: &mut Vec<Change>) -> Result<Plan, CmdError> {
    // Paths arrive validated by the catalogue's decode (absolute, normalised).
    let present: Vec<&AbsPath> = p.if_path_present.iter().flat_map(|a| a.iter()).collect();
    let absent: Vec<&AbsPath> = p.if_path_absent.iter().flat_map(|a| a.iter()).collect();
    let shell = p.shell.abs();
    let cwd = p.cwd.abs().clone();

    let user = identity::user(p.user.as_deref().unwrap_or("root"))?;
    let gid = match p.group.as_deref() {
        Some(g) => identity::group(g)?.gid,
        None => user.gid,
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), BASE_PATH.into()),
        ("HOME".into(), user.dir.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    for entry in p.env.iter().flat_map(|d| d.iter()) {
        let (key, value) = (entry.key.trim(), entry.value_or_empty());
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(CmdError::EnvName(key.to_string()));
        }
        if value.contains('\0') {
            return Err(CmdError::EnvValue(key.to_string()));
        }
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    // `[ -e p ]` semantics: a link counts when what it points to exists.
    if let Some(missing) = present.iter().find(|p| !p.as_path().exists()) {
        return Ok(Plan::Skip(format!("{missing} does not exist (if-path-present)")));
    }
    if let Some(found) = absent.iter().find(|p| p.as_path().exists()) {
        return Ok(Plan::Skip(format!("{found} exists (if-path-absent)")));
    }

    match std::fs::metadata(cwd.as_path()) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => return Err(CmdError::CwdNotADirectory { path: cwd, found: kind_of(m.file_type()) }),
        Err(_) if cwd == ctx.default_cwd => {
            fsutil::create_dirs(&cwd, fsutil::PARENT_DIR_MODE, (Uid::from_raw(0), Gid::from_raw(0)), changes)?
        }
        Err(_) => return Err(CmdError::NoCwd(cwd)),
    }

    Ok(Plan::Run(CommandSpec {
        program: PathBuf::from(shell.as_path()),
        args: vec!["-c".into(), p.cmd.0.clone().into()],
        cwd: cwd.as_path().to_path_buf(),
        env,
        uid: user.uid,
        gid,
        // 0 means no limit.
        timeout: (p.timeout > 0).then(|| Duration::from_secs(p.timeout)),
        stdin: None,
        reads_only: false,
        sandbox: None,
    }))
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use nix::unistd::Pid;

    use serde_json::{json, Value};
    use std::path::Path;

    fn cmd(raw: Value) -> LinuxCmd {
        crate::states::testutil::typed("linux.cmd", raw)
    }

    fn ctx(tmp: &Path) -> Ctx {
        let mut ctx = Ctx::new(tmp.join("state"));
        ctx.default_cwd = AbsPath::parse(&format!("{}/default/cwd", tmp.display())).unwrap();
        ctx
    }

    async fn run(raw: Value, ctx: &Ctx) -> Outcome {
        apply(&cmd(raw), ctx, Cancel::never()).await
    }

    /// Waits (bounded) until `file` holds a pid, as written by `echo $$$$ > file` (the
    /// catalogue renders `$$` to `$`, like the original's `safe_substitute`).
    async fn read_pid(file: &Path) -> Pid {
        for _ in 0..200 {
            if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()) {
                return Pid::from_raw(pid);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no pid in {}", file.display());
    }

    #[tokio::test]
    async fn runs_in_the_scrubbed_environment_and_reports_a_change() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        // Set by cargo for this test process: it must not reach the command.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let out = run(
            json!({"cmd": "env | sort; pwd", "cwd": tmp.path(), "env": [{"key": "EXTRA", "value": "1"}, {"key": "LANG", "value": "en_US.UTF-8"}]}),
            &ctx,
        )
        .await;
        assert!(out.result, "{out:?}");
        assert_eq!(out.changes, vec![Change::new("cmd", "ran")]);
        let vars: Vec<&str> = out.stdout.lines().filter(|l| l.contains('=')).collect();
        assert!(vars.contains(&format!("PATH={BASE_PATH}").as_str()), "{vars:?}");
        assert!(
            vars.contains(&"HOME=/root") && vars.contains(&"USER=root") && vars.contains(&"LOGNAME=root"),
            "{vars:?}"
        );
        assert!(vars.contains(&"EXTRA=1") && vars.contains(&"LANG=en_US.UTF-8"), "{vars:?}");
        assert!(!out.stdout.contains("CARGO_MANIFEST_DIR"), "{}", out.stdout);
        assert!(out.stdout.contains(&tmp.path().display().to_string()));
    }

    #[tokio::test]
    async fn failures_report_the_status_and_merge_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        let out = run(json!({"cmd": "echo out; echo err >&2; exit 3", "cwd": tmp.path()}), &ctx).await;
        assert!(!out.result);
        assert_eq!(out.comment, "command exited with status 3");
        assert_eq!(out.stdout, "out\nerr\n");
        let out = run(json!({"cmd": "kill -USR1 $$$$", "cwd": tmp.path()}), &ctx).await;
        assert_eq!(out.comment, "command was killed by signal SIGUSR1");
    }

    #[tokio::test]
    async fn runs_as_another_user() {
        let tmp = tempfile::tempdir().unwrap();
        let out = run(json!({"cmd": "id -u; id -g; echo $HOME", "user": "nobody", "cwd": "/"}), &ctx(tmp.path())).await;
        assert!(out.result, "{out:?}");
        assert_eq!(out.stdout, "65534\n65534\n/nonexistent\n");
        let out = run(json!({"cmd": "id -u", "user": "no-such-user-xyz", "cwd": "/"}), &ctx(tmp.path())).await;
        assert!(!out.result && out.comment == "unknown user \"no-such-user-xyz\"", "{out:?}");
    }

    #[tokio::test]
    async fn guards_block_without_running() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        let marker = tmp.path().join("ran");
        let there = tmp.path().display().to_string();
        let missing = tmp.path().join("missing");
        let script = format!("touch {}", marker.display());
        let out = run(json!({"cmd": script, "cwd": tmp.path(), "if-path-present": [there, missing]}), &ctx).await;
        assert!(out.result && out.changes.is_empty(), "{out:?}");
        assert!(out.comment.contains("missing does not exist (if-path-present)"), "{}", out.comment);
        let out = run(json!({"cmd": script, "cwd": tmp.path(), "if-path-absent": [missing, there]}), &ctx).await;
        assert!(out.result && out.changes.is_empty() && out.comment.contains("exists (if-path-absent)"), "{out:?}");
        assert!(!marker.exists());

        // Guard-style idempotency: the second run is blocked by what the first created.
        let guarded = json!({"cmd": script, "cwd": tmp.path(), "if-path-absent": [marker]});
        assert_eq!(run(guarded.clone(), &ctx).await.changes.len(), 1);
        assert!(run(guarded, &ctx).await.changes.is_empty());
    }

    #[tokio::test]
    async fn cwd_default_is_created_and_an_explicit_missing_cwd_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        let out = run(json!({"cmd": "pwd", "cwd": ctx.default_cwd.to_string()}), &ctx).await;
        assert!(out.result, "{out:?}");
        assert_eq!(out.stdout.trim(), ctx.default_cwd.to_string());
        // Two directories created, then the command.
        assert_eq!(out.changes.len(), 3, "{:?}", out.changes);
        let out = run(json!({"cmd": "pwd", "cwd": tmp.path().join("nope")}), &ctx).await;
        assert!(!out.result && out.comment.contains("does not exist"), "{out:?}");
        crate::states::testutil::refused("linux.cmd", json!({"cmd": "pwd", "cwd": "rel"}), "parameter \"cwd\"");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        let pidfile = tmp.path().join("pid");
        let script = format!("echo $$$$ > {}; sleep 600 & sleep 600 & wait", pidfile.display());
        let out = run(json!({"cmd": script, "cwd": tmp.path(), "timeout": 1}), &ctx).await;
        assert!(!out.result && !out.cancelled, "{out:?}");
        assert!(out.comment.starts_with("timed out after 1 s"), "{}", out.comment);
        let pgid = read_pid(&pidfile).await;
        assert_eq!(exec::group_members(pgid).unwrap(), vec![], "processes of group {pgid} survived");
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_process_group() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path());
        let pidfile = tmp.path().join("pid");
        let script = format!("echo $$$$ > {}; sleep 600 & sleep 600", pidfile.display());
        let p = cmd(json!({"cmd": script, "cwd": tmp.path()}));
        let (canceller, cancel) = crate::cancel::pair();
        let task = tokio::spawn(async move { apply(&p, &ctx, cancel).await });
        let pgid = read_pid(&pidfile).await;
        assert!(!exec::group_members(pgid).unwrap().is_empty());
        canceller.cancel();
        let out = tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap();
        assert!(out.cancelled && !out.result, "{out:?}");
        assert!(out.comment.starts_with("cancelled"), "{}", out.comment);
        assert_eq!(exec::group_members(pgid).unwrap(), vec![]);
    }

    #[tokio::test]
    async fn output_is_capped_with_a_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let out = run(
            json!({"cmd": "head -c 200000 /dev/zero | tr '\\0' a; echo; echo END", "cwd": tmp.path()}),
            &ctx(tmp.path()),
        )
        .await;
        assert!(out.result, "{}", out.comment);
        assert!(out.stdout.len() < exec::OUTPUT_CAP + 100, "{}", out.stdout.len());
        assert!(out.stdout.starts_with("aaaa"));
        assert!(out.stdout.ends_with("END\n"));
        let cut = 200_000 + 5 - exec::OUTPUT_CAP;
        assert!(out.stdout.contains(&format!("[… {cut} bytes cut …]")), "no marker");
    }

    #[tokio::test]
    async fn bad_env_names_fail_before_running() {
        crate::states::testutil::refused(
            "linux.cmd",
            json!({"cmd": "true", "cwd": "/", "env": [{"key": "A=B", "value": "x"}]}),
            "\"A=B\"",
        );
    }
}
