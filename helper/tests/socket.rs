//! The real helper binary on a real socket, spoken to with the real codec.
//!
//! Each test starts its own helper (`--socket <tmp>/h.sock --allow-user nobody`) and
//! kills it when done, even on a panic. These tests need root, as the helper does.
// Test harness code starts real tools itself; the helper's states run programs
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)] // test support code outside #[test] fns

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::unistd::Pid;
use opsagent_helper::exec::group_members;
use opsagent_proto::catalogue::parse_state;
use opsagent_proto::codec::{self, DEFAULT_MAX_FRAME};
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::{
    ApplyRequest, Change, ErrorCode, Outcome, Reply, ReplyFrame, Request, RequestFrame, AHEAD_MAX_FRAME,
    AHEAD_MAX_REQUESTS,
};
use opsagent_proto::HELPER_PROTOCOL_VERSION;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_opsagent-helper");
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// A uid that is not allowed but is in the socket's group (nogroup, the primary group
/// of the allowed user `nobody`): the file mode lets it connect, so a refusal can only
/// come from the peer-credential check.
const OUTSIDER_UID: u32 = 65533;
const NOGROUP: u32 = 65534;
const PROBE_ENV: &str = "OPSAGENT_HELPER_TEST_PROBE_SOCKET";

struct Helper {
    child: Child,
    dir: Arc<tempfile::TempDir>,
    sock: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Helper {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    fn temp_dir() -> Arc<tempfile::TempDir> {
        let dir = tempfile::tempdir().unwrap();
        // Other uids must reach the socket (the refusal test); the socket's own mode
        // is what keeps them out.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Arc::new(dir)
    }

    fn command(dir: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["--allow-user", "nobody", "--state-dir"])
            .arg(dir.join("state"))
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("OPSAGENT_HELPER_STORAGE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    async fn start_with(extra: &[&str]) -> Self {
        let dir = Self::temp_dir();
        let sock = dir.path().join("h.sock");
        let mut cmd = Self::command(dir.path(), extra);
        let helper = Self::spawn(cmd.arg("--socket").arg(&sock), dir, sock);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&helper.sock).await.is_err() {
            assert!(Instant::now() < deadline, "helper did not start; log:\n{}", helper.log());
            sleep(Duration::from_millis(20)).await;
        }
        helper
    }

    /// Starts the helper as systemd's socket activation does: `listener`, bound at
    /// `dir/h.sock` by the caller (who keeps it, as systemd does), is passed on.
    fn start_activated(
        dir: &Arc<tempfile::TempDir>,
        listener: &std::os::unix::net::UnixListener,
        extra: &[&str],
    ) -> Self {
        use std::os::fd::AsRawFd;
        let inherited = listener.try_clone().unwrap();
        nix::fcntl::fcntl(inherited.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
        let mut cmd = Self::command(dir.path(), extra);
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDS_FIRST_FD", inherited.as_raw_fd().to_string());
        let helper = Self::spawn(&mut cmd, Arc::clone(dir), dir.path().join("h.sock"));
        drop(inherited);
        helper
    }

    fn spawn(cmd: &mut Command, dir: Arc<tempfile::TempDir>, sock: PathBuf) -> Self {
        let mut child = cmd.spawn().unwrap();
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
        Self { child, dir, sock, log }
    }

    /// Waits (bounded) for the helper to end by itself.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the helper is still running; log:\n{}", self.log());
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return log;
            }
            assert!(Instant::now() < deadline, "no log line with {needles:?}; log:\n{log}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    async fn client(&self) -> Client {
        let mut c = Client { stream: UnixStream::connect(&self.sock).await.unwrap(), next_id: 1 };
        c.hello().await;
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    async fn send(&mut self, request: Request) -> u64 {
        self.send_after(request, None).await
    }

    /// A request to run once request `after` has succeeded (pipelining).
    async fn send_after(&mut self, request: Request, after: Option<u64>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = RequestFrame { id, after, request };
        codec::write_frame(&mut self.stream, &frame, DEFAULT_MAX_FRAME).await.unwrap();
        id
    }

    /// The next reply, or `None` when the helper closed the connection.
    async fn recv_or_eof(&mut self) -> Option<ReplyFrame> {
        match timeout(REPLY_TIMEOUT, codec::read_frame(&mut self.stream, DEFAULT_MAX_FRAME)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(codec::CodecError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Ok(Err(e)) => panic!("bad reply: {e}"),
            Err(_) => panic!("no reply within {REPLY_TIMEOUT:?}"),
        }
    }

    async fn recv(&mut self) -> ReplyFrame {
        self.recv_or_eof().await.expect("the helper closed the connection")
    }

    async fn call(&mut self, request: Request) -> Reply {
        let id = self.send(request).await;
        let frame = self.recv().await;
        assert_eq!(frame.id, id, "{frame:?}");
        frame.reply
    }

    async fn hello(&mut self) {
        let reply =
            self.call(Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "test".into() }).await;
        assert!(matches!(reply, Reply::Hello { protocol_version: HELPER_PROTOCOL_VERSION, .. }), "{reply:?}");
    }

    async fn apply(&mut self, module: &str, params: Value) -> Outcome {
        match self.call(apply_request(module, params)).await {
            Reply::Outcome(o) => o,
            other => panic!("{module}: {other:?}"),
        }
    }
}

fn apply_request(module: &str, params: Value) -> Request {
    let params = parse_state(module, &params).unwrap_or_else(|e| panic!("{module}: {e}")).params;
    Request::Apply(ApplyRequest::new(StateId::parse("state-1").unwrap(), 1, params))
}

/// Waits (bounded) until `file` holds the pid a command wrote there.
async fn read_pid(file: &Path) -> Pid {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()) {
            return Pid::from_raw(pid);
        }
        assert!(Instant::now() < deadline, "no pid in {}", file.display());
        sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_group_gone(pgid: Pid) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !group_members(pgid).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "process group {pgid} survived: {:?}", group_members(pgid));
        sleep(Duration::from_millis(20)).await;
    }
}

