//! What the link tells the rest of the daemon (`STATUS=` lines, `opsagent status`).

use serde::{Deserialize, Serialize};

pub use crate::timefmt::now_unix;
use crate::timefmt::utc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum LinkState {
    #[default]
    Starting,
    Connecting {
        url: String,
        /// 1 for the first attempt after start or after a healthy connection.
        attempt: u32,
    },
    Connected {
        url: String,
        since_unix: u64,
    },
    /// Connected, but the backend answered `AppNotReady`; the Handshake is repeated.
    AppNotReady {
        url: String,
        attempt: u32,
        /// The whole pause, as decided (bounds what is shown after a clock step).
        #[serde(default)]
        in_s: u64,
        until_unix: u64,
    },
    Reconnecting {
        /// The whole pause, as decided.
        in_s: u64,
        /// When the next attempt starts.
        until_unix: u64,
        /// The number of the next attempt.
        attempt: u32,
    },
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LinkStatus {
    pub state: LinkState,
    pub last_error: Option<String>,
    pub last_error_unix: Option<u64>,
    /// The backend's `capabilities` (empty for an original v1 backend).
    pub backend_capabilities: Vec<String>,
    /// The proxy of the current or last attempt (password masked), if any.
    pub proxy: Option<String>,
    /// The address the current or last session is connected to.
    pub peer: Option<String>,
    /// WebSocket sessions opened since start.
    pub connects: u64,
    /// Invalid JSON, no code, malformed known messages, binary and oversized frames.
    pub bad_frames: u64,
    /// Frames with a code this agent does not know (logged and ignored, per protocol).
    pub unknown_frames: u64,
    pub binary_frames: u64,
    pub oversized_frames: u64,
    /// StateLogs written to the backend.
    pub sent: u64,
    pub heartbeats: u64,
    /// Set when the link is plaintext or unverified TLS off this host, which only the
    /// root-owned `[agent] allow_insecure_transport` permits: said at every status.
    #[serde(default)]
    pub insecure_transport: Option<String>,
}

impl LinkStatus {
    /// "connected to X since T", "reconnecting in N s (attempt K, last error: …)", …
    pub fn describe(&self) -> String {
        self.describe_at(now_unix())
    }

    pub fn describe_at(&self, now: u64) -> String {
        let err = || self.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default();
        match &self.state {
            LinkState::Starting => "starting".to_string(),
            LinkState::Connecting { url, attempt } if *attempt > 1 => {
                format!("connecting to {url} (attempt {attempt}{})", err())
            }
            LinkState::Connecting { url, attempt } => format!("connecting to {url} (attempt {attempt})"),
            LinkState::Connected { url, since_unix } => format!("connected to {url} since {}", utc(*since_unix)),
            LinkState::AppNotReady { url, attempt, in_s, until_unix } => format!(
                "{url}: app not ready, Handshake again in {} s (attempt {attempt})",
                remaining(*until_unix, now, *in_s)
            ),
            LinkState::Reconnecting { in_s, until_unix, attempt } => {
                format!("reconnecting in {} s (attempt {attempt}{})", remaining(*until_unix, now, *in_s), err())
            }
            LinkState::Stopped => "link stopped".to_string(),
        }
    }
}

/// Seconds left of a pause of `in_s` that ends at `until` by the wall clock. The pause
/// itself runs on the monotonic clock; the wall clock only words it, and may have been
/// stepped back since `until` was taken: never more than the pause itself.
fn remaining(until: u64, now: u64, in_s: u64) -> u64 {
    until.saturating_sub(now).min(in_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions() {
        let mut s = LinkStatus {
            state: LinkState::Connected { url: "wss://b/".into(), since_unix: 1_798_761_599 },
            ..Default::default()
        };
        assert_eq!(s.describe_at(0), "connected to wss://b/ since 2026-12-31 23:59:59 UTC");
        s.state = LinkState::Reconnecting { in_s: 10, until_unix: 110, attempt: 4 };
        s.last_error = Some("connecting to b:443: connection refused".into());
        assert_eq!(
            s.describe_at(102),
            "reconnecting in 8 s (attempt 4, last error: connecting to b:443: connection refused)"
        );
        s.state = LinkState::Connecting { url: "wss://b/".into(), attempt: 1 };
        assert_eq!(s.describe_at(0), "connecting to wss://b/ (attempt 1)");
        s.state = LinkState::AppNotReady { url: "wss://b/".into(), attempt: 2, in_s: 25, until_unix: 30 };
        assert_eq!(s.describe_at(10), "wss://b/: app not ready, Handshake again in 20 s (attempt 2)");
        // The JSON form `opsagent status` reads back.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"]["state"], "app-not-ready");
        assert_eq!(serde_json::from_value::<LinkStatus>(v).unwrap(), s);
    }

    #[test]
    fn a_wall_clock_stepped_back_during_a_pause_does_not_stretch_it_in_words() {
        // Decided at wall time 50 000 (+6 h), described 3 s later after a 12 h step back.
        let now = 50_003 - 12 * 3600;
        let mut s = LinkStatus {
            state: LinkState::Reconnecting { in_s: 8, until_unix: 50_008, attempt: 3 },
            ..Default::default()
        };
        assert_eq!(s.describe_at(now), "reconnecting in 8 s (attempt 3)");
        s.state = LinkState::AppNotReady { url: "wss://b/".into(), attempt: 2, in_s: 30, until_unix: 50_030 };
        assert_eq!(s.describe_at(now), "wss://b/: app not ready, Handshake again in 30 s (attempt 2)");
    }
}
