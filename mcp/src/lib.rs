//! Portico's MCP wire handling, in one place: the JSON-RPC message model
//! with its one strict parser, newline framing with a bound, Server-Sent
//! Events, and the bridge from newline-delimited JSON-RPC to a Streamable
//! HTTP endpoint.

pub mod bridge;
pub mod framing;
pub mod jsonrpc;
pub mod lists;
pub mod sse;
mod strict;

pub use framing::{LineBuffer, LineReader};

/// The largest JSON-RPC message relayed by default, in bytes.
pub const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;
pub use jsonrpc::{Id, Message, ParseError, Shape};
