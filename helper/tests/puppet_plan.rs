//! Plans (issue 19) of `linux.puppet.apply` against Debian's real Puppet: Puppet's own
//! noop run, in a sandbox where the host is read-only. A drift cycle — the managed file
//! absent → the plan names exactly that resource and nothing changes, neither the temp
//! tree nor Puppet's own directories (`/var/lib/puppet`, `/var/cache/puppet`,
//! `/etc/puppet`, and `/var/log/puppet`, `/run/puppet` where they exist: paths, kinds,
//! sizes, mtimes, modes, owners, content) → the apply creates it → a plan finds nothing
//! → a local edit is planned as a content change (the drifted plan is made through
//! `linux.puppet.run` `apply MANIFEST` too, with the same change); and a manifest whose noop run would
//! write (a resource marked `noop => false`, which Puppet applies even under `--noop`):
//! the write fails inside the sandbox, the plan fails naming it, the file never appears.
//!
//! The sandbox is the helper's where systemd is PID 1 (the real transient-unit runner,
//! `ProtectSystem=strict` and the rest: `helper/src/transient.rs`). Elsewhere, as on this
//! CI machine (a container whose PID 1 is not systemd, so no transient unit can run),
//! the test stands the runner in with the same confinement made by hand with the kernel's
//! own means: a private mount namespace (`unshare --mount`) in which every mount is
//! remounted read-only and `/tmp`, `/var/tmp` are fresh tmpfs, the capability bounding
//! set cut to the transient unit's (`setpriv`, no `CAP_SYS_ADMIN` to remount), no new
//! privileges, and a network namespace of its own for `apply`. (Its `AF_UNIX` ban is a
//! seccomp filter this stand-in does not make.) What is checked either way is the
//! helper's side: the noop command line, that Puppet works with its directories in the
//! private `/tmp`, the parsing of what it would change, and that the host stays as it was.
//!
//! Needs root and Debian's `puppet`; elsewhere a test says so and passes, unless
//! `OPSAGENT_TEST_NO_SKIP=1`. Each Puppet run takes seconds: two tests only, one at a
//! time (the apply of one changes `/var/cache/puppet`, which the other's walk compares).
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::typed;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::exec::{CommandSpec, Direct, Label, RunFuture, Runner, Sandbox, Scope};
use opsagent_helper::plan::Plan;
use opsagent_helper::states::puppet;
use opsagent_proto::catalogue::{LinuxPuppetApply, LinuxPuppetRun};
use opsagent_proto::request::Outcome;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Puppet's own directories on Debian, which its noop run writes when not sandboxed.
const PUPPET_DIRS: &[&str] = &["/var/lib/puppet", "/var/cache/puppet", "/etc/puppet", "/var/log/puppet", "/run/puppet"];

/// One test at a time: see the module documentation.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sets up the stand-in's confinement, then runs `"$@"` in it; any step that fails
/// stops it before the command runs (`set -e`).
const CONFINE: &str = r#"set -eu
mount --make-rprivate /
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  case "$m" in /dev|/dev/pts|/dev/shm) continue;; esac
  mount -o remount,bind,ro "$m" </dev/null
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
exec setpriv --bounding-set=-all,+chown,+dac_override,+dac_read_search,+fowner,+setgid,+setuid --no-new-privs -- "$@"
"#;

/// Where systemd is not PID 1: runs a sandboxed command confined as described above,
/// through the helper's real direct runner; anything else directly.
struct Confined;

impl Runner for Confined {
    fn name(&self) -> &'static str {
        "test-confined"
    }

    fn enforces_sandbox(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, spec: &'a CommandSpec, label: Option<&'a Label>, cancel: &'a mut Cancel) -> RunFuture<'a> {
        Box::pin(async move {
            let Some(Sandbox::ReadOnlyHost { network }) = spec.sandbox else {
                return Direct.run(spec, label, cancel).await;
            };
            let mut args: Vec<std::ffi::OsString> = ["--mount", "--propagation", "private"].map(Into::into).into();
            if !network {
                args.push("--net".into());
            }
            args.extend(["--", "/bin/sh", "-c", CONFINE, "sh"].map(Into::into));
            args.push(spec.program.clone().into());
            args.extend(spec.args.iter().cloned());
            let confined = CommandSpec { program: "/usr/bin/unshare".into(), args, sandbox: None, ..spec.clone() };
            Direct.run(&confined, label, cancel).await
        })
    }
}

