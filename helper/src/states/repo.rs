//! Package sources and keys: `linux.apt.repo`, `linux.apt.ppa`, `linux.yum.repo`,
//! `linux.rpm.key`.
//!
//! Source files are written through `linux.file`'s code (atomic, only when the content
//! differs, never through a link). The helper has no network: nothing here downloads.
//! A PPA's signing key is not fetched (install it with `linux.file` under
//! `/etc/apt/trusted.gpg.d/`, or apt will refuse the PPA's index); a repo-release RPM or
//! an RPM key must be a local file (`/path` or `file:///path`), which the daemon or an
//! earlier state puts there.

use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::{LinuxAptPpa, LinuxAptRepo, LinuxFile, LinuxRpmKey, LinuxYumRepo};
use opsagent_proto::newtypes::AbsPath;
#[cfg(test)]
use opsagent_proto::param_types::Line;
use opsagent_proto::param_types::{KeySource, Mode, PathParam, Text};
use opsagent_proto::request::{Change, Outcome};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, ToolError};

pub const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
pub const APT_AUTH_DIR: &str = "/etc/apt/auth.conf.d";
pub const YUM_REPOS_DIR: &str = "/etc/yum.repos.d";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "parameter name: {0:?} is not a usable file name (letters, digits, `_`, `-` and `.` only, \
         as apt and yum read them)"
    )]
    Name(String),
    #[error("parameter name: {0:?} is not a PPA name of the form `user/archive`")]
    Ppa(String),
    #[error("cannot tell the distribution's codename from /etc/os-release")]
    Codename,
    #[error("{param} {uri:?}: the helper does not download; give a local file (/path or file:///path)")]
    Remote { param: &'static str, uri: String },
    #[error("{param} {0:?}: not an absolute local path", param = .1)]
    NotLocal(String, &'static str),
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    RootRead(#[from] super::root_read::RootReadError),
}

/// A file name apt (and yum) will read: `[A-Za-z0-9_.-]+`, not starting with a dot.
fn checked_name(name: &str) -> Result<&str, RepoError> {
    let name = name.trim();
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(name)
    } else {
        Err(RepoError::Name(name.to_string()))
    }
}

fn with_suffix(name: &str, suffix: &str) -> String {
    if name.ends_with(suffix) {
        name.to_string()
    } else {
        format!("{name}{suffix}")
    }
}

/// `/etc/apt/sources.list.d/<name>.list`, `.list` added when missing.
pub fn apt_list_path(name: &str) -> Result<String, RepoError> {
    Ok(format!("{APT_SOURCES_DIR}/{}", with_suffix(checked_name(name)?, ".list")))
}

/// `/etc/yum.repos.d/<name>.repo`, `.repo` added when missing.
pub fn yum_repo_path(name: &str) -> Result<String, RepoError> {
    Ok(format!("{YUM_REPOS_DIR}/{}", with_suffix(checked_name(name)?, ".repo")))
}

/// `user/archive` from a PPA name, with or without `ppa:`.
pub fn ppa_parts(name: &str) -> Result<(&str, &str), RepoError> {
    let bare = name.trim().strip_prefix("ppa:").unwrap_or(name.trim());
    let part_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
    match bare.split_once('/') {
        Some((user, archive)) if part_ok(user) && part_ok(archive) && !user.starts_with('.') => Ok((user, archive)),
        _ => Err(RepoError::Ppa(name.to_string())),
    }
}

/// The files `linux.apt.ppa` writes: the source list and (with credentials) its auth.
pub fn ppa_paths(name: &str) -> Vec<String> {
    match ppa_parts(name) {
        Ok((user, archive)) => {
            let base = format!("{user}-ubuntu-{archive}").replace(['.', '+'], "_");
            vec![format!("{APT_SOURCES_DIR}/{base}.list"), format!("{APT_AUTH_DIR}/{base}.conf")]
        }
        Err(_) => Vec::new(),
    }
}

/// The sources line of a PPA; a private one (with credentials) is served over https
/// from `private-ppa.launchpad.net`, the credentials going to auth.conf.d.
pub fn ppa_source(user: &str, archive: &str, codename: &str, private: bool) -> String {
    let base = if private { "https://private-ppa.launchpad.net" } else { "http://ppa.launchpad.net" };
    format!("deb {base}/{user}/{archive}/ubuntu {codename} main\n")
}

pub fn ppa_auth(user: &str, archive: &str, login: &str, password: &str) -> String {
    format!("machine private-ppa.launchpad.net/{user}/{archive}/ubuntu login {login} password {password}\n")
}

/// `UBUNTU_CODENAME` (set on Ubuntu and its derivatives), else `VERSION_CODENAME`.
pub fn codename(os_release: &str) -> Option<String> {
    let get = |key: &str| {
        os_release.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            (!v.is_empty()).then(|| v.to_string())
        })
    };
    get("UBUNTU_CODENAME").or_else(|| get("VERSION_CODENAME"))
}