/// A command that records its process group id (the shell's pid) and then blocks, with
/// a background child in the same group. `$$$$` is `$$` once the catalogue renders it.
fn blocking_command(pidfile: &Path) -> Value {
    json!({"cmd": format!("echo $$$$ > {}; sleep 600 & sleep 600", pidfile.display()), "cwd": "/"})
}

#[tokio::test]
async fn socket_mode_hello_and_status() {
    let h = Helper::start().await;
    let m = fs::metadata(&h.sock).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o660, 0, NOGROUP));
    let mut c = h.client().await;
    match c.call(Request::Status).await {
        Reply::Status(s) => {
            assert_eq!(s.protocol_version, HELPER_PROTOCOL_VERSION);
            assert!(s.running.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Cancel with nothing running: answered, not found.
    let reply = c.call(Request::Cancel { target: 42 }).await;
    assert_eq!(reply, Reply::Cancelled { target: 42, found: false });
}

#[tokio::test]
async fn states_apply_then_report_no_change() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let file = h.path("etc/app.conf");
    let dir = h.path("srv/data");
    let link = h.path("current");
    let marker = h.path("ran");
    let states = [
        ("linux.file", json!({"path": file, "content": "x=1\n", "mode": "0640", "group": "nogroup"})),
        ("linux.dir", json!({"path": [dir], "user": "nobody", "mode": "0750"})),
        ("linux.symlink", json!({"target": link, "source": dir})),
        ("linux.cmd", json!({"cmd": format!("touch {}", marker.display()), "cwd": "/", "if-path-absent": [marker]})),
    ];
    for (module, params) in &states {
        let first = c.apply(module, params.clone()).await;
        assert!(first.result && first.changed(), "{module}: {first:?}");
        let second = c.apply(module, params.clone()).await;
        assert!(second.result && !second.changed(), "{module}: {second:?}");
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "x=1\n");
    let m = fs::metadata(&file).unwrap();
    assert_eq!((m.mode() & 0o7777, m.gid()), (0o640, NOGROUP));
    assert_eq!(fs::metadata(&dir).unwrap().uid(), 65534);
    assert_eq!(fs::read_link(&link).unwrap(), dir);
    assert!(marker.exists());

    let out = c.apply("linux.cmd", json!({"cmd": "echo hi; exit 4", "cwd": "/"})).await;
    assert!(!out.result && out.comment == "command exited with status 4", "{out:?}");
    assert_eq!((out.stdout.as_str(), out.changes.as_slice()), ("hi\n", [Change::new("cmd", "ran")].as_slice()));
    let log = h.wait_for_log(&["outcome", "module=\"linux.cmd\"", "result=false", "changes=1"]).await;
    assert!(log.contains("duration_ms="), "{log}");
}

#[tokio::test]
async fn cancel_stops_a_running_command_and_its_group() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let pidfile = h.path("pid");
    let started = Instant::now();
    let apply_id = c.send(apply_request("linux.cmd", blocking_command(&pidfile))).await;
    let pgid = read_pid(&pidfile).await;
    assert!(!group_members(pgid).unwrap().is_empty());
    // Another connection sees it running.
    match h.client().await.call(Request::Status).await {
        Reply::Status(s) => assert_eq!(s.running, vec![("state-1".to_string(), "linux.cmd".to_string())]),
        other => panic!("{other:?}"),
    }

    // While it runs: other requests are busy, a cancel for another id finds nothing.
    match c.call(Request::Status).await {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Busy, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call(Request::Cancel { target: 999 }).await, Reply::Cancelled { target: 999, found: false });
    assert_eq!(c.call(Request::Cancel { target: apply_id }).await, Reply::Cancelled { target: apply_id, found: true });

    let frame = c.recv().await;
    assert_eq!(frame.id, apply_id);
    let Reply::Outcome(out) = frame.reply else { panic!("{frame:?}") };
    assert!(out.cancelled && !out.result, "{out:?}");
    assert!(out.comment.contains("cancelled"), "{}", out.comment);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert_eq!(group_members(pgid).unwrap(), vec![]);

    // The connection is still usable.
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
}

