//! Reading Server-Sent Events with a bound on the size of one event. Only
//! `data:` fields make up a message; comments, `id:`, `event:` and `retry:`
//! lines and empty "priming" events are passed over. One decoder serves
//! streams read as they arrive and bodies read whole.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::framing::LineBuffer;

/// Assembles events from lines.
struct Decoder {
    lines: LineBuffer,
    data: BytesMut,
    max: usize,
}

impl Decoder {
    fn new(max: usize) -> Self {
        Decoder {
            lines: LineBuffer::new(max),
            data: BytesMut::new(),
            max,
        }
    }

    /// The next complete event's data, `None` when more bytes are needed.
    fn next_event(&mut self) -> Result<Option<Bytes>, String> {
        while let Some(line) = self.lines.next_line().map_err(|e| e.to_string())? {
            if line.is_empty() {
                if !self.data.is_empty() {
                    return Ok(Some(self.data.split().freeze()));
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
}
