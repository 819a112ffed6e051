//! `linux.puppet.agent`, `linux.puppet.apply`, `linux.puppet.run`: a Puppet run every
//! round; idempotency is Puppet's.
//!
//! Installing Puppet is the recipe's job (a package state: Debian's `puppet`, or
//! Puppet's own `puppet-agent`, whose binary is in `/opt/puppetlabs/bin`, also searched).
//! Without it the state fails with "puppet is not installed; install it with a package
//! state first". `version` only fed the original's install step and is not checked.
//!
//! Commands (each argument separate, no shell):
//! - agent: `puppet agent --onetime --no-daemonize --verbose --no-splay
//!   --detailed-exitcodes --color=false --server=SERVER ARGS…`
//! - apply: `puppet apply --detailed-exitcodes --color=false ARGS… MANIFEST`, once per
//!   entry of `manifests`, in order, stopping at the first failure. (The original
//!   called `puppet apply` inside its loop over `arguments`, so without arguments no
//!   manifest was applied at all; here every manifest is applied exactly once.)
//! - run: `puppet ARGS…`, free form (`{key: agent}, {key: --test}` → `puppet agent
//!   --test`).
//!
//! `arguments` are rendered as states.md says, `key=value`, or the bare key for an
//! empty value. For agent and apply, whose arguments can only be options, a key without
//! a leading `-` gets `--` (`noop` → `--noop`, `environment: prod` →
//! `--environment=prod`); for run they are taken literally, since the first ones are
//! the subcommand.
//!
//! With `--detailed-exitcodes` (always for agent and apply; for run when its arguments
//! ask for it, or `--test`): 0 = nothing changed, 2 = changes applied (a change in the
//! result), 4 or 6 = some resources failed. Otherwise 0 is success ("ran" is the
//! change, as Puppet was run). Puppet's output is the result's output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::catalogue::{LinuxPuppetAgent, LinuxPuppetApply, LinuxPuppetRun};
use opsagent_proto::param_types::Dict;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit};
use crate::states::storage::find_tool;

/// Deadline of one Puppet or Chef run: catalogs can take long, but not for ever.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where packaged Puppet puts its binary besides the usual search path.
const PUPPET_DIRS: &[&str] = &["/opt/puppetlabs/bin", "/opt/puppetlabs/puppet/bin"];

pub fn not_installed(tool: &str) -> String {
    format!("{tool} is not installed; install it with a package state first")
}

/// `key=value` / `key`; with `options`, keys without a leading `-` become `--key`.
pub fn render_arguments(args: Option<&Dict>, options: bool) -> Vec<String> {
    args.into_iter()
        .flat_map(|d| d.iter())
        .map(|e| {
            let key = e.key.trim();
            let key = if options && !key.starts_with('-') { format!("--{key}") } else { key.to_string() };
            match e.value.as_deref().filter(|v| !v.trim().is_empty()) {
                Some(v) => format!("{key}={v}"),
                None => key,
            }
        })
        .collect()
}

fn puppet() -> Option<PathBuf> {
    find_tool("puppet", PUPPET_DIRS)
}

pub fn agent_args(p: &LinuxPuppetAgent) -> Vec<String> {
    let mut a: Vec<String> =
        ["agent", "--onetime", "--no-daemonize", "--verbose", "--no-splay", "--detailed-exitcodes"]
            .into_iter()
            .map(String::from)
            .collect();
    a.push("--color=false".into());
    a.push(format!("--server={}", p.server.trim()));
    a.extend(render_arguments(p.arguments.as_ref(), true));
    a
}

pub fn apply_args(p: &LinuxPuppetApply, manifest: &str) -> Vec<String> {
    let mut a = vec!["apply".to_string(), "--detailed-exitcodes".into(), "--color=false".into()];
    a.extend(render_arguments(p.arguments.as_ref(), true));
    a.push(manifest.to_string());
    a
}

