//! The root helper killed (`kill -9`) in the middle of a long state, under socket
//! activation as systemd runs it: the listening socket outlives the helper, so the
//! daemon's next connection waits in it until the next helper starts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde_json::json;

use crate::common::*;

/// What systemd does for `opsagent-helper.socket`: holds the listening socket and starts
/// a helper with it (`LISTEN_FDS`) whenever asked.
pub struct Activator {
    _listener: UnixListener,
    inherited: OwnedFd,
}

impl Activator {
    pub fn bind(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let inherited: OwnedFd = listener.try_clone().unwrap().into();
        fcntl(inherited.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        Self { _listener: listener, inherited }
    }

    pub fn start(&self, dir: &Path, n: u32) -> Proc {
        self.start_under(dir, n, &[])
    }

    /// [`Self::start`] with the helper run by `wrapper` (a command and its arguments,
    /// e.g. `strace ...`), which passes the inherited socket on.
    pub fn start_under(&self, dir: &Path, n: u32, wrapper: &[&str]) -> Proc {
        let helper = bin("opsagent-helper");
        let mut cmd = match wrapper.split_first() {
            None => std::process::Command::new(&helper),
            Some((program, args)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(args).arg(&helper);
                cmd
            }
        };
        cmd.env("LISTEN_FDS", "1")
            .env("LISTEN_FDS_FIRST_FD", self.inherited.as_raw_fd().to_string())
            .env_remove("LISTEN_PID")
            .env("RUST_LOG", "info");
        spawn_logged(&format!("helper-{n}"), cmd, dir)
    }
}

#[test]
fn a_helper_killed_during_a_state_fails_that_state_and_the_next_helper_finishes_the_round() {
    // The first run of s-long takes long (the helper is killed under it); later runs are quick.
    let long = "if [ -e started ]; then echo again >> started; else echo first >> started; sleep 600; fi";
    let s = setup("app-hk", |work| {
        let w = work.display().to_string();
        json!({"recipe_version": 1, "state": [
            {"id": "s-long", "module": "linux.cmd", "parameter": {"cmd": long, "cwd": w}},
            {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/after"), "content": "done"}}
        ]})
    });
    let (dir, work, statelog, socket) = (s.dir.as_path(), &s.work, &s.statelog, &s.socket);
    let activator = Activator::bind(socket);
    let mut first = activator.start(dir, 1);
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let agent = start_agent(dir, port, "app-hk", "i-hk", socket, &["--round-delay", "60", "--retry-delay", "1"]);
    let started = || std::fs::read_to_string(work.join("started")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(30), || started().contains("first")), "{}", agent.log_text());

    first.kill9();
    let killed_at = Instant::now();
    let _second = activator.start(dir, 2);
    let logs = || read_jsonl(statelog);
    assert!(
        wait_until(Duration::from_secs(60), || logs().iter().any(|l| l["id"] == "s-file" && l["state_result"] == true)),
        "the round goes on with the next helper: {:?}\n{}",
        logs(),
        agent.log_text()
    );
    let recovered = killed_at.elapsed();
    let logs = logs();
    let ids: Vec<(&str, bool)> = logs.iter().map(|l| (l["id"].as_str().unwrap(), l["state_result"] == true)).collect();
    // The interrupted state is reported as failed, with the reason; then it runs again
    // (a failed state restarts the round) and the round completes, each reported once.
    assert_eq!(ids, vec![("s-long", false), ("s-long", true), ("s-file", true)], "{logs:#?}");
    let reason = logs[0]["state_comment"].as_str().unwrap_or("");
    assert!(reason.contains("closed the connection before answering"), "{reason}");
    assert_eq!(std::fs::read_to_string(work.join("after")).unwrap(), "done");
    assert_eq!(started().lines().collect::<Vec<_>>(), vec!["first", "again"], "run twice, not silently a third time");
    // Outside systemd the killed helper's command outlives it (under the unit, systemd
    // kills the cgroup when the helper dies): end it here.
    let _ = std::process::Command::new("pkill").args(["-f", "sleep 600"]).status();
    crate::row(
        "helper killed (`kill -9`) during a long state, socket-activated",
        "the state reported failed (\"closed the connection before answering\"), the next helper started from the socket, the round restarted and completed",
        "nothing (each StateLog once)",
        recovered,
    );
}
