//! The release's systemd units, on hosts where `packaging/userdata.sh` installed them.
//!
//! userdata.sh copies the units of the release it installs into `/etc/systemd/system`
//! (and the helper's drop-ins it was asked for into `opsagent-helper.service.d/`, the
//! polkit rule into the first polkit rules directory that exists). A self-upgrade keeps
//! exactly those files in step with the release that `current` points at: a file is
//! replaced only where it is installed (a regular file at its place) and differs from the
//! release's. Nothing is created: a drop-in the userdata did not ask for stays absent, and
//! a `.deb` host, whose units live in `/lib/systemd/system` and belong to dpkg, has none
//! of these files in the unit directory, so nothing of it is touched.
//!
//! sysusers.d and tmpfiles.d files are not units and stay the userdata script's: applying
//! them means running `systemd-sysusers`/`systemd-tmpfiles`, which a re-run does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::AccessFlags;

use super::UpgradeError;
use crate::fsutil;

pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";
/// userdata.sh's choice, in its order: the rule goes into the first that exists.
pub const DEFAULT_POLKIT_DIRS: &[&str] = &["/etc/polkit-1/rules.d", "/usr/share/polkit-1/rules.d"];
pub const SOCKET_UNIT: &str = "opsagent-helper.socket";
/// Installed unit files are no larger than this; anything larger is not ours and differs.
const MAX_UNIT_BYTES: u64 = 1 << 20;

/// A file of the release (relative to its tree) and where userdata.sh installs it
/// (relative to the unit directory), in the order they are written.
const UNIT_FILES: &[(&str, &str)] = &[
    ("units/opsagent.service", "opsagent.service"),
    ("units/opsagent-helper.service", "opsagent-helper.service"),
    ("units/opsagent-helper.socket", SOCKET_UNIT),
    ("units/opsagent-upgrade.service", "opsagent-upgrade.service"),
    ("units/opsagent-helper-network.conf", "opsagent-helper.service.d/50-network.conf"),
];
const POLKIT_RULE: (&str, &str) = ("polkit/50-opsagent.rules", "50-opsagent.rules");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A unit or drop-in systemd reads at daemon-reload.
    Unit,
    /// The helper's socket: its settings apply only when it is re-created.
    Socket,
    /// polkitd watches its rules directories and reloads by itself.
    Polkit,
}

/// Where the installed copies live (the installer's `--unit-dir`, and the polkit rules
/// directories for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledUnits {
    pub unit_dir: PathBuf,
    pub polkit_dirs: Vec<PathBuf>,
}

/// What [`InstalledUnits::bring_to`] replaced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub files: Vec<(PathBuf, Kind)>,
}

impl Replaced {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// systemd must re-read its configuration.
    pub fn needs_reload(&self) -> bool {
        self.files.iter().any(|(_, k)| *k != Kind::Polkit)
    }

    pub fn socket(&self) -> bool {
        self.files.iter().any(|(_, k)| *k == Kind::Socket)
    }

