//! MCP sessions through the proxy with real clients: the rmcp client via
//! `psh mcp connect`, the Python SDK, server-everything, RBAC on tools and
//! apps, and the Streamable HTTP rules at the edges.
#![allow(deprecated)] // roots are deprecated in newer revisions, still offered by clients

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use portico_tests::cluster::{run, text};
use portico_tests::direct::Direct;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::test_app_yaml;
use portico_tests::{Cluster, ClusterBuilder, bin, eventually};
use rmcp::model::*;
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::{ClientHandler, ErrorData, RoleClient, ServiceExt};
use serde_json::{Value, json};

pub(crate) const PW: &str = "user-password-1";

fn clients_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// A file of the pinned npm test clients (installed by scripts/test.sh).
pub(crate) fn node_file(rel: &str) -> PathBuf {
    let node_dir = std::env::var("PORTICO_NODE_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| clients_dir().join("node_modules"));
    let p = node_dir.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it installs the npm test clients)",
        p.display()
    );
    p
}

async fn cluster_with_app(env: &str) -> Cluster {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.create_yaml(&test_app_yaml("tm", env), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1"]).await;
    c
}

/// Logs in with psh into a fresh PORTICO_HOME and returns it.
pub(crate) async fn psh_login(c: &Cluster, user: &str) -> PathBuf {
    let home = c.data_dir().join(format!("home-{user}"));
    let mut cmd = tokio::process::Command::new(bin("psh"));
    cmd.args([
        "login",
        &format!("--proxy={}", c.proxy_addr()),
        &format!("--user={user}"),
        "--password-stdin",
    ])
    .arg("--ca-file")
    .arg(portico_tests::web::cert_file(c.proxy_addr()).expect("web certificate"))
    .env("PORTICO_HOME", &home);
    let o = run(cmd, Some(&format!("{PW}\n"))).await;
    assert!(o.status.success(), "{:?}", text(&o));
    home
}

async fn psh(home: &PathBuf, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin("psh"));
    cmd.args(args).env("PORTICO_HOME", home);
    run(cmd, None).await
}

