//! Where the listening socket comes from: systemd socket activation (the packaged way:
//! systemd creates it with the right owner and mode before we start), or our own bind.
//!
//! The file's permissions are the first gate (only root and the socket's group can
//! connect); the SO_PEERCRED check in the server is the second.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use nix::unistd::Gid;

pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "no socket to listen on: pass --socket PATH, or start the helper through its \
         .socket unit (systemd socket activation)"
    )]
    NotActivated,
    #[error("cannot take the socket passed by systemd: {0}")]
    Activation(io::Error),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io { path, op, source }
}

/// The socket systemd passed as fd 3 (`LISTEN_FDS`/`LISTEN_PID`).
pub fn from_systemd() -> Result<UnixListener, SocketError> {
    let listener = listenfd::ListenFd::from_env()
        .take_unix_listener(0)
        .map_err(SocketError::Activation)?
        .ok_or(SocketError::NotActivated)?;
    listener.set_nonblocking(true).map_err(SocketError::Activation)?;
    Ok(listener)
}

/// Binds `path` as root:`group`, mode 0660. A stale socket from an earlier run is
/// replaced; anything else at that path is left alone and reported.
///
/// The socket is bound and listening under a temporary name next to `path`, owner and
/// mode set, and only then renamed onto `path`: a client that sees the file can connect
/// (binding in place leaves a moment where the file exists but nobody listens, and a
/// client polling for the file gets "connection refused").
// The path is root's own `--socket` argument (the packaged helper is socket-activated
// and binds nothing), in a directory root chose; a socket can only be bound by name.
#[allow(clippy::disallowed_methods)]
pub fn bind(path: &Path, group: Gid) -> Result<UnixListener, SocketError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "inspect")(e)),
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    remove_if_socket(&tmp);
    // Nobody but root can connect before chown/chmod. umask is process-wide, which is
    // why this runs before the runtime starts any thread.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(&tmp);
    umask(old);
    let listener = bound.map_err(io_err(&tmp, "bind"))?;
    let placed = (|| {
        std::os::unix::fs::chown(&tmp, Some(0), Some(group.as_raw())).map_err(io_err(&tmp, "chown"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE)).map_err(io_err(&tmp, "chmod"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "move the bound socket to"))
    })();
    if let Err(e) = placed {
        remove_if_socket(&tmp);
        return Err(e);
    }
    listener.set_nonblocking(true).map_err(io_err(path, "set non-blocking"))?;
    Ok(listener)
}

/// Removes our socket file at shutdown, if it is still a socket.
// The path is root's own `--socket` argument (the packaged helper is socket-activated
// and binds nothing), in a directory root chose; a socket can only be bound by name.
#[allow(clippy::disallowed_methods)]
pub fn remove_if_socket(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn bind_replaces_a_stale_socket_and_sets_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        drop(bind(&path, Gid::from_raw(65534)).unwrap());
        // The first listener is gone; its file is stale and gets replaced.
        let _l = bind(&path, Gid::from_raw(65534)).unwrap();
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 65534, 0o660));
        // Listening as soon as the file is there, and no temporary name left behind.
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bind_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        fs::write(&path, "keep me").unwrap();
        assert!(matches!(bind(&path, Gid::from_raw(0)), Err(SocketError::NotASocket(_))));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }
}
