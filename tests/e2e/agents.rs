//! Agents: label-selected dynamic registration with the shared example
//! configs, the tunnel, and MCP process supervision with real processes.

use std::time::Duration;

use portico_proto::v1;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::{
    app_yaml_with_command, children_named, example, me, test_app_yaml, unique_test_server,
};
use portico_tests::{ClusterBuilder, Storage, eventually};
use serde_json::json;

const ADMIN_PW: &str = "admin-password-1";

async fn user_token(c: &portico_tests::Cluster) -> String {
    c.add_user("root-user", &["admin"], ADMIN_PW).await;
    c.login("root-user", ADMIN_PW).await
}

/// Opens sessions until one lands on each of `agents` agents (routing is random).
async fn one_session_per_agent(
    c: &portico_tests::Cluster,
    app: &str,
    token: &str,
    agents: usize,
) -> std::collections::HashMap<String, McpHttp> {
    let proxy = c.proxy.as_ref().expect("proxy").state.clone();
    let mut on = std::collections::HashMap::new();
    for _ in 0..60 {
        let mut s = McpHttp::new(c.proxy_addr(), app, token);
        s.initialize().await.expect("initialize");
        let agent = proxy
            .sessions
            .get(s.session.as_deref().expect("session id"))
            .expect("live")
            .agent
            .clone();
        on.entry(agent).or_insert(s);
        if on.len() == agents {
            break;
        }
    }
    on
}

#[tokio::test]
async fn seed_lifecycle_with_both_example_agents() {
    let wildcard = std::fs::read_to_string(example("agent-wildcard.yaml")).expect("example");
    let prod_test = std::fs::read_to_string(example("agent-prod-test.yaml")).expect("example");
    let c = ClusterBuilder::new()
        .storage(Storage::Postgres)
        .proxy()
        .agent_yaml("wild", &wildcard)
        .agent_yaml("prodtest", &prod_test)
        .start()
        .await;
    let token = user_token(&c).await;

    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("create env=dev");
    c.wait_servers("tm", &["wild"]).await;
    assert!(c.agent("prodtest").state.registry.get("tm").is_none());

    c.create_yaml(&test_app_yaml("tm", "prod"), true)
        .await
        .expect("create -f env=prod");
    c.wait_servers("tm", &["prodtest", "wild"]).await;

    // One live session on each agent, each waiting on a slow call while the labels change.
    let mut on = one_session_per_agent(&c, "tm", &token, 2).await;
    let mut on_prodtest = on.remove("prodtest").expect("a session on prodtest");
    let mut on_wild = on.remove("wild").expect("a session on wild");
    let echo = on_wild.call("echo", json!({"message": "hi"})).await;
    assert_eq!(echo["result"]["content"][0]["text"], "hi", "{echo}");
    let slow_p = tokio::spawn(async move {
        (
            on_prodtest.call("slow", json!({"ms": 30000})).await,
            on_prodtest,
        )
    });
    let slow_w =
        tokio::spawn(async move { (on_wild.call("slow", json!({"ms": 3000})).await, on_wild) });
    c.wait_pending(2).await;

    // env=staging matches only the wildcard agent: prodtest unregisters and ends its sessions.
    c.create_yaml(&test_app_yaml("tm", "staging"), true)
        .await
        .expect("labels changed");
    c.wait_servers("tm", &["wild"]).await;
    let (reply, s_p) = tokio::time::timeout(Duration::from_secs(15), slow_p)
        .await
        .expect("the slow call ends")
        .expect("task");
    let msg = reply["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("unregistered") && msg.contains("labels no longer match"),
        "{reply}"
    );
    let after = s_p
        .post(&json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}))
        .await;
    assert_eq!(
        after.status,
        http::StatusCode::NOT_FOUND,
        "the session is gone"
    );
    let (reply, mut s_w) = tokio::time::timeout(Duration::from_secs(15), slow_w)
        .await
        .expect("wild call ends")
        .expect("task");
    assert_eq!(
        reply["result"]["content"][0]["text"], "done",
        "the wildcard agent keeps serving: {reply}"
    );
    let slow_w = tokio::spawn(async move { s_w.call("slow", json!({"ms": 30000})).await });
    c.wait_pending(1).await;

    c.create_yaml(&test_app_yaml("tm", "test"), true)
        .await
        .expect("env=test");
    c.wait_servers("tm", &["prodtest", "wild"]).await;
    let o = c.pctl(&["rm", "app/tm"]).await;
    assert!(o.status.success());
    c.wait_servers("tm", &[]).await;
    let reply = tokio::time::timeout(Duration::from_secs(15), slow_w)
        .await
        .expect("ends")
        .expect("task");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deleted"),
        "{reply}"
    );
    for (h, a) in &c.agents {
        eventually(
            Duration::from_secs(5),
            &format!("{h} forgot tm"),
            || async { a.state.registry.get("tm").is_none().then_some(()) },
        )
        .await;
    }
    let mut gone = McpHttp::new(c.proxy_addr(), "tm", &token);
    let e = gone.initialize().await.expect_err("removed everywhere");
    assert_eq!(e.status, http::StatusCode::NOT_FOUND);
    c.shutdown().await;
}

