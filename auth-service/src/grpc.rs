//! The gRPC API. Every handler authenticates the caller and checks
//! `(kind, verb)` against their roles before it touches storage. Every
//! refusal (unauthenticated or permission denied) is audited as
//! `api.denied` with the method, the caller when known and the source
//! address; open watch streams re-check their caller twice a second.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portico_core::SystemRole;
use portico_core::labels::LabelSelector;
use portico_core::resource::{app_server_name, validate_name};
use portico_core::time::{format_rfc3339, now_ms};
use portico_core::{
    AccessChecker, AppServerSpec, Code, Error, Kind, Metadata, Object, Resource, TokenSpec,
    UserSpec, Verb,
};
use portico_proto::convert::to_status;
use portico_proto::v1::*;
use portico_proto::{AuthService, AuthServiceServer};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use portico_tls::{PeerId, PeerInfo};

use crate::AuthServer;
use crate::identity::hash_token;
use crate::identity::{
    Principal, PrincipalType, authenticate, bearer, generate_password, hash_password, principal_of,
    random_token, token_name, verify_password_limited,
};
use crate::limiter::Refused;
use crate::storage::{AuditRecord, PutMode, WriteOp};

/// Largest request the API accepts (a resource file is at most 1 MiB).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Agent tokens checked in one `CheckAgents` call.
const MAX_AGENT_CHECKS: usize = 10_000;
/// Apps served or withdrawn in one heartbeat.
const MAX_ANNOUNCE_BATCH: usize = 2_000;
const MAX_TOKEN_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
const DEFAULT_TOKEN_TTL_MS: i64 = 3600 * 1000;
/// How long a login waits for a turn to check its password.
const PASSWORD_CHECK_WAIT: Duration = Duration::from_secs(5);
/// Events buffered between a watch's guard and the client's stream.
const WATCH_BUFFER: usize = 64;
/// The actor of a refusal whose caller could not be identified.
const UNAUTHENTICATED_ACTOR: &str = "(unauthenticated)";

pub fn routes(server: Arc<AuthServer>) -> tonic::service::Routes {
    use axum::routing::get;
    let grpc = AuthServiceServer::new(Api { s: server.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(64 * 1024 * 1024);
    let m = server.clone();
    let r = server.clone();
    let router = tonic::service::Routes::new(grpc)
        .into_axum_router()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move { r.readiness().await }
            }),
        )
        .route(
            "/metrics",
            get(move |req: axum::extract::Request| {
                let m = m.clone();
                async move {
                    let peer = req
                        .extensions()
                        .get::<PeerInfo>()
                        .and_then(|c| c.remote);
                    if !m.public_metrics && !peer.is_some_and(|p| p.ip().is_loopback()) {
                        return (
                            axum::http::StatusCode::FORBIDDEN,
                            "metrics answer only on loopback; set auth_service.public_metrics: true to serve them to other addresses\n".to_string(),
                        );
                    }
                    (axum::http::StatusCode::OK, m.metrics_text())
                }
            }),
        );
    tonic::service::Routes::from(router)
}

pub struct Api {
    s: Arc<AuthServer>,
}

type Res<T> = Result<Response<T>, Status>;

fn kind_arg(k: &str) -> Result<Kind, Status> {
    Kind::parse(k).filter(|k| *k != Kind::Event).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {k:?}; expected one of app, role, user, token, app_server"
        ))
    })
}

/// The address a call came from: the IP of its TCP peer, or, for a call a
/// proxy forwards (proven by the proxy's client certificate), the client
/// address the proxy names in `x-portico-client-addr`. Anyone else's
/// `x-forwarded-for` and the like are not read, since any client can send
/// them.
fn source_of<T>(req: &Request<T>) -> String {
    let info = req.extensions().get::<PeerInfo>();
    let via_proxy = info
        .and_then(|i| i.id.as_ref())
        .is_some_and(|id| id.role == portico_tls::pki::CertRole::Proxy);
    if via_proxy
        && let Some(addr) = req
            .metadata()
            .get(portico_proto::client::CLIENT_ADDR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<std::net::IpAddr>().ok())
    {
        return addr.to_canonical().to_string();
    }
    info.and_then(|i| i.remote)
        .map(|a| a.ip().to_canonical().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The service identity in the caller's client certificate, if it sent one.
fn peer_of<T>(req: &Request<T>) -> Option<PeerId> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|i| i.id.clone())
}

/// A service's token counts only over mutual TLS with that service's own
/// certificate: a token copied elsewhere, or sent through a proxy, is
/// refused. Users and the local admin have no certificate. One exception:
/// a proxy asks `WhoAmI` with the token an agent gave it in the tunnel
/// handshake, to learn whether that identity is live (nothing else).
fn certificate_matches(p: &Principal, peer: Option<&PeerId>, method: &str) -> Result<(), Error> {
    if p.ptype != PrincipalType::Service {
        return Ok(());
    }
    let want = p.service_role.map(crate::cert_role);
    match peer {
        Some(id) if Some(id.role) == want && id.host_id == p.name => Ok(()),
        Some(id)
            if id.role == portico_tls::CertRole::Proxy
                && method == "who_am_i"
                && want == Some(portico_tls::CertRole::App) =>
        {
            Ok(())
        }
        Some(id) => Err(Error::unauthenticated(format!(
            "this identity belongs to {} {:?}, but the connection's certificate names {} {:?}",
            want.map(|r| r.as_str()).unwrap_or("?"),
            p.name,
            id.role,
            id.host_id
        ))),
        None => Err(Error::unauthenticated(
            "a service identity is accepted only over mutual TLS with its own certificate",
        )),
    }
}

/// The network a guesser controls as a whole: an IPv4 address, or the /64
/// of an IPv6 one (a single host usually holds a whole /64).
fn guess_network(source: &str) -> String {
    match source.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => source.to_string(),
    }
}

fn is_denial(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    )
}

/// An authenticated call: who, through which method, from where.
struct Caller {
    p: Principal,
    method: &'static str,
    source: String,
}

/// What an `api.denied` audit event records.
struct Denial<'a> {
    method: &'a str,
    source: &'a str,
    caller: Option<&'a Principal>,
    kind: Option<Kind>,
    verb: Option<Verb>,
    name: Option<&'a str>,
}

impl Denial<'_> {
    async fn record(&self, s: &AuthServer, status: &Status) {
        let code = if status.code() == tonic::Code::Unauthenticated {
            "unauthenticated"
        } else {
            "permission_denied"
        };
        let actor = self
            .caller
            .map(|p| p.name.as_str())
            .unwrap_or(UNAUTHENTICATED_ACTOR);
        let fields = serde_json::json!({
            "method": self.method,
            "kind": self.kind.map(|k| k.as_str()),
            "verb": self.verb.map(|v| v.as_str()),
            "name": self.name,
            "caller": self.caller.map(|p| p.name.as_str()),
            "principal_type": self.caller.map(|p| p.ptype.as_str()),
            "code": code,
            "error": status.message(),
            "source": self.source,
        });
        s.audit("api.denied", actor, false, fields).await;
    }
}

