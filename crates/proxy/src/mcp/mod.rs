//! The MCP Streamable HTTP endpoint, `/mcp/{app}`: POST, GET and DELETE as
//! the 2025-03-26, 2025-06-18 and 2025-11-25 revisions specify, with
//! sessions issued here and bound to the user who created them.

// Handlers return ready-made HTTP responses as their errors.
#![allow(clippy::result_large_err)]

pub mod jsonrpc;
pub mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use portico_agent::tunnel::{H_APP, H_SESSION, H_USER};
use portico_core::AccessChecker;
use portico_core::rbac::preset_roles;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;

use self::jsonrpc::{INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, SERVER_ERROR, peek};
use self::session::{Asked, Session};
use crate::ProxyState;
use crate::authn::bearer;

pub const SESSION_HEADER: &str = "mcp-session-id";

/// An HTTP error whose body is a JSON-RPC error with a null id.
pub fn rpc_error(status: StatusCode, code: i64, message: &str) -> Response {
    let mut r = Response::new(Body::from(jsonrpc::error(None, code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portico\""),
        );
    }
    r
}

/// The caller and their current permissions.
pub struct Who {
    pub name: String,
    pub checker: Arc<AccessChecker>,
}

/// Authenticates a user (or the local admin) and loads their live permissions.
pub async fn who(state: &ProxyState, headers: &HeaderMap) -> Result<Who, Response> {
    let Some(token) = bearer(headers) else {
        return Err(rpc_error(
            StatusCode::UNAUTHORIZED,
            SERVER_ERROR,
            "authentication required: send Authorization: Bearer <token> (psh login gives you one)",
        ));
    };
    let caller = state.authn.resolve(token).await.map_err(|e| {
        let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
        let status = if status == StatusCode::FORBIDDEN {
            StatusCode::UNAUTHORIZED
        } else {
            status
        };
        rpc_error(status, SERVER_ERROR, &e.message)
    })?;
    let checker = match caller.ptype.as_str() {
        "admin" => Arc::new(AccessChecker::new(preset_roles().iter().take(1))),
        "user" => state.cache.checker(&caller.name).ok_or_else(|| {
            rpc_error(
                StatusCode::UNAUTHORIZED,
                SERVER_ERROR,
                &format!("user {:?} no longer exists", caller.name),
            )
        })?,
        _ => {
            return Err(rpc_error(
                StatusCode::FORBIDDEN,
                SERVER_ERROR,
                "services cannot open MCP sessions",
            ));
        }
    };
    Ok(Who {
        name: caller.name,
        checker,
    })
}

fn origin_allowed(state: &ProxyState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if state
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o == origin)
    {
        return true;
    }
    let origin_host = origin
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let bare = |h: &str| {
        h.rsplit_once(':')
            .map(|(a, _)| a.to_string())
            .unwrap_or_else(|| h.to_string())
    };
    origin_host == host || (is_loopback(&bare(origin_host)) && is_loopback(&bare(host)))
}

fn is_loopback(h: &str) -> bool {
    h == "localhost" || h == "[::1]" || h.starts_with("127.")
}

fn accepts(headers: &HeaderMap, what: &str) -> bool {
    let Some(a) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    a.split(',')
        .map(|p| p.split(';').next().unwrap_or("").trim())
        .any(|m| m == what || m == "*/*")
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

/// The session a request names, if it exists, belongs to the caller and this app.
fn find_session(
    state: &ProxyState,
    headers: &HeaderMap,
    who: &Who,
    app: &str,
) -> Result<Arc<Session>, Response> {
    let Some(id) = session_id(headers) else {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            "Mcp-Session-Id header is required; send initialize first",
        ));
    };
    match state.sessions.get(id) {
        Some(s) if s.user == who.name && s.app == app && s.closed().is_none() => Ok(s),
        _ => Err(rpc_error(
            StatusCode::NOT_FOUND,
            SERVER_ERROR,
            "session not found or ended; initialize a new session",
        )),
    }
}

pub async fn handle(
    State(state): State<Arc<ProxyState>>,
    Path(app): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let method = req.method().clone();
    if !matches!(method, Method::POST | Method::GET | Method::DELETE) {
        let mut r = rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            SERVER_ERROR,
            "use POST, GET or DELETE",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        return r;
    }
    if !origin_allowed(&state, req.headers()) {
        return rpc_error(StatusCode::FORBIDDEN, SERVER_ERROR, "origin not allowed");
    }
    let who = match who(&state, req.headers()).await {
        Ok(w) => w,
        Err(r) => {
            state
                .metrics
                .denied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return r;
        }
    };
    let Some(app_res) = state.cache.app(&app) else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            SERVER_ERROR,
            &format!("no MCP server named {app:?}"),
        );
    };
    if !who.checker.app_allowed(&app_res.metadata.labels) {
        state.audit.emit(
            "mcp.session.request",
            false,
            serde_json::json!({"user": who.name, "app": app, "error": "access to the MCP server denied by RBAC"}),
        );
        return rpc_error(
            StatusCode::FORBIDDEN,
            SERVER_ERROR,
            &format!("access denied: your roles do not allow the MCP server {app:?}"),
        );
    }
    match method {
        Method::POST => post(state, who, app, req).await,
        Method::GET => get(state, who, app, req.headers()),
        _ => delete(state, who, app, req.headers()).await,
    }
}

