//! The end-to-end harness: real services started in-process on
//! `127.0.0.1:0` through their `serve()`/`start()` entry points, a real
//! database (SQLite in a temporary directory, or a fresh Postgres database
//! per cluster), real MCP servers as child processes, and real clients.

pub mod chaos;
pub mod cluster;
pub mod direct;
pub mod mcp_http;
pub mod pg;
pub mod scale;
pub mod soak;
pub mod util;
pub mod web;

pub use cluster::{Cluster, ClusterBuilder, Storage};
pub use util::{TempDir, bin, eventually};
