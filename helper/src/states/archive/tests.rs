// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
use super::*;

use opsagent_proto::request::{FetchedFile, Outcome};
use serde_json::{json, Value};

use crate::unpack::testutil::{add_file, add_raw, gz, tar_bytes};

const URL: &str = "https://example.com/dist/app.tgz";

fn params(raw: Value) -> CommonArchive {
    crate::states::testutil::typed("common.archive", raw)
}

/// A tar.gz with `app/VERSION` = `version` and `app/bin/run`.
fn tgz(version: &str) -> Vec<u8> {
    gz(&tar_bytes(|b| {
        add_file(b, "app/VERSION", version.as_bytes(), 0o644);
        add_file(b, "app/bin/run", b"#!/bin/sh\n", 0o755);
    }))
}

struct Env {
    tmp: tempfile::TempDir,
    ctx: Ctx,
    target: PathBuf,
    n: std::cell::Cell<u32>,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Ctx::new(tmp.path().join("state"));
    let target = tmp.path().join("srv/app-root");
    Env { tmp, ctx, target, n: std::cell::Cell::new(0) }
}

impl Env {
    /// A "download" of `content` for `url`, owned by root like the in-process peer.
    fn download(&self, url: &str, content: &[u8]) -> FetchedFile {
        self.n.set(self.n.get() + 1);
        let path = self.tmp.path().join(format!("dl-{}", self.n.get()));
        fs::write(&path, content).unwrap();
        FetchedFile {
            url: url.into(),
            path: AbsPath::parse(&path.display().to_string()).unwrap(),
            size: content.len() as u64,
            sha256: hex::encode(Sha256::digest(content)),
        }
    }

    fn step(&self, p: &CommonArchive, files: &[FetchedFile]) -> Step {
        apply(p, &self.ctx, &Fetched::new(files, 0))
    }

    fn done(&self, p: &CommonArchive, files: &[FetchedFile]) -> Outcome {
        match self.step(p, files) {
            Step::Done(o) => o,
            other => panic!("expected an outcome, got {other:?}"),
        }
    }

    fn raw(&self, extra: Value) -> Value {
        let mut raw = json!({"path": self.target, "source": URL});
        raw.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        raw
    }
}

fn md5_of(data: &[u8]) -> String {
    hex::encode(md5::Md5::digest(data))
}

#[test]
fn extracts_once_and_a_second_round_with_the_same_checksum_asks_for_nothing() {
    let e = env();
    let data = tgz("1\n");
    let p = params(e.raw(json!({"checksum": format!("md5:{}", md5_of(&data).to_uppercase())})));
    assert_eq!(e.step(&p, &[]), Step::NeedFetch(vec![URL.to_string()]));
    assert!(!e.target.exists(), "nothing happens before the download");

    let out = e.done(&p, &[e.download(URL, &data)]);
    assert!(out.result, "{}", out.comment);
    assert_eq!(fs::read_to_string(e.target.join("app/VERSION")).unwrap(), "1\n");
    let run = fs::metadata(e.target.join("app/bin/run")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&run.permissions()) & 0o777, 0o755);
    let last = out.changes.last().unwrap();
    assert!(last.what.starts_with(&format!("extracted {URL} (tar.gz, 2 entries, 12 bytes)")), "{last}");
    // Parents of the target were created, and no work directory is left beside it.
    assert_eq!(fs::read_dir(e.target.parent().unwrap()).unwrap().count(), 1);

    let again = e.done(&p, &[]);
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert!(again.comment.contains("checksum unchanged since the last extraction"), "{}", again.comment);

    // A new checksum value means a new fetch.
    let v2 = tgz("2\n");
    let p2 = params(e.raw(json!({"checksum": format!("md5={}", md5_of(&v2))})));
    assert_eq!(e.step(&p2, &[]), Step::NeedFetch(vec![URL.to_string()]));
    let out = e.done(&p2, &[e.download(URL, &v2)]);
    assert!(out.result && !out.changes.is_empty(), "{out:?}");
    assert_eq!(fs::read_to_string(e.target.join("app/VERSION")).unwrap(), "2\n");
}

