//! `linux.lvm.pv`, `linux.lvm.vg`, `linux.lvm.lv`: LVM objects, created when missing.
//!
//! What exists is read with `pvs`/`vgs`/`lvs` (`--noheadings --separator '|'`); a
//! device is matched by path or device number, so `/dev/disk/by-id/…` and the name LVM
//! prints are the same device.
//!
//! - `pv`: each `path` that is not a physical volume yet gets `pvcreate`. A device that
//!   holds anything (a filesystem, a partition table, a RAID signature) is refused
//!   unless `force` is set, which passes `-ff --yes` to let pvcreate wipe it.
//! - `vg`: a missing group is created with `vgcreate` on `path` (devices that are not
//!   PVs yet become PVs; they must be blank). An existing group is extended
//!   (`vgextend`) with the listed devices it lacks; a device that belongs to another
//!   group is refused. Devices are never removed from a group.
//! - `lv`: a missing volume is created with `lvcreate` in `vg-name` (which must
//!   exist); an existing one is left as it is (no resize), as in the original.
//!
//! Options are passed as `--option=value`, one argument each, so no recipe value is
//! ever read as another option. Parameters LVM 2.03 no longer has are handled as
//! follows: `metadata-type: lvm1` fails (lvm1 metadata is gone), `clustered: true` on a
//! group is ignored with a note (clvmd clustering was removed; use lvmlockd and
//! `--shared` by hand), a non-numeric `label-sector` (module.json's default was the
//! string "LVM2") is ignored with a note.

use std::path::Path;

use opsagent_proto::catalogue::{LinuxLvmLv, LinuxLvmPv, LinuxLvmVg};
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use super::{probe, require_tool, tool, BlockDevice, DeviceError, StorageToolError};
use crate::cancel::Cancel;
use crate::exec::{self, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tool(#[from] StorageToolError),
    #[error("parameter {param}: {value:?} is not a valid LVM name (letters, digits and + _ . -, not starting with -)")]
    Name { param: &'static str, value: String },
    #[error("parameter path: no device given")]
    NoDevices,
    #[error("parameter metadata-type: lvm1 metadata is not supported by LVM 2.03 and later; use lvm2")]
    Lvm1,
    #[error(
        "refusing to {action} {device}: it holds {found}; set force: true if its content may be lost \
         (linux.lvm.vg has no force: wipe the device first, or make it a PV with linux.lvm.pv and force)"
    )]
    Occupied { action: &'static str, device: String, found: String },
    #[error("{device} is a physical volume of volume group {other}, not {wanted}")]
    OtherGroup { device: String, other: String, wanted: String },
    #[error("volume group {0} does not exist (create it with linux.lvm.vg first)")]
    NoGroup(String),
}

impl From<ToolError> for LvmError {
    fn from(e: ToolError) -> Self {
        LvmError::Tool(e.into())
    }
}

impl LvmError {
    fn is_cancelled(&self) -> bool {
        matches!(self, LvmError::Tool(e) if e.is_cancelled())
    }
}

fn outcome(subject: &str, result: Result<(), LvmError>, changes: Vec<Change>, notes: &[String]) -> Outcome {
    let cancelled = matches!(&result, Err(e) if e.is_cancelled());
    let mut o = crate::states::finish(subject, result, changes, notes);
    o.cancelled = cancelled;
    o
}

/// LVM's rule for VG and LV names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'))
}

fn name(param: &'static str, raw: &str) -> Result<String, LvmError> {
    let n = raw.trim();
    if valid_name(n) {
        Ok(n.to_string())
    } else {
        Err(LvmError::Name { param, value: n.to_string() })
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "y"
    } else {
        "n"
    }
}

fn given(v: &Option<opsagent_proto::param_types::Line>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn check_metadata_type(v: &str) -> Result<Option<String>, LvmError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "lvm2" | "2" => Ok(None),
        "lvm1" | "1" => Err(LvmError::Lvm1),
        other => Ok(Some(format!("--metadatatype={other}"))),
    }
}

