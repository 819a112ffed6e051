//! `common.npm.package`: Node.js packages through npm, globally (`npm -g`) or, with
//! `path`, into `<path>/node_modules` (`npm --prefix PATH`: npm never walks up to
//! another project's `package.json`).
//!
//! What is installed: `npm ls --json --depth=0` (global or under the prefix; npm exits
//! 1 when the tree has problems such as a missing or extraneous package, and still
//! prints the tree). The newest version, for `latest`: `npm view NAME version`, the
//! registry's `latest` tag. Installs are one `npm install` of `NAME` or
//! `NAME@VERSION`, removals one `npm uninstall`. Under `path` a missing directory is
//! created (root, 0755), and what is installed is saved to `<path>/package.json` with
//! its exact version (`--save-exact`), so that a later `npm install` there, by a
//! recipe or a person, keeps it rather than pruning it as extraneous.
//!
//! A version is an exact one (`7.0.0`): a range or a tag would not say which version
//! must be installed, so the state could not tell whether it is already as wanted.
//!
//! Certificates: Node.js trusts its own CA list, not the system's. The helper points
//! `NODE_EXTRA_CA_CERTS` at the system bundle (when there is one), so npm trusts what
//! apt, pip and gem trust on the same host (a company proxy's CA, an internal registry).
//!
//! A plan (issue 19) runs the same `npm ls` (writing or pruning no debug log) and reports what the
//! apply would, in its words, for pinned versions and removals (`is-number: installed
//! 7.0.0`, `7.0.0 -> 6.0.0`, `removed 7.0.0`), with the directories of `path` it would
//! create. The registry's `latest` is not asked (`npm view` writes npm's cache): an
//! unpinned install "would be installed" and a `latest` package "would fetch" it, each
//! saying why.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::CommonNpmPackage;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};
use serde_json::Value;

use super::{find_json, plan, verify, Installed, Item, LangError, Listing, Rules, Run, Tool};
use crate::cancel::Cancel;
use crate::fsutil;
use crate::states::storage::{find_tool, MissingTool};

pub const RULES: Rules = Rules {
    manager: "npm",
    valid_name,
    valid_version,
    version_expected: "an exact version (such as 7.0.0; ranges and tags are not accepted, use latest or a version)",
    key: str::to_string,
    same_version,
};

/// An npm package name, optionally scoped (`@scope/name`); at most 214 characters, no
/// leading `.`, `_` or `-` (nothing npm would read as an option, a path or a URL).
pub fn valid_name(name: &str) -> bool {
    let part_ok = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '~')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
    };
    let ok = match name.strip_prefix('@') {
        Some(scoped) => scoped.split_once('/').is_some_and(|(scope, n)| part_ok(scope) && part_ok(n)),
        None => part_ok(name),
    };
    ok && name.len() <= 214
}

/// An exact semantic version (`7.0.0`, `1.0.0-beta.2`, `v1.2.3`).
pub fn valid_version(v: &str) -> bool {
    let v = v.strip_prefix(['v', '=']).unwrap_or(v);
    v.starts_with(|c: char| c.is_ascii_digit()) && v.chars().all(|c| c.is_ascii_alphanumeric() || ".+-".contains(c))
}

pub fn same_version(a: &str, b: &str) -> bool {
    let norm = |v: &str| v.trim().trim_start_matches(['v', '=']).to_string();
    norm(a) == norm(b)
}

/// How npm is run: no update notice, funding or audit chatter, and the system's CAs.
pub fn npm_tool(program: PathBuf) -> Tool {
    let mut tool = Tool::new(program)
        .with_env("npm_config_update_notifier", "false")
        .with_env("npm_config_fund", "false")
        .with_env("npm_config_audit", "false");
    if let Some(bundle) = super::system_ca_bundle() {
        tool = tool.with_env("NODE_EXTRA_CA_CERTS", bundle);
    }
    tool
}

/// Where packages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Global,
    Prefix(AbsPath),
}

impl Target {
    pub fn args(&self) -> Vec<String> {
        match self {
            Target::Global => vec!["-g".into()],
            Target::Prefix(p) => vec!["--prefix".into(), p.to_string()],
        }
    }
}

/// `npm ls --json --depth=0` output: the top-level packages that are there (a
/// dependency listed as missing is not).
pub fn parse_ls(out: &str) -> Option<Listing> {
    let tree = find_json(out, Value::is_object)?;
    let mut listing = Listing::new();
    let Some(deps) = tree.get("dependencies") else {
        // An empty project, or no global package at all.
        return tree.get("error").is_none().then_some(listing);
    };
    for (name, info) in deps.as_object()? {
        let missing = info.get("missing").and_then(Value::as_bool).unwrap_or(false);
        if let (false, Some(version)) = (missing, info.get("version").and_then(Value::as_str)) {
            listing.insert(name.clone(), Installed { name: name.clone(), versions: vec![version.to_string()] });
        }
    }
    Some(listing)
}

