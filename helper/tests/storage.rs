//! The storage states on real block devices: loop devices made by each test from
//! sparse files in a temporary directory, and torn down (unmounted, LVM metadata and
//! RAID superblocks removed, loop detached) when the test ends, failed or not.
//!
//! Needs root, util-linux, e2fsprogs, xfsprogs, lvm2 and mdadm. Without root or without
//! loop devices (some sandboxes), each test says so on stderr and returns. Creating a
//! logical volume needs the kernel's device-mapper and a RAID array the md driver: where
//! the kernel lacks them, the test checks instead that the state fails with the tool's
//! own reason and changes nothing, and says so on stderr.
//!
//! `tests/vm/run.sh` runs this binary in a Debian VM whose kernel has both, with
//! `OPSAGENT_TEST_KERNEL_STORAGE=required`: there a missing loop device, device-mapper or
//! md driver fails the test instead of skipping, and each real creation prints a
//! `storage-vmtest: created ...` line that the harness looks for.
// The harness sets up loop devices, LVM and RAID with the real tools; the states under
// test still run programs through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::params;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::storage::{lvm, mkfs, mount, raid};
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::Outcome;
use serde_json::json;

/// `losetup -f` picks the first free device; two tests racing for it would collide.
static LOSETUP: Mutex<()> = Mutex::new(());

fn sh(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(program: &str, args: &[&str]) -> String {
    let (ok, text) = sh(program, args);
    assert!(ok, "{program} {args:?} failed: {text}");
    text
}

fn fstype(dev: &str) -> String {
    sh("blkid", &["-p", "-o", "value", "-s", "TYPE", dev]).1.trim().to_string()
}

/// A loop device over a sparse file; detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(dir: &Path, name: &str, mib: u64) -> Self {
        let file = dir.join(name);
        std::fs::File::create(&file).unwrap().set_len(mib << 20).unwrap();
        let _guard = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
        let dev = must("losetup", &["--find", "--show", &file.to_string_lossy()]).trim().to_string();
        Self { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh("wipefs", &["-a", "-q", &self.dev]);
        let _ = sh("losetup", &["-d", &self.dev]);
    }
}

/// Unmounts when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = sh("umount", &["-l", &self.0.to_string_lossy()]);
    }
}

/// Whether the kernel's storage drivers (loop, device-mapper, md) must be there: set by the
/// VM harness, whose guest kernel has them, so that a skip there is a failure.
fn kernel_storage_required() -> bool {
    std::env::var("OPSAGENT_TEST_KERNEL_STORAGE").is_ok_and(|v| v == "required")
}

/// Says on stderr that a part of a test cannot run here; fails instead where it must run.
/// For kernel features (device-mapper, md) that CI's kernel lacks and the VM run
/// (tests/vm/run.sh) has: there they are required.
fn skip(what: &str) {
    assert!(!kernel_storage_required(), "{what}, but OPSAGENT_TEST_KERNEL_STORAGE=required");
    eprintln!("{what}");
}

/// Whether this machine can run the tests at all; says why not on stderr.
fn usable(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        common::skip(&format!("{test}: SKIPPED, needs root (loop devices, mkfs, mount)"));
        return false;
    }
    let missing: Vec<&str> = [
        ("losetup", "util-linux"),
        ("blkid", "util-linux"),
        ("wipefs", "util-linux"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("pvs", "lvm2"),
        ("mdadm", "mdadm"),
    ]
    .into_iter()
    .filter(|(t, _)| opsagent_helper::states::storage::find_tool(t, &[]).is_none())
    .map(|(_, pkg)| pkg)
    .collect();
    assert!(missing.is_empty(), "install the storage tools first: apt-get install -y {}", missing.join(" "));
    let probe = tempfile::tempdir().unwrap();
    let file = probe.path().join("probe");
    std::fs::File::create(&file).unwrap().set_len(1 << 20).unwrap();
    let _guard = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, text) = sh("losetup", &["--find", "--show", &file.to_string_lossy()]);
    if !ok {
        common::skip(&format!("{test}: SKIPPED, loop devices cannot be created here: {}", text.trim()));
        return false;
    }
    let _ = sh("losetup", &["-d", text.trim()]);
    true
}

