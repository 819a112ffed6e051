//! The agent ⇄ backend wire protocol, version 1 (`docs/spec/protocol.md`), plus the
//! extensions this agent adds. Extensions are used only when both sides announced them
//! in their `capabilities`, so an original v1 backend sees only v1 traffic.
//!
//! Inbound frames are parsed by hand from a JSON value rather than by a serde enum, so
//! that a malformed known message is reported with its code and the exact problem, and
//! both spellings of a field (`id`/`stateid`) are accepted.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// Version of the agent <-> backend protocol this daemon speaks (sent in the Handshake);
/// the daemon <-> helper protocol has its own, `opsagent_proto::HELPER_PROTOCOL_VERSION`.
pub const BACKEND_PROTOCOL_VERSION: u64 = 1;

/// Extensions this agent speaks (announced in the Handshake).
pub mod capability {
    /// The backend acknowledges StateLogs by sequence number (`StateLogAck`).
    pub const STATELOG_ACK: &str = "statelog-ack";
    /// The backend may send `Reconnect {after_s}` before going away.
    pub const RECONNECT_HINT: &str = "reconnect-hint";
    /// The agent sends `Heartbeat` messages.
    pub const HEARTBEAT: &str = "heartbeat";
    /// The agent reports a failed self-upgrade once with `UpgradeReport` (a v1 backend
    /// never hears of it: a failing StateLog would name a state it never sent).
    pub const UPGRADE_REPORT: &str = "upgrade-report";
    /// `RecipeMetadata` may carry a `signature` (and states a `fetch_sha256`) that the
    /// root helper verifies (`docs/spec/protocol.md`, "Signed recipes").
    pub const SIGNED_RECIPES: &str = "signed-recipes";
    /// The agent sends `Drift` reports (what a plan of the current recipe would change)
    /// and answers `PlanRequest` with one.
    pub const DRIFT: &str = "drift";
    /// A backend may ask for a log bundle (`FetchLogs`), answered with `Logs` frames
    /// ([`crate::logframes`]) or an upload to the request's `upload_url`. Announced only
    /// by a link that has a log service to answer with.
    pub const FETCH_LOGS: &str = "fetch-logs";
    pub const ALL: &[&str] =
        &[STATELOG_ACK, RECONNECT_HINT, HEARTBEAT, UPGRADE_REPORT, SIGNED_RECIPES, DRIFT, FETCH_LOGS];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    #[error("frame is not a JSON object with a string \"code\"")]
    NoCode,
    #[error("{code}: {reason}")]
    Malformed { code: String, reason: String },
}

/// The refusal of a recipe with more than [`MAX_STATES`] states.
pub fn too_many_states(code: &str, n: usize) -> ProtocolError {
    malformed(code, format!("{n} states are more than the {MAX_STATES} a recipe may hold; recipe refused"))
}

fn malformed(code: &str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed { code: code.to_string(), reason: reason.into() }
}

/// One state of a recipe, as the backend sent it (typed later, by the catalogue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireState {
    pub id: String,
    pub module: String,
    pub parameter: Value,
    /// Extension (signed recipes): URL → sha256 of content the state downloads, set by
    /// the signer; part of the signed bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_sha256: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecipeMetadata {
    pub recipe_version: u64,
    /// `module.repo`/`module.tag` pointed the original agent at the Salt modules; recorded
    /// and reported, never used.
    pub module: Option<Value>,
    /// `None`: a header-only message ("same recipe, new version number").
    pub states: Option<Vec<WireState>>,
    /// Extension (signed recipes): the minisign signature of the recipe's canonical
    /// bytes, as the text of a `.minisig` file.
    pub signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waited {
    #[serde(default)]
    pub instance_id: Option<String>,
    pub state_id: String,
}

