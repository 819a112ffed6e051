//! Plans (issue 19) of `common.pip.package`, `common.npm.package`,
//! `common.gem.package`, `common.gem.source` and `common.virtualenv` against the real
//! tools, from local sources only (no internet): wheels written by the test and pip's
//! `--no-index --find-links`; `npm pack` tarballs served by a registry of static files on
//! 127.0.0.1; gems built with `gem build` in a `file://` source. Each is a drift cycle:
//! the host drifts → the plan names the exact change in the apply's words and the temp
//! tree (environments, caches, homes, sources) is unchanged, file by file → the apply
//! makes that change → a plan finds nothing.
//!
//! Needs python3 with venv, npm, ruby (gem): `.ci/run` installs them; elsewhere a test
//! whose tool is missing says so and passes, unless `OPSAGENT_TEST_NO_SKIP=1`.
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use common::{run_ok, typed};
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::lang::{gem, npm, pip, virtualenv, Tool};
use opsagent_helper::states::storage::find_tool;
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::Outcome;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The tool, or `None` after saying why the test cannot run here.
fn tool_or_skip(test: &str, tool: &str, package: &str) -> Option<PathBuf> {
    let found = find_tool(tool, &[]);
    if found.is_none() {
        common::skip(&format!("{test}: SKIPPED, {tool} is not installed (apt-get install -y {package})"));
    }
    found
}

/// Everything below `root`: kind, content, mode, owner.
fn walk(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let what = if m.is_dir() {
            pending.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            "dir".to_string()
        } else if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else {
            format!("file {}", hex::encode(Sha256::digest(std::fs::read(&p).unwrap())))
        };
        out.insert(p, format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()));
    }
    out
}

fn words(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// A plan as the helper's dispatch makes it: the state in a plan context, its outcome
/// marked planned. It must reach its end without a write refused by the guard, and
/// leave everything below `tree` as it was.
async fn plan<F: Future<Output = Outcome>>(module: &str, tree: &Path, state: F) -> Outcome {
    let before = walk(tree);
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(Arc::clone(&plan)), state).await;
    assert_eq!(plan.refused(), None, "the plan of {module} stopped at a write: {out:?}");
    let after = walk(tree);
    let differ: Vec<_> = after.iter().filter(|(p, v)| before.get(*p) != Some(v)).map(|(p, _)| p).collect();
    let gone: Vec<_> = before.keys().filter(|p| !after.contains_key(*p)).collect();
    assert!(differ.is_empty() && gone.is_empty(), "the plan of {module} wrote {differ:?}, removed {gone:?}");
    let out = opsagent_helper::states::planned(out, None, module);
    assert!(out.result && out.planned, "{out:?}");
    out
}

/// drifted → plan (`want`, nothing written) → apply (`want`) → plan (nothing).
async fn cycle<F, Fut>(module: &str, tree: &Path, state: F, want: &[String])
where
    F: Fn(bool) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let planned = plan(module, tree, state(true)).await;
    assert_eq!(words(&planned), want, "plan: {planned:?}");
    let applied = state(false).await;
    assert!(applied.result, "apply failed: {}\n{}", applied.comment, applied.stdout);
    assert_eq!(words(&applied), want, "the apply did not make the planned change: {applied:?}");
    let again = plan(module, tree, state(true)).await;
    assert!(again.changes.is_empty(), "after the apply the plan still finds: {again:?}");
}

