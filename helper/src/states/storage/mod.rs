//! Storage states: `linux.mkfs`, `linux.mount`, `linux.lvm.pv`/`vg`/`lv` and
//! `linux.raid`, all driven through the standard tools (util-linux, e2fsprogs,
//! xfsprogs, lvm2, mdadm) run by [`crate::exec`].
//!
//! The rule they share: a state never destroys data it was not told to. Before a tool
//! writes to a device, the device is probed with `blkid -p` (the low-level probe, not
//! blkid's cache); a device that holds a filesystem, a partition table or another
//! signature the state did not ask for is refused with a message naming what was found
//! (only `linux.lvm.pv` has a `force`, and `linux.raid` takes `force` in `arguments`).
//!
//! Tools are looked up on the helper's fixed search path first, so that a missing one
//! fails with the package to install rather than with "No such file or directory".
//!
//! The tools (mkfs, lvm, mdadm, blkid) run as transient units of their own with the
//! full capability of root (see crate::transient); the helper itself only looks at
//! device nodes, which the shipped unit shows it (`PrivateDevices=no`,
//! `DevicePolicy=closed`). Where a unit change hides them anyway, a missing device
//! fails with [`HIDDEN_HINT`] rather than with "does not exist".

pub mod lvm;
pub mod mkfs;
pub mod mount;
pub mod raid;

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use opsagent_proto::newtypes::{AbsPath, InvalidValue};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit, ToolError, BASE_PATH};

/// A tool a state needs is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tool} is not installed; install it with a package state first ({hint})")]
pub struct MissingTool {
    pub tool: String,
    /// Which package provides it.
    pub hint: String,
}

