//! One MCP session on the proxy: a stream to the agent over its tunnel, the
//! client's open SSE streams, and the requests waiting for their responses.
//! Responses go to the stream of the POST that asked; server-initiated
//! messages go to the newest open POST stream, else the GET stream, else a
//! bounded backlog delivered when one opens. Every message from the server
//! is read by the one strict parser; a response is matched to its request by
//! the canonical id, and one that matches nothing is dropped, never relayed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use portico_core::time::now_ms;
use portico_mcp::LineBuffer;
use portico_mcp::jsonrpc::{self, Id, Message, SERVER_ERROR};
use portico_mcp::lists;
use portico_tunnel::{T_END, TunnelBody, direct};
use tokio::sync::mpsc;

use super::rbac::{self, Asked};
use crate::ProxyState;

pub type AgentTx = portico_tunnel::queue::Tx<Bytes>;
/// One JSON-RPC message for a client stream.
pub type StreamTx = mpsc::Sender<Out>;

/// A message on its way to a client stream, marked when it is the answer
/// to a request (a POST whose one request is answered first may then be
/// answered with that message alone, as `application/json`).
pub struct Out {
    pub msg: Bytes,
    pub answer: bool,
    /// The last answer its stream awaits; the stream was released before
    /// it was sent, so no server message can follow it there.
    pub last: bool,
    /// Counts a server message against its session's `QUEUED_BYTES` until
    /// the stream takes it.
    held: Option<Held>,
}

/// Bytes of server messages queued for one session's client streams and
/// not yet taken by them. Beyond this the client is not reading (a stream
/// whose connection no longer reads, or many POSTs left unread at once),
/// and the session ends, as for a stream that stalls: what a session may
/// hold does not grow with what its server sends.
const QUEUED_BYTES: usize = 64 * 1024 * 1024;

struct Held(Arc<AtomicUsize>, usize);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Out {
    pub fn answer(msg: Bytes) -> Out {
        Out {
            msg,
            answer: true,
            last: false,
            held: None,
        }
    }
    pub fn other(msg: Bytes) -> Out {
        Out {
            msg,
            answer: false,
            last: false,
            held: None,
        }
    }
}

/// Server messages kept for a client with no stream open, by count and
/// bytes; the oldest go first.
const BACKLOG: usize = 1000;
const BACKLOG_BYTES: usize = 8 * 1024 * 1024;
/// Cancelled requests remembered until their late answer comes (see
/// `Session::cancel`).
const MAX_CANCELLED: usize = 1024;
pub const STREAM_BUFFER: usize = 256;
/// What each stream keeps of the messages it carried, for a client that
/// reconnects with `Last-Event-ID`: at most this many, of at most this
/// many bytes in all, for the session's newest `REPLAY_GETS` GET streams
/// and its newest `REPLAY_STREAMS` POST streams that carried events. A
/// POST answered as plain JSON carries none and keeps nothing, so it
/// pushes no stream's replay out.
const REPLAY_MESSAGES: usize = 4096;
const REPLAY_BYTES: usize = 512 * 1024;
const REPLAY_STREAMS: usize = 4;
const REPLAY_GETS: usize = 2;

/// The messages one SSE stream carried (or held when its client went
/// away), numbered as its events are.
#[derive(Default)]
pub struct Replay {
    next: u64,
    kept: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

pub type ReplayRef = Arc<std::sync::Mutex<Replay>>;

impl Replay {
    /// Keeps `msg` as the stream's next event; returns its number.
    pub fn record(&mut self, msg: Bytes) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.bytes += msg.len();
        self.kept.push_back((seq, msg));
        while self.kept.len() > REPLAY_MESSAGES || self.bytes > REPLAY_BYTES {
            match self.kept.pop_front() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
        seq
    }

