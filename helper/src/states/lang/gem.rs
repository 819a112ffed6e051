//! `common.gem.package`: Ruby gems through `gem`.
//!
//! What is installed: `gem list --local` (every version of every gem, default gems of
//! the Ruby installation included). The newest version, for `latest`: `gem list
//! --remote --exact NAME…`, from the sources `gem` is configured with (`/etc/gemrc`,
//! `/root/.gemrc`, or `GEMRC`; rubygems.org by default). Installs: `gem install
//! --no-document NAME…` for unpinned gems, and one `gem install --no-document NAME
//! --version VERSION` per pinned gem (a `--version` applies to every name of its
//! command); removals: `gem uninstall --all --executables NAME…`, which refuses (and the
//! state fails) when another installed gem depends on the one to remove.
//!
//! Gems are installed side by side: a pinned version (or a `latest` upgrade) is
//! installed next to the versions already there, which are left alone, as the
//! original did; `removed` removes every version. A gem counts as "at version V" when V
//! is one of its installed versions.
//!
//! A plan (issue 19) runs the same `gem list --local` and, for the gems an install would
//! choose the version of (unpinned or `latest`), the same remote listing with a home
//! RubyGems cannot cache in ([`plan_query_tool`]); it reports the listing the apply
//! would leave in its words (`hello: installed 1.1.0`, `removed 1.1.0, 1.0.0`).
//! `common.gem.source` plans from `gem sources --list` (`URL: gem source added`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use opsagent_proto::catalogue::{CommonGemPackage, CommonGemSource};
use opsagent_proto::request::Change;
use opsagent_proto::request::Outcome;

use super::{plan, verify, Installed, LangError, Listing, Rules, Run, Tool};
use crate::cancel::Cancel;
use crate::states::storage::{find_tool, MissingTool};

pub const RULES: Rules = Rules {
    manager: "gem",
    valid_name,
    valid_version,
    version_expected:
        "a version (such as 1.2.0; requirements such as \"~> 1.2\" are not accepted, use latest or a version)",
    key: str::to_string,
    same_version: |a, b| a == b,
};

pub fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A `Gem::Version`: digits first, then alphanumerics separated by `.` or `-`.
pub fn valid_version(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_digit()) && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
}

pub fn gem_tool(program: PathBuf) -> Tool {
    Tool::new(program)
}

/// `gem list` output: `name (1.2.0, 1.1.0)`, `json (default: 2.6.1)`, `nokogiri
/// (1.13.8 x86_64-linux)`; headers and blank lines skipped.
pub fn parse_list(out: &str) -> Listing {
    let mut listing = Listing::new();
    for line in out.lines() {
        let Some((name, rest)) = line.trim().split_once(" (") else { continue };
        let Some(inner) = rest.strip_suffix(')') else { continue };
        if !valid_name(name) {
            continue;
        }
        let versions: Vec<String> = inner
            .split(", ")
            .filter_map(|v| v.trim().trim_start_matches("default:").split_whitespace().next())
            .filter(|v| valid_version(v))
            .map(str::to_string)
            .collect();
        if !versions.is_empty() {
            listing.insert(name.to_string(), Installed { name: name.to_string(), versions });
        }
    }
    listing
}

/// The `gem install` commands for a plan: the unpinned gems in one, each pinned one on
/// its own.
pub fn install_commands(install: &[(String, Option<String>)]) -> Vec<Vec<String>> {
    let base = || vec!["install".to_string(), "--no-document".into()];
    let mut commands = Vec::new();
    let unpinned: Vec<String> = install.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| n.clone()).collect();
    if !unpinned.is_empty() {
        commands.push(base().into_iter().chain(unpinned).collect());
    }
    for (name, version) in install {
        if let Some(v) = version {
            commands.push(base().into_iter().chain([name.clone(), "--version".into(), v.clone()]).collect());
        }
    }
    commands
}

pub fn uninstall_args(remove: &[String]) -> Vec<String> {
    ["uninstall", "--all", "--executables"].into_iter().map(String::from).chain(remove.iter().cloned()).collect()
}

pub async fn apply(p: &CommonGemPackage, cancel: Cancel) -> Outcome {
    apply_using(find_tool("gem", &[]).map(gem_tool), p, cancel).await
}

