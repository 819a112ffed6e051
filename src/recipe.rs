//! A recipe: the ordered states of one recipe version, each already typed by the
//! catalogue or carrying the reason it cannot run.
//!
//! Only what the original agent refused refuses a recipe (a state that is not an object
//! or lacks the `id`, `module` or `parameter` key). One bad state never does: a state
//! whose id is unusable, whose parameter is not an object, whose module is unknown or
//! whose parameters are wrong fails when its turn comes, with a StateLog naming the
//! problem, and the others run.

use std::path::Path;
use std::sync::Arc;

use opsagent_proto::catalogue::{parse_state, Parsed};
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::RecipeUpload;
use opsagent_proto::signed::{self, SignState};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::protocol::{parse_states, too_many_states, ProtocolError, WireState, MAX_STATES};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("{path}: {reason}")]
    Shape { path: String, reason: String },
    #[error("invalid recipe: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("state {id:?}: cannot keep its parameters as JSON text: {source}")]
    Keep { id: String, source: serde_json::Error },
}

/// One state, held once: as the backend sent it, its parameters as compact JSON text.
///
/// The typed parameters are not kept beside them: a 10,000-state recipe held as
/// `serde_json::Value` maps plus a typed copy (the params enum is as large as its largest
/// module) cost ~1.6 KB a state for the daemon's whole life; the text costs what the
/// backend sent. A state is typed when it is used ([`RecipeState::typed`], ~2 µs), which
/// is once a round, when its turn comes; typing is a pure function of the id, the module
/// and the parameters, so every use gets the same verdict.
#[derive(Debug, Clone)]
pub struct RecipeState {
    /// The id exactly as the backend sent it: StateLogs carry it back unchanged, even
    /// when it is not a valid [`StateId`] (then the state fails).
    pub id: String,
    pub module: String,
    /// Compact JSON text of the parameters (key order as received, `{}` for the shapes
    /// that mean none); persisted as it is.
    pub parameter: Box<RawValue>,
    /// Extension (signed recipes): the signer's sha256 pins of downloads, kept so that
    /// the recipe can be persisted with them (and the reference backend passes them on).
    pub fetch_sha256: Option<Box<RawValue>>,
}

impl PartialEq for RecipeState {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.module == other.module
            && self.parameter.get() == other.parameter.get()
            && self.fetch_sha256.as_deref().map(RawValue::get) == other.fetch_sha256.as_deref().map(RawValue::get)
    }
}

impl RecipeState {
    fn from_wire(w: WireState) -> Result<Self, RecipeError> {
        let keep = |v: &Value| {
            serde_json::value::to_raw_value(v).map_err(|source| RecipeError::Keep { id: w.id.clone(), source })
        };
        let parameter = keep(&w.parameter)?;
        let fetch_sha256 = w.fetch_sha256.as_ref().map(keep).transpose()?;
        Ok(Self { id: w.id, module: w.module, parameter, fetch_sha256 })
    }

    /// The parameters as a JSON value: a copy, for the one state being used.
    pub fn parameter_value(&self) -> Value {
        // The text was written by serde_json from a `Value`, so it reads back to that
        // value; `Null` cannot happen and would fail the state's typing, not panic.
        serde_json::from_str(self.parameter.get()).unwrap_or(Value::Null)
    }

    /// The signer's pins as a JSON value, if the state has any.
    pub fn pins_value(&self) -> Option<Value> {
        self.fetch_sha256.as_deref().map(|p| serde_json::from_str(p.get()).unwrap_or(Value::Null))
    }

    /// The typed parameters, or why this state cannot run: its id is unusable, its module
    /// unknown or its parameters wrong.
    pub fn typed(&self) -> Result<Parsed, String> {
        StateId::parse(&self.id).map_err(|_| bad_id(&self.id))?;
        parse_state(&self.module, &self.parameter_value()).map_err(|e| e.to_string())
    }

    pub fn is_builtin(&self) -> bool {
        self.typed().is_ok_and(|p| p.params.is_builtin())
    }

    /// The id and typed parameters of a state that can run, or why it cannot.
    pub fn runnable(&self) -> Result<(StateId, Parsed), String> {
        let parsed = self.typed()?;
        let id = StateId::parse(&self.id).map_err(|_| bad_id(&self.id))?;
        Ok((id, parsed))
    }
}

