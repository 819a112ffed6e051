//! Log bundles: the agent's, the helper's, the upgrades' and the states' log entries
//! since a given time, bounded in size and gzipped, for an operator attaching logs to a
//! ticket (`opsagent logs --bundle FILE`).
//!
//! Where the entries come from is behind [`LogSource`]: the journal on systemd hosts
//! ([`Journal`], through `journalctl`), the log files the cron supervisor keeps on hosts
//! without systemd ([`LogFiles`]). The bound keeps the newest entries of each part (the
//! ones a ticket is about) and the bundle says what it left out.

/// Log text a bundle holds at most, before compression: `opsagent logs --bundle`
/// unless `--max-bytes` says, and every `FetchLogs` answer whatever the backend asks.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// One kind of log a bundle can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// The daemon (`opsagent.service`).
    Agent,
    /// The root helper (`opsagent-helper.service`).
    Helper,
    /// The installer of upgrades (`opsagent-upgrade.service`).
    Upgrade,
    /// The commands of states run as transient units (`opsagent-state-*.service`).
    States,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Agent, Part::Helper, Part::Upgrade, Part::States];

    pub fn name(self) -> &'static str {
        match self {
            Part::Agent => "agent",
            Part::Helper => "helper",
            Part::Upgrade => "upgrade",
            Part::States => "states",
        }
    }

    pub fn parse(s: &str) -> Result<Self, LogBundleError> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| LogBundleError::UnknownPart(s.to_string()))
    }

    /// The systemd unit (pattern) whose journal entries this part is.
    fn unit(self) -> &'static str {
        match self {
            Part::Agent => "opsagent.service",
            Part::Helper => "opsagent-helper.service",
            Part::Upgrade => "opsagent-upgrade.service",
            Part::States => "opsagent-state-*.service",
        }
    }
}

/// From when on: seconds since the epoch (a bundle is about the recent past).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since(pub u64);