/// `pvcreate` options (without the device) for `p`; notes for ignored values.
pub fn pvcreate_options(p: &LinuxLvmPv, notes: &mut Vec<String>) -> Result<Vec<String>, LvmError> {
    let mut a = Vec::new();
    if p.force {
        a.extend(["-ff".to_string(), "--yes".into()]);
    }
    if let Some(v) = given(&p.data_alignment) {
        a.push(format!("--dataalignment={v}"));
    }
    if let Some(v) = given(&p.data_alignment_offset) {
        a.push(format!("--dataalignmentoffset={v}"));
    }
    if let Some(v) = given(&p.label_sector) {
        if v.chars().all(|c| c.is_ascii_digit()) {
            a.push(format!("--labelsector={v}"));
        } else {
            notes.push(format!("label-sector {v:?} is not a sector number; ignored"));
        }
    }
    if let Some(v) = given(&p.metadata_copies) {
        a.push(format!("--pvmetadatacopies={v}"));
    }
    if p.metadata_ignore {
        a.push("--metadataignore=y".into());
    }
    if let Some(v) = given(&p.metadata_size) {
        a.push(format!("--metadatasize={v}"));
    }
    a.extend(check_metadata_type(&p.metadata_type)?);
    if let Some(v) = given(&p.pv_size) {
        a.push(format!("--setphysicalvolumesize={v}"));
    }
    if let Some(v) = given(&p.restore_file) {
        a.push(format!("--restorefile={v}"));
    }
    if let Some(v) = given(&p.uuid) {
        a.push(format!("--uuid={v}"));
        if given(&p.restore_file).is_none() && p.no_restore_file {
            a.push("--norestorefile".into());
        }
    }
    if !p.zero {
        a.push("--zero=n".into());
    }
    Ok(a)
}

/// `vgcreate` options (without name and devices).
pub fn vgcreate_options(p: &LinuxLvmVg, notes: &mut Vec<String>) -> Result<Vec<String>, LvmError> {
    let mut a = Vec::new();
    if let Some(v) = given(&p.allocation_policy) {
        a.push(format!("--alloc={v}"));
    }
    a.push(format!("--autobackup={}", yn(p.autobackup)));
    if p.clustered {
        notes.push(
            "clustered ignored: LVM 2.03 has no clvmd clustering (lvmlockd shared groups are set up by hand)".into(),
        );
    }
    if let Some(v) = given(&p.max_lv_number) {
        a.push(format!("--maxlogicalvolumes={v}"));
    }
    if let Some(v) = given(&p.max_pv_number) {
        a.push(format!("--maxphysicalvolumes={v}"));
    }
    if let Some(v) = given(&p.metadata_copies) {
        a.push(format!("--vgmetadatacopies={v}"));
    }
    a.extend(check_metadata_type(&p.metadata_type)?);
    if !p.pe_size.trim().is_empty() {
        a.push(format!("--physicalextentsize={}", p.pe_size.trim()));
    }
    if let Some(v) = given(&p.tag) {
        a.push(format!("--addtag={v}"));
    }
    Ok(a)
}