pub fn install_args(target: &Target, install: &[(String, Option<String>)]) -> Vec<String> {
    let mut args = vec!["install".to_string()];
    args.extend(target.args());
    if matches!(target, Target::Prefix(_)) {
        args.push("--save-exact".into());
    }
    args.extend(install.iter().map(|(n, v)| match v {
        Some(v) => format!("{n}@{v}"),
        None => n.clone(),
    }));
    args
}

pub fn uninstall_args(target: &Target, remove: &[String]) -> Vec<String> {
    let mut args = vec!["uninstall".to_string()];
    args.extend(target.args());
    args.extend(remove.iter().cloned());
    args
}

pub async fn apply(p: &CommonNpmPackage, cancel: Cancel) -> Outcome {
    apply_using(find_tool("npm", &[]).map(npm_tool), p, cancel).await
}

/// The state with a given npm (`None`: none is installed).
pub async fn apply_using(npm: Option<Tool>, p: &CommonNpmPackage, cancel: Cancel) -> Outcome {
    let mut run = Run::new(cancel);
    // In a plan npm writes no debug log: it writes one under its cache for every
    // command, `npm ls` included, unless told to keep none, and then it removes the
    // ones there are, in the logs directory, which is therefore one nobody can create.
    let npm = npm.map(|t| {
        if crate::plan::active() {
            t.with_env("npm_config_logs_max", "0").with_env("npm_config_logs_dir", "/proc/nonexistent")
        } else {
            t
        }
    });
    let result = match npm {
        Some(npm) => run_state(&npm, p, &mut run).await,
        None => Err(MissingTool {
            tool: "npm".into(),
            hint: "Debian/Ubuntu package npm, RHEL npm, or Node.js's own packages".into(),
        }
        .into()),
    };
    let mut subject = super::subject(&p.name);
    if let Some(path) = &p.path {
        subject.push_str(&format!(" (in {})", path.0));
    }
    run.finish(&subject, result)
}

async fn list(npm: &Tool, target: &Target, run: &mut Run) -> Result<Listing, LangError> {
    if let Target::Prefix(p) = target {
        if !p.as_path().exists() {
            return Ok(Listing::new());
        }
    }
    let mut args = vec!["ls".to_string()];
    args.extend(target.args());
    args.extend(["--json".to_string(), "--depth=0".into()]);
    let spec = npm.command(args, super::QUERY_TIMEOUT).inspection();
    let out = run.query(&spec, &[0, 1]).await?;
    parse_ls(&out).ok_or_else(|| LangError::unreadable(&spec, "no JSON package tree"))
}

async fn run_state(npm: &Tool, p: &CommonNpmPackage, run: &mut Run) -> Result<(), LangError> {
    let items = super::parse_items(&p.name, &RULES)?;
    let target = match &p.path {
        None => Target::Global,
        Some(path) => Target::Prefix(path.abs().clone()),
    };
    let before = list(npm, &target, run).await?;
    let mut latest = BTreeMap::new();
    let planning = crate::plan::active();
    let mut to_fetch = Vec::new();
    for item in super::needs_latest(&items, &before) {
        if planning {
            // `npm view` stores what it fetches in npm's cache: a plan does not ask.
            let now = before.get(&item.key).map(|i| i.versions.join(", ")).unwrap_or_default();
            to_fetch.push(Change::new(
                item.name.clone(),
                format!("would fetch the registry's latest version to compare with {now} ({NOT_ASKED})"),
            ));
        } else {
            latest.insert(item.key.clone(), newest(npm, item, run).await?);
        }
    }
    let todo = plan(&items, &before, &latest, &RULES);
    if planning {
        if !todo.install.is_empty() {
            if let Target::Prefix(dir) = &target {
                let root = (Uid::from_raw(0), Gid::from_raw(0));
                fsutil::create_dirs(dir, fsutil::PARENT_DIR_MODE, root, &mut run.changes)?;
            }
            run.notes.push(super::PLAN_DEPENDENCIES_NOTE.to_string());
        }
        let why = format!("at the registry's latest version, not asked: {NOT_ASKED}");
        run.changes.extend(super::planned_changes(&before, &todo, &RULES, false, &BTreeMap::new(), &why));
        run.changes.extend(to_fetch);
        return Ok(());
    }
    if todo.is_empty() {
        return Ok(());
    }
    let acted = async {
        if !todo.install.is_empty() {
            if let Target::Prefix(dir) = &target {
                fsutil::create_dirs(
                    dir,
                    fsutil::PARENT_DIR_MODE,
                    (Uid::from_raw(0), Gid::from_raw(0)),
                    &mut run.changes,
                )?;
            }
            run.act(&npm.command(install_args(&target, &todo.install), super::INSTALL_TIMEOUT)).await?;
        }
        if !todo.remove.is_empty() {
            run.act(&npm.command(uninstall_args(&target, &todo.remove), super::INSTALL_TIMEOUT)).await?;
        }
        Ok::<(), LangError>(())
    }
    .await;
    let after = list(npm, &target, run).await?;
    run.changes.extend(super::describe_changes(&before, &after));
    acted?;
    verify(&items, &after, &latest, &RULES)
}

