//! The docker-compose deployment, checked without Docker: the same binary
//! and the same deploy/*.yaml configs, run as processes on loopback with a
//! real Postgres, then used as a person would (pctl, psh, an MCP session).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portico_tests::cluster::{run, text};
use portico_tests::mcp_http::McpHttp;
use portico_tests::pg::PgDb;
use portico_tests::util::{me, test_app_yaml};
use portico_tests::{TempDir, bin, eventually};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Service(tokio::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn start(config: &str, env: &[(String, String)], log: &Path) -> Service {
    let mut cmd = tokio::process::Command::new(bin("portico"));
    cmd.args(["start", "--config"])
        .arg(repo().join("deploy").join(config));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let logf = std::fs::File::create(log).expect("log file");
    cmd.stdout(Stdio::null()).stderr(logf).kill_on_drop(true);
    Service(cmd.spawn().expect("portico starts"))
}

fn random_token() -> String {
    let n: [u8; 16] = rand::Rng::random(&mut rand::rng());
    n.iter().map(|b| format!("{b:02x}")).collect()
}

/// Each compose service runs `portico start --config /etc/portico/<file>` with a file from deploy/.
#[test]
fn compose_file_uses_the_deploy_configs() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose file");
    let doc: serde_json::Value = yaml_serde::from_str(&text).expect("compose parses");
    for svc in ["auth", "proxy", "agent"] {
        let cmd: Vec<String> =
            serde_json::from_value(doc["services"][svc]["command"].clone()).expect("command list");
        assert_eq!(&cmd[..3], &["portico", "start", "--config"], "{svc}");
        let file = cmd[3]
            .strip_prefix("/etc/portico/")
            .expect("config under /etc/portico");
        assert!(
            repo().join("deploy").join(file).exists(),
            "{svc}: deploy/{file} exists"
        );
    }
    assert!(repo().join("Dockerfile").exists());
}

