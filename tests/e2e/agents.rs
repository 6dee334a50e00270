//! Agents: label-selected registration, tunnels and MCP process supervision.
