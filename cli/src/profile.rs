//! The `psh login` profile under `PORTICO_HOME` (default `~/.portico`), mode 0600.

use std::path::PathBuf;

use portico_core::time::{format_rfc3339, now_ms};
use serde::{Deserialize, Serialize};

use crate::{CliResult, Fail};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `host:port` of the proxy's web listener.
    pub proxy: String,
    pub user: String,
    pub token: String,
    pub expires_ms: i64,
    #[serde(default)]
    pub roles: Vec<String>,
    /// How the proxy is trusted: these CA certificates (PEM)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// ...or exactly the certificate with this SHA-256 (trusted on first
    /// use or given with --fingerprint)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// ...or not at all (--insecure); otherwise the system's roots.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("PORTICO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".portico")
}

pub fn path() -> PathBuf {
    home().join("profile.yaml")
}

impl Profile {
    pub fn load() -> CliResult<Option<Profile>> {
        let p = path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Fail::new(format!("cannot read {}: {e}", p.display()))),
        };
        yaml_serde::from_str(&text).map(Some).map_err(|e| {
            Fail::new(format!(
                "{} is damaged ({e}); run psh login again",
                p.display()
            ))
        })
    }

    pub fn save(&self) -> CliResult {
        let p = path();
        let text = yaml_serde::to_string(self)
            .map_err(|e| Fail::new(format!("cannot encode profile: {e}")))?;
        portico_proto::files::write_private(&p, text.as_bytes())
            .map_err(|e| Fail::new(format!("cannot write {}: {e}", p.display())))
    }

    pub fn remove() -> CliResult<bool> {
        match std::fs::remove_file(path()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Fail::new(format!(
                "cannot remove {}: {e}",
                path().display()
            ))),
        }
    }

    /// How this profile trusts its proxy.
    pub fn trust(&self) -> portico_tls::Trust {
        if let Some(ca) = &self.ca {
            portico_tls::Trust::Roots(ca.clone())
        } else if let Some(fp) = &self.fingerprint {
            portico_tls::Trust::Fingerprint(fp.clone())
        } else if self.insecure {
            portico_tls::Trust::Insecure
        } else {
            portico_tls::Trust::System
        }
    }

    /// How to reach the proxy's API.
    pub fn dial(&self) -> CliResult<portico_proto::client::Dial> {
        portico_proto::client::Dial::trusting(&self.proxy, &self.trust()).map_err(Fail::new)
    }

    /// A connector for the proxy's HTTP routes.
    pub fn connector(&self) -> CliResult<portico_tls::Connector> {
        crate::http::connector(&self.proxy, &self.trust())
    }

    pub fn check_fresh(&self) -> CliResult {
        if self.expires_ms > 0 && self.expires_ms < now_ms() {
            return Err(Fail::new(format!(
                "your login expired at {}; run psh login again",
                format_rfc3339(self.expires_ms)
            )));
        }
        Ok(())
    }
}