#[derive(Clone, Default)]
struct TestClient {
    progress: Arc<Mutex<Vec<f64>>>,
    list_changed: Arc<Mutex<u32>>,
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder().enable_roots().build(),
            Implementation::new("portico-e2e-rmcp", "1"),
        )
    }

    #[allow(deprecated)]
    async fn list_roots(
        &self,
        _ctx: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, ErrorData> {
        Ok(ListRootsResult::new(vec![Root::new(
            "file:///tmp/portico-root",
        )]))
    }

    async fn on_progress(
        &self,
        p: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().expect("lock").push(p.progress);
    }

    async fn on_tool_list_changed(&self, _ctx: NotificationContext<RoleClient>) {
        *self.list_changed.lock().expect("lock") += 1;
    }
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn first_text(r: &CallToolResult) -> String {
    serde_json::to_value(&r.content)
        .ok()
        .and_then(|v| v[0]["text"].as_str().map(String::from))
        .unwrap_or_default()
}

#[tokio::test]
async fn rmcp_client_through_psh_connect() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let app = test_app_yaml("tm", "dev").replace(
        "    run_as_host_user:",
        "    env: {PORTICO_TEST_MCP_LIST_CHANGED: '1'}\n    run_as_host_user:",
    );
    c.create_yaml(&app, false).await.expect("app");
    c.wait_servers("tm", &["a1"]).await;
    c.add_user("alice", &["mcp-user"], PW).await;
    let home = psh_login(&c, "alice").await;

    let mut cmd = tokio::process::Command::new(bin("psh"));
    cmd.args(["mcp", "connect", "tm"])
        .env("PORTICO_HOME", &home);
    let transport = rmcp::transport::TokioChildProcess::new(cmd).expect("spawn psh mcp connect");
    let handler = TestClient::default();
    let client = handler
        .clone()
        .serve(transport)
        .await
        .expect("initialize through psh");
    let info = client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("portico-test-mcp")
    );

    let tools = client.list_tools(None).await.expect("tools/list");
    let names: Vec<String> = tools.tools.iter().map(|t| t.name.to_string()).collect();
    assert!(
        names.contains(&"echo".to_string()) && names.contains(&"roots".to_string()),
        "{names:?}"
    );
    let r = client
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"message": "via psh"}))),
        )
        .await
        .expect("echo");
    assert_eq!(first_text(&r), "via psh");
    let r = client
        .call_tool(CallToolRequestParams::new("add").with_arguments(args(json!({"a": 40, "b": 2}))))
        .await
        .expect("add");
    assert_eq!(first_text(&r), "42");

    // Server-to-client request in the middle of a call.
    let r = client
        .call_tool(CallToolRequestParams::new("roots"))
        .await
        .expect("roots");
    assert_eq!(first_text(&r), "file:///tmp/portico-root");

    // Progress notifications arrive while the call runs.
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("slow").with_arguments(args(json!({"ms": 500}))),
            )),
            rmcp::service::PeerRequestOptions::no_options(),
        )
        .await
        .expect("slow sent");
    let done = handle.await_response().await.expect("slow answered");
    assert!(format!("{done:?}").contains("done"));
    assert!(
        handler.progress.lock().expect("lock").len() >= 5,
        "progress seen: {:?}",
        handler.progress.lock().expect("lock")
    );

    let res = client.list_resources(None).await.expect("resources/list");
    assert_eq!(res.resources[0].uri, "test://hello");
    let read = client
        .read_resource(ReadResourceRequestParams::new("test://hello"))
        .await
        .expect("read");
    assert!(
        serde_json::to_string(&read)
            .expect("json")
            .contains("hello resource")
    );
    let prompts = client.list_prompts(None).await.expect("prompts/list");
    assert_eq!(prompts.prompts[0].name, "greet");
    let p = client
        .get_prompt(
            GetPromptRequestParams::new("greet").with_arguments(args(json!({"name": "rmcp"}))),
        )
        .await
        .expect("get_prompt");
    assert!(
        serde_json::to_string(&p)
            .expect("json")
            .contains("Hello, rmcp!")
    );

    // The notification the server sent right after initialized arrived.
    eventually(
        Duration::from_secs(5),
        "tools/list_changed delivered",
        || {
            let n = handler.list_changed.clone();
            async move { (*n.lock().expect("lock") >= 1).then_some(()) }
        },
    )
    .await;
    client.cancel().await.expect("close");

    // The proxy audited the session.
    eventually(Duration::from_secs(10), "session audit events", || async {
        let o = c
            .pctl(&["events", "ls", "--type", "mcp", "--format", "json"])
            .await;
        let v: Value = serde_json::from_str(&text(&o).0).ok()?;
        let types: Vec<String> = v
            .as_array()?
            .iter()
            .filter_map(|e| e["type"].as_str().map(String::from))
            .collect();
        let start = v
            .as_array()?
            .iter()
            .find(|e| e["type"] == "mcp.session.start")?;
        (start["fields"]["client_name"] == "portico-e2e-rmcp"
            && start["fields"]["user"] == "alice"
            && types.iter().filter(|t| *t == "mcp.session.request").count() >= 4
            && types.contains(&"mcp.session.end".to_string()))
        .then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn python_sdk_client_in_auto_mode() {
    let py = std::env::var("PORTICO_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|_| clients_dir().join(".venv/bin/python"));
    assert!(
        py.exists(),
        "{} is missing: run scripts/test.sh (it installs the Python MCP SDK)",
        py.display()
    );
    let c = cluster_with_app("dev").await;
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: careful}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*']}\n  deny:\n    mcp: {tools: ['delete_*']}\n", false).await.expect("role");
    c.add_user("py", &["careful"], PW).await;
    let token = c.login("py", PW).await;
    let mut cmd = tokio::process::Command::new(&py);
    cmd.arg(clients_dir().join("py_client.py"))
        .arg(format!(
            "{}/mcp/tm",
            portico_tests::web::base(c.proxy_addr())
        ))
        .env("PORTICO_TOKEN", &token);
    portico_tests::web::trust_env(&mut cmd, c.proxy_addr());
    let o = run(cmd, None).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "python client failed: {out} {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["server_name"], "portico-test-mcp");
    assert_eq!(v["echo"], "hi from python");
    assert!(
        !v["tools"]
            .as_array()
            .expect("tools")
            .contains(&json!("delete_everything")),
        "{v}"
    );
    assert!(
        v["denied"]
            .as_str()
            .unwrap_or_default()
            .contains("RBAC denied"),
        "{v}"
    );
    assert_eq!(v["resource"], "hello resource");
    assert_eq!(v["prompt"], "Hello, py!");
    c.shutdown().await;
}

fn sample_args(schema: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for name in schema["required"].as_array().cloned().unwrap_or_default() {
        let Some(name) = name.as_str() else { continue };
        let prop = &schema["properties"][name];
        let v = match prop["type"].as_str() {
            Some("number") | Some("integer") => json!(1),
            Some("boolean") => json!(true),
            Some("object") => json!({}),
            Some("array") => json!([]),
            _ => prop["enum"].get(0).cloned().unwrap_or(json!("x")),
        };
        out.insert(name.to_string(), v);
    }
    Value::Object(out)
}

/// The shape of a result, without values that change from run to run.
/// An answer's outcome by value: the result, or the error without its id.
fn outcome(v: &Value) -> Value {
    match v.get("error") {
        Some(e) => json!({"error": e}),
        None => v["result"].clone(),
    }
}

fn shape(v: &Value) -> Value {
    if let Some(e) = v.get("error") {
        return json!({"error": e["code"]});
    }
    let r = &v["result"];
    let types: Vec<Value> = r["content"]
        .as_array()
        .map(|a| a.iter().map(|c| c["type"].clone()).collect())
        .unwrap_or_default();
    json!({"isError": r.get("isError").cloned().unwrap_or(json!(false)), "content": types,
           "contents": r["contents"].as_array().map(|a| a.len()), "messages": r["messages"].as_array().map(|a| a.len())})
}

#[tokio::test]
async fn server_everything_answers_as_it_does_directly() {
    let entry = node_file("@modelcontextprotocol/server-everything/dist/index.js");
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let yaml = format!(
        "kind: app\nversion: v3\nmetadata: {{name: everything, labels: {{env: dev}}}}\nspec:\n  mcp:\n    command: node\n    args: [{}, stdio]\n    run_as_host_user: {}\n",
        entry.display(),
        portico_tests::util::me()
    );
    c.create_yaml(&yaml, false).await.expect("app");
    c.wait_servers("everything", &["a1"]).await;
    c.add_user("eve", &["mcp-user"], PW).await;
    let token = c.login("eve", PW).await;
    let mut direct = Direct::start(
        std::path::Path::new("node"),
        &[entry.display().to_string(), "stdio".into()],
    )
    .await;
    let mut proxied = McpHttp::new(c.proxy_addr(), "everything", &token);
    proxied
        .initialize()
        .await
        .expect("initialize through the proxy");

    for list in [
        "tools/list",
        "resources/list",
        "prompts/list",
        "resources/templates/list",
    ] {
        let d = direct.rpc(list, json!({})).await;
        let p = proxied.request(list, json!({})).await;
        assert_eq!(d["result"], p["result"], "{list} differs");
    }
    let tools = direct.rpc("tools/list", json!({})).await["result"]["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(tools.len() >= 5, "server-everything lists its tools");
    let (mut called, mut by_value) = (0, 0);
    for t in &tools {
        let name = t["name"].as_str().unwrap_or_default().to_string();
        let mut a = sample_args(&t["inputSchema"]);
        if name.contains("long-running") {
            // Keep it short: the defaults run for several seconds.
            a = json!({"duration": 1, "steps": 2});
        }
        let d = direct
            .rpc("tools/call", json!({"name": name, "arguments": a}))
            .await;
        // Asked twice directly: an answer that comes back the same is
        // deterministic, and the proxied one must equal it by value.
        let again = direct
            .rpc("tools/call", json!({"name": name, "arguments": a}))
            .await;
        let p = proxied
            .request("tools/call", json!({"name": name, "arguments": a}))
            .await;
        if name == "get-env" {
            // By design it differs: the agent starts servers with a minimal
            // environment, not the test's own.
            let env = p["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default();
            assert!(env.contains("\"PATH\""), "{env}");
            assert!(
                !env.contains("DATABASE_URL") && !env.contains("PORTICO_"),
                "the server sees none of the agent's environment: {env}"
            );
        } else if outcome(&d) == outcome(&again) {
            assert_eq!(
                outcome(&d),
                outcome(&p),
                "tool {name}: direct {d} proxied {p}"
            );
            by_value += 1;
        } else {
            assert_eq!(shape(&d), shape(&p), "tool {name}: direct {d} proxied {p}");
        }
        called += 1;
    }
    assert_eq!(called, tools.len(), "every tool was called");
    println!("{called} tools called, {by_value} compared by value (the rest vary between calls)");
    assert!(
        by_value >= 3,
        "the deterministic tools (echo, sums, ...) compare by value"
    );
    let resources = direct.rpc("resources/list", json!({})).await["result"]["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for r in &resources {
        let uri = r["uri"].clone();
        let d = direct.rpc("resources/read", json!({"uri": uri})).await;
        let p = proxied.request("resources/read", json!({"uri": uri})).await;
        assert_eq!(d["result"], p["result"], "resource {uri}");
    }
    let prompts = direct.rpc("prompts/list", json!({})).await["result"]["prompts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for pr in &prompts {
        let mut a = serde_json::Map::new();
        for arg in pr["arguments"].as_array().cloned().unwrap_or_default() {
            if arg["required"] == json!(true) {
                a.insert(arg["name"].as_str().unwrap_or("x").to_string(), json!("1"));
            }
        }
        let name = pr["name"].clone();
        let d = direct
            .rpc("prompts/get", json!({"name": name, "arguments": a}))
            .await;
        let again = direct
            .rpc("prompts/get", json!({"name": name, "arguments": a}))
            .await;
        let p = proxied
            .request("prompts/get", json!({"name": name, "arguments": a}))
            .await;
        if outcome(&d) == outcome(&again) {
            assert_eq!(outcome(&d), outcome(&p), "prompt {name}");
        } else {
            assert_eq!(shape(&d), shape(&p), "prompt {name}");
        }
    }
    c.shutdown().await;
}

#[tokio::test]
async fn tool_and_app_rbac() {
    let c = cluster_with_app("dev").await;
    c.create_yaml(&test_app_yaml("prod-only", "prod"), false)
        .await
        .expect("app");
    c.wait_servers("prod-only", &["a1"]).await;
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: echo-only}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: [echo]}\n", false).await.expect("role");
    c.add_user("eo", &["echo-only"], PW).await;
    let token = c.login("eo", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("initialize");
    let tools = s.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, vec!["echo"]);
    let r = s.call("add", json!({"a": 1, "b": 2})).await;
    assert_eq!(r["error"]["code"], -32602);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("RBAC denied"),
        "{r}"
    );
    assert_eq!(
        s.call("echo", json!({"message": "ok"})).await["result"]["content"][0]["text"],
        "ok"
    );

    // No app_labels match: 403, and the app is not listed.
    let mut denied = McpHttp::new(c.proxy_addr(), "prod-only", &token);
    let e = denied.initialize().await.expect_err("forbidden");
    assert_eq!(e.status, StatusCode::FORBIDDEN);
    let home = psh_login(&c, "eo").await;
    let o = psh(&home, &["mcp", "ls", "--format", "json"]).await;
    let v: Value = serde_json::from_str(&text(&o).0).expect("json");
    let listed: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(listed, vec!["tm"]);
    assert_eq!(v[0]["allowed_tools"], json!(["echo"]));
    assert!(v[0].get("agents").is_none(), "agents only with -v: {v}");
    let o = psh(&home, &["mcp", "ls", "--format", "yaml", "-v"]).await;
    let y: Value = yaml_serde::from_str(&text(&o).0).expect("yaml");
    // One app: a sequence of one, or the document itself.
    let y = if y.is_array() { y[0].clone() } else { y };
    assert_eq!(y["agents"], json!(["a1"]), "{y}");
    assert_eq!(
        y["endpoint"],
        json!(format!("https://{}/mcp/tm", c.proxy_addr())),
        "{y}"
    );
    assert_eq!(y["allowed_tools"], json!(["echo"]), "{y}");

    // A role change reaches the live session within a second.
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: echo-only}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*']}\n  deny:\n    mcp: {tools: [echo, 'delete_*']}\n", true).await.expect("role update");
    let started = std::time::Instant::now();
    loop {
        let r = s.call("echo", json!({"message": "x"})).await;
        if r.get("error").is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the role change took longer than a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.call("add", json!({"a": 1, "b": 2})).await["result"]["content"][0]["text"],
        "3"
    );
    let tools = s.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        !names.contains(&"echo") && !names.contains(&"delete_everything") && names.contains(&"add"),
        "deny wins: {names:?}"
    );
    let o = c
        .pctl(&[
            "events",
            "ls",
            "--type",
            "mcp.session.request",
            "--format",
            "json",
        ])
        .await;
    let all = text(&o).0;
    assert!(
        all.contains("\"allowed\": false") && all.contains("\"tool\": \"add\""),
        "{all}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn streamable_http_edges() {
    let c = cluster_with_app("dev").await;
    c.add_user("u1", &["mcp-user"], PW).await;
    c.add_user("u2", &["mcp-user"], PW).await;
    let t1 = c.login("u1", PW).await;
    let t2 = c.login("u2", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &t1);
    let init = s.initialize().await.expect("initialize");
    assert_eq!(init["serverInfo"]["name"], "portico-test-mcp");
    let sid = s.session.clone().expect("session id");
    assert_eq!(sid.len(), 64);
    let ping = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).to_string();
    let json_hdrs = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];

    let anon = McpHttp::new(c.proxy_addr(), "tm", "");
    let r = anon.send(http::Method::POST, &json_hdrs, Some(&ping)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.contains_key("www-authenticate"));
    let forged = McpHttp::new(c.proxy_addr(), "tm", &"0".repeat(64));
    assert_eq!(
        forged
            .send(http::Method::POST, &json_hdrs, Some(&ping))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    let fresh = McpHttp::new(c.proxy_addr(), "tm", &t1);
    let r = fresh
        .send(http::Method::POST, &json_hdrs, Some(&ping))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "no session id");
    let r = fresh
        .send(
            http::Method::POST,
            &[
                json_hdrs[0],
                json_hdrs[1],
                ("mcp-session-id", &"f".repeat(64)),
            ],
            Some(&ping),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "unknown session");
    // Another user presenting this session id is not let in.
    let thief = McpHttp::new(c.proxy_addr(), "tm", &t2);
    let r = thief
        .send(
            http::Method::POST,
            &[json_hdrs[0], json_hdrs[1], ("mcp-session-id", &sid)],
            Some(&ping),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "sessions are bound to their user"
    );
    assert_eq!(
        s.send(http::Method::PUT, &[], None).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        s.send(http::Method::GET, &[("accept", "application/json")], None)
            .await
            .status,
        StatusCode::NOT_ACCEPTABLE
    );
    assert_eq!(
        s.send(
            http::Method::POST,
            &[("content-type", "text/plain")],
            Some(&ping)
        )
        .await
        .status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let big = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"params\":{{\"p\":\"{}\"}}}}",
        "a".repeat(5 * 1024 * 1024)
    );
    assert_eq!(
        s.send(http::Method::POST, &json_hdrs, Some(&big))
            .await
            .status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let r = s
        .send(http::Method::POST, &json_hdrs, Some("{not json"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.messages()[0]["error"]["code"], -32700);
    let r = s
        .send(
            http::Method::POST,
            &[
                json_hdrs[0],
                json_hdrs[1],
                ("origin", "http://evil.example"),
            ],
            Some(&ping),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = s
        .send(
            http::Method::POST,
            &[
                json_hdrs[0],
                json_hdrs[1],
                ("origin", &format!("https://{}", c.proxy_addr())),
            ],
            Some(&ping),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "same origin is fine");

    // Unknown methods pass through and their errors come back.
    let r = s.request("vendor/unknown-method", json!({})).await;
    assert_eq!(r["error"]["code"], -32601, "{r}");
    let r = s.request("server/discover", json!({})).await;
    assert!(
        r["error"]["code"].is_i64() || r["result"].is_object(),
        "the server's own answer comes back: {r}"
    );
    // A batch (2025-03-26) and a pretty-printed body.
    let r = s
        .send(http::Method::POST, &json_hdrs, Some("[{\"jsonrpc\":\"2.0\",\"id\":21,\"method\":\"tools/list\"},\n {\"jsonrpc\":\"2.0\",\"id\":22,\n \"method\":\"prompts/list\"}]"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.response(21)["result"]["tools"].is_array()
            && r.response(22)["result"]["prompts"].is_array()
    );
    // SSE events carry ids.
    assert!(
        String::from_utf8_lossy(&r.body).contains("id: "),
        "event ids"
    );
    // One request answered at once: the answer alone, as plain JSON...
    let ctype = |r: &portico_tests::mcp_http::Reply| {
        r.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let one = json!({"jsonrpc": "2.0", "id": 23, "method": "tools/list"}).to_string();
    let r = s.send(http::Method::POST, &json_hdrs, Some(&one)).await;
    assert_eq!(ctype(&r), "application/json", "{r:?}");
    assert!(r.response(23)["result"]["tools"].is_array(), "{r:?}");
    assert_eq!(r.messages().len(), 1, "{r:?}");
    // ...also when the proxy answers it itself (a call naming no tool)...
    let refused =
        json!({"jsonrpc": "2.0", "id": 24, "method": "tools/call", "params": {"arguments": {}}})
            .to_string();
    let r = s.send(http::Method::POST, &json_hdrs, Some(&refused)).await;
    assert_eq!(ctype(&r), "application/json", "{r:?}");
    assert_eq!(r.response(24)["error"]["code"], -32602, "{r:?}");
    // ...but SSE for a client that takes only SSE...
    let r = s
        .send(
            http::Method::POST,
            &[
                ("content-type", "application/json"),
                ("accept", "text/event-stream"),
            ],
            Some(&one),
        )
        .await;
    assert!(ctype(&r).starts_with("text/event-stream"), "{r:?}");
    assert!(r.response(23)["result"]["tools"].is_array(), "{r:?}");
    // ...and for a call whose server sends messages before its answer:
    // they come first, on the same stream, in order.
    let flood = json!({"jsonrpc": "2.0", "id": 25, "method": "tools/call", "params": {"name": "flood", "arguments": {"count": 3, "bytes": 8}, "_meta": {"progressToken": "p25"}}}).to_string();
    let r = s.send(http::Method::POST, &json_hdrs, Some(&flood)).await;
    assert!(ctype(&r).starts_with("text/event-stream"), "{r:?}");
    let got = r.messages();
    assert_eq!(got.len(), 4, "{r:?}");
    for (i, m) in got[..3].iter().enumerate() {
        assert_eq!(m["method"], "notifications/progress", "{r:?}");
        assert_eq!(m["params"]["progress"], json!(i as f64), "{r:?}");
    }
    assert_eq!(got[3]["id"], 25, "{r:?}");
    assert_eq!(got[3]["result"]["content"][0]["text"], "done", "{r:?}");
    // A big result crosses the tunnel intact.
    let r = s.call("big", json!({"bytes": 1_000_000})).await;
    assert_eq!(
        r["result"]["content"][0]["text"].as_str().map(str::len),
        Some(1_000_000)
    );

    assert_eq!(s.delete().await.status, StatusCode::OK);
    let r = s.send(http::Method::POST, &json_hdrs, Some(&ping)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "deleted session");

    // No agent serving an app: 503 with a JSON-RPC error body.
    c.create_yaml("kind: app\nversion: v3\nmetadata: {name: remote}\nspec: {uri: 'mcp+http://127.0.0.1:9/mcp'}\n", false).await.expect("app");
    let mut none = McpHttp::new(c.proxy_addr(), "remote", &t1);
    c.wait_servers("remote", &["a1"]).await;
    c.agent("a1").shutdown();
    c.wait_servers("remote", &[]).await;
    let e = none.initialize().await.expect_err("no agent");
    assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        e.messages()[0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no agent"),
        "{e:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn psh_commands() {
    let c = cluster_with_app("dev").await;
    c.create_yaml(&test_app_yaml("other", "test"), false)
        .await
        .expect("app");
    c.wait_servers("other", &["a1"]).await;
    c.add_user("pat", &["mcp-user"], PW).await;
    let home = psh_login(&c, "pat").await;
    let mode = std::fs::metadata(home.join("profile.yaml"))
        .expect("profile")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let o = psh(&home, &["status"]).await;
    assert!(text(&o).0.contains("user:    pat"), "{:?}", text(&o));
    let o = psh(&home, &["mcp", "ls"]).await;
    let out = text(&o).0;
    for col in [
        "Name",
        "Description",
        "Type",
        "Allowed Tools",
        "Labels",
        "tm",
        "other",
        "stdio",
        "env=dev",
    ] {
        assert!(out.contains(col), "{col} in {out}");
    }
    let o = psh(&home, &["mcp", "ls", "env=test"]).await;
    assert!(
        text(&o).0.contains("other") && !text(&o).0.contains("tm "),
        "{:?}",
        text(&o)
    );
    let o = psh(&home, &["mcp", "ls", "--search", "server tm", "-v"]).await;
    assert!(
        text(&o).0.contains("/mcp/tm") && !text(&o).0.contains("other"),
        "{:?}",
        text(&o)
    );
    let o = psh(&home, &["mcp", "config", "tm"]).await;
    let v: Value = serde_json::from_str(&text(&o).0).expect("json");
    assert_eq!(
        v["mcpServers"]["portico-tm"]["args"],
        json!(["mcp", "connect", "tm"])
    );
    let o = psh(
        &home,
        &["mcp", "config", "--all", "--client-config", "vscode"],
    )
    .await;
    let v: Value = serde_json::from_str(&text(&o).0).expect("json");
    assert_eq!(v["servers"]["portico-other"]["type"], "stdio");
    let file = c.data_dir().join("claude.json");
    std::fs::write(
        &file,
        "{\"mcpServers\": {\"mine\": {\"command\": \"x\"}}, \"theme\": \"dark\"}",
    )
    .expect("write");
    let o = psh(
        &home,
        &[
            "mcp",
            "config",
            "tm",
            "--client-config",
            file.to_str().expect("path"),
        ],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    assert_eq!(v["theme"], "dark");
    assert!(v["mcpServers"]["mine"].is_object() && v["mcpServers"]["portico-tm"].is_object());
    let o = psh(&home, &["mcp", "config", "nope"]).await;
    assert_eq!(o.status.code(), Some(1));
    // pctl with the psh profile goes through the proxy with pat's own rights.
    let mut cmd = tokio::process::Command::new(bin("pctl"));
    cmd.args(["get", "apps"])
        .env("PORTICO_HOME", &home)
        .env_remove("PORTICO_DATA_DIR")
        .current_dir(c.data_dir());
    let o = run(cmd, None).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("access denied"), "{:?}", text(&o));
    let o = psh(&home, &["logout"]).await;
    assert!(o.status.success());
    let o = psh(&home, &["mcp", "ls"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not logged in"));
    let mut cmd = tokio::process::Command::new(bin("psh"));
    cmd.args([
        "login",
        &format!("--proxy={}", c.proxy_addr()),
        "--user=pat",
        "--password-stdin",
    ])
    .arg("--ca-file")
    .arg(portico_tests::web::cert_file(c.proxy_addr()).expect("web certificate"))
    .env("PORTICO_HOME", &home);
    let o = run(cmd, Some("wrong-password\n")).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("invalid user name or password"),
        "{:?}",
        text(&o)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn psh_connect_survives_a_proxy_restart() {
    let mut c = cluster_with_app("dev").await;
    c.add_user("rex", &["mcp-user"], PW).await;
    let home = psh_login(&c, "rex").await;
    let addr = c.proxy_addr();
    let tunnel = c.tunnel_addr();
    let mut cmd = tokio::process::Command::new(bin("psh"));
    cmd.args(["mcp", "connect", "tm"])
        .env("PORTICO_HOME", &home);
    let client = TestClient::default()
        .serve(rmcp::transport::TokioChildProcess::new(cmd).expect("spawn"))
        .await
        .expect("init");
    let r = client
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"message": "one"}))),
        )
        .await
        .expect("echo");
    assert_eq!(first_text(&r), "one");

    // Restart the proxy on the same addresses; the agent re-dials.
    let proxy = c.proxy.take().expect("proxy");
    proxy.shutdown().await;
    let listeners = portico_proxy::Listeners {
        web: eventually(Duration::from_secs(10), "web port", || async move {
            tokio::net::TcpListener::bind(addr).await.ok()
        })
        .await,
        tunnel: eventually(Duration::from_secs(10), "tunnel port", || async move {
            tokio::net::TcpListener::bind(tunnel).await.ok()
        })
        .await,
    };
    let cfg = portico_proxy::ProxyConfig {
        auth_servers: vec![c.auth_addr.to_string()],
        ..Default::default()
    };
    let identity = c.data_dir().join("proxy");
    let p = portico_proxy::start(&cfg, portico_proxy::Credentials::join(identity), listeners)
        .await
        .expect("proxy again");
    portico_tests::web::register(&p);
    c.proxy = Some(p);
    c.wait_servers("tm", &["a1"]).await;
    c.wait_tunnel("a1").await;
    let r = client
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"message": "two"}))),
        )
        .await
        .expect("echo after restart");
    assert_eq!(first_text(&r), "two");
    client.cancel().await.expect("close");
    c.shutdown().await;
}

