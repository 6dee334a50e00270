//! Portico's auth-service: storage with a change feed, users and login,
//! join tokens, RBAC on every call, and the audit log, served over gRPC.

pub mod ca;
mod fields;
pub mod grpc;
pub mod hub;
pub mod identity;
pub mod jwt;
pub mod limiter;
pub mod rechecks;
pub mod resources;
pub mod storage;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use portico_core::identity::{ADMIN_IDENTITY_FILE, IdentityFile};
use portico_core::presets::preset_roles;
use portico_core::time::{now_ms, parse_duration};
use portico_core::{Code, Error, Kind, Resource};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::identity::{PrincipalType, hash_token, random_token};
use crate::limiter::LoginLimiter;
use crate::storage::{
    AuditRecord, Backend, PostgresBackend, PutMode, SessionRow, SqliteBackend, WriteOp,
};

/// The `auth_service` section of `portico.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A section that is present runs unless it says `enabled: false`.
    #[serde(default = "portico_core::yes")]
    pub enabled: bool,
    #[serde(default = "default_listen")]
    pub listen_addr: String,
    #[serde(default)]
    pub storage: StorageConfig,
    /// How long a login lasts, e.g. `12h`.
    #[serde(default)]
    pub session_ttl: Option<String>,
    /// How many events the change feed keeps for resuming watchers.
    #[serde(default)]
    pub event_retention: Option<i64>,
    /// How long the change feed keeps an event, e.g. `24h` (default).
    #[serde(default)]
    pub event_retention_age: Option<String>,
    /// How long the audit log keeps a record, e.g. `90d` (default).
    #[serde(default)]
    pub audit_retention_age: Option<String>,
    /// Join tokens created at the first start of a fresh database (for
    /// deployments such as docker-compose that join without an operator).
    #[serde(default)]
    pub bootstrap_tokens: Vec<BootstrapToken>,
    /// Answer `/metrics` to any address, not only loopback (default false).
    #[serde(default)]
    pub public_metrics: bool,
    /// How long service certificates, service identities and the local
    /// admin identity last, e.g. `24h` (default). Services renew theirs at
    /// two thirds of this.
    #[serde(default)]
    pub identity_ttl: Option<String>,
}

/// The durations an auth-service config sets, in ms.
struct Durations {
    session_ttl_ms: i64,
    identity_ttl_ms: i64,
    event_retention_age_ms: i64,
    audit_retention_age_ms: i64,
}

impl AuthConfig {
    /// Checks the settings that the file's grammar alone cannot
    /// (`portico check` and every start).
    pub fn validate(&self) -> Result<(), Error> {
        self.durations().map(|_| ())
    }

