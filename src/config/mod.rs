//! The daemon's configuration: `/etc/opsagent.conf` (see [`EXAMPLE`]) plus command-line
//! [`Overrides`], checked once into a typed [`Config`].
//!
//! Precedence, highest first: command-line flag, configuration file, instance userdata
//! (only for the `[userdata]` keys, filled later by [`crate::instance_identity`]), built-in default.
//! `ws_uri` and `app_id` may stay unset at load time because some commands (`check`,
//! `status`) never talk to the backend; [`Config::require_backend`] asks for them.

mod error;
mod example;
use opsagent_shared::ini;
mod values;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Location, Origin};
pub use example::EXAMPLE;
pub(crate) use values::identifier;

/// Read when no `--config` is given, if it exists.
pub const DEFAULT_PATH: &str = "/etc/opsagent.conf";
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/visualops/opsagent";
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/visualops/opsagent/token";
pub const DEFAULT_HELPER_SOCKET: &str = "/run/opsagent-helper/helper.sock";
/// 1 GiB.
pub const DEFAULT_DOWNLOAD_MAX_BYTES: u64 = 1 << 30;

/// Every section and its keys, in file order. Unknown names are errors (typos would
/// otherwise be silently ignored), and the example config must list all of these.
pub const SECTIONS: &[(&str, &[&str])] = &[
    (
        "userdata",
        &["ws_uri", "app_id", "version", "base_remote", "update_key", "recipe_key", "instance_id", "metadata_url"],
    ),
    (
        "agent",
        &[
            "token_file",
            "state_dir",
            "helper_socket",
            "round_delay",
            "retry_delay",
            "retry_delay_max",
            "log_level",
            "download_max_bytes",
            "download_timeout",
            "metrics_file",
            "allow_insecure_transport",
            "install_prerequisites",
            "drift_interval",
            "log_dir",
            "helper_log_dir",
        ],
    ),
    (
        "link",
        &[
            "ca_file",
            "tls_insecure",
            "proxy",
            "no_proxy",
            "ping_interval",
            "heartbeat_interval",
            "max_frame",
            "max_bad_frames",
            "backoff_base",
            "backoff_max",
        ],
    ),
    ("upgrade", &["health_timeout", "holdoff", "max_bytes", "allow_downgrade"]),
];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// The file that was read, if any.
    pub source: Option<PathBuf>,
    /// The file was the original agent's (`[global]`, `[module]`, `[network]`, `[salt]`).
    pub original_format: bool,
    /// What was ignored in an original-format file, to be logged once at start.
    pub warnings: Vec<String>,
    /// `--app-id` was given: the instance userdata never replaces it.
    pub app_id_pinned: bool,
    pub userdata: UserdataConfig,
    pub agent: AgentConfig,
    pub link: LinkConfig,
    pub upgrade: UpgradeConfig,
}

/// `[userdata]`: who we are and where the backend is. Names kept from the original agent,
/// whose instance userdata held `WS_URI=…`, `APP_ID=…` and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserdataConfig {
    /// Backend WebSocket URL, `ws://` or `wss://`.
    pub ws_uri: Option<String>,
    /// The VisualOps app this instance belongs to (non-empty, no whitespace).
    pub app_id: Option<String>,
    /// The agent version the backend expects (informative); see [`UserdataConfig::version`].
    pub version: Option<String>,
    /// Download base URL for agent releases, `http(s)://`, without trailing `/`.
    pub base_remote: Option<String>,
    /// Minisign public key (base64 key line) that release archives must be signed with.
    pub update_key: Option<String>,
    /// Minisign public keys (base64 key lines, blank- or comma-separated) recipes must be
    /// signed with. Read and enforced by the root helper from the root-owned file; the
    /// daemon only checks its form.
    pub recipe_key: Option<String>,
    /// Fixed instance id; when set, the metadata service is not asked.
    pub instance_id: Option<String>,
    /// Base URL of the cloud metadata service, without trailing `/`.
    pub metadata_url: String,
}

impl Default for UserdataConfig {
    fn default() -> Self {
        UserdataConfig {
            ws_uri: None,
            app_id: None,
            version: None,
            base_remote: None,
            update_key: None,
            recipe_key: None,
            instance_id: None,
            metadata_url: DEFAULT_METADATA_URL.to_string(),
        }
    }
}

