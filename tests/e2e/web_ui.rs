//! The web UI: the whole story in a real browser (Debian's chromium driven
//! by playwright-core, tests/clients/web_ui.js), and the attacks a browser
//! session invites, as raw requests: forged forms, foreign origins, planted
//! and stolen cookies, another user's CSRF token, a login that ended.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portico_core::client_config::{McpClient, document};
use portico_proto::v1;
use portico_tests::util::test_app_yaml;
use portico_tests::{Cluster, ClusterBuilder, TempDir, web};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const ALICE_PW: &str = "alice-password-1";
const BOB_PW: &str = "bob-password-1";
const AUDITOR: &str = "kind: role\nversion: v8\nmetadata: {name: auditor}\nspec:\n  allow:\n    rules:\n    - resources: [event]\n      verbs: [list]\n";
const QA_ONLY: &str = "kind: role\nversion: v8\nmetadata: {name: qa-only}\nspec:\n  allow:\n    app_labels: {env: qa}\n    mcp: {tools: ['*']}\n";

/// alice: mcp-developer (the shared example: dev and test apps, every tool
/// but delete_*, writes apps) and auditor; bob: only env=qa, of which there
/// is none. Apps tools-dev (env=dev) and prod-secret (env=prod), served by
/// an agent that takes dev and prod.
async fn cluster() -> Cluster {
    let c = ClusterBuilder::new()
        .proxy()
        .agent_yaml(
            "dev-prod",
            "app_service:\n  resources:\n  - labels: {env: dev}\n  - labels: {env: prod}\n",
        )
        .start()
        .await;
    let dev_role = std::fs::read_to_string(portico_tests::util::example("mcp-developer-role.yaml"))
        .expect("example role");
    for y in [dev_role.as_str(), AUDITOR, QA_ONLY] {
        c.create_yaml(y, false).await.expect("role");
    }
    c.add_user("alice", &["mcp-developer", "auditor"], ALICE_PW)
        .await;
    c.add_user("bob", &["qa-only"], BOB_PW).await;
    for (name, env) in [("tools-dev", "dev"), ("prod-secret", "prod")] {
        c.create_yaml(&test_app_yaml(name, env), false)
            .await
            .expect("app");
        c.wait_servers(name, &["dev-prod"]).await;
    }
    c
}

fn node_clients() -> PathBuf {
    std::env::var("PORTICO_NODE_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/node_modules"))
}