/// Backend → agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    RecipeMetadata(RecipeMetadata),
    /// A waited state is done.
    State {
        recipe_version: u64,
        state_id: String,
    },
    WaitList {
        recipe_version: u64,
        waited: Vec<Waited>,
    },
    AgentUpdate {
        version: String,
        url: String,
    },
    AppNotReady,
    Test,
    TestAns {
        result: bool,
        error: Option<String>,
    },
    /// Extension: the backend's own capability list, answering the Handshake.
    Capabilities(Vec<String>),
    /// Extension: StateLogs up to and including `seq` are recorded.
    StateLogAck {
        seq: u64,
    },
    /// Extension (`drift`): the backend asks what a plan of the current recipe would change.
    PlanRequest,
    /// Extension (`fetch-logs`): the backend asks for a log bundle.
    FetchLogs(FetchLogs),
    /// Extension: the backend asks the agent to come back after this many seconds.
    Reconnect {
        after_s: u64,
    },
    /// A code this agent does not know: logged and ignored.
    Unknown(String),
}

fn get_str<'a>(o: &'a Map<String, Value>, code: &str, keys: &[&str]) -> Result<&'a str, ProtocolError> {
    keys.iter()
        .find_map(|k| o.get(*k))
        .ok_or_else(|| malformed(code, format!("missing \"{}\"", keys.join("\"/\""))))?
        .as_str()
        .ok_or_else(|| malformed(code, format!("\"{}\" is not a string", keys[0])))
}

/// A present field as text: a string as it is, any other value as its JSON text (the
/// original converted with `str()`; the value is checked where it is used).
fn get_text(o: &Map<String, Value>, code: &str, key: &str) -> Result<String, ProtocolError> {
    match o.get(key) {
        None | Some(Value::Null) => Err(malformed(code, format!("missing \"{key}\""))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Ok(other.to_string()),
    }
}

/// A positive integer; the original backend sent numbers, some tools send digit strings.
fn get_version(o: &Map<String, Value>, code: &str) -> Result<u64, ProtocolError> {
    let v = o.get("recipe_version").ok_or_else(|| malformed(code, "missing \"recipe_version\""))?;
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 0 => Ok(n),
        _ => Err(malformed(code, format!("\"recipe_version\" must be a positive integer, got {v}"))),
    }
}

/// Most states one recipe may hold. Every state is kept in memory, persisted and run
/// each round: 255,480 states took the daemon to 372 MiB, and a persisted recipe that
/// crashes it would do so again at every start. 10,000 is ten times the largest real
/// recipe seen and what the engine benchmarks run.
pub const MAX_STATES: usize = 10_000;

/// Parses a list of states in any of the shapes recipes come in; `position` helps name
/// a bad one. More than [`MAX_STATES`] refuses the list before any state is copied.
///
/// Only what the original agent refused refuses the list (manager.py `__act_recipe`): a
/// state that is not an object or lacks one of the keys `id`, `module`, `parameter`.
/// Everything else is one state's problem, found when the recipe is typed
/// ([`crate::recipe::Recipe::from_wire`]): that state fails with a StateLog naming it
/// and the others run. A non-string `id` or `module` is taken as its JSON text (the
/// original treated both as opaque values); a `parameter` of `null`, `[]` or `""` is
/// `{}` (the IDE sends those for a module without parameters).
pub fn parse_states(code: &str, list: &Value) -> Result<Vec<WireState>, ProtocolError> {
    let items = list.as_array().ok_or_else(|| malformed(code, "\"state\" is not a list"))?;
    if items.len() > MAX_STATES {
        return Err(too_many_states(code, items.len()));
    }
    items.iter().enumerate().map(|(i, item)| wire_state(code, i, item.clone())).collect()
}

/// State #`i` (0-based) of a list; see [`parse_states`].
fn wire_state(code: &str, i: usize, item: Value) -> Result<WireState, ProtocolError> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let Value::Object(mut o) = item else { return Err(malformed(code, format!("state #{} is not an object", i + 1))) };
    let id = match o.get("id").or_else(|| o.get("stateid")) {
        Some(v) => text(v),
        None => return Err(malformed(code, format!("state #{} has no \"id\"", i + 1))),
    };
    let module = match o.get("module") {
        Some(v) => text(v),
        None => return Err(malformed(code, format!("state {id:?} has no \"module\""))),
    };
    let parameter = match o.remove("parameter") {
        Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Array(a)) if a.is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) if s.is_empty() => Value::Object(Map::new()),
        Some(p) => p,
        None => return Err(malformed(code, format!("state {id:?} has no \"parameter\""))),
    };
    let fetch_sha256 = o.remove(opsagent_proto::signed::FETCH_PINS);
    Ok(WireState { id, module, parameter, fetch_sha256 })
}

