//! The cluster as this proxy knows it, kept current by one watch stream on
//! apps, roles, users and app servers: routing and RBAC never wait on the
//! database, and the proxy keeps serving from its last known state while the
//! auth-service is away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use portico_core::{AccessChecker, App, Kind, Resource, Role, User};
use portico_proto::client::AuthClient;
use portico_proto::v1::{WatchRequest, watch_event};
use portico_tunnel::backoff;
use tokio::sync::watch;

/// An app and the host ids of the agents serving it, sorted.
pub type AppAndServers = (Arc<App>, Arc<[String]>);

#[derive(Default)]
struct State {
    /// By name, so listings come out sorted.
    apps: BTreeMap<String, Arc<App>>,
    roles: HashMap<String, Role>,
    users: HashMap<String, User>,
    /// app name → host ids of agents announcing it.
    servers: HashMap<String, Arc<[String]>>,
    /// app server record name → (app, host) to undo on delete.
    server_names: HashMap<String, (String, String)>,
    /// Apps from agents' own configs, by app server record name.
    static_apps: HashMap<String, Arc<App>>,
    /// Compiled permissions per user; cleared whenever a role or user changes.
    checkers: HashMap<String, Arc<AccessChecker>>,
    synced: bool,
    /// Bumped by every change: what was read at one version is current
    /// while the version is.
    version: u64,
}

#[derive(Default)]
pub struct Cache {
    state: RwLock<State>,
    changed: tokio::sync::Notify,
}

impl Cache {
    /// A cluster app, else one an agent serves from its own config.
    pub fn app(&self, name: &str) -> Option<Arc<App>> {
        let st = self.read();
        st.apps.get(name).cloned().or_else(|| {
            st.static_apps
                .values()
                .find(|a| a.metadata.name == name)
                .cloned()
        })
    }

    pub fn apps(&self) -> Vec<Arc<App>> {
        self.apps_with_servers()
            .into_iter()
            .map(|(a, _)| a)
            .collect()
    }

    /// Every app by name (cluster apps, then agents' static apps of other
    /// names), each with the host ids of the agents serving it (sorted),
    /// read under one lock.
    pub fn apps_with_servers(&self) -> Vec<AppAndServers> {
        self.apps_with_servers_at().1
    }

    /// The cache's version now: unchanged, nothing in it changed.
    pub fn version(&self) -> u64 {
        self.read().version
    }