#[tokio::test]
async fn mcp_inspector_cli() {
    let launcher = node_file("@modelcontextprotocol/inspector/clients/launcher/build/index.js");
    let c = cluster_with_app("dev").await;
    c.add_user("ins", &["mcp-user"], PW).await;
    let token = c.login("ins", PW).await;
    let url = format!("{}/mcp/tm", portico_tests::web::base(c.proxy_addr()));
    let inspector = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new("node");
        portico_tests::web::trust_env(&mut cmd, c.proxy_addr());
        cmd.arg(&launcher)
            .args([
                "--cli",
                &url,
                "--transport",
                "http",
                "--header",
                &format!("Authorization: Bearer {token}"),
            ])
            .args(extra)
            .env("HOME", c.data_dir());
        run(cmd, None)
    };
    let o = inspector(&["--method", "tools/list"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    assert!(
        out.contains("\"echo\"") && out.contains("\"slow\""),
        "{out}"
    );
    let o = inspector(&[
        "--method",
        "tools/call",
        "--tool-name",
        "echo",
        "--tool-arg",
        "message=from-inspector",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(
        o.status.success() && out.contains("from-inspector"),
        "{out} {err}"
    );
    c.shutdown().await;
}

/// server-everything serving `mode` (`streamableHttp` or `sse`) on a free
/// loopback port, once it listens.
pub(crate) async fn everything_over(mode: &str) -> (tokio::process::Child, u16) {
    let entry = node_file("@modelcontextprotocol/server-everything/dist/index.js");
    let port = portico_tests::util::fixed_port();
    let child = tokio::process::Command::new("node")
        .arg(&entry)
        .arg(mode)
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("server-everything");
    eventually(
        Duration::from_secs(30),
        "upstream listening",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    (child, port)
}

#[tokio::test]
async fn upstream_streamable_http_app() {
    let entry = node_file("@modelcontextprotocol/server-everything/dist/index.js");
    let (_upstream, port) = everything_over("streamableHttp").await;
    // The same server behind a TLS terminator with a certificate of its own,
    // which only the CA file given to agent a1 vouches for.
    let tls_dir = portico_tests::TempDir::new("portico-upstream-tls");
    let (cert, key) =
        portico_tls::pki::self_signed_web(&["127.0.0.1".into()], Duration::from_secs(3600))
            .expect("certificate");
    let (cert_file, key_file) = (
        tls_dir.path().join("cert.pem"),
        tls_dir.path().join("key.pem"),
    );
    std::fs::write(&cert_file, &cert).expect("cert");
    std::fs::write(&key_file, &key).expect("key");
    let certs = portico_tls::WebCerts::from_files(vec![(
        cert_file.display().to_string(),
        key_file.display().to_string(),
    )])
    .expect("certs");
    let mut term_cfg = (*portico_tls::config::web_server(certs).expect("config")).clone();
    // Bytes are passed through to an HTTP/1.1 server.
    term_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let term_cfg = std::sync::Arc::new(term_cfg);
    let term = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tls_port = term.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = term.accept().await {
            let cfg = term_cfg.clone();
            tokio::spawn(async move {
                let Ok(mut tls) =
                    portico_tls::net::accept(s, cfg, portico_tls::Plaintext::Refuse("test")).await
                else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    let me = portico_tests::util::me();
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml(
            "a1",
            &format!(
                "app_service:\n  resources:\n  - labels: {{env: dev}}\n  mcp:\n    allowed_host_users: [{me}]\n    upstream_ca_file: {}\n",
                cert_file.display()
            ),
        )
        .agent_yaml(
            "no-ca",
            &format!("app_service:\n  resources:\n  - labels: {{env: unverified}}\n  mcp:\n    allowed_host_users: [{me}]\n"),
        )
        .start()
        .await;
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: remote-everything, labels: {{env: dev}}}}\nspec: {{uri: 'mcp+http://127.0.0.1:{port}/mcp'}}\n"), false)
        .await
        .expect("app");
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: tls-everything, labels: {{env: dev}}}}\nspec: {{uri: 'mcp+https://127.0.0.1:{tls_port}/mcp'}}\n"), false).await.expect("app");
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: tls-unverified, labels: {{env: unverified}}}}\nspec: {{uri: 'mcp+https://127.0.0.1:{tls_port}/mcp'}}\n"), false).await.expect("app");
    c.create_yaml("kind: app\nversion: v3\nmetadata: {name: sse-only, labels: {env: dev}}\nspec: {uri: 'mcp+sse+http://127.0.0.1:1/sse'}\n", false).await.expect("app");
    c.wait_servers("remote-everything", &["a1"]).await;
    c.wait_servers("tls-everything", &["a1"]).await;
    c.wait_servers("tls-unverified", &["no-ca"]).await;
    c.wait_servers("sse-only", &["a1"]).await;
    c.add_user("ru", &["mcp-user"], PW).await;
    let token = c.login("ru", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "remote-everything", &token);
    let init = s
        .initialize()
        .await
        .expect("initialize through the agent's HTTP relay");
    assert!(init["serverInfo"]["name"].is_string(), "{init}");
    let tools = s.request("tools/list", json!({})).await;
    let mut direct = Direct::start(
        std::path::Path::new("node"),
        &[entry.display().to_string(), "stdio".into()],
    )
    .await;
    let want = direct.rpc("tools/list", json!({})).await;
    assert_eq!(
        tools["result"], want["result"],
        "same tools over HTTP as over stdio"
    );
    let r = s.call("echo", json!({"message": "over http"})).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("over http"),
        "{r}"
    );
    let r = s.call("get-sum", json!({"a": 2, "b": 3})).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains('5'),
        "{r}"
    );
    assert_eq!(s.delete().await.status, StatusCode::OK);

    // Over HTTPS, verified with the agent's CA file: the same tools.
    let mut t = McpHttp::new(c.proxy_addr(), "tls-everything", &token);
    t.initialize()
        .await
        .expect("initialize through the agent's HTTPS relay");
    let tools = t.request("tools/list", json!({})).await;
    assert_eq!(tools["result"], want["result"], "same tools over HTTPS");
    let r = t.call("echo", json!({"message": "over https"})).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("over https"),
        "{r}"
    );
    assert_eq!(t.delete().await.status, StatusCode::OK);
    // An agent that nothing tells to trust that certificate does not talk to it.
    let u = McpHttp::new(c.proxy_addr(), "tls-unverified", &token);
    let r = u
        .post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}))
        .await;
    let said = if r.status == StatusCode::OK {
        r.response(0)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        String::from_utf8_lossy(&r.body).to_string()
    };
    assert!(
        r.status != StatusCode::OK || r.response(0).get("result").is_none(),
        "an unverified upstream answered"
    );
    eprintln!("an unverified https upstream: {said}");
    assert!(said.to_lowercase().contains("certificate"), "{said}");
    // An HTTP+SSE upstream that is not there: a clear error, no hang.
    let x = McpHttp::new(c.proxy_addr(), "sse-only", &token);
    let r = x
        .post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}))
        .await;
    let said = format!("{} {}", String::from_utf8_lossy(&r.body), r.status);
    assert!(
        said.contains("cannot reach the upstream MCP server"),
        "{said}"
    );
    c.shutdown().await;
}

