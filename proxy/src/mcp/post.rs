//! POST on `/mcp/{app}`: read the body under its bound, parse it once
//! strictly, open or find the session, decide every message, forward the
//! canonical form of what is allowed, and stream the answers back.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use portico_mcp::jsonrpc::{self, INVALID_REQUEST, Id, Message, SERVER_ERROR, Shape};

use super::http::{accepts, rpc_error, stream_response, with_session};
use super::rbac;
use super::session::Out;
use super::session::Session;
use super::{Who, find_session, open::open_session};
use crate::ProxyState;

/// The most messages one POST may carry.
pub const MAX_BATCH: usize = 100;

pub async fn post(
    state: Arc<ProxyState>,
    who: Who,
    app: String,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    if let Err(r) = check_headers(&headers) {
        return r;
    }
    let body = match read_body(&state, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let msgs = match Message::parse_body(&body) {
        Ok(m) if m.len() > MAX_BATCH => {
            let why = format!("invalid request: a batch may hold at most {MAX_BATCH} messages");
            state
                .audit
                .record(
                    "mcp.session.request",
                    false,
                    serde_json::json!({"user": who.name, "app": app, "error": why}),
                )
                .await;
            return rpc_error(StatusCode::BAD_REQUEST, INVALID_REQUEST, &why);
        }
        Ok(m) => m,
        Err(e) => {
            state
                .audit
                .record(
                    "mcp.session.request",
                    false,
                    serde_json::json!({"user": who.name, "app": app, "error": e.message}),
                )
                .await;
            return rpc_error(StatusCode::BAD_REQUEST, e.code, &e.message);
        }
    };
    let init = msgs
        .iter()
        .find(|m| m.is_request() && m.method() == Some("initialize"));
    let session = match init {
        Some(init) => match open_session(&state, &who, &app).await {
            Ok(s) => {
                let (name, version, proto) = jsonrpc::client_info(init);
                state.audit.record(
                    "mcp.session.start",
                    true,
                    serde_json::json!({
                        "user": who.name, "app": app, "agent": s.agent, "session": s.id,
                        "client_name": name, "client_version": version, "protocol_version": proto,
                    }),
                ).await;
                s
            }
            Err(r) => return r,
        },
        None => match find_session(&state, &headers, &who, &app) {
            Ok(s) => s,
            Err(r) => return r,
        },
    };
    session.touch();
    // Answered as plain JSON when it can be (see `stream_response`).
    let json = accepts_json(&headers);
    relay(&state, &session, msgs, json).await
}

/// Whether the client names `application/json` in Accept (a missing
/// Accept or `*/*` keeps the SSE answer every client reads).
fn accepts_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|a| a.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
}

fn check_headers(headers: &HeaderMap) -> Result<(), Response> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(rpc_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            SERVER_ERROR,
            "POST bodies must be Content-Type: application/json",
        ));
    }
    if !accepts(headers, "text/event-stream") && !accepts(headers, "application/json") {
        return Err(rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            SERVER_ERROR,
            "Accept must include application/json and text/event-stream",
        ));
    }
    Ok(())
}

async fn read_body(state: &ProxyState, body: Body) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, state.max_body);
    match tokio::time::timeout(state.body_timeout, limited.collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(rpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                SERVER_ERROR,
                &format!("the body exceeds {} bytes", state.max_body),
            ))
        }
        Ok(Err(_)) => Err(rpc_error(
            StatusCode::BAD_REQUEST,
            SERVER_ERROR,
            "cannot read the request body",
        )),
        Err(_) => Err(rpc_error(
            StatusCode::REQUEST_TIMEOUT,
            SERVER_ERROR,
            &format!(
                "the request body did not arrive within {} s",
                state.body_timeout.as_secs()
            ),
        )),
    }
}

/// The client gave up on a request it sent (`notifications/cancelled`, now
/// forwarded to the server): the proxy stops waiting for its answer, which
/// the server should not send (one that comes is dropped:
/// `Session::cancel`), audits the call as unanswered, and closes the POST
/// stream it held if nothing else is awaited there.
async fn cancelled(state: &Arc<ProxyState>, session: &Arc<Session>, m: &Message) {
    let Some(id) = m
        .params()
        .and_then(|p| p.get("requestId"))
        .and_then(|v| Id::from_value(v).ok())
    else {
        return;
    };
    let Some(pend) = session.cancel(&id) else {
        return;
    };
    rbac::unanswered(state, session, &id, &pend, "cancelled by the client").await;
    session.release_stream_if_done(pend.stream);
}