/// `name` on the helper's search path (then on `extra_dirs`), if it is an executable
/// regular file there.
pub fn find_tool(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    BASE_PATH.split(':').chain(extra_dirs.iter().copied()).map(|d| Path::new(d).join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// [`find_tool`], or the error that says which package to install.
pub fn require_tool(name: &str, package: &str) -> Result<PathBuf, MissingTool> {
    find_tool(name, &[]).ok_or_else(|| MissingTool {
        tool: name.to_string(),
        hint: format!("Debian/Ubuntu and RHEL package {package}"),
    })
}

/// A storage tool run as root, with the tool environment. LVM complains about every
/// descriptor it inherits; the helper's are close-on-exec, but not necessarily those of
/// whatever started it.
pub fn tool(program: &Path, args: Vec<String>) -> CommandSpec {
    CommandSpec::tool(&program.to_string_lossy(), args).with_env("LVM_SUPPRESS_FD_WARNINGS", "1")
}

/// Why a device the state names is not there, when the helper cannot see any.
pub const HIDDEN_HINT: &str = "block devices are hidden from the helper (PrivateDevices=yes); the shipped \
                               opsagent-helper.service sees the host's /dev (DevicePolicy=closed): remove the \
                               drop-in or unit change that hides it";

/// Whether `dev` holds no block device node at all: on any real host `/dev` has a disk
/// or a loop device, so none means a private `/dev` (the unit's `PrivateDevices=yes`).
/// A directory that cannot be read is not taken as proof.
pub fn no_block_devices(dev: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dev) else { return false };
    !entries.flatten().any(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
}

/// [`no_block_devices`] of the helper's own `/dev`.
pub fn block_devices_hidden() -> bool {
    no_block_devices(Path::new("/dev"))
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error("device {0} does not exist")]
    Missing(String),
    #[error("device {0} is not visible: {HIDDEN_HINT}")]
    Hidden(String),
    #[error("device {path} is {found}, not a block device")]
    NotBlock { path: String, found: &'static str },
    #[error("cannot inspect device {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// A block device given by path: validated, existing (links such as
/// `/dev/disk/by-id/…` are followed), and its device number.
#[derive(Debug, Clone)]
pub struct BlockDevice {
    pub path: AbsPath,
    pub rdev: u64,
}

impl BlockDevice {
    /// A device named by text (the unit tests').
    #[cfg(test)]
    pub fn open(param: &'static str, raw: &str) -> Result<Self, DeviceError> {
        let path = AbsPath::parse(raw.trim()).map_err(|source| DeviceError::Path { param, source })?;
        Self::at(&path)
    }

    /// The device at `path` (a parameter the catalogue's decode validated).
    pub fn at(path: &AbsPath) -> Result<Self, DeviceError> {
        let path = path.clone();
        let meta = match fs::metadata(path.as_path()) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && block_devices_hidden() => {
                return Err(DeviceError::Hidden(path.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DeviceError::Missing(path.to_string())),
            Err(source) => return Err(DeviceError::Io { path: path.to_string(), source }),
        };
        if !meta.file_type().is_block_device() {
            return Err(DeviceError::NotBlock {
                path: path.to_string(),
                found: crate::fsutil::kind_of(meta.file_type()),
            });
        }
        Ok(Self { path, rdev: meta.rdev() })
    }

    pub fn as_str(&self) -> String {
        self.path.to_string()
    }

    /// Whether `other` (a path as a tool printed it) names this device.
    pub fn is(&self, other: &str) -> bool {
        let other = other.trim();
        if other.is_empty() {
            return false;
        }
        Path::new(other) == self.path.as_path()
            || fs::metadata(other).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == self.rdev)
    }
}

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `TYPE`: a filesystem (`ext4`, `xfs`), `swap`, `LVM2_member`, `linux_raid_member`…
    pub fstype: Option<String>,
    /// `PTTYPE`: a partition table (`dos`, `gpt`).
    pub pttype: Option<String>,
    pub label: Option<String>,
    /// blkid found several signatures that contradict each other (exit status 8).
    pub ambivalent: bool,
}

impl Probe {
    pub fn is_blank(&self) -> bool {
        self.fstype.is_none() && self.pttype.is_none() && !self.ambivalent
    }

    /// What the device holds, for messages ("an xfs filesystem").
    pub fn describe(&self) -> String {
        if self.ambivalent {
            return "several conflicting signatures (blkid -p reports an ambivalent result)".into();
        }
        match (&self.fstype, &self.pttype) {
            (Some(t), _) if t == "LVM2_member" => "an LVM physical volume (LVM2_member)".into(),
            (Some(t), _) if t == "linux_raid_member" => "an mdadm RAID member (linux_raid_member)".into(),
            (Some(t), _) if t == "swap" => "swap space".into(),
            (Some(t), _) => format!("{} {t} filesystem", article(t)),
            (None, Some(pt)) => format!("a {pt} partition table"),
            (None, None) => "nothing".into(),
        }
    }

    /// Parses `blkid -p -o export` output (`KEY=value` lines, blanks escaped with `\`).
    pub fn parse_export(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = unescape_blkid(value.trim_end());
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "TYPE" => out.fstype = Some(value),
                "PTTYPE" => out.pttype = Some(value),
                "LABEL" => out.label = Some(value),
                _ => {}
            }
        }
        out
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) {
        "an"
    } else {
        "a"
    }
}

fn unescape_blkid(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Probes `device` (a block device or an image file) with `blkid -p`.
pub async fn probe(device: &Path, cancel: &mut Cancel) -> Result<Probe, StorageToolError> {
    let blkid = require_tool("blkid", "util-linux (blkid)")?;
    let spec = tool(&blkid, vec!["-p".into(), "-o".into(), "export".into(), device.display().to_string()]).inspection();
    // 2: nothing found; 8: ambivalent result (several signatures).
    let done = exec::checked(&spec, &[0, 2, 8], cancel).await?;
    Ok(match done.exit {
        Exit::Code(0) => Probe::parse_export(&done.output),
        Exit::Code(8) => Probe { ambivalent: true, ..Probe::parse_export(&done.output) },
        _ => Probe::default(),
    })
}

/// Why a storage tool could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum StorageToolError {
    #[error(transparent)]
    Missing(#[from] MissingTool),
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl StorageToolError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, StorageToolError::Tool(e) if e.is_cancelled())
    }
}

