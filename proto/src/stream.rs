//! The helper socket as both ends use it: a Unix stream split into a [`FrameReader`]
//! and a [`FrameWriter`] that speak the frames of [`crate::codec`].
//!
//! Two costs of a plain `tokio::net::UnixStream` dominated a round of quick states,
//! where daemon and helper hand one small frame back and forth per state:
//!
//! - tokio registers every stream for readability *and* writability. On a Unix socket
//!   each read by the peer signals writability to the writer, so both processes were
//!   woken once more per frame, for nothing (an `epoll_wait` that returns `EPOLLOUT`
//!   and goes back to sleep). Here the socket is registered for readability only;
//!   the writer writes straight away and registers interest in writability only in
//!   the rare case that the socket buffer is full (a frame of hundreds of KiB), on a
//!   duplicate descriptor that is dropped again once the frame is out.
//! - reading the 4-byte header and then the body took two `recv` calls per frame and
//!   a third to learn that nothing more was there. The reader buffers: one `recv`
//!   normally brings a whole frame, and a short read is taken as "drained" (as tokio
//!   itself does) instead of asking again.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::codec::{self, CodecError};

/// Bytes read from the socket at once; a typical frame (a few hundred bytes) fits.
const READ_BUFFER: usize = 8 * 1024;

/// Registers `stream` with tokio's reactor for `interest` only.
// tokio 1.54 deprecates the safe constructor because a generic `AsRawFd` type could
// hand out a different descriptor later; std's `UnixStream` owns one descriptor for
// its whole life, which is exactly the contract of the (unsafe) replacement.
#[allow(deprecated)]
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(stream, interest)
}

/// Splits a connected stream. Must run inside a tokio runtime (the socket is
/// registered with its reactor). The stream is made non-blocking.
pub fn split(stream: UnixStream) -> io::Result<(FrameReader, FrameWriter)> {
    stream.set_nonblocking(true)?;
    let io = Arc::new(register(stream, Interest::READABLE)?);
    let reader = FrameReader { io: Arc::clone(&io), buf: vec![0; READ_BUFFER].into_boxed_slice(), start: 0, end: 0 };
    Ok((reader, FrameWriter { io }))
}

/// Splits a tokio stream (as `connect` and `accept` give them).
pub fn split_tokio(stream: tokio::net::UnixStream) -> io::Result<(FrameReader, FrameWriter)> {
    split(stream.into_std()?)
}

/// One `read` as soon as the socket is readable. `Ok(0)` is the end of the stream.
async fn read_some(io: &AsyncFd<UnixStream>, dst: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = io.readable().await?;
        match guard.try_io(|s| s.get_ref().read(dst)) {
            Ok(Ok(n)) => {
                // Less than asked for: the socket is drained for now, so wait for the
                // next edge rather than paying a read that only says EAGAIN. (A closed
                // peer stays "readable": tokio keeps the closed state.)
                if n > 0 && n < dst.len() {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            // Would block: readiness was cleared, wait for the next event.
            Err(_) => {}
        }
    }
}

/// Reads frames; may hold the start of the next frame between calls.
pub struct FrameReader {
    io: Arc<AsyncFd<UnixStream>>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// One frame's bytes, checked against `max` before anything of it is buffered
    /// beyond the read buffer. `Ok(None)` is a clean end of stream between frames.
    /// Cancel-safe only between frames: callers read from one task until the end.
    pub async fn read_raw(&mut self, max: usize) -> Result<Option<Vec<u8>>, CodecError> {
        while self.end - self.start < 4 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = read_some(&self.io, &mut self.buf[self.end..]).await?;
            if n == 0 {
                return if self.end == 0 { Ok(None) } else { Err(CodecError::Truncated) };
            }
            self.end += n;
        }
        let header: [u8; 4] = self.buf[self.start..self.start + 4].try_into().expect("four bytes");
        let len = u32::from_be_bytes(header) as usize;
        if len > max {
            return Err(CodecError::TooLarge { len, max });
        }
        self.start += 4;
        let buffered = self.end - self.start;
        if buffered >= len {
            let body = self.buf[self.start..self.start + len].to_vec();
            self.start += len;
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            }
            return Ok(Some(body));
        }
        // A frame larger than what was buffered: the rest goes straight into the body.
        let mut body = vec![0; len];
        body[..buffered].copy_from_slice(&self.buf[self.start..self.end]);
        (self.start, self.end) = (0, 0);
        let mut got = buffered;
        while got < len {
            let n = read_some(&self.io, &mut body[got..]).await?;
            if n == 0 {
                return Err(CodecError::Truncated);
            }
            got += n;
        }
        Ok(Some(body))
    }

    /// One frame, decoded.
    pub async fn read<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>, CodecError> {
        match self.read_raw(max).await? {
            Some(body) => codec::decode(&body).map(Some),
            None => Ok(None),
        }
    }
}

