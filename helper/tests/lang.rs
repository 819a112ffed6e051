//! `common.pip.package`, `common.npm.package`, `common.gem.package` and
//! `common.virtualenv` against the real tools, without touching the host's packages:
//! - pip: the real PyPI, into a virtualenv made by the test (`six` 1.15.0 → 1.16.0 →
//!   latest → removed);
//! - npm: the real npm registry, under a temporary `path` (`is-number` 7.0.0 → 6.0.0 →
//!   latest → removed), with its own cache;
//! - gem: no network; gems built by the test (`gem build`) served from a local
//!   `file://` source (`gem generate_index`), installed into a private `GEM_HOME`;
//! - virtualenv: created by the state, with a requirements file from PyPI.
//!
//! Needs: python3 with venv and pip (Debian python3-venv python3-pip), npm, ruby (gem);
//! `.ci/run` installs them. Network access to pypi.org and registry.npmjs.org.
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run_ok, typed};
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::lang::{gem, npm, pip, virtualenv};
use opsagent_helper::states::storage::find_tool;
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::Outcome;
use serde_json::{json, Value};

fn need(tool: &str, package: &str) -> PathBuf {
    find_tool(tool, &[]).unwrap_or_else(|| panic!("{tool} is missing: apt-get install -y {package}"))
}

fn changes(out: &Outcome) -> Vec<String> {
    assert!(out.result, "state failed: {}\n{}", out.comment, out.stdout);
    out.changes.iter().map(ToString::to_string).collect()
}

fn unchanged(out: &Outcome) {
    assert_eq!(changes(out), Vec::<String>::new(), "second run changed something: {}", out.comment);
}

/// A virtualenv of the system's python3, made the way an operator would.
fn make_venv(dir: &Path) -> PathBuf {
    let python = need("python3", "python3 python3-venv");
    let venv = dir.join("venv");
    run_ok(Command::new(python).args(["-m", "venv"]).arg(&venv).env_clear().env("PATH", "/usr/bin:/bin"));
    venv
}

#[tokio::test]
async fn pip_pins_upgrades_and_removes_in_a_virtualenv() {
    let dir = tempfile::tempdir().unwrap();
    let venv = make_venv(dir.path());
    let tool = pip::pip_tool(venv.join("bin/pip"));
    assert_eq!(tool.env_value("PIP_BREAK_SYSTEM_PACKAGES"), None, "a virtualenv's pip needs no PEP 668 override");
    let apply = |value: &str| {
        let p = typed("common.pip.package", json!({"name": [{"key": "six", "value": value}]}));
        let tool = tool.clone();
        async move { pip::apply_using(Some(tool), &p, Cancel::never()).await }
    };

    assert_eq!(changes(&apply("1.15.0").await), ["six: installed 1.15.0"]);
    let again = apply("1.15.0").await;
    unchanged(&again);
    assert_eq!(again.comment, "six: already as wanted");
    // Any version: 1.15.0 will do.
    unchanged(&apply("").await);

    assert_eq!(changes(&apply("1.16.0").await), ["six: 1.15.0 -> 1.16.0"]);
    unchanged(&apply("1.16.0").await);

    // latest: whatever PyPI's newest is (1.17.0 when this was written), then stable.
    let up = changes(&apply("latest").await);
    assert_eq!(up.len(), 1, "{up:?}");
    let newest = up[0].strip_prefix("six: 1.16.0 -> ").unwrap_or_else(|| panic!("not an upgrade: {up:?}")).to_string();
    assert_ne!(newest, "1.16.0");
    unchanged(&apply("latest").await);
    let listed = run_ok(Command::new(venv.join("bin/pip")).args(["show", "six"]));
    assert!(listed.contains(&format!("Version: {newest}")), "{listed}");

    assert_eq!(changes(&apply("removed").await), [format!("six: removed {newest}")]);
    unchanged(&apply("removed").await);

    // Two packages in one state; one of them already as wanted.
    let p = typed("common.pip.package", json!({"name": {"six": "1.16.0", "pip": ""}}));
    assert_eq!(changes(&pip::apply_using(Some(tool.clone()), &p, Cancel::never()).await), ["six: installed 1.16.0"]);

    // Bad parameters fail before anything runs; a package the index does not have fails
    // with pip's reason and changes nothing.
    let p = typed("common.pip.package", json!({"name": [{"key": "six", "value": "==1.16"}]}));
    let out = pip::apply_using(Some(tool.clone()), &p, Cancel::never()).await;
    assert!(
        !out.result && out.comment.starts_with("parameter name: six: \"==1.16\" is not a version"),
        "{}",
        out.comment
    );
    let p = typed("common.pip.package", json!({"name": "opsagent-test-no-such-package-x7q"}));
    let out = pip::apply_using(Some(tool.clone()), &p, Cancel::never()).await;
    assert!(!out.result);
    assert!(
        out.comment.contains("pip install opsagent-test-no-such-package-x7q` exited with status 1"),
        "{}",
        out.comment
    );
    assert!(out.changes.is_empty());
}