#[test]
fn a_checksum_mismatch_fails_and_extracts_nothing() {
    let e = env();
    let data = tgz("1\n");
    let want = "0".repeat(32);
    let p = params(e.raw(json!({"checksum": format!("md5:{want}")})));
    let out = e.done(&p, &[e.download(URL, &data)]);
    assert!(!out.result);
    assert_eq!(
        out.comment,
        format!("checksum mismatch for {URL}: its md5 is {}, expected {want}; nothing was extracted", md5_of(&data))
    );
    assert!(!e.target.exists());

    let sha = hex::encode(Sha256::digest(&data));
    let p = params(e.raw(json!({"checksum": format!("sha256:{sha}")})));
    assert!(e.done(&p, &[e.download(URL, &data)]).result);
}

#[test]
fn without_checksum_or_guard_every_round_fetches_but_an_unchanged_archive_changes_nothing() {
    let e = env();
    let p = params(e.raw(json!({})));
    let data = tgz("1\n");
    assert!(e.done(&p, &[e.download(URL, &data)]).result);
    assert_eq!(e.step(&p, &[]), Step::NeedFetch(vec![URL.to_string()]));
    let out = e.done(&p, &[e.download(URL, &data)]);
    assert!(out.result && out.changes.is_empty(), "{out:?}");
    assert!(out.comment.contains("unchanged since the last extraction"), "{}", out.comment);

    // Someone removed what was extracted: the same archive is extracted again.
    fs::remove_dir_all(e.target.join("app")).unwrap();
    let out = e.done(&p, &[e.download(URL, &data)]);
    assert!(out.result && !out.changes.is_empty(), "{out:?}");
    assert!(e.target.join("app/VERSION").exists());
}

#[test]
fn if_path_absent_fetches_until_a_path_exists_then_only_on_a_new_checksum() {
    let e = env();
    let marker = e.target.join("app/VERSION");
    let data = tgz("1\n");
    let raw = |cs: Option<String>| {
        let mut extra = json!({"if-path-absent": [e.tmp.path().join("nope"), &marker]});
        if let Some(cs) = cs {
            extra["checksum"] = json!(cs);
        }
        params(e.raw(extra))
    };
    let p = raw(None);
    assert_eq!(e.step(&p, &[]), Step::NeedFetch(vec![URL.to_string()]));
    assert!(e.done(&p, &[e.download(URL, &data)]).result);
    let out = e.done(&p, &[]);
    assert!(out.result && out.changes.is_empty(), "{out:?}");
    assert!(out.comment.contains(&format!("{} exists (if-path-absent)", marker.display())), "{}", out.comment);

    // Some path exists: only a checksum that changed brings a fetch.
    let p = raw(Some(format!("md5:{}", md5_of(&data))));
    assert_eq!(e.step(&p, &[]), Step::NeedFetch(vec![URL.to_string()]), "no checksum recorded yet");
    assert!(e.done(&p, &[e.download(URL, &data)]).result);
    assert!(matches!(e.step(&p, &[]), Step::Done(o) if o.changes.is_empty()));
}

#[test]
fn a_checksum_file_is_fetched_with_the_archive() {
    let e = env();
    let data = tgz("1\n");
    let sums = "https://example.com/dist/SUMS";
    let p = params(e.raw(json!({"checksum": sums})));
    assert_eq!(e.step(&p, &[]), Step::NeedFetch(vec![URL.to_string(), sums.to_string()]));
    let text = format!("{}  other.tgz\n{} *app.tgz\n", "f".repeat(32), md5_of(&data));
    let out = e.done(&p, &[e.download(URL, &data), e.download(sums, text.as_bytes())]);
    assert!(out.result, "{}", out.comment);
    assert!(matches!(e.step(&p, &[]), Step::Done(o) if o.changes.is_empty()), "the URL is the value compared");

    let e = env();
    let p = params(e.raw(json!({"checksum": sums})));
    let out = e.done(&p, &[e.download(URL, &data), e.download(sums, "0123 nothing useful\n".as_bytes())]);
    assert_eq!(out.comment, format!("checksum file {sums}: no md5 or sha256 digest in it"));
    let out = e.done(&p, &[e.download(URL, &data), e.download(sums, "a".repeat(64).as_bytes())]);
    assert!(out.comment.starts_with(&format!("checksum mismatch for {URL}: its sha256 is")), "{}", out.comment);
    assert!(!e.target.exists());
}

