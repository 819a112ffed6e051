//! Signed recipes: the bytes a backend signs, and how the helper reads them back.
//!
//! The definition lives here, next to the catalogue, because three parties must agree on
//! it byte for byte: the backend that signs (`opsagent-backend --signing-key`, or any
//! other backend following `docs/spec/protocol.md`), the daemon that rebuilds the bytes
//! from the `RecipeMetadata` it received, and the root helper that verifies them.
//!
//! **Canonical bytes** of a recipe: the UTF-8 text of
//! `{"recipe_version":N,"state":[S1,S2,…]}` where each `S` is
//! `{"id":…,"module":…,"parameter":{…}}` plus, when the signer pins downloads,
//! `"fetch_sha256":{URL:HEX,…}`, written by [`write_canonical`]: no whitespace, object
//! keys sorted by their UTF-8 bytes, strings escaped minimally (`\"`, `\\`, `\b`, `\f`,
//! `\n`, `\r`, `\t`, other characters below U+0020 as `\u00XX` with lowercase hex,
//! everything else as itself), integers in plain decimal. A non-integer number cannot be
//! signed (floating-point text has no single form every language writes).
//!
//! **Signature**: a minisign signature (prehashed Ed25519, as `minisign -S` makes) of
//! those bytes whose trusted comment is [`trusted_comment`]`(app_id, N)`. The trusted
//! comment is covered by the global signature, so the app id and version are signed too.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::catalogue::{parse_state, Parsed};
use crate::newtypes::StateId;

/// The extension field of a signed state that pins downloaded content: URL → sha256.
pub const FETCH_PINS: &str = "fetch_sha256";
/// Start of the trusted comment of a recipe signature.
pub const COMMENT_PREFIX: &str = "opsagent-recipe ";
/// Most states a signed recipe may hold (the daemon's cap, `MAX_STATES`).
pub const MAX_SIGNED_STATES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("a recipe with a non-integer number ({0}) cannot be signed: its text form is not canonical")]
    Float(String),
    #[error("the signed recipe is not JSON: {0}")]
    NotJson(String),
    #[error("the signed recipe is malformed: {0}")]
    Shape(String),
    #[error("the trusted comment {0:?} is not `opsagent-recipe {{\"app_id\":…,\"recipe_version\":…}}`")]
    Comment(String),
}

/// Appends the canonical text of `v` to `out` (see the module documentation).
pub fn write_canonical(v: &Value, out: &mut String) -> Result<(), SignedError> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                return Err(SignedError::Float(n.to_string()));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // The daemon keeps maps in arrival order (serde_json `preserve_order`): sort here.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(&map[k], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One state as it is signed.
#[derive(Debug, Clone, Copy)]
pub struct SignState<'a> {
    pub id: &'a str,
    pub module: &'a str,
    pub parameter: &'a Value,
    /// The signer's `fetch_sha256` pins, if any.
    pub pins: Option<&'a Value>,
}

/// The canonical bytes of recipe `version` with `states` (see the module documentation).
pub fn canonical_bytes<'a>(
    version: u64,
    states: impl IntoIterator<Item = SignState<'a>>,
) -> Result<String, SignedError> {
    let mut out = String::with_capacity(256);
    let _ = write!(out, "{{\"recipe_version\":{version},\"state\":[");
    for (i, s) in states.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Keys in byte order: fetch_sha256 < id < module < parameter.
        out.push('{');
        if let Some(pins) = s.pins {
            out.push_str("\"fetch_sha256\":");
            write_canonical(pins, &mut out)?;
            out.push(',');
        }
        out.push_str("\"id\":");
        write_string(s.id, &mut out);
        out.push_str(",\"module\":");
        write_string(s.module, &mut out);
        out.push_str(",\"parameter\":");
        write_canonical(s.parameter, &mut out)?;
        out.push('}');
    }
    out.push_str("]}");
    Ok(out)
}

/// The trusted comment of recipe `version` of app `app_id`.
pub fn trusted_comment(app_id: &str, version: u64) -> String {
    let mut out = String::from(COMMENT_PREFIX);
    out.push_str("{\"app_id\":");
    write_string(app_id, &mut out);
    let _ = write!(out, ",\"recipe_version\":{version}}}");
    out
}

