//! Portico's proxy: the one public entry. It serves the MCP endpoint
//! `/mcp/{app}`, the app listing for `psh`, the auth API (forwarded so that
//! `pctl` and `psh` reach it with the caller's own token), health and
//! metrics, and the tunnel listener agents dial.

pub mod audit;
pub mod authn;
pub mod cache;
mod forward;
pub mod mcp;
mod routes;
pub use routes::{AppInfo, visible_apps};
pub mod serve;
mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use portico_core::Error;
use portico_proto::client::{channel_lazy, with_token};
use portico_proto::join::Credentials as JoinCredentials;
use portico_tunnel::{Authenticator as TunnelAuth, TunnelServer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::audit::Auditor;
use crate::authn::Authenticator;
use crate::cache::Cache;
use crate::mcp::session::Sessions;

/// The `proxy_service` section of `portico.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// A section that is present runs unless it says `enabled: false`.
    #[serde(default = "portico_core::yes")]
    pub enabled: bool,
    #[serde(default = "default_web")]
    pub web_listen_addr: String,
    #[serde(default = "default_tunnel")]
    pub tunnel_listen_addr: String,
    /// The auth-service's gRPC address(es).
    #[serde(default)]
    pub auth_servers: Vec<String>,
    #[serde(default)]
    pub join_token: Option<String>,
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    #[serde(default)]
    pub host_id: Option<String>,
    /// `sha256:<hex>` of the cluster CA (`pctl ca export` prints it): what
    /// the first join checks the auth-service against.
    #[serde(default)]
    pub ca_pin: Option<String>,
    /// The address clients use (host:port), for `psh mcp config`.
    #[serde(default)]
    pub public_addr: Option<String>,
    /// Browser origins allowed besides the proxy's own.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Largest POST body, in bytes (default 4 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Sessions idle this long are ended (default 30m).
    #[serde(default)]
    pub session_idle_timeout: Option<String>,
    #[serde(default)]
    pub max_sessions_per_user: Option<usize>,
    /// Time a client may take to send a request's headers; also how long an
    /// idle HTTP/1 keep-alive connection is kept (default 30s).
    #[serde(default)]
    pub header_timeout: Option<String>,
    /// Time a client may take to send a POST body (default 30s).
    #[serde(default)]
    pub body_timeout: Option<String>,
    /// Open client connections at once (default 4096).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Open client connections from one address at once (default 512).
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// Answer `/metrics` to any address, not only loopback (default false).
    #[serde(default)]
    pub public_metrics: bool,
    /// The web listener's certificates and keys (PEM files), reloaded when
    /// they change. None: a self-signed certificate made at first start
    /// (`<data dir>/web-cert.pem`).
    #[serde(default)]
    pub https_keypairs: Vec<KeyPairFiles>,
    /// Serve plain HTTP on the web listener: only behind a TLS-terminating
    /// load balancer on a private network (default false).
    #[serde(default)]
    pub plain_http: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPairFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_web() -> String {
    "0.0.0.0:3080".into()
}

fn default_tunnel() -> String {
    "0.0.0.0:3024".into()
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            web_listen_addr: default_web(),
            tunnel_listen_addr: default_tunnel(),
            auth_servers: vec![],
            join_token: None,
            join_token_file: None,
            host_id: None,
            ca_pin: None,
            public_addr: None,
            allowed_origins: vec![],
            max_body_bytes: None,
            session_idle_timeout: None,
            max_sessions_per_user: None,
            header_timeout: None,
            body_timeout: None,
            max_connections: None,
            max_connections_per_address: None,
            public_metrics: false,
            https_keypairs: vec![],
            plain_http: false,
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub sessions: AtomicU64,
    /// Sessions opened with an agent of this process, without HTTP/2.
    pub sessions_in_process: AtomicU64,
    pub denied: AtomicU64,
    pub requests: AtomicU64,
    /// Client connections accepted on the web listener (each one TLS
    /// handshake when it serves HTTPS).
    pub web_connections: Arc<AtomicU64>,
}

/// Everything the proxy's handlers share.
pub struct ProxyState {
    pub cache: Arc<Cache>,
    pub tunnels: Arc<TunnelServer>,
    pub sessions: Sessions,
    pub authn: Authenticator,
    pub audit: Auditor,
    pub auth_channel: Channel,
    pub max_message: usize,
    pub max_body: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_sessions_per_user: usize,
    pub allowed_origins: Vec<String>,
    pub public_addr: Option<String>,
    /// `/metrics` answers only loopback callers unless this is set.
    pub public_metrics: bool,
    /// The web listener serves plain HTTP (behind a TLS terminator).
    pub plain_http: bool,
    /// The JWT keys last fetched from the auth-service, and when.
    pub jwks: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    pub metrics: Metrics,
    /// `GET /v1/apps`' rows, kept between requests.
    pub listing: routes::Listing,
}

/// How the proxy proves who it is to the auth-service, and where it keeps
/// its state (the saved identity, the self-signed web certificate).
pub struct Credentials {
    /// Issued by an auth-service in this process; otherwise the proxy
    /// loads its saved identity or joins.
    pub issued: Option<Arc<JoinCredentials>>,
    pub data_dir: PathBuf,
    /// An auth-service in this process, to which audit events are handed
    /// directly rather than sent over gRPC.
    pub local_audit: Option<Arc<dyn portico_proto::client::LocalAudit>>,
}

impl Credentials {
    pub fn join(data_dir: impl Into<PathBuf>) -> Self {
        Credentials {
            issued: None,
            data_dir: data_dir.into(),
            local_audit: None,
        }
    }
}

pub struct Listeners {
    pub web: TcpListener,
    pub tunnel: TcpListener,
}

/// A running proxy.
pub struct Proxy {
    pub state: Arc<ProxyState>,
    pub web_addr: std::net::SocketAddr,
    pub tunnel_addr: std::net::SocketAddr,
    /// The web certificate served first, as `SHA256:...` (none with
    /// `plain_http`).
    pub web_fingerprint: Option<String>,
    /// Where the self-signed web certificate was written, if one is used.
    pub web_cert_file: Option<PathBuf>,
    /// This proxy's identity in the cluster.
    pub identity: Arc<JoinCredentials>,
    stop: watch::Sender<bool>,
    web_task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Stops accepting, ends sessions and waits for the web server to finish.
    pub async fn shutdown(self) {
        let state = self.state.clone();
        let ending = async move {
            for s in state.sessions.all() {
                s.end(&state, "the proxy is shutting down").await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), ending)
            .await
            .is_err()
        {
            tracing::warn!("not every session could be ended in 10 s; stopping anyway");
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.web_task).await;
        // What was audited while stopping (every session's end) is stored
        // before the proxy is gone.
        if !self.state.audit.flush(Duration::from_secs(5)).await {
            tracing::warn!(
                queued = self.state.audit.queued(),
                "some audit events were not stored within 5 s of stopping"
            );
        }
    }
}

pub async fn start(
    cfg: &ProxyConfig,
    creds: Credentials,
    listeners: Listeners,
) -> Result<Proxy, Error> {
    let auth = cfg
        .auth_servers
        .first()
        .ok_or_else(|| {
            Error::bad_request(
                "proxy_service.auth_servers: at least one auth-service address is required",
            )
        })?
        .clone();
    let identity = match creds.issued {
        Some(c) => c,
        None => Arc::new(
            portico_proto::join::load_or_join(portico_proto::join::JoinParams {
                auth_server: &auth,
                join_token: cfg.join_token.as_deref(),
                join_token_file: cfg.join_token_file.as_deref(),
                host_id: cfg.host_id.as_deref(),
                role: portico_core::SystemRole::Proxy,
                identity_path: creds.data_dir.join("proxy-identity.yaml"),
                ca_pin: cfg.ca_pin.as_deref(),
            })
            .await?,
        ),
    };
    let token = identity.token.clone();
    let dial = identity.dial(&auth)?;
    let channel = channel_lazy(&dial).map_err(Error::bad_request)?;
    let api = with_token(channel.clone(), Some(&token)).map_err(Error::bad_request)?;
    let web_tls = if cfg.plain_http {
        tracing::warn!(
            "proxy_service.plain_http: the web listener serves plain HTTP; only run it behind a TLS terminator"
        );
        None
    } else {
        Some(web_certs(cfg, &creds.data_dir)?)
    };
    let tunnel_tls = portico_tls::config::cluster_server(
        identity.cert.clone(),
        &identity.ca_pem,
        portico_tls::ClientAuth::Required,
        &[portico_tls::ALPN_TUNNEL],
    )
    .map_err(Error::internal)?;
    let sink = match creds.local_audit {
        Some(l) => crate::audit::Sink::Local(l, identity.host_id.clone()),
        None => crate::audit::Sink::Remote(api.clone()),
    };
    let state = Arc::new(ProxyState::new(cfg, channel.clone(), sink)?);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(portico_proto::join::renew_forever(
        identity.clone(),
        api.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(state.cache.clone().follow(api.clone(), stop_rx.clone()));
    let tunnel_auth = agents_only(channel.clone());
    // Revoked agents lose their tunnels within a second.
    tokio::spawn(state.tunnels.clone().revalidate(
        check_agents(api.clone()),
        Duration::from_millis(500),
        stop_rx.clone(),
    ));
    let web_addr = listeners
        .web
        .local_addr()
        .map_err(|e| Error::unavailable(e.to_string()))?;
    let tunnel_addr = listeners
        .tunnel
        .local_addr()
        .map_err(|e| Error::unavailable(e.to_string()))?;
    tokio::spawn(state.tunnels.clone().accept_loop(
        listeners.tunnel,
        tunnel_tls,
        tunnel_auth,
        stop_rx.clone(),
    ));
    tokio::spawn(idle_sweeper(state.clone(), stop_rx.clone()));
    tokio::spawn(waiting_auditor(state.clone(), stop_rx.clone()));
    tokio::spawn(access_sweeper(state.clone(), stop_rx.clone()));
    let router = routes::router(state.clone());
    let limits = serve::WebLimits {
        max_connections: cfg.max_connections.unwrap_or(4096),
        max_per_address: cfg.max_connections_per_address.unwrap_or(512),
        header_timeout: duration(
            &cfg.header_timeout,
            "header_timeout",
            Duration::from_secs(30),
        )?,
    };
    let (server_config, web_fingerprint, web_cert_file) = match web_tls {
        Some((certs, file)) => {
            let fp = portico_tls::pki::fingerprint(&certs.first().cert[0]);
            tokio::spawn(reload_web_certs(certs.clone(), stop_rx.clone()));
            let cfg = portico_tls::config::web_server(certs).map_err(Error::internal)?;
            (Some(cfg), Some(fp), file)
        }
        None => (None, None, None),
    };
    let web_task = tokio::spawn(serve::serve(
        listeners.web,
        server_config,
        state.metrics.web_connections.clone(),
        state.clone(),
        router,
        limits,
        stop_rx.clone(),
        Duration::from_secs(10),
    ));
    tracing::info!(web = %web_addr, tunnel = %tunnel_addr, auth = %auth, fingerprint = web_fingerprint.as_deref().unwrap_or("(plain HTTP)"), "proxy started");
    Ok(Proxy {
        state,
        web_addr,
        tunnel_addr,
        web_fingerprint,
        web_cert_file,
        identity,
        stop,
        web_task,
    })
}

impl ProxyState {
    fn new(cfg: &ProxyConfig, channel: Channel, sink: crate::audit::Sink) -> Result<Self, Error> {
        Ok(ProxyState {
            cache: Arc::new(Cache::default()),
            tunnels: TunnelServer::new(),
            sessions: Sessions::default(),
            authn: Authenticator::new(channel.clone()),
            audit: Auditor::start(sink),
            auth_channel: channel,
            max_message: portico_mcp::DEFAULT_MAX_MESSAGE,
            max_body: cfg.max_body_bytes.unwrap_or(4 * 1024 * 1024),
            body_timeout: duration(&cfg.body_timeout, "body_timeout", Duration::from_secs(30))?,
            idle_timeout: duration(
                &cfg.session_idle_timeout,
                "session_idle_timeout",
                Duration::from_secs(30 * 60),
            )?,
            max_sessions_per_user: cfg.max_sessions_per_user.unwrap_or(256),
            allowed_origins: cfg.allowed_origins.clone(),
            public_addr: cfg.public_addr.clone(),
            public_metrics: cfg.public_metrics,
            plain_http: cfg.plain_http,
            jwks: std::sync::Mutex::new(None),
            metrics: Metrics::default(),
            listing: routes::Listing::default(),
        })
    }
}

/// The web listener's certificates: the operator's, or the self-signed one
/// in `data_dir` (made now if missing), with the file it is in.
fn web_certs(
    cfg: &ProxyConfig,
    data_dir: &std::path::Path,
) -> Result<(Arc<portico_tls::WebCerts>, Option<PathBuf>), Error> {
    if !cfg.https_keypairs.is_empty() {
        let pairs = cfg
            .https_keypairs
            .iter()
            .map(|p| {
                (
                    p.cert_file.display().to_string(),
                    p.key_file.display().to_string(),
                )
            })
            .collect();
        let certs = portico_tls::WebCerts::from_files(pairs)
            .map_err(|e| Error::bad_request(format!("proxy_service.https_keypairs: {e}")))?;
        return Ok((certs, None));
    }
    let cert = data_dir.join("web-cert.pem");
    let key = data_dir.join("web-key.pem");
    if !(cert.exists() && key.exists()) {
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        for addr in cfg.public_addr.iter().chain([&cfg.web_listen_addr]) {
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(addr)
                .trim_start_matches('[')
                .trim_end_matches(']');
            if !host.is_empty() && host != "0.0.0.0" && host != "::" {
                hosts.push(host.to_string());
            }
        }
        let (c, k) =
            portico_tls::pki::self_signed_web(&hosts, Duration::from_secs(5 * 365 * 24 * 3600))
                .map_err(Error::internal)?;
        portico_proto::files::write_private(&key, k.as_bytes())
            .map_err(|e| Error::unavailable(format!("cannot write {}: {e}", key.display())))?;
        portico_proto::files::write_private(&cert, c.as_bytes())
            .map_err(|e| Error::unavailable(format!("cannot write {}: {e}", cert.display())))?;
        tracing::info!(path = %cert.display(), "made a self-signed web certificate");
    }
    let certs = portico_tls::WebCerts::from_files(vec![(
        cert.display().to_string(),
        key.display().to_string(),
    )])
    .map_err(Error::unavailable)?;
    Ok((certs, Some(cert)))
}

/// Reads the web certificate files again when they change (every 2 s).
async fn reload_web_certs(certs: Arc<portico_tls::WebCerts>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
        for e in certs.reload() {
            tracing::error!(error = %e, "cannot reload a web certificate; serving the previous one");
        }
    }
}

/// Lets a tunnel in only for an agent identity, as the auth-service sees it.
fn agents_only(channel: Channel) -> TunnelAuth {
    use portico_tunnel::Refusal;
    Arc::new(move |token: String| {
        let ch = channel.clone();
        Box::pin(async move {
            let mut c = with_token(ch, Some(&token)).map_err(Refusal::Refused)?;
            let who = c
                .who_am_i(portico_proto::v1::WhoAmIRequest {})
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        Refusal::Refused(s.message().to_string())
                    }
                    _ => Refusal::Unavailable(s.message().to_string()),
                })?
                .into_inner();
            let is_agent = portico_core::PrincipalType::parse(&who.principal_type)
                == Some(portico_core::PrincipalType::Service)
                && who
                    .roles
                    .iter()
                    .any(|r| r == portico_core::SystemRole::App.role_name());
            if !is_agent {
                return Err(Refusal::Refused(
                    "this identity is not an app-service agent".to_string(),
                ));
            }
            Ok(who.name)
        })
    })
}

