//! Length-prefixed frames: `u32 little-endian length | postcard message`.
//!
//! The length is checked against the reader's limit before a byte of the body is
//! allocated, so a hostile peer cannot make a reader allocate more than the limit.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one frame holding `msg` to `buf`.
pub fn encode_into<T: Serialize>(msg: &T, buf: &mut Vec<u8>, max: usize) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
    let mut buf_taken = std::mem::take(buf);
    buf_taken = match postcard::to_extend(msg, buf_taken) {
        Ok(b) => b,
        Err(e) => return Err(FrameError::Malformed(e)),
    };
    *buf = buf_taken;
    let len = buf.len() - start - LENGTH_PREFIX_BYTES;
    if len > max {
        buf.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    let len_bytes = u32::try_from(len)
        .map_err(|_| FrameError::TooLarge { len, max })?
        .to_le_bytes();
    buf[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len_bytes);
    Ok(())
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(body)?)
}

/// Reads frames from one stream, reusing one buffer.
///
/// [`FrameReader::read`] is cancel-safe: progress through a frame is kept in the reader,
/// not in the future, so a `read` dropped by `select!` halfway through a frame loses
/// nothing and the next `read` carries on where it stopped.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
    len_bytes: [u8; LENGTH_PREFIX_BYTES],
    len_filled: usize,
    /// The body length once the prefix is complete.
    body_len: Option<usize>,
    body_filled: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            max,
            len_bytes: [0; LENGTH_PREFIX_BYTES],
            len_filled: 0,
            body_len: None,
            body_filled: 0,
        }
    }

    /// The next frame, or `None` when the stream ended cleanly between frames.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.fill().await? else {
            return Ok(None);
        };
        let msg = decode(&self.buf[..len]);
        self.shrink();
        Ok(Some(msg?))
    }

    /// The next frame's body undecoded, for a reader that decodes it in parts (the head
    /// reads a hello's version before the rest). A clean end of stream is an error.
    pub async fn read_bytes_required(&mut self) -> Result<Vec<u8>, FrameError> {
        let len = self.fill().await?.ok_or(FrameError::Truncated)?;
        let body = self.buf[..len].to_vec();
        self.shrink();
        Ok(body)
    }

    /// Reads the next frame's length prefix, not its body: the body's length, or `None` at
    /// a clean end of stream. Cancel-safe like [`FrameReader::read`]; the next `read`
    /// returns that frame. Lets a reader wait for room before it takes a large body.
    pub async fn next_len(&mut self) -> Result<Option<usize>, FrameError> {
        loop {
            if let Some(len) = self.body_len {
                return Ok(Some(len));
            }
            if self.len_filled == LENGTH_PREFIX_BYTES {
                let len = u32::from_le_bytes(self.len_bytes) as usize;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                // The buffer grows as bytes arrive, not to what the prefix claims: a peer
                // that announces a large frame and sends nothing holds no memory.
                self.buf.clear();
                self.body_len = Some(len);
                self.body_filled = 0;
                continue;
            }
            let n = self
                .inner
                .read(&mut self.len_bytes[self.len_filled..])
                .await?;
            if n == 0 {
                return if self.len_filled == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.len_filled += n;
        }
    }

    /// Reads one whole frame into `buf`; its length, or `None` at a clean end of stream.
    async fn fill(&mut self) -> Result<Option<usize>, FrameError> {
        let Some(len) = self.next_len().await? else {
            return Ok(None);
        };
        while self.body_filled < len {
            let end = len.min(self.body_filled + READ_CHUNK_BYTES);
            if self.buf.len() < end {
                self.buf.resize(end, 0);
            }
            let n = self
                .inner
                .read(&mut self.buf[self.body_filled..end])
                .await?;
            if n == 0 {
                return Err(FrameError::Truncated);
            }
            self.body_filled += n;
        }
        // The frame is complete: the next read starts a new one, whatever decoding says.
        self.len_filled = 0;
        self.body_len = None;
        Ok(Some(len))
    }

    /// Does not keep a huge buffer alive after one large frame.
    fn shrink(&mut self) {
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
    }

    /// Bytes of the frame being read so far (its length prefix included); 0 between frames.
    /// A reader that gives up on a peer stalled mid-frame compares it across waits.
    pub fn progress(&self) -> usize {
        match self.body_len {
            Some(_) => LENGTH_PREFIX_BYTES + self.body_filled,
            None => self.len_filled,
        }
    }

    /// Like [`FrameReader::read`], but a clean end of stream is an error.
    pub async fn read_required<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.read().await?.ok_or(FrameError::Truncated)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// How much more of a frame's body the reader makes room for at a time.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Writes frames to one stream, reusing one buffer.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    max: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, max: usize) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// Encodes and writes one frame.
    pub async fn write<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.buf.clear();
        encode_into(msg, &mut self.buf, self.max)?;
        self.inner.write_all(&self.buf).await?;
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let mut bytes = Vec::new();
        encode_into(&"hello".to_string(), &mut bytes, 1024).unwrap();
        encode_into(&42u64, &mut bytes, 1024).unwrap();
        let mut r = FrameReader::new(&bytes[..], 1024);
        assert_eq!(r.read::<String>().await.unwrap().unwrap(), "hello");
        assert_eq!(r.read::<u64>().await.unwrap().unwrap(), 42);
        assert!(r.read::<u64>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocation() {
        let bytes = u32::MAX.to_le_bytes();
        let mut r = FrameReader::new(&bytes[..], 1024);
        match r.read::<String>().await {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_read_cancelled_mid_frame_loses_nothing() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut frames = Vec::new();
        encode_into(&"first frame".to_string(), &mut frames, 1024).unwrap();
        encode_into(&"second".to_string(), &mut frames, 1024).unwrap();
        let mut r = FrameReader::new(rx, 1024);
        // Half of the first frame arrives; the read is abandoned while waiting for more.
        tx.write_all(&frames[..7]).await.unwrap();
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read::<String>()).await;
        assert!(cancelled.is_err());
        tx.write_all(&frames[7..]).await.unwrap();
        assert_eq!(r.read::<String>().await.unwrap().unwrap(), "first frame");
        assert_eq!(r.read::<String>().await.unwrap().unwrap(), "second");
    }

    #[tokio::test]
    async fn truncated_body_is_an_error() {
        let mut bytes = Vec::new();
        encode_into(&"hello".to_string(), &mut bytes, 1024).unwrap();
        bytes.pop();
        let mut r = FrameReader::new(&bytes[..], 1024);
        assert!(matches!(
            r.read::<String>().await,
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn encoding_over_the_limit_fails_and_leaves_buffer() {
        let mut bytes = vec![1, 2, 3];
        let err = encode_into(&vec![0u8; 100], &mut bytes, 10).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert_eq!(bytes, vec![1, 2, 3]);
    }
}
