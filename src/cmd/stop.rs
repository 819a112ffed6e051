//! `opsagent stop`: SIGTERM (after the running state) or SIGUSR1 (after the round).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::status::read_status;

pub fn cmd_stop(config: Option<&Path>, state_dir: Option<PathBuf>, after_round: bool) -> anyhow::Result<ExitCode> {
    use nix::sys::signal::{kill, Signal};
    let r = read_status(config, state_dir)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(r.pid)?);
    let sig = if after_round { Signal::SIGUSR1 } else { Signal::SIGTERM };
    kill(pid, sig)?;
    println!(
        "asked opsagent (pid {}) to stop {}",
        r.pid,
        if after_round { "after the current round" } else { "after the running state" }
    );
    Ok(ExitCode::SUCCESS)
}
