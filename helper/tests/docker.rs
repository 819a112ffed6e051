//! The `linux.docker.*` states against a real engine: Podman's Docker-compatible API
//! service (`podman system service`, runc, vfs storage, everything under a temporary
//! directory) driven through the Docker command-line client, plus a local registry
//! (Debian's `docker-registry`, htpasswd authentication, on a loopback port) for
//! pulls, pushes and credentials. Images are built from a `FROM scratch` Dockerfile with
//! a static busybox, so nothing is fetched from outside.
//!
//! Needs root and: podman, runc, docker-registry, apache2-utils (htpasswd),
//! busybox-static, and a `docker` client (the machine's, or `OPSAGENT_TEST_DOCKER`
//! naming one, e.g. Debian's `docker.io` client extracted by `.ci/run`; with
//! `OPSAGENT_TEST_CLIENT=podman`, or without one where skipping is allowed, Podman's own
//! CLI is used as the client, as `podman-docker` would). The engine runs with
//! cgroupfs and low rlimits so that it works inside a sandboxed VM. The tests share one
//! lock: they run one at a time.
// The harness starts real tools (a registry, supervisorctl, the test binary itself);
// states inside the helper still run programs through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support code outside #[test] fns

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::params;
use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::docker::{image, run, Engine};
use opsagent_helper::states::storage::find_tool;
use opsagent_helper::states::Ctx;
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::newtypes::StateId;
use opsagent_proto::request::Outcome;
use serde_json::json;

static ENGINE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55";

fn id(s: &str) -> StateId {
    StateId::parse(s).unwrap()
}

fn free_port_pair() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The engine, the registry and their temporary directory; all stopped when dropped.
struct Harness {
    dir: tempfile::TempDir,
    engine: Engine,
    /// Podman's own client on the same storage.
    podman: Engine,
    registry: String,
    children: Vec<Child>,
}

