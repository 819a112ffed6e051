//! `linux.user`: a local account through the shadow utilities (`useradd`, `usermod`,
//! `chpasswd -e`), changing only the attributes that differ.
//!
//! `password`: a crypt hash (`$1$`, `$5$`, `$6$`, `$y$`, `$2b$`…, or a locked `!…`/`*`)
//! is stored as-is when /etc/shadow holds another one. Anything else is a plaintext
//! password, as real recipes send: it is hashed only when the current hash does not
//! already verify against it (MD5-, SHA-256-, SHA-512-crypt and yescrypt are verified
//! here, in pure Rust), with yescrypt when the host's own tools use it (PAM's
//! `pam_unix` option or `ENCRYPT_METHOD` in /etc/login.defs), SHA-512-crypt otherwise,
//! and a random salt; a second run changes nothing. The outcome then warns that a plaintext password in a recipe is a risk. No
//! password or hash is ever put on a command line (other local users can read those) or
//! in a message: the hash reaches `chpasswd -e` on its standard input.
//!
//! `home` is enforced on an existing account only when the recipe gives it (a new one
//! gets `/home/<username>` by default, created); `system-account` and the default home
//! matter only at creation. Accounts are local (/etc/passwd, /etc/shadow).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::Path;

use md5::{Digest, Md5};
use nix::unistd::{Gid, Group, Uid, User};
use opsagent_proto::catalogue::LinuxUser;
use opsagent_proto::request::{Change, Outcome};
use sha_crypt::{PasswordHashRef, PasswordHasher, PasswordVerifier, ShaCrypt};

use crate::cancel::Cancel;
use crate::exec::{self, CommandSpec, ToolError};
use crate::fsutil::{self, FsError};

pub const PLAINTEXT_WARNING: &str = "warning: the recipe holds this password in plaintext (the system keeps only \
     its hash); plaintext passwords in recipes are a risk: give a crypt hash instead (e.g. from `mkpasswd -m yescrypt`)";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("parameter {param}: {value:?} is not a valid user or group name")]
    Name { param: &'static str, value: String },
    #[error("parameter {param}: {problem}")]
    Field { param: &'static str, problem: String },
    #[error("cannot look up {0}: {1}")]
    Lookup(String, nix::Error),
    #[error("cannot read /etc/shadow: {0}")]
    Shadow(std::io::Error),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// A user or group name the shadow utilities accept, never starting with `-`: what
/// `AccountName` accepts. For `linux.cronjob` `user`, an `Account` (which also takes
/// numeric ids, as the other modules' owners do) that crontab needs as a name.
pub fn valid_account_name(name: &str) -> bool {
    opsagent_proto::param_types::account_name_problem(name).is_none()
}

// ---- passwords -------------------------------------------------------------------

/// A crypt(3) hash or a locked/disabled marker, as opposed to a plaintext password.
pub fn is_crypt_hash(s: &str) -> bool {
    let s = s.strip_prefix('!').unwrap_or(s);
    if s.is_empty() || s == "*" || s == "!" {
        return true;
    }
    s.starts_with('$')
        && s.split('$').count() >= 4
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "./$=,".contains(c))
}

/// How new hashes are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashMethod {
    Sha512,
    Yescrypt,
}

/// The scheme the host's own tools use: yescrypt when PAM's `pam_unix` is set to it
/// (Debian 11+, Ubuntu 22.04+: /etc/pam.d/common-password) or `ENCRYPT_METHOD` of
/// /etc/login.defs says so (Fedora 35+), SHA-512-crypt otherwise (understood everywhere).
pub fn host_method(login_defs: &str, pam_password: &str) -> HashMethod {
    let pam_yescrypt = pam_password.lines().any(|l| {
        !l.trim_start().starts_with('#') && l.contains("pam_unix.so") && l.split_whitespace().any(|w| w == "yescrypt")
    });
    if pam_yescrypt {
        HashMethod::Yescrypt
    } else {
        method_from_login_defs(login_defs)
    }
}

