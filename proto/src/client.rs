//! Connecting to the auth-service API (directly, or through a proxy's web
//! port) with a bearer token, over TLS, with timeouts on every network wait.

use std::sync::Arc;
use std::time::Duration;

use portico_tls::{CertRole, CertStore, Connector, Trust};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::AuthServiceClient;

/// The metadata a proxy sets on the calls it forwards: the IP address of the
/// client it forwards for. The auth-service reads it only from callers that
/// present a proxy's certificate.
pub const CLIENT_ADDR_HEADER: &str = "x-portico-client-addr";

#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AuthClient = AuthServiceClient<InterceptedService<Channel, Bearer>>;

/// What `EmitEvents` returns, without the gRPC on either side.
pub type EmitFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'a>>;

/// An auth-service in the caller's own process, to which a service hands
/// its audit events directly: the same checks and storage as `EmitEvents`,
/// with no gRPC, HTTP/2 or TLS between them. `actor` is the service's own
/// name (its identity's host id): in one process there is no certificate
/// or token to take it from.
pub trait LocalAudit: Send + Sync {
    fn emit<'a>(
        &'a self,
        actor: &'a str,
        events: &'a [crate::v1::EmitEventRequest],
    ) -> EmitFuture<'a>;
}

/// Where an API is and how its server is trusted.
#[derive(Clone)]
pub struct Dial {
    addr: String,
    connector: Connector,
}

/// `host:port` of an address that may be written as a URL, and whether it
/// said `http://` (plain).
fn split_url(addr: &str) -> (String, bool) {
    let a = addr.trim().trim_end_matches('/');
    if let Some(rest) = a.strip_prefix("https://") {
        (rest.to_string(), false)
    } else if let Some(rest) = a.strip_prefix("http://") {
        (rest.to_string(), true)
    } else {
        (a.to_string(), false)
    }
}

impl Dial {
    /// The cluster's auth-service: verified against the cluster CA as the
    /// auth role (whatever address is dialled), presenting `cert` if given.
    pub fn cluster(addr: &str, ca_pem: &str, cert: Option<Arc<CertStore>>) -> Result<Dial, String> {
        let (addr, _) = split_url(addr);
        let cfg = portico_tls::config::cluster_client(cert, ca_pem, &[portico_tls::ALPN_H2])?;
        Ok(Dial {
            connector: Connector::tls(cfg)
                .with_server_name(portico_tls::config::role_name(CertRole::Auth))
                .with_addr(addr.clone()),
            addr,
        })
    }

    /// A server trusted as `trust` says, under the name dialled (a proxy's
    /// web port). An `http://` address is dialled without TLS.
    pub fn trusting(addr: &str, trust: &Trust) -> Result<Dial, String> {
        let (addr, plain) = split_url(addr);
        if plain {
            return Ok(Dial::plain(&addr));
        }
        let cfg = portico_tls::config::client_for(trust, &[portico_tls::ALPN_H2])?;
        Ok(Dial {
            connector: Connector::tls(cfg).with_addr(addr.clone()),
            addr,
        })
    }

    /// The auth-service, before joining: trusted by the CA pin when one is
    /// given, otherwise not at all (the caller says so in its log).
    pub fn joining(addr: &str, ca_pin: Option<&str>) -> Result<Dial, String> {
        let trust = match ca_pin {
            Some(p) => Trust::CaPin(p.trim().to_ascii_lowercase()),
            None => Trust::Insecure,
        };
        let (addr, _) = split_url(addr);
        let cfg = portico_tls::config::client_for(&trust, &[portico_tls::ALPN_H2])?;
        Ok(Dial {
            connector: Connector::tls(cfg)
                .with_server_name(portico_tls::config::role_name(CertRole::Auth))
                .with_addr(addr.clone()),
            addr,
        })
    }

    /// Plain TCP (a proxy behind a TLS terminator, on a private network).
    pub fn plain(addr: &str) -> Dial {
        let (addr, _) = split_url(addr);
        Dial {
            connector: Connector::plain().with_addr(addr.clone()),
            addr,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn endpoint(&self) -> Result<Endpoint, String> {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| format!("invalid address {:?}: {e}", self.addr))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true)
            })
    }
}

/// A client over an existing channel that sends `token` with every call.
pub fn with_token(channel: Channel, token: Option<&str>) -> Result<AuthClient, String> {
    let value = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<AsciiMetadataValue>()
                .map_err(|_| "the token holds characters that cannot be sent".to_string())?,
        ),
        None => None,
    };
    Ok(AuthServiceClient::with_interceptor(channel, Bearer(value))
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(8 * 1024 * 1024))
}

/// Connects now; fails fast if nothing answers or the server is not trusted.
pub async fn connect(dial: &Dial, token: Option<&str>) -> Result<AuthClient, String> {
    let ch = dial
        .endpoint()?
        .connect_with_connector(dial.connector.clone())
        .await
        .map_err(|e| format!("cannot reach {}: {}", dial.addr, source_text(&e)))?;
    with_token(ch, token)
}

/// A client that connects on first use and reconnects after failures.
pub fn connect_lazy(dial: &Dial, token: Option<&str>) -> Result<AuthClient, String> {
    with_token(channel_lazy(dial)?, token)
}

/// A channel that connects on first use and reconnects after failures.
pub fn channel_lazy(dial: &Dial) -> Result<Channel, String> {
    Ok(dial
        .endpoint()?
        .connect_with_connector_lazy(dial.connector.clone()))
}

/// The innermost cause of an error, which is the one people understand.
pub fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
