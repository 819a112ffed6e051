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
//!
//! A plan runs Puppet's own dry run, `--noop`, but not as is: `puppet apply --noop`
//! still writes its state, last-run summary and report (`/var/cache/puppet/state`,
//! `public/`, `reports/`), `puppet agent --noop` sends its report to the server, and
//! either applies a resource marked `noop => false` for real. So the noop run is a
//! sandboxed inspection ([`CommandSpec::sandboxed_inspection`]): a transient unit with
//! the whole host read-only and a private `/tmp` (see [`crate::transient`]), Puppet's
//! own directories pointed into that `/tmp` ([`noop_settings`], given last so that they
//! win over the recipe's arguments), `--no-report`, and no network for `apply`. What
//! Puppet says it would change (`Notice: /Stage[main]/Main/File[/x]/ensure:
//! current_value 'absent', should be 'file' (noop)`) becomes one change per resource
//! (`File[/x]: ensure absent -> file`); failed resources (exit 4 or 6) fail the plan.
//! Where commands do not run as transient units (no systemd), nothing is run: the plan
//! says "would run puppet …: cannot plan without a sandbox". `linux.puppet.run` is
//! planned so when its arguments are an `agent` or `apply` run; any other subcommand
//! has no noop, and the plan says it would run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::catalogue::{LinuxPuppetAgent, LinuxPuppetApply, LinuxPuppetRun};
use opsagent_proto::param_types::Dict;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit, Sandbox};
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

/// Where a plan's Puppet writes: inside the sandbox's private `/tmp`, gone with it.
const PLAN_DIR: &str = "/tmp/opsagent-puppet-plan";

/// Resources a plan lists one by one; beyond, they are counted.
pub const MAX_PLANNED_RESOURCES: usize = 100;

/// What turns a run into a plan, appended after everything else (Puppet takes the last
/// value of a setting given twice, so the recipe's arguments cannot undo these): noop,
/// no report, detailed exit codes, no colour, and the directories Puppet writes (state, caches, last-run files, pid and
/// lock, logs) in the private `/tmp`. With `own_ssl`, its certificates too (`apply`
/// needs none); an agent keeps reading the host's, which the sandbox keeps read-only.
pub fn noop_settings(own_ssl: bool) -> Vec<String> {
    // Plain output: the notices are parsed (a `puppet run` gets colour by default).
    let mut a: Vec<String> =
        vec!["--noop".into(), "--no-report".into(), "--detailed-exitcodes".into(), "--color=false".into()];
    // `deviceconfdir` (`/etc/puppet/devices`): Puppet makes it before any run, so a plan on
    // a host where Puppet never ran failed on the read-only /etc (seen under real systemd,
    // tests/system/puppet_plan.sh).
    let dirs = [
        ("vardir", "var"),
        ("publicdir", "public"),
        ("rundir", "run"),
        ("logdir", "log"),
        ("deviceconfdir", "devices"),
    ];
    for (setting, dir) in dirs {
        a.push(format!("--{setting}={PLAN_DIR}/{dir}"));
    }
    if own_ssl {
        a.push(format!("--ssldir={PLAN_DIR}/ssl"));
    }
    a
}

/// The noop run planning `puppet agent`.
pub fn agent_plan_args(p: &LinuxPuppetAgent) -> Vec<String> {
    let mut a = agent_args(p);
    a.extend(noop_settings(false));
    a
}

/// The noop run planning `puppet apply` of `manifest`.
pub fn apply_plan_args(p: &LinuxPuppetApply, manifest: &str) -> Vec<String> {
    let mut a = apply_args(p, manifest);
    a.extend(noop_settings(true));
    a
}

