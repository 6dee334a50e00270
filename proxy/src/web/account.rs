//! Logging in with a user name and password (the auth-service's `Login`,
//! so the same limiter and audit as `psh login`, by the browser's address)
//! and logging out (the login's token stops working).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Form;
use axum::extract::{ConnectInfo, Query, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode, Uri, header};
use portico_core::time::now_ms;
use portico_proto::v1;
use rand::RngCore;
use serde::Deserialize;

use super::{
    Csrf, FORM_COOKIE, LOGIN_COOKIE, auth_api, auth_request, check_form, cookie, csrf_for,
    redirect, render, set_cookie, status_text,
};
use crate::ProxyState;

#[derive(Deserialize, Default)]
pub struct Ended {
    #[serde(default)]
    ended: Option<String>,
    #[serde(default)]
    out: Option<String>,
}

/// The login form, with a fresh form token in a cookie and in the form.
pub async fn form(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Query(q): Query<Ended>,
) -> Response {
    let notice = if q.out.is_some() {
        "You are logged out."
    } else if q.ended.is_some() {
        "Your login ended; log in again."
    } else {
        ""
    };
    login_page(&state, &headers, StatusCode::OK, "", "", notice)
}

fn login_page(
    state: &ProxyState,
    headers: &HeaderMap,
    status: StatusCode,
    name: &str,
    error: &str,
    notice: &str,
) -> Response {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut r = render(
        status,
        "login.html",
        minijinja::context! { csrf => token, name => name, error => error, notice => notice },
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, headers, FORM_COOKIE, &token, "/web/login", 3600),
    );
    r
}

#[derive(Deserialize)]
pub struct Credentials {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

pub async fn login(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<Credentials>,
) -> Response {
    let expected = cookie(&headers, FORM_COOKIE).unwrap_or("");
    if let Err(r) = check_form(&state, &headers, &uri, expected, &f.csrf) {
        return r;
    }
    let user = f.user.trim().to_string();
    let mut api = match auth_api(&state, None) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let resp = api
        .login(auth_request(
            v1::LoginRequest {
                user: user.clone(),
                password: f.password,
            },
            peer,
        ))
        .await;
    let resp = match resp {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let (status, message) = status_text(&s);
            let status = if status == StatusCode::FORBIDDEN {
                StatusCode::UNAUTHORIZED
            } else {
                status
            };
            return login_page(&state, &headers, status, &user, &message, "");
        }
    };
    let max_age = ((resp.expires_ms - now_ms()) / 1000).max(1);
    let mut r = redirect("/web");
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(&state, &headers, LOGIN_COOKIE, &resp.token, "/web", max_age),
    );
    h.append(
        header::SET_COOKIE,
        set_cookie(&state, &headers, FORM_COOKIE, "", "/web/login", 0),
    );
    r
}

/// Ends the login at the auth-service and forgets it here.
pub async fn logout(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<Csrf>,
) -> Response {
    let Some(token) = cookie(&headers, LOGIN_COOKIE) else {
        return redirect("/web/login");
    };
    if let Err(r) = check_form(&state, &headers, &uri, &csrf_for(token), &f.csrf) {
        return r;
    }
    if let Ok(mut api) = auth_api(&state, Some(token))
        && let Err(s) = api.logout(auth_request(v1::LogoutRequest {}, peer)).await
        && s.code() != tonic::Code::Unauthenticated
    {
        tracing::warn!(error = %s.message(), "the auth service did not end a web login");
    }
    state.authn.forget(token);
    let mut r = redirect("/web/login?out=1");
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, &headers, LOGIN_COOKIE, "", "/web", 0),
    );
    r
}
