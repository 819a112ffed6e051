use super::*;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the test server answers to one request.
enum Reply {
    Body(Vec<u8>),
    Status(u16, Vec<(&'static str, String)>),
    /// Announces `declared` bytes, sends `body`, closes.
    Truncated {
        declared: u64,
        body: Vec<u8>,
    },
    /// No Content-Length: the body ends when the connection closes.
    Unsized(Vec<u8>),
    /// Headers and one byte, then nothing for `pause`.
    Stalls {
        pause: Duration,
    },
}

struct Server {
    base: String,
    hits: Arc<AtomicUsize>,
}

/// A hand-written HTTP/1.1 server on loopback: one request per connection; `answer`
/// gets the request path and how many requests came before.
async fn serve(answer: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (answer, counter) = (answer.clone(), counter.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let (status, headers, body, pause) = match answer(&path, n) {
                    Reply::Body(b) => (200, vec![("Content-Length", b.len().to_string())], b, None),
                    Reply::Status(s, mut h) => {
                        h.push(("Content-Length", "0".into()));
                        (s, h, Vec::new(), None)
                    }
                    Reply::Truncated { declared, body } => {
                        (200, vec![("Content-Length", declared.to_string())], body, None)
                    }
                    Reply::Unsized(b) => (200, vec![], b, None),
                    Reply::Stalls { pause } => {
                        (200, vec![("Content-Length", "100".into())], b"x".to_vec(), Some(pause))
                    }
                };
                let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = stream.write_all(out.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.flush().await;
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            });
        }
    });
    Server { base, hits }
}

fn downloader(attempts: u32, timeout: Duration) -> Downloader {
    Downloader::new(DownloadSettings { attempts, timeout, ..DownloadSettings::default() })
        .unwrap()
        .with_retry_pauses(Duration::from_millis(10), Duration::from_secs(3))
}

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[tokio::test]
async fn a_body_lands_whole_with_its_digests() {
    let data = body(300_000);
    let served = data.clone();
    let server = serve(move |_, _| Reply::Body(served.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.tgz");
    let f =
        downloader(3, Duration::from_secs(10)).fetch(&format!("{}/a.tgz", server.base), &dest, 1 << 20).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(f.path, dest);
    assert_eq!(f.size, data.len() as u64);
    assert_eq!(f.sha256, hex::encode(sha2::Sha256::digest(&data)));
    assert_eq!(f.md5, hex::encode(md5::Md5::digest(&data)));
    assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o644);
    assert_eq!(leftovers(dir.path()), ["a.tgz"]);
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_404_is_final_and_names_the_url_without_its_password() {
    let server = serve(|_, _| Reply::Status(404, vec![])).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.base.replace("http://", "http://user:s3cret@") + "/missing.zip";
    let err = downloader(4, Duration::from_secs(10)).fetch(&url, &dir.path().join("m"), 1000).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Status { status: 404, attempts: 1, .. }), "{err:?}");
    assert!(msg.contains("/missing.zip: HTTP 404") && msg.contains("user:***@"), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "4xx is not retried");
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test]
async fn a_500_is_retried_until_the_body_comes() {
    let server =
        serve(|_, n| if n < 2 { Reply::Status(500, vec![]) } else { Reply::Body(b"third time".to_vec()) }).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f");
    let f = downloader(3, Duration::from_secs(10)).fetch(&format!("{}/f", server.base), &dest, 1000).await.unwrap();
    assert_eq!(f.size, 10);
    assert_eq!(std::fs::read(&dest).unwrap(), b"third time");
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);

    // Out of attempts: the last status is the error.
    let server = serve(|_, _| Reply::Status(503, vec![])).await;
    let err = downloader(2, Duration::from_secs(10)).fetch(&server.base, &dest, 1000).await.unwrap_err();
    assert_eq!(err.to_string(), format!("{}/: HTTP 503 (after 2 attempts)", server.base));
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_429_waits_as_long_as_retry_after_says() {
    let server =
        serve(
            |_, n| {
                if n == 0 {
                    Reply::Status(429, vec![("Retry-After", "1".into())])
                } else {
                    Reply::Body(b"ok".to_vec())
                }
            },
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let started = tokio::time::Instant::now();
    downloader(2, Duration::from_secs(10)).fetch(&server.base, &dir.path().join("f"), 10).await.unwrap();
    // The retry pauses are 10 ms here, so only the header explains the wait.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn oversize_bodies_are_refused_by_header_and_by_stream() {
    let server =
        serve(|path, _| if path == "/announced" { Reply::Body(body(2000)) } else { Reply::Unsized(body(2000)) }).await;
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(3, Duration::from_secs(10));
    let dest = dir.path().join("big");
    let err = d.fetch(&format!("{}/announced", server.base), &dest, 1000).await.unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { size: Some(2000), limit: 1000, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}/announced: the body (2000 bytes) exceeds the download limit of 1000 bytes", server.base)
    );
    let err = d.fetch(&format!("{}/unsized", server.base), &dest, 1000).await.unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { size: None, .. }), "{err:?}");
    assert!(err.to_string().ends_with("the body (more than that) exceeds the download limit of 1000 bytes"), "{err}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 2, "size refusals are not retried");
    assert!(leftovers(dir.path()).is_empty(), "no part file left: {:?}", leftovers(dir.path()));
}