fn get(state: Arc<ProxyState>, who: Who, app: String, headers: &HeaderMap) -> Response {
    if !accepts(headers, "text/event-stream") {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            SERVER_ERROR,
            "GET needs Accept: text/event-stream",
        );
    }
    let s = match find_session(&state, headers, &who, &app) {
        Ok(s) => s,
        Err(r) => return r,
    };
    s.touch();
    sse_response(s.open_get(), &s.id)
}

async fn delete(state: Arc<ProxyState>, who: Who, app: String, headers: &HeaderMap) -> Response {
    let s = match find_session(&state, headers, &who, &app) {
        Ok(s) => s,
        Err(r) => return r,
    };
    s.end(&state, "the client ended the session").await;
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::empty())
        .unwrap_or_default()
}

async fn post(
    state: Arc<ProxyState>,
    who: Who,
    app: String,
    req: axum::extract::Request,
) -> Response {
    let headers = req.headers().clone();
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return rpc_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            SERVER_ERROR,
            "POST bodies must be Content-Type: application/json",
        );
    }
    if !accepts(&headers, "text/event-stream") && !accepts(&headers, "application/json") {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            SERVER_ERROR,
            "Accept must include application/json and text/event-stream",
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), state.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    SERVER_ERROR,
                    &format!("the body exceeds {} bytes", state.max_body),
                );
            }
            return rpc_error(
                StatusCode::BAD_REQUEST,
                SERVER_ERROR,
                "cannot read the request body",
            );
        }
    };
    let msgs = match jsonrpc::split_body(&body) {
        Ok(m) => m,
        Err(e) => {
            state.audit.emit("mcp.session.request", false, serde_json::json!({"user": who.name, "app": app, "error": format!("parse error: {e}")}));
            return rpc_error(
                StatusCode::BAD_REQUEST,
                PARSE_ERROR,
                &format!("parse error: {e}"),
            );
        }
    };
    let mut peeks = Vec::with_capacity(msgs.len());
    for m in &msgs {
        match peek(m) {
            Ok(p) => peeks.push(p),
            Err(e) => {
                state.audit.emit("mcp.session.request", false, serde_json::json!({"user": who.name, "app": app, "error": format!("invalid request: {e}")}));
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    INVALID_REQUEST,
                    &format!("invalid request: {e}"),
                );
            }
        }
    }
    let init = peeks
        .iter()
        .position(|p| p.method.as_deref() == Some("initialize") && p.id.is_some());
    let session = match init {
        Some(i) => match open_session(&state, &who, &app).await {
            Ok(s) => {
                let (name, version, proto) = jsonrpc::client_info(&msgs[i]);
                state.audit.emit(
                    "mcp.session.start",
                    true,
                    serde_json::json!({
                        "user": who.name, "app": app, "agent": s.agent, "session": s.id,
                        "client_name": name, "client_version": version, "protocol_version": proto,
                    }),
                );
                s
            }
            Err(r) => return r,
        },
        None => match find_session(&state, &headers, &who, &app) {
            Ok(s) => s,
            Err(r) => return r,
        },
    };
    session.touch();
    let has_requests = peeks.iter().any(|p| p.is_request());
    let stream = has_requests.then(|| session.open_stream());
    let stream_tx = stream
        .as_ref()
        .and_then(|(id, _)| session.stream_sender(*id));
    let app_labels = state
        .cache
        .app(&app)
        .map(|a| a.metadata.labels.clone())
        .unwrap_or_default();
    let checker = state
        .cache
        .checker(&who.name)
        .unwrap_or_else(|| who.checker.clone());
    let mut forward = Vec::with_capacity(msgs.len());
    let mut denied = Vec::new();
    let mut forwarded_ids = Vec::new();
    for (msg, p) in msgs.into_iter().zip(peeks.iter()) {
        if let (true, Some((sid, _)), Some(id)) = (p.is_request(), stream.as_ref(), p.id.clone()) {
            let asked = match p.method.as_deref() {
                Some("tools/call") => {
                    let tool = jsonrpc::tool_name(&msg).unwrap_or_default();
                    if let Err(why) = checker.tool_allowed(&app_labels, &tool) {
                        state.audit.emit(
                            "mcp.session.request",
                            false,
                            serde_json::json!({"user": who.name, "app": app, "session": session.id, "method": "tools/call", "tool": tool, "allowed": false, "error": why}),
                        );
                        denied.push(Bytes::from(jsonrpc::error(Some(&id), INVALID_PARAMS, &why)));
                        continue;
                    }
                    Asked::ToolsCall(tool)
                }
                Some("tools/list") => Asked::ToolsList,
                Some("initialize") => Asked::Initialize,
                _ => Asked::Other,
            };
            session.expect(id.clone(), *sid, asked);
            forwarded_ids.push(id);
        }
        forward.push(msg);
    }
    for m in forward {
        if let Err(why) = session.send_to_agent(m).await {
            // Nothing will answer these now: answer them here and stop waiting.
            session.forget(&forwarded_ids);
            for id in &forwarded_ids {
                denied.push(Bytes::from(jsonrpc::error(Some(id), SERVER_ERROR, &why)));
            }
            if stream.is_none() {
                return rpc_error(StatusCode::NOT_FOUND, SERVER_ERROR, &why);
            }
            break;
        }
    }
    let Some((sid, rx)) = stream else {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        return with_session(r, &session.id);
    };
    if let Some(tx) = &stream_tx {
        for d in denied {
            let _ = tx.send(d).await;
        }
    }
    drop(stream_tx);
    session.release_stream_if_done(sid);
    sse_response(rx, &session.id)
}

