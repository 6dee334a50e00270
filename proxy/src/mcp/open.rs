//! Opening a session: a slot under the user's cap, then a stream to a
//! random healthy agent serving the app, trying the next on a dial failure.

use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use http::StatusCode;
use http_body_util::BodyExt;
use portico_mcp::jsonrpc::SERVER_ERROR;
use portico_tunnel::{H_APP, H_SESSION, H_USER, Route, direct};
use rand::seq::SliceRandom;

use super::Who;
use super::http::rpc_error;
use super::session::{DirectOutput, Session};
use crate::ProxyState;

/// How long an agent may take to accept a session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn open_session(
    state: &Arc<ProxyState>,
    who: &Who,
    app: &str,
) -> Result<Arc<Session>, Response> {
    // Taken before anything else, so parallel initializes cannot pass the cap.
    if !state
        .sessions
        .reserve(&who.name, state.max_sessions_per_user)
    {
        return Err(rpc_error(
            StatusCode::TOO_MANY_REQUESTS,
            SERVER_ERROR,
            &format!(
                "you have {} open sessions, the most allowed; end some (DELETE) first",
                state.max_sessions_per_user
            ),
        ));
    }
    // Given back unless the session opens, also when the client goes away
    // while the agent is dialled (the future is dropped then).
    let mut slot = Slot {
        state,
        user: &who.name,
        kept: false,
    };
    let opened = dial(state, who, app).await;
    slot.kept = opened.is_ok();
    opened
}

/// A reserved session slot, returned on drop unless `kept`.
struct Slot<'a> {
    state: &'a ProxyState,
    user: &'a str,
    kept: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.state.sessions.unreserve(self.user);
        }
    }
}

async fn dial(state: &Arc<ProxyState>, who: &Who, app: &str) -> Result<Arc<Session>, Response> {
    let mut hosts: Vec<String> = state
        .cache
        .servers(app)
        .into_iter()
        .filter(|h| state.tunnels.is_connected(h))
        .collect();
    if hosts.is_empty() {
        return Err(rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            &format!("no agent is serving the MCP server {app:?} right now"),
        ));
    }
    hosts.shuffle(&mut rand::rng());
    let id = random_session_id();
    for host in hosts {
        let Some(route) = state.tunnels.route(&host) else {
            continue;
        };
        let (tx, lines) = portico_tunnel::queue::channel(256);
        let body = lines.boxed();
        let Ok(mut req) = http::Request::post("http://agent/v1/session")
            .header(H_APP, app)
            .header(H_SESSION, &id)
            .header(H_USER, &who.name)
            .body(body)
        else {
            continue;
        };
        let s = Session::new(
            id.clone(),
            who.name.clone(),
            app.to_string(),
            host.clone(),
            who.admin,
            tx,
        );
        let gone = match &route {
            Route::Local(_, gone) => {
                // A stdio server of an agent in this process hands its
                // lines to the session directly (`portico_tunnel::direct`).
                req.extensions_mut()
                    .insert(direct::OutputRef(Arc::new(DirectOutput {
                        session: s.clone(),
                        state: state.clone(),
                    })));
                Some(gone.clone())
            }
            Route::Remote(_) => None,
        };
        let attempt = async {
            match route {
                Route::Remote(mut sender) => {
                    sender.ready().await?;
                    let resp = sender.send_request(req).await?;
                    Ok::<_, hyper::Error>(resp.map(portico_tunnel::boxed))
                }
                Route::Local(handler, _) => Ok(handler(req).await),
            }
        };
        match tokio::time::timeout(OPEN_TIMEOUT, attempt).await {
            Ok(Ok(mut resp)) if resp.status() == StatusCode::OK => {
                if let Some(input) = resp.extensions_mut().remove::<direct::Input>() {
                    s.write_to(input);
                }
                state.sessions.insert(s.clone());
                state
                    .metrics
                    .sessions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if gone.is_some() {
                    state
                        .metrics
                        .sessions_in_process
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::spawn(
                    s.clone()
                        .pump_from_agent(state.clone(), resp.into_body(), gone),
                );
                tracing::info!(session = %id, app, user = %who.name, agent = %host, "mcp session opened");
                return Ok(s);
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::NOT_FOUND => {
                tracing::info!(app, agent = %host, "agent no longer serves the app; trying the next");
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                let text = http_body_util::Limited::new(resp.into_body(), 4096)
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_else(|_| format!("the agent answered {status}"));
                state.audit.record(
                    "mcp.session.request",
                    false,
                    serde_json::json!({"user": who.name, "app": app, "agent": host, "error": text}),
                ).await;
                return Err(rpc_error(StatusCode::BAD_GATEWAY, SERVER_ERROR, &text));
            }
            Ok(Err(e)) => {
                tracing::warn!(app, agent = %host, error = %e, "cannot reach agent; trying the next")
            }
            Err(_) => {
                tracing::warn!(app, agent = %host, "agent did not answer in time; trying the next")
            }
        }
    }
    Err(rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        SERVER_ERROR,
        &format!("no agent serving the MCP server {app:?} could be reached"),
    ))
}

/// 32 random bytes, hex: unguessable session ids.
fn random_session_id() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
