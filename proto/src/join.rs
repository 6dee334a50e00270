//! Joining the cluster and staying in it: a proxy or an agent trades its
//! join token and a signing request for an identity (a token and a
//! certificate from the cluster CA) once, keeps it (mode 0600) in its data
//! directory, and renews it at two thirds of its life.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use portico_core::identity::IdentityFile;
use portico_core::time::{format_rfc3339, now_ms, parse_rfc3339};
use portico_core::{Error, SystemRole};
use portico_tls::CertStore;
use tokio::sync::watch;

use crate::client::{AuthClient, Dial, connect};

/// What joining needs: where, with what, and where to keep the identity.
pub struct JoinParams<'a> {
    pub auth_server: &'a str,
    pub join_token: Option<&'a str>,
    pub join_token_file: Option<&'a Path>,
    pub host_id: Option<&'a str>,
    pub role: SystemRole,
    pub identity_path: PathBuf,
    /// `sha256:<hex>` of the cluster CA certificate (`pctl ca export`
    /// prints it); without it the first join trusts whoever answers.
    pub ca_pin: Option<&'a str>,
}

/// A service's identity in the cluster, renewed in place.
#[derive(Debug)]
pub struct Credentials {
    pub host_id: String,
    pub role: SystemRole,
    pub token: String,
    pub ca_pem: String,
    /// Our certificate and key; new connections use the newest.
    pub cert: Arc<CertStore>,
    expires_ms: AtomicI64,
    /// Where the identity is kept (none for services in the auth-service's
    /// own process, which get theirs issued at start).
    path: Option<PathBuf>,
    auth_server: String,
}

/// An identity an auth-service issued directly (to services in its own
/// process): token, certificate chain and key, the CA, the expiry.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub expires_ms: i64,
}

impl Credentials {
    /// An identity issued directly (services in the auth-service's process).
    pub fn issued(
        host_id: &str,
        role: SystemRole,
        issued: Issued,
        auth_server: &str,
    ) -> Result<Credentials, Error> {
        Ok(Credentials {
            host_id: host_id.to_string(),
            role,
            token: issued.token,
            cert: CertStore::new(&issued.cert_pem, &issued.key_pem).map_err(Error::internal)?,
            ca_pem: issued.ca_pem,
            expires_ms: AtomicI64::new(issued.expires_ms),
            path: None,
            auth_server: auth_server.to_string(),
        })
    }

    pub fn expires_ms(&self) -> i64 {
        self.expires_ms.load(Ordering::Relaxed)
    }

    /// How this service dials the auth-service at `addr` (mutual TLS).
    pub fn dial(&self, addr: &str) -> Result<Dial, Error> {
        Dial::cluster(addr, &self.ca_pem, Some(self.cert.clone())).map_err(Error::internal)
    }

    /// When to renew: two thirds into the certificate's life.
    fn renew_in(&self) -> Duration {
        let id = self.cert.id();
        let (start, end) = (id.not_before * 1000 + 60_000, id.not_after * 1000);
        let end = end.min(self.expires_ms());
        let life = (end - start).max(3_000);
        let at = end - life / 3;
        Duration::from_millis((at - now_ms()).max(0) as u64)
    }

    fn save(&self, key_pem: &str, cert_pem: &str) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let id = IdentityFile {
            auth_server: self.auth_server.clone(),
            principal: self.host_id.clone(),
            token: self.token.clone(),
            expires: Some(format_rfc3339(self.expires_ms())),
            ca: Some(self.ca_pem.clone()),
            cert: Some(cert_pem.to_string()),
            key: Some(key_pem.to_string()),
        };
        let text = yaml_serde::to_string(&id).map_err(|e| Error::internal(e.to_string()))?;
        crate::files::write_private(path, text.as_bytes()).map_err(|e| {
            Error::unavailable(format!(
                "cannot save the identity to {}: {e}",
                path.display()
            ))
        })
    }

    /// Renews once: a new key, signed over the current mutual TLS; the
    /// new certificate is saved and put in place.
    pub async fn renew(&self, api: &mut AuthClient) -> Result<(), Error> {
        let key = portico_tls::pki::new_key().map_err(Error::internal)?;
        let csr = portico_tls::pki::signing_request(&key).map_err(Error::internal)?;
        let resp = api
            .renew_identity(crate::v1::RenewIdentityRequest { csr_pem: csr })
            .await
            .map_err(|s| crate::convert::from_status(&s))?
            .into_inner();
        let key_pem = key.serialize_pem();
        let chain = format!("{}{}", resp.cert_pem, self.ca_pem);
        self.cert
            .replace(&chain, &key_pem)
            .map_err(Error::internal)?;
        self.expires_ms.store(resp.expires_ms, Ordering::Relaxed);
        self.save(&key_pem, &chain)?;
        tracing::info!(host_id = %self.host_id, expires = %format_rfc3339(resp.expires_ms), "renewed the identity");
        Ok(())
    }
}

