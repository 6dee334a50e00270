//! The built-in roles: the presets created at first start (`admin`,
//! `mcp-user`) and the system roles of agents and proxies.

use std::collections::BTreeMap;

use crate::kind::{Kind, KindSel, VerbSel};
use crate::labels::OneOrMany;
use crate::principal::SystemRole;
use crate::resource::{McpConditions, Metadata, Object, Role, RoleConditions, RoleSpec, Rule};

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
        resources: None,
        prompts: None,
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
        SystemRole::App.role_name(),
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
        SystemRole::Proxy.role_name(),
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
