//! `common.ssh.auth` and `common.ssh.known_host`: one user's `authorized_keys` and
//! `known_hosts` (Salt's `ssh_auth` and `ssh_known_hosts`, which the adaptor mapped
//! them to).
//!
//! The file is `filename` (default `.ssh/authorized_keys` / `.ssh/known_hosts`) in the
//! user's home directory, or an absolute path. A missing `.ssh` is created 0700 and a
//! new file 0600, both owned by the user. The user owns the directory, so everything
//! goes through directory descriptors ([`crate::dirfd`]): a link the user planted (the
//! file itself, or `.ssh`, pointing at `/etc/shadow` or `/root/.ssh`) is refused,
//! never followed, and a file with several hard links is refused too (root would read
//! another file's content and write it back into one the user can read). The file is
//! replaced atomically, with its owner and mode kept.
//!
//! `common.ssh.auth`: each line of `content`, and `authname`, is a key. A line with
//! blanks is a whole `authorized_keys` line (options, type, key, comment) and kept as
//! written; a bare key gets `encrypt_algorithm` in front (an unknown algorithm is
//! `ssh-rsa`, as the adaptor made it; `ecdsa`, which the adaptor offered, is read
//! from the key itself). A key is identified by its base64 body: present replaces a
//! line holding the same key and otherwise appends; `absent` removes its lines.
//!
//! `common.ssh.known_host`: the host's keys are scanned with `ssh-keyscan` (of type
//! `encrypt_algorithm` when given, port `port`), and when `fingerprint` is given only a
//! key with that fingerprint (MD5 `aa:bb:…`, or `SHA256:…`) is accepted; none: the
//! state fails naming the fingerprints found. Without `fingerprint` the keys scanned are
//! trusted on first use, as Salt did, and the comment says so. The file's plain lines
//! for that host are replaced by the scanned ones; hashed lines (`|1|…`) are left as
//! they are. `absent` removes the host's plain lines.

use std::ffi::OsStr;
use std::io::Read;
use std::path::PathBuf;

use md5::{Digest, Md5};
use nix::unistd::{Gid, Uid, User};
use opsagent_proto::catalogue::{CommonSshAuth, CommonSshKnownHost};
use opsagent_proto::newtypes::{AbsPath, InvalidValue};
use opsagent_proto::param_types::HomeFile;
use opsagent_proto::request::{Change, Outcome};
use sha2::Sha256;

use crate::cancel::Cancel;
use crate::dirfd::{self, Dir, WalkError};
use crate::exec::{self, CommandSpec, ToolError};
use crate::fsutil::{self, FsError};

/// Larger than any real key file; a bigger one is not read into memory.
const MAX_FILE_BYTES: u64 = 4 << 20;
const KEYSCAN_TIMEOUT_SECS: u64 = 60;

/// Key types OpenSSH writes (`ssh-keygen -t`, security keys included).
const KEY_TYPES: &[&str] = &[
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("parameter {param}: {problem}")]
    Param { param: &'static str, problem: String },
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error("no user {0} on this host")]
    NoUser(String),
    #[error("cannot look up user {0}: {1}")]
    Lookup(String, nix::Error),
    #[error("{0} has several hard links; refusing to read and rewrite a file that may also be elsewhere")]
    HardLinked(PathBuf),
    #[error("{0} is larger than {MAX_FILE_BYTES} bytes; not a key file")]
    TooLarge(PathBuf),
    #[error("{path} is {found}, not a regular file")]
    NotAFile { path: PathBuf, found: &'static str },
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no key of {host} has the fingerprint {wanted} (found: {found})")]
    Fingerprint { host: String, wanted: String, found: String },
    #[error("ssh-keyscan found no key for {0}")]
    NoKey(String),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Walk(#[from] WalkError),
}

// ---- keys ------------------------------------------------------------------------

/// Standard base64 (padding optional); `None` for anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in body.as_bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 without padding (OpenSSH's SHA256 fingerprints).
fn base64_encode_nopad(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The key type written inside a key blob (its first SSH string).
pub fn blob_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4 + len)?).ok()
}

