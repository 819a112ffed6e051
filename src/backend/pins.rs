//! Instance pins: which `instance_token` an (app, instance) proved at its first
//! Handshake, or was registered with by the operator.
//!
//! One file per pin in the pins directory, named by the sha256 of `APP\0INSTANCE` (the
//! instance id comes from the network and must never shape a path), holding the
//! token's sha256, never the token. Files are written whole (temporary file, fsync, then
//! link or rename), so a crash leaves the old pin or the new one, never half of one.
//! There is no cache: every Handshake reads its pin file, so `opsagent-backend instances
//! pin|forget` act on a running backend at once, without a signal.
//!
//! First-use pins are made by one writer thread ([`PinWriter`]) in batches (group
//! commit): it takes every pin waiting, writes their files, syncs the file system once,
//! links them into place and syncs the directory once; only then does any of them get
//! its verdict, and only then is the Handshake answered. So a pin the backend acted on
//! survives a power cut, and 10,000 agents pinning at once cost a few hundred syncs
//! instead of 10,000, none of them under the hub's lock.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use tokio::sync::oneshot;

use serde::{Deserialize, Serialize};

use super::recipes::{sha256_hex, valid_app_id};
use super::BackendError;
use crate::timefmt::rfc3339;

/// Instance ids longer than this are refused: they are only names.
pub const MAX_INSTANCE_ID: usize = 256;

/// Who made a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinSource {
    /// The instance's first Handshake (trust on first use).
    FirstUse,
    /// `opsagent-backend instances pin`.
    Operator,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub app_id: String,
    pub instance_id: String,
    /// Lowercase hex sha256 of the token.
    pub token_sha256: String,
    pub pinned_at: String,
    /// The peer address of the first Handshake; `null` for an operator's pin.
    pub peer: Option<String>,
    pub source: PinSource,
}

/// The outcome of a Handshake's token check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The token matches the pin.
    Known,
    /// No pin existed; this Handshake made it.
    Pinned,
    /// No pin, and none may be made now (the caller decides why).
    Unpinned,
    /// Pinned to another token.
    Mismatch,
}

/// The hash stored for a token.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Checks an instance id read from a Handshake or the command line.
pub fn valid_instance_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_INSTANCE_ID && !s.chars().any(char::is_control)
}

#[derive(Debug, Clone)]
pub struct PinStore {
    dir: PathBuf,
}

/// A first-use pin to make: the identity, the token's hash and where its first Handshake
/// came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRequest {
    pub app_id: String,
    pub instance_id: String,
    pub token_sha256: String,
    pub peer: String,
    pub at: SystemTime,
}

impl PinRequest {
    pub fn new(app: &str, instance: &str, token: &str, peer: &str, at: SystemTime) -> Self {
        Self {
            app_id: app.into(),
            instance_id: instance.into(),
            token_sha256: token_hash(token),
            peer: peer.into(),
            at,
        }
    }
}

/// Most pins committed by one sync: bounds the wait of the first of a batch.
const MAX_BATCH: usize = 1024;

/// The verdict of a [`PinRequest`], once durable.
pub type PinReply = oneshot::Receiver<Result<Verdict, BackendError>>;

/// The pins writer: one thread committing first-use pins in batches (see the module
/// documentation). Cloned handles feed the same thread; it ends with the last handle.
#[derive(Debug, Clone)]
pub struct PinWriter {
    tx: mpsc::Sender<(PinRequest, oneshot::Sender<Result<Verdict, BackendError>>)>,
    stats: Arc<PinStats>,
}

/// What the writer did: how many pins it was asked for, and in how many batches.
#[derive(Debug, Default)]
pub struct PinStats {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
}

impl PinWriter {
    pub fn start(store: PinStore) -> Result<Self, BackendError> {
        let (tx, rx) = mpsc::channel::<(PinRequest, oneshot::Sender<Result<Verdict, BackendError>>)>();
        let stats = Arc::new(PinStats::default());
        let counted = stats.clone();
        let dir = store.dir.clone();
        std::thread::Builder::new()
            .name("pin-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    counted.requests.fetch_add(requests.len() as u64, Ordering::Relaxed);
                    counted.batches.fetch_add(1, Ordering::Relaxed);
                    for (verdict, reply) in store.commit(&requests).into_iter().zip(replies) {
                        // The connection went away meanwhile: its pin stays made.
                        let _ = reply.send(verdict);
                    }
                }
            })
            .map_err(|e| BackendError::io("cannot start the pin writer", &dir, e))?;
        Ok(Self { tx, stats })
    }

    /// Queues a pin; the answer comes once it is on disk (or could not be made).
    pub fn submit(&self, request: PinRequest) -> PinReply {
        let (reply, rx) = oneshot::channel();
        // The thread only ends when every handle is gone; should it have died, the
        // dropped reply says so to the caller.
        let _ = self.tx.send((request, reply));
        rx
    }

    pub fn stats(&self) -> &PinStats {
        &self.stats
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackendError + 'a {
    move |e| BackendError::io(what, path, e)
}