/// `ENCRYPT_METHOD` of /etc/login.defs.
pub fn method_from_login_defs(text: &str) -> HashMethod {
    let method = text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("ENCRYPT_METHOD")).then(|| w.next().unwrap_or_default().to_ascii_uppercase())
    });
    if method.as_deref() == Some("YESCRYPT") {
        HashMethod::Yescrypt
    } else {
        HashMethod::Sha512
    }
}

/// Whether `plain` is the password of `hash`; `None` for schemes not verified here.
pub fn verify(plain: &str, hash: &str) -> Option<bool> {
    let pw = plain.as_bytes();
    if let Some(rest) = hash.strip_prefix("$1$") {
        let salt = rest.split('$').next().unwrap_or_default();
        return Some(md5_crypt(pw, salt.as_bytes()) == hash);
    }
    if hash.starts_with("$5$") || hash.starts_with("$6$") {
        let parsed = PasswordHashRef::new(hash).ok()?;
        return Some(ShaCrypt::default().verify_password(pw, parsed).is_ok());
    }
    if hash.starts_with("$y$") {
        return Some(yescrypt::Yescrypt::default().verify_password(pw, hash).is_ok());
    }
    None
}

/// A new hash of `plain` with a random salt.
pub fn hash_new(plain: &str, method: HashMethod) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| UserError::Hash(e.to_string()))?;
    match method {
        HashMethod::Sha512 => ShaCrypt::default()
            .hash_password_with_salt(plain.as_bytes(), &salt[..12])
            .map(|h| h.to_string())
            .map_err(|e| UserError::Hash(e.to_string())),
        HashMethod::Yescrypt => yescrypt::Yescrypt::default()
            .hash_password_with_salt(plain.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| UserError::Hash(e.to_string())),
    }
}

/// What to do about the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordPlan {
    Keep,
    Set(String),
}

/// Decides from the recipe's `password` and the current shadow hash.
pub fn password_plan(desired: &str, current: Option<&str>, method: HashMethod) -> Result<PasswordPlan, UserError> {
    if is_crypt_hash(desired) {
        return Ok(if current == Some(desired) { PasswordPlan::Keep } else { PasswordPlan::Set(desired.to_string()) });
    }
    if current.and_then(|h| verify(desired, h)) == Some(true) {
        return Ok(PasswordPlan::Keep);
    }
    hash_new(desired, method).map(PasswordPlan::Set)
}

/// MD5-crypt (`$1$`), the scheme of the original agent, for verification only.
pub fn md5_crypt(pw: &[u8], salt: &[u8]) -> String {
    const MAGIC: &[u8] = b"$1$";
    const ITOA64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let salt = &salt[..salt.len().min(8)];
    let alt = Md5::new().chain_update(pw).chain_update(salt).chain_update(pw).finalize();
    let mut ctx = Md5::new().chain_update(pw).chain_update(MAGIC).chain_update(salt);
    let mut left = pw.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = pw.len();
    while i != 0 {
        ctx.update(if i & 1 == 1 { &[0u8][..] } else { &pw[..1] });
        i >>= 1;
    }
    let mut fin = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(pw)
        } else {
            c.update(fin)
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(pw);
        }
        if round & 1 == 1 {
            c.update(fin)
        } else {
            c.update(pw)
        }
        fin = c.finalize();
    }
    let mut out = format!("$1${}$", String::from_utf8_lossy(salt));
    let mut to64 = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(char::from(ITOA64[(v & 0x3f) as usize]));
            v >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        to64((u32::from(fin[a]) << 16) | (u32::from(fin[b]) << 8) | u32::from(fin[c]), 4);
    }
    to64(u32::from(fin[11]), 2);
    out
}

/// The hash field of `user` in a shadow file's text.
pub fn shadow_hash<'a>(shadow: &'a str, user: &str) -> Option<&'a str> {
    shadow.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        (f.next() == Some(user)).then(|| f.next().unwrap_or_default())
    })
}

// ---- accounts --------------------------------------------------------------------

/// An account as the system has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
    /// Supplementary groups, by name.
    pub groups: BTreeSet<String>,
}

