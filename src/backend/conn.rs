//! The network side: the accept loop (with its caps per address and in all), TLS, one
//! task per WebSocket connection (Handshake timeout, frame rate), and the
//! recipe-directory poller.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use super::hub::{Hub, Out, Queue};
use super::recipes::scan_dir;
use super::{BackendError, Limits};

pub(crate) type Shared = Arc<Mutex<Hub>>;

/// The hub's methods never panic half-way through on purpose; should one, the state is
/// still the best there is, so a poisoned lock is taken over.
pub(crate) fn lock(hub: &Shared) -> MutexGuard<'_, Hub> {
    hub.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Time a closing connection is given for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// WebSocket close code 1001, "going away".
const CLOSE_GOING_AWAY: u16 = 1001;
/// WebSocket close code 1009, "message too big".
const CLOSE_TOO_BIG: u16 = 1009;
/// Time a refused connection is given to read why.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// A rustls server configuration (ring provider) from PEM files: the certificate chain,
/// leaf first, and its private key.
pub fn tls_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, BackendError> {
    let tls = |path: &Path, what: &str, e: &dyn std::fmt::Display| {
        BackendError::Tls(format!("{}: {what}: {e}", path.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| tls(cert, "cannot read the certificate chain", &e))?;
    if certs.is_empty() {
        return Err(tls(cert, "cannot read the certificate chain", &"no CERTIFICATE in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls(key, "cannot read the private key", &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| tls(cert, "certificate and key do not make a server identity", &e))?;
    Ok(Arc::new(config))
}

pub(crate) struct Listener {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub ws_config: WebSocketConfig,
    pub limits: Limits,
    pub max_frame_bytes: usize,
}

/// Open connections, per IP address and in all.
#[derive(Debug, Default)]
struct Counts {
    per_addr: HashMap<IpAddr, usize>,
    total: usize,
}

/// Holds one place in [`Counts`] for the life of a connection task.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total -= 1;
        if let Some(n) = c.per_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_addr.remove(&self.ip);
            }
        }
    }
}

/// Why a new connection is refused, if it is: the HTTP status of the WebSocket
/// upgrade's answer and the reason in its body.
fn over_cap(counts: &Counts, ip: IpAddr, limits: &Limits) -> Option<(StatusCode, String)> {
    if counts.total >= limits.max_conns {
        return Some((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the backend has its maximum of {} connections", limits.max_conns),
        ));
    }
    let here = counts.per_addr.get(&ip).copied().unwrap_or(0);
    (here >= limits.max_conns_per_addr).then(|| {
        (
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many connections from {ip} (at most {})", limits.max_conns_per_addr),
        )
    })
}

/// What a connection task needs besides its socket.
#[derive(Clone)]
struct Ctx {
    hub: Shared,
    tls: Option<TlsAcceptor>,
    ws_config: WebSocketConfig,
    limits: Limits,
    max_frame_bytes: usize,
    shutdown: watch::Receiver<bool>,
}

pub(crate) async fn accept_loop(l: Listener, hub: Shared, mut shutdown: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let counts = Arc::new(Mutex::new(Counts::default()));
    let ctx = Ctx {
        hub: hub.clone(),
        tls: l.tls.clone(),
        ws_config: l.ws_config,
        limits: l.limits,
        max_frame_bytes: l.max_frame_bytes,
        shutdown: shutdown.clone(),
    };
    // Refused connections still cost a task until told why; past twice the caps they
    // are dropped without a word.
    let mut dropped_logged = false;
    loop {
        tokio::select! {
            accepted = l.listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    next_id += 1;
                    // Frames are small and interactive.
                    let _ = tcp.set_nodelay(true);
                    let ip = peer.ip();
                    let (refusal, slot) = {
                        let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
                        let refusal = over_cap(&c, ip, &l.limits);
                        let hard = Limits {
                            max_conns: l.limits.max_conns.saturating_mul(2),
                            max_conns_per_addr: l.limits.max_conns_per_addr.saturating_mul(2),
                            ..l.limits
                        };
                        if refusal.is_some() && over_cap(&c, ip, &hard).is_some() {
                            if !dropped_logged {
                                warn!("{peer}: {}; dropped without an answer", refusal.map(|r| r.1).unwrap_or_default());
                                dropped_logged = true;
                            }
                            continue;
                        }
                        dropped_logged = false;
                        c.total += 1;
                        *c.per_addr.entry(ip).or_default() += 1;
                        (refusal, Slot { counts: counts.clone(), ip })
                    };
                    tasks.spawn(connection(tcp, peer, next_id, ctx.clone(), refusal, slot));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!("accept: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(l);
    // Every connection saw the same signal and is closing itself.
    let _ = timeout(CLOSE_GRACE + Duration::from_secs(1), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    ctx: Ctx,
    refusal: Option<(StatusCode, String)>,
    _slot: Slot,
) {
    // A refused connection gets its answer quickly or not at all.
    // The TLS and WebSocket handshakes count against the operator's handshake timeout
    // (accept to first Handshake): under a reconnect storm a fixed, shorter bound cut
    // agents whose upgrade was merely slow, and they came back, adding to the storm.
    let limit = if refusal.is_some() { REFUSAL_GRACE } else { ctx.limits.handshake_timeout };
    match ctx.tls.clone() {
        None => upgrade(tcp, peer, id, ctx, refusal, limit).await,
        Some(acceptor) => match timeout(limit, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => upgrade(stream, peer, id, ctx, refusal, limit).await,
            Ok(Err(e)) => info!(conn = id, "{peer}: TLS handshake failed: {e}"),
            Err(_) => info!(conn = id, "{peer}: TLS handshake timed out"),
        },
    }
}

async fn upgrade<S>(
    stream: S,
    peer: SocketAddr,
    id: u64,
    ctx: Ctx,
    refusal: Option<(StatusCode, String)>,
    limit: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some((status, reason)) = &refusal {
        warn!(conn = id, "{peer}: connection refused: {reason}");
        lock(&ctx.hub).record_refused_connection(id, peer, status.as_u16(), reason);
    }
    // The refusal is the answer to the WebSocket upgrade: the client reads the status
    // and the reason, and no WebSocket exists.
    // The signature is tungstenite's (`Callback`): its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = move |_: &Request, response: Response| -> Result<Response, ErrorResponse> {
        match refusal {
            None => Ok(response),
            Some((status, reason)) => {
                let mut answer = ErrorResponse::new(Some(reason));
                *answer.status_mut() = status;
                Err(answer)
            }
        }
    };
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ctx.ws_config));
    match timeout(limit, accepted).await {
        Ok(Ok(ws)) => run(ws, peer, id, ctx).await,
        Ok(Err(e)) => info!(conn = id, "{peer}: WebSocket handshake failed: {e}"),
        Err(_) => info!(conn = id, "{peer}: WebSocket handshake timed out"),
    }
}

/// Frames a connection may send: `rate` per second, up to `burst` at once.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { tokens: burst, rate: f64::from(rate.max(1)), burst, at: Instant::now() }
    }

    /// Takes one frame's token; when none is left, how long until the next one.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Serves one agent until either side closes: frames from the agent go to the hub; the
/// hub's frames for this agent come through the queue, in order. A connection that has
/// no Handshake accepted within the timeout is closed; one that sends frames faster than
/// its rate is read no faster (TCP holds the rest back in the agent); one that reads
/// slower than its queue fills is dropped when the hub says so (`cut`). A Handshake that
/// makes a pin is waited on here, outside the hub's lock, and nothing more is read from
/// the agent until it is answered.
async fn run<S>(ws: WebSocketStream<S>, peer: SocketAddr, id: u64, ctx: Ctx)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ctx { hub, limits, max_frame_bytes, mut shutdown, .. } = ctx;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queue = Queue { tx, bytes: Arc::new(AtomicUsize::new(0)), cut: Arc::new(Notify::new()) };
    let (queued, cut) = (queue.bytes.clone(), queue.cut.clone());
    lock(&hub).connect(id, peer.to_string(), queue);
    let (mut sink, mut stream) = ws.split();
    let mut closing: Option<Pin<Box<Sleep>>> = None;
    if *shutdown.borrow() {
        return lock(&hub).disconnect(id);
    }
    let mut handshake_deadline = Some(Box::pin(sleep(limits.handshake_timeout)));
    let mut bucket = Bucket::new(limits.frames_per_s, limits.frame_burst);
    let mut throttle: Option<Pin<Box<Sleep>>> = None;
    let mut throttled_once = false;
    loop {
        tokio::select! {
            () = cut.notified() => break,
            next = rx.recv() => match next {
                Some(out) => {
                    let cost = out.cost();
                    let message = match out {
                        Out::Text(text) => Message::text(text.to_string()),
                        Out::Close { code, reason } => {
                            closing.get_or_insert_with(|| Box::pin(sleep(CLOSE_GRACE)));
                            Message::Close(Some(CloseFrame { code: code.into(), reason: reason.into() }))
                        }
                    };
                    let is_close = matches!(message, Message::Close(_));
                    // A peer that does not read blocks this write: the hub's cut ends it.
                    let sent = tokio::select! {
                        sent = sink.send(message) => sent,
                        () = cut.notified() => break,
                    };
                    queued.fetch_sub(cost, Ordering::AcqRel);
                    if let Err(e) = sent {
                        if !is_close {
                            debug!(conn = id, "{peer}: send failed: {e}");
                            break;
                        }
                    }
                }
                None => break,
            },
            frame = stream.next(), if throttle.is_none() => {
                if let Some(wait) = bucket.take(Instant::now()) {
                    if !throttled_once {
                        throttled_once = true;
                        lock(&hub).record_throttled(id, limits.frames_per_s);
                    }
                    throttle = Some(Box::pin(sleep(wait)));
                }
                match frame {
                    None => break,
                    Some(Err(WsError::Capacity(e))) => {
                        warn!(conn = id, "{peer}: {e}: connection closed");
                        let reason = match e {
                            CapacityError::MessageTooLong { .. } => format!("frame larger than {max_frame_bytes} bytes"),
                            CapacityError::TooManyHeaders => "too many headers".to_string(),
                        };
                        lock(&hub).record_too_big(id, &reason);
                        let frame = CloseFrame { code: CLOSE_TOO_BIG.into(), reason: reason.into() };
                        let _ = timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
                        break;
                    }
                    Some(Err(e)) => {
                        match e {
                            WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Protocol(_) | WsError::Io(_) => {
                                debug!(conn = id, "{peer}: {e}")
                            }
                            other => warn!(conn = id, "{peer}: connection dropped: {other}"),
                        }
                        break;
                    }
                    Some(Ok(Message::Text(text))) => {
                        let pending = lock(&hub).on_text(id, text.as_str());
                        if let Some(mut pending) = pending {
                            // The pin writer answers within a batch's sync; a stuck disk
                            // must not hold the connection past its Handshake timeout.
                            let verdict = match timeout(limits.handshake_timeout, pending.verdict()).await {
                                Ok(Some(v)) => v,
                                Ok(None) => Err(BackendError::Config("the pin writer has stopped".into())),
                                Err(_) => Err(BackendError::Config(format!(
                                    "the pin was not on disk within {} s",
                                    limits.handshake_timeout.as_secs()
                                ))),
                            };
                            lock(&hub).finish_handshake(pending, verdict);
                        }
                    }
                    Some(Ok(Message::Binary(data))) => lock(&hub).on_binary(id, data.len()),
                    // Pings are answered by tungstenite; a Close is answered by it too and
                    // then ends the stream.
                    Some(Ok(_)) => {}
                }
                if handshake_deadline.is_some() && lock(&hub).handshaken(id) {
                    handshake_deadline = None;
                }
            },
            () = async { if let Some(t) = throttle.as_mut() { t.await } }, if throttle.is_some() => throttle = None,
            () = async { if let Some(t) = handshake_deadline.as_mut() { t.await } }, if handshake_deadline.is_some() => {
                handshake_deadline = None;
                if !lock(&hub).handshaken(id) {
                    let reason = format!("no Handshake within {} s", limits.handshake_timeout.as_secs());
                    lock(&hub).handshake_timed_out(id, &reason);
                }
            },
            () = async { if let Some(t) = closing.as_mut() { t.await } }, if closing.is_some() => break,
            _ = shutdown.changed(), if closing.is_none() => {
                let frame = CloseFrame { code: CLOSE_GOING_AWAY.into(), reason: "backend shutting down".into() };
                let _ = sink.send(Message::Close(Some(frame))).await;
                closing = Some(Box::pin(sleep(Duration::from_secs(1))));
            }
        }
    }
    lock(&hub).disconnect(id);
}

/// Re-reads the recipe directory every `every`.
pub(crate) async fn poll_loop(hub: Shared, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let (dir, skip) = {
            let h = lock(&hub);
            (h.recipe_dir().to_path_buf(), h.skip().to_vec())
        };
        match scan_dir(&dir, &skip) {
            Ok(scan) => {
                failing = false;
                lock(&hub).apply_scan(scan);
            }
            Err(e) if !failing => {
                failing = true;
                warn!("{e} (nothing changes until it can be read again)");
            }
            Err(_) => {}
        }
    }
}
