//! Logging set-up: structured journald fields under systemd, plain text on stderr
//! otherwise, both through `opsagent_logline`, which escapes every field value (a
//! backend's or a recipe's text never forges a log line).
//!
//! Under systemd (stderr connected to the journal, `JOURNAL_STREAM` set), every tracing
//! field becomes a journal field prefixed `OPSAGENT_`: `state_id` → `OPSAGENT_STATE_ID`,
//! so `journalctl -u opsagent OPSAGENT_STATE_ID=state-1` finds one state's history.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a level or a filter directive list;
/// `RUST_LOG` wins when set. `identifier` is the journal's SYSLOG_IDENTIFIER.
pub fn init(level: &str, identifier: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing_subscriber::registry().with(filter).with(opsagent_logline::output(Some(identifier), false)).try_init();
}
