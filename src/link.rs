//! The backend link: one WebSocket session at a time, re-established forever.
//!
//! - Connects (`ws://` or `wss://` with rustls: system roots plus an optional CA file),
//!   resolving the host name again on every attempt.
//! - Handshakes, forwards what the backend says to the round engine, answers `Test`.
//! - Sends the spooled StateLogs in order after every (re)connect and whenever new ones
//!   are spooled; a StateLog leaves the spool only once delivered (acknowledged, with a
//!   backend that announced `statelog-ack`; written to the socket otherwise).
//! - Pings; a connection that has been silent for two ping intervals is dead.
//! - Reconnects with exponential backoff and full jitter, reset after a connection that
//!   stayed up for a while; honours the backend's reconnect hint within the cap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{capability, parse_inbound, Identity, Inbound, Outbound, StateLog};
use crate::round::{Event, Liveness, UpdateOrder};

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub ws_uri: String,
    pub ca_file: Option<PathBuf>,
    pub tls_insecure: bool,
    pub ping_interval: Duration,
    pub max_frame: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A connection up this long resets the backoff.
    pub healthy_after: Duration,
    /// Consecutive bad frames tolerated before the connection is replaced.
    pub max_bad_frames: u32,
    /// How long the agent waits before repeating a Handshake the backend answered
    /// with AppNotReady (the original waited 30 s).
    pub app_not_ready_retry: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            ws_uri: String::new(),
            ca_file: None,
            tls_insecure: false,
            ping_interval: Duration::from_secs(30),
            max_frame: 16 * 1024 * 1024,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            healthy_after: Duration::from_secs(60),
            max_bad_frames: 100,
            app_not_ready_retry: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: Box<tokio_tungstenite::tungstenite::Error> },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("connection to {url}: {source}")]
    Transport { url: String, source: Box<tokio_tungstenite::tungstenite::Error> },
    #[error("no frame from {url} for {silent_s} s (two ping intervals): connection declared dead")]
    Dead { url: String, silent_s: u64 },
    #[error("{url} closed the connection{reason}")]
    Closed { url: String, reason: String },
    #[error("{count} consecutive bad frames from {url}; reconnecting")]
    TooManyBadFrames { url: String, count: u32 },
}

/// Where StateLogs wait for delivery (the spool, or a fake in tests).
pub trait Outbox: Send + Sync {
    /// Pending StateLogs with a sequence number above `seq`, in order.
    fn pending_after(&self, seq: u64) -> Vec<StateLog>;
    /// Delivered: with acks, everything up to `seq`; without, exactly `seq`.
    fn delivered(&self, seq: u64, cumulative: bool);
    /// Signalled whenever a StateLog is added.
    fn added(&self) -> Arc<Notify>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum LinkState {
    #[default]
    Starting,
    Connecting {
        attempt: u32,
    },
    Connected {
        url: String,
        since_unix: u64,
    },
    AppNotReady {
        url: String,
    },
    Reconnecting {
        in_s: u64,
        attempt: u32,
    },
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct LinkStatus {
    pub state: LinkState,
    pub last_error: Option<String>,
    pub backend_capabilities: Vec<String>,
    pub bad_frames: u64,
    pub sent: u64,
}

/// Jittered exponential backoff; the generator is seeded so tests are deterministic.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        Self { base, cap, rng: seed | 1 }
    }

