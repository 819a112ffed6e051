//! `linux.apt.package`: packages through dpkg and apt-get, non-interactively.
//!
//! Per package, the value says what is wanted: empty (or `installed`) = installed, any
//! version; a version = exactly that version (`name=version`, downgrades allowed);
//! `latest` = installed and upgraded whenever apt's candidate differs from the installed
//! version; `removed`; `purged`; a `.deb` path or `file://` URI = that file's version
//! installed (`http(s)://` is refused: the helper has no network, the daemon downloads).
//!
//! What is installed comes from dpkg's database file ([`dpkg_db`], cached while it is
//! unchanged) or `dpkg-query` where the file alone cannot tell; what apt could install from
//! `apt-cache policy`. `apt-get update` runs only when needed: before an install or an
//! upgrade check when the package indexes are older than [`INDEX_MAX_AGE`], or when a
//! package or a pinned version is unknown to the indexes. Installs, removals and purges
//! are one `apt-get` call each, like the original's grouping. A failure names the
//! command and carries the last lines apt printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use opsagent_proto::catalogue::LinuxAptPackage;
use opsagent_proto::param_types::LocalFile;
use opsagent_proto::request::{Change, Outcome};

use opsagent_proto::newtypes::AbsPath;

use super::dpkg_db;
use super::repo::{local_file, RepoError};
use super::root_read::{self, RootReadError};
use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, ToolError};
use crate::fsutil;

pub const LISTS_DIR: &str = "/var/lib/apt/lists";
/// Package indexes older than this are refreshed before installing or upgrading.
pub const INDEX_MAX_AGE: Duration = Duration::from_secs(3600);
/// Deadline of one apt-get install/remove/purge (large upgrades take a while).
pub const APT_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a recipe wants of one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Present,
    Latest,
    Version(String),
    Removed,
    Purged,
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum PkgError {
    #[error("parameter name: {0:?} is not a package name")]
    Name(String),
    #[error("parameter name: {name}: {value:?} is not a version")]
    Version { name: String, value: String },
    #[error("parameter name: {name}: remote packages ({uri}) must be downloaded by the daemon first (the helper answers NeedFetch)")]
    Remote { name: String, uri: String },
    #[error("parameter name: {name}: {source}")]
    File { name: String, source: RepoError },
    #[error("{0}: cannot read the package's name and version")]
    Unreadable(PathBuf),
    #[error("package {0} is not known to apt, even after apt-get update")]
    Unknown(String),
    #[error("package {name}: version {version} is not available (apt knows: {known})")]
    NoSuchVersion { name: String, version: String, known: String },
    #[error("package {name} is {found} after the package manager ran, not {wanted}")]
    NotAsWanted { name: String, found: String, wanted: String },
    #[error(transparent)]
    RootRead(#[from] RootReadError),
    /// What debconf-set-selections printed is withheld: it may quote the file, which
    /// the daemon may not read.
    #[error("debconf-set-selections refused the deb-conf-file {path} ({how}; its output is not returned, as it may quote the file)")]
    Selections { path: String, how: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl PkgError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, PkgError::Tool(e) if e.is_cancelled())
    }
}

/// A Debian package name, optionally with `:arch`. Never starts with `-` (it would be
/// an option to apt-get).
pub fn valid_name(name: &str) -> bool {
    let (pkg, arch) = name.split_once(':').unwrap_or((name, "x"));
    let first_ok = pkg.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && pkg.len() >= 2
        && pkg.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && !arch.is_empty()
        && arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

pub fn valid_version(v: &str) -> bool {
    v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || ".+~:-_".contains(c))
}

