//! Package files, package keys and repository RPMs given as `http(s)://` URLs (the
//! original accepted them: Salt's `pkg.installed` `sources`, `rpm --import URL`,
//! `rpm -U URL`). The helper has no network: such a state first answers `NeedFetch`,
//! the daemon downloads through the usual fetch seam, and the request comes back with
//! the files. Each is copied (checked against what the daemon announced, see
//! [`crate::fetched`]) into a root-only directory of the helper's state directory, the
//! URL in the parameters is replaced by that copy's path, and the module runs as for a
//! local file. The copies are removed when the state ends.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::checks::is_remote;
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::param_types::{KeySource, Line};

use crate::dirfd::Dir;
use crate::fetched::{FetchError, Fetched};
use crate::fsutil::{self, FsError};

/// Under the helper's state directory (root, 0700): downloads being installed.
pub const STAGING_DIR: &str = "staged";

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0} was not downloaded by the daemon")]
    NotFetched(String),
}

/// The remote URLs a state's parameters name, in order.
pub fn remote_urls(params: &ModuleParams) -> Vec<String> {
    let mut urls = Vec::new();
    let mut add = |v: &str, ext: Option<&str>| {
        let t = v.trim();
        if is_remote(t) && ext.is_none_or(|e| t.ends_with(e)) && !urls.iter().any(|u| u == t) {
            urls.push(t.to_string());
        }
    };
    match params {
        ModuleParams::LinuxAptPackage(p) => p.name.iter().for_each(|e| add(e.value_or_empty(), Some(".deb"))),
        ModuleParams::LinuxYumPackage(p) => p.name.iter().for_each(|e| add(e.value_or_empty(), Some(".rpm"))),
        ModuleParams::LinuxRpmKey(p) => {
            if let KeySource::Remote(url) = &p.path {
                add(url, None);
            }
        }
        // The adaptor ran `rpm -U --force URL` when there was no content.
        ModuleParams::LinuxYumRepo(p) => {
            if p.content.is_none() {
                p.rpm_url.iter().for_each(|u| add(u, None));
            }
            p.rpm_key.iter().for_each(|u| add(u, None));
        }
        _ => {}
    }
    urls
}

/// Copies of the downloads (URL, name in the staging directory, path given to the
/// tool), removed on drop through the staging directory's descriptor.
#[derive(Debug)]
pub struct Staged {
    dir: Dir,
    files: Vec<(String, OsString, PathBuf)>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (_, name, _) in &self.files {
            let _ = self.dir.unlink(name);
        }
    }
}

impl Staged {
    fn path_of(&self, url: &str) -> Option<String> {
        self.files.iter().find(|(u, _, _)| u == url.trim()).map(|(_, _, p)| p.display().to_string())
    }

    /// A staged copy's path, validated as the key's type holds it.
    fn staged_path(&self, url: &str) -> Option<AbsPath> {
        self.path_of(url).and_then(|p| AbsPath::parse(&p).ok())
    }

    /// `params` with every staged URL replaced by its copy's path.
    pub fn localise(&self, params: &ModuleParams) -> ModuleParams {
        let mut out = params.clone();
        let swap = |v: &mut String| {
            if let Some(p) = self.path_of(v) {
                *v = p;
            }
        };
        let swap_line = |l: &mut Line| swap(&mut l.0);
        match &mut out {
            ModuleParams::LinuxAptPackage(p) => p.name.0.iter_mut().filter_map(|e| e.value.as_mut()).for_each(swap),
            ModuleParams::LinuxYumPackage(p) => p.name.0.iter_mut().filter_map(|e| e.value.as_mut()).for_each(swap),
            ModuleParams::LinuxRpmKey(p) => {
                if let KeySource::Remote(url) = &p.path {
                    if let Some(copy) = self.staged_path(url) {
                        p.path = KeySource::Local(copy.into());
                    }
                }
            }
            ModuleParams::LinuxYumRepo(p) => {
                p.rpm_url.iter_mut().for_each(swap_line);
                p.rpm_key.iter_mut().for_each(swap_line);
            }
            _ => {}
        }
        out
    }
}