fn with_session(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

/// An SSE response streaming one event per message, with keep-alive comments.
fn sse_response(rx: mpsc::Receiver<Bytes>, session: &str) -> Response {
    let keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(15),
        Duration::from_secs(15),
    );
    let stream =
        futures_util::stream::unfold((rx, 0u64, keepalive), |(mut rx, n, mut ka)| async move {
            tokio::select! {
                m = rx.recv() => {
                    let m = m?;
                    let mut ev = Vec::with_capacity(m.len() + 40);
                    ev.extend_from_slice(format!("id: {n}\nevent: message\ndata: ").as_bytes());
                    ev.extend_from_slice(&m);
                    ev.extend_from_slice(b"\n\n");
                    Some((Ok::<_, Infallible>(Bytes::from(ev)), (rx, n + 1, ka)))
                }
                _ = ka.tick() => Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (rx, n, ka))),
            }
        });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_session(r, session)
}

/// Opens a session on a random healthy agent serving `app`, trying the next on a dial failure.
async fn open_session(
    state: &Arc<ProxyState>,
    who: &Who,
    app: &str,
) -> Result<Arc<Session>, Response> {
    if state.sessions.count_for(&who.name) >= state.max_sessions_per_user {
        return Err(rpc_error(
            StatusCode::TOO_MANY_REQUESTS,
            SERVER_ERROR,
            &format!(
                "you have {} open sessions, the most allowed; end some (DELETE) first",
                state.max_sessions_per_user
            ),
        ));
    }
    let mut hosts: Vec<String> = state
        .cache
        .servers(app)
        .into_iter()
        .filter(|h| state.tunnels.is_connected(h))
        .collect();
    if hosts.is_empty() {
        return Err(rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            &format!("no agent is serving the MCP server {app:?} right now"),
        ));
    }
    hosts.shuffle(&mut rand::rng());
    let id = random_session_id();
    for host in hosts {
        let Some(mut sender) = state.tunnels.sender(&host) else {
            continue;
        };
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(256);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        let req = match http::Request::post("http://agent/v1/session")
            .header(H_APP, app)
            .header(H_SESSION, &id)
            .header(H_USER, &who.name)
            .body(body)
        {
            Ok(r) => r,
            Err(_) => continue,
        };
        let attempt = async {
            sender.ready().await?;
            sender.send_request(req).await
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                let s = Session::new(
                    id.clone(),
                    who.name.clone(),
                    app.to_string(),
                    host.clone(),
                    tx,
                );
                state.sessions.insert(s.clone());
                state
                    .metrics
                    .sessions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(s.clone().pump_from_agent(state.clone(), resp.into_body()));
                tracing::info!(session = %id, app, user = %who.name, agent = %host, "mcp session opened");
                return Ok(s);
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::NOT_FOUND => {
                tracing::info!(app, agent = %host, "agent no longer serves the app; trying the next");
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                let text = http_body_util::Limited::new(resp.into_body(), 4096)
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_else(|_| format!("the agent answered {status}"));
                state.audit.emit(
                    "mcp.session.request",
                    false,
                    serde_json::json!({"user": who.name, "app": app, "agent": host, "error": text}),
                );
                return Err(rpc_error(StatusCode::BAD_GATEWAY, SERVER_ERROR, &text));
            }
            Ok(Err(e)) => {
                tracing::warn!(app, agent = %host, error = %e, "cannot reach agent; trying the next")
            }
            Err(_) => {
                tracing::warn!(app, agent = %host, "agent did not answer in time; trying the next")
            }
        }
    }
    Err(rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        SERVER_ERROR,
        &format!("no agent serving the MCP server {app:?} could be reached"),
    ))
}

/// 32 random bytes, hex: unguessable session ids.
fn random_session_id() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
