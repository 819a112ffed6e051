//! Language package managers: `common.pip.package` ([`pip`]), `common.npm.package`
//! ([`npm`]), `common.gem.package` ([`gem`]), and `common.virtualenv` ([`virtualenv`]).
//!
//! The three package states share one shape, kept here. Per package, the recipe's value
//! says what is wanted:
//! - empty (or `installed`): installed, any version;
//! - a version: exactly that version (`six==1.16.0`, `is-number@7.0.0`, `gem -v 1.2.0`);
//! - `latest`: installed, and upgraded whenever the package index has a newer version.
//!   The original agent only installed (it rewrote `latest` to `installed`); its
//!   documentation promised the upgrade, and the documentation wins (states.md 5);
//! - `removed`.
//!
//! Each state reads what is installed first, asks the index for the newest version only
//! for `latest` packages that are already installed, and runs the tool only for what
//! differs, pinning the version it found (so a `latest` upgrade installs exactly the
//! version it compared with). Afterwards it reads the installed packages again: the
//! changes are the difference between the two readings, with versions (`installed
//! 1.16.0`, `1.15.0 -> 1.16.0`, `removed 1.16.0`; dependencies pulled in or removed on
//! the way are listed too), and every package is checked against what was wanted.
//!
//! The tools run with the helper's tool environment (no proxy or credentials of the
//! helper's own environment); a registry, mirror or credentials are configured the
//! tools' usual way (`/etc/pip.conf`, `/root/.npmrc` or the global npmrc, `/root/.gemrc`
//! or `/etc/gemrc`).

pub mod gem;
pub mod npm;
pub mod pip;
pub mod virtualenv;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::newtypes::InvalidValue;
use opsagent_proto::param_types::Dict;
use opsagent_proto::request::{Change, Outcome};
use serde_json::Value;

use crate::cancel::Cancel;
use crate::checksums::ChecksumError;
use crate::exec::{self, CommandSpec, ToolError};
use crate::fsutil::FsError;
use crate::states::storage::MissingTool;

/// Deadline of one install or removal (a package with native extensions compiles).
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(1800);
/// Deadline of a query (a listing, an index lookup).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(300);

/// How one package manager is run: its program, what it adds to the helper's tool
/// environment, and its working directory. Tests point these at a virtualenv's pip, a
/// private `GEM_HOME`…; states use the system's tool.
#[derive(Debug, Clone)]
pub struct Tool {
    pub program: PathBuf,
    /// Arguments ahead of every command's own (`-m pip`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

impl Tool {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into(), args: Vec::new(), env: Vec::new(), cwd: PathBuf::from("/") }
    }

    pub fn with_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn with_cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = cwd.into();
        self
    }

    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn command<S: Into<OsString>>(&self, args: impl IntoIterator<Item = S>, timeout: Duration) -> CommandSpec {
        let all = self.args.iter().map(OsString::from).chain(args.into_iter().map(Into::into));
        let mut spec = CommandSpec::tool(&self.program.to_string_lossy(), all).with_timeout(timeout);
        for (k, v) in &self.env {
            spec = spec.with_env(k, v);
        }
        spec.cwd.clone_from(&self.cwd);
        spec
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LangError {
    #[error(transparent)]
    Missing(#[from] MissingTool),
    #[error("parameter name: no package named")]
    NoPackages,
    #[error("parameter name: {name:?} is not a {manager} package name")]
    Name { name: String, manager: &'static str },
    #[error("parameter name: {name}: {value:?} is not {expected}")]
    Version { name: String, value: String, expected: &'static str },
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error("parameter {param}: {problem}")]
    Param { param: &'static str, problem: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("`{command}` printed something that cannot be read: {problem}")]
    Unreadable { command: String, problem: String },
    #[error("{name}: the package index has no version of it")]
    NotInIndex { name: String },
    #[error("package {name} is {found} after {tool} ran, not {wanted}")]
    NotAsWanted { name: String, found: String, wanted: String, tool: &'static str },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Watch(#[from] ChecksumError),
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
}

impl LangError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, LangError::Tool(e) if e.is_cancelled())
    }

    pub fn unreadable(spec: &CommandSpec, problem: impl Into<String>) -> Self {
        LangError::Unreadable { command: spec.display(), problem: problem.into() }
    }
}

/// What a recipe wants of one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Present,
    Version(String),
    Latest,
    Removed,
}

/// The rules of one package manager that the shared logic needs.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// For messages: "pip", "npm", "gem".
    pub manager: &'static str,
    pub valid_name: fn(&str) -> bool,
    pub valid_version: fn(&str) -> bool,
    /// What a version must look like, for the error message.
    pub version_expected: &'static str,
    /// The key two spellings of one package name share.
    pub key: fn(&str) -> String,
    /// Whether two version strings name the same version.
    pub same_version: fn(&str, &str) -> bool,
}

