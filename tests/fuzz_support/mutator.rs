//! A small, dependency-free input generator for the decoder fuzz tests (the daemon's
//! backend frames, the helper's requests). Property-based rather than coverage-guided:
//! the coverage-guided tools (cargo-fuzz, afl.rs) need a nightly compiler or an LLVM
//! build that a fresh machine of CI's kind does not have. Each run starts from a seed
//! corpus kept in the repository (`tests/fuzz/corpus/…`) and applies byte-level and
//! JSON-structure-aware mutations drawn from a seeded generator, so a failure is
//! reproducible from the seed printed with it.
//!
//! Included with `#[path]` by each fuzz test (it is test code, not part of any crate).

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// xorshift64*: small, fast, reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, in_n: usize) -> bool {
        self.below(in_n) == 0
    }
}

/// Bytes that tend to find parser bugs: JSON structure, escapes, control characters,
/// UTF-8 lead bytes without continuation, NUL.
const INTERESTING_BYTES: &[u8] = b"{}[]\":,\\\n\r\t\x00\x1b\x7f\xc3\xe2\xf0\xff0-+eE.";
const INTERESTING_STRINGS: &[&str] = &[
    "",
    "\u{0}",
    "\n",
    "\u{1b}[31m",
    "../../etc/shadow",
    "/etc/passwd",
    "/",
    "//",
    "/a/../b",
    "a b",
    "* * * * * echo injected\n0",
    "\u{202e}",
    "\u{fffd}",
    "linux.cmd",
    "linux.file",
    "meta.wait",
    "0777",
    "04755",
    "-1",
    "root",
    "$$HOME",
    "${HOME}",
];
const INTERESTING_NUMBERS: &[&str] =
    &["0", "-1", "1", "4294967296", "18446744073709551615", "18446744073709551616", "1e309", "-0", "1.5", "9e-400"];

/// The seed corpus of one target: every file in `dir`, as bytes.
pub fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let corpus: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("corpus file")).collect();
    assert!(!corpus.is_empty(), "seed corpus {} is empty", dir.display());
    corpus
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(2)),
        2 => serde_json::from_str(INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())]).unwrap_or(Value::Null),
        3 => Value::String(INTERESTING_STRINGS[rng.below(INTERESTING_STRINGS.len())].to_string()),
        4 => Value::String("A".repeat(rng.below(70_000))),
        5 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        6 => Value::Object(
            (0..rng.below(4))
                .map(|_| {
                    (
                        INTERESTING_STRINGS[rng.below(INTERESTING_STRINGS.len())].to_string(),
                        random_value(rng, depth + 1),
                    )
                })
                .collect(),
        ),
        _ => Value::Array(vec![Value::Array(vec![Value::Null; rng.below(3)]); rng.below(3)]),
    }
}

/// Replaces, removes or adds one node somewhere in `v`.
fn mutate_value(rng: &mut Rng, v: &mut Value, depth: usize) {
    let descend = depth < 8 && rng.below(3) != 0;
    match v {
        Value::Object(map) if !map.is_empty() && descend => {
            let k = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
            match rng.below(6) {
                0 => {
                    map.remove(&k);
                }
                1 => {
                    let name = INTERESTING_STRINGS[rng.below(INTERESTING_STRINGS.len())].to_string();
                    map.insert(name, random_value(rng, depth));
                }
                _ => {
                    if let Some(child) = map.get_mut(&k) {
                        mutate_value(rng, child, depth + 1);
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() && descend => {
            let i = rng.below(items.len());
            match rng.below(6) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    items.insert(i, copy);
                }
                _ => mutate_value(rng, &mut items[i], depth + 1),
            }
        }
        _ => *v = random_value(rng, depth),
    }
}

fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let b = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
                data.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i).min(64);
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                data.truncate(i);
            }
            5 => {
                // Splice: a piece of another seed.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = (a + rng.below(other.len() - a) + 1).min(other.len());
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[a..b].iter().copied());
                }
            }
            6 => {
                // Deep nesting: parsers must refuse it, not overflow the stack.
                let depth = 1 + rng.below(5_000);
                let mut v = vec![b'['; depth];
                v.append(data);
                v.extend(std::iter::repeat_n(b']', depth));
                *data = v;
            }
            _ => {
                let n = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, n.bytes());
            }
        }
    }
}

/// One input: a seed, mutated as JSON (when it parses) or as bytes.
pub fn generate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let seed = &corpus[rng.below(corpus.len())];
    if rng.below(3) != 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(seed) {
            for _ in 0..1 + rng.below(3) {
                mutate_value(rng, &mut v, 0);
            }
            let mut out = serde_json::to_vec(&v).unwrap_or_default();
            if rng.chance(4) {
                mutate_bytes(rng, &mut out, corpus);
            }
            return out;
        }
    }
    let mut out = seed.clone();
    mutate_bytes(rng, &mut out, corpus);
    out
}

/// How long each target runs: `OPSAGENT_FUZZ_SECS` (CI: a bounded few seconds; longer
/// runs on demand), and the base seed `OPSAGENT_FUZZ_SEED` to reproduce one.
pub fn budget(default_secs: u64) -> (Duration, u64) {
    let secs = std::env::var("OPSAGENT_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_secs);
    let seed = std::env::var("OPSAGENT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x0b5a_9e17);
    (Duration::from_secs(secs), seed)
}

/// Runs `target` on the seeds, then on generated inputs until the time is up; a panic
/// is reported with the seed and the input (also written under `target/fuzz-crashes/`).
/// Returns the number of executions.
pub fn run(name: &str, corpus: &[Vec<u8>], default_secs: u64, target: impl Fn(&[u8])) -> u64 {
    let (budget, seed) = budget(default_secs);
    let started = Instant::now();
    let mut execs = 0u64;
    let mut check = |input: &[u8], case_seed: u64| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(input)));
        execs += 1;
        if outcome.is_err() {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{case_seed}.bin"));
            let _ = std::fs::write(&file, input);
            panic!(
                "fuzz {name}: the decoder panicked on case seed {case_seed} (input saved to {}): {:?}",
                file.display(),
                String::from_utf8_lossy(&input[..input.len().min(400)])
            );
        }
    };
    for s in corpus {
        check(s, 0);
    }
    let mut case = 0u64;
    while started.elapsed() < budget {
        case += 1;
        let case_seed = seed.wrapping_add(case);
        let mut rng = Rng::new(case_seed);
        let input = generate(&mut rng, corpus);
        check(&input, case_seed);
    }
    eprintln!(
        "fuzz {name}: {execs} executions in {:.1} s, 0 crashes, {} seeds",
        started.elapsed().as_secs_f64(),
        corpus.len()
    );
    execs
}
