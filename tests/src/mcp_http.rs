//! A plain MCP Streamable HTTP client for tests that need to see statuses,
//! headers and raw messages.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

pub struct McpHttp {
    client: Client<portico_tls::Connector, Full<Bytes>>,
    pub url: String,
    pub token: String,
    pub session: Option<String>,
    /// What POSTs accept: both answer forms, unless `sse_only`.
    accept: &'static str,
    next_id: i64,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

impl Reply {
    /// The JSON-RPC messages of an SSE or JSON body.
    pub fn messages(&self) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.body);
        if self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .starts_with("text/event-stream")
        {
            portico_mcp::sse::events(&self.body, usize::MAX)
                .unwrap_or_default()
                .iter()
                .map(|ev| serde_json::from_slice(ev).unwrap_or(Value::Null))
                .collect()
        } else if text.trim().is_empty() {
            vec![]
        } else {
            vec![serde_json::from_str(&text).unwrap_or(Value::Null)]
        }
    }

    pub fn response(&self, id: i64) -> Value {
        self.messages()
            .into_iter()
            .find(|m| m["id"] == json!(id) && m.get("method").is_none())
            .unwrap_or_else(|| {
                panic!(
                    "no response {id} in {} {:?}",
                    self.status,
                    String::from_utf8_lossy(&self.body)
                )
            })
    }
}

impl McpHttp {
    pub fn new(proxy: std::net::SocketAddr, app: &str, token: &str) -> McpHttp {
        McpHttp {
            client: Client::builder(TokioExecutor::new()).build(crate::web::connector(proxy)),
            url: format!("{}/mcp/{app}", crate::web::base(proxy)),
            token: token.to_string(),
            session: None,
            accept: "application/json, text/event-stream",
            next_id: 0,
        }
    }

    /// Speaks HTTP/1.1 to the proxy at `proxy`, as most MCP clients do.
    pub fn http1(mut self, proxy: std::net::SocketAddr) -> McpHttp {
        self.client = Client::builder(TokioExecutor::new()).build(crate::web::connector_h1(proxy));
        self
    }

    /// Speaks HTTP/2 to the proxy at `proxy`: chosen by ALPN over TLS, with
    /// prior knowledge (h2c) over plain HTTP.
    pub fn http2(mut self, proxy: std::net::SocketAddr) -> McpHttp {
        self.client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(crate::web::connector(proxy));
        self
    }

    /// POSTs accept only `text/event-stream`: every answer comes as SSE.
    pub fn sse_only(mut self) -> McpHttp {
        self.accept = "text/event-stream";
        self
    }

    pub async fn send(
        &self,
        method: http::Method,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let mut b = http::Request::builder().method(method).uri(&self.url);
        let mut has_auth = false;
        for (k, v) in headers {
            has_auth |= k.eq_ignore_ascii_case("authorization");
            b = b.header(*k, *v);
        }
        if !has_auth && !self.token.is_empty() {
            b = b.header("authorization", format!("Bearer {}", self.token));
        }
        if let Some(s) = &self.session
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id"))
        {
            b = b.header("mcp-session-id", s);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
            .await
            .expect("answer in 60 s")
            .expect("http");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
            .await
            .expect("body in 60 s")
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A POST that reports failures (no connection, no answer within
    /// `within`) instead of panicking: for runners that expect faults.
    pub async fn try_post(&self, msg: &Value, within: Duration) -> Result<Reply, String> {
        let mut b = http::Request::post(&self.url)
            .header("content-type", "application/json")
            .header("accept", self.accept);
        if !self.token.is_empty() {
            b = b.header("authorization", format!("Bearer {}", self.token));
        }
        if let Some(s) = &self.session {
            b = b.header("mcp-session-id", s);
        }
        let req = b
            .body(Full::new(Bytes::from(msg.to_string())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut cur: &dyn std::error::Error = &e;
                while let Some(next) = cur.source() {
                    cur = next;
                }
                format!("no answer: {cur}")
            })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("the answer broke off: {e}"))?;
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(within, exchange)
            .await
            .map_err(|_| "HUNG".to_string())?
    }

    /// Ends the session if it can, within 5 s, reporting nothing.
    pub async fn send_delete_quietly(&self) {
        let Some(s) = &self.session else { return };
        let Ok(req) = http::Request::delete(&self.url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("mcp-session-id", s)
            .body(Full::new(Bytes::new()))
        else {
            return;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await;
    }

    pub async fn post(&self, msg: &Value) -> Reply {
        self.send(
            http::Method::POST,
            &[
                ("content-type", "application/json"),
                ("accept", self.accept),
            ],
            Some(&msg.to_string()),
        )
        .await
    }

    /// initialize + notifications/initialized; returns the initialize result.
    pub async fn initialize(&mut self) -> Result<Value, Reply> {
        let r = self
            .post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "portico-e2e", "version": "1"}}}))
            .await;
        if r.status != StatusCode::OK {
            return Err(r);
        }
        self.session = r
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let result = r.response(0)["result"].clone();
        let n = self
            .post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(
            n.status,
            StatusCode::ACCEPTED,
            "{:?}",
            String::from_utf8_lossy(&n.body)
        );
        Ok(result)
    }

    /// Sends a request and returns its response message.
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let r = self
            .post(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{method}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r.response(id)
    }

    pub async fn call(&mut self, tool: &str, args: Value) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": args}))
            .await
    }

    pub async fn delete(&self) -> Reply {
        self.send(http::Method::DELETE, &[], None).await
    }
}