/// The noop run planning `linux.puppet.run`, with whether it needs the network (an
/// agent); `Err`: why this run has no noop.
pub fn run_plan_args(p: &LinuxPuppetRun) -> Result<(Vec<String>, bool), String> {
    let mut a = run_args(p);
    let agent = match a.first().map(String::as_str) {
        Some("agent") => true,
        Some("apply") => false,
        Some(other) => {
            return Err(format!(
                "`puppet {other}` has no noop run to plan with (only `puppet agent` and `puppet apply` have)"
            ))
        }
        None => return Err("no subcommand given, only `puppet agent` and `puppet apply` have a noop run".into()),
    };
    if agent {
        // Once, in the foreground: a daemon would outlive the plan.
        a.extend(["--onetime".to_string(), "--no-daemonize".into()]);
    }
    a.extend(noop_settings(!agent));
    Ok((a, agent))
}

/// The resources Puppet's noop output says would change, one [`Change`] per resource
/// (its properties joined: `File[/x]: content {sha256}… -> {sha256}…, mode 0644 ->
/// 0600`), in the order Puppet names them; a refresh a service, exec or mount would
/// get counts too. At most [`MAX_PLANNED_RESOURCES`], then one change counting the rest
/// under `label`.
pub fn noop_changes(output: &str, label: &str) -> Vec<Change> {
    let mut resources: Vec<(String, Vec<String>)> = Vec::new();
    let mut note = |resource: String, what: String| match resources.iter_mut().find(|(r, _)| *r == resource) {
        Some((_, list)) => list.push(what),
        None => resources.push((resource, vec![what])),
    };
    for line in output.lines().map(str::trim_end) {
        let Some(rest) = line.strip_prefix("Notice: /") else { continue };
        if let Some(body) = rest.strip_suffix(" (noop)") {
            // "Stage[main]/Main/File[/x]/ensure: current_value 'absent', should be 'file'"
            let Some((path, values)) = body.split_once(": current_value ") else { continue };
            let Some(cut) = path.rfind("]/") else { continue };
            let (Some(owner), Some(property)) = (path.get(..=cut), path.get(cut + 2..)) else { continue };
            let Some((current, wanted)) = values.rsplit_once(", should be ") else { continue };
            if let Some(resource) = last_resource(owner) {
                note(resource, format!("{property} {} -> {}", unquote(current), unquote(wanted)));
            }
        } else if let Some((path, events)) = rest.split_once(": Would have triggered 'refresh' from ") {
            // Classes and defined types only pass events on; these act on a refresh.
            let Some(resource) = last_resource(path) else { continue };
            if ["Service[", "Exec[", "Mount["].iter().any(|t| resource.starts_with(t)) {
                note(resource, format!("refresh ({events})"));
            }
        }
    }
    let extra = resources.len().saturating_sub(MAX_PLANNED_RESOURCES);
    let mut changes: Vec<Change> = resources
        .into_iter()
        .take(MAX_PLANNED_RESOURCES)
        .map(|(resource, what)| Change::new(resource, what.join(", ")))
        .collect();
    if extra > 0 {
        changes.push(Change::new(label, format!("and {extra} more resources would change (see the output)")));
    }
    changes
}

