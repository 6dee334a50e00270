//! RBAC on MCP traffic: what a client request may ask (tools, resources,
//! prompts, completions), how list answers are filtered, and the audit
//! record of each decision and its outcome. Decisions use the caller's
//! permissions as they are now (the live cache), and fail closed.

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
    /// An allowed request that names a tool, resource or prompt, and its
    /// method (one of `lists::GATED`).
    Gated(Target, &'static str),
    Other,
}

/// How long an allowed request may wait for its answer before its decision
/// is audited on its own (`phase: decided`). One answered sooner is
/// audited once, when it completes, with its decision in the same record.
pub const DECIDED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

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

/// What a gated request names: (`tool`, `resource`, `prompt`), one set.
fn named(t: Option<&Target>) -> (Option<&str>, Option<&str>, Option<&str>) {
    match t {
        Some(Target::Tool(n)) => (Some(n), None, None),
        Some(Target::Resource(u)) => (None, Some(u), None),
        Some(Target::Prompt(n)) => (None, None, Some(n)),
        None => (None, None, None),
    }
}

/// A request id as JSON-RPC has it: a number or a string.
fn id_field<S: serde::Serializer>(id: &Option<&Id>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(Id::Int(i)) => s.serialize_i64(*i),
        Some(Id::Str(v)) => s.serialize_str(v),
        None => s.serialize_none(),
    }
}

/// The fields of `mcp.session.request` when the proxy decides (written
/// straight from here: this runs for every tool call).
#[derive(serde::Serialize)]
struct Decided<'a> {
    user: &'a str,
    app: &'a str,
    session: &'a str,
    method: Option<&'a str>,
    #[serde(serialize_with = "id_field")]
    id: Option<&'a Id>,
    phase: &'static str,
    allowed: bool,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
}

/// The fields of `mcp.session.request` when an allowed request is
/// answered: its decision and its outcome in one record.
#[derive(serde::Serialize)]
struct Completed<'a> {
    user: &'a str,
    app: &'a str,
    session: &'a str,
    method: &'a str,
    #[serde(serialize_with = "id_field")]
    id: Option<&'a Id>,
    phase: &'static str,
    allowed: bool,
    outcome: &'static str,
    error: Option<String>,
    tool_error: bool,
    ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
}

/// The caller's permissions right now: the admin preset for the local admin,
/// the live cache for users (none if the user was deleted).
pub fn live_checker(state: &ProxyState, s: &Session) -> Option<Arc<AccessChecker>> {
    if s.admin {
        return Some(super::admin_checker());
    }
    state.cache.checker(&s.user)
}

/// Decides one client message before it is forwarded. Refusals are
/// audited here; an allowed request when it completes (`on_response`,
/// `unanswered`), or, if it is still waiting after `DECIDED_AFTER`, also
/// then (`audit_waiting`). Notifications that name a gated method are
/// checked too, and audited here either way: a server might act on them,
/// and nothing completes them.
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
            audit_decision(state, s, msg.method(), msg.id(), None, Err(&why)).await;
            return Err(Denied {
                code: INVALID_PARAMS,
                message: why,
            });
        }
    };
    let (f, name) = feature(&target);
    let decision = match (live_checker(state, s), state.cache.app(&s.app)) {
        (Some(checker), Some(app)) => checker.mcp_allowed(&app.metadata.labels, f, name),
        (None, _) => Err(format!(
            "RBAC denied {} {name:?}: your user no longer exists",
            f.as_str()
        )),
        (_, None) => Err(format!(
            "RBAC denied {} {name:?}: the MCP server was removed",
            f.as_str()
        )),
    };
    if decision.is_err() || !msg.is_request() {
        let d = decision.as_ref().map(|_| ()).map_err(String::as_str);
        audit_decision(state, s, msg.method(), msg.id(), Some(&target), d).await;
    }
    match decision {
        Ok(()) => {
            let gated = lists::GATED.into_iter().find(|g| *g == method);
            Ok(Asked::Gated(target, gated.unwrap_or("unknown")))
        }
        Err(why) => Err(Denied {
            code: INVALID_PARAMS,
            message: why,
        }),
    }
}

/// Audits the decision on every allowed request that has waited
/// `DECIDED_AFTER` for its answer, once: a long call is in the audit log
/// while it runs, not only when it ends.
pub async fn audit_waiting(state: &ProxyState) {
    for s in state.sessions.all() {
        for (id, target, method) in s.waiting_unaudited(DECIDED_AFTER) {
            audit_decision(state, &s, Some(method), Some(&id), Some(&target), Ok(())).await;
        }
    }
}