/// `MD5:aa:bb:…` and `SHA256:…` of a key blob, as `ssh-keygen -l -E` prints them.
pub fn fingerprints(blob: &[u8]) -> (String, String) {
    let md5 = Md5::digest(blob).iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    (format!("MD5:{md5}"), format!("SHA256:{}", base64_encode_nopad(&Sha256::digest(blob))))
}

/// Whether the recipe's `fingerprint` names this blob: MD5 with or without `MD5:`, in
/// any case, or SHA256 exactly.
pub fn fingerprint_matches(wanted: &str, blob: &[u8]) -> bool {
    let (md5, sha) = fingerprints(blob);
    let w = wanted.trim();
    w == sha || w.to_ascii_lowercase().trim_start_matches("md5:") == &md5[4..]
}

/// The position of the key type in a line's words, and so of the key after it.
fn key_index(words: &[&str]) -> Option<usize> {
    words.iter().position(|w| KEY_TYPES.contains(w)).filter(|i| *i + 1 < words.len())
}

/// The base64 body of the key on an `authorized_keys` or `known_hosts` line.
pub fn key_body(line: &str) -> Option<&str> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let words: Vec<&str> = t.split_whitespace().collect();
    key_index(&words).map(|i| words[i + 1])
}

/// The `authorized_keys` line a recipe's key stands for.
pub fn auth_line(entry: &str, enc: &str) -> Result<String, SshError> {
    let entry = entry.trim();
    let bad = |problem: String| SshError::Param { param: "content", problem };
    if entry.contains(char::is_whitespace) {
        return match key_body(entry).and_then(base64_decode) {
            Some(_) => Ok(entry.to_string()),
            None => Err(bad(format!("{:?} is not an authorized_keys line (type and base64 key)", short(entry)))),
        };
    }
    let blob = base64_decode(entry).ok_or_else(|| bad(format!("{:?} is not a base64 public key", short(entry))))?;
    let inside = blob_type(&blob).filter(|t| KEY_TYPES.contains(t));
    // The adaptor's fallback for an unknown algorithm was ssh-rsa; the key says what
    // it really is (its `ecdsa` choice alone is no type sshd reads).
    let enc = match (KEY_TYPES.contains(&enc.trim()), inside) {
        (true, _) => enc.trim(),
        (false, Some(t)) => t,
        (false, None) => "ssh-rsa",
    };
    Ok(format!("{enc} {entry}"))
}

fn short(s: &str) -> String {
    if s.len() > 40 {
        format!("{}…", &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)])
    } else {
        s.to_string()
    }
}

