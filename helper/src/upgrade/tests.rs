//! The installer's decisions with real files, real signatures and a fake agent that
//! plays a healthy, a silent or a crashing release.
// Tests build their fixtures by path (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use opsagent_shared::upgrade::{self as hand, Health, Order, Outcome, Record};
use sha2::{Digest, Sha256};

use super::conf::InstallerConfig;
use super::control::AgentControl;
use super::releases::Releases;
use super::units::InstalledUnits;
use super::*;

struct Keys {
    pk: minisign::PublicKey,
    sk: minisign::SecretKey,
}

fn keys() -> Keys {
    let minisign::KeyPair { pk, sk } = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    Keys { pk, sk }
}

fn sign(keys: &Keys, data: &[u8], trusted: &str) -> String {
    minisign::sign(Some(&keys.pk), &keys.sk, Cursor::new(data), Some(trusted), Some("test release"))
        .unwrap()
        .to_string()
}

/// A release archive: `opsagent-VERSION/` with the three programs and a MANIFEST;
/// `extra` entries are appended raw (name bytes written as given, no checks).
fn release_tgz(version: &str, tamper_manifest: bool, extra: &[(&str, &[u8])]) -> Vec<u8> {
    release_tgz_with(version, tamper_manifest, Vec::new(), extra)
}

