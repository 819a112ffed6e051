//! The recipe directory: what each file name means, how a recipe file becomes the recipe
//! served, and the persisted per-app version counter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::param_types::StateRef;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::BackendError;
use crate::protocol::WireState;
use crate::recipe::Recipe;

/// What a file of the recipe directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// `APP_ID.json`: the app's recipe.
    Recipe,
    /// `APP_ID.update.json`: `{"version", "url"}`, an agent update order.
    Update,
    /// `APP_ID.reconnect.json`: `{"after_s"}`, a one-shot reconnect order.
    Reconnect,
    /// `APP_ID.fetch-logs.json`: a one-shot request for logs (`FetchLogs` fields).
    FetchLogs,
    /// `APP_ID.plan-request.json`: a one-shot request for a plan (`PlanRequest`).
    PlanRequest,
}

pub(crate) const UPDATE_SUFFIX: &str = ".update.json";
pub(crate) const RECONNECT_SUFFIX: &str = ".reconnect.json";
pub(crate) const FETCH_LOGS_SUFFIX: &str = ".fetch-logs.json";
pub(crate) const PLAN_REQUEST_SUFFIX: &str = ".plan-request.json";
const VERSIONS_SUFFIX: &str = ".versions.json";

/// App ids name files, so they are restricted to a safe alphabet: ASCII letters, digits,
/// `.`, `_`, `-`, not starting with `.`, at most 200 bytes.
pub(crate) fn valid_app_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The app and the meaning of a directory entry, or `None` for a file to ignore.
pub(crate) fn classify(name: &str) -> Option<(String, FileKind)> {
    if name.ends_with(VERSIONS_SUFFIX) {
        return None;
    }
    let (app, kind) = if let Some(app) = name.strip_suffix(UPDATE_SUFFIX) {
        (app, FileKind::Update)
    } else if let Some(app) = name.strip_suffix(RECONNECT_SUFFIX) {
        (app, FileKind::Reconnect)
    } else if let Some(app) = name.strip_suffix(FETCH_LOGS_SUFFIX) {
        (app, FileKind::FetchLogs)
    } else if let Some(app) = name.strip_suffix(PLAN_REQUEST_SUFFIX) {
        (app, FileKind::PlanRequest)
    } else {
        (name.strip_suffix(".json")?, FileKind::Recipe)
    };
    valid_app_id(app).then(|| (app.to_string(), kind))
}

pub(crate) fn file_name(app: &str, kind: FileKind) -> String {
    match kind {
        FileKind::Recipe => format!("{app}.json"),
        FileKind::Update => format!("{app}{UPDATE_SUFFIX}"),
        FileKind::Reconnect => format!("{app}{RECONNECT_SUFFIX}"),
        FileKind::FetchLogs => format!("{app}{FETCH_LOGS_SUFFIX}"),
        FileKind::PlanRequest => format!("{app}{PLAN_REQUEST_SUFFIX}"),
    }
}

/// Where the version counter lives: next to the statelog.
pub(crate) fn versions_path(statelog: &Path) -> PathBuf {
    let mut p = statelog.as_os_str().to_owned();
    p.push(VERSIONS_SUFFIX);
    PathBuf::from(p)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One file read from the directory.
#[derive(Debug, Clone)]
pub(crate) struct DirFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// Of the raw bytes: a poll re-parses a file only when this changes.
    pub raw_hash: String,
}

impl DirFile {
    fn read(path: PathBuf) -> std::io::Result<Self> {
        let bytes = std::fs::read(&path)?;
        Ok(Self { raw_hash: sha256_hex(&bytes), path, bytes })
    }
}

/// Everything the directory held at one poll, by app.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub recipes: BTreeMap<String, DirFile>,
    pub updates: BTreeMap<String, DirFile>,
    pub reconnects: BTreeMap<String, DirFile>,
    pub fetch_logs: BTreeMap<String, DirFile>,
    pub plan_requests: BTreeMap<String, DirFile>,
}

