//! One MCP session on the agent: take one of the agent's `max_sessions`
//! slots, spawn the app's process within the agent's bounds (`spawn::Policy`),
//! relay newline-delimited JSON-RPC both ways with bounded buffers, and end
//! it cleanly (SIGINT, then SIGKILL after a grace period, always reaped).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Frame;
use portico_core::resource::Transport;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::AgentState;
use crate::spawn::{self, SIGINT, SIGKILL};
use portico_mcp::LineReader;
use portico_tunnel::{H_APP, H_SESSION, H_USER, T_END, TunnelBody, direct};

/// What a session sends up its tunnel stream: lines, then why it ended.
/// Kept small (a `Bytes`, or a pointer): the queue holds the pieces waiting.
enum Piece {
    Line(Bytes),
    End(Box<http::HeaderMap>),
}

impl portico_tunnel::queue::IntoFrame for Piece {
    fn into_frame(self) -> Frame<Bytes> {
        match self {
            Piece::Line(b) => Frame::data(b),
            Piece::End(t) => Frame::trailers(*t),
        }
    }
}

type PieceTx = portico_tunnel::queue::Tx<Piece>;

/// A session's response body (its pieces as HTTP/2 data and trailers) and
/// the queue that feeds it.
fn piece_queue() -> (PieceTx, TunnelBody) {
    let (tx, body) = portico_tunnel::queue::channel(64);
    (tx, body.boxed())
}

/// The trailers that end a session's stream, naming why.
fn end_piece(reason: &str) -> Piece {
    let mut trailers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&sanitize(reason)) {
        trailers.insert(T_END, v);
    }
    Piece::End(Box::new(trailers))
}

