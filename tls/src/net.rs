//! TLS on sockets: a listener's accepted connections (handshakes in
//! parallel, bounded in number and time, plaintext answered with a clear
//! refusal) and a connector for tonic channels and hyper clients.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::peer_of;
use crate::pki::PeerId;

/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on one listener; more are closed at accept.
pub const MAX_HANDSHAKES: usize = 256;

/// Handshakes in progress at once from one address (a /64 for IPv6); more
/// are closed at accept, so that one party's silent connections cannot
/// take every slot while they wait to time out. Clients of the
/// auth-service open few connections, briefly; the all-in-one's proxy
/// and agent share one loopback address with every local `pctl`.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The identity in the client's certificate, when it sent one the
    /// cluster CA signed.
    pub id: Option<PeerId>,
}

/// An accepted TLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    pub info: PeerInfo,
}

impl TlsConn {
    /// Whether the client chose HTTP/2 in the handshake (ALPN `h2`).
    pub fn is_h2(&self) -> bool {
        self.stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// What a listener tells a client that did not start with TLS.
#[derive(Debug, Clone, Copy)]
pub enum Plaintext {
    /// A cluster port: a short refusal.
    Refuse(&'static str),
    /// The web port: browsers asking for a page are redirected to
    /// `https://`, everyone else gets a refusal naming it.
    Redirect,
}

/// Reads at most 8 KiB of a plaintext request head (2 s), then answers it.
async fn answer_plaintext(mut stream: TcpStream, how: Plaintext) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 1024];
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&head);
    let reply = match how {
        Plaintext::Refuse(what) => {
            let body =
                format!("this port speaks TLS only ({what}); plain connections are refused\n");
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Plaintext::Redirect => {
            let mut lines = text.split("\r\n");
            let first = lines.next().unwrap_or("");
            let mut parts = first.split(' ');
            let method = parts.next().unwrap_or("");
            let path = parts.next().unwrap_or("/");
            let host = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.trim().to_string())
                .filter(|h| {
                    !h.is_empty()
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                });
            let safe_path = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
            match host {
                Some(h) if (method == "GET" || method == "HEAD") && safe_path => {
                    let body = format!("this port speaks HTTPS: https://{h}{path}\n");
                    format!(
                        "HTTP/1.1 308 Permanent Redirect\r\nlocation: https://{h}{path}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
                _ => {
                    let body = "this port speaks HTTPS only: use an https:// URL (plain HTTP is refused)\n";
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Waits for the client's first byte: TLS, or something to refuse.
/// `Ok(false)` means the connection was answered as plaintext and is done.
pub async fn starts_with_tls(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))??;
    Ok(n == 1 && first[0] == TLS_HANDSHAKE_RECORD)
}

/// Completes the server side of a handshake on an accepted connection, or
/// answers a plaintext client (an `Err` then).
pub async fn accept(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    plaintext: Plaintext,
) -> io::Result<TlsConn> {
    let remote = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if !starts_with_tls(&stream).await? {
        answer_plaintext(stream, plaintext).await;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a plaintext client was refused",
        ));
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let id = peer_of(tls.get_ref().1.peer_certificates());
    Ok(TlsConn {
        stream: tls,
        info: PeerInfo { remote, id },
    })
}

/// The accepted, handshaken connections of `listener`, as a stream for
/// tonic. Handshakes run in parallel (at most `MAX_HANDSHAKES`, and
/// `MAX_HANDSHAKES_PER_ADDRESS` from one network); failed ones are logged
/// and skipped. It ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    plaintext: Plaintext,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let from = Arc::<Mutex<HashMap<String, usize>>>::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Beyond the bounds a connection is closed, not queued: the
            // loop never waits, so silent peers cannot stop it accepting.
            let Ok(global) = slots.clone().try_acquire_owned() else {
                tracing::warn!(peer = %peer, max = MAX_HANDSHAKES, "too many TLS handshakes in progress; closed a new connection");
                continue;
            };
            let Some(slot) =
                HandshakeSlot::take(&from, peer.ip(), global, MAX_HANDSHAKES_PER_ADDRESS)
            else {
                tracing::warn!(peer = %peer, max = MAX_HANDSHAKES_PER_ADDRESS, "too many TLS handshakes from one address; closed a new connection");
                continue;
            };
            let tx = tx.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match accept(stream, config, plaintext).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The network one party controls: an IPv4 address, or the /64 of an IPv6 one.
pub fn network_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        other => other.to_canonical().to_string(),
    }
}

/// One thing in progress (a connection, a handshake) counted against its
/// network (`network_of`); uncounted on drop.
pub struct PerAddress {
    table: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl PerAddress {
    /// Counts one more for `ip`'s network, unless it has `max` already (0:
    /// no bound).
    pub fn take(
        table: &Arc<Mutex<HashMap<String, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<Self> {
        let key = network_of(ip);
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(key.clone()).or_default();
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(PerAddress {
            table: table.clone(),
            key,
        })
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

/// A handshake in progress, counted globally and against its address.
pub struct HandshakeSlot {
    _global: tokio::sync::OwnedSemaphorePermit,
    _address: PerAddress,
}

impl HandshakeSlot {
    /// Takes a slot for `ip` if its network has fewer than `max` in
    /// progress; `global` is the listener's own bound.
    pub fn take(
        table: &Arc<Mutex<HashMap<String, usize>>>,
        ip: std::net::IpAddr,
        global: tokio::sync::OwnedSemaphorePermit,
        max: usize,
    ) -> Option<Self> {
        Some(HandshakeSlot {
            _address: PerAddress::take(table, ip, max)?,
            _global: global,
        })
    }
}

// ---- client side ----

/// A connection a client opened: plain TCP or TLS over it.
pub enum ClientIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// A connection as a tokio stream (for raw reads and writes).
pub trait TokioStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TokioStream for T {}

impl ClientIo {
    /// The connection as a tokio stream.
    pub fn into_tokio(self) -> Box<dyn TokioStream> {
        match self {
            ClientIo::Plain(s) => Box::new(s.into_inner()),
            ClientIo::Tls(s) => Box::new(s.into_inner()),
        }
    }

    /// The server's certificate chain (TLS only).
    pub fn peer_certificates(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        match self {
            ClientIo::Plain(_) => None,
            ClientIo::Tls(t) => t
                .inner()
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
        }
    }
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for ClientIo {
    fn connected(&self) -> Connected {
        match self {
            ClientIo::Plain(_) => Connected::new(),
            ClientIo::Tls(t) => {
                if t.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

/// Opens connections for tonic channels and hyper clients: to the URI's
/// host and port (or a fixed address), with TLS when a configuration is
/// given, verifying `server_name` (or the URI's host).
#[derive(Clone)]
pub struct Connector {
    tls: Option<Arc<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    addr: Option<String>,
    local: Option<std::net::IpAddr>,
}

impl Connector {
    /// Plain TCP (a proxy behind a TLS terminator, benchmarks).
    pub fn plain() -> Self {
        Connector {
            tls: None,
            server_name: None,
            addr: None,
            local: None,
        }
    }

    pub fn tls(config: Arc<ClientConfig>) -> Self {
        Connector {
            tls: Some(config),
            server_name: None,
            addr: None,
            local: None,
        }
    }

    /// Verifies this name whatever address is dialled (cluster roles).
    pub fn with_server_name(mut self, name: ServerName<'static>) -> Self {
        self.server_name = Some(name);
        self
    }

    /// Dials this `host:port` whatever the URI says.
    pub fn with_addr(mut self, addr: impl Into<String>) -> Self {
        self.addr = Some(addr.into());
        self
    }

    /// Connects from this local address (tests that play a second source).
    pub fn with_local_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.local = Some(ip);
        self
    }

    async fn tcp(&self, addr: &str) -> io::Result<TcpStream> {
        let Some(local) = self.local else {
            return TcpStream::connect(addr).await;
        };
        let target = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{addr} has no address"))
        })?;
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(local, 0))?;
        socket.connect(target).await
    }

    /// Connects to `addr` (`host:port`).
    pub async fn connect(&self, addr: &str) -> io::Result<ClientIo> {
        let tcp = tokio::time::timeout(Duration::from_secs(5), self.tcp(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                )
            })??;
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = &self.tls else {
            return Ok(ClientIo::Plain(TokioIo::new(tcp)));
        };
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => server_name_of(addr)?,
        };
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(cfg.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(ClientIo::Tls(Box::new(TokioIo::new(tls))))
    }
}

/// The host part of `host:port` (brackets around IPv6 removed) as a name
/// to verify.
pub fn server_name_of(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name"),
        )
    })
}

/// `host:port` of a URI, with the scheme's default port.
fn authority_of(uri: &http::Uri) -> io::Result<String> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the URL has no host"))?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = ClientIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let addr = match &me.addr {
                Some(a) => a.clone(),
                None => authority_of(&uri)?,
            };
            me.connect(&addr).await
        })
    }
}
