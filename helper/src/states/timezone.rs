//! `common.timezone`: the system timezone and whether the hardware clock keeps UTC.
//!
//! The current settings are read from the files every tool keeps them in:
//! `/etc/localtime` (a link into `/usr/share/zoneinfo`), `/etc/timezone` where the
//! distribution has one (Debian), and the third line of `/etc/adjtime` (`UTC` or
//! `LOCAL`; no file means UTC). Where systemd runs, changes go through `timedatectl`
//! (systemd then knows at once); elsewhere the helper writes those files itself, the
//! link atomically.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::CommonTimezone;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::dirfd::Dir;
use crate::exec::{self, CommandSpec, ToolError};
use crate::fsutil::{self, FsError};

/// The files involved, under a root (`/`, or a test's directory).
#[derive(Debug, Clone)]
pub struct Paths {
    pub localtime: PathBuf,
    pub timezone: PathBuf,
    pub adjtime: PathBuf,
    pub zoneinfo: PathBuf,
}

impl Paths {
    pub fn under(root: &Path) -> Self {
        Self {
            localtime: root.join("etc/localtime"),
            timezone: root.join("etc/timezone"),
            adjtime: root.join("etc/adjtime"),
            zoneinfo: root.join("usr/share/zoneinfo"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TzError {
    #[error("parameter name: {0:?} is not a timezone name")]
    Name(String),
    #[error("parameter name: unknown timezone {0:?} (not in {1})")]
    Unknown(String, String),
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Tool(#[from] ToolError),
}

/// `Area/City` style: letters, digits, `_+-` and inner slashes, no `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.ends_with('/')
        && name.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
}

/// The zone `/etc/localtime` links to (the part after `zoneinfo/`).
pub fn current_zone(paths: &Paths) -> Option<String> {
    let target = fs::read_link(&paths.localtime).ok()?;
    let t = target.to_string_lossy();
    t.split_once("zoneinfo/").map(|(_, z)| z.to_string())
}

/// Whether `/etc/adjtime` says the hardware clock is in UTC (no file: UTC).
pub fn rtc_utc(adjtime: Option<&str>) -> bool {
    adjtime.and_then(|t| t.lines().nth(2)).is_none_or(|l| l.trim() != "LOCAL")
}

/// `/etc/adjtime` with its third line set; a new file gets neutral drift values.
pub fn adjtime_with(current: Option<&str>, utc: bool) -> String {
    let mode = if utc { "UTC" } else { "LOCAL" };
    let mut lines: Vec<String> = current.unwrap_or("0.0 0 0.0\n0\n").lines().map(str::to_string).collect();
    lines.resize(2, "0".to_string());
    lines.push(mode.to_string());
    lines.join("\n") + "\n"
}

fn read_opt(path: &Path) -> Result<Option<String>, TzError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TzError::Io { path: path.to_path_buf(), op: "read", source }),
    }
}

/// What differs from the wanted settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Todo {
    pub zone: Option<String>,
    pub timezone_file: bool,
    pub rtc: Option<bool>,
}

pub fn todo(paths: &Paths, name: &str, utc: bool) -> Result<Todo, TzError> {
    if !valid_name(name) {
        return Err(TzError::Name(name.to_string()));
    }
    if !paths.zoneinfo.join(name).is_file() {
        return Err(TzError::Unknown(name.to_string(), paths.zoneinfo.display().to_string()));
    }
    let current = current_zone(paths);
    let tz_file = read_opt(&paths.timezone)?;
    let adjtime = read_opt(&paths.adjtime)?;
    Ok(Todo {
        zone: current.filter(|z| z == name).is_none().then(|| name.to_string()),
        timezone_file: tz_file.is_some_and(|t| t.trim() != name),
        rtc: (rtc_utc(adjtime.as_deref()) != utc).then_some(utc),
    })
}

/// Writes the files directly (no systemd), `/etc/localtime` replaced atomically.
pub fn write_files(paths: &Paths, name: &str, t: &Todo) -> Result<(), TzError> {
    crate::plan::check("write", paths.localtime.display()).map_err(|r| TzError::Io {
        path: paths.localtime.clone(),
        op: "write",
        source: r.into(),
    })?;
    if t.zone.is_some() {
        // In the directory held open (`/etc`): a new link beside it, renamed over it.
        let (Some(etc), Some(localtime)) = (paths.localtime.parent(), paths.localtime.file_name()) else {
            return Err(TzError::Name(paths.localtime.display().to_string()));
        };
        let dir = Dir::open(etc).map_err(FsError::from)?;
        let tmp = OsStr::new(".localtime.opsagent-tmp");
        let _ = dir.unlink(tmp);
        let target = Path::new("../usr/share/zoneinfo").join(name);
        dir.symlink(&target, tmp).map_err(FsError::from)?;
        dir.rename(tmp, localtime).map_err(FsError::from)?;
    }
    let abs = |p: &Path| AbsPath::parse(&p.to_string_lossy()).map_err(|e| TzError::Name(e.to_string()));
    if (t.zone.is_some() || t.timezone_file) && paths.timezone.exists() {
        fsutil::write_atomic(&abs(&paths.timezone)?, format!("{name}\n").as_bytes(), 0o644, 0, 0)?;
    }
    if let Some(utc) = t.rtc {
        let current = read_opt(&paths.adjtime)?;
        fsutil::write_atomic(&abs(&paths.adjtime)?, adjtime_with(current.as_deref(), utc).as_bytes(), 0o644, 0, 0)?;
    }
    Ok(())
}