pub fn parse_want(name: &str, value: &str, ext: &str) -> Result<Want, PkgError> {
    let v = value.trim();
    Ok(match v {
        "" | "installed" => Want::Present,
        "latest" => Want::Latest,
        "removed" => Want::Removed,
        "purged" => Want::Purged,
        _ if v.ends_with(ext) => match local_file("name", v) {
            Ok(path) => Want::File(path),
            Err(RepoError::Remote { uri, .. }) => return Err(PkgError::Remote { name: name.into(), uri }),
            Err(source) => return Err(PkgError::File { name: name.into(), source }),
        },
        _ if valid_version(v) => Want::Version(v.to_string()),
        _ => return Err(PkgError::Version { name: name.into(), value: v.into() }),
    })
}

/// A package as dpkg knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkg {
    /// `db:Status-Status`: installed, config-files, not-installed, half-installed…
    pub status: String,
    pub version: String,
}

impl Pkg {
    pub fn installed(&self) -> bool {
        self.status == "installed"
    }

    /// Something of it is on the system (files or configuration).
    pub fn on_system(&self) -> bool {
        self.status != "not-installed"
    }

    /// Installed or half-way there: what `remove` has to take away.
    pub fn removable(&self) -> bool {
        !matches!(self.status.as_str(), "not-installed" | "config-files")
    }
}

pub const DPKG_QUERY_FORMAT: &str = "${Package}\\t${db:Status-Status}\\t${Version}\\n";

/// `dpkg-query -W -f DPKG_QUERY_FORMAT …` output (its complaints about unknown names,
/// merged into the same stream, are not tab-separated and are skipped).
pub fn parse_dpkg_query(out: &str) -> BTreeMap<String, Pkg> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, status, version) = (f.next()?, f.next()?, f.next()?);
            Some((name.to_string(), Pkg { status: status.to_string(), version: version.to_string() }))
        })
        .collect()
}

/// What apt could install, from `apt-cache policy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    pub installed: Option<String>,
    pub candidate: Option<String>,
    pub versions: Vec<String>,
}

pub fn parse_apt_cache_policy(out: &str) -> BTreeMap<String, Candidates> {
    let none = |v: &str| (v != "(none)" && !v.is_empty()).then(|| v.to_string());
    let mut all = BTreeMap::new();
    let mut current: Option<(String, Candidates)> = None;
    let mut in_table = false;
    for line in out.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            all.extend(current.take());
            current = Some((line.trim_end_matches(':').to_string(), Candidates::default()));
            in_table = false;
            continue;
        }
        let Some((_, c)) = current.as_mut() else { continue };
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Installed:") {
            c.installed = none(v.trim());
        } else if let Some(v) = t.strip_prefix("Candidate:") {
            c.candidate = none(v.trim());
        } else if t == "Version table:" {
            in_table = true;
        } else if in_table {
            // Version lines are indented 5 (or " *** "), their sources 8.
            let indent = line.len() - line.trim_start().len();
            if t.starts_with("***") || indent < 8 {
                if let Some(v) = t.trim_start_matches("***").split_whitespace().next() {
                    c.versions.push(v.to_string());
                }
            }
        }
    }
    all.extend(current);
    all
}

/// Whether indexes last written at `newest` are too old at `now` (none: too old).
pub fn index_stale(newest: Option<SystemTime>, now: SystemTime) -> bool {
    newest.is_none_or(|t| now.duration_since(t).is_ok_and(|age| age > INDEX_MAX_AGE))
}

/// When the indexes were last refreshed: the newest file in apt's lists, or the stamp
/// the helper leaves after its own `apt-get update` (sources on `file:` URIs are read
/// in place, so their refresh leaves no file in the lists).
fn newest_index(lists: &Path, stamp: &Path) -> Option<SystemTime> {
    let listed = std::fs::read_dir(lists)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "lock")
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .filter_map(|m| m.modified().ok());
    listed.chain(std::fs::metadata(stamp).and_then(|m| m.modified()).ok()).max()
}

/// The stamp file of the helper's last successful `apt-get update`.
pub fn update_stamp(state_dir: &Path) -> PathBuf {
    state_dir.join("apt-update.stamp")
}

