//! The operator's policy: an optional root-owned file that narrows what the helper will
//! do for the agent, whatever the backend sends.
//!
//! Default path `/etc/opsagent/helper.policy` (`--policy PATH` to use another). No file:
//! no restriction beyond the helper's own checks. The file is read once, at start-up;
//! restart the helper to apply a change. It is opened without following a link, and
//! the *opened* file must be a regular file owned by root and not writable by group or
//! others; its directory must be owned by root and not writable by group or others.
//! Anything else, and any line that does not parse, stops the helper with the file and
//! line in the message: a policy that is not what the operator meant is not applied
//! half-way.
//!
//! Format: one `key = value…` per line, values separated by blanks; `#` starts a
//! comment; a key given twice adds to its list.
//!
//! The policy decides from each state's footprint ([`crate::footprint`]) alone. Two kinds
//! of keys:
//! - *narrowing* keys, from the first version of the format: absent, they allow
//!   everything of their kind; present, only what they list (`modules =` with nothing
//!   after it allows no module at all);
//! - *grant* keys, for what is root-equivalent: under any policy file, absent means
//!   nothing of their kind is allowed.
//!
//! ```text
//! # Narrowing keys.
//! # Only these modules (catalogue names).
//! modules = linux.file linux.dir linux.service linux.apt.package
//! # Paths states may write under (each path and what is below it), and the only
//! # places root reads a file from on a recipe's behalf.
//! write_prefixes = /etc/nginx /srv /var/www
//! # Units linux.service may start, reload or restart (`nginx` means nginx.service).
//! units = nginx php8.2-fpm.service
//! # Packages the package modules may install or remove from the configured sources.
//! packages = nginx php8.2-fpm
//! # Block devices (and what is below them) storage states may write or mount.
//! devices = /dev/xvdf /dev/nvme1n1
//!
//! # Grant keys (nothing unless listed).
//! # Where linux.file may set a set-user-id or set-group-id mode.
//! setid_paths = /opt/app/bin/ping-helper
//! # Mounts other than a block device under /dev or a virtual/network filesystem.
//! mount_kinds = bind loop
//! # Programs common.virtualenv may run as `python-bin`.
//! interpreters = /usr/bin/python3.11
//! # Accounts that may be root or get uid 0 / gid 0 (`root` for root's password).
//! root_accounts = root
//! # Privileged groups (see footprint::PRIVILEGED_GROUPS) accounts may be put in.
//! privileged_groups = adm
//!
//! # Plans (dry runs) show file content changes as a diff, except below these paths,
//! # whose content is named by its checksums only (as is binary content, and any
//! # file that others may not read).
//! secret_paths = /etc/ssl/private /etc/app/credentials.yml
//!
//! # Sandbox of the commands a module runs (systemd hosts; see crate::transient).
//! # By default a command has the full capability of root; these properties of its
//! # transient unit take some away. `sandbox.MODULE = Property=value ...`:
//! sandbox.common.pip.package = ProtectSystem=strict ReadWritePaths=/opt/venvs /root/.cache PrivateTmp=yes
//! sandbox.common.npm.package = ProtectHome=read-only ProtectKernelTunables=yes
//! ```
//!
//! Sandbox properties understood (anything else stops the helper at start): the
//! booleans PrivateTmp, PrivateDevices, PrivateNetwork, PrivateUsers, ProtectKernelTunables,
//! ProtectKernelModules, ProtectKernelLogs, ProtectControlGroups, ProtectClock,
//! ProtectHostname, NoNewPrivileges, RestrictRealtime, RestrictSUIDSGID,
//! LockPersonality, MemoryDenyWriteExecute (`yes`/`no`); ProtectSystem
//! (`yes`/`full`/`strict`/`no`), ProtectHome (`yes`/`read-only`/`tmpfs`/`no`);
//! ReadWritePaths, ReadOnlyPaths, InaccessiblePaths (absolute paths: a value names one,
//! and the blank-separated words after it without `=` add to it). They never replace
//! what the unit runs, as whom, or how it is stopped, nor loosen the read-only sandbox
//! of a plan's sandboxed inspection (set first; its `ReadWritePaths` are dropped: see
//! crate::transient). Where commands run directly (no
//! systemd as PID 1) the key is accepted and has no effect.
//!
//! Command-equivalent states (a footprint that runs code no operator reviewed:
//! `linux.cmd`, command actions of `linux.service`, cron jobs, supervisord programs,
//! puppet, chef, containers, pip/npm/gem, virtualenv requirements, git/hg working
//! copies, package sources and keys, local or unsigned package files) need what
//! `linux.cmd` needs: `linux.cmd` in `modules` (or no `modules` key). A command can
//! still write anywhere its user may.
//!
//! Prefix checks are made on the normalised path and again on the path with its
//! existing directories resolved (so a link inside an allowed tree cannot point a write
//! outside it). They assume that the allowed trees are not writable by untrusted users:
//! such a user could swap a directory for a link between the check and the write. A
//! path of a footprint that does not parse as an absolute path is refused.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use opsagent_proto::catalogue::{self, ModuleParams};
use opsagent_proto::newtypes::{AbsPath, UnitName};
use opsagent_proto::request::{ErrorCode, HelperError};

use crate::footprint::{self, footprint, Footprint, MountKind, Privilege, PRIVILEGED_GROUPS};