/// Writes frames. Dropping it shuts the sending direction down, so that the peer
/// reads the end of the stream (as dropping tokio's write half does).
pub struct FrameWriter {
    io: Arc<AsyncFd<UnixStream>>,
}

impl FrameWriter {
    /// Serialises `msg` into one frame (at most `max` bytes of body) and writes it.
    pub async fn write<T: Serialize>(&mut self, msg: &T, max: usize) -> Result<(), CodecError> {
        let frame = codec::encode(msg, max)?;
        self.write_all(&frame).await.map_err(CodecError::Io)
    }

    /// Writes already encoded bytes, all of them.
    pub async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let mut stream = self.io.get_ref();
        // Registered only once the socket buffer is full; see the module comment.
        let mut room: Option<AsyncFd<UnixStream>> = None;
        while !bytes.is_empty() {
            let written = match &room {
                None => stream.write(bytes),
                Some(room) => {
                    let mut guard = room.writable().await?;
                    match guard.try_io(|_| stream.write(bytes)) {
                        Ok(result) => result,
                        Err(_) => continue,
                    }
                }
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && room.is_none() => {
                    room = Some(register(stream.try_clone()?, Interest::WRITABLE)?);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        let _ = self.io.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn pair() -> ((FrameReader, FrameWriter), (FrameReader, FrameWriter)) {
        let (a, b) = UnixStream::pair().unwrap();
        (split(a).unwrap(), split(b).unwrap())
    }

    #[tokio::test]
    async fn frames_of_every_size_arrive_whole_and_in_order() {
        let ((_ar, mut aw), (mut br, _bw)) = pair();
        // Small frames share one read; a frame larger than the socket buffer makes the
        // writer wait for room, and the reader assemble it from many reads.
        let big = "x".repeat(3 * 1024 * 1024);
        let msgs = vec![json!({"n": 1}), json!({"n": 2}), json!({"big": big}), json!({"n": 3})];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                aw.write(m, 8 * 1024 * 1024).await.unwrap();
            }
        });
        for want in &msgs {
            let got: Value = br.read(8 * 1024 * 1024).await.unwrap().unwrap();
            assert_eq!(&got, want);
        }
        writer.await.unwrap();
        // The writer was dropped with its task: the reader sees a clean end.
        assert!(br.read::<Value>(100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_truncated_and_malformed_frames() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut br, _bw) = split(b).unwrap();
        (&a).write_all(&(1u32 << 30).to_be_bytes()).unwrap();
        let err = br.read_raw(1024).await.unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { len: 1_073_741_824, max: 1024 }), "{err}");

        let (a, b) = UnixStream::pair().unwrap();
        let (mut br, _bw) = split(b).unwrap();
        (&a).write_all(&[0, 0, 0, 9, b'{']).unwrap();
        drop(a);
        assert!(matches!(br.read_raw(100).await, Err(CodecError::Truncated)));

        let (a, b) = UnixStream::pair().unwrap();
        let (mut br, _bw) = split(b).unwrap();
        (&a).write_all(&[0, 0, 0, 5]).unwrap();
        (&a).write_all(b"{oops").unwrap();
        (&a).write_all(&codec::encode(&json!(7), 100).unwrap()).unwrap();
        let err = br.read::<Value>(100).await.unwrap_err();
        assert!(matches!(err, CodecError::Json(_)) && !err.is_fatal());
        // The stream is still aligned: the next frame reads fine.
        assert_eq!(br.read::<Value>(100).await.unwrap(), Some(json!(7)));
    }

    #[tokio::test]
    async fn dropping_the_writer_ends_the_peers_stream() {
        let ((mut ar, aw), (mut br, bw)) = pair();
        drop(aw);
        assert!(br.read_raw(100).await.unwrap().is_none());
        drop(bw);
        assert!(ar.read_raw(100).await.unwrap().is_none());
    }
}
