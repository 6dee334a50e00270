//! The resources Portico stores: apps (MCP servers), roles, users, join
//! tokens and app servers, with their semantic validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;
use crate::kind::{Kind, KindSel, VerbSel};
use crate::labels::{OneOrMany, Pattern};
use crate::principal::SystemRole;

/// Fields every resource carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Set by the server on every write; ignored when given by a client.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
    /// Set by the server for records with a time to live (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The envelope shared by every kind: `kind`, `version`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object<S> {
    pub kind: String,
    pub version: String,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Transport: empty or `mcp+stdio://` runs `mcp.command`; `mcp+http(s)://`
    /// is an upstream Streamable HTTP server.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpSpec>,
    /// Headers an agent adds to every request to an `mcp+http(s)://`
    /// upstream: literal text, with `{{secret NAME}}` and `{{user.name}}`
    /// (the calling user) anywhere in a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// `jwt`: the agent sends the upstream a short-lived JWT naming the
    /// calling user and their roles (`Authorization: Bearer`), signed by the
    /// cluster and verifiable with the keys at the proxy's
    /// `/.well-known/jwks.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<AppIdentity>,
}

/// How an upstream learns who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppIdentity {
    Jwt,
}

/// Headers an app may not set: the relay's own, and hop-by-hop ones.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "accept",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
    "connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
];

/// One piece of a header value: text as written, or a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPart {
    Text(String),
    Secret(String),
    UserName,
}

/// Splits a header value into text and `{{secret NAME}}` / `{{user.name}}`.
pub fn header_parts(value: &str) -> Result<Vec<HeaderPart>, String> {
    let mut parts = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find("{{") {
        if i > 0 {
            parts.push(HeaderPart::Text(rest[..i].to_string()));
        }
        let end = rest[i..]
            .find("}}")
            .ok_or_else(|| format!("{value:?} opens {{{{ without closing it"))?
            + i;
        let inner = rest[i + 2..end].trim();
        if inner == "user.name" {
            parts.push(HeaderPart::UserName);
        } else if let Some(name) = inner.strip_prefix("secret ") {
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "{name:?} is not a secret name (letters, digits and _)"
                ));
            }
            parts.push(HeaderPart::Secret(name.to_string()));
        } else {
            return Err(format!(
                "{{{{{inner}}}}} is not a template; use {{{{secret NAME}}}} or {{{{user.name}}}}"
            ));
        }
        rest = &rest[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(HeaderPart::Text(rest.to_string()));
    }
    Ok(parts)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The host account the process runs as; required for stdio servers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_as_host_user: String,
    /// Extra environment: literal values or `{{secret NAME}}` references.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub allow: RoleConditions,
    #[serde(default)]
    pub deny: RoleConditions,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_labels: BTreeMap<String, OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpConditions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub resources: Vec<KindSel>,
    pub verbs: Vec<VerbSel>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConditions {
    /// Tool names: literals, globs (`search_*`) or regular expressions (`^...$`).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Resource URIs, as patterns; absent: every resource of a reachable app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
    /// Prompt names, as patterns; absent: every prompt of a reachable app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    #[serde(default)]
    pub roles: Vec<String>,
    /// A locked user cannot log in, and their tokens and sessions stop
    /// working (`pctl users lock`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    pub roles: Vec<SystemRole>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppServerSpec {
    /// The app this record announces.
    pub app: String,
    /// The agent serving it.
    pub host_id: String,
    /// Set for apps from the agent's own config, which exist nowhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_app: Option<Box<App>>,
}

pub type App = Object<AppSpec>;
pub type Role = Object<RoleSpec>;
pub type User = Object<UserSpec>;
pub type Token = Object<TokenSpec>;
pub type AppServer = Object<AppServerSpec>;