#[tokio::test]
async fn web_ui_in_a_browser() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test.sh (it installs Debian's chromium)"
    );
    let driver = node_clients().join("playwright-core");
    assert!(
        driver.exists(),
        "{} is missing: run scripts/test.sh (it installs the npm test clients)",
        driver.display()
    );
    let c = cluster().await;
    let dir = TempDir::new("portico-web");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-ui");
    let addr = c.proxy_addr();
    let snippet = serde_json::to_string(&document(
        "psh",
        &["tools-dev".to_string()],
        McpClient::Claude,
    ))
    .expect("json");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/web_ui.js"))
        .env("NODE_PATH", node_clients())
        .env("CHROMIUM", &chromium)
        .env("PORTICO_URL", web::base(addr))
        .env(
            "PORTICO_CERT",
            web::cert_file(addr).expect("the proxy's certificate"),
        )
        .env("PORTICO_SHOTS", &shots)
        .env("ALICE_PW", ALICE_PW)
        .env("BOB_PW", BOB_PW)
        .env("CLAUDE_SNIPPET", &snippet)
        .env("WEB_APP_YAML", test_app_yaml("web-made", "dev"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("node runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut err = child.stderr.take().expect("stderr");
    let story = async {
        let mut done = false;
        while let Some(line) = out.next_line().await.expect("read the script") {
            eprintln!("web_ui.js: {line}");
            let Some(step) = line.strip_prefix("STEP ") else {
                done |= line == "DONE";
                continue;
            };
            match step {
                "create fresh" => {
                    let f = write(&dir, "fresh.yaml", &test_app_yaml("fresh", "dev"));
                    assert!(c.pctl(&["create", &f]).await.status.success());
                }
                "move fresh" => {
                    // No agent takes env=staging: it leaves every list.
                    let f = write(&dir, "fresh2.yaml", &test_app_yaml("fresh", "staging"));
                    assert!(c.pctl(&["create", "-f", &f]).await.status.success());
                }
                "web-made exists" => {
                    let got = get_app(&c, "web-made")
                        .await
                        .expect("created in the browser");
                    assert!(got.json.contains("\"env\":\"dev\""), "{}", got.json);
                }
                "web-made deleted" => {
                    let e = get_app(&c, "web-made")
                        .await
                        .expect_err("deleted in the browser");
                    assert_eq!(e.code(), tonic::Code::NotFound);
                }
                other => panic!("the script asked for an unknown step {other:?}"),
            }
            stdin.write_all(b"ok\n").await.expect("answer the script");
        }
        done
    };
    let done = tokio::time::timeout(Duration::from_secs(180), story)
        .await
        .expect("the browser story ends within 3 minutes");
    let mut stderr = String::new();
    let _ = err.read_to_string(&mut stderr).await;
    let status = child.wait().await.expect("node ends");
    assert!(
        status.success() && done,
        "the browser story failed ({status}):\n{stderr}"
    );
    eprintln!("screenshots: {}", shots.display());
    for name in ["login", "servers", "server", "audit", "editor", "denied"] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }
    c.shutdown().await;
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

async fn get_app(c: &Cluster, name: &str) -> Result<v1::Resource, tonic::Status> {
    c.admin()
        .await
        .get(v1::GetRequest {
            kind: "app".into(),
            name: name.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// One HTTP/1.1 exchange on a fresh connection.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.header("set-cookie").into_iter().find_map(|c| {
            c.split(';')
                .next()
                .and_then(|kv| kv.split_once('='))
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form with a CSRF token")
            + 19;
        self.body[at..at + self.body[at..].find('"').expect("end")].to_string()
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = web::stream(addr).await;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Logs in through the form; returns the login cookie's value.
async fn web_login(addr: SocketAddr, user: &str, password: &str) -> String {
    let form = http(addr, "GET", "/web/login", &[], "").await;
    let pre = form.cookie("portico_login").expect("a form cookie");
    let csrf = form.csrf();
    assert_eq!(pre, csrf);
    let r = http(
        addr,
        "POST",
        "/web/login",
        &[("Cookie", &format!("portico_login={pre}"))],
        &format!("user={user}&password={password}&csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    r.cookie("portico_web").expect("a login cookie")
}

#[tokio::test]
async fn web_ui_refuses_forgeries() {
    let c = cluster().await;
    let addr = c.proxy_addr();

    // Anonymous: the root and every page lead to the login form.
    let r = http(addr, "GET", "/", &[], "").await;
    assert_eq!(
        (r.status, r.header("location")),
        (303, vec!["/web".to_string()])
    );
    for p in [
        "/web",
        "/web/audit",
        "/web/servers/tools-dev",
        "/web/apps/new",
    ] {
        let r = http(addr, "GET", p, &[], "").await;
        assert_eq!(r.status, 303, "{p}");
        assert_eq!(r.header("location"), vec!["/web/login".to_string()], "{p}");
    }
    let r = http(addr, "GET", "/web/fragments/servers", &[], "").await;
    assert_eq!(r.status, 401);

    // The login form's token must come back with the form's own cookie.
    let form = http(addr, "GET", "/web/login", &[], "").await;
    let csrf = form.csrf();
    let r = http(
        addr,
        "POST",
        "/web/login",
        &[],
        &format!("user=alice&password={ALICE_PW}&csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status, 403, "a login without the form cookie");
    let r = http(
        addr,
        "POST",
        "/web/login",
        &[
            ("Cookie", &format!("portico_login={csrf}")),
            ("Origin", "https://evil.example"),
        ],
        &format!("user=alice&password={ALICE_PW}&csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status, 403, "a login posted from another site");
    assert!(r.cookie("portico_web").is_none());

    let alice = web_login(addr, "alice", ALICE_PW).await;
    let bob = web_login(addr, "bob", BOB_PW).await;
    let as_alice = format!("portico_web={alice}");
    let page = http(
        addr,
        "GET",
        "/web/servers/tools-dev",
        &[("Cookie", &as_alice)],
        "",
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains(&alice), "the token is not in the page");
    for h in [
        "content-security-policy",
        "x-frame-options",
        "x-content-type-options",
    ] {
        assert!(!page.header(h).is_empty(), "{h}");
    }
    assert_eq!(page.header("cache-control"), vec!["no-store".to_string()]);
    let alice_csrf = page.csrf();
    let bob_csrf = http(
        addr,
        "GET",
        "/web",
        &[("Cookie", &format!("portico_web={bob}"))],
        "",
    )
    .await
    .csrf();
    assert_ne!(alice_csrf, bob_csrf);

    // Create and delete without, with a wrong, or with another user's token,
    // or from another origin: refused, and nothing is written.
    let yaml = test_app_yaml("forged", "dev");
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    for (csrf, origin) in [
        ("", None),
        ("0123456789abcdef0123456789abcdef", None),
        (bob_csrf.as_str(), None),
        (alice_csrf.as_str(), Some("https://evil.example")),
    ] {
        let mut headers = vec![("Cookie", as_alice.as_str())];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let body = format!("yaml={}&mode=create&original=&csrf={csrf}", enc(&yaml));
        let r = http(addr, "POST", "/web/apps", &headers, &body).await;
        assert_eq!(r.status, 403, "csrf {csrf:?} origin {origin:?}: {}", r.body);
        let r = http(
            addr,
            "POST",
            "/web/apps/tools-dev/delete",
            &headers,
            &format!("csrf={csrf}"),
        )
        .await;
        assert_eq!(r.status, 403, "delete with csrf {csrf:?} origin {origin:?}");
    }
    assert_eq!(
        get_app(&c, "forged").await.expect_err("not created").code(),
        tonic::Code::NotFound
    );
    assert!(get_app(&c, "tools-dev").await.is_ok(), "not deleted");

    // A cookie planted beside the real one makes neither count.
    let r = http(
        addr,
        "GET",
        "/web",
        &[("Cookie", &format!("{as_alice}; portico_web={bob}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 303);

    // The roles decide, not the form: bob cannot write apps or read the log.
    let as_bob = format!("portico_web={bob}");
    let body = format!("yaml={}&mode=create&original=&csrf={bob_csrf}", enc(&yaml));
    let r = http(addr, "POST", "/web/apps", &[("Cookie", &as_bob)], &body).await;
    assert_eq!(r.status, 403);
    let r = http(addr, "GET", "/web/audit", &[("Cookie", &as_bob)], "").await;
    assert_eq!(r.status, 403);
    // Nor can he see a server his roles do not reach, even by name.
    let r = http(
        addr,
        "GET",
        "/web/servers/tools-dev",
        &[("Cookie", &as_bob)],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        !r.body.contains("test server"),
        "nothing of the app is shown"
    );
    // Alice does not see prod-secret either.
    let r = http(
        addr,
        "GET",
        "/web/servers/prod-secret",
        &[("Cookie", &as_alice)],
        "",
    )
    .await;
    assert_eq!(r.status, 404);

    // A good form works (the same validation as pctl: a bad name is refused
    // with its line), and the audit log names the browser's address.
    let bad = "kind: app\nversion: v3\nmetadata:\n  name: Bad_Name\nspec:\n  mcp: {command: x, run_as_host_user: root}\n";
    let body = format!("yaml={}&mode=create&original=&csrf={alice_csrf}", enc(bad));
    let r = http(addr, "POST", "/web/apps", &[("Cookie", &as_alice)], &body).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("app.yaml:1: metadata.name"), "{}", r.body);
    let body = format!(
        "yaml={}&mode=create&original=&csrf={alice_csrf}",
        enc(&yaml)
    );
    let r = http(addr, "POST", "/web/apps", &[("Cookie", &as_alice)], &body).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(
        get_app(&c, "forged").await.is_ok(),
        "created with the right token"
    );
    let r = http(addr, "POST", "/web/apps", &[("Cookie", &as_alice)], &body).await;
    assert_eq!(
        r.status, 409,
        "creating it again is refused as pctl create is: {}",
        r.body
    );

    // Logging out ends the login everywhere: its token stops working.
    let r = http(
        addr,
        "POST",
        "/web/logout",
        &[("Cookie", &as_alice)],
        &format!("csrf={alice_csrf}"),
    )
    .await;
    assert_eq!(r.status, 303);
    assert_eq!(r.cookie("portico_web").as_deref(), Some(""));
    let r = http(addr, "GET", "/web", &[("Cookie", &as_alice)], "").await;
    assert_eq!(r.status, 303, "the old cookie no longer logs in");
    let e = c
        .client(&alice)
        .await
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect_err("the token is dead at the auth-service");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let events = c
        .admin()
        .await
        .list_events(v1::ListEventsRequest {
            r#type: "user".into(),
            user: "alice".into(),
            newest_first: true,
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(types.first(), Some(&"user.logout"), "{types:?}");
    assert!(types.contains(&"user.login"), "{types:?}");
    assert!(
        events
            .iter()
            .all(|e| e.fields_json.contains("\"source\":\"127.0.0.1\"")),
        "web logins are audited with the browser's address: {events:?}"
    );
    c.shutdown().await;
}
