//! The closed set of requests the helper accepts, and its replies.
//!
//! One request at a time per connection, each with an id chosen by the client. While an
//! `Apply` runs, the helper reads on that connection a `Cancel` or `Withdraw`, and apply
//! requests sent to follow it, each behind the one before ([`RequestFrame::after`]: a
//! pipelined round, at most [`AHEAD_MAX_REQUESTS`] waiting); anything else is answered
//! with [`ErrorCode::Busy`].

use serde::{Deserialize, Serialize};

use serde_json::Value;

use crate::catalogue::{parse_params, CatalogueError, ModuleParams};
use crate::newtypes::{AbsPath, StateId};

/// How many apply requests may wait behind the running one on a connection (see
/// [`RequestFrame::after`]). Enough for the helper to find the next state waiting
/// whenever one ends, so that a converged round is not paced by the round trips between
/// the two processes; few enough that a new recipe withdraws them at once.
pub const AHEAD_MAX_REQUESTS: usize = 8;

/// The largest frame sent to wait behind another: the requests waiting on a connection
/// hold at most `AHEAD_MAX_REQUESTS * AHEAD_MAX_FRAME` bytes of the helper's memory. A
/// larger state is sent on its own when its turn comes.
pub const AHEAD_MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    /// Pipelining, for a helper that announced it ([`Reply::Hello`]'s `pipelining`):
    /// run this `Apply` or `ApplySigned` only once request `after` of this connection has
    /// answered an outcome that succeeded and was not cancelled. Sent while `after` runs
    /// (or waits), it waits behind it ([`AHEAD_MAX_REQUESTS`] such requests at most, each
    /// of a frame within [`AHEAD_MAX_FRAME`]) and starts as soon as `after` ends,
    /// without a round trip to the daemon; when `after` failed, was cancelled, asked for
    /// downloads or was refused, it is answered [`ErrorCode::NotRun`] and nothing runs.
    /// It goes through every check an ordinary request does, when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    pub request: Request,
}

impl RequestFrame {
    /// A request to run on its own (not pipelined).
    pub fn new(id: u64, request: Request) -> Self {
        Self { id, after: None, request }
    }
}

// Requests are built once and serialised at once; boxing `Apply` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// First request on a connection: both sides name their protocol version.
    Hello { protocol_version: u32, agent_version: String },
    /// Apply one state whose parameters the daemon sends. Refused (`unverified`) by a
    /// helper with a `recipe_key`: then only [`Request::ApplySigned`] runs states.
    Apply(ApplyRequest),
    /// Hand the helper a signed recipe, once per recipe version (again after a
    /// reconnect is harmless). The helper verifies the signature against its own
    /// `recipe_key`, checks the app id and that the version is not older than the
    /// highest it verified, types every state with the catalogue and keeps the copy in
    /// its state directory. Answered [`Reply::RecipeVerified`] or an error.
    Recipe(RecipeUpload),
    /// Apply state `index` (from 0) of the verified recipe `recipe_version`, with the
    /// helper's own copy of its parameters.
    ///
    /// Why by index: the request is a few bytes whatever the state, so the daemon can
    /// send the next one as soon as the previous outcome arrives (or, with a later
    /// streaming request over the same stored recipe, send a whole round at once) and a
    /// `Cancel` naming the running request's id still reaches it at once.
    ApplySigned(ApplySignedRequest),
    /// Cancel the running `Apply` whose request id is `target`: its commands' process
    /// groups are killed and it answers with an outcome marked cancelled.
    Cancel { target: u64 },
    /// Withdraw the request `target` sent ahead ([`RequestFrame::after`]) if it has not
    /// started: it is answered `not-run`. One that has started is left to finish (it is
    /// then the running state, and a round that moves on lets a running state end).
    /// Answered [`Reply::Cancelled`] with `found` saying whether it was withdrawn.
    Withdraw { target: u64 },
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
    /// Remote content the daemon downloaded for this state, after the helper answered
    /// [`Reply::NeedFetch`]. The helper trusts none of it blindly: see [`FetchedFile`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetched: Vec<FetchedFile>,
    /// Plan, don't act: inspect the host as applying would and answer with what would
    /// change (`Outcome::planned`); the helper writes nothing. Same policy as applying.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
}