    fn durations(&self) -> Result<Durations, Error> {
        let session_ttl_ms = match &self.session_ttl {
            Some(s) => parse_duration(s).ok_or_else(|| {
                Error::bad_request(format!(
                    "auth_service.session_ttl: {s:?} is not a duration like 12h"
                ))
            })?,
            None => DEFAULT_SESSION_TTL_MS,
        };
        let identity_ttl_ms = match &self.identity_ttl {
            Some(s) => parse_duration(s).filter(|ms| *ms >= 3_000).ok_or_else(|| {
                Error::bad_request(format!(
                    "auth_service.identity_ttl: {s:?} is not a duration of at least 3s, like 24h"
                ))
            })?,
            None => DEFAULT_IDENTITY_TTL_MS,
        };
        let event_retention_age_ms = match &self.event_retention_age {
            Some(s) => parse_duration(s).filter(|ms| *ms >= 60_000).ok_or_else(|| {
                Error::bad_request(format!(
                    "auth_service.event_retention_age: {s:?} is not a duration of at least 1m, like 24h"
                ))
            })?,
            None => DEFAULT_EVENT_RETENTION_AGE_MS,
        };
        let audit_retention_age_ms = match &self.audit_retention_age {
            Some(s) => parse_duration(s).filter(|ms| *ms >= 3_600_000).ok_or_else(|| {
                Error::bad_request(format!(
                    "auth_service.audit_retention_age: {s:?} is not a duration of at least 1h, like 90d"
                ))
            })?,
            None => DEFAULT_AUDIT_RETENTION_AGE_MS,
        };
        if self.event_retention.is_some_and(|n| n < 1) {
            return Err(Error::bad_request(
                "auth_service.event_retention: keep at least 1 event",
            ));
        }
        Ok(Durations {
            session_ttl_ms,
            identity_ttl_ms,
            event_retention_age_ms,
            audit_retention_age_ms,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapToken {
    pub token: String,
    pub roles: Vec<String>,
    /// How long it stays valid, e.g. `24h` (default).
    #[serde(default)]
    pub ttl: Option<String>,
}

fn default_listen() -> String {
    "0.0.0.0:3025".into()
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: true,
            listen_addr: default_listen(),
            storage: StorageConfig::default(),
            session_ttl: None,
            event_retention: None,
            event_retention_age: None,
            audit_retention_age: None,
            bootstrap_tokens: vec![],
            public_metrics: false,
            identity_ttl: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StorageConfig {
    /// `path` is a directory; defaults to the data directory.
    Sqlite {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    Postgres {
        conn_string: String,
    },
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig::Sqlite { path: None }
    }
}

const DEFAULT_SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
const DEFAULT_IDENTITY_TTL_MS: i64 = 24 * 3600 * 1000;
/// The host id in the auth-service's own certificate.
pub const AUTH_HOST_ID: &str = "auth";
const DEFAULT_EVENT_RETENTION: i64 = 100_000;
const DEFAULT_EVENT_RETENTION_AGE_MS: i64 = 24 * 3600 * 1000;
const DEFAULT_AUDIT_RETENTION_AGE_MS: i64 = 90 * 24 * 3600 * 1000;
/// What an auth-service that starts adds to every lease: agents could not
/// renew while it was away, and should not lose their apps for that.
const LEASE_GRACE_MS: i64 = 15_000;
/// Failed logins per (user, source address) within a minute before a 30 s lockout.
pub const LOGIN_MAX_FAILURES: u32 = 5;
/// Password checks that may run at once; more wait (at most 5 s) for a turn.
pub const PASSWORD_CHECKS_AT_ONCE: usize = 4;

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub writes: AtomicU64,
}

/// The running auth-service state shared by every handler.
pub struct AuthServer {
    pub backend: Arc<dyn Backend>,
    pub hub: Arc<Hub>,
    pub(crate) session_ttl_ms: i64,
    /// `/metrics` answers only loopback callers unless this is set.
    pub(crate) public_metrics: bool,
    pub(crate) limiter: LoginLimiter,
    /// Password checks (argon2, about 19 MiB and a core each) running at once.
    pub(crate) password_checks: Arc<tokio::sync::Semaphore>,
    pub metrics: Metrics,
    /// The cluster CA: its certificate is public, its key stays here.
    pub ca: ca::ClusterCa,
    /// The key app JWTs are signed with (`identity: jwt`).
    pub(crate) jwt: jwt::JwtKey,
    /// When each service identity last authenticated here (host id → ms).
    pub(crate) last_seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// How long service certificates and identities last.
    pub identity_ttl_ms: i64,
    /// This auth-service's own certificate, renewed in place.
    pub cert: Arc<portico_tls::CertStore>,
    /// Open watches, re-checked together (`rechecks::run`).
    pub rechecks: rechecks::Rechecks,
    stop: watch::Sender<bool>,
}

/// What a service running in this process needs to talk to the cluster.
pub use portico_proto::join::Issued as IssuedIdentity;

/// Audit events handed over by a service in this process: checked and
/// stored as `EmitEvents` does, under the service's own name, without
/// gRPC (the all-in-one's proxy uses it).
pub struct LocalAuditor(Arc<AuthServer>);

impl portico_proto::client::LocalAudit for LocalAuditor {
    fn emit<'a>(
        &'a self,
        actor: &'a str,
        events: &'a [portico_proto::v1::EmitEventRequest],
    ) -> portico_proto::client::EmitFuture<'a> {
        Box::pin(grpc::store_events(&self.0, events, actor))
    }
}

impl AuthServer {
    /// `/readyz`: 200 while the database answers within 2 s, else 503 with why.
    pub async fn readiness(&self) -> (axum::http::StatusCode, &'static str) {
        let probe = tokio::time::timeout(Duration::from_secs(2), self.backend.current_revision());
        match probe.await {
            Ok(Ok(_)) => (axum::http::StatusCode::OK, "ok\n"),
            Ok(Err(_)) => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the database is not answering\n",
            ),
            Err(_) => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the database did not answer within 2 s\n",
            ),
        }
    }