impl Harness {
    async fn start() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            common::skip("docker: SKIPPED, needs root to run a container engine");
            return None;
        }
        let missing: Vec<&str> = [
            ("podman", "podman"),
            ("runc", "runc"),
            ("docker-registry", "docker-registry"),
            ("htpasswd", "apache2-utils"),
        ]
        .into_iter()
        .filter(|(t, _)| find_tool(t, &[]).is_none())
        .map(|(_, p)| p)
        .collect();
        assert!(missing.is_empty(), "install the engine first: apt-get install -y {}", missing.join(" "));
        let ldd = Command::new("ldd").arg("/bin/busybox").output().map(|o| o.stdout).unwrap_or_default();
        assert!(
            Path::new("/bin/busybox").exists() && !String::from_utf8_lossy(&ldd).contains("=>"),
            "a static /bin/busybox is needed for the test image: apt-get install -y busybox-static"
        );

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let nofile = soft.min(hard).min(65536);
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 tmp_dir = \"{}/libpod-tmp\"\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/root\"\n", d.display()),
        )
        .unwrap();
        let port = free_port_pair();
        let registry = format!("127.0.0.1:{port}");
        std::fs::write(
            d.join("registries.conf"),
            format!("[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"),
        )
        .unwrap();
        let conf_env = [
            ("CONTAINERS_CONF", d.join("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", d.join("storage.conf")),
            ("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf")),
        ];

        let hash = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).output().unwrap();
        std::fs::write(d.join("htpasswd"), &hash.stdout).unwrap();
        std::fs::write(
            d.join("registry.yml"),
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {0}/registry\nhttp:\n  addr: {registry}\n\
                 auth:\n  htpasswd:\n    realm: test\n    path: {0}/htpasswd\n",
                d.display()
            ),
        )
        .unwrap();

        let mut children = Vec::new();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        children.push(
            Command::new("docker-registry")
                .args(["serve", &d.join("registry.yml").to_string_lossy()])
                .stdout(log("registry.log"))
                .stderr(log("registry.err"))
                .spawn()
                .unwrap(),
        );
        let socket = d.join("api.sock");
        let mut service = Command::new("podman");
        service
            .args(["system", "service", "--time=0", &format!("unix://{}", socket.display())])
            .stdin(Stdio::null())
            .stdout(log("podman.log"))
            .stderr(log("podman.err"));
        for (k, v) in &conf_env {
            service.env(k, v);
        }
        children.push(service.spawn().unwrap());

        let podman = Engine {
            program: "podman".into(),
            env: conf_env.iter().map(|(k, v)| ((*k).to_string(), v.to_string_lossy().into_owned())).collect(),
        };
        // The client: Docker's CLI on the API socket, or Podman's own CLI.
        // OPSAGENT_TEST_CLIENT=podman forces Podman's client (as with podman-docker).
        // OPSAGENT_TEST_DOCKER names a Docker CLI outside PATH (`.ci/run` extracts
        // Debian's, without its daemon). Where skips fail (CI), a run without a real
        // Docker client fails too, unless Podman's client was asked for: the README says
        // these states are tested against Docker's CLI on Podman's Docker API.
        let force_podman = std::env::var("OPSAGENT_TEST_CLIENT").is_ok_and(|v| v == "podman");
        let docker = std::env::var_os("OPSAGENT_TEST_DOCKER")
            .map(PathBuf::from)
            .or_else(|| find_tool("docker", &[]))
            .filter(|d| !is_podman_wrapper(d));
        let engine = match docker {
            Some(docker) if !force_podman => Engine {
                program: docker.to_string_lossy().into_owned(),
                env: vec![("DOCKER_HOST".into(), format!("unix://{}", socket.display()))],
            },
            _ => {
                if !force_podman {
                    common::skip(
                        "docker: no Docker CLI (OPSAGENT_TEST_DOCKER or docker on PATH); Podman's own client used",
                    );
                }
                podman.clone()
            }
        };
        let h = Self { dir, engine, podman, registry, children };
        for _ in 0..100 {
            let up = h.cli(&["version"]).0 && std::net::TcpStream::connect(&h.registry).is_ok();
            if up {
                eprintln!("docker: engine and registry up; client {}", h.engine.program);
                return Some(h);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the engine or the registry did not start; see the logs in {}", h.dir.path().display());
    }

    fn ctx(&self) -> Ctx {
        Ctx::new(self.dir.path().join("state"))
    }

    /// Runs the client as the states do; (success, output).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut c = Command::new(&self.engine.program);
        c.args(args).env_clear().env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        c.env("HOME", self.dir.path());
        for (k, v) in &self.engine.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn must(&self, args: &[&str]) -> String {
        let (ok, text) = self.cli(args);
        assert!(ok, "{args:?}: {text}");
        text
    }

    /// A build context: a static busybox and a Dockerfile whose container serves its
    /// root over HTTP on port 80 and stops at once on SIGTERM.
    fn context(&self, name: &str, label: &str) -> PathBuf {
        let ctx = self.dir.path().join(name);
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM scratch\nCOPY busybox /bin/busybox\nLABEL test.version=\"{label}\"\n\
                 CMD [\"/bin/busybox\", \"sh\", \"-c\", \"trap 'exit 0' TERM; /bin/busybox httpd -p 80 -h /; \
                 while true; do /bin/busybox sleep 1; done\"]\n"
            ),
        )
        .unwrap();
        ctx
    }

    fn started_at(&self, name: &str) -> String {
        self.must(&["container", "inspect", "--format", "{{.State.StartedAt}}", name]).trim().to_string()
    }
}

fn is_podman_wrapper(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() < 4096 && String::from_utf8_lossy(&b).contains("podman"))
}

