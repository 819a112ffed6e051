//! The daemon's part of an upgrade against a fake downloader and a fake installer.

use std::sync::Mutex;

use opsagent_shared::upgrade::Outcome;

use super::*;

struct FakeFetch {
    fail_on: Option<&'static str>,
    fetched: Mutex<Vec<String>>,
}

impl FakeFetch {
    fn ok() -> Self {
        Self { fail_on: None, fetched: Mutex::new(Vec::new()) }
    }
}

impl Fetch for FakeFetch {
    async fn fetch(&self, url: &str, dest: &Path, _max: u64) -> Result<(), String> {
        self.fetched.lock().unwrap().push(url.to_string());
        if self.fail_on.is_some_and(|s| url.ends_with(s)) {
            return Err("HTTP 404 Not Found".into());
        }
        std::fs::write(dest, url).map_err(|e| e.to_string())
    }
}

/// Plays the installer: answers the start with the record it would write.
struct FakeInstaller {
    state_dir: PathBuf,
    answer: Option<(Outcome, &'static str)>,
    started: Mutex<u32>,
}

impl StartInstaller for FakeInstaller {
    async fn start(&self) -> Result<(), String> {
        *self.started.lock().unwrap() += 1;
        let staged = hand::staged_dir(&self.state_dir);
        let order: Order = serde_json::from_slice(&std::fs::read(staged.join(hand::ORDER)).unwrap()).unwrap();
        assert!(staged.join(hand::ARCHIVE).is_file() && staged.join(hand::SIGNATURE).is_file());
        match self.answer {
            None => Err("Access denied".into()),
            Some((outcome, reason)) => {
                let r = Record {
                    version: order.version,
                    from: order.from,
                    outcome,
                    reason: reason.into(),
                    at: now_unix(),
                    reported: false,
                };
                std::fs::create_dir_all(hand::result_file(&self.state_dir).parent().unwrap()).unwrap();
                std::fs::write(hand::result_file(&self.state_dir), serde_json::to_vec(&r).unwrap()).unwrap();
                Ok(())
            }
        }
    }
}

fn settings(dir: &Path, trigger: Trigger) -> UpgradeSettings {
    UpgradeSettings {
        state_dir: dir.to_path_buf(),
        base_remote: Some("https://releases.example/".into()),
        running: "1.0".into(),
        holdoff: Duration::from_secs(3600),
        max_bytes: 1 << 20,
        verdict_wait: Duration::from_secs(120),
        trigger,
    }
}

fn order(version: &str) -> UpdateOrder {
    UpdateOrder { version: version.into(), url: format!("https://releases.example/{version}/opsagent.tgz") }
}

fn installer(dir: &Path, answer: Option<(Outcome, &'static str)>) -> FakeInstaller {
    FakeInstaller { state_dir: dir.to_path_buf(), answer, started: Mutex::new(0) }
}

#[tokio::test(start_paused = true)]
async fn an_order_is_downloaded_staged_and_handed_to_the_installer() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let fetch = FakeFetch::ok();
    let inst = installer(dir.path(), Some((Outcome::Switched, "switched")));
    let v = carry_out(&s, &order("1.1"), &fetch, &inst).await;
    assert!(matches!(&v, Verdict::Installed(r) if r.outcome == Outcome::Switched && r.from == "1.0"), "{v:?}");
    assert_eq!(
        *fetch.fetched.lock().unwrap(),
        ["https://releases.example/1.1/opsagent.tgz", "https://releases.example/1.1/opsagent.tgz.minisig"]
    );
    assert_eq!(*inst.started.lock().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn nothing_happens_for_the_running_version_or_a_bad_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let (fetch, inst) = (FakeFetch::ok(), installer(dir.path(), None));
    assert_eq!(carry_out(&s, &order("1.0"), &fetch, &inst).await, Verdict::AlreadyRunning);
    let v = carry_out(&s, &order("../1.1"), &fetch, &inst).await;
    assert!(matches!(&v, Verdict::Failed { reason, .. } if reason.contains("not a release version")), "{v:?}");
    let bad_url = UpdateOrder { version: "1.1".into(), url: "file:///etc/passwd".into() };
    let v = carry_out(&s, &bad_url, &fetch, &inst).await;
    assert!(matches!(&v, Verdict::Failed { reason, .. } if reason.contains("not an http(s) URL")), "{v:?}");
    let forged = UpdateOrder { version: "1.1".into(), url: "https://r.example/1.1/a.tgz\nFORGED".into() };
    let v = carry_out(&s, &forged, &fetch, &inst).await;
    assert!(matches!(&v, Verdict::Failed { reason, .. } if reason.contains("is not a URL")), "{v:?}");
    assert!(fetch.fetched.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_download_is_reported_and_leaves_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let fetch = FakeFetch { fail_on: Some(".minisig"), ..FakeFetch::ok() };
    let inst = installer(dir.path(), Some((Outcome::Switched, "")));
    let v = carry_out(&s, &order("1.1"), &fetch, &inst).await;
    assert!(
        matches!(&v, Verdict::Failed { reason, record: None } if reason.contains("opsagent.tgz.minisig failed: HTTP 404")),
        "{v:?}"
    );
    assert!(!hand::staged_dir(dir.path()).join(hand::ORDER).exists());
    assert_eq!(*inst.started.lock().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_installers_refusal_comes_back_and_holds_that_version_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let fetch = FakeFetch::ok();
    let inst = installer(dir.path(), Some((Outcome::Rejected, "the archive's signature does not verify")));
    let v = carry_out(&s, &order("1.1"), &fetch, &inst).await;
    let Verdict::Failed { reason, record: Some(r) } = v else { panic!("{v:?}") };
    assert!(reason.contains("does not verify") && r.outcome == Outcome::Rejected);

    // The same version again: held off, nothing downloaded.
    let before = fetch.fetched.lock().unwrap().len();
    let v = carry_out(&s, &order("1.1"), &fetch, &inst).await;
    assert!(matches!(&v, Verdict::HeldOff { until, .. } if *until >= now_unix() + 3500), "{v:?}");
    assert_eq!(fetch.fetched.lock().unwrap().len(), before);

    // Another version is tried at once.
    let inst2 = installer(dir.path(), Some((Outcome::Switched, "")));
    assert!(matches!(carry_out(&s, &order("1.2"), &fetch, &inst2).await, Verdict::Installed(_)));

    // After the hold-off the failed version is tried again.
    let mut old = last_record(dir.path()).unwrap();
    old.version = "1.1".into();
    old.outcome = Outcome::Reverted;
    old.at = now_unix() - 3601;
    std::fs::write(hand::result_file(dir.path()), serde_json::to_vec(&old).unwrap()).unwrap();
    assert!(matches!(carry_out(&s, &order("1.1"), &fetch, &inst2).await, Verdict::Installed(_)));
}

#[tokio::test(start_paused = true)]
async fn a_denied_unit_start_is_a_failure_and_the_order_is_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let v = carry_out(&s, &order("1.1"), &FakeFetch::ok(), &installer(dir.path(), None)).await;
    assert!(
        matches!(&v, Verdict::Failed { reason, .. } if reason.contains("cannot start opsagent-upgrade.service: Access denied")),
        "{v:?}"
    );
    assert!(!hand::staged_dir(dir.path()).join(hand::ORDER).exists());
}

#[tokio::test(start_paused = true)]
async fn on_a_cron_host_the_order_waits_for_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Supervisor);
    let inst = installer(dir.path(), None);
    let started = tokio::time::Instant::now();
    assert_eq!(carry_out(&s, &order("1.1"), &FakeFetch::ok(), &inst).await, Verdict::Pending);
    assert!(started.elapsed() >= Duration::from_secs(120));
    assert_eq!(*inst.started.lock().unwrap(), 0, "no unit is started without systemd");
    assert!(hand::staged_dir(dir.path()).join(hand::ORDER).is_file(), "the order stays for the supervisor");
}

#[test]
fn failures_are_marked_reported_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(unreported_failure(dir.path()), None);
    let r = Record {
        version: "1.1".into(),
        from: "1.0".into(),
        outcome: Outcome::Reverted,
        reason: "1.1 did not complete a Handshake within 60 s; reverted to 1.0".into(),
        at: 7,
        reported: false,
    };
    std::fs::create_dir_all(dir.path().join("upgrade")).unwrap();
    std::fs::write(hand::result_file(dir.path()), serde_json::to_vec(&r).unwrap()).unwrap();
    let found = unreported_failure(dir.path()).unwrap();
    mark_reported(dir.path(), &found).unwrap();
    assert_eq!(unreported_failure(dir.path()), None);
    assert!(last_record(dir.path()).unwrap().reported);
    // Remembered past the next record: a later upgrade does not lift the hold-off.
    let later = Record { version: "1.0".into(), outcome: Outcome::Confirmed, at: now_unix(), ..found.clone() };
    std::fs::write(hand::result_file(dir.path()), serde_json::to_vec(&later).unwrap()).unwrap();
    assert_eq!(last_failure(dir.path(), "1.1").map(|r| r.outcome), Some(Outcome::Reverted));
    assert_eq!(last_failure(dir.path(), "1.2"), None);
}

