//! Reading Server-Sent Events with a bound on the size of one event. Only
//! `data:` fields make up a message; comments and `event:` lines and empty
//! "priming" events are passed over, while `id:` and `retry:` are kept for
//! resuming a stream (`Last-Event-ID`). One decoder serves streams read as
//! they arrive and bodies read whole.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::framing::LineBuffer;

/// Assembles events from lines.
struct Decoder {
    lines: LineBuffer,
    data: BytesMut,
    max: usize,
    /// The id of the last event, as the SSE standard keeps it: set by an
    /// `id:` field when its event is dispatched, even one without data (a
    /// priming event), and kept by events without an id.
    last_id: Option<String>,
    pending_id: Option<String>,
    /// The reconnection time the server asked for, in milliseconds.
    retry: Option<u64>,
}

impl Decoder {
    fn new(max: usize) -> Self {
        Decoder {
            lines: LineBuffer::new(max),
            data: BytesMut::new(),
            max,
            last_id: None,
            pending_id: None,
            retry: None,
        }
    }

    /// The next complete event's data, `None` when more bytes are needed.
    fn next_event(&mut self) -> Result<Option<Bytes>, String> {
        while let Some(line) = self.lines.next_line().map_err(|e| e.to_string())? {
            if line.is_empty() {
                if let Some(id) = self.pending_id.take() {
                    self.last_id = (!id.is_empty()).then_some(id);
                }
                if !self.data.is_empty() {
                    return Ok(Some(self.data.split().freeze()));
                }
            } else if let Some(rest) = line.strip_prefix(b"id:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                // An id with NUL is ignored, as the standard says; ids are
                // sent back in a header, so they must be short, visible text.
                if rest.len() <= 256 && rest.iter().all(|b| (0x20..0x7f).contains(b)) {
                    self.pending_id = Some(String::from_utf8_lossy(rest).into_owned());
                }
            } else if let Some(rest) = line.strip_prefix(b"retry:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) {
                    self.retry = std::str::from_utf8(rest).ok().and_then(|t| t.parse().ok());
                }
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if !self.data.is_empty() {
                    self.data.extend_from_slice(b"\n");
                }
                self.data.extend_from_slice(rest);
                if self.data.len() > self.max {
                    return Err(format!("an event exceeded {} bytes", self.max));
                }
            }
        }
        Ok(None)
    }
}

/// Sends what `each` makes of each event's data (nothing, to skip it) to
/// `out`, until the body ends or `out` closes.
pub async fn read_sse<B>(
    mut body: B,
    max: usize,
    out: &tokio::sync::mpsc::Sender<Bytes>,
    each: impl Fn(Bytes) -> Vec<Bytes>,
) -> Result<(), String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut dec = Decoder::new(max);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        dec.lines.push(&chunk);
        while let Some(ev) = dec.next_event()? {
            for m in each(ev) {
                if out.send(m).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// An SSE stream read one event at a time, remembering the last event id
/// and the server's reconnection time.
pub struct SseReader<B> {
    body: B,
    dec: Decoder,
    ended: bool,
}

impl<B> SseReader<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    pub fn new(body: B, max: usize) -> Self {
        SseReader {
            body,
            dec: Decoder::new(max),
            ended: false,
        }
    }

    /// The next event's data; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(ev) = self.dec.next_event()? {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                None => {
                    self.ended = true;
                    // An event the body ends without closing is dropped,
                    // as the standard says; its id does not count either.
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(e.to_string());
                }
                Some(Ok(frame)) => {
                    if let Ok(chunk) = frame.into_data() {
                        self.dec.lines.push(&chunk);
                    }
                }
            }
        }
    }

    /// The id of the last event dispatched (the `Last-Event-ID` to resume from).
    pub fn last_id(&self) -> Option<&str> {
        self.dec.last_id.as_deref()
    }

    /// The reconnection time the server set, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.dec.retry
    }
}

/// The data of every event in a whole SSE body (an event the body ends
/// without closing with a blank line counts too).
pub fn events(body: &[u8], max: usize) -> Result<Vec<Bytes>, String> {
    let mut dec = Decoder::new(max);
    dec.lines.push(body);
    dec.lines.push(b"\n\n");
    let mut out = Vec::new();
    while let Some(ev) = dec.next_event()? {
        out.push(ev);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_bodies() {
        let body = b": keep-alive\n\nid: 0\ndata:\n\nid: 1\nevent: message\ndata: {\"a\":1}\n\ndata: x\ndata: y";
        let evs = events(body, 100).expect("valid");
        assert_eq!(
            evs,
            vec![
                Bytes::from_static(b"{\"a\":1}"),
                Bytes::from_static(b"x\ny")
            ]
        );
        assert!(events(b"data: 0123456789\n\n", 4).is_err());
    }

    #[tokio::test]
    async fn ids_and_retry() {
        let body = http_body_util::Full::new(Bytes::from_static(
            b"id: p1\nretry: 500\ndata:\n\nevent: message\ndata: {\"a\":1}\n\nid: e2\ndata: x\n\nid: half\ndata: y",
        ));
        let mut r = SseReader::new(body, 100);
        assert_eq!(
            r.next().await.expect("ok"),
            Some(Bytes::from_static(b"{\"a\":1}"))
        );
        // The priming event set the id; an event without one keeps it.
        assert_eq!(r.last_id(), Some("p1"));
        assert_eq!(r.retry(), Some(500));
        assert_eq!(r.next().await.expect("ok"), Some(Bytes::from_static(b"x")));
        assert_eq!(r.last_id(), Some("e2"));
        // An event cut off by the end of the stream is not dispatched.
        assert_eq!(r.next().await.expect("ok"), None);
        assert_eq!(r.last_id(), Some("e2"));
    }
}