impl Drop for Harness {
    fn drop(&mut self) {
        let names = self.cli(&["ps", "--all", "--quiet"]).1;
        for n in names.split_whitespace() {
            let _ = self.cli(&["rm", "--force", n]);
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET `path` from the HTTP server at `127.0.0.1:port`; the body.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..50 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                return body.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answered on 127.0.0.1:{port}");
}

fn ok(o: &Outcome) -> Vec<String> {
    assert!(o.result, "state failed: {}\n{}", o.comment, o.stdout);
    o.changes.iter().map(ToString::to_string).collect()
}

fn unchanged(o: &Outcome) {
    assert!(o.result && o.changes.is_empty(), "expected no change: {o:?}");
}

#[tokio::test]
async fn a_missing_client_fails_with_the_documented_reason() {
    let ctx = Ctx::new(tempfile::tempdir().unwrap().path().to_path_buf());
    let engine = Engine { program: "/nonexistent/docker".into(), env: vec![] };
    let ModuleParams::LinuxDockerPulled(p) = params("linux.docker.pulled", json!({"repo": "nginx"})) else { panic!() };
    let out = image::pulled(&engine, &p, &ctx, Cancel::never()).await;
    assert!(!out.result && out.changes.is_empty());
    assert!(
        out.comment.starts_with("/nonexistent/docker is not installed; install it with a package state first"),
        "{}",
        out.comment
    );
}

#[tokio::test]
async fn built_and_running_follow_dockerfile_parameters_and_watched_files() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let build_dir = h.context("web", "1");

    // built: first sight of the Dockerfile builds; then nothing until it changes.
    let built_raw = json!({"path": build_dir, "tag": "opsagent/web:1", "containers": ["web"]});
    let ModuleParams::LinuxDockerBuilt(built) = params("linux.docker.built", built_raw) else { panic!() };
    let changes = ok(&image::built(&h.engine, &built, &id("b-1"), &ctx, Cancel::never()).await);
    assert!(changes[0].starts_with("image opsagent/web:1: built (image missing), image "), "{changes:?}");
    unchanged(&image::built(&h.engine, &built, &id("b-1"), &ctx, Cancel::never()).await);
    // Another state seeing the same Dockerfile for the first time rebuilds (tfirst).
    let changes = ok(&image::built(&h.engine, &built, &id("b-2"), &ctx, Cancel::never()).await);
    assert!(changes[0].contains("built (Dockerfile changed)"), "{changes:?}");

    // running: two numbered containers, ports +1, env, read-only volume, file mount.
    let port = free_port_pair();
    let data = h.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "hello from the volume\n").unwrap();
    let conf = h.dir.path().join("app.conf");
    std::fs::write(&conf, "version=1\n").unwrap();
    let running_raw = |mode: &str, count: u64| {
        json!({"container": "web", "image": "opsagent/web", "tag": "1", "count": count.to_string(),
               "port_bindings": [{"key": "80", "value": format!("127.0.0.1:{port}")}],
               "environment": [{"key": "MODE", "value": mode}],
               "volumes": [{"key": data, "value": "/data:ro"}],
               "files": [{"key": "/etc/app.conf", "value": conf}],
               "watch": [conf]})
    };
    let ModuleParams::LinuxDockerRunning(web) = params("linux.docker.running", running_raw("prod", 2)) else {
        panic!()
    };
    let state = id("r-1");
    let changes = ok(&run::running(&h.engine, &web, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0].starts_with("container web_1: created from opsagent/web:1 and started"), "{changes:?}");
    assert_eq!(http_get(port, "/data/hello.txt").await, "hello from the volume\n");
    assert_eq!(http_get(port + 1, "/etc/app.conf").await, "version=1\n");
    // (inspect rather than exec: Podman keeps an exec session's monitor alive minutes
    // after it ends.)
    assert!(h.must(&["container", "inspect", "--format", "{{.Config.Env}}", "web_1"]).contains("MODE=prod"));
    let mounts =
        h.must(&["container", "inspect", "--format", "{{range .Mounts}}{{.Destination}}={{.RW}} {{end}}", "web_1"]);
    assert!(mounts.contains("/data=false") && mounts.contains("/etc/app.conf=false"), "{mounts}");
    let ps = h.must(&["ps", "--format", "{{.Command}}"]);
    assert!(!ps.contains("MODE"), "environment visible in the command: {ps}");
    unchanged(&run::running(&h.engine, &web, &state, &ctx, Cancel::never()).await);
    assert!(std::fs::read_dir(ctx.state_dir.join("docker-env")).unwrap().next().is_none(), "env file left behind");

    // A watched file changes: both restart, once.
    let before = h.started_at("web_1");
    std::fs::write(&conf, "version=2\n").unwrap();
    let changes = ok(&run::running(&h.engine, &web, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0].contains("restarted (watched file changed:"), "{changes:?}");
    assert_ne!(h.started_at("web_1"), before);
    unchanged(&run::running(&h.engine, &web, &state, &ctx, Cancel::never()).await);