/// One package of the recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// As the recipe spells it (what the tool is given).
    pub name: String,
    /// [`Rules::key`] of the name (what listings are looked up by).
    pub key: String,
    pub want: Want,
}

/// The recipe's `name` dict as packages, every name and version checked.
pub fn parse_items(dict: &Dict, rules: &Rules) -> Result<Vec<Item>, LangError> {
    let mut items: Vec<Item> = Vec::new();
    for e in dict.iter() {
        let name = e.key.trim();
        if !(rules.valid_name)(name) {
            return Err(LangError::Name { name: name.to_string(), manager: rules.manager });
        }
        let value = e.value_or_empty().trim();
        let want = match value {
            "" | "installed" => Want::Present,
            "latest" => Want::Latest,
            "removed" => Want::Removed,
            v if (rules.valid_version)(v) => Want::Version(v.to_string()),
            v => {
                return Err(LangError::Version {
                    name: name.to_string(),
                    value: v.to_string(),
                    expected: rules.version_expected,
                })
            }
        };
        let key = (rules.key)(name);
        // A package named twice: the later entry is what the recipe means.
        items.retain(|i| i.key != key);
        items.push(Item { name: name.to_string(), key, want });
    }
    if items.is_empty() {
        return Err(LangError::NoPackages);
    }
    Ok(items)
}

/// One installed package: its name as the tool lists it and its version(s) (gems can
/// have several side by side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub versions: Vec<String>,
}

/// What a listing found, by [`Rules::key`].
pub type Listing = BTreeMap<String, Installed>;

/// What has to be done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Name and, when pinned, version.
    pub install: Vec<(String, Option<String>)>,
    pub remove: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.install.is_empty() && self.remove.is_empty()
    }
}

fn has_version(listing: &Listing, key: &str, version: &str, rules: &Rules) -> bool {
    listing.get(key).is_some_and(|i| i.versions.iter().any(|v| (rules.same_version)(v, version)))
}

fn installed(listing: &Listing, key: &str) -> bool {
    listing.get(key).is_some_and(|i| !i.versions.is_empty())
}

/// The `latest` packages that are installed: only for these the index is asked.
pub fn needs_latest<'a>(items: &'a [Item], listing: &Listing) -> Vec<&'a Item> {
    items.iter().filter(|i| i.want == Want::Latest && installed(listing, &i.key)).collect()
}

/// What differs between the recipe and the listing; `latest` holds the index's newest
/// version of each installed `latest` package, by key.
pub fn plan(items: &[Item], listing: &Listing, latest: &BTreeMap<String, String>, rules: &Rules) -> Plan {
    let mut plan = Plan::default();
    for i in items {
        match &i.want {
            Want::Present | Want::Latest if !installed(listing, &i.key) => plan.install.push((i.name.clone(), None)),
            Want::Version(v) if !has_version(listing, &i.key, v, rules) => {
                plan.install.push((i.name.clone(), Some(v.clone())));
            }
            Want::Latest => {
                if let Some(l) = latest.get(&i.key).filter(|l| !has_version(listing, &i.key, l, rules)) {
                    plan.install.push((i.name.clone(), Some(l.clone())));
                }
            }
            Want::Removed if installed(listing, &i.key) => plan.remove.push(i.name.clone()),
            _ => {}
        }
    }
    plan
}