/// A wheel of `name` at `version` in `dir`, written directly (a wheel is a zip with a
/// dist-info directory): no build tool, no index.
fn make_wheel(python: &Path, dir: &Path, name: &str, version: &str) {
    const SCRIPT: &str = r#"
import sys, zipfile
name, ver, out = sys.argv[1:4]
mod = name.replace("-", "_")
info = f"{mod}-{ver}.dist-info"
files = {
    f"{mod}.py": f"VERSION = {ver!r}\n",
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: opsagent-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
with zipfile.ZipFile(f"{out}/{mod}-{ver}-py3-none-any.whl", "w") as z:
    for k, v in files.items():
        z.writestr(k, v)
"#;
    run_ok(Command::new(python).args(["-c", SCRIPT, name, version]).arg(dir));
}

#[tokio::test]
async fn pip_plans_from_local_wheels() {
    let Some(python) = tool_or_skip("pip_plans_from_local_wheels", "python3", "python3-venv python3-pip") else {
        return;
    };
    const NAME: &str = "opsagent-test-pkg";
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    run_ok(Command::new(&python).args(["-m", "venv"]).arg(&venv).env_clear().env("PATH", "/usr/bin:/bin"));
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    make_wheel(&python, &wheels, NAME, "1.0.0");
    let tool = pip::pip_tool(venv.join("bin/pip"))
        .with_env("PIP_NO_INDEX", "1")
        .with_env("PIP_FIND_LINKS", &wheels.to_string_lossy())
        .with_env("HOME", &dir.path().join("home").to_string_lossy());
    std::fs::create_dir(dir.path().join("home")).unwrap();
    let state = |value: &'static str| {
        let tool = tool.clone();
        move |_planning: bool| {
            let p = typed("common.pip.package", json!({"name": [{"key": NAME, "value": value}]}));
            let tool = tool.clone();
            async move { pip::apply_using(Some(tool), &p, Cancel::never()).await }
        }
    };
    let tree = dir.path();
    cycle("common.pip.package", tree, state("1.0.0"), &[format!("{NAME}: installed 1.0.0")]).await;
    // A newer wheel appears: `latest` is planned from the index pip sees.
    make_wheel(&python, &wheels, NAME, "1.1.0");
    cycle("common.pip.package", tree, state("latest"), &[format!("{NAME}: 1.0.0 -> 1.1.0")]).await;
    cycle("common.pip.package", tree, state("1.0.0"), &[format!("{NAME}: 1.1.0 -> 1.0.0")]).await;
    cycle("common.pip.package", tree, state("removed"), &[format!("{NAME}: removed 1.0.0")]).await;
    // Unpinned: the version pip would choose, the index's newest.
    cycle("common.pip.package", tree, state(""), &[format!("{NAME}: installed 1.1.0")]).await;
}

/// A registry of static files on 127.0.0.1 (`python3 -m http.server`), stopped when
/// dropped.
struct Registry {
    server: Child,
    url: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Publishes `name` at `versions` (packed with `npm pack`) in a registry served from
/// `dir`.
fn npm_registry(npm: &Path, python: &Path, dir: &Path, name: &str, versions: &[&str]) -> Registry {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/");
    let root = dir.join("registry");
    let src = dir.join("npm-src");
    std::fs::create_dir_all(root.join("tarballs")).unwrap();
    std::fs::create_dir_all(&src).unwrap();
    let mut published = serde_json::Map::new();
    for v in versions {
        std::fs::write(src.join("package.json"), json!({"name": name, "version": v}).to_string()).unwrap();
        std::fs::write(src.join("index.js"), "module.exports = 1;\n").unwrap();
        run_ok(
            Command::new(npm)
                .args(["pack", "--pack-destination"])
                .arg(root.join("tarballs"))
                .current_dir(&src)
                .env("npm_config_cache", dir.join("pack-cache")),
        );
        let tgz = root.join(format!("tarballs/{name}-{v}.tgz"));
        const SRI: &str = "import base64, hashlib, sys; \
            print(base64.b64encode(hashlib.sha512(open(sys.argv[1], 'rb').read()).digest()).decode())";
        let integrity = format!("sha512-{}", run_ok(Command::new(python).args(["-c", SRI]).arg(&tgz)).trim());
        published.insert(
            v.to_string(),
            json!({"name": name, "version": v,
                   "dist": {"tarball": format!("{url}tarballs/{name}-{v}.tgz"), "integrity": integrity}}),
        );
    }
    let latest = versions.last().unwrap();
    let doc = json!({"name": name, "dist-tags": {"latest": latest}, "versions": Value::Object(published)});
    std::fs::write(root.join(name), doc.to_string()).unwrap();
    let server = Command::new(python)
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let registry = Registry { server, url };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return registry;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the test registry did not start on port {port}");
}

#[tokio::test]
async fn npm_plans_pins_and_removals_from_a_local_registry() {
    let test = "npm_plans_pins_and_removals_from_a_local_registry";
    let (Some(npm_bin), Some(python)) = (tool_or_skip(test, "npm", "npm"), tool_or_skip(test, "python3", "python3"))
    else {
        return;
    };
    const NAME: &str = "opsagent-test-num";
    let dir = tempfile::tempdir().unwrap();
    let registry = npm_registry(&npm_bin, &python, dir.path(), NAME, &["1.0.0", "1.1.0"]);
    let tree = dir.path().join("host");
    std::fs::create_dir_all(tree.join("home")).unwrap();
    let tool: Tool = npm::npm_tool(npm_bin)
        .with_env("npm_config_registry", &registry.url)
        .with_env("npm_config_cache", &tree.join("cache").to_string_lossy())
        .with_env("HOME", &tree.join("home").to_string_lossy());
    let app = tree.join("srv/app");
    let params = |value: &str| -> opsagent_proto::catalogue::CommonNpmPackage {
        typed("common.npm.package", json!({"name": [{"key": NAME, "value": value}], "path": app.to_str().unwrap()}))
    };
    let state = |value: &'static str| {
        let (tool, p) = (tool.clone(), params(value));
        move |_planning: bool| {
            let (tool, p) = (tool.clone(), p.clone());
            async move { npm::apply_using(Some(tool), &p, Cancel::never()).await }
        }
    };
    let module = "common.npm.package";
    let created = |p: &Path| format!("{}: directory created (0755 0:0)", p.display());
    let want = [created(&tree.join("srv")), created(&app), format!("{NAME}: installed 1.0.0")];
    cycle(module, &tree, state("1.0.0"), &want).await;
    cycle(module, &tree, state("1.1.0"), &[format!("{NAME}: 1.0.0 -> 1.1.0")]).await;
    cycle(module, &tree, state("removed"), &[format!("{NAME}: removed 1.1.0")]).await;

