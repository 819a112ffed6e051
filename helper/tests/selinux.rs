//! `linux.selinux` on a kernel running SELinux: issue 19's drift cycles (plan -> apply ->
//! plan) of a boolean and of the persisted mode line of /etc/selinux/config.
//!
//! No CI host runs SELinux, so the test is ignored there. `tests/vm/run.sh` (its `selinux`
//! part) runs it with `--ignored` in a Debian VM booted with `security=selinux selinux=1
//! enforcing=0` and Debian's default policy loaded (permissive mode); each cycle prints a
//! `selinux-vmtest: plan cycle ...` line that the harness looks for. It changes the host's
//! SELinux configuration: run it nowhere else.
// The harness reads SELinux with its own tools; the state under test runs them through exec.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::process::Command;

use common::params;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::selinux;
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::request::Outcome;
use serde_json::json;

fn must(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

/// A plan of `work` as the helper's dispatch makes it (as in helper/tests/storage.rs).
async fn plan_of(work: impl std::future::Future<Output = Outcome>) -> Outcome {
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), work).await;
    opsagent_helper::states::planned(out, plan.refused(), "linux.selinux")
}

fn change_lines(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// What the state could change: the running mode, every boolean's current and pending
/// value, the config file, and the policy store's files (what `setsebool -P` rewrites).
fn selinux_view() -> String {
    let store =
        must("sh", &["-c", "find /etc/selinux /var/lib/selinux -type f -print0 | sort -z | xargs -0 sha256sum"]);
    let booleans = must("sh", &["-c", "cd /sys/fs/selinux/booleans && grep -H . *"]);
    format!("{}\n{booleans}\n{store}", must("getenforce", &[]))
}

/// The lines of `after` not in `before` and the other way round (the view is long: every
/// boolean and every file of the policy store).
fn differences(before: &str, after: &str) -> String {
    let gone = before.lines().filter(|l| !after.lines().any(|a| a == *l)).map(|l| format!("- {l}"));
    let new = after.lines().filter(|l| !before.lines().any(|b| b == *l)).map(|l| format!("+ {l}"));
    gone.chain(new).collect::<Vec<_>>().join("\n")
}

/// drift -> plan (exactly `want`, the view unchanged) -> apply (the same) -> plan (nothing).
async fn cycle(p: &ModuleParams, want: &[String]) {
    let ModuleParams::LinuxSelinux(p) = p else { panic!("not linux.selinux") };
    let before = selinux_view();
    let planned = plan_of(selinux::apply(p, Cancel::never())).await;
    assert!(planned.result && planned.planned, "{planned:?}");
    assert_eq!(change_lines(&planned), want, "the plan");
    let after = selinux_view();
    assert!(after == before, "the plan changed SELinux:\n{}", differences(&before, &after));
    let applied = selinux::apply(p, Cancel::never()).await;
    assert!(applied.result, "apply failed: {applied:?}");
    assert_eq!(change_lines(&applied), want, "the apply did not make the planned change");
    let again = plan_of(selinux::apply(p, Cancel::never())).await;
    assert!(again.result && again.planned && again.changes.is_empty(), "plan after the apply: {again:?}");
    eprintln!("selinux-vmtest: plan cycle linux.selinux: {want:?} planned, applied, then nothing to plan");
}

#[tokio::test]
#[ignore = "needs a kernel running SELinux: the selinux part of tests/vm/run.sh runs it"]
async fn plan_apply_plan_cycles_of_a_boolean_and_the_persisted_mode() {
    assert_eq!(must("getenforce", &[]).trim(), "Permissive", "the VM boots SELinux permissive");

    // A boolean that is off, switched on for the running policy (persist false: no
    // policy rebuild).
    let all = must("getsebool", &["-a"]);
    let name = all
        .lines()
        .find_map(|l| l.strip_suffix(" --> off"))
        .unwrap_or_else(|| panic!("no boolean is off: {all}"))
        .trim()
        .to_string();
    let p = params("linux.selinux", json!({"boolean": [{"key": name, "value": "on"}], "persist": false}));
    cycle(&p, &[format!("SELinux boolean {name}: off -> on")]).await;
    assert_eq!(must("getsebool", &[&name]).trim(), format!("{name} --> on"));

    // The persisted mode: the config drifted to enforcing while the kernel runs permissive;
    // the plan names the line, the running mode is already right.
    let config = std::fs::read_to_string(selinux::CONFIG).unwrap();
    let drifted = selinux::with_config_mode(&config, "enforcing");
    std::fs::write(selinux::CONFIG, &drifted).unwrap();
    let p = params("linux.selinux", json!({"mode": "permissive"}));
    cycle(&p, &[format!("{}: SELINUX=enforcing -> permissive", selinux::CONFIG)]).await;
    let now = std::fs::read_to_string(selinux::CONFIG).unwrap();
    assert_eq!(now, selinux::with_config_mode(&drifted, "permissive"), "only the SELINUX= line changed");
    assert_eq!(must("getenforce", &[]).trim(), "Permissive");
}