/// Reads every meaningful file of `dir`, skipping `skip` (the backend's own journals,
/// should they live there). A file that vanishes or cannot be read mid-scan is logged and
/// left out of this scan only.
pub(crate) fn scan_dir(dir: &Path, skip: &[PathBuf]) -> Result<Scan, BackendError> {
    let mut scan = Scan::default();
    let entries = std::fs::read_dir(dir).map_err(|source| BackendError::io("cannot list", dir, source))?;
    for entry in entries {
        let entry = entry.map_err(|source| BackendError::io("cannot list", dir, source))?;
        let name = entry.file_name();
        let Some((app, kind)) = name.to_str().and_then(classify) else {
            continue;
        };
        let path = entry.path();
        let absolute = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        if skip.contains(&absolute) || !path.is_file() {
            continue;
        }
        let file = match DirFile::read(path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("{}: cannot read: {e}", entry.path().display());
                }
                continue;
            }
        };
        let map = match kind {
            FileKind::Recipe => &mut scan.recipes,
            FileKind::Update => &mut scan.updates,
            FileKind::Reconnect => &mut scan.reconnects,
            FileKind::FetchLogs => &mut scan.fetch_logs,
            FileKind::PlanRequest => &mut scan.plan_requests,
        };
        map.insert(app, file);
    }
    Ok(scan)
}

/// One file of one app, read now: `Ok(None)` when it does not exist.
pub(crate) fn read_one(dir: &Path, app: &str, kind: FileKind) -> std::io::Result<Option<DirFile>> {
    match DirFile::read(dir.join(file_name(app, kind))) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A `meta.wait` state of a recipe and the remote states it waits for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WaitSpec {
    pub state_id: String,
    /// Empty when the wait's parameters are invalid: it fails on the agent and is never
    /// released here.
    pub refs: Vec<StateRef>,
}

/// A valid recipe file's content, before it is given a version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    /// The file's own `recipe_version`, when it has one.
    pub explicit_version: Option<u64>,
    pub module: Option<Value>,
    pub states: Vec<WireState>,
    pub waits: Vec<WaitSpec>,
    /// Of the normalised content (not the raw bytes): re-indenting a file is no new recipe.
    pub hash: String,
}

/// The recipe an app is served.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Served {
    pub version: u64,
    pub hash: String,
    pub module: Option<Value>,
    pub states: Vec<WireState>,
    pub waits: Vec<WaitSpec>,
}

fn content_hash(explicit: Option<u64>, module: Option<&Value>, states: &[WireState]) -> String {
    sha256_hex(json!({"recipe_version": explicit, "module": module, "state": states}).to_string().as_bytes())
}

/// Validates a recipe file exactly as the agent will (`Recipe::from_document`).
pub(crate) fn parse_recipe(bytes: &[u8]) -> Result<Candidate, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let recipe = Recipe::from_document(&doc).map_err(|e| e.to_string())?;
    let explicit_version = doc.get("recipe_version").and_then(Value::as_u64);
    let mut waits = Vec::new();
    let states: Vec<WireState> = recipe
        .states
        .into_iter()
        .map(|s| {
            if s.module == "meta.wait" {
                let refs = match s.typed() {
                    Ok(p) => match &p.params {
                        ModuleParams::MetaWait(w) => w.state.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
                        _ => Vec::new(),
                    },
                    Err(_) => Vec::new(),
                };
                waits.push(WaitSpec { state_id: s.id.as_str().to_string(), refs });
            }
            WireState { parameter: s.parameter_value(), fetch_sha256: s.pins_value(), id: s.id, module: s.module }
        })
        .collect();
    let hash = content_hash(explicit_version, recipe.module_info.as_ref(), &states);
    Ok(Candidate { explicit_version, module: recipe.module_info, states, waits, hash })
}

impl Candidate {
    pub fn serve(self, version: u64) -> Served {
        Served { version, hash: self.hash, module: self.module, states: self.states, waits: self.waits }
    }
}

/// What is persisted per app: the version counter and the last valid recipe (so that a
/// restarted backend keeps serving it even if the file was broken meanwhile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AppRecord {
    pub version: u64,
    pub hash: String,
    #[serde(default)]
    pub module: Option<Value>,
    pub state: Vec<WireState>,
    #[serde(default)]
    pub explicit_version: Option<u64>,
}

