//! The closed set of requests the helper accepts, and its replies.
//!
//! One request at a time per connection, each with an id chosen by the client. While an
//! `Apply` runs, the only request the helper reads on that connection is `Cancel` for
//! it; anything else is answered with [`ErrorCode::Busy`].

use serde::{Deserialize, Serialize};

use crate::catalogue::ModuleParams;
use crate::newtypes::StateId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

// Requests are built once and serialised at once; boxing `Apply` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// First request on a connection: both sides name their protocol version.
    Hello { protocol_version: u32, agent_version: String },
    /// Apply one state.
    Apply(ApplyRequest),
    /// Cancel the running `Apply` whose request id is `target`: its commands' process
    /// groups are killed and it answers with an outcome marked cancelled.
    Cancel { target: u64 },
    /// What the helper is doing (for `opsagent status` and liveness checks).
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub state_id: StateId,
    #[serde(default)]
    pub recipe_version: u64,
    #[serde(flatten)]
    pub params: ModuleParams,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyFrame {
    pub id: u64,
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        protocol_version: u32,
        helper_version: String,
    },
    Outcome(Outcome),
    /// Answer to `Cancel`: whether a running request with that id was found.
    Cancelled {
        target: u64,
        found: bool,
    },
    Status(HelperStatus),
    Error(HelperError),
}

/// What applying one state did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Outcome {
    /// The state is in its wanted condition.
    pub result: bool,
    /// For a person: what was checked, changed or went wrong.
    pub comment: String,
    /// Output of the commands run, capped.
    #[serde(default)]
    pub stdout: String,
    /// Every change made; empty means the host already matched the state.
    #[serde(default)]
    pub changes: Vec<Change>,
    /// The request was cancelled before it finished.
    #[serde(default)]
    pub cancelled: bool,
    #[serde(default)]
    pub duration_ms: u64,
}

impl Outcome {
    pub fn ok(comment: impl Into<String>) -> Self {
        Self { result: true, comment: comment.into(), ..Self::default() }
    }

    pub fn failed(comment: impl Into<String>) -> Self {
        Self { result: false, comment: comment.into(), ..Self::default() }
    }

    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// One change: what was touched (a path, a unit, a package) and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub subject: String,
    pub what: String,
}

impl Change {
    pub fn new(subject: impl Into<String>, what: impl Into<String>) -> Self {
        Self { subject: subject.into(), what: what.into() }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.subject, self.what)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperStatus {
    pub helper_version: String,
    pub protocol_version: u32,
    pub uptime_s: u64,
    /// Requests running now on any connection: (state id, module).
    pub running: Vec<(String, String)>,
}

/// A request the helper would not or could not carry out. Stable code, human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct HelperError {
    pub code: ErrorCode,
    pub message: String,
}

impl HelperError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The frame was not a valid request.
    BadRequest,
    /// `Hello` named another protocol version.
    VersionMismatch,
    /// A request arrived before `Hello`, or while another one runs.
    Busy,
    /// The operator's policy forbids it.
    Denied,
    /// The module runs in the daemon (meta.*) or this helper does not implement it.
    Unsupported,
    /// A parameter the catalogue accepted is not acceptable here (a relative path…).
    InvalidParameter,
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::parse_state;
    use serde_json::json;

    #[test]
    fn apply_request_wire_shape_round_trips() {
        let params = parse_state("linux.file", &json!({"path": "/etc/motd", "content": "hi"})).unwrap().params;
        let frame = RequestFrame {
            id: 7,
            request: Request::Apply(ApplyRequest {
                state_id: StateId::parse("state-1").unwrap(),
                recipe_version: 3,
                params,
            }),
        };
        let text = serde_json::to_value(&frame).unwrap();
        assert_eq!(text["request"]["type"], "apply");
        assert_eq!(text["request"]["module"], "linux.file");
        assert_eq!(text["request"]["params"]["path"], "/etc/motd");
        let back: RequestFrame = serde_json::from_value(text).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn unknown_request_types_and_bad_ids_are_refused() {
        assert!(serde_json::from_value::<RequestFrame>(json!({"id": 1, "request": {"type": "format-disk"}})).is_err());
        assert!(serde_json::from_value::<RequestFrame>(json!({"id": 1, "request": {"type": "apply", "state_id": "", "module": "linux.file", "params": {"path": "/x"}}})).is_err());
    }
}
