//! `psh mcp connect NAME`: a stdio MCP server for local clients that speaks
//! Streamable HTTP to the proxy. When the proxy loses the session (a restart,
//! say), the bridge opens a fresh one by replaying the client's initialize.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use portico_mcp::LineReader;
use portico_mcp::bridge::{Bridge, BridgeConfig};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::http::base_url;
use crate::profile::Profile;
use crate::{CliResult, Fail};

const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 1024;

pub async fn run(profile: Profile, app: String) -> CliResult {
    let (out, mut out_rx) = mpsc::channel::<Bytes>(1024);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(msg) = out_rx.recv().await {
            if stdout.write_all(&msg).await.is_err() || stdout.write_all(b"\n").await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
        }
    });
    let bridge = Bridge::new(
        BridgeConfig {
            connector: profile.connector()?,
            headers: Default::default(),
            url: format!("{}/mcp/{app}", base_url(&profile.proxy)),
            token: Some(profile.token.clone()),
            max: MAX_MESSAGE,
            replay: true,
            peer: "the proxy",
            notice: Arc::new(|m: &str| eprintln!("psh: {m}")),
        },
        out,
    );
    let mut stdin = LineReader::new(tokio::io::stdin(), MAX_MESSAGE);
    loop {
        let line = match stdin.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(Fail::new(format!(
                    "a message from the client exceeded {MAX_MESSAGE} bytes"
                )));
            }
            Err(e) => return Err(Fail::new(format!("reading standard input failed: {e}"))),
        };
        // With replay on, a lost session is reopened rather than reported.
        let _ = bridge.handle(line.to_vec()).await;
    }
    // Answers to requests already sent still reach the client.
    bridge.finish().await;
    drop(bridge);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}
