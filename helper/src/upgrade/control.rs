//! Restarting the agent after a switch: systemd over D-Bus, or the cron supervisor's
//! own restart command on hosts without systemd. A trait, so that the installer's
//! decisions (gate, revert) are tested with a fake that plays a healthy or a broken
//! release.

use std::time::Duration;

use opsagent_proto::newtypes::UnitName;

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec};
use crate::systemd::{Job, ServiceManager, Systemd};

pub const AGENT_UNIT: &str = "opsagent.service";
pub const HELPER_UNIT: &str = "opsagent-helper.service";

#[allow(async_fn_in_trait)] // used with concrete types only
pub trait AgentControl {
    /// Restarts the daemon (and lets the helper restart from the new release). `Err`
    /// means the new daemon did not even start (its start job failed).
    async fn restart(&self) -> Result<(), String>;
}

/// systemd: the helper is stopped (its socket starts the new binary at the next
/// connection), then `opsagent.service` is restarted; the restart job of a
/// `Type=notify` unit ends when the new daemon sent READY=1, or fails.
pub struct SystemdControl {
    systemd: Systemd,
}

impl SystemdControl {
    pub async fn connect(job_timeout: Duration) -> Result<Self, String> {
        let systemd = Systemd::system().await.map_err(|e| e.to_string())?;
        Ok(Self { systemd: systemd.with_job_timeout(job_timeout) })
    }
}

impl AgentControl for SystemdControl {
    async fn restart(&self) -> Result<(), String> {
        let unit = |name: &str| UnitName::parse(name).map_err(|e| e.to_string());
        let mut never = Cancel::never();
        // A helper still serving the old daemon's last request is stopped gracefully;
        // failing to stop it is not fatal (the old binary keeps serving).
        if let Err(e) = self.systemd.run(&unit(HELPER_UNIT)?, Job::Stop, &mut never).await {
            tracing::warn!(error = %e, "cannot stop the helper; it keeps running the previous release");
        }
        let agent = unit(AGENT_UNIT)?;
        // A broken release may have used up the unit's start limit; the release that
        // replaces it must still start.
        if let Err(e) = self.systemd.reset_failed(&agent).await {
            tracing::debug!(error = %e, "reset-failed");
        }
        self.systemd.run(&agent, Job::Restart, &mut never).await.map_err(|e| e.to_string())
    }
}

/// Hosts without systemd: a command (the supervisor's `restart`) that stops both
/// processes and starts them again from `current`.
pub struct CommandControl {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl AgentControl for CommandControl {
    async fn restart(&self) -> Result<(), String> {
        let (program, args) = self.argv.split_first().ok_or("empty restart command")?;
        let mut spec = CommandSpec::tool(program, args);
        spec.timeout = Some(self.timeout);
        spec.env.push(("OPSAGENT_SUPERVISE_LOCKED".into(), "1".into()));
        exec::checked(&spec, &[0], &mut Cancel::never()).await.map(drop).map_err(|e| e.to_string())
    }
}