fn not_run(frame: &ReplyFrame, id: u64) -> String {
    match &frame.reply {
        Reply::Error(e) if frame.id == id && e.code == ErrorCode::NotRun => e.message.clone(),
        _ => panic!("expected not-run for {id}: {frame:?}"),
    }
}

fn outcome_of(frame: ReplyFrame, id: u64) -> Outcome {
    match frame.reply {
        Reply::Outcome(o) if frame.id == id => o,
        reply => panic!("expected the outcome of {id}: {} {reply:?}", frame.id),
    }
}

/// Pipelining: a state sent to follow a running one starts when it succeeds, without
/// another request; it does not start when it fails; one waits at most; only apply
/// requests may wait, and only behind the running one.
#[tokio::test]
async fn a_request_sent_ahead_runs_only_after_the_one_before_succeeded() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let hello = c.call(Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "t".into() }).await;
    assert!(matches!(hello, Reply::Hello { pipelining: true, .. }), "{hello:?}");
    let (gate, second, third) = (h.path("gate"), h.path("second"), h.path("third"));
    // The first state waits for the gate, so that everything after it is sent while
    // it runs.
    let wait_gate = |extra: &str| json!({"cmd": format!("while [ ! -e {} ]; do sleep 0.05; done{extra}", gate.display()), "cwd": "/"});
    let first = c.send(apply_request("linux.cmd", wait_gate(""))).await;
    let is_busy = |frame: &ReplyFrame, id: u64| {
        matches!(&frame.reply, Reply::Error(e) if e.code == ErrorCode::Busy) && frame.id == id
    };
    // A frame too large to wait may not.
    let large = "x".repeat(AHEAD_MAX_FRAME);
    let big = c.send_after(apply_request("linux.file", json!({"path": third, "content": large})), Some(first)).await;
    let busy = c.recv().await;
    assert!(is_busy(&busy, big), "{busy:?}");
    // A line of requests, each sent to follow the one before, as many as may wait.
    let mut line = Vec::new();
    let mut last = first;
    for i in 0..AHEAD_MAX_REQUESTS {
        let path = if i == 0 { second.clone() } else { h.path(&format!("line-{i}")) };
        last = c.send_after(apply_request("linux.file", json!({"path": path, "content": "2"})), Some(last)).await;
        line.push((last, path));
    }
    // One more may not wait; nor one behind another than the last of the line; nor a
    // status.
    let extra = c.send_after(apply_request("linux.file", json!({"path": third, "content": "3"})), Some(last)).await;
    let busy = c.recv().await;
    assert!(is_busy(&busy, extra), "{busy:?}");
    let skipping = c.send_after(apply_request("linux.file", json!({"path": third, "content": "3"})), Some(first)).await;
    let busy = c.recv().await;
    assert!(is_busy(&busy, skipping), "{busy:?}");
    let status = c.send_after(Request::Status, Some(last)).await;
    let busy = c.recv().await;
    assert!(is_busy(&busy, status), "{busy:?}");
    assert!(line.iter().all(|(_, p)| !p.exists()), "a state sent ahead ran before the one it follows ended");
    fs::write(&gate, "").unwrap();
    assert!(outcome_of(c.recv().await, first).result);
    for (id, path) in &line {
        let o = outcome_of(c.recv().await, *id);
        assert!(o.result && o.changed(), "{o:?}");
        assert_eq!(fs::read_to_string(path).unwrap(), "2");
    }
    assert!(!third.exists());

    // Behind a state that fails, nothing runs, and nothing is changed.
    let failing = c.send(apply_request("linux.cmd", json!({"cmd": "exit 3", "cwd": "/"}))).await;
    let ahead = c.send_after(apply_request("linux.file", json!({"path": third, "content": "3"})), Some(failing)).await;
    assert!(!outcome_of(c.recv().await, failing).result);
    let msg = not_run(&c.recv().await, ahead);
    assert!(msg.contains(&format!("request {failing} did not succeed")), "{msg}");
    assert!(!third.exists(), "a state sent behind a failed one ran");
    // Sent late (the one before has ended) it still runs, if that one succeeded.
    let ok = c.send(apply_request("linux.file", json!({"path": second, "content": "2"}))).await;
    assert!(outcome_of(c.recv().await, ok).result);
    let late = c.send_after(apply_request("linux.file", json!({"path": third, "content": "3"})), Some(ok)).await;
    assert!(outcome_of(c.recv().await, late).changed());
    // But not behind a request that is not the last one.
    let stale =
        c.send_after(apply_request("linux.file", json!({"path": h.path("fourth"), "content": "4"})), Some(ok)).await;
    not_run(&c.recv().await, stale);
    assert!(!h.path("fourth").exists());
    // Only apply requests are sent ahead.
    let odd = c.send_after(Request::Status, Some(late)).await;
    let frame = c.recv().await;
    assert!(matches!(&frame.reply, Reply::Error(e) if e.code == ErrorCode::BadRequest) && frame.id == odd, "{frame:?}");
}

