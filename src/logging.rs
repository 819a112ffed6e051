//! Logging set-up: structured journald fields under systemd, plain text on stderr
//! otherwise.
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
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some("OPSAGENT".to_string()))
                    .with_syslog_identifier(identifier.to_string());
                let _ = registry.with(layer).try_init();
                return;
            }
            Err(e) => eprintln!("{identifier}: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init();
}
