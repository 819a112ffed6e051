//! The instance token: a secret sent in every Handshake, generated once per app.
//!
//! File format (mode 0600, owner = whoever created it; never chowned here, the installer
//! sets the owner when it runs as root):
//! ```text
//! <64 hex digits: 32 random bytes>
//! app_id=<the app id the token belongs to>
//! ```
//! A different `app_id` means the instance moved to another app, so a new token is made
//! (protocol.md: "changing app_id resets it"). A file holding only the token line (as an
//! installer may write it) is adopted for the current app and the line is added.
//! Writes are atomic: a 0600 temporary file in the same directory, fsync, rename.
//!
//! Any other existing file is an **opaque secret**, sent exactly as it is: the original
//! agent made its token with `ssh-keygen` (an RSA private key in PEM) and sent the file's
//! whole content (`cloud.token`: `f.read()`), and its backends know instances by it. Its
//! app is recorded beside it (`<file>.app_id`), never in it; a different app replaces it
//! with a generated token. Only a missing (or empty) token file is generated.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::IdentityError;
use crate::config::identifier;

const TOKEN_BYTES: usize = 32;
/// Our token file is two short lines; an opaque one an RSA key (an OpenSSH 8192-bit key
/// is under 7 KiB). Anything bigger is not a token.
const MAX_FILE_LEN: u64 = 16 * 1024;
const APP_PREFIX: &str = "app_id=";

#[derive(Debug, PartialEq, Eq)]
enum TokenFile {
    /// Ours: 64 hex digits, and the app it belongs to once recorded.
    Ours { token: String, app_id: Option<String> },
    /// Written by someone else (the original agent's `ssh-keygen`): sent as it is.
    Opaque(String),
}

/// Where the app of an opaque token is recorded.
fn app_file(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".app_id");
    path.with_file_name(name)
}

/// The instance token for `app_id`, from `path`, created (or reset when the recorded app
/// differs) as needed. The parent directory is created with mode 0700 if missing.
pub fn load_or_create_token(path: &Path, app_id: &str) -> Result<String, IdentityError> {
    identifier(app_id).map_err(|problem| IdentityError::TokenAppId {
        path: path.to_path_buf(),
        app_id: app_id.to_string(),
        problem,
    })?;
    let Some(file) = read_token_file(path)? else {
        tracing::info!(path = %path.display(), "creating the instance token");
        return new_token(path, app_id);
    };
    let (token, recorded) = match file {
        TokenFile::Ours { token, app_id } => (token, app_id),
        TokenFile::Opaque(secret) => return opaque_token(path, secret, app_id),
    };
    match recorded {
        Some(recorded) if recorded == app_id => Ok(token),
        Some(recorded) => {
            let path_text = path.display();
            tracing::info!(path = %path_text, from = %recorded, to = %app_id, "new app: new token");
            new_token(path, app_id)
        }
        None => {
            let path_text = path.display();
            tracing::info!(path = %path_text, %app_id, "app id recorded");
            write_token_file(path, &token, app_id)?;
            Ok(token)
        }
    }
}

/// An opaque token: its app is recorded beside it on first use; another app resets it.
fn opaque_token(path: &Path, secret: String, app_id: &str) -> Result<String, IdentityError> {
    let side = app_file(path);
    let recorded = match fs::read_to_string(&side) {
        Ok(text) => Some(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(IdentityError::TokenRead { path: side, error }),
    };
    match recorded {
        Some(recorded) if recorded == app_id => Ok(secret),
        Some(recorded) => {
            tracing::info!(path = %path.display(), from = %recorded, to = %app_id, "new app: new token");
            let token = new_token(path, app_id)?;
            let _ = fs::remove_file(&side);
            Ok(token)
        }
        None => {
            tracing::info!(path = %path.display(), %app_id, "existing token adopted as it is; its app recorded beside it");
            let write_error = |error| IdentityError::TokenWrite { path: side.clone(), error };
            let dir = side.parent().unwrap_or(Path::new("."));
            let mut suffix = [0u8; 6];
            getrandom::fill(&mut suffix).map_err(|e| IdentityError::Random(e.to_string()))?;
            let temp = dir.join(format!(".app_id.{}.tmp", hex::encode(suffix)));
            let r = write_new(&temp, format!("{app_id}\n").as_bytes()).and_then(|()| fs::rename(&temp, &side));
            if r.is_err() {
                let _ = fs::remove_file(&temp);
            }
            r.map_err(write_error)?;
            Ok(secret)
        }
    }
}

fn new_token(path: &Path, app_id: &str) -> Result<String, IdentityError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| IdentityError::Random(e.to_string()))?;
    let token = hex::encode(bytes);
    write_token_file(path, &token, app_id)?;
    Ok(token)
}

/// `None` if the file does not exist.
fn read_token_file(path: &Path) -> Result<Option<TokenFile>, IdentityError> {
    let read_error = |error| IdentityError::TokenRead { path: path.to_path_buf(), error };
    // O_NOFOLLOW: a symlink planted in the state directory must not redirect the secret.
    let file = match OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_error(e)),
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(read_error(std::io::Error::other("not a regular file")));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        let mode = format!("{:o}", meta.permissions().mode() & 0o777);
        let path_text = path.display();
        tracing::warn!(path = %path_text, %mode, "token readable by others; chmod 600");
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes).map_err(read_error)?;
    let malformed =
        |problem: &str| IdentityError::TokenMalformed { path: path.to_path_buf(), problem: problem.to_string() };
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(malformed("larger than 16384 bytes"));
    }
    // The secret goes into a JSON string: it must be text.
    let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(parse_token_file(&text)))
}