#[tokio::test]
async fn compose_topology_as_processes() {
    let db = PgDb::create().await;
    let dir = TempDir::new("portico-deploy");
    let (auth_port, web_port, tunnel_port) = (free_port(), free_port(), free_port());
    let proxy_token = random_token();
    let agent_token = random_token();
    let common = |name: &str| -> Vec<(String, String)> {
        vec![
            (
                "PORTICO_DATA_DIR".into(),
                dir.path().join(name).display().to_string(),
            ),
            ("PORTICO_AUTH_ADDR".into(), format!("127.0.0.1:{auth_port}")),
            ("PORTICO_PROXY_JOIN_TOKEN".into(), proxy_token.clone()),
            ("PORTICO_AGENT_JOIN_TOKEN".into(), agent_token.clone()),
        ]
    };
    let mut auth_env = common("auth");
    auth_env.push(("PORTICO_PG_URL".into(), db.url.clone()));
    auth_env.push((
        "PORTICO_AUTH_LISTEN".into(),
        format!("127.0.0.1:{auth_port}"),
    ));
    let _auth = start("auth.yaml", &auth_env, &dir.path().join("auth.log"));
    let health = |port: u16| async move {
        (portico_tests::web::probe(&format!("127.0.0.1:{port}"), "/healthz").await? == 200)
            .then_some(())
    };
    // A script that waits for the port and runs pctl at once must succeed:
    // the port only accepts once the admin identity is written.
    eventually(Duration::from_secs(30), "auth port accepts", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", auth_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let mut first = tokio::process::Command::new(bin("pctl"));
    first
        .arg("--data-dir")
        .arg(dir.path().join("auth"))
        .args(["get", "roles"]);
    let o = run(first, None).await;
    assert!(
        o.status.success(),
        "pctl right after the port opened: {:?}",
        text(&o)
    );
    eventually(Duration::from_secs(30), "auth healthy", || {
        health(auth_port)
    })
    .await;
    let ready = |port: u16| async move {
        (portico_tests::web::probe(&format!("127.0.0.1:{port}"), "/readyz").await? == 200)
            .then_some(())
    };
    eventually(Duration::from_secs(30), "auth ready", || ready(auth_port)).await;

    let mut proxy_env = common("proxy");
    proxy_env.push(("PORTICO_WEB_LISTEN".into(), format!("127.0.0.1:{web_port}")));
    proxy_env.push((
        "PORTICO_TUNNEL_LISTEN".into(),
        format!("127.0.0.1:{tunnel_port}"),
    ));
    let _proxy = start("proxy.yaml", &proxy_env, &dir.path().join("proxy.log"));
    eventually(Duration::from_secs(30), "proxy healthy", || {
        health(web_port)
    })
    .await;
    let mut agent_env = common("agent");
    // The tests run apps as their own user (root here), which the agent must allow.
    agent_env.push(("PORTICO_ALLOWED_HOST_USERS".into(), format!("[{}]", me())));
    agent_env.push((
        "PORTICO_TUNNEL_ADDR".into(),
        format!("127.0.0.1:{tunnel_port}"),
    ));
    let _agent = start("agent.yaml", &agent_env, &dir.path().join("agent.log"));

    // The operator on the auth host.
    let pctl = |args: Vec<String>, stdin: Option<&'static str>| {
        let mut cmd = tokio::process::Command::new(bin("pctl"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("auth"))
            .args(args)
            .env("PORTICO_HOME", dir.path().join("home"));
        run(cmd, stdin)
    };
    let o = pctl(
        vec![
            "users".into(),
            "add".into(),
            "ops".into(),
            "--roles=admin".into(),
            "--password-stdin".into(),
        ],
        Some("ops-password-1\n"),
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let app_file = dir.path().join("app.yaml");
    std::fs::write(&app_file, test_app_yaml("tm", "dev")).expect("app file");
    let o = pctl(vec!["create".into(), app_file.display().to_string()], None).await;
    assert!(o.status.success(), "{:?}", text(&o));

    // The user, through the proxy only.
    let psh = |args: &[&str], stdin: Option<&'static str>| {
        let mut cmd = tokio::process::Command::new(bin("psh"));
        cmd.args(args).env("PORTICO_HOME", dir.path().join("home"));
        run(cmd, stdin)
    };
    let proxy = format!("--proxy=127.0.0.1:{web_port}");
    let ca_file = format!(
        "--ca-file={}",
        dir.path().join("proxy/web-cert.pem").display()
    );
    let o = psh(
        &["login", &proxy, "--user=ops", "--password-stdin", &ca_file],
        Some("ops-password-1\n"),
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let listed = eventually(Duration::from_secs(30), "psh mcp ls shows tm", || async {
        let o = psh(&["mcp", "ls"], None).await;
        let out = text(&o).0;
        out.contains("tm").then_some(out)
    })
    .await;
    assert!(
        listed.contains("Allowed Tools") && listed.contains("env=dev"),
        "{listed}"
    );
    // pctl elsewhere goes through the proxy with the user's own rights.
    let mut cmd = tokio::process::Command::new(bin("pctl"));
    cmd.args(["get", "app_servers"])
        .env("PORTICO_HOME", dir.path().join("home"))
        .env_remove("PORTICO_DATA_DIR")
        .current_dir(dir.path());
    let o = run(cmd, None).await;
    assert!(
        o.status.success() && text(&o).0.contains("tm"),
        "{:?}",
        text(&o)
    );

    let token = {
        let p = std::fs::read_to_string(dir.path().join("home/profile.yaml")).expect("profile");
        let v: serde_json::Value = yaml_serde::from_str(&p).expect("profile parses");
        v["token"].as_str().expect("token").to_string()
    };
    let web_addr: std::net::SocketAddr = format!("127.0.0.1:{web_port}").parse().expect("addr");
    portico_tests::web::register_file(web_addr, dir.path().join("proxy/web-cert.pem"));
    let mut s = McpHttp::new(web_addr, "tm", &token);
    s.initialize()
        .await
        .expect("session through the deployed proxy");
    let r = s.call("echo", json!({"message": "deployed"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "deployed");
    // Logs written to a file carry no colour codes.
    for log in ["auth.log", "proxy.log", "agent.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).expect("log");
        assert!(
            !text.is_empty() && !text.contains('\u{1b}'),
            "{log} has ANSI escapes"
        );
    }
}