/// Writes one file through `linux.file`, collecting its changes.
fn managed_file(path: &str, content: &str, mode: u32, changes: &mut Vec<Change>) -> Result<(), RepoError> {
    let mut text = content.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    // The helper's own file names (a fixed directory and a checked name).
    let path = AbsPath::parse(path).map_err(|e| RepoError::File(e.to_string()))?;
    let p = LinuxFile {
        path: PathParam::from(path),
        absent: false,
        content: Some(Text(text)),
        group: None,
        mode: Some(Mode(mode)),
        remote_uri: None,
        user: None,
    };
    let out = super::file::apply_inline(&p);
    changes.extend(out.changes);
    if out.result {
        Ok(())
    } else {
        Err(RepoError::File(out.comment))
    }
}

pub fn apt_repo(p: &LinuxAptRepo) -> Outcome {
    let mut changes = Vec::new();
    let result = apt_list_path(&p.name).and_then(|path| managed_file(&path, &p.content, 0o644, &mut changes));
    super::finish("linux.apt.repo", result, changes, &[])
}

pub fn apt_ppa(p: &LinuxAptPpa) -> Outcome {
    apt_ppa_with(p, Path::new("/etc/os-release"))
}

pub fn apt_ppa_with(p: &LinuxAptPpa, os_release: &Path) -> Outcome {
    let mut changes = Vec::new();
    let result = (|| -> Result<(), RepoError> {
        let (user, archive) = ppa_parts(&p.name)?;
        let text = std::fs::read_to_string(os_release).unwrap_or_default();
        let codename = codename(&text).ok_or(RepoError::Codename)?;
        let paths = ppa_paths(&p.name);
        let creds = match (p.username.as_deref(), p.password.as_deref()) {
            (Some(u), Some(pw)) if !u.is_empty() => Some((u, pw)),
            _ => None,
        };
        managed_file(&paths[0], &ppa_source(user, archive, &codename, creds.is_some()), 0o644, &mut changes)?;
        if let Some((login, password)) = creds {
            managed_file(&paths[1], &ppa_auth(user, archive, login, password), 0o600, &mut changes)?;
        }
        Ok(())
    })();
    super::finish("linux.apt.ppa", result, changes, &[])
}

/// A local file from a path or a `file://` URI; remote URIs are refused.
pub fn local_file(param: &'static str, uri: &str) -> Result<PathBuf, RepoError> {
    let uri = uri.trim();
    if uri.contains("://") && !uri.starts_with("file://") {
        return Err(RepoError::Remote { param, uri: uri.to_string() });
    }
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    match opsagent_proto::newtypes::AbsPath::parse(path) {
        Ok(p) => Ok(p.as_path().to_path_buf()),
        Err(_) => Err(RepoError::NotLocal(uri.to_string(), param)),
    }
}

