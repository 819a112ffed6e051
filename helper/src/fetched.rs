//! Files the daemon downloaded for a state ([`FetchedFile`]), checked before use.
//!
//! The helper links no network code: a state that needs remote content answers
//! `NeedFetch`, the daemon downloads, and the same request comes back with the files'
//! paths. Those paths come from the unprivileged daemon, so each file is opened without
//! following a link and must be a regular file owned by the connected peer's uid — else
//! the daemon could have root copy a file only root may read (`/etc/shadow`) into a
//! place it can read. The file's content is then *copied* into a root-owned file while
//! its size and sha256 are checked: the daemon owns the original and could rewrite it
//! after the check, but not the copy.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use md5::Md5;
use nix::fcntl::OFlag;
use opsagent_proto::request::FetchedFile;
use sha2::{Digest, Sha256};

use crate::dirfd::{Dir, WalkError};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the download of {url} ({path}) {reason}")]
    Refused { url: String, path: PathBuf, reason: String },
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{url}: the download is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error(transparent)]
    Walk(#[from] WalkError),
}

/// What the copy's content turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub md5: String,
}

/// The fetched files of one request, and who sent them.
#[derive(Debug, Clone, Copy)]
pub struct Fetched<'a> {
    files: &'a [FetchedFile],
    peer_uid: u32,
}

impl<'a> Fetched<'a> {
    pub fn new(files: &'a [FetchedFile], peer_uid: u32) -> Self {
        Self { files, peer_uid }
    }