/// A received frame's top-level object, read in one pass: every member as a value,
/// except `state` (a recipe's states), kept as its text in the frame and read state by
/// state ([`frame_states`]). A 10,000-state recipe as one `Value` tree was ~1.6 KB a
/// state, the largest part of the daemon's peak at a push.
struct Frame<'a> {
    members: Map<String, Value>,
    states: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Frame<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Frame<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Frame<'de>, A::Error> {
                let mut frame = Frame { members: Map::new(), states: None };
                // A repeated key: the last one counts, as in a `Value` object.
                while let Some(key) = map.next_key::<String>()? {
                    if key == "state" {
                        frame.states = Some(map.next_value()?);
                    } else {
                        let v = map.next_value()?;
                        frame.members.insert(key, v);
                    }
                }
                Ok(frame)
            }
        }
        d.deserialize_map(Members)
    }
}

/// The states of a frame's `state` text, each read into a value and taken apart on its
/// own (`wire_state`): the list is never a value tree as a whole.
fn frame_states(code: &str, list: &RawValue) -> Result<Option<Vec<WireState>>, ProtocolError> {
    if list.get() == "null" {
        return Ok(None);
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(list.get()).map_err(|_| malformed(code, "\"state\" is not a list"))?;
    if items.len() > MAX_STATES {
        return Err(too_many_states(code, items.len()));
    }
    let states = items.into_iter().enumerate().map(|(i, item)| {
        let v: Value = serde_json::from_str(item.get()).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
        wire_state(code, i, v)
    });
    states.collect::<Result<_, _>>().map(Some)
}

pub fn parse_inbound(text: &str) -> Result<Inbound, ProtocolError> {
    let not_json = |e: serde_json::Error| ProtocolError::NotJson(e.to_string());
    // An object is read as a `Frame`; anything else as before, to tell "not JSON" from
    // "no code".
    let (members, states) = if text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
        let f: Frame<'_> = serde_json::from_str(text).map_err(not_json)?;
        (f.members, f.states)
    } else {
        match serde_json::from_str::<Value>(text).map_err(not_json)? {
            Value::Object(members) => (members, None),
            _ => return Err(ProtocolError::NoCode),
        }
    };
    let o = &members;
    let code = o.get("code").and_then(Value::as_str).ok_or(ProtocolError::NoCode)?;
    Ok(match code {
        "RecipeMetadata" => {
            let recipe_version = get_version(o, code)?;
            let states = match states {
                None => None,
                Some(list) => frame_states(code, list)?,
            };
            let signature = o.get("signature").and_then(Value::as_str).map(str::to_string);
            Inbound::RecipeMetadata(RecipeMetadata {
                recipe_version,
                module: o.get("module").cloned(),
                states,
                signature,
            })
        }
        "State" => Inbound::State {
            recipe_version: get_version(o, code)?,
            state_id: get_str(o, code, &["stateid", "id"])?.to_string(),
        },
        "WaitList" => {
            let waited = match o.get("waited") {
                None | Some(Value::Null) => Vec::new(),
                Some(w) => serde_json::from_value(w.clone()).map_err(|e| {
                    malformed(code, format!("\"waited\" is not a list of {{instance_id, state_id}}: {e}"))
                })?,
            };
            Inbound::WaitList { recipe_version: get_version(o, code)?, waited }
        }
        // manager.py `__act_update` took `str()` of both: a number is a version too.
        "AgentUpdate" => {
            Inbound::AgentUpdate { version: get_text(o, code, "version")?, url: get_text(o, code, "url")? }
        }
        "AppNotReady" => Inbound::AppNotReady,
        "Test" => Inbound::Test,
        "TestAns" => Inbound::TestAns {
            result: o
                .get("result")
                .and_then(Value::as_bool)
                .ok_or_else(|| malformed(code, "\"result\" is not a boolean"))?,
            error: o.get("error").and_then(Value::as_str).map(str::to_string),
        },
        "Capabilities" => Inbound::Capabilities(string_list(o.get("capabilities"))),
        "StateLogAck" => Inbound::StateLogAck {
            seq: o
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed(code, "\"seq\" is not a non-negative integer"))?,
        },
        "Reconnect" => Inbound::Reconnect {
            after_s: o
                .get("after_s")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed(code, "\"after_s\" is not a non-negative integer"))?,
        },
        "PlanRequest" => Inbound::PlanRequest,
        "FetchLogs" => Inbound::FetchLogs(parse_fetch_logs(o, code)?),
        other => Inbound::Unknown(other.to_string()),
    })
}

