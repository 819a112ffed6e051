//! What every module can do to the host, declared from its parameters alone: the paths
//! it writes or follows, the files root reads for it, the code it can cause to run and
//! as whom, the units, accounts, mounts, packages, devices and set-id modes it touches.
//!
//! [`footprint`] is one exhaustive `match` over [`ModuleParams`]: a module added to the
//! catalogue does not compile until it declares its footprint here. The policy
//! ([`crate::policy`]) decides from footprints alone; it never looks at a module's
//! parameters itself. A footprint errs on the side of naming too much: what it leaves
//! out, no policy can refuse.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::newtypes::{AbsPath, UnitName};
use opsagent_proto::param_types::{Dict, Entry, HomeFile, KeySource, PathDict};

use nix::unistd::{Group, User};

/// Everything one state may touch. Paths are as the recipe gives them, trimmed;
/// whether they parse is the policy's question (one that does not is refused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Paths the recipe chose that the state creates or changes. A link at the final
    /// component is not followed (the file states refuse it).
    pub writes: Vec<String>,
    /// Written paths through which a link at the final component *is* followed (a
    /// checkout or a mount point often lives behind one): where it leads counts.
    pub follows: Vec<String>,
    /// Fixed system files the module itself names (the timezone files, a user's
    /// crontab, the account databases): granted with the module, never chosen by a
    /// recipe.
    pub system_files: Vec<&'static str>,
    /// Files root opens on the recipe's behalf and hands to a tool.
    pub reads: Vec<String>,
    /// Code the state can cause to run that no operator reviewed: each makes the
    /// module command-equivalent (it needs the grant `linux.cmd` needs).
    pub runs: Vec<Run>,
    /// Programs named by a recipe that root runs (`python-bin`).
    pub interpreters: Vec<String>,
    /// systemd units started, reloaded or restarted (names as given).
    pub units: Vec<String>,
    /// Accounts created or changed, with what makes one privileged.
    pub accounts: Vec<Account>,
    pub mounts: Vec<Mount>,
    /// Packages installed or removed from the configured sources.
    pub packages: Vec<Package>,
    /// Block devices written (formatted, made part of a volume or an array).
    pub devices: Vec<String>,
    /// Paths given a set-user-id or set-group-id mode.
    pub set_id: Vec<String>,
}

/// Code a state can run: what, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub what: String,
    pub as_user: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// `user NAME` or `group NAME`.
    pub name: String,
    /// Why the account is privileged (uid 0, a privileged group…), if it is.
    pub privileged: Vec<Privilege>,
}

