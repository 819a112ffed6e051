//! Spawning the real binaries for integration tests: every child is killed when its
//! guard drops, even when the test panics.
#![allow(dead_code, clippy::disallowed_methods, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod scripted;

pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "opsagent" => PathBuf::from(env!("CARGO_BIN_EXE_opsagent")),
        "opsagent-backend" => PathBuf::from(env!("CARGO_BIN_EXE_opsagent-backend")),
        other => {
            // Binaries of other workspace packages sit next to ours; build on demand when
            // only this package's tests were asked for.
            let path = PathBuf::from(env!("CARGO_BIN_EXE_opsagent")).with_file_name(other);
            if !path.exists() {
                let status = Command::new(env!("CARGO"))
                    .args(["build", "-p", other, "--bin", other])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .status()
                    .expect("cargo build");
                assert!(status.success(), "building {other}");
            }
            path
        }
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

pub fn spawn_logged(name: &str, mut cmd: Command, dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).unwrap();
    cmd.stderr(f.try_clone().unwrap()).stdin(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    Proc { child, name: name.to_string(), log: Some(log) }
}

/// The reference backend on a free loopback port; returns it and its port.
pub fn start_backend(dir: &Path, recipes: &Path, statelog: &Path, extra: &[&str]) -> (Proc, u16) {
    start_backend_on(dir, recipes, statelog, "127.0.0.1:0", extra)
}

pub fn start_backend_on(dir: &Path, recipes: &Path, statelog: &Path, listen: &str, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new(bin("opsagent-backend"));
    cmd.arg("--listen").arg(listen).arg("--recipe-dir").arg(recipes).arg("--statelog").arg(statelog);
    cmd.args(extra);
    cmd.stdout(Stdio::piped());
    let mut p = spawn_logged("backend", cmd, dir);
    let port = first_line_port(&mut p);
    (p, port)
}

/// A loopback listening socket bound once by the test and handed to every backend it
/// starts, the way systemd socket activation does (`LISTEN_FDS`): a backend killed and
/// started again serves the same socket, so it never races anything for the port (the
/// old one may not be free yet, another process may have taken it), and connections made
/// while no backend runs wait in the backlog.
pub struct BackendSocket {
    listener: TcpListener,
    pub port: u16,
}

impl BackendSocket {
    pub fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        BackendSocket { listener, port }
    }

    /// A backend serving this socket (no `--listen`), once it says it listens.
    pub fn start(&self, dir: &Path, recipes: &Path, statelog: &Path, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(bin("opsagent-backend"));
        cmd.arg("--recipe-dir").arg(recipes).arg("--statelog").arg(statelog).args(extra);
        cmd.stdout(Stdio::piped());
        let inherited = hand_over(&mut cmd, &self.listener);
        let mut p = spawn_logged("backend", cmd, dir);
        drop(inherited);
        let port = first_line_port(&mut p);
        assert_eq!(port, self.port, "the backend serves the inherited socket; log: {}", p.log_text());
        p
    }
}

/// Sets `cmd` up to inherit `fd` the way systemd hands over one socket (`LISTEN_FDS=1`).
/// The child inherits the returned duplicate, made without close-on-exec (std makes every
/// descriptor close-on-exec); drop it once the child runs. It is passed at its own number
/// with `LISTEN_FDS_FIRST_FD` (the `listenfd` convention), so the child needs no dup2 to
/// fd 3. `LISTEN_PID` is left unset (the child's pid is not known before it exists),
/// which the backend takes as "for this process".
pub fn hand_over(cmd: &mut Command, fd: &impl std::os::fd::AsFd) -> std::os::fd::OwnedFd {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::AsRawFd;
    let dup = fd.as_fd().try_clone_to_owned().unwrap();
    fcntl(dup.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDS_FIRST_FD", dup.as_raw_fd().to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    dup
}

/// The port of "opsagent-backend listening on ADDR", the backend's first stdout line.
fn first_line_port(p: &mut Proc) -> u16 {
    let stdout = p.child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    line.trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("backend said {line:?}; log: {}", p.log_text()))
}