    /// The messages after event `seq`, oldest first.
    fn after(&self, seq: u64) -> Vec<Bytes> {
        self.kept
            .iter()
            .filter(|(s, _)| *s > seq)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

/// A `Last-Event-ID` as this proxy writes it: `<stream>:<event>`.
pub fn parse_event_id(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}
/// How long a client stream may stay full before the session is ended: a
/// client that stops reading must not hold the agent's tunnel.
const STALL: std::time::Duration = std::time::Duration::from_secs(5);
const STALLED: &str = "the client stopped reading its stream; the session was ended";

/// Sends to a client stream, waiting at most `STALL` for room. `Ok(None)`:
/// sent; `Ok(Some(msg))`: the stream is closed; `Err`: the client stalled.
async fn send_bounded(
    tx: &StreamTx,
    mut msg: Out,
    queued: &Arc<AtomicUsize>,
) -> Result<Option<Bytes>, ()> {
    let len = msg.msg.len();
    if queued.fetch_add(len, Ordering::Relaxed) + len > QUEUED_BYTES {
        queued.fetch_sub(len, Ordering::Relaxed);
        return Err(());
    }
    msg.held = Some(Held(queued.clone(), len));
    match tx.try_send(msg) {
        Ok(()) => Ok(None),
        Err(mpsc::error::TrySendError::Closed(m)) => Ok(Some(m.msg)),
        Err(mpsc::error::TrySendError::Full(m)) => {
            match tokio::time::timeout(STALL, tx.send(m)).await {
                Ok(Ok(())) => Ok(None),
                Ok(Err(e)) => Ok(Some(e.0.msg)),
                Err(_) => Err(()),
            }
        }
    }
}

pub struct Pending {
    pub stream: u64,
    pub asked: Asked,
    pub started: Instant,
    /// Whether its decision was audited while it waited
    /// (`rbac::audit_waiting`).
    pub decided_audited: bool,
}

/// What a client was shown of one list: every name the server listed (up
/// to `MAX_SEEN`), and those its roles let it see then.
#[derive(Default)]
struct SeenList {
    all: std::collections::BTreeSet<String>,
    visible: std::collections::BTreeSet<String>,
}

/// Names remembered per list and session, for telling clients when a role
/// change alters what they may see.
const MAX_SEEN: usize = 10_000;

#[derive(Default)]
struct Inner {
    /// The newest POST streams' replays, by stream id.
    replays: std::collections::BTreeMap<u64, ReplayRef>,
    /// The newest GET streams' replays, oldest first, apart: POST streams
    /// never push them out.
    get_replays: VecDeque<(u64, ReplayRef)>,
    seen: HashMap<portico_mcp::lists::ListKind, SeenList>,
    pending: HashMap<Id, Pending>,
    /// Requests the client cancelled that the server has not answered: a
    /// late answer is dropped, and their ids are not taken again until it
    /// comes, so that it cannot pass for the answer to another request.
    cancelled: std::collections::HashSet<Id>,
    streams: HashMap<u64, StreamTx>,
    /// Open POST streams, oldest first.
    order: Vec<u64>,
    get: Option<StreamTx>,
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    next_stream: u64,
    to_agent: Option<AgentTx>,
    /// The server's standard input, when its agent is in this process and
    /// gave it (`portico_tunnel::direct`): lines go there, not to `to_agent`.
    input: Option<direct::Input>,
    closed: Option<String>,
}

pub struct Session {
    pub id: String,
    pub user: String,
    pub app: String,
    pub agent: String,
    /// Opened by the local admin identity (permissions from the admin preset).
    pub admin: bool,
    pub started: Instant,
    pub last_active: AtomicI64,
    /// Bytes of server messages in its streams' queues (`QUEUED_BYTES`).
    queued: Arc<AtomicUsize>,
    inner: Mutex<Inner>,
}

enum Target {
    Stream(StreamTx),
    Backlog,
}

/// Where an answer goes (`Session::take_pending`).
struct AnswerTo {
    tx: Option<StreamTx>,
    last: bool,
}

impl Session {
    pub fn new(
        id: String,
        user: String,
        app: String,
        agent: String,
        admin: bool,
        to_agent: AgentTx,
    ) -> Arc<Self> {
        Arc::new(Session {
            id,
            user,
            app,
            agent,
            admin,
            started: Instant::now(),
            last_active: AtomicI64::new(now_ms()),
            queued: Arc::default(),
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

    /// Whether a client is still reading any of the session's streams.
    pub fn has_streams(&self) -> bool {
        let g = self.lock();
        g.streams.values().any(|s| !s.is_closed()) || g.get.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Opens a POST stream for the answers to its requests; returns its id
    /// and receiver. It takes server-initiated messages only once
    /// `offer`ed; its replay is made by `replay` when it carries events.
    pub fn open_stream(&self) -> (u64, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut g = self.lock();
        g.next_stream += 1;
        let id = g.next_stream;
        g.streams.insert(id, tx);
        (id, rx)
    }

    /// The replay of POST stream `stream`, made now if it has none; only
    /// the newest `REPLAY_STREAMS` keep theirs.
    pub fn replay(&self, stream: u64) -> ReplayRef {
        let mut g = self.lock();
        if let Some(r) = g.replays.get(&stream) {
            return r.clone();
        }
        let r = ReplayRef::default();
        g.replays.insert(stream, r.clone());
        while g.replays.len() > REPLAY_STREAMS {
            g.replays.pop_first();
        }
        r
    }

    /// Lets a POST stream, now handed to its client, carry server-initiated
    /// messages too (the newest open one does).
    pub fn offer(&self, stream: u64) {
        let mut g = self.lock();
        if g.streams.contains_key(&stream) {
            g.order.push(stream);
        }
    }

    /// The client cancelled request `id`: the proxy stops waiting for its
    /// answer and returns what it asked, but remembers the id until the
    /// server answers it anyway, dropping that answer. With `MAX_CANCELLED`
    /// such ids already remembered, it keeps waiting instead (`None`), so
    /// that no id is forgotten while an answer to it may still come.
    pub fn cancel(&self, id: &Id) -> Option<Pending> {
        let mut g = self.lock();
        if g.cancelled.len() >= MAX_CANCELLED {
            return None;
        }
        let pend = g.pending.remove(id)?;
        g.cancelled.insert(id.clone());
        Some(pend)
    }

    /// Stops waiting for these requests, which were never sent; returns
    /// what they asked.
    pub fn forget(&self, ids: &[Id]) -> Vec<(Id, Pending)> {
        let mut g = self.lock();
        ids.iter()
            .filter_map(|id| g.pending.remove(id).map(|p| (id.clone(), p)))
            .collect()
    }

    /// Requests forwarded and not yet answered.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Whether an answer with this id, or with its twin of the other type
    /// (`7` and `"7"`), may still come: the id of a request waiting, or of
    /// one cancelled and not answered yet.
    pub fn is_pending(&self, id: &Id) -> bool {
        Self::in_use(&self.lock(), id)
    }

    fn in_use(g: &Inner, id: &Id) -> bool {
        let taken = |i: &Id| g.pending.contains_key(i) || g.cancelled.contains(i);
        if g.pending.is_empty() && g.cancelled.is_empty() {
            return false;
        }
        taken(id) || id.twin().is_some_and(|t| taken(&t))
    }

    /// Registers a request as waiting on `stream`. An id already in use
    /// (`is_pending`) is refused: two answers could not be told apart, and
    /// a server that reads ids loosely might answer one for the other.
    pub fn expect(&self, id: Id, stream: u64, asked: Asked) -> Result<(), Asked> {
        let mut g = self.lock();
        if Self::in_use(&g, &id) {
            return Err(asked);
        }
        g.pending.insert(
            id,
            Pending {
                stream,
                asked,
                started: Instant::now(),
                decided_audited: false,
            },
        );
        Ok(())
    }

    /// Allowed gated requests that have waited at least `after` and whose
    /// decision was not audited yet; they are marked as audited.
    pub fn waiting_unaudited(
        &self,
        after: std::time::Duration,
    ) -> Vec<(Id, lists::Target, &'static str)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for (id, p) in g.pending.iter_mut() {
            if let Asked::Gated(target, method) = &p.asked
                && !p.decided_audited
                && p.started.elapsed() >= after
            {
                p.decided_audited = true;
                out.push((id.clone(), target.clone(), *method));
            }
        }
        out
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

    /// Opens (or replaces) the GET stream. A client resuming after event
    /// `resume` (`Last-Event-ID`) first gets what that stream carried or
    /// held after it; then the backlog. Returns the stream's id, receiver
    /// and replay.
    pub fn open_get(&self, resume: Option<(u64, u64)>) -> (u64, mpsc::Receiver<Out>, ReplayRef) {
        let mut g = self.lock();
        let replayed = resume
            .and_then(|(stream, seq)| {
                let r = match g.get_replays.iter().find(|(id, _)| *id == stream) {
                    Some((_, r)) => r,
                    None => g.replays.get(&stream)?,
                };
                let r = r.lock().unwrap_or_else(|p| p.into_inner());
                Some(r.after(seq))
            })
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER + replayed.len() + g.backlog.len());
        for m in replayed {
            let _ = tx.try_send(Out::other(m));
        }
        while let Some(m) = g.backlog.pop_front() {
            let _ = tx.try_send(Out::other(m));
        }
        g.backlog_bytes = 0;
        g.get = Some(tx);
        g.next_stream += 1;
        let id = g.next_stream;
        let replay = ReplayRef::default();
        g.get_replays.push_back((id, replay.clone()));
        while g.get_replays.len() > REPLAY_GETS {
            g.get_replays.pop_front();
        }
        (id, rx, replay)
    }

    fn agent_tx(&self) -> (Option<AgentTx>, Option<direct::Input>) {
        let g = self.lock();
        (g.to_agent.clone(), g.input.clone())
    }

    /// Where this session's messages go from now on: straight to the
    /// server's input, given by an agent in this process.
    pub fn write_to(&self, input: direct::Input) {
        let mut g = self.lock();
        if g.closed.is_none() {
            g.input = Some(input);
        }
    }

    /// Sends one message, in its canonical form, to the MCP server. A server
    /// that does not take it within `STALL` ends nothing, but the caller
    /// gets an error rather than waiting on it.
    pub async fn send_to_agent(&self, msg: &Message) -> Result<(), String> {
        let ended = || {
            self.closed()
                .unwrap_or_else(|| "the session has ended".into())
        };
        let (Some(tx), input) = self.agent_tx() else {
            return Err(ended());
        };
        if let Some(input) = input {
            return match tokio::time::timeout(STALL, input.write(msg.to_line())).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => Err(e.to_string()),
                // The server's input is closed: its session is ending (the
                // agent was told, or has ended it), and that end answers
                // every request still waiting with its reason, as it does
                // those a queued line carried.
                Ok(Err(_)) => Ok(()),
                Err(_) => Err("the MCP server is not reading its input".into()),
            };
        }
        match tokio::time::timeout(STALL, tx.send(msg.to_line())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ended()),
            Err(_) => Err("the MCP server is not reading its input".into()),
        }
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

    /// Remembers the names of a list answer and which of them the client
    /// was shown.
    pub fn saw_list(&self, kind: portico_mcp::lists::ListKind, items: Vec<(String, bool)>) {
        let mut g = self.lock();
        let e = g.seen.entry(kind).or_default();
        for (name, shown) in items {
            if e.all.len() >= MAX_SEEN && !e.all.contains(&name) {
                continue;
            }
            if shown {
                e.visible.insert(name.clone());
            } else {
                e.visible.remove(&name);
            }
            e.all.insert(name);
        }
    }

    /// Checks the lists the client has seen again with `allowed`; returns
    /// those whose visible items changed (and remembers the new view).
    pub fn relist(
        &self,
        allowed: impl Fn(portico_mcp::lists::ListKind, &str) -> bool,
    ) -> Vec<portico_mcp::lists::ListKind> {
        let mut g = self.lock();
        let mut changed = Vec::new();
        for (kind, e) in g.seen.iter_mut() {
            let now: std::collections::BTreeSet<String> = e
                .all
                .iter()
                .filter(|n| allowed(*kind, n))
                .cloned()
                .collect();
            if now != e.visible {
                e.visible = now;
                changed.push(*kind);
            }
        }
        changed.sort();
        changed
    }

    /// Sends a message of the proxy's own to the client, as server
    /// messages go (the newest POST stream, the GET stream, the backlog).
    pub async fn deliver_from_proxy(&self, msg: Bytes) -> Result<(), &'static str> {
        self.deliver_server(msg).await
    }

    fn push_backlog(&self, msg: Bytes) {
        let mut g = self.lock();
        g.backlog_bytes += msg.len();
        g.backlog.push_back(msg);
        let mut dropped = 0;
        while g.backlog.len() > BACKLOG || g.backlog_bytes > BACKLOG_BYTES {
            let Some(old) = g.backlog.pop_front() else {
                break;
            };
            g.backlog_bytes -= old.len();
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(session = %self.id, dropped, "server message backlog full; dropped the oldest");
        }
    }

    /// Routes one message from the MCP server to the client; an error means
    /// the client stopped reading and the session must end.
    async fn route(&self, state: &ProxyState, line: &[u8]) -> Result<(), &'static str> {
        let mut msg = match Message::parse(line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(session = %self.id, app = %self.app, error = %e, "the MCP server sent an invalid message; dropped");
                return self.answer_invalid(state, line, &e.message).await;
            }
        };
        if !msg.is_response() {
            return self.deliver_server(msg.to_bytes()).await;
        }
        let Some(id) = msg.id().cloned() else {
            return Ok(());
        };
        let Some((pend, to)) = self.take_pending(&id) else {
            if self.lock().cancelled.remove(&id) {
                tracing::debug!(session = %self.id, app = %self.app, id = %id, "the MCP server answered a cancelled request; dropped");
            } else {
                tracing::warn!(session = %self.id, app = %self.app, id = %id, "the MCP server answered a request nobody is waiting for; dropped");
            }
            return Ok(());
        };
        let out = rbac::on_response(state, self, &pend, &mut msg).await;
        let out =
            out.unwrap_or_else(|why| jsonrpc::error(Some(&id), jsonrpc::INTERNAL_ERROR, &why));
        self.answer(to, out).await
    }

    /// An invalid message whose id (read leniently) names a pending request
    /// is that request's answer: the client gets an error instead of waiting.
    async fn answer_invalid(
        &self,
        state: &ProxyState,
        line: &[u8],
        why: &str,
    ) -> Result<(), &'static str> {
        let Some(id) = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| match v.get("id")? {
                serde_json::Value::String(s) => Some(Id::Str(s.clone())),
                serde_json::Value::Number(n) => n.as_i64().map(Id::Int),
                _ => None,
            })
        else {
            return Ok(());
        };
        let Some((pend, to)) = self.take_pending(&id) else {
            self.lock().cancelled.remove(&id);
            return Ok(());
        };
        rbac::unanswered(
            state,
            self,
            &id,
            &pend,
            "the MCP server sent an invalid answer",
        )
        .await;
        let out = jsonrpc::error(
            Some(&id),
            jsonrpc::INTERNAL_ERROR,
            &format!("the MCP server sent an invalid answer ({why})"),
        );
        self.answer(to, out).await
    }