fn bad_id(id: &str) -> String {
    let shown: String = id.chars().take(64).collect();
    format!("state id {shown:?} is empty, longer than {} bytes or has control characters", StateId::MAX_LEN)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub version: u64,
    /// `module.repo`/`module.tag` of the original protocol: recorded, never used.
    pub module_info: Option<Value>,
    pub states: Vec<RecipeState>,
    /// Extension (signed recipes): the signed bytes and signature handed to the root
    /// helper, or why they could not be formed. `None`: the backend did not sign.
    pub signed: Option<Result<Arc<RecipeUpload>, String>>,
}

impl Recipe {
    /// The recipe of `version` from its states as received. With the backend's
    /// `signature`, the canonical bytes are rebuilt from those states
    /// (`docs/spec/protocol.md`, "Signed recipes") while their parameters are still
    /// values; only the helper verifies them. Then each state's parameters become text,
    /// their value dropped state by state.
    pub fn from_wire(
        version: u64,
        module_info: Option<Value>,
        states: Vec<WireState>,
        signature: Option<String>,
    ) -> Result<Self, RecipeError> {
        // Each list was capped by `parse_states`; components add up.
        if states.len() > MAX_STATES {
            return Err(too_many_states("RecipeMetadata", states.len()).into());
        }
        let signed = signature.map(|signature| {
            let states = states.iter().map(|s| SignState {
                id: s.id.as_str(),
                module: &s.module,
                parameter: &s.parameter,
                pins: s.fetch_sha256.as_ref(),
            });
            signed::canonical_bytes(version, states)
                .map(|bytes| Arc::new(RecipeUpload { bytes, signature }))
                .map_err(|e| e.to_string())
        });
        let states = states.into_iter().map(RecipeState::from_wire).collect::<Result<_, _>>()?;
        Ok(Self { version, module_info, states, signed })
    }

    /// Loads a recipe file in any of the shapes in use: a `RecipeMetadata` message or
    /// `{"recipe_version", "state": [...]}`, the original test format
    /// `{"component": {NAME: {"state": [...]}}}` (components in file order), or the
    /// IDE's bare array of `{"module", "parameter"}` (ids `state-1`, `state-2`, … are
    /// given). A file without a version is version 1.
    pub fn load_file(path: &Path) -> Result<Self, RecipeError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read { path: shown.clone(), source })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| RecipeError::Json { path: shown.clone(), source })?;
        Self::from_document(&v).map_err(|e| match e {
            RecipeError::Protocol(ProtocolError::Malformed { reason, .. }) => {
                RecipeError::Shape { path: shown, reason }
            }
            other => other,
        })
    }

    pub fn from_document(v: &Value) -> Result<Self, RecipeError> {
        const CODE: &str = "recipe";
        let shape =
            |reason: &str| RecipeError::Protocol(ProtocolError::Malformed { code: CODE.into(), reason: reason.into() });
        let version = match v.get("recipe_version") {
            None => 1,
            Some(n) => {
                n.as_u64().filter(|n| *n > 0).ok_or_else(|| shape("\"recipe_version\" must be a positive integer"))?
            }
        };
        let states = if let Value::Array(items) = v {
            let with_ids: Vec<Value> = items
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut s = s.clone();
                    if let Some(o) = s.as_object_mut() {
                        if !o.contains_key("id") && !o.contains_key("stateid") {
                            o.insert("id".into(), Value::String(format!("state-{}", i + 1)));
                        }
                    }
                    s
                })
                .collect();
            parse_states(CODE, &Value::Array(with_ids))?
        } else if let Some(components) = v.get("component") {
            let components = components.as_object().ok_or_else(|| shape("\"component\" is not an object"))?;
            let mut all = Vec::new();
            for (name, c) in components {
                let list = c.get("state").ok_or_else(|| shape(&format!("component {name:?} has no \"state\" list")))?;
                all.extend(parse_states(CODE, list)?);
            }
            all
        } else if let Some(list) = v.get("state") {
            parse_states(CODE, list)?
        } else {
            return Err(shape("expected a \"state\" list, a \"component\" object or a list of states"));
        };
        let signature = v.get("signature").and_then(Value::as_str).map(str::to_string);
        Self::from_wire(version, v.get("module").cloned(), states, signature)
    }

    /// The recipe as the document [`Recipe::from_document`] reads back (for persisting),
    /// serialised from the recipe itself: no copy of it is built. Keys and their order
    /// are those the daemon has always written.
    pub fn document(&self) -> Document<'_> {
        Document(self)
    }

    pub fn has_waits(&self) -> bool {
        self.states.iter().any(|s| s.module == "meta.wait")
    }
}