/// The same with more files (listed in the MANIFEST), e.g. `units/opsagent.service`.
fn release_tgz_with(
    version: &str,
    tamper_manifest: bool,
    listed: Vec<(String, Vec<u8>)>,
    extra: &[(&str, &[u8])],
) -> Vec<u8> {
    let top = format!("opsagent-{version}");
    let mut files: Vec<(String, Vec<u8>)> = super::release::REQUIRED_PROGRAMS
        .iter()
        .map(|p| (p.to_string(), format!("#!/bin/sh\necho {p} {version}\n").into_bytes()))
        .collect();
    files.extend(listed);
    let mut manifest = format!("version {version}\n");
    for (name, body) in &files {
        let body = if tamper_manifest { b"other".to_vec() } else { body.clone() };
        manifest.push_str(&format!("{}  {name}\n", hex::encode(Sha256::digest(&body))));
    }
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut add = |name: &str, body: &[u8], mode: u32, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_cksum();
        tar.append(&h, body).unwrap();
    };
    add(&format!("{top}/"), b"", 0o755, tar::EntryType::Directory);
    let dirs: std::collections::BTreeSet<&str> =
        files.iter().filter_map(|(n, _)| n.split_once('/')).map(|d| d.0).collect();
    for dir in dirs {
        add(&format!("{top}/{dir}/"), b"", 0o755, tar::EntryType::Directory);
    }
    for (name, body) in &files {
        add(&format!("{top}/{name}"), body, 0o755, tar::EntryType::Regular);
    }
    add(&format!("{top}/MANIFEST"), manifest.as_bytes(), 0o644, tar::EntryType::Regular);
    for (name, body) in extra {
        add(name, body, 0o644, tar::EntryType::Regular);
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// The release's units and where userdata.sh installs them (relative to the unit
/// directory; the polkit rule to the polkit directory).
const UNIT_FILES: &[(&str, &str)] = &[
    ("units/opsagent.service", "opsagent.service"),
    ("units/opsagent-helper.service", "opsagent-helper.service"),
    ("units/opsagent-helper.socket", "opsagent-helper.socket"),
    ("units/opsagent-upgrade.service", "opsagent-upgrade.service"),
    ("units/opsagent-helper-network.conf", "opsagent-helper.service.d/50-network.conf"),
    ("units/opsagent-helper-storage.conf", "opsagent-helper.service.d/60-storage.conf"),
    ("polkit/50-opsagent.rules", "50-opsagent.rules"),
];

/// A unit's text: the same in every release unless `marks` gives it a mark.
fn unit_text(rel: &str, marks: &[(&str, &str)]) -> String {
    let mark = marks.iter().find(|(r, _)| *r == rel).map(|(_, m)| format!("# release {m}\n")).unwrap_or_default();
    format!("# {rel}\n[Unit]\n{mark}")
}

/// A signed-ready release `version` whose units carry `marks` (file, mark).
fn release_with_units(version: &str, marks: &[(&str, &str)]) -> Vec<u8> {
    let listed = UNIT_FILES.iter().map(|(rel, _)| (rel.to_string(), unit_text(rel, marks).into_bytes())).collect();
    release_tgz_with(version, false, listed, &[])
}

struct Host {
    _tmp: tempfile::TempDir,
    prefix: PathBuf,
    state: PathBuf,
    keys: Keys,
    units: InstalledUnits,
    /// `installer()` leaves `units` out (a host without systemd).
    cron: bool,
    /// `[upgrade] allow_downgrade` of the installer's configuration.
    allow_downgrade: bool,
}

impl Host {
    /// A host running release 1.0 (installed through the installer itself), whose units
    /// carry no mark.
    async fn with_release_a() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path().join("opt");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&prefix).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let units = InstalledUnits {
            unit_dir: tmp.path().join("etc/systemd/system"),
            polkit_dirs: vec![tmp.path().join("etc/polkit-1/rules.d"), tmp.path().join("usr/polkit-1/rules.d")],
        };
        let host = Host { prefix, state, keys: keys(), units, cron: false, allow_downgrade: false, _tmp: tmp };
        let tgz = release_with_units("1.0", &[]);
        host.stage("1.0", &tgz, &sign(&host.keys, &tgz, "opsagent release 1.0"));
        let r = host.install(FakeAgent::healthy(&["1.0"])).await;
        assert_eq!(r.outcome, Outcome::Confirmed, "{r:?}");
        host
    }

    fn stage(&self, version: &str, tgz: &[u8], sig: &str) {
        self.stage_order(version, &format!("http://x/{version}/opsagent.tgz"), tgz, sig);
    }

    fn stage_order(&self, version: &str, url: &str, tgz: &[u8], sig: &str) {
        let dir = hand::staged_dir(&self.state);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(hand::ARCHIVE), tgz).unwrap();
        std::fs::write(dir.join(hand::SIGNATURE), sig).unwrap();
        let order = Order { version: version.into(), url: url.into(), from: "1.0".into(), ordered_at: 1 };
        std::fs::write(dir.join(hand::ORDER), serde_json::to_vec(&order).unwrap()).unwrap();
    }

    fn stage_signed(&self, version: &str, tgz: &[u8]) {
        self.stage(version, tgz, &sign(&self.keys, tgz, &format!("opsagent release {version}")));
    }

    fn installer(&self, agent: FakeAgent) -> Installer<FakeAgent> {
        let config = InstallerConfig {
            update_key: self.keys.pk.to_base64(),
            state_dir: self.state.clone(),
            health_timeout: Duration::from_secs(60),
            allow_downgrade: self.allow_downgrade,
        };
        let control = FakeAgent { unit_dir: self.units.unit_dir.clone(), ..agent.at(&self.prefix, &self.state) };
        let units = (!self.cron).then(|| self.units.clone());
        Installer { config, releases: Releases::new(&self.prefix), control, units }
    }

    /// What userdata.sh installs from a release without marks: the four units, the
    /// network drop-in (not the storage one) and the polkit rule into the second polkit
    /// directory (the first does not exist).
    fn install_units(&self) {
        let dropins = self.units.unit_dir.join("opsagent-helper.service.d");
        std::fs::create_dir_all(&dropins).unwrap();
        std::fs::create_dir_all(&self.units.polkit_dirs[1]).unwrap();
        for (rel, to) in UNIT_FILES {
            if rel.ends_with("storage.conf") {
                continue;
            }
            let dir = if rel.starts_with("polkit/") { &self.units.polkit_dirs[1] } else { &self.units.unit_dir };
            std::fs::write(dir.join(to), unit_text(rel, &[])).unwrap();
        }
    }

    /// The installed copy of the release file `rel`.
    fn installed(&self, rel: &str) -> Option<String> {
        let (_, to) = UNIT_FILES.iter().find(|(r, _)| *r == rel).unwrap();
        let dir = if rel.starts_with("polkit/") { &self.units.polkit_dirs[1] } else { &self.units.unit_dir };
        std::fs::read_to_string(dir.join(to)).ok()
    }

    async fn install(&self, agent: FakeAgent) -> Record {
        self.installer(agent).run().await.unwrap()
    }

    fn current(&self) -> Option<String> {
        Releases::new(&self.prefix).current()
    }

    fn result(&self) -> Record {
        serde_json::from_slice(&std::fs::read(hand::result_file(&self.state)).unwrap()).unwrap()
    }
}

