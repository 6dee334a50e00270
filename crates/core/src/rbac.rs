//! RBAC evaluation: API permissions on kinds, which apps a user reaches and
//! which MCP tools they may call. Deny always wins; nothing is allowed unless
//! a role allows it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::labels::OneOrMany;
use crate::labels::{LabelSelector, Pattern};
use crate::resource::{McpConditions, Metadata, Object, Role, RoleConditions, RoleSpec, Rule};

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
    fn covers(self, k: Kind) -> bool {
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
    fn covers(self, v: Verb) -> bool {
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

#[derive(Debug, Clone)]
struct Compiled {
    rules: Vec<Rule>,
    apps: LabelSelector,
    tools: Vec<Pattern>,
    tool_text: Vec<String>,
}

impl Compiled {
    fn new(c: &RoleConditions) -> Self {
        let apps =
            LabelSelector::compile(c.app_labels.iter().map(|(k, v)| (k, v.values().to_vec())))
                .unwrap_or_default();
        let tool_text: Vec<String> = c.mcp.as_ref().map(|m| m.tools.clone()).unwrap_or_default();
        // Invalid patterns were refused when the role was stored; skip any that slip through.
        let tools = tool_text
            .iter()
            .filter_map(|t| Pattern::parse(t).ok())
            .collect();
        Compiled {
            rules: c.rules.clone(),
            apps,
            tools,
            tool_text,
        }
    }

    fn rule_covers(&self, kind: Kind, verb: Verb) -> bool {
        self.rules.iter().any(|r| {
            r.resources.iter().any(|k| k.covers(kind)) && r.verbs.iter().any(|v| v.covers(verb))
        })
    }

    fn tool_matches(&self, tool: &str) -> bool {
        self.tools.iter().any(|p| p.matches(tool))
    }
}

#[derive(Debug, Clone)]
struct CompiledRole {
    name: String,
    allow: Compiled,
    deny: Compiled,
}

/// The evaluated permissions of one caller, built from their roles.
#[derive(Debug, Clone, Default)]
pub struct AccessChecker {
    roles: Vec<CompiledRole>,
}

impl AccessChecker {
    pub fn new<'a>(roles: impl IntoIterator<Item = &'a Role>) -> Self {
        let roles = roles
            .into_iter()
            .map(|r| CompiledRole {
                name: r.metadata.name.clone(),
                allow: Compiled::new(&r.spec.allow),
                deny: Compiled::new(&r.spec.deny),
            })
            .collect();
        AccessChecker { roles }
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.name.clone()).collect()
    }

    /// May the caller perform `verb` on `kind`?
    pub fn check(&self, kind: Kind, verb: Verb) -> Result<(), Error> {
        if let Some(r) = self.roles.iter().find(|r| r.deny.rule_covers(kind, verb)) {
            return Err(Error::forbidden(format!(
                "access denied: role {} denies {verb} on {kind}",
                r.name
            )));
        }
        if self.roles.iter().any(|r| r.allow.rule_covers(kind, verb)) {
            return Ok(());
        }
        Err(Error::forbidden(format!(
            "access denied: none of your roles allows {verb} on {kind}; ask an administrator for a role with a rule for resources [{kind}] and verbs [{verb}]"
        )))
    }

    pub fn allows(&self, kind: Kind, verb: Verb) -> bool {
        self.check(kind, verb).is_ok()
    }

    /// May the caller reach an app with these labels?
    pub fn app_allowed(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.roles.iter().any(|r| r.deny.apps.matches(labels))
            && self.roles.iter().any(|r| r.allow.apps.matches(labels))
    }

    /// May the caller call `tool` on an app with these labels? The error says why not.
    pub fn tool_allowed(
        &self,
        labels: &BTreeMap<String, String>,
        tool: &str,
    ) -> Result<(), String> {
        if let Some(r) = self.roles.iter().find(|r| r.deny.tool_matches(tool)) {
            return Err(format!(
                "RBAC denied tool {tool:?}: role {} denies it",
                r.name
            ));
        }
        if self
            .roles
            .iter()
            .any(|r| r.allow.apps.matches(labels) && r.allow.tool_matches(tool))
        {
            return Ok(());
        }
        Err(format!(
            "RBAC denied tool {tool:?}: none of your roles allows it on this app"
        ))
    }

    /// A one-line summary for listings, e.g. `[*], except: [delete_*]`.
    pub fn tools_summary(&self, labels: &BTreeMap<String, String>) -> String {
        let mut allow: Vec<&str> = Vec::new();
        for r in self.roles.iter().filter(|r| r.allow.apps.matches(labels)) {
            for t in &r.allow.tool_text {
                if !allow.contains(&t.as_str()) {
                    allow.push(t);
                }
            }
        }
        let mut deny: Vec<&str> = Vec::new();
        for r in &self.roles {
            for t in &r.deny.tool_text {
                if !deny.contains(&t.as_str()) {
                    deny.push(t);
                }
            }
        }
        if allow.is_empty() {
            return "(none)".into();
        }
        let mut s = format!("[{}]", allow.join(", "));
        if !deny.is_empty() {
            s.push_str(&format!(", except: [{}]", deny.join(", ")));
        }
        s
    }
}

fn role(name: &str, description: &str, allow: RoleConditions) -> Role {
    let mut meta = Metadata::named(name);
    meta.description = description.into();
    Object::new(
        Kind::Role,
        meta,
        RoleSpec {
            allow,
            deny: RoleConditions::default(),
        },
    )
}

fn rule(resources: &[KindSel], verbs: &[VerbSel]) -> Rule {
    Rule {
        resources: resources.to_vec(),
        verbs: verbs.to_vec(),
    }
}

