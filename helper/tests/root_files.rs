//! Files named by a recipe that a tool run as root reads by path (issue 15): the rpm
//! key, the virtualenv requirements file, git's ssh key, chef's configuration and
//! client key, supervisord's configuration, puppet's manifests. Each is used only when
//! root controls it (root-owned, not group/other-writable, no link, in root's
//! directories): a file the agent owns, or a link it planted towards a root-only file,
//! is refused before the tool runs. Needs root (files owned by another uid).

#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::params;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::{apply, chef, puppet, supervisord, Ctx, Step};
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::{ApplyRequest, Outcome};
use serde_json::{json, Value};

/// A directory under `/` that root controls, with an agent-owned file (uid 65534
/// stands for the agent) and a link to a root-only file planted in it.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            common::skip("root_files: SKIPPED, needs root");
            return None;
        }
        let dir = tempfile::Builder::new().prefix(".opsagent-test-rootfiles").tempdir_in("/").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, "root-only\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let agent = dir.path().join("agent-owned");
        fs::write(&agent, "written by the agent\n").unwrap();
        std::os::unix::fs::chown(&agent, Some(65534), Some(65534)).unwrap();
        symlink(&secret, dir.path().join("planted")).unwrap();
        Some(Self { dir })
    }

    fn agent(&self) -> PathBuf {
        self.dir.path().join("agent-owned")
    }

    fn planted(&self) -> PathBuf {
        self.dir.path().join("planted")
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

async fn run(module: &str, raw: Value, state_dir: &Path) -> Outcome {
    let req = ApplyRequest::new(StateId::parse("rf-1").unwrap(), 1, params(module, raw));
    match apply(&req, &Ctx::new(state_dir.to_path_buf()), Cancel::never()).await.unwrap() {
        Step::Done(o) => o,
        other => panic!("{other:?}"),
    }
}

fn refused(out: &Outcome, param: &str, why: &str) {
    assert!(!out.result, "{out:?}");
    assert!(out.comment.contains(&format!("parameter {param}:")) && out.comment.contains(why), "{}", out.comment);
    assert!(!out.comment.contains("root-only"), "the secret leaked: {}", out.comment);
}

#[tokio::test]
async fn rpm_key_requirements_file_and_ssh_key_must_be_roots() {
    let Some(t) = Tree::new() else { return };
    let sd = t.path().join("state");
    for (file, why) in [(t.agent(), "uid 65534"), (t.planted(), "symbolic link")] {
        let f = file.to_str().unwrap();
        refused(&run("linux.rpm.key", json!({"path": f}), &sd).await, "path", why);
        let venv = t.path().join("venv");
        let out = run("common.virtualenv", json!({"path": venv, "requirements-file": f}), &sd).await;
        refused(&out, "requirements-file", why);
        assert!(!venv.exists(), "nothing was created");
        let out = run(
            "common.git",
            json!({"path": t.path().join("co"), "repo": "ssh://git@127.0.0.1:1/x.git", "ssh-key-file": f}),
            &sd,
        )
        .await;
        refused(&out, "ssh-key-file", why);
    }
}

#[tokio::test]
async fn chef_supervisord_and_puppet_files_must_be_roots() {
    let Some(t) = Tree::new() else { return };
    // Stand-ins for the tools: they must never run.
    let ran = t.path().join("ran");
    let fake = t.path().join("tool");
    fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", ran.display())).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    for (file, why) in [(t.agent(), "uid 65534"), (t.planted(), "symbolic link")] {
        let f = file.to_str().unwrap();
        let ModuleParams::LinuxChefClient(c) =
            params("linux.chef.client", json!({"server": "https://chef.example.com/o", "client_key": f}))
        else {
            panic!()
        };
        refused(&chef::client_using(Some(fake.clone()), &c, Cancel::never()).await, "client_key", why);
        let ModuleParams::LinuxChefSolo(s) = params("linux.chef.solo", json!({"config": f})) else { panic!() };
        refused(&chef::solo_using(Some(fake.clone()), &s, Cancel::never()).await, "config", why);
        let ModuleParams::LinuxPuppetApply(p) = params("linux.puppet.apply", json!({"manifests": [f]})) else {
            panic!()
        };
        refused(&puppet::apply_using(Some(fake.clone()), &p, Cancel::never()).await, "manifests", why);
        let ModuleParams::LinuxSupervisord(p) = params("linux.supervisord", json!({"config": f, "name": ["x"]})) else {
            panic!()
        };
        let sup = supervisord::Supervisor {
            supervisord: fake.clone(),
            supervisorctl: fake.clone(),
            launch: supervisord::Launch::Direct,
        };
        let store = opsagent_helper::checksums::ChecksumStore::new(&t.path().join("state"));
        let out = supervisord::run(&p, &StateId::parse("rf-2").unwrap(), &store, &sup, Cancel::never()).await;
        refused(&out, "config", why);
    }
    assert!(!ran.exists(), "a tool ran with a file root does not control");
}
