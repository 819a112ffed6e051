//! `linux.mount`: a device mounted at a path, optionally persisted in `/etc/fstab`.
//!
//! Every round:
//! 1. The device is resolved (`UUID=`/`LABEL=`/`PARTUUID=`/`PARTLABEL=` through
//!    `blkid -l -o device -t`). A block device or an image file must already hold a
//!    filesystem of type `filesystem` (`blkid -p`): a device that holds another one, or
//!    none, is refused rather than mounted with the wrong driver. Sources that are
//!    neither (`server:/export`, `tmpfs`, a ZFS dataset) are passed on as given.
//! 2. The mount point is created when missing (root-owned, 0755, parents included).
//! 3. `/proc/self/mountinfo` says what is mounted there (the topmost mount). The same
//!    device (same device number, same source path, or for an image file the loop device
//!    backed by it): nothing to do. Nothing: it is mounted (see below), and mountinfo
//!    must show it afterwards. Something else: the state fails; it never unmounts what
//!    it did not mount.
//! 4. With `fstab: true`, `/etc/fstab` holds exactly one line for the mount point:
//!    `DEVICE PATH FS OPTS DUMP PASS` (`OPTS` default `defaults`). The file is rewritten
//!    (atomically, keeping its owner and mode) only when that line is missing or
//!    differs; a differing line for the same mount point is replaced in place, further
//!    lines for it are dropped, every other line is kept byte for byte. `fstab: false`
//!    leaves the file alone (it does not remove a line written earlier).
//!
//! Who mounts ([`Mounter`]). Under its unit the helper has neither the mount system
//! calls nor CAP_SYS_ADMIN, and a mount made in its private mount namespace would not
//! reach the host. So where systemd is PID 1, systemd mounts ([`SystemdMount`], over
//! D-Bus), in the host's namespace, from where the mount propagates into the helper's:
//! - `fstab: false`: a transient unit `<escaped path>.mount` (`What=`, `Where=`,
//!   `Type=`, `Options=`), gone once unmounted and at reboot, like a mount(8) mount;
//! - `fstab: true`: the line is written first; systemd reloads (daemon-reload) when the
//!   file changed, and before mounting (the unit it generated may predate a hand edit
//!   or a reload that failed in an earlier round); then the unit its fstab generator
//!   made from the line is started. Where there is no such unit (in a container the
//!   generator ignores device entries), a transient unit with the same settings mounts
//!   it, and the outcome says so.
//!
//! Elsewhere (the cron-fallback hosts) `mount -t FS [-o OPTS] DEVICE PATH` mounts
//! ([`MountCommand`]), and the fstab line is written after it.
//!
//! Mount options of an existing mount are not compared (no remount), as a mount that
//! is in use cannot always take new options; `opts` applies when this state mounts.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::LinuxMount;
use opsagent_proto::newtypes::{AbsPath, UnitName};
use opsagent_proto::request::{Change, Outcome};
use tokio::sync::OnceCell;
use zbus::zvariant::Value;

use super::{block_devices_hidden, probe, require_tool, tool, StorageToolError, HIDDEN_HINT};
use crate::cancel::Cancel;
use crate::exec::{self, ToolError};
use crate::fsutil::{self, FsError};
use crate::systemd::{self, Job, ServiceError, ServiceManager, Systemd};

/// systemd's answer to `StartUnit` of a unit it has no file for.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
/// systemd's answer to `StartTransientUnit` of a name already loaded.
const UNIT_EXISTS: &str = "org.freedesktop.systemd1.UnitExists";

/// Where the host's tables are; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct Host {
    pub fstab: AbsPath,
    pub mountinfo: PathBuf,
}

