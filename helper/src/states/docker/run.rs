//! `linux.docker.running` and `linux.docker.deploy`.
//!
//! # running
//! The containers are `container`, or `<container>_1` … `<container>_N` with `count`.
//! Each is created with `docker run --detach --name NAME …` from the parameters:
//! `environment` (through a 0600 `--env-file` removed right after, so that values do
//! not show in the process list), `volumes` and `binds` (`-v HOST:CONTAINER`, a `:ro`
//! suffix kept), `files` (container path → host file, bind-mounted read-only),
//! `port_bindings` (`port[/proto]` → `[ip:]hostport`, default ip 0.0.0.0 and tcp; the
//! host port is +1 for each further container), `ports` (`--expose`),
//! `publish_all_ports` (`-P`), `links`, `devices` (`--device HOST[:CONTAINER[:rwm]]`),
//! `mem_limit` (`--memory`), `cpu_shares` (see [`cpu_args`]), `entry_point` and
//! `command`.
//!
//! The checksum (SHA-256) of everything that shapes a container is kept *on the
//! container*, as the label `io.opsagent.params` (the original kept an MD5 of the
//! parameter set in a file per state; a label cannot get out of step with the
//! container it describes, and it survives the loss of the state directory). Every
//! round, for each container:
//! - missing: created;
//! - `force`, a different (or no) checksum label, or an image id that differs from the
//!   image the reference now names (after a pull): removed and created again;
//! - stopped: started;
//! - when the watch triggers (a file of `watch` changed since the last successful run,
//!   first sight not counting, as the original's `tfirst: False`; or `watch: true`):
//!   restarted, or recreated if the restart fails.
//!
//! Before that, related containers that are no longer wanted (`<name>_3` when `count`
//! went down to 2, `<name>` when `count` was added) are removed, so that their ports
//! are free. A container that is not running right after it was started fails the
//! state, with the last lines of its log.
//!
//! # deploy
//! As the original's split into files, a pull and a run: each `files` entry (container
//! path → content) is written to `<state dir>/docker-config/<container>/<container path
//! with / replaced by ->` (rewritten only when different; the directories are 0700,
//! the files 0644 so that an unprivileged process in the container can read them;
//! mounted read-write, as the adaptor did);
//! then the image is pulled as `linux.docker.pulled` does (with `containers:
//! [container]`, so a new image recreates the containers); then the containers are
//! ensured as above (`ports`, `links`, `binds`, `publish_all_ports` as for running),
//! with those files bind-mounted. The written files, and those of `watch`, are watched
//! (after writing them, so a change made by this round counts; a file never seen before
//! does not): a change restarts the containers.
//!
//! # plan
//! A plan (dry run) takes the same decisions from the same inspections (`docker ps`,
//! `docker container inspect`, `docker image inspect`, the watch store, the deploy's
//! files) and reports what the apply would do in its words (`container web_1: created
//! from IMAGE and started`, `started`, `recreated (parameters changed)`, `restarted
//! (watched file changed: …)`, `removed (no longer wanted)`, `written (mounted at …)`),
//! running, writing and storing nothing. A deploy file it would write counts for the
//! watch as the apply's check after writing would count it. The deploy's pull is
//! planned as `linux.docker.pulled`'s: named only when the image is missing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::{LinuxDockerDeploy, LinuxDockerRunning};
use opsagent_proto::newtypes::{AbsPath, StateId};
use opsagent_proto::param_types::{Dict, PathDict, Watch};
use opsagent_proto::request::Outcome;
use sha2::{Digest, Sha256};

use super::image::pull;
use super::{
    check_container_name, check_reference, image_ref, related, same_id, Auth, Docker, DockerError, Engine, PrivateDir,
    Report, LABEL_PARAMS, LABEL_STATE,
};
use crate::cancel::Cancel;
use crate::checksums::{ChecksumStore, FileChanges};
use crate::exec;
use crate::fsutil;
use crate::states::Ctx;

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBinding {
    pub ip: String,
    pub host: Option<u32>,
    pub container: u16,
    pub proto: String,
}

