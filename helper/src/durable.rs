//! When what `linux.file` wrote reaches the disk: one `syncfs` per burst of writes
//! instead of two `fsync`s per file.
//!
//! A file state writes the new content to a temporary file beside the target, gives it
//! its owner and mode, and renames it over the target: readers see the old file or the
//! new one, never a mix. It no longer `fsync`s the file and its directory before
//! answering; instead it notes the file system it wrote ([`Pending::note`]), and every
//! file system noted is flushed with one `syncfs(2)` once the writes have been quiet
//! for [`QUIET`], or at the latest [`MAX_AGE`] after the oldest unflushed write, and
//! whenever the helper exits (idle exit, SIGTERM). A burst of 1,000 writes costs one
//! flush, not 2,000.
//!
//! What a power cut can take (stated in the README, "Durability of file states"): the
//! writes of the last [`MAX_AGE`] at most. On ext4 with its defaults (`data=ordered`,
//! `auto_da_alloc`) a file renamed over an existing one has its data written before the
//! rename commits, so each such file holds its old or its new content whole; a file that
//! did not exist before, or any file on a file system without that rule, may be missing
//! or empty. Nothing the helper keeps says a file is converged: the next round compares
//! the file's content, owner and mode with the recipe and writes it again. The one record
//! that does describe file contents, the `watch` checksums ([`crate::checksums`]), is
//! written only after [`Pending::flush`]: a checksum is never on disk before the content
//! it is the checksum of.
//!
//! A write-back error found by a flush (`EIO`, `ENOSPC` of a thin device) cannot be told
//! to the state that wrote, which has answered already: it is logged, naming the file
//! system.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dirfd::{Dir, WalkError};

/// Flush once no file has been written for this long.
pub const QUIET: Duration = Duration::from_millis(500);
/// Flush at the latest this long after the oldest write not yet flushed, even while
/// writes go on.
pub const MAX_AGE: Duration = Duration::from_secs(5);