/// One `phase: decided` record.
async fn audit_decision(
    state: &ProxyState,
    s: &Session,
    method: Option<&str>,
    id: Option<&Id>,
    target: Option<&Target>,
    decision: Result<(), &str>,
) {
    let (tool, resource, prompt) = named(target);
    let fields = Decided {
        user: &s.user,
        app: &s.app,
        session: &s.id,
        method,
        id,
        phase: "decided",
        allowed: decision.is_ok(),
        error: decision.err(),
        tool,
        resource,
        prompt,
    };
    state
        .audit
        .record_json(
            "mcp.session.request",
            decision.is_ok(),
            serde_json::to_string(&fields).unwrap_or_default(),
        )
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
            let app = state.cache.app(&s.app).ok_or_else(|| {
                "the MCP server was removed; its list cannot be filtered".to_string()
            })?;
            let labels = &app.metadata.labels;
            let checker = live_checker(state, s);
            let f = feature_of(*kind);
            let seen = std::cell::RefCell::new(Vec::new());
            lists::filter(msg, *kind, |name| {
                let ok = checker
                    .as_ref()
                    .is_some_and(|c| c.mcp_allowed(labels, f, name).is_ok());
                seen.borrow_mut().push((name.to_string(), ok));
                ok
            })
            .map_err(|e| format!("{e}; the answer was withheld because it cannot be filtered"))?;
            s.saw_list(*kind, seen.into_inner());
        }
        Asked::Gated(target, method) => {
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
            let (tool, resource, prompt) = named(Some(target));
            let fields = Completed {
                user: &s.user,
                app: &s.app,
                session: &s.id,
                method,
                id: msg.id(),
                phase: "completed",
                allowed: true,
                outcome,
                error: msg.error_message(),
                tool_error,
                ms: pend.started.elapsed().as_millis() as u64,
                tool,
                resource,
                prompt,
            };
            state
                .audit
                .record_json(
                    "mcp.session.request",
                    outcome == "ok",
                    serde_json::to_string(&fields).unwrap_or_default(),
                )
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
    let Some(app) = state.cache.app(&s.app) else {
        return;
    };
    let labels = &app.metadata.labels;
    let checker = live_checker(state, s);
    let changed = s.relist(|kind, name| {
        checker
            .as_ref()
            .is_some_and(|c| c.mcp_allowed(labels, feature_of(kind), name).is_ok())
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
    if let Asked::Gated(target, method) = &pend.asked {
        let mut fields = json!({
            "user": s.user, "app": s.app, "session": s.id, "method": method, "id": id.to_value(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: &impl serde::Serialize) -> serde_json::Value {
        serde_json::from_str(&serde_json::to_string(v).expect("written")).expect("JSON")
    }

    /// The records written from structs carry exactly the fields (names,
    /// types, nulls) that the maps they replaced carried.
    #[test]
    fn call_records_keep_their_fields() {
        let tool = Target::Tool("echo".into());
        let id = Id::Str("k\"1".into());
        let (t, r, p) = named(Some(&tool));
        let decided = Decided {
            user: "u",
            app: "a",
            session: "s",
            method: Some("tools/call"),
            id: Some(&id),
            phase: "decided",
            allowed: false,
            error: Some("RBAC denied"),
            tool: t,
            resource: r,
            prompt: p,
        };
        assert_eq!(
            fields(&decided),
            json!({"user": "u", "app": "a", "session": "s", "method": "tools/call",
                   "id": "k\"1", "phase": "decided", "allowed": false,
                   "error": "RBAC denied", "tool": "echo"})
        );
        // A request that could not be read: no target, and nulls kept.
        let (t, r, p) = named(None);
        let unread = Decided {
            method: None,
            id: None,
            allowed: true,
            error: None,
            tool: t,
            resource: r,
            prompt: p,
            ..decided
        };
        assert_eq!(
            fields(&unread),
            json!({"user": "u", "app": "a", "session": "s", "method": null, "id": null,
                   "phase": "decided", "allowed": true, "error": null})
        );
        let resource = Target::Resource("file:///x".into());
        let (t, r, p) = named(Some(&resource));
        let id = Id::Int(-7);
        let completed = Completed {
            user: "u",
            app: "a",
            session: "s",
            method: "resources/read",
            id: Some(&id),
            phase: "completed",
            allowed: true,
            outcome: "tool_error",
            error: None,
            tool_error: true,
            ms: 12,
            tool: t,
            resource: r,
            prompt: p,
        };
        assert_eq!(
            fields(&completed),
            json!({"user": "u", "app": "a", "session": "s", "method": "resources/read",
                   "id": -7, "phase": "completed",
                   "allowed": true, "outcome": "tool_error", "error": null,
                   "tool_error": true, "ms": 12, "resource": "file:///x"})
        );
        let prompt = Target::Prompt("p".into());
        assert_eq!(named(Some(&prompt)), (None, None, Some("p")));
    }
}
