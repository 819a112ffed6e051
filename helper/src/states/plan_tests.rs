//! Plans through the real dispatch ([`super::apply`] with `plan`), module by module on
//! temp dirs: a drifted host → the plan names the exact change and the host is
//! unchanged (a walk of the tree, content, modes, owners and links, compared) → the
//! apply makes that very change → a plan names nothing.
// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::{ApplyRequest, FetchedFile, Outcome};
use serde_json::{json, Value};

use super::*;

/// Everything a state could change below `root`, for before/after comparisons.
fn walk(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link {}", fs::read_link(&p).unwrap().display())
        } else if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                pending.push(e.unwrap().path());
            }
            "dir".to_string()
        } else {
            format!("file {:?}", fs::read(&p).unwrap())
        };
        out.insert(p, format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()));
    }
    out
}

fn request(module: &str, raw: &Value, plan: bool) -> ApplyRequest {
    let mut req = ApplyRequest::new(StateId::parse("s-1").unwrap(), 1, testutil::params(module, raw.clone()));
    req.plan = plan;
    req
}

async fn run(ctx: &Ctx, module: &str, raw: &Value, plan: bool, fetched: &[FetchedFile]) -> Outcome {
    let mut req = request(module, raw, plan);
    req.fetched = fetched.to_vec();
    match apply(&req, ctx, Cancel::never()).await.unwrap() {
        Step::Done(o) => o,
        Step::NeedFetch(urls) => panic!("needs {urls:?}"),
    }
}

fn changes(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// Plan (exact changes, tree unchanged), apply (the same changes), plan (nothing).
async fn drift_cycle(ctx: &Ctx, tree: &Path, module: &str, raw: Value, want: &[String]) -> Outcome {
    let before = walk(tree);
    let planned = run(ctx, module, &raw, true, &[]).await;
    assert!(planned.result && planned.planned, "{planned:?}");
    assert_eq!(changes(&planned), want);
    assert_eq!(walk(tree), before, "the plan changed the host");
    let applied = run(ctx, module, &raw, false, &[]).await;
    assert!(applied.result && !applied.planned, "{applied:?}");
    assert_eq!(changes(&applied), want, "the apply did not make the planned change");
    let again = run(ctx, module, &raw, true, &[]).await;
    assert!(again.result && again.planned && again.changes.is_empty() && again.diff.is_none(), "{again:?}");
    planned
}

fn ctx(tmp: &Path) -> Ctx {
    Ctx::new(tmp.join("state"))
}

#[tokio::test]
async fn file_content_and_mode_drift_is_planned_with_a_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("app.conf");
    fs::write(&path, "a=1\nb=2\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o664)).unwrap();
    let shown = path.display().to_string();
    let raw = json!({"path": path, "content": "a=1\nb=3\n", "mode": "0644"});
    let want = [format!("{shown}: content updated"), format!("{shown}: mode 0664 -> 0644")];
    let planned = drift_cycle(&ctx(tmp.path()), tmp.path(), "linux.file", raw, &want).await;
    assert_eq!(
        planned.diff.as_deref(),
        Some(format!("--- {shown}\n+++ {shown}\n@@ -1,2 +1,2 @@\n a=1\n-b=2\n+b=3\n").as_str())
    );
    assert!(planned.planned, "{planned:?}");
    // The apply's own words: the daemon heads them "would change" for a planned outcome.
    assert_eq!(planned.comment, format!("{shown}: content updated; {shown}: mode 0664 -> 0644"));
}

#[tokio::test]
async fn a_new_file_in_missing_directories_is_planned_from_dev_null() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x/y/new.conf");
    let shown = |p: &Path| p.display().to_string();
    let raw = json!({"path": path, "content": "hello\n"});
    let want = [
        format!("{}: directory created (0755 0:0)", shown(&tmp.path().join("x"))),
        format!("{}: directory created (0755 0:0)", shown(&tmp.path().join("x/y"))),
        format!("{}: file created (0644 0:0)", shown(&path)),
    ];
    let planned = drift_cycle(&ctx(tmp.path()), tmp.path(), "linux.file", raw, &want).await;
    let diff = planned.diff.unwrap();
    assert!(
        diff.starts_with(&format!("--- /dev/null\n+++ {}\n", shown(&path))) && diff.ends_with("+hello\n"),
        "{diff}"
    );
}