/// What makes an account change root-equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// uid 0, gid 0 or the root account itself (its password, shell, home).
    Root(String),
    /// Membership in (or the gid of) a group that gives root or reads secrets.
    Group(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MountKind {
    /// A block device under `/dev`.
    Device,
    /// Another part of the file tree made visible elsewhere (`bind`, `rbind`,
    /// `move`, overlay): `/etc` under an allowed prefix is `/etc` writable.
    Bind,
    /// A file used as a disk (`loop`, or any device that is not a block device under
    /// `/dev`, which mount(8) loops by itself): a crafted image can hold set-id roots.
    Loop,
    /// No backing store on this host: tmpfs, proc, a network share.
    Virtual,
}

impl MountKind {
    pub fn key(self) -> &'static str {
        match self {
            MountKind::Device => "device",
            MountKind::Bind => "bind",
            MountKind::Loop => "loop",
            MountKind::Virtual => "virtual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub path: String,
    pub device: String,
    pub kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub manager: &'static str,
    pub name: String,
}

/// Groups whose members are root, or read what root reads, on common distributions.
/// Membership, a primary gid of one of them, or a change to the group itself is
/// privileged.
pub const PRIVILEGED_GROUPS: &[&str] = &[
    "root",
    "sudo",
    "wheel",
    "admin",
    "adm",
    "disk",
    "shadow",
    "kmem",
    "docker",
    "lxd",
    "libvirt",
    "staff",
    "systemd-journal",
    "opsagent",
];

/// The footprint of one state. One arm per module: adding a module to the catalogue
/// breaks this match until the new module says what it touches.
pub fn footprint(params: &ModuleParams) -> Footprint {
    let mut f = Footprint::default();
    match params {
        ModuleParams::LinuxFile(p) => {
            f.writes.push(p.path.to_string());
            // Without `mode` set-id bits are dropped from new content (file.rs).
            if p.mode.is_some_and(|m| m.bits() & 0o6000 != 0) && !p.absent {
                f.set_id.push(p.path.to_string());
            }
        }
        ModuleParams::LinuxDir(p) => {
            f.writes.extend(p.path.iter().map(ToString::to_string));
            // A set-group-id directory only passes its group on to new files; the
            // set-user-id bit means nothing on a Linux directory. Neither runs anything.
        }
        ModuleParams::LinuxSymlink(p) => f.writes.push(p.target.to_string()),
        ModuleParams::CommonArchive(p) => f.writes.push(p.path.to_string()),
        ModuleParams::LinuxCmd(p) => {
            f.writes.push(p.cwd.to_string());
            f.runs.push(Run { what: "the command".into(), as_user: as_user(p.user.as_deref()) });
        }
        ModuleParams::LinuxService(p) => {
            for e in p.name.iter() {
                f.units.push(e.key.trim().to_string());
                if is_command_action(e) {
                    f.runs.push(Run { what: "a service action that is a shell command".into(), as_user: root() });
                }
            }
        }
        ModuleParams::LinuxCronjob(p) => {
            f.system_files.push("the user's crontab");
            f.runs.push(Run { what: "a cron job".into(), as_user: as_user(Some(p.user.as_str())) });
        }
        ModuleParams::LinuxSupervisord(p) => {
            f.reads.push(p.config.to_string());
            f.runs.push(Run { what: "the programs of a supervisord configuration".into(), as_user: root() });
        }
        ModuleParams::LinuxAptPackage(p) => {
            packages(&mut f, "apt", &p.name, ".deb", p.verify_gpg);
            if let Some(conf) = &p.deb_conf_file {
                f.reads.push(conf.to_string());
            }
        }
        ModuleParams::LinuxYumPackage(p) => packages(&mut f, "yum", &p.name, ".rpm", p.verify_gpg),
        ModuleParams::LinuxAptRepo(p) => {
            f.writes.extend(crate::states::repo::apt_list_path(&p.name));
            f.runs.push(source_run("an apt source"));
        }
        ModuleParams::LinuxAptPpa(p) => {
            f.writes.extend(crate::states::repo::ppa_paths(&p.name));
            f.runs.push(source_run("a PPA"));
        }
        ModuleParams::LinuxYumRepo(p) => {
            f.writes.extend(crate::states::repo::yum_repo_path(&p.name));
            if let Some(rpm) = p.rpm_url.as_deref().filter(|u| !opsagent_proto::checks::is_remote(u)) {
                f.reads.push(local(rpm));
            }
            f.runs.push(source_run("a yum repository"));
        }
        ModuleParams::LinuxRpmKey(p) => {
            if let KeySource::Local(file) = &p.path {
                f.reads.push(file.to_string());
            }
            f.runs.push(source_run("a package signing key"));
        }
        ModuleParams::LinuxUser(p) => {
            f.system_files.push("the account databases");
            let mut privileged = Vec::new();
            let name = p.username.as_str();
            if name == "root" {
                privileged.push(Privilege::Root("the root account".into()));
            }
            if p.uid.is_some_and(is_id_zero) {
                privileged.push(Privilege::Root("uid 0".into()));
            }
            if p.gid.is_some_and(is_id_zero) {
                privileged.push(Privilege::Root("gid 0".into()));
            }
            // `AccountNames` holds names only (no numeric id, no comma list); a comma
            // list and gid 0 are still judged here, should one ever reach the footprint
            // (defence in depth: with the type's check removed, the compromised-daemon
            // suite's "users,wheel" and "0" were granted).
            for g in p.groups.iter().flat_map(|a| a.iter()).flat_map(|g| g.split(',')).map(str::trim) {
                if g == "0" || PRIVILEGED_GROUPS.contains(&g) {
                    privileged.push(Privilege::Group(g.to_string()));
                }
            }
            if let Some(name) = p.gid.and_then(privileged_group_by_gid) {
                privileged.push(Privilege::Group(name));
            }
            // Without gid, a new account whose name is that of an existing group gets
            // that group as its primary one (the adaptor's `app`/`app` pattern): a user
            // named like a privileged group joins it.
            if p.gid.is_none() && PRIVILEGED_GROUPS.contains(&name) && name != "root" {
                privileged.push(Privilege::Group(name.to_string()));
            }
            // The password, shell or home of an account that already is privileged
            // (a distribution's default sudoer, an existing uid-0 account) is as much
            // root as making one.
            privileged.extend(existing_privilege(name));
            f.accounts.push(Account { name: format!("user {name}"), privileged });
            if let Some(home) = &p.home {
                f.writes.push(home.to_string());
            }
        }
        ModuleParams::LinuxGroup(p) => {
            f.system_files.push("the account databases");
            let name = p.groupname.as_str();
            let mut privileged = Vec::new();
            if p.gid.is_some_and(is_id_zero) {
                privileged.push(Privilege::Root("gid 0".into()));
            }
            if PRIVILEGED_GROUPS.contains(&name) {
                privileged.push(Privilege::Group(name.to_string()));
            }
            if let Some(other) = p.gid.and_then(privileged_group_by_gid).filter(|g| g != name) {
                privileged.push(Privilege::Group(other));
            }
            f.accounts.push(Account { name: format!("group {name}"), privileged });
        }
        ModuleParams::CommonSshAuth(p) => {
            // An authorized key is a login: code run as that user by whoever holds it.
            f.system_files.push("the user's authorized_keys");
            ssh_file(&mut f, Some(p.username.as_str()), &p.filename);
            if !p.absent {
                f.runs.push(Run {
                    what: "a login with an authorized key".into(),
                    as_user: as_user(Some(p.username.as_str())),
                });
            }
        }
        ModuleParams::CommonSshKnownHost(p) => {
            f.system_files.push("the user's known_hosts");
            ssh_file(&mut f, p.username.as_deref(), &p.filename);
        }
        ModuleParams::LinuxSelinux(_) => f.system_files.push(crate::states::selinux::CONFIG),
        ModuleParams::CommonGemSource(_) => f.runs.push(source_run("a gem source")),
        ModuleParams::CommonTimezone(_) => {
            f.system_files.extend(["/etc/localtime", "/etc/timezone", "/etc/adjtime"]);
        }
        ModuleParams::LinuxMkfs(p) => f.devices.push(p.device.to_string()),
        ModuleParams::LinuxMount(p) => {
            let path = p.path.to_string();
            f.writes.push(path.clone());
            f.follows.push(path.clone());
            if p.fstab {
                f.writes.push(FSTAB.to_string());
            }
            let device = trim(&p.device);
            let kind = mount_kind(&device, &p.filesystem, p.opts.as_deref().unwrap_or(""));
            if kind == MountKind::Device {
                f.devices.push(device.clone());
            }
            f.mounts.push(Mount { path, device, kind });
        }
        ModuleParams::LinuxLvmPv(p) => f.devices.extend(p.path.iter().map(ToString::to_string)),
        ModuleParams::LinuxLvmVg(p) => f.devices.extend(p.path.iter().map(ToString::to_string)),
        ModuleParams::LinuxLvmLv(p) => f.devices.extend(p.path.iter().flat_map(|a| a.iter()).map(ToString::to_string)),
        ModuleParams::LinuxRaid(p) => {
            f.devices.push(p.device_name.to_string());
            f.devices.extend(p.devices.iter().map(ToString::to_string));
        }
        ModuleParams::LinuxDockerPulled(_) => f.system_files.push("the docker image store"),
        ModuleParams::LinuxDockerPushed(_) => f.system_files.push("the docker image store"),
        ModuleParams::LinuxDockerBuilt(p) => {
            f.reads.push(p.path.to_string());
            f.runs.push(Run { what: "the build steps of a Dockerfile".into(), as_user: "root in a container".into() });
        }
        ModuleParams::LinuxDockerRunning(p) => {
            docker_container(&mut f, p.volumes.as_ref(), p.binds.as_ref(), p.files.as_ref(), p.devices.as_ref());
        }
        ModuleParams::LinuxDockerDeploy(p) => {
            f.system_files.push("the helper's docker-config directory");
            docker_container(&mut f, p.volumes.as_ref(), p.binds.as_ref(), None, p.devices.as_ref());
        }
        ModuleParams::LinuxPuppetAgent(_) => f.runs.push(Run { what: "a puppet catalogue".into(), as_user: root() }),
        ModuleParams::LinuxPuppetApply(p) => {
            f.reads.extend(p.manifests.iter().map(ToString::to_string));
            f.runs.push(Run { what: "puppet manifests".into(), as_user: root() });
        }
        ModuleParams::LinuxPuppetRun(_) => f.runs.push(Run { what: "a puppet run".into(), as_user: root() }),
        ModuleParams::LinuxChefClient(p) => {
            f.reads.extend(p.config.iter().chain(&p.client_key).map(ToString::to_string));
            f.runs.push(Run { what: "a chef run list".into(), as_user: root() });
        }
        ModuleParams::LinuxChefSolo(p) => {
            f.reads.extend(p.config.iter().map(ToString::to_string));
            f.runs.push(Run { what: "chef recipes".into(), as_user: root() });
        }
        ModuleParams::CommonPipPackage(_) => f.runs.push(install_scripts("pip")),
        ModuleParams::CommonGemPackage(_) => f.runs.push(install_scripts("gem")),
        ModuleParams::CommonNpmPackage(p) => {
            f.writes.extend(p.path.iter().map(ToString::to_string));
            f.runs.push(install_scripts("npm"));
        }
        ModuleParams::CommonVirtualenv(p) => {
            f.writes.push(p.path.to_string());
            if let Some(bin) = &p.python_bin {
                f.interpreters.push(bin.to_string());
            }
            if let Some(req) = &p.requirements_file {
                f.reads.push(req.to_string());
                f.runs.push(install_scripts("the requirements file's"));
            }
            if let Some(dirs) = &p.extra_search_dir {
                f.reads.extend(dirs.iter().map(ToString::to_string));
                f.runs.push(Run { what: "seed packages from extra-search-dir".into(), as_user: root() });
            }
        }
        ModuleParams::CommonGit(p) => {
            vcs(&mut f, &p.path, p.user.as_deref(), "git");
            f.reads.extend(p.ssh_key_file.iter().map(ToString::to_string));
        }
        ModuleParams::CommonHg(p) => vcs(&mut f, &p.path, p.user.as_deref(), "hg"),
        ModuleParams::CommonSvn(p) => {
            // svn has no client-side hooks and reads its configuration from the
            // running user's home, not from the working copy.
            let path = p.path.to_string();
            f.writes.push(path.clone());
            f.follows.push(path);
            // A local repository is read by root and its files end up in the
            // working copy.
            let repo = p.repo.trim();
            if repo.starts_with("file://") || repo.starts_with('/') {
                f.reads.push(local(repo));
            }
        }
        // Retired: both states fail without changing anything (see states::mesos).
        ModuleParams::LinuxMesosMaster(_) | ModuleParams::LinuxMesosSlave(_) => {}
        // Never sent to the helper; they touch nothing on the host.
        ModuleParams::MetaComment(_) | ModuleParams::MetaWait(_) => {}
    }
    // Whatever the module, a write where root looks for code or for who may be root is
    // running code as root (a cron.d file, a unit, a sudoers drop-in, a binary in PATH),
    // and so is a write above such a place (a recursive chown of /etc).
    let code_writes: Vec<&'static str> = f.writes.iter().filter_map(|w| root_code_location(w)).collect();
    for loc in code_writes {
        f.runs.push(Run { what: format!("files in {loc} (root runs or trusts what is there)"), as_user: root() });
    }
    f
}

/// Where root finds code to run, or who may become root. A write at, under or above
/// one of these is command-equivalent.
pub const ROOT_CODE_LOCATIONS: &[&str] = &[
    "/etc/cron.d",
    "/etc/cron.hourly",
    "/etc/cron.daily",
    "/etc/cron.weekly",
    "/etc/cron.monthly",
    "/etc/crontab",
    "/var/spool/cron",
    "/etc/systemd",
    "/run/systemd",
    "/lib/systemd",
    "/usr/lib/systemd",
    "/etc/init.d",
    "/etc/rc.local",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ld.so.preload",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/environment",
    "/etc/pam.d",
    "/etc/security",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/ssh",
    "/etc/modprobe.d",
    "/etc/udev",
    "/etc/apt/apt.conf.d",
    "/etc/logrotate.d",
    "/etc/update-motd.d",
    "/etc/opsagent",
    "/root",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/local/lib",
];

/// The root-code location `path` is at, under or above (lexically; the policy's
/// prefix checks resolve links).
fn root_code_location(path: &str) -> Option<&'static str> {
    let path = AbsPath::parse(path).ok()?;
    ROOT_CODE_LOCATIONS
        .iter()
        .copied()
        .find(|loc| AbsPath::parse(loc).is_ok_and(|loc| path.starts_with(&loc) || loc.starts_with(&path)))
}

impl Footprint {
    /// Whether the state needs the grant `linux.cmd` needs.
    pub fn command_equivalent(&self) -> bool {
        !self.runs.is_empty()
    }
}

/// The privileged group that has `gid` on this host, if one does.
fn privileged_group_by_gid(gid: u64) -> Option<String> {
    let gid = u32::try_from(gid).ok()?;
    PRIVILEGED_GROUPS
        .iter()
        .find(|g| Group::from_name(g).ok().flatten().is_some_and(|grp| grp.gid.as_raw() == gid))
        .map(|g| (*g).to_string())
}

/// What makes the existing account `name` privileged on this host: uid 0, gid 0, a
/// privileged primary or supplementary group.
fn existing_privilege(name: &str) -> Vec<Privilege> {
    let mut out = Vec::new();
    if let Ok(Some(user)) = User::from_name(name) {
        if user.uid.is_root() {
            out.push(Privilege::Root("uid 0 (it has it already)".into()));
        }
        if user.gid.as_raw() == 0 {
            out.push(Privilege::Root("gid 0 (it has it already)".into()));
        }
        if let Some(g) = privileged_group_by_gid(u64::from(user.gid.as_raw())) {
            out.push(Privilege::Group(g));
        }
    }
    for g in PRIVILEGED_GROUPS {
        if Group::from_name(g).ok().flatten().is_some_and(|grp| grp.mem.iter().any(|m| m == name)) {
            out.push(Privilege::Group((*g).to_string()));
        }
    }
    out
}

/// An id that is 0 as the kernel's 32-bit `uid_t`/`gid_t` would take it (a wire value
/// of 2^32 is root once truncated).
fn is_id_zero(id: u64) -> bool {
    id.is_multiple_of(1 << 32)
}

/// What `linux.mount` writes with `fstab: true`.
pub const FSTAB: &str = "/etc/fstab";

/// A `linux.service` action that is neither empty nor one of the keywords.
pub fn is_command_action(e: &Entry) -> bool {
    !matches!(e.value_or_empty().trim(), "" | "reload" | "restart")
}

fn trim(s: &str) -> String {
    s.trim().to_string()
}

fn root() -> String {
    "root".to_string()
}

fn as_user(user: Option<&str>) -> String {
    user.map(str::trim).filter(|u| !u.is_empty()).unwrap_or("root").to_string()
}

/// A `file://` URI or a path, as the path root opens.
fn local(uri: &str) -> String {
    let uri = uri.trim();
    uri.strip_prefix("file://").unwrap_or(uri).to_string()
}

/// The key file is a write the policy's prefixes judge, wherever it is: a file named in
/// the user's home is resolved as the module resolves it (the account database's home,
/// which may be `/` or `/root`), so `filename=.bashrc` with `username=root`, or
/// `etc/ld.so.preload` in an account whose home is `/`, is the write it really is. An
/// account that does not exist gives a path no prefix grants (the state fails anyway).
fn ssh_file(f: &mut Footprint, username: Option<&str>, filename: &HomeFile) {
    match crate::states::ssh::target(username, filename) {
        Ok(t) => f.writes.push(t.path.to_string()),
        Err(_) => f.writes.push(format!("~{}/{filename}", username.unwrap_or_default())),
    }
}

fn install_scripts(tool: &str) -> Run {
    Run { what: format!("{tool} install scripts"), as_user: root() }
}

/// A package source or key the recipe chooses decides which maintainer scripts root
/// runs at the next install.
fn source_run(what: &str) -> Run {
    Run { what: format!("the maintainer scripts of packages from {what} the recipe chooses"), as_user: root() }
}

/// A package list: names from the configured sources are packages; a local file, or
/// any install without signature checks, is code the recipe supplies.
fn packages(f: &mut Footprint, manager: &'static str, names: &Dict, ext: &str, verify_gpg: bool) {
    for e in names.iter() {
        let value = e.value_or_empty().trim();
        if value.ends_with(ext) || value.contains("://") || e.key.trim().ends_with(ext) {
            // A download is no file of the host's: only a local one is a read.
            if !opsagent_proto::checks::is_remote(value) {
                f.reads.push(local(value));
            }
            f.runs.push(Run { what: "the maintainer scripts of a package file".into(), as_user: root() });
        } else {
            f.packages.push(Package { manager, name: e.key.trim().to_string() });
        }
    }
    if !verify_gpg {
        f.runs.push(Run { what: format!("the maintainer scripts of unsigned {manager} packages"), as_user: root() });
    }
}

/// A working copy: written, followed, and its hooks and configuration (which other
/// grants may write) run as the checkout's user.
fn vcs(f: &mut Footprint, path: &AbsPath, user: Option<&str>, tool: &str) {
    let path = path.to_string();
    f.writes.push(path.clone());
    f.follows.push(path);
    f.runs.push(Run { what: format!("{tool} hooks and configuration of the working copy"), as_user: as_user(user) });
}

fn docker_container(
    f: &mut Footprint,
    volumes: Option<&Dict>,
    binds: Option<&Dict>,
    files: Option<&PathDict>,
    devices: Option<&Dict>,
) {
    for e in volumes.iter().chain(binds.iter()).flat_map(|d| d.iter()) {
        let host = e.key.trim().to_string();
        f.mounts.push(Mount { path: e.value_or_empty().trim().to_string(), device: host, kind: MountKind::Bind });
    }
    for e in files.iter().flat_map(|d| d.iter()) {
        f.reads.push(e.value_or_empty().trim().to_string());
    }
    for e in devices.iter().flat_map(|d| d.iter()) {
        f.devices.push(e.key.trim().to_string());
    }
    f.runs.push(Run { what: "a container (root in it, host paths bound into it)".into(), as_user: root() });
}

/// How `mount(8)` would treat this device, type and options.
pub fn mount_kind(device: &str, filesystem: &str, opts: &str) -> MountKind {
    let opts: Vec<&str> = opts.split(',').map(str::trim).collect();
    let fstype = filesystem.trim();
    if opts.iter().any(|o| matches!(*o, "bind" | "rbind" | "move" | "rmove"))
        || matches!(fstype, "bind" | "rbind" | "overlay" | "aufs" | "unionfs")
    {
        return MountKind::Bind;
    }
    if opts.iter().any(|o| *o == "loop" || o.starts_with("loop=")) {
        return MountKind::Loop;
    }
    if device.starts_with("//") {
        // `//server/share`: a network share.
        return MountKind::Virtual;
    }
    if !device.starts_with('/') {
        // tmpfs, proc, `host:/export`: no local backing file.
        return virtual_or_loop(device);
    }
    let under = |d: &AbsPath, dir: &str| AbsPath::parse(dir).is_ok_and(|dir| d.starts_with(&dir));
    let under_dev = AbsPath::parse(device)
        .is_ok_and(|d| under(&d, "/dev") && !["/dev/shm", "/dev/mqueue", "/dev/pts"].iter().any(|w| under(&d, w)));
    // A device that is there must be a block device; one that is missing will fail
    // the mount, whatever the policy says.
    let block = std::fs::metadata(device).map_or(true, |m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    if under_dev && block {
        MountKind::Device
    } else {
        MountKind::Loop
    }
}

fn virtual_or_loop(device: &str) -> MountKind {
    // A relative device name is resolved by mount(8) against its working directory:
    // treat it as a file.
    if device.contains('/') && !device.contains(':') {
        MountKind::Loop
    } else {
        MountKind::Virtual
    }
}

/// A unit name as the policy compares it, when it is one.
pub fn unit(name: &str) -> Option<UnitName> {
    UnitName::service(name.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::MODULES;
    use serde_json::{json, Value};
    use std::collections::BTreeSet;

    /// Parameters that reach every part of each module's footprint (several per
    /// module where one parameter changes the kind of thing done).
    fn samples() -> Vec<(&'static str, Value)> {
        let d = |k: &str, v: &str| json!([{"key": k, "value": v}]);
        vec![
            ("common.archive", json!({"path": "/srv/a", "source": "https://h/a.tgz"})),
            ("common.gem.package", json!({"name": d("rails", "")})),
            ("common.gem.source", json!({"url": "https://gems.example.org"})),
            ("common.ssh.auth", json!({"username": "deploy", "content": "AAAAC3NzaC1lZDI1NTE5AAAAIHy3"})),
            ("common.ssh.known_host", json!({"hostname": "git.example.org", "filename": "/srv/known_hosts"})),
            ("common.git", json!({"path": "/srv/g", "repo": "https://h/r", "ssh-key-file": "/srv/k"})),
            ("common.hg", json!({"path": "/srv/h", "repo": "https://h/r"})),
            ("common.npm.package", json!({"name": d("x", ""), "path": "/srv/n"})),
            ("common.pip.package", json!({"name": d("x", "")})),
            ("common.svn", json!({"path": "/srv/s", "repo": "svn://h/r"})),
            ("common.svn", json!({"path": "/srv/s", "repo": "file:///srv/repo"})),
            ("common.timezone", json!({"name": "UTC"})),
            (
                "common.virtualenv",
                json!({"path": "/srv/v", "python-bin": "/usr/bin/python3", "requirements-file": "/srv/r.txt",
                       "extra-search-dir": ["/srv/w"]}),
            ),
            ("linux.apt.package", json!({"name": d("nginx", ""), "deb-conf-file": "/srv/d"})),
            ("linux.apt.package", json!({"name": d("x", "/srv/x.deb"), "verify-gpg": false})),
            ("linux.apt.ppa", json!({"name": "ppa:a/b"})),
            ("linux.apt.repo", json!({"name": "x", "content": "deb http://h/ ./"})),
            ("linux.chef.client", json!({"server": "https://h", "config": "/srv/c.rb", "client_key": "/srv/k.pem"})),
            ("linux.chef.solo", json!({"config": "/srv/solo.rb"})),
            ("linux.cmd", json!({"cmd": "true", "cwd": "/srv"})),
            ("linux.cronjob", json!({"cmd": ["true"]})),
            ("linux.dir", json!({"path": ["/srv/d"], "mode": "02775"})),
            ("linux.docker.built", json!({"path": "/srv/ctx", "tag": "t"})),
            (
                "linux.docker.deploy",
                json!({"container": "c", "image": "i", "volumes": d("/srv/v", "/v"), "devices": d("/dev/x", ""),
                       "binds": d("/srv/b", "/b")}),
            ),
            ("linux.docker.pulled", json!({"repo": "i"})),
            ("linux.docker.pushed", json!({"repository": "i"})),
            (
                "linux.docker.running",
                json!({"container": "c", "image": "i", "binds": d("/srv/b", "/b"), "files": d("/f", "/srv/f"),
                       "devices": d("/dev/x", "")}),
            ),
            ("linux.file", json!({"path": "/srv/f", "mode": "04755"})),
            ("linux.group", json!({"groupname": "sudo", "gid": "0"})),
            ("linux.lvm.lv", json!({"name": "lv", "vg-name": "vg", "path": ["/dev/x"]})),
            ("linux.lvm.pv", json!({"path": ["/dev/x"]})),
            ("linux.lvm.vg", json!({"name": "vg", "path": ["/dev/x"]})),
            (
                "linux.mesos.master",
                json!({"cluster_name": "c", "master_ip": "1.2.3.4", "masters_addresses": d("a", "b"), "server_id": "1"}),
            ),
            (
                "linux.mesos.slave",
                json!({"attributes": d("a", "b"), "masters_addresses": d("a", "b"), "slave_ip": "1.2.3.4"}),
            ),
            ("linux.mkfs", json!({"device": "/dev/x", "fstype": "ext4"})),
            ("linux.mount", json!({"device": "/dev/x", "filesystem": "ext4", "path": "/srv/m", "fstab": true})),
            ("linux.mount", json!({"device": "/srv", "filesystem": "none", "opts": "bind", "path": "/srv/m"})),
            ("linux.mount", json!({"device": "/srv/img", "filesystem": "ext4", "path": "/srv/m"})),
            ("linux.puppet.agent", json!({"server": "h"})),
            ("linux.puppet.apply", json!({"manifests": ["/srv/site.pp"]})),
            ("linux.puppet.run", json!({})),
            ("linux.raid", json!({"device-name": "/dev/md0", "devices": ["/dev/x"], "level": "raid1"})),
            ("linux.rpm.key", json!({"path": "/srv/k"})),
            ("linux.selinux", json!({"mode": "permissive", "boolean": d("httpd_can_network_connect", "on")})),
            ("linux.service", json!({"name": [{"key": "web", "value": "reload"}, {"key": "db", "value": "x"}]})),
            ("linux.supervisord", json!({"config": "/srv/s.conf", "name": ["p"]})),
            ("linux.symlink", json!({"source": "/srv/a", "target": "/srv/l"})),
            (
                "linux.user",
                json!({"username": "root", "password": "x", "uid": "0", "gid": "0", "groups": ["sudo"], "home": "/srv/h"}),
            ),
            ("linux.yum.package", json!({"name": d("x", "/srv/x.rpm"), "verify-gpg": false})),
            ("linux.yum.package", json!({"name": d("nginx", "")})),
            ("linux.yum.repo", json!({"name": "x", "content": "[x]", "rpm-url": "/srv/x.rpm"})),
            ("meta.comment", json!({"comment": "c"})),
            ("meta.wait", json!({"state": "@{host.state-1}"})),
        ]
    }

    /// The README's table of what each module grants, from the samples' footprints.
    fn table() -> String {
        let mut rows = String::from(
            "| Module | Command-equivalent: runs | Writes | Root reads | System files | Other grants it needs |\n\
             |---|---|---|---|---|---|\n",
        );
        let samples = samples();
        for spec in MODULES {
            let prints: Vec<Footprint> = samples
                .iter()
                .filter(|(m, _)| *m == spec.name)
                .map(|(m, raw)| footprint(&params(m, raw.clone())))
                .collect();
            assert!(!prints.is_empty(), "no sample for {}", spec.name);
            let set = |f: &dyn Fn(&Footprint) -> Vec<String>| -> String {
                let s: BTreeSet<String> = prints.iter().flat_map(f).collect();
                if s.is_empty() {
                    "–".into()
                } else {
                    s.into_iter().collect::<Vec<_>>().join("; ")
                }
            };
            let runs = set(&|f| f.runs.iter().map(|r| r.what.clone()).collect());
            let writes = set(&|f| {
                let mut w = Vec::new();
                if f.writes.iter().any(|p| p != FSTAB) {
                    w.push("recipe paths".to_string());
                }
                if !f.follows.is_empty() {
                    w.push("links at them followed".to_string());
                }
                if f.writes.iter().any(|p| p == FSTAB) {
                    w.push(FSTAB.to_string());
                }
                w
            });
            let reads = set(&|f| if f.reads.is_empty() { vec![] } else { vec!["recipe paths".into()] });
            let system = set(&|f| f.system_files.iter().map(|s| s.to_string()).collect());
            let grants = set(&|f| {
                let mut g = Vec::new();
                let mut add = |yes: bool, key: &str| {
                    if yes {
                        g.push(format!("`{key}`"));
                    }
                };
                add(!f.units.is_empty(), "units");
                add(!f.packages.is_empty(), "packages");
                add(!f.devices.is_empty(), "devices");
                add(!f.set_id.is_empty(), "setid_paths");
                add(f.mounts.iter().any(|m| matches!(m.kind, MountKind::Bind | MountKind::Loop)), "mount_kinds");
                add(!f.interpreters.is_empty(), "interpreters");
                add(
                    f.accounts.iter().any(|a| a.privileged.iter().any(|p| matches!(p, Privilege::Root(_)))),
                    "root_accounts",
                );
                add(
                    f.accounts.iter().any(|a| a.privileged.iter().any(|p| matches!(p, Privilege::Group(_)))),
                    "privileged_groups",
                );
                g
            });
            rows.push_str(&format!("| {} | {runs} | {writes} | {reads} | {system} | {grants} |\n", spec.name));
        }
        rows
    }

    #[test]
    fn the_readme_table_matches_the_footprints() {
        let readme = include_str!("../README.md");
        let start = "<!-- footprint-table: generated by footprint::tests::table -->\n";
        let end = "<!-- footprint-table end -->";
        let generated = table();
        let documented = readme
            .split_once(start)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(table, _)| table)
            .unwrap_or_else(|| panic!("helper/README.md has no footprint table; generated:\n{generated}"));
        assert_eq!(
            documented, generated,
            "helper/README.md's table differs from the footprints; generated:\n{generated}"
        );
    }

    #[test]
    fn mount_kinds_follow_what_mount_would_do() {
        assert_eq!(mount_kind("/dev/xvdf", "ext4", ""), MountKind::Device);
        assert_eq!(mount_kind("/etc", "none", "bind"), MountKind::Bind);
        assert_eq!(mount_kind("/etc", "none", "ro,rbind"), MountKind::Bind);
        assert_eq!(mount_kind("overlay", "overlay", "lowerdir=/etc"), MountKind::Bind);
        assert_eq!(mount_kind("/dev/xvdf", "ext4", "loop"), MountKind::Loop);
        assert_eq!(mount_kind("/srv/disk.img", "ext4", ""), MountKind::Loop);
        assert_eq!(mount_kind("/dev/shm/disk.img", "ext4", ""), MountKind::Loop);
        // A regular file under /dev is a file, not a device.
        assert_eq!(mount_kind("/dev/null", "ext4", ""), MountKind::Loop);
        assert_eq!(mount_kind("tmpfs", "tmpfs", "size=1m"), MountKind::Virtual);
        assert_eq!(mount_kind("host:/export", "nfs", ""), MountKind::Virtual);
        assert_eq!(mount_kind("//server/share", "cifs", ""), MountKind::Virtual);
        assert_eq!(mount_kind("images/disk.img", "ext4", ""), MountKind::Loop);
    }

    #[test]
    fn existing_accounts_and_gids_of_privileged_groups_count() {
        // root exists everywhere: changing its shell is changing root.
        let f = footprint(&params("linux.user", json!({"username": "root", "password": "x", "shell": "/bin/sh"})));
        assert!(f.accounts[0].privileged.contains(&Privilege::Root("uid 0 (it has it already)".into())), "{f:?}");
        // A group given the gid of a privileged group that exists here.
        let Some((name, gid)) = PRIVILEGED_GROUPS
            .iter()
            .filter(|g| **g != "root")
            .find_map(|g| Group::from_name(g).ok().flatten().map(|grp| ((*g).to_string(), grp.gid.as_raw())))
        else {
            panic!("no privileged group but root on this host: the test needs one (adm, sudo…)");
        };
        let f = footprint(&params("linux.group", json!({"groupname": "plain", "gid": gid.to_string()})));
        assert_eq!(f.accounts[0].privileged, vec![Privilege::Group(name.clone())]);
        let f = footprint(&params("linux.user", json!({"username": "u-new", "password": "x", "gid": gid.to_string()})));
        assert_eq!(f.accounts[0].privileged, vec![Privilege::Group(name.clone())]);
        // A new user named like a privileged group gets it as its primary group.
        let f = footprint(&params("linux.user", json!({"username": name.clone()})));
        assert!(f.accounts[0].privileged.contains(&Privilege::Group(name)), "{f:?}");
    }

    #[test]
    fn packages_from_sources_are_packages_and_files_are_code() {
        let f = footprint(&params(
            "linux.apt.package",
            json!({"name": [{"key": "nginx"}, {"key": "x", "value": "file:///srv/x.deb"}]}),
        ));
        assert_eq!(f.packages, vec![Package { manager: "apt", name: "nginx".into() }]);
        assert_eq!(f.reads, vec!["/srv/x.deb".to_string()]);
        assert!(f.command_equivalent());
        let f = footprint(&params("linux.yum.package", json!({"name": [{"key": "bash", "value": "5.1"}]})));
        assert!(!f.command_equivalent() && f.packages.len() == 1);
    }
}
