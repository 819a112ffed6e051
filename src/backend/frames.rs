//! The backend's side of the wire: agent → backend frames parsed leniently, backend →
//! agent frames built as JSON values. (The agent's side is `crate::protocol`.)

use serde_json::{json, Map, Value};

use crate::protocol::{capability, WireState};

/// Fields every hello-like message (Handshake, Test) repeats.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Hello {
    pub instance_id: Option<String>,
    pub app_id: Option<String>,
    pub agent_version: Option<String>,
    pub instance_token: Option<String>,
    /// `None`: the agent announced no capabilities at all (an original v1 agent).
    pub capabilities: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StateLogMsg {
    pub instance_id: Option<String>,
    pub app_id: Option<String>,
    pub recipe_version: Option<u64>,
    pub state_id: Option<String>,
    pub result: Option<bool>,
    pub seq: Option<u64>,
}

/// Agent → backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AgentMsg {
    Handshake(Hello),
    Test(Hello),
    StateLog(StateLogMsg),
    WaitQuery {
        instance_id: Option<String>,
        app_id: Option<String>,
        recipe_version: Option<u64>,
    },
    Heartbeat {
        instance_id: Option<String>,
        app_id: Option<String>,
    },
    /// Extension `upgrade-report`: an ordered upgrade failed (journalled with the frame).
    UpgradeReport {
        instance_id: Option<String>,
        version: Option<String>,
        reason: Option<String>,
    },
    /// Extension `drift`: what a plan of the agent's current recipe would change
    /// (recorded in the event log as a `drift` event, like StateLogs are recorded).
    Drift {
        instance_id: Option<String>,
        recipe_version: Option<u64>,
        states: Vec<Value>,
    },
    /// Extension `fetch-logs`: one frame of the answer to a `FetchLogs` (read whole by
    /// the log store).
    Logs {
        instance_id: Option<String>,
        app_id: Option<String>,
    },
    Unknown(String),
}

