//! `linux.yum.package`: packages through rpm and dnf (or yum where there is no dnf).
//!
//! The same values as `linux.apt.package` (see there); `purged` is `removed` (rpm keeps
//! no configuration of removed packages apart from `.rpmsave` files). A pinned version
//! matches `VERSION` or `VERSION-RELEASE`. dnf and yum refresh their metadata
//! themselves when it expires (`metadata_expire`), so there is no explicit refresh;
//! `latest` asks `check-update` whether an upgrade exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opsagent_proto::catalogue::LinuxYumPackage;
use opsagent_proto::request::{Change, Outcome};

use super::apt::{parse_want, Item, PkgError, Plan, Want};
use super::rpm_db::RpmDb;
use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, Exit, ToolError};

pub const YUM_TIMEOUT: Duration = Duration::from_secs(3600);
pub const RPM_QUERY_FORMAT: &str = "%{NAME}\\t%{VERSION}-%{RELEASE}\\n";

/// An RPM package name: no leading `-`, no blanks or shell-ish characters.
pub fn valid_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c))
}

/// `rpm -q --qf RPM_QUERY_FORMAT …`: name → `VERSION-RELEASE` of what is installed
/// ("package x is not installed" lines are skipped). Several installed versions (kernels)
/// give several entries; the last one wins, which is enough for comparisons.
pub fn parse_rpm_query(out: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in out.lines() {
        if let Some((name, evr)) = l.split_once('\t') {
            m.entry(name.trim().to_string()).or_default().push(evr.trim().to_string());
        }
    }
    m
}

/// Whether an installed `VERSION-RELEASE` is the pinned `want` (`VERSION` alone or all).
pub fn version_matches(evr: &str, want: &str) -> bool {
    evr == want || evr.strip_prefix(want).is_some_and(|rest| rest.starts_with('-'))
}

pub fn plan(items: &[Item], installed: &BTreeMap<String, Vec<String>>, upgradable: &BTreeSet<String>) -> Plan {
    let mut plan = Plan::default();
    for i in items {
        let have = installed.get(&i.name).filter(|v| !v.is_empty());
        match &i.want {
            Want::Present if have.is_none() => plan.install.push(i.name.clone()),
            Want::Latest if have.is_none() || upgradable.contains(&i.name) => plan.install.push(i.name.clone()),
            Want::Version(v) if !have.is_some_and(|h| h.iter().any(|e| version_matches(e, v))) => {
                plan.install.push(format!("{}-{v}", i.name));
            }
            Want::File(path) if !have.is_some_and(|h| h.iter().any(|e| Some(e) == i.file_version.as_ref())) => {
                plan.install.push(path.display().to_string());
            }
            Want::Removed | Want::Purged if have.is_some() => plan.remove.push(i.name.clone()),
            _ => {}
        }
    }
    plan
}

/// Splits a plan's installs into `(install, upgrade)`: dnf and yum `install` leave an
/// installed package alone even when a newer one is available, so a `latest` package that
/// is installed and upgradable must go through `upgrade`.
pub fn split_upgrades(
    install: &[String],
    installed: &BTreeMap<String, Vec<String>>,
    upgradable: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    install.iter().cloned().partition(|n| !(upgradable.contains(n) && installed.contains_key(n)))
}

#[derive(Debug, Clone, Default)]
pub struct Opts {
    pub repo: Option<String>,
    pub verify_gpg: bool,
}

/// The upgrades `check-update` lists (`NAME.ARCH  [EPOCH:]VERSION-RELEASE  REPO`, headers
/// and obsoletes sections aside): name → `VERSION-RELEASE`, as rpm prints what is
/// installed (no epoch), so that a plan names the version an apply then reports.
pub fn parse_check_update(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, evr, _repo) = (w.next()?, w.next()?, w.next()?);
            let (name, _arch) = name.rsplit_once('.')?;
            let evr = evr.split_once(':').map_or(evr, |(_, vr)| vr);
            evr.contains('-').then(|| (name.to_string(), evr.to_string()))
        })
        .collect()
}