/// Re-checks the agents in this proxy's tunnels, all in one call.
fn check_agents(api: portico_proto::client::AuthClient) -> portico_tunnel::BatchChecker {
    Arc::new(move |tokens: Vec<String>| {
        let mut api = api.clone();
        Box::pin(async move {
            let r = api
                .check_agents(portico_proto::v1::CheckAgentsRequest { tokens })
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            Ok(r.agents
                .into_iter()
                .map(|a| {
                    if a.refused.is_empty() {
                        Ok(a.host_id)
                    } else {
                        Err(a.refused)
                    }
                })
                .collect())
        })
    })
}

/// A `proxy_service` duration setting, or its default.
fn duration(v: &Option<String>, field: &str, default: Duration) -> Result<Duration, Error> {
    match v {
        None => Ok(default),
        Some(s) => portico_core::time::parse_duration(s)
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
            .ok_or_else(|| {
                Error::bad_request(format!(
                    "proxy_service.{field}: {s:?} is not a duration like 30s"
                ))
            }),
    }
}

/// Runs the proxy until `shutdown` resolves.
pub async fn serve(
    cfg: ProxyConfig,
    creds: Credentials,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let proxy = start(&cfg, creds, listeners).await?;
    shutdown.await;
    proxy.shutdown().await;
    Ok(())
}