    // A stopped container is started; changed parameters recreate both.
    h.must(&["stop", "--time", "2", "web_2"]);
    let changes = ok(&run::running(&h.engine, &web, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes, ["container web_2: started"]);
    let ModuleParams::LinuxDockerRunning(dev) = params("linux.docker.running", running_raw("dev", 2)) else { panic!() };
    let changes = ok(&run::running(&h.engine, &dev, &state, &ctx, Cancel::never()).await);
    assert_eq!(
        changes,
        ["container web_1: recreated (parameters changed)", "container web_2: recreated (parameters changed)"]
    );
    assert!(h.must(&["container", "inspect", "--format", "{{.Config.Env}}", "web_2"]).contains("MODE=dev"));

    // Fewer containers: the surplus one goes, the other stays.
    let ModuleParams::LinuxDockerRunning(one) = params("linux.docker.running", running_raw("dev", 1)) else { panic!() };
    let changes = ok(&run::running(&h.engine, &one, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes, ["container web_2: removed (no longer wanted)"]);
    unchanged(&run::running(&h.engine, &one, &state, &ctx, Cancel::never()).await);

    // The Dockerfile changes: rebuilt, and the containers of the image removed; the
    // running state then recreates them from the new image.
    let _ = h.context("web", "2");
    let changes = ok(&image::built(&h.engine, &built, &id("b-1"), &ctx, Cancel::never()).await);
    assert!(changes[0].contains("built (Dockerfile changed)"), "{changes:?}");
    assert!(changes.contains(&"container web_1: removed (its image was rebuilt)".to_string()), "{changes:?}");
    let changes = ok(&run::running(&h.engine, &one, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes, ["container web_1: created from opsagent/web:1 and started"]);
    let label = h.must(&["container", "inspect", "--format", "{{index .Config.Labels \"test.version\"}}", "web_1"]);
    assert_eq!(label.trim(), "2");
}

#[tokio::test]
async fn pushed_and_pulled_use_credentials_that_never_show() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let repo = format!("{}/test/app", h.registry);
    let tagged = format!("{repo}:v1");
    let dir = h.context("app", "1");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);

    let pushed_raw = |password: &str| json!({"repository": repo, "tag": "v1", "username": USER, "password": password, "dep_containers": ["dep"]});
    let ModuleParams::LinuxDockerPushed(bad) = params("linux.docker.pushed", pushed_raw("wrong-Pa55word")) else {
        panic!()
    };
    let out = image::pushed(&h.engine, &bad, &id("p-1"), &ctx, Cancel::never()).await;
    assert!(!out.result && out.changes.is_empty(), "{out:?}");
    assert!(!out.comment.contains("wrong-Pa55word") && !out.stdout.contains("wrong-Pa55word"), "{out:?}");
    let ModuleParams::LinuxDockerPushed(push) = params("linux.docker.pushed", pushed_raw(PASSWORD)) else { panic!() };
    let out = image::pushed(&h.engine, &push, &id("p-1"), &ctx, Cancel::never()).await;
    let changes = ok(&out);
    assert!(changes[0].starts_with(&format!("image {tagged}: pushed (image ")), "{changes:?}");
    assert!(!out.comment.contains(PASSWORD) && !out.stdout.contains(PASSWORD));
    unchanged(&image::pushed(&h.engine, &push, &id("p-1"), &ctx, Cancel::never()).await);

    // A new image under the tag: pushed, and the dependent container removed.
    h.must(&["run", "--detach", "--name", "dep", &tagged]);
    let dir = h.context("app", "2");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);
    let changes = ok(&image::pushed(&h.engine, &push, &id("p-1"), &ctx, Cancel::never()).await);
    assert!(changes.contains(&"container dep: removed (a new image was pushed)".to_string()), "{changes:?}");

    // pulled: without the image here, with credentials; without them, refused.
    h.must(&["image", "rm", "--force", &tagged]);
    let ModuleParams::LinuxDockerPulled(anon) = params("linux.docker.pulled", json!({"repo": repo, "tag": "v1"}))
    else {
        panic!()
    };
    let out = image::pulled(&h.engine, &anon, &ctx, Cancel::never()).await;
    assert!(!out.result && out.comment.contains("`") && out.comment.to_lowercase().contains("unauthorized"), "{out:?}");
    let ModuleParams::LinuxDockerPulled(pull) = params(
        "linux.docker.pulled",
        json!({"repo": repo, "tag": "v1", "username": USER, "password": PASSWORD, "email": "a@example.com", "containers": ["puller"]}),
    ) else {
        panic!()
    };
    let out = image::pulled(&h.engine, &pull, &ctx, Cancel::never()).await;
    let changes = ok(&out);
    assert!(changes[0].starts_with(&format!("image {tagged}: pulled (image ")), "{changes:?}");
    assert!(out.comment.contains("email is no longer used by registries; ignored"));
    unchanged(&image::pulled(&h.engine, &pull, &ctx, Cancel::never()).await);

