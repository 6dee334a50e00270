//! `psh`: the user's command line: log in once, list and connect to MCP servers.
fn main() {}
