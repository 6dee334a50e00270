//! The agent's own bounds, whatever the apps in the cluster ask for: which
//! host accounts MCP servers run as, which apps get which secrets, how many
//! sessions run at once, and the resource limits of each process.

use std::process::Stdio;
use std::time::Duration;

use portico_tests::cluster::run;
use portico_tests::mcp_http::{McpHttp, Reply};
use portico_tests::util::{me, test_app_yaml};
use portico_tests::{Cluster, ClusterBuilder, bin, eventually};
use serde_json::{Value, json};

const PW: &str = "limits-password-1";

/// A stdio MCP server that answers initialize with what it was given: the
/// `PT_SECRET` variable as its name, its RLIMIT_NOFILE and RLIMIT_AS
/// (soft:hard) and its niceness as its version.
const REPORT: &str = "import json,os,resource,sys\nfor l in sys.stdin:\n    m = json.loads(l)\n    if m.get('method') == 'initialize':\n        lim = resource.getrlimit(resource.RLIMIT_NOFILE) + resource.getrlimit(resource.RLIMIT_AS)\n        info = {'name': os.environ.get('PT_SECRET', '-'), 'version': '%d:%d %d:%d nice %d' % (lim + (os.nice(0),))}\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{},'serverInfo':info}}), flush=True)\n";

/// The system interpreter: a version-manager shim would add its own variables.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// An app running `REPORT` as `user`, with these labels and `spec.mcp.env` (YAML flow maps).
fn report_app(name: &str, labels: &str, user: &str, env: &str) -> String {
    format!(
        "kind: app\nversion: v3\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n  mcp:\n    command: {}\n    args: [\"-c\", {}]\n    env: {env}\n    run_as_host_user: {user}\n",
        python(),
        serde_json::to_string(REPORT).expect("json")
    )
}

async fn token(c: &Cluster) -> String {
    c.add_user("limits-admin", &["admin"], PW).await;
    c.login("limits-admin", PW).await
}