    // Someone pushes another image: the next pull replaces it and removes the
    // containers made from the old one.
    h.must(&["run", "--detach", "--name", "puller_1", &tagged]);
    let old_id = h.must(&["image", "inspect", "--format", "{{.Id}}", &tagged]).trim().to_string();
    let dir = h.context("app", "3");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);
    ok(&image::pushed(&h.engine, &push, &id("p-2"), &ctx, Cancel::never()).await);
    h.must(&["tag", &old_id, &tagged]);
    let changes = ok(&image::pulled(&h.engine, &pull, &ctx, Cancel::never()).await);
    assert!(changes[0].contains("pulled a new image"), "{changes:?}");
    assert!(changes.contains(&"container puller_1: removed (its image was replaced)".to_string()), "{changes:?}");

    // Commit then push. Podman 4.3's Docker-compatible API rejects the Docker client's
    // commit request ("Decode(): EOF"), so this step uses Podman's own client, on the
    // same storage (which also covers its REGISTRY_AUTH_FILE credentials).
    h.must(&["run", "--detach", "--name", "snap", &tagged]);
    let ModuleParams::LinuxDockerPushed(commit) = params(
        "linux.docker.pushed",
        json!({"repository": format!("{}/test/snap", h.registry), "container": "snap", "author": "ops",
               "message": "snapshot", "username": USER, "password": PASSWORD}),
    ) else {
        panic!()
    };
    let changes = ok(&image::pushed(&h.podman, &commit, &id("p-3"), &ctx, Cancel::never()).await);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0].starts_with("container snap: committed to"), "{changes:?}");

    // No credentials are left on disk.
    let leftovers: Vec<_> = std::fs::read_dir(ctx.state_dir.join("docker-auth")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn deploy_writes_files_pulls_runs_and_restarts_on_config_change() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let repo = format!("{}/test/site", h.registry);
    let dir = h.context("site", "1");
    h.must(&["build", "--tag", &format!("{repo}:v1"), &dir.to_string_lossy()]);
    let ModuleParams::LinuxDockerPushed(push) =
        params("linux.docker.pushed", json!({"repository": repo, "tag": "v1", "username": USER, "password": PASSWORD}))
    else {
        panic!()
    };
    ok(&image::pushed(&h.engine, &push, &id("p-1"), &ctx, Cancel::never()).await);
    h.must(&["image", "rm", "--force", &format!("{repo}:v1")]);

    let port = free_port_pair();
    let raw = |content: &str| {
        json!({"container": "site", "image": repo, "tag": "v1", "username": USER, "password": PASSWORD,
               "files": [{"key": "/etc/site/site.conf", "value": content}],
               "environment": [{"key": "SITE", "value": "one"}],
               "port_bindings": [{"key": "80", "value": format!("127.0.0.1:{port}")}]})
    };
    let ModuleParams::LinuxDockerDeploy(v1) = params("linux.docker.deploy", raw("v=1\n")) else { panic!() };
    let state = id("d-1");
    let out = run::deploy(&h.engine, &v1, &state, &ctx, Cancel::never()).await;
    let changes = ok(&out);
    let host_file = ctx.state_dir.join("docker-config/site/-etc-site-site.conf");
    let pos = |needle: &str| {
        changes.iter().position(|c| c.contains(needle)).unwrap_or_else(|| panic!("{needle}: {changes:?}"))
    };
    assert!(pos("written (mounted at /etc/site/site.conf)") < pos("pulled (image"));
    assert!(pos("pulled (image") < pos("container site: created"));
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "v=1\n");
    assert_eq!(http_get(port, "/etc/site/site.conf").await, "v=1\n");
    unchanged(&run::deploy(&h.engine, &v1, &state, &ctx, Cancel::never()).await);

    let before = h.started_at("site");
    let ModuleParams::LinuxDockerDeploy(v2) = params("linux.docker.deploy", raw("v=2\n")) else { panic!() };
    let changes = ok(&run::deploy(&h.engine, &v2, &state, &ctx, Cancel::never()).await);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0].ends_with("written (mounted at /etc/site/site.conf)"), "{changes:?}");
    assert!(changes[1].starts_with("container site: restarted (watched file changed:"), "{changes:?}");
    assert_ne!(h.started_at("site"), before);
    assert_eq!(http_get(port, "/etc/site/site.conf").await, "v=2\n");
    unchanged(&run::deploy(&h.engine, &v2, &state, &ctx, Cancel::never()).await);
}

/// A plan of `work` (a state's run) as the helper's dispatch makes it: in a plan context,
/// the outcome marked planned, a refused write turned into its step.
async fn plan_of(module: &str, work: impl std::future::Future<Output = Outcome>) -> Outcome {
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), work).await;
    opsagent_helper::states::planned(out, plan.refused(), module)
}