/// A signed recipe as the daemon passes it on (see [`crate::signed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeUpload {
    /// The canonical bytes, exactly as signed.
    pub bytes: String,
    /// The minisign signature file's text (four lines).
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySignedRequest {
    pub recipe_version: u64,
    pub index: u32,
    /// As in [`ApplyRequest::fetched`]; in signed mode each file must also match the
    /// sha256 the signed state pins for its URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetched: Vec<FetchedFile>,
    /// As in [`ApplyRequest::plan`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
}

impl ApplyRequest {
    pub fn new(state_id: StateId, recipe_version: u64, params: ModuleParams) -> Self {
        Self { state_id, recipe_version, params, fetched: Vec::new(), plan: false }
    }
}

/// One downloaded file, as the daemon describes it. The helper opens `path` without
/// following links, requires a regular file owned by the connected peer's uid (so the
/// daemon cannot point it at a file only root may read), and checks `size` and `sha256`
/// against what it reads itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedFile {
    /// The URL exactly as the helper asked for it.
    pub url: String,
    pub path: AbsPath,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
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
        /// The helper has a `recipe_key`: it runs only states of recipes it verified
        /// ([`Request::Recipe`], [`Request::ApplySigned`]). Absent from older helpers.
        #[serde(default)]
        signed_recipes: bool,
        /// The helper takes apply requests sent ahead ([`RequestFrame::after`]). Absent
        /// from older helpers, which get one request at a time.
        #[serde(default)]
        pipelining: bool,
        /// How many may wait behind the running one at once. Absent (0) from helpers
        /// that take one.
        #[serde(default)]
        ahead: u32,
    },
    /// Answer to [`Request::Recipe`]: the recipe is verified and kept.
    RecipeVerified {
        app_id: String,
        recipe_version: u64,
        states: u32,
    },
    Outcome(Outcome),
    /// Answer to `Apply` when the state needs remote content it was not given: the
    /// daemon downloads `urls` (as written) and sends the same `Apply` again with
    /// `fetched` filled in. Nothing has been changed on the host.
    NeedFetch {
        urls: Vec<String>,
    },
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
    /// This outcome is a plan (the request had `plan`): `changes` are what would change,
    /// in the same words as a real change, and nothing on the host was touched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub planned: bool,
    /// For a planned content change: a unified diff, capped; binary or sensitive content
    /// is named by its checksums only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
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
    /// A `recipe_key` is configured: only signed recipes run.
    #[serde(default)]
    pub recipes_verified: bool,
    /// The newest recipe version the helper verified for this instance's app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_version: Option<u64>,
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
    /// Signed mode: the recipe's signature, app or version is not acceptable, or the
    /// request names no state of a verified recipe.
    Unverified,
    /// A request sent ahead ([`RequestFrame::after`]) did not run: the request it
    /// followed did not succeed, or it was cancelled before it started. Nothing ran;
    /// the client may send it again on its own.
    NotRun,
    Internal,
}

/// Why a frame is not a request the helper will carry out.
#[derive(Debug)]
pub enum DecodeError {
    /// An `Apply` whose parameters the catalogue refuses: the error names the parameter.
    /// `state_id` is the request's, when it is a valid one (for the log).
    Invalid { id: u64, state_id: Option<StateId>, module: String, error: Box<CatalogueError> },
    /// Not a request at all.
    Malformed { id: u64, message: String },
}

