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
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// The next frame, or `None` when the stream ended cleanly between frames.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut len_bytes = [0u8; LENGTH_PREFIX_BYTES];
        let mut filled = 0;
        while filled < LENGTH_PREFIX_BYTES {
            let n = self.inner.read(&mut len_bytes[filled..]).await?;
            if n == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            filled += n;
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        match self.inner.read_exact(&mut self.buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Truncated)
            }
            Err(e) => return Err(e.into()),
        }
        let msg = decode(&self.buf)?;
        // Do not keep a huge buffer alive after one large frame.
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(Some(msg))
    }

    /// Like [`FrameReader::read`], but a clean end of stream is an error.
    pub async fn read_required<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.read().await?.ok_or(FrameError::Truncated)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

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
