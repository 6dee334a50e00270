//! The vocabulary of API permissions: resource kinds, verbs, and the
//! selectors of both that role rules are written with. Permission strings
//! exist only in (de)serialisation; everywhere else they are these enums.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Resource kinds under RBAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    App,
    Role,
    User,
    Token,
    AppServer,
    Event,
}

impl Kind {
    pub const RESOURCES: [Kind; 5] = [
        Kind::App,
        Kind::Role,
        Kind::User,
        Kind::Token,
        Kind::AppServer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::App => "app",
            Kind::Role => "role",
            Kind::User => "user",
            Kind::Token => "token",
            Kind::AppServer => "app_server",
            Kind::Event => "event",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Kind::App => "v3",
            Kind::Role => "v8",
            Kind::User | Kind::Token | Kind::AppServer | Kind::Event => "v2",
        }
    }

    /// Accepts the singular, the plural and the CLI spelling (`apps`, `app_servers`).
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "app" | "apps" => Kind::App,
            "role" | "roles" => Kind::Role,
            "user" | "users" => Kind::User,
            "token" | "tokens" => Kind::Token,
            "app_server" | "app_servers" | "appserver" | "appservers" => Kind::AppServer,
            "event" | "events" => Kind::Event,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    List,
    Create,
    Read,
    Update,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Read => "read",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind in a role rule: one kind or `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindSel {
    App,
    Role,
    User,
    Token,
    AppServer,
    Event,
    #[serde(rename = "*")]
    All,
}

impl KindSel {
    pub fn covers(self, k: Kind) -> bool {
        matches!(
            (self, k),
            (KindSel::All, _)
                | (KindSel::App, Kind::App)
                | (KindSel::Role, Kind::Role)
                | (KindSel::User, Kind::User)
                | (KindSel::Token, Kind::Token)
                | (KindSel::AppServer, Kind::AppServer)
                | (KindSel::Event, Kind::Event)
        )
    }
}

/// A verb in a role rule: one verb or `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerbSel {
    List,
    Create,
    Read,
    Update,
    Delete,
    #[serde(rename = "*")]
    All,
}

impl VerbSel {
    pub fn covers(self, v: Verb) -> bool {
        matches!(
            (self, v),
            (VerbSel::All, _)
                | (VerbSel::List, Verb::List)
                | (VerbSel::Create, Verb::Create)
                | (VerbSel::Read, Verb::Read)
                | (VerbSel::Update, Verb::Update)
                | (VerbSel::Delete, Verb::Delete)
        )
    }
}
