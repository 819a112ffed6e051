//! Disk full, on the daemon's state directory and on a filesystem a state writes to: a
//! small tmpfs filled up for real (`ENOSPC` from the kernel, not an injected error).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// A small tmpfs mounted on a directory, unmounted when dropped (even when the test panics).
pub struct SmallFs {
    pub path: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (mount's syntax: `512k`) on `path`, mode 0700; None when
    /// this is not root (a skip, except under `OPSAGENT_TEST_NO_SKIP`).
    pub fn mount(path: &Path, size: &str) -> Option<SmallFs> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
                "mounting a small filesystem needs root, and OPSAGENT_TEST_NO_SKIP is set"
            );
            eprintln!("SKIPPED: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs on {}", path.display());
        Some(SmallFs { path: path.to_path_buf() })
    }

    /// Fills the filesystem with `filler` until the kernel answers ENOSPC.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// `n` quick commands of recipe version `version`, each appending its id to `ran`.
fn commands(work: &Path, version: u64, n: usize) -> Value {
    let w = work.display().to_string();
    let states: Vec<Value> = (1..=n)
        .map(|i| {
            json!({"id": format!("v{version}-{i}"), "module": "linux.cmd",
                        "parameter": {"cmd": format!("echo v{version}-{i} >> ran"), "cwd": w}})
        })
        .collect();
    json!({"recipe_version": version, "state": states})
}

fn ids_with_prefix(statelog: &Path, prefix: &str) -> Vec<(String, u64)> {
    read_jsonl(statelog)
        .iter()
        .filter_map(|l| {
            let id = l["id"].as_str()?;
            id.starts_with(prefix).then(|| (id.to_string(), l["seq"].as_u64().unwrap_or(0)))
        })
        .collect()
}

#[test]
fn a_full_state_directory_holds_the_statelogs_and_delivers_them_once_space_returns() {
    const N: usize = 40;
    let s = setup("app-df", |w| commands(w, 1, 1));
    let (dir, statelog) = (s.dir.as_path(), s.statelog.as_path());
    // The agent's state directory (spool, persisted recipe) is the small filesystem.
    let Some(fs) = SmallFs::mount(&dir.join("i-df.state"), "256k") else { return };
    let _helper = start_helper(dir, &s.socket);
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let mut agent =
        start_agent(dir, port, "app-df", "i-df", &s.socket, &["--round-delay", "600", "--retry-delay", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || ids_with_prefix(statelog, "v1-").len() == 1),
        "first round: {}",
        agent.log_text()
    );

    let filler = fs.fill();
    // A new recipe while the state directory is full: its states run (the commands write
    // elsewhere), their StateLogs cannot be spooled.
    std::fs::write(s.recipes.join("app-df.json"), commands(&s.work, 2, N).to_string()).unwrap();
    let ran = || std::fs::read_to_string(s.work.join("ran")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || ran().lines().filter(|l| l.starts_with("v2-")).count() == N),
        "the round runs with the state directory full: {}\n{}",
        ran(),
        agent.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.child.try_wait().unwrap().is_none(), "the daemon keeps running: {}", agent.log_text());
    let delivered_while_full = ids_with_prefix(statelog, "v2-").len();
    assert!(delivered_while_full < N, "the filesystem was not full: every StateLog was spooled");
    assert!(agent.log_text().contains("cannot spool StateLogs"), "the condition is reported: {}", agent.log_text());

    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || ids_with_prefix(statelog, "v2-").len() >= N),
        "the held StateLogs are spooled and delivered once space returns: {:?}\n{}",
        ids_with_prefix(statelog, "v2-"),
        agent.log_text()
    );
    let recovered = freed_at.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let v2 = ids_with_prefix(statelog, "v2-");
    let want: Vec<String> = (1..=N).map(|i| format!("v2-{i}")).collect();
    assert_eq!(v2.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), want, "each once, in the order they ran");
    assert!(v2.windows(2).all(|w| w[0].1 < w[1].1), "sequence numbers follow the order: {v2:?}");
    let log = agent.log_text();
    assert_eq!(log.matches("cannot spool StateLogs").count(), 1, "logged once per condition, not per StateLog: {log}");
    assert!(log.contains("the spool takes StateLogs again"), "{log}");

    // The spool on disk is whole: the stopped daemon's log reopens with nothing torn.
    agent.signal(15);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some(), "stops on SIGTERM: {}", agent.log_text());
    let spool = opsagent::spool::Spool::open(&fs.path.join("spool"), opsagent::spool::SpoolLimits::default()).unwrap();
    let r = spool.recovery();
    assert_eq!((r.discarded_bytes, r.skipped_entries, r.moved_aside.is_none()), (0, 0, true), "{r:?}");
    assert_eq!(spool.depth(), 0, "everything delivered and acknowledged");
    crate::row(
        "disk full on the state directory (256 KiB tmpfs filled), 40 StateLogs produced meanwhile",
        &format!(
            "kept running; {} StateLog(s) held in memory, not sent until spooled; logged once; spooled and sent in order once space returned",
            N - delivered_while_full
        ),
        "nothing (each StateLog once, spool log whole)",
        recovered,
    );
}

#[test]
fn a_full_target_filesystem_fails_the_state_naming_enospc_and_keeps_the_old_file() {
    let content = "new line of configuration\n".repeat(4096); // ~100 KiB
    let s = setup("app-dt", |w| {
        json!({"recipe_version": 1, "state": [
            {"id": "conf", "module": "linux.file",
             "parameter": {"path": format!("{}/target/app.conf", w.display()), "content": content}}
        ]})
    });
    let (dir, statelog) = (s.dir.as_path(), s.statelog.as_path());
    let Some(fs) = SmallFs::mount(&s.work.join("target"), "512k") else { return };
    let conf = fs.path.join("app.conf");
    std::fs::write(&conf, "old configuration\n").unwrap();
    let filler = fs.fill();
    let _helper = start_helper(dir, &s.socket);
    let (_backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let agent = start_agent(dir, port, "app-dt", "i-dt", &s.socket, &["--round-delay", "600", "--retry-delay", "2"]);
    let logs = || read_jsonl(statelog);
    assert!(wait_until(Duration::from_secs(30), || !logs().is_empty()), "{}", agent.log_text());
    let first = logs()[0].clone();
    assert_eq!(first["state_result"], false, "{first}");
    let comment = first["state_comment"].as_str().unwrap_or("");
    assert!(comment.contains("No space left on device"), "ENOSPC named: {comment}");
    assert!(comment.contains("app.conf"), "the path named: {comment}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "old configuration\n", "the old file is intact");
    let names = || {
        let mut v: Vec<String> = std::fs::read_dir(&fs.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(), vec!["app.conf", "filler"], "no temporary file left at the target");

    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || logs().iter().any(|l| l["state_result"] == true)),
        "the next round succeeds once space returns: {:?}\n{}",
        logs(),
        agent.log_text()
    );
    let recovered = freed_at.elapsed();
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), content);
    assert_eq!(names(), vec!["app.conf"]);
    crate::row(
        "disk full on a target filesystem (512 KiB tmpfs filled), `linux.file` of 100 KiB",
        "the state failed naming ENOSPC and the path; the old file intact, no temp file; the retried round succeeded once space returned",
        "nothing (old content kept until the new one was whole)",
        recovered,
    );
}