#[tokio::test]
async fn npm_installs_pins_upgrades_and_removes_under_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let tool =
        npm::npm_tool(need("npm", "npm")).with_env("npm_config_cache", &dir.path().join("cache").to_string_lossy());
    let app = dir.path().join("srv/app");
    let apply = |value: &str| {
        let p = typed(
            "common.npm.package",
            json!({"name": [{"key": "is-number", "value": value}], "path": app.to_str().unwrap()}),
        );
        let tool = tool.clone();
        async move { npm::apply_using(Some(tool), &p, Cancel::never()).await }
    };

    let first = changes(&apply("7.0.0").await);
    assert_eq!(
        first,
        [
            format!("{}: directory created (0755 0:0)", dir.path().join("srv").display()),
            format!("{}: directory created (0755 0:0)", app.display()),
            "is-number: installed 7.0.0".to_string()
        ]
    );
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(app.join("package.json")).unwrap()).unwrap();
    assert_eq!(manifest["dependencies"]["is-number"], "7.0.0", "saved with its exact version");
    unchanged(&apply("7.0.0").await);
    unchanged(&apply("").await);

    assert_eq!(changes(&apply("6.0.0").await), ["is-number: 7.0.0 -> 6.0.0"]);
    unchanged(&apply("6.0.0").await);

    let up = changes(&apply("latest").await);
    assert_eq!(up.len(), 1, "{up:?}");
    let newest =
        up[0].strip_prefix("is-number: 6.0.0 -> ").unwrap_or_else(|| panic!("not an upgrade: {up:?}")).to_string();
    unchanged(&apply("latest").await);
    assert!(app.join("node_modules/is-number/package.json").is_file());

    assert_eq!(changes(&apply("removed").await), [format!("is-number: removed {newest}")]);
    unchanged(&apply("removed").await);
    assert!(!app.join("node_modules/is-number").exists());

    // Removing from a path that does not exist: nothing to do, nothing created.
    let p = typed(
        "common.npm.package",
        json!({"name": {"is-number": "removed"}, "path": dir.path().join("none").to_str().unwrap()}),
    );
    unchanged(&npm::apply_using(Some(tool.clone()), &p, Cancel::never()).await);
    assert!(!dir.path().join("none").exists());

    let p = typed("common.npm.package", json!({"name": {"is-number": "^7.0.0"}, "path": app.to_str().unwrap()}));
    let out = npm::apply_using(Some(tool.clone()), &p, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("\"^7.0.0\" is not an exact version"), "{}", out.comment);
}

/// Builds `name` at each version with `gem build`, in `dir`; returns the .gem files.
fn build_gems(dir: &Path, name: &str, versions: &[&str]) -> Vec<PathBuf> {
    let gem = need("gem", "ruby");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/opsagent_test_hello.rb"), "module OpsagentTestHello; end\n").unwrap();
    versions
        .iter()
        .map(|v| {
            let spec = format!(
                "Gem::Specification.new do |s|\n  s.name = {name:?}\n  s.version = {v:?}\n  s.summary = \"opsagent test gem\"\n  \
                 s.authors = [\"opsagent\"]\n  s.license = \"MIT\"\n  s.files = [\"lib/opsagent_test_hello.rb\"]\nend\n"
            );
            std::fs::write(src.join("hello.gemspec"), spec).unwrap();
            run_ok(Command::new(&gem).args(["build", "hello.gemspec"]).current_dir(&src));
            src.join(format!("{name}-{v}.gem"))
        })
        .collect()
}

