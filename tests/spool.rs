//! The spool under `kill -9`: a child process (this test binary re-executed) appends and
//! acks in a loop and is killed with SIGKILL at random moments; after each kill the spool
//! must hold every record whose append returned, exactly once, minus what was acked.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use opsagent::protocol::StateLog;
use opsagent::spool::{Spool, SpoolLimits};

const CHILD_ENV: &str = "OPSAGENT_SPOOL_KILL9_CHILD";
const RUN_ENV: &str = "OPSAGENT_SPOOL_KILL9_RUN";

fn log(id: String) -> StateLog {
    StateLog {
        recipe_version: 1,
        state_id: id.clone(),
        result: true,
        comment: Some(format!("comment {id}")),
        stdout: Some(format!("stdout {id} {}", "o".repeat(200))),
        seq: None,
        offline: false,
        ran_at: None,
    }
}

/// The child's body: runs only when re-executed by `kill9_appends_are_exactly_once`.
#[test]
fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run: u64 = std::env::var(RUN_ENV).unwrap().parse().unwrap();
    let mut spool = Spool::open(Path::new(&dir), SpoolLimits::default()).unwrap();
    spool.set_compact_threshold(4096);
    println!("O {}", spool.next_seq());
    for i in 0..100_000u64 {
        let l = spool.append(log(format!("run{run}-{i}"))).unwrap();
        let seq = l.seq.unwrap();
        println!("A {seq} {}", l.state_id);
        if i % 3 == 2 {
            println!("s {}", seq - 1);
            spool.ack(seq - 1).unwrap();
            println!("S {}", seq - 1);
        }
        if i % 5 == 4 && i >= 40 {
            println!("k {}", seq - 40);
            spool.ack_through(seq - 40).unwrap();
            println!("K {}", seq - 40);
        }
    }
}

fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish() | 1
}

#[test]
fn kill9_appends_are_exactly_once() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed = random_seed();
    eprintln!("kill9 seed {seed:#x}");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let d = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();

    let mut appended: BTreeMap<u64, String> = BTreeMap::new();
    let mut single_acks: BTreeSet<u64> = BTreeSet::new();
    let mut acked_through = 0u64;
    // Acks started (printed before the call): their records may be gone or not.
    let mut single_tries: BTreeSet<u64> = BTreeSet::new();
    let mut through_tries = 0u64;
    let mut last_seq = 0u64;
    let runs = 12;
    for run in 0..runs {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, d.path())
            .env(RUN_ENV, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let kill_after = next() % 400;
        let mut lines = Vec::new();
        let mut line = String::new();
        let mut seen = 0;
        while seen < kill_after {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen += u64::from(line.starts_with("A "));
            lines.push(line.clone());
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        line.clear();
        while out.read_line(&mut line).unwrap() > 0 {
            lines.push(std::mem::take(&mut line));
        }

        for l in &lines {
            let mut w = l.split_whitespace();
            match (w.next(), w.next().and_then(|s| s.parse::<u64>().ok())) {
                (Some("O"), Some(n)) => {
                    assert!(n > last_seq, "run {run}: restarts at {n} after {last_seq}")
                }
                (Some("A"), Some(n)) => {
                    assert!(n > last_seq, "run {run}: seq {n} after {last_seq} (reused or not increasing)");
                    last_seq = n;
                    appended.insert(n, w.next().unwrap().to_string());
                }
                (Some("S"), Some(n)) => {
                    single_acks.insert(n);
                }
                (Some("K"), Some(n)) => acked_through = acked_through.max(n),
                (Some("s"), Some(n)) => {
                    single_tries.insert(n);
                }
                (Some("k"), Some(n)) => through_tries = through_tries.max(n),
                _ => {}
            }
        }

        let spool = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        let pending = spool.pending();
        let seqs: Vec<u64> = pending.iter().map(|l| l.seq.unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "run {run}: pending not strictly increasing: {seqs:?}");
        let mut unprinted = 0;
        for l in &pending {
            let seq = l.seq.unwrap();
            assert!(seq > acked_through, "run {run}: seq {seq} was acked through {acked_through}");
            assert!(!single_acks.contains(&seq), "run {run}: seq {seq} was acked");
            match appended.get(&seq) {
                Some(id) => assert_eq!(id, &l.state_id, "run {run}: seq {seq}"),
                None => {
                    // Appended, then killed before printing: at most one per run.
                    assert!(l.state_id.starts_with("run"), "{l:?}");
                    unprinted += 1;
                }
            }
        }
        assert!(unprinted <= run + 1, "run {run}: {unprinted} records nobody appended");
        let have: BTreeSet<u64> = seqs.iter().copied().collect();
        for seq in appended.keys() {
            if *seq > through_tries && !single_tries.contains(seq) {
                assert!(have.contains(seq), "run {run}: appended seq {seq} lost");
            }
        }
        last_seq = last_seq.max(spool.next_seq() - 1);
        drop(spool);
    }
    eprintln!(
        "kill9: {} appends over {runs} kills, {} pending at the end, acked through {acked_through}",
        appended.len(),
        Spool::open(d.path(), SpoolLimits::default()).unwrap().depth()
    );
    assert!(!appended.is_empty());
}
