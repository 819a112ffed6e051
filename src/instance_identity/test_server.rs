//! A tiny HTTP/1.1 server on 127.0.0.1 for the metadata tests: one request per connection,
//! answers from a closure, and a log of every request seen.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What the server answers: status and body, or `None` to never answer (timeouts).
pub type Handler = dyn Fn(&Request) -> Option<(u16, String)> + Send + Sync;

pub struct Server {
    pub base: String,
    pub log: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// `(method, path)` of every request, in order.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.requests().into_iter().map(|r| (r.method, r.path)).collect()
    }
}

pub async fn serve(handler: impl Fn(&Request) -> Option<(u16, String)> + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let handler: Arc<Handler> = Arc::new(handler);
    let task_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, handler.clone(), task_log.clone()));
        }
    });
    Server { base, log }
}

async fn answer(stream: TcpStream, handler: Arc<Handler>, log: Arc<Mutex<Vec<Request>>>) {
    let mut reader = BufReader::new(stream);
    let Some(request) = read_request(&mut reader).await else {
        return;
    };
    log.lock().unwrap().push(request.clone());
    let Some((status, body)) = handler(&request) else {
        // Hold the connection open without answering until the client gives up.
        let _ = reader.read_to_end(&mut Vec::new()).await;
        return;
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let stream = reader.get_mut();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.ok()?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let request = Request { method, path, headers };
    let length: usize = request.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    reader.read_exact(&mut vec![0; length]).await.ok()?;
    Some(request)
}
