//! The hand-over between the daemon and the root upgrade installer (`opsagent-upgrade`).
//!
//! The daemon never touches the installed releases: it downloads a release into
//! `<state_dir>/upgrade/staged/` and asks for the installer (by starting
//! `opsagent-upgrade.service`, or, on cron-fallback hosts, by leaving the order for the
//! supervisor). The installer trusts nothing in that directory: it copies the files out,
//! verifies the signature with the key of the root-owned configuration and the MANIFEST,
//! installs, switches, restarts and waits for the new daemon's [`Health`]. It tells the
//! daemon how it went with a [`Record`] in `<state_dir>/upgrade/result.json`, which the
//! daemon (old or new, whichever runs next) reports to the backend and uses for the
//! hold-off of a failed version.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The release archive the installer expects, inside the staged directory.
pub const ARCHIVE: &str = "opsagent.tgz";
/// Its detached minisign signature (`opsagent.tgz.minisig`, as build-release makes it).
pub const SIGNATURE: &str = "opsagent.tgz.minisig";
/// The [`Order`], written last: its presence means the other two files are complete.
pub const ORDER: &str = "order.json";
/// The systemd unit that runs the installer; the polkit rule lets the daemon start it.
pub const UNIT: &str = "opsagent-upgrade.service";
/// The trusted comment a release signature must carry, exactly.
pub fn trusted_comment(version: &str) -> String {
    format!("opsagent release {version}")
}

/// Where the daemon stages a download, under its state directory.
pub fn staged_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade").join("staged")
}

/// Where the installer leaves its [`Record`].
pub fn result_file(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade").join("result.json")
}

/// Where the daemon confirms its health once the backend accepted its Handshake.
pub fn health_file(state_dir: &Path) -> PathBuf {
    state_dir.join("health.json")
}

/// Release versions are directory names and parts of URLs: a conservative alphabet.
pub fn valid_version(v: &str) -> bool {
    let mut chars = v.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && v.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '_' | '-'))
}

/// What the daemon asks the installer for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub version: String,
    /// Where the archive came from (for the record; the installer does not fetch).
    pub url: String,
    /// The version running when the order was staged.
    pub from: String,
    /// Unix seconds.
    pub ordered_at: u64,
}

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Switched; the new version has not confirmed its health yet.
    Switched,
    /// The new version completed a Handshake within the health gate.
    Confirmed,
    /// Refused before anything was installed (signature, manifest, unsafe archive, …).
    Rejected,
    /// Installed and started, but not healthy in time (or installed, but its units could
    /// not be, so it was never started): the previous release runs again.
    Reverted,
    /// Something failed after the switch and the previous release could not be restored.
    Failed,
}

impl Outcome {
    /// An outcome the daemon reports to the backend as a failed upgrade.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Rejected | Outcome::Reverted | Outcome::Failed)
    }
}

/// The installer's account of one upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: String,
    pub from: String,
    pub outcome: Outcome,
    /// For a person: why, in one line.
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
    /// Set by the daemon once the backend has the report (in its spool).
    #[serde(default)]
    pub reported: bool,
}

/// Written by the daemon when the backend has accepted its Handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub pid: u32,
    /// Unix seconds.
    pub handshake_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["1.2.0", "1.3.0-rc1", "2026.11+build_7", "a"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["", ".1", "-1", "1/2", "../x", "1 2", "1\n", &"9".repeat(65)] {
            assert!(!valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn records_round_trip_and_default_unreported() {
        let r: Record = serde_json::from_str(
            r#"{"version":"1.3.0","from":"1.2.0","outcome":"reverted","reason":"no handshake","at":5}"#,
        )
        .unwrap();
        assert_eq!(r.outcome, Outcome::Reverted);
        assert!(!r.reported && r.outcome.is_failure());
        assert!(!Outcome::Confirmed.is_failure() && !Outcome::Switched.is_failure());
    }
}
