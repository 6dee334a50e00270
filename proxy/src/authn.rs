//! Who is calling the proxy: bearer tokens resolved by the auth-service and
//! remembered briefly; the user's existence and roles always come from the
//! live cache, so deletions and role changes apply to the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_core::time::now_ms;
use portico_core::{Error, PrincipalType};
use portico_proto::client::with_token;
use portico_proto::v1::WhoAmIRequest;
use tonic::transport::Channel;

/// How long a resolved token is trusted before asking again.
const TOKEN_TTL: Duration = Duration::from_secs(10);
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub ptype: PrincipalType,
    pub roles: Vec<String>,
    pub expires_ms: i64,
}

pub struct Authenticator {
    channel: Channel,
    cache: Mutex<HashMap<String, (Arc<Caller>, Instant)>>,
}

impl Authenticator {
    pub fn new(channel: Channel) -> Self {
        Authenticator {
            channel,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caller a token names (shared: one copy per cached token).
    pub async fn resolve(&self, token: &str) -> Result<Arc<Caller>, Error> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((c, at)) = cache.get(token)
                && at.elapsed() < TOKEN_TTL
                && (c.expires_ms == 0 || c.expires_ms > now_ms())
            {
                return Ok(c.clone());
            }
        }
        let mut client =
            with_token(self.channel.clone(), Some(token)).map_err(Error::unauthenticated)?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.who_am_i(WhoAmIRequest {}))
            .await
            .map_err(|_| Error::unavailable("the auth service did not answer in time"))?
            .map_err(|s| portico_proto::convert::from_status(&s))?
            .into_inner();
        let caller = Arc::new(Caller {
            name: resp.name,
            ptype: PrincipalType::parse(&resp.principal_type).ok_or_else(|| {
                Error::unauthenticated("the auth service named an unknown kind of caller")
            })?,
            roles: resp.roles,
            expires_ms: resp.expires_ms,
        });
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }
}

impl Authenticator {
    /// Forgets a token at once (its login ended here).
    pub fn forget(&self, token: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
    }
}

/// `Authorization: Bearer <token>` from HTTP headers.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?
        .trim();
    (!t.is_empty() && t.len() <= 256).then_some(t)
}
