//! `Logs` frames: a log bundle ([`crate::logbundle`]) carried over the link in parts,
//! each frame under the link's frame limit, and put back together on the other side.
//!
//! Every part carries the sha256 of the whole bundle so the receiver checks what it
//! stored, not only that each frame arrived; parts are sent in order on one WebSocket,
//! so the receiver takes them only in order and a gap or a repeat is an error, not a
//! silently broken bundle.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogFramesError {
    #[error("a frame limit of {0} bytes leaves no room for a Logs frame's data")]
    FrameTooSmall(usize),
    #[error("Logs frame: {0}")]
    Malformed(String),
    #[error("Logs frame {got} of request {request:?} out of order: expected part {expected}")]
    OutOfOrder { request: String, expected: u64, got: u64 },
    #[error("Logs frames of request {request:?} disagree on {what}")]
    Inconsistent { request: String, what: &'static str },
    #[error("the reassembled bundle of request {request:?} has sha256 {got}, its frames announced {announced}")]
    Checksum { request: String, announced: String, got: String },
    #[error("the bundle of request {request:?} exceeds the {limit} bytes this receiver accepts")]
    TooLarge { request: String, limit: usize },
    #[error("the agent could not send logs for request {request:?}: {reason}")]
    Refused { request: String, reason: String },
}

/// The frames that carry `bundle` for `request`, each serialised under `max_frame` bytes.
pub fn split(bundle: &[u8], request: &str, max_frame: usize) -> Result<Vec<Value>, LogFramesError> {
    split_with(bundle, request, max_frame, &json!({}))
}

/// As [`split`], the fields of `extra` (an object) added to the first frame.
fn split_with(bundle: &[u8], request: &str, max_frame: usize, extra: &Value) -> Result<Vec<Value>, LogFramesError> {
    let sha256 = hex::encode(Sha256::digest(bundle));
    // The envelope with the widest numbers any part can carry, and the extra fields: what
    // is left is data.
    let envelope = json!({"code": "Logs", "request": request, "part": u64::MAX, "parts": u64::MAX,
        "sha256": sha256, "data": "", "extra": extra})
    .to_string()
    .len();
    // Base64 turns every 3 bytes into 4 characters (no escaping needed in JSON).
    let raw = max_frame.saturating_sub(envelope) / 4 * 3;
    if raw == 0 {
        return Err(LogFramesError::FrameTooSmall(max_frame));
    }
    // An empty bundle is still one frame, so the receiver learns it is empty.
    let chunks: Vec<&[u8]> = if bundle.is_empty() { vec![&[][..]] } else { bundle.chunks(raw).collect() };
    let parts = chunks.len();
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut f = json!({"code": "Logs", "request": request, "part": i, "parts": parts, "sha256": sha256,
                "data": B64.encode(c)});
            if let (0, Some(extra)) = (i, extra.as_object()) {
                for (k, v) in extra {
                    f[k] = v.clone();
                }
            }
            f
        })
        .collect())
}

/// A bundle built for a request: the gzipped bytes and what part 0 says about them.
#[derive(Debug, Clone)]
pub struct Built {
    pub bundle: Vec<u8>,
    /// Bytes of log text allowed: the smaller of the request's `max_bytes` and the cap.
    pub bound: u64,
    /// Per part cut by the bound: the bytes of older entries left out.
    pub cut: Vec<(crate::logbundle::Part, u64)>,
}

/// The bundle `req` asks for, from `source` (blocking: run it off the async runtime),
/// bounded by the smaller of the request's `max_bytes` and the agent's own `cap`.
pub fn build(
    source: &dyn crate::logbundle::LogSource,
    req: &crate::protocol::FetchLogs,
    cap: u64,
) -> Result<Built, crate::logbundle::LogBundleError> {
    let bound = req.max_bytes.map_or(cap, |m| m.min(cap));
    let mut bundle = Vec::new();
    let summary = crate::logbundle::write_bundle(source, &req.what, req.since, bound, &mut bundle)?;
    Ok(Built { bundle, bound, cut: summary.cut })
}

/// `built` as `Logs` frames under `max_frame`; the first frame says the bound and, per
/// part, the bytes of older entries it left out.
pub fn frames(built: &Built, request: &str, max_frame: usize) -> Vec<Value> {
    let cut: Vec<Value> = built.cut.iter().map(|(p, bytes)| json!({"part": p.name(), "bytes": bytes})).collect();
    let extra = json!({"bound": built.bound, "cut": cut});
    split_with(&built.bundle, request, max_frame, &extra).unwrap_or_else(|e| vec![refusal(request, &e.to_string())])
}