/// The whole `lvcreate` argument list for `p`.
pub fn lvcreate_args(p: &LinuxLvmLv, lv: &str, vg: &str) -> Vec<String> {
    let mut a = vec![format!("--name={lv}"), "--yes".to_string()];
    let opt = |a: &mut Vec<String>, flag: &str, v: &Option<opsagent_proto::param_types::Line>| {
        if let Some(v) = given(v) {
            a.push(format!("--{flag}={v}"));
        }
    };
    opt(&mut a, "alloc", &p.allocation_policy);
    a.push(format!("--autobackup={}", yn(p.autobackup)));
    opt(&mut a, "activate", &p.available);
    opt(&mut a, "chunksize", &p.chunk_size);
    if p.contiguous {
        a.push("--contiguous=y".into());
    }
    opt(&mut a, "discards", &p.discards);
    if p.ignore_monitoring {
        a.push("--ignoremonitoring".into());
    }
    opt(&mut a, "extents", &p.le_number);
    opt(&mut a, "size", &p.le_size);
    opt(&mut a, "minor", &p.minor_number);
    opt(&mut a, "mirrors", &p.mirror_number);
    if let Some(m) = p.monitor {
        a.push(format!("--monitor={}", yn(m)));
    }
    if p.no_udev_sync {
        a.push("--noudevsync".into());
    }
    opt(&mut a, "permission", &p.permission);
    if let Some(v) = p.persistent {
        a.push(format!("--persistent={}", yn(v)));
    }
    opt(&mut a, "poolmetadatasize", &p.pool_metadata_size);
    opt(&mut a, "readahead", &p.readahead);
    opt(&mut a, "regionsize", &p.region_size);
    opt(&mut a, "stripes", &p.stripe_number);
    opt(&mut a, "stripesize", &p.stripe_size);
    opt(&mut a, "addtag", &p.tag);
    opt(&mut a, "thinpool", &p.thinpool);
    opt(&mut a, "type", &p.r#type);
    opt(&mut a, "virtualsize", &p.virtual_size);
    if !p.zero {
        a.push("--zero=n".into());
    }
    // As the original (Salt's lvcreate): a snapshot names its origin in the same group
    // instead of the group itself.
    match given(&p.snapshot) {
        Some(origin) => a.push(format!("--snapshot={vg}/{origin}")),
        None => a.push(vg.to_string()),
    }
    a.extend(p.path.iter().flat_map(|d| d.iter()).map(ToString::to_string));
    a
}

/// Parses `--noheadings --separator '|'` report rows.
pub fn parse_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && l.contains('|'))
        .map(|l| l.split('|').map(|f| f.trim().to_string()).collect())
        .collect()
}

async fn report(command: &str, fields: &str, cancel: &mut Cancel) -> Result<Vec<Vec<String>>, LvmError> {
    let program = require_tool(command, "lvm2").map_err(StorageToolError::from)?;
    let args = vec!["--noheadings".into(), "--separator".into(), "|".into(), "-o".into(), fields.into()];
    let done = exec::checked(&tool(&program, args).inspection(), &[0], cancel).await?;
    Ok(parse_rows(&done.output))
}

/// (PV path, VG name or "") of every physical volume.
async fn physical_volumes(cancel: &mut Cancel) -> Result<Vec<(String, String)>, LvmError> {
    Ok(report("pvs", "pv_name,vg_name", cancel)
        .await?
        .into_iter()
        .map(|r| (r[0].clone(), r.get(1).cloned().unwrap_or_default()))
        .collect())
}

async fn groups(cancel: &mut Cancel) -> Result<Vec<String>, LvmError> {
    // vg_name,vg_uuid: two fields so that every row has a separator.
    Ok(report("vgs", "vg_name,vg_uuid", cancel).await?.into_iter().map(|r| r[0].clone()).collect())
}

async fn lvm_run(command: &str, args: Vec<String>, cancel: &mut Cancel) -> Result<(), LvmError> {
    let program = require_tool(command, "lvm2").map_err(StorageToolError::from)?;
    // A plan records the change its caller describes, without the call.
    if !crate::plan::active() {
        exec::checked(&tool(&program, args), &[0], cancel).await?;
    }
    Ok(())
}

/// Refuses a device that holds anything, unless `force`.
async fn ensure_blank(
    dev: &BlockDevice,
    action: &'static str,
    force: bool,
    cancel: &mut Cancel,
) -> Result<(), LvmError> {
    if force {
        return Ok(());
    }
    let found = probe(dev.path.as_path(), cancel).await?;
    if found.is_blank() {
        Ok(())
    } else {
        Err(LvmError::Occupied { action, device: dev.as_str(), found: found.describe() })
    }
}

