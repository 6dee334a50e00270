//! Keeping the served set in step with the cluster: one watch stream on
//! `app` resources (a snapshot, then changes; re-synced after any break),
//! and the heartbeats that hold this agent's lease and keep its
//! `app_server` records in step.

use std::sync::Arc;
use std::time::Duration;

use portico_core::{App, Kind, Resource};
use std::collections::BTreeMap;

use portico_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, ServedApp, WatchRequest, watch_event,
};
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
            // Narrows what is sent; the registry still decides what is served.
            app_selectors: state.app_selectors.clone(),
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
                state.synced.send_replace(true);
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
/// announcement, in order, so a withdrawal is never overtaken by an older
/// registration of the same app.
fn announce(state: &Arc<AgentState>, app: String, remove: bool) {
    let _ = state.announce.send((app, remove));
}

/// Apps announced or withdrawn per heartbeat call.
const BATCH: usize = 1_000;

async fn call(state: &AgentState, req: HeartbeatRequest) -> Result<HeartbeatResponse, String> {
    let mut api = state.api.clone();
    tokio::time::timeout(Duration::from_secs(10), api.heartbeat(req))
        .await
        .map_err(|_| "heartbeat timed out".to_string())?
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

fn request() -> HeartbeatRequest {
    HeartbeatRequest {
        ttl_ms: heartbeat_ttl().as_millis() as i64,
        ..Default::default()
    }
}

fn served(state: &AgentState, app: String) -> ServedApp {
    ServedApp {
        static_app_json: state.registry.static_json(&app).unwrap_or_default(),
        app,
    }
}

/// Sends announcements (app → withdraw?) in batches; false when the lease
/// had lapsed, so records announced before may be gone.
async fn send(state: &AgentState, changes: Vec<(String, bool)>) -> Result<bool, String> {
    let mut live = true;
    for chunk in changes.chunks(BATCH) {
        let mut req = request();
        for (app, remove) in chunk {
            if *remove {
                req.withdraw.push(app.clone());
            } else {
                req.serve.push(served(state, app.clone()));
            }
        }
        live &= call(state, req).await?.lease_was_live;
    }
    Ok(live)
}

/// Makes this agent's records match what it serves: asks which it holds,
/// then announces the missing ones (and every static app, whose record
/// carries the app and is written only if it changed) and withdraws the
/// rest.
async fn sync(state: &AgentState) -> Result<(), String> {
    let mut req = request();
    req.list_served = true;
    let held: std::collections::HashSet<String> =
        call(state, req).await?.served.into_iter().collect();
    let names = state.registry.names();
    let wanted: std::collections::HashSet<&String> = names.iter().collect();
    let mut changes: Vec<(String, bool)> = Vec::new();
    for app in &names {
        if !held.contains(app) || state.registry.static_json(app).is_some() {
            changes.push((app.clone(), false));
        }
    }
    let withdrawn = held.iter().filter(|a| !wanted.contains(a)).count();
    changes.extend(
        held.into_iter()
            .filter(|a| !wanted.contains(a))
            .map(|a| (a, true)),
    );
    let announced = changes.len() - withdrawn;
    send(state, changes).await?;
    tracing::info!(
        serving = names.len(),
        announced,
        withdrawn,
        "app servers in step with the cluster"
    );
    Ok(())
}

/// Renews this agent's lease every period (one small write, no event), on
/// its own, so a slow registration never delays a renewal past the lease's
/// end; says when a renewal found the lease had lapsed.
async fn renewals(state: Arc<AgentState>, lapsed: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(heartbeat_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match call(&state, request()).await {
            Ok(r) if !r.lease_was_live => lapsed.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
        }
    }
}

/// Holds this agent's lease and keeps its `app_server` records in step.
/// One task renews the lease every period (`renewals`); this one sends
/// registrations and withdrawals in batches as they come, in order, and
/// re-announces everything when the lease was lost. It starts announcing
/// once the first snapshot of apps is in, so a restarted agent does not
/// withdraw what it is about to serve again.
pub async fn heartbeats(
    state: Arc<AgentState>,
    mut announcements: tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    mut stop: watch::Receiver<bool>,
) {
    let lapsed = Arc::new(tokio::sync::Notify::new());
    // Dropping the set (on return) aborts the renewals.
    let mut renewer = tokio::task::JoinSet::new();
    renewer.spawn(renewals(state.clone(), lapsed.clone()));
    let mut retry = tokio::time::interval(heartbeat_every());
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = state.synced.subscribe();
    let mut pending: BTreeMap<String, bool> = BTreeMap::new();
    let mut need_sync = true;
    loop {
        tokio::select! {
            // A failed sync or send is retried on this beat.
            _ = retry.tick() => {}
            () = lapsed.notified() => {
                tracing::info!("this agent's lease had lapsed; announcing its apps again");
                need_sync = true;
            }
            Some((app, remove)) = announcements.recv() => {
                pending.insert(app, remove);
                while let Ok((app, remove)) = announcements.try_recv() {
                    pending.insert(app, remove);
                }
            }
            Ok(()) = synced.changed() => {}
            _ = stop.changed() => {
                renewer.abort_all();
                let mut req = request();
                req.release = true;
                if let Err(e) = call(&state, req).await {
                    tracing::warn!(error = %e, "cannot withdraw this agent's apps; its lease ends by itself");
                }
                return;
            }
        }
        if !*synced.borrow() {
            continue;
        }
        if need_sync {
            match sync(&state).await {
                Ok(()) => {
                    need_sync = false;
                    // Queued before the sync read the served set: done.
                    pending.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce this agent's apps; retrying at the next heartbeat");
                    continue;
                }
            }
        }
        if !pending.is_empty() {
            // A registration may have been undone since it was queued.
            let changes: Vec<(String, bool)> = std::mem::take(&mut pending)
                .into_iter()
                .filter(|(app, remove)| *remove || state.registry.get(app).is_some())
                .collect();
            match send(&state, changes).await {
                Ok(true) => {}
                Ok(false) => need_sync = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce apps; re-announcing all at the next heartbeat");
                    need_sync = true;
                }
            }
        }
    }
}
