//! Append-only JSON-lines files (the statelog and the event log), rotated by size, and
//! their timestamps.

use crate::timefmt::rfc3339;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use serde_json::{Map, Value};

use super::hub::{Out, Queue};
use super::BackendError;

/// When a journal is rotated: once appending a line would take it past `max_bytes`, `FILE`
/// becomes `FILE.1` (`FILE.1` becomes `FILE.2`, …, up to `FILE.KEEP`; the oldest is
/// dropped) and a new `FILE` is started. A line is never split across files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, keep: 4 }
    }
}

/// `FILE.N`.
pub(crate) fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// One JSON object per line, each line written whole and flushed.
#[derive(Debug)]
pub(crate) struct JsonLines {
    path: PathBuf,
    /// Shared with [`DurableAcks`], which syncs it off the hub's lock.
    file: Arc<File>,
    len: u64,
    rotation: Rotation,
}

impl JsonLines {
    /// Opens `path` for appending, creating it. A torn last line (a crash mid-write) is
    /// ended first, so that the next record starts on a line of its own.
    pub fn open(path: &Path, rotation: Rotation) -> Result<Self, BackendError> {
        let err = |source| BackendError::io("cannot open for appending", path, source);
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path).map_err(err)?;
        let mut len = file.metadata().map_err(err)?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).and_then(|_| file.read_exact(&mut last)).map_err(err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(err)?;
                len += 1;
            }
        }
        Ok(Self { path: path.to_path_buf(), file: Arc::new(file), len, rotation })
    }

    /// The file lines are appended to now (another one after a rotation), to sync.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Appends `v` as one line; false (logged) when it could not be written.
    pub fn append(&mut self, v: &Value) -> bool {
        let mut line = v.to_string();
        line.push('\n');
        if self.len > 0 && self.len + line.len() as u64 > self.rotation.max_bytes {
            if let Err(e) = self.rotate() {
                // Better a journal over its size than a lost record.
                tracing::error!("{}: cannot rotate: {e}", self.path.display());
            }
        }
        // One write call per line, so a concurrent reader never sees half a line joined
        // to the next one.
        let mut file = &*self.file;
        match file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            Ok(()) => {
                self.len += line.len() as u64;
                true
            }
            Err(e) => {
                tracing::error!("{}: cannot append: {e}", self.path.display());
                false
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        // Lines written and not yet acknowledged may wait on the old file's sync: make it
        // durable before its name changes, so the rotation itself loses nothing.
        self.file.sync_data()?;
        let keep = self.rotation.keep;
        if keep == 0 {
            self.file.set_len(0)?;
        } else {
            for n in (1..keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = Arc::new(OpenOptions::new().create(true).read(true).append(true).open(&self.path)?);
        }
        self.len = 0;
        Ok(())
    }

    /// The lines of the rotated files, oldest first, then those of `path`.
    pub fn read_all_rotated(path: &Path, rotation: Rotation) -> Result<Vec<Map<String, Value>>, BackendError> {
        let mut out = Vec::new();
        for n in (1..=rotation.keep).rev() {
            out.extend(Self::read_all(&rotated(path, n))?);
        }
        out.extend(Self::read_all(path)?);
        Ok(out)
    }

    /// Every object line of `path` (a missing file has none). Unreadable lines are
    /// logged and skipped: a torn last line after a crash must not stop the backend.
    pub fn read_all(path: &Path) -> Result<Vec<Map<String, Value>>, BackendError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(BackendError::io("cannot read", path, source)),
        };
        let mut out = Vec::new();
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| BackendError::io("cannot read", path, source))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(o)) => out.push(o),
                _ => tracing::warn!("{}:{}: not a JSON object, skipped", path.display(), n + 1),
            }
        }
        Ok(out)
    }
}

/// An acknowledgement to send once the lines written before it are durable.
#[derive(Debug)]
pub(crate) struct PendingAck {
    /// The file the acknowledged line was written to.
    pub file: Arc<File>,
    pub queue: Queue,
    pub frame: Arc<str>,
}

/// Sends acknowledgements only once what they acknowledge is on disk: one thread syncs
/// the statelog for every acknowledgement queued meanwhile (group commit), off the hub's
/// lock, then queues them. A sync that fails sends none: the agent keeps its records and
/// resends them, and a resent record is acknowledged through here again.
///
/// An acknowledgement bypasses the queue's byte bound: it answers one frame the agent
/// sent, and those are read at a bounded rate.
#[derive(Debug, Clone)]
pub(crate) struct DurableAcks {
    tx: mpsc::Sender<PendingAck>,
}

