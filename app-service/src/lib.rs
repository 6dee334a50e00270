//! Portico's app-service agent: joins the cluster, watches `app` resources,
//! serves those its selectors match (plus static ones), announces them with
//! heartbeats, dials the proxies' tunnels and runs one MCP process per session,
//! within its own bounds: which host accounts, which secrets for which apps,
//! how many sessions, and the resource limits of each process.

pub mod cgroup;
mod legacy_sse;
pub mod reaper;
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
use portico_proto::join::{Credentials as JoinCredentials, JoinParams, load_or_join};
use portico_tunnel as tunnel;
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};

pub use registry::Registry;

/// The `app_service` section of `portico.yaml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// A section that is present runs unless it says `enabled: false`.
    #[serde(default = "portico_core::yes")]
    pub enabled: bool,
    /// The auth-service's gRPC address(es) (host:3025). Agents speak to it
    /// directly, over mutual TLS with their own certificate.
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
    /// `sha256:<hex>` of the cluster CA (`pctl ca export` prints it): what
    /// the first join checks the auth-service against.
    #[serde(default)]
    pub ca_pin: Option<String>,
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
    /// Most live MCP sessions (processes and upstream relays) at once (default 256).
    #[serde(default)]
    pub max_sessions: Option<usize>,
    /// Who the agent runs MCP servers as, with which secrets and limits.
    #[serde(default)]
    pub mcp: Option<AgentMcpConfig>,
}

/// The `app_service.mcp` section: the agent's own bounds on the MCP servers
/// it runs, whatever the apps in the cluster ask for.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentMcpConfig {
    /// Host accounts apps may name in `run_as_host_user`. Absent: any
    /// existing account except root (uid 0) and the agent's own.
    #[serde(default)]
    pub allowed_host_users: Option<Vec<String>>,
    /// With no `allowed_host_users`, also allow the agent's own account
    /// (and root, when the agent runs as root): for one person's machine,
    /// as the all-in-one quick start is. Default false.
    #[serde(default)]
    pub allow_agent_account: bool,
    /// Which apps may use which `{{secret NAME}}`; a secret no grant covers
    /// fails the session.
    #[serde(default)]
    pub secrets: Vec<SecretGrant>,
    /// RLIMIT_NOFILE of every MCP process (default 1024, or the agent's own
    /// hard limit when that is lower).
    #[serde(default)]
    pub max_open_files: Option<u64>,
    /// RLIMIT_AS (address space, bytes) of every MCP process (default: not set).
    #[serde(default)]
    pub max_memory_bytes: Option<u64>,
    /// Added to the agent's own niceness for every MCP process, capped at
    /// 19 (0 to 19, default 10): the servers yield the CPU to Portico.
    #[serde(default)]
    pub nice: Option<u8>,
    /// CA certificates (PEM) that vouch for `mcp+https://` upstream servers
    /// (default: the system's root certificates).
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
}

/// Grants the secret `name` (`{{secret NAME}}`, from the agent's
/// `PORTICO_SECRET_NAME`) to the apps whose labels match `labels` (the
/// grammar of `resources[].labels`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretGrant {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    /// As an app's `spec.headers` (for an `mcp+http(s)://` uri).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// As an app's `spec.identity`.
    #[serde(default)]
    pub identity: Option<portico_core::resource::AppIdentity>,
}

pub use portico_mcp::DEFAULT_MAX_MESSAGE;
/// `app_service.max_sessions` when absent.
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// The smallest `mcp.max_open_files` accepted: stdio and a few libraries.
const MIN_OPEN_FILES: u64 = 16;
/// The smallest `mcp.max_memory_bytes` accepted (16 MiB).
const MIN_MEMORY_BYTES: u64 = 16 * 1024 * 1024;
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
    /// Who runs what, which secrets, which limits (`app_service.mcp`).
    pub policy: spawn::Policy,
    /// `app_service.max_sessions`.
    pub max_sessions: usize,
    /// One permit per live session, `max_sessions` in all.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) api: AuthClient,
    /// Registrations and withdrawals for the heartbeat task, in order.
    pub(crate) announce: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    /// True once the first snapshot of apps is applied.
    pub(crate) synced: watch::Sender<bool>,
    /// `app_service.resources`, sent with the app watch so that the
    /// auth-service sends only the apps they concern.
    pub(crate) app_selectors: Vec<portico_proto::v1::AppSelector>,
    /// How `mcp+https://` upstreams are reached, or why they cannot be.
    pub(crate) upstream_tls: Result<portico_tls::Connector, String>,
    /// Kills the process groups of MCP servers if the agent dies first.
    pub(crate) reaper: reaper::Reaper,
    /// The agent's cgroup, one per session under it, where cgroup v2 is
    /// writable; else MCP processes are contained by process group only.
    pub(crate) cgroups: Option<cgroup::Cgroups>,
}