impl PortBinding {
    /// The `-p` value for the container at `index` (0-based).
    pub fn render(&self, index: u32) -> String {
        match self.host {
            Some(h) => format!("{}:{}:{}/{}", self.ip, h + index, self.container, self.proto),
            None => format!("{}/{}", self.container, self.proto),
        }
    }
}

/// Everything that shapes the containers of one state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSpec {
    pub container: String,
    pub image: String,
    pub count: Option<u64>,
    pub command: Vec<String>,
    pub entry_point: Option<String>,
    pub env: Vec<(String, String)>,
    /// `-v` values.
    pub mounts: Vec<String>,
    pub ports: Vec<PortBinding>,
    pub expose: Vec<String>,
    pub publish_all: bool,
    pub links: Vec<String>,
    pub devices: Vec<String>,
    pub memory: Option<String>,
    pub cpu: Vec<String>,
    pub force: bool,
}

fn entries(d: Option<&Dict>) -> impl Iterator<Item = (&str, &str)> {
    d.into_iter().flat_map(|d| d.iter()).map(|e| (e.key.trim(), e.value_or_empty().trim()))
}

fn no_option(param: &'static str, v: &str) -> Result<(), DockerError> {
    if v.starts_with('-') || v.contains(['\n', '\r', '\0']) {
        return Err(DockerError::param(param, format!("{v:?} is not allowed here")));
    }
    Ok(())
}

/// `port[/proto]` → `[ip:]hostport`.
pub fn parse_ports(d: Option<&Dict>) -> Result<Vec<PortBinding>, DockerError> {
    let bad = |what: String| DockerError::param("port_bindings", what);
    entries(d)
        .map(|(k, v)| {
            let (port, proto) = k.split_once('/').unwrap_or((k, "tcp"));
            let container: u16 = port.trim().parse().map_err(|_| bad(format!("{k:?} is not a port[/protocol]")))?;
            let proto = proto.trim().to_ascii_lowercase();
            if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
                return Err(bad(format!("{k:?}: protocol must be tcp, udp or sctp")));
            }
            let (ip, host) = match v.rsplit_once(':') {
                Some((ip, h)) => (ip.trim(), h.trim()),
                None => ("", v),
            };
            let host = if host.is_empty() {
                None
            } else {
                Some(host.parse::<u16>().map_err(|_| bad(format!("{v:?} is not [ip:]hostport")))?.into())
            };
            no_option("port_bindings", ip)?;
            let ip = if ip.is_empty() { "0.0.0.0".to_string() } else { ip.to_string() };
            Ok(PortBinding { ip, host, container, proto })
        })
        .collect()
}

/// `host` → `container[:ro]` (an empty value: an anonymous volume at `host`).
pub fn parse_volumes(param: &'static str, d: Option<&Dict>) -> Result<Vec<String>, DockerError> {
    entries(d)
        .map(|(k, v)| {
            no_option(param, k)?;
            no_option(param, v)?;
            Ok(if v.is_empty() { k.to_string() } else { format!("{k}:{v}") })
        })
        .collect()
}

/// `linux.docker.running` `files`: container path → host file, mounted read-only. The
/// key (the path in the container) is an absolute file path by its type (`PathDict`);
/// the value, the host file, is free text checked here.
pub fn parse_file_mounts(d: Option<&PathDict>) -> Result<Vec<String>, DockerError> {
    d.into_iter()
        .flat_map(|d| d.iter())
        .map(|e| (e.key.to_string(), e.value_or_empty().trim()))
        .map(|(k, v)| {
            if v.is_empty() {
                return Err(DockerError::param("files", format!("{k:?} names no host file")));
            }
            no_option("files", v)?;
            Ok(format!("{v}:{k}:ro"))
        })
        .collect()
}

