// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `common.archive` and `linux.file` `remote_uri` end to end: the reference backend, the
//! daemon (which downloads) and the root helper (which checks and extracts), with
//! archives made here in every format and served by a loopback HTTP server.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::Digest;

/// A tar with `app/VERSION` (= `version`), `app/bin/run` and a link inside.
fn tar_archive(version: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in [("app/VERSION", version.as_bytes(), 0o644), ("app/bin/run", b"#!/bin/sh\n", 0o755)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        b.append_data(&mut h, path, data).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "app/current", "VERSION").unwrap();
    b.into_inner().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn bz2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zip_archive(version: &str) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    z.start_file("app/VERSION", opts).unwrap();
    z.write_all(version.as_bytes()).unwrap();
    z.start_file("app/bin/run", opts.unix_permissions(0o755)).unwrap();
    z.write_all(b"#!/bin/sh\n").unwrap();
    z.finish().unwrap().into_inner()
}

fn md5(data: &[u8]) -> String {
    hex::encode(md5::Md5::digest(data))
}

fn write_recipe(recipes: &Path, states: Value) {
    let doc = json!({"component": {"init": {"state": states}}});
    std::fs::write(recipes.join("app-arc.json"), doc.to_string()).unwrap();
}

fn logs_of(statelog: &Path, version: u64) -> Vec<Value> {
    read_jsonl(statelog).into_iter().filter(|l| l["recipe_version"] == version).collect()
}

fn comment(l: &Value) -> &str {
    l["state_comment"].as_str().unwrap_or("")
}

struct Stack {
    _tmp: tempfile::TempDir,
    work: std::path::PathBuf,
    recipes: std::path::PathBuf,
    statelog: std::path::PathBuf,
    procs: Vec<Proc>,
}

impl Stack {
    fn start(states: impl FnOnce(&Path) -> Value) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let work = dir.join("work");
        let recipes = dir.join("recipes");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&recipes).unwrap();
        write_recipe(&recipes, states(&work));
        let statelog = dir.join("statelog.jsonl");
        let socket = dir.join("helper.sock");
        let helper_state = dir.join("helper-state").display().to_string();
        let (backend, port) = start_backend(&dir, &recipes, &statelog, &["--poll-ms", "100"]);
        let helper = start_helper_with(&dir, &socket, &["--state-dir", &helper_state]);
        let agent = start_agent(&dir, port, "app-arc", "i-arc", &socket, &["--round-delay", "1"]);
        Stack { _tmp: tmp, work, recipes, statelog, procs: vec![backend, helper, agent] }
    }

    /// Waits for `n` StateLogs of `version`.
    fn wait_logs(&self, version: u64, n: usize) -> Vec<Value> {
        let ok = wait_until(Duration::from_secs(60), || logs_of(&self.statelog, version).len() >= n);
        assert!(
            ok,
            "{n} StateLogs of version {version} expected; got {:#?}\nagent: {}",
            logs_of(&self.statelog, version),
            self.procs[2].log_text()
        );
        logs_of(&self.statelog, version)
    }
}