/// Publishes `gems` in the local source at `repo` (a static index, as rubygems.org's).
fn publish(repo: &Path, gems: &[PathBuf]) {
    std::fs::create_dir_all(repo.join("gems")).unwrap();
    for g in gems {
        std::fs::copy(g, repo.join("gems").join(g.file_name().unwrap())).unwrap();
    }
    run_ok(Command::new(need("gem", "ruby")).args(["generate_index", "--directory"]).arg(repo));
}

#[tokio::test]
async fn gem_installs_upgrades_and_removes_from_a_local_source() {
    const NAME: &str = "opsagent-test-hello";
    let dir = tempfile::tempdir().unwrap();
    let built = build_gems(dir.path(), NAME, &["1.0.0", "1.1.0"]);
    let repo = dir.path().join("repo");
    publish(&repo, &built[..1]);
    let gemrc = dir.path().join("gemrc");
    std::fs::write(&gemrc, format!("---\n:sources:\n- file://{}/\n", repo.display())).unwrap();
    let home = dir.path().join("gems");
    let tool = gem::gem_tool(need("gem", "ruby"))
        .with_env("GEMRC", &gemrc.to_string_lossy())
        .with_env("GEM_HOME", &home.to_string_lossy())
        .with_env("GEM_PATH", &home.to_string_lossy());
    let apply = |value: &str| {
        let p = typed("common.gem.package", json!({"name": [{"key": NAME, "value": value}]}));
        let tool = tool.clone();
        async move { gem::apply_using(Some(tool), &p, Cancel::never()).await }
    };

    assert_eq!(changes(&apply("").await), [format!("{NAME}: installed 1.0.0")]);
    assert!(home.join(format!("gems/{NAME}-1.0.0/lib/opsagent_test_hello.rb")).is_file());
    unchanged(&apply("").await);
    unchanged(&apply("latest").await);

    // A newer version appears in the source: `latest` installs it beside 1.0.0; an
    // empty value or the old pin is still satisfied.
    publish(&repo, &built[1..]);
    unchanged(&apply("").await);
    assert_eq!(changes(&apply("latest").await), [format!("{NAME}: installed 1.1.0")]);
    unchanged(&apply("latest").await);
    unchanged(&apply("1.0.0").await);

    assert_eq!(changes(&apply("removed").await), [format!("{NAME}: removed 1.1.0, 1.0.0")]);
    unchanged(&apply("removed").await);
    assert_eq!(changes(&apply("1.0.0").await), [format!("{NAME}: installed 1.0.0")]);
    unchanged(&apply("1.0.0").await);

    let out = apply("~> 1.0").await;
    assert!(!out.result && out.comment.contains("\"~> 1.0\" is not a version"), "{}", out.comment);
    let out = apply("9.9.9").await;
    assert!(
        !out.result && out.comment.contains(&format!("gem install --no-document {NAME} --version 9.9.9")),
        "{}",
        out.comment
    );
    assert!(out.changes.is_empty());
}

/// `common.gem.source` (the adaptor's `gem source --add`): a second local source is
/// added to the gem configuration of a private HOME once; the next run changes nothing.
#[tokio::test]
async fn gem_source_is_added_once() {
    let dir = tempfile::tempdir().unwrap();
    let built = build_gems(dir.path(), "opsagent-test-src", &["1.0.0"]);
    let (first, second) = (dir.path().join("repo1"), dir.path().join("repo2"));
    publish(&first, &built);
    publish(&second, &built);
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join(".gemrc"), format!("---\n:sources:\n- file://{}/\n", first.display())).unwrap();
    let tool = gem::gem_tool(need("gem", "ruby")).with_env("HOME", &home.to_string_lossy());
    let url = format!("file://{}/", second.display());
    let apply = || {
        let p = typed("common.gem.source", json!({"url": url}));
        let tool = tool.clone();
        async move { gem::source_using(Some(tool), &p, Cancel::never()).await }
    };
    assert_eq!(changes(&apply().await), [format!("{url}: gem source added")]);
    let rc = std::fs::read_to_string(home.join(".gemrc")).unwrap();
    assert!(rc.contains(&url) && rc.contains(&format!("file://{}/", first.display())), "{rc}");
    unchanged(&apply().await);
}