/// The agent's whole answer to `req`, built from `source` (blocking: run it off the
/// link's task): [`build`] then [`frames`]; a bundle that cannot be built is a refusal
/// naming why.
pub fn answer(
    source: &dyn crate::logbundle::LogSource,
    req: &crate::protocol::FetchLogs,
    cap: u64,
    max_frame: usize,
) -> Vec<Value> {
    match build(source, req, cap) {
        Ok(built) => frames(&built, &req.request, max_frame),
        Err(e) => vec![refusal(&req.request, &e.to_string())],
    }
}

/// Serves `FetchLogs` for the daemon: builds the bundle off the async runtime and sends
/// it back in frames, or PUTs it to the request's `upload_url`.
pub struct LogService {
    source: std::sync::Arc<dyn crate::logbundle::LogSource + Send + Sync>,
    /// The most log text the agent gives, whatever a backend asks.
    cap: u64,
    uploader: crate::logupload::Uploader,
}

impl LogService {
    pub fn new(
        source: std::sync::Arc<dyn crate::logbundle::LogSource + Send + Sync>,
        cap: u64,
        uploader: crate::logupload::Uploader,
    ) -> Self {
        Self { source, cap, uploader }
    }

    /// The frames answering `req` (bundle parts, an upload receipt, or one refusal).
    pub async fn serve(&self, req: crate::protocol::FetchLogs, max_frame: usize) -> Vec<Value> {
        let (source, cap, r) = (self.source.clone(), self.cap, req.clone());
        // Reading the journal and gzipping take a while: never on the link's task.
        let built = match tokio::task::spawn_blocking(move || build(source.as_ref(), &r, cap)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return vec![refusal(&req.request, &e.to_string())],
            Err(e) => return vec![refusal(&req.request, &format!("building the bundle failed: {e}"))],
        };
        let Some(url) = &req.upload_url else { return frames(&built, &req.request, max_frame) };
        match self.uploader.put(url, built.bundle.clone()).await {
            Ok(()) => {
                let sha256 = hex::encode(Sha256::digest(&built.bundle));
                vec![uploaded(&req.request, &sha256, built.bundle.len() as u64)]
            }
            Err(e) => vec![refusal(&req.request, &e.to_string())],
        }
    }
}

/// The answer to a request the agent will not or cannot serve (one is already running,
/// the bundle could not be built, the upload failed).
pub fn refusal(request: &str, reason: &str) -> Value {
    json!({"code": "Logs", "request": request, "error": reason})
}

/// The answer after the bundle was PUT to the request's `upload_url`.
pub fn uploaded(request: &str, sha256: &str, bytes: u64) -> Value {
    json!({"code": "Logs", "request": request, "sha256": sha256, "uploaded": true, "bytes": bytes})
}

/// What a receiver gets out of one `Logs` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// More parts are to come.
    Partial { request: String, part: u64, parts: u64 },
    /// The last part arrived: the whole bundle, its sha256 checked.
    Complete { request: String, sha256: String, bundle: Vec<u8> },
    /// The agent uploaded the bundle itself.
    Uploaded { request: String, sha256: String, bytes: u64 },
}

/// Puts the parts of one request back together (one request at a time, as the agent
/// serves them).
#[derive(Debug)]
pub struct Reassembly {
    limit: usize,
    current: Option<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    request: String,
    parts: u64,
    next: u64,
    sha256: String,
    data: Vec<u8>,
}