#[tokio::test]
async fn secret_and_private_content_shows_checksums_only() {
    let tmp = tempfile::tempdir().unwrap();
    let secret_dir = tmp.path().join("secrets");
    fs::create_dir(&secret_dir).unwrap();
    let key = secret_dir.join("db.key");
    fs::write(&key, "old-password\n").unwrap();
    let policy =
        Policy::parse(Path::new("test.policy"), &format!("secret_paths = {}\n", secret_dir.display())).unwrap();
    let c = ctx(tmp.path()).with_policy(policy);
    let planned = run(&c, "linux.file", &json!({"path": key, "content": "new-password\n"}), true, &[]).await;
    let diff = planned.diff.unwrap();
    assert!(diff.contains("not shown (sensitive): sha256 "), "{diff}");
    assert!(!diff.contains("password"), "{diff}");
    // Not under a secret path, but others may not read it: the same.
    let private = tmp.path().join("private.conf");
    fs::write(&private, "token=1\n").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    let planned = run(&c, "linux.file", &json!({"path": private, "content": "token=2\n"}), true, &[]).await;
    let diff = planned.diff.unwrap();
    assert!(diff.contains("not shown (sensitive)") && !diff.contains("token"), "{diff}");
}

#[tokio::test]
async fn removals_are_planned_not_made() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, dir, link) = (tmp.path().join("f"), tmp.path().join("d"), tmp.path().join("l"));
    fs::write(&file, "x").unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("inside"), "y").unwrap();
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let c = ctx(tmp.path());
    let s = |p: &Path| p.display().to_string();
    drift_cycle(
        &c,
        tmp.path(),
        "linux.file",
        json!({"path": file, "absent": true}),
        &[format!("{}: removed", s(&file))],
    )
    .await;
    drift_cycle(
        &c,
        tmp.path(),
        "linux.dir",
        json!({"path": [dir], "absent": true}),
        &[format!("{}: removed", s(&dir))],
    )
    .await;
    let raw = json!({"target": link, "source": "/etc", "absent": true});
    drift_cycle(&c, tmp.path(), "linux.symlink", raw, &[format!("{}: link removed", s(&link))]).await;
}

#[tokio::test]
async fn directory_trees_are_planned_entry_by_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().join("www");
    fs::create_dir(&top).unwrap();
    fs::set_permissions(&top, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(top.join("index.html"), "hi").unwrap();
    fs::set_permissions(top.join("index.html"), fs::Permissions::from_mode(0o600)).unwrap();
    let new = tmp.path().join("new/sub");
    let s = |p: &Path| p.display().to_string();
    let raw = json!({"path": [top, new], "mode": "0750", "recursive": true});
    let want = [
        format!("{}: mode 0700 -> 0750", s(&top)),
        format!("{}: mode 0600 -> 0750", s(&top.join("index.html"))),
        format!("{}: directory created (0750 0:0)", s(&tmp.path().join("new"))),
        format!("{}: directory created (0750 0:0)", s(&new)),
    ];
    drift_cycle(&ctx(tmp.path()), tmp.path(), "linux.dir", raw, &want).await;
}

#[tokio::test]
async fn links_are_planned_created_and_retargeted() {
    let tmp = tempfile::tempdir().unwrap();
    let (cur, new) = (tmp.path().join("current"), tmp.path().join("latest"));
    std::os::unix::fs::symlink("/srv/v1", &cur).unwrap();
    let c = ctx(tmp.path());
    let s = |p: &Path| p.display().to_string();
    let raw = json!({"target": cur, "source": "/srv/v2"});
    drift_cycle(&c, tmp.path(), "linux.symlink", raw, &[format!("{}: link retargeted /srv/v1 -> /srv/v2", s(&cur))])
        .await;
    let raw = json!({"target": new, "source": "/srv/v2"});
    drift_cycle(&c, tmp.path(), "linux.symlink", raw, &[format!("{}: link created -> /srv/v2", s(&new))]).await;
}

