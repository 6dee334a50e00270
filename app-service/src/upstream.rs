//! Sessions for apps whose `spec.uri` is `mcp+http(s)://`: the agent speaks
//! Streamable HTTP to the upstream server (through the same bridge `psh`
//! uses) and relays newline-delimited JSON-RPC to the proxy.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portico_mcp::LineBuffer;
use portico_mcp::bridge::{Bridge, BridgeConfig};
use tokio::sync::mpsc;

/// Relays a session until the client closes it or the upstream ends it; returns the reason.
pub async fn relay(
    url: &str,
    connector: portico_tls::Connector,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    mut body: Incoming,
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
    let mut lines = LineBuffer::new(max);
    let reason = 'outer: loop {
        let Some(frame) = body.frame().await else {
            break "the session was closed by the client".to_string();
        };
        let Ok(frame) = frame else {
            break "the tunnel stream failed".to_string();
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        lines.push(&data);
        loop {
            match lines.next_line() {
                Ok(Some(line)) if line.is_empty() => {}
                Ok(Some(line)) => {
                    if let Err(e) = bridge.handle(line.to_vec()).await {
                        break 'outer e;
                    }
                }
                Ok(None) => break,
                Err(_) => break 'outer format!("a client message exceeded {max} bytes"),
            }
        }
    };
    bridge.finish().await;
    reason
}
