//! Logging set-up: structured fields straight into the journal when systemd gave us
//! one, plain text on stderr otherwise (a terminal, the cron supervisor's log file, or
//! the tests reading our stderr). Both through `opsagent_logline`, which escapes every
//! field value: what the daemon sent (an order's URL, a recipe's path) never forges a
//! log line that root or an operator reads.
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
    // try_init: a second initialisation (tests calling run twice) is not an error.
    let _ = tracing_subscriber::registry().with(filter).with(opsagent_logline::output(None, true)).try_init();
}
