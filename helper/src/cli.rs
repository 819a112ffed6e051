//! The command line. Operators rarely pass anything: the systemd units give the socket
//! and the default allowlist (the `opsagent` user) fits the packaged set-up.

use std::path::PathBuf;

use clap::Parser;
use opsagent_proto::codec::DEFAULT_MAX_FRAME;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "opsagent-helper",
    version,
    about = "The root helper of opsagent: applies states for the agent over a Unix socket"
)]
pub struct Cli {
    /// Bind this socket path instead of taking the socket passed by systemd
    /// (socket activation through opsagent-helper.socket).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// A user allowed to connect (repeatable). Replaces the default, the user
    /// `opsagent`; root is always allowed.
    #[arg(long = "allow-user", value_name = "NAME")]
    pub allow_user: Vec<String>,

    /// Largest request frame accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME)]
    pub max_frame: usize,

    /// Where the helper may keep state between requests (used by modules that need
    /// memory across rounds).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/opsagent-helper")]
    pub state_dir: PathBuf,

    /// The operator's policy file (root-owned, not writable by others). Without this
    /// option /etc/opsagent/helper.policy is read if it exists; a file named here must
    /// exist. See the `policy` module documentation (helper/README.md) for its format.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// Connections one uid may hold open at once; more are refused.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_connections_per_uid: usize,

    /// Keep CAP_SYS_ADMIN and CAP_MKNOD, which linux.lvm.* and linux.raid need for the
    /// device-mapper and md ioctls and device nodes (the opt-in storage drop-in sets
    /// OPSAGENT_HELPER_STORAGE=yes and adds them to the unit's bounding set).
    #[arg(long, env = "OPSAGENT_HELPER_STORAGE", value_parser = clap::builder::FalseyValueParser::new())]
    pub storage: bool,

    /// Seconds a connection may stay idle (no request running, nothing received)
    /// before it is closed; 0 never closes it.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub idle_timeout: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_off_unless_asked_for() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["opsagent-helper"], args].concat()).unwrap();
        // The test's own environment might carry the variable; only the flag is checked.
        if std::env::var_os("OPSAGENT_HELPER_STORAGE").is_none() {
            assert!(!parse(&[]).storage);
        }
        assert!(parse(&["--storage"]).storage);
        assert!(Cli::try_parse_from(["opsagent-helper", "--storage=maybe"]).is_err(), "a flag takes no value");
    }
}