impl UserdataConfig {
    /// The configured expected version, else the version of this build.
    pub fn version(&self) -> &str {
        self.version.as_deref().unwrap_or(env!("CARGO_PKG_VERSION"))
    }
}

/// `[agent]`: local paths and round timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The instance token file (see [`crate::instance_identity::load_or_create_token`]).
    pub token_file: PathBuf,
    pub state_dir: PathBuf,
    /// Unix socket of the root helper.
    pub helper_socket: PathBuf,
    /// Pause between two rounds of the recipe (the original agent waited 10 minutes).
    pub round_delay: Duration,
    /// First pause after a round that ceased on a failure; doubles up to `retry_delay_max`.
    pub retry_delay: Duration,
    pub retry_delay_max: Duration,
    /// A level (`info`) or a tracing filter directive list (`info,opsagent::link=debug`).
    pub log_level: String,
    /// Largest download (archives, remote files) accepted, in bytes.
    pub download_max_bytes: u64,
    /// Longest one download attempt may take, body included.
    pub download_timeout: Duration,
    /// Where to keep the round's figures as a Prometheus text file (node_exporter's
    /// textfile collector); `None`: not written.
    pub metrics_file: Option<PathBuf>,
    /// Plaintext `ws://`, or `tls_insecure`, to a backend off this host: refused unless
    /// this is set in a root-owned file (a man in the middle would push recipes, which
    /// the helper applies as root).
    pub allow_insecure_transport: bool,
    /// Install a state's missing tool (git, lvm2, supervisor…) with the host's package
    /// manager before it runs, as the original agent did ([`crate::prereq`]).
    pub install_prerequisites: bool,
    /// Plan the current recipe this long after each round and report what would change
    /// (drift); `None` (the default, or `0`): never.
    pub drift_interval: Option<Duration>,
    /// Hosts without systemd: where the cron supervisor writes the daemon's log
    /// (`opsagent.log`), read for a backend's `FetchLogs`.
    pub log_dir: PathBuf,
    /// Hosts without systemd: where the helper's (`opsagent-helper.log`) and the
    /// upgrades' logs are.
    pub helper_log_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            helper_socket: PathBuf::from(DEFAULT_HELPER_SOCKET),
            round_delay: Duration::from_secs(600),
            retry_delay: Duration::from_secs(5),
            retry_delay_max: Duration::from_secs(300),
            log_level: "info".to_string(),
            download_max_bytes: DEFAULT_DOWNLOAD_MAX_BYTES,
            download_timeout: Duration::from_secs(600),
            metrics_file: None,
            allow_insecure_transport: false,
            install_prerequisites: true,
            drift_interval: None,
            log_dir: PathBuf::from("/var/log/visualops"),
            helper_log_dir: PathBuf::from("/var/log/opsagent-root"),
        }
    }
}

/// `[link]`: the WebSocket connection to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Extra PEM bundle of trusted CAs (in addition to the system roots).
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate. For tests only.
    pub tls_insecure: bool,
    /// HTTP proxy for the backend link and downloads (overrides `https_proxy` & co.).
    pub proxy: Option<String>,
    /// Hosts reached without the proxy (overrides `no_proxy`/`NO_PROXY`).
    pub no_proxy: Option<String>,
    pub ping_interval: Duration,
    /// Between two Heartbeats (sent only to a backend that supports them).
    pub heartbeat_interval: Duration,
    /// Largest accepted frame, in bytes.
    pub max_frame: usize,
    /// Consecutive bad frames tolerated before the connection is replaced.
    pub max_bad_frames: u32,
    /// Reconnect backoff: first pause, doubling up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            ca_file: None,
            tls_insecure: false,
            proxy: None,
            no_proxy: None,
            ping_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(60),
            max_frame: 16 << 20,
            max_bad_frames: 100,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// `[upgrade]`: self-upgrade. `health_timeout` is read by the root installer too (from
/// this file only), which is why its range is the installer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeConfig {
    /// How long a new release has to reach READY and complete a Handshake before the
    /// installer switches back to the previous one.
    pub health_timeout: Duration,
    /// A version that failed (rejected, or reverted after its health gate) is not tried
    /// again before this much time has passed, unless another version is ordered.
    pub holdoff: Duration,
    /// Largest release archive downloaded, in bytes.
    pub max_bytes: usize,
    /// Whether the installer may install a release older than the running one (read by
    /// the installer from the root-owned file; the daemon only checks the value).
    pub allow_downgrade: bool,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            health_timeout: Duration::from_secs(60),
            holdoff: Duration::from_secs(6 * 3600),
            max_bytes: 256 << 20,
            allow_downgrade: false,
        }
    }
}