    // What a plan does not ask the registry (npm view writes npm's cache) it says so,
    // writing nothing.
    let unpinned = plan(module, &tree, state("")(true)).await;
    assert_eq!(
        words(&unpinned),
        [format!(
            "{NAME}: would be installed (at the registry's latest version, not asked: npm view stores what it \
             fetches in npm's cache, and a plan writes nothing)"
        )]
    );
    cycle(module, &tree, state("1.0.0"), &[format!("{NAME}: installed 1.0.0")]).await;
    let latest = plan(module, &tree, state("latest")(true)).await;
    assert_eq!(
        words(&latest),
        [format!(
            "{NAME}: would fetch the registry's latest version to compare with 1.0.0 (npm view stores what it \
             fetches in npm's cache, and a plan writes nothing)"
        )]
    );
}

/// Builds `name` at each version with `gem build`, in `dir`; returns the .gem files.
fn build_gems(gem: &Path, dir: &Path, name: &str, versions: &[&str]) -> Vec<PathBuf> {
    let src = dir.join("gem-src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/opsagent_test_plan.rb"), "module OpsagentTestPlan; end\n").unwrap();
    versions
        .iter()
        .map(|v| {
            let spec = format!(
                "Gem::Specification.new do |s|\n  s.name = {name:?}\n  s.version = {v:?}\n  s.summary = \"opsagent test gem\"\n  \
                 s.authors = [\"opsagent\"]\n  s.license = \"MIT\"\n  s.files = [\"lib/opsagent_test_plan.rb\"]\nend\n"
            );
            std::fs::write(src.join("t.gemspec"), spec).unwrap();
            run_ok(Command::new(gem).args(["build", "t.gemspec"]).current_dir(&src).env("HOME", dir));
            src.join(format!("{name}-{v}.gem"))
        })
        .collect()
}

/// Publishes `gems` in the local source at `repo` (a static index, as rubygems.org's).
fn publish(gem: &Path, repo: &Path, gems: &[PathBuf]) {
    std::fs::create_dir_all(repo.join("gems")).unwrap();
    for g in gems {
        std::fs::copy(g, repo.join("gems").join(g.file_name().unwrap())).unwrap();
    }
    run_ok(Command::new(gem).args(["generate_index", "--directory"]).arg(repo).env("HOME", repo));
}

