//! Text lines: the field formatter of tracing's fmt layer.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

use crate::escape;

/// Formats an event's (and span's) fields as `message name=value …`, every value
/// through [`escape`]: one event is one line, whatever its values hold. Values are
/// shown as they display (`%`) or debug-print (`?`), string fields quoted, as tracing's
/// default formatter shows them (whose `%` values and message are written raw).
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor { writer: &mut writer, result: Ok(()), first: true };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl TextVisitor<'_, '_> {
    fn put(&mut self, field: &Field, value: &str) {
        let name = field.name();
        // `log` crate records bridged by tracing-log carry these; they are metadata.
        // The journal catalog's id means nothing on a terminal.
        if self.result.is_err() || name.starts_with("log.") || name == crate::catalog::FIELD {
            return;
        }
        let sep = if std::mem::take(&mut self.first) { "" } else { " " };
        self.result = if name == "message" {
            write!(self.writer, "{sep}{}", escape(value))
        } else {
            write!(self.writer, "{sep}{}={}", name.strip_prefix("r#").unwrap_or(name), escape(value))
        };
    }
}

impl Visit for TextVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As tracing's default formatter: string fields quoted, the message as it is.
        if field.name() == "message" {
            self.put(field, value);
        } else {
            self.put(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_newline_or_an_esc_in_any_field_stays_on_one_line() {
        let out = Captured::default();
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .fmt_fields(EscapedFields);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let url = "http://x/a.tgz\n2026-01-01T00:00:00Z root: /lib/evil.so";
            let reason = String::from("bad \u{1b}[2Jclear");
            tracing::info!(url = %url, reason = ?reason, plain = "ok", "installing\n{}", 7);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'));
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains("installing\\n7 url=http://x/a.tgz\\n2026-01-01T00:00:00Z root: /lib/evil.so"), "{text}");
        assert!(text.contains("reason=\"bad \\u{1b}[2Jclear\""), "{text}");
        assert!(text.contains("plain=\"ok\""), "{text}");
    }
}
