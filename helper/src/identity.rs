//! Users and groups, by name, as the host's NSS knows them.
//!
//! Recipes and the operator name users; the kernel checks numbers. Every name is
//! resolved at the moment it is used, so an unknown name fails the one state (or the
//! start-up) that names it, never silently maps to root.
//!
//! The owner a file-like state names is resolved on every request that names it (the
//! default, root:root, is uid 0 and gid 0 without a look-up), and glibc's
//! `getpwnam`/`getgrnam` cost a dozen system calls each time (the NSS configuration
//! checked, `/etc/passwd` and `/etc/group` opened and read, `nscd` tried). [`Accounts`] answers those look-ups from the two files, parsed once per
//! version of them, wherever that is exactly glibc's answer (see [`Accounts`]); anywhere
//! else it asks glibc, every time.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use nix::unistd::{Gid, Group, Uid, User};

use crate::stamp::Stamp;

/// The user the packaging creates for the daemon; allowed to connect by default.
pub const DEFAULT_AGENT_USER: &str = "opsagent";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("cannot look up {kind} {name:?}: {source}")]
    Lookup { kind: &'static str, name: String, source: nix::Error },
}

pub fn user(name: &str) -> Result<User, IdentityError> {
    lookup_user(name)?.ok_or_else(|| IdentityError::UnknownUser(name.to_string()))
}

pub fn group(name: &str) -> Result<Group, IdentityError> {
    lookup_group(name)?.ok_or_else(|| IdentityError::UnknownGroup(name.to_string()))
}

/// glibc's `getpwnam`.
fn lookup_user(name: &str) -> Result<Option<User>, IdentityError> {
    User::from_name(name).map_err(|source| IdentityError::Lookup { kind: "user", name: name.to_string(), source })
}

/// glibc's `getgrnam`.
fn lookup_group(name: &str) -> Result<Option<Group>, IdentityError> {
    Group::from_name(name).map_err(|source| IdentityError::Lookup { kind: "group", name: name.to_string(), source })
}

/// What one version of a file said, and when it was read.
#[derive(Debug)]
struct Parsed<T> {
    stamp: Stamp,
    /// The wall clock just before the file was opened.
    read_at: SystemTime,
    what: T,
}

/// Files whose change time is this close to (or after) the moment they were read are
/// read again at the next look-up: a write in the same tick of the file system's clock
/// as the read would leave every part of the stamp as it was (see [`Accounts`]).
const RACY: Duration = Duration::from_secs(2);

/// The user and group databases as glibc's `files` source reads them, kept between
/// requests.
///
/// **When the files are the answer.** glibc asks the sources `/etc/nsswitch.conf` lists
/// for `passwd` (`group`) in order and returns the first one's hit. When `files` comes
/// first, with no action (`[...]`) after it, a name that `/etc/passwd` lists is answered
/// by its first line for that name, whatever comes after `files` (`systemd`'s dynamic
/// users, `sss`, LDAP are never asked for it). So a name found in the file, under such a
/// configuration, is answered from the parsed file; everything else goes to glibc, uncached:
/// a name the file does not list (a dynamic user, a directory user), any other first
/// source (`compat`, `sss`, `ldap`, ...), a configuration without a line for the
/// database or with it twice, a missing or unreadable file, and a file with a line this
/// parser does not take exactly (a `+`/`-` compat entry, a wrong number of fields, a
/// non-numeric id: then the whole file is left to glibc).
///
/// **When the cache is stale.** Each look-up `stat`s `/etc/nsswitch.conf` and the file it
/// answers from (following links, as glibc opens them) and uses what was parsed only if
/// device, inode, size, modification and change time are all those of the version read
/// (taken by `fstat` of the descriptor read from, so a rename in between cannot pair old
/// content with a new stamp). `useradd`, `vipw` and `sed -i` replace the file (a new
/// inode); a write in place moves the change time, which no program can set back (unlike
/// the modification time). The one write that leaves the stamp unchanged is one in the
/// same tick of the kernel's clock as an earlier one, with the same size: so a version
/// whose change time is within `RACY` (2 s) of the moment it was read (or later) is never
/// reused, only read again, until it has been left alone for that long. (A wall clock
/// stepped back by more than that could let a later write carry an old change time; it
/// would still have to hit the cached version's change time to the nanosecond.)
#[derive(Debug)]
pub struct Accounts {
    nsswitch: PathBuf,
    passwd: PathBuf,
    group: PathBuf,
    /// glibc's answer, for what the files cannot answer.
    fallback_user: fn(&str) -> Result<Option<u32>, IdentityError>,
    fallback_group: fn(&str) -> Result<Option<u32>, IdentityError>,
    /// [`RACY`] (shorter in tests).
    racy: Duration,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    nss: Option<Parsed<NssRules>>,
    passwd: Option<Parsed<Option<HashMap<String, u32>>>>,
    group: Option<Parsed<Option<HashMap<String, u32>>>>,
    /// Files read (a test's window into the cache).
    reads: usize,
}