impl Host {
    pub fn system() -> Self {
        Self {
            fstab: AbsPath::parse("/etc/fstab").expect("a valid absolute path"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("parameter path: refusing to mount over /")]
    Root,
    #[error("parameter path: {0} is too long to be named by a systemd mount unit")]
    UnitName(String),
    #[error("parameter device: it is empty")]
    NoDevice,
    #[error("parameter filesystem: {0:?} is not a filesystem type name")]
    FsType(String),
    #[error("parameter {0}: it may not contain blanks or newlines")]
    Blank(&'static str),
    #[error("no device with {0} was found (blkid)")]
    NotFound(String),
    #[error("device {0} does not exist")]
    Missing(String),
    #[error("device {0} is not visible: {HIDDEN_HINT}")]
    Hidden(String),
    #[error("refusing to mount {device} as {want}: it holds {found}")]
    WrongFs { device: String, want: String, found: String },
    #[error("refusing to mount {device}: it holds no filesystem (create one with linux.mkfs first)")]
    NoFs { device: String },
    #[error("{path} already has {other} mounted on it (not {device}); unmount it first")]
    Occupied { path: String, other: String, device: String },
    #[error("{by} reported success, but {path} still does not show {device} in {mountinfo}")]
    NotMounted { by: String, path: String, device: String, mountinfo: String },
    #[error(
        "{unit} already exists (a unit file, or an /etc/fstab line, for {path}) but is not mounted; \
         set fstab: true to mount from /etc/fstab, or remove that unit"
    )]
    UnitExists { unit: UnitName, path: String },
    #[error("systemd could not mount it: {source} (journalctl -u {unit} says why)")]
    Job { unit: UnitName, source: Box<ServiceError> },
    #[error(transparent)]
    Systemd(Box<ServiceError>),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Tool(#[from] StorageToolError),
}

impl From<ToolError> for MountError {
    fn from(e: ToolError) -> Self {
        MountError::Tool(e.into())
    }
}

impl From<ServiceError> for MountError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::JobFailed { ref unit, .. } | ServiceError::JobTimeout { ref unit, .. } => {
                MountError::Job { unit: unit.clone(), source: Box::new(e) }
            }
            e => MountError::Systemd(Box::new(e)),
        }
    }
}

impl MountError {
    fn is_cancelled(&self) -> bool {
        match self {
            MountError::Tool(e) => e.is_cancelled(),
            MountError::Systemd(e) => e.is_cancelled(),
            _ => false,
        }
    }
}

/// A mount this state makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// As the recipe gives it (`/dev/xvdf`, `UUID=…`, an image file, `tmpfs`).
    pub device: String,
    /// The mount point, links resolved.
    pub path: PathBuf,
    pub fstype: String,
    pub opts: Option<String>,
    /// `/etc/fstab` holds the line for this mount: mount from it.
    pub from_fstab: bool,
}

/// Who makes the mount: systemd where it is PID 1, mount(8) elsewhere.
#[allow(async_fn_in_trait)] // used with concrete types only; no Send bound needed
pub trait Mounter {
    /// Whether a wanted fstab line is written before mounting, and the mount made from
    /// it; otherwise the mount is made first and the line written afterwards.
    fn mounts_from_fstab(&self) -> bool;
    /// `/etc/fstab` changed, or a mount is about to be made from it: whoever turns it
    /// into mounts reads it again.
    async fn reload_fstab(&self) -> Result<(), MountError>;
    /// Makes the mount; `Some` says how, for the outcome (`by systemd unit …`).
    async fn mount(&self, req: &MountRequest, cancel: &mut Cancel) -> Result<Option<String>, MountError>;
}

/// mount(8), run by the helper itself (hosts where systemd is not PID 1).
#[derive(Debug, Clone, Default)]
pub struct MountCommand {
    /// `None`: `mount` from the helper's search path.
    pub program: Option<PathBuf>,
}

impl Mounter for MountCommand {
    fn mounts_from_fstab(&self) -> bool {
        false
    }

    async fn reload_fstab(&self) -> Result<(), MountError> {
        // mount(8) reads fstab only when asked to mount from it, which this never does.
        Ok(())
    }

    async fn mount(&self, req: &MountRequest, cancel: &mut Cancel) -> Result<Option<String>, MountError> {
        let program = match &self.program {
            Some(p) => p.clone(),
            None => require_tool("mount", "util-linux (mount)").map_err(StorageToolError::from)?,
        };
        let mut args = vec!["-t".to_string(), req.fstype.clone()];
        if let Some(o) = &req.opts {
            args.extend(["-o".to_string(), o.clone()]);
        }
        args.extend([req.device.clone(), req.path.display().to_string()]);
        exec::checked(&tool(&program, args), &[0], cancel).await?;
        Ok(None)
    }
}

/// systemd (PID 1, the host's mount namespace) mounts, asked over D-Bus. The bus is
/// reached only when there is something to do.
pub struct SystemdMount {
    systemd: OnceCell<Systemd>,
}

impl SystemdMount {
    /// The system bus, connected on first use.
    pub fn system() -> Self {
        Self { systemd: OnceCell::new() }
    }

    /// A given connection (a test's peer).
    pub fn with(systemd: Systemd) -> Self {
        Self { systemd: OnceCell::new_with(Some(systemd)) }
    }

