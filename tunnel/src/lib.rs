//! The reverse tunnel. Agents dial each proxy's tunnel listener over mutual
//! TLS (each side's certificate from the cluster CA, checked for its role
//! and host id), and authenticate with a one-line handshake carrying their
//! identity token, which must name the same host as their certificate; the
//! connection then carries HTTP/2 with the proxy as client and the agent as
//! server, one stream per MCP session. Both sides live here; the proxy
//! mounts `TunnelServer`.
//!
//! An agent and a proxy in one process (the all-in-one) still connect and
//! authenticate this way, and the tunnel still tells whether the agent is
//! there; but the proxy then opens sessions by calling the agent's handler
//! directly (`Route::Local`), so that no message pays for HTTP/2, TLS and
//! TCP twice in one process. See `local`, and `direct` for how a stdio
//! session's messages then pass.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portico_tls::net::HandshakeSlot;
use portico_tls::{CertRole, PeerId};
use rand::Rng;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A body that streams frames from a channel.
pub type TunnelBody = BoxBody<Bytes, std::io::Error>;

pub const HANDSHAKE: &str = "PORTICO-TUNNEL/1";
/// A real agent sends its handshake at once; silence is not kept waiting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_HANDSHAKE_LINE: usize = 1024;
/// The proxy pings the tunnel (HTTP/2 PING) when it has read nothing for
/// this long...
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and gives it up when the ping is not answered in this: a killed agent
/// behind a connection left half-open is noticed within 3 s of the last
/// frame it sent.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The agent's side of the same: any frame read (the proxy's pings
/// included) moves its timer, so while the proxy pings every second the
/// agent never needs to, and an idle tunnel carries one ping and one pong a
/// second; a silent proxy is still noticed within 3 s.
const AGENT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(1500);
const AGENT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// The agent's TLS handshake must finish within this.
const TLS_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow control: each session's stream may hold 1 MiB unread, and the
/// connection as a whole as much as HTTP/2 allows, so that sessions whose
/// reader stalls cannot use up a window the others need.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Handshakes in progress at once from one address (a /64 for IPv6).
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Handshakes in progress at once; connections beyond are closed at accept,
/// so that silent connections cannot pile up while they wait to time out.
pub const MAX_HANDSHAKES: usize = 64;

/// Headers of a session request.
pub const H_APP: &str = "x-portico-app";
pub const H_SESSION: &str = "x-portico-session";
pub const H_USER: &str = "x-portico-user";
/// Trailer with the reason a session ended.
pub const T_END: &str = "x-portico-end-reason";

/// Full jitter exponential backoff: a random wait up to min(cap, base * 2^n).
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let max = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(128);
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during handshake",
            ));
        }
        if let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&chunk[..i]);
            r.consume(i + 1);
            break;
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        r.consume(n);
        if buf.len() > MAX_HANDSHAKE_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "handshake line too long",
            ));
        }
    }
    String::from_utf8(buf)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "handshake is not text"))
}

// ---- agent side ----

pub type Handler = Arc<
    dyn Fn(
            hyper::Request<TunnelBody>,
        ) -> Pin<Box<dyn Future<Output = hyper::Response<TunnelBody>> + Send>>
        + Send
        + Sync,
>;

/// The tunnel body of a request or response that came over HTTP/2.
pub fn boxed(body: Incoming) -> TunnelBody {
    use http_body_util::BodyExt;
    body.map_err(std::io::Error::other).boxed()
}

/// Agents of this process, by the local address of their tunnel's TCP
/// connection. A proxy of the same process that accepts a tunnel from that
/// very address, and authenticates it as the same host, reaches the agent
/// through its handler for as long as the tunnel lives. Nothing here can be
/// claimed from outside the process: an address is only found while this
/// process holds the socket bound to it.
pub mod queue;

pub mod direct;

mod local {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{LazyLock, Mutex};

    use super::Handler;

    static AGENTS: LazyLock<Mutex<HashMap<SocketAddr, (String, Handler)>>> =
        LazyLock::new(Mutex::default);