/// The reference text's examples for `cpu_shares` (`0-3`, `0`) are CPU sets, while the
/// Salt argument behind it was a share weight: a value with `-` or `,` is a CPU set
/// (`--cpuset-cpus`), a number of 2 or more a weight (`--cpu-shares`); `0` and `1`
/// are no weight Docker accepts (0 means "default") and pass nothing.
pub fn cpu_args(v: Option<&str>) -> Result<Vec<String>, DockerError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    if v.contains(['-', ',']) {
        if v.chars().all(|c| c.is_ascii_digit() || c == '-' || c == ',') && !v.starts_with('-') {
            return Ok(vec![format!("--cpuset-cpus={v}")]);
        }
    } else if let Ok(n) = v.parse::<u64>() {
        return Ok(if n >= 2 { vec![format!("--cpu-shares={n}")] } else { Vec::new() });
    }
    Err(DockerError::param("cpu_shares", format!("{v:?} is neither a share weight nor a CPU set such as 0-3")))
}

/// `512m`-style sizes (b, k, m, g, t suffixes).
pub fn check_memory(v: Option<&str>) -> Result<Option<String>, DockerError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let digits = v.trim_end_matches(|c: char| "bkmgtBKMGT".contains(c));
    if digits.is_empty() || v.len() - digits.len() > 1 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(DockerError::param("mem_limit", format!("{v:?} is not a size such as 512m")));
    }
    Ok(Some(v.to_string()))
}

