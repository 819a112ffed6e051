//! One daemon per state directory.
//!
//! Two daemons on the same state directory would interleave rounds, sequence numbers and
//! spool writes. The first one holds an exclusive `flock` on `<state_dir>/daemon.lock`
//! for its whole life (the kernel drops it when the process ends, however it ends, so a
//! killed daemon never leaves a stale lock); a second one finds it held and refuses to
//! start, naming the holder's pid, which the holder wrote into the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg, OFlag};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state directory {dir} is in use by another opsagent daemon (pid {holder}); stop it first, or give this one another [agent] state_dir")]
    Held { dir: PathBuf, holder: String },
    #[error("lock file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Held for the daemon's life: dropping it releases the lock.
#[derive(Debug)]
pub struct StateDirLock {
    _lock: Flock<File>,
}

impl StateDirLock {
    pub const FILE_NAME: &'static str = "daemon.lock";

    /// Takes the lock without waiting, and records this process's pid in it.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(Self::FILE_NAME);
        let io = |source| LockError::Io { path: path.clone(), source };
        // Not following a link: the file is ours, in our own directory.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() || !holder.bytes().all(|b| b.is_ascii_digit()) {
                    "unknown".to_string()
                } else {
                    holder.to_string()
                };
                return Err(LockError::Held { dir: state_dir.to_path_buf(), holder });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io)?;
        lock.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_pid_and_the_lock_goes_with_the_first() {
        let d = tempfile::tempdir().unwrap();
        let first = StateDirLock::acquire(d.path()).unwrap();
        let err = StateDirLock::acquire(d.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        assert!(msg.contains(&d.path().display().to_string()), "{msg}");
        drop(first);
        let again = StateDirLock::acquire(d.path()).unwrap();
        let text = std::fs::read_to_string(d.path().join(StateDirLock::FILE_NAME)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(again);
    }

    #[test]
    fn a_link_in_place_of_the_lock_file_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(StateDirLock::FILE_NAME)).unwrap();
        let err = StateDirLock::acquire(d.path()).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
