//! `linux.service` against a fake systemd: a `Manager`/`Unit` D-Bus server on one end
//! of a socket pair (zbus peer-to-peer), the real [`Systemd`] client on the other, so
//! the D-Bus code (job subscription before the call, `JobRemoved` matching, uncached
//! `ActiveState`) is what runs.
// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opsagent_proto::catalogue::ModuleParams;
use serde_json::{json, Value};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;

use super::*;
use crate::states::testutil::{end_job, fake_systemd, params};

#[derive(Debug, Clone)]
struct FakeUnit {
    active: String,
    can_reload: bool,
    /// Result of the next start/restart job.
    job_result: String,
    /// ActiveState after a successful start (a unit that dies at once says "failed").
    after_start: String,
}

impl FakeUnit {
    fn new(active: &str) -> Self {
        Self { active: active.into(), can_reload: true, job_result: "done".into(), after_start: "active".into() }
    }
}

#[derive(Debug, Default)]
struct World {
    units: BTreeMap<String, FakeUnit>,
    calls: Vec<String>,
    next_job: u32,
}

type Shared = Arc<Mutex<World>>;

struct Manager(Shared);

fn unit_path(name: &str) -> OwnedObjectPath {
    let escaped: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("_{:02x}", c as u32) })
        .collect();
    OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/unit/{escaped}")).unwrap()
}

impl Manager {
    /// Runs a job on the fake and announces its end (see [`end_job`]).
    async fn job(&self, emitter: &SignalEmitter<'_>, verb: &str, name: &str) -> zbus::fdo::Result<OwnedObjectPath> {
        let (id, result) = {
            let mut w = self.0.lock().unwrap();
            w.calls.push(format!("{verb} {name}"));
            w.next_job += 1;
            let id = w.next_job;
            let Some(u) = w.units.get_mut(name) else {
                return Err(zbus::fdo::Error::Failed(format!("Unit {name} not found.")));
            };
            if verb == "ReloadUnit" && (!u.can_reload || u.active != "active") {
                return Err(zbus::fdo::Error::NotSupported(format!(
                    "Job type reload is not applicable for unit {name}."
                )));
            }
            let result = if verb == "ReloadUnit" { "done".to_string() } else { u.job_result.clone() };
            if result == "done" && verb != "ReloadUnit" {
                u.active = u.after_start.clone();
            }
            (id, result)
        };
        Ok(end_job(emitter, id, name, &result).await?)
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn load_unit(
        &self,
        name: &str,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        self.0.lock().unwrap().calls.push(format!("LoadUnit {name}"));
        let path = unit_path(name);
        server.at(path.clone(), Unit { name: name.to_string(), world: Arc::clone(&self.0) }).await?;
        Ok(path)
    }

    async fn start_unit(
        &self,
        name: &str,
        _mode: &str,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        self.job(&e, "StartUnit", name).await
    }

    async fn reload_unit(
        &self,
        name: &str,
        _mode: &str,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        self.job(&e, "ReloadUnit", name).await
    }

    async fn restart_unit(
        &self,
        name: &str,
        _mode: &str,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        self.job(&e, "RestartUnit", name).await
    }
}

struct Unit {
    name: String,
    world: Shared,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl Unit {
    #[zbus(property)]
    async fn active_state(&self) -> String {
        self.world.lock().unwrap().units.get(&self.name).map_or_else(|| "inactive".to_string(), |u| u.active.clone())
    }

    #[zbus(property)]
    async fn load_state(&self) -> String {
        if self.world.lock().unwrap().units.contains_key(&self.name) { "loaded" } else { "not-found" }.to_string()
    }
}

struct Fake {
    world: Shared,
    systemd: Systemd,
    _server: zbus::Connection,
    tmp: tempfile::TempDir,
}

impl Fake {
    async fn new(units: &[(&str, FakeUnit)]) -> Self {
        let world = Arc::new(Mutex::new(World {
            units: units.iter().map(|(n, u)| (n.to_string(), u.clone())).collect(),
            ..World::default()
        }));
        let (systemd, server) = fake_systemd(Manager(Arc::clone(&world))).await;
        Self { world, systemd, _server: server, tmp: tempfile::tempdir().unwrap() }
    }

    async fn apply(&self, raw: Value) -> Outcome {
        let ModuleParams::LinuxService(p) = params("linux.service", raw) else { panic!() };
        let store = ChecksumStore::new(self.tmp.path());
        run(&p, &StateId::parse("svc-1").unwrap(), &store, &self.systemd, Cancel::never()).await
    }