#[tokio::test]
async fn remote_content_is_compared_with_the_download_without_staging_it() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("site/index.html");
    fs::create_dir(tmp.path().join("site")).unwrap();
    fs::write(&path, "<p>old</p>\n").unwrap();
    let dl_dir = tempfile::tempdir().unwrap();
    let dl = dl_dir.path().join("dl");
    fs::write(&dl, "<p>new</p>\n").unwrap();
    let url = "https://example.com/index.html";
    let fetched = [FetchedFile {
        url: url.into(),
        path: AbsPath::parse(&dl.display().to_string()).unwrap(),
        size: 11,
        sha256: hex::encode(sha2::Sha256::digest(b"<p>new</p>\n")),
    }];
    let c = ctx(tmp.path());
    let raw = json!({"path": path, "remote_uri": url});
    // Downloads first, as for an apply.
    let req = request("linux.file", &raw, true);
    let step = apply(&req, &c, Cancel::never()).await.unwrap();
    assert_eq!(step, Step::NeedFetch(vec![url.to_string()]));
    let before = walk(tmp.path());
    let planned = run(&c, "linux.file", &raw, true, &fetched).await;
    assert_eq!(changes(&planned), [format!("{}: content updated", path.display())]);
    assert!(planned.diff.as_deref().is_some_and(|d| d.contains("-<p>old</p>\n+<p>new</p>\n")), "{planned:?}");
    assert_eq!(walk(tmp.path()), before, "the plan staged or wrote something");
    let applied = run(&c, "linux.file", &raw, false, &fetched).await;
    assert_eq!(changes(&applied), changes(&planned));
    let again = run(&c, "linux.file", &raw, true, &fetched).await;
    assert!(again.changes.is_empty(), "{again:?}");
}

/// A command is not run by a plan; the plan says it would run and why it cannot say
/// more; its path guards are honoured as in an apply.
#[tokio::test]
async fn a_command_is_not_run_by_a_plan_and_the_plan_says_it_would_run() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let c = ctx(tmp.path());
    let raw = json!({"cmd": format!("touch {}", marker.display()), "cwd": tmp.path(), "if-path-absent": [marker]});
    let planned = run(&c, "linux.cmd", &raw, true, &[]).await;
    assert!(planned.result && planned.planned, "{planned:?}");
    assert!(!marker.exists(), "the plan ran the command");
    assert_eq!(changes(&planned), ["cmd: ran"]);
    assert!(planned.comment.starts_with("would run /bin/sh -c"), "{}", planned.comment);
    let applied = run(&c, "linux.cmd", &raw, false, &[]).await;
    assert_eq!(changes(&applied), ["cmd: ran"]);
    assert!(marker.exists());
    let again = run(&c, "linux.cmd", &raw, true, &[]).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
}

/// A module that does not plan a step is stopped by the write guard, not by its own
/// care: the refusal the guard recorded becomes the step that would be taken, and
/// nothing is written.
#[test]
fn a_refused_write_becomes_a_would_step() {
    let plan = Plan::new();
    let outcome = plan::in_thread(Some(Arc::clone(&plan)), || {
        let dir = crate::dirfd::Dir::open(Path::new("/tmp")).unwrap();
        let err = dir.create_named(std::ffi::OsStr::new("opsagent-plan-guard-test")).unwrap_err();
        Outcome::failed(err.to_string())
    });
    assert!(!Path::new("/tmp/opsagent-plan-guard-test").exists());
    let o = planned(outcome, plan.refused(), "linux.example");
    assert!(o.result && o.planned, "{o:?}");
    assert_eq!(changes(&o), ["/tmp/opsagent-plan-guard-test: would create"]);
    assert!(o.comment.contains("linux.example cannot tell what follows this step without taking it"), "{}", o.comment);
}
