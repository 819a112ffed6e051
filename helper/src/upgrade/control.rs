//! Restarting the agent after a switch: systemd over D-Bus, or the cron supervisor's
//! own restart command on hosts without systemd. A trait, so that the installer's
//! decisions (gate, revert, which unit changes need a reload or a new socket) are tested
//! with a fake that plays a healthy or a broken release.

use std::time::Duration;

use opsagent_proto::newtypes::UnitName;

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec};
use crate::systemd::{Job, ServiceManager, Systemd};

pub const AGENT_UNIT: &str = "opsagent.service";
pub const HELPER_UNIT: &str = "opsagent-helper.service";
pub const SOCKET_UNIT: &str = super::units::SOCKET_UNIT;

#[allow(async_fn_in_trait)] // used with concrete types only
pub trait AgentControl {
    /// Restarts the daemon (and lets the helper restart from the new release). `Err`
    /// means the new daemon did not even start (its start job failed).
    async fn restart(&self) -> Result<(), String>;
    /// Makes the service manager read the unit files again (systemd's daemon-reload),
    /// after the installer replaced some. Called only when the installer keeps units
    /// (`Installer::units`), which hosts without systemd do not.
    async fn reload_units(&self) -> Result<(), String>;
    /// Re-creates the helper's listening socket so that a changed socket unit applies,
    /// before [`Self::restart`]; called only when that unit changed.
    async fn restart_socket(&self) -> Result<(), String>;
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

    async fn reload_units(&self) -> Result<(), String> {
        self.systemd.daemon_reload().await.map_err(|e| e.to_string())
    }

    async fn restart_socket(&self) -> Result<(), String> {
        let unit = |name: &str| UnitName::parse(name).map_err(|e| e.to_string());
        let mut never = Cancel::never();
        // As userdata.sh does: the daemon and the helper go first. Restarting a socket
        // also restarts the units that Require= it (the daemon), which would then start
        // twice, the second time killed mid-start by the restart that follows; stopped,
        // it starts once, from that restart. A stop that fails is not fatal: the socket's
        // restart takes the daemon down anyway.
        for name in [AGENT_UNIT, HELPER_UNIT] {
            if let Err(e) = self.systemd.run(&unit(name)?, Job::Stop, &mut never).await {
                tracing::warn!(unit = name, error = %e, "cannot stop before re-creating the helper's socket");
            }
        }
        self.systemd.run(&unit(SOCKET_UNIT)?, Job::Restart, &mut never).await.map_err(|e| e.to_string())
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

    // The cron supervisor starts the programs of `current` itself; there is no unit file
    // to reload and no socket unit. The installer runs without `units` on these hosts, so
    // these are reached only if it were wired wrongly, and say so.
    async fn reload_units(&self) -> Result<(), String> {
        Err("no service manager reads unit files on this host (cron supervision)".into())
    }

    async fn restart_socket(&self) -> Result<(), String> {
        Err("no socket unit on this host (cron supervision): the supervisor starts the helper".into())
    }
}
