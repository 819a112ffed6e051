//! `common.pip.package`: Python packages through pip.
//!
//! Which pip: `pip3`, else `pip`, on the helper's search path (as the original's Salt
//! module looked for `pip`): the system interpreter's pip, or one an operator put in
//! `/usr/local/bin`. A recipe that wants packages in a virtualenv makes it with
//! `common.virtualenv` and its requirements file.
//!
//! What is installed: `pip list --format=json`. The newest version, for `latest`:
//! `pip index versions NAME` (pip 21.2 or later), which honours the index configured in
//! `pip.conf` and only offers versions this interpreter can install. Installs are one
//! `pip install` of `NAME` or `NAME==VERSION` specifiers; removals one `pip uninstall -y`.
//!
//! PEP 668: Debian 12, Ubuntu 23.04 and later mark the system interpreter "externally
//! managed", and their pip refuses to install into it ("externally-managed-environment").
//! A recipe that names `common.pip.package` asks for exactly that, as it did on the
//! systems the original agent ran on, so when the pip is the system interpreter's (not a
//! virtualenv's) the helper sets `PIP_BREAK_SYSTEM_PACKAGES=1` (pip's own switch for
//! `--break-system-packages`; older pips ignore it). Debian's pip then installs as root
//! into `/usr/local/lib/python3.*/dist-packages`, beside, not over, the files of apt's
//! `python3-*` packages. A pip inside a virtualenv never gets the switch (it does not
//! need it).
//!
//! `install-options` (not in module.json; the original used it internally, for the
//! supervisor requirement): comma-separated, each passed as `--install-option=OPT` as
//! the original did. pip 23.1 and later no longer have that option and fail with it.
//!
//! A plan (issue 19) runs the same listing and, for every package an install would
//! choose the version of (unpinned or `latest`), `pip index versions`, without pip's
//! cache; it reports the listing the install would leave in the apply's words
//! (`six: installed 1.16.0`, `six: 1.15.0 -> 1.16.0`, `six: removed 1.16.0`). What an
//! install pulls in as dependencies is known only when it runs: the plan says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::CommonPipPackage;
use opsagent_proto::request::Outcome;
use serde_json::Value;

use super::{find_json, plan, verify, Installed, Item, LangError, Listing, Rules, Run, Tool};
use crate::cancel::Cancel;
use crate::states::storage::{find_tool, MissingTool};

pub const RULES: Rules = Rules {
    manager: "pip",
    valid_name,
    valid_version,
    version_expected: "a version (such as 1.16.0; ranges are not accepted, use latest or a version)",
    key: canonical_name,
    same_version,
};

/// A project name as PEP 508 allows it (no extras, no URL, nothing pip would read as
/// an option).
pub fn valid_name(name: &str) -> bool {
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    ends_ok(name.chars().next())
        && ends_ok(name.chars().last())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// One exact PEP 440 version (`1.16.0`, `2.0rc1`, `1!2.0`, `1.0+local`).
pub fn valid_version(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || ".+!_-".contains(c))
}

