//! Keeping the served set in step with the cluster: one watch stream on
//! `app` resources (a snapshot, then changes; re-synced after any break),
//! and heartbeats that keep this agent's `app_server` records alive.

use std::sync::Arc;
use std::time::Duration;

use portico_core::{App, Kind, Resource};
use portico_proto::v1::{HeartbeatRequest, WatchRequest, watch_event};
use tokio::sync::watch;

use crate::registry::Change;
use crate::tunnel::backoff;
use crate::{AgentState, heartbeat_every, heartbeat_ttl};

fn parse_app(json: &str) -> Option<App> {
    match Resource::from_json(Kind::App, json) {
        Ok(Resource::App(a)) => Some(a),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an app the agent cannot read");
            None
        }
    }
}

pub async fn watch_apps(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    let mut attempt = 0u32;
    loop {
        let r = tokio::select! {
            r = watch_once(&state, &mut attempt) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "app watch broke; keeping the apps already served and retrying");
        }
        let wait = backoff(attempt, Duration::from_millis(200), Duration::from_secs(10));
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn watch_once(state: &Arc<AgentState>, attempt: &mut u32) -> Result<(), String> {
    let mut api = state.api.clone();
    let mut stream = api
        .watch(WatchRequest {
            kinds: vec!["app".into()],
            from_revision: 0,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut snapshot: Option<Vec<App>> = Some(Vec::new());
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let t = watch_event::Type::try_from(ev.r#type).unwrap_or(watch_event::Type::Put);
        match (t, snapshot.as_mut()) {
            (watch_event::Type::Put, Some(list)) => list.extend(parse_app(&ev.json)),
            (watch_event::Type::SnapshotEnd, Some(_)) => {
                let list = snapshot.take().unwrap_or_default();
                let (reg, unreg) = state.registry.reconcile(list);
                *attempt = 0;
                tracing::info!(
                    apps = state.registry.len(),
                    revision = ev.revision,
                    "app snapshot applied"
                );
                for n in reg {
                    announce(state, n, false);
                }
                for n in unreg {
                    announce(state, n, true);
                }
            }
            (watch_event::Type::Put, None) => {
                if let Some(app) = parse_app(&ev.json) {
                    let name = app.metadata.name.clone();
                    match state.registry.put(app) {
                        Change::Registered => {
                            tracing::info!(app = %name, "registered app");
                            announce(state, name, false);
                        }
                        Change::Unregistered => {
                            tracing::info!(app = %name, "unregistered app: labels no longer match");
                            announce(state, name, true);
                        }
                        Change::Updated => tracing::info!(app = %name, "updated app"),
                        Change::Ignored => {}
                    }
                }
            }
            (watch_event::Type::Delete, None)
                if state.registry.delete(&ev.name) == Change::Unregistered =>
            {
                tracing::info!(app = %ev.name, "unregistered app: deleted");
                announce(state, ev.name.clone(), true);
            }
            _ => {}
        }
    }
    Err("the watch stream ended".into())
}

/// Announces (or withdraws) one app right away. One task sends every
/// heartbeat, in order, so a withdrawal is never overtaken by a renewal.
fn announce(state: &Arc<AgentState>, app: String, remove: bool) {
    let _ = state.announce.send((app, remove));
}

async fn heartbeat(state: &AgentState, app: &str, remove: bool) -> Result<(), String> {
    let mut api = state.api.clone();
    let req = HeartbeatRequest {
        app: app.to_string(),
        ttl_ms: heartbeat_ttl().as_millis() as i64,
        remove,
        static_app_json: if remove {
            String::new()
        } else {
            state.registry.static_json(app).unwrap_or_default()
        },
    };
    tokio::time::timeout(Duration::from_secs(5), api.heartbeat(req))
        .await
        .map_err(|_| "heartbeat timed out".to_string())?
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}

pub async fn heartbeats(
    state: Arc<AgentState>,
    mut announcements: tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(heartbeat_every());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for app in state.registry.names() {
                    if let Err(e) = heartbeat(&state, &app, false).await {
                        tracing::debug!(app = %app, error = %e, "heartbeat failed");
                    }
                }
            }
            Some((app, remove)) = announcements.recv() => {
                // A registration may have been undone since it was queued.
                if !remove && state.registry.get(&app).is_none() {
                    continue;
                }
                if let Err(e) = heartbeat(&state, &app, remove).await {
                    tracing::warn!(app = %app, remove, error = %e, "cannot announce app; the next heartbeat retries");
                }
            }
            _ = stop.changed() => {
                for app in state.registry.names() {
                    let _ = heartbeat(&state, &app, true).await;
                }
                return;
            }
        }
    }
}
