//! The MCP client configuration that launches `psh mcp connect`, as
//! `psh mcp config` prints it and the web UI shows it: one definition, so
//! the two never differ.

use serde_json::{Map, Value, json};

/// The MCP clients whose configuration format Portico knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpClient {
    /// Claude Desktop and Claude Code: `{"mcpServers": {...}}`.
    Claude,
    /// Cursor: the same shape as Claude's.
    Cursor,
    /// VS Code: `{"servers": {...}}`, each entry with `"type": "stdio"`.
    VsCode,
}

impl McpClient {
    pub const ALL: [McpClient; 3] = [McpClient::Claude, McpClient::Cursor, McpClient::VsCode];

    pub fn parse(s: &str) -> Option<McpClient> {
        match s {
            "claude" => Some(McpClient::Claude),
            "cursor" => Some(McpClient::Cursor),
            "vscode" => Some(McpClient::VsCode),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            McpClient::Claude => "claude",
            McpClient::Cursor => "cursor",
            McpClient::VsCode => "vscode",
        }
    }

    /// The name people know it by.
    pub fn title(self) -> &'static str {
        match self {
            McpClient::Claude => "Claude",
            McpClient::Cursor => "Cursor",
            McpClient::VsCode => "VS Code",
        }
    }

    /// The key that holds the servers in the client's configuration file.
    pub fn servers_key(self) -> &'static str {
        match self {
            McpClient::VsCode => "servers",
            McpClient::Claude | McpClient::Cursor => "mcpServers",
        }
    }
}

/// The key a server's entry has in a client configuration.
pub fn entry_name(app: &str) -> String {
    format!("portico-{app}")
}

/// One server's entry: run `psh mcp connect NAME`.
pub fn server_entry(psh: &str, app: &str, client: McpClient) -> Value {
    let mut v = json!({"command": psh, "args": ["mcp", "connect", app]});
    if client == McpClient::VsCode {
        v["type"] = "stdio".into();
    }
    v
}

/// The servers' entries, keyed by `entry_name`.
pub fn servers(psh: &str, apps: &[String], client: McpClient) -> Map<String, Value> {
    apps.iter()
        .map(|a| (entry_name(a), server_entry(psh, a, client)))
        .collect()
}

/// A whole configuration document for these servers.
pub fn document(psh: &str, apps: &[String], client: McpClient) -> Value {
    json!({ client.servers_key(): servers(psh, apps, client) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let apps = vec!["everything".to_string()];
        assert_eq!(
            document("psh", &apps, McpClient::Claude),
            json!({"mcpServers": {"portico-everything": {"command": "psh", "args": ["mcp", "connect", "everything"]}}})
        );
        assert_eq!(
            document("psh", &apps, McpClient::VsCode),
            json!({"servers": {"portico-everything": {"type": "stdio", "command": "psh", "args": ["mcp", "connect", "everything"]}}})
        );
        for c in McpClient::ALL {
            assert_eq!(McpClient::parse(c.as_str()), Some(c));
        }
    }
}
