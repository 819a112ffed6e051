//! `linux.mkfs`: a filesystem on a device.
//!
//! The device is probed first (`blkid -p`): when it already holds a filesystem of the
//! wanted type nothing is done (as in the original, which skipped when `blkid` showed
//! that TYPE); when it holds anything else (another filesystem, an LVM or RAID
//! signature, a partition table) the state fails and names what it found, never
//! overwriting it. Only a blank device is formatted: `mke2fs -F -t ext2|ext3|ext4`,
//! `mkfs.xfs -f`, or `mkfs.TYPE` for any other type (the state fails naming the
//! package when the host has no such tool), with the label when given (`-L`; `-n`
//! for FAT). The device is probed again afterwards.
//!
//! A `label` that differs on an existing filesystem is reported in the comment, not
//! changed (relabelling is not what the original did, and xfs cannot do it mounted).

use opsagent_proto::catalogue::LinuxMkfs;
use opsagent_proto::request::{Change, Outcome};

use super::{probe, require_tool, tool, BlockDevice, DeviceError, StorageToolError};
use crate::cancel::Cancel;
use crate::exec;

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tool(#[from] StorageToolError),
    #[error("parameter fstype: {0:?} is not a filesystem type (letters and digits, as in mkfs.TYPE)")]
    FsType(String),
    #[error("parameter label: {label:?} is longer than the {max} bytes {fstype} allows")]
    Label { label: String, fstype: String, max: usize },
    #[error(
        "refusing to create {fstype} on {device}: it holds {found}; linux.mkfs never overwrites \
         existing data (wipe the device first, e.g. `wipefs -a {device}`, if its content may be lost)"
    )]
    Occupied { device: String, fstype: String, found: String },
    #[error("{tool} ran, but {device} still shows {found}")]
    NotCreated { tool: String, device: String, found: String },
}

impl From<exec::ToolError> for MkfsError {
    fn from(e: exec::ToolError) -> Self {
        MkfsError::Tool(e.into())
    }
}

impl MkfsError {
    fn is_cancelled(&self) -> bool {
        matches!(self, MkfsError::Tool(e) if e.is_cancelled())
    }
}

/// The command that creates `fstype` on `device`: program name, package, arguments.
/// ext2/3/4 and xfs as before; any other type with `mkfs.TYPE` (as Salt's `fs` state
/// and the adaptor did), which must exist on the host. The device is blank by then,
/// so no force flag is needed for those.
pub fn command(fstype: &str, device: &str, label: Option<&str>) -> Result<(String, String, Vec<String>), MkfsError> {
    let label_args = |flag: &str| label.map(|l| vec![flag.to_string(), l.to_string()]).unwrap_or_default();
    let check_label = |max: usize| match label {
        Some(l) if l.len() > max => Err(MkfsError::Label { label: l.to_string(), fstype: fstype.to_string(), max }),
        _ => Ok(()),
    };
    if fstype.is_empty() || fstype.len() > 16 || !fstype.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(MkfsError::FsType(fstype.to_string()));
    }
    let (program, package, mut args) = match fstype {
        "ext2" | "ext3" | "ext4" => {
            check_label(16)?;
            ("mke2fs".to_string(), "e2fsprogs", vec!["-F".to_string(), "-t".into(), fstype.into()])
        }
        "xfs" => {
            check_label(12)?;
            ("mkfs.xfs".to_string(), "xfsprogs", vec!["-f".to_string()])
        }
        // FAT labels are set with -n, and are 11 bytes at most.
        "vfat" | "fat" | "msdos" => {
            check_label(11)?;
            let mut a = label_args("-n");
            a.push(device.to_string());
            return Ok((format!("mkfs.{fstype}"), "dosfstools".to_string(), a));
        }
        "btrfs" => ("mkfs.btrfs".to_string(), "btrfs-progs", Vec::new()),
        "f2fs" => ("mkfs.f2fs".to_string(), "f2fs-tools", Vec::new()),
        "exfat" => ("mkfs.exfat".to_string(), "exfatprogs", Vec::new()),
        // Quick: without -Q mkfs.ntfs first writes zeroes over the whole device.
        "ntfs" => ("mkfs.ntfs".to_string(), "ntfs-3g", vec!["-Q".to_string()]),
        other => (format!("mkfs.{other}"), "", Vec::new()),
    };
    args.extend(label_args("-L"));
    args.push(device.to_string());
    let package = if package.is_empty() { format!("the package that provides {program}") } else { package.to_string() };
    Ok((program, package, args))
}