#[tokio::test]
async fn truncated_and_stalled_bodies_fail_after_the_retries() {
    let server = serve(|path, _| {
        if path == "/cut" {
            Reply::Truncated { declared: 1000, body: body(10) }
        } else {
            Reply::Stalls { pause: Duration::from_secs(5) }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f");
    std::fs::write(&dest, "previous").unwrap();
    let d = downloader(2, Duration::from_millis(500));
    let err = d.fetch(&format!("{}/cut", server.base), &dest, 10_000).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Transfer { attempts: 2, .. }), "{err:?}");
    assert!(msg.starts_with(&format!("{}/cut: the transfer broke off", server.base)), "{msg}");
    assert!(msg.ends_with("(after 2 attempts)"), "{msg}");

    let started = tokio::time::Instant::now();
    let err = d.fetch(&format!("{}/slow", server.base), &dest, 10_000).await.unwrap_err();
    assert!(err.to_string().contains("/slow: timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "the whole-transfer timeout applies to the body");
    // A failed download never replaces what was there.
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "previous");
    assert_eq!(leftovers(dir.path()), ["f"]);
}

#[tokio::test]
async fn only_http_and_https_are_fetched() {
    let d = downloader(1, Duration::from_secs(1));
    let dest = Path::new("/nonexistent/x");
    let err = d.fetch("ftp://user:pw@example.com/x.tar", dest, 10).await.unwrap_err();
    assert_eq!(err.to_string(), "ftp://user:***@example.com/x.tar: only http:// and https:// URLs can be downloaded");
    let err = d.fetch("not a url", dest, 10).await.unwrap_err();
    assert!(matches!(err, DownloadError::BadUrl { .. }), "{err:?}");
    assert_eq!(redact_text("http://u:p@[bad/x"), "http://***@[bad/x");
}

/// The retry pauses are tokio timers: with the clock paused, five attempts with pauses
/// of up to a minute finish at once in real time, and the virtual clock moved.
#[tokio::test(start_paused = true)]
// The wall clock is the point here: it shows the pauses did not really happen.
#[allow(clippy::disallowed_methods)]
async fn retry_pauses_follow_the_tokio_clock() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = Downloader::new(DownloadSettings { attempts: 5, ..DownloadSettings::default() }).unwrap();
    let wall = std::time::Instant::now();
    let virtual_start = tokio::time::Instant::now();
    let err = d.fetch(&format!("http://127.0.0.1:{port}/x"), Path::new("/nonexistent/x"), 10).await.unwrap_err();
    assert!(matches!(err, DownloadError::Transfer { attempts: 5, .. }), "{err:?}");
    assert!(wall.elapsed() < Duration::from_secs(5), "real time {:?}", wall.elapsed());
    assert!(tokio::time::Instant::now() > virtual_start, "the pauses were tokio sleeps");
}

#[test]
fn extra_roots_must_hold_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificate here\n").unwrap();
    let settings = DownloadSettings { extra_roots: vec![empty.clone()], ..DownloadSettings::default() };
    let err = Downloader::new(settings).err().expect("refused");
    assert!(err.to_string().contains(&format!("CA file {}", empty.display())), "{err}");

    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let good = dir.path().join("ca.pem");
    std::fs::write(&good, ca.cert.pem()).unwrap();
    Downloader::new(DownloadSettings { extra_roots: vec![good], ..DownloadSettings::default() }).unwrap();
}
