//! What the helper does to itself before serving, while it is still one thread
//! (capability sets are per thread; threads made later inherit the reduced sets):
//!
//! - no core dumps (`RLIMIT_CORE` 0, and not dumpable: a crash must not write root's
//!   memory, with whatever secrets a request carried, to disk, and other processes
//!   of the same uid cannot ptrace it);
//! - every capability that no state action needs is dropped from the bounding set, so
//!   neither the helper nor anything it runs can ever hold it again; the effective and
//!   permitted sets are cut to [`KEEP`], the inheritable and ambient sets emptied.
//!
//! Which set: where commands run as transient units (systemd is PID 1),
//! [`KEEP_WITH_UNITS`], which matches `CapabilityBoundingSet=` of
//! `units/opsagent-helper.service` (where each one is explained); under that unit there
//! is nothing left to drop. Where commands are the helper's children (no systemd: cron
//! hosts, `opsagent apply` there) they inherit its bounding set, so it keeps [`KEEP`]
//! and [`STORAGE`] (what the storage, hostname and mount commands need).
//!
//! `PR_SET_NO_NEW_PRIVS` is deliberately not set (see the unit file: recipes run
//! setuid programs as other users). The environment is not scrubbed here but for
//! every command (see [`crate::exec`]): commands get a fixed environment, never the
//! helper's own.

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};

/// The capabilities the helper keeps.
pub const KEEP: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_KILL,
    Capability::CAP_SETFCAP,
];

/// What the helper keeps where its commands run as transient units of their own
/// (systemd is PID 1, see [`crate::transient`]): the file states' capabilities only.
/// Running a command as another user, killing it, and whatever the command needs
/// (CAP_SYS_ADMIN for mkfs/lvm/mdadm/mount/hostname…) belong to systemd and the
/// command's own unit, not to this process: it never holds CAP_SYS_ADMIN.
pub const KEEP_WITH_UNITS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
];

/// Kept in addition where commands are the helper's children: what lvm2 and mdadm
/// need beyond access to the device nodes (and hostname, mount, sysctl). CAP_SYS_ADMIN: the device-mapper ioctls (`/dev/mapper/control`,
/// lvcreate), the md ioctls (mdadm --create/--assemble), re-reading partition tables
/// (BLKRRPART). CAP_MKNOD: libdevmapper and mdadm make their device nodes themselves
/// where udev does not (containers, early boot). Mounting needs neither: systemd mounts.
pub const STORAGE: &[Capability] = &[Capability::CAP_SYS_ADMIN, Capability::CAP_MKNOD];

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("cannot disable core dumps: {0}")]
    Core(nix::Error),
    #[error("cannot read the capability sets: {0}")]
    Read(caps::errors::CapsError),
    #[error("cannot drop {cap} from the bounding set (is CAP_SETPCAP missing?): {source}")]
    Bounding { cap: Capability, source: caps::errors::CapsError },
    #[error("cannot reduce the {set} capability set: {source}")]
    Set { set: &'static str, source: caps::errors::CapsError },
}

/// What is left after [`apply`], for the start-up log line.
#[derive(Debug, Clone)]
pub struct Kept {
    pub bounding: Vec<String>,
    pub dropped: usize,
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// Applies everything above to the calling (only) thread; `storage`: keep [`STORAGE`].
pub fn apply(storage: bool) -> Result<Kept, HardenError> {
    apply_set(&kept_set(storage))
}

/// Applies everything above, keeping exactly `keep` (see [`KEEP_WITH_UNITS`]).
pub fn apply_set(keep: &CapsHashSet) -> Result<Kept, HardenError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(HardenError::Core)?;
    nix::sys::prctl::set_dumpable(false).map_err(HardenError::Core)?;

    let bounding = caps::read(None, CapSet::Bounding).map_err(HardenError::Read)?;
    let mut dropped = 0;
    // Bounding first: dropping from it needs CAP_SETPCAP in the effective set, which
    // goes away with the effective set below.
    for cap in bounding.difference(keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(|source| HardenError::Bounding { cap: *cap, source })?;
        dropped += 1;
    }
    let permitted = caps::read(None, CapSet::Permitted).map_err(HardenError::Read)?;
    let kept: CapsHashSet = permitted.intersection(keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(|source| HardenError::Set { set: "effective", source })?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|source| HardenError::Set { set: "permitted", source })?;
    caps::clear(None, CapSet::Inheritable).map_err(|source| HardenError::Set { set: "inheritable", source })?;
    caps::clear(None, CapSet::Ambient).map_err(|source| HardenError::Set { set: "ambient", source })?;
    let bounding = caps::read(None, CapSet::Bounding).map_err(HardenError::Read)?;
    Ok(Kept { bounding: names(&bounding), dropped })
}

/// [`KEEP`], and [`STORAGE`] when asked for.
pub fn kept_set(storage: bool) -> CapsHashSet {
    let extra: &[Capability] = if storage { STORAGE } else { &[] };
    KEEP.iter().chain(extra).copied().collect()
}
