//! `opsagent status`: what the running agent is doing, from its status file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, Overrides};
use crate::daemon::{self, StatusReport};

/// The running daemon's status; an error when it is not running.
pub fn read_status(config: Option<&Path>, state_dir: Option<PathBuf>) -> anyhow::Result<StatusReport> {
    // A state directory named on the command line is the only place to look: the
    // system daemon's /run file must not answer for another daemon.
    let named = state_dir.is_some();
    let cfg = Config::load(config, &Overrides { state_dir, ..Overrides::default() })?;
    let mut candidates = vec![PathBuf::from("/run/opsagent/status.json"), daemon::status_file(&cfg.agent.state_dir)];
    if named {
        candidates.remove(0);
    }
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("the agent is not running (no status file at {})", candidates[0].display()))?;
    let report: StatusReport = serde_json::from_slice(&std::fs::read(path)?)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(report.pid)?);
    if nix::sys::signal::kill(pid, None).is_err() {
        anyhow::bail!("the agent is not running (pid {} in {} is gone)", report.pid, path.display());
    }
    Ok(report)
}

pub fn cmd_status(config: Option<&Path>, state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let r = read_status(config, state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("opsagent {} (pid {})", r.agent_version, r.pid);
    println!("  instance   {} of app {}", r.instance_id, r.app_id);
    println!("  status     {}", r.summary);
    if let Some(warning) = r.link.get("insecure_transport").and_then(|w| w.as_str()) {
        println!("  WARNING    {warning}");
    }
    if let Some(err) = r.link.get("last_error").and_then(|e| e.as_str()) {
        let at = r.link.get("last_error_unix").and_then(|t| t.as_u64()).map(crate::timefmt::utc);
        println!("  last error {err}{}", at.map(|t| format!(" (at {t})")).unwrap_or_default());
    }
    print_link_details(&r.link);
    if r.recipes_verified {
        println!("  recipes    verified: the helper runs only recipes signed by its recipe_key");
    } else {
        println!("  recipes    NOT verified: the helper has no recipe_key (see \"Signed recipes\" in the README)");
    }
    if let Some(last) = r.engine.get("last").and_then(|l| l.as_array()) {
        if let [id, ok] = last.as_slice() {
            let verdict = if ok.as_bool() == Some(true) { "succeeded" } else { "FAILED" };
            println!("  last state {} {verdict}", id.as_str().unwrap_or("?"));
        }
    }
    println!("  rounds     {} completed", r.engine.get("rounds_completed").and_then(|v| v.as_u64()).unwrap_or(0));
    println!("  spool      {} StateLog(s) waiting, {} dropped", r.spool_depth, r.spool_dropped);
    if r.spool_held > 0 {
        println!("             {} held in memory: the spool cannot grow (filesystem full?)", r.spool_held);
    }
    if let Some(d) = &r.drift {
        if d.states.is_empty() {
            println!("  drift      none at the last plan of recipe {}", d.recipe_version);
        } else {
            let ids: Vec<&str> = d.states.iter().map(|s| s.id.as_str()).collect();
            println!(
                "  drift      {} state(s) of recipe {} would change: {}",
                d.states.len(),
                d.recipe_version,
                ids.join(", ")
            );
        }
    }
    if let Some(f) = &r.upgrade_failure {
        println!(
            "  upgrade    to {} FAILED (at {}): {}; {} keeps running",
            f.version,
            crate::timefmt::utc(f.at_unix),
            f.reason,
            f.running
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The link's counters, proxy and the backend's extensions, when there is anything to say.
fn print_link_details(link: &serde_json::Value) {
    let n = |k: &str| link.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let mut via = Vec::new();
    if let Some(peer) = link.get("peer").and_then(|v| v.as_str()) {
        via.push(format!("peer {peer}"));
    }
    if let Some(proxy) = link.get("proxy").and_then(|v| v.as_str()) {
        via.push(format!("proxy {proxy}"));
    }
    let caps: Vec<&str> = link
        .get("backend_capabilities")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    via.push(if caps.is_empty() {
        "backend extensions: none".to_string()
    } else {
        format!("backend extensions: {}", caps.join(", "))
    });
    println!("  link       {} connection(s) opened; {}", n("connects"), via.join("; "));
    let refused = n("bad_frames") + n("unknown_frames");
    if refused > 0 {
        println!(
            "  frames     {} refused ({} binary, {} oversized), {} with unknown codes ignored",
            n("bad_frames"),
            n("binary_frames"),
            n("oversized_frames"),
            n("unknown_frames")
        );
    }
}