#[test]
fn a_report_is_pending_once_and_the_last_stays_for_status() {
    let reports = UpgradeReports::default();
    let f = UpgradeFailure { version: "1.1".into(), running: "1.0".into(), reason: "x".into(), at_unix: 1 };
    reports.push(f.clone());
    assert_eq!(reports.take_pending(), Some(f.clone()));
    assert_eq!(reports.take_pending(), None, "once");
    assert_eq!(reports.last(), Some(f));
}

/// Issue #18 item 1, from manager.py `__act_update` + update.sh: `url` is the backend's
/// WebSocket URI and the release is `BASE_REMOTE/VERSION/`.
#[test]
fn the_orders_url_is_a_backend_uri_or_a_release_archive() {
    let o = |url: &str| UpdateOrder { version: "1.1".into(), url: url.into() };
    let base = Some("https://s3.amazonaws.com/visualops/");
    assert_eq!(
        resolve(&o("wss://api.visualops.io:443/agent/"), base).unwrap(),
        Resolved {
            release_url: "https://s3.amazonaws.com/visualops/1.1/opsagent.tgz".into(),
            backend: Some("wss://api.visualops.io:443/agent/".into())
        }
    );
    assert_eq!(
        resolve(&o("ws://10.0.0.1:9000/agent/"), base).unwrap().backend.as_deref(),
        Some("ws://10.0.0.1:9000/agent/")
    );
    assert_eq!(
        resolve(&o("https://dl.example/1.1/opsagent.tgz"), base).unwrap(),
        Resolved { release_url: "https://dl.example/1.1/opsagent.tgz".into(), backend: None }
    );
    let err = resolve(&o("wss://api.visualops.io/agent/"), None).unwrap_err();
    assert!(err.contains("base_remote, which is not set"), "{err}");
    assert!(resolve(&o("https://dl.example/1.1/"), base).unwrap_err().contains("not an http(s) URL of a .tgz"));
    assert!(resolve(&o("5"), base).is_err());
}