fn assert_ok(o: &Outcome) {
    assert!(o.result, "state failed: {}", o.comment);
}

fn assert_unchanged(o: &Outcome) {
    assert!(o.result && o.changes.is_empty(), "second application changed something: {o:?}");
}

#[tokio::test]
async fn mkfs_formats_blank_devices_once_and_never_overwrites() {
    if !usable("mkfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Loop::new(dir.path(), "a.img", 64);
    let ModuleParams::LinuxMkfs(ext4) =
        params("linux.mkfs", json!({"device": a.dev, "fstype": "ext4", "label": "opsdata"}))
    else {
        panic!()
    };
    let first = mkfs::apply(&ext4, Cancel::never()).await;
    assert_ok(&first);
    assert_eq!(first.changes.len(), 1, "{first:?}");
    assert_eq!(first.changes[0].what, "ext4 filesystem created (label opsdata)");
    assert_eq!(fstype(&a.dev), "ext4");
    assert_eq!(sh("blkid", &["-p", "-o", "value", "-s", "LABEL", &a.dev]).1.trim(), "opsdata");
    assert_unchanged(&mkfs::apply(&ext4, Cancel::never()).await);

    // Another filesystem asked for on the same device: refused, data kept.
    let ModuleParams::LinuxMkfs(xfs) = params("linux.mkfs", json!({"device": a.dev, "fstype": "xfs"})) else {
        panic!()
    };
    let refused = mkfs::apply(&xfs, Cancel::never()).await;
    assert!(!refused.result && refused.changes.is_empty(), "{refused:?}");
    assert!(
        refused.comment.starts_with(&format!("refusing to create xfs on {}: it holds an ext4 filesystem", a.dev)),
        "{}",
        refused.comment
    );
    assert_eq!(fstype(&a.dev), "ext4");

    // xfs on a blank device (xfs wants 300 MiB at least); a differing label is reported.
    let b = Loop::new(dir.path(), "b.img", 320);
    let made = mkfs::apply(&xfs, Cancel::never()).await;
    assert!(!made.result, "xfs was made on the ext4 device: {made:?}");
    let ModuleParams::LinuxMkfs(xfs_b) = params("linux.mkfs", json!({"device": b.dev, "fstype": "xfs"})) else {
        panic!()
    };
    assert_ok(&mkfs::apply(&xfs_b, Cancel::never()).await);
    assert_eq!(fstype(&b.dev), "xfs");
    assert_unchanged(&mkfs::apply(&xfs_b, Cancel::never()).await);
    let ModuleParams::LinuxMkfs(relabel) =
        params("linux.mkfs", json!({"device": b.dev, "fstype": "xfs", "label": "other"}))
    else {
        panic!()
    };
    let noted = mkfs::apply(&relabel, Cancel::never()).await;
    assert_unchanged(&noted);
    assert!(noted.comment.contains("existing filesystems are not relabelled"), "{}", noted.comment);
}

#[tokio::test]
async fn mount_mounts_persists_in_fstab_and_refuses_other_filesystems() {
    if !usable("mount") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Loop::new(dir.path(), "a.img", 64);
    let blank = Loop::new(dir.path(), "blank.img", 16);
    must("mke2fs", &["-q", "-F", "-t", "ext4", &a.dev]);
    let mnt = dir.path().join("mnt/data");
    let fstab = dir.path().join("fstab");
    std::fs::write(&fstab, "# static file system information\nUUID=1234 / ext4 errors=remount-ro 0 1\n").unwrap();
    let host = mount::Host {
        fstab: AbsPath::parse(&fstab.to_string_lossy()).unwrap(),
        mountinfo: PathBuf::from("/proc/self/mountinfo"),
    };
    let _unmount = Unmount(mnt.clone());
    let raw =
        json!({"device": a.dev, "filesystem": "ext4", "path": mnt, "fstab": true, "opts": "noatime", "pass": "2"});
    let ModuleParams::LinuxMount(p) = params("linux.mount", raw) else { panic!() };

    let first = mount::apply_on(&p, &host, Cancel::never()).await;
    assert_ok(&first);
    let what: Vec<&str> = first.changes.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(what.len(), 4, "{what:?}"); // two directories, the mount, the fstab line
    assert_eq!(what[2], format!("{} mounted (ext4)", a.dev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.lines().any(|l| l.contains(&format!(" {} ", mnt.display())) && l.contains(" - ext4 ")),
        "not in mountinfo"
    );
    let line = format!("{} {} ext4 noatime 0 2", a.dev, mnt.display());
    assert_eq!(
        std::fs::read_to_string(&fstab).unwrap(),
        format!("# static file system information\nUUID=1234 / ext4 errors=remount-ro 0 1\n{line}\n")
    );
    assert_unchanged(&mount::apply_on(&p, &host, Cancel::never()).await);

    // Another device asked for at the same place: the mount there is not touched.
    let b = Loop::new(dir.path(), "b.img", 64);
    must("mke2fs", &["-q", "-F", "-t", "ext4", &b.dev]);
    let ModuleParams::LinuxMount(other) =
        params("linux.mount", json!({"device": b.dev, "filesystem": "ext4", "path": mnt}))
    else {
        panic!()
    };
    let busy = mount::apply_on(&other, &host, Cancel::never()).await;
    assert!(!busy.result && busy.comment.contains("already has"), "{busy:?}");

    // The wrong filesystem type, and a device with none: refused before mounting.
    let ModuleParams::LinuxMount(wrong) =
        params("linux.mount", json!({"device": b.dev, "filesystem": "xfs", "path": dir.path().join("m2")}))
    else {
        panic!()
    };
    let out = mount::apply_on(&wrong, &host, Cancel::never()).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(out.comment, format!("refusing to mount {} as xfs: it holds an ext4 filesystem", b.dev));
    let ModuleParams::LinuxMount(none) =
        params("linux.mount", json!({"device": blank.dev, "filesystem": "ext4", "path": dir.path().join("m3")}))
    else {
        panic!()
    };
    let out = mount::apply_on(&none, &host, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("holds no filesystem"), "{out:?}");
    assert!(!dir.path().join("m2").exists() && !dir.path().join("m3").exists());
}

/// Removes the test's volume group and physical volumes when dropped.
struct LvmCleanup {
    vg: String,
    devs: Vec<String>,
}

impl Drop for LvmCleanup {
    fn drop(&mut self) {
        let _ = sh("vgremove", &["-f", "-y", &self.vg]);
        for d in &self.devs {
            let _ = sh("pvremove", &["-ff", "-y", d]);
        }
    }
}

#[tokio::test]
async fn lvm_objects_are_created_once_and_filesystems_are_refused() {
    if !usable("lvm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) =
        (Loop::new(dir.path(), "a.img", 32), Loop::new(dir.path(), "b.img", 32), Loop::new(dir.path(), "c.img", 32));
    let vg = format!("opsagent_test_{}", std::process::id());
    let _cleanup = LvmCleanup { vg: vg.clone(), devs: vec![a.dev.clone(), b.dev.clone(), c.dev.clone()] };
    must("mke2fs", &["-q", "-F", "-t", "ext4", &a.dev]);

    // pv: a device with a filesystem is refused without force.
    let ModuleParams::LinuxLvmPv(pv_a) = params("linux.lvm.pv", json!({"path": [a.dev]})) else { panic!() };
    let refused = lvm::apply_pv(&pv_a, Cancel::never()).await;
    assert!(!refused.result && refused.changes.is_empty(), "{refused:?}");
    assert!(refused.comment.contains("it holds an ext4 filesystem; set force: true"), "{}", refused.comment);
    assert_eq!(fstype(&a.dev), "ext4");
    let ModuleParams::LinuxLvmPv(pv_b) = params("linux.lvm.pv", json!({"path": [b.dev]})) else { panic!() };
    let made = lvm::apply_pv(&pv_b, Cancel::never()).await;
    assert_ok(&made);
    assert_eq!(made.changes.len(), 1);
    assert_eq!(fstype(&b.dev), "LVM2_member");
    assert_unchanged(&lvm::apply_pv(&pv_b, Cancel::never()).await);
    let ModuleParams::LinuxLvmPv(forced) = params("linux.lvm.pv", json!({"path": [a.dev], "force": true})) else {
        panic!()
    };
    assert_ok(&lvm::apply_pv(&forced, Cancel::never()).await);
    assert_eq!(fstype(&a.dev), "LVM2_member");

    // vg: created on the two PVs, then extended with a blank device.
    let ModuleParams::LinuxLvmVg(vg2) = params("linux.lvm.vg", json!({"name": vg, "path": [a.dev, b.dev]})) else {
        panic!()
    };
    let made = lvm::apply_vg(&vg2, Cancel::never()).await;
    assert_ok(&made);
    assert_eq!(made.changes[0].what, format!("volume group created on {}, {}", a.dev, b.dev));
    assert_unchanged(&lvm::apply_vg(&vg2, Cancel::never()).await);
    let ModuleParams::LinuxLvmVg(vg3) = params("linux.lvm.vg", json!({"name": vg, "path": [a.dev, b.dev, c.dev]}))
    else {
        panic!()
    };
    let extended = lvm::apply_vg(&vg3, Cancel::never()).await;
    assert_ok(&extended);
    assert_eq!(extended.changes.len(), 1, "{extended:?}");
    assert_unchanged(&lvm::apply_vg(&vg3, Cancel::never()).await);
    let pvs = must("pvs", &["--noheadings", "-o", "pv_name,vg_name"]);
    for d in [&a.dev, &b.dev, &c.dev] {
        assert!(pvs.lines().any(|l| l.contains(d.as_str()) && l.contains(&vg)), "{d} not in {vg}: {pvs}");
    }

    // lv: needs the kernel's device-mapper.
    let ModuleParams::LinuxLvmLv(lv) = params("linux.lvm.lv", json!({"name": "data", "vg-name": vg, "le-size": "8m"}))
    else {
        panic!()
    };
    let out = lvm::apply_lv(&lv, Cancel::never()).await;
    let dm = std::fs::read_to_string("/proc/misc").unwrap_or_default().contains("device-mapper");
    if dm {
        assert_ok(&out);
        let node = format!("/dev/{vg}/data");
        assert_eq!(out.changes.len(), 1, "{out:?}");
        assert_eq!(
            (out.changes[0].subject.as_str(), out.changes[0].what.as_str()),
            (node.as_str(), "logical volume created")
        );
        let lvs = must(
            "lvs",
            &["--noheadings", "--units", "m", "--nosuffix", "-o", "lv_name,vg_name,lv_size,lv_active", &vg],
        );
        let row: Vec<&str> = lvs.split_whitespace().collect();
        assert_eq!(row.len(), 4, "{lvs}");
        assert_eq!((row[0], row[1], row[3]), ("data", vg.as_str(), "active"), "{lvs}");
        assert_eq!(row[2].parse::<f64>().unwrap_or_default(), 8.0, "{lvs}");
        assert_unchanged(&lvm::apply_lv(&lv, Cancel::never()).await);
        // The volume is a usable block device: a filesystem goes on it, and once it holds one,
        // the same LV asked for again is still left alone.
        let ModuleParams::LinuxMkfs(fs) = params("linux.mkfs", json!({"device": node, "fstype": "ext4"})) else {
            panic!()
        };
        assert_ok(&mkfs::apply(&fs, Cancel::never()).await);
        assert_eq!(fstype(&node), "ext4");
        assert_unchanged(&lvm::apply_lv(&lv, Cancel::never()).await);
        eprintln!("storage-vmtest: created linux.lvm.lv {node} (8 MiB, active, ext4 made on it)");
    } else {
        skip("lvm: this kernel has no device-mapper; checking that lvcreate's failure is reported");
        assert!(!out.result && out.changes.is_empty(), "{out:?}");
        assert!(out.comment.contains("lvcreate") && out.comment.contains("exited with status"), "{}", out.comment);
    }
    let ModuleParams::LinuxLvmLv(orphan) =
        params("linux.lvm.lv", json!({"name": "data", "vg-name": "no_such_vg_opsagent", "le-size": "8m"}))
    else {
        panic!()
    };
    let out = lvm::apply_lv(&orphan, Cancel::never()).await;
    assert_eq!(out.comment, "volume group no_such_vg_opsagent does not exist (create it with linux.lvm.vg first)");
}

#[tokio::test]
async fn raid_refuses_members_with_data_and_creates_arrays_once() {
    if !usable("raid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) =
        (Loop::new(dir.path(), "a.img", 32), Loop::new(dir.path(), "b.img", 32), Loop::new(dir.path(), "c.img", 32));
    must("mke2fs", &["-q", "-F", "-t", "ext4", &c.dev]);
    let array = format!("/dev/md{}", 100 + std::process::id() % 100);
    let node_existed = Path::new(&array).exists();
    struct Stop(String, bool, Vec<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = sh("mdadm", &["--stop", &self.0]);
            for d in &self.2 {
                let _ = sh("mdadm", &["--zero-superblock", d]);
            }
            // Without the md driver, mdadm leaves the node it tried to open.
            if !self.1 {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
    let _stop = Stop(array.clone(), node_existed, vec![a.dev.clone(), b.dev.clone()]);

    let ModuleParams::LinuxRaid(with_fs) =
        params("linux.raid", json!({"device-name": array, "devices": [a.dev, c.dev], "level": "raid1"}))
    else {
        panic!()
    };
    let refused = raid::apply(&with_fs, Cancel::never()).await;
    assert!(!refused.result && refused.changes.is_empty(), "{refused:?}");
    assert!(
        refused
            .comment
            .contains(&format!("refusing to use {} as a member of {array}: it holds an ext4 filesystem", c.dev)),
        "{}",
        refused.comment
    );
    assert_eq!(fstype(&c.dev), "ext4");

    let ModuleParams::LinuxRaid(p) = params(
        "linux.raid",
        json!({"device-name": array, "devices": [a.dev, b.dev], "level": "raid1", "arguments": [{"key": "metadata", "value": "1.2"}]}),
    ) else {
        panic!()
    };
    let out = raid::apply(&p, Cancel::never()).await;
    if Path::new("/proc/mdstat").exists() {
        assert_ok(&out);
        assert_eq!(out.changes.len(), 1, "{out:?}");
        assert_eq!(out.changes[0].what, format!("raid1 array created on {}, {}", a.dev, b.dev));
        let detail = must("mdadm", &["--detail", &array]);
        assert!(detail.contains("Raid Level : raid1") && detail.contains("Raid Devices : 2"), "{detail}");
        for m in [&a.dev, &b.dev] {
            assert_eq!(fstype(m), "linux_raid_member");
            assert!(detail.lines().any(|l| l.trim_end().ends_with(m.as_str())), "{m} not in the array: {detail}");
        }
        let md = array.trim_start_matches("/dev/");
        let mdstat = std::fs::read_to_string("/proc/mdstat").unwrap();
        assert!(mdstat.lines().any(|l| l.starts_with(&format!("{md} : active")) && l.contains("raid1")), "{mdstat}");
        assert_unchanged(&raid::apply(&p, Cancel::never()).await);
        // A stopped array whose members all carry its superblock is assembled, not created anew.
        must("mdadm", &["--stop", &array]);
        let again = raid::apply(&p, Cancel::never()).await;
        assert_ok(&again);
        assert_eq!(again.changes.len(), 1, "{again:?}");
        assert_eq!(again.changes[0].what, format!("array assembled from {}, {}", a.dev, b.dev));
        assert_unchanged(&raid::apply(&p, Cancel::never()).await);
        eprintln!(
            "storage-vmtest: created linux.raid {array} (raid1 on {}, {}; stopped and assembled again)",
            a.dev, b.dev
        );
    } else {
        skip("raid: this kernel has no md driver; checking that mdadm's failure is reported");
        assert!(!out.result && out.changes.is_empty(), "{out:?}");
        assert!(
            out.comment.contains("mdadm --create") && out.comment.contains("exited with status"),
            "{}",
            out.comment
        );
    }
}

/// A plan of `work` (a state's run) as the helper's dispatch makes it: in a plan context,
/// the outcome marked planned, a refused write turned into its step.
async fn plan_of(module: &str, work: impl std::future::Future<Output = Outcome>) -> Outcome {
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), work).await;
    opsagent_helper::states::planned(out, plan.refused(), module)
}

fn change_lines(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

/// What a storage state could change on these devices: the signature blkid finds on
/// each, and LVM's view of them and of the test's volume group only (the other tests of
/// this binary change theirs meanwhile).
fn storage_view(devs: &[&str], vg: &str) -> String {
    let lvm = |cmd: &str, args: &[&str]| {
        let out = Command::new(cmd).args(args).env("LVM_SUPPRESS_FD_WARNINGS", "1").output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let mut view: Vec<String> = devs.iter().map(|d| format!("{d}: {:?}", fstype(d))).collect();
    let mut pvs = vec!["--noheadings", "-o", "pv_name,vg_name"];
    pvs.extend(devs);
    view.push(lvm("pvs", &pvs));
    view.push(lvm("vgs", &["--noheadings", "-o", "vg_name,pv_count", vg]));
    view.push(lvm("lvs", &["--noheadings", "-o", "lv_path,lv_active", vg]));
    view.join("\n")
}

/// What a RAID state could change on these members and this array: the signature blkid
/// finds on each member, its md superblock (`mdadm --examine`: array UUID, state, event
/// count, update time) and the array's line of /proc/mdstat, if any.
fn raid_view(devs: &[&str], array: &str) -> String {
    let md = array.trim_start_matches("/dev/");
    let mut view: Vec<String> =
        devs.iter().map(|d| format!("{d}: {:?}\n{}", fstype(d), sh("mdadm", &["--examine", d]).1)).collect();
    let mdstat = std::fs::read_to_string("/proc/mdstat").unwrap_or_default();
    view.extend(mdstat.lines().filter(|l| l.starts_with(&format!("{md} :"))).map(str::to_string));
    view.join("\n")
}

/// Issue 19's drift cycle, as `tests/system/plan_states.sh` makes it for the system
/// modules: plan (exactly `want`, `view` of the devices unchanged) -> apply (the same
/// changes) -> plan (nothing). Ends with a `storage-vmtest: plan cycle MODULE ...` line,
/// which the VM harness (tests/vm/run.sh) requires for linux.lvm.lv and linux.raid.
async fn storage_cycle<F, Fut>(module: &str, view: impl Fn() -> String, run: F, want: &[String])
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let before = view();
    let planned = plan_of(module, run()).await;
    assert!(planned.result && planned.planned, "{module}: {planned:?}");
    assert_eq!(change_lines(&planned), want, "{module}: the plan");
    assert_eq!(view(), before, "{module}: the plan changed the devices");
    let applied = run().await;
    assert_ok(&applied);
    assert_eq!(change_lines(&applied), want, "{module}: the apply did not make the planned change");
    let again = plan_of(module, run()).await;
    assert!(again.result && again.planned && again.changes.is_empty(), "{module}: plan after the apply: {again:?}");
    eprintln!("storage-vmtest: plan cycle {module}: {want:?} planned, applied, then nothing to plan");
}

#[tokio::test]
async fn plan_apply_plan_cycles_of_mkfs_and_lvm_on_loop_devices() {
    if !usable("storage plan cycles") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Loop::new(dir.path(), "a.img", 32), Loop::new(dir.path(), "b.img", 32));
    let vg = format!("opsagent_plan_{}", std::process::id());
    let _cleanup = LvmCleanup { vg: vg.clone(), devs: vec![a.dev.clone(), b.dev.clone()] };
    let devs = [a.dev.as_str(), b.dev.as_str()];
    let view = || storage_view(&devs, &vg);

    // linux.mkfs: a blank device.
    let ModuleParams::LinuxMkfs(fs) = params("linux.mkfs", json!({"device": a.dev, "fstype": "ext4", "label": "plan"}))
    else {
        panic!()
    };
    let want = [format!("{}: ext4 filesystem created (label plan)", a.dev)];
    storage_cycle("linux.mkfs", view, || mkfs::apply(&fs, Cancel::never()), &want).await;
    assert_eq!(fstype(&a.dev), "ext4");

    // linux.lvm.pv, then linux.lvm.vg on it: each absent.
    let ModuleParams::LinuxLvmPv(pv) = params("linux.lvm.pv", json!({"path": [b.dev]})) else { panic!() };
    let want = [format!("{}: physical volume created", b.dev)];
    storage_cycle("linux.lvm.pv", view, || lvm::apply_pv(&pv, Cancel::never()), &want).await;
    let ModuleParams::LinuxLvmVg(vgp) = params("linux.lvm.vg", json!({"name": vg, "path": [b.dev]})) else { panic!() };
    let want = [format!("{vg}: volume group created on {}", b.dev)];
    storage_cycle("linux.lvm.vg", view, || lvm::apply_vg(&vgp, Cancel::never()), &want).await;

    // linux.lvm.lv: only where the kernel has device-mapper.
    if !std::fs::read_to_string("/proc/misc").unwrap_or_default().contains("device-mapper") {
        skip("storage plan cycles: no device-mapper in this kernel; linux.lvm.lv not cycled");
        return;
    }
    let ModuleParams::LinuxLvmLv(lv) = params("linux.lvm.lv", json!({"name": "data", "vg-name": vg, "le-size": "8m"}))
    else {
        panic!()
    };
    let want = [format!("/dev/{vg}/data: logical volume created")];
    storage_cycle("linux.lvm.lv", view, || lvm::apply_lv(&lv, Cancel::never()), &want).await;
}

#[tokio::test]
async fn plan_apply_plan_cycles_of_raid_on_loop_devices() {
    if !usable("raid plan cycles") {
        return;
    }
    // Only where the kernel has the md driver (the VM of tests/vm/run.sh).
    if !Path::new("/proc/mdstat").exists() {
        skip("raid plan cycles: no md driver in this kernel; linux.raid not cycled");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Loop::new(dir.path(), "a.img", 32), Loop::new(dir.path(), "b.img", 32));
    // Not the array of the other raid test of this binary (md100..md199).
    let array = format!("/dev/md{}", 200 + std::process::id() % 100);
    struct Stop(String, Vec<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = sh("mdadm", &["--stop", &self.0]);
            for d in &self.1 {
                let _ = sh("mdadm", &["--zero-superblock", d]);
            }
        }
    }
    let _stop = Stop(array.clone(), vec![a.dev.clone(), b.dev.clone()]);
    let devs = [a.dev.as_str(), b.dev.as_str()];
    let view = || raid_view(&devs, &array);
    let ModuleParams::LinuxRaid(p) = params(
        "linux.raid",
        json!({"device-name": array, "devices": [a.dev, b.dev], "level": "raid1", "arguments": [{"key": "metadata", "value": "1.2"}]}),
    ) else {
        panic!()
    };

    // Blank members, no array: created.
    let want = [format!("{array}: raid1 array created on {}, {}", a.dev, b.dev)];
    storage_cycle("linux.raid", view, || raid::apply(&p, Cancel::never()), &want).await;
    assert_eq!((fstype(&a.dev), fstype(&b.dev)), ("linux_raid_member".into(), "linux_raid_member".into()));

    // The array stopped (a reboot without mdadm.conf): its members' superblocks are there,
    // so it is assembled, not created anew.
    must("mdadm", &["--stop", &array]);
    let want = [format!("{array}: array assembled from {}, {}", a.dev, b.dev)];
    storage_cycle("linux.raid", view, || raid::apply(&p, Cancel::never()), &want).await;
    let md = array.trim_start_matches("/dev/");
    let mdstat = std::fs::read_to_string("/proc/mdstat").unwrap();
    assert!(mdstat.lines().any(|l| l.starts_with(&format!("{md} : active")) && l.contains("raid1")), "{mdstat}");
}
