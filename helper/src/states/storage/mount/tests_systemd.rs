//! `linux.mount` through both [`Mounter`]s without root or real mounts.
//!
//! systemd: a fake `Manager` on one end of a socket pair (zbus peer-to-peer), the real
//! [`Systemd`] client on the other, so that the D-Bus calls (`StartTransientUnit` with
//! its properties, `Reload`, `StartUnit`, `JobRemoved` matching) are what runs. The
//! fake "mounts" by adding a line to the test's mountinfo file, and its "fstab
//! generator" makes a unit of each line of the test's fstab on `Reload`.
//! mount(8): a script in place of `mount` that does the same.
// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use opsagent_proto::catalogue::LinuxMount;
use serde_json::{json, Value as Json};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

use super::*;
use crate::states::testutil::{end_job, fake_systemd, typed};

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum SystemdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
    UnitExists(String),
}

#[derive(Debug, Default)]
struct World {
    calls: Vec<String>,
    /// Loaded units and what they mount: (What, Where, Type).
    units: BTreeMap<String, (String, String, String)>,
    /// Sources the fake generator makes no unit of (as systemd in a container does
    /// with device entries).
    ignored_by_generator: BTreeSet<String>,
    /// Result of the next job.
    job_result: String,
    /// Whether a `done` job shows in mountinfo (a mount that propagates).
    visible: bool,
    fstab: PathBuf,
    mountinfo: PathBuf,
    next_job: u32,
}

type Shared = Arc<Mutex<World>>;

struct Manager(Shared);

impl Manager {
    /// Ends the job on the fake (see [`end_job`]).
    async fn job(&self, e: &SignalEmitter<'_>, name: &str) -> Result<OwnedObjectPath, SystemdError> {
        let (id, result) = {
            let mut w = self.0.lock().unwrap();
            w.next_job += 1;
            let id = w.next_job;
            let result = w.job_result.clone();
            let (what, where_, fstype) = w.units[name].clone();
            if result == "done" && w.visible {
                let line =
                    format!("{} 1 0:{id} / {} rw,relatime - {fstype} {what} rw\n", 100 + id, escape_octal(&where_));
                let mut text = fs::read_to_string(&w.mountinfo).unwrap_or_default();
                text.push_str(&line);
                fs::write(&w.mountinfo, text).unwrap();
            }
            if result != "done" {
                // CollectMode=inactive-or-failed: a failed transient unit goes away.
                w.units.remove(name);
            }
            (id, result)
        };
        Ok(end_job(e, id, name, &result).await?)
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn start_unit(
        &self,
        name: &str,
        mode: &str,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, SystemdError> {
        {
            let mut w = self.0.lock().unwrap();
            w.calls.push(format!("StartUnit {name} {mode}"));
            if !w.units.contains_key(name) {
                return Err(SystemdError::NoSuchUnit(format!("Unit {name} not found.")));
            }
        }
        self.job(&e, name).await
    }

    async fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: Vec<(String, OwnedValue)>,
        aux: Vec<(String, Vec<(String, OwnedValue)>)>,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, SystemdError> {
        {
            let mut w = self.0.lock().unwrap();
            let props: Vec<String> =
                properties.into_iter().map(|(k, v)| format!("{k}={}", String::try_from(v).unwrap())).collect();
            w.calls.push(format!("StartTransientUnit {name} {mode} {} aux={}", props.join(" "), aux.len()));
            if w.units.contains_key(name) {
                return Err(SystemdError::UnitExists(format!(
                    "Unit {name} was already loaded or has a fragment file."
                )));
            }
            let get = |k: &str| props.iter().find_map(|p| p.strip_prefix(&format!("{k}="))).unwrap().to_string();
            let unit = (get("What"), get("Where"), get("Type"));
            w.units.insert(name.to_string(), unit);
        }
        self.job(&e, name).await
    }

    async fn reload(&self) -> Result<(), SystemdError> {
        let mut w = self.0.lock().unwrap();
        w.calls.push("Reload".into());
        let text = fs::read_to_string(&w.fstab).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || f[0].starts_with('#') || w.ignored_by_generator.contains(f[0]) {
                continue;
            }
            let where_ = unescape_octal(f[1]);
            let unit = systemd::unit_name_from_path(Path::new(&where_), "mount").unwrap();
            w.units.insert(unit.to_string(), (f[0].to_string(), where_, f[2].to_string()));
        }
        Ok(())
    }
}

struct Fake {
    world: Shared,
    mounter: SystemdMount,
    host: Host,
    dir: tempfile::TempDir,
    _server: zbus::Connection,
}

impl Fake {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = Host {
            fstab: AbsPath::parse(&dir.path().join("fstab").to_string_lossy()).unwrap(),
            mountinfo: dir.path().join("mountinfo"),
        };
        fs::write(host.fstab.as_path(), "# static file system information\n").unwrap();
        fs::write(&host.mountinfo, "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n").unwrap();
        let world = Arc::new(Mutex::new(World {
            job_result: "done".into(),
            visible: true,
            fstab: host.fstab.as_path().to_path_buf(),
            mountinfo: host.mountinfo.clone(),
            ..World::default()
        }));
        let (systemd, server) = fake_systemd(Manager(Arc::clone(&world))).await;
        Self { world, mounter: SystemdMount::with(systemd), host, dir, _server: server }
    }

