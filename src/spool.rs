//! The on-disk StateLog spool: every StateLog is made durable here before it is sent, and
//! stays here until the backend has it, so that no result is lost or doubled across
//! disconnects, backend restarts, daemon restarts and `kill -9`.
//!
//! # Files (all in the spool directory, mode 0700, files 0600)
//!
//! * `spool.log` — the write-ahead log: an 8-byte magic `OPSSPL\0\x01` followed by frames
//!   `u32 LE len | u32 LE check | payload`, where `payload` is `len` bytes of JSON and
//!   `check` is the first four bytes (LE) of `sha256(len as u32 LE || payload)`. Payloads:
//!   * `{"t":"header","next_seq":N,"dropped":D}` — first frame of every file: the sequence
//!     high-water mark and the number of records dropped by the bounds so far;
//!   * `{"t":"log","log":{StateLog with "seq":N}}` — an appended record;
//!   * `{"t":"ack","seq":N}` — one record delivered (old backends);
//!   * `{"t":"ack_through","seq":N}` — everything up to N delivered (acking backends);
//!   * `{"t":"drop","seqs":[...]}` — records dropped by the bounds (counted in `dropped`).
//! * `spool.log.tmp` — a compaction in progress (removed on open).
//! * `spool.log.corrupt` — an unrecognisable `spool.log` (wrong magic), moved aside.
//! * `seq.reserved` — decimal `R`: no sequence number `>= R` was ever issued. Advanced in
//!   blocks of [`SEQ_RESERVE`] before issuing, so that even a lost or corrupt log never
//!   makes the spool reuse a sequence number.
//!
//! # Recovery
//!
//! [`Spool::open`] replays the log and stops at the first frame that is short, has an
//! impossible length or a wrong check: that tail is torn (a write interrupted by a crash)
//! or corrupt, and the file is truncated to the last good frame (with a warning naming the
//! number of bytes dropped). A frame with a good check whose JSON is not understood is
//! skipped with a warning. Nothing in the file can make `open` panic.
//!
//! Every mutation is written at the end of the file and `fdatasync`ed before the call
//! returns, and only then applied in memory; a failed write is cut off again.
//!
//! Compaction rewrites the file (temp file, fsync, rename, fsync of the directory) with
//! the header and the pending records only, once the file is past the compaction
//! threshold and most of it is dead (acked records, acks, drops).
//!
//! The spool is single-writer: the daemon owning the state directory must be the only
//! process opening it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::StateLog;

/// The first bytes of `spool.log`; the last byte is the format version.
pub const MAGIC: &[u8; 8] = b"OPSSPL\x00\x01";
/// Bytes of framing before each payload.
pub const FRAME_OVERHEAD: u64 = 8;
/// Sequence numbers are reserved in `seq.reserved` this many at a time.
pub const SEQ_RESERVE: u64 = 1024;
/// No single record is kept bigger than this (nor than `max_bytes`); see [`Spool::append`].
pub const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;
/// Default file size past which a mostly-dead log is compacted.
pub const DEFAULT_COMPACT_BYTES: u64 = 1024 * 1024;

const LOG_FILE: &str = "spool.log";
const TMP_FILE: &str = "spool.log.tmp";
const CORRUPT_FILE: &str = "spool.log.corrupt";
const RESERVE_FILE: &str = "seq.reserved";
const RESERVE_TMP: &str = "seq.reserved.tmp";

/// Bounds of the spool's pending records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// At most this many pending records (at least 1 is always allowed).
    pub max_records: usize,
    /// At most this many bytes of pending records (framed size, as on disk).
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits { max_records: 10_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// An I/O failure of the spool, naming what was being done to which file.
#[derive(Debug, thiserror::Error)]
#[error("spool: cannot {op} {}: {source}", path.display())]
pub struct SpoolError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError { op, path: path.to_path_buf(), source }
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Pending records recovered.
    pub records: usize,
    /// Bytes of torn or corrupt tail cut off the log.
    pub discarded_bytes: u64,
    /// Frames with a good check but a payload this version does not understand.
    pub skipped_entries: usize,
    /// An unrecognisable log was moved here and a fresh one started.
    pub moved_aside: Option<PathBuf>,
    /// The log could not be trusted for the sequence high-water mark, so it was taken
    /// from `seq.reserved` (sequence numbers jump forward).
    pub used_reserve: bool,
}

#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum EntryOut<'a> {
    Header { next_seq: u64, dropped: u64 },
    Log { log: &'a StateLog },
    Ack { seq: u64 },
    AckThrough { seq: u64 },
    Drop { seqs: &'a [u64] },
}

#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum EntryIn {
    Header { next_seq: u64, dropped: u64 },
    Log { log: StateLog },
    Ack { seq: u64 },
    AckThrough { seq: u64 },
    Drop { seqs: Vec<u64> },
}

