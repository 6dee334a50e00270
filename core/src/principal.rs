//! Who can call Portico: the types of principal and the system roles that
//! services join as. Strings appear only at the storage and wire edges.

use serde::{Deserialize, Serialize};

/// What a join token lets its holder join as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemRole {
    App,
    Proxy,
}

impl SystemRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemRole::App => "app",
            SystemRole::Proxy => "proxy",
        }
    }
}

impl SystemRole {
    /// Reads a join role as `pctl tokens add --type` and the join API write it.
    pub fn parse(s: &str) -> Option<SystemRole> {
        Some(match s {
            "app" => SystemRole::App,
            "proxy" => SystemRole::Proxy,
            _ => return None,
        })
    }

    /// The name of the built-in role an identity of this kind holds.
    pub fn role_name(self) -> &'static str {
        match self {
            SystemRole::App => "system:app",
            SystemRole::Proxy => "system:proxy",
        }
    }

    /// The section of `portico.yaml` a service of this kind is configured in.
    pub fn config_section(self) -> &'static str {
        match self {
            SystemRole::App => "app_service",
            SystemRole::Proxy => "proxy_service",
        }
    }
}

impl std::fmt::Display for SystemRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of caller a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalType {
    /// A person who logged in.
    User,
    /// An agent or a proxy, with the system role it joined as.
    Service,
    /// The local admin identity on the auth host.
    Admin,
}

impl PrincipalType {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalType::User => "user",
            PrincipalType::Service => "service",
            PrincipalType::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => PrincipalType::User,
            "service" => PrincipalType::Service,
            "admin" => PrincipalType::Admin,
            _ => return None,
        })
    }
}

/// Names people cannot take, because the system uses them for its own principals.
pub fn is_reserved_name(name: &str) -> bool {
    matches!(name, "admin" | "system" | "portico" | "root")
}
