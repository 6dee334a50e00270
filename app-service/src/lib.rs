//! Portico's app-service agent: joins the cluster, watches `app` resources,
//! serves those its selectors match (plus static ones), announces them with
//! heartbeats, dials the proxies' tunnels and runs one MCP process per session.

pub mod registry;
pub mod session;
pub mod spawn;
mod upstream;
mod watcher;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use portico_core::resource::{AppSpec, Metadata};
use portico_core::{App, Error, Kind, LabelSelector, Object, SystemRole};
use portico_proto::client::{AuthClient, connect_lazy};
use portico_proto::join::{JoinParams, load_or_join};
use portico_tunnel as tunnel;
use serde::Deserialize;
use tokio::sync::watch;

pub use registry::Registry;

/// The `app_service` section of `portico.yaml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// A section that is present runs unless it says `enabled: false`.
    #[serde(default = "portico_core::yes")]
    pub enabled: bool,
    /// Where the auth API is: an auth-service (host:3025) or a proxy's web address.
    #[serde(default)]
    pub auth_servers: Vec<String>,
    /// The proxies' tunnel listeners (host:3024) to dial.
    #[serde(default)]
    pub proxy_servers: Vec<String>,
    #[serde(default)]
    pub join_token: Option<String>,
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// This agent's name; generated at join when absent.
    #[serde(default)]
    pub host_id: Option<String>,
    /// Label selectors: an app is served if any of them matches.
    #[serde(default)]
    pub resources: Vec<ResourceSelector>,
    /// Apps served whatever the cluster says.
    #[serde(default)]
    pub apps: Vec<StaticApp>,
    /// Largest JSON-RPC message relayed, in bytes (default 4 MiB).
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// Time between SIGINT and SIGKILL when a session ends (default 10s).
    #[serde(default)]
    pub shutdown_grace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourceSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticApp {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub uri: String,
    pub mcp: Option<portico_core::McpSpec>,
}

pub use portico_mcp::DEFAULT_MAX_MESSAGE;
const HEARTBEAT_TTL: Duration = Duration::from_secs(15);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Metrics {
    pub sessions: AtomicU64,
    pub live: AtomicU64,
}

/// Shared by the watcher, the heartbeats and every session.
pub struct AgentState {
    pub host_id: String,
    pub registry: Registry,
    pub max_message: usize,
    pub grace: Duration,
    pub metrics: Metrics,
    pub(crate) api: AuthClient,
    /// Registrations and withdrawals for the heartbeat task, in order.
    pub(crate) announce: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
}

impl AgentConfig {
    fn selectors(&self) -> Result<Vec<LabelSelector>, Error> {
        self.resources
            .iter()
            .enumerate()
            .map(|(i, r)| {
                LabelSelector::from_single(&r.labels).map_err(|e| {
                    Error::from(e.within(&format!("app_service.resources[{i}].labels")))
                })
            })
            .collect()
    }

    fn statics(&self) -> Result<Vec<App>, Error> {
        self.apps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut meta = Metadata::named(&s.name);
                meta.description = s.description.clone();
                meta.labels = s.labels.clone();
                let app: App = Object::new(
                    Kind::App,
                    meta,
                    AppSpec {
                        uri: s.uri.clone(),
                        mcp: s.mcp.clone(),
                    },
                );
                portico_core::Resource::App(app.clone())
                    .validate()
                    .map_err(|e| Error::from(e.within(&format!("app_service.apps[{i}]"))))?;
                Ok(app)
            })
            .collect()
    }
}

/// How the agent proves who it is.
pub enum Credentials {
    /// An identity token already issued (the all-in-one, or a saved identity).
    Identity { host_id: String, token: String },
    /// Join with the configured token and save the identity under `data_dir`.
    Join { data_dir: PathBuf },
}

const IDENTITY_FILE: &str = "agent-identity.yaml";

/// Loads the agent's saved identity or joins with its configured token.
async fn identity(cfg: &AgentConfig, data_dir: &Path) -> Result<(String, String), Error> {
    let auth = cfg.auth_servers.first().ok_or_else(|| {
        Error::bad_request("app_service.auth_servers: at least one address is required")
    })?;
    load_or_join(JoinParams {
        auth_server: auth,
        join_token: cfg.join_token.as_deref(),
        join_token_file: cfg.join_token_file.as_deref(),
        host_id: cfg.host_id.as_deref(),
        role: SystemRole::App,
        identity_path: data_dir.join(IDENTITY_FILE),
    })
    .await
}

/// A running agent; dropping it does not stop it, `shutdown` does.
pub struct Agent {
    pub state: Arc<AgentState>,
    stop: watch::Sender<bool>,
}

impl Agent {
    pub fn shutdown(&self) {
        self.state.registry.close_all("the agent is shutting down");
        let _ = self.stop.send(true);
    }

    /// Waits until every session's process has been reaped, or `timeout` passes.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self
            .state
            .metrics
            .live
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Starts the agent: identity, watch, heartbeats and tunnels, all in the background.
pub async fn start(cfg: &AgentConfig, creds: Credentials) -> Result<Agent, Error> {
    let selectors = cfg.selectors()?;
    let statics = cfg.statics()?;
    let grace = match &cfg.shutdown_grace {
        Some(s) => Duration::from_millis(portico_core::time::parse_duration(s).ok_or_else(|| {
            Error::bad_request(format!(
                "app_service.shutdown_grace: {s:?} is not a duration"
            ))
        })? as u64),
        None => Duration::from_secs(10),
    };
    let (host_id, token) = match creds {
        Credentials::Identity { host_id, token } => (host_id, token),
        Credentials::Join { data_dir } => identity(cfg, &data_dir).await?,
    };
    let auth = cfg.auth_servers.first().ok_or_else(|| {
        Error::bad_request("app_service.auth_servers: at least one address is required")
    })?;
    let api = connect_lazy(auth, Some(&token)).map_err(Error::bad_request)?;
    let (announce, announcements) = tokio::sync::mpsc::unbounded_channel();
    let state = Arc::new(AgentState {
        host_id: host_id.clone(),
        registry: Registry::new(selectors, statics),
        max_message: cfg.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE),
        grace,
        metrics: Metrics::default(),
        api,
        announce,
    });
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(watcher::watch_apps(state.clone(), stop_rx.clone()));
    tokio::spawn(watcher::heartbeats(
        state.clone(),
        announcements,
        stop_rx.clone(),
    ));
    for proxy in &cfg.proxy_servers {
        let st = state.clone();
        let handler: tunnel::Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { session::handle(st, req).await })
        });
        tokio::spawn(tunnel::dial_forever(
            proxy.clone(),
            token.clone(),
            handler,
            stop_rx.clone(),
        ));
    }
    tracing::info!(host_id = %host_id, proxies = cfg.proxy_servers.len(), "agent started");
    Ok(Agent { state, stop })
}

/// Runs the agent until `shutdown` resolves, then ends its sessions.
pub async fn serve(
    cfg: AgentConfig,
    creds: Credentials,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let agent = start(&cfg, creds).await?;
    shutdown.await;
    agent.shutdown();
    agent
        .drain(agent.state.grace + Duration::from_secs(2))
        .await;
    Ok(())
}

pub(crate) fn heartbeat_ttl() -> Duration {
    HEARTBEAT_TTL
}

pub(crate) fn heartbeat_every() -> Duration {
    HEARTBEAT_EVERY
}
