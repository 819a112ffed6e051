// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! `opsagent upgrade --stage-only`, run for real as root: the release and its signature
//! are downloaded into the daemon's staging directory, handed back to the directory's
//! owner, and nothing is installed.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::{bin, Files};

#[test]
fn stage_only_downloads_the_release_for_the_daemons_user_and_installs_nothing() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("OPSAGENT_TEST_NO_SKIP").is_none_or(|v| v.is_empty() || v == "0"),
            "needs root, but OPSAGENT_TEST_NO_SKIP is set: this machine must run it"
        );
        eprintln!("SKIPPED: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The daemon's state directory, owned by its user (nobody here).
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    nix::unistd::chown(&state, Some(nobody), Some(nogroup)).unwrap();
    let conf = dir.path().join("opsagent.conf");
    std::fs::write(&conf, format!("[agent]\nstate_dir = {}\n", state.display())).unwrap();
    let files = Files::start();
    let archive = b"release 9.8.7 archive bytes".to_vec();
    let signature = b"untrusted comment: test\nsignature bytes\n".to_vec();
    let url = files.put("9.8.7/opsagent.tgz", archive.clone());
    files.put("9.8.7/opsagent.tgz.minisig", signature.clone());

    let out = Command::new(bin("opsagent"))
        .args(["upgrade", "--stage-only", "--url", &url, "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}{stderr}");
    let staged = state.join("upgrade/staged");
    assert!(stdout.contains(&format!("9.8.7 downloaded and staged in {}", staged.display())), "{stdout}");
    assert!(stdout.contains("install it with: systemctl start opsagent-upgrade.service"), "{stdout}");
    // The version came from the URL; both files were fetched once.
    assert_eq!((files.hits("9.8.7/opsagent.tgz"), files.hits("9.8.7/opsagent.tgz.minisig")), (1, 1));
    assert_eq!(std::fs::read(staged.join("opsagent.tgz")).unwrap(), archive);
    assert_eq!(std::fs::read(staged.join("opsagent.tgz.minisig")).unwrap(), signature);
    let order: serde_json::Value = serde_json::from_slice(&std::fs::read(staged.join("order.json")).unwrap()).unwrap();
    assert_eq!((order["version"].as_str(), order["url"].as_str()), (Some("9.8.7"), Some(url.as_str())));
    // Everything staged belongs to the daemon's user, so that its next order can
    // replace it.
    for name in ["", "opsagent.tgz", "opsagent.tgz.minisig", "order.json"] {
        let md = std::fs::metadata(staged.join(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{name}");
    }
    assert_eq!(std::fs::metadata(state.join("upgrade")).unwrap().uid(), 65534);
    // Nothing was installed: no installer ran, so no result exists.
    assert!(!stdout.contains("running"), "{stdout}");
    assert!(!opsagent_shared::upgrade::result_file(&state).exists());
}