fn parse_token_file(text: &str) -> TokenFile {
    let ours = || {
        let mut lines = text.lines();
        let token = lines.next().unwrap_or_default().trim();
        if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let app_id = match lines.next() {
            None => None,
            Some(line) => Some(line.trim().strip_prefix(APP_PREFIX)?.to_string()),
        };
        if lines.any(|l| !l.trim().is_empty()) {
            return None;
        }
        Some(TokenFile::Ours { token: token.to_string(), app_id })
    };
    ours().unwrap_or_else(|| TokenFile::Opaque(text.to_string()))
}

fn write_token_file(path: &Path, token: &str, app_id: &str) -> Result<(), IdentityError> {
    let write_error = |error| IdentityError::TokenWrite { path: path.to_path_buf(), error };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(write_error)?;
    }
    let name = path.file_name().ok_or_else(|| write_error(std::io::Error::other("no file name")))?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| IdentityError::Random(e.to_string()))?;
    let temp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), hex::encode(suffix)));
    let result = write_new(&temp, format!("{token}\n{APP_PREFIX}{app_id}\n").as_bytes())
        .and_then(|()| fs::rename(&temp, path))
        .and_then(|()| File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

/// Creates `path` (which must not exist) with mode 0600 exactly, whatever the umask.
fn write_new(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_once_with_mode_0600_and_app_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/opsagent/token");
        let token = load_or_create_token(&path, "app-1").unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{token}\napp_id=app-1\n"));
        assert_eq!(load_or_create_token(&path, "app-1").unwrap(), token, "reused");
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn reset_when_the_app_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let first = load_or_create_token(&path, "app-1").unwrap();
        let second = load_or_create_token(&path, "app-2").unwrap();
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{second}\napp_id=app-2\n"));
        assert_eq!(load_or_create_token(&path, "app-2").unwrap(), second);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_token_only_file_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = "ab".repeat(32);
        fs::write(&path, format!("{token}\n")).unwrap();
        assert_eq!(load_or_create_token(&path, "app-1").unwrap(), token);
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{token}\napp_id=app-1\n"));
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "a".repeat(17000)).unwrap();
        assert!(load_or_create_token(&path, "x").unwrap_err().to_string().contains("larger than 16384 bytes"));
        fs::write(&path, [0xffu8, 0xfe]).unwrap();
        assert!(load_or_create_token(&path, "x").unwrap_err().to_string().contains("not UTF-8"));

        let as_dir = dir.path().join("dir");
        fs::create_dir(&as_dir).unwrap();
        let e = load_or_create_token(&as_dir, "app-1").unwrap_err().to_string();
        assert_eq!(e, format!("{}: cannot read the instance token: not a regular file", as_dir.display()));
    }

    /// Issue #18 item 6: the original's token (`ssh-keygen -b 2048 -q -P '' -f
    /// /etc/opsagent.token`, or the test suite's `echo -n testtoken`) is sent as it is,
    /// byte for byte, and kept; a change of app replaces it; only a missing or empty file
    /// is generated.
    #[test]
    fn an_existing_foreign_token_is_an_opaque_secret_sent_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx3bA9c1kz\n-----END RSA PRIVATE KEY-----\n";
        for (name, content) in [("opsagent.token", pem), ("test.token", "testtoken"), ("odd", "not-a-token\nx\ny\n")] {
            let path = dir.path().join(name);
            fs::write(&path, content).unwrap();
            assert_eq!(load_or_create_token(&path, "app-1").unwrap(), content, "{name}");
            assert_eq!(load_or_create_token(&path, "app-1").unwrap(), content, "{name} again");
            assert_eq!(fs::read_to_string(&path).unwrap(), content, "{name} unchanged");
            assert_eq!(fs::read_to_string(app_file(&path)).unwrap(), "app-1\n");
        }
        // Another app: a new token of ours, the record beside it gone.
        let path = dir.path().join("opsagent.token");
        let new = load_or_create_token(&path, "app-2").unwrap();
        assert_eq!(new.len(), 64);
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{new}\napp_id=app-2\n"));
        assert!(!app_file(&path).exists());
        // An empty file is a missing token.
        let empty = dir.path().join("empty");
        fs::write(&empty, "\n").unwrap();
        assert_eq!(load_or_create_token(&empty, "app-1").unwrap().len(), 64);
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, format!("{}\napp_id=app-1\n", "c".repeat(64))).unwrap();
        let link = dir.path().join("token");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = load_or_create_token(&link, "app-1").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: cannot read the instance token: ", link.display())), "{e}");
    }

    #[test]
    fn app_id_must_be_recordable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let e = load_or_create_token(&path, "a\nb").unwrap_err().to_string();
        assert!(e.contains("app id \"a\\nb\""), "{e}");
        assert!(!path.exists());
    }
}
