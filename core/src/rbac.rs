//! RBAC evaluation: API permissions on kinds, which apps a user reaches and
//! which MCP tools, resources and prompts they may use. Deny always wins; nothing is allowed unless
//! a role allows it.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::kind::{Kind, Verb};
use crate::labels::{LabelSelector, Pattern};
use crate::resource::{Role, RoleConditions, Rule};

/// The MCP features whose names roles restrict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Tool,
    Resource,
    Prompt,
}

impl Feature {
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Tool => "tool",
            Feature::Resource => "resource",
            Feature::Prompt => "prompt",
        }
    }
}

/// Compiled name patterns of one feature on one side of a role.
#[derive(Debug, Clone, Default)]
struct Patterns {
    /// `None`: the role says nothing about this feature.
    list: Option<Vec<Pattern>>,
    /// A pattern failed to compile (roles are validated when stored, so
    /// only a role written by an older version gets here): on the deny side
    /// it denies everything, on the allow side it allows nothing more.
    broken: bool,
}

impl Patterns {
    fn new(text: Option<&Vec<String>>) -> Self {
        let Some(text) = text else {
            return Patterns::default();
        };
        let mut broken = false;
        let list = text
            .iter()
            .filter_map(|t| Pattern::parse(t).map_err(|_| broken = true).ok())
            .collect();
        Patterns {
            list: Some(list),
            broken,
        }
    }

    fn matches(&self, name: &str) -> bool {
        self.list
            .as_ref()
            .is_some_and(|l| l.iter().any(|p| p.matches(name)))
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    rules: Vec<Rule>,
    apps: LabelSelector,
    /// The app_labels failed to compile (see `Patterns::broken`).
    apps_broken: bool,
    tools: Patterns,
    resources: Patterns,
    prompts: Patterns,
    tool_text: Vec<String>,
}

impl Compiled {
    fn new(c: &RoleConditions) -> Self {
        let (apps, apps_broken) = match LabelSelector::compile(
            c.app_labels.iter().map(|(k, v)| (k, v.values().to_vec())),
        ) {
            Ok(s) => (s, false),
            Err(_) => (LabelSelector::default(), true),
        };
        let mcp = c.mcp.as_ref();
        let tool_text: Vec<String> = mcp.map(|m| m.tools.clone()).unwrap_or_default();
        Compiled {
            rules: c.rules.clone(),
            apps,
            apps_broken,
            tools: Patterns::new(Some(&tool_text)),
            resources: Patterns::new(mcp.and_then(|m| m.resources.as_ref())),
            prompts: Patterns::new(mcp.and_then(|m| m.prompts.as_ref())),
            tool_text,
        }
    }

    /// As a deny side: does it deny anything at all?
    fn denies_anything(&self) -> bool {
        let says = |p: &Patterns| p.broken || p.list.as_ref().is_some_and(|l| !l.is_empty());
        !self.rules.is_empty()
            || self.apps_broken
            || !self.apps.is_empty()
            || says(&self.tools)
            || says(&self.resources)
            || says(&self.prompts)
    }

    fn rule_covers(&self, kind: Kind, verb: Verb) -> bool {
        self.rules.iter().any(|r| {
            r.resources.iter().any(|k| k.covers(kind)) && r.verbs.iter().any(|v| v.covers(verb))
        })
    }

    fn patterns(&self, f: Feature) -> &Patterns {
        match f {
            Feature::Tool => &self.tools,
            Feature::Resource => &self.resources,
            Feature::Prompt => &self.prompts,
        }
    }

    /// As a deny side: does it deny this name (or everything, if broken)?
    fn denies(&self, f: Feature, name: &str) -> bool {
        let p = self.patterns(f);
        p.broken || p.matches(name)
    }

    /// As an allow side that reaches the app: does it allow this name? Tools
    /// need a matching pattern; resources and prompts are allowed when the
    /// role says nothing about them, so roles written before they existed
    /// keep working.
    fn allows(&self, f: Feature, name: &str) -> bool {
        let p = self.patterns(f);
        match (f, &p.list) {
            (Feature::Resource | Feature::Prompt, None) => true,
            _ => p.matches(name),
        }
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

    /// The caller's roles that deny something. Roles are not monotone: a
    /// user given some of the caller's roles but not these could do what
    /// the caller cannot, so whoever the caller gives roles to must hold
    /// these as well.
    pub fn denying_roles(&self) -> impl Iterator<Item = &str> {
        self.roles
            .iter()
            .filter(|r| r.deny.denies_anything())
            .map(|r| r.name.as_str())
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
        !self
            .roles
            .iter()
            .any(|r| r.deny.apps_broken || r.deny.apps.matches(labels))
            && self.roles.iter().any(|r| r.allow.apps.matches(labels))
    }

    /// May the caller call `tool` on an app with these labels? The error says why not.
    pub fn tool_allowed(
        &self,
        labels: &BTreeMap<String, String>,
        tool: &str,
    ) -> Result<(), String> {
        self.mcp_allowed(labels, Feature::Tool, tool)
    }

    /// May the caller use this tool, resource (by URI) or prompt on an app
    /// with these labels? Deny wins; the error names the rule that decided.
    pub fn mcp_allowed(
        &self,
        labels: &BTreeMap<String, String>,
        feature: Feature,
        name: &str,
    ) -> Result<(), String> {
        let what = feature.as_str();
        if let Some(r) = self.roles.iter().find(|r| r.deny.denies(feature, name)) {
            return Err(format!(
                "RBAC denied {what} {name:?}: role {} denies it (deny.mcp.{what}s)",
                r.name
            ));
        }
        if self
            .roles
            .iter()
            .any(|r| r.allow.apps.matches(labels) && r.allow.allows(feature, name))
        {
            return Ok(());
        }
        Err(format!(
            "RBAC denied {what} {name:?}: none of your roles allows it on this app (allow.mcp.{what}s)"
        ))
    }

    /// A one-line summary for listings, e.g. `[*], except: [delete_*]`.
    pub fn tools_summary(&self, labels: &BTreeMap<String, String>) -> String {
        let (allow, deny) = self.tool_patterns(labels);
        summary(&allow, &deny)
    }

    /// The tool patterns the roles reaching an app allow, and those any
    /// role denies (which win), each once, in role order.
    pub fn tool_patterns(&self, labels: &BTreeMap<String, String>) -> (Vec<String>, Vec<String>) {
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
        (
            allow.into_iter().map(String::from).collect(),
            deny.into_iter().map(String::from).collect(),
        )
    }
}

/// `[a, b], except: [c]`, or `(none)`, as `psh mcp ls` shows allowed tools.
pub fn summary<S: AsRef<str>>(allow: &[S], deny: &[S]) -> String {
    if allow.is_empty() {
        return "(none)".into();
    }
    let list = |out: &mut String, items: &[S]| {
        out.push('[');
        for (i, p) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(p.as_ref());
        }
        out.push(']');
    };
    let mut s = String::new();
    list(&mut s, allow);
    if !deny.is_empty() {
        s.push_str(", except: ");
        list(&mut s, deny);
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should say where
mod tests {
    use super::*;
    use crate::parse::parse_documents;
    use crate::presets::preset_roles;
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