impl PinStore {
    /// Where the pins live when not given: `STATELOG.pins/`, next to the statelog.
    pub fn default_dir(statelog: &Path) -> PathBuf {
        let mut p = statelog.as_os_str().to_owned();
        p.push(".pins");
        PathBuf::from(p)
    }

    /// Opens the directory, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, BackendError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create the pins directory", dir))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, app: &str, instance: &str) -> PathBuf {
        let mut key = Vec::with_capacity(app.len() + instance.len() + 1);
        key.extend_from_slice(app.as_bytes());
        key.push(0);
        key.extend_from_slice(instance.as_bytes());
        self.dir.join(format!("{}.json", sha256_hex(&key)))
    }

    pub fn get(&self, app: &str, instance: &str) -> Result<Option<Pin>, BackendError> {
        let path = self.path(app, instance);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackendError::io("cannot read the pin", &path, e)),
        };
        let pin: Pin = serde_json::from_slice(&bytes)
            .map_err(|e| BackendError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        if pin.app_id != app || pin.instance_id != instance {
            return Err(BackendError::Corrupt {
                path,
                reason: format!("holds the pin of {}/{}", pin.app_id, pin.instance_id),
            });
        }
        Ok(Some(pin))
    }

    /// Writes `pin` to a temporary file of the directory (synced when `sync`); returns
    /// its path.
    fn stage(&self, pin: &Pin, sync: bool) -> Result<PathBuf, BackendError> {
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).map_err(|e| BackendError::Config(format!("no randomness: {e}")))?;
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(rand)));
        let mut text = serde_json::to_vec_pretty(pin).map_err(|e| BackendError::Config(e.to_string()))?;
        text.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("cannot create", &tmp))?;
        if let Err(e) = f.write_all(&text).and_then(|()| if sync { f.sync_all() } else { Ok(()) }) {
            let _ = std::fs::remove_file(&tmp);
            return Err(BackendError::io("cannot write", &tmp, e));
        }
        Ok(tmp)
    }

    fn sync_dir(&self) -> Result<(), BackendError> {
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", &self.dir))
    }

    /// A Handshake's check against the pin as it is on disk now: `Known`, `Mismatch`, or
    /// `Unpinned` when there is none (making one is the [`PinWriter`]'s job).
    pub fn verdict(&self, app: &str, instance: &str, token: &str) -> Result<Verdict, BackendError> {
        let hash = token_hash(token);
        Ok(match self.get(app, instance)? {
            Some(pin) if pin.token_sha256 == hash => Verdict::Known,
            Some(_) => Verdict::Mismatch,
            None => Verdict::Unpinned,
        })
    }

    fn verdict_by_hash(&self, r: &PinRequest) -> Result<Verdict, BackendError> {
        Ok(match self.get(&r.app_id, &r.instance_id)? {
            Some(pin) if pin.token_sha256 == r.token_sha256 => Verdict::Known,
            Some(_) => Verdict::Mismatch,
            None => Verdict::Unpinned,
        })
    }

    /// Makes the first-use pins of a batch durable together: their files are written,
    /// the file system synced once (their content is on disk before any name points to
    /// it), each linked into place — exclusively: an existing pin (another Handshake's
    /// or the operator's) wins and decides that request's verdict — then the directory
    /// synced once. A verdict is `Pinned` only once all of that succeeded.
    pub fn commit(&self, requests: &[PinRequest]) -> Vec<Result<Verdict, BackendError>> {
        let mut out: Vec<Result<Verdict, BackendError>> = Vec::with_capacity(requests.len());
        let mut staged = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match self.verdict_by_hash(r) {
                Ok(Verdict::Unpinned) => {
                    let pin = Pin {
                        app_id: r.app_id.clone(),
                        instance_id: r.instance_id.clone(),
                        token_sha256: r.token_sha256.clone(),
                        pinned_at: rfc3339(r.at),
                        peer: Some(r.peer.clone()),
                        source: PinSource::FirstUse,
                    };
                    match self.stage(&pin, false) {
                        Ok(tmp) => {
                            staged.push((i, tmp));
                            out.push(Ok(Verdict::Unpinned));
                        }
                        Err(e) => out.push(Err(e)),
                    }
                }
                other => out.push(other),
            }
        }
        if staged.is_empty() {
            return out;
        }
        let synced = self.sync_fs();
        for (i, tmp) in &staged {
            let r = &requests[*i];
            out[*i] = match &synced {
                Err(e) => Err(BackendError::io("cannot sync", &self.dir, std::io::Error::from(e.kind()))),
                Ok(()) => {
                    let target = self.path(&r.app_id, &r.instance_id);
                    match std::fs::hard_link(tmp, &target) {
                        Ok(()) => Ok(Verdict::Pinned),
                        // Pinned meanwhile (earlier in this batch, or by the operator):
                        // that pin decides.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.verdict_by_hash(r),
                        Err(e) => Err(BackendError::io("cannot create the pin", &target, e)),
                    }
                }
            };
            let _ = std::fs::remove_file(tmp);
        }
        if let Err(e) = self.sync_dir() {
            // Not durable: nobody is told it is pinned (a retried Handshake finds the
            // file, if it stayed, and is `Known`).
            let reason = e.to_string();
            for (i, _) in &staged {
                if matches!(out[*i], Ok(Verdict::Pinned)) {
                    out[*i] = Err(BackendError::Corrupt { path: self.dir.clone(), reason: reason.clone() });
                }
            }
        }
        out
    }

    /// Flushes the file system holding the pins directory: one call for every staged
    /// file of a batch, where a sync per file would cost a journal commit each.
    fn sync_fs(&self) -> std::io::Result<()> {
        let dir = std::fs::File::open(&self.dir)?;
        nix::unistd::syncfs(dir.as_raw_fd()).map_err(std::io::Error::from)
    }

    /// The whole first-use path at once (tests and tools): the verdict, pinning when
    /// there is no pin and `may_pin`.
    pub fn check(
        &self,
        app: &str,
        instance: &str,
        token: &str,
        peer: &str,
        may_pin: bool,
        now: SystemTime,
    ) -> Result<Verdict, BackendError> {
        match self.verdict(app, instance, token)? {
            Verdict::Unpinned if may_pin => {
                let request = PinRequest::new(app, instance, token, peer, now);
                self.commit(std::slice::from_ref(&request)).pop().unwrap_or(Ok(Verdict::Unpinned))
            }
            v => Ok(v),
        }
    }

    /// The operator's pin (replacing any earlier one); returns the pin replaced.
    pub fn pin(
        &self,
        app: &str,
        instance: &str,
        token_sha256: &str,
        now: SystemTime,
    ) -> Result<Option<Pin>, BackendError> {
        check_ids(app, instance)?;
        if token_sha256.len() != 64 || !token_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BackendError::Config(format!("{token_sha256:?} is not a sha256 in hex (64 characters)")));
        }
        let old = self.get(app, instance).ok().flatten();
        let pin = Pin {
            app_id: app.into(),
            instance_id: instance.into(),
            token_sha256: token_sha256.to_ascii_lowercase(),
            pinned_at: rfc3339(now),
            peer: None,
            source: PinSource::Operator,
        };
        let tmp = self.stage(&pin, true)?;
        let target = self.path(app, instance);
        if let Err(e) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_file(&tmp);
            return Err(BackendError::io("cannot write the pin", &target, e));
        }
        self.sync_dir()?;
        Ok(old)
    }

    /// Removes a pin; returns it (`None`: there was none).
    pub fn forget(&self, app: &str, instance: &str) -> Result<Option<Pin>, BackendError> {
        check_ids(app, instance)?;
        let old = self.get(app, instance)?;
        let path = self.path(app, instance);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::io("cannot remove the pin", &path, e)),
        }
        Ok(old)
    }

    /// Every pin, sorted by app then instance.
    pub fn list(&self) -> Result<Vec<Pin>, BackendError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("cannot list", &self.dir))? {
            let path = entry.map_err(io("cannot list", &self.dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io("cannot read the pin", &path))?;
            let pin: Pin = serde_json::from_slice(&bytes)
                .map_err(|e| BackendError::Corrupt { path: path.clone(), reason: e.to_string() })?;
            out.push(pin);
        }
        out.sort_by(|a, b| (&a.app_id, &a.instance_id).cmp(&(&b.app_id, &b.instance_id)));
        Ok(out)
    }
}