/// Why a plan does not ask the registry.
const NOT_ASKED: &str = "npm view stores what it fetches in npm's cache, and a plan writes nothing";

async fn newest(npm: &Tool, item: &Item, run: &mut Run) -> Result<String, LangError> {
    let spec = npm.command(["view", item.name.as_str(), "version", "--json"], super::QUERY_TIMEOUT).inspection();
    let out = run.query(&spec, &[0]).await?;
    find_json(&out, Value::is_string)
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|v| valid_version(v))
        .ok_or_else(|| LangError::NotInIndex { name: item.name.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn names_and_versions() {
        for ok in ["is-number", "@types/node", "lodash.merge", "JSONStream", "~x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["-g", ".hidden", "_x", "@scope", "@/x", "git+https://x", "a b", "../x", "a/b", ""] {
            assert!(!valid_name(bad), "{bad}");
        }
        for ok in ["7.0.0", "v1.2.3", "1.0.0-beta.2", "1.0.0+build"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["^7.0.0", "~1", ">=1 <2", "next", "*", "1.x || 2", ""] {
            assert!(!valid_version(bad), "{bad}");
        }
        assert!(same_version("v7.0.0", "7.0.0"));
        assert!(!same_version("7.0.0", "7.0.1"));
    }

    #[test]
    fn trees_from_npm_ls() {
        let out = "npm warn config x\n{\n  \"name\": \"npt\",\n  \"dependencies\": {\n    \"is-number\": {\"version\": \"7.0.0\", \"overridden\": false},\n    \"is-odd\": {\"required\": \"3.0.1\", \"missing\": true},\n    \"left\": {\"version\": \"1.0.0\", \"extraneous\": true}\n  }\n}\nnpm error code ELSPROBLEMS\n";
        let l = parse_ls(out).unwrap();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["is-number", "left"]);
        assert_eq!(l["is-number"].versions, ["7.0.0"]);
        assert_eq!(parse_ls("{}\n").unwrap(), Listing::new());
        assert_eq!(parse_ls("{\"error\": {\"code\": \"ENOENT\"}}"), None);
        assert_eq!(parse_ls("npm error x\n"), None);
    }

    #[test]
    fn command_lines() {
        let pinned = [("is-number".to_string(), Some("7.0.0".to_string())), ("left-pad".to_string(), None)];
        assert_eq!(install_args(&Target::Global, &pinned), ["install", "-g", "is-number@7.0.0", "left-pad"]);
        let srv = Target::Prefix(AbsPath::parse("/srv/app").unwrap());
        assert_eq!(
            install_args(&srv, &pinned[..1]),
            ["install", "--prefix", "/srv/app", "--save-exact", "is-number@7.0.0"]
        );
        assert_eq!(uninstall_args(&srv, &["a".into()]), ["uninstall", "--prefix", "/srv/app", "a"]);
        let tool = npm_tool("/usr/bin/npm".into());
        assert_eq!(tool.env_value("npm_config_update_notifier"), Some("false"));
    }

    #[tokio::test]
    async fn bad_parameters_and_a_missing_npm() {
        let fake = || Some(npm_tool("/nonexistent/npm".into()));
        let p: CommonNpmPackage = typed("common.npm.package", json!({"name": [{"key": "is-number", "value": "^7"}]}));
        let out = apply_using(fake(), &p, Cancel::never()).await;
        assert!(
            out.comment.starts_with("parameter name: is-number: \"^7\" is not an exact version"),
            "{}",
            out.comment
        );
        crate::states::testutil::refused(
            "common.npm.package",
            json!({"name": "is-number", "path": "srv/app"}),
            "path \"srv/app\" is not absolute",
        );
        let out = apply_using(None, &p, Cancel::never()).await;
        assert!(
            out.comment.starts_with("npm is not installed; install it with a package state first"),
            "{}",
            out.comment
        );
        assert!(out.changes.is_empty());
    }
}
