//! rustls configurations: mutual TLS between the cluster's services, the
//! proxy's HTTPS listener, and the ways a client may trust a server.

use std::sync::{Arc, OnceLock, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::pki::{self, CertRole, PeerId};

/// The one crypto provider (ring), shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A certificate chain and its key, ready for rustls.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain = pki::certs(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("unreadable private key: {e}"))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|_| "the private key does not belong to the certificate".to_string())?;
    Ok(Arc::new(ck))
}

/// A service's own certificate, swapped in place when it is renewed: new
/// connections present the new one, open connections keep theirs.
pub struct CertStore {
    current: RwLock<(Arc<CertifiedKey>, PeerId)>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("id", &self.id()).finish()
    }
}

impl CertStore {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<CertStore>, String> {
        let (ck, id) = Self::load(cert_pem, key_pem)?;
        Ok(Arc::new(CertStore {
            current: RwLock::new((ck, id)),
        }))
    }

    fn load(cert_pem: &str, key_pem: &str) -> Result<(Arc<CertifiedKey>, PeerId), String> {
        let ck = certified_key(cert_pem, key_pem)?;
        let id = pki::peer_id(&ck.cert[0])?;
        Ok((ck, id))
    }

    /// Puts a renewed certificate in place.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let next = Self::load(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    pub fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Who the current certificate says this service is.
    pub fn id(&self) -> PeerId {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for c in pki::certs(ca_pem)? {
        store
            .add(c)
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    Ok(Arc::new(store))
}

/// Whether a cluster listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Services only (the tunnel listener).
    Required,
    /// Services present one, users and the local admin do not (the auth API).
    Optional,
}

/// A cluster listener: our certificate, client certificates checked
/// against the cluster CA. TLS 1.3 only.
pub fn cluster_server(
    store: Arc<CertStore>,
    ca_pem: &str,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, String> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = match client_auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| format!("cannot build the client verifier: {e}"))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(store);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client of a cluster service: verifies it against the cluster CA (the
/// server name is the role's, checked by the connector) and presents
/// `store`'s certificate when given. TLS 1.3 only.
pub fn cluster_client(
    store: Option<Arc<CertStore>>,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, String> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match store {
        Some(s) => b.with_client_cert_resolver(s),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// How a client trusts a server it reaches by address (the proxy, for
/// `psh` and `pctl`; the auth-service, for a service joining).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's root certificates, checking the name dialled.
    System,
    /// These certificates (PEM) as roots, checking the name dialled.
    Roots(String),
    /// Exactly the server certificate with this SHA-256 (lower-case hex).
    Fingerprint(String),
    /// A certificate chain that contains a CA certificate with this pin
    /// (`sha256:<hex>`), which must also sign the server's certificate.
    CaPin(String),
    /// Anything: no protection against a machine in the middle.
    Insecure,
}

/// A client configuration for `trust`, offering `alpn`. TLS 1.2 and 1.3.
pub fn client_for(trust: &Trust, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let b = match trust {
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no system root certificates found; pass --ca-file or --fingerprint".into(),
                );
            }
            b.with_root_certificates(store)
        }
        Trust::Roots(pem) => b.with_root_certificates(roots(pem)?),
        Trust::Fingerprint(fp) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::Fingerprint(fp.clone()))),
        Trust::CaPin(pin) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::Ca(pin.clone()))),
        Trust::Insecure => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::Anything)),
    };
    let mut cfg = b.with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Verifiers that do not rest on a name and a root store.