#[test]
fn existing_content_is_merged_links_replaced_and_directories_kept() {
    let e = env();
    fs::create_dir_all(e.target.join("app")).unwrap();
    fs::write(e.target.join("app/local.conf"), "mine").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), e.target.join("app/bin")).unwrap();
    let p = params(e.raw(json!({})));
    let out = e.done(&p, &[e.download(URL, &tgz("1\n"))]);
    assert!(out.result, "{}", out.comment);
    assert_eq!(fs::read_to_string(e.target.join("app/local.conf")).unwrap(), "mine");
    assert!(fs::symlink_metadata(e.target.join("app/bin")).unwrap().is_dir(), "the link was replaced");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "nothing written through the link");

    // A directory where the archive has a file is an error, and stays.
    let e = env();
    fs::create_dir_all(e.target.join("app/VERSION")).unwrap();
    let out = e.done(&p_for(&e), &[e.download(URL, &tgz("1\n"))]);
    assert!(!out.result && out.comment.contains("app/VERSION: is a directory"), "{}", out.comment);
    assert!(e.target.join("app/VERSION").is_dir());

    // The target itself may be a link only where only root could have placed it.
    let e = env();
    let parent = e.target.parent().unwrap();
    fs::create_dir_all(parent).unwrap();
    std::os::unix::fs::chown(parent, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink(outside.path(), &e.target).unwrap();
    let out = e.done(&p_for(&e), &[e.download(URL, &tgz("1\n"))]);
    let refusal = format!("{}: a symbolic link in a directory writable by uid 65534; refusing", e.target.display());
    assert!(!out.result && out.comment.starts_with(&refusal), "{}", out.comment);
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(fs::read_dir(parent).unwrap().count(), 1, "no work directory left beside the link");
}

fn p_for(e: &Env) -> CommonArchive {
    params(e.raw(json!({})))
}

#[test]
fn a_hostile_archive_is_refused_and_nothing_lands() {
    let e = env();
    let evil = tar_bytes(|b| add_raw(b, b"../escape", tar::EntryType::Regular, b"x", None));
    let url = "https://example.com/evil.tar";
    let p = params(json!({"path": e.target, "source": url}));
    let out = e.done(&p, &[e.download(url, &evil)]);
    assert!(!out.result);
    assert_eq!(out.comment, format!("{url}: entry \"../escape\": \"..\" components are refused"));
    assert!(!e.target.exists() && !e.target.parent().unwrap().join("escape").exists());
    // The work directory is gone too.
    assert_eq!(fs::read_dir(e.target.parent().unwrap()).unwrap().count(), 0);
}

#[test]
fn bad_parameters_fail_before_any_download() {
    let e = env();
    for (raw, want) in [
        (json!({"source": "ftp://h/a.tgz"}), "only http:// and https:// URLs"),
        (json!({"source": "https://h/a.rar"}), "the name must end in tar, tgz"),
        (json!({"checksum": "crc32:1234"}), "expected md5:<hex>, sha256:<hex> or the http(s) URL"),
        (json!({"checksum": "md5:abc"}), "expected md5:<hex>"),
        (json!({"path": "/"}), "\"/\" cannot be replaced"),
    ] {
        let out = e.done(&params(e.raw(raw)), &[]);
        assert!(!out.result && out.comment.contains(want), "{want}: {}", out.comment);
    }
    crate::states::testutil::refused(
        "common.archive",
        e.raw(json!({"if-path-absent": ["relative/x"]})),
        "parameter \"if-path-absent\": path \"relative/x\" is not absolute",
    );
    // tbz is documented (the original adaptor missed it), and so are bz, bz2 and zip.
    for name in ["a.tbz", "a.bz", "a.bz2", "a.zip", "a.tar", "a.tar.gz"] {
        let p = params(e.raw(json!({"source": format!("https://h/{name}")})));
        assert!(matches!(e.step(&p, &[]), Step::NeedFetch(_)), "{name}");
    }
}

#[test]
fn checksum_files_pick_the_line_naming_the_archive() {
    let md5 = "a".repeat(32);
    assert_eq!(checksum_from_file(&md5, URL), Ok(Checksum::Md5(md5.clone())));
    let two = format!("{md5}  b.tgz\n{}  ./dist/app.tgz\n", "b".repeat(64));
    assert_eq!(checksum_from_file(&two, URL), Ok(Checksum::Sha256("b".repeat(64))));
    let other = format!("{md5}  b.tgz\n{md5}  c.tgz\n");
    assert_eq!(checksum_from_file(&other, URL), Err("2 digests and none names \"app.tgz\"".to_string()));
}