    /// A mount point (made beforehand, so that outcomes list only mounts and fstab).
    fn mount_point(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    async fn apply(&self, raw: Json) -> Outcome {
        let p: LinuxMount = typed("linux.mount", raw);
        apply_with(&p, &self.host, &self.mounter, Cancel::never()).await
    }

    fn calls(&self) -> Vec<String> {
        self.world.lock().unwrap().calls.drain(..).collect()
    }

    fn fstab(&self) -> String {
        fs::read_to_string(self.host.fstab.as_path()).unwrap()
    }
}

fn unit_of(p: &Path) -> String {
    systemd::unit_name_from_path(p, "mount").unwrap().to_string()
}

fn whats(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(|c| format!("{}: {}", c.subject, c.what)).collect()
}

#[tokio::test]
async fn without_fstab_a_transient_unit_mounts_once() {
    let f = Fake::new().await;
    let mnt = f.mount_point("srv/my-data");
    let unit = unit_of(&mnt);
    assert!(unit.ends_with("-srv-my\\x2ddata.mount"), "{unit}");
    let raw = json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "opts": "size=1m,mode=0750"});

    let first = f.apply(raw.clone()).await;
    assert!(first.result, "{first:?}");
    assert_eq!(whats(&first), [format!("{}: tmpfs mounted (tmpfs) by transient systemd unit {unit}", mnt.display())]);
    assert_eq!(
        f.calls(),
        [format!(
            "StartTransientUnit {unit} replace Description=tmpfs mounted by opsagent (linux.mount) What=tmpfs \
             Where={} Type=tmpfs CollectMode=inactive-or-failed Options=size=1m,mode=0750 aux=0",
            mnt.display()
        )]
    );
    assert_eq!(f.fstab(), "# static file system information\n", "fstab: false must not touch the file");

    // Mounted: nothing to do, and systemd is not asked anything.
    let again = f.apply(raw).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert_eq!(again.comment, format!("{}: already as wanted", mnt.display()));
    assert!(f.calls().is_empty());
}

#[tokio::test]
async fn with_fstab_the_line_is_written_reloaded_and_its_unit_started() {
    let f = Fake::new().await;
    let mnt = f.mount_point("data");
    let unit = unit_of(&mnt);
    let raw = json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "fstab": true, "opts": "size=1m"});

    let first = f.apply(raw.clone()).await;
    assert!(first.result, "{first:?}");
    let line = format!("tmpfs {} tmpfs size=1m 0 0", mnt.display());
    // The line first: the mount is made from it.
    assert_eq!(
        whats(&first),
        [
            format!("{}: line for {} written: {line}", f.host.fstab, mnt.display()),
            format!("{}: tmpfs mounted (tmpfs) by systemd unit {unit}, from /etc/fstab", mnt.display()),
        ]
    );
    assert_eq!(f.calls(), ["Reload".to_string(), format!("StartUnit {unit} replace")]);
    assert_eq!(f.fstab(), format!("# static file system information\n{line}\n"));

    let again = f.apply(raw).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert!(f.calls().is_empty(), "nothing to do, nothing asked");

    // Other options while mounted: the line is rewritten and systemd told, no remount.
    let opts = json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "fstab": true, "opts": "size=2m"});
    let changed = f.apply(opts).await;
    assert!(changed.result, "{changed:?}");
    assert_eq!(changed.changes.len(), 1, "{changed:?}");
    assert_eq!(changed.changes[0].subject, f.host.fstab.to_string());
    assert_eq!(f.calls(), ["Reload"]);
}

#[tokio::test]
async fn with_fstab_but_no_generated_unit_a_transient_unit_mounts() {
    let f = Fake::new().await;
    f.world.lock().unwrap().ignored_by_generator.insert("tmpfs".into());
    let mnt = f.mount_point("scratch");
    let unit = unit_of(&mnt);
    let out = f.apply(json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "fstab": true})).await;
    assert!(out.result, "{out:?}");
    let calls = f.calls();
    assert_eq!(calls[..2], ["Reload".to_string(), format!("StartUnit {unit} replace")]);
    assert!(calls[2].starts_with(&format!("StartTransientUnit {unit} replace ")), "{calls:?}");
    assert!(!calls[2].contains("Options="), "no opts, no Options=: {calls:?}");
    assert_eq!(
        out.changes[1].what,
        format!(
            "tmpfs mounted (tmpfs) by transient systemd unit {unit} (systemd made no unit from the /etc/fstab line: \
             its fstab generator ignores device entries in containers)"
        )
    );
}

