//! RBAC on MCP traffic: what a client request may ask (tools, resources,
//! prompts, completions), how list answers are filtered, and the audit
//! record of each decision and its outcome. Decisions use the caller's
//! permissions as they are now (the live cache), and fail closed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use portico_core::AccessChecker;
use portico_core::rbac::Feature;
use portico_mcp::jsonrpc::{INVALID_PARAMS, Id, Message};
use portico_mcp::lists::{self, ListKind, Target};
use serde_json::json;

use super::session::{Pending, Session};
use crate::ProxyState;

/// What a forwarded request asked, for handling its answer.
#[derive(Debug, Clone)]
pub enum Asked {
    Initialize,
    List(ListKind),
    Gated(Target),
    Other,
}

/// A refused request: the JSON-RPC error it is answered with.
pub struct Denied {
    pub code: i64,
    pub message: String,
}

fn feature(t: &Target) -> (Feature, &str) {
    match t {
        Target::Tool(n) => (Feature::Tool, n),
        Target::Resource(u) => (Feature::Resource, u),
        Target::Prompt(n) => (Feature::Prompt, n),
    }
}

fn target_fields(t: &Target) -> serde_json::Value {
    match t {
        Target::Tool(n) => json!({"tool": n}),
        Target::Resource(u) => json!({"resource": u}),
        Target::Prompt(n) => json!({"prompt": n}),
    }
}

/// The caller's permissions right now: the admin preset for the local admin,
/// the live cache for users (none if the user was deleted).
pub fn live_checker(state: &ProxyState, s: &Session) -> Option<Arc<AccessChecker>> {
    if s.admin {
        return Some(super::admin_checker());
    }
    state.cache.checker(&s.user)
}

/// The labels of the session's app right now (none if it was removed).
fn app_labels(state: &ProxyState, app: &str) -> Option<BTreeMap<String, String>> {
    state.cache.app(app).map(|a| a.metadata.labels.clone())
}

/// Decides one client message before it is forwarded, and audits gated
/// requests. Notifications that name a gated method are checked too: a
/// server might act on them.
pub async fn check(state: &ProxyState, s: &Session, msg: &Message) -> Result<Asked, Denied> {
    let method = msg.method().unwrap_or("");
    if method == "initialize" {
        return Ok(Asked::Initialize);
    }
    if let Some(kind) = ListKind::for_method(method) {
        return Ok(Asked::List(kind));
    }
    let target = match lists::target(msg) {
        Ok(None) => return Ok(Asked::Other),
        Ok(Some(t)) => t,
        Err(why) => {
            audit_decision(state, s, msg, None, Err(&why)).await;
            return Err(Denied {
                code: INVALID_PARAMS,
                message: why,
            });
        }
    };
    let (f, name) = feature(&target);
    let decision = match (live_checker(state, s), app_labels(state, &s.app)) {
        (Some(checker), Some(labels)) => checker.mcp_allowed(&labels, f, name),
        (None, _) => Err(format!(
            "RBAC denied {} {name:?}: your user no longer exists",
            f.as_str()
        )),
        (_, None) => Err(format!(
            "RBAC denied {} {name:?}: the MCP server was removed",
            f.as_str()
        )),
    };
    audit_decision(
        state,
        s,
        msg,
        Some(&target),
        decision.as_ref().map(|_| ()).map_err(String::as_str),
    )
    .await;
    match decision {
        Ok(()) => Ok(Asked::Gated(target)),
        Err(why) => Err(Denied {
            code: INVALID_PARAMS,
            message: why,
        }),
    }
}

async fn audit_decision(
    state: &ProxyState,
    s: &Session,
    msg: &Message,
    target: Option<&Target>,
    decision: Result<(), &str>,
) {
    let mut fields = json!({
        "user": s.user, "app": s.app, "session": s.id,
        "method": msg.method(), "id": msg.id().map(Id::to_value),
        "phase": "decided", "allowed": decision.is_ok(), "error": decision.err(),
    });
    if let (Some(t), Some(obj)) = (target, fields.as_object_mut())
        && let Some(extra) = target_fields(t).as_object()
    {
        obj.extend(extra.clone());
    }
    state
        .audit
        .record("mcp.session.request", decision.is_ok(), fields)
        .await;
}