impl AgentConfig {
    /// The connector for `mcp+https://` upstreams: the configured CA file
    /// (which must load now) or the system's roots (whose absence only
    /// fails https sessions, with the reason).
    fn upstream_tls(&self) -> Result<Result<portico_tls::Connector, String>, Error> {
        let trust = match self.mcp.as_ref().and_then(|m| m.upstream_ca_file.as_ref()) {
            Some(f) => {
                let pem = std::fs::read_to_string(f).map_err(|e| {
                    Error::bad_request(format!(
                        "app_service.mcp.upstream_ca_file {}: {e}",
                        f.display()
                    ))
                })?;
                portico_tls::pki::certs(&pem).map_err(|e| {
                    Error::bad_request(format!(
                        "app_service.mcp.upstream_ca_file {}: {e}",
                        f.display()
                    ))
                })?;
                portico_tls::Trust::Roots(pem)
            }
            None => portico_tls::Trust::System,
        };
        Ok(
            portico_tls::config::client_for(&trust, &[b"h2", b"http/1.1"])
                .map(portico_tls::Connector::tls)
                .map_err(|e| {
                    format!("{e} (set app_service.mcp.upstream_ca_file for https upstreams)")
                }),
        )
    }

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

    /// The `mcp` section, checked and compiled.
    fn policy(&self) -> Result<spawn::Policy, Error> {
        let mcp = self.mcp.clone().unwrap_or_default();
        if let Some(users) = &mcp.allowed_host_users {
            for (i, u) in users.iter().enumerate() {
                if u.is_empty() || u.trim() != u.as_str() {
                    return Err(Error::bad_request(format!(
                        "app_service.mcp.allowed_host_users[{i}]: {u:?} is not an account name"
                    )));
                }
                if spawn::lookup_user(u).is_none() {
                    tracing::warn!(user = %u, "app_service.mcp.allowed_host_users names an account that does not exist on this host");
                }
            }
        }
        let secrets = mcp
            .secrets
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let at = format!("app_service.mcp.secrets[{i}]");
                if g.name.is_empty()
                    || !g
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(Error::bad_request(format!(
                        "{at}.name: {:?} is not a secret name (letters, digits and _, as in PORTICO_SECRET_NAME)",
                        g.name
                    )));
                }
                if g.labels.is_empty() {
                    return Err(Error::bad_request(format!(
                        "{at}.labels: a label selector is required (\"*\": \"*\" grants {:?} to every app)",
                        g.name
                    )));
                }
                let selector = LabelSelector::from_single(&g.labels)
                    .map_err(|e| Error::from(e.within(&format!("{at}.labels"))))?;
                Ok((g.name.clone(), selector))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let max_open_files = match mcp.max_open_files {
            None => spawn::default_open_files(),
            Some(n) if n < MIN_OPEN_FILES => {
                return Err(Error::bad_request(format!(
                    "app_service.mcp.max_open_files: {n} is too few for any process (at least {MIN_OPEN_FILES})"
                )));
            }
            Some(n) => {
                spawn::check_limit(spawn::Limit::OpenFiles, n).map_err(|m| {
                    Error::bad_request(format!("app_service.mcp.max_open_files: {m}"))
                })?;
                n
            }
        };
        if let Some(n) = mcp.max_memory_bytes {
            if n < MIN_MEMORY_BYTES {
                return Err(Error::bad_request(format!(
                    "app_service.mcp.max_memory_bytes: {n} is too little for any process (at least {MIN_MEMORY_BYTES})"
                )));
            }
            spawn::check_limit(spawn::Limit::Memory, n).map_err(|m| {
                Error::bad_request(format!("app_service.mcp.max_memory_bytes: {m}"))
            })?;
        }
        let nice = match mcp.nice {
            None => spawn::DEFAULT_NICE,
            Some(n) if n > 19 => {
                return Err(Error::bad_request(format!(
                    "app_service.mcp.nice: {n} is out of range (0 to 19)"
                )));
            }
            Some(n) => n,
        };
        Ok(spawn::Policy {
            allowed_host_users: mcp.allowed_host_users,
            allow_agent_account: mcp.allow_agent_account,
            secrets,
            max_open_files,
            max_memory_bytes: mcp.max_memory_bytes,
            nice,
        })
    }

    fn session_cap(&self) -> Result<usize, Error> {
        match self.max_sessions {
            None => Ok(DEFAULT_MAX_SESSIONS),
            Some(n) if n == 0 || n > Semaphore::MAX_PERMITS => Err(Error::bad_request(format!(
                "app_service.max_sessions: {n} is out of range (1 to {})",
                Semaphore::MAX_PERMITS
            ))),
            Some(n) => Ok(n),
        }
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
                        headers: s.headers.clone(),
                        identity: s.identity,
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
    /// An identity already issued (the all-in-one).
    Issued(Arc<JoinCredentials>),
    /// Load the saved identity, or join with the configured token and save
    /// it under `data_dir`.
    Join { data_dir: PathBuf },
}