pub fn start_helper(dir: &Path, socket: &Path) -> Proc {
    start_helper_with(dir, socket, &[])
}

/// The helper with extra arguments (`--state-dir`, `--allow-user`, ...).
pub fn start_helper_with(dir: &Path, socket: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("opsagent-helper"));
    cmd.arg("--socket").arg(socket).args(extra);
    let p = spawn_logged("helper", cmd, dir);
    assert!(wait_until(Duration::from_secs(10), || socket.exists()), "helper socket never appeared: {}", p.log_text());
    p
}

/// `opsagent run` with everything given on the command line.
pub fn start_agent(dir: &Path, port: u16, app: &str, instance: &str, socket: &Path, extra: &[&str]) -> Proc {
    // An empty file: defaults plus the flags, never the host's /etc/opsagent.conf.
    start_agent_with_conf(dir, port, app, instance, socket, "", extra)
}

/// [`start_agent`] with a configuration file of this text (keys without a flag).
pub fn start_agent_with_conf(
    dir: &Path,
    port: u16,
    app: &str,
    instance: &str,
    socket: &Path,
    conf_text: &str,
    extra: &[&str],
) -> Proc {
    start_agent_with_env(dir, port, app, instance, socket, conf_text, &[], extra)
}

/// [`start_agent_with_conf`] with extra environment variables for the daemon alone
/// (`LD_PRELOAD` of a fault injector, `NOTIFY_SOCKET`, ...).
#[allow(clippy::too_many_arguments)]
pub fn start_agent_with_env(
    dir: &Path,
    port: u16,
    app: &str,
    instance: &str,
    socket: &Path,
    conf_text: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    // Other tests start further commands (status, stop) with the same empty.conf.
    let conf = if conf_text.is_empty() { dir.join("empty.conf") } else { dir.join(format!("{instance}.conf")) };
    std::fs::write(&conf, conf_text).unwrap();
    let mut cmd = Command::new(bin("opsagent"));
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .arg("--ws-uri")
        .arg(format!("ws://127.0.0.1:{port}/"))
        .arg("--app-id")
        .arg(app)
        .arg("--instance-id")
        .arg(instance)
        .arg("--token-file")
        .arg(dir.join(format!("{instance}.token")))
        .arg("--state-dir")
        .arg(dir.join(format!("{instance}.state")))
        .arg("--helper-socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied());
    cmd.stdout(Stdio::null());
    spawn_logged(&format!("agent-{instance}"), cmd, dir)
}

/// A loopback HTTP/1.1 server of in-memory files, logging every path asked for.
pub struct Files {
    pub base: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Files {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, h) = (files.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (f, h) = (f.clone(), h.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    h.lock().unwrap().push(path.clone());
                    let body = f.lock().unwrap().get(&path).cloned();
                    let (status, body) = match body {
                        Some(b) => ("200 OK", b),
                        None => ("404 Not Found", Vec::new()),
                    };
                    let head =
                        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(&body);
                });
            }
        });
        Files { base, files, hits }
    }

    pub fn put(&self, name: &str, body: Vec<u8>) -> String {
        self.files.lock().unwrap().insert(format!("/{name}"), body);
        format!("{}/{name}", self.base)
    }

    pub fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|p| *p == &format!("/{name}")).count()
    }
}

/// A temporary directory laid out for a backend, a helper and agents: `work/` for what
/// the recipe manages, `recipes/APP.json` holding `recipe(work)`, the backend's statelog
/// and the helper's socket path.
pub struct Setup {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub recipes: PathBuf,
    pub statelog: PathBuf,
    pub socket: PathBuf,
    pub work: PathBuf,
}

pub fn setup(app: &str, recipe: impl Fn(&Path) -> Value) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    let recipes = dir.join("recipes");
    std::fs::create_dir(&recipes).unwrap();
    std::fs::write(recipes.join(format!("{app}.json")), recipe(&work).to_string()).unwrap();
    Setup { statelog: dir.join("statelog.jsonl"), socket: dir.join("helper.sock"), recipes, work, dir, _tmp: tmp }
}