/// Stops waiting for these requests and audits each as unanswered, for
/// `why`; returns what they asked.
async fn forget_unanswered(
    state: &ProxyState,
    session: &Session,
    ids: &[Id],
    why: &str,
) -> Vec<(Id, super::session::Pending)> {
    let forgotten = session.forget(ids);
    for (id, pend) in &forgotten {
        rbac::unanswered(state, session, id, pend, why).await;
    }
    forgotten
}

/// Decides each message, forwards the allowed ones in order, and answers.
async fn relay(
    state: &Arc<ProxyState>,
    session: &Arc<Session>,
    msgs: Vec<Message>,
    json: bool,
) -> Response {
    let has_requests = msgs.iter().any(Message::is_request);
    let stream = has_requests.then(|| session.open_stream());
    // Taken now: the stream may be released as soon as the forwarded
    // requests are answered, and the proxy's own answers must still reach it.
    let stream_tx = stream
        .as_ref()
        .and_then(|(sid, _)| session.stream_sender(*sid));
    let mut answers: Vec<Bytes> = Vec::new();
    let mut forward = Vec::with_capacity(msgs.len());
    let mut waiting: Vec<Id> = Vec::new();
    for msg in msgs {
        match msg.shape() {
            Shape::Request => {
                let (Some((sid, _)), Some(id)) = (stream.as_ref(), msg.id().cloned()) else {
                    continue;
                };
                if session.is_pending(&id) {
                    answers.push(jsonrpc::error(
                        Some(&id),
                        INVALID_REQUEST,
                        &format!("invalid request: id {id} is already waiting for an answer in this session"),
                    ));
                    continue;
                }
                match rbac::check(state, session, &msg).await {
                    Ok(asked) => {
                        if session.expect(id.clone(), *sid, asked).is_err() {
                            answers.push(jsonrpc::error(
                                Some(&id),
                                INVALID_REQUEST,
                                &format!("invalid request: id {id} is already waiting for an answer in this session"),
                            ));
                            continue;
                        }
                        waiting.push(id);
                    }
                    Err(d) => {
                        answers.push(jsonrpc::error(Some(&id), d.code, &d.message));
                        continue;
                    }
                }
            }
            // A denied notification is dropped (it was audited); nothing answers it.
            Shape::Notification if rbac::check(state, session, &msg).await.is_err() => continue,
            _ => {}
        }
        forward.push(msg);
    }
    // One answer in all (the POST's one request, forwarded or refused
    // here) may go back as plain JSON.
    let json = json && answers.len() + waiting.len() == 1;
    // The proxy's own answers first: the stream is empty, so they fit.
    if let Some(tx) = &stream_tx {
        for a in answers.drain(..) {
            let _ = tx.try_send(Out::answer(a));
        }
    }
    // Requests registered but not yet sent are forgotten, and audited as
    // unanswered, if the client goes away mid-way (this future is
    // dropped) or a send fails.
    let mut unsent = Unsent {
        state,
        session,
        ids: waiting,
    };
    for m in &forward {
        if let Err(why) = session.send_to_agent(m).await {
            // Nothing will answer these now: answer them here and stop waiting.
            let failed: Vec<Bytes> =
                forget_unanswered(state, session, &std::mem::take(&mut unsent.ids), &why)
                    .await
                    .into_iter()
                    .map(|(id, _)| jsonrpc::error(Some(&id), SERVER_ERROR, &why))
                    .collect();
            if stream.is_none() {
                return rpc_error(StatusCode::NOT_FOUND, SERVER_ERROR, &why);
            }
            if let Some(tx) = &stream_tx {
                for a in failed {
                    let _ = tx.try_send(Out::answer(a));
                }
            }
            break;
        }
        if let Some(id) = m.id().filter(|_| m.is_request()) {
            unsent.ids.retain(|w| w != id);
        }
        if m.method() == Some("notifications/cancelled") {
            cancelled(state, session, m).await;
        }
    }
    let Some((sid, rx)) = stream else {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        return with_session(r, &session.id);
    };
    drop(stream_tx);
    session.release_stream_if_done(sid);
    session.offer(sid);
    stream_response(rx, session, sid, json).await
}

/// Requests registered as pending but not yet sent to the agent.
struct Unsent<'a> {
    state: &'a Arc<ProxyState>,
    session: &'a Arc<Session>,
    ids: Vec<Id>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let forgotten = self.session.forget(&self.ids);
        if forgotten.is_empty() {
            return;
        }
        // Dropped with the POST: the audit, which may wait for room in its
        // queue, goes on in a task of its own (none when the runtime is
        // already gone: the process is ending).
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, session) = (self.state.clone(), self.session.clone());
        rt.spawn(async move {
            for (id, pend) in forgotten {
                let why = "the client went away before the request was forwarded";
                rbac::unanswered(&state, &session, &id, &pend, why).await;
            }
        });
    }
}
