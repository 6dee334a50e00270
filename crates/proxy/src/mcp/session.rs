//! One MCP session on the proxy: a stream to the agent over its tunnel, the
//! client's open SSE streams, and the requests waiting for their responses.
//! Responses go to the stream of the POST that asked; server-initiated
//! messages go to the newest open POST stream, else the GET stream, else a
//! bounded backlog delivered when one opens.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use portico_agent::tunnel::T_END;
use portico_core::time::now_ms;
use tokio::sync::mpsc;

use super::jsonrpc::{self, peek};
use crate::ProxyState;

pub type AgentTx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;
/// One JSON-RPC message for a client stream.
pub type StreamTx = mpsc::Sender<Bytes>;

const BACKLOG: usize = 1000;
pub const STREAM_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
pub enum Asked {
    Initialize,
    ToolsList,
    ToolsCall(String),
    Other,
}

struct Pending {
    stream: u64,
    asked: Asked,
    started: Instant,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<String, Pending>,
    streams: HashMap<u64, StreamTx>,
    /// Open POST streams, oldest first.
    order: Vec<u64>,
    get: Option<StreamTx>,
    backlog: VecDeque<Bytes>,
    next_stream: u64,
    to_agent: Option<AgentTx>,
    closed: Option<String>,
}

pub struct Session {
    pub id: String,
    pub user: String,
    pub app: String,
    pub agent: String,
    pub started: Instant,
    pub last_active: AtomicI64,
    inner: Mutex<Inner>,
}

enum Target {
    Stream(StreamTx),
    Backlog,
}