/// Issue 19's drift cycle for linux.docker.pulled, with registry credentials: the image
/// is not here -> the plan says it would be pulled (the image id is the registry's to
/// choose, so the plan names no id) and pulls nothing, writes no credentials -> the
/// apply pulls it -> the plan finds nothing to do.
#[tokio::test]
async fn pulled_plan_apply_plan_cycle_with_credentials() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let repo = format!("{}/test/plan", h.registry);
    let tagged = format!("{repo}:v1");
    let dir = h.context("plan", "1");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);
    let ModuleParams::LinuxDockerPushed(push) =
        params("linux.docker.pushed", json!({"repository": repo, "tag": "v1", "username": USER, "password": PASSWORD}))
    else {
        panic!()
    };
    ok(&image::pushed(&h.engine, &push, &id("p-1"), &ctx, Cancel::never()).await);
    h.must(&["image", "rm", "--force", &tagged]);

    let ModuleParams::LinuxDockerPulled(pull) =
        params("linux.docker.pulled", json!({"repo": repo, "tag": "v1", "username": USER, "password": PASSWORD}))
    else {
        panic!()
    };
    // The engine's images and the helper's state directory (where credentials go).
    let host = || {
        let mut state: Vec<String> = walkdir(&ctx.state_dir);
        state.sort();
        (h.must(&["images", "--quiet", "--no-trunc"]), state)
    };
    let before = host();
    let planned = plan_of("linux.docker.pulled", image::pulled(&h.engine, &pull, &ctx, Cancel::never())).await;
    assert!(planned.result && planned.planned, "{planned:?}");
    let planned: Vec<String> = planned.changes.iter().map(ToString::to_string).collect();
    assert_eq!(planned, [format!("image {tagged}: pulled (image chosen by the registry)")]);
    assert_eq!(host(), before, "the plan pulled or wrote something");

    let applied = ok(&image::pulled(&h.engine, &pull, &ctx, Cancel::never()).await);
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(applied[0].starts_with(&format!("image {tagged}: pulled (image ")), "{applied:?}");
    let again = plan_of("linux.docker.pulled", image::pulled(&h.engine, &pull, &ctx, Cancel::never())).await;
    assert!(again.result && again.planned && again.changes.is_empty(), "plan after the apply: {again:?}");
}

/// Every path below `dir` (none when it does not exist).
fn walkdir(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(e.path());
            }
        }
    }
    out
}

/// What a docker plan must leave alone: the containers (name, state, start time), the
/// images, and every file under the helper's state directory with its content (env
/// files, credentials, watch checksums, pushed memos, deploy files).
fn engine_and_state(h: &Harness, ctx: &Ctx) -> (String, String, Vec<String>) {
    let containers = h.must(&["ps", "--all", "--format", "{{.Names}} {{.State}} {{.CreatedAt}}"]);
    let mut started = Vec::new();
    for name in containers.lines().filter_map(|l| l.split_whitespace().next()) {
        started.push(format!("{name} {}", h.started_at(name)));
    }
    let mut state: Vec<String> = walkdir(&ctx.state_dir)
        .into_iter()
        .map(|p| format!("{p} {:?}", std::fs::read(&p).unwrap_or_default()))
        .chain(started)
        .collect();
    state.sort();
    (containers, h.must(&["images", "--quiet", "--no-trunc"]), state)
}

/// Plans `work`, which must not stop at a write and must leave the engine and the
/// state directory as they were; its changes as text.
async fn planned_changes(
    h: &Harness,
    ctx: &Ctx,
    module: &str,
    work: impl std::future::Future<Output = Outcome>,
) -> Vec<String> {
    let before = engine_and_state(h, ctx);
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(Some(std::sync::Arc::clone(&plan)), work).await;
    assert_eq!(plan.refused(), None, "the plan of {module} stopped at a write: {out:?}");
    assert_eq!(engine_and_state(h, ctx), before, "the plan of {module} changed the engine or the state directory");
    ok(&out)
}