/// Withdrawn before it starts (a `Cancel` naming it), or left behind by a cancelled or
/// a dropped connection's running state, a request sent ahead never runs.
#[tokio::test]
async fn a_request_sent_ahead_is_withdrawn_or_dropped_unrun() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let (pidfile, never) = (h.path("pid"), h.path("never"));
    let ahead_file = || apply_request("linux.file", json!({"path": never, "content": "x"}));

    // Withdrawn while the state before it runs: that one goes on.
    let gate = h.path("gate");
    let first = c
        .send(apply_request(
            "linux.cmd",
            json!({"cmd": format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display()), "cwd": "/"}),
        ))
        .await;
    let ahead = c.send_after(ahead_file(), Some(first)).await;
    assert_eq!(c.call(Request::Cancel { target: ahead }).await, Reply::Cancelled { target: ahead, found: true });
    let msg = not_run(&c.recv().await, ahead);
    assert!(msg.contains("cancelled before it started"), "{msg}");
    fs::write(&gate, "").unwrap();
    assert!(outcome_of(c.recv().await, first).result);

    // Withdrawn from the middle of a line: the one before it runs, those after it do not.
    fs::remove_file(&gate).unwrap();
    let ran = h.path("ran");
    let first = c
        .send(apply_request(
            "linux.cmd",
            json!({"cmd": format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display()), "cwd": "/"}),
        ))
        .await;
    let before = c.send_after(apply_request("linux.file", json!({"path": ran, "content": "x"})), Some(first)).await;
    let middle = c.send_after(ahead_file(), Some(before)).await;
    let after = c.send_after(ahead_file(), Some(middle)).await;
    let withdraw = c.send(Request::Withdraw { target: middle }).await;
    assert_eq!(c.recv().await, ReplyFrame { id: withdraw, reply: Reply::Cancelled { target: middle, found: true } });
    not_run(&c.recv().await, middle);
    fs::write(&gate, "").unwrap();
    assert!(outcome_of(c.recv().await, first).result);
    assert!(outcome_of(c.recv().await, before).changed());
    let msg = not_run(&c.recv().await, after);
    assert!(msg.contains(&format!("request {middle} did not succeed")), "{msg}");
    assert!(!never.exists(), "a state behind a withdrawn one ran");

    // Behind a cancelled state.
    let first = c.send(apply_request("linux.cmd", blocking_command(&pidfile))).await;
    let ahead = c.send_after(ahead_file(), Some(first)).await;
    let pgid = read_pid(&pidfile).await;
    assert_eq!(c.call(Request::Cancel { target: first }).await, Reply::Cancelled { target: first, found: true });
    assert!(outcome_of(c.recv().await, first).cancelled);
    not_run(&c.recv().await, ahead);
    wait_group_gone(pgid).await;

    // Behind a state whose connection closed (the state is cancelled with it).
    let _ = fs::remove_file(&gate);
    let first = c
        .send(apply_request(
            "linux.cmd",
            json!({"cmd": format!("touch {}; while [ ! -e {} ]; do sleep 0.05; done", pidfile.display(), gate.display()), "cwd": "/"}),
        ))
        .await;
    c.send_after(ahead_file(), Some(first)).await;
    let _ = fs::remove_file(&pidfile);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "the command never started");
        sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    h.wait_for_log(&["connection closed while a request runs"]).await;
    h.wait_for_log(&["outcome", "cancelled=true"]).await;
    sleep(Duration::from_millis(300)).await;
    assert!(!never.exists(), "a state sent ahead ran");
}