    /// Opens storage (retrying Postgres until it answers), creates the preset
    /// roles and starts the change feed and the expiry sweeper.
    pub async fn open(cfg: &AuthConfig, data_dir: &Path) -> Result<Arc<Self>, Error> {
        let backend: Arc<dyn Backend> = match &cfg.storage {
            StorageConfig::Sqlite { path } => {
                let dir = path.clone().unwrap_or_else(|| data_dir.to_path_buf());
                Arc::new(SqliteBackend::open(&dir).await?)
            }
            StorageConfig::Postgres { conn_string } => {
                Arc::new(PostgresBackend::connect_with_retry(conn_string).await)
            }
        };
        Self::with_backend(backend, cfg).await
    }

    pub async fn with_backend(
        backend: Arc<dyn Backend>,
        cfg: &AuthConfig,
    ) -> Result<Arc<Self>, Error> {
        let Durations {
            session_ttl_ms,
            identity_ttl_ms,
            event_retention_age_ms,
            audit_retention_age_ms,
        } = cfg.durations()?;
        let fresh = backend.current_revision().await? == 0;
        let extended = backend.extend_leases(now_ms() + LEASE_GRACE_MS).await?;
        if extended > 0 {
            tracing::info!(
                agents = extended,
                "gave agents' leases one more period to renew"
            );
        }
        let ca = ca::ClusterCa::load_or_create(backend.as_ref()).await?;
        let jwt = jwt::JwtKey::load_or_create(backend.as_ref()).await?;
        let (cert_pem, key_pem) = ca.issue(
            portico_tls::CertRole::Auth,
            AUTH_HOST_ID,
            Duration::from_millis(identity_ttl_ms as u64),
        )?;
        let cert = portico_tls::CertStore::new(&cert_pem, &key_pem).map_err(Error::internal)?;
        let (stop, stop_rx) = watch::channel(false);
        let hub = Hub::start(backend.clone(), stop_rx.clone()).await?;
        let server = Arc::new(AuthServer {
            backend,
            hub,
            session_ttl_ms,
            public_metrics: cfg.public_metrics,
            limiter: LoginLimiter::new(
                LOGIN_MAX_FAILURES,
                Duration::from_secs(60),
                Duration::from_secs(30),
            ),
            password_checks: Arc::new(tokio::sync::Semaphore::new(PASSWORD_CHECKS_AT_ONCE)),
            metrics: Metrics::default(),
            ca,
            jwt,
            last_seen: Default::default(),
            identity_ttl_ms,
            cert,
            rechecks: Default::default(),
            stop,
        });
        server.bootstrap_roles().await?;
        if fresh {
            server.bootstrap_tokens(&cfg.bootstrap_tokens).await?;
        }
        tokio::spawn(renew_own_certificate(server.clone(), stop_rx.clone()));
        tokio::spawn(rechecks::run(server.clone(), stop_rx.clone()));
        tokio::spawn(sweeper(
            server.clone(),
            stop_rx,
            Retention {
                count: cfg.event_retention.unwrap_or(DEFAULT_EVENT_RETENTION),
                age_ms: event_retention_age_ms,
                audit_age_ms: audit_retention_age_ms,
            },
        ));
        Ok(server)
    }

