//! The web listener's accept loop: a cap on open connections, a bound on
//! how long request headers (and an idle keep-alive connection) may take,
//! HTTP/2 keep-alive pings, `TCP_NODELAY`, the peer's address for handlers,
//! and a graceful stop that lets answers in flight finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use portico_tls::net::PerAddress;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// Bounds on what one client can hold.
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Open connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Open connections from one address (a /64 for IPv6) at once; 0: no
    /// limit (behind a TLS terminator every client shares its address).
    pub max_per_address: usize,
    /// Time to send a request's headers, and the most an idle HTTP/1
    /// keep-alive connection is kept.
    pub header_timeout: Duration,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            max_connections: 4096,
            max_per_address: 512,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `stop` turns true, then waits up to `drain` for open connections to
/// finish. MCP requests on a plain `/mcp/{app}` path go from the
/// connection to `mcp::serve_request` without the router: the router's
/// matching, its middleware and its extractors were a twentieth of the
/// proxy's CPU per relayed call (`docs/perf/README.md`).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    state: Arc<crate::ProxyState>,
    router: Router,
    limits: WebLimits,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    // The HTTP/2 settings of both builders below (two types, one set of
    // settings).
    macro_rules! http2_settings {
        ($b:expr) => {
            $b.timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10))
                .max_header_list_size(64 * 1024)
                // Every answer gets `date_header` instead.
                .auto_date_header(false)
        };
    }
    http2_settings!(builder.http2());
    // HTTP/2 over TLS is served by hyper's HTTP/2 server itself, to set what
    // the builder above cannot: no HPACK dynamic table for what clients
    // send. h2 decodes header strings into a 4 KiB buffer per connection
    // and the table keeps slices of it (the bearer token, the session id)
    // for the connection's life, so every connection pinned its first
    // buffer and took a second one after some 45 requests: 4 MiB for 1,000
    // connections, reached minutes into a run. Without the table a client
    // sends those headers in full each time, as over HTTP/1.1, and the
    // buffer is reused. A plain connection that opens with HTTP/2's preface
    // (prior knowledge, behind a TLS terminator) is served by it too. A TLS
    // client that chose no ALPN still reaches the builder above, which
    // tells the two protocols apart by their bytes.
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2_settings!(h2).header_table_size(0);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "web accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, max = limits.max_connections, "too many open connections; closed a new one");
            continue;
        };
        let Some(mine) = PerAddress::take(&per_address, peer.ip(), limits.max_per_address) else {
            tracing::warn!(peer = %peer, max = limits.max_per_address, "too many open connections from one address; closed a new one");
            continue;
        };
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Small JSON-RPC messages must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let app = router.clone();
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let mcp = crate::mcp::plain_app(req.uri().path())
                .map(|name| (state.clone(), name.to_string()));
            let router = app.clone();
            async move {
                let req = req.map(axum::body::Body::new);
                let mut resp = match mcp {
                    Some((state, name)) => crate::mcp::serve_request(state, peer, name, req).await,
                    None => {
                        let mut req = req;
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        router.oneshot(req).await?
                    }
                };
                resp.headers_mut()
                    .entry(http::header::DATE)
                    .or_insert_with(date_header);
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let h2 = h2.clone();
        let tls = tls.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _held = (slot, mine);
            let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match tls {
                None => match opens_h2(tcp, header_timeout).await {
                    // Nothing in time: the connection is closed.
                    None => return,
                    Some((true, stream)) => {
                        let conn = h2.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn).await.map_err(Into::into)
                    }
                    Some((false, stream)) => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                },
                Some(cfg) => {
                    let stream = match portico_tls::net::accept(
                        tcp,
                        cfg,
                        portico_tls::Plaintext::Redirect,
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(peer = %peer, error = %e, "web TLS handshake failed");
                            return;
                        }
                    };
                    if stream.is_h2() {
                        let conn = h2.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn).await.map_err(Into::into)
                    } else {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "web connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some web connections were still open at shutdown");
    }
}

/// A plain connection after `opens_h2`: the bytes it read, then the rest
/// of the stream; writes go to the stream.
type Replayed = tokio::io::Join<
    tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
>;

/// Reads the first bytes of a plain connection, as far as needed to tell
/// whether they open HTTP/2's connection preface (`PRI * HTTP/2.0`, sent
/// by a client with prior knowledge); `None` if they do not come within
/// `within`. The bytes read are read again first from the returned stream.
async fn opens_h2(mut tcp: tokio::net::TcpStream, within: Duration) -> Option<(bool, Replayed)> {
    use tokio::io::AsyncReadExt;
    const PRI: &[u8] = b"PRI ";
    let mut first = [0u8; 4];
    let mut n = 0;
    let h2 = tokio::time::timeout(within, async {
        loop {
            let got = tcp.read(&mut first[n..]).await.ok()?;
            n += got;
            // The end of the stream, or a request line that is not the
            // preface: the HTTP/1 server answers either.
            if got == 0 || first[..n] != PRI[..n] {
                return Some(false);
            }
            if n == PRI.len() {
                return Some(true);
            }
        }
    })
    .await
    .ok()
    .flatten()?;
    let (read, write) = tcp.into_split();
    let read = std::io::Cursor::new(first[..n].to_vec()).chain(read);
    Some((h2, tokio::io::join(read, write)))
}

/// The `Date` header (RFC 9110 asks it of every answer), marked never to be
/// indexed: its value changes every second, and HTTP/2's header compression
/// would otherwise add each new value to the connection's table, so that
/// every open connection's table fills up (to 4 KB) over many minutes; with
/// thousands of connections that is megabytes of slow growth.
fn date_header() -> http::HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, Option<http::HeaderValue>)> =
            const { std::cell::RefCell::new((i64::MIN, None)) };
    }
    let now = portico_core::time::now_ms();
    let second = now.div_euclid(1000);
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != second || last.1.is_none() {
            let mut v = http::HeaderValue::from_str(&portico_core::time::format_http_date(now))
                .unwrap_or_else(|_| {
                    http::HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT")
                });
            v.set_sensitive(true);
            *last = (second, Some(v));
        }
        last.1
            .clone()
            .unwrap_or_else(|| http::HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
    })
}