/// The runner a plan gets: the helper's own transient units where systemd can start
/// them, the stand-in otherwise.
fn sandboxing_runner() -> Arc<dyn Runner> {
    if opsagent_helper::systemd::booted() {
        Arc::new(opsagent_helper::transient::Transient::system())
    } else {
        Arc::new(Confined)
    }
}

/// Puppet, or `None` after saying why the test cannot run here.
fn puppet_or_skip(test: &str) -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        common::skip(&format!("{test}: SKIPPED, needs root (puppet reads manifests root controls, as root)"));
        return None;
    }
    let found = opsagent_helper::states::storage::find_tool("puppet", &["/opt/puppetlabs/bin"]);
    if found.is_none() {
        common::skip(&format!("{test}: SKIPPED, puppet is not installed (apt-get install -y puppet)"));
    }
    found
}

/// Everything below `root`: kind, size, mtime, mode, owner, content.
fn walk(root: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        let what = if m.is_dir() {
            pending.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            "dir".to_string()
        } else if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else if m.is_file() {
            format!("file {}", hex::encode(Sha256::digest(std::fs::read(&p).unwrap())))
        } else {
            "other".to_string()
        };
        let when = format!("{}.{:09}", m.mtime(), m.mtime_nsec());
        out.insert(p, format!("{what} size {} mtime {when} {:o} {}:{}", m.len(), m.mode() & 0o7777, m.uid(), m.gid()));
    }
}

/// The temp tree and Puppet's directories.
fn host(tree: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(tree, &mut out);
    for dir in PUPPET_DIRS {
        walk(Path::new(dir), &mut out);
    }
    out
}