/// The app id and version a trusted comment names.
pub fn parse_trusted_comment(comment: &str) -> Result<(String, u64), SignedError> {
    let bad = || SignedError::Comment(comment.to_string());
    let json = comment.strip_prefix(COMMENT_PREFIX).ok_or_else(bad)?;
    let v: Value = serde_json::from_str(json).map_err(|_| bad())?;
    let app = v.get("app_id").and_then(Value::as_str).filter(|a| !a.is_empty()).ok_or_else(bad)?;
    let version = v.get("recipe_version").and_then(Value::as_u64).filter(|n| *n > 0).ok_or_else(bad)?;
    Ok((app.to_string(), version))
}

/// One state of a verified recipe as signed. It is typed when it is asked for
/// ([`SignedState::typed`]): a recipe is refused whole only for its structure, as the
/// daemon does (#18 item 3), and a state that cannot run fails by itself, named.
#[derive(Debug, Clone)]
pub struct SignedState {
    /// The id exactly as signed: perhaps not a usable [`StateId`].
    pub id: String,
    pub module: String,
    pub parameter: Value,
    /// The signer's `fetch_sha256`, as signed.
    pub pins: Option<Value>,
}

/// A state of a verified recipe typed by the catalogue (the decoder `opsagent check`
/// uses): what the helper applies.
#[derive(Debug, Clone)]
pub struct TypedState {
    pub id: StateId,
    pub parsed: Parsed,
    /// URL → lowercase sha256 hex, from the signer's `fetch_sha256`.
    pub pins: BTreeMap<String, String>,
}

impl SignedState {
    /// Its id, parameters and pins typed, or why it cannot run (the same words as the
    /// daemon's for an id or parameters it cannot use).
    pub fn typed(&self) -> Result<TypedState, String> {
        let id = StateId::parse(&self.id).map_err(|_| {
            let shown: String = self.id.chars().take(64).collect();
            format!("state id {shown:?} is empty, longer than {} bytes or has control characters", StateId::MAX_LEN)
        })?;
        let mut pins = BTreeMap::new();
        if let Some(p) = &self.pins {
            let obj = p.as_object().ok_or_else(|| format!("\"{FETCH_PINS}\" is not an object"))?;
            for (url, hex) in obj {
                let hex = hex
                    .as_str()
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| format!("the pin of {url:?} is not a sha256 in hex"))?;
                pins.insert(url.clone(), hex.to_ascii_lowercase());
            }
        }
        let parsed = parse_state(&self.module, &self.parameter).map_err(|e| e.to_string())?;
        Ok(TypedState { id, parsed, pins })
    }
}

/// A recipe read back from its canonical bytes.
#[derive(Debug, Clone)]
pub struct SignedRecipe {
    pub version: u64,
    pub states: Vec<SignedState>,
}