fn env_of(d: Option<&Dict>) -> Result<Vec<(String, String)>, DockerError> {
    d.into_iter()
        .flat_map(|d| d.iter())
        .map(|e| {
            let key = e.key.trim();
            if key.is_empty() || key.starts_with('#') || key.contains(['=', '\0']) || key.contains(char::is_whitespace)
            {
                return Err(DockerError::param("environment", format!("{key:?} is not a variable name")));
            }
            let value = e.value_or_empty();
            if value.contains(['\n', '\r', '\0']) {
                return Err(DockerError::param(
                    "environment",
                    format!("the value of {key} has a line break, which docker's --env-file cannot carry"),
                ));
            }
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

fn simple_pairs(param: &'static str, d: Option<&Dict>, sep: &str) -> Result<Vec<String>, DockerError> {
    entries(d)
        .map(|(k, v)| {
            no_option(param, k)?;
            no_option(param, v)?;
            Ok(if v.is_empty() { k.to_string() } else { format!("{k}{sep}{v}") })
        })
        .collect()
}

impl RunSpec {
    pub fn from_running(p: &LinuxDockerRunning) -> Result<Self, DockerError> {
        let mut mounts = parse_volumes("volumes", p.volumes.as_ref())?;
        mounts.extend(parse_volumes("binds", p.binds.as_ref())?);
        mounts.extend(parse_file_mounts(p.files.as_ref())?);
        let expose: Vec<String> =
            p.ports.iter().flat_map(|a| a.iter()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for e in &expose {
            no_option("ports", e)?;
        }
        let spec = Self {
            container: p.container.trim().to_string(),
            image: image_ref(&p.image, &p.tag),
            count: p.count,
            command: p.command.iter().flat_map(|c| c.iter()).cloned().collect(),
            entry_point: p.entry_point.as_deref().map(str::trim).filter(|e| !e.is_empty()).map(str::to_string),
            env: env_of(p.environment.as_ref())?,
            mounts,
            ports: parse_ports(p.port_bindings.as_ref())?,
            expose,
            publish_all: p.publish_all_ports.unwrap_or(false),
            links: simple_pairs("links", p.links.as_ref(), ":")?,
            devices: simple_pairs("devices", p.devices.as_ref(), ":")?,
            memory: check_memory(p.mem_limit.as_deref())?,
            cpu: cpu_args(p.cpu_shares.as_deref())?,
            force: p.force,
        };
        spec.check()?;
        Ok(spec)
    }

    /// The deploy's run part; `files` are (host file, container path).
    pub fn from_deploy(p: &LinuxDockerDeploy, files: &[(PathBuf, String)]) -> Result<Self, DockerError> {
        let mut mounts = parse_volumes("volumes", p.volumes.as_ref())?;
        mounts.extend(parse_volumes("binds", p.binds.as_ref())?);
        // Read-write, as the adaptor mounted them (a volume without `:ro`): a program
        // that rewrites its own configuration keeps working. A change it makes is
        // replaced by the recipe's content, and the containers restarted, next round.
        mounts.extend(files.iter().map(|(host, cpath)| format!("{}:{cpath}", host.display())));
        let expose: Vec<String> =
            p.ports.iter().flat_map(|a| a.iter()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for e in &expose {
            no_option("ports", e)?;
        }
        let spec = Self {
            container: p.container.trim().to_string(),
            image: image_ref(&p.image, &p.tag),
            count: p.count,
            command: p.command.iter().flat_map(|c| c.iter()).cloned().collect(),
            env: env_of(p.environment.as_ref())?,
            mounts,
            ports: parse_ports(p.port_bindings.as_ref())?,
            expose,
            publish_all: p.publish_all_ports.unwrap_or(false),
            links: simple_pairs("links", p.links.as_ref(), ":")?,
            devices: simple_pairs("devices", p.devices.as_ref(), ":")?,
            memory: check_memory(p.mem_limit.as_deref())?,
            cpu: cpu_args(p.cpu_shares.as_deref())?,
            force: p.force,
            ..Self::default()
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), DockerError> {
        check_container_name("container", &self.container)?;
        check_reference("image", &self.image)?;
        if let Some(e) = &self.entry_point {
            no_option("entry_point", e)?;
        }
        Ok(())
    }

    /// The names of the wanted containers.
    pub fn names(&self) -> Vec<String> {
        match self.count {
            Some(n) if n > 0 => (1..=n).map(|i| format!("{}_{i}", self.container)).collect(),
            _ => vec![self.container.clone()],
        }
    }

    /// The options, image and command of the container at `index`, environment aside.
    pub fn options(&self, index: u32) -> Vec<String> {
        let mut a = Vec::new();
        for m in &self.mounts {
            a.push(format!("--volume={m}"));
        }
        for p in &self.ports {
            a.push(format!("--publish={}", p.render(index)));
        }
        for e in &self.expose {
            a.push(format!("--expose={e}"));
        }
        if self.publish_all {
            a.push("--publish-all".into());
        }
        for l in &self.links {
            a.push(format!("--link={l}"));
        }
        for d in &self.devices {
            a.push(format!("--device={d}"));
        }
        if let Some(m) = &self.memory {
            a.push(format!("--memory={m}"));
        }
        a.extend(self.cpu.iter().cloned());
        if let Some(e) = &self.entry_point {
            a.push(format!("--entrypoint={e}"));
        }
        a.push(self.image.clone());
        a.extend(self.command.iter().cloned());
        a
    }

    /// The checksum kept in the container's label.
    pub fn checksum(&self, index: u32) -> String {
        let text = serde_json::json!({"options": self.options(index), "env": self.env}).to_string();
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// The whole `docker run` command line for container `index` named `name`.
    pub fn run_args(&self, index: u32, name: &str, state: &StateId, env_file: Option<&std::path::Path>) -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--detach".into(),
            format!("--name={name}"),
            format!("--label={LABEL_PARAMS}={}", self.checksum(index)),
            format!("--label={LABEL_STATE}={}", state.as_str()),
        ];
        if let Some(f) = env_file {
            a.push(format!("--env-file={}", f.display()));
        }
        a.extend(self.options(index));
        a
    }
}

/// Why a container is to be recreated, if it is.
fn recreate_reason(
    spec: &RunSpec,
    index: u32,
    info: &super::ContainerInfo,
    image: Option<&str>,
) -> Option<&'static str> {
    if spec.force {
        Some("force")
    } else if info.labels.get(LABEL_PARAMS).map(String::as_str) != Some(spec.checksum(index).as_str()) {
        Some("parameters changed")
    } else if image.is_some_and(|id| !same_id(id, &info.image)) {
        Some("image changed")
    } else {
        None
    }
}

/// Where containers are made: the client, and the state they belong to.
pub struct Site<'a> {
    pub docker: &'a Docker,
    pub state: &'a StateId,
    pub ctx: &'a Ctx,
}

async fn create(
    site: &Site<'_>,
    spec: &RunSpec,
    index: u32,
    name: &str,
    report: &mut Report,
    cancel: &mut Cancel,
) -> Result<(), DockerError> {
    let (docker, state, ctx) = (site.docker, site.state, site.ctx);
    // A plan writes no environment file and runs nothing: the caller reports the
    // creation in the apply's words.
    if crate::plan::active() {
        return Ok(());
    }
    let env_dir = if spec.env.is_empty() {
        None
    } else {
        let dir = PrivateDir::create(&ctx.state_dir, "docker-env")?;
        let text: String = spec.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let file = dir.write("env", text.as_bytes())?;
        Some((dir, file))
    };
    let args = spec.run_args(index, name, state, env_dir.as_ref().map(|(_, f)| f.as_path()));
    let ran = docker.must(docker.spec(args).with_timeout(super::TRANSFER_TIMEOUT), report, cancel).await;
    drop(env_dir);
    ran?;
    ensure_up(docker, name, report, cancel).await
}

async fn ensure_up(docker: &Docker, name: &str, _report: &mut Report, cancel: &mut Cancel) -> Result<(), DockerError> {
    if docker.container(name, cancel).await?.is_some_and(|c| c.running) {
        return Ok(());
    }
    let logs =
        exec::run(&docker.spec(["logs", "--tail", "20", name]), cancel).await.map(|f| f.output).unwrap_or_default();
    let tail = exec::last_lines(&logs, exec::TAIL_LINES);
    Err(DockerError::NotRunning {
        name: name.to_string(),
        logs: if tail.is_empty() { String::new() } else { format!("; its log ends: {tail}") },
    })
}

/// Brings the containers of `spec` to what it says; `restart` (why) when the watch
/// triggered.
pub async fn ensure(
    site: &Site<'_>,
    spec: &RunSpec,
    restart: Option<&str>,
    report: &mut Report,
    cancel: &mut Cancel,
) -> Result<(), DockerError> {
    let docker = site.docker;
    let wanted = spec.names();
    let all = docker.container_names(cancel).await?;
    for surplus in related(&spec.container, &all).into_iter().filter(|n| !wanted.contains(n)) {
        docker.remove_container(surplus, report, cancel).await?;
        report.change(format!("container {surplus}"), "removed (no longer wanted)");
    }
    let image = docker.image_id(&spec.image, cancel).await?;
    for (i, name) in wanted.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let subject = format!("container {name}");
        match docker.container(name, cancel).await? {
            None => {
                create(site, spec, index, name, report, cancel).await?;
                report.change(subject, format!("created from {} and started", spec.image));
            }
            Some(info) => {
                if let Some(why) = recreate_reason(spec, index, &info, image.as_deref()) {
                    docker.remove_container(name, report, cancel).await?;
                    create(site, spec, index, name, report, cancel).await?;
                    report.change(subject, format!("recreated ({why})"));
                } else if !info.running {
                    if !crate::plan::active() {
                        docker.must(docker.spec(["start", name]), report, cancel).await?;
                        ensure_up(docker, name, report, cancel).await?;
                    }
                    report.change(subject, "started");
                } else if let Some(why) = restart {
                    if crate::plan::active() {
                        report.change(subject, format!("restarted ({why})"));
                        continue;
                    }
                    let restarted = docker.must(docker.spec(["restart", name]), report, cancel).await;
                    match restarted {
                        Ok(_) => {
                            ensure_up(docker, name, report, cancel).await?;
                            report.change(subject, format!("restarted ({why})"));
                        }
                        Err(e) if e.is_cancelled() => return Err(e),
                        Err(e) => {
                            report.notes.push(format!("restart of {name} failed ({e}); recreated it"));
                            docker.remove_container(name, report, cancel).await?;
                            create(site, spec, index, name, report, cancel).await?;
                            report.change(subject, format!("recreated ({why}; the restart failed)"));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn describe_watch(check: &FileChanges) -> String {
    let files: Vec<String> = check.changed.iter().map(ToString::to_string).collect();
    format!("watched file changed: {}", files.join(", "))
}

pub async fn running(
    engine: &Engine,
    p: &LinuxDockerRunning,
    state: &StateId,
    ctx: &Ctx,
    mut cancel: Cancel,
) -> Outcome {
    let mut report = Report::default();
    let result = async {
        let spec = RunSpec::from_running(p)?;
        let docker = Docker::new(engine)?;
        let store = ChecksumStore::new(&ctx.state_dir);
        let (check, restart) = match &p.watch {
            Some(Watch::EveryRound) => (None, Some("watch: true".to_string())),
            Some(Watch::Files(files)) if !files.is_empty() => {
                let check = store.check(state, files, false)?;
                let restart = check.triggered().then(|| describe_watch(&check));
                (Some(check), restart)
            }
            _ => (None, None),
        };
        ensure(&Site { docker: &docker, state, ctx }, &spec, restart.as_deref(), &mut report, &mut cancel).await?;
        if let Some(check) = check.filter(|_| !crate::plan::active()) {
            store.commit(&check)?;
        }
        Ok(())
    }
    .await;
    report.finish(&format!("container {}", p.container.trim()), result)
}

/// Where deploy writes the file for container path `cpath`.
pub fn config_path(ctx: &Ctx, container: &str, cpath: &str) -> PathBuf {
    ctx.state_dir.join("docker-config").join(container).join(cpath.replace('/', "-"))
}

/// Writes `content` to `path` (0644 root) when it differs; whether it did (in a plan,
/// whether it would, writing nothing).
fn write_if_different(path: &AbsPath, content: &[u8]) -> Result<bool, DockerError> {
    match fs::read(path.as_path()) {
        Ok(have) if have == content => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(DockerError::Io { path: path.as_path().to_path_buf(), op: "read", source }),
    }
    if !crate::plan::active() {
        fsutil::write_atomic(path, content, 0o644, 0, 0)?;
    }
    Ok(true)
}

pub async fn deploy(engine: &Engine, p: &LinuxDockerDeploy, state: &StateId, ctx: &Ctx, mut cancel: Cancel) -> Outcome {
    let mut report = Report::default();
    let result = async {
        let container = p.container.trim();
        check_container_name("container", container)?;
        let reference = image_ref(&p.image, &p.tag);
        check_reference("image", &reference)?;
        let mut files: Vec<(PathBuf, String)> = Vec::new();
        let mut contents: BTreeMap<PathBuf, &str> = BTreeMap::new();
        // Keys are absolute file paths, not `/`, by their type (`PathDict`).
        for e in p.files.iter().flat_map(|d| d.iter()) {
            let cpath = &e.key;
            let host = config_path(ctx, container, &cpath.to_string());
            contents.insert(host.clone(), e.value_or_empty());
            files.push((host, cpath.to_string()));
        }
        let spec = RunSpec::from_deploy(p, &files)?;
        let auth = Auth::for_image(
            &ctx.state_dir,
            &reference,
            p.username.as_deref(),
            p.password.as_deref(),
            &mut report,
            p.email.as_deref(),
        )?;
        let docker = Docker::new(engine)?.with_auth(auth);

        let mut watched = Vec::new();
        // Files a plan would write: their new content is what the apply's watch sees.
        let mut would_write: Vec<(AbsPath, &str)> = Vec::new();
        if !files.is_empty() {
            let dir = AbsPath::parse(&ctx.state_dir.join("docker-config").join(container).to_string_lossy())
                .map_err(|source| DockerError::Path { param: "container", source })?;
            fsutil::create_dirs(&dir, 0o700, (Uid::from_raw(0), Gid::from_raw(0)), &mut report.changes)?;
        }
        for (host, cpath) in &files {
            let host = AbsPath::parse(&host.to_string_lossy())
                .map_err(|source| DockerError::Path { param: "files", source })?;
            let content = contents.get(host.as_path()).copied().unwrap_or_default();
            if write_if_different(&host, content.as_bytes())? {
                report.change(host.to_string(), format!("written (mounted at {cpath})"));
                would_write.push((host.clone(), content));
            }
            watched.push(host);
        }
        // `watch` as for linux.docker.running: more files whose change restarts the
        // containers, or `true` for a restart every round.
        let every_round = matches!(p.watch, Some(Watch::EveryRound));
        if let Some(Watch::Files(extra)) = &p.watch {
            watched.extend(extra.iter().cloned());
        }
        let store = ChecksumStore::new(&ctx.state_dir);
        let mut check = store.check(state, &watched, false)?;
        if crate::plan::active() {
            // The apply checks after writing: a file it writes counts as changed when
            // its new content differs from what was seen last (never on first sight).
            for (file, content) in &would_write {
                if store.would_change(state, file, content.as_bytes())? && !check.changed.contains(file) {
                    check.changed.push(file.clone());
                }
            }
        }
        pull(&docker, &reference, &[container.to_string()], &mut report, &mut cancel).await?;
        let restart = if every_round {
            Some("watch: true".to_string())
        } else {
            check.triggered().then(|| describe_watch(&check))
        };
        ensure(&Site { docker: &docker, state, ctx }, &spec, restart.as_deref(), &mut report, &mut cancel).await?;
        if !crate::plan::active() {
            store.commit(&check)?;
        }
        Ok(())
    }
    .await;
    report.finish(&format!("container {}", p.container.trim()), result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::testutil::params;
    use opsagent_proto::catalogue::ModuleParams;
    use serde_json::json;

    fn running_params(raw: serde_json::Value) -> LinuxDockerRunning {
        crate::states::testutil::typed("linux.docker.running", raw)
    }

    #[test]
    fn run_command_lines_render() {
        let p = running_params(json!({
            "container": "web", "image": "local/app", "tag": "v1", "count": "2",
            "command": ["/bin/app", "--port", "80"],
            "environment": [{"key": "MODE", "value": "prod"}],
            "volumes": [{"key": "/srv/data", "value": "/data:ro"}],
            "files": [{"key": "/etc/app.conf", "value": "/srv/app.conf"}],
            "port_bindings": [{"key": "80", "value": "8080"}, {"key": "53/udp", "value": "127.0.0.1:5353"}, {"key": "9000"}],
            "devices": [{"key": "/dev/fuse", "value": "/dev/fuse:rwm"}],
            "mem_limit": "512m", "cpu_shares": "0-3", "ports": ["7000"], "links": [{"key": "db", "value": "database"}],
        }));
        let spec = RunSpec::from_running(&p).unwrap();
        assert_eq!(spec.names(), ["web_1", "web_2"]);
        let state = StateId::parse("s-1").unwrap();
        let args = spec.run_args(1, "web_2", &state, Some(std::path::Path::new("/x/env")));
        let checksum = spec.checksum(1);
        assert_eq!(
            args,
            [
                "run",
                "--detach",
                "--name=web_2",
                &format!("--label=io.opsagent.params={checksum}"),
                "--label=io.opsagent.state=s-1",
                "--env-file=/x/env",
                "--volume=/srv/data:/data:ro",
                "--volume=/srv/app.conf:/etc/app.conf:ro",
                "--publish=0.0.0.0:8081:80/tcp",
                "--publish=127.0.0.1:5354:53/udp",
                "--publish=9000/tcp",
                "--expose=7000",
                "--link=db:database",
                "--device=/dev/fuse:/dev/fuse:rwm",
                "--memory=512m",
                "--cpuset-cpus=0-3",
                "local/app:v1",
                "/bin/app",
                "--port",
                "80"
            ]
        );
        // Each container has its own checksum (ports differ); the same spec, the same.
        assert_ne!(spec.checksum(0), spec.checksum(1));
        assert_eq!(RunSpec::from_running(&p).unwrap().checksum(1), checksum);
        // An environment change changes the checksum, though it is not on the line.
        let mut other = spec.clone();
        other.env[0].1 = "dev".into();
        assert_ne!(other.checksum(1), checksum);
        let single = RunSpec::from_running(&running_params(json!({"container": "one", "image": "x"}))).unwrap();
        assert_eq!(single.names(), ["one"]);
        assert_eq!(single.image, "x:latest");
    }

    #[test]
    fn bad_values_are_refused() {
        let cases = [
            (json!({"port_bindings": [{"key": "http", "value": "80"}]}), "port_bindings"),
            (json!({"port_bindings": [{"key": "80/icmp", "value": "80"}]}), "80/icmp"),
            (json!({"volumes": [{"key": "--privileged", "value": "/x"}]}), "volumes"),
            (json!({"environment": [{"key": "A", "value": "a\nb"}]}), "line break"),
            (json!({"mem_limit": "lots"}), "mem_limit"),
            (json!({"cpu_shares": "half"}), "cpu_shares"),
            (json!({"container": "-x"}), "container"),
            (json!({"image": "--rm"}), "image"),
        ];
        for (extra, needle) in cases {
            let mut raw = json!({"container": "c", "image": "i"});
            for (k, v) in extra.as_object().unwrap() {
                raw[k] = v.clone();
            }
            // Refused by the catalogue (never reaching the module) or by the module.
            let err = match opsagent_proto::catalogue::parse_state("linux.docker.running", &raw) {
                Err(e) => e.to_string(),
                Ok(_) => RunSpec::from_running(&running_params(raw)).unwrap_err().to_string(),
            };
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert_eq!(cpu_args(Some("512")).unwrap(), ["--cpu-shares=512"]);
        assert!(cpu_args(Some("0")).unwrap().is_empty());
    }

    #[test]
    fn deploy_files_land_under_the_state_directory() {
        let ctx = Ctx::new(PathBuf::from("/var/lib/opsagent-helper"));
        assert_eq!(
            config_path(&ctx, "test", "/my-data/elasticsearch.yaml"),
            PathBuf::from("/var/lib/opsagent-helper/docker-config/test/-my-data-elasticsearch.yaml")
        );
        let ModuleParams::LinuxDockerDeploy(p) = params(
            "linux.docker.deploy",
            json!({"container": "test", "image": "dockerfile/elasticsearch",
                   "command": ["/elasticsearch/bin/elasticsearch", "-Des.config=/my-data/elasticsearch.yaml"],
                   "port_bindings": [{"key": "9200", "value": "9200"}], "volumes": [{"key": "/opt/data", "value": "/my-data/"}],
                   "ports": ["9300"], "links": [{"key": "db", "value": "database"}], "publish_all_ports": true,
                   "binds": [{"key": "/srv/logs", "value": "/logs:ro"}], "watch": ["/etc/app/secret"]}),
        ) else {
            panic!()
        };
        let host = config_path(&ctx, "test", "/my-data/elasticsearch.yaml");
        let spec = RunSpec::from_deploy(&p, &[(host, "/my-data/elasticsearch.yaml".into())]).unwrap();
        let opts = spec.options(0);
        assert!(opts.contains(&"--volume=/opt/data:/my-data/".to_string()), "{opts:?}");
        // The deploy's files read-write, as the adaptor mounted them.
        assert!(opts.contains(
            &"--volume=/var/lib/opsagent-helper/docker-config/test/-my-data-elasticsearch.yaml:/my-data/elasticsearch.yaml"
                .to_string()
        ));
        // ports, links, binds and publish_all_ports are honoured, as for running.
        for want in ["--volume=/srv/logs:/logs:ro", "--expose=9300", "--link=db:database", "--publish-all"] {
            assert!(opts.contains(&want.to_string()), "{want}: {opts:?}");
        }
        assert!(opts.ends_with(&[
            "dockerfile/elasticsearch:latest".to_string(),
            "/elasticsearch/bin/elasticsearch".into(),
            "-Des.config=/my-data/elasticsearch.yaml".into()
        ]));
    }
}
