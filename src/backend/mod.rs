//! The reference backend: a real server speaking the agent protocol
//! (`docs/spec/protocol.md`), for integration tests, demos and operators without a
//! VisualOps backend. The binary `opsagent-backend` is a thin wrapper around [`Backend`].
//!
//! # Files
//!
//! The operator drives the backend through one directory (`--recipe-dir`), polled every
//! `--poll-ms` (and read again for an app on each of its Handshakes):
//!
//! - `APP_ID.json`: the app's recipe, in any shape [`crate::recipe::Recipe::load_file`]
//!   accepts. No file, or an invalid file and no earlier valid one: the app is not ready
//!   (`AppNotReady` to every Handshake; the connection stays open).
//! - `APP_ID.update.json`, `{"version": "1.3.0", "url": "https://…/opsagent.tgz"}`: when
//!   it appears or changes, `AgentUpdate` goes to every connected agent of the app whose
//!   Handshake `agent_version` differs from `version`; while it exists, such an agent also
//!   gets it right after the RecipeMetadata answering its Handshake. Removing the file
//!   withdraws the order.
//! - `APP_ID.reconnect.json`, `{"after_s": N}`: when it appears, the agents of the app that
//!   announced `reconnect-hint` get `Reconnect {after_s: N}` and their connections are
//!   closed with code 1012 ("service restart") and reason `reconnect after N s`. Other
//!   agents are left alone. The file is deleted once acted on.
//! - `APP_ID.fetch-logs.json`, the fields of a `FetchLogs` (`request`, `since`, `what`,
//!   `max_bytes`, `upload_url`, all optional): when it appears, the authenticated agents
//!   of the app that announced `fetch-logs` are asked for their logs; the file is deleted
//!   once acted on. Their `Logs` parts are reassembled per connection, the sha256
//!   checked, and the bundle stored as `LOGS_DIR/INSTANCE.REQUEST.log.gz` (see
//!   [`BackendOptions::logs_dir`]).
//! - `APP_ID.plan-request.json`, empty or `{}`: when it appears, the authenticated agents
//!   of the app that announced `drift` get `{"code": "PlanRequest"}`; each answers with a
//!   `Drift` report (even `"states": []`), recorded as a `drift` event. The event log
//!   records `plan_request` (`sent_to`: the instances asked) or `plan_request_rejected`.
//!   The file is deleted once acted on.
//!
//! App ids are made of ASCII letters, digits, `.`, `_` and `-` (they name files); an app
//! id cannot end in `.update`, `.reconnect`, `.fetch-logs` or `.plan-request`.
//!
//! The backend writes, next to each other:
//! - `--statelog FILE`: every StateLog received, one JSON object per line as the agent
//!   sent it plus `received_at` (RFC 3339, UTC).
//! - `FILE.versions.json`: per app, the recipe version counter and the last valid recipe.
//! - `--events FILE` (optional): one JSON line per connection opened or closed
//!   (`open`/`close`), per agent message other than StateLog (`message`, with the frame,
//!   its `instance_token` redacted), per unreadable frame (`invalid`, `binary`), and per
//!   backend decision (`recipe_loaded`, `recipe_rejected`, `recipe_removed`,
//!   `wait_released`, `agent_update`, `reconnect`, `fetch_logs`, `plan_request`, `logs_stored`,
//!   `logs_uploaded`, `logs_refused`, `logs_invalid`, `statelog_repeated` — a StateLog whose
//!   `(instance_id, seq)` was recorded before, which the statelog does not show, …). Each
//!   has `at` and `event`.
//!
//! - `STATELOG.pins/` (or `--pins-dir`): one file per pinned instance (see [`pins`]).
//!
//! # Who may say what
//!
//! A Handshake must carry the instance's `instance_token`. The first one of an (app,
//! instance), for an app that has a recipe, pins the token (its sha256, with the time and
//! the peer address); later Handshakes with another token are closed with 1008 and a
//! `handshake_refused` event, and get nothing. An app named in `require_pin` gets no pin
//! on first use: its instances are registered by the operator (`opsagent-backend
//! instances pin`) or refused. A connection whose Handshake was accepted speaks for that
//! instance only: StateLog, WaitQuery and Heartbeat frames naming another instance or
//! app, or sent before such a Handshake, are refused (`refused` event, no answer). A
//! StateLog counts towards waits only for the recipe version the backend last sent to
//! its instance (others are recorded with `"wait_progress": false`).
//!
//! A backend without TLS refuses to start on an address other than loopback unless
//! `insecure_plaintext` is set (then it warns at start and every hour). Connections are
//! capped per IP address and in all (answered HTTP 429/503 with the reason), must
//! Handshake within a timeout, and are read at a bounded frame rate; the statelog and the
//! event log are rotated by size (see [`Limits`], [`Rotation`]).
//!
//! # Recipe versions
//!
//! An app's first recipe gets the file's `recipe_version` if it has one, else 1. Files are
//! compared by the hash of their normalised content (`recipe_version`, `module`, states),
//! so re-indenting a file is no new recipe. A changed file is validated as the agent will
//! validate it: invalid, an error naming the file and the reason is logged and the previous
//! version stays served (no push); valid, it gets `max(previous + 1, its own
//! recipe_version)` and is pushed as `RecipeMetadata` to every connected agent of the app
//! that was given a recipe before. The counter and the recipe are persisted, so a restarted
//! backend never goes backwards and serves unchanged content under the same version (an
//! agent sees no "new recipe" because the backend restarted); content that came back after
//! a removal gets its old version back only if it is the last recipe recorded.
//!
//! # StateLogs
//!
//! Each StateLog is appended to the statelog. When it carries `seq` and its agent announced
//! `statelog-ack`, the backend records each `(instance_id, seq)` once — a resend is
//! acknowledged but not appended again — and answers `StateLogAck {seq}` once the line is
//! synced to disk (one sync thread, group commit, off the hub's lock): the agent forgets
//! what is acknowledged, so an ack never precedes durability. The set of seen
//! `(instance_id, seq)` is rebuilt from the statelog (and the rotated files kept) at
//! start-up, so de-duplication survives a restart.
//!
//! # Waits
//!
//! A `meta.wait` state `W` of an app's recipe lists references `@{HOST.STATE}` (the host is
//! the text before the first `.`). For an instance `I` of that app, running recipe version
//! `V` (the app's current version), `W` is released when every reference is satisfied. A
//! reference is satisfied when some instance `J` with `J == HOST`, or whose app id is
//! `HOST`, or any instance when `HOST` is `*` or absent, has for state id `STATE` a latest
//! StateLog that succeeded, reported with the *current* recipe version of `J`'s app (a
//! failure after a success un-does it, until the next success). A released wait stays
//! released for `(I, V)`; on release the backend pushes
//! `State {recipe_version: V, stateid: W}` to `I`'s connections. `WaitQuery` is answered
//! with `WaitList {recipe_version, waited: [{instance_id, state_id: W}]}`, the waits
//! released for that instance and version, `instance_id` naming the instance that
//! satisfied the wait (null when several did). Progress is rebuilt from the statelog at
//! start-up, so releases are the same after a restart.
//!
//! # Other messages
//!
//! `Test` is answered with `TestAns {result: true, error: null}`; `Heartbeat` is only
//! recorded; invalid JSON, unknown codes and binary frames are logged and ignored.
//! Incoming frames are limited to `max_frame_bytes` (16 MiB by default).