impl Api {
    /// Authenticates the call; a refusal is audited with its source address.
    async fn caller<T>(&self, req: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let source = source_of(req);
        let peer = peer_of(req);
        let who = authenticate(self.s.backend.as_ref(), bearer(req.metadata()))
            .await
            .and_then(|p| certificate_matches(&p, peer.as_ref(), method).map(|()| p));
        match who {
            Ok(p) => {
                if p.ptype == PrincipalType::Service {
                    self.s
                        .last_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(p.name.clone(), now_ms());
                }
                Ok(Caller { p, method, source })
            }
            Err(e) => {
                let status = to_status(e);
                if is_denial(&status) {
                    Denial {
                        method,
                        source: &source,
                        caller: None,
                        kind: None,
                        verb: None,
                        name: None,
                    }
                    .record(&self.s, &status)
                    .await;
                }
                Err(status)
            }
        }
    }

    async fn check(&self, c: &Caller, kind: Kind, verb: Verb) -> Result<(), Status> {
        self.check_named(c, kind, verb, None).await
    }

    /// `(kind, verb)` against the caller's roles; a refusal is audited.
    async fn check_named(
        &self,
        c: &Caller,
        kind: Kind,
        verb: Verb,
        name: Option<&str>,
    ) -> Result<(), Status> {
        match c.p.checker.check(kind, verb) {
            Ok(()) => Ok(()),
            Err(e) => Err(self
                .denied(c, Some(kind), Some(verb), name, to_status(e))
                .await),
        }
    }

    /// Audits `status` as `api.denied` when it refuses the caller; returns it.
    async fn denied(
        &self,
        c: &Caller,
        kind: Option<Kind>,
        verb: Option<Verb>,
        name: Option<&str>,
        status: Status,
    ) -> Status {
        if is_denial(&status) {
            Denial {
                method: c.method,
                source: &c.source,
                caller: Some(&c.p),
                kind,
                verb,
                name,
            }
            .record(&self.s, &status)
            .await;
        }
        status
    }

    /// Audit events come from services only (proxies, agents), never from
    /// people, who could otherwise write whatever history they liked.
    async fn require_service(&self, c: &Caller) -> Result<(), Status> {
        if c.p.ptype == PrincipalType::Service {
            return Ok(());
        }
        let status = Status::permission_denied(format!(
            "access denied: only services (proxies and agents) write audit events, not the {} {:?}",
            c.p.ptype.as_str(),
            c.p.name
        ));
        Err(self
            .denied(c, Some(Kind::Event), Some(Verb::Create), None, status)
            .await)
    }

    async fn written(&self) {
        self.s.metrics.writes.fetch_add(1, Ordering::Relaxed);
        self.s.hub.poke();
    }

    /// Checks one resource of a create call: it parses, the caller may
    /// create (or, when it exists and `overwrite`, update) it, and a user
    /// gets no role its creator could not grant.
    async fn plan_one(
        &self,
        c: &Caller,
        i: usize,
        r: &portico_proto::v1::Resource,
        overwrite: bool,
    ) -> Result<(Kind, String, Verb, Resource), Status> {
        let kind = kind_arg(&r.kind)?;
        if matches!(kind, Kind::Token | Kind::AppServer) {
            return Err(Status::invalid_argument(format!(
                "resource {}: {kind} resources are not created from files; use pctl tokens add",
                i + 1
            )));
        }
        let res = Resource::from_json(kind, &r.json)
            .map_err(|e| Status::invalid_argument(format!("resource {}: {e}", i + 1)))?;
        let name = res.name().to_string();
        let exists = self
            .s
            .backend
            .get(kind, &name)
            .await
            .map_err(to_status)?
            .is_some();
        let verb = match (exists, overwrite) {
            (true, false) => {
                // Whoever may not create learns nothing about what exists.
                self.check_named(c, kind, Verb::Create, Some(name.as_str()))
                    .await?;
                let msg =
                    format!("{kind} {name:?} already exists; use pctl create -f to overwrite it");
                self.refused(c, &format!("{kind}.create"), &name, &msg)
                    .await;
                return Err(Status::already_exists(msg));
            }
            (true, true) => Verb::Update,
            (false, _) => Verb::Create,
        };
        self.check_named(c, kind, verb, Some(name.as_str())).await?;
        if let Resource::User(u) = &res
            && let Err(e) = self.user_allowed(&c.p, &name, &u.spec.roles)
        {
            if is_denial(&e) {
                return Err(self
                    .denied(c, Some(kind), Some(verb), Some(name.as_str()), e)
                    .await);
            }
            self.refused(c, &format!("{kind}.{verb}"), &name, e.message())
                .await;
            return Err(e);
        }
        Ok((kind, name, verb, res))
    }

    /// A user may not take a name the system uses, nor get a role its
    /// creator does not hold, nor lack one of its creator's roles that deny
    /// something, unless the creator may write roles (and so could grant
    /// itself any permission anyway).
    fn user_allowed(&self, p: &Principal, name: &str, roles: &[String]) -> Result<(), Status> {
        if portico_core::principal::is_reserved_name(name) {
            return Err(Status::invalid_argument(format!(
                "the user name {name:?} is reserved for the system; choose another"
            )));
        }
        let writes_roles = p.checker.allows(Kind::Role, Verb::Create)
            && p.checker.allows(Kind::Role, Verb::Update);
        if writes_roles {
            return Ok(());
        }
        if let Some(r) = roles.iter().find(|r| !p.roles.contains(r)) {
            return Err(Status::permission_denied(format!(
                "access denied: you cannot grant the role {r:?}, which you do not hold; ask someone who may write roles"
            )));
        }
        // Roles that deny: a user holding some of the caller's roles but not
        // these could do what the caller may not.
        if let Some(r) = p
            .checker
            .denying_roles()
            .find(|d| !roles.iter().any(|r| r == d))
        {
            return Err(Status::permission_denied(format!(
                "access denied: the role {r:?}, which you hold, denies you something, so every user you create or change must hold it too; ask someone who may write roles"
            )));
        }
        Ok(())
    }

    async fn refused(&self, c: &Caller, event: &str, name: &str, error: &str) {
        self.s
            .audit(
                event,
                &c.p.name,
                false,
                serde_json::json!({"name": name, "error": error, "method": c.method, "source": c.source}),
            )
            .await;
    }
}