/// The new `authorized_keys` text: each wanted line in place of the lines that hold
/// its key (or appended), or those lines removed.
pub fn merge_auth(current: &str, wanted: &[String], absent: bool) -> String {
    let mut lines: Vec<String> = current.lines().map(str::to_string).collect();
    for want in wanted {
        let body = key_body(want);
        let same = |l: &String| body.is_some() && key_body(l) == body;
        if absent {
            lines.retain(|l| !same(l));
            continue;
        }
        match lines.iter().position(same) {
            Some(i) => {
                lines[i] = want.clone();
                // A key listed twice is kept once.
                let mut seen = false;
                lines.retain(|l| {
                    if same(l) {
                        let keep = !seen;
                        seen = true;
                        keep
                    } else {
                        true
                    }
                });
            }
            None => lines.push(want.clone()),
        }
    }
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// The host field of `known_hosts` for a host and port (`[host]:port` off 22).
pub fn host_field(host: &str, port: Option<u64>) -> String {
    match port {
        Some(p) if p != 22 => format!("[{host}]:{p}"),
        _ => host.to_string(),
    }
}

/// Whether a plain (not hashed) `known_hosts` line is about `field`.
fn names_host(line: &str, field: &str) -> bool {
    let t = line.trim_start();
    let t = t.strip_prefix("@cert-authority ").or_else(|| t.strip_prefix("@revoked ")).map_or(t, |_| "");
    t.split_whitespace().next().is_some_and(|hosts| hosts.split(',').any(|h| h == field))
}

/// The new `known_hosts` text: the host's plain lines replaced by `keys` (placed where
/// the first one was, or appended), or removed when `keys` is empty.
pub fn merge_known(current: &str, field: &str, keys: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for line in current.lines() {
        if names_host(line, field) {
            if !placed {
                out.extend(keys.iter().cloned());
                placed = true;
            }
            continue;
        }
        out.push(line.to_string());
    }
    if !placed {
        out.extend(keys.iter().cloned());
    }
    let mut text = out.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// The lines `ssh-keyscan` printed for `field` (comments skipped), as `field TYPE KEY`,
/// those with the wanted fingerprint only when one is given.
pub fn scanned_keys(out: &str, field: &str, fingerprint: Option<&str>) -> Result<Vec<String>, SshError> {
    let mut all = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 3 || !KEY_TYPES.contains(&words[1]) {
            continue;
        }
        if let Some(blob) = base64_decode(words[2]) {
            all.push((format!("{field} {} {}", words[1], words[2]), blob));
        }
    }
    if all.is_empty() {
        return Err(SshError::NoKey(field.to_string()));
    }
    // ssh-keyscan's order is the order its connections answered: sorted, the lines
    // written are the same every round, and an unchanged host is no change.
    all.sort();
    all.dedup();
    let Some(wanted) = fingerprint.map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(all.into_iter().map(|(l, _)| l).collect());
    };
    let matching: Vec<String> =
        all.iter().filter(|(_, blob)| fingerprint_matches(wanted, blob)).map(|(l, _)| l.clone()).collect();
    if matching.is_empty() {
        let found = all.iter().map(|(_, b)| fingerprints(b).0).collect::<Vec<_>>().join(", ");
        return Err(SshError::Fingerprint { host: field.to_string(), wanted: wanted.to_string(), found });
    }
    Ok(matching)
}

// ---- files -----------------------------------------------------------------------

/// Where the file is and who owns it.
pub struct Target {
    pub path: AbsPath,
    pub uid: u32,
    pub gid: u32,
    /// The file is in the user's home: missing directories are the user's, 0700.
    pub in_home: bool,
}

pub fn target(username: Option<&str>, filename: &HomeFile) -> Result<Target, SshError> {
    let user = match username.map(str::trim).filter(|u| !u.is_empty()) {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| SshError::Lookup(name.to_string(), e))?
                .ok_or_else(|| SshError::NoUser(name.to_string()))?,
        ),
        None => None,
    };
    let (uid, gid) = user.as_ref().map_or((0, 0), |u| (u.uid.as_raw(), u.gid.as_raw()));
    // `filename` is validated at decode (`HomeFile`: absolute and not `/`, or a path in
    // the home that cannot climb out of it). The home itself comes from the account
    // database, not from the request: it is checked here.
    let (path, in_home) = match filename {
        HomeFile::Absolute(path) => (path.clone(), false),
        HomeFile::InHome(rel) => {
            let home = user.as_ref().map(|u| u.dir.clone()).ok_or_else(|| SshError::Param {
                param: "filename",
                problem: "a relative file needs a username (whose home it is in)".into(),
            })?;
            let raw = format!("{}/{rel}", home.display());
            (AbsPath::parse(&raw).map_err(|source| SshError::Path { param: "filename", source })?, true)
        }
    };
    Ok(Target { path, uid, gid, in_home })
}

/// An existing file's mode, uid and gid.
type Attrs = (u32, u32, u32);

