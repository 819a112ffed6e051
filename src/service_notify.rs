//! The daemon's conversation with systemd: READY=1 once it can really work, WATCHDOG=1
//! only while its loops are alive, one human STATUS= line, STOPPING=1 on the way out.
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::link::LinkStatus;
use crate::round::api::{EngineStatus, Liveness, Phase};

pub fn ready() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

pub fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The one-line summary for `systemctl status`, e.g.
/// "connected to wss://x since 2026-11-21 23:35:08 UTC; recipe 7, round 12, state 3/8 linux.apt.package".
pub fn status_line(link: &LinkStatus, engine: &EngineStatus) -> String {
    let conn = link.describe();
    let work = match (&engine.recipe_version, &engine.phase) {
        (None, _) | (_, Phase::NoRecipe) => "no recipe yet".to_string(),
        (Some(v), phase) => {
            let what = match phase {
                Phase::Applying { index, total, module, .. } => format!("state {index}/{total} {module}"),
                Phase::Waiting { index, total, state_id } => format!("state {index}/{total} waiting for {state_id}"),
                Phase::Idle { next_round_in_s } => {
                    format!("idle, next round in {next_round_in_s} s")
                }
                Phase::RetryWait { next_round_in_s, ceased } => {
                    format!("round failed ({ceased}x), retrying in {next_round_in_s} s")
                }
                Phase::Upgrading { version } => format!("upgrading to {version}"),
                Phase::Stopped => "stopped".to_string(),
                Phase::NoRecipe => String::new(),
            };
            format!("recipe {v}, round {}, {what}", engine.round)
        }
    };
    format!("{conn}; {work}")
}

/// Pings the watchdog at half its interval while every loop has ticked recently, and
/// refreshes STATUS=. Returns when `stop` flips.
pub async fn supervise(
    loops: Vec<(&'static str, Liveness)>,
    mut link: watch::Receiver<LinkStatus>,
    mut engine: watch::Receiver<EngineStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_secs(5), |w| w / 2);
    // A loop that has not ticked for this long is wedged (they tick every second).
    let stale = period.max(Duration::from_secs(5));
    let mut last_line = String::new();
    let mut timer = tokio::time::interval(period.min(Duration::from_secs(5)));
    let mut wedged_logged = false;
    loop {
        tokio::select! {
            _ = timer.tick() => {
                if watchdog.is_some() {
                    match loops.iter().find(|(_, l)| l.age() > stale) {
                        None => { notify(&[NotifyState::Watchdog]); wedged_logged = false; }
                        Some((name, l)) => if !wedged_logged {
                            tracing::error!(loop_name = name, silent_ms = l.age().as_millis() as u64, "loop is not ticking; withholding the watchdog ping");
                            wedged_logged = true;
                        },
                    }
                }
            }
            r = link.changed() => if r.is_err() { return },
            r = engine.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        let line = status_line(&link.borrow(), &engine.borrow());
        if line != last_line {
            status(&line);
            last_line = line;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkState;

    #[test]
    fn status_lines_read_like_sentences() {
        let link =
            LinkStatus { state: LinkState::Connected { url: "wss://b".into(), since_unix: 0 }, ..Default::default() };
        let since = "since 1970-01-01 00:00:00 UTC";
        let engine = EngineStatus {
            recipe_version: Some(7),
            round: 12,
            phase: Phase::Applying { index: 3, total: 8, state_id: "s".into(), module: "linux.apt.package".into() },
            ..Default::default()
        };
        assert_eq!(
            status_line(&link, &engine),
            format!("connected to wss://b {since}; recipe 7, round 12, state 3/8 linux.apt.package")
        );
        let until_unix = crate::link::now_unix() + 8;
        let link =
            LinkStatus { state: LinkState::Reconnecting { in_s: 8, until_unix, attempt: 3 }, ..Default::default() };
        let line = status_line(&link, &EngineStatus::default());
        // The countdown may have ticked once while the test ran.
        assert!(
            ["reconnecting in 8 s (attempt 3); no recipe yet", "reconnecting in 7 s (attempt 3); no recipe yet"]
                .contains(&line.as_str()),
            "{line}"
        );
    }
}