/// A backend's request for logs (`fetch-logs`), its fields parsed once here.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchLogs {
    /// The backend's name for the request, echoed in every `Logs` frame (empty if none).
    pub request: String,
    /// From when on: seconds since the epoch.
    pub since: crate::logbundle::Since,
    /// The parts asked for, each once, in the bundle's order.
    pub what: Vec<crate::logbundle::Part>,
    /// The most the backend will take; the agent's own cap applies too.
    pub max_bytes: Option<u64>,
    /// Where to PUT the bundle instead of sending it in frames.
    pub upload_url: Option<String>,
}

fn parse_fetch_logs(o: &Map<String, Value>, code: &str) -> Result<FetchLogs, ProtocolError> {
    use crate::logbundle::{Part, Since};
    // Seconds since the epoch: a request is read on the agent's clock, not the backend's.
    let since = o
        .get("since")
        .and_then(Value::as_u64)
        .map(Since)
        .ok_or_else(|| malformed(code, "\"since\" is not seconds since the epoch"))?;
    let mut what = match o.get("what") {
        None | Some(Value::Null) => Part::ALL.to_vec(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|p| {
                p.as_str()
                    .ok_or_else(|| malformed(code, "\"what\" holds a non-string"))
                    .and_then(|s| Part::parse(s).map_err(|e| malformed(code, e.to_string())))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(malformed(code, "\"what\" is not a list")),
    };
    what.sort();
    what.dedup();
    if what.is_empty() {
        return Err(malformed(code, "\"what\" is empty"));
    }
    let max_bytes = match o.get("max_bytes") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| malformed(code, "\"max_bytes\" is not a non-negative integer"))?),
    };
    let upload_url = match o.get("upload_url") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().ok_or_else(|| malformed(code, "\"upload_url\" is not a string"))?.to_string()),
    };
    Ok(FetchLogs {
        request: o.get("request").and_then(Value::as_str).unwrap_or_default().to_string(),
        since,
        what,
        max_bytes,
        upload_url,
    })
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Who is speaking: the fields every agent message repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub app_id: String,
    pub instance_token: String,
    pub agent_version: String,
}

/// One executed state's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLog {
    pub recipe_version: u64,
    pub state_id: String,
    pub result: bool,
    pub comment: Option<String>,
    pub stdout: Option<String>,
    /// Extension: unique per instance for its whole life; lets the backend drop resends.
    pub seq: Option<u64>,
    /// Extension: applied while the backend was unreachable (from the persisted recipe).
    pub offline: bool,
    /// Extension: the agent's wall clock when the state finished (RFC 3339, UTC), read
    /// then and there: a StateLog delivered hours later from the spool, or after the clock
    /// was stepped, still says when the state ran by the host's clock of that moment
    /// (never a start time plus monotonic elapsed). Absent in spools of older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_at: Option<String>,
}