pub async fn yum_repo(p: &LinuxYumRepo, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = async {
        if let Some(content) = p.content.as_deref() {
            if p.rpm_url.is_some() {
                notes.push("rpm-url ignored: content is given".to_string());
            }
            managed_file(&yum_repo_path(&p.name)?, content, 0o644, &mut changes)?;
        } else if let Some(url) = p.rpm_url.as_deref() {
            let path = local_file("rpm-url", url)?;
            install_rpm(&path, &mut changes, &mut cancel).await?;
        }
        if let Some(key) = p.rpm_key.as_deref() {
            let key = local_file("rpm-key", key)?;
            root_checked("rpm-key", &key)?;
            import_key(&key, &mut changes, &mut cancel).await?;
        }
        Ok::<(), RepoError>(())
    }
    .await;
    super::finish("linux.yum.repo", result, changes, &notes)
}

pub async fn rpm_key(p: &LinuxRpmKey, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let result = async {
        // The source is validated at decode (`KeySource`); a URL is replaced by the
        // copy of the daemon's download before the state runs (`remote::Staged`), so
        // one left here was not downloaded: the helper has no network.
        let path = match &p.path {
            KeySource::Local(file) => file.path(),
            KeySource::Remote(url) => return Err(RepoError::Remote { param: "path", uri: url.clone() }),
        };
        // Who controls the file is a fact of the host, not of the value.
        super::root_read::check("path", path)?;
        import_key(path.as_path(), &mut changes, &mut cancel).await
    }
    .await;
    super::finish("linux.rpm.key", result, changes, &[])
}

/// A key root imports must be a file only root controls ([`super::root_read`]).
fn root_checked(param: &'static str, path: &Path) -> Result<(), RepoError> {
    let abs = opsagent_proto::newtypes::AbsPath::parse(&path.to_string_lossy())
        .map_err(|_| RepoError::NotLocal(path.display().to_string(), param))?;
    Ok(super::root_read::check(param, &abs)?)
}

/// `rpm -U --force` of a local repo-release package, unless that version is installed.
async fn install_rpm(path: &Path, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), RepoError> {
    let file = path.display().to_string();
    let query =
        CommandSpec::tool("rpm", ["-qp", "--qf", "%{NAME}\\t%{VERSION}-%{RELEASE}\\n", file.as_str()]).inspection();
    let out = exec::checked(&query, &[0], cancel).await?.output;
    let (name, evr) =
        out.lines().find_map(|l| l.split_once('\t')).map(|(n, v)| (n.trim(), v.trim())).unwrap_or_default();
    if !name.is_empty() {
        let installed = CommandSpec::tool("rpm", ["-q", "--qf", "%{VERSION}-%{RELEASE}\\n", name]).inspection();
        let have = exec::checked(&installed, &[0, 1], cancel).await?.output;
        if have.lines().any(|l| l.trim() == evr) {
            return Ok(());
        }
    }
    if !crate::plan::active() {
        exec::checked(&CommandSpec::tool("rpm", ["-U", "--force", file.as_str()]), &[0], cancel).await?;
    }
    changes.push(Change::new(file, format!("installed {name} {evr}")));
    Ok(())
}

/// `rpm --import`, skipped when rpm already holds the same key (rpm keeps each imported
/// key, armored, as the description of a `gpg-pubkey` pseudo-package).
async fn import_key(path: &Path, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), RepoError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RepoError::File(format!("{file}: cannot read: {e}")))?;
    if let Some(ours) = armor_body(&text) {
        let list = CommandSpec::tool("rpm", ["-q", "gpg-pubkey", "--qf", "%{DESCRIPTION}\\n"]).inspection();
        let imported = exec::checked(&list, &[0, 1], cancel).await?.output;
        if armor_bodies(&imported).contains(&ours) {
            return Ok(());
        }
    }
    if !crate::plan::active() {
        exec::checked(&CommandSpec::tool("rpm", ["--import", file.as_str()]), &[0], cancel).await?;
    }
    changes.push(Change::new(file, "key imported"));
    Ok(())
}

/// The base64 body of the first armored block of `text`, without line breaks.
pub fn armor_body(text: &str) -> Option<String> {
    armor_bodies(text).into_iter().next()
}

