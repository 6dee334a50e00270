//! Reading Server-Sent Events with a bound on the size of one event. Only
//! `data:` fields make up a message; comments, `id:`, `event:` and `retry:`
//! lines and empty "priming" events are passed over.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::framing::LineBuffer;

/// Sends the data of each event to `out`, except events `skip` rejects,
/// until the body ends or `out` closes.
pub async fn read_sse<B>(
    mut body: B,
    max: usize,
    out: &tokio::sync::mpsc::Sender<Bytes>,
    skip: impl Fn(&[u8]) -> bool,
) -> Result<(), String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut lines = LineBuffer::new(max);
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        lines.push(&chunk);
        while let Some(line) = lines.next_line().map_err(|e| e.to_string())? {
            if line.is_empty() {
                if !data.is_empty() {
                    let ev = data.split().freeze();
                    if !skip(&ev) && out.send(ev).await.is_err() {
                        return Ok(());
                    }
                }
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if !data.is_empty() {
                    data.extend_from_slice(b"\n");
                }
                data.extend_from_slice(rest);
                if data.len() > max {
                    return Err(format!("an event exceeded {max} bytes"));
                }
            }
        }
    }
    Ok(())
}