/// Whether `files` answers first for each database.
#[derive(Debug, Clone, Copy, Default)]
struct NssRules {
    passwd: bool,
    group: bool,
}

/// Whether `conf` (the text of `nsswitch.conf`) has `db` answered by `files` first, with
/// glibc's default action on a hit (return it). Anything else, or anything unclear (no
/// line, two lines), is `false`.
fn files_first(conf: &str, db: &str) -> bool {
    let mut found = None;
    for line in conf.split('\n') {
        let line = line.split('#').next().unwrap_or("");
        let Some((name, sources)) = line.split_once(':') else { continue };
        if !name.trim().eq_ignore_ascii_case(db) {
            continue;
        }
        if found.replace(sources).is_some() {
            return false;
        }
    }
    let Some(sources) = found else { return false };
    let mut sources = sources.split_whitespace();
    sources.next() == Some("files") && !sources.next().is_some_and(|next| next.starts_with('['))
}

/// Name -> id of an `/etc/passwd` (`fields` 7) or `/etc/group` (4) text, the first line
/// for a name winning as in glibc; `None` when a line is not exactly of that form (then
/// glibc answers for this file).
fn parse_ids(text: &str, fields: usize) -> Option<HashMap<String, u32>> {
    let mut ids = HashMap::new();
    for line in text.split('\n') {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split(':');
        let (name, id) = (parts.next()?, parts.nth(1)?);
        if 3 + parts.count() != fields {
            return None;
        }
        let plain = |b: u8| !b.is_ascii_whitespace() && !b.is_ascii_control();
        if name.is_empty() || name.starts_with(['+', '-']) || !name.bytes().all(plain) {
            return None;
        }
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ids.entry(name.to_string()).or_insert(id.parse::<u32>().ok()?);
    }
    Some(ids)
}

/// `stat` of `path` (following links); `None` when it cannot be had.
fn stamp_of(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
}

/// Reads `path` whole with the stamp of the descriptor read from.
// A read-only open of a file root owns in a directory root owns (/etc), by the path glibc
// itself opens.
fn read_stamped(path: &Path) -> Option<(Stamp, SystemTime, String)> {
    let read_at = SystemTime::now();
    let mut f = std::fs::File::open(path).ok()?;
    let stamp = Stamp::of(&f.metadata().ok()?);
    let mut text = String::with_capacity(usize::try_from(stamp.len).unwrap_or(0));
    f.read_to_string(&mut text).ok()?;
    Some((stamp, read_at, text))
}

impl<T> Parsed<T> {
    /// Whether this parse is the file's current version and safe to reuse.
    fn current(&self, now: Option<Stamp>, racy: Duration) -> bool {
        now == Some(self.stamp) && self.stamp.ctime() + racy <= self.read_at
    }
}