pub fn armor_bodies(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while lines.by_ref().any(|l| l.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK")) {
        let mut body = String::new();
        // Armor headers ("Version: …") come first and end at a blank line.
        let mut in_headers = true;
        for l in lines.by_ref() {
            if l.starts_with("-----END") || l.starts_with('=') {
                break;
            }
            if in_headers && (l.is_empty() || l.contains(": ")) {
                in_headers = !l.is_empty();
                continue;
            }
            in_headers = false;
            body.push_str(l);
        }
        if !body.is_empty() {
            out.push(body);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_checked_and_suffixed() {
        assert_eq!(apt_list_path("nginx").unwrap(), "/etc/apt/sources.list.d/nginx.list");
        assert_eq!(apt_list_path("nginx.list").unwrap(), "/etc/apt/sources.list.d/nginx.list");
        assert_eq!(yum_repo_path("epel").unwrap(), "/etc/yum.repos.d/epel.repo");
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(apt_list_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ppa_lines_and_auth() {
        assert_eq!(ppa_parts("ppa:nginx/stable").unwrap(), ("nginx", "stable"));
        assert!(ppa_parts("nginx").is_err() && ppa_parts("a/b/c").is_err() && ppa_parts("../x").is_err());
        assert_eq!(
            ppa_paths("ondrej/php"),
            ["/etc/apt/sources.list.d/ondrej-ubuntu-php.list", "/etc/apt/auth.conf.d/ondrej-ubuntu-php.conf"]
        );
        assert_eq!(
            ppa_source("ondrej", "php", "jammy", false),
            "deb http://ppa.launchpad.net/ondrej/php/ubuntu jammy main\n"
        );
        assert!(ppa_source("u", "a", "jammy", true).starts_with("deb https://private-ppa.launchpad.net/u/a/ubuntu"));
        assert_eq!(
            ppa_auth("u", "a", "me", "s3cret"),
            "machine private-ppa.launchpad.net/u/a/ubuntu login me password s3cret\n"
        );
        assert_eq!(codename("NAME=\"Ubuntu\"\nVERSION_CODENAME=jammy\nUBUNTU_CODENAME=jammy\n").unwrap(), "jammy");
        assert_eq!(codename("ID=linuxmint\nVERSION_CODENAME=vera\nUBUNTU_CODENAME=jammy\n").unwrap(), "jammy");
        assert_eq!(codename("VERSION_CODENAME=\"bookworm\"\n").unwrap(), "bookworm");
        assert!(codename("ID=centos\n").is_none());
    }

    #[test]
    fn a_ppa_needs_the_codename_from_os_release() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("none");
        let p = LinuxAptPpa { name: Line("u/a".into()), password: None, username: None };
        let out = apt_ppa_with(&p, &missing);
        assert!(!out.result && out.comment.contains("codename"), "{out:?}");
    }

    #[test]
    fn local_files_only() {
        assert_eq!(local_file("rpm-url", "file:///tmp/x.rpm").unwrap(), Path::new("/tmp/x.rpm"));
        assert_eq!(local_file("rpm-url", "/tmp/x.rpm").unwrap(), Path::new("/tmp/x.rpm"));
        let err = local_file("rpm-url", "https://example.com/x.rpm").unwrap_err().to_string();
        assert!(err.contains("does not download"), "{err}");
        assert!(local_file("path", "x.key").is_err());
    }

    #[test]
    fn armored_keys_compare_by_body() {
        let file = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nVersion: GnuPG v1\n\nmQINBF\nabcd+/\n=AbCd\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(armor_body(file).unwrap(), "mQINBFabcd+/");
        let rpm_view = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nVersion: rpm-4.16.1.3\n\nmQINBFab\ncd+/\n=AbCd\n-----END PGP PUBLIC KEY BLOCK-----\n\n\
                        -----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQOTHER\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(armor_bodies(rpm_view), ["mQINBFabcd+/", "mQOTHER"]);
        assert!(armor_body("not a key").is_none());
    }
}