/// `psh proxy mcp APP` running for the login in `home`, and the URL it printed.
pub(crate) async fn psh_proxy_mcp(home: &PathBuf, app: &str) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut local = tokio::process::Command::new(bin("psh"))
        .args(["proxy", "mcp", app])
        .env("PORTICO_HOME", home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("psh proxy mcp");
    let mut lines = tokio::io::BufReader::new(local.stdout.take().expect("stdout")).lines();
    let url = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the URL is printed")
        .expect("read")
        .expect("a line");
    // Whatever it prints later is read too: a closed pipe would end it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (local, url)
}

#[tokio::test]
async fn psh_proxy_mcp_serves_clients_without_headers() {
    let launcher = node_file("@modelcontextprotocol/inspector/clients/launcher/build/index.js");
    let c = cluster_with_app("dev").await;
    c.add_user("lo", &["mcp-user"], PW).await;
    let home = psh_login(&c, "lo").await;
    let (mut local, url) = psh_proxy_mcp(&home, "tm").await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"),
        "{url}"
    );
    // A client with no header of its own.
    let inspector = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(&launcher)
            .args(["--cli", &url, "--transport", "http"])
            .args(extra)
            .env("HOME", c.data_dir());
        run(cmd, None)
    };
    let o = inspector(&["--method", "tools/list"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    assert!(out.contains("\"echo\""), "{out}");
    let o = inspector(&[
        "--method",
        "tools/call",
        "--tool-name",
        "echo",
        "--tool-arg",
        "message=through-local",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(
        o.status.success() && out.contains("through-local"),
        "{out} {err}"
    );
    // A web page elsewhere, or a name that is not this endpoint's, is refused.
    let port = url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/mcp")
        .to_string();
    let raw = |headers: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut b = http::Request::post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream");
            for (k, v) in headers {
                b = b.header(k, v);
            }
            let req = b
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
                )))
                .expect("request");
            client.request(req).await.expect("answer").status()
        }
    };
    assert_eq!(
        raw(vec![("origin", "http://evil.example".into())]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        raw(vec![("host", format!("evil.example:{port}"))]).await,
        StatusCode::FORBIDDEN
    );
    // Its own origin is fine (the proxy then wants a session).
    assert_ne!(
        raw(vec![("origin", format!("http://127.0.0.1:{port}"))]).await,
        StatusCode::FORBIDDEN
    );
    let _ = local.start_kill();
    c.shutdown().await;
}