fn check_ids(app: &str, instance: &str) -> Result<(), BackendError> {
    if !valid_app_id(app) {
        return Err(BackendError::Config(format!("{app:?} is not a valid app id")));
    }
    if !valid_instance_id(instance) {
        return Err(BackendError::Config(format!("{instance:?} is not a valid instance id")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_pins_then_only_that_token_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = PinStore::open(&dir.path().join("pins")).unwrap();
        let now = SystemTime::now();
        assert_eq!(store.check("a", "i-1", "t1", "1.2.3.4:5", false, now).unwrap(), Verdict::Unpinned);
        assert_eq!(store.check("a", "i-1", "t1", "1.2.3.4:5", true, now).unwrap(), Verdict::Pinned);
        assert_eq!(store.check("a", "i-1", "t1", "9.9.9.9:5", true, now).unwrap(), Verdict::Known);
        assert_eq!(store.check("a", "i-1", "t2", "9.9.9.9:5", true, now).unwrap(), Verdict::Mismatch);
        // Same instance id in another app: another pin.
        assert_eq!(store.check("b", "i-1", "t2", "9.9.9.9:5", true, now).unwrap(), Verdict::Pinned);
        let text = std::fs::read_to_string(store.path("a", "i-1")).unwrap();
        assert!(!text.contains("\"t1\""), "the token itself is never stored: {text}");
        let list = store.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].source, list[0].peer.as_deref()), (PinSource::FirstUse, Some("1.2.3.4:5")));

        let replaced = store.pin("a", "i-1", &token_hash("t2"), now).unwrap().unwrap();
        assert_eq!(replaced.token_sha256, token_hash("t1"));
        assert_eq!(store.check("a", "i-1", "t2", "x", true, now).unwrap(), Verdict::Known);
        assert!(store.forget("a", "i-1").unwrap().is_some());
        assert!(store.forget("a", "i-1").unwrap().is_none());
        assert!(store.pin("a", "i-1", "nothex", now).is_err());
        assert!(store.pin("../a", "i-1", &token_hash("x"), now).is_err());
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A batch is committed together: every new pin is made, a second request for the
    /// same instance in the batch is decided by the first (same token: `Known`; another:
    /// `Mismatch`), an existing pin decides its own, and no temporary file is left.
    #[test]
    fn a_batch_is_committed_at_once_and_the_first_pin_of_an_instance_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = PinStore::open(&dir.path().join("pins")).unwrap();
        let now = SystemTime::now();
        assert_eq!(store.check("a", "old", "t", "p", true, now).unwrap(), Verdict::Pinned);
        let mut requests: Vec<PinRequest> =
            (0..50).map(|i| PinRequest::new("a", &format!("i-{i}"), &format!("t{i}"), "p", now)).collect();
        requests.push(PinRequest::new("a", "i-0", "t0", "p", now));
        requests.push(PinRequest::new("a", "i-1", "intruder", "p", now));
        requests.push(PinRequest::new("a", "old", "t", "p", now));
        requests.push(PinRequest::new("a", "old", "intruder", "p", now));
        let verdicts: Vec<Verdict> = store.commit(&requests).into_iter().map(Result::unwrap).collect();
        assert!(verdicts[..50].iter().all(|v| *v == Verdict::Pinned), "{verdicts:?}");
        assert_eq!(verdicts[50..], [Verdict::Known, Verdict::Mismatch, Verdict::Known, Verdict::Mismatch]);
        assert_eq!(store.list().unwrap().len(), 51);
        for i in 0..50 {
            assert_eq!(store.verdict("a", &format!("i-{i}"), &format!("t{i}")).unwrap(), Verdict::Known);
        }
        let leftovers = std::fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp"));
        assert_eq!(leftovers.count(), 0);
    }

    /// The writer thread answers every request, from any number of callers, once the pin
    /// is made; requests that arrive while it syncs are committed together.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_answers_every_request_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = PinStore::open(&dir.path().join("pins")).unwrap();
        let writer = PinWriter::start(store.clone()).unwrap();
        let now = SystemTime::now();
        let replies: Vec<PinReply> =
            (0..300).map(|i| writer.submit(PinRequest::new("a", &format!("i-{i}"), "t", "p", now))).collect();
        for reply in replies {
            assert_eq!(reply.await.unwrap().unwrap(), Verdict::Pinned);
        }
        assert_eq!(store.list().unwrap().len(), 300);
        let (requests, batches) =
            (writer.stats().requests.load(Ordering::Relaxed), writer.stats().batches.load(Ordering::Relaxed));
        assert_eq!(requests, 300);
        // The first request may be taken alone; the rest queued while it was synced.
        assert!(batches < requests, "{batches} batches for {requests} pins: nothing was grouped");
    }
}