    /// The replaced paths, for the log.
    pub fn list(&self) -> String {
        self.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

impl Default for InstalledUnits {
    fn default() -> Self {
        Self {
            unit_dir: PathBuf::from(DEFAULT_UNIT_DIR),
            polkit_dirs: DEFAULT_POLKIT_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// One file to replace: its new content from the release.
struct Pending {
    path: PathBuf,
    kind: Kind,
    content: Vec<u8>,
}

impl InstalledUnits {
    /// Brings every installed unit file, drop-in and polkit rule to the content of the
    /// release tree `release`, and returns what it replaced. A file the release does not
    /// carry is left as it is. `Err` names the file that could not be read or written;
    /// files written before it stay written (bringing them to another release puts them
    /// back).
    pub fn bring_to(&self, release: &Path) -> Result<Replaced, UpgradeError> {
        let mut pending = Vec::new();
        for (from, to) in UNIT_FILES {
            let kind = if *to == SOCKET_UNIT { Kind::Socket } else { Kind::Unit };
            self.compare(release, from, self.unit_dir.join(to), kind, &mut pending)?;
        }
        if let Some(rule) = self.polkit_rule() {
            self.compare(release, POLKIT_RULE.0, rule, Kind::Polkit, &mut pending)?;
        }
        if pending.is_empty() {
            return Ok(Replaced::default());
        }
        // An installer started by the opsagent-upgrade.service of a release older than this
        // code runs with /etc read-only (ProtectSystem=strict without these directories in
        // ReadWritePaths=). Failing there would hold every such host at its release until
        // the userdata script runs again; upgrading the binaries alone is what those hosts
        // did before, so they keep doing that, with a warning.
        for p in &pending {
            let dir = p.path.parent().unwrap_or(Path::new("/"));
            if nix::unistd::access(dir, AccessFlags::W_OK) == Err(Errno::EROFS) {
                let stale = pending.iter().map(|p| p.path.display().to_string()).collect::<Vec<_>>().join(", ");
                tracing::warn!(
                    dir = %dir.display(),
                    units = %stale,
                    "units not updated: the directory is read-only to this installer (an opsagent-upgrade.service \
                     from before units were upgraded); run the userdata script again to install them"
                );
                return Ok(Replaced::default());
            }
        }
        let mut replaced = Replaced::default();
        for p in pending {
            replace(&p.path, &p.content).map_err(|source| UpgradeError::Unit { path: p.path.clone(), source })?;
            tracing::info!(unit = %p.path.display(), "replaced a unit file with the release's");
            replaced.files.push((p.path, p.kind));
        }
        Ok(replaced)
    }

    /// The polkit rule userdata.sh installed: in the first rules directory that exists,
    /// and only on a host whose units userdata.sh installed (the `.deb` keeps its rule in
    /// `/usr/share/polkit-1/rules.d` too, and that one is dpkg's).
    fn polkit_rule(&self) -> Option<PathBuf> {
        let userdata_host = fs::symlink_metadata(self.unit_dir.join("opsagent.service")).is_ok_and(|m| m.is_file());
        let dir = self.polkit_dirs.iter().find(|d| d.is_dir())?;
        userdata_host.then(|| dir.join(POLKIT_RULE.1))
    }

    /// Queues `installed` for replacement when it is an installed regular file whose
    /// content differs from the release's `rel`.
    fn compare(
        &self,
        release: &Path,
        rel: &str,
        installed: PathBuf,
        kind: Kind,
        pending: &mut Vec<Pending>,
    ) -> Result<(), UpgradeError> {
        let meta = match fs::symlink_metadata(&installed) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(UpgradeError::Io { path: installed, source: e }),
        };
        if !meta.is_file() {
            // A link or anything else at that place was put there by someone else.
            tracing::info!(unit = %installed.display(), "not a regular file; left alone");
            return Ok(());
        }
        let source = release.join(rel);
        let content = match fs::read(&source) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(unit = %installed.display(), "the release carries no {rel}; the installed file is kept");
                return Ok(());
            }
            Err(e) => return Err(UpgradeError::Io { path: source, source: e }),
        };
        let differs = if meta.len() > MAX_UNIT_BYTES {
            true
        } else {
            let mut f = fsutil::open_nofollow(&installed, false)
                .map_err(|e| UpgradeError::Unit { path: installed.clone(), source: e })?;
            fsutil::content_differs(&mut f, &installed, meta.len(), &content)
                .map_err(|e| UpgradeError::Unit { path: installed.clone(), source: e })?
        };
        if differs {
            pending.push(Pending { path: installed, kind, content });
        }
        Ok(())
    }
}

/// Writes `content` over `path` atomically, root-owned, 0644: a temporary file in the
/// same directory, fsynced, renamed over it, the directory fsynced. The temporary name
/// starts with a dot and ends in neither `.conf` nor `.rules`, so neither systemd nor
/// polkitd reads it should they look meanwhile; it is fixed (one installer at a time, under
/// its lock), so a leftover of an interrupted run is replaced.
// systemd's and polkit's configuration directories (root-owned, no other writer).
#[allow(clippy::disallowed_methods)]
fn replace(path: &Path, content: &[u8]) -> Result<(), fsutil::FsError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.opsagent-upgrade"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fsutil::io_err(&tmp, "remove the leftover temporary file")(e)),
    }
    fsutil::write_atomic_via(&tmp, path, content, 0o644, 0, 0)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    struct Tree {
        _tmp: tempfile::TempDir,
        release: PathBuf,
        units: InstalledUnits,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let release = tmp.path().join("release");
        let unit_dir = tmp.path().join("system");
        let polkit = tmp.path().join("polkit");
        for d in [release.join("units"), release.join("polkit"), unit_dir.join("opsagent-helper.service.d")] {
            fs::create_dir_all(d).unwrap();
        }
        fs::create_dir(&polkit).unwrap();
        for (from, _) in UNIT_FILES.iter().chain([&POLKIT_RULE]) {
            fs::write(release.join(from), format!("{from} new\n")).unwrap();
        }
        let units = InstalledUnits { unit_dir, polkit_dirs: vec![tmp.path().join("missing"), polkit] };
        Tree { _tmp: tmp, release, units }
    }

