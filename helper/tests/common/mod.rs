//! Support shared by the helper's integration tests (`mod common;` in each). Not every
//! test file uses every item, hence the `dead_code` allowances.

use std::process::Command;

use opsagent_proto::catalogue::{parse_state, ModuleParams};
use serde_json::Value;

/// Typed parameters through the real catalogue, as the daemon would send them.
#[allow(dead_code)]
pub fn params(module: &str, raw: Value) -> ModuleParams {
    parse_state(module, &raw).unwrap_or_else(|e| panic!("{module}: {e}")).params
}

/// One module's typed parameters (`typed::<CommonGit>("common.git", raw)`).
#[allow(dead_code)]
pub fn typed<T: TryFrom<ModuleParams, Error = ModuleParams>>(module: &str, raw: Value) -> T {
    T::try_from(params(module, raw)).unwrap_or_else(|other| panic!("{module}: got {}", other.name()))
}

/// Runs a set-up command, which must succeed (else the panic shows its output); its stdout.
#[allow(dead_code)]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Says on stderr that (part of) a test cannot run here. Where every test must run — CI,
/// which sets `OPSAGENT_TEST_NO_SKIP=1` — it fails instead: cargo hides a test's stderr,
/// so a skip would otherwise pass unseen.
#[allow(dead_code)]
pub fn skip(what: &str) {
    assert!(
        std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
        "{what}, but OPSAGENT_TEST_NO_SKIP is set: this machine must run it"
    );
    eprintln!("{what}");
}
