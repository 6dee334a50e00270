//! A bridge from newline-delimited JSON-RPC to a Streamable HTTP MCP
//! endpoint: `psh mcp connect` uses it towards the proxy, agents towards
//! upstream `mcp+http://` servers. Answers (JSON bodies, SSE streams, the GET
//! stream) come back as one message each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::jsonrpc::{self, Id, Message, SERVER_ERROR};
use crate::sse::SseReader;

/// How long to wait before resuming a stream when the server did not say
/// (`retry:`), and the longest wait a server may ask for.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Times one request's stream is resumed before the request fails.
const MAX_RESUMES: u32 = 8;

type HttpClient = Client<portico_tls::Connector, Full<Bytes>>;

/// The id of a replayed initialize, whose answer the client never sees.
fn reinit_id() -> Id {
    Id::Str("portico-bridge-reinit".into())
}

/// Headers sent with every request: fixed ones (an app's `spec.headers`,
/// resolved) and a bearer token that may be replaced while the bridge runs
/// (an app JWT, renewed before it expires).
#[derive(Clone, Default)]
pub struct Headers {
    pub fixed: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    pub bearer: Option<Arc<std::sync::RwLock<String>>>,
}

impl Headers {
    pub fn apply(&self, mut b: hyper::http::request::Builder) -> hyper::http::request::Builder {
        for (k, v) in &self.fixed {
            b = b.header(k, v);
        }
        if let Some(t) = &self.bearer {
            let t = t.read().unwrap_or_else(|p| p.into_inner()).clone();
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b
    }
}

/// Where a bridge goes and how it behaves.
pub struct BridgeConfig {
    /// The Streamable HTTP endpoint.
    pub url: String,
    /// Sent as `Authorization: Bearer` when set.
    pub token: Option<String>,
    /// Largest message relayed, in bytes.
    pub max: usize,
    /// Open a fresh session (replaying the client's initialize) when the
    /// server loses this one; otherwise the loss ends the bridge.
    pub replay: bool,
    /// Who is at the other end, for messages: "the proxy", say.
    pub peer: &'static str,
    /// Where notices for people go.
    pub notice: Arc<dyn Fn(&str) + Send + Sync>,
    /// How connections are made: plain, or TLS with the trust chosen.
    pub connector: portico_tls::Connector,
    /// Sent with every request (an app's `spec.headers`, resolved, and its
    /// JWT).
    pub headers: Headers,
}

/// Relays newline-delimited JSON-RPC messages to a Streamable HTTP MCP
/// endpoint and its answers (JSON, SSE, the GET stream) back to `out`.
pub struct Bridge {
    http: HttpClient,
    cfg: BridgeConfig,
    out: mpsc::Sender<Bytes>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    session: Option<String>,
    /// The client's initialize request, replayed to open a fresh session.
    init: Option<Vec<u8>>,
    initialized_sent: bool,
    get_task: Option<tokio::task::JoinHandle<()>>,
    /// Responses still streaming; stdin closing waits for them.
    inflight: Vec<tokio::task::JoinHandle<()>>,
}

enum Sent {
    Ok(hyper::Response<Incoming>),
    Gone,
    Unreachable(String),
}

/// The innermost cause of an error, which is the one people understand.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Bridge {
    fn session(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .session
            .clone()
    }

    async fn send(
        &self,
        method: hyper::Method,
        body: Option<&[u8]>,
        session: Option<&str>,
    ) -> Sent {
        self.send_from(method, body, session, None).await
    }