/// Plays the agent: a restart "starts" whatever `current` points at; a healthy version
/// writes its health file, a crashing one fails its start job, others stay silent.
#[derive(Default)]
struct FakeAgent {
    healthy: Vec<String>,
    crashing: Vec<String>,
    prefix: PathBuf,
    state: PathBuf,
    started: RefCell<Vec<String>>,
    /// Fail every reload_units.
    reload_fails: bool,
    /// Where the fake reads the installed opsagent.service at a reload.
    unit_dir: PathBuf,
    /// Every call in order: `reload (TEXT OF opsagent.service)`, `socket`, `restart VERSION`.
    calls: RefCell<Vec<String>>,
    /// Seconds the started daemon's wall clock is off the installer's (a clock stepped
    /// between the switch and the Handshake).
    clock_step: i64,
}

impl FakeAgent {
    fn healthy(versions: &[&str]) -> Self {
        Self { healthy: versions.iter().map(|v| v.to_string()).collect(), ..Self::default() }
    }

    fn crashing(mut self, versions: &[&str]) -> Self {
        self.crashing = versions.iter().map(|v| v.to_string()).collect();
        self
    }

    fn clock_stepped(mut self, secs: i64) -> Self {
        self.clock_step = secs;
        self
    }

    fn at(mut self, prefix: &Path, state: &Path) -> Self {
        self.prefix = prefix.to_path_buf();
        self.state = state.to_path_buf();
        self
    }
}

impl AgentControl for FakeAgent {
    async fn restart(&self) -> Result<(), String> {
        let version = Releases::new(&self.prefix).current().ok_or("no current release")?;
        self.started.borrow_mut().push(version.clone());
        self.calls.borrow_mut().push(format!("restart {version}"));
        if self.crashing.contains(&version) {
            return Err(format!("opsagent.service: the restart job ended with result \"failed\" ({version})"));
        }
        if self.healthy.contains(&version) {
            let h = Health { version, pid: 42, handshake_at: now_unix().saturating_add_signed(self.clock_step) };
            std::fs::write(hand::health_file(&self.state), serde_json::to_vec(&h).unwrap()).unwrap();
        }
        Ok(())
    }

    async fn reload_units(&self) -> Result<(), String> {
        // What systemd would read now: proves the files were written before the reload.
        let service = std::fs::read_to_string(self.unit_dir.join("opsagent.service")).unwrap_or_default();
        self.calls.borrow_mut().push(format!("reload ({})", service.lines().last().unwrap_or_default()));
        if self.reload_fails {
            return Err("Access denied".into());
        }
        Ok(())
    }

