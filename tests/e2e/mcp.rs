//! MCP sessions through the proxy with real clients.
