//! A server's tools as one user sees them: a short MCP session opened as
//! that user through the proxy's own MCP endpoint (the same routing, RBAC
//! filtering and audit as any client's), ended as soon as the list is read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::any;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::ProxyState;
use crate::mcp::SESSION_HEADER;

/// How long the whole listing may take.
const DEADLINE: Duration = Duration::from_secs(15);
/// Pages of `tools/list` read at most, and tools shown at most.
const MAX_PAGES: usize = 20;
const MAX_TOOLS: usize = 2000;
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Serialize)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// Argument names, required ones marked with `*`.
    pub args: Vec<String>,
}

pub async fn list(
    state: &Arc<ProxyState>,
    token: &str,
    app: &str,
    peer: SocketAddr,
) -> Result<Vec<Tool>, String> {
    let mut s = Client {
        router: Router::new()
            .route("/mcp/{app}", any(crate::mcp::handle))
            .with_state(state.clone()),
        path: format!("/mcp/{app}"),
        token: token.to_string(),
        peer,
        session: None,
        version: None,
    };
    let result = tokio::time::timeout(DEADLINE, s.tools()).await;
    // The session ends whatever happened.
    if s.session.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.send(Method::DELETE, None)).await;
    }
    match result {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the MCP server did not answer within {} s",
            DEADLINE.as_secs()
        )),
    }
}

struct Client {
    router: Router,
    path: String,
    token: String,
    peer: SocketAddr,
    session: Option<String>,
    version: Option<String>,
}

impl Client {
    async fn tools(&mut self) -> Result<Vec<Tool>, String> {
        let init = self
            .call(
                1,
                "initialize",
                json!({
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "portico-web", "version": env!("CARGO_PKG_VERSION")},
                }),
            )
            .await?;
        self.version = init
            .get("protocolVersion")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let resp = self.send(Method::POST, Some(note)).await?;
        if !resp.status().is_success() {
            return Err(format!("the session was refused ({})", resp.status()));
        }
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for page in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let result = self.call(2 + page as i64, "tools/list", params).await?;
            for t in result
                .get("tools")
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
            {
                if tools.len() >= MAX_TOOLS {
                    break;
                }
                tools.push(tool(t));
            }
            cursor = result
                .get("nextCursor")
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if cursor.is_none() || tools.len() >= MAX_TOOLS {
                break;
            }
        }
        Ok(tools)
    }

    async fn send(
        &self,
        method: Method,
        body: Option<Value>,
    ) -> Result<http::Response<Body>, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(&self.path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::ACCEPT, "application/json, text/event-stream");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(s) = &self.session {
            req = req.header(SESSION_HEADER, s);
        }
        if let Some(v) = &self.version {
            req = req.header("mcp-protocol-version", v);
        }
        let body = body
            .map(|b| Body::from(b.to_string()))
            .unwrap_or_else(Body::empty);
        let mut req = req.body(body).map_err(|e| e.to_string())?;
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.router
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends a request and returns its result (an error answer is the
    /// error's message).
    async fn call(&mut self, id: i64, method: &str, params: Value) -> Result<Value, String> {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let resp = self.send(Method::POST, Some(msg)).await?;
        if let Some(s) = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.session = Some(s.to_string());
        }
        let status = resp.status();
        let sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let answer = if sse {
            answer_in_stream(resp.into_body(), id).await?
        } else {
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|_| format!("the proxy answered {status} with a body that is not JSON"))?
        };
        if let Some(e) = answer.get("error") {
            let message = e
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("an error without a message");
            return Err(message.to_string());
        }
        if status != StatusCode::OK {
            return Err(format!("the proxy answered {status}"));
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| "the answer had no result".to_string())
    }
}

/// The message answering `id` in an SSE response (others, such as
/// notifications the server sends first, are passed over).
async fn answer_in_stream(body: Body, id: i64) -> Result<Value, String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let reader = tokio::spawn(async move {
        let _ = portico_mcp::sse::read_sse(body, MAX_BODY, &tx, |m| vec![m]).await;
    });
    let mut found = None;
    while let Some(m) = rx.recv().await {
        let Ok(v) = serde_json::from_slice::<Value>(&m) else {
            continue;
        };
        if v.get("id").and_then(|i| i.as_i64()) == Some(id)
            && (v.get("result").is_some() || v.get("error").is_some())
        {
            found = Some(v);
            break;
        }
    }
    reader.abort();
    found.ok_or_else(|| "the stream ended without an answer".to_string())
}

fn tool(t: &Value) -> Tool {
    let schema = t.get("inputSchema");
    let required: Vec<&str> = schema
        .and_then(|s| s.get("required"))
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let args = schema
        .and_then(|s| s.get("properties"))
        .and_then(|p| p.as_object())
        .map(|p| {
            p.keys()
                .map(|k| {
                    if required.contains(&k.as_str()) {
                        format!("{k}*")
                    } else {
                        k.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let text = |k: &str| {
        t.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Tool {
        name: text("name"),
        description: text("description"),
        args,
    }
}