/// What a plan says an apply of `todo` would change, in an apply's words where the
/// version is known before yum resolves it.
/// `upgrades`: the `VERSION-RELEASE` check-update offers for an installed `latest` package.
pub fn expected_changes(
    items: &[Item],
    before: &BTreeMap<String, Vec<String>>,
    todo: &Plan,
    upgrades: &BTreeMap<String, String>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for i in items {
        let have = before.get(&i.name).and_then(|v| v.last());
        // As `plan` wrote each install.
        let planned = match &i.want {
            Want::Version(v) => format!("{}-{v}", i.name),
            Want::File(p) => p.display().to_string(),
            _ => i.name.clone(),
        };
        let installs = todo.install.contains(&planned);
        let what = if installs {
            let to = match &i.want {
                Want::Version(v) => v.clone(),
                Want::File(_) => i.file_version.clone().unwrap_or_default(),
                _ => upgrades.get(&i.name).cloned().unwrap_or_else(|| "the version yum resolves".to_string()),
            };
            match have {
                None => format!("installed {to}"),
                Some(b) => format!("{b} -> {to}"),
            }
        } else if todo.remove.contains(&i.name) {
            "removed".to_string()
        } else {
            continue;
        };
        changes.push(Change::new(i.name.clone(), what));
    }
    changes
}

/// Arguments for `dnf`/`yum` `op` (install, upgrade, remove, check-update).
pub fn args(op: &str, opts: &Opts, items: &[String]) -> Vec<String> {
    let mut args = vec!["-y".to_string(), "-q".to_string()];
    if let Some(repo) = &opts.repo {
        args.extend(["--disablerepo=*".to_string(), format!("--enablerepo={repo}")]);
    }
    if !opts.verify_gpg {
        args.push("--nogpgcheck".into());
    }
    args.push(op.to_string());
    args.extend(items.iter().cloned());
    args
}

/// dnf where it exists (Fedora, RHEL 8+), yum otherwise.
pub fn manager() -> &'static str {
    if ["/usr/bin/dnf", "/bin/dnf"].iter().any(|p| Path::new(p).exists()) {
        "dnf"
    } else {
        "yum"
    }
}

pub async fn apply(p: &LinuxYumPackage, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let mut output = String::new();
    let result = run_state(p, &mut cancel, &mut changes, &mut output).await;
    let cancelled = result.as_ref().is_err_and(PkgError::is_cancelled);
    let subject = p.name.iter().map(|e| e.key.as_str()).collect::<Vec<_>>().join(", ");
    let mut outcome = super::finish(&subject, result, changes, &[]);
    outcome.cancelled = cancelled;
    outcome.stdout = output;
    outcome
}

/// What is installed of `names`: from rpm's listing kept while its database does not change
/// ([`rpm_db`]), or from `rpm -q` where rpm does not say where its database is.
async fn installed(names: &[String], cancel: &mut Cancel) -> Result<BTreeMap<String, Vec<String>>, ToolError> {
    let Some(db) = host_db(cancel).await? else {
        return rpm_q(names, cancel).await;
    };
    db.lookup(names, || async move {
        let spec = CommandSpec::tool("rpm", ["-qa", "--qf", RPM_QUERY_FORMAT]).inspection();
        Ok(exec::checked(&spec, &[0], cancel).await?.output)
    })
    .await
}

/// The host's rpm database, in the directory rpm's `%{_dbpath}` names (asked once per
/// helper); `None` when rpm names no absolute path.
async fn host_db(cancel: &mut Cancel) -> Result<Option<Arc<RpmDb>>, ToolError> {
    static HOST: Mutex<Option<Option<Arc<RpmDb>>>> = Mutex::new(None);
    if let Some(known) = HOST.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Ok(known);
    }
    let spec = CommandSpec::tool("rpm", ["--eval", "%{_dbpath}"]).inspection();
    let out = exec::checked(&spec, &[0], cancel).await?.output;
    let path = PathBuf::from(out.trim());
    let db = path.is_absolute().then(|| Arc::new(RpmDb::new(path)));
    // Two first look-ups racing both ask rpm; the first answer kept is the one used.
    Ok(HOST.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(db).clone())
}

async fn rpm_q(names: &[String], cancel: &mut Cancel) -> Result<BTreeMap<String, Vec<String>>, ToolError> {
    let mut args = vec!["-q".to_string(), "--qf".to_string(), RPM_QUERY_FORMAT.to_string()];
    args.extend(names.iter().cloned());
    let spec = CommandSpec::tool("rpm", args).inspection();
    // The exit status is the number of names not installed: an answer, not a failure.
    let f = exec::run(&spec, cancel).await?;
    if f.exit == Exit::Cancelled {
        return Err(ToolError::Cancelled(spec.display()));
    }
    Ok(parse_rpm_query(&f.output))
}