pub mod activation;
mod conn;
mod frames;
mod hub;
mod journal;
mod logstore;
pub mod pins;
mod recipes;
mod signing;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use conn::tls_server_config;
pub use frames::out::CAPABILITIES;
pub use journal::Rotation;
pub use signing::PASSWORD_ENV as SIGNING_KEY_PASSWORD_ENV;

pub const DEFAULT_POLL: Duration = Duration::from_millis(250);
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 << 20;
/// How often `--insecure-plaintext` on a non-loopback address is logged again.
pub const PLAINTEXT_WARNING_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The I/O error is part of the message (not a `source`), so the message is whole.
    #[error("{}: {what}: {error}", path.display())]
    Io { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
}

impl BackendError {
    pub(crate) fn io(what: &'static str, path: &Path, error: std::io::Error) -> Self {
        Self::Io { what, path: path.to_path_buf(), error }
    }
}

/// PEM files for `wss://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What one peer, or all of them, may take of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections from one IP address; more are refused (HTTP 429).
    pub max_conns_per_addr: usize,
    /// Open connections in all; more are refused (HTTP 503).
    pub max_conns: usize,
    /// From the TCP accept to the first Handshake; then the connection is closed (1008).
    pub handshake_timeout: Duration,
    /// Frames read per second and connection, sustained; past the burst the backend
    /// stops reading that connection until it may (TCP pushes back on the agent).
    pub frames_per_s: u32,
    pub frame_burst: u32,
    /// Bytes queued for one connection and not yet written to it. An agent that does
    /// not read what it is sent (its socket full) is cut off once more would be queued:
    /// the connection is dropped, with a `slow_reader` event. One frame larger than this
    /// still goes to an agent whose queue is empty.
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_conns_per_addr: 64,
            max_conns: 20_000,
            handshake_timeout: Duration::from_secs(30),
            frames_per_s: 200,
            frame_burst: 2_000,
            max_queued_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// One `APP_ID.json` per app, plus the trigger files (see the module documentation).
    pub recipe_dir: PathBuf,
    /// StateLogs, one JSON line each; `STATELOG.versions.json` lives next to it.
    pub statelog: PathBuf,
    pub events: Option<PathBuf>,
    pub poll: Duration,
    pub tls: Option<TlsFiles>,
    pub max_frame_bytes: usize,
    /// The instance pins (`None`: `STATELOG.pins/`).
    pub pins_dir: Option<PathBuf>,
    /// Log bundles received from agents (`None`: `STATELOG.logs/`).
    pub logs_dir: Option<PathBuf>,
    /// Apps whose instances must be pinned by the operator before their first Handshake
    /// (no trust on first use); `*` names every app.
    pub require_pin: Vec<String>,
    /// Serve `ws://` on an address other than loopback. Without it, such a backend
    /// refuses to start unless it has `tls`.
    pub insecure_plaintext: bool,
    pub limits: Limits,
    /// Of the statelog and the event log.
    pub rotation: Rotation,
    /// A minisign secret key: every recipe pushed is signed with it (see `signing`).
    pub signing_key: Option<PathBuf>,
}