#[tokio::test]
async fn psh_proxy_mcp_stops_when_the_login_expires() {
    let c = ClusterBuilder::new()
        .session_ttl("3s")
        .proxy()
        .start()
        .await;
    c.add_user("brief", &["mcp-user"], PW).await;
    let home = psh_login(&c, "brief").await;
    let local = tokio::process::Command::new(bin("psh"))
        .args(["proxy", "mcp", "tm"])
        .env("PORTICO_HOME", &home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psh proxy mcp");
    let o = tokio::time::timeout(Duration::from_secs(15), local.wait_with_output())
        .await
        .expect("it stops by itself")
        .expect("output");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("your login expired") && err.contains("psh login"),
        "{err}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn role_changes_tell_live_sessions_their_lists_changed() {
    let c = cluster_with_app("dev").await;
    let role = |deny: &str| {
        format!(
            "kind: role\nversion: v8\nmetadata: {{name: lister, description: {deny}}}\nspec:\n  allow:\n    app_labels: {{env: dev}}\n    mcp: {{tools: ['*']}}\n  deny:\n    mcp: {{tools: [{deny}]}}\n"
        )
    };
    c.create_yaml(&role("nothing"), false).await.expect("role");
    c.add_user("li", &["lister"], PW).await;
    let token = c.login("li", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("session");
    let names = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = names(&s.request("tools/list", json!({})).await);
    assert!(before.iter().any(|n| n == "echo"), "{before:?}");

    // While a slow call holds a stream open, a change that hides nothing...
    let slow = |s: McpHttp, id: i64| {
        tokio::spawn(async move {
            let r = s
                .post(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": {"name": "slow", "arguments": {"ms": 1500}}}))
                .await;
            (r, s)
        })
    };
    let pending = slow(s, 100);
    c.wait_pending(1).await;
    c.create_yaml(&role("nothing-at-all"), true)
        .await
        .expect("role touched");
    let (r, s) = pending.await.expect("task");
    let changed = |r: &portico_tests::mcp_http::Reply| {
        r.messages()
            .iter()
            .any(|m| m["method"] == "notifications/tools/list_changed")
    };
    assert!(
        !changed(&r),
        "nothing changed, nothing said: {:?}",
        r.messages()
    );

    // ...and one that hides echo, which the client is told of.
    let pending = slow(s, 101);
    c.wait_pending(1).await;
    c.create_yaml(&role("echo"), true)
        .await
        .expect("echo denied");
    let (r, mut s) = pending.await.expect("task");
    assert!(changed(&r), "{:?}", r.messages());
    let after = names(&s.request("tools/list", json!({})).await);
    assert!(!after.iter().any(|n| n == "echo"), "{after:?}");
    assert_eq!(after.len() + 1, before.len(), "{before:?} {after:?}");
    c.shutdown().await;
}

/// Reads SSE events (`id`, `data` as JSON) from a body until `done` says
/// so, the body ends, or `limit` passes.
async fn read_events(
    body: &mut hyper::body::Incoming,
    limit: Duration,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    use http_body_util::BodyExt;
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&events) {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            _ => break,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut id = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                events.push((id, v));
            }
        }
    }
    events
}

