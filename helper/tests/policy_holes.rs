//! Issue 15, item 3: with `linux.cmd` left out of `modules` and `write_prefixes` set, no
//! module may run code as root or write outside the prefixes. One test per hole that
//! was reproduced, each against a real helper with that restrictive policy; every one
//! of them got an outcome (or a download request) instead of a refusal before states
//! declared their footprints.
//!
//! These tests need root, as the helper does.

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)

mod policy_support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use opsagent_proto::request::{ErrorCode, Reply};
use policy_support::{Client, Helper};
use serde_json::{json, Value};

/// Every module of the reproduced holes is granted, `linux.cmd` is not, and states
/// may write under `<dir>/allowed` only.
fn restrictive(dir: &Path) -> String {
    fs::create_dir(dir.join("allowed")).unwrap();
    fs::create_dir(dir.join("outside")).unwrap();
    format!(
        "modules = linux.file linux.dir common.archive common.virtualenv linux.apt.package linux.cronjob \
         linux.mount linux.user linux.group linux.supervisord linux.puppet.apply linux.chef.solo \
         linux.docker.running common.pip.package common.npm.package common.gem.package\n\
         write_prefixes = {}\n",
        dir.join("allowed").display()
    )
}

async fn helper() -> (Helper, Client) {
    let h = Helper::start(restrictive).await;
    let c = Client::connect(&h.sock).await;
    (h, c)
}

/// The request is denied by the policy, with `needle` in the reason, and the
/// reason is in the helper's log.
async fn assert_denied(h: &Helper, c: &mut Client, module: &str, raw: Value, patch: &[(&str, Value)], needle: &str) {
    let state = format!("hole-{}", module.replace('.', "-"));
    match c.apply(&state, module, raw.clone(), patch).await {
        Some(Reply::Error(e)) if e.code == ErrorCode::Denied => {
            assert!(e.message.contains(needle), "{module} {raw}: denied, but for {:?}", e.message);
            let logged = h.wait_for_log(&["request refused", "result=\"denied\"", &state, needle]).await;
            assert!(logged.is_ok(), "{module}: the reason is not in the log:\n{}", logged.unwrap_err());
        }
        other => panic!("{module} {raw}: not denied by the policy: {other:?}"),
    }
}

#[tokio::test]
async fn archive_outside_the_prefixes_is_denied() {
    let (h, mut c) = helper().await;
    let raw = json!({"path": h.path("outside/app"), "source": "https://example.com/app.tgz"});
    assert_denied(&h, &mut c, "common.archive", raw, &[], "not under the policy's `write_prefixes`").await;
    let raw = json!({"path": "/var/www", "source": "https://example.com/www.tgz"});
    assert_denied(&h, &mut c, "common.archive", raw, &[], "would write /var/www,").await;
    // Where root finds code, the write is command-equivalent before it is a path.
    let raw = json!({"path": "/etc", "source": "https://example.com/etc.tgz"});
    assert_denied(&h, &mut c, "common.archive", raw, &[], "files in /etc/cron.d (root runs").await;
}

#[tokio::test]
async fn virtualenv_python_bin_inside_a_prefix_is_not_run() {
    let (h, mut c) = helper().await;
    // What a compromised daemon writes first with linux.file (granted under the prefix).
    let evil = h.path("allowed/evil");
    let marker = h.path("ran-as-root");
    fs::write(&evil, format!("#!/bin/sh\nid -u > {}\nexit 1\n", marker.display())).unwrap();
    fs::set_permissions(&evil, fs::Permissions::from_mode(0o755)).unwrap();
    let raw = json!({"path": h.path("allowed/venv"), "python-bin": evil});
    assert_denied(&h, &mut c, "common.virtualenv", raw, &[], "is not in the policy's `interpreters`").await;
    assert!(!marker.exists(), "the file named as python-bin ran");
    // A requirements file runs setup scripts as root: command-equivalent.
    let raw = json!({"path": h.path("allowed/venv"), "requirements-file": h.path("allowed/req.txt")});
    assert_denied(&h, &mut c, "common.virtualenv", raw, &[], "command-equivalent").await;
}

#[tokio::test]
async fn a_local_deb_is_command_equivalent() {
    let (h, mut c) = helper().await;
    let deb = h.path("allowed/evil_1.0_all.deb");
    fs::write(&deb, "not really a package").unwrap();
    let raw = json!({"name": [{"key": "evil", "value": deb}]});
    assert_denied(&h, &mut c, "linux.apt.package", raw, &[], "command-equivalent").await;
    let raw = json!({"name": [{"key": "evil", "value": format!("file://{}", deb.display())}]});
    assert_denied(&h, &mut c, "linux.apt.package", raw, &[], "command-equivalent").await;
    // Without signature checks any package source can feed root a maintainer script.
    let raw = json!({"name": [{"key": "nginx"}], "verify-gpg": false});
    assert_denied(&h, &mut c, "linux.apt.package", raw, &[], "unsigned apt packages").await;
}

#[tokio::test]
async fn a_cron_job_is_command_equivalent() {
    let (h, mut c) = helper().await;
    let raw = json!({"cmd": ["id > /tmp/pwned"], "user": "root", "minute": "*"});
    assert_denied(&h, &mut c, "linux.cronjob", raw, &[], "would run a cron job as root, which is a command").await;
}

