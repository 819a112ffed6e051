//! The `linux.docker.*` states, driven through the `docker` command-line client (the
//! helper links no HTTP client). Any engine with a Docker-compatible CLI works: Docker
//! itself (`docker.io`, or Docker's packages), or Podman through `podman-docker`.
//!
//! - [`image`]: `linux.docker.pulled`, `linux.docker.built`, `linux.docker.pushed`;
//! - [`run`]: `linux.docker.running`, `linux.docker.deploy`.
//!
//! Registry credentials (`username`/`password`) never appear in an argument list, a
//! log line or a message: for the one state run that needs them, a private directory
//! (0700) under the helper's state directory gets a `config.json` (0600) in the format
//! of `docker login`, the client is pointed at it with `DOCKER_CONFIG` (and Podman's
//! `REGISTRY_AUTH_FILE`), and the directory is removed when the state ends, whatever
//! the result. Without `username`, the client's usual configuration (root's
//! `~/.docker/config.json`, e.g. from an operator's `docker login`) applies. `email` is
//! accepted and ignored: registries stopped using it with Docker 1.11.
//!
//! Containers with `count` are named `<name>_1` … `<name>_N`, as in the original;
//! "related" containers of a name are the name itself and those numbered variants.

pub mod image;
pub mod run;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsagent_proto::newtypes::{InvalidValue, StateId};
use opsagent_proto::request::{Change, Outcome};
use sha2::{Digest, Sha256};

use crate::cancel::Cancel;
use crate::checksums::ChecksumError;
use crate::dirfd::{Dir, NewDirs};
use crate::exec::{self, CommandSpec, Exit, Finished, ToolError};
use crate::fsutil::{self, FsError};
use crate::states::storage::find_tool;

/// Deadline of pulls, builds and pushes: images can be large.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Label holding the checksum of a container's parameters.
pub const LABEL_PARAMS: &str = "io.opsagent.params";
/// Label holding the id of the state that created a container.
pub const LABEL_STATE: &str = "io.opsagent.state";

/// How the Docker client is reached: the program (looked up on the helper's search path
/// unless it is a path) and environment added to the tool environment (tests point
/// `DOCKER_HOST` at their own engine).
#[derive(Debug, Clone)]
pub struct Engine {
    pub program: String,
    pub env: Vec<(String, String)>,
}