/// `withdraw` takes back a request sent ahead that has not started (`not-run`), and
/// leaves a running one alone: unlike `cancel`, it never cuts a state short.
#[tokio::test]
async fn withdraw_removes_a_waiting_request_and_never_stops_a_running_one() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let (gate, never, done) = (h.path("gate"), h.path("never"), h.path("done"));
    let first = c
        .send(apply_request(
            "linux.cmd",
            json!({"cmd": format!("while [ ! -e {} ]; do sleep 0.05; done; touch {}", gate.display(), done.display()), "cwd": "/"}),
        ))
        .await;
    let ahead = c.send_after(apply_request("linux.file", json!({"path": never, "content": "x"})), Some(first)).await;
    assert_eq!(c.call(Request::Withdraw { target: ahead }).await, Reply::Cancelled { target: ahead, found: true });
    not_run(&c.recv().await, ahead);
    // The running one: not found, and it goes on.
    assert_eq!(c.call(Request::Withdraw { target: first }).await, Reply::Cancelled { target: first, found: false });
    fs::write(&gate, "").unwrap();
    let o = outcome_of(c.recv().await, first);
    assert!(o.result && !o.cancelled && done.exists(), "{o:?}");
    assert!(!never.exists());
    // Idle: nothing to withdraw.
    assert_eq!(c.call(Request::Withdraw { target: 77 }).await, Reply::Cancelled { target: 77, found: false });
}

#[tokio::test]
async fn closing_the_connection_kills_the_running_command() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    let pidfile = h.path("pid");
    c.send(apply_request("linux.cmd", blocking_command(&pidfile))).await;
    let pgid = read_pid(&pidfile).await;
    drop(c);
    wait_group_gone(pgid).await;
    h.wait_for_log(&["connection closed while a request runs"]).await;
}

