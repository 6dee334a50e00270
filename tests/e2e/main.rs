//! Portico's end-to-end suites, in one test binary.

mod agents;
mod conformance;
mod control_plane;
mod deploy;
mod examples;
mod hostile;
mod mcp;
mod quickstart;
mod watch;
