//! Connecting to the auth-service API (directly or through a proxy) with a
//! bearer token, with timeouts on every network wait.

use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::AuthServiceClient;

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

/// Turns `host:port` (or a URL) into an endpoint URL.
pub fn endpoint_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Endpoint::from_shared(endpoint_url(addr))
        .map_err(|e| format!("invalid address {addr:?}: {e}"))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
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

/// Connects now; fails fast if nothing answers.
pub async fn connect(addr: &str, token: Option<&str>) -> Result<AuthClient, String> {
    let ch = endpoint(addr)?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {addr}: {}", source_text(&e)))?;
    with_token(ch, token)
}

/// A client that connects on first use and reconnects after failures.
pub fn connect_lazy(addr: &str, token: Option<&str>) -> Result<AuthClient, String> {
    with_token(endpoint(addr)?.connect_lazy(), token)
}

/// A channel that connects on first use and reconnects after failures.
pub fn channel_lazy(addr: &str) -> Result<Channel, String> {
    Ok(endpoint(addr)?.connect_lazy())
}

/// The innermost cause of an error, which is the one people understand.
pub fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