/// The calls to make, after looking at the host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Package names, `name=version` or `.deb` paths.
    pub install: Vec<String>,
    pub remove: Vec<String>,
    pub purge: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.install.is_empty() && self.remove.is_empty() && self.purge.is_empty()
    }
}

/// One package of the state, resolved: its name (from the `.deb` for files) and want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub want: Want,
    /// The version a `.deb` holds.
    pub file_version: Option<String>,
}

/// Which items need the package indexes: installs of names, and upgrade checks.
pub fn needs_index(items: &[Item], dpkg: &BTreeMap<String, Pkg>) -> Vec<String> {
    items
        .iter()
        .filter(|i| {
            let installed = dpkg.get(&i.name).filter(|p| p.installed());
            match &i.want {
                Want::Present => installed.is_none(),
                Want::Latest => true,
                Want::Version(v) => installed.is_none_or(|p| p.version != *v),
                _ => false,
            }
        })
        .map(|i| i.name.clone())
        .collect()
}

/// Decides the apt-get calls. `policy` must cover [`needs_index`]'s names.
pub fn plan(
    items: &[Item],
    dpkg: &BTreeMap<String, Pkg>,
    policy: &BTreeMap<String, Candidates>,
) -> Result<Plan, PkgError> {
    let mut plan = Plan::default();
    for i in items {
        let pkg = dpkg.get(&i.name);
        let installed = pkg.filter(|p| p.installed());
        let known = || policy.get(&i.name).and_then(|c| c.candidate.clone());
        match &i.want {
            Want::Present if installed.is_none() => {
                known().ok_or_else(|| PkgError::Unknown(i.name.clone()))?;
                plan.install.push(i.name.clone());
            }
            Want::Latest => {
                let candidate = known().ok_or_else(|| PkgError::Unknown(i.name.clone()))?;
                if installed.is_none_or(|p| p.version != candidate) {
                    plan.install.push(i.name.clone());
                }
            }
            Want::Version(v) if installed.is_none_or(|p| p.version != *v) => {
                let versions = policy.get(&i.name).map(|c| c.versions.clone()).unwrap_or_default();
                if !versions.contains(v) {
                    return Err(PkgError::NoSuchVersion {
                        name: i.name.clone(),
                        version: v.clone(),
                        known: if versions.is_empty() { "none".into() } else { versions.join(", ") },
                    });
                }
                plan.install.push(format!("{}={v}", i.name));
            }
            Want::File(path) if installed.is_none_or(|p| Some(&p.version) != i.file_version.as_ref()) => {
                plan.install.push(path.display().to_string());
            }
            Want::Removed if pkg.is_some_and(Pkg::removable) => plan.remove.push(i.name.clone()),
            Want::Purged if pkg.is_some_and(Pkg::on_system) => plan.purge.push(i.name.clone()),
            _ => {}
        }
    }
    Ok(plan)
}

/// Options of every apt-get call of the state.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    pub repo: Option<String>,
    pub verify_gpg: bool,
}

pub fn apt_get_args(op: &str, opts: &Opts, items: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["-y", "-q", "-o", "DPkg::Lock::Timeout=300"].map(String::from).to_vec();
    if op == "install" {
        // Keep the local configuration files, never ask.
        for o in ["Dpkg::Options::=--force-confdef", "Dpkg::Options::=--force-confold"] {
            args.extend(["-o".to_string(), o.to_string()]);
        }
        args.push("--allow-downgrades".into());
        if !opts.verify_gpg {
            args.push("--allow-unauthenticated".into());
        }
        if let Some(repo) = &opts.repo {
            args.extend(["-t".to_string(), repo.clone()]);
        }
    }
    args.push(op.to_string());
    args.extend(items.iter().cloned());
    args
}

fn apt_get(args: Vec<String>, timeout: Duration) -> CommandSpec {
    CommandSpec::tool("apt-get", args)
        .with_env("DEBIAN_FRONTEND", "noninteractive")
        .with_env("DEBCONF_NONINTERACTIVE_SEEN", "true")
        .with_env("APT_LISTCHANGES_FRONTEND", "none")
        .with_env("NEEDRESTART_MODE", "a")
        .with_timeout(timeout)
}

