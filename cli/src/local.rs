//! `psh proxy mcp NAME`: a Streamable HTTP endpoint on loopback, without a
//! token, that forwards to the proxy with the logged-in user's
//! credentials, for MCP clients that can neither send a header nor run a
//! stdio bridge. It answers only requests addressed to itself (the Host
//! header) from no browser or from its own origin, and stops when the
//! login expires.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portico_core::time::{format_rfc3339, now_ms};

use crate::http::base_url;
use crate::profile::Profile;
use crate::{CliResult, Fail};

type Body = BoxBody<Bytes, hyper::Error>;

/// Request headers passed on to the proxy; everything else stays here.
const FORWARDED: [&str; 6] = [
    "content-type",
    "accept",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
    "content-length",
];
/// Response headers passed back to the client.
const RETURNED: [&str; 4] = [
    "content-type",
    "mcp-session-id",
    "cache-control",
    "www-authenticate",
];

struct Local {
    client: Client<portico_tls::Connector, Body>,
    upstream: String,
    token: String,
    /// `127.0.0.1:PORT` and `localhost:PORT`, the only Hosts answered.
    hosts: [String; 2],
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Local {
    /// Only requests for this endpoint, from no browser page or from one
    /// served here (a web page elsewhere must not use the user's login).
    fn refuse(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !self.hosts.iter().any(|h| h == host) {
            return Some(plain(
                StatusCode::FORBIDDEN,
                "this endpoint answers only requests for itself (Host)",
            ));
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| self.hosts.iter().any(|h| o == format!("http://{h}")));
            if !ok {
                return Some(plain(
                    StatusCode::FORBIDDEN,
                    "requests from other origins are refused",
                ));
            }
        }
        if req.uri().path() != "/mcp" {
            return Some(plain(StatusCode::NOT_FOUND, "the MCP endpoint is /mcp"));
        }
        None
    }

    async fn forward(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if let Some(r) = self.refuse(&req) {
            return r;
        }
        let (parts, body) = req.into_parts();
        let mut out = Request::builder()
            .method(parts.method.clone())
            .uri(&self.upstream);
        for name in FORWARDED {
            for v in parts.headers.get_all(name) {
                out = out.header(name, v);
            }
        }
        out = out.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        let Ok(out) = out.body(body.boxed()) else {
            return plain(StatusCode::BAD_REQUEST, "the request cannot be forwarded");
        };
        let resp =
            match tokio::time::timeout(Duration::from_secs(60), self.client.request(out)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "cannot reach the proxy: {}",
                            portico_proto::client::source_text(&e)
                        ),
                    );
                }
                Err(_) => {
                    return plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the proxy did not answer in 60 s",
                    );
                }
            };
        let (rparts, rbody) = resp.into_parts();
        let mut back = Response::new(rbody.boxed());
        *back.status_mut() = rparts.status;
        for name in RETURNED {
            for v in rparts.headers.get_all(name) {
                back.headers_mut().append(name, v.clone());
            }
        }
        back
    }
}

/// Serves until the login expires (or the process is stopped).
pub async fn run(profile: Profile, app: String, port: u16) -> CliResult {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| Fail::new(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Fail::new(e.to_string()))?;
    let local = Arc::new(Local {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(profile.connector()?),
        upstream: format!("{}/mcp/{app}", base_url(&profile.proxy)),
        token: profile.token.clone(),
        hosts: [
            format!("127.0.0.1:{}", addr.port()),
            format!("localhost:{}", addr.port()),
        ],
    });
    println!("http://{addr}/mcp");
    println!(
        "forwards to {app} through {} as {} until {} (Ctrl-C stops it)",
        profile.proxy,
        profile.user,
        format_rfc3339(profile.expires_ms)
    );
    let expiry = async {
        let left = (profile.expires_ms - now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(left)).await;
    };
    tokio::pin!(expiry);
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut expiry => {
                return Err(Fail::new(format!(
                    "your login expired at {}; run psh login again, then psh proxy mcp {app}",
                    format_rfc3339(profile.expires_ms)
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = local.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let local = local.clone();
                async move { Ok::<_, Infallible>(local.forward(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