/// The type `blkid` reports for a filesystem made as `fstype`.
pub fn probed_type(fstype: &str) -> &str {
    match fstype {
        "fat" | "msdos" => "vfat",
        other => other,
    }
}

pub async fn apply(p: &LinuxMkfs, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = run(p, &mut changes, &mut notes, &mut cancel).await;
    let cancelled = matches!(&result, Err(e) if e.is_cancelled());
    let mut outcome = crate::states::finish(&p.device.0, result, changes, &notes);
    outcome.cancelled = cancelled;
    outcome
}

async fn run(
    p: &LinuxMkfs,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    cancel: &mut Cancel,
) -> Result<(), MkfsError> {
    let fstype = p.fstype.trim().to_ascii_lowercase();
    let label = p.label.as_deref().map(str::trim).filter(|l| !l.is_empty());
    let device = BlockDevice::at(&p.device)?;
    let (program, package, args) = command(&fstype, &device.as_str(), label)?;
    let probed = probed_type(&fstype);
    let found = probe(device.path.as_path(), cancel).await?;
    if found.fstype.as_deref() == Some(probed) && !found.ambivalent {
        if let Some(want) = label {
            if found.label.as_deref() != Some(want) {
                notes.push(format!(
                    "its label is {:?}, not {want:?}; existing filesystems are not relabelled",
                    found.label.as_deref().unwrap_or("")
                ));
            }
        }
        return Ok(());
    }
    if !found.is_blank() {
        return Err(MkfsError::Occupied { device: device.as_str(), fstype, found: found.describe() });
    }
    let program_path = require_tool(&program, &package).map_err(StorageToolError::from)?;
    let planning = crate::plan::active();
    if !planning {
        exec::checked(&tool(&program_path, args), &[0], cancel).await?;
    }
    let after = if planning { None } else { Some(probe(device.path.as_path(), cancel).await?) };
    if let Some(after) = after.filter(|a| a.fstype.as_deref() != Some(probed)) {
        return Err(MkfsError::NotCreated { tool: program, device: device.as_str(), found: after.describe() });
    }
    let what = match label {
        Some(l) => format!("{fstype} filesystem created (label {l})"),
        None => format!("{fstype} filesystem created"),
    };
    changes.push(Change::new(device.as_str(), what));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_render_per_filesystem() {
        let (prog, pkg, args) = command("ext4", "/dev/xvdf", Some("data")).unwrap();
        assert_eq!((prog.as_str(), pkg.as_str()), ("mke2fs", "e2fsprogs"));
        assert_eq!(args, ["-F", "-t", "ext4", "-L", "data", "/dev/xvdf"]);
        let (prog, _, args) = command("xfs", "/dev/xvdf", None).unwrap();
        assert_eq!((prog.as_str(), args.as_slice()), ("mkfs.xfs", ["-f".to_string(), "/dev/xvdf".into()].as_slice()));
        let err = command("xfs", "/dev/x", Some("thirteen-char")).unwrap_err();
        assert_eq!(err.to_string(), "parameter label: \"thirteen-char\" is longer than the 12 bytes xfs allows");
        // Any other type through mkfs.TYPE, as the adaptor did.
        let (prog, pkg, args) = command("btrfs", "/dev/x", Some("data")).unwrap();
        assert_eq!(
            (prog.as_str(), pkg.as_str(), args.join(" ")),
            ("mkfs.btrfs", "btrfs-progs", "-L data /dev/x".into())
        );
        let (prog, _, args) = command("vfat", "/dev/x", Some("BOOT")).unwrap();
        assert_eq!((prog.as_str(), args.join(" ")), ("mkfs.vfat", "-n BOOT /dev/x".into()));
        let (prog, pkg, _) = command("jfs", "/dev/x", None).unwrap();
        assert_eq!((prog.as_str(), pkg.as_str()), ("mkfs.jfs", "the package that provides mkfs.jfs"));
        assert_eq!(probed_type("msdos"), "vfat");
        for bad in ["", "ext4 -O x", "../x", "Ext4"] {
            assert!(matches!(command(bad, "/dev/x", None), Err(MkfsError::FsType(_))), "{bad}");
        }
        crate::states::testutil::refused(
            "linux.mkfs",
            serde_json::json!({"device": "/dev/x", "fstype": "-x"}),
            "fstype",
        );
    }
}
