//! The round's figures where operators already look: a Prometheus text file for
//! node_exporter's textfile collector (`[agent] metrics_file`, off by default), and the
//! same figures in `opsagent status --json` (`metrics`).
//!
//! The engine keeps counts and durations on its own (injected) clock; wall-clock
//! timestamps are taken here, when the status writer sees a round start or end, so that
//! the engine never reads the wall clock.

use serde::{Deserialize, Serialize};

use crate::link::{LinkState, LinkStatus};
use crate::round::api::EngineStatus;

/// Wall-clock times of round starts and ends, as observed from the engine's status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundClock {
    seen_round: u64,
    seen_end: Option<u64>,
    started_unix: Option<f64>,
    ended_unix: Option<f64>,
    last_success_unix: Option<f64>,
}

impl RoundClock {
    /// Takes note of a new round or an ended one in `status`, at `now_unix`. Returns
    /// true when a round ended since the last call (worth writing the figures at once).
    pub fn observe(&mut self, status: &EngineStatus, now_unix: f64) -> bool {
        if status.round != self.seen_round {
            self.seen_round = status.round;
            self.started_unix = Some(now_unix);
        }
        let end = status.last_round.as_ref().map(|r| r.round);
        if end.is_some() && end != self.seen_end {
            self.seen_end = end;
            self.ended_unix = Some(now_unix);
            if status.last_round.as_ref().is_some_and(|r| r.completed) {
                self.last_success_unix = Some(now_unix);
            }
            return true;
        }
        false
    }
}

/// What `status --json` shows under `metrics` and the text file holds. Timestamps are
/// Unix seconds; absent ones (no round ended yet) are left out of the text file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Figures {
    pub connected: bool,
    pub recipe_version: u64,
    pub rounds_completed: u64,
    pub rounds_ceased: u64,
    pub last_round_start_unix: Option<f64>,
    pub last_round_end_unix: Option<f64>,
    pub last_round_duration_seconds: Option<f64>,
    pub last_round_completed: Option<bool>,
    pub last_round_states_ok: u64,
    pub last_round_states_failed: u64,
    pub last_round_states_changed: u64,
    pub last_successful_round_unix: Option<f64>,
    pub spool_depth: u64,
    pub spool_dropped: u64,
}

impl Figures {
    pub fn new(engine: &EngineStatus, link: &LinkStatus, clock: &RoundClock, spool: (usize, u64)) -> Self {
        let last = engine.last_round.as_ref();
        Self {
            connected: matches!(link.state, LinkState::Connected { .. }),
            recipe_version: engine.recipe_version.unwrap_or(0),
            rounds_completed: engine.rounds_completed,
            rounds_ceased: engine.rounds_ceased,
            // The start of the last *ended* round: a running round's start would not
            // match the end and duration beside it.
            last_round_start_unix: clock.ended_unix.zip(last).map(|(end, l)| end - l.duration_ms as f64 / 1000.0),
            last_round_end_unix: clock.ended_unix,
            last_round_duration_seconds: last.map(|l| l.duration_ms as f64 / 1000.0),
            last_round_completed: last.map(|l| l.completed),
            last_round_states_ok: last.map_or(0, |l| l.states.ok),
            last_round_states_failed: last.map_or(0, |l| l.states.failed),
            last_round_states_changed: last.map_or(0, |l| l.states.changed),
            last_successful_round_unix: clock.last_success_unix,
            spool_depth: spool.0 as u64,
            spool_dropped: spool.1,
        }
    }
}

/// Who the figures are about, as labels of `opsagent_info`.
pub struct Labels<'a> {
    pub version: &'a str,
    pub instance_id: &'a str,
    pub app_id: &'a str,
}

