//! Append-only JSON-lines files (the statelog and the event log) and their timestamps.

use crate::timefmt::rfc3339;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use super::BackendError;

/// One JSON object per line, each line written whole and flushed.
#[derive(Debug)]
pub(crate) struct JsonLines {
    path: PathBuf,
    file: File,
}

impl JsonLines {
    /// Opens `path` for appending, creating it. A torn last line (a crash mid-write) is
    /// ended first, so that the next record starts on a line of its own.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let err = |source| BackendError::io("cannot open for appending", path, source);
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).and_then(|_| file.read_exact(&mut last)).map_err(err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(err)?;
            }
        }
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn append(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        // One write call per line, so a concurrent reader never sees half a line joined
        // to the next one.
        if let Err(e) = self.file.write_all(line.as_bytes()).and_then(|()| self.file.flush()) {
            tracing::error!("{}: cannot append: {e}", self.path.display());
        }
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

/// The optional event log: each record is `{"at": RFC3339, "event": NAME, ...fields}`.
#[derive(Debug, Default)]
pub(crate) struct Events(Option<JsonLines>);

impl Events {
    pub fn open(path: Option<&Path>) -> Result<Self, BackendError> {
        Ok(Self(path.map(JsonLines::open).transpose()?))
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
        let mut log = JsonLines::open(&path).unwrap();
        log.append(&serde_json::json!({"a": 1}));
        log.append(&serde_json::json!({"b": "x\ny"}));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"torn\":").unwrap();
        let all = JsonLines::read_all(&path).unwrap();
        assert_eq!(all.len(), 2);
        JsonLines::open(&path).unwrap().append(&serde_json::json!({"c": 3}));
        let all = JsonLines::read_all(&path).unwrap();
        assert_eq!((all.len(), &all[2]["c"]), (3, &serde_json::json!(3)));
        assert_eq!(all[1]["b"], "x\ny");
        assert!(JsonLines::read_all(&dir.path().join("none")).unwrap().is_empty());
    }
}