    async fn bootstrap_roles(&self) -> Result<(), Error> {
        for role in preset_roles() {
            if self
                .backend
                .get(Kind::Role, &role.metadata.name)
                .await?
                .is_some()
            {
                continue;
            }
            let r = Resource::Role(role);
            let op = WriteOp::Put {
                kind: Kind::Role,
                name: r.name().to_string(),
                value: resources::to_stored(&r),
                expires: None,
                mode: PutMode::Create,
            };
            match self.backend.apply(&[op]).await {
                Ok(_) => tracing::info!(role = r.name(), "created preset role"),
                Err(e) if e.code == Code::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        self.hub.poke();
        Ok(())
    }

    async fn bootstrap_tokens(&self, tokens: &[BootstrapToken]) -> Result<(), Error> {
        for (i, t) in tokens.iter().enumerate() {
            if t.token.trim().len() < 16 {
                return Err(Error::bad_request(format!(
                    "auth_service.bootstrap_tokens[{i}].token: use at least 16 random characters"
                )));
            }
            let ttl = match &t.ttl {
                Some(s) => parse_duration(s).ok_or_else(|| {
                    Error::bad_request(format!(
                        "auth_service.bootstrap_tokens[{i}].ttl: {s:?} is not a duration"
                    ))
                })?,
                None => 24 * 3600 * 1000,
            };
            let mut roles = Vec::new();
            for r in &t.roles {
                roles.push(portico_core::SystemRole::parse(r).ok_or_else(|| {
                    Error::bad_request(format!(
                        "auth_service.bootstrap_tokens[{i}].roles: unknown role {r:?}; use app or proxy"
                    ))
                })?);
            }
            let name = identity::token_name(t.token.trim());
            let expires = now_ms() + ttl;
            let mut meta = portico_core::Metadata::named(&name);
            meta.expires = Some(portico_core::time::format_rfc3339(expires));
            let token = Resource::Token(portico_core::Object::new(
                Kind::Token,
                meta,
                portico_core::TokenSpec { roles },
            ));
            let op = WriteOp::Put {
                kind: Kind::Token,
                name,
                value: resources::to_stored(&token),
                expires: Some(expires),
                mode: PutMode::Upsert,
            };
            self.backend.apply(&[op]).await?;
        }
        if !tokens.is_empty() {
            tracing::info!(count = tokens.len(), "created bootstrap join tokens");
            self.hub.poke();
        }
        Ok(())
    }

    /// Writes a fresh local admin identity into `data_dir` (the previous
    /// one stops working), and writes it again at two thirds of its life
    /// for as long as this auth-service runs.
    pub async fn ensure_admin_identity(
        self: &Arc<Self>,
        data_dir: &Path,
        auth_addr: &str,
    ) -> Result<PathBuf, Error> {
        let path = data_dir.join(ADMIN_IDENTITY_FILE);
        let mut old = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| yaml_serde::from_str::<IdentityFile>(&text).ok())
            .map(|id| id.token);
        let expires = self
            .write_admin_identity(&path, auth_addr, old.take())
            .await?;
        tracing::info!(path = %path.display(), "wrote the local admin identity");
        let me = self.clone();
        let (p, addr) = (path.clone(), auth_addr.to_string());
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let mut expires = expires;
            loop {
                let wait = renewal_wait(expires, me.identity_ttl_ms);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                let current = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| yaml_serde::from_str::<IdentityFile>(&t).ok())
                    .map(|id| id.token);
                match me.write_admin_identity(&p, &addr, current).await {
                    Ok(e) => expires = e,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the local admin identity");
                        expires = now_ms() + 10_000;
                    }
                }
            }
        });
        Ok(path)
    }

    /// Issues an admin token, writes it with the CA, revokes `old`.
    async fn write_admin_identity(
        &self,
        path: &Path,
        auth_addr: &str,
        old: Option<String>,
    ) -> Result<i64, Error> {
        let expires = now_ms() + self.identity_ttl_ms;
        let token = self
            .new_session("admin", PrincipalType::Admin, &[], Some(expires))
            .await?;
        write_identity(
            path,
            &IdentityFile {
                auth_server: auth_addr.to_string(),
                principal: "admin".into(),
                token,
                expires: Some(portico_core::time::format_rfc3339(expires)),
                ca: Some(self.ca.cert_pem.clone()),
                cert: None,
                key: None,
            },
        )?;
        if let Some(old) = old
            && let Ok(Some(s)) = self.backend.session(&hash_token(&old)).await
            && s.ptype == PrincipalType::Admin.as_str()
        {
            // Still valid for a few seconds, for commands already running.
            let _ = self
                .backend
                .extend_session(&hash_token(&old), now_ms() + 5_000)
                .await;
        }
        Ok(expires)
    }

    /// Where services in this process hand their audit events.
    pub fn local_auditor(self: &Arc<Self>) -> Arc<LocalAuditor> {
        Arc::new(LocalAuditor(self.clone()))
    }

    /// An identity for a service running in this process (the all-in-one).
    pub async fn issue_service_identity(
        &self,
        host_id: &str,
        role: portico_core::SystemRole,
    ) -> Result<IssuedIdentity, Error> {
        // A fresh identity for an in-process service replaces the last one.
        self.backend.revoke_service(host_id).await?;
        let expires = now_ms() + self.identity_ttl_ms;
        let token = self
            .new_session(
                host_id,
                PrincipalType::Service,
                &[role.as_str().to_string()],
                Some(expires),
            )
            .await?;
        let (cert_pem, key_pem) = self.ca.issue(
            cert_role(role),
            host_id,
            Duration::from_millis(self.identity_ttl_ms as u64),
        )?;
        Ok(IssuedIdentity {
            token,
            cert_pem,
            key_pem,
            ca_pem: self.ca.cert_pem.clone(),
            expires_ms: expires,
        })
    }

    /// The TLS configuration of the API listener: this service's
    /// certificate; client certificates optional (users have none) and
    /// checked against the cluster CA when sent.
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        portico_tls::config::cluster_server(
            self.cert.clone(),
            &self.ca.cert_pem,
            portico_tls::ClientAuth::Optional,
            &[portico_tls::ALPN_H2, b"http/1.1"],
        )
        .map_err(Error::internal)
    }

    pub(crate) async fn new_session(
        &self,
        principal: &str,
        ptype: PrincipalType,
        roles: &[String],
        expires: Option<i64>,
    ) -> Result<String, Error> {
        let token = random_token();
        self.backend
            .put_session(&SessionRow {
                token_hash: hash_token(&token),
                principal: principal.to_string(),
                ptype: ptype.as_str().to_string(),
                roles: serde_json::to_string(roles).unwrap_or_else(|_| "[]".into()),
                expires,
            })
            .await?;
        Ok(token)
    }

    /// Appends to the audit log; a failure is logged, never shown to the caller.
    pub async fn audit(&self, kind: &str, actor: &str, success: bool, fields: serde_json::Value) {
        let rec = AuditRecord {
            id: 0,
            time_ms: now_ms(),
            kind: kind.to_string(),
            actor: actor.to_string(),
            success,
            fields: fields.to_string(),
        };
        if let Err(e) = self.backend.append_audit(std::slice::from_ref(&rec)).await {
            tracing::error!(error = %e, event = kind, "cannot write audit event");
        }
    }

    /// Ends watch streams and background tasks.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        format!(
            "# TYPE portico_auth_requests_total counter\nportico_auth_requests_total {}\n\
             # TYPE portico_auth_logins_total counter\nportico_auth_logins_total{{result=\"ok\"}} {}\nportico_auth_logins_total{{result=\"failed\"}} {}\n\
             # TYPE portico_auth_writes_total counter\nportico_auth_writes_total {}\n\
             # TYPE portico_auth_revision gauge\nportico_auth_revision {}\n\
             # TYPE portico_auth_watchers gauge\nportico_auth_watchers {}\n\
             # TYPE portico_auth_watch_app_events_skipped_total counter\nportico_auth_watch_app_events_skipped_total {}\n",
            m.requests.load(Ordering::Relaxed),
            m.logins_ok.load(Ordering::Relaxed),
            m.logins_failed.load(Ordering::Relaxed),
            m.writes.load(Ordering::Relaxed),
            self.hub.last_revision(),
            self.hub.watchers(),
            self.hub.skipped_apps(),
        )
    }
}