/// Any stored resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    App(App),
    Role(Role),
    User(User),
    Token(Token),
    AppServer(AppServer),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::App(_) => Kind::App,
            Resource::Role(_) => Kind::Role,
            Resource::User(_) => Kind::User,
            Resource::Token(_) => Kind::Token,
            Resource::AppServer(_) => Kind::AppServer,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::App(o) => &o.metadata,
            Resource::Role(o) => &o.metadata,
            Resource::User(o) => &o.metadata,
            Resource::Token(o) => &o.metadata,
            Resource::AppServer(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::App(o) => &mut o.metadata,
            Resource::Role(o) => &mut o.metadata,
            Resource::User(o) => &mut o.metadata,
            Resource::Token(o) => &mut o.metadata,
            Resource::AppServer(o) => &mut o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// Serialises to JSON; every field of these types is serialisable.
    pub fn to_json(&self) -> String {
        let r = match self {
            Resource::App(o) => serde_json::to_string(o),
            Resource::Role(o) => serde_json::to_string(o),
            Resource::User(o) => serde_json::to_string(o),
            Resource::Token(o) => serde_json::to_string(o),
            Resource::AppServer(o) => serde_json::to_string(o),
        };
        r.unwrap_or_default()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.to_json()).unwrap_or(serde_json::Value::Null)
    }

    /// Parses a stored or transmitted resource of a known kind.
    pub fn from_json(kind: Kind, json: &str) -> Result<Resource, Invalid> {
        fn de<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, Invalid> {
            let d = &mut serde_json::Deserializer::from_str(json);
            serde_path_to_error::deserialize(d).map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                Invalid::field(path, e.into_inner().to_string())
            })
        }
        let r = match kind {
            Kind::App => Resource::App(de(json)?),
            Kind::Role => Resource::Role(de(json)?),
            Kind::User => Resource::User(de(json)?),
            Kind::Token => Resource::Token(de(json)?),
            Kind::AppServer => Resource::AppServer(de(json)?),
            Kind::Event => return Err(Invalid::new("events are not resources")),
        };
        r.validate()?;
        Ok(r)
    }

    /// Semantic checks that types alone cannot express. The message names the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        let (kind, version) = match self {
            Resource::App(o) => (&o.kind, &o.version),
            Resource::Role(o) => (&o.kind, &o.version),
            Resource::User(o) => (&o.kind, &o.version),
            Resource::Token(o) => (&o.kind, &o.version),
            Resource::AppServer(o) => (&o.kind, &o.version),
        };
        let k = self.kind();
        if kind != k.as_str() {
            return Err(Invalid::field(
                "kind",
                format!("expected {:?}, got {kind:?}", k.as_str()),
            ));
        }
        if version != k.version() {
            return Err(Invalid::field(
                "version",
                format!(
                    "{kind} resources are version {:?}, got {version:?}",
                    k.version()
                ),
            ));
        }
        let meta = self.metadata();
        if k == Kind::AppServer {
            validate_app_server_name(&meta.name)?;
        } else {
            validate_name(&meta.name).map_err(|e| e.within("metadata.name"))?;
        }
        for key in meta.labels.keys() {
            if key.is_empty() || key.len() > 63 {
                return Err(Invalid::field(
                    "metadata.labels",
                    format!("label key {key:?} must be 1 to 63 characters"),
                ));
            }
        }
        match self {
            Resource::App(a) => validate_app(&a.spec),
            Resource::Role(r) => validate_role(&r.spec),
            Resource::User(u) => {
                for (i, r) in u.spec.roles.iter().enumerate() {
                    validate_name(r).map_err(|e| e.within(&format!("spec.roles[{i}]")))?;
                }
                Ok(())
            }
            Resource::Token(t) => {
                if t.spec.roles.is_empty() {
                    return Err(Invalid::field(
                        "spec.roles",
                        "a token needs at least one role (app, proxy)",
                    ));
                }
                Ok(())
            }
            Resource::AppServer(s) => {
                validate_name(&s.spec.app).map_err(|e| e.within("spec.app"))?;
                validate_name(&s.spec.host_id).map_err(|e| e.within("spec.host_id"))?;
                if let Some(app) = &s.spec.static_app {
                    Resource::App((**app).clone())
                        .validate()
                        .map_err(|e| e.within("spec.static_app"))?;
                }
                Ok(())
            }
        }
    }
}

/// The transport an app uses, derived from `spec.uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Stdio,
    Http(String),
    Sse(String),
}

impl AppSpec {
    pub fn transport(&self) -> Result<Transport, Invalid> {
        let uri = self.uri.trim();
        if uri.is_empty() || uri == "mcp+stdio://" {
            Ok(Transport::Stdio)
        } else if let Some(rest) = uri.strip_prefix("mcp+sse+") {
            Ok(Transport::Sse(rest.to_string()))
        } else if let Some(rest) = uri.strip_prefix("mcp+") {
            if rest.starts_with("http://") || rest.starts_with("https://") {
                Ok(Transport::Http(rest.to_string()))
            } else {
                Err(Invalid::field(
                    "spec.uri",
                    format!(
                        "unsupported scheme in {uri:?}; use mcp+stdio://, mcp+http(s):// or mcp+sse+http(s)://"
                    ),
                ))
            }
        } else {
            Err(Invalid::field(
                "spec.uri",
                format!(
                    "{uri:?} is not an MCP uri; use mcp+stdio://, mcp+http(s):// or mcp+sse+http(s)://"
                ),
            ))
        }
    }