/// Renews the identity at two thirds of its life until `stop`; a failed
/// renewal is tried again (every 2 to 30 s) while the identity lasts.
pub async fn renew_forever(
    creds: Arc<Credentials>,
    mut api: AuthClient,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            creds.renew_in()
        } else {
            Duration::from_millis((1000u64 << failures.min(5)).clamp(2_000, 30_000))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        match creds.renew(&mut api).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(host_id = %creds.host_id, error = %e.message, "cannot renew the identity; trying again");
            }
        }
    }
}

/// Loads a saved identity, or joins with the join token and saves the result (0600).
pub async fn load_or_join(p: JoinParams<'_>) -> Result<Credentials, Error> {
    if let Ok(text) = std::fs::read_to_string(&p.identity_path) {
        return load(&p, &text);
    }
    let section = p.role.config_section();
    let token = match (p.join_token, p.join_token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| {
                Error::bad_request(format!("{section}.join_token_file {}: {e}", f.display()))
            })?
            .trim()
            .to_string(),
        (None, None) => {
            return Err(Error::bad_request(format!(
                "{section}: no saved identity and no join_token or join_token_file; create one with pctl tokens add --type={}",
                p.role
            )));
        }
    };
    if p.ca_pin.is_none() {
        tracing::warn!(
            "{section}: joining without ca_pin trusts whichever auth-service answers at {}; set {section}.ca_pin to the pin pctl ca export prints",
            p.auth_server
        );
    }
    let dial = Dial::joining(p.auth_server, p.ca_pin).map_err(Error::bad_request)?;
    let mut client = connect(&dial, None).await.map_err(Error::unavailable)?;
    let key = portico_tls::pki::new_key().map_err(Error::internal)?;
    let csr = portico_tls::pki::signing_request(&key).map_err(Error::internal)?;
    let resp = client
        .join(crate::v1::JoinRequest {
            token,
            host_id: p.host_id.unwrap_or_default().to_string(),
            role: p.role.as_str().into(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| crate::convert::from_status(&s))?
        .into_inner();
    if let Some(pin) = p.ca_pin {
        let ca = portico_tls::pki::first_cert(&resp.ca_pem).map_err(Error::unavailable)?;
        if portico_tls::pki::ca_pin(&ca) != pin.trim().to_ascii_lowercase() {
            return Err(Error::unavailable(
                "the auth-service sent a CA other than the pinned one",
            ));
        }
    }
    let key_pem = key.serialize_pem();
    let chain = format!("{}{}", resp.cert_pem, resp.ca_pem);
    let creds = Credentials {
        host_id: resp.host_id.clone(),
        role: p.role,
        token: resp.identity_token,
        ca_pem: resp.ca_pem,
        cert: CertStore::new(&chain, &key_pem).map_err(Error::unavailable)?,
        expires_ms: AtomicI64::new(resp.expires_ms),
        path: Some(p.identity_path.clone()),
        auth_server: p.auth_server.to_string(),
    };
    creds.save(&key_pem, &chain)?;
    tracing::info!(host_id = %resp.host_id, role = %p.role, path = %p.identity_path.display(), "joined the cluster");
    Ok(creds)
}

fn load(p: &JoinParams<'_>, text: &str) -> Result<Credentials, Error> {
    let shown = p.identity_path.display();
    let id: IdentityFile = yaml_serde::from_str(text)
        .map_err(|e| Error::bad_request(format!("{shown} is not an identity file: {e}")))?;
    let (Some(ca), Some(cert), Some(key)) = (id.ca, id.cert, id.key) else {
        return Err(Error::bad_request(format!(
            "{shown} holds an identity without a certificate (from a version before TLS); remove it and join again with a new join token"
        )));
    };
    let expires = id.expires.as_deref().and_then(parse_rfc3339).unwrap_or(0);
    if expires <= now_ms() {
        return Err(Error::bad_request(format!(
            "the identity in {shown} expired; remove it and join again with a new join token (pctl tokens add --type={})",
            p.role
        )));
    }
    let store =
        CertStore::new(&cert, &key).map_err(|e| Error::bad_request(format!("{shown}: {e}")))?;
    Ok(Credentials {
        host_id: id.principal,
        role: p.role,
        token: id.token,
        ca_pem: ca,
        cert: store,
        expires_ms: AtomicI64::new(expires),
        path: Some(p.identity_path.clone()),
        auth_server: id.auth_server,
    })
}