#[tokio::test]
async fn malformed_json_gets_bad_request_and_the_connection_survives() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    for (body, id) in [(&br#"{"id": 7, "request": {"type": "format-disk"}}"#[..], 7), (&b"{not json"[..], 0)] {
        c.stream.write_all(&u32::try_from(body.len()).unwrap().to_be_bytes()).await.unwrap();
        c.stream.write_all(body).await.unwrap();
        let frame = c.recv().await;
        assert_eq!(frame.id, id);
        match frame.reply {
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.starts_with("malformed request"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
}

#[tokio::test]
async fn oversized_frame_closes_the_connection_but_not_the_helper() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    c.stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let frame = c.recv().await;
    match frame.reply {
        Reply::Error(e) => assert!(e.code == ErrorCode::BadRequest && e.message.contains("over the limit"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(c.recv_or_eof().await.is_none());
    let mut again = h.client().await;
    assert!(matches!(again.call(Request::Status).await, Reply::Status(_)));
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let h = Helper::start().await;
    let mut c = Client { stream: UnixStream::connect(&h.sock).await.unwrap(), next_id: 1 };
    let reply = c.call(Request::Hello { protocol_version: 99, agent_version: "future".into() }).await;
    match reply {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert!(
                e.message.contains("99") && e.message.contains(&format!("version {HELPER_PROTOCOL_VERSION}")),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(c.recv_or_eof().await.is_none());
}

#[tokio::test]
async fn requests_before_hello_are_refused() {
    let h = Helper::start().await;
    let mut c = Client { stream: UnixStream::connect(&h.sock).await.unwrap(), next_id: 1 };
    match c.call(Request::Status).await {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Busy, "{e}"),
        other => panic!("{other:?}"),
    }
    c.hello().await;
}

#[tokio::test]
async fn builtin_modules_are_refused_by_name() {
    let h = Helper::start().await;
    let mut c = h.client().await;
    match c.call(apply_request("meta.wait", json!({"state": "@{host.state-2}"}))).await {
        Reply::Error(e) => assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::Unsupported, "meta.wait is built-in, runs in the daemon")
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_uid_outside_the_allowlist_is_refused() {
    let h = Helper::start().await;
    // Re-run this test binary as the outsider; `probe_child` does the connecting.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probe_child", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, &h.sock)
        .uid(OUTSIDER_UID)
        .gid(NOGROUP)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PROBE: closed"), "probe said:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    h.wait_for_log(&["refused connection", &format!("uid={OUTSIDER_UID}"), "pid="]).await;
    // The helper still serves allowed users.
    let mut c = h.client().await;
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
}

/// Not a test of its own: the client half of `a_uid_outside_the_allowlist_is_refused`,
/// run in a child process under another uid. Without the variable it does nothing.
#[test]
fn probe_child() {
    let Some(sock) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    let verdict = (|| -> std::io::Result<&'static str> {
        let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let hello = RequestFrame::new(
            1,
            Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "probe".into() },
        );
        // The helper may close before or after our write: both are fine.
        let _ = s.write_all(&codec::encode(&hello, DEFAULT_MAX_FRAME).unwrap());
        let mut buf = [0u8; 1];
        Ok(match s.read(&mut buf) {
            Ok(0) => "closed",
            Ok(_) => "answered",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed",
            Err(e) => return Err(e),
        })
    })();
    match verdict {
        Ok(v) => println!("PROBE: {v}"),
        Err(e) => println!("PROBE: error {e}"),
    }
}

#[tokio::test]
async fn refuses_to_start_without_root() {
    let out = Command::new(BIN).args(["--socket", "/nonexistent/h.sock"]).uid(65534).gid(NOGROUP).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must run as root"), "{stderr}");
}

#[tokio::test]
async fn without_a_socket_it_says_how_to_get_one() {
    let out = Command::new(BIN)
        .args(["--allow-user", "nobody"])
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--socket") && stderr.contains(".socket unit"), "{stderr}");
}

/// Bits of a `Cap*:` line of /proc/PID/status.
fn cap_mask(status: &str, field: &str) -> u64 {
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// Run directly (no systemd as PID 1, as here), commands are the helper's children: it
/// keeps the file states' capabilities and what storage, hostname and mount commands
/// need (there is no opt-in switch any more); everything else goes.
#[tokio::test]
async fn the_helper_drops_capabilities_and_core_dumps() {
    let h = Helper::start().await;
    let pid = h.child.id();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let want: u64 = opsagent_helper::harden::kept_set(true).iter().map(|c| 1u64 << c.index()).sum();
    assert_eq!(cap_mask(&status, "CapBnd:") & !want, 0, "bounding set not reduced:\n{status}");
    assert_eq!(cap_mask(&status, "CapEff:") & !want, 0, "{status}");
    assert_eq!(cap_mask(&status, "CapInh:"), 0);
    assert_eq!(cap_mask(&status, "CapAmb:"), 0);
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "{core}");
    let log = h.wait_for_log(&["capability bounding set reduced", "kept=", "CAP_CHOWN"]).await;
    assert!(!log.lines().any(|l| l.contains("kept=") && l.contains("CAP_SYS_MODULE")), "{log}");
    assert!(log.lines().any(|l| l.contains("commands of states run this way") && l.contains("direct")), "{log}");
    // Commands inherit the bounding set: nothing they run can regain the rest.
    let mut c = h.client().await;
    let out = c.apply("linux.cmd", json!({"cmd": "grep CapBnd /proc/self/status", "cwd": "/"})).await;
    assert_eq!(cap_mask(&out.stdout, "CapBnd:") & !want, 0, "{}", out.stdout);
}

/// `--storage`, from older releases' drop-in or cron supervisor, still starts the
/// helper, changes nothing and says so.
#[tokio::test]
async fn the_old_storage_switch_is_accepted_and_changes_nothing() {
    let plain = Helper::start().await;
    let with = Helper::start_with(&["--storage"]).await;
    let bnd = |h: &Helper| cap_mask(&fs::read_to_string(format!("/proc/{}/status", h.child.id())).unwrap(), "CapBnd:");
    assert_eq!(bnd(&with), bnd(&plain));
    let log = with.wait_for_log(&["--storage", "has no effect any more"]).await;
    assert!(log.contains("60-storage.conf"), "{log}");
}

/// A root-owned policy file in a private directory of the test.
fn policy_file(h: &Helper, text: &str) -> PathBuf {
    let dir = h.path("etc");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("helper.policy");
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    path
}

async fn denied(c: &mut Client, module: &str, params: Value) -> String {
    match c.call(apply_request(module, params)).await {
        Reply::Error(e) if e.code == ErrorCode::Denied => e.message,
        other => panic!("{module}: not denied: {other:?}"),
    }
}

#[tokio::test]
async fn the_policy_file_restricts_modules_paths_and_units() {
    let probe = Helper::start().await;
    let allowed = probe.path("allowed");
    let policy = policy_file(
        &probe,
        &format!(
            "# test policy\nmodules = linux.file linux.service\nwrite_prefixes = {}\nunits = web\n",
            allowed.display()
        ),
    );
    let h = Helper::start_with(&["--policy", policy.to_str().unwrap()]).await;
    h.wait_for_log(&["policy loaded", "modules [linux.file linux.service]"]).await;
    let mut c = h.client().await;
    let msg = denied(&mut c, "linux.cmd", json!({"cmd": "true", "cwd": "/"})).await;
    assert!(
        msg.starts_with("module linux.cmd is not in the policy's `modules`") && msg.contains("helper.policy"),
        "{msg}"
    );
    let msg = denied(&mut c, "linux.file", json!({"path": h.path("elsewhere"), "content": "x"})).await;
    assert!(msg.contains("not under the policy's `write_prefixes`"), "{msg}");
    let msg = denied(&mut c, "linux.service", json!({"name": ["sshd"]})).await;
    assert!(msg.contains("unit sshd.service is not in the policy's `units`"), "{msg}");
    let ok = c.apply("linux.file", json!({"path": allowed.join("x.conf"), "content": "x"})).await;
    assert!(ok.result && ok.changed(), "{ok:?}");
    // Sent ahead behind a state that succeeds, a request meets the same policy.
    let first = c.send(apply_request("linux.file", json!({"path": allowed.join("y.conf"), "content": "y"}))).await;
    let ahead = c
        .send_after(apply_request("linux.file", json!({"path": h.path("elsewhere"), "content": "x"})), Some(first))
        .await;
    assert!(outcome_of(c.recv().await, first).result);
    let frame = c.recv().await;
    assert!(matches!(&frame.reply, Reply::Error(e) if e.code == ErrorCode::Denied) && frame.id == ahead, "{frame:?}");
    assert!(!h.path("elsewhere").exists());
    h.wait_for_log(&["request refused", "result=\"denied\"", "module=\"linux.cmd\""]).await;
}

#[tokio::test]
async fn an_invalid_or_unsafe_policy_stops_the_start() {
    let probe = Helper::start().await;
    let policy = policy_file(&probe, "modules = linux.file\nmodules linux.dir\n");
    let run = |policy: &Path| {
        Command::new(BIN)
            .args(["--socket"])
            .arg(probe.path("other.sock"))
            .args(["--allow-user", "nobody", "--policy"])
            .arg(policy)
            .env_remove("LISTEN_FDS")
            .output()
            .unwrap()
    };
    let out = run(&policy);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("refusing to start: {}:2: expected `key = values`", policy.display())),
        "{stderr}"
    );

    fs::write(&policy, "modules = linux.file\n").unwrap();
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o666)).unwrap();
    let stderr = String::from_utf8_lossy(&run(&policy).stderr).into_owned();
    assert!(stderr.contains("writable by group or others"), "{stderr}");
    let stderr = String::from_utf8_lossy(&run(&probe.path("missing.policy")).stderr).into_owned();
    assert!(stderr.contains("cannot open"), "{stderr}");
}

/// A client that got past the connection cap (hello answered), or `None`.
async fn try_client(h: &Helper) -> Option<Client> {
    let mut c = Client { stream: UnixStream::connect(&h.sock).await.unwrap(), next_id: 2 };
    // A refused connection may already be closed when the Hello is written.
    let hello =
        RequestFrame::new(1, Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "t".into() });
    codec::write_frame(&mut c.stream, &hello, DEFAULT_MAX_FRAME).await.ok()?;
    let id = 1;
    let frame = c.recv_or_eof().await?;
    assert_eq!(frame.id, id);
    Some(c)
}

