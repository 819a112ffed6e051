//! `linux.raid`: an mdadm software RAID array, created when missing.
//!
//! - The array exists when `mdadm --detail DEVICE-NAME` succeeds: nothing is done
//!   (level and members of an existing array are not changed, as in the original).
//! - Otherwise every member is probed. When all of them carry mdadm superblocks
//!   (`linux_raid_member`), the array exists on disk but is not running (a reboot
//!   without `mdadm.conf`): it is assembled (`mdadm --assemble`), never re-created.
//! - When a member holds anything else (a filesystem, a partition table, an LVM
//!   signature) the state fails naming it, unless `arguments` has `force`: that is
//!   passed to mdadm as `--force` and the member is overwritten.
//! - Else `mdadm --create DEVICE-NAME --run --level=LEVEL --raid-devices=N [ARGS]
//!   MEMBERS`; `--run` answers mdadm's questions, which it cannot ask without a
//!   terminal. `arguments` are rendered as long options (`chunk: 256` →
//!   `--chunk=256`, an empty value → a bare `--flag`); given `raid-devices` there
//!   replaces the count of members.
//!
//! `/etc/mdadm/mdadm.conf` is not written (the original did not either); udev's
//! incremental assembly finds the array at boot on current distributions.

use opsagent_proto::catalogue::LinuxRaid;
use opsagent_proto::request::{Change, Outcome};

use super::{long_options, probe, require_tool, tool, BlockDevice, DeviceError, StorageToolError};
use crate::cancel::Cancel;
use crate::exec::{self, Exit, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum RaidError {
    #[error("parameter device-name: {0}")]
    Name(String),
    #[error("parameter devices: no member device given")]
    NoMembers,
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tool(#[from] StorageToolError),
    #[error(
        "refusing to use {device} as a member of {array}: it holds {found}; add `force` to arguments if \
         its content may be lost"
    )]
    Occupied { device: String, array: String, found: String },
}

impl From<ToolError> for RaidError {
    fn from(e: ToolError) -> Self {
        RaidError::Tool(e.into())
    }
}

pub async fn apply(p: &LinuxRaid, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, &mut changes, &mut cancel).await;
    let cancelled = matches!(&result, Err(RaidError::Tool(e)) if e.is_cancelled());
    let mut outcome = crate::states::finish(&p.device_name.0, result, changes, &[]);
    outcome.cancelled = cancelled;
    outcome
}

fn has_key(p: &LinuxRaid, keys: &[&str]) -> bool {
    p.arguments.iter().flat_map(|a| a.iter()).any(|e| keys.contains(&e.key.trim().trim_start_matches('-')))
}

/// The `mdadm --create` arguments.
pub fn create_args(p: &LinuxRaid, array: &str, members: &[String]) -> Vec<String> {
    let mut a = vec!["--create".to_string(), array.to_string(), "--run".into(), format!("--level={}", p.level.trim())];
    if !has_key(p, &["raid-devices", "n"]) {
        a.push(format!("--raid-devices={}", members.len()));
    }
    if let Some(args) = &p.arguments {
        a.extend(long_options(args));
    }
    a.extend(members.iter().cloned());
    a
}

async fn run(p: &LinuxRaid, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), RaidError> {
    let array = p.device_name.abs();
    if !array.as_path().starts_with("/dev") || array.as_path().parent() == Some(std::path::Path::new("/")) {
        return Err(RaidError::Name(format!("{array} is not a device path such as /dev/md0 or /dev/md/name")));
    }
    let members: Vec<BlockDevice> = p.devices.iter().map(BlockDevice::at).collect::<Result<_, _>>()?;
    if members.is_empty() {
        return Err(RaidError::NoMembers);
    }
    let mdadm = require_tool("mdadm", "mdadm").map_err(StorageToolError::from)?;
    let detail = tool(&mdadm, vec!["--detail".into(), array.to_string()]).inspection();
    if exec::run(&detail, cancel).await.map_err(ToolError::from)?.exit == Exit::Code(0) {
        return Ok(());
    }
    let force = has_key(p, &["force", "f"]);
    let mut superblocks = 0;
    for m in &members {
        let found = probe(m.path.as_path(), cancel).await?;
        if found.fstype.as_deref() == Some("linux_raid_member") && !found.ambivalent {
            superblocks += 1;
        } else if !found.is_blank() && !force {
            return Err(RaidError::Occupied { device: m.as_str(), array: array.to_string(), found: found.describe() });
        }
    }
    let names: Vec<String> = members.iter().map(BlockDevice::as_str).collect();
    if superblocks == members.len() && !force {
        let mut args = vec!["--assemble".to_string(), array.to_string()];
        args.extend(names.iter().cloned());
        if !crate::plan::active() {
            exec::checked(&tool(&mdadm, args), &[0], cancel).await?;
        }
        changes.push(Change::new(array.to_string(), format!("array assembled from {}", names.join(", "))));
        return Ok(());
    }
    if !crate::plan::active() {
        exec::checked(&tool(&mdadm, create_args(p, &array.to_string(), &names)), &[0], cancel).await?;
    }
    changes.push(Change::new(array.to_string(), format!("{} array created on {}", p.level.trim(), names.join(", "))));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    fn raid(raw: serde_json::Value) -> LinuxRaid {
        crate::states::testutil::typed("linux.raid", raw)
    }

    #[test]
    fn create_arguments_render() {
        let p = raid(json!({"device-name": "/dev/md0", "devices": ["/dev/a", "/dev/b"], "level": "raid1",
                            "arguments": [{"key": "chunk", "value": "256"}, {"key": "force"}]}));
        let members = ["/dev/a".to_string(), "/dev/b".into()];
        assert_eq!(
            create_args(&p, "/dev/md0", &members),
            [
                "--create",
                "/dev/md0",
                "--run",
                "--level=raid1",
                "--raid-devices=2",
                "--chunk=256",
                "--force",
                "/dev/a",
                "/dev/b"
            ]
        );
        let p = raid(json!({"name": "/dev/md1", "devices": ["/dev/a"], "level": "1",
                            "arguments": {"raid-devices": "2"}}));
        let args = create_args(&p, "/dev/md1", &members[..1]);
        assert_eq!(args, ["--create", "/dev/md1", "--run", "--level=1", "--raid-devices=2", "/dev/a"]);
    }

    #[tokio::test]
    async fn bad_names_fail_before_any_tool() {
        crate::states::testutil::refused(
            "linux.raid",
            json!({"device-name": "md0", "devices": ["/dev/a"], "level": "raid1"}),
            "not absolute",
        );
        let out =
            apply(&raid(json!({"device-name": "/dev", "devices": ["/dev/a"], "level": "raid1"})), Cancel::never())
                .await;
        assert!(!out.result && out.comment.contains("is not a device path"), "{}", out.comment);
        let out = apply(
            &raid(json!({"device-name": "/dev/md9", "devices": ["/dev/nope-x"], "level": "raid1"})),
            Cancel::never(),
        )
        .await;
        assert!(!out.result && out.comment == "device /dev/nope-x does not exist", "{}", out.comment);
    }
}
