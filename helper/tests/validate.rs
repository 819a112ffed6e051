//! A compromised daemon sends hostile parameters: the helper decodes every request
//! through the catalogue, refuses what `opsagent check` refuses with an error naming the
//! parameter, and runs nothing.
//!
//! The attacker is a real client process running as the agent's uid (`nobody` here,
//! allowed with `--allow-user`), speaking the wire protocol with hand-written JSON, as
//! a compromised daemon would (the typed client API cannot even build these requests).
//! It needs root, as the helper does.

#![allow(clippy::unwrap_used)]
// test support code outside #[test] fns
// Plain threads and blocking sockets, as an attacker's client would be: no runtime to
// block, no clock to pause.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opsagent_proto::catalogue::parse_state;
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
            .env("RUST_LOG", "debug")
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

/// One hostile request: a benign state as the daemon serialises it, with one field
/// (`field`, its serialised name) replaced by a hostile value; the parameter the
/// refusal must name; a path that exists only if the module ran.
struct Attack {
    module: &'static str,
    benign: Value,
    field: &'static str,
    hostile: Value,
    param: &'static str,
    witness: Option<PathBuf>,
}

impl Attack {
    /// The `params` of the request: exactly the daemon's serialisation of `benign`, so
    /// that only the hostile value differs from what a helper must accept.
    fn params(&self) -> Value {
        let parsed = parse_state(self.module, &self.benign).unwrap_or_else(|e| panic!("{}: {e}", self.module));
        let mut params = serde_json::to_value(parsed.params).unwrap()["params"].clone();
        params[self.field] = self.hostile.clone();
        params
    }
}