#[tonic::async_trait]
impl AuthService for Api {
    async fn create(&self, req: Request<CreateRequest>) -> Res<CreateResponse> {
        let c = self.caller(&req, "create").await?;
        let req = req.into_inner();
        if req.resources.is_empty() {
            return Err(Status::invalid_argument("nothing to create"));
        }
        let mut plan = Vec::with_capacity(req.resources.len());
        let mut seen = std::collections::HashSet::new();
        for (i, r) in req.resources.iter().enumerate() {
            let (kind, name, verb, res) = self.plan_one(&c, i, r, req.overwrite).await?;
            if !seen.insert((kind, name.clone())) {
                return Err(Status::invalid_argument(format!(
                    "{kind} {name:?} appears twice"
                )));
            }
            plan.push((kind, name, verb, res));
        }
        let ops: Vec<WriteOp> = plan
            .iter()
            .map(|(kind, name, verb, res)| WriteOp::Put {
                kind: *kind,
                name: name.clone(),
                value: crate::resources::to_stored(res),
                expires: None,
                mode: if *verb == Verb::Create {
                    PutMode::Create
                } else {
                    PutMode::Update
                },
            })
            .collect();
        let result = self.s.backend.apply(&ops).await;
        for (kind, name, verb, _) in &plan {
            let ok = result.is_ok();
            let fields = serde_json::json!({"name": name, "error": result.as_ref().err().map(|e| e.message.clone())});
            self.s
                .audit(&format!("{kind}.{verb}"), &c.p.name, ok, fields)
                .await;
        }
        let events = result.map_err(|e| {
            if e.code == Code::AlreadyExists {
                to_status(Error::already_exists(format!(
                    "{}; use pctl create -f to overwrite it",
                    e.message
                )))
            } else {
                to_status(e)
            }
        })?;
        self.written().await;
        let results = plan
            .iter()
            .zip(events.iter())
            .map(|((kind, name, verb, _), ev)| CreateResult {
                kind: kind.as_str().into(),
                name: name.clone(),
                created: *verb == Verb::Create,
                revision: ev.revision,
            })
            .collect();
        Ok(Response::new(CreateResponse { results }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Res<portico_proto::v1::Resource> {
        let c = self.caller(&req, "get").await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        self.check_named(&c, kind, Verb::Read, Some(req.name.as_str()))
            .await?;
        let rec = self
            .s
            .backend
            .get(kind, &req.name)
            .await
            .map_err(to_status)?;
        let Some(rec) = rec else {
            return Err(Status::not_found(format!(
                "{kind} {:?} not found",
                req.name
            )));
        };
        Ok(Response::new(portico_proto::v1::Resource {
            kind: kind.as_str().into(),
            json: crate::resources::stamp(&rec.value, rec.revision, rec.expires),
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Res<ListResponse> {
        let c = self.caller(&req, "list").await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        self.check(&c, kind, Verb::List).await?;
        let recs = self.s.backend.list(kind).await.map_err(to_status)?;
        let mut items = Vec::with_capacity(recs.len());
        for rec in recs {
            if !req.labels.is_empty() {
                let Ok(r) = Resource::from_json(kind, &rec.value) else {
                    continue;
                };
                let labels = &r.metadata().labels;
                if !req.labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                    continue;
                }
            }
            items.push(portico_proto::v1::Resource {
                kind: kind.as_str().into(),
                json: crate::resources::stamp(&rec.value, rec.revision, rec.expires),
            });
        }
        Ok(Response::new(ListResponse { items }))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Res<DeleteResponse> {
        let c = self.caller(&req, "delete").await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        self.check_named(&c, kind, Verb::Delete, Some(req.name.as_str()))
            .await?;
        if kind == Kind::AppServer {
            // Its agent would not know to announce it again while its
            // lease lives.
            return Err(Status::failed_precondition(
                "app_server records belong to the agents that serve them: one goes when its agent stops serving the app (the app is deleted or its labels change), when the agent stops, when its lease ends, or when its identity is revoked (pctl identities rm HOST_ID)",
            ));
        }
        let result = self
            .s
            .backend
            .apply(&[WriteOp::Delete {
                kind,
                name: req.name.clone(),
                expired_before: None,
            }])
            .await;
        if kind == Kind::User && result.is_ok() {
            self.s
                .backend
                .delete_principal(&req.name)
                .await
                .map_err(to_status)?;
        }
        let err = result.as_ref().err().map(|e| e.message.clone());
        self.s
            .audit(
                &format!("{kind}.delete"),
                &c.p.name,
                result.is_ok(),
                serde_json::json!({"name": req.name, "error": err}),
            )
            .await;
        let evs = result.map_err(to_status)?;
        self.written().await;
        Ok(Response::new(DeleteResponse {
            revision: evs.first().map(|e| e.revision).unwrap_or(0),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Res<Self::WatchStream> {
        let c = self.caller(&req, "watch").await?;
        let token = bearer(req.metadata());
        let req = req.into_inner();
        let kinds = req
            .kinds
            .iter()
            .map(|k| kind_arg(k))
            .collect::<Result<Vec<_>, _>>()?;
        let check_kinds = if kinds.is_empty() {
            Kind::RESOURCES.to_vec()
        } else {
            kinds.clone()
        };
        for k in &check_kinds {
            self.check(&c, *k, Verb::List).await?;
            self.check(&c, *k, Verb::Read).await?;
        }
        let apps = app_selectors(&req)?;
        let events = self
            .s
            .hub
            .watch(check_kinds.clone(), req.from_revision, apps);
        let (out, rx) = mpsc::channel(WATCH_BUFFER);
        let watching = Watching {
            token,
            kinds: check_kinds,
            p: c.p,
            source: c.source,
        };
        tokio::spawn(guard_watch(self.s.clone(), watching, events, out));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn login(&self, req: Request<LoginRequest>) -> Res<LoginResponse> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let source = source_of(&req);
        let req = req.into_inner();
        let user = req.user.trim().to_string();
        if user.is_empty() || user.len() > 63 || req.password.len() > 1024 {
            return Err(Status::invalid_argument(
                "a user name and a password are required",
            ));
        }
        // The attempt is counted before the password is checked, so guesses
        // sent at once cannot get more checks than the limit between them.
        let attempt = match self.s.limiter.begin(&user, &guess_network(&source)) {
            Ok(a) => a,
            Err(refused) => {
                let (error, message) = match refused {
                    Refused::Locked(wait) => (
                        "rate limited",
                        format!(
                            "too many failed logins for {user:?}; try again in {} s",
                            wait.as_secs() + 1
                        ),
                    ),
                    Refused::Busy => (
                        "rate limited: too many attempts at once",
                        format!(
                            "too many failed logins for {user:?} (or too many attempts at once); try again in a few seconds"
                        ),
                    ),
                };
                self.s
                    .audit(
                        "user.login",
                        &user,
                        false,
                        serde_json::json!({"error": error, "source": source}),
                    )
                    .await;
                return Err(Status::resource_exhausted(message));
            }
        };
        let hash = self.s.backend.password(&user).await.map_err(to_status)?;
        let user_rec = self
            .s
            .backend
            .get(Kind::User, &user)
            .await
            .map_err(to_status)?;
        // Few password checks run at once, so that calls anyone may make
        // cannot take all the memory and CPU; the rest wait a little.
        let permit = match tokio::time::timeout(
            PASSWORD_CHECK_WAIT,
            self.s.password_checks.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(user = %user, source = %source, "login refused: too many password checks at once");
                // The attempt was not checked: it goes back uncounted.
                drop(attempt);
                return Err(Status::unavailable("too many logins at once; try again"));
            }
        };
        let ok = match (hash, &user_rec) {
            (Some(h), Some(_)) => verify_password_limited(req.password, h, permit).await,
            _ => {
                // Spend the same time on unknown users as on known ones.
                let dummy = dummy_hash().await;
                let _ = verify_password_limited(req.password, dummy, permit).await;
                false
            }
        };
        if !ok {
            attempt.fail();
            self.s.metrics.logins_failed.fetch_add(1, Ordering::Relaxed);
            self.s
                .audit(
                    "user.login",
                    &user,
                    false,
                    serde_json::json!({"error": "invalid user name or password", "source": source}),
                )
                .await;
            return Err(Status::unauthenticated("invalid user name or password"));
        }
        attempt.succeed();
        // Said only to whoever knows the password.
        let locked = matches!(
            user_rec.as_ref().map(|r| Resource::from_json(Kind::User, &r.value)),
            Some(Ok(Resource::User(ref u))) if u.spec.locked
        );
        if locked {
            let msg =
                format!("user {user:?} is locked; an admin can unlock it (pctl users unlock)");
            self.s
                .audit(
                    "user.login",
                    &user,
                    false,
                    serde_json::json!({"error": msg, "source": source}),
                )
                .await;
            return Err(Status::permission_denied(msg));
        }
        let expires = now_ms() + self.s.session_ttl_ms;
        let token = self
            .s
            .new_session(&user, PrincipalType::User, &[], Some(expires))
            .await
            .map_err(to_status)?;
        self.s.metrics.logins_ok.fetch_add(1, Ordering::Relaxed);
        self.s
            .audit(
                "user.login",
                &user,
                true,
                serde_json::json!({"source": source}),
            )
            .await;
        let roles = user_rec
            .and_then(|r| match Resource::from_json(Kind::User, &r.value) {
                Ok(Resource::User(u)) => Some(u.spec.roles),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Response::new(LoginResponse {
            token,
            expires_ms: expires,
            user,
            roles,
        }))
    }

    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Res<WhoAmIResponse> {
        let p = self.caller(&req, "who_am_i").await?.p;
        Ok(Response::new(WhoAmIResponse {
            name: p.name,
            principal_type: p.ptype.as_str().into(),
            roles: p.roles,
            expires_ms: p.expires.unwrap_or(0),
        }))
    }

    async fn check_agents(&self, req: Request<CheckAgentsRequest>) -> Res<CheckAgentsResponse> {
        let c = self.caller(&req, "check_agents").await?;
        if c.p.ptype != PrincipalType::Service || c.p.service_role != Some(SystemRole::Proxy) {
            let status = Status::permission_denied("only proxies check agents' identities");
            return Err(self.denied(&c, None, None, None, status).await);
        }
        let tokens = req.into_inner().tokens;
        if tokens.len() > MAX_AGENT_CHECKS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AGENT_CHECKS} tokens per call"
            )));
        }
        // Every session in one query (a few for thousands), then each
        // decided as `authenticate` would.
        let hashes: Vec<String> = tokens.iter().map(|t| hash_token(t)).collect();
        let rows: std::collections::HashMap<String, crate::storage::SessionRow> = self
            .s
            .backend
            .sessions(&hashes)
            .await
            .map_err(to_status)?
            .into_iter()
            .map(|r| (r.token_hash.clone(), r))
            .collect();
        let mut agents = Vec::with_capacity(tokens.len());
        for hash in hashes {
            let row = rows.get(&hash).cloned();
            let verdict = match principal_of(self.s.backend.as_ref(), row).await {
                Ok(p)
                    if p.ptype == PrincipalType::Service
                        && p.service_role == Some(SystemRole::App) =>
                {
                    AgentCheck {
                        host_id: p.name,
                        refused: String::new(),
                    }
                }
                Ok(_) => AgentCheck {
                    host_id: String::new(),
                    refused: "this identity is not an app-service agent".into(),
                },
                Err(e) if e.code == Code::Unauthenticated => AgentCheck {
                    host_id: String::new(),
                    refused: e.message,
                },
                // Storage trouble is no verdict: the proxy asks again.
                Err(e) => return Err(to_status(e)),
            };
            agents.push(verdict);
        }
        Ok(Response::new(CheckAgentsResponse { agents }))
    }

    async fn logout(&self, req: Request<LogoutRequest>) -> Res<LogoutResponse> {
        let c = self.caller(&req, "logout").await?;
        if c.p.ptype != PrincipalType::User {
            return Err(Status::failed_precondition(
                "only a user's login session can be ended this way; services and the admin identity are revoked with pctl",
            ));
        }
        let token = bearer(req.metadata()).unwrap_or_default();
        self.s
            .backend
            .delete_session(&hash_token(&token))
            .await
            .map_err(to_status)?;
        self.s
            .audit(
                "user.logout",
                &c.p.name,
                true,
                serde_json::json!({"source": c.source}),
            )
            .await;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn add_user(&self, req: Request<AddUserRequest>) -> Res<AddUserResponse> {
        let c = self.caller(&req, "add_user").await?;
        let req = req.into_inner();
        self.check_named(&c, Kind::User, Verb::Create, Some(req.name.as_str()))
            .await?;
        validate_name(&req.name)
            .map_err(|e| Status::invalid_argument(e.within("user name").to_string()))?;
        if let Err(e) = self.user_allowed(&c.p, &req.name, &req.roles) {
            return Err(self
                .denied(
                    &c,
                    Some(Kind::User),
                    Some(Verb::Create),
                    Some(req.name.as_str()),
                    e,
                )
                .await);
        }
        for r in &req.roles {
            if self
                .s
                .backend
                .get(Kind::Role, r)
                .await
                .map_err(to_status)?
                .is_none()
            {
                return Err(Status::invalid_argument(format!(
                    "role {r:?} does not exist; create it first or pick one of: pctl get roles"
                )));
            }
        }
        if self
            .s
            .backend
            .get(Kind::User, &req.name)
            .await
            .map_err(to_status)?
            .is_some()
        {
            return Err(Status::already_exists(format!(
                "user {:?} already exists; remove it with pctl users rm first",
                req.name
            )));
        }
        let generated = req.password.is_empty();
        let password = if generated {
            generate_password()
        } else {
            req.password
        };
        if password.len() < 8 || password.len() > 1024 {
            return Err(Status::invalid_argument(
                "passwords must be 8 to 1024 characters long",
            ));
        }
        let hash = hash_password(password.clone()).await.map_err(to_status)?;
        let user = Resource::User(Object::new(
            Kind::User,
            Metadata::named(&req.name),
            UserSpec {
                roles: req.roles.clone(),
                locked: false,
            },
        ));
        let result = self
            .s
            .backend
            .apply(&[WriteOp::Put {
                kind: Kind::User,
                name: req.name.clone(),
                value: crate::resources::to_stored(&user),
                expires: None,
                mode: PutMode::Create,
            }])
            .await;
        let result = match result {
            Ok(_) => self.s.backend.set_password(&req.name, &hash).await,
            Err(e) => Err(e),
        };
        self.s
            .audit(
                "user.create",
                &c.p.name,
                result.is_ok(),
                serde_json::json!({"name": req.name, "roles": req.roles, "error": result.as_ref().err().map(|e| e.message.clone())}),
            )
            .await;
        result.map_err(to_status)?;
        self.written().await;
        Ok(Response::new(AddUserResponse {
            password: if generated { password } else { String::new() },
        }))
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Res<CreateTokenResponse> {
        let c = self.caller(&req, "create_token").await?;
        let req = req.into_inner();
        self.check(&c, Kind::Token, Verb::Create).await?;
        // A join token grants a system role nobody holds: only those who
        // may write roles (and so could grant anything) may mint one.
        self.check(&c, Kind::Role, Verb::Create).await?;
        self.check(&c, Kind::Role, Verb::Update).await?;
        let mut roles = Vec::new();
        for r in &req.roles {
            let Some(role) = SystemRole::parse(r) else {
                return Err(Status::invalid_argument(format!(
                    "unknown token type {r:?}; use app, proxy or app,proxy"
                )));
            };
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        if roles.is_empty() {
            return Err(Status::invalid_argument(
                "a token needs a type: --type=app, proxy or app,proxy",
            ));
        }
        let ttl = if req.ttl_ms <= 0 {
            DEFAULT_TOKEN_TTL_MS
        } else {
            req.ttl_ms
        };
        if ttl > MAX_TOKEN_TTL_MS {
            return Err(Status::invalid_argument(
                "token TTLs may be at most 30 days",
            ));
        }
        let secret = random_token();
        let name = token_name(&secret);
        let expires = now_ms() + ttl;
        let mut meta = Metadata::named(&name);
        meta.expires = Some(format_rfc3339(expires));
        let token = Resource::Token(Object::new(
            Kind::Token,
            meta,
            TokenSpec {
                roles: roles.clone(),
            },
        ));
        self.s
            .backend
            .apply(&[WriteOp::Put {
                kind: Kind::Token,
                name: name.clone(),
                value: crate::resources::to_stored(&token),
                expires: Some(expires),
                mode: PutMode::Create,
            }])
            .await
            .map_err(to_status)?;
        let role_names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        self.s
            .audit("token.create", &c.p.name, true, serde_json::json!({"name": name, "roles": role_names, "expires": format_rfc3339(expires)}))
            .await;
        self.written().await;
        Ok(Response::new(CreateTokenResponse {
            token: secret,
            name,
            expires_ms: expires,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Res<JoinResponse> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let source = source_of(&req);
        let req = req.into_inner();
        let refused = "the join token is not valid: it was already used, it expired, or it never existed; create a new one with pctl tokens add";
        let Some(role) = SystemRole::parse(&req.role) else {
            return Err(Status::invalid_argument(format!(
                "unknown join role {:?}; use app or proxy",
                req.role
            )));
        };
        let host_id = if req.host_id.is_empty() {
            format!("{}-{}", role.as_str(), &random_token()[..8])
        } else {
            req.host_id.clone()
        };
        validate_name(&host_id)
            .map_err(|e| Status::invalid_argument(e.within("host_id").to_string()))?;
        if req.csr_pem.is_empty() {
            return Err(Status::invalid_argument(
                "csr_pem: a certificate signing request is required (this service is older than its auth-service; upgrade it)",
            ));
        }
        let life = Duration::from_millis(self.s.identity_ttl_ms as u64);
        // Checked before the token is used up: a bad request costs nothing.
        let cert_pem = self
            .s
            .ca
            .sign(&req.csr_pem, crate::cert_role(role), &host_id, life)
            .map_err(to_status)?;
        let name = token_name(&req.token);
        let rec = self
            .s
            .backend
            .get(Kind::Token, &name)
            .await
            .map_err(to_status)?;
        let valid = match &rec {
            Some(r) if r.expires.is_some_and(|e| e > now_ms()) => {
                match Resource::from_json(Kind::Token, &r.value) {
                    Ok(Resource::Token(t)) => t.spec.roles.contains(&role),
                    _ => false,
                }
            }
            _ => false,
        };
        // A host id is bound to its identity while that lives: a join token
        // cannot take over an agent or proxy that is still in service.
        let live = self
            .s
            .backend
            .service_sessions()
            .await
            .map_err(to_status)?
            .into_iter()
            .any(|r| r.principal == host_id && r.expires.is_none_or(|e| e > now_ms()));
        if valid && live {
            let msg = format!(
                "host id {host_id:?} belongs to a live identity; revoke it first (pctl identities rm {host_id}) or join under another host id"
            );
            self.s
                .audit(
                    "token.join",
                    &host_id,
                    false,
                    serde_json::json!({"role": role.as_str(), "error": msg, "source": source}),
                )
                .await;
            return Err(Status::already_exists(msg));
        }
        let refuse = |msg: &str| {
            let fields = serde_json::json!({"role": role.as_str(), "error": msg, "source": source});
            let host = host_id.clone();
            async move { self.s.audit("token.join", &host, false, fields).await }
        };
        if !valid {
            refuse(refused).await;
            return Err(Status::unauthenticated(refused));
        }
        // The identity first: a host id holds at most one (a unique index),
        // so of two joins racing for one host id only one gets here.
        self.s
            .backend
            .purge_expired_service(&host_id, now_ms())
            .await
            .map_err(to_status)?;
        let expires = now_ms() + self.s.identity_ttl_ms;
        let identity = match self
            .s
            .new_session(
                &host_id,
                PrincipalType::Service,
                &[role.as_str().to_string()],
                Some(expires),
            )
            .await
        {
            Ok(t) => t,
            Err(e) if e.code == Code::AlreadyExists => {
                let msg = format!(
                    "host id {host_id:?} belongs to a live identity; revoke it first (pctl identities rm {host_id}) or join under another host id"
                );
                return Err(Status::already_exists(msg));
            }
            Err(e) => return Err(to_status(e)),
        };
        // Then the token, single use: whoever deletes it first joins; the
        // loser's identity is taken back.
        let consumed = self
            .s
            .backend
            .apply(&[WriteOp::Delete {
                kind: Kind::Token,
                name: name.clone(),
                expired_before: None,
            }])
            .await
            .is_ok();
        if !consumed {
            let _ = self.s.backend.delete_session(&hash_token(&identity)).await;
            refuse(refused).await;
            return Err(Status::unauthenticated(refused));
        }
        self.written().await;
        self.s
            .audit(
                "token.join",
                &host_id,
                true,
                serde_json::json!({"role": role.as_str(), "token": name, "source": source}),
            )
            .await;
        Ok(Response::new(JoinResponse {
            identity_token: identity,
            host_id,
            cert_pem,
            ca_pem: self.s.ca.cert_pem.clone(),
            expires_ms: expires,
        }))
    }

    async fn renew_identity(
        &self,
        req: Request<RenewIdentityRequest>,
    ) -> Res<RenewIdentityResponse> {
        let c = self.caller(&req, "renew_identity").await?;
        let Some(role) =
            c.p.service_role
                .filter(|_| c.p.ptype == PrincipalType::Service)
        else {
            let status = Status::permission_denied("only proxies and agents renew identities");
            return Err(self.denied(&c, None, None, None, status).await);
        };
        let Some(token) = bearer(req.metadata()) else {
            return Err(Status::unauthenticated("no credentials"));
        };
        let life = Duration::from_millis(self.s.identity_ttl_ms as u64);
        let cert_pem = self
            .s
            .ca
            .sign(
                &req.get_ref().csr_pem,
                crate::cert_role(role),
                &c.p.name,
                life,
            )
            .map_err(to_status)?;
        let expires = now_ms() + self.s.identity_ttl_ms;
        let extended = self
            .s
            .backend
            .extend_session(&hash_token(&token), expires)
            .await
            .map_err(to_status)?;
        if !extended {
            return Err(Status::unauthenticated(
                "the identity was revoked or expired while renewing",
            ));
        }
        self.s
            .audit(
                "identity.renew",
                &c.p.name,
                true,
                serde_json::json!({"role": role.as_str(), "expires": format_rfc3339(expires), "source": c.source}),
            )
            .await;
        Ok(Response::new(RenewIdentityResponse {
            cert_pem,
            expires_ms: expires,
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Res<HeartbeatResponse> {
        let c = self.caller(&req, "heartbeat").await?;
        let req = req.into_inner();
        self.check(&c, Kind::AppServer, Verb::Update).await?;
        if c.p.ptype != PrincipalType::Service {
            let status = Status::permission_denied("only agents announce app servers");
            return Err(self
                .denied(&c, Some(Kind::AppServer), Some(Verb::Update), None, status)
                .await);
        }
        let host = c.p.name;
        let now = now_ms();
        let expires = now + req.ttl_ms.clamp(1_000, 600_000);
        let backend = &self.s.backend;
        if req.release {
            let events = backend.end_lease(&host, None).await.map_err(to_status)?;
            if !events.is_empty() {
                self.written().await;
            }
            return Ok(Response::new(HeartbeatResponse {
                lease_was_live: true,
                served: vec![],
            }));
        }
        let lease_was_live = if req.serve.is_empty() && req.withdraw.is_empty() {
            if req.list_served {
                // Creates the lease when there is none, so the records
                // listed stay while the agent checks them.
                backend
                    .announce(&host, now, expires, &[], &[])
                    .await
                    .map_err(to_status)?
                    .0
            } else {
                backend
                    .renew_lease(&host, now, expires)
                    .await
                    .map_err(to_status)?
            }
        } else {
            if req.serve.len() + req.withdraw.len() > MAX_ANNOUNCE_BATCH {
                return Err(Status::invalid_argument(format!(
                    "at most {MAX_ANNOUNCE_BATCH} apps per heartbeat; send the rest in further calls"
                )));
            }
            let mut put: Vec<(String, String)> = Vec::with_capacity(req.serve.len());
            let mut seen = std::collections::HashSet::new();
            for served in &req.serve {
                validate_name(&served.app)
                    .map_err(|e| Status::invalid_argument(e.within("serve.app").to_string()))?;
                if !seen.insert(served.app.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "serve: app {:?} is named twice",
                        served.app
                    )));
                }
                put.push(app_server_record(&host, served)?);
            }
            let mut withdraw = Vec::with_capacity(req.withdraw.len());
            for app in &req.withdraw {
                validate_name(app)
                    .map_err(|e| Status::invalid_argument(e.within("withdraw").to_string()))?;
                if !seen.insert(app.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "app {app:?} is both served and withdrawn, or named twice"
                    )));
                }
                withdraw.push(app_server_name(app, &host));
            }
            let (live, events) = backend
                .announce(&host, now, expires, &put, &withdraw)
                .await
                .map_err(to_status)?;
            if !events.is_empty() {
                self.written().await;
            }
            live
        };
        let served = if req.list_served {
            let mut names: Vec<String> = backend
                .held(&host)
                .await
                .map_err(to_status)?
                .into_iter()
                .filter_map(
                    |(_, value)| match Resource::from_json(Kind::AppServer, &value) {
                        Ok(Resource::AppServer(s)) => Some(s.spec.app),
                        _ => None,
                    },
                )
                .collect();
            names.sort();
            names
        } else {
            vec![]
        };
        Ok(Response::new(HeartbeatResponse {
            lease_was_live,
            served,
        }))
    }

    async fn get_cluster_ca(
        &self,
        _req: Request<GetClusterCaRequest>,
    ) -> Res<GetClusterCaResponse> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(GetClusterCaResponse {
            cert_pem: self.s.ca.cert_pem.clone(),
        }))
    }

    async fn issue_app_jwt(&self, req: Request<IssueAppJwtRequest>) -> Res<IssueAppJwtResponse> {
        let c = self.caller(&req, "issue_app_jwt").await?;
        let req = req.into_inner();
        // Refusals are audited as denied reads of the app.
        let refuse = async |status: Status| {
            self.denied(
                &c,
                Some(Kind::App),
                Some(Verb::Read),
                Some(req.app.as_str()),
                status,
            )
            .await
        };
        if c.p.ptype != PrincipalType::Service || c.p.service_role != Some(SystemRole::App) {
            let status = Status::permission_denied("only agents ask for app JWTs");
            return Err(refuse(status).await);
        }
        validate_name(&req.app)
            .map_err(|e| Status::invalid_argument(e.within("app").to_string()))?;
        validate_name(&req.user)
            .map_err(|e| Status::invalid_argument(e.within("user").to_string()))?;
        // Only for an app this agent serves now, and that asks for it.
        let server = self
            .s
            .backend
            .get(Kind::AppServer, &app_server_name(&req.app, &c.p.name))
            .await
            .map_err(to_status)?;
        let Some(Ok(Resource::AppServer(server))) =
            server.map(|r| Resource::from_json(Kind::AppServer, &r.value))
        else {
            let status = Status::permission_denied(format!(
                "this agent does not serve the app {:?}",
                req.app
            ));
            return Err(refuse(status).await);
        };
        let stored = self
            .s
            .backend
            .get(Kind::App, &req.app)
            .await
            .map_err(to_status)?;
        let (spec, labels) = match stored.map(|r| Resource::from_json(Kind::App, &r.value)) {
            Some(Ok(Resource::App(a))) => (a.spec, a.metadata.labels),
            _ => match server.spec.static_app {
                Some(a) => (a.spec, a.metadata.labels),
                None => return Err(Status::not_found(format!("no app named {:?}", req.app))),
            },
        };
        if spec.identity != Some(portico_core::AppIdentity::Jwt) {
            return Err(Status::failed_precondition(format!(
                "the app {:?} does not ask for identity: jwt",
                req.app
            )));
        }
        let user = self
            .s
            .backend
            .get(Kind::User, &req.user)
            .await
            .map_err(to_status)?;
        let roles = match user.map(|r| Resource::from_json(Kind::User, &r.value)) {
            Some(Ok(Resource::User(u))) if !u.spec.locked => u.spec.roles,
            Some(Ok(Resource::User(_))) => {
                return Err(Status::permission_denied(format!(
                    "the user {:?} is locked",
                    req.user
                )));
            }
            _ => return Err(Status::not_found(format!("no user named {:?}", req.user))),
        };
        // Only for a user whose roles reach the app: an agent names the
        // user of a session the proxy opened, and that proxy checked it.
        let checker = AccessChecker::new(
            &crate::identity::load_roles(self.s.backend.as_ref(), &roles)
                .await
                .map_err(to_status)?,
        );
        if !checker.app_allowed(&labels) {
            let status = Status::permission_denied(format!(
                "the user {:?} may not reach the app {:?}",
                req.user, req.app
            ));
            return Err(refuse(status).await);
        }
        let (token, expires_ms) = self
            .s
            .jwt
            .issue(&req.app, &req.user, &roles)
            .map_err(to_status)?;
        Ok(Response::new(IssueAppJwtResponse { token, expires_ms }))
    }

    async fn get_jwks(&self, _req: Request<GetJwksRequest>) -> Res<GetJwksResponse> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(GetJwksResponse {
            jwks_json: self.s.jwt.jwks().to_string(),
        }))
    }

    async fn list_identities(
        &self,
        req: Request<ListIdentitiesRequest>,
    ) -> Res<ListIdentitiesResponse> {
        let c = self.caller(&req, "list_identities").await?;
        self.check(&c, Kind::Token, Verb::List).await?;
        let rows = self.s.backend.service_sessions().await.map_err(to_status)?;
        let seen = self
            .s
            .last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = now_ms();
        let identities = rows
            .into_iter()
            .filter(|r| r.expires.is_none_or(|e| e > now))
            .map(|r| Identity {
                last_seen_ms: seen.get(&r.principal).copied().unwrap_or(0),
                roles: serde_json::from_str(&r.roles).unwrap_or_default(),
                expires_ms: r.expires.unwrap_or(0),
                host_id: r.principal,
            })
            .collect();
        Ok(Response::new(ListIdentitiesResponse { identities }))
    }

    async fn revoke_identity(
        &self,
        req: Request<RevokeIdentityRequest>,
    ) -> Res<RevokeIdentityResponse> {
        let c = self.caller(&req, "revoke_identity").await?;
        let host_id = req.get_ref().host_id.clone();
        self.check_named(&c, Kind::Token, Verb::Delete, Some(&host_id))
            .await?;
        let revoked = self
            .s
            .backend
            .revoke_service(&host_id)
            .await
            .map_err(to_status)?;
        if revoked > 0 {
            // A revoked agent serves nothing: withdraw its apps now rather
            // than when its lease runs out.
            match self.s.backend.end_lease(&host_id, None).await {
                Ok(events) if !events.is_empty() => self.written().await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(host_id = %host_id, error = %e, "cannot end the revoked agent's lease; it ends by itself")
                }
            }
        }
        self.s
            .audit(
                "identity.revoke",
                &c.p.name,
                revoked > 0,
                serde_json::json!({"host_id": host_id, "revoked": revoked, "source": c.source}),
            )
            .await;
        if revoked == 0 {
            return Err(Status::not_found(format!(
                "no live identity has host id {host_id:?}; see pctl identities ls"
            )));
        }
        Ok(Response::new(RevokeIdentityResponse { revoked }))
    }

    async fn emit_events(&self, req: Request<EmitEventsRequest>) -> Res<EmitEventResponse> {
        let c = self.caller(&req, "emit_events").await?;
        self.require_service(&c).await?;
        self.check(&c, Kind::Event, Verb::Create).await?;
        let events = req.into_inner().events;
        store_events(&self.s, &events, &c.p.name).await?;
        Ok(Response::new(EmitEventResponse {}))
    }

    async fn list_events(&self, req: Request<ListEventsRequest>) -> Res<ListEventsResponse> {
        let c = self.caller(&req, "list_events").await?;
        let req = req.into_inner();
        self.check(&c, Kind::Event, Verb::List).await?;
        let limit = if req.limit <= 0 {
            1000
        } else {
            req.limit.min(10_000)
        };
        let kind = (!req.r#type.is_empty()).then_some(req.r#type.as_str());
        let filter = EventFilter {
            user: req.user.trim(),
            app: req.app.trim(),
            until_ms: req.until_ms,
        };
        let to_event = |r: AuditRecord| AuditEvent {
            id: r.id,
            time_ms: r.time_ms,
            r#type: r.kind,
            actor: r.actor,
            success: r.success,
            fields_json: r.fields,
        };
        if !req.newest_first {
            let recs = self
                .s
                .backend
                .list_audit(kind, req.since_ms, limit)
                .await
                .map_err(to_status)?;
            let events = recs
                .into_iter()
                .filter(|r| filter.keeps(r))
                .map(to_event)
                .collect();
            return Ok(Response::new(ListEventsResponse {
                events,
                next_before_id: 0,
            }));
        }
        // A page, newest first: read back in batches and keep what the
        // filters keep, reading at most EVENT_SCAN records per call (a
        // short page then says where to go on).
        let mut before = if req.before_id > 0 {
            req.before_id
        } else {
            i64::MAX
        };
        let mut events = Vec::new();
        let mut scanned = 0usize;
        let mut next = 0;
        while scanned < EVENT_SCAN {
            let batch = self
                .s
                .backend
                .audit_page(kind, req.since_ms, filter.until_ms, before, 500)
                .await
                .map_err(to_status)?;
            let done = batch.len() < 500;
            scanned += batch.len();
            for r in batch {
                before = r.id;
                if filter.keeps(&r) {
                    events.push(to_event(r));
                    if events.len() as i64 >= limit {
                        break;
                    }
                }
            }
            if events.len() as i64 >= limit {
                next = before;
                break;
            }
            if done {
                break;
            }
            next = before;
        }
        Ok(Response::new(ListEventsResponse {
            events,
            next_before_id: next,
        }))
    }
}

/// Audit records one `ListEvents` call reads at most.
const EVENT_SCAN: usize = 20_000;

/// The filters of `ListEvents` that the database does not apply.
struct EventFilter<'a> {
    user: &'a str,
    app: &'a str,
    until_ms: i64,
}

impl EventFilter<'_> {
    fn keeps(&self, r: &AuditRecord) -> bool {
        if self.until_ms > 0 && r.time_ms >= self.until_ms {
            return false;
        }
        if self.user.is_empty() && self.app.is_empty() {
            return true;
        }
        let fields: serde_json::Value = serde_json::from_str(&r.fields).unwrap_or_default();
        let field = |k: &str| fields.get(k).and_then(|v| v.as_str());
        if !self.user.is_empty() && r.actor != self.user && field("user") != Some(self.user) {
            return false;
        }
        if !self.app.is_empty()
            && field("app") != Some(self.app)
            && !(r.kind.starts_with("app.") && field("name") == Some(self.app))
        {
            return false;
        }
        true
    }
}

/// Checks and stores a service's audit events under `actor`, its own name
/// (whatever the fields claim): `EmitEvents`, and the hand-over from a
/// service in this process (`LocalAudit`).
pub(crate) async fn store_events(
    s: &AuthServer,
    events: &[EmitEventRequest],
    actor: &str,
) -> Result<(), Status> {
    if events.len() > 1000 {
        return Err(Status::invalid_argument("at most 1000 events per call"));
    }
    let now = now_ms();
    let mut recs = Vec::with_capacity(events.len());
    for e in events {
        if e.r#type.is_empty() || e.r#type.len() > 64 || e.fields_json.len() > 64 * 1024 {
            return Err(Status::invalid_argument(
                "an event needs a type (at most 64 characters) and at most 64 KiB of fields",
            ));
        }
        let fields = event_fields(&e.fields_json, actor)?;
        recs.push(AuditRecord {
            id: 0,
            time_ms: now,
            kind: e.r#type.clone(),
            actor: actor.to_string(),
            success: e.success,
            fields,
        });
    }
    s.backend.append_audit(&recs).await.map_err(to_status)
}

/// An emitted event's fields as stored (`fields::with_actor`).
fn event_fields(json: &str, actor: &str) -> Result<String, Status> {
    crate::fields::with_actor(json, actor).map_err(|e| match e {
        crate::fields::Invalid::NotAnObject => {
            Status::invalid_argument("fields_json: must be a JSON object")
        }
        crate::fields::Invalid::Json(e) => Status::invalid_argument(format!("fields_json: {e}")),
    })
}

/// An open watch: whose, from where, over which kinds.
struct Watching {
    /// The caller's token, re-checked while the watch is open.
    token: Option<String>,
    kinds: Vec<Kind>,
    p: Principal,
    source: String,
}

/// Relays a watch's events to the client while the caller keeps access
/// (decided in the rounds of `rechecks`); ends the stream with the
/// refusal when they lose it.
async fn guard_watch(
    s: Arc<AuthServer>,
    w: Watching,
    mut events: mpsc::Receiver<Result<WatchEvent, Error>>,
    out: mpsc::Sender<Result<WatchEvent, Status>>,
) {
    let (_registration, mut verdict) =
        crate::rechecks::Rechecks::register(&s, w.token.clone(), w.kinds.clone());
    // An event waiting for room in the client's stream.
    let mut pending: Option<Result<WatchEvent, Status>> = None;
    loop {
        tokio::select! {
            biased;
            r = &mut verdict => {
                // No verdict can come any more: the server is stopping.
                let Ok(r) = r else { return };
                {
                    Denial {
                        method: "watch",
                        source: &w.source,
                        caller: Some(&w.p),
                        kind: r.kind,
                        verb: r.verb,
                        name: None,
                    }
                    .record(&s, &r.status)
                    .await;
                    // A client that reads nothing gets its stream cut instead.
                    let _ = tokio::time::timeout(Duration::from_secs(1), out.send(Err(r.status)))
                        .await;
                    return;
                }
            }
            _ = out.closed() => return,
            permit = out.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else { return };
                if let Some(item) = pending.take() {
                    let last = item.is_err();
                    permit.send(item);
                    if last {
                        return;
                    }
                }
            }
            ev = events.recv(), if pending.is_none() => match ev {
                Some(ev) => pending = Some(ev.map_err(to_status)),
                None => return,
            },
        }
    }
}

/// An argon2id hash of a random string, verified against for unknown users
/// so that a failed login takes as long whether or not the user exists.
async fn dummy_hash() -> String {
    static DUMMY: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    DUMMY
        .get_or_init(|| async { hash_password(random_token()).await.unwrap_or_default() })
        .await
        .clone()
}

/// The stored `app_server` record (name, JSON) of one app an agent serves.
fn app_server_record(host: &str, served: &ServedApp) -> Result<(String, String), Status> {
    let name = app_server_name(&served.app, host);
    let static_app = if served.static_app_json.is_empty() {
        None
    } else {
        match Resource::from_json(Kind::App, &served.static_app_json) {
            Ok(Resource::App(a)) if a.metadata.name == served.app => Some(Box::new(a)),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "static_app_json: not the app being announced",
                ));
            }
            Err(e) => return Err(Status::invalid_argument(format!("static_app_json: {e}"))),
        }
    };
    let mut meta = Metadata::named(&name);
    meta.labels = BTreeMap::new();
    let srv = Resource::AppServer(Object::new(
        Kind::AppServer,
        meta,
        AppServerSpec {
            app: served.app.clone(),
            host_id: host.to_string(),
            static_app,
        },
    ));
    Ok((name, crate::resources::to_stored(&srv)))
}