/// Ends the sessions of users who were deleted or whose roles no longer
/// reach the app, as soon as the cache learns of it (and at least every
/// 500 ms).
async fn access_sweeper(state: Arc<ProxyState>, mut stop: watch::Receiver<bool>) {
    let mut tick: u64 = 0;
    loop {
        let changed = tokio::select! {
            _ = state.cache.changed() => true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
            _ = stop.changed() => return,
        };
        tick += 1;
        // What sessions may see is checked again on every change the cache
        // learns of, and every 5 s in case a wake-up was missed.
        let relist = changed || tick.is_multiple_of(10);
        for s in state.sessions.all() {
            if s.admin {
                continue;
            }
            let reason = match state.cache.checker(&s.user) {
                None if state.cache.locked(&s.user) => Some("your user was locked"),
                None => Some("your user was deleted"),
                Some(c) => match state.cache.app(&s.app) {
                    Some(app) if !c.app_allowed(&app.metadata.labels) => {
                        Some("your roles no longer allow this MCP server")
                    }
                    _ => None,
                },
            };
            match reason {
                Some(r) => s.end(&state, r).await,
                None if relist => mcp::rbac::notify_list_changes(&state, &s).await,
                None => {}
            }
        }
    }
}

/// Audits the decision on allowed requests still waiting for their answer
/// after `rbac::DECIDED_AFTER` (`rbac::audit_waiting`), every quarter of it.
async fn waiting_auditor(state: Arc<ProxyState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(mcp::rbac::DECIDED_AFTER / 4) => {}
            _ = stop.changed() => return,
        }
        mcp::rbac::audit_waiting(&state).await;
    }
}

async fn idle_sweeper(state: Arc<ProxyState>, mut stop: watch::Receiver<bool>) {
    let every = (state.idle_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let cutoff = portico_core::time::now_ms() - state.idle_timeout.as_millis() as i64;
        for s in state.sessions.all() {
            if s.last_active.load(std::sync::atomic::Ordering::Relaxed) < cutoff && !s.has_streams()
            {
                s.end(&state, "the session was idle for too long").await;
            }
        }
    }
}
