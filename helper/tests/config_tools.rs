//! `linux.puppet.*` and `linux.chef.*`: the documented failure without the tool, the
//! exact command lines against a *recorded exchange* (a stand-in executable that writes
//! down the arguments it got and answers with output and an exit status recorded from
//! the real tool), and, where Debian's `puppet` package is installed, real
//! `puppet apply` runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns
#![allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::params;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::{chef, puppet};
use opsagent_proto::catalogue::ModuleParams;
use serde_json::json;

/// A recorded exchange: a script that appends its arguments (one per line, then `--`)
/// to `argv.log` and answers with `output` and `status`.
fn recorded_exchange(dir: &Path, name: &str, output: &str, status: i32) -> PathBuf {
    let script = dir.join(name);
    let log = dir.join("argv.log");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{}'; done\necho -- >> '{}'\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n",
            log.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn recorded_argv(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("argv.log")).unwrap_or_default();
    text.split("--\n").filter(|c| !c.is_empty()).map(|c| c.lines().map(String::from).collect()).collect()
}

#[tokio::test]
async fn missing_tools_fail_with_the_documented_message() {
    let ModuleParams::LinuxPuppetAgent(a) = params("linux.puppet.agent", json!({"server": "puppet"})) else { panic!() };
    let out = puppet::agent_using(None, &a, Cancel::never()).await;
    assert_eq!(
        (out.result, out.comment.as_str()),
        (false, "puppet is not installed; install it with a package state first")
    );
    let ModuleParams::LinuxPuppetApply(p) = params("linux.puppet.apply", json!({"manifests": ["/x.pp"]})) else {
        panic!()
    };
    assert_eq!(puppet::apply_using(None, &p, Cancel::never()).await.comment, puppet::not_installed("puppet"));
    let ModuleParams::LinuxPuppetRun(r) = params("linux.puppet.run", json!({})) else { panic!() };
    assert!(!puppet::run_using(None, &r, Cancel::never()).await.result);
    let ModuleParams::LinuxChefClient(c) = params("linux.chef.client", json!({"server": "https://chef"})) else {
        panic!()
    };
    let out = chef::client_using(None, &c, Cancel::never()).await;
    assert_eq!(out.comment, "chef-client is not installed; install it with a package state first");
    let ModuleParams::LinuxChefSolo(s) = params("linux.chef.solo", json!({})) else { panic!() };
    assert_eq!(
        chef::solo_using(None, &s, Cancel::never()).await.comment,
        "chef-solo is not installed; install it with a package state first"
    );
    // Chef is not a Debian package: on this machine the real lookup finds nothing.
    if opsagent_helper::states::storage::find_tool("chef-client", &["/opt/chef/bin", "/opt/cinc/bin"]).is_none() {
        assert!(chef::client(&c, Cancel::never()).await.comment.starts_with("chef-client is not installed"));
    }
}

#[tokio::test]
async fn puppet_command_lines_against_a_recorded_exchange() {
    let dir = tempfile::tempdir().unwrap();
    // Recorded from `puppet agent` with changes (--detailed-exitcodes: 2).
    let fake = recorded_exchange(dir.path(), "puppet", "Notice: Applied catalog in 0.52 seconds", 2);
    let ModuleParams::LinuxPuppetAgent(a) = params(
        "linux.puppet.agent",
        json!({"server": "puppet.example.com", "arguments": [{"key": "environment", "value": "prod"}, {"key": "noop"}]}),
    ) else {
        panic!()
    };
    let out = puppet::agent_using(Some(fake.clone()), &a, Cancel::never()).await;
    assert!(out.result, "{out:?}");
    assert_eq!(out.changes.len(), 1);
    assert_eq!(out.comment, "puppet agent: applied changes");
    assert!(out.stdout.contains("Applied catalog"));

    // Two manifests and no arguments: each applied once (the original applied none).
    let ModuleParams::LinuxPuppetApply(p) =
        params("linux.puppet.apply", json!({"manifests": ["/srv/a.pp", "/srv/b.pp"]}))
    else {
        panic!()
    };
    let out = puppet::apply_using(Some(fake.clone()), &p, Cancel::never()).await;
    assert!(out.result && out.changes.len() == 2, "{out:?}");
    let ModuleParams::LinuxPuppetRun(r) =
        params("linux.puppet.run", json!({"arguments": [{"key": "resource"}, {"key": "user"}, {"key": "root"}]}))
    else {
        panic!()
    };
    // Without --detailed-exitcodes, 2 is a failure.
    let out = puppet::run_using(Some(fake), &r, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("exited with status 2"), "{out:?}");

    let argv = recorded_argv(dir.path());
    assert_eq!(
        argv[0],
        [
            "agent",
            "--onetime",
            "--no-daemonize",
            "--verbose",
            "--no-splay",
            "--detailed-exitcodes",
            "--color=false",
            "--server=puppet.example.com",
            "--environment=prod",
            "--noop"
        ]
    );
    assert_eq!(argv[1], ["apply", "--detailed-exitcodes", "--color=false", "/srv/a.pp"]);
    assert_eq!(argv[2], ["apply", "--detailed-exitcodes", "--color=false", "/srv/b.pp"]);
    assert_eq!(argv[3], ["resource", "user", "root"]);
}