    /// `send`, resuming a stream after the event `last_event_id`.
    async fn send_from(
        &self,
        method: hyper::Method,
        body: Option<&[u8]>,
        session: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Sent {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(&self.cfg.url)
            .header("accept", "application/json, text/event-stream");
        b = self.cfg.headers.apply(b);
        if let Some(t) = &self.cfg.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        if let Some(s) = session {
            b = b.header("mcp-session-id", s);
        }
        if let Some(l) = last_event_id {
            b = b.header("last-event-id", l);
        }
        let Ok(req) = b.body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default()))) else {
            return Sent::Unreachable("cannot build the request".into());
        };
        match tokio::time::timeout(Duration::from_secs(60), self.http.request(req)).await {
            Err(_) => Sent::Unreachable(format!("{} did not answer in 60 s", self.cfg.peer)),
            Ok(Err(e)) => Sent::Unreachable(source_text(&e)),
            Ok(Ok(r)) if r.status() == hyper::StatusCode::NOT_FOUND && session.is_some() => {
                Sent::Gone
            }
            Ok(Ok(r)) => Sent::Ok(r),
        }
    }

    /// Streams a response to stdout: SSE events, a JSON body, or an error for `id`.
    async fn deliver(
        self: &Arc<Self>,
        resp: hyper::Response<Incoming>,
        id: Option<Id>,
        skip: Option<&Id>,
    ) {
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status == hyper::StatusCode::ACCEPTED {
            return;
        }
        if status.is_success() && ctype.starts_with("text/event-stream") {
            self.stream(resp.into_body(), id, skip).await;
            return;
        }
        let body = http_body_util::Limited::new(resp.into_body(), self.cfg.max)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() && !body.is_empty() {
            for m in self.messages(&body, skip) {
                if self.out.send(m).await.is_err() {
                    return;
                }
            }
            return;
        }
        let msg = Message::parse(&body)
            .ok()
            .and_then(|m| m.error_message())
            .unwrap_or_else(|| format!("{} answered HTTP {}", self.cfg.peer, status.as_u16()));
        self.fail(&id, &msg).await;
    }

    /// Relays a POST's SSE stream. A stream that ends before the answer to
    /// `id` is resumed as the Streamable HTTP specification describes: after
    /// the server's `retry:` time, a GET with `Last-Event-ID` continues it
    /// (the 2025-11-25 "polling" pattern). Without an event id to resume
    /// from, or when resuming fails, the request is answered with an error
    /// at once: no request waits for an answer that cannot come.
    async fn stream(self: &Arc<Self>, body: Incoming, id: Option<Id>, skip: Option<&Id>) {
        let mut reader = SseReader::new(body, self.cfg.max);
        let mut resumed = 0u32;
        let mut last: Option<String> = None;
        let mut retry = DEFAULT_RETRY;
        loop {
            let mut answered = false;
            let broke = loop {
                match reader.next().await {
                    Ok(Some(data)) => {
                        for m in self.messages(&data, skip) {
                            if let Some(want) = &id
                                && Message::parse(&m)
                                    .is_ok_and(|p| p.is_response() && p.id() == Some(want))
                            {
                                answered = true;
                            }
                            if self.out.send(m).await.is_err() {
                                return;
                            }
                        }
                        // A resumed stream is a GET stream, which may stay
                        // open: it served its purpose.
                        if answered && resumed > 0 {
                            break None;
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if let Some(l) = reader.last_id() {
                last = Some(l.to_string());
            }
            if let Some(ms) = reader.retry() {
                retry = Duration::from_millis(ms).min(MAX_RETRY);
            }
            if answered || id.is_none() {
                if let Some(e) = broke {
                    (self.cfg.notice)(&format!("the stream from {} broke: {e}", self.cfg.peer));
                }
                return;
            }
            let why = match &broke {
                Some(e) => format!(
                    "the stream from {} broke before the answer ({e})",
                    self.cfg.peer
                ),
                None => format!("{} ended the stream before the answer", self.cfg.peer),
            };
            let Some(from) = last.clone() else {
                self.fail(&id, &format!("{why}, and gave no event id to resume from"))
                    .await;
                return;
            };
            if resumed >= MAX_RESUMES {
                self.fail(&id, &format!("{why}, {MAX_RESUMES} times; giving up"))
                    .await;
                return;
            }
            resumed += 1;
            tokio::time::sleep(retry).await;
            let session = self.session();
            match self
                .send_from(hyper::Method::GET, None, session.as_deref(), Some(&from))
                .await
            {
                Sent::Ok(r)
                    if r.status().is_success()
                        && r.headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("text/event-stream")) =>
                {
                    reader = SseReader::new(r.into_body(), self.cfg.max);
                }
                Sent::Ok(r) => {
                    self.fail(
                        &id,
                        &format!(
                            "{why}, and refused to resume it (HTTP {})",
                            r.status().as_u16()
                        ),
                    )
                    .await;
                    return;
                }
                Sent::Gone => {
                    self.fail(&id, &format!("{why}, and the session ended"))
                        .await;
                    return;
                }
                Sent::Unreachable(e) => {
                    self.fail(
                        &id,
                        &format!("{why}, and cannot be reached to resume it: {e}"),
                    )
                    .await;
                    return;
                }
            }
        }
    }

    /// The messages of one JSON body or SSE event, each on one line in
    /// canonical form (a pretty-printed answer or a batch would otherwise be
    /// split at its newlines); `skip` drops the answer to that id. What does
    /// not parse is reported and dropped.
    fn messages(&self, data: &[u8], skip: Option<&Id>) -> Vec<Bytes> {
        match Message::parse_body(data) {
            Ok(msgs) => msgs
                .into_iter()
                .filter(|m| skip.is_none() || !(m.is_response() && m.id() == skip))
                .map(|m| m.to_bytes())
                .collect(),
            Err(e) => {
                (self.cfg.notice)(&format!(
                    "{} sent a message that is not valid JSON-RPC ({e}); dropped",
                    self.cfg.peer
                ));
                Vec::new()
            }
        }
    }

    fn set_session(self: &Arc<Self>, resp: &hyper::Response<Incoming>) {
        let sid = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = st.get_task.take() {
            t.abort();
        }
        st.session = sid.clone();
        if let Some(sid) = sid {
            let me = self.clone();
            st.get_task = Some(tokio::spawn(async move { me.listen(sid).await }));
        }
    }

    /// Keeps the GET stream for server-initiated messages open while the
    /// session lives; a stream that ends is reopened after the server's
    /// `retry:` time (or a backoff), from its last event id.
    async fn listen(self: Arc<Self>, sid: String) {
        let mut attempt = 0u32;
        let mut last: Option<String> = None;
        let mut retry: Option<Duration> = None;
        loop {
            match self
                .send_from(hyper::Method::GET, None, Some(&sid), last.as_deref())
                .await
            {
                Sent::Ok(r) if r.status().is_success() => {
                    attempt = 0;
                    let mut reader = SseReader::new(r.into_body(), self.cfg.max);
                    while let Ok(Some(data)) = reader.next().await {
                        for m in self.messages(&data, None) {
                            if self.out.send(m).await.is_err() {
                                return;
                            }
                        }
                    }
                    if let Some(l) = reader.last_id() {
                        last = Some(l.to_string());
                    }
                    if let Some(ms) = reader.retry() {
                        retry = Some(Duration::from_millis(ms).min(MAX_RETRY));
                    }
                }
                Sent::Ok(r) if r.status() == hyper::StatusCode::METHOD_NOT_ALLOWED => return,
                Sent::Gone => return,
                _ => {}
            }
            if self.session().as_deref() != Some(sid.as_str()) {
                return;
            }
            attempt = (attempt + 1).min(6);
            let wait = retry.unwrap_or(Duration::from_millis(100 << attempt));
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    }

    /// Opens a fresh session by replaying the client's initialize (its answer is swallowed).
    async fn reinitialize(self: &Arc<Self>) -> Result<(), String> {
        let (init, initialized) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.init.clone(), st.initialized_sent)
        };
        let Some(init) = init else {
            return Err("the session ended before it was initialized".into());
        };
        let line = Message::parse(&init)
            .map_err(|e| e.to_string())?
            .with_id(reinit_id())
            .to_bytes();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut attempt = 0u32;
        loop {
            match self.send(hyper::Method::POST, Some(&line), None).await {
                Sent::Ok(r) if r.status().is_success() => {
                    self.set_session(&r);
                    self.deliver(r, None, Some(&reinit_id())).await;
                    break;
                }
                Sent::Ok(r) if r.status().is_client_error() => {
                    return Err(format!(
                        "{} refused a new session (HTTP {})",
                        self.cfg.peer,
                        r.status().as_u16()
                    ));
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(format!("{} did not come back within 60 s", self.cfg.peer));
                }
                _ => {
                    attempt = (attempt + 1).min(5);
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if initialized {
            let note = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
            if let Sent::Ok(r) = self
                .send(hyper::Method::POST, Some(note), self.session().as_deref())
                .await
            {
                self.deliver(r, None, None).await;
            }
        }
        (self.cfg.notice)(&format!(
            "{} lost the session; continuing in a new one",
            self.cfg.peer
        ));
        Ok(())
    }

    /// Sends one message; an error means the session is gone for good.
    pub async fn handle(self: &Arc<Self>, line: Vec<u8>) -> Result<(), String> {
        let msg = match Message::parse(&line) {
            Ok(m) => m,
            Err(e) => {
                let _ = self
                    .out
                    .send(jsonrpc::error(e.id.as_ref(), e.code, &e.message))
                    .await;
                return Ok(());
            }
        };
        let id = msg.is_request().then(|| msg.id().cloned()).flatten();
        let method = msg.method().map(String::from);
        let is_init = method.as_deref() == Some("initialize");
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if is_init {
                st.init = Some(line.clone());
                st.initialized_sent = false;
            }
            if method.as_deref() == Some("notifications/initialized") {
                st.initialized_sent = true;
            }
        }
        for attempt in 0..2 {
            let session = if is_init { None } else { self.session() };
            match self
                .send(hyper::Method::POST, Some(&line), session.as_deref())
                .await
            {
                Sent::Ok(r) => {
                    if is_init && r.status().is_success() {
                        self.set_session(&r);
                    }
                    let me = self.clone();
                    let rid = id.clone();
                    // Headers are in; the body streams while the next message goes out.
                    let task = tokio::spawn(async move { me.deliver(r, rid, None).await });
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.inflight.retain(|t| !t.is_finished());
                    if id.is_some() {
                        st.inflight.push(task);
                    }
                    return Ok(());
                }
                Sent::Gone if !self.cfg.replay => {
                    let why = format!("{} ended the session", self.cfg.peer);
                    self.fail(&id, &why).await;
                    return Err(why);
                }
                Sent::Gone | Sent::Unreachable(_)
                    if attempt == 0 && !is_init && self.cfg.replay =>
                {
                    if let Err(e) = self.reinitialize().await {
                        self.fail(&id, &e).await;
                        return Ok(());
                    }
                }
                Sent::Gone => {
                    self.fail(&id, "the session ended").await;
                    return Ok(());
                }
                Sent::Unreachable(e) => {
                    self.fail(&id, &format!("cannot reach {}: {e}", self.cfg.peer))
                        .await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn fail(&self, id: &Option<Id>, msg: &str) {
        match id {
            Some(id) => {
                let _ = self
                    .out
                    .send(jsonrpc::error(Some(id), SERVER_ERROR, msg))
                    .await;
            }
            None => (self.cfg.notice)(msg),
        }
    }
}

impl Bridge {
    pub fn new(cfg: BridgeConfig, out: mpsc::Sender<Bytes>) -> Arc<Bridge> {
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(cfg.connector.clone());
        Arc::new(Bridge {
            http,
            cfg,
            out,
            state: Mutex::new(State::default()),
        })
    }

    /// Waits (up to 30 s) for answers still streaming, then ends the session.
    pub async fn finish(&self) {
        let inflight = std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .inflight,
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(inflight),
        )
        .await;
        if let Some(sid) = self.session() {
            let _ = self.send(hyper::Method::DELETE, None, Some(&sid)).await;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.session = None;
        if let Some(t) = st.get_task.take() {
            t.abort();
        }
    }
}