pub const DEFAULT_POLICY_PATH: &str = "/etc/opsagent/helper.policy";
/// A policy file is a few lines; anything much larger is not one.
const MAX_POLICY_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file {path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("policy file {0} is a symbolic link; give the real path")]
    Symlink(PathBuf),
    #[error("policy file {path}: {problem}; it must be a regular file owned by root and writable by root only")]
    Unsafe { path: PathBuf, problem: String },
    #[error("{path}:{line}: {problem}")]
    Syntax { path: PathBuf, line: usize, problem: String },
}

/// What the operator allows. `None` in a narrowing field: no restriction of that
/// kind; an empty grant field: nothing of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Where it was read from, for messages; `None`: the built-in "allow all".
    pub source: Option<PathBuf>,
    pub modules: Option<BTreeSet<String>>,
    pub write_prefixes: Option<Vec<AbsPath>>,
    pub units: Option<BTreeSet<UnitName>>,
    pub packages: Option<BTreeSet<String>>,
    pub devices: Option<Vec<AbsPath>>,
    pub setid_paths: Vec<AbsPath>,
    pub mount_kinds: BTreeSet<MountKind>,
    pub interpreters: Vec<AbsPath>,
    pub root_accounts: BTreeSet<String>,
    pub privileged_groups: BTreeSet<String>,
    /// Transient unit properties of the commands each module runs.
    pub sandbox: BTreeMap<String, Vec<(String, SandboxValue)>>,
    /// Trees whose file content a plan never shows (checksums only): a diff goes to
    /// the daemon, the backend and the journal.
    pub secret_paths: Vec<AbsPath>,
}

/// A sandbox property's value, typed as systemd's D-Bus API wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxValue {
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
}

const SANDBOX_BOOLS: &[&str] = &[
    "PrivateTmp",
    "PrivateDevices",
    "PrivateNetwork",
    "PrivateUsers",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "NoNewPrivileges",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
];
const SANDBOX_CHOICES: &[(&str, &[&str])] =
    &[("ProtectSystem", &["yes", "full", "strict", "no"]), ("ProtectHome", &["yes", "read-only", "tmpfs", "no"])];
const SANDBOX_PATHS: &[&str] = &["ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths"];

/// `Property=value ...` of a `sandbox.MODULE` line.
fn parse_sandbox(values: &[&str]) -> Result<Vec<(String, SandboxValue)>, String> {
    let mut out: Vec<(String, SandboxValue)> = Vec::new();
    for word in values {
        let Some((key, value)) = word.split_once('=') else {
            // Another path of the list before it.
            match out.last_mut() {
                Some((_, SandboxValue::Strs(list))) => {
                    list.push(AbsPath::parse(word).map_err(|e| e.to_string())?.to_string());
                    continue;
                }
                _ => return Err(format!("expected Property=value, got {word:?}")),
            }
        };
        let v = if SANDBOX_BOOLS.contains(&key) {
            SandboxValue::Bool(match value {
                "yes" | "true" | "1" | "on" => true,
                "no" | "false" | "0" | "off" => false,
                other => return Err(format!("{key}: {other:?} is not yes or no")),
            })
        } else if let Some((_, choices)) = SANDBOX_CHOICES.iter().find(|(k, _)| *k == key) {
            if !choices.contains(&value) {
                return Err(format!("{key}: {value:?} is not one of {}", choices.join(", ")));
            }
            SandboxValue::Str(value.to_string())
        } else if SANDBOX_PATHS.contains(&key) {
            SandboxValue::Strs(vec![AbsPath::parse(value).map_err(|e| e.to_string())?.to_string()])
        } else {
            return Err(format!(
                "{key:?} is not a sandbox property the helper sets (known: {}, {}, {})",
                SANDBOX_BOOLS.join(" "),
                SANDBOX_CHOICES.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" "),
                SANDBOX_PATHS.join(" ")
            ));
        };
        out.push((key.to_string(), v));
    }
    Ok(out)
}

const KEYS: &str = "modules, write_prefixes, units, packages, devices, setid_paths, mount_kinds, interpreters, \
                    root_accounts, privileged_groups, sandbox.MODULE";

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(source) = &self.source else {
            return f.write_str("no policy file: every module, path and unit allowed");
        };
        let list =
            |items: Option<Vec<String>>| items.map_or_else(|| "any".to_string(), |v| format!("[{}]", v.join(" ")));
        let strings = |s: &BTreeSet<String>| Some(s.iter().cloned().collect::<Vec<_>>());
        let paths = |p: &[AbsPath]| Some(p.iter().map(ToString::to_string).collect::<Vec<_>>());
        write!(
            f,
            "{}: modules {}, write prefixes {}, units {}, packages {}, devices {}; grants: set-id {}, mounts {}, \
             interpreters {}, root accounts {}, privileged groups {}",
            source.display(),
            list(self.modules.as_ref().and_then(strings)),
            list(self.write_prefixes.as_deref().and_then(paths)),
            list(self.units.as_ref().map(|u| u.iter().map(ToString::to_string).collect())),
            list(self.packages.as_ref().and_then(strings)),
            list(self.devices.as_deref().and_then(paths)),
            list(paths(&self.setid_paths)),
            list(Some(self.mount_kinds.iter().map(|k| k.key().to_string()).collect())),
            list(paths(&self.interpreters)),
            list(strings(&self.root_accounts)),
            list(strings(&self.privileged_groups)),
        )?;
        for (module, props) in &self.sandbox {
            write!(f, "; sandbox of {module}: {}", props.len())?;
        }
        if !self.secret_paths.is_empty() {
            write!(f, "; secret paths {}", list(paths(&self.secret_paths)))?;
        }
        Ok(())
    }
}