    async fn restart_socket(&self) -> Result<(), String> {
        self.calls.borrow_mut().push("socket".into());
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_healthy_release_is_confirmed_and_the_previous_one_kept() {
    let host = Host::with_release_a().await;
    let tgz = release_tgz("1.1", false, &[]);
    host.stage_signed("1.1", &tgz);
    let r = host.install(FakeAgent::healthy(&["1.0", "1.1"])).await;
    assert_eq!((r.outcome, r.version.as_str(), r.from.as_str()), (Outcome::Confirmed, "1.1", "1.0"), "{r:?}");
    assert_eq!(host.current().as_deref(), Some("1.1"));
    assert_eq!(host.result(), r);
    let releases = Releases::new(&host.prefix);
    assert!(releases.path("1.0").is_dir(), "the previous release is kept for a roll-back");
    // The staged order is consumed.
    assert!(!hand::staged_dir(&host.state).join(hand::ORDER).exists());

    // A third release prunes the first.
    let tgz = release_tgz("1.2", false, &[]);
    host.stage_signed("1.2", &tgz);
    let r = host.install(FakeAgent::healthy(&["1.2"])).await;
    assert_eq!(r.outcome, Outcome::Confirmed);
    assert!(r.reason.contains("pruned 1.0"), "{}", r.reason);
    assert!(!releases.path("1.0").exists() && releases.path("1.1").is_dir());
}

#[tokio::test(start_paused = true)]
async fn a_release_that_never_confirms_is_reverted_after_the_gate() {
    let host = Host::with_release_a().await;
    host.stage_signed("1.1", &release_tgz("1.1", false, &[]));
    let installer = host.installer(FakeAgent::healthy(&["1.0"]));
    let started = tokio::time::Instant::now();
    let r = installer.run().await.unwrap();
    assert_eq!(r.outcome, Outcome::Reverted, "{r:?}");
    assert!(r.reason.contains("did not complete a Handshake within 60 s") && r.reason.contains("reverted to 1.0"));
    assert!(started.elapsed() >= Duration::from_secs(60) && started.elapsed() < Duration::from_secs(62));
    assert_eq!(host.current().as_deref(), Some("1.0"));
    assert_eq!(*installer.control.started.borrow(), ["1.1", "1.0"], "the previous release is restarted");
    assert!(!Releases::new(&host.prefix).path("1.1").exists(), "the failed release is removed");
    assert_eq!(host.result(), r);
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_stepped_back_during_the_gate_does_not_revert_a_healthy_release() {
    let host = Host::with_release_a().await;
    host.stage_signed("1.1", &release_tgz("1.1", false, &[]));
    // The new daemon's Handshake is stamped 12 h before the switch by the clock of then.
    let r = host.install(FakeAgent::healthy(&["1.0", "1.1"]).clock_stepped(-12 * 3600)).await;
    assert_eq!(r.outcome, Outcome::Confirmed, "{r:?}");
    assert_eq!(host.current().as_deref(), Some("1.1"));
}

#[tokio::test(start_paused = true)]
async fn a_health_file_left_from_before_the_switch_does_not_pass_the_gate() {
    let host = Host::with_release_a().await;
    host.stage_signed("1.1", &release_tgz("1.1", false, &[]));
    // Left by an earlier run of 1.1 while the clock was 12 h ahead: "after the switch" by
    // any wall-clock comparison.
    let stale = Health { version: "1.1".into(), pid: 7, handshake_at: now_unix() + 12 * 3600 };
    std::fs::write(hand::health_file(&host.state), serde_json::to_vec(&stale).unwrap()).unwrap();
    let r = host.install(FakeAgent::healthy(&["1.0"])).await;
    assert_eq!(r.outcome, Outcome::Reverted, "1.1 never confirmed: {r:?}");
    assert!(r.reason.contains("did not complete a Handshake within 60 s"), "{}", r.reason);
    assert_eq!(host.current().as_deref(), Some("1.0"));
}

#[tokio::test(start_paused = true)]
async fn a_release_that_crashes_at_start_is_reverted_at_once() {
    let host = Host::with_release_a().await;
    host.stage_signed("1.1", &release_tgz("1.1", false, &[]));
    let started = tokio::time::Instant::now();
    let r = host.install(FakeAgent::healthy(&["1.0"]).crashing(&["1.1"])).await;
    assert_eq!(r.outcome, Outcome::Reverted);
    assert!(r.reason.contains("did not start") && r.reason.contains("\"failed\""), "{}", r.reason);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(host.current().as_deref(), Some("1.0"));
}

async fn assert_rejected(host: &Host, want: &str) {
    let r = host.install(FakeAgent::healthy(&["1.0", "1.1"])).await;
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert!(r.reason.contains(want), "{:?} does not mention {want:?}", r.reason);
    assert_eq!(host.current().as_deref(), Some("1.0"), "the running version is unchanged");
    assert!(!Releases::new(&host.prefix).path("1.1").exists());
    assert!(!hand::staged_dir(&host.state).join(hand::ORDER).exists(), "a rejected order is consumed");
    assert_eq!(host.result(), r);
}

#[tokio::test(start_paused = true)]
async fn tampered_wrongly_signed_mislabelled_and_unsafe_releases_are_rejected() {
    let host = Host::with_release_a().await;

    let mut tgz = release_tgz("1.1", false, &[]);
    let sig = sign(&host.keys, &tgz, "opsagent release 1.1");
    let n = tgz.len() / 2;
    tgz[n] ^= 0x55;
    host.stage("1.1", &tgz, &sig);
    assert_rejected(&host, "does not verify with the configured update_key").await;

    let tgz = release_tgz("1.1", false, &[]);
    host.stage("1.1", &tgz, &sign(&keys(), &tgz, "opsagent release 1.1"));
    assert_rejected(&host, "does not verify").await;

    host.stage("1.1", &tgz, &sign(&host.keys, &tgz, "opsagent release 1.0"));
    assert_rejected(&host, "signs another release").await;

    host.stage("1.1", &tgz, "not a signature");
    assert_rejected(&host, "not a minisign signature").await;

    host.stage_signed("1.1", &release_tgz("1.1", false, &[("opsagent-1.1/../../escaped", b"x")]));
    assert_rejected(&host, "unsafe or broken archive").await;
    assert!(!host.prefix.join("escaped").exists() && !host.prefix.join("releases/escaped").exists());

    host.stage_signed("1.1", &release_tgz("1.1", true, &[]));
    assert_rejected(&host, "does not match its sha256").await;

    host.stage_signed("1.1", &release_tgz("1.1", false, &[("opsagent-1.1/extra", b"x")]));
    assert_rejected(&host, "extra is in the archive but not listed").await;

    host.stage_signed("1.1", &release_tgz("1.2", false, &[]));
    assert_rejected(&host, "exactly one directory opsagent-1.1/").await;
}

/// The cron-host escalation: a URL holding a newline, logged by the installer into a
/// file root later read line by line. Every field of the order is checked before use.
#[tokio::test(start_paused = true)]
async fn an_order_whose_url_holds_a_newline_is_refused_before_anything_is_used() {
    let host = Host::with_release_a().await;
    let tgz = release_tgz("1.1", false, &[]);
    let sig = sign(&host.keys, &tgz, "opsagent release 1.1");
    host.stage_order("1.1", "http://x/1.1/opsagent.tgz\n2026-01-01T00:00:00Z /tmp/evil.so", &tgz, &sig);
    assert_rejected(&host, "which no URL holds").await;
    assert!(!host.result().reason.contains('\n'), "{:?}", host.result().reason);
    // The order is named by its path, not the installer's /proc/self/fd handle.
    let staged = hand::staged_dir(&host.state).join(hand::ORDER);
    assert!(host.result().reason.contains(&staged.display().to_string()), "{}", host.result().reason);
    host.stage_order("1.1", "file:///etc/shadow", &tgz, &sig);
    assert_rejected(&host, "is not http(s)").await;
}

#[tokio::test(start_paused = true)]
async fn an_older_release_is_refused_unless_the_configuration_allows_downgrades() {
    let mut host = Host::with_release_a().await;
    let tgz = release_tgz("0.9", false, &[]);
    host.stage_signed("0.9", &tgz);
    let r = host.install(FakeAgent::healthy(&["1.0", "0.9"])).await;
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert!(r.reason.contains("0.9 is older than the running 1.0"), "{}", r.reason);
    assert!(r.reason.contains("allow_downgrade = true"), "{}", r.reason);
    assert_eq!(host.current().as_deref(), Some("1.0"));
    assert!(!Releases::new(&host.prefix).path("0.9").exists());

    host.allow_downgrade = true;
    host.stage_signed("0.9", &tgz);
    let r = host.install(FakeAgent::healthy(&["1.0", "0.9"])).await;
    assert_eq!(r.outcome, Outcome::Confirmed, "{r:?}");
    assert_eq!(host.current().as_deref(), Some("0.9"));
}

#[tokio::test]
async fn nothing_staged_is_an_error_and_changes_nothing() {
    let host = Host::with_release_a().await;
    let e = host.installer(FakeAgent::default()).run().await.unwrap_err();
    assert!(matches!(e, UpgradeError::NothingStaged(_)), "{e}");
    assert_eq!(host.current().as_deref(), Some("1.0"));
}

#[tokio::test]
async fn a_planted_symlink_in_the_daemons_directory_is_not_followed() {
    let host = Host::with_release_a().await;
    let elsewhere = host.prefix.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(host.state.join("upgrade")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, host.state.join("upgrade")).unwrap();
    let e = host.installer(FakeAgent::default()).run().await.unwrap_err();
    assert!(matches!(e, UpgradeError::NothingStaged(_)), "{e}");
    let r = Record {
        version: "x".into(),
        from: "y".into(),
        outcome: Outcome::Rejected,
        reason: String::new(),
        at: 0,
        reported: false,
    };
    let state = PinnedDir::open(&host.state).unwrap();
    assert!(write_record(&state, (0, 0), &r).is_err());
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none(), "nothing written through the link");
}

const SERVICE: &str = "units/opsagent.service";
const SOCKET: &str = "units/opsagent-helper.socket";
const STORAGE: &str = "units/opsagent-helper-storage.conf";
const POLKIT: &str = "polkit/50-opsagent.rules";

#[tokio::test(start_paused = true)]
async fn installed_units_follow_the_release_with_a_reload_only_when_they_changed() {
    let host = Host::with_release_a().await;
    host.install_units();

    // The service and the storage drop-in change; the drop-in is not installed.
    host.stage_signed("1.1", &release_with_units("1.1", &[(SERVICE, "1.1"), (STORAGE, "1.1")]));
    let installer = host.installer(FakeAgent::healthy(&["1.1"]));
    let r = installer.run().await.unwrap();
    assert_eq!(r.outcome, Outcome::Confirmed, "{r:?}");
    assert_eq!(host.installed(SERVICE), Some(unit_text(SERVICE, &[(SERVICE, "1.1")])));
    assert_eq!(host.installed(STORAGE), None, "a drop-in userdata did not install is not created");
    assert_eq!(host.installed(SOCKET), Some(unit_text(SOCKET, &[])));
    assert_eq!(*installer.control.calls.borrow(), ["reload (# release 1.1)", "restart 1.1"], "no socket cycle");

    // The socket and the polkit rule change too: the socket is re-created before the start.
    let marks = [(SERVICE, "1.2"), (SOCKET, "1.2"), (POLKIT, "1.2")];
    host.stage_signed("1.2", &release_with_units("1.2", &marks));
    let installer = host.installer(FakeAgent::healthy(&["1.2"]));
    assert_eq!(installer.run().await.unwrap().outcome, Outcome::Confirmed);
    for rel in [SERVICE, SOCKET, POLKIT] {
        assert_eq!(host.installed(rel), Some(unit_text(rel, &marks)), "{rel}");
    }
    assert_eq!(*installer.control.calls.borrow(), ["reload (# release 1.2)", "socket", "restart 1.2"]);

    // Units equal to the installed ones: no reload, no socket.
    host.stage_signed("1.3", &release_with_units("1.3", &marks));
    let installer = host.installer(FakeAgent::healthy(&["1.3"]));
    assert_eq!(installer.run().await.unwrap().outcome, Outcome::Confirmed);
    assert_eq!(*installer.control.calls.borrow(), ["restart 1.3"]);

    // Only the polkit rule differs: polkitd reloads by itself, systemd need not.
    host.stage_signed("1.4", &release_with_units("1.4", &[(SERVICE, "1.2"), (SOCKET, "1.2"), (POLKIT, "1.4")]));
    let installer = host.installer(FakeAgent::healthy(&["1.4"]));
    assert_eq!(installer.run().await.unwrap().outcome, Outcome::Confirmed);
    assert_eq!(host.installed(POLKIT), Some(unit_text(POLKIT, &[(POLKIT, "1.4")])));
    assert_eq!(*installer.control.calls.borrow(), ["restart 1.4"]);
}

#[tokio::test(start_paused = true)]
async fn a_reverted_release_puts_the_previous_units_back_before_the_previous_release_starts() {
    let host = Host::with_release_a().await;
    host.install_units();
    host.stage_signed("1.1", &release_with_units("1.1", &[(SERVICE, "1.1"), (SOCKET, "1.1")]));
    let installer = host.installer(FakeAgent::healthy(&["1.0"]).crashing(&["1.1"]));
    let r = installer.run().await.unwrap();
    assert_eq!(r.outcome, Outcome::Reverted, "{r:?}");
    assert!(r.reason.ends_with("reverted to 1.0"), "{}", r.reason);
    assert_eq!(
        *installer.control.calls.borrow(),
        ["reload (# release 1.1)", "socket", "restart 1.1", "reload ([Unit])", "socket", "restart 1.0"]
    );
    for rel in [SERVICE, SOCKET] {
        assert_eq!(host.installed(rel), Some(unit_text(rel, &[])), "{rel} is 1.0's again");
    }
}

#[tokio::test(start_paused = true)]
async fn a_unit_that_cannot_be_written_or_reloaded_aborts_before_any_restart() {
    let host = Host::with_release_a().await;
    host.install_units();
    let releases = Releases::new(&host.prefix);
    // The service is written first, then the socket fails: a non-empty directory where its
    // temporary file goes (root cannot write there either).
    let in_the_way = host.units.unit_dir.join(".opsagent-helper.socket.opsagent-upgrade");
    std::fs::create_dir_all(in_the_way.join("x")).unwrap();
    host.stage_signed("1.1", &release_with_units("1.1", &[(SERVICE, "1.1"), (SOCKET, "1.1")]));
    let installer = host.installer(FakeAgent::healthy(&["1.0", "1.1"]));
    let r = installer.run().await.unwrap();
    assert_eq!(r.outcome, Outcome::Reverted, "{r:?}");
    let socket = host.units.unit_dir.join("opsagent-helper.socket");
    assert!(r.reason.starts_with(&format!("cannot install the units of 1.1: {}: ", socket.display())), "{}", r.reason);
    assert!(r.reason.ends_with("reverted to 1.0, which kept running"), "{}", r.reason);
    assert_eq!(host.result(), r);
    assert!(installer.control.started.borrow().is_empty(), "nothing was restarted");
    // The service written before the failure is put back (and systemd told so).
    assert_eq!(*installer.control.calls.borrow(), ["reload ([Unit])"]);
    assert_eq!(host.installed(SERVICE), Some(unit_text(SERVICE, &[])));
    assert_eq!(host.current().as_deref(), Some("1.0"));
    assert!(!releases.path("1.1").exists());

    // systemd refusing the reload aborts the same way.
    std::fs::remove_dir_all(&in_the_way).unwrap();
    host.stage_signed("1.1", &release_with_units("1.1", &[(SERVICE, "1.1")]));
    let installer = host.installer(FakeAgent { reload_fails: true, ..FakeAgent::healthy(&["1.0", "1.1"]) });
    let r = installer.run().await.unwrap();
    assert_eq!(r.outcome, Outcome::Reverted, "{r:?}");
    assert!(r.reason.contains("systemd did not reload its configuration") && r.reason.contains("Access denied"));
    assert!(installer.control.started.borrow().is_empty(), "nothing was restarted");
    assert_eq!(*installer.control.calls.borrow(), ["reload (# release 1.1)", "reload ([Unit])"]);
    assert_eq!(host.installed(SERVICE), Some(unit_text(SERVICE, &[])));
    assert_eq!(host.current().as_deref(), Some("1.0"));
}

#[tokio::test(start_paused = true)]
async fn hosts_without_systemd_keep_their_files() {
    let mut host = Host::with_release_a().await;
    host.install_units();
    host.cron = true;
    host.stage_signed("1.1", &release_with_units("1.1", &[(SERVICE, "1.1"), (SOCKET, "1.1")]));
    let installer = host.installer(FakeAgent::healthy(&["1.1"]));
    assert_eq!(installer.run().await.unwrap().outcome, Outcome::Confirmed);
    assert_eq!(*installer.control.calls.borrow(), ["restart 1.1"]);
    assert_eq!(host.installed(SERVICE), Some(unit_text(SERVICE, &[])));
}