#[tokio::test]
async fn a_client_resumes_a_cut_stream_and_misses_nothing() {
    let c = cluster_with_app("dev").await;
    c.add_user("rs", &["mcp-user"], PW).await;
    let token = c.login("rs", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("session");
    let sid = s.session.clone().expect("sid");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(portico_tests::web::connector(
        c.proxy_addr(),
    ));
    let url = s.url.clone();
    const COUNT: i64 = 300;
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
        "name": "flood", "arguments": {"count": COUNT, "bytes": 64}, "_meta": {"progressToken": "p"}}});
    let req = http::Request::post(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", &sid)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            call.to_string(),
        )))
        .expect("request");
    let resp = client.request(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Cut the stream in the middle of the burst.
    let first = read_events(&mut body, Duration::from_secs(20), |e| e.len() >= 40).await;
    assert!(first.len() >= 40, "{} events before the cut", first.len());
    // The client stops reading while the burst goes on (the events pile up
    // on the way), then its connection is cut.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(body);
    drop(client);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(portico_tests::web::connector(
        c.proxy_addr(),
    ));
    let last_id = first.last().expect("an event").0.clone();
    assert!(last_id.contains(':'), "ids name their stream: {last_id}");
    // Calls answered meanwhile as plain JSON keep no replay of their own,
    // so they push no stream's out, however many there are (what the
    // server still sends for the cut stream may come with them).
    let mut between = Vec::new();
    for i in 0..12 {
        let r = s
            .post(
                &json!({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"message": "between"}}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        between.extend(r.messages());
    }

    // Resume from the last event seen.
    let req = http::Request::get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", &sid)
        .header("accept", "text/event-stream")
        .header("last-event-id", &last_id)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let rest = read_events(&mut body, Duration::from_secs(30), |e| {
        e.iter().any(|(_, m)| m["id"] == 5)
    })
    .await;
    drop(body);

    let all: Vec<&Value> = first
        .iter()
        .chain(rest.iter())
        .map(|(_, m)| m)
        .chain(between.iter())
        .collect();
    let mut progress: Vec<i64> = all
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .filter_map(|m| m["params"]["progress"].as_f64().map(|p| p as i64))
        .collect();
    let answers = all.iter().filter(|m| m["id"] == 5).count();
    assert_eq!(answers, 1, "the answer arrives exactly once");
    progress.sort();
    let want: Vec<i64> = (0..COUNT).collect();
    assert_eq!(progress, want, "every notification exactly once");
    // Event ids are unique in the session.
    let mut ids: Vec<&String> = first.iter().chain(rest.iter()).map(|(i, _)| i).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "unique event ids");
    c.shutdown().await;
}