fn text_response(status: u16, msg: &str) -> hyper::Response<TunnelBody> {
    let body = http_body_util::Full::new(Bytes::from(msg.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    resp
}

fn header<'a>(req: &'a hyper::Request<TunnelBody>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Handles one request arriving over a tunnel.
pub async fn handle(
    state: Arc<AgentState>,
    req: hyper::Request<TunnelBody>,
) -> hyper::Response<TunnelBody> {
    if req.uri().path() != "/v1/session" || req.method() != hyper::Method::POST {
        return text_response(404, "unknown tunnel request");
    }
    let app_name = header(&req, H_APP).to_string();
    let session = header(&req, H_SESSION).chars().take(64).collect::<String>();
    let user = header(&req, H_USER).chars().take(64).collect::<String>();
    let Some((app, end)) = state.registry.get(&app_name) else {
        return text_response(
            404,
            &format!("the MCP server {app_name:?} is not served by this agent"),
        );
    };
    let spec = match app.spec.transport() {
        Ok(Transport::Stdio) => match &app.spec.mcp {
            Some(m) => m.clone(),
            None => return text_response(502, "the app has no mcp.command"),
        },
        Ok(t @ (Transport::Http(_) | Transport::Sse(_))) => {
            // The newer Streamable HTTP, or the older HTTP+SSE transport.
            let (url, legacy) = match t {
                Transport::Sse(u) => (u, true),
                Transport::Http(u) => (u, false),
                Transport::Stdio => return text_response(502, "the app is not an upstream"),
            };
            let connector = if url.starts_with("https://") {
                match &state.upstream_tls {
                    Ok(c) => c.clone(),
                    Err(e) => {
                        return text_response(
                            502,
                            &format!(
                                "the MCP server {app_name:?} is an https upstream, and this agent cannot verify one: {e}"
                            ),
                        );
                    }
                }
            } else {
                portico_tls::Connector::plain()
            };
            let headers = match spawn::resolve_headers(
                &app.spec.headers,
                &state.policy,
                &app.metadata.labels,
                &user,
            ) {
                Ok(h) => h,
                Err(e) => {
                    let status = if e.is_refusal() { 403 } else { 502 };
                    tracing::warn!(app = %app_name, session = %session, user = %user, status, error = %e, "cannot open the upstream session");
                    return text_response(
                        status,
                        &format!("cannot open the MCP server {app_name:?}: {e}"),
                    );
                }
            };
            // With identity: jwt, a token naming the user, from the cluster.
            let jwt = if app.spec.identity == Some(portico_core::AppIdentity::Jwt) {
                match issue_jwt(&state, &app_name, &user).await {
                    Ok((token, expires_ms)) => {
                        Some((Arc::new(std::sync::RwLock::new(token)), expires_ms))
                    }
                    Err(e) => {
                        tracing::warn!(app = %app_name, session = %session, user = %user, error = %e, "cannot get the app's JWT");
                        return text_response(
                            502,
                            &format!(
                                "cannot open the MCP server {app_name:?}: no identity token for {user:?}: {e}"
                            ),
                        );
                    }
                }
            } else {
                None
            };
            let Some(permit) = take_slot(&state, &app_name, &session) else {
                return full(&state);
            };
            let upstream = Upstream {
                url,
                legacy,
                connector,
                headers: portico_mcp::bridge::Headers {
                    fixed: headers,
                    bearer: jwt.as_ref().map(|(cell, _)| cell.clone()),
                },
                jwt: jwt.map(|(cell, expires_ms)| Jwt {
                    cell,
                    expires_ms,
                    user: user.clone(),
                }),
            };
            return upstream_session(state, req, upstream, end, app_name, session, permit);
        }
        Err(e) => return text_response(502, &e.to_string()),
    };
    let Some(permit) = take_slot(&state, &app_name, &session) else {
        return full(&state);
    };
    // Its own cgroup, where the agent has them: a session that cannot be
    // contained as the agent's others are is not started.
    let cgroup = match state.cgroups.as_ref().map(crate::cgroup::Cgroups::session) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            tracing::warn!(app = %app_name, session = %session, error = %e, "cannot create the session's cgroup");
            return text_response(
                502,
                &format!("cannot start the MCP server {app_name:?}: {e}"),
            );
        }
    };
    let spawned = spawn::spawn(
        &spec,
        &state.policy,
        &app.metadata.labels,
        cgroup.as_ref().map(|c| c.procs_file().as_c_str()),
    );
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let Some(c) = cgroup {
                c.end().await;
            }
            let status = if e.is_refusal() { 403 } else { 502 };
            tracing::warn!(app = %app_name, session = %session, user = %user, status, error = %e, "cannot start MCP server");
            return text_response(
                status,
                &format!("cannot start the MCP server {app_name:?}: {e}"),
            );
        }
    };
    let pgid = child.id().unwrap_or(0);
    state.reaper.watch(pgid);
    tracing::info!(app = %app_name, session = %session, user = %user, pid = pgid, "mcp session started");
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    state.metrics.live.fetch_add(1, Ordering::Relaxed);
    let (tx, body) = piece_queue();
    let st = state.clone();
    // A proxy in this process takes the server's lines itself, and is
    // given its input to write to (`portico_tunnel::direct`).
    let output = req.extensions().get::<direct::OutputRef>().cloned();
    let input = child
        .stdin
        .take()
        .map(|w| direct::Input::new(w, state.max_message));
    let direct_input = input.clone().filter(|_| output.is_some());
    tokio::spawn(async move {
        let reason = relay(
            &st,
            &mut child,
            input,
            output,
            req.into_body(),
            tx.clone(),
            end,
            &app_name,
            &session,
        )
        .await;
        let status = terminate(&mut child, pgid, st.grace).await;
        // What left the process group (`setsid`) is still in the cgroup.
        if let Some(c) = cgroup {
            c.end().await;
        }
        st.reaper.forget(pgid);
        let reason = match reason {
            End::ProcessExited(last) => {
                let mut r = format!("the MCP server process exited ({status})");
                if !last.is_empty() {
                    r.push_str(": ");
                    r.push_str(&last);
                }
                r
            }
            End::Other(r) => r,
        };
        tracing::info!(app = %app_name, session = %session, reason = %reason, "mcp session ended");
        let _ = tx.send(end_piece(&reason)).await;
        st.metrics.live.fetch_sub(1, Ordering::Relaxed);
        // The slot is free only once the process has been reaped.
        drop(permit);
    });
    let mut resp = hyper::Response::new(body);
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(input) = direct_input {
        resp.extensions_mut().insert(input);
    }
    resp
}

/// One of the agent's `max_sessions` slots, taken before anything starts so
/// that parallel sessions cannot pass the cap; it lives as long as the session.
fn take_slot(state: &AgentState, app: &str, session: &str) -> Option<OwnedSemaphorePermit> {
    match state.slots.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => {
            tracing::warn!(app = %app, session = %session, max_sessions = state.max_sessions, "session refused: the agent runs as many MCP sessions as it may");
            None
        }
    }
}

fn full(state: &AgentState) -> hyper::Response<TunnelBody> {
    text_response(
        503,
        &format!(
            "the agent {:?} is running {} MCP sessions, the most its app_service.max_sessions allows; try again when one has ended",
            state.host_id, state.max_sessions
        ),
    )
}

