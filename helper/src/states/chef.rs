//! `linux.chef.client`, `linux.chef.solo`: a Chef run every round; idempotency is
//! Chef's.
//!
//! Installing Chef (or Cinc, its community build, which also provides `chef-client`
//! and `chef-solo`) is the recipe's job; `/opt/chef/bin` and `/opt/cinc/bin` are
//! searched besides the usual path. Without it the state fails with "chef-client is
//! not installed; install it with a package state first". `version` only fed the
//! original's install script and is not checked. Chef Infra 15 and later want their
//! licence accepted: pass `chef-license: accept` in `arguments`.
//!
//! Commands (each argument separate, no shell):
//! - client: `chef-client -S SERVER [-k CLIENT_KEY] [-c CONFIG] ARGS…`
//! - solo: `chef-solo [-c CONFIG] [-r RECIPE_URL] [-o OVERRIDE_RUNLIST] ARGS…`
//!   (`override-runlist` was dropped by the original adaptor; it is passed here.)
//!
//! `arguments` are rendered `--key value` (an empty value: the bare `--key`), as
//! states.md says; a key that already starts with `-` is kept as it is. Exit status 0
//! is success; Chef's closing line "… N/M resources updated" with N > 0 is the change
//! in the result, and Chef's output is the result's output.

use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::{LinuxChefClient, LinuxChefSolo};
use opsagent_proto::param_types::Dict;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit};
use crate::states::puppet::{not_installed, RUN_TIMEOUT};
use crate::states::storage::find_tool;

const CHEF_DIRS: &[&str] = &["/opt/chef/bin", "/opt/cinc/bin"];

/// `--key value` pairs (two arguments), or the bare `--key`.
pub fn render_arguments(args: Option<&Dict>) -> Vec<String> {
    let mut out = Vec::new();
    for e in args.into_iter().flat_map(|d| d.iter()) {
        let key = e.key.trim();
        out.push(if key.starts_with('-') { key.to_string() } else { format!("--{key}") });
        if let Some(v) = e.value.as_deref().filter(|v| !v.trim().is_empty()) {
            out.push(v.to_string());
        }
    }
    out
}

fn given(v: &Option<opsagent_proto::param_types::Line>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

pub fn client_args(p: &LinuxChefClient) -> Vec<String> {
    let mut a = vec!["-S".to_string(), p.server.trim().to_string()];
    if let Some(k) = &p.client_key {
        a.extend(["-k".to_string(), k.to_string()]);
    }
    if let Some(c) = &p.config {
        a.extend(["-c".to_string(), c.to_string()]);
    }
    a.extend(render_arguments(p.arguments.as_ref()));
    a
}

pub fn solo_args(p: &LinuxChefSolo) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(c) = &p.config {
        a.extend(["-c".to_string(), c.to_string()]);
    }
    if let Some(r) = given(&p.recipe_url) {
        a.extend(["-r".to_string(), r.to_string()]);
    }
    if let Some(o) = given(&p.override_runlist) {
        a.extend(["-o".to_string(), o.to_string()]);
    }
    a.extend(render_arguments(p.arguments.as_ref()));
    a
}

/// The N of Chef's "N/M resources updated" closing line.
pub fn resources_updated(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let before = line.split(" resources updated").next().filter(|_| line.contains(" resources updated"))?;
        let frac = before.rsplit(' ').next()?;
        frac.split('/').next()?.trim().parse().ok()
    })
}

pub async fn client(p: &LinuxChefClient, cancel: Cancel) -> Outcome {
    client_using(find_tool("chef-client", CHEF_DIRS), p, cancel).await
}

/// [`client`] with the program given (`None`: not installed).
pub async fn client_using(program: Option<PathBuf>, p: &LinuxChefClient, cancel: Cancel) -> Outcome {
    let Some(program) = program else {
        return Outcome::failed(not_installed("chef-client"));
    };
    if p.server.trim().is_empty() || p.server.trim().starts_with('-') {
        return Outcome::failed(format!("parameter server: {:?} is not a server URL", p.server.trim()));
    }
    for (param, v) in [("client_key", &p.client_key), ("config", &p.config)] {
        if let Err(e) = root_controlled(param, v) {
            return Outcome::failed(e);
        }
    }
    run(&program, client_args(p), "chef-client", cancel).await
}

