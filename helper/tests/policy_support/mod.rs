//! A real helper started with a restrictive policy, and a client that sends raw
//! request frames (as a compromised daemon can: nothing forces it through the
//! catalogue). Shared by `policy_holes.rs` and `compromised_daemon.rs`.
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, dead_code)] // test support code outside #[test] fns

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opsagent_proto::catalogue::parse_state;
use opsagent_proto::codec::{self, DEFAULT_MAX_FRAME};
use opsagent_proto::request::{Reply, ReplyFrame, Request};
use opsagent_proto::HELPER_PROTOCOL_VERSION;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_opsagent-helper");
pub const AGENT_UID: u32 = 65534;
pub const AGENT_GID: u32 = 65534;

pub struct Helper {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    log: Arc<Mutex<String>>,
    /// The options given on top of the common ones (for a restart).
    args: Vec<std::ffi::OsString>,
}

impl Helper {
    /// A helper whose policy is `policy(dir)`, `dir` being the test's directory
    /// (mode 0755, so the agent uid can reach the socket in it).
    pub async fn start(policy: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir(&etc).unwrap();
        let policy_path = etc.join("helper.policy");
        fs::write(&policy_path, policy(dir.path())).unwrap();
        fs::set_permissions(&policy_path, fs::Permissions::from_mode(0o644)).unwrap();
        let args = vec!["--policy".into(), policy_path.into_os_string()];
        Self::spawn(dir, &args).await
    }

    /// A helper in signed mode: `conf(dir)` is its `--config` file (root's, 0640), and
    /// it has no policy at all (`/etc/opsagent/helper.policy` must not exist here).
    pub async fn start_signed(conf: impl FnOnce(&Path) -> String) -> Self {
        assert!(
            !Path::new("/etc/opsagent/helper.policy").exists(),
            "this test runs a helper without a policy: /etc/opsagent/helper.policy must not exist"
        );
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir(&etc).unwrap();
        let conf_path = etc.join("opsagent.conf");
        fs::write(&conf_path, conf(dir.path())).unwrap();
        fs::set_permissions(&conf_path, fs::Permissions::from_mode(0o640)).unwrap();
        let args = vec!["--config".into(), conf_path.into_os_string()];
        Self::spawn(dir, &args).await
    }

    /// The same helper (state directory, socket, options) started again after `self`
    /// was stopped.
    pub async fn restart(mut self) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let _ = fs::remove_file(dir.path().join("h.sock"));
        let args = std::mem::take(&mut self.args);
        Self::spawn(dir, &args).await
    }

    async fn spawn(dir: tempfile::TempDir, extra: &[std::ffi::OsString]) -> Self {
        let sock = dir.path().join("h.sock");
        let mut child = Command::new(BIN)
            .args(["--allow-user", "nobody", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(&sock)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("OPSAGENT_HELPER_STORAGE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut helper = Self { child, dir, sock, log, args: extra.to_vec() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&helper.sock).await.is_err() {
            if let Ok(Some(status)) = helper.child.try_wait() {
                panic!("helper exited ({status}); log:\n{}", helper.log());
            }
            assert!(Instant::now() < deadline, "helper did not start; log:\n{}", helper.log());
            sleep(Duration::from_millis(20)).await;
        }
        helper
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) for a log line holding every needle.
    pub async fn wait_for_log(&self, needles: &[&str]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(log);
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    pub async fn connect(sock: &Path) -> Self {
        let mut c = Self { stream: UnixStream::connect(sock).await.unwrap(), next_id: 1 };
        let hello = Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "attacker".into() };
        let reply = c.call_raw(serde_json::to_value(hello).unwrap()).await;
        assert!(matches!(reply, Some(Reply::Hello { .. })), "{reply:?}");
        c
    }

    /// Sends `request` (the JSON of a request, not checked here) and reads the reply;
    /// `None` when the helper closed the connection.
    pub async fn call_raw(&mut self, request: Value) -> Option<Reply> {
        let id = self.send_raw(request, None).await?;
        self.read_reply(id).await
    }

    /// `first`, then `second` sent to follow it (pipelining) before either is answered:
    /// the two replies.
    pub async fn call_pipelined(&mut self, first: Value, second: Value) -> Option<(Reply, Reply)> {
        let id = self.send_raw(first, None).await?;
        let ahead = self.send_raw(second, Some(id)).await?;
        Some((self.read_reply(id).await?, self.read_reply(ahead).await?))
    }

    async fn send_raw(&mut self, request: Value, after: Option<u64>) -> Option<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = json!({"id": id, "request": request});
        if let Some(after) = after {
            frame["after"] = json!(after);
        }
        codec::write_frame(&mut self.stream, &frame, DEFAULT_MAX_FRAME).await.ok()?;
        Some(id)
    }

    async fn read_reply(&mut self, id: u64) -> Option<Reply> {
        let reply: ReplyFrame =
            match timeout(Duration::from_secs(60), codec::read_frame(&mut self.stream, DEFAULT_MAX_FRAME)).await {
                Ok(Ok(Some(frame))) => frame,
                Ok(_) => return None,
                Err(_) => panic!("no reply within 60 s"),
            };
        assert_eq!(reply.id, id);
        Some(reply.reply)
    }

    /// An `Apply` of `module` with `raw` parameters (through the catalogue for its
    /// defaults) and then `patch` written over the typed JSON: values the catalogue
    /// itself would refuse still reach the helper, as a compromised daemon sends them.
    pub async fn apply(&mut self, state_id: &str, module: &str, raw: Value, patch: &[(&str, Value)]) -> Option<Reply> {
        self.call_raw(apply_json(state_id, module, raw, patch)).await
    }
}

/// The JSON of an `Apply` request (see [`Client::apply`]).
pub fn apply_json(state_id: &str, module: &str, raw: Value, patch: &[(&str, Value)]) -> Value {
    // Parameters the catalogue accepts go in the daemon's own serialisation; the others
    // (which a compromised daemon may send all the same) go as they are, in the shape
    // recipes use, which the helper's decoder reads too — and refuses.
    let mut params = match parse_state(module, &raw) {
        Ok(parsed) => serde_json::to_value(parsed.params).unwrap()["params"].take(),
        Err(_) => raw,
    };
    for (k, v) in patch {
        params[*k] = v.clone();
    }
    json!({"type": "apply", "state_id": state_id, "recipe_version": 1, "module": module, "params": params})
}
