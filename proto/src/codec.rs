//! Frames on the helper socket: a u32 big-endian length, then that many bytes of JSON.
//!
//! The length is checked against a cap before anything is buffered, so an oversized or
//! hostile frame costs four bytes of reading, not memory.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Large enough for big file contents in `linux.file`, small enough to bound memory.
pub const DEFAULT_MAX_FRAME: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not valid JSON for this message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("I/O error on the helper socket: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// After these the byte stream is no longer aligned on frames: close the connection.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CodecError::Json(_))
    }
}

/// Serialises `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, CodecError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > max {
        return Err(CodecError::TooLarge { len: body.len(), max });
    }
    let len = u32::try_from(body.len()).map_err(|_| CodecError::TooLarge { len: body.len(), max })?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

pub async fn write_frame<W, T>(w: &mut W, msg: &T, max: usize) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode(msg, max)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame's bytes. `Ok(None)` is a clean end of stream between frames.
pub async fn read_raw_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, CodecError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(CodecError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => CodecError::Truncated,
        _ => CodecError::Io(e),
    })?;
    Ok(Some(body))
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    Ok(serde_json::from_slice(body)?)
}

pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<Option<T>, CodecError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_raw_frame(r, max).await? {
        Some(body) => decode(&body).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[tokio::test]
    async fn round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &json!({"x": 1}), 100).await.unwrap();
        let v: Value = read_frame(&mut b, 100).await.unwrap().unwrap();
        assert_eq!(v, json!({"x": 1}));
        drop(a);
        assert!(read_frame::<_, Value>(&mut b, 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_buffering() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Claim 1 GiB; only the header is ever written.
        a.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let err = read_raw_frame(&mut b, 1024).await.unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { len: 1_073_741_824, max: 1024 }));
        assert!(err.is_fatal());
        assert!(matches!(encode(&"x".repeat(100), 10), Err(CodecError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn truncated_and_malformed_frames() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(matches!(read_raw_frame(&mut b, 100).await, Err(CodecError::Truncated)));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{oops").await.unwrap();
        let err = read_frame::<_, Value>(&mut b, 100).await.unwrap_err();
        assert!(matches!(err, CodecError::Json(_)));
        assert!(!err.is_fatal());
    }
}