const IDENTITY_FILE: &str = "agent-identity.yaml";

/// Loads the agent's saved identity or joins with its configured token.
async fn identity(cfg: &AgentConfig, data_dir: &Path) -> Result<JoinCredentials, Error> {
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
        ca_pin: cfg.ca_pin.as_deref(),
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
    let policy = cfg.policy()?;
    let max_sessions = cfg.session_cap()?;
    let grace = match &cfg.shutdown_grace {
        Some(s) => Duration::from_millis(portico_core::time::parse_duration(s).ok_or_else(|| {
            Error::bad_request(format!(
                "app_service.shutdown_grace: {s:?} is not a duration"
            ))
        })? as u64),
        None => Duration::from_secs(10),
    };
    let identity = match creds {
        Credentials::Issued(c) => c,
        Credentials::Join { data_dir } => Arc::new(identity(cfg, &data_dir).await?),
    };
    let (host_id, token) = (identity.host_id.clone(), identity.token.clone());
    let auth = cfg.auth_servers.first().ok_or_else(|| {
        Error::bad_request("app_service.auth_servers: at least one address is required")
    })?;
    let api = connect_lazy(&identity.dial(auth)?, Some(&token)).map_err(Error::bad_request)?;
    let tunnel_tls =
        tunnel::agent_tls(identity.cert.clone(), &identity.ca_pem).map_err(Error::internal)?;
    let upstream_tls = cfg.upstream_tls()?;
    let (announce, announcements) = tokio::sync::mpsc::unbounded_channel();
    let cgroups = match cgroup::Cgroups::create() {
        Ok(c) => {
            tracing::info!(cgroup = %c.dir().display(), "each MCP session runs in a cgroup of its own");
            Some(c)
        }
        Err(why) => {
            tracing::info!(reason = %why, "MCP sessions are contained by process group only: a process that leaves its group (setsid) can outlive a killed agent");
            None
        }
    };
    let state = Arc::new(AgentState {
        host_id: host_id.clone(),
        registry: Registry::new(selectors, statics),
        app_selectors: cfg
            .resources
            .iter()
            .map(|r| portico_proto::v1::AppSelector {
                labels: r.labels.clone().into_iter().collect(),
            })
            .collect(),
        max_message: cfg.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE),
        grace,
        metrics: Metrics::default(),
        policy,
        max_sessions,
        slots: Arc::new(Semaphore::new(max_sessions)),
        api,
        announce,
        synced: watch::channel(false).0,
        upstream_tls,
        reaper: reaper::Reaper::start(cgroups.as_ref().and_then(cgroup::Cgroups::kill_file)),
        cgroups,
    });
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(portico_proto::join::renew_forever(
        identity.clone(),
        state.api.clone(),
        stop_rx.clone(),
    ));
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
            host_id.clone(),
            tunnel_tls.clone(),
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