#[tokio::test]
async fn crash_missing_command_and_bad_user() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let token = user_token(&c).await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.create_yaml("kind: app\nversion: v3\nmetadata: {name: nocmd}\nspec:\n  mcp: {command: /nonexistent/portico-nope, run_as_host_user: root}\n", false).await.expect("app");
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: nouser}}\nspec:\n  mcp: {{command: {}, run_as_host_user: no-such-user-x}}\n", portico_tests::util::test_mcp_server().display()), false)
        .await
        .expect("app");
    c.create_yaml("kind: app\nversion: v3\nmetadata: {name: quits}\nspec:\n  mcp: {command: /bin/false, run_as_host_user: root}\n", false).await.expect("app");
    for app in ["tm", "nocmd", "nouser", "quits"] {
        c.wait_servers(app, &["a1"]).await;
    }

    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("initialize");
    let r = s.call("crash", json!({})).await;
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("exited") && msg.contains("exit status 3"),
        "{r}"
    );

    let mut s = McpHttp::new(c.proxy_addr(), "nocmd", &token);
    let e = s.initialize().await.expect_err("no such command");
    assert_eq!(e.status, http::StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&e.body).contains("/nonexistent/portico-nope\\\" was not found"),
        "{:?}",
        e.body
    );

    let mut s = McpHttp::new(c.proxy_addr(), "nouser", &token);
    let e = s.initialize().await.expect_err("no such user");
    assert!(
        String::from_utf8_lossy(&e.body)
            .contains("host user \\\"no-such-user-x\\\" does not exist"),
        "{:?}",
        e.body
    );

    let s = McpHttp::new(c.proxy_addr(), "quits", &token);
    let r = s.post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})).await;
    let m = r.messages();
    let msg = m
        .first()
        .and_then(|m| m["error"]["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("exited") && msg.contains("exit status 1"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn two_hundred_sessions_leave_no_process_behind() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let token = user_token(&c).await;
    let (server, comm) = unique_test_server(c.data_dir().as_path());
    c.create_yaml(&app_yaml_with_command("tm", "dev", &server), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1"]).await;
    let proxy = c.proxy_addr();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let token = token.clone();
        tasks.spawn(async move {
            for i in 0..25 {
                let mut s = McpHttp::new(proxy, "tm", &token);
                s.initialize().await.expect("initialize");
                if i % 5 == 0 {
                    let r = s.call("add", json!({"a": worker, "b": i})).await;
                    assert_eq!(r["result"]["content"][0]["text"], (worker + i).to_string());
                }
                assert_eq!(s.delete().await.status, http::StatusCode::OK);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("worker");
    }
    eventually(
        Duration::from_secs(30),
        "every MCP process reaped",
        || async {
            let left = children_named(&comm);
            left.is_empty().then_some(())
        },
    )
    .await;
    let agent = c.agent("a1");
    assert_eq!(
        agent
            .state
            .metrics
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        200
    );
    assert_eq!(
        agent
            .state
            .metrics
            .live
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    c.shutdown().await;
}

#[tokio::test]
async fn agents_and_proxy_ride_out_an_auth_restart() {
    let mut c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let token = user_token(&c).await;
    c.create_yaml(&test_app_yaml("keep", "dev"), false)
        .await
        .expect("app");
    c.create_yaml(&test_app_yaml("doomed", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("keep", &["a1"]).await;
    c.wait_servers("doomed", &["a1"]).await;
    let mut s = McpHttp::new(c.proxy_addr(), "keep", &token);
    s.initialize().await.expect("initialize");

    c.stop_auth().await;
    // A live session keeps working while the auth-service is away.
    let r = s.call("echo", json!({"message": "still here"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "still here");
    assert!(c.agent("a1").state.registry.get("keep").is_some());

    c.start_auth_again().await;
    // Changes made right after the restart reach the agent: no missed deletion, no double registration.
    c.admin()
        .await
        .delete(v1::DeleteRequest {
            kind: "app".into(),
            name: "doomed".into(),
        })
        .await
        .expect("delete");
    c.create_yaml(&test_app_yaml("fresh", "dev"), false)
        .await
        .expect("app after restart");
    c.wait_servers("fresh", &["a1"]).await;
    c.wait_servers("doomed", &[]).await;
    let a = c.agent("a1");
    eventually(Duration::from_secs(10), "agent re-synced", || async {
        (a.state.registry.names() == vec!["fresh".to_string(), "keep".to_string()]).then_some(())
    })
    .await;
    let r = s.call("echo", json!({"message": "after"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "after");
    let mut s2 = McpHttp::new(c.proxy_addr(), "fresh", &token);
    s2.initialize()
        .await
        .expect("new session after the restart");
    c.shutdown().await;
}

#[tokio::test]
async fn stubborn_processes_are_killed_and_oversized_messages_refused() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let token = user_token(&c).await;
    // A server that ignores SIGINT and stays after its input closes.
    let script = "import json,signal,sys,time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nfor l in sys.stdin:\n    m = json.loads(l)\n    if m.get('method') == 'initialize':\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{},'serverInfo':{'name':'stubborn','version':'1'}}}), flush=True)\ntime.sleep(600)\n";
    let marker = format!("stubborn-{}", std::process::id());
    let yaml = format!(
        "kind: app\nversion: v3\nmetadata: {{name: stubborn}}\nspec:\n  mcp:\n    command: python3\n    args: [\"-c\", {}, {marker}]\n    run_as_host_user: {}\n",
        serde_json::to_string(script).expect("json"),
        me()
    );
    c.create_yaml(&yaml, false).await.expect("app");
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("stubborn", &["a1"]).await;
    c.wait_servers("tm", &["a1"]).await;
    let mut s = McpHttp::new(c.proxy_addr(), "stubborn", &token);
    s.initialize().await.expect("initialize");
    let pids = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                    .unwrap_or(false)
            })
            .collect()
    };
    assert_eq!(pids().len(), 1, "the server runs");
    let ended = std::time::Instant::now();
    assert_eq!(s.delete().await.status, http::StatusCode::OK);
    eventually(
        Duration::from_secs(15),
        "SIGKILL after the grace period",
        || async { pids().is_empty().then_some(()) },
    )
    .await;
    assert!(
        ended.elapsed() >= Duration::from_millis(1500),
        "SIGINT was ignored, so only the 2 s grace period's SIGKILL ends it"
    );

    // A message over 4 MiB from the server ends the session with an error, never unbounded memory.
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("initialize");
    let r = s.call("big", json!({"bytes": 5 * 1024 * 1024})).await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than"),
        "{}",
        &r.to_string()[..200.min(r.to_string().len())]
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_lost_agent_ends_its_sessions_and_new_ones_go_elsewhere() {
    let mut c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .wildcard_agent("a2")
        .start()
        .await;
    let token = user_token(&c).await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1", "a2"]).await;
    let proxy = c.proxy.as_ref().expect("proxy").state.clone();
    let mut on = one_session_per_agent(&c, "tm", &token, 2).await;
    let mut doomed = on.remove("a2").expect("a session on a2");
    let mut kept = on.remove("a1").expect("a session on a1");
    let pending = tokio::spawn(async move { doomed.call("slow", json!({"ms": 30000})).await });
    c.wait_pending(1).await;
    let (_, a2) = c.agents.remove(1);
    a2.shutdown();
    let r = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("ends")
        .expect("task");
    assert!(r.get("error").is_some(), "{r}");
    c.wait_servers("tm", &["a1"]).await;
    assert_eq!(
        kept.call("echo", json!({"message": "still"})).await["result"]["content"][0]["text"],
        "still"
    );
    for _ in 0..5 {
        let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
        s.initialize()
            .await
            .expect("new sessions go to the remaining agent");
        assert_eq!(
            proxy
                .sessions
                .get(s.session.as_deref().expect("id"))
                .expect("live")
                .agent,
            "a1"
        );
    }
    c.shutdown().await;
}

#[tokio::test]
async fn processes_run_as_the_host_user_with_a_minimal_environment() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let token = user_token(&c).await;
    // Answers initialize with its uid, gid and environment as the server name and version.
    let script = "import json,os,sys\nfor l in sys.stdin:\n    m = json.loads(l)\n    if m.get('method') == 'initialize':\n        info = {'name': '%d:%d' % (os.getuid(), os.getgid()), 'version': ','.join(sorted(os.environ))}\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{},'serverInfo':info}}), flush=True)\n";
    // The system interpreter: a version-manager shim would add its own variables.
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let who = |name: &str, user: &str| {
        format!(
            "kind: app\nversion: v3\nmetadata: {{name: {name}}}\nspec:\n  mcp:\n    command: {python}\n    args: [\"-c\", {}]\n    env: {{EXTRA_SETTING: 'on'}}\n    run_as_host_user: {user}\n",
            serde_json::to_string(script).expect("json")
        )
    };
    c.create_yaml(&who("as-nobody", "nobody"), false)
        .await
        .expect("app");
    c.create_yaml(&who("as-me", &me()), false)
        .await
        .expect("app");
    let plain = c.data_dir().join("plain-file");
    std::fs::write(&plain, "not a program\n").expect("write");
    c.create_yaml(&format!("kind: app\nversion: v3\nmetadata: {{name: notexec}}\nspec:\n  mcp: {{command: {}, run_as_host_user: {}}}\n", plain.display(), me()), false).await.expect("app");
    for app in ["as-nobody", "as-me", "notexec"] {
        c.wait_servers(app, &["a1"]).await;
    }
    let mut s = McpHttp::new(c.proxy_addr(), "as-me", &token);
    let info = s.initialize().await.expect("initialize")["serverInfo"].clone();
    assert_eq!(
        info["version"], "EXTRA_SETTING,HOME,LANG,LOGNAME,PATH,USER",
        "only the explicit environment: {info}"
    );
    let nobody = portico_agent::spawn::lookup_user("nobody").expect("nobody exists");
    if portico_agent::spawn::current_uid() == 0 {
        let mut s = McpHttp::new(c.proxy_addr(), "as-nobody", &token);
        let info = s.initialize().await.expect("initialize as nobody")["serverInfo"].clone();
        assert_eq!(
            info["name"],
            format!("{}:{}", nobody.uid, nobody.gid),
            "{info}"
        );
    } else {
        let mut s = McpHttp::new(c.proxy_addr(), "as-nobody", &token);
        let e = s
            .initialize()
            .await
            .expect_err("cannot switch users without root");
        assert!(
            String::from_utf8_lossy(&e.body).contains("cannot switch to host user"),
            "{e:?}"
        );
    }
    let mut s = McpHttp::new(c.proxy_addr(), "notexec", &token);
    let e = s.initialize().await.expect_err("not executable");
    assert!(
        String::from_utf8_lossy(&e.body).contains("is not executable"),
        "{e:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn static_apps_from_the_agent_config() {
    let yaml = format!(
        "app_service:\n  enabled: true\n  resources:\n  - labels: {{team: nobody}}\n  apps:\n  - name: local-tm\n    description: static test server\n    labels: {{env: dev}}\n    mcp: {{command: {}, run_as_host_user: {}}}\n",
        portico_tests::util::test_mcp_server().display(),
        me()
    );
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml("s1", &yaml)
        .start()
        .await;
    c.create_yaml(&test_app_yaml("dynamic", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("local-tm", &["s1"]).await;
    assert!(
        c.agent("s1").state.registry.get("dynamic").is_none(),
        "the selector matches no dynamic app"
    );
    let token = user_token(&c).await;
    let mut s = McpHttp::new(c.proxy_addr(), "local-tm", &token);
    s.initialize().await.expect("a static app is reachable");
    assert_eq!(
        s.call("echo", json!({"message": "static"})).await["result"]["content"][0]["text"],
        "static"
    );
    let apps = c.proxy.as_ref().expect("proxy").state.cache.apps();
    let a = apps
        .iter()
        .find(|a| a.metadata.name == "local-tm")
        .expect("listed");
    assert_eq!(a.metadata.description, "static test server");
    c.shutdown().await;
}

/// A TCP relay that can freeze: stop forwarding both ways while keeping
/// both connections open (a link that dies without a FIN or RST).
struct FreezableRelay {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezableRelay {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                for (mut r, mut w, f) in [
                    (
                        Box::new(dr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        f.clone(),
                    ),
                    (Box::new(ur) as _, Box::new(dw) as _, f.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let read = r.read(&mut buf).await;
                            if f.load(Ordering::SeqCst) {
                                // Hold both ends open, forward nothing (not
                                // even an end of stream), forever.
                                std::future::pending::<()>().await;
                            }
                            let n = match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        FreezableRelay { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_killed_agent_behind_a_half_open_link_is_noticed_within_seconds() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a2")
        .start()
        .await;
    let relay = FreezableRelay::start(c.tunnel_addr()).await;
    // The victim: a real agent process that reaches the proxy through the relay.
    let mut victim = wildcard_agent_process(&c, "victim", &relay.addr.to_string()).await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a2", "victim"]).await;
    c.wait_tunnel("victim").await;
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    c.add_user("kim", &["mcp-user"], ADMIN_PW).await;
    let token = c.login("kim", ADMIN_PW).await;
    // A session on the victim, with a call in flight.
    let mut on_victim = None;
    for _ in 0..40 {
        let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
        s.initialize().await.expect("session");
        let sid = s.session.clone().expect("sid");
        if state
            .sessions
            .get(&sid)
            .is_some_and(|x| x.agent == "victim")
        {
            on_victim = Some(s);
            break;
        }
        s.delete().await;
    }
    let mut s = on_victim.expect("a session on the victim in 40 tries");
    let pending = tokio::spawn(async move { s.call("slow", json!({"ms": 60000})).await });
    c.wait_pending(1).await;

    // The link goes silent and the agent dies without a word.
    relay.freeze();
    victim.start_kill().expect("SIGKILL");
    let _ = victim.wait().await;
    let killed = std::time::Instant::now();
    eventually(Duration::from_secs(10), "the proxy notices", || {
        let s = state.clone();
        async move { (!s.tunnels.is_connected("victim")).then_some(()) }
    })
    .await;
    eprintln!(
        "a killed agent behind a frozen link was noticed after {:?}",
        killed.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the call in flight ends")
        .expect("task");
    assert!(
        r["error"]["message"].is_string(),
        "an error, not a hang: {r}"
    );
    // New sessions go to the live agent at once.
    let mut fresh = McpHttp::new(c.proxy_addr(), "tm", &token);
    fresh.initialize().await.expect("a new session");
    let sid = fresh.session.clone().expect("sid");
    assert_eq!(
        state.sessions.get(&sid).map(|x| x.agent.clone()).as_deref(),
        Some("a2")
    );
    let r = fresh.call("echo", json!({"message": "still here"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "still here", "{r}");
    c.shutdown().await;
}

/// A real agent process (`portico start`) serving every app, dialling the
/// proxy at `tunnel`.
pub(crate) async fn wildcard_agent_process(
    c: &portico_tests::Cluster,
    host_id: &str,
    tunnel: &str,
) -> tokio::process::Child {
    portico_tests::util::agent_process(
        &c.data_dir().join(format!("process-{host_id}")),
        &c.auth_addr.to_string(),
        tunnel,
        &c.join_token("app").await,
        host_id,
        r#"{"*": "*"}"#,
    )
}

/// The processes whose parent is `pid`, from /proc, but for the agent's
/// reaper (which lives as long as the agent).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|n| {
            std::fs::read_to_string(format!("/proc/{n}/stat"))
                .ok()
                .and_then(|s| {
                    let (name, rest) = s.rsplit_once(')')?;
                    if name.ends_with(&format!("({}", portico_agent::reaper::NAME)) {
                        return None;
                    }
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Whether a process is gone (or only a zombie waiting to be reaped).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[tokio::test]
async fn the_processes_of_a_killed_agent_die_with_it() {
    let c = ClusterBuilder::new().proxy().start().await;
    let mut agent = wildcard_agent_process(&c, "doomed", &c.tunnel_addr().to_string()).await;
    let agent_pid = agent.id().expect("pid");
    // A server that outlives its input: it answers initialize, then sleeps
    // on even after its standard input closes (as many real ones do). It
    // has a child of its own, as a server started by `npx` or `uvx` has,
    // and one that left its process group (`setsid`), as a daemon does.
    c.create_yaml(&lingering_app("tm"), false)
        .await
        .expect("app");
    let contained = portico_agent::cgroup::Cgroups::create().is_ok();
    c.wait_servers("tm", &["doomed"]).await;
    c.wait_tunnel("doomed").await;
    let token = user_token(&c).await;
    let mut sessions = Vec::new();
    let mut detached = Vec::new();
    for i in 0..3 {
        let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
        let init = s.initialize().await.expect("session");
        assert_eq!(
            init["serverInfo"]["name"], "lingering",
            "session {i}: {init}"
        );
        detached.push(detached_pid(&init));
        sessions.push(s);
    }
    let servers = eventually(Duration::from_secs(10), "three MCP processes", || async {
        let kids = children_of(agent_pid);
        (kids.len() >= 3).then_some(kids)
    })
    .await;
    let grandchildren = eventually(Duration::from_secs(10), "their children", || {
        let servers = servers.clone();
        async move {
            let kids: Vec<u32> = servers.iter().flat_map(|p| children_of(*p)).collect();
            (kids.len() >= 2 * servers.len()).then_some(kids)
        }
    })
    .await;
    for pid in &detached {
        assert!(grandchildren.contains(pid), "{pid} in {grandchildren:?}");
        assert_eq!(in_agent_cgroup(*pid), contained, "process {pid}");
    }
    let reaper = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')').is_some_and(|(name, rest)| {
                    name.ends_with(&format!("({}", portico_agent::reaper::NAME))
                        && rest.split_whitespace().nth(1) == Some(&agent_pid.to_string())
                })
            })
        })
        .expect("the agent runs a reaper");
    agent.start_kill().expect("SIGKILL");
    let _ = agent.wait().await;
    // Without a writable cgroup v2 the agent contains sessions by process
    // group only, and what left its group is not its to find.
    let escaped: Vec<u32> = if contained { vec![] } else { detached };
    eventually(
        Duration::from_secs(10),
        "no MCP process, nor any child of one, outlives its agent",
        || {
            let mut all: Vec<u32> = servers
                .iter()
                .chain(&grandchildren)
                .filter(|p| !escaped.contains(p))
                .copied()
                .collect();
            all.push(reaper);
            async move { all.iter().all(|p| dead(*p)).then_some(()) }
        },
    )
    .await;
    for pid in escaped {
        println!("no writable cgroup v2 here: process {pid} escaped its agent, as documented");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    c.shutdown().await;
}

/// An app whose server answers initialize with the pid of a child it
/// started in a session of its own (`setsid`) as its version, keeps another
/// child in its group, and sleeps on after its input closes.
fn lingering_app(name: &str) -> String {
    let script = "import json,subprocess,sys,time\nsubprocess.Popen(['sleep', '3600'])\nd = subprocess.Popen(['sleep', '3600'], start_new_session=True)\nfor l in sys.stdin:\n    m = json.loads(l)\n    if m.get('method') == 'initialize':\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{},'serverInfo':{'name':'lingering','version':str(d.pid)}}}), flush=True)\nwhile True:\n    time.sleep(3600)\n";
    format!(
        "kind: app\nversion: v3\nmetadata: {{name: {name}}}\nspec:\n  mcp:\n    command: python3\n    args: [\"-c\", {}]\n    run_as_host_user: {}\n",
        serde_json::to_string(script).expect("json"),
        portico_tests::util::me()
    )
}

/// The pid of the detached child a `lingering_app` server reports.
fn detached_pid(init: &serde_json::Value) -> u32 {
    init["serverInfo"]["version"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {init}"))
}

/// Whether a process runs in a cgroup an agent made for a session.
fn in_agent_cgroup(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
        c.lines()
            .any(|l| l.starts_with("0::") && l.contains("/portico-agent-"))
    })
}

#[tokio::test]
async fn a_session_ends_with_every_process_its_server_started() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let contained = portico_agent::cgroup::Cgroups::create().is_ok();
    c.create_yaml(&lingering_app("tm"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1"]).await;
    let token = user_token(&c).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    let init = s.initialize().await.expect("session");
    let pid = detached_pid(&init);
    assert!(!dead(pid), "the detached child runs");
    assert_eq!(in_agent_cgroup(pid), contained, "process {pid}");
    assert_eq!(s.delete().await.status, http::StatusCode::OK);
    if contained {
        eventually(
            Duration::from_secs(10),
            "the detached child ends with its session",
            || async move { dead(pid).then_some(()) },
        )
        .await;
    } else {
        println!("no writable cgroup v2 here: process {pid} outlived its session, as documented");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    c.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_loses_its_proxy_ends_the_orphaned_processes() {
    let c = ClusterBuilder::new().proxy().start().await;
    let relay = FreezableRelay::start(c.tunnel_addr()).await;
    let agent = wildcard_agent_process(&c, "stranded", &relay.addr.to_string()).await;
    let agent_pid = agent.id().expect("pid");
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["stranded"]).await;
    c.wait_tunnel("stranded").await;
    let token = user_token(&c).await;
    let mut sessions = Vec::new();
    for i in 0..2 {
        let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
        s.initialize().await.expect("session");
        let r = s.call("echo", json!({"message": format!("s{i}")})).await;
        assert_eq!(r["result"]["content"][0]["text"], format!("s{i}"), "{r}");
        sessions.push(s);
    }
    let servers = eventually(Duration::from_secs(10), "two MCP processes", || async {
        let kids = children_of(agent_pid);
        (kids.len() >= 2).then_some(kids)
    })
    .await;
    // The proxy goes silent, as a SIGKILLed one behind a half-open link:
    // the agent gives the tunnel up and ends the sessions it carried.
    relay.freeze();
    let frozen = std::time::Instant::now();
    eventually(
        Duration::from_secs(15),
        "the orphaned processes end",
        || {
            let servers = servers.clone();
            async move { servers.iter().all(|p| dead(*p)).then_some(()) }
        },
    )
    .await;
    eprintln!(
        "an agent ended the processes of a silent proxy's sessions after {:?}",
        frozen.elapsed()
    );
    drop(agent);
    c.shutdown().await;
}