impl Accounts {
    /// The host's files, with glibc (`getpwnam`, `getgrnam`) for the rest.
    pub fn host() -> &'static Accounts {
        static HOST: OnceLock<Accounts> = OnceLock::new();
        HOST.get_or_init(|| {
            Accounts::new(
                "/etc/nsswitch.conf".into(),
                "/etc/passwd".into(),
                "/etc/group".into(),
                |n| Ok(lookup_user(n)?.map(|u| u.uid.as_raw())),
                |n| Ok(lookup_group(n)?.map(|g| g.gid.as_raw())),
            )
        })
    }

    fn new(
        nsswitch: PathBuf,
        passwd: PathBuf,
        group: PathBuf,
        fallback_user: fn(&str) -> Result<Option<u32>, IdentityError>,
        fallback_group: fn(&str) -> Result<Option<u32>, IdentityError>,
    ) -> Self {
        Accounts {
            nsswitch,
            passwd,
            group,
            fallback_user,
            fallback_group,
            racy: RACY,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The uid of `user` and the gid of `group` (each when asked for; `None` when the
    /// name is unknown).
    fn ids(&self, user: Option<&str>, group: Option<&str>) -> Result<(Option<u32>, Option<u32>), IdentityError> {
        if user.is_none() && group.is_none() {
            // No name to look up: nothing to check the files' stamps for (each stamp is
            // checked by the look-up that relies on it, below).
            return Ok((None, None));
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let racy = self.racy;
        let rules = cache.rules(&self.nsswitch, racy);
        let uid = match user {
            None => None,
            Some(name) => match rules.passwd.then(|| cache.passwd_id(&self.passwd, name, racy)).flatten() {
                Some(id) => Some(id),
                None => (self.fallback_user)(name)?,
            },
        };
        let gid = match group {
            None => None,
            Some(name) => match rules.group.then(|| cache.group_id(&self.group, name, racy)).flatten() {
                Some(id) => Some(id),
                None => (self.fallback_group)(name)?,
            },
        };
        Ok((uid, gid))
    }
}

impl Cache {
    /// The NSS rules in force (none answered by the files when the configuration cannot
    /// be read).
    fn rules(&mut self, path: &Path, racy: Duration) -> NssRules {
        let now = stamp_of(path);
        if let Some(p) = self.nss.as_ref().filter(|p| p.current(now, racy)) {
            return p.what;
        }
        self.reads += 1;
        self.nss = read_stamped(path).map(|(stamp, read_at, text)| Parsed {
            stamp,
            read_at,
            what: NssRules { passwd: files_first(&text, "passwd"), group: files_first(&text, "group") },
        });
        self.nss.as_ref().map(|p| p.what).unwrap_or_default()
    }

    fn passwd_id(&mut self, path: &Path, name: &str, racy: Duration) -> Option<u32> {
        Self::id_in(&mut self.passwd, &mut self.reads, (path, 7, racy), name)
    }

    fn group_id(&mut self, path: &Path, name: &str, racy: Duration) -> Option<u32> {
        Self::id_in(&mut self.group, &mut self.reads, (path, 4, racy), name)
    }

    /// `name`'s id in the file's current version, when the file lists it.
    fn id_in(
        slot: &mut Option<Parsed<Option<HashMap<String, u32>>>>,
        reads: &mut usize,
        (path, fields, racy): (&Path, usize, Duration),
        name: &str,
    ) -> Option<u32> {
        let now = stamp_of(path);
        if !slot.as_ref().is_some_and(|p| p.current(now, racy)) {
            *reads += 1;
            *slot = read_stamped(path).map(|(stamp, read_at, text)| Parsed {
                stamp,
                read_at,
                what: parse_ids(&text, fields),
            });
        }
        slot.as_ref()?.what.as_ref()?.get(name).copied()
    }
}

/// The owner a state asks for. `None` leaves that half as it is on an existing object;
/// a new object gets root for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<Uid>,
    pub gid: Option<Gid>,
}

impl Owner {
    /// Through [`Accounts::host`]: from the parsed `/etc/passwd` and `/etc/group` where
    /// that is glibc's answer, else from glibc.
    pub fn resolve(user_name: Option<&str>, group_name: Option<&str>) -> Result<Self, IdentityError> {
        Self::resolve_in(Accounts::host(), user_name, group_name)
    }

    fn resolve_in(db: &Accounts, user_name: Option<&str>, group_name: Option<&str>) -> Result<Self, IdentityError> {
        let (uid, gid) = db.ids(user_name, group_name)?;
        let uid = match (user_name, uid) {
            (Some(name), None) => return Err(IdentityError::UnknownUser(name.to_string())),
            (_, id) => id.map(Uid::from_raw),
        };
        let gid = match (group_name, gid) {
            (Some(name), None) => return Err(IdentityError::UnknownGroup(name.to_string())),
            (_, id) => id.map(Gid::from_raw),
        };
        Ok(Self { uid, gid })
    }

    /// Owner of something this helper creates.
    pub fn for_new(&self) -> (Uid, Gid) {
        (self.uid.unwrap_or(Uid::from_raw(0)), self.gid.unwrap_or(Gid::from_raw(0)))
    }

    /// What the owner of an object now owned by `uid:gid` should become.
    pub fn applied_to(&self, uid: u32, gid: u32) -> (u32, u32) {
        (self.uid.map_or(uid, Uid::as_raw), self.gid.map_or(gid, Gid::as_raw))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Who may connect. Root always may (the operator, debugging); everyone else only when
/// named here, so a compromised unrelated service account gets nothing.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    users: Vec<AllowedUser>,
}

impl Allowlist {
    /// `names` empty means the default: the agent user if the host has one. Named
    /// users must all exist: a typo should stop the start, not lock the agent out.
    pub fn resolve(names: &[String]) -> Result<Self, IdentityError> {
        if names.is_empty() {
            return match user(DEFAULT_AGENT_USER) {
                Ok(u) => Ok(Self::from_users([u])),
                Err(IdentityError::UnknownUser(_)) => {
                    tracing::warn!(user = DEFAULT_AGENT_USER, "the agent user does not exist; only root may connect");
                    Ok(Self::default())
                }
                Err(e) => Err(e),
            };
        }
        let users = names.iter().map(|n| user(n)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_users(users))
    }

    pub fn from_users(users: impl IntoIterator<Item = User>) -> Self {
        Self { users: users.into_iter().map(|u| AllowedUser { name: u.name, uid: u.uid, gid: u.gid }).collect() }
    }

    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || self.users.iter().any(|u| u.uid.as_raw() == uid)
    }

    /// The group that owns the socket file: the first allowed user's primary group,
    /// so that the socket mode 0660 lets exactly that user in besides root.
    pub fn socket_group(&self) -> Gid {
        self.users.first().map_or(Gid::from_raw(0), |u| u.gid)
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("root (0)")?;
        for u in &self.users {
            write!(f, ", {} ({})", u.name, u.uid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_names_are_named() {
        assert_eq!(user("root").unwrap().uid.as_raw(), 0);
        let err = user("no-such-user-xyz").unwrap_err();
        assert_eq!(err.to_string(), "unknown user \"no-such-user-xyz\"");
        let err = Owner::resolve(None, Some("no-such-group-xyz")).unwrap_err();
        assert_eq!(err.to_string(), "unknown group \"no-such-group-xyz\"");
        let o = Owner::resolve(Some("nobody"), None).unwrap();
        assert_eq!(o.applied_to(0, 5), (65534, 5));
        assert_eq!(Owner::default().for_new(), (Uid::from_raw(0), Gid::from_raw(0)));
    }

    #[test]
    fn nsswitch_lets_the_files_answer_only_when_files_come_first_with_the_default_action() {
        let conf = "# comment\npasswd:         files systemd\ngroup: files # trailing\nshadow: files\n";
        assert!(files_first(conf, "passwd") && files_first(conf, "group"));
        assert!(files_first("passwd: files\n", "passwd"));
        for other in [
            "passwd: compat\n",
            "passwd: sss files\n",
            "passwd: files [SUCCESS=continue] ldap\n",
            "passwd: files[NOTFOUND=return]\n",
            "passwd:\n",
            "group: files\n",
            "passwd: files\nPASSWD: ldap\n",
            "#passwd: files\n",
        ] {
            assert!(!files_first(other, "passwd"), "{other:?}");
        }
    }

    #[test]
    fn the_files_are_parsed_as_glibc_reads_them_or_not_at_all() {
        let ids = parse_ids("root:x:0:0:root:/root:/bin/bash\n#c\n\nbob:x:7:7::/:/bin/sh\nbob:x:8:8::/:/bin/sh\n", 7)
            .unwrap();
        assert_eq!((ids.get("root"), ids.get("bob")), (Some(&0), Some(&7)), "the first line for a name wins");
        assert_eq!(parse_ids("staff:x:50:alice,bob\n", 4).unwrap().get("staff"), Some(&50));
        for bad in [
            "+::::::\n",
            "-bob:x:1:1::/:/bin/sh\n",
            "bob:x:1:1::/\n",
            "bob:x:1:1::/:/bin/sh:extra\n",
            "bob:x::1::/:/bin/sh\n",
            "bob:x:-1:1::/:/bin/sh\n",
            "bob:x:99999999999:1::/:/bin/sh\n",
            " bob:x:1:1::/:/bin/sh\n",
        ] {
            assert!(parse_ids(bad, 7).is_none(), "{bad:?}");
        }
    }

    /// A database in `dir` whose glibc knows only `dyn` (61000), as `systemd` would a
    /// dynamic user.
    fn accounts(dir: &std::path::Path, racy: Duration) -> Accounts {
        let fake = |n: &str| Ok((n == "dyn").then_some(61000));
        let mut a = Accounts::new(dir.join("nsswitch.conf"), dir.join("passwd"), dir.join("group"), fake, fake);
        a.racy = racy;
        a
    }

    fn replace(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn reads(a: &Accounts) -> usize {
        a.cache.lock().unwrap().reads
    }

    #[test]
    fn owners_come_from_the_files_until_they_change_and_from_nss_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("nsswitch.conf"), "passwd: files systemd\ngroup: files systemd\n").unwrap();
        std::fs::write(d.join("passwd"), "alice:x:1234:1234::/home/alice:/bin/sh\n").unwrap();
        std::fs::write(d.join("group"), "staff:x:50:alice\n").unwrap();
        let a = accounts(d, Duration::ZERO);
        // No name given: nothing is read or checked (a file state's default owner, root,
        // is taken as uid 0 and gid 0 without a look-up).
        assert_eq!(Owner::resolve_in(&a, None, None).unwrap(), Owner::default());
        assert_eq!(reads(&a), 0);
        let owner = |u: &str, g: &str| Owner::resolve_in(&a, Some(u), Some(g)).map(|o| o.applied_to(1, 1));
        assert_eq!(owner("alice", "staff").unwrap(), (1234, 50));
        assert_eq!(reads(&a), 3);
        assert_eq!(owner("alice", "staff").unwrap(), (1234, 50));
        assert_eq!(reads(&a), 3, "nothing read again while the files stay as they were");
        // Not in the files: NSS answers (a dynamic user), or nobody does.
        assert_eq!(owner("dyn", "dyn").unwrap(), (61000, 61000));
        assert_eq!(owner("carol", "staff").unwrap_err().to_string(), "unknown user \"carol\"");

        // Replaced (useradd, vipw): read again.
        replace(&d.join("passwd"), "alice:x:4321:4321::/home/alice:/bin/sh\n");
        assert_eq!(owner("alice", "staff").unwrap(), (4321, 50));
        assert_eq!(reads(&a), 4);
        // Rewritten in place, same size, a clock tick later: read again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(d.join("group"), "staff:x:51:alice\n").unwrap();
        assert_eq!(owner("alice", "staff").unwrap(), (4321, 51));
        assert_eq!(reads(&a), 5);

        // Another source first: the files are not asked, NSS (here: no alice) answers.
        replace(&d.join("nsswitch.conf"), "passwd: sss files\ngroup: files\n");
        assert_eq!(owner("alice", "staff").unwrap_err().to_string(), "unknown user \"alice\"");
        assert_eq!(owner("dyn", "staff").unwrap(), (61000, 51));
        // A line the parser does not take exactly: the whole file goes to NSS.
        replace(&d.join("nsswitch.conf"), "passwd: files\ngroup: files\n");
        replace(&d.join("group"), "staff:x:50:alice\n+:::\n");
        assert_eq!(owner("alice", "staff").unwrap_err().to_string(), "unknown group \"staff\"");
    }

    #[test]
    fn a_file_changed_within_the_racy_window_is_read_again_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("nsswitch.conf"), "passwd: files\ngroup: files\n").unwrap();
        std::fs::write(d.join("passwd"), "alice:x:1234:1234::/home/alice:/bin/sh\n").unwrap();
        let a = accounts(d, RACY);
        for round in 1..=3 {
            assert_eq!(Owner::resolve_in(&a, Some("alice"), None).unwrap().applied_to(1, 1), (1234, 1));
            // The configuration and the file, both changed just now.
            assert_eq!(reads(&a), 2 * round);
        }
    }

    #[test]
    fn allowlist_always_admits_root_and_only_named_users() {
        let a = Allowlist::resolve(&["nobody".to_string()]).unwrap();
        assert!(a.allows(0));
        assert!(a.allows(65534));
        assert!(!a.allows(1));
        assert_eq!(a.socket_group().as_raw(), 65534);
        assert!(Allowlist::resolve(&["no-such-user-xyz".to_string()]).is_err());
        assert_eq!(Allowlist::default().socket_group().as_raw(), 0);
    }
}
