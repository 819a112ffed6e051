//! What dpkg has installed, read from its database file (`/var/lib/dpkg/status`) instead
//! of one `dpkg-query` process per package state.
//!
//! A converged round asks the same question for every package state; the answer only
//! changes when dpkg rewrites its database, which it does by writing a new file and
//! renaming it over the old one. The parsed database is therefore kept in memory with the
//! identity of the file it came from (device, inode, size, modification time) and read
//! again only when that identity changes: one read per round at most, none at all for a
//! running helper whose host installed nothing since.
//!
//! Where the file alone could give an answer other than `dpkg-query -W`'s, the caller is
//! told to ask `dpkg-query` instead ([`StatusDb::lookup`] returns `None`): when dpkg's
//! journal (`/var/lib/dpkg/updates`) holds entries not yet merged into the file, and
//! for a name given with an architecture (`name:arch`) or installed for several
//! architectures.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::apt::Pkg;
use crate::stamp::Stamp;

pub const STATUS: &str = "/var/lib/dpkg/status";
pub const UPDATES: &str = "/var/lib/dpkg/updates";

/// One parsed version of the database: every stanza's package, per name (one entry per
/// architecture it is known for).
#[derive(Debug)]
pub struct Snapshot {
    stamp: Stamp,
    pkgs: BTreeMap<String, Vec<Pkg>>,
}

/// The stanzas of a dpkg status file: `Package`, the third word of `Status`
/// (`db:Status-Status`) and `Version` (empty when absent, as `dpkg-query` prints it).
/// Continuation lines (descriptions, conffiles) start with a space and are skipped.
///
/// Bytes, not text: most of the file is descriptions, and a converged round pays for
/// every byte looked at (a 1 MB database took ~2 ms to read as UTF-8 and split into
/// lines, a tenth of a converged round). Once a stanza has given its three fields the
/// rest of it is skipped, from line start to line start up to the blank line that ends
/// it (dpkg writes each field once); only the values kept are decoded.
pub fn parse_status(text: &[u8]) -> BTreeMap<String, Vec<Pkg>> {
    let mut all: BTreeMap<String, Vec<Pkg>> = BTreeMap::new();
    let mut at = 0;
    while at < text.len() {
        let (mut name, mut status, mut version) = (None, None, None);
        // The stanza's lines, up to the blank one or until the three fields are known.
        while at < text.len() {
            let end = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |n| at + n);
            let line = &text[at..end];
            at = end + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix(b"Package:") {
                name = Some(v);
            } else if let Some(v) = line.strip_prefix(b"Status:") {
                status = Some(v);
            } else if let Some(v) = line.strip_prefix(b"Version:") {
                version = Some(v);
            }
            if name.is_some() && status.is_some() && version.is_some() {
                // The blank line is "\n" or "\r\n" at a line start (the next line's, or
                // one after a later newline), whatever the lines before it end with; the
                // stanza runs to the end of the file if there is none.
                let rest = text.get(at..).unwrap_or_default();
                let mut starts = std::iter::once(0).chain(memchr::memchr_iter(b'\n', rest).map(|n| n + 1));
                let blank = starts.find(|&s| rest[s..].starts_with(b"\n") || rest[s..].starts_with(b"\r\n"));
                at = blank.map_or(text.len(), |s| at + s);
                break;
            }
        }
        if let Some(n) = name {
            let text = |v: &[u8]| String::from_utf8_lossy(v).trim().to_string();
            let status = status.and_then(|v| text(v).split_whitespace().nth(2).map(str::to_string));
            let pkg = Pkg {
                status: status.unwrap_or_else(|| "not-installed".to_string()),
                version: version.map(text).unwrap_or_default(),
            };
            all.entry(text(n)).or_default().push(pkg);
        }
    }
    all
}

/// The database file, parsed at most once per version of it.
#[derive(Debug)]
pub struct StatusDb {
    status: PathBuf,
    updates: PathBuf,
    cached: Mutex<Option<Arc<Snapshot>>>,
}

impl StatusDb {
    pub fn new(status: PathBuf, updates: PathBuf) -> StatusDb {
        StatusDb { status, updates, cached: Mutex::new(None) }
    }

