//! `ClusterBuilder::new().proxy().agent_yaml("a1", ...).start().await`:
//! an auth-service, optionally a proxy and agents, joined with real tokens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portico_agent::{Agent, AgentConfig, AgentMcpConfig, ResourceSelector};
use portico_auth::{AuthConfig, AuthServer, StorageConfig};
use portico_core::identity::ADMIN_IDENTITY_FILE;
use portico_proto::client::{AuthClient, Dial, connect};
use portico_proto::v1;
use portico_proxy::{Proxy, ProxyConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::pg::PgDb;
use crate::util::{TempDir, bin, eventually, me};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Sqlite,
    Postgres,
}

pub struct ClusterBuilder {
    storage: Storage,
    proxy: bool,
    agents: Vec<(String, AgentConfig)>,
    session_ttl: Option<String>,
    identity_ttl: Option<String>,
    plain_http: bool,
    idle_timeout: Option<String>,
    max_sessions_per_user: Option<usize>,
    max_connections_per_address: Option<usize>,
    audit_over_grpc: bool,
    /// The proxy's header and body read timeouts.
    timeouts: Option<(String, String)>,
    /// `auth_service.event_retention`.
    event_retention: Option<i64>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterBuilder {
    pub fn new() -> Self {
        ClusterBuilder {
            storage: Storage::Sqlite,
            proxy: false,
            agents: vec![],
            session_ttl: None,
            identity_ttl: None,
            plain_http: false,
            idle_timeout: None,
            max_sessions_per_user: None,
            max_connections_per_address: None,
            audit_over_grpc: false,
            timeouts: None,
            event_retention: None,
        }
    }
    pub fn storage(mut self, s: Storage) -> Self {
        self.storage = s;
        self
    }
    pub fn proxy(mut self) -> Self {
        self.proxy = true;
        self
    }
    /// How many change events the auth-service keeps.
    pub fn event_retention(mut self, n: i64) -> Self {
        self.event_retention = Some(n);
        self
    }
    /// The proxy's header and body read timeouts.
    pub fn request_timeouts(mut self, header: &str, body: &str) -> Self {
        self.timeouts = Some((header.to_string(), body.to_string()));
        self
    }

    /// The proxy serves plain HTTP (as behind a TLS terminator).
    pub fn plain_http(mut self) -> Self {
        self.plain_http = true;
        self
    }

    /// How long service certificates and identities last (renewed at 2/3).
    pub fn identity_ttl(mut self, ttl: &str) -> Self {
        self.identity_ttl = Some(ttl.into());
        self
    }

    pub fn session_ttl(mut self, ttl: &str) -> Self {
        self.session_ttl = Some(ttl.into());
        self
    }
    pub fn idle_timeout(mut self, t: &str) -> Self {
        self.idle_timeout = Some(t.into());
        self
    }
    /// The proxy's cap on open MCP sessions per user (default 256).
    pub fn max_sessions_per_user(mut self, n: usize) -> Self {
        self.max_sessions_per_user = Some(n);
        self
    }
    /// The proxy's cap on open connections per client address (default 512).
    pub fn max_connections_per_address(mut self, n: usize) -> Self {
        self.max_connections_per_address = Some(n);
        self
    }
    /// The proxy sends its audit events over gRPC instead of handing them
    /// to the auth-service in this process (see `Cluster::audit_over_grpc`).
    pub fn audit_over_grpc(mut self) -> Self {
        self.audit_over_grpc = true;
        self
    }
    /// An agent configured by a YAML document with an `app_service:` section
    /// (the shared example files, say); addresses and the token are filled in.
    pub fn agent_yaml(mut self, host_id: &str, yaml: &str) -> Self {
        #[derive(serde::Deserialize)]
        struct File {
            app_service: AgentConfig,
        }
        let mut f: File = yaml_serde::from_str(yaml).expect("agent config parses");
        if f.app_service.mcp.is_none() {
            f.app_service.mcp = Some(harness_mcp());
        }
        self.agents.push((host_id.to_string(), f.app_service));
        self
    }
    /// An agent serving the apps with these labels.
    pub fn selector_agent(mut self, host_id: &str, labels: &[(&str, &str)]) -> Self {
        self.agents
            .push((host_id.to_string(), selector_agent_config(labels)));
        self
    }

    /// An agent serving every app.
    pub fn wildcard_agent(mut self, host_id: &str) -> Self {
        self.agents.push((
            host_id.to_string(),
            AgentConfig {
                enabled: true,
                resources: vec![ResourceSelector {
                    labels: BTreeMap::from([("*".into(), "*".into())]),
                }],
                shutdown_grace: Some("2s".into()),
                // portico-bench holds 1000 idle sessions on one agent.
                max_sessions: Some(4096),
                mcp: Some(harness_mcp()),
                ..AgentConfig::default()
            },
        ));
        self
    }

    pub async fn start(self) -> Cluster {
        let dir = TempDir::new("portico-e2e");
        let pg = match self.storage {
            Storage::Sqlite => None,
            Storage::Postgres => Some(PgDb::create().await),
        };
        let storage = match &pg {
            None => StorageConfig::Sqlite {
                path: Some(dir.path().join("db")),
            },
            Some(db) => StorageConfig::Postgres {
                conn_string: db.url.clone(),
            },
        };
        let auth_cfg = AuthConfig {
            storage,
            session_ttl: self.session_ttl.clone(),
            identity_ttl: self.identity_ttl.clone(),
            event_retention: self.event_retention,
            ..AuthConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind auth");
        let auth_addr = listener.local_addr().expect("addr");
        let (auth, auth_stop) =
            start_auth(&auth_cfg, dir.path().to_path_buf(), listener, auth_addr).await;
        let mut c = Cluster {
            pg,
            auth,
            auth_cfg,
            auth_addr,
            auth_stop,
            proxy: None,
            agents: vec![],
            dir,
            audit_over_grpc: self.audit_over_grpc,
        };
        if self.proxy {
            let cfg = ProxyConfig {
                auth_servers: vec![c.auth_addr.to_string()],
                session_idle_timeout: self.idle_timeout.clone(),
                max_sessions_per_user: self.max_sessions_per_user,
                max_connections_per_address: self.max_connections_per_address,
                header_timeout: self.timeouts.as_ref().map(|t| t.0.clone()),
                body_timeout: self.timeouts.as_ref().map(|t| t.1.clone()),
                plain_http: self.plain_http,
                ..ProxyConfig::default()
            };
            c.start_proxy(cfg).await;
        }
        for (host, cfg) in self.agents {
            c.start_agent(&host, cfg).await;
        }
        c
    }
}

/// A proxy's web and tunnel listeners, on free loopback ports.
pub async fn loopback_listeners() -> portico_proxy::Listeners {
    portico_proxy::Listeners {
        web: TcpListener::bind("127.0.0.1:0").await.expect("bind web"),
        tunnel: TcpListener::bind("127.0.0.1:0").await.expect("bind tunnel"),
    }
}

/// An agent config serving the apps with these labels (`*: *` for all).
pub fn selector_agent_config(labels: &[(&str, &str)]) -> AgentConfig {
    AgentConfig {
        enabled: true,
        resources: vec![ResourceSelector {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }],
        shutdown_grace: Some("2s".into()),
        max_sessions: Some(4096),
        mcp: Some(harness_mcp()),
        ..AgentConfig::default()
    }
}

/// The harness's agents run apps as the accounts the suites name: the tests'
/// own user (root in CI), `root` and `nobody`. An agent config that has its
/// own `mcp:` section keeps it as given (tests/e2e/agent_limits.rs).
fn harness_mcp() -> AgentMcpConfig {
    AgentMcpConfig {
        allowed_host_users: Some(vec![me(), "root".into(), "nobody".into()]),
        ..AgentMcpConfig::default()
    }
}

async fn start_auth(
    cfg: &AuthConfig,
    data_dir: PathBuf,
    listener: TcpListener,
    addr: SocketAddr,
) -> (Arc<AuthServer>, watch::Sender<bool>) {
    let server = AuthServer::open(cfg, &data_dir)
        .await
        .expect("auth-service opens");
    server
        .ensure_admin_identity(&data_dir, &addr.to_string())
        .await
        .expect("admin identity");
    let (stop, mut rx) = watch::channel(false);
    let s = server.clone();
    tokio::spawn(async move {
        let _ = portico_auth::serve(s, listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await;
    });
    (server, stop)
}

/// What a join returned, with the key its certificate is for.
pub struct JoinedService {
    pub resp: v1::JoinResponse,
    pub key_pem: String,
}

impl JoinedService {
    /// The certificate followed by the CA, as services present it.
    pub fn chain(&self) -> String {
        format!("{}{}", self.resp.cert_pem, self.resp.ca_pem)
    }
}

pub struct Cluster {
    pub pg: Option<PgDb>,
    pub auth: Arc<AuthServer>,
    pub auth_cfg: AuthConfig,
    pub auth_addr: SocketAddr,
    auth_stop: watch::Sender<bool>,
    pub proxy: Option<Proxy>,
    pub agents: Vec<(String, Agent)>,
    pub dir: TempDir,
    /// The proxy sends its audit events over gRPC (`EmitEvents`), as a
    /// proxy in a process of its own does, rather than handing them to
    /// the auth-service in this process, as the all-in-one does.
    pub audit_over_grpc: bool,
}

impl Cluster {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn admin_identity(&self) -> PathBuf {
        self.dir.path().join(ADMIN_IDENTITY_FILE)
    }

    pub fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(self.admin_identity()).expect("admin identity");
        let id: portico_core::identity::IdentityFile =
            yaml_serde::from_str(&text).expect("identity parses");
        id.token
    }

    /// The auth-service, verified against the cluster CA, without a
    /// client certificate (as `pctl` with the admin identity).
    pub fn auth_dial(&self) -> Dial {
        Dial::cluster(&self.auth_addr.to_string(), &self.auth.ca.cert_pem, None).expect("auth dial")
    }

    pub async fn admin(&self) -> AuthClient {
        connect(&self.auth_dial(), Some(&self.admin_token()))
            .await
            .expect("admin connects")
    }

    pub async fn client(&self, token: &str) -> AuthClient {
        connect(&self.auth_dial(), Some(token))
            .await
            .expect("client connects")
    }

    /// A client presenting a joined service's certificate and token.
    pub async fn service_client(&self, id: &JoinedService) -> AuthClient {
        let store = portico_tls::CertStore::new(&id.chain(), &id.key_pem).expect("cert store");
        let dial = Dial::cluster(
            &self.auth_addr.to_string(),
            &self.auth.ca.cert_pem,
            Some(store),
        )
        .expect("dial");
        connect(&dial, Some(&id.resp.identity_token))
            .await
            .expect("service connects")
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy.as_ref().expect("cluster has a proxy").web_addr
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.proxy
            .as_ref()
            .expect("cluster has a proxy")
            .tunnel_addr
    }

    /// Joins a service identity (`app` or `proxy`) under `host_id` with a fresh token.
    pub async fn join_as(&self, role: &str, host_id: &str) -> JoinedService {
        let token = self.join_token(role).await;
        let key = portico_tls::pki::new_key().expect("key");
        let csr = portico_tls::pki::signing_request(&key).expect("csr");
        let resp = connect(&self.auth_dial(), None)
            .await
            .expect("connect")
            .join(v1::JoinRequest {
                token,
                host_id: host_id.into(),
                role: role.into(),
                csr_pem: csr,
            })
            .await
            .expect("join")
            .into_inner();
        JoinedService {
            resp,
            key_pem: key.serialize_pem(),
        }
    }

    pub async fn join_token(&self, role: &str) -> String {
        self.admin()
            .await
            .create_token(v1::CreateTokenRequest {
                roles: vec![role.into()],
                ttl_ms: 600_000,
            })
            .await
            .expect("token")
            .into_inner()
            .token
    }

    pub async fn start_proxy(&mut self, mut cfg: ProxyConfig) {
        cfg.join_token = Some(self.join_token("proxy").await);
        let listeners = loopback_listeners().await;
        let dir = self.dir.path().join("proxy");
        let mut creds = portico_proxy::Credentials::join(dir);
        if !self.audit_over_grpc {
            creds.local_audit = Some(self.auth.local_auditor());
        }
        let p = portico_proxy::start(&cfg, creds, listeners)
            .await
            .expect("proxy starts");
        crate::web::register(&p);
        let state = p.state.clone();
        eventually(Duration::from_secs(10), "proxy cache synced", || {
            let s = state.clone();
            async move { s.cache.synced().then_some(()) }
        })
        .await;
        self.proxy = Some(p);
    }

    pub async fn start_agent(&mut self, host_id: &str, mut cfg: AgentConfig) {
        cfg.auth_servers = vec![self.auth_addr.to_string()];
        if let Some(p) = &self.proxy {
            cfg.proxy_servers = vec![p.tunnel_addr.to_string()];
        }
        cfg.join_token = Some(self.join_token("app").await);
        cfg.host_id = Some(host_id.to_string());
        if cfg.shutdown_grace.is_none() {
            cfg.shutdown_grace = Some("2s".into());
        }
        let dir = self.dir.path().join(format!("agent-{host_id}"));
        let agent = portico_agent::start(&cfg, portico_agent::Credentials::Join { data_dir: dir })
            .await
            .expect("agent starts");
        if let Some(p) = &self.proxy {
            let tunnels = p.state.tunnels.clone();
            let h = host_id.to_string();
            eventually(Duration::from_secs(10), "agent tunnel connected", || {
                let t = tunnels.clone();
                let h = h.clone();
                async move { t.is_connected(&h).then_some(()) }
            })
            .await;
        }
        self.agents.push((host_id.to_string(), agent));
    }

    pub fn agent(&self, host_id: &str) -> &Agent {
        &self
            .agents
            .iter()
            .find(|(h, _)| h == host_id)
            .expect("agent exists")
            .1
    }

    /// Creates resources from YAML as the admin.
    pub async fn create_yaml(&self, yaml: &str, overwrite: bool) -> Result<(), tonic::Status> {
        let rs = portico_core::parse::parse_documents("test.yaml", yaml).expect("valid yaml");
        self.admin()
            .await
            .create(v1::CreateRequest {
                resources: rs
                    .iter()
                    .map(|r| v1::Resource {
                        kind: r.kind().as_str().into(),
                        json: r.to_json(),
                    })
                    .collect(),
                overwrite,
            })
            .await
            .map(|_| ())
    }

    pub async fn add_user(&self, name: &str, roles: &[&str], password: &str) {
        self.admin()
            .await
            .add_user(v1::AddUserRequest {
                name: name.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                password: password.into(),
            })
            .await
            .expect("user added");
    }

    pub async fn login(&self, user: &str, password: &str) -> String {
        let mut c = connect(&self.auth_dial(), None).await.expect("connect");
        c.login(v1::LoginRequest {
            user: user.into(),
            password: password.into(),
        })
        .await
        .expect("login")
        .into_inner()
        .token
    }

    /// Waits until at least `n` requests are waiting for answers in the proxy's sessions.
    pub async fn wait_pending(&self, n: usize) {
        let state = self.proxy.as_ref().expect("proxy").state.clone();
        eventually(
            Duration::from_secs(10),
            &format!("{n} requests in flight"),
            || {
                let s = state.clone();
                async move {
                    let waiting: usize = s.sessions.all().iter().map(|x| x.pending_count()).sum();
                    (waiting >= n).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits until the proxy routes `app` to exactly these agents.
    pub async fn wait_servers(&self, app: &str, hosts: &[&str]) {
        let mut want: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        want.sort();
        let state = self.proxy.as_ref().expect("proxy").state.clone();
        let app = app.to_string();
        eventually(
            Duration::from_secs(10),
            &format!("{app} served by {want:?}"),
            || {
                let s = state.clone();
                let app = app.clone();
                let want = want.clone();
                async move { (s.cache.servers(&app) == want).then_some(()) }
            },
        )
        .await;
    }

    /// Waits (up to 30 s) until agent `host` has a tunnel to the proxy.
    pub async fn wait_tunnel(&self, host: &str) {
        let state = self.proxy.as_ref().expect("proxy").state.clone();
        eventually(
            Duration::from_secs(30),
            &format!("{host}'s tunnel up"),
            || {
                let s = state.clone();
                async move { s.tunnels.is_connected(host).then_some(()) }
            },
        )
        .await;
    }

    /// Stops the auth-service (storage stays).
    pub async fn stop_auth(&mut self) {
        let _ = self.auth_stop.send(true);
        self.auth.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Starts the auth-service again on the same address and storage.
    pub async fn start_auth_again(&mut self) {
        let listener = eventually(Duration::from_secs(10), "auth port free again", || {
            let addr = self.auth_addr;
            async move { TcpListener::bind(addr).await.ok() }
        })
        .await;
        let (auth, stop) = start_auth(
            &self.auth_cfg,
            self.dir.path().to_path_buf(),
            listener,
            self.auth_addr,
        )
        .await;
        self.auth = auth;
        self.auth_stop = stop;
    }

    /// The audit events of one type (or family), oldest first, with their
    /// fields parsed, as the local admin reads them.
    pub async fn audit_events(&self, kind: &str) -> Vec<(v1::AuditEvent, serde_json::Value)> {
        self.admin()
            .await
            .list_events(v1::ListEventsRequest {
                r#type: kind.into(),
                since_ms: 0,
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner()
            .events
            .into_iter()
            .map(|e| {
                let f = serde_json::from_str(&e.fields_json).expect("fields are JSON");
                (e, f)
            })
            .collect()
    }

    /// Runs `pctl` against this cluster as the local admin.
    pub async fn pctl(&self, args: &[&str]) -> std::process::Output {
        self.pctl_with(args, &[], None).await
    }

    pub async fn pctl_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&str>,
    ) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(bin("pctl"));
        cmd.arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .env_remove("PORTICO_HOME")
            .env("PORTICO_HOME", self.dir.path().join("no-home"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, stdin).await
    }

    pub async fn shutdown(mut self) {
        for (_, a) in self.agents.drain(..) {
            a.shutdown();
        }
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
        let _ = self.auth_stop.send(true);
        self.auth.shutdown();
    }
}

/// Runs a command to completion with optional stdin, with a timeout.
pub async fn run(mut cmd: tokio::process::Command, stdin: Option<&str>) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    let mut si = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        si.write_all(s.as_bytes()).await.expect("write stdin");
    }
    drop(si);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("command finished in 60 s")
        .expect("output")
}

pub fn text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
