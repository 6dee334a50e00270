//! The identity file: a bearer token and where to use it. Written by the
//! auth-service for the local admin and by agents after joining.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// `host:port` of the auth-service's gRPC API.
    pub auth_server: String,
    pub principal: String,
    pub token: String,
}

/// The file name of the local admin identity inside a data directory.
pub const ADMIN_IDENTITY_FILE: &str = "admin-identity.yaml";
