//! `opsagent logs --bundle FILE`: the agent's, the helper's, the upgrades' and the
//! states' log entries since a time, bounded and gzipped, for a ticket.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use crate::logbundle::{write_bundle, Journal, LogFiles, LogSource, Part, Since};

pub use crate::logbundle::DEFAULT_MAX_BYTES;

pub fn cmd_logs(bundle: &Path, since: &str, what: &[String], max_bytes: u64) -> anyhow::Result<ExitCode> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let since = Since::parse(since, now)?;
    let parts = if what.is_empty() {
        Part::ALL.to_vec()
    } else {
        what.iter().map(|w| Part::parse(w)).collect::<Result<Vec<_>, _>>()?
    };
    // Hosts booted with systemd keep the logs in the journal; the others (cron
    // supervisor) in files.
    let source: Box<dyn LogSource> = if Path::new("/run/systemd/system").is_dir() {
        Box::new(Journal::default())
    } else {
        Box::new(LogFiles::default())
    };
    // Logs may hold what the states printed: the bundle is readable by its owner only.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(bundle)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", bundle.display()))?;
    let summary = write_bundle(source.as_ref(), &parts, since, max_bytes, std::io::BufWriter::new(file))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wrote {}: {} bytes gzipped ({} bytes of log text), sha256 {}",
        bundle.display(),
        summary.gz_bytes,
        summary.raw_bytes,
        summary.sha256
    )?;
    for (part, bytes) in &summary.cut {
        writeln!(out, "  cut: {bytes} bytes of older {} entries left out (--max-bytes {max_bytes})", part.name())?;
    }
    Ok(ExitCode::SUCCESS)
}
