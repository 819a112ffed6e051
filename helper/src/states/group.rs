//! `linux.group`: a local group through `groupadd`/`groupmod`. `gid` is enforced on an
//! existing group; `system-group` matters only when the group is created.

use nix::unistd::Group;
use opsagent_proto::catalogue::LinuxGroup;
use opsagent_proto::request::{Change, Outcome};

use super::user::UserError;
use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec};

/// `groupadd` arguments for a new group.
pub fn groupadd_args(name: &str, gid: Option<u64>, system: bool) -> Vec<String> {
    let mut a = Vec::new();
    if system {
        a.push("-r".to_string());
    }
    if let Some(gid) = gid {
        a.extend(["-g".to_string(), gid.to_string()]);
    }
    a.push(name.to_string());
    a
}

pub async fn apply(p: &LinuxGroup, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, &mut changes, &mut cancel).await;
    let cancelled = matches!(&result, Err(UserError::Tool(e)) if e.is_cancelled());
    let mut outcome = super::finish(&p.groupname, result, changes, &[]);
    outcome.cancelled = cancelled;
    outcome
}

async fn run(p: &LinuxGroup, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), UserError> {
    // A valid group name by its type (`AccountName`, checked at decode).
    let name = p.groupname.as_str();
    let lookup = |n: &str| Group::from_name(n).map_err(|e| UserError::Lookup(format!("group {n}"), e));
    match lookup(name)? {
        None if crate::plan::active() => {
            // groupadd chooses the gid when the recipe does not.
            let gid = p.gid.map_or_else(|| "?".to_string(), |g| g.to_string());
            changes.push(Change::new(name, format!("group created (gid {gid})")));
        }
        None => {
            let spec = CommandSpec::tool("groupadd", groupadd_args(name, p.gid, p.system_group));
            exec::checked(&spec, &[0], cancel).await?;
            let gid = lookup(name)?.map_or_else(|| "?".to_string(), |g| g.gid.to_string());
            changes.push(Change::new(name, format!("group created (gid {gid})")));
        }
        Some(g) => {
            if let Some(gid) = p.gid.filter(|gid| *gid != u64::from(g.gid.as_raw())) {
                if !crate::plan::active() {
                    let spec = CommandSpec::tool("groupmod", ["-g".to_string(), gid.to_string(), name.to_string()]);
                    exec::checked(&spec, &[0], cancel).await?;
                }
                changes.push(Change::new(name, format!("gid {} -> {gid}", g.gid)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groupadd_command_lines() {
        assert_eq!(groupadd_args("web", Some(1200), true), ["-r", "-g", "1200", "web"]);
        assert_eq!(groupadd_args("web", None, false), ["web"]);
    }

    /// An existing group with no gid asked for: nothing to run, nothing changed. (A bad
    /// name cannot reach the state: `groupname` is an `AccountName`.)
    #[tokio::test]
    async fn an_existing_group_is_left_alone() {
        let p: LinuxGroup = crate::states::testutil::typed(
            "linux.group",
            serde_json::json!({"groupname": "root", "gid": 0, "system": true}),
        );
        let out = apply(&p, Cancel::never()).await;
        assert!(out.result && out.changes.is_empty(), "{out:?}");
        crate::states::testutil::refused(
            "linux.group",
            serde_json::json!({"groupname": "-o"}),
            "parameter \"groupname\"",
        );
    }
}