/// Issue 19's drift cycles for linux.docker.built and linux.docker.running: each drift
/// (image missing, container missing, stopped, parameters changed, watched file
/// changed, one container too many) is planned in the apply's words with nothing run or
/// written, then applied with the same changes, then planned again as nothing.
#[tokio::test]
async fn built_and_running_plan_apply_plan_cycles() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let build_dir = h.context("planweb", "1");
    let ModuleParams::LinuxDockerBuilt(built) =
        params("linux.docker.built", json!({"path": build_dir, "tag": "opsagent/planweb:1", "containers": ["pw"]}))
    else {
        panic!()
    };
    let state = id("pb-1");
    let planned =
        planned_changes(&h, &ctx, "built", image::built(&h.engine, &built, &state, &ctx, Cancel::never())).await;
    assert_eq!(
        planned,
        ["image opsagent/planweb:1: built (image missing); its image id is known only after the build"]
    );
    let applied = ok(&image::built(&h.engine, &built, &state, &ctx, Cancel::never()).await);
    assert!(applied[0].starts_with("image opsagent/planweb:1: built (image missing), image "), "{applied:?}");
    let planned =
        planned_changes(&h, &ctx, "built", image::built(&h.engine, &built, &state, &ctx, Cancel::never())).await;
    assert!(planned.is_empty(), "{planned:?}");

    let port = free_port_pair();
    let conf = h.dir.path().join("planweb.conf");
    std::fs::write(&conf, "version=1\n").unwrap();
    let raw = |mode: &str, count: u64| {
        json!({"container": "pw", "image": "opsagent/planweb", "tag": "1", "count": count.to_string(),
               "port_bindings": [{"key": "80", "value": format!("127.0.0.1:{port}")}],
               "environment": [{"key": "MODE", "value": mode}], "watch": [conf]})
    };
    let state = id("pr-1");
    // Plan, apply (the same changes), plan again (nothing).
    let cycle = |mode: &'static str, count: u64, want: Vec<String>| {
        let (h, ctx, state) = (&h, &ctx, &state);
        async move {
            let ModuleParams::LinuxDockerRunning(p) = params("linux.docker.running", raw(mode, count)) else {
                panic!()
            };
            let run = || run::running(&h.engine, &p, state, ctx, Cancel::never());
            assert_eq!(planned_changes(h, ctx, "running", run()).await, want, "plan");
            assert_eq!(ok(&run().await), want, "apply");
            let again = planned_changes(h, ctx, "running", run()).await;
            assert!(again.is_empty(), "plan after the apply: {again:?}");
        }
    };
    cycle(
        "prod",
        2,
        vec![
            "container pw_1: created from opsagent/planweb:1 and started".into(),
            "container pw_2: created from opsagent/planweb:1 and started".into(),
        ],
    )
    .await;
    h.must(&["stop", "--time", "2", "pw_2"]);
    cycle("prod", 2, vec!["container pw_2: started".into()]).await;
    cycle(
        "dev",
        2,
        vec![
            "container pw_1: recreated (parameters changed)".into(),
            "container pw_2: recreated (parameters changed)".into(),
        ],
    )
    .await;
    std::fs::write(&conf, "version=2\n").unwrap();
    let why = format!("restarted (watched file changed: {})", conf.display());
    cycle("dev", 2, vec![format!("container pw_1: {why}"), format!("container pw_2: {why}")]).await;
    cycle("dev", 1, vec!["container pw_2: removed (no longer wanted)".into()]).await;

    // The Dockerfile changes: the plan names the rebuild; whether the image id changes
    // (and so whether the containers go) only the build can tell, and the plan says so.
    let _ = h.context("planweb", "2");
    let state = id("pb-1");
    let before = engine_and_state(&h, &ctx);
    let plan = opsagent_helper::plan::Plan::new();
    let out = opsagent_helper::plan::scope(
        Some(std::sync::Arc::clone(&plan)),
        image::built(&h.engine, &built, &state, &ctx, Cancel::never()),
    )
    .await;
    assert_eq!((plan.refused(), engine_and_state(&h, &ctx)), (None, before));
    assert_eq!(
        ok(&out),
        ["image opsagent/planweb:1: built (Dockerfile changed); its image id is known only after the build"]
    );
    assert!(out.comment.ends_with("; container pw removed if the build makes a new image"), "{out:?}");
    let applied = ok(&image::built(&h.engine, &built, &state, &ctx, Cancel::never()).await);
    assert!(applied[0].starts_with("image opsagent/planweb:1: built (Dockerfile changed), image "), "{applied:?}");
    assert!(applied.contains(&"container pw_1: removed (its image was rebuilt)".to_string()), "{applied:?}");
    assert!(planned_changes(&h, &ctx, "built", image::built(&h.engine, &built, &state, &ctx, Cancel::never()))
        .await
        .is_empty());
}

