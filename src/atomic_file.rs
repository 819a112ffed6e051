//! Whole-file replacement that a crash cannot leave half written: the daemon's state
//! files (persisted recipe, health, metrics, upgrade records) and the reference backend's
//! recipe versions all go through here, so there is one routine to audit.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