    /// `apps_with_servers`, with the version it was read at.
    pub fn apps_with_servers_at(&self) -> (u64, Vec<AppAndServers>) {
        let st = self.read();
        let serving = |name: &str| -> Arc<[String]> {
            st.servers
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new([]))
        };
        let mut v: Vec<(Arc<App>, Arc<[String]>)> = st
            .apps
            .values()
            .map(|a| (a.clone(), serving(&a.metadata.name)))
            .collect();
        if !st.static_apps.is_empty() {
            let mut seen: BTreeSet<&str> = BTreeSet::new();
            for a in st.static_apps.values() {
                let name = a.metadata.name.as_str();
                if !st.apps.contains_key(name) && seen.insert(name) {
                    v.push((a.clone(), serving(name)));
                }
            }
            v.sort_by(|a, b| a.0.metadata.name.cmp(&b.0.metadata.name));
        }
        (st.version, v)
    }

    pub fn servers(&self, app: &str) -> Vec<String> {
        self.read()
            .servers
            .get(app)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// The user's current permissions, or None if the user does not exist.
    /// Whether the user exists and is locked.
    pub fn locked(&self, user: &str) -> bool {
        self.read().users.get(user).is_some_and(|u| u.spec.locked)
    }

    /// The user's access as their roles are now; none for a user who is
    /// gone or locked.
    pub fn checker(&self, user: &str) -> Option<Arc<AccessChecker>> {
        if let Some(c) = self.read().checkers.get(user) {
            return Some(c.clone());
        }
        let mut st = self.write();
        let u = st.users.get(user).filter(|u| !u.spec.locked)?;
        let roles: Vec<&Role> = u
            .spec
            .roles
            .iter()
            .filter_map(|r| st.roles.get(r))
            .collect();
        let c = Arc::new(AccessChecker::new(roles));
        st.checkers.insert(user.to_string(), c.clone());
        Some(c)
    }

    /// Resolves on the next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn put(st: &mut State, kind: Kind, json: &str) {
        st.version += 1;
        let Ok(r) = Resource::from_json(kind, json) else {
            tracing::warn!(kind = %kind, "ignoring a resource the proxy cannot read");
            return;
        };
        match r {
            Resource::App(a) => {
                st.apps.insert(a.metadata.name.clone(), Arc::new(a));
            }
            Resource::Role(r) => {
                st.roles.insert(r.metadata.name.clone(), r);
                st.checkers.clear();
            }
            Resource::User(u) => {
                st.users.insert(u.metadata.name.clone(), u);
                st.checkers.clear();
            }
            Resource::AppServer(s) => {
                let hosts = st
                    .servers
                    .entry(s.spec.app.clone())
                    .or_insert_with(|| Arc::new([]));
                if !hosts.contains(&s.spec.host_id) {
                    let mut v = hosts.to_vec();
                    v.push(s.spec.host_id.clone());
                    v.sort();
                    *hosts = v.into();
                }
                if let Some(app) = s.spec.static_app {
                    st.static_apps
                        .insert(s.metadata.name.clone(), Arc::new(*app));
                }
                st.server_names
                    .insert(s.metadata.name.clone(), (s.spec.app, s.spec.host_id));
            }
            Resource::Token(_) => {}
        }
    }

    fn delete(st: &mut State, kind: Kind, name: &str) {
        st.version += 1;
        match kind {
            Kind::App => {
                st.apps.remove(name);
            }
            Kind::Role => {
                st.roles.remove(name);
                st.checkers.clear();
            }
            Kind::User => {
                st.users.remove(name);
                st.checkers.clear();
            }
            Kind::AppServer => {
                st.static_apps.remove(name);
                if let Some((app, host)) = st.server_names.remove(name)
                    && let Some(hosts) = st.servers.get_mut(&app)
                {
                    let rest: Vec<String> = hosts.iter().filter(|h| **h != host).cloned().collect();
                    if rest.is_empty() {
                        st.servers.remove(&app);
                    } else {
                        *hosts = rest.into();
                    }
                }
            }
            _ => {}
        }
    }

    /// Follows the cluster until `stop`; re-syncs from a snapshot after any break.
    pub async fn follow(self: Arc<Self>, api: AuthClient, mut stop: watch::Receiver<bool>) {
        let mut attempt = 0u32;
        loop {
            let r = tokio::select! {
                r = self.follow_once(api.clone(), &mut attempt) => r,
                _ = stop.changed() => return,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cluster watch broke; serving from the last known state and retrying");
            }
            let wait = backoff(attempt, Duration::from_millis(200), Duration::from_secs(10));
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn follow_once(&self, mut api: AuthClient, attempt: &mut u32) -> Result<(), String> {
        let kinds = ["app", "role", "user", "app_server"]
            .map(String::from)
            .to_vec();
        let mut stream = api
            .watch(WatchRequest {
                kinds,
                from_revision: 0,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut fresh: Option<State> = Some(State::default());
        while let Some(ev) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            let Some(kind) = Kind::parse(&ev.kind).or(Some(Kind::Event)) else {
                continue;
            };
            let t = watch_event::Type::try_from(ev.r#type).unwrap_or(watch_event::Type::Put);
            match (t, fresh.as_mut()) {
                (watch_event::Type::Put, Some(st)) => Self::put(st, kind, &ev.json),
                (watch_event::Type::SnapshotEnd, Some(_)) => {
                    let mut st = fresh.take().unwrap_or_default();
                    st.synced = true;
                    let mut now = self.write();
                    st.version = now.version + 1;
                    *now = st;
                    drop(now);
                    *attempt = 0;
                    tracing::info!(revision = ev.revision, "proxy cache synced");
                    self.changed.notify_waiters();
                }
                (watch_event::Type::Put, None) => {
                    Self::put(&mut self.write(), kind, &ev.json);
                    self.changed.notify_waiters();
                }
                (watch_event::Type::Delete, None) => {
                    Self::delete(&mut self.write(), kind, &ev.name);
                    self.changed.notify_waiters();
                }
                _ => {}
            }
        }
        Err("the watch stream ended".into())
    }
}
