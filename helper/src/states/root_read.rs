//! Files root reads on a recipe's behalf (`linux.apt.package` `deb-conf-file`), or
//! hands by path to a tool that runs as root ([`check`]: `linux.rpm.key` `path`,
//! `common.virtualenv` `requirements-file`, `common.git` `ssh-key-file` when git runs
//! as root, `linux.chef.*` `config`/`client_key`, `linux.supervisord` `config`,
//! `linux.puppet.apply` `manifests`).
//!
//! The recipe, and so a compromised daemon, names the path; root can read anything. A
//! file is read only when nobody but root can have chosen its content: every directory
//! on the way is a real directory (not a link) owned by root and not writable by group
//! or others, and the file itself, opened without following a link and checked on the
//! opened descriptor, is a regular file owned by root and not writable by group or
//! others. Its content is then handed to the tool on a pipe, never by path (nothing is
//! resolved twice), and what the tool prints about it is not returned to the daemon
//! (a root-only file such as `/etc/shadow` passes these checks; its lines must not go
//! back in an outcome).

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::OFlag;
use opsagent_proto::newtypes::AbsPath;

/// Largest file read this way: selections and the like are a few KiB.
pub const MAX_READ: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RootReadError {
    #[error("parameter {param}: {path}: {problem}")]
    Unsafe { param: &'static str, path: String, problem: String },
    #[error("parameter {param}: {path}: {source}")]
    Io { param: &'static str, path: String, source: std::io::Error },
    /// Internal to [`check`]: the file or a directory on the way does not exist, and
    /// the directories above it that do are root's.
    #[error("the file does not exist")]
    Missing,
}

/// Group- or other-writable.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// Whether `path` is a file only root can have chosen, for a tool run as root that
/// opens it by path: the same checks as [`read`], without reading it. The tool opens
/// the same file: every component on the way is root's, so nobody else can swap it.
///
/// A file that does not exist passes when the nearest existing directory above it is
/// root's: only root can create it there, and the tool reports it missing itself.
pub fn check(param: &'static str, path: &AbsPath) -> Result<(), RootReadError> {
    match open_checked(param, path, false) {
        Ok(_) => Ok(()),
        Err(RootReadError::Missing) => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`check`] of a recipe value that should be a path (`file://` allowed).
pub fn check_value(param: &'static str, raw: &str) -> Result<AbsPath, RootReadError> {
    let t = raw.trim();
    let t = t.strip_prefix("file://").unwrap_or(t);
    let path =
        AbsPath::parse(t).map_err(|e| RootReadError::Unsafe { param, path: t.to_string(), problem: e.to_string() })?;
    check(param, &path)?;
    Ok(path)
}

/// The content of `path`, read as described in the module documentation.
pub fn read(param: &'static str, path: &AbsPath) -> Result<Vec<u8>, RootReadError> {
    let (mut file, at) = open_checked(param, path, true)?;
    read_capped(&mut file).map_err(|source| RootReadError::Io { param, path: at, source })
}

fn open_checked(param: &'static str, path: &AbsPath, capped: bool) -> Result<(File, String), RootReadError> {
    let unsafe_ = |at: &Path, problem: String| RootReadError::Unsafe { param, path: at.display().to_string(), problem };
    let io = |at: &Path, source| RootReadError::Io { param, path: at.display().to_string(), source };
    let mut missing = false;
    for dir in path.as_path().ancestors().skip(1) {
        let m = match fs::symlink_metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !capped => {
                missing = true;
                continue;
            }
            Err(e) => return Err(io(dir, e)),
        };
        if !m.file_type().is_dir() {
            return Err(unsafe_(dir, "is not a directory (a link on the way is not followed)".into()));
        }
        if m.uid() != 0 || m.mode() & WRITABLE_BY_OTHERS != 0 {
            return Err(unsafe_(
                dir,
                format!(
                    "directory owned by uid {} with mode {:04o}: only root may control it",
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    let at = path.as_path();
    if missing {
        return Err(RootReadError::Missing);
    }
    // Read-only (`OpenOptions` only for O_NOFOLLOW/O_NONBLOCK, no write flag): the file
    // is checked on its descriptor once opened; nothing is written.
    #[allow(clippy::disallowed_methods)]
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(at)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ELOOP as i32 => {
                unsafe_(at, "is a symbolic link, which is not followed".into())
            }
            _ if e.kind() == std::io::ErrorKind::NotFound && !capped => RootReadError::Missing,
            _ => io(at, e),
        })?;
    let m = file.metadata().map_err(|e| io(at, e))?;
    if !m.file_type().is_file() {
        return Err(unsafe_(at, "is not a regular file".into()));
    }
    if m.uid() != 0 || m.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(unsafe_(
            at,
            format!("owned by uid {} with mode {:04o}: only a file root controls is read", m.uid(), m.mode() & 0o7777),
        ));
    }
    if capped && m.len() > MAX_READ {
        return Err(unsafe_(at, format!("{} bytes, more than the {MAX_READ} read", m.len())));
    }
    Ok((file, at.display().to_string()))
}

fn read_capped(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::new();
    file.take(MAX_READ + 1).read_to_end(&mut content)?;
    if content.len() as u64 > MAX_READ {
        return Err(std::io::Error::other(format!("grew past {MAX_READ} bytes while read")));
    }
    Ok(content)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A root-owned 0755 directory under `/` for the test (the temp dir is under the
    /// sticky, world-writable /tmp, which is refused by design).
    fn root_dir() -> tempfile::TempDir {
        let d = tempfile::Builder::new().prefix(".opsagent-root-read").tempdir_in("/").unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn abs(p: &Path) -> AbsPath {
        AbsPath::parse(&p.display().to_string()).unwrap()
    }

    #[test]
    fn reads_only_files_root_controls() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = root_dir();
        let good = d.path().join("selections");
        fs::write(&good, "x x/y string z\n").unwrap();
        fs::set_permissions(&good, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read("deb-conf-file", &abs(&good)).unwrap(), b"x x/y string z\n");

        // Owned by another user: refused, naming the parameter and the owner.
        let theirs = d.path().join("theirs");
        fs::write(&theirs, "x").unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = read("deb-conf-file", &abs(&theirs)).unwrap_err().to_string();
        assert!(err.contains("deb-conf-file") && err.contains("uid 65534"), "{err}");

        // Group-writable: refused.
        let gw = d.path().join("gw");
        fs::write(&gw, "x").unwrap();
        fs::set_permissions(&gw, fs::Permissions::from_mode(0o664)).unwrap();
        assert!(read("deb-conf-file", &abs(&gw)).unwrap_err().to_string().contains("0664"));

        // A link to a root-only file: not followed.
        let link = d.path().join("link");
        symlink(&good, &link).unwrap();
        let err = read("deb-conf-file", &abs(&link)).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        // A directory on the way that another user may write (sticky /tmp included).
        let open_dir = d.path().join("open");
        fs::create_dir(&open_dir).unwrap();
        fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(open_dir.join("f"), "x").unwrap();
        let err = read("deb-conf-file", &abs(&open_dir.join("f"))).unwrap_err().to_string();
        assert!(err.contains("only root may control it"), "{err}");
        let tmp = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        assert!(read("deb-conf-file", &abs(tmp.path())).is_err());

        // Not a regular file.
        assert!(read("deb-conf-file", &abs(d.path())).unwrap_err().to_string().contains("regular"));

        // `check`, for files handed to a root tool by path: the same rules without the
        // read; a missing file under root's directories passes (only root can make it).
        assert!(check("requirements-file", &abs(&good)).is_ok());
        assert!(check("config", &abs(&d.path().join("no/such/file"))).is_ok());
        let err = check("ssh-key-file", &abs(&theirs)).unwrap_err().to_string();
        assert!(err.starts_with("parameter ssh-key-file:") && err.contains("uid 65534"), "{err}");
        assert!(check("path", &abs(&link)).unwrap_err().to_string().contains("symbolic link"));
        assert!(check("config", &abs(&open_dir.join("missing"))).unwrap_err().to_string().contains("only root"));
    }
}