    pub fn type_label(&self) -> &'static str {
        match self.transport() {
            Ok(Transport::Stdio) => "stdio",
            Ok(Transport::Http(_)) => "streamable-http",
            Ok(Transport::Sse(_)) => "sse",
            Err(_) => "unknown",
        }
    }
}

fn validate_app(spec: &AppSpec) -> Result<(), Invalid> {
    match spec.transport()? {
        Transport::Stdio => {
            let Some(mcp) = &spec.mcp else {
                return Err(Invalid::field(
                    "spec.mcp",
                    "a stdio MCP server needs spec.mcp.command and spec.mcp.run_as_host_user",
                ));
            };
            if mcp.command.trim().is_empty() {
                return Err(Invalid::field(
                    "spec.mcp.command",
                    "required for a stdio MCP server",
                ));
            }
            if mcp.run_as_host_user.trim().is_empty() {
                return Err(Invalid::field(
                    "spec.mcp.run_as_host_user",
                    "required for a stdio MCP server (the host account to run it as)",
                ));
            }
            if spec.identity.is_some() {
                return Err(Invalid::field(
                    "spec.identity",
                    "identity: jwt is for upstream servers (spec.uri mcp+http(s):// or mcp+sse+http(s)://)",
                ));
            }
            for key in mcp.env.keys() {
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(Invalid::field(
                        "spec.mcp.env",
                        format!("{key:?} is not a valid variable name"),
                    ));
                }
            }
            Ok(())
        }
        Transport::Http(_) | Transport::Sse(_) => {
            if spec.identity == Some(AppIdentity::Jwt)
                && spec
                    .headers
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case("authorization"))
            {
                return Err(Invalid::field(
                    "spec.headers.Authorization",
                    "identity: jwt sends its token in Authorization; set one or the other",
                ));
            }
            for (name, value) in &spec.headers {
                let at = format!("spec.headers.{name}");
                let token = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    return Err(Invalid::field(&at, "not a valid header name"));
                }
                if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(Invalid::field(
                        &at,
                        "set by the relay itself; an app cannot set it",
                    ));
                }
                if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(Invalid::field(&at, "a header value holds no line breaks"));
                }
                header_parts(value).map_err(|e| Invalid::field(&at, e))?;
            }
            Ok(())
        }
    }?;
    if !spec.headers.is_empty() && matches!(spec.transport(), Ok(Transport::Stdio)) {
        return Err(Invalid::field(
            "spec.headers",
            "headers are for mcp+http(s):// upstreams; a stdio server takes spec.mcp.env",
        ));
    }
    Ok(())
}