impl BackendOptions {
    pub fn new(recipe_dir: impl Into<PathBuf>, statelog: impl Into<PathBuf>) -> Self {
        Self {
            recipe_dir: recipe_dir.into(),
            statelog: statelog.into(),
            events: None,
            poll: DEFAULT_POLL,
            tls: None,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            pins_dir: None,
            logs_dir: None,
            require_pin: Vec::new(),
            insecure_plaintext: false,
            limits: Limits::default(),
            rotation: Rotation::default(),
            signing_key: None,
        }
    }

    pub fn pins_dir(&self) -> PathBuf {
        self.pins_dir.clone().unwrap_or_else(|| pins::PinStore::default_dir(&self.statelog))
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.logs_dir.clone().unwrap_or_else(|| {
            let mut p = self.statelog.as_os_str().to_owned();
            p.push(".logs");
            PathBuf::from(p)
        })
    }
}

/// A running backend. Dropping it stops it too (without waiting).
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    tls: bool,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Loads the persisted state and the recipe directory, then serves `listener` in the
    /// background. Errors (unreadable directory, corrupt version file, bad TLS files) are
    /// reported before anything is served.
    pub async fn start(listener: TcpListener, opts: BackendOptions) -> Result<Self, BackendError> {
        let addr = listener
            .local_addr()
            .map_err(|e| BackendError::Config(format!("the listening socket has no address: {e}")))?;
        let plaintext_exposed = opts.tls.is_none() && !addr.ip().is_loopback();
        if plaintext_exposed && !opts.insecure_plaintext {
            return Err(BackendError::Config(format!(
                "{addr} is not a loopback address: serving it without TLS would send recipes (passwords, keys) \
                 and instance tokens in clear; give --tls-cert and --tls-key, or --insecure-plaintext"
            )));
        }
        let tls = opts.tls.as_ref().map(|t| tls_server_config(&t.cert, &t.key)).transpose()?;
        let hub = Arc::new(Mutex::new(hub::Hub::open(&opts)?));
        // Small buffers: 10,000 idle agents must not cost 128 KiB each; they grow for a
        // large frame, up to max_frame_bytes.
        let mut ws_config = WebSocketConfig::default()
            .max_frame_size(Some(opts.max_frame_bytes))
            .max_message_size(Some(opts.max_frame_bytes));
        ws_config.read_buffer_size = 4096;
        ws_config.write_buffer_size = 0;
        ws_config.max_write_buffer_size = opts.max_frame_bytes.saturating_mul(2).max(1 << 20);
        let is_tls = tls.is_some();
        let listener = conn::Listener {
            listener,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            ws_config,
            limits: opts.limits,
            max_frame_bytes: opts.max_frame_bytes,
        };
        let (shutdown, rx) = watch::channel(false);
        let poll = opts.poll.max(Duration::from_millis(10));
        let warn_rx = rx.clone();
        let task = tokio::spawn(async move {
            tokio::join!(
                conn::accept_loop(listener, hub.clone(), rx.clone()),
                conn::poll_loop(hub, poll, rx),
                plaintext_warnings(addr, plaintext_exposed, warn_rx),
            );
        });
        tracing::info!("listening on {addr}{}", if is_tls { " (TLS)" } else { "" });
        Ok(Self { addr, tls: is_tls, shutdown, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR` or `wss://ADDR`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    /// Stops accepting, closes every connection (code 1001) and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Serves until the task ends (it does not on its own).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// `--insecure-plaintext` on a reachable address is said at start and every hour, so that
/// it is not forgotten in a log read once.
async fn plaintext_warnings(addr: SocketAddr, exposed: bool, mut shutdown: watch::Receiver<bool>) {
    if !exposed {
        return;
    }
    let mut tick = tokio::time::interval(PLAINTEXT_WARNING_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => tracing::warn!(
                "serving plain ws:// on {addr}, which is not loopback (--insecure-plaintext): recipes and \
                 instance tokens cross the network in clear"
            ),
            _ = shutdown.changed() => return,
        }
    }
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: TcpListener, opts: BackendOptions) -> Result<(), BackendError> {
    Backend::start(listener, opts).await?.wait().await;
    Ok(())
}
