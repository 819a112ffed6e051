//! Walks and changes below directories other users control, attacked by a real
//! concurrent process running as another uid (issue 15, item 2).
//!
//! The attacker owns the managed tree, as `www-data` owns `/var/www`, and swaps a
//! sub-directory for a symbolic link to a root-owned "victim" directory (standing in for
//! `/etc`) while root walks the tree. Nothing of the victim may change, in any round.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test support outside #[test] fns; the attacker runs on real time

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opsagent_proto::catalogue::{LinuxDir, LinuxFile};
use opsagent_proto::request::Outcome;
use serde_json::json;

/// The attacker's uid and gid (`nobody`/`nogroup`): not root, owns the managed tree.
const ATTACKER: u32 = 65534;
const ATTACK_ENV: &str = "OPSAGENT_FDWALK_ATTACK";
const ROUNDS: usize = 200;

/// A directory under a root-owned 0755 temporary directory, owned by `uid`.
fn dir_owned(path: &Path, uid: u32, mode: u32) {
    fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

struct Scene {
    _base: tempfile::TempDir,
    tree: PathBuf,
    victim: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let tree = base.path().join("www");
        dir_owned(&tree, ATTACKER, 0o755);
        for i in 0..8 {
            dir_owned(&tree.join(format!("sub/d{i}")), ATTACKER, 0o755);
        }
        std::os::unix::fs::chown(tree.join("sub"), Some(ATTACKER), Some(ATTACKER)).unwrap();
        let victim = base.path().join("etc");
        for i in 0..8 {
            dir_owned(&victim.join(format!("d{i}")), 0, 0o755);
            fs::write(victim.join(format!("d{i}/conf")), "root's\n").unwrap();
        }
        fs::write(victim.join("shadow"), "root's\n").unwrap();
        fs::set_permissions(victim.join("shadow"), fs::Permissions::from_mode(0o600)).unwrap();
        Self { _base: base, tree, victim }
    }

    /// Every object in the victim, with its owner and mode.
    fn victim_state(&self) -> Vec<(PathBuf, u32, u32)> {
        let mut out = Vec::new();
        let mut pending = vec![self.victim.clone()];
        while let Some(d) = pending.pop() {
            let m = fs::symlink_metadata(&d).unwrap();
            out.push((d.clone(), m.uid(), m.mode() & 0o7777));
            if m.is_dir() {
                pending.extend(fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    }

    /// Starts this test binary again as the attacker, running [`attacker`].
    fn attacker(&self) -> Attacker {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "attacker", "--nocapture", "--test-threads=1"])
            .env(ATTACK_ENV, format!("{}\n{}", self.tree.display(), self.victim.display()))
            .uid(ATTACKER)
            .gid(ATTACKER)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Let it start swapping before the first walk.
        std::thread::sleep(Duration::from_millis(100));
        Attacker(child)
    }
}

struct Attacker(Child);

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test of its own: the attacker of the race tests, run as [`ATTACKER`] in a child
/// process. Swaps `sub` for a link to the victim and back, as fast as it can, for at
/// most a minute. Without the variable it does nothing.
#[test]
fn attacker() {
    let Some(spec) = std::env::var_os(ATTACK_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let (tree, victim) = spec.split_once('\n').unwrap();
    let tree = Path::new(tree);
    let (sub, real, link) = (tree.join("sub"), tree.join("real"), tree.join("link"));
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(victim, &link).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        // rename(2) is atomic: `sub` is always a directory or the link.
        let _ = fs::rename(&sub, &real);
        let _ = fs::rename(&link, &sub);
        // Each state lasts long enough for a step of the walk to meet it.
        std::thread::sleep(Duration::from_micros(200));
        let _ = fs::rename(&sub, &link);
        let _ = fs::rename(&real, &sub);
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn dir_state(raw: serde_json::Value) -> LinuxDir {
    common::typed("linux.dir", raw)
}

#[test]
fn recursive_dir_never_follows_a_link_swapped_in_during_the_walk() {
    let scene = Scene::new();
    let before = scene.victim_state();
    let p =
        dir_state(json!({"path": scene.tree, "user": "nobody", "group": "nogroup", "mode": "0777", "recursive": true}));
    let _attacker = scene.attacker();
    let mut walked = 0;
    for round in 0..ROUNDS {
        let out: Outcome = opsagent_helper::states::dir::apply(&p);
        walked += usize::from(out.result);
        assert_eq!(scene.victim_state(), before, "round {round}: the victim changed; outcome {out:?}");
    }
    // The walks themselves went on: a mid-walk swap fails a round at most, not all.
    assert!(walked > 0, "no walk of {ROUNDS} succeeded");
}

#[test]
fn file_and_parents_never_follow_a_link_swapped_in_on_the_way() {
    let scene = Scene::new();
    let before = scene.victim_state();
    let _attacker = scene.attacker();
    for round in 0..ROUNDS {
        // A file below the swapped directory: its parent is resolved on the way.
        let target = scene.tree.join(format!("sub/d{}/new{round}", round % 8));
        let p: LinuxFile = common::typed("linux.file", json!({"path": target, "content": "x", "mode": "0666"}));
        let out = opsagent_helper::states::file::apply_inline(&p);
        assert_eq!(scene.victim_state(), before, "round {round}: the victim changed; outcome {out:?}");
    }
}

/// A tar of `d0/conf`…`d7/conf` (mode 0640, unlike the victim's 0644) and a file at the
/// top: wherever one of them lands in the victim, its state shows it.
fn hostile_free_tar(dir: &Path) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(6);
        h.set_mode(0o640);
        b.append_data(&mut h, name, &b"pwned\n"[..]).unwrap();
    };
    for i in 0..8 {
        add(&format!("d{i}/conf"));
    }
    add("planted");
    let path = dir.join("release.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    path
}

/// The unpacker is handed `dest` by path and re-resolved nothing but names below the
/// held descriptor: a `dest` (here `www/sub`, in a directory the attacker owns) swapped
/// for a link to the victim between entries changes where nothing lands.
#[test]
fn unpack_never_follows_its_destination_swapped_for_a_link() {
    use opsagent_helper::unpack::{self, ArchiveFormat, Limits};
    let scene = Scene::new();
    let before = scene.victim_state();
    let work = tempfile::tempdir().unwrap();
    let archive = hostile_free_tar(work.path());
    let dest = scene.tree.join("sub");
    let _attacker = scene.attacker();
    let mut unpacked = 0;
    for round in 0..ROUNDS {
        let out = unpack::unpack(&archive, ArchiveFormat::Tar, &dest, &Limits::default(), None);
        unpacked += usize::from(out.is_ok());
        assert_eq!(scene.victim_state(), before, "round {round}: the victim changed; unpack {out:?}");
    }
    // Rounds that opened `dest` while it was the link fail at once (never followed);
    // the others unpack whole into the directory they opened.
    assert!(unpacked > 0, "no unpack of {ROUNDS} succeeded");
}
