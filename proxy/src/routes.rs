//! The proxy's HTTP routes: MCP, the app listing, the forwarded auth API,
//! health, metrics, and the web UI under `/web`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use http::StatusCode;
use serde::Serialize;

use crate::ProxyState;

pub fn router(state: Arc<ProxyState>) -> Router {
    Router::new()
        .route("/mcp/{app}", any(crate::mcp::handle))
        .route("/v1/apps", get(apps))
        .route(
            "/portico.v1.AuthService/{method}",
            post(crate::forward::grpc),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { axum::response::Redirect::to("/web") }))
        .merge(crate::web::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            until_synced,
        ))
        .with_state(state)
}

/// Until the first sync with the auth-service the proxy knows no app, role
/// or user: routes that need them answer 503 rather than a wrong 404 or 403.
async fn until_synced(
    State(state): State<Arc<ProxyState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let needs_cache = path.starts_with("/mcp/") || path == "/v1/apps";
    if path.starts_with("/web") && !path.starts_with("/web/assets/") && !state.cache.synced() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(http::header::RETRY_AFTER, "2")],
            "Portico is starting: the proxy has not synced with the auth service yet. Reload in a moment.\n",
        )
            .into_response();
    }
    if !needs_cache || state.cache.synced() {
        return next.run(req).await;
    }
    crate::mcp::http::rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        portico_mcp::jsonrpc::SERVER_ERROR,
        "the proxy has not synced with the auth service yet; try again shortly",
    )
}

/// One row of `psh mcp ls`: serialised as `name`, `description`, `type`,
/// `labels`, `allowed_tools`, `denied_tools` and `agents`, straight from
/// the cached app (nothing copied).
pub struct AppInfo {
    pub app: Arc<portico_core::App>,
    /// Tool patterns the caller's roles allow on this app...
    pub allowed_tools: Vec<String>,
    /// ...and those they deny, which win.
    pub denied_tools: Vec<String>,
    /// The host ids of the live agents serving it, sorted.
    pub agents: Arc<[String]>,
}

impl AppInfo {
    pub fn name(&self) -> &str {
        &self.app.metadata.name
    }
}

impl Serialize for AppInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let m = &self.app.metadata;
        let mut st = s.serialize_struct("AppInfo", 7)?;
        st.serialize_field("name", &m.name)?;
        st.serialize_field("description", &m.description)?;
        st.serialize_field("type", self.app.spec.type_label())?;
        st.serialize_field("labels", &m.labels)?;
        st.serialize_field("allowed_tools", &self.allowed_tools)?;
        st.serialize_field("denied_tools", &self.denied_tools)?;
        st.serialize_field("agents", &self.agents[..])?;
        st.end()
    }
}

/// The apps the caller may reach that at least one live agent serves.
async fn apps(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let who = match crate::mcp::who(&state, &headers, peer, "/v1/apps").await {
        Ok(w) => w,
        Err(r) => return r,
    };
    axum::Json(visible_apps(&state, &who.checker)).into_response()
}

/// The apps these permissions reach that at least one live agent serves,
/// by name (the cache lists them so): what `psh mcp ls` and the web UI list.
pub fn visible_apps(state: &ProxyState, checker: &portico_core::AccessChecker) -> Vec<AppInfo> {
    state
        .cache
        .apps_with_servers()
        .into_iter()
        .filter(|(a, agents)| !agents.is_empty() && checker.app_allowed(&a.metadata.labels))
        .map(|(app, agents)| {
            let (allowed_tools, denied_tools) = checker.tool_patterns(&app.metadata.labels);
            AppInfo {
                app,
                allowed_tools,
                denied_tools,
                agents,
            }
        })
        .collect()
}

/// The keys that verify the JWTs agents send upstreams of apps with
/// `identity: jwt`, as the auth-service holds them (asked at most once a
/// minute).
async fn jwks(State(state): State<Arc<ProxyState>>) -> Response {
    const FRESH: std::time::Duration = std::time::Duration::from_secs(60);
    let cached = state
        .jwks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|(at, _)| at.elapsed() < FRESH);
    let body = match cached {
        Some((_, body)) => body,
        None => {
            let fetched = async {
                let mut api = portico_proto::client::with_token(state.auth_channel.clone(), None)
                    .map_err(|e| e.to_string())?;
                let mut req = tonic::Request::new(portico_proto::v1::GetJwksRequest {});
                req.set_timeout(std::time::Duration::from_secs(5));
                api.get_jwks(req)
                    .await
                    .map(|r| r.into_inner().jwks_json)
                    .map_err(|s| s.message().to_string())
            };
            match fetched.await {
                Ok(body) => {
                    *state.jwks.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((std::time::Instant::now(), body.clone()));
                    body
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the JWT keys from the auth service");
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the auth service cannot be reached for the keys; try again shortly\n",
                    )
                        .into_response();
                }
            }
        }
    };
    (
        [
            (http::header::CONTENT_TYPE, "application/json"),
            (http::header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn ready(State(state): State<Arc<ProxyState>>) -> Response {
    if state.cache.synced() {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first sync with the auth service\n",
        )
            .into_response()
    }
}

async fn metrics(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !state.public_metrics && !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "metrics answer only on loopback; set proxy_service.public_metrics: true to serve them to other addresses\n",
        )
            .into_response();
    }
    let m = &state.metrics;
    format!(
        "# TYPE portico_proxy_sessions_total counter\nportico_proxy_sessions_total {}\n\
         # TYPE portico_proxy_sessions_live gauge\nportico_proxy_sessions_live {}\n\
         # TYPE portico_proxy_denied_total counter\nportico_proxy_denied_total {}\n\
         # TYPE portico_proxy_agents_connected gauge\nportico_proxy_agents_connected {}\n\
         # TYPE portico_proxy_audit_dropped_total counter\nportico_proxy_audit_dropped_total {}\n\
         # TYPE portico_proxy_web_connections_total counter\nportico_proxy_web_connections_total {}\n",
        m.sessions.load(Ordering::Relaxed),
        state.sessions.len(),
        m.denied.load(Ordering::Relaxed),
        state.tunnels.connected().len(),
        state.audit.dropped.load(Ordering::Relaxed),
        m.web_connections.load(Ordering::Relaxed),
    )
    .into_response()
}
