//! Reading Server-Sent Events with a bound on the size of one event.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

/// Sends the data of each event to `out`, except events `skip` rejects,
/// until the body ends or `out` closes.
pub async fn read_sse<B>(
    mut body: B,
    max: usize,
    out: &tokio::sync::mpsc::Sender<Bytes>,
    skip: impl Fn(&[u8]) -> bool,
) -> Result<(), String>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
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
            }
            if data.len() > max {
                return Err(format!("an event exceeded {max} bytes"));
            }
        }
        if buf.len() > max {
            return Err(format!("an event exceeded {max} bytes"));
        }
    }
    Ok(())
}