impl Engine {
    /// The host's `docker` client with its default engine.
    pub fn system() -> Self {
        Self { program: "docker".into(), env: Vec::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "{0} is not installed; install it with a package state first (docker.io, or podman-docker for \
         Podman's Docker-compatible client)"
    )]
    NotInstalled(String),
    #[error("parameter {param}: {problem}")]
    Param { param: &'static str, problem: String },
    #[error("parameter {param}: {source}")]
    Path { param: &'static str, source: InvalidValue },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Watch(#[from] ChecksumError),
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("`{command}` printed something that is not what docker prints: {problem}")]
    Unexpected { command: String, problem: String },
    #[error("image {0} is not in the engine after `docker {1}` succeeded")]
    NoImage(String, &'static str),
    #[error("container {name} is not running after it was started{logs}")]
    NotRunning { name: String, logs: String },
}

impl DockerError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, DockerError::Tool(e) if e.is_cancelled())
    }

    pub fn param(param: &'static str, problem: impl Into<String>) -> Self {
        DockerError::Param { param, problem: problem.into() }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> DockerError {
    let path = path.to_path_buf();
    move |source| DockerError::Io { path, op, source }
}

/// What a state run accumulates: changes, notes for the comment, tool output.
#[derive(Debug, Default)]
pub struct Report {
    pub changes: Vec<Change>,
    pub notes: Vec<String>,
    pub output: String,
}

impl Report {
    pub fn change(&mut self, subject: impl Into<String>, what: impl Into<String>) {
        self.changes.push(Change::new(subject, what));
    }

    pub fn finish(self, subject: &str, result: Result<(), DockerError>) -> Outcome {
        let cancelled = matches!(&result, Err(e) if e.is_cancelled());
        let mut outcome = crate::states::finish(subject, result, self.changes, &self.notes);
        outcome.cancelled = cancelled;
        outcome.stdout = self.output;
        outcome
    }
}

/// A private directory under the state directory, removed when dropped. Made, written
/// and removed through directory descriptors ([`Dir`]).
#[derive(Debug)]
pub struct PrivateDir {
    pub path: PathBuf,
    parent: Dir,
    name: OsString,
    dir: Dir,
}

impl PrivateDir {
    pub fn create(state_dir: &Path, kind: &str) -> Result<Self, DockerError> {
        let parent_path = state_dir.join(kind);
        let mut random = [0u8; 12];
        getrandom::fill(&mut random).map_err(|e| DockerError::Io {
            path: parent_path.clone(),
            op: "get random bytes for a name in",
            source: io::Error::other(e.to_string()),
        })?;
        let name = OsString::from(hex::encode(random));
        let path = parent_path.join(&name);
        crate::plan::check("create the directory", path.display())
            .map_err(|r| io_err(&path, "create directory")(r.into()))?;
        let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
        let parent = fsutil::create_dir_all(&parent_path, 0o700, root, &mut Vec::new())?;
        let dir = parent.mkdir(&name, NewDirs { mode: 0o700, uid: 0, gid: 0 }).map_err(FsError::from)?;
        Ok(Self { path, parent, name, dir })
    }

    /// Writes `name` (0600, new) in the directory.
    pub fn write(&self, name: &str, content: &[u8]) -> Result<PathBuf, DockerError> {
        let file = self.path.join(name);
        crate::plan::check("create", file.display()).map_err(|r| io_err(&file, "create")(r.into()))?;
        let mut f = self.dir.create_named(OsStr::new(name)).map_err(FsError::from)?;
        f.write_all(content).map_err(io_err(&file, "write"))?;
        Ok(file)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = self.parent.remove_tree(&self.name);
    }
}

/// Registry credentials of one state, as a client configuration directory.
#[derive(Debug)]
pub struct Auth {
    dir: PrivateDir,
    config: PathBuf,
}

/// The registry an image reference lives on, as `docker login` keys it.
pub fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first.to_string(),
        _ => "https://index.docker.io/v1/".to_string(),
    }
}

impl Auth {
    /// `None` without a username; an error for a username without a password.
    pub fn for_image(
        state_dir: &Path,
        reference: &str,
        username: Option<&str>,
        password: Option<&str>,
        report: &mut Report,
        email: Option<&str>,
    ) -> Result<Option<Self>, DockerError> {
        if email.is_some_and(|e| !e.trim().is_empty()) {
            report.notes.push("email is no longer used by registries; ignored".into());
        }
        let Some(user) = username.map(str::trim).filter(|u| !u.is_empty()) else {
            if password.is_some_and(|p| !p.is_empty()) {
                report.notes.push("password given without username; ignored".into());
            }
            return Ok(None);
        };
        let Some(pass) = password.filter(|p| !p.is_empty()) else {
            return Err(DockerError::param("password", "username is given, so the password is required"));
        };
        // A plan asks no registry (it inspects the engine's own images and containers),
        // so it needs no credentials file, and writing one would stop the plan there: a
        // state with credentials could never be planned, nor found converged.
        if crate::plan::active() {
            return Ok(None);
        }
        let registry = registry_of(reference);
        let token = base64(format!("{user}:{pass}").as_bytes());
        let config = serde_json::json!({"auths": {registry: {"auth": token}}});
        let dir = PrivateDir::create(state_dir, "docker-auth")?;
        let config = dir.write("config.json", config.to_string().as_bytes())?;
        Ok(Some(Self { dir, config }))
    }
}

/// Standard base64 with padding (what `docker login` stores).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(char::from(T[(n >> 18) as usize & 63]));
        out.push(char::from(T[(n >> 12) as usize & 63]));
        out.push(if chunk.len() > 1 { char::from(T[(n >> 6) as usize & 63]) } else { '=' });
        out.push(if chunk.len() > 2 { char::from(T[n as usize & 63]) } else { '=' });
    }
    out
}

/// `repo:tag`, unless `repo` already names a tag or a digest.
pub fn image_ref(repo: &str, tag: &str) -> String {
    let (repo, tag) = (repo.trim(), tag.trim());
    let last = repo.rsplit('/').next().unwrap_or(repo);
    if repo.contains('@') || last.contains(':') || tag.is_empty() {
        repo.to_string()
    } else {
        format!("{repo}:{tag}")
    }
}