/// Command-line flags that override the file. The CLI flattens this into its commands
/// (`#[command(flatten)]`); the config file path is a separate flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Overrides {
    /// Backend WebSocket URL (ws:// or wss://) [config: userdata.ws_uri]
    #[arg(long = "ws-uri", value_name = "URL")]
    pub ws_uri: Option<String>,
    /// VisualOps app id of this instance [config: userdata.app_id]
    #[arg(long = "app-id", value_name = "ID")]
    pub app_id: Option<String>,
    /// Instance id; skips the cloud metadata service [config: userdata.instance_id]
    #[arg(long = "instance-id", value_name = "ID")]
    pub instance_id: Option<String>,
    /// Instance token file [config: agent.token_file]
    #[arg(long = "token-file", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// State directory [config: agent.state_dir]
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Unix socket of the root helper [config: agent.helper_socket]
    #[arg(long = "helper-socket", value_name = "PATH")]
    pub helper_socket: Option<PathBuf>,
    /// Seconds between two rounds [config: agent.round_delay]
    #[arg(long = "round-delay", value_name = "SECONDS")]
    pub round_delay: Option<u64>,
    /// Seconds to wait after a failed round [config: agent.retry_delay]
    #[arg(long = "retry-delay", value_name = "SECONDS")]
    pub retry_delay: Option<u64>,
    /// Prometheus text file of the round's figures [config: agent.metrics_file]
    #[arg(long = "metrics-file", value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
}