/// PEP 503 normalisation: case folded, runs of `-`, `_`, `.` as one `-`.
pub fn canonical_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "-_.".contains(c) {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Whether two version strings are the same PEP 440 version, for the spellings that
/// matter here: case, a leading `v`, trailing `.0` release components (`1.16` is
/// `1.16.0`) and the separators before a pre/post/dev tag (`1.0rc1` is `1.0-rc1`).
pub fn same_version(a: &str, b: &str) -> bool {
    fn norm(v: &str) -> (String, String) {
        let v = v.trim().to_ascii_lowercase();
        let v = v.strip_prefix('v').unwrap_or(&v).to_string();
        let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
        let (release, rest) = v.split_at(split);
        let mut parts: Vec<&str> = release.trim_end_matches('.').split('.').collect();
        while parts.len() > 1 && parts.last().is_some_and(|p| p.trim_start_matches('0').is_empty()) {
            parts.pop();
        }
        let release = parts.iter().map(|p| p.trim_start_matches('0')).map(|p| if p.is_empty() { "0" } else { p });
        let rest: String = rest.chars().filter(|c| !"._-".contains(*c)).collect();
        (release.collect::<Vec<_>>().join("."), rest)
    }
    norm(a) == norm(b)
}

/// The pip of a virtualenv (`<venv>/bin/pip`) rather than the system interpreter's.
pub fn in_virtualenv(program: &Path) -> bool {
    program.parent().and_then(Path::parent).is_some_and(|venv| venv.join("pyvenv.cfg").is_file())
}

/// How a pip is run: no prompts, no self-update check, no warning about running as
/// root; and, for the system interpreter's pip, PEP 668 overridden (see the module
/// documentation).
pub fn pip_tool(program: PathBuf) -> Tool {
    let system = !in_virtualenv(&program);
    let mut tool = Tool::new(program)
        .with_env("PIP_NO_INPUT", "1")
        .with_env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .with_env("PIP_ROOT_USER_ACTION", "ignore")
        .with_env("PYTHONIOENCODING", "utf-8");
    if system {
        tool = tool.with_env("PIP_BREAK_SYSTEM_PACKAGES", "1");
    }
    tool
}

/// `pip list --format=json` output.
pub fn parse_list(out: &str) -> Option<Listing> {
    let v = find_json(out, Value::is_array)?;
    let mut listing = Listing::new();
    for entry in v.as_array()? {
        let name = entry.get("name")?.as_str()?;
        let version = entry.get("version")?.as_str()?;
        listing.insert(canonical_name(name), Installed { name: name.to_string(), versions: vec![version.to_string()] });
    }
    Some(listing)
}

/// The newest version from `pip index versions NAME` output (`six (1.17.0)` first).
pub fn parse_index_versions(out: &str, name: &str) -> Option<String> {
    let key = canonical_name(name);
    out.lines().find_map(|l| {
        let (n, rest) = l.trim().split_once(" (")?;
        let v = rest.strip_suffix(')')?;
        (canonical_name(n) == key && valid_version(v)).then(|| v.to_string())
    })
}

/// `pip install` arguments.
pub fn install_args(install: &[(String, Option<String>)], install_options: Option<&str>) -> Vec<String> {
    let mut args = vec!["install".to_string()];
    for opt in install_options.into_iter().flat_map(|o| o.split(',')).map(str::trim).filter(|o| !o.is_empty()) {
        args.push(format!("--install-option={opt}"));
    }
    args.extend(install.iter().map(|(n, v)| match v {
        Some(v) => format!("{n}=={v}"),
        None => n.clone(),
    }));
    args
}

pub async fn apply(p: &CommonPipPackage, cancel: Cancel) -> Outcome {
    let pip = find_tool("pip3", &[]).or_else(|| find_tool("pip", &[])).map(pip_tool);
    apply_using(pip, p, cancel).await
}

/// The state with a given pip (`None`: none is installed).
pub async fn apply_using(pip: Option<Tool>, p: &CommonPipPackage, cancel: Cancel) -> Outcome {
    let mut run = Run::new(cancel);
    let result = match pip.map(plan_tool) {
        Some(pip) => run_state(&pip, p, &mut run).await,
        None => {
            Err(MissingTool { tool: "pip".into(), hint: "Debian/Ubuntu package python3-pip, RHEL python3-pip".into() }
                .into())
        }
    };
    run.finish(&super::subject(&p.name), result)
}

/// In a plan, pip's inspections keep nothing: no HTTP cache written by an index query,
/// no bytecode of a module Python had not compiled yet.
pub fn plan_tool(pip: Tool) -> Tool {
    if crate::plan::active() {
        pip.with_env("PIP_NO_CACHE_DIR", "1").with_env("PYTHONDONTWRITEBYTECODE", "1")
    } else {
        pip
    }
}

/// Lists what a pip sees as installed.
pub async fn list(pip: &Tool, run: &mut Run) -> Result<Listing, LangError> {
    let spec = pip.command(["list", "--format=json"], super::QUERY_TIMEOUT).inspection();
    let out = run.query(&spec, &[0]).await?;
    parse_list(&out).ok_or_else(|| LangError::unreadable(&spec, "no JSON list of name/version objects"))
}

async fn run_state(pip: &Tool, p: &CommonPipPackage, run: &mut Run) -> Result<(), LangError> {
    let items = super::parse_items(&p.name, &RULES)?;
    let before = list(pip, run).await?;
    let mut latest = BTreeMap::new();
    for item in super::needs_latest(&items, &before) {
        latest.insert(item.key.clone(), newest(pip, item, run).await?);
    }
    let todo = plan(&items, &before, &latest, &RULES);
    if todo.is_empty() {
        return Ok(());
    }
    if crate::plan::active() {
        // The version an unpinned install would get: the index's newest, as pip's own
        // choice (`pip index versions` reads the index, installs nothing).
        let mut chosen = BTreeMap::new();
        for item in items.iter().filter(|i| todo.install.iter().any(|(n, v)| v.is_none() && *n == i.name)) {
            chosen.insert(item.key.clone(), newest(pip, item, run).await?);
        }
        run.changes.extend(super::planned_changes(&before, &todo, &RULES, false, &chosen, "no version known"));
        if !todo.install.is_empty() {
            run.notes.push(super::PLAN_DEPENDENCIES_NOTE.to_string());
        }
        return Ok(());
    }
    let acted = async {
        if !todo.install.is_empty() {
            let args = install_args(&todo.install, p.install_options.as_deref());
            run.act(&pip.command(args, super::INSTALL_TIMEOUT)).await?;
        }
        if !todo.remove.is_empty() {
            let args = ["uninstall".to_string(), "-y".into()].into_iter().chain(todo.remove.iter().cloned());
            run.act(&pip.command(args, super::INSTALL_TIMEOUT)).await?;
        }
        Ok::<(), LangError>(())
    }
    .await;
    // What changed is reported even when a later step failed.
    let after = list(pip, run).await?;
    run.changes.extend(super::describe_changes(&before, &after));
    acted?;
    verify(&items, &after, &latest, &RULES)
}

async fn newest(pip: &Tool, item: &Item, run: &mut Run) -> Result<String, LangError> {
    let spec = pip.command(["index", "versions", item.name.as_str()], super::QUERY_TIMEOUT).inspection();
    let out = run.query(&spec, &[0]).await?;
    parse_index_versions(&out, &item.name).ok_or_else(|| LangError::NotInIndex { name: item.name.clone() })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn names_and_versions() {
        for ok in ["six", "PyYAML", "zope.interface", "a", "backports_abc", "A-1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["-r/etc/passwd", "six[ssl]", "six==1", "https://x", "a b", "", "x-", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
        for ok in ["1.16.0", "2.0rc1", "1!2.0", "1.0+local.1", "1.0.post1"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in [">=1.0", "1.*", "1.0,<2", "", "--index-url=x"] {
            assert!(!valid_version(bad), "{bad}");
        }
        assert_eq!(canonical_name("Zope__Interface.x"), "zope-interface-x");
        assert!(same_version("1.16", "1.16.0"));
        assert!(same_version("v1.0RC1", "1.0-rc1"));
        assert!(same_version("2020.01", "2020.1"));
        assert!(same_version("1.0.post1", "1.0post1"));
        assert!(!same_version("1.16.0", "1.16.1"));
        assert!(!same_version("1.0", "1.0rc1"));
    }

    #[test]
    fn listings_and_index_answers() {
        let out = "DEPRECATION: something\n[{\"name\": \"PyYAML\", \"version\": \"6.0\"}, {\"name\": \"six\", \"version\": \"1.16.0\", \"editable_project_location\": \"/x\"}]\n";
        let l = parse_list(out).unwrap();
        assert_eq!(l["pyyaml"], Installed { name: "PyYAML".into(), versions: vec!["6.0".into()] });
        assert_eq!(l["six"].versions, ["1.16.0"]);
        assert!(parse_list("ERROR: no\n").is_none());
        assert!(parse_list("[{\"name\": 1}]").is_none());

        let index = "WARNING: pip index is currently an experimental command.\nsix (1.17.0)\nAvailable versions: 1.17.0, 1.16.0\n  INSTALLED: 1.16.0\n  LATEST:    1.17.0\n";
        assert_eq!(parse_index_versions(index, "Six").unwrap(), "1.17.0");
        assert_eq!(parse_index_versions(index, "other"), None);
    }

    #[test]
    fn command_lines() {
        let install = [("six".to_string(), Some("1.16.0".to_string())), ("requests".to_string(), None)];
        assert_eq!(install_args(&install, None), ["install", "six==1.16.0", "requests"]);
        assert_eq!(
            install_args(&install[1..], Some("--install-scripts=/usr/bin, --prefix=/opt")),
            ["install", "--install-option=--install-scripts=/usr/bin", "--install-option=--prefix=/opt", "requests"]
        );
    }

    #[test]
    fn the_system_pip_overrides_pep_668_and_a_virtualenv_pip_does_not() {
        let venv = tempfile::tempdir().unwrap();
        std::fs::create_dir(venv.path().join("bin")).unwrap();
        std::fs::write(venv.path().join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        let venv_pip = pip_tool(venv.path().join("bin/pip"));
        assert_eq!(venv_pip.env_value("PIP_BREAK_SYSTEM_PACKAGES"), None);
        let system = pip_tool(PathBuf::from("/usr/bin/pip3"));
        assert_eq!(system.env_value("PIP_BREAK_SYSTEM_PACKAGES"), Some("1"));
        assert_eq!(system.env_value("PIP_NO_INPUT"), Some("1"));
    }

    #[tokio::test]
    async fn bad_parameters_and_a_missing_pip() {
        let p: CommonPipPackage = typed("common.pip.package", json!({"name": [{"key": "six", "value": ">=1.0"}]}));
        let out = apply_using(Some(pip_tool("/nonexistent/pip".into())), &p, Cancel::never()).await;
        assert!(!out.result);
        assert!(out.comment.starts_with("parameter name: six: \">=1.0\" is not a version"), "{}", out.comment);
        crate::states::testutil::refused(
            "common.pip.package",
            json!({"name": [{"key": "-e/tmp/x"}]}),
            "\"-e/tmp/x\" starts with \"-\"",
        );
        let p: CommonPipPackage = typed("common.pip.package", json!({"name": "six"}));
        let out = apply_using(None, &p, Cancel::never()).await;
        assert_eq!(
            (out.result, out.comment.as_str()),
            (
                false,
                "pip is not installed; install it with a package state first (Debian/Ubuntu package python3-pip, \
                 RHEL python3-pip)"
            )
        );
        assert!(out.changes.is_empty());
    }
}
