//! `portico.yaml`: one file for any mix of services.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use portico_agent::{AgentConfig, AgentMcpConfig, ResourceSelector};
use portico_auth::AuthConfig;
use portico_proxy::ProxyConfig;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    auth_service: Option<AuthConfig>,
    #[serde(default)]
    proxy_service: Option<ProxyConfig>,
    #[serde(default)]
    app_service: Option<AgentConfig>,
}

/// The services to run; `None` means disabled.
pub struct Config {
    pub data_dir: PathBuf,
    pub auth: Option<AuthConfig>,
    pub proxy: Option<ProxyConfig>,
    pub agent: Option<AgentConfig>,
}

impl Config {
    /// The all-in-one: auth on SQLite, proxy and a wildcard agent, on loopback.
    pub fn quick_start() -> Self {
        Config {
            data_dir: PathBuf::from("portico-data"),
            auth: Some(AuthConfig {
                listen_addr: "127.0.0.1:3025".into(),
                ..AuthConfig::default()
            }),
            proxy: Some(ProxyConfig {
                web_listen_addr: "127.0.0.1:3080".into(),
                tunnel_listen_addr: "127.0.0.1:3024".into(),
                ..ProxyConfig::default()
            }),
            agent: Some(AgentConfig {
                enabled: true,
                resources: vec![ResourceSelector {
                    labels: BTreeMap::from([("*".to_string(), "*".to_string())]),
                }],
                // One person's machine: their own account may run servers
                // (and could read the data directory anyway), besides any
                // account the default allows.
                mcp: Some(AgentMcpConfig {
                    allow_agent_account: true,
                    ..AgentMcpConfig::default()
                }),
                ..AgentConfig::default()
            }),
        }
    }
}

pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() > 1024 * 1024 {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let text = expand_env(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let de = yaml_serde::Deserializer::from_str(&text);
    let f: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let mut msg = inner.to_string();
        if let Some(i) = msg.find(" at line ") {
            msg.truncate(i);
        }
        let at = inner
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        format!("{}{at}: {field}: {msg}", path.display())
    })?;
    if let Some(v) = &f.version
        && v != "v1"
    {
        return Err(format!(
            "{}: version: only v1 is known, got {v:?}",
            path.display()
        ));
    }
    let enabled = |b: bool| b;
    Ok(Config {
        data_dir: f.data_dir.unwrap_or_else(|| PathBuf::from("portico-data")),
        auth: f.auth_service.filter(|a| enabled(a.enabled)),
        proxy: f.proxy_service.filter(|p| enabled(p.enabled)),
        agent: f.app_service.filter(|a| enabled(a.enabled)),
    })
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values, so one
/// file serves docker-compose and a plain process alike.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err("an unclosed ${ in the file".into());
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "the environment variable {name} is not set (used as ${{{name}}})"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn expands() {
        assert_eq!(
            super::expand_env("a: ${PORTICO_NOPE_X:-d}").as_deref(),
            Ok("a: d")
        );
        assert!(super::expand_env("a: ${PORTICO_NOPE_X}").is_err());
        assert_eq!(
            super::expand_env("$HOME stays").as_deref(),
            Ok("$HOME stays")
        );
    }
}
