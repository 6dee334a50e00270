//! The web UI under `/web`: pages rendered on the server from templates
//! compiled into the binary, with a little plain JavaScript (copy buttons,
//! the list refreshing itself). No external fonts, scripts or styles.
//!
//! - `account`: the login form and logout;
//! - `pages`: the server list, a server's page, the audit log;
//! - `editor`: creating, updating and deleting apps from YAML;
//! - `tools`: a short-lived MCP session that lists a server's tools as the
//!   user sees them, through the same path as any MCP client.
//!
//! A login is the user's token in an HttpOnly, SameSite=Strict cookie
//! (Secure under HTTPS) scoped to `/web`; the pages never hold it. Every
//! state-changing request carries a CSRF token derived from the login, and
//! a browser's Origin, when sent, must be the proxy's own.

// Handlers return ready-made pages as their errors.
#![allow(clippy::result_large_err)]

mod account;
mod editor;
mod pages;
mod tools;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use minijinja::Environment;
use portico_core::{Kind, Verb};
use sha2::{Digest, Sha256};

use crate::ProxyState;
use crate::mcp::Who;

/// The login cookie: the user's token.
const LOGIN_COOKIE: &str = "portico_web";
/// The login form's CSRF cookie, set before anyone is logged in.
const FORM_COOKIE: &str = "portico_login";

pub fn router() -> Router<Arc<ProxyState>> {
    Router::new()
        .route("/web", get(pages::servers))
        .route("/web/", get(pages::servers))
        .route("/web/fragments/servers", get(pages::server_rows))
        .route("/web/servers/{name}", get(pages::server))
        .route("/web/audit", get(pages::audit))
        .route("/web/login", get(account::form).post(account::login))
        .route("/web/logout", post(account::logout))
        .route("/web/apps/new", get(editor::new))
        .route("/web/apps", post(editor::save))
        .route("/web/apps/{name}/edit", get(editor::edit))
        .route("/web/apps/{name}/delete", post(editor::delete))
        .route("/web/assets/app.js", get(script))
        .route("/web/assets/style.css", get(style))
}

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("servers.html", include_str!("templates/servers.html")),
            (
                "server_rows.html",
                include_str!("templates/server_rows.html"),
            ),
            ("server.html", include_str!("templates/server.html")),
            ("audit.html", include_str!("templates/audit.html")),
            ("editor.html", include_str!("templates/editor.html")),
            ("error.html", include_str!("templates/error.html")),
        ] {
            // The templates are part of the binary and tested; one that
            // does not parse is a build defect.
            #[allow(clippy::expect_used)]
            env.add_template(name, text)
                .expect("the web templates compiled into the proxy parse");
        }
        env
    })
}

/// Headers every page carries: nothing loads from elsewhere, nothing
/// frames it, nothing is cached.
fn harden(r: &mut Response, cache: bool) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if cache { "max-age=300" } else { "no-store" }),
    );
}

/// Renders a template into a response with this status.
fn render(status: StatusCode, name: &str, ctx: minijinja::Value) -> Response {
    let body = match templates().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(template = name, error = %e, "a web page did not render");
            let mut r = (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered; the proxy's log says why\n",
            )
                .into_response();
            harden(&mut r, false);
            return r;
        }
    };
    let mut r = (status, axum::response::Html(body)).into_response();
    harden(&mut r, false);
    r
}

async fn script() -> Response {
    asset(
        include_str!("assets/app.js"),
        "text/javascript; charset=utf-8",
    )
}

async fn style() -> Response {
    asset(include_str!("assets/style.css"), "text/css; charset=utf-8")
}

fn asset(text: &'static str, kind: &'static str) -> Response {
    let mut r = Response::new(Body::from(text));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    harden(&mut r, true);
    r
}

/// A form that carries only its CSRF token (log out, delete).
#[derive(serde::Deserialize)]
pub(crate) struct Csrf {
    #[serde(default)]
    csrf: String,
}

/// The logged-in user behind a page request.
pub(crate) struct Viewer {
    who: Who,
    token: String,
    csrf: String,
}

impl Viewer {
    fn may_audit(&self) -> bool {
        self.who.checker.allows(Kind::Event, Verb::List)
    }

    fn may_write(&self) -> bool {
        self.who.checker.allows(Kind::App, Verb::Create)
            || self.who.checker.allows(Kind::App, Verb::Update)
            || self.who.checker.allows(Kind::App, Verb::Delete)
    }

    /// What every page's frame shows.
    fn frame(&self, nav: &str) -> minijinja::Value {
        minijinja::context! {
            user => self.who.name,
            roles => self.who.checker.role_names(),
            csrf => self.csrf,
            may_audit => self.may_audit(),
            may_write => self.may_write(),
            nav => nav,
        }
    }

    /// A page for this user: its own values over the frame's.
    fn page(&self, status: StatusCode, name: &str, nav: &str, ctx: minijinja::Value) -> Response {
        render(
            status,
            name,
            minijinja::context! { ..ctx, ..self.frame(nav) },
        )
    }

    fn error(&self, status: StatusCode, title: &str, message: &str) -> Response {
        self.page(
            status,
            "error.html",
            "",
            minijinja::context! { title => title, message => message },
        )
    }
}