/// An image reference from a recipe: not empty, no blanks, not an option.
pub fn check_reference(param: &'static str, reference: &str) -> Result<(), DockerError> {
    if reference.is_empty() || reference.starts_with('-') || reference.contains(char::is_whitespace) {
        return Err(DockerError::param(param, format!("{reference:?} is not an image reference")));
    }
    Ok(())
}

/// Docker's rule for container names.
pub fn check_container_name(param: &'static str, name: &str) -> Result<(), DockerError> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 200;
    if ok {
        Ok(())
    } else {
        Err(DockerError::param(param, format!("{name:?} is not a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")))
    }
}

/// The containers among `all` that belong to `name`: itself and `<name>_<N>`.
pub fn related<'a>(name: &str, all: &'a [String]) -> Vec<&'a String> {
    all.iter()
        .filter(|n| {
            *n == name
                || n.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|num| !num.is_empty() && num.chars().all(|c| c.is_ascii_digit()))
        })
        .collect()
}

/// Image ids compare without the `sha256:` prefix (Podman's client leaves it out).
pub fn same_id(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().trim_start_matches("sha256:").to_string();
    norm(a) == norm(b)
}

pub fn short_id(id: &str) -> String {
    id.trim().trim_start_matches("sha256:").chars().take(12).collect()
}

/// What `docker container inspect` says about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    pub running: bool,
    pub image: String,
    pub labels: BTreeMap<String, String>,
}

/// Parses `docker container inspect` output (a JSON array of one object).
pub fn parse_inspect(name: &str, text: &str) -> Result<ContainerInfo, String> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| e.to_string())?;
    let c = v.get(0).ok_or("an empty list")?;
    let running = c.pointer("/State/Running").and_then(serde_json::Value::as_bool).ok_or("no State.Running")?;
    let image = c.get("Image").and_then(serde_json::Value::as_str).ok_or("no Image")?.to_string();
    let labels = c
        .pointer("/Config/Labels")
        .and_then(serde_json::Value::as_object)
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(ContainerInfo { name: name.to_string(), running, image, labels })
}

fn not_found(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    o.contains("no such") || o.contains("not known") || o.contains("not found")
}

/// The client for one state run.
pub struct Docker {
    program: PathBuf,
    env: Vec<(String, String)>,
    auth: Option<Auth>,
}

impl Docker {
    pub fn new(engine: &Engine) -> Result<Self, DockerError> {
        let program =
            find_tool(&engine.program, &[]).ok_or_else(|| DockerError::NotInstalled(engine.program.clone()))?;
        Ok(Self { program, env: engine.env.clone(), auth: None })
    }

    /// Uses `auth` for the commands that follow (until the client is dropped).
    pub fn with_auth(mut self, auth: Option<Auth>) -> Self {
        self.auth = auth;
        self
    }

    pub fn spec<S: Into<String>>(&self, args: impl IntoIterator<Item = S>) -> CommandSpec {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        let mut spec = CommandSpec::tool(&self.program.to_string_lossy(), args);
        for (k, v) in &self.env {
            spec = spec.with_env(k, v);
        }
        if let Some(auth) = &self.auth {
            spec = spec
                .with_env("DOCKER_CONFIG", &auth.dir.path.to_string_lossy())
                .with_env("REGISTRY_AUTH_FILE", &auth.config.to_string_lossy());
        }
        spec
    }

    /// Runs a command that must succeed; its output is added to `report`.
    pub async fn must(
        &self,
        spec: CommandSpec,
        report: &mut Report,
        cancel: &mut Cancel,
    ) -> Result<Finished, DockerError> {
        let done = exec::checked(&spec, &[0], cancel).await?;
        if !done.output.trim().is_empty() {
            report.output.push_str(&format!("$ {}\n{}", spec.display(), done.output));
            if !report.output.ends_with('\n') {
                report.output.push('\n');
            }
        }
        Ok(done)
    }

