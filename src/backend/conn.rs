//! The network side: the accept loop, TLS, one task per WebSocket connection, and the
//! recipe-directory poller.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use super::hub::{Hub, Out};
use super::recipes::scan_dir;
use super::BackendError;

pub(crate) type Shared = Arc<Mutex<Hub>>;

/// The hub's methods never panic half-way through on purpose; should one, the state is
/// still the best there is, so a poisoned lock is taken over.
pub(crate) fn lock(hub: &Shared) -> MutexGuard<'_, Hub> {
    hub.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Time allowed for the TLS and WebSocket handshakes of a new connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a closing connection is given for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// WebSocket close code 1001, "going away".
const CLOSE_GOING_AWAY: u16 = 1001;

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
}

pub(crate) async fn accept_loop(l: Listener, hub: Shared, mut shutdown: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = l.listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    next_id += 1;
                    // Frames are small and interactive.
                    let _ = tcp.set_nodelay(true);
                    tasks.spawn(connection(tcp, peer, next_id, hub.clone(), l.tls.clone(), l.ws_config, shutdown.clone()));
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
    hub: Shared,
    tls: Option<TlsAcceptor>,
    ws_config: WebSocketConfig,
    shutdown: watch::Receiver<bool>,
) {
    match tls {
        None => upgrade(tcp, peer, id, hub, ws_config, shutdown).await,
        Some(acceptor) => match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => upgrade(stream, peer, id, hub, ws_config, shutdown).await,
            Ok(Err(e)) => info!(conn = id, "{peer}: TLS handshake failed: {e}"),
            Err(_) => info!(conn = id, "{peer}: TLS handshake timed out"),
        },
    }
}

async fn upgrade<S>(
    stream: S,
    peer: SocketAddr,
    id: u64,
    hub: Shared,
    ws_config: WebSocketConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::accept_async_with_config(stream, Some(ws_config))).await {
        Ok(Ok(ws)) => run(ws, peer, id, hub, shutdown).await,
        Ok(Err(e)) => info!(conn = id, "{peer}: WebSocket handshake failed: {e}"),
        Err(_) => info!(conn = id, "{peer}: WebSocket handshake timed out"),
    }
}

/// Serves one agent until either side closes: frames from the agent go to the hub; the
/// hub's frames for this agent come through the queue, in order.
async fn run<S>(ws: WebSocketStream<S>, peer: SocketAddr, id: u64, hub: Shared, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&hub).connect(id, peer.to_string(), tx);
    let (mut sink, mut stream) = ws.split();
    let mut closing: Option<Pin<Box<Sleep>>> = None;
    if *shutdown.borrow() {
        return lock(&hub).disconnect(id);
    }
    loop {
        tokio::select! {
            queued = rx.recv() => match queued {
                Some(Out::Text(text)) => {
                    if let Err(e) = sink.send(Message::text(text)).await {
                        debug!(conn = id, "{peer}: send failed: {e}");
                        break;
                    }
                }
                Some(Out::Close { code, reason }) => {
                    let frame = CloseFrame { code: code.into(), reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    closing.get_or_insert_with(|| Box::pin(sleep(CLOSE_GRACE)));
                }
                None => break,
            },
            frame = stream.next() => match frame {
                None => break,
                Some(Err(e)) => {
                    match e {
                        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Protocol(_) | WsError::Io(_) => {
                            debug!(conn = id, "{peer}: {e}")
                        }
                        other => warn!(conn = id, "{peer}: connection dropped: {other}"),
                    }
                    break;
                }
                Some(Ok(Message::Text(text))) => lock(&hub).on_text(id, text.as_str()),
                Some(Ok(Message::Binary(data))) => lock(&hub).on_binary(id, data.len()),
                // Pings are answered by tungstenite; a Close is answered by it too and
                // then ends the stream.
                Some(Ok(_)) => {}
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
