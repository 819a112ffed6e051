//! The root helper killed (`kill -9`) in the middle of a file write: after it wrote the
//! new content into its temporary file and before that file was renamed onto the target
//! (the window where a writer in place would leave a torn file).
//!
//! The kill lands at that exact point, every run: the first helper runs under `strace`,
//! which delivers SIGKILL on entry to its first rename (in this recipe, the temporary
//! file's onto the target: nothing else is renamed before it; `linux.file` no longer
//! `fsync`s per file, see the helper's durable.rs). Polling for the temporary file and killing
//! would race the write; the test checks the kill hit the window by finding the
//! temporary file there, with the old content still at the target.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::helper_killed::Activator;

/// The temporary files the helper leaves beside the target.
fn temps(work: &std::path::Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".opsagent-tmp"))
        .collect();
    found.sort();
    found
}

struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-9", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

#[test]
fn a_helper_killed_during_a_file_write_leaves_the_old_file_whole_and_the_next_round_cleans_its_temporary_file() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        assert!(std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none(), "strace is needed");
        eprintln!("skipped: no strace");
        return;
    }
    // 2 MiB: a real write, not a few bytes (within the backend's 4 MiB send queue).
    let new = "new content line\n".repeat(1 << 17);
    let content = new.clone();
    let s = setup("app-hkw", move |work| {
        json!({"recipe_version": 1, "state": [
            {"id": "s-write", "module": "linux.file",
             "parameter": {"path": format!("{}/target", work.display()), "content": content}}
        ]})
    });
    let (dir, work, statelog, socket) = (s.dir.as_path(), &s.work, &s.statelog, &s.socket);
    let target = work.join("target");
    std::fs::write(&target, "old content\n").unwrap();
    let activator = Activator::bind(socket);
    let mut first = activator.start_under(
        dir,
        1,
        &[
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=rename,renameat,renameat2",
            "-e",
            "inject=rename,renameat,renameat2:signal=KILL",
        ],
    );
    // Killing strace would leave its helper running: if the test fails first, the
    // helper is killed by its own pid.
    let children = format!("/proc/{0}/task/{0}/children", first.pid());
    let helper_pid = || std::fs::read_to_string(&children).unwrap_or_default().trim().to_string();
    assert!(wait_until(Duration::from_secs(10), || !helper_pid().is_empty()), "{}", first.log_text());
    let _helper_guard = KillOnDrop(helper_pid());
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let agent = start_agent(dir, port, "app-hkw", "i-hkw", socket, &["--round-delay", "60", "--retry-delay", "1"]);

    // strace ends when its helper is killed.
    assert!(
        first.wait_exit(Duration::from_secs(60)).is_some(),
        "the helper was not killed at its rename\n{}",
        agent.log_text()
    );
    let killed_at = Instant::now();
    let left = temps(work);
    assert_eq!(left.len(), 1, "killed between writing the temporary file and renaming it: {left:?}");
    assert!(left[0].starts_with(".target.opsagent-tmp."), "{left:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old content\n", "the target is untouched, not torn");

    let _second = activator.start(dir, 2);
    let logs = || read_jsonl(statelog);
    assert!(
        wait_until(Duration::from_secs(60), || logs()
            .iter()
            .any(|l| l["id"] == "s-write" && l["state_result"] == true)),
        "the round goes on with the next helper: {:?}\n{}",
        logs(),
        agent.log_text()
    );
    let recovered = killed_at.elapsed();
    let logs = logs();
    let ids: Vec<(&str, bool)> = logs.iter().map(|l| (l["id"].as_str().unwrap(), l["state_result"] == true)).collect();
    assert_eq!(ids, vec![("s-write", false), ("s-write", true)], "{logs:#?}");
    let reason = logs[0]["state_comment"].as_str().unwrap_or("");
    assert!(reason.contains("closed the connection before answering"), "{reason}");
    assert!(std::fs::read_to_string(&target).unwrap() == new, "the target holds the new content whole");
    assert_eq!(temps(work), Vec::<String>::new(), "the dead helper's temporary file is gone after the next write");
    crate::row(
        "helper killed (`kill -9`) in the middle of a file write (2 MiB, before its rename)",
        "the target kept its old content whole; the state reported failed (\"closed the connection before answering\"); the next helper rewrote it and removed the dead helper's temporary file",
        "nothing (each StateLog once, no temporary file left)",
        recovered,
    );
}
