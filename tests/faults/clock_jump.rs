//! The wall clock stepped by hours under a running daemon (an operator's `date -s`, a
//! hypervisor resuming a VM, NTP's first sync): only the daemon's CLOCK_REALTIME moves,
//! injected with libfaketime (`LD_PRELOAD`, `FAKETIME_DONT_FAKE_MONOTONIC=1`, an offset
//! file the test rewrites and the library re-reads on every call). The round delay,
//! the reconnect backoff and the watchdog run on the monotonic clock and do not notice;
//! StateLogs say when their state ran by the clock of that moment.
//!
//! The rounds are timed by the state itself: it appends /proc/uptime (the kernel's
//! monotonic count, which no wall-clock step moves) each time it runs.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::common::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const SIX_HOURS: i64 = 6 * 3600;
/// `--round-delay`, seconds.
const DELAY: f64 = 2.0;

/// The daemon's wall-clock offset from the real one, in a file libfaketime reads.
struct FakeClock {
    file: PathBuf,
    /// (uptime at the change, offset from then on), in order.
    changes: Vec<(f64, i64)>,
}

/// libfaketime 0.9.10 gives every process it starts in a shared-memory segment and a
/// semaphore (`/dev/shm/faketime_shm_PID`, `sem.faketime_sem_PID`) and leaves them behind
/// when the process is killed: remove those of processes that are gone (no other test
/// uses libfaketime), so runs of this test do not pile them up.
impl Drop for FakeClock {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/dev/shm") else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("faketime_shm_").or_else(|| name.strip_prefix("sem.faketime_sem_"));
            if pid.is_some_and(|p| p.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl FakeClock {
    fn new(dir: &Path) -> Self {
        let mut c = FakeClock { file: dir.join("faketime"), changes: Vec::new() };
        c.set(0);
        c
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ]
    }

    /// Steps the daemon's wall clock to real time + `offset` seconds (atomically: the
    /// library never reads a half-written file).
    fn set(&mut self, offset: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset:+}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
        self.changes.push((uptime(), offset));
    }

    /// The offsets that may have applied at uptime `u` (both, near a change).
    fn offsets_at(&self, u: f64) -> Vec<i64> {
        let mut v: Vec<i64> = Vec::new();
        for probe in [u - 1.0, u, u + 1.0] {
            let o = self.changes.iter().rev().find(|(at, _)| *at <= probe).map_or(0, |(_, o)| *o);
            if !v.contains(&o) {
                v.push(o);
            }
        }
        v
    }
}

fn uptime() -> f64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// `2026-12-04T05:00:00.123Z` → seconds since the epoch.
fn parse_rfc3339(s: &str) -> f64 {
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().unwrap_or_else(|_| panic!("not RFC 3339: {s}")) };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (H. Hinnant), as src/timefmt.rs does the other way.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    secs as f64 + s[20..23].parse::<f64>().unwrap() / 1000.0
}

/// Collects the daemon's sd_notify datagrams: the monotonic instants of WATCHDOG=1.
fn notify_listener(path: &Path) -> Arc<Mutex<Vec<Instant>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    let pings: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let p = pings.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "WATCHDOG=1") {
                p.lock().unwrap().push(Instant::now());
            }
        }
    });
    pings
}

fn ticks(work: &Path) -> Vec<f64> {
    std::fs::read_to_string(work.join("ticks")).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect()
}

