//! Sessions for apps whose `spec.uri` is `mcp+http(s)://`: the agent speaks
//! Streamable HTTP to the upstream server (through the same bridge `psh`
//! uses) and relays newline-delimited JSON-RPC to the proxy.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use portico_mcp::LineBuffer;
use portico_mcp::bridge::{Bridge, BridgeConfig};
use portico_tunnel::TunnelBody;
use tokio::sync::mpsc;

/// The client's messages from the tunnel stream, one line at a time.
pub(crate) struct ClientLines {
    body: TunnelBody,
    lines: LineBuffer,
    max: usize,
}

impl ClientLines {
    pub(crate) fn new(body: TunnelBody, max: usize) -> Self {
        ClientLines {
            body,
            lines: LineBuffer::new(max),
            max,
        }
    }

    /// The next non-empty line, or why there is none (the reason the
    /// session ends).
    pub(crate) async fn next(&mut self) -> Result<Bytes, String> {
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) if line.is_empty() => continue,
                Ok(Some(line)) => return Ok(Bytes::copy_from_slice(&line)),
                Ok(None) => {}
                Err(_) => return Err(format!("a client message exceeded {} bytes", self.max)),
            }
            let Some(frame) = self.body.frame().await else {
                return Err("the session was closed by the client".to_string());
            };
            let Ok(frame) = frame else {
                return Err("the tunnel stream failed".to_string());
            };
            if let Ok(data) = frame.into_data() {
                self.lines.push(&data);
            }
        }
    }
}

/// Relays a session until the client closes it or the upstream ends it; returns the reason.
pub async fn relay(
    url: &str,
    connector: portico_tls::Connector,
    headers: portico_mcp::bridge::Headers,
    body: TunnelBody,
    out: mpsc::Sender<Bytes>,
    max: usize,
) -> String {
    let upstream = url.to_string();
    let bridge = Bridge::new(
        BridgeConfig {
            connector,
            headers,
            url: url.to_string(),
            token: None,
            max,
            replay: false,
            peer: "the upstream MCP server",
            notice: Arc::new(move |m: &str| tracing::warn!(upstream = %upstream, "{m}")),
        },
        out,
    );
    let mut lines = ClientLines::new(body, max);
    let reason = loop {
        let line = match lines.next().await {
            Ok(l) => l,
            Err(reason) => break reason,
        };
        if let Err(e) = bridge.handle(line.to_vec()).await {
            break e;
        }
    };
    bridge.finish().await;
    reason
}