enum End {
    /// stdout closed; carries the last stderr line.
    ProcessExited(String),
    Other(String),
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    state: &AgentState,
    child: &mut Child,
    stdin: Option<direct::Input>,
    output: Option<direct::OutputRef>,
    body: TunnelBody,
    tx: PieceTx,
    mut end: tokio::sync::watch::Receiver<Option<String>>,
    app: &str,
    session: &str,
) -> End {
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (stdin, child.stdout.take(), child.stderr.take())
    else {
        return End::Other("the MCP server's standard streams are not available".into());
    };
    let result = relay_streams(
        state, &stdin, stdout, stderr, output, body, tx, &mut end, app, session,
    )
    .await;
    // Whatever still holds the input (a proxy's handler) writes no more.
    stdin.try_close();
    result
}

#[allow(clippy::too_many_arguments)]
async fn relay_streams(
    state: &AgentState,
    stdin: &direct::Input,
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    output: Option<direct::OutputRef>,
    body: TunnelBody,
    tx: PieceTx,
    end: &mut tokio::sync::watch::Receiver<Option<String>>,
    app: &str,
    session: &str,
) -> End {
    let last_err = Arc::new(std::sync::Mutex::new(String::new()));
    let stderr_task = tokio::spawn(log_stderr(
        stderr,
        app.to_string(),
        session.to_string(),
        last_err.clone(),
    ));
    // Both directions are polled by this one task: fewer wake-ups per message.
    let stdin_fut = pump_in(body, stdin);
    let stdout_fut = pump_out(stdout, tx.clone(), output, state.max_message);
    tokio::pin!(stdin_fut, stdout_fut);
    let mut stderr_task = stderr_task;
    let exited = async |stderr_task: &mut tokio::task::JoinHandle<()>| {
        // Give stderr a moment to drain the reason the process died.
        let _ = tokio::time::timeout(Duration::from_millis(200), stderr_task).await;
        End::ProcessExited(last_err.lock().map(|s| s.clone()).unwrap_or_default())
    };
    let mut input_closed = None;
    let result = tokio::select! {
        r = &mut stdout_fut => match r {
            Ok(()) => None,
            Err(e) => Some(End::Other(e)),
        },
        r = &mut stdin_fut => match r {
            Ok(()) => Some(End::Other("the session was closed by the client".into())),
            Err(e) => {
                input_closed = Some(e);
                None
            }
        },
        r = async { end.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone()) } => {
            Some(End::Other(r.unwrap_or_else(|| "the MCP server was unregistered".into())))
        }
        _ = tx.closed() => Some(End::Other("the proxy closed the session".into())),
    };
    if let Some(r) = result {
        return r;
    }
    if let Some(e) = input_closed {
        // A server that closes its input is usually exiting: its output
        // ends next, and its exit says more than the closed pipe.
        return match tokio::time::timeout(Duration::from_secs(1), &mut stdout_fut).await {
            Ok(Ok(())) => exited(&mut stderr_task).await,
            _ => End::Other(e),
        };
    }
    exited(&mut stderr_task).await
}

/// Client → server: request body frames to the process's stdin, byte for
/// byte, and its end as the input's end. (A proxy in this process writes
/// to the input itself; its body then carries only the end.)
async fn pump_in(mut body: TunnelBody, stdin: &direct::Input) -> Result<(), String> {
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            // A write of the proxy's failed.
            () = stdin.failed() => return Err("the MCP server closed its input".into()),
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| format!("the tunnel stream failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            stdin.write(data).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => e.to_string(),
                _ => "the MCP server closed its input".to_string(),
            })?;
        }
    }
    stdin.close().await;
    Ok(())
}

/// Server → client: stdout split into lines of at most `max` bytes, one
/// frame per line, or each line handed to the proxy in this process.
async fn pump_out<R: AsyncRead + Unpin>(
    stdout: R,
    tx: PieceTx,
    output: Option<direct::OutputRef>,
    max: usize,
) -> Result<(), String> {
    let mut lines = LineReader::new(stdout, max);
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(format!(
                    "the MCP server sent a message larger than {max} bytes; the session was ended"
                ));
            }
            Err(e) => return Err(format!("reading the MCP server failed: {e}")),
        };
        if let Some(out) = &output {
            out.0.line(line).await?;
            continue;
        }
        let mut framed = BytesMut::with_capacity(line.len() + 1);
        framed.extend_from_slice(&line);
        framed.extend_from_slice(b"\n");
        if tx.send(Piece::Line(framed.freeze())).await.is_err() {
            return Err("the proxy closed the session".into());
        }
    }
}

/// Logs stderr lines tagged with app and session, each cut to 4 KiB.
async fn log_stderr<R: AsyncRead + Unpin>(
    stderr: R,
    app: String,
    session: String,
    last: Arc<std::sync::Mutex<String>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut r = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(4096);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            // Skip the rest of an overlong line.
            let mut sink = Vec::new();
            let _ = (&mut r)
                .take(16 * 1024 * 1024)
                .read_until(b'\n', &mut sink)
                .await;
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            continue;
        }
        tracing::info!(target: "mcp_stderr", app = %app, session = %session, "{text}");
        if let Ok(mut l) = last.lock() {
            *l = text.chars().take(300).collect();
        }
    }
}

