//! The pages people read: the MCP servers they may reach (the list
//! `psh mcp ls -v` shows, refreshing itself), one server's tools and
//! connection snippets, and the audit log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use portico_core::client_config::{self, McpClient};
use portico_core::labels::listing_matches;
use portico_core::time::{format_rfc3339, parse_rfc3339};
use portico_proto::v1;
use serde::{Deserialize, Serialize};

use super::{Viewer, auth_api, auth_request, render, status_text, viewer};
use crate::ProxyState;
use crate::routes::{AppInfo, visible_apps};

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    done: String,
    #[serde(default)]
    app: String,
}

/// One row of the list.
#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    info: AppInfo,
    /// The allowed tools as `psh mcp ls` summarises them.
    tools: String,
}

/// `k=v,k2=v2` into pairs; an error names the part that is not `k=v`.
fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("{p:?} is not LABEL=VALUE")),
        })
        .collect()
}

/// The rows these filters keep, and a complaint about the filters.
fn rows(state: &ProxyState, v: &Viewer, q: &ListQuery) -> (Vec<Row>, Option<String>) {
    let (want, label_error) = match parse_labels(&q.label) {
        Ok(w) => (w, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let search = q.q.trim();
    let search = (!search.is_empty()).then_some(search);
    let rows = visible_apps(state, &v.who.checker)
        .into_iter()
        .filter(|a| {
            let m = &a.app.metadata;
            listing_matches(
                &m.name,
                &m.description,
                m.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                &want,
                search,
            )
        })
        .map(|info| Row {
            tools: portico_core::rbac::summary(&info.allowed_tools, &info.denied_tools),
            info,
        })
        .collect();
    (rows, label_error)
}

fn list_query(q: &ListQuery) -> String {
    let mut parts = Vec::new();
    if !q.q.trim().is_empty() {
        parts.push(format!("q={}", encode(q.q.trim())));
    }
    if !q.label.trim().is_empty() {
        parts.push(format!("label={}", encode(q.label.trim())));
    }
    parts.join("&")
}

/// Percent-encodes a query value.
pub(super) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn servers(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (servers, label_error) = rows(&state, &v, &q);
    v.page(
        StatusCode::OK,
        "servers.html",
        "servers",
        minijinja::context! {
            servers => minijinja::Value::from_serialize(&servers),
            filtered => !q.q.trim().is_empty() || !q.label.trim().is_empty(),
            q => q.q, label => q.label, label_error => label_error,
            query => list_query(&q),
            done => q.done, app => q.app,
        },
    )
}

/// The list's rows alone, which the page fetches every few seconds.
pub async fn server_rows(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        // Scripts cannot follow a redirect to the login page usefully.
        Err(_) => return (StatusCode::UNAUTHORIZED, "log in again\n").into_response(),
    };
    let (servers, _) = rows(&state, &v, &q);
    render(
        StatusCode::OK,
        "server_rows.html",
        minijinja::context! {
            servers => minijinja::Value::from_serialize(&servers),
            filtered => !q.q.trim().is_empty() || !q.label.trim().is_empty(),
        },
    )
}

#[derive(Serialize)]
struct Snippet {
    key: &'static str,
    title: &'static str,
    json: String,
}

/// The address clients use: the configured public address, else the host
/// this request named.
fn public_base(state: &ProxyState, headers: &HeaderMap, uri: &http::Uri) -> String {
    let host = state
        .public_addr
        .clone()
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost:3080".into());
    let scheme = if state.plain_http { "http" } else { "https" };
    format!("{scheme}://{host}")
}

pub async fn server(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: http::Uri,
    Path(name): Path<String>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    // Exactly what the list shows: an app the user may not reach, or that
    // no agent serves, is not found (its existence is not revealed).
    let Some(info) = visible_apps(&state, &v.who.checker)
        .into_iter()
        .find(|a| a.name() == name)
    else {
        return v.error(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("No MCP server named {name:?} that you can reach is online."),
        );
    };
    let (tools, tools_error) = match super::tools::list(&state, &v.token, &name, peer).await {
        Ok(t) => (t, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let base = public_base(&state, &headers, &uri);
    let apps = vec![name.clone()];
    let configs: Vec<Snippet> = McpClient::ALL
        .iter()
        .map(|c| Snippet {
            key: c.as_str(),
            title: c.title(),
            json: serde_json::to_string_pretty(&client_config::document("psh", &apps, *c))
                .unwrap_or_default(),
        })
        .collect();
    v.page(
        StatusCode::OK,
        "server.html",
        "servers",
        minijinja::context! {
            s => minijinja::Value::from_serialize(&info),
            tools => minijinja::Value::from_serialize(&tools),
            tools_error => tools_error,
            url => format!("{base}/mcp/{name}"),
            configs => minijinja::Value::from_serialize(&configs),
        },
    )
}

#[derive(Deserialize, Default, Serialize)]
pub struct AuditQuery {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    before: Option<i64>,
}

#[derive(Serialize)]
struct EventRow {
    time: String,
    #[serde(rename = "type")]
    kind: String,
    user: String,
    app: String,
    success: bool,
    details: String,
}

/// A `datetime-local` value (UTC), whole seconds or not, as unix ms.
fn parse_local(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let full = match s.len() {
        16 => format!("{s}:00Z"),
        _ => format!("{s}Z"),
    };
    parse_rfc3339(&full).ok_or_else(|| format!("{s:?} is not a time like 2026-11-25T18:30"))
}

const PAGE: i64 = 50;

pub async fn audit(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !v.may_audit() {
        return v.error(
            StatusCode::FORBIDDEN,
            "Access denied",
            "Your roles do not allow reading the audit log.",
        );
    }
    let mut error = None;
    let mut bound = |s: &str| -> i64 {
        if s.trim().is_empty() {
            return 0;
        }
        parse_local(s).unwrap_or_else(|e| {
            error = Some(e);
            0
        })
    };
    let since_ms = bound(&q.since);
    let until_ms = bound(&q.until);
    let mut events = Vec::new();
    let mut next = 0;
    if error.is_none() {
        let mut api = match auth_api(&state, Some(&v.token)) {
            Ok(a) => a,
            Err(r) => return r,
        };
        let req = v1::ListEventsRequest {
            r#type: q.kind.trim().to_string(),
            since_ms,
            limit: PAGE,
            user: q.user.trim().to_string(),
            app: q.app.trim().to_string(),
            until_ms,
            before_id: q.before.unwrap_or(0).max(0),
            newest_first: true,
        };
        match api.list_events(auth_request(req, peer)).await {
            Ok(r) => {
                let r = r.into_inner();
                next = r.next_before_id;
                events = r.events.into_iter().map(event_row).collect();
            }
            Err(s) => {
                let (status, message) = status_text(&s);
                if status == StatusCode::FORBIDDEN {
                    return v.error(StatusCode::FORBIDDEN, "Access denied", &message);
                }
                error = Some(message);
            }
        }
    }
    let filters = {
        let mut parts = Vec::new();
        for (k, val) in [
            ("type", &q.kind),
            ("user", &q.user),
            ("app", &q.app),
            ("since", &q.since),
            ("until", &q.until),
        ] {
            if !val.trim().is_empty() {
                parts.push(format!("{k}={}", encode(val.trim())));
            }
        }
        parts.join("&")
    };
    let older = (next > 0).then(|| {
        if filters.is_empty() {
            format!("before={next}")
        } else {
            format!("{filters}&before={next}")
        }
    });
    v.page(
        StatusCode::OK,
        "audit.html",
        "audit",
        minijinja::context! {
            f => minijinja::Value::from_serialize(&q),
            events => minijinja::Value::from_serialize(&events),
            error => error,
            first_page => q.before.is_none(),
            newest_query => filters,
            older_query => older,
        },
    )
}

fn event_row(e: v1::AuditEvent) -> EventRow {
    let fields: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&e.fields_json).unwrap_or_default();
    let text = |k: &str| fields.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let user = text("user").unwrap_or_else(|| e.actor.clone());
    let app = text("app").unwrap_or_else(|| {
        if e.r#type.starts_with("app.") {
            text("name").unwrap_or_default()
        } else {
            String::new()
        }
    });
    let details = fields
        .iter()
        .filter(|(k, v)| !v.is_null() && k.as_str() != "user" && k.as_str() != "app")
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ");
    EventRow {
        time: format_rfc3339(e.time_ms),
        kind: e.r#type,
        user,
        app,
        success: e.success,
        details,
    }
}