/// The changes between two dpkg views, per package of the state.
pub fn describe_changes(items: &[Item], before: &BTreeMap<String, Pkg>, after: &BTreeMap<String, Pkg>) -> Vec<Change> {
    let mut changes = Vec::new();
    for i in items {
        let (b, a) = (before.get(&i.name), after.get(&i.name));
        let what = match (b.filter(|p| p.installed()), a.filter(|p| p.installed())) {
            (None, Some(a)) => format!("installed {}", a.version),
            (Some(b), Some(a)) if b.version != a.version => format!("{} -> {}", b.version, a.version),
            (Some(_), None) if i.want == Want::Purged => "purged".to_string(),
            (Some(_), None) => "removed".to_string(),
            (None, None) if b.is_some_and(Pkg::on_system) && !a.is_some_and(Pkg::on_system) => "purged".to_string(),
            _ => continue,
        };
        changes.push(Change::new(i.name.clone(), what));
    }
    changes
}

/// The dpkg view an apply of `items` would leave, from the one before and the
/// candidates apt offers: what a plan compares with [`describe_changes`].
pub fn expected_after(
    items: &[Item],
    before: &BTreeMap<String, Pkg>,
    policy: &BTreeMap<String, Candidates>,
) -> BTreeMap<String, Pkg> {
    let mut after = before.clone();
    let installed = |version: String| Pkg { status: "installed".into(), version };
    for i in items {
        let now = before.get(&i.name).filter(|p| p.installed());
        let candidate = || policy.get(&i.name).and_then(|c| c.candidate.clone());
        let version = match &i.want {
            Want::Present if now.is_none() => candidate(),
            Want::Latest => candidate(),
            Want::Version(v) => Some(v.clone()),
            Want::File(_) => i.file_version.clone(),
            Want::Removed => {
                if let Some(p) = after.get_mut(&i.name).filter(|p| p.removable()) {
                    p.status = "config-files".into();
                }
                None
            }
            Want::Purged => {
                after.remove(&i.name);
                None
            }
            _ => None,
        };
        if let Some(v) = version {
            after.insert(i.name.clone(), installed(v));
        }
    }
    after
}

/// Checks the final dpkg view against what each item wants.
pub fn verify(items: &[Item], after: &BTreeMap<String, Pkg>) -> Result<(), PkgError> {
    for i in items {
        let pkg = after.get(&i.name);
        let found = || pkg.map_or_else(|| "not-installed".to_string(), |p| format!("{} {}", p.status, p.version));
        let err = |wanted: &str| PkgError::NotAsWanted { name: i.name.clone(), found: found(), wanted: wanted.into() };
        let installed = pkg.filter(|p| p.installed());
        match &i.want {
            Want::Present | Want::Latest if installed.is_none() => return Err(err("installed")),
            Want::Version(v) if installed.is_none_or(|p| p.version != *v) => {
                return Err(err(&format!("installed {v}")))
            }
            Want::File(_) if installed.is_none_or(|p| Some(&p.version) != i.file_version.as_ref()) => {
                return Err(err(&format!("installed {}", i.file_version.as_deref().unwrap_or("?"))))
            }
            Want::Removed if pkg.is_some_and(Pkg::removable) => return Err(err("removed")),
            Want::Purged if pkg.is_some_and(Pkg::on_system) => return Err(err("purged")),
            _ => {}
        }
    }
    Ok(())
}

/// Reads name and version from `dpkg-deb -f FILE Package Version` output.
pub fn parse_control_fields(out: &str) -> Option<(String, String)> {
    let field = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(':').map(|v| v.trim().to_string()));
    Some((field("Package")?, field("Version")?))
}

struct Run {
    cancel: Cancel,
    output: String,
    stamp: PathBuf,
}

