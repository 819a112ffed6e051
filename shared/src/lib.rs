#![forbid(unsafe_code)]
//! What the opsagent daemon and its root programs (the helper, the upgrade installer)
//! share that is not the daemon <-> helper contract (that is `opsagent-proto`): plain
//! code both sides would otherwise write twice, and the files of the upgrade hand-off,
//! which pass through the file system, never through the helper's socket.
//!
//! - [`ini`]: the INI dialect of `/etc/opsagent.conf`, read by the daemon and by the
//!   root upgrade installer (which trusts only that root-owned file for the signing key).
//! - [`upgrade`]: the files through which the daemon hands a downloaded release to the
//!   root installer and learns how the upgrade went.
//! - [`timer`]: optional deadlines for `select!` loops.

pub mod ini;
pub mod timer;
pub mod upgrade;