/// The state with a given `gem` (`None`: none is installed).
pub async fn apply_using(gem: Option<Tool>, p: &CommonGemPackage, cancel: Cancel) -> Outcome {
    let mut run = Run::new(cancel);
    let result = match gem {
        Some(gem) => run_state(&gem, p, &mut run).await,
        None => {
            Err(MissingTool { tool: "gem".into(), hint: "Debian/Ubuntu package ruby, RHEL rubygems".into() }.into())
        }
    };
    run.finish(&super::subject(&p.name), result)
}

async fn list(gem: &Tool, run: &mut Run) -> Result<Listing, LangError> {
    let out = run.query(&gem.command(["list", "--local"], super::QUERY_TIMEOUT).inspection(), &[0]).await?;
    Ok(parse_list(&out))
}

async fn run_state(gem: &Tool, p: &CommonGemPackage, run: &mut Run) -> Result<(), LangError> {
    let items = super::parse_items(&p.name, &RULES)?;
    let before = list(gem, run).await?;
    let planning = crate::plan::active();
    let mut ask: Vec<String> = super::needs_latest(&items, &before).iter().map(|i| i.name.clone()).collect();
    let latest = newest(gem, &ask, run).await?;
    let todo = plan(&items, &before, &latest, &RULES);
    if planning {
        // The version an unpinned install would get: the source's newest.
        ask = todo.install.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| n.clone()).collect();
        let chosen = newest(gem, &ask, run).await?;
        run.changes.extend(super::planned_changes(&before, &todo, &RULES, true, &chosen, "no version known"));
        if !todo.install.is_empty() {
            run.notes.push(super::PLAN_DEPENDENCIES_NOTE.to_string());
        }
        return Ok(());
    }
    if todo.is_empty() {
        return Ok(());
    }
    let acted = async {
        for args in install_commands(&todo.install) {
            run.act(&gem.command(args, super::INSTALL_TIMEOUT)).await?;
        }
        if !todo.remove.is_empty() {
            run.act(&gem.command(uninstall_args(&todo.remove), super::INSTALL_TIMEOUT)).await?;
        }
        Ok::<(), LangError>(())
    }
    .await;
    let after = list(gem, run).await?;
    run.changes.extend(super::describe_changes(&before, &after));
    acted?;
    verify(&items, &after, &latest, &RULES)
}

/// The newest version of each gem of `names` in the configured sources, by name
/// (`gem list --remote --exact`; in a plan through [`plan_query_tool`]).
async fn newest(gem: &Tool, names: &[String], run: &mut Run) -> Result<BTreeMap<String, String>, LangError> {
    let mut found = BTreeMap::new();
    if names.is_empty() {
        return Ok(found);
    }
    let tool = if crate::plan::active() { plan_query_tool(gem) } else { gem.clone() };
    let args = ["list", "--remote", "--exact"].into_iter().map(String::from).chain(names.iter().cloned());
    let remote = parse_list(&run.query(&tool.command(args, super::QUERY_TIMEOUT).inspection(), &[0]).await?);
    for name in names {
        // Without --all, the remote listing holds the newest version only.
        let newest = remote.get(name).and_then(|i| i.versions.first().cloned());
        let newest = newest.ok_or_else(|| LangError::NotInIndex { name: name.clone() })?;
        found.insert(name.clone(), newest);
    }
    Ok(found)
}

/// Where a plan's remote query looks for a home: nobody can create it.
pub const PLAN_HOME: &str = "/proc/nonexistent";

/// `gem` for a plan's remote query. RubyGems keeps each source's index in a cache
/// under the home directory when that directory is the user's own
/// (`Gem::Source#update_cache?`): a home that cannot exist keeps it from writing. The
/// user's gemrc, which RubyGems would have found in the real home (`~/.gemrc`, else
/// the XDG `gem/gemrc`), is named in `GEMRC` ahead of what `GEMRC` already named.
pub fn plan_query_tool(gem: &Tool) -> Tool {
    let home = PathBuf::from(gem.env_value("HOME").unwrap_or("/root"));
    let dotfile = home.join(".gemrc");
    let user = if dotfile.exists() {
        dotfile
    } else {
        gem.env_value("XDG_CONFIG_HOME").map_or_else(|| home.join(".config"), PathBuf::from).join("gem/gemrc")
    };
    let mut rc = vec![user.display().to_string()];
    rc.extend(
        gem.env_value("GEMRC").into_iter().flat_map(|v| v.split(':')).filter(|s| !s.is_empty()).map(String::from),
    );
    gem.clone().with_env("HOME", PLAN_HOME).with_env("GEMRC", &rc.join(":"))
}

