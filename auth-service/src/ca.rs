//! The cluster's certificate authority: an ECDSA P-256 key and a
//! self-signed CA certificate, made once at the first start and kept in the
//! backend (the SQLite file, owner-only in the data directory, or Postgres,
//! so that several auth-service instances share it). The key never leaves
//! the auth-service: only the certificate is served (`pctl ca export`).

use std::time::{Duration, SystemTime};

use portico_core::Error;
use portico_tls::CertRole;

use crate::storage::Backend;

/// How long the CA certificate is valid, in years.
const CA_YEARS: u32 = 10;

pub struct ClusterCa {
    pub cert_pem: String,
    /// Signs service certificates; its key never leaves the auth-service.
    signer: portico_tls::Ca,
}

impl ClusterCa {
    /// The stored CA, or a new one stored now. Instances starting together
    /// on one database agree on whichever was stored first.
    pub async fn load_or_create(backend: &dyn Backend) -> Result<ClusterCa, Error> {
        let (cert_pem, key_pem) = match backend.cluster_ca().await? {
            Some(pair) => pair,
            None => {
                let (cert, key) = generate()?;
                backend.init_cluster_ca(&cert, &key).await?
            }
        };
        let signer = portico_tls::Ca::from_pem(&cert_pem, &key_pem).map_err(|e| {
            tracing::error!(error = %e, "the stored cluster CA cannot be used");
            Error::internal("the stored cluster certificate authority cannot be used")
        })?;
        Ok(ClusterCa { cert_pem, signer })
    }

    /// Signs a service's key (in its signing request) for `life`.
    pub fn sign(
        &self,
        csr_pem: &str,
        role: CertRole,
        host_id: &str,
        life: Duration,
    ) -> Result<String, Error> {
        self.signer
            .sign_request(csr_pem, role, host_id, life)
            .map_err(Error::bad_request)
    }

    /// A key and certificate made here (for this auth-service and for
    /// services in this process): (certificate chain PEM with the CA last,
    /// key PEM).
    pub fn issue(
        &self,
        role: CertRole,
        host_id: &str,
        life: Duration,
    ) -> Result<(String, String), Error> {
        let now = SystemTime::now();
        let (cert, key) = self
            .signer
            .issue(role, host_id, now - Duration::from_secs(60), now + life)
            .map_err(Error::internal)?;
        Ok((format!("{cert}{}", self.cert_pem), key))
    }
}

/// A fresh CA: key and self-signed certificate, both PEM, valid from a
/// year ago (clocks that lag) for ten years.
fn generate() -> Result<(String, String), Error> {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let now = SystemTime::now();
    portico_tls::Ca::generate("Portico cluster CA", now - YEAR, now + CA_YEARS * YEAR).map_err(
        |e| {
            tracing::error!(error = %e, "cannot make the cluster CA");
            Error::internal("cannot make the cluster certificate authority")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_ca_certificate_and_a_key() {
        let (cert, key) = generate().expect("generated");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        assert!(key.contains("PRIVATE KEY"));
        assert!(!cert.contains("PRIVATE KEY"));
    }
}
