//! The identity of one version of a file, for caches of what was read from it (the account
//! databases, dpkg's status file, rpm's database files): device, inode, size, and the
//! nanosecond modification and change times. A rename over the file gives a new inode; a
//! rewrite in place changes the size or the times. The change time cannot be set back by
//! any program (only the clock can), which is why it is part of the key.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The change time as a wall-clock instant.
    pub fn ctime(&self) -> SystemTime {
        let (s, ns) = self.ctime;
        let whole = Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(ns.unsigned_abs());
        if s >= 0 {
            SystemTime::UNIX_EPOCH + whole
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(whole).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }
}
