//! The journal: its native protocol, written here rather than by tracing-journald,
//! because that layer passes values through raw (length-prefixed, newlines and all),
//! and journalctl then shows one entry as several lines.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::catalog;
use crate::escape;

/// Where journald listens for native-protocol datagrams.
pub const SOCKET: &str = "/run/systemd/journal/socket";
/// A longer value is cut (after escaping), so that an entry fits in one datagram.
const MAX_VALUE_BYTES: usize = 16 << 10;

/// Sends each event as one journal entry: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
/// TARGET, CODE_FILE, CODE_LINE, and every other field as `PREFIX_NAME`, each value
/// escaped (so each is a single `NAME=value` line of the protocol).
#[derive(Debug)]
pub struct JournalLayer {
    socket: UnixDatagram,
    identifier: String,
    prefix: String,
}

impl JournalLayer {
    /// Connects to journald's socket.
    pub fn new(identifier: &str, prefix: &str) -> io::Result<Self> {
        Self::at(Path::new(SOCKET), identifier, prefix)
    }

    /// Connects to the journal socket at `path` (tests).
    pub fn at(path: &Path, identifier: &str, prefix: &str) -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(Self { socket, identifier: identifier.to_string(), prefix: prefix.to_string() })
    }

    /// The datagram of one event.
    fn entry(&self, event: &Event<'_>) -> Vec<u8> {
        let meta = event.metadata();
        let mut buf = Vec::with_capacity(256);
        let priority = match *meta.level() {
            Level::ERROR => "3",
            Level::WARN => "4",
            Level::INFO => "5",
            Level::DEBUG => "6",
            Level::TRACE => "7",
        };
        put(&mut buf, "PRIORITY", priority);
        put(&mut buf, "SYSLOG_IDENTIFIER", &self.identifier);
        put(&mut buf, "TARGET", meta.target());
        if let Some(file) = meta.file() {
            put(&mut buf, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut buf, "CODE_LINE", &line.to_string());
        }
        event.record(&mut JournalVisitor { buf: &mut buf, prefix: &self.prefix });
        buf
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // Nowhere to report a lost log line to.
        let _ = self.socket.send(&self.entry(event));
    }
}

struct JournalVisitor<'a> {
    buf: &'a mut Vec<u8>,
    prefix: &'a str,
}

impl JournalVisitor<'_> {
    fn field(&mut self, field: &Field, value: &str) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        if name == "message" {
            put(self.buf, "MESSAGE", value);
            return;
        }
        // The catalog's id goes in as MESSAGE_ID itself; anything else under that name
        // stays an ordinary, prefixed field.
        if name == catalog::FIELD && catalog::is_id(value) {
            put(self.buf, "MESSAGE_ID", value);
            return;
        }
        // Journal field names: upper-case letters, digits and '_', not starting with '_'.
        let clean: String = name
            .strip_prefix("r#")
            .unwrap_or(name)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .collect();
        let full = if self.prefix.is_empty() {
            clean.trim_start_matches('_').to_string()
        } else {
            format!("{}_{clean}", self.prefix)
        };
        if !full.is_empty() {
            put(self.buf, &full, value);
        }
    }
}

impl Visit for JournalVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.field(field, &format!("{value:?}"));
    }
}

/// One journal entry in the native protocol from fields given by the caller (a helper
/// writing a command's output under the command's unit): each value escaped and cut to
/// fit one datagram, exactly as for the entries of [`JournalLayer`].
pub fn entry(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    for (name, value) in fields {
        put(&mut buf, name, value);
    }
    buf
}

/// One `NAME=value\n` line: correct framing only because the escaped value holds no
/// newline.
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    let value = escape(value);
    let mut value: &str = &value;
    let mut cut = 0;
    if value.len() > MAX_VALUE_BYTES {
        let mut end = MAX_VALUE_BYTES;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        cut = value.len() - end;
        value = &value[..end];
    }
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'=');
    buf.extend_from_slice(value.as_bytes());
    if cut > 0 {
        buf.extend_from_slice(format!(" [{cut} more bytes cut]").as_bytes());
    }
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn every_field_is_one_escaped_line_of_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journald = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::at(&path, "opsagent-upgrade", "OPSAGENT").unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let url = "http://x/a.tgz\nMESSAGE=forged";
            tracing::warn!(url = %url, state_id = "s-1", "bad \u{1b}]0;title\u{7} order\n");
        });
        let mut datagram = vec![0; 64 << 10];
        let n = journald.recv(&mut datagram).unwrap();
        let text = String::from_utf8(datagram[..n].to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(text.ends_with('\n'));
        for line in &lines {
            assert!(!line.chars().any(char::is_control), "{line:?}");
            let (name, _) = line.split_once('=').unwrap();
            assert!(name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'), "{name}");
        }
        assert!(lines.contains(&"MESSAGE=bad \\x1b]0;title\\x07 order\\n"), "{lines:?}");
        assert!(lines.contains(&"OPSAGENT_URL=http://x/a.tgz\\nMESSAGE=forged"), "{lines:?}");
        assert!(lines.contains(&"OPSAGENT_STATE_ID=s-1"), "{lines:?}");
        assert!(lines.contains(&"PRIORITY=4"), "{lines:?}");
        assert!(lines.contains(&"SYSLOG_IDENTIFIER=opsagent-upgrade"), "{lines:?}");
        assert_eq!(lines.iter().filter(|l| l.starts_with("MESSAGE=")).count(), 1);
    }

    #[test]
    fn a_catalog_id_becomes_the_message_id_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journald = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::at(&path, "opsagent", "OPSAGENT").unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(message_id = catalog::STATE_FAILED, state_id = "s-1", "state failed");
            tracing::warn!(message_id = "not-an-id\nPRIORITY=0", "forged");
        });
        let mut datagram = vec![0; 64 << 10];
        let n = journald.recv(&mut datagram).unwrap();
        let first = String::from_utf8(datagram[..n].to_vec()).unwrap();
        assert!(first.lines().any(|l| l == format!("MESSAGE_ID={}", catalog::STATE_FAILED)), "{first}");
        let n = journald.recv(&mut datagram).unwrap();
        let second = String::from_utf8(datagram[..n].to_vec()).unwrap();
        assert!(!second.contains("\nMESSAGE_ID="), "{second}");
        assert!(second.lines().any(|l| l == "OPSAGENT_MESSAGE_ID=not-an-id\\nPRIORITY=0"), "{second}");
    }

    #[test]
    fn an_entry_from_given_fields_is_escaped_and_cut_like_the_layers() {
        let long = "x".repeat(MAX_VALUE_BYTES + 10);
        let text = String::from_utf8(entry(&[("MESSAGE", "a\nPRIORITY=0"), ("OBJECT_SYSTEMD_UNIT", &long)])).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0], "MESSAGE=a\\nPRIORITY=0");
        assert!(lines[1].ends_with(" [10 more bytes cut]"), "{}", &lines[1][lines[1].len() - 40..]);
    }

    #[test]
    fn a_huge_value_is_cut_to_fit_one_datagram() {
        let mut buf = Vec::new();
        put(&mut buf, "OPSAGENT_X", &"é".repeat(MAX_VALUE_BYTES));
        let text = String::from_utf8(buf).unwrap();
        assert!(text.len() < MAX_VALUE_BYTES + 64);
        assert!(text.ends_with(" more bytes cut]\n"), "{}", &text[text.len() - 40..]);
    }
}
