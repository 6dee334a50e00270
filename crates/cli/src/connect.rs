//! `psh mcp connect NAME`: a stdio MCP server for local clients that speaks
//! Streamable HTTP to the proxy. When the proxy loses the session (a restart,
//! say), the bridge opens a fresh one by replaying the client's initialize.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::http::{HttpClient, base_url, client, read_limited};
use crate::profile::Profile;
use crate::{CliResult, Fail};
use portico_proto::sse::read_sse;

const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 1024;
const REINIT_ID: &str = "\"portico-bridge-reinit\"";

struct Bridge {
    http: HttpClient,
    url: String,
    token: String,
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

fn peek(line: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let id = v.get("id").filter(|i| !i.is_null()).map(|i| i.to_string());
    let method = v.get("method").and_then(|m| m.as_str()).map(String::from);
    Some((id, method))
}

fn rpc_error(id: &str, message: &str) -> Bytes {
    let m = serde_json::to_string(message).unwrap_or_else(|_| "\"error\"".into());
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32000,"message":{m}}}}}"#
    ))
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
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(&self.url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json, text/event-stream");
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        if let Some(s) = session {
            b = b.header("mcp-session-id", s);
        }
        let Ok(req) = b.body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default()))) else {
            return Sent::Unreachable("cannot build the request".into());
        };
        match tokio::time::timeout(Duration::from_secs(60), self.http.request(req)).await {
            Err(_) => Sent::Unreachable("the proxy did not answer in 60 s".into()),
            Ok(Err(e)) => Sent::Unreachable(portico_proto::client::source_text(&e)),
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
        id: Option<String>,
        skip: Option<&str>,
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
            let r = read_sse(resp.into_body(), MAX_MESSAGE, &self.out, |data| {
                skip.is_some_and(|s| peek(data).and_then(|(i, _)| i).as_deref() == Some(s))
            })
            .await;
            if let Err(e) = r {
                eprintln!("psh: stream from the proxy broke: {e}");
            }
            return;
        }
        let body = read_limited(resp.into_body(), MAX_MESSAGE)
            .await
            .unwrap_or_default();
        if status.is_success() && !body.is_empty() {
            let _ = self.out.send(body).await;
            return;
        }
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(String::from))
            .unwrap_or_else(|| format!("the proxy answered HTTP {}", status.as_u16()));
        match id {
            Some(id) => {
                let _ = self.out.send(rpc_error(&id, &msg)).await;
            }
            None => eprintln!("psh: {msg}"),
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

    /// Keeps the GET stream for server-initiated messages open while the session lives.
    async fn listen(self: Arc<Self>, sid: String) {
        let mut attempt = 0u32;
        loop {
            match self.send(hyper::Method::GET, None, Some(&sid)).await {
                Sent::Ok(r) if r.status().is_success() => {
                    attempt = 0;
                    let _ = read_sse(r.into_body(), MAX_MESSAGE, &self.out, |_| false).await;
                }
                Sent::Ok(r) if r.status() == hyper::StatusCode::METHOD_NOT_ALLOWED => return,
                Sent::Gone => return,
                _ => {}
            }
            if self.session().as_deref() != Some(sid.as_str()) {
                return;
            }
            attempt = (attempt + 1).min(6);
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
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
        let mut v: serde_json::Value = serde_json::from_slice(&init).map_err(|e| e.to_string())?;
        v["id"] = serde_json::from_str(REINIT_ID).map_err(|e| e.to_string())?;
        let line = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut attempt = 0u32;
        loop {
            match self.send(hyper::Method::POST, Some(&line), None).await {
                Sent::Ok(r) if r.status().is_success() => {
                    self.set_session(&r);
                    self.deliver(r, None, Some(REINIT_ID)).await;
                    break;
                }
                Sent::Ok(r) if r.status().is_client_error() => {
                    return Err(format!(
                        "the proxy refused a new session (HTTP {})",
                        r.status().as_u16()
                    ));
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err("the proxy did not come back within 60 s".into());
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
        eprintln!("psh: the proxy lost the session; continuing in a new one");
        Ok(())
    }

    async fn handle(self: &Arc<Self>, line: Vec<u8>) {
        let Some((id, method)) = peek(&line) else {
            let _ = self.out.send(Bytes::from_static(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}"#)).await;
            return;
        };
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
                    return;
                }
                Sent::Gone | Sent::Unreachable(_) if attempt == 0 && !is_init => {
                    if let Err(e) = self.reinitialize().await {
                        self.fail(&id, &e).await;
                        return;
                    }
                }
                Sent::Gone => {
                    self.fail(&id, "the session ended").await;
                    return;
                }
                Sent::Unreachable(e) => {
                    self.fail(&id, &format!("cannot reach the proxy: {e}"))
                        .await;
                    return;
                }
            }
        }
    }

    async fn fail(&self, id: &Option<String>, msg: &str) {
        match id {
            Some(id) => {
                let _ = self.out.send(rpc_error(id, msg)).await;
            }
            None => eprintln!("psh: {msg}"),
        }
    }
}

pub async fn run(profile: Profile, app: String) -> CliResult {
    let url = format!("{}/mcp/{app}", base_url(&profile.proxy));
    let (out, mut out_rx) = mpsc::channel::<Bytes>(1024);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(msg) = out_rx.recv().await {
            if stdout.write_all(&msg).await.is_err() || stdout.write_all(b"\n").await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
        }
    });
    let bridge = Arc::new(Bridge {
        http: client(),
        url,
        token: profile.token.clone(),
        out,
        state: Mutex::new(State::default()),
    });
    let mut stdin = BufReader::with_capacity(64 * 1024, tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut stdin)
            .take(MAX_MESSAGE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| Fail::new(format!("reading standard input failed: {e}")))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') && n as u64 >= MAX_MESSAGE as u64 {
            return Err(Fail::new(format!(
                "a message from the client exceeded {MAX_MESSAGE} bytes"
            )));
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        bridge.handle(std::mem::take(&mut line)).await;
    }
    // Answers to requests already sent still reach the client.
    let inflight = std::mem::take(
        &mut bridge
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
    if let Some(sid) = bridge.session() {
        let _ = bridge.send(hyper::Method::DELETE, None, Some(&sid)).await;
    }
    if let Some(t) = bridge
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_task
        .take()
    {
        t.abort();
    }
    drop(bridge);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

use tokio::io::AsyncReadExt;