fn words(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// A plan of `p` as the helper's dispatch makes it, commands run by `runner`: no write
/// refused by the guard, and the host exactly as before.
async fn plan(p: &LinuxPuppetApply, program: &Path, tree: &Path, runner: Arc<dyn Runner>) -> Outcome {
    let cancel = Cancel::never().with_scope(Arc::new(Scope::with_runner(runner)));
    planned_state(tree, puppet::apply_using(Some(program.to_path_buf()), p, cancel)).await
}

/// [`plan`] of any state's future (`linux.puppet.run`).
async fn planned_state(tree: &Path, state: impl std::future::Future<Output = Outcome>) -> Outcome {
    let before = host(tree);
    let plan = Plan::new();
    let out = opsagent_helper::plan::scope(Some(Arc::clone(&plan)), state).await;
    assert_eq!(plan.refused(), None, "the plan stopped at a write: {out:?}");
    let after = host(tree);
    let differ: Vec<_> = after.iter().filter(|(p, v)| before.get(*p) != Some(v)).collect();
    let gone: Vec<_> = before.keys().filter(|p| !after.contains_key(*p)).collect();
    assert!(differ.is_empty() && gone.is_empty(), "the plan wrote {differ:?}, removed {gone:?}\n{out:?}");
    opsagent_helper::states::planned(out, None, "linux.puppet.apply")
}

/// A temp dir under `/`, root's: puppet (as root) reads only manifests root controls.
fn root_tree() -> tempfile::TempDir {
    tempfile::Builder::new().prefix(".opsagent-test-puppet-plan").tempdir_in("/").unwrap()
}

#[tokio::test]
async fn puppet_apply_drift_cycle_in_the_sandbox() {
    let Some(program) = puppet_or_skip("puppet_apply_drift_cycle_in_the_sandbox") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = root_tree();
    let target = dir.path().join("motd");
    let manifest = dir.path().join("site.pp");
    let content = "managed by puppet\n";
    std::fs::write(&manifest, format!("file {{ '{}': content => \"managed by puppet\\n\" }}\n", target.display()))
        .unwrap();
    let p: LinuxPuppetApply = typed("linux.puppet.apply", json!({"manifests": [manifest]}));
    let resource = format!("File[{}]", target.display());

    // Drifted: the file is missing.
    let planned = plan(&p, &program, dir.path(), sandboxing_runner()).await;
    assert!(planned.result && planned.planned, "{planned:?}");
    assert_eq!(words(&planned), [format!("{resource}: ensure absent -> file")], "{}", planned.stdout);
    assert_eq!(planned.comment, format!("{resource}: ensure absent -> file"));
    assert!(!target.exists());
    // The same run through linux.puppet.run: planned by the same noop.
    let r: LinuxPuppetRun = typed("linux.puppet.run", json!({"arguments": [{"key": "apply"}, {"key": manifest}]}));
    let cancel = Cancel::never().with_scope(Arc::new(Scope::with_runner(sandboxing_runner())));
    let run = planned_state(dir.path(), puppet::run_using(Some(program.clone()), &r, cancel)).await;
    assert!(run.result, "{run:?}");
    assert_eq!(words(&run), words(&planned), "{run:?}");

    // The apply (for real, no sandbox) makes it.
    let applied = puppet::apply_using(Some(program.clone()), &p, Cancel::never()).await;
    assert!(applied.result, "{applied:?}");
    assert_eq!(words(&applied), [format!("puppet apply {}: applied changes", manifest.display())]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), content);

    // Converged: nothing would change.
    let again = plan(&p, &program, dir.path(), sandboxing_runner()).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert_eq!(again.comment, "puppet apply: nothing to change");

    // Edited by hand: the content change, in Puppet's checksums.
    std::fs::write(&target, "local edit\n").unwrap();
    let edited = plan(&p, &program, dir.path(), sandboxing_runner()).await;
    let sha = |s: &str| format!("{{sha256}}{}", hex::encode(Sha256::digest(s.as_bytes())));
    assert_eq!(
        words(&edited),
        [format!("{resource}: content {} -> {}", sha("local edit\n"), sha(content))],
        "{}",
        edited.stdout
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "local edit\n");
}

#[tokio::test]
async fn a_noop_run_that_would_write_fails_inside_the_sandbox() {
    let Some(program) = puppet_or_skip("a_noop_run_that_would_write_fails_inside_the_sandbox") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = root_tree();
    let escaped = dir.path().join("escaped");
    let planned_file = dir.path().join("planned");
    let manifest = dir.path().join("site.pp");
    // `noop => false`: Puppet applies this resource even in a `--noop` run.
    std::fs::write(
        &manifest,
        format!(
            "file {{ '{}': content => \"x\\n\", noop => false }}\nfile {{ '{}': content => \"y\\n\" }}\n",
            escaped.display(),
            planned_file.display()
        ),
    )
    .unwrap();
    let p: LinuxPuppetApply = typed("linux.puppet.apply", json!({"manifests": [manifest]}));

    let out = plan(&p, &program, dir.path(), sandboxing_runner()).await;
    assert!(!escaped.exists() && !planned_file.exists(), "the noop run wrote to the host: {out:?}");
    assert!(!out.result, "{out:?}");
    assert!(out.comment.starts_with("the noop run `"), "{}", out.comment);
    assert!(out.comment.contains("some resources failed"), "{}", out.comment);
    assert!(out.stdout.contains("Read-only file system"), "{}", out.stdout);

    // The helper's direct runner (no systemd) cannot sandbox: the plan runs nothing and
    // says so, instead of running the noop on the open host.
    let out = plan(&p, &program, dir.path(), Arc::new(Direct)).await;
    assert!(out.result && !escaped.exists(), "{out:?}");
    assert_eq!(words(&out), [format!("puppet apply {}: would run", manifest.display())]);
    assert!(out.comment.contains(": cannot plan without a sandbox"), "{}", out.comment);
    assert!(out.stdout.is_empty(), "puppet ran: {}", out.stdout);
}
