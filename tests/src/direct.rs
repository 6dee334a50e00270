//! A direct stdio JSON-RPC session with an MCP server: the baseline the
//! proxied path is compared with.

use std::time::Duration;

use portico_mcp::LineReader;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

pub struct Direct {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: LineReader<tokio::process::ChildStdout>,
    id: i64,
}

impl Direct {
    /// Spawns the server and completes initialize + notifications/initialized.
    pub async fn start(cmd: &std::path::Path, args: &[String]) -> Direct {
        let mut child = tokio::process::Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let stdin = child.stdin.take().expect("stdin");
        let lines = LineReader::new(
            child.stdout.take().expect("stdout"),
            portico_mcp::DEFAULT_MAX_MESSAGE,
        );
        let mut d = Direct {
            child,
            stdin,
            lines,
            id: 0,
        };
        d.rpc("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "portico-direct", "version": "1"}}))
            .await;
        d.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        d
    }

    pub async fn send(&mut self, v: &Value) {
        self.stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write");
    }

    /// Sends a request and returns its response, skipping anything else.
    pub async fn rpc(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let id = self.id;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .expect("answer in 30 s")
                .expect("read")
                .expect("a line");
            let v: Value = serde_json::from_slice(&line).expect("json");
            if v["id"] == json!(id) && v.get("method").is_none() {
                return v;
            }
        }
    }

    /// Writes `request` (one JSON-RPC message, without its newline) as it
    /// is and returns the next line the server writes, unparsed: a relay.
    pub async fn exchange(&mut self, request: &[u8]) -> bytes::Bytes {
        let mut line = Vec::with_capacity(request.len() + 1);
        line.extend_from_slice(request);
        line.push(b'\n');
        self.stdin.write_all(&line).await.expect("write");
        tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("answer in 30 s")
            .expect("read")
            .expect("a line")
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}
