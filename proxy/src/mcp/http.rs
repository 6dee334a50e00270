//! The HTTP side of the MCP endpoint: error bodies, the checks every
//! request passes (Origin, Accept), and SSE responses.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use portico_mcp::jsonrpc;
use tokio::sync::mpsc;

use super::session::{Out, ReplayRef, Session};
use crate::ProxyState;

pub const SESSION_HEADER: &str = "mcp-session-id";

/// An HTTP error whose body is a JSON-RPC error with a null id.
pub fn rpc_error(status: StatusCode, code: i64, message: &str) -> Response {
    let mut r = Response::new(Body::from(jsonrpc::error(None, code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portico\""),
        );
    }
    r
}

/// A browser's Origin must be the proxy itself, loopback to loopback, or configured.
pub fn origin_allowed(state: &ProxyState, headers: &HeaderMap, uri: &http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if state
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o == origin)
    {
        return true;
    }
    let origin_host = origin
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    // HTTP/1.1 names the host in a header, HTTP/2 in the request's authority.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let bare = |h: &str| {
        h.rsplit_once(':')
            .map(|(a, _)| a.to_string())
            .unwrap_or_else(|| h.to_string())
    };
    origin_host == host || (is_loopback(&bare(origin_host)) && is_loopback(&bare(host)))
}

fn is_loopback(h: &str) -> bool {
    h == "localhost" || h == "[::1]" || h.starts_with("127.")
}

pub fn accepts(headers: &HeaderMap, what: &str) -> bool {
    let Some(a) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    a.split(',')
        .map(|p| p.split(';').next().unwrap_or("").trim())
        .any(|m| m == what || m == "*/*")
}

pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

pub fn with_session(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

/// What feeds one SSE response. Each message is kept in the stream's
/// replay as it is written; when the client goes away, what was still
/// queued is kept there too, for a client that resumes.
struct Feed {
    /// Taken from the stream before the response started, sent first.
    first: std::collections::VecDeque<Bytes>,
    rx: mpsc::Receiver<Out>,
    /// The stream's replay: a GET stream's is made with it; a POST
    /// stream's is asked of the session when it is first needed, so that
    /// a POST answered as plain JSON makes none.
    replay: Option<ReplayRef>,
    session: Arc<Session>,
    stream: u64,
}

impl Feed {
    async fn next(&mut self) -> Option<Bytes> {
        match self.first.pop_front() {
            Some(m) => Some(m),
            None => self.rx.recv().await.map(|o| o.msg),
        }
    }

    fn replay(&mut self) -> &ReplayRef {
        let (session, stream) = (&self.session, self.stream);
        self.replay.get_or_insert_with(|| session.replay(stream))
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.rx.close();
        let mut left: Vec<Bytes> = self.first.drain(..).collect();
        while let Ok(o) = self.rx.try_recv() {
            left.push(o.msg);
        }
        if left.is_empty() {
            return;
        }
        let mut r = self.replay().lock().unwrap_or_else(|p| p.into_inner());
        for m in left {
            r.record(m);
        }
    }
}

/// How long a POST waits for the first message of its stream before the
/// response starts without it (and its keep-alives then hold the
/// connection): a fast call's response goes out whole, head and answer in
/// one write, and a slow one's head is seen soon.
const FIRST_WAIT: Duration = Duration::from_secs(2);

/// The response to a POST stream. The proxy waits, at most `FIRST_WAIT`,
/// for the stream's first message, so that the response's head and that
/// message leave together rather than in two writes. With `json` (the
/// client accepts `application/json` and the POST carries one request),
/// when that message is the request's answer and the stream ends with it,
/// the answer goes back alone, as `application/json`. Anything else (an
/// SSE-only client, a server message first, nothing within `FIRST_WAIT`)
/// is the SSE stream, which carries what was taken and everything after
/// it.
pub async fn stream_response(
    rx: mpsc::Receiver<Out>,
    session: &Arc<Session>,
    stream: u64,
    json: bool,
) -> Response {
    let mut feed = Feed {
        first: Default::default(),
        rx,
        replay: None,
        session: session.clone(),
        stream,
    };
    let deadline = tokio::time::Instant::now() + FIRST_WAIT;
    let Ok(Some(first)) = tokio::time::timeout_at(deadline, feed.rx.recv()).await else {
        return sse_from(feed);
    };
    let (answer, last) = (first.answer, first.last);
    feed.first.push_back(first.msg);
    if json && answer {
        // The stream ends with its answer; a server message that raced
        // onto it keeps it a stream. After `close`, any later one goes
        // where server messages go.
        let ended = if last {
            feed.rx.close();
            match feed.rx.try_recv() {
                Ok(next) => {
                    feed.first.push_back(next.msg);
                    false
                }
                Err(_) => true,
            }
        } else {
            match tokio::time::timeout_at(deadline, feed.rx.recv()).await {
                Ok(None) => true,
                Ok(Some(next)) => {
                    feed.first.push_back(next.msg);
                    false
                }
                Err(_) => false,
            }
        };
        if ended {
            let msg = feed.first.pop_front().unwrap_or_default();
            return json_response(msg, &session.id);
        }
    }
    sse_from(feed)
}

fn json_response(msg: Bytes, session: &str) -> Response {
    let mut r = Response::new(Body::from(msg));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_session(r, session)
}

/// An SSE response streaming one `message` event per JSON-RPC message, with
/// ids unique in the session (`<stream>:<event>`, which `Last-Event-ID`
/// resumes from) and keep-alive comments.
pub fn sse_response(
    rx: mpsc::Receiver<Out>,
    session: &Arc<Session>,
    stream: u64,
    replay: ReplayRef,
) -> Response {
    let feed = Feed {
        first: Default::default(),
        rx,
        replay: Some(replay),
        session: session.clone(),
        stream,
    };
    sse_from(feed)
}

fn sse_from(feed: Feed) -> Response {
    let (session, stream) = (feed.session.id.clone(), feed.stream);
    let events = futures_util::stream::unfold(feed, move |mut feed| async move {
        let m = feed.next().await?;
        let seq = feed
            .replay()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(m.clone());
        // Messages are canonical JSON: UTF-8, on one line.
        let data = String::from_utf8_lossy(&m);
        let ev = Event::default()
            .id(format!("{stream}:{seq}"))
            .event("message")
            .data(data);
        Some((Ok::<_, Infallible>(ev), feed))
    });
    let sse = Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    );
    let mut r = sse.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_session(r, &session)
}