#[derive(Debug)]
enum Pinned {
    Fingerprint(String),
    Ca(String),
    Anything,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self {
            Pinned::Anything => Ok(ServerCertVerified::assertion()),
            Pinned::Fingerprint(want) => {
                let got = pki::normalize_fingerprint(&pki::fingerprint(end_entity));
                if got.as_deref() == Some(want.as_str()) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "the server's certificate has fingerprint {}, not the one trusted",
                        pki::fingerprint(end_entity)
                    )))
                }
            }
            Pinned::Ca(pin) => {
                let Some(ca) = intermediates.iter().find(|c| pki::ca_pin(c) == *pin) else {
                    return Err(rustls::Error::General(
                        "the server's certificate chain holds no CA with the pinned hash".into(),
                    ));
                };
                let mut store = RootCertStore::empty();
                store
                    .add(ca.clone().into_owned())
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                let v = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The proxy's web certificates: the operator's key pairs (chosen by the
/// name the client asks for, else the first) or one self-signed pair.
/// `reload` reads the files again; a pair that fails to load keeps the one
/// in use.
pub struct WebCerts {
    pairs: Vec<(String, String)>,
    loaded: RwLock<Vec<Loaded>>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    stamp: Option<std::time::SystemTime>,
}

impl std::fmt::Debug for WebCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCerts")
            .field("pairs", &self.pairs)
            .finish()
    }
}

fn names_of(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return vec![];
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn stamp(cert: &str, key: &str) -> Option<std::time::SystemTime> {
    let a = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
    let b = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
    Some(a.max(b))
}

fn load_pair(cert: &str, key: &str) -> Result<Loaded, String> {
    let stamp = stamp(cert, key);
    let cert_pem = std::fs::read_to_string(cert).map_err(|e| format!("cannot read {cert}: {e}"))?;
    let key_pem = std::fs::read_to_string(key).map_err(|e| format!("cannot read {key}: {e}"))?;
    let ck = certified_key(&cert_pem, &key_pem).map_err(|e| format!("{cert}: {e}"))?;
    Ok(Loaded {
        names: names_of(&ck.cert[0]),
        key: ck,
        stamp,
    })
}

impl WebCerts {
    /// Loads `(cert_file, key_file)` pairs; every one must load now.
    pub fn from_files(pairs: Vec<(String, String)>) -> Result<Arc<WebCerts>, String> {
        if pairs.is_empty() {
            return Err("no key pairs given".into());
        }
        let loaded = pairs
            .iter()
            .map(|(c, k)| load_pair(c, k))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(WebCerts {
            pairs,
            loaded: RwLock::new(loaded),
        }))
    }

    /// Reads again every pair whose files changed; returns what failed.
    pub fn reload(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for (i, (c, k)) in self.pairs.iter().enumerate() {
            let now = stamp(c, k);
            let old = self.loaded.read().unwrap_or_else(|p| p.into_inner())[i].stamp;
            if now.is_none() || now == old {
                continue;
            }
            match load_pair(c, k) {
                Ok(l) => {
                    tracing::info!(cert = %c, "reloaded the web certificate");
                    self.loaded.write().unwrap_or_else(|p| p.into_inner())[i] = l;
                }
                Err(e) => failures.push(e),
            }
        }
        failures
    }

    /// The certificate served first (its fingerprint is what people check).
    pub fn first(&self) -> Arc<CertifiedKey> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())[0]
            .key
            .clone()
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = sni.map(|s| s.to_ascii_lowercase()) {
            for l in loaded.iter() {
                let hit = l.names.iter().any(|n| {
                    *n == name
                        || n.strip_prefix("*.").is_some_and(|suffix| {
                            name.split_once('.').is_some_and(|(_, rest)| rest == suffix)
                        })
                });
                if hit {
                    return l.key.clone();
                }
            }
        }
        loaded[0].key.clone()
    }
}

impl ResolvesServerCert for WebCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The web listener's configuration: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1.
pub fn web_server(certs: Arc<WebCerts>) -> Result<Arc<ServerConfig>, String> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The identity a cluster peer proved, from its verified certificate chain.
pub fn peer_of(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerId> {
    let first = certs?.first()?;
    pki::peer_id(first).ok()
}

/// The server name to verify for a cluster role.
pub fn role_name(role: CertRole) -> ServerName<'static> {
    ServerName::try_from(role.dns_name()).expect("a valid DNS name")
}
