//! The private root helper `opsagent apply` starts when run as root: its own socket in a
//! 0700 directory, handed over the way systemd socket activation does, stopped (SIGTERM,
//! then SIGKILL if it lingers) and cleaned up when dropped.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Child;

/// A helper started by `opsagent apply` on a private socket, stopped when dropped.
pub struct PrivateHelper {
    child: Child,
    dir: PathBuf,
}

impl PrivateHelper {
    /// Binds the socket here and hands the listening descriptor to the helper the way
    /// systemd socket activation does (`LISTEN_FDS`), so the socket accepts connections
    /// before the helper has even started: no waiting for a file to appear, and the
    /// caller can do its own start-up (parsing the recipe) while the helper does its.
    pub fn start(bin: &Path) -> anyhow::Result<(Self, PathBuf)> {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixListener;

        use nix::fcntl::{fcntl, FcntlArg, FdFlag};

        let dir = std::env::temp_dir().join(format!("opsagent-apply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // 0700 and root's: nobody else can reach the socket inside, whatever its mode.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let socket = dir.join("helper.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| anyhow::anyhow!("cannot bind the helper's socket {}: {e}", socket.display()))?;
        // A duplicate without close-on-exec is what the helper inherits; ours (and the
        // duplicate) are closed once it runs, so that the helper holds the only listening
        // descriptor and a helper that dies at start resets our connection instead of
        // leaving it waiting in the backlog.
        let inherited = listener.try_clone()?;
        fcntl(inherited.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
        let mut cmd = std::process::Command::new(bin);
        // Root asked for this apply and is the only one who can reach this helper (its
        // socket is in a 0700 root directory), so it keeps root's storage capabilities:
        // without systemd as PID 1, mount(8), lvm2 and mdadm need CAP_SYS_ADMIN and
        // CAP_MKNOD, which the system helper keeps only with its opt-in drop-in.
        cmd.arg("--storage");
        // Local use by root needs no signature (root is already root): the private
        // helper ignores a recipe_key in /etc/opsagent.conf. `--helper-socket` against
        // the system helper follows that helper's rule instead.
        cmd.arg("--no-recipe-key");
        // Only root can reach it (above), so root is all it allows. Left to its default
        // it would look the agent user up, and on a host without one (where
        // `opsagent apply` is often used) glibc then asks every NSS source: systemd's
        // user database loaded and searched, ~120 system calls per apply.
        cmd.args(["--allow-user", "root"]);
        cmd.stdin(std::process::Stdio::null())
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDS_FIRST_FD", inherited.as_raw_fd().to_string())
            // Unset LISTEN_PID is accepted as "for this process" (we cannot know the
            // child's pid before it exists); an inherited one would name another process.
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        // The per-request log lines of a private helper would drown the result lines.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "error");
        }
        let spawned = cmd.spawn();
        drop(inherited);
        drop(listener);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::bail!("cannot start the helper {}: {e}", bin.display());
            }
        };
        Ok((Self { child, dir }, socket))
    }

    /// How the helper ended, if it has (it only ends early when it cannot start).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// How long a private helper gets to exit after SIGTERM (it flushes the files its states
/// wrote to disk first: one `syncfs` per file system) before it is killed.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for PrivateHelper {
    // Drop cannot await: a bounded wait with the wall clock, once the apply is over.
    #[allow(clippy::disallowed_methods)]
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the helper's exit flushes what its file states wrote
        // (opsagent-helper's durable.rs), so the apply ends with its changes on disk.
        let asked = i32::try_from(self.child.id()).ok().is_some_and(|pid| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).is_ok()
        });
        if asked {
            wait_exit(&mut self.child, EXIT_GRACE);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `child` has exited or `grace` has passed, whichever comes first, without
/// reaping it. Woken by the child's exit through a pidfd: a sleep-and-retry loop here
/// added up to its whole period (2 ms) to every `opsagent apply`. Kernels without
/// `pidfd_open` (before 5.3) get that loop.
#[allow(clippy::disallowed_methods)] // a bounded wait in Drop, with the wall clock
fn wait_exit(child: &mut Child, grace: std::time::Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};

    let deadline = std::time::Instant::now() + grace;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    if let Ok(pidfd) = pidfd_open(Pid::from_child(child), PidfdFlags::empty()) {
        while let Ok(timeout) = Timespec::try_from(left()) {
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                // Readable: the child has exited. Zero: the grace is over.
                Ok(_) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
    }
    while !left().is_zero() {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(2)),
            _ => return,
        }
    }
}

/// The helper binary: given, or `opsagent-helper` next to this binary.
pub fn helper_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("opsagent-helper");
    if !bin.exists() {
        anyhow::bail!(
            "{} not found; build it (cargo build --workspace) or pass --helper-bin / OPSAGENT_HELPER_BIN",
            bin.display()
        );
    }
    Ok(bin)
}