/// Decodes a request frame. Its `Apply` parameters go through the catalogue (see
/// [`ModuleParams`]); when they are what failed, the error says so, with the
/// catalogue's message, instead of a bare JSON error.
pub fn decode_request(body: &[u8]) -> Result<RequestFrame, DecodeError> {
    let err = match serde_json::from_slice::<RequestFrame>(body) {
        Ok(frame) => return Ok(frame),
        Err(e) => e,
    };
    let v = serde_json::from_slice::<Value>(body).ok();
    let id = v.as_ref().and_then(|v| v.get("id")?.as_u64()).unwrap_or(0);
    let apply =
        v.as_ref().and_then(|v| v.get("request")).filter(|r| r.get("type").and_then(Value::as_str) == Some("apply"));
    if let Some((r, module)) = apply.and_then(|r| Some((r, r.get("module")?.as_str()?))) {
        if let Err(error) = parse_params(module, r.get("params").unwrap_or(&Value::Null)) {
            let state_id = r.get("state_id").and_then(Value::as_str).and_then(|s| StateId::parse(s).ok());
            return Err(DecodeError::Invalid { id, state_id, module: module.to_string(), error: Box::new(error) });
        }
    }
    Err(DecodeError::Malformed { id, message: err.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::parse_state;
    use serde_json::json;

    #[test]
    fn apply_request_wire_shape_round_trips() {
        let params = parse_state("linux.file", &json!({"path": "/etc/motd", "content": "hi"})).unwrap().params;
        let frame =
            RequestFrame::new(7, Request::Apply(ApplyRequest::new(StateId::parse("state-1").unwrap(), 3, params)));
        let text = serde_json::to_value(&frame).unwrap();
        assert_eq!(text["request"]["type"], "apply");
        assert_eq!(text["request"]["module"], "linux.file");
        assert_eq!(text["request"]["params"]["path"], "/etc/motd");
        assert!(text["request"].get("fetched").is_none(), "empty fetched is not sent: {text}");
        let back: RequestFrame = serde_json::from_value(text).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn fetched_files_and_need_fetch_round_trip() {
        let params =
            parse_state("linux.file", &json!({"path": "/etc/motd", "remote_uri": "http://h/m"})).unwrap().params;
        let mut req = ApplyRequest::new(StateId::parse("s").unwrap(), 1, params);
        req.fetched.push(FetchedFile {
            url: "http://h/m".into(),
            path: AbsPath::parse("/var/lib/opsagent/fetch/1").unwrap(),
            size: 3,
            sha256: "ab".repeat(32),
        });
        let text = serde_json::to_value(Request::Apply(req.clone())).unwrap();
        assert_eq!(text["fetched"][0]["path"], "/var/lib/opsagent/fetch/1");
        assert_eq!(serde_json::from_value::<Request>(text).unwrap(), Request::Apply(req));
        // A relative path is refused at the protocol level.
        let mut bad = serde_json::to_value(Request::Apply(ApplyRequest::new(
            StateId::parse("s").unwrap(),
            1,
            parse_state("linux.file", &json!({"path": "/x"})).unwrap().params,
        )))
        .unwrap();
        bad["fetched"] = json!([{"url": "u", "path": "rel", "size": 1, "sha256": ""}]);
        assert!(serde_json::from_value::<Request>(bad).is_err());

        let reply = Reply::NeedFetch { urls: vec!["http://h/a.tgz".into()] };
        let text = serde_json::to_value(&reply).unwrap();
        assert_eq!(text, json!({"type": "need-fetch", "urls": ["http://h/a.tgz"]}));
        assert_eq!(serde_json::from_value::<Reply>(text).unwrap(), reply);
    }

    #[test]
    fn unknown_request_types_and_bad_ids_are_refused() {
        assert!(serde_json::from_value::<RequestFrame>(json!({"id": 1, "request": {"type": "format-disk"}})).is_err());
        assert!(serde_json::from_value::<RequestFrame>(json!({"id": 1, "request": {"type": "apply", "state_id": "", "module": "linux.file", "params": {"path": "/x"}}})).is_err());
    }
}
