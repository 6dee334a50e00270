//! The identity file: a bearer token, where to use it, and how to trust
//! the cluster. Written by the auth-service for the local admin and by
//! proxies and agents after joining (then with their key and certificate).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// `host:port` of the auth-service's gRPC API.
    pub auth_server: String,
    pub principal: String,
    pub token: String,
    /// When the token stops working (RFC 3339); services renew before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The cluster CA certificate (PEM): what the auth-service and proxies
    /// are verified against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// This service's certificate (PEM), signed by the cluster CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// This service's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The file name of the local admin identity inside a data directory.
pub const ADMIN_IDENTITY_FILE: &str = "admin-identity.yaml";
