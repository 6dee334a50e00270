//! The cluster PKI: service certificates signed by the cluster CA, naming
//! their role and host id, and the helpers around them (keys, signing
//! requests, fingerprints, self-signed web certificates).
//!
//! A service certificate carries one DNS name per role
//! (`auth.portico.internal`, `proxy.portico.internal`,
//! `app.portico.internal`), which is what a peer verifies as the server
//! name, and one URI, `portico://<role>/<host id>`, which says who exactly it
//! is. Only the auth-service signs them, and it always writes both names
//! itself: nothing a joining service asks for ends up in its certificate
//! except its public key.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// What a service certificate says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertRole {
    Auth,
    Proxy,
    App,
}

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Auth => "auth",
            CertRole::Proxy => "proxy",
            CertRole::App => "app",
        }
    }

    pub fn parse(s: &str) -> Option<CertRole> {
        match s {
            "auth" => Some(CertRole::Auth),
            "proxy" => Some(CertRole::Proxy),
            "app" => Some(CertRole::App),
            _ => None,
        }
    }

    /// The server name peers verify for this role.
    pub fn dns_name(self) -> &'static str {
        match self {
            CertRole::Auth => "auth.portico.internal",
            CertRole::Proxy => "proxy.portico.internal",
            CertRole::App => "app.portico.internal",
        }
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity in a verified service certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerId {
    pub role: CertRole,
    pub host_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub serial: String,
}

const URI_PREFIX: &str = "portico://";

/// Reads the role and host id from a certificate (DER). It does not verify
/// the certificate: call it only on one the TLS layer has verified.
pub fn peer_id(der: &[u8]) -> Result<PeerId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable certificate names: {e}"))?
        .ok_or("the certificate names no Portico identity")?;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix(URI_PREFIX)
        {
            if found.is_some() {
                return Err("the certificate names more than one Portico identity".into());
            }
            let (role, host) = rest.split_once('/').ok_or("malformed Portico identity")?;
            let role = CertRole::parse(role).ok_or("unknown role in the certificate")?;
            if host.is_empty() || host.contains('/') {
                return Err("malformed host id in the certificate".into());
            }
            found = Some((role, host.to_string()));
        }
    }
    let (role, host_id) = found.ok_or("the certificate names no Portico identity")?;
    Ok(PeerId {
        role,
        host_id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
    })
}

/// The first certificate of a PEM bundle, as DER.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map_err(|e| format!("unreadable certificate: {e}"))
}

/// Every certificate of a PEM bundle, as DER.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let all: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let all = all.map_err(|e| format!("unreadable certificate: {e}"))?;
    if all.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(all)
}

/// `SHA256:AB:CD:...`, as browsers and `openssl x509 -fingerprint` show it.
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// A fingerprint as typed by a person, reduced to lower-case hex: the
/// `SHA256:` prefix and colons are optional, case does not matter.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let t = s.trim();
    let t = if t.len() >= 7 && t[..7].eq_ignore_ascii_case("sha256:") {
        &t[7..]
    } else {
        t
    };
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// The CA pin joiners check: `sha256:<hex>` of the CA certificate.
pub fn ca_pin(ca_der: &[u8]) -> String {
    let d = Sha256::digest(ca_der);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn err(e: rcgen::Error) -> String {
    e.to_string()
}

/// A fresh ECDSA P-256 key.
pub fn new_key() -> Result<KeyPair, String> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)
}

/// A signing request for `key`; the names in it do not matter (the CA
/// writes its own), it proves that the requester holds the key.
pub fn signing_request(key: &KeyPair) -> Result<String, String> {
    CertificateParams::new(Vec::<String>::new())
        .map_err(err)?
        .serialize_request(key)
        .map_err(err)?
        .pem()
        .map_err(err)
}

fn time_at(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// The cluster CA, able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
}