/// Worker threads for the runtime of a Portico process: one per core,
/// or half the cores (at least one) when the process runs an agent, whose
/// MCP servers run on the same machine and need the rest. On a small
/// machine this is what keeps a proxied call cheap: two workers sharing
/// two cores with the servers spend their time waking and stealing from
/// each other (`docs/perf/README.md`). `TOKIO_WORKER_THREADS` in the
/// environment, a positive number, decides instead.
pub fn worker_threads(runs_agent: bool) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    workers_for(
        std::env::var_os("TOKIO_WORKER_THREADS").as_deref(),
        cores,
        runs_agent,
    )
}

fn workers_for(
    env: Option<&std::ffi::OsStr>,
    cores: usize,
    runs_agent: bool,
) -> Result<usize, String> {
    if let Some(v) = env {
        return v
            .to_str()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!("TOKIO_WORKER_THREADS: expected a positive number of threads, got {v:?}")
            });
    }
    Ok(if runs_agent {
        (cores / 2).max(1)
    } else {
        cores.max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AgentConfig, String> {
        yaml_serde::from_str::<AgentConfig>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn workers_leave_cores_to_the_mcp_servers() {
        use std::ffi::OsStr;
        assert_eq!(workers_for(None, 2, true), Ok(1));
        assert_eq!(workers_for(None, 1, true), Ok(1));
        assert_eq!(workers_for(None, 8, true), Ok(4));
        assert_eq!(workers_for(None, 2, false), Ok(2));
        assert_eq!(workers_for(Some(OsStr::new("3")), 2, true), Ok(3));
        for bad in ["0", "two", "", "-1"] {
            let e = workers_for(Some(OsStr::new(bad)), 2, true).expect_err(bad);
            assert!(e.starts_with("TOKIO_WORKER_THREADS:"), "{e}");
        }
    }

    #[test]
    fn the_mcp_section() {
        let cfg = parse(
            "max_sessions: 2\nmcp:\n  allowed_host_users: [mcp]\n  max_open_files: 64\n  max_memory_bytes: 1073741824\n  nice: 0\n  secrets:\n  - name: GH_TOKEN\n    labels: {env: prod}\n",
        )
        .expect("parses");
        assert_eq!(cfg.session_cap().expect("cap"), 2);
        let p = cfg.policy().expect("policy");
        assert_eq!(p.allowed_host_users, Some(vec!["mcp".to_string()]));
        assert_eq!(p.max_open_files, 64);
        assert_eq!(p.max_memory_bytes, Some(1 << 30));
        assert_eq!(p.nice, 0);
        assert_eq!(p.secrets.len(), 1);

        let defaults = parse("enabled: true\n").expect("parses");
        assert_eq!(defaults.session_cap().expect("cap"), DEFAULT_MAX_SESSIONS);
        let p = defaults.policy().expect("policy");
        assert!(p.allowed_host_users.is_none() && p.secrets.is_empty());
        assert!(p.max_open_files <= spawn::DEFAULT_OPEN_FILES && p.max_memory_bytes.is_none());
        assert_eq!(p.nice, spawn::DEFAULT_NICE);

        for unknown in [
            "mcp: {allowed_users: [x]}\n",
            "mcp: {secrets: [{name: X, labels: {env: prod}, value: x}]}\n",
        ] {
            assert!(parse(unknown).is_err(), "{unknown} is refused");
        }
        for (bad, says) in [
            ("max_sessions: 0\n", "app_service.max_sessions"),
            ("mcp: {max_open_files: 3}\n", "max_open_files"),
            ("mcp: {max_memory_bytes: 1000}\n", "max_memory_bytes"),
            ("mcp: {nice: 20}\n", "app_service.mcp.nice"),
            (
                "mcp: {allowed_host_users: [' root']}\n",
                "allowed_host_users[0]",
            ),
            (
                "mcp: {secrets: [{name: A-B, labels: {env: x}}]}\n",
                "secrets[0].name",
            ),
            ("mcp: {secrets: [{name: A}]}\n", "secrets[0].labels"),
            (
                "mcp: {secrets: [{name: A, labels: {env: '^(x$'}}]}\n",
                "secrets[0].labels",
            ),
        ] {
            let cfg = parse(bad).expect("parses");
            let e = cfg
                .session_cap()
                .and_then(|_| cfg.policy().map(|_| 0))
                .expect_err(bad);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }
}