#[tokio::test]
async fn upstream_http_sse_app() {
    let entry = node_file("@modelcontextprotocol/server-everything/dist/index.js");
    let (_upstream, port) = everything_over("sse").await;
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: sse-everything, labels: {{env: dev}}}}\nspec: {{uri: 'mcp+sse+http://127.0.0.1:{port}/sse'}}\n"), false)
        .await
        .expect("app");
    c.wait_servers("sse-everything", &["a1"]).await;
    c.add_user("se", &["mcp-user"], PW).await;
    let token = c.login("se", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "sse-everything", &token);
    let init = s
        .initialize()
        .await
        .expect("initialize through the agent's HTTP+SSE relay");
    assert!(init["serverInfo"]["name"].is_string(), "{init}");
    let tools = s.request("tools/list", json!({})).await;
    let mut direct = Direct::start(
        std::path::Path::new("node"),
        &[entry.display().to_string(), "stdio".into()],
    )
    .await;
    let want = direct.rpc("tools/list", json!({})).await;
    assert_eq!(
        tools["result"], want["result"],
        "same tools over HTTP+SSE as over stdio"
    );
    let r = s.call("echo", json!({"message": "over sse"})).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("over sse"),
        "{r}"
    );
    let r = s.call("get-sum", json!({"a": 20, "b": 22})).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("42"),
        "{r}"
    );
    assert_eq!(s.delete().await.status, StatusCode::OK);
    c.shutdown().await;
}

