//! Portico's gRPC API: code generated from `proto/portico.proto`, and the
//! conversions between the shared error code and gRPC statuses, and the
//! client side of the API (connecting, joining, credential files).

#[allow(clippy::all, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("portico.v1");
}

pub use v1::auth_service_client::AuthServiceClient;
pub use v1::auth_service_server::{AuthService, AuthServiceServer};

pub mod client;
pub mod convert;
pub mod files;
pub mod join;