fn check(len: u32, payload: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    h.update(payload);
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

fn payload(entry: &EntryOut<'_>) -> io::Result<Vec<u8>> {
    serde_json::to_vec(entry).map_err(io::Error::other)
}

/// Appends the frame of `entry` to `buf`.
fn frame_into(buf: &mut Vec<u8>, entry: &EntryOut<'_>) -> io::Result<()> {
    let p = payload(entry)?;
    let len =
        u32::try_from(p.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "spool record over 4 GiB"))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&check(len, &p).to_le_bytes());
    buf.extend_from_slice(&p);
    Ok(())
}

/// Framed size of a record on disk.
fn record_len(log: &StateLog) -> u64 {
    serde_json::to_vec(&EntryOut::Log { log }).map_or(u64::MAX, |p| p.len() as u64 + FRAME_OVERHEAD)
}

#[derive(Debug)]
struct Pending {
    log: StateLog,
    len: u64,
}

/// The durable StateLog queue. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Length of the good prefix of the file: everything written and synced.
    file_len: u64,
    /// A write failed and its bytes may still be past `file_len`.
    needs_repair: bool,
    limits: SpoolLimits,
    compact_bytes: u64,
    pending: BTreeMap<u64, Pending>,
    live_bytes: u64,
    next_seq: u64,
    reserved: u64,
    dropped: u64,
    recovery: Recovery,
}

struct Replay {
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
    dropped: u64,
    good_len: u64,
    saw_header: bool,
    skipped: usize,
}

fn replay(file: &mut File, path: &Path, total: u64) -> Result<Replay, SpoolError> {
    let mut r = Replay {
        pending: BTreeMap::new(),
        next_seq: 1,
        dropped: 0,
        good_len: MAGIC.len() as u64,
        saw_header: false,
        skipped: 0,
    };
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic).map_err(err("read", path))?;
    let mut pos = MAGIC.len() as u64;
    let mut first = true;
    loop {
        let remaining = total - pos;
        if remaining < FRAME_OVERHEAD {
            break;
        }
        let mut head = [0u8; 8];
        reader.read_exact(&mut head).map_err(err("read", path))?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || u64::from(len) > remaining - FRAME_OVERHEAD {
            break;
        }
        let mut p = vec![0u8; len as usize];
        reader.read_exact(&mut p).map_err(err("read", path))?;
        if check(len, &p) != want {
            break;
        }
        pos += FRAME_OVERHEAD + u64::from(len);
        r.good_len = pos;
        let entry = match serde_json::from_slice::<EntryIn>(&p) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(path = %path.display(), offset = pos - FRAME_OVERHEAD - u64::from(len), error = %e, "spool: skipping a log entry this version does not understand");
                r.skipped += 1;
                continue;
            }
        };
        match entry {
            EntryIn::Header { next_seq, dropped } => {
                r.next_seq = r.next_seq.max(next_seq);
                if first {
                    r.saw_header = true;
                    r.dropped = dropped;
                } else {
                    r.dropped = r.dropped.max(dropped);
                }
            }
            EntryIn::Log { log } => match log.seq {
                Some(seq) if seq > 0 => {
                    r.next_seq = r.next_seq.max(seq.saturating_add(1));
                    let len = record_len(&log);
                    r.pending.entry(seq).or_insert(Pending { log, len });
                }
                _ => {
                    tracing::warn!(path = %path.display(), "spool: skipping a record without a sequence number");
                    r.skipped += 1;
                }
            },
            EntryIn::Ack { seq } => {
                r.pending.remove(&seq);
            }
            EntryIn::AckThrough { seq } => {
                let keep = r.pending.split_off(&seq.saturating_add(1));
                r.pending = keep;
            }
            EntryIn::Drop { seqs } => {
                for s in &seqs {
                    r.pending.remove(s);
                }
                r.dropped = r.dropped.saturating_add(seqs.len() as u64);
            }
        }
        first = false;
    }
    Ok(r)
}

fn create_file(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err("create", path))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync directory", dir))
}