/// Agent → backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Handshake {
        init_errors: Option<String>,
        capabilities: Vec<String>,
    },
    StateLog(StateLog),
    WaitQuery {
        recipe_version: u64,
    },
    /// The answer to the backend's `Test`: the Handshake's fields, `init_errors` included
    /// (manager.py `__act_test` sent both with the same errors).
    Test {
        init_errors: Option<String>,
    },
    /// Extension (`upgrade-report`): an ordered self-upgrade failed.
    UpgradeReport {
        version: String,
        running: String,
        reason: String,
    },
    /// Extension (`heartbeat`).
    Heartbeat(Value),
    /// Extension (`drift`): the states of the current recipe that a plan says would change.
    Drift(DriftReport),
    /// Extension (`fetch-logs`): one frame of the answer to a `FetchLogs`
    /// ([`crate::logframes`]), to which the instance's ids are added.
    Logs(Value),
}

/// What a drift plan found: the states of the current recipe that would change, with
/// the changes in the words a real change uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    pub recipe_version: u64,
    pub states: Vec<DriftedState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftedState {
    pub id: String,
    pub changes: Vec<String>,
}

impl Outbound {
    /// The JSON text of this message. StateLog carries both `id` and `stateid`.
    pub fn to_json(&self, who: &Identity) -> Value {
        let hello = |code: &str, init_errors: &Option<String>, capabilities: &[String]| {
            let mut v = json!({
                "code": code,
                "instance_id": who.instance_id,
                "app_id": who.app_id,
                "protocol_version": BACKEND_PROTOCOL_VERSION,
                "agent_version": who.agent_version,
                "instance_token": who.instance_token,
                "init_errors": init_errors,
            });
            if !capabilities.is_empty() {
                v["capabilities"] = json!(capabilities);
            }
            v
        };
        match self {
            Outbound::Handshake { init_errors, capabilities } => hello("Handshake", init_errors, capabilities),
            Outbound::Test { init_errors } => hello("Test", init_errors, &[]),
            Outbound::Drift(r) => json!({
                "code": "Drift",
                "instance_id": who.instance_id,
                "app_id": who.app_id,
                "recipe_version": r.recipe_version,
                "states": r.states,
            }),
            Outbound::UpgradeReport { version, running, reason } => json!({
                "code": "UpgradeReport",
                "instance_id": who.instance_id,
                "app_id": who.app_id,
                "version": version,
                "running": running,
                "result": false,
                "reason": reason,
            }),
            Outbound::StateLog(s) => {
                let mut v = json!({
                    "code": "StateLog",
                    "instance_id": who.instance_id,
                    "app_id": who.app_id,
                    "recipe_version": s.recipe_version,
                    "id": s.state_id,
                    "stateid": s.state_id,
                    "state_result": s.result,
                    "state_comment": s.comment,
                    "state_stdout": s.stdout,
                });
                if let Some(seq) = s.seq {
                    v["seq"] = json!(seq);
                }
                if s.offline {
                    v["offline"] = json!(true);
                }
                if let Some(at) = &s.ran_at {
                    v["ran_at"] = json!(at);
                }
                v
            }
            Outbound::WaitQuery { recipe_version } => json!({
                "code": "WaitQuery",
                "instance_id": who.instance_id,
                "app_id": who.app_id,
                "recipe_version": recipe_version,
            }),
            Outbound::Heartbeat(body) | Outbound::Logs(body) => {
                let code = if matches!(self, Outbound::Logs(_)) { "Logs" } else { "Heartbeat" };
                let mut v = json!({"code": code, "instance_id": who.instance_id, "app_id": who.app_id});
                if let (Some(dst), Value::Object(src)) = (v.as_object_mut(), body) {
                    for (k, val) in src {
                        dst.entry(k.clone()).or_insert_with(|| val.clone());
                    }
                }
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Identity {
        Identity {
            instance_id: "i-0abc".into(),
            app_id: "app-1".into(),
            instance_token: "tok".into(),
            agent_version: "1.2.0".into(),
        }
    }

    #[test]
    fn handshake_matches_the_spec_shape() {
        let v = Outbound::Handshake { init_errors: None, capabilities: vec![] }.to_json(&who());
        assert_eq!(
            v,
            json!({"code": "Handshake", "instance_id": "i-0abc", "app_id": "app-1",
                   "protocol_version": 1, "agent_version": "1.2.0", "instance_token": "tok",
                   "init_errors": null})
        );
        let v = Outbound::Handshake { init_errors: Some("a; b".into()), capabilities: vec!["statelog-ack".into()] }
            .to_json(&who());
        assert_eq!(v["init_errors"], "a; b");
        assert_eq!(v["capabilities"], json!(["statelog-ack"]));
    }

    #[test]
    fn statelog_carries_both_id_spellings() {
        let log = StateLog {
            recipe_version: 7,
            state_id: "state-7E59".into(),
            result: true,
            comment: None,
            stdout: Some("out".into()),
            seq: None,
            offline: false,
            ran_at: None,
        };
        let v = Outbound::StateLog(log.clone()).to_json(&who());
        assert_eq!(
            v,
            json!({"code": "StateLog", "instance_id": "i-0abc", "app_id": "app-1", "recipe_version": 7,
                   "id": "state-7E59", "stateid": "state-7E59", "state_result": true,
                   "state_comment": null, "state_stdout": "out"})
        );
        let at = Some("2026-12-04T05:00:00.000Z".to_string());
        let v = Outbound::StateLog(StateLog { seq: Some(42), offline: true, ran_at: at, ..log }).to_json(&who());
        assert_eq!((v["seq"].as_u64(), v["offline"].as_bool()), (Some(42), Some(true)));
        assert_eq!(v["ran_at"], "2026-12-04T05:00:00.000Z");
    }

    #[test]
    fn waitquery_and_test() {
        let v = Outbound::WaitQuery { recipe_version: 7 }.to_json(&who());
        assert_eq!(v, json!({"code": "WaitQuery", "instance_id": "i-0abc", "app_id": "app-1", "recipe_version": 7}));
        let v = Outbound::Test { init_errors: None }.to_json(&who());
        assert_eq!(v["code"], "Test");
        assert_eq!(v["instance_token"], "tok");
        // Issue #18 item 5: the Test answer carries init_errors as the Handshake does.
        let v = Outbound::Test { init_errors: Some("'/srv/salt' directory not writable".into()) }.to_json(&who());
        assert_eq!(v["init_errors"], "'/srv/salt' directory not writable");
    }

    #[test]
    fn recipe_metadata_from_the_spec() {
        let text = r#"{"code": "RecipeMetadata", "recipe_version": 7,
         "module": {"repo": "https://x/salt.git", "tag": "v2015-03-26"},
         "state": [
           {"id": "state-1", "module": "linux.apt.package",
            "parameter": {"name": [{"key": "nginx", "value": "latest"}]}},
           {"stateid": "state-2", "module": "meta.comment", "parameter": {"comment": "web tier"}}
         ]}"#;
        let Inbound::RecipeMetadata(r) = parse_inbound(text).unwrap() else { panic!() };
        assert_eq!(r.recipe_version, 7);
        assert_eq!(r.module.unwrap()["tag"], "v2015-03-26");
        let states = r.states.unwrap();
        assert_eq!(states[1].id, "state-2");
        assert_eq!(states[0].module, "linux.apt.package");
    }

    #[test]
    fn header_only_recipe_metadata() {
        let Inbound::RecipeMetadata(r) = parse_inbound(r#"{"code":"RecipeMetadata","recipe_version":8}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((r.recipe_version, r.states), (8, None));
    }

    #[test]
    fn invalid_recipes_are_rejected_with_the_reason() {
        for (text, needle) in [
            (r#"{"code":"RecipeMetadata","recipe_version":0,"state":[]}"#, "positive integer"),
            (r#"{"code":"RecipeMetadata","recipe_version":"seven","state":[]}"#, "positive integer"),
            (r#"{"code":"RecipeMetadata","recipe_version":1.5,"state":[]}"#, "positive integer"),
            (r#"{"code":"RecipeMetadata","recipe_version":1,"state":{}}"#, "not a list"),
            (r#"{"code":"RecipeMetadata","recipe_version":1,"state":[{"module":"x","parameter":{}}]}"#, "no \"id\""),
            (r#"{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"s","parameter":{}}]}"#, "no \"module\""),
            (r#"{"code":"RecipeMetadata","recipe_version":1,"state":[{"id":"s","module":"m"}]}"#, "no \"parameter\""),
            (r#"{"code":"RecipeMetadata","recipe_version":1,"state":[5]}"#, "not an object"),
        ] {
            let err = parse_inbound(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    /// Issue #20: a recipe's states are read from the frame's text state by state, the
    /// frame never one value tree; what comes out is what the value tree gave (the last
    /// of repeated keys, `null` for no states, the same refusals).
    #[test]
    fn recipe_states_read_from_the_frame_text_are_those_of_the_value_tree() {
        let frame = concat!(
            " \n",
            r#"{"state": [{"id": "x", "module": "m", "parameter": {}}], "code": "RecipeMetadata",
            "recipe_version": 2, "state": [
            {"stateid": 3, "module": "linux.file", "parameter": {"path": "/a", "b": [1, 2.5, "\u00e9"]},
             "fetch_sha256": {"u": "h"}},
            {"id": "n", "module": "meta.comment", "parameter": null, "_": {"deep": [[[]]]}}]}"#
        );
        let Inbound::RecipeMetadata(m) = parse_inbound(frame).unwrap() else { panic!("not a RecipeMetadata") };
        let tree: Value = serde_json::from_str(frame).unwrap();
        let states = m.states.unwrap();
        assert_eq!(states, parse_states("RecipeMetadata", &tree["state"]).unwrap());
        assert_eq!((states.len(), states[0].id.as_str(), &states[1].parameter), (2, "3", &json!({})));
        let none = r#"{"code":"RecipeMetadata","recipe_version":3,"state":null}"#;
        assert!(matches!(parse_inbound(none), Ok(Inbound::RecipeMetadata(RecipeMetadata { states: None, .. }))));
        assert_eq!(parse_inbound(" [1]"), Err(ProtocolError::NoCode));
        assert_eq!(parse_inbound(r#"{"recipe_version":3,"state":[]}"#), Err(ProtocolError::NoCode));
        for broken in [r#"{"code":"RecipeMetadata","recipe_version":1,"state":[1,]}"#, "{\"code\":", "{} x"] {
            assert!(matches!(parse_inbound(broken), Err(ProtocolError::NotJson(_))), "{broken}");
        }
    }

    #[test]
    fn state_push_accepts_both_spellings() {
        assert_eq!(
            parse_inbound(r#"{"code": "State", "recipe_version": 7, "stateid": "state-9"}"#).unwrap(),
            Inbound::State { recipe_version: 7, state_id: "state-9".into() }
        );
        assert_eq!(
            parse_inbound(r#"{"code": "State", "recipe_version": 7, "id": "state-9"}"#).unwrap(),
            Inbound::State { recipe_version: 7, state_id: "state-9".into() }
        );
    }

    #[test]
    fn the_other_backend_messages() {
        assert_eq!(
            parse_inbound(r#"{"code": "WaitList", "recipe_version": 7, "waited": [{"instance_id": "i-0def", "state_id": "state-3"}]}"#)
                .unwrap(),
            Inbound::WaitList {
                recipe_version: 7,
                waited: vec![Waited { instance_id: Some("i-0def".into()), state_id: "state-3".into() }]
            }
        );
        assert_eq!(
            parse_inbound(r#"{"code": "AgentUpdate", "version": "1.3.0", "url": "https://x/1.3.0/opsagent.tgz"}"#)
                .unwrap(),
            Inbound::AgentUpdate { version: "1.3.0".into(), url: "https://x/1.3.0/opsagent.tgz".into() }
        );
        // Issue #18 item 1: the original's backend sent the WebSocket URI as `url`, and
        // `str()` made a number a version: both are taken, not a malformed frame.
        assert_eq!(
            parse_inbound(r#"{"code": "AgentUpdate", "version": 2015.1, "url": "wss://api.visualops.io:443/agent/"}"#)
                .unwrap(),
            Inbound::AgentUpdate { version: "2015.1".into(), url: "wss://api.visualops.io:443/agent/".into() }
        );
        assert_eq!(
            parse_inbound(r#"{"code": "AgentUpdate", "version": 3, "url": 5}"#).unwrap(),
            Inbound::AgentUpdate { version: "3".into(), url: "5".into() }
        );
        assert_eq!(parse_inbound(r#"{"code": "AppNotReady"}"#).unwrap(), Inbound::AppNotReady);
        assert_eq!(parse_inbound(r#"{"code": "Test"}"#).unwrap(), Inbound::Test);
        assert_eq!(
            parse_inbound(r#"{"code": "TestAns", "result": false, "error": "boom"}"#).unwrap(),
            Inbound::TestAns { result: false, error: Some("boom".into()) }
        );
        assert_eq!(
            parse_inbound(r#"{"code": "TestAns", "result": true, "error": null}"#).unwrap(),
            Inbound::TestAns { result: true, error: None }
        );
        assert_eq!(parse_inbound(r#"{"code": "StateLogAck", "seq": 5}"#).unwrap(), Inbound::StateLogAck { seq: 5 });
        assert_eq!(parse_inbound(r#"{"code": "PlanRequest"}"#).unwrap(), Inbound::PlanRequest);
        assert_eq!(
            parse_inbound(r#"{"code": "Reconnect", "after_s": 30}"#).unwrap(),
            Inbound::Reconnect { after_s: 30 }
        );
        assert_eq!(
            parse_inbound(r#"{"code": "Capabilities", "capabilities": ["statelog-ack"]}"#).unwrap(),
            Inbound::Capabilities(vec!["statelog-ack".into()])
        );
        assert_eq!(parse_inbound(r#"{"code": "Brand-New", "x": 1}"#).unwrap(), Inbound::Unknown("Brand-New".into()));
    }

    #[test]
    fn fetch_logs_is_parsed_once_and_bad_fields_are_named() {
        use crate::logbundle::{Part, Since};
        let full = r#"{"code": "FetchLogs", "request": "r1", "since": 1700000000, "what": ["helper", "agent", "agent"],
            "max_bytes": 4096, "upload_url": "https://b.example/up"}"#;
        assert_eq!(
            parse_inbound(full).unwrap(),
            Inbound::FetchLogs(FetchLogs {
                request: "r1".into(),
                since: Since(1_700_000_000),
                what: vec![Part::Agent, Part::Helper],
                max_bytes: Some(4096),
                upload_url: Some("https://b.example/up".into()),
            })
        );
        let Inbound::FetchLogs(f) = parse_inbound(r#"{"code": "FetchLogs", "since": 5}"#).unwrap() else { panic!() };
        assert_eq!((f.what, f.max_bytes, f.upload_url, f.request), (Part::ALL.to_vec(), None, None, String::new()));
        for (bad, says) in [
            (r#"{"code": "FetchLogs"}"#, "since"),
            (r#"{"code": "FetchLogs", "since": "1h"}"#, "since"),
            (r#"{"code": "FetchLogs", "since": 1, "what": ["kernel"]}"#, "kernel"),
            (r#"{"code": "FetchLogs", "since": 1, "what": []}"#, "empty"),
            (r#"{"code": "FetchLogs", "since": 1, "max_bytes": -1}"#, "max_bytes"),
            (r#"{"code": "FetchLogs", "since": 1, "upload_url": 3}"#, "upload_url"),
        ] {
            let e = parse_inbound(bad).unwrap_err().to_string();
            assert!(e.contains("FetchLogs") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(parse_inbound("not json"), Err(ProtocolError::NotJson(_))));
        assert_eq!(parse_inbound("[1,2]"), Err(ProtocolError::NoCode));
        assert_eq!(parse_inbound(r#"{"code": 5}"#), Err(ProtocolError::NoCode));
        assert!(parse_inbound(r#"{"code": "AgentUpdate", "version": 1}"#).is_err());
        assert!(parse_inbound(r#"{"code": "AgentUpdate", "version": null, "url": "wss://x/"}"#).is_err());
        assert!(parse_inbound(r#"{"code": "WaitList", "recipe_version": 1, "waited": "x"}"#).is_err());
    }
}
