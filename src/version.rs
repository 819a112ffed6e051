//! The version this daemon reports: the release it was installed from.
//!
//! A release tree (`/opt/visualops/releases/VERSION/`) carries a MANIFEST whose first
//! line is `version VERSION`; the binary reads it beside itself, so the Handshake names
//! the release the operator installed (and the upgrade health gate waits for) even when
//! the same build is shipped under several release names. Outside a release tree (cargo
//! run, tests) the crate version is reported.

use std::path::Path;
use std::sync::OnceLock;

/// The crate version this binary was built as.
pub const BUILD: &str = env!("CARGO_PKG_VERSION");

/// The running release's version (read once).
pub fn running() -> &'static str {
    static RUNNING: OnceLock<String> = OnceLock::new();
    RUNNING.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(|root| root.join("MANIFEST")))
            .and_then(|manifest| from_manifest(&manifest))
            .unwrap_or_else(|| BUILD.to_string())
    })
}

/// The version named by a release MANIFEST's first line.
pub fn from_manifest(path: &Path) -> Option<String> {
    // A MANIFEST is a few hundred bytes; one that is not is not ours.
    let text = std::fs::read_to_string(path).ok().filter(|t| t.len() < 1 << 20)?;
    let v = text.lines().next()?.strip_prefix("version ")?;
    opsagent_shared::upgrade::valid_version(v).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_manifest_version_line() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("MANIFEST");
        std::fs::write(&m, "version 1.3.0-rc1\nabc  bin/opsagent\n").unwrap();
        assert_eq!(from_manifest(&m).as_deref(), Some("1.3.0-rc1"));
        std::fs::write(&m, "version ../x\n").unwrap();
        assert_eq!(from_manifest(&m), None);
        assert_eq!(from_manifest(&dir.path().join("missing")), None);
        // Outside a release tree (this test binary), the build version.
        assert_eq!(running(), BUILD);
    }
}