/// The opened directory that holds the file (created when missing; in a plan, `None`
/// when it would be), and the file's current text, mode and owner (`None`: no file yet).
fn open(t: &Target, changes: &mut Vec<Change>) -> Result<(Option<Dir>, String, Option<Attrs>), SshError> {
    let parent = t.path.parent();
    if crate::plan::active() {
        let owner = if t.in_home { (t.uid, t.gid) } else { (0, 0) };
        let mode = if t.in_home { 0o700 } else { fsutil::PARENT_DIR_MODE };
        let planned =
            fsutil::planned_dirs(parent.as_path(), mode, (Uid::from_raw(owner.0), Gid::from_raw(owner.1)), changes)?;
        return match planned {
            Some(dir) => read_existing(t, dir),
            None => Ok((None, String::new(), None)),
        };
    }
    let dir = if t.in_home {
        fsutil::create_dir_all(parent.as_path(), 0o700, (Uid::from_raw(t.uid), Gid::from_raw(t.gid)), changes)?
    } else {
        fsutil::create_dir_all(
            parent.as_path(),
            fsutil::PARENT_DIR_MODE,
            (Uid::from_raw(0), Gid::from_raw(0)),
            changes,
        )?
    };
    read_existing(t, dir)
}

fn read_existing(t: &Target, dir: Dir) -> Result<(Option<Dir>, String, Option<Attrs>), SshError> {
    let name = file_name(&t.path);
    let shown = t.path.as_path().to_path_buf();
    let Some(meta) = dir.stat(name)? else {
        return Ok((Some(dir), String::new(), None));
    };
    if meta.kind != rustix::fs::FileType::RegularFile {
        return Err(SshError::NotAFile { path: shown, found: dirfd::kind_of(meta.kind) });
    }
    let Some(mut f) = dir.open_file(name)? else {
        return Ok((Some(dir), String::new(), None));
    };
    // Judged on the descriptor: the name may have been swapped since the stat.
    let now = dirfd::Meta::of_file(&f, &shown)?;
    if now.kind != rustix::fs::FileType::RegularFile {
        return Err(SshError::NotAFile { path: shown, found: dirfd::kind_of(now.kind) });
    }
    if now.several_links {
        return Err(SshError::HardLinked(shown));
    }
    let mut bytes = Vec::new();
    (&mut f)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SshError::Read { path: shown.clone(), source })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(SshError::TooLarge(shown));
    }
    Ok((Some(dir), String::from_utf8_lossy(&bytes).into_owned(), Some((now.mode, now.uid, now.gid))))
}

fn file_name(path: &AbsPath) -> &OsStr {
    path.as_path().file_name().unwrap_or_else(|| OsStr::new("."))
}

/// Writes `text` when it differs from `current`, keeping an existing file's mode and
/// owner (a new one: 0600, the target's owner).
fn write_if_changed(
    t: &Target,
    dir: Option<&Dir>,
    current: &str,
    existing: Option<Attrs>,
    text: &str,
    what: String,
    changes: &mut Vec<Change>,
) -> Result<(), SshError> {
    if text == current && existing.is_some() {
        return Ok(());
    }
    if existing.is_none() && text.is_empty() {
        return Ok(());
    }
    let (mode, uid, gid) = existing.unwrap_or((0o600, t.uid, t.gid));
    // A plan records the change; `dir` is missing only in a plan (it would be created).
    if let Some(dir) = dir.filter(|_| !crate::plan::active()) {
        fsutil::write_in(dir, file_name(&t.path), text.as_bytes(), (mode, uid, gid), fsutil::Durable::Now)?;
    }
    changes.push(Change::new(t.path.to_string(), what));
    Ok(())
}

// ---- states ----------------------------------------------------------------------

pub fn auth(p: &CommonSshAuth) -> Outcome {
    let mut changes = Vec::new();
    let result = run_auth(p, &mut changes);
    super::finish(&format!("authorized keys of {}", p.username.trim()), result, changes, &[])
}