impl Session {
    pub fn new(
        id: String,
        user: String,
        app: String,
        agent: String,
        to_agent: AgentTx,
    ) -> Arc<Self> {
        Arc::new(Session {
            id,
            user,
            app,
            agent,
            started: Instant::now(),
            last_active: AtomicI64::new(now_ms()),
            inner: Mutex::new(Inner {
                to_agent: Some(to_agent),
                ..Default::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn touch(&self) {
        self.last_active.store(now_ms(), Ordering::Relaxed);
    }

    pub fn closed(&self) -> Option<String> {
        self.lock().closed.clone()
    }

    pub fn has_streams(&self) -> bool {
        let g = self.lock();
        !g.streams.is_empty() || g.get.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Opens a POST stream; returns its id and receiver.
    pub fn open_stream(&self) -> (u64, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut g = self.lock();
        g.next_stream += 1;
        let id = g.next_stream;
        g.streams.insert(id, tx);
        g.order.push(id);
        (id, rx)
    }

    /// Registers a request as waiting on `stream`.
    /// Stops waiting for these requests.
    pub fn forget(&self, ids: &[String]) {
        let mut g = self.lock();
        for id in ids {
            g.pending.remove(id);
        }
    }

    pub fn expect(&self, id: String, stream: u64, asked: Asked) {
        self.lock().pending.insert(
            id,
            Pending {
                stream,
                asked,
                started: Instant::now(),
            },
        );
    }

    /// Closes a POST stream once nothing it waits for is left.
    pub fn release_stream_if_done(&self, stream: u64) {
        let mut g = self.lock();
        if !g.pending.values().any(|p| p.stream == stream) {
            g.streams.remove(&stream);
            g.order.retain(|s| *s != stream);
        }
    }

    pub fn stream_sender(&self, stream: u64) -> Option<StreamTx> {
        self.lock().streams.get(&stream).cloned()
    }

    /// Opens (or replaces) the GET stream and hands it the backlog.
    pub fn open_get(&self) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER.max(BACKLOG + 1));
        let mut g = self.lock();
        while let Some(m) = g.backlog.pop_front() {
            let _ = tx.try_send(m);
        }
        g.get = Some(tx);
        rx
    }

    pub fn agent_tx(&self) -> Option<AgentTx> {
        self.lock().to_agent.clone()
    }

    /// Sends one message line to the MCP server.
    pub async fn send_to_agent(&self, mut line: Vec<u8>) -> Result<(), String> {
        let Some(tx) = self.agent_tx() else {
            return Err(self
                .closed()
                .unwrap_or_else(|| "the session has ended".into()));
        };
        line.push(b'\n');
        tx.send(Ok(Frame::data(Bytes::from(line))))
            .await
            .map_err(|_| {
                self.closed()
                    .unwrap_or_else(|| "the session has ended".into())
            })
    }

    fn server_target(&self) -> Target {
        let mut g = self.lock();
        while let Some(&s) = g.order.last() {
            match g.streams.get(&s) {
                Some(tx) if !tx.is_closed() => return Target::Stream(tx.clone()),
                _ => {
                    g.streams.remove(&s);
                    g.order.pop();
                }
            }
        }
        match &g.get {
            Some(tx) if !tx.is_closed() => Target::Stream(tx.clone()),
            _ => Target::Backlog,
        }
    }

    fn push_backlog(&self, msg: Bytes) {
        let mut g = self.lock();
        if g.backlog.len() >= BACKLOG {
            g.backlog.pop_front();
            tracing::warn!(session = %self.id, "server message backlog full; dropped the oldest");
        }
        g.backlog.push_back(msg);
    }

    /// Routes one message from the MCP server to the client.
    async fn route(&self, state: &ProxyState, line: Bytes) {
        let p = match peek(&line) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(session = %self.id, app = %self.app, error = %e, "the MCP server sent an invalid message; dropped");
                return;
            }
        };
        if p.is_response() {
            let key = p.id.clone().unwrap_or_default();
            let pending = self.lock().pending.remove(&key);
            if let Some(pend) = pending {
                let mut msg = line;
                match &pend.asked {
                    Asked::ToolsList => {
                        if let Some(filtered) = self.filter_tools(state, &msg) {
                            msg = Bytes::from(filtered);
                        }
                    }
                    Asked::ToolsCall(tool) => {
                        let error = p.is_error.then(|| error_text(&msg));
                        let tool_error = !p.is_error && result_is_error(&msg);
                        state.audit.emit(
                            "mcp.session.request",
                            error.is_none() && !tool_error,
                            serde_json::json!({
                                "user": self.user, "app": self.app, "session": self.id, "method": "tools/call",
                                "tool": tool, "allowed": true, "error": error,
                                "tool_error": tool_error, "ms": pend.started.elapsed().as_millis() as u64,
                            }),
                        );
                    }
                    Asked::Initialize | Asked::Other => {
                        if p.is_error {
                            state.audit.emit(
                                "mcp.session.request",
                                false,
                                serde_json::json!({"user": self.user, "app": self.app, "session": self.id, "error": error_text(&msg)}),
                            );
                        }
                    }
                }
                let tx = self.stream_sender(pend.stream);
                match tx {
                    Some(tx) if tx.send(msg.clone()).await.is_ok() => {}
                    _ => self.deliver_server(msg).await,
                }
                self.release_stream_if_done(pend.stream);
                return;
            }
        }
        self.deliver_server(line).await;
    }

    async fn deliver_server(&self, msg: Bytes) {
        match self.server_target() {
            Target::Stream(tx) => {
                if let Err(e) = tx.send(msg).await {
                    self.push_backlog(e.0);
                }
            }
            Target::Backlog => self.push_backlog(msg),
        }
    }

    fn filter_tools(&self, state: &ProxyState, msg: &[u8]) -> Option<Vec<u8>> {
        let app = state.cache.app(&self.app)?;
        let Some(checker) = state.cache.checker(&self.user) else {
            return jsonrpc::filter_tools(msg, |_| false);
        };
        jsonrpc::filter_tools(msg, |t| {
            checker.tool_allowed(&app.metadata.labels, t).is_ok()
        })
    }

    /// Ends the session: waiting requests get an error that says why.
    pub async fn end(&self, state: &ProxyState, reason: &str) {
        let (pending, streams) = {
            let mut g = self.lock();
            if g.closed.is_some() {
                return;
            }
            g.closed = Some(reason.to_string());
            g.to_agent = None;
            let pending: Vec<(String, u64)> =
                g.pending.drain().map(|(k, p)| (k, p.stream)).collect();
            let streams = std::mem::take(&mut g.streams);
            g.order.clear();
            g.get = None;
            (pending, streams)
        };
        for (id, stream) in pending {
            if let Some(tx) = streams.get(&stream) {
                let _ = tx.try_send(Bytes::from(jsonrpc::error(
                    Some(&id),
                    jsonrpc::SERVER_ERROR,
                    reason,
                )));
            }
        }
        drop(streams);
        state.sessions.remove(&self.id);
        tracing::info!(session = %self.id, app = %self.app, user = %self.user, reason, "mcp session ended");
        state.audit.emit(
            "mcp.session.end",
            true,
            serde_json::json!({
                "user": self.user, "app": self.app, "agent": self.agent, "session": self.id,
                "reason": reason, "duration_ms": self.started.elapsed().as_millis() as u64,
            }),
        );
    }

    /// Reads the agent's stream until it ends, routing each line.
    pub async fn pump_from_agent(self: Arc<Self>, state: Arc<ProxyState>, mut body: Incoming) {
        let max = state.max_message;
        let mut buf = BytesMut::new();
        let mut reason = None;
        loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    reason = Some(format!("the agent serving this session disconnected ({e})"));
                    break;
                }
                None => break,
            };
            match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let mut line = buf.split_to(i + 1);
                        line.truncate(i);
                        if line.last() == Some(&b'\r') {
                            line.truncate(i - 1);
                        }
                        if !line.is_empty() {
                            self.route(&state, line.freeze()).await;
                        }
                    }
                    if buf.len() > max {
                        reason = Some(format!(
                            "the MCP server sent a message larger than {max} bytes"
                        ));
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers()
                        && let Some(v) = trailers.get(T_END).and_then(|v| v.to_str().ok())
                    {
                        reason = Some(v.to_string());
                    }
                }
            }
        }
        let reason = reason.unwrap_or_else(|| "the MCP server closed the session".into());
        self.end(&state, &reason).await;
    }
}

fn error_text(msg: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(msg).unwrap_or_default();
    v["error"]["message"]
        .as_str()
        .unwrap_or("error")
        .chars()
        .take(300)
        .collect()
}

fn result_is_error(msg: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct R {
        result: Option<IsErr>,
    }
    #[derive(serde::Deserialize)]
    struct IsErr {
        #[serde(rename = "isError", default)]
        is_error: bool,
    }
    serde_json::from_slice::<R>(msg)
        .ok()
        .and_then(|r| r.result)
        .is_some_and(|r| r.is_error)
}

/// Every live session, by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
    pub fn insert(&self, s: Arc<Session>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id.clone(), s);
    }
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn count_for(&self, user: &str) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.user == user)
            .count()
    }
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