/// The one value of a cookie. Absent, or sent more than once with
/// different values (a cookie planted from elsewhere beside the real one):
/// none.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found: Option<&str> = None;
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            let Some((k, val)) = part.trim().split_once('=') else {
                continue;
            };
            if k.trim() != name {
                continue;
            }
            let val = val.trim();
            match found {
                Some(f) if f != val => return None,
                _ => found = Some(val),
            }
        }
    }
    found.filter(|v| !v.is_empty() && v.len() <= 256)
}

/// The CSRF token of a login: derived from its token, so any proxy of the
/// cluster checks it without shared state, and reading it reveals nothing
/// of the token.
fn csrf_for(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"portico web csrf\0");
    h.update(token.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A `Set-Cookie` value for this listener: Secure unless the proxy serves
/// plain HTTP to a client that did not come through HTTPS.
fn set_cookie(
    state: &ProxyState,
    headers: &HeaderMap,
    name: &str,
    value: &str,
    path: &str,
    max_age: i64,
) -> HeaderValue {
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let secure = if !state.plain_http || forwarded_https {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn redirect(to: &str) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    harden(&mut r, false);
    r
}

/// The logged-in user, or the way to the login page (the cookie cleared
/// when the login it holds no longer works).
async fn viewer(
    state: &ProxyState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Viewer, Response> {
    let Some(token) = cookie(headers, LOGIN_COOKIE) else {
        return Err(redirect("/web/login"));
    };
    match crate::mcp::resolve(state, token).await {
        Ok(who) if !who.admin => Ok(Viewer {
            csrf: csrf_for(token),
            token: token.to_string(),
            who,
        }),
        Ok(_) => Err(expired(
            state,
            headers,
            "the web UI is for users; log in with a user name",
        )),
        Err((status, why)) if status == StatusCode::UNAUTHORIZED => {
            // As for a refused bearer token: counted and audited.
            crate::mcp::refused(state, peer, "/web", &why).await;
            Err(expired(state, headers, &why))
        }
        Err((status, why)) => {
            let mut r = render(
                status,
                "error.html",
                minijinja::context! { title => "Portico is unavailable", message => why },
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            Err(r)
        }
    }
}

/// To the login page, forgetting a login that ended.
fn expired(state: &ProxyState, headers: &HeaderMap, why: &str) -> Response {
    tracing::debug!(reason = why, "a web login ended");
    let mut r = redirect("/web/login?ended=1");
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, headers, LOGIN_COOKIE, "", "/web", 0),
    );
    r
}

/// A state-changing request must come from the proxy's own pages: the
/// browser's Origin (when it sends one) is the proxy's, and the form
/// carries the login's CSRF token.
fn check_form(
    state: &ProxyState,
    headers: &HeaderMap,
    uri: &http::Uri,
    expected: &str,
    sent: &str,
) -> Result<(), Response> {
    if !crate::mcp::http::origin_allowed(state, headers, uri) {
        return Err(forbidden("the request came from another site"));
    }
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
    {
        return Err(forbidden("the request came from another site"));
    }
    if expected.is_empty() || !same_secret(expected, sent) {
        return Err(forbidden(
            "the form expired or did not come from this page; reload the page and try again",
        ));
    }
    Ok(())
}

fn forbidden(message: &str) -> Response {
    render(
        StatusCode::FORBIDDEN,
        "error.html",
        minijinja::context! { title => "Refused", message => message },
    )
}

/// A request to the auth-service for the user of a login, naming the
/// browser's address (what the auth-service limits and audits by).
fn auth_request<T>(msg: T, peer: SocketAddr) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(std::time::Duration::from_secs(10));
    if let Ok(v) = peer.ip().to_canonical().to_string().parse() {
        req.metadata_mut()
            .insert(portico_proto::client::CLIENT_ADDR_HEADER, v);
    }
    req
}

/// The auth API as the user of a login.
fn auth_api(
    state: &ProxyState,
    token: Option<&str>,
) -> Result<portico_proto::client::AuthClient, Response> {
    portico_proto::client::with_token(state.auth_channel.clone(), token).map_err(|e| {
        render(
            StatusCode::UNAUTHORIZED,
            "error.html",
            minijinja::context! { title => "Refused", message => e },
        )
    })
}

/// How an auth-service refusal reads on a page.
fn status_text(s: &tonic::Status) -> (StatusCode, String) {
    let e = portico_proto::convert::from_status(s);
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; portico_web=abc"),
        );
        assert_eq!(cookie(&h, "portico_web"), Some("abc"));
        h.append(header::COOKIE, HeaderValue::from_static("portico_web=abc"));
        assert_eq!(cookie(&h, "portico_web"), Some("abc"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("portico_web=planted"),
        );
        assert_eq!(cookie(&h, "portico_web"), None);
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn csrf_tokens() {
        assert_eq!(csrf_for("t").len(), 32);
        assert_ne!(csrf_for("t"), csrf_for("u"));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }

    #[test]
    fn templates_parse() {
        for name in [
            "base.html",
            "login.html",
            "servers.html",
            "server_rows.html",
            "server.html",
            "audit.html",
            "editor.html",
            "error.html",
        ] {
            assert!(templates().get_template(name).is_ok(), "{name}");
        }
    }
}