fn account(name: &str) -> Result<Option<Account>, UserError> {
    let Some(u) = User::from_name(name).map_err(|e| UserError::Lookup(format!("user {name}"), e))? else {
        return Ok(None);
    };
    let cname = CString::new(name).map_err(|_| UserError::Name { param: "username", value: name.into() })?;
    let gids =
        nix::unistd::getgrouplist(&cname, u.gid).map_err(|e| UserError::Lookup(format!("the groups of {name}"), e))?;
    let groups = gids
        .into_iter()
        .filter(|g| *g != u.gid)
        .map(|g| Group::from_gid(g).ok().flatten().map_or_else(|| g.to_string(), |g| g.name))
        .collect();
    Ok(Some(Account {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        gecos: u.gecos.to_string_lossy().into_owned(),
        home: u.dir.display().to_string(),
        shell: u.shell.display().to_string(),
        groups,
    }))
}

/// The account attributes a recipe asks for (`None`: not asked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    pub groups: Option<BTreeSet<String>>,
    pub fullname: Option<String>,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub system: bool,
}

fn nologin() -> &'static str {
    if Path::new("/usr/sbin/nologin").exists() {
        "/usr/sbin/nologin"
    } else {
        "/sbin/nologin"
    }
}

pub fn wanted(p: &LinuxUser, nologin: &str) -> Wanted {
    // Names, home and shell are validated by their types at decode (`AccountName`,
    // `AccountNames`, `PathParam`): only what they mean on this host is checked here.
    let groups = p.groups.as_ref().map(|list| list.iter().map(|g| g.to_string()).collect::<BTreeSet<_>>());
    let home = p.home.as_ref().map(|h| h.to_string());
    let shell = if p.no_login { Some(nologin.to_string()) } else { p.shell.as_ref().map(|s| s.to_string()) };
    Wanted {
        uid: p.uid,
        gid: p.gid,
        groups,
        fullname: p.fullname.as_deref().map(str::to_string),
        home,
        shell,
        system: p.system_account,
    }
}

/// GECOS with its first field (the full name) replaced, the others kept.
fn with_fullname(gecos: &str, fullname: &str) -> String {
    match gecos.split_once(',') {
        Some((_, rest)) => format!("{fullname},{rest}"),
        None => fullname.to_string(),
    }
}

/// `useradd` arguments for a new account.
pub fn useradd_args(name: &str, w: &Wanted) -> Vec<String> {
    let mut a = Vec::new();
    if w.system {
        a.push("-r".to_string());
    }
    if let Some(uid) = w.uid {
        a.extend(["-u".to_string(), uid.to_string()]);
    }
    if let Some(gid) = w.gid {
        a.extend(["-g".to_string(), gid.to_string()]);
    }
    if let Some(groups) = &w.groups {
        if !groups.is_empty() {
            a.extend(["-G".to_string(), groups.iter().cloned().collect::<Vec<_>>().join(",")]);
        }
    }
    if let Some(f) = &w.fullname {
        a.extend(["-c".to_string(), f.clone()]);
    }
    if let Some(s) = &w.shell {
        a.extend(["-s".to_string(), s.clone()]);
    }
    let home = w.home.clone().unwrap_or_else(|| format!("/home/{name}"));
    a.extend(["-d".to_string(), home, "-m".to_string(), name.to_string()]);
    a
}