fn read_reserve(path: &Path) -> Result<u64, SpoolError> {
    match fs::read_to_string(path) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) => Ok(n),
            Err(_) => {
                tracing::warn!(path = %path.display(), "spool: ignoring an unreadable sequence reservation");
                Ok(0)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(err("read", path)(e)),
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it. See the module
    /// documentation.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Spool, SpoolError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err("create directory", dir))?;
        let path = dir.join(LOG_FILE);
        let tmp = dir.join(TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "spool: removed an interrupted compaction")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove", &tmp)(e)),
        }
        let reserved = read_reserve(&dir.join(RESERVE_FILE))?;
        let mut recovery = Recovery::default();

        let existing = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(err("open", &path)(e)),
        };
        let mut trusted = false;
        let mut headerless = false;
        let mut state = None;
        if let Some(mut file) = existing {
            let total = file.metadata().map_err(err("stat", &path))?.len();
            let mut magic = [0u8; 8];
            let magic_ok = total >= MAGIC.len() as u64 && file.read_exact_at(&mut magic, 0).is_ok() && &magic == MAGIC;
            if magic_ok {
                let r = replay(&mut file, &path, total)?;
                if r.good_len < total {
                    let cut = total - r.good_len;
                    tracing::warn!(path = %path.display(), bytes = cut, kept = r.good_len, "spool: dropped a torn or corrupt tail of the log");
                    file.set_len(r.good_len).map_err(err("truncate", &path))?;
                    file.sync_all().map_err(err("fsync", &path))?;
                    recovery.discarded_bytes = cut;
                }
                recovery.skipped_entries = r.skipped;
                trusted = r.saw_header && r.good_len == total;
                headerless = !r.saw_header;
                state = Some((file, r));
            } else if total == 0 {
                // Created but never written (crash during creation).
                drop(file);
            } else {
                drop(file);
                let aside = dir.join(CORRUPT_FILE);
                tracing::warn!(path = %path.display(), bytes = total, moved_to = %aside.display(), "spool: the log is not a spool log; moved aside, starting an empty one");
                fs::rename(&path, &aside).map_err(err("move aside", &path))?;
                recovery.discarded_bytes = total;
                recovery.moved_aside = Some(aside);
            }
        }

        let (file, r) = match state {
            Some(s) => s,
            None => {
                let next_seq = reserved.max(1);
                let mut buf = MAGIC.to_vec();
                frame_into(&mut buf, &EntryOut::Header { next_seq, dropped: 0 }).map_err(err("encode", &path))?;
                let file = create_file(&path)?;
                file.write_all_at(&buf, 0).map_err(err("write", &path))?;
                file.sync_all().map_err(err("fsync", &path))?;
                sync_dir(dir)?;
                let len = buf.len() as u64;
                recovery.used_reserve = reserved > 1;
                (
                    file,
                    Replay {
                        pending: BTreeMap::new(),
                        next_seq,
                        dropped: 0,
                        good_len: len,
                        saw_header: true,
                        skipped: 0,
                    },
                )
            }
        };
        let mut next_seq = r.next_seq.max(1);
        if !trusted && reserved > next_seq {
            next_seq = reserved;
            recovery.used_reserve = true;
        }
        let live_bytes = r.pending.values().map(|p| p.len).sum();
        recovery.records = r.pending.len();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            path,
            file,
            file_len: r.good_len,
            needs_repair: false,
            limits,
            compact_bytes: DEFAULT_COMPACT_BYTES,
            pending: r.pending,
            live_bytes,
            next_seq,
            reserved,
            dropped: r.dropped,
            recovery,
        };
        if headerless || spool.recovery.used_reserve || spool.recovery.skipped_entries > 0 {
            // Rewrite so that the header carries the high-water mark we now use and the
            // file holds only what we understand.
            spool.compact()?;
        } else {
            spool.maybe_compact();
        }
        if spool.recovery.records > 0 || spool.dropped > 0 {
            tracing::info!(
                pending = spool.pending.len(),
                next_seq = spool.next_seq,
                dropped = spool.dropped,
                "spool: recovered"
            );
        }
        Ok(spool)
    }

    /// Sets the file size past which a mostly-dead log is compacted
    /// (default [`DEFAULT_COMPACT_BYTES`]).
    pub fn set_compact_threshold(&mut self, bytes: u64) {
        self.compact_bytes = bytes;
    }

    /// The largest framed size one record may have.
    fn record_cap(&self) -> u64 {
        self.limits.max_bytes.clamp(1, MAX_RECORD_BYTES)
    }

    /// Makes `log` durable with the next sequence number and returns it as stored (with
    /// `seq` set, and `stdout`/`comment` shortened if the record alone was over the size
    /// limit). Drops the oldest pending records first if the bounds require it.
    pub fn append(&mut self, mut log: StateLog) -> Result<StateLog, SpoolError> {
        self.repair()?;
        let seq = self.next_seq;
        if seq >= self.reserved {
            self.reserve(seq.saturating_add(SEQ_RESERVE))?;
        }
        log.seq = Some(seq);
        let cap = self.record_cap();
        let mut len = record_len(&log);
        if len > cap {
            let before = len;
            fit_record(&mut log, cap);
            len = record_len(&log);
            tracing::warn!(seq, state_id = %log.state_id, bytes = before, limit = cap, kept = len, "spool: StateLog over the size limit; truncated its output");
        }
        let victims = self.victims(&log, len);
        let mut buf = Vec::with_capacity(len as usize + 64);
        if !victims.is_empty() {
            frame_into(&mut buf, &EntryOut::Drop { seqs: &victims }).map_err(err("encode", &self.path))?;
        }
        frame_into(&mut buf, &EntryOut::Log { log: &log }).map_err(err("encode", &self.path))?;
        // The number is spent whether or not the write succeeds.
        self.next_seq = seq.saturating_add(1);
        self.write(&buf)?;
        if !victims.is_empty() {
            let mut versions = BTreeSet::new();
            for s in &victims {
                if let Some(p) = self.pending.remove(s) {
                    self.live_bytes -= p.len;
                    versions.insert(p.log.recipe_version);
                }
            }
            self.dropped = self.dropped.saturating_add(victims.len() as u64);
            tracing::warn!(count = victims.len(), recipe_versions = ?versions, total_dropped = self.dropped, "spool: full; dropped the oldest undelivered StateLogs");
        }
        self.live_bytes += len;
        self.pending.insert(seq, Pending { log: log.clone(), len });
        if !victims.is_empty() {
            self.maybe_compact();
        }
        Ok(log)
    }

    /// The pending records to drop so that one more record of `len` bytes fits.
    fn victims(&self, new: &StateLog, len: u64) -> Vec<u64> {
        let max_records = self.limits.max_records.max(1);
        let mut count = self.pending.len() + 1;
        let mut bytes = self.live_bytes + len;
        let over = |count: usize, bytes: u64| count > max_records || bytes > self.limits.max_bytes;
        if !over(count, bytes) {
            return Vec::new();
        }
        let newest = self.pending.values().map(|p| p.log.recipe_version).max().unwrap_or(0).max(new.recipe_version);
        let mut victims = Vec::new();
        for superseded in [true, false] {
            for (seq, p) in &self.pending {
                if !over(count, bytes) {
                    break;
                }
                if (p.log.recipe_version < newest) == superseded {
                    victims.push(*seq);
                    count -= 1;
                    bytes -= p.len;
                }
            }
        }
        victims.sort_unstable();
        victims
    }

    /// What still has to be delivered, in sequence order.
    pub fn pending(&self) -> Vec<StateLog> {
        self.pending.values().map(|p| p.log.clone()).collect()
    }

    /// The pending records in sequence order, without copying.
    pub fn iter_pending(&self) -> impl Iterator<Item = &StateLog> + '_ {
        self.pending.values().map(|p| &p.log)
    }

    /// The pending records with a sequence number `>= seq`, in order.
    pub fn pending_from(&self, seq: u64) -> impl Iterator<Item = &StateLog> + '_ {
        self.pending.range(seq..).map(|(_, p)| &p.log)
    }

    /// The pending record `seq`, if any.
    pub fn get(&self, seq: u64) -> Option<&StateLog> {
        self.pending.get(&seq).map(|p| &p.log)
    }

    /// The backend has everything up to and including `seq`: durably forget it. Returns
    /// how many pending records that removed (no write when none).
    pub fn ack_through(&mut self, seq: u64) -> Result<usize, SpoolError> {
        let n = self.pending.range(..=seq).count();
        if n == 0 {
            return Ok(0);
        }
        self.repair()?;
        let mut buf = Vec::new();
        frame_into(&mut buf, &EntryOut::AckThrough { seq }).map_err(err("encode", &self.path))?;
        self.write(&buf)?;
        let keep = self.pending.split_off(&seq.saturating_add(1));
        let gone = std::mem::replace(&mut self.pending, keep);
        self.live_bytes -= gone.values().map(|p| p.len).sum::<u64>();
        self.maybe_compact();
        Ok(n)
    }

    /// Record `seq` was delivered: durably forget it. Returns whether it was pending.
    pub fn ack(&mut self, seq: u64) -> Result<bool, SpoolError> {
        if !self.pending.contains_key(&seq) {
            return Ok(false);
        }
        self.repair()?;
        let mut buf = Vec::new();
        frame_into(&mut buf, &EntryOut::Ack { seq }).map_err(err("encode", &self.path))?;
        self.write(&buf)?;
        if let Some(p) = self.pending.remove(&seq) {
            self.live_bytes -= p.len;
        }
        self.maybe_compact();
        Ok(true)
    }

    /// Number of pending records.
    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of pending records (framed, as bounded by `max_bytes`).
    pub fn bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Current size of the log file.
    pub fn file_bytes(&self) -> u64 {
        self.file_len
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records dropped by the bounds over the spool's life (persisted).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What [`Spool::open`] found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Writes `buf` at the end of the good prefix and syncs it; on failure cuts it off.
    fn write(&mut self, buf: &[u8]) -> Result<(), SpoolError> {
        let res = self
            .file
            .write_all_at(buf, self.file_len)
            .map_err(err("write", &self.path))
            .and_then(|()| self.file.sync_data().map_err(err("fsync", &self.path)));
        match res {
            Ok(()) => {
                self.file_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.needs_repair = true;
                if self.repair().is_err() {
                    tracing::warn!(path = %self.path.display(), "spool: could not cut off a failed write; will retry");
                }
                Err(e)
            }
        }
    }

    /// Cuts off bytes of a failed write, if any.
    fn repair(&mut self) -> Result<(), SpoolError> {
        if self.needs_repair {
            self.file.set_len(self.file_len).map_err(err("truncate", &self.path))?;
            self.file.sync_all().map_err(err("fsync", &self.path))?;
            self.needs_repair = false;
        }
        Ok(())
    }

    fn reserve(&mut self, upto: u64) -> Result<(), SpoolError> {
        let tmp = self.dir.join(RESERVE_TMP);
        let path = self.dir.join(RESERVE_FILE);
        let f = create_file(&tmp)?;
        f.write_all_at(format!("{upto}\n").as_bytes(), 0).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(err("rename", &tmp))?;
        sync_dir(&self.dir)?;
        self.reserved = upto;
        Ok(())
    }

    fn maybe_compact(&mut self) {
        let dead = self.file_len.saturating_sub(self.live_bytes);
        if self.file_len >= self.compact_bytes && dead > self.file_len / 2 {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "spool: compaction failed; keeping the current log");
            }
        }
    }

    /// Rewrites the log atomically with only the header and the pending records.
    pub fn compact(&mut self) -> Result<(), SpoolError> {
        self.repair()?;
        let tmp = self.dir.join(TMP_FILE);
        let res = self.compact_into(&tmp);
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn compact_into(&mut self, tmp: &Path) -> Result<(), SpoolError> {
        let mut buf = MAGIC.to_vec();
        frame_into(&mut buf, &EntryOut::Header { next_seq: self.next_seq, dropped: self.dropped })
            .map_err(err("encode", tmp))?;
        let file = create_file(tmp)?;
        let mut off = 0u64;
        let mut live = 0u64;
        for p in self.pending.values() {
            let before = buf.len();
            frame_into(&mut buf, &EntryOut::Log { log: &p.log }).map_err(err("encode", tmp))?;
            live += (buf.len() - before) as u64;
            if buf.len() >= 1024 * 1024 {
                file.write_all_at(&buf, off).map_err(err("write", tmp))?;
                off += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_all_at(&buf, off).map_err(err("write", tmp))?;
        off += buf.len() as u64;
        file.sync_all().map_err(err("fsync", tmp))?;
        fs::rename(tmp, &self.path).map_err(err("rename", tmp))?;
        // The handle now names the live log (same inode); switch before anything can fail.
        let old = self.file_len;
        self.file = file;
        self.file_len = off;
        self.needs_repair = false;
        self.live_bytes = live;
        tracing::debug!(before = old, after = off, pending = self.pending.len(), "spool: compacted");
        sync_dir(&self.dir)
    }
}

/// JSON-escaped length of one character, as serde_json writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

fn text_len(s: &str) -> usize {
    s.chars().map(escaped_len).sum()
}

fn marker(cut: usize) -> String {
    format!("\n[... opsagent: {cut} bytes truncated ...]\n")
}

/// Shortens `s` to at most about `budget` escaped bytes, keeping its head and tail
/// around a marker saying how much was cut.
fn shorten(s: &str, budget: usize) -> String {
    if text_len(s) <= budget {
        return s.to_string();
    }
    let avail = budget.saturating_sub(text_len(&marker(usize::MAX)));
    let head_budget = avail / 2;
    let mut tail_budget = avail - head_budget;
    let mut head_end = 0;
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let l = escaped_len(c);
        if used + l > head_budget {
            break;
        }
        used += l;
        head_end = i + c.len_utf8();
    }
    let mut tail_start = s.len();
    for (i, c) in s.char_indices().rev() {
        let l = escaped_len(c);
        if i < head_end || l > tail_budget {
            break;
        }
        tail_budget -= l;
        tail_start = i;
    }
    let cut = tail_start - head_end;
    format!("{}{}{}", &s[..head_end], marker(cut), &s[tail_start..])
}

/// Shortens `stdout` and `comment` so that the framed record is at most `cap` bytes (if
/// the rest of the record allows it).
fn fit_record(log: &mut StateLog, cap: u64) {
    let had = (log.stdout.is_some(), log.comment.is_some());
    let stdout = log.stdout.take().unwrap_or_default();
    let comment = log.comment.take().unwrap_or_default();
    let mut base_log = log.clone();
    base_log.stdout = had.0.then(String::new);
    base_log.comment = had.1.then(String::new);
    let base = record_len(&base_log);
    let mut budget = cap.saturating_sub(base) as usize;
    let (s_len, c_len) = (text_len(&stdout), text_len(&comment));
    for _ in 0..8 {
        let share = budget / 2;
        let (sb, cb) = if c_len <= share {
            (budget - c_len, c_len)
        } else if s_len <= share {
            (s_len, budget - s_len)
        } else {
            (budget - share, share)
        };
        log.stdout = had.0.then(|| shorten(&stdout, sb));
        log.comment = had.1.then(|| shorten(&comment, cb));
        let len = record_len(log);
        if len <= cap || budget == 0 {
            return;
        }
        budget = budget.saturating_sub((len - cap) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sl(version: u64, id: &str) -> StateLog {
        StateLog {
            recipe_version: version,
            state_id: id.to_string(),
            result: true,
            comment: Some(format!("comment of {id}")),
            stdout: Some(format!("stdout of {id}")),
            seq: None,
            offline: false,
            ran_at: None,
        }
    }

    fn seqs(s: &Spool) -> Vec<u64> {
        s.iter_pending().filter_map(|l| l.seq).collect()
    }

    fn ids(s: &Spool) -> Vec<String> {
        s.iter_pending().map(|l| l.state_id.clone()).collect()
    }

    /// A small deterministic PRNG (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn append_pending_ack_ordering() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.next_seq(), 1);
        let a = s.append(sl(1, "a")).unwrap();
        let b = s.append(sl(1, "b")).unwrap();
        let c = s.append(sl(1, "c")).unwrap();
        assert_eq!((a.seq, b.seq, c.seq), (Some(1), Some(2), Some(3)));
        assert_eq!(s.pending(), vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(s.depth(), 3);
        assert!(s.bytes() > 0);
        assert!(s.ack(2).unwrap());
        assert!(!s.ack(2).unwrap());
        assert_eq!(seqs(&s), vec![1, 3]);
        assert_eq!(s.ack_through(1).unwrap(), 1);
        assert_eq!(s.ack_through(1).unwrap(), 0);
        assert_eq!(s.pending(), vec![c]);
        assert_eq!(s.pending_from(4).count(), 0);
        assert_eq!(s.ack_through(10).unwrap(), 1);
        assert_eq!(s.depth(), 0);
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.next_seq(), 4);
    }

    #[test]
    fn seq_survives_reopen_and_compaction() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        for i in 0..5 {
            s.append(sl(1, &format!("s{i}"))).unwrap();
        }
        s.ack_through(5).unwrap();
        drop(s);
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(s.next_seq(), 6);
        s.compact().unwrap();
        drop(s);
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.next_seq(), 6);
        assert_eq!(s.append(sl(1, "x")).unwrap().seq, Some(6));
        drop(s);
        // Crash right after the append: nothing else happened, the seq is still spent.
        let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.next_seq(), 7);
        assert_eq!(ids(&s), vec!["x"]);
    }

    #[test]
    fn seq_not_reused_when_log_is_lost() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        for i in 0..3 {
            s.append(sl(1, &format!("s{i}"))).unwrap();
        }
        drop(s);
        fs::remove_file(d.path().join(LOG_FILE)).unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert!(s.next_seq() > 3);
        let n = s.append(sl(1, "y")).unwrap().seq.unwrap();
        assert!(n > 3);
        drop(s);
        let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.next_seq(), n + 1, "an intact log does not jump");
    }

    #[test]
    fn acks_are_durable() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        for i in 0..6 {
            s.append(sl(1, &format!("s{i}"))).unwrap();
        }
        s.ack_through(2).unwrap();
        s.ack(4).unwrap();
        drop(s);
        let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(seqs(&s), vec![3, 5, 6]);
        assert_eq!(ids(&s), vec!["s2", "s4", "s5"]);
        assert_eq!(s.recovery().discarded_bytes, 0);
    }

    /// The log of three appends, the records, and where each record's frame ends.
    fn three_record_log(dir: &Path) -> (Vec<u8>, Vec<StateLog>, Vec<usize>) {
        let mut s = Spool::open(dir, SpoolLimits::default()).unwrap();
        let mut ends = Vec::new();
        let logs: Vec<_> = (0..3)
            .map(|i| {
                let log = s.append(sl(1, &format!("s{i}"))).unwrap();
                ends.push(fs::metadata(dir.join(LOG_FILE)).unwrap().len() as usize);
                log
            })
            .collect();
        drop(s);
        let full = fs::read(dir.join(LOG_FILE)).unwrap();
        assert_eq!(ends.last(), Some(&full.len()));
        (full, logs, ends)
    }

    #[test]
    fn torn_tail_at_every_offset() {
        let d = tempfile::tempdir().unwrap();
        let (full, logs, ends) = three_record_log(d.path());
        let reserved = fs::read(d.path().join(RESERVE_FILE)).unwrap();
        for cut in 0..=full.len() {
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join(LOG_FILE), &full[..cut]).unwrap();
            fs::write(d.path().join(RESERVE_FILE), &reserved).unwrap();
            let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            let got = s.pending();
            // Every record written whole before the cut is kept; only the torn one goes.
            let whole = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(got[..], logs[..whole], "cut at {cut}");
            let next = s.append(sl(2, "after")).unwrap();
            assert!(next.seq.unwrap() > got.last().and_then(|l| l.seq).unwrap_or(0));
            drop(s);
            let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            assert_eq!(s.depth(), got.len() + 1, "cut at {cut}");
            assert_eq!(s.recovery().discarded_bytes, 0);
        }
    }

    /// What a power cut can leave where a file system committed a file's new size but not
    /// its data: the tail reads as zeros (tests/vm/run.sh, part powercut, cuts a real VM).
    /// The zeros are cut off like a torn tail, every whole record before them is kept, a
    /// record appended afterwards survives a reopen, and no sequence number is reused.
    #[test]
    fn zeroed_tail_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let (full, logs, ends) = three_record_log(d.path());
        let reserved = fs::read(d.path().join(RESERVE_FILE)).unwrap();
        let last = ends[1];
        // (bytes kept, zeros after them): past the end, and over the last record.
        for (keep, zeros) in
            [(full.len(), 1), (full.len(), 8), (full.len(), 4096), (last, full.len() - last), (last, 4096)]
        {
            let d = tempfile::tempdir().unwrap();
            let mut bytes = full[..keep].to_vec();
            bytes.resize(keep + zeros, 0);
            fs::write(d.path().join(LOG_FILE), &bytes).unwrap();
            fs::write(d.path().join(RESERVE_FILE), &reserved).unwrap();
            let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            let whole = ends.iter().filter(|e| **e <= keep).count();
            assert_eq!(s.pending()[..], logs[..whole], "{zeros} zeros after {keep} bytes");
            assert_eq!(s.recovery().discarded_bytes, zeros as u64);
            let seq = s.append(sl(2, "after")).unwrap().seq.unwrap();
            assert!(seq > 3, "seq {seq} reused");
            drop(s);
            let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            assert_eq!(s.depth(), whole + 1, "{zeros} zeros after {keep} bytes");
            assert_eq!(s.recovery().discarded_bytes, 0);
        }
        // Nothing but zeros (created and sized, no data written): moved aside, and the
        // reservation keeps the numbers already issued from coming back.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(LOG_FILE), vec![0u8; full.len()]).unwrap();
        fs::write(d.path().join(RESERVE_FILE), &reserved).unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.depth(), 0);
        assert!(s.recovery().moved_aside.is_some());
        assert!(s.append(sl(2, "after")).unwrap().seq.unwrap() > 3);
    }

    #[test]
    fn corruption_anywhere_never_panics() {
        let d = tempfile::tempdir().unwrap();
        let (full, logs, ends) = three_record_log(d.path());
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for i in 0..full.len() {
            let d = tempfile::tempdir().unwrap();
            let mut bad = full.clone();
            bad[i] ^= 1 << (rng.next() % 8);
            fs::write(d.path().join(LOG_FILE), &bad).unwrap();
            let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            let got = s.pending();
            // The records before the damaged frame are all kept; the damaged one and
            // what follows it go (the check catches every single-bit flip).
            let before = ends.iter().filter(|e| **e <= i).count();
            assert_eq!(got[..], logs[..before], "flip at {i}");
            s.append(sl(1, "after")).unwrap();
        }
    }

    #[test]
    fn garbage_file_gives_empty_spool() {
        let mut rng = Rng(42);
        for n in [1usize, 7, 8, 9, 100, 5000] {
            let d = tempfile::tempdir().unwrap();
            let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            fs::write(d.path().join(LOG_FILE), &garbage).unwrap();
            let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
            assert_eq!(s.depth(), 0);
            assert_eq!(s.recovery().discarded_bytes, n as u64);
            assert!(s.recovery().moved_aside.is_some());
            assert_eq!(fs::read(d.path().join(CORRUPT_FILE)).unwrap(), garbage);
            s.append(sl(1, "a")).unwrap();
            drop(s);
            assert_eq!(ids(&Spool::open(d.path(), SpoolLimits::default()).unwrap()), vec!["a"]);
        }
        // Garbage after a valid magic and records: the records stay, the garbage goes.
        let d = tempfile::tempdir().unwrap();
        let (mut full, logs, _) = three_record_log(d.path());
        full.extend((0..300).map(|_| rng.next() as u8));
        fs::write(d.path().join(LOG_FILE), &full).unwrap();
        let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.pending(), logs);
        assert_eq!(s.recovery().discarded_bytes, 300);
    }

    #[test]
    fn bounds_drop_superseded_versions_first() {
        let d = tempfile::tempdir().unwrap();
        let limits = SpoolLimits { max_records: 4, max_bytes: 1 << 20 };
        let mut s = Spool::open(d.path(), limits).unwrap();
        s.append(sl(2, "v2-a")).unwrap();
        s.append(sl(1, "v1-a")).unwrap();
        s.append(sl(2, "v2-b")).unwrap();
        s.append(sl(1, "v1-b")).unwrap();
        s.append(sl(2, "v2-c")).unwrap();
        assert_eq!(ids(&s), vec!["v2-a", "v2-b", "v1-b", "v2-c"]);
        s.append(sl(2, "v2-d")).unwrap();
        assert_eq!(ids(&s), vec!["v2-a", "v2-b", "v2-c", "v2-d"]);
        s.append(sl(2, "v2-e")).unwrap();
        assert_eq!(ids(&s), vec!["v2-b", "v2-c", "v2-d", "v2-e"]);
        assert_eq!(s.dropped(), 3);
        drop(s);
        let mut s = Spool::open(d.path(), limits).unwrap();
        assert_eq!(s.dropped(), 3);
        assert_eq!(ids(&s), vec!["v2-b", "v2-c", "v2-d", "v2-e"]);
        s.compact().unwrap();
        drop(s);
        let s = Spool::open(d.path(), limits).unwrap();
        assert_eq!(s.dropped(), 3);
        assert_eq!(s.next_seq(), 8);
    }

    #[test]
    fn byte_bound_drops_oldest() {
        let d = tempfile::tempdir().unwrap();
        let one = record_len(&StateLog { seq: Some(1), ..sl(1, "s0") });
        let limits = SpoolLimits { max_records: 100, max_bytes: one * 3 + one / 2 };
        let mut s = Spool::open(d.path(), limits).unwrap();
        for i in 0..5 {
            s.append(sl(1, &format!("s{i}"))).unwrap();
            assert!(s.bytes() <= limits.max_bytes);
        }
        assert_eq!(ids(&s), vec!["s2", "s3", "s4"]);
        assert_eq!(s.dropped(), 2);
    }

    #[test]
    fn oversize_record_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        let limits = SpoolLimits { max_records: 10, max_bytes: 4096 };
        let mut s = Spool::open(d.path(), limits).unwrap();
        s.append(sl(1, "small")).unwrap();
        let mut big = sl(1, "big");
        big.stdout = Some(format!("BEGIN{}END", "x\"\n\u{1}é".repeat(20_000)));
        big.comment = Some(format!("why{}", "c".repeat(10_000)));
        let got = s.append(big).unwrap();
        assert!(record_len(&got) <= 4096, "{}", record_len(&got));
        let out = got.stdout.as_deref().unwrap();
        assert!(out.starts_with("BEGIN") && out.ends_with("END") && out.contains("bytes truncated"));
        assert!(got.comment.as_deref().unwrap().starts_with("why"));
        assert_eq!(ids(&s), vec!["big"]);
        assert_eq!(s.dropped(), 1);
        drop(s);
        let s = Spool::open(d.path(), limits).unwrap();
        assert_eq!(s.pending(), vec![got]);
        // Only stdout too big; a None comment stays None.
        let mut l = sl(1, "a");
        l.comment = None;
        l.stdout = Some("y".repeat(100_000));
        fit_record(&mut l, 2000);
        assert!(record_len(&l) <= 2000);
        assert_eq!(l.comment, None);
        // A limit no record can meet: still stored, texts reduced.
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits { max_records: 10, max_bytes: 10 }).unwrap();
        let got = s.append(l).unwrap();
        assert_eq!(s.depth(), 1);
        assert!(got.stdout.unwrap().len() < 100);
    }

    #[test]
    fn compaction_keeps_pending() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        s.set_compact_threshold(4096);
        let mut kept = Vec::new();
        for i in 0..200u64 {
            let l = s.append(sl(1, &format!("s{i}"))).unwrap();
            if i % 10 == 0 {
                kept.push(l);
            } else {
                s.ack(i + 1).unwrap();
            }
            assert!(s.file_bytes() < 4096 * 2 + s.bytes() * 2 + 1024, "compacts as it goes");
        }
        assert_eq!(s.pending(), kept);
        let size = s.file_bytes();
        drop(s);
        assert_eq!(fs::metadata(d.path().join(LOG_FILE)).unwrap().len(), size);
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(s.pending(), kept);
        assert_eq!(s.next_seq(), 201);
        s.compact().unwrap();
        assert_eq!(
            s.file_bytes(),
            MAGIC.len() as u64 + s.bytes() + {
                let mut b = Vec::new();
                frame_into(&mut b, &EntryOut::Header { next_seq: 201, dropped: 0 }).unwrap();
                b.len() as u64
            }
        );
        assert!(!d.path().join(TMP_FILE).exists());
        drop(s);
        assert_eq!(Spool::open(d.path(), SpoolLimits::default()).unwrap().pending(), kept);
    }

    #[test]
    fn leftover_compaction_temp_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        s.append(sl(1, "a")).unwrap();
        drop(s);
        fs::write(d.path().join(TMP_FILE), b"half a compaction").unwrap();
        let s = Spool::open(d.path(), SpoolLimits::default()).unwrap();
        assert_eq!(ids(&s), vec!["a"]);
        assert!(!d.path().join(TMP_FILE).exists());
    }

    #[test]
    fn directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state").join("spool");
        let _s = Spool::open(&dir, SpoolLimits::default()).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(dir.join(LOG_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn error_names_path_and_operation() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let e = Spool::open(&file.join("spool"), SpoolLimits::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("create directory") && text.contains("not-a-dir"), "{text}");
    }

    #[test]
    fn random_operations_match_a_model() {
        let d = tempfile::tempdir().unwrap();
        let limits = SpoolLimits { max_records: 20, max_bytes: 1 << 20 };
        let mut s = Spool::open(d.path(), limits).unwrap();
        s.set_compact_threshold(2048);
        let mut model: BTreeMap<u64, String> = BTreeMap::new();
        let mut rng = Rng(7);
        let mut last = 0;
        for i in 0..2000 {
            match rng.next() % 10 {
                0..=4 => {
                    let l = s.append(sl(1, &format!("r{i}"))).unwrap();
                    let seq = l.seq.unwrap();
                    assert!(seq > last);
                    last = seq;
                    model.insert(seq, l.state_id);
                    while model.len() > 20 {
                        model.pop_first();
                    }
                }
                5 | 6 => {
                    if let Some(&k) = model.keys().nth((rng.next() % 3) as usize) {
                        s.ack(k).unwrap();
                        model.remove(&k);
                    }
                }
                7 => {
                    let k = last.saturating_sub(rng.next() % 10);
                    s.ack_through(k).unwrap();
                    model = model.split_off(&(k + 1));
                }
                _ => {
                    drop(s);
                    s = Spool::open(d.path(), limits).unwrap();
                    s.set_compact_threshold(2048);
                }
            }
            assert_eq!(ids(&s), model.values().cloned().collect::<Vec<_>>());
        }
    }
}
