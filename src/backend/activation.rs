//! The listening socket systemd hands over (socket activation, `sd_listen_fds(3)`):
//! `LISTEN_FDS=1` and the socket at fd 3 (`LISTEN_FDS_FIRST_FD` moves it, the
//! convention of `listenfd`/`systemfd`), for this process only when `LISTEN_PID` says
//! so. The socket outlives every backend process that serves it: a restarted backend
//! never has to bind its port again, and connections made while no backend runs wait in
//! the socket's backlog instead of being refused.

use std::net::TcpListener;

use nix::sys::socket::{getsockopt, sockopt};

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    BadCount(String),
    #[error("LISTEN_FDS={0}: one listening socket is expected, the backend serves one address")]
    Count(usize),
    #[error("LISTEN_PID={listen_pid:?} names another process (this is {pid}): the socket is not for us")]
    OtherProcess { listen_pid: String, pid: u32 },
    #[error("inherited fd {fd} is not a TCP socket: {source}")]
    NotTcp { fd: i32, source: std::io::Error },
    #[error("inherited fd {fd} is a TCP socket that is not listening (ListenStream= in the .socket unit)")]
    NotListening { fd: i32 },
    #[error("inherited fd {fd}: cannot {op}: {source}")]
    Io { fd: i32, op: &'static str, source: std::io::Error },
}

/// The environment variables that describe the handed-over sockets.
#[derive(Debug, Clone, Default)]
pub struct ActivationEnv {
    pub listen_fds: Option<String>,
    pub listen_pid: Option<String>,
    pub first_fd: Option<String>,
}

impl ActivationEnv {
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok();
        Self { listen_fds: var("LISTEN_FDS"), listen_pid: var("LISTEN_PID"), first_fd: var("LISTEN_FDS_FIRST_FD") }
    }

    /// Whether a socket was handed over at all and is meant for the process `pid`.
    /// `None`: nothing handed over (bind `--listen` as usual). An unset or empty
    /// `LISTEN_PID` counts as "this process": a parent cannot know its child's pid
    /// before the child exists, and `listenfd` accepts the same.
    fn first_fd(&self, pid: u32) -> Result<Option<i32>, ActivationError> {
        let Some(count) = self.listen_fds.as_deref() else { return Ok(None) };
        let count: usize = count.trim().parse().map_err(|_| ActivationError::BadCount(count.to_string()))?;
        if let Some(listen_pid) = self.listen_pid.as_deref().filter(|p| !p.is_empty()) {
            if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
                return Err(ActivationError::OtherProcess { listen_pid: listen_pid.to_string(), pid });
            }
        }
        match count {
            0 => Ok(None),
            1 => Ok(Some(self.first_fd.as_deref().and_then(|f| f.parse().ok()).unwrap_or(3))),
            n => Err(ActivationError::Count(n)),
        }
    }
}

/// The listening TCP socket handed to this process, if any. Call it before any other
/// thread starts: it takes the descriptor over (close-on-exec from then on) and
/// `listenfd` removes `LISTEN_FDS`/`LISTEN_PID`, so that nothing this process starts
/// believes the socket is its own.
pub fn inherited_listener() -> Result<Option<TcpListener>, ActivationError> {
    let env = ActivationEnv::from_process();
    let Some(fd) = env.first_fd(std::process::id())? else { return Ok(None) };
    // listenfd checks that the descriptor is an AF_INET/AF_INET6 stream socket and
    // takes it over; its own LISTEN_PID rule is the one above, already applied.
    let listener = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .map_err(|source| ActivationError::NotTcp { fd, source })?
        .ok_or_else(|| ActivationError::NotTcp {
            fd,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not handed over"),
        })?;
    // A connected or merely bound TCP socket passes the checks above; accept(2) on it
    // would fail with EINVAL on every connection, so it is refused here, by name.
    let listening = getsockopt(&listener, sockopt::AcceptConn).map_err(|e| ActivationError::Io {
        fd,
        op: "read SO_ACCEPTCONN",
        source: e.into(),
    })?;
    if !listening {
        return Err(ActivationError::NotListening { fd });
    }
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(fds: Option<&str>, pid: Option<&str>, first: Option<&str>) -> ActivationEnv {
        ActivationEnv {
            listen_fds: fds.map(str::to_string),
            listen_pid: pid.map(str::to_string),
            first_fd: first.map(str::to_string),
        }
    }

    #[test]
    fn nothing_handed_over_means_bind_as_usual() {
        assert!(env(None, None, None).first_fd(42).unwrap().is_none());
        assert!(env(Some("0"), Some("42"), None).first_fd(42).unwrap().is_none());
    }

    #[test]
    fn the_socket_is_fd_3_unless_moved_and_only_for_the_named_process() {
        assert_eq!(env(Some("1"), Some("42"), None).first_fd(42).unwrap(), Some(3));
        assert_eq!(env(Some("1"), None, Some("7")).first_fd(42).unwrap(), Some(7));
        assert_eq!(env(Some("1"), Some(""), None).first_fd(42).unwrap(), Some(3));
        let e = env(Some("1"), Some("41"), None).first_fd(42).unwrap_err();
        assert!(matches!(e, ActivationError::OtherProcess { .. }), "{e}");
        assert!(e.to_string().contains("LISTEN_PID=\"41\"") && e.to_string().contains("42"), "{e}");
    }

    #[test]
    fn several_sockets_or_garbage_are_refused() {
        assert!(matches!(env(Some("2"), None, None).first_fd(42), Err(ActivationError::Count(2))));
        assert!(matches!(env(Some("x"), None, None).first_fd(42), Err(ActivationError::BadCount(_))));
    }
}
