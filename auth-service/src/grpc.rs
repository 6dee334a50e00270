//! The gRPC API. Every handler authenticates the caller and checks
//! `(kind, verb)` against their roles before it touches storage.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use portico_core::SystemRole;
use portico_core::resource::{app_server_name, validate_name};
use portico_core::time::{format_rfc3339, now_ms};
use portico_core::{
    AppServerSpec, Code, Error, Kind, Metadata, Object, Resource, TokenSpec, UserSpec, Verb,
};
use portico_proto::convert::to_status;
use portico_proto::v1::*;
use portico_proto::{AuthService, AuthServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::AuthServer;
use crate::identity::{
    Principal, PrincipalType, authenticate, bearer, generate_password, hash_password, random_token,
    token_name, verify_password,
};
use crate::storage::{PutMode, WriteOp};

/// Largest request the API accepts (a resource file is at most 1 MiB).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
const MAX_TOKEN_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
const DEFAULT_TOKEN_TTL_MS: i64 = 3600 * 1000;

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
            get(move || {
                let m = m.clone();
                async move { m.metrics_text() }
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

impl Api {
    async fn caller<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        authenticate(self.s.backend.as_ref(), bearer(req.metadata()))
            .await
            .map_err(to_status)
    }

    async fn check(&self, p: &Principal, kind: Kind, verb: Verb) -> Result<(), Status> {
        p.checker.check(kind, verb).map_err(to_status)
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
        p: &Principal,
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
                let msg =
                    format!("{kind} {name:?} already exists; use pctl create -f to overwrite it");
                self.refused(p, &format!("{kind}.create"), &name, &msg)
                    .await;
                return Err(Status::already_exists(msg));
            }
            (true, true) => Verb::Update,
            (false, _) => Verb::Create,
        };
        if let Err(e) = p.checker.check(kind, verb) {
            self.refused(p, &format!("{kind}.{verb}"), &name, &e.message)
                .await;
            return Err(to_status(e));
        }
        if let Resource::User(u) = &res
            && let Err(e) = self.user_allowed(p, &name, &u.spec.roles)
        {
            self.refused(p, &format!("{kind}.{verb}"), &name, e.message())
                .await;
            return Err(e);
        }
        Ok((kind, name, verb, res))
    }

    /// A user may not take a name the system uses, nor get a role its
    /// creator does not hold, unless the creator may write roles (and so
    /// could grant itself any permission anyway).
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
        match roles.iter().find(|r| !p.roles.contains(r)) {
            None => Ok(()),
            Some(r) => Err(Status::permission_denied(format!(
                "access denied: you cannot grant the role {r:?}, which you do not hold; ask someone who may write roles"
            ))),
        }
    }

    async fn refused(&self, p: &Principal, event: &str, name: &str, error: &str) {
        self.s
            .audit(
                event,
                &p.name,
                false,
                serde_json::json!({"name": name, "error": error}),
            )
            .await;
    }
}

