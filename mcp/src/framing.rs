//! Newline framing with a maximum length. Bytes arrive in chunks of any
//! size; each byte is scanned for the newline once (the buffer remembers how
//! far it has looked), so a large message costs linear time, not quadratic.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A message longer than the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong(pub usize);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a message exceeded {} bytes", self.0)
    }
}

impl std::error::Error for TooLong {}

/// Splits a byte stream into lines of at most `max` bytes (without the
/// newline and a trailing `\r`).
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    max: usize,
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: BytesMut::new(),
            scanned: 0,
            max,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, `None` when more bytes are needed, or an
    /// error once the unfinished line is longer than the bound.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, TooLong> {
        match self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                self.scanned = 0;
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.len() > self.max {
                    return Err(TooLong(self.max));
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(TooLong(self.max));
                }
                Ok(None)
            }
        }
    }

    /// What is left after the stream ended (a last line without a newline).
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        let rest = self.buf.split().freeze();
        (!rest.is_empty()).then_some(rest)
    }

    /// Room to read into directly, for readers that fill the buffer themselves.
    fn spare(&mut self) -> &mut BytesMut {
        self.buf.reserve(64 * 1024);
        &mut self.buf
    }
}

/// Reads lines from an `AsyncRead` (a process's stdout, standard input).
pub struct LineReader<R> {
    inner: R,
    lines: LineBuffer,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            lines: LineBuffer::new(max),
            eof: false,
        }
    }

    /// The next line; `Ok(None)` at the end of the stream. Blank lines are skipped.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            match self.lines.next_line() {
                Ok(Some(l)) if l.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(l)) => return Ok(Some(l)),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            if self.eof {
                return Ok(self
                    .lines
                    .finish()
                    .filter(|l| !l.iter().all(u8::is_ascii_whitespace)));
            }
            let n = self.inner.read_buf(self.lines.spare()).await?;
            if n == 0 {
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks() {
        let mut b = LineBuffer::new(10);
        b.push(b"ab");
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"c\r\nde\n\nf");
        assert_eq!(b.next_line(), Ok(Some(Bytes::from_static(b"abc"))));
        assert_eq!(b.next_line(), Ok(Some(Bytes::from_static(b"de"))));
        assert_eq!(b.next_line(), Ok(Some(Bytes::new())));
        assert_eq!(b.next_line(), Ok(None));
        assert_eq!(b.finish(), Some(Bytes::from_static(b"f")));
    }

    #[test]
    fn bounds_lines() {
        let mut b = LineBuffer::new(4);
        b.push(b"12345");
        assert_eq!(b.next_line(), Err(TooLong(4)));
        let mut b = LineBuffer::new(4);
        b.push(b"123456\n");
        assert_eq!(b.next_line(), Err(TooLong(4)));
    }

    #[tokio::test]
    async fn reads_lines() {
        let data: &[u8] = b"{\"a\":1}\n\n  \n{\"b\":2}";
        let mut r = LineReader::new(data, 100);
        assert_eq!(
            r.next_line().await.ok().flatten().as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(
            r.next_line().await.ok().flatten().as_deref(),
            Some(&b"{\"b\":2}"[..])
        );
        assert!(r.next_line().await.expect("eof").is_none());
    }
}
