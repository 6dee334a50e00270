//! Sessions for apps whose `spec.uri` is `mcp+http://`: the agent speaks
//! Streamable HTTP to the upstream server and relays newline-delimited
//! JSON-RPC to the proxy, as it does for stdio processes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portico_proto::sse::read_sse;
use tokio::sync::mpsc;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Upstream {
    http: HttpClient,
    url: String,
    session: Mutex<Option<String>>,
    /// Messages for the client, one JSON-RPC message each.
    out: mpsc::Sender<Bytes>,
    max: usize,
}

fn peek(line: &[u8]) -> (Option<String>, Option<String>) {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
    (
        v.get("id").filter(|i| !i.is_null()).map(|i| i.to_string()),
        v.get("method").and_then(|m| m.as_str()).map(String::from),
    )
}

fn rpc_error(id: &str, msg: &str) -> Bytes {
    let m = serde_json::to_string(msg).unwrap_or_else(|_| "\"error\"".into());
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32000,"message":{m}}}}}"#
    ))
}

impl Upstream {
    fn session(&self) -> Option<String> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn send(
        &self,
        method: hyper::Method,
        body: Option<Bytes>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(&self.url)
            .header("accept", "application/json, text/event-stream");
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        if let Some(s) = self.session() {
            b = b.header("mcp-session-id", s);
        }
        let req = b
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(60), self.http.request(req))
            .await
            .map_err(|_| "the upstream MCP server did not answer in 60 s".to_string())?
            .map_err(|e| {
                format!(
                    "cannot reach the upstream MCP server: {}",
                    portico_proto::client::source_text(&e)
                )
            })
    }

    /// Relays one body (JSON or SSE) to the client.
    async fn deliver(self: Arc<Self>, resp: hyper::Response<Incoming>, id: Option<String>) {
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status == hyper::StatusCode::ACCEPTED {
            return;
        }
        if status.is_success() && ctype.starts_with("text/event-stream") {
            if let Err(e) = read_sse(resp.into_body(), self.max, &self.out, |_| false).await {
                tracing::warn!(upstream = %self.url, error = %e, "upstream event stream broke");
            }
            return;
        }
        let body = http_body_util::Limited::new(resp.into_body(), self.max)
            .collect()
            .await
            .map(|b| b.to_bytes());
        match (status.is_success(), body, id) {
            (true, Ok(b), _) if !b.is_empty() => {
                let _ = self.out.send(b).await;
            }
            (_, _, Some(id)) => {
                let _ = self
                    .out
                    .send(rpc_error(
                        &id,
                        &format!("the upstream MCP server answered HTTP {}", status.as_u16()),
                    ))
                    .await;
            }
            _ => {}
        }
    }

    /// Keeps the upstream's GET stream open for server-initiated messages.
    async fn listen(self: Arc<Self>) {
        let mut attempt = 0u32;
        while self.session().is_some() && !self.out.is_closed() {
            match self.send(hyper::Method::GET, None).await {
                Ok(r) if r.status().is_success() => {
                    attempt = 0;
                    let _ = read_sse(r.into_body(), self.max, &self.out, |_| false).await;
                }
                Ok(r) if r.status() == hyper::StatusCode::METHOD_NOT_ALLOWED => return,
                _ => {}
            }
            attempt = (attempt + 1).min(6);
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }

    async fn forward(self: &Arc<Self>, line: Bytes) -> Result<(), String> {
        let (id, method) = peek(&line);
        let had_session = self.session().is_some();
        let resp = match self.send(hyper::Method::POST, Some(line)).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(id) = id {
                    let _ = self.out.send(rpc_error(&id, &e)).await;
                }
                return Ok(());
            }
        };
        if resp.status() == hyper::StatusCode::NOT_FOUND && had_session {
            return Err("the upstream MCP server ended the session".into());
        }
        if method.as_deref() == Some("initialize") && resp.status().is_success() {
            let sid = resp
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let listen = sid.is_some();
            *self.session.lock().unwrap_or_else(|p| p.into_inner()) = sid;
            if listen {
                tokio::spawn(self.clone().listen());
            }
        }
        tokio::spawn(self.clone().deliver(resp, id));
        Ok(())
    }
}

/// Relays a session until the client closes it or the upstream ends it; returns the reason.
pub async fn relay(url: &str, mut body: Incoming, out: mpsc::Sender<Bytes>, max: usize) -> String {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(Duration::from_secs(10)));
    conn.set_nodelay(true);
    let up = Arc::new(Upstream {
        http: Client::builder(TokioExecutor::new()).build(conn),
        url: url.to_string(),
        session: Mutex::new(None),
        out,
        max,
    });
    let mut buf = BytesMut::new();
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
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.is_empty() {
                continue;
            }
            if let Err(e) = up.forward(line.freeze()).await {
                break 'outer e;
            }
        }
        if buf.len() > max {
            break format!("a client message exceeded {max} bytes");
        }
    };
    if up.session().is_some() {
        let _ = up.send(hyper::Method::DELETE, None).await;
        *up.session.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    reason
}