/// Every package whose versions differ between two listings.
pub fn describe_changes(before: &Listing, after: &Listing) -> Vec<Change> {
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut changes = Vec::new();
    for key in keys {
        let (b, a) = (before.get(key), after.get(key));
        let versions = |i: Option<&Installed>| i.map(|i| i.versions.clone()).unwrap_or_default();
        let (bv, av) = (versions(b), versions(a));
        let added: Vec<&String> = av.iter().filter(|v| !bv.contains(v)).collect();
        let gone: Vec<&String> = bv.iter().filter(|v| !av.contains(v)).collect();
        let join = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        let what = match (gone.as_slice(), added.as_slice()) {
            ([], []) => continue,
            ([old], [new]) => format!("{old} -> {new}"),
            ([], new) => format!("installed {}", join(new)),
            (old, []) => format!("removed {}", join(old)),
            (old, new) => format!("installed {}; removed {}", join(new), join(old)),
        };
        let name = a.or(b).map_or(key.as_str(), |i| i.name.as_str());
        changes.push(Change::new(name, what));
    }
    changes
}

/// What a plan reports for `todo` (issue 19): the apply's own words ([`describe_changes`]
/// between the listing now and the one the apply would leave). A pinned install, or an
/// unpinned one whose version the index named in `chosen` (by key), replaces the
/// installed version, or, with `side_by_side` (gems), joins it; a removal removes every
/// version. An unpinned install whose version is not known says it would be installed
/// and `why` the version is not named. Dependencies the tool would pull in or drop on
/// the way are not listed: only the install itself knows them.
pub fn planned_changes(
    before: &Listing,
    todo: &Plan,
    rules: &Rules,
    side_by_side: bool,
    chosen: &BTreeMap<String, String>,
    why: &str,
) -> Vec<Change> {
    let mut after = before.clone();
    let mut unknown = Vec::new();
    for (name, version) in &todo.install {
        let key = (rules.key)(name);
        let Some(v) = version.clone().or_else(|| chosen.get(&key).cloned()) else {
            unknown.push(Change::new(name.clone(), format!("would be installed ({why})")));
            continue;
        };
        let entry = after.entry(key).or_insert_with(|| Installed { name: name.clone(), versions: Vec::new() });
        if !side_by_side {
            entry.versions = vec![v];
        } else if !entry.versions.iter().any(|x| (rules.same_version)(x, &v)) {
            entry.versions.insert(0, v);
        }
    }
    for name in &todo.remove {
        after.remove(&(rules.key)(name));
    }
    let mut changes = describe_changes(before, &after);
    changes.extend(unknown);
    changes
}

/// The note of a plan that installs something.
pub const PLAN_DEPENDENCIES_NOTE: &str =
    "planned: packages the install would pull in as dependencies are known only when it runs";

/// Checks the listing after the tool ran against what each package wants.
pub fn verify(
    items: &[Item],
    after: &Listing,
    latest: &BTreeMap<String, String>,
    rules: &Rules,
) -> Result<(), LangError> {
    for i in items {
        let found = || match after.get(&i.key) {
            Some(p) if !p.versions.is_empty() => format!("installed at {}", p.versions.join(", ")),
            _ => "not installed".to_string(),
        };
        let wanted = match &i.want {
            Want::Present if !installed(after, &i.key) => "installed".to_string(),
            Want::Latest if !installed(after, &i.key) => "installed".to_string(),
            Want::Latest => match latest.get(&i.key) {
                Some(l) if !has_version(after, &i.key, l, rules) => format!("at {l}"),
                _ => continue,
            },
            Want::Version(v) if !has_version(after, &i.key, v, rules) => format!("at {v}"),
            Want::Removed if installed(after, &i.key) => "removed".to_string(),
            _ => continue,
        };
        return Err(LangError::NotAsWanted { name: i.name.clone(), found: found(), wanted, tool: rules.manager });
    }
    Ok(())
}

