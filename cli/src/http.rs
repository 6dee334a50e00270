//! A small HTTP client for the proxy's REST routes (HTTPS, with timeouts).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico_tls::{Connector, Trust};

use crate::{CliResult, Fail};

pub type HttpClient = Client<Connector, Full<Bytes>>;

/// A connector for `proxy` (plain only for an explicit `http://` URL).
pub fn connector(proxy: &str, trust: &Trust) -> CliResult<Connector> {
    if proxy.trim().starts_with("http://") {
        return Ok(Connector::plain());
    }
    let cfg = portico_tls::config::client_for(trust, &[b"h2", b"http/1.1"]).map_err(Fail::new)?;
    Ok(Connector::tls(cfg))
}

pub fn client(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The proxy's base URL: `https://` unless it was given as `http://`.
pub fn base_url(proxy: &str) -> String {
    if proxy.starts_with("http://") || proxy.starts_with("https://") {
        proxy.trim_end_matches('/').to_string()
    } else {
        format!("https://{proxy}")
    }
}

/// GET a JSON document with the bearer token: its body, once the status
/// says success (otherwise the error the proxy gave).
pub async fn get_body(c: &HttpClient, url: &str, token: &str) -> CliResult<Bytes> {
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
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            Fail::new(format!(
                "{url} answered {status} with something that is not JSON"
            ))
        })?;
        let msg = v["error"]["message"].as_str().unwrap_or("request failed");
        return Err(Fail::new(format!("{msg} (HTTP {})", status.as_u16())));
    }
    Ok(body)
}

pub async fn read_limited(body: Incoming, max: usize) -> CliResult<Bytes> {
    http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| Fail::new(format!("cannot read the response: {e}")))
}