    /// The current database: the cached parse when the file is the one it came from,
    /// else a fresh read (identity taken from the open file, so a rename in between
    /// cannot pair old content with a new identity).
    pub fn snapshot(&self) -> io::Result<Arc<Snapshot>> {
        let mut file = File::open(&self.status)?;
        let stamp = Stamp::of(&file.metadata()?);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cached.as_ref().filter(|s| s.stamp == stamp) {
            return Ok(Arc::clone(s));
        }
        let mut text = Vec::with_capacity(usize::try_from(stamp.len).unwrap_or(0).saturating_add(1));
        file.read_to_end(&mut text)?;
        let fresh = Arc::new(Snapshot { stamp, pkgs: parse_status(&text) });
        *cached = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    /// dpkg's journal holds entries the status file does not show yet (a dpkg run was
    /// interrupted, or is under way): only dpkg-query merges them correctly.
    fn journal_pending(&self) -> bool {
        match std::fs::read_dir(&self.updates) {
            Ok(entries) => {
                entries.flatten().any(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            }
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }

    /// What `dpkg-query -W` would say of `names` (names it does not know are left out),
    /// or `None` when only dpkg-query can say it (see the module's documentation).
    pub fn lookup(&self, names: &[String]) -> io::Result<Option<BTreeMap<String, Pkg>>> {
        if names.iter().any(|n| n.contains(':')) || self.journal_pending() {
            return Ok(None);
        }
        let db = self.snapshot()?;
        let mut found = BTreeMap::new();
        for n in names {
            match db.pkgs.get(n).map(Vec::as_slice) {
                None | Some([]) => {}
                Some([one]) => drop(found.insert(n.clone(), one.clone())),
                Some(_) => return Ok(None),
            }
        }
        Ok(Some(found))
    }
}

/// The host's database, shared by every package state the helper runs.
pub fn host() -> &'static StatusDb {
    static HOST: std::sync::OnceLock<StatusDb> = std::sync::OnceLock::new();
    HOST.get_or_init(|| StatusDb::new(PathBuf::from(STATUS), PathBuf::from(UPDATES)))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::path::Path;

    const STATUS_TEXT: &str = "\
Package: hello
Status: install ok installed
Priority: optional
Version: 2.10-3
Description: example package
 with a continuation line
 Version: not a field here

Package: gone
Status: deinstall ok config-files
Version: 1.0

Package: libx
Status: install ok installed
Architecture: amd64
Version: 3

Package: libx
Status: install ok installed
Architecture: i386
Version: 3

Package: purged
Status: purge ok not-installed
";

    fn db(dir: &Path) -> StatusDb {
        StatusDb::new(dir.join("status"), dir.join("updates"))
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// Replaces the file as dpkg does: a new file renamed over the old one.
    fn replace(dir: &Path, text: &str) {
        std::fs::write(dir.join("status-new"), text).unwrap();
        std::fs::rename(dir.join("status-new"), dir.join("status")).unwrap();
    }

    #[test]
    fn stanzas_give_status_and_version_as_dpkg_query_prints_them() {
        let all = parse_status(STATUS_TEXT.as_bytes());
        let one = |n: &str| all[n].clone();
        // The description's indented "Version:" is a continuation line, not the field.
        assert_eq!(one("hello"), [Pkg { status: "installed".into(), version: "2.10-3".into() }]);
        assert_eq!(one("gone"), [Pkg { status: "config-files".into(), version: "1.0".into() }]);
        assert_eq!(one("purged"), [Pkg { status: "not-installed".into(), version: String::new() }]);
        assert_eq!(all["libx"].len(), 2);
    }

    /// The line-by-line reading the skip replaced: every line looked at, the last value
    /// of a field kept.
    fn parse_by_lines(text: &str) -> BTreeMap<String, Vec<Pkg>> {
        let mut all: BTreeMap<String, Vec<Pkg>> = BTreeMap::new();
        for stanza in text.split("\n\n") {
            let (mut name, mut status, mut version) = (None, None, None);
            for line in stanza.lines() {
                if let Some(v) = line.strip_prefix("Package:") {
                    name = Some(v.trim());
                } else if let Some(v) = line.strip_prefix("Status:") {
                    status = v.split_whitespace().nth(2);
                } else if let Some(v) = line.strip_prefix("Version:") {
                    version = Some(v.trim());
                }
            }
            if let Some(n) = name {
                let pkg =
                    Pkg { status: status.unwrap_or("not-installed").into(), version: version.unwrap_or("").into() };
                all.entry(n.to_string()).or_default().push(pkg);
            }
        }
        all
    }

    /// A database laid out every way dpkg lays one out (fields in any order, some
    /// missing, long descriptions whose lines mention the fields, several
    /// architectures, no newline at the end) reads the same as line by line.
    #[test]
    fn the_skip_reads_what_every_line_says() {
        let mut text = String::new();
        for i in 0..300u32 {
            let fields = [
                format!("Package: p{}", i % 250),
                format!("Status: install ok {}", ["installed", "config-files", "unpacked"][(i % 3) as usize]),
                format!("Version: {i}.{}", i % 7),
                "Priority: optional".to_string(),
                format!("Description: d{i}\n Version: {i}\n .\n Package: not-p{i}"),
            ];
            let mut order: Vec<usize> = (0..fields.len()).collect();
            order.rotate_left((i % 5) as usize);
            let kept: Vec<&str> =
                order.iter().filter(|&&f| f != 2 || i % 11 != 0).map(|&f| fields[f].as_str()).collect();
            text.push_str(&kept.join("\n"));
            text.push_str(if i < 299 { "\n\n" } else { "" });
        }
        assert_eq!(parse_status(text.as_bytes()), parse_by_lines(&text));
        assert_eq!(parse_status(text.as_bytes())["p3"].len(), 2, "p3 and p253 share a name");
    }

    /// The skip to the stanza's end must not swallow the next stanza: not when the
    /// three fields come last, not when one is missing, not at the end of the file.
    #[test]
    fn every_stanza_is_read_however_its_fields_are_laid_out() {
        let text = "Package: a\nVersion: 1\nStatus: install ok installed\n\n\
                    Package: b\nStatus: install ok half-installed\nDescription: x\n more\n\n\
                    Package: c\r\nStatus: install ok installed\r\nVersion: 3\r\n\r\n\
                    Package: d\nStatus: install ok installed\nVersion: 4";
        let all = parse_status(text.as_bytes());
        let got: Vec<_> = all.iter().map(|(n, p)| (n.as_str(), p[0].status.as_str(), p[0].version.as_str())).collect();
        assert_eq!(
            got,
            [("a", "installed", "1"), ("b", "half-installed", ""), ("c", "installed", "3"), ("d", "installed", "4")]
        );
    }

    /// Stanzas ended by "\r\n" next to stanzas ended by "\n": the skip stops at the
    /// blank line whichever way it and the lines before it end, as the line-by-line
    /// reading did (a search for "\n\n" went on into the next stanza and lost it).
    #[test]
    fn the_skip_stops_at_a_blank_line_of_either_ending() {
        let text = "Package: a\r\nStatus: install ok installed\r\nVersion: 1\r\n\r\n\
                    Package: b\nStatus: install ok installed\nVersion: 2\n\n\
                    Package: c\nStatus: install ok installed\nVersion: 3\n\r\n\
                    Package: d\nStatus: install ok installed\nVersion: 4\n\n\
                    Package: e\nStatus: install ok installed\nVersion: 5\nDescription: x";
        let all = parse_status(text.as_bytes());
        let got: Vec<_> = all.iter().map(|(n, p)| (n.as_str(), p[0].version.as_str())).collect();
        assert_eq!(got, [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")]);
    }

    #[test]
    fn lookups_answer_known_names_and_defer_what_only_dpkg_query_knows() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), STATUS_TEXT);
        let db = db(dir.path());
        let got = db.lookup(&names(&["hello", "nope", "gone"])).unwrap().unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["gone", "hello"]);
        assert_eq!(got["hello"].version, "2.10-3");
        // Several architectures, or a name with one: dpkg-query's business.
        assert!(db.lookup(&names(&["hello", "libx"])).unwrap().is_none());
        assert!(db.lookup(&names(&["hello:amd64"])).unwrap().is_none());
        // A journal entry dpkg has not merged yet: dpkg-query's business too.
        std::fs::create_dir(dir.path().join("updates")).unwrap();
        std::fs::write(dir.path().join("updates/tmp.i"), "").unwrap();
        assert!(db.lookup(&names(&["hello"])).unwrap().is_some(), "tmp.i is not a journal entry");
        std::fs::write(dir.path().join("updates/0001"), "Package: hello\n").unwrap();
        assert!(db.lookup(&names(&["hello"])).unwrap().is_none());
    }

    /// Unchanged file: the parse is reused. Replaced file (an install): read again, so a
    /// package state never sees the database as it was before.
    #[test]
    fn the_cache_lasts_as_long_as_the_file() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), STATUS_TEXT);
        let db = db(dir.path());
        let first = db.snapshot().unwrap();
        assert!(Arc::ptr_eq(&first, &db.snapshot().unwrap()), "an unchanged file is parsed again");

        replace(dir.path(), &STATUS_TEXT.replace("2.10-3", "2.10-4"));
        let got = db.lookup(&names(&["hello"])).unwrap().unwrap();
        assert_eq!(got["hello"].version, "2.10-4", "the replaced database was not read");
        assert!(!Arc::ptr_eq(&first, &db.snapshot().unwrap()));

        // Rewritten in place (same inode), longer: read again as well.
        std::fs::write(dir.path().join("status"), STATUS_TEXT.replace("2.10-3", "2.10-500")).unwrap();
        assert_eq!(db.lookup(&names(&["hello"])).unwrap().unwrap()["hello"].version, "2.10-500");

        std::fs::remove_file(dir.path().join("status")).unwrap();
        assert!(db.lookup(&names(&["hello"])).is_err(), "a missing database is an error, not an empty one");
    }
}