#[tonic::async_trait]
impl AuthService for Api {
    async fn create(&self, req: Request<CreateRequest>) -> Res<CreateResponse> {
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        if req.resources.is_empty() {
            return Err(Status::invalid_argument("nothing to create"));
        }
        let mut plan = Vec::with_capacity(req.resources.len());
        let mut seen = std::collections::HashSet::new();
        for (i, r) in req.resources.iter().enumerate() {
            let (kind, name, verb, res) = self.plan_one(&p, i, r, req.overwrite).await?;
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
                .audit(&format!("{kind}.{verb}"), &p.name, ok, fields)
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
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        self.check(&p, kind, Verb::Read).await?;
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
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        self.check(&p, kind, Verb::List).await?;
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
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        let kind = kind_arg(&req.kind)?;
        if let Err(e) = p.checker.check(kind, Verb::Delete) {
            self.s
                .audit(
                    &format!("{kind}.delete"),
                    &p.name,
                    false,
                    serde_json::json!({"name": req.name, "error": e.message}),
                )
                .await;
            return Err(to_status(e));
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
                &p.name,
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
        let p = self.caller(&req).await?;
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
            self.check(&p, *k, Verb::List).await?;
            self.check(&p, *k, Verb::Read).await?;
        }
        let rx = self.s.hub.watch(check_kinds, req.from_revision);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = tokio_stream::StreamExt::map(stream, |r| r.map_err(to_status));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn login(&self, req: Request<LoginRequest>) -> Res<LoginResponse> {
        self.s.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let req = req.into_inner();
        let user = req.user.trim().to_string();
        if user.is_empty() || user.len() > 63 || req.password.len() > 1024 {
            return Err(Status::invalid_argument(
                "a user name and a password are required",
            ));
        }
        if let Some(wait) = self.s.limiter.check(&user) {
            self.s
                .audit(
                    "user.login",
                    &user,
                    false,
                    serde_json::json!({"error": "rate limited"}),
                )
                .await;
            return Err(Status::resource_exhausted(format!(
                "too many failed logins for {user:?}; try again in {} s",
                wait.as_secs() + 1
            )));
        }
        let hash = self.s.backend.password(&user).await.map_err(to_status)?;
        let user_rec = self
            .s
            .backend
            .get(Kind::User, &user)
            .await
            .map_err(to_status)?;
        let ok = match (hash, &user_rec) {
            (Some(h), Some(_)) => verify_password(req.password, h).await,
            _ => {
                // Spend the same time on unknown users as on known ones.
                let _ = verify_password(req.password, dummy_hash().await).await;
                false
            }
        };
        if !ok {
            self.s.limiter.failure(&user);
            self.s.metrics.logins_failed.fetch_add(1, Ordering::Relaxed);
            self.s
                .audit(
                    "user.login",
                    &user,
                    false,
                    serde_json::json!({"error": "invalid user name or password"}),
                )
                .await;
            return Err(Status::unauthenticated("invalid user name or password"));
        }
        self.s.limiter.success(&user);
        let expires = now_ms() + self.s.session_ttl_ms;
        let token = self
            .s
            .new_session(&user, PrincipalType::User, &[], Some(expires))
            .await
            .map_err(to_status)?;
        self.s.metrics.logins_ok.fetch_add(1, Ordering::Relaxed);
        self.s
            .audit("user.login", &user, true, serde_json::json!({}))
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
        let p = self.caller(&req).await?;
        Ok(Response::new(WhoAmIResponse {
            name: p.name,
            principal_type: p.ptype.as_str().into(),
            roles: p.roles,
            expires_ms: p.expires.unwrap_or(0),
        }))
    }

    async fn add_user(&self, req: Request<AddUserRequest>) -> Res<AddUserResponse> {
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        self.check(&p, Kind::User, Verb::Create).await?;
        validate_name(&req.name)
            .map_err(|e| Status::invalid_argument(e.within("user name").to_string()))?;
        self.user_allowed(&p, &req.name, &req.roles)?;
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
                &p.name,
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
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        self.check(&p, Kind::Token, Verb::Create).await?;
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
            .audit("token.create", &p.name, true, serde_json::json!({"name": name, "roles": role_names, "expires": format_rfc3339(expires)}))
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
        // Single use: whoever deletes the token first joins.
        let consumed = valid
            && self
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
            self.s
                .audit(
                    "token.join",
                    &host_id,
                    false,
                    serde_json::json!({"role": role.as_str(), "error": refused}),
                )
                .await;
            return Err(Status::unauthenticated(refused));
        }
        self.written().await;
        let identity = self
            .s
            .new_session(
                &host_id,
                PrincipalType::Service,
                &[role.as_str().to_string()],
                None,
            )
            .await
            .map_err(to_status)?;
        self.s
            .audit(
                "token.join",
                &host_id,
                true,
                serde_json::json!({"role": role.as_str(), "token": name}),
            )
            .await;
        Ok(Response::new(JoinResponse {
            identity_token: identity,
            host_id,
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Res<HeartbeatResponse> {
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        self.check(&p, Kind::AppServer, Verb::Update).await?;
        if p.ptype != PrincipalType::Service {
            return Err(Status::permission_denied(
                "only agents announce app servers",
            ));
        }
        validate_name(&req.app)
            .map_err(|e| Status::invalid_argument(e.within("app").to_string()))?;
        let name = app_server_name(&req.app, &p.name);
        let static_app = if req.static_app_json.is_empty() {
            None
        } else {
            match Resource::from_json(Kind::App, &req.static_app_json) {
                Ok(Resource::App(a)) if a.metadata.name == req.app => Some(Box::new(a)),
                Ok(_) => {
                    return Err(Status::invalid_argument(
                        "static_app_json: not the app being announced",
                    ));
                }
                Err(e) => return Err(Status::invalid_argument(format!("static_app_json: {e}"))),
            }
        };
        let op = if req.remove {
            WriteOp::Delete {
                kind: Kind::AppServer,
                name,
                expired_before: None,
            }
        } else {
            let ttl = req.ttl_ms.clamp(1_000, 600_000);
            let expires = now_ms() + ttl;
            let mut meta = Metadata::named(&name);
            meta.labels = BTreeMap::new();
            let srv = Resource::AppServer(Object::new(
                Kind::AppServer,
                meta,
                AppServerSpec {
                    app: req.app.clone(),
                    host_id: p.name.clone(),
                    static_app,
                },
            ));
            WriteOp::Put {
                kind: Kind::AppServer,
                name,
                value: crate::resources::to_stored(&srv),
                expires: Some(expires),
                mode: PutMode::Upsert,
            }
        };
        match self.s.backend.apply(&[op]).await {
            Ok(_) => {}
            Err(e) if e.code == Code::NotFound && req.remove => {}
            Err(e) => return Err(to_status(e)),
        }
        self.written().await;
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn emit_event(&self, req: Request<EmitEventRequest>) -> Res<EmitEventResponse> {
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        self.check(&p, Kind::Event, Verb::Create).await?;
        if req.r#type.is_empty() || req.r#type.len() > 64 || req.fields_json.len() > 64 * 1024 {
            return Err(Status::invalid_argument(
                "an event needs a type (at most 64 characters) and at most 64 KiB of fields",
            ));
        }
        let fields: serde_json::Value = if req.fields_json.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(&req.fields_json)
                .map_err(|e| Status::invalid_argument(format!("fields_json: {e}")))?
        };
        self.s
            .audit(&req.r#type, &p.name, req.success, fields)
            .await;
        Ok(Response::new(EmitEventResponse {}))
    }

    async fn emit_events(&self, req: Request<EmitEventsRequest>) -> Res<EmitEventResponse> {
        let p = self.caller(&req).await?;
        self.check(&p, Kind::Event, Verb::Create).await?;
        let events = req.into_inner().events;
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
            let fields: serde_json::Value = if e.fields_json.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_str(&e.fields_json)
                    .map_err(|err| Status::invalid_argument(format!("fields_json: {err}")))?
            };
            recs.push(crate::storage::AuditRecord {
                id: 0,
                time_ms: now,
                kind: e.r#type,
                actor: p.name.clone(),
                success: e.success,
                fields: fields.to_string(),
            });
        }
        self.s
            .backend
            .append_audit(&recs)
            .await
            .map_err(to_status)?;
        Ok(Response::new(EmitEventResponse {}))
    }

    async fn list_events(&self, req: Request<ListEventsRequest>) -> Res<ListEventsResponse> {
        let p = self.caller(&req).await?;
        let req = req.into_inner();
        self.check(&p, Kind::Event, Verb::List).await?;
        let limit = if req.limit <= 0 {
            1000
        } else {
            req.limit.min(10_000)
        };
        let kind = (!req.r#type.is_empty()).then_some(req.r#type.as_str());
        let recs = self
            .s
            .backend
            .list_audit(kind, req.since_ms, limit)
            .await
            .map_err(to_status)?;
        let events = recs
            .into_iter()
            .map(|r| AuditEvent {
                id: r.id,
                time_ms: r.time_ms,
                r#type: r.kind,
                actor: r.actor,
                success: r.success,
                fields_json: r.fields,
            })
            .collect();
        Ok(Response::new(ListEventsResponse { events }))
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