    /// A query that may answer "no such object" (exit 1): `None` then.
    async fn query(&self, spec: CommandSpec, cancel: &mut Cancel) -> Result<Option<String>, DockerError> {
        let done = exec::checked(&spec, &[0, 1, 125], cancel).await?;
        match done.exit {
            Exit::Code(0) => Ok(Some(done.output)),
            _ if not_found(&done.output) => Ok(None),
            other => Err(DockerError::Tool(ToolError::Failed {
                command: spec.display(),
                how: exec::describe_exit(&other),
                output: done.output,
            })),
        }
    }

    /// Whether the client is Podman's (`docker --version` names it).
    pub async fn is_podman(&self, cancel: &mut Cancel) -> bool {
        exec::run(&self.spec(["--version"]).inspection(), cancel)
            .await
            .is_ok_and(|f| f.output.to_ascii_lowercase().contains("podman"))
    }

    pub async fn image_id(&self, reference: &str, cancel: &mut Cancel) -> Result<Option<String>, DockerError> {
        let spec = self.spec(["image", "inspect", "--format", "{{.Id}}", reference]).inspection();
        Ok(self.query(spec, cancel).await?.map(|o| o.trim().to_string()).filter(|id| !id.is_empty()))
    }

    pub async fn container(&self, name: &str, cancel: &mut Cancel) -> Result<Option<ContainerInfo>, DockerError> {
        let spec = self.spec(["container", "inspect", name]).inspection();
        let command = spec.display();
        match self.query(spec, cancel).await? {
            None => Ok(None),
            Some(text) => {
                parse_inspect(name, &text).map(Some).map_err(|problem| DockerError::Unexpected { command, problem })
            }
        }
    }

    pub async fn container_names(&self, cancel: &mut Cancel) -> Result<Vec<String>, DockerError> {
        let spec = self.spec(["ps", "--all", "--format", "{{.Names}}"]).inspection();
        let done = exec::checked(&spec, &[0], cancel).await?;
        Ok(done.output.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
    }

    pub async fn remove_container(
        &self,
        name: &str,
        report: &mut Report,
        cancel: &mut Cancel,
    ) -> Result<(), DockerError> {
        // A plan reports the removal as the apply does (its callers say why).
        if crate::plan::active() {
            return Ok(());
        }
        self.must(self.spec(["rm", "--force", name]), report, cancel).await.map(|_| ())
    }

    /// Removes the containers related to each of `names` (see the module docs).
    pub async fn remove_related(
        &self,
        names: &[String],
        why: &str,
        report: &mut Report,
        cancel: &mut Cancel,
    ) -> Result<(), DockerError> {
        if names.iter().all(|n| n.trim().is_empty()) {
            return Ok(());
        }
        let all = self.container_names(cancel).await?;
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            for victim in related(name, &all) {
                self.remove_container(victim, report, cancel).await?;
                report.change(format!("container {victim}"), format!("removed ({why})"));
            }
        }
        Ok(())
    }

    /// Removes a replaced image if nothing else uses it; a refusal (still tagged
    /// elsewhere, used by a container) is fine and not reported.
    pub async fn remove_old_image(&self, old: &str, report: &mut Report, cancel: &mut Cancel) {
        // Whether the engine would refuse is known only by asking it to remove the
        // image; a refusal is not reported, so a plan reports nothing either.
        if crate::plan::active() {
            return;
        }
        let spec = self.spec(["image", "rm", old.trim()]);
        if let Ok(done) = exec::run(&spec, cancel).await {
            if done.exit == Exit::Code(0) {
                report.change(format!("image {}", short_id(old)), "removed (replaced)");
            }
        }
    }
}