/// `File[/x]` of `Stage[main]/Main/File[/x]`: the last `Type[title]` of a resource
/// path, its title's own brackets matched.
fn last_resource(path: &str) -> Option<String> {
    let path = path.strip_suffix(']')?;
    let mut depth = 1usize;
    let mut open = None;
    for (i, c) in path.char_indices().rev() {
        match c {
            ']' => depth += 1,
            '[' => {
                depth -= 1;
                if depth == 0 {
                    open = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let open = open?;
    let start = path.get(..open)?.rfind('/').map_or(0, |i| i + 1);
    let resource = path.get(start..)?;
    (!resource.starts_with('[')).then(|| format!("{resource}]"))
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v)
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

/// Runs `spec` with its output appended to `acc`; `None`, with `acc` failed saying why,
/// when it could not be started.
async fn run_into(spec: &CommandSpec, acc: &mut Outcome, cancel: &mut Cancel) -> Option<exec::Finished> {
    match exec::run(spec, cancel).await {
        Ok(finished) => {
            if !acc.stdout.is_empty() {
                acc.stdout.push('\n');
            }
            acc.stdout.push_str(&finished.output);
            Some(finished)
        }
        Err(e) => {
            acc.result = false;
            acc.comment = e.to_string();
            None
        }
    }
}

/// Fails `acc` with how the run `what` ended: `how` it failed, or `None` when it was
/// cancelled; `false`.
fn failed(acc: &mut Outcome, how: Option<String>, what: &str, output: &str) -> bool {
    acc.result = false;
    acc.cancelled = how.is_none();
    acc.comment = match how {
        Some(how) => format!("{what} {how}{}", tail(output)),
        None => format!("cancelled while {what} ran; it and every process it started were killed"),
    };
    false
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
    let Some(finished) = run_into(&spec, acc, cancel).await else { return false };
    match interpret(&finished.exit, detailed) {
        RunResult::Unchanged => true,
        RunResult::Changed => {
            let what = if detailed { "applied changes" } else { "ran (exit status 0)" };
            acc.changes.push(Change::new(label, what));
            true
        }
        RunResult::Failed(how) => failed(acc, Some(how), &format!("`{shown}`"), &finished.output),
        RunResult::Cancelled => failed(acc, None, &format!("`{shown}`"), &finished.output),
    }
}

/// Plans one run: its noop `args` in the read-only sandbox (`network` for an agent),
/// the resources it would change added to `acc`; `false` when the plan cannot go on.
async fn plan_one(
    program: &Path,
    args: Vec<String>,
    network: bool,
    label: &str,
    acc: &mut Outcome,
    cancel: &mut Cancel,
) -> bool {
    let spec = CommandSpec::tool(&program.to_string_lossy(), args)
        .with_timeout(RUN_TIMEOUT)
        .sandboxed_inspection(Sandbox::ReadOnlyHost { network });
    let shown = spec.display();
    let Some(finished) = run_into(&spec, acc, cancel).await else { return false };
    match interpret(&finished.exit, true) {
        // A noop run changes nothing, so Puppet 7 exits 0 whatever it would change;
        // its notices say what.
        RunResult::Unchanged | RunResult::Changed => {
            let changes = noop_changes(&finished.output, label);
            if changes.is_empty() && finished.exit == Exit::Code(2) {
                acc.changes.push(Change::new(label, "would apply changes (Puppet named no resource)"));
            }
            acc.changes.extend(changes);
            true
        }
        RunResult::Failed(how) => failed(acc, Some(how), &format!("the noop run `{shown}`"), &finished.output),
        RunResult::Cancelled => failed(acc, None, &format!("`{shown}`"), &finished.output),
    }
}

/// A plan that runs nothing: the runs that would be made, and why not even their noop.
fn would_run(runs: Vec<(String, CommandSpec)>, why: &str) -> Outcome {
    let shown: Vec<String> = runs.iter().map(|(_, spec)| spec.display()).collect();
    let mut o = Outcome::ok(format!("would run {}: {why}", shown.join("; ")));
    o.changes = runs.into_iter().map(|(label, _)| Change::new(label, "would run")).collect();
    o
}

/// Why a plan runs no noop where commands cannot be sandboxed.
const NO_SANDBOX: &str = "cannot plan without a sandbox (Puppet's noop run writes its state and reports, and \
                          applies resources marked noop => false; commands run as transient units of systemd only \
                          where systemd is PID 1)";

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
    if crate::plan::active() {
        if !exec::sandbox_available(&cancel) {
            let spec = CommandSpec::tool(&program.to_string_lossy(), agent_args(p));
            return would_run(vec![("puppet agent".into(), spec)], NO_SANDBOX);
        }
        plan_one(&program, agent_plan_args(p), true, "puppet agent", &mut acc, &mut cancel).await;
        return finish(acc, "puppet agent");
    }
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
    if crate::plan::active() {
        if !exec::sandbox_available(&cancel) {
            let runs = manifests
                .iter()
                .map(|m| (format!("puppet apply {m}"), CommandSpec::tool(&program.to_string_lossy(), apply_args(p, m))))
                .collect();
            return would_run(runs, NO_SANDBOX);
        }
        for m in &manifests {
            let label = format!("puppet apply {m}");
            if !plan_one(&program, apply_plan_args(p, m), false, &label, &mut acc, &mut cancel).await {
                break;
            }
        }
        return finish(acc, "puppet apply");
    }
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
    if crate::plan::active() {
        let spec = CommandSpec::tool(&program.to_string_lossy(), args);
        let (noop, network) = match run_plan_args(p) {
            Ok(planned) => planned,
            Err(why) => return would_run(vec![("puppet".into(), spec)], &why),
        };
        if !exec::sandbox_available(&cancel) {
            return would_run(vec![("puppet".into(), spec)], NO_SANDBOX);
        }
        plan_one(&program, noop, network, "puppet", &mut acc, &mut cancel).await;
        return finish(acc, "puppet");
    }
    run_one(&program, args, detailed, "puppet", &mut acc, &mut cancel).await;
    finish(acc, "puppet")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;
    use std::sync::Arc;

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

    /// Noop output as Puppet 7 prints it (recorded from `puppet apply --noop` here),
    /// with a title holding brackets and slashes and a refreshed service.
    const NOOP: &str = "Notice: Compiled catalog for vm in environment production in 0.06 seconds
Notice: /Stage[main]/Main/File[/srv/x]/content: current_value '{sha256}01d0', should be '{sha256}5891' (noop)
Notice: /Stage[main]/Main/File[/srv/x]/mode: current_value '0644', should be '0600' (noop)
Notice: /Stage[main]/Web/Exec[echo [a/b]]/returns: current_value 'notrun', should be ['0'] (noop)
Notice: /Stage[main]/Main/File[/srv/new]/ensure: current_value 'absent', should be 'file' (noop)
Notice: /Stage[main]/Web/Service[nginx]: Would have triggered 'refresh' from 1 event
Notice: /Stage[main]/Web/Mytype[a]: Would have triggered 'refresh' from 2 events
Notice: Class[Main]: Would have triggered 'refresh' from 1 event
Notice: Stage[main]: Would have triggered 'refresh' from 1 event
Notice: Applied catalog in 0.02 seconds";

    fn words(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn noop_notices_become_one_change_per_resource() {
        assert_eq!(
            words(&noop_changes(NOOP, "puppet apply /srv/site.pp")),
            [
                "File[/srv/x]: content {sha256}01d0 -> {sha256}5891, mode 0644 -> 0600",
                "Exec[echo [a/b]]: returns notrun -> ['0']",
                "File[/srv/new]: ensure absent -> file",
                "Service[nginx]: refresh (1 event)",
            ]
        );
        assert!(noop_changes("Notice: Applied catalog in 0.02 seconds\n", "x").is_empty());
        // Capped: the rest counted under the run's label.
        let many: String = (0..MAX_PLANNED_RESOURCES + 3)
            .map(|i| {
                format!(
                    "Notice: /Stage[main]/Main/File[/f{i}]/ensure: current_value 'absent', should be 'file' (noop)\n"
                )
            })
            .collect();
        let changes = words(&noop_changes(&many, "puppet apply /s.pp"));
        assert_eq!(changes.len(), MAX_PLANNED_RESOURCES + 1);
        assert_eq!(changes[0], "File[/f0]: ensure absent -> file");
        assert_eq!(
            changes[MAX_PLANNED_RESOURCES],
            "puppet apply /s.pp: and 3 more resources would change (see the output)"
        );
    }

    #[test]
    fn noop_runs_end_with_settings_the_recipe_cannot_undo() {
        let ModuleParams::LinuxPuppetApply(p) = params(
            "linux.puppet.apply",
            json!({"manifests": ["/srv/site.pp"], "arguments": [{"key": "no-noop"}, {"key": "vardir", "value": "/var/x"}]}),
        ) else {
            panic!()
        };
        let args = apply_plan_args(&p, "/srv/site.pp");
        let mine = noop_settings(true);
        assert_eq!(args[args.len() - mine.len()..], mine[..]);
        for setting in ["--noop", "--no-report", "--detailed-exitcodes", "--color=false"] {
            assert!(mine.contains(&setting.to_string()), "{setting}: {mine:?}");
        }
        for dir in ["vardir", "publicdir", "rundir", "logdir", "deviceconfdir", "ssldir"] {
            assert!(mine.iter().any(|a| a.starts_with(&format!("--{dir}={PLAN_DIR}/"))), "{dir}: {mine:?}");
        }
        // An agent keeps reading the host's certificates.
        let ModuleParams::LinuxPuppetAgent(a) = params("linux.puppet.agent", json!({"server": "puppet"})) else {
            panic!()
        };
        let args = agent_plan_args(&a);
        assert!(args.ends_with(&noop_settings(false)) && !args.iter().any(|a| a.starts_with("--ssldir")), "{args:?}");

        let run = |raw: serde_json::Value| {
            let ModuleParams::LinuxPuppetRun(r) = params("linux.puppet.run", raw) else { panic!() };
            run_plan_args(&r)
        };
        let (args, network) = run(json!({"arguments": [{"key": "agent"}, {"key": "--test"}]})).unwrap();
        assert!(network);
        assert_eq!(args[..4], ["agent", "--test", "--onetime", "--no-daemonize"]);
        assert!(args.ends_with(&noop_settings(false)));
        let (args, network) = run(json!({"arguments": [{"key": "apply"}, {"key": "/srv/site.pp"}]})).unwrap();
        assert!(!network && args.ends_with(&noop_settings(true)), "{args:?}");
        let why = run(json!({"arguments": [{"key": "resource"}, {"key": "user"}]})).unwrap_err();
        assert_eq!(why, "`puppet resource` has no noop run to plan with (only `puppet agent` and `puppet apply` have)");
        assert!(run(json!({})).is_err());
    }

    fn planning(fake: &Arc<exec::Fake>) -> (Arc<crate::plan::Plan>, Cancel) {
        let scope = exec::Scope::with_runner(fake.clone() as Arc<dyn exec::Runner>);
        (crate::plan::Plan::new(), Cancel::never().with_scope(Arc::new(scope)))
    }

    /// Planned through a runner that enforces sandboxes: the noop run is sandboxed and
    /// its notices are the changes; a failed resource fails the plan; no write is
    /// refused on the way.
    #[tokio::test]
    async fn a_plan_runs_the_noop_in_the_sandbox_and_reports_its_resources() {
        let program = PathBuf::from("/usr/bin/puppet");
        let ModuleParams::LinuxPuppetApply(p) = params("linux.puppet.apply", json!({"manifests": ["/etc/hostname"]}))
        else {
            panic!()
        };
        let fake =
            Arc::new(exec::Fake { sandboxes: true, ..exec::Fake::default() }.answer("puppet", Exit::Code(0), NOOP));
        let (plan, cancel) = planning(&fake);
        let out = crate::plan::scope(Some(Arc::clone(&plan)), apply_using(Some(program.clone()), &p, cancel)).await;
        assert!(out.result, "{out:?}");
        assert_eq!(plan.refused(), None);
        assert_eq!(words(&out.changes)[2], "File[/srv/new]: ensure absent -> file");
        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0.sandbox, Some(Sandbox::ReadOnlyHost { network: false }));
        assert_eq!(
            calls[0].0.args,
            apply_plan_args(&p, "/etc/hostname").into_iter().map(std::ffi::OsString::from).collect::<Vec<_>>()
        );

        let failing = Arc::new(exec::Fake { sandboxes: true, ..exec::Fake::default() }.answer(
            "puppet",
            Exit::Code(4),
            "Error: /Stage[main]/Main/File[/x]/ensure: change failed",
        ));
        let (plan, cancel) = planning(&failing);
        let out = crate::plan::scope(Some(plan), apply_using(Some(program.clone()), &p, cancel)).await;
        assert!(!out.result, "{out:?}");
        assert!(out.comment.starts_with("the noop run `/usr/bin/puppet apply"), "{}", out.comment);
        assert!(out.comment.contains("exited with status 4: some resources failed: Error:"), "{}", out.comment);

        // An agent plan keeps the network.
        let ModuleParams::LinuxPuppetAgent(a) = params("linux.puppet.agent", json!({"server": "puppet"})) else {
            panic!()
        };
        let (plan, cancel) = planning(&fake);
        let out = crate::plan::scope(Some(plan), agent_using(Some(program), &a, cancel)).await;
        assert!(out.result && out.changes.len() == 4, "{out:?}");
        assert_eq!(fake.calls()[1].0.sandbox, Some(Sandbox::ReadOnlyHost { network: true }));
    }

    /// Without a runner that sandboxes, and for a subcommand without noop, nothing runs:
    /// the plan says what would run and why it cannot say more.
    #[tokio::test]
    async fn without_a_sandbox_or_a_noop_the_plan_says_it_would_run() {
        let program = PathBuf::from("/usr/bin/puppet");
        let ModuleParams::LinuxPuppetApply(p) =
            params("linux.puppet.apply", json!({"manifests": ["/etc/hostname", "/etc/hosts"]}))
        else {
            panic!()
        };
        let fake = Arc::new(exec::Fake::default());
        let (plan, cancel) = planning(&fake);
        let out = crate::plan::scope(Some(Arc::clone(&plan)), apply_using(Some(program.clone()), &p, cancel)).await;
        assert!(out.result, "{out:?}");
        assert_eq!(
            words(&out.changes),
            ["puppet apply /etc/hostname: would run", "puppet apply /etc/hosts: would run"]
        );
        assert!(
            out.comment.starts_with(
                "would run /usr/bin/puppet apply --detailed-exitcodes --color=false /etc/hostname; /usr/bin/puppet apply"
            ) && out.comment.contains(": cannot plan without a sandbox"),
            "{}",
            out.comment
        );
        let ModuleParams::LinuxPuppetRun(r) =
            params("linux.puppet.run", json!({"arguments": [{"key": "agent"}, {"key": "--test"}]}))
        else {
            panic!()
        };
        let (_, cancel) = planning(&fake);
        let out =
            crate::plan::scope(Some(crate::plan::Plan::new()), run_using(Some(program.clone()), &r, cancel)).await;
        assert!(
            out.comment.starts_with("would run /usr/bin/puppet agent --test: cannot plan without a sandbox"),
            "{out:?}"
        );
        let ModuleParams::LinuxPuppetRun(r) =
            params("linux.puppet.run", json!({"arguments": [{"key": "module"}, {"key": "install"}, {"key": "x"}]}))
        else {
            panic!()
        };
        let sandboxing = Arc::new(exec::Fake { sandboxes: true, ..exec::Fake::default() });
        let (_, cancel) = planning(&sandboxing);
        let out = crate::plan::scope(Some(crate::plan::Plan::new()), run_using(Some(program), &r, cancel)).await;
        assert!(out.result && words(&out.changes) == ["puppet: would run"], "{out:?}");
        assert_eq!(
            out.comment,
            "would run /usr/bin/puppet module install x: `puppet module` has no noop run to plan with (only `puppet agent` and `puppet apply` have)"
        );
        assert!(fake.calls().is_empty() && sandboxing.calls().is_empty());
        assert_eq!(plan.refused(), None);
    }
}