    fn canonical(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    fn agents() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, (String, Handler)>> {
        AGENTS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listed while it lives.
    pub struct Listed(SocketAddr);

    impl Drop for Listed {
        fn drop(&mut self) {
            agents().remove(&self.0);
        }
    }

    pub fn list(addr: SocketAddr, host_id: &str, handler: Handler) -> Listed {
        let addr = canonical(addr);
        agents().insert(addr, (host_id.to_string(), handler));
        Listed(addr)
    }

    /// The handler of the agent of this process whose tunnel comes from
    /// `peer`, if it is `host_id`.
    pub fn find(peer: SocketAddr, host_id: &str) -> Option<Handler> {
        agents()
            .get(&canonical(peer))
            .filter(|(h, _)| h == host_id)
            .map(|(_, handler)| handler.clone())
    }
}

/// Keeps one tunnel to `addr` up until `stop` turns true, reconnecting with backoff.
pub async fn dial_forever(
    addr: String,
    token: String,
    host_id: String,
    tls: Arc<ClientConfig>,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = dial_once(&addr, &token, &host_id, &tls, handler.clone()) => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(()) => tracing::info!(proxy = %addr, "tunnel closed"),
            Err(e) => tracing::warn!(proxy = %addr, error = %e, "tunnel failed"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        let wait = backoff(attempt, Duration::from_millis(200), Duration::from_secs(15));
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The agent's TLS client configuration for tunnels: its own certificate,
/// proxies verified against the cluster CA.
pub fn agent_tls(
    cert: Arc<portico_tls::CertStore>,
    ca_pem: &str,
) -> Result<Arc<ClientConfig>, String> {
    portico_tls::config::cluster_client(Some(cert), ca_pem, &[portico_tls::ALPN_TUNNEL])
}

async fn dial_once(
    addr: &str,
    token: &str,
    host_id: &str,
    tls: &Arc<ClientConfig>,
    handler: Handler,
) -> Result<(), String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    // A proxy of this process may reach this agent directly while the
    // tunnel lives.
    let _listed = stream
        .local_addr()
        .ok()
        .map(|a| local::list(a, host_id, handler.clone()));
    // Nothing is sent before the proxy has proved, with a certificate from
    // the cluster CA, that it is a proxy.
    let stream = tokio::time::timeout(
        portico_tls::net::HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(portico_tls::config::role_name(CertRole::Proxy), stream),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    match portico_tls::config::peer_of(stream.get_ref().1.peer_certificates()) {
        Some(PeerId {
            role: CertRole::Proxy,
            ..
        }) => {}
        _ => return Err("the server at the tunnel address is not a proxy of this cluster".into()),
    }
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(format!("{HANDSHAKE} {token}\n").as_bytes())
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let reply = tokio::time::timeout(Duration::from_secs(15), read_line_bounded(&mut stream))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    if let Some(msg) = reply.strip_prefix("ERR ") {
        return Err(format!("the proxy refused the tunnel: {msg}"));
    }
    let Some(host) = reply.strip_prefix("OK ") else {
        return Err("the proxy sent an unexpected handshake reply".into());
    };
    tracing::info!(proxy = %addr, host_id = host, "tunnel established");
    // The proxy's HTTP/2 preface may already sit in the buffer: keep reading through it.
    let io = TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req.map(boxed)).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(AGENT_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(AGENT_KEEP_ALIVE_TIMEOUT)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(10_000)
        .serve_connection(io, svc)
        .await
        .map_err(|e| format!("tunnel connection: {e}"))
}

// ---- proxy side ----

pub type Sender = hyper::client::conn::http2::SendRequest<TunnelBody>;

/// Decides whether a dialling agent's token is good; returns its host id.
pub type Authenticator = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<String, Refusal>> + Send>> + Send + Sync,
>;

/// Checks many agents' tokens at once: per token, the host id it names now
/// or why it is refused; `Err` when they cannot be checked now.
pub type BatchChecker = Arc<
    dyn Fn(
            Vec<String>,
        )
            -> Pin<Box<dyn Future<Output = Result<Vec<Result<String, String>>, String>> + Send>>
        + Send
        + Sync,
>;

/// Why an agent's token was not accepted.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The identity is not (or no longer) valid: the tunnel must close.
    Refused(String),
    /// It could not be checked now (the auth-service is away).
    Unavailable(String),
}

impl Refusal {
    fn message(&self) -> &str {
        match self {
            Refusal::Refused(m) | Refusal::Unavailable(m) => m,
        }
    }
}

/// How the proxy reaches a connected agent.
#[derive(Clone)]
pub enum Route {
    /// A stream on the agent's HTTP/2 tunnel.
    Remote(Sender),
    /// The agent runs in this process: its handler, and what turns when
    /// its tunnel closes (the sessions opened this way end then, as the
    /// tunnel's own streams would).
    Local(Handler, watch::Receiver<()>),
}

#[derive(Clone)]
struct Conn {
    id: u64,
    sender: Sender,
    /// The agent is in this process (see `local`).
    local: Option<(Handler, watch::Receiver<()>)>,
    /// The token it authenticated with, checked again while it is open.
    token: String,
    /// Closes the connection (its identity was revoked).
    kill: Arc<tokio::sync::Notify>,
}

/// The agents currently connected to this proxy.
pub struct TunnelServer {
    agents: RwLock<HashMap<String, Vec<Conn>>>,
    next_id: AtomicU64,
    changed: tokio::sync::Notify,
    handshakes: Arc<tokio::sync::Semaphore>,
    handshakes_from: Arc<Mutex<HashMap<String, usize>>>,
}

impl Default for TunnelServer {
    fn default() -> Self {
        TunnelServer {
            agents: RwLock::default(),
            next_id: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            handshakes_from: Arc::default(),
        }
    }
}

impl TunnelServer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// How to reach the agent, if it is connected.
    pub fn route(&self, host_id: &str) -> Option<Route> {
        let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
        let c = agents
            .get(host_id)?
            .iter()
            .rev()
            .find(|c| !c.sender.is_closed())?;
        Some(match &c.local {
            Some((h, gone)) => Route::Local(h.clone(), gone.clone()),
            None => Route::Remote(c.sender.clone()),
        })
    }

    pub fn is_connected(&self, host_id: &str) -> bool {
        self.route(host_id).is_some()
    }

    pub fn connected(&self) -> Vec<String> {
        let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
        agents.keys().cloned().collect()
    }

    /// Resolves on the next connect or disconnect.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Checks every connected agent's identity again every `every`, and
    /// closes the tunnels of those no longer valid (revoked, expired, or now
    /// naming another host). An auth-service that cannot answer closes
    /// nothing.
    pub async fn revalidate(
        self: Arc<Self>,
        check: BatchChecker,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let conns: Vec<(String, Conn)> = {
                let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
                agents
                    .iter()
                    .flat_map(|(h, cs)| cs.iter().map(|c| (h.clone(), c.clone())))
                    .collect()
            };
            if conns.is_empty() {
                continue;
            }
            // One call for every tunnel. The identity's token lives as long
            // as its newest certificate: a tunnel opened with an older one
            // stays up across renewals and closes when the identity expires
            // or is revoked.
            let tokens = conns.iter().map(|(_, c)| c.token.clone()).collect();
            let verdicts = match tokio::time::timeout(Duration::from_secs(2), check(tokens)).await {
                Ok(Ok(v)) if v.len() == conns.len() => v,
                // Not checkable now (the auth-service is away): ask again.
                _ => continue,
            };
            for ((host, conn), verdict) in conns.into_iter().zip(verdicts) {
                let why = match verdict {
                    Ok(h) if h == host => continue,
                    Ok(h) => format!("the identity now names host {h:?}"),
                    Err(m) => m,
                };
                tracing::warn!(host_id = %host, reason = %why, "closing the tunnel of an agent whose identity is no longer valid");
                conn.kill.notify_one();
            }
        }
    }

    /// Accepts agents until `stop` turns true.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        auth: Authenticator,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = self.handshakes.clone().try_acquire_owned() else {
                tracing::warn!(peer = %peer, max = MAX_HANDSHAKES, "too many tunnel handshakes in progress; closed a new connection");
                continue;
            };
            let Some(slot) = HandshakeSlot::take(
                &self.handshakes_from,
                peer.ip(),
                slot,
                MAX_HANDSHAKES_PER_ADDRESS,
            ) else {
                tracing::warn!(peer = %peer, max = MAX_HANDSHAKES_PER_ADDRESS, "too many tunnel handshakes from one address; closed a new connection");
                continue;
            };
            let me = self.clone();
            let auth = auth.clone();
            let stop = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle(stream, peer, tls, auth, stop, slot).await {
                    tracing::warn!(peer = %peer, error = %e, "tunnel from agent ended");
                }
            });
        }
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        tls: Arc<ServerConfig>,
        auth: Authenticator,
        mut stop: watch::Receiver<bool>,
        slot: HandshakeSlot,
    ) -> Result<(), String> {
        // An agent completes TLS at once; a silent peer is not waited on long.
        let stream = tokio::time::timeout(
            TLS_TIMEOUT,
            portico_tls::net::accept(
                stream,
                tls,
                portico_tls::Plaintext::Refuse("the agent tunnel"),
            ),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
        let cert = match stream.info.id.clone() {
            Some(id) if id.role == CertRole::App => id,
            Some(id) => {
                return Err(format!(
                    "a {} certificate is not an agent's; tunnel refused",
                    id.role
                ));
            }
            None => return Err("no agent certificate; tunnel refused".into()),
        };
        let mut stream = BufReader::new(stream);
        let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line_bounded(&mut stream))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let token = match line.split_once(' ') {
            Some((HANDSHAKE, t)) if !t.is_empty() => t.to_string(),
            _ => {
                let _ = stream.get_mut().write_all(b"ERR unknown protocol\n").await;
                return Err("not a tunnel handshake".into());
            }
        };
        let host_id = match tokio::time::timeout(Duration::from_secs(10), auth(token.clone())).await
        {
            Ok(Ok(h)) if h == cert.host_id => h,
            Ok(Ok(h)) => {
                let msg = format!(
                    "the identity names host {h:?} but the certificate names {:?}",
                    cert.host_id
                );
                let _ = stream
                    .get_mut()
                    .write_all(format!("ERR {msg}\n").as_bytes())
                    .await;
                return Err(format!("agent refused: {msg}"));
            }
            Ok(Err(refusal)) => {
                let msg = refusal.message().replace('\n', " ");
                let _ = stream
                    .get_mut()
                    .write_all(format!("ERR {msg}\n").as_bytes())
                    .await;
                return Err(format!("agent refused: {msg}"));
            }
            Err(_) => {
                let _ = stream
                    .get_mut()
                    .write_all(b"ERR authentication timed out\n")
                    .await;
                return Err("agent authentication timed out".into());
            }
        };
        stream
            .get_mut()
            .write_all(format!("OK {host_id}\n").as_bytes())
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let io = TokioIo::new(stream);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, TunnelBody>(io)
            .await
            .map_err(|e| format!("http/2 handshake: {e}"))?;
        // The handshake is over: its slot goes to the next agent.
        drop(slot);
        let kill = Arc::new(tokio::sync::Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Dropped when this tunnel ends: sessions routed in-process end too.
        let (_alive, gone) = watch::channel(());
        let local = local::find(peer, &host_id).map(|h| (h, gone));
        if local.is_some() {
            tracing::info!(host_id = %host_id, "the agent runs in this process; its sessions are opened directly");
        }
        {
            let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
            agents.entry(host_id.clone()).or_default().push(Conn {
                id,
                sender,
                local,
                token: token.clone(),
                kill: kill.clone(),
            });
        }
        self.changed.notify_waiters();
        tracing::info!(host_id = %host_id, "agent connected");
        let result = tokio::select! {
            r = conn => r.map_err(|e| format!("tunnel connection: {e}")),
            _ = stop.changed() => Ok(()),
            _ = kill.notified() => Err("the agent's identity is no longer valid; tunnel closed".to_string()),
        };
        {
            let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = agents.get_mut(&host_id) {
                list.retain(|c| c.id != id);
                if list.is_empty() {
                    agents.remove(&host_id);
                }
            }
        }
        self.changed.notify_waiters();
        tracing::info!(host_id = %host_id, "agent disconnected");
        result
    }
}