#[tokio::test]
async fn virtualenv_is_created_and_follows_its_requirements_file() {
    need("python3", "python3 python3-venv");
    // Under /, root's: pip (as root) reads only a requirements file root controls.
    let dir = tempfile::Builder::new().prefix(".opsagent-test-venv").tempdir_in("/").unwrap();
    let state_dir = dir.path().join("state");
    let id = StateId::parse("state-venv-1").unwrap();
    let venv = dir.path().join("venv");
    let req = dir.path().join("requirements.txt");
    std::fs::write(&req, "six==1.16.0\n").unwrap();
    let params = |site: bool| -> opsagent_proto::catalogue::CommonVirtualenv {
        typed(
            "common.virtualenv",
            json!({"path": venv.to_str().unwrap(), "requirements-file": req.to_str().unwrap(),
                   "python-bin": "python3", "system-site-packages": site}),
        )
    };
    let apply = |site: bool| {
        let p = params(site);
        let (id, state_dir) = (id.clone(), state_dir.clone());
        async move { virtualenv::apply(&p, &id, &state_dir, Cancel::never()).await }
    };
    let python = find_tool("python3", &[]).unwrap();

    let first = changes(&apply(false).await);
    assert_eq!(
        first,
        [
            format!("{}: virtualenv created ({}, system-site-packages false)", venv.display(), python.display()),
            "six: installed 1.16.0".to_string()
        ]
    );
    assert!(venv.join("lib").is_dir() && venv.join("bin/pip").exists());
    unchanged(&apply(false).await);

    // The file changes: installed again, and only what moved is reported.
    std::fs::write(&req, "six==1.15.0\n").unwrap();
    assert_eq!(changes(&apply(false).await), ["six: 1.16.0 -> 1.15.0"]);
    unchanged(&apply(false).await);
    // Changed bytes, same packages: pip runs, nothing changes, the comment says why.
    std::fs::write(&req, "# pinned\nsix==1.15.0\n").unwrap();
    let out = apply(false).await;
    unchanged(&out);
    assert!(out.comment.contains("changed; everything it lists was already installed"), "{}", out.comment);
    unchanged(&apply(false).await);

    // system-site-packages follows the recipe.
    assert_eq!(changes(&apply(true).await), [format!("{}: system-site-packages false -> true", venv.display())]);
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap();
    assert!(cfg.contains("include-system-site-packages = true"), "{cfg}");
    unchanged(&apply(true).await);
    // Omitted (the adaptor passed nothing): an existing environment keeps its setting.
    let omitted: opsagent_proto::catalogue::CommonVirtualenv =
        typed("common.virtualenv", json!({"path": venv.to_str().unwrap(), "python-bin": "python3"}));
    unchanged(&virtualenv::apply(&omitted, &id, &state_dir, Cancel::never()).await);
    assert!(std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap().contains("include-system-site-packages = true"));

    // Removed behind the state's back: made again, and its requirements installed again
    // (without the system's site-packages, whose own six would count as installed).
    std::fs::remove_dir_all(&venv).unwrap();
    // Omitted on a new environment: Salt's default, without the system's site-packages.
    let other = dir.path().join("venv-default");
    let made: opsagent_proto::catalogue::CommonVirtualenv =
        typed("common.virtualenv", json!({"path": other.to_str().unwrap(), "python-bin": "python3"}));
    let out = virtualenv::apply(&made, &id, &state_dir, Cancel::never()).await;
    assert!(changes(&out)[0].ends_with("system-site-packages false)"), "{out:?}");
    assert!(std::fs::read_to_string(other.join("pyvenv.cfg"))
        .unwrap()
        .contains("include-system-site-packages = false"));
    let again = changes(&apply(false).await);
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again[0].contains("virtualenv created") && again[1] == "six: installed 1.15.0", "{again:?}");
    unchanged(&apply(false).await);

    // Bad parameters.
    let p: opsagent_proto::catalogue::CommonVirtualenv =
        typed("common.virtualenv", json!({"path": venv.to_str().unwrap(), "python-bin": "/nonexistent/python9"}));
    std::fs::remove_dir_all(&venv).unwrap();
    let out = virtualenv::apply(&p, &id, &state_dir, Cancel::never()).await;
    assert_eq!(
        (out.result, out.comment.as_str()),
        (false, "parameter python-bin: /nonexistent/python9 is not an executable file")
    );
    assert!(!venv.exists());
    let p: opsagent_proto::catalogue::CommonVirtualenv =
        typed("common.virtualenv", json!({"path": venv.to_str().unwrap(), "extra-search-dir": ["/opt/wheels"]}));
    if find_tool("virtualenv", &[]).is_none() {
        let out = virtualenv::apply(&p, &id, &state_dir, Cancel::never()).await;
        assert!(out.comment.starts_with("virtualenv is not installed"), "{}", out.comment);
    }
}