/// Copies the file fetched for each URL into `<state_dir>/staged/`, named after the
/// URL's last path segment (apt and rpm read the type from the `.deb`/`.rpm` name).
pub fn stage(urls: &[String], fetched: &Fetched<'_>, state_dir: &Path) -> Result<Staged, StageError> {
    let dir = state_dir.join(STAGING_DIR);
    // Never in a plan (the caller answers before staging): created, and held open.
    let held = fsutil::create_dir_all(&dir, 0o700, (Uid::from_raw(0), Gid::from_raw(0)), &mut Vec::new())?;
    let mut staged = Staged { dir: held, files: Vec::new() };
    for (i, url) in urls.iter().enumerate() {
        let base = url.rsplit('/').next().unwrap_or_default();
        let safe: String =
            base.chars().map(|c| if c.is_ascii_alphanumeric() || "._+-~".contains(c) { c } else { '_' }).collect();
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| FsError::Io {
            path: dir.clone(),
            op: "choose a name in",
            source: std::io::Error::other(e.to_string()),
        })?;
        let name = OsString::from(format!("{}-{i}-{safe}", hex::encode(nonce)));
        if fetched.copy_to(url, &staged.dir, &name)?.is_none() {
            return Err(StageError::NotFetched(url.clone()));
        }
        staged.files.push((url.clone(), name.clone(), dir.join(name)));
    }
    Ok(staged)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::cancel::Cancel;
    use crate::states::testutil::params;
    use crate::states::{apply, Ctx, Step};
    use opsagent_proto::newtypes::StateId;
    use opsagent_proto::request::{ApplyRequest, FetchedFile};
    use serde_json::json;
    use sha2::Digest;

    fn download(dir: &Path, url: &str, content: &[u8]) -> FetchedFile {
        let path = dir.join(format!("dl-{}", content.len()));
        std::fs::write(&path, content).unwrap();
        FetchedFile {
            url: url.into(),
            path: AbsPath::parse(&path.display().to_string()).unwrap(),
            size: content.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(content)),
        }
    }

    /// The original's shapes: a `.deb` as an http URL among named packages, a key and a
    /// repository RPM as URLs.
    #[test]
    fn urls_of_packages_keys_and_repository_rpms() {
        let apt = params(
            "linux.apt.package",
            json!({"name": [{"key": "nginx"}, {"key": "x", "value": "https://h/x_1.0_all.deb"}, {"key": "y", "value": "file:///srv/y.deb"}]}),
        );
        assert_eq!(remote_urls(&apt), ["https://h/x_1.0_all.deb"]);
        let key = params("linux.rpm.key", json!({"path": "https://h/RPM-GPG-KEY"}));
        assert_eq!(remote_urls(&key), ["https://h/RPM-GPG-KEY"]);
        assert!(remote_urls(&params("linux.rpm.key", json!({"path": "/etc/pki/k"}))).is_empty());
        let repo = params("linux.yum.repo", json!({"name": "epel", "rpm-url": "http://h/epel-release.rpm"}));
        assert_eq!(remote_urls(&repo), ["http://h/epel-release.rpm"]);
        let with_content =
            params("linux.yum.repo", json!({"name": "x", "content": "[x]", "rpm-url": "http://h/r.rpm"}));
        assert!(remote_urls(&with_content).is_empty());
        crate::states::testutil::refused("linux.rpm.key", json!({"path": "https://h/a key"}), "parameter \"path\"");
    }

    /// A key given as a URL reaches `linux.rpm.key` as a local file: the staged copy.
    #[test]
    fn a_staged_key_url_becomes_a_local_key_source() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        let url = "https://h/RPM-GPG-KEY";
        let files = vec![download(tmp.path(), url, b"-----BEGIN PGP PUBLIC KEY BLOCK-----")];
        let staged = stage(&[url.to_string()], &Fetched::new(&files, 0), &state_dir).unwrap();
        let p = params("linux.rpm.key", json!({"path": url}));
        let ModuleParams::LinuxRpmKey(key) = staged.localise(&p) else { panic!() };
        let KeySource::Local(file) = &key.path else { panic!("{key:?}") };
        assert!(file.path().starts_with(&AbsPath::parse(&state_dir.join(STAGING_DIR).to_string_lossy()).unwrap()));
        assert!(file.to_string().ends_with("-0-RPM-GPG-KEY"), "{file}");
        // A key the daemon did not download stays a URL (the state then refuses it).
        let ModuleParams::LinuxRpmKey(other) =
            staged.localise(&params("linux.rpm.key", json!({"path": "https://h/other"})))
        else {
            panic!()
        };
        assert_eq!(other.path, KeySource::Remote("https://h/other".into()));
    }

    #[tokio::test]
    async fn a_url_is_asked_for_then_installed_from_a_root_only_copy_removed_afterwards() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        let ctx = Ctx::new(state_dir.clone());
        let url = "https://h/x_1.0_all.deb";
        let p = params("linux.apt.package", json!({"name": [{"key": "x", "value": url}]}));
        let mut req = ApplyRequest::new(StateId::parse("s-1").unwrap(), 1, p.clone());
        let first = apply(&req, &ctx, Cancel::never()).await.unwrap();
        assert_eq!(first, Step::NeedFetch(vec![url.to_string()]));

        req.fetched.push(download(tmp.path(), url, b"not really a deb"));
        let files = req.fetched.clone();
        let staged = stage(&[url.to_string()], &Fetched::new(&files, 0), &state_dir).unwrap();
        let ModuleParams::LinuxAptPackage(local) = staged.localise(&p) else { panic!() };
        let path = PathBuf::from(local.name[0].value_or_empty());
        assert!(path.starts_with(state_dir.join(STAGING_DIR)) && path.to_string_lossy().ends_with("-0-x_1.0_all.deb"));
        assert_eq!(std::fs::read(&path).unwrap(), b"not really a deb");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(state_dir.join(STAGING_DIR)).unwrap().mode() & 0o7777, 0o700);
        drop(staged);
        assert!(!path.exists(), "the copy is removed with the state");

        // A download that changed after the daemon announced it is refused.
        let mut bad = files.clone();
        bad[0].sha256 = "00".repeat(32);
        let err = stage(&[url.to_string()], &Fetched::new(&bad, 0), &state_dir).unwrap_err().to_string();
        assert!(err.contains("not the announced"), "{err}");
        assert_eq!(std::fs::read_dir(state_dir.join(STAGING_DIR)).unwrap().count(), 0);
    }
}