/// SIGINT to the process group, SIGKILL after `grace`, and always reap.
async fn terminate(child: &mut Child, pgid: u32, grace: Duration) -> String {
    if let Ok(Some(status)) = child.try_wait() {
        spawn::signal_group(pgid, SIGKILL);
        return describe(status);
    }
    spawn::signal_group(pgid, SIGINT);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(s)) => s,
        _ => {
            spawn::signal_group(pgid, SIGKILL);
            let _ = child.start_kill();
            match child.wait().await {
                Ok(s) => s,
                Err(e) => return format!("wait failed: {e}"),
            }
        }
    };
    // Anything the server left behind in its group goes too.
    spawn::signal_group(pgid, SIGKILL);
    describe(status)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// An upstream server and how to reach it.
struct Upstream {
    url: String,
    /// The older HTTP+SSE transport (`mcp+sse+...`).
    legacy: bool,
    connector: portico_tls::Connector,
    headers: portico_mcp::bridge::Headers,
    jwt: Option<Jwt>,
}

/// The JWT a session sends its upstream, renewed while the session lives.
struct Jwt {
    cell: Arc<std::sync::RwLock<String>>,
    expires_ms: i64,
    user: String,
}

async fn issue_jwt(state: &AgentState, app: &str, user: &str) -> Result<(String, i64), String> {
    let req = portico_proto::v1::IssueAppJwtRequest {
        app: app.to_string(),
        user: user.to_string(),
    };
    let mut api = state.api.clone();
    tokio::time::timeout(Duration::from_secs(5), api.issue_app_jwt(req))
        .await
        .map_err(|_| "the auth service did not answer within 5 s".to_string())?
        .map(|r| {
            let r = r.into_inner();
            (r.token, r.expires_ms)
        })
        .map_err(|s| s.message().to_string())
}

/// Renews a session's JWT at two thirds of its life, for as long as the
/// session lives (this future never ends; the session drops it). A failed
/// renewal is retried every 10 s while the current token lasts.
async fn renew_jwt(state: Arc<AgentState>, app: String, jwt: Option<Jwt>) {
    let Some(mut jwt) = jwt else {
        return std::future::pending().await;
    };
    loop {
        let left = (jwt.expires_ms - portico_core::time::now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis((left * 2 / 3).max(1_000))).await;
        loop {
            match issue_jwt(&state, &app, &jwt.user).await {
                Ok((token, expires_ms)) => {
                    *jwt.cell.write().unwrap_or_else(|p| p.into_inner()) = token;
                    jwt.expires_ms = expires_ms;
                    break;
                }
                Err(e) => {
                    tracing::warn!(app = %app, user = %jwt.user, error = %e, "cannot renew the app's JWT; retrying in 10 s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }
}

fn upstream_session(
    state: Arc<AgentState>,
    req: hyper::Request<TunnelBody>,
    upstream: Upstream,
    mut end: tokio::sync::watch::Receiver<Option<String>>,
    app: String,
    session: String,
    permit: OwnedSemaphorePermit,
) -> hyper::Response<TunnelBody> {
    let Upstream {
        url,
        legacy,
        connector,
        headers,
        jwt,
    } = upstream;
    let renewal = renew_jwt(state.clone(), app.clone(), jwt);
    tracing::info!(app = %app, session = %session, upstream = %url, "mcp session started");
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    state.metrics.live.fetch_add(1, Ordering::Relaxed);
    let (tx, body) = piece_queue();
    let (out, mut lines) = mpsc::channel::<Bytes>(64);
    let frames = tx.clone();
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            let mut b = BytesMut::with_capacity(line.len() + 1);
            b.extend_from_slice(&line);
            b.extend_from_slice(b"\n");
            if frames.send(Piece::Line(b.freeze())).await.is_err() {
                return;
            }
        }
    });
    let max = state.max_message;
    tokio::spawn(async move {
        let reason = tokio::select! {
            r = async {
                if legacy {
                    crate::legacy_sse::relay(&url, connector, headers, req.into_body(), out, max).await
                } else {
                    crate::upstream::relay(&url, connector, headers, req.into_body(), out, max).await
                }
            } => r,
            r = async { end.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone()) } => {
                r.unwrap_or_else(|| "the MCP server was unregistered".into())
            }
            () = renewal => "the app's identity token could not be renewed".into(),
        };
        tracing::info!(app = %app, session = %session, reason = %reason, "mcp session ended");
        let _ = tx.send(end_piece(&reason)).await;
        state.metrics.live.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
    });
    hyper::Response::new(body)
}