/// File systems written since the last flush.
pub struct Pending {
    inner: Mutex<Inner>,
    /// Held for the whole of a flush: a flush that finds nothing left to take still
    /// returns only once the one under way has synced what it took.
    flushing: Mutex<()>,
    wake: Notify,
    sync: fn(BorrowedFd<'_>) -> io::Result<()>,
    /// `syncfs` calls made (for tests and the log).
    syncs: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// One open directory per file system (by device number) written since the last
    /// flush: `syncfs` of any descriptor flushes its whole file system.
    dirs: BTreeMap<u64, Dir>,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

impl Pending {
    /// Flushing with `sync` (`syncfs` on the host, a counter in tests).
    pub fn new(sync: fn(BorrowedFd<'_>) -> io::Result<()>) -> Self {
        Pending {
            inner: Mutex::new(Inner::default()),
            flushing: Mutex::new(()),
            wake: Notify::new(),
            sync,
            syncs: AtomicU64::new(0),
        }
    }

    /// The helper's: every file state notes its writes here; the server flushes it
    /// ([`run`]) and so does the helper's exit.
    pub fn host() -> &'static Arc<Pending> {
        static HOST: OnceLock<Arc<Pending>> = OnceLock::new();
        HOST.get_or_init(|| Arc::new(Pending::new(syncfs)))
    }

    /// Notes that a file was just written (renamed into place) in `dir`. Without a
    /// descriptor to keep for its file system (out of descriptors), the file system is
    /// flushed at once.
    pub fn note(&self, dir: &Dir) -> Result<(), WalkError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let dev = dir.dev()?;
        if let std::collections::btree_map::Entry::Vacant(slot) = inner.dirs.entry(dev) {
            match dir.try_clone() {
                Ok(kept) => drop(slot.insert(kept)),
                Err(_) => {
                    drop(inner);
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    return (self.sync)(dir.as_fd()).map_err(|source| WalkError::Io {
                        path: dir.path().to_path_buf(),
                        op: "flush",
                        source,
                    });
                }
            }
        }
        let was_idle = inner.first.is_none();
        inner.first.get_or_insert(now);
        inner.last = Some(now);
        drop(inner);
        if was_idle {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// When the pending writes are due to be flushed; `None`: nothing pending.
    pub fn due(&self) -> Option<Instant> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (first, last) = (inner.first?, inner.last?);
        Some((last + QUIET).min(first + MAX_AGE))
    }

    /// `syncfs` of every file system written since the last flush; returns once they
    /// are on disk (or failed: logged). Also waits for a flush under way elsewhere.
    pub fn flush(&self) {
        let _flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        let dirs = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.first = None;
            inner.last = None;
            std::mem::take(&mut inner.dirs)
        };
        for dir in dirs.values() {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = (self.sync)(dir.as_fd()) {
                tracing::warn!(
                    filesystem_of = %dir.path().display(),
                    error = %e,
                    "cannot flush the files written there to disk; their content on disk is unknown"
                );
            }
        }
    }

    /// `syncfs` calls made so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// Flushes `pending` whenever it is due ([`QUIET`], [`MAX_AGE`]), for as long as the
/// helper serves (the server spawns it; the helper's exit flushes what is left).
pub async fn run(pending: Arc<Pending>) {
    loop {
        match pending.due() {
            None => pending.wake.notified().await,
            Some(at) if at > Instant::now() => tokio::time::sleep_until(at).await,
            Some(_) => {
                let p = Arc::clone(&pending);
                // On the blocking pool: a flush waits for the disk.
                if tokio::task::spawn_blocking(move || p.flush()).await.is_err() {
                    pending.flush();
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::path::Path;

    fn fake(_: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }

    /// Lets the flusher task run (and a flush on the blocking pool finish).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_writes_is_flushed_once_when_quiet_and_not_before() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let pending = Arc::new(Pending::new(fake));
        let task = tokio::spawn(run(Arc::clone(&pending)));
        settle().await;
        // 1,000 writes, 1 ms apart: never quiet for QUIET, shorter than MAX_AGE.
        for _ in 0..1000 {
            pending.note(&dir).unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        settle().await;
        assert_eq!(pending.syncs(), 0, "nothing flushed while writes go on");
        tokio::time::advance(QUIET).await;
        settle().await;
        assert_eq!(pending.syncs(), 1, "one flush for the burst");
        assert_eq!(pending.due(), None);
        // Nothing written since: no more flushes.
        tokio::time::advance(MAX_AGE * 2).await;
        settle().await;
        assert_eq!(pending.syncs(), 1);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_never_pause_are_flushed_every_max_age() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let pending = Arc::new(Pending::new(fake));
        let task = tokio::spawn(run(Arc::clone(&pending)));
        settle().await;
        let step = QUIET / 2;
        let mut elapsed = Duration::ZERO;
        while elapsed < MAX_AGE - step {
            pending.note(&dir).unwrap();
            tokio::time::advance(step).await;
            elapsed += step;
        }
        settle().await;
        assert_eq!(pending.syncs(), 0);
        pending.note(&dir).unwrap();
        tokio::time::advance(step).await;
        settle().await;
        assert_eq!(pending.syncs(), 1, "flushed at MAX_AGE although the writes went on");
        task.abort();
    }

    #[test]
    fn one_flush_per_file_system_written() {
        let tmp = tempfile::tempdir().unwrap();
        let pending = Pending::new(fake);
        for sub in ["a", "b", "c"] {
            std::fs::create_dir(tmp.path().join(sub)).unwrap();
            pending.note(&Dir::open(&tmp.path().join(sub)).unwrap()).unwrap();
        }
        // /proc is another file system.
        pending.note(&Dir::open(Path::new("/proc")).unwrap()).unwrap();
        pending.flush();
        assert_eq!(pending.syncs(), 2);
        pending.flush();
        assert_eq!(pending.syncs(), 2, "nothing left to flush");
    }
}