/// The first JSON value in a tool's output that `accept` takes. Tools print warnings
/// on stderr, which reaches us in the same stream as the JSON on stdout: every line
/// that starts like a JSON value is tried, up to the end of that value.
pub fn find_json(output: &str, accept: fn(&Value) -> bool) -> Option<Value> {
    let mut offset = 0;
    for line in output.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let start = offset + (line.len() - trimmed.len());
        offset += line.len();
        if trimmed.starts_with(['{', '[', '"']) {
            let mut values = serde_json::Deserializer::from_str(&output[start..]).into_iter::<Value>();
            if let Some(Ok(v)) = values.next() {
                if accept(&v) {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// A CA bundle of the system, if there is one where Debian or RHEL keep it.
pub fn system_ca_bundle() -> Option<&'static str> {
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

/// A state run's accumulated changes, notes and tool output (`linux.supervisord` uses it too).
pub struct Run {
    pub cancel: Cancel,
    pub output: String,
    pub changes: Vec<Change>,
    pub notes: Vec<String>,
}

impl Run {
    pub fn new(cancel: Cancel) -> Self {
        Self { cancel, output: String::new(), changes: Vec::new(), notes: Vec::new() }
    }

    /// Runs a query; its output is returned, not kept for the outcome.
    pub async fn query(&mut self, spec: &CommandSpec, ok: &[i32]) -> Result<String, ToolError> {
        Ok(exec::checked(spec, ok, &mut self.cancel).await?.output)
    }

    /// Runs an action; its command line and output go to the outcome's output.
    pub async fn act(&mut self, spec: &CommandSpec) -> Result<(), ToolError> {
        let finished = exec::checked(spec, &[0], &mut self.cancel).await;
        let output = match &finished {
            Ok(f) => f.output.as_str(),
            Err(ToolError::Failed { output, .. }) => output.as_str(),
            Err(_) => "",
        };
        self.output.push_str(&format!("$ {}\n{output}", spec.display()));
        if !self.output.ends_with('\n') {
            self.output.push('\n');
        }
        finished.map(drop)
    }

    pub fn finish(self, subject: &str, result: Result<(), LangError>) -> Outcome {
        let cancelled = result.as_ref().is_err_and(LangError::is_cancelled);
        self.finish_with(subject, result, cancelled)
    }

    /// [`Run::finish`] for another module's error type.
    pub fn finish_with<E: std::fmt::Display>(self, subject: &str, result: Result<(), E>, cancelled: bool) -> Outcome {
        let mut outcome = crate::states::finish(subject, result, self.changes, &self.notes);
        outcome.cancelled = cancelled;
        outcome.stdout = self.output;
        outcome
    }
}

/// The recipe's package names, for the outcome's subject.
pub fn subject(dict: &Dict) -> String {
    dict.iter().map(|e| e.key.trim()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            manager: "test",
            valid_name: |n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            valid_version: |v| v.starts_with(|c: char| c.is_ascii_digit()),
            version_expected: "a version",
            key: str::to_ascii_lowercase,
            same_version: |a, b| a == b,
        }
    }

    fn listing(entries: &[(&str, &[&str])]) -> Listing {
        entries
            .iter()
            .map(|(n, v)| {
                (
                    n.to_ascii_lowercase(),
                    Installed { name: n.to_string(), versions: v.iter().map(|s| s.to_string()).collect() },
                )
            })
            .collect()
    }

    fn dict(raw: serde_json::Value) -> Dict {
        opsagent_proto::param_types::Param::from_wire(&raw).unwrap()
    }

    #[test]
    fn wants_from_the_recipe() {
        let items = parse_items(
            &dict(json!([{"key": "a"}, {"key": "B", "value": "1.0"}, {"key": "c", "value": " latest "},
                {"key": "d", "value": "removed"}, {"key": "e", "value": "installed"}])),
            &rules(),
        )
        .unwrap();
        let wants: Vec<(&str, &str, Want)> =
            items.iter().map(|i| (i.name.as_str(), i.key.as_str(), i.want.clone())).collect();
        assert_eq!(
            wants,
            [
                ("a", "a", Want::Present),
                ("B", "b", Want::Version("1.0".into())),
                ("c", "c", Want::Latest),
                ("d", "d", Want::Removed),
                ("e", "e", Want::Present),
            ]
        );
        // The later of two entries for one package wins.
        let twice = parse_items(&dict(json!([{"key": "a"}, {"key": "A", "value": "removed"}])), &rules()).unwrap();
        assert_eq!(twice.len(), 1);
        assert_eq!(twice[0].want, Want::Removed);

        let err = parse_items(&dict(json!([{"key": "a b"}])), &rules()).unwrap_err().to_string();
        assert_eq!(err, "parameter name: \"a b\" is not a test package name");
        let err = parse_items(&dict(json!([{"key": "a", "value": ">=1"}])), &rules()).unwrap_err().to_string();
        assert_eq!(err, "parameter name: a: \">=1\" is not a version");
        assert!(matches!(parse_items(&dict(json!([])), &rules()), Err(LangError::NoPackages)));
    }

    #[test]
    fn plans_only_what_differs() {
        let items = parse_items(
            &dict(json!({"present": "", "missing": "", "pinned": "2.0", "pinned-ok": "1.0", "up": "latest",
                "fresh": "latest", "new-latest": "latest", "gone": "removed", "absent": "removed"})),
            &rules(),
        )
        .unwrap();
        let before = listing(&[
            ("present", &["1.0"]),
            ("pinned", &["1.0"]),
            ("pinned-ok", &["1.0", "0.9"]),
            ("up", &["1.0"]),
            ("fresh", &["3.0"]),
            ("gone", &["1.0"]),
        ]);
        let asked: Vec<&str> = needs_latest(&items, &before).iter().map(|i| i.name.as_str()).collect();
        assert_eq!(asked, ["up", "fresh"]);
        let latest = BTreeMap::from([("up".to_string(), "2.0".to_string()), ("fresh".to_string(), "3.0".to_string())]);
        let p = plan(&items, &before, &latest, &rules());
        assert_eq!(
            p.install,
            [
                ("missing".to_string(), None),
                ("pinned".to_string(), Some("2.0".to_string())),
                ("up".to_string(), Some("2.0".to_string())),
                ("new-latest".to_string(), None),
            ]
        );
        assert_eq!(p.remove, ["gone"]);

        // Second run: everything as wanted, nothing to do, and the check passes.
        let after = listing(&[
            ("present", &["1.0"]),
            ("missing", &["5"]),
            ("pinned", &["2.0"]),
            ("pinned-ok", &["1.0", "0.9"]),
            ("up", &["2.0"]),
            ("fresh", &["3.0"]),
            ("new-latest", &["7"]),
        ]);
        assert!(plan(&items, &after, &latest, &rules()).is_empty());
        verify(&items, &after, &latest, &rules()).unwrap();
        let err = verify(&items, &before, &latest, &rules()).unwrap_err().to_string();
        assert_eq!(err, "package missing is not installed after test ran, not installed");
        let stale = listing(&[("up", &["1.0"])]);
        let up = [items[4].clone()];
        let err = verify(&up, &stale, &latest, &rules()).unwrap_err().to_string();
        assert_eq!(err, "package up is installed at 1.0 after test ran, not at 2.0");
    }

    #[test]
    fn changes_name_every_package_with_versions() {
        let before = listing(&[("a", &["1.0"]), ("b", &["1.0"]), ("same", &["1"]), ("g", &["1.0"])]);
        let after = listing(&[("a", &["2.0"]), ("c", &["3.0"]), ("same", &["1"]), ("g", &["1.0", "1.1"])]);
        let c: Vec<String> = describe_changes(&before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(c, ["a: 1.0 -> 2.0", "b: removed 1.0", "c: installed 3.0", "g: installed 1.1"]);
        assert!(describe_changes(&after, &after).is_empty());
    }

    /// A plan's words are the apply's: the listing the tool would leave, compared as the
    /// apply compares its two listings.
    #[test]
    fn a_plan_says_what_the_apply_would_report() {
        let before = listing(&[("up", &["1.0"]), ("gone", &["1.0", "0.9"]), ("gem", &["1.0"])]);
        let todo = Plan {
            install: vec![
                ("up".into(), Some("2.0".into())),
                ("new".into(), Some("3.0".into())),
                ("chosen".into(), None),
                ("unknown".into(), None),
            ],
            remove: vec!["gone".into()],
        };
        let chosen = BTreeMap::from([("chosen".to_string(), "4.0".to_string())]);
        let c: Vec<String> =
            planned_changes(&before, &todo, &rules(), false, &chosen, "why").iter().map(ToString::to_string).collect();
        assert_eq!(
            c,
            [
                "chosen: installed 4.0",
                "gone: removed 1.0, 0.9",
                "new: installed 3.0",
                "up: 1.0 -> 2.0",
                "unknown: would be installed (why)"
            ]
        );
        // Side by side (gems): a new version joins the installed ones.
        let todo = Plan { install: vec![("gem".into(), Some("1.1".into()))], remove: vec![] };
        let c = planned_changes(&before, &todo, &rules(), true, &BTreeMap::new(), "");
        assert_eq!(c.iter().map(ToString::to_string).collect::<Vec<_>>(), ["gem: installed 1.1"]);
        assert!(planned_changes(&before, &Plan::default(), &rules(), true, &BTreeMap::new(), "").is_empty());
    }

    #[test]
    fn json_is_found_among_warnings() {
        let out = "WARNING: something\n[{\"name\": \"six\", \"version\": \"1.16.0\"}]\nnpm error code X\n";
        assert_eq!(find_json(out, Value::is_array).unwrap()[0]["name"], "six");
        let npm = "npm warn config x\n{\n  \"dependencies\": {\n    \"a\": {\"version\": \"1\"}\n  }\n}\nnpm error code ELSPROBLEMS\n";
        assert_eq!(find_json(npm, Value::is_object).unwrap()["dependencies"]["a"]["version"], "1");
        // A broken outer value: an inner line is not mistaken for the answer.
        let broken = "{\n  \"dependencies\": {\nnpm warn interleaved\n";
        assert_eq!(find_json(broken, Value::is_object), None);
        assert_eq!(find_json("npm warn x\n\"7.0.0\"\n", Value::is_string).unwrap(), "7.0.0");
        assert_eq!(find_json("", Value::is_object), None);
    }

    #[test]
    fn tool_commands_carry_their_environment() {
        let tool = Tool::new("/opt/venv/bin/python")
            .with_args(["-m", "pip"])
            .with_env("PIP_NO_INPUT", "1")
            .with_env("PATH", "/x")
            .with_cwd("/srv");
        let spec = tool.command(["list"], QUERY_TIMEOUT);
        assert_eq!(spec.display(), "/opt/venv/bin/python -m pip list");
        assert!(spec.env.contains(&("PIP_NO_INPUT".into(), "1".into())));
        assert!(spec.env.contains(&("PATH".into(), "/x".into())));
        assert!(spec.env.contains(&("LC_ALL".into(), "C".into())));
        assert_eq!(spec.cwd, Path::new("/srv"));
        assert_eq!(spec.timeout, Some(QUERY_TIMEOUT));
        assert_eq!(tool.env_value("PATH"), Some("/x"));
    }
}
