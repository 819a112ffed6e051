#![forbid(unsafe_code)]
//! The log output of every opsagent process (daemon, root helper, root installer).
//!
//! Log values come from places root does not control: a recipe's parameters, a backend's
//! upgrade order, a file the daemon staged, a tool's error text. A value holding a
//! newline forges a log line (and anything that reads logs line by line — a cron
//! supervisor's `tail -n 1`, an operator's grep — believes it); an ESC drives the
//! terminal that displays it. So there is one rule, applied at the one place where a
//! value becomes bytes, for both outputs: **every field value is passed through
//! [`escape`]**, which leaves no control character (nor a Unicode line separator or
//! bidirectional override) in it. Call sites log values as they are; none of them has
//! to remember anything.
//!
//! - Text (a terminal, a file, the tests reading stderr): tracing's fmt layer with
//!   [`EscapedFields`] as its field formatter.
//! - The journal (systemd gave us one, `JOURNAL_STREAM` set): [`JournalLayer`], which
//!   writes the native journal protocol itself, each field `NAME=value` on one line —
//!   a framing that is only correct because escaped values hold no newline.

pub mod catalog;
mod escape;
mod journal;
mod text;

pub use escape::escape;
pub use journal::{entry as journal_entry, JournalLayer};
pub use text::EscapedFields;

use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Prefix of every journal field but MESSAGE: `state_id` is `OPSAGENT_STATE_ID`.
pub const FIELD_PREFIX: &str = "OPSAGENT";

/// The output layer: structured journal fields when systemd connected stderr to the
/// journal, escaped text on stderr otherwise. `identifier` is the journal's
/// SYSLOG_IDENTIFIER (`None`: the executable's name); `show_target` adds the module
/// path to text lines.
pub fn output<S>(identifier: Option<&str>, show_target: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let identifier = identifier.map(str::to_string).unwrap_or_else(executable_name);
        match JournalLayer::new(&identifier, FIELD_PREFIX) {
            Ok(layer) => return Box::new(layer),
            Err(e) => eprintln!("{identifier}: journald unavailable ({e}); logging to stderr"),
        }
    }
    Box::new(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(show_target)
            .fmt_fields(EscapedFields),
    )
}

fn executable_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "opsagent".to_string())
}
