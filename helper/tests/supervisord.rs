//! `linux.supervisord` against a real supervisord: a configuration in a temporary
//! directory (its own socket, pidfile and logs), started by the state itself the way a
//! host without systemd as init does (`supervisord -c`, daemonising), programs running
//! `sleep`, watched files changed and the restarts seen as new pids. Every supervisord
//! a test started is stopped when its harness is dropped.
//!
//! Needs supervisor (Debian package `supervisor`; `.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test support code outside #[test] fns; a blocking wait in Drop

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::checksums::ChecksumStore;
use opsagent_helper::states::storage::find_tool;
use opsagent_helper::states::supervisord::{self, Launch, Supervisor};
use opsagent_proto::catalogue::{parse_state, LinuxSupervisord};
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::Outcome;
use serde_json::{json, Value};

fn params(raw: Value) -> LinuxSupervisord {
    let p = parse_state("linux.supervisord", &raw).unwrap_or_else(|e| panic!("{e}")).params;
    LinuxSupervisord::try_from(p).unwrap()
}

/// A supervisord configuration in a temporary directory; its supervisord (if one was
/// started) is stopped on drop.
struct Harness {
    dir: tempfile::TempDir,
    sup: Supervisor,
    store: ChecksumStore,
}

impl Harness {
    fn new(programs: &str) -> Self {
        let supervisord = find_tool("supervisord", &[]).expect("supervisord is missing: apt-get install -y supervisor");
        let supervisorctl =
            find_tool("supervisorctl", &[]).expect("supervisorctl is missing: apt-get install -y supervisor");
        // Under /, root's: supervisord (as root) reads only a configuration root controls.
        let dir = tempfile::Builder::new().prefix(".opsagent-test-supervisord").tempdir_in("/").unwrap();
        let d = dir.path().display();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("supervisord.conf"),
            format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\npidfile={d}/supervisord.pid\nlogfile={d}/supervisord.log\nchildlogdir={d}\nnodaemon=false\n\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles = {d}/conf.d/*.conf\n\n{programs}"
            ),
        )
        .unwrap();
        let store = ChecksumStore::new(&dir.path().join("state"));
        Self { dir, sup: Supervisor { supervisord, supervisorctl, launch: Launch::Direct }, store }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("supervisord.conf")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn apply(&self, raw: Value) -> Outcome {
        let id = StateId::parse("state-supervisord-1").unwrap();
        supervisord::run(&params(raw), &id, &self.store, &self.sup, Cancel::never()).await
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(&self.sup.supervisorctl).arg("-c").arg(self.config()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The pid of a program, from supervisord.
    fn pid_of(&self, program: &str) -> u32 {
        let out = self.ctl(&["pid", program]);
        out.parse().unwrap_or_else(|_| panic!("no pid for {program}: {out:?}"))
    }

    fn supervisord_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("supervisord.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let Some(pid) = self.supervisord_pid().map(Pid::from_raw) else { return };
        // supervisord stops its programs on SIGTERM; SIGKILL if it takes too long.
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..150 {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

fn changes(out: &Outcome) -> Vec<String> {
    assert!(out.result, "state failed: {}\n{}", out.comment, out.stdout);
    out.changes.iter().map(ToString::to_string).collect()
}

const PROGRAMS: &str = "[program:sleeper]\ncommand=/bin/sleep 1000\nstartsecs=1\n\n\
    [group:g]\nprograms=a,b\n\n\
    [program:a]\ncommand=/bin/sleep 1001\nstartsecs=1\n\n\
    [program:b]\ncommand=/bin/sleep 1002\nstartsecs=1\nautostart=false\n";

#[tokio::test]
async fn keeps_programs_running_and_restarts_them_when_watched_files_change() {
    let h = Harness::new(PROGRAMS);
    let app_conf = h.path("app.conf");
    std::fs::write(&app_conf, "v=1\n").unwrap();
    let config = h.config();
    let state = |names: &[&str]| json!({"config": config.to_str().unwrap(), "name": names, "watch": [app_conf.to_str().unwrap()]});

    // Round 1: supervisord is started; the group's program that does not autostart is
    // started; the watched file is seen for the first time, but the programs have just
    // started with it, so nothing is restarted.
    let first = h.apply(state(&["sleeper", "g"])).await;
    assert_eq!(changes(&first), [format!("{}: supervisord started", config.display()), "g:b: started".to_string()]);
    assert!(first.comment.contains("already run with them"), "{}", first.comment);
    let status = h.ctl(&["status"]);
    assert_eq!(status.lines().filter(|l| l.contains("RUNNING")).count(), 3, "{status}");
    let daemon = h.supervisord_pid().expect("supervisord wrote its pidfile");

    // Round 2: nothing to do.
    let second = h.apply(state(&["sleeper", "g"])).await;
    assert_eq!(changes(&second), Vec::<String>::new());

    // The watched file changes: the programs are restarted (new pids), supervisord is not.
    let before = (h.pid_of("sleeper"), h.pid_of("g:a"), h.pid_of("g:b"));
    std::fs::write(&app_conf, "v=2\n").unwrap();
    let third = h.apply(state(&["sleeper", "g"])).await;
    assert_eq!(changes(&third), ["sleeper: restarted", "g:a: restarted", "g:b: restarted"]);
    let after = (h.pid_of("sleeper"), h.pid_of("g:a"), h.pid_of("g:b"));
    assert!(before.0 != after.0 && before.1 != after.1 && before.2 != after.2, "{before:?} {after:?}");
    assert_eq!(h.supervisord_pid(), Some(daemon));
    assert_eq!(changes(&h.apply(state(&["sleeper", "g"])).await), Vec::<String>::new());

    // A program stopped behind the state's back is started again.
    h.ctl(&["stop", "sleeper"]);
    assert_eq!(changes(&h.apply(state(&["sleeper", "g"])).await), ["sleeper: started"]);

    // A program supervisord does not know yet (a new included file): reread + add.
    std::fs::write(h.path("conf.d/extra.conf"), "[program:extra]\ncommand=/bin/sleep 1003\nstartsecs=1\n").unwrap();
    let added = h.apply(state(&["sleeper", "g", "extra"])).await;
    assert_eq!(changes(&added), ["extra: added to supervisord"]);
    assert!(h.ctl(&["status", "extra"]).contains("RUNNING"));
    assert_eq!(changes(&h.apply(state(&["sleeper", "g", "extra"])).await), Vec::<String>::new());

    // The configuration itself changes: supervisord is restarted with it (reload), and
    // its programs with it; the one that does not autostart is started again.
    let sleeper = h.pid_of("sleeper");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n; edited\n");
    std::fs::write(&config, text).unwrap();
    let reloaded = h.apply(state(&["sleeper", "g", "extra"])).await;
    assert_eq!(
        changes(&reloaded),
        [
            format!("{}: supervisord restarted (reload): the configuration changed", config.display()),
            "g:b: started".to_string()
        ]
    );
    assert_ne!(h.pid_of("sleeper"), sleeper);
    assert_eq!(changes(&h.apply(state(&["sleeper", "g", "extra"])).await), Vec::<String>::new());
}

#[tokio::test]
async fn failures_name_the_program_and_bad_configurations_are_refused() {
    let programs = format!("{PROGRAMS}\n[program:broken]\ncommand=/nonexistent/daemon\nstartsecs=1\nstartretries=1\n");
    let h = Harness::new(&programs);
    let config = h.config();
    let c = config.to_str().unwrap();

    let out = h.apply(json!({"config": c, "name": ["sleeper", "nope"]})).await;
    assert!(!out.result);
    assert_eq!(out.comment, format!("nope is not a program or group of the supervisord of {c}, even after a reread"));
    // supervisord was started on the way, and that is reported.
    assert_eq!(out.changes.len(), 1, "{:?}", out.changes);

    let out = h.apply(json!({"config": c, "name": ["broken"]})).await;
    assert!(!out.result);
    assert!(out.comment.starts_with("broken is FATAL"), "{}", out.comment);

    // Still failing, and still saying why, on the next round.
    let again = h.apply(json!({"config": c, "name": ["broken"]})).await;
    assert!(!again.result && again.comment.starts_with("broken is FATAL"), "{}", again.comment);

    // A configuration that keeps supervisord in the foreground cannot be started from
    // here (systemd hosts run it with -n in a unit instead).
    let fg = h.path("foreground.conf");
    std::fs::write(&fg, "[supervisord]\nnodaemon=true\n[unix_http_server]\nfile=/nonexistent/x.sock\n").unwrap();
    let out = h.apply(json!({"config": fg.to_str().unwrap(), "name": ["x"]})).await;
    assert!(!out.result);
    assert!(out.comment.starts_with(&format!("{} sets nodaemon=true", fg.display())), "{}", out.comment);

    // Refused by the catalogue, before the module (and by the helper's decoding).
    let err = parse_state("linux.supervisord", &json!({"config": "relative.conf", "name": ["x"]})).unwrap_err();
    assert_eq!(err.to_string(), "linux.supervisord: parameter \"config\": path \"relative.conf\" is not absolute");
    assert!(Path::new(c).is_file());
}

/// A plan of the state as the helper's dispatch makes it: in a plan context, the
/// outcome marked planned, a refused write turned into its step.
async fn plan(h: &Harness, raw: Value) -> Outcome {
    let ctx = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&ctx)), h.apply(raw)).await;
    opsagent_helper::states::planned(out, ctx.refused(), "linux.supervisord")
}

/// Issue 19's drift cycle: plan (exactly `want`; supervisord's view of its programs, pids
/// included, and the watch records unchanged) -> apply (the same changes) -> plan
/// (nothing).
async fn cycle(h: &Harness, raw: Value, want: &[&str]) {
    let view = || {
        (
            h.ctl(&["status"]).lines().map(|l| l.split(" uptime").next().unwrap_or(l).to_string()).collect::<Vec<_>>(),
            tree(&h.path("state")),
        )
    };
    let before = view();
    let planned = plan(h, raw.clone()).await;
    assert!(planned.planned, "{planned:?}");
    assert_eq!(changes(&planned), want, "the plan");
    assert_eq!(view(), before, "the plan changed supervisord's programs or the watch records");
    assert_eq!(changes(&h.apply(raw.clone()).await), want, "the apply did not make the planned change");
    let again = plan(h, raw).await;
    assert!(again.planned && changes(&again).is_empty(), "plan after the apply: {again:?}");
}

#[tokio::test]
async fn plan_apply_plan_cycles_of_stopped_changed_and_new_programs() {
    let h = Harness::new(PROGRAMS);
    let app_conf = h.path("app.conf");
    std::fs::write(&app_conf, "v=1\n").unwrap();
    let config = h.config();
    let state = |names: &[&str]| json!({"config": config.to_str().unwrap(), "name": names, "watch": [app_conf.to_str().unwrap()]});
    // Converged first: supervisord running, the watched file recorded.
    changes(&h.apply(state(&["sleeper", "g"])).await);
    assert!(changes(&plan(&h, state(&["sleeper", "g"])).await).is_empty());

    // A program stopped behind the state's back.
    h.ctl(&["stop", "sleeper"]);
    cycle(&h, state(&["sleeper", "g"]), &["sleeper: started"]).await;
    // The watched file changed: the programs would be restarted (the plan keeps their pids).
    std::fs::write(&app_conf, "v=2\n").unwrap();
    cycle(&h, state(&["sleeper", "g"]), &["sleeper: restarted", "g:a: restarted", "g:b: restarted"]).await;
    // A program supervisord does not know yet.
    std::fs::write(h.path("conf.d/extra.conf"), "[program:extra]\ncommand=/bin/sleep 1003\nstartsecs=1\n").unwrap();
    cycle(&h, state(&["sleeper", "g", "extra"]), &["extra: added to supervisord"]).await;
}

/// Every file below `dir` with its content, sorted (none when it does not exist).
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(e.path());
            } else {
                out.push((e.path(), std::fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}