#[tokio::test]
async fn bind_and_loop_mounts_need_a_grant() {
    let (h, mut c) = helper().await;
    let target = h.path("allowed/etc");
    let raw = json!({"device": h.path("outside"), "filesystem": "none", "opts": "bind", "path": target});
    assert_denied(&h, &mut c, "linux.mount", raw, &[], "would make a bind mount").await;
    let image = h.path("allowed/disk.img");
    fs::write(&image, vec![0u8; 4096]).unwrap();
    // No `loop` option: mount(8) loops a regular file by itself.
    let raw = json!({"device": image, "filesystem": "ext4", "path": h.path("allowed/img")});
    assert_denied(&h, &mut c, "linux.mount", raw, &[], "would make a loop mount").await;
    assert!(!Path::new(&target).exists() || fs::read_dir(&target).unwrap().next().is_none());
}

#[tokio::test]
async fn set_id_modes_need_a_grant() {
    let (h, mut c) = helper().await;
    let bin = h.path("allowed/rootshell");
    let raw = json!({"path": bin, "content": "#!/bin/sh\n", "mode": "04755", "user": "root"});
    assert_denied(&h, &mut c, "linux.file", raw, &[], "set-user-id or set-group-id mode").await;
    let raw = json!({"path": bin, "content": "#!/bin/sh\n", "mode": "02755"});
    assert_denied(&h, &mut c, "linux.file", raw, &[], "set-user-id or set-group-id mode").await;
    // A mode the catalogue refuses (above 07777), sent raw: refused when the helper
    // decodes it, before the policy (or the module) sees it.
    let raw = json!({"path": bin, "content": "#!/bin/sh\n"});
    match c.apply("hole-mode", "linux.file", raw.clone(), &[("mode", json!(0o17755))]).await {
        Some(Reply::Error(e)) if e.code == ErrorCode::InvalidParameter => {
            assert!(e.message.contains("\"mode\""), "{}", e.message)
        }
        other => panic!("linux.file {raw} with mode 0o17755: not refused: {other:?}"),
    }
    assert!(fs::symlink_metadata(&bin).map_or(true, |m| m.mode() & 0o6000 == 0), "a set-id file was made");
}

#[tokio::test]
async fn supervisord_puppet_chef_and_docker_are_command_equivalent() {
    let (h, mut c) = helper().await;
    let conf = h.path("allowed/supervisord.conf");
    for (module, raw) in [
        ("linux.supervisord", json!({"config": conf, "name": ["evil"]})),
        ("linux.puppet.apply", json!({"manifests": [h.path("allowed/site.pp")]})),
        ("linux.chef.solo", json!({"config": h.path("allowed/solo.rb")})),
        (
            "linux.docker.running",
            json!({"container": "c", "image": "alpine", "binds": [{"key": "/", "value": "/host"}]}),
        ),
        (
            "linux.docker.running",
            json!({"container": "c", "image": "alpine", "volumes": [{"key": "/etc", "value": "/x"}]}),
        ),
        (
            "linux.docker.running",
            json!({"container": "c", "image": "alpine", "files": [{"key": "/x", "value": "/etc/shadow"}]}),
        ),
    ] {
        assert_denied(&h, &mut c, module, raw, &[], "command-equivalent").await;
    }
}

#[tokio::test]
async fn accounts_with_uid_0_root_or_privileged_groups_need_a_grant() {
    let (h, mut c) = helper().await;
    for (raw, needle) in [
        (json!({"username": "toor", "password": "x", "uid": "0"}), "uid 0"),
        (json!({"username": "toor", "password": "x", "gid": "0"}), "gid 0"),
        (json!({"username": "root", "password": "$6$known"}), "the root account"),
        (json!({"username": "nobody", "password": "x", "groups": ["sudo"]}), "privileged group sudo"),
        (json!({"username": "nobody", "password": "x", "groups": ["users", "docker"]}), "privileged group docker"),
        (json!({"username": "nobody", "password": "x", "groups": ["opsagent"]}), "privileged group opsagent"),
    ] {
        assert_denied(&h, &mut c, "linux.user", raw, &[], needle).await;
    }
    assert_denied(
        &h,
        &mut c,
        "linux.group",
        json!({"groupname": "sudo", "gid": "65534"}),
        &[],
        "privileged group sudo",
    )
    .await;
    assert_denied(&h, &mut c, "linux.group", json!({"groupname": "g", "gid": "0"}), &[], "gid 0").await;
    // Home directories are paths the state writes.
    let raw = json!({"username": "u", "password": "x", "home": "/var/lib/u"});
    assert_denied(&h, &mut c, "linux.user", raw, &[], "would write /var/lib/u,").await;
}

#[tokio::test]
async fn pip_npm_and_gem_installs_are_command_equivalent() {
    let (h, mut c) = helper().await;
    for module in ["common.pip.package", "common.npm.package", "common.gem.package"] {
        assert_denied(&h, &mut c, module, json!({"name": [{"key": "evil"}]}), &[], "install scripts").await;
    }
}

#[tokio::test]
async fn what_the_policy_grants_still_runs() {
    let (h, mut c) = helper().await;
    let file = h.path("allowed/app.conf");
    match c.apply("ok", "linux.file", json!({"path": file, "content": "x\n", "mode": "0640"}), &[]).await {
        Some(Reply::Outcome(o)) => assert!(o.result && o.changed(), "{o:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::metadata(&file).unwrap().mode() & 0o7777, 0o640);
}
