//! The installed releases: `PREFIX/releases/VERSION/` trees and the `PREFIX/current`
//! symlink (`releases/VERSION`, relative, as userdata.sh makes it) that the units and
//! the cron supervisor start from. A switch is one rename of a new symlink over the old
//! one, so a reader sees either release, never neither.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::UpgradeError;
use crate::fsutil;

pub const DEFAULT_PREFIX: &str = "/opt/visualops";

#[derive(Debug, Clone)]
pub struct Releases {
    prefix: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io { path: path.to_path_buf(), source }
}

impl Releases {
    pub fn new(prefix: impl Into<PathBuf>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn dir(&self) -> PathBuf {
        self.prefix.join("releases")
    }

    pub fn path(&self, version: &str) -> PathBuf {
        self.dir().join(version)
    }

    fn current_link(&self) -> PathBuf {
        self.prefix.join("current")
    }

    /// A scratch directory on the same file system as the releases (so that the
    /// verified tree moves in with a rename), root-only.
    // The installer's own tree (`PREFIX/releases`, `PREFIX/current`: root-owned, made by
    // userdata.sh): only root can change these paths.
    #[allow(clippy::disallowed_methods)]
    pub fn work_dir(&self) -> Result<PathBuf, UpgradeError> {
        let dir = self.dir();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let work = dir.join(format!(".incoming-{}", std::process::id()));
        if fs::symlink_metadata(&work).is_ok() {
            fs::remove_dir_all(&work).map_err(io(&work))?;
        }
        fs::DirBuilder::new().mode(0o700).create(&work).map_err(io(&work))?;
        Ok(work)
    }

    /// The version `current` points at, if it points into `releases/`.
    pub fn current(&self) -> Option<String> {
        let target = fs::read_link(self.current_link()).ok()?;
        let name = target.file_name()?.to_str()?.to_string();
        let parent = target.parent()?.file_name()?;
        (parent == "releases").then_some(name)
    }

    /// Moves a verified tree in as `releases/VERSION`, replacing a tree of that name that
    /// is not the current one (a re-ordered version is installed afresh).
    // The installer's own tree (`PREFIX/releases`, `PREFIX/current`: root-owned, made by
    // userdata.sh): only root can change these paths.
    #[allow(clippy::disallowed_methods)]
    pub fn install(&self, tree: &Path, version: &str) -> Result<PathBuf, UpgradeError> {
        let to = self.path(version);
        if self.current().as_deref() == Some(version) {
            return Err(UpgradeError::Rejected(format!("{version} is the current release; nothing to install")));
        }
        if fs::symlink_metadata(&to).is_ok() {
            remove_tree(&to)?;
        }
        fs::set_permissions(tree, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(io(tree))?;
        fs::rename(tree, &to).map_err(io(&to))?;
        fsutil::fsync_dir(&self.dir()).map_err(|e| UpgradeError::Other(e.to_string()))?;
        Ok(to)
    }

    /// Points `current` at `releases/VERSION` atomically.
    // The installer's own tree (`PREFIX/releases`, `PREFIX/current`: root-owned, made by
    // userdata.sh): only root can change these paths.
    #[allow(clippy::disallowed_methods)]
    pub fn switch(&self, version: &str) -> Result<(), UpgradeError> {
        let link = self.current_link();
        let tmp = self.prefix.join(".current.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(version), &tmp).map_err(io(&tmp))?;
        fs::rename(&tmp, &link).map_err(io(&link))?;
        fsutil::fsync_dir(&self.prefix).map_err(|e| UpgradeError::Other(e.to_string()))
    }

    /// Removes every release but `keep` (and leftovers of interrupted runs); returns
    /// the versions removed.
    pub fn prune(&self, keep: &[&str]) -> Result<Vec<String>, UpgradeError> {
        let dir = self.dir();
        let mut removed = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name == format!(".incoming-{}", std::process::id());
            if keep.contains(&name.as_str()) || ours {
                continue;
            }
            remove_tree(&entry.path())?;
            if !name.starts_with('.') {
                removed.push(name);
            }
        }
        removed.sort();
        Ok(removed)
    }

    pub fn remove(&self, version: &str) -> Result<(), UpgradeError> {
        remove_tree(&self.path(version))
    }
}

// The installer's own tree (`PREFIX/releases`, `PREFIX/current`: root-owned, made by
// userdata.sh): only root can change these paths.
#[allow(clippy::disallowed_methods)]
fn remove_tree(path: &Path) -> Result<(), UpgradeError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io(path)),
        Ok(_) => fs::remove_file(path).map_err(io(path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    fn tree(root: &Path, name: &str) -> PathBuf {
        let t = root.join(name);
        fs::create_dir_all(t.join("bin")).unwrap();
        fs::write(t.join("bin/opsagent"), name).unwrap();
        t
    }

    #[test]
    fn install_switch_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Releases::new(tmp.path());
        assert_eq!(r.current(), None);
        let work = r.work_dir().unwrap();
        r.install(&tree(&work, "a"), "1.0").unwrap();
        r.switch("1.0").unwrap();
        assert_eq!(r.current().as_deref(), Some("1.0"));
        assert_eq!(fs::read_link(tmp.path().join("current")).unwrap(), PathBuf::from("releases/1.0"));
        assert!(r.install(&tree(&work, "again"), "1.0").unwrap_err().to_string().contains("current release"));
        r.install(&tree(&work, "b"), "1.1").unwrap();
        r.install(&tree(&work, "c"), "1.2").unwrap();
        // Re-installing a non-current version replaces it.
        r.install(&tree(&work, "c2"), "1.2").unwrap();
        assert_eq!(fs::read_to_string(r.path("1.2").join("bin/opsagent")).unwrap(), "c2");
        r.switch("1.2").unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("current/bin/opsagent")).unwrap(), "c2");
        assert_eq!(r.prune(&["1.2", "1.0"]).unwrap(), vec!["1.1".to_string()]);
        assert!(r.path("1.0").is_dir() && !r.path("1.1").exists());
    }
}
