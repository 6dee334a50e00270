//! How tests reach a proxy's web listener: over HTTPS, trusting the
//! certificate the proxy made for itself (registered when it started), or
//! plain HTTP for a proxy started with `plain_http`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use portico_proxy::Proxy;
use portico_tls::{Connector, Trust};

struct Web {
    cert_pem: String,
    cert_file: PathBuf,
}

fn table() -> &'static Mutex<HashMap<SocketAddr, Web>> {
    static T: OnceLock<Mutex<HashMap<SocketAddr, Web>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Remembers a started proxy's web certificate for the clients of its address.
pub fn register(p: &Proxy) {
    if let Some(file) = &p.web_cert_file {
        let cert_pem = std::fs::read_to_string(file).expect("web certificate readable");
        table().lock().unwrap_or_else(|e| e.into_inner()).insert(
            p.web_addr,
            Web {
                cert_pem,
                cert_file: file.clone(),
            },
        );
    }
}

/// Remembers the certificate file of a proxy started as a process.
pub fn register_file(addr: SocketAddr, file: PathBuf) {
    let cert_pem = std::fs::read_to_string(&file).expect("web certificate readable");
    table().lock().unwrap_or_else(|e| e.into_inner()).insert(
        addr,
        Web {
            cert_pem,
            cert_file: file,
        },
    );
}

/// The proxy's self-signed certificate file, when it has one.
pub fn cert_file(addr: SocketAddr) -> Option<PathBuf> {
    table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&addr)
        .map(|w| w.cert_file.clone())
}

/// How a client trusts the proxy at `addr`; None: it speaks plain HTTP.
pub fn trust(addr: SocketAddr) -> Option<Trust> {
    table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&addr)
        .map(|w| Trust::Roots(w.cert_pem.clone()))
}

/// `https://addr` or `http://addr`.
pub fn base(addr: SocketAddr) -> String {
    match trust(addr) {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

/// A connector for the proxy at `addr`.
pub fn connector(addr: SocketAddr) -> Connector {
    match trust(addr) {
        Some(t) => Connector::tls(
            portico_tls::config::client_for(&t, &[b"h2", b"http/1.1"]).expect("client config"),
        ),
        None => Connector::plain(),
    }
}

/// A connector for the proxy at `addr` that offers HTTP/1.1 only, as most
/// MCP clients' HTTP stacks do (httpx, Node's fetch).
pub fn connector_h1(addr: SocketAddr) -> Connector {
    match trust(addr) {
        Some(t) => Connector::tls(
            portico_tls::config::client_for(&t, &[b"http/1.1"]).expect("client config"),
        ),
        None => Connector::plain(),
    }
}

/// A connection to the proxy's web port speaking HTTP/1.1 (for raw requests).
pub async fn stream(addr: SocketAddr) -> Box<dyn portico_tls::net::TokioStream> {
    stream_alpn(addr, &[b"http/1.1"]).await
}

/// A connection to the proxy's web port offering `alpn` in the TLS handshake.
pub async fn stream_alpn(
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> Box<dyn portico_tls::net::TokioStream> {
    let c = match trust(addr) {
        Some(t) => {
            Connector::tls(portico_tls::config::client_for(&t, alpn).expect("client config"))
        }
        None => Connector::plain(),
    };
    c.connect(&addr.to_string())
        .await
        .expect("web connects")
        .into_tokio()
}

/// Sets what Node and Python clients need to trust the proxy at `addr`.
pub fn trust_env(cmd: &mut tokio::process::Command, addr: SocketAddr) {
    if let Some(f) = cert_file(addr) {
        cmd.env("NODE_EXTRA_CA_CERTS", &f)
            .env("SSL_CERT_FILE", &f)
            .env("REQUESTS_CA_BUNDLE", &f);
    }
}

/// The status of `GET https://addr/path` without verifying the server
/// (health probes of services whose certificates the test did not keep).
pub async fn probe(addr: &str, path: &str) -> Option<u16> {
    let cfg = portico_tls::config::client_for(&Trust::Insecure, &[b"http/1.1"]).ok()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(Connector::tls(cfg));
    let uri: http::Uri = format!("https://{addr}{path}").parse().ok()?;
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(uri))
        .await
        .ok()?
        .ok()?;
    Some(r.status().as_u16())
}