impl AppRecord {
    /// The recipe this record describes, re-validated (the file may have been edited by
    /// hand); `None` if it no longer validates.
    pub fn served(&self) -> Option<Served> {
        let mut doc = json!({"state": self.state, "module": self.module});
        if let Some(v) = self.explicit_version {
            doc["recipe_version"] = json!(v);
        }
        let c = parse_recipe(doc.to_string().as_bytes()).ok()?;
        (c.hash == self.hash).then(|| c.serve(self.version))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct VersionFile {
    format: u32,
    apps: BTreeMap<String, AppRecord>,
}

/// `STATELOG.versions.json`: the per-app version counters, rewritten whole (write to a
/// temporary file, then rename) on every change.
#[derive(Debug)]
pub(crate) struct VersionStore {
    path: PathBuf,
    pub apps: BTreeMap<String, AppRecord>,
}

impl VersionStore {
    /// A missing file is an empty store; an unreadable or corrupt one is an error, since
    /// starting from scratch could make versions go backwards.
    pub fn load(path: PathBuf) -> Result<Self, BackendError> {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self { path, apps: BTreeMap::new() }),
            Err(source) => return Err(BackendError::io("cannot read", &path, source)),
        };
        let file: VersionFile = serde_json::from_str(&text).map_err(|e| BackendError::Corrupt {
            path: path.clone(),
            reason: format!("{e} (fix or remove it; removing it restarts every app's version numbering)"),
        })?;
        Ok(Self { path, apps: file.apps })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set(&mut self, app: &str, record: AppRecord) {
        self.apps.insert(app.to_string(), record);
        if let Err(e) = self.save() {
            tracing::error!("{}: cannot save the recipe versions: {e}", self.path.display());
        }
    }

    fn save(&self) -> std::io::Result<()> {
        let file = VersionFile { format: 1, apps: self.apps.clone() };
        let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        crate::atomic_file::write_atomic(&self.path, text.as_bytes())
    }
}

/// An agent update order (`APP_ID.update.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpdateOrder {
    pub version: String,
    pub url: String,
}

pub(crate) fn parse_update(bytes: &[u8]) -> Result<UpdateOrder, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let field = |k: &str| match v.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => Err(format!(
            "expected {{\"version\": \"…\", \"url\": \"…\"}}: \"{k}\" is missing or not a non-empty string"
        )),
    };
    Ok(UpdateOrder { version: field("version")?, url: field("url")? })
}

/// A reconnect order (`APP_ID.reconnect.json`): `after_s`.
pub(crate) fn parse_reconnect(bytes: &[u8]) -> Result<u64, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    v.get("after_s")
        .and_then(Value::as_u64)
        .ok_or_else(|| "expected {\"after_s\": N} with N a non-negative integer".to_string())
}

/// A request for logs (`APP_ID.fetch-logs.json`): the `FetchLogs` frame to send, checked
/// as the agent will read it. `request` defaults to `default_request`, `since` to 0 (all
/// the agent keeps); `what`, `max_bytes` and `upload_url` are passed on as given.
pub(crate) fn parse_fetch_logs(bytes: &[u8], default_request: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut o) = v else { return Err("expected a JSON object".to_string()) };
    o.insert("code".into(), Value::String("FetchLogs".into()));
    o.entry("request").or_insert_with(|| Value::String(default_request.to_string()));
    o.entry("since").or_insert(Value::from(0u64));
    let frame = Value::Object(o);
    crate::protocol::parse_inbound(&frame.to_string()).map_err(|e| e.to_string())?;
    if !frame["request"].as_str().is_some_and(|r| !r.is_empty() && r.len() <= 100 && safe_name(r)) {
        return Err(
            "\"request\" must be 1 to 100 ASCII letters, digits, '.', '_' or '-' (it names the stored bundle)".into()
        );
    }
    Ok(frame)
}

/// A request for a plan (`APP_ID.plan-request.json`): the `PlanRequest` frame to send. The
/// frame has no fields, so the file holds none: empty, or an empty JSON object. Anything
/// else is refused rather than silently dropped (an operator who wrote fields expected
/// them to mean something).
pub(crate) fn parse_plan_request(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    if !text.trim().is_empty() {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !v.as_object().is_some_and(|o| o.is_empty()) {
            return Err("expected an empty file or {} (a PlanRequest has no fields)".to_string());
        }
    }
    Ok(json!({"code": "PlanRequest"}))
}