#[tokio::test]
async fn gem_plans_from_a_local_source_without_caching_its_index() {
    let Some(gem_bin) = tool_or_skip("gem_plans_from_a_local_source_without_caching_its_index", "gem", "ruby") else {
        return;
    };
    const NAME: &str = "opsagent-test-plan";
    let dir = tempfile::tempdir().unwrap();
    let built = build_gems(&gem_bin, dir.path(), NAME, &["1.0.0", "1.1.0"]);
    let tree = dir.path().join("host");
    let (repo, home, gems) = (tree.join("repo"), tree.join("home"), tree.join("gems"));
    std::fs::create_dir_all(&home).unwrap();
    publish(&gem_bin, &repo, &built[..1]);
    // The source in the user's own gemrc, in a home the helper's user owns: where
    // RubyGems caches a source's index when it lists it remotely (the apply does; the
    // plan must not).
    std::fs::write(home.join(".gemrc"), format!("---\n:sources:\n- file://{}/\n", repo.display())).unwrap();
    let tool = gem::gem_tool(gem_bin.clone())
        .with_env("HOME", &home.to_string_lossy())
        .with_env("GEM_HOME", &gems.to_string_lossy())
        .with_env("GEM_PATH", &gems.to_string_lossy());
    let state = |value: &'static str| {
        let tool = tool.clone();
        move |_planning: bool| {
            let p = typed("common.gem.package", json!({"name": [{"key": NAME, "value": value}]}));
            let tool = tool.clone();
            async move { gem::apply_using(Some(tool), &p, Cancel::never()).await }
        }
    };
    let module = "common.gem.package";
    // Unpinned: the source's newest, asked without caching.
    cycle(module, &tree, state(""), &[format!("{NAME}: installed 1.0.0")]).await;
    publish(&gem_bin, &repo, &built[1..]);
    // `latest`: installed beside 1.0.0, as the apply does.
    cycle(module, &tree, state("latest"), &[format!("{NAME}: installed 1.1.0")]).await;
    cycle(module, &tree, state("removed"), &[format!("{NAME}: removed 1.1.0, 1.0.0")]).await;
    cycle(module, &tree, state("1.0.0"), &[format!("{NAME}: installed 1.0.0")]).await;

    // common.gem.source: a second source, added to the same gemrc.
    let second = tree.join("repo2");
    publish(&gem_bin, &second, &built[..1]);
    let url = format!("file://{}/", second.display());
    let source = |_planning: bool| {
        let p = typed("common.gem.source", json!({"url": url}));
        let tool = tool.clone();
        async move { gem::source_using(Some(tool), &p, Cancel::never()).await }
    };
    cycle("common.gem.source", &tree, source, &[format!("{url}: gem source added")]).await;
    assert!(std::fs::read_to_string(home.join(".gemrc")).unwrap().contains(&url));
}

#[tokio::test]
async fn virtualenv_plans_its_creation_its_settings_and_its_requirements() {
    let Some(python) =
        tool_or_skip("virtualenv_plans_its_creation_its_settings_and_its_requirements", "python3", "python3-venv")
    else {
        return;
    };
    // Under /, root's: the state builds only where root alone can write.
    let dir = tempfile::Builder::new().prefix(".opsagent-test-venv-plan").tempdir_in("/").unwrap();
    let state_dir = dir.path().join("state");
    let venv = dir.path().join("venv");
    let id = StateId::parse("state-venv-plan").unwrap();
    let params = |extra: Value| -> opsagent_proto::catalogue::CommonVirtualenv {
        let mut raw = json!({"path": venv.to_str().unwrap(), "python-bin": "python3"});
        raw.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        typed("common.virtualenv", raw)
    };
    let state = |extra: Value| {
        let (p, id, state_dir) = (params(extra), id.clone(), state_dir.clone());
        move |_planning: bool| {
            let (p, id, state_dir) = (p.clone(), id.clone(), state_dir.clone());
            async move { virtualenv::apply(&p, &id, &state_dir, Cancel::never()).await }
        }
    };
    let module = "common.virtualenv";
    let tree = dir.path();
    let made = format!("{}: virtualenv created ({}, system-site-packages false)", venv.display(), python.display());
    cycle(module, tree, state(json!({})), &[made]).await;
    let site = format!("{}: system-site-packages false -> true", venv.display());
    cycle(module, tree, state(json!({"system-site-packages": true})), &[site]).await;

    // A requirements file: what pip makes of it only pip knows, so the plan names the
    // step; it stores no checksum either (the apply would then skip the install).
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    make_wheel(&python, &wheels, "opsagent-test-req", "1.0.0");
    let req = dir.path().join("requirements.txt");
    std::fs::write(&req, format!("--no-index\n--find-links {}\nopsagent-test-req==1.0.0\n", wheels.display())).unwrap();
    let with_req = state(json!({"system-site-packages": true, "requirements-file": req.to_str().unwrap()}));
    let planned = plan(module, tree, with_req(true)).await;
    assert_eq!(
        words(&planned),
        [format!(
            "{}: would run {}/bin/python -m pip install -r {} (the file changed since its last install; what it \
             installs is known only when it runs)",
            venv.display(),
            venv.display(),
            req.display()
        )]
    );
    let applied = with_req(false).await;
    assert_eq!(words(&applied), ["opsagent-test-req: installed 1.0.0"], "{applied:?}");
    let again = plan(module, tree, with_req(true)).await;
    assert!(again.changes.is_empty(), "{again:?}");

    // Removed behind the state's back: the plan says it would be created again, and
    // the requirements installed into it.
    std::fs::remove_dir_all(&venv).unwrap();
    let planned = plan(module, tree, with_req(true)).await;
    let w = words(&planned);
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(
        w[0],
        format!("{}: virtualenv created ({}, system-site-packages true)", venv.display(), python.display())
    );
    assert!(w[1].contains("pip install -r") && w[1].contains("(the environment is new;"), "{w:?}");
    assert!(!venv.exists());
}