fn write_identity(path: &Path, id: &IdentityFile) -> Result<(), Error> {
    let text = yaml_serde::to_string(id)
        .map_err(|e| Error::internal(format!("cannot encode identity: {e}")))?;
    portico_proto::files::write_private(path, text.as_bytes())
        .map_err(|e| Error::unavailable(format!("cannot write {}: {e}", path.display())))
}

/// The certificate role of a system role.
pub fn cert_role(role: portico_core::SystemRole) -> portico_tls::CertRole {
    match role {
        portico_core::SystemRole::App => portico_tls::CertRole::App,
        portico_core::SystemRole::Proxy => portico_tls::CertRole::Proxy,
    }
}

/// How long to wait before renewing something that expires at `expires`
/// (ms) and lasts `life` (ms): until two thirds of its life have passed.
pub fn renewal_wait(expires: i64, life: i64) -> Duration {
    let at = expires - life / 3;
    Duration::from_millis((at - now_ms()).clamp(1_000, i64::MAX) as u64)
}

/// Re-issues this auth-service's own certificate at two thirds of its life.
async fn renew_own_certificate(server: Arc<AuthServer>, mut stop: watch::Receiver<bool>) {
    loop {
        let expires = server.cert.id().not_after * 1000;
        tokio::select! {
            _ = tokio::time::sleep(renewal_wait(expires, server.identity_ttl_ms)) => {}
            _ = stop.changed() => return,
        }
        let life = Duration::from_millis(server.identity_ttl_ms as u64);
        match server
            .ca
            .issue(portico_tls::CertRole::Auth, AUTH_HOST_ID, life)
        {
            Ok((cert, key)) => {
                if let Err(e) = server.cert.replace(&cert, &key) {
                    tracing::error!(error = %e, "cannot use the renewed auth-service certificate");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot renew the auth-service certificate"),
        }
    }
}

/// How much of the change log compaction keeps, and of the audit log.
struct Retention {
    count: i64,
    age_ms: i64,
    audit_age_ms: i64,
}

/// Ends expired leases and records (producing delete events), and drops old
/// sessions and old events.
async fn sweeper(server: Arc<AuthServer>, mut stop: watch::Receiver<bool>, retention: Retention) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        n += 1;
        let now = now_ms();
        match server.backend.expired(now).await {
            Ok(list) if !list.is_empty() => {
                let ops: Vec<WriteOp> = list
                    .into_iter()
                    .map(|(kind, name)| WriteOp::Delete {
                        kind,
                        name,
                        expired_before: Some(now),
                    })
                    .collect();
                match server.backend.apply(&ops).await {
                    Ok(evs) if !evs.is_empty() => server.hub.poke(),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "expiry sweep cannot read"),
        }
        match server.backend.expired_leases(now).await {
            Ok(hosts) => {
                for host in hosts {
                    match server.backend.end_lease(&host, Some(now)).await {
                        Ok(evs) if !evs.is_empty() => {
                            tracing::info!(host_id = %host, apps = evs.len(), "an agent's lease ended; withdrew its apps");
                            server.hub.poke();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(host_id = %host, error = %e, "cannot end an expired lease")
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "lease sweep cannot read"),
        }
        if n.is_multiple_of(60) {
            if let Err(e) = server.backend.purge_sessions(now).await {
                tracing::debug!(error = %e, "session purge failed");
            }
            if let Err(e) = server
                .backend
                .compact(retention.count, now - retention.age_ms)
                .await
            {
                tracing::debug!(error = %e, "event compaction failed");
            }
            match server
                .backend
                .purge_audit(now - retention.audit_age_ms)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    records = n,
                    "dropped audit records older than auth_service.audit_retention_age"
                ),
                Err(e) => tracing::debug!(error = %e, "audit purge failed"),
            }
        }
    }
}

/// Serves the gRPC API plus `/healthz`, `/readyz` and `/metrics` on `listener`
/// until `shutdown` resolves.
pub async fn serve(
    server: Arc<AuthServer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let routes = grpc::routes(server.clone());
    let incoming = portico_tls::net::incoming(
        listener,
        server.tls_config()?,
        portico_tls::Plaintext::Refuse("the auth-service API"),
    );
    let srv = server.clone();
    let signal = async move {
        shutdown.await;
        srv.shutdown();
    };
    tonic::transport::Server::builder()
        .accept_http1(true)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal)
        .await
        .map_err(|e| Error::unavailable(format!("auth-service stopped: {e}")))
}