fn devices(paths: &[AbsPath]) -> Result<Vec<BlockDevice>, LvmError> {
    let list: Vec<BlockDevice> = paths.iter().map(BlockDevice::at).collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(LvmError::NoDevices);
    }
    Ok(list)
}

pub async fn apply_pv(p: &LinuxLvmPv, mut cancel: Cancel) -> Outcome {
    let (mut changes, mut notes) = (Vec::new(), Vec::new());
    let result = run_pv(p, &mut changes, &mut notes, &mut cancel).await;
    let target: Vec<String> = p.path.iter().map(ToString::to_string).collect();
    outcome(&target.join(", "), result, changes, &notes)
}

async fn run_pv(
    p: &LinuxLvmPv,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    cancel: &mut Cancel,
) -> Result<(), LvmError> {
    let options = pvcreate_options(p, notes)?;
    let devs = devices(&p.path)?;
    let pvs = physical_volumes(cancel).await?;
    for dev in devs {
        if pvs.iter().any(|(pv, _)| dev.is(pv)) {
            continue;
        }
        ensure_blank(&dev, "initialise", p.force, cancel).await?;
        let mut args = options.clone();
        args.push(dev.as_str());
        lvm_run("pvcreate", args, cancel).await?;
        changes.push(Change::new(dev.as_str(), "physical volume created"));
    }
    Ok(())
}

pub async fn apply_vg(p: &LinuxLvmVg, mut cancel: Cancel) -> Outcome {
    let (mut changes, mut notes) = (Vec::new(), Vec::new());
    let result = run_vg(p, &mut changes, &mut notes, &mut cancel).await;
    outcome(p.name.trim(), result, changes, &notes)
}

async fn run_vg(
    p: &LinuxLvmVg,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    cancel: &mut Cancel,
) -> Result<(), LvmError> {
    let vg = name("name", &p.name)?;
    let options = vgcreate_options(p, notes)?;
    let devs = devices(&p.path)?;
    let pvs = physical_volumes(cancel).await?;
    let exists = groups(cancel).await?.contains(&vg);
    let mut missing = Vec::new();
    for dev in devs {
        match pvs.iter().find(|(pv, _)| dev.is(pv)) {
            Some((_, owner)) if *owner == vg => {}
            Some((_, owner)) if !owner.is_empty() => {
                return Err(LvmError::OtherGroup { device: dev.as_str(), other: owner.clone(), wanted: vg })
            }
            // A PV in no group: usable as it is.
            Some(_) => missing.push(dev),
            None => {
                ensure_blank(&dev, "add", false, cancel).await?;
                missing.push(dev);
            }
        }
    }
    if !exists {
        let mut args = options;
        args.push(vg.clone());
        args.extend(missing.iter().map(BlockDevice::as_str));
        lvm_run("vgcreate", args, cancel).await?;
        let list = missing.iter().map(BlockDevice::as_str).collect::<Vec<_>>().join(", ");
        changes.push(Change::new(vg, format!("volume group created on {list}")));
    } else if !missing.is_empty() {
        let mut args = vec![format!("--autobackup={}", yn(p.autobackup)), vg.clone()];
        args.extend(missing.iter().map(BlockDevice::as_str));
        lvm_run("vgextend", args, cancel).await?;
        for dev in missing {
            changes.push(Change::new(vg.clone(), format!("extended with {}", dev.as_str())));
        }
    }
    Ok(())
}

pub async fn apply_lv(p: &LinuxLvmLv, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = run_lv(p, &mut changes, &mut cancel).await;
    outcome(&format!("{}/{}", p.vg_name.trim(), p.name.trim()), result, changes, &[])
}