    /// Takes request `id` off the waiting list, with where its answer goes:
    /// the stream of the POST that asked, and whether this is the last
    /// answer that stream awaits (it is then released at once, so that no
    /// server message goes there after it). Both are taken under the lock
    /// that takes the request: the POST that asked may be finishing at
    /// this moment, and it closes its stream if it sees nothing waiting on
    /// it; the sender taken here keeps the stream open for the answer.
    fn take_pending(&self, id: &Id) -> Option<(Pending, AnswerTo)> {
        let mut g = self.lock();
        let pend = g.pending.remove(id)?;
        let tx = g.streams.get(&pend.stream).cloned();
        let last = !g.pending.values().any(|p| p.stream == pend.stream);
        if last {
            g.streams.remove(&pend.stream);
            g.order.retain(|s| *s != pend.stream);
        }
        Some((pend, AnswerTo { tx, last }))
    }

    /// Delivers the answer to a request on the stream of the POST that
    /// asked (or, if that is gone, as a server message); the stream closes
    /// after it if it was the last it awaited.
    async fn answer(&self, to: AnswerTo, out: Bytes) -> Result<(), &'static str> {
        let AnswerTo { tx, last } = to;
        let undelivered = match tx {
            Some(tx) => {
                let mut o = Out::answer(out);
                o.last = last;
                send_bounded(&tx, o, &self.queued)
                    .await
                    .map_err(|()| STALLED)?
            }
            None => Some(out),
        };
        match undelivered {
            Some(out) => self.deliver_server(out).await,
            None => Ok(()),
        }
    }

    async fn deliver_server(&self, msg: Bytes) -> Result<(), &'static str> {
        match self.server_target() {
            Target::Stream(tx) => {
                if let Some(m) = send_bounded(&tx, Out::other(msg), &self.queued)
                    .await
                    .map_err(|()| STALLED)?
                {
                    self.push_backlog(m);
                }
            }
            Target::Backlog => self.push_backlog(msg),
        }
        Ok(())
    }

    /// Ends the session: waiting requests get an error that says why, and
    /// tool calls still pending are audited as unanswered.
    pub async fn end(&self, state: &ProxyState, reason: &str) {
        let (pending, streams) = {
            let mut g = self.lock();
            if g.closed.is_some() {
                return;
            }
            g.closed = Some(reason.to_string());
            g.to_agent = None;
            g.input = None;
            let pending: Vec<(Id, Pending)> = g.pending.drain().collect();
            let streams = std::mem::take(&mut g.streams);
            g.order.clear();
            g.get = None;
            (pending, streams)
        };
        for (id, pend) in pending {
            rbac::unanswered(state, self, &id, &pend, reason).await;
            if let Some(tx) = streams.get(&pend.stream) {
                let _ = tx.try_send(Out::answer(jsonrpc::error(Some(&id), SERVER_ERROR, reason)));
            }
        }
        drop(streams);
        state.sessions.remove(&self.id, &self.user);
        tracing::info!(session = %self.id, app = %self.app, user = %self.user, reason, "mcp session ended");
        state
            .audit
            .record(
                "mcp.session.end",
                true,
                serde_json::json!({
                    "user": self.user, "app": self.app, "agent": self.agent, "session": self.id,
                    "reason": reason, "duration_ms": self.started.elapsed().as_millis() as u64,
                }),
            )
            .await;
    }

    /// Reads the agent's stream until it ends, routing each line. `gone`
    /// turns when the tunnel of an agent reached in-process closes.
    pub async fn pump_from_agent(
        self: Arc<Self>,
        state: Arc<ProxyState>,
        mut body: TunnelBody,
        mut gone: Option<tokio::sync::watch::Receiver<()>>,
    ) {
        let max = state.max_message;
        let mut lines = LineBuffer::new(max);
        let mut reason = None;
        'read: loop {
            let next = match gone.as_mut() {
                None => body.frame().await,
                Some(g) => tokio::select! {
                    f = body.frame() => f,
                    _ = g.changed() => {
                        reason = Some("the agent serving this session disconnected (its tunnel closed)".to_string());
                        break;
                    }
                },
            };
            let frame = match next {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    reason = Some(format!("the agent serving this session disconnected ({e})"));
                    break;
                }
                None => break,
            };
            match frame.into_data() {
                Ok(data) => {
                    lines.push(&data);
                    loop {
                        match lines.next_line() {
                            Ok(Some(line)) if line.is_empty() => {}
                            Ok(Some(line)) => {
                                if let Err(why) = self.route(&state, &line).await {
                                    reason = Some(why.to_string());
                                    break 'read;
                                }
                            }
                            Ok(None) => break,
                            Err(_) => {
                                reason = Some(format!(
                                    "the MCP server sent a message larger than {max} bytes"
                                ));
                                break 'read;
                            }
                        }
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

/// Takes the lines of a stdio server whose agent runs in this process,
/// called by the agent's session task (`portico_tunnel::direct`): what
/// `Session::pump_from_agent` does with each line of the agent's stream,
/// one task hop sooner.
pub struct DirectOutput {
    pub session: Arc<Session>,
    pub state: Arc<ProxyState>,
}

impl direct::Output for DirectOutput {
    fn line(
        &self,
        line: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let max = self.state.max_message;
            let why = if line.len() > max {
                format!("the MCP server sent a message larger than {max} bytes")
            } else if line.is_empty() {
                // As the pump skips them (the agent sends none).
                return Ok(());
            } else {
                match self.session.route(&self.state, &line).await {
                    Ok(()) => return Ok(()),
                    Err(why) => why.to_string(),
                }
            };
            // The session ends now, as when the proxy's pump stops; the
            // agent ends the process on the error.
            self.session.end(&self.state, &why).await;
            Err(why)
        })
    }
}

/// Every live session, by id, with a count per user kept under the same
/// lock, so that the per-user cap is checked and taken in one step.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<SessionsInner>,
}