/// Reads canonical bytes (after their signature was verified). Only the structure the
/// daemon also refuses a recipe for refuses it here (not JSON, no positive
/// `recipe_version`, no `state` list, too many states, a state that is not an object with
/// a string `id` and `module` and a `parameter`: canonical bytes always have them). The
/// states are not typed here: that waits for each one's turn ([`SignedState::typed`]), so
/// one bad state fails alone and the verification of a long recipe does not type states
/// the round may never reach before the first one starts.
pub fn decode(bytes: &str) -> Result<SignedRecipe, SignedError> {
    #[derive(serde::Deserialize)]
    struct Wire {
        recipe_version: Value,
        state: Value,
    }
    let shape = |s: String| SignedError::Shape(s);
    let v: Wire = serde_json::from_str(bytes).map_err(|e| SignedError::NotJson(e.to_string()))?;
    let version = v
        .recipe_version
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| shape("\"recipe_version\" is not a positive integer".into()))?;
    let Value::Array(list) = v.state else {
        return Err(shape("\"state\" is not a list".into()));
    };
    if list.len() > MAX_SIGNED_STATES {
        return Err(shape(format!("{} states are more than the {MAX_SIGNED_STATES} a recipe may hold", list.len())));
    }
    let mut states = Vec::with_capacity(list.len());
    for (i, s) in list.into_iter().enumerate() {
        let n = i + 1;
        let Value::Object(mut s) = s else {
            return Err(shape(format!("state #{n} is not an object")));
        };
        let mut text = |key: &str| match s.remove(key) {
            Some(Value::String(t)) => Ok(t),
            _ => Err(shape(format!("state #{n} has no string \"{key}\""))),
        };
        let (id, module) = (text("id")?, text("module")?);
        let parameter = s.remove("parameter").ok_or_else(|| shape(format!("state #{n} has no \"parameter\"")))?;
        states.push(SignedState { id, module, parameter, pins: s.remove(FETCH_PINS) });
    }
    Ok(SignedRecipe { version, states })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_text_is_sorted_minimal_and_refuses_floats() {
        let v = json!({"b": [1, -2, true, null], "a": "x\"\\\n\u{1}é\u{2028}", "Z": {}});
        let mut s = String::new();
        write_canonical(&v, &mut s).unwrap();
        assert_eq!(s, "{\"Z\":{},\"a\":\"x\\\"\\\\\\n\\u0001é\u{2028}\",\"b\":[1,-2,true,null]}");
        let mut s = String::new();
        assert_eq!(write_canonical(&json!({"t": 1.5}), &mut s), Err(SignedError::Float("1.5".into())));
    }

    #[test]
    fn canonical_bytes_decode_back_with_typed_states_and_pins() {
        let p1 = json!({"path": "/etc/motd", "content": "hi"});
        let p2 = json!({"path": "/srv/x", "remote_uri": "http://h/x"});
        let pins = json!({"http://h/x": "AB".repeat(32)});
        let states = [
            SignState { id: "s1", module: "linux.file", parameter: &p1, pins: None },
            SignState { id: "s2", module: "linux.file", parameter: &p2, pins: Some(&pins) },
        ];
        let bytes = canonical_bytes(7, states).unwrap();
        assert!(
            bytes.starts_with("{\"recipe_version\":7,\"state\":[{\"id\":\"s1\",\"module\":\"linux.file\""),
            "{bytes}"
        );
        // The whole text is canonical JSON of itself.
        let mut again = String::new();
        write_canonical(&serde_json::from_str(&bytes).unwrap(), &mut again).unwrap();
        assert_eq!(again, bytes);
        let r = decode(&bytes).unwrap();
        assert_eq!(r.version, 7);
        assert_eq!(r.states[1].typed().unwrap().pins["http://h/x"], "ab".repeat(32));
        assert_eq!(r.states[0].typed().unwrap().id.as_str(), "s1");
        // One bad state is its own failure, not the recipe's.
        let bad_pins = json!({"http://h/x": "nope"});
        let bad = canonical_bytes(
            1,
            [
                SignState { id: "s", module: "linux.nope", parameter: &p1, pins: None },
                SignState { id: "", module: "linux.file", parameter: &p1, pins: None },
                SignState { id: "p", module: "linux.file", parameter: &p1, pins: Some(&bad_pins) },
                SignState { id: "ok", module: "linux.file", parameter: &p1, pins: None },
            ],
        );
        let r = decode(&bad.unwrap()).unwrap();
        let why = |i: usize| r.states[i].typed().unwrap_err();
        assert!(why(0).contains("unknown module"), "{}", why(0));
        assert!(why(1).contains("state id \"\" is empty"), "{}", why(1));
        assert!(why(2).contains("not a sha256"), "{}", why(2));
        assert!(r.states[3].typed().is_ok());
        // The structure still refuses the whole recipe.
        assert!(decode("{\"recipe_version\":0,\"state\":[]}").is_err());
        assert!(decode("{\"recipe_version\":1,\"state\":[{\"module\":\"m\",\"parameter\":{}}]}").is_err());
        assert!(decode("{\"recipe_version\":1,\"state\":[{\"id\":7,\"module\":\"m\",\"parameter\":{}}]}").is_err());
        assert!(decode("{\"recipe_version\":1,\"state\":[\"s\"]}").is_err());
    }

    #[test]
    fn trusted_comment_round_trips_and_refuses_other_text() {
        let c = trusted_comment("app \"1\"", 9);
        assert_eq!(c, "opsagent-recipe {\"app_id\":\"app \\\"1\\\"\",\"recipe_version\":9}");
        assert_eq!(parse_trusted_comment(&c).unwrap(), ("app \"1\"".to_string(), 9));
        assert!(parse_trusted_comment("timestamp:1 file:x").is_err());
        assert!(parse_trusted_comment("opsagent-recipe {\"app_id\":\"a\",\"recipe_version\":0}").is_err());
    }
}