    /// The calls since the last look, without the LoadUnit lookups.
    fn jobs(&self) -> Vec<String> {
        let mut w = self.world.lock().unwrap();
        w.calls.drain(..).filter(|c| !c.starts_with("LoadUnit")).collect()
    }

    fn set(&self, unit: &str, f: impl FnOnce(&mut FakeUnit)) {
        f(self.world.lock().unwrap().units.get_mut(unit).unwrap());
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

fn changes(o: &Outcome) -> Vec<String> {
    o.changes.iter().map(ToString::to_string).collect()
}

impl Fake {
    async fn plan(&self, raw: Value) -> Outcome {
        let plan = crate::plan::Plan::new();
        crate::plan::scope(Some(plan), self.apply(raw)).await
    }
}

#[tokio::test]
async fn a_plan_says_what_would_be_started_or_reloaded_and_sends_no_job() {
    let f = Fake::new(&[("web.service", FakeUnit::new("inactive")), ("db.service", FakeUnit::new("active"))]).await;
    let conf = f.file("db.conf", "a=1\n");
    let state = json!({"name": ["web", {"key": "db", "value": "restart"}], "watch": [conf]});
    let planned = f.plan(state.clone()).await;
    assert!(planned.result, "{planned:?}");
    assert_eq!(changes(&planned), ["web.service: started", "db.service: restarted"]);
    assert!(f.jobs().is_empty(), "a plan sent jobs");
    // The plan kept no checksum: the apply still sees the watched file as new.
    let applied = f.apply(state.clone()).await;
    assert_eq!(changes(&applied), changes(&planned));
    assert_eq!(f.jobs(), ["StartUnit web.service", "RestartUnit db.service"]);
    let after = f.plan(state).await;
    assert!(after.result && after.changes.is_empty(), "{after:?}");
    assert!(f.jobs().is_empty());
}

#[tokio::test]
async fn a_job_asked_for_in_a_plan_is_refused_before_it_reaches_systemd() {
    let f = Fake::new(&[("web.service", FakeUnit::new("inactive"))]).await;
    let unit = UnitName::service("web").unwrap();
    let planned = crate::plan::scope(Some(crate::plan::Plan::new()), async {
        f.systemd.run(&unit, Job::Start, &mut Cancel::never()).await
    })
    .await;
    assert!(matches!(planned, Err(ServiceError::Plan(_))), "{planned:?}");
    assert!(f.jobs().is_empty(), "the job reached systemd");
    let reload = crate::plan::scope(Some(crate::plan::Plan::new()), f.systemd.daemon_reload()).await;
    assert!(matches!(reload, Err(ServiceError::Plan(_))), "{reload:?}");
}

#[tokio::test]
async fn a_stopped_service_is_started_then_left_alone() {
    let f = Fake::new(&[("web.service", FakeUnit::new("inactive")), ("db.service", FakeUnit::new("active"))]).await;
    let out = f.apply(json!({"name": ["web", "db"]})).await;
    assert!(out.result, "{out:?}");
    assert_eq!(changes(&out), ["web.service: started"]);
    assert_eq!(f.jobs(), ["StartUnit web.service"]);
    let again = f.apply(json!({"name": ["web", "db"]})).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    assert!(f.jobs().is_empty());
}

#[tokio::test]
async fn a_watched_file_reloads_on_first_sight_and_on_change_only() {
    let f = Fake::new(&[("web.service", FakeUnit::new("active"))]).await;
    let conf = f.file("web.conf", "a=1\n");
    let state = json!({"name": ["web"], "watch": [conf]});
    let out = f.apply(state.clone()).await;
    assert!(out.result, "{out:?}");
    assert_eq!(changes(&out), ["web.service: reloaded"]);
    assert!(out.comment.contains("web.conf changed"), "{}", out.comment);
    assert_eq!(f.jobs(), ["ReloadUnit web.service"]);

    let same = f.apply(state.clone()).await;
    assert!(same.result && same.changes.is_empty(), "{same:?}");
    assert!(f.jobs().is_empty());

    f.file("web.conf", "a=2\n");
    let changed = f.apply(state).await;
    assert_eq!(changes(&changed), ["web.service: reloaded"]);
    assert_eq!(f.jobs(), ["ReloadUnit web.service"]);
}

#[tokio::test]
async fn reload_falls_back_to_restart_and_keywords_choose_the_job() {
    let mut no_reload = FakeUnit::new("active");
    no_reload.can_reload = false;
    let f = Fake::new(&[("app.service", no_reload), ("api.service", FakeUnit::new("active"))]).await;
    let conf = f.file("c", "x");
    let out = f.apply(json!({"name": [{"key": "app"}, {"key": "api", "value": "restart"}], "watch": [conf]})).await;
    assert!(out.result, "{out:?}");
    let c = changes(&out);
    assert!(c[0].starts_with("app.service: restarted (reload failed:"), "{c:?}");
    assert_eq!(c[1], "api.service: restarted");
    assert_eq!(f.jobs(), ["ReloadUnit app.service", "RestartUnit app.service", "RestartUnit api.service"]);
}

#[tokio::test]
async fn a_stopped_service_is_started_rather_than_reloaded() {
    let f = Fake::new(&[("web.service", FakeUnit::new("failed"))]).await;
    let conf = f.file("c", "x");
    let out = f.apply(json!({"name": [{"key": "web", "value": "reload"}], "watch": [conf]})).await;
    assert_eq!(changes(&out), ["web.service: started"]);
    assert_eq!(f.jobs(), ["StartUnit web.service"]);
}

#[tokio::test]
async fn a_command_action_runs_and_watch_true_acts_every_round() {
    let f = Fake::new(&[("web.service", FakeUnit::new("active"))]).await;
    let marker = f.tmp.path().join("ran");
    let cmd = format!("echo ran >> {}", marker.display());
    let state = json!({"name": [{"key": "web", "value": cmd}], "watch": true});
    for round in 1..=2 {
        let out = f.apply(state.clone()).await;
        assert!(out.result, "{out:?}");
        assert_eq!(changes(&out), ["web.service: action command ran"]);
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), round);
    }
    assert!(f.jobs().is_empty());
    let failing = f.apply(json!({"name": [{"key": "web", "value": "echo oops; exit 3"}], "watch": true})).await;
    assert!(!failing.result && failing.comment.contains("exited with status 3: oops"), "{failing:?}");
}

#[tokio::test]
async fn failures_keep_the_old_checksums_so_the_action_is_retried() {
    let mut broken = FakeUnit::new("inactive");
    broken.job_result = "failed".into();
    let f = Fake::new(&[("web.service", broken)]).await;
    let conf = f.file("c", "x");
    let state = json!({"name": ["web"], "watch": [conf]});
    let out = f.apply(state.clone()).await;
    assert!(!out.result, "{out:?}");
    assert!(out.comment.starts_with("web.service: the start job ended with result \"failed\"; watched "), "{out:?}");

    f.set("web.service", |u| u.job_result = "done".into());
    let out = f.apply(state.clone()).await;
    assert!(out.result && changes(&out) == ["web.service: started"], "{out:?}");
    f.jobs();
    // Now committed: nothing more to do.
    assert!(f.apply(state).await.changes.is_empty());

    // Started, but dead at once.
    f.set("web.service", |u| {
        u.active = "inactive".into();
        u.after_start = "failed".into();
    });
    let out = f.apply(json!({"name": ["web"]})).await;
    assert!(!out.result && out.comment.contains("is not running after its start job (ActiveState failed)"), "{out:?}");
}

#[tokio::test]
async fn unknown_units_and_bad_names_fail_clearly() {
    let f = Fake::new(&[]).await;
    let out = f.apply(json!({"name": ["ghost"]})).await;
    assert_eq!(out.comment, "ghost.service: no such unit (not found by systemd)");
    crate::states::testutil::refused("linux.service", json!({"name": ["bad name"]}), "parameter \"name\"");
    crate::states::testutil::refused(
        "linux.service",
        json!({"name": ["x"], "watch": ["relative/path"]}),
        "parameter \"watch\"",
    );
}

/// The fallback for hosts without systemd: the `service` command (here a script).
#[tokio::test]
async fn without_systemd_the_service_command_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let state_file = tmp.path().join("running");
    let log = tmp.path().join("log");
    let script = tmp.path().join("service");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> {log}\ncase $2 in\n status) test -e {s} ;;\n start|restart) touch {s} ;;\n reload) test -e {s} ;;\nesac\n",
            log = log.display(),
            s = state_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sysv = SysV { program: script };
    let ModuleParams::LinuxService(p) = params("linux.service", json!({"name": ["cron"]})) else { panic!() };
    let store = ChecksumStore::new(tmp.path());
    let id = StateId::parse("s").unwrap();
    let out = run(&p, &id, &store, &sysv, Cancel::never()).await;
    assert!(out.result && changes(&out) == ["cron.service: started"], "{out:?}");
    let again = run(&p, &id, &store, &sysv, Cancel::never()).await;
    assert!(again.result && again.changes.is_empty(), "{again:?}");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(calls, "cron status\ncron start\ncron status\ncron status\n");
}