    pub fn from_entropy(base: Duration, cap: Duration) -> Self {
        let mut b = [0u8; 8];
        // Falling back to the clock only weakens the spread, not correctness.
        if getrandom::fill(&mut b).is_err() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            b = (now.as_nanos() as u64).to_le_bytes();
        }
        Self::new(base, cap, u64::from_le_bytes(b))
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64: small, fast, good enough to spread reconnects.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Full jitter: uniform in [0, min(cap, base·2^(attempt-1))].
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1).min(24)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(if ms == 0 { 0 } else { self.next_u64() % (ms + 1) })
    }

    pub fn cap(&self) -> Duration {
        self.cap
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Link<O: Outbox> {
    cfg: LinkConfig,
    who: Identity,
    init_errors: Option<String>,
    outbox: Arc<O>,
    engine: mpsc::Sender<Event>,
    status: watch::Sender<LinkStatus>,
    liveness: Liveness,
    shutdown: watch::Receiver<bool>,
    backoff: Backoff,
    tls: Option<Arc<rustls::ClientConfig>>,
}

enum SessionEnd {
    Error(LinkError),
    /// The backend asked to be left alone for a while.
    Hint(Duration),
    Shutdown,
}

impl<O: Outbox + 'static> Link<O> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: LinkConfig,
        who: Identity,
        init_errors: Option<String>,
        outbox: Arc<O>,
        engine: mpsc::Sender<Event>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, watch::Receiver<LinkStatus>, Liveness), LinkError> {
        let tls = if cfg.ws_uri.starts_with("wss://") { Some(Arc::new(tls_config(&cfg)?)) } else { None };
        let (status, status_rx) = watch::channel(LinkStatus::default());
        let liveness = Liveness::default();
        let backoff = Backoff::from_entropy(cfg.backoff_base, cfg.backoff_max);
        let link =
            Self { cfg, who, init_errors, outbox, engine, status, liveness: liveness.clone(), shutdown, backoff, tls };
        Ok((link, status_rx, liveness))
    }

    fn set_state(&self, state: LinkState) {
        self.status.send_modify(|s| s.state = state);
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub async fn run(mut self) {
        let mut attempt: u32 = 0;
        loop {
            if self.stopping() {
                break;
            }
            attempt += 1;
            self.set_state(LinkState::Connecting { attempt });
            self.liveness.touch();
            let mut hint = None;
            match self.connect().await {
                Ok(ws) => {
                    let started = Instant::now();
                    let end = self.session(ws).await;
                    let _ = self.engine.send(Event::Online(false)).await;
                    if started.elapsed() >= self.cfg.healthy_after {
                        attempt = 1;
                    }
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::Hint(d) => hint = Some(d),
                        SessionEnd::Error(e) => {
                            tracing::warn!(error = %e, "backend connection lost");
                            self.status.send_modify(|s| s.last_error = Some(e.to_string()));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot reach the backend");
                    self.status.send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
            let mut delay = self.backoff.delay(attempt);
            if let Some(h) = hint {
                delay = delay.max(h.min(self.backoff.cap()));
            }
            self.set_state(LinkState::Reconnecting { in_s: delay.as_secs(), attempt });
            tracing::info!(delay_ms = delay.as_millis() as u64, attempt, "reconnecting");
            if self.pause(delay).await {
                break;
            }
        }
        self.set_state(LinkState::Stopped);
    }

    /// Sleeps, ticking the liveness; `true` if the daemon is shutting down.
    async fn pause(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return false,
                _ = sleep(Duration::from_secs(1)) => self.liveness.touch(),
                r = self.shutdown.changed() => if r.is_err() || *self.shutdown.borrow() { return true },
            }
        }
    }

    async fn connect(&self) -> Result<Ws, LinkError> {
        if self.cfg.tls_insecure && self.tls.is_some() {
            tracing::warn!(url = %self.cfg.ws_uri, "TLS certificate verification is OFF (tls_insecure = true)");
        }
        let ws_cfg = WebSocketConfig::default()
            .max_message_size(Some(self.cfg.max_frame))
            .max_frame_size(Some(self.cfg.max_frame));
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let (ws, _resp) =
            tokio_tungstenite::connect_async_tls_with_config(self.cfg.ws_uri.as_str(), Some(ws_cfg), true, connector)
                .await
                .map_err(|e| LinkError::Connect { url: self.cfg.ws_uri.clone(), source: Box::new(e) })?;
        Ok(ws)
    }

    fn handshake(&self) -> Message {
        let caps = capability::ALL.iter().map(|c| c.to_string()).collect();
        self.frame(&Outbound::Handshake { init_errors: self.init_errors.clone(), capabilities: caps })
    }

    fn frame(&self, msg: &Outbound) -> Message {
        Message::Text(msg.to_json(&self.who).to_string().into())
    }

    async fn session(&mut self, mut ws: Ws) -> SessionEnd {
        let url = self.cfg.ws_uri.clone();
        let transport = |e| SessionEnd::Error(LinkError::Transport { url: url.clone(), source: Box::new(e) });
        if let Err(e) = ws.send(self.handshake()).await {
            return transport(e);
        }
        tracing::info!(url = %url, instance_id = %self.who.instance_id, app_id = %self.who.app_id, "connected; handshake sent");
        let added = self.outbox.added();
        let mut acks = false;
        let mut established = false;
        let mut last_sent: u64 = 0;
        let mut bad_run: u32 = 0;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval(self.cfg.ping_interval);
        ping.reset();
        let mut rehandshake: Option<Instant> = None;
        let mut hint: Option<Duration> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Set when new StateLogs may be waiting, so the spool is read only then.
        let mut dirty = false;
        loop {
            if established && dirty {
                dirty = false;
                if let Err(e) = self.flush(&mut ws, acks, &mut last_sent).await {
                    return transport(e);
                }
            }
            let notified = added.notified();
            tokio::select! {
                frame = ws.next() => {
                    last_heard = Instant::now();
                    let msg = match frame {
                        None => return SessionEnd::Error(LinkError::Closed { url, reason: String::new() }),
                        Some(Err(e)) => return transport(e),
                        Some(Ok(m)) => m,
                    };
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(b) => {
                            tracing::warn!(bytes = b.len(), "binary frame from the backend refused");
                            self.status.send_modify(|s| s.bad_frames += 1);
                            continue;
                        }
                        Message::Close(frame) => {
                            if let Some(h) = hint {
                                return SessionEnd::Hint(h);
                            }
                            let reason = frame.map(|f| format!(" ({} {})", f.code, f.reason)).unwrap_or_default();
                            return SessionEnd::Error(LinkError::Closed { url, reason });
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    };
                    let inbound = match parse_inbound(&text) {
                        Ok(m) => { bad_run = 0; m }
                        Err(e) => {
                            bad_run += 1;
                            self.status.send_modify(|s| s.bad_frames += 1);
                            tracing::warn!(error = %e, consecutive = bad_run, "bad frame from the backend ignored");
                            if bad_run >= self.cfg.max_bad_frames {
                                return SessionEnd::Error(LinkError::TooManyBadFrames { url, count: bad_run });
                            }
                            continue;
                        }
                    };
                    match inbound {
                        Inbound::RecipeMetadata(r) => {
                            if !established {
                                established = true;
                                dirty = true;
                                last_sent = 0;
                                let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                                self.set_state(LinkState::Connected { url: url.clone(), since_unix: since });
                                let _ = self.engine.send(Event::Online(true)).await;
                            }
                            rehandshake = None;
                            let version = r.recipe_version;
                            match r.states {
                                None => { let _ = self.engine.send(Event::VersionOnly(version)).await; }
                                Some(states) => match crate::recipe::Recipe::from_wire(version, r.module, states) {
                                    Ok(recipe) => {
                                        let waits = recipe.has_waits();
                                        let _ = self.engine.send(Event::Recipe(Arc::new(recipe))).await;
                                        if waits {
                                            let q = self.frame(&Outbound::WaitQuery { recipe_version: version });
                                            if let Err(e) = ws.send(q).await { return transport(e); }
                                        }
                                    }
                                    Err(e) => tracing::error!(error = %e, version, "invalid recipe rejected; the current round goes on"),
                                },
                            }
                        }
                        Inbound::State { recipe_version, state_id } => {
                            let _ = self.engine.send(Event::WaitDone { recipe_version, state_ids: vec![state_id] }).await;
                        }
                        Inbound::WaitList { recipe_version, waited } => {
                            let ids = waited.into_iter().map(|w| w.state_id).collect();
                            let _ = self.engine.send(Event::WaitDone { recipe_version, state_ids: ids }).await;
                        }
                        Inbound::AgentUpdate { version, url: u } => {
                            let _ = self.engine.send(Event::AgentUpdate(UpdateOrder { version, url: u })).await;
                        }
                        Inbound::AppNotReady => {
                            tracing::info!(url = %url, "backend: app not ready; the Handshake will be repeated");
                            self.set_state(LinkState::AppNotReady { url: url.clone() });
                            rehandshake.get_or_insert(Instant::now() + self.cfg.app_not_ready_retry);
                        }
                        Inbound::Test => {
                            if let Err(e) = ws.send(self.frame(&Outbound::Test)).await { return transport(e); }
                        }
                        Inbound::TestAns { result, error } => tracing::info!(result, error = ?error, "backend test answer"),
                        Inbound::Capabilities(caps) => {
                            acks = caps.iter().any(|c| c == capability::STATELOG_ACK);
                            self.status.send_modify(|s| s.backend_capabilities = caps);
                        }
                        Inbound::StateLogAck { seq } => self.outbox.delivered(seq, true),
                        Inbound::Reconnect { after_s } => {
                            tracing::info!(after_s, "backend asks to reconnect later");
                            hint = Some(Duration::from_secs(after_s));
                        }
                        Inbound::Unknown(code) => tracing::info!(code = %code, "unknown message code ignored"),
                    }
                }
                _ = notified => dirty = true,
                _ = ping.tick() => {
                    let silent = last_heard.elapsed();
                    if silent >= self.cfg.ping_interval * 2 {
                        return SessionEnd::Error(LinkError::Dead { url, silent_s: silent.as_secs() });
                    }
                    if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await { return transport(e); }
                }
                _ = sleep_until_opt(rehandshake) => {
                    rehandshake = None;
                    if let Err(e) = ws.send(self.handshake()).await { return transport(e); }
                }
                _ = tick.tick() => self.liveness.touch(),
                r = self.shutdown.changed() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        if established {
                            let _ = tokio::time::timeout(Duration::from_secs(2), self.flush(&mut ws, acks, &mut last_sent)).await;
                        }
                        let _ = ws.close(None).await;
                        return SessionEnd::Shutdown;
                    }
                }
            }
        }
    }

    /// Sends every pending StateLog not yet sent on this connection.
    async fn flush(
        &self,
        ws: &mut Ws,
        acks: bool,
        last_sent: &mut u64,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        for log in self.outbox.pending_after(*last_sent) {
            let seq = log.seq.unwrap_or(0);
            ws.send(self.frame(&Outbound::StateLog(log))).await?;
            *last_sent = seq;
            self.status.send_modify(|s| s.sent += 1);
            if !acks {
                self.outbox.delivered(seq, false);
            }
        }
        Ok(())
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn tls_config(cfg: &LinkConfig) -> Result<rustls::ClientConfig, LinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    if cfg.tls_insecure {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &cfg.ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(LinkError::Tls("no trusted CA certificates (no system roots and no ca_file)".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any certificate: only with the explicit `tls_insecure = true`, warned about
/// at every connect.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_has_full_jitter_and_a_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 42);
        for attempt in 1..=20 {
            let ceiling = Duration::from_secs(1u64 << (attempt - 1).min(24)).min(Duration::from_secs(300));
            for _ in 0..200 {
                let d = b.delay(attempt);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        // Spread: at the cap, 1,000 draws cover the range roughly uniformly.
        let draws: Vec<u64> = (0..1000).map(|_| b.delay(30).as_secs()).collect();
        let quartiles = [0, 75, 150, 225].map(|lo| draws.iter().filter(|d| **d >= lo && **d < lo + 75).count());
        for q in quartiles {
            assert!((180..=320).contains(&q), "quartile counts {quartiles:?}");
        }
        // Same seed, same sequence.
        let mut a1 = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 7);
        let mut a2 = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 7);
        assert_eq!((0..10).map(|i| a1.delay(i)).collect::<Vec<_>>(), (0..10).map(|i| a2.delay(i)).collect::<Vec<_>>());
    }
}