async fn run_state(
    p: &LinuxYumPackage,
    cancel: &mut Cancel,
    changes: &mut Vec<Change>,
    output: &mut String,
) -> Result<(), PkgError> {
    let mut items = Vec::new();
    for e in p.name.iter() {
        let key = e.key.trim();
        let want = parse_want(key, e.value_or_empty(), ".rpm")?;
        let (name, file_version) = match &want {
            Want::File(path) => {
                let file = path.display().to_string();
                let spec = CommandSpec::tool("rpm", ["-qp", "--qf", RPM_QUERY_FORMAT, file.as_str()]).inspection();
                let out = exec::checked(&spec, &[0], cancel).await?.output;
                let (n, v) =
                    out.lines().find_map(|l| l.split_once('\t')).ok_or_else(|| PkgError::Unreadable(path.clone()))?;
                (n.trim().to_string(), Some(v.trim().to_string()))
            }
            _ => (key.to_string(), None),
        };
        if !valid_name(&name) {
            return Err(PkgError::Name(name));
        }
        items.push(Item { name, want, file_version });
    }
    let names: Vec<String> = items.iter().map(|i| i.name.clone()).collect();
    let before = installed(&names, cancel).await?;
    let pm = manager();
    let opts = Opts { repo: p.repo.as_deref().map(str::to_string), verify_gpg: p.verify_gpg };
    let latest: Vec<String> = items
        .iter()
        .filter(|i| i.want == Want::Latest && before.contains_key(&i.name))
        .map(|i| i.name.clone())
        .collect();
    let mut upgradable = BTreeSet::new();
    let mut upgrades = BTreeMap::new();
    if !latest.is_empty() {
        // check-update exits 100 when it lists upgrades, 0 when there are none.
        let mut check = args("check-update", &opts, &latest);
        if crate::plan::active() {
            // From the metadata cache only: a plan does not refresh it (a write).
            check.insert(0, "-C".into());
        }
        let spec = CommandSpec::tool(pm, check).inspection();
        let out = exec::checked(&spec, &[0, 100], cancel).await?.output;
        for (name, evr) in parse_check_update(&out) {
            if latest.contains(&name) {
                upgradable.insert(name.clone());
                upgrades.insert(name, evr);
            }
        }
    }
    let todo = plan(&items, &before, &upgradable);
    if crate::plan::active() {
        changes.extend(expected_changes(&items, &before, &todo, &upgrades));
        return Ok(());
    }
    let (install, upgrade) = split_upgrades(&todo.install, &before, &upgradable);
    let mut result = Ok(());
    for (op, list) in [("install", &install), ("upgrade", &upgrade), ("remove", &todo.remove)] {
        if list.is_empty() || result.is_err() {
            continue;
        }
        let spec = CommandSpec::tool(pm, args(op, &opts, list)).with_timeout(YUM_TIMEOUT);
        match exec::checked(&spec, &[0], cancel).await {
            Ok(f) => output.push_str(&format!("$ {}\n{}", spec.display(), f.output)),
            Err(e) => result = Err(PkgError::from(e)),
        }
    }
    // Nothing ran: the database is as `before` found it (a second listing would say so).
    let after = if install.is_empty() && upgrade.is_empty() && todo.remove.is_empty() {
        before.clone()
    } else {
        installed(&names, cancel).await?
    };
    for i in &items {
        let (b, a) = (before.get(&i.name), after.get(&i.name));
        let what = match (b.and_then(|v| v.last()), a.and_then(|v| v.last())) {
            (None, Some(a)) => format!("installed {a}"),
            (Some(b), Some(a)) if a != b => format!("{b} -> {a}"),
            (Some(_), None) => "removed".to_string(),
            _ => continue,
        };
        changes.push(Change::new(i.name.clone(), what));
    }
    result?;
    for i in &items {
        let have = after.get(&i.name).filter(|v| !v.is_empty());
        let has = |want: &str| have.is_some_and(|h| h.iter().any(|e| version_matches(e, want)));
        let wanted = match &i.want {
            Want::Present | Want::Latest if have.is_none() => "installed".to_string(),
            Want::Version(v) if !has(v) => format!("installed {v}"),
            Want::File(_) if !has(i.file_version.as_deref().unwrap_or_default()) => {
                format!("installed {}", i.file_version.as_deref().unwrap_or_default())
            }
            Want::Removed | Want::Purged if have.is_some() => "removed".to_string(),
            _ => continue,
        };
        let found = have.map_or_else(|| "not installed".to_string(), |v| format!("installed {}", v.join(", ")));
        return Err(PkgError::NotAsWanted { name: i.name.clone(), found, wanted });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_output_versions_and_plans() {
        let out = "nginx\t1.20.1-14.el9\npackage ghost is not installed\nkernel\t5.14-1\nkernel\t5.14-2\n";
        let m = parse_rpm_query(out);
        assert_eq!(m["nginx"], ["1.20.1-14.el9"]);
        assert_eq!(m["kernel"].len(), 2);
        assert!(!m.contains_key("ghost"));
        assert!(version_matches("1.20.1-14.el9", "1.20.1"));
        assert!(version_matches("1.20.1-14.el9", "1.20.1-14.el9"));
        assert!(!version_matches("1.20.10-1", "1.20.1"));

        let item = |n: &str, w: Want| Item { name: n.into(), want: w, file_version: None };
        let items = [
            item("nginx", Want::Version("1.20.1".into())),
            item("ghost", Want::Present),
            item("kernel", Want::Latest),
            item("nginx", Want::Purged),
            Item { name: "rel".into(), want: Want::File("/tmp/rel.rpm".into()), file_version: Some("1-1".into()) },
        ];
        let p = plan(&items, &m, &BTreeSet::from(["kernel".to_string()]));
        assert_eq!(p.install, ["ghost", "kernel", "/tmp/rel.rpm"]);
        assert_eq!(p.remove, ["nginx"]);
        let p = plan(&items[..3], &m, &BTreeSet::new());
        assert_eq!(p.install, ["ghost"]);
        let pinned = plan(&[item("nginx", Want::Version("1.22".into()))], &m, &BTreeSet::new());
        assert_eq!(pinned.install, ["nginx-1.22"]);
        // `latest` of an installed, upgradable package is an upgrade; new ones are installs.
        let upgradable = BTreeSet::from(["kernel".to_string()]);
        let p = plan(&items, &m, &upgradable);
        let (install, upgrade) = split_upgrades(&p.install, &m, &upgradable);
        assert_eq!(install, ["ghost", "/tmp/rel.rpm"]);
        assert_eq!(upgrade, ["kernel"]);
    }

    #[test]
    fn command_lines() {
        let a = args("install", &Opts { repo: Some("epel".into()), verify_gpg: false }, &["htop".into()]);
        assert_eq!(a.join(" "), "-y -q --disablerepo=* --enablerepo=epel --nogpgcheck install htop");
        let a = args("remove", &Opts { repo: None, verify_gpg: true }, &["x".into()]);
        assert_eq!(a.join(" "), "-y -q remove x");
        assert!(valid_name("python3-libs") && !valid_name("-x") && !valid_name("a b"));
    }

    #[test]
    fn check_update_lines_give_the_version_rpm_will_report() {
        let out = "\
Last metadata expiration check: 0:01:02 ago on Fri 04 Dec 2026.

m-hello.noarch                       1.1-1                         m-signed
kernel.x86_64                        1:5.14.0-2.el9                baseos
Obsoleting Packages
";
        let got = parse_check_update(out);
        assert_eq!(
            got,
            [("m-hello".to_string(), "1.1-1".to_string()), ("kernel".to_string(), "5.14.0-2.el9".to_string())]
        );
        let items = vec![Item { name: "m-hello".into(), want: Want::Latest, file_version: None }];
        let before = BTreeMap::from([("m-hello".to_string(), vec!["1.0-1".to_string()])]);
        let upgradable = BTreeSet::from(["m-hello".to_string()]);
        let todo = plan(&items, &before, &upgradable);
        let upgrades: BTreeMap<String, String> = got.into_iter().collect();
        let words: Vec<String> =
            expected_changes(&items, &before, &todo, &upgrades).iter().map(|c| c.to_string()).collect();
        assert_eq!(words, ["m-hello: 1.0-1 -> 1.1-1"], "the apply's words for the same upgrade");
    }
}