/// The most selectors one watch may narrow app events by, and the most
/// bytes of label keys and values they may hold in all.
const MAX_APP_SELECTORS: usize = 64;
const MAX_APP_SELECTOR_BYTES: usize = 16 * 1024;

/// A watch's `app_selectors`, compiled; `None` when there are none.
fn app_selectors(req: &WatchRequest) -> Result<Option<Vec<LabelSelector>>, Status> {
    if req.app_selectors.is_empty() {
        return Ok(None);
    }
    if req.from_revision > 0 {
        return Err(Status::invalid_argument(
            "app_selectors need a snapshot (from_revision 0): a resumed stream cannot know which apps it sent",
        ));
    }
    if req.app_selectors.len() > MAX_APP_SELECTORS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_APP_SELECTORS} app_selectors per watch"
        )));
    }
    let bytes: usize = req
        .app_selectors
        .iter()
        .flat_map(|s| s.labels.iter())
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if bytes > MAX_APP_SELECTOR_BYTES {
        return Err(Status::invalid_argument(format!(
            "app_selectors hold at most {MAX_APP_SELECTOR_BYTES} bytes of labels"
        )));
    }
    req.app_selectors
        .iter()
        .enumerate()
        .map(|(i, s)| {
            LabelSelector::compile(s.labels.iter().map(|(k, v)| (k, std::slice::from_ref(v))))
                .map_err(|e| Status::invalid_argument(format!("app_selectors[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod guess_tests {
    use super::guess_network;

    #[test]
    fn ipv6_guesses_count_per_64() {
        assert_eq!(guess_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(guess_network("2001:db8:1:2:ffff::1"), "2001:db8:1:2::/64");
        assert_eq!(guess_network("192.0.2.7"), "192.0.2.7");
    }
}
