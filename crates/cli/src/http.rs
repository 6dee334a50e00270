//! A small HTTP client for the proxy (plain HTTP/1.1 with timeouts) and a
//! bounded Server-Sent Events reader.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::{CliResult, Fail};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

pub fn base_url(proxy: &str) -> String {
    if proxy.starts_with("http://") || proxy.starts_with("https://") {
        proxy.trim_end_matches('/').to_string()
    } else {
        format!("http://{proxy}")
    }
}

/// GET a JSON document with the bearer token.
pub async fn get_json(c: &HttpClient, url: &str, token: &str) -> CliResult<serde_json::Value> {
    let req = hyper::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| Fail::new(format!("bad request: {e}")))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .map_err(|_| Fail::new(format!("{url} did not answer in 30 s")))?
        .map_err(|e| {
            Fail::new(format!(
                "cannot reach {url}: {}",
                portico_proto::client::source_text(&e)
            ))
        })?;
    let status = resp.status();
    let body = read_limited(resp.into_body(), 64 * 1024 * 1024).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
        Fail::new(format!(
            "{url} answered {status} with something that is not JSON"
        ))
    })?;
    if !status.is_success() {
        let msg = v["error"]["message"].as_str().unwrap_or("request failed");
        return Err(Fail::new(format!("{msg} (HTTP {})", status.as_u16())));
    }
    Ok(v)
}

pub async fn read_limited(body: Incoming, max: usize) -> CliResult<Bytes> {
    http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| Fail::new(format!("cannot read the response: {e}")))
}

/// Reads SSE events from a body and sends each event's data to `out`,
/// except events for which `skip` returns true.
pub async fn read_sse(
    mut body: Incoming,
    max: usize,
    out: &tokio::sync::mpsc::Sender<Bytes>,
    skip: impl Fn(&[u8]) -> bool,
) -> Result<(), String> {
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