    /// No files (a first request, or a caller that never fetches).
    pub fn none() -> Fetched<'static> {
        Fetched { files: &[], peer_uid: 0 }
    }

    pub fn has(&self, url: &str) -> bool {
        self.get(url).is_some()
    }

    fn get(&self, url: &str) -> Option<&'a FetchedFile> {
        self.files.iter().find(|f| f.url == url)
    }

    /// Of `urls`, those not given (each once, in order).
    pub fn missing(&self, urls: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for url in urls {
            if !self.has(url) && !out.iter().any(|u| u == url) {
                out.push((*url).to_string());
            }
        }
        out
    }

    /// Copies the file fetched for `url` to `dest` (created new: 0600, root, never
    /// through a link), checking it on the way. `None` if `url` was not fetched. On
    /// error nothing is left at `name`. The copy is made in the directory held open, by
    /// name ([`Dir::create_named`]): never through a path someone could swap.
    pub fn copy_to(&self, url: &str, dir: &Dir, name: &OsStr) -> Result<Option<Verified>, FetchError> {
        let Some(file) = self.get(url) else {
            return Ok(None);
        };
        let dest = dir.join(name);
        crate::plan::check("copy the download into", dest.display()).map_err(|r| FetchError::Io {
            path: dest.clone(),
            op: "create",
            source: r.into(),
        })?;
        let mut src = self.open(file)?;
        let mut out = dir.create_named(name)?;
        let copied = self.check_copy(file, &mut src, &mut out, &dest).and_then(|v| {
            out.sync_all().map_err(|source| FetchError::Io { path: dest.clone(), op: "fsync", source })?;
            Ok(v)
        });
        if copied.is_err() {
            let _ = dir.unlink(name);
        }
        copied.map(Some)
    }

    /// The file fetched for `url`, checked as [`Self::copy_to`] checks a copy, open for
    /// reading from its start, without a copy (a plan's look at a download). `None` if
    /// `url` was not fetched.
    pub fn open_checked(&self, url: &str) -> Result<Option<(File, Verified)>, FetchError> {
        let Some(file) = self.get(url) else {
            return Ok(None);
        };
        let mut src = self.open(file)?;
        let verified = self.check_copy(file, &mut src, &mut io::sink(), Path::new("nowhere"))?;
        src.seek(io::SeekFrom::Start(0)).map_err(|source| FetchError::Io {
            path: file.path.as_path().to_path_buf(),
            op: "rewind",
            source,
        })?;
        Ok(Some((src, verified)))
    }

    /// The content fetched for `url`, when it is small (checksum files). `None` if
    /// `url` was not fetched.
    pub fn read_small(&self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, FetchError> {
        let Some(file) = self.get(url) else {
            return Ok(None);
        };
        if file.size > limit {
            return Err(FetchError::TooLarge { url: url.to_string(), limit });
        }
        let mut src = self.open(file)?;
        let mut buf = Vec::new();
        self.check_copy(file, &mut src, &mut buf, Path::new("memory"))?;
        Ok(Some(buf))
    }

    fn refuse(file: &FetchedFile, reason: String) -> FetchError {
        FetchError::Refused { url: file.url.clone(), path: file.path.as_path().to_path_buf(), reason }
    }

    fn open(&self, file: &FetchedFile) -> Result<File, FetchError> {
        let path = file.path.as_path();
        // Read-only (`OpenOptions` only for O_NOFOLLOW/O_NONBLOCK, no write flag): the file
        // is checked on its descriptor once opened; nothing is written.
        #[allow(clippy::disallowed_methods)]
        let f = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::ELOOP) {
                    Self::refuse(file, "is a symbolic link".into())
                } else {
                    Self::refuse(file, format!("cannot be opened: {e}"))
                }
            })?;
        let meta = f.metadata().map_err(|source| FetchError::Io { path: path.to_path_buf(), op: "stat", source })?;
        if !meta.is_file() {
            return Err(Self::refuse(
                file,
                format!("is {}, not a regular file", crate::fsutil::kind_of(meta.file_type())),
            ));
        }
        if meta.uid() != self.peer_uid {
            return Err(Self::refuse(
                file,
                format!("is owned by uid {}, not by the requesting agent (uid {})", meta.uid(), self.peer_uid),
            ));
        }
        if meta.len() != file.size {
            return Err(Self::refuse(file, format!("has {} bytes, not the announced {}", meta.len(), file.size)));
        }
        Ok(f)
    }

    /// Copies `src` to `out`, hashing, and compares with what the daemon announced.
    fn check_copy(
        &self,
        file: &FetchedFile,
        src: &mut File,
        out: &mut dyn Write,
        out_path: &Path,
    ) -> Result<Verified, FetchError> {
        let mut sha = Sha256::new();
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        // One byte past the announced size is enough to know it grew.
        let mut limited = src.take(file.size + 1);
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(FetchError::Io { path: file.path.as_path().to_path_buf(), op: "read", source })
                }
            };
            // `read` never reports more than the buffer holds; `get` keeps that a fact
            // the compiler checks rather than a panic.
            let chunk = buf.get(..n).unwrap_or_default();
            size += n as u64;
            sha.update(chunk);
            md5.update(chunk);
            out.write_all(chunk).map_err(|source| FetchError::Io {
                path: out_path.to_path_buf(),
                op: "write",
                source,
            })?;
        }
        if size != file.size {
            return Err(Self::refuse(
                file,
                format!("changed while being read ({size} bytes, announced {})", file.size),
            ));
        }
        let sha256 = hex::encode(sha.finalize());
        if !sha256.eq_ignore_ascii_case(&file.sha256) {
            return Err(Self::refuse(file, format!("has sha256 {sha256}, not the announced {}", file.sha256)));
        }
        Ok(Verified { size, sha256, md5: hex::encode(md5.finalize()) })
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use opsagent_proto::newtypes::AbsPath;

    fn fetched(path: &Path, content: &[u8]) -> FetchedFile {
        FetchedFile {
            url: "http://h/f".into(),
            path: AbsPath::parse(&path.display().to_string()).unwrap(),
            size: content.len() as u64,
            sha256: hex::encode(Sha256::digest(content)),
        }
    }

    #[test]
    fn a_good_file_is_copied_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"payload").unwrap();
        std::os::unix::fs::chown(&src, Some(65534), None).unwrap();
        let files = [fetched(&src, b"payload")];
        let f = Fetched::new(&files, 65534);
        assert_eq!(f.missing(&["http://h/f", "http://h/g", "http://h/g"]), ["http://h/g"]);
        let dest = dir.path().join("copy");
        let held = Dir::open(dir.path()).unwrap();
        let v = f.copy_to("http://h/f", &held, OsStr::new("copy")).unwrap().unwrap();
        assert_eq!(v.size, 7);
        assert_eq!(v.md5, hex::encode(Md5::digest(b"payload")));
        assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
        let m = std::fs::metadata(&dest).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o600));
        assert_eq!(f.read_small("http://h/f", 100).unwrap().unwrap(), b"payload");
        assert!(f.copy_to("http://h/other", &held, OsStr::new("x")).unwrap().is_none());
        let err = f.read_small("http://h/f", 3).unwrap_err();
        assert_eq!(err.to_string(), "http://h/f: the download is larger than 3 bytes");
    }

    #[test]
    fn wrong_owner_links_sizes_and_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"payload").unwrap();
        let dest = dir.path().join("copy");
        let (held, copy) = (Dir::open(dir.path()).unwrap(), OsStr::new("copy"));

        // Owned by root, but the peer is uid 65534.
        let files = [fetched(&src, b"payload")];
        let err = Fetched::new(&files, 65534).copy_to("http://h/f", &held, copy).unwrap_err().to_string();
        assert!(err.contains("is owned by uid 0, not by the requesting agent (uid 65534)"), "{err}");
        assert!(!dest.exists());

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let files = [fetched(&link, b"payload")];
        let err = Fetched::new(&files, 0).copy_to("http://h/f", &held, copy).unwrap_err().to_string();
        assert!(err.ends_with("is a symbolic link"), "{err}");

        let files = [fetched(dir.path(), b"")];
        let err = Fetched::new(&files, 0).copy_to("http://h/f", &held, copy).unwrap_err().to_string();
        assert!(err.contains("is a directory, not a regular file"), "{err}");

        let mut wrong_size = fetched(&src, b"payload");
        wrong_size.size = 3;
        let files = [wrong_size];
        let err = Fetched::new(&files, 0).copy_to("http://h/f", &held, copy).unwrap_err().to_string();
        assert!(err.ends_with("has 7 bytes, not the announced 3"), "{err}");

        let files = [fetched(&src, b"PAYLOAD")];
        let err = Fetched::new(&files, 0).copy_to("http://h/f", &held, copy).unwrap_err().to_string();
        assert!(err.contains("has sha256 ") && err.contains("not the announced"), "{err}");
        assert!(!dest.exists(), "a refused copy leaves nothing behind");
    }
}
