//! Logging set-up: structured fields straight into the journal when systemd gave us
//! one, plain text on stderr otherwise (a terminal, or the tests reading our stderr).
//!
//! Journal fields carry the daemon's prefix: `state_id` becomes `OPSAGENT_STATE_ID`,
//! `module` `OPSAGENT_MODULE`, and so on (`journalctl OPSAGENT_MODULE=linux.service`).
//!
//! `RUST_LOG` takes a level or a list of `target=level` (`info,opsagent_helper::exec=debug`);
//! unset or unreadable, the level is `info`. The helper filters with `Targets`, not
//! `EnvFilter`: it has no use for span and field filters, and `EnvFilter` is the larger
//! part of the logging code a helper would map at start, for nothing.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(filter);
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_field_prefix(Some("OPSAGENT".to_string())));
    // try_init: a second initialisation (tests calling run twice) is not an error.
    let _ = match journald {
        Some(layer) => registry.with(layer).try_init(),
        None => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false)).try_init()
        }
    };
}