#[test]
fn wall_clock_steps_of_six_hours_leave_rounds_backoff_and_watchdog_alone_and_statelogs_truthful() {
    if !Path::new(LIBFAKETIME).exists() {
        assert!(
            std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
            "{LIBFAKETIME} is missing (apt-get install faketime), and OPSAGENT_TEST_NO_SKIP is set"
        );
        eprintln!("SKIPPED: {LIBFAKETIME} is missing (apt-get install faketime)");
        return;
    }
    let s = setup("app-cj", |work| {
        json!({"recipe_version": 1, "state": [
            {"id": "tick", "module": "linux.cmd",
             "parameter": {"cmd": "cut -d' ' -f1 /proc/uptime >> ticks", "cwd": work.display().to_string()}}
        ]})
    });
    let (dir, statelog) = (s.dir.as_path(), s.statelog.as_path());
    let mut clock = FakeClock::new(dir);
    let notify = dir.join("notify.sock");
    let pings = notify_listener(&notify);
    let _helper = start_helper(dir, &s.socket);
    let (mut backend, port) = start_backend(dir, &s.recipes, statelog, &["--poll-ms", "100"]);
    let mut env = clock.env();
    // A 2 s watchdog: pinged every second while the loops tick.
    env.push(("NOTIFY_SOCKET", notify.display().to_string()));
    env.push(("WATCHDOG_USEC", "2000000".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = start_agent_with_env(
        dir,
        port,
        "app-cj",
        "i-cj",
        &s.socket,
        "",
        &env,
        &["--round-delay", "2", "--retry-delay", "1"],
    );
    assert!(wait_until(Duration::from_secs(60), || !ticks(&s.work).is_empty()), "first round: {}", agent.log_text());
    let status = |want: &str| {
        let out = std::process::Command::new(bin("opsagent"))
            .args(["status", "--config"])
            .arg(dir.join("empty.conf"))
            .arg("--state-dir")
            .arg(dir.join("i-cj.state"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains(want),
            "opsagent status wants {want:?}: {text}{}",
            agent.log_text()
        );
    };
    let real_minus_uptime = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() - uptime();

    // Real time, then 6 h ahead; the backend killed, and while the daemon waits to
    // reconnect the clock steps 12 h back (6 h behind); the backend restarted; then real
    // time again.
    // A step lands in the middle of the pause between two rounds, where a deadline on
    // the wall clock would end the pause at once (forward) or stretch it by hours (back).
    let mid_pause = || {
        let n = ticks(&s.work).len();
        assert!(
            wait_until(Duration::from_secs(30), || ticks(&s.work).len() > n),
            "no round in 30 s (a pause stretched by a clock step?): {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    std::thread::sleep(Duration::from_secs(4));
    mid_pause();
    clock.set(SIX_HOURS);
    std::thread::sleep(Duration::from_secs(6));
    status("connected to");
    let delivered_before = read_jsonl(statelog).len();
    backend.kill9();
    assert!(
        wait_until(Duration::from_secs(30), || agent.log_text().contains("reconnecting")),
        "the daemon notices the backend is gone: {}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    clock.set(-SIX_HOURS);
    std::thread::sleep(Duration::from_millis(1500));
    let listen = format!("127.0.0.1:{port}");
    let (_backend2, _) = start_backend_on(dir, &s.recipes, statelog, &listen, &["--poll-ms", "100"]);
    let restarted = Instant::now();
    // Connected again, by the daemon's status file (rewritten every second), or a new
    // StateLog recorded: whichever shows first.
    let status_file = dir.join("i-cj.state").join("status.json");
    let connected = || {
        let v: serde_json::Value =
            std::fs::read(&status_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        v["link"]["state"]["state"] == "connected"
    };
    assert!(
        wait_until(Duration::from_secs(60), || connected() || read_jsonl(statelog).len() > delivered_before),
        "reconnects to the restarted backend: {}",
        agent.log_text()
    );
    let reconnected = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    status("connected to");
    std::thread::sleep(Duration::from_secs(2));
    mid_pause();
    clock.set(0);
    std::thread::sleep(Duration::from_secs(6));
    let end = uptime();

    // Rounds kept their delay through both steps: no stall, no burst of "overdue" rounds.
    let t = ticks(&s.work);
    let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    let (min, max) = gaps.iter().fold((f64::MAX, 0f64), |(lo, hi), g| (lo.min(*g), hi.max(*g)));
    assert!(gaps.len() >= 8, "rounds ran: {t:?}\n{}", agent.log_text());
    assert!(
        min >= DELAY - 0.1 && max <= DELAY + 3.0,
        "round gaps {min:.2}..{max:.2} s: {gaps:?}\n{}",
        agent.log_text()
    );
    for &(at, offset) in &clock.changes[1..] {
        let after = t.iter().filter(|u| **u > at && **u <= at + 6.0).count();
        assert!((2..=3).contains(&after), "{after} rounds in the 6 s after the step to {offset:+} s: {t:?}");
    }

    // The watchdog was pinged throughout (every second) and no loop was found wedged.
    let pings = pings.lock().unwrap().clone();
    let ping_gaps: Vec<f64> = pings.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    assert!(pings.len() >= 20, "watchdog pings: {}", pings.len());
    assert!(ping_gaps.iter().all(|g| *g <= 3.0), "watchdog ping gaps: {ping_gaps:?}");
    assert!(!agent.log_text().contains("loop is not ticking"), "{}", agent.log_text());

    // Reconnected within the backoff's reach (1 s base: attempts of ≤1, ≤2, ≤4 s), not
    // after hours of a deadline on the stepped clock.
    assert!(reconnected <= Duration::from_secs(15), "reconnected after {reconnected:?}: {}", agent.log_text());

    // Every StateLog delivered once, in sequence order, each stamped with the daemon's
    // wall clock of the moment its state ran.
    assert!(
        wait_until(Duration::from_secs(30), || read_jsonl(statelog).len() >= t.len()),
        "all delivered: {} of {}",
        read_jsonl(statelog).len(),
        t.len()
    );
    let logs = read_jsonl(statelog);
    let seqs: Vec<u64> = logs.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence order, each once: {seqs:?}");
    let mut stepped = [0usize; 3];
    for (l, u) in logs.iter().zip(&t) {
        let ran_at = l["ran_at"].as_str().unwrap_or_else(|| panic!("no ran_at: {l}"));
        let got = parse_rfc3339(ran_at);
        let real = real_minus_uptime + u;
        let offsets = clock.offsets_at(*u);
        assert!(
            offsets.iter().any(|o| (got - (real + *o as f64)).abs() <= 3.0),
            "ran_at {ran_at} of seq {} is not the wall clock of uptime {u} (real {real:.0}, offsets {offsets:?})",
            l["seq"]
        );
        if let [o] = offsets.as_slice() {
            stepped[usize::from(*o > 0) + usize::from(*o >= 0)] += 1;
        }
    }
    assert!(stepped.iter().all(|n| *n >= 2), "StateLogs under each clock (-6 h, real, +6 h): {stepped:?}");
    crate::row(
        "wall clock stepped +6 h, then −6 h while reconnecting to a killed backend, then back (libfaketime on the daemon)",
        &format!(
            "{} rounds in {:.0} s, gaps {min:.1}–{max:.1} s for a 2 s delay (no stall, no catch-up burst); watchdog pinged every ≤{:.1} s; StateLogs stamped with the stepped clock of their run, in sequence order",
            t.len(),
            end - t[0],
            ping_gaps.iter().fold(0f64, |a, g| a.max(*g))
        ),
        "nothing (each StateLog once)",
        reconnected,
    );
}
