//! Portico's end-to-end suites, in one test binary.

mod agent_limits;
mod agents;
mod conformance;
mod control_plane;
mod deploy;
mod examples;
mod faults;
mod hostile;
mod hostile_api;
mod identities;
mod leases;
mod mcp;
mod mcp_conformance;
mod quickstart;
mod tls;
mod watch;
mod web_ui;