/// Most acknowledgements one sync answers: bounds the wait of the first of a batch.
const MAX_ACK_BATCH: usize = 4096;

impl DurableAcks {
    pub fn start(path: &Path) -> Result<Self, BackendError> {
        let (tx, rx) = mpsc::channel::<PendingAck>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("statelog-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_ACK_BATCH {
                        match rx.try_recv() {
                            Ok(ack) => batch.push(ack),
                            Err(_) => break,
                        }
                    }
                    // Each file once (two after a rotation), in the order they were used.
                    let mut synced: Vec<(Arc<File>, bool)> = Vec::new();
                    for ack in batch {
                        let ok = match synced.iter().find(|(f, _)| Arc::ptr_eq(f, &ack.file)) {
                            Some((_, ok)) => *ok,
                            None => {
                                let ok = match ack.file.sync_data() {
                                    Ok(()) => true,
                                    Err(e) => {
                                        tracing::error!("{shown}: cannot sync: {e}; nothing acknowledged");
                                        false
                                    }
                                };
                                synced.push((ack.file.clone(), ok));
                                ok
                            }
                        };
                        if ok {
                            ack.queue.bytes.fetch_add(ack.frame.len(), Ordering::AcqRel);
                            // A closed queue: the connection is gone, the agent resends.
                            let _ = ack.queue.tx.send(Out::Text(ack.frame));
                        }
                    }
                }
            })
            .map_err(|e| BackendError::io("cannot start the statelog sync thread", path, e))?;
        Ok(Self { tx })
    }

    /// Queues `ack`; it is sent once its file is synced.
    pub fn submit(&self, ack: PendingAck) {
        // The thread ends only with the last handle.
        let _ = self.tx.send(ack);
    }
}

/// The optional event log: each record is `{"at": RFC3339, "event": NAME, ...fields}`.
#[derive(Debug, Default)]
pub(crate) struct Events(Option<JsonLines>);

impl Events {
    pub fn open(path: Option<&Path>, rotation: Rotation) -> Result<Self, BackendError> {
        Ok(Self(path.map(|p| JsonLines::open(p, rotation)).transpose()?))
    }

    pub fn record(&mut self, event: &str, fields: Value) {
        let Some(log) = &mut self.0 else { return };
        let mut o = Map::new();
        o.insert("at".into(), Value::String(rfc3339(SystemTime::now())));
        o.insert("event".into(), Value::String(event.into()));
        if let Value::Object(fields) = fields {
            o.extend(fields);
        }
        log.append(&Value::Object(o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = JsonLines::open(&path, Rotation::default()).unwrap();
        log.append(&serde_json::json!({"a": 1}));
        log.append(&serde_json::json!({"b": "x\ny"}));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"torn\":").unwrap();
        let all = JsonLines::read_all(&path).unwrap();
        assert_eq!(all.len(), 2);
        JsonLines::open(&path, Rotation::default()).unwrap().append(&serde_json::json!({"c": 3}));
        let all = JsonLines::read_all(&path).unwrap();
        assert_eq!((all.len(), &all[2]["c"]), (3, &serde_json::json!(3)));
        assert_eq!(all[1]["b"], "x\ny");
        assert!(JsonLines::read_all(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn rotated_by_size_keeping_whole_lines_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rotation = Rotation { max_bytes: 40, keep: 2 };
        let mut log = JsonLines::open(&path, rotation).unwrap();
        for n in 0..10 {
            // Each line is 11 bytes: three per file, the first three dropped.
            log.append(&serde_json::json!({"n": 1000 + n}));
        }
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= 40, "{}: {len}", p.display());
        }
        assert!(!rotated(&path, 3).exists());
        let ns: Vec<u64> = JsonLines::read_all_rotated(&path, rotation)
            .unwrap()
            .iter()
            .map(|o| o["n"].as_u64().unwrap() - 1000)
            .collect();
        assert_eq!(ns, vec![3, 4, 5, 6, 7, 8, 9]);
        // Reopened, it knows its size: two more lines fit, the third rotates.
        let mut log = JsonLines::open(&path, rotation).unwrap();
        for n in 10..13 {
            log.append(&serde_json::json!({"n": 1000 + n}));
        }
        assert_eq!(JsonLines::read_all(&path).unwrap().len(), 1);
        assert_eq!(JsonLines::read_all(&rotated(&path, 1)).unwrap().len(), 3);
    }
}