fn validate_role(spec: &RoleSpec) -> Result<(), Invalid> {
    for (side, c) in [("allow", &spec.allow), ("deny", &spec.deny)] {
        for (key, vals) in &c.app_labels {
            for v in vals.values() {
                Pattern::parse(v)
                    .map_err(|e| e.within(&format!("spec.{side}.app_labels.{key}")))?;
            }
        }
        if let Some(mcp) = &c.mcp {
            let lists = [
                ("tools", Some(&mcp.tools)),
                ("resources", mcp.resources.as_ref()),
                ("prompts", mcp.prompts.as_ref()),
            ];
            for (field, list) in lists {
                for (i, t) in list.into_iter().flatten().enumerate() {
                    Pattern::parse(t)
                        .map_err(|e| e.within(&format!("spec.{side}.mcp.{field}[{i}]")))?;
                }
            }
        }
        for (i, r) in c.rules.iter().enumerate() {
            if r.resources.is_empty() || r.verbs.is_empty() {
                return Err(Invalid::field(
                    format!("spec.{side}.rules[{i}]"),
                    "needs at least one resource and one verb",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a resource name against `^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`.
pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let b = name.as_bytes();
    let shown: String = name.chars().take(40).collect();
    let shown = if name.chars().count() > 40 {
        format!("{shown}...")
    } else {
        shown
    };
    if b.is_empty() {
        return Err(Invalid::new("a name is required"));
    }
    if b.len() > 63 {
        return Err(Invalid::new(format!(
            "{shown:?} is {} characters long; names have at most 63",
            b.len()
        )));
    }
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let inner = |c: u8| edge(c) || matches!(c, b'.' | b'_' | b'-');
    if !edge(b[0]) || !edge(b[b.len() - 1]) || !b.iter().all(|&c| inner(c)) {
        return Err(Invalid::new(format!(
            "{shown:?} is not a valid name: use lowercase letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// App server records are named `<app>.<host_id>`, both valid names.
pub fn validate_app_server_name(name: &str) -> Result<(), Invalid> {
    if name.len() > 127 || name.is_empty() {
        return Err(Invalid::field(
            "metadata.name",
            "app server names are <app>.<host_id>",
        ));
    }
    Ok(())
}

pub fn app_server_name(app: &str, host_id: &str) -> String {
    format!("{app}.{host_id}")
}

impl Metadata {
    pub fn named(name: impl Into<String>) -> Self {
        Metadata {
            name: name.into(),
            description: String::new(),
            labels: BTreeMap::new(),
            revision: 0,
            expires: None,
        }
    }
}

impl<S> Object<S> {
    pub fn new(kind: Kind, metadata: Metadata, spec: S) -> Self {
        Object {
            kind: kind.as_str().to_string(),
            version: kind.version().to_string(),
            metadata,
            spec,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should say where
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("everything").is_ok());
        assert!(validate_name("a").is_ok());
        assert!(validate_name("my-app.v2_x").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("a-").is_err());
        assert!(validate_name("Upper").is_err());
        assert!(validate_name(&"a".repeat(63)).is_ok());
        let long = validate_name(&"a".repeat(300)).unwrap_err();
        assert!(long.to_string().contains("300 characters"), "{long}");
    }

    #[test]
    fn app_headers() {
        assert_eq!(
            header_parts("Bearer {{secret GH_TOKEN}} for {{ user.name }}").expect("parts"),
            vec![
                HeaderPart::Text("Bearer ".into()),
                HeaderPart::Secret("GH_TOKEN".into()),
                HeaderPart::Text(" for ".into()),
                HeaderPart::UserName,
            ]
        );
        assert!(header_parts("{{env HOME}}").is_err());
        assert!(header_parts("{{secret a-b}}").is_err());
        assert!(header_parts("{{secret X").is_err());
        let app = |headers: &[(&str, &str)]| AppSpec {
            uri: "mcp+https://x/mcp".into(),
            mcp: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            identity: None,
        };
        assert!(validate_app(&app(&[("X-Caller", "{{user.name}}")])).is_ok());
        for bad in [
            ("Mcp-Session-Id", "x"),
            ("Host", "x"),
            ("X Bad", "x"),
            ("X-Ok", "a\r\nInjected: yes"),
            ("X-Ok", "{{nope}}"),
        ] {
            assert!(validate_app(&app(&[bad])).is_err(), "{bad:?}");
        }
        let stdio = AppSpec {
            uri: String::new(),
            mcp: Some(McpSpec {
                command: "x".into(),
                run_as_host_user: "u".into(),
                ..McpSpec::default()
            }),
            headers: BTreeMap::from([("X-A".to_string(), "b".to_string())]),
            identity: None,
        };
        assert!(validate_app(&stdio).is_err());
        let stdio_jwt = AppSpec {
            headers: BTreeMap::new(),
            identity: Some(AppIdentity::Jwt),
            ..stdio
        };
        assert!(validate_app(&stdio_jwt).is_err(), "jwt is for upstreams");
        let mut jwt = app(&[("X-Caller", "{{user.name}}")]);
        jwt.identity = Some(AppIdentity::Jwt);
        assert!(validate_app(&jwt).is_ok());
        let mut both = app(&[("authorization", "Bearer x")]);
        both.identity = Some(AppIdentity::Jwt);
        assert!(validate_app(&both).is_err(), "one Authorization");
    }

    #[test]
    fn transports() {
        let t = |u: &str| {
            AppSpec {
                uri: u.into(),
                mcp: None,
                headers: BTreeMap::new(),
                identity: None,
            }
            .transport()
        };
        assert_eq!(t(""), Ok(Transport::Stdio));
        assert_eq!(t("mcp+stdio://"), Ok(Transport::Stdio));
        assert_eq!(
            t("mcp+https://x/mcp"),
            Ok(Transport::Http("https://x/mcp".into()))
        );
        assert_eq!(
            t("mcp+sse+http://x/sse"),
            Ok(Transport::Sse("http://x/sse".into()))
        );
        assert!(t("http://x").is_err());
        assert!(t("mcp+ftp://x").is_err());
    }
}
