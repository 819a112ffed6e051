//! What the installer reads from `/etc/opsagent.conf`, and only from there.
//!
//! The signing key is the one thing an attacker who owns the daemon would want to
//! change, so it comes from a file only root can write: the file must be owned by root
//! and not writable by group or others, and it is opened without following a symlink.
//! The instance userdata (which the daemon may also read keys from) is never consulted.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_shared::ini;

use super::UpgradeError;
use crate::fsutil;

pub const DEFAULT_CONFIG: &str = "/etc/opsagent.conf";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/visualops/opsagent";
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallerConfig {
    /// The minisign public key (its base64 line).
    pub update_key: String,
    /// The daemon's state directory, where releases are staged and results left.
    pub state_dir: PathBuf,
    /// How long a new version has to reach READY and complete a Handshake.
    pub health_timeout: Duration,
    /// `[upgrade] allow_downgrade`: whether a release older than the running one may be
    /// installed (default no: the daemon must not be able to bring back an old release).
    pub allow_downgrade: bool,
}

impl InstallerConfig {
    /// Reads `path`; `trusted_owner` is the uid that must own it (root in production).
    pub fn load(path: &Path, trusted_owner: u32) -> Result<Self, UpgradeError> {
        let bad = |problem: String| UpgradeError::Config { path: path.to_path_buf(), problem };
        let mut file = fsutil::open_nofollow(path, false).map_err(|e| bad(e.to_string()))?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.uid() != trusted_owner {
            return Err(bad(format!(
                "owned by uid {}, not uid {trusted_owner}: its update_key cannot be trusted",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "mode {:04o} lets group or others write it: its update_key cannot be trusted",
                meta.mode() & 0o7777
            )));
        }
        let mut text = String::new();
        file.by_ref().take(MAX_CONFIG_BYTES).read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text).map_err(bad)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc = ini::parse(text).map_err(|e| format!("line {}: {}", e.line, e.problem))?;
        let get = |section: &str, key: &str| {
            doc.entries
                .iter()
                .filter(|e| e.section.as_ref().is_some_and(|(s, _)| s == section) && e.key == key)
                .map(|e| (e.line, e.value.trim().to_string()))
                .next_back()
        };
        let update_key = match get("userdata", "update_key") {
            Some((_, k)) if !k.is_empty() => k,
            _ => return Err("[userdata] update_key is not set: without a pinned key no release is installed".into()),
        };
        let state_dir = match get("agent", "state_dir") {
            Some((line, dir)) => {
                let dir = PathBuf::from(dir);
                if !dir.is_absolute() {
                    return Err(format!("line {line}: [agent] state_dir must be an absolute path"));
                }
                dir
            }
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };
        let health_timeout = match get("upgrade", "health_timeout") {
            Some((line, v)) => match v.parse::<u64>() {
                Ok(s) if (5..=3600).contains(&s) => Duration::from_secs(s),
                _ => return Err(format!("line {line}: [upgrade] health_timeout must be 5..3600 seconds, not {v:?}")),
            },
            None => DEFAULT_HEALTH_TIMEOUT,
        };
        let allow_downgrade = match get("upgrade", "allow_downgrade") {
            Some((line, v)) => match v.trim_matches('"') {
                "true" | "yes" | "1" => true,
                "false" | "no" | "0" => false,
                _ => return Err(format!("line {line}: [upgrade] allow_downgrade must be true or false, not {v:?}")),
            },
            None => false,
        };
        Ok(Self { update_key, state_dir, health_timeout, allow_downgrade })
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const KEY: &str = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3";

    #[test]
    fn reads_the_three_keys_with_defaults() {
        let c = InstallerConfig::parse(&format!("[userdata]\nupdate_key = {KEY}\n")).unwrap();
        assert_eq!(c.update_key, KEY);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.health_timeout, DEFAULT_HEALTH_TIMEOUT);
        let c = InstallerConfig::parse(&format!(
            "[userdata]\nupdate_key={KEY}\n[agent]\nstate_dir=/srv/st\n[upgrade]\nhealth_timeout = 90\n"
        ))
        .unwrap();
        assert_eq!((c.state_dir, c.health_timeout), (PathBuf::from("/srv/st"), Duration::from_secs(90)));
        assert!(!c.allow_downgrade);
        let c = InstallerConfig::parse(&format!("[userdata]\nupdate_key={KEY}\n[upgrade]\nallow_downgrade = true\n"))
            .unwrap();
        assert!(c.allow_downgrade);
        let e = InstallerConfig::parse(&format!("[userdata]\nupdate_key={KEY}\n[upgrade]\nallow_downgrade = maybe\n"))
            .unwrap_err();
        assert!(e.contains("line 4") && e.contains("allow_downgrade"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let e = InstallerConfig::parse("[userdata]\nws_uri = ws://x\n").unwrap_err();
        assert!(e.contains("update_key is not set"), "{e}");
        let e = InstallerConfig::parse(&format!("[userdata]\nupdate_key={KEY}\n[agent]\nstate_dir=rel\n")).unwrap_err();
        assert!(e.contains("line 4") && e.contains("absolute"), "{e}");
        let e = InstallerConfig::parse(&format!("[userdata]\nupdate_key={KEY}\n[upgrade]\nhealth_timeout=1\n"))
            .unwrap_err();
        assert!(e.contains("health_timeout"), "{e}");
    }

    #[test]
    fn the_file_must_be_owned_by_the_trusted_uid_and_not_writable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opsagent.conf");
        std::fs::write(&path, format!("[userdata]\nupdate_key={KEY}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(InstallerConfig::load(&path, me).is_ok());
        let e = InstallerConfig::load(&path, me + 1).unwrap_err().to_string();
        assert!(e.contains("cannot be trusted") && e.contains("opsagent.conf"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o662)).unwrap();
        let e = InstallerConfig::load(&path, me).unwrap_err().to_string();
        assert!(e.contains("0662"), "{e}");
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(InstallerConfig::load(&link, me).is_err());
    }
}