/// `usermod` arguments that bring `have` to `w`, and the changes they make.
pub fn usermod_args(name: &str, have: &Account, w: &Wanted) -> (Vec<String>, Vec<Change>) {
    let mut a = Vec::new();
    let mut changes = Vec::new();
    let mut change = |what: String| changes.push(Change::new(name, what));
    if let Some(uid) = w.uid.filter(|u| *u != u64::from(have.uid)) {
        a.extend(["-u".to_string(), uid.to_string()]);
        change(format!("uid {} -> {uid}", have.uid));
    }
    if let Some(gid) = w.gid.filter(|g| *g != u64::from(have.gid)) {
        a.extend(["-g".to_string(), gid.to_string()]);
        change(format!("primary group {} -> {gid}", have.gid));
    }
    if let Some(groups) = w.groups.as_ref().filter(|g| **g != have.groups) {
        a.extend(["-G".to_string(), groups.iter().cloned().collect::<Vec<_>>().join(",")]);
        let show = |s: &BTreeSet<String>| format!("[{}]", s.iter().cloned().collect::<Vec<_>>().join(", "));
        change(format!("groups {} -> {}", show(&have.groups), show(groups)));
    }
    if let Some(f) = w.fullname.as_ref().filter(|f| have.gecos.split(',').next().unwrap_or_default() != f.as_str()) {
        a.extend(["-c".to_string(), with_fullname(&have.gecos, f)]);
        change(format!("full name {:?} -> {f:?}", have.gecos.split(',').next().unwrap_or_default()));
    }
    if let Some(s) = w.shell.as_ref().filter(|s| **s != have.shell) {
        a.extend(["-s".to_string(), s.clone()]);
        change(format!("shell {} -> {s}", have.shell));
    }
    if let Some(h) = w.home.as_ref().filter(|h| **h != have.home) {
        a.extend(["-d".to_string(), h.clone()]);
        change(format!("home {} -> {h}", have.home));
    }
    if !a.is_empty() {
        a.push(name.to_string());
    }
    (a, changes)
}

/// The recipe's password, when it manages one: absent or blank means "not managed"
/// (the adaptor hashed and passed it only when non-empty; a new account then gets
/// useradd's locked password, an existing one keeps its own). A blank value is never
/// taken as an empty hash, which would allow a login without password.
pub fn managed_password(p: &LinuxUser) -> Option<&str> {
    p.password.as_deref().filter(|pw| !pw.is_empty())
}

pub async fn apply(p: &LinuxUser, mut cancel: Cancel) -> Outcome {
    let mut changes = Vec::new();
    let plaintext = managed_password(p).is_some_and(|pw| !is_crypt_hash(pw));
    let result = run(p, &mut changes, &mut cancel).await;
    let notes = if plaintext { vec![PLAINTEXT_WARNING.to_string()] } else { Vec::new() };
    let cancelled = matches!(&result, Err(UserError::Tool(e)) if e.is_cancelled());
    let mut outcome = super::finish(&p.username, result, changes, &notes);
    outcome.cancelled = cancelled;
    outcome
}