impl Policy {
    /// The unit properties the policy sets for the commands of `module` (none: the full
    /// capability of root).
    pub fn sandbox_for(&self, module: &str) -> Vec<(String, SandboxValue)> {
        self.sandbox.get(module).cloned().unwrap_or_default()
    }

    /// Reads the policy at `path`. A missing file is no policy when `required` is
    /// false (the default path), an error when the operator named the file.
    pub fn load(path: &Path, required: bool) -> Result<Self, PolicyError> {
        let io_err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| PolicyError::Io { path, op, source }
        };
        let file = match secure_open(path) {
            Ok(f) => f,
            Err(PolicyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        file.take(MAX_POLICY_BYTES + 1).read_to_string(&mut text).map_err(io_err("read"))?;
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::Unsafe { path: path.to_path_buf(), problem: "larger than 1 MiB".into() });
        }
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let mut policy = Self { source: Some(path.to_path_buf()), ..Self::default() };
        for (i, raw) in text.lines().enumerate() {
            let syntax = |problem: String| PolicyError::Syntax { path: path.to_path_buf(), line: i + 1, problem };
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (key, values) =
                line.split_once('=').ok_or_else(|| syntax(format!("expected `key = values`, got {line:?}")))?;
            let values = values.split_whitespace();
            let abs = |p: &str| AbsPath::parse(p).map_err(|e| syntax(e.to_string()));
            let name = |n: &str, what: &str| {
                if valid_name(n) {
                    Ok(n.to_string())
                } else {
                    Err(syntax(format!("{n:?} is not a valid {what} name")))
                }
            };
            if let Some(module) = key.trim().strip_prefix("sandbox.") {
                if catalogue::spec(module).is_none() {
                    return Err(syntax(format!("unknown module {module:?}")));
                }
                let values: Vec<&str> = values.collect();
                let props = parse_sandbox(&values).map_err(syntax)?;
                policy.sandbox.entry(module.to_string()).or_default().extend(props);
                continue;
            }
            match key.trim().replace('-', "_").as_str() {
                "modules" => {
                    let set = policy.modules.get_or_insert_with(BTreeSet::new);
                    for m in values {
                        match catalogue::spec(m) {
                            Some(spec) if spec.builtin => {
                                return Err(syntax(format!("{m} is built into the daemon; the helper never runs it")))
                            }
                            Some(_) => set.insert(m.to_string()),
                            None => return Err(syntax(format!("unknown module {m:?}"))),
                        };
                    }
                }
                "secret_paths" => {
                    for p in values {
                        policy.secret_paths.push(abs(p)?);
                    }
                }
                "write_prefixes" => {
                    let list = policy.write_prefixes.get_or_insert_with(Vec::new);
                    for p in values {
                        list.push(abs(p)?);
                    }
                }
                "units" => {
                    let set = policy.units.get_or_insert_with(BTreeSet::new);
                    for u in values {
                        set.insert(UnitName::service(u).map_err(|e| syntax(e.to_string()))?);
                    }
                }
                "packages" => {
                    let set = policy.packages.get_or_insert_with(BTreeSet::new);
                    for p in values {
                        set.insert(name(p, "package")?);
                    }
                }
                "devices" => {
                    let list = policy.devices.get_or_insert_with(Vec::new);
                    for p in values {
                        list.push(abs(p)?);
                    }
                }
                "setid_paths" => {
                    for p in values {
                        policy.setid_paths.push(abs(p)?);
                    }
                }
                "interpreters" => {
                    for p in values {
                        policy.interpreters.push(abs(p)?);
                    }
                }
                "mount_kinds" => {
                    for k in values {
                        policy.mount_kinds.insert(match k {
                            "bind" => MountKind::Bind,
                            "loop" => MountKind::Loop,
                            other => {
                                return Err(syntax(format!(
                                    "mount kind {other:?} is not one of bind, loop (block devices and virtual \
                                     filesystems need no grant)"
                                )))
                            }
                        });
                    }
                }
                "root_accounts" => {
                    for a in values {
                        policy.root_accounts.insert(name(a, "user")?);
                    }
                }
                "privileged_groups" => {
                    for g in values {
                        if !PRIVILEGED_GROUPS.contains(&g) && g != "0" {
                            return Err(syntax(format!(
                                "{g:?} is not a privileged group (those are: {}); other groups need no grant",
                                PRIVILEGED_GROUPS.join(" ")
                            )));
                        }
                        policy.privileged_groups.insert(g.to_string());
                    }
                }
                other => return Err(syntax(format!("unknown key {other:?} (known: {KEYS})"))),
            }
        }
        Ok(policy)
    }

    /// Whether the policy lets `params` run, judged from its footprint alone; `Err` is
    /// a [`ErrorCode::Denied`] naming the rule.
    pub fn check(&self, params: &ModuleParams) -> Result<(), HelperError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        self.check_footprint(params.name(), &footprint(params))
            .map_err(|why| HelperError::new(ErrorCode::Denied, format!("{why} (policy {})", source.display())))
    }

    /// The first thing in `f` the policy does not grant, in words.
    pub fn check_footprint(&self, module: &str, f: &Footprint) -> Result<(), String> {
        if !self.module_allowed(module) {
            return Err(format!("module {module} is not in the policy's `modules`"));
        }
        if let Some(run) = f.runs.first() {
            if !self.module_allowed("linux.cmd") {
                return Err(format!(
                    "{module} would run {} as {}, which is a command, and linux.cmd is not in the policy's `modules` \
                     (command-equivalent)",
                    run.what, run.as_user
                ));
            }
        }
        if let Some(prefixes) = &self.write_prefixes {
            for raw in &f.writes {
                match AbsPath::parse(raw) {
                    Ok(path) if under_prefixes(&path, prefixes) => {}
                    Ok(path) => {
                        return Err(format!(
                            "{module} would write {path}, which is not under the policy's `write_prefixes`"
                        ))
                    }
                    Err(e) => return Err(format!("{module} would write {raw:?}, which is not a path: {e}")),
                }
            }
            for raw in &f.follows {
                let path = AbsPath::parse(raw).map_err(|e| format!("{module}: {raw:?} is not a path: {e}"))?;
                if !resolve_existing(&path).is_some_and(|real| resolved_under(&real, prefixes)) {
                    return Err(format!(
                        "{module} would write {path}, which leads outside the policy's `write_prefixes`"
                    ));
                }
            }
            for raw in &f.reads {
                match AbsPath::parse(raw) {
                    Ok(path) if under_prefixes(&path, prefixes) => {}
                    _ => {
                        return Err(format!(
                            "{module} would have root read {raw}, which is not under the policy's `write_prefixes`"
                        ))
                    }
                }
            }
        }
        if let Some(units) = &self.units {
            for u in &f.units {
                // A name that is not a unit name fails in the module itself; under a
                // `units` list it is simply not listed.
                match footprint::unit(u) {
                    Some(unit) if units.contains(&unit) => {}
                    Some(unit) => return Err(format!("unit {unit} is not in the policy's `units`")),
                    None => return Err(format!("unit {u:?} is not in the policy's `units`")),
                }
            }
        }
        if let Some(packages) = &self.packages {
            if let Some(p) = f.packages.iter().find(|p| !packages.contains(&p.name)) {
                return Err(format!("{} package {} is not in the policy's `packages`", p.manager, p.name));
            }
        }
        if let Some(devices) = &self.devices {
            for raw in &f.devices {
                if !AbsPath::parse(raw).is_ok_and(|d| devices.iter().any(|g| d.starts_with(g))) {
                    return Err(format!("{module} would write device {raw}, which is not in the policy's `devices`"));
                }
            }
        }
        for raw in &f.set_id {
            if !AbsPath::parse(raw).is_ok_and(|p| self.setid_paths.iter().any(|g| p.starts_with(g))) {
                return Err(format!(
                    "{module} would give {raw} a set-user-id or set-group-id mode, which the policy's `setid_paths` \
                     does not grant"
                ));
            }
        }
        for m in &f.mounts {
            if matches!(m.kind, MountKind::Bind | MountKind::Loop) && !self.mount_kinds.contains(&m.kind) {
                return Err(format!(
                    "{module} would make a {} mount of {} at {}, which the policy's `mount_kinds` does not grant",
                    m.kind.key(),
                    m.device,
                    m.path
                ));
            }
        }
        for raw in &f.interpreters {
            if !AbsPath::parse(raw).is_ok_and(|p| self.interpreters.contains(&p)) {
                return Err(format!("{module} would run {raw} as root, which is not in the policy's `interpreters`"));
            }
        }
        for a in &f.accounts {
            // `user NAME` or `group NAME`: the grant names the account.
            let account = a.name.split_once(' ').map(|(_, n)| n);
            for p in &a.privileged {
                match p {
                    Privilege::Root(why) if !account.is_some_and(|u| self.root_accounts.contains(u)) => {
                        return Err(format!(
                            "{module} would give {} {why}, which the policy's `root_accounts` does not grant",
                            a.name
                        ))
                    }
                    Privilege::Group(g) if !self.privileged_groups.contains(g) => {
                        return Err(format!(
                            "{module} would change {} through privileged group {g}, which the policy's \
                             `privileged_groups` does not grant",
                            a.name
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Whether `path` is at or below one of the `secret_paths` (compared as written and
    /// with links of its existing directories resolved).
    pub fn is_secret(&self, path: &AbsPath) -> bool {
        !self.secret_paths.is_empty()
            && (self.secret_paths.iter().any(|p| path.starts_with(p)) || under_prefixes(path, &self.secret_paths))
    }

    pub fn module_allowed(&self, module: &str) -> bool {
        self.modules.as_ref().is_none_or(|m| m.contains(module))
    }
}

/// A package, user or group name: no blank, no option, no path.
fn valid_name(n: &str) -> bool {
    !n.is_empty() && !n.starts_with('-') && n.chars().all(|c| c.is_ascii_alphanumeric() || "._+-:@".contains(c))
}

fn resolved_under(resolved: &Path, prefixes: &[AbsPath]) -> bool {
    prefixes.iter().any(|p| {
        let prefix = resolve_existing(p).unwrap_or_else(|| p.as_path().to_path_buf());
        resolved.starts_with(prefix)
    })
}

fn under_prefixes(path: &AbsPath, prefixes: &[AbsPath]) -> bool {
    if !prefixes.iter().any(|p| path.starts_with(p)) {
        return false;
    }
    // The same with links resolved: the deepest existing ancestor (the path itself
    // excluded: a link there is not followed by the file states) resolved, plus the
    // rest, must be under a prefix resolved the same way.
    let resolved = resolve_existing(&path.parent()).map(|parent| match path.as_path().file_name() {
        Some(name) => parent.join(name),
        None => parent,
    });
    resolved.is_some_and(|r| resolved_under(&r, prefixes))
}

/// `path` with its deepest existing ancestor canonicalised and the missing rest added.
fn resolve_existing(path: &AbsPath) -> Option<PathBuf> {
    let mut missing = Vec::new();
    let mut cur = path.as_path();
    loop {
        match std::fs::canonicalize(cur) {
            Ok(real) => {
                let mut out = real;
                for part in missing.iter().rev() {
                    out.push(part);
                }
                return Some(out);
            }
            Err(_) => {
                missing.push(cur.file_name()?.to_os_string());
                cur = cur.parent()?;
            }
        }
    }
}

/// Opens `path` for reading the way a root process must open a file that decides what
/// it allows: no link followed, and ownership and mode checked on the opened file and
/// its directory (after the open, so the file checked is the file read).
fn secure_open(path: &Path) -> Result<File, PolicyError> {
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    // Read-only (`OpenOptions` only for O_NOFOLLOW/O_NONBLOCK, no write flag): the file
    // is checked on its descriptor once opened; nothing is written.
    #[allow(clippy::disallowed_methods)]
    let file = OpenOptions::new().read(true).custom_flags(flags.bits()).open(path).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::ELOOP) {
            PolicyError::Symlink(path.to_path_buf())
        } else {
            PolicyError::Io { path: path.to_path_buf(), op: "open", source: e }
        }
    })?;
    let unsafe_ = |problem: String| PolicyError::Unsafe { path: path.to_path_buf(), problem };
    let meta = file.metadata().map_err(|source| PolicyError::Io { path: path.to_path_buf(), op: "stat", source })?;
    if !meta.is_file() {
        return Err(unsafe_("not a regular file".into()));
    }
    check_owner_mode(meta.uid(), meta.mode()).map_err(|p| unsafe_(p.to_string()))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dmeta = std::fs::metadata(dir).map_err(|source| PolicyError::Io {
        path: dir.to_path_buf(),
        op: "stat the directory of",
        source,
    })?;
    check_owner_mode(dmeta.uid(), dmeta.mode())
        .map_err(|p| unsafe_(format!("its directory {}: {p}", dir.display())))?;
    Ok(file)
}

fn check_owner_mode(uid: u32, mode: u32) -> Result<(), &'static str> {
    if uid != 0 {
        return Err("not owned by root");
    }
    if mode & 0o022 != 0 {
        return Err("writable by group or others");
    }
    Ok(())
}

/// Wraps any policy error in the words a refusal to start needs.
pub fn startup_error(e: PolicyError) -> anyhow::Error {
    anyhow::anyhow!("refusing to start: {e}")
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sandbox_lines_give_a_module_typed_unit_properties() {
        let p = Policy::parse(
            Path::new("/p"),
            "sandbox.common.pip.package = ProtectSystem=strict ReadWritePaths=/opt/venvs /root/.cache PrivateTmp=yes\n\
             sandbox.common.pip.package = NoNewPrivileges=no\n",
        )
        .unwrap();
        assert_eq!(
            p.sandbox_for("common.pip.package"),
            vec![
                ("ProtectSystem".to_string(), SandboxValue::Str("strict".into())),
                ("ReadWritePaths".to_string(), SandboxValue::Strs(vec!["/opt/venvs".into(), "/root/.cache".into()])),
                ("PrivateTmp".to_string(), SandboxValue::Bool(true)),
                ("NoNewPrivileges".to_string(), SandboxValue::Bool(false)),
            ]
        );
        assert!(p.sandbox_for("linux.cmd").is_empty());
        for (bad, why) in [
            ("sandbox.linux.nope = PrivateTmp=yes", "unknown module \"linux.nope\""),
            ("sandbox.linux.cmd = ExecStart=/bin/evil", "\"ExecStart\" is not a sandbox property"),
            ("sandbox.linux.cmd = ProtectSystem=maybe", "ProtectSystem: \"maybe\" is not one of yes, full, strict, no"),
            ("sandbox.linux.cmd = PrivateTmp=perhaps", "PrivateTmp: \"perhaps\" is not yes or no"),
            ("sandbox.linux.cmd = ReadOnlyPaths=relative", "absolute"),
            ("sandbox.linux.cmd = /opt", "expected Property=value"),
        ] {
            let e = Policy::parse(Path::new("/p"), bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("helper.policy");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn parses_lists_comments_repeats_and_short_unit_names() {
        let dir = private_dir();
        let p = write(
            dir.path(),
            "# the operator's rules\nmodules = linux.file linux.dir  # trailing comment\nmodules = linux.service\n\n\
             write-prefixes = /srv /etc/nginx/\nunits = nginx php-fpm.service\n",
            0o644,
        );
        let policy = Policy::load(&p, true).unwrap();
        let modules: Vec<&str> = policy.modules.as_ref().unwrap().iter().map(String::as_str).collect();
        assert_eq!(modules, ["linux.dir", "linux.file", "linux.service"]);
        let prefixes: Vec<String> = policy.write_prefixes.as_ref().unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(prefixes, ["/srv", "/etc/nginx"]);
        let units: Vec<&str> = policy.units.as_ref().unwrap().iter().map(UnitName::as_str).collect();
        assert_eq!(units, ["nginx.service", "php-fpm.service"]);
        assert!(policy.to_string().contains("modules [linux.dir linux.file linux.service]"), "{policy}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let path = Path::new("/etc/opsagent/helper.policy");
        for (text, line, needle) in [
            ("modules = linux.file\nmodules linux.dir\n", 2, "expected `key = values`"),
            ("\n\nmodules = linux.teleport\n", 3, "unknown module \"linux.teleport\""),
            ("modules = meta.wait\n", 1, "built into the daemon"),
            ("write_prefixes = srv\n", 1, "not absolute"),
            ("write_prefixes = /srv/../etc\n", 1, "\"..\""),
            ("units = bad/unit\n", 1, "not a valid systemd unit name"),
            ("# ok\ncolour = blue\n", 2, "unknown key \"colour\""),
        ] {
            let err = Policy::parse(path, text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("/etc/opsagent/helper.policy:{line}: ")), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn unsafe_files_are_refused_and_a_missing_default_is_no_policy() {
        let dir = private_dir();
        let p = write(dir.path(), "modules = linux.file\n", 0o664);
        let err = Policy::load(&p, true).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        assert!(Policy::load(&p, true).unwrap_err().to_string().contains("not owned by root"));
        std::os::unix::fs::chown(&p, Some(0), None).unwrap();
        assert!(Policy::load(&p, true).is_ok());

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Policy::load(&p, true).unwrap_err().to_string();
        assert!(err.contains("its directory") && err.contains("writable by group or others"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

        let link = dir.path().join("link.policy");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(Policy::load(&link, true), Err(PolicyError::Symlink(_))));

        let missing = dir.path().join("missing.policy");
        assert_eq!(Policy::load(&missing, false).unwrap(), Policy::default());
        assert!(Policy::load(&missing, true).unwrap_err().to_string().contains("cannot open"));
        assert!(Policy::load(dir.path(), true).is_err());
    }

    #[test]
    fn modules_units_and_commands_are_checked() {
        let policy = Policy::parse(Path::new("/p"), "modules = linux.file linux.service\nunits = nginx\n").unwrap();
        assert!(policy.check(&params("linux.file", json!({"path": "/etc/x"}))).is_ok());
        let err = policy.check(&params("linux.cmd", json!({"cmd": "true"}))).unwrap_err();
        assert_eq!(err.code, ErrorCode::Denied);
        assert_eq!(err.message, "module linux.cmd is not in the policy's `modules` (policy /p)");

        assert!(policy.check(&params("linux.service", json!({"name": [{"key": "nginx", "value": "reload"}]}))).is_ok());
        let err = policy.check(&params("linux.service", json!({"name": ["nginx", "sshd"]}))).unwrap_err();
        assert!(err.message.contains("unit sshd.service is not in the policy's `units`"), "{}", err.message);
        let err = policy
            .check(&params("linux.service", json!({"name": [{"key": "nginx", "value": "rm -rf /"}]})))
            .unwrap_err();
        assert!(err.message.contains("is a command, and linux.cmd is not"), "{}", err.message);

        // No policy file: everything.
        assert!(Policy::default().check(&params("linux.cmd", json!({"cmd": "true"}))).is_ok());
    }

    #[test]
    fn write_prefixes_cover_file_states_and_resolve_links() {
        let dir = private_dir();
        let root = dir.path().canonicalize().unwrap();
        let allowed = root.join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::create_dir(root.join("outside")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), allowed.join("escape")).unwrap();
        let policy = Policy::parse(Path::new("/p"), &format!("write_prefixes = {}\n", allowed.display())).unwrap();
        let file = |p: PathBuf| params("linux.file", json!({"path": p}));

        assert!(policy.check(&file(allowed.join("new/deep/file"))).is_ok());
        assert!(policy.check(&file(allowed.clone())).is_ok());
        let err = policy.check(&file(root.join("outside/x"))).unwrap_err();
        assert!(err.message.contains("not under the policy's `write_prefixes`"), "{}", err.message);
        // Lexically inside, but through a link to the outside.
        assert!(policy.check(&file(allowed.join("escape/x"))).is_err());
        // A link as the final component is the file states' business (they refuse it).
        assert!(policy.check(&file(allowed.join("escape"))).is_ok());

        let dirs = params("linux.dir", json!({"path": [allowed.join("a"), "/etc/b"]}));
        assert!(policy.check(&dirs).unwrap_err().message.contains("/etc/b"));
        let link = params("linux.symlink", json!({"target": "/etc/l", "source": allowed}));
        assert!(policy.check(&link).is_err());
        let cmd = params("linux.cmd", json!({"cmd": "true", "cwd": "/"}));
        assert!(policy.check(&cmd).unwrap_err().message.contains("linux.cmd would write /"));
        let repo = params("linux.apt.repo", json!({"name": "x", "content": "deb file:/srv ./"}));
        assert!(policy.check(&repo).unwrap_err().message.contains("/etc/apt/sources.list.d/x.list"));
        // A checkout follows a link at its path: where it leads must be allowed.
        let git = |p: PathBuf| params("common.git", json!({"path": p, "repo": "/srv/r.git"}));
        assert!(policy.check(&git(allowed.join("app"))).is_ok());
        let err = policy.check(&git(allowed.join("escape"))).unwrap_err();
        assert!(err.message.contains("leads outside the policy's `write_prefixes`"), "{}", err.message);
        let svn = params("common.svn", json!({"path": "/srv/wc", "repo": "svn://h/r"}));
        assert!(policy.check(&svn).unwrap_err().message.contains("common.svn would write /srv/wc"));
        let venv = params("common.virtualenv", json!({"path": "/opt/venv"}));
        assert!(policy.check(&venv).unwrap_err().message.contains("common.virtualenv would write /opt/venv"));
        assert!(policy.check(&params("common.virtualenv", json!({"path": allowed.join("venv")}))).is_ok());
        let npm = params("common.npm.package", json!({"name": "x", "path": "/srv/app"}));
        assert!(policy.check(&npm).unwrap_err().message.contains("/srv/app"));
        // Modules that write no path are not concerned (a global npm install is a package).
        assert!(policy.check(&params("linux.group", json!({"groupname": "g"}))).is_ok());
        assert!(policy.check(&params("common.npm.package", json!({"name": "x"}))).is_ok());
    }

    #[test]
    fn write_prefixes_cover_mount_points_and_fstab() {
        let dir = private_dir();
        let root = dir.path().canonicalize().unwrap();
        let allowed = root.join("mnt");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::create_dir(root.join("outside")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), allowed.join("escape")).unwrap();
        let mount = |path: PathBuf, fstab: bool| {
            params("linux.mount", json!({"device": "/dev/xvdf", "filesystem": "ext4", "path": path, "fstab": fstab}))
        };
        let only_mnt = Policy::parse(Path::new("/p"), &format!("write_prefixes = {}\n", allowed.display())).unwrap();
        assert!(only_mnt.check(&mount(allowed.join("data"), false)).is_ok());
        let err = only_mnt.check(&mount(root.join("outside/data"), false)).unwrap_err();
        assert!(
            err.message.contains("linux.mount would write") && err.message.contains("not under"),
            "{}",
            err.message
        );
        // With fstab: true, /etc/fstab must be allowed as well.
        let err = only_mnt.check(&mount(allowed.join("data"), true)).unwrap_err();
        assert_eq!(
            err.message,
            "linux.mount would write /etc/fstab, which is not under the policy's `write_prefixes` (policy /p)"
        );
        let with_fstab =
            Policy::parse(Path::new("/p"), &format!("write_prefixes = {} /etc/fstab\n", allowed.display())).unwrap();
        assert!(with_fstab.check(&mount(allowed.join("data"), true)).is_ok());
        // A link at the mount point is followed by the mount: where it leads counts.
        let err = with_fstab.check(&mount(allowed.join("escape"), false)).unwrap_err();
        assert!(err.message.contains("leads outside the policy's `write_prefixes`"), "{}", err.message);
        // `/etc` covers fstab too.
        let etc = Policy::parse(Path::new("/p"), &format!("write_prefixes = {} /etc\n", allowed.display())).unwrap();
        assert!(etc.check(&mount(allowed.join("data"), true)).is_ok());
    }

    #[test]
    fn grant_keys_parse_and_bad_values_name_file_and_line() {
        let policy = Policy::parse(
            Path::new("/p"),
            "setid_paths = /opt/bin\nmount-kinds = bind loop\ninterpreters = /usr/bin/python3\n\
             root_accounts = toor\nprivileged_groups = adm docker\npackages = nginx\ndevices = /dev/xvdf\n",
        )
        .unwrap();
        assert_eq!(policy.mount_kinds, BTreeSet::from([MountKind::Bind, MountKind::Loop]));
        assert!(policy.to_string().contains("mounts [bind loop]"), "{policy}");
        let path = Path::new("/etc/opsagent/helper.policy");
        for (text, line, needle) in [
            ("# x\nsetid_paths = bin\n", 2, "not absolute"),
            ("mount_kinds = bind tmpfs\n", 1, "mount kind \"tmpfs\" is not one of bind, loop"),
            ("interpreters = python3\n", 1, "not absolute"),
            ("\n\nroot_accounts = a;b\n", 3, "\"a;b\" is not a valid user name"),
            ("privileged_groups = users\n", 1, "\"users\" is not a privileged group"),
            ("packages = -oDpkg::x\n", 1, "not a valid package name"),
            ("devices = /dev/../etc\n", 1, "\"..\""),
        ] {
            let err = Policy::parse(path, text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("/etc/opsagent/helper.policy:{line}: ")), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn root_equivalent_footprints_need_their_grant_even_with_linux_cmd() {
        // No `modules` key: linux.cmd is allowed, yet the grant keys still apply.
        let none = Policy::parse(Path::new("/p"), "units = web\n").unwrap();
        let granted = Policy::parse(
            Path::new("/p"),
            "setid_paths = /opt/bin\nmount_kinds = bind\ninterpreters = /usr/bin/python3\nroot_accounts = toor\n\
             privileged_groups = docker\n",
        )
        .unwrap();
        for (module, raw, needle) in [
            ("linux.file", json!({"path": "/opt/bin/x", "mode": "04755"}), "setid_paths"),
            (
                "linux.mount",
                json!({"device": "/etc", "filesystem": "none", "opts": "bind", "path": "/mnt/e"}),
                "mount_kinds",
            ),
            ("common.virtualenv", json!({"path": "/srv/v", "python-bin": "/usr/bin/python3"}), "interpreters"),
            ("linux.user", json!({"username": "toor", "password": "x", "uid": "0"}), "root_accounts"),
            ("linux.user", json!({"username": "u", "password": "x", "groups": ["docker"]}), "privileged_groups"),
        ] {
            let p = params(module, raw);
            let err = none.check(&p).unwrap_err();
            assert_eq!(err.code, ErrorCode::Denied);
            assert!(err.message.contains(needle), "{module}: {}", err.message);
            assert!(granted.check(&p).is_ok(), "{module}: {:?}", granted.check(&p));
        }
        // A grant is exact: another set-id path, another interpreter, another account.
        assert!(granted.check(&params("linux.file", json!({"path": "/srv/x", "mode": "02755"}))).is_err());
        assert!(granted
            .check(&params("common.virtualenv", json!({"path": "/v", "python-bin": "/usr/bin/python3.1"})))
            .is_err());
        assert!(granted.check(&params("linux.user", json!({"username": "root", "password": "x"}))).is_err());
        assert!(granted
            .check(&params("linux.user", json!({"username": "u", "password": "x", "groups": ["sudo"]})))
            .is_err());
        // Sticky bits and plain modes need nothing.
        assert!(none.check(&params("linux.file", json!({"path": "/tmp/x", "mode": "01777"}))).is_ok());
    }

    #[test]
    fn packages_and_devices_narrow_and_command_equivalents_need_linux_cmd() {
        let policy = Policy::parse(
            Path::new("/p"),
            "modules = linux.apt.package linux.mkfs linux.cronjob common.git\npackages = nginx\ndevices = /dev/xvdf\n",
        )
        .unwrap();
        assert!(policy.check(&params("linux.apt.package", json!({"name": ["nginx"]}))).is_ok());
        let err = policy.check(&params("linux.apt.package", json!({"name": ["nginx", "sudo"]}))).unwrap_err();
        assert!(err.message.contains("apt package sudo is not in the policy's `packages`"), "{}", err.message);
        assert!(policy.check(&params("linux.mkfs", json!({"device": "/dev/xvdf", "fstype": "ext4"}))).is_ok());
        let err = policy.check(&params("linux.mkfs", json!({"device": "/dev/sda", "fstype": "ext4"}))).unwrap_err();
        assert!(err.message.contains("device /dev/sda, which is not in the policy's `devices`"), "{}", err.message);
        for (module, raw) in [
            ("linux.cronjob", json!({"cmd": ["true"], "user": "nobody"})),
            ("common.git", json!({"path": "/srv/app", "repo": "https://h/r", "user": "www-data"})),
        ] {
            let err = policy.check(&params(module, raw)).unwrap_err();
            assert!(err.message.contains("which is a command, and linux.cmd is not"), "{}", err.message);
        }
    }

    #[test]
    fn reads_and_unparsable_paths_are_denied_under_write_prefixes() {
        let policy = Policy::parse(Path::new("/p"), "write_prefixes = /srv\n").unwrap();
        let debconf = params("linux.apt.package", json!({"name": ["x"], "deb-conf-file": "/etc/shadow"}));
        let err = policy.check(&debconf).unwrap_err();
        assert!(err.message.contains("would have root read /etc/shadow"), "{}", err.message);
        // A path that does not parse never reaches the policy: the catalogue refuses it
        // when the request is decoded (helper/tests/validate.rs).
        crate::states::testutil::refused("linux.file", json!({"path": "srv/x"}), "not absolute");
        let archive = params("common.archive", json!({"path": "/etc", "source": "https://h/a.tgz"}));
        assert!(policy.check(&archive).unwrap_err().message.contains("common.archive would write /etc,"));
    }

    #[test]
    fn writes_where_root_finds_code_are_command_equivalent() {
        let policy = Policy::parse(
            Path::new("/p"),
            "modules = linux.file linux.dir linux.symlink\nwrite_prefixes = /etc /usr\n",
        )
        .unwrap();
        assert!(policy.check(&params("linux.file", json!({"path": "/etc/nginx/nginx.conf"}))).is_ok());
        for (module, raw) in [
            ("linux.file", json!({"path": "/etc/cron.d/job", "content": "* * * * * root id\n"})),
            ("linux.file", json!({"path": "/etc/sudoers.d/agent"})),
            ("linux.file", json!({"path": "/etc/systemd/system/evil.service"})),
            ("linux.symlink", json!({"target": "/usr/local/bin/sudo", "source": "/etc/nginx"})),
            // Above such a place: a recursive chown of /etc.
            ("linux.dir", json!({"path": ["/etc"], "user": "nobody"})),
        ] {
            let err = policy.check(&params(module, raw.clone())).unwrap_err();
            assert!(err.message.contains("root runs or trusts what is there"), "{module} {raw}: {}", err.message);
        }
        // With commands granted, the prefixes alone decide.
        let with_cmd = Policy::parse(Path::new("/p"), "write_prefixes = /etc\n").unwrap();
        assert!(with_cmd.check(&params("linux.file", json!({"path": "/etc/cron.d/job"}))).is_ok());
    }
}