/// Handles the server's answer to a forwarded request: filters lists,
/// audits outcomes. An answer that cannot be filtered is an error.
pub async fn on_response(
    state: &ProxyState,
    s: &Session,
    pend: &Pending,
    msg: &mut Message,
) -> Result<Bytes, String> {
    match &pend.asked {
        Asked::List(kind) if !msg.is_error() => {
            let labels = app_labels(state, &s.app).ok_or_else(|| {
                "the MCP server was removed; its list cannot be filtered".to_string()
            })?;
            let checker = live_checker(state, s);
            let f = feature_of(*kind);
            let seen = std::cell::RefCell::new(Vec::new());
            lists::filter(msg, *kind, |name| {
                let ok = checker
                    .as_ref()
                    .is_some_and(|c| c.mcp_allowed(&labels, f, name).is_ok());
                seen.borrow_mut().push((name.to_string(), ok));
                ok
            })
            .map_err(|e| format!("{e}; the answer was withheld because it cannot be filtered"))?;
            s.saw_list(*kind, seen.into_inner());
        }
        Asked::Gated(target) => {
            let tool_error = msg
                .result()
                .and_then(|r| r.get("isError"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            let outcome = if msg.is_error() {
                "error"
            } else if tool_error {
                "tool_error"
            } else {
                "ok"
            };
            let mut fields = json!({
                "user": s.user, "app": s.app, "session": s.id, "id": msg.id().map(Id::to_value),
                "phase": "completed", "allowed": true, "outcome": outcome,
                "error": msg.error_message(), "tool_error": tool_error,
                "ms": pend.started.elapsed().as_millis() as u64,
            });
            if let (Some(obj), Some(extra)) =
                (fields.as_object_mut(), target_fields(target).as_object())
            {
                obj.extend(extra.clone());
            }
            state
                .audit
                .record("mcp.session.request", outcome == "ok", fields)
                .await;
        }
        _ if msg.is_error() => {
            state.audit.record(
                "mcp.session.request",
                false,
                json!({"user": s.user, "app": s.app, "session": s.id, "phase": "completed", "error": msg.error_message()}),
            ).await;
        }
        _ => {}
    }
    Ok(msg.to_bytes())
}

/// The feature a list's items are checked as.
fn feature_of(kind: ListKind) -> Feature {
    match kind {
        ListKind::Tools => Feature::Tool,
        ListKind::Prompts => Feature::Prompt,
        ListKind::Resources | ListKind::ResourceTemplates => Feature::Resource,
    }
}

/// Tells a session's client that a list it has seen now shows other items
/// under the roles as they are (`notifications/*/list_changed`), so that it
/// asks again without reconnecting.
pub async fn notify_list_changes(state: &ProxyState, s: &Session) {
    let Some(labels) = app_labels(state, &s.app) else {
        return;
    };
    let checker = live_checker(state, s);
    let changed = s.relist(|kind, name| {
        checker
            .as_ref()
            .is_some_and(|c| c.mcp_allowed(&labels, feature_of(kind), name).is_ok())
    });
    let mut sent = Vec::new();
    for kind in changed {
        let method = kind.changed_notification();
        if sent.contains(&method) {
            continue;
        }
        sent.push(method);
        let note = Bytes::from(format!(r#"{{"jsonrpc":"2.0","method":"{method}"}}"#));
        tracing::info!(session = %s.id, user = %s.user, method, "roles changed what the session may see");
        if s.deliver_from_proxy(note).await.is_err() {
            return;
        }
    }
}

/// Audits a gated request that was still waiting when its session ended.
pub async fn unanswered(state: &ProxyState, s: &Session, id: &Id, pend: &Pending, reason: &str) {
    if let Asked::Gated(target) = &pend.asked {
        let mut fields = json!({
            "user": s.user, "app": s.app, "session": s.id, "id": id.to_value(),
            "phase": "completed", "allowed": true, "outcome": "unanswered", "error": reason,
            "ms": pend.started.elapsed().as_millis() as u64,
        });
        if let (Some(obj), Some(extra)) =
            (fields.as_object_mut(), target_fields(target).as_object())
        {
            obj.extend(extra.clone());
        }
        state
            .audit
            .record("mcp.session.request", false, fields)
            .await;
    }
}
