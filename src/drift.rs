//! Where a drift plan's report goes (`[agent] drift_interval`, `PlanRequest`): to a
//! backend that announced `drift`, as a `Drift` message sent by the link; otherwise to
//! the journal, one entry per drifted state with the field `OPSAGENT_DRIFT=1`, so that
//! `journalctl OPSAGENT_DRIFT=1` lists them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::round::DriftReport;

/// Shared by the engine's effects (which post) and the link (which sends).
#[derive(Debug, Default)]
pub struct DriftBoard {
    /// The link is in a session with a backend that announced `drift`.
    listening: AtomicBool,
    /// The latest report not yet sent; a newer one replaces it (it says the same host
    /// later).
    pending: Mutex<Option<DriftReport>>,
    /// The latest report, wherever it went, for `opsagent status`.
    last: Mutex<Option<DriftReport>>,
}

impl DriftBoard {
    /// The link says whether its backend takes `Drift` messages.
    pub fn set_listening(&self, yes: bool) {
        self.listening.store(yes, Ordering::SeqCst);
    }

    /// Hands `report` to the backend if one listens, else writes it to the journal.
    pub fn post(&self, report: DriftReport) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        if self.listening.load(Ordering::SeqCst) {
            *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        } else {
            journal(&report);
        }
    }

    /// The latest report made (for the status file).
    pub fn last(&self) -> Option<DriftReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The report for the link to send now, if any.
    pub fn take_pending(&self) -> Option<DriftReport> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// One warning per drifted state. The journald layer prefixes every field, so `drift`
/// becomes `OPSAGENT_DRIFT=1`; the changes are a list said in one field, control
/// characters escaped by the log layer.
pub fn journal(report: &DriftReport) {
    if report.states.is_empty() {
        tracing::info!(recipe_version = report.recipe_version, "drift plan: nothing would change");
    }
    for s in &report.states {
        tracing::warn!(
            drift = 1,
            recipe_version = report.recipe_version,
            state_id = %s.id,
            changes = %s.changes.join(", "),
            "drift: the state would change"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::DriftedState;

    fn report() -> DriftReport {
        DriftReport { recipe_version: 3, states: vec![DriftedState { id: "f".into(), changes: vec!["mode".into()] }] }
    }

    #[test]
    fn a_listening_backend_gets_the_latest_report_once_and_otherwise_nothing_is_kept() {
        let b = DriftBoard::default();
        b.post(report());
        assert_eq!(b.take_pending(), None, "no backend listens: the journal has it");
        b.set_listening(true);
        b.post(DriftReport { recipe_version: 2, states: vec![] });
        b.post(report());
        assert_eq!(b.take_pending(), Some(report()));
        assert_eq!(b.take_pending(), None);
        assert_eq!(b.last(), Some(report()), "the status says the latest report");
    }
}