pub fn describe(t: &Todo) -> Vec<Change> {
    let mut c = Vec::new();
    if let Some(z) = &t.zone {
        c.push(Change::new("timezone", format!("set to {z}")));
    } else if t.timezone_file {
        c.push(Change::new("/etc/timezone", "updated"));
    }
    if let Some(utc) = t.rtc {
        c.push(Change::new("hardware clock", if utc { "keeps UTC" } else { "keeps local time" }));
    }
    c
}

pub async fn apply(p: &CommonTimezone, mut cancel: Cancel) -> Outcome {
    let paths = Paths::under(Path::new("/"));
    let mut changes = Vec::new();
    let name = p.name.trim();
    let result = async {
        let t = todo(&paths, name, p.use_utc)?;
        if t == Todo::default() {
            return Ok(());
        }
        if crate::plan::active() {
            changes = describe(&t);
            return Ok(());
        }
        if crate::systemd::booted() {
            if let Some(zone) = &t.zone {
                exec::checked(&CommandSpec::tool("timedatectl", ["set-timezone", zone.as_str()]), &[0], &mut cancel)
                    .await?;
            }
            if let Some(utc) = t.rtc {
                let local = if utc { "0" } else { "1" };
                exec::checked(&CommandSpec::tool("timedatectl", ["set-local-rtc", local]), &[0], &mut cancel).await?;
            }
            // Whatever timedated left of Debian's /etc/timezone is brought in line too.
            let rest = todo(&paths, name, p.use_utc)?;
            write_files(&paths, name, &Todo { zone: None, ..rest })?;
        } else {
            write_files(&paths, name, &t)?;
        }
        changes = describe(&t);
        Ok::<(), TzError>(())
    }
    .await;
    let cancelled = matches!(&result, Err(TzError::Tool(e)) if e.is_cancelled());
    let mut outcome = super::finish(&format!("timezone {name}"), result, changes, &[]);
    outcome.cancelled = cancelled;
    outcome
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Paths) {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::under(tmp.path());
        fs::create_dir_all(paths.zoneinfo.join("Europe")).unwrap();
        fs::create_dir_all(tmp.path().join("etc")).unwrap();
        fs::write(paths.zoneinfo.join("Europe/Paris"), "TZif").unwrap();
        fs::write(paths.zoneinfo.join("UTC"), "TZif").unwrap();
        std::os::unix::fs::symlink("/usr/share/zoneinfo/UTC", &paths.localtime).unwrap();
        fs::write(&paths.timezone, "Etc/UTC\n").unwrap();
        (tmp, paths)
    }

    #[test]
    fn names_are_checked() {
        for ok in ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../../etc/shadow", "Europe/../x", "a b", "Europe/"] {
            assert!(!valid_name(bad), "{bad}");
        }
        let (_tmp, paths) = root();
        assert!(matches!(todo(&paths, "Mars/Olympus", true), Err(TzError::Unknown(..))));
    }

    #[test]
    fn files_are_written_once() {
        let (_tmp, paths) = root();
        assert_eq!(current_zone(&paths).as_deref(), Some("UTC"));
        let t = todo(&paths, "Europe/Paris", false).unwrap();
        assert_eq!(t, Todo { zone: Some("Europe/Paris".into()), timezone_file: true, rtc: Some(false) });
        write_files(&paths, "Europe/Paris", &t).unwrap();
        assert_eq!(fs::read_link(&paths.localtime).unwrap(), Path::new("../usr/share/zoneinfo/Europe/Paris"));
        assert_eq!(fs::read_to_string(&paths.timezone).unwrap(), "Europe/Paris\n");
        assert_eq!(fs::read_to_string(&paths.adjtime).unwrap(), "0.0 0 0.0\n0\nLOCAL\n");
        assert_eq!(todo(&paths, "Europe/Paris", false).unwrap(), Todo::default());
        let back = todo(&paths, "Europe/Paris", true).unwrap();
        assert_eq!(back.rtc, Some(true));
        write_files(&paths, "Europe/Paris", &back).unwrap();
        assert_eq!(fs::read_to_string(&paths.adjtime).unwrap(), "0.0 0 0.0\n0\nUTC\n");
        let shown: Vec<String> = describe(&t).iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["timezone: set to Europe/Paris", "hardware clock: keeps local time"]);
    }

    #[test]
    fn adjtime_parsing() {
        assert!(rtc_utc(None));
        assert!(rtc_utc(Some("0.0 0 0.0\n0\nUTC\n")));
        assert!(!rtc_utc(Some("0.0 0 0.0\n0\nLOCAL\n")));
        assert_eq!(adjtime_with(Some("1.5 100 0.0\n1700000000\nUTC\n"), false), "1.5 100 0.0\n1700000000\nLOCAL\n");
    }
}
