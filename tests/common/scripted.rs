//! A backend scripted by the test itself, one WebSocket frame at a time (the original's
//! shapes, bad frames): accept the agent, read its JSON frames, send ours.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

pub async fn accept(listener: &TcpListener) -> Ws {
    let (tcp, _) =
        tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.expect("agent connects").unwrap();
    tokio_tungstenite::accept_async(tcp).await.unwrap()
}

/// The next JSON text frame, or `None` when the agent closed the connection.
pub async fn next_json_or_close(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(within, ws.next()).await.expect("a frame in time") {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => {}
        }
    }
}

/// The next JSON text frame; the connection must stay open.
pub async fn next_json(ws: &mut Ws) -> Value {
    next_json_or_close(ws, Duration::from_secs(45)).await.expect("connection open")
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}