/// A label value as the text format wants it: backslash, double quote and line feed
/// escaped (ids come from the backend and the instance's metadata).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text exposition format (version 0.0.4), names after the Prometheus
/// conventions: an `opsagent_` prefix, base units (seconds), `_total` counters,
/// `_timestamp_seconds` for Unix times.
pub fn render(f: &Figures, who: &Labels<'_>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    let info = format!(
        "{{version=\"{}\",instance_id=\"{}\",app_id=\"{}\"}}",
        label(who.version),
        label(who.instance_id),
        label(who.app_id)
    );
    metric("opsagent_info", "gauge", "The running agent (always 1): its version, instance and app.", &[(&info, 1.0)]);
    metric("opsagent_connected", "gauge", "1 while the backend link is connected, else 0.", &[("", b(f.connected))]);
    metric(
        "opsagent_recipe_version",
        "gauge",
        "Version of the recipe being applied (0: none received yet).",
        &[("", f.recipe_version as f64)],
    );
    metric(
        "opsagent_rounds_total",
        "counter",
        "Rounds ended since the agent started, by result (completed, or ceased on a failing state).",
        &[("{result=\"completed\"}", f.rounds_completed as f64), ("{result=\"ceased\"}", f.rounds_ceased as f64)],
    );
    if let (Some(start), Some(end), Some(duration)) =
        (f.last_round_start_unix, f.last_round_end_unix, f.last_round_duration_seconds)
    {
        metric(
            "opsagent_last_round_start_timestamp_seconds",
            "gauge",
            "When the last ended round started.",
            &[("", start)],
        );
        metric("opsagent_last_round_end_timestamp_seconds", "gauge", "When the last ended round ended.", &[("", end)]);
        metric(
            "opsagent_last_round_duration_seconds",
            "gauge",
            "How long the last ended round took.",
            &[("", duration)],
        );
    }
    if let Some(completed) = f.last_round_completed {
        metric(
            "opsagent_last_round_success",
            "gauge",
            "1 if the last ended round completed, 0 if it ceased on a failing state.",
            &[("", b(completed))],
        );
    }
    metric(
        "opsagent_last_round_states",
        "gauge",
        "States reported in the last ended round, by result (a state retried in the round counts each time).",
        &[
            ("{result=\"ok\"}", f.last_round_states_ok as f64),
            ("{result=\"failed\"}", f.last_round_states_failed as f64),
        ],
    );
    metric(
        "opsagent_last_round_changed_states",
        "gauge",
        "States that changed something in the last ended round.",
        &[("", f.last_round_states_changed as f64)],
    );
    if let Some(t) = f.last_successful_round_unix {
        metric(
            "opsagent_last_successful_round_timestamp_seconds",
            "gauge",
            "When the last round that completed ended.",
            &[("", t)],
        );
    }
    metric(
        "opsagent_spool_depth",
        "gauge",
        "StateLogs spooled and not yet acknowledged by the backend.",
        &[("", f.spool_depth as f64)],
    );
    metric(
        "opsagent_spool_dropped_total",
        "counter",
        "StateLogs dropped from a full spool (superseded versions first).",
        &[("", f.spool_dropped as f64)],
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::round::{LastRound, RoundCounts};

    fn ended(round: u64, completed: bool, ms: u64) -> EngineStatus {
        EngineStatus {
            round,
            recipe_version: Some(4),
            rounds_completed: u64::from(completed),
            rounds_ceased: u64::from(!completed),
            last_round: Some(LastRound {
                round,
                completed,
                states: RoundCounts { ok: 3, failed: u64::from(!completed), changed: 2 },
                duration_ms: ms,
            }),
            ..EngineStatus::default()
        }
    }

    #[test]
    fn the_clock_stamps_starts_and_ends_as_it_sees_them() {
        let mut clock = RoundClock::default();
        let running = EngineStatus { round: 1, ..EngineStatus::default() };
        assert!(!clock.observe(&running, 100.0));
        assert!(clock.observe(&ended(1, false, 2_500), 102.5));
        assert!(!clock.observe(&ended(1, false, 2_500), 103.0), "the same end is seen once");
        assert_eq!((clock.ended_unix, clock.last_success_unix), (Some(102.5), None));
        assert!(clock.observe(&ended(2, true, 1_000), 110.0));
        assert_eq!(clock.last_success_unix, Some(110.0));
        let f = Figures::new(&ended(2, true, 1_000), &LinkStatus::default(), &clock, (5, 1));
        assert_eq!(f.last_round_start_unix, Some(109.0));
        assert_eq!((f.spool_depth, f.spool_dropped, f.last_round_states_changed), (5, 1, 2));
    }

    #[test]
    fn text_format_names_types_and_escapes_labels() {
        let mut clock = RoundClock::default();
        clock.observe(&ended(1, true, 500), 1_000.0);
        let f = Figures::new(&ended(1, true, 500), &LinkStatus::default(), &clock, (0, 0));
        let text = render(&f, &Labels { version: "0.1.0", instance_id: "i-\"x\"\n", app_id: "a\\b" });
        assert!(
            text.contains("opsagent_info{version=\"0.1.0\",instance_id=\"i-\\\"x\\\"\\n\",app_id=\"a\\\\b\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE opsagent_rounds_total counter\n"), "{text}");
        assert!(text.contains("opsagent_rounds_total{result=\"completed\"} 1\n"), "{text}");
        assert!(text.contains("opsagent_last_round_duration_seconds 0.5\n"), "{text}");
        assert!(text.contains("opsagent_last_round_start_timestamp_seconds 999.5\n"), "{text}");
        assert!(text.contains("opsagent_last_successful_round_timestamp_seconds 1000\n"), "{text}");
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
        // Before any round ends there are no timestamps at all, rather than zeros.
        let none = render(&Figures::default(), &Labels { version: "v", instance_id: "i", app_id: "a" });
        assert!(!none.contains("timestamp_seconds"), "{none}");
    }
}
