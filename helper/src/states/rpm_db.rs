//! What rpm has installed, from one `rpm -qa` per version of its database instead of one
//! `rpm -q` process (two, with the check after the change) per package state.
//!
//! rpm's database cannot be read without rpm (SQLite, Berkeley DB or ndb, by release), so
//! unlike dpkg's status file it is asked once, for everything, and the answer is kept
//! with the identity ([`crate::stamp`]: device, inode, size, modification and change
//! times) of each of the database's data files, `rpmdb.sqlite` and its write-ahead log, `Packages`
//! (Berkeley DB) and `Packages.db` (ndb) found in rpm's `%{_dbpath}`. Every install or
//! erase writes a package header into one of them; reading them (`rpm -q`) does not,
//! which is why the lock, `-shm` and `__db.*` environment files, which readers touch,
//! are left out. The identity is taken before the listing (a listing that reflects a
//! later transaction is then kept under an identity that is already gone) and again
//! after it: a listing that overlapped a transaction is used once and not kept.
//!
//! The answer for a list of names is the listing restricted to those names: the entries
//! `rpm -q NAME…` prints for them (it prints every installed instance of a package
//! whose `%{NAME}` is the argument; lines it may print for other packages, when an
//! argument also reads as `name-version`, carry another `%{NAME}` and were never looked
//! up). Where no data file is found (an unknown backend) nothing is cached.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::stamp::Stamp as FileStamp;

/// The files of rpm's database that every transaction writes.
const DATA_FILES: &[&str] = &["rpmdb.sqlite", "rpmdb.sqlite-wal", "Packages", "Packages.db"];

/// The identity of one version of the database: each data file present, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Vec<(OsString, FileStamp)>);

impl Stamp {
    /// The identity of the data files in `dir`, or `None` when it holds none of them or
    /// one cannot be examined (then versions cannot be told apart, and nothing is kept).
    pub fn of(dir: &Path) -> Option<Stamp> {
        let mut files = Vec::new();
        for name in DATA_FILES {
            match std::fs::symlink_metadata(dir.join(name)) {
                Ok(m) if m.is_file() => files.push((OsString::from(name), FileStamp::of(&m))),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => return None,
            }
        }
        (!files.is_empty()).then_some(Stamp(files))
    }
}

/// One listing: `%{NAME}` → every installed `VERSION-RELEASE` of it.
#[derive(Debug)]
struct Snapshot {
    stamp: Stamp,
    pkgs: BTreeMap<String, Vec<String>>,
}

/// rpm's database in `dir`, listed at most once per version of it.
#[derive(Debug)]
pub struct RpmDb {
    dir: PathBuf,
    cached: Mutex<Option<Arc<Snapshot>>>,
}

impl RpmDb {
    pub fn new(dir: PathBuf) -> RpmDb {
        RpmDb { dir, cached: Mutex::new(None) }
    }

    /// What `rpm -q --qf YUM_FORMAT names…` would give (parsed), from the kept listing
    /// when the database is the one it came from, else from `list_all` (`rpm -qa` with
    /// the same format), kept if the database did not change while it ran.
    pub async fn lookup<F, Fut, E>(&self, names: &[String], list_all: F) -> Result<BTreeMap<String, Vec<String>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        let before = Stamp::of(&self.dir);
        let kept = self.cached.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let snapshot = match kept.filter(|s| Some(&s.stamp) == before.as_ref()) {
            Some(s) => s,
            None => {
                let pkgs = super::yum::parse_rpm_query(&list_all().await?);
                let after = Stamp::of(&self.dir);
                match (before, after) {
                    (Some(b), Some(a)) if a == b => {
                        let fresh = Arc::new(Snapshot { stamp: b, pkgs });
                        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&fresh));
                        fresh
                    }
                    // Changed under the listing, or no data file to tell versions by:
                    // this listing answers this question only.
                    _ => return Ok(restrict(&pkgs, names)),
                }
            }
        };
        Ok(restrict(&snapshot.pkgs, names))
    }
}

fn restrict(pkgs: &BTreeMap<String, Vec<String>>, names: &[String]) -> BTreeMap<String, Vec<String>> {
    names.iter().filter_map(|n| pkgs.get(n).map(|v| (n.clone(), v.clone()))).collect()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use std::cell::Cell;

    const LISTING: &str = "bash\t5.1.8-6.el9\nkernel\t5.14.0-1.el9\nkernel\t5.14.0-2.el9\nzlib\t1.2.11-40.el9\n";

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    async fn ask(db: &RpmDb, n: &[&str], runs: &Cell<u32>, listing: &str) -> BTreeMap<String, Vec<String>> {
        db.lookup(&names(n), || {
            runs.set(runs.get() + 1);
            let text = listing.to_string();
            async move { Ok::<_, io::Error>(text) }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn one_listing_answers_every_question_until_a_data_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "rpmdb.sqlite", "db");
        let db = RpmDb::new(dir.path().to_path_buf());
        let runs = Cell::new(0);
        let got = ask(&db, &["bash", "kernel", "absent"], &runs, LISTING).await;
        assert_eq!(got.get("bash").unwrap(), &["5.1.8-6.el9"]);
        assert_eq!(got.get("kernel").unwrap(), &["5.14.0-1.el9", "5.14.0-2.el9"]);
        assert!(!got.contains_key("absent") && !got.contains_key("zlib"), "only the names asked: {got:?}");
        ask(&db, &["zlib"], &runs, LISTING).await;
        assert_eq!(runs.get(), 1, "the second question is answered from the kept listing");

        // A transaction appends to SQLite's write-ahead log: listed again.
        write(dir.path(), "rpmdb.sqlite-wal", "txn");
        let got = ask(&db, &["bash"], &runs, "bash\t5.2-1\n").await;
        assert_eq!((runs.get(), got.get("bash").unwrap().as_slice()), (2, &["5.2-1".to_string()][..]));
        // Readers' files do not count.
        write(dir.path(), "rpmdb.sqlite-shm", "readers");
        write(dir.path(), ".rpm.lock", "");
        ask(&db, &["bash"], &runs, LISTING).await;
        assert_eq!(runs.get(), 2);
    }

    #[tokio::test]
    async fn a_listing_that_overlapped_a_change_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "Packages", "bdb");
        let db = RpmDb::new(dir.path().to_path_buf());
        let runs = Cell::new(0);
        let got = db
            .lookup(&names(&["bash"]), || {
                runs.set(runs.get() + 1);
                // A transaction upgrading bash lands after rpm has read bash's header.
                write(dir.path(), "Packages", "bdb, bash upgraded");
                async { Ok::<_, io::Error>(LISTING.to_string()) }
            })
            .await
            .unwrap();
        assert_eq!(got.get("bash").unwrap(), &["5.1.8-6.el9"], "the listing still answers its own question");
        // Kept under the identity seen after it, the old bash would be the answer now.
        let got = ask(&db, &["bash"], &runs, "bash\t5.2-1\n").await;
        assert_eq!((runs.get(), got.get("bash").unwrap().as_slice()), (2, &["5.2-1".to_string()][..]));
        ask(&db, &["bash"], &runs, LISTING).await;
        assert_eq!(runs.get(), 2, "a quiet listing is kept");
    }

    #[tokio::test]
    async fn without_a_known_data_file_every_question_lists() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "unknown-backend.db", "x");
        let db = RpmDb::new(dir.path().to_path_buf());
        let runs = Cell::new(0);
        ask(&db, &["bash"], &runs, LISTING).await;
        ask(&db, &["bash"], &runs, LISTING).await;
        assert_eq!(runs.get(), 2);
    }
}