impl Run {
    async fn tool(&mut self, spec: &CommandSpec, ok: &[i32]) -> Result<String, ToolError> {
        let f = exec::checked(spec, ok, &mut self.cancel).await?;
        Ok(f.output)
    }

    /// Preseeds debconf from `deb-conf-file`: read as [`root_read`] allows, given on
    /// stdin, and nothing of what the tool prints returned.
    /// `conf` is a validated local path ([`LocalFile`]); who controls the file is
    /// checked here, on the host, as the type cannot ([`root_read`]).
    async fn selections(&mut self, conf: &LocalFile) -> Result<(), PkgError> {
        let path = conf.path();
        let content = root_read::read("deb-conf-file", path)?;
        let spec = CommandSpec::tool("debconf-set-selections", std::iter::empty::<&str>()).with_stdin(content);
        match exec::checked(&spec, &[0], &mut self.cancel).await {
            Ok(_) => {
                self.output.push_str(&format!("$ debconf-set-selections < {path}\n(output not returned)\n"));
                Ok(())
            }
            Err(ToolError::Failed { how, .. }) => Err(PkgError::Selections { path: path.to_string(), how }),
            Err(e) => Err(e.into()),
        }
    }

    async fn logged(&mut self, spec: &CommandSpec) -> Result<(), ToolError> {
        let out = self.tool(spec, &[0]).await?;
        self.output.push_str(&format!("$ {}\n{out}", spec.display()));
        Ok(())
    }

    async fn dpkg(&mut self, names: &[String]) -> Result<BTreeMap<String, Pkg>, ToolError> {
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        // The database file answers without a process, parsed once per version of it
        // (a converged round asks once per package state); dpkg-query answers what the
        // file alone cannot, and whenever the file cannot be read.
        if let Ok(Some(found)) = dpkg_db::host().lookup(names) {
            return Ok(found);
        }
        // dpkg-query expands the \t and \n escapes of the format itself.
        let mut args = vec!["-W".to_string(), "-f".to_string(), DPKG_QUERY_FORMAT.to_string()];
        args.extend(names.iter().cloned());
        // 1: some names are unknown to dpkg, which is an answer too.
        Ok(parse_dpkg_query(&self.tool(&CommandSpec::tool("dpkg-query", args).inspection(), &[0, 1]).await?))
    }

    async fn policy(&mut self, names: &[String]) -> Result<BTreeMap<String, Candidates>, ToolError> {
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let args = std::iter::once("policy".to_string()).chain(names.iter().cloned());
        Ok(parse_apt_cache_policy(&self.tool(&CommandSpec::tool("apt-cache", args).inspection(), &[0]).await?))
    }

    async fn update(&mut self) -> Result<(), ToolError> {
        self.logged(&apt_get(vec!["-q".into(), "update".into()], exec::TOOL_TIMEOUT)).await?;
        // Best effort: without the stamp the next state refreshes once more.
        // In the helper's state directory, by directory descriptor like every write.
        if let Some(dir) = self.stamp.parent() {
            let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
            let _ = fsutil::create_dir_all(dir, fsutil::PARENT_DIR_MODE, root, &mut Vec::new());
        }
        if let Ok(stamp) = AbsPath::parse(&self.stamp.to_string_lossy()) {
            let _ = fsutil::write_atomic(&stamp, b"", 0o644, 0, 0);
        }
        Ok(())
    }
}

pub async fn apply(p: &LinuxAptPackage, state_dir: &Path, cancel: Cancel) -> Outcome {
    let mut run = Run { cancel, output: String::new(), stamp: update_stamp(state_dir) };
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = run_state(p, &mut run, &mut changes, &mut notes).await;
    let cancelled = result.as_ref().is_err_and(PkgError::is_cancelled);
    let subject = p.name.iter().map(|e| e.key.as_str()).collect::<Vec<_>>().join(", ");
    let mut outcome = super::finish(&subject, result, changes, &notes);
    outcome.cancelled = cancelled;
    outcome.stdout = run.output;
    outcome
}