    #[test]
    fn only_installed_files_that_differ_are_replaced_root_owned_0644() {
        let t = tree();
        let dir = &t.units.unit_dir;
        fs::write(dir.join("opsagent.service"), "old\n").unwrap();
        fs::set_permissions(dir.join("opsagent.service"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(dir.join("opsagent-helper.service"), "units/opsagent-helper.service new\n").unwrap();
        fs::write(dir.join("opsagent-helper.service.d/50-network.conf"), "old\n").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.join("opsagent-upgrade.service")).unwrap();
        let same_inode = fs::metadata(dir.join("opsagent-helper.service")).unwrap().ino();

        let r = t.units.bring_to(&t.release).unwrap();
        let got: Vec<_> = r.files.iter().map(|(p, k)| (p.strip_prefix(dir).unwrap().to_path_buf(), *k)).collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("opsagent.service"), Kind::Unit),
                (PathBuf::from("opsagent-helper.service.d/50-network.conf"), Kind::Unit)
            ]
        );
        assert!(r.needs_reload() && !r.socket());
        let m = fs::metadata(dir.join("opsagent.service")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 0, 0));
        assert_eq!(fs::read_to_string(dir.join("opsagent.service")).unwrap(), "units/opsagent.service new\n");
        assert_eq!(
            fs::metadata(dir.join("opsagent-helper.service")).unwrap().ino(),
            same_inode,
            "equal: not rewritten"
        );
        // Not installed: not created. A symlink: someone else's, left alone.
        assert!(!dir.join(SOCKET_UNIT).exists() && !dir.join("opsagent-helper.service.d/60-storage.conf").exists());
        assert_eq!(fs::read_link(dir.join("opsagent-upgrade.service")).unwrap(), PathBuf::from("/dev/null"));
        // No polkit rule installed: none created.
        assert!(!t.units.polkit_dirs[1].join("50-opsagent.rules").exists());
        let leftovers: Vec<_> = fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert!(leftovers.iter().all(|n| !n.to_string_lossy().starts_with('.')), "{leftovers:?}");

        assert!(t.units.bring_to(&t.release).unwrap().is_empty(), "a second pass changes nothing");
    }

    #[test]
    fn the_socket_and_the_polkit_rule_are_told_apart() {
        let t = tree();
        let dir = &t.units.unit_dir;
        let rule = t.units.polkit_dirs[1].join("50-opsagent.rules");
        fs::write(&rule, "old rule\n").unwrap();
        // Not a userdata host (no regular opsagent.service here): the rule is dpkg's.
        fs::write(dir.join(SOCKET_UNIT), "old\n").unwrap();
        let r = t.units.bring_to(&t.release).unwrap();
        assert_eq!(r.files, [(dir.join(SOCKET_UNIT), Kind::Socket)]);
        assert!(r.socket() && r.needs_reload());
        assert_eq!(fs::read_to_string(&rule).unwrap(), "old rule\n");

        fs::write(dir.join("opsagent.service"), "units/opsagent.service new\n").unwrap();
        let r = t.units.bring_to(&t.release).unwrap();
        assert_eq!(r.files, [(rule.clone(), Kind::Polkit)]);
        assert!(!r.needs_reload() && !r.socket(), "polkitd reloads by itself");
        assert_eq!(fs::read_to_string(&rule).unwrap(), "polkit/50-opsagent.rules new\n");
    }

    #[test]
    fn a_file_the_release_lacks_is_kept_and_a_write_failure_names_the_unit() {
        let t = tree();
        let dir = &t.units.unit_dir;
        fs::remove_file(t.release.join("units/opsagent.service")).unwrap();
        fs::write(dir.join("opsagent.service"), "old\n").unwrap();
        assert!(t.units.bring_to(&t.release).unwrap().is_empty());
        assert_eq!(fs::read_to_string(dir.join("opsagent.service")).unwrap(), "old\n");

        // A non-empty directory where the temporary file goes: even root cannot write.
        fs::write(dir.join(SOCKET_UNIT), "old\n").unwrap();
        fs::create_dir_all(dir.join(".opsagent-helper.socket.opsagent-upgrade/x")).unwrap();
        let e = t.units.bring_to(&t.release).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", dir.join(SOCKET_UNIT).display())), "{e}");
        assert_eq!(fs::read_to_string(dir.join(SOCKET_UNIT)).unwrap(), "old\n");
    }
}