/// The sources `gem sources --list` prints (after its `*** CURRENT SOURCES ***`
/// header), compared without a trailing `/`.
pub fn parse_sources(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("***"))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect()
}

/// `common.gem.source`: `gem sources --add URL` as root (the adaptor's `gem source
/// --add`), only when `gem sources --list` does not show it yet, so a second run
/// changes nothing and gem does not fetch the source's index every round.
pub async fn source(p: &CommonGemSource, cancel: Cancel) -> Outcome {
    source_using(find_tool("gem", &[]).map(gem_tool), p, cancel).await
}

pub async fn source_using(gem: Option<Tool>, p: &CommonGemSource, cancel: Cancel) -> Outcome {
    let mut run = Run::new(cancel);
    let url = p.url.trim().to_string();
    let result = match gem {
        Some(gem) => {
            async {
                let listed = parse_sources(
                    &run.query(&gem.command(["sources", "--list"], super::QUERY_TIMEOUT).inspection(), &[0]).await?,
                );
                if listed.iter().any(|s| s == url.trim_end_matches('/')) {
                    return Ok(());
                }
                if crate::plan::active() {
                    // `gem sources --add` also fetches the source's index to check it: a
                    // source that does not answer fails the apply, which a plan cannot tell.
                    run.changes.push(Change::new(url.as_str(), "gem source added"));
                    run.notes.push("planned: the apply checks that the source answers when it adds it".into());
                    return Ok(());
                }
                run.act(&gem.command(["sources", "--add", url.as_str()], super::INSTALL_TIMEOUT)).await?;
                run.changes.push(Change::new(url.as_str(), "gem source added"));
                Ok::<(), LangError>(())
            }
            .await
        }
        None => {
            Err(MissingTool { tool: "gem".into(), hint: "Debian/Ubuntu package ruby, RHEL rubygems".into() }.into())
        }
    };
    run.finish(&format!("gem source {url}"), result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn gem_sources_output() {
        let out = "*** CURRENT SOURCES ***\n\nhttps://rubygems.org/\nhttp://gems.example.org\n";
        assert_eq!(parse_sources(out), ["https://rubygems.org", "http://gems.example.org"]);
    }

    #[test]
    fn gem_list_output() {
        let out = "\n*** LOCAL GEMS ***\n\nabbrev (default: 0.1.0)\nhello (1.1.0, 1.0.0)\nnokogiri (1.13.8 x86_64-linux, 1.12.0)\nbundler (default: 2.3.7, 2.4.0)\nnonsense line\n";
        let l = parse_list(out);
        assert_eq!(l["abbrev"].versions, ["0.1.0"]);
        assert_eq!(l["hello"].versions, ["1.1.0", "1.0.0"]);
        assert_eq!(l["nokogiri"].versions, ["1.13.8", "1.12.0"]);
        assert_eq!(l["bundler"].versions, ["2.3.7", "2.4.0"]);
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn command_lines() {
        let install = [
            ("a".to_string(), None),
            ("b".to_string(), Some("1.0.0".to_string())),
            ("c".to_string(), None),
            ("d".to_string(), Some("2.0".to_string())),
        ];
        let cmds: Vec<String> = install_commands(&install).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "install --no-document a c",
                "install --no-document b --version 1.0.0",
                "install --no-document d --version 2.0"
            ]
        );
        assert_eq!(uninstall_args(&["a".into()]).join(" "), "uninstall --all --executables a");
        assert!(valid_version("1.0.0.pre") && valid_version("2.0-rc1"));
        assert!(!valid_version("~> 1.2") && !valid_version(">= 1") && !valid_version("latest!"));
        assert!(valid_name("activesupport") && valid_name("net-http") && !valid_name("--source=x"));
    }

    #[tokio::test]
    async fn bad_parameters_and_a_missing_gem() {
        let p: CommonGemPackage = typed("common.gem.package", json!({"name": [{"key": "rake", "value": "~> 13.0"}]}));
        let out = apply_using(Some(gem_tool("/nonexistent/gem".into())), &p, Cancel::never()).await;
        assert!(out.comment.starts_with("parameter name: rake: \"~> 13.0\" is not a version"), "{}", out.comment);
        let out = apply_using(None, &p, Cancel::never()).await;
        assert_eq!(
            out.comment,
            "gem is not installed; install it with a package state first (Debian/Ubuntu package ruby, RHEL rubygems)"
        );
    }
}
