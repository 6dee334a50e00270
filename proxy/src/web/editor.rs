//! Apps from YAML in the browser: the same parsing and validation as
//! `pctl create` (so the same messages, with line numbers), then the
//! auth-service's `Create` or `Delete` as the logged-in user, whose roles
//! decide.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Form;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode, Uri};
use portico_core::parse::{MAX_FILE_BYTES, parse_documents};
use portico_core::{Kind, Resource};
use portico_proto::v1;
use serde::Deserialize;

use super::pages::encode;
use super::{Csrf, Viewer, auth_api, auth_request, check_form, redirect, status_text, viewer};
use crate::ProxyState;

/// What a new app starts from.
const EXAMPLE: &str = "kind: app
version: v3
metadata:
  name: everything
  description: Everything MCP server
  labels:
    env: dev
spec:
  mcp:
    command: npx
    args: [\"-y\", \"@modelcontextprotocol/server-everything\", \"stdio\"]
    run_as_host_user: mcp
";

/// The name the editor's YAML is known by in messages.
const FILE: &str = "app.yaml";

fn editor(
    v: &Viewer,
    status: StatusCode,
    mode: &str,
    original: &str,
    yaml: &str,
    error: Option<String>,
) -> Response {
    v.page(
        status,
        "editor.html",
        if mode == "update" { "servers" } else { "new" },
        minijinja::context! { mode => mode, original => original, yaml => yaml, error => error },
    )
}

fn refuse_writer(v: &Viewer) -> Option<Response> {
    (!v.may_write()).then(|| {
        v.error(
            StatusCode::FORBIDDEN,
            "Access denied",
            "Your roles do not allow writing apps.",
        )
    })
}

pub async fn new(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(r) = refuse_writer(&v) {
        return r;
    }
    editor(&v, StatusCode::OK, "create", "", EXAMPLE, None)
}

pub async fn edit(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(r) = refuse_writer(&v) {
        return r;
    }
    let mut api = match auth_api(&state, Some(&v.token)) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let got = api
        .get(auth_request(
            v1::GetRequest {
                kind: Kind::App.as_str().into(),
                name: name.clone(),
            },
            peer,
        ))
        .await;
    let res = match got {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let (status, message) = status_text(&s);
            return v.error(status, "Cannot edit", &message);
        }
    };
    let yaml = match Resource::from_json(Kind::App, &res.json) {
        Ok(mut r) => {
            // The server sets these; the editor shows what a person writes.
            r.metadata_mut().revision = 0;
            r.metadata_mut().expires = None;
            yaml_serde::to_string(&r.to_value()).unwrap_or_default()
        }
        Err(e) => {
            return v.error(
                StatusCode::BAD_GATEWAY,
                "Cannot edit",
                &format!("the stored app does not parse: {e}"),
            );
        }
    };
    editor(&v, StatusCode::OK, "update", &name, &yaml, None)
}

#[derive(Deserialize)]
pub struct Save {
    #[serde(default)]
    yaml: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    original: String,
    #[serde(default)]
    csrf: String,
}

pub async fn save(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<Save>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_form(&state, &headers, &uri, &v.csrf, &f.csrf) {
        return r;
    }
    if let Some(r) = refuse_writer(&v) {
        return r;
    }
    let update = f.mode == "update";
    let mode = if update { "update" } else { "create" };
    // Browsers send form text with CRLF line ends.
    let text = f.yaml.replace("\r\n", "\n");
    let again = |status: StatusCode, error: String| {
        editor(&v, status, mode, &f.original, &text, Some(error))
    };
    if text.len() > MAX_FILE_BYTES {
        return again(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the YAML is {} bytes; at most {MAX_FILE_BYTES}", text.len()),
        );
    }
    let resources = match parse_documents(FILE, &text) {
        Ok(r) => r,
        Err(e) => return again(StatusCode::UNPROCESSABLE_ENTITY, e.message),
    };
    let app = match resources.as_slice() {
        [r @ Resource::App(_)] => r,
        [_] => {
            return again(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{FILE}: this editor writes apps (kind: app); use pctl create for other kinds"
                ),
            );
        }
        _ => {
            return again(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{FILE}: give exactly one app ({} documents given)",
                    resources.len()
                ),
            );
        }
    };
    let name = app.name().to_string();
    if update && name != f.original {
        return again(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{FILE}: metadata.name is {name:?} but this page edits {:?}; to make a new app, use New app",
                f.original
            ),
        );
    }
    let mut api = match auth_api(&state, Some(&v.token)) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let req = v1::CreateRequest {
        resources: vec![v1::Resource {
            kind: Kind::App.as_str().into(),
            json: app.to_json(),
        }],
        overwrite: update,
    };
    match api.create(auth_request(req, peer)).await {
        Ok(_) => redirect(&format!("/web?done=created&app={}", encode(&name))),
        Err(s) => {
            let (status, message) = status_text(&s);
            again(status, message)
        }
    }
}

pub async fn delete(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    Path(name): Path<String>,
    Form(f): Form<Csrf>,
) -> Response {
    let v = match viewer(&state, &headers, peer).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_form(&state, &headers, &uri, &v.csrf, &f.csrf) {
        return r;
    }
    let mut api = match auth_api(&state, Some(&v.token)) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let req = v1::DeleteRequest {
        kind: Kind::App.as_str().into(),
        name: name.clone(),
    };
    match api.delete(auth_request(req, peer)).await {
        Ok(_) => redirect(&format!("/web?done=deleted&app={}", encode(&name))),
        Err(s) => {
            let (status, message) = status_text(&s);
            v.error(status, "Cannot delete", &message)
        }
    }
}
