//! Transport security for Portico. The cluster's own CA signs a
//! certificate for every auth-service, proxy and agent (`pki`); services
//! speak mutual TLS with each other and check the role and host id in the
//! peer's certificate (`config`, `net`); the proxy serves HTTPS with the
//! operator's certificate or a self-signed one; clients trust a server
//! through roots, a fingerprint, a CA pin, or (said out loud) not at all.

pub mod config;
pub mod net;
pub mod pki;

pub use config::{CertStore, ClientAuth, Trust, WebCerts};
pub use net::{ClientIo, Connector, PeerInfo, Plaintext, TlsConn};
pub use pki::{Ca, CertRole, PeerId};

/// ALPN for HTTP/2 (the gRPC API).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for the reverse tunnel.
pub const ALPN_TUNNEL: &[u8] = b"portico-tunnel/1";