async fn run(p: &LinuxUser, changes: &mut Vec<Change>, cancel: &mut Cancel) -> Result<(), UserError> {
    let name = p.username.as_str();
    let mut w = wanted(p, nologin());
    match account(name)? {
        None => {
            // A group already named like the user (the common `app`/`app` pattern, often
            // made by a linux.group state just before) becomes its primary group:
            // useradd would otherwise refuse with "group app exists".
            if w.gid.is_none() {
                if let Some(g) = Group::from_name(name).map_err(|e| UserError::Lookup(format!("group {name}"), e))? {
                    w.gid = Some(u64::from(g.gid.as_raw()));
                }
            }
            if crate::plan::active() {
                // useradd chooses the uid when the recipe does not.
                let uid = w.uid.map_or_else(|| "?".to_string(), |u| u.to_string());
                changes.push(Change::new(name, format!("user created (uid {uid})")));
                if managed_password(p).is_some() {
                    changes.push(Change::new(name, "password set"));
                }
                return Ok(());
            }
            exec::checked(&CommandSpec::tool("useradd", useradd_args(name, &w)), &[0], cancel).await?;
            let uid = account(name)?.map_or_else(|| "?".to_string(), |a| a.uid.to_string());
            changes.push(Change::new(name, format!("user created (uid {uid})")));
        }
        Some(have) => {
            let (args, made) = usermod_args(name, &have, &w);
            if !args.is_empty() {
                if !crate::plan::active() {
                    exec::checked(&CommandSpec::tool("usermod", args), &[0], cancel).await?;
                }
                changes.extend(made);
            }
        }
    }
    // The home directory a recipe names exists (useradd -m made a new one already).
    if let (Some(home), Some(acc)) = (&p.home, account(name)?) {
        fsutil::create_dirs(home.abs(), 0o700, (Uid::from_raw(acc.uid), Gid::from_raw(acc.gid)), changes)?;
    }
    let Some(password) = managed_password(p) else {
        return Ok(());
    };
    let shadow = std::fs::read_to_string("/etc/shadow").map_err(UserError::Shadow)?;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let method = host_method(&read("/etc/login.defs"), &read("/etc/pam.d/common-password"));
    if let PasswordPlan::Set(hash) = password_plan(password, shadow_hash(&shadow, name), method)? {
        if !crate::plan::active() {
            let spec = CommandSpec::tool("chpasswd", ["-e"]).with_stdin(format!("{name}:{hash}\n"));
            exec::checked(&spec, &[0], cancel).await?;
        }
        changes.push(Change::new(name, "password set"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_told_from_plaintext() {
        for h in
            ["$1$abcd$ofJb3YcbYuAu5VuIH736J1", "$6$salt$abc", "$y$j9T$F5Jx$Em", "$2b$10$abc", "!", "*", "!$6$s$h", ""]
        {
            assert!(is_crypt_hash(h), "{h}");
        }
        for p in ["hunter2", "correct horse", "$notahash", "$6$has space$x"] {
            assert!(!is_crypt_hash(p), "{p}");
        }
    }

    /// Known answers from libxcrypt (openssl passwd / Python's crypt on Debian 12).
    #[test]
    fn verifies_md5_sha_and_yescrypt_hashes() {
        assert_eq!(md5_crypt(b"password", b"saltsalt"), "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/");
        assert_eq!(verify("s3cret", "$1$abcd$ofJb3YcbYuAu5VuIH736J1"), Some(true));
        assert_eq!(verify("wrong", "$1$abcd$ofJb3YcbYuAu5VuIH736J1"), Some(false));
        let sha512 = "$6$abcdefgh12345678$UxLjJ54SbbL/yAsTgF/dU9DG3xx59.Zczy6oW3pRUhdg4zzhB61pLALHlrBsgGegc/EYUY17Ej0vAHAGT9LiH0";
        assert_eq!(verify("pässword 1", sha512), Some(true));
        assert_eq!(verify("password 1", sha512), Some(false));
        let sha256 = "$5$rounds=10000$saltysalt$wUrNm5V21FzJKzKJpxVdwZjERaPmY4xKi8jtvurdRa2";
        assert_eq!(verify("correct horse", sha256), Some(true));
        let yes = "$y$j9T$F5Jx5fExrKuPp53xLKQ..0$EmG0hUVUAjciZ717TvJCuCV7T8wtrFFQ.ldWCNQkk./";
        assert_eq!(verify("correct horse", yes), Some(true));
        assert_eq!(verify("correct horse!", yes), Some(false));
        assert_eq!(verify("x", "$2b$10$abcdefghijklmnopqrstuu"), None);
    }

    #[test]
    fn new_hashes_verify_and_differ_by_salt() {
        let a = hash_new("pw", HashMethod::Sha512).unwrap();
        let b = hash_new("pw", HashMethod::Sha512).unwrap();
        assert!(a.starts_with("$6$") && a != b, "{a} {b}");
        assert_eq!(verify("pw", &a), Some(true));
        let y = hash_new("pw", HashMethod::Yescrypt).unwrap();
        assert!(y.starts_with("$y$j9T$"), "{y}");
        assert_eq!(verify("pw", &y), Some(true));
        assert_eq!(method_from_login_defs("# x\nENCRYPT_METHOD YESCRYPT\n"), HashMethod::Yescrypt);
        assert_eq!(method_from_login_defs("ENCRYPT_METHOD SHA512\n"), HashMethod::Sha512);
        assert_eq!(method_from_login_defs(""), HashMethod::Sha512);
        let debian = "password\t[success=1 default=ignore]\tpam_unix.so obscure yescrypt\n";
        assert_eq!(host_method("ENCRYPT_METHOD SHA512\n", debian), HashMethod::Yescrypt);
        assert_eq!(host_method("ENCRYPT_METHOD SHA512\n", "# pam_unix.so yescrypt\n"), HashMethod::Sha512);
    }

    #[test]
    fn password_plans_are_idempotent() {
        let m = HashMethod::Sha512;
        let hash = "$1$abcd$ofJb3YcbYuAu5VuIH736J1";
        // A hash: set as-is when different, kept when equal.
        assert_eq!(password_plan(hash, Some("!"), m).unwrap(), PasswordPlan::Set(hash.into()));
        assert_eq!(password_plan(hash, Some(hash), m).unwrap(), PasswordPlan::Keep);
        // Plaintext: kept when the current hash verifies, whatever its scheme.
        assert_eq!(password_plan("s3cret", Some(hash), m).unwrap(), PasswordPlan::Keep);
        let PasswordPlan::Set(new) = password_plan("other", Some(hash), m).unwrap() else { panic!() };
        assert_eq!(verify("other", &new), Some(true));
        // The second run sees the hash the first one stored.
        assert_eq!(password_plan("other", Some(&new), m).unwrap(), PasswordPlan::Keep);
        assert!(matches!(password_plan("pw", None, m).unwrap(), PasswordPlan::Set(_)));
        assert_eq!(shadow_hash("root:*:1::\nbob:$6$x$y:19000:0:99999:7:::\n", "bob"), Some("$6$x$y"));
        assert_eq!(shadow_hash("root:*:1::\n", "bob"), None);
    }

    /// The original's recipes (and its puppet requirement, `password: ""`) omit the
    /// password: nothing is set, and a blank one is never an empty hash.
    #[test]
    fn password_is_optional_and_blank_is_not_managed() {
        let user = |raw: serde_json::Value| -> LinuxUser { crate::states::testutil::typed("linux.user", raw) };
        assert_eq!(managed_password(&user(serde_json::json!({"username": "app"}))), None);
        assert_eq!(managed_password(&user(serde_json::json!({"username": "app", "password": ""}))), None);
        assert_eq!(managed_password(&user(serde_json::json!({"username": "app", "password": "pw"}))), Some("pw"));
        // A gid found for the app/app pattern goes to useradd as -g.
        let w = Wanted { gid: Some(1234), ..Wanted::default() };
        assert_eq!(useradd_args("app", &w).join(" "), "-g 1234 -d /home/app -m app");
    }

    #[test]
    fn command_lines_for_new_and_existing_accounts() {
        let p: LinuxUser = match crate::states::testutil::params(
            "linux.user",
            serde_json::json!({"username": "app", "password": "x", "uid": 1500, "groups": ["adm", "www-data"],
                               "fullname": "App User", "no-login": true, "system-account": true}),
        ) {
            opsagent_proto::catalogue::ModuleParams::LinuxUser(u) => u,
            other => panic!("{other:?}"),
        };
        let w = wanted(&p, "/usr/sbin/nologin");
        assert_eq!(
            useradd_args("app", &w).join(" "),
            "-r -u 1500 -G adm,www-data -c App User -s /usr/sbin/nologin -d /home/app -m app"
        );
        let have = Account {
            uid: 1500,
            gid: 1500,
            gecos: "App User,,,".into(),
            home: "/home/app".into(),
            shell: "/usr/sbin/nologin".into(),
            groups: ["adm", "www-data"].iter().map(|s| s.to_string()).collect(),
        };
        let (args, changes) = usermod_args("app", &have, &w);
        assert!(args.is_empty() && changes.is_empty(), "{args:?}");

        let w2 = Wanted { groups: Some(BTreeSet::new()), fullname: Some("Other".into()), uid: Some(1501), ..w };
        let (args, changes) = usermod_args("app", &have, &w2);
        assert_eq!(args.join(" "), "-u 1501 -G  -c Other,,, app");
        let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["app: uid 1500 -> 1501", "app: groups [adm, www-data] -> []", "app: full name \"App User\" -> \"Other\""]
        );
        assert!(valid_account_name("www-data") && valid_account_name("host$"));
        assert!(!valid_account_name("-o") && !valid_account_name("a b") && !valid_account_name(""));
    }
}