impl Ca {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
            cert_der: first_cert(cert_pem)?,
        })
    }

    /// A new self-signed CA valid from `not_before` to `not_after`:
    /// (certificate PEM, key PEM).
    pub fn generate(
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), String> {
        let key = new_key()?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Portico");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = time_at(not_before);
        params.not_after = time_at(not_after);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn leaf_params(
        &self,
        role: CertRole,
        host_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, String> {
        if host_id.is_empty() || host_id.contains('/') || !host_id.is_ascii() {
            return Err(format!(
                "host id {host_id:?} cannot be named in a certificate"
            ));
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{role}/{host_id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Portico");
        params.subject_alt_names = vec![
            SanType::DnsName(role.dns_name().try_into().map_err(err)?),
            SanType::URI(
                format!("{URI_PREFIX}{role}/{host_id}")
                    .try_into()
                    .map_err(err)?,
            ),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(random_serial());
        params.not_before = time_at(not_before);
        params.not_after = time_at(not_after);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Signs the key in `csr_pem` (whose signature is checked) into a
    /// certificate naming `role` and `host_id`, valid for `life` (backdated
    /// a minute for clocks that lag).
    pub fn sign_request(
        &self,
        csr_pem: &str,
        role: CertRole,
        host_id: &str,
        life: Duration,
    ) -> Result<String, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the certificate signing request is not valid: {e}"))?;
        let now = SystemTime::now();
        let params = self.leaf_params(role, host_id, now - Duration::from_secs(60), now + life)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(err)?;
        Ok(cert.pem())
    }

    /// A key and a certificate for it, valid from `not_before` to
    /// `not_after`: (certificate PEM, key PEM). Used by the auth-service for
    /// itself, and by tests for expired or foreign certificates.
    pub fn issue(
        &self,
        role: CertRole,
        host_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), String> {
        let key = new_key()?;
        let params = self.leaf_params(role, host_id, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A self-signed certificate for the proxy's web listener, naming `hosts`
/// (DNS names or IP addresses): (certificate PEM, key PEM).
pub fn self_signed_web(hosts: &[String], life: Duration) -> Result<(String, String), String> {
    let key = new_key()?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Portico proxy (self-signed)");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Portico");
    let mut sans = Vec::new();
    for h in hosts {
        let h = h.trim();
        if h.is_empty() {
            continue;
        }
        let san = match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.try_into().map_err(err)?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = time_at(now - Duration::from_secs(3600));
    params.not_after = time_at(now + life);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Ca {
        let now = SystemTime::now();
        let (c, k) = Ca::generate("test CA", now, now + Duration::from_secs(3600)).expect("ca");
        Ca::from_pem(&c, &k).expect("load")
    }

    #[test]
    fn signed_certificates_name_role_and_host() {
        let ca = ca();
        let key = new_key().expect("key");
        let csr = signing_request(&key).expect("csr");
        let pem = ca
            .sign_request(&csr, CertRole::App, "agent-1", Duration::from_secs(600))
            .expect("signed");
        let id = peer_id(&first_cert(&pem).expect("der")).expect("id");
        assert_eq!(id.role, CertRole::App);
        assert_eq!(id.host_id, "agent-1");
        assert!(id.not_after > 0);
    }

    #[test]
    fn a_forged_request_is_refused() {
        let ca = ca();
        let key = new_key().expect("key");
        let csr = signing_request(&key).expect("csr");
        let broken = csr.replace('A', "B");
        assert!(
            ca.sign_request(&broken, CertRole::App, "x", Duration::from_secs(60))
                .is_err()
        );
        assert!(
            ca.sign_request(&csr, CertRole::App, "a/b", Duration::from_secs(60))
                .is_err()
        );
    }

    #[test]
    fn fingerprints_compare_in_any_spelling() {
        let fp = fingerprint(b"x");
        assert!(fp.starts_with("SHA256:"));
        let a = normalize_fingerprint(&fp).expect("parsed");
        assert_eq!(normalize_fingerprint(&fp.to_lowercase()), Some(a.clone()));
        assert_eq!(normalize_fingerprint(&a), Some(a.clone()));
        assert_eq!(normalize_fingerprint("SHA256:12"), None);
    }
}