/// Renders recipe `arguments` as long options: `key` → `--key`, `key=value` →
/// `--key=value`; a key that already starts with `-` is kept as it is.
pub fn long_options(args: &opsagent_proto::param_types::Dict) -> Vec<String> {
    args.iter()
        .map(|e| {
            let key = e.key.trim();
            let key = if key.starts_with('-') { key.to_string() } else { format!("--{key}") };
            match e.value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                Some(v) => format!("{key}={v}"),
                None => key,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_parsed_and_described() {
        let p = Probe::parse_export("DEVNAME=/dev/loop0\nUUID=x\nVERSION=LVM2\\ 001\nTYPE=LVM2_member\nUSAGE=raid\n");
        assert_eq!(p.fstype.as_deref(), Some("LVM2_member"));
        assert_eq!(p.describe(), "an LVM physical volume (LVM2_member)");
        let p = Probe::parse_export("LABEL=my\\ data\nTYPE=xfs\n");
        assert_eq!((p.label.as_deref(), p.describe().as_str()), (Some("my data"), "an xfs filesystem"));
        let p = Probe::parse_export("PTUUID=1\nPTTYPE=gpt\n");
        assert_eq!(p.describe(), "a gpt partition table");
        assert!(!p.is_blank());
        assert!(Probe::parse_export("").is_blank());
        assert_eq!(Probe::parse_export("TYPE=ext4").describe(), "an ext4 filesystem");
    }

    #[test]
    fn missing_tools_name_the_package() {
        let err = require_tool("no-such-tool-xyz", "frobnicator").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no-such-tool-xyz is not installed; install it with a package state first \
             (Debian/Ubuntu and RHEL package frobnicator)"
        );
        assert!(find_tool("sh", &[]).is_some());
    }

    #[test]
    fn devices_are_checked() {
        assert!(matches!(BlockDevice::open("device", "/dev/no-such-disk"), Err(DeviceError::Missing(_))));
        let err = BlockDevice::open("device", "/dev/null").unwrap_err();
        assert_eq!(err.to_string(), "device /dev/null is a device, not a block device");
        assert!(matches!(BlockDevice::open("device", "xvdf"), Err(DeviceError::Path { .. })));
    }

    #[test]
    fn a_dev_without_block_devices_is_a_private_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(no_block_devices(dir.path()));
        std::fs::write(dir.path().join("null"), "").unwrap();
        std::fs::create_dir(dir.path().join("pts")).unwrap();
        assert!(no_block_devices(dir.path()));
        assert!(!no_block_devices(&dir.path().join("missing")), "an unreadable /dev proves nothing");
        // A block device node (root may make one anywhere that is not mounted nodev).
        let node = dir.path().join("loop0");
        if nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(7, 0),
        )
        .is_ok()
        {
            assert!(!no_block_devices(dir.path()));
        } else {
            eprintln!("cannot mknod here (not root?): the positive case is not checked");
        }
        let err = DeviceError::Hidden("/dev/xvdf".into()).to_string();
        assert!(err.starts_with("device /dev/xvdf is not visible: block devices are hidden from the helper (PrivateDevices=yes); the shipped opsagent-helper.service sees the host's /dev"), "{err}");
    }

    #[test]
    fn arguments_render_as_long_options() {
        let d = opsagent_proto::param_types::Dict(vec![
            opsagent_proto::param_types::Entry { key: "chunk".into(), value: Some("256".into()) },
            opsagent_proto::param_types::Entry { key: "force".into(), value: None },
            opsagent_proto::param_types::Entry { key: "--metadata".into(), value: Some("1.2".into()) },
        ]);
        assert_eq!(long_options(&d), ["--chunk=256", "--force", "--metadata=1.2"]);
    }
}