    async fn systemd(&self) -> Result<&Systemd, MountError> {
        self.systemd.get_or_try_init(Systemd::system).await.map_err(MountError::from)
    }
}

/// The settings of a transient mount unit for `req`.
fn transient_properties(req: &MountRequest) -> Vec<(&'static str, Value<'static>)> {
    let mut props = vec![
        ("Description", Value::from(format!("{} mounted by opsagent (linux.mount)", req.device))),
        ("What", Value::from(req.device.clone())),
        ("Where", Value::from(req.path.to_string_lossy().into_owned())),
        ("Type", Value::from(req.fstype.clone())),
        // A failed attempt must not stay loaded: the next round could not make the unit
        // again (UnitExists). journalctl -u keeps its messages.
        ("CollectMode", Value::from("inactive-or-failed")),
    ];
    if let Some(o) = &req.opts {
        props.push(("Options", Value::from(o.clone())));
    }
    props
}

impl Mounter for SystemdMount {
    fn mounts_from_fstab(&self) -> bool {
        true
    }

    async fn reload_fstab(&self) -> Result<(), MountError> {
        Ok(self.systemd().await?.daemon_reload().await?)
    }

    async fn mount(&self, req: &MountRequest, cancel: &mut Cancel) -> Result<Option<String>, MountError> {
        let systemd = self.systemd().await?;
        let unit = systemd::unit_name_from_path(&req.path, "mount")
            .map_err(|_| MountError::UnitName(req.path.display().to_string()))?;
        let mut how = format!("by transient systemd unit {unit}");
        if req.from_fstab {
            match systemd.run(&unit, Job::Start, cancel).await {
                Ok(()) => return Ok(Some(format!("by systemd unit {unit}, from /etc/fstab"))),
                Err(e) if e.dbus_error() == Some(NO_SUCH_UNIT) => {
                    how.push_str(
                        " (systemd made no unit from the /etc/fstab line: its fstab generator ignores device \
                         entries in containers)",
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        match systemd.start_transient(&unit, &transient_properties(req), cancel).await {
            Ok(()) => Ok(Some(how)),
            Err(e) if e.dbus_error() == Some(UNIT_EXISTS) => {
                Err(MountError::UnitExists { unit, path: req.path.display().to_string() })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The state on this host: through systemd where it is PID 1, else with mount(8).
pub async fn apply(p: &LinuxMount, cancel: Cancel) -> Outcome {
    if systemd::booted() {
        apply_with(p, &Host::system(), &SystemdMount::system(), cancel).await
    } else {
        apply_with(p, &Host::system(), &MountCommand::default(), cancel).await
    }
}

/// With mount(8) and the given tables (the loop-device tests).
pub async fn apply_on(p: &LinuxMount, host: &Host, cancel: Cancel) -> Outcome {
    apply_with(p, host, &MountCommand::default(), cancel).await
}

pub async fn apply_with<M: Mounter>(p: &LinuxMount, host: &Host, mounter: &M, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = run(p, host, mounter, &mut changes, &mut cancel).await;
    let cancelled = matches!(&result, Err(e) if e.is_cancelled());
    let mut outcome = crate::states::finish(&p.path.0, result, changes, &[]);
    outcome.cancelled = cancelled;
    outcome
}

/// What the `device` parameter names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A block device (`rdev` is its device number).
    Block { path: PathBuf, rdev: u64 },
    /// An image file, mounted through a loop device.
    Image(PathBuf),
    /// Anything else, compared as text with the mount's source.
    Other(String),
}

async fn run<M: Mounter>(
    p: &LinuxMount,
    host: &Host,
    mounter: &M,
    changes: &mut Vec<Change>,
    cancel: &mut Cancel,
) -> Result<(), MountError> {
    let path = p.path.abs().clone();
    if path.is_root() {
        return Err(MountError::Root);
    }
    let device = p.device.trim();
    if device.is_empty() {
        return Err(MountError::NoDevice);
    }
    let fstype = p.filesystem.trim().to_string();
    if fstype.is_empty() || !fstype.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(MountError::FsType(fstype));
    }
    let opts = p.opts.as_deref().map(str::trim).filter(|o| !o.is_empty());
    if device.contains(char::is_whitespace) || opts.is_some_and(|o| o.contains(char::is_whitespace)) {
        return Err(MountError::Blank(if device.contains(char::is_whitespace) { "device" } else { "opts" }));
    }

    let source = resolve(device, cancel).await?;
    match &source {
        Source::Block { path: dev, .. } | Source::Image(dev) => {
            let found = probe(dev, cancel).await?;
            match found.fstype.as_deref() {
                Some(t) if t == fstype && !found.ambivalent => {}
                None if found.is_blank() => return Err(MountError::NoFs { device: device.to_string() }),
                _ => {
                    return Err(MountError::WrongFs {
                        device: device.to_string(),
                        want: fstype,
                        found: found.describe(),
                    })
                }
            }
        }
        Source::Other(_) => {}
    }

    fsutil::create_dirs(&path, fsutil::PARENT_DIR_MODE, (Uid::from_raw(0), Gid::from_raw(0)), changes)?;
    let real = match fs::canonicalize(path.as_path()) {
        Ok(real) => real,
        // A plan did not create the mount point it reported: nothing is mounted there yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && crate::plan::active() => path.as_path().to_path_buf(),
        Err(source) => return Err(MountError::Read { path: path.to_string(), source }),
    };
    let mounted = match mounted_at(&host.mountinfo, &real)? {
        Some(top) if matches_source(&top, &source) => true,
        Some(top) => {
            return Err(MountError::Occupied { path: path.to_string(), other: top.source, device: device.to_string() })
        }
        None => false,
    };
    let line = p.fstab.then(|| FstabLine {
        device: device.to_string(),
        path: path.to_string(),
        fstype: fstype.clone(),
        opts: opts.unwrap_or("defaults").to_string(),
        dump: p.dump,
        pass: p.pass,
    });
    let from_fstab = line.is_some() && mounter.mounts_from_fstab();
    if let Some(line) = line.as_ref().filter(|_| from_fstab) {
        if (write_fstab_line(host, line, changes)? || !mounted) && !crate::plan::active() {
            mounter.reload_fstab().await?;
        }
    }
    if !mounted && crate::plan::active() {
        changes.push(Change::new(path.to_string(), format!("{device} mounted ({fstype})")));
    } else if !mounted {
        let req = MountRequest {
            device: device.to_string(),
            path: real.clone(),
            fstype: fstype.clone(),
            opts: opts.map(str::to_string),
            from_fstab,
        };
        let how = mounter.mount(&req, cancel).await?;
        if !mounted_at(&host.mountinfo, &real)?.is_some_and(|top| matches_source(&top, &source)) {
            return Err(MountError::NotMounted {
                by: if how.is_some() { "systemd" } else { "mount" }.to_string(),
                path: path.to_string(),
                device: device.to_string(),
                mountinfo: host.mountinfo.display().to_string(),
            });
        }
        let what = match how {
            Some(how) => format!("{device} mounted ({fstype}) {how}"),
            None => format!("{device} mounted ({fstype})"),
        };
        changes.push(Change::new(path.to_string(), what));
    }
    if let Some(line) = line.as_ref().filter(|_| !from_fstab) {
        write_fstab_line(host, line, changes)?;
    }
    Ok(())
}

/// [`update_fstab`], noting the change; whether the file was rewritten.
fn write_fstab_line(host: &Host, line: &FstabLine, changes: &mut Vec<Change>) -> Result<bool, MountError> {
    let rewritten = update_fstab(&host.fstab, line)?;
    if rewritten {
        changes.push(Change::new(host.fstab.to_string(), format!("line for {} written: {}", line.path, line.render())));
    }
    Ok(rewritten)
}

async fn resolve(device: &str, cancel: &mut Cancel) -> Result<Source, MountError> {
    let token = ["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL="].iter().any(|t| device.starts_with(t));
    let path = if token {
        let blkid = require_tool("blkid", "util-linux (blkid)").map_err(StorageToolError::from)?;
        let spec =
            tool(&blkid, vec!["-l".into(), "-o".into(), "device".into(), "-t".into(), device.into()]).inspection();
        let done = exec::checked(&spec, &[0, 2], cancel).await?;
        match done.output.lines().map(str::trim).find(|l| l.starts_with('/')) {
            Some(p) if done.exit == exec::Exit::Code(0) => PathBuf::from(p),
            _ if block_devices_hidden() => return Err(MountError::Hidden(device.to_string())),
            _ => return Err(MountError::NotFound(device.to_string())),
        }
    } else if device.starts_with('/') {
        PathBuf::from(device)
    } else {
        return Ok(Source::Other(device.to_string()));
    };
    match fs::metadata(&path) {
        Ok(m) if m.file_type().is_block_device() => Ok(Source::Block { path, rdev: m.rdev() }),
        Ok(m) if m.is_file() => Ok(Source::Image(
            fs::canonicalize(&path).map_err(|source| MountError::Read { path: device.into(), source })?,
        )),
        // A directory (a bind mount) or something else: compared as text.
        Ok(_) => Ok(Source::Other(device.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound && device.starts_with("/dev/") && block_devices_hidden() => {
            Err(MountError::Hidden(device.to_string()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(MountError::Missing(device.to_string())),
        Err(source) => Err(MountError::Read { path: device.to_string(), source }),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u64,
    pub minor: u64,
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parses mountinfo (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            let (major, minor) = l[2].split_once(':')?;
            Some(MountEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: unescape_octal(l[3]),
                mount_point: PathBuf::from(unescape_octal(l[4])),
                fstype: unescape_octal(r[0]),
                source: unescape_octal(r[1]),
            })
        })
        .collect()
}

/// The kernel's and fstab's escaping: `\040` (blank), `\011`, `\012`, `\134`.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn escape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

fn mounted_at(mountinfo: &Path, path: &Path) -> Result<Option<MountEntry>, MountError> {
    let text = fs::read_to_string(mountinfo)
        .map_err(|source| MountError::Read { path: mountinfo.display().to_string(), source })?;
    Ok(parse_mountinfo(&text).into_iter().rfind(|e| e.mount_point == path))
}

fn matches_source(entry: &MountEntry, source: &Source) -> bool {
    match source {
        Source::Block { path, rdev } => {
            let (major, minor) = (nix::sys::stat::major(*rdev), nix::sys::stat::minor(*rdev));
            ((entry.major, entry.minor) == (major, minor) && entry.root == "/")
                || same_file(Path::new(&entry.source), path)
        }
        Source::Image(file) => loop_backing_file(&entry.source).is_some_and(|b| same_file(&b, file)),
        Source::Other(text) => entry.source == *text,
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()) || (x.rdev() != 0 && x.rdev() == y.rdev()),
        _ => false,
    }
}

/// The file behind a loop device (`/dev/loop3`), from sysfs.
fn loop_backing_file(source: &str) -> Option<PathBuf> {
    let name = source.strip_prefix("/dev/")?;
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// The line this state keeps in fstab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabLine {
    pub device: String,
    pub path: String,
    pub fstype: String,
    pub opts: String,
    pub dump: u64,
    pub pass: u64,
}

impl FstabLine {
    pub fn render(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            escape_octal(&self.device),
            escape_octal(&self.path),
            self.fstype,
            escape_octal(&self.opts),
            self.dump,
            self.pass
        )
    }

    fn fields(&self) -> Vec<String> {
        self.render().split(' ').map(str::to_string).collect()
    }
}

/// `text` with the line for `want.path` made to be `want`; `None` when it already is.
pub fn merge_fstab(text: &str, want: &FstabLine) -> Option<String> {
    let wanted_fields = want.fields();
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    let mut changed = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_entry = !fields.is_empty() && !fields[0].starts_with('#');
        if is_entry && fields.len() >= 2 && same_mount_point(&unescape_octal(fields[1]), &want.path) {
            if placed {
                changed = true;
                continue;
            }
            placed = true;
            // Missing dump and pass fields mean 0.
            let mut have: Vec<String> = fields.iter().map(|f| (*f).to_string()).collect();
            while have.len() < 6 {
                have.push(if have.len() == 3 { "defaults".into() } else { "0".into() });
            }
            // The mount point matched already (a trailing `/` is the same place).
            have[1].clone_from(&wanted_fields[1]);
            if have == wanted_fields {
                out.push(line.to_string());
            } else {
                out.push(want.render());
                changed = true;
            }
        } else {
            out.push(line.to_string());
        }
    }
    if !placed {
        out.push(want.render());
        changed = true;
    }
    if !changed {
        return None;
    }
    let mut merged = out.join("\n");
    merged.push('\n');
    Some(merged)
}

fn same_mount_point(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let t = s.trim_end_matches('/');
        if t.is_empty() {
            "/".to_string()
        } else {
            t.to_string()
        }
    };
    norm(a) == norm(b)
}

/// Brings `fstab` to hold `line`; whether it was rewritten.
pub fn update_fstab(fstab: &AbsPath, line: &FstabLine) -> Result<bool, MountError> {
    let (text, mode, uid, gid) = match fs::read(fstab.as_path()) {
        Ok(bytes) => {
            let meta =
                fs::metadata(fstab.as_path()).map_err(|source| MountError::Read { path: fstab.to_string(), source })?;
            (String::from_utf8_lossy(&bytes).into_owned(), meta.mode() & 0o7777, meta.uid(), meta.gid())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (String::new(), 0o644, 0, 0),
        Err(source) => return Err(MountError::Read { path: fstab.to_string(), source }),
    };
    let Some(merged) = merge_fstab(&text, line) else {
        return Ok(false);
    };
    if !crate::plan::active() {
        fsutil::write_atomic(fstab, merged.as_bytes(), mode, uid, gid)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests_systemd;

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    fn line(device: &str, path: &str, opts: &str) -> FstabLine {
        FstabLine {
            device: device.into(),
            path: path.into(),
            fstype: "ext4".into(),
            opts: opts.into(),
            dump: 0,
            pass: 2,
        }
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    42 27 7:0 / /srv/my\\040data rw,noatime - xfs /dev/loop0 rw,inode64\n\
                    garbage\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].major, e[0].minor, e[0].root.as_str()), (98, 0, "/mnt1"));
        assert_eq!(e[1].mount_point, Path::new("/srv/my data"));
        assert_eq!((e[1].fstype.as_str(), e[1].source.as_str()), ("xfs", "/dev/loop0"));
    }

    #[test]
    fn fstab_merge_appends_replaces_and_keeps_everything_else() {
        let base = "# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n\n/dev/sdb1 none swap sw 0 0\n";
        let want = line("/dev/xvdf", "/data", "noatime");
        let merged = merge_fstab(base, &want).unwrap();
        assert_eq!(merged, format!("{base}/dev/xvdf /data ext4 noatime 0 2\n"));
        // Already there (even with other spacing): nothing to do.
        assert_eq!(merge_fstab(&merged, &want), None);
        let spaced = merged.replace("/dev/xvdf /data ext4 noatime 0 2", "/dev/xvdf\t/data/  ext4\tnoatime 0   2");
        assert_eq!(merge_fstab(&spaced, &want), None);
        // A differing line is replaced in place, a duplicate dropped.
        let old = format!("{base}/dev/old /data ext3 defaults\n# tail comment\n/dev/dup /data xfs defaults 0 0\n");
        let merged = merge_fstab(&old, &want).unwrap();
        assert_eq!(merged, format!("{base}/dev/xvdf /data ext4 noatime 0 2\n# tail comment\n"));
        // Missing dump/pass compare as 0, missing options as defaults.
        let short = "/dev/x /d ext4\n";
        let want0 = FstabLine { pass: 0, ..line("/dev/x", "/d", "defaults") };
        assert_eq!(merge_fstab(short, &want0), None);
        // Blanks in paths are escaped.
        let blank = line("/dev/x", "/srv/my data", "defaults");
        assert_eq!(blank.render(), "/dev/x /srv/my\\040data ext4 defaults 0 2");
        assert_eq!(merge_fstab(&blank.render(), &blank), None);
        assert_eq!(merge_fstab("", &blank).unwrap(), format!("{}\n", blank.render()));
    }

    #[test]
    fn fstab_is_rewritten_only_when_different() {
        let dir = tempfile::tempdir().unwrap();
        let path = AbsPath::parse(&dir.path().join("fstab").to_string_lossy()).unwrap();
        fs::write(path.as_path(), "# keep me\n").unwrap();
        fs::set_permissions(path.as_path(), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let want = line("/dev/xvdf", "/data", "defaults");
        assert!(update_fstab(&path, &want).unwrap());
        assert_eq!(fs::read_to_string(path.as_path()).unwrap(), "# keep me\n/dev/xvdf /data ext4 defaults 0 2\n");
        assert_eq!(fs::metadata(path.as_path()).unwrap().mode() & 0o7777, 0o640);
        let before = fs::metadata(path.as_path()).unwrap().ino();
        assert!(!update_fstab(&path, &want).unwrap());
        assert_eq!(fs::metadata(path.as_path()).unwrap().ino(), before, "rewritten although equal");
    }

    #[test]
    fn octal_escapes_round_trip() {
        for s in ["plain", "a b", "tab\there", "back\\slash", "\\04"] {
            assert_eq!(unescape_octal(&escape_octal(s)), s);
        }
    }
}
