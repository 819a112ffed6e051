// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! The `opsagent` command line, run as a real process.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{bin, Files};

/// The demo's tests share /tmp/opsagent-demo: one at a time.
static DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn opsagent(args: &[&str]) -> std::process::Output {
    Command::new(bin("opsagent")).args(args).output().unwrap()
}

fn original_recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/visualops-basic")
}

#[test]
fn check_accepts_every_original_test_recipe() {
    let dir = original_recipes();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".json"))
        .collect();
    files.sort();
    assert!(files.len() >= 36, "the original basic recipes are there");
    let args: Vec<&str> = std::iter::once("check").chain(files.iter().map(String::as_str)).collect();
    let out = opsagent(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), files.len(), "{stdout}");
}

#[test]
fn check_names_the_bad_state_and_parameter_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.json");
    std::fs::write(
        &f,
        r#"{"state": [
            {"id": "good", "module": "linux.file", "parameter": {"path": "/x"}},
            {"id": "bad-mode", "module": "linux.file", "parameter": {"path": "/x", "mode": "rwx"}},
            {"id": "unknown", "module": "linux.nope", "parameter": {}},
            {"id": "extra", "module": "linux.file", "parameter": {"path": "/x", "colour": "red"}}
        ]}"#,
    )
    .unwrap();
    let out = opsagent(&["check", f.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("ok "));
    assert!(lines[1].starts_with("INVALID") && lines[1].contains("\"mode\": expected an octal mode"), "{}", lines[1]);
    assert!(lines[2].contains("unknown module \"linux.nope\""), "{}", lines[2]);
    assert!(lines[3].starts_with("ok ") && lines[3].contains("unknown parameter \"colour\""), "{}", lines[3]);

    std::fs::write(&f, r#"{"state": [{"module": "linux.file", "parameter": {}}]}"#).unwrap();
    let out = opsagent(&["check", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has no \"id\""));
}

#[test]
fn invalid_configuration_exits_2_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("opsagent.conf");
    std::fs::write(&f, "[agent]\nround_delay = ten\n").unwrap();
    let out = opsagent(&["run", "--config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opsagent.conf") && err.contains("round_delay"), "{err}");

    let out = opsagent(&["run", "--config", f.with_file_name("missing.conf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn apply_runs_the_demo_recipe_through_a_private_helper_and_is_idempotent() {
    let _demo = DEMO.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = std::fs::remove_dir_all("/tmp/opsagent-demo");
    let helper = bin("opsagent-helper");
    let run = || {
        let out = Command::new(bin("opsagent")).arg("apply").env("OPSAGENT_HELPER_BIN", &helper).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let first = run();
    assert_eq!(first.lines().filter(|l| l.starts_with("ok ")).count(), 5, "{first}");
    assert!(first.contains("changed:"), "{first}");
    // Each change is said once per line, not in the comment and again after `changed:`.
    for line in first.lines().filter(|l| l.contains("changed:")) {
        let (said, changes) = line.split_once("changed:").unwrap();
        for change in changes.split(", ").map(str::trim).filter(|c| !c.is_empty()) {
            assert!(!said.contains(change), "{change:?} said twice: {line}");
        }
    }
    assert_eq!(
        std::fs::read_to_string("/tmp/opsagent-demo/current/app.conf").unwrap(),
        "# written by opsagent\nlisten = 8080\nworkers = 4\n"
    );
    let second = run();
    // The directory, file and link are unchanged; only the command runs again.
    let changed: Vec<&str> = second.lines().filter(|l| l.contains("changed:")).collect();
    assert_eq!(changed.len(), 1, "{second}");
    assert!(changed[0].contains("linux.cmd"), "{second}");
}

#[test]
fn apply_downloads_remote_content_like_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::start();
    let url = files.put("motd", b"served over http\n".to_vec());
    let target = dir.path().join("motd");
    let recipe = dir.path().join("remote.json");
    let doc = serde_json::json!({"recipe_version": 1, "state": [
        {"id": "remote", "module": "linux.file", "parameter": {"path": target, "remote_uri": url, "mode": "0644"}}
    ]});
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let run = || {
        let out = Command::new(bin("opsagent"))
            .arg("apply")
            .arg(&recipe)
            .env("OPSAGENT_HELPER_BIN", bin("opsagent-helper"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let first = run();
    assert!(first.contains("changed:"), "{first}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "served over http\n");
    let second = run();
    assert!(!second.contains("changed:"), "{second}");
    assert_eq!(files.hits("motd"), 2, "remote content is fetched every round");
}

#[test]
fn apply_fails_cleanly_when_the_private_helper_cannot_start() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // Inherits the listening socket and exits at once: the client must not wait for
    // it forever (the CLI keeps no copy of the listening socket).
    let fake = tmp.path().join("broken-helper");
    std::fs::write(&fake, "#!/bin/sh\necho 'broken helper: cannot start' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let recipe = tmp.path().join("r.json");
    let target = tmp.path().join("never-written");
    let doc = serde_json::json!({"state": [
        {"id": "s1", "module": "linux.file", "parameter": {"path": target, "content": "x"}},
        {"id": "s2", "module": "linux.file", "parameter": {"path": target, "content": "y"}}
    ]});
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let child = Command::new(bin("opsagent"))
        .arg("apply")
        .arg(&recipe)
        .env("OPSAGENT_HELPER_BIN", &fake)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.starts_with("FAILED [1/2] s1  linux.file  helper: "), "{stdout}");
    assert!(stdout.contains("1 later state(s) not run"), "{stdout}");
    assert!(stderr.contains("broken helper: cannot start"), "{stderr}");
    assert!(!target.exists());
    // The private socket's directory went with the helper.
    assert!(!std::env::temp_dir().join(format!("opsagent-apply-{pid}")).exists());
}

#[test]
fn version_flag() {
    let out = opsagent(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("opsagent "));
}

/// Root's local apply gets a helper that can do root's storage jobs: on a host without
/// systemd as PID 1 (CI's), `linux.mount` runs mount(8), which needs CAP_SYS_ADMIN.
#[test]
fn apply_makes_and_mounts_a_filesystem_on_a_loop_device() {
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let (ok, dev) = run("losetup", &["--find", "--show", &image.to_string_lossy()]);
    assert!(ok, "a loop device is needed (root, /dev/loop-control): {dev}");
    let dev = dev.trim().to_string();
    let mnt = dir.path().join("mnt");
    let recipe = dir.path().join("storage.json");
    let doc = serde_json::json!({"recipe_version": 1, "state": [
        {"id": "fs", "module": "linux.mkfs", "parameter": {"device": dev, "fstype": "ext4"}},
        {"id": "mnt", "module": "linux.mount", "parameter": {"path": mnt, "device": dev, "filesystem": "ext4"}}
    ]});
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let out = Command::new(bin("opsagent"))
        .arg("apply")
        .arg(&recipe)
        .env("OPSAGENT_HELPER_BIN", bin("opsagent-helper"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&format!(" {} ", mnt.display()));
    let _ = run("umount", &[&mnt.to_string_lossy()]);
    let _ = run("losetup", &["-d", &dev]);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(mounted, "{} is not mounted: {stdout}", mnt.display());
}

/// On a terminal, the demo says what it will change before changing it; in a pipe (as in
/// the test above) it does not, so scripts see only the result lines.
#[test]
fn apply_without_a_file_on_a_terminal_says_what_the_demo_does_first() {
    let _demo = DEMO.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let cmd = format!("OPSAGENT_HELPER_BIN={} {} apply", bin("opsagent-helper").display(), bin("opsagent").display());
    // script(1) gives the command a pseudo-terminal.
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success(), "{text}");
    let notice = text.find("no FILE given, so applying the built-in demo recipe").unwrap_or_else(|| panic!("{text}"));
    let first_result = text.find("[1/5]").unwrap_or_else(|| panic!("{text}"));
    assert!(notice < first_result, "the notice comes first: {text}");
    assert!(text.contains("Nothing outside /tmp/opsagent-demo changes"), "{text}");
}

/// `opsagent apply --helper-socket` against a helper with a `recipe_key` follows that
/// helper's rule: the states, which nobody signed, are refused and nothing is written.
#[test]
fn apply_against_a_helper_that_verifies_recipes_runs_nothing_unsigned() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("opsagent.conf");
    // Any valid minisign public key: nothing here is signed with it.
    std::fs::write(
        &conf,
        "[userdata]\napp_id = app-1\nrecipe_key = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\n",
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let socket = tmp.path().join("h.sock");
    let state = tmp.path().join("hs");
    let helper = common::start_helper_with(
        tmp.path(),
        &socket,
        &["--config", conf.to_str().unwrap(), "--state-dir", state.to_str().unwrap()],
    );
    let target = tmp.path().join("written");
    let recipe = tmp.path().join("r.json");
    let doc = serde_json::json!([{"module": "linux.file", "parameter": {"path": target, "content": "x"}}]);
    std::fs::write(&recipe, doc.to_string()).unwrap();
    let out = Command::new(bin("opsagent"))
        .args(["apply", "--helper-socket", socket.to_str().unwrap(), recipe.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("a recipe_key is configured"), "{text}\nhelper: {}", helper.log_text());
    assert!(!target.exists());
}

/// What bash completes with `script` loaded for the words typed so far (the last one
/// being completed), calling the completion function `func`.
fn bash_complete(script: &str, func: &str, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "{script}\nCOMP_WORDS=({})\nCOMP_CWORD={}\n{func}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len() - 1
    );
    let out = Command::new("bash").arg("-c").arg(program).output().expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut got: Vec<String> =
        String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    got.sort();
    got
}

#[test]
fn the_root_programs_complete_the_options_their_help_names() {
    let script = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/completion/opsagent-root-tools.bash"),
    )
    .unwrap();
    let upgrade = bin("opsagent-upgrade");
    let helper = bin("opsagent-helper");
    let f = "_opsagent_root_tool";
    assert_eq!(bash_complete(&script, f, &[upgrade.to_str().unwrap(), "--he"]), ["--health-timeout", "--help"]);
    assert_eq!(bash_complete(&script, f, &[upgrade.to_str().unwrap(), "--restart-c"]), ["--restart-command"]);
    assert_eq!(bash_complete(&script, f, &[helper.to_str().unwrap(), "--allow-u"]), ["--allow-user"]);
    assert_eq!(bash_complete(&script, f, &[helper.to_str().unwrap(), "--reply"]), ["--reply-timeout"]);
    // Not an option: file names, as for any argument.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.conf"), "").unwrap();
    let partial = format!("{}/pol", dir.path().display());
    assert_eq!(
        bash_complete(&script, f, &[helper.to_str().unwrap(), "--policy", &partial]),
        [format!("{}/policy.conf", dir.path().display())]
    );
    // Both names are bound to it (bash-completion loads the file under either name).
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{script}\ncomplete -p opsagent-helper opsagent-upgrade"))
        .output()
        .unwrap();
    let bound = String::from_utf8(out.stdout).unwrap();
    assert!(
        bound.contains("-F _opsagent_root_tool opsagent-helper")
            && bound.contains("-F _opsagent_root_tool opsagent-upgrade"),
        "{bound}"
    );
}

#[test]
fn the_reference_backend_prints_its_bash_completion() {
    let out = Command::new(bin("opsagent-backend")).args(["completion", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.starts_with("# bash completion for opsagent-backend (generated by `opsagent-backend completion bash`)"),
        "{script}"
    );
    assert_eq!(bash_complete(&script, "_opsagent_backend", &["opsagent-backend", "inst"]), ["instances"]);
    let opts = bash_complete(&script, "_opsagent_backend", &["opsagent-backend", "--signing"]);
    assert_eq!(opts, ["--signing-key"]);
    // The hidden `manual` command is not offered.
    assert!(bash_complete(&script, "_opsagent_backend", &["opsagent-backend", "manu"]).is_empty());
}
