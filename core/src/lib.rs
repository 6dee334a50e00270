//! Portico's resource model: resources and their validation, label matching,
//! RBAC evaluation and the error code shared by every service. No I/O here.

pub mod client_config;
pub mod error;
pub mod identity;
pub mod invalid;
pub mod kind;
pub mod labels;
pub mod parse;
pub mod presets;
pub mod principal;
pub mod rbac;
pub mod resource;
pub mod time;

pub use error::{Code, Error, Result};
pub use invalid::Invalid;
pub use kind::{Kind, Verb};
pub use labels::{LabelSelector, Pattern};
pub use principal::{PrincipalType, SystemRole};
pub use rbac::AccessChecker;
pub use resource::{
    App, AppIdentity, AppServer, AppServerSpec, AppSpec, McpSpec, Metadata, Object, Resource, Role,
    RoleSpec, Token, TokenSpec, User, UserSpec,
};

/// `true`, for serde defaults.
pub fn yes() -> bool {
    true
}