/// The JSON-RPC error message of a refused initialize.
fn message(r: &Reply) -> String {
    r.messages()
        .first()
        .and_then(|m| m["error"]["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn refused(c: &Cluster, app: &str, token: &str) -> String {
    let mut s = McpHttp::new(c.proxy_addr(), app, token);
    let e = s
        .initialize()
        .await
        .expect_err(&format!("{app}: the agent refuses the session"));
    assert_eq!(e.status, http::StatusCode::BAD_GATEWAY, "{e:?}");
    message(&e)
}

async fn session_events(c: &Cluster) -> Option<Vec<Value>> {
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
    serde_json::from_slice::<Value>(&o.stdout)
        .ok()?
        .as_array()
        .cloned()
}

#[tokio::test]
async fn apps_run_only_as_the_accounts_the_agent_allows() {
    // `bound` lists its accounts; `plain` has an mcp section without a list: the default.
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml(
            "bound",
            "app_service:\n  resources:\n  - labels: {team: bound}\n  mcp:\n    allowed_host_users: [nobody]\n",
        )
        .agent_yaml(
            "plain",
            "app_service:\n  resources:\n  - labels: {team: plain}\n  mcp: {}\n",
        )
        .start()
        .await;
    let token = token(&c).await;
    let root_agent = portico_agent::spawn::current_uid() == 0;
    // What the default allows and this process can actually switch to.
    let other = if root_agent {
        "nobody".to_string()
    } else {
        me()
    };
    let apps = [
        ("mine-on-bound", "{team: bound}", me(), "bound"),
        (
            "root-on-plain",
            "{team: plain}",
            "root".to_string(),
            "plain",
        ),
        ("other-on-plain", "{team: plain}", other, "plain"),
    ];
    for (name, labels, user, _) in &apps {
        c.create_yaml(&report_app(name, labels, user, "{}"), false)
            .await
            .expect("app");
    }
    for (name, _, _, agent) in &apps {
        c.wait_servers(name, &[*agent]).await;
    }

    let msg = refused(&c, "mine-on-bound", &token).await;
    assert!(
        msg.contains(&format!("the agent does not run MCP servers as {:?}", me()))
            && msg.contains("not listed in app_service.mcp.allowed_host_users"),
        "{msg}"
    );
    let msg = refused(&c, "root-on-plain", &token).await;
    assert!(
        msg.contains("the agent does not run MCP servers as \"root\"")
            && msg.contains("allowed_host_users is not set")
            && msg.contains("except root and the agent's own"),
        "{msg}"
    );
    // Any other existing account is allowed by default; the agent's own is not.
    if root_agent {
        let mut s = McpHttp::new(c.proxy_addr(), "other-on-plain", &token);
        s.initialize()
            .await
            .expect("the default allows accounts other than root and the agent's");
    } else {
        let msg = refused(&c, "other-on-plain", &token).await;
        assert!(msg.contains("the agent's own account"), "{msg}");
    }

    // The proxy audited both refusals with the agent's words.
    eventually(Duration::from_secs(10), "refusals audited", || async {
        let events = session_events(&c).await?;
        let audited = |app: &str| {
            events.iter().any(|e| {
                e["success"] == false
                    && e["fields"]["app"] == app
                    && e["fields"]["error"]
                        .as_str()
                        .is_some_and(|m| m.contains("does not run MCP servers as"))
            })
        };
        (audited("mine-on-bound") && audited("root-on-plain")).then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn max_sessions_caps_live_processes() {
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml(
            "capped",
            "app_service:\n  max_sessions: 2\n  resources:\n  - labels: {env: capped}\n",
        )
        .start()
        .await;
    let token = token(&c).await;
    c.create_yaml(&test_app_yaml("tm", "capped"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["capped"]).await;
    let proxy = c.proxy_addr();

    // Four at once: the cap is taken atomically, so exactly two open.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let token = token.clone();
        tasks.spawn(async move {
            let mut s = McpHttp::new(proxy, "tm", &token);
            match s.initialize().await {
                Ok(_) => Ok(s),
                Err(e) => Err((e.status, message(&e))),
            }
        });
    }
    let (mut open, mut refusals) = (Vec::new(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(s) => open.push(s),
            Err(e) => refusals.push(e),
        }
    }
    assert_eq!(open.len(), 2, "{refusals:?}");
    for (status, msg) in &refusals {
        assert_eq!(*status, http::StatusCode::BAD_GATEWAY);
        assert!(
            msg.contains("is running 2 MCP sessions") && msg.contains("app_service.max_sessions"),
            "{msg}"
        );
    }
    let agent = c.agent("capped");
    assert_eq!(
        agent
            .state
            .metrics
            .live
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // The open ones work; ending one frees its slot once its process is reaped.
    let mut first = open.remove(0);
    let r = first
        .call("echo", serde_json::json!({"message": "capped"}))
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "capped", "{r}");
    assert_eq!(first.delete().await.status, http::StatusCode::OK);
    let mut third = eventually(Duration::from_secs(15), "a slot freed", || async {
        let mut s = McpHttp::new(proxy, "tm", &token);
        s.initialize().await.ok().map(|_| s)
    })
    .await;
    let r = third
        .call("echo", serde_json::json!({"message": "again"}))
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "again", "{r}");
    let msg = refused(&c, "tm", &token).await;
    assert!(msg.contains("max_sessions"), "full again: {msg}");
    c.shutdown().await;
}

/// An agent in its own `portico start` process, so that it can have a
/// `PORTICO_SECRET_*` variable without touching this process's environment.
struct AgentProcess {
    child: tokio::process::Child,
}

impl AgentProcess {
    async fn start(c: &Cluster, host_id: &str, mcp_yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = c.data_dir().join(format!("process-{host_id}"));
        std::fs::create_dir_all(&dir).expect("agent dir");
        let config = dir.join("portico.yaml");
        let join_token = c.join_token("app").await;
        std::fs::write(
            &config,
            format!(
                "version: v1\ndata_dir: {}\napp_service:\n  auth_servers: [\"{}\"]\n  proxy_servers: [\"{}\"]\n  join_token: \"{}\"\n  host_id: {host_id}\n  shutdown_grace: 2s\n  resources:\n  - labels: {{team: {host_id}}}\n{mcp_yaml}",
                dir.join("data").display(),
                c.auth_addr,
                c.tunnel_addr(),
                join_token,
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
        let mut cmd = tokio::process::Command::new(bin("portico"));
        cmd.arg("start")
            .arg("--config")
            .arg(&config)
            .env_remove("PORTICO_DATA_DIR")
            .env_remove("PORTICO_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("portico start");
        let tunnels = c.proxy.as_ref().expect("proxy").state.tunnels.clone();
        eventually(
            Duration::from_secs(30),
            &format!(
                "agent {host_id} connected (log: {})",
                dir.join("agent.log").display()
            ),
            || {
                let t = tunnels.clone();
                async move { t.is_connected(host_id).then_some(()) }
            },
        )
        .await;
        AgentProcess { child }
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let mut kill = tokio::process::Command::new("kill");
            kill.args(["-TERM", &pid.to_string()]);
            let o = run(kill, None).await;
            assert!(o.status.success(), "kill -TERM {pid}");
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the agent exits after SIGTERM")
            .expect("status");
        assert!(status.success(), "{status}");
    }
}

#[tokio::test]
async fn secrets_resolve_only_for_the_apps_a_grant_covers() {
    let c = ClusterBuilder::new().proxy().start().await;
    let agent = AgentProcess::start(
        &c,
        "vault",
        &format!(
            "  mcp:\n    allowed_host_users: [{}]\n    secrets:\n    - name: PT_TOKEN\n      labels: {{env: prod}}\n",
            me()
        ),
        &[("PORTICO_SECRET_PT_TOKEN", "s3cret-value")],
    )
    .await;
    let token = token(&c).await;
    let env = "{PT_SECRET: '{{secret PT_TOKEN}}'}";
    c.create_yaml(
        &report_app("sec-prod", "{team: vault, env: prod}", &me(), env),
        false,
    )
    .await
    .expect("app");
    c.create_yaml(
        &report_app("sec-dev", "{team: vault, env: dev}", &me(), env),
        false,
    )
    .await
    .expect("app");
    // A grant names one secret: it does not cover another set on the same agent.
    c.create_yaml(
        &report_app(
            "sec-other",
            "{team: vault, env: prod}",
            &me(),
            "{PT_SECRET: '{{secret PT_OTHER}}'}",
        ),
        false,
    )
    .await
    .expect("app");
    for app in ["sec-prod", "sec-dev", "sec-other"] {
        c.wait_servers(app, &["vault"]).await;
    }

    let mut s = McpHttp::new(c.proxy_addr(), "sec-prod", &token);
    let info = s.initialize().await.expect("env=prod is granted")["serverInfo"].clone();
    assert_eq!(info["name"], "s3cret-value", "{info}");

    for (app, secret) in [("sec-dev", "PT_TOKEN"), ("sec-other", "PT_OTHER")] {
        let msg = refused(&c, app, &token).await;
        assert!(
            msg.contains(&format!("secret {secret:?} is not granted to this app"))
                && msg.contains("no app_service.mcp.secrets grant"),
            "{app}: {msg}"
        );
        assert!(!msg.contains("s3cret-value"), "{msg}");
    }
    drop(s);
    agent.stop().await;
    c.shutdown().await;
}

#[tokio::test]
async fn processes_run_under_the_configured_rlimits() {
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml(
            "limited",
            &format!(
                "app_service:\n  resources:\n  - labels: {{team: limited}}\n  mcp:\n    allowed_host_users: [{}]\n    max_open_files: 64\n    max_memory_bytes: 1073741824\n    nice: 7\n",
                me()
            ),
        )
        .agent_yaml(
            "dflt",
            "app_service:\n  resources:\n  - labels: {team: dflt}\n",
        )
        .start()
        .await;
    let token = token(&c).await;
    c.create_yaml(&report_app("lim", "{team: limited}", &me(), "{}"), false)
        .await
        .expect("app");
    c.create_yaml(&report_app("dfl", "{team: dflt}", &me(), "{}"), false)
        .await
        .expect("app");
    c.wait_servers("lim", &["limited"]).await;
    c.wait_servers("dfl", &["dflt"]).await;

    // The agents run in this process: their servers' niceness is this
    // process's plus the configured step, at most 19.
    let own = portico_agent::spawn::own_nice();
    let mut s = McpHttp::new(c.proxy_addr(), "lim", &token);
    let info = s.initialize().await.expect("initialize")["serverInfo"].clone();
    assert_eq!(
        info["version"],
        format!("64:64 1073741824:1073741824 nice {}", (own + 7).min(19)),
        "RLIMIT_NOFILE and RLIMIT_AS, soft and hard, and the niceness: {info}"
    );

    // No limits configured: 1024 open files (or the agent's own lower hard
    // limit), the address space as the agent has it.
    let files = portico_agent::spawn::default_open_files();
    let mut s = McpHttp::new(c.proxy_addr(), "dfl", &token);
    let info = s.initialize().await.expect("initialize")["serverInfo"].clone();
    let version = info["version"].as_str().unwrap_or_default().to_string();
    assert!(
        version.starts_with(&format!("{files}:{files} ")),
        "default RLIMIT_NOFILE: {info}"
    );
    assert!(
        version.ends_with(&format!(
            " nice {}",
            (own + i32::from(portico_agent::spawn::DEFAULT_NICE)).min(19)
        )),
        "default niceness: {info}"
    );
    c.shutdown().await;
}

/// A minimal Streamable HTTP MCP server that answers `whoami` with the
/// `x-caller` and `authorization` headers each request arrived with.
async fn header_echo_upstream() -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let (caller, auth) = (h("x-caller"), h("authorization"));
                        let method = req.method().clone();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let msg: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let reply = match (method.as_str(), msg["method"].as_str()) {
                            ("POST", Some("initialize")) => {
                                Some(json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                            "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                            "serverInfo": {"name": "header-echo", "version": "1"}}}))
                            }
                            ("POST", Some("tools/call")) => {
                                Some(json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                            "content": [{"type": "text", "text": format!("{caller}|{auth}")}]}}))
                            }
                            ("POST", Some(_)) if msg.get("id").is_some() => {
                                Some(json!({"jsonrpc": "2.0", "id": msg["id"], "result": {}}))
                            }
                            _ => None,
                        };
                        let mut resp = match reply {
                            Some(v) => {
                                let mut r = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(v.to_string()),
                                ));
                                r.headers_mut().insert(
                                    "content-type",
                                    "application/json".parse().expect("value"),
                                );
                                r
                            }
                            None => {
                                let mut r = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *r.status_mut() = if method == hyper::Method::GET {
                                    hyper::StatusCode::METHOD_NOT_ALLOWED
                                } else {
                                    hyper::StatusCode::ACCEPTED
                                };
                                r
                            }
                        };
                        resp.headers_mut()
                            .insert("mcp-session-id", "up-1".parse().expect("value"));
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_headers_carry_the_user_and_granted_secrets() {
    let c = ClusterBuilder::new().proxy().start().await;
    let upstream = header_echo_upstream().await;
    let _agent = AgentProcess::start(
        &c,
        "relay",
        &format!(
            "  mcp:\n    allowed_host_users: [{}]\n    secrets:\n    - name: UP_TOKEN\n      labels: {{env: prod}}\n",
            me()
        ),
        &[("PORTICO_SECRET_UP_TOKEN", "s3cret-up")],
    )
    .await;
    let app = |name: &str, env: &str| {
        format!(
            "kind: app\nversion: v3\nmetadata: {{name: {name}, labels: {{team: relay, env: {env}}}}}\nspec:\n  uri: 'mcp+http://{upstream}/mcp'\n  headers:\n    X-Caller: '{{{{user.name}}}}'\n    Authorization: 'Bearer {{{{secret UP_TOKEN}}}}'\n"
        )
    };
    c.create_yaml(&app("up-prod", "prod"), false)
        .await
        .expect("app");
    c.create_yaml(&app("up-dev", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("up-prod", &["relay"]).await;
    c.wait_servers("up-dev", &["relay"]).await;
    let token = token(&c).await;
    let mut s = McpHttp::new(c.proxy_addr(), "up-prod", &token);
    s.initialize().await.expect("session through the relay");
    let r = s.call("whoami", json!({})).await;
    assert_eq!(
        r["result"]["content"][0]["text"], "limits-admin|Bearer s3cret-up",
        "the upstream saw the user and the granted secret: {r}"
    );
    // The same headers on an app no grant covers: refused, naming the
    // secret but not its value.
    let mut d = McpHttp::new(c.proxy_addr(), "up-dev", &token);
    let e = d.initialize().await.expect_err("the secret is not granted");
    let body = String::from_utf8_lossy(&e.body).to_string();
    assert!(
        body.contains("UP_TOKEN") && body.contains("not granted"),
        "{body}"
    );
    assert!(!body.contains("s3cret-up"), "{body}");
    // Headers that would smuggle a line or a relay header are refused when stored.
    let bad = format!(
        "kind: app\nversion: v3\nmetadata: {{name: up-bad}}\nspec:\n  uri: 'mcp+http://{upstream}/mcp'\n  headers:\n    Mcp-Session-Id: x\n"
    );
    let file = c.data_dir().join("up-bad.yaml");
    std::fs::write(&file, bad).expect("file");
    let o = c.pctl(&["create", &file.display().to_string()]).await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "refused");
    assert!(err.contains("spec.headers.Mcp-Session-Id"), "{err}");
    c.shutdown().await;
}

/// Verifies a JWT with PyJWT (an independent implementation) against a JWK
/// set; prints the claims, or fails.
const VERIFY_JWT: &str = r#"
import json, sys, jwt
jwks, token, aud = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
keys = jwt.PyJWKSet.from_dict(jwks)
kid = jwt.get_unverified_header(token)["kid"]
key = next(k for k in keys.keys if k.key_id == kid)
print(json.dumps(jwt.decode(token, key.key, algorithms=["ES256"], audience=aud, issuer="portico")))
"#;

async fn verify_jwt(jwks: &str, token: &str, aud: &str) -> std::process::Output {
    let py = std::env::var("PORTICO_PY").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/clients/.venv/bin/python").into()
    });
    let mut cmd = tokio::process::Command::new(py);
    cmd.args(["-c", VERIFY_JWT, jwks, token, aud]);
    run(cmd, None).await
}

#[tokio::test]
async fn identity_jwt_names_the_user_and_verifies_with_the_proxy_keys() {
    let c = ClusterBuilder::new().proxy().start().await;
    let upstream = header_echo_upstream().await;
    let _agent = AgentProcess::start(
        &c,
        "relay",
        &format!("  mcp:\n    allowed_host_users: [{}]\n", me()),
        &[],
    )
    .await;
    let app = |name: &str, identity: bool| {
        format!(
            "kind: app\nversion: v3\nmetadata: {{name: {name}, labels: {{team: relay}}}}\nspec:\n  uri: 'mcp+http://{upstream}/mcp'\n  headers:\n    X-Caller: '{{{{user.name}}}}'\n{}",
            if identity { "  identity: jwt\n" } else { "" }
        )
    };
    c.create_yaml(&app("up-jwt", true), false)
        .await
        .expect("app");
    c.create_yaml(&app("up-plain", false), false)
        .await
        .expect("app");
    c.wait_servers("up-jwt", &["relay"]).await;
    c.wait_servers("up-plain", &["relay"]).await;
    c.add_user("jwt-user", &["mcp-user", "admin"], PW).await;
    let token = c.login("jwt-user", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "up-jwt", &token);
    s.initialize().await.expect("session through the relay");
    let r = s.call("whoami", json!({})).await;
    let text = r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    let (caller, auth) = text.split_once('|').expect("caller|authorization");
    assert_eq!(caller, "jwt-user");
    let jwt = auth.strip_prefix("Bearer ").expect("a bearer token");

    // The keys, as the proxy publishes them.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(portico_tests::web::connector(
        c.proxy_addr(),
    ));
    let uri: http::Uri = format!(
        "{}/.well-known/jwks.json",
        portico_tests::web::base(c.proxy_addr())
    )
    .parse()
    .expect("uri");
    let resp = client.get(uri).await.expect("jwks answered");
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let jwks = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec(),
    )
    .expect("utf-8");
    assert!(!jwks.contains("\"d\""), "no private key material: {jwks}");

    let o = verify_jwt(&jwks, jwt, "up-jwt").await;
    let (out, err) = portico_tests::cluster::text(&o);
    assert!(o.status.success(), "PyJWT verifies the token: {err}");
    let claims: Value = serde_json::from_str(out.trim()).expect("claims");
    assert_eq!(claims["sub"], "jwt-user");
    assert_eq!(claims["aud"], "up-jwt");
    assert_eq!(claims["roles"], json!(["mcp-user", "admin"]));
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        300
    );
    // For another app, or tampered with, it does not verify.
    assert!(!verify_jwt(&jwks, jwt, "up-plain").await.status.success());
    let mut forged: Vec<String> = jwt.split('.').map(String::from).collect();
    forged[1] = forged[1].replacen('e', "f", 1);
    assert!(
        !verify_jwt(&jwks, &forged.join("."), "up-jwt")
            .await
            .status
            .success()
    );

    // An app without identity: jwt gets no token.
    let mut p = McpHttp::new(c.proxy_addr(), "up-plain", &token);
    p.initialize().await.expect("session");
    let r = p.call("whoami", json!({})).await;
    assert_eq!(r["result"]["content"][0]["text"], "jwt-user|");

    // Only an agent that serves the app gets tokens for it, and only for
    // apps that ask; users get none.
    let rogue = c.join_as("app", "rogue").await;
    let e = c
        .service_client(&rogue)
        .await
        .issue_app_jwt(portico_proto::v1::IssueAppJwtRequest {
            app: "up-jwt".into(),
            user: "jwt-user".into(),
        })
        .await
        .expect_err("the rogue agent serves nothing");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Nor, claiming the app, for a user whose roles do not reach it.
    c.create_yaml(
        "kind: role\nversion: v8\nmetadata: {name: other-team}\nspec:\n  allow:\n    app_labels: {team: other}\n    mcp: {tools: ['*']}\n",
        false,
    )
    .await
    .expect("role");
    c.add_user("outsider", &["other-team"], "outsider-pw-1")
        .await;
    let mut rogue_api = c.service_client(&rogue).await;
    rogue_api
        .heartbeat(portico_proto::v1::HeartbeatRequest {
            ttl_ms: 30_000,
            serve: vec![portico_proto::v1::ServedApp {
                app: "up-jwt".into(),
                static_app_json: String::new(),
            }],
            ..Default::default()
        })
        .await
        .expect("heartbeat");
    let e = rogue_api
        .issue_app_jwt(portico_proto::v1::IssueAppJwtRequest {
            app: "up-jwt".into(),
            user: "outsider".into(),
        })
        .await
        .expect_err("outsider may not reach up-jwt");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("may not reach"), "{}", e.message());
    rogue_api
        .heartbeat(portico_proto::v1::HeartbeatRequest {
            release: true,
            ..Default::default()
        })
        .await
        .expect("release");
    let e = c
        .client(&token)
        .await
        .issue_app_jwt(portico_proto::v1::IssueAppJwtRequest {
            app: "up-jwt".into(),
            user: "jwt-user".into(),
        })
        .await
        .expect_err("users ask for none");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // An app that moves away from jwt: the agent's next session gets none
    // (and the auth-service refuses the agent one).
    c.create_yaml(&app("up-jwt", false), true)
        .await
        .expect("update");
    eventually(Duration::from_secs(10), "the agent sees the change", || {
        let proxy = c.proxy_addr();
        let token = token.clone();
        async move {
            let mut s = McpHttp::new(proxy, "up-jwt", &token);
            s.initialize().await.ok()?;
            let r = s.call("whoami", json!({})).await;
            (r["result"]["content"][0]["text"] == "jwt-user|").then_some(())
        }
    })
    .await;
    c.shutdown().await;
}