impl Config {
    /// Reads `path`, or [`DEFAULT_PATH`] if `path` is `None` and that file exists (else
    /// defaults only), then applies `overrides`. An explicit `path` must exist.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_or_default_from(Path::new(DEFAULT_PATH), path, overrides)
    }

    /// [`Config::load`] with another default path (tests, packaging checks).
    pub fn load_or_default_from(
        default: &Path,
        path: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        Self::load_trusting(default, path, overrides, 0)
    }

    /// [`Config::load_or_default_from`]; keys that weaken the boundary are honoured only
    /// from a file owned by `trusted_owner` (root in production) and not writable by
    /// group or others.
    pub fn load_trusting(
        default: &Path,
        path: Option<&Path>,
        overrides: &Overrides,
        trusted_owner: u32,
    ) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => Some((path, read(path)?)),
            None => read_if_present(default)?.map(|text| (default, text)),
        };
        let trusted = file.as_ref().is_some_and(|(p, _)| owned_by(p, trusted_owner));
        Self::build(file.as_ref().map(|(p, t)| (*p, t.as_str(), trusted)), overrides)
    }

    /// Parses configuration text; `path` is only used in messages and as [`Config::source`].
    /// The text is not a root-owned file: keys that need one are refused.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::build(Some((path, text, false)), &Overrides::default())
    }

    fn build(file: Option<(&Path, &str, bool)>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some((path, text, trusted)) = file {
            config.apply_file(path, text, trusted)?;
            config.source = Some(path.to_path_buf());
        }
        config.apply_overrides(overrides)?;
        config.check_consistency()?;
        Ok(config)
    }

    /// The backend URL and app id, or an error naming the missing key and every way to set it.
    pub fn require_backend(&self) -> Result<(&str, &str), ConfigError> {
        let ws_uri = self.userdata.ws_uri.as_deref().ok_or_else(|| self.missing("ws_uri", "ws-uri", "WS_URI"))?;
        let app_id = self.userdata.app_id.as_deref().ok_or_else(|| self.missing("app_id", "app-id", "APP_ID"))?;
        Ok((ws_uri, app_id))
    }

    /// Sets a `[userdata]` key from a lower-precedence source (the instance userdata) unless
    /// the file or a flag set it already. Returns whether the value was taken.
    pub fn set_if_unset(&mut self, origin: Origin, section: &str, key: &str, value: &str) -> Result<bool, ConfigError> {
        let Some((section, key)) = known_key(section, key) else {
            return Ok(false);
        };
        if !self.is_unset(section, key) {
            return Ok(false);
        }
        self.set(section, key, value).map_err(|p| ConfigError::invalid(Location { origin, section, key }, p))?;
        Ok(true)
    }

    fn missing(&self, key: &'static str, flag: &'static str, var: &'static str) -> ConfigError {
        let file = self.source.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        ConfigError::Missing { file, section: "userdata", key, flag, var }
    }

    fn is_unset(&self, section: &str, key: &str) -> bool {
        let u = &self.userdata;
        match (section, key) {
            ("userdata", "ws_uri") => u.ws_uri.is_none(),
            ("userdata", "app_id") => u.app_id.is_none(),
            ("userdata", "version") => u.version.is_none(),
            ("userdata", "base_remote") => u.base_remote.is_none(),
            ("userdata", "update_key") => u.update_key.is_none(),
            ("userdata", "recipe_key") => u.recipe_key.is_none(),
            ("userdata", "instance_id") => u.instance_id.is_none(),
            // Every other key has a default, so it is never "unset".
            _ => false,
        }
    }

    /// `trusted`: the file is root's alone (see [`ROOT_ONLY_KEYS`]).
    fn apply_file(&mut self, path: &Path, text: &str, trusted: bool) -> Result<(), ConfigError> {
        let doc = ini::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.line,
            problem: e.problem,
        })?;
        if doc.sections.iter().any(|(s, _)| ORIGINAL_ONLY_SECTIONS.contains(&s.as_str())) {
            self.original_format = true;
            self.apply_original(path, &doc);
            return Ok(());
        }
        for (section, line) in &doc.sections {
            if !SECTIONS.iter().any(|(name, _)| name == section) {
                let (path, line, section) = (path.to_path_buf(), *line, section.clone());
                return Err(ConfigError::UnknownSection { path, line, section, known: known_sections() });
            }
        }
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for entry in &doc.entries {
            let (section, key) = file_key(path, entry)?;
            if let Some(first_line) = seen.insert((section, key), entry.line) {
                return Err(ConfigError::Duplicate {
                    path: path.to_path_buf(),
                    line: entry.line,
                    first_line,
                    section: section.to_string(),
                    key: key.to_string(),
                });
            }
            // An empty value means "not set": handy for templated files.
            if entry.value.is_empty() {
                continue;
            }
            let at = Location { origin: Origin::File { path: path.to_path_buf(), line: entry.line }, section, key };
            if !trusted && ROOT_ONLY_KEYS.contains(&(section, key)) && values::boolean(&entry.value) == Ok(true) {
                return Err(ConfigError::invalid(
                    at,
                    "honoured only from a file owned by root and not writable by group or others",
                ));
            }
            self.set(section, key, &entry.value).map_err(|p| ConfigError::invalid(at, p))?;
        }
        Ok(())
    }

    /// The original agent's `/etc/opsagent.conf` (written by its `scripts/init.sh`, read
    /// by its `config.py`): the keys that mean something here are mapped, everything else
    /// (and any value that does not check) becomes a warning; nothing in it refuses the
    /// start, as nothing in it did for the original beyond its required keys.
    fn apply_original(&mut self, path: &Path, doc: &ini::Document) {
        let shown = path.display().to_string();
        for entry in &doc.entries {
            let Some((section, _)) = &entry.section else {
                self.warnings.push(format!("{shown}:{}: {:?} outside any section ignored", entry.line, entry.key));
                continue;
            };
            let (key, value) = (entry.key.to_ascii_lowercase(), entry.value.trim());
            if value.is_empty() {
                continue;
            }
            let mapped: Option<(&str, &str, String)> = match (section.as_str(), key.as_str()) {
                ("userdata", k @ ("ws_uri" | "app_id" | "version" | "base_remote" | "update_key" | "instance_id")) => {
                    Some(("userdata", k, value.to_string()))
                }
                ("global", "conf_path") => Some(("agent", "state_dir", value.to_string())),
                ("global", "loglvl") => Some(("agent", "log_level", value.to_ascii_lowercase())),
                // Minutes between two rounds (worker.py `__recipe_delay`).
                ("salt", "delay") => match value.parse::<u64>() {
                    Ok(minutes) => Some(("agent", "round_delay", minutes.saturating_mul(60).to_string())),
                    Err(_) => Some(("agent", "round_delay", format!("{value} minutes"))),
                },
                // The original's full URL of the instance id; ours is the service's base.
                ("network", "instance_id") => match value.strip_suffix("/latest/meta-data/instance-id") {
                    Some(base) => Some(("userdata", "metadata_url", base.to_string())),
                    None => None,
                },
                _ => None,
            };
            let at = format!("{shown}:{}: [{section}] {}", entry.line, entry.key);
            match mapped {
                Some((s, k, v)) => {
                    if let Err(problem) = self.set(s, k, &v) {
                        self.warnings.push(format!("{at} ignored: {problem}"));
                    }
                }
                None => self.warnings.push(format!("{at} has no meaning for this agent; ignored")),
            }
        }
    }

    fn apply_overrides(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        self.app_id_pinned = o.app_id.is_some();
        let texts = [
            ("userdata", "ws_uri", o.ws_uri.clone()),
            ("userdata", "app_id", o.app_id.clone()),
            ("userdata", "instance_id", o.instance_id.clone()),
            ("agent", "round_delay", o.round_delay.map(|n| n.to_string())),
            ("agent", "retry_delay", o.retry_delay.map(|n| n.to_string())),
        ];
        for (section, key, value) in texts {
            if let Some(value) = value {
                self.set(section, key, &value).map_err(|p| flag_error(section, key, p))?;
            }
        }
        let paths = [
            ("token_file", &o.token_file, &mut self.agent.token_file),
            ("state_dir", &o.state_dir, &mut self.agent.state_dir),
            ("helper_socket", &o.helper_socket, &mut self.agent.helper_socket),
        ];
        for (key, value, field) in paths {
            if let Some(value) = value {
                *field = flag_path(value).map_err(|p| flag_error("agent", key, p))?;
            }
        }
        if let Some(value) = &o.metrics_file {
            self.agent.metrics_file = Some(flag_path(value).map_err(|p| flag_error("agent", "metrics_file", p))?);
        }
        Ok(())
    }

    /// Stores one value after checking it; `Err` is the problem sentence.
    fn set(&mut self, section: &str, key: &str, value: &str) -> Result<(), String> {
        let (u, a, l, up) = (&mut self.userdata, &mut self.agent, &mut self.link, &mut self.upgrade);
        match (section, key) {
            ("userdata", "ws_uri") => u.ws_uri = Some(values::ws_url(value)?),
            ("userdata", "app_id") => u.app_id = Some(values::identifier(value)?),
            ("userdata", "version") => u.version = Some(values::identifier(value)?),
            ("userdata", "base_remote") => u.base_remote = Some(values::http_url(value)?),
            ("userdata", "update_key") => u.update_key = Some(values::base64_key(value)?),
            ("userdata", "recipe_key") => u.recipe_key = Some(values::base64_keys(value)?),
            ("userdata", "instance_id") => u.instance_id = Some(values::identifier(value)?),
            ("userdata", "metadata_url") => u.metadata_url = values::http_url(value)?,
            ("agent", "token_file") => a.token_file = values::absolute_path(value)?,
            ("agent", "state_dir") => a.state_dir = values::absolute_path(value)?,
            ("agent", "helper_socket") => a.helper_socket = values::absolute_path(value)?,
            ("agent", "metrics_file") => a.metrics_file = Some(values::absolute_path(value)?),
            ("agent", "round_delay") => a.round_delay = values::round_delay(value)?,
            ("agent", "retry_delay") => a.retry_delay = values::seconds(value)?,
            ("agent", "retry_delay_max") => a.retry_delay_max = values::seconds(value)?,
            ("agent", "log_level") => a.log_level = values::log_level(value)?,
            ("agent", "download_max_bytes") => a.download_max_bytes = values::download_bytes(value)?,
            ("agent", "download_timeout") => a.download_timeout = values::seconds(value)?,
            ("agent", "allow_insecure_transport") => a.allow_insecure_transport = values::boolean(value)?,
            ("agent", "install_prerequisites") => a.install_prerequisites = values::boolean(value)?,
            // 0 says "off" (the default), as the example shows.
            ("agent", "drift_interval") if value.trim() == "0" => a.drift_interval = None,
            ("agent", "drift_interval") => a.drift_interval = Some(values::seconds(value)?),
            ("agent", "log_dir") => a.log_dir = values::absolute_path(value)?,
            ("agent", "helper_log_dir") => a.helper_log_dir = values::absolute_path(value)?,
            ("link", "ca_file") => l.ca_file = Some(values::absolute_path(value)?),
            ("link", "tls_insecure") => l.tls_insecure = values::boolean(value)?,
            ("link", "proxy") => l.proxy = Some(values::proxy_url(value)?),
            ("link", "no_proxy") => l.no_proxy = Some(values::host_list(value)?),
            ("link", "ping_interval") => l.ping_interval = values::seconds(value)?,
            ("link", "heartbeat_interval") => l.heartbeat_interval = values::seconds(value)?,
            ("link", "max_frame") => l.max_frame = values::bytes(value)?,
            ("link", "max_bad_frames") => l.max_bad_frames = values::count(value, 1, 1_000_000)?,
            ("link", "backoff_base") => l.backoff_base = values::seconds(value)?,
            ("link", "backoff_max") => l.backoff_max = values::seconds(value)?,
            ("upgrade", "health_timeout") => up.health_timeout = values::seconds_between(value, 5, 3600)?,
            ("upgrade", "holdoff") => up.holdoff = values::seconds(value)?,
            ("upgrade", "max_bytes") => up.max_bytes = values::bytes(value)?,
            ("upgrade", "allow_downgrade") => up.allow_downgrade = values::boolean(value)?,
            // Callers look keys up in SECTIONS first; a test keeps both lists in step.
            _ => return Err(format!("[{section}] {key} has no setter")),
        }
        Ok(())
    }

    /// Checks between keys, after every source is applied (a flag may break a file value).
    fn check_consistency(&self) -> Result<(), ConfigError> {
        let pairs = [
            ("[agent] retry_delay", self.agent.retry_delay, "retry_delay_max", self.agent.retry_delay_max),
            ("[link] backoff_base", self.link.backoff_base, "backoff_max", self.link.backoff_max),
        ];
        for (low_name, low, high_name, high) in pairs {
            if low > high {
                return Err(ConfigError::Inconsistent {
                    origin: self
                        .source
                        .as_ref()
                        .map_or_else(|| "command line and defaults".to_string(), |p| p.display().to_string()),
                    problem: format!(
                        "{low_name} ({} s) is greater than {high_name} ({} s); raise {high_name} or lower both",
                        low.as_secs(),
                        high.as_secs()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Sections only the original agent's configuration has: one of them makes a file the
/// original's (see `Config::apply_original`).
pub const ORIGINAL_ONLY_SECTIONS: &[&str] = &["global", "module", "network", "salt"];

/// Keys that lower a defence: `true` is honoured only from a root-owned file that
/// nobody else can write (the daemon's user must not be able to set them).
pub const ROOT_ONLY_KEYS: &[(&str, &str)] = &[("agent", "allow_insecure_transport"), ("upgrade", "allow_downgrade")];

/// `path` (not followed if a symlink) is owned by `uid` and not writable by group or others.
fn owned_by(path: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// The static `(section, key)` names for a file entry, or the error for an unknown one.
fn file_key(path: &Path, entry: &ini::Entry) -> Result<(&'static str, &'static str), ConfigError> {
    let Some((section, _)) = &entry.section else {
        return Err(ConfigError::OutsideSection {
            path: path.to_path_buf(),
            line: entry.line,
            key: entry.key.clone(),
            known: known_sections(),
        });
    };
    known_key(section, &entry.key).ok_or_else(|| ConfigError::UnknownKey {
        path: path.to_path_buf(),
        line: entry.line,
        section: section.clone(),
        key: entry.key.clone(),
        known: SECTIONS.iter().find(|(s, _)| s == section).map(|(_, keys)| keys.join(", ")).unwrap_or_default(),
    })
}

fn known_key(section: &str, key: &str) -> Option<(&'static str, &'static str)> {
    let (section, keys) = SECTIONS.iter().find(|(s, _)| *s == section)?;
    keys.iter().find(|k| **k == key).map(|k| (*section, *k))
}

fn known_sections() -> String {
    SECTIONS.iter().map(|(s, _)| format!("[{s}]")).collect::<Vec<_>>().join(", ")
}

fn flag_error(section: &'static str, key: &'static str, problem: String) -> ConfigError {
    ConfigError::invalid(Location { origin: Origin::Flag, section, key }, problem)
}

/// A path flag may be relative (typed in a shell): it is taken from the current directory.
fn flag_path(path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return values::checked_path(path);
    }
    let absolute = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    values::checked_path(&absolute)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))
}

fn read_if_present(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::read(path, e)),
    }
}