impl Reassembly {
    /// A receiver that refuses bundles larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, current: None }
    }

    /// Takes one `Logs` frame. An error drops the request in flight: its later parts
    /// are errors too (out of order), never a bundle missing a piece.
    pub fn accept(&mut self, frame: &Value) -> Result<Received, LogFramesError> {
        let result = self.accept_inner(frame);
        if result.is_err() {
            self.current = None;
        }
        result
    }

    fn accept_inner(&mut self, frame: &Value) -> Result<Received, LogFramesError> {
        let bad = |why: &str| LogFramesError::Malformed(why.to_string());
        let o = frame.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let request = o.get("request").and_then(Value::as_str).unwrap_or_default().to_string();
        if let Some(reason) = o.get("error").and_then(Value::as_str) {
            return Err(LogFramesError::Refused { request, reason: reason.to_string() });
        }
        let sha256 = o.get("sha256").and_then(Value::as_str).ok_or_else(|| bad("no \"sha256\""))?.to_string();
        if o.get("uploaded").and_then(Value::as_bool) == Some(true) {
            let bytes = o.get("bytes").and_then(Value::as_u64).ok_or_else(|| bad("no \"bytes\""))?;
            return Ok(Received::Uploaded { request, sha256, bytes });
        }
        let part = o.get("part").and_then(Value::as_u64).ok_or_else(|| bad("\"part\" is not a number"))?;
        let parts = o.get("parts").and_then(Value::as_u64).ok_or_else(|| bad("\"parts\" is not a number"))?;
        if parts == 0 || part >= parts {
            return Err(bad(&format!("part {part} of {parts}")));
        }
        let data = o.get("data").and_then(Value::as_str).ok_or_else(|| bad("no \"data\""))?;
        let data = B64.decode(data).map_err(|e| bad(&format!("\"data\" is not base64: {e}")))?;

        if part == 0 {
            // A new request replaces one whose end never came (the agent gave up on it).
            self.current =
                Some(InFlight { request: request.clone(), parts, next: 0, sha256: sha256.clone(), data: Vec::new() });
        }
        let cur = self.current.as_mut().ok_or(LogFramesError::OutOfOrder {
            request: request.clone(),
            expected: 0,
            got: part,
        })?;
        if cur.request != request {
            return Err(LogFramesError::Inconsistent { request, what: "the request" });
        }
        if cur.next != part {
            return Err(LogFramesError::OutOfOrder { request, expected: cur.next, got: part });
        }
        if cur.parts != parts {
            return Err(LogFramesError::Inconsistent { request, what: "the number of parts" });
        }
        if cur.sha256 != sha256 {
            return Err(LogFramesError::Inconsistent { request, what: "the sha256" });
        }
        if cur.data.len() + data.len() > self.limit {
            return Err(LogFramesError::TooLarge { request, limit: self.limit });
        }
        cur.data.extend_from_slice(&data);
        cur.next += 1;
        if cur.next < cur.parts {
            return Ok(Received::Partial { request, part, parts });
        }
        let done = self.current.take().expect("in flight");
        let got = hex::encode(Sha256::digest(&done.data));
        if got != done.sha256 {
            return Err(LogFramesError::Checksum { request, announced: done.sha256, got });
        }
        Ok(Received::Complete { request, sha256: got, bundle: done.data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn reassemble(frames: &[Value], limit: usize) -> Result<Received, LogFramesError> {
        let mut r = Reassembly::new(limit);
        let mut last = None;
        for f in frames {
            last = Some(r.accept(f)?);
        }
        Ok(last.expect("at least one frame"))
    }

    #[test]
    fn every_frame_is_under_the_limit_and_the_parts_give_back_the_bundle() {
        for (size, limit) in [(0, 300), (1, 300), (5000, 300), (100_000, 4096), (3 * 1024, 1024)] {
            let b = bundle(size);
            let frames = split(&b, "r-1", limit).unwrap();
            for f in &frames {
                assert!(f.to_string().len() <= limit, "{size} bytes at {limit}: {} > {limit}", f.to_string().len());
            }
            if size > 0 {
                assert!(frames.len() > 1 || size < limit, "{size} bytes at {limit}: {} frames", frames.len());
            }
            match reassemble(&frames, usize::MAX).unwrap() {
                Received::Complete { request, sha256, bundle } => {
                    assert_eq!(request, "r-1");
                    assert_eq!(bundle, b);
                    assert_eq!(sha256, hex::encode(Sha256::digest(&b)));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_limit_too_small_for_any_data_is_an_error() {
        assert_eq!(split(b"x", "r", 100), Err(LogFramesError::FrameTooSmall(100)));
    }

    #[test]
    fn a_missing_or_repeated_part_is_an_error_not_a_short_bundle() {
        let frames = split(&bundle(5000), "r", 400).unwrap();
        assert!(frames.len() > 3);
        let mut gap = frames.clone();
        gap.remove(2);
        assert!(matches!(reassemble(&gap, usize::MAX), Err(LogFramesError::OutOfOrder { expected: 2, got: 3, .. })));
        let mut repeat = frames.clone();
        repeat.insert(2, frames[1].clone());
        assert!(matches!(reassemble(&repeat, usize::MAX), Err(LogFramesError::OutOfOrder { expected: 2, got: 1, .. })));
        // Without its first part a request is never taken up.
        assert!(matches!(reassemble(&frames[1..], usize::MAX), Err(LogFramesError::OutOfOrder { expected: 0, .. })));
    }

    #[test]
    fn a_changed_part_fails_the_checksum() {
        let mut frames = split(&bundle(2000), "r", 400).unwrap();
        let last = frames.len() - 1;
        frames[last]["data"] = json!(B64.encode(b"not what was sent"));
        assert!(matches!(reassemble(&frames, usize::MAX), Err(LogFramesError::Checksum { .. })));
    }

    #[test]
    fn frames_of_another_request_or_another_bundle_are_refused() {
        let a = split(&bundle(2000), "a", 400).unwrap();
        let b = split(&bundle(2001), "b", 400).unwrap();
        let mut mixed = a.clone();
        mixed[1] = b[1].clone();
        assert!(matches!(
            reassemble(&mixed, usize::MAX),
            Err(LogFramesError::Inconsistent { what: "the request", .. })
        ));
        let mut sha = a.clone();
        sha[1]["sha256"] = b[1]["sha256"].clone();
        assert!(matches!(reassemble(&sha, usize::MAX), Err(LogFramesError::Inconsistent { what: "the sha256", .. })));
    }

    #[test]
    fn the_receiver_bounds_what_it_holds() {
        let frames = split(&bundle(5000), "r", 400).unwrap();
        assert!(matches!(reassemble(&frames, 4999), Err(LogFramesError::TooLarge { limit: 4999, .. })));
        assert!(matches!(reassemble(&frames, 5000), Ok(Received::Complete { .. })));
    }

    fn cron_host(agent_lines: usize) -> (tempfile::TempDir, crate::logbundle::LogFiles) {
        let dir = tempfile::tempdir().unwrap();
        let (agent_dir, root_dir) = (dir.path().join("agent"), dir.path().join("root"));
        std::fs::create_dir_all(&agent_dir).unwrap();
        std::fs::create_dir_all(&root_dir).unwrap();
        let agent: String = (0..agent_lines).map(|i| format!("agent entry {i}\n")).collect();
        std::fs::write(agent_dir.join("opsagent.log"), agent).unwrap();
        std::fs::write(root_dir.join("opsagent-helper.log"), "helper entry 0\n").unwrap();
        (dir, crate::logbundle::LogFiles { agent_dir, root_dir })
    }

    fn request(max_bytes: Option<u64>) -> crate::protocol::FetchLogs {
        use crate::logbundle::{Part, Since};
        crate::protocol::FetchLogs {
            request: "q".into(),
            since: Since(0),
            what: vec![Part::Agent, Part::Helper],
            max_bytes,
            upload_url: None,
        }
    }

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(b), &mut s).unwrap();
        s
    }

    #[test]
    fn the_answer_carries_the_entries_of_each_part() {
        let (_dir, files) = cron_host(10);
        let frames = answer(&files, &request(None), 1 << 20, 1024);
        assert_eq!(frames[0]["bound"], json!(1 << 20));
        assert_eq!(frames[0]["cut"], json!([]));
        let Received::Complete { bundle, .. } = reassemble(&frames, usize::MAX).unwrap() else { panic!() };
        let text = gunzip(&bundle);
        assert!(text.contains("agent entry 0\n") && text.contains("agent entry 9\n"), "{text}");
        assert!(text.contains("helper entry 0\n"), "{text}");
    }

    #[test]
    fn an_oversized_request_is_cut_to_the_agents_cap_and_says_so() {
        let (_dir, files) = cron_host(20_000);
        // The backend asks for far more than the agent gives: the agent's cap wins.
        let frames = answer(&files, &request(Some(1 << 30)), 4096, 1024);
        assert_eq!(frames[0]["bound"], json!(4096));
        assert!(frames.iter().all(|f| f.to_string().len() <= 1024), "{frames:?}");
        let cut = frames[0]["cut"].as_array().unwrap();
        assert_eq!(cut.len(), 1, "{cut:?}");
        assert_eq!(cut[0]["part"], json!("agent"));
        let Received::Complete { bundle, .. } = reassemble(&frames, usize::MAX).unwrap() else { panic!() };
        let text = gunzip(&bundle);
        assert!(text.contains("==== cut:"), "{text}");
        assert!(text.contains("agent entry 19999\n") && !text.contains("agent entry 0\n"));
        assert!(text.len() < 4096 + 512, "{} bytes of text", text.len());
        // A smaller max_bytes from the backend wins over the cap.
        assert_eq!(answer(&files, &request(Some(1000)), 4096, 1024)[0]["bound"], json!(1000));
    }

    #[test]
    fn refusals_and_uploads_are_read_back() {
        assert_eq!(
            reassemble(&[refusal("r", "a request is already running")], 10),
            Err(LogFramesError::Refused { request: "r".into(), reason: "a request is already running".into() })
        );
        assert_eq!(
            reassemble(&[uploaded("r", "ab", 42)], 10),
            Ok(Received::Uploaded { request: "r".into(), sha256: "ab".into(), bytes: 42 })
        );
    }
}
