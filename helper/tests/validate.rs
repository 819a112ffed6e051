//! A compromised daemon sends hostile parameters: the helper decodes every request
//! through the catalogue, refuses what `opsagent check` refuses with an error naming the
//! parameter, and runs nothing.
//!
//! The attacker is a real client process running as the agent's uid (`nobody` here,
//! allowed with `--allow-user`), speaking the wire protocol with hand-written JSON, as
//! a compromised daemon would (the typed client API cannot even build these requests).
//! It needs root, as the helper does.

#![allow(clippy::unwrap_used)] // test support code outside #[test] fns

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opsagent_proto::codec::{self, DEFAULT_MAX_FRAME};
use opsagent_proto::request::{ErrorCode, Reply, ReplyFrame};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_opsagent-helper");
/// The agent's uid and group in these tests.
const AGENT_UID: u32 = 65534;
const AGENT_GID: u32 = 65534;
const ATTACK_ENV: &str = "OPSAGENT_VALIDATE_ATTACK";

struct Helper {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Helper {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let sock = dir.join("h.sock");
        let mut child = Command::new(BIN)
            .args(["--allow-user", "nobody", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(&sock)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "helper did not start; log:\n{}", log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // The agent uid must reach the socket inside it.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// One hostile request: module, parameters, the parameter the refusal must name, and
/// a path that exists only if the module ran.
struct Attack {
    module: &'static str,
    params: Value,
    param: &'static str,
    witness: Option<PathBuf>,
}

/// Every value here is one `opsagent check` refuses.
fn attacks(dir: &Path) -> Vec<Attack> {
    let p = |name: &str| dir.join(name);
    let s = |name: &str| p(name).display().to_string();
    let a = |module, params, param| Attack { module, params, param, witness: None };
    let w = |module, params, param, witness: PathBuf| Attack { module, params, param, witness: Some(witness) };
    vec![
        // Cron: a newline in a time field, the user or the command adds a root job.
        a("linux.cronjob", json!({"cmd": ["true"], "user": "nobody", "minute": "* * * * * echo injected > /tmp/x\n0"}), "minute"),
        a("linux.cronjob", json!({"cmd": ["true"], "user": "nobody", "hour": "1\n* * * * * id"}), "hour"),
        a("linux.cronjob", json!({"cmd": ["true"], "user": "nobody", "day-of-week": "8"}), "day-of-week"),
        a("linux.cronjob", json!({"cmd": ["true"], "user": "nobody\n* * * * * root id"}), "user"),
        a("linux.cronjob", json!({"cmd": ["true\n* * * * * id"], "user": "nobody"}), "cmd"),
        // Paths: relative, climbing, NUL, newline.
        w("linux.file", json!({"path": "relative/x", "content": "x"}), "path", p("relative")),
        w("linux.file", json!({"path": format!("{}/../escaped", s("sub")), "content": "x"}), "path", p("escaped")),
        w("linux.file", json!({"path": format!("{}\u{0}b", s("nul")), "content": "x"}), "path", p("nul")),
        w("linux.file", json!({"path": format!("{}\nb", s("nl")), "content": "x"}), "path", p("nl\nb")),
        // Modes beyond 07777, as digits and as a JSON number.
        w("linux.file", json!({"path": s("mode-a"), "content": "x", "mode": "77777"}), "mode", p("mode-a")),
        w("linux.file", json!({"path": s("mode-b"), "content": "x", "mode": 32767}), "mode", p("mode-b")),
        // Accounts with a colon or a newline (passwd/group line injection).
        w("linux.file", json!({"path": s("own-a"), "content": "x", "user": "root:0"}), "user", p("own-a")),
        w("linux.file", json!({"path": s("own-b"), "content": "x", "group": "root\nx"}), "group", p("own-b")),
        a("linux.user", json!({"username": "evil:x:0:0::/root:/bin/sh", "password": "x"}), "username"),
        a("linux.user", json!({"username": "bob", "password": "x", "groups": ["sudo\nroot"]}), "groups"),
        a("linux.group", json!({"groupname": "-o"}), "groupname"),
        w("linux.dir", json!({"path": [s("dir-ok"), "rel/dir"]}), "path", p("dir-ok")),
        w("linux.symlink", json!({"source": s("link"), "target": "../../etc/shadow"}), "target", p("link")),
        // Units with a slash.
        a("linux.service", json!({"name": [{"key": "../../etc/x"}]}), "name"),
        a("linux.service", json!({"name": ["a/b.service"]}), "name"),
        // Commands: relative cwd, a user with a newline, a bad variable name.
        w("linux.cmd", json!({"cmd": format!("touch {}", s("cmd-a")), "cwd": "tmp"}), "cwd", p("cmd-a")),
        w("linux.cmd", json!({"cmd": format!("touch {}", s("cmd-b")), "cwd": "/", "user": "root\n"}), "user", p("cmd-b")),
        w("linux.cmd", json!({"cmd": format!("touch {}", s("cmd-c")), "cwd": "/", "env": {"A B": "1"}}), "env", p("cmd-c")),
        // Option injection and relative checkouts.
        w("common.git", json!({"path": s("repo"), "repo": format!("--upload-pack=touch {}", s("git-x"))}), "repo", p("git-x")),
        a("common.git", json!({"path": "srv/app", "repo": "https://example.invalid/r.git"}), "path"),
        a("linux.apt.package", json!({"name": [{"key": "-oAPT::Update::Pre-Invoke::=id"}]}), "name"),
        a("linux.apt.package", json!({"name": ["hello"], "deb-conf-file": "etc/shadow"}), "deb-conf-file"),
        a("linux.apt.repo", json!({"name": "../../cron.d/x", "content": "deb x y z"}), "name"),
        a("linux.yum.repo", json!({"name": "a/b", "content": "[x]"}), "name"),
        a("linux.mount", json!({"device": "/dev/null", "filesystem": "ext4", "path": "mnt"}), "path"),
        a("common.timezone", json!({"name": "../../../etc/shadow"}), "name"),
        a("linux.docker.running", json!({"container": "c", "image": "i", "port_bindings": {"99999": "80"}}), "port_bindings"),
        a("linux.supervisord", json!({"config": "supervisord.conf", "name": ["app"]}), "config"),
        a("common.virtualenv", json!({"path": "/srv/venv", "requirements-file": "req.txt"}), "requirements-file"),
    ]
}

/// The attacker: sends every attack as a raw frame and prints each reply as one JSON
/// line. Run by `hostile_parameters_are_refused_by_the_helper_itself` as the agent's
/// uid; without the variable it does nothing.
#[test]
fn attacker_child() {
    let Some(spec) = std::env::var_os(ATTACK_ENV) else {
        return;
    };
    let spec: Value = serde_json::from_str(spec.to_str().unwrap()).unwrap();
    let dir = PathBuf::from(spec["dir"].as_str().unwrap());
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("h.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut call = |id: u64, request: Value| -> ReplyFrame {
        let frame = json!({"id": id, "request": request});
        std::io::Write::write_all(&mut s, &codec::encode(&frame, DEFAULT_MAX_FRAME).unwrap()).unwrap();
        let mut len = [0u8; 4];
        std::io::Read::read_exact(&mut s, &mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        std::io::Read::read_exact(&mut s, &mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    };
    let hello = call(0, json!({"type": "hello", "protocol_version": opsagent_proto::PROTOCOL_VERSION, "agent_version": "x"}));
    assert!(matches!(hello.reply, Reply::Hello { .. }), "{hello:?}");
    for (i, attack) in attacks(&dir).into_iter().enumerate() {
        let id = i as u64 + 1;
        let request = json!({
            "type": "apply", "state_id": format!("attack-{id}"), "recipe_version": 1,
            "module": attack.module, "params": attack.params,
        });
        let reply = call(id, request);
        println!("REPLY {}", serde_json::to_string(&reply).unwrap());
    }
}

#[test]
fn hostile_parameters_are_refused_by_the_helper_itself() {
    let dir = temp_dir();
    let helper = Helper::start(dir.path(), &[]);
    fs::create_dir(dir.path().join("sub")).unwrap();
    let spec = json!({"dir": dir.path()}).to_string();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "attacker_child", "--nocapture", "--test-threads=1"])
        .env(ATTACK_ENV, spec)
        .uid(AGENT_UID)
        .gid(AGENT_GID)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<ReplyFrame> = stdout
        .lines()
        .filter_map(|l| l.split_once("REPLY ").map(|(_, r)| r))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let attacks = attacks(dir.path());
    assert_eq!(
        replies.len(),
        attacks.len(),
        "the attacker did not finish:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(attacks.len() >= 30);
    let mut failures = Vec::new();
    for (i, (attack, frame)) in attacks.iter().zip(&replies).enumerate() {
        assert_eq!(frame.id, i as u64 + 1);
        let named = format!("parameter \"{}\"", attack.param);
        let ok = matches!(&frame.reply, Reply::Error(e) if e.code == ErrorCode::InvalidParameter
            && e.message.contains(attack.module) && e.message.contains(&named));
        if !ok {
            failures.push(format!("{} {}: {:?}", attack.module, attack.params, frame.reply));
        }
        if let Some(w) = &attack.witness {
            if w.exists() {
                failures.push(format!("{} {}: {} exists: the module ran", attack.module, attack.params, w.display()));
            }
        }
    }
    // Every refusal is logged (the log is read by another thread: wait for it).
    let count = |log: &str| log.lines().filter(|l| l.contains("request refused") && l.contains("InvalidParameter")).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&helper.log()) < attacks.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing reached a module: the helper logs "apply" before it runs one.
    let log = helper.log();
    for line in log.lines().filter(|l| l.contains("attack-")) {
        failures.push(format!("a module was started: {line}"));
    }
    assert!(failures.is_empty(), "{} of {} attacks got through:\n{}", failures.len(), attacks.len(), failures.join("\n"));
    assert_eq!(count(&log), attacks.len(), "log:\n{log}");
    // With its reason, control characters escaped.
    assert!(log.contains(r#"parameter \"minute\""#) || log.contains("parameter \"minute\""), "{log}");
    assert!(!log.contains("echo injected > /tmp/x\n0"), "raw newline in the log:\n{log}");
}