impl Since {
    /// `30m`, `2h`, `1d`, `45s` before `now`, or `@EPOCH` seconds.
    pub fn parse(s: &str, now_unix: u64) -> Result<Self, LogBundleError> {
        let bad = || LogBundleError::BadSince(s.to_string());
        if let Some(epoch) = s.strip_prefix('@') {
            return epoch.parse().map(Since).map_err(|_| bad());
        }
        let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        Ok(Since(now_unix.saturating_sub(n.saturating_mul(secs))))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogBundleError {
    #[error("unknown log part {0:?} (agent, helper, upgrade, states)")]
    UnknownPart(String),
    #[error("--since {0:?}: give a duration before now (45s, 30m, 2h, 1d) or @SECONDS since the epoch")]
    BadSince(String),
    #[error("cannot read the {part} log: {reason}")]
    Read { part: &'static str, reason: String },
    #[error("cannot write the bundle: {0}")]
    Write(#[from] std::io::Error),
}

/// Where the entries of one part come from.
pub trait LogSource {
    /// The part's entries since `since`, oldest first, as text lines.
    fn open(&self, part: Part, since: Since) -> Result<Box<dyn Read>, LogBundleError>;
}

/// The journal, read with `journalctl` (its path injectable for tests).
pub struct Journal {
    pub journalctl: PathBuf,
}

impl Default for Journal {
    fn default() -> Self {
        Self { journalctl: PathBuf::from("journalctl") }
    }
}

impl LogSource for Journal {
    fn open(&self, part: Part, since: Since) -> Result<Box<dyn Read>, LogBundleError> {
        let read_err = |reason: String| LogBundleError::Read { part: part.name(), reason };
        // ISO timestamps in UTC: bundles are read on other machines and time zones.
        let child = Command::new(&self.journalctl)
            .args(["--no-pager", "--quiet", "--utc", "-o", "short-iso-precise", "-u", part.unit()])
            .arg(format!("--since=@{}", since.0))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| read_err(format!("{}: {e}", self.journalctl.display())))?;
        let stdout = child.stdout.ok_or_else(|| read_err("no output".into()))?;
        Ok(Box::new(stdout))
    }
}

/// The log files the cron supervisor keeps on hosts without systemd. Their lines are
/// not filtered by time (they are rotated instead); the bound keeps the newest.
pub struct LogFiles {
    pub agent_dir: PathBuf,
    pub root_dir: PathBuf,
}

impl Default for LogFiles {
    fn default() -> Self {
        Self { agent_dir: "/var/log/visualops".into(), root_dir: "/var/log/opsagent-root".into() }
    }
}

impl LogSource for LogFiles {
    fn open(&self, part: Part, _: Since) -> Result<Box<dyn Read>, LogBundleError> {
        let path = match part {
            Part::Agent => self.agent_dir.join("opsagent.log"),
            Part::Helper => self.root_dir.join("opsagent-helper.log"),
            Part::Upgrade => self.root_dir.join("upgrade.log"),
            // Without systemd, commands run directly and their output is in the helper's
            // log and the StateLogs.
            Part::States => return Ok(Box::new(std::io::empty())),
        };
        match std::fs::File::open(&path) {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Box::new(std::io::empty())),
            Err(e) => Err(LogBundleError::Read { part: part.name(), reason: format!("{}: {e}", path.display()) }),
        }
    }
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    /// Bytes of log text before compression.
    pub raw_bytes: u64,
    /// Bytes of the gzipped bundle.
    pub gz_bytes: u64,
    /// The gzipped bundle's sha256, hex.
    pub sha256: String,
    /// Per part cut by the bound: the bytes of older entries left out.
    pub cut: Vec<(Part, u64)>,
}

/// Writes the gzipped bundle of `parts` since `since` to `out`: each part under a
/// `==== opsagent log bundle: PART ====` line, at most `max_bytes` of log text in all
/// (shared equally by the parts; each keeps its newest lines), and a line saying what
/// was cut.
pub fn write_bundle(
    source: &dyn LogSource,
    parts: &[Part],
    since: Since,
    max_bytes: u64,
    out: impl Write,
) -> Result<BundleSummary, LogBundleError> {
    let mut parts = parts.to_vec();
    parts.sort();
    parts.dedup();
    let share = max_bytes / u64::try_from(parts.len().max(1)).unwrap_or(1);
    let hashing = HashingWriter { inner: out, hash: Sha256::new(), written: 0 };
    let mut gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
    let mut raw_bytes = 0u64;
    let mut cut = Vec::new();
    for part in parts {
        let (kept, dropped) = newest(source.open(part, since)?, share)
            .map_err(|e| LogBundleError::Read { part: part.name(), reason: e.to_string() })?;
        let head = format!("==== opsagent log bundle: {} since @{} ====\n", part.name(), since.0);
        gz.write_all(head.as_bytes())?;
        if dropped > 0 {
            let note = format!(
                "==== cut: {dropped} bytes of older {} entries left out (bound {share} bytes) ====\n",
                part.name()
            );
            gz.write_all(note.as_bytes())?;
            cut.push((part, dropped));
        }
        gz.write_all(&kept)?;
        raw_bytes += kept.len() as u64;
    }
    let hashing = gz.finish()?;
    let mut inner = hashing.inner;
    inner.flush()?;
    Ok(BundleSummary { raw_bytes, gz_bytes: hashing.written, sha256: hex::encode(hashing.hash.finalize()), cut })
}

/// The last `max` bytes of `r`, starting at a line, and how many bytes came before them.
fn newest(mut r: Box<dyn Read>, max: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut dropped = 0u64;
    let mut last_dropped = None;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        tail.extend(&buf[..n]);
        if tail.len() > max {
            let over = tail.len() - max;
            last_dropped = tail.get(over - 1).copied();
            tail.drain(..over);
            dropped += over as u64;
        }
    }
    let mut kept: Vec<u8> = tail.into();
    if dropped > 0 && last_dropped != Some(b'\n') {
        // Whole lines only: the first, cut in the middle, goes too.
        let start = kept.iter().position(|b| *b == b'\n').map_or(kept.len(), |i| i + 1);
        kept.drain(..start);
        dropped += start as u64;
    }
    Ok((kept, dropped))
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Fake(HashMap<Part, String>);

    impl LogSource for Fake {
        fn open(&self, part: Part, _: Since) -> Result<Box<dyn Read>, LogBundleError> {
            Ok(Box::new(std::io::Cursor::new(self.0.get(&part).cloned().unwrap_or_default().into_bytes())))
        }
    }

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        flate2::read::GzDecoder::new(b).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn a_bundle_holds_each_asked_part_once_under_its_heading_with_its_checksum() {
        let fake = Fake(HashMap::from([
            (Part::Agent, "a1\na2\n".to_string()),
            (Part::Helper, "h1\n".to_string()),
            (Part::Upgrade, "u1\n".to_string()),
        ]));
        let mut out = Vec::new();
        let s = write_bundle(&fake, &[Part::Helper, Part::Agent, Part::Helper], Since(100), 1 << 20, &mut out).unwrap();
        let text = gunzip(&out);
        assert_eq!(
            text,
            "==== opsagent log bundle: agent since @100 ====\na1\na2\n==== opsagent log bundle: helper since @100 ====\nh1\n"
        );
        assert!(s.cut.is_empty());
        assert_eq!((s.raw_bytes, s.gz_bytes), (9, out.len() as u64));
        assert_eq!(s.sha256, hex::encode(Sha256::digest(&out)));
    }

    #[test]
    fn an_oversized_bundle_keeps_the_newest_whole_lines_and_says_what_it_cut() {
        let lines: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        let fake = Fake(HashMap::from([(Part::Agent, lines.clone()), (Part::Helper, "h\n".to_string())]));
        let mut out = Vec::new();
        let s = write_bundle(&fake, &[Part::Agent, Part::Helper], Since(0), 200, &mut out).unwrap();
        let text = gunzip(&out);
        // 100 bytes each: the last 10 lines of 10 bytes fit, the rest is cut.
        assert!(text.contains("line 0999\n") && text.contains("line 0990\n"), "{text}");
        assert!(!text.contains("line 0989"), "{text}");
        let dropped = lines.len() as u64 - 100;
        assert_eq!(s.cut, [(Part::Agent, dropped)]);
        assert!(
            text.contains(&format!("cut: {dropped} bytes of older agent entries left out (bound 100 bytes)")),
            "{text}"
        );
        assert!(s.raw_bytes <= 200);
        // A bound in the middle of a line drops that line whole.
        let mut out = Vec::new();
        let s = write_bundle(&fake, &[Part::Agent], Since(0), 95, &mut out).unwrap();
        let text = gunzip(&out);
        assert!(
            text.ends_with(
                "\nline 0991\nline 0992\nline 0993\nline 0994\nline 0995\nline 0996\nline 0997\nline 0998\nline 0999\n"
            ),
            "{text}"
        );
        assert_eq!(s.cut, [(Part::Agent, lines.len() as u64 - 90)]);
    }

    #[test]
    fn since_takes_durations_before_now_or_epoch_seconds_and_names_a_bad_one() {
        assert_eq!(Since::parse("30m", 10_000).unwrap(), Since(8_200));
        assert_eq!(Since::parse("1d", 100_000).unwrap(), Since(13_600));
        assert_eq!(Since::parse("@1700000000", 0).unwrap(), Since(1_700_000_000));
        for bad in ["", "m", "10", "3w", "@x", "-1h"] {
            assert!(matches!(Since::parse(bad, 0), Err(LogBundleError::BadSince(_))), "{bad}");
        }
        assert!(matches!(Part::parse("kernel"), Err(LogBundleError::UnknownPart(_))));
    }

    /// The journal source asks journalctl for the part's unit since the time, in UTC.
    #[test]
    fn the_journal_is_read_with_journalctl_for_the_parts_unit() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("journalctl");
        std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut out = Vec::new();
        write_bundle(&Journal { journalctl: fake }, &[Part::States], Since(42), 1 << 20, &mut out).unwrap();
        let text = gunzip(&out);
        assert!(text.contains("--utc -o short-iso-precise -u opsagent-state-*.service --since=@42"), "{text}");
    }
}
