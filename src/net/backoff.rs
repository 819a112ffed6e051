//! Reconnect delays: exponential backoff with full jitter, a hard cap, and jittered
//! backend hints. The generator is seeded, so tests (and the storm bench) are
//! deterministic; in production it is seeded from the OS.
//!
//! Why full jitter: after a backend deploy every agent loses its connection at the same
//! instant. With a deterministic schedule (bosh: 2 s × attempt, no jitter) they all come
//! back in lockstep; with additive jitter (SSM: +0–50 %) they come back in a band whose
//! start is still synchronised. Full jitter draws each delay uniformly in
//! `[0, min(cap, base·2^(attempt-1))]`, so the arrivals of a fleet spread over the whole
//! window and the window doubles while the backend stays away. Unlike salt's sawtooth the
//! ceiling never falls back to the base while the backend is still unreachable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        Self { base, cap: cap.max(base), rng: seed }
    }

    pub fn from_entropy(base: Duration, cap: Duration) -> Self {
        let mut b = [0u8; 8];
        // Falling back to the clock only weakens the spread, not correctness.
        if getrandom::fill(&mut b).is_err() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            b = (now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
        }
        Self::new(base, cap, u64::from_le_bytes(b))
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64: small, fast, well distributed even for consecutive seeds.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`, millisecond resolution.
    pub fn uniform(&mut self, lo: Duration, hi: Duration) -> Duration {
        let lo_ms = millis(lo);
        let hi_ms = millis(hi).max(lo_ms);
        let span = hi_ms - lo_ms;
        let r = if span == 0 { 0 } else { self.next_u64() % (span + 1) };
        Duration::from_millis(lo_ms + r)
    }

    /// The upper end of the window for `attempt` (1-based): `min(cap, base·2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Full jitter: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        self.uniform(Duration::ZERO, self.ceiling(attempt))
    }

    /// The same schedule with a lower ceiling (AppNotReady retries; see the link docs).
    pub fn delay_capped(&mut self, attempt: u32, cap: Duration) -> Duration {
        self.uniform(Duration::ZERO, self.ceiling(attempt).min(cap))
    }

    /// A backend hint ("come back after `hint`"), honoured within the cap: uniform in
    /// `[h, min(cap, h + max(h/2, base))]` with `h = min(hint, cap)`. Never earlier than
    /// asked (unless that is beyond the cap), and spread so that a fleet told the same
    /// number does not come back in the same second.
    pub fn after_hint(&mut self, hint: Duration) -> Duration {
        let lo = hint.min(self.cap);
        let hi = (lo + (lo / 2).max(self.base)).min(self.cap);
        self.uniform(lo, hi)
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn cap(&self) -> Duration {
        self.cap
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn full_jitter_stays_under_the_doubling_ceiling_and_the_cap() {
        let mut b = Backoff::new(S(1), S(300), 42);
        for attempt in 1..=40 {
            let ceiling = S(1u64 << (attempt - 1).min(20)).min(S(300));
            assert_eq!(b.ceiling(attempt), ceiling);
            let draws: Vec<Duration> = (0..500).map(|_| b.delay(attempt)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: the draws reach both ends of the window.
            let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
            assert!(*min <= ceiling / 20 && *max >= ceiling * 19 / 20, "attempt {attempt}: {min:?}..{max:?}");
        }
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert_eq!(b.ceiling(u32::MAX), S(300));
    }

    #[test]
    fn draws_are_uniform_over_the_window() {
        let mut b = Backoff::new(S(1), S(300), 7);
        let draws: Vec<u64> = (0..10_000).map(|_| b.delay(30).as_millis() as u64).collect();
        // Ten deciles of 30 s each: ~1,000 draws in each.
        let mut deciles = [0usize; 10];
        for d in &draws {
            deciles[((*d / 30_000) as usize).min(9)] += 1;
        }
        for (i, n) in deciles.iter().enumerate() {
            assert!((880..=1120).contains(n), "decile {i}: {deciles:?}");
        }
        let mean = draws.iter().sum::<u64>() as f64 / draws.len() as f64;
        assert!((145_000.0..155_000.0).contains(&mean), "mean {mean}");
    }

    #[test]
    fn same_seed_same_sequence_different_seeds_differ() {
        let seq = |seed| {
            let mut b = Backoff::new(S(1), S(300), seed);
            (1..=12).map(|i| b.delay(i)).collect::<Vec<_>>()
        };
        assert_eq!(seq(7), seq(7));
        assert_ne!(seq(7), seq(8));
    }

    #[test]
    fn hints_are_honoured_within_the_cap_and_spread() {
        let mut b = Backoff::new(S(1), S(300), 3);
        for _ in 0..1000 {
            let d = b.after_hint(S(60));
            assert!(d >= S(60) && d <= S(90), "{d:?}");
        }
        // A hint beyond the cap is cut to the cap.
        for _ in 0..100 {
            assert_eq!(b.after_hint(S(3600)), S(300));
        }
        // "Come back now" still spreads over one base period.
        for _ in 0..100 {
            assert!(b.after_hint(Duration::ZERO) <= S(1));
        }
        let spread: Vec<Duration> = (0..1000).map(|_| b.after_hint(S(20))).collect();
        assert!(spread.iter().any(|d| *d < S(22)) && spread.iter().any(|d| *d > S(28)));
    }

    #[test]
    fn capped_schedule_for_app_not_ready() {
        let mut b = Backoff::new(S(1), S(300), 11);
        for attempt in 1..=30 {
            assert!(b.delay_capped(attempt, S(30)) <= S(30));
        }
        assert!((0..200).map(|_| b.delay_capped(20, S(30))).any(|d| d > S(25)));
    }
}