#[tokio::test(start_paused = true)]
async fn a_backend_uri_order_fetches_from_base_remote_and_the_new_release_adopts_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let fetch = FakeFetch::ok();
    let inst = installer(dir.path(), Some((Outcome::Switched, "switched")));
    let order = UpdateOrder { version: "1.1".into(), url: "wss://new-backend.example/agent/".into() };
    assert!(matches!(carry_out(&s, &order, &fetch, &inst).await, Verdict::Installed(_)));
    assert_eq!(
        *fetch.fetched.lock().unwrap(),
        ["https://releases.example/1.1/opsagent.tgz", "https://releases.example/1.1/opsagent.tgz.minisig"]
    );
    let staged: Order =
        serde_json::from_slice(&std::fs::read(hand::staged_dir(dir.path()).join(hand::ORDER)).unwrap()).unwrap();
    assert_eq!(staged.url, "https://releases.example/1.1/opsagent.tgz");
    // The old release (restarted by nobody yet) does not take the URI; 1.1 does.
    assert_eq!(backend_override(dir.path(), "1.0"), None);
    assert_eq!(backend_override(dir.path(), "1.1").as_deref(), Some("wss://new-backend.example/agent/"));
    assert_eq!(backend_override(dir.path(), "1.1").as_deref(), Some("wss://new-backend.example/agent/"), "kept");
}

#[tokio::test(start_paused = true)]
async fn a_failed_upgrade_never_switches_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), Trigger::Systemd);
    let inst = installer(dir.path(), Some((Outcome::Reverted, "1.1 did not complete a Handshake")));
    let order = UpdateOrder { version: "1.1".into(), url: "wss://new-backend.example/agent/".into() };
    assert!(matches!(carry_out(&s, &order, &FakeFetch::ok(), &inst).await, Verdict::Failed { .. }));
    assert_eq!(backend_override(dir.path(), "1.0"), None, "the revived 1.0 keeps its backend");
    assert_eq!(backend_override(dir.path(), "1.1"), None, "and the pending URI is gone");
    // A denied installer start withdraws it at once.
    let denied = installer(dir.path(), None);
    let order = UpdateOrder { version: "1.2".into(), url: "wss://other.example/agent/".into() };
    assert!(matches!(carry_out(&s, &order, &FakeFetch::ok(), &denied).await, Verdict::Failed { .. }));
    assert_eq!(backend_override(dir.path(), "1.2"), None);
}

#[tokio::test(start_paused = true)]
async fn without_a_wait_an_earlier_record_of_the_same_version_is_not_this_orders() {
    let dir = tempfile::tempdir().unwrap();
    let s = UpgradeSettings {
        verdict_wait: Duration::ZERO,
        holdoff: Duration::ZERO,
        ..settings(dir.path(), Trigger::Supervisor)
    };
    let refused = Record {
        version: "0.9".into(),
        from: "1.0".into(),
        outcome: Outcome::Rejected,
        reason: "0.9 is older than the running 1.0".into(),
        at: now_unix(),
        reported: false,
    };
    std::fs::create_dir_all(hand::result_file(dir.path()).parent().unwrap()).unwrap();
    std::fs::write(hand::result_file(dir.path()), serde_json::to_vec(&refused).unwrap()).unwrap();
    let v = carry_out(&s, &order("0.9"), &FakeFetch::ok(), &installer(dir.path(), None)).await;
    assert_eq!(v, Verdict::Pending);
    assert!(hand::staged_dir(dir.path()).join(hand::ORDER).is_file(), "staged for the installer run that follows");
}
