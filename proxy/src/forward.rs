//! Forwards the auth-service's gRPC API, so that `pctl` and `psh` reach it
//! through the proxy with the caller's own token (no proxy privileges).

use std::sync::Arc;

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use http::StatusCode;
use portico_proto::client::CLIENT_ADDR_HEADER;
use tower::ServiceExt;

use crate::ProxyState;

const MAX_REQUEST: usize = 8 * 1024 * 1024;

pub async fn grpc(
    State(state): State<Arc<ProxyState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = tonic::body::Body::new(http_body_util::Limited::new(body, MAX_REQUEST));
    let mut out = http::Request::from_parts(parts, body);
    // The channel sets scheme and authority; hop-by-hop headers do not travel.
    out.headers_mut().remove(http::header::HOST);
    out.headers_mut().remove(http::header::CONNECTION);
    // The auth-service limits and audits logins by the client's address,
    // which only the proxy knows; whatever the client claims is replaced.
    let addr = peer.ip().to_canonical().to_string();
    match http::HeaderValue::from_str(&addr) {
        Ok(v) => {
            out.headers_mut().insert(CLIENT_ADDR_HEADER, v);
        }
        Err(_) => {
            out.headers_mut().remove(CLIENT_ADDR_HEADER);
        }
    }
    match state.auth_channel.clone().oneshot(out).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the auth service");
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::OK;
            let h = r.headers_mut();
            h.insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", http::HeaderValue::from_static("14"));
            h.insert(
                "grpc-message",
                http::HeaderValue::from_static("the%20auth%20service%20is%20unavailable"),
            );
            r
        }
    }
}