fn every_app() -> BTreeMap<String, OneOrMany> {
    [("*".to_string(), OneOrMany::One("*".into()))]
        .into_iter()
        .collect()
}

fn every_tool() -> Option<McpConditions> {
    Some(McpConditions {
        tools: vec!["*".into()],
    })
}

/// Preset roles created at first start.
pub fn preset_roles() -> Vec<Role> {
    vec![
        role(
            "admin",
            "every verb on every kind, every app, every tool",
            RoleConditions {
                rules: vec![rule(&[KindSel::All], &[VerbSel::All])],
                app_labels: every_app(),
                mcp: every_tool(),
            },
        ),
        role(
            "mcp-user",
            "every app and every tool, no API permissions",
            RoleConditions {
                rules: vec![],
                app_labels: every_app(),
                mcp: every_tool(),
            },
        ),
    ]
}

/// The built-in role of agents: read what they serve, announce it, audit.
pub fn system_app_role() -> Role {
    use KindSel as K;
    use VerbSel as V;
    role(
        "system:app",
        "built-in role of app-service agents",
        RoleConditions {
            rules: vec![
                rule(&[K::App, K::Role, K::User], &[V::List, V::Read]),
                rule(
                    &[K::AppServer],
                    &[V::List, V::Read, V::Create, V::Update, V::Delete],
                ),
                rule(&[K::Event], &[V::Create]),
            ],
            app_labels: BTreeMap::new(),
            mcp: None,
        },
    )
}

/// The built-in role of proxies: read the cluster state, audit.
pub fn system_proxy_role() -> Role {
    use KindSel as K;
    use VerbSel as V;
    role(
        "system:proxy",
        "built-in role of proxies",
        RoleConditions {
            rules: vec![
                rule(
                    &[K::App, K::Role, K::User, K::AppServer],
                    &[V::List, V::Read],
                ),
                rule(&[K::Event], &[V::Create]),
            ],
            app_labels: BTreeMap::new(),
            mcp: None,
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should say where
mod tests {
    use super::*;
    use crate::parse::parse_documents;
    use crate::resource::Resource;

    fn roles(yaml: &str) -> Vec<Role> {
        parse_documents("test.yaml", yaml)
            .expect("valid roles")
            .into_iter()
            .map(|r| match r {
                Resource::Role(r) => r,
                other => panic!("not a role: {other:?}"),
            })
            .collect()
    }

    fn labels(env: &str) -> BTreeMap<String, String> {
        [("env".to_string(), env.to_string())].into_iter().collect()
    }

    const DEV: &str = r#"
kind: role
version: v8
metadata: {name: mcp-developer}
spec:
  allow:
    rules:
    - resources: [app]
      verbs: [list, create, read, update, delete]
    app_labels:
      env: [dev, test]
    mcp:
      tools: ["*"]
  deny:
    mcp:
      tools: ["delete_*"]
"#;

    #[test]
    fn rules_and_default_deny() {
        let c = AccessChecker::new(&roles(DEV));
        assert!(c.allows(Kind::App, Verb::Create));
        assert!(!c.allows(Kind::Role, Verb::Create));
        assert!(!c.allows(Kind::Event, Verb::List));
        assert!(!AccessChecker::default().allows(Kind::App, Verb::List));
    }

    #[test]
    fn deny_rule_wins() {
        let mut rs = roles(DEV);
        rs.extend(roles(
            "kind: role\nversion: v8\nmetadata: {name: no-delete}\nspec:\n  deny:\n    rules:\n    - resources: ['*']\n      verbs: [delete]\n",
        ));
        let c = AccessChecker::new(&rs);
        assert!(c.allows(Kind::App, Verb::Update));
        let e = c.check(Kind::App, Verb::Delete).unwrap_err();
        assert!(e.message.contains("no-delete"), "{}", e.message);
    }

    #[test]
    fn app_labels_and_tools() {
        let c = AccessChecker::new(&roles(DEV));
        assert!(c.app_allowed(&labels("dev")));
        assert!(c.app_allowed(&labels("test")));
        assert!(!c.app_allowed(&labels("prod")));
        assert!(c.tool_allowed(&labels("dev"), "echo").is_ok());
        let e = c
            .tool_allowed(&labels("dev"), "delete_everything")
            .unwrap_err();
        assert!(e.contains("RBAC denied"), "{e}");
        assert!(c.tool_allowed(&labels("prod"), "echo").is_err());
        assert_eq!(c.tools_summary(&labels("dev")), "[*], except: [delete_*]");
    }

    #[test]
    fn regex_and_literal_tools() {
        let c = AccessChecker::new(&roles(
            "kind: role\nversion: v8\nmetadata: {name: r}\nspec:\n  allow:\n    app_labels: {'*': '*'}\n    mcp:\n      tools: [echo, '^get_(a|b)$']\n",
        ));
        let l = labels("x");
        assert!(c.tool_allowed(&l, "echo").is_ok());
        assert!(c.tool_allowed(&l, "get_a").is_ok());
        assert!(c.tool_allowed(&l, "get_c").is_err());
        assert!(c.tool_allowed(&l, "add").is_err());
    }

    #[test]
    fn presets() {
        let p = preset_roles();
        let admin = AccessChecker::new(&p[..1]);
        assert!(admin.allows(Kind::Token, Verb::Delete));
        assert!(admin.app_allowed(&BTreeMap::new()));
        let user = AccessChecker::new(&p[1..]);
        assert!(!user.allows(Kind::App, Verb::List));
        assert!(user.tool_allowed(&labels("prod"), "anything").is_ok());
    }
}