#[tokio::test]
async fn a_failed_job_names_the_unit_and_the_next_round_retries() {
    let f = Fake::new().await;
    let mnt = f.mount_point("failing");
    let unit = unit_of(&mnt);
    f.world.lock().unwrap().job_result = "failed".into();
    let raw = json!({"device": "server:/export", "filesystem": "nfs", "path": mnt});
    let out = f.apply(raw.clone()).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert_eq!(
        out.comment,
        format!(
            "systemd could not mount it: {unit}: the start job ended with result \"failed\" \
             (journalctl -u {unit} says why)"
        )
    );
    f.calls();
    f.world.lock().unwrap().job_result = "done".into();
    let retried = f.apply(raw).await;
    assert!(retried.result && retried.changes.len() == 1, "{retried:?}");
}

#[tokio::test]
async fn refusals_existing_units_occupied_paths_and_invisible_mounts() {
    let f = Fake::new().await;
    // A unit of that name exists (a unit file) but is not mounted.
    let mnt = f.mount_point("taken");
    let unit = unit_of(&mnt);
    f.world.lock().unwrap().units.insert(unit.clone(), ("/dev/sdz".into(), mnt.display().to_string(), "xfs".into()));
    let out = f.apply(json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt})).await;
    assert!(!out.result, "{out:?}");
    assert!(out.comment.starts_with(&format!("{unit} already exists (a unit file, or an /etc/fstab line, for ")));
    f.calls();

    // Something else mounted there: refused before systemd is asked.
    let busy = f.mount_point("busy");
    let mut text = fs::read_to_string(&f.host.mountinfo).unwrap();
    text.push_str(&format!("50 1 0:77 / {} rw - ext4 /dev/sdq1 rw\n", busy.display()));
    fs::write(&f.host.mountinfo, text).unwrap();
    let out = f.apply(json!({"device": "tmpfs", "filesystem": "tmpfs", "path": busy, "fstab": true})).await;
    assert_eq!(
        out.comment,
        format!("{} already has /dev/sdq1 mounted on it (not tmpfs); unmount it first", busy.display())
    );
    assert!(f.calls().is_empty());
    assert_eq!(f.fstab(), "# static file system information\n");

    // systemd says done, but the mount never shows here.
    f.world.lock().unwrap().visible = false;
    let ghost = f.mount_point("ghost");
    let out = f.apply(json!({"device": "tmpfs", "filesystem": "tmpfs", "path": ghost})).await;
    assert!(!out.result, "{out:?}");
    assert!(out.comment.starts_with("systemd reported success, but "), "{}", out.comment);
}

#[tokio::test]
async fn mount_8_mounts_first_then_writes_fstab() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host {
        fstab: AbsPath::parse(&dir.path().join("fstab").to_string_lossy()).unwrap(),
        mountinfo: dir.path().join("mountinfo"),
    };
    fs::write(&host.mountinfo, "").unwrap();
    let args = dir.path().join("args");
    let script = dir.path().join("mount");
    // Arguments: -t FS [-o OPTS] DEVICE PATH; the last two make the mountinfo line.
    let body = format!(
        "#!/bin/sh\necho \"$@\" >> {}\nfor a; do dev=$mp; mp=$a; done\necho \"60 1 0:88 / $mp rw - $2 $dev rw\" >> {}\n",
        args.display(),
        host.mountinfo.display()
    );
    fs::write(&script, body).unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounter = MountCommand { program: Some(script) };
    let p: LinuxMount = typed(
        "linux.mount",
        json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "fstab": true, "opts": "size=1m"}),
    );
    let out = apply_with(&p, &host, &mounter, Cancel::never()).await;
    assert!(out.result, "{out:?}");
    assert_eq!(fs::read_to_string(&args).unwrap(), format!("-t tmpfs -o size=1m tmpfs {}\n", mnt.display()));
    assert_eq!(
        whats(&out),
        [
            format!("{}: tmpfs mounted (tmpfs)", mnt.display()),
            format!("{}: line for {} written: tmpfs {} tmpfs size=1m 0 0", host.fstab, mnt.display(), mnt.display()),
        ]
    );
    let again = apply_with(&p, &host, &mounter, Cancel::never()).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert_eq!(fs::read_to_string(&args).unwrap().lines().count(), 1, "mounted twice");
}

#[tokio::test]
async fn a_plan_for_a_mount_point_not_yet_made_says_it_would_be_made_and_mounted_and_touches_nothing() {
    let f = Fake::new().await;
    let mnt = f.dir.path().join("not-yet/data");
    let raw = json!({"device": "tmpfs", "filesystem": "tmpfs", "path": mnt, "fstab": true, "opts": "size=1m"});

    let plan = crate::plan::scope(Some(crate::plan::Plan::new()), f.apply(raw)).await;
    assert!(plan.result, "{plan:?}");
    let whats = whats(&plan);
    assert!(whats.iter().any(|w| w.starts_with(&format!("{}: directory created", mnt.display()))), "{whats:?}");
    assert!(whats.contains(&format!("{}: tmpfs mounted (tmpfs)", mnt.display())), "{whats:?}");
    assert!(!mnt.parent().unwrap().exists(), "a plan made the mount point");
    assert_eq!(f.fstab(), "# static file system information\n", "a plan wrote fstab");
    assert!(f.calls().is_empty(), "a plan asked systemd for something");
}