pub fn run_args(p: &LinuxPuppetRun) -> Vec<String> {
    render_arguments(p.arguments.as_ref(), false)
}

/// How one run ended, for the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Unchanged,
    Changed,
    Failed(String),
    Cancelled,
}

/// Interprets an exit under Puppet's `--detailed-exitcodes` (or plain 0/non-0).
pub fn interpret(exit: &Exit, detailed: bool) -> RunResult {
    match exit {
        Exit::Code(0) if detailed => RunResult::Unchanged,
        Exit::Code(0) => RunResult::Changed,
        Exit::Code(2) if detailed => RunResult::Changed,
        Exit::Code(4) if detailed => RunResult::Failed("exited with status 4: some resources failed".into()),
        Exit::Code(6) if detailed => {
            RunResult::Failed("exited with status 6: changes were applied but some resources failed".into())
        }
        Exit::Cancelled => RunResult::Cancelled,
        other => RunResult::Failed(exec::describe_exit(other)),
    }
}

/// Runs `program args` and folds the result into `acc` (output appended).
async fn run_one(
    program: &Path,
    args: Vec<String>,
    detailed: bool,
    label: &str,
    acc: &mut Outcome,
    cancel: &mut Cancel,
) -> bool {
    let spec = CommandSpec::tool(&program.to_string_lossy(), args).with_timeout(RUN_TIMEOUT);
    let shown = spec.display();
    let finished = match exec::run(&spec, cancel).await {
        Ok(f) => f,
        Err(e) => {
            acc.result = false;
            acc.comment = e.to_string();
            return false;
        }
    };
    if !acc.stdout.is_empty() {
        acc.stdout.push('\n');
    }
    acc.stdout.push_str(&finished.output);
    match interpret(&finished.exit, detailed) {
        RunResult::Unchanged => true,
        RunResult::Changed => {
            let what = if detailed { "applied changes" } else { "ran (exit status 0)" };
            acc.changes.push(Change::new(label, what));
            true
        }
        RunResult::Failed(how) => {
            acc.result = false;
            acc.comment = format!("`{shown}` {how}{}", tail(&finished.output));
            false
        }
        RunResult::Cancelled => {
            acc.result = false;
            acc.cancelled = true;
            acc.comment = format!("cancelled while `{shown}` ran; it and every process it started were killed");
            false
        }
    }
}

fn tail(output: &str) -> String {
    let t = exec::last_lines(output, exec::TAIL_LINES);
    if t.is_empty() {
        t
    } else {
        format!(": {t}")
    }
}

fn finish(mut acc: Outcome, label: &str) -> Outcome {
    if acc.result {
        acc.comment = if acc.changes.is_empty() {
            format!("{label}: nothing to change")
        } else {
            acc.changes.iter().map(Change::to_string).collect::<Vec<_>>().join("; ")
        };
    }
    acc
}

pub async fn agent(p: &LinuxPuppetAgent, cancel: Cancel) -> Outcome {
    agent_using(puppet(), p, cancel).await
}

/// [`agent`] with the program given (`None`: not installed).
pub async fn agent_using(program: Option<PathBuf>, p: &LinuxPuppetAgent, mut cancel: Cancel) -> Outcome {
    let Some(program) = program else {
        return Outcome::failed(not_installed("puppet"));
    };
    if p.server.trim().is_empty() || p.server.trim().starts_with('-') {
        return Outcome::failed(format!("parameter server: {:?} is not a server name", p.server.trim()));
    }
    let mut acc = Outcome::ok("");
    run_one(&program, agent_args(p), true, "puppet agent", &mut acc, &mut cancel).await;
    finish(acc, "puppet agent")
}

pub async fn apply(p: &LinuxPuppetApply, cancel: Cancel) -> Outcome {
    apply_using(puppet(), p, cancel).await
}