fn run_auth(p: &CommonSshAuth, changes: &mut Vec<Change>) -> Result<(), SshError> {
    let mut wanted = Vec::new();
    let entries = p.authname.iter().map(|a| a.0.as_str()).chain(p.content.iter().flat_map(|c| c.lines()));
    for entry in entries.map(str::trim).filter(|e| !e.is_empty()) {
        wanted.push(auth_line(entry, &p.encrypt_algorithm)?);
    }
    if wanted.is_empty() {
        return Err(SshError::Param { param: "content", problem: "no key given".into() });
    }
    let t = target(Some(&p.username), &p.filename)?;
    let (dir, current, existing) = open(&t, changes)?;
    let text = merge_auth(&current, &wanted, p.absent);
    let n = wanted.len();
    let what = if p.absent { format!("{n} key(s) removed") } else { format!("{n} key(s) written") };
    write_if_changed(&t, dir.as_ref(), &current, existing, &text, what, changes)
}

pub async fn known_host(p: &CommonSshKnownHost, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let result = run_known(p, &mut changes, &mut notes, &mut cancel).await;
    let cancelled = matches!(&result, Err(SshError::Tool(e)) if e.is_cancelled());
    let mut outcome = super::finish(&format!("known host {}", p.hostname.trim()), result, changes, &notes);
    outcome.cancelled = cancelled;
    outcome
}