/// Every hostile value here is one `opsagent check` refuses.
fn attacks(dir: &Path) -> Vec<Attack> {
    let p = |name: &str| dir.join(name);
    let s = |name: &str| p(name).display().to_string();
    let at = |module, benign: Value, field, hostile: Value, param, witness: Option<PathBuf>| Attack {
        module,
        benign,
        field,
        hostile,
        param,
        witness,
    };
    let cron = || json!({"cmd": ["true"], "user": "nobody"});
    let file = |name: &str| json!({"path": s(name), "content": "x"});
    let cmd = |name: &str| json!({"cmd": format!("touch {}", s(name)), "cwd": "/"});
    vec![
        // Cron: a newline in a time field, the user or the command adds a root job.
        at("linux.cronjob", cron(), "minute", json!("* * * * * echo injected > /tmp/x\n0"), "minute", None),
        at("linux.cronjob", cron(), "hour", json!("1\n* * * * * id"), "hour", None),
        at("linux.cronjob", cron(), "day_of_week", json!("8"), "day-of-week", None),
        at("linux.cronjob", cron(), "user", json!("nobody\n* * * * * root id"), "user", None),
        at("linux.cronjob", cron(), "cmd", json!(["true\n* * * * * id"]), "cmd", None),
        // Paths: relative, climbing, NUL, newline.
        at("linux.file", file("f"), "path", json!("relative/x"), "path", None),
        at("linux.file", file("f"), "path", json!(format!("{}/../escaped", s("sub"))), "path", Some(p("escaped"))),
        at("linux.file", file("f"), "path", json!(format!("{}\u{0}b", s("nul"))), "path", Some(p("nul"))),
        at("linux.file", file("f"), "path", json!(format!("{}\nb", s("nl"))), "path", Some(p("nl\nb"))),
        // Modes beyond 07777, as digits and as a JSON number.
        at("linux.file", file("mode-a"), "mode", json!("77777"), "mode", Some(p("mode-a"))),
        at("linux.file", file("mode-b"), "mode", json!(32767), "mode", Some(p("mode-b"))),
        // Accounts with a colon or a newline (passwd/group line injection).
        at("linux.file", file("own-a"), "user", json!("root:0"), "user", Some(p("own-a"))),
        at("linux.file", file("own-b"), "group", json!("root\nx"), "group", Some(p("own-b"))),
        at(
            "linux.user",
            json!({"username": "bob", "password": "x"}),
            "username",
            json!("evil:x:0:0::/root:/bin/sh"),
            "username",
            None,
        ),
        at("linux.user", json!({"username": "bob", "password": "x"}), "groups", json!(["sudo\nroot"]), "groups", None),
        at("linux.group", json!({"groupname": "g"}), "groupname", json!("-o"), "groupname", None),
        at(
            "linux.dir",
            json!({"path": [s("dir-ok")]}),
            "path",
            json!([s("dir-ok"), "rel/dir"]),
            "path",
            Some(p("dir-ok")),
        ),
        at(
            "linux.symlink",
            json!({"source": s("link"), "target": "/etc"}),
            "target",
            json!("../../etc/shadow"),
            "target",
            Some(p("link")),
        ),
        // Units with a slash.
        at("linux.service", json!({"name": ["x"]}), "name", json!([{"key": "../../etc/x"}]), "name", None),
        at("linux.service", json!({"name": ["x"]}), "name", json!([{"key": "a/b.service"}]), "name", None),
        // Commands: relative cwd, a user with a newline, a bad variable name.
        at("linux.cmd", cmd("cmd-a"), "cwd", json!("tmp"), "cwd", Some(p("cmd-a"))),
        at("linux.cmd", cmd("cmd-b"), "user", json!("root\n"), "user", Some(p("cmd-b"))),
        at("linux.cmd", cmd("cmd-c"), "env", json!([{"key": "A B", "value": "1"}]), "env", Some(p("cmd-c"))),
        at("linux.cmd", cmd("cmd-d"), "shell", json!("sh"), "shell", Some(p("cmd-d"))),
        // Option injection and relative checkouts.
        at(
            "common.git",
            json!({"path": s("repo"), "repo": "https://example.invalid/r.git"}),
            "repo",
            json!(format!("--upload-pack=touch {}", s("git-x"))),
            "repo",
            Some(p("git-x")),
        ),
        at(
            "common.git",
            json!({"path": s("repo"), "repo": "https://example.invalid/r.git"}),
            "path",
            json!("srv/app"),
            "path",
            None,
        ),
        at(
            "linux.apt.package",
            json!({"name": ["hello"]}),
            "name",
            json!([{"key": "-oAPT::Update::Pre-Invoke::=id"}]),
            "name",
            None,
        ),
        at(
            "linux.apt.package",
            json!({"name": ["hello"]}),
            "deb_conf_file",
            json!("etc/shadow"),
            "deb-conf-file",
            None,
        ),
        at(
            "linux.apt.repo",
            json!({"name": "x", "content": "deb x y z"}),
            "name",
            json!("../../cron.d/x"),
            "name",
            None,
        ),
        at("linux.yum.repo", json!({"name": "x", "content": "[x]"}), "name", json!("a/b"), "name", None),
        at(
            "linux.mount",
            json!({"device": "/dev/null", "filesystem": "ext4", "path": s("mnt")}),
            "path",
            json!("mnt"),
            "path",
            None,
        ),
        at("common.timezone", json!({"name": "UTC"}), "name", json!("../../../etc/shadow"), "name", None),
        at(
            "linux.docker.running",
            json!({"container": "c", "image": "i"}),
            "port_bindings",
            json!([{"key": "99999", "value": "80"}]),
            "port_bindings",
            None,
        ),
        at(
            "linux.supervisord",
            json!({"config": "/etc/supervisord.conf", "name": ["app"]}),
            "config",
            json!("supervisord.conf"),
            "config",
            None,
        ),
        at(
            "common.virtualenv",
            json!({"path": "/srv/venv"}),
            "requirements_file",
            json!("req.txt"),
            "requirements-file",
            None,
        ),
        // Typed parameters (paths, path lists, accounts, cron fields, ports): each is
        // refused by the decode itself, naming the parameter, not by the module.
        at("linux.cronjob", cron(), "minute", json!("1 2"), "minute", None),
        at("linux.cronjob", cron(), "month", json!("1-3\t* id"), "month", None),
        at("linux.cmd", cmd("cmd-e"), "if_path_present", json!(["/", "rel"]), "if-path-present", Some(p("cmd-e"))),
        at("linux.cmd", cmd("cmd-f"), "group", json!("root:x"), "group", Some(p("cmd-f"))),
        at("linux.dir", json!({"path": [s("dir-u")]}), "user", json!("nobody\n"), "user", Some(p("dir-u"))),
        at("common.ssh.known_host", json!({"hostname": "h", "username": "nobody"}), "port", json!(70000), "port", None),
        at("linux.lvm.pv", json!({"path": ["/dev/xvdz"]}), "path", json!(["xvdz"]), "path", None),
        at(
            "linux.puppet.apply",
            json!({"manifests": ["/etc/site.pp"]}),
            "manifests",
            json!(["../x.pp"]),
            "manifests",
            None,
        ),
        at(
            "common.git",
            json!({"path": s("repo"), "repo": "https://example.invalid/r.git"}),
            "ssh_key_file",
            json!("id_rsa"),
            "ssh-key-file",
            None,
        ),
        at("linux.mkfs", json!({"device": "/dev/xvdz", "fstype": "ext4"}), "device", json!("xvdz"), "device", None),
        at(
            "linux.symlink",
            json!({"source": s("src"), "target": s("lnk")}),
            "source",
            json!("src"),
            "source",
            Some(p("lnk")),
        ),
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
    let hello = call(
        0,
        json!({"type": "hello", "protocol_version": opsagent_proto::HELPER_PROTOCOL_VERSION, "agent_version": "x"}),
    );
    assert!(matches!(hello.reply, Reply::Hello { .. }), "{hello:?}");
    for (i, attack) in attacks(&dir).into_iter().enumerate() {
        let id = i as u64 + 1;
        let request = json!({
            "type": "apply", "state_id": format!("attack-{id}"), "recipe_version": 1,
            "module": attack.module, "params": attack.params(),
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
            failures.push(format!("{} {}={}: {:?}", attack.module, attack.field, attack.hostile, frame.reply));
        }
        if let Some(w) = &attack.witness {
            if w.exists() {
                failures.push(format!(
                    "{} {}={}: {} exists: the module ran",
                    attack.module,
                    attack.field,
                    attack.hostile,
                    w.display()
                ));
            }
        }
    }
    // Every refusal is logged (the log is read by another thread: wait for it).
    let count =
        |log: &str| log.lines().filter(|l| l.contains("request refused") && l.contains("InvalidParameter")).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&helper.log()) < attacks.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing reached a module: the helper logs "apply" (at debug) before it runs one.
    let log = helper.log();
    for line in log.lines().filter(|l| l.contains("attack-") && !l.contains("request refused")) {
        failures.push(format!("a module was started: {line}"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} attacks got through:\n{}",
        failures.len(),
        attacks.len(),
        failures.join("\n")
    );
    assert_eq!(count(&log), attacks.len(), "log:\n{log}");
    // With its reason, control characters escaped.
    assert!(log.contains(r#"parameter \"minute\""#) || log.contains("parameter \"minute\""), "{log}");
    assert!(!log.contains("echo injected > /tmp/x\n0"), "raw newline in the log:\n{log}");
}

/// A peer that sends requests and never reads the replies: once the socket's buffers
/// are full the helper's write would wait forever, holding the request (and with it
/// the helper's idle exit). With `--reply-timeout` the connection is dropped and
/// logged, and the request no longer counts as running.
#[test]
fn a_peer_that_never_reads_is_dropped_after_the_reply_timeout() {
    use opsagent_proto::newtypes::StateId;
    use opsagent_proto::request::{ApplyRequest, Request, RequestFrame};
    use std::io::{Read, Write};

    let dir = temp_dir();
    let helper = Helper::start(dir.path(), &["--reply-timeout", "1"]);
    let sock = dir.path().join("h.sock");
    let frame = |id: u64, request: Request| codec::encode(&RequestFrame::new(id, request), DEFAULT_MAX_FRAME).unwrap();
    let mut silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let hello = Request::Hello { protocol_version: opsagent_proto::HELPER_PROTOCOL_VERSION, agent_version: "t".into() };
    silent.write_all(&frame(1, hello.clone())).unwrap();
    // Each outcome carries 64 KiB of output; a few of them fill the socket's buffers.
    // One request at a time (the helper answers "busy" to a request sent while one
    // runs): the next is sent once the helper logged the previous outcome.
    let noisy = parse_state("linux.cmd", &json!({"cmd": "head -c 65536 /dev/zero | tr '\\0' x", "cwd": "/"})).unwrap();
    let timed_out = || helper.log().contains("reply not written in time; closing the connection");
    for id in 2..40u64 {
        let apply = ApplyRequest::new(StateId::parse("noisy").unwrap(), 1, noisy.params.clone());
        if silent.write_all(&frame(id, Request::Apply(apply))).is_err() {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !helper.log().contains(&format!("outcome id={id} ")) && !timed_out() {
            assert!(Instant::now() < deadline, "no outcome for {id}; log:\n{}", helper.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        if timed_out() {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !timed_out() {
        assert!(Instant::now() < deadline, "no timeout logged; log:\n{}", helper.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(helper.log().contains("the peer does not read its replies"), "{}", helper.log());
    // Nothing runs any more, and other peers are served.
    let mut other = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    other.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let read_reply = |s: &mut std::os::unix::net::UnixStream| -> ReplyFrame {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    };
    other.write_all(&frame(1, hello)).unwrap();
    assert!(matches!(read_reply(&mut other).reply, Reply::Hello { .. }));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        other.write_all(&frame(2, Request::Status)).unwrap();
        match read_reply(&mut other).reply {
            Reply::Status(s) if s.running.is_empty() => break,
            Reply::Status(s) => assert!(Instant::now() < deadline, "still running: {:?}", s.running),
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(silent);
}