/// A recipe as its persisted document: `{"recipe_version", "module", "state": [{"id",
/// "module", "parameter", "fetch_sha256"?}], "signature"?}`, written straight from the
/// recipe's states (their parameters are already JSON text).
pub struct Document<'a>(&'a Recipe);

impl Serialize for Document<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let signature = match &r.signed {
            Some(Ok(upload)) => Some(upload.signature.as_str()),
            _ => None,
        };
        let mut doc = serializer.serialize_struct("Recipe", 3 + usize::from(signature.is_some()))?;
        doc.serialize_field("recipe_version", &r.version)?;
        doc.serialize_field("module", &r.module_info)?;
        doc.serialize_field("state", &StatesDoc(&r.states))?;
        if let Some(signature) = signature {
            doc.serialize_field("signature", signature)?;
        }
        doc.end()
    }
}

struct StatesDoc<'a>(&'a [RecipeState]);

impl Serialize for StatesDoc<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(StateDoc))
    }
}

struct StateDoc<'a>(&'a RecipeState);

impl Serialize for StateDoc<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut doc = serializer.serialize_struct("State", 3 + usize::from(s.fetch_sha256.is_some()))?;
        doc.serialize_field("id", &s.id)?;
        doc.serialize_field("module", &s.module)?;
        doc.serialize_field("parameter", &s.parameter)?;
        if let Some(pins) = &s.fetch_sha256 {
            doc.serialize_field(signed::FETCH_PINS, pins)?;
        }
        doc.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The document as the daemon persists it, read back as a value.
    fn persisted(r: &Recipe) -> Value {
        serde_json::to_value(r.document()).unwrap()
    }

    #[test]
    fn component_format_and_per_state_errors() {
        let doc = json!({"component": {"init": {"state": [
            {"id": "s1", "_": "1 [prepare] x - True", "module": "linux.file", "parameter": {"path": "/tmp/x"}},
            {"id": "s2", "module": "linux.nope", "parameter": {}},
            {"id": "s3", "module": "linux.file", "parameter": {"mode": "0644"}}
        ]}}});
        let r = Recipe::from_document(&doc).unwrap();
        assert_eq!(r.version, 1);
        assert!(r.states[0].typed().is_ok());
        assert!(r.states[1].typed().unwrap_err().contains("unknown module"));
        assert!(r.states[2].typed().unwrap_err().contains("\"path\""));
    }

    #[test]
    fn bare_array_gets_ids_and_metadata_shape_keeps_version() {
        let r = Recipe::from_document(&json!([{"module": "meta.comment", "parameter": {"comment": "x"}}])).unwrap();
        assert_eq!(r.states[0].id, "state-1");
        assert!(r.states[0].is_builtin());
        let r = Recipe::from_document(&json!({"code": "RecipeMetadata", "recipe_version": 9, "state": []})).unwrap();
        assert_eq!(r.version, 9);
    }

    #[test]
    fn structural_errors_refuse_the_whole_recipe() {
        assert!(Recipe::from_document(&json!({"state": [{"module": "linux.file", "parameter": {}}]})).is_err());
        assert!(Recipe::from_document(&json!({"recipe_version": -1, "state": []})).is_err());
        assert!(Recipe::from_document(&json!({"nothing": 1})).is_err());
        assert!(Recipe::from_document(&json!({"state": [{"id": "s", "module": "meta.comment"}]})).is_err());
        assert!(Recipe::from_document(&json!({"state": ["s"]})).is_err());
    }

    /// Issue #18 item 3, from the original's shapes (manager.py `__act_recipe` refused
    /// only a state without `id`/`module`/`parameter`): every other problem is one
    /// state's, named in its failure, and the states around it stay runnable.
    #[test]
    fn one_bad_state_never_rejects_the_recipe() {
        let long = "x".repeat(StateId::MAX_LEN + 1);
        let doc = json!({"recipe_version": 3, "state": [
            {"id": "ok-1", "module": "meta.comment", "parameter": {"comment": "first"}},
            {"id": "", "module": "meta.comment", "parameter": {}},
            {"id": "a\u{1}b", "module": "meta.comment", "parameter": {}},
            {"id": long, "module": "meta.comment", "parameter": {}},
            {"id": "not-object", "module": "linux.file", "parameter": 7},
            {"id": "unknown", "module": "linux.nope", "parameter": {}},
            {"id": "wrong", "module": "linux.file", "parameter": {"path": "/tmp/x", "mode": "rwx"}},
            {"id": "null-param", "module": "meta.comment", "parameter": null},
            {"id": "list-param", "module": "meta.comment", "parameter": []},
            {"id": "blank-param", "module": "meta.comment", "parameter": ""},
            {"id": 17, "module": "meta.comment", "parameter": {}},
            {"id": "module-number", "module": 5, "parameter": {}},
            {"id": "wait-own-id", "module": "meta.wait", "parameter": {}}
        ]});
        let r = Recipe::from_document(&doc).unwrap();
        let why = |id: &str| {
            let s = r.states.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("{id} missing"));
            s.runnable().err()
        };
        assert_eq!(r.states.len(), 13);
        for ok in ["ok-1", "null-param", "list-param", "blank-param", "17", "wait-own-id"] {
            assert_eq!(why(ok), None, "{ok}");
        }
        assert!(why("").unwrap().contains("state id \"\" is empty"));
        assert!(why("a\u{1}b").unwrap().contains("control characters"));
        assert!(why(&long).unwrap().contains("longer than 512 bytes"));
        assert!(why("not-object").unwrap().contains("must be a JSON object, got"));
        assert!(why("unknown").unwrap().contains("unknown module \"linux.nope\""));
        assert!(why("wrong").unwrap().contains("\"mode\""));
        assert!(why("module-number").unwrap().contains("unknown module \"5\""));
        // Persisted and read back: the same states, the same verdicts.
        let again = Recipe::from_document(&persisted(&r)).unwrap();
        assert_eq!((again.version, &again.states), (r.version, &r.states));
    }

    /// A recipe of more than `MAX_STATES` states is refused whole before its states
    /// are typed (the daemon keeps the recipe it has), whether it comes as one list
    /// from the backend or as components adding up; `MAX_STATES` itself is accepted.
    #[test]
    fn recipes_over_the_state_cap_are_refused() {
        let state = |i: usize| json!({"id": format!("s{i}"), "module": "meta.comment", "parameter": {}});
        let list = |n: usize| Value::Array((0..n).map(state).collect());
        let ok = Recipe::from_document(&json!({"recipe_version": 2, "state": list(MAX_STATES)})).unwrap();
        assert_eq!(ok.states.len(), MAX_STATES);
        let text = json!({"code": "RecipeMetadata", "recipe_version": 3, "state": list(MAX_STATES + 1)}).to_string();
        let err = crate::protocol::parse_inbound(&text).unwrap_err().to_string();
        assert!(err.contains("10001 states are more than the 10000"), "{err}");
        let half = MAX_STATES / 2 + 1;
        let doc = json!({"component": {"a": {"state": list(half)}, "b": {"state": list(half)}}});
        let err = Recipe::from_document(&doc).unwrap_err().to_string();
        assert!(err.contains("more than the 10000 a recipe may hold"), "{err}");
    }

    /// The signed bytes are rebuilt from the states as received (`stateid` or a numeric
    /// id, `fetch_sha256` pins) and survive persisting the recipe; a fraction refuses them.
    #[test]
    fn a_signature_is_attached_to_the_canonical_bytes_and_persisted() {
        let text = json!({"code": "RecipeMetadata", "recipe_version": 4, "signature": "SIG", "state": [
            {"stateid": 7, "module": "linux.file", "parameter": {"path": "/etc/motd", "content": "hi"},
             "fetch_sha256": {"http://h/x": "ab"}}
        ]})
        .to_string();
        let crate::protocol::Inbound::RecipeMetadata(m) = crate::protocol::parse_inbound(&text).unwrap() else {
            panic!("not a RecipeMetadata")
        };
        assert_eq!(m.signature.as_deref(), Some("SIG"));
        let unsigned = Recipe::from_wire(4, None, m.states.clone().unwrap(), None).unwrap();
        assert!(unsigned.signed.is_none(), "no signature, no signed bytes");
        let r = Recipe::from_wire(4, None, m.states.unwrap(), m.signature).unwrap();
        let upload = r.signed.clone().unwrap().unwrap();
        assert_eq!(
            upload.bytes,
            r#"{"recipe_version":4,"state":[{"fetch_sha256":{"http://h/x":"ab"},"id":"7","module":"linux.file","parameter":{"content":"hi","path":"/etc/motd"}}]}"#
        );
        let back = Recipe::from_document(&persisted(&r)).unwrap();
        assert_eq!(back.signed.unwrap().unwrap(), upload);
        let float = Recipe::from_document(&json!({"recipe_version": 2, "signature": "SIG", "state": [
            {"id": "s", "module": "linux.file", "parameter": {"path": "/x", "mode": 1.5}}]}))
        .unwrap();
        assert!(float.signed.unwrap().unwrap_err().contains("non-integer"));
    }
    /// The daemon persists the recipe from its states as it holds them, without building a
    /// document value first: the bytes are exactly those the value-built document of before
    /// gave (key order, `module` null when absent, pins and signature), and they load back
    /// to the same recipe.
    #[test]
    fn the_persisted_document_is_the_one_written_before_and_loads_back_the_same() {
        let text = json!({"code": "RecipeMetadata", "recipe_version": 12, "signature": "SIG",
            "module": {"repo": "r", "tag": "t"}, "state": [
            {"stateid": 7, "module": "linux.file", "_": "ignored",
             "parameter": {"path": "/etc/motd", "content": "h\u{e9} \"x\"\n", "mode": "0644", "z": [1, -3, null, true]},
             "fetch_sha256": {"http://h/x": "ab"}},
            {"id": "c", "module": "meta.comment", "parameter": null},
            {"id": "bad", "module": "linux.nope", "parameter": {"b": {"a": 18446744073709551615_u64}}}
        ]})
        .to_string();
        let crate::protocol::Inbound::RecipeMetadata(m) = crate::protocol::parse_inbound(&text).unwrap() else {
            panic!("not a RecipeMetadata")
        };
        let r = Recipe::from_wire(m.recipe_version, m.module, m.states.unwrap(), m.signature).unwrap();
        // The document as it was built before: a value, parameters and pins copied in.
        let states: Vec<Value> = r
            .states
            .iter()
            .map(|s| {
                let mut v = json!({"id": s.id, "module": s.module, "parameter": s.parameter_value()});
                if let Some(pins) = s.pins_value() {
                    v["fetch_sha256"] = pins;
                }
                v
            })
            .collect();
        let mut before = json!({"recipe_version": r.version, "module": r.module_info, "state": states});
        assert!(matches!(&r.signed, Some(Ok(_))), "{:?}", r.signed);
        before["signature"] = json!("SIG");
        let written = serde_json::to_string(&r.document()).unwrap();
        assert_eq!(written, before.to_string());
        let back = Recipe::from_document(&serde_json::from_str(&written).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.states[0].typed(), r.states[0].typed());
        assert!(back.states[2].typed().unwrap_err().contains("unknown module"));
        let unsigned = Recipe { signed: None, module_info: None, ..r };
        let written = serde_json::to_string(&unsigned.document()).unwrap();
        assert!(written.starts_with(r#"{"recipe_version":12,"module":null,"state":[{"id":"7","#), "{written}");
        assert!(!written.contains("signature"), "{written}");
    }

    /// Issue #20: a state is held once, as the backend's parameters in compact text (key
    /// order as received), not also as a `Value` map and a typed copy (the params enum
    /// alone took ~700 bytes a state).
    #[test]
    fn a_state_is_held_once_as_compact_text() {
        assert!(std::mem::size_of::<RecipeState>() <= 80, "{} bytes", std::mem::size_of::<RecipeState>());
        let r = Recipe::from_document(&json!({"state": [
            {"id": "f", "module": "linux.file", "parameter": {"path": "/tmp/x", "content": "a", "mode": "0600"}}]}))
        .unwrap();
        assert_eq!(r.states[0].parameter.get(), r#"{"path":"/tmp/x","content":"a","mode":"0600"}"#);
        let (id, parsed) = r.states[0].runnable().unwrap();
        assert_eq!((id.as_str(), parsed.params.name()), ("f", "linux.file"));
    }
}