/// Text that can be part of a file name as is.
pub(crate) fn safe_name(s: &str) -> bool {
    !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(classify("app-1.json"), Some(("app-1".into(), FileKind::Recipe)));
        assert_eq!(classify("app.v2.json"), Some(("app.v2".into(), FileKind::Recipe)));
        assert_eq!(classify("app-1.update.json"), Some(("app-1".into(), FileKind::Update)));
        assert_eq!(classify("app-1.reconnect.json"), Some(("app-1".into(), FileKind::Reconnect)));
        assert_eq!(classify("app-1.fetch-logs.json"), Some(("app-1".into(), FileKind::FetchLogs)));
        assert_eq!(classify("app-1.plan-request.json"), Some(("app-1".into(), FileKind::PlanRequest)));
        assert_eq!(file_name("app-1", FileKind::PlanRequest), "app-1.plan-request.json");
        assert_eq!(classify("statelog.versions.json"), None);
        assert_eq!(classify(".hidden.json"), None);
        assert_eq!(classify("app 1.json"), None);
        assert_eq!(classify("notes.txt"), None);
        assert!(!valid_app_id("../etc"));
        assert!(!valid_app_id("a/b"));
        assert_eq!(versions_path(Path::new("/x/state.log")), PathBuf::from("/x/state.log.versions.json"));
    }

    #[test]
    fn recipes_waits_and_hashes() {
        let a = br#"{"component":{"init":{"state":[
            {"id":"s1","module":"meta.comment","parameter":{"comment":"x"}},
            {"id":"w","module":"meta.wait","parameter":{"state":["@{web.s9}","@{*.s8}"]}}]}}}"#;
        let c = parse_recipe(a).unwrap();
        assert_eq!(c.states.len(), 2);
        assert_eq!(c.explicit_version, None);
        assert_eq!(c.waits.len(), 1);
        assert_eq!(c.waits[0].refs[0].host.as_deref(), Some("web"));
        assert_eq!(c.waits[0].refs[1].state, "s8");
        // Same content, other layout: same hash.
        let reformatted = serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(a).unwrap()).unwrap();
        assert_eq!(parse_recipe(&reformatted).unwrap().hash, c.hash);
        assert!(parse_recipe(b"{").unwrap_err().contains("not JSON"));
        assert!(parse_recipe(br#"{"state":[{"module":"m","parameter":{}}]}"#).is_err());
        let v = parse_recipe(br#"{"recipe_version":5,"state":[]}"#).unwrap();
        assert_eq!(v.explicit_version, Some(5));
    }

    #[test]
    fn records_round_trip() {
        let c = parse_recipe(
            br#"{"recipe_version":5,"module":{"tag":"t"},"state":[{"id":"s","module":"meta.comment","parameter":{}}]}"#,
        )
        .unwrap();
        let rec = AppRecord {
            version: 7,
            hash: c.hash.clone(),
            module: c.module.clone(),
            state: c.states.clone(),
            explicit_version: c.explicit_version,
        };
        assert_eq!(rec.served(), Some(c.serve(7)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.json");
        let mut store = VersionStore::load(path.clone()).unwrap();
        store.set("app", rec.clone());
        assert_eq!(VersionStore::load(path.clone()).unwrap().apps["app"], rec);
        std::fs::write(&path, "garbage").unwrap();
        assert!(VersionStore::load(path).is_err());
    }

    #[test]
    fn orders() {
        assert_eq!(
            parse_update(br#"{"version":"1.3.0","url":"https://x/a.tgz"}"#).unwrap(),
            UpdateOrder { version: "1.3.0".into(), url: "https://x/a.tgz".into() }
        );
        assert!(parse_update(br#"{"version":"1.3.0"}"#).is_err());
        assert_eq!(parse_reconnect(br#"{"after_s": 30}"#), Ok(30));
        assert!(parse_reconnect(br#"{"after_s": -1}"#).is_err());
        let plan = json!({"code": "PlanRequest"});
        assert_eq!(parse_plan_request(b""), Ok(plan.clone()));
        assert_eq!(parse_plan_request(b" {}\n"), Ok(plan));
        assert!(parse_plan_request(br#"{"instance_id": "i-1"}"#).is_err());
        assert!(parse_plan_request(b"[]").is_err());
    }
}