/// The owner of a directory where root keeps a virtualenv (`www-data` in `/var/www`)
/// plants what root then runs or writes through: an environment of their own whose
/// `bin/python` root's pip would run, and a link to root's directory.
#[tokio::test]
async fn virtualenv_as_root_refuses_a_place_another_user_controls() {
    if !nix::unistd::geteuid().is_root() {
        common::skip("virtualenv_as_root_refuses_a_place_another_user_controls: SKIPPED, needs root");
        return;
    }
    use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
    const NOBODY: u32 = 65534;
    // Under /, root's: the requirements file passes root's own check, so only `path` is
    // in question.
    let base = tempfile::Builder::new().prefix(".opsagent-test-venv-planted").tempdir_in("/").unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let req = base.path().join("requirements.txt");
    std::fs::write(&req, "six==1.16.0\n").unwrap();
    let victim = base.path().join("etc");
    std::fs::create_dir(&victim).unwrap();
    let www = base.path().join("www");
    std::fs::create_dir(&www).unwrap();
    chown(&www, Some(NOBODY), Some(NOBODY)).unwrap();
    let marker = base.path().join("ran-as-root");

    // An environment the other user made, complete on the surface.
    let venv = www.join("venv");
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    std::fs::write(venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
    let script = format!("#!/bin/sh\nid -u > {}\n", marker.display());
    for tool in ["python", "pip"] {
        std::fs::write(venv.join("bin").join(tool), &script).unwrap();
        std::fs::set_permissions(venv.join("bin").join(tool), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for p in [&venv, &venv.join("bin"), &venv.join("pyvenv.cfg"), &venv.join("bin/python"), &venv.join("bin/pip")] {
        chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // And a link to root's directory, where python -m venv would build as root.
    let sub = www.join("sub");
    symlink(&victim, &sub).unwrap();
    lchown(&sub, Some(NOBODY), Some(NOBODY)).unwrap();

    let state_dir = base.path().join("state");
    let id = StateId::parse("state-venv-planted").unwrap();
    for (path, why) in [
        (venv.clone(), format!("{} can be changed by uid {NOBODY}", www.display())),
        (sub.join("venv"), format!("{}: a symbolic link in a directory writable by uid {NOBODY}", sub.display())),
    ] {
        let p: opsagent_proto::catalogue::CommonVirtualenv = typed(
            "common.virtualenv",
            json!({"path": path.to_str().unwrap(), "requirements-file": req.to_str().unwrap()}),
        );
        let out = virtualenv::apply(&p, &id, &state_dir, Cancel::never()).await;
        assert!(!out.result && out.changes.is_empty(), "{out:?}");
        assert!(out.comment.starts_with("parameter path: ") && out.comment.contains(&why), "{out:?}");
    }
    assert!(!marker.exists(), "root ran the other user's bin/python");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "root built a virtualenv through the link");
}
