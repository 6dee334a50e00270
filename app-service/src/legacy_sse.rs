//! Sessions for apps whose `spec.uri` is `mcp+sse+http(s)://`: the older
//! HTTP+SSE transport. The agent opens the server's event stream (GET), waits
//! for its `endpoint` event (where to POST messages, on the same origin),
//! POSTs each client message there, and relays every `message` event back
//! to the proxy as one newline-delimited line.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico_mcp::bridge::Headers;
use portico_mcp::{LineBuffer, Message};
use portico_tunnel::TunnelBody;
use tokio::sync::mpsc;

type Http = Client<portico_tls::Connector, Full<Bytes>>;

/// One event of an SSE stream: its type (`message` unless named) and data.
struct Event {
    kind: String,
    data: String,
}

/// Assembles SSE events from bytes, each bounded by `max`.
struct Events {
    lines: LineBuffer,
    kind: Option<String>,
    data: String,
    max: usize,
}

impl Events {
    fn new(max: usize) -> Self {
        Events {
            lines: LineBuffer::new(max),
            kind: None,
            data: String::new(),
            max,
        }
    }

    fn next(&mut self) -> Result<Option<Event>, String> {
        while let Some(line) = self.lines.next_line().map_err(|e| e.to_string())? {
            let line = String::from_utf8_lossy(&line).to_string();
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.data.is_empty() && self.kind.is_none() {
                    continue;
                }
                let kind = self.kind.take().unwrap_or_else(|| "message".into());
                return Ok(Some(Event {
                    kind,
                    data: std::mem::take(&mut self.data),
                }));
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.kind = Some(value.to_string()),
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    if self.data.len() > self.max {
                        return Err(format!("an event exceeded {} bytes", self.max));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The URL messages are POSTed to: the `endpoint` event's path (or URL,
/// on the same origin only), against the stream's URL.
fn endpoint_url(stream: &str, endpoint: &str) -> Result<String, String> {
    let uri: hyper::Uri = stream.parse().map_err(|_| "the upstream URL is invalid")?;
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    let e = endpoint.trim();
    if e.starts_with("http://") || e.starts_with("https://") {
        if e == origin || e.starts_with(&format!("{origin}/")) {
            return Ok(e.to_string());
        }
        return Err(format!(
            "the upstream MCP server named a message endpoint on another origin ({e})"
        ));
    }
    if let Some(path) = e.strip_prefix('/') {
        return Ok(format!("{origin}/{path}"));
    }
    Err(format!(
        "the upstream MCP server sent an unusable endpoint ({e:?})"
    ))
}

fn request(
    method: hyper::Method,
    url: &str,
    headers: &Headers,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let mut b = headers.apply(hyper::Request::builder().method(method.clone()).uri(url));
    b = if method == hyper::Method::GET {
        b.header("accept", "text/event-stream")
    } else {
        b.header("content-type", "application/json")
    };
    b.body(Full::new(body))
        .map_err(|_| "cannot build a request to the upstream MCP server".to_string())
}

/// Relays a session until the client closes it or the upstream ends it;
/// returns the reason.
pub async fn relay(
    url: &str,
    connector: portico_tls::Connector,
    headers: Headers,
    body: TunnelBody,
    out: mpsc::Sender<Bytes>,
    max: usize,
) -> String {
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let Ok(get) = request(hyper::Method::GET, url, &headers, Bytes::new()) else {
        return "cannot build a request to the upstream MCP server".into();
    };
    let resp = match tokio::time::timeout(Duration::from_secs(30), http.request(get)).await {
        Err(_) => return "the upstream MCP server did not answer in 30 s".into(),
        Ok(Err(e)) => {
            return format!(
                "cannot reach the upstream MCP server: {}",
                portico_proto::client::source_text(&e)
            );
        }
        Ok(Ok(r)) if !r.status().is_success() => {
            return format!(
                "the upstream MCP server answered its event stream with HTTP {}",
                r.status().as_u16()
            );
        }
        Ok(Ok(r)) => r,
    };
    let mut stream = resp.into_body();
    let mut events = Events::new(max);
    // The endpoint comes first (within 30 s).
    let post_url = {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(ev) = events.next()? {
                    if ev.kind == "endpoint" {
                        return endpoint_url(url, &ev.data);
                    }
                    continue;
                }
                match stream.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            events.lines.push(&d);
                        }
                    }
                    _ => return Err("the upstream MCP server closed its event stream".into()),
                }
            }
        })
        .await;
        match found {
            Err(_) => return "the upstream MCP server sent no endpoint in 30 s".into(),
            Ok(Err(e)) => return e,
            Ok(Ok(u)) => u,
        }
    };
    // Server to client: every message event, canonical, one per line.
    let reader = tokio::spawn(async move {
        loop {
            while let Some(ev) = match events.next() {
                Ok(ev) => ev,
                Err(e) => return e,
            } {
                if ev.kind != "message" {
                    continue;
                }
                match Message::parse(ev.data.as_bytes()) {
                    Ok(m) => {
                        if out.send(m.to_bytes()).await.is_err() {
                            return "the session was closed by the client".to_string();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "dropped an upstream event that is not JSON-RPC")
                    }
                }
            }
            match stream.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        events.lines.push(&d);
                    }
                }
                _ => return "the upstream MCP server closed its event stream".to_string(),
            }
        }
    });
    // Client to server: each line, POSTed.
    let mut lines = crate::upstream::ClientLines::new(body, max);
    let writer = async {
        loop {
            let line = lines.next().await?;
            let req = request(hyper::Method::POST, &post_url, &headers, line)?;
            match tokio::time::timeout(Duration::from_secs(60), http.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => {}
                Ok(Ok(r)) => {
                    return Err(format!(
                        "the upstream MCP server refused a message with HTTP {}",
                        r.status().as_u16()
                    ));
                }
                Ok(Err(e)) => {
                    return Err(format!(
                        "cannot reach the upstream MCP server: {}",
                        portico_proto::client::source_text(&e)
                    ));
                }
                Err(_) => {
                    return Err("the upstream MCP server did not take a message in 60 s".into());
                }
            }
        }
    };
    let abort = reader.abort_handle();
    let reason = tokio::select! {
        r = writer => r.unwrap_or_else(|e: String| e),
        r = reader => r.unwrap_or_else(|_| "the upstream relay failed".into()),
    };
    abort.abort();
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_stay_on_their_origin() {
        let s = "http://127.0.0.1:3001/sse";
        assert_eq!(
            endpoint_url(s, "/message?sessionId=1").as_deref(),
            Ok("http://127.0.0.1:3001/message?sessionId=1")
        );
        assert!(endpoint_url(s, "http://127.0.0.1:3001/m").is_ok());
        assert!(endpoint_url(s, "http://evil.example/m").is_err());
        assert!(endpoint_url(s, "http://127.0.0.1:30011/m").is_err());
        assert!(endpoint_url(s, "m").is_err());
    }

    #[test]
    fn events_have_types() {
        let mut e = Events::new(1024);
        e.lines
            .push(b"event: endpoint\ndata: /message?x=1\n\n: comment\n\ndata: {\"a\":1}\n\n");
        let a = e.next().expect("ok").expect("event");
        assert_eq!(
            (a.kind.as_str(), a.data.as_str()),
            ("endpoint", "/message?x=1")
        );
        let b = e.next().expect("ok").expect("event");
        assert_eq!((b.kind.as_str(), b.data.as_str()), ("message", "{\"a\":1}"));
        assert!(e.next().expect("ok").is_none());
    }
}