/// [`apply`] with the program given (`None`: not installed).
pub async fn apply_using(program: Option<PathBuf>, p: &LinuxPuppetApply, mut cancel: Cancel) -> Outcome {
    let Some(program) = program else {
        return Outcome::failed(not_installed("puppet"));
    };
    // Absolute paths, checked by the catalogue's decode (none reads as an option).
    if p.manifests.is_empty() {
        return Outcome::failed("parameter manifests: no manifest given");
    }
    // puppet reads them as root: only manifests root controls (root_read).
    for m in p.manifests.iter() {
        if let Err(e) = crate::states::root_read::check("manifests", m) {
            return Outcome::failed(e.to_string());
        }
    }
    let manifests: Vec<String> = p.manifests.iter().map(ToString::to_string).collect();
    let mut acc = Outcome::ok("");
    for m in &manifests {
        if !run_one(&program, apply_args(p, m), true, &format!("puppet apply {m}"), &mut acc, &mut cancel).await {
            break;
        }
    }
    finish(acc, "puppet apply")
}

pub async fn run(p: &LinuxPuppetRun, cancel: Cancel) -> Outcome {
    run_using(puppet(), p, cancel).await
}

/// [`run`] with the program given (`None`: not installed).
pub async fn run_using(program: Option<PathBuf>, p: &LinuxPuppetRun, mut cancel: Cancel) -> Outcome {
    let Some(program) = program else {
        return Outcome::failed(not_installed("puppet"));
    };
    let args = run_args(p);
    let detailed = args.iter().any(|a| a == "--detailed-exitcodes" || a == "--test" || a == "-t");
    let mut acc = Outcome::ok("");
    run_one(&program, args, detailed, "puppet", &mut acc, &mut cancel).await;
    finish(acc, "puppet")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;

    #[test]
    fn arguments_render_as_documented() {
        let ModuleParams::LinuxPuppetAgent(a) = params(
            "linux.puppet.agent",
            json!({"server": "puppet.example.com",
                   "arguments": [{"key": "noop"}, {"key": "environment", "value": "prod"}, {"key": "--waitforcert", "value": "60"}]}),
        ) else {
            panic!()
        };
        assert_eq!(
            agent_args(&a),
            [
                "agent",
                "--onetime",
                "--no-daemonize",
                "--verbose",
                "--no-splay",
                "--detailed-exitcodes",
                "--color=false",
                "--server=puppet.example.com",
                "--noop",
                "--environment=prod",
                "--waitforcert=60"
            ]
        );
        let ModuleParams::LinuxPuppetApply(p) = params(
            "linux.puppet.apply",
            json!({"manifests": ["/etc/puppet/site.pp"], "arguments": [{"key": "modulepath", "value": "/srv/modules"}]}),
        ) else {
            panic!()
        };
        assert_eq!(
            apply_args(&p, "/etc/puppet/site.pp"),
            ["apply", "--detailed-exitcodes", "--color=false", "--modulepath=/srv/modules", "/etc/puppet/site.pp"]
        );
        let ModuleParams::LinuxPuppetRun(r) = params(
            "linux.puppet.run",
            json!({"arguments": [{"key": "agent"}, {"key": "--test"}, {"key": "--server", "value": "x"}]}),
        ) else {
            panic!()
        };
        assert_eq!(run_args(&r), ["agent", "--test", "--server=x"]);
    }

    #[test]
    fn detailed_exit_codes() {
        assert_eq!(interpret(&Exit::Code(0), true), RunResult::Unchanged);
        assert_eq!(interpret(&Exit::Code(2), true), RunResult::Changed);
        assert!(matches!(interpret(&Exit::Code(4), true), RunResult::Failed(m) if m.contains("some resources failed")));
        assert!(matches!(interpret(&Exit::Code(6), true), RunResult::Failed(_)));
        assert!(matches!(interpret(&Exit::Code(2), false), RunResult::Failed(m) if m == "exited with status 2"));
        assert_eq!(interpret(&Exit::Code(0), false), RunResult::Changed);
        assert_eq!(interpret(&Exit::Cancelled, true), RunResult::Cancelled);
    }
}