/// Everything below `root`: kind, content, mode, owner (a plan must leave it as it was).
fn walk(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let what = if m.is_dir() {
            pending.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            "dir".to_string()
        } else if m.file_type().is_symlink() {
            format!("link {}", fs::read_link(&p).unwrap().display())
        } else {
            format!("file {}", hex::encode(Sha256::digest(fs::read(&p).unwrap())))
        };
        out.insert(p, format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()));
    }
    out
}

impl Env {
    /// A plan of the state, as the dispatch makes it (plan context, outcome marked
    /// planned): it must stop at no write, and it must leave the whole temp dir (target,
    /// record, downloads) as it was.
    fn plan(&self, p: &CommonArchive, files: &[FetchedFile]) -> Outcome {
        let before = walk(self.tmp.path());
        let plan = crate::plan::Plan::new();
        let step = crate::plan::in_thread(Some(std::sync::Arc::clone(&plan)), || self.step(p, files));
        assert_eq!(walk(self.tmp.path()), before, "the plan wrote something");
        assert_eq!(plan.refused(), None, "the plan of common.archive stopped at a write");
        match step {
            Step::Done(o) => crate::states::planned(o, None, "common.archive"),
            other => panic!("expected an outcome, got {other:?}"),
        }
    }
}

fn words(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// Drift cycles (issue 19): the plan names the apply's very changes and writes nothing;
/// after the apply a plan finds nothing.
#[test]
fn a_plan_says_what_the_extraction_would_change_and_writes_nothing() {
    let e = env();
    let data = tgz("1\n");
    let p = params(e.raw(json!({})));
    // Downloads first, in a plan as in an apply (the daemon's).
    let plan = crate::plan::Plan::new();
    let step = crate::plan::in_thread(Some(plan), || e.step(&p, &[]));
    assert_eq!(step, Step::NeedFetch(vec![URL.to_string()]));

    let srv = e.target.parent().unwrap();
    let want = [
        format!("{}: directory created (0755 0:0)", srv.display()),
        format!("{}: directory created (0755 0:0)", e.target.display()),
        format!("{}: extracted {URL} (tar.gz, 2 entries, 12 bytes)", e.target.display()),
    ];
    let planned = e.plan(&p, &[e.download(URL, &data)]);
    assert!(planned.result && planned.planned, "{planned:?}");
    assert_eq!(words(&planned), want);
    assert!(!srv.exists());
    let applied = e.done(&p, &[e.download(URL, &data)]);
    assert_eq!(words(&applied), want, "{applied:?}");
    let again = e.plan(&p, &[e.download(URL, &data)]);
    assert!(again.result && again.changes.is_empty(), "{again:?}");

    // Drift: what was extracted is removed by hand; a new archive is published.
    fs::remove_dir_all(e.target.join("app")).unwrap();
    let v2 = gz(&tar_bytes(|b| {
        add_file(b, "app/VERSION", b"22\n", 0o644);
        add_file(b, "app/bin/run", b"#!/bin/sh\n", 0o755);
        add_file(b, "app/README", b"x", 0o644);
    }));
    let want = [format!("{}: extracted {URL} (tar.gz, 3 entries, 14 bytes)", e.target.display())];
    let planned = e.plan(&p, &[e.download(URL, &v2)]);
    assert_eq!(words(&planned), want);
    assert!(!e.target.join("app").exists());
    assert_eq!(words(&e.done(&p, &[e.download(URL, &v2)])), want);
    assert!(e.plan(&p, &[e.download(URL, &v2)]).changes.is_empty());

    // With a checksum: the same record decides, without a download; a wrong checksum
    // fails the plan as it fails the apply.
    let sum = params(e.raw(json!({"checksum": format!("md5:{}", md5_of(&v2))})));
    let first = e.plan(&sum, &[e.download(URL, &v2)]);
    assert!(first.result && first.changes.is_empty(), "{first:?}");
    let bad = params(e.raw(json!({"checksum": format!("md5:{}", "0".repeat(32))})));
    let refused = e.plan(&bad, &[e.download(URL, &v2)]);
    let failed = e.done(&bad, &[e.download(URL, &v2)]);
    assert!(!refused.result && !failed.result && refused.comment == failed.comment, "{refused:?} {failed:?}");
}