async fn run_state(
    p: &LinuxAptPackage,
    run: &mut Run,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
) -> Result<(), PkgError> {
    let mut items = Vec::new();
    for e in p.name.iter() {
        let key = e.key.trim();
        let want = parse_want(key, e.value_or_empty(), ".deb")?;
        let (name, file_version) = match &want {
            Want::File(path) => {
                let file = path.display().to_string();
                let spec = CommandSpec::tool("dpkg-deb", ["-f", file.as_str(), "Package", "Version"]).inspection();
                let out = run.tool(&spec, &[0]).await?;
                let (n, v) = parse_control_fields(&out).ok_or_else(|| PkgError::Unreadable(path.clone()))?;
                (n, Some(v))
            }
            _ => (key.to_string(), None),
        };
        if !valid_name(&name) {
            return Err(PkgError::Name(name));
        }
        items.push(Item { name, want, file_version });
    }
    let names: Vec<String> = items.iter().map(|i| i.name.clone()).collect();
    let before = run.dpkg(&names).await?;

    let indexed = needs_index(&items, &before);
    let mut policy = BTreeMap::new();
    if !indexed.is_empty() {
        let mut refreshed = false;
        if crate::plan::active() {
            // A plan does not refresh the indexes (that writes apt's lists): it plans
            // against the ones there are.
            if index_stale(newest_index(Path::new(LISTS_DIR), &run.stamp), SystemTime::now()) {
                notes.push("planned against package indexes older than 1 h (an apply refreshes them first)".into());
            }
            refreshed = true;
        } else if index_stale(newest_index(Path::new(LISTS_DIR), &run.stamp), SystemTime::now()) {
            run.update().await?;
            notes.push("package indexes refreshed (older than 1 h)".into());
            refreshed = true;
        }
        policy = run.policy(&indexed).await?;
        if !refreshed && plan(&items, &before, &policy).is_err() {
            // Unknown package or version: perhaps new in a source added since.
            run.update().await?;
            notes.push("package indexes refreshed (a package or version was unknown)".into());
            policy = run.policy(&indexed).await?;
        }
    }
    let todo = plan(&items, &before, &policy)?;
    if todo.is_empty() {
        return Ok(());
    }
    if crate::plan::active() {
        changes.extend(describe_changes(&items, &before, &expected_after(&items, &before, &policy)));
        return Ok(());
    }
    let opts = Opts { repo: p.repo.as_deref().map(str::to_string), verify_gpg: p.verify_gpg };
    let result = async {
        if !todo.install.is_empty() {
            if let Some(conf) = &p.deb_conf_file {
                run.selections(conf).await?;
            }
            run.logged(&apt_get(apt_get_args("install", &opts, &todo.install), APT_TIMEOUT)).await?;
        }
        if !todo.remove.is_empty() {
            run.logged(&apt_get(apt_get_args("remove", &opts, &todo.remove), APT_TIMEOUT)).await?;
        }
        if !todo.purge.is_empty() {
            run.logged(&apt_get(apt_get_args("purge", &opts, &todo.purge), APT_TIMEOUT)).await?;
        }
        Ok::<(), PkgError>(())
    }
    .await;
    // What changed is reported even when a later call failed.
    let after = run.dpkg(&names).await?;
    changes.extend(describe_changes(&items, &before, &after));
    result?;
    verify(&items, &after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(status: &str, version: &str) -> Pkg {
        Pkg { status: status.into(), version: version.into() }
    }

    fn item(name: &str, want: Want) -> Item {
        Item { name: name.into(), want, file_version: None }
    }

    #[test]
    fn names_versions_and_wants() {
        for ok in ["nginx", "libc6:amd64", "g++", "python3.11", "0ad"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["-oDebug::x=1", "Nginx", "a", "a b", "x:", "../x", "x;y"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(parse_want("x", "", ".deb").unwrap(), Want::Present);
        assert_eq!(parse_want("x", " latest ", ".deb").unwrap(), Want::Latest);
        assert_eq!(parse_want("x", "1:2.3-4~deb12u1", ".deb").unwrap(), Want::Version("1:2.3-4~deb12u1".into()));
        assert_eq!(parse_want("x", "purged", ".deb").unwrap(), Want::Purged);
        assert_eq!(parse_want("x", "file:///srv/x_1.deb", ".deb").unwrap(), Want::File("/srv/x_1.deb".into()));
        let remote = parse_want("x", "https://example.com/x_1.deb", ".deb").unwrap_err().to_string();
        assert!(remote.contains("must be downloaded by the daemon"), "{remote}");
        assert!(parse_want("x", "rel/x.deb", ".deb").is_err());
        assert!(parse_want("x", "-o foo", ".deb").is_err());
    }

    #[test]
    fn dpkg_query_output() {
        let out = "hello\tinstalled\t1.0\ngone\tconfig-files\t2.0\ndpkg-query: no packages found matching nope\n";
        let m = parse_dpkg_query(out);
        assert_eq!(m.len(), 2);
        assert!(m["hello"].installed() && m["hello"].removable());
        assert!(!m["gone"].installed() && m["gone"].on_system() && !m["gone"].removable());
    }

    #[test]
    fn apt_cache_policy_output() {
        let out = "\
hello:
  Installed: 1.0
  Candidate: 2.0
  Version table:
     2.0 500
        500 file:/srv/repo ./ Packages
 *** 1.0 100
        100 /var/lib/dpkg/status
ghost:
  Installed: (none)
  Candidate: (none)
  Version table:
";
        let m = parse_apt_cache_policy(out);
        assert_eq!(
            m["hello"],
            Candidates {
                installed: Some("1.0".into()),
                candidate: Some("2.0".into()),
                versions: vec!["2.0".into(), "1.0".into()]
            }
        );
        assert_eq!(m["ghost"], Candidates::default());
        assert!(!m.contains_key("N"));
    }

    /// A plan's changes are the words an apply reports: the dpkg view it expects is
    /// described like the one read after an apply.
    #[test]
    fn a_plan_describes_the_expected_view_as_an_apply_would() {
        let before = BTreeMap::from([
            ("nginx".to_string(), pkg("installed", "1.22")),
            ("old".to_string(), pkg("installed", "1.0")),
            ("gone".to_string(), pkg("config-files", "1.0")),
            ("kept".to_string(), pkg("installed", "2.0")),
        ]);
        let cand = |c: &str| Candidates { installed: None, candidate: Some(c.into()), versions: vec![c.into()] };
        let policy = BTreeMap::from([
            ("nginx".to_string(), cand("1.24")),
            ("curl".to_string(), cand("8.0")),
            ("kept".to_string(), cand("2.0")),
        ]);
        let items = [
            item("nginx", Want::Latest),
            item("curl", Want::Present),
            item("old", Want::Removed),
            item("gone", Want::Purged),
            item("kept", Want::Latest),
        ];
        let after = expected_after(&items, &before, &policy);
        let described: Vec<String> =
            describe_changes(&items, &before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(described, ["nginx: 1.22 -> 1.24", "curl: installed 8.0", "old: removed", "gone: purged"]);
    }

    #[test]
    fn plans_installs_pins_upgrades_and_removals() {
        let dpkg = BTreeMap::from([
            ("a".to_string(), pkg("installed", "1.0")),
            ("b".to_string(), pkg("installed", "1.0")),
            ("c".to_string(), pkg("config-files", "1.0")),
            ("d".to_string(), pkg("installed", "3.0")),
        ]);
        let cand = |c: &str, v: &[&str]| Candidates {
            installed: None,
            candidate: Some(c.into()),
            versions: v.iter().map(|s| s.to_string()).collect(),
        };
        let policy = BTreeMap::from([
            ("a".to_string(), cand("2.0", &["2.0", "1.0"])),
            ("b".to_string(), cand("1.0", &["1.0"])),
            ("n".to_string(), cand("5", &["5"])),
            ("d".to_string(), cand("3.0", &["3.0", "2.0"])),
        ]);
        let items = [
            item("a", Want::Latest),
            item("b", Want::Latest),
            item("n", Want::Present),
            item("d", Want::Version("2.0".into())),
            item("c", Want::Purged),
            item("b", Want::Removed),
            Item { name: "f".into(), want: Want::File("/srv/f_1.deb".into()), file_version: Some("1".into()) },
        ];
        assert_eq!(needs_index(&items, &dpkg), ["a", "b", "n", "d"]);
        let p = plan(&items, &dpkg, &policy).unwrap();
        assert_eq!(p.install, ["a", "n", "d=2.0", "/srv/f_1.deb"]);
        assert_eq!(
            (p.remove.as_slice(), p.purge.as_slice()),
            (["b".to_string()].as_slice(), ["c".to_string()].as_slice())
        );

        // Second run, with everything as wanted: nothing to do.
        let done = BTreeMap::from([
            ("a".to_string(), pkg("installed", "2.0")),
            ("n".to_string(), pkg("installed", "5")),
            ("d".to_string(), pkg("installed", "2.0")),
            ("f".to_string(), pkg("installed", "1")),
        ]);
        let settled = [items[0].clone(), items[2].clone(), items[3].clone(), items[4].clone(), items[6].clone()];
        assert!(plan(&settled, &done, &policy).unwrap().is_empty());
        assert!(verify(&settled, &done).is_ok());

        let err = plan(&[item("zzz", Want::Present)], &dpkg, &policy).unwrap_err();
        assert!(matches!(err, PkgError::Unknown(_)));
        let err = plan(&[item("a", Want::Version("9".into()))], &dpkg, &policy).unwrap_err().to_string();
        assert_eq!(err, "package a: version 9 is not available (apt knows: 2.0, 1.0)");
    }

    #[test]
    fn apt_get_command_lines() {
        let opts = Opts { repo: Some("bookworm-backports".into()), verify_gpg: false };
        let args = apt_get_args("install", &opts, &["nginx=1.2".into()]);
        assert_eq!(
            args.join(" "),
            "-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
             --allow-downgrades --allow-unauthenticated -t bookworm-backports install nginx=1.2"
        );
        let plain = apt_get_args("purge", &Opts { repo: None, verify_gpg: true }, &["x".into()]);
        assert_eq!(plain.join(" "), "-y -q -o DPkg::Lock::Timeout=300 purge x");
        let spec = apt_get(plain, APT_TIMEOUT);
        assert!(spec.env.contains(&("DEBIAN_FRONTEND".into(), "noninteractive".into())));
        assert!(spec.env.contains(&("LC_ALL".into(), "C".into())));
    }

    #[test]
    fn changes_and_index_age() {
        let items =
            [item("a", Want::Latest), item("b", Want::Removed), item("c", Want::Purged), item("d", Want::Present)];
        let before = BTreeMap::from([
            ("a".to_string(), pkg("installed", "1")),
            ("b".to_string(), pkg("installed", "1")),
            ("c".to_string(), pkg("config-files", "1")),
        ]);
        let after = BTreeMap::from([
            ("a".to_string(), pkg("installed", "2")),
            ("b".to_string(), pkg("config-files", "1")),
            ("c".to_string(), pkg("not-installed", "")),
            ("d".to_string(), pkg("installed", "7")),
        ]);
        let c: Vec<String> = describe_changes(&items, &before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(c, ["a: 1 -> 2", "b: removed", "c: purged", "d: installed 7"]);

        let now = SystemTime::now();
        assert!(index_stale(None, now));
        assert!(index_stale(Some(now - Duration::from_secs(7200)), now));
        assert!(!index_stale(Some(now - Duration::from_secs(60)), now));
        assert_eq!(parse_control_fields("Package: hello\nVersion: 2.0-1\n").unwrap(), ("hello".into(), "2.0-1".into()));
    }
}