#[test]
fn archives_in_every_format_and_a_remote_file_apply_once_then_stay_put() {
    let files = Files::start();
    let tar = tar_archive("tar 1\n");
    let tgz = gz(&tar_archive("tgz 1\n"));
    let tbz = bz2(&tar_archive("tbz 1\n"));
    let zip = zip_archive("zip 1\n");
    let tar_url = files.put("a.tar", tar.clone());
    let tgz_url = files.put("a.tgz", tgz.clone());
    let tbz_url = files.put("dist/a.tbz", tbz.clone());
    let sums_url = files.put("dist/SUMS", format!("{}  a.tbz\n", md5(&tbz)).into_bytes());
    let zip_url = files.put("a.zip", zip);
    let remote_url = files.put("remote.conf", b"remote 1\n".to_vec());

    let stack = Stack::start(|w| {
        let w = w.display();
        json!([
            {"id": "s-tar", "module": "common.archive", "parameter": {
                "path": format!("{w}/tar"), "source": tar_url, "checksum": format!("md5:{}", md5(&tar))}},
            {"id": "s-tgz", "module": "common.archive", "parameter": {
                "path": format!("{w}/tgz"), "source": tgz_url,
                "checksum": format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tgz)))}},
            {"id": "s-tbz", "module": "common.archive", "parameter": {
                "path": format!("{w}/tbz"), "source": tbz_url, "checksum": sums_url}},
            {"id": "s-zip", "module": "common.archive", "parameter": {
                "path": format!("{w}/zip"), "source": zip_url, "if-path-absent": [format!("{w}/zip/app/VERSION")]}},
            {"id": "s-remote", "module": "linux.file", "parameter": {
                "path": format!("{w}/etc/remote.conf"), "remote_uri": remote_url, "mode": "0600"}}
        ])
    });
    // Three rounds of five states.
    let logs = stack.wait_logs(1, 15);
    for l in &logs {
        assert_eq!(l["state_result"], true, "{l}");
    }
    for l in &logs[..5] {
        assert!(comment(l).contains("changed:"), "round 1 changes: {l}");
    }
    for l in &logs[5..15] {
        assert!(!comment(l).contains("changed:"), "later rounds change nothing: {l}");
    }
    let w = &stack.work;
    for (dir, version) in [("tar", "tar 1\n"), ("tgz", "tgz 1\n"), ("tbz", "tbz 1\n"), ("zip", "zip 1\n")] {
        assert_eq!(std::fs::read_to_string(w.join(dir).join("app/VERSION")).unwrap(), version, "{dir}");
        let run = std::fs::metadata(w.join(dir).join("app/bin/run")).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&run.permissions()) & 0o777, 0o755, "{dir}");
    }
    assert_eq!(std::fs::read_link(w.join("tgz/app/current")).unwrap(), Path::new("VERSION"));
    assert_eq!(std::fs::read_to_string(w.join("etc/remote.conf")).unwrap(), "remote 1\n");
    // Archives with a checksum or a present if-path-absent are not even downloaded
    // again; the remote file is fetched every round and compared.
    for name in ["a.tar", "a.tgz", "dist/a.tbz", "dist/SUMS", "a.zip"] {
        assert_eq!(files.hits(name), 1, "{name} fetched once");
    }
    assert!(files.hits("remote.conf") >= 3);
    // The daemon's downloads are gone once their states ran.
    let fetch_dir = stack._tmp.path().join("i-arc.state/fetch");
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_dir(&fetch_dir).unwrap().count() == 0));

    // New remote content and a new checksum: both are picked up by the next version.
    let tar2 = tar_archive("tar 2\n");
    let tar_url = files.put("a2.tar", tar2.clone());
    files.put("remote.conf", b"remote 2\n".to_vec());
    write_recipe(
        &stack.recipes,
        json!([
            {"id": "s-tar", "module": "common.archive", "parameter": {
                "path": w.join("tar"), "source": tar_url, "checksum": format!("md5:{}", md5(&tar2))}},
            {"id": "s-remote", "module": "linux.file", "parameter": {
                "path": w.join("etc/remote.conf"), "remote_uri": files.base.clone() + "/remote.conf", "mode": "0600"}}
        ]),
    );
    let v2 = stack.wait_logs(2, 4);
    assert!(v2[..2].iter().all(|l| l["state_result"] == true && comment(l).contains("changed:")), "{v2:#?}");
    assert!(v2[2..4].iter().all(|l| l["state_result"] == true && !comment(l).contains("changed:")), "{v2:#?}");
    assert_eq!(std::fs::read_to_string(w.join("tar/app/VERSION")).unwrap(), "tar 2\n");
    assert_eq!(std::fs::read_to_string(w.join("etc/remote.conf")).unwrap(), "remote 2\n");
    assert_eq!(files.hits("a2.tar"), 1);
}

#[test]
fn mismatches_hostile_archives_and_missing_files_fail_clearly() {
    let files = Files::start();
    let tgz = gz(&tar_archive("1\n"));
    let tgz_url = files.put("a.tgz", tgz);
    let wrong = "0".repeat(32);
    let stack = Stack::start(|w| {
        json!([{"id": "s-bad-sum", "module": "common.archive", "parameter": {
            "path": w.join("sum"), "source": tgz_url, "checksum": format!("md5:{wrong}")}}])
    });
    let l = &stack.wait_logs(1, 1)[0];
    assert_eq!(l["state_result"], false, "{l}");
    assert!(comment(l).contains(&format!("checksum mismatch for {tgz_url}: its md5 is")), "{l}");
    assert!(comment(l).contains(&format!("expected {wrong}; nothing was extracted")), "{l}");
    assert!(!stack.work.join("sum").exists());

    // A traversal attempt, made with a raw header (the tar builder refuses such names).
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"owned"[..]).unwrap();
    let evil_url = files.put("evil.tar", b.into_inner().unwrap());
    let missing_url = files.base.clone() + "/missing.tgz";
    write_recipe(
        &stack.recipes,
        json!([{"id": "s-evil", "module": "common.archive", "parameter": {"path": stack.work.join("evil"), "source": evil_url}}]),
    );
    let l = &stack.wait_logs(2, 1)[0];
    assert_eq!(l["state_result"], false, "{l}");
    assert!(comment(l).contains("entry \"../../escape\": \"..\" components are refused"), "{l}");
    // `../../escape` from `work/evil` would land beside `work`, in its parent.
    let escaped = stack.work.parent().unwrap().join("escape");
    assert!(!escaped.exists(), "{} was written", escaped.display());
    assert!(!stack.work.join("evil").exists());

    write_recipe(
        &stack.recipes,
        json!([{"id": "s-404", "module": "common.archive", "parameter": {"path": stack.work.join("m"), "source": missing_url}}]),
    );
    let l = &stack.wait_logs(3, 1)[0];
    assert_eq!(l["state_result"], false, "{l}");
    assert!(comment(l).contains(&format!("download failed: {missing_url}: HTTP 404")), "{l}");
}
