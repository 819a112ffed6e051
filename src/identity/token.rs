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

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::IdentityError;
use crate::config::identifier;

const TOKEN_BYTES: usize = 32;
/// A token file is two short lines; anything bigger is not one.
const MAX_FILE_LEN: u64 = 4096;
const APP_PREFIX: &str = "app_id=";

#[derive(Debug, PartialEq, Eq)]
struct TokenFile {
    token: String,
    app_id: Option<String>,
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
    match file.app_id {
        Some(recorded) if recorded == app_id => Ok(file.token),
        Some(recorded) => {
            let path_text = path.display();
            tracing::info!(path = %path_text, from = %recorded, to = %app_id, "new app: new token");
            new_token(path, app_id)
        }
        None => {
            let path_text = path.display();
            tracing::info!(path = %path_text, %app_id, "app id recorded");
            write_token_file(path, &file.token, app_id)?;
            Ok(file.token)
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
        return Err(malformed("larger than 4096 bytes"));
    }
    let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text"))?;
    parse_token_file(&text).map(Some).map_err(malformed)
}

fn parse_token_file(text: &str) -> Result<TokenFile, &'static str> {
    let mut lines = text.lines();
    let token = lines.next().unwrap_or_default().trim();
    if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the first line is not 64 hexadecimal digits");
    }
    let app_id = match lines.next() {
        None => None,
        Some(line) => Some(line.trim().strip_prefix(APP_PREFIX).ok_or("the second line is not `app_id=…`")?),
    };
    if lines.any(|l| !l.trim().is_empty()) {
        return Err("more than two lines");
    }
    Ok(TokenFile { token: token.to_string(), app_id: app_id.map(str::to_string) })
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
    fn malformed_or_unreadable_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for (content, problem) in [
            ("not-a-token\n", "the first line is not 64 hexadecimal digits"),
            (&format!("{}\nowner=x\n", "a".repeat(64)), "the second line is not `app_id=…`"),
            (&format!("{}\napp_id=x\nmore\n", "a".repeat(64)), "more than two lines"),
        ] {
            fs::write(&path, content).unwrap();
            let e = load_or_create_token(&path, "app-1").unwrap_err().to_string();
            assert_eq!(e, format!("{}: malformed instance token file: {problem}", path.display()));
        }
        fs::write(&path, "a".repeat(5000)).unwrap();
        assert!(load_or_create_token(&path, "x").unwrap_err().to_string().contains("larger than 4096 bytes"));

        let as_dir = dir.path().join("dir");
        fs::create_dir(&as_dir).unwrap();
        let e = load_or_create_token(&as_dir, "app-1").unwrap_err().to_string();
        assert_eq!(e, format!("{}: cannot read the instance token: not a regular file", as_dir.display()));
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