async fn run_known(
    p: &CommonSshKnownHost,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    cancel: &mut Cancel,
) -> Result<(), SshError> {
    let host = p.hostname.trim();
    let field = host_field(host, p.port.map(|port| u64::from(port.0)));
    let t = target(p.username.as_deref(), &p.filename)?;
    let keys = if p.absent {
        Vec::new()
    } else {
        let mut args = vec!["-T".to_string(), "10".into()];
        if let Some(port) = p.port {
            args.extend(["-p".into(), port.0.to_string()]);
        }
        if let Some(enc) = p.encrypt_algorithm.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            // ssh-keyscan names types by family (rsa, ecdsa, ed25519, dsa).
            let family = enc.trim_start_matches("ssh-").split('-').next().unwrap_or(enc);
            let family = if family == "dss" { "dsa" } else { family };
            args.extend(["-t".into(), family.to_string()]);
        }
        args.extend(["--".to_string(), host.to_string()]);
        let spec = CommandSpec::tool("ssh-keyscan", args)
            .inspection()
            .with_timeout(std::time::Duration::from_secs(KEYSCAN_TIMEOUT_SECS));
        let scanned = exec::checked(&spec, &[0, 1], cancel).await?;
        let fingerprint = p.fingerprint.as_deref();
        let keys = scanned_keys(&scanned.output, &field, fingerprint)?;
        if fingerprint.is_none_or(|f| f.trim().is_empty()) {
            notes.push("no fingerprint given: the keys the host presented were trusted as they are".into());
        }
        keys
    };
    let (dir, current, existing) = open(&t, changes)?;
    let text = merge_known(&current, &field, &keys);
    let what = if p.absent { format!("{field} removed") } else { format!("{field}: {} key(s) written", keys.len()) };
    write_if_changed(&t, dir.as_ref(), &current, existing, &text, what, changes)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::states::testutil::{refused, typed};
    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    /// An ed25519 public key made with `ssh-keygen -t ed25519` (no private half kept).
    const ED: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHy3OCDRQ8bOnoMZN4u6X7T6tq5zSBCpCyN6tFGmyO2h";
    const RSA_BODY_PREFIX: &str = "AAAAB3NzaC1yc2EAAAADAQABAAAAgQ";

    #[test]
    fn keys_fingerprints_and_lines() {
        let blob = base64_decode(ED).unwrap();
        assert_eq!(blob_type(&blob), Some("ssh-ed25519"));
        let (md5, sha) = fingerprints(&blob);
        assert!(md5.starts_with("MD5:") && md5.len() == 4 + 47, "{md5}");
        assert!(sha.starts_with("SHA256:") && sha.len() == 7 + 43, "{sha}");
        assert!(fingerprint_matches(&md5[4..].to_uppercase(), &blob));
        assert!(fingerprint_matches(&sha, &blob));
        assert!(!fingerprint_matches("00:11", &blob));
        // A bare key: the algorithm given, or the key's own when the adaptor's
        // fallback would name a type sshd does not read.
        assert_eq!(auth_line(ED, "ssh-ed25519").unwrap(), format!("ssh-ed25519 {ED}"));
        assert_eq!(auth_line(ED, "ecdsa").unwrap(), format!("ssh-ed25519 {ED}"));
        assert_eq!(auth_line(ED, "bogus").unwrap(), format!("ssh-ed25519 {ED}"));
        assert!(base64_decode(RSA_BODY_PREFIX).is_some_and(|b| blob_type(&b) == Some("ssh-rsa")));
        let full = format!("from=\"10.0.0.0/8\" ssh-ed25519 {ED} ops@laptop");
        assert_eq!(auth_line(&full, "ssh-rsa").unwrap(), full);
        assert!(auth_line("not a key", "ssh-rsa").is_err());
        assert!(auth_line("@@@", "ssh-rsa").is_err());
    }

    #[test]
    fn authorized_keys_merge_by_key_body() {
        let mine = format!("ssh-ed25519 {ED} new-comment");
        let start = format!("# mine\nssh-rsa {RSA_BODY_PREFIX}xyz other\nssh-ed25519 {ED} old-comment\n");
        let merged = merge_auth(&start, std::slice::from_ref(&mine), false);
        assert_eq!(merged, format!("# mine\nssh-rsa {RSA_BODY_PREFIX}xyz other\n{mine}\n"));
        assert_eq!(merge_auth(&merged, std::slice::from_ref(&mine), false), merged);
        assert_eq!(
            merge_auth(&merged, std::slice::from_ref(&mine), true),
            format!("# mine\nssh-rsa {RSA_BODY_PREFIX}xyz other\n")
        );
        assert_eq!(merge_auth("", std::slice::from_ref(&mine), false), format!("{mine}\n"));
    }

    #[test]
    fn known_hosts_merge_and_scan_output() {
        let scanned = format!("# h:22 SSH-2.0-OpenSSH_9.2\nh ssh-ed25519 {ED}\nh ssh-rsa {RSA_BODY_PREFIX}xyz\n");
        let all = scanned_keys(&scanned, "h", None).unwrap();
        assert_eq!(all, [format!("h ssh-ed25519 {ED}"), format!("h ssh-rsa {RSA_BODY_PREFIX}xyz")]);
        let (md5, _) = fingerprints(&base64_decode(ED).unwrap());
        assert_eq!(scanned_keys(&scanned, "h", Some(&md5)).unwrap(), [format!("h ssh-ed25519 {ED}")]);
        let err = scanned_keys(&scanned, "h", Some("aa:bb")).unwrap_err().to_string();
        assert!(err.starts_with("no key of h has the fingerprint aa:bb (found: MD5:"), "{err}");
        assert!(matches!(scanned_keys("# nothing\n", "h", None), Err(SshError::NoKey(_))));
        // ssh-keyscan prints a host's keys in the order its connections answer, which
        // changes from run to run: the lines are the same whatever the order, so that a
        // second round finds the file as it wants it (seen against a real sshd).
        let reordered = format!("h ssh-rsa {RSA_BODY_PREFIX}xyz\n# h:22 SSH-2.0-OpenSSH_9.2\nh ssh-ed25519 {ED}\n");
        assert_eq!(scanned_keys(&reordered, "h", None).unwrap(), all);

        let current = "other ssh-rsa AAAA\nh,10.0.0.1 ssh-rsa OLD\n|1|hashed= ssh-rsa KEEP\n";
        let keys = vec![format!("h ssh-ed25519 {ED}")];
        assert_eq!(
            merge_known(current, "h", &keys),
            format!("other ssh-rsa AAAA\n{}\n|1|hashed= ssh-rsa KEEP\n", keys[0])
        );
        assert_eq!(merge_known(current, "h", &[]), "other ssh-rsa AAAA\n|1|hashed= ssh-rsa KEEP\n");
        assert_eq!(host_field("h", Some(2222)), "[h]:2222");
        assert_eq!(host_field("h", Some(22)), "h");
    }

    fn auth_params(raw: serde_json::Value) -> CommonSshAuth {
        typed("common.ssh.auth", raw)
    }

    #[test]
    fn authorized_keys_written_for_the_user_then_unchanged_then_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("home/.ssh/authorized_keys");
        let p = |absent: bool| {
            auth_params(json!({"username": "nobody", "filename": file, "content": format!("{ED}\n\n"),
                               "encrypt_algorithm": "ssh-ed25519", "absent": absent}))
        };
        let out = auth(&p(false));
        assert!(out.result, "{}", out.comment);
        assert_eq!(fs::read_to_string(&file).unwrap(), format!("ssh-ed25519 {ED}\n"));
        let m = fs::metadata(&file).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, 65534));
        let again = auth(&p(false));
        assert!(again.result && again.changes.is_empty(), "{again:?}");
        let gone = auth(&p(true));
        assert!(gone.result && gone.changes.len() == 1, "{gone:?}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "");
    }

    /// The user owns the directory: a link planted as the key file, or a hard link to
    /// a file only root reads, is refused and the other file untouched and unread.
    #[test]
    fn a_planted_link_or_hard_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("shadow");
        fs::write(&victim, "root:secret\n").unwrap();
        let ssh = tmp.path().join("u/.ssh");
        fs::create_dir_all(&ssh).unwrap();
        std::os::unix::fs::chown(tmp.path().join("u"), Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&ssh, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::symlink(&victim, ssh.join("authorized_keys")).unwrap();
        let p = auth_params(json!({"username": "nobody", "filename": ssh.join("authorized_keys"), "authname": ED}));
        let out = auth(&p);
        assert!(!out.result, "{out:?}");
        assert!(out.comment.contains("symbolic link"), "{}", out.comment);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root:secret\n");

        fs::remove_file(ssh.join("authorized_keys")).unwrap();
        fs::hard_link(&victim, ssh.join("authorized_keys")).unwrap();
        let out = auth(&p);
        assert!(!out.result && out.comment.contains("several hard links"), "{}", out.comment);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root:secret\n");

        // `.ssh` itself swapped for a link to root's directory.
        fs::remove_file(ssh.join("authorized_keys")).unwrap();
        fs::remove_dir(&ssh).unwrap();
        let roots = tmp.path().join("root-ssh");
        fs::create_dir(&roots).unwrap();
        std::os::unix::fs::symlink(&roots, &ssh).unwrap();
        let out = auth(&p);
        assert!(!out.result && out.comment.contains("refusing to follow it"), "{}", out.comment);
        assert_eq!(fs::read_dir(&roots).unwrap().count(), 0);
    }

    #[test]
    fn catalogue_refusals() {
        refused("common.ssh.auth", json!({"username": "u"}), "no key given");
        refused("common.ssh.auth", json!({"username": "u", "authname": ED, "filename": "../../etc/x"}), "filename");
        refused("common.ssh.known_host", json!({"hostname": "h", "filename": ".ssh/known_hosts"}), "absolute");
        refused("common.ssh.known_host", json!({"hostname": "-oProxyCommand=x", "username": "u"}), "hostname");
        refused("common.ssh.known_host", json!({"hostname": "h", "username": "u", "port": 70000}), "port");
    }
}
