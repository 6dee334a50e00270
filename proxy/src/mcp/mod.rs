//! The MCP Streamable HTTP endpoint, `/mcp/{app}`: POST, GET and DELETE as
//! the 2025-03-26, 2025-06-18 and 2025-11-25 revisions specify, with
//! sessions issued here and bound to the user who created them.
//!
//! - `http`: error bodies, Origin and Accept checks, SSE responses;
//! - `post`: the POST path (parse once, decide, forward the canonical form);
//! - `open`: opening a session on an agent, under the per-user cap;
//! - `rbac`: decisions on requests, list filtering, audit of outcomes;
//! - `session`: one live session and the table of all of them.

// Handlers return ready-made HTTP responses as their errors.
#![allow(clippy::result_large_err)]

pub mod http;
mod open;
mod post;
pub mod rbac;
pub mod session;

use std::sync::{Arc, OnceLock};

use ::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use portico_core::presets::preset_roles;
use portico_core::{AccessChecker, PrincipalType};
use portico_mcp::jsonrpc::{INVALID_REQUEST, SERVER_ERROR};

use self::http::{accepts, origin_allowed, rpc_error, session_id, sse_response};
use self::session::Session;
use crate::ProxyState;
use crate::authn::bearer;

pub use self::http::SESSION_HEADER;

/// The caller and their current permissions.
pub struct Who {
    pub name: String,
    /// The local admin identity, whose permissions are the admin preset.
    pub admin: bool,
    pub checker: Arc<AccessChecker>,
}

/// The admin preset's permissions, compiled once.
pub fn admin_checker() -> Arc<AccessChecker> {
    static ADMIN: OnceLock<Arc<AccessChecker>> = OnceLock::new();
    ADMIN
        .get_or_init(|| Arc::new(AccessChecker::new(preset_roles().iter().take(1))))
        .clone()
}

/// Authenticates a user (or the local admin) and loads their live
/// permissions. A refusal is counted and audited with the caller's address.
pub async fn who(
    state: &ProxyState,
    headers: &HeaderMap,
    peer: SocketAddr,
    path: &str,
) -> Result<Who, Response> {
    match authenticate(state, headers).await {
        Ok(w) => Ok(w),
        Err((r, why)) => {
            refused(state, peer, path, &why).await;
            Err(r)
        }
    }
}

/// A refused credential: counted, and audited with the caller's address.
pub async fn refused(state: &ProxyState, peer: SocketAddr, path: &str, why: &str) {
    state
        .metrics
        .denied
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state
        .audit
        .record(
            "proxy.auth.failed",
            false,
            serde_json::json!({"source": peer.to_string(), "path": path, "error": why}),
        )
        .await;
}

async fn authenticate(state: &ProxyState, headers: &HeaderMap) -> Result<Who, (Response, String)> {
    let Some(token) = bearer(headers) else {
        let why =
            "authentication required: send Authorization: Bearer <token> (psh login gives you one)";
        return Err((
            rpc_error(StatusCode::UNAUTHORIZED, SERVER_ERROR, why),
            why.to_string(),
        ));
    };
    resolve(state, token)
        .await
        .map_err(|(status, why)| (rpc_error(status, SERVER_ERROR, &why), why))
}

/// The user (or local admin) a token belongs to, with their live
/// permissions; a refusal says with which HTTP status and why.
pub async fn resolve(state: &ProxyState, token: &str) -> Result<Who, (StatusCode, String)> {
    let caller = state.authn.resolve(token).await.map_err(|e| {
        let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
        let status = if status == StatusCode::FORBIDDEN {
            StatusCode::UNAUTHORIZED
        } else {
            status
        };
        (status, e.message)
    })?;
    let (admin, checker) = match caller.ptype {
        PrincipalType::Admin => (true, admin_checker()),
        PrincipalType::User => (
            false,
            state.cache.checker(&caller.name).ok_or_else(|| {
                (
                    StatusCode::UNAUTHORIZED,
                    format!("user {:?} no longer exists", caller.name),
                )
            })?,
        ),
        PrincipalType::Service => {
            return Err((
                StatusCode::FORBIDDEN,
                "services cannot open MCP sessions".to_string(),
            ));
        }
    };
    Ok(Who {
        name: caller.name.clone(),
        admin,
        checker,
    })
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
        Some(s)
            if s.user == who.name
                && s.admin == who.admin
                && s.app == app
                && s.closed().is_none() =>
        {
            Ok(s)
        }
        _ => Err(rpc_error(
            StatusCode::NOT_FOUND,
            SERVER_ERROR,
            "session not found or ended; initialize a new session",
        )),
    }
}

/// The app a request path names when it is `/mcp/{app}` with a plain
/// segment (no `/`, no percent-encoding): such requests are served by
/// [`serve_request`] straight from the connection, without the router.
/// Any other path, an encoded one included, goes through the router, whose
/// `/mcp/{app}` route decodes it; both end in `serve_request`.
pub fn plain_app(path: &str) -> Option<&str> {
    let app = path.strip_prefix("/mcp/")?;
    (!app.is_empty() && !app.contains(['/', '%'])).then_some(app)
}

/// `/mcp/{app}` as a route of the router (for paths `plain_app` leaves to it).
pub async fn handle(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    req: axum::extract::Request,
) -> Response {
    serve_request(state, peer, app, req).await
}

/// An MCP request on `/mcp/{app}`: until the proxy's first sync with the
/// auth-service it knows no app, role or user, and answers 503.
pub async fn serve_request(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    app: String,
    req: axum::extract::Request,
) -> Response {
    if !state.cache.synced() {
        return crate::routes::not_synced();
    }
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
    if !origin_allowed(&state, req.headers(), req.uri()) {
        return rpc_error(StatusCode::FORBIDDEN, SERVER_ERROR, "origin not allowed");
    }
    let who = match who(&state, req.headers(), peer, req.uri().path()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Some(app_res) = state.cache.app(&app) else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            SERVER_ERROR,
            &format!("no MCP server named {app:?}"),
        );
    };
    if !who.checker.app_allowed(&app_res.metadata.labels) {
        state.audit.record(
            "mcp.session.request",
            false,
            serde_json::json!({"user": who.name, "app": app, "error": "access to the MCP server denied by RBAC"}),
        ).await;
        return rpc_error(
            StatusCode::FORBIDDEN,
            SERVER_ERROR,
            &format!("access denied: your roles do not allow the MCP server {app:?}"),
        );
    }
    match method {
        Method::POST => post::post(state, who, app, req).await,
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
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(session::parse_event_id);
    let (stream, rx, replay) = s.open_get(resume);
    sse_response(rx, &s, stream, replay)
}

async fn delete(state: Arc<ProxyState>, who: Who, app: String, headers: &HeaderMap) -> Response {
    let s = match find_session(&state, headers, &who, &app) {
        Ok(s) => s,
        Err(r) => return r,
    };
    s.end(&state, "the client ended the session").await;
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::OK;
    r
}