#[derive(Default)]
struct SessionsInner {
    map: HashMap<String, Arc<Session>>,
    /// Live plus reserved (being opened) sessions per user.
    per_user: HashMap<String, usize>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().map.get(id).cloned()
    }
    /// Takes one of the user's session slots, if fewer than `max` are taken.
    pub fn reserve(&self, user: &str, max: usize) -> bool {
        let mut g = self.lock();
        let n = g.per_user.entry(user.to_string()).or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }
    /// Gives back a slot taken by `reserve` for a session that did not open.
    pub fn unreserve(&self, user: &str) {
        let mut g = self.lock();
        if let Some(n) = g.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.per_user.remove(user);
            }
        }
    }
    /// Adds an opened session (its slot was reserved).
    pub fn insert(&self, s: Arc<Session>) {
        self.lock().map.insert(s.id.clone(), s);
    }
    pub fn remove(&self, id: &str, user: &str) {
        let removed = self.lock().map.remove(id).is_some();
        if removed {
            self.unreserve(user);
        }
    }
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().map.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The POST that asked may finish (and close its stream if nothing
    /// waits on it) between the moment its request is taken off the
    /// waiting list and the moment the answer is sent: the answer still
    /// reaches that stream, and ends it.
    #[tokio::test]
    async fn an_answer_taken_reaches_a_stream_its_post_released() {
        let (tx, _body) = portico_tunnel::queue::channel::<Bytes>(4);
        let s = Session::new("s".into(), "u".into(), "a".into(), "h".into(), false, tx);
        let (sid, mut rx) = s.open_stream();
        let id = Id::Int(7);
        assert!(s.expect(id.clone(), sid, Asked::Other).is_ok());
        let (_pend, to) = s.take_pending(&id).expect("waiting");
        // The POST finishes now: nothing waits on its stream any more.
        s.release_stream_if_done(sid);
        s.offer(sid);
        let answer = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"result":{}}"#);
        s.answer(to, answer.clone()).await.expect("delivered");
        let got = rx.recv().await.expect("the answer, on the POST's stream");
        assert_eq!(got.msg, answer);
        assert!(got.answer && got.last);
        assert!(rx.recv().await.is_none(), "the stream ends with its answer");
        assert!(s.lock().backlog.is_empty(), "nothing went elsewhere");
    }

    /// What a session holds for its client does not grow with what its
    /// server sends: the backlog by bytes as well as count, and its
    /// streams' queues by bytes, beyond which the client is not reading
    /// and the session is ended.
    #[tokio::test]
    async fn what_a_session_holds_for_its_client_is_bounded_in_bytes() {
        let (tx, _body) = portico_tunnel::queue::channel::<Bytes>(4);
        let s = Session::new("s".into(), "u".into(), "a".into(), "h".into(), false, tx);
        let big = Bytes::from(vec![b'x'; 1024 * 1024]);
        for _ in 0..3 * BACKLOG_BYTES / big.len() {
            s.deliver_from_proxy(big.clone())
                .await
                .expect("to the backlog");
        }
        {
            let g = s.lock();
            assert_eq!(g.backlog_bytes, BACKLOG_BYTES);
            assert_eq!(
                g.backlog.iter().map(Bytes::len).sum::<usize>(),
                BACKLOG_BYTES
            );
        }
        // A GET stream takes the backlog, and nobody reads it.
        let (_, mut rx, _) = s.open_get(None);
        assert_eq!(s.lock().backlog_bytes, 0);
        let fit = QUEUED_BYTES / big.len();
        for i in 0..fit {
            s.deliver_from_proxy(big.clone())
                .await
                .unwrap_or_else(|e| panic!("{i}: {e}"));
        }
        assert_eq!(s.deliver_from_proxy(big.clone()).await, Err(STALLED));
        // Taken by the stream, a message no longer counts.
        for _ in 0..BACKLOG_BYTES / big.len() + 1 {
            rx.try_recv().expect("queued");
        }
        s.deliver_from_proxy(big.clone()).await.expect("room again");
    }

    /// A cancelled request's id stays taken, with its twin, until its late
    /// answer comes; with `MAX_CANCELLED` such ids, a cancellation leaves
    /// its request waiting rather than forget an id still in flight.
    #[test]
    fn cancelled_ids_stay_taken_and_are_bounded() {
        let (tx, _body) = portico_tunnel::queue::channel::<Bytes>(4);
        let s = Session::new("s".into(), "u".into(), "a".into(), "h".into(), false, tx);
        let (sid, _rx) = s.open_stream();
        for i in 0..MAX_CANCELLED as i64 {
            s.expect(Id::Int(i), sid, Asked::Other).expect("new id");
            assert!(s.cancel(&Id::Int(i)).is_some());
        }
        assert_eq!(s.pending_count(), 0);
        assert!(s.is_pending(&Id::Int(7)) && s.is_pending(&Id::Str("7".into())));
        assert!(s.expect(Id::Str("7".into()), sid, Asked::Other).is_err());
        assert!(!s.is_pending(&Id::Str("07".into())));
        let last = Id::Int(MAX_CANCELLED as i64);
        s.expect(last.clone(), sid, Asked::Other).expect("new id");
        assert!(s.cancel(&last).is_none(), "no room: still waited for");
        assert!(s.is_pending(&last) && s.pending_count() == 1);
    }

    /// A client cut off its GET stream resumes it after any number of
    /// POSTs, those whose answers were SSE events included, and after one
    /// newer GET stream; of POST streams, only the newest that carried
    /// events keep theirs.
    #[test]
    fn the_get_streams_replay_outlives_any_number_of_posts() {
        let (tx, _body) = portico_tunnel::queue::channel::<Bytes>(4);
        let s = Session::new("s".into(), "u".into(), "a".into(), "h".into(), false, tx);
        let (get, _rx, replay) = s.open_get(None);
        for m in ["g0", "g1", "g2"] {
            replay
                .lock()
                .expect("replay")
                .record(Bytes::from_static(m.as_bytes()));
        }
        // Another GET, which does not resume: the first stays resumable.
        let _second = s.open_get(None);
        let mut posts = Vec::new();
        for _ in 0..2 * REPLAY_STREAMS {
            let (id, _rx) = s.open_stream();
            s.replay(id)
                .lock()
                .expect("replay")
                .record(Bytes::from_static(b"p0"));
            // Answered as plain JSON: no replay made.
            let _ = s.open_stream();
            posts.push(id);
        }
        let (_, mut rx, _) = s.open_get(Some((get, 0)));
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv().ok().map(|o| o.msg)).collect();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"g1"), Bytes::from_static(b"g2")]
        );
        let kept: Vec<u64> = s.lock().replays.keys().copied().collect();
        assert_eq!(kept, posts[posts.len() - REPLAY_STREAMS..].to_vec());
        // Two newer GET streams later, the first's replay is gone: a
        // resumption from it starts fresh.
        let (_, mut rx, _) = s.open_get(Some((get, 0)));
        assert!(rx.try_recv().is_err(), "nothing replayed");
    }
}