/// Issue 19's drift cycles for linux.docker.pushed (a new image under the tag: pushed,
/// the dependent container removed) and linux.docker.deploy (new files and container;
/// a changed file: written and the container restarted), with registry credentials.
#[tokio::test]
async fn pushed_and_deploy_plan_apply_plan_cycles() {
    let _lock = ENGINE_LOCK.lock().await;
    let Some(h) = Harness::start().await else { return };
    let ctx = h.ctx();
    let repo = format!("{}/test/plansite", h.registry);
    let tagged = format!("{repo}:v1");
    let dir = h.context("plansite", "1");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);
    let ModuleParams::LinuxDockerPushed(push) = params(
        "linux.docker.pushed",
        json!({"repository": repo, "tag": "v1", "username": USER, "password": PASSWORD, "dep_containers": ["dep"]}),
    ) else {
        panic!()
    };
    let short = |reference: &str| {
        let id = h.must(&["image", "inspect", "--format", "{{.Id}}", reference]);
        id.trim().trim_start_matches("sha256:").chars().take(12).collect::<String>()
    };
    let state = id("pp-1");
    let pushed = || image::pushed(&h.engine, &push, &state, &ctx, Cancel::never());
    let want = vec![format!("image {tagged}: pushed (image {})", short(&tagged))];
    assert_eq!(planned_changes(&h, &ctx, "pushed", pushed()).await, want);
    assert_eq!(ok(&pushed().await), want);
    assert!(planned_changes(&h, &ctx, "pushed", pushed()).await.is_empty());
    // A new image under the tag, and a container depending on it.
    h.must(&["run", "--detach", "--name", "dep", &tagged]);
    let dir = h.context("plansite", "2");
    h.must(&["build", "--tag", &tagged, &dir.to_string_lossy()]);
    let want = vec![
        format!("image {tagged}: pushed (image {})", short(&tagged)),
        "container dep: removed (a new image was pushed)".to_string(),
    ];
    assert_eq!(planned_changes(&h, &ctx, "pushed", pushed()).await, want);
    assert_eq!(ok(&pushed().await), want);
    assert!(planned_changes(&h, &ctx, "pushed", pushed()).await.is_empty());

    let port = free_port_pair();
    let raw = |content: &str| {
        json!({"container": "site", "image": repo, "tag": "v1", "username": USER, "password": PASSWORD,
               "files": [{"key": "/etc/site/site.conf", "value": content}],
               "port_bindings": [{"key": "80", "value": format!("127.0.0.1:{port}")}]})
    };
    let state = id("pd-1");
    let host_file = ctx.state_dir.join("docker-config/site/-etc-site-site.conf");
    let cycle = |content: &'static str, want: Vec<String>| {
        let (h, ctx, state) = (&h, &ctx, &state);
        async move {
            let ModuleParams::LinuxDockerDeploy(p) = params("linux.docker.deploy", raw(content)) else { panic!() };
            let deploy = || run::deploy(&h.engine, &p, state, ctx, Cancel::never());
            let planned = planned_changes(h, ctx, "deploy", deploy()).await;
            assert!(planned.ends_with(&want), "plan: {planned:?}");
            assert_eq!(ok(&deploy().await), planned, "apply");
            let again = planned_changes(h, ctx, "deploy", deploy()).await;
            assert!(again.is_empty(), "plan after the apply: {again:?}");
        }
    };
    let written = format!("{}: written (mounted at /etc/site/site.conf)", host_file.display());
    cycle("v=1\n", vec![written.clone(), format!("container site: created from {tagged} and started")]).await;
    assert_eq!(http_get(port, "/etc/site/site.conf").await, "v=1\n");
    let why = format!("restarted (watched file changed: {})", host_file.display());
    cycle("v=2\n", vec![written, format!("container site: {why}")]).await;
    assert_eq!(http_get(port, "/etc/site/site.conf").await, "v=2\n");

    // Commit then push (Podman's own client, as in the test above): a commit makes a
    // new image every time, so the plan names both steps, and the push's id is the
    // commit's to make.
    h.must(&["run", "--detach", "--name", "snap", &tagged]);
    let snap = format!("{}/test/plansnap:latest", h.registry);
    let ModuleParams::LinuxDockerPushed(commit) = params(
        "linux.docker.pushed",
        json!({"repository": format!("{}/test/plansnap", h.registry), "container": "snap", "author": "ops",
               "username": USER, "password": PASSWORD}),
    ) else {
        panic!()
    };
    let state = id("pc-1");
    let commit_push = || image::pushed(&h.podman, &commit, &state, &ctx, Cancel::never());
    assert_eq!(
        planned_changes(&h, &ctx, "pushed", commit_push()).await,
        [
            format!("container snap: committed to {snap}"),
            format!("image {snap}: pushed (the image committed from snap)")
        ]
    );
    let applied = ok(&commit_push().await);
    assert_eq!(applied[0], format!("container snap: committed to {snap}"));
    assert!(applied[1].starts_with(&format!("image {snap}: pushed (image ")), "{applied:?}");
}