/// `GET /v1/apps` as `token` sees it, parsed.
async fn listing(c: &Cluster, token: &str) -> Value {
    use http_body_util::BodyExt;
    let addr = c.proxy_addr();
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, http_body_util::Empty<bytes::Bytes>>(portico_tests::web::connector(addr));
    let req = http::Request::get(format!("{}/v1/apps", portico_tests::web::base(addr)))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = client.request(req).await.expect("GET /v1/apps");
    assert_eq!(resp.status(), StatusCode::OK);
    // Every answer carries a Date (added by the proxy, not indexed in
    // HTTP/2's header table): `Thu, 03 Dec 2026 12:00:00 GMT`.
    let date = resp.headers().get("date").expect("a Date header");
    let date = date.to_str().expect("ASCII");
    assert!(
        date.len() == 29 && date.ends_with(" GMT") && date.as_bytes()[3] == b',',
        "{date:?}"
    );
    assert_eq!(resp.headers().get_all("date").iter().count(), 1);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("JSON")
}

/// Each user's listing equals what their roles allow now.
async fn check_listing(c: &Cluster, users: &[(&str, String)], when: &str) {
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    for (user, token) in users {
        let got = listing(c, token).await;
        let checker = state.cache.checker(user).expect("checker");
        let want =
            serde_json::to_value(portico_proxy::visible_apps(&state, &checker)).expect("json");
        assert_eq!(got, want, "{when}, as {user}");
    }
}

/// The listing is served from rows kept between requests: after every kind
/// of change it must equal, for each user, what their roles allow now
/// (`visible_apps`, which the web UI lists), strings with escapes included.
#[tokio::test]
async fn the_kept_listing_follows_every_change_for_every_user() {
    let mut c = cluster_with_app("dev").await;
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let odd = |name: &str, env: &str, description: &str| {
        test_app_yaml(name, env).replacen(
            &format!("description: test server {name}"),
            &format!(
                "description: {}",
                serde_json::to_string(description).expect("json")
            ),
            1,
        )
    };
    c.create_yaml(
        &odd("quoted", "dev", "say \"hi\" \\ then\ttab, ünïcødé ✓"),
        false,
    )
    .await
    .expect("app");
    c.create_yaml(&odd("prod-one", "prod", "production"), false)
        .await
        .expect("app");
    c.wait_servers("quoted", &["a1"]).await;
    c.wait_servers("prod-one", &["a1"]).await;
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: dev-lister}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: [echo, 'a*']}\n  deny:\n    mcp: {tools: [add]}\n", false).await.expect("role");
    c.add_user("devs", &["dev-lister"], PW).await;
    c.add_user("ops", &["admin"], PW).await;
    let users = [
        ("devs", c.login("devs", PW).await),
        ("ops", c.login("ops", PW).await),
    ];
    check_listing(&c, &users, "at first").await;
    let devs = listing(&c, &users[0].1).await;
    let names: Vec<&str> = devs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["quoted", "tm"]);
    assert_eq!(devs[0]["description"], "say \"hi\" \\ then\ttab, ünïcødé ✓");
    assert_eq!(devs[0]["allowed_tools"], json!(["echo", "a*"]));
    assert_eq!(devs[0]["denied_tools"], json!(["add"]));
    // psh reads the same strings, escapes and all.
    let home = psh_login(&c, "devs").await;
    let o = psh(&home, &["mcp", "ls", "--format", "json"]).await;
    let v: Value = serde_json::from_str(&text(&o).0).expect("json");
    assert_eq!(v[0]["description"], devs[0]["description"]);
    let o = psh(&home, &["mcp", "ls"]).await;
    assert!(text(&o).0.contains("say \"hi\" \\ then"), "{}", text(&o).0);

    // An app changes; another moves out of reach; a new agent serves one;
    // a role changes; an app goes.
    c.create_yaml(&odd("quoted", "dev", "plain now"), true)
        .await
        .expect("update");
    let served = |app: &'static str, want: usize| {
        let state = state.clone();
        async move {
            eventually(Duration::from_secs(10), app, || async {
                (state.cache.servers(app).len() == want).then_some(())
            })
            .await
        }
    };
    eventually(
        Duration::from_secs(10),
        "the update reaches the proxy",
        || async { (state.cache.app("quoted")?.metadata.description == "plain now").then_some(()) },
    )
    .await;
    check_listing(&c, &users, "after an update").await;
    c.create_yaml(&test_app_yaml("tm", "prod"), true)
        .await
        .expect("move");
    eventually(
        Duration::from_secs(10),
        "the move reaches the proxy",
        || async { (state.cache.app("tm")?.metadata.labels.get("env")? == "prod").then_some(()) },
    )
    .await;
    check_listing(&c, &users, "after a change of labels").await;
    c.start_agent(
        "a2",
        portico_tests::cluster::selector_agent_config(&[("env", "dev")]),
    )
    .await;
    served("quoted", 2).await;
    check_listing(&c, &users, "after a new agent").await;
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: dev-lister}\nspec:\n  allow:\n    app_labels: {env: [dev, prod]}\n    mcp: {tools: ['*']}\n", true).await.expect("role");
    eventually(
        Duration::from_secs(10),
        "the role reaches the proxy",
        || async {
            let c = state.cache.checker("devs")?;
            c.app_allowed(&std::collections::BTreeMap::from([(
                "env".to_string(),
                "prod".to_string(),
            )]))
            .then_some(())
        },
    )
    .await;
    check_listing(&c, &users, "after a role change").await;
    let o = c.pctl(&["rm", "app/prod-one"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    served("prod-one", 0).await;
    eventually(
        Duration::from_secs(10),
        "the delete reaches the proxy",
        || async { state.cache.app("prod-one").is_none().then_some(()) },
    )
    .await;
    check_listing(&c, &users, "after a delete").await;
    assert_eq!(
        listing(&c, &users[0].1)
            .await
            .as_array()
            .expect("array")
            .len(),
        2,
        "quoted and tm"
    );
    c.shutdown().await;
}
