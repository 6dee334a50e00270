//! The proxy's HTTP routes: MCP, the app listing, the forwarded auth API,
//! health, metrics, and the web UI under `/web`.

use std::collections::HashMap;
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
    not_synced()
}

/// The answer of an MCP or API route before the first sync.
pub fn not_synced() -> Response {
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
    let body = state.listing.render(&state.cache, &who.checker);
    ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// One app of the listing, its caller-independent parts serialised once
/// for as long as the cache holds the same app and agents.
struct ListedRow {
    app: Arc<portico_core::App>,
    agents: Arc<[String]>,
    /// Which of the listing's distinct label sets the app has.
    labels: usize,
    /// `{"name":…,"description":…,"type":…,"labels":{…}`
    head: Arc<str>,
    /// `,"agents":[…]}`
    tail: Arc<str>,
}

/// An app's fields as `AppInfo` serialises them, before its tools.
fn listed_head(app: &portico_core::App) -> Arc<str> {
    let m = &app.metadata;
    let mut h = String::with_capacity(128);
    h.push_str("{\"name\":");
    push_json(&mut h, &m.name);
    h.push_str(",\"description\":");
    push_json(&mut h, &m.description);
    h.push_str(",\"type\":");
    push_json(&mut h, app.spec.type_label());
    h.push_str(",\"labels\":");
    push_json(&mut h, &m.labels);
    h.into()
}

/// The agents, as `AppInfo` serialises them after the tools, and the end.
fn listed_tail(agents: &[String]) -> Arc<str> {
    let mut t = String::with_capacity(32);
    t.push_str(",\"agents\":");
    push_json(&mut t, agents);
    t.push('}');
    t.into()
}

/// The cache keeps an app's agents in one `Arc` until they change (apps
/// no agent serves get a fresh empty one each time).
fn same_agents(a: &Arc<[String]>, b: &Arc<[String]>) -> bool {
    Arc::ptr_eq(a, b) || (a.is_empty() && b.is_empty())
}

fn push_json<T: Serialize + ?Sized>(out: &mut String, v: &T) {
    // Strings, maps of strings and lists of strings always serialise.
    if let Ok(j) = serde_json::to_string(v) {
        out.push_str(&j);
    }
}

/// What `GET /v1/apps` answers, built fast for many apps: each app's own
/// part is serialised once per version of the app (the cache replaces an
/// app's `Arc` when it changes) and reused; per request only the caller's
/// access is decided, once per distinct label set.
#[derive(Default)]
pub struct Listing {
    current: std::sync::Mutex<Arc<Rows>>,
}

#[derive(Default)]
struct Rows {
    /// The cache version these rows were built at.
    version: u64,
    rows: Vec<ListedRow>,
    /// The distinct label sets, which `ListedRow::labels` index.
    label_sets: usize,
}

impl Listing {
    /// The rows for the cache as it is now, reusing every unchanged one.
    fn current(&self, cache: &crate::cache::Cache) -> Arc<Rows> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.version == cache.version() && cur.version != 0 {
            return cur.clone();
        }
        let (version, now) = cache.apps_with_servers_at();
        // Both lists are by name: walk them together.
        let mut prev = cur.rows.iter().peekable();
        let mut fresh = Vec::with_capacity(now.len());
        let mut sets: HashMap<&std::collections::BTreeMap<String, String>, usize> = HashMap::new();
        for (app, agents) in &now {
            while prev
                .peek()
                .is_some_and(|r| r.app.metadata.name < app.metadata.name)
            {
                prev.next();
            }
            let same = prev.peek().filter(|r| Arc::ptr_eq(&r.app, app));
            let head = same.map_or_else(|| listed_head(app), |r| r.head.clone());
            let tail = match same {
                Some(r) if same_agents(&r.agents, agents) => r.tail.clone(),
                _ => listed_tail(agents),
            };
            let n = sets.len();
            let labels = *sets.entry(&app.metadata.labels).or_insert(n);
            fresh.push(ListedRow {
                app: app.clone(),
                agents: agents.clone(),
                labels,
                head,
                tail,
            });
        }
        let label_sets = sets.len();
        *cur = Arc::new(Rows {
            version,
            rows: fresh,
            label_sets,
        });
        cur.clone()
    }

    /// The JSON array of the apps `checker` may reach that a live agent
    /// serves, as `visible_apps` lists them.
    pub fn render(
        &self,
        cache: &crate::cache::Cache,
        checker: &portico_core::AccessChecker,
    ) -> Vec<u8> {
        let cur = self.current(cache);
        // Decided once per distinct label set: the tools' JSON, or `None`
        // when the app is out of reach.
        let mut access: Vec<Option<Option<String>>> = vec![None; cur.label_sets];
        let mut out = Vec::with_capacity(cur.rows.len() * 160 + 2);
        out.push(b'[');
        let mut first = true;
        for r in cur.rows.iter().filter(|r| !r.agents.is_empty()) {
            let labels = &r.app.metadata.labels;
            let tools = access[r.labels].get_or_insert_with(|| {
                checker.app_allowed(labels).then(|| {
                    let (allowed, denied) = checker.tool_patterns(labels);
                    let mut t = String::from(",\"allowed_tools\":");
                    push_json(&mut t, &allowed);
                    t.push_str(",\"denied_tools\":");
                    push_json(&mut t, &denied);
                    t
                })
            });
            let Some(tools) = tools else { continue };
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(r.head.as_bytes());
            out.extend_from_slice(tools.as_bytes());
            out.extend_from_slice(r.tail.as_bytes());
        }
        out.push(b']');
        out
    }
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
         # TYPE portico_proxy_sessions_in_process_total counter\nportico_proxy_sessions_in_process_total {}\n\
         # TYPE portico_proxy_sessions_live gauge\nportico_proxy_sessions_live {}\n\
         # TYPE portico_proxy_denied_total counter\nportico_proxy_denied_total {}\n\
         # TYPE portico_proxy_agents_connected gauge\nportico_proxy_agents_connected {}\n\
         # TYPE portico_proxy_audit_dropped_total counter\nportico_proxy_audit_dropped_total {}\n\
         # TYPE portico_proxy_audit_queued gauge\nportico_proxy_audit_queued {}\n\
         # TYPE portico_proxy_audit_queue_peak gauge\nportico_proxy_audit_queue_peak {}\n\
         # TYPE portico_proxy_web_connections_total counter\nportico_proxy_web_connections_total {}\n",
        m.sessions.load(Ordering::Relaxed),
        m.sessions_in_process.load(Ordering::Relaxed),
        state.sessions.len(),
        m.denied.load(Ordering::Relaxed),
        state.tunnels.connected().len(),
        state.audit.dropped.load(Ordering::Relaxed),
        state.audit.queued(),
        state.audit.peak.load(Ordering::Relaxed),
        m.web_connections.load(Ordering::Relaxed),
    )
    .into_response()
}