/// A file under `<state dir>/docker/` for one state (`kind` names what it holds).
pub fn state_file(state_dir: &Path, kind: &str, state: &StateId) -> PathBuf {
    let name = format!("{kind}-{}", state.as_str()).replace('/', "-");
    if name.len() <= 200 {
        state_dir.join("docker").join(name)
    } else {
        state_dir.join("docker").join(format!("{kind}-{}", hex::encode(Sha256::digest(state.as_str().as_bytes()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn base64_matches_the_standard() {
        for (input, out) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("alice:s3cret", "YWxpY2U6czNjcmV0")]
        {
            assert_eq!(base64(input.as_bytes()), out, "{input}");
        }
    }

    #[test]
    fn references_and_registries() {
        assert_eq!(image_ref("nginx", "latest"), "nginx:latest");
        assert_eq!(image_ref("localhost:5000/app", "v1"), "localhost:5000/app:v1");
        assert_eq!(image_ref("app:2", "latest"), "app:2");
        assert_eq!(image_ref("app@sha256:abc", "latest"), "app@sha256:abc");
        assert_eq!(registry_of("nginx:latest"), "https://index.docker.io/v1/");
        assert_eq!(registry_of("library/nginx"), "https://index.docker.io/v1/");
        assert_eq!(registry_of("127.0.0.1:5000/test/app:v1"), "127.0.0.1:5000");
        assert_eq!(registry_of("registry.example.com/app"), "registry.example.com");
        assert_eq!(registry_of("localhost/app"), "localhost");
        assert!(check_reference("repo", "--privileged").is_err());
        assert!(check_reference("repo", "a b").is_err());
        assert!(check_container_name("container", "web_1.x-y").is_ok());
        assert!(check_container_name("container", "_web").is_err());
        assert!(check_container_name("container", "../x").is_err());
    }

    #[test]
    fn related_containers_are_the_name_and_its_numbers() {
        let all: Vec<String> = ["web", "web_1", "web_12", "web_x", "webapp", "web_1_2", "db"].map(String::from).into();
        assert_eq!(related("web", &all), ["web", "web_1", "web_12"]);
    }

    #[test]
    fn inspect_output_is_parsed() {
        let text = r#"[{"Id":"abc","Image":"sha256:1234","State":{"Running":true},"Config":{"Labels":{"io.opsagent.params":"h"}}}]"#;
        let c = parse_inspect("web", text).unwrap();
        assert!(c.running && c.image == "sha256:1234" && c.labels[LABEL_PARAMS] == "h");
        let no_labels = r#"[{"Image":"x","State":{"Running":false},"Config":{"Labels":null}}]"#;
        assert!(parse_inspect("web", no_labels).unwrap().labels.is_empty());
        assert!(parse_inspect("web", "[]").is_err());
        assert!(same_id("sha256:abcd", "abcd") && !same_id("abcd", "abce"));
    }

    #[test]
    fn credentials_live_in_a_private_file_that_goes_away() {
        let tmp = tempfile::tempdir().unwrap();
        let mut report = Report::default();
        let auth = Auth::for_image(tmp.path(), "127.0.0.1:5000/app", Some("alice"), Some("s3cret"), &mut report, None)
            .unwrap()
            .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&auth.dir.path).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&auth.config).unwrap().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&auth.config).unwrap();
        assert_eq!(text, r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#);
        let engine = Engine { program: "sh".into(), env: vec![] };
        let docker = Docker::new(&engine).unwrap().with_auth(Some(auth));
        let spec = docker.spec(["pull", "x"]);
        assert!(!spec.display().contains("s3cret") && !spec.display().contains("alice"));
        let dir = spec.env.iter().find(|(k, _)| k == "DOCKER_CONFIG").unwrap().1.clone();
        drop(docker);
        assert!(!Path::new(&dir).exists(), "credentials left behind");

        let err = Auth::for_image(tmp.path(), "x", Some("alice"), None, &mut report, None).unwrap_err();
        assert_eq!(err.to_string(), "parameter password: username is given, so the password is required");
        assert!(Auth::for_image(tmp.path(), "x", None, None, &mut report, Some("a@b")).unwrap().is_none());
        assert_eq!(report.notes, ["email is no longer used by registries; ignored"]);
    }

    #[test]
    fn a_plan_writes_no_credentials_and_no_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let mut report = Report::default();
        crate::plan::in_thread(Some(crate::plan::Plan::new()), || {
            let auth = Auth::for_image(&state, "127.0.0.1:5000/app", Some("alice"), Some("s3cret"), &mut report, None);
            assert!(auth.unwrap().is_none(), "a plan made a credentials file");
            // A missing password is still the recipe's error, in a plan too.
            assert!(Auth::for_image(&state, "x", Some("alice"), None, &mut report, None).is_err());
            let err = PrivateDir::create(&state, "docker-env").unwrap_err().to_string();
            assert!(err.contains("a plan writes nothing: refused to create the directory"), "{err}");
        });
        assert!(!state.exists(), "a plan created {}", state.display());
    }
}
