//! Log bundles agents send in answer to a `FetchLogs` (capability `fetch-logs`): the
//! `Logs` parts of each connection put back together ([`crate::logframes::Reassembly`],
//! which checks order and the whole bundle's sha256) and stored as
//! `LOGS_DIR/INSTANCE.REQUEST.log.gz`, readable by the backend's user only.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::logframes::{LogFramesError, Reassembly, Received};

/// The largest bundle the backend takes from one agent (an agent's own cap is 16 MiB of
/// text, gzipped far smaller).
const MAX_BUNDLE: usize = 64 << 20;

/// What one `Logs` frame came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A part of a bundle still coming.
    Partial,
    /// The whole bundle, stored: the event to record.
    Stored(Value),
    /// The agent uploaded the bundle itself, or refused: the event to record.
    Other(&'static str, Value),
    /// A broken sequence of parts or a bundle that could not be written.
    Failed(String),
}

#[derive(Debug)]
pub(crate) struct LogStore {
    dir: PathBuf,
    /// Per connection, the bundle being received and what its part 0 said.
    receiving: BTreeMap<u64, (Reassembly, Value)>,
}

impl LogStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, receiving: BTreeMap::new() }
    }

    pub fn forget(&mut self, conn: u64) {
        self.receiving.remove(&conn);
    }

    /// Takes one `Logs` frame of `instance`'s connection `conn`.
    pub fn accept(&mut self, conn: u64, instance: &str, frame: &Value) -> Outcome {
        let (reassembly, head) =
            self.receiving.entry(conn).or_insert_with(|| (Reassembly::new(MAX_BUNDLE), Value::Null));
        if frame.get("part").and_then(Value::as_u64) == Some(0) {
            *head = json!({"bound": frame.get("bound"), "cut": frame.get("cut"), "parts": frame.get("parts")});
        }
        let head = head.clone();
        match reassembly.accept(frame) {
            Ok(Received::Partial { .. }) => Outcome::Partial,
            Ok(Received::Complete { request, sha256, bundle }) => {
                let path = self.dir.join(format!("{instance}.{}.log.gz", file_part(&request)));
                match write_private(&path, &bundle) {
                    Ok(()) => Outcome::Stored(json!({"conn": conn, "instance_id": instance, "request": request,
                        "sha256": sha256, "bytes": bundle.len(), "file": path, "parts": head["parts"], "bound": head["bound"], "cut": head["cut"]})),
                    Err(e) => Outcome::Failed(format!("{}: cannot write: {e}", path.display())),
                }
            }
            Ok(Received::Uploaded { request, sha256, bytes }) => Outcome::Other(
                "logs_uploaded",
                json!({"conn": conn, "instance_id": instance, "request": request, "sha256": sha256, "bytes": bytes}),
            ),
            Err(LogFramesError::Refused { request, reason }) => Outcome::Other(
                "logs_refused",
                json!({"conn": conn, "instance_id": instance, "request": request, "reason": reason}),
            ),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// The request id as part of a file name (the backend chose it, but an agent echoes it).
fn file_part(request: &str) -> String {
    if !request.is_empty() && super::recipes::safe_name(request) && request.len() <= 100 {
        request.to_string()
    } else {
        format!("r-{}", &super::recipes::sha256_hex(request.as_bytes())[..16])
    }
}

/// Written whole (a temporary file renamed into place), mode 0600: logs may hold what the
/// states printed.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("gz.part");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