async fn run_lv(p: &LinuxLvmLv, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), LvmError> {
    let lv = name("name", &p.name)?;
    let vg = name("vg-name", &p.vg_name)?;
    if let Some(paths) = &p.path {
        for d in paths.iter() {
            BlockDevice::at(d)?;
        }
    }
    if !groups(cancel).await?.contains(&vg) {
        return Err(LvmError::NoGroup(vg));
    }
    let lvs = report("lvs", "lv_name,vg_name", cancel).await?;
    if lvs.iter().any(|r| r.first() == Some(&lv) && r.get(1) == Some(&vg)) {
        return Ok(());
    }
    lvm_run("lvcreate", lvcreate_args(p, &lv, &vg), cancel).await?;
    let node = Path::new("/dev").join(&vg).join(&lv);
    changes.push(Change::new(node.display().to_string(), "logical volume created"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;

    #[test]
    fn names_follow_lvm_rules() {
        assert!(valid_name("data_vg") && valid_name("lv.0+x"));
        for bad in ["", "-x", "a/b", "a b", "..", &"x".repeat(128)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn pvcreate_options_render() {
        let ModuleParams::LinuxLvmPv(p) = params(
            "linux.lvm.pv",
            json!({"path": ["/dev/x"], "force": true, "metadata-copies": "2", "label-sector": "LVM2",
                   "uuid": "abc", "zero": false, "data-alignment": "1m"}),
        ) else {
            panic!()
        };
        let mut notes = Vec::new();
        let args = pvcreate_options(&p, &mut notes).unwrap();
        assert_eq!(
            args,
            ["-ff", "--yes", "--dataalignment=1m", "--pvmetadatacopies=2", "--uuid=abc", "--norestorefile", "--zero=n"]
        );
        assert_eq!(notes, ["label-sector \"LVM2\" is not a sector number; ignored"]);
        let ModuleParams::LinuxLvmPv(p) = params("linux.lvm.pv", json!({"path": "/dev/x", "metadata-type": "lvm1"}))
        else {
            panic!()
        };
        assert!(matches!(pvcreate_options(&p, &mut notes), Err(LvmError::Lvm1)));
    }

    #[test]
    fn vgcreate_options_render() {
        let ModuleParams::LinuxLvmVg(p) = params(
            "linux.lvm.vg",
            json!({"name": "vg0", "path": ["/dev/x"], "clustered": true, "allocation-policy": "cling", "tag": "t"}),
        ) else {
            panic!()
        };
        let mut notes = Vec::new();
        let args = vgcreate_options(&p, &mut notes).unwrap();
        assert_eq!(args, ["--alloc=cling", "--autobackup=y", "--physicalextentsize=4m", "--addtag=t"]);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn lvcreate_args_render() {
        let ModuleParams::LinuxLvmLv(p) = params(
            "linux.lvm.lv",
            json!({"name": "lv0", "vg-name": "vg0", "le-size": "10G", "stripe-number": "2",
                   "path": ["/dev/xvdf", "/dev/xvdg"], "ignore-monitoring": true, "zero": false}),
        ) else {
            panic!()
        };
        assert_eq!(
            lvcreate_args(&p, "lv0", "vg0"),
            [
                "--name=lv0",
                "--yes",
                "--autobackup=y",
                "--ignoremonitoring",
                "--size=10G",
                "--stripes=2",
                "--zero=n",
                "vg0",
                "/dev/xvdf",
                "/dev/xvdg"
            ]
        );
        let ModuleParams::LinuxLvmLv(s) =
            params("linux.lvm.lv", json!({"name": "snap", "vg-name": "vg0", "snapshot": "lv0", "le-size": "1G"}))
        else {
            panic!()
        };
        let args = lvcreate_args(&s, "snap", "vg0");
        assert_eq!(args.last().map(String::as_str), Some("--snapshot=vg0/lv0"));
        assert!(!args.contains(&"vg0".to_string()));
    }

    #[test]
    fn report_rows_parse() {
        let rows = parse_rows("  /dev/loop0|tvg\n  /dev/loop1|\n\n");
        assert_eq!(rows, vec![vec!["/dev/loop0".to_string(), "tvg".into()], vec!["/dev/loop1".into(), String::new()]]);
    }
}