/// Retries for a while: a slot is given back only once the helper has seen the close
/// of an earlier connection (the start-up probe's, a dropped client's).
async fn client_when_free(h: &Helper) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = try_client(h).await {
            return c;
        }
        assert!(Instant::now() < deadline, "no connection slot freed");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connections_per_uid_are_capped() {
    let h = Helper::start_with(&["--max-connections-per-uid", "2"]).await;
    let a = client_when_free(&h).await;
    let _b = client_when_free(&h).await;
    // Both slots are held by a and b now: a third is refused, whatever the timing.
    assert!(try_client(&h).await.is_none(), "a third connection was served");
    h.wait_for_log(&["refused connection", "too many connections from this uid", "uid=0", "pid="]).await;
    drop(a);
    let mut c = client_when_free(&h).await;
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
}

#[tokio::test]
async fn under_socket_activation_an_idle_helper_exits_and_the_next_one_takes_over() {
    let dir = Helper::temp_dir();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("h.sock")).unwrap();
    let mut first = Helper::start_activated(&dir, &listener, &["--exit-idle", "1"]);
    let mut c = first.client().await;
    // A request that runs longer than the idle time is not cut, and the helper stays.
    let out = c.apply("linux.cmd", json!({"cmd": "sleep 2; echo done", "cwd": "/"})).await;
    assert!(out.result && out.stdout == "done\n", "{out:?}");
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
    // Then, idle, it exits cleanly and closes the kept connection.
    assert!(c.recv_or_eof().await.is_none());
    let status = first.exited().await;
    assert!(status.success(), "{status:?}; log:\n{}", first.log());
    first.wait_for_log(&["exiting until the next connection", "idle_s=1"]).await;
    // With no helper running, a client still connects (the socket is systemd's, here
    // the test's) and its request waits in the socket for the next helper.
    let mut queued = Client { stream: UnixStream::connect(&first.sock).await.unwrap(), next_id: 1 };
    let hello =
        queued.send(Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: "test".into() }).await;
    let second = Helper::start_activated(&dir, &listener, &["--exit-idle", "1"]);
    let frame = queued.recv().await;
    assert_eq!(frame.id, hello);
    assert!(matches!(frame.reply, Reply::Hello { .. }), "{frame:?}; log:\n{}", second.log());
    assert!(matches!(queued.call(Request::Status).await, Reply::Status(_)));
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let h = Helper::start_with(&["--idle-timeout", "1"]).await;
    let mut c = h.client().await;
    assert!(matches!(c.call(Request::Status).await, Reply::Status(_)));
    assert!(c.recv_or_eof().await.is_none());
    h.wait_for_log(&["closing an idle connection"]).await;
    // A request that runs longer than the idle timeout is not cut.
    let mut c = h.client().await;
    let out = c.apply("linux.cmd", json!({"cmd": "sleep 2; echo done", "cwd": "/"})).await;
    assert!(out.result && out.stdout == "done\n", "{out:?}");
}