pub async fn solo(p: &LinuxChefSolo, cancel: Cancel) -> Outcome {
    solo_using(find_tool("chef-solo", CHEF_DIRS), p, cancel).await
}

/// [`solo`] with the program given (`None`: not installed).
pub async fn solo_using(program: Option<PathBuf>, p: &LinuxChefSolo, cancel: Cancel) -> Outcome {
    let Some(program) = program else {
        return Outcome::failed(not_installed("chef-solo"));
    };
    if let Err(e) = root_controlled("config", &p.config) {
        return Outcome::failed(e);
    }
    run(&program, solo_args(p), "chef-solo", cancel).await
}

/// Chef runs as root and reads its configuration and client key by path: only files
/// root controls ([`crate::states::root_read`]).
fn root_controlled(param: &'static str, v: &Option<opsagent_proto::param_types::PathParam>) -> Result<(), String> {
    match v {
        Some(path) => crate::states::root_read::check(param, path).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

async fn run(program: &Path, args: Vec<String>, label: &str, mut cancel: Cancel) -> Outcome {
    let spec = CommandSpec::tool(&program.to_string_lossy(), args).with_timeout(RUN_TIMEOUT);
    let finished = match exec::run(&spec, &mut cancel).await {
        Ok(f) => f,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let mut outcome = match &finished.exit {
        Exit::Code(0) => match resources_updated(&finished.output) {
            Some(0) => Outcome::ok(format!("{label}: nothing to change")),
            Some(n) => {
                let mut o = Outcome::ok(format!("{label}: {n} resource(s) updated"));
                o.changes.push(Change::new(label, format!("{n} resource(s) updated")));
                o
            }
            None => {
                let mut o = Outcome::ok(format!("{label}: ran (exit status 0)"));
                o.changes.push(Change::new(label, "ran (exit status 0)"));
                o
            }
        },
        Exit::Cancelled => {
            let mut o = Outcome::failed(format!(
                "cancelled while `{}` ran; it and every process it started were killed",
                spec.display()
            ));
            o.cancelled = true;
            o
        }
        other => {
            let t = exec::last_lines(&finished.output, exec::TAIL_LINES);
            let t = if t.is_empty() { t } else { format!(": {t}") };
            Outcome::failed(format!("`{}` {}{t}", spec.display(), exec::describe_exit(other)))
        }
    };
    outcome.stdout = finished.output;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;

    #[test]
    fn arguments_render_key_space_value() {
        let ModuleParams::LinuxChefClient(c) = params(
            "linux.chef.client",
            json!({"server": "https://chef.example.com/organizations/o", "client_key": "/etc/chef/client.pem",
                   "arguments": [{"key": "chef-license", "value": "accept"}, {"key": "once"}, {"key": "-l", "value": "info"}]}),
        ) else {
            panic!()
        };
        assert_eq!(
            client_args(&c),
            [
                "-S",
                "https://chef.example.com/organizations/o",
                "-k",
                "/etc/chef/client.pem",
                "--chef-license",
                "accept",
                "--once",
                "-l",
                "info"
            ]
        );
        let ModuleParams::LinuxChefSolo(s) = params(
            "linux.chef.solo",
            json!({"config": "/etc/chef/solo.rb", "recipe_url": "https://x/r.tgz", "override-runlist": "recipe[a]"}),
        ) else {
            panic!()
        };
        assert_eq!(solo_args(&s), ["-c", "/etc/chef/solo.rb", "-r", "https://x/r.tgz", "-o", "recipe[a]"]);
    }

    #[test]
    fn updated_resources_are_read_from_the_closing_line() {
        assert_eq!(resources_updated("x\nChef Infra Client finished, 3/12 resources updated in 05 seconds\n"), Some(3));
        assert_eq!(resources_updated("Chef Client finished, 0/1 resources updated in 1.2 seconds"), Some(0));
        assert_eq!(resources_updated("nothing here"), None);
    }
}