impl AgentMsg {
    pub fn code(&self) -> &str {
        match self {
            AgentMsg::Handshake(_) => "Handshake",
            AgentMsg::Test(_) => "Test",
            AgentMsg::StateLog(_) => "StateLog",
            AgentMsg::WaitQuery { .. } => "WaitQuery",
            AgentMsg::Heartbeat { .. } => "Heartbeat",
            AgentMsg::UpgradeReport { .. } => "UpgradeReport",
            AgentMsg::Drift { .. } => "Drift",
            AgentMsg::Logs { .. } => "Logs",
            AgentMsg::Unknown(code) => code,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    #[error("frame is not a JSON object with a string \"code\"")]
    NoCode,
}

fn text(o: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match o.get(*k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// A non-negative integer, also from a digit string.
fn number(o: &Map<String, Value>, key: &str) -> Option<u64> {
    match o.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(o: &Map<String, Value>, key: &str) -> Option<bool> {
    match o.get(key)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

fn hello(o: &Map<String, Value>) -> Hello {
    Hello {
        instance_id: text(o, &["instance_id"]),
        app_id: text(o, &["app_id"]),
        agent_version: text(o, &["agent_version"]),
        instance_token: text(o, &["instance_token"]),
        capabilities: o
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
    }
}

/// The fields of a StateLog object (a frame, or a line of the statelog).
pub(crate) fn statelog_fields(o: &Map<String, Value>) -> StateLogMsg {
    StateLogMsg {
        instance_id: text(o, &["instance_id"]),
        app_id: text(o, &["app_id"]),
        recipe_version: number(o, "recipe_version"),
        state_id: text(o, &["id", "stateid"]),
        result: boolean(o, "state_result"),
        seq: number(o, "seq"),
    }
}

/// Parses one agent frame. Missing or mistyped fields become `None`: the handler decides
/// what it can do without them. Returns the frame's object too, for the journals.
pub(crate) fn parse_agent(frame: &str) -> Result<(AgentMsg, Map<String, Value>), WireError> {
    let v: Value = serde_json::from_str(frame).map_err(|e| WireError::NotJson(e.to_string()))?;
    let Value::Object(o) = v else {
        return Err(WireError::NoCode);
    };
    let code = o.get("code").and_then(Value::as_str).ok_or(WireError::NoCode)?;
    let msg = match code {
        "Handshake" => AgentMsg::Handshake(hello(&o)),
        "Test" => AgentMsg::Test(hello(&o)),
        "StateLog" => AgentMsg::StateLog(statelog_fields(&o)),
        "WaitQuery" => AgentMsg::WaitQuery {
            instance_id: text(&o, &["instance_id"]),
            app_id: text(&o, &["app_id"]),
            recipe_version: number(&o, "recipe_version"),
        },
        "Heartbeat" => AgentMsg::Heartbeat { instance_id: text(&o, &["instance_id"]), app_id: text(&o, &["app_id"]) },
        "UpgradeReport" => AgentMsg::UpgradeReport {
            instance_id: text(&o, &["instance_id"]),
            version: text(&o, &["version"]),
            reason: text(&o, &["reason"]),
        },
        "Drift" => AgentMsg::Drift {
            instance_id: text(&o, &["instance_id"]),
            recipe_version: number(&o, "recipe_version"),
            states: o.get("states").and_then(Value::as_array).cloned().unwrap_or_default(),
        },
        "Logs" => AgentMsg::Logs { instance_id: text(&o, &["instance_id"]), app_id: text(&o, &["app_id"]) },
        other => AgentMsg::Unknown(other.to_string()),
    };
    Ok((msg, o))
}

/// Backend → agent frames.
pub(crate) mod out {
    use super::*;

    /// The extensions this backend speaks.
    pub const CAPABILITIES: &[&str] = &[
        capability::STATELOG_ACK,
        capability::RECONNECT_HINT,
        capability::HEARTBEAT,
        capability::UPGRADE_REPORT,
        capability::DRIFT,
        capability::FETCH_LOGS,
    ];

    /// `signing`: the backend signs its recipes (`signed-recipes`).
    pub fn capabilities(signing: bool) -> Value {
        let mut caps = CAPABILITIES.to_vec();
        if signing {
            caps.push(capability::SIGNED_RECIPES);
        }
        json!({"code": "Capabilities", "capabilities": caps})
    }

    pub fn app_not_ready() -> Value {
        json!({"code": "AppNotReady"})
    }

    /// States carry `id`, as the original backend sent them.
    pub fn recipe_metadata(version: u64, module: Option<&Value>, states: &[WireState]) -> Value {
        json!({
            "code": "RecipeMetadata",
            "recipe_version": version,
            "module": module,
            "state": states,
        })
    }

    /// A waited state is done. Carries `stateid` (documentation) and `id` (what the
    /// original agent read).
    pub fn state_done(version: u64, state_id: &str) -> Value {
        json!({"code": "State", "recipe_version": version, "stateid": state_id, "id": state_id})
    }

    pub fn wait_list(version: u64, waited: &[(String, Option<String>)]) -> Value {
        let waited: Vec<Value> =
            waited.iter().map(|(state, by)| json!({"instance_id": by, "state_id": state})).collect();
        json!({"code": "WaitList", "recipe_version": version, "waited": waited})
    }

    pub fn agent_update(version: &str, url: &str) -> Value {
        json!({"code": "AgentUpdate", "version": version, "url": url})
    }

    pub fn statelog_ack(seq: u64) -> Value {
        json!({"code": "StateLogAck", "seq": seq})
    }

    pub fn test_ans() -> Value {
        json!({"code": "TestAns", "result": true, "error": null})
    }

    pub fn reconnect(after_s: u64) -> Value {
        json!({"code": "Reconnect", "after_s": after_s})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_inbound, Identity, Inbound, Outbound, StateLog};

    fn who() -> Identity {
        Identity {
            instance_id: "i-1".into(),
            app_id: "app-1".into(),
            instance_token: "t".into(),
            agent_version: "1.2.0".into(),
        }
    }

    #[test]
    fn reads_what_the_agent_sends() {
        let hs = Outbound::Handshake { init_errors: None, capabilities: vec!["statelog-ack".into()] }.to_json(&who());
        let (msg, _) = parse_agent(&hs.to_string()).unwrap();
        assert_eq!(
            msg,
            AgentMsg::Handshake(Hello {
                instance_id: Some("i-1".into()),
                app_id: Some("app-1".into()),
                agent_version: Some("1.2.0".into()),
                instance_token: Some("t".into()),
                capabilities: Some(vec!["statelog-ack".into()]),
            })
        );
        let log = StateLog {
            recipe_version: 3,
            state_id: "s-1".into(),
            result: true,
            comment: None,
            stdout: None,
            seq: Some(9),
            offline: false,
            ran_at: None,
        };
        let (msg, _) = parse_agent(&Outbound::StateLog(log).to_json(&who()).to_string()).unwrap();
        let AgentMsg::StateLog(s) = msg else { panic!() };
        assert_eq!(
            (s.recipe_version, s.state_id.as_deref(), s.result, s.seq),
            (Some(3), Some("s-1"), Some(true), Some(9))
        );
    }

    #[test]
    fn the_agents_drift_report_is_read_whole() {
        use crate::round::{DriftReport, DriftedState};
        let report = DriftReport {
            recipe_version: 9,
            states: vec![DriftedState { id: "conf".into(), changes: vec!["mode 0600 -> 0644".into()] }],
        };
        let (msg, _) = parse_agent(&Outbound::Drift(report).to_json(&who()).to_string()).unwrap();
        assert_eq!(
            msg,
            AgentMsg::Drift {
                instance_id: Some("i-1".into()),
                recipe_version: Some(9),
                states: vec![json!({"id": "conf", "changes": ["mode 0600 -> 0644"]})],
            }
        );
    }

    #[test]
    fn lenient_about_spellings_and_garbage() {
        let (msg, _) =
            parse_agent(r#"{"code":"StateLog","stateid":"x","state_result":"false","recipe_version":"4"}"#).unwrap();
        let AgentMsg::StateLog(s) = msg else { panic!() };
        assert_eq!((s.state_id.as_deref(), s.result, s.recipe_version), (Some("x"), Some(false), Some(4)));
        assert!(matches!(parse_agent("{"), Err(WireError::NotJson(_))));
        assert_eq!(parse_agent("[1]"), Err(WireError::NoCode));
        assert_eq!(parse_agent(r#"{"code":1}"#), Err(WireError::NoCode));
        assert_eq!(parse_agent(r#"{"code":"Nope"}"#).unwrap().0, AgentMsg::Unknown("Nope".into()));
        let (hs, _) = parse_agent(r#"{"code":"Handshake"}"#).unwrap();
        assert_eq!(hs, AgentMsg::Handshake(Hello::default()));
    }

    #[test]
    fn the_agent_parses_what_the_backend_sends() {
        let states = vec![WireState {
            id: "s1".into(),
            module: "meta.comment".into(),
            parameter: json!({"comment": "x"}),
            fetch_sha256: None,
        }];
        let Inbound::RecipeMetadata(r) = parse_inbound(&out::recipe_metadata(4, None, &states).to_string()).unwrap()
        else {
            panic!()
        };
        assert_eq!((r.recipe_version, r.states), (4, Some(states)));
        assert_eq!(
            parse_inbound(&out::state_done(4, "w").to_string()).unwrap(),
            Inbound::State { recipe_version: 4, state_id: "w".into() }
        );
        assert!(matches!(
            parse_inbound(&out::wait_list(4, &[("w".into(), Some("i-2".into()))]).to_string()).unwrap(),
            Inbound::WaitList { recipe_version: 4, waited } if waited[0].instance_id.as_deref() == Some("i-2")
        ));
        assert_eq!(parse_inbound(&out::statelog_ack(7).to_string()).unwrap(), Inbound::StateLogAck { seq: 7 });
        assert_eq!(parse_inbound(&out::reconnect(3).to_string()).unwrap(), Inbound::Reconnect { after_s: 3 });
        assert_eq!(parse_inbound(&out::app_not_ready().to_string()).unwrap(), Inbound::AppNotReady);
        assert_eq!(
            parse_inbound(&out::test_ans().to_string()).unwrap(),
            Inbound::TestAns { result: true, error: None }
        );
        assert_eq!(
            parse_inbound(&out::capabilities(false).to_string()).unwrap(),
            Inbound::Capabilities(out::CAPABILITIES.iter().map(|s| s.to_string()).collect())
        );
        assert_eq!(
            parse_inbound(&out::agent_update("1.3.0", "https://x/a.tgz").to_string()).unwrap(),
            Inbound::AgentUpdate { version: "1.3.0".into(), url: "https://x/a.tgz".into() }
        );
    }
}