#[tokio::test]
async fn chef_command_lines_against_a_recorded_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let closing = "Chef Infra Client finished, 2/7 resources updated in 03 seconds";
    let fake = recorded_exchange(dir.path(), "chef-client", closing, 0);
    let ModuleParams::LinuxChefClient(c) = params(
        "linux.chef.client",
        json!({"server": "https://chef.example.com/organizations/ops", "config": "/etc/chef/client.rb",
               "arguments": [{"key": "chef-license", "value": "accept"}, {"key": "once"}]}),
    ) else {
        panic!()
    };
    let out = chef::client_using(Some(fake), &c, Cancel::never()).await;
    assert!(out.result, "{out:?}");
    assert_eq!(out.comment, "chef-client: 2 resource(s) updated");
    let unchanged = recorded_exchange(dir.path(), "chef-solo", "Chef Infra Client finished, 0/7 resources updated", 0);
    let ModuleParams::LinuxChefSolo(s) = params("linux.chef.solo", json!({"recipe_url": "https://x/r.tgz"})) else {
        panic!()
    };
    let out = chef::solo_using(Some(unchanged), &s, Cancel::never()).await;
    assert!(out.result && out.changes.is_empty(), "{out:?}");
    let failing = recorded_exchange(dir.path(), "chef-fail", "FATAL: Chef::Exceptions::ChildConvergeError", 1);
    let out = chef::solo_using(Some(failing), &s, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("exited with status 1: FATAL"), "{out:?}");

    let argv = recorded_argv(dir.path());
    assert_eq!(
        argv[0],
        [
            "-S",
            "https://chef.example.com/organizations/ops",
            "-c",
            "/etc/chef/client.rb",
            "--chef-license",
            "accept",
            "--once"
        ]
    );
    assert_eq!(argv[1], ["-r", "https://x/r.tgz"]);
}

#[tokio::test]
async fn real_puppet_apply_when_puppet_is_installed() {
    let Some(program) = opsagent_helper::states::storage::find_tool("puppet", &["/opt/puppetlabs/bin"]) else {
        common::skip("puppet: SKIPPED the real run, puppet is not installed (apt-get install -y puppet)");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        common::skip("puppet: SKIPPED the real run, needs root");
        return;
    }
    // Under /, root's: puppet (as root) reads only manifests root controls.
    let dir = tempfile::Builder::new().prefix(".opsagent-test-puppet").tempdir_in("/").unwrap();
    let target = dir.path().join("motd");
    let manifest = dir.path().join("site.pp");
    std::fs::write(&manifest, format!("file {{ '{}': content => \"managed by puppet\\n\" }}\n", target.display()))
        .unwrap();
    let ModuleParams::LinuxPuppetApply(p) = params("linux.puppet.apply", json!({"manifests": [manifest]})) else {
        panic!()
    };
    let first = puppet::apply_using(Some(program.clone()), &p, Cancel::never()).await;
    assert!(first.result && first.changes.len() == 1, "{first:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "managed by puppet\n");
    let second = puppet::apply_using(Some(program.clone()), &p, Cancel::never()).await;
    assert!(second.result && second.changes.is_empty(), "{second:?}");

    let broken = dir.path().join("broken.pp");
    std::fs::write(&broken, "file { '/nonexistent-dir-opsagent/x': content => 'x' }\n").unwrap();
    let ModuleParams::LinuxPuppetApply(b) = params("linux.puppet.apply", json!({"manifests": [broken, manifest]}))
    else {
        panic!()
    };
    let out = puppet::apply_using(Some(program), &b, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("some resources failed"), "{out:?}");
}
